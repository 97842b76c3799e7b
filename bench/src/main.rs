//! tt-bench: performance benchmarks of tt-host.
//!
//! Every benchmark compares tt-host against a baseline measured in the same
//! run, so the ratio means something on any machine:
//!
//! - `launch`: launch-to-exit wall time of `tt-host run` for the hello
//!   guest, against the smallest possible KVM program (`floor-guest`, a
//!   hidden subcommand of this binary that boots a lone `hlt`), both run as
//!   whole processes, interleaved. Target: ratio of medians <= 2.0.
//! - `compute`: guest CPU speed, the `compute` example's loop against the
//!   same loop run natively here. Target: ratio <= 1.5.
//! - `hypercall`: the raw KVM exit round trip at CPL 0 (a real-mode guest
//!   looping on `out`), and, if a guest SDK `hcall` example is built, the
//!   cost of one tt-host hypercall from a tt guest, with and without the
//!   seccomp filter (`--no-seccomp`). Reported, no target.
//! - `rss`: peak RSS of `tt-host run` for hello (`wait4`'s `ru_maxrss`).
//!   Target: <= 16 MiB.
//! - `blk`: guest disks on the journal: durable 4 KiB writes at queue
//!   depth 1 from one guest and from 8 at once, against host threads
//!   doing `pwrite`+`fdatasync`; reads of unapplied against applied data;
//!   where a write's time goes (see [`blk`]). Targets: >= 0.8x, >= 0.8x,
//!   <= 2x. Not part of `all` (it writes about 1 GiB to the disk).
//! - `vblk`: virtio-blk (issue 15): durable 4 KiB random writes at queue
//!   depth 32 against `pwrite`+`fdatasync` per 4 KiB (>= 10x) and against
//!   the hvt path (>= 5x), with the batching ceilings; exits per request
//!   (< 0.1); 64 KiB sequential reads at depth 8 against a host `pread`
//!   loop (>= 0.5x). See [`vblk`]. Not part of `all`.
//! - `cpl3`: the CPL 3 monitor (issue 16): Solo5 test_blk against
//!   solo5-hvt (<= 1/16), a CPL 0-style loop image against the same loop
//!   natively (<= 1.5x), Solo5 hello launch against solo5-hvt (<= 0.5x).
//!   See [`cpl3`]. Targets 1 and 3 need `$SOLO5_DIR`. Not part of `all`.
//! - `daemon`: tt-host daemon (issue 18): its own time per create against
//!   one fdatasync (<= 1 ms beyond it), create-to-first-console-line
//!   beside `tt-host run`'s, its RSS and CPU with 200 idle unikernels
//!   (< 64 MiB, < 1%), and `tt-host list` with them (< 20 ms). See
//!   [`daemon`]. Not part of `all`.
//! - `migrate`: snapshots and live migration (issue 20) of a 64 MiB guest:
//!   snapshot and restore beside a copy + fdatasync of its memory file and
//!   a cold boot; migration downtime and total over TCP (idle: < 10 ms,
//!   < 1 s; dirtying 10 MiB/s: < 50 ms) and over a Unix socket (memfd:
//!   < 5 ms), beside a pause + resume round trip and 64 MiB over loopback
//!   TCP. See [`migrate`]. Not part of `all`.
//! - `images`: a runtime image from a 1 GiB template (issue 21):
//!   `clone_file` (reflink, else copy; it says which) beside
//!   `std::fs::copy` and a read/write loop, on the repository's file
//!   system and on /dev/shm. Reported, no target. See [`images`]. Not
//!   part of `all` (it writes 1 GiB in each place).
//! - `envs`: an environment of 10 unikernels with port forwards made in
//!   one `tt-host env create` (issue 21), to all up, against 10
//!   sequential `tt-host create` and against 10 creates joining an empty
//!   environment. Reported, no target. Needs root and nft; runs in a
//!   network namespace of its own. See [`envs`]. Not part of `all`.
//! - `cluster`: admission through a 3-member etcd cluster (issue 22):
//!   admit + release latency from one node and throughput of 3 nodes,
//!   against the single-host state directory; conflicts per admission
//!   with 1 to 16 concurrent creators on one subtree; the same etcd on
//!   tmpfs, to show the disk's share. Reported, no target. Needs root and
//!   etcd; runs in a network namespace of its own. See [`cluster`]. Not
//!   part of `all`.
//!
//! Each prints a table and its verdict. Only with `--check` does a missed
//! target make the exit status non-zero (2); errors always exit 1.
//! docs/BENCHMARKS.md records the figures and how to reproduce them.

