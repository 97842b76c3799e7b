//! One launch: image + command line -> attached devices -> VM -> exit status.

use crate::admission::{self, AdmitError, StateDir};
use crate::cli::RunArgs;
use crate::loader::{self, manifest::DeviceInfo, DeviceKind, Image};
use crate::modules::block::{Block, BlockDevice, BlockError, FileBackend};
use crate::modules::console::Console;
use crate::modules::net::{self, Net, NetDevice, NetError};
use crate::modules::Module;
use crate::resources::Unikernel;
use crate::vmm::{layout, BootParams, Vm, VmError};
use std::fs::{File, Metadata};
use std::io::{Read, Seek, SeekFrom};
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
    #[error(transparent)]
    Block(#[from] BlockError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Admission(#[from] AdmitError),
}

/// What the launch takes from the policy tree: its memory, its CPUs, its
/// block devices' sizes (MB, rounded up) and the networks its TAPs are on.
pub fn unikernel_resources(args: &RunArgs) -> Result<Unikernel, LaunchError> {
    let mut block_bytes = 0u64;
    for (name, p) in &args.blocks {
        let size = backing_size(p).map_err(|err| BlockError::Open {
            name: name.clone(),
            path: p.display().to_string(),
            err,
        })?;
        block_bytes = block_bytes.saturating_add(size);
    }
    let mut taps = Vec::new();
    for (name, tap) in &args.nets {
        if tap.starts_with('@') {
            // Admitted as the interface the descriptor holds.
            taps.push(net::interface_of(name, tap)?);
            continue;
        }
        // A TAP that does not exist is no network to admit: say so as
        // attaching it would.
        let plain = !tap.is_empty() && !tap.contains(['/', ':', ' ', '\0']) && tap != "..";
        if plain && !std::path::Path::new("/sys/class/net").join(tap).exists() {
            return Err(NetError::NoSuchTap {
                name: name.clone(),
                tap: tap.clone(),
            }
            .into());
        }
        taps.push(tap.clone());
    }
    Ok(Unikernel {
        memory_mb: args.mem_mb,
        cpus: match args.cpu {
            Some(c) => [c].into(),
            None => admission::host_cpus(),
        },
        block_mb: block_bytes.div_ceil(1 << 20),
        bridges: taps
            .iter()
            .map(|tap| admission::network_of_tap(tap))
            .collect(),
    })
}

/// Open `path` read-only, after checking its `stat` with `check` and again
/// (in case the path was replaced) on the open file. Nothing `check`
/// refuses is opened, and the open does not wait for a FIFO's writer.
fn open_checked(
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

/// Size in bytes of the regular file or block device at `path` (whatever
/// else it is gives an error, not a size or a hang).
fn backing_size(path: &Path) -> std::io::Result<u64> {
    let mut file = open_checked(path, FileBackend::check_type)?;
    file.seek(SeekFrom::End(0))
}

/// Read the image at `path`: a regular file of at most
/// [`layout::MAX_MEM`] bytes (the largest guest memory, so nothing larger
/// can be loaded), never a FIFO that blocks or a device that never ends.
fn read_image(path: &Path) -> std::io::Result<Vec<u8>> {
    let too_big = |len: u64| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "{len} bytes is larger than the largest guest memory ({} MiB)",
                layout::MAX_MEM >> 20
            ),
        )
    };
    let file = open_checked(path, |m| {
        if !m.is_file() {
            Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a regular file",
            ))
        } else if m.len() > layout::MAX_MEM {
            Err(too_big(m.len()))
        } else {
            Ok(())
        }
    })?;
    let mut buf = Vec::new();
    // The file may grow while it is read.
    file.take(layout::MAX_MEM + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > layout::MAX_MEM {
        return Err(too_big(buf.len() as u64));
    }
    Ok(buf)
}

/// The block devices were sized for admission before they were opened:
/// refuse to run if they have grown since (the guest would get more disk
/// than was admitted).
fn check_block_growth(admitted_mb: u64, blocks: &[BlockDevice]) -> Result<(), LaunchError> {
    let bytes = blocks
        .iter()
        .fold(0u64, |sum, b| sum.saturating_add(b.backend.capacity()));
    let now_mb = bytes.div_ceil(1 << 20);
    if now_mb > admitted_mb {
        return Err(LaunchError::Devices(format!(
            "the block devices grew while tt-host started: {admitted_mb} MB admitted, \
             {now_mb} MB now"
        )));
    }
    Ok(())
}

/// Check that the command line's devices and the manifest agree exactly.
pub fn match_devices(image: &Image, args: &RunArgs) -> Result<(), LaunchError> {
    let given = |kind: DeviceKind, name: &str| match kind {
        DeviceKind::Block => args.blocks.iter().any(|(n, _)| n == name),
        DeviceKind::Net => args.nets.iter().any(|(n, _)| n == name),
    };
    for e in &image.manifest.entries {
        if !given(e.kind, &e.name) {
            let opt = match e.kind {
                DeviceKind::Block => format!("--block:{}=PATH", e.name),
                DeviceKind::Net => format!("--net:{}=TAP", e.name),
            };
            return Err(LaunchError::Devices(format!(
                "the image's manifest declares {} device '{}', which was not given ({opt})",
                e.kind.as_str(),
                e.name
            )));
        }
    }
    let declared = |kind: DeviceKind, name: &str| {
        image
            .manifest
            .entries
            .iter()
            .any(|e| e.kind == kind && e.name == name)
    };
    let unknown = args
        .blocks
        .iter()
        .map(|(n, _)| (DeviceKind::Block, n))
        .chain(args.nets.iter().map(|(n, _)| (DeviceKind::Net, n)))
        .chain(
            args.sector_sizes
                .iter()
                .map(|(n, _)| (DeviceKind::Block, n)),
        )
        .chain(args.macs.iter().map(|(n, _)| (DeviceKind::Net, n)))
        .find(|(k, n)| !declared(*k, n));
    if let Some((kind, name)) = unknown {
        return Err(LaunchError::Devices(format!(
            "{} device '{name}' is not declared in the image's manifest",
            kind.as_str()
        )));
    }
    Ok(())
}

