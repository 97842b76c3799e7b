//! Capacity-pool benchmarks for `tt_host::pools` (issue 19).
//!
//! The fixture: 10,000 pools, each topped up with a different amount, and
//! 100,000 workloads, 10 per pool, with draws from a fixed pseudo-random
//! sequence, so the pools' EmptyAt are spread out. Built twice: as
//! `Pools` (an ordered EmptyAt index) and as `ScanPools` (no index).
//!
//! - `pools/add_remove_workload/{indexed,scan}`: add a workload to one pool
//!   and remove it again (two changes, each syncing the pool and, when
//!   indexed, re-keying it), cycling through the pools with the clock
//!   moving 1 µs per call.
//! - `pools/next_expiry/{indexed,scan}`: the pool that empties first.
//! - `pools/admission/indexed`: `would_be_empty_within` of one pool.
//!
//! After criterion, a summary times add, remove and next_expiry alone in
//! plain loops, beside the scan, and prints the target's verdict (each
//! under 10 µs with the index).
//!
//! Run: `cargo bench -p tt-host --bench pools`.

use criterion::Criterion;
use std::hint::black_box;
use std::time::{Duration, Instant};
use tt_host::pools::{Draw, Pool, Pools, ScanPools, MICRO, NANOS_PER_SECOND};

const POOLS: usize = 10_000;
const WORKLOADS_PER_POOL: usize = 10;
const TARGET_US: f64 = 10.0;
/// The fixture's clock starts here (an epoch-like instant, in ns).
const START_NS: u64 = 1_800_000_000 * NANOS_PER_SECOND;

/// A fixed xorshift sequence: the same fixture in every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn draw(rng: &mut Rng) -> Draw {
    Draw {
        cu: 1 + rng.next() % (MICRO / 2),
        su: rng.next() % (MICRO / 10),
        ipv4u: if rng.next() % 10 == 0 { MICRO } else { 0 },
    }
}

struct Fixture {
    indexed: Pools,
    scan: ScanPools,
    names: Vec<String>,
    extra: Draw,
    /// The fake clock: every change happens at a later instant.
    now: u64,
    /// The next pool to change (cycles through them).
    next: usize,
}

fn build() -> Fixture {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut indexed = Pools::new();
    let mut scan = ScanPools::new();
    let names: Vec<String> = (0..POOLS).map(|i| format!("pool-{i:05}")).collect();
    for name in &names {
        let mut pool = Pool::new(name.as_str(), START_NS);
        // Enough for days at the pool's draw, different for every pool.
        let secs = 1_000_000 + rng.next() % 100_000_000;
        pool.top_up(secs, secs, secs, START_NS)
            .expect("fixture top-up fits");
        for _ in 0..WORKLOADS_PER_POOL {
            pool.add_workload(draw(&mut rng), START_NS)
                .expect("fixture draw fits");
        }
        indexed.insert(pool.clone()).expect("unique name");
        scan.insert(pool).expect("unique name");
    }
    Fixture {
        indexed,
        scan,
        names,
        extra: draw(&mut rng),
        now: START_NS,
        next: 0,
    }
}

fn benches(c: &mut Criterion, f: &mut Fixture) {
    let mut g = c.benchmark_group("pools");
    g.sample_size(50)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    let (names, extra) = (&f.names, f.extra);
    g.bench_function("add_remove_workload/indexed", |b| {
        b.iter(|| {
            let name = &names[f.next % POOLS];
            f.next += 1;
            f.now += 1_000;
            let now = f.now;
            f.indexed
                .add_workload(name, extra, now)
                .expect("known pool");
            black_box(f.indexed.remove_workload(name, extra, now).expect("added"))
        })
    });
    g.bench_function("add_remove_workload/scan", |b| {
        b.iter(|| {
            let name = &names[f.next % POOLS];
            f.next += 1;
            f.now += 1_000;
            let now = f.now;
            f.scan.add_workload(name, extra, now).expect("known pool");
            black_box(f.scan.remove_workload(name, extra, now).expect("added"))
        })
    });
    g.bench_function("next_expiry/indexed", |b| {
        b.iter(|| black_box(f.indexed.next_expiry()))
    });
    g.bench_function("next_expiry/scan", |b| {
        b.iter(|| black_box(f.scan.next_expiry()))
    });
    g.bench_function("admission/indexed", |b| {
        b.iter(|| {
            let name = &names[f.next % POOLS];
            f.next += 1;
            let now = f.now;
            black_box(
                f.indexed
                    .would_be_empty_within(name, extra, now, 120 * NANOS_PER_SECOND)
                    .expect("known pool"),
            )
        })
    });
    g.finish();
}

