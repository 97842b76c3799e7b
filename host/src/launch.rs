//! One launch: image + command line -> attached devices -> VM -> exit status.

use crate::admission::{self, AdmitError, StateDir};
use crate::cli::{Cpl, RunArgs};
use crate::loader::{self, manifest::DeviceInfo, Image};
use crate::modules::console::Console;
use crate::modules::kind::{self, DeviceError, DeviceKind, Given};
use crate::modules::poll::Poll;
use crate::modules::Module;
use crate::resources::Unikernel;
use crate::vmm::{layout, BootParams, Vm, VmError};
use std::fs::{File, Metadata};
use std::io::Read;
use std::path::Path;

/// Why a launch failed before or while running the guest.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("cannot read image {path}: {err}")]
    ReadImage { path: String, err: std::io::Error },
    #[error("{path}: {err}")]
    Image {
        path: String,
        err: loader::LoadError,
    },
    #[error("{0}")]
    Devices(String),
    /// The cluster this host is a node of refused, or cannot be asked.
    #[error("{0}")]
    Cluster(String),
    /// A device kind refused or could not attach a device.
    #[error(transparent)]
    Device(DeviceError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Admission(#[from] AdmitError),
    #[error(transparent)]
    Sandbox(#[from] crate::sandbox::SandboxError),
    /// `--x-client`: a file could not be opened with the client's rights.
    #[error(transparent)]
    Client(#[from] crate::client_creds::ClientError),
    #[error(transparent)]
    ConsoleLog(#[from] crate::runfile::console::ConsoleError),
    #[error(
        "--x-ready-fd={fd}: file descriptor {fd} is not open (the supervisor must pass it \
         open to tt-host run)"
    )]
    ReadyFd { fd: i32 },
    #[error(transparent)]
    Control(#[from] crate::control::ControlError),
    /// A migration failed on this, the target's, side.
    #[error("migration: {0}")]
    Migration(String),
    /// A snapshot cannot be read or does not fit this host.
    #[error("snapshot {dir}: {msg}")]
    Snapshot { dir: String, msg: String },
}

/// A snapshot to resume instead of booting the image.
pub struct Resume {
    pub snapshot: crate::snapshot::Snapshot,
    pub memory: File,
    /// The snapshot directory, for messages.
    pub dir: String,
}

/// How a run ended, for the stats file's end record
/// ([`crate::runfile::stats`]): the status `tt-host run` exits with.
pub fn end_state(result: &Result<i32, LaunchError>) -> crate::runfile::stats::State {
    use crate::runfile::stats::{counters, State};
    match result {
        Ok(status) => State::Exited(*status),
        Err(LaunchError::Vm(VmError::Signal(sig))) => State::Signaled(*sig),
        // A fault after the guest started: the exit status 1 of a
        // host-detected fault.
        Err(_) if counters().guest_started() => State::Exited(1),
        Err(_) => State::Failed,
    }
}

/// Take `--x-ready-fd`: check that it is open, and own it (closed when
/// dropped, with the process at the latest).
fn ready_fd(fd: Option<i32>) -> Result<Option<std::os::fd::OwnedFd>, LaunchError> {
    use std::os::fd::FromRawFd;
    let Some(fd) = fd else { return Ok(None) };
    // SAFETY: F_GETFD reads the descriptor's flags; no pointers.
    if fd < 3 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(LaunchError::ReadyFd { fd });
    }
    // SAFETY: the descriptor is open and was handed to tt-host for this
    // use alone; nothing else in tt-host owns it (it was open before
    // tt-host opened anything).
    Ok(Some(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }))
}

/// Does the image run at CPL 3 under the monitor (`--cpl`)? Images that
/// drop to CPL 3 themselves (tt-guest's, with supervisor-only segments)
/// and solo5-hvt's boot state start at CPL 0; asking for CPL 3 for them
/// is refused.
fn run_at_cpl3(image: &Image, args: &RunArgs) -> Result<bool, LaunchError> {
    let own_supervisor = image.segments.iter().any(|s| s.prot.supervisor);
    match args.cpl {
        Cpl::Zero => Ok(false),
        Cpl::Auto => {
            Ok(!own_supervisor && !args.solo5_hvt_boot && crate::vmm::monitor::cpl0_is_emulated())
        }
        Cpl::Three if own_supervisor => Err(LaunchError::Devices(
            "--cpl=3: the image has supervisor-only segments (a tt-guest image): it runs its \
             own code at CPL 3 already; use --cpl=0 or auto"
                .into(),
        )),
        Cpl::Three if args.solo5_hvt_boot => Err(LaunchError::Devices(
            "--cpl=3 and --x-solo5-hvt-boot: solo5-hvt's boot state has no CPL 3 monitor; \
             give one or the other"
                .into(),
        )),
        Cpl::Three => Ok(true),
    }
}

/// The devices of `kind` that the manifest declares, with their options.
fn given_devices<'a>(image: &'a Image, args: &'a RunArgs, kind: &dyn DeviceKind) -> Vec<Given<'a>> {
    image
        .manifest
        .entries
        .iter()
        .filter(|e| e.ty == kind.mft_type())
        .map(|e| Given::new(&e.name, e.handle, &args.devices))
        .collect()
}

/// What the launch takes from the policy tree: its memory and CPUs, and
/// what each device kind says its devices take (block devices' sizes, the
/// networks of TAPs).
pub fn unikernel_resources(image: &Image, args: &RunArgs) -> Result<Unikernel, LaunchError> {
    let mut uk = Unikernel {
        memory_mb: args.mem_mb,
        cpus: match args.cpu {
            Some(c) => [c].into(),
            None => admission::host_cpus(),
        },
        block_mb: 0,
        bridges: Default::default(),
    };
    for kind in kind::kinds() {
        kind.resources(&given_devices(image, args, *kind), &mut uk)
            .map_err(LaunchError::Device)?;
    }
    Ok(uk)
}

/// Open `path` read-only, after checking its `stat` with `check` and again
/// (in case the path was replaced) on the open file. Nothing `check`
/// refuses is opened, and the open does not wait for a FIFO's writer.
pub(crate) fn open_checked(
    path: &Path,
    check: impl Fn(&Metadata) -> std::io::Result<()>,
) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    check(&std::fs::metadata(path)?)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    check(&file.metadata()?)?;
    Ok(file)
}

