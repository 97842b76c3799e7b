//! `tt-host run` command line, with solo5-hvt's spellings.
//!
//! solo5-hvt's module options carry the device name inside the option
//! (`--block:storage=disk.img`), which argument-parsing crates do not model,
//! so this small parser handles them. Both `tt-host run [OPTIONS] IMAGE [--]
//! ARGS` and solo5-hvt's `[OPTIONS] [--] IMAGE ARGS` orders are accepted.

use crate::modules::kind::{self, DeviceOption};
use crate::text::{number, quote};
use std::path::PathBuf;

/// `tt-host run --help`: the general options here, then each device
/// kind's own ([`kind::usage`]).
pub fn run_usage() -> String {
    format!(
        "\
usage: tt-host run [OPTIONS] IMAGE [--] [GUEST ARGS...]
       tt-host run [OPTIONS] -- IMAGE [GUEST ARGS...]

Boot the Solo5 hvt unikernel IMAGE on KVM. The process exits with the
guest's exit status, 255 if the guest aborted, or 1 with a message if the
image, the options or the guest were bad.

options (solo5-hvt spellings):
  --mem=MB                      guest memory in MiB (default 512; 4 to 4096;
                                rounded down to a multiple of 2)
{devices}  -h, --help                    show this help
  --version                     show the version and the Solo5 ABI version
                                (as solo5-hvt, for launchers that check it)

admission (see 'tt-host policy --help'):
  --name=PATH:NAME              admit the unikernel as NAME under PATH
                                (default: the image's file name, at the
                                root, with .2, .3, ... if that is running)
  --cpu=N                       pin the guest to host CPU N; it must be in
                                the cpus of every policy above the name
                                (default: not pinned, which needs all CPUs)
  --state-dir=DIR               policies and running unikernels (default
                                $TT_HOST_STATE_DIR, else /var/lib/tt-host)

  --cpl=0|3|auto                where the image's code runs (default auto):
                                0 as solo5-hvt runs it; 3 under tt-host's
                                small CPL 0 monitor, which emulates the few
                                privileged instructions Solo5 images run
                                (native speed on kvm-pvm, where CPL 0 code
                                is emulated); auto = 3 on kvm-pvm, else 0.
                                Images that drop to CPL 3 themselves
                                (tt-guest) always start at CPL 0

supervision (for a supervisor such as tt-host's daemon):
  --console-log=PATH            write the guest's console to the ring file
                                PATH (created 0600, fixed size, read by
                                the daemon) instead of stdout; a ring of
                                the same size there is appended to
  --console-log-size=BYTES      that ring's data size (default 1048576;
                                4096 to 67108864)
  --stats-file=PATH             publish counters (block, net, VM exits) and
                                how the run ended in the file PATH (0600)
  --control=PATH                serve a control socket at PATH: 'tt-host
                                pause|resume|snapshot --control=PATH'
                                (a stale socket there is replaced; it is
                                removed when the run ends)

debugging:
  --no-seccomp                  do not confine tt-host to its system-call
                                allowlist once the VM is built (the default
                                kills tt-host on any other call); for
                                debugging only

developer options:
  --x-solo5-hvt-boot            start the guest in solo5-hvt's boot state
                                (2 MiB read-write pages over all memory, no
                                NX, no CR0.WP) instead of tt-host's W^X one,
                                to check that an image is portable to it
  --x-client=UID:GID[:G1,G2,...]
                                for tt-host's daemon, which runs as root:
                                open IMAGE, every --block file and every
                                --net TAP with this user's rights (uid,
                                gid, supplementary groups), not root's;
                                they must be paths and TAP names, not @FD
  --x-ready-fd=N                the daemon's: write 'R' to the open file
                                descriptor N, then close it, once the VM is
                                built and the guest is about to run

Every device in the image's manifest must be given, and every device given
must be in the manifest, each once. An option shown as --OPT[:NAME]=VALUE
may be given once without :NAME, as the default for every device of its
kind. Run as 'solo5-hvt' (through a link of that name), tt-host takes these
options without 'run', as solo5-hvt does. Not supported: solo5-hvt-debug's
--gdb, --gdb-port and --dumpcore. Unlike solo5-hvt, a '--' right after
IMAGE is not passed to the guest (give '--' before IMAGE to pass one).",
        devices = kind::usage()
    )
}

/// A parsed `tt-host run` command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunArgs {
    pub mem_mb: u64,
    /// Every device option (`--block:NAME=PATH`, `--net-mac:NAME=...`), in
    /// command-line order; the device kind that owns each reads it
    /// ([`kind`]).
    pub devices: Vec<DeviceOption>,
    pub image: PathBuf,
    pub guest_args: Vec<String>,
    pub solo5_hvt_boot: bool,
    /// `--name`: the unikernel's name in the policy tree.
    pub name: Option<crate::resources::Name>,
    /// `--cpu`: the host CPU to pin the guest to.
    pub cpu: Option<u16>,
    /// `--state-dir`.
    pub state_dir: Option<PathBuf>,
    /// `--x-client`: open what the command line names with this
    /// identity's rights ([`crate::client_creds`]).
    pub client: Option<crate::client_creds::Client>,
    /// `--cpl`.
    pub cpl: Cpl,
    /// `--no-seccomp`: skip the system-call filter (debugging).
    pub no_seccomp: bool,
    /// `--console-log`: the console ring file ([`crate::runfile::console`]).
    pub console_log: Option<PathBuf>,
    /// `--console-log-size`: its data capacity in bytes.
    pub console_log_size: u64,
    /// `--stats-file` ([`crate::runfile::stats`]).
    pub stats_file: Option<PathBuf>,
    /// `--x-ready-fd`: the descriptor to write `R` to once the guest is
    /// about to run.
    pub ready_fd: Option<i32>,
    /// `--control`: the control socket's path ([`crate::control`]).
    pub control: Option<PathBuf>,
}

/// `--cpl`: the privilege level an image's code runs at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Cpl {
    /// CPL 3 where CPL 0 code is slow (kvm-pvm), else CPL 0.
    #[default]
    Auto,
    /// As solo5-hvt runs it.
    Zero,
    /// Under tt-host's CPL 0 monitor.
    Three,
}

/// Result of parsing: run, print help, or print the version.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    Run(Box<RunArgs>),
    Help,
    Version,
}

/// What `--version` prints. The last line is solo5-hvt's: launchers such
/// as albatross run `TENDER --version` and use a tender only if a line
/// reads `ABI version N` for the image's ABI version.
pub fn version_text() -> String {
    format!(
        "tt-host {} (Solo5 hvt tender)\nABI version {}",
        env!("CARGO_PKG_VERSION"),
        crate::abi::ABI_VERSION
    )
}

/// Largest `--mem` in MiB: the largest guest memory
/// ([`crate::vmm::layout::MAX_MEM`]).
pub const MAX_MEM_MB: u64 = crate::vmm::layout::MAX_MEM >> 20;

/// A bad command line; the message names the option, and the error points
/// to the help of the command (`run` or `policy`) that refused it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{msg} (see 'tt-host {command} --help')")]
pub struct CliError {
    pub msg: String,
    /// The command whose help to see: `run`, `policy` or `journal`.
    pub command: &'static str,
}

impl CliError {
    /// A bad `tt-host run` command line.
    pub fn run(msg: impl Into<String>) -> CliError {
        CliError {
            msg: msg.into(),
            command: "run",
        }
    }

