//! Tests of the set of pools and property tests of the whole model against
//! a replay of the full history, with a fake clock.

use super::*;
use proptest::prelude::*;
use std::collections::BTreeMap;

const S: u64 = NANOS_PER_SECOND;

fn cu(micro: u64) -> Draw {
    Draw {
        cu: micro,
        ..Draw::ZERO
    }
}

#[test]
fn next_expiry_follows_workloads_and_top_ups() {
    let mut pools = Pools::new();
    pools.create("a", 0).unwrap();
    pools.create("b", 0).unwrap();
    assert_eq!(pools.next_expiry(), None, "nothing draws");
    pools.top_up("a", 10, 0, 0, 0).unwrap();
    pools.top_up("b", 20, 0, 0, 0).unwrap();
    assert_eq!(pools.add_workload("b", cu(MICRO), 0).unwrap(), Some(20 * S));
    assert_eq!(pools.next_expiry(), Some((20 * S, "b")));
    pools.add_workload("a", cu(MICRO), 0).unwrap();
    assert_eq!(pools.next_expiry(), Some((10 * S, "a")));
    // A top-up of a past the other moves the expiry to b.
    assert_eq!(pools.top_up("a", 15, 0, 0, 5 * S).unwrap(), Some(25 * S));
    assert_eq!(pools.next_expiry(), Some((20 * S, "b")));
    // Removing b's only workload takes it out of the index.
    assert_eq!(pools.remove_workload("b", cu(MICRO), 6 * S).unwrap(), None);
    assert_eq!(pools.next_expiry(), Some((25 * S, "a")));
    pools.assert_index_in_step();
}

#[test]
fn due_lists_the_pools_to_stop_soonest_first() {
    let mut pools = Pools::new();
    for (name, secs) in [("x", 3), ("y", 1), ("z", 9)] {
        pools.create(name, 0).unwrap();
        pools.top_up(name, secs, 0, 0, 0).unwrap();
        pools.add_workload(name, cu(MICRO), 0).unwrap();
    }
    let due: Vec<_> = pools.due(3 * S).collect();
    assert_eq!(due, vec![(S, "y"), (3 * S, "x")]);
    assert_eq!(pools.due(S - 1).count(), 0);
}

#[test]
fn ties_go_to_the_smaller_name_in_both_implementations() {
    let mut pools = Pools::new();
    let mut scan = ScanPools::new();
    for name in ["m", "c", "k"] {
        let mut p = Pool::new(name, 0);
        p.top_up(4, 0, 0, 0).unwrap();
        p.add_workload(cu(MICRO), 0).unwrap();
        pools.insert(p.clone()).unwrap();
        scan.insert(p).unwrap();
    }
    assert_eq!(pools.next_expiry(), Some((4 * S, "c")));
    assert_eq!(scan.next_expiry(), pools.next_expiry());
}

#[test]
fn unknown_and_duplicate_names_are_refused_by_name() {
    let mut pools = Pools::new();
    pools.create("a", 0).unwrap();
    let err = pools.create("a", 0).unwrap_err();
    assert_eq!(err, PoolsError::Exists { pool: "a".into() });
    let err = pools.add_workload("nope", cu(1), 0).unwrap_err();
    assert!(err.to_string().contains("\"nope\""), "{err}");
    assert!(pools
        .would_be_empty_within("nope", Draw::ZERO, 0, 0)
        .is_err());
    assert!(pools.remove("nope").is_err());
}

#[test]
fn a_failed_change_still_keeps_the_index_in_step() {
    let mut pools = Pools::new();
    pools.create("a", 0).unwrap();
    pools.top_up("a", 1, 0, 0, 0).unwrap();
    pools.add_workload("a", cu(MICRO), 0).unwrap();
    // At 5 s the pool is long empty; the refused removal still syncs it,
    // which moves a zero counter's EmptyAt to the sync.
    let err = pools
        .remove_workload("a", cu(2 * MICRO), 5 * S)
        .unwrap_err();
    assert!(matches!(
        err,
        PoolsError::Pool(PoolError::DrawUnderflow { .. })
    ));
    pools.assert_index_in_step();
    assert_eq!(pools.next_expiry(), Some((5 * S, "a")));
}