/// Read the image at `path`, a regular file (never a FIFO that blocks or
/// a device that never ends), doing bounded work on a wrong file: its ELF
/// header is read and checked first, then its size is bounded by
/// [`loader::MAX_FILE_SIZE`], and only the leading bytes the loader uses
/// are read ([`loader::span`], at most [`loader::MAX_SPAN`]).
fn read_image(path: &Path) -> Result<Vec<u8>, LaunchError> {
    let file = open_checked(path, check_image_type).map_err(|err| LaunchError::ReadImage {
        path: path.display().to_string(),
        err,
    })?;
    read_image_file(file, path)
}

fn check_image_type(m: &Metadata) -> std::io::Result<()> {
    if m.is_file() {
        Ok(())
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ))
    }
}

/// [`read_image`] from `file`, already open (by `--x-client`, with the
/// client's rights), whose path was `path`: the same checks.
fn read_image_file(mut file: File, path: &Path) -> Result<Vec<u8>, LaunchError> {
    use std::io::{Seek, SeekFrom};
    let p = path.display().to_string();
    let io = |err| LaunchError::ReadImage {
        path: p.clone(),
        err,
    };
    let load = |err| LaunchError::Image {
        path: p.clone(),
        err,
    };
    let meta = file.metadata().map_err(io)?;
    check_image_type(&meta).map_err(io)?;
    let len = meta.len();
    let mut head = Vec::new();
    (&mut file).take(64).read_to_end(&mut head).map_err(io)?;
    let header = loader::parse_header(&head).map_err(load)?;
    loader::check_file_size(len).map_err(load)?;
    let mut phdrs = Vec::new();
    if header.phoff < len {
        file.seek(SeekFrom::Start(header.phoff)).map_err(io)?;
        (&mut file)
            .take(header.phdrs_len() as u64)
            .read_to_end(&mut phdrs)
            .map_err(io)?;
    }
    let span = loader::span(&header, &phdrs, len).map_err(load)?;
    // The file may have changed since: parse_image checks what was read.
    let mut buf = Vec::new();
    file.seek(SeekFrom::Start(0)).map_err(io)?;
    file.take(span).read_to_end(&mut buf).map_err(io)?;
    Ok(buf)
}

