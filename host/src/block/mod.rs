//! The block layer: one request type, one validation and one backend
//! interface for every guest block device (the hvt `BLOCK_*` hypercalls
//! today, virtio-blk next).
//!
//! # Shape
//!
//! A device decodes its guest's request into a [`Request`] (checked once,
//! by [`Geometry::span`]: see [`request`]) and hands it to a [`Backend`]
//! with [`Backend::submit`] and a `user_data` of its choice (a virtio
//! descriptor head). The backend completes requests in any order: each
//! completion is queued, and the backend's [`event`](Backend::event) (an
//! eventfd) becomes readable; the device then takes them with
//! [`Backend::poll`]. A device with one request in flight (hvt: one vCPU,
//! one hypercall) uses [`Backend::execute`] instead, which returns the
//! outcome directly and takes the fastest path the backend has.
//! [`Backend::shutdown`] drains and syncs at halt; its error names the
//! device.
//!
//! Two backends:
//! - [`FileBackend`] (`--block-durability=none`): `pwrite`/`pread` on the
//!   image, completed at once; a write is in the page cache when it
//!   completes, and FLUSH is an `fdatasync`. solo5-hvt's behaviour.
//! - [`JournaledBackend`] (`--block-durability=journal`, the default): a
//!   write completes only once it is durable in a tt-journal on a tt-ring;
//!   the journal applies it to the image in the background. See
//!   [`journaled`] for reads of unapplied data, atomicity and sequence
//!   numbers, and [`home`] for where journals live and how an image finds
//!   its own.
//!
//! # For the device that uses it
//!
//! [`home::open`] (journal) or [`home::open_plain`] (`none`) locks the
//! image and returns the backend; [`home::list`], [`home::find`],
//! [`home::drain`] and [`home::discard`] are `tt-host journal`. An hvt
//! adapter reads the argument struct, checks `(offset, len)` with
//! [`Geometry::span`] before it touches guest memory ([`RequestError`]:
//! `EINVAL`), copies the data, and calls [`Backend::execute`]; an
//! [`Error`] is `EUNSPEC`. At halt or signal it calls
//! [`Backend::shutdown`]; an error there (it names the device) exits 1.
//! Dropping a journaled backend without `shutdown` leaves what is
//! unapplied in the journal, to be replayed at the next open.
//!
//! # Semantics a guest may rely on (for docs/ABI.md)
//!
//! - A request is served only at a sector-aligned offset, for a whole,
//!   non-zero number of sectors, ending inside the device; anything else
//!   is refused before any byte is read or written (hvt: `EINVAL`).
//! - A read returns the data of every write that has completed before it
//!   was submitted, whether or not the journal has applied it to the
//!   image yet. Requests in flight together (virtio) have no order.
//! - `journal` mode: a completed write is durable. After a power cut,
//!   host crash or `kill -9` it is on the image once tt-host has started
//!   again (the journal is replayed before the guest boots). A write that
//!   had not completed may be absent, or present in part: every sector it
//!   covers holds either its old or its new contents, never a mix, and
//!   all of a write of up to [`Info::max_atomic_write`] bytes is present
//!   or none of it (1/8 of the journal's size, at most 8 MiB: 8 MiB with
//!   the default 64 MiB journal; see [`journaled::record_limit`]). A
//!   larger write is cut into ordered pieces of that size; after a crash a
//!   prefix of them may be present. FLUSH completes at once (all that
//!   completed is durable already).
//! - `none` mode: a completed write is in the host's page cache; it
//!   survives a crash of tt-host but not of the host; FLUSH (virtio) makes
//!   it durable, and so does a clean halt. The hvt ABI has no flush.
//!
//! # Where journals live (for README)
//!
//! Each image's journal is a ring file plus a small JSON file in
//! `<state-dir>/journals/`, named after the image's identity (file-system
//! id and inode), not beside the image: albatross lists every file of its
//! block directory as a disk. Every durable write costs one journal commit
//! (an `fdatasync` of the ring, shared by writes in flight together), and
//! the journal's applier writes it to the image later and syncs the image
//! once per batch (it gathers for up to 20 ms); `--block-durability=none`
//! turns this off. If an image changed behind a journal that still holds
//! writes (another size, or another file at its path), tt-host refuses to
//! start on it and names both and the commands below. `tt-host journal list` shows
//! every journal, `drain IMAGE` applies one to its image, `discard IMAGE`
//! throws one away. The image is `flock`ed while in use: a second tt-host
//! on the same image, through any path, is refused.

