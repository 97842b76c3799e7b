//! The CLI side of environments, templates and disk snapshots:
//! `tt-host env ...`, `tt-host template ...`, `tt-host disk ...`, each one
//! request on the daemon's control socket.

use super::client::{new_unit, Connection, Fail};
use super::proto::{Op, Reply};
use crate::text::quote;
use std::path::PathBuf;

pub const ENV_USAGE: &str = "\
usage: tt-host env create NAME --lifetime=DURATION [--deny-outgoing]
                       [--blacklist=ADDR,...] [--bridge=BRIDGE] [--subnet=A.B.C.D/N]
                       [--units=FILE] [--anywhere]
       tt-host env extend NAME DURATION
       tt-host env stop NAME
       tt-host env start NAME
       tt-host env destroy NAME
       tt-host env list [--cluster]
each also takes --socket=PATH; DURATION is e.g. 90s, 30m, 2h, 1d

An environment is a named group of unikernels with an end time, as
TTstack's Env: at its end it is destroyed with its unikernels (and their
runtime images, unless created with --keep-image). It has its own bridge
(BRIDGE, default tte<N>: the owner's 'bridges' policy must allow it) on
SUBNET (default 10.213.<N>.0/24; the host is the first address), and its
own nftables table: port forwards (create --port), masquerade to the
outside, and with --deny-outgoing nothing leaves the environment but
answers to forwarded connections; no traffic goes to a --blacklist
address.

create   make it, with the unikernels FILE lists (one per line, as the
         arguments of 'tt-host create': NAME [OPTIONS] IMAGE [-- ARGS];
         words split at blanks, '#' starts a comment; --env is implied):
         all are up when it returns, or none is left
extend   move its end DURATION later
stop     save each unikernel (memory, vCPU, devices) and stop it: a
         stopped environment holds no CPU or memory
start    bring the unikernels back from their saved state, where they were
destroy  stop and remove it, its unikernels, bridge, TAPs and rules now
list     each environment: state, end, unikernels, bridge, subnet; with
         --cluster (on a cluster node), every node's, and those lost with
         a node that died
extend, stop, start and destroy of one environment are refused within the
daemon's --env-mgmt-interval (default 1 s) of the one before.
On a cluster node (daemon --cluster) an environment's name is the
cluster's: create refuses a name another node's environment has; with
--anywhere, the environment is made on the node with the most free
memory that holds all its unikernels (their images at the same paths
there).

A unikernel joins with 'tt-host create NAME --env=ENV ...', and with
--env-net=DEVICE its hvt net device DEVICE gets a TAP on the bridge and an
address, passed to the guest by --ip-arg=TEMPLATE (repeatable; {ip},
{prefix}, {netmask}, {gateway} filled in; default '--ipv4={ip}/{prefix}'
and '--ipv4-gateway={gateway}', as MirageOS takes them); --port=HOST:GUEST
[/udp] forwards the host's port HOST to it.";

pub const TEMPLATE_USAGE: &str = "\
usage: tt-host template add NAME DISK.img
       tt-host template list
       tt-host template remove NAME
each also takes --socket=PATH

A template is a disk image kept read-only by the daemon (add and remove:
root only). 'tt-host create --disk-from:DEVICE=TEMPLATE' gives the
unikernel its own copy (its runtime image, a reflink where the file system
can, else a copy), as its block device DEVICE; with --keep-image the copy
is kept after the unikernel is gone.";

pub const DISK_USAGE: &str = "\
usage: tt-host disk snapshot NAME SNAP [--life-time=DURATION] [--device=DEVICE]
       tt-host disk revert NAME SNAP [--device=DEVICE]
       tt-host disk snapshots NAME
each also takes --socket=PATH

Snapshots of the runtime images of unikernel NAME (those made with
--disk-from; --device picks one if it has several). A snapshot is taken
with the guest paused and its disk's journal drained, so it holds every
write the guest was told is done; it is removed after its life time. A
revert stops the unikernel, puts the snapshot's bytes back, and boots it
again.";

/// Split `--socket=PATH` off, then options `--OPT=V` / `--OPT V` (for
/// the `valued` ones) and flags, from the positional words.
struct Words {
    socket: Option<PathBuf>,
    opts: Vec<(String, Option<String>)>,
    pos: Vec<String>,
}

fn words(cmd: &str, args: &[String], valued: &[&str], flags: &[&str]) -> Result<Words, Fail> {
    let mut w = Words {
        socket: None,
        opts: vec![],
        pos: vec![],
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if !a.starts_with("--") {
            w.pos.push(a.clone());
            continue;
        }
        let (opt, value) = match a.split_once('=') {
            Some((o, v)) => (o, Some(v.to_string())),
            None => (a.as_str(), None),
        };
        if opt == "--socket" {
            w.socket = Some(PathBuf::from(value.ok_or("--socket=PATH")?));
            continue;
        }
        if valued.contains(&opt) {
            let v = match value {
                Some(v) => v,
                None => it
                    .next()
                    .cloned()
                    .ok_or_else(|| format!("{cmd}: {opt} needs a value"))?,
            };
            if w.opts.iter().any(|(o, _)| o == opt) {
                return Err(format!("{cmd}: {opt} given twice"));
            }
            w.opts.push((opt.to_string(), Some(v)));
        } else if flags.contains(&opt) && value.is_none() {
            w.opts.push((opt.to_string(), None));
        } else {
            return Err(format!(
                "{cmd}: unknown option '{}' (see 'tt-host {} --help')",
                quote(a),
                cmd.split(' ').next().unwrap_or(cmd)
            ));
        }
    }
    Ok(w)
}

impl Words {
    fn value(&self, opt: &str) -> Option<&str> {
        self.opts
            .iter()
            .find(|(o, _)| o == opt)
            .and_then(|(_, v)| v.as_deref())
    }
    fn flag(&self, opt: &str) -> bool {
        self.opts.iter().any(|(o, _)| o == opt)
    }
    fn one_name(&self, cmd: &str, what: &str) -> Result<String, Fail> {
        match self.pos.as_slice() {
            [n] => Ok(n.clone()),
            _ => Err(format!("{cmd}: expected {what}")),
        }
    }
}

/// A duration such as `90s`, `30m`, `2h 30m`, `1d`: whole seconds, at
/// least one.
pub fn seconds(cmd: &str, v: &str) -> Result<u64, Fail> {
    let d = humantime::parse_duration(v).map_err(|e| {
        format!(
            "{cmd}: '{}' is not a duration such as 90s, 30m, 2h or 1d ({e})",
            quote(v)
        )
    })?;
    let s = d.as_secs();
    if s == 0 || s > 10 * 365 * 86400 {
        return Err(format!(
            "{cmd}: '{}': a duration from 1 second to 10 years",
            quote(v)
        ));
    }
    Ok(s)
}

/// The unikernels of an `env create --units=FILE`: one per line, as
/// `tt-host create`'s arguments.
pub fn units_file(env: &str, text: &str) -> Result<Vec<super::proto::NewUnit>, Fail> {
    let mut units = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("");
        let mut words: Vec<String> = line.split_whitespace().map(String::from).collect();
        if words.is_empty() {
            continue;
        }
        if words.len() > 1 && !words.iter().any(|w| w.starts_with("--env=")) {
            words.insert(1, format!("--env={env}"));
        }
        let mut u = new_unit(words).map_err(|e| format!("--units line {}: {e}", i + 1))?;
        match &u.env {
            Some(e) if e != env => {
                return Err(format!(
                    "--units line {}: --env={e} names another environment",
                    i + 1
                ))
            }
            _ => u.env = Some(env.to_string()),
        }
        units.push(u);
    }
    Ok(units)
}

