//! The control socket: one task per connection, requests in order, each
//! checked against the peer's rights before it is done.

use super::access::{Peer, Rights};
use super::proto::{self, ConsoleRecord, NewUnit, Op, Reply, Request};
use super::supervisor::Supervisor;
use super::sys;
use crate::admission::StateDir;
use crate::cli::{self, Parsed, PolicyCmd};
use crate::resources::{Name, Path};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

/// A client has this long to send a whole request once it started one,
/// so that a stalled client holds nothing for long.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A console follower looks for new output this often.
const FOLLOW_POLL: Duration = Duration::from_millis(100);

/// Serve `listener` until the task is dropped.
pub async fn serve(sup: Arc<Supervisor>, listener: UnixListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let sup = sup.clone();
                tokio::spawn(async move { connection(sup, stream).await });
            }
            Err(e) => {
                log::warn!("control socket: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn send(stream: &mut UnixStream, reply: &Reply) -> std::io::Result<()> {
    stream.write_all(&proto::encode(reply)).await
}

fn error(message: impl Into<String>) -> Reply {
    Reply::Error {
        message: message.into(),
    }
}

/// Read one frame: `Ok(None)` at the end of the stream; an error reply's
/// message for a frame that is too long or cut short.
async fn read_request(stream: &mut UnixStream) -> Result<Option<Vec<u8>>, String> {
    let mut h = [0u8; 4];
    // Waiting for the next request has no limit; once it starts, it must
    // come whole within REQUEST_TIMEOUT.
    match stream.read(&mut h[..1]).await {
        Ok(0) => return Ok(None),
        Ok(_) => {}
        Err(e) => return Err(format!("cannot read the request: {e}")),
    }
    let rest = async {
        stream.read_exact(&mut h[1..]).await?;
        let len = proto::frame_len(h).map_err(|e| std::io::Error::other(e.to_string()))?;
        let mut body = vec![0; len];
        stream.read_exact(&mut body).await?;
        Ok::<_, std::io::Error>(body)
    };
    match tokio::time::timeout(REQUEST_TIMEOUT, rest).await {
        Ok(Ok(body)) => Ok(Some(body)),
        Ok(Err(e)) => Err(format!("bad request frame: {e}")),
        Err(_) => Err(format!(
            "request not received whole within {REQUEST_TIMEOUT:?}"
        )),
    }
}

async fn connection(sup: Arc<Supervisor>, mut stream: UnixStream) {
    let peer = match stream.peer_cred() {
        Ok(c) => Peer {
            uid: c.uid(),
            gid: c.gid(),
            groups: sys::peer_groups(stream.as_raw_fd()).unwrap_or_default(),
        },
        Err(e) => {
            let _ = send(
                &mut stream,
                &error(format!("cannot identify the peer: {e}")),
            )
            .await;
            return;
        }
    };
    loop {
        let body = match read_request(&mut stream).await {
            Ok(Some(b)) => b,
            Ok(None) => return,
            Err(msg) => {
                let _ = send(&mut stream, &error(msg)).await;
                return;
            }
        };
        let received = Instant::now();
        let req = match proto::decode_request(&body) {
            Ok(r) => r,
            Err(msg) => {
                let _ = send(&mut stream, &error(msg)).await;
                return;
            }
        };
        if let Op::Console { .. } = req.op {
            console(&sup, &peer, req, &mut stream).await;
            return;
        }
        let reply = handle(&sup, &peer, req.op, received).await;
        if send(&mut stream, &reply).await.is_err() {
            return;
        }
    }
}

fn parse_name(s: &str) -> Result<Name, String> {
    s.parse::<Name>()
        .map_err(|e| format!("bad unikernel name: {e}"))
}

fn rights(sup: &Supervisor, peer: &Peer) -> Result<Rights, String> {
    Rights::load(&StateDir::resolve(Some(&sup.cfg.state_dir)), peer)
}

/// The caller's rights, or `None` for root (who may do and see all).
fn rights_unless_root(sup: &Supervisor, peer: &Peer) -> Result<Option<Rights>, String> {
    if peer.is_root() {
        Ok(None)
    } else {
        rights(sup, peer).map(Some)
    }
}

/// Whether the caller with `rights` may see the unikernel or environment
/// `name`.
fn sees(rights: &Option<Rights>, name: &str) -> bool {
    rights
        .as_ref()
        .is_none_or(|r| name.parse::<Name>().is_ok_and(|n| r.sees(&n)))
}

/// Check the caller's rights with `f` (root passes).
fn check_rights(
    sup: &Supervisor,
    peer: &Peer,
    f: impl Fn(&Rights) -> Result<(), String>,
) -> Result<(), String> {
    match rights_unless_root(sup, peer)? {
        None => Ok(()),
        Some(r) => f(&r),
    }
}

/// Check that the caller may act on the unikernel `name`.
fn may_act(sup: &Supervisor, peer: &Peer, name: &str) -> Result<Name, String> {
    let n = parse_name(name)?;
    if !peer.is_root() {
        rights(sup, peer)?.may_act_on(&n)?;
    }
    Ok(n)
}

/// The names the caller may see, below `path` if given.
fn visible(sup: &Supervisor, peer: &Peer, path: Option<&Path>) -> Result<Vec<String>, String> {
    let rights = rights_unless_root(sup, peer)?;
    Ok(sup
        .names()
        .into_iter()
        .filter(|n| {
            let Ok(name) = n.parse::<Name>() else {
                return false;
            };
            path.is_none_or(|p| p.is_prefix_of(&name.to_path()) && *p != name.to_path())
                && rights.as_ref().is_none_or(|r| r.sees(&name))
        })
        .collect())
}

/// Check a `create`'s command line: a `tt-host run` one, with nothing
/// that is the daemon's to set, and every path absolute.
fn check_run_args(name: &str, args: &[String]) -> Result<(), String> {
    let run = match cli::parse_run(args) {
        Ok(Parsed::Run(r)) => r,
        Ok(_) => return Err("create: no IMAGE given".into()),
        Err(e) => return Err(e.msg),
    };
    let daemons = [
        (
            run.name.is_some(),
            "--name (the unikernel's name is create's NAME)",
        ),
        (
            run.state_dir.is_some(),
            "--state-dir (the daemon's own is used)",
        ),
        (run.no_seccomp, "--no-seccomp"),
        (
            run.client.is_some(),
            "--x-client (the caller is the client)",
        ),
    ];
    if let Some((_, what)) = daemons.iter().find(|(given, _)| *given) {
        return Err(format!(
            "create {name}: {what} cannot be given through the daemon"
        ));
    }
    if !run.image.is_absolute() {
        return Err(format!(
            "create {name}: the image path {} is not absolute",
            run.image.display()
        ));
    }
    for d in &run.devices {
        if d.option == "block" && !std::path::Path::new(&d.value).is_absolute() {
            return Err(format!(
                "create {name}: the block image path {} is not absolute",
                d.value
            ));
        }
        if d.value.starts_with('@') {
            return Err(format!(
                "create {name}: --{}={}: file descriptors cannot be passed to the daemon; \
                 name the file or TAP",
                d.option, d.value
            ));
        }
    }
    Ok(())
}

/// Carry out a [`Op::Control`] on the unit whose control socket is
/// `socket`. The daemon talks to the socket; what the caller names (the
/// snapshot's directory, the migration's target and key file) it reaches
/// with the caller's rights ([`as_caller`]), so a caller cannot write or
/// connect anywhere through the daemon that it could not itself.
fn control(socket: &std::path::Path, peer: &Peer, op: Op) -> Result<String, String> {
    let Op::Control {
        action,
        dir,
        stop,
        to,
        psk,
        downtime_ms,
        timeout_s,
        ..
    } = op
    else {
        unreachable!("only Control")
    };
    let e = |e: crate::control::ControlError| e.to_string();
    match action.as_str() {
        "snapshot" => {
            let dir = std::path::PathBuf::from(dir.unwrap_or_default());
            let files = as_caller(peer, || crate::control::snapshot_files(&dir))?.map_err(e)?;
            crate::control::snapshot_into(socket, &dir, files, stop).map_err(e)
        }
        "migrate" => {
            let to: crate::migration::Addr = to.unwrap_or_default().parse()?;
            let conn = as_caller(peer, || {
                let key = psk
                    .map(|p| crate::migration::auth::read_key(std::path::Path::new(&p)))
                    .transpose()?;
                crate::control::connect_target(&to, key.as_deref())
            })??;
            crate::control::migrate_over(socket, conn, downtime_ms, timeout_s.map(|s| s * 1000))
                .map_err(e)
        }
        _ => {
            let req = crate::control::Request {
                op: action,
                stop: false,
                downtime_ms: None,
                max_ms: None,
            };
            crate::control::call(socket, &req, &[]).map_err(e)
        }
    }
}

/// Run `f` on this thread with the caller's file-system identity (fsuid,
/// fsgid, supplementary groups: per thread, raw system calls, not glibc's
/// process-wide wrappers), then go back to root's. Files it opens or
/// creates, and Unix sockets it connects to, are checked against the
/// caller's rights.
fn as_caller<T>(peer: &Peer, f: impl FnOnce() -> T) -> Result<T, String> {
    if peer.is_root() {
        return Ok(f());
    }
    // SAFETY: per-thread credential system calls with valid arguments;
    // `groups` outlives the call.
    let switch = |uid: u32, gid: u32, groups: &[u32]| unsafe {
        libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) == 0
            && libc::syscall(libc::SYS_setfsgid, gid) >= 0
            && libc::syscall(libc::SYS_setfsuid, uid) >= 0
    };
    let back = || switch(0, 0, &[]);
    if !switch(peer.uid, peer.gid, &peer.groups) {
        back();
        return Err("cannot take the caller's identity".into());
    }
    let r = f();
    if !back() {
        // A daemon thread that cannot become root again must not serve on.
        eprintln!("tt-host daemon: cannot restore root's file-system identity; exiting");
        std::process::exit(1);
    }
    Ok(r)
}

