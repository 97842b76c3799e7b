//! Environments on a cluster node: the supervisor's side of
//! `daemon::cluster::envs` (docs/CLUSTER.md, "Environments"). Each is a
//! no-op without `--cluster` (or without the `cluster` feature).

use super::{EnvRequest, Supervisor};
#[cfg(feature = "cluster")]
use crate::daemon::desired::Spec;
#[cfg(feature = "cluster")]
use crate::daemon::envs::Env;
use std::sync::Arc;

/// Environment `env`'s record in the cluster, on node `node`, with its
/// unikernels among `specs`.
#[cfg(feature = "cluster")]
pub(super) fn record<'a>(
    env: &Env,
    node: &str,
    specs: impl Iterator<Item = &'a Spec>,
) -> crate::cluster::envs::EnvRecord {
    let members: Vec<&Spec> = specs
        .filter(|s| s.env.as_deref() == Some(env.name.as_str()))
        .collect();
    let memory_mb = members
        .iter()
        .map(|s| match crate::cli::parse_run(&s.args) {
            Ok(crate::cli::Parsed::Run(r)) => r.mem_mb,
            _ => 0,
        })
        .sum();
    crate::cluster::envs::EnvRecord {
        name: env.name.clone(),
        node: node.to_string(),
        owner: env.owner.uid,
        state: env.state.name().to_string(),
        end: env.end_ns,
        units: members.len() as u32,
        memory_mb,
        created: env.created_ns,
    }
}

impl Supervisor {
    /// Every environment of this node as the cluster's records say it.
    #[cfg(feature = "cluster")]
    fn cluster_records(&self, node: &str) -> Vec<crate::cluster::envs::EnvRecord> {
        let inner = self.lock();
        let envs = self.envs();
        envs.all()
            .map(|e| record(e, node, inner.units.values().map(|u| &u.spec)))
            .collect()
    }

    /// On a cluster node in touch with etcd: make its records of this
    /// node's environments say what is here now (else the node's
    /// once-a-second reconciliation does, when etcd answers again).
    pub(super) async fn cluster_sync(&self) {
        #[cfg(feature = "cluster")]
        if let Some(node) = self.cluster.get().filter(|n| n.in_touch()) {
            if let Err(e) = node.sync_envs().await {
                log::warn!("cluster: environments: {e}");
            }
        }
    }

    /// On a cluster node, from now on: its records follow this
    /// supervisor's environments (those recovered at the start first).
    pub(super) async fn cluster_follow(self: &Arc<Self>) {
        #[cfg(feature = "cluster")]
        if let Some(node) = self.cluster.get() {
            let sup = Arc::downgrade(self);
            let id = node.cluster.cfg.node.clone();
            node.set_env_source({
                let sup = sup.clone();
                move || sup.upgrade().map(|s| s.cluster_records(&id))
            });
            // Environments other nodes place here (env create --anywhere).
            node.set_env_creator(move |req| {
                let sup = sup.upgrade();
                Box::pin(async move {
                    match sup {
                        Some(s) => s.env_create(req).await,
                        None => Err("the daemon is exiting".to_string()),
                    }
                })
            });
        }
        self.cluster_sync().await;
    }

    /// `env create --anywhere`: on the cluster's node with room for its
    /// unikernels (this one, or another one asked through the cluster).
    pub async fn env_create_anywhere(self: &Arc<Self>, req: EnvRequest) -> Result<String, String> {
        #[cfg(feature = "cluster")]
        if let Some(node) = self.cluster.get() {
            let sup = self.clone();
            return node
                .create_env_anywhere(req, |r| async move { sup.env_create(r).await })
                .await;
        }
        let _ = req;
        Err("env create --anywhere: this daemon is not a cluster node (no --cluster)".into())
    }

    /// "no environment named NAME", saying which node has it if another
    /// node of the cluster does.
    pub fn no_env(&self, name: &str) -> String {
        #[cfg(feature = "cluster")]
        if let Some(n) = self.cluster.get().and_then(|c| c.env_node(name)) {
            return format!(
                "no environment named {name} here: it is on node {n} of the cluster \
                 (ask that node's daemon)"
            );
        }
        format!("no environment named {name}")
    }

    /// `env list --cluster`: every node's environments that `sees` allows.
    pub async fn cluster_env_list(
        &self,
        sees: &(dyn Fn(&str) -> bool + Sync),
    ) -> Result<String, String> {
        #[cfg(feature = "cluster")]
        if let Some(node) = self.cluster.get() {
            return node.env_table(sees).await;
        }
        let _ = sees;
        Err("env list --cluster: this daemon is not a cluster node (no --cluster)".into())
    }
}
