//! `tt-bench blk`: guest disks on the journal (the hvt block device).
//!
//! The guest SDK's `blkbench` example times its own requests (4 KiB, queue
//! depth 1, see its doc), so launch and boot are not in its figures. Each
//! host baseline times just its loop. Files: `$TT_BLK_BENCH_DIR`, default
//! `<target>/tt-blk-bench` (the repository's file system), holding 8
//! images, 8 baseline files (all zero-filled and synced first: no block
//! allocation in the timings) and tt-host's state directory, where the
//! journals' rings go; removed at the end.
//!
//! Interleaved rounds (the disk's speed drifts 2-10x within minutes): each
//! round runs, in turn, the 1-thread baseline, one guest writing (journal),
//! the same with `--block-durability=none`, the 8-thread baseline, 8
//! guests writing at once, and the two read modes. A round's write rates
//! are divided by the mean of the same baseline measured just before it
//! and at the start of the next round (a last baseline closes the final
//! round); the verdicts use the median over the rounds.
//!
//! 1. one guest's durable writes/s >= 0.8 x `pwrite`+`fdatasync` per
//!    4 KiB from one host thread;
//! 2. 8 guests' aggregate durable writes/s >= 0.8 x 8 host threads, each
//!    on its own file;
//! 3. a read of written but unapplied data (served from the journal's
//!    overlay) <= 2 x the time of the same read once applied;
//! 4. for information: `--block-durability=none` (page cache, not
//!    durable) against the same baseline;
//! 5. where a durable write's time goes: exits (`perf stat` on KVM's
//!    tracepoints, if perf can), the ring's commit and the image's
//!    perform (`strace -T` of one guest run, if strace is installed).

use crate::child;
use crate::{at_least, list, Opts, Verdict};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Barrier;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tt_benchutil::{bench_dir, median, print_setting, zeroed_file};

const BS: u64 = 4096;
const FILE_BYTES: u64 = 32 << 20;
const GUESTS: usize = 8;
const DEFAULT_ROUNDS: usize = 7;
/// Writes per single-guest run and per single-thread baseline.
const DEFAULT_WRITES: u64 = 1000;
/// Blocks written and read back by each read run.
const READS: u64 = 500;
/// How long the 8 guests (and the 8 baseline threads) write.
const WINDOW: Duration = Duration::from_millis(1500);
/// Time given to 8 tt-hosts to start before their common start time.
const START_MARGIN: Duration = Duration::from_millis(1500);
const WRITE_TARGET: f64 = 0.8;
/// Rounds of the breakdown's interleaved pass.
const BREAKDOWN_ROUNDS: usize = 5;
const READ_TARGET: f64 = 2.0;
const VAR: &str = "TT_BLK_BENCH_DIR";

/// One line of the guest: `blkbench: MODE count=C ns=E wall_start=S wall_end=T`.
#[derive(Debug, Clone, Copy)]
struct GuestRun {
    count: u64,
    ns: u64,
    wall_start: u64,
    wall_end: u64,
    /// tt-host's CPU time for the whole run (boot included).
    cpu: Duration,
}

impl GuestRun {
    /// tt-host's CPU time per request, µs.
    fn cpu_us(&self) -> f64 {
        self.cpu.as_secs_f64() * 1e6 / self.count.max(1) as f64
    }
    fn rate(&self) -> f64 {
        self.count as f64 / (self.ns as f64 / 1e9)
    }
    fn per_op_us(&self) -> f64 {
        self.ns as f64 / self.count.max(1) as f64 / 1e3
    }
}

fn parse_line(out: &str, mode: &str) -> Option<GuestRun> {
    let line = out.lines().find_map(|l| {
        l.strip_prefix("blkbench: ")?
            .strip_prefix(mode)?
            .strip_prefix(' ')
    })?;
    let field = |k: &str| -> Option<u64> {
        line.split(' ')
            .find_map(|w| w.strip_prefix(k)?.strip_prefix('='))?
            .parse()
            .ok()
    };
    Some(GuestRun {
        count: field("count")?,
        ns: field("ns")?,
        wall_start: field("wall_start")?,
        wall_end: field("wall_end")?,
        cpu: Duration::ZERO,
    })
}

