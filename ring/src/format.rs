//! On-disk layout: header, control slots, records. docs/FORMAT.md is the
//! specification; this file is its encoder and decoder. Every decoder
//! checks before it trusts: magic, version, CRC, geometry, bounds.

use crate::device::BlockDevice;
use crate::Error;

/// Magic at the start of sector 0.
pub const MAGIC: [u8; 8] = *b"tt-ring\0";
/// Format version this code reads and writes.
pub const VERSION: u32 = 2;
/// Sector index of the first producer control slot (two slots: 1, 2).
pub const PRODUCER_SLOT: u64 = 1;
/// Sector index of the first consumer control slot (two slots: 3, 4).
pub const CONSUMER_SLOT: u64 = 3;
/// First data sector.
pub const DATA_START: u64 = 5;
/// Smallest data area, in sectors.
pub const MIN_DATA_SECTORS: u64 = 2;
/// Record header: length (u32) and CRC32 (u32).
pub const RECORD_HEADER: u64 = 8;
/// Records start at multiples of this.
pub const RECORD_ALIGN: u64 = 8;
/// Length value of a padding record: skip to the next sector boundary.
pub const PAD: u32 = u32::MAX;
const PRODUCER_MAGIC: [u8; 4] = *b"TTRP";
const CONSUMER_MAGIC: [u8; 4] = *b"TTRC";

/// Ring geometry and identity, from the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub sector_size: u32,
    pub data_sectors: u64,
    pub uuid: [u8; 16],
}

impl Header {
    /// Bytes of the data area.
    pub fn capacity(&self) -> u64 {
        self.data_sectors * self.sector_size as u64
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut s = vec![0u8; self.sector_size as usize];
        s[0..8].copy_from_slice(&MAGIC);
        s[8..12].copy_from_slice(&VERSION.to_le_bytes());
        s[12..16].copy_from_slice(&self.sector_size.to_le_bytes());
        s[16..24].copy_from_slice(&DATA_START.to_le_bytes());
        s[24..32].copy_from_slice(&self.data_sectors.to_le_bytes());
        s[32..48].copy_from_slice(&self.uuid);
        let crc = crc32fast::hash(&s[0..48]);
        s[48..52].copy_from_slice(&crc.to_le_bytes());
        s
    }

    /// Read and check the header of the ring on `dev`.
    pub fn read(dev: &dyn BlockDevice) -> Result<Header, Error> {
        let sector = dev.sector_size();
        if dev.size() < sector as u64 || sector < 512 {
            return Err(Error::NotARing("device is smaller than one sector".into()));
        }
        let mut s = vec![0u8; sector as usize];
        dev.read_at(&mut s, 0)?;
        if s[0..8] != MAGIC {
            return Err(if s.iter().all(|&b| b == 0) {
                Error::NotARing(
                    "sector 0 is all zeroes (never formatted, or create did not finish)".into(),
                )
            } else {
                Error::NotARing("bad magic in sector 0 (not a tt-ring device)".into())
            });
        }
        let crc = u32::from_le_bytes(s[48..52].try_into().unwrap());
        if crc != crc32fast::hash(&s[0..48]) {
            return Err(Error::Corrupt {
                position: None,
                what: "header checksum mismatch".into(),
            });
        }
        let version = u32::from_le_bytes(s[8..12].try_into().unwrap());
        if version != VERSION {
            return Err(Error::NotARing(format!(
                "format version {version}; this tt-ring reads version {VERSION}"
            )));
        }
        let h = Header {
            sector_size: u32::from_le_bytes(s[12..16].try_into().unwrap()),
            data_sectors: u64::from_le_bytes(s[24..32].try_into().unwrap()),
            uuid: s[32..48].try_into().unwrap(),
        };
        let start = u64::from_le_bytes(s[16..24].try_into().unwrap());
        if h.sector_size != sector {
            return Err(Error::NotARing(format!(
                "ring was formatted with {}-byte sectors, device has {sector}",
                h.sector_size
            )));
        }
        if start != DATA_START
            || h.data_sectors < MIN_DATA_SECTORS
            || h.data_sectors
                .checked_add(DATA_START)
                .and_then(|n| n.checked_mul(sector as u64))
                .is_none_or(|end| end > dev.size())
        {
            return Err(Error::Corrupt {
                position: None,
                what: format!(
                    "header geometry ({} data sectors from sector {start}) does not fit the {}-byte device",
                    h.data_sectors,
                    dev.size()
                ),
            });
        }
        Ok(h)
    }
}

