//! The console ring file: a guest's console output in a file of fixed
//! size, written by `tt-host run --console-log=PATH`, read by anyone who
//! may read the file (the daemon), during the run or after it.
//!
//! # Layout
//!
//! A [`Header`] of [`HEADER_SIZE`] bytes (magic, version, capacity, and
//! `written`: how many bytes were ever appended), then a data area of
//! `capacity` bytes, in which byte `p` of the stream lives at
//! `p % capacity`. The file is exactly `HEADER_SIZE + capacity` bytes.
//!
//! The stream is a sequence of records, each
//! `<unix time in ns, decimal><flag><bytes>\n`: the flag is `' '` for a
//! line the guest ended with `'\n'`, and `'+'` for a piece of a line the
//! guest has not ended (a prompt; the next record continues it, and a
//! line longer than [`ConsoleRing::max_piece`] is cut into pieces too).
//! `bytes` never holds `'\n'`, so every record boundary is right after a
//! `'\n'`, which is how a reader finds one again after the writer
//! overwrote what it was reading.
//!
//! # Publication
//!
//! The writer first stores `writing`, the end of what it is about to
//! append, then copies whole records into the data area, then stores the
//! new `written` with release ordering: `written` is always a record
//! boundary, and every byte below it is in. The bytes below
//! `writing - capacity` may have been overwritten.
//!
//! # Reading
//!
//! [`ConsoleLog::read_from`] reads `written`, copies what it wants, reads
//! `written` again and drops whatever the writer may have overwritten
//! meanwhile (counted in [`Chunk::lost`]): it never returns a torn or
//! overwritten record.

use super::{create_mapped, now_ns, read_at};
use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// The first bytes of a console ring file.
pub const MAGIC: [u8; 8] = *b"TTCONSLG";
/// The layout version this code writes and reads.
pub const VERSION: u32 = 1;
/// Default data capacity (`--console-log-size`): 1 MiB.
pub const DEFAULT_CAPACITY: u64 = 1 << 20;
/// Smallest data capacity: 4 KiB.
pub const MIN_CAPACITY: u64 = 4 << 10;
/// Largest data capacity: 64 MiB.
pub const MAX_CAPACITY: u64 = 64 << 20;
/// Most stream bytes one [`ConsoleLog::read_from`] copies (and about the
/// most record bytes one [`Chunk`] holds).
pub const MAX_CHUNK: u64 = 256 << 10;
/// Most bytes of guest output in one record (less for rings under
/// 64 KiB: a quarter of the capacity); longer lines are cut into `'+'`
/// pieces.
pub const MAX_PIECE: usize = 16 << 10;
/// Digits of the longest time stamp (`u64::MAX`).
const TIME_DIGITS: usize = 20;

/// The header of a console ring file, at offset 0.
#[repr(C)]
pub struct Header {
    pub magic: [u8; 8],
    pub version: u32,
    /// Size of this header: where the data area starts.
    pub header_size: u32,
    /// Bytes in the data area.
    pub capacity: u64,
    /// Stream bytes ever appended; published (release) after the bytes.
    pub written: AtomicU64,
    /// The end of the append in progress (`written` when none): stored
    /// before its bytes, so a reader that saw any of them sees it.
    pub writing: AtomicU64,
    pub reserved: [u64; 3],
}

/// Bytes before the data area.
pub const HEADER_SIZE: usize = std::mem::size_of::<Header>();
const _: () = assert!(HEADER_SIZE == 64);

/// What went wrong with a console ring file; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("console log {path}: {err}")]
    Io {
        path: String,
        #[source]
        err: std::io::Error,
    },
    #[error(
        "console log size {0}: expected a number of bytes from {MIN_CAPACITY} (4 KiB) to \
         {MAX_CAPACITY} (64 MiB)"
    )]
    Capacity(u64),
    #[error("console log {path}: not a tt-host console log (wrong magic bytes)")]
    Magic { path: String },
    #[error(
        "console log {path}: layout version {version}, this tt-host reads version {VERSION} \
         (a newer tt-host wrote it)"
    )]
    Version { path: String, version: u32 },
    #[error(
        "console log {path}: its header says {capacity} data bytes after a {header}-byte \
         header, but the file has {len} bytes (damaged or truncated)"
    )]
    Size {
        path: String,
        header: u32,
        capacity: u64,
        len: u64,
    },
    #[error(
        "console log {path}: position {pos} is past the end of the log ({end}): the log was \
         started again by a new run; read it again from 0"
    )]
    Ahead { path: String, pos: u64, end: u64 },
}

