//! tt-ring benchmarks on a real file with `fdatasync` (docs/BENCHMARKS.md,
//! section "tt-ring", says what each one measures and records figures).
//!
//! - `durable_<size>_x<batch>/ring`: the producer pushes `batch` items of
//!   `size` bytes and advances (durable commit, format 2: data write,
//!   control write, one fdatasync). A consumer in the same process drains and
//!   advances whenever the ring is more than half full, outside the timed
//!   region, so the ring never fills.
//! - `durable_<size>_x<batch>/pwrite_fdatasync`: the same-run baseline:
//!   one `pwrite` of the batch's payload bytes, then `fdatasync`, on a file
//!   of the ring's size on the same file system.
//! - `durable_<size>_x<batch>/pwrite_ctl_fdatasync`: the ring's I/O
//!   pattern without the ring: that `pwrite`, a one-sector `pwrite` where
//!   the ring's control block goes, then one `fdatasync`.
//! - `durable_<size>_x<batch>/ring_memdevice`: the ring on a `MemDevice`
//!   (no system calls): the ring's own CPU cost (record CRCs, copies).
//! - `fold/<size>`: a consumer folds a warm ring holding about 48 MiB of
//!   records (committed in advances of about 1 MiB) from its freed
//!   position (seek back, no advance), reading from the page cache.
//!
//! Files go to `$TT_RING_BENCH_DIR`, default `<cargo target dir>/tt-ring-bench`
//! (on the repository's file system; `/tmp` may be a tmpfs, whose
//! `fdatasync` does nothing). After criterion (unless a filter is given),
//! an interleaved check times single ring, base and ctl advances in turn,
//! so that other I/O on the machine hits all three alike. Then a summary
//! prints, beside each other, criterion's medians of this run (from its
//! `estimates.json` files) and the interleaved medians: times, items/s,
//! MB/s (10^6 bytes), the ratios, and the targets with their verdicts
//! (judged on the interleaved medians).

use criterion::{Criterion, SamplingMode, Throughput};
use std::collections::HashMap;
use std::fs::File;
use std::hint::black_box;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tt_benchutil::{bench_dir, median, median_ns, print_setting, verdict, zeroed_file};
use tt_ring::format::record_size;
use tt_ring::{BlockDevice, Consumer, FileDevice, MemDevice, Producer};

/// Size of every ring file and baseline file.
const FILE_BYTES: u64 = 64 << 20;
const SECTOR: u32 = 4096;
const SIZES: [usize; 3] = [64, 4096, 65536];
const BATCHES: [usize; 2] = [1, 64];
/// Bytes of records the fold benchmark reads per iteration (about).
const FOLD_BYTES: u64 = 48 << 20;

fn size_name(size: usize) -> String {
    match size {
        s if s >= 1 << 20 && s % (1 << 20) == 0 => format!("{}MiB", s >> 20),
        s if s >= 1 << 10 && s % (1 << 10) == 0 => format!("{}KiB", s >> 10),
        s => format!("{s}B"),
    }
}

fn durable_group(size: usize, batch: usize) -> String {
    format!("durable_{}_x{batch}", size_name(size))
}

fn payload(size: usize) -> Vec<u8> {
    (0..size).map(|i| (i * 31 + 7) as u8).collect()
}

/// A producer on a freshly formatted ring, with a consumer that drains
/// (outside any timing) whenever the ring is more than half full.
struct RingWriter<D: BlockDevice> {
    p: Producer<Arc<D>>,
    c: Consumer<Arc<D>>,
    half: u64,
    item: Vec<u8>,
    batch: usize,
}

impl<D: BlockDevice> RingWriter<D> {
    fn new(dev: Arc<D>, size: usize, batch: usize) -> RingWriter<D> {
        Producer::create(&dev).unwrap();
        let p = Producer::attach(dev.clone()).unwrap();
        RingWriter {
            half: p.debug_info().capacity / 2,
            p,
            c: Consumer::attach(dev).unwrap(),
            item: payload(size),
            batch,
        }
    }

