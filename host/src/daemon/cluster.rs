//! The daemon as a cluster node (`tt-host daemon --cluster=ENDPOINTS
//! --node-id=ID`, docs/CLUSTER.md).
//!
//! - Every launch on the node is admitted by its state directory first,
//!   then through the cluster: `tt-host run` asks the daemon
//!   ([`Node::admit`], the `cluster-admit` request).
//! - The node's lease is renewed every third of its TTL. While etcd does
//!   not answer, nothing is admitted (after half the TTL without an
//!   answer); after two thirds of it the node stops its unikernels
//!   (fencing), so that they are gone before the lease can expire and
//!   another node reuse their room — unless `--keep-on-partition`, which
//!   keeps them running and may let the cluster overshoot a policy by
//!   what they use, until the node is back.
//! - Once a second the node reconciles etcd with what its state directory
//!   says runs: a reservation whose unikernel ended is released, a
//!   unikernel that runs without one (after the daemon's restart, or a
//!   new lease) is registered again.

use crate::cluster::check::Claim;
use crate::cluster::store::{Cluster, ClusterError, Config};
use crate::resources::Name;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod envs;

/// This daemon's place in the cluster.
pub struct Node {
    pub cluster: Cluster,
    /// The names this node holds reservations for, and since when.
    registered: Mutex<BTreeMap<String, Instant>>,
    /// Fenced since the last loss of contact.
    fenced: Mutex<bool>,
    /// The nodes seen last time, with their unikernels.
    seen: Mutex<BTreeMap<String, Vec<String>>>,
    /// Unikernels of nodes that went away: (node, name, when in Unix ns).
    pub lost: Mutex<Vec<(String, String, u64)>>,
    /// Its environments in the cluster ([`envs`]).
    envs: envs::EnvSync,
    /// A unikernel ended here: reconcile at the next look (a quarter
    /// second), not at the next second's, so that its room comes back
    /// at once.
    soon: std::sync::atomic::AtomicBool,
    /// Registering (an admission and its entry in `registered`) and
    /// releasing a name take turns: a release decided on an older look
    /// must not undo a registration made since.
    turn: tokio::sync::Mutex<()>,
    /// Bumped when the node takes a new lease (and forgets what it had
    /// registered): an admission made on the old one is not recorded.
    lease_gen: std::sync::atomic::AtomicU64,
}

impl Node {
    /// Connect to the cluster (and clear what an earlier run of this node
    /// left there).
    pub async fn connect(cfg: Config) -> Result<Arc<Node>, String> {
        let cluster = Cluster::connect(cfg).await.map_err(|e| e.to_string())?;
        Ok(Arc::new(Node {
            cluster,
            registered: Mutex::new(BTreeMap::new()),
            fenced: Mutex::new(false),
            seen: Mutex::new(BTreeMap::new()),
            lost: Mutex::new(Vec::new()),
            envs: envs::EnvSync::default(),
            soon: std::sync::atomic::AtomicBool::new(false),
            turn: tokio::sync::Mutex::new(()),
            lease_gen: std::sync::atomic::AtomicU64::new(0),
        }))
    }

