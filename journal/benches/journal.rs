//! tt-journal benchmarks on a real file with `fdatasync` (docs/BENCHMARKS.md,
//! section "tt-journal", says what each one measures and records figures).
//!
//! - `durable_4KiB/journal_x<N>`: N threads push 4 KiB operations (a
//!   `serde_bytes::ByteBuf` of 4096 bytes; 4106 bytes encoded, 4114 with the sequence
//!   number) into one journal on a 256 MiB ring file; each push returns
//!   when its operation is durable. Time per operation = wall time of the
//!   whole batch / operations, so criterion's `elem/s` is durable ops/s.
//!   `perform` only counts the operations.
//! - `durable_4KiB/pwrite_fdatasync`: the same-run baseline: one thread,
//!   one 4 KiB `pwrite` at the next offset of a file, then `fdatasync`.
//! - `durable_4KiB/pwrite_fdatasync_64x4KiB`: the disk's ceiling for 64
//!   operations in flight, measured in the same run: 64 operations' bytes
//!   (256 KiB, no framing) in one `pwrite`, then one `fdatasync`. A
//!   journal with 64 pushers has at most 64 operations to put into a
//!   commit, so no design does better on this disk than this (pipelining
//!   splits the 64 into smaller syncs, which cost more per byte).
//! - `durable_4KiB/journal_q64`: one thread keeps 64 operations in flight
//!   with `submit` / `Pending::wait` (a device queue of depth 64): 64
//!   concurrent pushers without 64 threads.
//! - `durable_4KiB/journal_memdevice_x64`: 64 pushers on a ring in memory
//!   (`MemDevice`: no system calls, `sync` does nothing): the journal's own
//!   CPU ceiling on this machine.
//! - After criterion, a separate pass times every push (and every baseline
//!   write) for `LATENCY_SECS` per configuration and prints p50 / p99 /
//!   p99.9 / max latency, ops/s and commits (`metrics().syncs`) per op,
//!   with the baseline timed before and after the journal runs.
//! - Last, the interleaved pass that judges the target: the baseline, the
//!   ceiling, `journal_x64` and `journal_q64` run in turn for `ROUND_SECS`
//!   each, `ROUNDS` times; each round's rates are divided by the mean of
//!   the baseline measured just before and just after it, and the verdict
//!   uses the median over the rounds. (This disk's speed drifts by 2x
//!   within minutes, so a ratio of two figures measured a minute apart
//!   says as much about the disk as about the journal.)
//!
//! Files go to `$TT_JOURNAL_BENCH_DIR`, default
//! `<cargo target dir>/tt-journal-bench` (the repository's file system;
//! `/tmp` may be a tmpfs, whose `fdatasync` does nothing). Both files are
//! written with zeros and synced first, so that ring and baseline overwrite
//! allocated blocks (steady state, no block allocation in the timings).

use criterion::{Criterion, SamplingMode, Throughput};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant, SystemTime};
use tt_benchutil::{bench_dir, median, print_setting, verdict, zeroed_file};
use tt_journal::{Config, Journal};
use tt_ring::{BlockDevice, FileDevice, MemDevice, Producer};

const OP_BYTES: usize = 4096;
const RING_BYTES: u64 = 256 << 20;
const BASE_BYTES: u64 = 64 << 20;
const SECTOR: u32 = 4096;
const PUSHERS: [usize; 4] = [1, 4, 16, 64];
const GROUP: &str = "durable_4KiB";
const BASE: &str = "pwrite_fdatasync";
const CEILING: &str = "pwrite_fdatasync_64x4KiB";
/// Operations per write in the ceiling measurement.
const CEILING_OPS: usize = 64;
const MEM64: &str = "journal_memdevice_x64";
/// One thread with 64 submitted operations in flight.
const Q64: &str = "journal_q64";
/// Seconds of the latency pass per configuration.
const LATENCY_SECS: f64 = 3.0;
/// Rounds of the interleaved pass, and seconds per configuration in each.
const ROUNDS: usize = 8;
const ROUND_SECS: f64 = 0.75;
/// Target: journal ops/s with 64 pushers >= TARGET x baseline ops/s.
const TARGET: f64 = 20.0;