#[test]
fn removing_a_pool_takes_it_out_of_the_index() {
    let mut pools = Pools::new();
    pools.create("a", 0).unwrap();
    pools.add_workload("a", cu(1), 0).unwrap();
    assert_eq!(pools.next_expiry(), Some((0, "a")));
    let p = pools.remove("a").unwrap();
    assert_eq!(p.name(), "a");
    assert_eq!(pools.next_expiry(), None);
    assert!(pools.is_empty());
}

#[test]
fn pools_persist_as_a_list_and_come_back_indexed() {
    let mut pools = Pools::new();
    for (i, name) in ["a", "b", "c"].into_iter().enumerate() {
        pools.create(name, 0).unwrap();
        pools.top_up(name, 10 + i as u64, 1, 0, 0).unwrap();
        pools.add_workload(name, cu(MICRO), S).unwrap();
    }
    let json = serde_json::to_string(&pools).unwrap();
    let back: Pools = serde_json::from_str(&json).unwrap();
    assert_eq!(back, pools);
    back.assert_index_in_step();
    assert_eq!(back.next_expiry(), Some((11 * S, "a")));
    // Time passed while the daemon was down is charged on the next sync.
    let mut back = back;
    back.sync_all(8 * S);
    assert_eq!(back.get("a").unwrap().left(Unit::Cu), 3 * PER_UNIT_SECOND);
    back.assert_index_in_step();
    // A list with a name twice is refused.
    let twice = format!(
        "[{0},{0}]",
        serde_json::to_string(pools.get("a").unwrap()).unwrap()
    );
    let err = serde_json::from_str::<Pools>(&twice).unwrap_err();
    assert!(err.to_string().contains("exists already"), "{err}");
}

// ---- property tests -------------------------------------------------------

const NAMES: [&str; 4] = ["p0", "p1", "p2", "p3"];

#[derive(Debug, Clone)]
enum Op {
    /// Move the fake clock forward.
    Advance(u64),
    Add(usize, Draw),
    /// Remove the live workload at this index (modulo their number).
    Remove(usize),
    /// Remove a draw no pool has: refused.
    RemoveBogus(usize),
    TopUp(usize, u64, u64, u64),
    Sync(usize),
    /// Sync at a time before now: changes nothing.
    StaleSync(usize, u64),
    SyncAll,
}

fn draw() -> impl Strategy<Value = Draw> {
    // Some kinds often 0, so counters without a draw stay put.
    let kind = prop_oneof![Just(0u64), 1u64..3_000_000];
    (kind.clone(), kind.clone(), kind).prop_map(|(cu, su, ipv4u)| Draw { cu, su, ipv4u })
}

fn op() -> impl Strategy<Value = Op> {
    let pool = 0..NAMES.len();
    prop_oneof![
        3 => prop_oneof![0u64..3 * S, Just(1u64), Just(S)].prop_map(Op::Advance),
        3 => (pool.clone(), draw()).prop_map(|(p, d)| Op::Add(p, d)),
        2 => any::<usize>().prop_map(Op::Remove),
        1 => pool.clone().prop_map(Op::RemoveBogus),
        2 => (pool.clone(), 0u64..20, 0u64..20, 0u64..5).prop_map(|(p, c, s, i)| Op::TopUp(p, c, s, i)),
        1 => pool.clone().prop_map(Op::Sync),
        1 => (pool, 0u64..2 * S).prop_map(|(p, b)| Op::StaleSync(p, b)),
        1 => Just(Op::SyncAll),
    ]
}

/// The model: each pool's full history, replayed from the start on every
/// query in plain u128 arithmetic.
#[derive(Debug, Default)]
struct Model {
    history: BTreeMap<&'static str, Vec<(u64, Event)>>,
}