/// Check that the command line's devices and the manifest agree exactly:
/// every declared device is given with its kind's first option
/// (`--block:NAME=PATH`), and every option naming a device names one the
/// manifest declares, of the option's kind.
pub fn match_devices(image: &Image, args: &RunArgs) -> Result<(), LaunchError> {
    for e in &image.manifest.entries {
        // The loader takes only entries of registered kinds.
        let Some(k) = kind::kind_of_type(e.ty) else {
            continue;
        };
        let first = k.given_by();
        let given = args
            .devices
            .iter()
            .any(|o| o.option == first.name && o.device.as_deref() == Some(e.name.as_str()));
        if !given {
            return Err(LaunchError::Devices(format!(
                "the image's manifest declares {} device '{}', which was not given \
                 (--{}:{}={})",
                k.name(),
                e.name,
                first.name,
                e.name,
                first.value
            )));
        }
    }
    for o in &args.devices {
        let (Some(name), Some((owner, _))) = (&o.device, kind::option_owner(o.option)) else {
            continue;
        };
        // Declared, by a kind that takes the option (a `--block` option
        // serves hvt block and virtio-blk devices alike).
        let declared = image.manifest.entries.iter().any(|e| {
            &e.name == name && kind::kind_of_type(e.ty).is_some_and(|k| k.takes(o.option))
        });
        if !declared {
            return Err(LaunchError::Devices(format!(
                "{} device '{name}' is not declared in the image's manifest",
                owner.name()
            )));
        }
    }
    Ok(())
}

/// Boot the image described by `args` and run it to the end.
pub fn run(args: &RunArgs) -> Result<i32, LaunchError> {
    run_or_resume(args, None, Start::Boot)
}

/// How a launch's guest starts.
enum Start {
    /// From the image's entry point.
    Boot,
    /// Where a snapshot left it.
    Snapshot(Box<Resume>),
    /// Where a migration's source left it.
    Migration(Box<crate::migration::receive::Incoming>),
}

/// `tt-host migrate-receive`: run the guest that `incoming` brings, with
/// the devices of `args` (the target's own command line: never the
/// source's files). `args.image` is ignored.
pub fn receive(
    args: &RunArgs,
    incoming: crate::migration::receive::Incoming,
) -> Result<i32, LaunchError> {
    let l = &incoming.config.launch;
    let mut merged = args.clone();
    merged.mem_mb = l.mem_mb;
    merged.image = l.image_path.clone().into();
    merged.guest_args = l.guest_args.clone();
    merged.solo5_hvt_boot = l.solo5_hvt_boot;
    merged.cpl = if l.cpl3 { Cpl::Three } else { Cpl::Zero };
    if merged.name.is_none() {
        merged.name = l.name.as_ref().and_then(|n| n.parse().ok());
    }
    let image = l.image.clone();
    // Whatever stops this target before READY (a device its command line
    // lacks, admission, ...) goes back to the source as the reason; after
    // the commit the source is gone and the message goes nowhere.
    let aborter = incoming.aborter();
    let r = run_or_resume(&merged, Some(image), Start::Migration(Box::new(incoming)));
    if let (Err(e), Some(a)) = (&r, aborter) {
        a.abort(&e.to_string());
    }
    r
}