    /// A bad `tt-host policy` command line.
    pub fn policy(msg: impl Into<String>) -> CliError {
        CliError {
            msg: msg.into(),
            command: "policy",
        }
    }
}

/// Parse a device option, `--OPT:NAME=VALUE` or (for an option that is a
/// default for every device of its kind) `--OPT=VALUE`, whose `OPT` a
/// device kind owns; `None` if no kind owns it. `arg` has no leading `--`.
/// `tt-host restore --help`.
pub const RESTORE_USAGE: &str = "\
usage: tt-host restore [OPTIONS] DIR

Resume the guest saved in the snapshot directory DIR ('tt-host snapshot').
It runs on with the memory, vCPU and devices it had, admitted as a launch
is. The options are those of 'tt-host run'; the image, memory size, guest
arguments and CPL come from the snapshot. A device named by an option here
(--block:NAME=PATH, --net:NAME=TAP, ...) takes all its options from here;
the others keep the snapshot's. A disk image that changed since the
snapshot is refused. See docs/SNAPSHOT.md.";

/// `tt-host pause|resume|snapshot --help`.
pub const CONTROL_USAGE: &str = "\
usage: tt-host pause --control=SOCK
       tt-host resume --control=SOCK
       tt-host status --control=SOCK
       tt-host snapshot --control=SOCK DIR [--stop]
       tt-host pause|resume|status NAME [--socket=PATH]
       tt-host snapshot NAME DIR [--stop] [--socket=PATH]

Act on the guest of 'tt-host run --control=SOCK'. pause stops it between
two instructions with its disks flushed (every acknowledged write on its
image); resume lets it run on. snapshot saves it to the directory DIR
(created if needed; its files 'state' and 'memory' are replaced), pausing
it meanwhile: it runs on afterwards, or with --stop the run ends (exit 0).
'tt-host restore DIR' resumes it. With NAME instead of --control, the
daemon does it for a unikernel it runs (one you may act on); the snapshot's
files are created with your rights.";

/// `tt-host migrate-send|migrate-receive --help`.
pub const MIGRATE_USAGE: &str = "\
usage: tt-host migrate-send --control=SOCK --to=ADDR [--psk=FILE]
                            [--downtime-ms=MS] [--timeout=SECONDS]
       tt-host migrate-send NAME --to=ADDR ...     (a unikernel of the daemon)
       tt-host migrate-receive --listen=ADDR [--psk=FILE] [RUN OPTIONS]

Move the guest of 'tt-host run --control=SOCK' to the tt-host that
'migrate-receive' started, while it runs. ADDR is a Unix socket path
(unix:PATH, the default kind) or HOST:PORT (tcp:HOST:PORT), which needs
--psk=FILE on both ends: a pre-shared key of at least 16 bytes that each
side proves it knows (the stream itself is not encrypted).

Memory is copied while the guest runs, again and again as it dirties it,
until what is left takes at most --downtime-ms (default 50) to send; then
the guest pauses, the rest and its state go over, and it resumes on the
target. If that does not happen within --timeout (default 30 s), or the
target fails, the guest runs on here. Over a Unix socket (same host: a
live upgrade to another tt-host binary) memory is not copied: the target
maps the same memory, and takes over the admission entry.

The target's RUN OPTIONS are those of 'tt-host run' without IMAGE: its
devices (--block:NAME=PATH, --net:NAME=TAP) come from its own command
line, never from the stream. Disks are drained at the switch: both ends
must see the same image (docs/SNAPSHOT.md).";

/// `tt-host migrate-send`, parsed.
#[derive(Debug, PartialEq, Eq)]
pub struct MigrateSend {
    pub control: PathBuf,
    pub to: crate::migration::Addr,
    pub psk: Option<PathBuf>,
    pub downtime_ms: Option<u64>,
    pub max_ms: Option<u64>,
}

/// Parse `migrate-send`'s arguments; `None` for `--help`.
pub fn parse_migrate_send(args: &[String]) -> Result<Option<MigrateSend>, CliError> {
    let err = |msg: String| CliError {
        msg,
        command: "migrate-send",
    };
    let (mut control, mut to, mut psk, mut downtime_ms, mut max_ms) =
        (None, None, None, None, None);
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_str();
        if a == "-h" || a == "--help" {
            return Ok(None);
        }
        if let Some(v) = value_of(args, &mut i, "--control") {
            control = Some(PathBuf::from(v));
        } else if let Some(v) = value_of(args, &mut i, "--to") {
            to = Some(v.parse().map_err(|e| err(format!("--to: {e}")))?);
        } else if let Some(v) = value_of(args, &mut i, "--psk") {
            psk = Some(PathBuf::from(v));
        } else if let Some(v) = value_of(args, &mut i, "--downtime-ms") {
            downtime_ms = Some(number::<u64>(v).filter(|&n| n <= 60_000).ok_or_else(|| {
                err(format!(
                    "--downtime-ms={}: expected milliseconds, at most 60000",
                    quote(v)
                ))
            })?);
        } else if let Some(v) = value_of(args, &mut i, "--timeout") {
            let s = number::<u64>(v)
                .filter(|&n| (1..=3600).contains(&n))
                .ok_or_else(|| {
                    err(format!(
                        "--timeout={}: expected seconds from 1 to 3600",
                        quote(v)
                    ))
                })?;
            max_ms = Some(s * 1000);
        } else {
            return Err(err(format!("unexpected argument '{}'", quote(a))));
        }
        i += 1;
    }
    Ok(Some(MigrateSend {
        control: control.ok_or_else(|| err("migrate-send needs --control=SOCK".into()))?,
        to: to.ok_or_else(|| err("migrate-send needs --to=ADDR".into()))?,
        psk,
        downtime_ms,
        max_ms,
    }))
}

/// Split `migrate-receive`'s own options from the run options that
/// follow (returned with a placeholder image for [`parse_run`]); `None`
/// for `--help`.
#[allow(clippy::type_complexity)]
pub fn parse_migrate_receive(
    args: &[String],
) -> Result<Option<(crate::migration::Addr, Option<PathBuf>, Vec<String>)>, CliError> {
    let err = |msg: String| CliError {
        msg,
        command: "migrate-receive",
    };
    let (mut listen, mut psk, mut rest) = (None, None, Vec::new());
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_str();
        if a == "-h" || a == "--help" {
            return Ok(None);
        }
        if let Some(v) = value_of(args, &mut i, "--listen") {
            listen = Some(v.parse().map_err(|e| err(format!("--listen: {e}")))?);
        } else if let Some(v) = value_of(args, &mut i, "--psk") {
            psk = Some(PathBuf::from(v));
        } else if !a.starts_with("--") {
            return Err(err(format!(
                "unexpected argument '{}': the image and its arguments come from the source",
                quote(a)
            )));
        } else {
            rest.push(args[i].clone());
        }
        i += 1;
    }
    rest.push("migrated-image".into());
    let listen = listen.ok_or_else(|| err("migrate-receive needs --listen=ADDR".into()))?;
    Ok(Some((listen, psk, rest)))
}

/// `tt-host pause|resume|status|snapshot`, parsed.
#[derive(Debug, PartialEq, Eq)]
pub struct ControlCmd {
    pub socket: PathBuf,
    /// snapshot's directory.
    pub dir: Option<PathBuf>,
    pub stop: bool,
}

