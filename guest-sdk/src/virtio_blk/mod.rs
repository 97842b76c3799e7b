//! virtio-blk over virtio-mmio (version 2): many requests in flight,
//! completions polled, no interrupts.
//!
//! ```ignore
//! tt_guest::main!(app_main, devices: [virtio_blk "disk"]);
//!
//! let mut disk = VirtioBlk::acquire("disk")?;
//! let a = disk.submit_write(0, vec![1u8; 4096])?;
//! let b = disk.submit_read(8, vec![0u8; 4096])?;
//! let mut done = [Completion::EMPTY; 8];
//! while disk.in_flight() > 0 {
//!     for c in &done[..disk.wait(&mut done)?] {
//!         c.result?; // c.token is `a` or `b`; c.buf is the buffer back
//!     }
//! }
//! ```
//!
//! # How a guest gets the device
//!
//! The guest declares `virtio_blk "NAME"` in [`crate::main!`], which emits a
//! manifest entry of type [`MFT_TT_VIRTIO_BLK`] (tt-host's own type).
//! tt-host attaches it (`--block:NAME=IMAGE`), maps the device's
//! virtio-mmio registers in the guest's page tables (identity, user,
//! no-execute) and writes their address into the entry ([`MftVirtio`]).
//! [`VirtioBlk::acquire`] checks the entry is attached before touching the
//! window. solo5-hvt does not know the type and refuses to start such an
//! image ("declared but not attached"), so there is no fallback to the hvt
//! block hypercalls: an image that asks for virtio-blk runs under tt-host
//! only. Declare `block "NAME"` and use [`crate::block`] to run on both.
//!
//! # The model: submit, then reap
//!
//! There is no async runtime. [`VirtioBlk::submit_read`],
//! [`VirtioBlk::submit_write`], [`VirtioBlk::submit_flush`] and
//! [`VirtioBlk::submit_get_id`] put a request on the queue, tell the device
//! (unless it said it does not need telling) and return a [`Token`] at
//! once. [`VirtioBlk::reap`] collects finished requests from the used ring
//! without blocking; [`VirtioBlk::wait`] does the same but, when nothing
//! has finished, blocks in the POLL hypercall until the device has news
//! (the host marks the device's handle ready while the used ring holds
//! entries the driver has not seen; the driver says what it has seen only
//! through `used_event` in the available ring, which it keeps at the last
//! entry reaped, and never writes `InterruptACK`: a wait costs no register
//! access). Requests complete in any order; each
//! [`Completion`] says which token it was and how it went. Writes are not
//! ordered with each other or with reads in flight at the same time.
//! A completed write is as durable as the host's backend makes it
//! (tt-host's default journal: durable); [`VirtioBlk::submit_flush`]
//! completes once every write completed before it is durable.
//!
//! # Who owns the buffers
//!
//! The device reads and writes request buffers after `submit_*` returns,
//! so the driver owns them while they are in flight: a request takes its
//! buffer by value (`Vec<u8>`, from the SDK heap) and its [`Completion`]
//! gives it back, filled for reads. Nothing in the guest can touch a buffer
//! the device is using, no copy is made, and the borrow checker needs no
//! lifetimes. A request the driver refuses gives the buffer back in
//! [`Rejected`]. Dropping a [`VirtioBlk`] resets the device first, then
//! frees the queue and the buffers still in flight (if the device does not
//! acknowledge the reset, they are leaked rather than freed under it).
//!
//! # Queue use
//!
//! A read or write takes three descriptors (header, data, status), a flush
//! two and a get-id three, so at most `queue_size / 2` to `queue_size / 3`
//! requests are in flight; one more is refused with [`Error::QueueFull`]
//! (reap, then submit again). The driver negotiates `VIRTIO_F_VERSION_1`
//! (required) and, when offered, `VIRTIO_BLK_F_FLUSH`, `BLK_SIZE`,
//! `SEG_MAX`, `RO` and `VIRTIO_RING_F_EVENT_IDX`; with EVENT_IDX it kicks
//! the device only when the device asked for it.