fn print_reply(r: Reply) -> Result<(), Fail> {
    match r {
        Reply::Ok { message } if message.is_empty() => {}
        Reply::Ok { message } => println!("{message}"),
        Reply::Text { text } => print!("{text}"),
        r => return Err(format!("unexpected reply from the daemon: {r:?}")),
    }
    Ok(())
}

/// `tt-host env VERB ...`.
pub fn env(args: &[String]) -> Result<(), Fail> {
    let Some(verb) = args.first().map(String::as_str) else {
        return Err(format!("env: expected a verb\n{ENV_USAGE}"));
    };
    if matches!(verb, "-h" | "--help" | "help") || args.iter().any(|a| a == "--help") {
        println!("{ENV_USAGE}");
        return Ok(());
    }
    let cmd = format!("env {verb}");
    let rest = &args[1..];
    let (socket, op) = match verb {
        "create" => {
            let w = words(
                &cmd,
                rest,
                &[
                    "--lifetime",
                    "--blacklist",
                    "--bridge",
                    "--subnet",
                    "--units",
                ],
                &["--deny-outgoing", "--anywhere"],
            )?;
            let name = w.one_name(&cmd, "NAME")?;
            name.parse::<crate::resources::Name>()
                .map_err(|e| format!("{cmd}: bad NAME: {e}"))?;
            let lifetime = w
                .value("--lifetime")
                .ok_or_else(|| format!("{cmd}: --lifetime=DURATION is needed"))?;
            let units = match w.value("--units") {
                Some(f) => {
                    let text = std::fs::read_to_string(f)
                        .map_err(|e| format!("{cmd}: --units={f}: {e}"))?;
                    units_file(&name, &text)?
                }
                None => vec![],
            };
            let op = Op::EnvCreate {
                name,
                lifetime_s: seconds(&cmd, lifetime)?,
                deny_outgoing: w.flag("--deny-outgoing"),
                blacklist: w
                    .value("--blacklist")
                    .map(|b| b.split(',').map(|s| s.trim().to_string()).collect())
                    .unwrap_or_default(),
                bridge: w.value("--bridge").map(String::from),
                subnet: w.value("--subnet").map(String::from),
                units,
                anywhere: w.flag("--anywhere"),
            };
            (w.socket, op)
        }
        "extend" => {
            let w = words(&cmd, rest, &[], &[])?;
            let [name, by] = w.pos.as_slice() else {
                return Err(format!("{cmd}: expected NAME DURATION"));
            };
            let op = Op::EnvExtend {
                name: name.clone(),
                by_s: seconds(&cmd, by)?,
            };
            (w.socket, op)
        }
        "stop" | "start" | "destroy" => {
            let w = words(&cmd, rest, &[], &[])?;
            let name = w.one_name(&cmd, "NAME")?;
            let op = match verb {
                "stop" => Op::EnvStop { name },
                "start" => Op::EnvStart { name },
                _ => Op::EnvDestroy { name },
            };
            (w.socket, op)
        }
        "list" => {
            let w = words(&cmd, rest, &[], &["--cluster"])?;
            if !w.pos.is_empty() {
                return Err(format!("{cmd}: takes no arguments"));
            }
            let op = if w.flag("--cluster") {
                Op::ClusterEnvList
            } else {
                Op::EnvList
            };
            (w.socket, op)
        }
        v => {
            return Err(format!(
                "env: unknown verb '{}' (create, extend, stop, start, destroy, list)",
                quote(v)
            ))
        }
    };
    print_reply(Connection::open(socket)?.call(op)?)
}

