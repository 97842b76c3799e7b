//! Capacity pools and users' keys in etcd: one set of pools for the whole
//! cluster (docs/CLUSTER.md, "Pools").
//!
//! | key | value | lease |
//! | --- | --- | --- |
//! | `pools/NAME` | the pool ([`ClusterPool`], JSON): counters, owner, node list, who draws | none |
//! | `keys/USER` | the user's ed25519 public keys (JSON list, as `tt-host key add` takes them) | none |
//! | `resv/ID` | an accepted reservation's id ([`Accepted`], JSON): never accepted twice | none |
//!
//! A pool's counters are charged lazily ([`crate::pools::Pool`]): every
//! change (a workload added or removed, a top-up) syncs it to the writer's
//! clock first. Each change is one transaction conditioned on the pool
//! key's `mod_revision` as read, retried on a conflict, so two nodes never
//! both spend or add the same unit-seconds. The pool also records which
//! unikernel of which node draws what ([`ClusterPool::draws`]): the sum is
//! the pool's draw, and what a node that died drew is taken away by
//! whichever node notices first ([`Cluster::pool_forget_nodes`]).
//!
//! Admission into a pool ([`Cluster::pool_start_drawing`]) checks, in the
//! same transaction that adds the draw, that the node is in the pool's node
//! list and that the pool would last the minimum run time with it.

use super::store::{decode, Cluster, ClusterError, Retrying};
use crate::pools::keys::{encode_public_key, KeyRing};
use crate::pools::{Draw, Pool};
use etcd_client::{Compare, CompareOp, GetOptions, Txn, TxnOp, TxnOpResponse};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// A pool as etcd holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterPool {
    pub pool: Pool,
    pub owner: String,
    #[serde(default)]
    pub sponsor: Option<String>,
    /// The nodes whose unikernels may draw from it (`pool create
    /// --nodes=`); `None`: any node.
    #[serde(default)]
    pub nodes: Option<Vec<String>>,
    /// Node -> its unikernels drawing from the pool, and their draws. The
    /// pool's draw is their sum.
    #[serde(default)]
    pub draws: BTreeMap<String, BTreeMap<String, Draw>>,
}

impl ClusterPool {
    /// May `node`'s unikernels draw from it?
    pub fn allows(&self, node: &str) -> bool {
        self.nodes
            .as_ref()
            .is_none_or(|l| l.iter().any(|n| n == node))
    }

    /// Make `node`'s draws `units`, charging the pool up to `now_ns`
    /// first. Changes nothing (and says so) if they are already.
    fn set_draws(&mut self, node: &str, units: BTreeMap<String, Draw>, now_ns: u64) -> bool {
        let old = self.draws.get(node).cloned().unwrap_or_default();
        if old == units {
            return false;
        }
        let sum = |m: &BTreeMap<String, Draw>| {
            m.values()
                .fold(Draw::ZERO, |a, d| a.checked_add(d).unwrap_or(a))
        };
        // The draw is the sum of the recorded draws, so these cannot fail;
        // a pool whose JSON was edited by hand is set right.
        if self.pool.remove_workload(sum(&old), now_ns).is_err() {
            let total = (self.draws.iter())
                .filter(|(n, _)| n.as_str() != node)
                .fold(Draw::ZERO, |a, (_, m)| a.checked_add(&sum(m)).unwrap_or(a));
            let _ = self.pool.remove_workload(self.pool.draw(), now_ns);
            let _ = self.pool.add_workload(total, now_ns);
        }
        let _ = self.pool.add_workload(sum(&units), now_ns);
        if units.is_empty() {
            self.draws.remove(node);
        } else {
            self.draws.insert(node.to_string(), units);
        }
        true
    }
}

/// An accepted reservation, as `resv/ID` records it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Accepted {
    pub pool: String,
    pub node: String,
    pub at_ns: u64,
    pub cu: u64,
    pub su: u64,
    pub ipv4u: u64,
}

/// What a pool change may end with, besides etcd not answering.
#[derive(Debug, thiserror::Error)]
pub enum PoolChange {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// Refused by the change itself (the message says why).
    #[error("{0}")]
    Refused(String),
}

/// Every pool (with the revision it was last written at) and every
/// user's keys, read at one revision.
#[derive(Debug, Default)]
pub struct PoolView {
    pub pools: Vec<(ClusterPool, i64)>,
    pub keys: KeyRing,
}

impl Cluster {
    fn k_pool(&self, name: &str) -> String {
        self.key(&format!("pools/{name}"))
    }