struct Setup {
    tt_host: PathBuf,
    /// `--compare`: another tt-host for the single-guest writes.
    compare: Option<PathBuf>,
    image: PathBuf,
    dir: PathBuf,
    state: PathBuf,
    images: Vec<PathBuf>,
    bases: Vec<File>,
}

impl Setup {
    fn command(&self, disk: usize, none: bool, args: &[String]) -> Command {
        self.command_with(&self.tt_host, disk, none, args)
    }

    fn command_with(&self, tt_host: &Path, disk: usize, none: bool, args: &[String]) -> Command {
        let mut c = Command::new(tt_host);
        c.arg("run")
            .arg(format!("--block:storage={}", self.images[disk].display()))
            .arg(format!("--state-dir={}", self.state.display()));
        if none {
            c.arg("--block-durability=none");
        }
        c.arg(&self.image).arg("--").args(args);
        c
    }

    fn guest(
        &self,
        disk: usize,
        none: bool,
        mode: &str,
        args: &[String],
    ) -> Result<GuestRun, String> {
        self.guest_with(&self.tt_host, disk, none, mode, args)
    }

    fn guest_with(
        &self,
        tt_host: &Path,
        disk: usize,
        none: bool,
        mode: &str,
        args: &[String],
    ) -> Result<GuestRun, String> {
        let r = child::run(&mut self.command_with(tt_host, disk, none, args))?;
        r.check_status(&format!("blkbench {mode}"), 0)?;
        let mut g = parse_line(&r.stdout, mode).ok_or_else(|| {
            format!(
                "blkbench {mode} printed no result line\n  stdout: {}\n  stderr: {}",
                r.stdout.trim(),
                r.stderr.trim()
            )
        })?;
        g.cpu = r.cpu;
        Ok(g)
    }

    fn write(&self, disk: usize, none: bool, n: u64) -> Result<GuestRun, String> {
        self.guest(
            disk,
            none,
            "write",
            &["write".into(), n.to_string(), format!("seed={}", disk + 1)],
        )
    }

    /// 8 guests, each on its own image, writing from a common start time
    /// for [`WINDOW`]. Returns aggregate writes/s over the window from
    /// the first start to the last end, the latest start's delay, and the
    /// 8 tt-hosts' CPU time per write (µs).
    fn write8(&self) -> Result<(f64, Duration, f64, f64), String> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let at = (now + START_MARGIN).as_nanos() as u64;
        let until = at + WINDOW.as_nanos() as u64;
        // Machine-wide busy cores over the middle of the window (all
        // guests writing), sampled by one more thread.
        let busy = std::sync::Mutex::new(0.0);
        let runs: Vec<Result<GuestRun, String>> = std::thread::scope(|s| {
            s.spawn(|| {
                let sleep_until = |ns: u64| {
                    let now = SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .unwrap_or_default()
                        .as_nanos() as u64;
                    std::thread::sleep(Duration::from_nanos(ns.saturating_sub(now)));
                };
                let quarter = (until - at) / 4;
                sleep_until(at + quarter);
                let b = cpu_now().0;
                let t = Instant::now();
                sleep_until(until - quarter);
                if let Ok(mut x) = busy.lock() {
                    *x = (cpu_now().0 - b) / t.elapsed().as_secs_f64();
                }
            });
            let hs: Vec<_> = (0..GUESTS)
                .map(|d| {
                    s.spawn(move || {
                        let args = [
                            "write".into(),
                            u64::MAX.to_string(),
                            format!("seed={}", d + 1),
                            format!("at={at}"),
                            format!("until={until}"),
                        ];
                        self.guest(d, false, "write", &args)
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err("guest thread panicked".into()))
                })
                .collect()
        });
        let busy = busy.lock().map(|b| *b).unwrap_or(0.0);
        let runs = runs.into_iter().collect::<Result<Vec<_>, _>>()?;
        let first = runs.iter().map(|r| r.wall_start).min().unwrap_or(at);
        let last = runs.iter().map(|r| r.wall_end).max().unwrap_or(until);
        let late = runs
            .iter()
            .map(|r| r.wall_start)
            .max()
            .unwrap_or(at)
            .saturating_sub(at);
        let total: u64 = runs.iter().map(|r| r.count).sum();
        let secs = last.saturating_sub(first) as f64 / 1e9;
        let cpu: f64 = runs.iter().map(|r| r.cpu.as_secs_f64()).sum();
        Ok((
            total as f64 / secs,
            Duration::from_nanos(late),
            cpu * 1e6 / total.max(1) as f64,
            busy,
        ))
    }
}

