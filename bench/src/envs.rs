//! `tt-bench envs`: an environment of 10 unikernels with port forwards
//! made in one request (issue 21), against 10 sequential creates.
//!
//! Each round, through one `tt-host daemon`, times whole client commands
//! (wall time from spawn to exit; each returns when what it asked for is
//! up, i.e. every `tt-host run` has reported its guest about to run):
//!
//! - **env**: `tt-host env create benv --lifetime=1h --units=FILE`, FILE
//!   listing 10 `net` guests, each on the env's network (`--env-net`) with
//!   one port forward (host ports 18000-18009 to the guest's TCP echo).
//!   The daemon makes the bridge and the nftables table, a TAP and an
//!   address per unit in order, then starts the 10 at once.
//! - **sequential** (the baseline the issue names): 10 `tt-host create`
//!   of the same guest, one after the other, no environment. hvt needs the
//!   guest's net device attached, so each gets a TAP the bench made before
//!   the first round (on a bridge of its own), untimed: the baseline does
//!   no network work at all.
//! - **env, no forwards**: the same env create with the `--port`s left
//!   out, which shows what the forwards cost.
//! - **joined**: an empty env made first (`env create` with no units,
//!   timed on its own: the env's fixed cost), then 10 sequential
//!   `tt-host create --env --env-net --port`, each making its TAP and
//!   rewriting the env's table. Against **env**, this separates the
//!   parallel start from the env's own work.
//! - **nft load**: one `envnet::apply` (`nft -f -`) of a table with 10
//!   forwards, done by the bench, 10 per round: what the daemon pays each
//!   time it rewrites an env's rules.
//!
//! After each timed step, every guest is checked to echo over TCP (through
//! its forward, or at its address for the baseline), untimed; then the
//! env is destroyed or the unikernels are (untimed).
//!
//! The bench first moves itself into a network namespace of its own
//! (`unshare(CLONE_NEWNET)`, which needs root; with a mount namespace
//! whose /sys is that namespace's), so the daemon and the guests it
//! starts inherit it: the bridges, TAPs and nftables tables never touch
//! the machine's network, and go with the namespace when the bench
//! exits, also after an error. The daemon runs with
//! `--env-mgmt-interval=0` (a destroy right after a create is refused
//! otherwise).

use crate::daemon::{self, Daemon};
use crate::stats::{fmt, summarize, Summary};
use crate::{Opts, Verdict};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use tt_host::daemon::proto::Op;
use tt_host::envnet;

const DEFAULT_RUNS: usize = 5;
/// Unikernels per environment (the figure is for 10).
const UNITS: usize = 10;
/// The guests' TCP echo port.
const ECHO: u16 = 7;
/// Host ports forwarded to the env's units: `FORWARD_BASE + i`.
const FORWARD_BASE: u16 = 18000;
/// ... and to the joined env's units.
const JOINED_BASE: u16 = 19000;
/// Subnets (their first address is the host's, on the bridge).
const ENV_NET: [u8; 3] = [10, 231, 1];
const BASE_NET: [u8; 3] = [10, 231, 2];
const JOINED_NET: [u8; 3] = [10, 231, 3];
const PLAIN_ENV_NET: [u8; 3] = [10, 231, 4];
/// The baseline's bridge; its TAPs are `BASE_BRIDGE` + `t<i>`.
const BASE_BRIDGE: &str = "ttbench0";

fn addr(net: [u8; 3], host: u8) -> Ipv4Addr {
    Ipv4Addr::new(net[0], net[1], net[2], host)
}