/// Bytes serialized as one byte string, not a sequence of u8 (the way
/// a journal of block writes should carry its data).
type Op = serde_bytes::ByteBuf;
type Dev = Arc<FileDevice>;

fn payload() -> Op {
    serde_bytes::ByteBuf::from(
        (0..OP_BYTES)
            .map(|i| (i * 31 + 7) as u8)
            .collect::<Vec<u8>>(),
    )
}

/// A journal on a freshly formatted ring in the (zeroed) file `path`;
/// `perform` counts operations into `performed`.
fn journal(path: &Path, performed: &Arc<AtomicU64>) -> Journal<Op, Dev> {
    journal_on(Arc::new(FileDevice::open(path, SECTOR).unwrap()), performed)
}

fn journal_on<D>(dev: D, performed: &Arc<AtomicU64>) -> Journal<Op, D>
where
    D: BlockDevice + Clone + Send + Sync + 'static,
{
    Producer::create(&dev).unwrap();
    let count = performed.clone();
    Journal::start(dev, Config::default(), move |ops: &[Op]| {
        count.fetch_add(ops.len() as u64, Ordering::Relaxed);
        Ok::<(), String>(())
    })
    .unwrap()
}

/// `ops` pushes of `op` spread over `threads` threads (each takes the next
/// operation from a shared counter, so all stay busy to the end). Returns
/// the wall time from the common start to the last push's return.
fn push_all<D>(j: &Journal<Op, D>, op: &Op, threads: usize, ops: u64) -> Duration
where
    D: BlockDevice + Clone + Send + Sync + 'static,
{
    let left = AtomicU64::new(ops);
    let start = Barrier::new(threads + 1);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    start.wait();
                    while left
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                        .is_ok()
                    {
                        let _ = j.push(op).expect("push");
                    }
                })
            })
            .collect();
        start.wait();
        let t = Instant::now();
        for h in handles {
            h.join().unwrap();
        }
        t.elapsed()
    })
}

/// `ops` operations submitted by one thread that keeps `depth` of them in
/// flight (as a device queue of that depth does): it submits until
/// `depth` are pending, then waits for the oldest. Returns the wall time
/// until the last one is durable.
fn submit_all<D>(j: &Journal<Op, D>, op: &Op, depth: usize, ops: u64) -> Duration
where
    D: BlockDevice + Clone + Send + Sync + 'static,
{
    let mut in_flight = std::collections::VecDeque::with_capacity(depth);
    let t = Instant::now();
    for _ in 0..ops {
        if in_flight.len() == depth {
            let p: tt_journal::Pending<D> = in_flight.pop_front().unwrap();
            let _ = p.wait().expect("durable");
        }
        in_flight.push_back(j.submit(op).expect("submit"));
    }
    for p in in_flight {
        let _ = p.wait().expect("durable");
    }
    t.elapsed()
}

/// The baseline: `ops` x 4 KiB written at the next offset of `file`
/// (wrapping) in one `pwrite`, then `fdatasync`. One op per write is the
/// baseline; 64 per write is the disk's ceiling for 64 in flight.
struct PlainWriter<'a> {
    file: &'a File,
    buf: Vec<u8>,
    off: u64,
}

impl PlainWriter<'_> {
    fn new(file: &File, ops: usize) -> PlainWriter<'_> {
        PlainWriter {
            file,
            buf: payload().repeat(ops),
            off: 0,
        }
    }
    fn write(&mut self) {
        let len = self.buf.len() as u64;
        if self.off + len > BASE_BYTES {
            self.off = 0;
        }
        self.file.write_all_at(&self.buf, self.off).unwrap();
        self.file.sync_data().unwrap();
        self.off += len;
    }
}

/// Commits and operations counted during the criterion runs, per
/// configuration (warm-up included).
#[derive(Default, Clone, Copy)]
struct Counted {
    ops: u64,
    syncs: u64,
}

