//! Exact admission through etcd (issue 22) under failures, tested in the
//! manner of Jepsen: simulated nodes admit and release unikernels at
//! random against a policy while a nemesis kills etcd members (sometimes
//! two, so that the cluster loses its quorum for a while), crashes nodes
//! (their reservations stay until their lease expires or the node comes
//! back) and tightens and loosens the policies. Every operation is recorded with when it was invoked,
//! when it completed and what it returned, and the run is then checked:
//!
//! 1. **From etcd's own history.** Every revision of the reservation
//!    keys (`PREFIX/n/NODE/res/NAME`) is read back with a watch from revision 1
//!    (nothing is compacted) and replayed with the policies' history: at
//!    no revision that admitted one may more unikernels run below `alice`
//!    than its policy then allows, nor more memory below `alice:team` than
//!    that policy allows (and never more than they ever allow).
//! 2. **From the operations.** An admission acknowledged at revision R is
//!    a put of its reservation at exactly R; a refused one is never put; a
//!    release acknowledged at R is a delete at R; revisions follow real
//!    time (an operation that completed before another was invoked has the
//!    smaller one). And, without etcd's word for it, the reservations the
//!    history proves alive at a moment (acknowledged, not yet being
//!    released, their node not crashed, its lease confirmed within its TTL)
//!    never exceed the policy either.
//!
//! The client side runs on threads inside node network namespaces
//! ([`EtcdCluster::node_netns`]), one current-thread tokio runtime each,
//! so its connections start there. The run is seeded: the seed is
//! printed, and `TT_JEPSEN_SEED=N` runs with seed N again (the threads'
//! interleaving still varies from run to run).
//!
//! The library is driven directly: no KVM, no daemon.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tt_host::cluster::check::Claim;
use tt_host::cluster::store::{Cluster, ClusterError, Config};
use tt_host::resources::{Name, PartialPolicy, Path};
use tt_tests::etcd::EtcdCluster;
use tt_tests::netns::Netns;

/// Where the test's keys live in etcd.
const PREFIX: &str = "/jepsen";
/// Simulated tt-host nodes.
const NODES: usize = 3;
/// `alice` may run at most this many unikernels across the cluster: its
/// policy starts there, and the nemesis sets it between 2 and this.
const ALICE_MAX: u64 = 4;
/// `alice:team` may use at most this much memory across the cluster: room
/// for [`TEAM_CLAIM_MB`] three times. The nemesis sets it to this or 64.
const TEAM_MB: u64 = 96;
/// What a unikernel below `alice:team` takes.
const TEAM_CLAIM_MB: u64 = 32;
/// What a unikernel right below `alice` takes.
const ALICE_CLAIM_MB: u64 = 16;
/// The nodes' lease: a crashed node's reservations last this long.
const TTL: Duration = Duration::from_secs(3);
/// How long the nodes and the nemesis run.
const RUN_FOR: Duration = Duration::from_secs(16);
/// Setting it runs the test with that seed.
const SEED_VAR: &str = "TT_JEPSEN_SEED";
/// How much earlier than etcd the real-time check takes a lease to end:
/// a margin for the two clocks' readings (both monotonic, one machine).
const LEASE_MARGIN: Duration = Duration::from_millis(100);

// ---------------------------------------------------------------------
// Randomness

/// SplitMix64: small, seedable, good enough to pick operations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }
    /// An independent generator for another thread.
    fn fork(&mut self) -> Rng {
        Rng(self.next())
    }
}

/// The seed: [`SEED_VAR`]'s, or one from the clock.
fn seed() -> u64 {
    match std::env::var(SEED_VAR) {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("{SEED_VAR}={s:?}: not a number: {e}")),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
    }
}

// ---------------------------------------------------------------------
// The history

/// What an operation asked.
#[derive(Debug, Clone)]
enum Act {
    /// `Cluster::connect`: a node (re)starting, which clears what its
    /// previous run left.
    Connect,
    /// `admit(name)` taking `mb`, under the node's lease number `epoch`
    /// (`u32::MAX`: interrupted before it knew it).
    Admit {
        name: String,
        mb: u64,
        epoch: u32,
    },
    Release {
        name: String,
    },
    /// `new_lease` after the node found its lease expired.
    NewLease,
}