    /// Every pool and every user's keys, at one revision.
    pub async fn pool_view(&self) -> Result<PoolView, ClusterError> {
        let client = Retrying(self);
        let prefixed = |k: &str| TxnOp::get(self.key(k), Some(GetOptions::new().with_prefix()));
        let got = client
            .txn(Txn::new().and_then(vec![prefixed("pools/"), prefixed("keys/")]))
            .await
            .map_err(|e| self.unreachable(e))?;
        let mut view = PoolView::default();
        let mut ranges = got.op_responses().into_iter().filter_map(|r| match r {
            TxnOpResponse::Get(g) => Some(g),
            _ => None,
        });
        if let Some(pools) = ranges.next() {
            let prefix = self.key("pools/");
            for kv in pools.kvs() {
                // A record that does not decode, or names another pool
                // than its key, is skipped (and said): one bad record must
                // not stop every node's pools.
                let name = String::from_utf8_lossy(&kv.key()[prefix.len()..]).into_owned();
                match decode::<ClusterPool>(kv.key(), kv.value()) {
                    Ok(p) if p.pool.name() == name => view.pools.push((p, kv.mod_revision())),
                    Ok(p) => log::warn!(
                        "cluster: {prefix}{name} holds pool {:?}: skipped",
                        p.pool.name()
                    ),
                    Err(e) => log::warn!("cluster: {e}: skipped"),
                }
            }
        }
        if let Some(keys) = ranges.next() {
            let prefix = self.key("keys/");
            let mut users = BTreeMap::new();
            for kv in keys.kvs() {
                let user = String::from_utf8_lossy(&kv.key()[prefix.len()..]).into_owned();
                let list: Vec<String> = decode(kv.key(), kv.value())?;
                users.insert(user, list);
            }
            view.keys = KeyRing::try_from(users).map_err(|e| ClusterError::Bad {
                key: prefix,
                err: e.to_string(),
            })?;
        }
        Ok(view)
    }

    /// A new, empty pool; refused if the name is taken.
    pub async fn pool_create(&self, pool: ClusterPool) -> Result<(), PoolChange> {
        let key = self.k_pool(pool.pool.name());
        let txn = Txn::new()
            .when(vec![Compare::create_revision(
                key.clone(),
                CompareOp::Equal,
                0,
            )])
            .and_then(vec![TxnOp::put(
                key,
                serde_json::to_vec(&pool).expect("encodes"),
                None,
            )]);
        let done = Retrying(self)
            .txn(txn)
            .await
            .map_err(|e| self.unreachable(e))?;
        if done.succeeded() {
            Ok(())
        } else {
            Err(PoolChange::Refused(format!(
                "a pool named {} exists in the cluster",
                pool.pool.name()
            )))
        }
    }

