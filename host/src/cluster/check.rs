//! The cluster's admission rule, apart from etcd: given, for every path
//! from the root down to a unikernel's own path, the policy set there (if
//! any) and what the whole cluster runs below it, may one more unikernel
//! run?
//!
//! The cluster counts what adds up across hosts: unikernels, memory and
//! block storage. A policy field not set at a path is inherited from the
//! nearest policy above that sets it; above the root nothing is limited
//! (each node's own state directory still limits what runs on it, CPUs
//! and bridges included, as on a single host). Every ancestor is checked,
//! not only the nearest policy: a subtree may not use more than any path
//! above it allows, whatever its own policy says.

use crate::resources::{PartialPolicy, Path, Usage};
use serde::{Deserialize, Serialize};

/// What one unikernel takes from the cluster's limits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    pub memory_mb: u64,
    pub block_mb: u64,
}

impl Claim {
    /// `usage` with this unikernel added (saturating: limits are checked
    /// on the result).
    pub fn added_to(&self, usage: Usage) -> Usage {
        Usage {
            unikernels: usage.unikernels.saturating_add(1),
            memory_mb: usage.memory_mb.saturating_add(self.memory_mb),
            block_mb: usage.block_mb.saturating_add(self.block_mb),
        }
    }

    /// `usage` with this unikernel taken away.
    pub fn taken_from(&self, usage: Usage) -> Usage {
        Usage {
            unikernels: usage.unikernels.saturating_sub(1),
            memory_mb: usage.memory_mb.saturating_sub(self.memory_mb),
            block_mb: usage.block_mb.saturating_sub(self.block_mb),
        }
    }
}

/// One path on the way down to a unikernel: its policy and the cluster's
/// usage below it (every node's, summed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Level {
    pub path: Path,
    pub policy: Option<PartialPolicy>,
    pub usage: Usage,
}

/// The limits in force at a path (inherited where not set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Limits {
    unikernels: u64,
    memory_mb: u64,
    /// `None`: no block storage.
    block_mb: Option<u64>,
}

/// Why the cluster refuses: which path, which resource, how much.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{path}: {resource} would be {would}{unit} across the cluster, above the {limit}{unit} its policy allows"
)]
pub struct Refused {
    pub path: String,
    pub resource: &'static str,
    pub would: u64,
    pub limit: u64,
    pub unit: &'static str,
}

/// May `claim` run below `levels` (the root first, the unikernel's own
/// path last)?
pub fn check(levels: &[Level], claim: &Claim) -> Result<(), Refused> {
    let mut limits = Limits {
        unikernels: u64::MAX,
        memory_mb: u64::MAX,
        block_mb: Some(u64::MAX),
    };
    for level in levels {
        if let Some(p) = &level.policy {
            if let Some(n) = p.unikernels {
                limits.unikernels = u64::from(n);
            }
            if let Some(m) = p.memory_mb {
                limits.memory_mb = m;
            }
            if let Some(b) = p.block_mb {
                limits.block_mb = b;
            }
        }
        let after = claim.added_to(level.usage);
        let refuse = |resource, would, limit, unit| Refused {
            path: level.path.to_string(),
            resource,
            would,
            limit,
            unit,
        };
        if after.unikernels > limits.unikernels {
            return Err(refuse(
                "unikernels",
                after.unikernels,
                limits.unikernels,
                "",
            ));
        }
        if after.memory_mb > limits.memory_mb {
            return Err(refuse("memory", after.memory_mb, limits.memory_mb, " MB"));
        }
        match limits.block_mb {
            None if claim.block_mb > 0 => {
                return Err(refuse("block storage", after.block_mb, 0, " MB"))
            }
            Some(b) if after.block_mb > b => {
                return Err(refuse("block storage", after.block_mb, b, " MB"))
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn level(path: &str, policy: Option<PartialPolicy>, uks: u64, mem: u64) -> Level {
        Level {
            path: path.parse().unwrap(),
            policy,
            usage: Usage {
                unikernels: uks,
                memory_mb: mem,
                block_mb: 0,
            },
        }
    }

    fn uks(n: u32) -> PartialPolicy {
        PartialPolicy {
            unikernels: Some(n),
            ..Default::default()
        }
    }

    #[test]
    fn every_ancestor_is_checked_and_fields_are_inherited() {
        let claim = Claim {
            memory_mb: 64,
            block_mb: 0,
        };
        // alice may run 5; alice:bob says 10, but alice's 5 still holds.
        let lv = [
            level(":", None, 7, 700),
            level("alice", Some(uks(5)), 4, 256),
            level("alice:bob", Some(uks(10)), 4, 256),
        ];
        assert!(check(&lv, &claim).is_ok());
        let lv = [
            level(":", None, 8, 700),
            level("alice", Some(uks(5)), 5, 320),
            level("alice:bob", Some(uks(10)), 5, 320),
        ];
        let e = check(&lv, &claim).unwrap_err();
        assert_eq!(
            (e.path.as_str(), e.resource, e.would, e.limit),
            ("alice", "unikernels", 6, 5)
        );
        assert!(e.to_string().contains("across the cluster"), "{e}");
        // Memory set at the root, inherited below.
        let root = PartialPolicy {
            memory_mb: Some(1024),
            ..Default::default()
        };
        let lv = [
            level(":", Some(root), 3, 1000),
            level("alice", Some(uks(5)), 1, 64),
        ];
        let e = check(&lv, &claim).unwrap_err();
        assert_eq!((e.path.as_str(), e.resource), ("(root)", "memory"));
    }

    #[test]
    fn no_block_storage_means_none() {
        let none = PartialPolicy {
            block_mb: Some(None),
            ..Default::default()
        };
        let lv = [level(":", None, 0, 0), level("carol", Some(none), 0, 0)];
        let disk = Claim {
            memory_mb: 8,
            block_mb: 1,
        };
        assert_eq!(check(&lv, &disk).unwrap_err().resource, "block storage");
        let diskless = Claim {
            memory_mb: 8,
            block_mb: 0,
        };
        assert!(check(&lv, &diskless).is_ok());
    }
}