/// Median time per call, over `rounds` rounds of `per_round` calls of `f`,
/// which gets the call's number.
fn median_per_call(rounds: usize, per_round: usize, mut f: impl FnMut(usize)) -> Duration {
    let mut times: Vec<Duration> = (0..rounds)
        .map(|r| {
            let start = Instant::now();
            for k in 0..per_round {
                f(r * per_round + k);
            }
            start.elapsed() / per_round as u32
        })
        .collect();
    times.sort();
    times[rounds / 2]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn summary(f: &mut Fixture) {
    let (names, extra) = (&f.names, f.extra);
    let t0 = f.now;
    // Add to 5,000 pools in a round, then remove from the same ones, timing
    // the two phases apart; the clock moves 1 µs per change.
    let mut adds = Vec::new();
    let mut removes = Vec::new();
    let (mut scan_adds, mut scan_removes) = (Vec::new(), Vec::new());
    let per_round = POOLS / 2;
    for round in 0..21 {
        let base = t0 + (round * 2 * per_round) as u64 * 1_000;
        let first = (round * per_round) % POOLS;
        let time = |pools: &mut dyn FnMut(&str, u64)| {
            let start = Instant::now();
            for k in 0..per_round {
                pools(&names[(first + k) % POOLS], base + k as u64 * 1_000);
            }
            start.elapsed() / per_round as u32
        };
        adds.push(time(&mut |n, t| {
            black_box(f.indexed.add_workload(n, extra, t).expect("known"));
        }));
        removes.push(time(&mut |n, t| {
            black_box(f.indexed.remove_workload(n, extra, t + 500).expect("added"));
        }));
        scan_adds.push(time(&mut |n, t| {
            black_box(f.scan.add_workload(n, extra, t).expect("known"));
        }));
        scan_removes.push(time(&mut |n, t| {
            black_box(f.scan.remove_workload(n, extra, t + 500).expect("added"));
        }));
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let (add, remove) = (median(&mut adds), median(&mut removes));
    let (scan_add, scan_remove) = (median(&mut scan_adds), median(&mut scan_removes));
    let next = median_per_call(21, 100_000, |_| {
        black_box(f.indexed.next_expiry());
    });
    let scan_next = median_per_call(7, 20, |_| {
        black_box(f.scan.next_expiry());
    });
    assert_eq!(
        f.indexed.next_expiry(),
        f.scan.next_expiry(),
        "the index and the scan agree"
    );
    let verdict = |d: Duration| if us(d) <= TARGET_US { "met" } else { "MISSED" };
    println!();
    println!(
        "summary: {POOLS} pools, {} workloads",
        POOLS * WORKLOADS_PER_POOL
    );
    println!("                      indexed        scan (no index)");
    for (what, ix, sc) in [
        ("add_workload", add, scan_add),
        ("remove_workload", remove, scan_remove),
        ("next_expiry", next, scan_next),
    ] {
        println!(
            "  {what:<16} {:>10.3} µs {:>12.3} µs   target <= {TARGET_US} µs: {}",
            us(ix),
            us(sc),
            verdict(ix)
        );
    }
    println!(
        "  next_expiry: the index is {:.0}x faster than the scan",
        scan_next.as_secs_f64() / next.as_secs_f64()
    );
}

fn main() {
    let start = Instant::now();
    let mut fixture = build();
    let (at, name) = fixture.indexed.next_expiry().expect("pools draw");
    println!(
        "built {POOLS} pools with {} workloads in {:.2?}; the first empties at +{} s ({name})",
        POOLS * WORKLOADS_PER_POOL,
        start.elapsed(),
        (at - START_NS) / NANOS_PER_SECOND
    );
    let mut c = Criterion::default().configure_from_args();
    benches(&mut c, &mut fixture);
    c.final_summary();
    summary(&mut fixture);
}