    fn registered(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Instant>> {
        self.registered.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admit `name` through the cluster.
    /// `incoming`: it arrives by live migration from another node, which
    /// may still hold its name ([`Cluster::admit_incoming`]).
    pub async fn admit(&self, name: &Name, claim: Claim, incoming: bool) -> Result<(), String> {
        let _turn = self.turn.lock().await;
        let gen = self.lease_gen.load(std::sync::atomic::Ordering::SeqCst);
        let admitted = if incoming {
            self.cluster.admit_incoming(name, claim).await
        } else {
            self.cluster.admit(name, claim).await
        };
        admitted.map_err(|e| e.to_string())?;
        self.register(name.to_string(), gen);
        Ok(())
    }

    /// Record `name` as registered, unless the node took a new lease since
    /// generation `gen` (then the reconciliation registers it again).
    fn register(&self, name: String, gen: u64) {
        let mut r = self.registered();
        if self.lease_gen.load(std::sync::atomic::Ordering::SeqCst) == gen {
            r.insert(name, Instant::now());
        }
    }

    /// A new lease: nothing is registered under it yet.
    fn forget_registered(&self) {
        let mut r = self.registered();
        self.lease_gen
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        r.clear();
    }

    /// A unikernel of this node ended: release it at the next look.
    pub fn reconcile_soon(&self) {
        self.soon.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Make etcd say what the state directory says runs here.
    async fn reconcile(&self, state_dir: &std::path::Path) -> Result<(), ClusterError> {
        // `tt-host run` asks the cluster just after its state directory
        // admitted it: a name registered after this read may be missing
        // from it, and is left for the next look.
        let read_at = Instant::now();
        let local: BTreeMap<String, Claim> =
            match crate::admission::StateDir::resolve(Some(state_dir)).resources() {
                Ok(r) => r
                    .iter_unikernels()
                    .map(|(n, uk)| {
                        (
                            n.to_string(),
                            Claim {
                                memory_mb: uk.memory_mb,
                                block_mb: uk.block_mb,
                            },
                        )
                    })
                    .collect(),
                Err(e) => {
                    log::warn!("cluster: cannot read the state directory: {e}");
                    return Ok(());
                }
            };
        let gone: Vec<String> = self
            .registered()
            .iter()
            .filter(|(n, t)| !local.contains_key(*n) && **t < read_at)
            .map(|(n, _)| n.clone())
            .collect();
        for n in gone {
            let _turn = self.turn.lock().await;
            // Registered again since the look (a new run of the name)?
            if self.registered().get(&n).is_none_or(|t| *t >= read_at) {
                continue;
            }
            if let Ok(name) = n.parse::<Name>() {
                self.cluster.release(&name).await?;
            }
            self.registered().remove(&n);
        }
        let missing: Vec<(String, Claim)> = local
            .into_iter()
            .filter(|(n, _)| !self.registered().contains_key(n))
            .collect();
        for (n, claim) in missing {
            let Ok(name) = n.parse::<Name>() else {
                continue;
            };
            let _turn = self.turn.lock().await;
            let gen = self.lease_gen.load(std::sync::atomic::Ordering::SeqCst);
            match self.cluster.admit(&name, claim).await {
                Ok(_) => {
                    log::info!("cluster: {n} registered");
                    self.register(n, gen);
                }
                Err(
                    e @ (ClusterError::Unreachable { .. }
                    | ClusterError::NoLease
                    | ClusterError::Denied(_)),
                ) => return Err(e),
                // A migration arriving: the source holds the name until
                // its run ends, and the arrival registers it itself.
                Err(ClusterError::Taken { node, .. }) => log::info!(
                    "cluster: {n} runs here and node {node} holds its name (a live \
                     migration from there not finished yet?): looked at again in a second"
                ),
                Err(e) => log::warn!(
                    "cluster: {n} runs here but the cluster does not admit it ({e}): \
                     the cluster is over a policy by what it uses until it ends"
                ),
            }
        }
        Ok(())
    }

    /// Notice nodes that went away (their lease expired): their
    /// unikernels are reported lost (logged, and in `list --cluster`).
    async fn notice_lost(&self) -> Result<(), ClusterError> {
        let now = self.cluster.membership().await?;
        let gone: Vec<(String, Vec<String>)> = {
            let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            let gone = seen
                .iter()
                .filter(|(n, _)| !now.contains_key(*n))
                .map(|(n, names)| (n.clone(), names.clone()))
                .collect();
            *seen = now;
            gone
        };
        let when = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        for (node, names) in gone {
            log::warn!(
                "cluster: node {node} is gone (its lease expired); its unikernels are lost: {}",
                if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                }
            );
            let mut lost = self.lost.lock().unwrap_or_else(|p| p.into_inner());
            for n in names {
                lost.push((node.clone(), n, when));
            }
            // The last hundred are kept.
            let excess = lost.len().saturating_sub(100);
            lost.drain(..excess);
        }
        Ok(())
    }

    /// Keep the lease, fence when cut off, reconcile: until the daemon
    /// exits. `fence` stops the node's unikernels.
    pub async fn run<F, Fut>(self: Arc<Self>, state_dir: std::path::PathBuf, fence: F)
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let ttl = self.cluster.cfg.ttl;
        let tick = (ttl / 3).max(Duration::from_millis(300));
        let mut next_keepalive = Instant::now();
        let mut next_reconcile = Instant::now();
        loop {
            if Instant::now() >= next_keepalive {
                next_keepalive = Instant::now() + tick;
                // Half a tick at most, so that the fence check below comes
                // often enough.
                self.renew(tick / 2).await;
            }
            // Checked every quarter second, not only after a renewal (which
            // may take its whole timeout): the fence must come before the
            // lease can expire.
            self.fence_if_cut_off(&fence).await;
            let soon = self.soon.swap(false, std::sync::atomic::Ordering::SeqCst);
            if self.cluster.since_ok() < ttl / 2 && (soon || Instant::now() >= next_reconcile) {
                next_reconcile = Instant::now() + Duration::from_secs(1);
                if let Err(e) = self.reconcile(&state_dir).await {
                    log::warn!("cluster: {e}");
                }
                if let Err(e) = self.notice_lost().await {
                    log::warn!("cluster: {e}");
                }
                self.envs_tick().await;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Renew the lease: tried up to three times within `within` (the
    /// client may first pick a member that is down); a lease that expired
    /// is replaced.
    async fn renew(&self, within: Duration) {
        let ttl = self.cluster.cfg.ttl;
        let deadline = Instant::now() + within;
        for attempt in 0..3 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match tokio::time::timeout(left / (3 - attempt), self.cluster.keep_alive()).await {
                Ok(Ok(true)) => {
                    let mut f = self.fenced.lock().unwrap_or_else(|p| p.into_inner());
                    if *f {
                        log::info!("cluster: etcd answers again");
                        *f = false;
                    }
                    return;
                }
                Ok(Ok(false)) => {
                    log::warn!("cluster: the node's lease expired: taking a new one");
                    if self.cluster.new_lease().await.is_ok() {
                        // Everything is registered again under it.
                        self.forget_registered();
                    }
                    return;
                }
                Ok(Err(e)) => log::warn!("cluster: {e}"),
                Err(_) => log::warn!("cluster: etcd did not answer the keep-alive"),
            }
        }
        // Past its TTL the lease is gone anyway: a new one, as soon as
        // etcd takes it.
        if self.cluster.since_ok() > ttl && self.cluster.new_lease().await.is_ok() {
            log::info!("cluster: a new lease: registering again what runs here");
            self.forget_registered();
        }
    }

    /// Stop the node's unikernels (once per loss of contact) when etcd has
    /// not confirmed the lease for 2/3 of its TTL, unless
    /// `--keep-on-partition`.
    async fn fence_if_cut_off<F, Fut>(&self, fence: &F)
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let cut = self.cluster.since_ok();
        if cut <= self.cluster.cfg.ttl * 2 / 3 || self.cluster.cfg.keep_on_partition {
            return;
        }
        let first = {
            let mut f = self.fenced.lock().unwrap_or_else(|p| p.into_inner());
            !std::mem::replace(&mut *f, true)
        };
        if first {
            log::warn!(
                "cluster: cut off from etcd for {cut:?}: stopping this node's unikernels \
                 before its lease can expire (fencing)"
            );
            fence().await;
        }
    }
}

/// A unikernel another node asked this one to start (`assign/NODE/NAME`).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Assignment {
    pub unit: super::proto::NewUnit,
    pub owner: super::desired::Owner,
}

/// How an assignment went (`placed/NAME`).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Outcome {
    pub node: String,
    /// The error, if it was not started.
    pub error: Option<String>,
    pub pid: u32,
}

impl Node {
    /// Start what other nodes assign to this one (`create --anywhere`),
    /// watching `assign/NODE/`, until the daemon exits. `create` creates
    /// a unikernel here and gives its pid.
    pub async fn serve_assignments<F, Fut>(self: Arc<Self>, create: F)
    where
        F: Fn(super::proto::NewUnit, super::desired::Owner) -> Fut,
        Fut: std::future::Future<Output = Result<u32, String>> + Send + 'static,
    {
        loop {
            let (list, rev) = match self.cluster.take_assignments().await {
                Ok(l) => l,
                Err(e) => {
                    log::warn!("cluster: assignments: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            for (ticket, request) in list {
                if self.serve_env_assignment(&ticket, &request) {
                    continue;
                }
                let name = crate::cluster::store::ticket_name(&ticket).to_string();
                let started = match serde_json::from_slice::<Assignment>(&request) {
                    Ok(a) if a.unit.name == name => {
                        log::info!("cluster: {name} assigned here");
                        Some(create(a.unit, a.owner))
                    }
                    Ok(_) => None,
                    Err(e) => {
                        log::warn!("cluster: a bad assignment for {name}: {e}");
                        None
                    }
                };
                let node = self.clone();
                tokio::spawn(async move {
                    let result = match started {
                        Some(f) => f.await,
                        None => Err("a malformed assignment".to_string()),
                    };
                    let outcome = Outcome {
                        node: node.cluster.cfg.node.clone(),
                        pid: *result.as_ref().unwrap_or(&0),
                        error: result.err(),
                    };
                    let bytes = serde_json::to_vec(&outcome).expect("encodes");
                    if let Err(e) = node.cluster.placed(&ticket, bytes).await {
                        log::warn!("cluster: {name}: cannot say how it went: {e}");
                    }
                });
            }
            self.cluster
                .wait_assignment(rev, Duration::from_secs(5))
                .await;
        }
    }

    /// `create --anywhere`: the node with room for it ([`place`]), and the
    /// unikernel started there; "NAME: created on node N, pid P".
    pub async fn create_anywhere(
        &self,
        mut unit: super::proto::NewUnit,
        owner: super::desired::Owner,
        allowed: Option<Vec<String>>,
        here: impl std::future::Future<Output = Result<u32, String>>,
    ) -> Result<(String, u32), String> {
        let mem = match crate::cli::parse_run(&unit.args) {
            Ok(crate::cli::Parsed::Run(r)) => r.mem_mb,
            _ => return Err(format!("{}: its command line does not parse", unit.name)),
        };
        let nodes = self.cluster.nodes().await.map_err(|e| e.to_string())?;
        let chosen = crate::cluster::store::place(&nodes, mem, allowed.as_deref())
            .ok_or_else(|| match (&allowed, &unit.pool) {
                (Some(l), Some(p)) => format!(
                    "no node of pool {p}'s ({}) has {mem} MB of memory free for {}",
                    l.join(", "),
                    unit.name
                ),
                _ => format!("no node has {mem} MB of memory free for {}", unit.name),
            })?
            .info
            .node
            .clone();
        if chosen == self.cluster.cfg.node {
            return here.await.map(|pid| (chosen, pid));
        }
        unit.anywhere = false;
        let name = unit.name.clone();
        let request = serde_json::to_vec(&Assignment { unit, owner }).expect("encodes");
        let ticket = self
            .cluster
            .assign(&chosen, &name, request)
            .await
            .map_err(|e| e.to_string())?;
        let outcome = self
            .cluster
            .outcome(&chosen, &ticket, Duration::from_secs(60))
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| {
                format!("node {chosen} did not say within 60 s whether {name} started")
            })?;
        let o: Outcome = serde_json::from_slice(&outcome)
            .map_err(|e| format!("node {chosen}'s answer for {name}: {e}"))?;
        match o.error {
            None => Ok((o.node, o.pid)),
            Some(e) => Err(format!("on node {}: {e}", o.node)),
        }
    }
}
