//! tt-ring: a crash-safe ring of variable-sized records shared by one
//! producer and one consumer through a block device.
//!
//! # The model
//!
//! The ring is a stream of records addressed by monotonic `u64` byte
//! positions; the data area holds a window of `capacity` bytes of it. The
//! [`Producer`] appends: [`push`](Producer::push) stages a record (not yet
//! visible), and [`advance`](Producer::advance) is the commit point: it
//! writes the staged records and its control block (which holds their
//! checksum), then syncs once. Only then is the commit acknowledged; a
//! reader checks the last commit against its control block, so one
//! interrupted before its sync finished is whole or absent. The
//! [`Consumer`] reads records in order ([`pop`](Consumer::pop), or
//! [`pop_with`](Consumer::pop_with) to read one in place, and
//! [`fold`](Consumer::fold)) and
//! frees space with [`advance`](Consumer::advance), which durably records
//! how far it has consumed. Producer and consumer may live in different
//! processes sharing a file; each learns the other's progress by reading
//! the other's control block.
//!
//! # What it guarantees
//!
//! - A record the producer advanced past is durable and is delivered intact
//!   and in order, after any crash; nothing un-advanced is ever visible.
//! - Every record carries a CRC32 over the ring's identity, its position,
//!   its length and its payload: a torn, stale or foreign record is reported
//!   as [`Error::Corrupt`] with its position, never returned as data.
//! - A sector holding committed data is never rewritten until the consumer
//!   has freed it (commits end on a sector boundary, and the producer never
//!   writes into the sector the consumer is still reading).
//! - Control blocks live in two slots written alternately, so a torn
//!   control write leaves the previous state readable.
//! - No input makes it panic, loop forever, or allocate more than the ring's
//!   capacity.
//!
//! The on-disk format is specified in docs/FORMAT.md.

pub mod consumer;
pub mod device;
pub mod format;
pub mod producer;

pub use consumer::{Consumer, Item};
pub use device::{BlockDevice, Faults, FaultyDevice, FileDevice, MemDevice};
pub use producer::Producer;

/// Whether the producer is running or has acknowledged a suspend request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Running,
    Suspended,
}

/// Every outcome other than success. Each operation's documentation says
/// which of these it returns.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Not possible now, possible later: the ring is full (push), empty
    /// (pop), or a suspend/resume handshake is still in progress. Try again
    /// after the other side has made progress.
    #[error("not now: try again after the other side makes progress")]
    Retry,
    /// The consumer asked the producer to suspend and the producer has
    /// acknowledged; pushes fail until the consumer resumes.
    #[error("the ring is suspended by its consumer")]
    Suspended,
    /// The item can never fit in this ring, whatever the consumer does.
    #[error("item of {len} bytes can never fit (largest possible: {max} bytes)")]
    TooBig { len: u64, max: u64 },
    /// The device is not a (supported) tt-ring.
    #[error("not a tt-ring: {0}")]
    NotARing(String),
    /// On-disk data failed a check. `position` is the stream position of
    /// the bad record, if the damage is in a record.
    #[error("ring is corrupt{}: {what}", .position.map(|p| format!(" at position {p}")).unwrap_or_default())]
    Corrupt { position: Option<u64>, what: String },
    /// The caller passed a value that breaks the interface's rules.
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// An earlier I/O error left this handle's view of the device
    /// uncertain; detach and attach again to learn what is durable.
    #[error("an earlier I/O error left this handle unusable: attach again")]
    Poisoned,
    /// The device failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// A snapshot of one side's view, for logs and debugging.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DebugInfo {
    pub sector_size: u32,
    pub capacity: u64,
    pub uuid: [u8; 16],
    /// Producer: committed position. Consumer: freed position.
    pub position: u64,
    /// Producer: end of staged records. Consumer: read cursor.
    pub cursor: u64,
    /// The other side's position, as last read.
    pub other: u64,
    /// Producer: suspend acknowledged. Consumer: suspend requested.
    pub flag: bool,
    pub seq: u64,
}

fn align_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

fn align_down(x: u64, a: u64) -> u64 {
    x / a * a
}
