//! The CLI side of the daemon: `tt-host create`, `destroy`, `restart`,
//! `list`, `info`, `console`, `stats` and `policy --daemon`, each one
//! request on the control socket (blocking; no runtime needed).

use super::proto::{self, NewUnit, Op, Reply, Request, UnitInfo, UnitStats, VERSION};
use crate::cli::{self, Cpl, Parsed};
use crate::text::{number, quote};
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

pub const USAGE: &str = "\
usage: tt-host create NAME [--restart-on-fail[=CODES]] [--pool=POOL] [RUN OPTIONS] IMAGE [--] [ARGS...]
                      [--disk-from:DEVICE=TEMPLATE]... [--keep-image] [--anywhere]
                      [--env=ENV [--env-net=DEVICE] [--port=HOST:GUEST[/udp]]... [--ip-arg=TEMPLATE]...]
       tt-host destroy NAME
       tt-host restart NAME
       tt-host list [PATH] | list --cluster
       tt-host info NAME
       tt-host console NAME [--since=TIME | --last=N] [--follow] [--timestamps]
       tt-host stats [NAME] [--prometheus]
       tt-host policy set|remove|show ... --daemon
each also takes --socket=PATH (default $TT_HOST_SOCKET, else
/run/tt-host/control.sock, or $TT_HOST_RUNTIME_DIR/control.sock)

These ask the daemon ('tt-host daemon --help'). NAME is a unikernel's name
in the policy tree (alice:bob:web); a caller who is not root acts only
below the paths a policy grants it ('tt-host policy --help').

