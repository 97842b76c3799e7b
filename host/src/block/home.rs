//! Where an image's journal lives, how an image finds it, and the
//! `tt-host journal list | drain | discard` operations.
//!
//! # Home
//!
//! Journals live in one directory the caller names (tt-host passes
//! `<state-dir>/journals`), never beside the image. Each image has two
//! files there, named after its [`Identity`]: `<key>.ring`, a tt-ring of
//! the size asked for when it was created, and `<key>.json`, its
//! [`Meta`]data (the image's path, for messages and for `journal
//! discard` of a vanished image; its size; the floor of sequence
//! numbers), replaced crash-safely (temporary file, `fdatasync`, rename,
//! directory `fsync`).
//!
//! An image's identity is the file system's id (`statvfs` `f_fsid`; where
//! that is 0, as on FUSE, the device number) and the inode. A device
//! number alone changes on remount; a path alone misses hard links and
//! would replay onto whatever file now has the name.
//!
//! # Opening
//!
//! [`open`] locks the image (`flock(LOCK_EX | LOCK_NB)` on the descriptor
//! the backend then uses, so the lock lasts the whole run): a second
//! opener through any path, hard link or symlink is refused with
//! [`HomeError::Locked`]. An image that cannot be written is refused
//! here, before the guest runs, not at its first write: one whose owner
//! has no write permission bit, even for root ([`HomeError::NotWritable`]),
//! one on a read-only mount or a read-only block device
//! ([`HomeError::ReadOnly`]). The ring file is locked the same way (so `journal
//! drain` and `discard` never run under a live tt-host). If the ring holds
//! unapplied records, they are replayed into the image before `open`
//! returns, that is before the guest boots, unless the image no longer is
//! the one they were written for: a size other than the metadata's, or
//! another journal recorded for the same path with another identity (the
//! file was replaced) refuses with [`HomeError::Changed`], which names
//! both and the commands that resolve it. An empty journal is re-bound to
//! the image as it is now. A journal whose ring is empty and whose size
//! differs from the one asked for is recreated at the new size.

use super::journaled::{Options, SeqLease};
use super::{id_from_identity, FileBackend, Geometry, Info, JournaledBackend};
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tt_ring::{BlockDevice, Consumer, FileDevice, Producer};

/// Default size of a journal's ring.
pub const DEFAULT_RING_SIZE: u64 = 64 << 20;

/// Sequence numbers are reserved in blocks of this many: the metadata
/// file is rewritten once per block (and once per open).
const SEQ_BLOCK: u64 = 1 << 32;

/// Which number identifies the file system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsIdKind {
    /// `statvfs` `f_fsid`.
    Fsid,
    /// `st_dev`: the file system reports no `f_fsid` (FUSE).
    Dev,
}

/// What a journal is found by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Identity {
    pub fs_kind: FsIdKind,
    pub fs_id: u64,
    pub ino: u64,
    /// The file's birth time (`statx` `STATX_BTIME`: seconds and
    /// nanoseconds), where the file system keeps one. An inode number is
    /// reused as soon as its file is deleted (ext4 gives the next new file
    /// the freed one), so a file deleted and made again at the same path
    /// has the same file system and inode; its birth time tells them apart.
    /// `None` where the file system has none (FUSE, older kernels): then
    /// such a file cannot be told from the old one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub born: Option<(i64, u32)>,
}

/// The birth time of an open file, if its file system keeps one.
fn birth_time(file: &File) -> Option<(i64, u32)> {
    // SAFETY: statx is plain data; zeroed is a valid value.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor, an empty NUL-terminated path with
    // AT_EMPTY_PATH (the descriptor itself), and a live statx to fill.
    let r = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_BTIME,
            &mut st,
        )
    };
    (r == 0 && st.stx_mask & libc::STATX_BTIME != 0)
        .then_some((st.stx_btime.tv_sec, st.stx_btime.tv_nsec))
}

