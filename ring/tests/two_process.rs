//! A producer process and a consumer process share one ring file: 100,000
//! items of varied sizes are delivered in order, each exactly once.
//!
//! The test re-runs its own binary twice (filtered to `child`, with
//! `TT_RING_ROLE` set) so that the two sides are real, separate processes.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};
use tt_ring::{Consumer, Error, FileDevice, Producer};

const ITEMS: u64 = 100_000;
const SECTOR: u32 = 4096;

/// Item `i`: its index, then `i % 300` bytes derived from it.
fn item(i: u64) -> Vec<u8> {
    let mut v = i.to_le_bytes().to_vec();
    v.extend((0..i % 300).map(|k| (i.wrapping_mul(31) + k) as u8));
    v
}

fn ring_path() -> PathBuf {
    // Under target/ (a real file system, so fdatasync is real).
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    dir.join(format!("two-process-{}.ring", std::process::id()))
}

#[test]
#[allow(
    clippy::zombie_processes,
    reason = "both children are reaped: by try_wait when they exit, by wait after kill on timeout"
)]
fn producer_and_consumer_in_two_processes() {
    let path = ring_path();
    let dev = FileDevice::create(&path, 1 << 20, SECTOR).unwrap();
    Producer::create(&dev).unwrap();
    drop(dev);
    let spawn = |role: &str| {
        Command::new(std::env::current_exe().unwrap())
            .args(["child", "--exact", "--nocapture", "--test-threads=1"])
            .env("TT_RING_ROLE", role)
            .env("TT_RING_PATH", &path)
            .spawn()
            .unwrap()
    };
    let mut consumer = spawn("consumer");
    let mut producer = spawn("producer");
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut done = [None, None];
    while done.iter().any(Option::is_none) {
        for (slot, child) in done.iter_mut().zip([&mut producer, &mut consumer]) {
            if slot.is_none() {
                *slot = child.try_wait().unwrap();
            }
        }
        if Instant::now() > deadline {
            for child in [&mut producer, &mut consumer] {
                let _ = child.kill();
                let _ = child.wait();
            }
            panic!("the two processes did not finish in 300 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::fs::remove_file(&path);
    assert!(done[0].unwrap().success(), "producer failed");
    assert!(done[1].unwrap().success(), "consumer failed");
}

/// One side of the test; does nothing unless run by the test above.
#[test]
fn child() {
    let Ok(role) = std::env::var("TT_RING_ROLE") else {
        return;
    };
    let path = PathBuf::from(std::env::var("TT_RING_PATH").unwrap());
    let dev = FileDevice::open(&path, SECTOR).unwrap();
    let backoff = || std::thread::sleep(Duration::from_micros(200));
    if role == "producer" {
        let mut p = Producer::attach(dev).unwrap();
        let mut i = 0;
        while i < ITEMS {
            // Batches of 1 to 97 items per advance.
            let batch = 1 + (i * 7919) % 97;
            let mut staged = 0;
            while staged < batch && i < ITEMS {
                match p.push(&item(i)) {
                    Ok(_) => {
                        i += 1;
                        staged += 1;
                    }
                    Err(Error::Retry) if staged > 0 => break,
                    Err(Error::Retry) => backoff(),
                    Err(e) => panic!("push {i}: {e}"),
                }
            }
            p.advance().unwrap();
        }
    } else {
        let mut c = Consumer::attach(dev).unwrap();
        let mut next = 0;
        let mut since_advance = 0;
        while next < ITEMS {
            match c.pop() {
                Ok(it) => {
                    assert_eq!(it.data, item(next), "item {next} out of order or damaged");
                    next += 1;
                    since_advance += 1;
                    if since_advance == 200 || next == ITEMS {
                        c.advance(it.next).unwrap();
                        since_advance = 0;
                    }
                }
                Err(Error::Retry) => {
                    if since_advance > 0 {
                        c.advance(c.cursor()).unwrap();
                        since_advance = 0;
                    }
                    backoff();
                }
                Err(e) => panic!("pop after {next} items: {e}"),
            }
        }
        // Exactly once: nothing more arrives.
        assert!(matches!(c.pop(), Err(Error::Retry)));
    }
}
