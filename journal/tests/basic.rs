//! Journal behaviour on a memory ring: durability, order, replay, group
//! commit, retries, shutdown, back-pressure.

mod common;

use common::{recorder, Log};

use std::sync::{Arc, Mutex};
use std::time::Duration;
use tt_journal::{Config, Error, Journal};
use tt_ring::{MemDevice, Producer};

fn ring(size: u64) -> Arc<MemDevice> {
    let d = Arc::new(MemDevice::new(size, 512));
    Producer::create(&d).unwrap();
    d
}

#[test]
fn pushed_ops_are_performed_in_order() {
    let log = Log::default();
    let j = Journal::start(ring(1 << 20), Config::default(), recorder(&log)).unwrap();
    let mut last = None;
    for i in 0..100u64 {
        last = Some(j.push(&i).unwrap());
    }
    last.unwrap().sync().unwrap();
    assert_eq!(*log.lock().unwrap(), (0..100).collect::<Vec<_>>());
    j.shutdown(true);
}

#[test]
fn unperformed_ops_are_replayed_by_the_next_start() {
    let dev = ring(1 << 20);
    let first = Log::default();
    // perform always fails: nothing gets applied in the first run.
    let j = Journal::start(
        dev.clone(),
        Config {
            retry_interval: Duration::from_millis(1),
            ..Config::default()
        },
        |_: &[u64]| Err("disk unplugged"),
    )
    .unwrap();
    for i in 0..10u64 {
        let _ = j.push(&i).unwrap();
    }
    j.shutdown(false);
    assert!(first.lock().unwrap().is_empty());
    let second = Log::default();
    let j = Journal::start(dev, Config::default(), recorder(&second)).unwrap();
    assert_eq!(
        *second.lock().unwrap(),
        (0..10).collect::<Vec<_>>(),
        "replayed in start"
    );
    // Sequence numbers continue after the replayed ones.
    let w = j.push(&10u64).unwrap();
    assert_eq!(w.seq(), 10);
    w.sync().unwrap();
    j.shutdown(true);
}

#[test]
fn perform_failing_then_succeeding_is_retried() {
    let log = Log::default();
    let failures = Arc::new(Mutex::new(3));
    let (l, f) = (log.clone(), failures.clone());
    let j = Journal::start(
        ring(1 << 20),
        Config {
            retry_interval: Duration::from_millis(2),
            ..Config::default()
        },
        move |ops: &[u64]| {
            let mut left = f.lock().unwrap_or_else(|e| e.into_inner());
            if *left > 0 {
                *left -= 1;
                if *left == 1 {
                    panic!("perform panics once");
                }
                return Err("transient");
            }
            l.lock().unwrap().extend_from_slice(ops);
            Ok(())
        },
    )
    .unwrap();
    j.push(&7u64).unwrap().sync().unwrap();
    assert_eq!(*log.lock().unwrap(), vec![7]);
    let m = j.metrics();
    assert_eq!(m.perform_failures, 3);
    assert_eq!(m.pending_ops, 0);
    j.shutdown(true);
}

