//! Mounting, crashing and unmounting: the part that touches the kernel.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use fuser::{BackgroundSession, Config, Session, SessionACL};

use crate::fuse::Server;
use crate::state::State;
use crate::{Error, Options, Stats};

const DEV_FUSE: &str = "/dev/fuse";

/// How long `crash` and `unmount` wait for a busy mount to be let go (a
/// killed process's files close just after it is reaped).
const BUSY_WAIT: Duration = Duration::from_secs(5);
/// The same on drop, before it falls back to a lazy unmount.
const DROP_BUSY_WAIT: Duration = Duration::from_secs(1);

/// Whether this process can mount tt-lazyfs: `/dev/fuse` exists and it
/// runs as root. Tests call it first: an `Err` names what is missing.
pub fn check_fuse() -> Result<(), Error> {
    if !Path::new(DEV_FUSE).exists() {
        return Err(Error::NoFuseDevice);
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(Error::NotRoot);
    }
    Ok(())
}

/// Whether `TT_SKIP_FUSE=1` asks tests to skip (loudly) when
/// [`check_fuse`] fails, rather than fail.
pub fn skip_requested() -> bool {
    std::env::var_os("TT_SKIP_FUSE").is_some_and(|v| v == "1")
}

/// A mounted tt-lazyfs, served by a thread of this process.
///
/// Dropping it unmounts (lazily if something still uses the mount, after
/// a short wait); the contents are lost then.
pub struct LazyFs {
    dir: PathBuf,
    c_dir: CString,
    state: Arc<Mutex<State>>,
    session: Option<BackgroundSession>,
}

impl std::fmt::Debug for LazyFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyFs")
            .field("dir", &self.dir)
            .field("mounted", &self.session.is_some())
            .finish()
    }
}

impl LazyFs {
    /// Mount an empty tt-lazyfs on `dir` (an existing directory) with
    /// the default, strict [`Options`].
    pub fn mount(dir: &Path) -> Result<LazyFs, Error> {
        Self::mount_with(dir, Options::default())
    }

