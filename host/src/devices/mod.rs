//! Guest devices reached through the MMIO window (see `docs/ABI.md`):
//! today one kind, virtio-blk over virtio-mmio ([`virtio`]).

pub mod virtio;