create   start IMAGE as NAME with 'tt-host run' options (--mem=, --block:,
         --net:, --cpu=, --cpl=; paths are taken from here, and the daemon
         opens them with the caller's rights), admitted through the policy
         tree as 'tt-host run' is, and keep it: it is started again after
         a reboot, and after a failure with --restart-on-fail: on any exit
         status but 0, or only on CODES (3,4,10-12) if given; never after
         exit 1 (tt-host's own failure) or 60-64 (MirageOS's usage
         errors), a signal, or a destroy; each restart in a row waits
         twice as long as the one before
         --disk-from:DEVICE=TEMPLATE gives it its own copy of a template
         ('tt-host template --help') as block device DEVICE, removed with
         it unless --keep-image; --env=ENV puts it in an environment
         ('tt-host env --help': --env-net, --port, --ip-arg); on a cluster
         node, --anywhere starts it on the node with the most free memory
         (docs/CLUSTER.md; its files must be at the same paths there)
destroy  stop NAME (SIGTERM, then SIGKILL) and forget it
restart  stop NAME, wait until it is gone, and start it again
list     the unikernels (below PATH), with state, pid, restarts, last end;
         --cluster: every node's, on a cluster node (docs/CLUSTER.md)
info     one unikernel: how it was created, its state, tt-host's last lines
console  what NAME printed (the last 1 MiB by default): all that is kept,
         the last N lines, or since TIME (RFC 3339, or a duration ago such
         as 5m or 1h 30m); --follow goes on with what comes next
stats    CPU time, peak memory, block and net counters, VM exits;
         --prometheus in Prometheus' text format";

/// A failure: one line for the user.
pub type Fail = String;

/// Split `--socket=PATH` off `args`.
fn take_socket(args: &mut Vec<String>) -> Result<Option<PathBuf>, Fail> {
    let mut socket = None;
    let mut i = 0;
    while i < args.len() {
        if args[i] == "--" {
            break;
        }
        if let Some(v) = args[i].strip_prefix("--socket=") {
            if socket.is_some() {
                return Err("--socket given twice".into());
            }
            socket = Some(PathBuf::from(v));
            args.remove(i);
        } else {
            i += 1;
        }
    }
    Ok(socket)
}

/// One request, one reply (or, for a console, replies until the end).
pub struct Connection {
    stream: UnixStream,
}

impl Connection {
    pub fn open(socket: Option<PathBuf>) -> Result<Connection, Fail> {
        let path = super::socket_path(socket.as_deref());
        let stream = UnixStream::connect(&path).map_err(|e| {
            format!(
                "cannot reach the daemon at {}: {e} (is 'tt-host daemon' running? \
                 --socket=PATH or $TT_HOST_SOCKET names another)",
                path.display()
            )
        })?;
        Ok(Connection { stream })
    }

    pub fn send(&mut self, op: Op) -> Result<(), Fail> {
        proto::write_frame(&mut self.stream, &Request { v: VERSION, op })
            .map_err(|e| format!("cannot send the request: {e}"))
    }

    pub fn reply(&mut self) -> Result<Reply, Fail> {
        let body = proto::read_frame(&mut self.stream)
            .map_err(|e| format!("cannot read the daemon's reply: {e}"))?
            .ok_or("the daemon closed the connection without a reply")?;
        serde_json::from_slice(&body).map_err(|e| format!("malformed reply from the daemon: {e}"))
    }

    /// Send `op` and read its reply; an error reply is a [`Fail`].
    pub fn call(&mut self, op: Op) -> Result<Reply, Fail> {
        self.send(op)?;
        match self.reply()? {
            Reply::Error { message } => Err(message),
            r => Ok(r),
        }
    }
}

fn unexpected(r: Reply) -> Fail {
    format!("unexpected reply from the daemon: {r:?}")
}

/// `tt-host create`'s command line, made canonical for the daemon: every
/// option as `--OPT=VALUE`, every path absolute, IMAGE, `--`, ARGS.
pub fn create_request(args: &[String]) -> Result<(Option<PathBuf>, Op), Fail> {
    let mut args = args.to_vec();
    let socket = take_socket(&mut args)?;
    Ok((socket, Op::Create(new_unit(args)?)))
}

/// One unikernel to create: `NAME [create options] IMAGE [--] [ARGS...]`.
pub fn new_unit(mut args: Vec<String>) -> Result<NewUnit, Fail> {
    let name = match args.first() {
        Some(n) if !n.starts_with('-') => args.remove(0),
        _ => return Err("create: expected NAME first (see 'tt-host create --help')".into()),
    };
    name.parse::<crate::resources::Name>()
        .map_err(|e| format!("create: bad NAME: {e}"))?;
    let mut unit = NewUnit::plain(name, vec![]);
    let mut restart_on_fail = None;
    let mut i = 0;
    let once = |given: bool, opt: &str| {
        if given {
            Err(format!("create: {opt} given twice"))
        } else {
            Ok(())
        }
    };
    while i < args.len() && args[i].starts_with('-') && args[i] != "--" {
        let a = args[i].clone();
        let mut taken = true;
        if let Some(p) = a.strip_prefix("--pool=") {
            once(unit.pool.is_some(), "--pool")?;
            unit.pool = Some(p.to_string());
        } else if let Some(e) = a.strip_prefix("--env=") {
            once(unit.env.is_some(), "--env")?;
            e.parse::<crate::resources::Name>()
                .map_err(|e| format!("create: --env: bad environment name: {e}"))?;
            unit.env = Some(e.to_string());
        } else if let Some(d) = a.strip_prefix("--env-net=") {
            once(unit.env_net.is_some(), "--env-net")?;
            unit.env_net = Some(d.to_string());
        } else if let Some(p) = a.strip_prefix("--port=") {
            unit.ports.push(p.to_string());
        } else if let Some(t) = a.strip_prefix("--ip-arg=") {
            unit.ip_args.push(t.to_string());
        } else if a == "--anywhere" {
            once(unit.anywhere, "--anywhere")?;
            unit.anywhere = true;
        } else if a == "--keep-image" {
            once(unit.keep_image, "--keep-image")?;
            unit.keep_image = true;
        } else if let Some(rest) = a.strip_prefix("--disk-from:") {
            let Some((dev, template)) = rest
                .split_once('=')
                .filter(|(d, t)| !d.is_empty() && !t.is_empty())
            else {
                return Err(format!(
                    "create: {}: expected --disk-from:DEVICE=TEMPLATE",
                    quote(&a)
                ));
            };
            if unit.disk_from.iter().any(|(d, _)| d == dev) {
                return Err(format!("create: --disk-from:{dev} given twice"));
            }
            unit.disk_from.push((dev.to_string(), template.to_string()));
        } else if a == "--restart-on-fail" || a.starts_with("--restart-on-fail=") {
            once(restart_on_fail.is_some(), "--restart-on-fail")?;
            restart_on_fail = Some(match a.strip_prefix("--restart-on-fail=") {
                None => vec![],
                Some(v) => parse_codes(v)?,
            });
        } else {
            taken = false;
        }
        if taken {
            args.remove(i);
        } else {
            i += 1;
        }
    }
    unit.restart_on_fail = restart_on_fail;
    let env_only = if !unit.ports.is_empty() {
        Some("--port")
    } else if unit.env_net.is_some() {
        Some("--env-net")
    } else if !unit.ip_args.is_empty() {
        Some("--ip-arg")
    } else {
        None
    };
    if let (Some(opt), None) = (env_only, &unit.env) {
        return Err(format!(
            "create: {opt} needs --env=ENV (the environment's network)"
        ));
    }
    if !unit.ports.is_empty() && unit.env_net.is_none() {
        return Err("create: --port needs --env-net=DEVICE (the net device it reaches)".into());
    }
    if unit.keep_image && unit.disk_from.is_empty() {
        return Err("create: --keep-image keeps images made with --disk-from; none given".into());
    }
    let run = match cli::parse_run(&args) {
        Ok(Parsed::Run(r)) => r,
        Ok(_) => return Err("create: expected IMAGE (see 'tt-host create --help')".into()),
        Err(e) => return Err(format!("create: {}", e.msg)),
    };
    let refuse = |what: &str| Err(format!("create: {what} cannot be given to create"));
    if run.name.is_some() {
        return refuse("--name (NAME is the name)");
    }
    if run.state_dir.is_some() {
        return refuse("--state-dir (the daemon's is used)");
    }
    if run.no_seccomp {
        return refuse("--no-seccomp");
    }
    if run.client.is_some() {
        return refuse("--x-client (the daemon names the caller)");
    }
    if run.console_log.is_some() || run.stats_file.is_some() || run.ready_fd.is_some() {
        return refuse("--console-log, --stats-file or --x-ready-fd (the daemon's own)");
    }
    let absolute = |p: &std::path::Path| {
        std::path::absolute(p).map_err(|e| format!("create: {}: {e}", p.display()))
    };
    let mut out = vec![format!("--mem={}", run.mem_mb)];
    for d in &run.devices {
        if d.value.starts_with('@') {
            return Err(format!(
                "create: --{}={}: the daemon cannot take a file descriptor; name the file or TAP",
                d.option, d.value
            ));
        }
        let value = if d.option == "block" {
            absolute(std::path::Path::new(&d.value))?
                .display()
                .to_string()
        } else {
            d.value.clone()
        };
        out.push(match &d.device {
            Some(dev) => format!("--{}:{dev}={value}", d.option),
            None => format!("--{}={value}", d.option),
        });
    }
    if let Some(c) = run.cpu {
        out.push(format!("--cpu={c}"));
    }
    out.push(
        match run.cpl {
            Cpl::Auto => "--cpl=auto",
            Cpl::Zero => "--cpl=0",
            Cpl::Three => "--cpl=3",
        }
        .into(),
    );
    if run.solo5_hvt_boot {
        out.push("--x-solo5-hvt-boot".into());
    }
    out.push(absolute(&run.image)?.display().to_string());
    out.push("--".into());
    out.extend(run.guest_args.iter().cloned());
    unit.args = out;
    Ok(unit)
}

/// `3,4,10-12`: exit statuses 0 to 255.
fn parse_codes(v: &str) -> Result<Vec<u8>, Fail> {
    let mut codes = Vec::new();
    for part in v.split(',') {
        let bad = || {
            format!(
                "create: --restart-on-fail={}: expected exit statuses 0-255 \
                 as a list such as 3,4,10-12",
                quote(v)
            )
        };
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (
                number::<u8>(a).ok_or_else(bad)?,
                number::<u8>(b).ok_or_else(bad)?,
            ),
            None => {
                let c = number::<u8>(part).ok_or_else(bad)?;
                (c, c)
            }
        };
        if a > b {
            return Err(bad());
        }
        codes.extend(a..=b);
    }
    codes.sort_unstable();
    codes.dedup();
    Ok(codes)
}