/// What it returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Pending,
    /// The etcd revision of its commit (0: none to report).
    Ok(i64),
    Refused,
    Taken,
    CutOff,
    Contended,
    Unreachable,
    Bad,
    /// Cut short by a crash of its node or the end of the run: it may or
    /// may not have happened.
    Interrupted,
}

#[derive(Debug, Clone)]
struct Op {
    node: usize,
    /// Which run of the node (1 and up; each crash starts a new one).
    inst: u32,
    act: Act,
    invoked: Duration,
    completed: Duration,
    outcome: Outcome,
    detail: String,
}

/// What proves a node's lease alive, and when a node's run ended.
#[derive(Debug, Clone, Copy)]
enum Life {
    /// Lease number `epoch` of run `inst` was granted or renewed by etcd
    /// after `sent`: it lives at least until `sent + TTL`.
    Confirmed {
        node: usize,
        inst: u32,
        epoch: u32,
        sent: Duration,
    },
    /// The run ended (crashed, or the test ended) at `at`: a later run of
    /// the node clears its reservations.
    Stopped {
        node: usize,
        inst: u32,
        at: Duration,
    },
}

struct History {
    t0: Instant,
    ops: Mutex<Vec<Op>>,
    life: Mutex<Vec<Life>>,
    nemesis: Mutex<Vec<(Duration, String)>>,
}

impl History {
    fn new() -> History {
        History {
            t0: Instant::now(),
            ops: Mutex::new(Vec::new()),
            life: Mutex::new(Vec::new()),
            nemesis: Mutex::new(Vec::new()),
        }
    }
    fn now(&self) -> Duration {
        self.t0.elapsed()
    }
    fn invoke(&self, node: usize, inst: u32, act: Act) -> usize {
        let mut ops = self.ops.lock().unwrap();
        ops.push(Op {
            node,
            inst,
            act,
            invoked: self.now(),
            completed: Duration::MAX,
            outcome: Outcome::Pending,
            detail: String::new(),
        });
        ops.len() - 1
    }
    fn complete(&self, id: usize, (outcome, detail): (Outcome, String)) {
        let now = self.now();
        let mut ops = self.ops.lock().unwrap();
        let op = &mut ops[id];
        op.completed = now;
        op.outcome = outcome;
        op.detail = detail;
    }
    fn set_epoch(&self, id: usize, e: u32) {
        if let Act::Admit { epoch, .. } = &mut self.ops.lock().unwrap()[id].act {
            *epoch = e;
        }
    }
    fn life(&self, e: Life) {
        self.life.lock().unwrap().push(e);
    }
    fn nemesis(&self, what: String) {
        let now = self.now();
        self.nemesis.lock().unwrap().push((now, what));
    }
}

/// An operation's result as recorded; `None`: interrupted.
fn outcome(r: Option<Result<i64, ClusterError>>) -> (Outcome, String) {
    match r {
        None => (Outcome::Interrupted, String::new()),
        Some(Ok(rev)) => (Outcome::Ok(rev), String::new()),
        Some(Err(e)) => {
            let o = match &e {
                ClusterError::Refused(_) => Outcome::Refused,
                ClusterError::Taken { .. } => Outcome::Taken,
                ClusterError::Unreachable { .. } => Outcome::Unreachable,
                // Not admitted: the node was cut off, or its lease gone.
                ClusterError::CutOff(_) | ClusterError::NoLease => Outcome::CutOff,
                // No auth here: a refusal is as wrong as bad data.
                ClusterError::Bad { .. } | ClusterError::Denied(_) => Outcome::Bad,
                ClusterError::Contended => Outcome::Contended,
            };
            (o, e.to_string())
        }
    }
}

// ---------------------------------------------------------------------
// Control: the end of the run, and which nodes are crashed

struct Control {
    stop: AtomicBool,
    down: [AtomicBool; NODES],
}

