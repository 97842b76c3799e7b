//! tt-journal: a crash-safe journal of operations, on a tt-ring.
//!
//! # The model
//!
//! A [`Journal`] owns a ring (both its producer and its consumer) and a
//! `perform` function that applies operations to whatever the journal
//! protects (for tt-host: a guest's disk image).
//!
//! - [`Journal::start`] first replays everything left in the ring by an
//!   earlier run (crash recovery), then starts a background applier thread.
//! - [`Journal::push`] appends one operation and returns once it is
//!   durable. Concurrent pushers share syncs (group commit): a committer
//!   thread takes every operation queued so far as one batch, writes it to
//!   the ring and advances it (one sync: tt-ring commits with a single
//!   sync), then wakes exactly the pushers of that batch. An operation
//!   queued while a commit is in flight goes into the next one, so no
//!   pusher waits for more than the commit in flight and its own. A
//!   pusher alone (the committer idle, no other thread pushing) commits
//!   on its own thread instead, which saves two thread switches.
//! - [`Journal::submit`] queues an operation the same way but returns at
//!   once; [`Pending::wait`] then waits until it is durable. One thread
//!   can so keep many operations in flight (a device queue), sharing
//!   commits like that many pushers without a thread and a wake-up each.
//! - The applier reads durable operations in push order, calls `perform`
//!   with batches of them, and frees their ring space only after `perform`
//!   returned `Ok`. A `perform` that fails or panics is retried after
//!   `retry_interval`. Performed space is freed in batches (each free is
//!   two syncs): when a quarter of the ring is performed, every 50 ms, when a
//!   pusher waits for space, and at shutdown. So every acknowledged
//!   operation is performed at least once, in order, even across crashes;
//!   after a crash, what was performed since the last free is performed
//!   again, so `perform` must be idempotent.
//! - [`Waiter::sync`] waits until `perform` has run for the operation.
//! - When the ring is full, pushers wait for the applier to free space, up
//!   to `full_timeout`, then fail with [`Error::Full`]; nothing is ever
//!   dropped or overwritten.
//!
//! Operations are any serde type, encoded with postcard. Each ring record
//! is a `u64` sequence number followed by the encoded operation.

mod event;

use event::Event;
use serde::{de::DeserializeOwned, Serialize};
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tt_ring::{BlockDevice, Consumer, Producer};

/// Why a journal operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The ring stayed full for longer than `full_timeout`: the applier is
    /// not keeping up (or `perform` keeps failing). Nothing was written.
    #[error("journal full: no space freed within {0:?}")]
    Full(Duration),
    /// The operation can never fit in the ring.
    #[error("operation of {len} bytes can never fit in the journal (max {max})")]
    TooBig { len: u64, max: u64 },
    /// [`Journal::shutdown`] was called.
    #[error("journal is shut down")]
    ShutDown,
    /// A record in the ring does not decode as an operation.
    #[error("journal record at position {position} does not decode: {err}")]
    Decode { position: u64, err: postcard::Error },
    /// Encoding the operation failed.
    #[error("cannot encode operation: {0}")]
    Encode(postcard::Error),
    /// The ring failed (I/O error, corruption). A failed commit is never
    /// acknowledged; the journal refuses further pushes.
    #[error("ring: {0}")]
    Ring(#[from] tt_ring::Error),
}

/// Tuning knobs.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    /// How long the applier waits for more operations before performing a
    /// batch (0: perform as soon as anything is durable).
    pub flush_interval: Duration,
    /// How long to wait before retrying a failed `perform`.
    pub retry_interval: Duration,
    /// How long a push waits for space in a full ring.
    pub full_timeout: Duration,
    /// Most operations handed to one `perform` call.
    pub max_batch: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            flush_interval: Duration::ZERO,
            retry_interval: Duration::from_millis(100),
            full_timeout: Duration::from_secs(30),
            max_batch: 1024,
        }
    }
}

/// Counters, for monitoring.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Metrics {
    /// Operations durable but not yet performed.
    pub pending_ops: u64,
    /// Encoded bytes of those operations.
    pub pending_bytes: u64,
    /// Commits (ring advances) done.
    pub syncs: u64,
    /// Duration of the last commit.
    pub last_sync_latency: Duration,
    /// Batches handed to `perform` (including retries).
    pub performs: u64,
    /// `perform` calls that failed or panicked.
    pub perform_failures: u64,
}