fn one_name(cmd: &str, args: &[String]) -> Result<(Option<PathBuf>, String), Fail> {
    let mut args = args.to_vec();
    let socket = take_socket(&mut args)?;
    match args.as_slice() {
        [n] if !n.starts_with('-') => Ok((socket, n.clone())),
        _ => Err(format!("{cmd}: expected NAME (see 'tt-host {cmd} --help')")),
    }
}

fn time(ns: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(ns);
    humantime::format_rfc3339_millis(t).to_string()
}

fn print_list(units: &[UnitInfo]) {
    println!(
        "{:<32} {:<10} {:>8} {:>8}  LAST END",
        "NAME", "STATE", "PID", "RESTARTS"
    );
    for u in units {
        println!(
            "{:<32} {:<10} {:>8} {:>8}  {}",
            u.name,
            u.state,
            u.pid.map_or("-".into(), |p| p.to_string()),
            u.restarts,
            u.last_end.as_deref().unwrap_or("-")
        );
    }
}

fn print_info(u: &UnitInfo) {
    println!("name: {}", u.name);
    println!("state: {}", u.state);
    if let Some(p) = u.pid {
        println!("pid: {p}");
    }
    if let Some(t) = u.started_ns {
        println!("started: {}", time(t));
    }
    println!("restarts: {}", u.restarts);
    if let Some(e) = &u.last_end {
        println!("last end: {e}");
    }
    if let Some(t) = u.restart_at_ns {
        println!("restart at: {}", time(t));
    }
    println!(
        "restart on fail: {}",
        match &u.restart_on_fail {
            None => "no".to_string(),
            Some(c) if c.is_empty() => "any exit status but 0, 1 and 60-64".into(),
            Some(c) => format!("{c:?}"),
        }
    );
    println!("owner uid: {}", u.owner_uid);
    println!("command: tt-host run {}", u.args.join(" "));
    if !u.log.is_empty() {
        println!("tt-host's last messages:");
        for l in &u.log {
            println!("  {l}");
        }
    }
}

