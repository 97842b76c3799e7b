//! The cluster's state in etcd, and exact admission through it.
//!
//! # Keys (below the prefix, `/tt-host` by default; [`keys`])
//!
//! | key | value | lease |
//! | --- | --- | --- |
//! | `policy/PATH` | the policy set at PATH ([`PartialPolicy`], JSON) | none |
//! | `nodes/NODE` | the node's description ([`NodeInfo`], JSON) | NODE's |
//! | `n/NODE/usage/PATH` | what NODE runs below PATH ([`Usage`], JSON) | NODE's |
//! | `n/NODE/res/NAME` | NODE's reservation for unikernel NAME ([`Reservation`], JSON) | NODE's |
//! | `assign/NODE/NAME#ID` | a request (its own ID) that NODE start NAME (`create --anywhere`) | the asker's |
//! | `placed/NAME#ID` | how that request went | NODE's |
//!
//! Everything a node writes for itself sits below its own prefix
//! `n/NODE/`, plus its one key `nodes/NODE`: an etcd role can then let
//! each node write its own keys and no other node's (docs/CLUSTER.md,
//! "Roles"). The node keys have a prefix of their own, apart from the
//! rest, so that an admission can compare the whole set of nodes at once
//! without conflicting with every other node's writes. Usage is kept per
//! node *and* path, and goes with the node's lease, as its reservations:
//! a path's usage is the sum of one key per live node, never a scan of
//! the reservations.
//!
//! # One invariant
//!
//! **A node's `n/NODE/` keys all hang on the lease its `nodes/NODE` key
//! hangs on.** So a usage key or a reservation exists only while its
//! node's key does, and they vanish together, in one revision, when the
//! lease expires. It holds because every write below `n/NODE/` keeps it:
//!
//! - an admission puts them on lease L only if `nodes/NODE` is on L (a
//!   compare of the node key's lease in the same transaction);
//! - a release only lowers or removes keys that are there, keeping their
//!   lease (`ignore_lease`), and only if they are as it read them;
//! - a new lease ([`Cluster::new_lease`]) removes the whole `n/NODE/`
//!   prefix in the transaction that moves `nodes/NODE` onto it (the node
//!   registers again what runs), and a node's first lease does the same
//!   with what its previous run left.
//!
//! # Admission
//!
//! [`Cluster::admit`] reads, in one transaction (so at one revision R),
//! the node keys (`nodes/`), the policy of every path from the root down
//! to the unikernel's, and for every node N it knows: `n/N/usage/PATH` of
//! each of these paths and `n/N/res/NAME`. If the nodes at R are not the
//! ones it asked about (one joined or left), it reads again with those.
//! It checks the claim ([`super::check`]) against the sums, and then
//! writes, in a second transaction, the node's new usage of each path
//! and its reservation, *if*
//!
//! 1. no key of the `nodes/` range was created or modified after R (the
//!    range's greatest `mod_revision` is at most R),
//! 2. this node's own `nodes/NODE` is on the lease it writes with,
//! 3. no `policy/PATH` on the way was modified after R,
//! 4. `n/N/res/NAME` is absent for every node N of R (but the one node
//!    an incoming live migration comes from: [`Cluster::admit_incoming`];
//!    and this node's own, if it holds the name with another claim: an
//!    earlier run that ended and is not released yet, replaced by the
//!    write, whose claim the check took away from the sums first; that
//!    key must be unchanged since R), and
//! 5. for every path whose policy limits a sum (unikernels, memory,
//!    block) and every node N of R, `n/N/usage/PATH` was not modified
//!    after R (a missing key has `mod_revision` 0, and one created
//!    after R has a greater one).
//!
//! A failed compare retries from the read. **Why this is exact**: let
//! the write commit at W, and look at the revision just before it. By
//! (1), every node key there is one of R, unchanged; by the invariant, so
//! is every node that holds a usage key or a reservation there: no node
//! unseen at R (one that joined after R, or whose new lease came after
//! R) can have slipped a key in. By (5), each such node's usage key of a
//! limiting path is the very one read at R, or gone (a release, a lease
//! expiry): the path's usage is at most what was checked. By (4), no node
//! holds the name (but a migration's source, whose usage the check
//! counted as any other's). By (2) and (1), this node is one of R, its own usage
//! read at R is its usage now (only it writes there, one admission or
//! release at a time, and a lease expiry would have removed its node
//! key), and the invariant holds after the write. So two admissions that
//! together would exceed a policy cannot both commit: the second one's
//! compare fails, it reads the first one's usage and is refused.
//!
//! A path without a limiting policy needs no compare (5): a limit
//! inherited from above is implied by the ancestor's check, and without
//! one nothing can be exceeded. So admissions in subtrees that share no
//! limiting policy never conflict; (1) conflicts only with a node
//! joining or taking a new lease, which is rare.
//!
//! The price of the layout: an admission reads 1 + P + N (P + 1) keys
//! and compares 2 + P + N (1 + L) of them, for P paths on the way, L of
//! them limiting, and N nodes. etcd takes at most 128 of each in a
//! transaction by default (`--max-txn-ops`): about 30 nodes for a
//! unikernel three levels down; a larger cluster raises it.