struct State {
    /// Next sequence number to hand out.
    next_seq: u64,
    /// Encoded records queued for the next commit.
    queue: Vec<(u64, Vec<u8>)>,
    /// Queued ops that did not fit before `full_timeout`: their pushers
    /// get [`Error::Full`].
    failed: std::collections::HashSet<u64>,
    /// Queued ops whose [`Pending`] was dropped unwaited: if they fail,
    /// no one is told.
    abandoned: std::collections::HashSet<u64>,
    /// Every operation with a smaller sequence number is durable.
    durable: u64,
    /// Every operation with a smaller sequence number is performed.
    performed: u64,
    /// Number of the batch now accumulating in `queue`; its pushers wait
    /// on `Shared::batch_done[batch % 2]`.
    batch: u64,
    committing: bool,
    /// A push that makes the queue this long wakes the committer (then
    /// sets it to `usize::MAX`): 1 while the committer idles, the size it
    /// gathers for while it gathers, `usize::MAX` while it commits. So the
    /// committer wakes once per batch, not once per push.
    wake_at: usize,
    flush_requested: bool,
    /// The applier is gathering durable ops for `flush_interval` before it
    /// performs them: a commit need not wake it (it would only look and
    /// sleep again, a task switch per commit); a flush request or a stop
    /// still does.
    gathering: bool,
    accepting: bool,
    stopping: bool,
    /// [`Journal::hold`]: the applier performs and frees nothing.
    held: bool,
    /// The applier is waiting with nothing in hand (what `hold` waits
    /// for).
    applier_idle: bool,
    /// A commit failed: the journal no longer accepts pushes.
    broken: Option<String>,
    /// Sizes of durable, unperformed ops, for metrics: (seq, bytes).
    pending: std::collections::VecDeque<(u64, u64)>,
    metrics: Metrics,
}

/// Who waits for what. Each wait has its own condition variable (or, for
/// pushers, futex word), so a change wakes only the threads it concerns:
/// with 64 pushers, waking all of them on every commit and every perform
/// costs more CPU than the journal's own work.
struct Shared<D: BlockDevice> {
    state: Mutex<State>,
    /// The committer waits here for queued operations (or a stop).
    work: Condvar,
    /// Pushers of batch `b` sleep on `batch_done[b % 2]` until its commit
    /// (or a failure), without the state mutex: on waking they read
    /// `durable`. Batch `b + 2` cannot start before batch `b` is done, so
    /// two suffice.
    batch_done: [Event; 2],
    /// `State::durable`, readable without the lock.
    durable: AtomicU64,
    /// Threads inside `push`.
    pushing: AtomicUsize,
    /// `State::failed.len()`, readable without the lock: while it is 0 a
    /// woken pusher may trust `durable` alone (a failed op's seq can be
    /// below a later batch's `durable`).
    failures: AtomicUsize,
    /// The applier waits here for durable operations, flush requests,
    /// space to free, or a stop.
    applier: Condvar,
    /// Signalled when `performed` moves, the committer finishes a batch,
    /// or the journal stops: `Waiter::sync` and `shutdown` wait here.
    progress: Condvar,
    /// Signalled when the applier frees ring space: a commit waiting in a
    /// full ring waits here.
    space: Condvar,
    producer: Mutex<Producer<D>>,
    /// Largest record the ring takes (fixed for its lifetime).
    max_record: u64,
    config: Config,
}

/// A running journal of operations of type `Op`.
pub struct Journal<Op, D: BlockDevice> {
    shared: Arc<Shared<D>>,
    /// The applier and committer threads, until shutdown.
    threads: Mutex<Option<(JoinHandle<()>, JoinHandle<()>)>>,
    _op: PhantomData<fn(Op)>,
}

/// Returned by [`Journal::push`]: the operation is durable.
#[must_use = "the operation is durable; call sync() to wait until it is performed"]
pub struct Waiter<D: BlockDevice> {
    shared: Arc<Shared<D>>,
    seq: u64,
}

/// Returned by [`Journal::submit`]: an operation queued for a commit,
/// not yet known durable.
#[must_use = "the operation is not known durable until wait() returns Ok"]
pub struct Pending<D: BlockDevice> {
    shared: Arc<Shared<D>>,
    seq: u64,
    /// Its batch's event: `Shared::batch_done[event]`.
    event: usize,
    /// That event's generation when the op was queued.
    seen: u32,
    /// This thread committed the op's batch itself (its outcome is known).
    committed: bool,
    /// `wait` took the outcome.
    resolved: bool,
}

impl<D: BlockDevice> Pending<D> {
    /// The operation's sequence number (push order).
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Is the operation known durable already, so that [`wait`](Self::wait)
    /// returns `Ok` at once? `false` says nothing (it may become durable,
    /// or fail, at any time): then `wait` tells.
    pub fn is_durable(&self) -> bool {
        let sh = &self.shared;
        self.committed
            || (sh.durable.load(Ordering::Acquire) > self.seq
                && sh.failures.load(Ordering::Relaxed) == 0)
    }