/// `tt-host template add|list|remove`.
pub fn template(args: &[String]) -> Result<(), Fail> {
    let Some(verb) = args.first().map(String::as_str) else {
        return Err(format!("template: expected a verb\n{TEMPLATE_USAGE}"));
    };
    if matches!(verb, "-h" | "--help" | "help") || args.iter().any(|a| a == "--help") {
        println!("{TEMPLATE_USAGE}");
        return Ok(());
    }
    let cmd = format!("template {verb}");
    let w = words(&cmd, &args[1..], &[], &[])?;
    let op = match (verb, w.pos.as_slice()) {
        ("add", [name, disk]) => Op::TemplateAdd {
            name: name.clone(),
            disk: std::path::absolute(disk)
                .map_err(|e| format!("{cmd}: {disk}: {e}"))?
                .display()
                .to_string(),
        },
        ("add", _) => return Err(format!("{cmd}: expected NAME DISK.img")),
        ("list", []) => Op::TemplateList,
        ("remove", [name]) => Op::TemplateRemove { name: name.clone() },
        ("list" | "remove", _) => return Err(format!("{cmd}: bad arguments\n{TEMPLATE_USAGE}")),
        (v, _) => {
            return Err(format!(
                "template: unknown verb '{}' (add, list, remove)",
                quote(v)
            ))
        }
    };
    print_reply(Connection::open(w.socket)?.call(op)?)
}