impl Identity {
    /// The identity of an open file.
    pub fn of(file: &File) -> io::Result<Identity> {
        use std::os::unix::fs::MetadataExt;
        let meta = file.metadata()?;
        // SAFETY: statvfs is plain data; zeroed is a valid value, and
        // fstatvfs fills it for a valid descriptor.
        let mut vfs: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: a valid descriptor and a pointer to a live statvfs.
        if unsafe { libc::fstatvfs(file.as_raw_fd(), &mut vfs) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let fsid = vfs.f_fsid as u64;
        let born = birth_time(file);
        Ok(if fsid != 0 {
            Identity {
                fs_kind: FsIdKind::Fsid,
                fs_id: fsid,
                ino: meta.ino(),
                born,
            }
        } else {
            Identity {
                fs_kind: FsIdKind::Dev,
                fs_id: meta.dev(),
                ino: meta.ino(),
                born,
            }
        })
    }

    /// The journal's file name stem.
    pub fn key(&self) -> String {
        let k = match self.fs_kind {
            FsIdKind::Fsid => "fsid",
            FsIdKind::Dev => "dev",
        };
        format!("{k}-{:016x}-{:x}", self.fs_id, self.ino)
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let k = match self.fs_kind {
            FsIdKind::Fsid => "file system",
            FsIdKind::Dev => "device",
        };
        write!(f, "{k} {:#x}, inode {}", self.fs_id, self.ino)?;
        if let Some((s, ns)) = self.born {
            write!(f, ", born {s}.{ns:09}")?;
        }
        Ok(())
    }
}

/// The metadata file beside each ring.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    pub version: u32,
    /// The image's path when last opened (canonical).
    pub path: String,
    pub identity: Identity,
    /// The image's size in bytes when last opened.
    pub size: u64,
    /// Sequence numbers below this may have been used.
    pub seq_floor: u64,
}

/// Why a journal could not be opened, listed, drained or discarded.
#[derive(Debug, thiserror::Error)]
pub enum HomeError {
    #[error("block image {path}: cannot open it: {source}")]
    Open {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("block image {path} is {what}, not a regular file or block device")]
    NotAFile { path: String, what: &'static str },
    /// `--block:NAME=@FD` names a descriptor tt-host does not have open.
    #[error(
        "block image fd {fd}: the descriptor is not open (the launcher must pass the open \
         image to tt-host without FD_CLOEXEC)"
    )]
    FdNotOpen { fd: RawFd },
    /// `--block:NAME=@FD` names a descriptor not open for reading and writing.
    #[error(
        "block image fd {fd} is open {mode}; tt-host opens block images read-write and \
         refuses read-only ones: pass a descriptor opened O_RDWR"
    )]
    FdNotReadWrite { fd: RawFd, mode: &'static str },
    /// The owner's write permission bit is clear: refused even for root,
    /// who could open it anyway.
    #[error(
        "block image {path} is read-only (mode {mode:04o}: no write permission for its \
         owner); tt-host opens block images read-write and refuses read-only ones, even \
         as root: `chmod u+w {path}` if the guest may write it"
    )]
    NotWritable { path: String, mode: u32 },
    /// On a read-only mount, or a read-only block device.
    #[error(
        "block image {path} is {what}; tt-host opens block images read-write and refuses \
         read-only ones at start: {fix}"
    )]
    ReadOnly {
        path: String,
        what: &'static str,
        fix: &'static str,
    },
    #[error(
        "block image {path} is {size} bytes: it must be a whole, non-zero number of \
         {sector}-byte sectors"
    )]
    Size {
        path: String,
        size: u64,
        sector: u64,
    },
    #[error(
        "block image {path} is in use by another tt-host (it is locked; a hard link or \
         symlink to it is the same image): stop that one first, or give this guest a copy"
    )]
    Locked { path: String },
    #[error(
        "the journal {journal} of block image {path} is in use by another tt-host: \
         stop that one first"
    )]
    JournalInUse { path: String, journal: String },
    /// The image is not the one the journal's records were written for.
    #[error(transparent)]
    Changed(Box<Mismatch>),
    #[error("block image {path} has no journal in {dir}")]
    NoJournal { path: String, dir: String },
    #[error("journal directory {dir}: {source}")]
    Dir {
        dir: String,
        #[source]
        source: io::Error,
    },
    #[error("journal metadata {path}: {source}")]
    Meta {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("journal {path}: {source}")]
    Ring {
        path: String,
        #[source]
        source: tt_ring::Error,
    },
    #[error(transparent)]
    Block(#[from] super::Error),
}

