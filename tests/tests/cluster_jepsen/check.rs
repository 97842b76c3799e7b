//! cluster_jepsen's checkers: etcd's history read back, replayed, and
//! set against the operations' history.

use super::{Act, Life, Op, Outcome, ALICE_MAX, LEASE_MARGIN, PREFIX, TEAM_MB, TTL};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;
use tt_host::cluster::store::{keys, Reservation};
use tt_host::resources::PartialPolicy;

/// One event on a reservation key.
#[derive(Debug, Clone)]
pub(super) struct Change {
    pub(super) rev: i64,
    pub(super) key: String,
    /// `Some`: a put of this reservation; `None`: a delete (a release, a
    /// node clearing its earlier run's, or a lease's expiry).
    pub(super) put: Option<Reservation>,
}

/// A policy set at `path` at revision `rev`.
#[derive(Debug, Clone)]
pub(super) struct PolicyChange {
    pub(super) rev: i64,
    pub(super) path: String,
    pub(super) policy: PartialPolicy,
}

/// Every change of the reservation and policy keys from revision 1 on,
/// read with a watch until it reaches a marker written after the run.
pub(super) async fn history(endpoints: &[String]) -> (Vec<Change>, Vec<PolicyChange>) {
    let mut client = etcd_client::Client::connect(endpoints, None)
        .await
        .expect("connect to etcd to read its history");
    let marker = format!("{PREFIX}/~end");
    let end = client
        .put(marker.clone(), "", None)
        .await
        .expect("put the end marker")
        .header()
        .expect("a header")
        .revision();
    let opts = etcd_client::WatchOptions::new()
        .with_prefix()
        .with_start_revision(1);
    let (_watcher, mut stream) = client
        .watch(format!("{PREFIX}/"), Some(opts))
        .await
        .expect("watch the cluster's keys from revision 1");
    let policy_prefix = format!("{PREFIX}/policy/");
    let (mut out, mut policies) = (Vec::new(), Vec::new());
    loop {
        let resp = stream
            .message()
            .await
            .expect("read the watch")
            .unwrap_or_else(|| panic!("the watch ended before revision {end}"));
        assert!(
            !resp.canceled(),
            "the watch was cancelled ({}; compacted at {}): the history is incomplete",
            resp.cancel_reason(),
            resp.compact_revision()
        );
        for ev in resp.events() {
            let kv = ev.kv().expect("an event has its key");
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            if key == marker {
                return (out, policies);
            }
            if let Some(at) = key.strip_prefix(&policy_prefix) {
                if let etcd_client::EventType::Put = ev.event_type() {
                    policies.push(PolicyChange {
                        rev: kv.mod_revision(),
                        path: at.to_string(),
                        policy: serde_json::from_slice(kv.value())
                            .unwrap_or_else(|e| panic!("{key}: not a policy: {e}")),
                    });
                }
                continue;
            }
            // The reservations: `n/NODE/res/NAME` (tt-host's key layout).
            if keys::parse_res(PREFIX, &key).is_none() {
                continue;
            }
            let put = match ev.event_type() {
                etcd_client::EventType::Put => Some(
                    serde_json::from_slice(kv.value())
                        .unwrap_or_else(|e| panic!("{key}: not a reservation: {e}")),
                ),
                etcd_client::EventType::Delete => None,
            };
            out.push(Change {
                rev: kv.mod_revision(),
                key,
                put,
            });
        }
    }
}

// ---------------------------------------------------------------------
// The checkers

pub(super) fn below_alice(name: &str) -> bool {
    name.starts_with("alice:")
}
pub(super) fn below_team(name: &str) -> bool {
    name.starts_with("alice:team:")
}

/// What the replay of etcd's history found.
#[derive(Default)]
pub(super) struct Replay {
    pub(super) puts: HashMap<String, Vec<i64>>,
    pub(super) deletes: HashMap<String, Vec<i64>>,
    /// The most unikernels below `alice` at a revision, and the first
    /// revision with that many.
    pub(super) max_alice: (u64, i64),
    pub(super) max_team_mb: (u64, i64),
    pub(super) revisions: usize,
}

