//! The producer side.

use crate::device::BlockDevice;
use crate::format::{self, CommitCrc, Control, Header, Side};
use crate::{align_down, align_up, DebugInfo, Error, State};

/// Staged bytes are written out in whole sectors once this much piles up,
/// so a long batch does not hold its whole size in memory.
const FLUSH_AT: usize = 1 << 20;

/// Payloads at least this long are checksummed once and the commit's CRC
/// is extended by combination (50-70 ns here, what CRC32 takes over about
/// 1 KiB); shorter ones are read twice, which is cheaper.
const COMBINE_FROM: usize = 1024;

/// The producer of a ring: one per ring at a time.
pub struct Producer<D: BlockDevice> {
    dev: D,
    h: Header,
    /// Last control block written (its position is the committed position).
    ctl: Control,
    /// Stream position up to which staged bytes are already on the device
    /// (unsynced, invisible); sector-aligned, >= the committed position.
    written: u64,
    /// Staged bytes from `written` on.
    staged: Vec<u8>,
    /// Checksum of the uncommitted stream bytes, from the committed
    /// position on; the commit's control block holds it.
    crc: CommitCrc,
    /// `crc` covers `staged[..crc_to]`; the rest is summed when it is
    /// written (short records in bulk) or before a long payload is
    /// combined in.
    crc_to: usize,
    /// Consumer position, as last read and made durable: the producer
    /// writes only into space freed before it.
    consumer: u64,
    poisoned: bool,
}

fn random_uuid() -> [u8; 16] {
    let mut u = [0u8; 16];
    use std::io::Read;
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut u))
        .is_err()
    {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        u = (t ^ ((std::process::id() as u128) << 64)).to_le_bytes();
    }
    u
}

impl<D: BlockDevice> Producer<D> {
    /// Format `dev` as an empty ring filling the whole device.
    ///
    /// The header's magic is written last: a crash during `create` leaves
    /// a device that [`attach`](Self::attach) rejects as unformatted, never
    /// a half-valid ring. Errors: [`Error::Invalid`] if the device is too
    /// small (fewer than 7 sectors) or its sector size is not a power of
    /// two >= 512; [`Error::Io`].
    pub fn create(dev: &D) -> Result<(), Error> {
        let ss = dev.sector_size();
        if !ss.is_power_of_two() || ss < 512 {
            return Err(Error::Invalid(format!(
                "sector size {ss} is not a power of two >= 512"
            )));
        }
        let sectors = dev.size() / ss as u64;
        if sectors < format::DATA_START + format::MIN_DATA_SECTORS {
            return Err(Error::Invalid(format!(
                "device has {sectors} sectors; a ring needs at least {}",
                format::DATA_START + format::MIN_DATA_SECTORS
            )));
        }
        let h = Header {
            sector_size: ss,
            data_sectors: sectors - format::DATA_START,
            uuid: random_uuid(),
        };
        // Unformat first, so an old ring cannot survive a half-done create.
        dev.write_at(&vec![0u8; ss as usize], 0)?;
        dev.sync()?;
        for side in [Side::Producer, Side::Consumer] {
            for seq in 0..2 {
                Control {
                    seq,
                    ..Control::default()
                }
                .write(dev, &h, side)?;
            }
        }
        dev.write_at(&h.encode(), 0)?;
        dev.sync()?;
        Ok(())
    }

    /// Attach to the ring on `dev` as its producer.
    /// It syncs the device first, so the state it reports is durable even
    /// if an earlier handle's write reached the device but its sync failed.
    ///
    /// Errors: [`Error::NotARing`] (unformatted, foreign, other version or
    /// sector size), [`Error::Corrupt`] (header or control blocks fail their
    /// checks), [`Error::Io`].
    pub fn attach(dev: D) -> Result<Producer<D>, Error> {
        // Sync first: what attach reports must be durable, even if an
        // earlier handle's write reached the device but its sync failed.
        dev.sync()?;
        let h = Header::read(&dev)?;
        let cons = Control::read_consumer(&dev, &h)?;
        let ctl = Control::read_producer(&dev, &h, cons.position, 0)?;
        check_positions(&h, ctl.position, cons.position)?;
        Ok(Producer {
            crc: CommitCrc::new(&h, ctl.position),
            dev,
            h,
            ctl,
            written: ctl.position,
            staged: Vec::new(),
            crc_to: 0,
            consumer: cons.position,
            poisoned: false,
        })
    }

    /// Stop producing. Staged (pushed but not advanced) records are
    /// discarded; everything advanced stays in the ring.
    pub fn detach(self) -> D {
        self.dev
    }

    /// The committed position: everything before it is durable and visible.
    pub fn position(&self) -> u64 {
        self.ctl.position
    }

    /// Largest payload this ring can ever take.
    pub fn max_item(&self) -> u64 {
        let room = self.h.capacity() - self.h.sector_size as u64;
        (room - format::RECORD_HEADER).min(u32::MAX as u64 - 1)
    }