mod regs;
mod ring;
#[cfg(test)]
mod tests;

use alloc::vec;
use alloc::vec::Vec;
use core::sync::atomic::{fence, Ordering};

pub use crate::manifest::AcquireError;
use crate::manifest::{self, MftVirtio, MFT_TT_VIRTIO_BLK};
use regs::{blk_config, status as st, *};
pub use regs::{Mmio, Transport};
use ring::{Ring, DESC_F_NEXT, DESC_F_WRITE, USED_F_NO_NOTIFY};

/// Bytes per virtio-blk sector: request offsets and lengths are in these.
pub const SECTOR_SIZE: u64 = tt_hvt_abi::virtio::blk::SECTOR;
/// Bytes of the device ID a GET_ID request returns.
pub const ID_LEN: usize = tt_hvt_abi::virtio::blk::ID_LEN;

/// Feature bits, as masks of tt-hvt-abi's bit numbers.
pub mod feature {
    use tt_hvt_abi::virtio::feature as bit;
    /// `VIRTIO_BLK_F_SEG_MAX`: `seg_max` in the config is valid.
    pub const BLK_SEG_MAX: u64 = 1 << bit::BLK_F_SEG_MAX;
    /// `VIRTIO_BLK_F_RO`: the device is read-only.
    pub const BLK_RO: u64 = 1 << bit::BLK_F_RO;
    /// `VIRTIO_BLK_F_BLK_SIZE`: `blk_size` in the config is valid.
    pub const BLK_SIZE: u64 = 1 << bit::BLK_F_BLK_SIZE;
    /// `VIRTIO_BLK_F_FLUSH`: FLUSH requests are served.
    pub const BLK_FLUSH: u64 = 1 << bit::BLK_F_FLUSH;
    /// `VIRTIO_RING_F_EVENT_IDX`: `used_event` / `avail_event`.
    pub const RING_EVENT_IDX: u64 = 1 << bit::RING_F_EVENT_IDX;
    /// `VIRTIO_F_VERSION_1`: a virtio 1.x device.
    pub const VERSION_1: u64 = 1 << bit::F_VERSION_1;
    /// Everything this driver accepts when offered.
    pub const SUPPORTED: u64 =
        VERSION_1 | BLK_FLUSH | BLK_SIZE | BLK_SEG_MAX | BLK_RO | RING_EVENT_IDX;
}

/// `VIRTIO_BLK_T_*` request types.
mod req {
    pub use tt_hvt_abi::virtio::blk::{
        T_FLUSH as FLUSH, T_GET_ID as GET_ID, T_IN as IN, T_OUT as OUT,
    };
}

/// `VIRTIO_BLK_S_*` status values.
mod blk_status {
    pub use tt_hvt_abi::virtio::blk::{S_IOERR as IOERR, S_OK as OK, S_UNSUPP as UNSUPP};
}

/// Longest single POLL in [`VirtioBlk::wait`]: a wake-up the host misses
/// costs at most this much latency.
const WAIT_SLICE_NS: u64 = 10_000_000;
/// How long a reset may take before the device counts as stuck.
const RESET_TIMEOUT_NS: u64 = 1_000_000_000;