pub mod file;
pub mod home;
pub mod journaled;
pub mod request;

pub use file::FileBackend;
pub use journaled::JournaledBackend;
pub use request::{Geometry, Request, RequestError, Span, Write};

use std::collections::VecDeque;
use std::sync::Mutex;
use vm_memory::VolatileSlice;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Length of a device identifier (virtio-blk `GET_ID`).
pub const ID_LEN: usize = tt_hvt_abi::virtio::blk::ID_LEN;

/// What a device needs to know about its backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    /// The device's name (the manifest's), for messages.
    pub name: String,
    /// What requests are checked against.
    pub geometry: Geometry,
    /// Identifier returned by [`Request::GetId`].
    pub id: [u8; ID_LEN],
    /// Is a completed write durable (journal), or only written (plain)?
    pub durable_writes: bool,
    /// The largest write that is all-or-nothing after a crash (a whole
    /// number of sectors). Larger writes are accepted and split. A
    /// device may also split guest requests at this size to bound how
    /// much guest data it copies at once.
    pub max_atomic_write: u64,
}

/// A completed request's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// The data read, exactly as long as the request's span.
    Read(Vec<u8>),
    Written,
    Flushed,
    Id([u8; ID_LEN]),
}

/// One completion: the `user_data` given to [`Backend::submit`] and the
/// outcome.
#[derive(Debug)]
pub struct Completion {
    pub user_data: u64,
    pub result: Result<Response, Error>,
}

/// Why a request or a backend operation failed. Each names the device. A
/// failed request's data may or may not have reached the image (hvt:
/// `EUNSPEC`, virtio: `VIRTIO_BLK_S_IOERR`), but a failed write is never
/// reported as done.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("block device '{device}': {what}: {source}")]
    Io {
        device: String,
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("block device '{device}': the journal failed: {source}")]
    Journal {
        device: String,
        #[source]
        source: tt_journal::Error,
    },
    #[error("block device '{device}': {source}")]
    Request {
        device: String,
        #[source]
        source: RequestError,
    },
    #[error("block device '{device}' is shut down")]
    ShutDown { device: String },
    #[error(
        "block device '{device}': execute() called with {in_flight} requests in flight; \
         poll their completions first"
    )]
    Busy { device: String, in_flight: usize },
    #[error(
        "block device '{device}': {pending} acknowledged writes could not be applied to \
         {image} ({why}); they are safe in the journal and are applied when tt-host next \
         opens the image, or by `{command}`"
    )]
    Drain {
        device: String,
        image: String,
        pending: usize,
        why: String,
        /// The command that drains the journal.
        command: Box<str>,
    },
    #[error(
        "block device '{device}': a journal of {ring} bytes is too small for {sector}-byte \
         sectors; give it at least {min} bytes"
    )]
    RingTooSmall {
        device: String,
        ring: u64,
        sector: u64,
        min: u64,
    },
    #[error(
        "block device '{device}': the writes left in its journal could not be applied to \
         {image} ({why}); they stay in the journal: once the image can be written, start \
         again or run `{command}`"
    )]
    Replay {
        device: String,
        image: String,
        why: String,
        /// The command that drains the journal.
        command: Box<str>,
    },
    #[error("block device '{device}': cannot create the completion eventfd: {source}")]
    EventFd {
        device: String,
        #[source]
        source: std::io::Error,
    },
}

