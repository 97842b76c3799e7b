//! `tt-bench rss`: peak resident set size of `tt-host run hello`,
//! beside the floor program's.
//!
//! Two figures per process: `ru_maxrss` from `wait4`, which by Linux's
//! exec semantics is at least tt-bench's own RSS at spawn (an upper bound),
//! and `VmHWM` read at the child's exit, which counts the exec'd program
//! only. The target is judged on `ru_maxrss`, the larger.

use crate::child::{self, ChildRun};
use crate::launch::{floor_command, tt_host_command};
use crate::{judge, Opts, Verdict};

/// Target: peak RSS of tt-host running hello, KiB (16 MiB).
const TARGET_KIB: u64 = 16 * 1024;
const DEFAULT_RUNS: usize = 5;

#[derive(Default)]
struct Peak {
    maxrss: u64,
    hwm: u64,
}

impl Peak {
    fn add(&mut self, r: &ChildRun) {
        self.maxrss = self.maxrss.max(r.maxrss_kib);
        self.hwm = self.hwm.max(r.hwm_kib.unwrap_or(0));
    }
}

fn self_maxrss_kib() -> u64 {
    // SAFETY: rusage is plain old data; all-zero is a valid value.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is valid for writes.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    u.ru_maxrss.max(0) as u64
}

pub fn run(o: &Opts) -> Result<Verdict, String> {
    let tt_host = crate::tt_host(o)?;
    let image = crate::image(o, "hello")?;
    let expect = o.expect_status.unwrap_or(0);
    let runs = o.runs.unwrap_or(DEFAULT_RUNS).max(1);

    println!("== rss: peak RSS of tt-host run {} ==", image.display());
    let (mut floor, mut host) = (Peak::default(), Peak::default());
    for _ in 0..runs {
        for trace in [false, true] {
            let run = if trace { child::run_hwm } else { child::run };
            let f = run(&mut floor_command()?)?;
            f.check_status("floor-guest", 0)?;
            floor.add(&f);
            let h = run(&mut tt_host_command(&tt_host, &image, &[]))?;
            h.check_status("tt-host run", expect)?;
            host.add(&h);
        }
    }
    println!(
        "{:<34} {:>5} {:>16} {:>16}",
        "process (max over runs)", "runs", "ru_maxrss", "VmHWM at exit"
    );
    for (name, p) in [
        ("floor: KVM VM + 1 vCPU + hlt", &floor),
        ("tt-host run hello (512 MiB guest)", &host),
    ] {
        println!(
            "{:<34} {:>5} {:>12} KiB {:>12} KiB",
            name, runs, p.maxrss, p.hwm
        );
    }
    println!(
        "(for scale: tt-bench's own peak RSS, not part of the figures above, is {} KiB)",
        self_maxrss_kib()
    );
    Ok(judge(
        "peak RSS (ru_maxrss) =",
        host.maxrss as f64 / 1024.0,
        (TARGET_KIB / 1024) as f64,
        " MiB",
    ))
}