/// What went wrong, in setup or with a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// The manifest has no usable entry: see [`AcquireError`] (declare
    /// `virtio_blk "NAME"` in `main!`, attach it with `--block:NAME=...`).
    Acquire(AcquireError),
    /// The manifest entry's register window is not usable (address 0 or
    /// unaligned, or too small): a host bug.
    BadWindow(MftVirtio),
    /// No virtio-mmio device answers at the window (wrong magic value).
    NotVirtio(u32),
    /// The device speaks a virtio-mmio version other than 2 (1 is legacy).
    UnsupportedVersion(u32),
    /// The device is not a block device (its virtio device ID; 0: none).
    NotBlock(u32),
    /// The device does not offer `VIRTIO_F_VERSION_1` (legacy only).
    NoVersion1,
    /// The device did not accept the features the driver chose
    /// (`FEATURES_OK` did not stick).
    FeaturesRejected(u64),
    /// The device's queue 0 is missing (`QueueNumMax` 0) or already live.
    QueueUnavailable,
    /// The SDK heap could not supply the queue memory.
    OutOfMemory,
    /// The device did not finish a reset in time.
    ResetTimeout,
    /// The device has flagged `DEVICE_NEEDS_RESET` or returned a used
    /// entry for no request in flight: nothing more can be done with it.
    Broken,
    /// A request's length is zero, not a multiple of 512 bytes or larger
    /// than 4 GiB, or it ends past the device's capacity.
    Invalid,
    /// A write to a read-only device (`VIRTIO_BLK_F_RO`).
    ReadOnly,
    /// Every descriptor is in use: reap completions, then try again.
    QueueFull,
    /// [`VirtioBlk::get_id`] with other requests in flight.
    Busy,
    /// The device answered `VIRTIO_BLK_S_IOERR`: for a write, the sectors'
    /// contents are unknown.
    IoError,
    /// The device answered `VIRTIO_BLK_S_UNSUPP`, or a flush was asked of
    /// a device without `VIRTIO_BLK_F_FLUSH`.
    Unsupported,
    /// The device left an unknown status byte (`0xff`: none at all).
    BadStatus(u8),
    /// The device reported success but wrote fewer bytes than the read
    /// asked for (the used entry's length).
    ShortRead(u32),
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Error::Acquire(e) => write!(f, "virtio-blk device: {e}"),
            Error::BadWindow(v) => write!(
                f,
                "virtio-blk register window {:#x} (+{:#x}) is unusable",
                { v.mmio_base },
                { v.mmio_size }
            ),
            Error::NotVirtio(m) => write!(f, "no virtio-mmio device (magic {m:#x})"),
            Error::UnsupportedVersion(v) => write!(f, "virtio-mmio version {v}, need 2"),
            Error::NotBlock(id) => write!(f, "virtio device ID {id} is not a block device (2)"),
            Error::NoVersion1 => f.write_str("device does not offer VIRTIO_F_VERSION_1"),
            Error::FeaturesRejected(x) => write!(f, "device rejected features {x:#x}"),
            Error::QueueUnavailable => f.write_str("device queue 0 is unavailable"),
            Error::OutOfMemory => f.write_str("no heap memory for the virtqueue"),
            Error::ResetTimeout => f.write_str("device did not complete a reset"),
            Error::Broken => f.write_str("device is broken (needs reset)"),
            Error::Invalid => f.write_str(
                "invalid request (length 0, not whole 512-byte sectors, or past the end)",
            ),
            Error::ReadOnly => f.write_str("device is read-only"),
            Error::QueueFull => f.write_str("queue full: reap completions first"),
            Error::Busy => f.write_str("other requests in flight"),
            Error::IoError => f.write_str("device I/O error"),
            Error::Unsupported => f.write_str("request unsupported by the device"),
            Error::BadStatus(s) => write!(f, "unknown request status {s:#x}"),
            Error::ShortRead(n) => write!(f, "device wrote only {n} bytes"),
        }
    }
}

impl From<AcquireError> for Error {
    fn from(e: AcquireError) -> Error {
        Error::Acquire(e)
    }
}

/// A request the driver refused before the device saw it, with its
/// buffer handed back.
#[derive(Debug, PartialEq, Eq)]
pub struct Rejected {
    /// Why ([`Error::QueueFull`], [`Error::Invalid`], ...).
    pub error: Error,
    /// The buffer the request was given.
    pub buf: Vec<u8>,
}

impl From<Rejected> for Error {
    fn from(r: Rejected) -> Error {
        r.error
    }
}

impl core::fmt::Display for Rejected {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        self.error.fmt(f)
    }
}

/// Names one submitted request; unique for the driver's lifetime.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Token(pub u64);

/// The kind of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// `VIRTIO_BLK_T_IN`.
    Read,
    /// `VIRTIO_BLK_T_OUT`.
    Write,
    /// `VIRTIO_BLK_T_FLUSH`.
    Flush,
    /// `VIRTIO_BLK_T_GET_ID`.
    GetId,
}

