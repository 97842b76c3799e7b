//! Fault injection: the journal on a [`FaultyDevice`] whose syncs fail,
//! whose writes tear, or which crashes before a given write. After each
//! fault the device "reboots" ([`FaultyDevice::crash`]: unsynced writes are
//! lost) and a new journal replays. Invariants checked every time:
//!
//! - every operation whose `push` (or `Pending::wait`, for the one pusher
//!   of the concurrent tests that submits) returned `Ok` is performed (in
//!   the first run or by the replay);
//! - everything performed is a whole, valid operation that was pushed
//!   (each op carries a checksum and is regenerated from its id);
//! - each pusher's operations are first performed in push order;
//! - the journal works again after the restart.

mod common;

use common::{mix, slow_ring};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tt_journal::{Config, Error, Journal, Pending};
use tt_ring::{Faults, FaultyDevice, Producer};

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
struct Op {
    pusher: u32,
    idx: u64,
    payload: Vec<u8>,
    sum: u64,
}

fn checksum(pusher: u32, idx: u64, payload: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in pusher
        .to_le_bytes()
        .iter()
        .chain(&idx.to_le_bytes())
        .chain(payload)
    {
        h = (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Op `idx` of `pusher`: mostly small, every few a multi-sector one.
fn make_op(pusher: u32, idx: u64) -> Op {
    let h = mix(((pusher as u64) << 40) ^ idx);
    let len = if h % 5 == 0 {
        600 + (h >> 8) % 2500
    } else {
        (h >> 8) % 200
    } as usize;
    let payload: Vec<u8> = (0..len)
        .map(|k| (h >> (k % 7 * 8)) as u8 ^ k as u8)
        .collect();
    Op {
        pusher,
        idx,
        sum: checksum(pusher, idx, &payload),
        payload,
    }
}

/// Is `op` exactly an op some pusher could have pushed?
fn valid(op: &Op) -> bool {
    op.sum == checksum(op.pusher, op.idx, &op.payload) && *op == make_op(op.pusher, op.idx)
}

#[derive(Default)]
struct Performed {
    ids: Vec<(u32, u64)>,
    bad: Vec<String>,
}

type Log = Arc<Mutex<Performed>>;

/// A `perform` that records op ids (and any invalid op); fails while
/// `gate` is closed.
fn recorder(log: &Log, gate: &Arc<AtomicBool>) -> impl FnMut(&[Op]) -> Result<(), String> + Send {
    let (log, gate) = (log.clone(), gate.clone());
    move |ops| {
        if !gate.load(Ordering::SeqCst) {
            return Err("gate closed".into());
        }
        let mut l = log.lock().unwrap();
        for op in ops {
            if valid(op) {
                l.ids.push((op.pusher, op.idx));
            } else {
                l.bad.push(format!(
                    "invalid op: pusher {} idx {} len {}",
                    op.pusher,
                    op.idx,
                    op.payload.len()
                ));
            }
        }
        Ok(())
    }
}

fn open() -> Arc<AtomicBool> {
    Arc::new(AtomicBool::new(true))
}

fn config() -> Config {
    Config {
        retry_interval: Duration::from_millis(1),
        full_timeout: Duration::from_secs(5),
        max_batch: 16,
        ..Config::default()
    }
}

fn faulty() -> Arc<FaultyDevice> {
    let d = Arc::new(FaultyDevice::new(256 << 10, 512));
    Producer::create(&d).unwrap();
    d
}

/// Check the invariants over the concatenation of every run's performed
/// log; `pushed` bounds what may appear: (pusher, idx) with idx < bound.
fn check(what: &str, logs: &[&Log], acked: &HashSet<(u32, u64)>, pushed: &[u64]) {
    let mut seen = HashSet::new();
    let mut last_first: Vec<Option<u64>> = vec![None; pushed.len()];
    for log in logs {
        let l = log.lock().unwrap();
        assert!(l.bad.is_empty(), "{what}: {:?}", l.bad);
        for &(p, i) in &l.ids {
            assert!(
                (p as usize) < pushed.len() && i < pushed[p as usize],
                "{what}: performed ({p}, {i}), which was never pushed"
            );
            if seen.insert((p, i)) {
                let lf = &mut last_first[p as usize];
                assert!(
                    lf.is_none_or(|l| l < i),
                    "{what}: pusher {p}: op {i} first performed after op {lf:?}"
                );
                *lf = Some(i);
            }
        }
    }
    for a in acked {
        assert!(
            seen.contains(a),
            "{what}: acknowledged op {a:?} was never performed"
        );
    }
}

/// Restart after a crash: replay into a fresh log, check, then make sure
/// the journal works again and leaves nothing behind.
fn restart_and_check(
    what: &str,
    dev: &Arc<FaultyDevice>,
    earlier: &[&Log],
    acked: &HashSet<(u32, u64)>,
    pushed: &[u64],
) {
    dev.crash();
    let replay = Log::default();
    let j = Journal::start(dev.clone(), config(), recorder(&replay, &open()))
        .unwrap_or_else(|e| panic!("{what}: restart failed: {e}"));
    let mut logs = earlier.to_vec();
    logs.push(&replay);
    check(what, &logs, acked, pushed);
    // Works again: a new op is performed after the replayed ones.
    let extra = make_op(99, 0);
    j.push(&extra).unwrap().sync().unwrap();
    assert_eq!(replay.lock().unwrap().ids.last(), Some(&(99, 0)), "{what}");
    j.shutdown(true);
    drop(j);
    // Drained: a clean restart replays nothing.
    dev.crash();
    let again = Log::default();
    let j = Journal::<Op, _>::start(dev.clone(), config(), recorder(&again, &open())).unwrap();
    assert!(again.lock().unwrap().ids.is_empty(), "{what}: drained");
    j.shutdown(false);
}

/// Ops pusher `p` of `push_all` submits in one go (`Journal::submit`),
/// waiting for the oldest once this many are in flight.
const SUBMIT_DEPTH: usize = 4;

/// One thread submitting `n` ops as pusher `p`, `SUBMIT_DEPTH` in flight,
/// until the first error: acknowledged ids, ops attempted, and whether it
/// failed.
fn submit_all(j: &Journal<Op, Arc<FaultyDevice>>, p: u32, n: u64) -> (Vec<u64>, u64, bool) {
    let mut ok = Vec::new();
    let mut in_flight = std::collections::VecDeque::new();
    for i in 0..n {
        if in_flight.len() == SUBMIT_DEPTH {
            let (k, pending): (u64, Pending<_>) = in_flight.pop_front().unwrap();
            match pending.wait() {
                Ok(_) => ok.push(k),
                Err(_) => return (ok, i, true),
            }
        }
        match j.submit(&make_op(p, i)) {
            Ok(pending) => in_flight.push_back((i, pending)),
            Err(_) => return (ok, i + 1, true),
        }
    }
    for (k, pending) in in_flight {
        match pending.wait() {
            Ok(_) => ok.push(k),
            Err(_) => return (ok, n, true),
        }
    }
    (ok, n, false)
}

/// Push `n` ops per pusher from `pushers` threads until the first error;
/// the fourth pusher, if any, submits instead (`submit_all`). Returns
/// acknowledged ids, the number of ops attempted per pusher, and the
/// number of failed pushers.
fn push_all(
    j: &Journal<Op, Arc<FaultyDevice>>,
    pushers: u32,
    n: u64,
) -> (HashSet<(u32, u64)>, Vec<u64>, usize) {
    let results: Vec<(Vec<u64>, u64, bool)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..pushers)
            .map(|p| {
                s.spawn(move || {
                    if p == 3 {
                        return submit_all(j, p, n);
                    }
                    let mut ok = Vec::new();
                    for i in 0..n {
                        match j.push(&make_op(p, i)) {
                            Ok(w) => {
                                if i % 5 == 4 {
                                    let _ = w.sync();
                                }
                                ok.push(i);
                            }
                            Err(_) => return (ok, i + 1, true),
                        }
                    }
                    (ok, n, false)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut acked = HashSet::new();
    let mut pushed = Vec::new();
    let mut failed = 0;
    for (p, (ok, attempted, err)) in results.into_iter().enumerate() {
        acked.extend(ok.into_iter().map(|i| (p as u32, i)));
        pushed.push(attempted);
        failed += err as usize;
    }
    (acked, pushed, failed)
}

/// One pusher, `perform` failing throughout (so the applier never writes):
/// the only syncs are the two attaches in `start` and one per commit
/// (tt-ring commits with a single sync), so failing sync `k` must fail
/// exactly push `k - 2`, and every later one.
#[test]
fn a_failed_sync_is_never_acknowledged() {
    for k in 0..28u64 {
        let what = format!("fail_sync {k}");
        let dev = faulty();
        dev.set_faults(Faults {
            fail_sync: Some(k),
            ..Faults::default()
        });
        let first = Log::default();
        let gate = Arc::new(AtomicBool::new(false));
        let started = Journal::start(dev.clone(), config(), recorder(&first, &gate));
        let Ok(j) = started else {
            assert!(k < 2, "{what}: start failed");
            restart_and_check(&what, &dev, &[&first], &HashSet::new(), &[0]);
            continue;
        };
        assert!(k >= 2, "{what}: start hit the failed sync but succeeded");
        let failing = k - 2;
        let mut acked = HashSet::new();
        let n = 25;
        for i in 0..n {
            let r = j.push(&make_op(0, i));
            if i < failing {
                assert!(r.is_ok(), "{what}: push {i}: {:?}", r.err());
                acked.insert((0, i));
            } else {
                assert!(
                    matches!(r, Err(Error::Ring(_))),
                    "{what}: push {i} after the failed sync {}",
                    if r.is_ok() {
                        "was acknowledged"
                    } else {
                        "failed oddly"
                    }
                );
            }
        }
        j.shutdown(false);
        drop(j);
        assert!(first.lock().unwrap().ids.is_empty());
        // May contain the failed op (its effects may have reached the
        // disk), but must contain every acknowledged one.
        restart_and_check(&what, &dev, &[&first], &acked, &[n]);
    }
}

/// Several pushers and a working applier (whose frees sync too): wherever
/// the failed sync lands, acknowledged ops survive the crash.
#[test]
fn a_failed_sync_under_concurrent_pushers_loses_no_acknowledged_op() {
    let mut failures = 0;
    for k in 0..80u64 {
        let what = format!("concurrent fail_sync {k}");
        let dev = faulty();
        let first = Log::default();
        let j = Journal::start(dev.clone(), config(), recorder(&first, &open())).unwrap();
        dev.set_faults(Faults {
            fail_sync: Some(k),
            ..Faults::default()
        });
        let (acked, pushed, failed) = push_all(&j, 4, 25);
        failures += failed;
        j.shutdown(false);
        drop(j);
        restart_and_check(&what, &dev, &[&first], &acked, &pushed);
    }
    assert!(failures > 0, "no push ever hit the failed sync");
}

/// A write torn after 0..=5 sectors (then the device is dead until it
/// reboots): the torn record is never replayed as an op.
#[test]
fn torn_writes_are_never_replayed() {
    let mut failures = 0;
    for w in 0..90u64 {
        for sectors in [0, 1, 2, 5] {
            let what = format!("tear_write ({w}, {sectors})");
            let dev = faulty();
            let first = Log::default();
            let j = Journal::start(dev.clone(), config(), recorder(&first, &open())).unwrap();
            dev.set_faults(Faults {
                tear_write: Some((w, sectors)),
                ..Faults::default()
            });
            let (acked, pushed, failed) = push_all(&j, 4, 15);
            failures += failed;
            j.shutdown(false);
            drop(j);
            restart_and_check(&what, &dev, &[&first], &acked, &pushed);
        }
    }
    assert!(failures > 0, "no push ever hit the torn write");
}

/// The scripted run for the crash-at-every-write test: one pusher, some
/// syncs (so the applier frees space, writing too), a drained shutdown.
/// Returns acknowledged ids and the number of ops attempted.
fn script(j: &Journal<Op, Arc<FaultyDevice>>) -> (HashSet<(u32, u64)>, u64) {
    let mut acked = HashSet::new();
    for i in 0..24u64 {
        match j.push(&make_op(0, i)) {
            Ok(w) => {
                acked.insert((0, i));
                if i % 6 == 5 {
                    let _ = w.sync();
                }
            }
            Err(_) => return (acked, i + 1),
        }
    }
    j.shutdown(true);
    (acked, 24)
}

/// Crash just before write `n`, for every `n` of a scripted run (and a
/// more, as the count varies with the applier's batching); then crash again early in the replay, for some of
/// them; then restart for good.
#[test]
fn a_crash_before_any_write_loses_no_acknowledged_op() {
    // Count the writes of a clean run.
    let dev = faulty();
    let log = Log::default();
    let j = Journal::start(dev.clone(), config(), recorder(&log, &open())).unwrap();
    dev.set_faults(Faults::default());
    let (acked, pushed) = script(&j);
    let writes = dev.writes();
    drop(j);
    check("clean", &[&log], &acked, &[pushed]);
    assert_eq!(acked.len(), 24);
    assert!(writes >= 8, "only {writes} writes");

    for n in 0..writes + 8 {
        let what = format!("crash_before_write {n} of {writes}");
        let dev = faulty();
        let first = Log::default();
        let j = Journal::start(dev.clone(), config(), recorder(&first, &open())).unwrap();
        dev.set_faults(Faults {
            crash_before_write: Some(n),
            ..Faults::default()
        });
        let (acked, pushed) = script(&j);
        j.shutdown(false);
        drop(j);
        // (The applier's batching varies, so the write count does too:
        // no assertion on how far the script got.)
        // A second crash during the replay, at its m-th write.
        let m = n % 3;
        dev.crash();
        dev.set_faults(Faults {
            crash_before_write: Some(m),
            ..Faults::default()
        });
        let during = Log::default();
        if let Ok(j) = Journal::start(dev.clone(), config(), recorder(&during, &open())) {
            j.shutdown(false);
        }
        restart_and_check(&what, &dev, &[&first, &during], &acked, &[pushed]);
    }
}

/// A too-big op that shares a commit with other pushers' ops fails alone:
/// the others are acknowledged, and each op is performed exactly once.
#[test]
fn a_too_big_op_in_a_shared_commit_fails_only_itself() {
    let dev = slow_ring(64 << 10, Duration::from_micros(300));
    let performed = Arc::new(Mutex::new(Vec::<(u32, u64)>::new()));
    let p2 = performed.clone();
    let j = Journal::start(dev, config(), move |ops: &[Op]| {
        p2.lock()
            .unwrap()
            .extend(ops.iter().map(|o| (o.pusher, o.idx)));
        Ok::<_, String>(())
    })
    .unwrap();
    let small = 300u64;
    std::thread::scope(|s| {
        for p in 0..3u32 {
            let j = &j;
            s.spawn(move || {
                for i in 0..small {
                    let mut op = make_op(p, i);
                    op.payload.truncate(50);
                    if let Err(e) = j.push(&op) {
                        panic!("small op ({p}, {i}) failed: {e}");
                    }
                }
            });
        }
        let j = &j;
        s.spawn(move || {
            for i in 0..40 {
                let op = Op {
                    pusher: 7,
                    idx: i,
                    payload: vec![0; 100 << 10],
                    sum: 0,
                };
                assert!(matches!(j.push(&op), Err(Error::TooBig { .. })));
                std::thread::sleep(Duration::from_micros(200));
            }
        });
    });
    j.shutdown(true);
    let performed = performed.lock().unwrap();
    let mut want: Vec<(u32, u64)> = (0..3)
        .flat_map(|p| (0..small).map(move |i| (p, i)))
        .collect();
    let mut got = performed.clone();
    got.sort();
    want.sort();
    assert_eq!(got, want, "each small op exactly once, no big op");
}