use super::check::{self, Claim, Level, Refused};
use crate::resources::{Name, PartialPolicy, Path, Usage};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, KeyValue, PutOptions,
    Txn, TxnOp, TxnOpResponse,
};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The key layout below a cluster's prefix (the module doc's table), in
/// one place: the store, the tests' checkers and docs/CLUSTER.md's roles
/// follow it.
pub mod keys {
    use crate::resources::Path;

    /// `policy/PATH`: the cluster's policy at PATH.
    pub fn policy(prefix: &str, path: &Path) -> String {
        format!("{prefix}/policy/{path}")
    }
    /// `nodes/`: every node's key (a range).
    pub fn nodes(prefix: &str) -> String {
        format!("{prefix}/nodes/")
    }
    /// `nodes/NODE`: the node, on its lease.
    pub fn node(prefix: &str, node: &str) -> String {
        format!("{prefix}/nodes/{node}")
    }
    /// `n/`: every node's own keys (a range).
    pub fn all_own(prefix: &str) -> String {
        format!("{prefix}/n/")
    }
    /// `n/NODE/`: what NODE alone writes (a range; an etcd role grants it
    /// by prefix). Node ids are labels (no `/`): no node's prefix holds
    /// another's. Every new lease of the node clears it
    /// ([`super::Cluster::new_lease`]): only what hangs on the node's
    /// lease belongs here.
    pub fn own(prefix: &str, node: &str) -> String {
        format!("{prefix}/n/{node}/")
    }
    /// `n/NODE/usage/PATH`: what NODE runs below PATH.
    pub fn usage(prefix: &str, node: &str, path: &Path) -> String {
        format!("{prefix}/n/{node}/usage/{path}")
    }
    /// `n/NODE/res/`: NODE's reservations (a range).
    pub fn reservations(prefix: &str, node: &str) -> String {
        format!("{prefix}/n/{node}/res/")
    }
    /// `n/NODE/res/NAME`: NODE's reservation for unikernel NAME.
    pub fn res(prefix: &str, node: &str, name: &str) -> String {
        format!("{prefix}/n/{node}/res/{name}")
    }
    /// The node and name of a reservation's key; `None`: not one.
    pub fn parse_res<'a>(prefix: &str, key: &'a str) -> Option<(&'a str, &'a str)> {
        let rest = key.strip_prefix(prefix)?.strip_prefix("/n/")?;
        let (node, rest) = rest.split_once('/')?;
        let name = rest.strip_prefix("res/")?;
        (!node.is_empty() && !name.is_empty()).then_some((node, name))
    }
    /// The node of a key `nodes/NODE`; `None`: not one.
    pub fn parse_node<'a>(prefix: &str, key: &'a str) -> Option<&'a str> {
        let node = key.strip_prefix(prefix)?.strip_prefix("/nodes/")?;
        (!node.is_empty() && !node.contains('/')).then_some(node)
    }
}

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
                    (a.usage.unikernels.saturating_mul(b.info.cpus.max(1) as u64))
                        .cmp(&(b.usage.unikernels.saturating_mul(a.info.cpus.max(1) as u64))),
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
    #[error(
        "this node's lease in etcd is gone (its node key expired or was replaced): \
         admission is stopped until it has a new one"
    )]
    NoLease,
    #[error(
        "etcd refuses this node's request ({0}): with etcd's auth on, the node's user (its \
         certificate's common name, which must be its node id) needs the roles of \
         docs/CLUSTER.md, \"Roles\""
    )]
    Denied(String),
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
    /// The nodes the last admission saw (sorted): the next one reads
    /// their keys, and again if the nodes changed.
    known: Mutex<Vec<String>>,
    /// An admission found this node's key not on its lease: the next
    /// renewal reports the lease lost, so that the node takes a new one
    /// (and registers again what runs).
    stale: std::sync::atomic::AtomicBool,
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
        keys::policy(&self.cfg.prefix, p)
    }
    /// This node's usage of `p`.
    fn k_usage(&self, p: &Path) -> String {
        keys::usage(&self.cfg.prefix, &self.cfg.node, p)
    }
    /// This node's reservation for `n`.
    fn k_res(&self, n: &str) -> String {
        keys::res(&self.cfg.prefix, &self.cfg.node, n)
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
                Err(e) if denied(&e) || lease_gone(&e) => return Err(e),
                Err(e) if i + 1 >= tries => return Err(e),
                Err(_) => {
                    i += 1;
                    tokio::time::sleep(Duration::from_millis(50 * i as u64)).await;
                }
            }
        }
    }

    /// The error of a call that failed: etcd did not answer, or (with its
    /// auth on) refused this node's user.
    pub(crate) fn unreachable(&self, e: etcd_client::Error) -> ClusterError {
        if denied(&e) {
            return ClusterError::Denied(e.to_string());
        }
        if lease_gone(&e) {
            // The next renewal takes a new lease.
            self.stale.store(true, Ordering::SeqCst);
            return ClusterError::NoLease;
        }
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
            known: Mutex::new(Vec::new()),
            stale: std::sync::atomic::AtomicBool::new(false),
            conflicts: AtomicU64::new(0),
            admitted: AtomicU64::new(0),
        };
        c.new_lease().await?;
        Ok(c)
    }

    pub(crate) fn lease_id(&self) -> i64 {
        self.lease.load(Ordering::SeqCst) as i64
    }

    /// Grant a new lease and register the node under it: in one
    /// transaction, `nodes/NODE` moves onto it and everything below
    /// `n/NODE/` goes (what an earlier lease or run of this node left:
    /// the caller registers again what runs), which keeps the module
    /// doc's invariant. The node takes the new lease as its own only once
    /// that committed; if it did not, the old one stays (and, expired,
    /// makes the next renewal try again).
    pub async fn new_lease(&self) -> Result<(), ClusterError> {
        let client = Retrying(self);
        let ttl = self.cfg.ttl.as_secs().max(1) as i64;
        let l = client
            .lease_grant(ttl)
            .await
            .map_err(|e| self.unreachable(e))?;
        let (memory_mb, cpus) = host_capacity();
        let info = NodeInfo {
            node: self.cfg.node.clone(),
            started_ns: now_ns(),
            memory_mb,
            cpus,
        };
        let prefix = &self.cfg.prefix;
        client
            .txn(Txn::new().and_then(vec![
                TxnOp::delete(
                    keys::own(prefix, &self.cfg.node),
                    Some(DeleteOptions::new().with_prefix()),
                ),
                TxnOp::put(
                    keys::node(prefix, &self.cfg.node),
                    serde_json::to_vec(&info).expect("encodes"),
                    Some(PutOptions::new().with_lease(l.id())),
                ),
            ]))
            .await
            .map_err(|e| self.unreachable(e))?;
        self.lease.store(l.id() as u64, Ordering::SeqCst);
        self.stale.store(false, Ordering::SeqCst);
        *self.last_ok.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        Ok(())
    }

    /// Renew the lease once. `Ok(false)`: it had expired, or the node's
    /// key is no longer on it (the caller takes a new one and registers
    /// again what runs).
    pub async fn keep_alive(&self) -> Result<bool, ClusterError> {
        if self.stale.swap(false, Ordering::SeqCst) {
            return Ok(false);
        }
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
        self.admit_as(name, claim, false).await
    }

    /// Admit the unikernel `name` arriving by live migration from another
    /// node, which holds its reservation until its run ends: as
    /// [`Cluster::admit`], but a name held by one other node is no
    /// conflict. The guest counts on both nodes until the source releases
    /// it, so the policies on the way must have room for a second copy
    /// meanwhile (exactness before convenience: a handover in one
    /// transaction would write the source node's keys, which its role
    /// forbids).
    pub async fn admit_incoming(&self, name: &Name, claim: Claim) -> Result<i64, ClusterError> {
        self.admit_as(name, claim, true).await
    }

    async fn admit_as(
        &self,
        name: &Name,
        claim: Claim,
        incoming: bool,
    ) -> Result<i64, ClusterError> {
        let _local = self.local.lock().await;
        // Half the lease's time without a word from etcd: others may soon
        // take this node's room; admit nothing more.
        let since = self.since_ok();
        if since > self.cfg.ttl / 2 {
            return Err(ClusterError::CutOff(since));
        }
        let paths: Vec<Path> = name.path().ancestors().collect();
        let name_s = name.to_string();
        let (prefix, me) = (self.cfg.prefix.as_str(), self.cfg.node.as_str());
        let own_key = keys::node(prefix, me);
        let client = Retrying(self);
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for attempt in 0..64u32 {
            let lease = self.lease_id();
            // Read, in this order: the node keys, the policy of each path,
            // then for each node known its reservation for the name and its
            // usage of each path.
            let mut reads = vec![TxnOp::get(
                keys::nodes(prefix),
                Some(GetOptions::new().with_prefix().with_keys_only()),
            )];
            reads.extend(paths.iter().map(|p| TxnOp::get(self.k_policy(p), None)));
            for n in &known {
                reads.push(TxnOp::get(keys::res(prefix, n, &name_s), None));
                reads.extend(
                    paths
                        .iter()
                        .map(|p| TxnOp::get(keys::usage(prefix, n, p), None)),
                );
            }
            let read = client
                .txn(Txn::new().and_then(reads))
                .await
                .map_err(|e| self.unreachable(e))?;
            let rev = read.header().map_or(0, |h| h.revision());
            let got: Vec<Vec<KeyValue>> = read
                .op_responses()
                .into_iter()
                .map(|r| match r {
                    TxnOpResponse::Get(g) => g.kvs().to_vec(),
                    _ => vec![],
                })
                .collect();
            // The nodes at R: if they are not those asked about, again.
            let mut nodes = Vec::new();
            let mut own_lease = None;
            for kv in &got[0] {
                let key = String::from_utf8_lossy(kv.key());
                let node = keys::parse_node(prefix, &key).ok_or_else(|| ClusterError::Bad {
                    key: key.to_string(),
                    err: "not a node's key (nodes/NODE)".into(),
                })?;
                if kv.key() == own_key.as_bytes() {
                    own_lease = Some(kv.lease());
                }
                nodes.push(node.to_string());
            }
            // This node's key must be there and on its lease, or what it
            // writes on that lease could outlive its key (the module
            // doc's invariant): it waits for a new lease.
            if own_lease != Some(lease) {
                // Not a new lease taken meanwhile: this one is lost.
                if self.lease_id() == lease {
                    self.stale.store(true, Ordering::SeqCst);
                }
                return Err(ClusterError::NoLease);
            }
            if nodes != known {
                known = nodes;
                *self.known.lock().unwrap_or_else(|p| p.into_inner()) = known.clone();
                continue;
            }
            let mut levels = Vec::with_capacity(paths.len());
            for (p, kvs) in paths.iter().zip(&got[1..]) {
                let policy = match kvs.first() {
                    Some(kv) => Some(decode::<PartialPolicy>(kv.key(), kv.value())?),
                    None => None,
                };
                levels.push(Level {
                    path: p.clone(),
                    policy,
                    usage: Usage::default(),
                });
            }
            let mut own = vec![Usage::default(); paths.len()];
            let per_node = got[1 + paths.len()..].chunks(paths.len() + 1);
            // The node a migration comes from (it holds the name).
            let mut source = None;
            // This node's own reservation for the name, if its claim
            // differs: an earlier run of the name that ended a moment ago
            // and is not released yet. Replaced in the same transaction.
            let mut earlier: Option<(Claim, i64)> = None;
            for (n, read) in known.iter().zip(per_node) {
                if let Some(kv) = read[0].first() {
                    if n == me {
                        let held: Reservation = decode(kv.key(), kv.value())?;
                        // Already admitted as it is (a registration again).
                        if held.claim == claim {
                            return Ok(0);
                        }
                        earlier = Some((held.claim, kv.mod_revision()));
                    } else if !incoming || source.is_some() {
                        return Err(ClusterError::Taken {
                            name: name_s,
                            node: n.clone(),
                        });
                    } else {
                        source = Some(n.clone());
                    }
                }
                for (j, kvs) in read[1..].iter().enumerate() {
                    let Some(kv) = kvs.first() else { continue };
                    let u = decode::<Usage>(kv.key(), kv.value())?;
                    let sum = &mut levels[j].usage;
                    sum.unikernels = sum.unikernels.saturating_add(u.unikernels);
                    sum.memory_mb = sum.memory_mb.saturating_add(u.memory_mb);
                    sum.block_mb = sum.block_mb.saturating_add(u.block_mb);
                    if n == me {
                        own[j] = u;
                    }
                }
            }
            if let Some((held, _)) = earlier {
                for (level, mine) in levels.iter_mut().zip(own.iter_mut()) {
                    level.usage = held.taken_from(level.usage);
                    *mine = held.taken_from(*mine);
                }
            }
            check::check(&levels, &claim)?;
            // The compares (1) to (5) of the module doc.
            let mut compares = vec![
                Compare::mod_revision(keys::nodes(prefix), CompareOp::Less, rev + 1).with_prefix(),
                Compare::lease(own_key.clone(), CompareOp::Equal, lease),
            ];
            compares.extend(
                paths
                    .iter()
                    .map(|p| Compare::mod_revision(self.k_policy(p), CompareOp::Less, rev + 1)),
            );
            compares.extend(
                known
                    .iter()
                    .filter(|n| source.as_ref() != Some(*n))
                    .map(|n| match earlier {
                        Some((_, at)) if n == me => Compare::mod_revision(
                            keys::res(prefix, n, &name_s),
                            CompareOp::Equal,
                            at,
                        ),
                        _ => Compare::create_revision(
                            keys::res(prefix, n, &name_s),
                            CompareOp::Equal,
                            0,
                        ),
                    }),
            );
            let mut writes = Vec::new();
            for ((p, mine), level) in paths.iter().zip(&own).zip(&levels) {
                // A path's usage needs comparing only where a policy sets a
                // limit that adds up: a limit inherited from above is
                // implied by the ancestor's check (a subtree uses no more
                // than the path above it), and without any, nothing can be
                // exceeded. So admissions in different subtrees do not
                // conflict through the root (docs/BENCHMARKS.md, "A
                // cluster on etcd"). A policy set meanwhile fails the
                // policy compare above.
                if level.policy.as_ref().is_some_and(limits_sums) {
                    compares.extend(known.iter().map(|n| {
                        Compare::mod_revision(keys::usage(prefix, n, p), CompareOp::Less, rev + 1)
                    }));
                }
                writes.push(TxnOp::put(
                    self.k_usage(p),
                    serde_json::to_vec(&claim.added_to(*mine)).expect("encodes"),
                    Some(PutOptions::new().with_lease(lease)),
                ));
            }
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
    /// reservation and its share of each path's usage; the etcd revision
    /// of that (0: it held none). Only keys that are still as read are
    /// changed, each kept on its lease (the module doc's invariant): if
    /// a lease expired or a new one cleared them meanwhile, it reads
    /// again, and finds nothing to release.
    pub async fn release(&self, name: &Name) -> Result<i64, ClusterError> {
        let _local = self.local.lock().await;
        let name_s = name.to_string();
        let client = Retrying(self);
        let paths: Vec<Path> = name.path().ancestors().collect();
        for _ in 0..8 {
            // One read: the reservation and this node's usage of each path.
            let mut reads = vec![TxnOp::get(self.k_res(&name_s), None)];
            reads.extend(paths.iter().map(|p| TxnOp::get(self.k_usage(p), None)));
            let read = client
                .txn(Txn::new().and_then(reads))
                .await
                .map_err(|e| self.unreachable(e))?;
            let got: Vec<Option<KeyValue>> = read
                .op_responses()
                .into_iter()
                .map(|r| match r {
                    TxnOpResponse::Get(g) => g.kvs().first().cloned(),
                    _ => None,
                })
                .collect();
            let Some(Some(res)) = got.first() else {
                return Ok(0);
            };
            let r: Reservation = decode(res.key(), res.value())?;
            let mut compares = vec![Compare::mod_revision(
                self.k_res(&name_s),
                CompareOp::Equal,
                res.mod_revision(),
            )];
            let mut writes = vec![TxnOp::delete(self.k_res(&name_s), None)];
            for (p, mine) in paths.iter().zip(got.iter().skip(1)) {
                let Some(kv) = mine else { continue };
                compares.push(Compare::mod_revision(
                    self.k_usage(p),
                    CompareOp::Equal,
                    kv.mod_revision(),
                ));
                let after = r.claim.taken_from(decode::<Usage>(kv.key(), kv.value())?);
                writes.push(if after.unikernels == 0 {
                    TxnOp::delete(self.k_usage(p), None)
                } else {
                    TxnOp::put(
                        self.k_usage(p),
                        serde_json::to_vec(&after).expect("encodes"),
                        Some(PutOptions::new().with_ignore_lease()),
                    )
                });
            }
            // Only this node writes these keys, and it holds `local`: the
            // compare fails only when a lease took them.
            let done = client
                .txn(Txn::new().when(compares).and_then(writes))
                .await
                .map_err(|e| self.unreachable(e))?;
            if done.succeeded() {
                return Ok(done.header().map_or(0, |h| h.revision()));
            }
        }
        Err(ClusterError::Contended)
    }

    /// The names this node holds reservations for.
    pub async fn own_names(&self) -> Result<Vec<String>, ClusterError> {
        let client = Retrying(self);
        let prefix = keys::reservations(&self.cfg.prefix, &self.cfg.node);
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
        let prefix = &self.cfg.prefix;
        let got = client
            .get(keys::all_own(prefix), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|e| self.unreachable(e))?;
        got.kvs()
            .iter()
            .filter(|kv| keys::parse_res(prefix, &String::from_utf8_lossy(kv.key())).is_some())
            .map(|kv| decode(kv.key(), kv.value()))
            .collect()
    }

    /// Every live node's id, and the names it holds reservations for
    /// (keys only: for noticing nodes that are gone).
    pub async fn membership(
        &self,
    ) -> Result<std::collections::BTreeMap<String, Vec<String>>, ClusterError> {
        let client = Retrying(self);
        let prefix = &self.cfg.prefix;
        let keys_of = |range: String| {
            let client = &client;
            async move {
                client
                    .get(
                        range,
                        Some(GetOptions::new().with_prefix().with_keys_only()),
                    )
                    .await
                    .map(|r| {
                        r.kvs()
                            .iter()
                            .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
                            .collect::<Vec<_>>()
                    })
            }
        };
        let nodes = keys_of(keys::nodes(prefix))
            .await
            .map_err(|e| self.unreachable(e))?;
        let own = keys_of(keys::all_own(prefix))
            .await
            .map_err(|e| self.unreachable(e))?;
        let mut out: std::collections::BTreeMap<String, Vec<String>> = nodes
            .iter()
            .filter_map(|k| keys::parse_node(prefix, k))
            .map(|n| (n.to_string(), vec![]))
            .collect();
        for k in &own {
            if let Some((node, name)) = keys::parse_res(prefix, k) {
                out.entry(node.to_string())
                    .or_default()
                    .push(name.to_string());
            }
        }
        Ok(out)
    }

    /// Each of `nodes`' usage of `path` (one read).
    async fn usage_by_node(
        &self,
        nodes: &[String],
        path: &Path,
    ) -> Result<Vec<Usage>, ClusterError> {
        let reads: Vec<TxnOp> = nodes
            .iter()
            .map(|n| TxnOp::get(keys::usage(&self.cfg.prefix, n, path), None))
            .collect();
        let got = Retrying(self)
            .txn(Txn::new().and_then(reads))
            .await
            .map_err(|e| self.unreachable(e))?;
        got.op_responses()
            .into_iter()
            .map(|r| match r {
                TxnOpResponse::Get(g) => match g.kvs().first() {
                    Some(kv) => decode(kv.key(), kv.value()),
                    None => Ok(Usage::default()),
                },
                _ => Ok(Usage::default()),
            })
            .collect()
    }

    /// Every live node (its key is on its lease) and what it runs.
    pub async fn nodes(&self) -> Result<Vec<NodeLoad>, ClusterError> {
        let client = Retrying(self);
        let got = client
            .get(
                keys::nodes(&self.cfg.prefix),
                Some(GetOptions::new().with_prefix()),
            )
            .await
            .map_err(|e| self.unreachable(e))?;
        // The id is the key's: a value naming another node (bad data) must
        // not send placement to a node that is not there.
        let mut infos = Vec::new();
        for kv in got.kvs() {
            let key = String::from_utf8_lossy(kv.key());
            let Some(id) = keys::parse_node(&self.cfg.prefix, &key) else {
                continue;
            };
            let mut info = decode::<NodeInfo>(kv.key(), kv.value())?;
            info.node = id.to_string();
            infos.push(info);
        }
        let ids: Vec<String> = infos.iter().map(|i| i.node.clone()).collect();
        let usage = self.usage_by_node(&ids, &Path::root()).await?;
        Ok(infos
            .into_iter()
            .zip(usage)
            .map(|(info, usage)| NodeLoad { info, usage })
            .collect())
    }

    /// Ask node `node` to start a unikernel (or an environment): its
    /// request at `assign/NODE/TICKET` (on this node's lease, so it goes if
    /// this node does), where the ticket is `NAME#ID` with an id of this
    /// request's own (no name has a `#`): the answer comes at
    /// `placed/TICKET`, so that an answer to an earlier request for the
    /// same name is never taken for this one's. The ticket.
    pub async fn assign(
        &self,
        node: &str,
        name: &str,
        request: Vec<u8>,
    ) -> Result<String, ClusterError> {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(now_ns());
        let ticket = format!("{name}#{:016x}", h.finish());
        let client = Retrying(self);
        client
            .put(
                self.key(&format!("assign/{node}/{ticket}")),
                request,
                Some(PutOptions::new().with_lease(self.lease_id())),
            )
            .await
            .map_err(|e| self.unreachable(e))?;
        Ok(ticket)
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
            // Taken if this delete is the one that removed it. If etcd
            // stops answering, those taken already are carried out.
            let taken = match client
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
            {
                Ok(t) => t,
                Err(e) if out.is_empty() => return Err(self.unreachable(e)),
                Err(_) => break,
            };
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

    /// Say how an assigned request went (`placed/TICKET`, on this node's
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

    /// Wait for the outcome of the request `ticket` assigned to `node`
    /// ([`Cluster::assign`]), and remove it; `None` after `max`, the
    /// request withdrawn if `node` has not taken it yet.
    pub async fn outcome(
        &self,
        node: &str,
        ticket: &str,
        max: Duration,
    ) -> Result<Option<Vec<u8>>, ClusterError> {
        let key = self.key(&format!("placed/{ticket}"));
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
                let _ = client
                    .delete(self.key(&format!("assign/{node}/{ticket}")), None)
                    .await;
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The cluster's usage below `path`: every live node's.
    pub async fn usage(&self, path: &Path) -> Result<Usage, ClusterError> {
        let got = Retrying(self)
            .get(
                keys::nodes(&self.cfg.prefix),
                Some(GetOptions::new().with_prefix().with_keys_only()),
            )
            .await
            .map_err(|e| self.unreachable(e))?;
        let nodes: Vec<String> = got
            .kvs()
            .iter()
            .filter_map(|kv| {
                keys::parse_node(&self.cfg.prefix, &String::from_utf8_lossy(kv.key()))
                    .map(String::from)
            })
            .collect();
        let mut sum = Usage::default();
        for u in self.usage_by_node(&nodes, path).await? {
            sum.unikernels = sum.unikernels.saturating_add(u.unikernels);
            sum.memory_mb = sum.memory_mb.saturating_add(u.memory_mb);
            sum.block_mb = sum.block_mb.saturating_add(u.block_mb);
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

/// etcd refused for want of a permission (its auth is on, and the node's
/// user has no role for the key): an answer, not a member down, so not
/// tried again.
fn denied(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.message().contains("permission denied"))
}

/// Is `e` etcd saying that the lease a write named has expired? An
/// answer, not a failure to reach etcd: not retried.
fn lease_gone(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.message().contains("lease not found"))
}

/// The name an assignment's ticket (`NAME#ID`, [`Cluster::assign`]) is for.
pub fn ticket_name(ticket: &str) -> &str {
    ticket.split_once('#').map_or(ticket, |(name, _)| name)
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