/// `tt-host restore`: resume the snapshot in directory `args.image`, with
/// the devices the snapshot's launch had, except those `args` names (a
/// device named by any option on the restoring command line takes all its
/// options from there).
pub fn restore(args: &RunArgs) -> Result<i32, LaunchError> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = args.image.display().to_string();
    let err = |msg: String| LaunchError::Snapshot {
        dir: dir.clone(),
        msg,
    };
    // With --x-client the snapshot's files are opened with the client's
    // rights, as every file it names.
    let open = |name: &str| {
        let path = args.image.join(name);
        let opened = match &args.client {
            Some(c) => crate::client_creds::with_identity(c, || {
                crate::client_creds::open_no_magic_links(&path, libc::O_RDONLY | libc::O_NONBLOCK)
            })
            .map_err(|e| err(format!("cannot open {name}: {e}")))?,
            None => std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&path),
        };
        opened.map_err(|e| err(format!("cannot open {name}: {e}")))
    };
    let state = open(crate::snapshot::STATE_FILE)?;
    let limit = crate::snapshot::MAX_BODY + 64;
    let mut bytes = Vec::new();
    (&state)
        .take(limit)
        .read_to_end(&mut bytes)
        .map_err(|e| err(format!("cannot read state: {e}")))?;
    let snapshot = crate::snapshot::decode(&bytes).map_err(|e| err(e.to_string()))?;
    let memory = open(crate::snapshot::MEMORY_FILE)?;
    let l = &snapshot.launch;
    let mut merged = args.clone();
    merged.mem_mb = l.mem_mb;
    merged.image = l.image_path.clone().into();
    merged.guest_args = l.guest_args.clone();
    merged.solo5_hvt_boot = l.solo5_hvt_boot;
    merged.cpl = if l.cpl3 { Cpl::Three } else { Cpl::Zero };
    if merged.name.is_none() {
        merged.name = match &l.name {
            Some(n) => Some(n.parse().map_err(|e| err(format!("its name '{n}': {e}")))?),
            None => None,
        };
    }
    merged.devices.clear();
    for (option, device, value) in &l.devices {
        if args.devices.iter().any(|o| o.device == *device) {
            continue;
        }
        let spec = crate::cli::parse_device_option(option, device.as_deref(), value)
            .map_err(|e| err(format!("its device option --{option}: {e}")))?;
        merged.devices.push(spec);
    }
    merged.devices.extend(args.devices.iter().cloned());
    pin_macs(&mut merged, &snapshot.nets).map_err(|e| err(e.to_string()))?;
    let image = snapshot.launch.image.clone();
    let resume = Resume {
        snapshot,
        memory,
        dir: dir.clone(),
    };
    run_or_resume(&merged, Some(image), Start::Snapshot(Box::new(resume)))
}

/// With `TT_HOST_STATS=1` (tt-bench), print how long since the last
/// call: where a migration's downtime goes on the target.
fn timing(what: &str) {
    use std::sync::Mutex;
    use std::time::Instant;
    static LAST: Mutex<Option<Instant>> = Mutex::new(None);
    if std::env::var_os("TT_HOST_STATS").is_none_or(|v| v != "1") {
        return;
    }
    let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
    let now = Instant::now();
    if let Some(t) = *last {
        eprintln!(
            "tt-host: stats: {what}: +{:.2} ms",
            (now - t).as_secs_f64() * 1e3
        );
    }
    *last = Some(now);
}

/// Give each net device the MAC the guest has (`nets`, from its state):
/// a `--net-mac` that names another is refused, a missing one is added.
fn pin_macs(args: &mut RunArgs, nets: &[(String, [u8; 6])]) -> Result<(), LaunchError> {
    for (dev, mac) in nets {
        let m = mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        let given = args
            .devices
            .iter()
            .find(|o| o.option == "net-mac" && o.device.as_deref() == Some(dev.as_str()));
        match given {
            Some(o) if crate::modules::net::parse_mac(&o.value) == Ok(*mac) => {}
            Some(o) => {
                return Err(LaunchError::Devices(format!(
                    "net device '{dev}': the guest's MAC is {m} (it read it at boot); \
                     --net-mac:{dev}={} cannot change it",
                    o.value
                )))
            }
            None => args.devices.push(
                crate::cli::parse_device_option("net-mac", Some(dev), &m)
                    .map_err(|e| LaunchError::Devices(e.to_string()))?,
            ),
        }
    }
    Ok(())
}

/// The snapshot's description of this launch.
fn launch_info(args: &RunArgs, file: &[u8], cpl3: bool) -> crate::snapshot::Launch {
    crate::snapshot::Launch {
        image: file.to_vec(),
        image_path: args.image.display().to_string(),
        mem_mb: args.mem_mb,
        // Paths made absolute: a restore may start elsewhere.
        devices: args
            .devices
            .iter()
            .map(|o| {
                let v = match (o.option, std::env::current_dir()) {
                    ("block", Ok(cwd)) if !o.value.starts_with('@') => {
                        cwd.join(&o.value).display().to_string()
                    }
                    _ => o.value.clone(),
                };
                (o.option.to_string(), o.device.clone(), v)
            })
            .collect(),
        guest_args: args.guest_args.clone(),
        cpl3,
        solo5_hvt_boot: args.solo5_hvt_boot,
        name: args.name.as_ref().map(|n| n.to_string()),
    }
}

