//! [`clone_file`]: a reflink where the file system can, else a copy.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use super::{io_err, ImageError};

/// `FICLONE` from `<linux/fs.h>`: `_IOW(0x94, 9, int)`.
const FICLONE: libc::c_ulong = 0x4004_9409;

/// How [`clone_file`] made its destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum CloneKind {
    /// The file system shares the source's extents, copying on write:
    /// constant time and no space until either file is written.
    Reflink,
    /// The bytes were copied (with `copy_file_range`, which some file
    /// systems serve by sharing extents or copying inside the kernel),
    /// skipping the source's holes.
    Copy,
}

impl std::fmt::Display for CloneKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CloneKind::Reflink => "reflink",
            CloneKind::Copy => "copy",
        })
    }
}

/// Removes the half-made destination unless disarmed.
struct Unlink<'a>(Option<&'a Path>);

impl Drop for Unlink<'_> {
    fn drop(&mut self) {
        if let Some(p) = self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Make `dst`, a new file (mode 0600) with the bytes of `src`, and sync it
/// and its directory.
///
/// Tries `FICLONE` first; if the file system cannot reflink (or `src` and
/// `dst` are on different file systems) it copies instead. Never
/// overwrites: an existing `dst` is [`ImageError::Exists`]. On failure the
/// partial `dst` is removed.
pub fn clone_file(src: &Path, dst: &Path) -> Result<CloneKind, ImageError> {
    let from = File::open(src).map_err(io_err("open", src))?;
    let meta = from.metadata().map_err(io_err("stat", src))?;
    if !meta.is_file() {
        return Err(ImageError::NotRegular(src.to_path_buf()));
    }
    let to = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(dst)
        .map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                ImageError::Exists(dst.to_path_buf())
            } else {
                io_err("create", dst)(e)
            }
        })?;
    let mut guard = Unlink(Some(dst));

    // SAFETY: both descriptors are open for the duration of the call;
    // FICLONE reads an int (the source descriptor) passed by value.
    let rc = unsafe { libc::ioctl(to.as_raw_fd(), FICLONE as _, from.as_raw_fd()) };
    let kind = if rc == 0 {
        CloneKind::Reflink
    } else {
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EOPNOTSUPP | libc::EXDEV | libc::EINVAL | libc::ENOTTY) => {
                copy_data(&from, src, &to, dst, meta.len())?;
                CloneKind::Copy
            }
            _ => return Err(io_err("clone into", dst)(e)),
        }
    };
    to.sync_data().map_err(io_err("sync", dst))?;
    sync_parent(dst)?;
    guard.0 = None;
    Ok(kind)
}

/// Copy the `len` bytes of `from` into the empty `to`, leaving holes where
/// `from` has them.
fn copy_data(from: &File, src: &Path, to: &File, dst: &Path, len: u64) -> Result<(), ImageError> {
    // The size first: the ranges skipped below stay holes.
    to.set_len(len).map_err(io_err("resize", dst))?;
    let mut off = 0u64;
    while off < len {
        let Some((start, end)) = next_data(from, off, len).map_err(io_err("seek in", src))? else {
            break;
        };
        copy_range(from, src, to, dst, start, end)?;
        off = end;
    }
    Ok(())
}