/// A journal with unapplied records and an image that does not match it.
#[derive(Debug, thiserror::Error)]
#[error(
    "block image {image} ({now}) does not match its journal {journal} ({was}), which \
     holds {pending} unapplied writes: {why}. tt-host never applies them to a different \
     disk. {fix}"
)]
pub struct Mismatch {
    pub image: String,
    pub now: String,
    pub journal: String,
    pub was: String,
    pub pending: u64,
    pub why: String,
    pub fix: String,
}

/// An image opened read-write and locked for as long as `file` is open.
pub struct LockedImage {
    pub file: File,
    /// As given, for messages (`fd N (PATH)` for a descriptor).
    pub path: PathBuf,
    /// The descriptor it was given as (`--block:NAME=@FD`), if it was.
    pub fd: Option<RawFd>,
    /// Canonical, for the metadata.
    pub canonical: PathBuf,
    pub identity: Identity,
    pub size: u64,
}

fn file_kind(meta: &std::fs::Metadata) -> Option<&'static str> {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_file() || t.is_block_device() {
        None
    } else if t.is_dir() {
        Some("a directory")
    } else if t.is_fifo() {
        Some("a FIFO")
    } else if t.is_char_device() {
        Some("a character device")
    } else if t.is_socket() {
        Some("a socket")
    } else {
        Some("something else")
    }
}

/// Open `path` read-only if it is a regular file or block device (a FIFO
/// would block the open).
fn open_if_file(path: &Path) -> Option<File> {
    let meta = std::fs::metadata(path).ok()?;
    if file_kind(&meta).is_some() {
        return None;
    }
    File::open(path).ok()
}

fn flock_nb(f: &File) -> io::Result<bool> {
    // SAFETY: flock on a valid descriptor.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// Refuse what `lock_image` must not open read-write: anything but a
/// regular file or block device, and one whose owner may not write it
/// (`chmod a-w` marks an image read-only; root's open would succeed).
fn check_openable(path: &str, meta: &std::fs::Metadata) -> Result<(), HomeError> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(what) = file_kind(meta) {
        return Err(HomeError::NotAFile {
            path: path.into(),
            what,
        });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o200 == 0 {
        return Err(HomeError::NotWritable {
            path: path.into(),
            mode,
        });
    }
    Ok(())
}

/// Is the block device open as `file` read-only (`BLKROGET`)? Writes to
/// it would fail only once the guest makes one.
fn block_device_read_only(file: &File) -> io::Result<bool> {
    /// `_IO(0x12, 94)` from linux/fs.h.
    const BLKROGET: libc::c_ulong = 0x125e;
    let mut ro: libc::c_int = 0;
    // SAFETY: BLKROGET writes one int through the pointer, which points to
    // `ro`, alive for the call.
    if unsafe { libc::ioctl(file.as_raw_fd(), BLKROGET as _, &mut ro) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ro != 0)
}

/// Open `path` read-write and lock it; refused if another holder has it
/// locked (through any path), if it is not writable (see
/// [`HomeError::NotWritable`]), or if it is read-only below the file: on a
/// read-only mount, or a read-only block device ([`HomeError::ReadOnly`]).
pub fn lock_image(path: &Path) -> Result<LockedImage, HomeError> {
    use std::os::unix::fs::FileTypeExt;
    let p = path.display().to_string();
    let open_err = |source| HomeError::Open {
        path: p.clone(),
        source,
    };
    // stat first: opening a FIFO would block.
    check_openable(&p, &std::fs::metadata(path).map_err(open_err)?)?;
    let file = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::EROFS) => {
            return Err(HomeError::ReadOnly {
                path: p,
                what: "on a read-only file system",
                fix: "remount it read-write, or copy the image to a writable one",
            })
        }
        Err(e) => return Err(open_err(e)),
    };
    let meta = file.metadata().map_err(open_err)?;
    check_openable(&p, &meta)?;
    if meta.file_type().is_block_device() && block_device_read_only(&file).map_err(open_err)? {
        return Err(HomeError::ReadOnly {
            path: p,
            what: "a read-only block device",
            fix: "`blockdev --setrw` it if the guest may write it",
        });
    }
    if !flock_nb(&file).map_err(open_err)? {
        return Err(HomeError::Locked { path: p });
    }
    let size = std::io::Seek::seek(&mut &file, std::io::SeekFrom::End(0)).map_err(open_err)?;
    let identity = Identity::of(&file).map_err(open_err)?;
    let canonical = std::fs::canonicalize(path).map_err(open_err)?;
    Ok(LockedImage {
        file,
        path: path.to_path_buf(),
        fd: None,
        canonical,
        identity,
        size,
    })
}