    /// Wait until the operation is durable.
    ///
    /// Outcomes:
    /// - `Ok(waiter)`: durable; [`Waiter::sync`] waits until it is
    ///   performed.
    /// - [`Error::Full`]: the ring stayed full for `full_timeout`; nothing
    ///   was written for this op. Ops submitted after it may still commit
    ///   once space is freed, so a resubmitted op lands after them: ops in
    ///   flight together have no order on failure (as requests in flight
    ///   in a device queue). To order one op after another, wait for the
    ///   first before submitting the second.
    /// - [`Error::Ring`]: the journal failed (a commit or the applier) before
    ///   this op was committed. It is not acknowledged, yet it may be in
    ///   the ring (a failed sync may have written it); the journal accepts
    ///   no more operations: start it again, and the replay shows what is.
    ///
    /// Dropping a `Pending` without waiting does not withdraw the op.
    pub fn wait(mut self) -> Result<Waiter<D>, Error> {
        self.resolved = true;
        let sh = &self.shared;
        let done = &sh.batch_done[self.event];
        let mut seen = self.seen;
        // A pusher that committed itself has its outcome already; so may
        // an op submitted long ago (and its event's generation may since
        // have come back to `seen`: it is a u32).
        let mut skip_wait = self.committed
            || (sh.durable.load(Ordering::Acquire) > self.seq
                && sh.failures.load(Ordering::Relaxed) == 0);
        'outcome: loop {
            if !std::mem::take(&mut skip_wait) {
                done.wait(seen);
            }
            seen = done.generation();
            // `failures` is read after `durable` (Acquire): a failure that
            // a later batch's `durable` covers was counted before it.
            if sh.durable.load(Ordering::Acquire) > self.seq
                && sh.failures.load(Ordering::Relaxed) == 0
            {
                break;
            }
            // Some op failed, or this one is not durable yet (a failure, a
            // stop or a spurious wake): ask the state, failures first.
            let mut st = lock(&sh.state);
            loop {
                if st.failed.remove(&self.seq) {
                    sh.failures.fetch_sub(1, Ordering::Relaxed);
                    return Err(Error::Full(sh.config.full_timeout));
                }
                if st.durable > self.seq {
                    break 'outcome;
                }
                match &st.broken {
                    None => break,
                    // The journal broke (a commit or the applier failed),
                    // but the commit in flight may still make this op
                    // durable: wait for its outcome.
                    Some(_) if st.committing => st = wait(&sh.progress, st),
                    Some(why) => {
                        return Err(Error::Ring(tt_ring::Error::Invalid(format!(
                            "the journal failed before this operation was committed: {why}"
                        ))))
                    }
                }
            }
        }
        Ok(Waiter {
            shared: self.shared.clone(),
            seq: self.seq,
        })
    }
}

impl<D: BlockDevice> Drop for Pending<D> {
    /// Dropped without [`wait`](Pending::wait): the op still commits, but
    /// no one will take its failure, so make sure none stays recorded
    /// (while any is, every pusher takes the slow path).
    fn drop(&mut self) {
        if self.resolved {
            return;
        }
        let sh = &self.shared;
        let mut st = lock(&sh.state);
        if st.failed.remove(&self.seq) {
            sh.failures.fetch_sub(1, Ordering::Relaxed);
        } else if st.durable <= self.seq && st.broken.is_none() {
            st.abandoned.insert(self.seq);
        }
    }
}

impl<D: BlockDevice> Shared<D> {
    /// Wake every waiter (a failure or a stop concerns them all).
    fn wake_all(&self) {
        self.work.notify_all();
        self.batch_done[0].notify();
        self.batch_done[1].notify();
        self.applier.notify_all();
        self.progress.notify_all();
        self.space.notify_all();
    }
}

fn wait<'a, T>(cv: &Condvar, g: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    cv.wait(g).unwrap_or_else(|e| e.into_inner())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking perform is caught; a poisoned lock only means another
    // thread panicked while holding it, and the state stays consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<D: BlockDevice> Waiter<D> {
    /// The operation's sequence number (push order).
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Wait until `perform` has completed for this operation. Returns
    /// [`Error::ShutDown`] if the journal stopped (without draining) first.
    pub fn sync(&self) -> Result<(), Error> {
        let mut st = lock(&self.shared.state);
        st.flush_requested = true;
        self.shared.applier.notify_one();
        while st.performed <= self.seq {
            if st.stopping {
                return Err(Error::ShutDown);
            }
            st = wait(&self.shared.progress, st);
        }
        Ok(())
    }

    /// Ask the applier to perform what is pending now, without waiting
    /// for `flush_interval`.
    pub fn flush(&self) {
        lock(&self.shared.state).flush_requested = true;
        self.shared.applier.notify_one();
    }
}

