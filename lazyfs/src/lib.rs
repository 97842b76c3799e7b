//! tt-lazyfs: a FUSE file system for tests that forgets what was not
//! synced, so a test can cut the power under a real process.
//!
//! # Why
//!
//! A `SIGKILL` loses nothing that reached the page cache: a plain
//! `pwrite` survives it as well as a journal does, so a kill test cannot
//! tell them apart. A power cut can. tt-lazyfs is built for that test, in
//! the manner of LazyFS (the FUSE file system Jepsen uses): it keeps every
//! file in memory with two states, and [`LazyFs::crash`] throws away
//! everything that was not made durable the way a disk file system
//! requires.
//!
//! # The model (strict)
//!
//! - **Data and size** of a file become durable at its `fsync` or
//!   `fdatasync`, not before. `close` makes nothing durable. Writes,
//!   `ftruncate` and `fallocate` are tracked in 4 KiB pages: a sync copies
//!   only the pages changed since the last one, so a 64 MiB image synced
//!   after every 4 KiB write costs one page copy per sync.
//! - **Directory entries** (create, `mkdir`, `unlink`, `rmdir`, `rename`,
//!   `link`, `symlink`) become durable at the `fsync` of the directory that
//!   holds them (FUSE `fsyncdir`). A rename between two directories needs
//!   both synced: with only the target synced, a file is then found under
//!   both names, and a directory under the first one the crash walk finds.
//! - **A new file's own entry is not made durable by the file's fsync.**
//!   Real ext4 usually does commit it (it rides in the same journal
//!   transaction), but POSIX does not promise it and LazyFS does not do
//!   it; code that wants its file after a crash must sync the directory.
//!   [`Options::fsync_syncs_entries`] switches to the ext4-like behaviour.
//! - **Other attributes** (mode, owner, times) become durable at `fsync`
//!   (not `fdatasync`) of the file or directory. A symlink's target is
//!   durable with its entry.
//! - After a crash, what no durable entry reaches from the root is gone; a
//!   durable entry whose file data was never synced names an empty file.
//!   Inode numbers of what survives do not change (so a tool that
//!   identifies a file by its inode finds it again); the device number
//!   (`st_dev`) is that of a new mount, which the kernel may or may not
//!   give the same number, as after a reboot.
//!
//! # Kernel caches
//!
//! The mount is write-through (no FUSE writeback cache), so every write
//! reaches tt-lazyfs before `write(2)` returns. [`LazyFs::crash`]
//! unmounts, changes the state, and mounts again: the page cache, the
//! dentry and attribute caches of the old mount are gone with it, so what
//! a process sees afterwards is exactly the durable state.
//!
//! # Locks
//!
//! tt-lazyfs does not ask the kernel for FUSE lock requests, so `flock`
//! and POSIX record locks are handled by the kernel locally, between the
//! processes of this machine, as on a local disk.
//!
//! # Use
//!
//! ```no_run
//! # fn main() -> Result<(), tt_lazyfs::Error> {
//! let dir = std::env::temp_dir().join("lazy");
//! std::fs::create_dir_all(&dir).unwrap();
//! let mut fs = tt_lazyfs::LazyFs::mount(&dir)?;
//! // ... run and SIGKILL (then reap) the processes under test ...
//! fs.crash()?; // only what was synced is left
//! assert!(fs.stats().fdatasyncs > 0);
//! # Ok(()) }
//! ```
//!
//! Whatever a test prepares on the mount before the run (a disk image,
//! say) must be synced too, file and directory, or the crash takes it.
//! `f_fsid` from `statfs` is 0, as on every FUSE mount, before and after a
//! crash.
//!
//! Mounting needs `/dev/fuse` and root (the mount is a plain `mount(2)`;
//! no libfuse, no `fusermount`). [`check_fuse`] says whether both are
//! there; tests fail without them unless `TT_SKIP_FUSE=1`
//! ([`skip_requested`]).

mod fuse;
mod mount;
mod state;

use std::io;
use std::path::PathBuf;

pub use mount::{check_fuse, skip_requested, LazyFs};

/// How strict the file system is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Options {
    /// `fsync`/`fdatasync` of a file also makes durable every directory
    /// entry that names it now (like ext4 in practice). Off by default:
    /// only the directory's own fsync does (as LazyFS, and POSIX).
    pub fsync_syncs_entries: bool,
}

/// Counters since the mount (across crashes), for assertions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// `fsync` of files (with metadata).
    pub fsyncs: u64,
    /// `fdatasync` of files.
    pub fdatasyncs: u64,
    /// `fsync` of directories.
    pub dir_fsyncs: u64,
    /// `write` requests and the bytes they carried.
    pub writes: u64,
    pub bytes_written: u64,
    /// 4 KiB pages copied into the durable state by syncs.
    pub pages_synced: u64,
    /// Crashes, and what they threw away: unsynced pages, and files and
    /// directories that no durable entry reached.
    pub crashes: u64,
    pub pages_dropped: u64,
    pub inodes_dropped: u64,
}

/// What can go wrong mounting, crashing or unmounting.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "/dev/fuse is missing: load the fuse module (modprobe fuse) or run where it exists \
         (a container needs --device /dev/fuse); TT_SKIP_FUSE=1 skips the tests that need it"
    )]
    NoFuseDevice,
    #[error(
        "mounting tt-lazyfs needs root (CAP_SYS_ADMIN for mount(2)): run the tests as root; \
         TT_SKIP_FUSE=1 skips the tests that need it"
    )]
    NotRoot,
    #[error("cannot open /dev/fuse: {0}")]
    OpenDevice(#[source] io::Error),
    #[error("mount point {path}: {source} (it must be an existing directory)")]
    MountPoint {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("mount(2) of tt-lazyfs on {path} failed: {source}")]
    Mount {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("FUSE handshake on {path} failed: {source}")]
    Handshake {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{path} is busy: a process still has a file or directory open on it, or its working \
         directory there; kill and reap every process that uses it first"
    )]
    Busy { path: PathBuf },
    #[error("unmounting {path} failed: {source}")]
    Unmount {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the FUSE server of {path} failed: {source}")]
    Server {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}
