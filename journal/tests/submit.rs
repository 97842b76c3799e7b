//! `Journal::submit`: one thread keeping many operations in flight, the
//! way a device queue does.

mod common;

use common::{recorder, Log};

use common::HookedSync;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;
use tt_journal::{Config, Error, Journal, Pending};
use tt_ring::{Consumer, MemDevice, Producer};

#[test]
fn ops_submitted_by_one_thread_share_commits_and_keep_their_order() {
    let log = Log::default();
    let dev = common::slow_ring(4 << 20, Duration::from_millis(2));
    let j = Journal::start(dev, Config::default(), recorder(&log)).unwrap();
    let mut in_flight: VecDeque<Pending<_>> = VecDeque::new();
    let mut acked = Vec::new();
    for i in 0..400u64 {
        if in_flight.len() == 32 {
            acked.push(in_flight.pop_front().unwrap().wait().unwrap().seq());
        }
        in_flight.push_back(j.submit(&i).unwrap());
    }
    for p in in_flight {
        acked.push(p.wait().unwrap().seq());
    }
    assert_eq!(acked, (0..400).collect::<Vec<_>>());
    let syncs = j.metrics().syncs;
    // 32 in flight and a 2 ms sync: commits carry many ops each. One
    // commit per op (or per few) means submit does not group.
    assert!(syncs <= 40, "{syncs} commits for 400 ops, 32 in flight");
    j.shutdown(true);
    assert_eq!(*log.lock().unwrap(), (0..400).collect::<Vec<_>>());
}

