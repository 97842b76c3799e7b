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
}

/// The daemon's pools.
pub struct PoolState {
    stored: Stored,
    path: PathBuf,
    audit: AuditLog,
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
        };
        s.save()?;
        Ok(s)
    }

    fn save(&self) -> Result<(), String> {
        let bytes = serde_json::to_vec(&self.stored).map_err(|e| e.to_string())?;
        super::sys::write_atomic(&self.path, &bytes)
            .map_err(|e| format!("{}: {e}", self.path.display()))
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
        let meta = &self.stored.meta;
        let audit = &self.audit;
        let accepted = reservation::verify(
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
        .map_err(|e| e.to_string())?;
        let r = accepted.reservation().clone();
        self.audit
            .record(&accepted, now_ns)
            .map_err(|e| e.to_string())?;
        self.stored
            .pools
            .top_up(&r.pool, r.cu, r.su, r.ipv4u, now_ns)
            .map_err(|e| e.to_string())?;
        self.save()?;
        Ok(format!(
            "reservation {} accepted: pool {} + {} CU-s, {} SU-s, {} IPv4U-s",
            r.id, r.pool, r.cu, r.su, r.ipv4u
        ))
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
        Ok(show(p, self.stored.meta.get(pool), warned))
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
        self.stored
            .pools
            .next_expiry()
            .map(|(t, n)| (t, n.to_string()))
    }

    /// The pools empty at or before `now_ns`.
    pub fn due(&self, now_ns: u64) -> Vec<(u64, String)> {
        self.stored
            .pools
            .due(now_ns)
            .map(|(t, n)| (t, n.to_string()))
            .collect()
    }
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
}
