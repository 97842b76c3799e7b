//! The unikernels the daemon keeps: each one's `tt-host run` process,
//! started, watched, restarted by its rule, stopped, and re-adopted when
//! the daemon itself starts again.
//!
//! A unit's process is watched through a process descriptor (pidfd),
//! which the daemon can open for a process it did not start: after a
//! daemon restart, the unikernels it had started are re-adopted by the
//! pid and start time their stats file records, and their end is read
//! from that file (tt-host run records its own end there), since only a
//! parent can read an exit status from the kernel.

#[cfg(feature = "cluster")]
mod clpools;
mod envops;

pub use envops::EnvRequest;

use super::desired::{Desired, Spec};
use super::envs::{EnvState, EnvStore};
use super::pools::PoolState;
use super::proto::{UnitInfo, UnitStats};
use super::sys::{self, now_ns};
use super::unitfiles::{self, Console, End};
use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::{oneshot, watch};

/// The daemon's settings that the supervisor uses.
#[derive(Debug, Clone)]
pub struct Config {
    pub state_dir: PathBuf,
    pub runtime_dir: PathBuf,
    /// The `tt-host` executable that runs each unikernel.
    pub exe: PathBuf,
    /// Bytes of each unikernel's console ring.
    pub console_size: u64,
    /// The first restart's delay; each restart in a row doubles it, up to
    /// `backoff_max`. An instance that ran `backoff_max` or longer before
    /// it failed starts the series again.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// How long a stop waits after SIGTERM before SIGKILL.
    pub stop_timeout: Duration,
    /// A unikernel is refused if its pool would be empty within this.
    pub pool_min_run: Duration,
    /// A pool's emptying is logged this long before.
    pub pool_warning: Duration,
    /// The least time between two management operations (extend, stop,
    /// start, destroy) on one environment.
    pub env_mgmt_interval: Duration,
}

/// The largest tt-host log (its own messages) kept per unikernel; a
/// larger one is emptied when the unikernel starts again.
const LOG_MAX: u64 = 64 << 10;

/// What a unit is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Started; tt-host run has not yet said that the guest runs.
    Starting,
    Running,
    /// Being stopped (destroy or restart).
    Stopping,
    /// Ended, and not to be restarted.
    Exited,
    /// Ended, to be restarted at `restart_at`.
    Restarting,
    /// Saved and stopped with its environment (or held while its
    /// environment is being undone).
    Stopped,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Running => "running",
            State::Stopping => "stopping",
            State::Exited => "exited",
            State::Restarting => "restarting",
            State::Stopped => "stopped",
        }
    }
}

struct Instance {
    pid: u32,
    pidfd: Arc<OwnedFd>,
    started_ns: u64,
    ended: watch::Receiver<Option<End>>,
}

struct Unit {
    spec: Spec,
    state: State,
    instance: Option<Instance>,
    last_end: Option<End>,
    restarts: u32,
    /// Restarts in a row, for the backoff.
    consecutive: u32,
    restart_at: Option<u64>,
    /// Bumped by destroy and restart: a watcher or timer of an older
    /// generation leaves the unit alone.
    gen: u64,
    console: Option<Arc<Console>>,
    /// Why the daemon stopped it, if it did on its own (its pool was
    /// empty, the node was cut off from its cluster): shown as its end.
    stopped_because: Option<String>,
    /// The next start resumes the guest saved in this directory
    /// (`tt-host restore`) instead of booting the image.
    restore_from: Option<PathBuf>,
}

impl Unit {
    fn new(spec: Spec, state: State) -> Unit {
        Unit {
            spec,
            state,
            instance: None,
            last_end: None,
            restarts: 0,
            consecutive: 0,
            restart_at: None,
            gen: 0,
            console: None,
            stopped_because: None,
            restore_from: None,
        }
    }
}

struct Inner {
    desired: Desired,
    units: BTreeMap<String, Unit>,
}

/// The supervisor: shared by every connection.
pub struct Supervisor {
    pub cfg: Config,
    inner: Mutex<Inner>,
    boot_id: String,
    /// The capacity pools (lock order: `inner`, then `pools`).
    pub pools: Mutex<PoolState>,
    /// Wakes the expiry timer when a pool's EmptyAt may have changed.
    pub pools_changed: tokio::sync::Notify,
    /// On a cluster node: pool admissions and the pool sync take turns
    /// (the sync compares this node's draws with the cluster's).
    #[cfg(feature = "cluster")]
    pool_sync: tokio::sync::Mutex<()>,
    /// Wakes the pool sync when a unikernel stopped drawing.
    pool_sync_wake: tokio::sync::Notify,
    /// The environments (lock order: `inner`, then `envs`).
    envs: Mutex<EnvStore>,
    /// This node's place in its cluster (`--cluster`).
    #[cfg(feature = "cluster")]
    pub cluster: std::sync::OnceLock<Arc<super::cluster::Node>>,
    /// Environment and disk operations, one at a time.
    env_ops: tokio::sync::Mutex<()>,
    /// Wakes the environments' timer when an end or a snapshot's expiry
    /// may have changed.
    envs_changed: tokio::sync::Notify,
    templates: crate::images::TemplateStore,
    snapshots: Mutex<crate::images::SnapshotStore>,
}