/// A finished request.
#[derive(Debug, PartialEq, Eq)]
pub struct Completion {
    /// What [`VirtioBlk`]'s `submit_*` returned for it.
    pub token: Token,
    /// Its kind.
    pub op: Op,
    /// Its first sector (0 for flush and get-id).
    pub sector: u64,
    /// `Ok` if the device answered `VIRTIO_BLK_S_OK` (for a read: and
    /// wrote the whole buffer); otherwise [`Error::IoError`],
    /// [`Error::Unsupported`], [`Error::BadStatus`] or [`Error::ShortRead`].
    pub result: Result<(), Error>,
    /// The request's buffer: the data read, the data written, the 20-byte
    /// ID for get-id, empty for flush.
    pub buf: Vec<u8>,
}

impl Completion {
    /// A placeholder to fill a reap array with: `[Completion::EMPTY; 32]`.
    pub const EMPTY: Completion = Completion {
        token: Token(0),
        op: Op::Flush,
        sector: 0,
        result: Ok(()),
        buf: Vec::new(),
    };
}

/// Setup choices.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Largest queue size to use; the driver takes the largest power of
    /// two not above this and the device's `QueueNumMax` (default 256).
    pub queue_size: u16,
}

impl Default for Options {
    fn default() -> Options {
        Options { queue_size: 256 }
    }
}

/// A request the device holds.
struct InFlight {
    token: Token,
    op: Op,
    sector: u64,
    buf: Vec<u8>,
    descs: [u16; 3],
    ndesc: usize,
}

/// A virtio-blk device, set up and running (`DRIVER_OK`).
pub struct VirtioBlk<T: Transport = Mmio> {
    t: T,
    handle: u64,
    features: u64,
    capacity: u64,
    blk_size: u32,
    seg_max: u32,
    ring: Option<Ring>,
    /// Free descriptor indices.
    free: Vec<u16>,
    /// By head descriptor index.
    reqs: Vec<Option<InFlight>>,
    next_token: u64,
    avail_idx: u16,
    last_used: u16,
    in_flight: usize,
    broken: bool,
}

impl VirtioBlk<Mmio> {
    /// Set up the virtio-blk device `name` declared in `main!` with
    /// `virtio_blk "NAME"`, with default [`Options`].
    pub fn acquire(name: &str) -> Result<VirtioBlk<Mmio>, Error> {
        Self::acquire_with(name, Options::default())
    }

    /// [`VirtioBlk::acquire`] with `opts`.
    ///
    /// Fails with [`Error::Acquire`] if the manifest has no such entry,
    /// the entry is of another type, or the host did not attach it (the
    /// register window is then not touched); otherwise with the errors of
    /// [`VirtioBlk::new`].
    pub fn acquire_with(name: &str, opts: Options) -> Result<VirtioBlk<Mmio>, Error> {
        let (handle, v) = window(manifest::entries(), name)?;
        // SAFETY: the entry is attached, so the host mapped a virtio-mmio
        // window of `mmio_size` bytes (checked above) at `mmio_base` for
        // this device, and only this driver instance uses it (acquiring
        // the same device twice would share it: documented on `new`).
        let t = unsafe { Mmio::new(v.mmio_base) };
        VirtioBlk::new(t, handle, opts)
    }
}

/// The handle and register window of the attached virtio-blk entry
/// `name`, checked for plausibility; nothing is touched.
fn window(entries: &[manifest::MftEntry], name: &str) -> Result<(u64, MftVirtio), Error> {
    let (handle, e) = manifest::find_in(entries, name, MFT_TT_VIRTIO_BLK)?;
    let v = e.virtio();
    if !window_ok(&v) {
        return Err(Error::BadWindow(v));
    }
    Ok((handle, v))
}

/// Is the host-filled window plausible: non-zero, page-aligned and large
/// enough for the registers and the config the driver reads?
fn window_ok(v: &MftVirtio) -> bool {
    let base = v.mmio_base;
    let size = v.mmio_size;
    base != 0 && base % 4096 == 0 && u64::from(size) >= CONFIG + blk_config::LEN
}