/// Storage a block device serves requests from.
///
/// Contract:
/// - [`submit`](Self::submit) takes a checked request and returns at once
///   (it may do the work first, as the plain backend does). It fails only
///   if the backend takes no more requests (shut down, broken); a request
///   that fails later completes with an error. The caller bounds how many
///   requests it keeps in flight (its queue size).
/// - Every submitted request completes exactly once. Completions are
///   queued and [`event`](Self::event) is signalled; [`poll`](Self::poll)
///   takes them (and resets the event). Completions come in any order.
/// - [`execute`](Self::execute) serves one request synchronously; only
///   with nothing in flight ([`Error::Busy`] otherwise).
/// - [`shutdown`](Self::shutdown) waits for requests in flight, makes
///   every completed write durable on the image (draining a journal) and
///   stops; later calls fail with [`Error::ShutDown`]. Calling it again
///   returns `Ok`.
pub trait Backend: Send {
    fn info(&self) -> &Info;
    fn submit(&mut self, user_data: u64, request: Request) -> Result<(), Error>;
    /// Append every queued completion to `out`; returns how many.
    fn poll(&mut self, out: &mut Vec<Completion>) -> usize;
    /// Readable (non-blocking eventfd) while completions may be queued:
    /// add it to a poll set.
    fn event(&self) -> &EventFd;
    /// Submitted requests whose completion [`poll`](Self::poll) has not
    /// returned yet.
    fn in_flight(&self) -> usize;
    fn execute(&mut self, request: Request) -> Result<Response, Error>;
    /// Serve a read at once, straight into `dst`: its buffers in order,
    /// `span.len()` bytes in all (guest memory, for a device that has it
    /// mapped). No host buffer and no completion: the data crosses once,
    /// from the page cache to `dst`. It sees what a read through
    /// [`submit`](Self::submit) would: every write submitted before it.
    /// Allowed with requests in flight.
    fn read_into(&mut self, span: Span, dst: &[VolatileSlice<'_>]) -> Result<(), Error>;
    fn shutdown(&mut self) -> Result<(), Error>;
    /// Make every completed write durable on the image (draining a
    /// journal) and keep serving: for a snapshot, with nothing in flight.
    fn quiesce(&mut self) -> Result<(), Error>;
    /// The image's file, when it is one: its identity goes in a snapshot.
    fn image_file(&self) -> Option<&std::fs::File> {
        None
    }
    /// The descriptors whose `flock`s keep other tt-hosts off the image
    /// and its journal: a migration lets go of them (`LOCK_UN`) while the
    /// target takes the device over, and takes them again if it fails.
    fn lock_fds(&self) -> Vec<std::os::fd::RawFd> {
        Vec::new()
    }
    /// After [`quiesce`](Self::quiesce), with nothing submitted since:
    /// write nothing to the image or its journal until
    /// [`resume`](Self::resume) (a migration's target may own them
    /// meanwhile).
    fn suspend(&mut self) -> Result<(), Error> {
        Ok(())
    }
    /// Serve again after [`suspend`](Self::suspend).
    fn resume(&mut self) -> Result<(), Error> {
        Ok(())
    }
}

/// A queue of completions and the eventfd that announces them. Shared by
/// a backend and the threads that complete its requests.
pub(crate) struct Completions {
    queue: Mutex<VecDeque<Completion>>,
    event: EventFd,
}

impl Completions {
    pub(crate) fn new(device: &str) -> Result<Completions, Error> {
        Ok(Completions {
            queue: Mutex::new(VecDeque::new()),
            event: EventFd::new(EFD_NONBLOCK).map_err(|source| Error::EventFd {
                device: device.into(),
                source,
            })?,
        })
    }

    /// Queue a completion, then signal (in that order: a poller that
    /// resets the event before draining never misses one).
    pub(crate) fn post(&self, c: Completion) {
        lock(&self.queue).push_back(c);
        // Fails only if the counter would overflow (it is reset by every
        // poll), and then the event is readable anyway.
        let _ = self.event.write(1);
    }

    /// Queue every completion of `batch` (emptied), then signal once: a
    /// batch wakes the device once, not once per request.
    pub(crate) fn post_all(&self, batch: &mut Vec<Completion>) {
        if batch.is_empty() {
            return;
        }
        lock(&self.queue).extend(batch.drain(..));
        let _ = self.event.write(1);
    }

    pub(crate) fn drain(&self, out: &mut Vec<Completion>) -> usize {
        // Reset first: a completion posted after this is signalled again.
        let _ = self.event.read();
        let mut q = lock(&self.queue);
        let n = q.len();
        out.extend(q.drain(..));
        n
    }

    pub(crate) fn event(&self) -> &EventFd {
        &self.event
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section leaves its data consistent; a panic elsewhere
    // does not make it unusable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The bytes an image is stored in: positioned reads and writes and a
/// data sync. `std::fs::File` is one; tests use a model disk that loses
/// unsynced writes.
pub trait Image: Send + Sync + 'static {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()>;
    fn sync_data(&self) -> std::io::Result<()>;
    /// The file, if the image is one.
    fn as_file(&self) -> Option<&std::fs::File> {
        None
    }
    /// Fill `dst` from `offset`. By default through a host buffer; a file
    /// reads straight into it.
    fn read_into_at(&self, dst: &VolatileSlice<'_>, offset: u64) -> std::io::Result<()> {
        let mut buf = vec![0u8; dst.len()];
        self.read_at(&mut buf, offset)?;
        dst.copy_from(&buf);
        Ok(())
    }
}

impl Image for std::fs::File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(self, buf, offset)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        std::fs::File::sync_data(self)
    }
    fn as_file(&self) -> Option<&std::fs::File> {
        Some(self)
    }
    fn read_into_at(&self, dst: &VolatileSlice<'_>, offset: u64) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        let len = dst.len();
        let guard = dst.ptr_guard_mut();
        let mut done = 0usize;
        while done < len {
            let at = offset
                .checked_add(done as u64)
                .and_then(|a| libc::off_t::try_from(a).ok())
                .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
            // SAFETY: the guard keeps `dst`'s mapping alive and its pointer
            // valid for `len` bytes; `pread` writes at most `len - done`
            // bytes from `done` on, inside it. The memory is volatile
            // (a guest may change it): nothing here reads it as Rust data.
            let n = unsafe {
                libc::pread(
                    self.as_raw_fd(),
                    guard.as_ptr().add(done).cast(),
                    len - done,
                    at,
                )
            };
            match n {
                n if n > 0 => done += n as usize,
                0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                _ => {
                    let e = std::io::Error::last_os_error();
                    if e.kind() != std::io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }
}

/// Read `span` of `image` into `dst` (exactly `span.len()` bytes in all):
/// the common part of [`Backend::read_into`].
pub(crate) fn read_image_into<I: Image>(
    info: &Info,
    image: &I,
    span: Span,
    dst: &[VolatileSlice<'_>],
) -> Result<(), Error> {
    let total: u64 = dst.iter().map(|d| d.len() as u64).sum();
    if total != span.len() {
        return Err(Error::Request {
            device: info.name.clone(),
            source: RequestError::DataLength {
                span: span.len(),
                data: total,
            },
        });
    }
    let mut at = span.offset();
    for d in dst {
        image.read_into_at(d, at).map_err(|source| Error::Io {
            device: info.name.clone(),
            what: format!("read {:#x}+{:#x}", span.offset(), span.len()),
            source,
        })?;
        at += d.len() as u64;
    }
    Ok(())
}

/// Copy `data` into the concatenation of `dst`, from its byte `at` on
/// (what lies beyond its end is dropped).
pub(crate) fn scatter(dst: &[VolatileSlice<'_>], mut at: usize, mut data: &[u8]) {
    for d in dst {
        if data.is_empty() {
            break;
        }
        if at >= d.len() {
            at -= d.len();
            continue;
        }
        let n = (d.len() - at).min(data.len());
        if let Ok(s) = d.subslice(at, n) {
            s.copy_from(&data[..n]);
        }
        data = &data[n..];
        at = 0;
    }
}

/// A 20-byte identifier from a file's identity (`ID_LEN` bytes, zero
/// padded, as virtio-blk's GET_ID wants): "tt" then hex of the file
/// system id and inode, cut to fit.
pub fn id_from_identity(fs_id: u64, ino: u64) -> [u8; ID_LEN] {
    let s = format!("tt{:x}-{:x}", fs_id & 0xffff_ffff, ino);
    let mut id = [0u8; ID_LEN];
    let n = s.len().min(ID_LEN);
    id[..n].copy_from_slice(&s.as_bytes()[..n]);
    id
}

#[cfg(test)]
pub(crate) mod testing;
