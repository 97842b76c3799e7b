//! The consumer side.

use crate::device::BlockDevice;
use crate::format::{self, Control, Header, Side};
use crate::producer::check_positions;
use crate::{align_down, align_up, DebugInfo, Error, State};

/// Bytes read ahead per device read when walking records.
const READ_AHEAD: u64 = 256 << 10;

/// One record read from the ring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// Stream position of the record.
    pub position: u64,
    /// Position just after it: pass this to [`Consumer::advance`] to free
    /// the record (and everything before it).
    pub next: u64,
    pub data: Vec<u8>,
}

/// The consumer of a ring: one per ring at a time.
pub struct Consumer<D: BlockDevice> {
    dev: D,
    h: Header,
    /// Last control block written (its position is the freed position).
    ctl: Control,
    /// Where the next `pop` reads.
    cursor: u64,
    /// Producer's committed position and suspend acknowledgement, as last read.
    producer: Control,
    /// Read-ahead window of the stream: `cache` holds `[cache_at, cache_at + len)`.
    cache_at: u64,
    cache: Vec<u8>,
}

impl<D: BlockDevice> Consumer<D> {
    /// Attach to the ring on `dev` as its consumer. It syncs the device
    /// first, so the state it reports is durable even if an earlier
    /// handle's write reached the device but its sync failed. The read
    /// cursor starts at the freed position (so records popped but not
    /// advanced past before a crash are delivered again).
    ///
    /// Errors: [`Error::NotARing`], [`Error::Corrupt`], [`Error::Io`].
    pub fn attach(dev: D) -> Result<Consumer<D>, Error> {
        // Sync first: what attach reports must be durable, even if an
        // earlier handle's write reached the device but its sync failed.
        dev.sync()?;
        let h = Header::read(&dev)?;
        let ctl = Control::read_consumer(&dev, &h)?;
        let producer = Control::read_producer(&dev, &h, ctl.position, 0)?;
        check_positions(&h, producer.position, ctl.position)?;
        Ok(Consumer {
            dev,
            h,
            ctl,
            cursor: ctl.position,
            producer,
            cache_at: 0,
            cache: Vec::new(),
        })
    }

    /// Stop consuming; nothing is written.
    pub fn detach(self) -> D {
        self.dev
    }

    /// The freed position: everything before it has been consumed.
    pub fn position(&self) -> u64 {
        self.ctl.position
    }

    /// Where the next [`pop`](Self::pop) reads.
    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    fn refresh_producer(&mut self) -> Result<(), Error> {
        // Commits up to the position already read were validated then.
        let p = Control::read_producer(
            &self.dev,
            &self.h,
            self.ctl.position,
            self.producer.position,
        )?;
        check_positions(&self.h, p.position, self.ctl.position)?;
        if p.position < self.producer.position {
            return Err(Error::Corrupt {
                position: None,
                what: format!(
                    "producer position went back from {} to {}",
                    self.producer.position, p.position
                ),
            });
        }
        self.producer = p;
        Ok(())
    }

    /// `len` bytes of the stream at `pos`, which lie before the producer's
    /// committed position (so they cannot change under us).
    fn bytes(&mut self, pos: u64, len: u64) -> Result<&[u8], Error> {
        let end = pos + len;
        if pos < self.cache_at || end > self.cache_at + self.cache.len() as u64 {
            let ss = self.h.sector_size as u64;
            let start = align_down(pos, ss);
            let stop = align_up(end.max(start + READ_AHEAD), ss).min(self.producer.position);
            debug_assert!(stop >= end && stop - start <= self.h.capacity());
            self.cache.resize((stop - start) as usize, 0);
            if let Err(e) = format::read_stream(&self.dev, &self.h, start, &mut self.cache) {
                self.cache.clear();
                return Err(e);
            }
            self.cache_at = start;
        }
        let o = (pos - self.cache_at) as usize;
        Ok(&self.cache[o..o + len as usize])
    }