/// A duplicate of descriptor `fd` (`--block:NAME=@FD`) if it can back a
/// block device: open, for reading and writing (a read-only descriptor is
/// refused, as a read-only image is), and a regular file or block device.
/// `fd` itself stays open; the duplicate shares its open file (its lock
/// and offset) and is closed on exec.
pub fn image_fd(fd: RawFd) -> Result<File, HomeError> {
    // SAFETY: F_GETFL takes no pointer; on a closed or negative fd it
    // fails EBADF.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if fd < 0 || flags < 0 {
        return Err(HomeError::FdNotOpen { fd });
    }
    // SAFETY: fd is open (checked above) and stays open while borrowed:
    // nothing here closes it.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let label = format!("fd {fd}");
    let open_err = |source| HomeError::Open {
        path: label.clone(),
        source,
    };
    let file: File = borrowed.try_clone_to_owned().map_err(open_err)?.into();
    if let Some(what) = file_kind(&file.metadata().map_err(open_err)?) {
        return Err(HomeError::NotAFile { path: label, what });
    }
    match flags & libc::O_ACCMODE {
        libc::O_RDWR => Ok(file),
        libc::O_WRONLY => Err(HomeError::FdNotReadWrite {
            fd,
            mode: "write-only",
        }),
        _ => Err(HomeError::FdNotReadWrite {
            fd,
            mode: "read-only",
        }),
    }
}

/// [`lock_image`] for an image a launcher opened read-write and passed as
/// descriptor `fd` (`--block:NAME=@FD`): the same checks, lock, size and
/// identity, from the descriptor. Messages name it `fd N (PATH)`, with
/// the path the kernel has for it; that path is its canonical one for the
/// journal's metadata.
pub fn lock_image_fd(fd: RawFd) -> Result<LockedImage, HomeError> {
    use std::os::unix::fs::FileTypeExt;
    let file = image_fd(fd)?;
    let known = std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .ok()
        .filter(|p| p.is_absolute() && !p.to_string_lossy().ends_with(" (deleted)"));
    let (path, canonical) = match known {
        Some(p) => (PathBuf::from(format!("fd {fd} ({})", p.display())), p),
        None => (
            PathBuf::from(format!("fd {fd}")),
            PathBuf::from(format!("fd {fd}")),
        ),
    };
    let p = path.display().to_string();
    let open_err = |source| HomeError::Open {
        path: p.clone(),
        source,
    };
    let meta = file.metadata().map_err(open_err)?;
    check_openable(&p, &meta)?;
    if meta.file_type().is_block_device() && block_device_read_only(&file).map_err(open_err)? {
        return Err(HomeError::ReadOnly {
            path: p,
            what: "a read-only block device",
            fix: "`blockdev --setrw` it if the guest may write it",
        });
    }
    if !flock_nb(&file).map_err(open_err)? {
        return Err(HomeError::Locked { path: p });
    }
    // The offset is shared with `fd`; every backend reads and writes at
    // explicit offsets.
    let size = std::io::Seek::seek(&mut &file, std::io::SeekFrom::End(0)).map_err(open_err)?;
    let identity = Identity::of(&file).map_err(open_err)?;
    Ok(LockedImage {
        file,
        path,
        fd: Some(fd),
        canonical,
        identity,
        size,
    })
}

