//! The cluster's state in etcd, and exact admission through it.
//!
//! # Keys (below the prefix, `/tt-host` by default)
//!
//! | key | value | lease |
//! | --- | --- | --- |
//! | `policy/PATH` | the policy set at PATH ([`PartialPolicy`], JSON) | none |
//! | `usage/PATH/NODE` | what NODE runs below PATH ([`Usage`], JSON) | NODE's |
//! | `names/NAME` | the node running unikernel NAME | NODE's |
//! | `res/NODE/NAME` | its reservation ([`Reservation`], JSON) | NODE's |
//! | `nodes/NODE` | the node's description ([`NodeInfo`], JSON) | NODE's |
//!
//! Usage is kept per path *and node*: a node writes only its own
//! `usage/*/NODE` keys, and they go with its lease, so a node that dies
//! takes its share of every path's usage with it, as its reservations.
//! A path's usage is the sum over its `usage/PATH/` range: a handful of
//! keys (one per node), never a scan of all reservations.
//!
//! # Admission
//!
//! [`Cluster::admit`] reads, in one transaction (so at one revision R),
//! the policy and the usage range of every path from the root down to the
//! unikernel's, and whether its name is taken. It checks the claim
//! ([`super::check`]) and then writes, in a second transaction, the node's
//! new usage of each path, the name and the reservation, *if* no policy
//! key on the way was modified after R, no key of the usage range of a
//! path whose policy limits a sum was either (etcd compares a range's
//! greatest `mod_revision`; a path without such a policy needs none: an
//! inherited limit is implied by the ancestor's check), and the name is
//! still free. A
//! conflict (another node admitted or released something on one of these
//! paths meanwhile) retries from the read. So two admissions that together
//! would exceed a policy cannot both commit: the second one's compare
//! fails, it reads the first one's usage and is refused. A key that
//! disappears (a lease that expired) only lowers usage: that conflict is
//! not needed for safety, and etcd's compare does not see it.

use super::check::{self, Claim, Level, Refused};
use crate::resources::{Name, PartialPolicy, Path, Usage};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, PutOptions, Txn, TxnOp,
    TxnOpResponse,
};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How a node connects and what it is called.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub endpoints: Vec<String>,
    pub node: String,
    pub prefix: String,
    /// The node's lease: its reservations last this long after its last
    /// keep-alive.
    pub ttl: Duration,
    /// Keep the unikernels running when cut off from etcd (no fencing).
    pub keep_on_partition: bool,
    /// TLS: the CA that signed etcd's certificate, and this node's client
    /// certificate and key (PEM), for `https://` endpoints.
    pub tls: Option<Tls>,
}

/// A node's TLS material (PEM).
#[derive(Clone, PartialEq, Eq)]
pub struct Tls {
    pub ca: Vec<u8>,
    /// The client certificate and its key: etcd's `--client-cert-auth`.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Tls")
            .field("identity", &self.identity.is_some())
            .finish()
    }
}

/// A running unikernel's entry in the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    pub name: String,
    pub node: String,
    pub claim: Claim,
    pub time_ns: u64,
}

/// A node as the cluster sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub node: String,
    pub started_ns: u64,
    /// Guest memory it offers, in MB (its host's memory).
    #[serde(default)]
    pub memory_mb: u64,
    /// Its host's CPUs.
    #[serde(default)]
    pub cpus: u32,
}

/// A node and what it runs now (for placement).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeLoad {
    pub info: NodeInfo,
    pub usage: Usage,
}

/// The host's memory in MB and its CPUs.
fn host_capacity() -> (u64, u32) {
    // SAFETY: sysconf takes no pointers.
    let (pages, page, cpus) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
            libc::sysconf(libc::_SC_NPROCESSORS_ONLN),
        )
    };
    let mb = (pages.max(0) as u64).saturating_mul(page.max(0) as u64) >> 20;
    (mb, cpus.max(1) as u32)
}

