//! The daemon's capacity pools ([`crate::pools`]): the pools with their
//! owners, the users' keys, which unikernels draw from which pool, and
//! the audit log of accepted reservations.
//!
//! Everything but the audit log is kept in `STATE/daemon/pools.json`,
//! rewritten crash-safely (new file, fdatasync, rename, fsync of the
//! directory) after every change; the counters in it are as of each
//! pool's last sync, and its draw is what its unikernels draw. A daemon
//! that starts again charges every pool for the time since its last
//! sync at that draw: time that passed while the daemon was down (or the
//! host was off) is charged. The audit log (`STATE/daemon/reservations.log`)
//! is append-only ([`crate::pools::audit`]).

use crate::pools::audit::AuditLog;
use crate::pools::keys::{self, KeyRing};
use crate::pools::reservation::{self, PoolInfo};
use crate::pools::{Draw, Pool, Pools, Unit, Workload, PER_UNIT_SECOND};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Who a pool belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    pub owner: String,
    pub sponsor: Option<String>,
}

/// What pools.json holds.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Stored {
    pools: Pools,
    meta: BTreeMap<String, Meta>,
    keys: KeyRing,
    /// Unikernel name -> (pool, its draw), for those drawing now.
    drawing: BTreeMap<String, (String, Draw)>,
    /// Written by a cluster node: `drawing` names the cluster's pools.
    #[serde(default)]
    clustered: bool,
}

/// The daemon's pools.
pub struct PoolState {
    stored: Stored,
    path: PathBuf,
    audit: AuditLog,
    /// A cluster node's (`--cluster`): the pools, their owners and the keys
    /// are the cluster's, in etcd, and `stored` mirrors them
    /// ([`PoolState::mirror`]); only `drawing` (this node's unikernels) is
    /// this node's, and only it is saved.
    clustered: bool,
    /// In a cluster: each pool's node list (`None`: any node), and how
    /// many unikernels of each node draw from it.
    cluster_info: BTreeMap<String, ClusterInfo>,
    /// In a cluster: the etcd revision each mirrored pool was written at,
    /// so that a view read before a change does not undo it here.
    cluster_rev: BTreeMap<String, i64>,
}

/// What a cluster's pool says beyond [`Pool`] and [`Meta`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterInfo {
    pub nodes: Option<Vec<String>>,
    pub drawing: BTreeMap<String, usize>,
}

/// One line of `pool show`.
pub fn show(pool: &Pool, meta: Option<&Meta>, warned: bool) -> String {
    let mut out = format!("pool {}", pool.name());
    if let Some(m) = meta {
        out += &format!("  owner {}", m.owner);
        if let Some(s) = &m.sponsor {
            out += &format!("  sponsor {s}");
        }
    }
    out += "\n";
    let draw = pool.draw();
    let time = |ns: u64| {
        humantime::format_rfc3339_millis(
            std::time::UNIX_EPOCH + std::time::Duration::from_nanos(ns),
        )
        .to_string()
    };
    for (unit, d) in [
        (Unit::Cu, draw.cu),
        (Unit::Su, draw.su),
        (Unit::Ipv4u, draw.ipv4u),
    ] {
        let left = pool.left(unit) as f64 / PER_UNIT_SECOND as f64;
        out += &format!(
            "  {unit:<6} left {left:.3} unit-seconds  draw {:.6} per second\n",
            d as f64 / 1e6
        );
    }
    out += &format!("  last sync {}\n", time(pool.last_sync_ns()));
    out += &match pool.empty_at() {
        Some(t) => format!(
            "  empty at {}{}\n",
            time(t),
            if warned { " (warned)" } else { "" }
        ),
        None => "  empty at never (nothing draws from it)\n".into(),
    };
    out
}

