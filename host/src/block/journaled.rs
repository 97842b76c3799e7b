//! The journaled backend: a write completes only once it is durable.
//!
//! # Writes
//!
//! A write is cut into records of at most [`record_limit`] bytes (1/8 of
//! the ring, at most 8 MiB), each an [`Op`] `{seq, offset, data}` pushed
//! to a tt-journal on a tt-ring in order. The request completes when all
//! its records are durable ([`tt_journal::Pending::wait`]); a
//! device with many requests in flight shares commits between them (group
//! commit). The journal's applier then calls `perform` with batches of
//! durable records, in order: it `pwrite`s each to the image, then
//! `fdatasync`s the image once per batch, and only then returns `Ok`, after
//! which the journal may free the records. So a record leaves the ring
//! only once the image holds it durably; replaying it again (after a crash
//! between the image sync and the ring's free) rewrites the same bytes at
//! the same place: `perform` is idempotent, as the journal requires.
//!
//! # Replay
//!
//! [`JournaledBackend::start`] first applies every record left in the
//! ring by an earlier run (a crash, a kill, a failed drain) to the image,
//! with one `fdatasync` per batch, freeing each batch once it is synced,
//! before it serves anything: before the guest boots. It does this itself
//! rather than through `Journal::start`, which retries a failing `perform`
//! for ever: an image that cannot be written fails the start with
//! [`Error::Replay`], which names the device and the
//! image, and the records stay in the ring.
//!
//! # What is atomic after a crash
//!
//! A ring commit is whole or absent, and the applier only sees whole
//! committed records, so each record reaches the image entirely or not at
//! all (replay completes a record whose image write was torn). A write of
//! up to one record ([`Info::max_atomic_write`](super::Info)) is
//! therefore all-or-nothing; a longer one is several ordered records, and
//! a crash before it completed may leave a prefix of them applied. Every
//! sector holds either its old or its new contents. A completed write is
//! always there.
//!
//! # Reads see unapplied writes: an overlay
//!
//! Between completion and `perform`, a write's data is only in the ring.
//! A read must still see it. Two ways: wait for `perform` (a read of
//! unapplied data would then pay an image write and an `fdatasync`,
//! milliseconds, against microseconds for a cached read), or keep the data
//! of every unapplied record in memory and lay it over what the image
//! holds. This backend keeps an overlay: each record's data (shared with
//! the record being encoded, not copied again) keyed by offset and
//! sequence number, from its submission until `perform` has written and
//! synced it. A read `pread`s the image, then copies every overlapping
//! record over it, oldest first, so the newest wins. Taking the overlay's
//! snapshot before the `pread` makes a concurrent `perform` harmless: any
//! range it is writing belongs to a record still in the snapshot, which
//! is copied over whatever the `pread` saw. The overlay holds at most what
//! the ring holds plus the writes in flight, so its memory is bounded by
//! the ring's size (64 MiB by default) plus the device's queue. A record
//! that fails to commit is taken out of the overlay again; a read that
//! runs while a write is in flight may see its data (requests in flight
//! together have no order).
//!
//! # Sequence numbers
//!
//! tt-journal numbers its records from the last replayed one, or from 0
//! when the ring is empty, so its numbers repeat across restarts. Each
//! [`Op`] carries this backend's own `seq`, which never repeats for an
//! image: a run starts above the last replayed op and above a floor the
//! caller keeps durably (a [`SeqLease`]: the journal's metadata file
//! reserves numbers in large blocks, so renewing it is rare). Numbers
//! skipped by a crash leave gaps; they never go back.

use super::{
    file::check, lock, Backend, Completion, Completions, Error, Image, Info, Request, Response,
    Span, Write,
};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::BTreeMap;
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tt_journal::{Journal, Pending, Waiter};
use tt_ring::BlockDevice;

/// One journal record: `data` to be written at byte `offset` of the image.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Op {
    /// This backend's sequence number (see the module doc).
    pub seq: u64,
    pub offset: u64,
    #[serde(serialize_with = "ser_bytes", deserialize_with = "de_bytes")]
    pub data: Arc<[u8]>,
}

