//! A cluster of tt-host nodes sharing one delegation tree through etcd
//! (docs/CLUSTER.md).
//!
//! `tt-host daemon --cluster=ENDPOINTS --node-id=ID` keeps the cluster's
//! policies and every node's running reservations in etcd ([`store`]), so
//! that a policy such as "alice may run 5 unikernels" holds across all
//! nodes together: each admission is one etcd transaction conditioned on
//! the revisions it read ([`store::Cluster::admit`]), and each node's
//! reservations hang on its lease, so a node that dies loses them when the
//! lease expires. The rule itself ([`check`]) needs no etcd.
//!
//! Every launch on a cluster node goes through it: the daemon writes
//! `STATE/cluster.json` ([`NodeFile`]) naming its socket, and `tt-host run`
//! asks the daemon there ([`admit_through_node`]) once its own state
//! directory admitted it. A node whose daemon does not answer admits
//! nothing.
//!
//! Environments stay one node's, but their names are the cluster's:
//! each has its record in etcd ([`envs`]).
//!
//! The etcd client (the `etcd-client` crate, which needs `protoc` to
//! build) is behind the cargo feature `cluster`; without it, `tt-host
//! daemon --cluster` says so, and a single host works as before.

pub mod check;
#[cfg(feature = "cluster")]
pub mod envs;
#[cfg(feature = "cluster")]
pub mod pools;
#[cfg(feature = "cluster")]
pub mod store;

use crate::resources::Name;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The file in a node's state directory that makes every launch there a
/// cluster launch.
pub const NODE_FILE: &str = "cluster.json";

/// What `STATE/cluster.json` says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeFile {
    /// The node's id in the cluster.
    pub node: String,
    /// The daemon's control socket, which admits through the cluster.
    pub socket: PathBuf,
}

impl NodeFile {
    /// The node file of `state_dir`, if it is a cluster node's.
    pub fn read(state_dir: &Path) -> Result<Option<NodeFile>, String> {
        let path = state_dir.join(NODE_FILE);
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| format!("{}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    /// Write it (crash-safely) into `state_dir`.
    pub fn write(&self, state_dir: &Path) -> Result<(), String> {
        let path = state_dir.join(NODE_FILE);
        let bytes = serde_json::to_vec_pretty(self).expect("encodes");
        crate::daemon::sys::write_atomic(&path, &bytes)
            .map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// Admit the unikernel `name` through the cluster, if `state_dir` is a
/// cluster node's: ask its daemon. Called by a launch after its own state
/// directory admitted it. `incoming`: it arrives by live migration, and
/// the node it comes from may hold its name until its run ends.
pub fn admit_through_node(
    state_dir: &Path,
    name: &Name,
    claim: check::Claim,
    incoming: bool,
) -> Result<(), String> {
    let Some(node) = NodeFile::read(state_dir)? else {
        return Ok(());
    };
    let mut c =
        crate::daemon::client::Connection::open(Some(node.socket.clone())).map_err(|e| {
            format!(
                "this host is cluster node {} ({}), and its daemon does not answer: \
             nothing is admitted until it does ({e})",
                node.node,
                state_dir.join(NODE_FILE).display()
            )
        })?;
    c.call(crate::daemon::proto::Op::ClusterAdmit {
        name: name.to_string(),
        memory_mb: claim.memory_mb,
        block_mb: claim.block_mb,
        incoming,
    })
    .map(drop)
}
