//! Block requests and their validation, done once for every device.
//!
//! A device decodes what its guest asked for (an hvt argument struct, a
//! virtio-blk descriptor chain) and turns each transfer's offset and
//! length into a [`Span`] with [`Geometry::span`]. That is the only way
//! to make a `Span`, so a [`Request`] that reaches a backend has been
//! checked: the offset is sector-aligned, the length a whole, non-zero
//! number of sectors, and the range lies inside the device, with no
//! arithmetic overflow on the way. Check the span *before* copying guest
//! memory: a bad request is refused without touching it.

/// The shape of a block device: what a request is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Size in bytes: a whole number of sectors.
    pub capacity: u64,
    /// Sector (block) size in bytes: a power of two.
    pub sector_size: u64,
}

/// Why a request was refused before it reached the backend. Nothing was
/// read or written. An hvt device answers `EINVAL` to every one of these;
/// a virtio-blk device `VIRTIO_BLK_S_UNSUPP` to [`Unsupported`] and
/// `VIRTIO_BLK_S_IOERR` to the others (see [`RequestError::is_unsupported`]).
///
/// [`Unsupported`]: RequestError::Unsupported
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("offset {offset:#x} is not a multiple of the {sector}-byte sector size")]
    Misaligned { offset: u64, sector: u64 },
    #[error("length {len:#x} is not a whole, non-zero number of {sector}-byte sectors")]
    BadLength { len: u64, sector: u64 },
    #[error("range {offset:#x}+{len:#x} ends beyond the device's {capacity:#x} bytes")]
    OutOfRange {
        offset: u64,
        len: u64,
        capacity: u64,
    },
    #[error("a write of {span} bytes carries {data} bytes of data")]
    DataLength { span: u64, data: u64 },
    /// A request type the device does not implement (a virtio-blk type
    /// number, for instance).
    #[error("request type {0} is not supported")]
    Unsupported(u32),
}

impl RequestError {
    /// Is this a request of a kind the device does not serve (virtio:
    /// `VIRTIO_BLK_S_UNSUPP`), rather than a malformed one
    /// (`VIRTIO_BLK_S_IOERR`, hvt: `EINVAL`)?
    pub fn is_unsupported(&self) -> bool {
        matches!(self, RequestError::Unsupported(_))
    }
}

/// A checked byte range of a device: sector-aligned, a whole non-zero
/// number of sectors, inside the device it was checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Span {
    offset: u64,
    len: u64,
}

impl Span {
    pub fn offset(&self) -> u64 {
        self.offset
    }
    pub fn len(&self) -> u64 {
        self.len
    }
    /// Always false: a span is never empty. (For clippy's `len_without_is_empty`.)
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// One past the last byte (cannot overflow: checked at creation).
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

impl Geometry {
    /// Check `[offset, offset + len)` against this device.
    pub fn span(&self, offset: u64, len: u64) -> Result<Span, RequestError> {
        let sector = self.sector_size;
        // A zero sector size would divide by zero; treat it as "nothing is
        // aligned" rather than panic.
        if sector == 0 || offset % sector != 0 {
            return Err(RequestError::Misaligned { offset, sector });
        }
        if len == 0 || len % sector != 0 {
            return Err(RequestError::BadLength { len, sector });
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.capacity => Ok(Span { offset, len }),
            _ => Err(RequestError::OutOfRange {
                offset,
                len,
                capacity: self.capacity,
            }),
        }
    }

    /// Does `span` lie inside this device? (A span checked against a
    /// different device may not; backends refuse it rather than trust it.)
    pub fn contains(&self, span: Span) -> bool {
        span.end() <= self.capacity && span.offset % self.sector_size.max(1) == 0
    }
}

/// A write: a span and exactly that many bytes of data (copied out of
/// guest memory by the device).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    span: Span,
    data: Vec<u8>,
}

impl Write {
    /// Pair `data` with `span`; refused unless it is exactly as long.
    pub fn new(span: Span, data: Vec<u8>) -> Result<Write, RequestError> {
        if data.len() as u64 != span.len() {
            return Err(RequestError::DataLength {
                span: span.len(),
                data: data.len() as u64,
            });
        }
        Ok(Write { span, data })
    }
    pub fn span(&self) -> Span {
        self.span
    }
    pub fn data(&self) -> &[u8] {
        &self.data
    }
    pub fn into_data(self) -> Vec<u8> {
        self.data
    }
}