impl LockedImage {
    /// The image as `tt-host journal` commands name it: its path, or for a
    /// descriptor the path the kernel has for it.
    fn command_path(&self) -> &Path {
        match self.fd {
            Some(_) => &self.canonical,
            None => &self.path,
        }
    }
}

fn check_size(img: &LockedImage, sector: u64) -> Result<Geometry, HomeError> {
    if img.size == 0 || sector == 0 || img.size % sector != 0 {
        return Err(HomeError::Size {
            path: img.path.display().to_string(),
            size: img.size,
            sector,
        });
    }
    Ok(Geometry {
        capacity: img.size,
        sector_size: sector,
    })
}

/// Open an image for `--block-durability=none`: locked, served by the
/// plain backend.
pub fn open_plain(device: &str, image: &Path, sector: u64) -> Result<FileBackend, HomeError> {
    open_plain_locked(device, lock_image(image)?, sector)
}

/// [`open_plain`] for an image already locked ([`lock_image`],
/// [`lock_image_fd`]).
pub fn open_plain_locked(
    device: &str,
    img: LockedImage,
    sector: u64,
) -> Result<FileBackend, HomeError> {
    let geometry = check_size(&img, sector)?;
    let info = Info {
        name: device.into(),
        geometry,
        id: id_from_identity(img.identity.fs_id, img.identity.ino),
        durable_writes: false,
        max_atomic_write: sector,
    };
    Ok(FileBackend::new(info, Arc::new(img.file))?)
}

/// How to open a journal.
#[derive(Debug, Clone, Copy)]
pub struct JournalOptions {
    /// Size of the ring file when it is created (or recreated empty).
    pub ring_size: u64,
    pub backend: Options,
}

impl Default for JournalOptions {
    fn default() -> Self {
        JournalOptions {
            ring_size: DEFAULT_RING_SIZE,
            backend: Options::default(),
        }
    }
}

/// The files of one journal.
struct Files {
    ring: PathBuf,
    meta: PathBuf,
}

fn files(dir: &Path, key: &str) -> Files {
    Files {
        ring: dir.join(format!("{key}.ring")),
        meta: dir.join(format!("{key}.json")),
    }
}

fn read_meta(path: &Path) -> Result<Option<Meta>, HomeError> {
    let err = |source| HomeError::Meta {
        path: path.display().to_string(),
        source,
    };
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| err(io::Error::new(io::ErrorKind::InvalidData, e))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(err(e)),
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Remove, best effort, every journal in `dir` other than `keep` that
/// holds no unapplied writes, is not in use, and whose image is gone (no
/// file at its path, or another file). One that holds writes is never
/// removed: `tt-host journal list` shows it, and `discard` removes it.
fn remove_stale(dir: &Path, keep: &str) {
    let Ok(all) = all_journals(dir) else { return };
    let mut removed = false;
    for (key, meta) in all {
        let Some(meta) = meta else { continue };
        let gone = match open_if_file(Path::new(&meta.path)) {
            None => !Path::new(&meta.path).exists(),
            Some(f) => Identity::of(&f).is_ok_and(|id| id != meta.identity),
        };
        if key == keep || !gone {
            continue;
        }
        let f = files(dir, &key);
        let Ok(ring) = OpenOptions::new().read(true).write(true).open(&f.ring) else {
            continue;
        };
        // Held for the check and the removal: no tt-host opens it meanwhile.
        if !flock_nb(&ring).unwrap_or(false) {
            continue;
        }
        if inspect(&f.ring).is_ok_and(|s| s.records == 0) {
            removed |= std::fs::remove_file(&f.meta).is_ok();
            removed |= std::fs::remove_file(&f.ring).is_ok();
        }
    }
    if removed {
        let _ = sync_dir(dir);
    }
}

/// Create `dir` and its missing parents durably: each new directory is
/// synced, and so is the parent that holds its entry (otherwise a power
/// cut can take the directory away with every journal in it, though each
/// ring and metadata file in it was synced). Each is made 0700, and `dir`
/// must be the user's own, writable by no one else (the state
/// directory's rules: [`crate::admission::create_private_dir`]).
fn create_dir_durable(dir: &Path) -> io::Result<()> {
    crate::admission::create_private_dir(dir)
}

/// Replace `path` with `meta` crash-safely: temporary file, fdatasync,
/// rename, directory fsync.
fn write_meta(path: &Path, meta: &Meta) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("json.tmp");
    let body = serde_json::to_vec_pretty(meta).map_err(io::Error::other)?;
    {
        let mut f = File::create(&tmp)?;
        io::Write::write_all(&mut f, &body)?;
        f.sync_data()?;
    }
    std::fs::rename(&tmp, path)?;
    sync_dir(dir)
}

