//! Runtime images: templates, per-unikernel copies and disk snapshots.
//!
//! A unikernel made from a template gets its own *runtime image*, a file
//! that starts with the template's bytes and then diverges. Making it is
//! [`clone_file`]: a reflink (`FICLONE`, the file system shares the
//! extents and copies on write: constant time) where the file system can,
//! else a copy that shares extents where `copy_file_range` can and skips
//! the source's holes. The caller learns which one happened ([`CloneKind`]).
//!
//! - [`TemplateStore`]: named, read-only template disks in one directory
//!   (`NAME.img`, mode 0400, and `NAME.json`, its [`Template`] metadata);
//!   [`TemplateStore::instantiate`] clones one into a runtime image.
//! - [`SnapshotStore`]: point-in-time copies of runtime images, one
//!   directory per image, each with an optional life time. The store keeps
//!   the expiry times in memory, so [`SnapshotStore::next_expiry`] tells a
//!   daemon when to set its timer and [`SnapshotStore::expire`] removes
//!   what is due: no scan of every snapshot on each tick.
//!
//! # Consistency is the caller's job
//!
//! These functions copy the bytes of a file as they are. A snapshot of a
//! disk a guest is writing to, or of a journaled disk whose journal still
//! holds writes not yet applied to the image, is not a consistent disk.
//! The caller (the daemon) must take a snapshot, and revert one, with the
//! guest paused and its journal drained: `tt-host pause` does both.
//!
//! # Crash safety
//!
//! Every file is complete before its metadata names it: an image is
//! cloned and synced first, then its JSON is written to a temporary file,
//! synced and renamed into place. Opening a store removes images a crash
//! left without metadata. A revert clones the snapshot to a temporary file
//! beside the image and renames it over the image, so the image is always
//! either the old bytes or the snapshot's. Each store assumes one owner
//! process (the daemon); two processes must not change one store at once.

mod clone;
mod snapshot;
mod template;

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use clone::{clone_file, CloneKind};
pub use snapshot::{Snapshot, SnapshotStore};
pub use template::{Template, TemplateStore};

use crate::resources::NameError;

/// What the image functions refuse or fail at; each names the path or the
/// name concerned.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A system call on `path` failed.
    #[error("{op} {}: {source}", .path.display())]
    Io {
        /// What was being done ("open", "clone into", ...).
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The destination exists; nothing is ever overwritten.
    #[error("{} already exists; remove it or choose another destination", .0.display())]
    Exists(PathBuf),
    /// The source is not a regular file (a directory, a device, ...).
    #[error("{} is not a regular file", .0.display())]
    NotRegular(PathBuf),
    /// A template or snapshot name that is not a valid label.
    #[error("bad {what} name: {source}")]
    BadName {
        /// "template" or "snapshot".
        what: &'static str,
        #[source]
        source: NameError,
    },
    /// An image whose file name cannot name its snapshot directory.
    #[error(
        "cannot snapshot {}: its file name must be 1 to 63 ASCII letters, digits, '-' or '.'",
        .0.display()
    )]
    BadImagePath(PathBuf),
    /// Another image with the same file name has snapshots in the store.
    #[error(
        "cannot snapshot {}: {} has snapshots under the same file name; remove them or rename the image",
        .image.display(), .other.display()
    )]
    SnapshotDirTaken { image: PathBuf, other: PathBuf },
    #[error("template '{name}' already exists in {}", .dir.display())]
    TemplateExists { name: String, dir: PathBuf },
    #[error("no template '{name}' in {}", .dir.display())]
    NoTemplate { name: String, dir: PathBuf },
    #[error("image {} already has a snapshot '{snap}'", .image.display())]
    SnapshotExists { image: PathBuf, snap: String },
    #[error("image {} has no snapshot '{snap}'", .image.display())]
    NoSnapshot { image: PathBuf, snap: String },
    /// A metadata file that does not parse (edited by hand, or corrupt).
    #[error("bad metadata in {}: {source}", .path.display())]
    BadMetadata {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// `op` on `path` failed with `source`.
fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ImageError + 'a {
    move |source| ImageError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Milliseconds since the Unix epoch (0 before it), as stored in metadata.
fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The time `ms` milliseconds after the Unix epoch.
fn from_unix_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// Write `value` as JSON to `path` atomically: a temporary file beside it,
/// synced, renamed over `path`, and the directory synced.
fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<(), ImageError> {
    use std::io::Write;
    let tmp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec_pretty(value).expect("metadata serialises");
    let mut f = std::fs::File::create(&tmp).map_err(io_err("create", &tmp))?;
    f.write_all(&bytes)
        .and_then(|()| f.sync_all())
        .map_err(io_err("write", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err("rename into", path))?;
    clone::sync_parent(path)
}

/// Read the JSON metadata at `path`.
fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ImageError> {
    let bytes = std::fs::read(path).map_err(io_err("read", path))?;
    serde_json::from_slice(&bytes).map_err(|source| ImageError::BadMetadata {
        path: path.to_path_buf(),
        source,
    })
}

/// Remove `path`, ignoring that it is already gone.
fn remove_if_exists(path: &Path) -> Result<(), ImageError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err("remove", path)(e)),
        _ => Ok(()),
    }
}