impl Control {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
    fn should_end(&self, node: usize) -> bool {
        self.stopped() || self.down[node].load(Ordering::SeqCst)
    }
    /// Resolves when node `node` crashes or the run ends.
    async fn ended(&self, node: usize) {
        while !self.should_end(node) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    /// Sleep `d`, less if the run ends meanwhile.
    fn sleep(&self, d: Duration) {
        let until = Instant::now() + d;
        while !self.stopped() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Ends the run if its thread panics, so that the others stop too.
struct StopOnPanic<'a>(&'a Control);

impl Drop for StopOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.stop.store(true, Ordering::SeqCst);
        }
    }
}

/// `f` unless node `node` crashes or the run ends first (then `None`: the
/// future is dropped wherever it was, as a crash would leave it).
async fn until_end<F: Future>(ctl: &Control, node: usize, f: F) -> Option<F::Output> {
    tokio::select! {
        r = f => Some(r),
        _ = ctl.ended(node) => None,
    }
}

// ---------------------------------------------------------------------
// The nodes

fn config(endpoints: &[String], node: &str) -> Config {
    Config {
        endpoints: endpoints.to_vec(),
        node: node.to_string(),
        prefix: PREFIX.to_string(),
        ttl: TTL,
        keep_on_partition: false,
        tls: None,
    }
}

/// One run of a node: from its connect to its crash.
struct NodeRun<'a> {
    node: usize,
    inst: u32,
    cluster: &'a Cluster,
    hist: &'a History,
    ctl: &'a Control,
    /// The lease number; an operation holds it shared for its whole
    /// length, so that it ran under one lease, and a new lease is taken
    /// holding it exclusively.
    epoch: tokio::sync::RwLock<u32>,
}

impl NodeRun<'_> {
    /// Random admissions of fresh names and releases of names held, until
    /// the node crashes or the run ends.
    async fn ops(&self, rng: &mut Rng, seq: &mut u64, held: &mut Vec<String>) {
        let (i, inst) = (self.node, self.inst);
        while !self.ctl.should_end(i) {
            if !held.is_empty() && rng.chance(45) {
                let name = held.swap_remove(rng.below(held.len() as u64) as usize);
                let id = self
                    .hist
                    .invoke(i, inst, Act::Release { name: name.clone() });
                let n: Name = name.parse().expect("a valid name");
                let r = until_end(self.ctl, i, async {
                    let _epoch = self.epoch.read().await;
                    self.cluster.release(&n).await
                })
                .await;
                let (o, detail) = outcome(r);
                self.hist.complete(id, (o, detail));
                if !matches!(o, Outcome::Ok(_)) {
                    // Maybe not released: try again later.
                    held.push(name);
                }
            } else {
                *seq += 1;
                let (name, mb) = if rng.chance(40) {
                    (format!("alice:team:n{i}-{seq}"), TEAM_CLAIM_MB)
                } else {
                    (format!("alice:n{i}-{seq}"), ALICE_CLAIM_MB)
                };
                let n: Name = name.parse().expect("a valid name");
                let claim = Claim {
                    memory_mb: mb,
                    block_mb: 0,
                };
                // Its lease number is known once it holds it.
                let act = Act::Admit {
                    name: name.clone(),
                    mb,
                    epoch: u32::MAX,
                };
                let id = self.hist.invoke(i, inst, act);
                let r = until_end(self.ctl, i, async {
                    let epoch = self.epoch.read().await;
                    self.hist.set_epoch(id, *epoch);
                    self.cluster.admit(&n, claim).await
                })
                .await;
                let (o, detail) = outcome(r);
                self.hist.complete(id, (o, detail));
                if matches!(
                    o,
                    Outcome::Ok(_) | Outcome::Unreachable | Outcome::Interrupted
                ) {
                    // Held, or maybe held: releasing a name not held is a
                    // no-op.
                    held.push(name);
                }
            }
            tokio::time::sleep(rng.ms(2, 40)).await;
        }
    }

    /// Renew the lease as the daemon does; take a new one when it expired.
    /// Returns when the node crashes or the run ends.
    async fn keep_lease(&self) {
        let (i, inst) = (self.node, self.inst);
        let tick = Duration::from_millis(500);
        while !self.ctl.should_end(i) {
            let epoch = *self.epoch.read().await;
            let sent = self.hist.now();
            match tokio::time::timeout(Duration::from_secs(1), self.cluster.keep_alive()).await {
                Ok(Ok(true)) => self.hist.life(Life::Confirmed {
                    node: i,
                    inst,
                    epoch,
                    sent,
                }),
                Ok(Ok(false)) => {
                    let mut epoch = self.epoch.write().await;
                    *epoch += 1;
                    let id = self.hist.invoke(i, inst, Act::NewLease);
                    let sent = self.hist.now();
                    let r = self.cluster.new_lease().await;
                    let granted = r.is_ok();
                    self.hist.complete(id, outcome(Some(r.map(|()| 0))));
                    if granted {
                        self.hist.life(Life::Confirmed {
                            node: i,
                            inst,
                            epoch: *epoch,
                            sent,
                        });
                    }
                }
                Ok(Err(_)) | Err(_) => {}
            }
            tokio::time::sleep(tick).await;
        }
    }
}

