//! The virtio-blk device kind: a manifest entry of type
//! [`MFT_TT_VIRTIO_BLK`](crate::abi::MFT_TT_VIRTIO_BLK), given with the
//! same `--block:NAME=PATH` (and `--block-sector-size`,
//! `--block-durability`, `--block-journal`) as an hvt block device: the
//! manifest says which transport the guest wants, the command line only
//! which disk. Each device gets a register window in the MMIO window above
//! RAM (its address goes into the manifest entry), a thread that serves its
//! queue, and a place in POLL's ready set.

use super::blk::{VirtioBlk, Watch, Worker};
use super::Forbidden;
use crate::abi::{self, Hypercall};
use crate::loader::manifest::DeviceInfo;
use crate::modules::block::{BlockKind, KIND as BLOCK};
use crate::modules::kind::{Attached, Context, DeviceError, DeviceKind, Given, OptionSpec};
use crate::modules::poll::Readiness;
use crate::modules::{Action, GuestError, GuestMem, Module};
use crate::resources::Unikernel;
use crate::vmm::bus::{MmioDevice, MmioRegion};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use vmm_sys_util::eventfd::EventFd;

/// Entries of the queue each device offers: room for 64 requests of 3
/// descriptors (header, data, status) in flight.
pub const QUEUE_MAX: u16 = 256;

/// QueueNotify's offset in the virtio-mmio register window.
const QUEUE_NOTIFY: u64 = 0x50;

/// The virtio-blk device kind.
pub struct VirtioBlkKind;

/// The virtio-blk device kind, as registered in
/// [`crate::modules::kind::kinds`].
pub static KIND: VirtioBlkKind = VirtioBlkKind;

/// What a device must never read or write in guest memory: what the host
/// may not write for the guest ([`crate::loader::Image::protected_ranges`]:
/// everything below the image, its code, read-only data and
/// supervisor-only structures).
pub fn forbidden_ranges(image: &crate::loader::Image) -> Vec<Forbidden> {
    image
        .protected_ranges()
        .iter()
        .map(|p| Forbidden {
            start: p.start,
            len: p.end - p.start,
        })
        .collect()
}

impl DeviceKind for VirtioBlkKind {
    fn name(&self) -> &'static str {
        "virtio-blk"
    }

    fn mft_type(&self) -> u32 {
        abi::MFT_TT_VIRTIO_BLK
    }

    fn options(&self) -> &'static [OptionSpec] {
        &[]
    }

    fn given_by(&self) -> &'static OptionSpec {
        &BLOCK.options()[0]
    }

    fn shares(&self) -> &'static [&'static str] {
        &[
            "block",
            "block-sector-size",
            "block-durability",
            "block-journal",
        ]
    }

    fn resources(&self, devices: &[Given], uk: &mut Unikernel) -> Result<(), DeviceError> {
        BLOCK.resources(devices, uk)
    }

    fn attach(&self, devices: &[Given], ctx: &Context) -> Result<Attached, DeviceError> {
        let forbidden = forbidden_ranges(ctx.image);
        let mut info = Vec::new();
        let mut mmio = Vec::new();
        let mut readiness: Vec<Box<dyn Readiness>> = Vec::new();
        let mut workers = Vec::new();
        for (i, d) in devices.iter().enumerate() {
            let backend = BlockKind::open(d, ctx)?;
            let dev = VirtioBlk::new(backend, QUEUE_MAX, forbidden.clone())?;
            let notify = dev.notify_event().try_clone()?;
            let ready = dev.ready_event().try_clone()?;
            let watch = dev.watch();
            let dev = Arc::new(Mutex::new(dev));
            let slot = (ctx.mmio_slots_used + i) as u64;
            let base = abi::VIRTIO_MMIO_BASE + slot * abi::VIRTIO_MMIO_SIZE;
            workers.push(Worker::spawn(dev.clone())?);
            readiness.push(Box::new(Ready {
                handle: d.handle,
                event: ready,
                watch,
            }));
            mmio.push(MmioRegion {
                base,
                len: abi::VIRTIO_MMIO_SIZE,
                device: dev as Arc<Mutex<dyn MmioDevice>>,
                notify: vec![(base + QUEUE_NOTIFY, 0, notify)],
            });
            info.push((
                d.handle,
                DeviceInfo::Virtio {
                    mmio_base: base,
                    mmio_size: abi::VIRTIO_MMIO_SIZE as u32,
                    queue_max: QUEUE_MAX,
                },
            ));
        }
        Ok(Attached {
            info,
            module: Box::new(Devices { workers }),
            readiness,
            mmio,
        })
    }
}

/// A virtio-blk device as POLL waits on it: ready when the device
/// published used entries the guest has not seen, or needs a reset.
struct Ready {
    handle: u64,
    event: EventFd,
    /// Read without the device's lock, which its worker holds while it
    /// serves a batch.
    watch: Arc<Watch>,
}

impl Readiness for Ready {
    fn handle(&self) -> u64 {
        self.handle
    }

    fn fd(&self) -> RawFd {
        self.event.as_raw_fd()
    }

    fn ready(&mut self, woken: bool) -> bool {
        if woken {
            // Clear it: the device signals again with its next entries.
            let _ = self.event.read();
        }
        self.watch.unseen().unwrap_or(woken)
    }
}

/// The virtio-blk devices' part in the run: no hypercalls; at the end,
/// stop each device's thread and drain its backend.
struct Devices {
    workers: Vec<Worker>,
}

impl Module for Devices {
    fn name(&self) -> &'static str {
        "virtio-blk"
    }

    fn hypercalls(&self) -> &'static [Hypercall] {
        &[]
    }

    fn handle(&mut self, _: Hypercall, _: u64, _: &GuestMem) -> Result<Action, GuestError> {
        Ok(Action::Continue)
    }

    fn shutdown(&mut self) -> Result<(), String> {
        let failed: Vec<String> = self
            .workers
            .drain(..)
            .filter_map(|w| {
                w.shutdown()
                    .err()
                    .map(|e| format!("{e}: what the guest wrote may not be on its image"))
            })
            .collect();
        if failed.is_empty() {
            Ok(())
        } else {
            Err(failed.join("; "))
        }
    }
}