fn cvt(r: libc::c_int, what: &str) -> Result<(), String> {
    if r < 0 {
        return Err(format!("{what}: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Move this process into a fresh network namespace, with a mount
/// namespace of its own where /sys shows that network namespace's
/// interfaces (as `ip netns exec` does: tt-host looks TAPs up in
/// /sys/class/net), and bring its loopback up. Children inherit both.
fn own_netns() -> Result<(), String> {
    // SAFETY: unshare takes no pointers; it moves this process (one
    // thread so far: unshare(CLONE_NEWNS) needs that) into new network
    // and mount namespaces, which later children inherit.
    let r = unsafe { libc::unshare(libc::CLONE_NEWNET | libc::CLONE_NEWNS) };
    cvt(r, "cannot make a network namespace (unshare)").map_err(|e| {
        format!(
            "{e}\n  tt-bench envs needs root: the daemon makes bridges, TAPs and \
             nftables tables, in a namespace of the bench's own"
        )
    })?;
    let null = std::ptr::null();
    // SAFETY: mount and umount2 read the NUL-terminated static strings
    // they are given; null is allowed for the unused arguments. The
    // mounts change this process's new mount namespace only: it is made
    // a slave first, so nothing propagates back to the machine's.
    unsafe {
        let flags = libc::MS_SLAVE | libc::MS_REC;
        cvt(
            libc::mount(null, c"/".as_ptr(), null, flags, null as _),
            "cannot make / a slave mount",
        )?;
        // /sys may not be mounted at all: then there is nothing to undo.
        libc::umount2(c"/sys".as_ptr(), libc::MNT_DETACH);
        let sysfs = c"sysfs".as_ptr();
        cvt(
            libc::mount(sysfs, c"/sys".as_ptr(), sysfs, 0, null as _),
            "cannot mount sysfs on /sys in the bench's namespace",
        )?;
    }
    envnet::set_link_up("lo", true).map_err(|e| format!("in the bench's namespace: {e}"))
}

/// Fail early and clearly if `nft` cannot run here.
fn check_nft() -> Result<(), String> {
    let out = Command::new("nft")
        .args(["list", "tables"])
        .output()
        .or_else(|_| {
            Command::new("/usr/sbin/nft")
                .args(["list", "tables"])
                .output()
        })
        .map_err(|e| {
            format!(
                "cannot run nft ({e}): environments need nftables \
                 (apt-get install nftables)"
            )
        })?;
    if !out.status.success() {
        return Err(format!(
            "nft list tables failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// One `tt-host` client command, timed; an error unless it exits 0.
fn timed(d: &Daemon, tt_host: &Path, args: &[&str]) -> Result<Duration, String> {
    let r = crate::child::run(&mut d.cli(tt_host, args))?;
    if r.code != Some(0) {
        return Err(format!(
            "tt-host {} failed ({:?}): {}\n  {}\n  daemon log (end): {}",
            args.join(" "),
            r.code,
            r.stderr.trim(),
            r.stdout.trim(),
            tail(&d.log(), 15)
        ));
    }
    Ok(r.wall)
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n    ")
}

/// The `tt-host create` words (after NAME) of one net guest with TCP echo;
/// `net` are its network options.
fn guest_words(image: &Path, net: &[String], guest_args: &[String]) -> Vec<String> {
    let mut w = vec!["--mem=32".to_string()];
    w.extend(net.iter().cloned());
    w.push(image.display().to_string());
    w.push("--".into());
    w.push(format!("tcp-echo={ECHO}"));
    w.extend(guest_args.iter().cloned());
    w
}

/// An env unit's network options: its address from the daemon, and the
/// forward of host port `port` to its echo, if any.
fn env_net_words(port: Option<u16>) -> Vec<String> {
    let mut w = vec![
        "--env-net=service0".to_string(),
        "--ip-arg=ip={ip}/{prefix}".into(),
        "--ip-arg=gw={gateway}".into(),
    ];
    w.extend(port.map(|p| format!("--port={p}:{ECHO}")));
    w
}

/// A units file for `env create`: `UNITS` net guests named `PREFIX<i>`,
/// with forwards from `FORWARD_BASE + i` if `forwards`.
fn units_file(d: &Daemon, image: &Path, file: &str, forwards: bool) -> Result<PathBuf, String> {
    let lines: Vec<String> = (0..UNITS)
        .map(|i| {
            let port = forwards.then_some(FORWARD_BASE + i as u16);
            let words = guest_words(image, &env_net_words(port), &[]);
            format!("envu{i} {}", words.join(" "))
        })
        .collect();
    let path = d.dir.join(file);
    std::fs::write(&path, lines.join("\n") + "\n")
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path)
}

/// Send a line to `to` over TCP and expect it back, retrying for up to
/// 10 s (a guest reports ready before its network code runs).
fn echoes(to: SocketAddr) -> Result<(), String> {
    let try_once = || -> std::io::Result<bool> {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_millis(500))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        let line = b"tt-bench envs\n";
        s.write_all(line)?;
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        while got.len() < line.len() {
            let n = s.read(&mut buf)?;
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        Ok(got == line)
    };
    let t = Instant::now();
    let mut last = String::from("not tried");
    while t.elapsed() < Duration::from_secs(10) {
        match try_once() {
            Ok(true) => return Ok(()),
            Ok(false) => last = "the echo differed".into(),
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!("no TCP echo from {to} within 10 s: {last}"))
}

/// Check that every guest echoes at `targets`, naming the unit that did
/// not, with its console.
fn all_echo(d: &Daemon, tt_host: &Path, targets: &[(String, SocketAddr)]) -> Result<(), String> {
    for (name, to) in targets {
        echoes(*to).map_err(|e| {
            let console = d.cli(tt_host, &["console", name]).output();
            let console = console
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            format!("{name}: {e}\n  its console: {}", tail(&console, 10))
        })?;
    }
    Ok(())
}

fn destroy_env(d: &Daemon, name: &str) -> Result<(), String> {
    d.call(Op::EnvDestroy { name: name.into() })
        .map(drop)
        .map_err(|e| format!("env destroy {name}: {e}"))
}

fn destroy(d: &Daemon, name: &str) -> Result<(), String> {
    d.call(Op::Destroy { name: name.into() })
        .map(drop)
        .map_err(|e| format!("destroy {name}: {e}"))
}

/// What one round measured.
struct Round {
    env: Duration,
    env_no_forwards: Duration,
    sequential: Duration,
    empty_env: Duration,
    joined: Duration,
}

/// `env create benv` on `net` with the units of `file`, timed; every
/// unit checked to echo (through its forward from the host's address on
/// the bridge, or at its own address), then the env destroyed.
fn env_round(
    d: &Daemon,
    tt_host: &Path,
    net: [u8; 3],
    file: &Path,
    forwards: bool,
) -> Result<Duration, String> {
    let took = timed(
        d,
        tt_host,
        &[
            "env",
            "create",
            "benv",
            "--lifetime=1h",
            &format!("--subnet={}/24", addr(net, 0)),
            &format!("--units={}", file.display()),
        ],
    )?;
    let subnet = envnet::Subnet::new(addr(net, 0), 24).map_err(|e| e.to_string())?;
    let mut targets = Vec::new();
    for i in 0..UNITS {
        let to = if forwards {
            SocketAddr::from((subnet.gateway(), FORWARD_BASE + i as u16))
        } else {
            let ip = subnet.host(i as u32).ok_or("the subnet is too small")?;
            SocketAddr::from((ip, ECHO))
        };
        targets.push((format!("envu{i}"), to));
    }
    all_echo(d, tt_host, &targets)?;
    destroy_env(d, "benv")?;
    Ok(took)
}

fn round(d: &Daemon, tt_host: &Path, image: &Path, files: &[PathBuf; 2]) -> Result<Round, String> {
    // env: all 10 in one request, with forwards and without.
    let env = env_round(d, tt_host, ENV_NET, &files[0], true)?;
    let env_no_forwards = env_round(d, tt_host, PLAIN_ENV_NET, &files[1], false)?;

    // sequential: 10 creates, no env, TAPs made beforehand.
    let mut sequential = Duration::ZERO;
    let mut targets = Vec::new();
    for i in 0..UNITS {
        let name = format!("plain{i}");
        let ip = addr(BASE_NET, 2 + i as u8);
        let words = guest_words(
            image,
            &[format!("--net:service0={BASE_BRIDGE}t{i}")],
            &[format!("ip={ip}/24"), format!("gw={}", addr(BASE_NET, 1))],
        );
        let mut args = vec!["create", name.as_str()];
        args.extend(words.iter().map(String::as_str));
        sequential += timed(d, tt_host, &args)?;
        targets.push((name, SocketAddr::from((ip, ECHO))));
    }
    all_echo(d, tt_host, &targets)?;
    for (name, _) in &targets {
        destroy(d, name)?;
    }

    // joined: an empty env, then 10 creates into it.
    let empty_env = timed(
        d,
        tt_host,
        &[
            "env",
            "create",
            "bjoin",
            "--lifetime=1h",
            &format!("--subnet={}/24", addr(JOINED_NET, 0)),
        ],
    )?;
    let mut joined = Duration::ZERO;
    let mut targets = Vec::new();
    for i in 0..UNITS {
        let name = format!("joinu{i}");
        let port = JOINED_BASE + i as u16;
        let mut net = vec!["--env=bjoin".to_string()];
        net.extend(env_net_words(Some(port)));
        let words = guest_words(image, &net, &[]);
        let mut args = vec!["create", name.as_str()];
        args.extend(words.iter().map(String::as_str));
        joined += timed(d, tt_host, &args)?;
        targets.push((name, SocketAddr::from((addr(JOINED_NET, 1), port))));
    }
    all_echo(d, tt_host, &targets)?;
    destroy_env(d, "bjoin")?;

    Ok(Round {
        env,
        env_no_forwards,
        sequential,
        empty_env,
        joined,
    })
}

/// One load of an env's nftables table with `UNITS` forwards, as the
/// daemon does it (`envnet::apply`, i.e. `nft -f -`), `n` times; the
/// table is removed at the end.
fn nft_loads(n: usize) -> Result<Vec<Duration>, String> {
    let subnet = envnet::Subnet::new(addr(BASE_NET, 0), 24).map_err(|e| e.to_string())?;
    let mut net = envnet::EnvNet::new("tt-bench-nft", BASE_BRIDGE, subnet);
    for i in 0..UNITS {
        net.forwards.push(envnet::Forward {
            proto: envnet::Proto::Tcp,
            host_port: FORWARD_BASE + i as u16,
            guest: addr(BASE_NET, 2 + i as u8),
            guest_port: ECHO,
        });
    }
    let mut v = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        envnet::apply(&net).map_err(|e| format!("nft baseline: {e}"))?;
        v.push(t.elapsed());
    }
    envnet::remove_table(&net.table).map_err(|e| format!("nft baseline: {e}"))?;
    Ok(v)
}

fn row(what: &str, s: &Summary, per: Option<usize>) {
    let per = per.map_or(String::new(), |n| {
        format!("{:>10}", fmt(s.median / n as u32))
    });
    println!(
        "  {what:<40} {:>10} {:>10} {:>10}  {per}",
        fmt(s.median),
        fmt(s.max),
        fmt(s.min)
    );
}

pub fn run(o: &Opts) -> Result<Vec<Verdict>, String> {
    let tt_host = crate::tt_host(o)?;
    let image = crate::image(o, "net")?;
    let runs = o.runs.unwrap_or(DEFAULT_RUNS).max(1);
    own_netns()?;
    check_nft()?;
    envnet::create_bridge(BASE_BRIDGE, addr(BASE_NET, 1), 24)
        .map_err(|e| format!("the baseline's bridge: {e}"))?;
    for i in 0..UNITS {
        envnet::create_tap(&format!("{BASE_BRIDGE}t{i}"), BASE_BRIDGE, None)
            .map_err(|e| format!("the baseline's TAPs: {e}"))?;
    }
    let d = daemon::start(
        &tt_host,
        "TT_ENVS_BENCH_DIR",
        "target/tt-envs-bench",
        &["--env-mgmt-interval=0"],
    )?;
    let files = [
        units_file(&d, &image, "units", true)?,
        units_file(&d, &image, "units-no-forwards", false)?,
    ];

    let mut rounds = Vec::new();
    let mut nft = Vec::new();
    for _ in 0..runs {
        rounds.push(round(&d, &tt_host, &image, &files)?);
        nft.extend(nft_loads(UNITS)?);
    }
    let pick = |f: fn(&Round) -> Duration| summarize(&rounds.iter().map(f).collect::<Vec<_>>());
    let env = pick(|r| r.env);
    let env_nf = pick(|r| r.env_no_forwards);
    let seq = pick(|r| r.sequential);
    let empty = pick(|r| r.empty_env);
    let joined = pick(|r| r.joined);
    let nft = summarize(&nft);

    println!(
        "envs: {UNITS} net guests (--mem=32), to all up ({runs} rounds, whole client commands)"
    );
    println!(
        "  {:<40} {:>10} {:>10} {:>10}  {:>10}",
        "", "median", "worst", "best", "per unit"
    );
    row(
        "env create, 10 units with a forward each",
        &env,
        Some(UNITS),
    );
    row("10 x create, no env (baseline)", &seq, Some(UNITS));
    row("env create, 10 units, no forwards", &env_nf, Some(UNITS));
    row("env create, no units", &empty, None);
    row("10 x create --env --port into it", &joined, Some(UNITS));
    row("one nft load of a 10-forward table", &nft, None);
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "  env create (10, forwards) against 10 creates: {:.2}x the time, speedup {:.2}x (medians)",
        ms(env.median) / ms(seq.median),
        ms(seq.median) / ms(env.median)
    );
    let list = |f: fn(&Round) -> Duration| {
        crate::list(&rounds.iter().map(|r| ms(f(r))).collect::<Vec<_>>(), 1)
    };
    println!(
        "  rounds (ms): env {}; 10 creates {}; env, no forwards {}; empty env {}; joined {}",
        list(|r| r.env),
        list(|r| r.sequential),
        list(|r| r.env_no_forwards),
        list(|r| r.empty_env),
        list(|r| r.joined)
    );
    drop(d);
    Ok(vec![Verdict::Reported])
}