    /// Read the next committed record at the cursor and move the cursor
    /// past it. Does not free space: call [`advance`](Self::advance).
    ///
    /// Outcomes:
    /// - `Ok(item)`.
    /// - [`Error::Retry`]: no committed record after the cursor; pop again
    ///   after the producer advances.
    /// - [`Error::Corrupt`] with the record's position: the record failed
    ///   its checks; nothing is returned and the cursor stays put.
    /// - [`Error::Io`].
    pub fn pop(&mut self) -> Result<Item, Error> {
        self.pop_with(|position, next, data| Item {
            position,
            next,
            data: data.to_vec(),
        })
    }

    /// [`pop`](Self::pop), handing the record to `f` as `(position, next,
    /// data)` in place instead of copying it into an [`Item`]: for a caller
    /// that decodes the record anyway. The outcomes are those of `pop`; on
    /// an error `f` is not called.
    pub fn pop_with<T>(&mut self, f: impl FnOnce(u64, u64, &[u8]) -> T) -> Result<T, Error> {
        loop {
            if self.cursor == self.producer.position {
                self.refresh_producer()?;
                if self.cursor == self.producer.position {
                    return Err(Error::Retry);
                }
            }
            let pos = self.cursor;
            let avail = self.producer.position - pos;
            let corrupt = |what: String| Error::Corrupt {
                position: Some(pos),
                what,
            };
            if avail < format::RECORD_HEADER {
                return Err(corrupt(format!(
                    "{avail} bytes left before the producer position: no room for a record header"
                )));
            }
            let head = self.bytes(pos, format::RECORD_HEADER)?;
            let len = u32::from_le_bytes(head[0..4].try_into().unwrap());
            let crc = u32::from_le_bytes(head[4..8].try_into().unwrap());
            if len == format::PAD {
                if crc != format::record_crc(&self.h.uuid, pos, len, &[]) {
                    return Err(corrupt("padding record fails its checksum".into()));
                }
                self.cursor =
                    align_up(pos + 1, self.h.sector_size as u64).min(self.producer.position);
                continue;
            }
            let size = format::record_size(len as u64);
            if size > avail {
                return Err(corrupt(format!(
                    "record length {len} runs past the producer position ({avail} bytes left)"
                )));
            }
            let uuid = self.h.uuid;
            let payload = self.bytes(pos + format::RECORD_HEADER, len as u64)?;
            if crc != format::record_crc(&uuid, pos, len, payload) {
                return Err(corrupt(format!(
                    "record of {len} bytes fails its checksum (torn or stale write)"
                )));
            }
            let out = f(pos, pos + size, payload);
            self.cursor = pos + size;
            return Ok(out);
        }
    }

    /// Move the read cursor to `position`, which must lie between the freed
    /// position and the producer's committed position and be a record
    /// boundary returned earlier (`Item::position` or `Item::next`); the
    /// next [`pop`](Self::pop) reads there. A position that is not a record
    /// boundary makes that pop fail with [`Error::Corrupt`], never return
    /// garbage. Errors: [`Error::Invalid`].
    pub fn seek(&mut self, position: u64) -> Result<(), Error> {
        if position < self.ctl.position
            || position > self.producer.position
            || position % format::RECORD_ALIGN != 0
        {
            return Err(Error::Invalid(format!(
                "position {position} is not a record position between {} and {}",
                self.ctl.position, self.producer.position
            )));
        }
        self.cursor = position;
        Ok(())
    }

    /// Pop every committed record after the cursor, folding them with `f`.
    /// Returns the accumulator and the cursor after the last record (pass
    /// it to [`advance`](Self::advance) to free them). An empty ring is not
    /// an error. Errors as for [`pop`](Self::pop), except `Retry`.
    pub fn fold<A>(&mut self, init: A, mut f: impl FnMut(A, Item) -> A) -> Result<(A, u64), Error> {
        let mut acc = init;
        loop {
            match self.pop() {
                Ok(item) => acc = f(acc, item),
                Err(Error::Retry) => return Ok((acc, self.cursor)),
                Err(e) => return Err(e),
            }
        }
    }

