//! Network devices (`NET_BASIC` manifest entries) and waiting for input.
//!
//! A network device sends and receives whole Ethernet frames. Reading
//! never blocks: it returns [`NetError::Again`] when no frame is queued.
//! To wait, call [`poll`] (or [`yield_until`]), which blocks the vCPU in
//! the host until a device is readable or the timeout expires.

use core::time::Duration;

use crate::hypercall::{self, RET_AGAIN, RET_EINVAL, RET_EUNSPEC, RET_OK};
pub use crate::manifest::AcquireError;
use crate::manifest::{self, MFT_DEV_NET_BASIC};
use crate::time::Instant;

/// Why a network request failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetError {
    /// Read: no frame is available now. Poll and try again.
    Again,
    /// The host refused the request (bad handle, frame larger than the
    /// MTU plus Ethernet header, buffer too small).
    Invalid,
    /// The host failed to send/receive (backend error).
    Unspecified,
    /// The host returned a status this SDK does not know.
    Unknown(i32),
}

impl core::fmt::Display for NetError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            NetError::Again => f.write_str("no frame available"),
            NetError::Invalid => f.write_str("invalid request"),
            NetError::Unspecified => f.write_str("host I/O error"),
            NetError::Unknown(r) => write!(f, "unknown host status {r}"),
        }
    }
}

fn check(ret: i32) -> Result<(), NetError> {
    match ret {
        RET_OK => Ok(()),
        RET_AGAIN => Err(NetError::Again),
        RET_EINVAL => Err(NetError::Invalid),
        RET_EUNSPEC => Err(NetError::Unspecified),
        r => Err(NetError::Unknown(r)),
    }
}

/// An attached network device.
#[derive(Clone, Debug)]
pub struct Net {
    handle: u64,
    mac: [u8; 6],
    mtu: u16,
}

impl Net {
    /// Look up the network device `name` in the host-filled manifest.
    /// Errors as for [`crate::block::Block::acquire`].
    pub fn acquire(name: &str) -> Result<Net, AcquireError> {
        let (handle, e) = manifest::find(name, MFT_DEV_NET_BASIC)?;
        Ok(Net {
            handle,
            mac: e.net_mac(),
            mtu: e.net_mtu(),
        })
    }

    /// The handle (manifest index); bit `handle` of a [`ReadySet`].
    pub fn handle(&self) -> u64 {
        self.handle
    }

    /// The guest's MAC address as assigned by the host.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// MTU (payload bytes, excluding the 14-byte Ethernet header): the
    /// host's, e.g. its TAP interface's (9000 on a jumbo-frame TAP).
    pub fn mtu(&self) -> u16 {
        self.mtu
    }

    /// The longest frame the device sends or receives: MTU + 14 bytes.
    /// A [`Net::read`] buffer must be at least this long, and a
    /// [`Net::write`] frame at most.
    pub fn frame_len(&self) -> usize {
        self.mtu as usize + 14
    }

    /// Send one Ethernet frame. `Ok` means the host queued it.
    pub fn write(&self, frame: &[u8]) -> Result<(), NetError> {
        check(hypercall::net_write(self.handle, frame))
    }

    /// Receive one frame into `buf`; returns its length. `Err(Again)` if
    /// none is queued. `buf` must hold [`Net::frame_len`] bytes
    /// (`Err(Invalid)` under tt-host if it is shorter).
    pub fn read(&self, buf: &mut [u8]) -> Result<usize, NetError> {
        let (ret, n) = hypercall::net_read(self.handle, buf);
        check(ret)?;
        Ok((n as usize).min(buf.len()))
    }
}

/// Set of devices with input ready, one bit per handle.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadySet(pub u64);

impl ReadySet {
    /// No device is ready (the wait timed out).
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Device `handle` has input.
    pub fn contains(self, handle: u64) -> bool {
        handle < 64 && self.0 & (1 << handle) != 0
    }
}

/// Block until a network device has input or `timeout` passes. Returns
/// the ready devices (empty on timeout). With no network devices this is
/// a plain sleep of `timeout`.
pub fn poll(timeout: Duration) -> ReadySet {
    let ns = u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX);
    ReadySet(hypercall::poll(ns).0)
}

/// Block until a network device has input or the monotonic clock reaches
/// `deadline` (the Solo5 `solo5_yield` model). Returns at once, with
/// whatever is ready, if the deadline has passed.
pub fn yield_until(deadline: Instant) -> ReadySet {
    let now = Instant::now();
    ReadySet(hypercall::poll(deadline.as_nanos().saturating_sub(now.as_nanos())).0)
}