impl<Op, D> Journal<Op, D>
where
    Op: Serialize + DeserializeOwned + Send + 'static,
    D: BlockDevice + Clone + Send + Sync + 'static,
{
    /// Replay what an earlier run left in the ring on `dev` (which must
    /// already be a ring: see [`tt_ring::Producer::create`]), then start
    /// the applier. `perform` receives batches of operations in push order.
    ///
    /// Replay calls `perform` until it succeeds for everything pending
    /// (retrying after `retry_interval`), so `start` returns only once the
    /// protected state has caught up with the journal.
    pub fn start<F, E>(dev: D, config: Config, perform: F) -> Result<Journal<Op, D>, Error>
    where
        F: FnMut(&[Op]) -> Result<(), E> + Send + 'static,
        E: std::fmt::Display,
    {
        let mut consumer = Consumer::attach(dev.clone())?;
        let producer = Producer::attach(dev)?;
        let performed_to = consumer.position();
        let mut applier = Applier::<Op, _, _>::new(&mut consumer, perform, config, performed_to);
        // Replay: perform everything pending before accepting pushes.
        let mut last_seq = None;
        loop {
            // Everything in the ring is durable here: attach synced.
            let batch = applier.read_batch(u64::MAX)?;
            if batch.ops.is_empty() {
                break;
            }
            last_seq = batch.last_seq.or(last_seq);
            applier.perform_until_ok(&batch, None::<&Shared<D>>)?;
            applier.free()?;
        }
        let next_seq = last_seq.map_or(0, |s| s + 1);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                next_seq,
                queue: Vec::new(),
                failed: Default::default(),
                abandoned: Default::default(),
                durable: next_seq,
                performed: next_seq,
                batch: 0,
                committing: false,
                wake_at: usize::MAX,
                flush_requested: false,
                held: false,
                applier_idle: false,
                gathering: false,
                accepting: true,
                stopping: false,
                broken: None,
                pending: Default::default(),
                metrics: Metrics::default(),
            }),
            work: Condvar::new(),
            batch_done: [Event::default(), Event::default()],
            durable: AtomicU64::new(next_seq),
            pushing: AtomicUsize::new(0),
            failures: AtomicUsize::new(0),
            applier: Condvar::new(),
            progress: Condvar::new(),
            space: Condvar::new(),
            max_record: producer.max_item(),
            producer: Mutex::new(producer),
            config,
        });
        let Applier {
            perform,
            performed_to,
            ..
        } = applier;
        let s2 = shared.clone();
        let committer = std::thread::Builder::new()
            .name("tt-journal-committer".into())
            .spawn({
                let shared = shared.clone();
                move || committer(&shared)
            })
            .expect("spawn committer thread");
        let handle = std::thread::Builder::new()
            .name("tt-journal-applier".into())
            .spawn(move || {
                Applier::<Op, _, _>::new(&mut consumer, perform, config, performed_to).run(&s2);
            })
            .expect("spawn applier thread");
        Ok(Journal {
            shared,
            threads: Mutex::new(Some((handle, committer))),
            _op: PhantomData,
        })
    }

    /// Append `op`; returns once it is durable (synced to the ring).
    ///
    /// Outcomes: `Ok(waiter)`; [`Error::Full`] after waiting
    /// `full_timeout` for space; [`Error::TooBig`]; [`Error::ShutDown`];
    /// [`Error::Ring`] if the journal failed (a commit or the applier)
    /// before the op was committed (the op is not acknowledged and the
    /// journal accepts no more pushes).
    pub fn push(&self, op: &Op) -> Result<Waiter<D>, Error> {
        let _pushing = Pushing::enter(&self.shared.pushing);
        self.enqueue(op, true)?.wait()
    }

    /// Append `op` without waiting for it: the returned [`Pending`] waits
    /// until it is durable. One thread can so keep many operations in
    /// flight, the way a device queue does (a virtio-blk queue of depth
    /// 64 submits up to 64 requests, then completes each once durable);
    /// they share commits as that many concurrent pushers would, without
    /// a thread (and a wake-up) per operation. (A submitter never commits
    /// on its own thread, as a lone pusher does.) Operations are committed
    /// in submission order, whether or not their `Pending` is waited for,
    /// except on failure (see [`Pending::wait`]).
    ///
    /// `submit` never waits, not even for ring space: the caller bounds
    /// how many operations it keeps in flight.
    ///
    /// Fails at once with [`Error::TooBig`], [`Error::Encode`],
    /// [`Error::ShutDown`] or [`Error::Ring`] (the journal failed
    /// earlier); the other outcomes of [`push`](Self::push) come from
    /// [`Pending::wait`].
    pub fn submit(&self, op: &Op) -> Result<Pending<D>, Error> {
        self.enqueue(op, false)
    }

    /// Queue `op` for the next commit. If `may_lead`, the committer is
    /// idle and no other thread is pushing, commit it on this thread.
    fn enqueue(&self, op: &Op, may_lead: bool) -> Result<Pending<D>, Error> {
        // Refuse a too-big op before queueing it: once queued it would
        // share a commit with other pushers' ops, and the ring's TooBig
        // would fail whichever pusher leads that commit (leaving the ops
        // staged before it in the producer, to be written twice).
        let len = postcard::serialize_with_flavor(op, postcard::ser_flavors::Size::default())
            .map_err(Error::Encode)?;
        let max = self.shared.max_record;
        if len as u64 + 8 > max {
            return Err(Error::TooBig {
                len: len as u64,
                max: max.saturating_sub(8),
            });
        }
        // The record: the seq (filled in below), then the op, encoded in
        // place with the lock not held.
        let mut rec = Vec::with_capacity(8 + len);
        rec.extend_from_slice(&[0; 8]);
        let mut rec = postcard::to_io(op, rec).map_err(Error::Encode)?;
        // Again on what was encoded: an op may encode differently twice
        // (a buffer another thread fills), and a too-big record would
        // break the journal.
        if rec.len() as u64 > max {
            return Err(Error::TooBig {
                len: rec.len() as u64 - 8,
                max: max.saturating_sub(8),
            });
        }
        let mut st = lock(&self.shared.state);
        if !st.accepting {
            return Err(Error::ShutDown);
        }
        if let Some(why) = &st.broken {
            return Err(Error::Ring(tt_ring::Error::Invalid(format!(
                "the journal failed earlier: {why}"
            ))));
        }
        let seq = st.next_seq;
        st.next_seq += 1;
        rec[..8].copy_from_slice(&seq.to_le_bytes());
        st.queue.push((seq, rec));
        // Read under the lock: the commit (or failure) of this op happens
        // after it is released, and bumps the generation after that.
        let event = (st.batch % 2) as usize;
        let seen = self.shared.batch_done[event].generation();
        let led = may_lead
            && st.wake_at == 1
            && !st.committing
            && self.shared.pushing.load(Ordering::Relaxed) == 1;
        if led {
            // The committer is idle and no other thread is pushing, so
            // there is no one to share a commit with: commit on this
            // thread, which saves two thread switches (most of a lone
            // pusher's wait beyond the sync itself). Ops pushed meanwhile
            // are left for the committer.
            (st, _) = commit_queue(&self.shared, st);
            if st.queue.is_empty() {
                st.wake_at = 1;
            } else {
                self.shared.work.notify_one();
            }
        } else if st.queue.len() >= st.wake_at {
            st.wake_at = usize::MAX;
            self.shared.work.notify_one();
        }
        drop(st);
        Ok(Pending {
            shared: self.shared.clone(),
            seq,
            event,
            seen,
            committed: led,
            resolved: false,
        })
    }

    /// Current counters.
    pub fn metrics(&self) -> Metrics {
        let st = lock(&self.shared.state);
        let mut m = st.metrics;
        m.pending_ops = st.pending.len() as u64;
        m.pending_bytes = st.pending.iter().map(|(_, b)| b).sum();
        m
    }

    /// Hold the applier: once this returns, it performs nothing and frees
    /// no ring space (it writes neither the ring nor the protected state)
    /// until [`release`](Self::release). Pushes still commit. For handing
    /// the ring to another process for a while, with nothing pushed: if
    /// everything durable is performed, the ring is freed up to it first,
    /// so that a process opening it meanwhile replays nothing.
    pub fn hold(&self) {
        let sh = &self.shared;
        let mut st = lock(&sh.state);
        st.held = true;
        st.applier_idle = false;
        sh.applier.notify_one();
        while !st.applier_idle && !st.stopping && lock(&self.threads).is_some() {
            st = sh
                .progress
                .wait_timeout(st, Duration::from_millis(50))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Let the applier go on after [`hold`](Self::hold).
    pub fn release(&self) {
        let sh = &self.shared;
        lock(&sh.state).held = false;
        sh.applier.notify_one();
    }

    /// Stop accepting pushes (later pushes fail with [`Error::ShutDown`]),
    /// wait for in-flight pushes to commit, and, if `drain`, wait until
    /// everything durable is performed; then stop the applier. Whatever is
    /// not performed stays in the ring and is replayed by the next
    /// [`start`](Self::start).
    ///
    /// Takes `&self` so that it can run while other threads are pushing;
    /// calling it again does nothing.
    pub fn shutdown(&self, drain: bool) {
        let Some((applier, committer)) = lock(&self.threads).take() else {
            return;
        };
        {
            let sh = &self.shared;
            let mut st = lock(&sh.state);
            st.accepting = false;
            while (st.committing || !st.queue.is_empty()) && st.broken.is_none() {
                st = wait(&sh.progress, st);
            }
            if drain {
                while st.performed < st.durable && st.broken.is_none() {
                    st.flush_requested = true;
                    sh.applier.notify_one();
                    st = wait(&sh.progress, st);
                }
            }
            st.stopping = true;
            sh.wake_all();
        }
        let _ = applier.join();
        let _ = committer.join();
    }
}

impl<Op, D: BlockDevice> Drop for Journal<Op, D> {
    fn drop(&mut self) {
        if let Some((applier, committer)) = lock(&self.threads).take() {
            {
                let mut st = lock(&self.shared.state);
                st.accepting = false;
                st.stopping = true;
                self.shared.wake_all();
            }
            let _ = applier.join();
            let _ = committer.join();
        }
    }
}

/// Counts a thread in `push` until dropped.
struct Pushing<'a>(&'a AtomicUsize);