/// One side's control block (what a control slot holds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Control {
    /// Incremented on every write; the valid slot with the larger one wins.
    pub seq: u64,
    /// Producer: end of committed data. Consumer: start of unconsumed data.
    pub position: u64,
    /// Producer: suspend acknowledged. Consumer: suspend requested.
    pub flag: bool,
    /// Producer: where the data of the commit this block ends begins (the
    /// previous block's position); equal to `position` when the block
    /// commits no data. Consumer: zero.
    pub start: u64,
    /// Producer: [`commit_crc`] of the stream bytes `[start, position)`.
    /// Consumer: zero.
    pub data_crc: u32,
}
impl Control {
    /// The `seq` of the block that follows this one. A block whose `seq`
    /// is already `u64::MAX` (no writer gets there: 2^64 writes) is a
    /// crafted or damaged device: corruption, not an overflow.
    pub fn next_seq(&self, side: Side) -> Result<u64, Error> {
        self.seq.checked_add(1).ok_or_else(|| Error::Corrupt {
            position: None,
            what: format!(
                "the {} control block's sequence number is {}, the largest possible",
                match side {
                    Side::Producer => "producer",
                    Side::Consumer => "consumer",
                },
                self.seq
            ),
        })
    }
}

/// Which control block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Producer,
    Consumer,
}

impl Side {
    fn magic(self) -> [u8; 4] {
        match self {
            Side::Producer => PRODUCER_MAGIC,
            Side::Consumer => CONSUMER_MAGIC,
        }
    }
    fn first_slot(self) -> u64 {
        match self {
            Side::Producer => PRODUCER_SLOT,
            Side::Consumer => CONSUMER_SLOT,
        }
    }
}

fn control_crc(uuid: &[u8; 16], body: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(uuid);
    h.update(body);
    h.finalize()
}

impl Control {
    fn encode(&self, side: Side, h: &Header) -> Vec<u8> {
        let mut s = vec![0u8; h.sector_size as usize];
        s[0..4].copy_from_slice(&side.magic());
        s[8..16].copy_from_slice(&self.seq.to_le_bytes());
        s[16..24].copy_from_slice(&self.position.to_le_bytes());
        s[24] = self.flag as u8;
        s[32..40].copy_from_slice(&self.start.to_le_bytes());
        s[40..44].copy_from_slice(&self.data_crc.to_le_bytes());
        let crc = control_crc(&h.uuid, &s[0..48]);
        s[48..52].copy_from_slice(&crc.to_le_bytes());
        s
    }

    fn decode(s: &[u8], side: Side, h: &Header) -> Option<Control> {
        if s[0..4] != side.magic() || s[24] > 1 {
            return None;
        }
        let crc = u32::from_le_bytes(s[48..52].try_into().unwrap());
        (crc == control_crc(&h.uuid, &s[0..48])).then(|| Control {
            seq: u64::from_le_bytes(s[8..16].try_into().unwrap()),
            position: u64::from_le_bytes(s[16..24].try_into().unwrap()),
            flag: s[24] == 1,
            start: u64::from_le_bytes(s[32..40].try_into().unwrap()),
            data_crc: u32::from_le_bytes(s[40..44].try_into().unwrap()),
        })
    }

    /// Both slots of `side`, decoded: (newer, older), each `None` if it
    /// fails its checks.
    fn slots(
        dev: &dyn BlockDevice,
        h: &Header,
        side: Side,
    ) -> Result<(Option<Control>, Option<Control>), Error> {
        let ss = h.sector_size as usize;
        let mut buf = vec![0u8; 2 * ss];
        dev.read_at(&mut buf, side.first_slot() * ss as u64)?;
        let a = Control::decode(&buf[..ss], side, h);
        let b = Control::decode(&buf[ss..], side, h);
        Ok(match (a, b) {
            (Some(a), Some(b)) if b.seq > a.seq => (Some(b), Some(a)),
            (Some(a), b) => (Some(a), b),
            (None, b) => (b, None),
        })
    }

