//! A cluster node's environments (docs/CLUSTER.md, "Environments").
//!
//! - `env create` claims the name in etcd before it makes anything here
//!   ([`Node::claim_env`]); a name another node holds is refused.
//! - The node's records follow its environments: after each environment
//!   operation, and once a second in the run loop, [`Node::sync_envs`]
//!   makes `envs/` say what the supervisor has (puts what is missing,
//!   changed, or on an older lease; removes this node's records of
//!   environments it no longer has). So a daemon that restarts registers
//!   its environments again, and clears its stale ones.
//! - The same tick notices nodes that went away: their environments
//!   (gone from etcd with their lease) are reported lost, in the log and
//!   in `env list --cluster`.
//! - `env create --anywhere` places the whole environment on the node
//!   with room for its unikernels ([`Node::create_env_anywhere`]), through
//!   the same assignments as `create --anywhere`: its request is at
//!   `assign/NODE/env=NAME` (no unikernel's name has a `=`), its outcome
//!   at `placed/env=NAME`.

use super::{Node, Outcome};
use crate::cluster::envs::{plan, EnvEntry, EnvError, EnvRecord};
use crate::cluster::store::{now_ns, ClusterError};
use crate::daemon::supervisor::EnvRequest;
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// This node's environments as the supervisor has them; `None` when it
/// cannot say (it is going away).
type Source = Box<dyn Fn() -> Option<Vec<EnvRecord>> + Send + Sync>;

/// What an environment's creation gives: its message, or the error.
pub type Created = Pin<Box<dyn Future<Output = Result<String, String>> + Send>>;

/// Creates an environment here (the supervisor's `env create`).
type Creator = Box<dyn Fn(EnvRequest) -> Created + Send + Sync>;

/// The assignment key of environment NAME: `env=NAME`.
const ASSIGNED: &str = "env=";

/// How long the asking node waits for an environment created elsewhere
/// (its unikernels all start before the answer).
const PLACED_WITHIN: Duration = Duration::from_secs(120);