impl PoolState {
    /// Load (or start empty) from the daemon's directory, and charge every
    /// pool up to `now_ns`.
    pub fn open(dir: &Path, now_ns: u64) -> Result<PoolState, String> {
        let path = dir.join("pools.json");
        let mut stored: Stored = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| format!("{}: {e}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Stored::default(),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        stored.pools.sync_all(now_ns);
        let audit = AuditLog::open(&dir.join("reservations.log")).map_err(|e| e.to_string())?;
        let s = PoolState {
            stored,
            path,
            audit,
            clustered: false,
            cluster_info: BTreeMap::new(),
            cluster_rev: BTreeMap::new(),
        };
        s.save()?;
        Ok(s)
    }

    fn save(&self) -> Result<(), String> {
        let bytes = if self.clustered {
            let own = Stored {
                drawing: self.stored.drawing.clone(),
                clustered: true,
                ..Stored::default()
            };
            serde_json::to_vec(&own)
        } else {
            serde_json::to_vec(&self.stored)
        }
        .map_err(|e| e.to_string())?;
        super::sys::write_atomic(&self.path, &bytes)
            .map_err(|e| format!("{}: {e}", self.path.display()))
    }

    /// From now on the pools are the cluster's: what this node kept of its
    /// own is dropped (the mirror fills in from etcd), its unikernels'
    /// draws are kept (the cluster is told of them).
    pub fn set_clustered(&mut self) -> Result<(), String> {
        // Draws recorded by this host alone are from its own pools, which
        // the cluster's are not: they are dropped, not carried over.
        if !self.stored.clustered {
            self.drop_draws("joining a cluster: this host's pools are not the cluster's");
        }
        self.stored.clustered = true;
        self.clustered = true;
        self.stored.pools = Pools::new();
        self.stored.meta.clear();
        self.stored.keys = KeyRing::new();
        self.save()
    }

    pub fn is_clustered(&self) -> bool {
        self.clustered
    }

    /// A single host (no `--cluster`): draws recorded as a cluster node's
    /// are from the cluster's pools, which are not here: dropped.
    pub fn set_single_host(&mut self) -> Result<(), String> {
        if !self.stored.clustered {
            return Ok(());
        }
        self.drop_draws("no longer a cluster node: the cluster's pools are not here");
        self.stored.clustered = false;
        self.save()
    }

    /// Forget every draw recorded (their pools are not this daemon's any
    /// more), saying so with `why`.
    fn drop_draws(&mut self, why: &str) {
        if self.stored.drawing.is_empty() {
            return;
        }
        let units: Vec<String> = self.stored.drawing.keys().cloned().collect();
        log::warn!("{why}: {} no longer draw(s) from a pool", units.join(", "));
        self.stored.drawing.clear();
    }

    /// The unikernels recorded as drawing.
    pub fn drawing_units(&self) -> Vec<String> {
        self.stored.drawing.keys().cloned().collect()
    }

    /// Replace the mirror of the cluster's pools and keys with what etcd
    /// holds: each pool with its owner, [`ClusterInfo`] and the revision
    /// it was written at (a pool mirrored at a later one is kept: the
    /// view was read before that change). True if a pool changed (its
    /// EmptyAt may have).
    pub fn mirror(&mut self, pools: Vec<(Pool, Meta, ClusterInfo, i64)>, keys: KeyRing) -> bool {
        let before = self.stored.pools.clone();
        let mut fresh = Pools::new();
        let mut meta = BTreeMap::new();
        let mut info = BTreeMap::new();
        let mut revs = BTreeMap::new();
        for (p, m, i, rev) in pools {
            let name = p.name().to_string();
            let newer = self.cluster_rev.get(&name).filter(|r| **r > rev);
            let kept = newer.and_then(|r| {
                let p = self.stored.pools.get(&name)?.clone();
                let m = self.stored.meta.get(&name)?.clone();
                let i = self.cluster_info.get(&name)?.clone();
                Some((p, m, i, *r))
            });
            let (p, m, i, rev) = kept.unwrap_or((p, m, i, rev));
            meta.insert(name.clone(), m);
            info.insert(name.clone(), i);
            revs.insert(name, rev);
            // Names in etcd are unique keys: insert cannot find one twice.
            let _ = fresh.insert(p);
        }
        self.stored.pools = fresh;
        self.stored.meta = meta;
        self.stored.keys = keys;
        self.cluster_info = info;
        self.cluster_rev = revs;
        self.stored.pools != before
    }

    /// Replace one pool of the mirror with what a change to it just wrote
    /// at revision `rev` (unless the mirror has a later one).
    pub fn mirror_one(&mut self, pool: Pool, meta: Meta, info: ClusterInfo, rev: i64) {
        let name = pool.name().to_string();
        if self.cluster_rev.get(&name).is_some_and(|r| *r > rev) {
            return;
        }
        let _ = self.stored.pools.remove(&name);
        let _ = self.stored.pools.insert(pool);
        self.stored.meta.insert(name.clone(), meta);
        self.cluster_info.insert(name.clone(), info);
        self.cluster_rev.insert(name, rev);
    }

    /// In a cluster: pool's node list (`None`: any node, or no such pool).
    pub fn nodes_of(&self, pool: &str) -> Option<Vec<String>> {
        self.cluster_info.get(pool).and_then(|i| i.nodes.clone())
    }

    /// In a cluster: the unikernel `unit` was admitted into `pool` by the
    /// cluster and draws `draw` from it.
    pub fn note_drawing(&mut self, unit: &str, pool: &str, draw: Draw) -> Result<(), String> {
        self.stored
            .drawing
            .insert(unit.to_string(), (pool.to_string(), draw));
        self.save()
    }

    /// This node's unikernels' draws, by pool.
    pub fn own_draws(&self) -> BTreeMap<String, BTreeMap<String, Draw>> {
        let mut out: BTreeMap<String, BTreeMap<String, Draw>> = BTreeMap::new();
        for (unit, (pool, draw)) in &self.stored.drawing {
            out.entry(pool.clone())
                .or_default()
                .insert(unit.clone(), *draw);
        }
        out
    }

    /// Is `unit` drawing from a pool?
    pub fn is_drawing(&self, unit: &str) -> bool {
        self.stored.drawing.contains_key(unit)
    }

    /// Check a reservation's envelope: its signatures against the keys, its
    /// pool's owner (and sponsor), and that this node never accepted it
    /// (the cluster checks that no node did).
    pub fn verify(&self, envelope: &[u8]) -> Result<reservation::Accepted, String> {
        let meta = &self.stored.meta;
        let audit = &self.audit;
        reservation::verify(
            envelope,
            |p| {
                meta.get(p).map(|m| PoolInfo {
                    owner: m.owner.clone(),
                    sponsor: m.sponsor.clone(),
                })
            },
            &self.stored.keys,
            |id| audit.contains(id),
        )
        .map_err(|e| e.to_string())
    }

    /// Record an accepted reservation in this node's audit log.
    pub fn record(&mut self, accepted: &reservation::Accepted, now_ns: u64) -> Result<(), String> {
        self.audit
            .record(accepted, now_ns)
            .map(drop)
            .map_err(|e| e.to_string())
    }

    pub fn create(&mut self, name: &str, meta: Meta, now_ns: u64) -> Result<(), String> {
        keys::check_user(&meta.owner).map_err(|e| e.to_string())?;
        if let Some(s) = &meta.sponsor {
            keys::check_user(s).map_err(|e| e.to_string())?;
        }
        crate::resources::Label::new(name).map_err(|e| format!("bad pool name: {e}"))?;
        self.stored
            .pools
            .create(name, now_ns)
            .map_err(|e| e.to_string())?;
        self.stored.meta.insert(name.to_string(), meta);
        self.save()
    }

    pub fn add_key(&mut self, user: &str, key: &str) -> Result<bool, String> {
        let k = keys::parse_public_key(key).map_err(|e| e.to_string())?;
        let added = self.stored.keys.add(user, k).map_err(|e| e.to_string())?;
        self.save()?;
        Ok(added)
    }

    /// Verify, record in the audit log, and top up.
    pub fn reserve(&mut self, envelope: &[u8], now_ns: u64) -> Result<String, String> {
        let accepted = self.verify(envelope)?;
        let r = accepted.reservation().clone();
        self.record(&accepted, now_ns)?;
        self.stored
            .pools
            .top_up(&r.pool, r.cu, r.su, r.ipv4u, now_ns)
            .map_err(|e| e.to_string())?;
        self.save()?;
        Ok(accepted_message(&r))
    }

    pub fn meta(&self, pool: &str) -> Option<&Meta> {
        self.stored.meta.get(pool)
    }

    pub fn names(&self) -> Vec<String> {
        self.stored
            .pools
            .iter()
            .map(|p| p.name().to_string())
            .collect()
    }

    /// Charge `pool` to now and show it.
    pub fn show(&mut self, pool: &str, now_ns: u64, warned: bool) -> Result<String, String> {
        self.stored
            .pools
            .sync(pool, now_ns)
            .map_err(|e| e.to_string())?;
        let p = self.stored.pools.get(pool).expect("synced just above");
        let mut out = show(p, self.stored.meta.get(pool), warned);
        if let Some(i) = self.cluster_info.get(pool) {
            out += &format!(
                "  nodes {}\n",
                i.nodes.as_ref().map_or("any".to_string(), |l| l.join(","))
            );
            for (node, n) in &i.drawing {
                out += &format!("  drawn by {n} unikernel(s) on {node}\n");
            }
        }
        Ok(out)
    }

    /// Admission: refuse a unikernel whose draw would empty `pool` within
    /// `min_run_ns`.
    pub fn admit(
        &self,
        pool: &str,
        draw: Draw,
        now_ns: u64,
        min_run_ns: u64,
    ) -> Result<(), String> {
        match self
            .stored
            .pools
            .would_be_empty_within(pool, draw, now_ns, min_run_ns)
            .map_err(|e| e.to_string())?
        {
            None => Ok(()),
            Some(at) => Err(format!(
                "refused: pool {pool} would be empty at {} with this unikernel, within the \
                 minimum run time of {} s (top it up with a reservation)",
                humantime::format_rfc3339_millis(
                    std::time::UNIX_EPOCH + std::time::Duration::from_nanos(at)
                ),
                min_run_ns / 1_000_000_000
            )),
        }
    }

    /// The unikernel `unit` draws `draw` from `pool` from now on.
    pub fn start_drawing(
        &mut self,
        unit: &str,
        pool: &str,
        draw: Draw,
        now_ns: u64,
    ) -> Result<(), String> {
        if self.stored.drawing.contains_key(unit) {
            return Ok(());
        }
        if self.clustered {
            return Err(format!(
                "{unit}: not admitted into pool {pool} by the cluster (a bug)"
            ));
        }
        self.stored
            .pools
            .add_workload(pool, draw, now_ns)
            .map_err(|e| e.to_string())?;
        self.stored
            .drawing
            .insert(unit.to_string(), (pool.to_string(), draw));
        self.save()
    }

    /// The unikernel `unit` stops drawing (destroyed, ended, or its pool
    /// emptied).
    pub fn stop_drawing(&mut self, unit: &str, now_ns: u64) -> Result<(), String> {
        let Some((pool, draw)) = self.stored.drawing.remove(unit) else {
            return Ok(());
        };
        let r = self.stored.pools.remove_workload(&pool, draw, now_ns);
        self.save()?;
        if self.clustered {
            // The mirror only: the cluster is told by the node's next pool
            // sync, and the mirror replaced then.
            return Ok(());
        }
        r.map(drop).map_err(|e| e.to_string())
    }

    /// The units drawing from `pool`.
    pub fn drawing_from(&self, pool: &str) -> Vec<String> {
        (self.stored.drawing.iter())
            .filter(|(_, (p, _))| p == pool)
            .map(|(u, _)| u.clone())
            .collect()
    }

    /// The next instant a pool empties.
    pub fn next_expiry(&self) -> Option<(u64, String)> {
        if self.clustered {
            return self.own_expiries().min();
        }
        self.stored
            .pools
            .next_expiry()
            .map(|(t, n)| (t, n.to_string()))
    }

    /// In a cluster: the EmptyAt of each pool this node's unikernels draw
    /// from (the others' are their nodes' business).
    fn own_expiries(&self) -> impl Iterator<Item = (u64, String)> + '_ {
        let own: std::collections::BTreeSet<&String> =
            self.stored.drawing.values().map(|(p, _)| p).collect();
        (self.stored.pools.iter())
            .filter(move |p| own.contains(&p.name().to_string()))
            .filter_map(|p| p.empty_at().map(|t| (t, p.name().to_string())))
    }

