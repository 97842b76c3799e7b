//! Run files: what a `tt-host run` process publishes for a supervisor.
//!
//! A supervisor (tt-host's daemon) starts each unikernel as its own
//! `tt-host run` process, which must outlive the supervisor: the daemon
//! may be SIGKILLed and restarted, and then re-adopts its running
//! children. So a child does not talk to the daemon through pipes, which
//! would die with it; it writes two files, which the daemon reads at any
//! time, whether or not it started the child:
//!
//! - [`console`]: the guest's console, as a ring of timestamped records in
//!   a file of fixed size (`tt-host run --console-log=PATH`);
//! - [`stats`]: counters (block, net, VM exits), the process's identity
//!   (pid, start time, boot id), and, once it ends, its end record: how it
//!   ended and with what status, its CPU time and peak memory
//!   (`tt-host run --stats-file=PATH`).
//!
//! Both are created (or truncated) by `tt-host run` with mode 0600, sized
//! once and mapped shared: the child writes them with plain memory stores
//! (no system call per console line or per counted request, so nothing to
//! add to the sandbox's allowlist), and publishes with release stores.
//! Readers use `pread` (never a mapping, so a file truncated under them
//! gives an error, not a SIGBUS) and check what they read: a damaged or
//! foreign file gives an error or skipped bytes, never a panic.

pub mod console;
pub mod stats;
#[cfg(test)]
mod tests;

use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Create (or truncate) the run file `path` with mode 0600, `len` bytes
/// long, never through a symbolic link, and map it shared, writable.
/// The mapping is never unmapped: a run file lives as long as the process.
fn create_mapped(path: &Path, len: usize) -> std::io::Result<*mut u8> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    // An existing file keeps its mode through O_CREAT: set it.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    file.set_len(len as u64)?;
    // SAFETY: a new shared mapping of `len` bytes of a file just sized to
    // `len`; no Rust object aliases it. The file may close after: the
    // mapping keeps its pages.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            std::os::fd::AsRawFd::as_raw_fd(&file),
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    Ok(ptr.cast())
}

/// Read exactly `buf.len()` bytes at `offset`, or fail (a short file).
fn read_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    file.read_exact_at(buf, offset)
}

/// The current time as nanoseconds since the Unix epoch (0 if the clock
/// is before it).
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}