    fn end(&self) -> u64 {
        self.written + self.staged.len() as u64
    }

    fn guard(&self) -> Result<(), Error> {
        if self.poisoned {
            Err(Error::Poisoned)
        } else {
            Ok(())
        }
    }

    /// Stage `item` after the previously pushed ones and return its
    /// position. It becomes durable and visible only at the next
    /// [`advance`](Self::advance).
    ///
    /// Outcomes:
    /// - `Ok(position)`: staged.
    /// - [`Error::Retry`]: not enough free space now; push again after the
    ///   consumer has advanced (or advance first, if many items are staged).
    /// - [`Error::Suspended`]: the consumer asked to suspend (noticed at the
    ///   first push after an advance); push again after it resumes.
    /// - [`Error::TooBig`]: the item can never fit; do not retry.
    /// - [`Error::Poisoned`], [`Error::Io`], [`Error::Corrupt`]: attach again.
    ///   (`Corrupt` also when the ring has used up its u64 range of stream
    ///   positions, after carrying ~16 EiB; then it must be created anew.)
    pub fn push(&mut self, item: &[u8]) -> Result<u64, Error> {
        self.guard()?;
        let len = item.len() as u64;
        if len > self.max_item() {
            return Err(Error::TooBig {
                len,
                max: self.max_item(),
            });
        }
        if self.end() == self.ctl.position && self.poll_suspend()? == State::Suspended {
            return Err(Error::Suspended);
        }
        let size = format::record_size(len);
        let ss = self.h.sector_size as u64;
        let cap = self.h.capacity();
        if align_up(self.end() + size, ss) > position_limit(&self.h) {
            return Err(Error::Corrupt {
                position: None,
                what: "the ring has used up its range of stream positions".into(),
            });
        }
        let fits =
            |consumer: u64, end: u64| align_up(end + size, ss) <= align_down(consumer, ss) + cap;
        if !fits(self.consumer, self.end()) {
            let consumer = self.read_consumer()?.position;
            if !fits(consumer, self.end()) {
                self.consumer = consumer;
                return Err(Error::Retry);
            }
            // The consumer's advance may be written but not yet synced:
            // make it durable before overwriting the space it freed, or a
            // power loss could bring back a consumer position whose
            // records are gone.
            if let Err(e) = self.dev.sync() {
                self.poisoned = true;
                return Err(e.into());
            }
            self.consumer = consumer;
        }
        let pos = self.end();
        // One pass over the payload for both checksums (the record's and
        // the commit's), unless it is so short that combining costs more.
        let payload = (item.len() >= COMBINE_FROM).then(|| format::PayloadCrc::new(item));
        let crc = match &payload {
            Some(p) => p.record_crc(&self.h.uuid, pos, len as u32),
            None => format::record_crc(&self.h.uuid, pos, len as u32, item),
        };
        self.staged.extend_from_slice(&(len as u32).to_le_bytes());
        self.staged.extend_from_slice(&crc.to_le_bytes());
        if let Some(p) = &payload {
            // Sum what is pending, then this payload by combination.
            self.crc.update(&self.staged[self.crc_to..]);
            self.crc.combine(p);
            self.crc_to = self.staged.len() + item.len();
        }
        self.staged.extend_from_slice(item);
        self.staged.resize(
            self.staged.len() + (size - format::RECORD_HEADER - len) as usize,
            0,
        );
        if self.staged.len() >= FLUSH_AT {
            self.flush_whole_sectors()?;
        }
        Ok(pos)
    }

    fn flush_whole_sectors(&mut self) -> Result<(), Error> {
        let ss = self.h.sector_size as usize;
        let whole = self.staged.len() / ss * ss;
        if whole > 0 {
            if let Err(e) =
                format::write_stream(&self.dev, &self.h, self.written, &self.staged[..whole])
            {
                self.poisoned = true;
                return Err(e);
            }
            if self.crc_to < whole {
                self.crc.update(&self.staged[self.crc_to..whole]);
                self.crc_to = whole;
            }
            self.staged.drain(..whole);
            self.crc_to -= whole;
            self.written += whole as u64;
        }
        Ok(())
    }