    /// Change pool `name` with `change` (given the pool as read), in one
    /// transaction conditioned on the pool not having changed since the
    /// read, together with `also` (compares, and puts made with it);
    /// retried from the read on a conflict. `change` returning `Ok(None)`
    /// writes nothing. The pool as written (or read, if unchanged), and
    /// the revision it was written at.
    async fn pool_update<T>(
        &self,
        name: &str,
        mut change: impl FnMut(&mut ClusterPool) -> Result<Option<T>, PoolChange>,
        also: (Vec<Compare>, Vec<TxnOp>),
        tries: u32,
    ) -> Result<(ClusterPool, Option<T>, i64), PoolChange> {
        let client = Retrying(self);
        let key = self.k_pool(name);
        for attempt in 0u32.. {
            let got = client
                .get(key.clone(), None)
                .await
                .map_err(|e| self.unreachable(e))?;
            let Some(kv) = got.kvs().first() else {
                return Err(PoolChange::Refused(format!(
                    "no pool named {name} in the cluster"
                )));
            };
            let mut pool: ClusterPool = decode(kv.key(), kv.value())?;
            let Some(out) = change(&mut pool)? else {
                return Ok((pool, None, kv.mod_revision()));
            };
            let mut when = vec![Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                kv.mod_revision(),
            )];
            when.extend(also.0.iter().cloned());
            let mut ops = vec![TxnOp::put(
                key.clone(),
                serde_json::to_vec(&pool).expect("encodes"),
                None,
            )];
            ops.extend(also.1.iter().cloned());
            let done = client
                .txn(Txn::new().when(when).and_then(ops))
                .await
                .map_err(|e| self.unreachable(e))?;
            if done.succeeded() {
                let rev = done.header().map_or(kv.mod_revision(), |h| h.revision());
                return Ok((pool, Some(out), rev));
            }
            if attempt + 1 >= tries {
                break;
            }
            self.conflicts
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let backoff = 2 + (rand_u64() % (5 * (attempt as u64 + 1)).min(100));
            tokio::time::sleep(std::time::Duration::from_millis(backoff)).await;
        }
        Err(PoolChange::Cluster(ClusterError::Contended))
    }

    /// Admit unikernel `unit` of this node into pool `name` with `draw`,
    /// and draw from then on: refused if the pool's node list leaves this
    /// node out, or if the pool would be empty within `min_run_ns` of
    /// `now_ns` with it. The pool as written.
    pub async fn pool_start_drawing(
        &self,
        name: &str,
        unit: &str,
        draw: Draw,
        now_ns: u64,
        min_run_ns: u64,
    ) -> Result<(ClusterPool, i64), PoolChange> {
        let node = self.cfg.node.clone();
        let (pool, _, rev) = self
            .pool_update(
                name,
                |p| {
                    if !p.allows(&node) {
                        return Err(PoolChange::Refused(format!(
                            "pool {name} is for nodes {}, not this one ({node})",
                            p.nodes.as_deref().unwrap_or_default().join(", ")
                        )));
                    }
                    if p.draws.get(&node).is_some_and(|m| m.contains_key(unit)) {
                        return Ok(None);
                    }
                    if let Some(at) = p.pool.would_be_empty_within(draw, now_ns, min_run_ns) {
                        return Err(PoolChange::Refused(format!(
                            "refused: pool {name} would be empty at {} with this unikernel, \
                             within the minimum run time of {} s (top it up with a reservation)",
                            humantime::format_rfc3339_millis(
                                std::time::UNIX_EPOCH + std::time::Duration::from_nanos(at)
                            ),
                            min_run_ns / 1_000_000_000
                        )));
                    }
                    let mut mine = p.draws.get(&node).cloned().unwrap_or_default();
                    mine.insert(unit.to_string(), draw);
                    p.set_draws(&node, mine, now_ns);
                    Ok(Some(()))
                },
                (vec![], vec![]),
                TRIES,
            )
            .await?;
        Ok((pool, rev))
    }

    /// Make this node's draws from pool `name` exactly `units` (what its
    /// unikernels drawing from it are now): unikernels that ended stop
    /// drawing, charged up to `now_ns`.
    pub async fn pool_set_own_draws(
        &self,
        name: &str,
        units: BTreeMap<String, Draw>,
        now_ns: u64,
    ) -> Result<(ClusterPool, i64), PoolChange> {
        let node = self.cfg.node.clone();
        let (pool, _, rev) = self
            .pool_update(
                name,
                |p| Ok(p.set_draws(&node, units.clone(), now_ns).then_some(())),
                (vec![], vec![]),
                TRIES,
            )
            .await?;
        Ok((pool, rev))
    }

    /// Take away what the nodes `gone` drew from pool `name`, charged up
    /// to `now_ns`, on the condition, in the same transaction, that none
    /// of them is a member (`nodes/NODE`) any more: a node that came back
    /// (or joined) after the caller looked at the membership keeps its
    /// draws. The pool as written (or read, if none of them drew).
    pub async fn pool_forget_nodes(
        &self,
        name: &str,
        gone: &BTreeSet<String>,
        now_ns: u64,
    ) -> Result<(ClusterPool, i64), PoolChange> {
        let prefix = &self.cfg.prefix;
        let absent: Vec<Compare> = gone
            .iter()
            .map(|n| Compare::version(super::store::keys::node(prefix, n), CompareOp::Equal, 0))
            .collect();
        let (pool, _, rev) = self
            .pool_update(
                name,
                |p| {
                    let drew: Vec<String> = (p.draws.keys())
                        .filter(|n| gone.contains(*n))
                        .cloned()
                        .collect();
                    for n in &drew {
                        p.set_draws(n, BTreeMap::new(), now_ns);
                    }
                    Ok((!drew.is_empty()).then_some(()))
                },
                (absent, vec![]),
                TRIES,
            )
            .await?;
        Ok((pool, rev))
    }

    /// Top pool `r.pool` up with an accepted reservation, once in the
    /// cluster's life: `resv/ID` is written in the same transaction, on
    /// the condition that it is not there yet.
    pub async fn pool_top_up(
        &self,
        id: &str,
        r: Accepted,
    ) -> Result<(ClusterPool, i64), PoolChange> {
        let key = self.key(&format!("resv/{id}"));
        // Whoever accepted `id`, if anyone did.
        let accepted = || async {
            let got = Retrying(self)
                .get(key.clone(), None)
                .await
                .map_err(|e| PoolChange::Cluster(self.unreachable(e)))?;
            match got.kvs().first() {
                Some(kv) => Ok(Some(decode::<Accepted>(kv.key(), kv.value())?)),
                None => Ok::<_, PoolChange>(None),
            }
        };
        let replayed =
            || PoolChange::Refused(format!("reservation {id} was accepted before (replayed)"));
        if accepted().await?.is_some() {
            return Err(replayed());
        }
        let also = (
            vec![Compare::create_revision(key.clone(), CompareOp::Equal, 0)],
            vec![TxnOp::put(
                key.clone(),
                serde_json::to_vec(&r).expect("encodes"),
                None,
            )],
        );
        // A failed compare is the pool changing or the id appearing: the
        // id is looked at after each, so that a replay (or this very
        // top-up, committed but its answer lost) ends the loop at once.
        for _ in 0..TRIES {
            let result = self
                .pool_update(
                    &r.pool,
                    |p| {
                        p.pool
                            .top_up(r.cu, r.su, r.ipv4u, r.at_ns)
                            .map_err(|e| PoolChange::Refused(e.to_string()))?;
                        Ok(Some(()))
                    },
                    also.clone(),
                    1,
                )
                .await;
            match result {
                Ok((pool, _, rev)) => return Ok((pool, rev)),
                Err(PoolChange::Cluster(ClusterError::Contended)) => {}
                Err(e) => return Err(e),
            }
            match accepted().await? {
                Some(a) if a.node == self.cfg.node && a.at_ns == r.at_ns => {
                    // Committed, and the answer lost on the way.
                    let (pool, _, rev) = self
                        .pool_update(&r.pool, |_| Ok(None::<()>), (vec![], vec![]), 1)
                        .await?;
                    return Ok((pool, rev));
                }
                Some(_) => return Err(replayed()),
                None => {
                    let backoff = 2 + rand_u64() % 20;
                    tokio::time::sleep(std::time::Duration::from_millis(backoff)).await;
                }
            }
        }
        Err(PoolChange::Cluster(ClusterError::Contended))
    }

    /// Register `key` for `user`, in the cluster's key ring; false if it
    /// was already.
    pub async fn key_add(
        &self,
        user: &str,
        key: &ed25519_dalek::VerifyingKey,
    ) -> Result<bool, PoolChange> {
        let client = Retrying(self);
        let k = self.key(&format!("keys/{user}"));
        let encoded = encode_public_key(key);
        loop {
            let got = client
                .get(k.clone(), None)
                .await
                .map_err(|e| self.unreachable(e))?;
            let (mut list, when): (Vec<String>, Compare) = match got.kvs().first() {
                Some(kv) => (
                    decode(kv.key(), kv.value())?,
                    Compare::mod_revision(k.clone(), CompareOp::Equal, kv.mod_revision()),
                ),
                None => (
                    vec![],
                    Compare::create_revision(k.clone(), CompareOp::Equal, 0),
                ),
            };
            if list.contains(&encoded) {
                return Ok(false);
            }
            list.push(encoded.clone());
            let done = client
                .txn(Txn::new().when(vec![when]).and_then(vec![TxnOp::put(
                    k.clone(),
                    serde_json::to_vec(&list).expect("encodes"),
                    None,
                )]))
                .await
                .map_err(|e| self.unreachable(e))?;
            if done.succeeded() {
                return Ok(true);
            }
        }
    }
}