fn print_stats(s: &UnitStats) {
    println!("{}:", s.name);
    println!("  running: {}", if s.running { "yes" } else { "no" });
    println!(
        "  cpu: {:.3} s user, {:.3} s system",
        s.cpu_user_us as f64 / 1e6,
        s.cpu_system_us as f64 / 1e6
    );
    println!("  peak rss: {} KiB", s.peak_rss_kib);
    println!(
        "  block: {} reads ({} bytes), {} writes ({} bytes)",
        s.block_read_ops, s.block_read_bytes, s.block_write_ops, s.block_write_bytes
    );
    println!(
        "  net: {} packets in ({} bytes), {} packets out ({} bytes)",
        s.net_rx_packets, s.net_rx_bytes, s.net_tx_packets, s.net_tx_bytes
    );
    println!("  vm exits: {}", s.vm_exits);
    println!("  restarts: {}", s.restarts);
}

/// `--since`: RFC 3339, or a duration ago (`5m`, `1h 30m`).
fn parse_since(v: &str) -> Result<u64, Fail> {
    let t = humantime::parse_rfc3339_weak(v)
        .or_else(|_| {
            humantime::parse_duration(v).map(|d| std::time::SystemTime::now() - d)
        })
        .map_err(|_| {
            format!(
                "console: --since={}: expected a time (2026-12-05T10:00:00Z) or a duration ago (5m)",
                quote(v)
            )
        })?;
    Ok(t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0))
}