impl<T: Transport> VirtioBlk<T> {
    /// Initialise the device behind `t` (POLL handle `handle`): reset,
    /// ACKNOWLEDGE, DRIVER, feature negotiation, queue 0, DRIVER_OK.
    /// Acquire a device once: two drivers on one device reset each other.
    pub fn new(mut t: T, handle: u64, opts: Options) -> Result<VirtioBlk<T>, Error> {
        let magic = t.read32(MAGIC_VALUE);
        if magic != MAGIC {
            return Err(Error::NotVirtio(magic));
        }
        let version = t.read32(VERSION);
        if version != 2 {
            return Err(Error::UnsupportedVersion(version));
        }
        let id = t.read32(DEVICE_ID);
        if id != DEVICE_ID_BLOCK {
            return Err(Error::NotBlock(id));
        }
        reset(&mut t)?;
        let mut status = st::ACKNOWLEDGE;
        t.write32(STATUS, status);
        status |= st::DRIVER;
        t.write32(STATUS, status);

        let fail = |t: &mut T, e: Error| {
            t.write32(STATUS, st::FAILED);
            Err(e)
        };
        let mut offered = 0u64;
        for sel in 0..2u32 {
            t.write32(DEVICE_FEATURES_SEL, sel);
            offered |= (t.read32(DEVICE_FEATURES) as u64) << (32 * sel);
        }
        if offered & feature::VERSION_1 == 0 {
            return fail(&mut t, Error::NoVersion1);
        }
        let features = offered & feature::SUPPORTED;
        for sel in 0..2u32 {
            t.write32(DRIVER_FEATURES_SEL, sel);
            t.write32(DRIVER_FEATURES, (features >> (32 * sel)) as u32);
        }
        status |= st::FEATURES_OK;
        t.write32(STATUS, status);
        if t.read32(STATUS) & st::FEATURES_OK == 0 {
            return fail(&mut t, Error::FeaturesRejected(features));
        }

        t.write32(QUEUE_SEL, 0);
        let max = t.read32(QUEUE_NUM_MAX);
        if max == 0 || t.read32(QUEUE_READY) != 0 {
            return fail(&mut t, Error::QueueUnavailable);
        }
        // Split queues have power-of-two sizes of at most 32768.
        let limit = max.min(opts.queue_size.max(1) as u32).min(32768);
        let size = 1u16 << (31 - limit.leading_zeros());
        let Some(ring) = Ring::new(size) else {
            return fail(&mut t, Error::OutOfMemory);
        };
        t.write32(QUEUE_NUM, size as u32);
        for (low, high, addr) in [
            (QUEUE_DESC_LOW, QUEUE_DESC_HIGH, ring.desc_addr()),
            (QUEUE_DRIVER_LOW, QUEUE_DRIVER_HIGH, ring.avail_addr()),
            (QUEUE_DEVICE_LOW, QUEUE_DEVICE_HIGH, ring.used_addr()),
        ] {
            t.write32(low, addr as u32);
            t.write32(high, (addr >> 32) as u32);
        }
        // The ring's zeroes must be visible before the device may look.
        fence(Ordering::SeqCst);
        t.write32(QUEUE_READY, 1);

        let (capacity, blk_size, seg_max) = read_config(&mut t, features);
        status |= st::DRIVER_OK;
        t.write32(STATUS, status);
        if t.read32(STATUS) & (st::DEVICE_NEEDS_RESET | st::FAILED) != 0 {
            // Reset before `ring` is freed: the device may have looked.
            let stuck = reset(&mut t).is_err();
            if stuck {
                core::mem::forget(ring);
            }
            return Err(Error::Broken);
        }
        let mut reqs = Vec::with_capacity(size as usize);
        reqs.resize_with(size as usize, || None);
        Ok(VirtioBlk {
            t,
            handle,
            features,
            capacity,
            blk_size,
            seg_max,
            ring: Some(ring),
            free: (0..size).rev().collect(),
            reqs,
            next_token: 1,
            avail_idx: 0,
            last_used: 0,
            in_flight: 0,
            broken: false,
        })
    }