mod blk;
mod child;
mod cluster;
mod compute;
mod cpl3;
mod daemon;
mod envs;
mod hypercall;
mod images;
mod launch;
mod migrate;
mod minimal;
mod rawvm;
mod rss;
mod stats;
mod vblk;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

const USAGE: &str = "\
tt-bench: performance benchmarks of tt-host, each against a same-run baseline

usage:
  tt-bench launch    [--runs N] [--tt-host PATH] [--image PATH] [--expect-status S] [--check]
  tt-bench compute   [--iters N] [--runs N] [--tt-host PATH] [--image PATH] [--check]
  tt-bench hypercall [--iters N] [--runs N] [--tt-host PATH] [--image PATH]
  tt-bench rss       [--runs N] [--tt-host PATH] [--image PATH] [--expect-status S] [--check]
  tt-bench blk       [--runs ROUNDS] [--iters WRITES] [--tt-host PATH] [--image PATH]
                     [--compare TT_HOST] [--check]
  tt-bench vblk      [--runs ROUNDS] [--iters WRITES] [--tt-host PATH] [--image PATH] [--check]
  tt-bench cpl3      [--runs ROUNDS] [--iters LOOP_ITERS] [--tt-host PATH] [--check]
  tt-bench daemon    [--runs N] [--iters IDLE_UNIKERNELS] [--tt-host PATH] [--image PATH] [--check]
  tt-bench migrate   [--runs N] [--tt-host PATH] [--image UNIT_IMAGE] [--check]
  tt-bench images    [--runs N]
  tt-bench envs      [--runs N] [--tt-host PATH] [--image NET_IMAGE]
  tt-bench cluster   [--iters SEQUENTIAL_OPS]
  tt-bench all       [--check]

defaults (relative to the workspace root):
  --tt-host target/release/tt-host
  --image   guest-sdk/target/release/{hello,compute,hcall,blkbench,vblk,unit,net}
blk puts its files in $TT_BLK_BENCH_DIR, default target/tt-blk-bench (removed at the end);
vblk in $TT_VBLK_BENCH_DIR, default target/tt-vblk-bench (also needs blkbench built).
cpl3 in $TT_CPL3_BENCH_DIR, default target/tt-cpl3-bench; its Solo5 targets need
$SOLO5_DIR, a Solo5 tree built with ./configure.sh && make (else they are skipped).
migrate in $TT_MIGRATE_BENCH_DIR, default target/tt-migrate-bench (also needs counter built).
images in $TT_IMAGES_BENCH_DIR, default target/tt-images-bench, and in /dev/shm.
envs in $TT_ENVS_BENCH_DIR, default target/tt-envs-bench; it needs root and nft, and
runs in a network namespace of its own (the machine's network is not touched).
cluster runs 3 etcd members (/usr/bin/etcd) in a network namespace of its own (root),
their data in $TT_CLUSTER_BENCH_DIR, default target/tt-cluster-bench, then in /dev/shm.
  --expect-status 0 (the guest's exit status; a run that ends otherwise is an error)

--check: exit with status 2 if a target is missed (default: only report).";

/// Command-line options; which ones a subcommand takes is checked by `parse`.
#[derive(Default)]
pub struct Opts {
    pub runs: Option<usize>,
    pub iters: Option<u64>,
    pub tt_host: Option<PathBuf>,
    pub image: Option<PathBuf>,
    /// `blk`: a second tt-host binary whose single-guest writes run in
    /// every round too (to measure a change against the same baseline).
    pub compare: Option<PathBuf>,
    pub expect_status: Option<i32>,
    pub check: bool,
}

fn parse(args: &[String], allowed: &[&str]) -> Result<Opts, String> {
    let mut o = Opts::default();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v.to_string())),
            _ => (arg.as_str(), None),
        };
        if !allowed.contains(&name) {
            return Err(format!("unexpected argument '{arg}'\n\n{USAGE}"));
        }
        if name == "--check" {
            o.check = true;
            continue;
        }
        let value = match inline {
            Some(v) => v,
            None => it
                .next()
                .cloned()
                .ok_or_else(|| format!("{name} needs a value"))?,
        };
        let num = |what: &str| format!("{name} takes {what}, not '{value}'");
        match name {
            "--runs" => o.runs = Some(value.parse().map_err(|_| num("a count"))?),
            "--iters" => o.iters = Some(value.parse().map_err(|_| num("a count"))?),
            "--expect-status" => {
                o.expect_status = Some(value.parse().map_err(|_| num("an exit status"))?)
            }
            "--tt-host" => o.tt_host = Some(value.into()),
            "--image" => o.image = Some(value.into()),
            "--compare" => o.compare = Some(value.into()),
            _ => unreachable!("every allowed option is handled"),
        }
    }
    Ok(o)
}