fn ser_bytes<S: Serializer>(d: &Arc<[u8]>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_bytes(d)
}

fn de_bytes<'de, D: Deserializer<'de>>(d: D) -> Result<Arc<[u8]>, D::Error> {
    Ok(Arc::from(serde_bytes::ByteBuf::deserialize(d)?.into_vec()))
}

/// Largest image write carried by one record, for a ring device of
/// `ring_size` bytes and `sector`-byte device sectors: 1/8 of the ring
/// (so several fit at once and the journal never waits for an empty
/// ring), at most 8 MiB, a whole number of sectors. 0 if the ring is too
/// small for even one sector.
pub fn record_limit(ring_size: u64, sector: u64) -> u64 {
    let l = (ring_size / 8).min(8 << 20);
    l / sector.max(1) * sector
}

/// Apply every record left in the ring to the image, in order, one
/// `fdatasync` per batch, freeing each batch once it is synced; returns
/// the last record's seq. Records are tt-journal's: a `u64` (the
/// journal's own number, unused here), then the postcard-encoded [`Op`].
fn replay<D: BlockDevice, I: Image>(
    ring: &Arc<D>,
    image: &I,
    device: &str,
    image_name: &str,
) -> Result<Option<u64>, Error> {
    let journal_err = |source: tt_journal::Error| Error::Journal {
        device: device.into(),
        source,
    };
    let ring_err = |e: tt_ring::Error| journal_err(tt_journal::Error::Ring(e));
    let mut c = tt_ring::Consumer::attach(ring.clone()).map_err(ring_err)?;
    let mut last = None;
    loop {
        let (mut ops, mut bytes, mut next) = (Vec::new(), 0usize, c.position());
        while ops.len() < 1024 && bytes < 16 << 20 {
            let rec = c.pop_with(|position, n, data| {
                let body = data.get(8..).unwrap_or_default();
                postcard::from_bytes::<Op>(body)
                    .map(|op| (op, n))
                    .map_err(|err| tt_journal::Error::Decode { position, err })
            });
            match rec {
                Ok(Ok((op, n))) => {
                    bytes += op.data.len();
                    next = n;
                    ops.push(op);
                }
                Ok(Err(e)) => return Err(journal_err(e)),
                Err(tt_ring::Error::Retry) => break,
                Err(e) => return Err(ring_err(e)),
            }
        }
        let Some(op) = ops.last() else {
            return Ok(last);
        };
        last = last.max(Some(op.seq));
        ops.iter()
            .try_for_each(|op| image.write_at(&op.data, op.offset))
            .and_then(|()| image.sync_data())
            .map_err(|e| Error::Replay {
                device: device.into(),
                image: image_name.into(),
                why: e.to_string(),
                command: format!("tt-host journal drain {image_name}").into(),
            })?;
        c.advance(next).map_err(ring_err)?;
    }
}

/// Records of one long synchronous write in flight at once (see
/// `write_now`): 4 records are at most half the ring.
const WINDOW: usize = 4;

/// Where the floor of sequence numbers is kept durably.
pub trait SeqLease: Send {
    /// Record durably that numbers below the returned limit (more than
    /// `from`) may be in use, so that a later run starts at or above it.
    fn reserve(&mut self, from: u64) -> std::io::Result<u64>;
}

/// Tuning.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub journal: tt_journal::Config,
    /// At shutdown, give up draining when the applier has made no
    /// progress for this long (a failing image), and report it.
    pub drain_stall: Duration,
    /// Start sequence numbers at least here (the caller's durable floor).
    pub first_seq: u64,
}