/// The writer: a mapped console ring file that `tt-host run` appends the
/// guest's output to. It never blocks (a memory copy), so it serves
/// [`crate::modules::console::Console::new`] directly.
pub struct ConsoleRing {
    /// Start of the mapping: the header, then the data area.
    base: *mut u8,
    capacity: u64,
    /// Stream bytes appended (the next byte's position).
    pos: u64,
}

// SAFETY: the mapping is owned by this writer alone (never unmapped, no
// other reference to it in this process); moving it to another thread
// moves that ownership.
unsafe impl Send for ConsoleRing {}

impl ConsoleRing {
    /// Create (or truncate) the ring file at `path`, mode 0600, with a
    /// data area of `capacity` bytes ([`MIN_CAPACITY`] to
    /// [`MAX_CAPACITY`]), empty.
    pub fn create(path: &Path, capacity: u64) -> Result<ConsoleRing, ConsoleError> {
        if !(MIN_CAPACITY..=MAX_CAPACITY).contains(&capacity) {
            return Err(ConsoleError::Capacity(capacity));
        }
        let base = create_mapped(path, HEADER_SIZE + capacity as usize).map_err(|err| {
            ConsoleError::Io {
                path: path.display().to_string(),
                err,
            }
        })?;
        let header = Header {
            magic: MAGIC,
            version: VERSION,
            header_size: HEADER_SIZE as u32,
            capacity,
            written: AtomicU64::new(0),
            writing: AtomicU64::new(0),
            reserved: [0; 3],
        };
        // SAFETY: the mapping is at least HEADER_SIZE bytes, page-aligned,
        // and only this writer uses it.
        unsafe { std::ptr::write(base.cast::<Header>(), header) };
        Ok(ConsoleRing {
            base,
            capacity,
            pos: 0,
        })
    }

    /// Go on appending to the ring file at `path` if it is one of
    /// `capacity` bytes (a unikernel started again keeps one console
    /// across its runs), else make a new one: written beside it and
    /// renamed over it, so that a reader holding the old file never sees
    /// it shrink.
    pub fn open_or_create(path: &Path, capacity: u64) -> Result<ConsoleRing, ConsoleError> {
        if !(MIN_CAPACITY..=MAX_CAPACITY).contains(&capacity) {
            return Err(ConsoleError::Capacity(capacity));
        }
        let io = |err| ConsoleError::Io {
            path: path.display().to_string(),
            err,
        };
        if let Some(ring) = Self::reopen(path, capacity).map_err(io)? {
            return Ok(ring);
        }
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".new");
        let tmp = std::path::PathBuf::from(tmp);
        let ring = Self::create(&tmp, capacity)?;
        std::fs::rename(&tmp, path).map_err(io)?;
        Ok(ring)
    }

    /// The ring at `path`, mapped to go on at its `written`, if it is a
    /// regular file with this layout and `capacity`; `None` otherwise.
    fn reopen(path: &Path, capacity: u64) -> std::io::Result<Option<ConsoleRing>> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            // A link or something else odd: replaced by a new ring.
            Err(_) => return Ok(None),
        };
        let meta = file.metadata()?;
        let len = HEADER_SIZE as u64 + capacity;
        if !meta.is_file() || meta.len() != len {
            return Ok(None);
        }
        let mut raw = [0u8; HEADER_SIZE];
        read_at(&file, &mut raw, 0)?;
        // SAFETY: `raw` holds HEADER_SIZE bytes and every bit pattern is a
        // valid `Header` (integers, atomic integers, byte arrays).
        let h: Header = unsafe { std::ptr::read_unaligned(raw.as_ptr().cast()) };
        if h.magic != MAGIC
            || h.version != VERSION
            || h.header_size as usize != HEADER_SIZE
            || h.capacity != capacity
        {
            return Ok(None);
        }
        // SAFETY: a new shared mapping of the whole file, whose size was
        // just checked; no Rust object aliases it.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(&file),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let ring = ConsoleRing {
            base: ptr.cast(),
            capacity,
            pos: 0,
        };
        // An append the last writer did not finish (it was killed) may
        // have left torn bytes past `written`: the next append overwrites
        // them, and announces it in `writing` first, as every append does.
        let written = ring.header().written.load(Ordering::Acquire);
        ring.header().writing.store(written, Ordering::Relaxed);
        Ok(Some(ConsoleRing {
            pos: written,
            ..ring
        }))
    }

    /// The most guest bytes one record holds in this ring.
    pub fn max_piece(&self) -> usize {
        MAX_PIECE.min(self.capacity as usize / 4)
    }

    fn header(&self) -> &Header {
        // SAFETY: the header was written at `base` by `create` and lives
        // as long as the mapping (the process); its only mutable fields
        // are atomics.
        unsafe { &*self.base.cast::<Header>() }
    }

    /// Copy `bytes` to the stream at `self.pos`, wrapping around.
    fn put(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let at = (self.pos % self.capacity) as usize;
            let n = bytes.len().min(self.capacity as usize - at);
            // SAFETY: `at + n <= capacity`: inside the data area, which
            // no Rust reference covers.
            unsafe {
                std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.base.add(HEADER_SIZE + at), n)
            };
            self.pos += n as u64;
            bytes = &bytes[n..];
        }
    }

    /// Append one record (`bytes` without `'\n'`).
    fn record(&mut self, stamp: &[u8], partial: bool, bytes: &[u8]) {
        self.put(stamp);
        self.put(if partial { b"+" } else { b" " });
        self.put(bytes);
        self.put(b"\n");
    }

    /// Append `out` (guest output, any bytes) as records stamped `time_ns`,
    /// and publish them.
    pub fn append(&mut self, time_ns: u64, out: &[u8]) {
        let mut digits = [0u8; TIME_DIGITS];
        let stamp = decimal(time_ns, &mut digits);
        let max = self.max_piece();
        // Announce how far this append writes, then write it, then
        // publish it.
        let mut len = 0;
        records(out, max, |piece, _| {
            len += (stamp.len() + piece.len() + 2) as u64
        });
        self.header()
            .writing
            .store(self.pos + len, Ordering::Relaxed);
        std::sync::atomic::fence(Ordering::Release);
        records(out, max, |piece, partial| {
            self.record(stamp, partial, piece)
        });
        self.header().written.store(self.pos, Ordering::Release);
    }
}

