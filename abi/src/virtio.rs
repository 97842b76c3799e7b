//! virtio over MMIO as tt-host's devices and tt-guest's driver speak it:
//! the virtio-mmio (version 2) register offsets, device status and
//! feature bits (virtio 1.x, sections 2.1, 4.2.2 and 6), and virtio-blk's
//! request types, status codes and configuration layout (section 5.2).
//! Facts of the specification, written once for both sides.

/// virtio-mmio registers: byte offsets in a device's register window.
pub mod mmio {
    /// `MagicValue`: reads [`MAGIC`].
    pub const MAGIC_VALUE: u64 = 0x000;
    /// `Version`: reads [`VERSION_2`].
    pub const VERSION: u64 = 0x004;
    /// `DeviceID`: 2 for a block device, 0 for an empty slot.
    pub const DEVICE_ID: u64 = 0x008;
    /// `VendorID`.
    pub const VENDOR: u64 = 0x00c;
    /// `DeviceFeatures`: 32 bits, selected by `DeviceFeaturesSel`.
    pub const DEVICE_FEATURES: u64 = 0x010;
    /// `DEVICE_FEATURES_SEL` (see the module doc).
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    /// `DriverFeatures`: 32 bits, selected by `DriverFeaturesSel`.
    pub const DRIVER_FEATURES: u64 = 0x020;
    /// `DRIVER_FEATURES_SEL` (see the module doc).
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    /// `QUEUE_SEL` (see the module doc).
    pub const QUEUE_SEL: u64 = 0x030;
    /// `QueueNumMax`: the largest queue size the device accepts.
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    /// `QueueNum`: the size the driver chose.
    pub const QUEUE_NUM: u64 = 0x038;
    /// `QUEUE_READY` (see the module doc).
    pub const QUEUE_READY: u64 = 0x044;
    /// `QueueNotify`: the driver writes the queue index to kick it.
    pub const QUEUE_NOTIFY: u64 = 0x050;
    /// `INTERRUPT_STATUS` (see the module doc).
    pub const INTERRUPT_STATUS: u64 = 0x060;
    /// `INTERRUPT_ACK` (see the module doc).
    pub const INTERRUPT_ACK: u64 = 0x064;
    /// `Status`: the [`super::status`] bits; writing 0 resets the device.
    pub const STATUS: u64 = 0x070;
    /// The descriptor table's address, low and high halves.
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    /// `QUEUE_DESC_HIGH` (see the module doc).
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    /// The driver (available) ring's address.
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    /// `QUEUE_DRIVER_HIGH` (see the module doc).
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    /// The device (used) ring's address.
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    /// `QUEUE_DEVICE_HIGH` (see the module doc).
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    /// Shared memory regions (none here).
    pub const SHM_SEL: u64 = 0x0ac;
    /// `SHM_LEN_LOW` (see the module doc).
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    /// `SHM_LEN_HIGH` (see the module doc).
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    /// `SHM_BASE_LOW` (see the module doc).
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    /// `SHM_BASE_HIGH` (see the module doc).
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    /// `ConfigGeneration`: changes whenever the configuration changes.
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    /// Start of the device-specific configuration space.
    pub const CONFIG: u64 = 0x100;

    /// "virt", little-endian.
    pub const MAGIC: u32 = 0x7472_6976;
    /// virtio-mmio without legacy.
    pub const VERSION_2: u32 = 2;
}

/// Device status bits (section 2.1).
pub mod status {
    /// `ACKNOWLEDGE` (see the module doc).
    pub const ACKNOWLEDGE: u32 = 1;
    /// `DRIVER` (see the module doc).
    pub const DRIVER: u32 = 2;
    /// `DRIVER_OK` (see the module doc).
    pub const DRIVER_OK: u32 = 4;
    /// `FEATURES_OK` (see the module doc).
    pub const FEATURES_OK: u32 = 8;
    /// `DEVICE_NEEDS_RESET` (see the module doc).
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    /// `FAILED` (see the module doc).
    pub const FAILED: u32 = 128;
}

/// Feature bit numbers (sections 5.2.3 and 6).
pub mod feature {
    /// virtio-blk: `seg_max` in the configuration is valid.
    pub const BLK_F_SEG_MAX: u32 = 2;
    /// virtio-blk: the device is read-only.
    pub const BLK_F_RO: u32 = 5;
    /// virtio-blk: `blk_size` in the configuration is valid.
    pub const BLK_F_BLK_SIZE: u32 = 6;
    /// virtio-blk: FLUSH requests are served.
    pub const BLK_F_FLUSH: u32 = 9;
    /// `used_event` / `avail_event` notification suppression.
    pub const RING_F_EVENT_IDX: u32 = 29;
    /// A virtio 1.x device (not legacy).
    pub const F_VERSION_1: u32 = 32;
}

/// virtio-blk (section 5.2).
pub mod blk {
    /// Its virtio device ID.
    pub const DEVICE_ID: u32 = 2;
    /// Request types.
    pub const T_IN: u32 = 0;
    /// `T_OUT` (see the module doc).
    pub const T_OUT: u32 = 1;
    /// `T_FLUSH` (see the module doc).
    pub const T_FLUSH: u32 = 4;
    /// `T_GET_ID` (see the module doc).
    pub const T_GET_ID: u32 = 8;
    /// Status codes.
    pub const S_OK: u8 = 0;
    /// `S_IOERR` (see the module doc).
    pub const S_IOERR: u8 = 1;
    /// `S_UNSUPP` (see the module doc).
    pub const S_UNSUPP: u8 = 2;
    /// Requests count in 512-byte sectors, whatever the block size.
    pub const SECTOR: u64 = 512;
    /// Bytes of a GET_ID answer.
    pub const ID_LEN: usize = 20;
    /// `struct virtio_blk_config` field offsets in the configuration
    /// space: `le64 capacity` (sectors), `le32 seg_max`, `le32 blk_size`.
    pub const CONFIG_CAPACITY: u64 = 0;
    /// `CONFIG_SEG_MAX` (see the module doc).
    pub const CONFIG_SEG_MAX: u64 = 12;
    /// `CONFIG_BLK_SIZE` (see the module doc).
    pub const CONFIG_BLK_SIZE: u64 = 20;
}
