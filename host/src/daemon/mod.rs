//! `tt-host daemon`: keeps many unikernels running, as albatross does on
//! one host.
//!
//! The daemon serves a Unix socket ([`proto`], docs/PROTOCOL.md) on which
//! the `tt-host` CLI ([`client`]) creates, destroys, restarts, lists and
//! inspects unikernels, follows their consoles and reads their counters,
//! and changes policies. Each unikernel runs in its own `tt-host run`
//! process ([`supervisor`]), admitted through the policy tree as any
//! launch, which publishes its console and counters in files of the
//! runtime directory, so that the unikernels, their consoles and their
//! counters outlive the daemon: a daemon killed and started again
//! re-adopts them. What was created is kept in the state directory
//! ([`desired`]) and started again after a reboot. A caller who is not
//! root acts only where a policy grants it ([`access`]).
//!
//! Files: `STATE/daemon/desired.log` and `STATE/daemon/lock` (one daemon
//! per state directory); `RUNTIME/control.sock` (mode 0666: every caller
//! is identified by SO_PEERCRED), `RUNTIME/units/u-NAME/` with `console`,
//! `stats` and `tt-host.log` (0700, root's). RUNTIME is /run/tt-host by
//! default, which a reboot empties.

pub mod access;
pub mod client;
#[cfg(feature = "cluster")]
pub mod cluster;
pub mod desired;
pub mod envclient;
pub mod envs;
pub mod metrics;
pub mod pools;
pub mod proto;
pub mod server;
pub mod supervisor;
pub mod sys;
pub mod unitfiles;

use crate::text::{number, quote};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::Duration;

/// The default runtime directory (a reboot empties /run).
pub const DEFAULT_RUNTIME_DIR: &str = "/run/tt-host";
/// Environment variable naming the runtime directory.
pub const RUNTIME_DIR_ENV: &str = "TT_HOST_RUNTIME_DIR";
/// Environment variable naming the control socket, for clients.
pub const SOCKET_ENV: &str = "TT_HOST_SOCKET";

/// The runtime directory given, else `$TT_HOST_RUNTIME_DIR`, else
/// [`DEFAULT_RUNTIME_DIR`].
pub fn runtime_dir(given: Option<&std::path::Path>) -> PathBuf {
    given
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os(RUNTIME_DIR_ENV)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| PathBuf::from(DEFAULT_RUNTIME_DIR))
}

/// The control socket a client talks to: given, else `$TT_HOST_SOCKET`,
/// else the one in the runtime directory.
pub fn socket_path(given: Option<&std::path::Path>) -> PathBuf {
    given
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os(SOCKET_ENV)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| runtime_dir(None).join("control.sock"))
}

pub const USAGE: &str = "\
usage: tt-host daemon [--state-dir=DIR] [--runtime-dir=DIR] [--socket=PATH]
                      [--metrics=[ADDR:]PORT] [--console-size=BYTES]
                      [--restart-backoff=MIN_MS,MAX_MS] [--stop-timeout=SECONDS]
                      [--pool-min-run=SECONDS] [--pool-warning=SECONDS]
                      [--env-mgmt-interval=MS]
                      [--cluster=ENDPOINTS --node-id=ID [--cluster-prefix=KEY]
                       [--lease-ttl=SECONDS] [--keep-on-partition]
                       [--cluster-ca=PEM [--cluster-cert=PEM --cluster-key=PEM]]]