/// Check 1: replay the changes revision by revision; at each, count what
/// runs below `alice` and what `alice:team` uses. Never more than the
/// most the policies ever allow; and at a revision that admitted one,
/// not more than the policies in force then allow (a tightened policy
/// leaves what runs running).
pub(super) fn replay(
    changes: &[Change],
    policies: &[PolicyChange],
    failures: &mut Vec<String>,
) -> Replay {
    let mut r = Replay::default();
    let mut live: BTreeMap<String, (i64, Reservation)> = BTreeMap::new();
    let (mut alice_limit, mut team_limit) = (u64::MAX, u64::MAX);
    let mut policies = policies.iter().peekable();
    let mut i = 0;
    while i < changes.len() {
        let rev = changes[i].rev;
        while let Some(p) = policies.next_if(|p| p.rev <= rev) {
            match p.path.as_str() {
                "alice" => alice_limit = p.policy.unikernels.map_or(u64::MAX, u64::from),
                "alice:team" => team_limit = p.policy.memory_mb.unwrap_or(u64::MAX),
                other => panic!("a policy at {other}: the test sets none there"),
            }
        }
        let mut admitted = false;
        while i < changes.len() && changes[i].rev == rev {
            let c = &changes[i];
            match &c.put {
                Some(res) => {
                    admitted = true;
                    r.puts.entry(c.key.clone()).or_default().push(rev);
                    live.insert(c.key.clone(), (rev, res.clone()));
                }
                None => {
                    r.deletes.entry(c.key.clone()).or_default().push(rev);
                    live.remove(&c.key);
                }
            }
            i += 1;
        }
        r.revisions += 1;
        let alice = live.values().filter(|(_, v)| below_alice(&v.name)).count() as u64;
        let team_mb: u64 = live
            .values()
            .filter(|(_, v)| below_team(&v.name))
            .map(|(_, v)| v.claim.memory_mb)
            .sum();
        if alice > r.max_alice.0 {
            r.max_alice = (alice, rev);
        }
        if team_mb > r.max_team_mb.0 {
            r.max_team_mb = (team_mb, rev);
        }
        let (alice_max, team_max) = if admitted {
            (alice_limit.min(ALICE_MAX), team_limit.min(TEAM_MB))
        } else {
            (ALICE_MAX, TEAM_MB)
        };
        if alice > alice_max || team_mb > team_max {
            let list: Vec<String> = live
                .iter()
                .map(|(k, (at, _))| format!("{k} (put at {at})"))
                .collect();
            failures.push(format!(
                "etcd revision {rev}: {alice} unikernels below alice (allowed: {alice_max}), \
                 {team_mb} MB below alice:team (allowed: {team_max} MB); live: {}",
                list.join(", ")
            ));
        }
    }
    r
}

pub(super) fn res_key(node: usize, name: &str) -> String {
    keys::res(PREFIX, &format!("n{node}"), name)
}

/// Check 2a: what each operation returned agrees with etcd's history.
pub(super) fn check_ops_against_replay(ops: &[Op], r: &Replay, failures: &mut Vec<String>) {
    let none = Vec::new();
    for op in ops {
        match &op.act {
            Act::Admit { name, .. } => {
                let key = res_key(op.node, name);
                let puts = r.puts.get(&key).unwrap_or(&none);
                match op.outcome {
                    Outcome::Ok(rev) if rev > 0 && !puts.contains(&rev) => failures.push(format!(
                        "{op:?}: acknowledged at revision {rev}, but etcd put {key} at {puts:?}"
                    )),
                    Outcome::Ok(0) if puts.is_empty() => {
                        failures.push(format!("{op:?}: acknowledged, but etcd never put {key}"))
                    }
                    Outcome::Refused | Outcome::CutOff | Outcome::Contended if !puts.is_empty() => {
                        failures.push(format!(
                            "{op:?}: not admitted, but etcd put {key} at {puts:?}"
                        ))
                    }
                    Outcome::Taken | Outcome::Bad => failures.push(format!(
                        "{op:?}: a fresh name cannot be taken nor its data bad"
                    )),
                    _ => {}
                }
                if puts.len() > 1 {
                    failures.push(format!("{key}: put more than once, at {puts:?}"));
                }
            }
            Act::Release { name } => {
                let key = res_key(op.node, name);
                // A release's transaction may be tried again after its
                // answer was lost (or find the lease expired): its key's
                // delete is then earlier than the revision it returns.
                if let Outcome::Ok(rev) = op.outcome {
                    let dels = r.deletes.get(&key).unwrap_or(&none);
                    let put = r.puts.get(&key).and_then(|p| p.first()).copied();
                    let deleted = put.is_some_and(|p| dels.iter().any(|d| p < *d && *d <= rev));
                    if rev > 0 && !deleted {
                        failures.push(format!(
                            "{op:?}: acknowledged at revision {rev}, but etcd put {key} at \
                             {put:?} and deleted it at {dels:?}"
                        ));
                    }
                }
            }
            Act::Connect | Act::NewLease => {}
        }
    }
}

/// Check 2b: revisions follow real time. An operation that completed
/// before another was invoked committed at a smaller revision (a release
/// that changed nothing, its key gone already, reports the revision it
/// saw: not a smaller one).
pub(super) fn check_real_time_order(ops: &[Op], failures: &mut Vec<String>) {
    let mut revs: Vec<(&Op, i64)> = ops
        .iter()
        .filter(|op| matches!(op.act, Act::Admit { .. } | Act::Release { .. }))
        .filter_map(|op| match op.outcome {
            Outcome::Ok(rev) if rev > 0 => Some((op, rev)),
            _ => None,
        })
        .collect();
    revs.sort_by_key(|(op, _)| op.completed);
    for (b, rb) in &revs {
        // The last to complete before b was invoked, with the greatest
        // revision among those.
        let before = revs
            .iter()
            .take_while(|(a, _)| a.completed < b.invoked)
            .max_by_key(|(_, ra)| *ra);
        if let Some((a, ra)) = before {
            let release = matches!(b.act, Act::Release { .. });
            if ra > rb || (ra == rb && !release) {
                failures.push(format!(
                    "real-time order: {a:?} (revision {ra}) completed before {b:?} \
                     (revision {rb}) was invoked"
                ));
            }
        }
    }
}