    /// Push a batch and advance; the time this took, consumer excluded.
    fn advance(&mut self) -> Duration {
        if self.p.position() - self.c.position() > self.half {
            let (n, next) = self
                .c
                .fold(0u64, |n, it| n + it.data.len() as u64)
                .expect("drain");
            black_box(n);
            self.c.advance(next).expect("consumer advance");
        }
        let start = Instant::now();
        for _ in 0..self.batch {
            self.p.push(&self.item).expect("push");
        }
        self.p.advance().expect("advance");
        start.elapsed()
    }
}

/// The baselines: the batch's payload bytes written with one `pwrite` at
/// the next offset of a file (wrapping), then `fdatasync`; with
/// `control`, also one sector written at offset 0 before the
/// `fdatasync`, as the ring does with its control block.
struct PlainWriter<'a> {
    file: &'a File,
    bytes: Vec<u8>,
    control: Vec<u8>,
    off: u64,
    control_write: bool,
}

impl PlainWriter<'_> {
    fn new(file: &File, size: usize, batch: usize, control_write: bool) -> PlainWriter<'_> {
        let item = payload(size);
        PlainWriter {
            file,
            bytes: item.iter().copied().cycle().take(size * batch).collect(),
            control: vec![0x5a; SECTOR as usize],
            off: DATA_START,
            control_write,
        }
    }

    fn advance(&mut self) -> Duration {
        let start = Instant::now();
        if self.off + self.bytes.len() as u64 > FILE_BYTES {
            self.off = DATA_START;
        }
        self.file.write_all_at(&self.bytes, self.off).unwrap();
        if self.control_write {
            self.file.write_all_at(&self.control, 0).unwrap();
        }
        self.file.sync_data().unwrap();
        self.off += self.bytes.len() as u64;
        start.elapsed()
    }
}

/// Where the baselines' data starts: after the "control block" sectors.
const DATA_START: u64 = 2 * SECTOR as u64;

fn timed(mut f: impl FnMut() -> Duration) -> impl FnMut(u64) -> Duration {
    move |iters| (0..iters).map(|_| f()).sum()
}

fn durable(c: &mut Criterion, dir: &Path) {
    let ring_path = dir.join("ring");
    zeroed_file(&ring_path, FILE_BYTES);
    let base = zeroed_file(&dir.join("baseline"), FILE_BYTES);
    for size in SIZES {
        for batch in BATCHES {
            let mut g = c.benchmark_group(durable_group(size, batch));
            g.sampling_mode(SamplingMode::Flat);
            g.sample_size(20);
            g.throughput(Throughput::BytesDecimal((size * batch) as u64));
            let dev = Arc::new(FileDevice::open(&ring_path, SECTOR).unwrap());
            let mut w = RingWriter::new(dev, size, batch);
            g.bench_function("ring", |b| b.iter_custom(timed(|| w.advance())));
            let mem = Arc::new(MemDevice::new(FILE_BYTES, SECTOR));
            let mut w = RingWriter::new(mem, size, batch);
            g.bench_function("ring_memdevice", |b| b.iter_custom(timed(|| w.advance())));
            let mut w = PlainWriter::new(&base, size, batch, false);
            g.bench_function("pwrite_fdatasync", |b| b.iter_custom(timed(|| w.advance())));
            let mut w = PlainWriter::new(&base, size, batch, true);
            g.bench_function("pwrite_ctl_fdatasync", |b| {
                b.iter_custom(timed(|| w.advance()))
            });
            g.finish();
        }
    }
}

/// Medians (µs) of ring, base and ctl advances timed one at a time in
/// rotating order, so that whatever else the machine does hits all three
/// alike. About `INTERLEAVE_SECS` per configuration.
const INTERLEAVE_SECS: f64 = 1.5;

fn interleaved(dir: &Path) -> HashMap<(usize, usize), [f64; 3]> {
    let ring_path = dir.join("ring");
    zeroed_file(&ring_path, FILE_BYTES);
    let base = zeroed_file(&dir.join("baseline"), FILE_BYTES);
    let mut out = HashMap::new();
    for size in SIZES {
        for batch in BATCHES {
            let dev = Arc::new(FileDevice::open(&ring_path, SECTOR).unwrap());
            let mut ring = RingWriter::new(dev, size, batch);
            let mut plain = PlainWriter::new(&base, size, batch, false);
            let mut ctl = PlainWriter::new(&base, size, batch, true);
            let mut times: [Vec<f64>; 3] = Default::default();
            let start = Instant::now();
            let mut round = 0;
            while round < 20 || (round < 5000 && start.elapsed().as_secs_f64() < INTERLEAVE_SECS) {
                for k in 0..3 {
                    let which = (round + k) % 3;
                    let t = match which {
                        0 => ring.advance(),
                        1 => plain.advance(),
                        _ => ctl.advance(),
                    };
                    times[which].push(t.as_secs_f64() * 1e6);
                }
                round += 1;
            }
            out.insert((size, batch), times.map(|t| median(&t)));
        }
    }
    out
}