/// splitmix64, as the guest uses it.
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The host baseline: 4 KiB `pwrite` at a random 4 KiB-aligned offset,
/// then `fdatasync`, until `n` are done or `until` passes. Returns
/// (count, time of the loop).
fn host_loop(
    f: &File,
    seed: u64,
    n: u64,
    until: Option<Instant>,
) -> Result<(u64, Duration), String> {
    let mut rng = seed;
    let buf = vec![0x5au8; BS as usize];
    let blocks = FILE_BYTES / BS;
    let t = Instant::now();
    let mut done = 0;
    while done < n && until.is_none_or(|u| Instant::now() < u) {
        let off = next(&mut rng) % blocks * BS;
        f.write_all_at(&buf, off)
            .and_then(|()| f.sync_data())
            .map_err(|e| format!("baseline write failed: {e}"))?;
        done += 1;
    }
    Ok((done, t.elapsed()))
}

/// The machine's busy CPU time so far (all cores, from /proc/stat), in
/// seconds, and this process's own CPU time (user + system).
fn cpu_now() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|t| t.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let idle = ticks.get(3).copied().unwrap_or(0.0) + ticks.get(4).copied().unwrap_or(0.0);
    let busy = ticks.iter().take(8).sum::<f64>() - idle;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    // SAFETY: rusage is plain old data; all-zero is a valid value, and
    // getrusage only writes into it.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is valid for writes.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (busy / hz, tv(u.ru_utime) + tv(u.ru_stime))
}

/// Machine-wide busy cores and this process's CPU time per op (µs)
/// while `f` ran `ops` operations in `secs`.
struct CpuUse {
    busy_cores: f64,
    own_us: f64,
}

fn cpu_use(before: (f64, f64), secs: f64, ops: f64) -> CpuUse {
    let after = cpu_now();
    CpuUse {
        busy_cores: (after.0 - before.0) / secs.max(1e-9),
        own_us: (after.1 - before.1) * 1e6 / ops.max(1.0),
    }
}

fn base1(s: &Setup, n: u64) -> Result<f64, String> {
    let (c, d) = host_loop(&s.bases[0], 1, n, None)?;
    Ok(c as f64 / d.as_secs_f64())
}

/// 8 threads, each on its own file, for [`WINDOW`]: aggregate ops/s, and
/// the CPU used meanwhile.
fn base8(s: &Setup) -> Result<(f64, CpuUse), String> {
    let start = Barrier::new(GUESTS);
    let before = cpu_now();
    let runs: Vec<Result<(u64, Duration), String>> = std::thread::scope(|sc| {
        let hs: Vec<_> = s
            .bases
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let start = &start;
                sc.spawn(move || {
                    start.wait();
                    host_loop(f, i as u64 + 1, u64::MAX, Some(Instant::now() + WINDOW))
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("baseline thread panicked".into()))
            })
            .collect()
    });
    let runs = runs.into_iter().collect::<Result<Vec<_>, _>>()?;
    let total: u64 = runs.iter().map(|r| r.0).sum();
    let secs = runs
        .iter()
        .map(|r| r.1)
        .max()
        .unwrap_or(WINDOW)
        .as_secs_f64();
    Ok((total as f64 / secs, cpu_use(before, secs, total as f64)))
}

