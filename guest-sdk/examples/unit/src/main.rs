//! A guest for the daemon's tests, whose behaviour its arguments choose:
//!
//! - `tick MS [N]`: prints `tick K` (K = 1, 2, ...) every MS milliseconds,
//!   for ever, or N times and then exits 0. Tick K is due K * MS ms after
//!   the start, so the ticks do not drift; between them the guest sleeps in
//!   POLL (no busy loop).
//! - `exit CODE`: prints `exiting with CODE` and exits with CODE.
//! - `idle`: prints `idle`, then blocks for ever in POLL with the longest
//!   timeout there is, using no CPU until a signal stops it.
//! - `chatty BYTES MS`: every MS ms, for ever, prints one line of BYTES
//!   bytes, its newline included: `K ` (the line's number from 1) and
//!   letters `abc...z` repeated (cut short, the number too, when BYTES is
//!   small), at most 65536 bytes.
//!
//! Anything else prints `unit: usage: ...` and exits 2.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;
use core::fmt::Write;
use core::time::Duration;

use tt_guest::println;
use tt_guest::time::{sleep, Instant};

tt_guest::main!(app_main);

/// The longest `chatty` line.
const MAX_LINE: usize = 65536;

const USAGE: &str = "unit: usage: tick MS [N] | exit CODE | idle | chatty BYTES_PER_TICK MS";

/// Sleep (in POLL) until `t`; at once if it has passed.
fn sleep_until(t: Instant) {
    let now = Instant::now().as_nanos();
    if t.as_nanos() > now {
        sleep(Duration::from_nanos(t.as_nanos() - now));
    }
}

/// The instant `k` periods of `ms` after `start`.
fn due(start: Instant, ms: u64, k: u64) -> Instant {
    start + Duration::from_millis(ms.saturating_mul(k))
}

fn tick(ms: u64, n: Option<u64>) -> i32 {
    let start = Instant::now();
    let mut k = 1u64;
    loop {
        sleep_until(due(start, ms, k));
        println!("tick {}", k);
        if n.is_some_and(|n| k >= n) {
            return 0;
        }
        k += 1;
    }
}

fn idle() -> ! {
    println!("idle");
    loop {
        // The longest timeout: the host blocks the vCPU's thread in ppoll
        // until a signal stops the guest.
        tt_guest::hypercall::poll(u64::MAX);
    }
}

/// `line` filled to `bytes` bytes for line number `k`.
fn chatty_line(line: &mut Vec<u8>, bytes: usize, k: u64) {
    struct Buf<'a>(&'a mut Vec<u8>);
    impl Write for Buf<'_> {
        fn write_str(&mut self, s: &str) -> core::fmt::Result {
            self.0.extend_from_slice(s.as_bytes());
            Ok(())
        }
    }
    line.clear();
    let _ = write!(Buf(line), "{} ", k);
    let body = bytes.saturating_sub(1);
    line.truncate(body);
    let mut letter = 0u8;
    while line.len() < body {
        line.push(b'a' + letter);
        letter = (letter + 1) % 26;
    }
    if bytes > 0 {
        line.push(b'\n');
    }
}

fn chatty(bytes: usize, ms: u64) -> ! {
    let start = Instant::now();
    let mut line = Vec::with_capacity(bytes);
    let mut k = 1u64;
    loop {
        chatty_line(&mut line, bytes, k);
        // One hypercall per line, however long.
        tt_guest::console::write(&line);
        sleep_until(due(start, ms, k));
        k += 1;
    }
}

fn app_main() -> i32 {
    let args: Vec<&str> = tt_guest::boot::args().collect();
    let num = |s: &str| s.parse::<u64>().ok();
    match args.as_slice() {
        ["tick", ms] => {
            if let Some(ms) = num(ms) {
                return tick(ms, None);
            }
        }
        ["tick", ms, n] => {
            if let (Some(ms), Some(n)) = (num(ms), num(n)) {
                return tick(ms, Some(n));
            }
        }
        ["exit", code] => {
            if let Ok(code) = code.parse::<i32>() {
                println!("exiting with {}", code);
                return code;
            }
        }
        ["idle"] => idle(),
        ["chatty", bytes, ms] => {
            if let (Some(bytes), Some(ms)) = (num(bytes), num(ms)) {
                if bytes <= MAX_LINE as u64 {
                    chatty(bytes as usize, ms);
                }
            }
        }
        _ => {}
    }
    println!("{}", USAGE);
    2
}