/// The node among `nodes` a unikernel of `memory_mb` goes to: among those
/// whose free memory (offered minus what their unikernels take) holds it,
/// the one with the most free memory; on a tie, the one running fewer
/// unikernels per CPU (each unikernel's vCPU is one thread), then the
/// first by id. `allowed` (a pool's node list, if any) narrows the
/// choice. `None`: no node has room.
pub fn place<'a>(
    nodes: &'a [NodeLoad],
    memory_mb: u64,
    allowed: Option<&[String]>,
) -> Option<&'a NodeLoad> {
    nodes
        .iter()
        .filter(|n| allowed.is_none_or(|a| a.contains(&n.info.node)))
        .filter(|n| n.info.memory_mb.saturating_sub(n.usage.memory_mb) >= memory_mb)
        .min_by(|a, b| {
            let free = |n: &NodeLoad| n.info.memory_mb.saturating_sub(n.usage.memory_mb);
            free(b)
                .cmp(&free(a))
                .then(
                    (a.usage.unikernels * b.info.cpus.max(1) as u64)
                        .cmp(&(b.usage.unikernels * a.info.cpus.max(1) as u64)),
                )
                .then(a.info.node.cmp(&b.info.node))
        })
}

/// What went wrong; one line for the user.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("refused by the cluster: {0}")]
    Refused(#[from] Refused),
    #[error("{name} runs already on node {node}")]
    Taken { name: String, node: String },
    #[error("cannot reach etcd ({endpoints}): {err}; admission is stopped until it answers")]
    Unreachable { endpoints: String, err: String },
    #[error(
        "this node has been cut off from etcd for {0:?}: admission is stopped until it is back"
    )]
    CutOff(Duration),
    #[error("bad data in etcd at {key}: {err}")]
    Bad { key: String, err: String },
    #[error("too many conflicting admissions on the same paths; try again")]
    Contended,
}

/// A node's handle on the cluster.
pub struct Cluster {
    pub cfg: Config,
    client: Client,
    lease: AtomicU64,
    /// When etcd last confirmed the lease.
    last_ok: Mutex<Instant>,
    /// One admission or release at a time on this node: only this node
    /// writes its own keys, so its own writes never conflict.
    local: tokio::sync::Mutex<()>,
    /// Transactions that failed their compare and were retried.
    pub conflicts: AtomicU64,
    pub admitted: AtomicU64,
}

/// The time now, Unix ns.
pub(crate) fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

impl Cluster {
    /// `rest` below the cluster's prefix.
    pub(crate) fn key(&self, rest: &str) -> String {
        format!("{}/{rest}", self.cfg.prefix)
    }
    fn k_policy(&self, p: &Path) -> String {
        self.key(&format!("policy/{p}"))
    }
    fn k_usage_range(&self, p: &Path) -> String {
        self.key(&format!("usage/{p}/"))
    }
    fn k_usage(&self, p: &Path) -> String {
        self.key(&format!("usage/{p}/{}", self.cfg.node))
    }
    fn k_name(&self, n: &str) -> String {
        self.key(&format!("names/{n}"))
    }
    fn k_res(&self, n: &str) -> String {
        self.key(&format!("res/{}/{n}", self.cfg.node))
    }

    /// Run `op` with the client; when it fails (a member down, a leader
    /// changing), again, up to once per endpoint more: the client's
    /// balancer may have sent it to the member that does not answer.
    async fn retry<T, F, Fut>(&self, mut op: F) -> Result<T, etcd_client::Error>
    where
        F: FnMut(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let tries = self.cfg.endpoints.len() + 1;
        let mut i = 0;
        loop {
            match op(self.client.clone()).await {
                Ok(v) => return Ok(v),
                Err(e @ etcd_client::Error::InvalidArgs(_)) => return Err(e),
                Err(e) if i + 1 >= tries => return Err(e),
                Err(_) => {
                    i += 1;
                    tokio::time::sleep(Duration::from_millis(50 * i as u64)).await;
                }
            }
        }
    }

    pub(crate) fn unreachable(&self, e: etcd_client::Error) -> ClusterError {
        ClusterError::Unreachable {
            endpoints: self.cfg.endpoints.join(","),
            err: e.to_string(),
        }
    }