/// Everything about a request that can be checked without the daemon's
/// state: names and paths parse, a create's command line is one the
/// daemon takes, a policy command parses. The fuzz target
/// `control_protocol` runs every decoded request through it.
pub fn vet(op: &Op) -> Result<(), String> {
    match op {
        Op::Create(u) => vet_unit(u),
        Op::EnvCreate {
            name,
            lifetime_s,
            units,
            ..
        } => {
            parse_name(name)?;
            if *lifetime_s == 0 {
                return Err("env create: a lifetime of at least 1 second".into());
            }
            units.iter().try_for_each(vet_unit)
        }
        Op::EnvExtend { name, .. }
        | Op::EnvStop { name }
        | Op::EnvStart { name }
        | Op::EnvDestroy { name }
        | Op::DiskSnapshot { name, .. }
        | Op::DiskRevert { name, .. }
        | Op::DiskSnapshots { name } => parse_name(name).map(drop),
        Op::TemplateAdd { disk, .. } if !disk.starts_with('/') => {
            Err("template add: the disk's path must be absolute".into())
        }
        Op::ClusterAdmit { name, .. } => parse_name(name).map(drop),
        Op::ClusterList | Op::ClusterEnvList => Ok(()),
        Op::EnvList | Op::TemplateList | Op::TemplateAdd { .. } | Op::TemplateRemove { .. } => {
            Ok(())
        }
        Op::Destroy { name } | Op::Restart { name } | Op::Info { name } => {
            parse_name(name).map(drop)
        }
        Op::Control {
            name,
            action,
            dir,
            to,
            ..
        } => {
            parse_name(name)?;
            match action.as_str() {
                "pause" | "resume" | "status" => Ok(()),
                "snapshot" => match dir {
                    Some(d) if d.starts_with('/') => Ok(()),
                    _ => Err("snapshot needs an absolute directory".into()),
                },
                "migrate" => match to {
                    Some(t) => t.parse::<crate::migration::Addr>().map(drop),
                    None => Err("migrate needs a target (--to)".into()),
                },
                a => Err(format!(
                    "unknown action '{}' (pause, resume, status, snapshot, migrate)",
                    crate::text::quote(a)
                )),
            }
        }
        Op::Console { name, .. } | Op::Stats { name: Some(name) } => parse_name(name).map(drop),
        Op::List { path: Some(p) } => p
            .parse::<Path>()
            .map(drop)
            .map_err(|e| format!("bad path: {e}")),
        Op::List { path: None } | Op::Stats { name: None } | Op::Metrics => Ok(()),
        Op::Policy { args } => cli::parse_policy(args).map(drop).map_err(|e| e.msg),
        Op::PoolCreate { .. }
        | Op::PoolShow { .. }
        | Op::PoolReserve { .. }
        | Op::KeyAdd { .. } => Ok(()),
    }
}