/// The environments' side of a [`Node`].
#[derive(Default)]
pub struct EnvSync {
    /// Set once the daemon has recovered its environments: until then
    /// the node knows not which records are stale, and removes none.
    source: OnceLock<Source>,
    /// One claim or sync at a time, so that a sync never sees a claimed
    /// name before its environment is recorded here (and removes it).
    one: tokio::sync::Mutex<()>,
    /// Each live node's environments, as seen last time.
    seen: Mutex<BTreeMap<String, Vec<EnvRecord>>>,
    /// Environments of nodes that went away, and when that was noticed
    /// (Unix ns); the last hundred.
    lost: Mutex<Vec<(EnvRecord, u64)>>,
    /// Names of this node's environments that another node holds in the
    /// cluster (said once in the log, not every second).
    warned: Mutex<BTreeSet<String>>,
    /// Set with `source`: creates what other nodes place here.
    creator: OnceLock<Creator>,
    /// Every node's records as last read (for saying where one is).
    last: Mutex<Vec<EnvRecord>>,
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Node {
    /// Where the node reads its environments from, from now on (the
    /// supervisor, once it recovered them).
    pub fn set_env_source(&self, f: impl Fn() -> Option<Vec<EnvRecord>> + Send + Sync + 'static) {
        let _ = self.envs.source.set(Box::new(f));
    }

    /// Who creates environments other nodes place here, from now on.
    pub fn set_env_creator(&self, f: impl Fn(EnvRequest) -> Created + Send + Sync + 'static) {
        let _ = self.envs.creator.set(Box::new(f));
    }

    /// If `key` (below `assign/NODE/`) is an environment's, create it here
    /// (in a task of its own) and answer at `placed/KEY`: true. False for
    /// a unikernel's, which the caller serves.
    pub(super) fn serve_env_assignment(self: &Arc<Self>, key: &str, request: &[u8]) -> bool {
        let Some(name) = crate::cluster::store::ticket_name(key).strip_prefix(ASSIGNED) else {
            return false;
        };
        let started = match serde_json::from_slice::<EnvRequest>(request) {
            Ok(req) if req.name == name => match self.envs.creator.get() {
                Some(create) => {
                    log::info!("cluster: environment {name} assigned here");
                    Ok(create(req))
                }
                None => Err("its daemon is still starting; try again".to_string()),
            },
            Ok(_) => Err("a malformed assignment (another name)".to_string()),
            Err(e) => Err(format!("a malformed assignment: {e}")),
        };
        let node = self.clone();
        let key = key.to_string();
        tokio::spawn(async move {
            let result = match started {
                Ok(f) => f.await,
                Err(e) => Err(e),
            };
            let outcome = Outcome {
                node: node.cluster.cfg.node.clone(),
                error: result.err(),
                pid: 0,
            };
            let bytes = serde_json::to_vec(&outcome).expect("encodes");
            if let Err(e) = node.cluster.placed(&key, bytes).await {
                log::warn!("cluster: {key}: cannot say how it went: {e}");
            }
        });
        true
    }

    /// `env create --anywhere`: the node with room for all of `req`'s
    /// unikernels together ([`crate::cluster::store::place`]: the sum of
    /// their memory), and the environment made there; "environment NAME
    /// created on node N". `here` makes it on this node.
    pub async fn create_env_anywhere<F, Fut>(
        &self,
        req: EnvRequest,
        here: F,
    ) -> Result<String, String>
    where
        F: FnOnce(EnvRequest) -> Fut,
        Fut: Future<Output = Result<String, String>>,
    {
        let mut mem = 0u64;
        for u in &req.units {
            match crate::cli::parse_run(&u.args) {
                Ok(crate::cli::Parsed::Run(r)) => mem += r.mem_mb,
                _ => return Err(format!("{}: its command line does not parse", u.name)),
            }
        }
        let name = req.name.clone();
        let nodes = self.cluster.nodes().await.map_err(|e| e.to_string())?;
        let chosen = crate::cluster::store::place(&nodes, mem, None)
            .ok_or_else(|| format!("no node has {mem} MB of memory free for environment {name}"))?
            .info
            .node
            .clone();
        if chosen == self.cluster.cfg.node {
            return here(req).await.map(|m| format!("{m} (on node {chosen})"));
        }
        let key = format!("{ASSIGNED}{name}");
        let request = serde_json::to_vec(&req).expect("encodes");
        let ticket = self
            .cluster
            .assign(&chosen, &key, request)
            .await
            .map_err(|e| e.to_string())?;
        let outcome = self
            .cluster
            .outcome(&chosen, &ticket, PLACED_WITHIN)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| {
                format!(
                    "node {chosen} did not say within {} s whether environment {name} was made",
                    PLACED_WITHIN.as_secs()
                )
            })?;
        let o: Outcome = serde_json::from_slice(&outcome)
            .map_err(|e| format!("node {chosen}'s answer for environment {name}: {e}"))?;
        match o.error {
            None => Ok(format!("environment {name} created on node {}", o.node)),
            Some(e) => Err(format!("on node {}: {e}", o.node)),
        }
    }

