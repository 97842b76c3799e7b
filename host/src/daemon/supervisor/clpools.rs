//! Capacity pools on a cluster node: the pools and keys are the cluster's
//! ([`crate::cluster::pools`], docs/CLUSTER.md "Pools"); the node mirrors
//! them in its [`PoolState`](super::super::pools::PoolState) and tells the
//! cluster what its own unikernels draw.
//!
//! - Admission into a pool is one etcd transaction
//!   ([`Supervisor::cluster_pool_admit`]), made before the unikernel is
//!   recorded; the node's own record of the draw follows it.
//! - A unikernel that stops drawing (ended, destroyed, its pool empty) is
//!   dropped from the node's record at once, and the cluster told by the
//!   node's pool sync ([`Supervisor::sync_pools`]): woken then, and once a
//!   second anyway. The sync also takes away what nodes that died drew,
//!   and refreshes the mirror, from which the expiry timer learns each
//!   pool's EmptyAt (another node's unikernels change it too).
//! - Every node stops its own unikernels when a pool empties: all see the
//!   same counters, so all stop them at the same time, give or take their
//!   clocks' difference and a second.

use super::super::desired::Spec;
use super::super::pools::{ClusterInfo, Meta};
use super::super::sys::now_ns;
use super::Supervisor;
use crate::cluster::pools::{Accepted, ClusterPool, PoolView};
use crate::pools::Pool;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

/// A cluster's pool, written at revision `rev`, as the mirror takes it.
fn parts((cp, rev): (ClusterPool, i64)) -> (Pool, Meta, ClusterInfo, i64) {
    let info = ClusterInfo {
        nodes: cp.nodes,
        drawing: (cp.draws.iter())
            .map(|(n, m)| (n.clone(), m.len()))
            .collect(),
    };
    let meta = Meta {
        owner: cp.owner,
        sponsor: cp.sponsor,
    };
    (cp.pool, meta, info, rev)
}

impl Supervisor {
    /// Read the cluster's pools and keys into the mirror (a no-op on a
    /// single host).
    pub async fn refresh_pools(&self) -> Result<(), String> {
        let Some(node) = self.cluster.get() else {
            return Ok(());
        };
        let view = node.cluster.pool_view().await.map_err(|e| e.to_string())?;
        self.mirror(view);
        Ok(())
    }

    /// Take `view` into the mirror; wake the expiry timer if a pool changed.
    fn mirror(&self, view: PoolView) {
        let changed = self
            .pools()
            .mirror(view.pools.into_iter().map(parts).collect(), view.keys);
        if changed {
            self.pools_changed.notify_one();
        }
    }

    /// On a cluster node, admit `spec` into its pool through the cluster
    /// and record its draw here; true if it was recorded now (undo it with
    /// `stop_drawing` if the unikernel is not started after all).
    pub(super) async fn cluster_pool_admit(&self, spec: &Spec) -> Result<bool, String> {
        let (Some(pool), Some(node)) = (&spec.pool, self.cluster.get()) else {
            return Ok(false);
        };
        if self.pools().is_drawing(&spec.name) {
            return Ok(false);
        }
        let draw = Self::draw_of(spec)?;
        let min_run = self.cfg.pool_min_run.as_nanos() as u64;
        let _turn = self.pool_sync.lock().await;
        // Another create of the same name may have been admitted while
        // this one waited: it is that one's draw, not this one's to undo.
        if self.pools().is_drawing(&spec.name) {
            return Ok(false);
        }
        let (cp, rev) = node
            .cluster
            .pool_start_drawing(pool, &spec.name, draw, now_ns(), min_run)
            .await
            .map_err(|e| e.to_string())?;
        {
            let mut pools = self.pools();
            pools.note_drawing(&spec.name, pool, draw)?;
            let (p, m, i, rev) = parts((cp, rev));
            pools.mirror_one(p, m, i, rev);
        }
        self.pools_changed.notify_one();
        Ok(true)
    }

    /// Keep the cluster told what this node's unikernels draw, take away
    /// what dead nodes drew, and keep the mirror fresh: until the daemon
    /// exits.
    pub async fn sync_pools(self: Arc<Self>) {
        loop {
            if let Err(e) = self.sync_pools_once().await {
                log::warn!("cluster: pools: {e}");
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = self.pool_sync_wake.notified() => {}
            }
        }
    }