fn console(args: &[String]) -> Result<(), Fail> {
    let mut args = args.to_vec();
    let socket = take_socket(&mut args)?;
    let (mut name, mut since_ns, mut last, mut follow, mut stamps) =
        (None, None, None, false, false);
    for a in &args {
        if let Some(v) = a.strip_prefix("--since=") {
            since_ns = Some(parse_since(v)?);
        } else if let Some(v) = a.strip_prefix("--last=") {
            last = Some(number::<u32>(v).ok_or_else(|| {
                format!("console: --last={}: expected a number of lines", quote(v))
            })?);
        } else if a == "--follow" || a == "-f" {
            follow = true;
        } else if a == "--timestamps" {
            stamps = true;
        } else if a.starts_with('-') || name.is_some() {
            return Err(format!(
                "console: unexpected '{}' (see 'tt-host console --help')",
                quote(a)
            ));
        } else {
            name = Some(a.clone());
        }
    }
    if since_ns.is_some() && last.is_some() {
        return Err("console: give --since or --last, not both".into());
    }
    let name = name.ok_or("console: expected NAME (see 'tt-host console --help')")?;
    let mut c = Connection::open(socket)?;
    c.send(Op::Console {
        name,
        since_ns,
        last,
        follow,
    })?;
    let mut out = std::io::stdout().lock();
    loop {
        match c.reply()? {
            Reply::Console { records, lost } => {
                if lost > 0 {
                    let _ = writeln!(out, "[tt-host: {lost} bytes of console output were overwritten before they were read]");
                }
                for r in records {
                    if stamps {
                        let _ = write!(out, "{} ", time(r.time_ns));
                    }
                    let _ = write!(out, "{}", r.text);
                    if !r.partial {
                        let _ = writeln!(out);
                    }
                }
                if out.flush().is_err() {
                    return Ok(());
                }
            }
            Reply::Ok { .. } => return Ok(()),
            Reply::Error { message } => return Err(message),
            r => return Err(unexpected(r)),
        }
    }
}

/// `tt-host pause|resume|status NAME`, `snapshot NAME DIR [--stop]` and
/// `migrate-send NAME --to=ADDR [...]`: the daemon acts through the
/// unikernel's control socket (with the caller's rights for files, sockets
/// and keys). The error is the line to print.
pub fn control(cmd: &str, args: &[String]) -> Result<(), Fail> {
    let mut args = args.to_vec();
    let socket = take_socket(&mut args)?;
    let abs = |p: &str| -> Result<String, Fail> {
        let cwd = std::env::current_dir().map_err(|e| format!("cannot resolve {p}: {e}"))?;
        Ok(cwd.join(p).display().to_string())
    };
    let (mut name, mut dir, mut stop, mut to, mut psk) = (None, None, false, None, None);
    let (mut downtime_ms, mut timeout_s) = (None, None);
    let number = |o: &str, v: &str| -> Result<u64, Fail> {
        v.parse()
            .map_err(|_| format!("{o}={}: expected a number", crate::text::quote(v)))
    };
    for a in &args {
        if a == "--stop" && cmd == "snapshot" {
            stop = true;
        } else if let Some(v) = a.strip_prefix("--to=").filter(|_| cmd == "migrate-send") {
            to = Some(v.to_string());
        } else if let Some(v) = a.strip_prefix("--psk=").filter(|_| cmd == "migrate-send") {
            psk = Some(abs(v)?);
        } else if let Some(v) = a
            .strip_prefix("--downtime-ms=")
            .filter(|_| cmd == "migrate-send")
        {
            downtime_ms = Some(number("--downtime-ms", v)?);
        } else if let Some(v) = a
            .strip_prefix("--timeout=")
            .filter(|_| cmd == "migrate-send")
        {
            timeout_s = Some(number("--timeout", v)?);
        } else if a.starts_with('-') {
            return Err(format!(
                "{cmd}: unknown option '{}' (see 'tt-host {cmd} --help')",
                crate::text::quote(a)
            ));
        } else if name.is_none() {
            name = Some(a.clone());
        } else if cmd == "snapshot" && dir.is_none() {
            dir = Some(abs(a)?);
        } else {
            return Err(format!(
                "{cmd}: unexpected argument '{}'",
                crate::text::quote(a)
            ));
        }
    }
    let name = name.ok_or_else(|| {
        format!("{cmd}: expected NAME (a unikernel of the daemon), or --control=SOCK")
    })?;
    if cmd == "snapshot" && dir.is_none() {
        return Err("snapshot: expected NAME DIR".into());
    }
    let op = Op::Control {
        name,
        action: if cmd == "migrate-send" {
            "migrate"
        } else {
            cmd
        }
        .to_string(),
        dir,
        stop,
        to,
        psk,
        downtime_ms,
        timeout_s,
    };
    match Connection::open(socket)?.call(op)? {
        Reply::Ok { message } => println!("{message}"),
        r => return Err(unexpected(r)),
    }
    Ok(())
}