fn fold(c: &mut Criterion, dir: &Path) {
    let path = dir.join("ring");
    zeroed_file(&path, FILE_BYTES);
    let mut g = c.benchmark_group("fold");
    g.sampling_mode(SamplingMode::Flat);
    for size in SIZES {
        let dev = Arc::new(FileDevice::open(&path, SECTOR).unwrap());
        Producer::create(&dev).unwrap();
        let mut p = Producer::attach(dev).unwrap();
        let item = payload(size);
        let n = FOLD_BYTES / record_size(size as u64);
        // Committed in advances of about 1 MiB.
        let per_advance = ((1 << 20) / record_size(size as u64)).max(1);
        for i in 0..n {
            p.push(&item).unwrap();
            if i % per_advance == per_advance - 1 {
                p.advance().unwrap();
            }
        }
        p.advance().unwrap();
        drop(p);
        // Attached after the fill, so it knows the producer's position.
        let mut cons =
            Consumer::attach(Arc::new(FileDevice::open(&path, SECTOR).unwrap())).unwrap();
        let from = cons.position();
        g.throughput(Throughput::BytesDecimal(n * size as u64));
        g.bench_function(size_name(size), |b| {
            b.iter(|| {
                cons.seek(from).unwrap();
                let (got, _) = cons
                    .fold((0u64, 0u64), |(k, bytes), it| {
                        (k + 1, bytes + it.data.len() as u64)
                    })
                    .unwrap();
                assert_eq!(got, (n, n * size as u64));
            })
        });
    }
    g.finish();
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.digits$}"))
}

