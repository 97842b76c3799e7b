//! `tt-bench vblk`: virtio-blk (issue 15), many requests in flight.
//!
//! The guest SDK's `vblk` example times its own loops with the TSC
//! (`randwrite`, `seqread`: see its doc), so launch and boot are not in
//! its figures; `blkbench` does the same for the hvt path. Each host
//! baseline times just its loop. Files: `$TT_VBLK_BENCH_DIR`, default
//! `<target>/tt-vblk-bench` (the repository's file system): the guests'
//! images, the baselines' files (all zero-filled and synced first: no
//! block allocation in the timings) and tt-host's state directory, where
//! the journals' rings go; removed at the end.
//!
//! Interleaved rounds (the disk's speed changes several-fold within
//! seconds on this machine). Each round runs, in turn: one `blkbench`
//! guest writing through the hvt BLOCK_WRITE path (queue depth 1,
//! `hvt`), the host loop of `pwrite`+`fdatasync` per 4 KiB (`base1`),
//! each for 300 ms, one `vblk randwrite` guest (queue depth 32, journal),
//! `base1` and `hvt` again; then the two ceilings (`ceil32`: one
//! 32 x 4 KiB `pwrite` and one `fdatasync` per 32 writes;
//! `ceil32+perform`: the same plus what the journal's perform adds, 32
//! random 4 KiB `pwrite`s to an image file and its `fdatasync`); then the
//! host `pread` loop of 64 KiB over the read image (`pread`), one `vblk
//! seqread` guest (64 KiB at queue depth 8) on that image, and `pread`
//! again. A round's vblk figures are divided by the mean of the same
//! reference measured just before and just after them; the verdicts use
//! the median over the rounds.
//!
//! 1. durable 4 KiB random writes at queue depth 32 >= 10 x `base1`;
//! 2. the same >= 5 x `blkbench` (hvt BLOCK_WRITE, queue depth 1);
//! 3. exits to user space per completed request at queue depth 32 < 0.1:
//!    every return of KVM_RUN in the whole `randwrite` run (boot
//!    included), from tt-host's own counters (`TT_HOST_STATS=1`), over
//!    the requests;
//! 4. sequential 64 KiB reads at queue depth 8 from a warm page cache
//!    >= 0.5 x the host `pread` loop's MB/s on the same image.

use crate::child;
use crate::{at_least, list, Opts, Verdict};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use tt_benchutil::{bench_dir, median, print_setting, zeroed_file};

const BS: u64 = 4096;
const FILE_BYTES: u64 = 32 << 20;
const DEPTH: u64 = 32;
const DEFAULT_ROUNDS: usize = 7;
/// Writes per `vblk randwrite` run.
const DEFAULT_WRITES: u64 = 4000;
/// How long each `base1` loop and each `blkbench` guest writes (the
/// disk's speed changes within seconds: the references stay short and
/// next to the run they judge).
const WINDOW: Duration = Duration::from_millis(300);
/// Reads of [`READ_SIZE`] per `seqread` run and per `pread` loop.
const READS: u64 = 4096;
const READ_SIZE: u64 = 64 << 10;
const READ_DEPTH: u64 = 8;
const WRITE_TARGET: f64 = 10.0;
const HVT_TARGET: f64 = 5.0;
const EXIT_TARGET: f64 = 0.1;
const READ_TARGET: f64 = 0.5;
const VAR: &str = "TT_VBLK_BENCH_DIR";

/// What one guest run printed, and tt-host's counters.
#[derive(Debug, Clone, Copy, Default)]
struct GuestRun {
    count: u64,
    bytes: u64,
    ns: u64,
    /// tt-host's CPU time for the whole run (boot included).
    cpu: Duration,
    /// `TT_HOST_STATS`: returns of KVM_RUN, hypercall exits, MMIO exits.
    run_returns: u64,
    hypercalls: u64,
    mmio: u64,
}

impl GuestRun {
    fn rate(&self) -> f64 {
        self.count as f64 / (self.ns as f64 / 1e9)
    }
    fn mb_s(&self) -> f64 {
        self.bytes as f64 / 1e6 / (self.ns as f64 / 1e9)
    }
    fn cpu_us(&self) -> f64 {
        self.cpu.as_secs_f64() * 1e6 / self.count.max(1) as f64
    }
    fn exits_per_req(&self) -> f64 {
        self.run_returns as f64 / self.count.max(1) as f64
    }
}