/// Boot the image (`file`: its bytes, already read) or resume a snapshot.
fn run_or_resume(
    args: &RunArgs,
    file: Option<Vec<u8>>,
    mut start: Start,
) -> Result<i32, LaunchError> {
    // From here on SIGINT and SIGTERM stop the launch cleanly: before the
    // guest runs, it does not start; while it runs, it is stopped as on a
    // halt (vmm::signal).
    crate::vmm::signal::install().map_err(|err| {
        LaunchError::Devices(format!("cannot install the SIGINT/SIGTERM handler: {err}"))
    })?;
    let ready = ready_fd(args.ready_fd)?;
    // The command line as given, with paths (not the descriptors --x-client
    // opens them to): what a snapshot records.
    let given = args;
    // --x-client: before anything else touches what the client named (and
    // while tt-host has one thread), open it with the client's rights; the
    // device options now name the open files (@FD), kept open by `_opened`.
    let mut client_args;
    let (args, file, _opened) = match (&args.client, file) {
        (None, Some(file)) => (args, file, None),
        (None, None) => (args, read_image(&args.image)?, None),
        // A restore (or a migration's target) has the image's bytes.
        (Some(client), Some(file)) => {
            client_args = args.clone();
            let opened = crate::client_creds::open_as_client(&mut client_args, client, false)?;
            (&client_args, file, Some(opened))
        }
        (Some(client), None) => {
            client_args = args.clone();
            let opened = crate::client_creds::open_as_client(&mut client_args, client, true)?;
            let image = opened
                .image
                .as_ref()
                .expect("opened with the image")
                .try_clone()
                .map_err(|err| LaunchError::ReadImage {
                    path: args.image.display().to_string(),
                    err,
                })?;
            let file = read_image_file(image, &args.image)?;
            (&client_args, file, Some(opened))
        }
    };
    // After --x-client's open: Console::stdout starts a writer thread.
    let console = match &args.console_log {
        Some(p) => Console::new(crate::runfile::console::ConsoleRing::open_or_create(
            p,
            args.console_log_size,
        )?),
        None => Console::stdout(),
    };
    let path = args.image.display().to_string();
    let mem_size = (args.mem_mb << 20) / layout::HUGE * layout::HUGE;
    let image =
        loader::parse_image(&file, mem_size).map_err(|err| LaunchError::Image { path, err })?;
    match_devices(&image, args)?;

    // Admission, before any device is attached or the VM is created; the
    // reservation is released when `admission` drops, as run returns.
    let uk = unikernel_resources(&image, args)?;
    if let Some(cpu) = args.cpu {
        admission::pin_to_cpu(cpu)?;
    }
    let fallback = args
        .image
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let admitted = uk.clone();
    let state = StateDir::resolve(args.state_dir.as_deref());
    // A migration's RAM arrives (while the guest still runs at the source)
    // before anything here is admitted or attached: the source holds the
    // devices until it sends the state.
    // The VM is built (empty, without devices) as the pre-copy starts:
    // the downtime then has only the devices and the state to wait for.
    let mut early_vm = None;
    let mut arrived = None;
    if let Start::Migration(incoming) = &mut start {
        let memory = crate::vmm::guest_memory(incoming.config.mem_size, incoming.memfd.take())?;
        let memory = crate::vmm::Memory {
            incoming: true,
            ..memory
        };
        let all = memory.all.clone();
        let cmdline = args.guest_args.join(" ");
        let params = BootParams {
            image: &image,
            file: &file,
            mem_size,
            cmdline: &cmdline,
            manifest: &[],
            solo5_hvt_boot: args.solo5_hvt_boot,
            cpl3: run_at_cpl3(&image, args)?,
        };
        early_vm = Some(Vm::with_memory(&params, Vec::new(), Vec::new(), memory)?);
        let copied = (!incoming.memfd_mode).then_some(&all);
        let a = incoming.receive(copied).map_err(LaunchError::Migration)?;
        arrived = Some(a);
        timing("state received");
    }
    // A local migration hands over the TAPs the guest used: a TAP cannot
    // be attached twice. One is taken only where this command line names
    // the same interface for the device (never a device of the stream's
    // choosing); it stays open, in `_taps`, for the run.
    let mut handed_args;
    let mut _taps = Vec::new();
    let args = match arrived.as_mut().map(|a| std::mem::take(&mut a.devices)) {
        Some(devices) => {
            handed_args = args.clone();
            let nets = &arrived.as_ref().expect("arrived").snapshot.nets;
            pin_macs(&mut handed_args, nets)?;
            for (name, fd) in devices {
                use std::os::fd::AsRawFd;
                let at = format!("@{}", fd.as_raw_fd());
                let same = crate::modules::net::interface_of(&name, &at).ok();
                if let Some(o) = handed_args.devices.iter_mut().find(|o| {
                    o.option == "net"
                        && o.device.as_deref() == Some(&name)
                        && Some(&o.value) == same.as_ref()
                }) {
                    o.value = at;
                    _taps.push(fd);
                }
            }
            &handed_args
        }
        None => args,
    };
    // A local migration hands its admission entry over (adopted once the
    // source commits): the guest is not admitted twice. Otherwise, admit.
    // (Only an entry of this state directory: another's stays the source's,
    // and the guest is admitted here.)
    let handed_entry = arrived
        .as_mut()
        .and_then(|a| a.entry.take())
        .filter(|(held, name)| state.check_adoptable(held, name).is_ok());
    let mut admission = match &handed_entry {
        Some(_) => None,
        None => Some(state.admit(args.name.as_ref(), &fallback, uk)?),
    };
    // On a cluster node, the cluster admits it too (its admission entry
    // here is dropped, so released, if the cluster refuses).
    if let Some(a) = &admission {
        let claim = crate::cluster::check::Claim {
            memory_mb: admitted.memory_mb,
            block_mb: admitted.block_mb,
        };
        crate::cluster::admit_through_node(state.path(), a.name(), claim, arrived.is_some())
            .map_err(LaunchError::Cluster)?;
    }

    let mut ctx = kind::Context {
        admitted: &admitted,
        state_dir: state.path(),
        image: &image,
        mmio_slots_used: 0,
    };

    // Each kind attaches its devices; its module serves their hypercalls.
    // The threads devices start (a journal's, a virtio queue's) must not
    // take SIGINT or SIGTERM, which must reach this, the vCPU's, thread.
    let blocked = crate::vmm::signal::Blocked::new().map_err(|err| {
        LaunchError::Devices(format!(
            "cannot block SIGINT/SIGTERM for device threads: {err}"
        ))
    })?;
    let control = match &args.control {
        Some(p) => Some(crate::control::Server::start(p)?),
        None => None,
    };
    let mut info = Vec::new();
    let mut readiness = Vec::new();
    let mut mmio = Vec::new();
    let mut modules: Vec<Box<dyn Module>> = vec![Box::new(console)];
    for kind in kind::kinds() {
        let attached = kind
            .attach(&given_devices(&image, args, *kind), &ctx)
            .map_err(LaunchError::Device)?;
        info.extend(attached.info);
        readiness.extend(attached.readiness);
        ctx.mmio_slots_used += attached.mmio.len();
        mmio.extend(attached.mmio);
        modules.push(attached.module);
    }
    modules.push(Box::new(Poll::new(readiness)));
    drop(blocked);
    if let Some(e) =
        (image.manifest.entries.iter()).find(|e| info.iter().all(|(h, _)| *h != e.handle))
    {
        return Err(LaunchError::Devices(format!(
            "device '{}' was not attached",
            e.name
        )));
    }
    let manifest = image.manifest.to_guest_bytes(|handle, _| {
        info.iter().find(|(h, _)| *h == handle).map_or(
            DeviceInfo::Block {
                capacity: 0,
                block_size: 512,
            },
            |(_, i)| *i,
        )
    });
    let cmdline = args.guest_args.join(" ");
    let params = BootParams {
        image: &image,
        file: &file,
        mem_size,
        cmdline: &cmdline,
        manifest: &manifest,
        solo5_hvt_boot: args.solo5_hvt_boot,
        cpl3: run_at_cpl3(&image, args)?,
    };
    if args.solo5_hvt_boot && !mmio.is_empty() {
        // solo5-hvt has no MMIO window, and its boot state maps none.
        return Err(LaunchError::Devices(
            "--x-solo5-hvt-boot: the image has virtio devices, which solo5-hvt's boot state \
             cannot reach (solo5-hvt has no virtio)"
                .into(),
        ));
    }
    timing("devices attached");
    let mut vm = match early_vm {
        Some(mut vm) => {
            vm.set_modules(modules);
            vm.attach_regions(mmio)?;
            vm
        }
        None => Vm::new(&params, modules, mmio)?,
    };
    match &mut start {
        Start::Boot => {}
        Start::Snapshot(r) => resume_vm(&mut vm, r)?,
        Start::Migration(incoming) => {
            let a = arrived.as_ref().expect("received before the VM");
            let dir = "migration".to_string();
            timing("VM built");
            let ready = resume_state(&mut vm, &a.snapshot, &dir).and_then(|()| {
                timing("state loaded");
                incoming
                    .ready(handed_entry.is_some())
                    .map_err(LaunchError::Migration)
            });
            if let Err(e) = ready {
                incoming.abort(&e.to_string());
                return Err(e);
            }
            timing("committed");
            if let Some((held, name)) = handed_entry {
                admission = Some(state.adopt(held, &name)?);
            }
            timing("admission adopted");
        }
    }
    let mut admission = admission.expect("admitted, or adopted at the commit");
    let running_dir_fd = admission.running_dir_fd();
    if let Some(c) = &control {
        let inbox = c.inbox();
        let launch = launch_info(given, &file, params.cpl3);
        vm.set_control(inbox.clone(), launch.clone());
        let (fd, name) = admission.entry();
        inbox.set_source(crate::vmm::control::Source {
            handles: vm.handles(),
            launch,
            lock_fds: vm.lock_fds(),
            admission: Some((fd, name.to_string())),
            handover: vm.handover_fds(),
        });
    }
    // Every device is open and every thread started: from here on, only
    // the system calls of the run loop and of shutdown (sandbox).
    crate::sandbox::confine(
        !args.no_seccomp,
        Some(running_dir_fd),
        control.as_ref().map(|c| c.dir_fd()),
    )?;
    timing("sandboxed");
    crate::runfile::stats::counters().guest_starts();
    if let Some(fd) = ready {
        // A write on an open descriptor, then a close: both allowed. A
        // supervisor that has gone (SIGKILLed) does not stop the guest.
        let _ = std::io::Write::write_all(&mut std::fs::File::from(fd), b"R");
    }
    let status = vm.run();
    if std::env::var_os("TT_HOST_STATS").is_some_and(|v| v == "1") {
        // Opt-in, for tt-bench: the run's exits from tt-host's own counters.
        eprintln!(
            "tt-host: stats: run_returns={} hypercalls={} mmio_exits={}",
            vm.run_returns, vm.exits, vm.mmio_exits
        );
        if let Some(m) = &vm.monitor {
            eprintln!(
                "tt-host: stats: cpl3 traps emulated={} delivered={}",
                m.counts.emulated, m.counts.delivered
            );
        }
    }
    if let Some(inbox) = control.as_ref().map(|c| c.inbox()) {
        if inbox.entry_taken() {
            // The target adopted the admission entry: not ours to remove.
            admission.hand_over();
        }
        if inbox.handed_over() {
            inbox.wait_answered(std::time::Duration::from_secs(2));
        }
    }
    Ok(status?)
}