#[derive(Debug, Clone, Copy)]
enum Event {
    Draw([u64; 3], bool),
    TopUp([u64; 3]),
    Observe,
}

struct Replayed {
    left: [u128; 3],
    draw: [u64; 3],
    at: u64,
}

impl Model {
    fn record(&mut self, pool: &'static str, t: u64, e: Event) {
        self.history.entry(pool).or_default().push((t, e));
    }

    fn replay(&self, pool: &str) -> Replayed {
        let mut r = Replayed {
            left: [0; 3],
            draw: [0; 3],
            at: 0,
        };
        for &(t, e) in &self.history[pool] {
            // Time never runs backwards for a pool: an event stamped
            // earlier than the last one happens at the last one.
            let t = t.max(r.at);
            for k in 0..3 {
                let spent = r.draw[k] as u128 * (t - r.at) as u128;
                r.left[k] = r.left[k].saturating_sub(spent);
            }
            r.at = t;
            match e {
                Event::Draw(d, add) => {
                    for (have, change) in r.draw.iter_mut().zip(d) {
                        *have = if add { *have + change } else { *have - change };
                    }
                }
                Event::TopUp(u) => {
                    for (left, units) in r.left.iter_mut().zip(u) {
                        *left += units as u128 * PER_UNIT_SECOND;
                    }
                }
                Event::Observe => {}
            }
        }
        r
    }

    fn empty_at(&self, pool: &str) -> Option<u64> {
        let r = self.replay(pool);
        (0..3)
            .filter(|&k| r.draw[k] > 0)
            .map(|k| {
                let d = r.draw[k] as u128;
                // The first whole nanosecond at which draw * t >= left.
                let mut t = r.left[k] / d;
                if t * d < r.left[k] {
                    t += 1;
                }
                r.at + t as u64
            })
            .min()
    }
}

fn as_array(d: Draw) -> [u64; 3] {
    [d.cu, d.su, d.ipv4u]
}

