//! Block devices (`BLOCK_BASIC` manifest entries).
//!
//! ```ignore
//! tt_guest::main!(app_main, devices: [block "storage"]);
//! let disk = Block::acquire("storage")?;
//! let mut buf = [0u8; 512];
//! disk.read(0, &mut buf)?;
//! ```
//!
//! [`Block::read`] and [`Block::write`] check requests the way Solo5's
//! own bindings do before making the hypercall: the offset must be a
//! multiple of the block size, the length a non-zero multiple of it, and
//! the range must end inside the device; otherwise they return
//! [`BlockError::Invalid`] without an exit. A request may span several
//! blocks (tt-host and solo5-hvt serve that). [`Block::read_raw`] and
//! [`Block::write_raw`] skip the guest-side checks, to test a host.

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
        self.capacity.checked_div(self.block_size).unwrap_or(0)
    }

    /// Is `[offset, offset + len)` a valid request (aligned, non-empty,
    /// whole blocks, inside the device)?
    pub fn valid_request(&self, offset: u64, len: usize) -> bool {
        let bs = self.block_size;
        let len = len as u64;
        bs != 0
            && len != 0
            && offset % bs == 0
            && len % bs == 0
            && offset
                .checked_add(len)
                .is_some_and(|end| end <= self.capacity)
    }

    /// Write `data` at byte `offset`. `Ok` means the host accepted and
    /// performed the write (tt-host: it is durable). `Err(Invalid)` means
    /// the request was malformed (see [`Block::valid_request`]) and
    /// nothing was written; see [`BlockError`] for the rest.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), BlockError> {
        if !self.valid_request(offset, data.len()) {
            return Err(BlockError::Invalid);
        }
        self.write_raw(offset, data)
    }

    /// Fill `buf` from byte `offset`. `Ok` means all of `buf` was read;
    /// errors as for [`Block::write`].
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        if !self.valid_request(offset, buf.len()) {
            return Err(BlockError::Invalid);
        }
        self.read_raw(offset, buf)
    }

    /// [`Block::write`] without the guest-side checks: the host alone
    /// decides (for testing hosts).
    pub fn write_raw(&self, offset: u64, data: &[u8]) -> Result<(), BlockError> {
        check(hypercall::block_write(self.handle, offset, data))
    }

    /// [`Block::read`] without the guest-side checks.
    pub fn read_raw(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        let (ret, n) = hypercall::block_read(self.handle, offset, buf);
        check(ret)?;
        if n < buf.len() as u64 {
            return Err(BlockError::Short(n));
        }
        Ok(())
    }
}