    async fn sync_pools_once(&self) -> Result<(), String> {
        let Some(node) = self.cluster.get() else {
            return Ok(());
        };
        let c = &node.cluster;
        let _turn = self.pool_sync.lock().await;
        let view = c.pool_view().await.map_err(|e| e.to_string())?;
        let own = self.pools().own_draws();
        let me = c.cfg.node.clone();
        let mut live: BTreeSet<String> = c
            .membership()
            .await
            .map_err(|e| e.to_string())?
            .into_keys()
            .collect();
        live.insert(me.clone());
        let mut wrote = false;
        // Each pool on its own: one that fails is said, the others synced.
        for (cp, _) in &view.pools {
            let name = cp.pool.name();
            let mine = own.get(name).cloned().unwrap_or_default();
            let now = now_ns();
            if cp.draws.get(&me).cloned().unwrap_or_default() != mine {
                match c.pool_set_own_draws(name, mine, now).await {
                    Ok(_) => wrote = true,
                    Err(e) => log::warn!("cluster: pool {name}: {e}"),
                }
            }
            // Members read after the pools: a node that drew and is not
            // one is gone (the forget checks that it has not come back).
            let gone: BTreeSet<String> = (cp.draws.keys())
                .filter(|n| !live.contains(*n))
                .cloned()
                .collect();
            if !gone.is_empty() {
                log::info!(
                    "pool {name}: node(s) {} gone: their unikernels no longer draw from it",
                    gone.iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                match c.pool_forget_nodes(name, &gone, now).await {
                    Ok(_) => wrote = true,
                    Err(e) => log::warn!("cluster: pool {name}: {e}"),
                }
            }
        }
        if wrote {
            return self.refresh_pools().await;
        }
        self.mirror(view);
        Ok(())
    }

    /// `pool create` on a cluster node.
    pub async fn cluster_pool_create(
        &self,
        name: &str,
        meta: Meta,
        nodes: Option<Vec<String>>,
    ) -> Result<(), String> {
        let node = self
            .cluster
            .get()
            .ok_or("this daemon is not a cluster node")?;
        crate::pools::keys::check_user(&meta.owner).map_err(|e| e.to_string())?;
        if let Some(s) = &meta.sponsor {
            crate::pools::keys::check_user(s).map_err(|e| e.to_string())?;
        }
        crate::resources::Label::new(name).map_err(|e| format!("bad pool name: {e}"))?;
        if let Some(l) = &nodes {
            if l.is_empty() {
                return Err("pool create: --nodes= names no node".into());
            }
            for n in l {
                crate::resources::Label::new(n).map_err(|e| format!("bad node id {n:?}: {e}"))?;
            }
        }
        let cp = ClusterPool {
            pool: Pool::new(name, now_ns()),
            owner: meta.owner,
            sponsor: meta.sponsor,
            nodes,
            draws: Default::default(),
        };
        node.cluster
            .pool_create(cp)
            .await
            .map_err(|e| e.to_string())?;
        self.refresh_pools().await
    }

    /// `key add` on a cluster node.
    pub async fn cluster_key_add(&self, user: &str, key: &str) -> Result<bool, String> {
        let node = self
            .cluster
            .get()
            .ok_or("this daemon is not a cluster node")?;
        crate::pools::keys::check_user(user).map_err(|e| e.to_string())?;
        let k = crate::pools::keys::parse_public_key(key).map_err(|e| e.to_string())?;
        let added = node
            .cluster
            .key_add(user, &k)
            .await
            .map_err(|e| e.to_string())?;
        self.refresh_pools().await?;
        Ok(added)
    }

    /// `pool reserve` on a cluster node: verified against the cluster's
    /// keys and pools, accepted once in the cluster's life.
    pub async fn cluster_reserve(&self, envelope: &[u8]) -> Result<String, String> {
        let node = self
            .cluster
            .get()
            .ok_or("this daemon is not a cluster node")?;
        self.refresh_pools().await?;
        let accepted = self.pools().verify(envelope)?;
        let r = accepted.reservation().clone();
        let now = now_ns();
        let record = Accepted {
            pool: r.pool.clone(),
            node: node.cluster.cfg.node.clone(),
            at_ns: now,
            cu: r.cu,
            su: r.su,
            ipv4u: r.ipv4u,
        };
        let written = node
            .cluster
            .pool_top_up(&r.id, record)
            .await
            .map_err(|e| e.to_string())?;
        {
            let mut pools = self.pools();
            pools.record(&accepted, now)?;
            let (p, m, i, rev) = parts(written);
            pools.mirror_one(p, m, i, rev);
        }
        self.pools_changed.notify_one();
        Ok(super::super::pools::accepted_message(&r))
    }
}