/// Does albatross's rule restart a unikernel that ended with `end`?
/// Never after a signal or a stop; never after exit 1 (a failure of the
/// tender itself) or 60-64 (MirageOS's command-line and configuration
/// errors); otherwise only with `--restart-on-fail`: on the codes it
/// lists, or without a list on any code but 0 (a clean exit is not a
/// failure).
pub fn should_restart(rule: &Option<Vec<u8>>, end: End) -> bool {
    let Some(codes) = rule else { return false };
    match end {
        End::Exited(1) | End::Exited(60..=64) => false,
        End::Exited(c) if codes.is_empty() => c != 0,
        End::Exited(c) => codes.contains(&c),
        End::Signal(_) | End::Failed | End::Killed(_) => false,
    }
}

/// The delay before the restart after `consecutive` restarts in a row.
pub fn backoff(cfg: &Config, consecutive: u32) -> Duration {
    let factor = 1u32.checked_shl(consecutive.min(30)).unwrap_or(u32::MAX);
    cfg.backoff_min
        .checked_mul(factor)
        .unwrap_or(cfg.backoff_max)
        .min(cfg.backoff_max)
}

/// What a created or restarted unit's first moments gave.
pub struct Started {
    pub pid: u32,
    pub daemon_us: u64,
    pub persist_us: u64,
}

impl Supervisor {
    /// A unit's runtime directory (console, stats, tt-host's log).
    pub fn unit_dir(&self, name: &str) -> PathBuf {
        // Labels may be '.' or '..': the prefix keeps every name a plain
        // file name.
        self.cfg.runtime_dir.join("units").join(format!("u-{name}"))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Read the desired state and bring every unit back: re-adopt those
    /// still running, apply the restart rule to those that ended while
    /// the daemon was away, and start those that have no process this
    /// boot.
    pub fn start(cfg: Config) -> Result<Arc<Supervisor>, String> {
        let dir = cfg.state_dir.join("daemon");
        crate::admission::create_private_dir(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        crate::admission::create_private_dir(&cfg.runtime_dir.join("units"))
            .map_err(|e| format!("cannot create {}/units: {e}", cfg.runtime_dir.display()))?;
        let (desired, specs) =
            Desired::open(&dir.join("desired.log")).map_err(|e| e.to_string())?;
        let pools = PoolState::open(&dir, now_ns())?;
        let envs = EnvStore::open(&dir.join("envs.json"))?;
        let images = cfg.state_dir.join("images");
        crate::admission::create_private_dir(&images)
            .map_err(|e| format!("cannot create {}: {e}", images.display()))?;
        let templates = crate::images::TemplateStore::open(&images.join("templates"))
            .map_err(|e| e.to_string())?;
        let snapshots = crate::images::SnapshotStore::open(&images.join("snapshots"))
            .map_err(|e| e.to_string())?;
        envops::make_traversable(&cfg.state_dir, &images.join("runtime"))?;
        let sup = Arc::new(Supervisor {
            cfg,
            inner: Mutex::new(Inner {
                desired,
                units: BTreeMap::new(),
            }),
            boot_id: sys::boot_id(),
            pools: Mutex::new(pools),
            pools_changed: tokio::sync::Notify::new(),
            #[cfg(feature = "cluster")]
            pool_sync: tokio::sync::Mutex::new(()),
            pool_sync_wake: tokio::sync::Notify::new(),
            envs: Mutex::new(envs),
            #[cfg(feature = "cluster")]
            cluster: std::sync::OnceLock::new(),
            env_ops: tokio::sync::Mutex::new(()),
            envs_changed: tokio::sync::Notify::new(),
            templates,
            snapshots: Mutex::new(snapshots),
        });
        // The networks first: after a reboot their bridges and TAPs are
        // gone, and the unikernels need them.
        sup.restore_networks(&specs);
        for (name, spec) in specs {
            // A unikernel of an environment being undone, stopped, or
            // gone is not started here (envops::recover decides).
            let held = spec.env.as_ref().is_some_and(|e| {
                sup.envs()
                    .get(e)
                    .is_none_or(|e| e.state != EnvState::Running)
            });
            let mut unit = Unit::new(spec, State::Exited);
            let published = unitfiles::read_stats(&sup.unit_dir(&name).join("stats"));
            let mut start = false;
            match published {
                Err(_) => start = true,
                Ok(p) if p.boot_id != sup.boot_id => start = true,
                Ok(p) if p.end.is_none() && p.running => match sys::pidfd_open(p.pid) {
                    Ok(fd) => {
                        let started_ns = now_ns();
                        sup.watch(&name, &mut unit, p.pid, fd, started_ns, None, false);
                        unit.state = State::Running;
                        log::info!("{name}: re-adopted pid {}", p.pid);
                    }
                    Err(_) => unit.last_end = Some(End::Killed(None)),
                },
                Ok(p) if held => {
                    // Saved with its environment (or ended while it was
                    // being undone): no restart rule applies.
                    unit.last_end = p.end;
                    start = true;
                }
                Ok(p) => {
                    let end = p.end.unwrap_or(End::Killed(None));
                    unit.last_end = Some(end);
                    log::info!("{name}: ended while the daemon was away ({end})");
                    if should_restart(&unit.spec.restart_on_fail, end) {
                        sup.schedule_restart(&name, &mut unit, Duration::ZERO);
                    }
                }
            }
            if start && held {
                unit.state = State::Stopped;
                unit.restore_from = sup.saved_guest(&unit.spec);
            } else if start {
                match sup.spawn(&name, &mut unit) {
                    Ok(_) => log::info!("{name}: started (it had no process this boot)"),
                    Err(e) => {
                        log::warn!("{name}: cannot start: {e}");
                        unit.last_end = Some(End::Failed);
                    }
                }
            }
            if unit.state == State::Exited {
                sup.stop_drawing(&name);
            }
            sup.lock().units.insert(name, unit);
        }
        // A draw recorded for a unikernel the desired state does not have
        // (the daemon stopped between the two records) draws for nothing.
        let drawing = sup.pools().drawing_units();
        let phantoms: Vec<String> = (drawing.into_iter())
            .filter(|n| !sup.lock().units.contains_key(n))
            .collect();
        for n in phantoms {
            log::warn!("{n}: recorded as drawing from a pool, but not a unikernel here: dropped");
            sup.stop_drawing(&n);
        }
        Ok(sup)
    }

    /// Start a unit's process; its watcher updates the unit. Returns the
    /// pid and what tt-host run says of its start: ready, or the error it
    /// failed with.
    fn spawn(
        self: &Arc<Self>,
        name: &str,
        unit: &mut Unit,
    ) -> Result<(u32, oneshot::Receiver<Result<(), String>>), String> {
        let dir = self.unit_dir(name);
        crate::admission::create_private_dir(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        // A stats file left from an earlier instance would make a daemon
        // that restarts before the new one writes its own see that
        // earlier end.
        let _ = std::fs::remove_file(dir.join("stats"));
        let log_path = dir.join("tt-host.log");
        if std::fs::metadata(&log_path).is_ok_and(|m| m.len() > LOG_MAX) {
            let _ = std::fs::remove_file(&log_path);
        }
        let log = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&log_path)
                .map_err(|e| format!("cannot open {}: {e}", log_path.display()))?
        };
        let (ready_r, ready_w) = sys::pipe().map_err(|e| format!("cannot make a pipe: {e}"))?;
        let restore = unit.restore_from.take();
        let mut cmd = std::process::Command::new(&self.cfg.exe);
        cmd.arg(if restore.is_some() { "restore" } else { "run" })
            .arg(format!("--name={name}"))
            .arg(format!("--state-dir={}", self.cfg.state_dir.display()))
            .arg(format!("--console-log={}", dir.join("console").display()))
            .arg(format!("--console-log-size={}", self.cfg.console_size))
            .arg(format!("--stats-file={}", dir.join("stats").display()))
            .arg(format!("--control={}", dir.join("control").display()))
            .arg("--x-ready-fd=3");
        let o = &unit.spec.owner;
        if o.uid != 0 {
            let groups: Vec<String> = o.groups.iter().map(u32::to_string).collect();
            cmd.arg(format!(
                "--x-client={}:{}:{}",
                o.uid,
                o.gid,
                groups.join(",")
            ));
        }
        match restore {
            // tt-host restore takes run's options; the devices, image and
            // guest arguments are the saved guest's.
            Some(dir) => cmd.arg(dir),
            None => cmd.args(&unit.spec.args),
        };
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log);
        let w = ready_w.as_raw_fd();
        // SAFETY: between fork and exec the closure makes only
        // async-signal-safe calls (dup2, fcntl, setsid).
        unsafe {
            cmd.pre_exec(move || {
                if w == 3 {
                    if libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(w, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // Its own session: a signal to the daemon's process group
                // (^C in its terminal) does not reach the unikernels.
                libc::setsid();
                Ok(())
            })
        };
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.cfg.exe.display()))?;
        drop(ready_w);
        let pid = child.id();
        // The child is reaped through its pidfd (sys::reap), not `Child`.
        drop(child);
        let pidfd = sys::pidfd_open(pid).map_err(|e| format!("pidfd_open({pid}): {e}"))?;
        let (tx, rx) = oneshot::channel();
        self.watch(name, unit, pid, pidfd, now_ns(), Some((ready_r, tx)), true);
        unit.state = State::Starting;
        unit.restart_at = None;
        Ok((pid, rx))
    }