/// Parse the arguments of control command `cmd`; `None` for `--help`.
pub fn parse_control(cmd: &str, args: &[String]) -> Result<Option<ControlCmd>, CliError> {
    let err = |msg: String| CliError {
        msg,
        command: "snapshot",
    };
    let (mut socket, mut dir, mut stop) = (None, None, false);
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_str();
        if a == "-h" || a == "--help" {
            return Ok(None);
        }
        if let Some(v) = value_of(args, &mut i, "--control") {
            if v.is_empty() {
                return Err(err("--control needs the socket's path".into()));
            }
            socket = Some(PathBuf::from(v));
        } else if a == "--stop" && cmd == "snapshot" {
            stop = true;
        } else if !a.starts_with('-') && cmd == "snapshot" && dir.is_none() {
            dir = Some(PathBuf::from(a));
        } else {
            return Err(err(format!("{cmd}: unexpected argument '{}'", quote(a))));
        }
        i += 1;
    }
    let socket = socket.ok_or_else(|| err(format!("{cmd} needs --control=SOCK")))?;
    if cmd == "snapshot" && dir.is_none() {
        return Err(err("snapshot needs the directory DIR to write".into()));
    }
    Ok(Some(ControlCmd { socket, dir, stop }))
}

/// A device option from its parts (as a snapshot keeps it), checked as
/// the command line's would be.
pub fn parse_device_option(
    option: &str,
    device: Option<&str>,
    value: &str,
) -> Result<DeviceOption, CliError> {
    let arg = match device {
        Some(d) => format!("{option}:{d}={value}"),
        None => format!("{option}={value}"),
    };
    device_option(&arg).unwrap_or_else(|| {
        Err(CliError::run(format!(
            "unknown option '--{}'",
            quote(option)
        )))
    })
}

fn device_option(arg: &str) -> Option<Result<DeviceOption, CliError>> {
    let (key, value) = match arg.split_once('=') {
        Some((k, v)) => (k, Some(v)),
        None => (arg, None),
    };
    let (option, device) = match key.split_once(':') {
        Some((o, d)) => (o, Some(d)),
        None => (key, None),
    };
    let (kind, spec) = kind::option_owner(option)?;
    Some((|| {
        let spelled = match device {
            Some(_) => format!("--{option}:NAME={}", spec.value),
            None if spec.default_for_all => format!("--{option}[:NAME]={}", spec.value),
            None => {
                return Err(CliError::run(format!(
                    "--{option} needs a device name: --{option}:NAME={}",
                    spec.value
                )))
            }
        };
        let Some(value) = value else {
            return Err(CliError::run(format!(
                "{spelled} expected, got '--{}'",
                quote(arg)
            )));
        };
        if let Some(name) = device {
            if name.contains(':') {
                return Err(CliError::run(format!(
                    "{spelled} expected, got '--{}'",
                    quote(arg)
                )));
            }
            if name.is_empty()
                || name.len() > 67
                || !name.bytes().all(|b| b.is_ascii_alphanumeric())
            {
                return Err(CliError::run(format!(
                    "--{option}: device name '{}' must be 1 to 67 ASCII letters or digits",
                    quote(name)
                )));
            }
        }
        if value.is_empty() {
            return Err(CliError::run(format!("--{key}= needs a value")));
        }
        kind.check(option, value)
            .map_err(|why| CliError::run(format!("--{}={}: {why}", quote(key), quote(value))))?;
        Ok(DeviceOption {
            option: spec.name,
            device: device.map(String::from),
            value: value.to_string(),
        })
    })())
}

/// Parse the arguments after `run`.
pub fn parse_run(args: &[String]) -> Result<Parsed, CliError> {
    let mut mem_mb = 512u64;
    let mut devices: Vec<DeviceOption> = vec![];
    let mut i = 0;
    let mut dashdash = false;
    let mut solo5_hvt_boot = false;
    let (mut name, mut cpu, mut state_dir) = (None, None, None);
    let mut client = None;
    let mut cpl = Cpl::Auto;
    let mut no_seccomp = false;
    let (mut console_log, mut stats_file, mut ready_fd) = (None, None, None);
    let mut control = None;
    let mut console_log_size = crate::runfile::console::DEFAULT_CAPACITY;
    let mut seen_size = false;
    // Options that take one value, each at most once (as device options).
    let mut seen: Vec<&'static str> = Vec::new();
    let mut once = |opt: &'static str| {
        if seen.contains(&opt) {
            return Err(CliError::run(format!("{opt} given twice")));
        }
        seen.push(opt);
        Ok(())
    };
    while i < args.len() {
        let a = args[i].as_str();
        if a == "--" {
            dashdash = true;
            i += 1;
            break;
        }
        if !a.starts_with('-') || a == "-" {
            break;
        }
        if a == "-h" || a == "--help" {
            return Ok(Parsed::Help);
        }
        if a == "--version" {
            return Ok(Parsed::Version);
        }
        if let Some(v) = a.strip_prefix("--mem=").or_else(|| {
            (a == "--mem").then(|| {
                i += 1;
                args.get(i).map(String::as_str).unwrap_or("")
            })
        }) {
            once("--mem")?;
            mem_mb = number::<u64>(v)
                .filter(|m| (4..=MAX_MEM_MB).contains(m))
                .ok_or_else(|| {
                    CliError::run(format!(
                        "--mem={}: expected a size in MiB from 4 to {MAX_MEM_MB}",
                        quote(v)
                    ))
                })?;
        } else if let Some(v) = value_of(args, &mut i, "--name") {
            once("--name")?;
            let n: crate::resources::Name = v
                .parse()
                .map_err(|e| CliError::run(format!("--name={}: {e}", quote(v))))?;
            name = Some(n);
        } else if let Some(v) = value_of(args, &mut i, "--cpu") {
            once("--cpu")?;
            cpu = Some(number::<u16>(v).ok_or_else(|| {
                CliError::run(format!("--cpu={}: expected a host CPU number", quote(v)))
            })?);
        } else if let Some(v) = value_of(args, &mut i, "--state-dir") {
            once("--state-dir")?;
            if v.is_empty() {
                return Err(CliError::run("--state-dir needs a directory"));
            }
            state_dir = Some(PathBuf::from(v));
        } else if let Some(v) = value_of(args, &mut i, "--cpl") {
            once("--cpl")?;
            cpl = match v {
                "0" => Cpl::Zero,
                "3" => Cpl::Three,
                "auto" => Cpl::Auto,
                _ => {
                    return Err(CliError::run(format!(
                        "--cpl={}: expected 0, 3 or auto",
                        quote(v)
                    )))
                }
            };
        } else if let Some(v) = value_of(args, &mut i, "--x-client") {
            once("--x-client")?;
            client = Some(
                v.parse()
                    .map_err(|e| CliError::run(format!("--x-client={}: {e}", quote(v))))?,
            );
        } else if let Some(v) = value_of(args, &mut i, "--console-log") {
            once("--console-log")?;
            console_log = Some(run_file("--console-log", v)?);
        } else if let Some(v) = value_of(args, &mut i, "--console-log-size") {
            once("--console-log-size")?;
            seen_size = true;
            use crate::runfile::console::{MAX_CAPACITY, MIN_CAPACITY};
            console_log_size = number::<u64>(v)
                .filter(|n| (MIN_CAPACITY..=MAX_CAPACITY).contains(n))
                .ok_or_else(|| {
                    CliError::run(format!(
                        "--console-log-size={}: expected a number of bytes from \
                         {MIN_CAPACITY} to {MAX_CAPACITY}",
                        quote(v)
                    ))
                })?;
        } else if let Some(v) = value_of(args, &mut i, "--stats-file") {
            once("--stats-file")?;
            stats_file = Some(run_file("--stats-file", v)?);
        } else if let Some(v) = value_of(args, &mut i, "--control") {
            once("--control")?;
            control = Some(run_file("--control", v)?);
        } else if let Some(v) = value_of(args, &mut i, "--x-ready-fd") {
            once("--x-ready-fd")?;
            ready_fd = Some(number::<i32>(v).filter(|&n| n > 2).ok_or_else(|| {
                CliError::run(format!(
                    "--x-ready-fd={}: expected an open file descriptor number, 3 or more",
                    quote(v)
                ))
            })?);
        } else if a == "--no-seccomp" {
            once("--no-seccomp")?;
            no_seccomp = true;
        } else if a == "--x-solo5-hvt-boot" {
            once("--x-solo5-hvt-boot")?;
            solo5_hvt_boot = true;
        } else if let Some(opt) = a.strip_prefix("--").and_then(device_option) {
            let opt = opt?;
            if devices
                .iter()
                .any(|o| o.option == opt.option && o.device == opt.device)
            {
                let spelled = match &opt.device {
                    Some(d) => format!("--{}:{d}", opt.option),
                    None => format!("--{}", opt.option),
                };
                return Err(CliError::run(format!("{spelled} given twice")));
            }
            devices.push(opt);
        } else if a == "--gdb" || a.starts_with("--gdb-port=") || a.starts_with("--dumpcore=") {
            return Err(CliError::run(format!(
                "'{}' is a solo5-hvt-debug option; tt-host has no gdb stub or core dumps",
                quote(a)
            )));
        } else {
            return Err(CliError::run(format!("unknown option '{}'", quote(a))));
        }
        i += 1;
    }
    if seen_size && console_log.is_none() {
        return Err(CliError::run(
            "--console-log-size is the size of --console-log's ring: give --console-log=PATH",
        ));
    }
    if console_log.is_some() && console_log == stats_file {
        return Err(CliError::run(
            "--console-log and --stats-file name the same file: give each its own",
        ));
    }
    let image = args
        .get(i)
        .ok_or_else(|| CliError::run("missing IMAGE (the unikernel to run)"))?;
    let mut rest = &args[i + 1..];
    if !dashdash && rest.first().map(String::as_str) == Some("--") {
        rest = &rest[1..];
    }
    Ok(Parsed::Run(Box::new(RunArgs {
        mem_mb,
        devices,
        image: PathBuf::from(image),
        guest_args: rest.to_vec(),
        solo5_hvt_boot,
        name,
        cpu,
        state_dir,
        client,
        cpl,
        no_seccomp,
        console_log,
        console_log_size,
        stats_file,
        ready_fd,
        control,
    })))
}

