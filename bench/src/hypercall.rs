//! `tt-bench hypercall`: what one guest-to-host round trip costs.
//!
//! Always measured: the raw KVM exit round trip at CPL 0, with a real-mode
//! guest looping `out dx, eax` to port 0x501 (see [`crate::rawvm`]), minus
//! the same loop without the `out`. That is the floor any hvt hypercall
//! pays on this host.
//!
//! If the guest SDK's `hcall` example is built (it makes ITERS WALLTIME
//! hypercalls: `tt-host run hcall -- ITERS`), also the full tt-host
//! hypercall: (wall time with ITERS - wall time with 0) / ITERS; and the
//! same with `--no-seccomp`, in the same rounds, interleaved: the
//! difference is what the seccomp filter (issue 17) costs per hypercall
//! (each round trip is one `KVM_RUN` ioctl through the filter).
//!
//! Always measured too, because a few tens of nanoseconds drown in the
//! whole-process figures: the filter's cost per system call, on a thread
//! of tt-bench that times `ioctl(-1, KVM_RUN)` (EBADF at once, after the
//! filter has allowed it) without the filter and then with tt-host's own
//! filter installed on that thread only.

use crate::child;
use crate::rawvm;
use crate::stats::{fmt, summarize};
use crate::{Opts, Verdict};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const DEFAULT_ITERS: u64 = 20_000;
const DEFAULT_RUNS: usize = 5;

/// `tt-host run [--no-seccomp] IMAGE -- ITERS`.
fn hcall_command(tt_host: &Path, image: &Path, iters: u64, seccomp: bool) -> Command {
    let mut c = Command::new(tt_host);
    c.arg("run");
    if !seccomp {
        c.arg("--no-seccomp");
    }
    c.arg(image).arg("--").arg(iters.to_string());
    c
}

/// Time `n` calls of `ioctl(-1, KVM_RUN)` on a new thread, first without
/// and then under tt-host's seccomp filter (that thread only).
fn filter_cost(n: u64) -> Result<(Duration, Duration), String> {
    let kvm_run = tt_host::sandbox::allowed_ioctls()[0];
    let time = move || {
        let t = std::time::Instant::now();
        for _ in 0..n {
            // SAFETY: fd -1 is never valid: the call fails with EBADF
            // and touches no memory.
            unsafe { libc::ioctl(-1, kvm_run) };
        }
        t.elapsed()
    };
    std::thread::spawn(move || {
        let without = time();
        tt_host::sandbox::confine_this_thread().map_err(|e| e.to_string())?;
        Ok((without, time()))
    })
    .join()
    .map_err(|_| "the filter-cost thread panicked".to_string())?
}

fn per(d: Duration, n: u64) -> f64 {
    d.as_nanos() as f64 / n as f64
}

pub fn run(o: &Opts) -> Result<Verdict, String> {
    let iters = o.iters.unwrap_or(DEFAULT_ITERS);
    let runs = o.runs.unwrap_or(DEFAULT_RUNS).max(1);
    let raw_iters = u32::try_from(iters)
        .ok()
        .filter(|&n| n > 0)
        .ok_or("--iters must be between 1 and 2^32-1")?;

    println!("== hypercall: guest-to-host round trip, {iters} per run ==");
    let (mut outs, mut nops) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let s = rawvm::exit_round_trip(raw_iters)?;
        outs.push(s.out_loop);
        nops.push(s.nop_loop);
    }
    let (out, nop) = (summarize(&outs).median, summarize(&nops).median);
    let raw = per(out.saturating_sub(nop), iters);
    println!(
        "{:<52} {:>12} {:>12}",
        "measurement (medians)", "loop", "per iter"
    );
    println!(
        "{:<52} {:>12} {:>10.0} ns",
        "raw KVM: real-mode CPL-0 loop with out to 0x501",
        fmt(out),
        per(out, iters)
    );
    println!(
        "{:<52} {:>12} {:>10.0} ns",
        "raw KVM: same loop without the out (3 instr.)",
        fmt(nop),
        per(nop, iters)
    );
    println!(
        "{:<52} {:>12} {:>10.0} ns",
        "=> raw KVM exit round trip at CPL 0 (difference)", "", raw
    );

    let (mut plain, mut filtered) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let (p, f) = filter_cost(iters * 10)?;
        plain.push(p);
        filtered.push(f);
    }
    let (p, f) = (summarize(&plain).median, summarize(&filtered).median);
    println!(
        "{:<52} {:>12} {:>10.0} ns",
        "ioctl(-1, KVM_RUN), no filter (x10 iters)",
        fmt(p),
        per(p, iters * 10)
    );
    println!(
        "{:<52} {:>12} {:>10.0} ns",
        "the same under tt-host's seccomp filter",
        fmt(f),
        per(f, iters * 10)
    );
    println!(
        "=> seccomp filter cost per system call: {:.0} ns",
        per(f, iters * 10) - per(p, iters * 10)
    );

    let hcall = o
        .image
        .clone()
        .unwrap_or_else(|| crate::default_image("hcall"));
    if !hcall.is_file() {
        println!(
            "(no tt guest hypercall figure: {} is not built; it needs the guest SDK's \
             hcall example)",
            hcall.display()
        );
        return Ok(Verdict::Reported);
    }
    let tt_host = crate::tt_host(o)?;
    // Per round, interleaved: with the filter (the default) and without.
    let (mut full, mut empty) = (Vec::new(), Vec::new());
    let (mut full_off, mut empty_off) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        for seccomp in [true, false] {
            let (f, e) = if seccomp {
                (&mut full, &mut empty)
            } else {
                (&mut full_off, &mut empty_off)
            };
            let r = child::run(&mut hcall_command(&tt_host, &hcall, 0, seccomp))?;
            r.check_status("hcall guest (0 iterations)", 0)?;
            e.push(r.wall);
            let r = child::run(&mut hcall_command(&tt_host, &hcall, iters, seccomp))?;
            r.check_status("hcall guest", 0)?;
            f.push(r.wall);
        }
    }
    let (f, e) = (summarize(&full).median, summarize(&empty).median);
    let tt = per(f.saturating_sub(e), iters);
    println!(
        "{:<52} {:>12} {:>10.0} ns",
        "tt-host run hcall -- ITERS, minus -- 0 (WALLTIME)",
        fmt(f.saturating_sub(e)),
        tt
    );
    let (fo, eo) = (summarize(&full_off).median, summarize(&empty_off).median);
    let off = per(fo.saturating_sub(eo), iters);
    println!(
        "{:<52} {:>12} {:>10.0} ns",
        "the same with --no-seccomp (no filter)",
        fmt(fo.saturating_sub(eo)),
        off
    );
    println!(
        "tt-host WALLTIME hypercall = {:.2} x the raw CPL-0 exit round trip",
        tt / raw
    );
    println!(
        "seccomp filter: {:+.0} ns per hypercall ({:+.1}%), launch with - without: {:+.2} ms",
        tt - off,
        (tt / off - 1.0) * 100.0,
        (e.as_secs_f64() - eo.as_secs_f64()) * 1e3
    );
    Ok(Verdict::Reported)
}