/// The metadata file as the backend's floor of sequence numbers.
struct MetaLease {
    path: PathBuf,
    meta: Meta,
}

impl SeqLease for MetaLease {
    fn reserve(&mut self, from: u64) -> io::Result<u64> {
        let limit = from.saturating_add(SEQ_BLOCK);
        let mut m = self.meta.clone();
        m.seq_floor = limit;
        write_meta(&self.path, &m)?;
        self.meta = m;
        Ok(limit)
    }
}

/// What a ring holds, without replaying it.
struct RingState {
    sector: u32,
    size: u64,
    records: u64,
    bytes: u64,
}

fn ring_err(path: &Path) -> impl Fn(tt_ring::Error) -> HomeError + '_ {
    move |source| HomeError::Ring {
        path: path.display().to_string(),
        source,
    }
}

/// The ring's sector size, from its header (tt-ring checks the header
/// against the device's sector size, so try the sizes tt-host makes
/// first, then the other powers of two).
fn ring_sector(path: &Path) -> Result<u32, HomeError> {
    let mut last = None;
    for sector in [512u32, 4096, 1024, 2048, 8192, 16384, 32768, 65536] {
        let dev = FileDevice::open(path, sector).map_err(|e| ring_err(path)(e.into()))?;
        match tt_ring::format::Header::read(&dev) {
            Ok(h) => return Ok(h.sector_size),
            Err(e) => last = Some(e),
        }
    }
    Err(ring_err(path)(last.unwrap_or_else(|| {
        tt_ring::Error::NotARing("no sector size fits".into())
    })))
}

fn inspect(path: &Path) -> Result<RingState, HomeError> {
    let sector = ring_sector(path)?;
    let dev = FileDevice::open(path, sector).map_err(|e| ring_err(path)(e.into()))?;
    let size = dev.size();
    let mut c = Consumer::attach(dev).map_err(ring_err(path))?;
    let start = c.position();
    let (records, end) = c.fold(0u64, |n, _| n + 1).map_err(ring_err(path))?;
    Ok(RingState {
        sector,
        size,
        records,
        bytes: end - start,
    })
}

/// Create an empty ring of `size` bytes at `path` (replacing any file).
fn create_ring(path: &Path, size: u64, sector: u32) -> Result<(), HomeError> {
    let dev = FileDevice::create(path, size, sector).map_err(|e| ring_err(path)(e.into()))?;
    Producer::create(&dev).map_err(ring_err(path))
}

/// Lock the ring file at `path` (it must exist).
fn lock_ring(path: &Path, image: &Path) -> Result<File, HomeError> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| ring_err(path)(e.into()))?;
    if !flock_nb(&f).map_err(|e| ring_err(path)(e.into()))? {
        return Err(HomeError::JournalInUse {
            path: image.display().to_string(),
            journal: path.display().to_string(),
        });
    }
    Ok(f)
}

