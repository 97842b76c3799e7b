//! Environments in the cluster: `envs/NAME` below the prefix.
//!
//! An environment is one node's (its bridge, rules and unikernels are
//! there), but its name is the cluster's: `tt-host env create` on a
//! cluster node first claims `envs/NAME` ([`Cluster::put_env`]: put if
//! absent, in one transaction), and a name another node holds is refused,
//! naming that node. The record ([`EnvRecord`], JSON) says where the
//! environment is and what it is doing; it hangs on its node's lease, so
//! it goes when that node does (and the node's peers report it lost).
//!
//! Only the node named in a record writes or removes it: every write
//! below is conditioned on the key being absent or holding a record of
//! this node, at the revision read, so a node never overwrites another
//! node's environment, even one that took the name while this node's
//! lease had expired.

use super::store::{decode, Cluster, ClusterError, Retrying};
use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse};
use serde::{Deserialize, Serialize};

/// An environment's record in the cluster (`envs/NAME`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvRecord {
    pub name: String,
    /// The node it is on.
    pub node: String,
    /// Its owner's uid.
    pub owner: u32,
    /// `creating`, `running` or `stopped`.
    pub state: String,
    /// When it is destroyed (Unix ns).
    pub end: u64,
    /// Its unikernels.
    pub units: u32,
    /// The memory its unikernels take when they run, in MB.
    #[serde(default)]
    pub memory_mb: u64,
    /// When it was created (Unix ns).
    #[serde(default)]
    pub created: u64,
}

/// A record as etcd holds it: with the lease it hangs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvEntry {
    pub record: EnvRecord,
    pub lease: i64,
}

/// What went wrong with an environment's record.
#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    #[error("environment {name} exists on node {node} of the cluster (names are the cluster's)")]
    Taken { name: String, node: String },
    #[error(transparent)]
    Cluster(#[from] ClusterError),
}

/// Conflicting writes in a row before a write gives up (each conflict is
/// this node's own record changing, or its disappearing).
const TRIES: usize = 16;

impl Cluster {
    fn k_env(&self, name: &str) -> String {
        self.key(&format!("envs/{name}"))
    }

    /// Put `rec` (an environment of this node) on this node's lease, if
    /// `envs/NAME` is absent or this node's: claims a new name, rewrites a
    /// record, and moves one of an earlier run onto the current lease.
    /// [`EnvError::Taken`] if another node holds the name.
    pub async fn put_env(&self, rec: &EnvRecord) -> Result<(), EnvError> {
        let key = self.k_env(&rec.name);
        let put = TxnOp::put(
            key.clone(),
            serde_json::to_vec(rec).expect("encodes"),
            Some(PutOptions::new().with_lease(self.lease_id())),
        );
        self.if_own(&rec.name, put).await.map(drop)
    }