/// Run a daemon command (`cmd` is create, destroy, ...); the error is the
/// line to print.
pub fn run(cmd: &str, args: &[String]) -> Result<(), Fail> {
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return Ok(());
    }
    match cmd {
        "create" => {
            let (socket, op) = create_request(args)?;
            match Connection::open(socket)?.call(op)? {
                Reply::Started { name, pid, .. } => println!("{name}: created, pid {pid}"),
                Reply::Ok { message } => println!("{message}"),
                r => return Err(unexpected(r)),
            }
        }
        "destroy" => {
            let (socket, name) = one_name(cmd, args)?;
            match Connection::open(socket)?.call(Op::Destroy { name })? {
                Reply::Ok { message } => println!("{message}"),
                r => return Err(unexpected(r)),
            }
        }
        "restart" => {
            let (socket, name) = one_name(cmd, args)?;
            match Connection::open(socket)?.call(Op::Restart { name })? {
                Reply::Started { name, pid, .. } => println!("{name}: restarted, pid {pid}"),
                r => return Err(unexpected(r)),
            }
        }
        "list" => {
            let mut args = args.to_vec();
            let socket = take_socket(&mut args)?;
            if args.iter().any(|a| a == "--cluster") {
                if args.len() != 1 {
                    return Err("list --cluster takes no PATH".into());
                }
                match Connection::open(socket)?.call(Op::ClusterList)? {
                    Reply::Text { text } => print!("{text}"),
                    r => return Err(unexpected(r)),
                }
                return Ok(());
            }
            let path = match args.as_slice() {
                [] => None,
                [p] if !p.starts_with('-') => Some(p.clone()),
                _ => return Err("list: expected at most a PATH".into()),
            };
            match Connection::open(socket)?.call(Op::List { path })? {
                Reply::List { units } => print_list(&units),
                r => return Err(unexpected(r)),
            }
        }
        "info" => {
            let (socket, name) = one_name(cmd, args)?;
            match Connection::open(socket)?.call(Op::Info { name })? {
                Reply::Info { unit } => print_info(&unit),
                r => return Err(unexpected(r)),
            }
        }
        "console" => console(args)?,
        "stats" => {
            let mut args = args.to_vec();
            let socket = take_socket(&mut args)?;
            let prometheus = args.iter().any(|a| a == "--prometheus");
            args.retain(|a| a != "--prometheus");
            let name = match args.as_slice() {
                [] => None,
                [n] if !n.starts_with('-') => Some(n.clone()),
                _ => return Err("stats: expected at most a NAME, and --prometheus".into()),
            };
            let mut c = Connection::open(socket)?;
            if prometheus && name.is_none() {
                match c.call(Op::Metrics)? {
                    Reply::Text { text } => print!("{text}"),
                    r => return Err(unexpected(r)),
                }
                return Ok(());
            }
            match c.call(Op::Stats { name })? {
                Reply::Stats { units } if prometheus => {
                    print!("{}", super::metrics::render(&units))
                }
                Reply::Stats { units } => units.iter().for_each(print_stats),
                r => return Err(unexpected(r)),
            }
        }
        _ => return Err(format!("unknown daemon command {cmd}")),
    }
    Ok(())
}

/// `tt-host policy ... --daemon` or `--socket=PATH`: the policy command
/// done by the daemon, with the caller's rights. `None`: not for the
/// daemon (done locally).
pub fn policy(args: &[String]) -> Option<Result<(), Fail>> {
    let mut args = args.to_vec();
    let daemon = args.iter().any(|a| a == "--daemon");
    let socket = match take_socket(&mut args) {
        Ok(s) => s,
        Err(e) => return Some(Err(e)),
    };
    if !daemon && socket.is_none() {
        return None;
    }
    args.retain(|a| a != "--daemon");
    Some((|| {
        match Connection::open(socket)?.call(Op::Policy { args })? {
            Reply::Ok { message } if message.is_empty() => {}
            Reply::Ok { message } => println!("{message}"),
            Reply::Text { text } => print!("{text}"),
            r => return Err(unexpected(r)),
        }
        Ok(())
    })())
}

pub const POOL_USAGE: &str = "\
usage: tt-host pool create NAME --owner=USER [--sponsor=USER] [--nodes=ID,...]
       tt-host pool show [NAME] | pool list
       tt-host pool reserve RESERVATION.json
       tt-host pool sign --key=SEED_FILE [--sponsor-key=SEED_FILE] PAYLOAD.json
       tt-host key add USER PUBKEY
       tt-host key gen SEED_FILE