    /// The POLL handle (manifest index): bit `handle` of the ready set.
    pub fn handle(&self) -> u64 {
        self.handle
    }

    /// The negotiated features ([`feature`]).
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity.saturating_mul(SECTOR_SIZE)
    }

    /// The device's preferred block size in bytes (`blk_size`, or 512
    /// without `VIRTIO_BLK_F_BLK_SIZE`). Requests aligned to it are the
    /// fast ones; the driver only requires whole 512-byte sectors.
    pub fn block_size(&self) -> u32 {
        self.blk_size
    }

    /// The device's `seg_max` (0 if not offered). Every request this
    /// driver sends has one data segment.
    pub fn seg_max(&self) -> u32 {
        self.seg_max
    }

    /// The queue size in descriptors.
    pub fn queue_size(&self) -> u16 {
        self.ring().size()
    }

    /// Is the device read-only (`VIRTIO_BLK_F_RO`)?
    pub fn read_only(&self) -> bool {
        self.features & feature::BLK_RO != 0
    }

    /// Requests submitted and not yet reaped.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// The transport (for tests and diagnostics).
    pub fn transport(&mut self) -> &mut T {
        &mut self.t
    }

    fn ring(&self) -> &Ring {
        // Only `drop` takes the ring out.
        self.ring
            .as_ref()
            .expect("virtio-blk ring present until drop")
    }

    /// Read `buf.len()` bytes (whole sectors) from `sector`. The buffer
    /// comes back, filled, in the request's [`Completion`].
    pub fn submit_read(&mut self, sector: u64, buf: Vec<u8>) -> Result<Token, Rejected> {
        self.submit_data(Op::Read, sector, buf)
    }

    /// Write `buf` (whole sectors) at `sector`. The buffer comes back in
    /// the request's [`Completion`].
    pub fn submit_write(&mut self, sector: u64, buf: Vec<u8>) -> Result<Token, Rejected> {
        if self.read_only() {
            return Err(Rejected {
                error: Error::ReadOnly,
                buf,
            });
        }
        self.submit_data(Op::Write, sector, buf)
    }

    /// Ask the device to make every write completed so far durable; the
    /// completion says when it is. [`Error::Unsupported`] at once if the
    /// device does not offer `VIRTIO_BLK_F_FLUSH`.
    pub fn submit_flush(&mut self) -> Result<Token, Error> {
        if self.features & feature::BLK_FLUSH == 0 {
            return Err(Error::Unsupported);
        }
        self.submit(Op::Flush, req::FLUSH, 0, Vec::new())
            .map_err(|r| r.error)
    }

    /// Ask for the device's ID string: the completion's `buf` holds its
    /// 20 bytes (NUL-padded).
    pub fn submit_get_id(&mut self) -> Result<Token, Error> {
        self.submit(Op::GetId, req::GET_ID, 0, vec![0; ID_LEN])
            .map_err(|r| r.error)
    }

    /// The device's ID string (20 bytes, NUL-padded), waiting for it.
    /// Only with nothing else in flight ([`Error::Busy`]), so no other
    /// completion is consumed here.
    pub fn get_id(&mut self) -> Result<[u8; ID_LEN], Error> {
        if self.in_flight != 0 {
            return Err(Error::Busy);
        }
        self.submit_get_id()?;
        let mut out = [Completion::EMPTY];
        while self.wait(&mut out)? == 0 {}
        let [c] = out;
        c.result?;
        let mut id = [0; ID_LEN];
        id.copy_from_slice(&c.buf[..ID_LEN]);
        Ok(id)
    }

    fn submit_data(&mut self, op: Op, sector: u64, buf: Vec<u8>) -> Result<Token, Rejected> {
        let len = buf.len() as u64;
        let ok = len != 0
            && len % SECTOR_SIZE == 0
            && len <= u32::MAX as u64
            && sector
                .checked_add(len / SECTOR_SIZE)
                .is_some_and(|end| end <= self.capacity);
        if !ok {
            return Err(Rejected {
                error: Error::Invalid,
                buf,
            });
        }
        let ty = if op == Op::Read { req::IN } else { req::OUT };
        self.submit(op, ty, sector, buf)
    }

    fn submit(&mut self, op: Op, ty: u32, sector: u64, buf: Vec<u8>) -> Result<Token, Rejected> {
        if self.broken {
            return Err(Rejected {
                error: Error::Broken,
                buf,
            });
        }
        let ndesc = if buf.is_empty() { 2 } else { 3 };
        if self.free.len() < ndesc {
            return Err(Rejected {
                error: Error::QueueFull,
                buf,
            });
        }
        let mut descs = [0u16; 3];
        for d in descs.iter_mut().take(ndesc) {
            *d = self.free.pop().expect("checked free descriptors");
        }
        let head = descs[0];
        let ring = self.ring.as_ref().expect("ring present until drop");
        ring.set_request(head, ty, sector);
        ring.set_desc(head, ring.hdr_addr(head), 16, DESC_F_NEXT, descs[1]);
        if ndesc == 3 {
            let flags = if op == Op::Write { 0 } else { DESC_F_WRITE };
            let addr = buf.as_ptr() as u64;
            ring.set_desc(
                descs[1],
                addr,
                buf.len() as u32,
                flags | DESC_F_NEXT,
                descs[2],
            );
        }
        let last = descs[ndesc - 1];
        ring.set_desc(last, ring.status_addr(head), 1, DESC_F_WRITE, 0);
        let old = self.avail_idx;
        let new = old.wrapping_add(1);
        ring.set_avail_entry(old, head);
        // Descriptors and the ring entry before the index that publishes
        // them.
        fence(Ordering::Release);
        ring.set_avail_idx(new);
        // The index before reading whether the device wants a kick (the
        // device writes its side, then reads ours).
        fence(Ordering::SeqCst);
        let kick = if self.features & feature::RING_EVENT_IDX != 0 {
            need_event(ring.avail_event(), new, old)
        } else {
            ring.used_flags() & USED_F_NO_NOTIFY == 0
        };
        self.avail_idx = new;
        let token = Token(self.next_token);
        self.next_token += 1;
        self.reqs[head as usize] = Some(InFlight {
            token,
            op,
            sector,
            buf,
            descs,
            ndesc,
        });
        self.in_flight += 1;
        if kick {
            self.t.write32(QUEUE_NOTIFY, 0);
        }
        Ok(token)
    }

    /// Move finished requests into `out` (at most `out.len()`), without
    /// blocking; returns how many. [`Error::Broken`] if the device
    /// returned a used entry for no request in flight (it must be reset:
    /// drop this driver and acquire it again).
    pub fn reap(&mut self, out: &mut [Completion]) -> Result<usize, Error> {
        if self.broken {
            return Err(Error::Broken);
        }
        let ring = self.ring.as_ref().expect("ring present until drop");
        let mut n = 0;
        while n < out.len() {
            let used = ring.used_idx();
            if used == self.last_used {
                break;
            }
            // The index before the entry, status and data it covers.
            fence(Ordering::Acquire);
            let (id, len) = ring.used_elem(self.last_used);
            let Some(r) = self.reqs.get_mut(id as usize).and_then(Option::take) else {
                self.broken = true;
                return Err(Error::Broken);
            };
            let status = ring.status(r.descs[0]);
            self.free.extend_from_slice(&r.descs[..r.ndesc]);
            let result = match status {
                blk_status::OK => {
                    // `len` counts the data and the status byte; accept a
                    // device that leaves the status byte out of it.
                    let want = if matches!(r.op, Op::Read | Op::GetId) {
                        r.buf.len() as u32
                    } else {
                        0
                    };
                    if len < want {
                        Err(Error::ShortRead(len))
                    } else {
                        Ok(())
                    }
                }
                blk_status::IOERR => Err(Error::IoError),
                blk_status::UNSUPP => Err(Error::Unsupported),
                s => Err(Error::BadStatus(s)),
            };
            out[n] = Completion {
                token: r.token,
                op: r.op,
                sector: r.sector,
                result,
                buf: r.buf,
            };
            n += 1;
            self.in_flight -= 1;
            self.last_used = self.last_used.wrapping_add(1);
        }
        // Ask to be told (POLL readiness) about the next completion.
        ring.set_used_event(self.last_used);
        fence(Ordering::SeqCst);
        Ok(n)
    }

    /// [`VirtioBlk::reap`], blocking in POLL while nothing has finished.
    /// Returns at once with 0 if nothing is in flight (or `out` is empty).
    pub fn wait(&mut self, out: &mut [Completion]) -> Result<usize, Error> {
        self.wait_for(out, u64::MAX)
    }

    /// [`VirtioBlk::wait`] for at most `timeout_ns` nanoseconds; 0 when
    /// the time is up with nothing finished.
    pub fn wait_timeout(
        &mut self,
        out: &mut [Completion],
        timeout_ns: u64,
    ) -> Result<usize, Error> {
        self.wait_for(out, timeout_ns)
    }

    fn wait_for(&mut self, out: &mut [Completion], timeout_ns: u64) -> Result<usize, Error> {
        let start = self.t.now_ns();
        loop {
            let n = self.reap(out)?;
            if n > 0 || self.in_flight == 0 || out.is_empty() {
                return Ok(n);
            }
            let waited = self.t.now_ns().saturating_sub(start);
            if waited >= timeout_ns {
                return Ok(0);
            }
            // `reap` published used_event, so the host signals the next
            // entry; one registers read per idle slice notices a device
            // that gave up.
            self.t.idle(WAIT_SLICE_NS.min(timeout_ns - waited));
            if self.ring().used_idx() == self.last_used
                && self.t.read32(STATUS) & st::DEVICE_NEEDS_RESET != 0
            {
                self.broken = true;
                return Err(Error::Broken);
            }
        }
    }
}