/// Node `i`: runs until the end, crashing when the nemesis says so and
/// starting again (a new [`Cluster::connect`]) when it lets it. Returns
/// the conflicts its runs counted.
async fn node_main(
    i: usize,
    endpoints: &[String],
    hist: &History,
    ctl: &Control,
    mut rng: Rng,
) -> u64 {
    let cfg = config(endpoints, &format!("n{i}"));
    let (mut seq, mut inst, mut conflicts) = (0u64, 0u32, 0u64);
    while !ctl.stopped() {
        if ctl.should_end(i) {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        inst += 1;
        let id = hist.invoke(i, inst, Act::Connect);
        let sent = hist.now();
        let cluster = match until_end(ctl, i, Cluster::connect(cfg.clone())).await {
            Some(Ok(c)) => c,
            r => {
                hist.complete(id, outcome(r.map(|r| r.map(|_| 0))));
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        hist.complete(id, (Outcome::Ok(0), String::new()));
        hist.life(Life::Confirmed {
            node: i,
            inst,
            epoch: 0,
            sent,
        });
        let run = NodeRun {
            node: i,
            inst,
            cluster: &cluster,
            hist,
            ctl,
            epoch: tokio::sync::RwLock::new(0),
        };
        // What this run holds: a crash forgets it (the next run's connect
        // clears it from etcd).
        let mut held = Vec::new();
        tokio::select! {
            _ = run.ops(&mut rng, &mut seq, &mut held) => {}
            _ = run.keep_lease() => {}
        }
        conflicts += cluster.conflicts.load(Ordering::Relaxed);
        hist.life(Life::Stopped {
            node: i,
            inst,
            at: hist.now(),
        });
        // The crash: the handle goes without releasing anything.
        drop(cluster);
    }
    conflicts
}

// ---------------------------------------------------------------------
// The nemesis

#[derive(Default)]
struct NemesisCount {
    member_kills: AtomicU64,
    quorum_losses: AtomicU64,
    node_crashes: AtomicU64,
    policy_changes: AtomicU64,
}

/// Kill etcd members, one at a time mostly, two now and then (no quorum
/// until one is back), and restart them; until the run ends, leaving
/// every member running and the cluster healthy.
fn etcd_nemesis(etcd: &EtcdCluster, hist: &History, ctl: &Control, n: &NemesisCount, mut rng: Rng) {
    let members = etcd.len() as u64;
    for round in 0.. {
        ctl.sleep(rng.ms(300, 1200));
        if ctl.stopped() {
            return;
        }
        let a = rng.below(members) as usize;
        // The second round always loses the quorum, so that every run does.
        let victims = if round == 1 || rng.chance(20) {
            let b = (a + 1 + rng.below(members - 1) as usize) % members as usize;
            n.quorum_losses.fetch_add(1, Ordering::Relaxed);
            vec![a, b]
        } else {
            vec![a]
        };
        for &v in &victims {
            etcd.kill(v);
            n.member_kills.fetch_add(1, Ordering::Relaxed);
        }
        hist.nemesis(format!("etcd: kill member(s) {victims:?}"));
        // Not cut short by the end: the members come back in any case.
        std::thread::sleep(rng.ms(400, 2000));
        for &v in &victims {
            etcd.restart(v);
        }
        hist.nemesis(format!("etcd: restart member(s) {victims:?}"));
        etcd.wait_healthy();
        hist.nemesis("etcd: healthy".to_string());
    }
}

/// Crash a node now and then (it drops its handle without releasing
/// anything) and let it start again after a while, sometimes before its
/// lease expires, sometimes after.
fn node_nemesis(hist: &History, ctl: &Control, n: &NemesisCount, mut rng: Rng) {
    while !ctl.stopped() {
        ctl.sleep(rng.ms(1000, 3000));
        if ctl.stopped() {
            break;
        }
        let i = rng.below(NODES as u64) as usize;
        ctl.down[i].store(true, Ordering::SeqCst);
        n.node_crashes.fetch_add(1, Ordering::Relaxed);
        hist.nemesis(format!("node n{i}: crash"));
        ctl.sleep(rng.ms(300, 4500));
        ctl.down[i].store(false, Ordering::SeqCst);
        hist.nemesis(format!("node n{i}: start again"));
    }
}

/// Resolves when the run ends.
async fn run_ended(ctl: &Control) {
    while !ctl.stopped() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn path(s: &str) -> Path {
    s.parse().expect("a valid path")
}

/// Tighten and loosen the policies now and then: `alice` between 2 and
/// [`ALICE_MAX`] unikernels, `alice:team` 64 or [`TEAM_MB`] MB. Admissions
/// in flight must see the change (their compare of the policy's revision
/// fails) and count against the new limit.
async fn policy_nemesis(
    endpoints: &[String],
    hist: &History,
    ctl: &Control,
    n: &NemesisCount,
    mut rng: Rng,
) {
    let cluster = loop {
        if ctl.stopped() {
            return;
        }
        let connect = Cluster::connect(config(endpoints, "policy"));
        match tokio::select! { r = connect => Some(r), _ = run_ended(ctl) => None } {
            Some(Ok(c)) => break c,
            Some(Err(_)) => tokio::time::sleep(Duration::from_millis(200)).await,
            None => return,
        }
    };
    loop {
        tokio::select! {
            _ = tokio::time::sleep(rng.ms(500, 2000)) => {}
            _ = run_ended(ctl) => return,
        }
        let (at, policy, what) = if rng.chance(60) {
            let k = 2 + rng.below(ALICE_MAX - 1);
            let p = PartialPolicy {
                unikernels: Some(k as u32),
                ..Default::default()
            };
            ("alice", p, format!("{k} unikernels"))
        } else {
            let mb = if rng.chance(50) { 64 } else { TEAM_MB };
            let p = PartialPolicy {
                memory_mb: Some(mb),
                ..Default::default()
            };
            ("alice:team", p, format!("{mb} MB"))
        };
        let at_path = path(at);
        let put = cluster.put_policy(&at_path, Some(&policy));
        let r = tokio::select! { r = put => r, _ = run_ended(ctl) => return };
        n.policy_changes.fetch_add(1, Ordering::Relaxed);
        let done = match r {
            Ok(()) => "set".to_string(),
            Err(e) => {
                let e = e.to_string();
                format!("maybe not set: {}", e.get(..60).unwrap_or(&e))
            }
        };
        hist.nemesis(format!("policy: {at} {what} ({done})"));
    }
}

// Reading etcd's history back, and the checkers.
#[path = "cluster_jepsen/check.rs"]
mod check;
use check::{
    check_ops_against_replay, check_proved_alive, check_real_time_order, history,
    longest_unconfirmed, replay, res_key,
};

// ---------------------------------------------------------------------
// The test

#[test]
fn admission_stays_within_policy_under_member_and_node_failures() {
    let seed = seed();
    println!("cluster_jepsen: seed {seed} ({SEED_VAR}={seed} runs it again)");
    let mut rng = Rng(seed);

    let etcd = EtcdCluster::start(3);
    let endpoints: Vec<String> = etcd.endpoints().split(',').map(String::from).collect();
    // One namespace per node, and one for setting up and checking.
    let nss: Vec<Netns> = (0..=NODES).map(|i| etcd.node_netns(i)).collect();
    let admin = &nss[NODES];

    admin.block_on(|| async {
        let c = Cluster::connect(config(&endpoints, "admin"))
            .await
            .expect("connect to set the policies");
        let alice = PartialPolicy {
            unikernels: Some(ALICE_MAX as u32),
            ..Default::default()
        };
        let team = PartialPolicy {
            memory_mb: Some(TEAM_MB),
            ..Default::default()
        };
        c.put_policy(&path("alice"), Some(&alice))
            .await
            .expect("set alice's policy");
        c.put_policy(&path("alice:team"), Some(&team))
            .await
            .expect("set alice:team's policy");
    });

    let hist = History::new();
    let ctl = Control {
        stop: AtomicBool::new(false),
        down: Default::default(),
    };
    let nemesis = NemesisCount::default();
    let conflicts: u64 = std::thread::scope(|s| {
        let (hist, ctl, nemesis, endpoints, etcd) = (&hist, &ctl, &nemesis, &endpoints, &etcd);
        let nodes: Vec<_> = (0..NODES)
            .map(|i| {
                let (ns, rng) = (&nss[i], rng.fork());
                s.spawn(move || {
                    let _stop = StopOnPanic(ctl);
                    ns.block_on(|| node_main(i, endpoints, hist, ctl, rng))
                })
            })
            .collect();
        let rng_e = rng.fork();
        let members = s.spawn(move || {
            let _stop = StopOnPanic(ctl);
            etcd_nemesis(etcd, hist, ctl, nemesis, rng_e)
        });
        let rng_n = rng.fork();
        let crasher = s.spawn(move || {
            let _stop = StopOnPanic(ctl);
            node_nemesis(hist, ctl, nemesis, rng_n)
        });
        let (admin, rng_p) = (&nss[NODES], rng.fork());
        let policies = s.spawn(move || {
            let _stop = StopOnPanic(ctl);
            admin.block_on(|| policy_nemesis(endpoints, hist, ctl, nemesis, rng_p))
        });
        ctl.sleep(RUN_FOR);
        ctl.stop.store(true, Ordering::SeqCst);
        members.join().expect("the etcd nemesis");
        crasher.join().expect("the node nemesis");
        policies.join().expect("the policy nemesis");
        nodes.into_iter().map(|h| h.join().expect("a node")).sum()
    });

    etcd.wait_healthy();
    let (changes, policies) = admin.block_on(|| async {
        tokio::time::timeout(Duration::from_secs(30), history(&endpoints))
            .await
            .expect("etcd's history read within 30 s")
    });

    let ops = hist.ops.lock().unwrap().clone();
    let life = hist.life.lock().unwrap().clone();
    let mut failures = Vec::new();
    let r = replay(&changes, &policies, &mut failures);
    check_ops_against_replay(&ops, &r, &mut failures);
    check_real_time_order(&ops, &mut failures);
    let proved_max = check_proved_alive(&ops, &life, &mut failures);

    let admits = ops.iter().filter(|op| matches!(op.act, Act::Admit { .. }));
    let count = |o: fn(Outcome) -> bool| admits.clone().filter(|op| o(op.outcome)).count();
    let admitted = count(|o| matches!(o, Outcome::Ok(_)));
    let refused = count(|o| o == Outcome::Refused);
    let cut_off = count(|o| o == Outcome::CutOff);
    let unknown = count(|o| matches!(o, Outcome::Unreachable | Outcome::Interrupted));
    let releases = ops
        .iter()
        .filter(|op| matches!(op.act, Act::Release { .. }) && matches!(op.outcome, Outcome::Ok(_)))
        .count();
    let late = count(|o| o == Outcome::Ok(0));
    let new_leases = ops
        .iter()
        .filter(|op| matches!(op.act, Act::NewLease))
        .count();
    // Deletes that no acknowledged release made: a crashed node's lease
    // expiring, or its next run clearing what it left.
    let released: std::collections::HashSet<(String, i64)> = ops
        .iter()
        .filter_map(|op| match (&op.act, op.outcome) {
            (Act::Release { name }, Outcome::Ok(rev)) => Some((res_key(op.node, name), rev)),
            _ => None,
        })
        .collect();
    let crash_deletes = changes
        .iter()
        .filter(|c| c.put.is_none() && !released.contains(&(c.key.clone(), c.rev)))
        .count();
    let (gap, gap_at) = longest_unconfirmed(&life);
    let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
    println!(
        "cluster_jepsen: {} operations: {} admits ({admitted} admitted, {late} of them \
         acknowledged late by a retry, {refused} refused by the policy, {cut_off} cut off, \
         {unknown} indeterminate), {releases} releases; {conflicts} conflicts retried, \
         {new_leases} leases renewed too late",
        ops.len(),
        admits.clone().count(),
    );
    println!(
        "cluster_jepsen: nemesis: {} etcd member kills ({} losing the quorum), {} node \
         crashes, {} policy changes",
        n(&nemesis.member_kills),
        n(&nemesis.quorum_losses),
        n(&nemesis.node_crashes),
        n(&nemesis.policy_changes)
    );
    println!(
        "cluster_jepsen: etcd history: {} changes over {} revisions, {crash_deletes} \
         reservations removed by a crash (a lease expiring, or the node clearing them on \
         its return); at most {} below alice \
         (revision {}), {} MB below alice:team (revision {}); at most {proved_max} proved alive \
         at once by the operations",
        changes.len(),
        r.revisions,
        r.max_alice.0,
        r.max_alice.1,
        r.max_team_mb.0,
        r.max_team_mb.1,
    );
    println!(
        "cluster_jepsen: longest a node went without its lease confirmed: {:.3} s (from {:.3} s)",
        gap.as_secs_f64(),
        gap_at.as_secs_f64()
    );
    for (t, what) in hist.nemesis.lock().unwrap().iter() {
        println!("  {:>7.3}s {what}", t.as_secs_f64());
    }

    if !failures.is_empty() {
        let shown: Vec<&String> = failures.iter().take(10).collect();
        let mut msg = format!("seed {seed}: {} violation(s); the first:\n", failures.len());
        for f in shown {
            msg += &format!("- {f}\n");
        }
        // The operations on the names the violations mention (all of
        // them if they mention none).
        let named = |op: &&Op| match &op.act {
            Act::Admit { name, .. } | Act::Release { name } => {
                failures.iter().take(10).any(|f| f.contains(name.as_str()))
            }
            Act::Connect | Act::NewLease => true,
        };
        let mut excerpt: Vec<&Op> = ops.iter().filter(named).collect();
        if excerpt
            .iter()
            .all(|op| matches!(op.act, Act::Connect | Act::NewLease))
        {
            excerpt = ops.iter().collect();
        }
        msg += "operations (node, run, what, invoked..completed, outcome):\n";
        for op in excerpt {
            msg += &format!(
                "  n{} #{} {:?} {:?}..{:?} {:?} {}\n",
                op.node, op.inst, op.act, op.invoked, op.completed, op.outcome, op.detail
            );
        }
        panic!("{msg}");
    }
    assert!(
        admitted >= 5,
        "seed {seed}: only {admitted} admissions succeeded"
    );
    assert!(refused >= 1, "seed {seed}: the policy refused nothing");
    assert!(
        n(&nemesis.member_kills) >= 1 && n(&nemesis.node_crashes) >= 1,
        "seed {seed}: the nemesis did too little"
    );
    assert!(
        r.max_alice.0 >= 1,
        "seed {seed}: etcd's history shows no reservation"
    );
}