impl Default for Options {
    /// The journal's defaults, except that the applier gathers durable
    /// records for up to 20 ms before it performs them: one image
    /// `fdatasync` then covers many guest writes, instead of one image
    /// sync competing with every commit at queue depth 1. Reads do not
    /// wait for it (the overlay serves them), and a commit waiting for
    /// ring space makes the applier perform at once.
    fn default() -> Self {
        Options {
            journal: tt_journal::Config {
                flush_interval: Duration::from_millis(20),
                ..tt_journal::Config::default()
            },
            drain_stall: Duration::from_secs(30),
            first_seq: 0,
        }
    }
}

/// Unapplied records' data, keyed by (offset, seq).
#[derive(Default)]
struct Overlay {
    entries: BTreeMap<(u64, u64), Arc<[u8]>>,
    /// Longest entry ever inserted (bounds the lookup's range).
    max_len: u64,
}

impl Overlay {
    fn insert(&mut self, offset: u64, seq: u64, data: Arc<[u8]>) {
        self.max_len = self.max_len.max(data.len() as u64);
        self.entries.insert((offset, seq), data);
    }

    fn remove(&mut self, offset: u64, seq: u64) {
        self.entries.remove(&(offset, seq));
    }

    /// Entries overlapping `span`, oldest first.
    fn overlapping(&self, span: Span) -> Vec<(u64, u64, Arc<[u8]>)> {
        if self.entries.is_empty() {
            return Vec::new();
        }
        let lo = span.offset().saturating_sub(self.max_len.saturating_sub(1));
        let mut v: Vec<_> = self
            .entries
            .range((lo, 0)..(span.end(), 0))
            .filter(|((o, _), d)| o + d.len() as u64 > span.offset())
            .map(|(&(o, s), d)| (s, o, d.clone()))
            .collect();
        v.sort_unstable_by_key(|e| e.0);
        v
    }
}

struct State {
    overlay: Overlay,
    /// Highest seq performed (this run, replay included).
    last_applied: Option<u64>,
    /// The last `perform` failure, until one succeeds.
    last_error: Option<String>,
}

struct Shared<I> {
    device: String,
    image: Arc<I>,
    state: Mutex<State>,
    /// Signalled after every `perform`.
    progress: Condvar,
}

impl<I: Image> Shared<I> {
    /// The journal's `perform`: write the batch, sync the image once, and
    /// only then forget the records' overlay entries.
    fn perform(&self, ops: &[Op]) -> Result<(), std::io::Error> {
        let r = ops
            .iter()
            .try_for_each(|op| self.image.write_at(&op.data, op.offset))
            .and_then(|()| self.image.sync_data());
        let mut st = lock(&self.state);
        match &r {
            Ok(()) => {
                for op in ops {
                    st.overlay.remove(op.offset, op.seq);
                    st.last_applied = st.last_applied.max(Some(op.seq));
                }
                st.last_error = None;
            }
            Err(e) => st.last_error = Some(format!("writing the image failed: {e}")),
        }
        drop(st);
        self.progress.notify_all();
        r
    }

    /// Wait for the records of one write; take failed ones out of the
    /// overlay. Waits for every part even after a failure.
    fn finish<D: BlockDevice>(
        &self,
        parts: Vec<Part<D>>,
        mut error: Option<Error>,
        flusher: &Mutex<Option<Waiter<D>>>,
    ) -> Result<Response, Error> {
        for p in parts {
            match p.pending.wait() {
                Ok(w) => *lock(flusher) = Some(w),
                Err(source) => {
                    lock(&self.state).overlay.remove(p.offset, p.seq);
                    error.get_or_insert(Error::Journal {
                        device: self.device.clone(),
                        source,
                    });
                }
            }
        }
        error.map_or(Ok(Response::Written), Err)
    }
}

/// A record submitted to the journal, not yet known durable.
struct Part<D: BlockDevice> {
    seq: u64,
    offset: u64,
    pending: Pending<D>,
}

/// A write for the completion thread to wait for.
struct Job<D: BlockDevice> {
    user_data: u64,
    parts: Vec<Part<D>>,
    /// Boxed: a job travels through a channel, and errors are rare.
    error: Option<Box<Error>>,
}