fn durable(c: &mut Criterion, dir: &Path) -> Vec<(String, Counted)> {
    let ring_path = dir.join("ring");
    zeroed_file(&ring_path, RING_BYTES);
    let base = zeroed_file(&dir.join("baseline"), BASE_BYTES);
    let op = payload();
    let mut g = c.benchmark_group(GROUP);
    g.sampling_mode(SamplingMode::Flat);
    g.throughput(Throughput::Elements(1));
    let mut w = PlainWriter::new(&base, 1);
    g.bench_function(BASE, |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                w.write();
            }
            t.elapsed()
        })
    });
    let mut w = PlainWriter::new(&base, CEILING_OPS);
    g.bench_function(CEILING, |b| {
        b.iter_custom(|iters| {
            // `iters` operations, CEILING_OPS per write.
            let writes = iters.div_ceil(CEILING_OPS as u64);
            let t = Instant::now();
            for _ in 0..writes {
                w.write();
            }
            t.elapsed()
                .mul_f64(iters as f64 / (writes * CEILING_OPS as u64) as f64)
        })
    });
    let mut counted = Vec::new();
    for n in PUSHERS {
        let performed = Arc::new(AtomicU64::new(0));
        let j = journal(&ring_path, &performed);
        let mut cnt = Counted::default();
        g.bench_function(format!("journal_x{n}"), |b| {
            b.iter_custom(|iters| {
                let before = j.metrics().syncs;
                let t = push_all(&j, &op, n, iters);
                cnt.syncs += j.metrics().syncs - before;
                cnt.ops += iters;
                t
            })
        });
        j.shutdown(true);
        assert_eq!(performed.load(Ordering::Relaxed), cnt.ops, "all performed");
        counted.push((format!("journal_x{n}"), cnt));
    }
    // 64 in flight from one thread (`submit`), as a queue of depth 64.
    {
        let performed = Arc::new(AtomicU64::new(0));
        let j = journal(&ring_path, &performed);
        let mut cnt = Counted::default();
        g.bench_function(Q64, |b| {
            b.iter_custom(|iters| {
                let before = j.metrics().syncs;
                let t = submit_all(&j, &op, 64, iters);
                cnt.syncs += j.metrics().syncs - before;
                cnt.ops += iters;
                t
            })
        });
        j.shutdown(true);
        assert_eq!(performed.load(Ordering::Relaxed), cnt.ops, "all performed");
        counted.push((Q64.to_string(), cnt));
    }
    // The journal's CPU ceiling: 64 pushers on a ring in memory (no
    // system calls, sync does nothing).
    let performed = Arc::new(AtomicU64::new(0));
    let j = journal_on(Arc::new(MemDevice::new(RING_BYTES, SECTOR)), &performed);
    g.bench_function(MEM64, |b| {
        b.iter_custom(|iters| push_all(&j, &op, 64, iters))
    });
    j.shutdown(true);
    g.finish();
    counted
}

/// What the latency pass measured for one configuration.
struct Pass {
    name: String,
    ops: u64,
    secs: f64,
    /// Sorted push (or write + fdatasync) durations, in µs.
    lat: Vec<f64>,
    syncs: Option<u64>,
}

impl Pass {
    fn rate(&self) -> f64 {
        self.ops as f64 / self.secs
    }
    /// Nearest-rank percentile.
    fn pct(&self, p: f64) -> f64 {
        let n = self.lat.len();
        let rank = ((p / 100.0) * n as f64).ceil() as usize;
        self.lat[rank.clamp(1, n) - 1]
    }
}