fn setup(o: &Opts) -> Result<Setup, String> {
    let tt_host = crate::tt_host(o)?;
    let image = crate::image(o, "blkbench")?;
    let dir = bench_dir(VAR, "tt-blk-bench");
    let _ = std::fs::remove_dir_all(&dir);
    let state = dir.join("state");
    std::fs::create_dir_all(&state)
        .map_err(|e| format!("cannot create {}: {e}", state.display()))?;
    print_setting("tt-bench blk", &dir, VAR);
    let mut images = Vec::new();
    let mut bases = Vec::new();
    for i in 0..GUESTS {
        let p = dir.join(format!("image{i}"));
        zeroed_file(&p, FILE_BYTES);
        images.push(p);
        bases.push(zeroed_file(&dir.join(format!("baseline{i}")), FILE_BYTES));
    }
    let compare = o.compare.clone();
    if let Some(c) = &compare {
        if !c.is_file() {
            return Err(format!("--compare {}: no such file", c.display()));
        }
    }
    Ok(Setup {
        tt_host,
        compare,
        image,
        dir,
        state,
        images,
        bases,
    })
}

/// Per-round figures.
#[derive(Default)]
struct Rounds {
    b1: Vec<f64>,
    b8: Vec<f64>,
    g1: Vec<f64>,
    none: Vec<f64>,
    g8: Vec<f64>,
    late: Vec<Duration>,
    g1_cpu: Vec<f64>,
    g8_cpu: Vec<f64>,
    /// `--compare`'s single-guest writes/s.
    alt: Vec<f64>,
    /// Busy cores (machine-wide) while 8 guests / 8 baseline threads ran.
    g8_busy: Vec<f64>,
    b8_busy: Vec<f64>,
    /// The 8 baseline threads' own CPU time per op, µs.
    b8_cpu: Vec<f64>,
    unapplied_us: Vec<f64>,
    applied_us: Vec<f64>,
}

fn ratios(xs: &[f64], base: &[f64]) -> Vec<f64> {
    xs.iter()
        .enumerate()
        .map(|(i, x)| x / ((base[i] + base[i + 1]) / 2.0))
        .collect()
}

