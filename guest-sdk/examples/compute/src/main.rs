//! CPU-bound integer loop (see `lib.rs` for the kernel).
//!
//! Argument: the iteration count, as `N` or `iters=N` (default
//! 200000000). Output: `compute: iterations=N result=0x<16 hex digits>
//! elapsed_ms=T`, exit 0. A bad argument prints a usage line and exits 2.
#![no_std]
#![no_main]

use core::hint::black_box;

use tt_example_compute::{kernel, DEFAULT_ITERS, DEFAULT_SEED};
use tt_guest::println;
use tt_guest::time::Instant;

tt_guest::main!(app_main);

fn app_main() -> i32 {
    let mut iters = DEFAULT_ITERS;
    for arg in tt_guest::boot::args() {
        let v = arg.strip_prefix("iters=").unwrap_or(arg);
        match v.parse() {
            Ok(n) => iters = n,
            Err(_) => {
                println!("compute: usage: compute [N | iters=N]");
                return 2;
            }
        }
    }
    let start = Instant::now();
    let r = kernel(black_box(iters), black_box(DEFAULT_SEED));
    let ms = start.elapsed().as_millis();
    println!(
        "compute: iterations={} result={:#018x} elapsed_ms={}",
        iters, r, ms
    );
    0
}