fn latency_journal(ring_path: &Path, op: &Op, n: usize, secs: f64) -> Pass {
    let performed = Arc::new(AtomicU64::new(0));
    let j = journal(ring_path, &performed);
    // Warm-up: fill the pipeline, touch the file.
    push_all(&j, op, n, 20 * n as u64);
    let stop = AtomicBool::new(false);
    let start = Barrier::new(n + 1);
    let syncs0 = j.metrics().syncs;
    let (lat, secs) = std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|_| {
                s.spawn(|| {
                    let mut lat = Vec::with_capacity(1 << 16);
                    start.wait();
                    while !stop.load(Ordering::Relaxed) {
                        let t = Instant::now();
                        let _ = j.push(op).expect("push");
                        lat.push(t.elapsed().as_secs_f64() * 1e6);
                    }
                    lat
                })
            })
            .collect();
        start.wait();
        let t = Instant::now();
        std::thread::sleep(Duration::from_secs_f64(secs));
        stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for h in handles {
            all.extend(h.join().unwrap());
        }
        (all, t.elapsed().as_secs_f64())
    });
    let syncs = j.metrics().syncs - syncs0;
    j.shutdown(true);
    let mut lat = lat;
    lat.sort_by(f64::total_cmp);
    Pass {
        name: format!("journal_x{n}"),
        ops: lat.len() as u64,
        secs,
        lat,
        syncs: Some(syncs),
    }
}

/// One thread keeping 64 submitted ops in flight; each op's latency is
/// from its `submit` to its `wait` returning.
fn latency_queue(ring_path: &Path, op: &Op, secs: f64) -> Pass {
    let performed = Arc::new(AtomicU64::new(0));
    let j = journal(ring_path, &performed);
    submit_all(&j, op, 64, 20 * 64);
    let syncs0 = j.metrics().syncs;
    let mut lat = Vec::with_capacity(1 << 18);
    let mut in_flight = std::collections::VecDeque::with_capacity(64);
    let t = Instant::now();
    while t.elapsed().as_secs_f64() < secs {
        if in_flight.len() == 64 {
            let (t0, p): (Instant, tt_journal::Pending<Dev>) = in_flight.pop_front().unwrap();
            let _ = p.wait().expect("durable");
            lat.push(t0.elapsed().as_secs_f64() * 1e6);
        }
        in_flight.push_back((Instant::now(), j.submit(op).expect("submit")));
    }
    for (t0, p) in in_flight {
        let _ = p.wait().expect("durable");
        lat.push(t0.elapsed().as_secs_f64() * 1e6);
    }
    let secs = t.elapsed().as_secs_f64();
    let syncs = j.metrics().syncs - syncs0;
    j.shutdown(true);
    lat.sort_by(f64::total_cmp);
    Pass {
        name: Q64.into(),
        ops: lat.len() as u64,
        secs,
        lat,
        syncs: Some(syncs),
    }
}

/// Plain writes of `ops` operations each; the latencies are per write.
fn latency_baseline(base: &File, ops: usize, secs: f64) -> Pass {
    let mut w = PlainWriter::new(base, ops);
    for _ in 0..20 {
        w.write();
    }
    let mut lat = Vec::new();
    let t = Instant::now();
    while t.elapsed().as_secs_f64() < secs {
        let t1 = Instant::now();
        w.write();
        lat.push(t1.elapsed().as_secs_f64() * 1e6);
    }
    let secs = t.elapsed().as_secs_f64();
    lat.sort_by(f64::total_cmp);
    Pass {
        name: if ops == 1 {
            BASE.into()
        } else {
            CEILING.into()
        },
        ops: (lat.len() * ops) as u64,
        secs,
        lat,
        syncs: None,
    }
}

fn latency_pass(dir: &Path) -> Vec<Pass> {
    let ring_path = dir.join("ring");
    zeroed_file(&ring_path, RING_BYTES);
    let base = zeroed_file(&dir.join("baseline"), BASE_BYTES);
    let op = payload();
    let mut out = vec![latency_baseline(&base, 1, LATENCY_SECS)];
    out.push(latency_baseline(&base, CEILING_OPS, LATENCY_SECS));
    for n in PUSHERS {
        out.push(latency_journal(&ring_path, &op, n, LATENCY_SECS));
    }
    out.push(latency_queue(&ring_path, &op, LATENCY_SECS));
    // Again at the end: shows how much the disk drifted meanwhile.
    let mut again = latency_baseline(&base, 1, LATENCY_SECS);
    again.name = format!("{BASE} (again)");
    out.push(again);
    out
}