#[test]
fn concurrent_pushers_share_syncs() {
    let log = Log::default();
    let j = Arc::new(Journal::start(ring(4 << 20), Config::default(), recorder(&log)).unwrap());
    let threads: Vec<_> = (0..16u64)
        .map(|t| {
            let j = j.clone();
            std::thread::spawn(move || {
                for i in 0..50 {
                    let _ = j.push(&(t * 1000 + i)).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let syncs = j.metrics().syncs;
    assert!(
        syncs < 800,
        "{syncs} commits for 800 pushes: no group commit"
    );
    j.push(&u64::MAX).unwrap().sync().unwrap();
    let performed = log.lock().unwrap().clone();
    assert_eq!(performed.len(), 801);
    // Each thread's ops are performed in its push order.
    for t in 0..16 {
        let mine: Vec<_> = performed
            .iter()
            .filter(|&&x| x / 1000 == t && x != u64::MAX)
            .collect();
        assert!(mine.windows(2).all(|w| w[0] < w[1]));
    }
    Arc::try_unwrap(j).ok().unwrap().shutdown(true);
}

#[test]
fn shutdown_while_pushing_keeps_every_acknowledged_op() {
    let log = Log::default();
    let dev = ring(1 << 20);
    let j = Arc::new(Journal::start(dev.clone(), Config::default(), recorder(&log)).unwrap());
    let pushers: Vec<_> = (0..4u64)
        .map(|t| {
            let j = j.clone();
            std::thread::spawn(move || {
                let mut acked = Vec::new();
                for i in 0.. {
                    match j.push(&(t * 1_000_000 + i)) {
                        Ok(w) => acked.push(w.seq()),
                        Err(Error::ShutDown) => break,
                        Err(e) => panic!("{e}"),
                    }
                }
                acked.len()
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(20));
    j.shutdown(true);
    let acked: usize = pushers.into_iter().map(|p| p.join().unwrap()).sum();
    assert!(acked > 0);
    assert!(
        matches!(j.push(&0), Err(Error::ShutDown)),
        "push after shutdown"
    );
    assert_eq!(
        log.lock().unwrap().len(),
        acked,
        "drained: every acknowledged op performed"
    );
    drop(j);
    // Nothing is left to replay.
    let again = Log::default();
    let j = Journal::<u64, _>::start(dev, Config::default(), recorder(&again)).unwrap();
    assert!(again.lock().unwrap().is_empty());
    j.shutdown(false);
}

#[test]
fn a_full_ring_makes_pushers_wait_then_time_out() {
    let log = Log::default();
    let gate = Arc::new(Mutex::new(false));
    let (l, g) = (log.clone(), gate.clone());
    let j = Journal::start(
        ring(16 * 512),
        Config {
            full_timeout: Duration::from_millis(100),
            retry_interval: Duration::from_millis(1),
            ..Config::default()
        },
        move |ops: &[Vec<u8>]| {
            if !*g.lock().unwrap() {
                return Err("blocked");
            }
            l.lock().unwrap().extend(ops.iter().map(|o| o.len() as u64));
            Ok(())
        },
    )
    .unwrap();
    let op = vec![1u8; 1000];
    let mut acked = 0;
    let err = loop {
        match j.push(&op) {
            Ok(_) => acked += 1,
            Err(e) => break e,
        }
    };
    assert!(matches!(err, Error::Full(_)), "{err}");
    assert!(acked > 0);
    *gate.lock().unwrap() = true;
    j.push(&op).unwrap().sync().unwrap();
    assert_eq!(log.lock().unwrap().len(), acked + 1, "nothing dropped");
    let too_big = vec![0u8; 64 << 10];
    assert!(matches!(j.push(&too_big), Err(Error::TooBig { .. })));
    j.shutdown(true);
}

fn slow_ring(size: u64) -> Arc<common::SlowSync> {
    common::slow_ring(size, Duration::from_millis(2))
}

#[test]
fn a_ring_full_in_mid_commit_fails_only_the_ops_that_did_not_fit() {
    let log = Arc::new(Mutex::new(Vec::<(u64, u64)>::new()));
    let gate = Arc::new(Mutex::new(false));
    let (l, g) = (log.clone(), gate.clone());
    let j = Arc::new(
        Journal::start(
            slow_ring(24 * 512),
            Config {
                full_timeout: Duration::from_millis(50),
                retry_interval: Duration::from_millis(1),
                ..Config::default()
            },
            move |ops: &[(u64, u64, Vec<u8>)]| {
                if !*g.lock().unwrap() {
                    return Err("blocked");
                }
                l.lock()
                    .unwrap()
                    .extend(ops.iter().map(|(t, i, _)| (*t, *i)));
                Ok(())
            },
        )
        .unwrap(),
    );
    // Eight pushers race into a ring that holds only a few ops while the
    // applier is blocked; ops of ~300 bytes make a batch span sectors, so
    // commits fill the ring part-way.
    let pushers: Vec<_> = (0..8u64)
        .map(|t| {
            let j = j.clone();
            std::thread::spawn(move || {
                let (mut acked, mut full) = (Vec::new(), 0);
                for i in 0..20u64 {
                    match j.push(&(t, i, vec![t as u8; 300])) {
                        Ok(_) => acked.push((t, i)),
                        Err(Error::Full(_)) => full += 1,
                        Err(e) => panic!("only Full is expected, got {e}"),
                    }
                }
                (acked, full)
            })
        })
        .collect();
    let mut acked = Vec::new();
    let mut full = 0;
    for p in pushers {
        let (a, f) = p.join().unwrap();
        acked.extend(a);
        full += f;
    }
    assert!(full > 0, "the ring never filled");
    assert!(!acked.is_empty());
    // The journal still works, and everything acknowledged gets performed.
    *gate.lock().unwrap() = true;
    j.push(&(99, 0, Vec::new())).unwrap().sync().unwrap();
    let performed = log.lock().unwrap().clone();
    for op in &acked {
        assert!(
            performed.contains(op),
            "acknowledged {op:?} was not performed"
        );
    }
    assert_eq!(
        performed.len(),
        acked.len() + 1,
        "an op that failed with Full was performed"
    );
    j.shutdown(true);
}

/// A pusher alone commits on its own thread; others arriving during its
/// sync are committed by the committer thread. Pushers that come and go
/// (one alone, then several at once, then one again) move commits between
/// the two: every push is acknowledged once durable, each thread's ops
/// are performed in its push order, and nothing is lost or doubled.
#[test]
fn lone_and_concurrent_pushers_take_turns_committing() {
    let log = Log::default();
    let j =
        Arc::new(Journal::start(slow_ring(4 << 20), Config::default(), recorder(&log)).unwrap());
    let mut pushed = 0u64;
    let mut lone_syncs = 0;
    for round in 0..6u64 {
        // One pusher alone: one commit per push, on its own thread.
        let before = j.metrics().syncs;
        for i in 0..5 {
            let _ = j.push(&(round * 1_000_000 + i)).unwrap();
            pushed += 1;
        }
        lone_syncs += j.metrics().syncs - before;
        // Then 6 at once, starting while the lone pusher's last ops may
        // still be in flight on other rounds' threads.
        let threads: Vec<_> = (1..=6u64)
            .map(|t| {
                let j = j.clone();
                std::thread::spawn(move || {
                    for i in 0..15 {
                        let _ = j.push(&(round * 1_000_000 + t * 1000 + i)).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        pushed += 6 * 15;
    }
    assert_eq!(lone_syncs, 30, "each lone push is one commit");
    j.push(&u64::MAX).unwrap().sync().unwrap();
    let performed = log.lock().unwrap().clone();
    assert_eq!(
        performed.len() as u64,
        pushed + 1,
        "nothing lost or doubled"
    );
    let mut seen = std::collections::HashSet::new();
    assert!(
        performed.iter().all(|x| seen.insert(*x)),
        "an op performed twice"
    );
    for round in 0..6u64 {
        for t in 0..=6u64 {
            let mine: Vec<_> = performed
                .iter()
                .filter(|&&x| x != u64::MAX && x / 1_000_000 == round && x % 1_000_000 / 1000 == t)
                .collect();
            assert_eq!(mine.len(), if t == 0 { 5 } else { 15 });
            assert!(
                mine.windows(2).all(|w| w[0] < w[1]),
                "round {round} thread {t} out of order"
            );
        }
    }
    Arc::try_unwrap(j).ok().unwrap().shutdown(true);
}

/// A batch larger than the ring's free space is committed in pieces: the
/// piece that fits is committed and published as durable, so the applier
/// performs and frees it and the rest follows. (Before, the piece was
/// committed but not published; the applier saw nothing to perform, and
/// the rest of the batch failed with `Full` after `full_timeout`.)
#[test]
fn a_batch_bigger_than_the_free_ring_is_committed_in_pieces() {
    let log = Log::default();
    let l = log.clone();
    let j = Arc::new(
        Journal::start(
            // 27 data sectors of 512 bytes: about 13 ops of 1000 bytes.
            common::slow_ring(32 * 512, Duration::from_millis(100)),
            Config {
                full_timeout: Duration::from_secs(20),
                ..Config::default()
            },
            move |ops: &[(u64, Vec<u8>)]| -> Result<(), String> {
                l.lock().unwrap().extend(ops.iter().map(|(i, _)| *i));
                Ok(())
            },
        )
        .unwrap(),
    );
    // A lone pusher commits (100 ms sync); 20 ops of 1000 bytes queue
    // meanwhile and become the committer's next batch, 20 KB.
    let j1 = j.clone();
    let first = std::thread::spawn(move || j1.push(&(100, vec![0u8; 10])).map(|_| ()));
    std::thread::sleep(Duration::from_millis(30));
    let started = std::time::Instant::now();
    let pushers: Vec<_> = (0..20u64)
        .map(|i| {
            let j = j.clone();
            std::thread::spawn(move || j.push(&(i, vec![i as u8; 1000])).map(|w| w.seq()))
        })
        .collect();
    first.join().unwrap().unwrap();
    for p in pushers {
        if let Err(e) = p.join().unwrap() {
            panic!("push failed after {:?}: {e}", started.elapsed());
        }
    }
    j.shutdown(true);
    let syncs = j.metrics().syncs;
    assert!(
        syncs <= 8,
        "{syncs} commits: the 20 ops did not queue as one batch, so the ring never filled"
    );
    let mut performed = log.lock().unwrap().clone();
    performed.sort();
    assert_eq!(performed, (0..=19).chain([100]).collect::<Vec<_>>());
    assert_eq!(j.metrics().pending_ops, 0, "performed ops still counted");
}

/// The pushers of the part of a batch committed while the ring is full
/// return as soon as it is committed, not when the whole batch is (which
/// waits for the applier, here blocked, to free space).
#[test]
fn pushers_of_a_committed_part_of_a_batch_return_before_the_rest() {
    let open = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let o = open.clone();
    let j = Arc::new(
        Journal::start(
            common::slow_ring(32 * 512, Duration::from_millis(100)),
            Config {
                full_timeout: Duration::from_secs(20),
                retry_interval: Duration::from_millis(20),
                ..Config::default()
            },
            move |_: &[(u64, Vec<u8>)]| -> Result<(), String> {
                if o.load(std::sync::atomic::Ordering::SeqCst) {
                    Ok(())
                } else {
                    Err("blocked".into())
                }
            },
        )
        .unwrap(),
    );
    // As in the test above: a lone commit, and 20 ops of 1000 bytes that
    // queue behind it as one batch larger than the ring.
    let j1 = j.clone();
    let first = std::thread::spawn(move || j1.push(&(100, vec![0u8; 10])).map(|_| ()));
    std::thread::sleep(Duration::from_millis(30));
    let (tx, rx) = std::sync::mpsc::channel();
    let pushers: Vec<_> = (0..20u64)
        .map(|i| {
            let (j, tx) = (j.clone(), tx.clone());
            std::thread::spawn(move || {
                let r = j.push(&(i, vec![i as u8; 1000])).map(|w| w.seq());
                tx.send(r.is_ok()).unwrap();
            })
        })
        .collect();
    first.join().unwrap().unwrap();
    // While perform is blocked nothing can be freed, so only the part
    // that fitted is durable; its pushers must be back already.
    let mut early = 0;
    while let Ok(ok) = rx.recv_timeout(Duration::from_secs(2)) {
        assert!(ok);
        early += 1;
    }
    assert!(
        (5..20).contains(&early),
        "{early} of 20 pushers returned while the ring was full"
    );
    open.store(true, std::sync::atomic::Ordering::SeqCst);
    for p in pushers {
        p.join().unwrap();
    }
    let late = rx.try_iter().filter(|ok| *ok).count();
    assert_eq!(
        early + late,
        20,
        "every push succeeded once space was freed"
    );
    j.shutdown(true);
}

/// A gate a test closes to hold every sync until it opens again.
#[derive(Default)]
struct Gate {
    held: Mutex<bool>,
    opened: std::sync::Condvar,
}

impl Gate {
    fn set(&self, held: bool) {
        *self.held.lock().unwrap() = held;
        self.opened.notify_all();
    }
    fn pass(&self) {
        let mut held = self.held.lock().unwrap();
        while *held {
            held = self.opened.wait(held).unwrap();
        }
    }
}

/// The ring shows a commit as soon as it is written, before its sync
/// finishes. The applier must not perform such ops: if the sync then
/// fails or power is lost, the op was never durable (nor acknowledged)
/// but the protected state would have it.
#[test]
fn ops_are_performed_only_once_durable() {
    let gate = Arc::new(Gate::default());
    let g = gate.clone();
    let d = Arc::new(common::HookedSync {
        dev: MemDevice::new(64 << 10, 512),
        before_sync: move || g.pass(),
    });
    Producer::create(&d).unwrap();
    let log = Log::default();
    let j = Arc::new(
        Journal::start(
            d.clone(),
            Config {
                // The applier reads op 1's batch only when asked.
                flush_interval: Duration::from_secs(10),
                ..Config::default()
            },
            recorder(&log),
        )
        .unwrap(),
    );
    let one = j.push(&1).unwrap();
    gate.set(true);
    let j2 = j.clone();
    let two = std::thread::spawn(move || j2.push(&2).map(|w| w.seq()));
    // Op 2 is written and waits in its sync; then ask for op 1.
    std::thread::sleep(Duration::from_millis(100));
    one.sync().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(*log.lock().unwrap(), [1], "op 2 performed before its sync");
    gate.set(false);
    two.join().unwrap().unwrap();
    j.shutdown(true);
    assert_eq!(*log.lock().unwrap(), [1, 2]);
}