/// A unikernel to create: its name, command line and options.
fn vet_unit(u: &NewUnit) -> Result<(), String> {
    parse_name(&u.name)?;
    check_run_args(&u.name, &u.args)?;
    if let Some(e) = &u.env {
        parse_name(e)?;
    }
    for p in &u.ports {
        crate::envnet::Forward::parse(p).map_err(|e| format!("--port={p}: {e}"))?;
    }
    let env_only = !u.ports.is_empty() || u.env_net.is_some() || !u.ip_args.is_empty();
    if env_only && u.env.is_none() {
        return Err(format!(
            "create {}: --env-net, --port and --ip-arg need --env",
            u.name
        ));
    }
    Ok(())
}

/// May the caller create `u` (its name, its pool, its environment)?
fn may_create(sup: &Supervisor, peer: &Peer, u: &NewUnit) -> Result<(), String> {
    may_act(sup, peer, &u.name)?;
    vet_unit(u)?;
    if let Some(p) = &u.pool {
        may_use_pool(sup, peer, p)?;
    }
    if let Some(e) = &u.env {
        may_act(sup, peer, e)?;
    }
    Ok(())
}

/// Check that the caller may act on environment `name`: the rights on
/// it as a name of the tree.
fn may_act_env(sup: &Supervisor, peer: &Peer, name: &str) -> Result<String, String> {
    let n = may_act(sup, peer, name)?.to_string();
    if sup.env_owner(&n).is_none() {
        return Err(sup.no_env(&n));
    }
    Ok(n)
}

fn text_or_error(r: Result<String, String>) -> Reply {
    match r {
        Ok(text) => Reply::Text { text },
        Err(e) => error(e),
    }
}

fn ok_or_error(r: Result<String, String>) -> Reply {
    match r {
        Ok(message) => Reply::Ok { message },
        Err(e) => error(e),
    }
}