/// The path given to a run-file option (`--console-log`, `--stats-file`).
fn run_file(opt: &str, v: &str) -> Result<PathBuf, CliError> {
    if v.is_empty() {
        return Err(CliError::run(format!("{opt} needs a file path")));
    }
    Ok(PathBuf::from(v))
}

/// The value of option `opt` at `args[*i]`, spelled `--opt=V` or
/// `--opt V` (then `*i` moves past `V`); `None` if it is another option.
pub fn value_of<'a>(args: &'a [String], i: &mut usize, opt: &str) -> Option<&'a str> {
    let a = args[*i].as_str();
    if let Some(v) = a.strip_prefix(opt).and_then(|r| r.strip_prefix('=')) {
        return Some(v);
    }
    if a == opt {
        *i += 1;
        return Some(args.get(*i).map(String::as_str).unwrap_or(""));
    }
    None
}

pub const POLICY_USAGE: &str = "\
usage: tt-host policy set PATH [--unikernels N] [--mem MB] [--cpus LIST]
                              [--block MB|none] [--bridges LIST]
                              [--users LIST] [--groups LIST]
                              (each also takes 'inherit')
       tt-host policy remove PATH
       tt-host policy show [PATH]
options of all three: --state-dir=DIR (default $TT_HOST_STATE_DIR, else
/var/lib/tt-host)

Resources are delegated down a tree of paths: labels joined by ':'
(alice:bob), the root written ':'. A policy caps everything that runs
below its path, all together, and every launch is checked against the
policy of every path above its name ('tt-host run --name alice:bob:web').

set     set the policy at PATH. An option left out is not set by this
        command: on a new policy it is inherited, at every launch, from
        the nearest policy above that sets it (at the root: from the host
        as it is then: its CPUs, memory, bridges and TAPs, and no limit
        on unikernels or block storage); on a policy that exists it stays
        as it was. 'inherit' (--mem inherit) unsets an option: inherited
        from then on. 'policy show' marks what is inherited, and from
        where. What a policy sets must fit in every policy above, every
        policy below must fit in it, and what runs below must fit in it.
          --unikernels N    how many unikernels may run below PATH
          --mem MB          their guest memory together
          --cpus LIST       CPUs they may be pinned to (0-3,6; 'none')
          --block MB|none   their block devices' sizes together, or none
                            allowed at all
          --bridges LIST    networks (bridges, or TAPs in no bridge) they
                            may attach to (br0,br1; 'none')
          --users LIST      Unix users (names or uids: alice,1001; 'none')
                            granted PATH's subtree through tt-host daemon
          --groups LIST     Unix groups (names or gids), as --users
        A grant at PATH lets those users, and the members of those
        groups, create, destroy, restart, list, inspect and read the
        console and stats of the unikernels named below PATH
        (PATH:web, PATH:x:web), set and remove the policies strictly below
        PATH (PATH:x), and show PATH and below; never change PATH's own
        policy nor anything above or beside it. Grants are not inherited
        like resources: a request is allowed if any policy above it
        grants it, so a policy below cannot narrow a grant. 'inherit'
        removes the grant at PATH. root may do anything. Names are
        resolved to ids when the policy is set.
remove  remove the policy at PATH (what runs below stays bounded by the
        policies above; at the root: go back to the host's resources)
show    the tree below PATH (default: all), with usage against limits
        and the grants (as ids)";

/// A parsed `tt-host policy` command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyCmd {
    Set {
        path: crate::resources::Path,
        /// Boxed: a change is much larger than the other commands.
        change: Box<crate::resources::PolicyChange>,
        state_dir: Option<PathBuf>,
    },
    Remove {
        path: crate::resources::Path,
        state_dir: Option<PathBuf>,
    },
    Show {
        path: crate::resources::Path,
        state_dir: Option<PathBuf>,
    },
    Help,
}

/// Could `name` be a Linux network interface (a bridge)? The kernel takes
/// 1 to 15 bytes (IFNAMSIZ - 1) without '/', ':' or whitespace, and not
/// "." or "..". "none" and "inherit" are taken by the option's own
/// spellings.
fn is_interface_name(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name != "."
        && name != ".."
        && name != "none"
        && name != "inherit"
        && !name.contains(|c: char| c == '/' || c == ':' || c.is_whitespace())
}

/// The options of `policy set` and the resource each sets.
const POLICY_FIELDS: [(&str, crate::resources::Resource); 5] = {
    use crate::resources::Resource::*;
    [
        ("--unikernels", Unikernels),
        ("--mem", Memory),
        ("--cpus", Cpus),
        ("--block", Block),
        ("--bridges", Bridges),
    ]
};

