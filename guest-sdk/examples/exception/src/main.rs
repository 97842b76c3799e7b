//! Triggers a CPU exception so the SDK's report can be checked.
//!
//! Argument: `null` (read from address 0: #PF), `ud` (ud2: #UD) or `div0`
//! (integer division by zero: #DE). Prints `exception: triggering <arg>`
//! first; the run must end with the SDK's `tt-guest: exception ...` report
//! and exit status 255. Also `panic` (a Rust panic: `tt-guest: panic at
//! <file>:<line>:<col>: requested panic`) and `oom` (allocating more than
//! memory: `tt-guest: panic at ...: memory allocation of N bytes failed`),
//! both status 255, and `stack` (unbounded recursion: `#PF ... (write to
//! unmapped page, stack overflow?)`, status 255). Without a valid argument it prints a usage line and
//! exits 2; if the exception does not stop the guest it exits 1.
#![no_std]
#![no_main]

extern crate alloc;

use core::arch::asm;
use core::hint::black_box;

use tt_guest::println;

tt_guest::main!(app_main);

/// Recurse forever, with a 4 KiB frame per level (the point of `stack`).
#[inline(never)]
#[allow(unconditional_recursion)]
fn recurse(depth: u64) -> u64 {
    let mut frame = [0u8; 4096];
    frame[(depth % 4096) as usize] = depth as u8;
    black_box(&mut frame);
    recurse(depth + 1) + frame[0] as u64
}

fn app_main() -> i32 {
    let Some(what) = tt_guest::boot::args().next() else {
        println!("exception: usage: exception null|ud|div0|panic|oom|stack");
        return 2;
    };
    println!("exception: triggering {}", what);
    match what {
        "null" => {
            let p: usize = black_box(0);
            let v: u64;
            // SAFETY: deliberately reads address 0, which is unmapped: the
            // #PF ends the guest, so the read never "returns".
            unsafe { asm!("mov {v}, qword ptr [{p}]", p = in(reg) p, v = out(reg) v) };
            println!("exception: read {:#x} from address 0", v);
        }
        "ud" => {
            // SAFETY: ud2 raises #UD, which ends the guest.
            unsafe { asm!("ud2") };
        }
        "div0" => {
            let divisor: u64 = black_box(0);
            let q: u64;
            // SAFETY: deliberately divides by zero (Rust's `/` would panic
            // instead of executing `div`): the #DE ends the guest.
            unsafe {
                asm!(
                    "div {d}",
                    d = in(reg) divisor,
                    inout("rax") 42u64 => q,
                    inout("rdx") 0u64 => _,
                )
            };
            println!("exception: 42 / 0 = {}", q);
        }
        "panic" => panic!("requested panic"),
        "stack" => {
            let n = recurse(black_box(1));
            println!("exception: recursion returned {}", n);
        }
        "oom" => {
            let n = black_box(usize::MAX / 4);
            let v: alloc::vec::Vec<u8> = black_box(alloc::vec::Vec::with_capacity(n));
            println!("exception: allocated {} bytes", v.capacity());
        }
        other => {
            println!(
                "exception: unknown argument {:?} (use null, ud, div0, panic, oom or stack)",
                other
            );
            return 2;
        }
    }
    println!("exception: not caught");
    1
}