/// One checked request to a backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Read the span; completes with [`Response::Read`](super::Response::Read).
    Read(Span),
    /// Write the data; completes once written (plain) or durable (journal).
    Write(Write),
    /// Make every completed write durable.
    Flush,
    /// The device's identifier (virtio-blk `GET_ID`: 20 bytes).
    GetId,
}

impl Request {
    /// A read of `[offset, offset + len)` of a device of shape `g`.
    pub fn read(g: &Geometry, offset: u64, len: u64) -> Result<Request, RequestError> {
        Ok(Request::Read(g.span(offset, len)?))
    }

    /// A write of `data` at `offset` of a device of shape `g`.
    pub fn write(g: &Geometry, offset: u64, data: Vec<u8>) -> Result<Request, RequestError> {
        let span = g.span(offset, data.len() as u64)?;
        Ok(Request::Write(Write::new(span, data)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const G: Geometry = Geometry {
        capacity: 8 * 512,
        sector_size: 512,
    };

    #[test]
    fn whole_sectors_inside_the_device_are_accepted() {
        let s = G.span(512, 1024).unwrap();
        assert_eq!((s.offset(), s.len(), s.end()), (512, 1024, 1536));
        assert!(G.span(0, 8 * 512).is_ok(), "the whole device");
        assert!(G.span(7 * 512, 512).is_ok(), "the last sector");
    }

    #[test]
    fn every_malformed_range_is_refused_with_its_reason() {
        assert!(matches!(
            G.span(1, 512),
            Err(RequestError::Misaligned { offset: 1, .. })
        ));
        assert!(matches!(
            G.span(0, 0),
            Err(RequestError::BadLength { len: 0, .. })
        ));
        assert!(matches!(
            G.span(0, 100),
            Err(RequestError::BadLength { .. })
        ));
        assert!(matches!(
            G.span(8 * 512, 512),
            Err(RequestError::OutOfRange { .. })
        ));
        assert!(matches!(
            G.span(7 * 512, 1024),
            Err(RequestError::OutOfRange { .. })
        ));
        // offset + len overflows u64: refused, not wrapped.
        let top = u64::MAX / 512 * 512;
        assert!(matches!(
            G.span(top, 512),
            Err(RequestError::OutOfRange { .. })
        ));
        let zero = Geometry {
            capacity: 4096,
            sector_size: 0,
        };
        assert!(zero.span(0, 512).is_err(), "no panic on a zero sector size");
    }

    #[test]
    fn a_write_must_carry_exactly_its_span_of_data() {
        let s = G.span(0, 1024).unwrap();
        assert!(Write::new(s, vec![0; 1024]).is_ok());
        assert_eq!(
            Write::new(s, vec![0; 512]),
            Err(RequestError::DataLength {
                span: 1024,
                data: 512
            })
        );
        assert!(Request::write(&G, 0, vec![1; 512]).is_ok());
        assert!(Request::write(&G, 0, vec![1; 100]).is_err());
        assert!(RequestError::Unsupported(8).is_unsupported());
        assert!(!RequestError::BadLength {
            len: 0,
            sector: 512
        }
        .is_unsupported());
    }

    proptest! {
        /// Accepted exactly when the old hvt check accepted: aligned,
        /// whole, non-zero sectors, ending inside the device.
        #[test]
        fn validation_matches_the_definition(
            offset in prop_oneof![0u64..10_000, any::<u64>()],
            len in prop_oneof![0u64..10_000, any::<u64>()],
            shift in 9u32..16,
        ) {
            let g = Geometry { capacity: 1 << 20, sector_size: 1 << shift };
            let want = len > 0
                && offset % g.sector_size == 0
                && len % g.sector_size == 0
                && offset.checked_add(len).is_some_and(|e| e <= g.capacity);
            prop_assert_eq!(g.span(offset, len).is_ok(), want);
        }
    }
}
