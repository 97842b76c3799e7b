//! `tt-bench compute`: guest CPU speed. Runs the guest SDK's `compute`
//! example (`tt-host run compute -- ITERS`) and times its loop against the
//! same loop run natively in this process.
//!
//! The guest's loop time is the wall time of a run with ITERS iterations
//! minus that of a run with 0 iterations (the launch cost), medians of
//! interleaved runs. [`native_loop`] must stay the exact arithmetic of the
//! guest's loop; the guest's printed result is checked against it.

use crate::child;
use crate::launch::tt_host_command;
use crate::stats::{fmt, summarize};
use crate::{judge, Opts, Verdict};
use std::hint::black_box;
use std::time::{Duration, Instant};

/// Target: guest loop time / native loop time.
const TARGET_RATIO: f64 = 1.5;
const DEFAULT_ITERS: u64 = 100_000_000;
const DEFAULT_RUNS: usize = 5;

/// The seed of the xorshift state.
pub const SEED: u64 = 0x9E37_79B9_7F4A_7C15;

/// The guest's loop, natively: xorshift64 with an accumulator.
pub fn native_loop(iters: u64) -> u64 {
    let mut x = SEED;
    let mut acc = 0u64;
    for _ in 0..iters {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        acc = acc.wrapping_add(x);
        x = black_box(x);
    }
    acc
}

/// Does the guest's output mention `value` (in decimal or hex)?
fn output_has(out: &str, value: u64) -> bool {
    let dec = value.to_string();
    let hex = format!("{value:x}");
    out.split(|c: char| !c.is_ascii_alphanumeric())
        .map(|t| t.trim_start_matches("0x").to_ascii_lowercase())
        .any(|t| t == dec || t == hex)
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
    let expect = native_loop(iters);
    let arg = |n: u64| vec![n.to_string()];
    let (mut full, mut empty, mut native) = (Vec::new(), Vec::new(), Vec::new());
    let mut matched = true;
    for _ in 0..runs {
        let r = child::run(&mut tt_host_command(&tt_host, &image, &arg(0)))?;
        r.check_status("compute guest (0 iterations)", 0)?;
        empty.push(r.wall);

        let r = child::run(&mut tt_host_command(&tt_host, &image, &arg(iters)))?;
        r.check_status("compute guest", 0)?;
        matched &= output_has(&r.stdout, expect);
        full.push(r.wall);

        let start = Instant::now();
        let got = black_box(native_loop(black_box(iters)));
        native.push(start.elapsed());
        assert_eq!(got, expect, "the native loop is deterministic");
    }
    if !matched {
        return Err(format!(
            "the compute guest did not print {expect} (0x{expect:x}), the native loop's \
             result for {iters} iterations: native_loop in bench/src/compute.rs no longer \
             matches guest-sdk/examples/compute"
        ));
    }
    let (t_full, t_empty, t_native) = (median(&full), median(&empty), median(&native));
    let guest_loop = t_full.saturating_sub(t_empty);
    println!("{:<40} {:>5} {:>12}", "measurement", "runs", "median");
    for (name, t) in [
        ("tt-host run compute -- ITERS (process)", t_full),
        ("tt-host run compute -- 0 (launch cost)", t_empty),
        ("guest loop = difference", guest_loop),
        ("native loop, in this process", t_native),
    ] {
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
    fn finds_the_result_in_decimal_or_hex() {
        assert!(output_has("result: 12345\n", 12345));
        assert!(output_has("acc=0x3039 after 7 iterations", 12345));
        assert!(!output_has("result: 123456", 12345));
    }

    #[test]
    fn zero_iterations_accumulate_nothing() {
        assert_eq!(native_loop(0), 0);
        assert_ne!(native_loop(1), 0);
    }
}