/// Check 2c, from the history alone: at no moment do the reservations it
/// proves alive exceed the policy. One is proved alive from its
/// acknowledgement until its release is invoked or its node's run ends,
/// while a confirmation of the lease it was made under, sent at most a
/// TTL earlier, shows the lease alive. Returns the most proved alive at
/// once below `alice`.
pub(super) fn check_proved_alive(ops: &[Op], life: &[Life], failures: &mut Vec<String>) -> u64 {
    struct Alive<'a> {
        op: &'a Op,
        mb: u64,
        from: Duration,
        until: Duration,
        confirms: &'a [Duration],
    }
    let mut release_at: HashMap<&str, Duration> = HashMap::new();
    for op in ops {
        if let Act::Release { name } = &op.act {
            let t = release_at.entry(name).or_insert(op.invoked);
            *t = (*t).min(op.invoked);
        }
    }
    let mut stopped: HashMap<(usize, u32), Duration> = HashMap::new();
    let mut confirms: HashMap<(usize, u32, u32), Vec<Duration>> = HashMap::new();
    for e in life {
        match *e {
            Life::Stopped { node, inst, at } => {
                stopped.insert((node, inst), at);
            }
            Life::Confirmed {
                node,
                inst,
                epoch,
                sent,
            } => confirms.entry((node, inst, epoch)).or_default().push(sent),
        }
    }
    for v in confirms.values_mut() {
        v.sort();
    }
    let empty = Vec::new();
    let alive: Vec<Alive> = ops
        .iter()
        .filter_map(|op| match (&op.act, op.outcome) {
            (Act::Admit { name, mb, epoch }, Outcome::Ok(_)) => {
                let release = release_at.get(name.as_str()).copied();
                let stop = stopped.get(&(op.node, op.inst)).copied();
                Some(Alive {
                    op,
                    mb: *mb,
                    from: op.completed,
                    until: release
                        .unwrap_or(Duration::MAX)
                        .min(stop.unwrap_or(Duration::MAX)),
                    confirms: confirms.get(&(op.node, op.inst, *epoch)).unwrap_or(&empty),
                })
            }
            _ => None,
        })
        .collect();
    let lease_alive = |a: &Alive, t: Duration| {
        // The latest confirmation sent at or before t.
        let i = a.confirms.partition_point(|s| *s <= t);
        i > 0 && t + LEASE_MARGIN < a.confirms[i - 1] + TTL
    };
    let mut points: Vec<Duration> = alive.iter().map(|a| a.from).collect();
    points.extend(confirms.values().flatten().copied());
    points.sort();
    points.dedup();
    let mut max = 0;
    for t in points {
        let now: Vec<&Alive> = alive
            .iter()
            .filter(|a| a.from <= t && t < a.until && lease_alive(a, t))
            .collect();
        let names = |a: &&Alive| match &a.op.act {
            Act::Admit { name, .. } => name.clone(),
            _ => unreachable!(),
        };
        let alice = now.iter().filter(|a| below_alice(&names(a))).count() as u64;
        let team_mb: u64 = now
            .iter()
            .filter(|a| below_team(&names(a)))
            .map(|a| a.mb)
            .sum();
        max = max.max(alice);
        if alice > ALICE_MAX || team_mb > TEAM_MB {
            let list: Vec<String> = now.iter().map(|a| format!("{:?}", a.op)).collect();
            failures.push(format!(
                "at {t:?}: {alice} unikernels below alice and {team_mb} MB below alice:team \
                 are proved alive by the history:\n  {}",
                list.join("\n  ")
            ));
        }
    }
    max
}

/// The longest a node's run went without a confirmation of its lease
/// (between two, or from the last to the run's end), and from when: how
/// long the nodes were cut off (their admissions stop after half the TTL,
/// a daemon fences after two thirds).
pub(super) fn longest_unconfirmed(life: &[Life]) -> (Duration, Duration) {
    let mut times: BTreeMap<(usize, u32), Vec<Duration>> = BTreeMap::new();
    for e in life {
        match *e {
            Life::Confirmed {
                node, inst, sent, ..
            } => times.entry((node, inst)).or_default().push(sent),
            Life::Stopped { node, inst, at } => times.entry((node, inst)).or_default().push(at),
        }
    }
    let mut longest = (Duration::ZERO, Duration::ZERO);
    for t in times.values_mut() {
        t.sort();
        for w in t.windows(2) {
            if w[1] - w[0] > longest.0 {
                longest = (w[1] - w[0], w[0]);
            }
        }
    }
    longest
}