Keep unikernels running: serve the control socket on which 'tt-host create',
'destroy', 'restart', 'list', 'info', 'console', 'stats' and 'policy
--daemon' act. Each unikernel runs in its own 'tt-host run' process, which
outlives the daemon: started again, the daemon re-adopts the unikernels
still running, applies the restart rule to those that ended meanwhile, and
starts those created and not destroyed that have no process this boot
(after a reboot: all of them). Stop it with SIGTERM; the unikernels go on.

  --state-dir=DIR        policies, running unikernels, and what was created
                         (default $TT_HOST_STATE_DIR, else /var/lib/tt-host)
  --runtime-dir=DIR      consoles, counters, the socket (default
                         $TT_HOST_RUNTIME_DIR, else /run/tt-host)
  --socket=PATH          the control socket (default RUNTIME/control.sock)
  --metrics=[ADDR:]PORT  also serve the counters in Prometheus' text format
                         over HTTP (ADDR defaults to 127.0.0.1)
  --console-size=BYTES   each unikernel's console ring (default 1048576)
  --restart-backoff=MIN_MS,MAX_MS
                         delay before a restart on failure: MIN_MS, doubled
                         for each restart in a row up to MAX_MS; a run of
                         MAX_MS or longer starts again from MIN_MS
                         (default 1000,300000)
  --stop-timeout=SECONDS destroy and restart send SIGTERM, then SIGKILL after
                         this long (default 10)
  --pool-min-run=SECONDS create --pool refuses a unikernel whose pool would be
                         empty within this long (default 120, as tfexplorer)
  --pool-warning=SECONDS log a pool's coming expiry this long before it
                         (default 60)
  --env-mgmt-interval=MS refuse an extend, stop, start or destroy of an
                         environment within MS of the one before (default
                         1000; 0: no limit)
  --cluster=ENDPOINTS    be node --node-id=ID of the cluster whose etcd
                         answers at ENDPOINTS (http://HOST:PORT,...): the
                         cluster's policies bind every launch here, and
                         this node's reservations live on its lease there
                         (docs/CLUSTER.md; needs tt-host built with the
                         'cluster' feature)
  --cluster-prefix=KEY   the cluster's keys in etcd (default /tt-host)
  --lease-ttl=SECONDS    the node's lease (default 10): its reservations
                         outlive it by this long; cut off from etcd for
                         2/3 of it, it stops its unikernels
  --keep-on-partition    ... unless this is given: they run on (the cluster
                         may then exceed a policy by what they use)
  --cluster-ca=PEM       TLS to etcd (https:// endpoints): the CA of etcd's
                         certificate; --cluster-cert and --cluster-key: this
                         node's client certificate (etcd --client-cert-auth)";

/// `tt-host daemon`'s options.
#[derive(Debug, Clone, PartialEq)]
pub struct DaemonArgs {
    pub state_dir: Option<PathBuf>,
    pub runtime_dir: Option<PathBuf>,
    pub socket: Option<PathBuf>,
    pub metrics: Option<std::net::SocketAddr>,
    pub console_size: u64,
    pub backoff: (Duration, Duration),
    pub stop_timeout: Duration,
    pub pool_min_run: Duration,
    pub pool_warning: Duration,
    pub env_mgmt_interval: Duration,
    /// `--cluster=...`: etcd endpoints, with the node's id.
    pub cluster: Option<ClusterArgs>,
}

/// A cluster node's options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterArgs {
    pub endpoints: Vec<String>,
    pub node: String,
    pub prefix: String,
    pub ttl: Duration,
    pub keep_on_partition: bool,
    /// `--cluster-ca`, `--cluster-cert`, `--cluster-key`.
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// Parse `tt-host daemon`'s options; `Ok(None)`: --help.
pub fn parse_args(args: &[String]) -> Result<Option<DaemonArgs>, String> {
    let mut d = DaemonArgs {
        state_dir: None,
        runtime_dir: None,
        socket: None,
        metrics: None,
        console_size: 1 << 20,
        backoff: (Duration::from_secs(1), Duration::from_secs(300)),
        stop_timeout: Duration::from_secs(10),
        pool_min_run: Duration::from_secs(120),
        pool_warning: Duration::from_secs(60),
        env_mgmt_interval: Duration::from_secs(1),
        cluster: None,
    };
    let mut seen = Vec::new();
    let (mut endpoints, mut node, mut prefix, mut ttl, mut keep) = (None, None, None, None, false);
    let (mut ca, mut cert, mut key) = (None, None, None);
    for a in args {
        if a == "-h" || a == "--help" {
            return Ok(None);
        }
        if a == "--keep-on-partition" {
            keep = true;
            continue;
        }
        let Some((opt, v)) = a.split_once('=') else {
            return Err(format!(
                "daemon: unexpected argument '{}' (options take --OPT=VALUE)",
                quote(a)
            ));
        };
        if seen.contains(&opt) {
            return Err(format!("daemon: {} given twice", quote(opt)));
        }
        seen.push(opt);
        let bad = |what: &str| format!("daemon: {opt}={}: expected {what}", quote(v));
        match opt {
            "--state-dir" => d.state_dir = Some(v.into()),
            "--runtime-dir" => d.runtime_dir = Some(v.into()),
            "--socket" => d.socket = Some(v.into()),
            "--metrics" => {
                let addr = if let Some(port) = number::<u16>(v) {
                    std::net::SocketAddr::from(([127, 0, 0, 1], port))
                } else {
                    v.parse()
                        .map_err(|_| bad("PORT or ADDR:PORT (e.g. 9100 or 127.0.0.1:9100)"))?
                };
                d.metrics = Some(addr);
            }
            "--console-size" => {
                d.console_size = number::<u64>(v)
                    .filter(|n| (4096..=64 << 20).contains(n))
                    .ok_or_else(|| bad("a size in bytes from 4096 to 67108864"))?;
            }
            "--restart-backoff" => {
                let (min, max) = v
                    .split_once(',')
                    .and_then(|(a, b)| Some((number::<u64>(a)?, number::<u64>(b)?)))
                    .filter(|(a, b)| *a >= 1 && a <= b)
                    .ok_or_else(|| bad("MIN_MS,MAX_MS with 1 <= MIN_MS <= MAX_MS"))?;
                d.backoff = (Duration::from_millis(min), Duration::from_millis(max));
            }
            "--pool-min-run" | "--pool-warning" => {
                let s = number::<u64>(v)
                    .filter(|s| *s <= 365 * 86400)
                    .ok_or_else(|| bad("seconds"))?;
                if opt == "--pool-min-run" {
                    d.pool_min_run = Duration::from_secs(s);
                } else {
                    d.pool_warning = Duration::from_secs(s);
                }
            }
            "--cluster" => {
                let list: Vec<String> = v
                    .split(',')
                    .map(|e| e.trim().to_string())
                    .filter(|e| !e.is_empty())
                    .collect();
                if list.is_empty() || list.iter().any(|e| !e.contains("://")) {
                    return Err(bad(
                        "etcd endpoints such as http://10.0.0.1:2379,http://10.0.0.2:2379",
                    ));
                }
                endpoints = Some(list);
            }
            "--node-id" => {
                crate::resources::Label::new(v)
                    .map_err(|e| format!("daemon: --node-id={}: {e}", quote(v)))?;
                node = Some(v.to_string());
            }
            "--cluster-prefix" => {
                if !v.starts_with('/') || v.ends_with('/') || v.len() < 2 {
                    return Err(bad("a key prefix such as /tt-host"));
                }
                prefix = Some(v.to_string());
            }
            "--cluster-ca" => ca = Some(PathBuf::from(v)),
            "--cluster-cert" => cert = Some(PathBuf::from(v)),
            "--cluster-key" => key = Some(PathBuf::from(v)),
            "--lease-ttl" => {
                let s = number::<u64>(v)
                    .filter(|s| (2..=300).contains(s))
                    .ok_or_else(|| bad("seconds from 2 to 300"))?;
                ttl = Some(Duration::from_secs(s));
            }
            "--env-mgmt-interval" => {
                let ms = number::<u64>(v)
                    .filter(|ms| *ms <= 3_600_000)
                    .ok_or_else(|| bad("milliseconds from 0 to 3600000"))?;
                d.env_mgmt_interval = Duration::from_millis(ms);
            }
            "--stop-timeout" => {
                let s = number::<u64>(v)
                    .filter(|s| (1..=3600).contains(s))
                    .ok_or_else(|| bad("seconds from 1 to 3600"))?;
                d.stop_timeout = Duration::from_secs(s);
            }
            _ => {
                return Err(format!(
                    "daemon: unknown option '{}' (see 'tt-host daemon --help')",
                    quote(opt)
                ))
            }
        }
    }
    d.cluster = match (endpoints, node) {
        (Some(endpoints), Some(node)) => Some(ClusterArgs {
            endpoints,
            node,
            prefix: prefix.unwrap_or_else(|| "/tt-host".into()),
            ttl: ttl.unwrap_or(Duration::from_secs(10)),
            keep_on_partition: keep,
            ca,
            cert,
            key,
        }),
        (None, None)
            if prefix.is_none()
                && ttl.is_none()
                && !keep
                && ca.is_none()
                && cert.is_none()
                && key.is_none() =>
        {
            None
        }
        (Some(_), None) => return Err("daemon: --cluster needs --node-id=ID".into()),
        _ => {
            return Err(
                "daemon: --node-id, --cluster-prefix, --lease-ttl, --keep-on-partition and \
                 --cluster-ca/-cert/-key need --cluster=ENDPOINTS"
                    .into(),
            )
        }
    };
    if let Some(c) = &d.cluster {
        if c.cert.is_some() != c.key.is_some() {
            return Err("daemon: --cluster-cert and --cluster-key go together".into());
        }
        if c.cert.is_some() && c.ca.is_none() {
            return Err(
                "daemon: --cluster-cert needs --cluster-ca (the CA of etcd's certificate)".into(),
            );
        }
    }
    Ok(Some(d))
}

/// Log lines to stderr, with the time.
struct StderrLog;

impl log::Log for StderrLog {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::Level::Info
    }
    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            let now = humantime::format_rfc3339_millis(std::time::SystemTime::now());
            eprintln!("{now} tt-host daemon: {}", r.args());
        }
    }
    fn flush(&self) {}
}

