//! `tt-bench cluster`: admission through etcd (issue 22), against the
//! single-host state directory in the same run, and how transaction
//! conflicts grow with concurrent creators on one subtree.
//!
//! The bench first moves itself into a network namespace of its own
//! (`unshare(CLONE_NEWNET)`, which needs root) and brings its loopback up
//! there; then it starts 3 etcd members on 127.0.0.1 (member `i` serves
//! clients on `BASE + 10 i` and peers on `BASE + 10 i + 1`), with their
//! data in `$TT_CLUSTER_BENCH_DIR` (default `target/tt-cluster-bench`),
//! on the repository's file system, where etcd fsyncs its log on every
//! commit. Every member is SIGKILLed when the bench ends, after an error
//! too (and by the kernel if the bench dies: `PR_SET_PDEATHSIG`), and its
//! data removed; the namespace goes with the last of them. Nothing
//! touches the machine's network.
//!
//! Every admission claims 8 MB and no disk, named below a path whose
//! policy allows a million unikernels (never refused). Measured, in order:
//!
//! 1. **state dir**: [`StateDir::admit`] and dropping the
//!    [`tt_host::admission::Admission`] (its release) on a scratch state directory, sequentially (latency),
//!    and from 3 threads on 3 subtrees at once for a fixed time
//!    (throughput): what a single host pays.
//! 2. **floor**: a 4 KiB overwrite + fdatasync of a file in etcd's data
//!    directory; one etcd put (one raft commit) and one get (a
//!    linearizable read: a quorum round, no disk write), sequentially from
//!    one client: what an admission is made of.
//! 3. **cluster, sequential**: [`Cluster::admit`] then
//!    [`Cluster::release`] of one name from one node, timed apart. An
//!    admit is a read transaction and a conditional write transaction;
//!    a release a get of the reservation, a get per path of the node's
//!    usage, and a write transaction.
//! 4. **cluster, throughput**: 3 nodes (3 [`Cluster`]s, distinct node ids,
//!    as 3 tt-host daemons) admitting and releasing concurrently, each on
//!    a subtree of its own (`t0`, `t1`, `t2`), for a fixed time.
//! 5. **contention**: k creators, k = 1, 2, 4, 8, 16, each a node of its
//!    own, all admitting and releasing below ONE path (`alice:uJ`), a
//!    fixed number of times each; the conflicts are the nodes' `conflicts`
//!    counters (a write transaction whose compare failed and was tried
//!    again). Then 16 tasks spread over 3 nodes: a node admits one at a
//!    time, so its tasks queue rather than conflict.
//! 6. **tmpfs**: 2 to 4 again with a new etcd whose data is on /dev/shm,
//!    where an fsync costs nothing: the difference is the disk's share.
//!
//! Each [`Cluster`] balances its requests over the 3 members (the
//! etcd-client crate's balancer); its lease is kept alive every 10 s. For
//! 3 to 5, the CPU time of etcd's members and of the bench per admit +
//! release is reported too: on a small machine it bounds the throughput.
//! No target: the issue asks for the comparison (docs/BENCHMARKS.md).

use crate::stats::{fmt, summarize};
use crate::{Opts, Verdict};
use etcd_client::{Client, ConnectOptions};
use std::fs::File;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path as FsPath, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tt_host::admission::{create_private_dir, host_cpus, StateDir};
use tt_host::cluster::check::Claim;
use tt_host::cluster::store::{Cluster, ClusterError, Config};
use tt_host::resources::{Name, PartialPolicy, Path, PolicyChange, Unikernel};

const ETCD: &str = "/usr/bin/etcd";
const MEMBERS: usize = 3;
/// Sequential admit + release pairs (`--iters`), after [`WARMUP`] untimed.
const DEFAULT_OPS: u64 = 300;
const WARMUP: usize = 20;
/// How long each throughput measurement runs.
const THROUGHPUT_FOR: Duration = Duration::from_secs(5);
/// Concurrent creators on one subtree, and admit + release pairs each.
const CREATORS: [usize; 5] = [1, 2, 4, 8, 16];
const OPS_EACH: usize = 40;
/// What every admission claims.
const CLAIM: Claim = Claim {
    memory_mb: 8,
    block_mb: 0,
};
/// The nodes' lease, and how often it is renewed.
const TTL: Duration = Duration::from_secs(30);
const KEEP_ALIVE_EVERY: Duration = Duration::from_secs(10);
/// The subtrees the bench admits below, each with a policy that never
/// refuses: the contended one, and one per throughput node or thread.
const SUBTREES: [&str; 4] = ["alice", "t0", "t1", "t2"];
const LIMIT: u32 = 1_000_000;