    /// Connect, take a lease, and register the node; what an earlier run
    /// of this node left (its reservations and usage) is removed: the
    /// caller registers again what still runs ([`Cluster::admit`]).
    pub async fn connect(cfg: Config) -> Result<Cluster, ClusterError> {
        let opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(3))
            .with_keep_alive(Duration::from_secs(1), Duration::from_secs(2));
        let opts = match &cfg.tls {
            Some(t) => {
                let mut tls = etcd_client::TlsOptions::new()
                    .ca_certificate(etcd_client::Certificate::from_pem(&t.ca));
                if let Some((cert, key)) = &t.identity {
                    tls = tls.identity(etcd_client::Identity::from_pem(cert, key));
                }
                opts.with_tls(tls)
            }
            None => opts,
        };
        let client = Client::connect(&cfg.endpoints, Some(opts))
            .await
            .map_err(|e| ClusterError::Unreachable {
                endpoints: cfg.endpoints.join(","),
                err: e.to_string(),
            })?;
        let c = Cluster {
            cfg,
            client,
            lease: AtomicU64::new(0),
            last_ok: Mutex::new(Instant::now()),
            local: tokio::sync::Mutex::new(()),
            conflicts: AtomicU64::new(0),
            admitted: AtomicU64::new(0),
        };
        c.forget_own().await?;
        c.new_lease().await?;
        Ok(c)
    }

    pub(crate) fn lease_id(&self) -> i64 {
        self.lease.load(Ordering::SeqCst) as i64
    }

    /// Grant a new lease and register the node under it.
    pub async fn new_lease(&self) -> Result<(), ClusterError> {
        let client = Retrying(self);
        let ttl = self.cfg.ttl.as_secs().max(1) as i64;
        let l = client
            .lease_grant(ttl)
            .await
            .map_err(|e| self.unreachable(e))?;
        self.lease.store(l.id() as u64, Ordering::SeqCst);
        let (memory_mb, cpus) = host_capacity();
        let info = NodeInfo {
            node: self.cfg.node.clone(),
            started_ns: now_ns(),
            memory_mb,
            cpus,
        };
        client
            .put(
                self.key(&format!("nodes/{}", self.cfg.node)),
                serde_json::to_vec(&info).expect("encodes"),
                Some(PutOptions::new().with_lease(l.id())),
            )
            .await
            .map_err(|e| self.unreachable(e))?;
        *self.last_ok.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        Ok(())
    }

    /// Remove what this node wrote before (a previous run's reservations,
    /// names and usage, whose lease may not have expired yet).
    async fn forget_own(&self) -> Result<(), ClusterError> {
        let client = Retrying(self);
        let res_prefix = self.key(&format!("res/{}/", self.cfg.node));
        let res = client
            .get(res_prefix.clone(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|e| self.unreachable(e))?;
        let usage = client
            .get(
                self.key("usage/"),
                Some(GetOptions::new().with_prefix().with_keys_only()),
            )
            .await
            .map_err(|e| self.unreachable(e))?;
        let suffix = format!("/{}", self.cfg.node);
        let mut ops = vec![TxnOp::delete(
            res_prefix,
            Some(DeleteOptions::new().with_prefix()),
        )];
        for kv in res.kvs() {
            let name = String::from_utf8_lossy(kv.key());
            if let Some(n) = name.rsplit('/').next() {
                ops.push(TxnOp::delete(self.k_name(n), None));
            }
        }
        for kv in usage.kvs() {
            if kv.key().ends_with(suffix.as_bytes()) {
                ops.push(TxnOp::delete(kv.key().to_vec(), None));
            }
        }
        client
            .txn(Txn::new().and_then(ops))
            .await
            .map_err(|e| self.unreachable(e))?;
        Ok(())
    }

    /// Renew the lease once. `Ok(false)`: it had expired (the caller takes
    /// a new one and registers again what runs).
    pub async fn keep_alive(&self) -> Result<bool, ClusterError> {
        let mut client = self.client.clone(); // a stream: tried again next tick
                                              // etcd answers a lease it no longer has with "lease not found":
                                              // that is an answer (the lease expired), not a failure to reach it.
        let expired = |e: &etcd_client::Error| e.to_string().contains("lease not found");
        let (mut keeper, mut stream) = match client.lease_keep_alive(self.lease_id()).await {
            Ok(k) => k,
            Err(e) if expired(&e) => return Ok(false),
            Err(e) => return Err(self.unreachable(e)),
        };
        keeper.keep_alive().await.map_err(|e| self.unreachable(e))?;
        let resp = match stream.message().await {
            Ok(r) => r,
            Err(e) if expired(&e) => return Ok(false),
            Err(e) => return Err(self.unreachable(e)),
        };
        match resp {
            Some(r) if r.ttl() > 0 => {
                *self.last_ok.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
                Ok(true)
            }
            Some(_) => Ok(false),
            // No answer is not an answer that the lease expired (taking a
            // new one then would leave the names on the old one).
            None => Err(ClusterError::Unreachable {
                endpoints: self.cfg.endpoints.join(","),
                err: "the keep-alive stream ended without an answer".into(),
            }),
        }
    }

    /// How long since etcd last confirmed the lease.
    pub fn since_ok(&self) -> Duration {
        self.last_ok
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed()
    }

    /// Admit the unikernel `name` with `claim` on this node (see the module
    /// doc); the etcd revision of its commit. Admitting a name this node
    /// holds already is a no-op (revision 0).
    pub async fn admit(&self, name: &Name, claim: Claim) -> Result<i64, ClusterError> {
        let _local = self.local.lock().await;
        // Half the lease's time without a word from etcd: others may soon
        // take this node's room; admit nothing more.
        let since = self.since_ok();
        if since > self.cfg.ttl / 2 {
            return Err(ClusterError::CutOff(since));
        }
        let paths: Vec<Path> = name.path().ancestors().collect();
        let name_s = name.to_string();
        let client = Retrying(self);
        for attempt in 0..64u32 {
            let mut reads = Vec::new();
            for p in &paths {
                reads.push(TxnOp::get(self.k_policy(p), None));
                reads.push(TxnOp::get(
                    self.k_usage_range(p),
                    Some(GetOptions::new().with_prefix()),
                ));
            }
            reads.push(TxnOp::get(self.k_name(&name_s), None));
            let read = client
                .txn(Txn::new().and_then(reads))
                .await
                .map_err(|e| self.unreachable(e))?;
            let rev = read.header().map_or(0, |h| h.revision());
            let got: Vec<Vec<(Vec<u8>, Vec<u8>)>> = read
                .op_responses()
                .into_iter()
                .map(|r| match r {
                    TxnOpResponse::Get(g) => g
                        .kvs()
                        .iter()
                        .map(|kv| (kv.key().to_vec(), kv.value().to_vec()))
                        .collect(),
                    _ => vec![],
                })
                .collect();
            if let Some((_, node)) = got.last().and_then(|v| v.first()) {
                let node = String::from_utf8_lossy(node).into_owned();
                if node == self.cfg.node {
                    return Ok(0);
                }
                return Err(ClusterError::Taken { name: name_s, node });
            }
            let own_suffix = format!("/{}", self.cfg.node);
            let mut levels = Vec::new();
            let mut own = Vec::new();
            for (i, p) in paths.iter().enumerate() {
                let policy = match got[2 * i].first() {
                    Some((k, v)) => Some(decode::<PartialPolicy>(k, v)?),
                    None => None,
                };
                let mut usage = Usage::default();
                let mut mine = Usage::default();
                for (k, v) in &got[2 * i + 1] {
                    let u = decode::<Usage>(k, v)?;
                    usage.unikernels += u.unikernels;
                    usage.memory_mb += u.memory_mb;
                    usage.block_mb += u.block_mb;
                    if k.ends_with(own_suffix.as_bytes()) {
                        mine = u;
                    }
                }
                levels.push(Level {
                    path: p.clone(),
                    policy,
                    usage,
                });
                own.push(mine);
            }
            check::check(&levels, &claim)?;
            let lease = self.lease_id();
            let mut compares = vec![Compare::create_revision(
                self.k_name(&name_s),
                CompareOp::Equal,
                0,
            )];
            let mut writes = Vec::new();
            for ((p, mine), level) in paths.iter().zip(&own).zip(&levels) {
                compares.push(Compare::mod_revision(
                    self.k_policy(p),
                    CompareOp::Less,
                    rev + 1,
                ));
                // A path's usage needs comparing only where a policy sets a
                // limit that adds up: a limit inherited from above is
                // implied by the ancestor's check (a subtree uses no more
                // than the path above it), and without any, nothing can be
                // exceeded. So admissions in different subtrees do not
                // conflict through the root (docs/BENCHMARKS.md, "A
                // cluster on etcd"). A policy set meanwhile fails the
                // policy compare above.
                if level.policy.as_ref().is_some_and(limits_sums) {
                    compares.push(
                        Compare::mod_revision(self.k_usage_range(p), CompareOp::Less, rev + 1)
                            .with_prefix(),
                    );
                }
                writes.push(TxnOp::put(
                    self.k_usage(p),
                    serde_json::to_vec(&claim.added_to(*mine)).expect("encodes"),
                    Some(PutOptions::new().with_lease(lease)),
                ));
            }
            writes.push(TxnOp::put(
                self.k_name(&name_s),
                self.cfg.node.clone(),
                Some(PutOptions::new().with_lease(lease)),
            ));
            let res = Reservation {
                name: name_s.clone(),
                node: self.cfg.node.clone(),
                claim,
                time_ns: now_ns(),
            };
            writes.push(TxnOp::put(
                self.k_res(&name_s),
                serde_json::to_vec(&res).expect("encodes"),
                Some(PutOptions::new().with_lease(lease)),
            ));
            let wrote = client
                .txn(Txn::new().when(compares).and_then(writes))
                .await
                .map_err(|e| self.unreachable(e))?;
            if wrote.succeeded() {
                self.admitted.fetch_add(1, Ordering::Relaxed);
                return Ok(wrote.header().map_or(0, |h| h.revision()));
            }
            self.conflicts.fetch_add(1, Ordering::Relaxed);
            // Back off a little, more with each conflict in a row, so that
            // contenders spread out.
            let ms = (1u64 << attempt.min(6)).min(50);
            tokio::time::sleep(Duration::from_millis(ms / 2 + (now_ns() % (ms + 1)))).await;
        }
        Err(ClusterError::Contended)
    }

    /// Release the unikernel `name` (admitted by this node): its
    /// reservation, name and share of each path's usage; the etcd revision
    /// of that (0: it held none).
    pub async fn release(&self, name: &Name) -> Result<i64, ClusterError> {
        let _local = self.local.lock().await;
        let name_s = name.to_string();
        let client = Retrying(self);
        let paths: Vec<Path> = name.path().ancestors().collect();
        // One read: the reservation and this node's usage of each path.
        let mut reads = vec![TxnOp::get(self.k_res(&name_s), None)];
        reads.extend(paths.iter().map(|p| TxnOp::get(self.k_usage(p), None)));
        let read = client
            .txn(Txn::new().and_then(reads))
            .await
            .map_err(|e| self.unreachable(e))?;
        let got: Vec<Option<(Vec<u8>, Vec<u8>)>> = read
            .op_responses()
            .into_iter()
            .map(|r| match r {
                TxnOpResponse::Get(g) => g
                    .kvs()
                    .first()
                    .map(|kv| (kv.key().to_vec(), kv.value().to_vec())),
                _ => None,
            })
            .collect();
        let Some(Some((k, v))) = got.first() else {
            return Ok(0);
        };
        let r: Reservation = decode(k, v)?;
        let mut writes = vec![
            TxnOp::delete(self.k_res(&name_s), None),
            TxnOp::delete(self.k_name(&name_s), None),
        ];
        let lease = self.lease_id();
        for (p, mine) in paths.iter().zip(got.iter().skip(1)) {
            let Some((k, v)) = mine else { continue };
            let after = r.claim.taken_from(decode::<Usage>(k, v)?);
            writes.push(if after.unikernels == 0 {
                TxnOp::delete(self.k_usage(p), None)
            } else {
                TxnOp::put(
                    self.k_usage(p),
                    serde_json::to_vec(&after).expect("encodes"),
                    Some(PutOptions::new().with_lease(lease)),
                )
            });
        }
        // Only this node writes these keys, and it holds `local`: one
        // transaction, no compare needed.
        let done = client
            .txn(Txn::new().and_then(writes))
            .await
            .map_err(|e| self.unreachable(e))?;
        Ok(done.header().map_or(0, |h| h.revision()))
    }

    /// The names this node holds reservations for.
    pub async fn own_names(&self) -> Result<Vec<String>, ClusterError> {
        let client = Retrying(self);
        let prefix = self.key(&format!("res/{}/", self.cfg.node));
        let got = client
            .get(
                prefix.clone(),
                Some(GetOptions::new().with_prefix().with_keys_only()),
            )
            .await
            .map_err(|e| self.unreachable(e))?;
        Ok(got
            .kvs()
            .iter()
            .map(|kv| String::from_utf8_lossy(&kv.key()[prefix.len()..]).into_owned())
            .collect())
    }

    /// Set (or with `None` remove) the cluster's policy at `path`.
    pub async fn put_policy(
        &self,
        path: &Path,
        policy: Option<&PartialPolicy>,
    ) -> Result<(), ClusterError> {
        let client = Retrying(self);
        match policy {
            Some(p) => client
                .put(
                    self.k_policy(path),
                    serde_json::to_vec(p).expect("encodes"),
                    None,
                )
                .await
                .map(drop),
            None => client.delete(self.k_policy(path), None).await.map(drop),
        }
        .map_err(|e| self.unreachable(e))
    }

    /// The cluster's policy at `path`, if one is set.
    pub async fn policy(&self, path: &Path) -> Result<Option<PartialPolicy>, ClusterError> {
        let client = Retrying(self);
        let got = client
            .get(self.k_policy(path), None)
            .await
            .map_err(|e| self.unreachable(e))?;
        got.kvs()
            .first()
            .map(|kv| decode(kv.key(), kv.value()))
            .transpose()
    }

    /// Every reservation in the cluster, by node.
    pub async fn reservations(&self) -> Result<Vec<Reservation>, ClusterError> {
        let client = Retrying(self);
        let got = client
            .get(self.key("res/"), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|e| self.unreachable(e))?;
        got.kvs()
            .iter()
            .map(|kv| decode(kv.key(), kv.value()))
            .collect()
    }

    /// Every live node's id, and the names it holds reservations for
    /// (keys only: for noticing nodes that are gone).
    pub async fn membership(
        &self,
    ) -> Result<std::collections::BTreeMap<String, Vec<String>>, ClusterError> {
        let client = Retrying(self);
        let keys = |p: &'static str| {
            let prefix = self.key(p);
            let client = &client;
            async move {
                client
                    .get(
                        prefix.clone(),
                        Some(GetOptions::new().with_prefix().with_keys_only()),
                    )
                    .await
                    .map(|r| {
                        r.kvs()
                            .iter()
                            .map(|kv| {
                                String::from_utf8_lossy(&kv.key()[prefix.len()..]).into_owned()
                            })
                            .collect::<Vec<_>>()
                    })
            }
        };
        let nodes = keys("nodes/").await.map_err(|e| self.unreachable(e))?;
        let res = keys("res/").await.map_err(|e| self.unreachable(e))?;
        let mut out: std::collections::BTreeMap<String, Vec<String>> =
            nodes.into_iter().map(|n| (n, vec![])).collect();
        for r in res {
            if let Some((node, name)) = r.split_once('/') {
                out.entry(node.to_string())
                    .or_default()
                    .push(name.to_string());
            }
        }
        Ok(out)
    }

    /// Every live node (its key is on its lease) and what it runs.
    pub async fn nodes(&self) -> Result<Vec<NodeLoad>, ClusterError> {
        let client = Retrying(self);
        let nodes = client
            .get(self.key("nodes/"), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|e| self.unreachable(e))?;
        let root = self.k_usage_range(&Path::root());
        let usage = client
            .get(root.clone(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|e| self.unreachable(e))?;
        let mut out = Vec::new();
        for kv in nodes.kvs() {
            let info: NodeInfo = decode(kv.key(), kv.value())?;
            let key = format!("{root}{}", info.node);
            let usage = match usage.kvs().iter().find(|u| u.key() == key.as_bytes()) {
                Some(u) => decode(u.key(), u.value())?,
                None => Usage::default(),
            };
            out.push(NodeLoad { info, usage });
        }
        Ok(out)
    }

    /// Ask node `node` to start a unikernel: `assign/NODE/NAME` holds the
    /// request (on this node's lease, so it goes if this node does).
    pub async fn assign(
        &self,
        node: &str,
        name: &str,
        request: Vec<u8>,
    ) -> Result<(), ClusterError> {
        let client = Retrying(self);
        client
            .put(
                self.key(&format!("assign/{node}/{name}")),
                request,
                Some(PutOptions::new().with_lease(self.lease_id())),
            )
            .await
            .map_err(|e| self.unreachable(e))?;
        Ok(())
    }

    /// The requests assigned to this node: (name, request), each taken
    /// (deleted) so that it is carried out once; and the revision they
    /// were read at (for [`Cluster::wait_assignment`]).
    pub async fn take_assignments(&self) -> Result<(Vec<(String, Vec<u8>)>, i64), ClusterError> {
        let client = Retrying(self);
        let prefix = self.key(&format!("assign/{}/", self.cfg.node));
        let got = client
            .get(prefix.clone(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|e| self.unreachable(e))?;
        let rev = got.header().map_or(0, |h| h.revision());
        let mut out = Vec::new();
        for kv in got.kvs() {
            // Taken if this delete is the one that removed it.
            let taken = client
                .txn(
                    Txn::new()
                        .when(vec![Compare::mod_revision(
                            kv.key().to_vec(),
                            CompareOp::Equal,
                            kv.mod_revision(),
                        )])
                        .and_then(vec![TxnOp::delete(kv.key().to_vec(), None)]),
                )
                .await
                .map_err(|e| self.unreachable(e))?;
            if taken.succeeded() {
                let name = String::from_utf8_lossy(&kv.key()[prefix.len()..]).into_owned();
                out.push((name, kv.value().to_vec()));
            }
        }
        Ok((out, rev))
    }

    /// Wait (watching `assign/NODE/` from revision `after` + 1: nothing
    /// put since the last look is missed) until a request may be there,
    /// or `max` passed.
    pub async fn wait_assignment(&self, after: i64, max: Duration) {
        let mut client = self.client.clone();
        let prefix = self.key(&format!("assign/{}/", self.cfg.node));
        let opts = etcd_client::WatchOptions::new()
            .with_prefix()
            .with_start_revision(after + 1);
        let watch = tokio::time::timeout(max, client.watch(prefix, Some(opts))).await;
        let Ok(watch) = watch else { return };
        match watch {
            Ok((_watcher, mut stream)) => {
                let _ = tokio::time::timeout(max, stream.message()).await;
            }
            Err(_) => tokio::time::sleep(max).await,
        }
    }

    /// Say how an assigned request went (`placed/NAME`, on this node's
    /// lease), for the node that asked.
    pub async fn placed(&self, name: &str, outcome: Vec<u8>) -> Result<(), ClusterError> {
        Retrying(self)
            .put(
                self.key(&format!("placed/{name}")),
                outcome,
                Some(PutOptions::new().with_lease(self.lease_id())),
            )
            .await
            .map_err(|e| self.unreachable(e))?;
        Ok(())
    }

    /// Wait for the outcome of a request assigned to another node, and
    /// remove it; `None` after `max`.
    pub async fn outcome(
        &self,
        name: &str,
        max: Duration,
    ) -> Result<Option<Vec<u8>>, ClusterError> {
        let key = self.key(&format!("placed/{name}"));
        let t = Instant::now();
        let client = Retrying(self);
        loop {
            let got = client
                .get(key.clone(), None)
                .await
                .map_err(|e| self.unreachable(e))?;
            if let Some(kv) = got.kvs().first() {
                let v = kv.value().to_vec();
                let _ = client.delete(key.clone(), None).await;
                return Ok(Some(v));
            }
            if t.elapsed() > max {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The cluster's usage below `path` (every node's).
    pub async fn usage(&self, path: &Path) -> Result<Usage, ClusterError> {
        let client = Retrying(self);
        let got = client
            .get(
                self.k_usage_range(path),
                Some(GetOptions::new().with_prefix()),
            )
            .await
            .map_err(|e| self.unreachable(e))?;
        let mut sum = Usage::default();
        for kv in got.kvs() {
            let u: Usage = decode(kv.key(), kv.value())?;
            sum.unikernels += u.unikernels;
            sum.memory_mb += u.memory_mb;
            sum.block_mb += u.block_mb;
        }
        Ok(sum)
    }
}

/// The client's calls, each tried again on another endpoint when it
/// fails ([`Cluster::retry`]).
pub(crate) struct Retrying<'a>(pub(crate) &'a Cluster);

impl Retrying<'_> {
    pub(crate) async fn get(
        &self,
        key: impl Into<Vec<u8>>,
        o: Option<GetOptions>,
    ) -> Result<etcd_client::GetResponse, etcd_client::Error> {
        let key = key.into();
        self.0
            .retry(|mut c| {
                let (k, o) = (key.clone(), o.clone());
                async move { c.get(k, o).await }
            })
            .await
    }

    pub(crate) async fn put(
        &self,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
        o: Option<PutOptions>,
    ) -> Result<etcd_client::PutResponse, etcd_client::Error> {
        let (key, value) = (key.into(), value.into());
        self.0
            .retry(|mut c| {
                let (k, v, o) = (key.clone(), value.clone(), o.clone());
                async move { c.put(k, v, o).await }
            })
            .await
    }

    pub(crate) async fn delete(
        &self,
        key: impl Into<Vec<u8>>,
        o: Option<DeleteOptions>,
    ) -> Result<etcd_client::DeleteResponse, etcd_client::Error> {
        let key = key.into();
        self.0
            .retry(|mut c| {
                let (k, o) = (key.clone(), o.clone());
                async move { c.delete(k, o).await }
            })
            .await
    }

    /// A transaction, tried again when it fails. A write whose answer was
    /// lost and that committed is seen by the retry: its compare fails
    /// (the name is taken, by this node), and [`Cluster::admit`] reads
    /// that as done.
    pub(crate) async fn txn(
        &self,
        txn: Txn,
    ) -> Result<etcd_client::TxnResponse, etcd_client::Error> {
        self.0
            .retry(|mut c| {
                let t = txn.clone();
                async move { c.txn(t).await }
            })
            .await
    }

    pub(crate) async fn lease_grant(
        &self,
        ttl: i64,
    ) -> Result<etcd_client::LeaseGrantResponse, etcd_client::Error> {
        self.0
            .retry(|mut c| async move { c.lease_grant(ttl, None).await })
            .await
    }
}

/// Does `p` set a limit on a sum (unikernels, memory, block)?
fn limits_sums(p: &PartialPolicy) -> bool {
    p.unikernels.is_some() || p.memory_mb.is_some() || p.block_mb.is_some()
}

pub(crate) fn decode<T: serde::de::DeserializeOwned>(
    key: &[u8],
    value: &[u8],
) -> Result<T, ClusterError> {
    serde_json::from_slice(value).map_err(|e| ClusterError::Bad {
        key: String::from_utf8_lossy(key).into_owned(),
        err: e.to_string(),
    })
}

#[cfg(test)]
mod place_tests {
    use super::*;

    fn node(id: &str, memory_mb: u64, cpus: u32, used_mb: u64, unikernels: u32) -> NodeLoad {
        NodeLoad {
            info: NodeInfo {
                node: id.into(),
                started_ns: 0,
                memory_mb,
                cpus,
            },
            usage: Usage {
                unikernels: unikernels.into(),
                memory_mb: used_mb,
                block_mb: 0,
            },
        }
    }

    #[test]
    fn the_most_free_memory_then_the_fewest_unikernels_per_cpu_within_the_pools_nodes() {
        let nodes = [
            node("a", 4096, 2, 1024, 1),
            node("b", 8192, 8, 6144, 6),
            node("c", 4096, 4, 1024, 1),
        ];
        // a and c have 3072 MB free; c has more CPUs per unikernel.
        assert_eq!(place(&nodes, 512, None).unwrap().info.node, "c");
        let only_a_b = ["a".to_string(), "b".to_string()];
        assert_eq!(place(&nodes, 512, Some(&only_a_b)).unwrap().info.node, "a");
        // b alone: 2048 MB free, not enough.
        assert!(place(&nodes, 3000, Some(&["b".to_string()])).is_none());
        assert!(place(&nodes, 4000, None).is_none());
    }
}
