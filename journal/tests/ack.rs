//! An op that failed with `Full` is never acknowledged, even when its
//! pusher looks late: by then a later batch may have made `durable` pass
//! its seq. (Its pusher used to trust `durable` alone and return `Ok` for
//! an op that was never written.)
//!
//! The pusher is made late the way a preemption would: a signal handler
//! sleeps on its thread while the failure and the later commit happen.
//! Kept in its own test binary because it installs a signal handler.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tt_journal::{Config, Error, Journal};
use tt_ring::{MemDevice, Producer};

extern "C" fn oversleep(_: libc::c_int) {
    let ts = libc::timespec {
        tv_sec: 3,
        tv_nsec: 0,
    };
    // SAFETY: nanosleep is async-signal-safe; `ts` is a valid timespec and
    // a null remainder pointer is allowed.
    unsafe { libc::nanosleep(&ts, std::ptr::null_mut()) };
}

#[test]
fn an_op_that_failed_with_full_is_not_acknowledged_by_a_later_commit() {
    // SAFETY: installs a handler that only calls an async-signal-safe
    // function; SIGUSR1 is sent below to one thread of this test only.
    unsafe { libc::signal(libc::SIGUSR1, oversleep as *const () as libc::sighandler_t) };
    let d = Arc::new(MemDevice::new(16 * 512, 512));
    Producer::create(&d).unwrap();
    let gate = Arc::new(AtomicBool::new(false));
    let log = Arc::new(Mutex::new(Vec::<u8>::new()));
    let (g, l) = (gate.clone(), log.clone());
    let j = Arc::new(
        Journal::start(
            d,
            Config {
                full_timeout: Duration::from_millis(300),
                // Not 1 ms: every failed perform prints a line.
                retry_interval: Duration::from_millis(50),
                ..Config::default()
            },
            move |ops: &[(u8, Vec<u8>)]| -> Result<(), String> {
                if !g.load(Ordering::SeqCst) {
                    return Err("blocked".into());
                }
                l.lock().unwrap().extend(ops.iter().map(|o| o.0));
                Ok(())
            },
        )
        .unwrap(),
    );
    // Fill the ring while perform is blocked.
    loop {
        match j.push(&(0u8, vec![0u8; 1000])) {
            Ok(_) => {}
            Err(Error::Full(_)) => break,
            Err(e) => panic!("{e}"),
        }
    }
    // X commits on its own thread and waits for space (fails after
    // 300 ms); A queues behind it, so the committer takes A's op when X's
    // commit ends and fails it 300 ms later. A's thread oversleeps 3 s
    // from when it waits.
    let jx = j.clone();
    let x = std::thread::spawn(move || jx.push(&(1u8, vec![1u8; 1000])).is_ok());
    std::thread::sleep(Duration::from_millis(50));
    let ids = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
    let (ja, t) = (j.clone(), ids.clone());
    let a = std::thread::spawn(move || {
        // SAFETY: pthread_self and gettid have no preconditions.
        t.0.store(unsafe { libc::pthread_self() } as u64, Ordering::SeqCst);
        t.1.store(unsafe { libc::gettid() } as u64, Ordering::SeqCst);
        ja.push(&(2u8, vec![2u8; 1000])).map(|w| w.seq())
    });
    // Signal A once it sleeps, which it does only waiting in push, with
    // its op queued.
    let sleeping = || {
        let tid = ids.1.load(Ordering::SeqCst);
        tid != 0
            && std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).is_ok_and(|s| {
                s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('S')
            })
    };
    let t0 = std::time::Instant::now();
    while !sleeping() {
        assert!(t0.elapsed() < Duration::from_secs(5), "A never waited");
        std::thread::sleep(Duration::from_millis(1));
    }
    let tid = &ids.0;
    // SAFETY: the id is of thread `a`, which is still running (it sleeps
    // in push until the handler has run).
    unsafe { libc::pthread_kill(tid.load(Ordering::SeqCst) as libc::pthread_t, libc::SIGUSR1) };
    // X's commit ends (and the committer takes A's op) when X returns;
    // A's op has failed `full_timeout` after that. Then unblock perform: a
    // later op commits and moves `durable` past A's seq while A sleeps.
    let x_ok = x.join().unwrap();
    std::thread::sleep(Duration::from_millis(300 + 500));
    gate.store(true, Ordering::SeqCst);
    j.push(&(3u8, vec![3u8; 10])).unwrap().sync().unwrap();
    let a_result = a.join().unwrap();
    j.shutdown(true);
    let performed = log.lock().unwrap().clone();
    // The invariant, whatever the scheduling: an acknowledged op is
    // performed; a failed one never is.
    for (tag, ok) in [(1u8, x_ok), (2u8, a_result.is_ok())] {
        assert_eq!(
            performed.contains(&tag),
            ok,
            "op {tag}: push returned {}, performed: {performed:?}",
            if ok { "Ok" } else { "an error" }
        );
    }
    // And with the scheduling above, A's op is the one that failed.
    assert!(matches!(a_result, Err(Error::Full(_))), "{a_result:?}");
}
