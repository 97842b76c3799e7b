//! Admission-check benchmarks for `tt_host::resources`.
//!
//! The tree: a root policy, policies at every prefix of one depth-8 path
//! (`acme:eu:prod:web:frontend:shard-3:rack-7:node-1`) and at 100 other
//! tenants (`t0` .. `t99`), and 100,000 running unikernels: half spread
//! under the depth-8 path's nine ancestors (in side branches at every
//! level, so every ancestor's usage is large), half under the tenants.
//!
//! - `admission/check_depth8`: `Resources::check` of a new unikernel at the
//!   depth-8 path; it is admitted, so all nine policies are checked. Target:
//!   <= 10 µs.
//! - `admission/naive_check_depth8`: the same-run baseline: the same
//!   decision made like the property test's model, by summing, for every
//!   ancestor with a policy, over the list of all running unikernels.
//! - `admission/insert_remove_depth8`: `insert_unikernel` then
//!   `remove_unikernel` of that unikernel.
//! - `admission/set_policy_same_depth8`: replace the depth-8 path's policy
//!   with an equal one (no narrowing: O(depth), no subtree walk).
//! - `admission/set_policy_narrow_widen_depth8`: narrow the depth-8 path's
//!   policy by one unikernel (walks the 5,555 unikernels below it to check
//!   their cpus and bridges), then widen it back (O(depth)).
//!
//! After criterion, a summary times check and the baseline again in plain
//! loops and prints the figures, the ratio and the target's verdict.
//!
//! Run: `cargo bench -p tt-host --bench admission`.

use criterion::{BenchmarkId, Criterion, SamplingMode};
use std::collections::{BTreeMap, BTreeSet};
use std::hint::black_box;
use std::time::{Duration, Instant};
use tt_host::resources::{Name, Path, Policy, Resources, Unikernel};

const RUNNING: usize = 100_000;
const DEEP: &str = "acme:eu:prod:web:frontend:shard-3:rack-7:node-1";
const TENANTS: usize = 100;
const TARGET_US: f64 = 10.0;

fn policy(unikernels: u32) -> Policy {
    Policy {
        unikernels,
        memory_mb: 1 << 40,
        cpus: (0..64).collect(),
        block_mb: Some(1 << 40),
        bridges: ["br0", "br1"].iter().map(|s| s.to_string()).collect(),
    }
}

fn unikernel(cpu: u16, block_mb: u64) -> Unikernel {
    Unikernel {
        memory_mb: 64,
        cpus: BTreeSet::from([cpu]),
        block_mb,
        bridges: BTreeSet::from(["br0".to_string()]),
    }
}

struct Fixture {
    tree: Resources,
    deep: Path,
    new_name: Name,
    new_uk: Unikernel,
}

fn build() -> Fixture {
    let deep: Path = DEEP.parse().expect("valid path");
    let mut tree = Resources::new(policy(10_000_000));
    for (depth, p) in deep.ancestors().enumerate().skip(1) {
        tree.set_policy(&p, policy(1_000_000 - depth as u32))
            .expect("ancestor policies nest");
    }
    for t in 0..TENANTS {
        tree.set_policy(&format!("t{t}").parse().expect("valid"), policy(10_000))
            .expect("tenant policy fits");
    }
    let ancestors: Vec<Path> = deep.ancestors().collect();
    for i in 0..RUNNING {
        let j = i / 2;
        let name = if i % 2 == 0 {
            let at = &ancestors[j % ancestors.len()];
            let side = j / ancestors.len() % 64;
            format!("{}side-{side}:u{i}", prefix(at))
        } else {
            format!("t{}:app-{}:u{i}", j % TENANTS, j / TENANTS % 50)
        };
        let name: Name = name.parse().expect("valid name");
        tree.insert_unikernel(&name, unikernel((i % 64) as u16, (i % 3) as u64))
            .expect("fixture fits its policies");
    }
    let new_name: Name = format!("{DEEP}:new").parse().expect("valid name");
    let new_uk = unikernel(5, 10);
    tree.check(&new_name, &new_uk)
        .expect("the benchmarked launch is admitted");
    Fixture {
        tree,
        deep,
        new_name,
        new_uk,
    }
}

/// `path` followed by `:`, or nothing for the root.
fn prefix(path: &Path) -> String {
    if path.is_root() {
        String::new()
    } else {
        format!("{path}:")
    }
}

/// The baseline: the brute-force model's data and method.
struct Naive {
    policies: BTreeMap<Path, Policy>,
    running: Vec<(Name, Unikernel)>,
}

impl Naive {
    fn from(tree: &Resources) -> Naive {
        Naive {
            policies: tree
                .iter_policies()
                .map(|(p, pol)| (p, pol.clone()))
                .collect(),
            running: tree
                .iter_unikernels()
                .map(|(n, uk)| (n, uk.clone()))
                .collect(),
        }
    }