/// The value of `key=` among `line`'s space-separated words.
fn field(line: &str, key: &str) -> Option<u64> {
    line.split(' ')
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))?
        .parse()
        .ok()
}

/// `PREFIX MODE count=C ... ns=E` in `out` (`bytes=` optional).
fn parse_line(out: &str, prefix: &str, mode: &str) -> Option<GuestRun> {
    let line = out.lines().find_map(|l| {
        l.strip_prefix(prefix)?
            .strip_prefix(mode)?
            .strip_prefix(' ')
    })?;
    Some(GuestRun {
        count: field(line, "count")?,
        bytes: field(line, "bytes").unwrap_or(0),
        ns: field(line, "ns")?,
        ..GuestRun::default()
    })
}

/// tt-host's `tt-host: stats: run_returns=R hypercalls=H mmio_exits=M`.
fn parse_stats(err: &str, g: &mut GuestRun) -> Option<()> {
    let line = err
        .lines()
        .find_map(|l| l.strip_prefix("tt-host: stats: "))?;
    g.run_returns = field(line, "run_returns")?;
    g.hypercalls = field(line, "hypercalls")?;
    g.mmio = field(line, "mmio_exits")?;
    Some(())
}

struct Setup {
    tt_host: PathBuf,
    vblk: PathBuf,
    blkbench: PathBuf,
    dir: PathBuf,
    state: PathBuf,
    /// The vblk guest's write image, the blkbench guest's, the read image.
    write_img: PathBuf,
    hvt_img: PathBuf,
    read_img: PathBuf,
    read_file: File,
    base: File,
    ring: File,
    perform: File,
}

impl Setup {
    /// Run `image` with `--block:NAME=disk` (journal mode) and parse its
    /// result line.
    fn guest(
        &self,
        image: &Path,
        name: &str,
        disk: &Path,
        prefix: &str,
        mode: &str,
        args: &[String],
    ) -> Result<GuestRun, String> {
        let mut c = Command::new(&self.tt_host);
        c.env("TT_HOST_STATS", "1")
            .arg("run")
            .arg(format!("--block:{name}={}", disk.display()))
            .arg(format!("--state-dir={}", self.state.display()))
            .arg(image)
            .arg("--")
            .args(args);
        let r = child::run(&mut c)?;
        r.check_status(&format!("{prefix}{mode}"), 0)?;
        let mut g = parse_line(&r.stdout, prefix, mode).ok_or_else(|| {
            format!(
                "{prefix}{mode} printed no result line\n  stdout: {}\n  stderr: {}",
                r.stdout.trim(),
                r.stderr.trim()
            )
        })?;
        parse_stats(&r.stderr, &mut g).ok_or_else(|| {
            format!(
                "tt-host printed no stats line with TT_HOST_STATS=1 (too old a tt-host?)\n  \
                 stderr: {}",
                r.stderr.trim()
            )
        })?;
        g.cpu = r.cpu;
        Ok(g)
    }

    fn randwrite(&self, count: u64, seed: u64) -> Result<GuestRun, String> {
        let args = [
            "randwrite".into(),
            format!("depth={DEPTH}"),
            format!("count={count}"),
            format!("seed={seed}"),
        ];
        self.guest(
            &self.vblk,
            "disk",
            &self.write_img,
            "vblk: ",
            "randwrite",
            &args,
        )
    }

    fn seqread(&self) -> Result<GuestRun, String> {
        let args = [
            "seqread".into(),
            format!("depth={READ_DEPTH}"),
            format!("count={READS}"),
            format!("size={READ_SIZE}"),
        ];
        self.guest(
            &self.vblk,
            "disk",
            &self.read_img,
            "vblk: ",
            "seqread",
            &args,
        )
    }

    /// blkbench writing for [`WINDOW`] once booted (about 50 ms allowed).
    fn hvt_write(&self) -> Result<GuestRun, String> {
        let until = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            + WINDOW
            + Duration::from_millis(50);
        let args = [
            "write".into(),
            u64::MAX.to_string(),
            "seed=1".into(),
            format!("until={}", until.as_nanos()),
        ];
        self.guest(
            &self.blkbench,
            "storage",
            &self.hvt_img,
            "blkbench: ",
            "write",
            &args,
        )
    }
}

/// splitmix64, as the guests use it.
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn io(what: &str) -> impl Fn(std::io::Error) -> String + '_ {
    move |e| format!("{what} failed: {e}")
}