    /// The pools empty at or before `now_ns`.
    pub fn due(&self, now_ns: u64) -> Vec<(u64, String)> {
        if self.clustered {
            return self.own_expiries().filter(|(t, _)| *t <= now_ns).collect();
        }
        self.stored
            .pools
            .due(now_ns)
            .map(|(t, n)| (t, n.to_string()))
            .collect()
    }
}

/// What `pool reserve` says of an accepted reservation.
pub fn accepted_message(r: &reservation::Reservation) -> String {
    format!(
        "reservation {} accepted: pool {} + {} CU-s, {} SU-s, {} IPv4U-s",
        r.id, r.pool, r.cu, r.su, r.ipv4u
    )
}

/// The draw of a unikernel with `mem_mb` of memory, block images
/// totalling `block_bytes`, and `forwards` host ports forwarded to it
/// (each counted as one IPv4U: it takes a port of the host's public
/// address).
pub fn draw_of(mem_mb: u64, block_bytes: u64, forwards: u64) -> Draw {
    Draw::of(&Workload {
        memory_mib: mem_mb,
        vcpus: 1,
        block_bytes,
        ipv4: forwards,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pools::keys::encode_public_key;
    use ed25519_dalek::SigningKey;

    const S: u64 = 1_000_000_000;

    #[test]
    fn counters_and_draws_survive_reopening_and_the_time_away_is_charged() {
        let dir = tempfile::tempdir().unwrap();
        let alice = SigningKey::from_bytes(&[7; 32]);
        let mut p = PoolState::open(dir.path(), 100 * S).unwrap();
        p.create(
            "p1",
            Meta {
                owner: "alice".into(),
                sponsor: None,
            },
            100 * S,
        )
        .unwrap();
        p.add_key("alice", &encode_public_key(&alice.verifying_key()))
            .unwrap();
        let payload = br#"{"id":"r1","pool":"p1","customer":"alice","cu":100,"su":0,"ipv4u":0}"#;
        let env = crate::pools::reservation::sign(payload, &alice, None);
        p.reserve(&env, 100 * S).unwrap();
        // 2 GiB: 0.5 CU/s, so 100 CU-s last 200 s.
        let draw = draw_of(2048, 0, 0);
        p.admit("p1", draw, 100 * S, 120 * S).unwrap();
        let e = p.admit("p1", draw, 100 * S, 250 * S).unwrap_err();
        assert!(e.contains("pool p1 would be empty at"), "{e}");
        p.start_drawing("web", "p1", draw, 100 * S).unwrap();
        assert_eq!(p.next_expiry(), Some((300 * S, "p1".to_string())));
        drop(p);
        // Back 50 s later: charged for them; the same EmptyAt.
        let mut p = PoolState::open(dir.path(), 150 * S).unwrap();
        assert_eq!(p.next_expiry(), Some((300 * S, "p1".to_string())));
        let shown = p.show("p1", 150 * S, false).unwrap();
        assert!(shown.contains("CU left 75.000"), "{shown}");
        assert_eq!(p.drawing_from("p1"), ["web"]);
        // The replay is refused after reopening, from the audit log.
        assert!(p.reserve(&env, 150 * S).unwrap_err().contains("replayed"));
        p.stop_drawing("web", 160 * S).unwrap();
        assert_eq!(p.next_expiry(), None);
        assert!(p.due(1000 * S).is_empty());
    }

    #[test]
    fn a_cluster_nodes_mirror_is_not_saved_and_only_its_own_pools_expire_here() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = PoolState::open(dir.path(), 0).unwrap();
        p.set_clustered().unwrap();
        let pool = |name: &str, cu: u64, draw: Draw| {
            let mut x = Pool::new(name, 0);
            x.top_up(cu, 0, 0, 0).unwrap();
            x.add_workload(draw, 0).unwrap();
            let meta = Meta {
                owner: "alice".into(),
                sponsor: None,
            };
            (x, meta, ClusterInfo::default(), 1)
        };
        let half = draw_of(2048, 0, 0);
        // p1 empties at 200 s, p2 (another node's only) at 20 s.
        assert!(p.mirror(
            vec![pool("p1", 100, half), pool("p2", 10, half)],
            KeyRing::new()
        ));
        // Not admitted by the cluster: refused here.
        assert!(p.start_drawing("web", "p1", half, 0).is_err());
        p.note_drawing("web", "p1", half).unwrap();
        assert_eq!(p.next_expiry(), Some((200 * S, "p1".to_string())));
        assert!(p.due(100 * S).is_empty());
        assert_eq!(p.due(200 * S), [(200 * S, "p1".to_string())]);
        drop(p);
        // Reopened: the node's draw is there, the cluster's pools are not.
        let p = PoolState::open(dir.path(), 0).unwrap();
        assert!(p.names().is_empty());
        assert_eq!(p.own_draws()["p1"]["web"], half);
    }

    #[test]
    fn a_view_read_before_a_change_does_not_undo_it_in_the_mirror() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = PoolState::open(dir.path(), 0).unwrap();
        p.set_clustered().unwrap();
        let meta = Meta {
            owner: "alice".into(),
            sponsor: None,
        };
        let pool = |cu: u64| {
            let mut x = Pool::new("p1", 0);
            x.top_up(cu, 0, 0, 0).unwrap();
            x
        };
        p.mirror(
            vec![(pool(10), meta.clone(), ClusterInfo::default(), 3)],
            KeyRing::new(),
        );
        // A top-up written at revision 5 ...
        p.mirror_one(pool(1000), meta.clone(), ClusterInfo::default(), 5);
        // ... and a view read at revision 4 arriving after it.
        assert!(!p.mirror(
            vec![(pool(10), meta.clone(), ClusterInfo::default(), 4)],
            KeyRing::new()
        ));
        let shown = p.show("p1", 0, false).unwrap();
        assert!(shown.contains("CU left 1000.000"), "{shown}");
        // A later view wins.
        assert!(p.mirror(
            vec![(pool(7), meta, ClusterInfo::default(), 6)],
            KeyRing::new()
        ));
        assert!(p.show("p1", 0, false).unwrap().contains("CU left 7.000"));
    }
}