/// A block backend whose writes complete once durable in a tt-journal on
/// the ring device `D`, applied in the background to the image `I`.
pub struct JournaledBackend<D: BlockDevice + Send + Sync + 'static, I: Image> {
    info: Info,
    /// The image, for messages.
    image_name: String,
    /// The command that drains this journal, for messages.
    drain_command: String,
    shared: Arc<Shared<I>>,
    journal: Journal<Op, Arc<D>>,
    completions: Arc<Completions>,
    jobs: Option<mpsc::Sender<Job<Arc<D>>>>,
    waiter: Option<JoinHandle<()>>,
    /// The last durable record's waiter: its `flush` asks the applier to
    /// perform at once (a drain must not wait for `flush_interval`).
    flusher: Arc<Mutex<Option<Waiter<Arc<D>>>>>,
    in_flight: usize,
    next_seq: u64,
    seq_limit: u64,
    lease: Option<Box<dyn SeqLease>>,
    drain_stall: Duration,
    shut: bool,
    keep: Vec<Box<dyn Send>>,
    /// Descriptors holding the journal's locks besides the image's.
    lock_fds: Vec<std::os::fd::RawFd>,
}

impl<D, I> JournaledBackend<D, I>
where
    D: BlockDevice + Send + Sync + 'static,
    I: Image,
{
    /// Replay what the ring holds into `image`, then serve requests.
    /// `ring` must already be a tt-ring (see `tt_ring::Producer::create`).
    /// `info.max_atomic_write` is set here from the ring's size.
    /// `image_name` (its path) is used in messages.
    pub fn start(
        mut info: Info,
        image_name: &str,
        ring: Arc<D>,
        image: Arc<I>,
        opts: Options,
        mut lease: Option<Box<dyn SeqLease>>,
    ) -> Result<Self, Error> {
        let device = info.name.clone();
        let sector = info.geometry.sector_size;
        let limit = record_limit(ring.size(), sector);
        if limit == 0 {
            return Err(Error::RingTooSmall {
                device,
                ring: ring.size(),
                sector,
                min: 8 * sector.max(512),
            });
        }
        info.max_atomic_write = limit;
        info.durable_writes = true;
        let shared = Arc::new(Shared {
            device: device.clone(),
            image,
            state: Mutex::new(State {
                overlay: Overlay::default(),
                last_applied: None,
                last_error: None,
            }),
            progress: Condvar::new(),
        });
        // Replay here, not in Journal::start: that one retries a failing
        // perform for ever, and an image that cannot be written must fail
        // the open with a message, not hang it.
        let replayed = replay(&ring, &*shared.image, &device, image_name)?;
        let s = shared.clone();
        let journal = Journal::start(ring, opts.journal, move |ops: &[Op]| s.perform(ops))
            .map_err(|source| Error::Journal {
                device: device.clone(),
                source,
            })?;
        let replayed = replayed.max(lock(&shared.state).last_applied);
        let next_seq = opts.first_seq.max(replayed.map_or(0, |s| s + 1));
        let seq_limit = match lease.as_mut() {
            None => u64::MAX,
            Some(l) => l.reserve(next_seq).map_err(|source| Error::Io {
                device: device.clone(),
                what: "cannot record the journal's sequence numbers".into(),
                source,
            })?,
        };
        let completions = Arc::new(Completions::new(&device)?);
        let (tx, rx) = mpsc::channel::<Job<Arc<D>>>();
        let flusher = Arc::new(Mutex::new(None));
        let (s, c, f) = (shared.clone(), completions.clone(), flusher.clone());
        let waiter = std::thread::Builder::new()
            .name(format!("tt-block-{device}"))
            .spawn(move || {
                // Completions of one commit are posted together, with one
                // wake-up of the device: gather while the next job's
                // records are durable already (its wait returns at once).
                let mut batch = Vec::new();
                let mut next = rx.recv();
                while let Ok(job) = next {
                    let result = s.finish(job.parts, job.error.map(|e| *e), &f);
                    batch.push(Completion {
                        user_data: job.user_data,
                        result,
                    });
                    next = rx.try_recv().map_err(|_| mpsc::RecvError);
                    let ready = next
                        .as_ref()
                        .is_ok_and(|j| j.parts.iter().all(|p| p.pending.is_durable()));
                    if !ready {
                        c.post_all(&mut batch);
                        if next.is_err() {
                            next = rx.recv();
                        }
                    }
                }
                c.post_all(&mut batch);
            })
            .map_err(|source| Error::Io {
                device: device.clone(),
                what: "cannot start its completion thread".into(),
                source,
            })?;
        Ok(JournaledBackend {
            info,
            image_name: image_name.into(),
            drain_command: format!("tt-host journal drain {image_name}"),
            shared,
            journal,
            completions,
            jobs: Some(tx),
            waiter: Some(waiter),
            flusher,
            in_flight: 0,
            next_seq,
            seq_limit,
            lease,
            drain_stall: opts.drain_stall,
            shut: false,
            keep: Vec::new(),
            lock_fds: Vec::new(),
        })
    }

    /// `fd` holds one of the journal's locks (see [`Backend::lock_fds`]).
    pub fn add_lock_fd(&mut self, fd: std::os::fd::RawFd) {
        self.lock_fds.push(fd);
    }

    /// Keep `guard` (an image or journal lock) until the backend is dropped.
    pub fn keep(&mut self, guard: Box<dyn Send>) {
        self.keep.push(guard);
    }

    /// The command that drains this journal, as messages suggest it
    /// (default: `tt-host journal drain IMAGE`; the caller adds what it
    /// knows, such as a state directory).
    pub fn set_drain_command(&mut self, command: String) {
        self.drain_command = command;
    }

    /// The sequence number the next record gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Records durable (or in flight) but not yet applied to the image.
    pub fn unapplied(&self) -> usize {
        lock(&self.shared.state).overlay.entries.len()
    }

    fn shut_down(&self) -> Error {
        Error::ShutDown {
            device: self.info.name.clone(),
        }
    }

    fn take_seq(&mut self) -> Result<u64, Error> {
        if self.next_seq >= self.seq_limit {
            let from = self.next_seq;
            let r = match self.lease.as_mut() {
                Some(l) => l.reserve(from),
                None => Err(std::io::Error::other("sequence numbers exhausted")),
            };
            self.seq_limit = r.map_err(|source| Error::Io {
                device: self.info.name.clone(),
                what: "cannot record the journal's sequence numbers".into(),
                source,
            })?;
        }
        let s = self.next_seq;
        self.next_seq += 1;
        Ok(s)
    }

    /// Cut `data` (to be written at `offset`) into records, put each in
    /// the overlay and submit it. Returns the parts submitted and the
    /// error that stopped it, if any.
    fn start_write(&mut self, offset: u64, data: &[u8]) -> (Vec<Part<Arc<D>>>, Option<Error>) {
        let chunk = self.info.max_atomic_write as usize;
        let mut parts = Vec::with_capacity(data.len().div_ceil(chunk));
        for (i, piece) in data.chunks(chunk).enumerate() {
            let seq = match self.take_seq() {
                Ok(s) => s,
                Err(e) => return (parts, Some(e)),
            };
            let op = Op {
                seq,
                offset: offset + (i * chunk) as u64,
                data: Arc::from(piece),
            };
            lock(&self.shared.state)
                .overlay
                .insert(op.offset, seq, op.data.clone());
            match self.journal.submit(&op) {
                Ok(pending) => parts.push(Part {
                    seq,
                    offset: op.offset,
                    pending,
                }),
                Err(source) => {
                    lock(&self.shared.state).overlay.remove(op.offset, seq);
                    let e = Error::Journal {
                        device: self.info.name.clone(),
                        source,
                    };
                    return (parts, Some(e));
                }
            }
        }
        (parts, None)
    }

    fn read(&self, span: Span) -> Result<Vec<u8>, Error> {
        check(&self.info, span)?;
        // Snapshot first, then read the image (see the module doc).
        let over = lock(&self.shared.state).overlay.overlapping(span);
        let mut buf = vec![0u8; span.len() as usize];
        self.shared
            .image
            .read_at(&mut buf, span.offset())
            .map_err(|source| Error::Io {
                device: self.info.name.clone(),
                what: format!("read {:#x}+{:#x}", span.offset(), span.len()),
                source,
            })?;
        for (_, o, d) in over {
            let s = o.max(span.offset());
            let e = (o + d.len() as u64).min(span.end());
            buf[(s - span.offset()) as usize..(e - span.offset()) as usize]
                .copy_from_slice(&d[(s - o) as usize..(e - o) as usize]);
        }
        Ok(buf)
    }

    /// Write one record from this thread: a lone pusher commits on its
    /// own thread (no thread switch).
    fn write_now(&mut self, w: Write) -> Result<Response, Error> {
        if w.span().len() > self.info.max_atomic_write {
            // Records in windows of WINDOW (at most half the ring), each
            // waited for before the next: host memory stays bounded
            // however long the guest's write.
            let offset = w.span().offset();
            let data = w.into_data();
            let window = self.info.max_atomic_write as usize * WINDOW;
            for (i, part) in data.chunks(window).enumerate() {
                let (parts, error) = self.start_write(offset + (i * window) as u64, part);
                self.shared.finish(parts, error, &self.flusher)?;
            }
            return Ok(Response::Written);
        }
        let seq = self.take_seq()?;
        let offset = w.span().offset();
        let op = Op {
            seq,
            offset,
            data: Arc::from(w.into_data()),
        };
        lock(&self.shared.state)
            .overlay
            .insert(offset, seq, op.data.clone());
        match self.journal.push(&op) {
            Ok(w) => {
                *lock(&self.flusher) = Some(w);
                Ok(Response::Written)
            }
            Err(source) => {
                lock(&self.shared.state).overlay.remove(offset, seq);
                Err(Error::Journal {
                    device: self.info.name.clone(),
                    source,
                })
            }
        }
    }
}