fn dir_err(dir: &Path) -> impl Fn(io::Error) -> HomeError + '_ {
    move |source| HomeError::Dir {
        dir: dir.display().to_string(),
        source,
    }
}

/// Every journal's metadata in `dir`: (key, meta or None if unreadable).
fn all_journals(dir: &Path) -> Result<Vec<(String, Option<Meta>)>, HomeError> {
    let mut out = Vec::new();
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(dir_err(dir)(e)),
    };
    for entry in rd {
        let entry = entry.map_err(dir_err(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(key) = name.strip_suffix(".ring") {
            let meta = read_meta(&dir.join(format!("{key}.json"))).ok().flatten();
            out.push((key.to_string(), meta));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Another journal recorded for the same path, for another file, that
/// still holds records: the image at this path was replaced.
fn replaced(dir: &Path, img: &LockedImage) -> Result<Option<(String, Meta, u64)>, HomeError> {
    let path = img.canonical.display().to_string();
    for (key, meta) in all_journals(dir)? {
        let Some(meta) = meta else { continue };
        if meta.path != path || meta.identity == img.identity {
            continue;
        }
        let ring = files(dir, &key).ring;
        if let Ok(st) = inspect(&ring) {
            if st.records > 0 {
                return Ok(Some((ring.display().to_string(), meta, st.records)));
            }
        }
    }
    Ok(None)
}

/// `tt-host journal VERB IMAGE` for the journals in `dir`, with the
/// state directory when it is not the one tt-host finds by default.
fn journal_command(dir: &Path, verb: &str, image: &Path) -> String {
    let state = dir.parent().unwrap_or(dir);
    let default = crate::admission::StateDir::resolve(None);
    let arg = if state == default.path() {
        String::new()
    } else {
        format!(" --state-dir={}", state.display())
    };
    format!("tt-host journal {verb} {}{arg}", image.display())
}

fn replaced_error(
    dir: &Path,
    img: &LockedImage,
    journal: String,
    meta: &Meta,
    pending: u64,
) -> HomeError {
    let p = img.path.display();
    HomeError::Changed(Box::new(Mismatch {
        image: p.to_string(),
        now: img.identity.to_string(),
        journal,
        was: format!("{}, {}", meta.path, meta.identity),
        pending,
        why: "the file at this path is not the one the journal was written for".into(),
        fix: format!(
            "Put the original file back at {p} and start again, or throw the writes away \
             with `{}`",
            journal_command(dir, "discard", img.command_path())
        ),
    }))
}

/// Open `image` as block device `device` (sector size `sector`) on its
/// journal in `dir`: lock it, replay what its journal holds, and serve
/// it. See the module doc.
pub fn open(
    dir: &Path,
    device: &str,
    image: &Path,
    sector: u64,
    opts: &JournalOptions,
) -> Result<JournaledBackend<FileDevice, File>, HomeError> {
    open_image(dir, device, lock_image(image)?, sector, opts)
}

/// [`open`] for an image already locked ([`lock_image`],
/// [`lock_image_fd`]).
pub fn open_image(
    dir: &Path,
    device: &str,
    img: LockedImage,
    sector: u64,
    opts: &JournalOptions,
) -> Result<JournaledBackend<FileDevice, File>, HomeError> {
    let geometry = check_size(&img, sector)?;
    open_locked(dir, device, img, geometry, opts, false)
}

fn open_locked(
    dir: &Path,
    device: &str,
    img: LockedImage,
    geometry: Geometry,
    opts: &JournalOptions,
    draining: bool,
) -> Result<JournaledBackend<FileDevice, File>, HomeError> {
    create_dir_durable(dir).map_err(dir_err(dir))?;
    if let Some((journal, meta, pending)) = replaced(dir, &img)? {
        return Err(replaced_error(dir, &img, journal, &meta, pending));
    }
    let f = files(dir, &img.identity.key());
    let meta = read_meta(&f.meta)?;
    let want_sector: u32 = if geometry.sector_size >= 4096 {
        4096
    } else {
        512
    };
    let mut state = match inspect(&f.ring) {
        Ok(s) => Some(s),
        Err(HomeError::Ring { .. }) if !f.ring.exists() => None,
        // A ring whose creation never finished (its metadata is written
        // only after it) holds nothing: make it again.
        Err(HomeError::Ring {
            source: tt_ring::Error::NotARing(_),
            ..
        }) if meta.is_none() => None,
        Err(e) => return Err(e),
    };
    if state.is_none() {
        // A new journal: first remove the empty ones left by images that
        // are gone, so a directory of short-lived images does not keep a
        // ring for each forever.
        remove_stale(dir, &img.identity.key());
    }
    if let Some(s) = &state {
        let _lock = lock_ring(&f.ring, &img.path)?;
        if s.records > 0 && !draining {
            let p = img.path.display();
            let (was, why) = match &meta {
                None => (
                    "no metadata".to_string(),
                    "the journal's metadata is missing".to_string(),
                ),
                Some(m) if m.size != img.size => (
                    format!("{}, {}, {} bytes", m.path, m.identity, m.size),
                    format!(
                        "the image is {} bytes; the journal was written for {} bytes",
                        img.size, m.size
                    ),
                ),
                Some(m) if m.identity != img.identity => (
                    format!("{}, {}", m.path, m.identity),
                    "the journal was written for another file".to_string(),
                ),
                Some(_) => (String::new(), String::new()),
            };
            if !why.is_empty() {
                return Err(HomeError::Changed(Box::new(Mismatch {
                    image: p.to_string(),
                    now: format!("{}, {} bytes", img.identity, img.size),
                    journal: f.ring.display().to_string(),
                    was,
                    pending: s.records,
                    why,
                    fix: format!(
                        "If {p} is the disk they belong to, apply them with `{}`; to \
                         throw them away, `{}`",
                        journal_command(dir, "drain", img.command_path()),
                        journal_command(dir, "discard", img.command_path())
                    ),
                })));
            }
        }
        let wanted = opts.ring_size / want_sector as u64 * want_sector as u64;
        if s.records == 0 && (s.size != wanted || s.sector != want_sector) && !draining {
            state = None; // recreate at the size asked for
        }
    }
    if state.is_none() {
        create_ring(&f.ring, opts.ring_size, want_sector)?;
    }
    let ring_lock = lock_ring(&f.ring, &img.path)?;
    let sector_of_ring = ring_sector(&f.ring)?;
    let dev = FileDevice::open(&f.ring, sector_of_ring).map_err(|e| ring_err(&f.ring)(e.into()))?;
    let new_meta = Meta {
        version: 1,
        path: img.canonical.display().to_string(),
        identity: img.identity,
        size: img.size,
        seq_floor: meta.as_ref().map_or(0, |m| m.seq_floor),
    };
    let mut backend_opts = opts.backend;
    backend_opts.first_seq = backend_opts.first_seq.max(new_meta.seq_floor);
    let lease = MetaLease {
        path: f.meta.clone(),
        meta: new_meta,
    };
    let info = Info {
        name: device.into(),
        geometry,
        id: id_from_identity(img.identity.fs_id, img.identity.ino),
        durable_writes: true,
        max_atomic_write: geometry.sector_size,
    };
    let name = img.path.display().to_string();
    let drain = journal_command(dir, "drain", img.command_path());
    let mut b = JournaledBackend::start(
        info,
        &name,
        Arc::new(dev),
        Arc::new(img.file),
        backend_opts,
        Some(Box::new(lease)),
    )
    .map_err(|e| match e {
        super::Error::Replay {
            device,
            image,
            why,
            command: _,
        } => super::Error::Replay {
            device,
            image,
            why,
            command: drain.as_str().into(),
        },
        e => e,
    })?;
    b.set_drain_command(drain);
    b.add_lock_fd(std::os::fd::AsRawFd::as_raw_fd(&ring_lock));
    b.keep(Box::new(ring_lock));
    Ok(b)
}

mod admin;
pub use admin::{discard, drain, find, list, ImageState, JournalEntry, Outcome};

#[cfg(test)]
mod tests;