/// `tt-host disk snapshot|revert|snapshots`.
pub fn disk(args: &[String]) -> Result<(), Fail> {
    let Some(verb) = args.first().map(String::as_str) else {
        return Err(format!("disk: expected a verb\n{DISK_USAGE}"));
    };
    if matches!(verb, "-h" | "--help" | "help") || args.iter().any(|a| a == "--help") {
        println!("{DISK_USAGE}");
        return Ok(());
    }
    let cmd = format!("disk {verb}");
    let w = words(&cmd, &args[1..], &["--life-time", "--device"], &[])?;
    let device = w.value("--device").map(String::from);
    let op = match (verb, w.pos.as_slice()) {
        ("snapshot", [name, snap]) => Op::DiskSnapshot {
            name: name.clone(),
            snap: snap.clone(),
            device,
            life_time_s: w
                .value("--life-time")
                .map(|v| seconds(&cmd, v))
                .transpose()?,
        },
        ("revert", [name, snap]) if w.value("--life-time").is_none() => Op::DiskRevert {
            name: name.clone(),
            snap: snap.clone(),
            device,
        },
        ("snapshots", [name]) if w.opts.is_empty() => Op::DiskSnapshots { name: name.clone() },
        ("snapshot" | "revert" | "snapshots", _) => {
            return Err(format!("{cmd}: bad arguments\n{DISK_USAGE}"))
        }
        (v, _) => {
            return Err(format!(
                "disk: unknown verb '{}' (snapshot, revert, snapshots)",
                quote(v)
            ))
        }
    };
    print_reply(Connection::open(w.socket)?.call(op)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_units_file_is_create_lines_joined_to_the_env() {
        let text = "# two services\n\
                    lab:web --mem=8 --env-net=service0 --port=8080:80 /img/web.hvt -- x=1\n\
                    \n\
                    lab:db --disk-from:storage=base --keep-image /img/db.hvt  # the database\n";
        let units = units_file("lab", text).unwrap();
        assert_eq!(units.len(), 2);
        assert_eq!(units[0].name, "lab:web");
        assert_eq!(units[0].env.as_deref(), Some("lab"));
        assert_eq!(units[0].ports, ["8080:80"]);
        assert_eq!(units[0].args.last().unwrap(), "x=1");
        assert_eq!(
            units[1].disk_from,
            [("storage".to_string(), "base".to_string())]
        );
        assert!(units[1].keep_image);
        let e = units_file("lab", "lab:x --env=other /img").unwrap_err();
        assert!(
            e.contains("line 1") && e.contains("another environment"),
            "{e}"
        );
        let e = units_file("lab", "\n--mem=3 /img").unwrap_err();
        assert!(e.contains("line 2") && e.contains("NAME"), "{e}");
    }

    #[test]
    fn durations_are_checked() {
        assert_eq!(seconds("x", "90s").unwrap(), 90);
        assert_eq!(seconds("x", "2h 30m").unwrap(), 9000);
        assert_eq!(seconds("x", "1d").unwrap(), 86400);
        assert!(seconds("x", "0s").unwrap_err().contains("1 second"));
        assert!(seconds("x", "soon").unwrap_err().contains("not a duration"));
    }
}