impl<D, I> Backend for JournaledBackend<D, I>
where
    D: BlockDevice + Send + Sync + 'static,
    I: Image,
{
    fn info(&self) -> &Info {
        &self.info
    }

    fn submit(&mut self, user_data: u64, request: Request) -> Result<(), Error> {
        if self.shut {
            return Err(self.shut_down());
        }
        let result = match request {
            Request::Write(w) => {
                if let Err(e) = check(&self.info, w.span()) {
                    Err(e)
                } else {
                    let (parts, error) = self.start_write(w.span().offset(), w.data());
                    let job = Job {
                        user_data,
                        parts,
                        error: error.map(Box::new),
                    };
                    let sent = self.jobs.as_ref().map(|j| j.send(job));
                    if !matches!(sent, Some(Ok(()))) {
                        return Err(self.shut_down());
                    }
                    self.in_flight += 1;
                    return Ok(());
                }
            }
            Request::Read(span) => self.read(span).map(Response::Read),
            // Every completed write is durable already.
            Request::Flush => Ok(Response::Flushed),
            Request::GetId => Ok(Response::Id(self.info.id)),
        };
        self.in_flight += 1;
        self.completions.post(Completion { user_data, result });
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<Completion>) -> usize {
        let n = self.completions.drain(out);
        self.in_flight -= n;
        n
    }

    fn event(&self) -> &vmm_sys_util::eventfd::EventFd {
        self.completions.event()
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn execute(&mut self, request: Request) -> Result<Response, Error> {
        if self.shut {
            return Err(self.shut_down());
        }
        if self.in_flight > 0 {
            return Err(Error::Busy {
                device: self.info.name.clone(),
                in_flight: self.in_flight,
            });
        }
        match request {
            Request::Write(w) => {
                check(&self.info, w.span())?;
                self.write_now(w)
            }
            Request::Read(span) => self.read(span).map(Response::Read),
            Request::Flush => Ok(Response::Flushed),
            Request::GetId => Ok(Response::Id(self.info.id)),
        }
    }

    fn read_into(&mut self, span: Span, dst: &[vm_memory::VolatileSlice<'_>]) -> Result<(), Error> {
        if self.shut {
            return Err(self.shut_down());
        }
        check(&self.info, span)?;
        // Snapshot first, then read the image, as `read`.
        let over = lock(&self.shared.state).overlay.overlapping(span);
        super::read_image_into(&self.info, &*self.shared.image, span, dst)?;
        for (_, o, d) in over {
            let s = o.max(span.offset());
            let e = (o + d.len() as u64).min(span.end());
            super::scatter(
                dst,
                (s - span.offset()) as usize,
                &d[(s - o) as usize..(e - o) as usize],
            );
        }
        Ok(())
    }

    fn shutdown(&mut self) -> Result<(), Error> {
        if self.shut {
            return Ok(());
        }
        self.shut = true;
        // Let the completion thread see every write in flight through.
        drop(self.jobs.take());
        if let Some(w) = self.waiter.take() {
            let _ = w.join();
        }
        let drained = self.drain();
        self.journal.shutdown(drained.is_ok());
        drained
    }

    fn quiesce(&mut self) -> Result<(), Error> {
        if self.shut {
            return Err(Error::ShutDown {
                device: self.info.name.clone(),
            });
        }
        self.drain()
    }

    fn image_file(&self) -> Option<&std::fs::File> {
        self.shared.image.as_file()
    }

    fn lock_fds(&self) -> Vec<std::os::fd::RawFd> {
        let image = self.image_file().map(std::os::fd::AsRawFd::as_raw_fd);
        image
            .into_iter()
            .chain(self.lock_fds.iter().copied())
            .collect()
    }

    fn suspend(&mut self) -> Result<(), Error> {
        // Drained by `quiesce`: the applier writes nothing more to the ring
        // or the image until `resume` (another tt-host may own them).
        self.journal.hold();
        Ok(())
    }

    fn resume(&mut self) -> Result<(), Error> {
        self.journal.release();
        Ok(())
    }
}

impl<D: BlockDevice + Send + Sync + 'static, I: Image> JournaledBackend<D, I> {
    /// Wait until every acknowledged write is applied (and the image
    /// synced), giving up when the applier stops making progress. (The
    /// journal is asked to perform at once, with our lock not held: the
    /// applier takes it in `perform`.) The caller has no request in
    /// flight.
    fn drain(&mut self) -> Result<(), Error> {
        let sh = &self.shared;
        let mut left = usize::MAX;
        let mut since = Instant::now();
        let st = loop {
            if let Some(w) = lock(&self.flusher).as_ref() {
                w.flush();
            }
            let st = lock(&sh.state);
            let now = st.overlay.entries.len();
            if now == 0 {
                break st;
            }
            if now < left {
                left = now;
                since = Instant::now();
            } else if since.elapsed() >= self.drain_stall {
                break st;
            }
            drop(
                sh.progress
                    .wait_timeout(st, Duration::from_millis(50))
                    .unwrap_or_else(|e| e.into_inner()),
            );
        };
        let pending = st.overlay.entries.len();
        let why = st.last_error.clone();
        drop(st);
        if pending > 0 {
            return Err(Error::Drain {
                device: self.info.name.clone(),
                image: self.image_name.clone(),
                command: self.drain_command.as_str().into(),
                pending,
                why: why.unwrap_or_else(|| "the journal's applier stopped".into()),
            });
        }
        Ok(())
    }
}

impl<D: BlockDevice + Send + Sync + 'static, I: Image> Drop for JournaledBackend<D, I> {
    /// Without [`shutdown`](Backend::shutdown), nothing is waited for:
    /// what is not applied yet stays in the ring, replayed at the next
    /// start.
    ///
    /// The completion thread is joined (it holds the image: its lock must
    /// be gone once the backend is), after the writes in flight resolve.
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(w) = self.waiter.take() {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests;