    /// Mount an empty tt-lazyfs on `dir` with `opts`.
    ///
    /// Errors: [`Error::NoFuseDevice`], [`Error::NotRoot`] (see
    /// [`check_fuse`]), [`Error::MountPoint`] if `dir` is not a
    /// directory, [`Error::Mount`] if the kernel refuses.
    pub fn mount_with(dir: &Path, opts: Options) -> Result<LazyFs, Error> {
        check_fuse()?;
        let mount_point = |source| Error::MountPoint {
            path: dir.to_path_buf(),
            source,
        };
        let dir = dir.canonicalize().map_err(mount_point)?;
        if !dir.is_dir() {
            return Err(mount_point(io::Error::from_raw_os_error(libc::ENOTDIR)));
        }
        let c_dir = CString::new(dir.as_os_str().as_bytes())
            .map_err(|_| mount_point(io::Error::from_raw_os_error(libc::EINVAL)))?;
        let state = Arc::new(Mutex::new(State::new(opts)));
        let session = start(&dir, &c_dir, &state)?;
        Ok(LazyFs {
            dir,
            c_dir,
            state,
            session: Some(session),
        })
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The power cut. Unmounts (which drops every kernel cache of the
    /// mount), puts every file and directory back to its durable state,
    /// forgets what no durable entry reaches, and mounts again on the
    /// same directory. Inode numbers of what survives are unchanged;
    /// the device number (`st_dev`) is a new mount's, which may or may
    /// not be the old number, as after a reboot.
    ///
    /// No process may have a file or directory of the mount open, or its
    /// working directory in it: kill and reap every process that uses it
    /// first. A busy mount is waited for a few seconds, then the crash is
    /// refused with [`Error::Busy`] and the mount stays as it was.
    pub fn crash(&mut self) -> Result<(), Error> {
        self.stop(BUSY_WAIT, false)?;
        self.lock().crash();
        self.session = Some(start(&self.dir, &self.c_dir, &self.state)?);
        Ok(())
    }

    /// Counters since the mount, across crashes.
    pub fn stats(&self) -> Stats {
        self.lock().stats
    }

    /// Pages (4 KiB) written or truncated and not yet synced: what a
    /// [`crash`](Self::crash) now would drop.
    pub fn unsynced_pages(&self) -> u64 {
        self.lock().unsynced_pages()
    }

    /// Unmount and stop the server. Errors: [`Error::Busy`] if something
    /// still uses the mount (it stays mounted until this value is
    /// dropped), [`Error::Unmount`], [`Error::Server`].
    pub fn unmount(mut self) -> Result<(), Error> {
        self.stop(BUSY_WAIT, false)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Unmount and join the server. The state lock must not be held: an
    /// unmount waits for requests in flight, which need it.
    fn stop(&mut self, busy_wait: Duration, lazy: bool) -> Result<(), Error> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        let deadline = Instant::now() + busy_wait;
        loop {
            // SAFETY: c_dir is a NUL-terminated path that outlives the call.
            if unsafe { libc::umount2(self.c_dir.as_ptr(), 0) } == 0 {
                break;
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EBUSY) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Some(libc::EBUSY) if lazy => {
                    // Detach it: the server thread serves the processes
                    // that still use it and ends when they let go.
                    // SAFETY: as above.
                    unsafe { libc::umount2(self.c_dir.as_ptr(), libc::MNT_DETACH) };
                    drop(session);
                    return Ok(());
                }
                Some(libc::EBUSY) => {
                    self.session = Some(session);
                    return Err(Error::Busy {
                        path: self.dir.clone(),
                    });
                }
                // Not mounted any more (unmounted by hand): the kernel
                // has ended the connection, so the server stops.
                Some(libc::EINVAL) => break,
                _ => {
                    self.session = Some(session);
                    return Err(Error::Unmount {
                        path: self.dir.clone(),
                        source: e,
                    });
                }
            }
        }
        match session.join() {
            // Unmounted: the kernel may end the connection while the
            // server reads its next request, which then reads as an
            // aborted connection rather than the usual end (seen in CI).
            Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => Ok(()),
            r => r.map_err(|source| Error::Server {
                path: self.dir.clone(),
                source,
            }),
        }
    }
}

impl Drop for LazyFs {
    fn drop(&mut self) {
        // Nothing to report an error to; a lazy unmount cannot fail in a
        // way that leaves more behind than the error would.
        let _ = self.stop(DROP_BUSY_WAIT, true);
    }
}

/// Mount `/dev/fuse` on `dir` with mount(2) and start serving `state`.
fn start(
    dir: &Path,
    c_dir: &CString,
    state: &Arc<Mutex<State>>,
) -> Result<BackgroundSession, Error> {
    let dev: File = OpenOptions::new()
        .read(true)
        .write(true)
        .open(DEV_FUSE)
        .map_err(Error::OpenDevice)?;
    // SAFETY: geteuid and getegid have no preconditions.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    // allow_other: the processes under test may run as other users.
    // default_permissions: the kernel checks modes, as a disk fs would.
    let data = CString::new(format!(
        "fd={},rootmode=40755,user_id={uid},group_id={gid},allow_other,default_permissions",
        dev.as_raw_fd()
    ))
    .expect("no NUL in mount options");
    // SAFETY: every pointer is a NUL-terminated string that outlives the
    // call; the fd named in `data` is open (it is `dev`).
    let r = unsafe {
        libc::mount(
            c"tt-lazyfs".as_ptr(),
            c_dir.as_ptr(),
            c"fuse.tt-lazyfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            data.as_ptr().cast(),
        )
    };
    if r != 0 {
        return Err(Error::Mount {
            path: dir.to_path_buf(),
            source: io::Error::last_os_error(),
        });
    }
    let mut config = Config::default();
    config.n_threads = Some(1);
    let server = Server {
        state: Arc::clone(state),
    };
    let session = Session::from_fd(server, OwnedFd::from(dev), SessionACL::All, config)
        .and_then(Session::spawn);
    session.map_err(|source| {
        // The handshake failed: take the mount down again.
        // SAFETY: c_dir is a NUL-terminated path that outlives the call.
        unsafe { libc::umount2(c_dir.as_ptr(), libc::MNT_DETACH) };
        Error::Handshake {
            path: dir.to_path_buf(),
            source,
        }
    })
}