/// Take `path` for one daemon: an exclusive flock held for the process's
/// life.
fn lock_daemon(path: &std::path::Path) -> Result<std::fs::File, String> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    // SAFETY: plain flock on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(format!(
            "another daemon holds {} (one daemon per state directory)",
            path.display()
        ));
    }
    Ok(f)
}

/// Make the runtime directory: root's, 0755 (clients reach the socket;
/// units/ inside is 0700).
fn make_runtime_dir(dir: &std::path::Path) -> Result<(), String> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let m = std::fs::metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if m.uid() != me || m.mode() & 0o022 != 0 {
        return Err(format!(
            "{} must be owned by uid {me} and writable by it alone",
            dir.display()
        ));
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("{}: {e}", dir.display()))
}

/// Bind the control socket at `path`, refusing if a daemon answers there.
fn bind(path: &std::path::Path) -> Result<std::os::unix::net::UnixListener, String> {
    use std::os::unix::fs::PermissionsExt;
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(format!("a daemon already serves {}", path.display()));
    }
    let _ = std::fs::remove_file(path);
    let l = std::os::unix::net::UnixListener::bind(path)
        .map_err(|e| format!("cannot bind {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    l.set_nonblocking(true)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(l)
}

/// Run the daemon until SIGTERM or SIGINT. The unikernels go on.
pub fn main(args: &DaemonArgs) -> Result<(), String> {
    let _ = log::set_logger(&StderrLog).map(|()| log::set_max_level(log::LevelFilter::Info));
    let state_dir = crate::admission::StateDir::resolve(args.state_dir.as_deref())
        .path()
        .to_path_buf();
    let runtime = runtime_dir(args.runtime_dir.as_deref());
    crate::admission::create_private_dir(&state_dir.join("daemon"))
        .map_err(|e| format!("cannot create {}/daemon: {e}", state_dir.display()))?;
    let _lock = lock_daemon(&state_dir.join("daemon").join("lock"))?;
    make_runtime_dir(&runtime)?;
    let socket = args
        .socket
        .clone()
        .unwrap_or_else(|| runtime.join("control.sock"));
    let exe = std::env::current_exe().map_err(|e| format!("cannot find tt-host itself: {e}"))?;
    let cfg = supervisor::Config {
        state_dir,
        runtime_dir: runtime,
        exe,
        console_size: args.console_size,
        backoff_min: args.backoff.0,
        backoff_max: args.backoff.1,
        stop_timeout: args.stop_timeout,
        pool_min_run: args.pool_min_run,
        pool_warning: args.pool_warning,
        env_mgmt_interval: args.env_mgmt_interval,
    };
    let listener = bind(&socket)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    rt.block_on(async move {
        let listener = tokio::net::UnixListener::from_std(listener)
            .map_err(|e| format!("{}: {e}", socket.display()))?;
        let sup = supervisor::Supervisor::start(cfg)?;
        if let Some(addr) = args.metrics {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| format!("--metrics={addr}: {e}"))?;
            log::info!("metrics on http://{addr}/metrics");
            tokio::spawn(metrics_http(sup.clone(), l));
        }
        tokio::spawn(sup.clone().expire_pools());
        if let Some(c) = &args.cluster {
            join_cluster(&sup, c, &socket).await?;
        } else {
            // A node no more: launches here are a single host's again.
            let _ = std::fs::remove_file(sup.cfg.state_dir.join(crate::cluster::NODE_FILE));
            sup.pools
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .set_single_host()?;
        }
        sup.recover_envs().await;
        tokio::spawn(sup.clone().expire_envs());
        log::info!("serving {}", socket.display());
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| format!("cannot catch SIGTERM: {e}"))?;
        tokio::select! {
            _ = server::serve(sup, listener) => {}
            _ = term.recv() => log::info!("SIGTERM: exiting; the unikernels go on"),
            _ = tokio::signal::ctrl_c() => log::info!("SIGINT: exiting; the unikernels go on"),
        }
        let _ = std::fs::remove_file(&socket);
        Ok(())
    })
}