/// `--bridges`' list: `br0,br1`, or `none` (or nothing) for no bridges.
fn parse_bridges(v: &str) -> Result<std::collections::BTreeSet<String>, String> {
    if v == "none" || v.is_empty() {
        return Ok(Default::default());
    }
    let names: Vec<&str> = v.split(',').map(str::trim).collect();
    if names.contains(&"") {
        return Err("empty bridge name in the list".into());
    }
    if let Some(n) = names.iter().find(|n| !is_interface_name(n)) {
        return Err(if *n == "none" {
            "'none' (no bridges) cannot be part of a list".into()
        } else if *n == "inherit" {
            "'inherit' (not set here) cannot be part of a list".into()
        } else {
            format!(
                "'{n}' is not a network interface name \
                 (1 to 15 bytes, no '/', ':' or whitespace)"
            )
        });
    }
    Ok(names.into_iter().map(String::from).collect())
}

/// `--users`' or `--groups`' list: names or numeric ids, `1000,bob`, or
/// `none` (or nothing) for nobody. A name is resolved now, through the
/// system's user or group database; a number is taken as an id as it is.
fn parse_ids(
    v: &str,
    who: crate::resources::Grantee,
) -> Result<std::collections::BTreeSet<u32>, String> {
    use crate::resources::Grantee;
    let kind = match who {
        Grantee::Users => "user",
        Grantee::Groups => "group",
    };
    if v == "none" || v.is_empty() {
        return Ok(Default::default());
    }
    let mut ids = std::collections::BTreeSet::new();
    for item in v.split(',').map(str::trim) {
        let id = match item {
            "" => return Err(format!("empty {kind} in the list")),
            "none" => return Err(format!("'none' (no {kind}s) cannot be part of a list")),
            "inherit" => return Err("'inherit' (not set here) cannot be part of a list".into()),
            _ if item.bytes().all(|b| b.is_ascii_digit()) => {
                number::<u32>(item).ok_or_else(|| format!("{kind} id {item} is too large"))?
            }
            _ => match lookup_id(item, who) {
                Ok(Some(id)) => id,
                Ok(None) => {
                    return Err(format!(
                        "no {kind} named '{}' on this host (give a numeric id)",
                        quote(item)
                    ))
                }
                Err(e) => return Err(format!("cannot look up the {kind} '{}': {e}", quote(item))),
            },
        };
        ids.insert(id);
    }
    Ok(ids)
}

/// The uid of the user, or the gid of the group, called `name`, through
/// the C library (`getpwnam_r`, `getgrnam_r`: /etc/passwd, /etc/group or
/// whatever NSS is configured to use). `Ok(None)`: no such name.
fn lookup_id(name: &str, who: crate::resources::Grantee) -> std::io::Result<Option<u32>> {
    use crate::resources::Grantee;
    let Ok(cname) = std::ffi::CString::new(name) else {
        return Ok(None);
    };
    let mut buf: Vec<libc::c_char> = vec![0; 1024];
    loop {
        let (ret, found) = match who {
            Grantee::Users => {
                // SAFETY: an all-zero passwd is a valid value (null
                // pointers, zero ids) that getpwnam_r overwrites.
                let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
                let mut out: *mut libc::passwd = std::ptr::null_mut();
                // SAFETY: `cname` is NUL-terminated; `pwd`, `buf` (of the
                // length given) and `out` are valid for writes for the
                // call; the strings it points into `buf` are not read.
                let ret = unsafe {
                    libc::getpwnam_r(
                        cname.as_ptr(),
                        &mut pwd,
                        buf.as_mut_ptr(),
                        buf.len(),
                        &mut out,
                    )
                };
                (ret, (!out.is_null()).then_some(pwd.pw_uid))
            }
            Grantee::Groups => {
                // SAFETY: as for passwd above.
                let mut grp: libc::group = unsafe { std::mem::zeroed() };
                let mut out: *mut libc::group = std::ptr::null_mut();
                // SAFETY: as for getpwnam_r above.
                let ret = unsafe {
                    libc::getgrnam_r(
                        cname.as_ptr(),
                        &mut grp,
                        buf.as_mut_ptr(),
                        buf.len(),
                        &mut out,
                    )
                };
                (ret, (!out.is_null()).then_some(grp.gr_gid))
            }
        };
        match ret {
            0 => return Ok(found),
            libc::ERANGE if buf.len() < 1 << 20 => buf.resize(buf.len() * 4, 0),
            // What glibc and musl return for a name they do not know.
            libc::ENOENT | libc::ESRCH => return Ok(None),
            e => return Err(std::io::Error::from_raw_os_error(e)),
        }
    }
}

/// Parse the arguments after `policy`.
pub fn parse_policy(args: &[String]) -> Result<PolicyCmd, CliError> {
    use crate::resources::{Grantee, PolicyChange, Resource};
    let Some(verb) = args.first().map(String::as_str) else {
        return Err(CliError::policy("policy: expected set, remove or show"));
    };
    if verb == "-h" || verb == "--help" || verb == "help" {
        return Ok(PolicyCmd::Help);
    }
    let mut change = PolicyChange::default();
    let mut state_dir = None;
    let mut path: Option<crate::resources::Path> = None;
    let mut i = 1;
    while i < args.len() {
        let a = args[i].as_str();
        let bad =
            |opt: &str, v: &str, why: &str| CliError::policy(format!("{opt}={}: {why}", quote(v)));
        if a == "-h" || a == "--help" {
            return Ok(PolicyCmd::Help);
        } else if let Some(v) = value_of(args, &mut i, "--state-dir") {
            if v.is_empty() {
                return Err(CliError::policy("--state-dir needs a directory"));
            }
            state_dir = Some(PathBuf::from(v));
        } else if !a.starts_with("--") {
            if path.is_some() {
                return Err(CliError::policy(format!(
                    "policy {verb}: unexpected argument '{}'",
                    quote(a)
                )));
            }
            path = Some(a.parse().map_err(|e| {
                CliError::policy(format!("policy {verb}: path '{}': {e}", quote(a)))
            })?);
        } else if verb != "set" {
            return Err(CliError::policy(format!(
                "policy {verb}: unknown option '{}'",
                quote(a)
            )));
        } else if let Some((opt, resource, v)) = POLICY_FIELDS
            .iter()
            .find_map(|&(opt, r)| value_of(args, &mut i, opt).map(|v| (opt, r, v)))
        {
            // The last spelling of an option wins.
            change.inherit.remove(&resource);
            change.set.unset(resource);
            let set = &mut change.set;
            match resource {
                _ if v == "inherit" => {
                    change.inherit.insert(resource);
                }
                Resource::Unikernels => {
                    set.unikernels = Some(number(v).ok_or_else(|| bad(opt, v, "not a count"))?);
                }
                Resource::Memory => {
                    set.memory_mb = Some(number(v).ok_or_else(|| bad(opt, v, "not a size in MB"))?);
                }
                Resource::Cpus => {
                    let cpus = crate::resources::parse_cpu_list(v);
                    set.cpus = Some(cpus.map_err(|e| bad(opt, v, &e.to_string()))?);
                }
                Resource::Block => {
                    set.block_mb = Some(if v == "none" {
                        None
                    } else {
                        let why = "not a size in MB, 'none' or 'inherit'";
                        Some(number(v).ok_or_else(|| bad(opt, v, why))?)
                    });
                }
                Resource::Bridges => {
                    set.bridges = Some(parse_bridges(v).map_err(|why| bad(opt, v, &why))?);
                }
            }
        } else if let Some((opt, who, v)) =
            [("--users", Grantee::Users), ("--groups", Grantee::Groups)]
                .into_iter()
                .find_map(|(opt, g)| value_of(args, &mut i, opt).map(|v| (opt, g, v)))
        {
            // The last spelling of an option wins.
            change.unset_grants.remove(&who);
            let ids = if v == "inherit" {
                change.unset_grants.insert(who);
                None
            } else {
                Some(parse_ids(v, who).map_err(|why| bad(opt, v, &why))?)
            };
            match who {
                Grantee::Users => change.set.users = ids,
                Grantee::Groups => change.set.groups = ids,
            }
        } else {
            return Err(CliError::policy(format!(
                "policy set: unknown option '{}'",
                quote(a)
            )));
        }
        i += 1;
    }
    let need_path = || {
        path.clone().ok_or_else(|| {
            CliError::policy(format!("policy {verb}: missing PATH (':' for the root)"))
        })
    };
    match verb {
        "set" => Ok(PolicyCmd::Set {
            path: need_path()?,
            change: Box::new(change),
            state_dir,
        }),
        "remove" => Ok(PolicyCmd::Remove {
            path: need_path()?,
            state_dir,
        }),
        "show" => Ok(PolicyCmd::Show {
            path: path.unwrap_or_else(crate::resources::Path::root),
            state_dir,
        }),
        other => Err(CliError::policy(format!(
            "policy: unknown command '{}' (expected set, remove or show)",
            quote(other)
        ))),
    }
}

