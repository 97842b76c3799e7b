//! The virtio-mmio (version 2) register file and how the driver reaches it.
//!
//! [`Transport`] is the seam: the driver does every register access, and
//! its idle wait, through it. [`Mmio`] is the real thing (volatile 32-bit
//! accesses to the device's window, the POLL hypercall); the unit tests
//! plug in a device model instead.

/// `MagicValue`: "virt" in little-endian.
pub const MAGIC_VALUE: u32 = 0x000;
/// `Version`: 2 for virtio-mmio without legacy.
pub const VERSION: u32 = 0x004;
/// `DeviceID`: 2 for a block device, 0 for an empty slot.
pub const DEVICE_ID: u32 = 0x008;
/// `DeviceFeatures`: 32 feature bits, selected by `DeviceFeaturesSel`.
pub const DEVICE_FEATURES: u32 = 0x010;
/// `DeviceFeaturesSel`.
pub const DEVICE_FEATURES_SEL: u32 = 0x014;
/// `DriverFeatures`: 32 feature bits, selected by `DriverFeaturesSel`.
pub const DRIVER_FEATURES: u32 = 0x020;
/// `DriverFeaturesSel`.
pub const DRIVER_FEATURES_SEL: u32 = 0x024;
/// `QueueSel`.
pub const QUEUE_SEL: u32 = 0x030;
/// `QueueNumMax`: the largest queue size the device accepts (0: no queue).
pub const QUEUE_NUM_MAX: u32 = 0x034;
/// `QueueNum`: the queue size the driver chose.
pub const QUEUE_NUM: u32 = 0x038;
/// `QueueReady`.
pub const QUEUE_READY: u32 = 0x044;
/// `QueueNotify`: write the queue index to kick the device.
pub const QUEUE_NOTIFY: u32 = 0x050;
/// `Status`: the device status bits ([`status`]); writing 0 resets.
pub const STATUS: u32 = 0x070;
/// `QueueDescLow` / `High`: the descriptor table's address.
pub const QUEUE_DESC_LOW: u32 = 0x080;
/// See [`QUEUE_DESC_LOW`].
pub const QUEUE_DESC_HIGH: u32 = 0x084;
/// `QueueDriverLow` / `High`: the available ring's address.
pub const QUEUE_DRIVER_LOW: u32 = 0x090;
/// See [`QUEUE_DRIVER_LOW`].
pub const QUEUE_DRIVER_HIGH: u32 = 0x094;
/// `QueueDeviceLow` / `High`: the used ring's address.
pub const QUEUE_DEVICE_LOW: u32 = 0x0a0;
/// See [`QUEUE_DEVICE_LOW`].
pub const QUEUE_DEVICE_HIGH: u32 = 0x0a4;
/// `ConfigGeneration`: changes whenever the config space changes.
pub const CONFIG_GENERATION: u32 = 0x0fc;
/// Start of the device-specific configuration space.
pub const CONFIG: u32 = 0x100;

/// "virt".
pub const MAGIC: u32 = 0x7472_6976;
/// virtio device ID of a block device.
pub const DEVICE_ID_BLOCK: u32 = 2;

/// Offsets of `struct virtio_blk_config` fields inside [`CONFIG`].
pub mod blk_config {
    /// `le64 capacity`, in 512-byte sectors.
    pub const CAPACITY: u32 = 0;
    /// `le32 seg_max` (with `VIRTIO_BLK_F_SEG_MAX`).
    pub const SEG_MAX: u32 = 12;
    /// `le32 blk_size` (with `VIRTIO_BLK_F_BLK_SIZE`).
    pub const BLK_SIZE: u32 = 20;
    /// Bytes of the config the driver reads.
    pub const LEN: u32 = 24;
}

/// Device status bits.
pub mod status {
    /// The guest has noticed the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest knows how to drive it.
    pub const DRIVER: u32 = 2;
    /// The driver is set up and ready to drive the device.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device has hit an error it cannot recover from without reset.
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 128;
}

/// How the driver reaches its device: 32-bit register accesses, a clock
/// and an idle wait.
pub trait Transport {
    /// A 32-bit read of the register at byte `offset` of the window.
    fn read32(&mut self, offset: u32) -> u32;
    /// A 32-bit write of `value` to the register at byte `offset`.
    fn write32(&mut self, offset: u32, value: u32);
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
    fn read32(&mut self, offset: u32) -> u32 {
        // SAFETY: `new`'s contract: the window is mapped and ours; the
        // driver passes only aligned register offsets inside it.
        unsafe { self.base.add(offset as usize / 4).read_volatile() }
    }

    fn write32(&mut self, offset: u32, value: u32) {
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