/// The next range of data at or after `off`, `None` past the last one.
/// File systems without `SEEK_DATA` report the whole rest as data.
fn next_data(f: &File, off: u64, len: u64) -> io::Result<Option<(u64, u64)>> {
    /// `lseek(f, at, whence)`: `Ok(None)` for `ENXIO` (no data past
    /// `at`), `Ok(Some(u64::MAX))` where the file system has no such seek.
    fn seek(f: &File, at: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
        // SAFETY: lseek on an open descriptor has no memory effects.
        let r = unsafe { libc::lseek(f.as_raw_fd(), at as libc::off_t, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            Some(libc::EINVAL | libc::EOPNOTSUPP) => Ok(Some(u64::MAX)),
            _ => Err(e),
        }
    }
    let start = match seek(f, off, libc::SEEK_DATA)? {
        None => return Ok(None),
        Some(u64::MAX) => return Ok(Some((off, len))),
        Some(s) if s >= len => return Ok(None),
        Some(s) => s,
    };
    let end = match seek(f, start, libc::SEEK_HOLE)? {
        Some(h) if h > start && h != u64::MAX => h.min(len),
        _ => len,
    };
    Ok(Some((start, end)))
}

/// Copy `[start, end)` of `from` to the same offsets in `to`: with
/// `copy_file_range`, or with `pread`/`pwrite` where the kernel refuses it.
fn copy_range(
    from: &File,
    src: &Path,
    to: &File,
    dst: &Path,
    start: u64,
    end: u64,
) -> Result<(), ImageError> {
    let mut off = start;
    while off < end {
        let mut in_off = off as libc::loff_t;
        let mut out_off = off as libc::loff_t;
        let want = (end - off).min(1 << 30) as usize;
        // SAFETY: both descriptors are open; the offsets are locals the
        // kernel updates.
        let n = unsafe {
            libc::copy_file_range(
                from.as_raw_fd(),
                &mut in_off,
                to.as_raw_fd(),
                &mut out_off,
                want,
                0,
            )
        };
        if n > 0 {
            off += n as u64;
            continue;
        }
        if n == 0 {
            // The source shrank under us.
            return Err(io_err("read", src)(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "file shrank while being copied",
            )));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EXDEV | libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL) => {
                return read_write(from, src, to, dst, off, end);
            }
            _ => return Err(io_err("copy into", dst)(e)),
        }
    }
    Ok(())
}

/// The plain copy: 1 MiB `pread`s and `pwrite`s.
fn read_write(
    from: &File,
    src: &Path,
    to: &File,
    dst: &Path,
    mut off: u64,
    end: u64,
) -> Result<(), ImageError> {
    let mut buf = vec![0u8; 1 << 20];
    while off < end {
        let n = (end - off).min(buf.len() as u64) as usize;
        from.read_exact_at(&mut buf[..n], off)
            .map_err(io_err("read", src))?;
        to.write_all_at(&buf[..n], off)
            .map_err(io_err("write", dst))?;
        off += n as u64;
    }
    Ok(())
}

/// `fsync` the directory holding `path`, so a new name in it is durable.
pub(super) fn sync_parent(path: &Path) -> Result<(), ImageError> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("sync directory", dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
            .collect()
    }

    #[test]
    fn copies_bytes_and_refuses_an_existing_destination() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src.img");
        let dst = dir.path().join("dst.img");
        let data = pattern(3 << 20 | 123, 7);
        std::fs::write(&src, &data).unwrap();
        let kind = clone_file(&src, &dst).unwrap();
        assert!(matches!(kind, CloneKind::Reflink | CloneKind::Copy));
        assert_eq!(std::fs::read(&dst).unwrap(), data);
        assert_eq!(std::fs::metadata(&dst).unwrap().mode() & 0o777, 0o600);

        std::fs::write(&dst, b"mine").unwrap();
        let e = clone_file(&src, &dst).unwrap_err();
        assert!(matches!(e, ImageError::Exists(_)), "{e}");
        assert!(e.to_string().contains("dst.img already exists"), "{e}");
        assert_eq!(std::fs::read(&dst).unwrap(), b"mine", "dst left alone");
    }

    #[test]
    fn missing_or_odd_sources_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let dst = dir.path().join("dst.img");
        let e = clone_file(&dir.path().join("nope.img"), &dst).unwrap_err();
        assert!(e.to_string().starts_with("open "), "{e}");
        assert!(e.to_string().contains("nope.img"), "{e}");
        let e = clone_file(dir.path(), &dst).unwrap_err();
        assert!(matches!(e, ImageError::NotRegular(_)), "{e}");
        assert!(!dst.exists(), "no destination left behind");
    }

    #[test]
    fn holes_stay_holes() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("sparse.img");
        let dst = dir.path().join("copy.img");
        let f = File::create(&src).unwrap();
        let len = 64u64 << 20;
        f.set_len(len).unwrap();
        f.write_all_at(b"head", 0).unwrap();
        f.write_all_at(b"middle", 32 << 20).unwrap();
        f.write_all_at(b"tail", len - 4).unwrap();
        f.sync_all().unwrap();
        drop(f);
        clone_file(&src, &dst).unwrap();
        let (a, b) = (std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        assert!(a == b, "same bytes");
        let used = std::fs::metadata(&dst).unwrap().blocks() * 512;
        assert!(
            used < 8 << 20,
            "copy of a 64 MiB sparse file uses {used} bytes"
        );
    }
}