pub const JOURNAL_USAGE: &str = "\
usage: tt-host journal list
       tt-host journal drain IMAGE
       tt-host journal discard IMAGE [--yes]
options of all three: --state-dir=DIR (default $TT_HOST_STATE_DIR, else
/var/lib/tt-host)

With --block-durability=journal (the default), every guest write reaches
the journal of its image, in the state directory's journals/, before the
guest is told it is done; tt-host applies it to the image in the
background, and replays what is left when it next opens the image.

list     every journal: its image and whether it is still there, the writes
         not yet applied to it, and whether a tt-host uses it now
drain    apply IMAGE's journal to IMAGE now (also after the image was
         resized), leaving the journal empty
discard  throw IMAGE's journal away, with the writes it holds; asks for
         confirmation on the terminal unless --yes is given. For an image
         that was replaced or deleted, or whose journal cannot be used.";

/// A parsed `tt-host journal` command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JournalCmd {
    List {
        state_dir: Option<PathBuf>,
    },
    Drain {
        image: PathBuf,
        state_dir: Option<PathBuf>,
    },
    Discard {
        image: PathBuf,
        yes: bool,
        state_dir: Option<PathBuf>,
    },
    Help,
}

/// A bad `tt-host journal` command line.
fn journal_error(msg: impl Into<String>) -> CliError {
    CliError {
        msg: msg.into(),
        command: "journal",
    }
}