async fn handle(sup: &Arc<Supervisor>, peer: &Peer, op: Op, received: Instant) -> Reply {
    // On a cluster node, a pool another node created reaches this node's
    // mirror within a second; one named before that is looked up now.
    let pool_named = match &op {
        Op::Create(u) => u.pool.clone(),
        Op::EnvCreate { units, .. } => units.iter().find_map(|u| u.pool.clone()),
        _ => None,
    };
    let unknown = |p: &String| {
        (sup.pools.lock().unwrap_or_else(|e| e.into_inner()))
            .meta(p)
            .is_none()
    };
    if pool_named.as_ref().is_some_and(unknown) {
        if let Err(e) = sup.refresh_pools().await {
            log::warn!("cluster: pools: {e}");
        }
    }
    match op {
        Op::Create(u) if u.anywhere => {
            if let Err(e) = may_create(sup, peer, &u) {
                return error(e);
            }
            if u.env.is_some() {
                return error("create: --anywhere and --env cannot go together (an environment is one node's)");
            }
            ok_or_error(create_anywhere(sup, peer, u, received).await)
        }
        Op::Create(u) => {
            if let Err(e) = may_create(sup, peer, &u) {
                return error(e);
            }
            let name = u.name.clone();
            match sup.create_unit(u, peer.owner(), received).await {
                Ok(s) => Reply::Started {
                    name,
                    pid: s.pid,
                    daemon_us: s.daemon_us,
                    persist_us: s.persist_us,
                },
                Err(e) => error(e),
            }
        }
        Op::EnvCreate {
            name,
            lifetime_s,
            deny_outgoing,
            blacklist,
            bridge,
            subnet,
            units,
            anywhere,
        } => {
            let checked = (|| {
                may_act(sup, peer, &name)?;
                if lifetime_s == 0 {
                    return Err("env create: a lifetime of at least 1 second".to_string());
                }
                for u in &units {
                    if u.env.as_deref().is_some_and(|e| e != name) {
                        return Err(format!("{}: --env names another environment", u.name));
                    }
                    may_act(sup, peer, &u.name)?;
                    vet_unit(u)?;
                    if let Some(p) = &u.pool {
                        may_use_pool(sup, peer, p)?;
                    }
                }
                Ok(())
            })();
            if let Err(e) = checked {
                return error(e);
            }
            let req = super::supervisor::EnvRequest {
                name,
                owner: peer.owner(),
                lifetime: Duration::from_secs(lifetime_s),
                deny_outgoing,
                blacklist,
                bridge,
                subnet,
                units,
            };
            if anywhere {
                return ok_or_error(sup.env_create_anywhere(req).await);
            }
            ok_or_error(sup.env_create(req).await)
        }
        Op::EnvExtend { name, by_s } => match may_act_env(sup, peer, &name) {
            Ok(n) => ok_or_error(sup.env_extend(&n, Duration::from_secs(by_s)).await),
            Err(e) => error(e),
        },
        Op::EnvStop { name } => match may_act_env(sup, peer, &name) {
            Ok(n) => ok_or_error(sup.env_stop(&n).await),
            Err(e) => error(e),
        },
        Op::EnvStart { name } => match may_act_env(sup, peer, &name) {
            Ok(n) => ok_or_error(sup.env_start(&n).await),
            Err(e) => error(e),
        },
        Op::EnvDestroy { name } => match may_act_env(sup, peer, &name) {
            Ok(n) => ok_or_error(sup.env_destroy(&n).await),
            Err(e) => error(e),
        },
        Op::EnvList => match rights_unless_root(sup, peer) {
            Ok(rights) => Reply::Text {
                text: sup.env_list(|e| sees(&rights, &e.name)),
            },
            Err(e) => error(e),
        },
        Op::TemplateAdd { name, disk } => {
            if !peer.is_root() {
                return error(format!(
                    "uid {} may not add templates (root only)",
                    peer.uid
                ));
            }
            let opened = as_caller(peer, || std::fs::File::open(&disk));
            match opened {
                Ok(Ok(f)) => {
                    let path = format!("/proc/self/fd/{}", f.as_raw_fd());
                    ok_or_error(sup.template_add(&name, std::path::Path::new(&path)))
                }
                Ok(Err(e)) => error(format!("template add: {disk}: {e}")),
                Err(e) => error(e),
            }
        }
        Op::TemplateList => text_or_error(sup.template_list()),
        Op::TemplateRemove { name } => {
            if !peer.is_root() {
                return error(format!(
                    "uid {} may not remove templates (root only)",
                    peer.uid
                ));
            }
            ok_or_error(sup.template_remove(&name))
        }
        Op::DiskSnapshot {
            name,
            snap,
            device,
            life_time_s,
        } => match may_act(sup, peer, &name) {
            Ok(n) => ok_or_error(
                sup.disk_snapshot(
                    &n.to_string(),
                    &snap,
                    device.as_deref(),
                    life_time_s.map(Duration::from_secs),
                )
                .await,
            ),
            Err(e) => error(e),
        },
        Op::DiskRevert { name, snap, device } => match may_act(sup, peer, &name) {
            Ok(n) => ok_or_error(
                sup.disk_revert(&n.to_string(), &snap, device.as_deref())
                    .await,
            ),
            Err(e) => error(e),
        },
        Op::DiskSnapshots { name } => match may_act(sup, peer, &name) {
            Ok(n) => text_or_error(sup.disk_snapshots(&n.to_string())),
            Err(e) => error(e),
        },
        Op::Destroy { name } => match may_act(sup, peer, &name) {
            Ok(n) => match sup.destroy(&n.to_string()).await {
                Ok(message) => Reply::Ok { message },
                Err(e) => error(e),
            },
            Err(e) => error(e),
        },
        Op::Restart { name } => match may_act(sup, peer, &name) {
            Ok(n) => match sup.restart(&n.to_string(), received).await {
                Ok(s) => Reply::Started {
                    name: n.to_string(),
                    pid: s.pid,
                    daemon_us: s.daemon_us,
                    persist_us: s.persist_us,
                },
                Err(e) => error(e),
            },
            Err(e) => error(e),
        },
        Op::List { path } => {
            let path = match path.map(|p| p.parse::<Path>()).transpose() {
                Ok(p) => p,
                Err(e) => return error(format!("bad path: {e}")),
            };
            match visible(sup, peer, path.as_ref()) {
                Ok(names) => Reply::List {
                    units: names.iter().filter_map(|n| sup.info(n, false)).collect(),
                },
                Err(e) => error(e),
            }
        }
        op @ Op::Control { .. } => {
            if let Err(e) = vet(&op) {
                return error(e);
            }
            let Op::Control { ref name, .. } = op else {
                unreachable!()
            };
            let n = match may_act(sup, peer, name) {
                Ok(n) => n.to_string(),
                Err(e) => return error(e),
            };
            if sup.info(&n, false).is_none() {
                return error(format!("no unikernel named {n}"));
            }
            let socket = sup.unit_dir(&n).join("control");
            let peer = peer.clone();
            match tokio::task::spawn_blocking(move || control(&socket, &peer, op)).await {
                Ok(Ok(message)) => Reply::Ok { message },
                Ok(Err(e)) => error(format!("{n}: {e}")),
                Err(e) => error(format!("{n}: {e}")),
            }
        }
        Op::Info { name } => match may_act(sup, peer, &name) {
            Ok(n) => match sup.info(&n.to_string(), true) {
                Some(unit) => Reply::Info { unit },
                None => error(format!("no unikernel named {n}")),
            },
            Err(e) => error(e),
        },
        Op::Stats { name: Some(name) } => match may_act(sup, peer, &name) {
            Ok(n) => match sup.stats(&n.to_string()) {
                Some(s) => Reply::Stats { units: vec![s] },
                None => error(format!("no unikernel named {n}")),
            },
            Err(e) => error(e),
        },
        Op::Stats { name: None } => match visible(sup, peer, None) {
            Ok(names) => Reply::Stats {
                units: names.iter().filter_map(|n| sup.stats(n)).collect(),
            },
            Err(e) => error(e),
        },
        Op::Metrics => match visible(sup, peer, None) {
            Ok(names) => {
                let units: Vec<_> = names.iter().filter_map(|n| sup.stats(n)).collect();
                Reply::Text {
                    text: super::metrics::render(&units),
                }
            }
            Err(e) => error(e),
        },
        Op::Policy { args } => {
            #[cfg(feature = "cluster")]
            if let Some(node) = sup.cluster.get() {
                return cluster_policy(sup, node, peer, &args).await;
            }
            policy(sup, peer, &args)
        }
        Op::ClusterAdmit {
            name,
            memory_mb,
            block_mb,
            incoming,
        } => {
            let n = match may_act(sup, peer, &name) {
                Ok(n) => n,
                Err(e) => return error(e),
            };
            let claim = crate::cluster::check::Claim {
                memory_mb,
                block_mb,
            };
            ok_or_error(cluster_admit(sup, &n, claim, incoming).await)
        }
        Op::ClusterList => match rights_unless_root(sup, peer) {
            Ok(rights) => text_or_error(cluster_list(sup, &|n| sees(&rights, n)).await),
            Err(e) => error(e),
        },
        Op::ClusterEnvList => match rights_unless_root(sup, peer) {
            Ok(rights) => text_or_error(sup.cluster_env_list(&|n| sees(&rights, n)).await),
            Err(e) => error(e),
        },
        Op::Console { .. } => error("console requests are served on their own"),
        Op::PoolCreate {
            name,
            owner,
            sponsor,
            nodes,
        } => {
            if !peer.is_root() {
                return error(format!("uid {} may not create pools (root only)", peer.uid));
            }
            let meta = super::pools::Meta { owner, sponsor };
            let clustered = sup
                .pools
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_clustered();
            let r = if clustered {
                sup.cluster_pool_create(&name, meta, nodes).await
            } else if nodes.is_some() {
                Err("pool create --nodes: this daemon is not a cluster node (no --cluster)".into())
            } else {
                sup.pools.lock().unwrap_or_else(|p| p.into_inner()).create(
                    &name,
                    meta,
                    sys::now_ns(),
                )
            };
            match r {
                Ok(()) => Reply::Ok {
                    message: format!(
                        "pool {name} created (empty: top it up with 'tt-host pool reserve')"
                    ),
                },
                Err(e) => error(e),
            }
        }
        Op::PoolShow { name } => {
            if let Err(e) = sup.refresh_pools().await {
                return error(format!("cannot read the cluster's pools: {e}"));
            }
            let mut pools = sup.pools.lock().unwrap_or_else(|p| p.into_inner());
            let names = match name {
                Some(n) => vec![n],
                None => pools.names(),
            };
            let mut text = String::new();
            for n in names {
                let owner = pools.meta(&n).map(|m| (m.owner.clone(), m.sponsor.clone()));
                let allowed = peer.is_root()
                    || owner.as_ref().is_some_and(|(o, s)| {
                        user_is(peer.uid, o) || s.as_ref().is_some_and(|s| user_is(peer.uid, s))
                    });
                if !allowed {
                    continue;
                }
                match pools.show(&n, sys::now_ns(), false) {
                    Ok(t) => text += &t,
                    Err(e) => return error(e),
                }
            }
            Reply::Text { text }
        }
        Op::PoolReserve { envelope } => {
            let clustered = sup
                .pools
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_clustered();
            let r = if clustered {
                sup.cluster_reserve(envelope.as_bytes()).await
            } else {
                sup.pools
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .reserve(envelope.as_bytes(), sys::now_ns())
            };
            sup.pools_changed.notify_one();
            match r {
                Ok(message) => Reply::Ok { message },
                Err(e) => error(format!("reservation refused: {e}")),
            }
        }
        Op::KeyAdd { user, key } => {
            if !peer.is_root() {
                return error(format!("uid {} may not add keys (root only)", peer.uid));
            }
            let clustered = sup
                .pools
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_clustered();
            let added = if clustered {
                sup.cluster_key_add(&user, &key).await
            } else {
                sup.pools
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .add_key(&user, &key)
            };
            match added {
                Ok(true) => Reply::Ok {
                    message: format!("key added for {user}"),
                },
                Ok(false) => Reply::Ok {
                    message: format!("{user} has that key already"),
                },
                Err(e) => error(e),
            }
        }
    }
}