impl<'a> Pushing<'a> {
    fn enter(n: &'a AtomicUsize) -> Pushing<'a> {
        n.fetch_add(1, Ordering::Relaxed);
        Pushing(n)
    }
}

impl Drop for Pushing<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Longest the committer waits to gather a batch.
const MAX_GATHER: Duration = Duration::from_micros(500);

/// The committer thread: commit whatever is queued, batch after batch,
/// until the journal stops (or a commit fails).
fn committer<D: BlockDevice>(sh: &Shared<D>) {
    let mut st = lock(&sh.state);
    // Ops in flight when the last commit finished: its batch plus what
    // was queued meanwhile.
    let mut in_flight = 0;
    loop {
        if st.broken.is_some() || (st.stopping && st.queue.is_empty()) {
            return;
        }
        if st.queue.is_empty() || st.committing {
            // Idle, or a pusher is committing (see `push`).
            if !st.committing {
                st.wake_at = 1;
            }
            st = wait(&sh.work, st);
            continue;
        }
        // Gather: the pushers woken by the last commit are about to push
        // again; wait briefly for as many ops as were in flight then, so
        // that concurrent pushers share one commit instead of alternating
        // between two half-size ones (the same idea as PostgreSQL's
        // commit_delay). Bounded by a quarter of the last sync's latency,
        // so it never costs more than a fraction of a commit.
        if st.queue.len() < in_flight && !st.stopping {
            let limit = (st.metrics.last_sync_latency / 4).min(MAX_GATHER);
            let deadline = Instant::now() + limit;
            while st.queue.len() < in_flight && !st.stopping {
                st.wake_at = in_flight;
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                st = sh
                    .work
                    .wait_timeout(st, deadline - now)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
        // The applier may have failed while we gathered: commit nothing
        // after that (its waiters have been told the journal failed).
        if st.broken.is_some() {
            return;
        }
        (st, in_flight) = commit_queue(sh, st);
    }
}

/// Take everything queued as the next batch, commit it with the lock
/// released, and publish the outcome: advance `durable`, fail the ops that
/// did not fit, or mark the journal broken. Wakes the batch's pushers and
/// the applier. Runs on the committer thread, or on a pusher that found
/// the committer idle. Returns the lock again and the number of ops in
/// flight when the commit finished: the batch plus what was queued
/// meanwhile (not counting what its woken pushers queue next).
fn commit_queue<'a, D: BlockDevice>(
    sh: &'a Shared<D>,
    mut st: MutexGuard<'a, State>,
) -> (MutexGuard<'a, State>, usize) {
    let batch = std::mem::take(&mut st.queue);
    let number = st.batch;
    st.batch += 1;
    st.committing = true;
    st.wake_at = usize::MAX;
    drop(st);
    let mut published = 0;
    let done = &sh.batch_done[(number % 2) as usize];
    let result = commit(sh, &batch, done, &mut published);
    let mut st = lock(&sh.state);
    st.committing = false;
    let in_flight = batch.len() + st.queue.len();
    match result {
        Ok((latency, committed)) => {
            if committed > published {
                st.metrics.syncs += 1;
                st.metrics.last_sync_latency = latency;
                publish(sh, &mut st, &batch[published..committed]);
            }
            // The ring stayed full past full_timeout: the ops that did
            // not fit fail; nothing was written for them.
            // (Unless the journal broke meanwhile: then they get that.)
            for (s, _) in &batch[committed..] {
                if st.broken.is_none() && !st.abandoned.remove(s) {
                    st.failed.insert(*s);
                    sh.failures.fetch_add(1, Ordering::Relaxed);
                }
            }
            sh.progress.notify_all();
            // Wake the batch's pushers with the lock released: they
            // return without it, and many push again at once.
            drop(st);
            done.notify();
            st = lock(&sh.state);
        }
        Err(e) => {
            st.broken = Some(e.to_string());
            sh.wake_all();
        }
    }
    (st, in_flight)
}

/// Mark `ops` (committed, in seq order) durable: their pushers may
/// return and the applier may perform them.
fn publish<D: BlockDevice>(sh: &Shared<D>, st: &mut State, ops: &[(u64, Vec<u8>)]) {
    let Some((last, _)) = ops.last() else {
        return;
    };
    st.durable = st.durable.max(last + 1);
    sh.durable.store(st.durable, Ordering::Release);
    if !st.abandoned.is_empty() {
        let durable = st.durable;
        st.abandoned.retain(|s| *s >= durable);
    }
    for (s, rec) in ops {
        st.pending.push_back((*s, rec.len() as u64));
    }
    if !st.gathering {
        sh.applier.notify_one();
    }
}

/// Write `batch` to the ring and advance; returns how long the last
/// advance took and how many of the batch's ops (a prefix) are committed.
/// When the ring is full, commits what is staged, publishes it at once
/// (`published` says how much of the batch is) and wakes the batch's
/// pushers (`done`; those of the published ops return), and waits for the
/// applier to free space, up to `full_timeout`; the ops still unwritten
/// then are left out.
fn commit<D: BlockDevice>(
    sh: &Shared<D>,
    batch: &[(u64, Vec<u8>)],
    done: &Event,
    published: &mut usize,
) -> Result<(Duration, usize), tt_ring::Error> {
    let start = Instant::now();
    let mut p = lock(&sh.producer);
    let deadline = start + sh.config.full_timeout;
    let mut staged = 0;
    while staged < batch.len() {
        match p.push(&batch[staged].1) {
            Ok(_) => staged += 1,
            Err(tt_ring::Error::Retry) => {
                // Commit what fits (a no-op if nothing new is staged).
                let t = Instant::now();
                p.advance()?;
                let took = t.elapsed();
                if Instant::now() > deadline {
                    return Ok((took, staged));
                }
                let mut st = lock(&sh.state);
                // Publish that prefix: the applier performs and frees only
                // what is durable, so the space it waits for is there.
                if staged > *published {
                    st.metrics.syncs += 1;
                    st.metrics.last_sync_latency = took;
                    publish(sh, &mut st, &batch[*published..staged]);
                    *published = staged;
                    // Their pushers need not wait for the rest; the others
                    // wake, see their ops are not durable, and sleep again.
                    done.notify();
                }
                // The applier failed: no space will be freed. The ops
                // still unwritten get the journal's failure.
                if st.broken.is_some() {
                    return Ok((took, staged));
                }
                // Wake the applier and wait for it to free space.
                st.flush_requested = true;
                sh.applier.notify_one();
                let (g, _) = sh
                    .space
                    .wait_timeout(st, Duration::from_millis(5))
                    .unwrap_or_else(|e| e.into_inner());
                drop(g);
            }
            Err(e) => return Err(e),
        }
    }
    let t = Instant::now();
    p.advance()?;
    Ok((t.elapsed(), staged))
}

/// A batch read from the ring.
struct Batch<Op> {
    ops: Vec<Op>,
    last_seq: Option<u64>,
    /// Ring position after the batch (free up to here once performed).
    next: u64,
}

struct Applier<'a, Op, D: BlockDevice, F> {
    consumer: &'a mut Consumer<D>,
    perform: F,
    config: Config,
    /// Ring position up to which every op has been performed. Space is
    /// freed up to here in batches (see `free_due`), not after every perform:
    /// each free costs two syncs.
    performed_to: u64,
    last_free: Instant,
    _op: PhantomData<fn() -> Op>,
}

/// Free performed ring space at least this often.
const FREE_INTERVAL: Duration = Duration::from_millis(50);

impl<'a, Op, D, F, E> Applier<'a, Op, D, F>
where
    Op: DeserializeOwned,
    D: BlockDevice,
    F: FnMut(&[Op]) -> Result<(), E>,
    E: std::fmt::Display,
{
    /// An applier that has performed everything before `performed_to`.
    fn new(consumer: &'a mut Consumer<D>, perform: F, config: Config, performed_to: u64) -> Self {
        Applier {
            consumer,
            perform,
            config,
            performed_to,
            last_free: Instant::now(),
            _op: PhantomData,
        }
    }

    /// Read up to `max_batch` ops from the freed position, stopping at
    /// the first whose seq is `durable` or more. The ring shows a commit
    /// as soon as it is written, before its sync has finished; such ops
    /// are not performed (and their space not freed) until the commit is
    /// known durable, so `perform` only ever sees acknowledged-or-durable
    /// ops.
    fn read_batch(&mut self, durable: u64) -> Result<Batch<Op>, Error> {
        self.consumer.seek(self.performed_to)?;
        let mut batch = Batch {
            ops: Vec::new(),
            last_seq: None,
            next: self.performed_to,
        };
        while batch.ops.len() < self.config.max_batch {
            // Decoded in place (no copy of the record): the seq, then the
            // op unless it is not durable yet.
            let record = self.consumer.pop_with(|position, next, data| {
                let decode_err = |err| Error::Decode { position, err };
                let Some((seq, body)) = data.split_first_chunk::<8>() else {
                    return Err(decode_err(postcard::Error::DeserializeUnexpectedEnd));
                };
                let seq = u64::from_le_bytes(*seq);
                if seq >= durable {
                    return Ok(None);
                }
                let op = postcard::from_bytes(body).map_err(decode_err)?;
                Ok(Some((seq, next, op)))
            });
            let (seq, next, op) = match record {
                Ok(Ok(Some(r))) => r,
                Ok(Ok(None)) | Err(tt_ring::Error::Retry) => break,
                Ok(Err(e)) => return Err(e),
                Err(e) => return Err(e.into()),
            };
            batch.ops.push(op);
            batch.last_seq = Some(seq);
            batch.next = next;
        }
        Ok(batch)
    }

    /// Call perform until it succeeds (or the journal stops), then free
    /// the batch's ring space. Returns false if stopped first.
    fn perform_until_ok<D2: BlockDevice>(
        &mut self,
        batch: &Batch<Op>,
        shared: Option<&Shared<D2>>,
    ) -> Result<bool, Error> {
        loop {
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                (self.perform)(&batch.ops)
            }));
            if let Some(sh) = shared {
                lock(&sh.state).metrics.performs += 1;
            }
            match outcome {
                Ok(Ok(())) => {
                    self.performed_to = batch.next;
                    return Ok(true);
                }
                Ok(Err(e)) => eprintln!(
                    "tt-journal: perform failed (retrying in {:?}): {e}",
                    self.config.retry_interval
                ),
                Err(_) => eprintln!(
                    "tt-journal: perform panicked (retrying in {:?})",
                    self.config.retry_interval
                ),
            }
            if let Some(sh) = shared {
                let mut st = lock(&sh.state);
                st.metrics.perform_failures += 1;
                let (st, _) = sh
                    .applier
                    .wait_timeout_while(st, self.config.retry_interval, |st| !st.stopping)
                    .unwrap_or_else(|e| e.into_inner());
                if st.stopping {
                    return Ok(false);
                }
            } else {
                std::thread::sleep(self.config.retry_interval);
            }
        }
    }

    /// Bytes performed but not yet freed.
    fn unfreed(&self) -> u64 {
        self.performed_to - self.consumer.position()
    }

    /// Is it time to free performed space: a quarter of the ring, or
    /// `FREE_INTERVAL` since the last free?
    fn free_due(&self) -> bool {
        self.unfreed() > 0
            && (self.unfreed() >= self.consumer.debug_info().capacity / 4
                || self.last_free.elapsed() >= FREE_INTERVAL)
    }

    /// Free the ring up to what has been performed (two syncs).
    fn free(&mut self) -> Result<(), Error> {
        if self.unfreed() > 0 {
            self.consumer.advance(self.performed_to)?;
        }
        self.last_free = Instant::now();
        Ok(())
    }

    fn fail<D2: BlockDevice>(sh: &Shared<D2>, what: &str, e: Error) {
        eprintln!("tt-journal: applier {what}: {e}");
        let mut st = lock(&sh.state);
        st.broken = Some(e.to_string());
        st.stopping = true;
        sh.wake_all();
    }

    fn run<D2: BlockDevice>(&mut self, sh: &Shared<D2>) {
        loop {
            // Wait for something durable and unperformed, space to free, or
            // a stop. Pushers waiting for space set `flush_requested`.
            let force_free;
            {
                let mut st = lock(&sh.state);
                loop {
                    if st.stopping {
                        drop(st);
                        if let Err(e) = self.free() {
                            Self::fail(sh, "cannot free ring space", e);
                        }
                        return;
                    }
                    let want_free = self.unfreed() > 0 && (st.flush_requested || self.free_due());
                    if !st.held && (st.performed < st.durable || want_free) {
                        st.applier_idle = false;
                        break;
                    }
                    // Held: first free what is performed, so that whoever
                    // opens the ring meanwhile has nothing to replay.
                    if st.held && self.unfreed() > 0 && st.performed >= st.durable {
                        drop(st);
                        if let Err(e) = self.free() {
                            return Self::fail(sh, "cannot free ring space", e);
                        }
                        sh.space.notify_all();
                        st = lock(&sh.state);
                        continue;
                    }
                    if !st.applier_idle {
                        st.applier_idle = true;
                        sh.progress.notify_all();
                    }
                    st = sh
                        .applier
                        .wait_timeout(st, FREE_INTERVAL)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
                if st.performed < st.durable
                    && !sh.config.flush_interval.is_zero()
                    && !st.flush_requested
                {
                    st.gathering = true;
                    let (g, _) = sh
                        .applier
                        .wait_timeout_while(st, sh.config.flush_interval, |st| {
                            !st.flush_requested && !st.stopping && !st.held
                        })
                        .unwrap_or_else(|e| e.into_inner());
                    st = g;
                    st.gathering = false;
                    if st.held {
                        continue;
                    }
                }
                force_free = st.flush_requested;
                st.flush_requested = false;
            }
            if (force_free && self.unfreed() > 0) || self.free_due() {
                if let Err(e) = self.free() {
                    return Self::fail(sh, "cannot free ring space", e);
                }
                sh.space.notify_all();
            }
            let durable = {
                let st = lock(&sh.state);
                if st.performed >= st.durable {
                    continue;
                }
                st.durable
            };
            let batch = match self.read_batch(durable) {
                Ok(b) => b,
                Err(e) => return Self::fail(sh, "cannot read the ring", e),
            };
            let Some(last) = batch.last_seq else {
                // Durable per the state but not yet visible: cannot happen
                // (commits finish before `durable` moves); avoid spinning.
                std::thread::sleep(Duration::from_millis(1));
                continue;
            };
            match self.perform_until_ok(&batch, Some(sh)) {
                Ok(true) => {
                    let mut st = lock(&sh.state);
                    st.performed = st.performed.max(last + 1);
                    while st.pending.front().is_some_and(|(s, _)| *s <= last) {
                        st.pending.pop_front();
                    }
                    sh.progress.notify_all();
                }
                Ok(false) => {
                    if let Err(e) = self.free() {
                        Self::fail(sh, "cannot free ring space", e);
                    }
                    return;
                }
                Err(e) => return Self::fail(sh, "cannot free ring space", e),
            }
        }
    }
}
