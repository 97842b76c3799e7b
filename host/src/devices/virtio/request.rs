//! virtio-blk requests: parse a descriptor chain into a checked block
//! [`Request`] (this module; what the fuzzer hits), separately from
//! serving it ([`super::blk`]).
//!
//! Layout accepted (virtio 1.x section 5.2.6): the first descriptor is
//! device-readable and holds the 16-byte header (`type`, `reserved`,
//! `sector`); the last is device-writable and its first byte is the
//! status; the descriptors between are the data (device-writable for IN
//! and GET_ID, device-readable for OUT; none for FLUSH). Every buffer
//! must lie in guest RAM and clear of the device's forbidden ranges.

use super::{range_ok, Forbidden};
use crate::block::{Geometry, Request, RequestError, Write, ID_LEN};
use std::ops::Deref;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestMemoryMmap};

/// Request types, status codes and the 512-byte sector, from tt-hvt-abi.
pub use tt_hvt_abi::virtio::blk::{
    SECTOR, S_IOERR as VIRTIO_BLK_S_IOERR, S_OK as VIRTIO_BLK_S_OK,
    S_UNSUPP as VIRTIO_BLK_S_UNSUPP, T_FLUSH as VIRTIO_BLK_T_FLUSH,
    T_GET_ID as VIRTIO_BLK_T_GET_ID, T_IN as VIRTIO_BLK_T_IN, T_OUT as VIRTIO_BLK_T_OUT,
};
/// Size of the request header.
pub const HEADER_LEN: u64 = 16;
/// The largest request served (data bytes); larger ones get IOERR. It
/// bounds what one request makes the host allocate.
pub const MAX_REQUEST_BYTES: u64 = 16 << 20;

/// Why a chain was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("descriptor chain {head} is empty or its head is out of the queue")]
    Empty { head: u16 },
    #[error(
        "descriptor chain {head} does not end: a loop, more descriptors than the queue \
         holds, or a `next` outside the table"
    )]
    Unterminated { head: u16 },
    #[error("descriptor chain {head}: the last descriptor (status) is not device-writable")]
    StatusReadOnly { head: u16 },
    #[error(
        "descriptor chain {head}: the status byte at {addr:#x} is outside guest RAM or in a \
         range the device must not touch"
    )]
    StatusOutside { head: u16, addr: u64 },
    #[error("descriptor chain {head} has no request header")]
    NoHeader { head: u16 },
    #[error("descriptor chain {head}: the header is device-writable or shorter than 16 bytes")]
    BadHeader { head: u16 },
    #[error(
        "descriptor chain {head}: buffer {addr:#x}+{len:#x} is outside guest RAM or in a \
         range the device must not touch"
    )]
    BufferOutside { head: u16, addr: u64, len: u64 },
    #[error("descriptor chain {head}: a data buffer has the wrong direction for its request")]
    Direction { head: u16 },
    #[error("descriptor chain {head}: {count} data buffers, more than seg_max {max}")]
    TooManySegments { head: u16, count: usize, max: u32 },
    #[error("descriptor chain {head}: {len} data bytes, more than the {max} served at once")]
    TooLarge { head: u16, len: u64, max: u64 },
    #[error("descriptor chain {head}: a FLUSH carries data buffers")]
    FlushWithData { head: u16 },
    #[error("descriptor chain {head}: sector {sector} overflows")]
    SectorOverflow { head: u16, sector: u64 },
    #[error("descriptor chain {head}: {source}")]
    Request {
        head: u16,
        #[source]
        source: RequestError,
    },
    #[error("descriptor chain {head} was made available again while still in flight")]
    HeadInFlight { head: u16 },
    #[error("descriptor chain {head}: reading guest memory failed")]
    Memory { head: u16 },
}

/// A guest buffer the device may write: checked to lie in RAM and clear
/// of forbidden ranges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
}

/// A parsed request: what to submit, and where its answer goes.
#[derive(Debug)]
pub struct Parsed {
    pub head: u16,
    pub request: Request,
    /// Where read data (IN) or the identifier (GET_ID) goes, in order.
    pub data_in: Vec<Buf>,
    /// The status byte.
    pub status: u64,
}

/// A refused chain, and how to answer it.
#[derive(Debug)]
pub enum Refused {
    /// Write `code` to the status byte at `status` and complete the chain.
    Answer {
        head: u16,
        status: u64,
        code: u8,
        error: ParseError,
    },
    /// Not even a status byte: the device needs a reset.
    Fatal(ParseError),
}

/// What the device allows (its config space).
#[derive(Debug, Clone, Copy)]
pub struct Limits<'a> {
    pub geometry: Geometry,
    pub seg_max: u32,
    pub forbidden: &'a [Forbidden],
}