impl std::io::Write for ConsoleRing {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.append(now_ns(), buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Cut guest output `out` into records of at most `max` bytes: `each`
/// gets each one's bytes and whether it is partial (not a line's end).
fn records(out: &[u8], max: usize, mut each: impl FnMut(&[u8], bool)) {
    let mut rest = out;
    while !rest.is_empty() {
        let (line, ended, next) = match rest.iter().position(|&b| b == b'\n') {
            Some(i) => (&rest[..i], true, &rest[i + 1..]),
            None => (rest, false, &[][..]),
        };
        if line.is_empty() {
            // An empty line: one record with no bytes.
            each(b"", false);
        }
        let mut pieces = line.chunks(max).peekable();
        while let Some(p) = pieces.next() {
            let last = pieces.peek().is_none();
            each(p, !(last && ended));
        }
        rest = next;
    }
}

/// `n` in decimal, in `buf`.
fn decimal(mut n: u64, buf: &mut [u8; TIME_DIGITS]) -> &[u8] {
    let mut i = TIME_DIGITS;
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

/// One record of the console: a line or a piece of one.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Record {
    /// When tt-host took the output from the guest (Unix time, ns).
    pub time_ns: u64,
    /// A piece of a line the guest had not ended: the next record
    /// continues it.
    pub partial: bool,
    /// The guest's bytes, without the `'\n'`.
    #[serde(with = "serde_bytes")]
    pub bytes: Vec<u8>,
}

/// What one read of the log returned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Chunk {
    /// Whole records, in order.
    pub records: Vec<Record>,
    /// The stream position to read from next (a record boundary).
    pub next: u64,
    /// Stream bytes skipped since the position asked for: overwritten by
    /// the writer before they were read, or damaged records.
    pub lost: u64,
}

/// A reader of a console ring file; it holds the file open (a new run of
/// the same unikernel truncates it: reads then fail with
/// [`ConsoleError::Ahead`] or [`ConsoleError::Size`]; open it again).
pub struct ConsoleLog {
    file: File,
    path: String,
    capacity: u64,
}

impl ConsoleLog {
    /// Open the console ring file at `path` and check its header.
    pub fn open(path: &Path) -> Result<ConsoleLog, ConsoleError> {
        let p = path.display().to_string();
        let file = File::open(path).map_err(|err| ConsoleError::Io {
            path: p.clone(),
            err,
        })?;
        let mut log = ConsoleLog {
            file,
            path: p,
            capacity: 0,
        };
        log.capacity = log.header()?.0;
        Ok(log)
    }