/// Join the cluster: connect, start the lease's keeper and the
/// reconciliation, and write the node file that makes every launch here
/// ask this daemon.
#[cfg(feature = "cluster")]
async fn join_cluster(
    sup: &std::sync::Arc<supervisor::Supervisor>,
    c: &ClusterArgs,
    socket: &std::path::Path,
) -> Result<(), String> {
    let read = |p: &PathBuf| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
    let tls = match &c.ca {
        Some(ca) => Some(crate::cluster::store::Tls {
            ca: read(ca)?,
            identity: match (&c.cert, &c.key) {
                (Some(cert), Some(key)) => Some((read(cert)?, read(key)?)),
                _ => None,
            },
        }),
        None => None,
    };
    let cfg = crate::cluster::store::Config {
        endpoints: c.endpoints.clone(),
        node: c.node.clone(),
        prefix: c.prefix.clone(),
        ttl: c.ttl,
        keep_on_partition: c.keep_on_partition,
        tls,
    };
    let node = cluster::Node::connect(cfg).await?;
    let socket = std::path::absolute(socket).map_err(|e| format!("{}: {e}", socket.display()))?;
    crate::cluster::NodeFile {
        node: c.node.clone(),
        socket,
    }
    .write(&sup.cfg.state_dir)?;
    let _ = sup.cluster.set(node.clone());
    // The pools and keys are the cluster's from now on.
    sup.pools
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .set_clustered()?;
    if let Err(e) = sup.refresh_pools().await {
        log::warn!("cluster: pools: {e}");
    }
    tokio::spawn(sup.clone().sync_pools());
    let creating = sup.clone();
    tokio::spawn(node.clone().serve_assignments(move |unit, owner| {
        let sup = creating.clone();
        async move {
            sup.create_unit(unit, owner, std::time::Instant::now())
                .await
                .map(|s| s.pid)
        }
    }));
    let fencing = sup.clone();
    tokio::spawn(node.run(sup.cfg.state_dir.clone(), move || {
        let sup = fencing.clone();
        async move {
            sup.stop_all("stopped: the node was cut off from its cluster")
                .await
        }
    }));
    log::info!(
        "cluster node {} on {} (lease {:?})",
        c.node,
        c.endpoints.join(","),
        c.ttl
    );
    Ok(())
}