    /// Whether `uk` may start as `name`: for every ancestor with a policy,
    /// sum over all running unikernels below it (name collisions aside).
    fn check(&self, name: &Name, uk: &Unikernel) -> bool {
        for anc in name.path().ancestors() {
            let Some(p) = self.policies.get(&anc) else {
                continue;
            };
            let (mut n, mut mem, mut block) = (0u64, 0u64, 0u64);
            for (other, used) in &self.running {
                if anc.is_prefix_of(other.path()) {
                    n += 1;
                    mem = mem.saturating_add(used.memory_mb);
                    block = block.saturating_add(used.block_mb);
                }
            }
            let block_ok = match p.block_mb {
                None => uk.block_mb == 0,
                Some(limit) => block.saturating_add(uk.block_mb) <= limit,
            };
            if n + 1 > u64::from(p.unikernels)
                || mem.saturating_add(uk.memory_mb) > p.memory_mb
                || !block_ok
                || !uk.cpus.is_subset(&p.cpus)
                || !uk.bridges.is_subset(&p.bridges)
            {
                return false;
            }
        }
        true
    }
}

fn benches(c: &mut Criterion, f: &mut Fixture, naive: &Naive) {
    let mut g = c.benchmark_group("admission");
    g.sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    g.bench_function("check_depth8", |b| {
        b.iter(|| black_box(f.tree.check(black_box(&f.new_name), black_box(&f.new_uk))))
    });
    g.bench_function("insert_remove_depth8", |b| {
        let mut uk = Some(f.new_uk.clone());
        b.iter(|| {
            f.tree
                .insert_unikernel(&f.new_name, uk.take().expect("put back"))
                .expect("admitted");
            uk = f.tree.remove_unikernel(&f.new_name);
        })
    });
    let wide = f.tree.find_policy(&f.deep).expect("set").clone();
    let narrow = Policy {
        unikernels: wide.unikernels - 1,
        ..wide.clone()
    };
    g.bench_function("set_policy_same_depth8", |b| {
        b.iter(|| {
            f.tree
                .set_policy(&f.deep, wide.clone())
                .expect("same policy fits")
        })
    });
    g.bench_function("set_policy_narrow_widen_depth8", |b| {
        b.iter(|| {
            f.tree
                .set_policy(&f.deep, narrow.clone())
                .expect("narrower policy still fits the usage");
            f.tree
                .set_policy(&f.deep, wide.clone())
                .expect("widening back fits its ancestors");
        })
    });
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_secs(2));
    g.bench_with_input(
        BenchmarkId::new("naive_check_depth8", RUNNING),
        naive,
        |b, naive| b.iter(|| black_box(naive.check(black_box(&f.new_name), &f.new_uk))),
    );
    g.finish();
}

/// Median time per call of `f`, over `rounds` rounds of `per_round` calls.
fn median_per_call(rounds: usize, per_round: usize, mut f: impl FnMut()) -> Duration {
    let mut times: Vec<Duration> = (0..rounds)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..per_round {
                f();
            }
            start.elapsed() / per_round as u32
        })
        .collect();
    times.sort();
    times[rounds / 2]
}

fn summary(f: &Fixture, naive: &Naive) {
    let check = median_per_call(21, 10_000, || {
        black_box(f.tree.check(black_box(&f.new_name), black_box(&f.new_uk))).ok();
    });
    let base = median_per_call(7, 3, || {
        black_box(naive.check(black_box(&f.new_name), &f.new_uk));
    });
    let us = check.as_secs_f64() * 1e6;
    println!();
    println!("summary: {RUNNING} running unikernels, check at depth 8 (9 policies on the path)");
    println!("  check (incremental usage)   {us:>10.3} µs");
    println!(
        "  naive (walks all running)   {:>10.3} µs   ratio {:.0}x",
        base.as_secs_f64() * 1e6,
        base.as_secs_f64() / check.as_secs_f64()
    );
    println!(
        "  target check <= {TARGET_US} µs: {}",
        if us <= TARGET_US { "met" } else { "MISSED" }
    );
}

fn main() {
    let start = Instant::now();
    let mut fixture = build();
    let naive = Naive::from(&fixture.tree);
    assert_eq!(naive.running.len(), RUNNING);
    assert!(naive.check(&fixture.new_name, &fixture.new_uk));
    println!(
        "built the tree ({RUNNING} unikernels, {} policies) in {:.2?}; \
         running below each ancestor of the depth-8 path, root first: {:?}",
        naive.policies.len(),
        start.elapsed(),
        fixture
            .deep
            .ancestors()
            .map(|p| fixture.tree.usage(&p).unikernels)
            .collect::<Vec<_>>()
    );
    let mut c = Criterion::default().configure_from_args();
    benches(&mut c, &mut fixture, &naive);
    c.final_summary();
    summary(&fixture, &naive);
}