/// `base1`: 4 KiB `pwrite` at a random 4 KiB-aligned offset, then
/// `fdatasync`, for `window`. Writes/s.
fn base1(f: &File, seed: u64, window: Duration) -> Result<f64, String> {
    let mut rng = seed;
    let buf = vec![0x5au8; BS as usize];
    let t = Instant::now();
    let mut n = 0u64;
    while t.elapsed() < window {
        n += 1;
        let off = next(&mut rng) % (FILE_BYTES / BS) * BS;
        f.write_all_at(&buf, off).map_err(io("baseline pwrite"))?;
        f.sync_data().map_err(io("baseline fdatasync"))?;
    }
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

/// The ceilings: per 32 writes, one 128 KiB `pwrite` at the next place of
/// `ring` (as a journal appends) and one `fdatasync`; with `perform`,
/// also 32 random 4 KiB `pwrite`s to it and its `fdatasync`. Writes/s
/// over `n` writes.
fn ceiling(ring: &File, perform: Option<&File>, seed: u64, n: u64) -> Result<f64, String> {
    let batch = vec![0x6bu8; (DEPTH * BS) as usize];
    let mut rng = seed;
    let batches = n.div_ceil(DEPTH);
    let slots = FILE_BYTES / (DEPTH * BS);
    let t = Instant::now();
    for b in 0..batches {
        ring.write_all_at(&batch, b % slots * DEPTH * BS)
            .map_err(io("ceiling pwrite"))?;
        ring.sync_data().map_err(io("ceiling fdatasync"))?;
        if let Some(p) = perform {
            for i in 0..DEPTH as usize {
                let off = next(&mut rng) % (FILE_BYTES / BS) * BS;
                let at = i * BS as usize;
                p.write_all_at(&batch[at..at + BS as usize], off)
                    .map_err(io("perform pwrite"))?;
            }
            p.sync_data().map_err(io("perform fdatasync"))?;
        }
    }
    Ok((batches * DEPTH) as f64 / t.elapsed().as_secs_f64())
}

/// The host read baseline: [`READS`] sequential `pread`s of
/// [`READ_SIZE`] from the start of `f`, wrapping at its end, as the guest
/// reads. MB/s.
fn pread_loop(f: &File) -> Result<f64, String> {
    let mut buf = vec![0u8; READ_SIZE as usize];
    let slots = FILE_BYTES / READ_SIZE;
    let t = Instant::now();
    for i in 0..READS {
        f.read_exact_at(&mut buf, i % slots * READ_SIZE)
            .map_err(io("baseline pread"))?;
    }
    std::hint::black_box(&buf);
    Ok((READS * READ_SIZE) as f64 / 1e6 / t.elapsed().as_secs_f64())
}

fn setup(o: &Opts) -> Result<Setup, String> {
    let tt_host = crate::tt_host(o)?;
    let vblk = crate::image(o, "vblk")?;
    let blkbench = crate::image(&Opts::default(), "blkbench")?;
    let dir = bench_dir(VAR, "tt-vblk-bench");
    let _ = std::fs::remove_dir_all(&dir);
    let state = dir.join("state");
    std::fs::create_dir_all(&state)
        .map_err(|e| format!("cannot create {}: {e}", state.display()))?;
    print_setting("tt-bench vblk", &dir, VAR);
    let file = |name: &str| {
        let p = dir.join(name);
        let f = zeroed_file(&p, FILE_BYTES);
        (p, f)
    };
    let (write_img, _) = file("vblk-write.img");
    let (hvt_img, _) = file("hvt-write.img");
    let (read_img, read_file) = file("read.img");
    Ok(Setup {
        tt_host,
        vblk,
        blkbench,
        state,
        write_img,
        hvt_img,
        read_img,
        read_file,
        base: file("baseline").1,
        ring: file("ceiling-ring").1,
        perform: file("ceiling-image").1,
        dir,
    })
}

#[derive(Default)]
struct Rounds {
    base1: Vec<f64>,
    hvt: Vec<f64>,
    pread: Vec<f64>,
    ceil: Vec<f64>,
    ceil_perform: Vec<f64>,
    write: Vec<GuestRun>,
    read: Vec<GuestRun>,
}

/// `xs[i]` over the mean of `base[2i]` and `base[2i + 1]` (measured
/// just before and just after it).
fn ratios(xs: &[f64], base: &[f64]) -> Vec<f64> {
    xs.iter()
        .enumerate()
        .map(|(i, x)| x / ((base[2 * i] + base[2 * i + 1]) / 2.0))
        .collect()
}

pub fn run(o: &Opts) -> Result<Vec<Verdict>, String> {
    let rounds = o.runs.unwrap_or(DEFAULT_ROUNDS).max(1);
    let writes = o.iters.unwrap_or(DEFAULT_WRITES).max(DEPTH);
    let s = setup(o)?;
    let r = measure(&s, rounds, writes);
    let _ = std::fs::remove_dir_all(&s.dir);
    report(&r?)
}

fn measure(s: &Setup, rounds: usize, writes: u64) -> Result<Rounds, String> {
    println!(
        "== vblk: {rounds} interleaved rounds; {writes} random 4 KiB writes at depth {DEPTH} per \
         vblk run, {} ms per base1 and blkbench run, {READS} reads of {} KiB at depth \
         {READ_DEPTH} per read run ==",
        WINDOW.as_millis(),
        READ_SIZE >> 10
    );
    // Untimed: creates both images' rings (zero-filled), warms the
    // binaries and brings the read image into the page cache (the host
    // loop and the guest read the same file).
    let boot = s.randwrite(0, 99)?;
    s.hvt_write()?;
    s.seqread()?;
    pread_loop(&s.read_file)?;
    base1(&s.base, 9, Duration::from_millis(50))?;
    println!(
        "a vblk run with no requests: {} KVM_RUN returns ({} hypercalls, {} MMIO exits)",
        boot.run_returns, boot.hypercalls, boot.mmio
    );
    println!(
        "{:>5} {:>8} {:>8} {:>8} {:>9} {:>8} {:>8} {:>7} {:>8} {:>8}",
        "round",
        "base1/s",
        "hvt/s",
        "ceil/s",
        "ceil+pf/s",
        "vblk/s",
        "exits/rq",
        "cpu µs",
        "pread MB/s",
        "vblk MB/s"
    );
    let mut r = Rounds::default();
    // Each round: hvt, base1, the vblk writes, base1, hvt (the references
    // on both sides, closest first); the ceilings; pread, the vblk reads,
    // pread.
    for i in 0..rounds {
        let seed = i as u64 + 1;
        r.hvt.push(s.hvt_write()?.rate());
        r.base1.push(base1(&s.base, seed, WINDOW)?);
        r.write.push(s.randwrite(writes, seed)?);
        r.base1.push(base1(&s.base, seed + 100, WINDOW)?);
        r.hvt.push(s.hvt_write()?.rate());
        r.ceil.push(ceiling(&s.ring, None, seed, writes)?);
        r.ceil_perform
            .push(ceiling(&s.ring, Some(&s.perform), seed, writes)?);
        r.pread.push(pread_loop(&s.read_file)?);
        r.read.push(s.seqread()?);
        r.pread.push(pread_loop(&s.read_file)?);
        let (w, rd) = (&r.write[i], &r.read[i]);
        let mean = |v: &[f64]| (v[2 * i] + v[2 * i + 1]) / 2.0;
        println!(
            "{:>5} {:>8.0} {:>8.0} {:>8.0} {:>9.0} {:>8.0} {:>8.3} {:>7.1} {:>8.0} {:>8.0}",
            i + 1,
            mean(&r.base1),
            mean(&r.hvt),
            r.ceil[i],
            r.ceil_perform[i],
            w.rate(),
            w.exits_per_req(),
            w.cpu_us(),
            mean(&r.pread),
            rd.mb_s()
        );
    }
    Ok(r)
}

fn report(r: &Rounds) -> Result<Vec<Verdict>, String> {
    let tail = |v: &[f64]| list(v, 0);
    println!(
        "references (before, after each round): base1/s {}; hvt/s {}; pread MB/s {}",
        tail(&r.base1),
        tail(&r.hvt),
        tail(&r.pread)
    );
    let rates: Vec<f64> = r.write.iter().map(GuestRun::rate).collect();
    let mb: Vec<f64> = r.read.iter().map(GuestRun::mb_s).collect();
    let w_base = ratios(&rates, &r.base1);
    let w_hvt = ratios(&rates, &r.hvt);
    let rd = ratios(&mb, &r.pread);
    let ceil = ratios(&r.ceil, &r.base1);
    let ceil_pf = ratios(&r.ceil_perform, &r.base1);
    let of_ceil: Vec<f64> = rates.iter().zip(&r.ceil).map(|(g, c)| g / c).collect();
    let of_ceil_pf: Vec<f64> = rates
        .iter()
        .zip(&r.ceil_perform)
        .map(|(g, c)| g / c)
        .collect();
    let exits: Vec<f64> = r.write.iter().map(GuestRun::exits_per_req).collect();
    let read_exits: Vec<f64> = r.read.iter().map(GuestRun::exits_per_req).collect();
    println!(
        "per-round ratios (each against the reference measured just before and just after it):"
    );
    let line = |what: &str, xs: &[f64], prec: usize| {
        println!(
            "  {what:<34} median {:.prec$}, rounds {}",
            median(xs),
            list(xs, prec)
        );
    };
    line("vblk depth 32 / base1:", &w_base, 2);
    line("vblk depth 32 / hvt blkbench:", &w_hvt, 2);
    line("ceil32 / base1:", &ceil, 2);
    line("ceil32+perform / base1:", &ceil_pf, 2);
    line("vblk / ceil32 (same round):", &of_ceil, 2);
    line("vblk / ceil32+perform (same round):", &of_ceil_pf, 2);
    line("vblk seqread / pread MB/s:", &rd, 2);
    line("exits per write (whole run):", &exits, 3);
    line("exits per 64 KiB read (whole run):", &read_exits, 3);
    let w = &r.write;
    println!(
        "  randwrite runs' counters (run_returns/hypercalls/mmio): {}",
        w.iter()
            .map(|g| format!("{}/{}/{}", g.run_returns, g.hypercalls, g.mmio))
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "  tt-host CPU per write (whole run, µs): median {:.1}; per 64 KiB read: median {:.1}",
        median(&w.iter().map(GuestRun::cpu_us).collect::<Vec<_>>()),
        median(&r.read.iter().map(GuestRun::cpu_us).collect::<Vec<_>>())
    );
    let exits_v = median(&exits);
    let v3 = if exits_v < EXIT_TARGET {
        println!(
            "target: exits per completed request at depth 32 {exits_v:.3} < {EXIT_TARGET}: met"
        );
        Verdict::Met
    } else {
        println!(
            "target: exits per completed request at depth 32 {exits_v:.3} < {EXIT_TARGET}: MISSED"
        );
        Verdict::Missed
    };
    Ok(vec![
        at_least(
            "durable 4 KiB random writes at depth 32 / base1",
            median(&w_base),
            WRITE_TARGET,
        ),
        at_least(
            "durable 4 KiB random writes at depth 32 / hvt BLOCK_WRITE",
            median(&w_hvt),
            HVT_TARGET,
        ),
        v3,
        at_least(
            "sequential 64 KiB reads at depth 8 / host pread",
            median(&rd),
            READ_TARGET,
        ),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_and_stats_lines_are_parsed_and_a_missing_field_is_refused() {
        let out = "vblk: capacity 65536\nvblk: randwrite count=4000 depth=32 bytes=16384000 \
                   ns=200000000\nvblk: OK\n";
        let mut g = parse_line(out, "vblk: ", "randwrite").expect("result line");
        assert_eq!((g.count, g.bytes, g.ns), (4000, 16_384_000, 200_000_000));
        assert!((g.rate() - 20_000.0).abs() < 1e-6);
        let err = "tt-host: stats: run_returns=200 hypercalls=162 mmio_exits=38\n";
        assert!(parse_stats(err, &mut g).is_some());
        assert_eq!((g.run_returns, g.hypercalls, g.mmio), (200, 162, 38));
        assert!((g.exits_per_req() - 0.05).abs() < 1e-9);
        // Another mode's line, or a line without ns=, is not a result.
        assert!(parse_line(out, "vblk: ", "seqread").is_none());
        assert!(parse_line("vblk: seqread count=1 bytes=2\n", "vblk: ", "seqread").is_none());
        assert!(parse_stats("tt-host: stats: run_returns=1\n", &mut g).is_none());
    }

    #[test]
    fn each_figure_is_judged_against_the_references_on_both_sides() {
        // Round 0 between 100 and 300, round 1 between 50 and 150.
        assert_eq!(
            ratios(&[400.0, 300.0], &[100.0, 300.0, 50.0, 150.0]),
            [2.0, 3.0]
        );
    }
}
