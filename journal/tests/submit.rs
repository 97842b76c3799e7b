//! `Journal::submit`: one thread keeping many operations in flight, the
//! way a device queue does.

mod common;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tt_journal::{Config, Error, Journal, Pending};

type Log = Arc<Mutex<Vec<u64>>>;

fn recorder(log: &Log) -> impl FnMut(&[u64]) -> Result<(), String> + Send + 'static {
    let log = log.clone();
    move |ops| {
        log.lock().unwrap().extend_from_slice(ops);
        Ok(())
    }
}

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