/// Is `name` the user `uid` (its number, or its name in the passwd
/// database)?
fn user_is(uid: u32, name: &str) -> bool {
    if name == uid.to_string() {
        return true;
    }
    let mut buf = vec![0u8; 4096];
    // SAFETY: pw, result and buf are live and sized for getpwuid_r.
    unsafe {
        let mut pw: libc::passwd = std::mem::zeroed();
        let mut result = std::ptr::null_mut();
        let rc = libc::getpwuid_r(
            uid,
            &mut pw,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        );
        rc == 0
            && !result.is_null()
            && std::ffi::CStr::from_ptr(pw.pw_name).to_bytes() == name.as_bytes()
    }
}

/// May the caller create unikernels into `pool`? root, or its owner.
fn may_use_pool(sup: &Supervisor, peer: &Peer, pool: &str) -> Result<(), String> {
    let pools = sup.pools.lock().unwrap_or_else(|p| p.into_inner());
    let meta = pools
        .meta(pool)
        .ok_or_else(|| format!("no pool named {pool}"))?;
    if peer.is_root() || user_is(peer.uid, &meta.owner) {
        Ok(())
    } else {
        Err(format!(
            "uid {} may not create into pool {pool} (it is {}'s)",
            peer.uid, meta.owner
        ))
    }
}