fn check(pools: &Pools, scan: &ScanPools, model: &Model) -> Result<(), TestCaseError> {
    pools.assert_index_in_step();
    prop_assert_eq!(pools.next_expiry(), scan.next_expiry());
    for name in NAMES {
        let (p, q) = (pools.get(name).unwrap(), scan.get(name).unwrap());
        prop_assert_eq!(p, q);
        let r = model.replay(name);
        let left = [p.left(Unit::Cu), p.left(Unit::Su), p.left(Unit::Ipv4u)];
        prop_assert_eq!(left, r.left, "counters of {}", name);
        prop_assert_eq!(as_array(p.draw()), r.draw);
        prop_assert_eq!(p.last_sync_ns(), r.at);
        prop_assert_eq!(p.empty_at(), model.empty_at(name), "EmptyAt of {}", name);
        // EmptyAt is the first nanosecond with a drawn counter at 0.
        if let Some(at) = p
            .empty_at()
            .filter(|&at| at > p.last_sync_ns() && at < u64::MAX)
        {
            let drawn_at_zero = |t: u64| {
                let mut c = p.clone();
                c.sync(t);
                [Unit::Cu, Unit::Su, Unit::Ipv4u]
                    .into_iter()
                    .zip(as_array(c.draw()))
                    .any(|(u, d)| d > 0 && c.left(u) == 0)
            };
            prop_assert!(!drawn_at_zero(at - 1), "{} empty before its EmptyAt", name);
            prop_assert!(drawn_at_zero(at), "{} not empty at its EmptyAt", name);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn pools_match_a_replay_of_their_history(ops in prop::collection::vec(op(), 1..80)) {
        let mut now = 1_000 * S;
        let mut pools = Pools::new();
        let mut scan = ScanPools::new();
        let mut model = Model::default();
        for name in NAMES {
            pools.create(name, now).unwrap();
            scan.insert(Pool::new(name, now)).unwrap();
            model.record(name, now, Event::Observe);
        }
        let mut live: Vec<(usize, Draw)> = Vec::new();
        for op in ops {
            match op {
                Op::Advance(dt) => now += dt,
                Op::Add(p, d) => {
                    let a = pools.add_workload(NAMES[p], d, now).unwrap();
                    prop_assert_eq!(a, scan.add_workload(NAMES[p], d, now).unwrap());
                    model.record(NAMES[p], now, Event::Draw(as_array(d), true));
                    live.push((p, d));
                }
                Op::Remove(i) => {
                    if live.is_empty() {
                        continue;
                    }
                    let (p, d) = live.swap_remove(i % live.len());
                    let a = pools.remove_workload(NAMES[p], d, now).unwrap();
                    prop_assert_eq!(a, scan.remove_workload(NAMES[p], d, now).unwrap());
                    model.record(NAMES[p], now, Event::Draw(as_array(d), false));
                }
                Op::RemoveBogus(p) => {
                    let d = cu(pools.get(NAMES[p]).unwrap().draw().cu + 1);
                    prop_assert!(pools.remove_workload(NAMES[p], d, now).is_err());
                    prop_assert!(scan.remove_workload(NAMES[p], d, now).is_err());
                    model.record(NAMES[p], now, Event::Observe);
                }
                Op::TopUp(p, c, s, i) => {
                    let a = pools.top_up(NAMES[p], c, s, i, now).unwrap();
                    prop_assert_eq!(a, scan.top_up(NAMES[p], c, s, i, now).unwrap());
                    model.record(NAMES[p], now, Event::TopUp([c, s, i]));
                }
                Op::Sync(p) => {
                    pools.sync(NAMES[p], now).unwrap();
                    scan.sync(NAMES[p], now).unwrap();
                    model.record(NAMES[p], now, Event::Observe);
                }
                Op::StaleSync(p, back) => {
                    let t = now.saturating_sub(back);
                    pools.sync(NAMES[p], t).unwrap();
                    scan.sync(NAMES[p], t).unwrap();
                    model.record(NAMES[p], t, Event::Observe);
                }
                Op::SyncAll => {
                    pools.sync_all(now);
                    scan.sync_all(now);
                    for name in NAMES {
                        model.record(name, now, Event::Observe);
                    }
                }
            }
            check(&pools, &scan, &model)?;
        }
    }

    /// Syncing at any instants before EmptyAt never moves it, and the
    /// counters at a time do not depend on how often the pool was synced.
    #[test]
    fn syncing_more_often_changes_nothing(
        top in 1u64..1_000,
        d in draw(),
        stops in prop::collection::vec(0u64..10 * S, 0..20),
        end in 0u64..20 * S,
    ) {
        let mut once = Pool::new("p", 0);
        once.top_up(top, top, top, 0).unwrap();
        once.add_workload(d, 0).unwrap();
        let empty_at = once.empty_at();
        let mut often = once.clone();
        let mut stops = stops;
        stops.sort();
        for t in stops.into_iter().filter(|&t| t <= end) {
            often.sync(t);
            if empty_at.is_some_and(|e| t < e) {
                prop_assert_eq!(often.empty_at(), empty_at);
            }
        }
        often.sync(end);
        once.sync(end);
        prop_assert_eq!(often, once);
    }

    /// Admission agrees with adding the workload and looking at EmptyAt.
    #[test]
    fn admission_matches_adding_then_looking(
        top in 0u64..200,
        running in draw(),
        extra in draw(),
        now in 0u64..100 * S,
        min_run in 0u64..200 * S,
    ) {
        let mut p = Pool::new("p", 0);
        p.top_up(top, top, top, 0).unwrap();
        p.add_workload(running, 0).unwrap();
        let verdict = p.would_be_empty_within(extra, now, min_run);
        let mut after = p.clone();
        after.add_workload(extra, now).unwrap();
        let e = after.empty_at();
        let expected = e.filter(|&e| e < now + min_run);
        prop_assert_eq!(verdict, expected);
    }
}