    /// Claim the name of the environment `rec` describes (being created
    /// here): refused if another node holds it. The claim stands while
    /// the returned guard is held: record the environment here before
    /// dropping it.
    pub async fn claim_env(
        &self,
        rec: &EnvRecord,
    ) -> Result<tokio::sync::MutexGuard<'_, ()>, String> {
        let since = self.cluster.since_ok();
        if since > self.cluster.cfg.ttl / 2 {
            return Err(ClusterError::CutOff(since).to_string());
        }
        let one = self.envs.one.lock().await;
        self.cluster
            .put_env(rec)
            .await
            .map_err(|e| format!("env create: {e}"))?;
        Ok(one)
    }

    /// The other node that has environment `name`, as last read (at most
    /// a second ago).
    pub fn env_node(&self, name: &str) -> Option<String> {
        locked(&self.envs.last)
            .iter()
            .find(|r| r.name == name && r.node != self.cluster.cfg.node)
            .map(|r| r.node.clone())
    }

    /// Is etcd answering (so that a sync is worth waiting for)?
    pub fn in_touch(&self) -> bool {
        self.cluster.since_ok() < self.cluster.cfg.ttl / 2
    }

    /// Make etcd's records of this node's environments say what the
    /// supervisor has (nothing before it said: see [`EnvSync`]); every
    /// node's records, as read.
    pub async fn sync_envs(&self) -> Result<Vec<EnvEntry>, ClusterError> {
        let _one = self.envs.one.lock().await;
        let have = self.cluster.envs().await?;
        *locked(&self.envs.last) = have.iter().map(|e| e.record.clone()).collect();
        let Some(want) = self.envs.source.get().and_then(|f| f()) else {
            return Ok(have);
        };
        let me = &self.cluster.cfg.node;
        let (put, delete) = plan(me, self.cluster.lease_id(), &want, &have);
        for rec in put {
            match self.cluster.put_env(rec).await {
                Ok(()) => {
                    locked(&self.envs.warned).remove(&rec.name);
                }
                Err(EnvError::Taken { name, node }) => {
                    if locked(&self.envs.warned).insert(name.clone()) {
                        log::warn!(
                            "cluster: environment {name} runs here, but node {node} holds its \
                             name in the cluster"
                        );
                    }
                }
                Err(EnvError::Cluster(e)) => return Err(e),
            }
        }
        for name in delete {
            match self.cluster.delete_env(&name).await {
                Ok(_) => log::info!("cluster: environment {name}: a stale record removed"),
                Err(EnvError::Cluster(e)) => return Err(e),
                Err(e) => log::warn!("cluster: environment {name}: {e}"),
            }
        }
        Ok(have)
    }

    /// The run loop's part for environments: sync, then notice nodes
    /// that went away with environments.
    pub(super) async fn envs_tick(&self) {
        let r = async {
            let have = self.sync_envs().await?;
            // Read after the records: a node whose lease expires in
            // between is gone here with the records it had last time.
            let live = self.cluster.membership().await?;
            self.notice_lost_envs(&have, &live.into_keys().collect());
            Ok::<_, ClusterError>(())
        };
        if let Err(e) = r.await {
            log::warn!("cluster: environments: {e}");
        }
    }

    /// Compare with the last look: the environments of a node that is no
    /// longer live are lost.
    fn notice_lost_envs(&self, have: &[EnvEntry], live: &BTreeSet<String>) {
        let mut now: BTreeMap<String, Vec<EnvRecord>> =
            live.iter().map(|n| (n.clone(), vec![])).collect();
        for e in have {
            if let Some(v) = now.get_mut(&e.record.node) {
                v.push(e.record.clone());
            }
        }
        let gone: Vec<(String, Vec<EnvRecord>)> = {
            let mut seen = locked(&self.envs.seen);
            let gone = seen
                .iter()
                .filter(|(n, envs)| !live.contains(*n) && !envs.is_empty())
                .map(|(n, envs)| (n.clone(), envs.clone()))
                .collect();
            *seen = now;
            gone
        };
        let mut lost = locked(&self.envs.lost);
        // One that is back (its node came back, or its name was taken
        // again) is lost no more.
        lost.retain(|(r, _)| !have.iter().any(|h| h.record.name == r.name));
        let when = now_ns();
        for (node, envs) in gone {
            let names: Vec<&str> = envs.iter().map(|r| r.name.as_str()).collect();
            log::warn!(
                "cluster: node {node} is gone (its lease expired); its environments are lost: {}",
                names.join(", ")
            );
            lost.extend(envs.into_iter().map(|r| (r, when)));
        }
        let excess = lost.len().saturating_sub(100);
        lost.drain(..excess);
    }

    /// `env list --cluster`: every node's environments that `sees`
    /// allows, and those lost with their node.
    pub async fn env_table(&self, sees: &(dyn Fn(&str) -> bool + Sync)) -> Result<String, String> {
        let mut all = self.cluster.envs().await.map_err(|e| e.to_string())?;
        all.sort_by(|a, b| (&a.record.node, &a.record.name).cmp(&(&b.record.node, &b.record.name)));
        let time = |ns: u64| {
            humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_nanos(ns))
                .to_string()
        };
        let mut out = format!(
            "{:<12} {:<24} {:<9} {:>5} {:>7}  {}\n",
            "NODE", "NAME", "STATE", "UNITS", "MEM MB", "ENDS"
        );
        for r in all.iter().map(|e| &e.record).filter(|r| sees(&r.name)) {
            out += &format!(
                "{:<12} {:<24} {:<9} {:>5} {:>7}  {}\n",
                r.node,
                r.name,
                r.state,
                r.units,
                r.memory_mb,
                time(r.end)
            );
        }
        let lost = locked(&self.envs.lost).clone();
        // One that is back (its node came back, or the name was taken
        // again) is listed as it is now.
        let back = |r: &EnvRecord| all.iter().any(|e| e.record.name == r.name);
        for (r, when) in lost.iter().filter(|(r, _)| sees(&r.name) && !back(r)) {
            out += &format!(
                "{:<12} {:<24} {:<9} {:>5} {:>7}  node gone {}\n",
                r.node,
                r.name,
                "LOST",
                r.units,
                r.memory_mb,
                time(*when)
            );
        }
        Ok(out)
    }
}