/// Put the snapshot `r` into the VM just built for its launch: memory,
/// vCPU, monitor; and check that every disk is the one the snapshot saw.
fn resume_vm(vm: &mut Vm, r: &Resume) -> Result<(), LaunchError> {
    vm.read_memory(&r.memory)
        .map_err(|e| LaunchError::Snapshot {
            dir: r.dir.clone(),
            msg: e.to_string(),
        })?;
    resume_state(vm, &r.snapshot, &r.dir)
}

/// Put the vCPU and monitor state of `s` into the VM (its RAM is in
/// place), after checking that every disk is the one `s` saw.
fn resume_state(vm: &mut Vm, s: &crate::snapshot::Snapshot, dir: &str) -> Result<(), LaunchError> {
    let err = |msg: String| LaunchError::Snapshot {
        dir: dir.to_string(),
        msg,
    };
    let now = vm.disks().map_err(err)?;
    for then in &s.disks {
        let Some(id) = now.iter().find(|d| d.device == then.device) else {
            return Err(err(format!(
                "block device '{}' was a file ({}) and is not one now",
                then.device, then.path
            )));
        };
        if let Some(why) = crate::snapshot::disk_changed(then, id) {
            return Err(err(format!(
                "block device '{}': its image is not the one the snapshot saw ({why}); \
                 the guest's memory would not match its disk",
                then.device
            )));
        }
    }
    vm.restore_vcpu(&s.vcpu)
        .and_then(|()| vm.restore_monitor(s.monitor.as_ref()))
        .and_then(|()| vm.restore_mmio(&s.mmio))
        .map_err(|e| err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{parse_run, Parsed};
    use crate::loader::synth::Synth;
    use crate::modules::kind::tests::DUMMY_TYPE;

    fn args(a: &[&str]) -> RunArgs {
        match parse_run(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>()) {
            Ok(Parsed::Run(r)) => *r,
            other => panic!("{other:?}"),
        }
    }

    /// A restored or migrated guest keeps the MAC it read at boot: its
    /// net device gets it when no `--net-mac` is given, and a different
    /// one is refused, naming both.
    #[test]
    fn net_devices_keep_the_guests_mac() {
        let mac = [2, 0, 0, 0, 0, 0x2a];
        let nets = vec![("service0".to_string(), mac)];
        let mut a = args(&["--net:service0=tap0", "img"]);
        pin_macs(&mut a, &nets).unwrap();
        let o = a.devices.iter().find(|o| o.option == "net-mac").unwrap();
        assert_eq!(o.device.as_deref(), Some("service0"));
        assert_eq!(crate::modules::net::parse_mac(&o.value), Ok(mac));
        let mut same = args(&["--net-mac:service0=02:00:00:00:00:2A", "img"]);
        pin_macs(&mut same, &nets).unwrap();
        let mut other = args(&["--net-mac:service0=02:00:00:00:00:01", "img"]);
        let e = pin_macs(&mut other, &nets).unwrap_err().to_string();
        assert!(e.contains("the guest's MAC is 02:00:00:00:00:2a"), "{e}");
        assert!(e.contains("02:00:00:00:00:01 cannot change it"), "{e}");
    }

    /// The test-only dummy kind is one `DeviceKind` and one line in
    /// `kinds()`; the loader, the matching of options to the manifest,
    /// admission and attaching all take it with no other change.
    #[test]
    fn a_kind_registered_in_one_line_is_loaded_matched_admitted_and_attached() {
        let file = Synth {
            devices: vec![("thing".into(), DUMMY_TYPE)],
            ..Synth::default()
        }
        .build();
        let image = loader::parse_image(&file, 16 << 20).expect("the loader knows the kind");
        assert_eq!(image.manifest.entries[0].ty, DUMMY_TYPE);

        let missing = match_devices(&image, &args(&["img"])).unwrap_err();
        assert!(
            missing.to_string().contains(
                "declares dummy device 'thing', which was not given (--dummy:thing=WORD)"
            ),
            "{missing}"
        );
        let other = match_devices(
            &image,
            &args(&["--dummy:thing=w", "--dummy:other=w", "img"]),
        )
        .unwrap_err();
        assert!(
            other
                .to_string()
                .contains("dummy device 'other' is not declared"),
            "{other}"
        );

        let given = args(&["--mem=8", "--dummy:thing=w", "img"]);
        match_devices(&image, &given).unwrap();
        let uk = unikernel_resources(&image, &given).unwrap();
        assert_eq!(uk.memory_mb, 9, "the dummy kind adds 1 MB per device");
        let k = kind::kind_of_type(DUMMY_TYPE).unwrap();
        let dir = std::env::temp_dir();
        let ctx = kind::Context {
            admitted: &uk,
            state_dir: &dir,
            image: &image,
            mmio_slots_used: 0,
        };
        assert!(k.attach(&given_devices(&image, &given, k), &ctx).is_ok());
        let failing = args(&["--dummy:thing=fail", "img"]);
        let e = k
            .attach(&given_devices(&image, &failing, k), &ctx)
            .err()
            .expect("told to fail");
        assert!(
            e.to_string()
                .contains("dummy device 'thing' was told to fail"),
            "{e}"
        );
    }
}
