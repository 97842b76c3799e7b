//! `tt-bench compute`: guest CPU speed. Runs the guest SDK's `compute`
//! example (`tt-host run compute -- ITERS`) and times its loop against the
//! same loop run natively in this process.
//!
//! The guest's loop time is the wall time of a run with ITERS iterations
//! minus that of a run with 0 iterations (the launch cost), medians of
//! interleaved runs. [`kernel`] must stay the exact arithmetic of the
//! guest's loop; the guest's printed result is checked against it.

use crate::child;
use crate::launch::tt_host_command;
use crate::stats::{fmt, summarize};
use crate::{judge, Opts, Verdict};
use std::hint::black_box;
use std::time::{Duration, Instant};

/// Target: guest loop time / native loop time.
const TARGET_RATIO: f64 = 1.5;
/// The guest's default count (`tt_example_compute::DEFAULT_ITERS`).
const DEFAULT_ITERS: u64 = 200_000_000;
const DEFAULT_RUNS: usize = 5;

/// The guest's seed (`tt_example_compute::DEFAULT_SEED`).
pub const SEED: u64 = 0x2545_F491_4F6C_DD1D;

/// The guest's loop, natively: a copy of `tt_example_compute::kernel`
/// (guest-sdk/examples/compute/src/lib.rs), which must stay identical.
/// The guest's printed result is checked against this one's every run.
#[inline(never)]
pub fn kernel(iters: u64, seed: u64) -> u64 {
    let mut x = seed | 1;
    let mut acc: u64 = 0;
    let mut i = 0;
    while i < iters {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        acc = acc.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(x);
        i += 1;
    }
    acc
}

/// The value of `key=V` in the guest's output (`V` decimal or 0x-hex).
fn field(out: &str, key: &str) -> Option<u64> {
    out.split_whitespace().find_map(|w| {
        let v = w.strip_prefix(key)?.strip_prefix('=')?;
        match v.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).ok(),
            None => v.parse().ok(),
        }
    })
}

fn median(v: &[Duration]) -> Duration {
    summarize(v).median
}

pub fn run(o: &Opts) -> Result<Verdict, String> {
    let tt_host = crate::tt_host(o)?;
    let image = crate::image(o, "compute")?;
    let iters = o.iters.unwrap_or(DEFAULT_ITERS);
    let runs = o.runs.unwrap_or(DEFAULT_RUNS).max(1);
    if iters == 0 {
        return Err("--iters must be at least 1".into());
    }

    println!(
        "== compute: {iters} loop iterations, tt-host run {} -- {iters} vs native ==",
        image.display()
    );
    let expect = kernel(iters, SEED);
    let arg = |n: u64| vec![n.to_string()];
    let (mut full, mut empty, mut native) = (Vec::new(), Vec::new(), Vec::new());
    let mut own = Vec::new();
    for _ in 0..runs {
        let r = child::run(&mut tt_host_command(&tt_host, &image, &arg(0)))?;
        r.check_status("compute guest (0 iterations)", 0)?;
        empty.push(r.wall);

        let r = child::run(&mut tt_host_command(&tt_host, &image, &arg(iters)))?;
        r.check_status("compute guest", 0)?;
        if field(&r.stdout, "result") != Some(expect) {
            return Err(format!(
                "the compute guest's output does not show result={expect:#018x}, the \
                 native loop's result for {iters} iterations; bench/src/compute.rs's kernel \
                 must match guest-sdk/examples/compute/src/lib.rs\n  guest said: {}",
                r.stdout.trim()
            ));
        }
        if let Some(ms) = field(&r.stdout, "elapsed_ms") {
            own.push(Duration::from_millis(ms));
        }
        full.push(r.wall);

        let start = Instant::now();
        let got = black_box(kernel(black_box(iters), black_box(SEED)));
        native.push(start.elapsed());
        assert_eq!(got, expect, "the native loop is deterministic");
    }
    let (t_full, t_empty, t_native) = (median(&full), median(&empty), median(&native));
    let guest_loop = t_full.saturating_sub(t_empty);
    println!("{:<40} {:>5} {:>12}", "measurement", "runs", "median");
    let mut rows = vec![
        ("tt-host run compute -- ITERS (process)", t_full),
        ("tt-host run compute -- 0 (launch cost)", t_empty),
        ("guest loop = difference", guest_loop),
        ("native loop, in this process", t_native),
    ];
    if own.len() == runs {
        rows.push(("(guest loop by the guest's TSC, ms)", median(&own)));
    }
    for (name, t) in rows {
        println!("{:<40} {:>5} {:>12}", name, runs, fmt(t));
    }
    println!(
        "per iteration: guest {:.2} ns, native {:.2} ns; results match ({expect:#x})",
        guest_loop.as_nanos() as f64 / iters as f64,
        t_native.as_nanos() as f64 / iters as f64
    );
    let ratio = guest_loop.as_secs_f64() / t_native.as_secs_f64();
    Ok(judge("guest loop / native loop =", ratio, TARGET_RATIO, ""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_guests_fields() {
        let out = "compute: iterations=1000 result=0x00000000000000ff elapsed_ms=12\n";
        assert_eq!(field(out, "result"), Some(255));
        assert_eq!(field(out, "elapsed_ms"), Some(12));
        assert_eq!(field(out, "iterations"), Some(1000));
        assert_eq!(field(out, "missing"), None);
    }

    #[test]
    fn kernel_matches_the_guest() {
        // From `tt-host run compute -- 1000000` (guest-sdk/examples/compute).
        assert_eq!(kernel(1_000_000, SEED), 0xdd51_c4a6_6d94_96b1);
        assert_eq!(kernel(0, SEED), 0);
    }
}