fn summary(since: SystemTime, inter: &HashMap<(usize, usize), [f64; 3]>) {
    println!("\ntt-ring summary (MB = 10^6 bytes; times are medians, in µs per advance)");
    println!("  base: pwrite + fdatasync; ctl: pwrite + 1-sector pwrite + one fdatasync (the ring's I/O); mem: ring on a MemDevice");
    println!("  ratio: ring MB/s / base MB/s (= base time / ring time)");
    println!(
        "{:<18} {:>21} {:>9} {:>9} | {:>28} {:>7} {:>8}",
        "", "criterion:  ring", "base", "mem", "interleaved:  ring", "base", "ctl"
    );
    let mut crit = HashMap::new();
    for size in SIZES {
        for batch in BATCHES {
            let g = durable_group(size, batch);
            let us = |f: &str| median_ns(&g, f, since).map(|ns| ns / 1e3);
            let (ring, base) = (us("ring"), us("pwrite_fdatasync"));
            if let (Some(r), Some(b)) = (ring, base) {
                crit.insert((size, batch), (r, b));
            }
            let i = inter.get(&(size, batch));
            println!(
                "{g:<18} {:>21} {:>9} {:>9} | {:>28} {:>7} {:>8}",
                opt(ring, 1),
                opt(base, 1),
                opt(us("ring_memdevice"), 1),
                opt(i.map(|i| i[0]), 1),
                opt(i.map(|i| i[1]), 1),
                opt(i.map(|i| i[2]), 1),
            );
        }
    }
    println!(
        "{:<18} {:>12} {:>9} {:>9} {:>9} | {:>12} {:>9} {:>9} {:>9} {:>9}",
        "rates",
        "ring items/s",
        "ring MB/s",
        "base MB/s",
        "ratio",
        "ring items/s",
        "ring MB/s",
        "base MB/s",
        "ratio",
        "ring/ctl"
    );
    for size in SIZES {
        for batch in BATCHES {
            let bytes = (size * batch) as f64;
            let c = crit.get(&(size, batch));
            let i = inter.get(&(size, batch));
            println!(
                "{:<18} {:>12} {:>9} {:>9} {:>9} | {:>12} {:>9} {:>9} {:>9} {:>9}",
                durable_group(size, batch),
                opt(c.map(|c| batch as f64 / c.0 * 1e6), 0),
                opt(c.map(|c| bytes / c.0), 2),
                opt(c.map(|c| bytes / c.1), 2),
                opt(c.map(|c| c.1 / c.0), 2),
                opt(i.map(|i| batch as f64 / i[0] * 1e6), 0),
                opt(i.map(|i| bytes / i[0]), 2),
                opt(i.map(|i| bytes / i[1]), 2),
                opt(i.map(|i| i[1] / i[0]), 2),
                opt(i.map(|i| i[2] / i[0]), 2),
            );
        }
    }
    let x = |size: usize, batch: usize| inter.get(&(size, batch));
    for batch in BATCHES {
        let c = crit.get(&(65536, batch)).map(|c| c.1 / c.0);
        if let Some(i) = x(65536, batch) {
            let r = i[1] / i[0];
            println!(
                "target: 64KiB items x{batch}: ring MB/s >= 0.80 x base MB/s: {r:.3} (criterion {}): {}",
                opt(c, 3),
                verdict(r >= 0.8)
            );
        }
    }
    for size in SIZES {
        let c = match (crit.get(&(size, 1)), crit.get(&(size, 64))) {
            (Some(one), Some(many)) => Some(64.0 * one.0 / many.0),
            _ => None,
        };
        if let (Some(one), Some(many)) = (x(size, 1), x(size, 64)) {
            let r = 64.0 * one[0] / many[0];
            let v = if size == 64 {
                verdict(r >= 30.0)
            } else {
                "no target"
            };
            println!(
                "target: {} items: x64 items/s >= 30 x the x1 items/s: {r:.1}x (criterion {}x): {v}",
                size_name(size),
                opt(c, 1)
            );
        }
    }
    println!("{:<18} {:>9} {:>12} {:>9}", "fold", "ms", "items/s", "MB/s");
    for size in SIZES {
        let n = FOLD_BYTES / record_size(size as u64);
        let name = format!("fold/{}", size_name(size));
        match median_ns("fold", &size_name(size), since) {
            Some(ns) => println!(
                "{name:<18} {:>9.2} {:>12.0} {:>9.1}",
                ns / 1e6,
                n as f64 / ns * 1e9,
                (n * size as u64) as f64 / ns * 1e3
            ),
            None => println!("{name:<18} (not measured in this run)"),
        }
    }
}

/// Does the command line name a filter (a bare argument that is not the
/// value of one of criterion's options)?
fn is_filtered(args: &[String]) -> bool {
    const TAKES_VALUE: &[&str] = &[
        "-s",
        "--save-baseline",
        "-b",
        "--baseline",
        "--baseline-lenient",
        "--load-baseline",
        "-c",
        "--color",
        "--sample-size",
        "--warm-up-time",
        "--measurement-time",
        "--nresamples",
        "--noise-threshold",
        "--confidence-level",
        "--significance-level",
        "--profile-time",
        "--plotting-backend",
        "--output-format",
        "--format",
        "--skip",
        "--logfile",
        "--test-threads",
    ];
    args.iter()
        .enumerate()
        .skip(1)
        .any(|(i, a)| !a.starts_with('-') && !TAKES_VALUE.contains(&args[i - 1].as_str()))
}

fn main() {
    let since = SystemTime::now() - Duration::from_secs(1);
    let args: Vec<String> = std::env::args().collect();
    let measuring = !args.iter().any(|a| a == "--test" || a == "--list");
    let dir = bench_dir("TT_RING_BENCH_DIR", "tt-ring-bench");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    if measuring {
        print_setting("tt-ring", &dir, "TT_RING_BENCH_DIR");
    }
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .nresamples(10_000)
        .without_plots()
        .configure_from_args();
    durable(&mut c, &dir);
    fold(&mut c, &dir);
    c.final_summary();
    if measuring {
        // A filter (a bare argument) means a partial run: skip the check.
        let filtered = is_filtered(&args);
        let inter = if filtered {
            HashMap::new()
        } else {
            println!("interleaved check: ring, base and ctl advances in turn, ~{INTERLEAVE_SECS} s per configuration");
            interleaved(&dir)
        };
        summary(since, &inter);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