/// Boot the image described by `args` and run it to the end.
pub fn run(args: &RunArgs) -> Result<i32, LaunchError> {
    // From here on SIGINT and SIGTERM stop the launch cleanly: before the
    // guest runs, it does not start; while it runs, it is stopped as on a
    // halt (vmm::signal).
    crate::vmm::signal::install().map_err(|err| {
        LaunchError::Devices(format!("cannot install the SIGINT/SIGTERM handler: {err}"))
    })?;
    let path = args.image.display().to_string();
    let file = read_image(&args.image).map_err(|err| LaunchError::ReadImage {
        path: path.clone(),
        err,
    })?;
    let mem_size = (args.mem_mb << 20) / layout::HUGE * layout::HUGE;
    let image =
        loader::parse_image(&file, mem_size).map_err(|err| LaunchError::Image { path, err })?;
    match_devices(&image, args)?;

    // Admission, before any device is attached or the VM is created; the
    // reservation is released when `_admitted` drops, as run returns.
    let uk = unikernel_resources(args)?;
    let admitted_block_mb = uk.block_mb;
    if let Some(cpu) = args.cpu {
        admission::pin_to_cpu(cpu)?;
    }
    let fallback = args
        .image
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let _admitted =
        StateDir::resolve(args.state_dir.as_deref()).admit(args.name.as_ref(), &fallback, uk)?;

    let mut blocks = Vec::new();
    for (name, p) in &args.blocks {
        let size = args
            .sector_sizes
            .iter()
            .find(|(n, _)| n == name)
            .map_or(512, |(_, s)| *s);
        let handle = image.manifest.handle_of(name).expect("matched above");
        blocks.push(BlockDevice::open_file(name, handle, p, size)?);
    }
    check_block_growth(admitted_block_mb, &blocks)?;
    let mut nets = Vec::new();
    for (name, tap) in &args.nets {
        let mac = match args.macs.iter().find(|(n, _)| n == name) {
            Some((_, m)) => net::parse_mac(m).map_err(|why| NetError::BadMac {
                name: name.clone(),
                mac: m.clone(),
                why,
            })?,
            None => net::random_mac(),
        };
        let handle = image.manifest.handle_of(name).expect("matched above");
        let dev = NetDevice::attach(name, handle, tap, mac)?;
        if nets.iter().any(|n: &NetDevice| n.tap_name == dev.tap_name) {
            return Err(NetError::SameTapTwice {
                name: name.clone(),
                tap: dev.tap_name,
            }
            .into());
        }
        nets.push(dev);
    }

    let manifest = image.manifest.to_guest_bytes(|handle, _| {
        if let Some(b) = blocks.iter().find(|b| b.handle == handle) {
            DeviceInfo::Block {
                capacity: b.backend.capacity(),
                block_size: b.block_size as u16,
            }
        } else {
            let n = nets
                .iter()
                .find(|n| n.handle == handle)
                .expect("every device attached");
            DeviceInfo::Net {
                mac: n.mac,
                mtu: n.mtu,
            }
        }
    });
    let cmdline = args.guest_args.join(" ");
    let params = BootParams {
        image: &image,
        file: &file,
        mem_size,
        cmdline: &cmdline,
        manifest: &manifest,
        solo5_hvt_boot: args.solo5_hvt_boot,
    };
    let modules: Vec<Box<dyn Module>> = vec![
        Box::new(Console::new(std::io::stdout())),
        Box::new(Block::new(blocks)),
        Box::new(Net::new(nets)),
    ];
    let mut vm = Vm::new(&params, modules)?;
    Ok(vm.run()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::modules::block::BlockBackend;

    struct Sized(u64);

    impl BlockBackend for Sized {
        fn capacity(&self) -> u64 {
            self.0
        }
        fn read_at(&mut self, _: &mut [u8], _: u64) -> std::io::Result<()> {
            Ok(())
        }
        fn write_at(&mut self, _: &[u8], _: u64) -> std::io::Result<()> {
            Ok(())
        }
        fn sync(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn block_devices_that_grew_after_admission_are_refused() {
        let dev = |name: &str, bytes| BlockDevice {
            name: name.into(),
            handle: 1,
            block_size: 512,
            backend: Box::new(Sized(bytes)),
        };
        // 1.5 MiB + 1 MiB: admitted as their sum rounded up, 3 MB, as
        // unikernel_resources computes it.
        let blocks = [dev("a", 3 << 19), dev("b", 1 << 20)];
        assert!(check_block_growth(3, &blocks).is_ok());
        let e = check_block_growth(2, &blocks).unwrap_err();
        assert!(e.to_string().contains("2 MB admitted, 3 MB now"), "{e}");
        assert!(check_block_growth(0, &[]).is_ok());
    }
}