    /// Read the consumer's two slots and return the valid one with the
    /// larger sequence number. Neither valid is corruption.
    pub fn read_consumer(dev: &dyn BlockDevice, h: &Header) -> Result<Control, Error> {
        match Control::slots(dev, h, Side::Consumer)? {
            (Some(c), _) => Ok(c),
            (None, _) => Err(Error::Corrupt {
                position: None,
                what: "both consumer control slots fail their checksum".into(),
            }),
        }
    }

    /// Read the producer's committed state (FORMAT.md, "Reading the
    /// producer's control block"): the newer valid slot, unless the data of
    /// the commit it ends fails its checksum (its single sync did not
    /// finish), in which case the older slot, which must be its
    /// predecessor.
    ///
    /// A commit needs no check when it carries no data, when it ends at or
    /// before `trusted` (a position this handle has already validated), or
    /// when the consumer position `consumer` is past its start: the
    /// consumer read it, and its own synced advance made it durable (and
    /// the space before `consumer` may since have been rewritten).
    pub fn read_producer(
        dev: &dyn BlockDevice,
        h: &Header,
        consumer: u64,
        trusted: u64,
    ) -> Result<Control, Error> {
        let corrupt = |what: String| Error::Corrupt {
            position: None,
            what,
        };
        let (newer, older) = Control::slots(dev, h, Side::Producer)?;
        let Some(n) = newer else {
            return Err(corrupt(
                "both producer control slots fail their checksum".into(),
            ));
        };
        if n.start == n.position || n.position <= trusted || consumer > n.start {
            return Ok(n);
        }
        if n.start > n.position || n.position - n.start > h.capacity() {
            return Err(corrupt(format!(
                "producer control block says its commit spans [{}, {}), not a possible commit",
                n.start, n.position
            )));
        }
        let mut data = vec![0u8; (n.position - n.start) as usize];
        read_stream(dev, h, n.start, &mut data)?;
        let mut crc = CommitCrc::new(h, n.start);
        crc.update(&data);
        if crc.finish() == n.data_crc {
            return Ok(n);
        }
        // The last commit's sync did not finish: some of its sectors, or
        // its control block alone, reached the device. It was never
        // acknowledged; its predecessor is the committed state.
        match older {
            Some(o) if o.position == n.start && o.seq.checked_add(1) == Some(n.seq) => Ok(o),
            _ => Err(corrupt(format!(
                "the producer's last commit [{}, {}) fails its data checksum and the other \
                 control slot is not its predecessor",
                n.start, n.position
            ))),
        }
    }

    /// Write this control block into the slot its `seq` selects (the one
    /// not holding the previous block) and sync.
    pub fn write(&self, dev: &dyn BlockDevice, h: &Header, side: Side) -> Result<(), Error> {
        self.write_unsynced(dev, h, side)?;
        dev.sync()?;
        Ok(())
    }

    /// [`write`](Self::write) without the sync: for a producer commit,
    /// whose one sync covers its data and this block.
    pub fn write_unsynced(
        &self,
        dev: &dyn BlockDevice,
        h: &Header,
        side: Side,
    ) -> Result<(), Error> {
        let slot = side.first_slot() + self.seq % 2;
        dev.write_at(&self.encode(side, h), slot * h.sector_size as u64)?;
        Ok(())
    }
}

/// The checksum of one commit's data, as a producer control block holds
/// it: CRC32 of the ring's uuid, the commit's start position (u64) and the
/// stream bytes from there to the commit's end.
pub struct CommitCrc(crc32fast::Hasher);

impl CommitCrc {
    pub fn new(h: &Header, start: u64) -> CommitCrc {
        let mut c = crc32fast::Hasher::new();
        c.update(&h.uuid);
        c.update(&start.to_le_bytes());
        CommitCrc(c)
    }
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
    /// Continue as if the bytes that `payload` summed came next, without
    /// reading them again (CRC32 combination: O(log len)).
    pub fn combine(&mut self, payload: &PayloadCrc) {
        self.0.combine(&payload.0);
    }
    pub fn finish(self) -> u32 {
        self.0.finalize()
    }
}