impl<T: Transport> Drop for VirtioBlk<T> {
    fn drop(&mut self) {
        if reset(&mut self.t).is_err() {
            // The device may still write to the ring and the buffers in
            // flight: leak them rather than hand the memory to the heap.
            core::mem::forget(self.ring.take());
            for r in self.reqs.iter_mut().filter_map(Option::take) {
                core::mem::forget(r.buf);
            }
        }
    }
}

/// Write 0 to Status and wait until the device reads back 0.
fn reset<T: Transport>(t: &mut T) -> Result<(), Error> {
    t.write32(STATUS, 0);
    let start = t.now_ns();
    while t.read32(STATUS) != 0 {
        if t.now_ns().saturating_sub(start) > RESET_TIMEOUT_NS {
            return Err(Error::ResetTimeout);
        }
        t.idle(1_000_000);
    }
    Ok(())
}

/// `(capacity, blk_size, seg_max)`, consistent under ConfigGeneration.
fn read_config<T: Transport>(t: &mut T, features: u64) -> (u64, u32, u32) {
    loop {
        let gen = t.read32(CONFIG_GENERATION);
        let lo = t.read32(CONFIG + blk_config::CAPACITY) as u64;
        let hi = t.read32(CONFIG + blk_config::CAPACITY + 4) as u64;
        let blk_size = if features & feature::BLK_SIZE != 0 {
            t.read32(CONFIG + blk_config::BLK_SIZE)
        } else {
            SECTOR_SIZE as u32
        };
        let seg_max = if features & feature::BLK_SEG_MAX != 0 {
            t.read32(CONFIG + blk_config::SEG_MAX)
        } else {
            0
        };
        if t.read32(CONFIG_GENERATION) == gen {
            return (lo | hi << 32, blk_size, seg_max);
        }
    }
}

/// Should the driver kick, having moved `avail.idx` from `old` to `new`,
/// when the device asked to be told at `event` (virtio spec's
/// `vring_need_event`)?
fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}