fn cvt(r: libc::c_int, what: &str) -> Result<(), String> {
    if r < 0 {
        return Err(format!("{what}: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Move this process (one thread so far) into a fresh network namespace
/// and bring its loopback up: etcd's members and clients talk there only.
fn own_netns() -> Result<(), String> {
    // SAFETY: unshare takes no pointers; it moves the calling thread (the
    // only one yet) into a new network namespace, which later threads and
    // children inherit.
    let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    cvt(r, "cannot make a network namespace (unshare)").map_err(|e| {
        format!(
            "{e}\n  tt-bench cluster needs root: it runs etcd in a network namespace of its own"
        )
    })?;
    tt_host::envnet::set_link_up("lo", true).map_err(|e| format!("in the bench's namespace: {e}"))
}

/// The file system that holds `p`, by name (what fsync costs there).
fn fs_type(p: &FsPath) -> String {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(p.as_os_str().as_bytes()) else {
        return "unknown".into();
    };
    // SAFETY: statfs is plain data; statfs() reads the NUL-terminated
    // path and writes at most one struct statfs into `s`.
    let mut s: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statfs(c.as_ptr(), &mut s) } != 0 {
        return "unknown".into();
    }
    match s.f_type {
        0x0102_1994 => "tmpfs".into(),
        0xEF53 => "ext4".into(),
        0x5846_5342 => "xfs".into(),
        0x9123_683E => "btrfs".into(),
        0x794C_7630 => "overlayfs".into(),
        x => format!("file system type 0x{x:x}"),
    }
}

/// Sequential 4 KiB overwrites + fdatasync of one file in `dir` (made
/// for it, then removed): what one fsync of etcd's log costs there.
fn fdatasyncs(dir: &FsPath, ops: usize) -> Result<Vec<Duration>, String> {
    use std::os::unix::fs::FileExt;
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let path = dir.join("fdatasync-probe");
    let err = |e: std::io::Error| format!("{}: {e}", path.display());
    let f = File::create(&path).map_err(err)?;
    let block = [0x5au8; 4096];
    let mut out = Vec::with_capacity(ops);
    for i in 0..WARMUP + ops {
        let t = Instant::now();
        f.write_all_at(&block, 0).map_err(err)?;
        f.sync_data().map_err(err)?;
        if i >= WARMUP {
            out.push(t.elapsed());
        }
    }
    drop(f);
    let _ = std::fs::remove_file(&path);
    Ok(out)
}

/// CPU time (user + system) used so far by etcd's members and by the
/// bench itself (its client side: gRPC, JSON, the admission logic).
#[derive(Clone, Copy, Default)]
struct Cpu {
    etcd: Duration,
    bench: Duration,
}

impl Cpu {
    fn now(pids: &[u32]) -> Cpu {
        // SAFETY: sysconf takes no pointers.
        let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        let mut ticks = 0;
        for pid in pids {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // After the command's ")": state is field 3, utime 14, stime 15.
            let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
            let f: Vec<u64> = rest
                .split_whitespace()
                .skip(11)
                .take(2)
                .filter_map(|x| x.parse().ok())
                .collect();
            ticks += f.iter().sum::<u64>();
        }
        // SAFETY: rusage is plain data; getrusage writes one into `ru`.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
        let tv = |t: libc::timeval| {
            Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
        };
        Cpu {
            etcd: Duration::from_nanos(ticks * 1_000_000_000 / tck),
            bench: tv(ru.ru_utime) + tv(ru.ru_stime),
        }
    }

    /// What was used since `self`, per op ("etcd+bench ms").
    fn per_op(self, pids: &[u32], ops: u64) -> String {
        let now = Cpu::now(pids);
        let ms = |d: Duration| d.as_secs_f64() * 1e3 / ops.max(1) as f64;
        format!(
            "{:.2}+{:.2} ms",
            ms(now.etcd.saturating_sub(self.etcd)),
            ms(now.bench.saturating_sub(self.bench))
        )
    }
}

/// A running 3-member etcd cluster on loopback. Dropped, it SIGKILLs its
/// members, waits for them and removes their data.
struct Etcd {
    children: Vec<Child>,
    dir: PathBuf,
    endpoints: Vec<String>,
}

impl Etcd {
    /// Start the members on ports from `base`, data and logs in `dir`
    /// (made afresh). [`Etcd::wait_healthy`] waits for them to serve.
    fn start(dir: &FsPath, base: u16) -> Result<Etcd, String> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let client = |i: usize| format!("http://127.0.0.1:{}", base + 10 * i as u16);
        let peer = |i: usize| format!("http://127.0.0.1:{}", base + 10 * i as u16 + 1);
        let initial = (0..MEMBERS)
            .map(|i| format!("m{i}={}", peer(i)))
            .collect::<Vec<_>>()
            .join(",");
        let mut etcd = Etcd {
            children: Vec::new(),
            dir: dir.to_path_buf(),
            endpoints: (0..MEMBERS).map(client).collect(),
        };
        for i in 0..MEMBERS {
            let log = dir.join(format!("m{i}.log"));
            let log = File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
            let log2 = log.try_clone().map_err(|e| e.to_string())?;
            let mut cmd = Command::new(ETCD);
            // The caller's ETCD_* settings would change what etcd does.
            for (k, _) in std::env::vars_os() {
                if k.to_string_lossy().starts_with("ETCD") {
                    cmd.env_remove(k);
                }
            }
            cmd.arg(format!("--name=m{i}"))
                .arg(format!(
                    "--data-dir={}",
                    dir.join(format!("m{i}.etcd")).display()
                ))
                .arg(format!("--initial-cluster={initial}"))
                .arg("--initial-cluster-state=new")
                .arg(format!(
                    "--initial-cluster-token=tt-bench-{}",
                    std::process::id()
                ))
                .arg(format!("--listen-peer-urls={}", peer(i)))
                .arg(format!("--initial-advertise-peer-urls={}", peer(i)))
                .arg(format!("--listen-client-urls={}", client(i)))
                .arg(format!("--advertise-client-urls={}", client(i)))
                .args(["--logger=zap", "--log-outputs=stderr"])
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(log2);
            // SAFETY: the closure runs in the child between fork and exec
            // and only calls prctl, which is async-signal-safe.
            unsafe {
                cmd.pre_exec(|| {
                    // Killed with the bench, however it ends.
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            let child = cmd
                .spawn()
                .map_err(|e| format!("cannot start etcd member {i} ({ETCD}): {e}"))?;
            etcd.children.push(child);
        }
        Ok(etcd)
    }

    /// Wait until every member takes a write (which needs a quorum).
    async fn wait_healthy(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let mut last = None;
            for ep in &self.endpoints {
                if let Err(e) = probe(ep).await {
                    last = Some(format!("{ep}: {e}"));
                    break;
                }
            }
            let Some(last) = last else {
                return Ok(());
            };
            for (i, c) in self.children.iter_mut().enumerate() {
                if let Ok(Some(st)) = c.try_wait() {
                    return Err(format!("etcd member {i} exited ({st})\n{}", self.logs()));
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "etcd is not healthy after 20 s ({last})\n{}",
                    self.logs()
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The last lines of every member's log, for error messages.
    fn logs(&self) -> String {
        let mut out = String::new();
        for i in 0..MEMBERS {
            let path = self.dir.join(format!("m{i}.log"));
            let mut text = String::new();
            let _ = File::open(&path).and_then(|mut f| f.read_to_string(&mut text));
            let lines: Vec<&str> = text.lines().collect();
            out += &format!("--- {}\n", path.display());
            for l in &lines[lines.len().saturating_sub(15)..] {
                out += l;
                out.push('\n');
            }
        }
        out
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn connect_options() -> ConnectOptions {
    ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(1))
        .with_timeout(Duration::from_secs(3))
}

/// One write through member `ep` alone.
async fn probe(ep: &str) -> Result<(), etcd_client::Error> {
    let mut c = Client::connect([ep], Some(connect_options())).await?;
    c.put("/tt-bench/probe", "1", None).await?;
    Ok(())
}

/// Median, p99 and mean of some samples.
struct Lat {
    median: Duration,
    p99: Duration,
    mean: Duration,
}

fn lat(samples: &[Duration]) -> Lat {
    let mut s = samples.to_vec();
    s.sort();
    let p99 = s[(s.len() * 99).div_ceil(100) - 1];
    Lat {
        median: summarize(&s).median,
        p99,
        mean: s.iter().sum::<Duration>() / s.len() as u32,
    }
}

fn lat_row(what: &str, samples: &[Duration]) {
    let l = lat(samples);
    println!(
        "  {what:<44} {:>10} {:>10} {:>10}",
        fmt(l.median),
        fmt(l.p99),
        fmt(l.mean)
    );
}

fn name(s: &str) -> Result<Name, String> {
    s.parse().map_err(|e| format!("{s}: {e}"))
}

fn path(s: &str) -> Result<Path, String> {
    s.parse().map_err(|e| format!("{s}: {e}"))
}

fn unlimited() -> PartialPolicy {
    PartialPolicy {
        unikernels: Some(LIMIT),
        ..PartialPolicy::default()
    }
}

/// The single host: sequential admit + release latencies, and the
/// admissions per second of 3 threads on 3 subtrees.
fn state_dir(dir: &FsPath, ops: usize) -> Result<(Vec<Duration>, f64), String> {
    let _ = std::fs::remove_dir_all(dir);
    create_private_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let sd = StateDir::resolve(Some(dir));
    for p in SUBTREES {
        let change = PolicyChange {
            set: unlimited(),
            ..PolicyChange::default()
        };
        sd.set_policy(&path(p)?, &change)
            .map_err(|e| e.to_string())?;
    }
    let uk = Unikernel {
        memory_mb: CLAIM.memory_mb,
        cpus: host_cpus(),
        block_mb: 0,
        bridges: Default::default(),
    };
    let seq = name("alice:seq")?;
    let mut lat = Vec::with_capacity(ops);
    for i in 0..WARMUP + ops {
        let t = Instant::now();
        let a = sd
            .admit(Some(&seq), "x", uk.clone())
            .map_err(|e| e.to_string())?;
        drop(a);
        if i >= WARMUP {
            lat.push(t.elapsed());
        }
    }
    let start = Instant::now();
    let counts = std::thread::scope(|s| {
        let threads: Vec<_> = (0..3)
            .map(|j| {
                let (sd, uk) = (&sd, uk.clone());
                s.spawn(move || -> Result<u64, String> {
                    let n = name(&format!("t{j}:u{j}"))?;
                    let mut done = 0;
                    while start.elapsed() < THROUGHPUT_FOR {
                        let a = sd
                            .admit(Some(&n), "x", uk.clone())
                            .map_err(|e| e.to_string())?;
                        drop(a);
                        done += 1;
                    }
                    Ok(done)
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| {
                t.join()
                    .map_err(|_| "a state dir thread panicked".to_string())?
            })
            .collect::<Result<Vec<u64>, String>>()
    })?;
    let secs = start.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(dir);
    Ok((lat, counts.iter().sum::<u64>() as f64 / secs))
}

/// A node: a [`Cluster`] with its lease kept alive.
struct Node {
    c: Arc<Cluster>,
    keeper: tokio::task::JoinHandle<()>,
}

impl Drop for Node {
    fn drop(&mut self) {
        self.keeper.abort();
    }
}

async fn node(endpoints: &[String], id: &str) -> Result<Node, String> {
    let cfg = Config {
        endpoints: endpoints.to_vec(),
        node: id.to_string(),
        prefix: "/tt-host".into(),
        ttl: TTL,
        keep_on_partition: false,
        tls: None,
    };
    let c = Arc::new(
        Cluster::connect(cfg)
            .await
            .map_err(|e| format!("node {id}: {e}"))?,
    );
    let k = c.clone();
    let keeper = tokio::spawn(async move {
        loop {
            tokio::time::sleep(KEEP_ALIVE_EVERY).await;
            let _ = k.keep_alive().await;
        }
    });
    Ok(Node { c, keeper })
}

/// Sequential puts and gets of one key from one client.
async fn floor(endpoints: &[String], ops: usize) -> Result<(Vec<Duration>, Vec<Duration>), String> {
    let err = |e: etcd_client::Error| format!("etcd: {e}");
    let mut c = Client::connect(endpoints, Some(connect_options()))
        .await
        .map_err(err)?;
    let (mut puts, mut gets) = (Vec::new(), Vec::new());
    for i in 0..WARMUP + ops {
        let t = Instant::now();
        c.put("/tt-bench/floor", i.to_string(), None)
            .await
            .map_err(err)?;
        if i >= WARMUP {
            puts.push(t.elapsed());
        }
    }
    for i in 0..WARMUP + ops {
        let t = Instant::now();
        c.get("/tt-bench/floor", None).await.map_err(err)?;
        if i >= WARMUP {
            gets.push(t.elapsed());
        }
    }
    Ok((puts, gets))
}

/// Sequential admit and release latencies of one name from one node.
struct Seq {
    admit: Vec<Duration>,
    release: Vec<Duration>,
    both: Vec<Duration>,
}

async fn sequential(c: &Cluster, ops: usize) -> Result<Seq, String> {
    let n = name("alice:seq")?;
    let mut s = Seq {
        admit: Vec::new(),
        release: Vec::new(),
        both: Vec::new(),
    };
    for i in 0..WARMUP + ops {
        let t0 = Instant::now();
        c.admit(&n, CLAIM).await.map_err(|e| format!("{n}: {e}"))?;
        let t1 = Instant::now();
        c.release(&n).await.map_err(|e| format!("{n}: {e}"))?;
        let t2 = Instant::now();
        if i >= WARMUP {
            s.admit.push(t1 - t0);
            s.release.push(t2 - t1);
            s.both.push(t2 - t0);
        }
    }
    Ok(s)
}

#[derive(Clone, Copy)]
enum Until {
    /// This many admit + release pairs per task.
    Ops(usize),
    /// Until this long after the start.
    Time(Duration),
}

/// What a concurrent load did.
struct Load {
    ops: u64,
    conflicts: u64,
    /// Admissions that gave up after 64 conflicts in a row (`Contended`).
    gave_up: u64,
    elapsed: Duration,
    /// Each admit + release pair, retries included.
    lat: Vec<Duration>,
}

impl Load {
    fn per_s(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }
    fn conflicts_per_op(&self) -> f64 {
        self.conflicts as f64 / self.ops.max(1) as f64
    }
}

/// `tasks` tasks, task j on node `j % nodes.len()`, each admitting and
/// releasing `SUBTREE:uJ` (SUBTREE = `subtree(j)`) over and over.
async fn load(
    nodes: &[Node],
    tasks: usize,
    subtree: impl Fn(usize) -> String,
    until: Until,
) -> Result<Load, String> {
    let conflicts = || -> u64 {
        nodes
            .iter()
            .map(|n| n.c.conflicts.load(Ordering::Relaxed))
            .sum()
    };
    let before = conflicts();
    let start = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for j in 0..tasks {
        let c = nodes[j % nodes.len()].c.clone();
        let n = name(&format!("{}:u{j}", subtree(j)))?;
        set.spawn(async move {
            let (mut lat, mut gave_up) = (Vec::new(), 0u64);
            let mut i = 0;
            loop {
                match until {
                    Until::Ops(k) if i >= k => break,
                    Until::Time(d) if start.elapsed() >= d => break,
                    _ => {}
                }
                i += 1;
                let t = Instant::now();
                match c.admit(&n, CLAIM).await {
                    Ok(_) => {}
                    Err(ClusterError::Contended) => {
                        gave_up += 1;
                        continue;
                    }
                    Err(e) => return Err(format!("{n}: {e}")),
                }
                c.release(&n).await.map_err(|e| format!("{n}: {e}"))?;
                lat.push(t.elapsed());
            }
            Ok::<_, String>((lat, gave_up))
        });
    }
    let mut out = Load {
        ops: 0,
        conflicts: 0,
        gave_up: 0,
        elapsed: Duration::ZERO,
        lat: Vec::new(),
    };
    while let Some(r) = set.join_next().await {
        let (lat, gave_up) = r.map_err(|e| format!("a creator task failed: {e}"))??;
        out.ops += lat.len() as u64;
        out.lat.extend(lat);
        out.gave_up += gave_up;
    }
    out.elapsed = start.elapsed();
    out.conflicts = conflicts() - before;
    if out.lat.is_empty() {
        return Err("no admission went through".into());
    }
    Ok(out)
}

/// What one etcd cluster measured.
struct EtcdRun {
    fs: String,
    fdatasyncs: Vec<Duration>,
    /// CPU per admit + release ("etcd+bench ms") of `seq`, `throughput`
    /// and each `contention` row.
    seq_cpu: String,
    throughput_cpu: String,
    contention_cpu: Vec<String>,
    puts: Vec<Duration>,
    gets: Vec<Duration>,
    seq: Seq,
    throughput: Load,
    /// (creators, nodes, load) on the contended subtree.
    contention: Vec<(usize, usize, Load)>,
}

async fn on_etcd(dir: &FsPath, base: u16, ops: usize, contend: bool) -> Result<EtcdRun, String> {
    let mut etcd = Etcd::start(dir, base)?;
    etcd.wait_healthy().await?;
    let fs = fs_type(dir);
    let fdatasyncs = fdatasyncs(dir, ops)?;
    let eps = etcd.endpoints.clone();
    let nodes = vec![
        node(&eps, "n0").await?,
        node(&eps, "n1").await?,
        node(&eps, "n2").await?,
    ];
    for p in SUBTREES {
        nodes[0]
            .c
            .put_policy(&path(p)?, Some(&unlimited()))
            .await
            .map_err(|e| e.to_string())?;
    }
    let (puts, gets) = floor(&eps, ops).await?;
    let pids: Vec<u32> = etcd.children.iter().map(Child::id).collect();
    let cpu = Cpu::now(&pids);
    let seq = sequential(&nodes[0].c, ops).await?;
    let seq_cpu = cpu.per_op(&pids, seq.both.len() as u64);
    let cpu = Cpu::now(&pids);
    let throughput = load(&nodes, 3, |j| format!("t{j}"), Until::Time(THROUGHPUT_FOR)).await?;
    let throughput_cpu = cpu.per_op(&pids, throughput.ops);
    let mut contention_cpu = Vec::new();
    let mut contention = Vec::new();
    if contend {
        for k in CREATORS {
            let mut own = Vec::new();
            for i in 0..k {
                own.push(node(&eps, &format!("k{k}c{i}")).await?);
            }
            let cpu = Cpu::now(&pids);
            let l = load(&own, k, |_| "alice".into(), Until::Ops(OPS_EACH)).await?;
            contention_cpu.push(cpu.per_op(&pids, l.ops));
            contention.push((k, k, l));
        }
        let cpu = Cpu::now(&pids);
        let l = load(&nodes, 16, |_| "alice".into(), Until::Ops(OPS_EACH)).await?;
        contention_cpu.push(cpu.per_op(&pids, l.ops));
        contention.push((16, 3, l));
    }
    drop(nodes);
    drop(etcd);
    Ok(EtcdRun {
        fs,
        fdatasyncs,
        seq_cpu,
        throughput_cpu,
        contention_cpu,
        puts,
        gets,
        seq,
        throughput,
        contention,
    })
}

fn etcd_version() -> String {
    Command::new(ETCD)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            let s = String::from_utf8_lossy(&o.stdout).into_owned();
            s.lines()
                .next()
                .and_then(|l| l.strip_prefix("etcd Version: "))
                .map(str::to_string)
        })
        .unwrap_or_else(|| "version unknown".into())
}

pub fn run(o: &Opts) -> Result<Vec<Verdict>, String> {
    let ops = o.iters.unwrap_or(DEFAULT_OPS).max(10) as usize;
    if !FsPath::new(ETCD).is_file() {
        return Err(format!(
            "{ETCD} is missing: tt-bench cluster runs a 3-member etcd cluster \
             (apt-get install etcd-server)"
        ));
    }
    own_netns()?;
    let dir = std::env::var_os("TT_CLUSTER_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::root().join("target/tt-cluster-bench"));
    // A fixed name: what a killed run left is removed by the next one.
    let shm = PathBuf::from("/dev/shm/tt-cluster-bench");

    let (sd_lat, sd_per_s) = state_dir(&dir.join("state"), ops)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    let disk = rt.block_on(on_etcd(&dir.join("etcd"), 2379, ops, true))?;
    let tmpfs = rt.block_on(on_etcd(&shm, 3379, ops, false))?;
    let _ = std::fs::remove_dir_all(&dir);

    println!(
        "cluster: {MEMBERS} etcd members (etcd {}) on 127.0.0.1 in the bench's network namespace",
        etcd_version()
    );
    println!(
        "  etcd data: {} ({}), then {} ({}); state dir on {}",
        dir.join("etcd").display(),
        disk.fs,
        shm.display(),
        tmpfs.fs,
        fs_type(&crate::root())
    );
    println!(
        "  every admission claims 8 MB, no disk, below a path whose policy allows {LIMIT} unikernels"
    );
    println!();
    println!(
        "sequential, one node, {ops} each after {WARMUP} untimed:  {:>10} {:>10} {:>10}",
        "median", "p99", "mean"
    );
    lat_row("state dir: admit + release", &sd_lat);
    for (what, r) in [("disk", &disk), ("tmpfs", &tmpfs)] {
        lat_row(&format!("{what}: 4 KiB write + fdatasync"), &r.fdatasyncs);
        lat_row(&format!("etcd on {what}: put (one raft commit)"), &r.puts);
        lat_row(&format!("etcd on {what}: get (linearizable)"), &r.gets);
        lat_row(&format!("etcd on {what}: cluster admit"), &r.seq.admit);
        lat_row(&format!("etcd on {what}: cluster release"), &r.seq.release);
        lat_row(
            &format!("etcd on {what}: cluster admit + release"),
            &r.seq.both,
        );
    }
    let med = |s: &[Duration]| lat(s).median.as_secs_f64();
    println!(
        "  admit + release through etcd: {:.0}x the state dir's on disk, {:.0}x on tmpfs (medians)",
        med(&disk.seq.both) / med(&sd_lat),
        med(&tmpfs.seq.both) / med(&sd_lat)
    );
    println!(
        "  CPU per cluster admit + release (etcd's 3 members + the bench): {} on disk, {} on tmpfs",
        disk.seq_cpu, tmpfs.seq_cpu
    );
    println!();
    println!(
        "throughput, 3 nodes (threads) on subtrees t0, t1, t2, {} s:  {:>10} {:>12} {:>16}",
        THROUGHPUT_FOR.as_secs(),
        "ops/s",
        "conflicts/op",
        "CPU/op etcd+tt"
    );
    println!(
        "  {:<44} {:>10.0} {:>12} {:>16}",
        "state dir (3 threads)", sd_per_s, "-", "-"
    );
    for (what, r) in [("disk", &disk), ("tmpfs", &tmpfs)] {
        println!(
            "  {:<44} {:>10.0} {:>12.2} {:>16}",
            format!("etcd on {what} (3 nodes)"),
            r.throughput.per_s(),
            r.throughput.conflicts_per_op(),
            r.throughput_cpu
        );
    }
    println!();
    println!(
        "contention: k creators admitting + releasing alice:uJ, {OPS_EACH} each, etcd on disk"
    );
    println!(
        "  {:>8} {:>6} {:>6} {:>10} {:>13} {:>8} {:>8} {:>10} {:>10} {:>16}",
        "creators",
        "nodes",
        "ops",
        "conflicts",
        "conflicts/op",
        "gave up",
        "ops/s",
        "median",
        "p99",
        "CPU/op etcd+tt"
    );
    for ((k, n, l), cpu) in disk.contention.iter().zip(&disk.contention_cpu) {
        let t = lat(&l.lat);
        println!(
            "  {k:>8} {n:>6} {:>6} {:>10} {:>13.2} {:>8} {:>8.0} {:>10} {:>10} {cpu:>16}",
            l.ops,
            l.conflicts,
            l.conflicts_per_op(),
            l.gave_up,
            l.per_s(),
            fmt(t.median),
            fmt(t.p99)
        );
    }
    println!("  (median and p99: one creator's admit + release, its retries included)");
    Ok(vec![Verdict::Reported])
}
