//! One launch: image + command line -> attached devices -> VM -> exit status.

use crate::cli::RunArgs;
use crate::loader::{self, manifest::DeviceInfo, DeviceKind, Image};
use crate::modules::block::{Block, BlockDevice, BlockError};
use crate::modules::console::Console;
use crate::modules::net::{self, Net, NetDevice, NetError};
use crate::modules::Module;
use crate::vmm::{layout, BootParams, Vm, VmError};

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
    let path = args.image.display().to_string();
    let file = std::fs::read(&args.image).map_err(|err| LaunchError::ReadImage {
        path: path.clone(),
        err,
    })?;
    let mem_size = (args.mem_mb << 20) / layout::HUGE * layout::HUGE;
    let image =
        loader::parse_image(&file, mem_size).map_err(|err| LaunchError::Image { path, err })?;
    match_devices(&image, args)?;

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
    let mut nets = Vec::new();
    for (name, tap) in &args.nets {
        let mac = match args.macs.iter().find(|(n, _)| n == name) {
            Some((_, m)) => net::parse_mac(m).ok_or_else(|| NetError::BadMac {
                name: name.clone(),
                mac: m.clone(),
            })?,
            None => net::random_mac(),
        };
        let handle = image.manifest.handle_of(name).expect("matched above");
        nets.push(NetDevice::open_tap(name, handle, tap, mac)?);
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
                mtu: crate::abi::NET_MTU,
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