/// Parse the chain starting at `chain`'s head into a [`Request`]. No
/// guest memory is written; OUT data is copied out.
pub fn parse<M>(
    chain: DescriptorChain<M>,
    mem: &GuestMemoryMmap,
    limits: &Limits<'_>,
) -> Result<Parsed, Refused>
where
    M: Deref,
    M::Target: vm_memory::GuestMemory,
{
    let head = chain.head_index();
    // The chain iterator stops at a loop (after queue-size descriptors),
    // at a `next` outside the table and at an unreadable descriptor; in
    // each case the last descriptor it gave still has NEXT set.
    let descs: Vec<_> = chain.collect();
    let Some(last) = descs.last() else {
        return Err(Refused::Fatal(ParseError::Empty { head }));
    };
    if last.has_next() {
        return Err(Refused::Fatal(ParseError::Unterminated { head }));
    }
    if !last.is_write_only() || last.len() == 0 {
        return Err(Refused::Fatal(ParseError::StatusReadOnly { head }));
    }
    let status = last.addr().0;
    if !range_ok(mem, limits.forbidden, status, 1) {
        return Err(Refused::Fatal(ParseError::StatusOutside {
            head,
            addr: status,
        }));
    }
    let answer = |code, error| Refused::Answer {
        head,
        status,
        code,
        error,
    };
    let ioerr = |error| answer(VIRTIO_BLK_S_IOERR, error);

    if descs.len() < 2 {
        return Err(ioerr(ParseError::NoHeader { head }));
    }
    let hdr = descs[0];
    if hdr.is_write_only() || u64::from(hdr.len()) < HEADER_LEN {
        return Err(ioerr(ParseError::BadHeader { head }));
    }
    if !range_ok(mem, limits.forbidden, hdr.addr().0, u64::from(hdr.len())) {
        return Err(ioerr(ParseError::BufferOutside {
            head,
            addr: hdr.addr().0,
            len: u64::from(hdr.len()),
        }));
    }
    let mut raw = [0u8; HEADER_LEN as usize];
    mem.read_slice(&mut raw, hdr.addr())
        .map_err(|_| ioerr(ParseError::Memory { head }))?;
    let kind = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
    let sector = u64::from_le_bytes(raw[8..16].try_into().unwrap_or([0; 8]));

    let data = &descs[1..descs.len() - 1];
    if data.len() > limits.seg_max as usize {
        return Err(ioerr(ParseError::TooManySegments {
            head,
            count: data.len(),
            max: limits.seg_max,
        }));
    }
    let mut total: u64 = 0;
    for d in data {
        let (addr, len) = (d.addr().0, u64::from(d.len()));
        if !range_ok(mem, limits.forbidden, addr, len) {
            return Err(ioerr(ParseError::BufferOutside { head, addr, len }));
        }
        total += len; // at most seg_max * 2^32: no overflow
    }
    if total > MAX_REQUEST_BYTES {
        return Err(ioerr(ParseError::TooLarge {
            head,
            len: total,
            max: MAX_REQUEST_BYTES,
        }));
    }
    let writable = |want: bool| data.iter().all(|d| d.is_write_only() == want);
    let span = || {
        let offset = sector
            .checked_mul(SECTOR)
            .ok_or_else(|| ioerr(ParseError::SectorOverflow { head, sector }))?;
        limits
            .geometry
            .span(offset, total)
            .map_err(|source| ioerr(ParseError::Request { head, source }))
    };
    let bufs = || -> Vec<Buf> {
        data.iter()
            .map(|d| Buf {
                addr: d.addr().0,
                len: d.len(),
            })
            .collect()
    };
    let request = match kind {
        VIRTIO_BLK_T_IN => {
            if !writable(true) {
                return Err(ioerr(ParseError::Direction { head }));
            }
            Request::Read(span()?)
        }
        VIRTIO_BLK_T_OUT => {
            if !writable(false) {
                return Err(ioerr(ParseError::Direction { head }));
            }
            let span = span()?;
            let mut bytes = vec![0u8; total as usize];
            let mut at = 0usize;
            for d in data {
                let n = d.len() as usize;
                mem.read_slice(&mut bytes[at..at + n], d.addr())
                    .map_err(|_| ioerr(ParseError::Memory { head }))?;
                at += n;
            }
            let write = Write::new(span, bytes)
                .map_err(|source| ioerr(ParseError::Request { head, source }))?;
            Request::Write(write)
        }
        VIRTIO_BLK_T_FLUSH => {
            if !data.is_empty() {
                return Err(ioerr(ParseError::FlushWithData { head }));
            }
            Request::Flush
        }
        VIRTIO_BLK_T_GET_ID => {
            if !writable(true) {
                return Err(ioerr(ParseError::Direction { head }));
            }
            Request::GetId
        }
        other => {
            return Err(answer(
                VIRTIO_BLK_S_UNSUPP,
                ParseError::Request {
                    head,
                    source: RequestError::Unsupported(other),
                },
            ))
        }
    };
    let data_in = match request {
        Request::Read(_) | Request::GetId => bufs(),
        _ => Vec::new(),
    };
    Ok(Parsed {
        head,
        request,
        data_in,
        status,
    })
}

/// Bytes of a GET_ID answer to write into buffers of `total` bytes.
pub fn id_len(total: u64) -> usize {
    (ID_LEN as u64).min(total) as usize
}