/// Conflicting writes of one pool in a row before a change gives up.
const TRIES: u32 = 50;

/// A little randomness for backoffs (no cryptographic use).
fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(super::store::now_ns());
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn pool() -> ClusterPool {
        let mut p = Pool::new("p", 0);
        p.top_up(1000, 1000, 0, 0).unwrap();
        ClusterPool {
            pool: p,
            owner: "alice".into(),
            sponsor: None,
            nodes: Some(vec!["n0".into(), "n1".into()]),
            draws: BTreeMap::new(),
        }
    }

    fn d(cu: u64) -> Draw {
        Draw {
            cu,
            su: 0,
            ipv4u: 0,
        }
    }

    #[test]
    fn the_draw_is_the_sum_over_nodes_and_each_change_is_charged_first() {
        let mut p = pool();
        assert!(p.allows("n1") && !p.allows("n2"));
        p.set_draws("n0", BTreeMap::from([("a".into(), d(1_000_000))]), 0);
        p.set_draws("n1", BTreeMap::from([("b".into(), d(1_000_000))]), 0);
        assert_eq!(p.pool.draw(), d(2_000_000));
        // 100 s at 2 CU/s: 200 CU-s spent; n0's unikernel ends.
        assert!(p.set_draws("n0", BTreeMap::new(), 100 * S));
        assert_eq!(p.pool.draw(), d(1_000_000));
        assert_eq!(
            p.pool.left(crate::pools::Unit::Cu),
            800 * crate::pools::PER_UNIT_SECOND
        );
        assert!(!p.set_draws("n0", BTreeMap::new(), 100 * S));
        assert_eq!(p.draws.keys().collect::<Vec<_>>(), ["n1"]);
    }

    #[test]
    fn a_pool_whose_draw_disagrees_with_its_records_is_set_right() {
        let mut p = pool();
        p.draws
            .insert("n0".into(), BTreeMap::from([("a".into(), d(5))]));
        // The pool's own draw says 0: removing 5 would underflow.
        p.set_draws("n0", BTreeMap::from([("a".into(), d(7))]), 0);
        assert_eq!(p.pool.draw(), d(7));
    }
}