    /// Remove `envs/NAME` if it is this node's; whether it was there.
    pub async fn delete_env(&self, name: &str) -> Result<bool, EnvError> {
        let del = TxnOp::delete(self.k_env(name), None);
        match self.if_own(name, del).await {
            Ok(was) => Ok(was),
            // Another node's: not this node's to remove, and not here.
            Err(EnvError::Taken { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Do `op` on `envs/NAME` in a transaction conditioned on the key
    /// being absent, or this node's at the revision read; whether it was
    /// there.
    async fn if_own(&self, name: &str, op: TxnOp) -> Result<bool, EnvError> {
        let key = self.k_env(name);
        let client = Retrying(self);
        // First guess: absent (a new name).
        let mut expect = Compare::create_revision(key.clone(), CompareOp::Equal, 0);
        let mut present = false;
        for _ in 0..TRIES {
            let r = client
                .txn(
                    Txn::new()
                        .when(vec![expect])
                        .and_then(vec![op.clone()])
                        .or_else(vec![TxnOp::get(key.clone(), None)]),
                )
                .await
                .map_err(|e| self.unreachable(e))?;
            if r.succeeded() {
                return Ok(present);
            }
            let kv = r.op_responses().into_iter().find_map(|o| match o {
                TxnOpResponse::Get(g) => g.kvs().first().cloned(),
                _ => None,
            });
            match kv {
                None => {
                    expect = Compare::create_revision(key.clone(), CompareOp::Equal, 0);
                    present = false;
                }
                Some(kv) => {
                    let other: EnvRecord = decode(kv.key(), kv.value())?;
                    if other.node != self.cfg.node {
                        return Err(EnvError::Taken {
                            name: name.to_string(),
                            node: other.node,
                        });
                    }
                    expect =
                        Compare::mod_revision(key.clone(), CompareOp::Equal, kv.mod_revision());
                    present = true;
                }
            }
        }
        Err(ClusterError::Contended.into())
    }

    /// Every environment's record in the cluster, with its lease.
    pub async fn envs(&self) -> Result<Vec<EnvEntry>, ClusterError> {
        let got = Retrying(self)
            .get(self.key("envs/"), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|e| self.unreachable(e))?;
        got.kvs()
            .iter()
            .map(|kv| {
                Ok(EnvEntry {
                    record: decode(kv.key(), kv.value())?,
                    lease: kv.lease(),
                })
            })
            .collect()
    }
}

/// What a node changes in etcd to make it say what its own environments
/// are (`want`), given what etcd holds (`have`, every node's): records to
/// put (missing, different, or on another lease than `lease`) and names
/// to remove (this node's records of environments it no longer has).
pub fn plan<'a>(
    node: &str,
    lease: i64,
    want: &'a [EnvRecord],
    have: &[EnvEntry],
) -> (Vec<&'a EnvRecord>, Vec<String>) {
    let put = want
        .iter()
        .filter(|w| !have.iter().any(|h| h.record == **w && h.lease == lease))
        .collect();
    let delete = have
        .iter()
        .filter(|h| h.record.node == node && !want.iter().any(|w| w.name == h.record.name))
        .map(|h| h.record.name.clone())
        .collect();
    (put, delete)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(name: &str, node: &str, units: u32) -> EnvRecord {
        EnvRecord {
            name: name.into(),
            node: node.into(),
            owner: 0,
            state: "running".into(),
            end: 10,
            units,
            memory_mb: 8,
            created: 1,
        }
    }

    fn entry(r: EnvRecord, lease: i64) -> EnvEntry {
        EnvEntry { record: r, lease }
    }

    #[test]
    fn a_node_puts_what_differs_and_removes_only_its_own_stale_records() {
        let want = vec![rec("a", "n0", 1), rec("b", "n0", 2), rec("c", "n0", 0)];
        let have = vec![
            // Up to date.
            entry(rec("a", "n0", 1), 7),
            // Changed since (a unikernel joined).
            entry(rec("b", "n0", 1), 7),
            // An earlier run's lease: put again on this one.
            entry(rec("c", "n0", 0), 3),
            // Gone here: removed.
            entry(rec("d", "n0", 0), 7),
            // Another node's: left alone.
            entry(rec("e", "n1", 0), 9),
        ];
        let (put, delete) = plan("n0", 7, &want, &have);
        let put: Vec<&str> = put.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(put, ["b", "c"]);
        assert_eq!(delete, ["d"]);
        // A name another node holds is wanted: put tries, and is refused
        // (by put_env's compare), not planned away.
        let mine = [rec("e", "n0", 0)];
        let (put, delete) = plan("n0", 7, &mine, &have[4..]);
        assert_eq!(put.len(), 1);
        assert!(delete.is_empty());
    }

    #[test]
    fn a_record_reads_back_and_older_ones_without_the_optional_fields_too() {
        let r = rec("alice:lab", "n2", 3);
        let bytes = serde_json::to_vec(&r).unwrap();
        let back: EnvRecord = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(back, r);
        let old = br#"{"name":"x","node":"n0","owner":1000,"state":"stopped","end":5,"units":0}"#;
        let back: EnvRecord = serde_json::from_slice(old).unwrap();
        assert_eq!((back.memory_mb, back.created), (0, 0));
    }
}