    /// Watch an instance: its readiness (if started here), then its end.
    #[allow(clippy::too_many_arguments)]
    fn watch(
        self: &Arc<Self>,
        name: &str,
        unit: &mut Unit,
        pid: u32,
        pidfd: OwnedFd,
        started_ns: u64,
        ready: Option<(OwnedFd, oneshot::Sender<Result<(), String>>)>,
        child: bool,
    ) {
        let pidfd = Arc::new(pidfd);
        let (ended_tx, ended_rx) = watch::channel(None);
        unit.instance = Some(Instance {
            pid,
            pidfd: pidfd.clone(),
            started_ns,
            ended: ended_rx,
        });
        let gen = unit.gen;
        let sup = self.clone();
        let name = name.to_string();
        tokio::spawn(async move {
            let mut reply = None;
            if let Some((fd, tx)) = ready {
                let ok = read_ready(fd).await;
                if ok {
                    sup.set_running(&name, gen);
                    let _ = tx.send(Ok(()));
                } else {
                    reply = Some(tx);
                }
            }
            // SAFETY: the descriptor is the pidfd that the Arc keeps open
            // for the AsyncFd's whole life (DupFd holds a clone).
            let afd = unsafe {
                AsyncFd::register_with_interest(DupFd(pidfd.clone()), Interest::READABLE)
            };
            let end = match afd {
                Ok(afd) => {
                    let _ = afd.readable().await;
                    sup.end_of(&name, &pidfd, child)
                }
                Err(e) => {
                    log::warn!("{name}: cannot watch pid {pid}: {e}");
                    End::Killed(None)
                }
            };
            let _ = ended_tx.send(Some(end));
            if let Some(tx) = reply {
                let _ = tx.send(Err(sup.failure_message(&name, end)));
            }
            sup.on_end(&name, gen, end, started_ns);
            sup.cluster_reconcile_soon();
        });
    }

