//! Block devices (`BLOCK_BASIC` manifest entries).
//!
//! ```ignore
//! tt_guest::main!(app_main, devices: [block "storage"]);
//! let disk = Block::acquire("storage")?;
//! let mut buf = [0u8; 512];
//! disk.read(0, &mut buf)?;
//! ```
//!
//! Requests are passed to the host unchanged; the host validates them.
//! Portable guests (that must also run under solo5-hvt) should transfer
//! exactly one block per call, at an offset that is a multiple of the block
//! size and within the capacity; anything else may be refused with
//! [`BlockError::Invalid`].

use crate::hypercall::{self, RET_AGAIN, RET_EINVAL, RET_EUNSPEC, RET_OK};
pub use crate::manifest::AcquireError;
use crate::manifest::{self, MFT_DEV_BLOCK_BASIC};

/// Why a block request failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockError {
    /// The host asked to retry (not used by current hosts for block I/O).
    Again,
    /// The host refused the request: offset not block-aligned, range past
    /// the end of the device, or a length that is zero or not what the
    /// host accepts (a multiple of — with solo5-hvt exactly — the block
    /// size). Nothing was transferred.
    Invalid,
    /// The host failed to perform the I/O (e.g. a backend error). The
    /// device content in the range is unknown for writes.
    Unspecified,
    /// The host returned a status this SDK does not know.
    Unknown(i32),
    /// A read returned fewer bytes than requested.
    Short(u64),
}

impl core::fmt::Display for BlockError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            BlockError::Again => f.write_str("try again"),
            BlockError::Invalid => f.write_str("invalid request"),
            BlockError::Unspecified => f.write_str("host I/O error"),
            BlockError::Unknown(r) => write!(f, "unknown host status {r}"),
            BlockError::Short(n) => write!(f, "short read of {n} bytes"),
        }
    }
}

fn check(ret: i32) -> Result<(), BlockError> {
    match ret {
        RET_OK => Ok(()),
        RET_AGAIN => Err(BlockError::Again),
        RET_EINVAL => Err(BlockError::Invalid),
        RET_EUNSPEC => Err(BlockError::Unspecified),
        r => Err(BlockError::Unknown(r)),
    }
}

/// An attached block device.
#[derive(Clone, Debug)]
pub struct Block {
    handle: u64,
    capacity: u64,
    block_size: u64,
}

impl Block {
    /// Look up the block device `name` in the host-filled manifest.
    ///
    /// Fails with [`AcquireError::NotFound`] if the guest did not declare
    /// it (`main!(.., devices: [block "name"])`), `WrongType` if it is a
    /// network device, `NotAttached` if the host gave it no backend.
    pub fn acquire(name: &str) -> Result<Block, AcquireError> {
        let (handle, e) = manifest::find(name, MFT_DEV_BLOCK_BASIC)?;
        Ok(Block {
            handle,
            capacity: e.block_capacity(),
            block_size: e.block_size() as u64,
        })
    }

    /// The handle (manifest index) used in hypercalls.
    pub fn handle(&self) -> u64 {
        self.handle
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Block size in bytes (the unit of I/O).
    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    /// Number of whole blocks.
    pub fn blocks(&self) -> u64 {
        if self.block_size == 0 {
            0
        } else {
            self.capacity / self.block_size
        }
    }

    /// Write `data` at byte `offset`. `Ok` means the host accepted and
    /// performed the write (tt-host: it is durable); see [`BlockError`].
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), BlockError> {
        check(hypercall::block_write(self.handle, offset, data))
    }

    /// Fill `buf` from byte `offset`. `Ok` means all of `buf` was read.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        let (ret, n) = hypercall::block_read(self.handle, offset, buf);
        check(ret)?;
        if n < buf.len() as u64 {
            return Err(BlockError::Short(n));
        }
        Ok(())
    }
}