    fn io(&self, err: std::io::Error) -> ConsoleError {
        ConsoleError::Io {
            path: self.path.clone(),
            err,
        }
    }

    /// The header's capacity, `written` and `writing`, checked against
    /// the file.
    fn header(&self) -> Result<(u64, u64, u64), ConsoleError> {
        let mut raw = [0u8; HEADER_SIZE];
        let len = self.file.metadata().map_err(|e| self.io(e))?.len();
        read_at(&self.file, &mut raw, 0).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => ConsoleError::Size {
                path: self.path.clone(),
                header: HEADER_SIZE as u32,
                capacity: 0,
                len,
            },
            _ => self.io(e),
        })?;
        // SAFETY: `raw` holds HEADER_SIZE bytes and every bit pattern is a
        // valid `Header` (integers, an atomic integer, byte arrays).
        let h: Header = unsafe { std::ptr::read_unaligned(raw.as_ptr().cast()) };
        if h.magic != MAGIC {
            return Err(ConsoleError::Magic {
                path: self.path.clone(),
            });
        }
        if h.version != VERSION {
            return Err(ConsoleError::Version {
                path: self.path.clone(),
                version: h.version,
            });
        }
        let fits = h.header_size as usize == HEADER_SIZE
            && (MIN_CAPACITY..=MAX_CAPACITY).contains(&h.capacity)
            && HEADER_SIZE as u64 + h.capacity == len
            && (self.capacity == 0 || self.capacity == h.capacity);
        if !fits {
            return Err(ConsoleError::Size {
                path: self.path.clone(),
                header: h.header_size,
                capacity: h.capacity,
                len,
            });
        }
        let written = h.written.load(Ordering::Relaxed);
        Ok((
            h.capacity,
            written,
            h.writing.load(Ordering::Relaxed).max(written),
        ))
    }

    /// Is this the file at `path` now (not one renamed over it since)?
    pub fn is_current(&self, path: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        match (self.file.metadata(), std::fs::metadata(path)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        }
    }

    /// The data area's size.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The current end of the stream (`written`): a record boundary, where
    /// the next record will start.
    pub fn end(&self) -> Result<u64, ConsoleError> {
        Ok(self.header()?.1)
    }

    /// Copy stream bytes `[from, from + buf.len())` (within the ring).
    fn copy(&self, from: u64, buf: &mut [u8]) -> Result<(), ConsoleError> {
        let at = (from % self.capacity) as usize;
        let first = buf.len().min(self.capacity as usize - at);
        let (a, b) = buf.split_at_mut(first);
        read_at(&self.file, a, (HEADER_SIZE + at) as u64).map_err(|e| self.io(e))?;
        read_at(&self.file, b, HEADER_SIZE as u64).map_err(|e| self.io(e))
    }

    /// Whole records from stream position `pos` on (0, or a `next` this
    /// log returned), at most about [`MAX_CHUNK`] bytes of them. Records
    /// the writer overwrote before they were read are skipped and counted
    /// in `lost`; an empty chunk with `next == pos` means nothing new.
    pub fn read_from(&self, pos: u64) -> Result<Chunk, ConsoleError> {
        self.read(pos, true)
    }

    /// [`read_from`](Self::read_from); `aligned`: is `pos` known to be a
    /// record boundary?
    fn read(&self, pos: u64, aligned: bool) -> Result<Chunk, ConsoleError> {
        let cap = self.capacity;
        let (_, w1, _) = self.header()?;
        if pos > w1 {
            return Err(ConsoleError::Ahead {
                path: self.path.clone(),
                pos,
                end: w1,
            });
        }
        let start = pos.max(w1.saturating_sub(cap));
        let end = w1.min(start + MAX_CHUNK);
        let mut buf = vec![0u8; (end - start) as usize];
        self.copy(start, &mut buf)?;
        let (_, _, writing) = self.header()?;
        // What the writer may have overwritten while we copied, including
        // the append it is in the middle of.
        let valid = start.max(writing.saturating_sub(cap));
        let mut at = valid;
        let mut data = &buf[(valid.min(end) - start) as usize..];
        if !aligned || valid != pos {
            // Resynchronise: the next record starts after a '\n'.
            match data.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    at += i as u64 + 1;
                    data = &data[i + 1..];
                }
                None if w1 >= writing.saturating_sub(cap) => {
                    // No boundary in what is left, all of it valid: the
                    // bytes up to `written` (a boundary) are a record's
                    // tail.
                    return Ok(Chunk {
                        records: vec![],
                        next: w1,
                        lost: w1 - pos,
                    });
                }
                None => {
                    // The append in progress may overwrite all we copied.
                    // Nothing is known lost yet: what it publishes is read
                    // on the next call, from where the ring then starts
                    // (jumping to the new `written` would skip that whole append,
                    // which stays readable).
                    return Ok(Chunk {
                        records: vec![],
                        next: pos,
                        lost: 0,
                    });
                }
            }
        }
        let mut lost = at - pos;
        let mut records = Vec::new();
        while let Some(i) = data.iter().position(|&b| b == b'\n') {
            match parse_record(&data[..i]) {
                Some(r) => records.push(r),
                None => lost += i as u64 + 1,
            }
            at += i as u64 + 1;
            data = &data[i + 1..];
        }
        if !data.is_empty() && (end == w1 || data.len() as u64 >= MAX_CHUNK / 2) {
            // Not a record's start cut by MAX_CHUNK: damaged; skip it.
            lost += data.len() as u64;
            at += data.len() as u64;
        }
        Ok(Chunk {
            records,
            next: at,
            lost,
        })
    }

    /// Read from the oldest byte still in the ring to the current end,
    /// handing each chunk's records to `each` until it returns false.
    /// Returns the position after the last chunk read and the bytes lost.
    fn scan(&self, mut each: impl FnMut(Vec<Record>) -> bool) -> Result<(u64, u64), ConsoleError> {
        let end = self.end()?;
        let mut pos = end.saturating_sub(self.capacity);
        let mut aligned = pos == 0;
        let mut lost = 0;
        while pos < end {
            let c = self.read(pos, aligned)?;
            aligned = true;
            lost += c.lost;
            let more = c.next > pos && each(c.records);
            pos = c.next;
            if !more {
                break;
            }
        }
        Ok((pos, lost))
    }

    /// The last `n` lines in the ring (a line is its `'+'` pieces and the
    /// record that ends it; a line the guest has not ended yet counts as
    /// one). `next` is where to follow from.
    pub fn last(&self, n: usize) -> Result<Chunk, ConsoleError> {
        let mut kept = std::collections::VecDeque::new();
        let mut ended = 0usize;
        let (next, lost) = self.scan(|records| {
            for r in records {
                ended += usize::from(!r.partial);
                kept.push_back(r);
                let open = kept.back().is_some_and(|r: &Record| r.partial);
                while ended + usize::from(open) > n {
                    match kept.pop_front() {
                        Some(r) if !r.partial => ended -= 1,
                        Some(_) => {}
                        None => break,
                    }
                    if kept.is_empty() {
                        break;
                    }
                }
            }
            true
        })?;
        Ok(Chunk {
            records: kept.into(),
            next,
            lost,
        })
    }

    /// The records stamped at or after `time_ns` (and all after the first
    /// of them), at most about [`MAX_CHUNK`] bytes: continue with
    /// [`read_from`](Self::read_from)`(next)`.
    pub fn since(&self, time_ns: u64) -> Result<Chunk, ConsoleError> {
        let mut found = Vec::new();
        let mut bytes = 0u64;
        let (next, lost) = self.scan(|records| {
            for r in records {
                if found.is_empty() && r.time_ns < time_ns {
                    continue;
                }
                bytes += r.bytes.len() as u64 + TIME_DIGITS as u64 + 2;
                found.push(r);
            }
            bytes < MAX_CHUNK
        })?;
        Ok(Chunk {
            records: found,
            next,
            lost,
        })
    }
}

/// A record without its `'\n'`: `<digits><' ' or '+'><bytes>`.
fn parse_record(r: &[u8]) -> Option<Record> {
    let digits = r.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || digits > TIME_DIGITS {
        return None;
    }
    let time_ns = std::str::from_utf8(&r[..digits]).ok()?.parse().ok()?;
    let partial = match r.get(digits)? {
        b' ' => false,
        b'+' => true,
        _ => return None,
    };
    Some(Record {
        time_ns,
        partial,
        bytes: r[digits + 1..].to_vec(),
    })
}
