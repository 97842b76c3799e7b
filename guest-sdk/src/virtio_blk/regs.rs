//! The virtio-mmio (version 2) register file and how the driver reaches it.
//!
//! [`Transport`] is the seam: the driver does every register access, and
//! its idle wait, through it. [`Mmio`] is the real thing (volatile 32-bit
//! accesses to the device's window, the POLL hypercall); the unit tests
//! plug in a device model instead.

// The register offsets, status bits and the virtio-blk configuration
// layout are tt-hvt-abi's, shared with tt-host's device.
/// virtio device ID of a block device.
pub use tt_hvt_abi::virtio::blk::DEVICE_ID as DEVICE_ID_BLOCK;
pub use tt_hvt_abi::virtio::mmio::*;
pub use tt_hvt_abi::virtio::status;

/// Offsets of `struct virtio_blk_config` fields inside [`CONFIG`].
pub mod blk_config {
    pub use tt_hvt_abi::virtio::blk::{
        CONFIG_BLK_SIZE as BLK_SIZE, CONFIG_CAPACITY as CAPACITY, CONFIG_SEG_MAX as SEG_MAX,
    };
    /// Bytes of the config the driver reads.
    pub const LEN: u64 = 24;
}

/// How the driver reaches its device: 32-bit register accesses, a clock
/// and an idle wait.
pub trait Transport {
    /// A 32-bit read of the register at byte `offset` of the window.
    fn read32(&mut self, offset: u64) -> u32;
    /// A 32-bit write of `value` to the register at byte `offset`.
    fn write32(&mut self, offset: u64, value: u32);
    /// Nothing to do until the device completes something: block for at
    /// most `timeout_ns` (returning early when the device has news is
    /// allowed, and so is returning at once).
    fn idle(&mut self, timeout_ns: u64);
    /// A monotonic clock in nanoseconds.
    fn now_ns(&mut self) -> u64;
}

/// A device's virtio-mmio window in the guest's address space (the host
/// maps it identity, read-write, user-accessible, so this works at CPL 3).
#[derive(Debug)]
pub struct Mmio {
    base: *mut u32,
}

impl Mmio {
    /// The window at guest-physical (= virtual) address `base`.
    ///
    /// # Safety
    ///
    /// `base` must be the 4-byte aligned start of a mapped virtio-mmio
    /// register window of at least `0x100 + 24` bytes that nothing else in
    /// the guest uses (the host-filled, attached manifest entry's
    /// `mmio_base`).
    pub unsafe fn new(base: u64) -> Mmio {
        Mmio {
            base: base as usize as *mut u32,
        }
    }
}

impl Transport for Mmio {
    fn read32(&mut self, offset: u64) -> u32 {
        // SAFETY: `new`'s contract: the window is mapped and ours; the
        // driver passes only aligned register offsets inside it.
        unsafe { self.base.add(offset as usize / 4).read_volatile() }
    }

    fn write32(&mut self, offset: u64, value: u32) {
        // SAFETY: as in `read32`.
        unsafe { self.base.add(offset as usize / 4).write_volatile(value) }
    }

    fn idle(&mut self, timeout_ns: u64) {
        // The host marks the device's handle ready in POLL while the used
        // ring has entries the driver has not seen; other devices may wake
        // us too, which the caller handles by looking again.
        let _ = crate::hypercall::poll(timeout_ns);
    }

    fn now_ns(&mut self) -> u64 {
        crate::time::monotonic_ns()
    }
}