/// Size on disk of a record with a `len`-byte payload.
pub fn record_size(len: u64) -> u64 {
    (RECORD_HEADER + len).div_ceil(RECORD_ALIGN) * RECORD_ALIGN
}

/// CRC of a record: binds the payload to the ring and to its position.
pub fn record_crc(uuid: &[u8; 16], position: u64, len: u32, payload: &[u8]) -> u32 {
    let mut h = record_crc_prefix(uuid, position, len);
    h.update(payload);
    h.finalize()
}

fn record_crc_prefix(uuid: &[u8; 16], position: u64, len: u32) -> crc32fast::Hasher {
    let mut h = crc32fast::Hasher::new();
    h.update(uuid);
    h.update(&position.to_le_bytes());
    h.update(&len.to_le_bytes());
    h
}

/// The CRC32 of a payload alone, from which both its record's CRC and
/// the commit's CRC follow by combination, so the producer reads each
/// payload once instead of twice.
pub struct PayloadCrc(crc32fast::Hasher);

impl PayloadCrc {
    pub fn new(payload: &[u8]) -> PayloadCrc {
        let mut h = crc32fast::Hasher::new();
        h.update(payload);
        PayloadCrc(h)
    }

    /// [`record_crc`] of this payload at `position`.
    pub fn record_crc(&self, uuid: &[u8; 16], position: u64, len: u32) -> u32 {
        let mut h = record_crc_prefix(uuid, position, len);
        h.combine(&self.0);
        h.finalize()
    }
}

/// Read `buf.len()` bytes of the data area starting at stream `position`
/// (wrapping around the end of the data area).
pub fn read_stream(
    dev: &dyn BlockDevice,
    h: &Header,
    position: u64,
    buf: &mut [u8],
) -> Result<(), Error> {
    let cap = h.capacity();
    let base = DATA_START * h.sector_size as u64;
    let off = position % cap;
    let first = (buf.len() as u64).min(cap - off) as usize;
    dev.read_at(&mut buf[..first], base + off)?;
    if first < buf.len() {
        dev.read_at(&mut buf[first..], base)?;
    }
    Ok(())
}

/// Write `buf` into the data area at stream `position` (wrapping).
pub fn write_stream(
    dev: &dyn BlockDevice,
    h: &Header,
    position: u64,
    buf: &[u8],
) -> Result<(), Error> {
    let cap = h.capacity();
    let base = DATA_START * h.sector_size as u64;
    let off = position % cap;
    let first = (buf.len() as u64).min(cap - off) as usize;
    dev.write_at(&buf[..first], base + off)?;
    if first < buf.len() {
        dev.write_at(&buf[first..], base)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The producer's one-pass checksums (payload CRC, then combination)
    /// must equal the direct ones the consumer checks, at every length
    /// (a mismatch would make readers reject good records and commits).
    #[test]
    fn combined_checksums_equal_direct_ones() {
        let uuid = [0x5au8; 16];
        let h = Header {
            sector_size: 4096,
            data_sectors: 1024,
            uuid,
        };
        let bytes: Vec<u8> = (0..70_000u32).map(|i| (i * 31 + i / 251) as u8).collect();
        for len in [0, 1, 7, 8, 1023, 1024, 4096, 4099, 65_536, 70_000] {
            let payload = &bytes[..len];
            let pos = 0x1234_5678_9abc + len as u64;
            let p = PayloadCrc::new(payload);
            assert_eq!(
                p.record_crc(&uuid, pos, len as u32),
                record_crc(&uuid, pos, len as u32, payload),
                "record crc, len {len}"
            );
            let mut direct = CommitCrc::new(&h, pos);
            direct.update(b"head");
            direct.update(payload);
            direct.update(b"tail");
            let mut combined = CommitCrc::new(&h, pos);
            combined.update(b"head");
            combined.combine(&p);
            combined.update(b"tail");
            assert_eq!(combined.finish(), direct.finish(), "commit crc, len {len}");
        }
    }
}