#[cfg(not(feature = "cluster"))]
async fn join_cluster(
    _: &std::sync::Arc<supervisor::Supervisor>,
    _: &ClusterArgs,
    _: &std::path::Path,
) -> Result<(), String> {
    Err(
        "--cluster: this tt-host was built without the 'cluster' feature \
         (cargo build --features cluster; it needs protoc)"
            .into(),
    )
}

/// The `--metrics` listener: `GET /metrics` in Prometheus' text format,
/// for every unikernel (the listener knows no caller: keep it on
/// loopback or behind a firewall).
async fn metrics_http(sup: std::sync::Arc<supervisor::Supervisor>, l: tokio::net::TcpListener) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let Ok((mut s, _)) = l.accept().await else {
            continue;
        };
        let sup = sup.clone();
        tokio::spawn(async move {
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            let read = async {
                while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 8192 {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
            };
            if tokio::time::timeout(Duration::from_secs(5), read)
                .await
                .is_err()
            {
                return;
            }
            let line = String::from_utf8_lossy(&req);
            let (status, body) = if line.starts_with("GET /metrics ") {
                let units: Vec<_> = sup.names().iter().filter_map(|n| sup.stats(n)).collect();
                ("200 OK", metrics::render(&units))
            } else {
                ("404 Not Found", "only GET /metrics is served\n".to_string())
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(head.as_bytes()).await;
            let _ = s.write_all(body.as_bytes()).await;
        });
    }
}