each but sign and gen also takes --socket=PATH

Capacity pools (after threefoldtech tfexplorer): a pool holds CU-, SU- and
IPv4U-seconds; each unikernel created into it ('tt-host create --pool=NAME')
draws, every second, CU = min(memory GiB / 4, vCPUs / 2), SU = disk GB / 300
and IPv4U = its public addresses and port forwards (0 for now). When the
first counter it draws on reaches zero (its EmptyAt), its unikernels are
stopped. A create is refused if the pool would be empty within the
daemon's --pool-min-run (default 120 s).

create   an empty pool owned by USER (root only); with --sponsor, every
         reservation must be signed by the sponsor too. On a cluster node
         the pool is the cluster's (docs/CLUSTER.md); --nodes: only those
         nodes' unikernels may draw from it, and 'create --anywhere
         --pool=NAME' places among them
show     per counter: what is left, the draw, the last sync, and EmptyAt
reserve  top a pool up with a signed reservation: the JSON envelope
         {\"payload\": BASE64, \"customer_signature\": BASE64,
          \"sponsor_signature\": BASE64} whose payload is the JSON
         {\"id\": ID, \"pool\": NAME, \"customer\": USER, \"cu\": N, \"su\": N,
          \"ipv4u\": N} (whole unit-seconds), signed with ed25519 by the
         pool's owner (and sponsor). Every reservation accepted is kept in
         an append-only audit log; an id is accepted once
sign     make that envelope from a payload file and seed files (local)
key add  register USER's ed25519 public key (base64 or hex; root only)
key gen  write a new secret seed to SEED_FILE (0600) and print its public key";

fn read_file(path: &str) -> Result<Vec<u8>, Fail> {
    std::fs::read(path).map_err(|e| format!("{path}: {e}"))
}

/// `tt-host pool ...`.
pub fn pool(args: &[String]) -> Result<(), Fail> {
    if args.is_empty() || args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{POOL_USAGE}");
        return Ok(());
    }
    let mut args = args.to_vec();
    let socket = take_socket(&mut args)?;
    let verb = args.remove(0);
    let opt = |args: &mut Vec<String>, name: &str| -> Option<String> {
        let i = args
            .iter()
            .position(|a| a.starts_with(&format!("--{name}=")))?;
        let v = args.remove(i);
        Some(v[name.len() + 3..].to_string())
    };
    let op = match verb.as_str() {
        "create" => {
            let owner = opt(&mut args, "owner").ok_or("pool create: --owner=USER is required")?;
            let sponsor = opt(&mut args, "sponsor");
            let nodes = opt(&mut args, "nodes")
                .map(|l| l.split(',').map(str::to_string).collect::<Vec<_>>());
            let [name] = args.as_slice() else {
                return Err(
                    "pool create: expected NAME --owner=USER [--sponsor=USER] [--nodes=ID,...]"
                        .into(),
                );
            };
            Op::PoolCreate {
                name: name.clone(),
                owner,
                sponsor,
                nodes,
            }
        }
        "show" | "list" => match args.as_slice() {
            [] => Op::PoolShow { name: None },
            [n] if verb == "show" => Op::PoolShow {
                name: Some(n.clone()),
            },
            _ => return Err(format!("pool {verb}: unexpected arguments")),
        },
        "reserve" => {
            let [file] = args.as_slice() else {
                return Err("pool reserve: expected RESERVATION.json".into());
            };
            let envelope = String::from_utf8(read_file(file)?)
                .map_err(|_| format!("{file}: not UTF-8 (a reservation is JSON)"))?;
            Op::PoolReserve { envelope }
        }
        "sign" => {
            let key = opt(&mut args, "key").ok_or("pool sign: --key=SEED_FILE is required")?;
            let sponsor = opt(&mut args, "sponsor-key");
            let [payload] = args.as_slice() else {
                return Err("pool sign: expected PAYLOAD.json".into());
            };
            let payload = read_file(payload)?;
            let payload = payload.trim_ascii_end();
            let seed = |p: &str| {
                crate::pools::keys::read_secret_seed_file(std::path::Path::new(p))
                    .map_err(|e| e.to_string())
            };
            let customer = seed(&key)?;
            let sponsor = sponsor.map(|s| seed(&s)).transpose()?;
            let env = crate::pools::reservation::sign(payload, &customer, sponsor.as_ref());
            println!("{}", String::from_utf8_lossy(&env));
            return Ok(());
        }
        other => return Err(format!("pool: unknown command '{}'", quote(other))),
    };
    match Connection::open(socket)?.call(op)? {
        Reply::Ok { message } => println!("{message}"),
        Reply::Text { text } => print!("{text}"),
        r => return Err(unexpected(r)),
    }
    Ok(())
}

/// `tt-host key ...`.
pub fn key(args: &[String]) -> Result<(), Fail> {
    if args.is_empty() || args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{POOL_USAGE}");
        return Ok(());
    }
    let mut args = args.to_vec();
    let socket = take_socket(&mut args)?;
    match args.as_slice() {
        [verb, user, key] if verb == "add" => {
            match Connection::open(socket)?.call(Op::KeyAdd {
                user: user.clone(),
                key: key.clone(),
            })? {
                Reply::Ok { message } => println!("{message}"),
                r => return Err(unexpected(r)),
            }
            Ok(())
        }
        [verb, file] if verb == "gen" => {
            use std::io::Read;
            use std::os::unix::fs::OpenOptionsExt;
            let mut seed = [0u8; 32];
            std::fs::File::open("/dev/urandom")
                .and_then(|mut f| f.read_exact(&mut seed))
                .map_err(|e| format!("/dev/urandom: {e}"))?;
            let key = ed25519_dalek::SigningKey::from_bytes(&seed);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(file)
                .map_err(|e| format!("{file}: {e}"))?;
            writeln!(f, "{}", crate::pools::keys::encode_secret_seed(&key))
                .map_err(|e| format!("{file}: {e}"))?;
            println!(
                "{}",
                crate::pools::keys::encode_public_key(&key.verifying_key())
            );
            Ok(())
        }
        _ => Err("key: expected 'add USER PUBKEY' or 'gen SEED_FILE'".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(a: &[&str]) -> Vec<String> {
        a.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn create_makes_the_command_line_canonical_and_absolute() {
        let (socket, op) = create_request(&s(&[
            "alice:web",
            "--socket=/tmp/s",
            "--restart-on-fail=3,10-12",
            "--mem=16",
            "--block:storage=disk.img",
            "img.hvt",
            "a",
            "--b",
        ]))
        .unwrap();
        assert_eq!(socket, Some(PathBuf::from("/tmp/s")));
        let Op::Create(NewUnit {
            name,
            args,
            restart_on_fail,
            ..
        }) = op
        else {
            panic!()
        };
        assert_eq!(name, "alice:web");
        assert_eq!(restart_on_fail, Some(vec![3, 10, 11, 12]));
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(
            args,
            s(&[
                "--mem=16",
                &format!("--block:storage={}", cwd.join("disk.img").display()),
                "--cpl=auto",
                &cwd.join("img.hvt").display().to_string(),
                "--",
                "a",
                "--b",
            ])
        );
        // The daemon reads it back as the same launch.
        assert!(matches!(cli::parse_run(&args), Ok(Parsed::Run(_))));
    }

    #[test]
    fn create_refuses_what_is_the_daemons() {
        for (a, want) in [
            (&["web", "--name=x", "img"][..], "--name"),
            (&["web", "--state-dir=/x", "img"], "--state-dir"),
            (&["web", "--no-seccomp", "img"], "--no-seccomp"),
            (&["web", "--net:n=@3", "img"], "file descriptor"),
            (&["--mem=8", "img"], "expected NAME"),
            (&["a::b", "img"], "bad NAME"),
            (&["web", "--restart-on-fail=x", "img"], "exit statuses"),
            (&["web", "--restart-on-fail=5-3", "img"], "exit statuses"),
            (&["web", "--restart-on-fail=256", "img"], "exit statuses"),
            (&["web", "--mem=8"], "IMAGE"),
        ] {
            let e = create_request(&s(a)).unwrap_err();
            assert!(e.contains(want), "{a:?}: {e}");
        }
    }
}
