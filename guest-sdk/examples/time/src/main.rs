//! Checks the clocks and that POLL sleeps for its timeout.
//!
//! Output: `time: monotonic ok`, `time: wall clock <secs> s since the
//! epoch`, `slept 100 ms: <measured>`, `slept 300 ms: <measured>`,
//! `time: OK` (exit 0); on failure `time: FAIL ...` (exit 1).
//!
//! With the argument `sleep-forever` it prints `time: sleeping` and then
//! sleeps in POLL for ever; with `spin-forever` it prints `time: spinning`
//! and then spins for ever without a hypercall (for the host's signal
//! tests: only a signal ends either).
#![no_std]
#![no_main]

use core::time::Duration;

use tt_guest::net::poll;
use tt_guest::println;
use tt_guest::time::{monotonic_ns, wallclock_ns, Instant};

tt_guest::main!(app_main);

/// 2020-01-01T00:00:00Z.
const Y2020_NS: u64 = 1_577_836_800 * 1_000_000_000;

fn app_main() -> i32 {
    match tt_guest::boot::args().next() {
        Some("sleep-forever") => {
            println!("time: sleeping");
            loop {
                poll(Duration::from_secs(3600));
            }
        }
        Some("spin-forever") => {
            println!("time: spinning");
            loop {
                core::hint::spin_loop();
            }
        }
        _ => {}
    }
    let a = monotonic_ns();
    let mut b = a;
    for _ in 0..1_000_000 {
        b = monotonic_ns();
        if b > a {
            break;
        }
    }
    if b <= a {
        println!(
            "time: FAIL monotonic clock does not advance ({} -> {})",
            a, b
        );
        return 1;
    }
    println!("time: monotonic ok");
    let wall = wallclock_ns();
    println!(
        "time: wall clock {} s since the epoch",
        wall / 1_000_000_000
    );
    if wall < Y2020_NS {
        println!("time: FAIL wall clock is before 2020");
        return 1;
    }
    let mut ok = true;
    for ms in [100u64, 300] {
        let start = Instant::now();
        let ready = poll(Duration::from_millis(ms));
        let took = start.elapsed().as_millis() as u64;
        println!("slept {} ms: {}", ms, took);
        if !ready.is_empty() {
            println!("time: FAIL poll reported ready devices {:#x}", ready.0);
            ok = false;
        }
        if took < ms || took > ms + 100 {
            println!(
                "time: FAIL slept {} ms, expected {}..={} ms",
                took,
                ms,
                ms + 100
            );
            ok = false;
        }
    }
    let mono = monotonic_ns() / 1_000_000;
    let wall2 = (wallclock_ns() - wall) / 1_000_000;
    println!(
        "time: {} ms since boot, wall clock advanced {} ms",
        mono, wall2
    );
    if ok {
        println!("time: OK");
        0
    } else {
        1
    }
}