    /// How the instance `pidfd` names ended: as it recorded, else as the
    /// kernel says (for a child of the daemon's), else killed.
    fn end_of(&self, name: &str, pidfd: &OwnedFd, child: bool) -> End {
        let waited = if child {
            sys::reap(pidfd)
        } else {
            sys::Waited::Unknown
        };
        let recorded = unitfiles::read_stats(&self.unit_dir(name).join("stats"))
            .ok()
            .and_then(|p| p.end);
        match (recorded, waited) {
            (Some(e), _) => e,
            (None, sys::Waited::Exited(1)) => End::Failed,
            (None, sys::Waited::Exited(c)) => End::Exited(c as u8),
            (None, sys::Waited::Signaled(s)) => End::Killed(Some(s)),
            (None, sys::Waited::Unknown) => End::Killed(None),
        }
    }

    /// The error a failed start reports: tt-host run's last message.
    fn failure_message(&self, name: &str, end: End) -> String {
        let log = self.log_tail(name, 1);
        match log.last() {
            Some(l) => l.strip_prefix("tt-host: ").unwrap_or(l).to_string(),
            None => format!("{name}: tt-host run ended before the guest ran ({end})"),
        }
    }

    /// The last `n` lines of tt-host's own log for a unit.
    fn log_tail(&self, name: &str, n: usize) -> Vec<String> {
        let text = std::fs::read(self.unit_dir(name).join("tt-host.log")).unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        let lines: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
        lines[lines.len().saturating_sub(n)..]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    fn set_running(&self, name: &str, gen: u64) {
        let mut inner = self.lock();
        if let Some(u) = inner.units.get_mut(name) {
            if u.gen == gen && u.state == State::Starting {
                u.state = State::Running;
            }
        }
    }

    fn on_end(self: &Arc<Self>, name: &str, gen: u64, end: End, started_ns: u64) {
        let mut inner = self.lock();
        let Some(unit) = inner.units.get_mut(name) else {
            return;
        };
        unit.instance = None;
        if unit.gen != gen {
            // A destroy or restart stopped it: that one goes on.
            return;
        }
        unit.last_end = Some(end);
        log::info!("{name}: ended ({end})");
        if should_restart(&unit.spec.restart_on_fail, end) {
            let ran = Duration::from_nanos(now_ns().saturating_sub(started_ns));
            if ran >= self.cfg.backoff_max {
                unit.consecutive = 0;
            }
            let delay = backoff(&self.cfg, unit.consecutive);
            unit.consecutive += 1;
            let name = name.to_string();
            self.schedule_restart(&name, unit, delay);
        } else {
            unit.state = State::Exited;
            drop(inner);
            self.stop_drawing(name);
        }
    }

    /// On a cluster node: a unikernel ended, its reservation goes at the
    /// node's next look (a quarter second), not its next second's.
    fn cluster_reconcile_soon(&self) {
        #[cfg(feature = "cluster")]
        if let Some(node) = self.cluster.get() {
            node.reconcile_soon();
        }
    }

    fn pools(&self) -> MutexGuard<'_, PoolState> {
        self.pools.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `name` no longer draws from its pool (if it did).
    fn stop_drawing(&self, name: &str) {
        if let Err(e) = self.pools().stop_drawing(name, now_ns()) {
            log::warn!("{name}: {e}");
        }
        self.pools_changed.notify_one();
        self.pool_sync_wake.notify_one();
    }

    /// On a cluster node, admission into `spec`'s pool through the cluster
    /// (before the unit is recorded: it waits for etcd); true if its draw
    /// was recorded now.
    #[cfg(feature = "cluster")]
    async fn pool_admit_cluster(&self, spec: &Spec) -> Result<bool, String> {
        self.cluster_pool_admit(spec).await
    }

    #[cfg(not(feature = "cluster"))]
    async fn pool_admit_cluster(&self, _: &Spec) -> Result<bool, String> {
        Ok(false)
    }

    /// The cluster's pools into the mirror: a no-op without a cluster.
    #[cfg(not(feature = "cluster"))]
    pub async fn refresh_pools(&self) -> Result<(), String> {
        Ok(())
    }

    /// Without the `cluster` feature, no daemon is a cluster node: its
    /// pools are never clustered, and these are never called.
    #[cfg(not(feature = "cluster"))]
    pub async fn cluster_pool_create(
        &self,
        _: &str,
        _: super::pools::Meta,
        _: Option<Vec<String>>,
    ) -> Result<(), String> {
        Err("this daemon is not a cluster node".into())
    }

    #[cfg(not(feature = "cluster"))]
    pub async fn cluster_reserve(&self, _: &[u8]) -> Result<String, String> {
        Err("this daemon is not a cluster node".into())
    }

    #[cfg(not(feature = "cluster"))]
    pub async fn cluster_key_add(&self, _: &str, _: &str) -> Result<bool, String> {
        Err("this daemon is not a cluster node".into())
    }

    /// The draw of the unikernel `spec` describes.
    pub fn draw_of(spec: &Spec) -> Result<crate::pools::Draw, String> {
        let run = match crate::cli::parse_run(&spec.args) {
            Ok(crate::cli::Parsed::Run(r)) => r,
            _ => return Err(format!("{}: its command line does not parse", spec.name)),
        };
        let mut block = 0u64;
        for d in run.devices.iter().filter(|d| d.option == "block") {
            block += std::fs::metadata(&d.value).map(|m| m.len()).unwrap_or(0);
        }
        // A host port forwarded to it uses the host's public address.
        let forwards = spec.net.as_ref().map_or(0, |n| n.ports.len() as u64);
        Ok(super::pools::draw_of(run.mem_mb, block, forwards))
    }

    /// Admission to `spec`'s pool, and its draw from then on.
    fn start_drawing(&self, spec: &Spec) -> Result<(), String> {
        let Some(pool) = &spec.pool else {
            return Ok(());
        };
        let draw = Self::draw_of(spec)?;
        let now = now_ns();
        let mut pools = self.pools();
        // Still drawing (a restart stops it without a stop of its draw),
        // or admitted by the cluster already: not admitted twice.
        if pools.is_drawing(&spec.name) {
            return Ok(());
        }
        pools.admit(pool, draw, now, self.cfg.pool_min_run.as_nanos() as u64)?;
        pools.start_drawing(&spec.name, pool, draw, now)?;
        drop(pools);
        self.pools_changed.notify_one();
        Ok(())
    }

    /// The expiry timer: sleeps until the next pool empties (or the
    /// warning before it), stops that pool's unikernels, and sleeps again;
    /// woken early when a pool changes. No work per pool while waiting.
    pub async fn expire_pools(self: Arc<Self>) {
        let mut warned: std::collections::BTreeSet<(String, u64)> = Default::default();
        loop {
            let now = now_ns();
            let mut due = self.pools().due(now);
            // On a cluster node, the mirror may be a second behind another
            // node's top-up: looked at again before anything is stopped.
            if !due.is_empty() && self.pools().is_clustered() {
                if let Err(e) = self.refresh_pools().await {
                    log::warn!("cluster: pools: {e}");
                }
                due = self.pools().due(now_ns());
            }
            for (_, pool) in due {
                self.empty_pool(pool.as_str()).await;
            }
            let warn = self.cfg.pool_warning.as_nanos() as u64;
            let next = self.pools().next_expiry();
            let mut wake = next.as_ref().map(|(t, _)| *t);
            if let Some((t, pool)) = &next {
                let key = (pool.clone(), *t);
                if now + warn >= *t && !warned.contains(&key) {
                    log::warn!(
                        "pool {pool} empties at {}: its unikernels will be stopped then",
                        humantime::format_rfc3339_millis(
                            std::time::UNIX_EPOCH + Duration::from_nanos(*t)
                        )
                    );
                    warned.insert(key);
                } else if !warned.contains(&key) {
                    wake = Some(t - warn);
                }
            }
            let sleep = match wake {
                // A pool still due after its unikernels were stopped (a
                // draw nothing accounts for) is looked at again in a
                // while, not in a busy loop.
                Some(t) => {
                    Duration::from_nanos(t.saturating_sub(now_ns())).max(Duration::from_millis(100))
                }
                None => Duration::from_secs(3600),
            };
            tokio::select! {
                _ = tokio::time::sleep(sleep) => {}
                _ = self.pools_changed.notified() => {}
            }
        }
    }

    /// `pool` is empty: stop every unikernel drawing from it.
    async fn empty_pool(self: &Arc<Self>, pool: &str) {
        let units = self.pools().drawing_from(pool);
        log::warn!("pool {pool} is empty: stopping {}", units.join(", "));
        for name in units {
            let name: String = name;
            let _ = self.stop(&name).await;
            {
                let mut inner = self.lock();
                if let Some(u) = inner.units.get_mut(&name) {
                    u.state = State::Exited;
                    u.stopped_because = Some(format!("stopped: pool {pool} empty"));
                }
            }
            self.stop_drawing(&name);
            let ring = self.unit_dir(&name).join("console");
            match crate::runfile::console::ConsoleRing::open_or_create(&ring, self.cfg.console_size)
            {
                Ok(mut r) => r.append(
                    now_ns(),
                    format!("[tt-host daemon] pool {pool} is empty: unikernel stopped\n")
                        .as_bytes(),
                ),
                Err(e) => log::warn!("{name}: {e}"),
            }
        }
        // Nothing draws from it any more: its EmptyAt is gone.
        if !self.pools().drawing_from(pool).is_empty() {
            log::warn!("pool {pool}: unikernels still draw from it");
        }
    }

    fn schedule_restart(self: &Arc<Self>, name: &str, unit: &mut Unit, delay: Duration) {
        unit.state = State::Restarting;
        unit.restart_at = Some(now_ns() + delay.as_nanos() as u64);
        log::info!("{name}: restarting in {delay:?}");
        let (sup, name, gen) = (self.clone(), name.to_string(), unit.gen);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let mut inner = sup.lock();
            let Some(mut unit) = inner.units.remove(&name) else {
                return;
            };
            if unit.gen == gen && unit.state == State::Restarting {
                unit.restarts += 1;
                if let Err(e) = sup.spawn(&name, &mut unit) {
                    log::warn!("{name}: cannot restart: {e}");
                    unit.state = State::Exited;
                    unit.last_end = Some(End::Failed);
                }
            }
            inner.units.insert(name, unit);
        });
    }

    /// `create`: record the unit, start it, and wait until its guest runs
    /// (or its start failed: then it is forgotten again).
    pub async fn create(
        self: &Arc<Self>,
        spec: Spec,
        received: Instant,
    ) -> Result<Started, String> {
        let name = spec.name.clone();
        let exists = || format!("{name} exists (destroy it first, or restart it)");
        if self.lock().units.contains_key(&name) {
            return Err(exists());
        }
        let drawn = self.pool_admit_cluster(&spec).await?;
        let (pid, rx, persist_us) = {
            let mut inner = self.lock();
            if inner.units.contains_key(&name) {
                drop(inner);
                if drawn {
                    self.stop_drawing(&name);
                }
                return Err(exists());
            }
            self.start_drawing(&spec)?;
            let t = Instant::now();
            if let Err(e) = inner.desired.create(&spec) {
                drop(inner);
                self.stop_drawing(&name);
                return Err(e.to_string());
            }
            let persist_us = t.elapsed().as_micros() as u64;
            let mut unit = Unit::new(spec, State::Starting);
            let started = self.spawn(&name, &mut unit);
            inner.units.insert(name.clone(), unit);
            match started {
                Ok((pid, rx)) => (pid, rx, persist_us),
                Err(e) => {
                    drop(inner);
                    self.forget(&name, true);
                    return Err(e);
                }
            }
        };
        let daemon_us = received.elapsed().as_micros() as u64;
        match rx.await {
            Ok(Ok(())) => Ok(Started {
                pid,
                daemon_us,
                persist_us,
            }),
            Ok(Err(msg)) => {
                self.forget(&name, true);
                Err(msg)
            }
            Err(_) => Err(format!("{name}: its start was abandoned")),
        }
    }

    /// Drop a unit from the desired state and the runtime directory, with
    /// what the daemon made for it: its TAP and port forwards, its saved
    /// guest, and its runtime images (those made with --keep-image too
    /// if `drop_kept`).
    fn forget(&self, name: &str, drop_kept: bool) {
        let spec = {
            let mut inner = self.lock();
            if let Err(e) = inner.desired.destroy(name) {
                log::warn!("{name}: {e}");
            }
            inner.units.remove(name).map(|u| u.spec)
        };
        if let Some(spec) = spec {
            self.release(&spec, drop_kept);
        }
        self.stop_drawing(name);
        let _ = std::fs::remove_dir_all(self.unit_dir(name));
        // The admission entry of an instance that was killed is reaped
        // by the next reader of the state directory: this one.
        let _ = crate::admission::StateDir::resolve(Some(&self.cfg.state_dir))
            .show(&crate::resources::Path::root());
    }

    /// Stop the running instance, if any, and wait until it is reaped:
    /// SIGTERM, then SIGKILL after the stop timeout.
    async fn stop(&self, name: &str) -> Result<Option<End>, String> {
        self.stop_or_save(name, None).await.map(|(end, _)| end)
    }

    /// Stop the running instance, if any, and wait until it is reaped:
    /// with `save`, by saving the guest there (`tt-host snapshot --stop`),
    /// else (or if that fails) with SIGTERM, then SIGKILL after the stop
    /// timeout. Says whether the guest was saved.
    async fn stop_or_save(
        &self,
        name: &str,
        save: Option<&std::path::Path>,
    ) -> Result<(Option<End>, bool), String> {
        let (pidfd, mut ended) = {
            let mut inner = self.lock();
            let unit = inner
                .units
                .get_mut(name)
                .ok_or_else(|| format!("no unikernel named {name}"))?;
            unit.gen += 1;
            unit.restart_at = None;
            match &unit.instance {
                Some(i) => {
                    unit.state = State::Stopping;
                    (i.pidfd.clone(), i.ended.clone())
                }
                None => return Ok((None, false)),
            }
        };
        if let Some(dir) = save {
            let socket = self.unit_dir(name).join("control");
            let dir = dir.to_path_buf();
            let saved = tokio::task::spawn_blocking(move || {
                let files = crate::control::snapshot_files(&dir)?;
                crate::control::snapshot_into(&socket, &dir, files, true)
            })
            .await;
            match saved {
                Ok(Ok(_)) => {
                    let wait = ended.wait_for(|e| e.is_some());
                    if let Ok(Ok(e)) = tokio::time::timeout(self.cfg.stop_timeout, wait).await {
                        return Ok((*e, true));
                    }
                    log::warn!("{name}: saved, but did not end: stopping it");
                }
                Ok(Err(e)) => log::warn!("{name}: cannot save the guest ({e}): stopping it"),
                Err(e) => log::warn!("{name}: cannot save the guest ({e}): stopping it"),
            }
        }
        let _ = sys::pidfd_signal(&pidfd, libc::SIGTERM);
        let first = {
            let wait = ended.wait_for(|e| e.is_some());
            match tokio::time::timeout(self.cfg.stop_timeout, wait).await {
                Ok(Ok(e)) => Some(*e),
                _ => None,
            }
        };
        let end = match first {
            Some(e) => e,
            None => {
                let _ = sys::pidfd_signal(&pidfd, libc::SIGKILL);
                let e = ended.wait_for(|e| e.is_some()).await.ok().map(|e| *e);
                e.flatten()
            }
        };
        Ok((end, false))
    }

    /// `destroy`: stop the unit and forget it.
    pub async fn destroy(self: &Arc<Self>, name: &str) -> Result<String, String> {
        let end = self.stop(name).await?;
        self.forget(name, false);
        Ok(match end {
            Some(e) => format!("{name} destroyed (it ended: {e})"),
            None => format!("{name} destroyed"),
        })
    }

    /// `restart`: stop the running instance, wait until it is reaped,
    /// then start a new one.
    pub async fn restart(
        self: &Arc<Self>,
        name: &str,
        received: Instant,
    ) -> Result<Started, String> {
        let stopped = self
            .lock()
            .units
            .get(name)
            .is_some_and(|u| u.state == State::Stopped);
        if stopped {
            return Err(format!(
                "{name}: its environment is stopped ('tt-host env start' brings it back)"
            ));
        }
        self.stop(name).await?;
        let spec = self.lock().units.get(name).map(|u| u.spec.clone());
        let drawn = match &spec {
            Some(spec) => self.pool_admit_cluster(spec).await?,
            None => false,
        };
        let (pid, rx) = {
            let mut inner = self.lock();
            let Some(mut unit) = inner.units.remove(name) else {
                drop(inner);
                if drawn {
                    self.stop_drawing(name);
                }
                return Err(format!("{name} was destroyed meanwhile"));
            };
            unit.consecutive = 0;
            unit.restarts += 1;
            unit.stopped_because = None;
            let r = self.start_drawing(&unit.spec).and_then(|()| {
                self.spawn(name, &mut unit).inspect_err(|_| {
                    unit.last_end = Some(End::Failed);
                })
            });
            if r.is_err() {
                unit.state = State::Exited;
            }
            inner.units.insert(name.to_string(), unit);
            drop(inner);
            match r {
                Ok(started) => started,
                Err(e) => {
                    // Not running: it draws nothing.
                    self.stop_drawing(name);
                    return Err(e);
                }
            }
        };
        let daemon_us = received.elapsed().as_micros() as u64;
        match rx.await {
            Ok(Ok(())) => Ok(Started {
                pid,
                daemon_us,
                persist_us: 0,
            }),
            Ok(Err(msg)) => Err(msg),
            Err(_) => Err(format!("{name}: its start was abandoned")),
        }
    }

    /// Stop every running unikernel, saying `why` as its end (a node cut
    /// off from its cluster fences itself so).
    pub async fn stop_all(self: &Arc<Self>, why: &str) {
        let running: Vec<String> = self
            .lock()
            .units
            .iter()
            .filter(|(_, u)| u.instance.is_some())
            .map(|(n, _)| n.clone())
            .collect();
        for name in running {
            let _ = self.stop(&name).await;
            {
                let mut inner = self.lock();
                if let Some(u) = inner.units.get_mut(&name) {
                    u.state = State::Exited;
                    u.stopped_because = Some(why.to_string());
                }
            }
            self.stop_drawing(&name);
        }
        // Plain `tt-host run`s of this state directory too (the daemon's
        // own are gone by now): SIGTERM, as a stop does.
        let state = crate::admission::StateDir::resolve(Some(&self.cfg.state_dir));
        match state.running_pids() {
            Ok(pids) => {
                for (name, pid) in pids {
                    log::warn!("{name}: stopping pid {pid} ({why})");
                    // SAFETY: kill takes no pointers.
                    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
                }
            }
            Err(e) => log::warn!("cannot list what runs here: {e}"),
        }
    }

    /// Every unit's name (for filtering by the caller's rights).
    pub fn names(&self) -> Vec<String> {
        self.lock().units.keys().cloned().collect()
    }

    /// `list` / `info` of one unit; with `log`, tt-host's last messages.
    pub fn info(&self, name: &str, log: bool) -> Option<UnitInfo> {
        let info = {
            let inner = self.lock();
            let u = inner.units.get(name)?;
            UnitInfo {
                name: name.to_string(),
                state: u.state.name().to_string(),
                pid: u.instance.as_ref().map(|i| i.pid),
                last_end: match &u.stopped_because {
                    Some(why) => Some(why.clone()),
                    None => u.last_end.map(|e| e.to_string()),
                },
                restarts: u.restarts,
                restart_on_fail: u.spec.restart_on_fail.clone(),
                restart_at_ns: u.restart_at,
                started_ns: u.instance.as_ref().map(|i| i.started_ns),
                args: u.spec.args.clone(),
                owner_uid: u.spec.owner.uid,
                log: vec![],
            }
        };
        Some(UnitInfo {
            log: if log { self.log_tail(name, 10) } else { vec![] },
            ..info
        })
    }

    /// A unit's counters: from its stats file, with CPU time and memory
    /// from /proc while it runs.
    pub fn stats(&self, name: &str) -> Option<UnitStats> {
        let (pid, restarts) = {
            let inner = self.lock();
            let u = inner.units.get(name)?;
            (u.instance.as_ref().map(|i| i.pid), u.restarts)
        };
        let published = unitfiles::read_stats(&self.unit_dir(name).join("stats")).ok();
        let mut s = published.map(|p| p.stats).unwrap_or_default();
        s.name = name.to_string();
        s.restarts = restarts;
        s.running = pid.is_some();
        if let Some(u) = pid.and_then(sys::proc_usage) {
            s.cpu_user_us = u.user_us;
            s.cpu_system_us = u.system_us;
            s.peak_rss_kib = u.peak_rss_kib;
        }
        Some(s)
    }

    /// A unit's console ring, opened once and shared by its readers
    /// (opened again if tt-host run made a new one).
    pub fn console(&self, name: &str) -> Result<Arc<Console>, String> {
        let path = self.unit_dir(name).join("console");
        let mut inner = self.lock();
        let unit = inner
            .units
            .get_mut(name)
            .ok_or_else(|| format!("no unikernel named {name}"))?;
        if let Some(c) = &unit.console {
            if c.is_current(&path) {
                return Ok(c.clone());
            }
        }
        let c =
            Arc::new(Console::open(&path).map_err(|e| format!("{name}: no console yet ({e})"))?);
        unit.console = Some(c.clone());
        Ok(c)
    }

    /// Is `name` a unit here?
    pub fn exists(&self, name: &str) -> bool {
        self.lock().units.contains_key(name)
    }
}