/// `is_durable` is false while the op's commit is in flight (a 200 ms
/// sync here), true once it is, and never true for an op that is not.
#[test]
fn is_durable_says_when_wait_would_return_at_once() {
    let log = Log::default();
    let dev = common::slow_ring(1 << 20, Duration::from_millis(200));
    let j = Journal::start(dev, Config::default(), recorder(&log)).unwrap();
    let first = j.submit(&0u64).unwrap();
    assert!(
        !first.is_durable(),
        "durable before its 200 ms commit ended"
    );
    let second = j.submit(&1u64).unwrap();
    let seq = first.wait().unwrap().seq();
    assert_eq!(seq, 0);
    let second = second.wait().unwrap();
    let third = j.submit(&2u64).unwrap();
    assert!(!third.is_durable(), "submitted after the last commit");
    let _ = second;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !third.is_durable() {
        assert!(std::time::Instant::now() < deadline, "never durable");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(third.wait().unwrap().seq(), 2);
    j.shutdown(true);
}

#[test]
fn a_pending_dropped_unwaited_is_still_committed_and_performed() {
    let log = Log::default();
    let dev = common::slow_ring(1 << 20, Duration::from_millis(1));
    let j = Journal::start(dev, Config::default(), recorder(&log)).unwrap();
    for i in 0..10u64 {
        drop(j.submit(&i).unwrap());
    }
    let last = j.push(&10).unwrap();
    assert_eq!(last.seq(), 10);
    last.sync().unwrap();
    assert_eq!(*log.lock().unwrap(), (0..=10).collect::<Vec<_>>());
    j.shutdown(true);
}

#[test]
fn shutdown_commits_what_was_submitted_and_then_refuses_more() {
    let log = Log::default();
    let dev = common::slow_ring(1 << 20, Duration::from_millis(5));
    let j = Journal::start(dev, Config::default(), recorder(&log)).unwrap();
    let pending: Vec<_> = (0..50u64).map(|i| j.submit(&i).unwrap()).collect();
    j.shutdown(true);
    for p in pending {
        let _ = p.wait().expect("submitted before shutdown: committed");
    }
    assert_eq!(*log.lock().unwrap(), (0..50).collect::<Vec<_>>());
    assert!(matches!(j.submit(&50), Err(Error::ShutDown)));
}

#[test]
fn submitted_ops_that_do_not_fit_fail_with_full_and_are_never_performed() {
    let log = Log::default();
    let gate = Arc::new(Mutex::new(false));
    let (l, g) = (log.clone(), gate.clone());
    let j = Journal::start(
        common::slow_ring(16 * 512, Duration::ZERO),
        Config {
            full_timeout: Duration::from_millis(100),
            retry_interval: Duration::from_millis(1),
            ..Config::default()
        },
        move |ops: &[(u64, Vec<u8>)]| {
            if !*g.lock().unwrap() {
                return Err("blocked");
            }
            l.lock().unwrap().extend(ops.iter().map(|o| o.0));
            Ok(())
        },
    )
    .unwrap();
    // 8 KiB of ring, 1 KiB ops, perform blocked: far from all 20 fit.
    let pending: Vec<_> = (0..20u64)
        .map(|i| j.submit(&(i, vec![1u8; 1000])).unwrap())
        .collect();
    let outcomes: Vec<_> = pending.into_iter().map(|p| p.wait()).collect();
    let ok: Vec<u64> = outcomes
        .iter()
        .filter_map(|o| o.as_ref().ok().map(|w| w.seq()))
        .collect();
    let full = outcomes
        .iter()
        .filter(|o| matches!(o, Err(Error::Full(_))))
        .count();
    assert!(!ok.is_empty() && full > 0, "{} ok, {full} full", ok.len());
    assert_eq!(ok.len() + full, 20, "only Ok or Full expected");
    // The ops that fit are a prefix: the ring is a queue.
    assert_eq!(ok, (0..ok.len() as u64).collect::<Vec<_>>());
    *gate.lock().unwrap() = true;
    j.push(&(99, vec![2u8; 10])).unwrap().sync().unwrap();
    let mut want = ok.clone();
    want.push(99);
    assert_eq!(*log.lock().unwrap(), want, "a Full op was performed");
    j.shutdown(true);
}

/// Lets a given number of syncs through (`None`: all), holding the rest.
#[derive(Default)]
struct SyncGate {
    permits: Mutex<Option<usize>>,
    cv: Condvar,
    entered: AtomicUsize,
}

impl SyncGate {
    fn set(&self, permits: Option<usize>) {
        *self.permits.lock().unwrap() = permits;
        self.cv.notify_all();
    }
    fn pass(&self) {
        self.entered.fetch_add(1, Ordering::SeqCst);
        let mut g = self.permits.lock().unwrap();
        loop {
            match *g {
                None => return,
                Some(n) if n > 0 => {
                    *g = Some(n - 1);
                    return;
                }
                _ => g = self.cv.wait(g).unwrap(),
            }
        }
    }
    fn wait_entered(&self, more_than: usize) {
        wait_for("a sync", || self.entered.load(Ordering::SeqCst) > more_than);
    }
}

/// Poll `cond` until it holds; panic (naming `what`) after 20 s.
fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let t = std::time::Instant::now();
    while !cond() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "waited 20 s for {what}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

type GatedDev = Arc<HookedSync<Box<dyn Fn() + Send + Sync>>>;

fn gated_ring(size: u64, gate: &Arc<SyncGate>) -> GatedDev {
    let g = gate.clone();
    let d = Arc::new(HookedSync {
        dev: MemDevice::new(size, 512),
        before_sync: Box::new(move || g.pass()) as Box<dyn Fn() + Send + Sync>,
    });
    Producer::create(&d).unwrap();
    d
}

/// An op that does not decode when it is 666: the applier fails on it.
#[derive(Serialize, Deserialize, Debug, Clone, Copy)]
#[serde(try_from = "u64", into = "u64")]
struct Poisonable(u64);

impl TryFrom<u64> for Poisonable {
    type Error = &'static str;
    fn try_from(v: u64) -> Result<Self, Self::Error> {
        if v == 666 {
            Err("poison")
        } else {
            Ok(Poisonable(v))
        }
    }
}

impl From<Poisonable> for u64 {
    fn from(o: Poisonable) -> u64 {
        o.0
    }
}

/// When the applier fails while a commit is in flight, that commit's
/// waiters get its outcome: the op was committed, so not an error saying
/// it was not. Nothing is committed after the failure.
#[test]
fn an_op_whose_commit_outlives_an_applier_failure_is_acknowledged() {
    let gate = Arc::new(SyncGate::default());
    let dev = gated_ring(1 << 20, &gate);
    // perform blocks until `open`: the applier reads the poison (and
    // fails) only once op 7's commit is in flight.
    let open = Arc::new((Mutex::new(false), Condvar::new()));
    let performing = Arc::new(AtomicUsize::new(0));
    let (o, p) = (open.clone(), performing.clone());
    let j = Journal::start(dev.clone(), Config::default(), move |_: &[Poisonable]| {
        p.fetch_add(1, Ordering::SeqCst);
        let mut g = o.0.lock().unwrap();
        while !*g {
            g = o.1.wait(g).unwrap();
        }
        Ok::<(), String>(())
    })
    .unwrap();
    let _ = j.push(&Poisonable(1)).unwrap();
    wait_for("perform", || performing.load(Ordering::SeqCst) > 0);
    // The applier is held in perform([1]): it has not read what follows.
    let _ = j.push(&Poisonable(666)).unwrap();
    gate.set(Some(0));
    let before = gate.entered.load(Ordering::SeqCst);
    let seven = j.submit(&Poisonable(7)).unwrap();
    gate.wait_entered(before); // op 7's commit is in its sync
    *open.0.lock().unwrap() = true;
    open.1.notify_all();
    // The applier now reads the poison and fails: submit says so.
    wait_for("the journal to fail", || j.submit(&Poisonable(8)).is_err());
    gate.set(None); // op 7's commit completes
    let seven = seven.wait();
    drop(j);
    let mut c = Consumer::attach(dev).unwrap();
    let mut in_ring = Vec::new();
    while let Ok(item) = c.pop() {
        in_ring.push(u64::from_le_bytes(item.data[..8].try_into().unwrap()));
    }
    assert_eq!(in_ring, [0, 1, 2], "seqs in the ring: 1, the poison, 7");
    assert!(
        seven.is_ok(),
        "op 7 was committed, yet wait said: {:?}",
        seven.err()
    );
}

/// Unless steady, encodes to 10 bytes, then to 1 MiB, then 10 again...
/// (an op that serializes a buffer another thread is filling).
struct Unsteady(AtomicUsize, bool);

impl Unsteady {
    fn new(steady: bool) -> Unsteady {
        Unsteady(AtomicUsize::new(0), steady)
    }
}

impl Serialize for Unsteady {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.1 || self.0.fetch_add(1, Ordering::SeqCst) % 2 == 0 {
            s.serialize_bytes(&[0; 10])
        } else {
            s.serialize_bytes(&vec![0; 1 << 20])
        }
    }
}

impl<'de> Deserialize<'de> for Unsteady {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Unsteady, D::Error> {
        serde_bytes::ByteBuf::deserialize(d).map(|_| Unsteady::new(true))
    }
}

/// An op that encodes too big is refused whichever encoding pass finds
/// it so; it must not reach the ring and break the journal for all.
#[test]
fn an_op_that_encodes_bigger_the_second_time_is_refused_alone() {
    let log = Arc::new(AtomicUsize::new(0));
    let l = log.clone();
    let j = Journal::start(
        common::slow_ring(256 << 10, Duration::ZERO),
        Config::default(),
        move |ops: &[Unsteady]| {
            l.fetch_add(ops.len(), Ordering::SeqCst);
            Ok::<(), String>(())
        },
    )
    .unwrap();
    let r = j.push(&Unsteady::new(false));
    assert!(matches!(r, Err(Error::TooBig { .. })), "{:?}", r.err());
    // The journal still works.
    let w = j.push(&Unsteady::new(true)).unwrap();
    w.sync().unwrap();
    assert_eq!(log.load(Ordering::SeqCst), 1);
    j.shutdown(true);
}
