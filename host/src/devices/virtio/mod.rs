//! virtio devices on the virtio-mmio (version 2) transport.
//!
//! # Model
//!
//! A device is one register window of [`mmio::REGS_SIZE`] bytes in the
//! guest's MMIO window ([`mmio`]: the transport, virtio 1.x section
//! 4.2.2) and one split virtqueue in guest memory, handled with rust-vmm's
//! `virtio-queue`. The only device kind is virtio-blk ([`blk`], section
//! 5.2), served by the block layer ([`crate::block`]).
//!
//! There are no interrupts: the guest polls the used ring, and sleeps in
//! the POLL hypercall when idle; the device's *ready* eventfd
//! ([`blk::VirtioBlk::ready_event`]) becomes readable when it publishes
//! used entries the guest asked to hear about (`VIRTIO_RING_F_EVENT_IDX`'s
//! `used_event`, or always without it), and POLL reports it.
//!
//! Work happens on a device thread ([`blk::Worker`]) that waits for the
//! queue's notify eventfd (KVM_IOEVENTFD) and the backend's completion
//! eventfd, so the vCPU keeps running while requests are served. A
//! QueueNotify that arrives as an ordinary MMIO write (no ioeventfd) is
//! served on the vCPU thread itself.
//!
//! Everything in guest memory is untrusted. A request that is malformed
//! but still has a writable status byte is answered `VIRTIO_BLK_S_IOERR`
//! (or `_UNSUPP`); a driver that breaks the device's contract (bad queue
//! addresses, features it was not offered, a chain without a status byte)
//! gets `DEVICE_NEEDS_RESET` and nothing more is served until it resets.

pub mod blk;
pub mod mmio;
pub mod request;

pub mod kind;

pub use crate::vmm::bus::MmioDevice;

/// Feature bits and device status bits, as tt-hvt-abi defines them for
/// both sides.
pub use tt_hvt_abi::virtio::{feature as features, status};

/// A guest-physical range `[start, start + len)` the device must not
/// touch: request buffers and queue rings that overlap one are refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forbidden {
    pub start: u64,
    pub len: u64,
}

impl Forbidden {
    /// Does `[addr, addr + len)` overlap this range? (`addr + len` is
    /// computed without overflow: a range past 2^64 overlaps everything
    /// above `addr`.)
    pub fn overlaps(&self, addr: u64, len: u64) -> bool {
        if len == 0 || self.len == 0 {
            return false;
        }
        let end = addr.saturating_add(len);
        let f_end = self.start.saturating_add(self.len);
        addr < f_end && self.start < end
    }
}

/// Is `[addr, addr + len)` inside guest RAM, without overflow, and clear
/// of every forbidden range?
pub(crate) fn range_ok(
    mem: &vm_memory::GuestMemoryMmap,
    forbidden: &[Forbidden],
    addr: u64,
    len: u64,
) -> bool {
    use vm_memory::{GuestAddress, GuestMemory};
    if addr.checked_add(len).is_none() {
        return false;
    }
    let Ok(n) = usize::try_from(len) else {
        return false;
    };
    if len > 0 && !mem.check_range(GuestAddress(addr), n, vm_memory::Permissions::ReadWrite) {
        return false;
    }
    !forbidden.iter().any(|f| f.overlaps(addr, len))
}

#[cfg(test)]
mod tests;