/// Ratios to the baseline from the interleaved pass: for each round, the
/// ops/s of each configuration over the mean of the baseline's ops/s
/// measured just before and just after that round.
struct Interleaved {
    /// (configuration, one ratio per round).
    ratios: Vec<(&'static str, Vec<f64>)>,
    /// The baseline's ops/s, at the start of each round and at the end.
    base: Vec<f64>,
}

impl Interleaved {
    fn ratios(&self, name: &str) -> Option<&[f64]> {
        self.ratios
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, r)| r.as_slice())
    }
}

/// The target's own measurement. This disk's speed drifts by 2x within
/// minutes, so a baseline measured a minute before the journal can
/// make the ratio say more about the disk than about the journal. Here
/// the baseline, the ceiling and the two 64-pusher configurations run in
/// turn, `ROUNDS` times, and each round's journal rates are divided by
/// the baseline measured around them.
fn interleaved_pass(dir: &Path) -> Interleaved {
    let ring_path = dir.join("ring");
    zeroed_file(&ring_path, RING_BYTES);
    let base_file = zeroed_file(&dir.join("baseline"), BASE_BYTES);
    let op = payload();
    let mut base = Vec::new();
    let mut rates: [(&'static str, Vec<f64>); 3] = [
        (CEILING, Vec::new()),
        ("journal_x64", Vec::new()),
        (Q64, Vec::new()),
    ];
    for _ in 0..ROUNDS {
        base.push(latency_baseline(&base_file, 1, ROUND_SECS).rate());
        rates[0]
            .1
            .push(latency_baseline(&base_file, CEILING_OPS, ROUND_SECS).rate());
        rates[1]
            .1
            .push(latency_journal(&ring_path, &op, 64, ROUND_SECS).rate());
        rates[2]
            .1
            .push(latency_queue(&ring_path, &op, ROUND_SECS).rate());
    }
    base.push(latency_baseline(&base_file, 1, ROUND_SECS).rate());
    let ratios = rates
        .into_iter()
        .map(|(name, r)| {
            let x = r
                .iter()
                .enumerate()
                .map(|(i, r)| r / ((base[i] + base[i + 1]) / 2.0))
                .collect();
            (name, x)
        })
        .collect();
    Interleaved { ratios, base }
}

/// Criterion's median (ns per op) of one function of this bench's group.
fn median_ns(function: &str, since: SystemTime) -> Option<f64> {
    tt_benchutil::median_ns(GROUP, function, since)
}

fn summary(
    since: SystemTime,
    counted: &[(String, Counted)],
    passes: &[Pass],
    inter: Option<&Interleaved>,
) {
    println!("\ntt-journal summary: 4 KiB ops, each push returns once durable");
    println!(
        "{:<26} {:>10} {:>9} {:>12} {:>8}",
        "criterion", "µs/op", "ops/s", "x baseline", "syncs/op"
    );
    let base = median_ns(BASE, since).map(|ns| 1e9 / ns);
    let mut rates = std::collections::HashMap::new();
    let names = [(BASE.to_string(), None), (CEILING.to_string(), None)]
        .into_iter()
        .chain(counted.iter().map(|(name, c)| (name.clone(), Some(*c))))
        .chain(std::iter::once((MEM64.to_string(), None)));
    for (name, c) in names {
        let Some(ns) = median_ns(&name, since) else {
            println!("{name:<26} (not measured in this run)");
            continue;
        };
        let rate = 1e9 / ns;
        rates.insert(name.clone(), rate);
        let spo = c.map_or("-".into(), |c| {
            format!("{:.3}", c.syncs as f64 / c.ops.max(1) as f64)
        });
        println!(
            "{name:<26} {:>10.1} {:>9.0} {:>12} {:>8}",
            ns / 1e3,
            rate,
            base.map_or("-".into(), |b| format!("{:.2}", rate / b)),
            spo
        );
    }
    if !passes.is_empty() {
        println!(
            "{:<26} {:>9} {:>9} {:>12} {:>8} {:>9} {:>9} {:>9} {:>9}",
            "latency pass",
            "ops",
            "ops/s",
            "x baseline",
            "syncs/op",
            "p50 µs",
            "p99 µs",
            "p99.9 µs",
            "max µs"
        );
        let b = passes[0].rate();
        for p in passes {
            println!(
                "{:<26} {:>9} {:>9.0} {:>12.2} {:>8} {:>9.0} {:>9.0} {:>9.0} {:>9.0}",
                p.name,
                p.ops,
                p.rate(),
                p.rate() / b,
                p.syncs
                    .map_or("-".into(), |s| format!("{:.3}", s as f64 / p.ops as f64)),
                p.pct(50.0),
                p.pct(99.0),
                p.pct(99.9),
                p.lat[p.lat.len() - 1],
            );
        }
    }
    if let Some(inter) = inter {
        let b = &inter.base;
        println!(
            "interleaved pass: {ROUNDS} rounds of {ROUND_SECS} s per configuration; baseline {:.0}-{:.0} ops/s",
            b.iter().copied().fold(f64::INFINITY, f64::min),
            b.iter().copied().fold(0.0, f64::max),
        );
        for (name, r) in &inter.ratios {
            let list: Vec<String> = r.iter().map(|x| format!("{x:.1}")).collect();
            println!(
                "{name:<26} x baseline: median {:.1}, rounds {}",
                median(r),
                list.join(" ")
            );
        }
    }
    // The target, for 64 pushers as threads and as one thread's queue:
    // judged on the interleaved pass (the baseline measured around each
    // round), with criterion's and the latency pass's ratios beside it.
    let base = base.or_else(|| passes.first().map(Pass::rate));
    for name in ["journal_x64", Q64] {
        let criterion = match (rates.get(name), base) {
            (Some(r), Some(b)) => format!("criterion {:.1}x", r / b),
            _ => "criterion -".into(),
        };
        let latency = passes
            .iter()
            .find(|p| p.name == name)
            .map_or(String::new(), |p| {
                format!(", latency pass {:.1}x", p.rate() / passes[0].rate())
            });
        match inter.and_then(|i| i.ratios(name)) {
            Some(r) => {
                let x = median(r);
                println!(
                    "target: {name} ops/s >= {TARGET} x {BASE} ops/s: interleaved median {x:.1}x \
                     ({criterion}{latency}): {}",
                    verdict(x >= TARGET)
                );
            }
            None => println!("target: {name}: {criterion}{latency} (no interleaved pass)"),
        }
    }
    if let Some(r) = inter.and_then(|i| i.ratios(CEILING)) {
        let c = median(r);
        let share = |name: &str| {
            inter
                .and_then(|i| i.ratios(name))
                .map_or("-".into(), |x| format!("{:.0}%", 100.0 * median(x) / c))
        };
        println!(
            "disk ceiling for 64 ops in flight ({CEILING}): interleaved median {c:.1}x {BASE}; \
             journal_x64 reaches {} of it, {Q64} {}",
            share("journal_x64"),
            share(Q64)
        );
    }
}

fn main() {
    let since = SystemTime::now() - Duration::from_secs(1);
    let args: Vec<String> = std::env::args().collect();
    let measuring = !args.iter().any(|a| a == "--test" || a == "--list");
    let dir = bench_dir("TT_JOURNAL_BENCH_DIR", "tt-journal-bench");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    if measuring {
        print_setting("tt-journal", &dir, "TT_JOURNAL_BENCH_DIR");
    }
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .without_plots()
        .configure_from_args();
    let counted = durable(&mut c, &dir);
    c.final_summary();
    if measuring {
        println!("latency pass: every push timed, {LATENCY_SECS} s per configuration");
        let passes = latency_pass(&dir);
        println!("interleaved pass: {ROUNDS} rounds, {ROUND_SECS} s per configuration");
        let inter = interleaved_pass(&dir);
        summary(since, &counted, &passes, Some(&inter));
    }
    let _ = std::fs::remove_dir_all(&dir);
}