pub fn run(o: &Opts) -> Result<Vec<Verdict>, String> {
    let rounds = o.runs.unwrap_or(DEFAULT_ROUNDS).max(1);
    let writes = o.iters.unwrap_or(DEFAULT_WRITES).max(1);
    let s = setup(o)?;
    println!(
        "== blk: 4 KiB requests at queue depth 1; {rounds} interleaved rounds; {writes} writes per \
         single run, {} ms windows for 8 at once, {READS} blocks per read run ==",
        WINDOW.as_millis()
    );
    // Untimed: creates every image's ring (64 MiB, zero-filled) and warms
    // the binaries.
    for d in 0..GUESTS {
        s.write(d, false, 50)?;
    }
    s.write(0, true, 50)?;
    host_loop(&s.bases[0], 9, 50, None)?;

    let mut r = Rounds::default();
    println!(
        "{:>5} {:>10} {:>10} {:>10} {:>10} {:>10} {:>8} {:>10} {:>10}",
        "round",
        "base1/s",
        "guest/s",
        "none/s",
        "base8/s",
        "8guests/s",
        "late ms",
        "unappl µs",
        "appl µs"
    );
    for i in 0..rounds {
        r.b1.push(base1(&s, writes)?);
        // With --compare, the two binaries take turns going first.
        let alt = |r: &mut Rounds| -> Result<(), String> {
            if let Some(alt) = &s.compare {
                let args = ["write".into(), writes.to_string(), "seed=1".into()];
                r.alt
                    .push(s.guest_with(alt, 0, false, "write", &args)?.rate());
            }
            Ok(())
        };
        if i % 2 == 1 {
            alt(&mut r)?;
        }
        let g = s.write(0, false, writes)?;
        r.g1.push(g.rate());
        r.g1_cpu.push(g.cpu_us());
        if i % 2 == 0 {
            alt(&mut r)?;
        }
        r.none.push(s.write(0, true, writes)?.rate());
        let (b8, cpu) = base8(&s)?;
        r.b8.push(b8);
        r.b8_busy.push(cpu.busy_cores);
        r.b8_cpu.push(cpu.own_us);
        let (agg, late, cpu, busy) = s.write8()?;
        r.g8.push(agg);
        r.g8_cpu.push(cpu);
        r.g8_busy.push(busy);
        r.late.push(late);
        let n = READS.to_string();
        r.unapplied_us.push(
            s.guest(
                1,
                false,
                "read-unapplied",
                &["read-unapplied".into(), n.clone()],
            )?
            .per_op_us(),
        );
        r.applied_us.push(
            s.guest(1, false, "read-applied", &["read-applied".into(), n])?
                .per_op_us(),
        );
        println!(
            "{:>5} {:>10.0} {:>10.0} {:>10.0} {:>10.0} {:>10.0} {:>8.1} {:>10.1} {:>10.1}",
            i + 1,
            r.b1[i],
            r.g1[i],
            r.none[i],
            r.b8[i],
            r.g8[i],
            late.as_secs_f64() * 1e3,
            r.unapplied_us[i],
            r.applied_us[i]
        );
    }
    r.b1.push(base1(&s, writes)?);
    r.b8.push(base8(&s)?.0);
    println!(
        "closing baselines: base1 {:.0}/s, base8 {:.0}/s",
        r.b1[rounds], r.b8[rounds]
    );
    if r.late.iter().any(|l| *l > Duration::from_millis(100)) {
        println!(
            "note: a guest started its writes more than 100 ms after the common start time \
             (its tt-host took longer than {} ms to boot it)",
            START_MARGIN.as_millis()
        );
    }

    let g1 = ratios(&r.g1, &r.b1);
    let none = ratios(&r.none, &r.b1);
    let g8 = ratios(&r.g8, &r.b8);
    let read: Vec<f64> = r
        .unapplied_us
        .iter()
        .zip(&r.applied_us)
        .map(|(u, a)| u / a)
        .collect();
    println!(
        "per-round ratios (each against the baseline measured just before and just after it):"
    );
    println!(
        "  1 guest journal / base1:  median {:.2}, rounds {}",
        median(&g1),
        list(&g1, 2)
    );
    println!(
        "  8 guests journal / base8: median {:.2}, rounds {}",
        median(&g8),
        list(&g8, 2)
    );
    println!(
        "  read unapplied / applied: median {:.2}, rounds {}",
        median(&read),
        list(&read, 2)
    );
    println!(
        "  1 guest none / base1:     median {:.2}, rounds {}",
        median(&none),
        list(&none, 2)
    );
    let mut v = vec![
        at_least(
            "1 guest's durable 4 KiB writes/s / host pwrite+fdatasync",
            median(&g1),
            WRITE_TARGET,
        ),
        at_least(
            "8 guests' aggregate durable writes/s / 8 host threads",
            median(&g8),
            WRITE_TARGET,
        ),
        crate::judge(
            "read of unapplied / applied data (time)",
            median(&read),
            READ_TARGET,
            "x",
        ),
    ];
    println!(
        "info: --block-durability=none (page cache, not durable): {:.2}x the durable baseline",
        median(&none)
    );
    if let Some(c) = &s.compare {
        let alt = ratios(&r.alt, &r.b1);
        let paired: Vec<f64> = r.alt.iter().zip(&r.g1).map(|(a, g)| a / g).collect();
        println!(
            "compare: 1 guest with {} / base1: median {:.2}, rounds {}; / the same round's \
             tt-host: median {:.2}, rounds {}",
            c.display(),
            median(&alt),
            list(&alt, 2),
            median(&paired),
            list(&paired, 2)
        );
    }
    breakdown(&s, writes, &r)?;
    v.push(Verdict::Reported);
    let _ = std::fs::remove_dir_all(&s.dir);
    Ok(v)
}