/// Parse the arguments after `journal`.
pub fn parse_journal(args: &[String]) -> Result<JournalCmd, CliError> {
    let Some(verb) = args.first().map(String::as_str) else {
        return Err(journal_error("journal: expected list, drain or discard"));
    };
    if matches!(verb, "-h" | "--help" | "help") {
        return Ok(JournalCmd::Help);
    }
    if !matches!(verb, "list" | "drain" | "discard") {
        return Err(journal_error(format!(
            "unknown command 'journal {}'",
            quote(verb)
        )));
    }
    let (mut state_dir, mut image, mut yes) = (None, None, false);
    let mut i = 1;
    while i < args.len() {
        let a = args[i].as_str();
        if a == "-h" || a == "--help" {
            return Ok(JournalCmd::Help);
        } else if let Some(v) = value_of(args, &mut i, "--state-dir") {
            if v.is_empty() {
                return Err(journal_error("--state-dir needs a directory"));
            }
            state_dir = Some(PathBuf::from(v));
        } else if a == "--yes" && verb == "discard" {
            yes = true;
        } else if a.starts_with("--") || verb == "list" || image.is_some() {
            return Err(journal_error(format!(
                "journal {verb}: unexpected argument '{}'",
                quote(a)
            )));
        } else {
            image = Some(PathBuf::from(a));
        }
        i += 1;
    }
    let need_image = || {
        image
            .clone()
            .ok_or_else(|| journal_error(format!("journal {verb}: missing IMAGE")))
    };
    Ok(match verb {
        "list" => JournalCmd::List { state_dir },
        "drain" => JournalCmd::Drain {
            image: need_image()?,
            state_dir,
        },
        _ => JournalCmd::Discard {
            image: need_image()?,
            yes,
            state_dir,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Parsed, CliError> {
        parse_run(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    fn run(args: &[&str]) -> RunArgs {
        match p(args).unwrap() {
            Parsed::Run(r) => *r,
            other => panic!("not a run: {other:?}"),
        }
    }

    /// `(device, value)` of every `--OPT:NAME=VALUE` with this option.
    fn given(r: &RunArgs, option: &str) -> Vec<(String, String)> {
        r.devices
            .iter()
            .filter(|o| o.option == option)
            .map(|o| (o.device.clone().unwrap_or_default(), o.value.clone()))
            .collect()
    }

    fn pair(a: &str, b: &str) -> Vec<(String, String)> {
        vec![(a.into(), b.into())]
    }

    #[test]
    fn supervision_options_parse_and_bad_values_are_named() {
        let r = run(&[
            "--console-log=/run/u/console",
            "--console-log-size=4096",
            "--stats-file",
            "/run/u/stats",
            "--x-ready-fd=5",
            "app.hvt",
        ]);
        assert_eq!(r.console_log, Some(PathBuf::from("/run/u/console")));
        assert_eq!(r.console_log_size, 4096);
        assert_eq!(r.stats_file, Some(PathBuf::from("/run/u/stats")));
        assert_eq!(r.ready_fd, Some(5));
        let d = run(&["app.hvt"]);
        assert_eq!(
            (d.console_log, d.stats_file, d.ready_fd),
            (None, None, None)
        );
        assert_eq!(d.console_log_size, 1 << 20);
        for (args, msg) in [
            (
                &["--console-log=c", "--console-log-size=4095"][..],
                "--console-log-size=4095: expected a number of bytes from 4096 to 67108864",
            ),
            (
                &["--console-log=c", "--console-log-size=+8192"],
                "--console-log-size=+8192: expected",
            ),
            (
                &["--console-log=c", "--console-log-size=67108865"],
                "expected a number of bytes",
            ),
            (&["--console-log-size=8192"], "give --console-log=PATH"),
            (&["--console-log="], "--console-log needs a file path"),
            (&["--console-log=x", "--stats-file=x"], "name the same file"),
            (&["--x-ready-fd=2"], "3 or more"),
            (&["--x-ready-fd=-1"], "--x-ready-fd=-1: expected"),
            (
                &["--stats-file=a", "--stats-file=b"],
                "--stats-file given twice",
            ),
        ] {
            let mut all = args.to_vec();
            all.push("app.hvt");
            let e = p(&all).unwrap_err().to_string();
            assert!(e.contains(msg), "{args:?}: {e}");
        }
    }

    #[test]
    fn solo5_hvt_spellings() {
        let r = run(&[
            "--mem=64",
            "--block:storage=disk.img",
            "--block-sector-size:storage=4096",
            "--net:service0=tap0",
            "--net-mac:service0=02:00:00:00:00:01",
            "app.hvt",
            "--",
            "a",
            "b",
        ]);
        assert_eq!(r.mem_mb, 64);
        assert_eq!(given(&r, "block"), pair("storage", "disk.img"));
        assert_eq!(given(&r, "block-sector-size"), pair("storage", "4096"));
        assert_eq!(given(&r, "net"), pair("service0", "tap0"));
        assert_eq!(given(&r, "net-mac"), pair("service0", "02:00:00:00:00:01"));
        assert_eq!(r.image, PathBuf::from("app.hvt"));
        assert_eq!(r.guest_args, vec!["a", "b"]);
    }

    #[test]
    fn solo5_order_with_dashdash_before_image() {
        let r = run(&[
            "--mem=8",
            "--x-solo5-hvt-boot",
            "--",
            "app.hvt",
            "x",
            "--",
            "y",
        ]);
        assert!(r.solo5_hvt_boot);
        assert_eq!(r.image, PathBuf::from("app.hvt"));
        assert_eq!(r.guest_args, vec!["x", "--", "y"]);
    }

    /// The command line albatross builds for solo5-hvt (src/vmm_unix.ml,
    /// `exec`): --mem, then --net and --net-mac per network, --block and
    /// --block-sector-size per disk, then `--`, the image and its argv.
    #[test]
    fn albatross_command_line() {
        let r = run(&[
            "--mem=64",
            "--net:service=vmmtap0",
            "--net-mac:service=02:5a:1b:00:00:01",
            "--block:storage=/var/db/albatross/block/web.storage",
            "--block-sector-size:storage=4096",
            "--",
            "/var/db/albatross/web.img",
            "--ipv4=10.0.0.2/24",
            "--",
        ]);
        assert_eq!(r.mem_mb, 64);
        assert_eq!(given(&r, "net"), pair("service", "vmmtap0"));
        assert_eq!(given(&r, "block-sector-size"), pair("storage", "4096"));
        assert_eq!(r.image, PathBuf::from("/var/db/albatross/web.img"));
        assert_eq!(r.guest_args, vec!["--ipv4=10.0.0.2/24", "--"]);
    }

    #[test]
    fn version_ends_with_solo5_hvts_abi_line() {
        assert_eq!(p(&["--version"]).unwrap(), Parsed::Version);
        assert_eq!(p(&["--mem=64", "--version"]).unwrap(), Parsed::Version);
        // An image named --version after `--` is still an image.
        assert!(matches!(p(&["--", "--version"]).unwrap(), Parsed::Run(_)));
        let text = version_text();
        assert_eq!(text.lines().last(), Some("ABI version 2"), "{text}");
    }

    /// The test-only `dummy` kind (modules::kind::tests) registers its
    /// options in one line; the command line then takes them with the
    /// same rules as block and net options, and its own value check.
    #[test]
    fn a_registered_kind_s_options_are_parsed_by_its_rules() {
        let r = run(&[
            "--dummy-colour=red",
            "--dummy:a=x",
            "--dummy-colour:a=blue",
            "app.hvt",
        ]);
        assert_eq!(given(&r, "dummy"), pair("a", "x"));
        assert_eq!(
            given(&r, "dummy-colour"),
            vec![("".into(), "red".into()), ("a".into(), "blue".into())]
        );
        for (args, needle) in [
            (
                &["--dummy-colour=green", "x"][..],
                "--dummy-colour=green: 'green' is not red or blue",
            ),
            (
                &["--dummy-colour=red", "--dummy-colour=blue", "x"][..],
                "--dummy-colour given twice",
            ),
            (
                &["--dummy=x", "x"][..],
                "--dummy needs a device name: --dummy:NAME=WORD",
            ),
        ] {
            let e = p(args).unwrap_err();
            assert!(e.msg.contains(needle), "{args:?}: {e}");
        }
    }

    /// `--net:NAME=@FD`, as solo5-hvt takes it, reaches the launch, which
    /// checks the descriptor.
    #[test]
    fn net_fd_is_taken() {
        let r = run(&["--net:service=@3", "x"]);
        assert_eq!(given(&r, "net"), pair("service", "@3"));
    }

    fn jour(args: &[&str]) -> Result<JournalCmd, CliError> {
        parse_journal(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn journal_commands_parse_and_errors_name_the_problem() {
        assert_eq!(
            jour(&["list", "--state-dir=/s"]).unwrap(),
            JournalCmd::List {
                state_dir: Some("/s".into())
            }
        );
        assert_eq!(
            jour(&["discard", "d.img", "--yes"]).unwrap(),
            JournalCmd::Discard {
                image: "d.img".into(),
                yes: true,
                state_dir: None
            }
        );
        assert_eq!(
            jour(&["drain", "d.img"]).unwrap(),
            JournalCmd::Drain {
                image: "d.img".into(),
                state_dir: None
            }
        );
        for (args, needle) in [
            (&["drain"][..], "journal drain: missing IMAGE"),
            (&["list", "x"][..], "journal list: unexpected argument 'x'"),
            (&["drain", "a", "b"][..], "unexpected argument 'b'"),
            (&["drain", "a", "--yes"][..], "unexpected argument '--yes'"),
            (&["frob"][..], "unknown command 'journal frob'"),
            (&[][..], "expected list, drain or discard"),
        ] {
            let e = jour(args).unwrap_err();
            assert!(e.msg.contains(needle), "{args:?}: {e}");
            assert!(e.to_string().ends_with("(see 'tt-host journal --help')"));
        }
    }

    #[test]
    fn defaults() {
        let r = run(&["app.hvt"]);
        assert_eq!(r.mem_mb, 512);
        assert!(r.guest_args.is_empty());
    }

    #[test]
    fn errors_name_the_option() {
        for (args, needle) in [
            (&["--mem=0", "x"][..], "--mem=0"),
            (&["--mem=abc", "x"][..], "--mem=abc"),
            (&["--block:storage", "x"][..], "--block:"),
            (&["--block:st/x=a", "x"][..], "device name"),
            (
                &["--block-sector-size:s=big", "x"][..],
                "--block-sector-size:s=big",
            ),
            (&["--frobnicate", "x"][..], "unknown option '--frobnicate'"),
            (
                &["--net:a=t0", "--net:a=t1", "x"][..],
                "--net:a given twice",
            ),
            (&["--net=t0", "x"][..], "--net needs a device name"),
            (&["--block:a=", "x"][..], "--block:a= needs a value"),
            (
                &["--block-sector-size:s=-1", "x"][..],
                "--block-sector-size:s=-1: not a number of bytes",
            ),
            (&["--mem=8"][..], "missing IMAGE"),
            (&["--gdb", "x"][..], "'--gdb' is a solo5-hvt-debug option"),
            (&["--gdb-port=1234", "x"][..], "solo5-hvt-debug option"),
            (&["--dumpcore=/tmp", "x"][..], "solo5-hvt-debug option"),
        ] {
            let e = p(args).unwrap_err();
            assert!(e.msg.contains(needle), "{args:?}: {e}");
        }
    }

    #[test]
    fn help() {
        assert_eq!(p(&["--help"]).unwrap(), Parsed::Help);
        let usage = run_usage();
        assert!(usage.contains("--block-sector-size:NAME=BYTES"), "{usage}");
        assert!(usage.contains("--net-mac:NAME=HWADDR"), "{usage}");
        assert!(usage.contains(&format!("4 to {MAX_MEM_MB};")));
    }
    fn pol(args: &[&str]) -> Result<PolicyCmd, CliError> {
        parse_policy(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn policy_set_parses_every_option() {
        let PolicyCmd::Set {
            path,
            change,
            state_dir,
        } = pol(&[
            "set",
            "alice:bob",
            "--unikernels",
            "2",
            "--mem=512",
            "--cpus",
            "0-2,5",
            "--block=none",
            "--bridges",
            "br0,br1",
            "--state-dir=/tmp/s",
        ])
        .unwrap()
        else {
            panic!("not set")
        };
        assert_eq!(path.to_string(), "alice:bob");
        let set = &change.set;
        assert_eq!(set.unikernels, Some(2));
        assert_eq!(set.memory_mb, Some(512));
        assert_eq!(set.cpus, Some([0, 1, 2, 5].into()));
        assert_eq!(set.block_mb, Some(None));
        assert_eq!(
            set.bridges,
            Some(["br0".to_string(), "br1".to_string()].into())
        );
        assert!(change.inherit.is_empty());
        assert_eq!(state_dir, Some(PathBuf::from("/tmp/s")));
    }

    /// `--FIELD inherit` unsets a field (every one of the five), and the
    /// last spelling of an option wins; an option left out is neither set
    /// nor unset.
    #[test]
    fn policy_set_takes_inherit_for_every_option() {
        use crate::resources::Resource::*;
        let all = [
            "set",
            "alice",
            "--mem=512",
            "--unikernels=inherit",
            "--mem=inherit",
            "--cpus=inherit",
            "--block=inherit",
            "--bridges=inherit",
        ];
        let Ok(PolicyCmd::Set { change, .. }) = pol(&all) else {
            panic!("not set")
        };
        assert_eq!(change.set, Default::default());
        assert_eq!(
            change.inherit,
            [Unikernels, Memory, Block, Cpus, Bridges].into()
        );
        let Ok(PolicyCmd::Set { change, .. }) = pol(&["set", "alice", "--mem=inherit", "--mem=64"])
        else {
            panic!("not set")
        };
        assert_eq!(change.set.memory_mb, Some(64));
        assert!(change.inherit.is_empty());
        let Ok(PolicyCmd::Set { change, .. }) = pol(&["set", "alice"]) else {
            panic!("not set")
        };
        assert_eq!(change, Default::default());
    }

    /// `--users` and `--groups` take names (resolved now) and ids, 'none'
    /// for nobody and 'inherit' to remove the grant; the last one wins.
    #[test]
    fn policy_set_takes_users_and_groups() {
        use crate::resources::Grantee;
        let Ok(PolicyCmd::Set { change, .. }) =
            pol(&["set", "alice", "--users", "root,4242", "--groups=root, 100"])
        else {
            panic!("not set")
        };
        // root is uid 0 and gid 0 on every Linux system.
        assert_eq!(change.set.users, Some([0, 4242].into()));
        assert_eq!(change.set.groups, Some([0, 100].into()));
        assert!(change.unset_grants.is_empty());
        let Ok(PolicyCmd::Set { change, .. }) = pol(&[
            "set",
            "alice",
            "--users=none",
            "--groups=7",
            "--groups=inherit",
        ]) else {
            panic!("not set")
        };
        assert_eq!(change.set.users, Some(Default::default()));
        assert_eq!(change.set.groups, None);
        assert_eq!(change.unset_grants, [Grantee::Groups].into());
        for (args, needle) in [
            (
                &["set", "a", "--users=no-such-user-tt"][..],
                "--users=no-such-user-tt: no user named 'no-such-user-tt' on this host",
            ),
            (
                &["set", "a", "--groups=no-such-group-tt"][..],
                "no group named 'no-such-group-tt'",
            ),
            (&["set", "a", "--users=1,,2"][..], "empty user in the list"),
            (
                &["set", "a", "--users=1,none"][..],
                "'none' (no users) cannot be part of a list",
            ),
            (
                &["set", "a", "--users=4294967296"][..],
                "user id 4294967296 is too large",
            ),
            (&["show", "--users=1"][..], "unknown option '--users=1'"),
        ] {
            let e = pol(args).unwrap_err();
            assert!(e.msg.contains(needle), "{args:?}: {e}");
        }
    }

    #[test]
    fn policy_errors_name_the_problem() {
        for (args, needle) in [
            (
                &["set", "alice", "--mem=lots"][..],
                "--mem=lots: not a size",
            ),
            (&["set", "alice", "--cpus=3-1"][..], "runs backwards"),
            (&["set", "al/ce"][..], "path 'al/ce'"),
            (&["set"][..], "missing PATH"),
            (&["frob", "x"][..], "unknown command 'frob'"),
            (&["show", "--mem=1"][..], "unknown option '--mem=1'"),
            (
                &["show", "--state-dir="][..],
                "--state-dir needs a directory",
            ),
            (
                &["set", ":", "--bridges=br0,,"][..],
                "--bridges=br0,,: empty bridge name",
            ),
            (
                &["set", ":", "--bridges=none,br0"][..],
                "'none' (no bridges) cannot be part of a list",
            ),
            (
                &["set", ":", "--bridges=br0,inherit"][..],
                "'inherit' (not set here) cannot be part of a list",
            ),
            (
                &["set", ":", "--block=lots"][..],
                "--block=lots: not a size in MB, 'none' or 'inherit'",
            ),
            (
                &["set", ":", "--bridges=br0,a-very-long-bridge"][..],
                "'a-very-long-bridge' is not a network interface name",
            ),
            (
                &["set", ":", "--bridges=br/0"][..],
                "'br/0' is not a network interface name",
            ),
        ] {
            let e = pol(args).unwrap_err();
            assert!(e.msg.contains(needle), "{args:?}: {e}");
            assert!(e.to_string().ends_with("(see 'tt-host policy --help')"));
        }
    }

    #[test]
    fn run_takes_name_cpu_and_state_dir() {
        let r = run(&[
            "--name=alice:web",
            "--cpu",
            "1",
            "--state-dir=/s",
            "app.hvt",
        ]);
        assert_eq!(r.name.unwrap().to_string(), "alice:web");
        assert_eq!(r.cpu, Some(1));
        assert_eq!(r.state_dir, Some(PathBuf::from("/s")));
        assert!(p(&["--name=a::b", "x"])
            .unwrap_err()
            .msg
            .contains("--name=a::b"));
        assert!(p(&["--cpu=x", "x"]).unwrap_err().msg.contains("--cpu=x"));
    }

    #[test]
    fn x_client_takes_ids_and_groups_once() {
        let r = run(&["--x-client=4242:100:7,8", "--block:d=@5", "app.hvt"]);
        let c = r.client.clone().unwrap();
        assert_eq!((c.uid, c.gid, c.groups), (4242, 100, vec![7, 8]));
        assert_eq!(given(&r, "block"), pair("d", "@5"));
        assert_eq!(run(&["x"]).client, None);
        let e = p(&["--x-client=4242", "x"]).unwrap_err();
        assert!(e.msg.contains("--x-client=4242: expected UID:GID"), "{e}");
        let e = p(&["--x-client=1:1", "--x-client=1:1", "x"]).unwrap_err();
        assert!(e.msg.contains("--x-client given twice"), "{e}");
        assert!(run_usage().contains("--x-client=UID:GID[:G1,G2,...]"));
    }
}