fn policy(sup: &Supervisor, peer: &Peer, args: &[String]) -> Reply {
    let state = StateDir::resolve(Some(&sup.cfg.state_dir));
    let cmd = match cli::parse_policy(args) {
        Ok(c) => c,
        Err(e) => return error(e.msg),
    };
    let check = |f: &dyn Fn(&Rights) -> Result<(), String>| check_rights(sup, peer, f);
    let dir_given = || error("policy: --state-dir cannot be given through the daemon");
    match cmd {
        PolicyCmd::Help => Reply::Text {
            text: cli::POLICY_USAGE.to_string(),
        },
        PolicyCmd::Set {
            path,
            change,
            state_dir,
        } => {
            if state_dir.is_some() {
                return dir_given();
            }
            if let Err(e) = check(&|r| r.may_change_policy(&path)) {
                return error(e);
            }
            match state.set_policy(&path, &change) {
                Ok(_) => Reply::Ok {
                    message: String::new(),
                },
                Err(e) => error(e.to_string()),
            }
        }
        PolicyCmd::Remove { path, state_dir } => {
            if state_dir.is_some() {
                return dir_given();
            }
            if let Err(e) = check(&|r| r.may_change_policy(&path)) {
                return error(e);
            }
            match state.remove_policy(&path) {
                Ok(()) => Reply::Ok {
                    message: String::new(),
                },
                Err(e) => error(e.to_string()),
            }
        }
        PolicyCmd::Show { path, state_dir } => {
            if state_dir.is_some() {
                return dir_given();
            }
            if let Err(e) = check(&|r| r.may_show(&path)) {
                return error(e);
            }
            match state.show(&path) {
                Ok(text) => Reply::Text { text },
                Err(e) => error(e.to_string()),
            }
        }
    }
}