/// Is `prog` runnable (on PATH)?
fn have(prog: &str) -> bool {
    Command::new(prog)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Where one durable write's time goes (item 5): tt-host's CPU time,
/// exits counted by perf, an interleaved pass that splits a write into
/// the exit path and the ring's commit, and the system calls per write
/// counted (and, inflated, timed) by strace. perf and strace are optional.
fn breakdown(s: &Setup, writes: u64, r: &Rounds) -> Result<(), String> {
    println!("where a durable 4 KiB write's time goes:");
    println!(
        "  tt-host CPU time per write (user + system, boot included; the machine has {} \
         cores): 1 guest median {:.0} µs, 8 guests median {:.0} µs",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        median(&r.g1_cpu),
        median(&r.g8_cpu)
    );
    println!(
        "  busy cores, machine-wide: 8 guests writing {:.2} (median; rounds {}), 8 baseline \
         threads {:.2} (their own CPU time {:.0} µs per op)",
        median(&r.g8_busy),
        list(&r.g8_busy, 2),
        median(&r.b8_busy),
        median(&r.b8_cpu)
    );
    // Exits: KVM's tracepoints for exits to user space and port I/O.
    if have("perf") {
        let mut c = Command::new("perf");
        c.args([
            "stat",
            "-x",
            ",",
            "-e",
            "kvm:kvm_userspace_exit,kvm:kvm_pio",
            "--",
        ]);
        let inner = s.command(0, false, &["write".into(), writes.to_string()]);
        c.arg(inner.get_program()).args(inner.get_args());
        let r = child::run(&mut c)?;
        let count = |ev: &str| -> Option<f64> {
            r.stderr
                .lines()
                .find(|l| l.contains(ev))?
                .split(',')
                .next()?
                .trim()
                .parse()
                .ok()
        };
        match (r.code, count("kvm_userspace_exit"), count("kvm_pio")) {
            (Some(0), Some(exits), Some(pio)) => println!(
                "  exits: {exits:.0} exits to tt-host ({pio:.0} port I/O) for {writes} writes \
                 and the boot: {:.2} per write",
                exits / writes as f64
            ),
            _ => println!(
                "  exits: perf could not count KVM's tracepoints: {}",
                r.stderr.trim()
            ),
        }
    } else {
        println!("  exits: perf not installed (not counted)");
    }
    // Interleaved, so that all four see the same disk: the exit path
    // (a guest write with --block-durability=none: exit, copy, page-cache
    // pwrite), the disk's cost of tt-ring's commit at queue depth 1 (a
    // 4608-byte record at the next offset, a 512-byte control block
    // alternating between two sectors, one fdatasync), the baseline, and
    // the durable guest write.
    let (mut plain, mut ring, mut none, mut journal) = (vec![], vec![], vec![], vec![]);
    for _ in 0..BREAKDOWN_ROUNDS {
        let (c, d) = host_loop(&s.bases[2], 3, writes, None)?;
        plain.push(d.as_secs_f64() * 1e6 / c as f64);
        ring.push(ring_loop(&s.bases[3], writes)?);
        none.push(s.write(0, true, writes)?.per_op_us());
        journal.push(s.write(0, false, writes)?.per_op_us());
    }
    let rest: Vec<f64> = (0..journal.len())
        .map(|i| journal[i] - none[i] - ring[i])
        .collect();
    println!(
        "  interleaved pass, µs per write, {BREAKDOWN_ROUNDS} rounds: durable guest write = exit \
         path (a guest write with durability none) + tt-ring's commit shape on this disk (host \
         loop) + rest (the applier's image writes and syncs and ring frees on the same disk, the \
         control block's read, wake-ups); baseline pwrite+fdatasync beside it"
    );
    println!(
        "    {:>7} {:>10} {:>10} {:>12} {:>8} {:>10}",
        "round", "durable", "exit path", "ring commit", "rest", "baseline"
    );
    for i in 0..journal.len() {
        println!(
            "    {:>7} {:>10.0} {:>10.0} {:>12.0} {:>8.0} {:>10.0}",
            i + 1,
            journal[i],
            none[i],
            ring[i],
            rest[i],
            plain[i]
        );
    }
    println!(
        "    {:>7} {:>10.0} {:>10.0} {:>12.0} {:>8.0} {:>10.0}",
        "median",
        median(&journal),
        median(&none),
        median(&ring),
        median(&rest),
        median(&plain)
    );
    if !have("strace") {
        println!("  commit/perform: strace not installed (apt-get install strace); not measured");
        return Ok(());
    }
    let logs = s.dir.join("strace");
    let _ = std::fs::remove_dir_all(&logs);
    std::fs::create_dir_all(&logs).map_err(|e| format!("cannot create {}: {e}", logs.display()))?;
    let mut c = Command::new("strace");
    c.args([
        "-ff",
        "-T",
        "-y",
        "-e",
        "trace=pwrite64,fdatasync,pread64,ioctl",
        "-o",
    ])
    .arg(logs.join("t"));
    let inner = s.command(0, false, &["write".into(), writes.to_string()]);
    c.arg(inner.get_program()).args(inner.get_args());
    let r = child::run(&mut c)?;
    r.check_status("strace tt-host run blkbench write", 0)?;
    let g = parse_line(&r.stdout, "write").ok_or("no result line under strace")?;
    let mut sums = Vec::new();
    for e in std::fs::read_dir(&logs).map_err(|e| format!("cannot list {}: {e}", logs.display()))? {
        let p = e
            .map_err(|e| format!("cannot list {}: {e}", logs.display()))?
            .path();
        let text =
            std::fs::read_to_string(&p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
        strace_sums(&text, &s.images[0], &mut sums);
    }
    sums.sort_by(|a, b| a.0.cmp(&b.0));
    println!(
        "  strace -ff -T of one run: calls per write are exact; times are inflated by strace \
         ({:.0} µs per write under it):",
        g.per_op_us()
    );
    for ((thread, file, call), (n, secs)) in &sums {
        println!(
            "    {thread:<7} {file:<6} {call:<10} {:>6.2} calls {:>8.1} µs each {:>8.1} µs per write",
            *n as f64 / g.count as f64,
            secs * 1e6 / *n as f64,
            secs * 1e6 / g.count as f64
        );
    }
    Ok(())
}

/// What tt-ring writes for one 4 KiB record at queue depth 1, `n` times;
/// µs per op.
fn ring_loop(f: &File, n: u64) -> Result<f64, String> {
    let rec = vec![0x33u8; 4608];
    let ctl = vec![0x44u8; 512];
    let mut off = 4096;
    let t = Instant::now();
    for i in 0..n {
        if off + rec.len() as u64 > FILE_BYTES {
            off = 4096;
        }
        f.write_all_at(&rec, off)
            .and_then(|()| f.write_all_at(&ctl, 512 * (1 + i % 2)))
            .and_then(|()| f.sync_data())
            .map_err(|e| format!("ring-shaped write failed: {e}"))?;
        off += rec.len() as u64;
    }
    Ok(t.elapsed().as_secs_f64() * 1e6 / n as f64)
}

/// (thread, file, system call) -> (count, seconds).
type Sums = Vec<((String, String, String), (u64, f64))>;

/// Add the count and total time of each (file, system call) in one
/// thread's `strace -T -y` log to `out`: "ring" for the journals' rings,
/// "image" for `image`. The thread is "vcpu" if it runs `KVM_RUN`, else
/// "other" (the journal's applier and committer).
fn strace_sums(text: &str, image: &Path, out: &mut Sums) {
    let image = image.display().to_string();
    let thread = if text.contains("KVM_RUN") {
        "vcpu"
    } else {
        "other"
    };
    for line in text.lines() {
        // "call(FD</path>, ...) = R <0.000123>"
        let Some((call, args)) = line.split_once('(') else {
            continue;
        };
        let Some(path) = args
            .split_once('<')
            .and_then(|(_, p)| p.split_once('>'))
            .map(|p| p.0)
        else {
            continue;
        };
        let file = if path.ends_with(".ring") {
            "ring"
        } else if path == image {
            "image"
        } else {
            continue;
        };
        let Some(secs) = line
            .rsplit_once('<')
            .and_then(|(_, t)| t.strip_suffix('>'))
            .and_then(|t| t.parse::<f64>().ok())
        else {
            continue;
        };
        let key = (
            thread.to_string(),
            file.to_string(),
            call.trim().to_string(),
        );
        match out.iter_mut().find(|(k, _)| *k == key) {
            Some((_, (n, s))) => {
                *n += 1;
                *s += secs;
            }
            None => out.push((key, (1, secs))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_line_is_parsed_and_other_modes_ignored() {
        let out = "boot\nblkbench: read-applied count=3 ns=9 wall_start=1 wall_end=2\n\
                   blkbench: write count=1000 ns=500000000 wall_start=10 wall_end=20\n";
        let g = parse_line(out, "write").unwrap();
        assert_eq!(
            (g.count, g.ns, g.wall_start, g.wall_end),
            (1000, 500_000_000, 10, 20)
        );
        assert!((g.rate() - 2000.0).abs() < 1e-6);
        assert_eq!(parse_line(out, "read-applied").unwrap().count, 3);
        assert!(parse_line(out, "read-unapplied").is_none());
        assert!(parse_line("blkbench: write count=x ns=1", "write").is_none());
    }

    #[test]
    fn strace_lines_are_summed_per_thread_file_and_call() {
        let vcpu = "ioctl(11<anon_inode:kvm-vcpu:0>, KVM_RUN, 0) = 0 <0.000080>\n\
                    pwrite64(5</s/journals/x.ring>, \"\"..., 4608, 0) = 4608 <0.000010>\n\
                    fdatasync(5</s/journals/x.ring>) = 0 <0.000300>\n\
                    fdatasync(5</s/journals/x.ring>) = 0 <0.000100>\n\
                    fdatasync(3</other>) = 0 <0.1>\n\
                    +++ exited with 0 +++\n";
        let other = "fdatasync(6</d/image0>) = 0 <0.000500>\n\
                     fdatasync(5</s/journals/x.ring>) = 0 <0.000200>\n";
        let mut s = Sums::new();
        strace_sums(vcpu, Path::new("/d/image0"), &mut s);
        strace_sums(other, Path::new("/d/image0"), &mut s);
        let get = |t: &str, f: &str, c: &str| {
            s.iter()
                .find(|(k, _)| k.0 == t && k.1 == f && k.2 == c)
                .map(|(_, v)| *v)
                .unwrap()
        };
        assert_eq!(get("vcpu", "ring", "fdatasync").0, 2);
        assert!((get("vcpu", "ring", "fdatasync").1 - 0.0004).abs() < 1e-9);
        assert_eq!(get("other", "image", "fdatasync").0, 1);
        assert_eq!(get("other", "ring", "fdatasync").0, 1);
        assert_eq!(get("vcpu", "ring", "pwrite64").0, 1);
        assert_eq!(s.len(), 4);
    }
}