/// The workspace root: this crate's parent directory.
pub fn root() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    p.canonicalize().unwrap_or(p)
}

/// The tt-host binary: `--tt-host`, or the workspace's release build.
pub fn tt_host(o: &Opts) -> Result<PathBuf, String> {
    let p = o
        .tt_host
        .clone()
        .unwrap_or_else(|| root().join("target/release/tt-host"));
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!(
            "tt-host binary not found at {}\n  build it with: cargo build --release -p tt-host\n  \
             (or point --tt-host at one)",
            p.display()
        ))
    }
}

/// Path of the guest SDK example `name` as built by `cargo build --release`.
pub fn default_image(name: &str) -> PathBuf {
    root().join("guest-sdk/target/release").join(name)
}

/// The guest image: `--image`, or the guest SDK example `name`.
pub fn image(o: &Opts, name: &str) -> Result<PathBuf, String> {
    let p = o.image.clone().unwrap_or_else(|| default_image(name));
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!(
            "guest image '{name}' not found at {}\n  build the guest SDK examples with: \
             cd guest-sdk && cargo build --release\n  (or point --image at an hvt image)",
            p.display()
        ))
    }
}

/// The result of one benchmark against its target.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Met,
    Missed,
    /// The benchmark has no target.
    Reported,
}

/// Print "target: VALUE <= LIMIT: met|MISSED by X%" and return the verdict.
pub fn judge(what: &str, value: f64, limit: f64, unit: &str) -> Verdict {
    if value <= limit {
        println!("target: {what} {value:.2}{unit} <= {limit}{unit}: met");
        Verdict::Met
    } else {
        let over = (value / limit - 1.0) * 100.0;
        println!("target: {what} {value:.2}{unit} <= {limit}{unit}: MISSED by {over:.0}%");
        Verdict::Missed
    }
}

/// Print "target: VALUE >= MIN: met|MISSED by X%" (a ratio, `x`) and
/// return the verdict: the other side of [`judge`].
pub fn at_least(what: &str, value: f64, min: f64) -> Verdict {
    if value >= min {
        println!("target: {what} {value:.2}x >= {min}x: met");
        Verdict::Met
    } else {
        let under = (1.0 - value / min) * 100.0;
        println!("target: {what} {value:.2}x >= {min}x: MISSED by {under:.0}%");
        Verdict::Missed
    }
}

