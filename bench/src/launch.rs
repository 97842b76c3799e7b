//! `tt-bench launch`: launch-to-exit wall time of `tt-host run hello`
//! (default guest memory, 512 MiB), against the floor: `tt-bench
//! floor-guest`, the smallest KVM program, run as a whole process the same
//! number of times. Runs are interleaved (floor, tt-host, floor, ...) so
//! drift hits both alike.
//!
//! To show where the time goes, the same loop also runs a process that
//! does nothing (`tt-bench nop`) and tt-host with a 4-instruction image
//! ([`crate::minimal`]), and the floor's KVM steps are timed in-process.

use crate::child;
use crate::minimal::TempImage;
use crate::rawvm;
use crate::stats::{fmt, summarize};
use crate::{judge, Opts, Verdict};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// Target: median(tt-host) / median(floor).
const TARGET_RATIO: f64 = 2.0;
const DEFAULT_RUNS: usize = 30;
const MIN_RUNS: usize = 20;

/// The floor: this binary's hidden `floor-guest` subcommand.
pub fn floor_command() -> Result<Command, String> {
    let me = std::env::current_exe().map_err(|e| format!("cannot find tt-bench itself: {e}"))?;
    let mut c = Command::new(me);
    c.arg("floor-guest");
    Ok(c)
}

/// A process that does nothing: this binary's hidden `nop` subcommand.
fn nop_command() -> Result<Command, String> {
    let me = std::env::current_exe().map_err(|e| format!("cannot find tt-bench itself: {e}"))?;
    let mut c = Command::new(me);
    c.arg("nop");
    Ok(c)
}

/// `tt-host run IMAGE [-- ARGS]`.
pub fn tt_host_command(tt_host: &Path, image: &Path, guest_args: &[String]) -> Command {
    let mut c = Command::new(tt_host);
    c.arg("run").arg(image);
    if !guest_args.is_empty() {
        c.arg("--").args(guest_args);
    }
    c
}

pub fn run(o: &Opts) -> Result<Verdict, String> {
    let tt_host = crate::tt_host(o)?;
    let image = crate::image(o, "hello")?;
    let expect = o.expect_status.unwrap_or(0);
    let runs = o.runs.unwrap_or(DEFAULT_RUNS);
    if runs < MIN_RUNS {
        return Err(format!(
            "--runs {runs} is too few for a p90; use at least {MIN_RUNS}"
        ));
    }

    println!("== launch: tt-host run {} ==", image.display());
    // One untimed run of each warms the page cache and checks both work.
    for _ in 0..2 {
        child::run(&mut floor_command()?)?.check_status("floor-guest", 0)?;
        child::run(&mut tt_host_command(&tt_host, &image, &[]))?
            .check_status("tt-host run", expect)?;
    }
    let minimal = TempImage::new()?;
    child::run(&mut tt_host_command(&tt_host, minimal.path(), &[]))?
        .check_status("tt-host run (minimal image)", 0)?;
    let (mut nop, mut floor, mut host, mut min) = (vec![], vec![], vec![], vec![]);
    for _ in 0..runs {
        let n = child::run(&mut nop_command()?)?;
        n.check_status("tt-bench nop", 0)?;
        nop.push(n.wall);
        let m = child::run(&mut tt_host_command(&tt_host, minimal.path(), &[]))?;
        m.check_status("tt-host run (minimal image)", 0)?;
        min.push(m.wall);
        let f = child::run(&mut floor_command()?)?;
        f.check_status("floor-guest", 0)?;
        floor.push(f.wall);
        let h = child::run(&mut tt_host_command(&tt_host, &image, &[]))?;
        h.check_status("tt-host run", expect)?;
        host.push(h.wall);
    }
    let (n, f, h) = (summarize(&nop), summarize(&floor), summarize(&host));
    let m = summarize(&min);
    println!(
        "{:<34} {:>5} {:>10} {:>10} {:>10} {:>10}",
        "process (spawn to wait4)", "runs", "median", "p90", "min", "max"
    );
    for (name, s) in [
        ("process only: tt-bench nop", n),
        ("floor: KVM VM + 1 vCPU + hlt", f),
        ("tt-host run minimal (4 instr.)", m),
        ("tt-host run hello", h),
    ] {
        println!(
            "{:<34} {:>5} {:>10} {:>10} {:>10} {:>10}",
            name,
            s.n,
            fmt(s.median),
            fmt(s.p90),
            fmt(s.min),
            fmt(s.max)
        );
    }
    breakdown(runs)?;
    let ratio = h.median.as_secs_f64() / f.median.as_secs_f64();
    println!(
        "tt-host hello costs {} over the floor at the median: {} is tt-host's own work \
         (minimal image - floor), {} the guest's boot (hello - minimal image)",
        fmt(h.median.saturating_sub(f.median)),
        fmt(m.median.saturating_sub(f.median)),
        fmt(h.median.saturating_sub(m.median))
    );
    Ok(judge(
        "median(tt-host) / median(floor) =",
        ratio,
        TARGET_RATIO,
        "",
    ))
}

/// Where the floor's time goes inside KVM: its steps timed in this process.
fn breakdown(runs: usize) -> Result<(), String> {
    let mut steps: Vec<(&'static str, Vec<Duration>)> = Vec::new();
    for _ in 0..runs {
        for (i, (name, d)) in rawvm::floor_breakdown()?.into_iter().enumerate() {
            match steps.get_mut(i) {
                Some((_, v)) => v.push(d),
                None => steps.push((name, vec![d])),
            }
        }
    }
    println!("floor's KVM steps, in-process (medians of {runs}):");
    for (name, v) in &steps {
        println!("  {:<44} {:>10}", name, fmt(summarize(v).median));
    }
    Ok(())
}