    /// Free everything before `position` durably: the device is synced
    /// (so every commit read so far is durable), then the control block is
    /// written and synced. `position` must be a record boundary between
    /// the freed position and the cursor.
    ///
    /// Outcomes: `Ok(())`; [`Error::Invalid`] for a position outside that
    /// range; [`Error::Io`] (nothing is known to be freed; retrying is safe);
    /// [`Error::Corrupt`] if the control block's sequence number is the
    /// largest possible (a crafted device).
    pub fn advance(&mut self, position: u64) -> Result<(), Error> {
        if position < self.ctl.position
            || position > self.cursor
            || position % format::RECORD_ALIGN != 0
        {
            return Err(Error::Invalid(format!(
                "cannot free up to {position}: must be a record boundary between {} and the cursor {}",
                self.ctl.position, self.cursor
            )));
        }
        // The records before `position` may belong to a commit whose own
        // sync has not finished (the consumer reads what the producer has
        // written). Sync first: a power loss during the control block's
        // sync below could otherwise keep that block but not the commit's
        // data, and readers trust a commit the consumer position is past
        // (FORMAT.md, "Reading the producer's control block").
        if position > self.ctl.position {
            self.dev.sync()?;
        }
        self.write_control(position, self.ctl.flag)
    }

    fn write_control(&mut self, position: u64, flag: bool) -> Result<(), Error> {
        let ctl = Control {
            seq: self.ctl.next_seq(Side::Consumer)?,
            position,
            flag,
            ..Control::default()
        };
        ctl.write(&self.dev, &self.h, Side::Consumer)?;
        self.ctl = ctl;
        Ok(())
    }

    /// Ask the producer to suspend. The request is durable on return; the
    /// producer acknowledges it at its next push after an advance (or at a
    /// [`Producer::state`](crate::Producer::state) with nothing staged),
    /// after which [`state`](Self::state) says [`State::Suspended`].
    ///
    /// Outcomes: `Ok(())` (also if already requested); [`Error::Retry`]
    /// while an earlier resume is not yet acknowledged; [`Error::Io`];
    /// [`Error::Corrupt`] as for [`advance`](Self::advance).
    pub fn suspend(&mut self) -> Result<(), Error> {
        if self.ctl.flag {
            return Ok(());
        }
        self.refresh_producer()?;
        if self.producer.flag {
            return Err(Error::Retry);
        }
        self.write_control(self.ctl.position, true)
    }

    /// Withdraw a suspend request. Outcomes: `Ok(())` (also if not
    /// suspended); [`Error::Retry`] while the suspend request is not yet
    /// acknowledged; [`Error::Io`]; [`Error::Corrupt`] as for
    /// [`advance`](Self::advance).
    pub fn resume(&mut self) -> Result<(), Error> {
        if !self.ctl.flag {
            return Ok(());
        }
        self.refresh_producer()?;
        if !self.producer.flag {
            return Err(Error::Retry);
        }
        self.write_control(self.ctl.position, false)
    }

    /// [`State::Suspended`] once the producer has acknowledged a suspend
    /// request, else [`State::Running`]. Errors: [`Error::Io`],
    /// [`Error::Corrupt`].
    pub fn state(&mut self) -> Result<State, Error> {
        self.refresh_producer()?;
        Ok(if self.producer.flag {
            State::Suspended
        } else {
            State::Running
        })
    }

    pub fn debug_info(&self) -> DebugInfo {
        DebugInfo {
            sector_size: self.h.sector_size,
            capacity: self.h.capacity(),
            uuid: self.h.uuid,
            position: self.ctl.position,
            cursor: self.cursor,
            other: self.producer.position,
            flag: self.ctl.flag,
            seq: self.ctl.seq,
        }
    }
}