/// A shared pidfd as a descriptor AsyncFd can poll.
struct DupFd(Arc<OwnedFd>);

impl AsRawFd for DupFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

/// Wait for tt-host run's readiness byte: true if it came, false at the
/// end of the pipe (the process ended first).
async fn read_ready(fd: OwnedFd) -> bool {
    // SAFETY: the AsyncFd owns `fd`, which stays open until it drops.
    let Ok(afd) = (unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }) else {
        return false;
    };
    loop {
        let Ok(mut guard) = afd.readable().await else {
            return false;
        };
        let mut b = [0u8; 1];
        // SAFETY: b is a live one-byte buffer.
        let n = unsafe { libc::read(afd.get_ref().as_raw_fd(), b.as_mut_ptr().cast(), 1) };
        if n == 1 {
            return b[0] == b'R';
        }
        if n == 0 {
            return false;
        }
        let err = std::io::Error::last_os_error();
        if err.kind() == std::io::ErrorKind::WouldBlock {
            guard.clear_ready();
            continue;
        }
        if err.kind() != std::io::ErrorKind::Interrupted {
            return false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        Config {
            state_dir: "/nonexistent".into(),
            runtime_dir: "/nonexistent".into(),
            exe: "/nonexistent".into(),
            console_size: 1 << 20,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(3),
            stop_timeout: Duration::from_secs(5),
            pool_min_run: Duration::from_secs(120),
            pool_warning: Duration::from_secs(60),
            env_mgmt_interval: Duration::from_secs(1),
        }
    }

    #[test]
    fn albatross_restart_rule() {
        let any = Some(vec![]);
        assert!(should_restart(&any, End::Exited(3)));
        assert!(should_restart(&any, End::Exited(255)));
        for code in [0, 1, 60, 61, 62, 63, 64] {
            assert!(!should_restart(&any, End::Exited(code)), "exit {code}");
        }
        assert!(should_restart(&any, End::Exited(59)));
        assert!(should_restart(&any, End::Exited(65)));
        for end in [
            End::Signal(15),
            End::Failed,
            End::Killed(Some(9)),
            End::Killed(None),
        ] {
            assert!(!should_restart(&any, end), "{end}");
        }
        assert!(!should_restart(&None, End::Exited(3)));
        let some = Some(vec![3, 0, 1]);
        assert!(should_restart(&some, End::Exited(3)));
        assert!(
            should_restart(&some, End::Exited(0)),
            "0 restarts when listed"
        );
        assert!(!should_restart(&some, End::Exited(4)));
        assert!(!should_restart(&some, End::Exited(1)), "never after exit 1");
    }

    #[test]
    fn each_port_forward_draws_one_ipv4u() {
        let mut spec = Spec {
            name: "lab:web".into(),
            args: vec!["--mem=32".into(), "/img.hvt".into(), "--".into()],
            restart_on_fail: None,
            owner: super::super::desired::Owner {
                uid: 0,
                gid: 0,
                groups: vec![],
            },
            created_ns: 0,
            pool: Some("p".into()),
            env: Some("lab".into()),
            images: vec![],
            net: None,
        };
        let plain = Supervisor::draw_of(&spec).unwrap();
        assert_eq!(plain.ipv4u, 0);
        spec.net = Some(super::super::desired::UnitNet {
            device: "service0".into(),
            tap: "tte0u0".into(),
            ip: "10.213.0.2".parse().unwrap(),
            ports: vec!["8080:80".into(), "5353:53/udp".into()],
        });
        let forwarded = Supervisor::draw_of(&spec).unwrap();
        assert_eq!(
            forwarded.ipv4u,
            2 * crate::pools::MICRO,
            "one IPv4U per forward"
        );
        assert_eq!((forwarded.cu, forwarded.su), (plain.cu, plain.su));
    }

    #[test]
    fn backoff_doubles_up_to_its_ceiling() {
        let c = cfg();
        let d: Vec<u64> = (0..8).map(|n| backoff(&c, n).as_millis() as u64).collect();
        assert_eq!(d, [100, 200, 400, 800, 1600, 3000, 3000, 3000]);
        assert_eq!(backoff(&c, u32::MAX), Duration::from_secs(3));
    }
}