/// `xs` with `prec` decimals, space-separated (per-round figures).
pub fn list(xs: &[f64], prec: usize) -> String {
    xs.iter()
        .map(|x| format!("{x:.prec$}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// One line on the machine's state: the figures depend on it.
fn machine() {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    println!(
        "machine: {cores} cores, load average {} (other load makes the figures noisy)",
        load.join(" ")
    );
}

fn dispatch(args: &[String]) -> Result<Vec<Verdict>, String> {
    const PATHS: [&str; 2] = ["--tt-host", "--image"];
    let cmd = args.first().map(String::as_str);
    let rest = args.get(1..).unwrap_or_default();
    let with = |extra: &[&'static str]| -> Vec<&'static str> {
        let mut v = PATHS.to_vec();
        v.extend_from_slice(extra);
        v
    };
    if matches!(
        cmd,
        Some(
            "launch"
                | "compute"
                | "hypercall"
                | "rss"
                | "blk"
                | "vblk"
                | "cpl3"
                | "daemon"
                | "migrate"
                | "images"
                | "envs"
                | "cluster"
                | "all"
        )
    ) {
        machine();
    }
    let (verdicts, check) = match cmd {
        Some("launch") => {
            let o = parse(rest, &with(&["--runs", "--expect-status", "--check"]))?;
            (vec![launch::run(&o)?], o.check)
        }
        Some("compute") => {
            let o = parse(rest, &with(&["--iters", "--runs", "--check"]))?;
            (vec![compute::run(&o)?], o.check)
        }
        Some("hypercall") => {
            let o = parse(rest, &with(&["--iters", "--runs"]))?;
            (vec![hypercall::run(&o)?], o.check)
        }
        Some("rss") => {
            let o = parse(rest, &with(&["--runs", "--expect-status", "--check"]))?;
            (vec![rss::run(&o)?], o.check)
        }
        Some("blk") => {
            let o = parse(rest, &with(&["--runs", "--iters", "--compare", "--check"]))?;
            (blk::run(&o)?, o.check)
        }
        Some("vblk") => {
            let o = parse(rest, &with(&["--runs", "--iters", "--check"]))?;
            (vblk::run(&o)?, o.check)
        }
        Some("cpl3") => {
            let o = parse(rest, &["--tt-host", "--runs", "--iters", "--check"])?;
            (cpl3::run(&o)?, o.check)
        }
        Some("daemon") => {
            let o = parse(rest, &with(&["--runs", "--iters", "--check"]))?;
            (daemon::run(&o)?, o.check)
        }
        Some("migrate") => {
            let o = parse(rest, &with(&["--runs", "--check"]))?;
            (migrate::run(&o)?, o.check)
        }
        Some("images") => {
            let o = parse(rest, &["--runs"])?;
            (images::run(&o)?, o.check)
        }
        Some("envs") => {
            let o = parse(rest, &with(&["--runs"]))?;
            (envs::run(&o)?, o.check)
        }
        Some("cluster") => {
            let o = parse(rest, &["--iters"])?;
            (cluster::run(&o)?, o.check)
        }
        Some("all") => {
            let o = parse(rest, &["--check"])?;
            // Fail before spending minutes if something is not built.
            tt_host(&o)?;
            for name in ["hello", "compute"] {
                image(&o, name)?;
            }
            let mut v = Vec::new();
            v.push(launch::run(&o)?);
            println!();
            v.push(compute::run(&o)?);
            println!();
            v.push(hypercall::run(&o)?);
            println!();
            v.push(rss::run(&o)?);
            (v, o.check)
        }
        Some("floor-guest") => {
            parse(rest, &[])?;
            rawvm::floor_guest()?;
            (vec![], false)
        }
        Some("nop") => {
            parse(rest, &[])?;
            (vec![], false)
        }
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            (vec![], false)
        }
        None => return Err(USAGE.to_string()),
        Some(other) => return Err(format!("unknown command '{other}'\n\n{USAGE}")),
    };
    Ok(if check { verdicts } else { vec![] })
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match dispatch(&args) {
        Ok(v) if v.contains(&Verdict::Missed) => {
            eprintln!("tt-bench: a target was missed (--check)");
            ExitCode::from(2)
        }
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tt-bench: {e}");
            ExitCode::from(1)
        }
    }
}