/// Admit `name` through this node's cluster.
#[cfg(feature = "cluster")]
async fn cluster_admit(
    sup: &Supervisor,
    name: &Name,
    claim: crate::cluster::check::Claim,
    incoming: bool,
) -> Result<String, String> {
    match sup.cluster.get() {
        Some(node) => (node.admit(name, claim, incoming).await).map(|()| String::new()),
        None => Err("this daemon is not a cluster node (no --cluster)".into()),
    }
}

#[cfg(not(feature = "cluster"))]
async fn cluster_admit(
    _: &Supervisor,
    _: &Name,
    _: crate::cluster::check::Claim,
    _: bool,
) -> Result<String, String> {
    Err("this daemon is not a cluster node (no --cluster)".into())
}

/// `create --anywhere`: on the node with room.
#[cfg(feature = "cluster")]
async fn create_anywhere(
    sup: &Arc<Supervisor>,
    peer: &Peer,
    u: NewUnit,
    received: Instant,
) -> Result<String, String> {
    let Some(node) = sup.cluster.get() else {
        return Err("create --anywhere: this daemon is not a cluster node (no --cluster)".into());
    };
    let name = u.name.clone();
    let mut local = u.clone();
    local.anywhere = false;
    let here = {
        let sup = sup.clone();
        let owner = peer.owner();
        async move { sup.create_unit(local, owner, received).await.map(|s| s.pid) }
    };
    // A pool's node list narrows the choice.
    let allowed = (u.pool.as_ref()).and_then(|p| {
        sup.pools
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .nodes_of(p)
    });
    let (on, pid) = node.create_anywhere(u, peer.owner(), allowed, here).await?;
    Ok(format!("{name}: created on node {on}, pid {pid}"))
}

#[cfg(not(feature = "cluster"))]
async fn create_anywhere(
    _: &Arc<Supervisor>,
    _: &Peer,
    _: NewUnit,
    _: Instant,
) -> Result<String, String> {
    Err("create --anywhere: this daemon is not a cluster node (no --cluster)".into())
}

/// `list --cluster`: every reservation in the cluster that `sees` allows.
#[cfg(feature = "cluster")]
async fn cluster_list(
    sup: &Supervisor,
    sees: &(dyn Fn(&str) -> bool + Sync),
) -> Result<String, String> {
    let Some(node) = sup.cluster.get() else {
        return Err("this daemon is not a cluster node (no --cluster)".into());
    };
    let mut all = node
        .cluster
        .reservations()
        .await
        .map_err(|e| e.to_string())?;
    all.sort_by(|a, b| (&a.node, &a.name).cmp(&(&b.node, &b.name)));
    let mut out = format!(
        "{:<12} {:<32} {:>8} {:>8}  SINCE\n",
        "NODE", "NAME", "MEM MB", "BLOCK MB"
    );
    let lost = node.lost.lock().unwrap_or_else(|p| p.into_inner()).clone();
    for r in all.iter().filter(|r| sees(&r.name)) {
        let since = std::time::UNIX_EPOCH + Duration::from_nanos(r.time_ns);
        out += &format!(
            "{:<12} {:<32} {:>8} {:>8}  {}\n",
            r.node,
            r.name,
            r.claim.memory_mb,
            r.claim.block_mb,
            humantime::format_rfc3339_seconds(since)
        );
    }
    for (n, name, when) in lost.iter().filter(|(_, name, _)| sees(name)) {
        let when = std::time::UNIX_EPOCH + Duration::from_nanos(*when);
        out += &format!(
            "{:<12} {:<32} {:>8} {:>8}  LOST (node gone {})\n",
            n,
            name,
            "-",
            "-",
            humantime::format_rfc3339_seconds(when)
        );
    }
    Ok(out)
}

#[cfg(not(feature = "cluster"))]
async fn cluster_list(_: &Supervisor, _: &(dyn Fn(&str) -> bool + Sync)) -> Result<String, String> {
    Err("this daemon is not a cluster node (no --cluster)".into())
}