    /// Commit every staged record: pad to a sector boundary, write the
    /// records and then the control block (which holds the checksum of
    /// everything this commit wrote), and sync once. Returns the new
    /// committed position (the consumer can read everything before it).
    /// A crash before the sync finishes leaves the commit whole or absent:
    /// readers check the last commit's data against its control block.
    ///
    /// Outcomes: `Ok(position)`; [`Error::Io`] (the records may or may not
    /// have become visible; this handle is poisoned: attach again and read
    /// [`position`](Self::position) to learn what is durable);
    /// [`Error::Poisoned`]; [`Error::Corrupt`] if the last control block's
    /// sequence number is the largest possible (a crafted device).
    pub fn advance(&mut self) -> Result<u64, Error> {
        self.guard()?;
        if self.end() == self.ctl.position {
            return Ok(self.ctl.position);
        }
        let seq = self.ctl.next_seq(Side::Producer)?;
        let ss = self.h.sector_size as u64;
        let end = self.end();
        let padded = align_up(end, ss);
        if padded > end {
            let crc = format::record_crc(&self.h.uuid, end, format::PAD, &[]);
            self.staged.extend_from_slice(&format::PAD.to_le_bytes());
            self.staged.extend_from_slice(&crc.to_le_bytes());
            self.staged.resize((padded - self.written) as usize, 0);
        }
        self.crc.update(&self.staged[self.crc_to..]);
        let crc = std::mem::replace(&mut self.crc, CommitCrc::new(&self.h, padded));
        let ctl = Control {
            seq,
            position: padded,
            flag: self.ctl.flag,
            start: self.ctl.position,
            data_crc: crc.finish(),
        };
        let result = (|| {
            format::write_stream(&self.dev, &self.h, self.written, &self.staged)?;
            ctl.write_unsynced(&self.dev, &self.h, Side::Producer)?;
            self.dev.sync()?;
            Ok(ctl)
        })();
        match result {
            Ok(ctl) => {
                self.ctl = ctl;
                self.written = padded;
                self.staged.clear();
                self.crc_to = 0;
                Ok(padded)
            }
            Err(e) => {
                self.poisoned = true;
                Err(e)
            }
        }
    }

    fn read_consumer(&mut self) -> Result<Control, Error> {
        let c = Control::read_consumer(&self.dev, &self.h)?;
        check_positions(&self.h, self.ctl.position, c.position)?;
        Ok(c)
    }

    /// Answer the consumer's suspend/resume request, if it changed.
    fn poll_suspend(&mut self) -> Result<State, Error> {
        // The consumer position read here is not taken for free space:
        // push does that, after making it durable.
        let c = self.read_consumer()?;
        if c.flag != self.ctl.flag {
            let ctl = Control {
                seq: self.ctl.next_seq(Side::Producer)?,
                position: self.ctl.position,
                flag: c.flag,
                start: self.ctl.position,
                data_crc: 0,
            };
            if let Err(e) = ctl.write(&self.dev, &self.h, Side::Producer) {
                self.poisoned = true;
                return Err(e);
            }
            self.ctl = ctl;
        }
        Ok(if self.ctl.flag {
            State::Suspended
        } else {
            State::Running
        })
    }

    /// Read the consumer's request and acknowledge it: returns
    /// [`State::Suspended`] once a suspend request is acknowledged,
    /// [`State::Running`] otherwise. Only with nothing staged: records
    /// staged before an acknowledgement would be committed after it, when
    /// the consumer relies on the producer being still. With records
    /// staged it reports the acknowledged state as it is; the next push
    /// after [`advance`](Self::advance) acknowledges. Errors:
    /// [`Error::Io`], [`Error::Corrupt`], [`Error::Poisoned`].
    pub fn state(&mut self) -> Result<State, Error> {
        self.guard()?;
        if self.end() != self.ctl.position {
            return Ok(if self.ctl.flag {
                State::Suspended
            } else {
                State::Running
            });
        }
        self.poll_suspend()
    }

    pub fn debug_info(&self) -> DebugInfo {
        DebugInfo {
            sector_size: self.h.sector_size,
            capacity: self.h.capacity(),
            uuid: self.h.uuid,
            position: self.ctl.position,
            cursor: self.end(),
            other: self.consumer,
            flag: self.ctl.flag,
            seq: self.ctl.seq,
        }
    }
}

/// The largest producer position: position arithmetic (a record's end, a
/// read-ahead window) must not overflow u64, so positions stay three
/// capacities and 1 MiB short of its end. A ring reaches this only after
/// carrying ~16 EiB.
fn position_limit(h: &Header) -> u64 {
    u64::MAX.saturating_sub(h.capacity().saturating_mul(3).saturating_add(1 << 20))
}

/// Positions read from disk must describe a possible ring.
pub(crate) fn check_positions(h: &Header, producer: u64, consumer: u64) -> Result<(), Error> {
    let bad = |what: String| {
        Err(Error::Corrupt {
            position: None,
            what,
        })
    };
    if producer % h.sector_size as u64 != 0 {
        return bad(format!(
            "producer position {producer} is not sector-aligned"
        ));
    }
    if consumer % format::RECORD_ALIGN != 0 {
        return bad(format!(
            "consumer position {consumer} is not record-aligned"
        ));
    }
    if consumer > producer {
        return bad(format!(
            "consumer position {consumer} is past producer position {producer}"
        ));
    }
    if producer > position_limit(h) {
        return bad(format!(
            "producer position {producer} is too close to the end of the position range"
        ));
    }
    if producer - consumer > h.capacity() {
        return bad(format!(
            "producer position {producer} is more than the capacity ahead of consumer position {consumer}"
        ));
    }
    Ok(())
}