/// `policy ... --daemon` on a cluster node: the cluster's policies, in
/// etcd (each node's own state directory keeps its host's).
#[cfg(feature = "cluster")]
async fn cluster_policy(
    sup: &Supervisor,
    node: &super::cluster::Node,
    peer: &Peer,
    args: &[String],
) -> Reply {
    let cmd = match cli::parse_policy(args) {
        Ok(c) => c,
        Err(e) => return error(e.msg),
    };
    let check = |f: &dyn Fn(&Rights) -> Result<(), String>| check_rights(sup, peer, f);
    let c = &node.cluster;
    match cmd {
        PolicyCmd::Help => Reply::Text {
            text: cli::POLICY_USAGE.to_string(),
        },
        PolicyCmd::Set {
            state_dir: Some(_), ..
        }
        | PolicyCmd::Remove {
            state_dir: Some(_), ..
        }
        | PolicyCmd::Show {
            state_dir: Some(_), ..
        } => error("policy: --state-dir cannot be given through the daemon"),
        PolicyCmd::Set { path, change, .. } => {
            if let Err(e) = check(&|r| r.may_change_policy(&path)) {
                return error(e);
            }
            let r = async {
                let mut p = c.policy(&path).await?.unwrap_or_default();
                change.apply(&mut p);
                c.put_policy(&path, Some(&p)).await
            };
            match r.await {
                Ok(()) => Reply::Ok {
                    message: format!("cluster policy at {path} set"),
                },
                Err(e) => error(e.to_string()),
            }
        }
        PolicyCmd::Remove { path, .. } => {
            if let Err(e) = check(&|r| r.may_change_policy(&path)) {
                return error(e);
            }
            match c.put_policy(&path, None).await {
                Ok(()) => Reply::Ok {
                    message: format!("cluster policy at {path} removed"),
                },
                Err(e) => error(e.to_string()),
            }
        }
        PolicyCmd::Show { path, .. } => {
            if let Err(e) = check(&|r| r.may_show(&path)) {
                return error(e);
            }
            let r = async {
                let policy = c.policy(&path).await?;
                let usage = c.usage(&path).await?;
                Ok::<_, crate::cluster::store::ClusterError>(format!(
                    "cluster policy at {path}: {}\ncluster usage below {path}: {} unikernel(s), \
                     {} MB memory, {} MB block\n",
                    match policy {
                        Some(p) => serde_json::to_string(&p).expect("encodes"),
                        None => "none set (inherited)".into(),
                    },
                    usage.unikernels,
                    usage.memory_mb,
                    usage.block_mb
                ))
            };
            match r.await {
                Ok(text) => Reply::Text { text },
                Err(e) => error(e.to_string()),
            }
        }
    }
}

fn records(read: super::unitfiles::Read) -> (Vec<ConsoleRecord>, u64, u64) {
    (read.records, read.next, read.lost)
}

/// `console`: what is kept (all, the last N lines, or since a time), then
/// with `follow` what comes, until the client closes or the unit goes.
async fn console(sup: &Arc<Supervisor>, peer: &Peer, req: Request, stream: &mut UnixStream) {
    let Op::Console {
        name,
        since_ns,
        last,
        follow,
    } = req.op
    else {
        return;
    };
    let name = match may_act(sup, peer, &name) {
        Ok(n) => n.to_string(),
        Err(e) => {
            let _ = send(stream, &error(e)).await;
            return;
        }
    };
    if !sup.exists(&name) {
        let _ = send(stream, &error(format!("no unikernel named {name}"))).await;
        return;
    }
    let mut log = None;
    let mut pos = 0u64;
    let mut first = true;
    loop {
        if log.is_none() {
            log = sup.console(&name).ok();
        }
        if let Some(c) = &log {
            let read = if first {
                first = false;
                match (last, since_ns) {
                    (Some(n), _) => c.last(n as usize),
                    (None, Some(t)) => c.since(t),
                    (None, None) => c.oldest().and_then(|from| c.read_from(from)),
                }
            } else {
                c.read_from(pos)
            };
            match read {
                Ok(r) => {
                    let (records, next, lost) = records(r);
                    let progressed = next != pos;
                    pos = next;
                    if (!records.is_empty() || lost > 0)
                        && send(stream, &Reply::Console { records, lost })
                            .await
                            .is_err()
                    {
                        return;
                    }
                    if progressed {
                        // More may be waiting right away.
                        continue;
                    }
                }
                Err(e) => {
                    let _ = send(stream, &error(format!("{name}: console: {e}"))).await;
                    return;
                }
            }
        } else if !follow {
            let _ = send(stream, &error(format!("{name}: no console yet"))).await;
            return;
        }
        if !follow || !sup.exists(&name) {
            let _ = send(
                stream,
                &Reply::Ok {
                    message: String::new(),
                },
            )
            .await;
            return;
        }
        // Wait for more, or for the client to go.
        let mut b = [0u8; 1];
        tokio::select! {
            _ = tokio::time::sleep(FOLLOW_POLL) => {}
            r = stream.read(&mut b) => {
                if matches!(r, Ok(0) | Err(_)) {
                    return;
                }
            }
        }
    }
}
