//! The state directory's files, used only if they are its owner's.
//!
//! Every directory tt-host makes in the state directory is created 0700
//! and every file 0600, the mode set explicitly after creation (a umask
//! of 000, or of 0700, changes nothing). Every file and subdirectory is
//! opened relative to its directory's descriptor (`openat`) with
//! `O_NOFOLLOW`, so no symbolic link inside the state directory is ever
//! followed, and what is opened is checked on the open descriptor
//! (`fstat`): the right kind, owned by the user tt-host runs as, and not
//! writable by group or others. Anything else is refused with a
//! [`NotPrivate`] naming the path and the fix: another user who can
//! write the directory, or open a file in it, could otherwise flock its
//! `lock` and stop every launch, or swap `running/` for a link and have
//! tt-host delete files elsewhere. The state directory's own path, named
//! by the operator, is followed if it is a link; the directory it leads
//! to is checked the same way.

use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

/// Mode of every directory tt-host creates in the state directory.
pub const DIR_MODE: u32 = 0o700;
/// Mode of every file tt-host creates in the state directory.
pub const FILE_MODE: u32 = 0o600;

/// A path in the state directory that tt-host will not use.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{path} {why}: {fix}")]
pub struct NotPrivate {
    pub path: String,
    pub why: String,
    pub fix: String,
}

impl From<NotPrivate> for io::Error {
    fn from(e: NotPrivate) -> io::Error {
        io::Error::new(io::ErrorKind::PermissionDenied, e.to_string())
    }
}

/// Why opening or checking a path failed.
#[derive(Debug)]
pub(super) enum OpenError {
    NotPrivate(NotPrivate),
    Io(io::Error),
}

impl From<io::Error> for OpenError {
    fn from(e: io::Error) -> OpenError {
        OpenError::Io(e)
    }
}

impl From<OpenError> for io::Error {
    fn from(e: OpenError) -> io::Error {
        match e {
            OpenError::NotPrivate(p) => p.into(),
            OpenError::Io(e) => e,
        }
    }
}

fn cstr(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn euid() -> u32 {
    // SAFETY: geteuid takes nothing and cannot fail.
    unsafe { libc::geteuid() }
}

fn fstat(fd: &impl AsRawFd) -> io::Result<libc::stat> {
    // SAFETY: a zeroed stat is valid plain data that fstat fills in.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a live, writable stat; the fd is open.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

fn fchmod(fd: &impl AsRawFd, mode: u32) -> io::Result<()> {
    // SAFETY: plain syscall on an fd we own.
    if unsafe { libc::fchmod(fd.as_raw_fd(), mode) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Is what `st` describes a `dir`ectory (else a regular file), owned by
/// the user tt-host runs as, and not writable by group or others?
fn check(path: &Path, st: &libc::stat, dir: bool) -> Result<(), NotPrivate> {
    let p = path.display().to_string();
    let not = |why: String, fix: String| NotPrivate {
        path: p.clone(),
        why,
        fix,
    };
    let kind = st.st_mode & libc::S_IFMT;
    let (want, what, mode) = if dir {
        (libc::S_IFDIR, "a directory", DIR_MODE)
    } else {
        (libc::S_IFREG, "a regular file", FILE_MODE)
    };
    if kind != want {
        return Err(not(
            format!("is not {what}"),
            "move it out of the state directory".into(),
        ));
    }
    let uid = euid();
    if st.st_uid != uid {
        return Err(not(
            format!(
                "is owned by uid {}, not by uid {uid} that tt-host runs as",
                st.st_uid
            ),
            format!("`chown {uid} {p}`, or give tt-host a state directory of its own"),
        ));
    }
    let perm = st.st_mode & 0o7777;
    if perm & 0o022 != 0 {
        return Err(not(
            format!("can be written by group or others (mode {perm:04o})"),
            format!("`chmod {mode:o} {p}`"),
        ));
    }
    Ok(())
}

/// Create `path` 0700 and the missing directories above it (each 0700,
/// whatever the umask); each new directory and the one holding it are
/// synced, so a power cut does not take a new directory away with what
/// was then synced into it.
fn make_dirs(path: &Path) -> io::Result<()> {
    let c = cstr(path.as_os_str())?;
    // SAFETY: `c` is a NUL-terminated path that outlives the call.
    if unsafe { libc::mkdir(c.as_ptr(), DIR_MODE) } == 0 {
        // SAFETY: as above.
        if unsafe { libc::chmod(c.as_ptr(), DIR_MODE) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        File::open(path)?.sync_all()?;
        return File::open(parent)?.sync_all();
    }
    let err = io::Error::last_os_error();
    match err.kind() {
        io::ErrorKind::AlreadyExists => Ok(()),
        io::ErrorKind::NotFound => match path.parent() {
            Some(p) if !p.as_os_str().is_empty() && p != path => {
                make_dirs(p)?;
                make_dirs(path)
            }
            _ => Err(err),
        },
        _ => Err(err),
    }
}

/// Create the directory `dir` (and the missing ones above it) 0700 if it
/// is absent, durably, and check that it is the user's own and writable
/// by no one else: what `<state-dir>/journals` is made with.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    Dir::open(dir, true)?;
    Ok(())
}

/// An open directory of the state directory, and its path for messages.
#[derive(Debug)]
pub(super) struct Dir {
    fd: OwnedFd,
    path: PathBuf,
}

impl Dir {
    /// Open `path` (a link there is followed: the operator named it), and
    /// with `create`, make it first if it is absent. `None`: absent.
    pub(super) fn open_opt(path: &Path, create: bool) -> Result<Option<Dir>, OpenError> {
        if create {
            make_dirs(path)?;
        }
        let c = cstr(path.as_os_str())?;
        // SAFETY: `c` is a NUL-terminated path that outlives the call.
        let fd = unsafe { libc::open(c.as_ptr(), dir_flags(false)) };
        if fd < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::NotFound && !create {
                return Ok(None);
            }
            return Err(err.into());
        }
        // SAFETY: `fd` was just opened and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        check(path, &fstat(&fd)?, true).map_err(OpenError::NotPrivate)?;
        Ok(Some(Dir {
            fd,
            path: path.to_path_buf(),
        }))
    }

    pub(super) fn open(path: &Path, create: bool) -> Result<Dir, OpenError> {
        Self::open_opt(path, create)?.ok_or_else(|| io::Error::from(io::ErrorKind::NotFound).into())
    }

    /// A symbolic link (or something else not a `dir`ectory / regular
    /// file) found at `name` where `openat` refused it.
    fn not_followed(&self, name: &str) -> OpenError {
        OpenError::NotPrivate(NotPrivate {
            path: self.path.join(name).display().to_string(),
            why: "is a symbolic link, which tt-host never follows in its state directory".into(),
            fix: "remove it (tt-host makes what it needs)".into(),
        })
    }

    /// The subdirectory `name`, made 0700 first with `create`; `None`:
    /// absent.
    pub(super) fn subdir(&self, name: &str, create: bool) -> Result<Option<Dir>, OpenError> {
        let c = cstr(OsStr::new(name))?;
        let mut created = false;
        if create {
            // SAFETY: `c` is NUL-terminated and outlives the call; the fd is open.
            if unsafe { libc::mkdirat(self.fd.as_raw_fd(), c.as_ptr(), DIR_MODE) } == 0 {
                created = true;
            } else {
                let err = io::Error::last_os_error();
                if err.kind() != io::ErrorKind::AlreadyExists {
                    return Err(err.into());
                }
            }
        }
        // SAFETY: as above.
        let fd = unsafe { libc::openat(self.fd.as_raw_fd(), c.as_ptr(), dir_flags(true)) };
        if fd < 0 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::ENOENT) => Ok(None),
                Some(libc::ELOOP | libc::ENOTDIR) if self.is_link(&c) => {
                    Err(self.not_followed(name))
                }
                Some(libc::ENOTDIR) => Err(self.refuse_kind(name, "a directory")),
                _ => Err(err.into()),
            };
        }
        // SAFETY: `fd` was just opened and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        if created {
            fchmod(&fd, DIR_MODE)?;
            self.sync()?;
        }
        let path = self.path.join(name);
        check(&path, &fstat(&fd)?, true).map_err(OpenError::NotPrivate)?;
        Ok(Some(Dir { fd, path }))
    }

    /// Is `name` here a symbolic link (not followed)?
    fn is_link(&self, name: &CString) -> bool {
        // SAFETY: a zeroed stat is valid plain data that fstatat fills in.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `name` is NUL-terminated, `st` live and writable.
        let rc = unsafe {
            libc::fstatat(
                self.fd.as_raw_fd(),
                name.as_ptr(),
                &mut st,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        rc == 0 && st.st_mode & libc::S_IFMT == libc::S_IFLNK
    }

    fn refuse_kind(&self, name: &str, what: &str) -> OpenError {
        OpenError::NotPrivate(NotPrivate {
            path: self.path.join(name).display().to_string(),
            why: format!("is not {what}"),
            fix: "move it out of the state directory".into(),
        })
    }

    /// Open the file `name` (read-only, or read-write with `write`)
    /// without following a link and without waiting for a FIFO's writer,
    /// and check it. With `create`, an absent one is made 0600. `None`:
    /// absent.
    pub(super) fn file(
        &self,
        name: &str,
        write: bool,
        create: bool,
    ) -> Result<Option<File>, OpenError> {
        let c = cstr(OsStr::new(name))?;
        let access = if write { libc::O_RDWR } else { libc::O_RDONLY };
        let flags = access | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC;
        for _ in 0..100 {
            if create {
                match self.create_new(name) {
                    Ok(f) => return Ok(Some(f)),
                    Err(OpenError::Io(e)) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(e),
                }
            }
            // SAFETY: `c` is NUL-terminated and outlives the call; the fd is open.
            let fd = unsafe { libc::openat(self.fd.as_raw_fd(), c.as_ptr(), flags) };
            if fd < 0 {
                let err = io::Error::last_os_error();
                match err.raw_os_error() {
                    // Removed since: make it again.
                    Some(libc::ENOENT) if create => continue,
                    Some(libc::ENOENT) => return Ok(None),
                    Some(libc::ELOOP) => return Err(self.not_followed(name)),
                    _ => return Err(err.into()),
                }
            }
            // SAFETY: `fd` was just opened and is owned by nothing else.
            let f = unsafe { File::from_raw_fd(fd) };
            check(&self.path.join(name), &fstat(&f)?, false).map_err(OpenError::NotPrivate)?;
            return Ok(Some(f));
        }
        Err(io::Error::other(format!("{name} keeps disappearing")).into())
    }

    /// Create the file `name`, which must not exist (not even as a
    /// link), read-write and 0600.
    pub(super) fn create_new(&self, name: &str) -> Result<File, OpenError> {
        let c = cstr(OsStr::new(name))?;
        let flags =
            libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        // SAFETY: `c` is NUL-terminated and outlives the call; the fd is open.
        let fd = unsafe { libc::openat(self.fd.as_raw_fd(), c.as_ptr(), flags, FILE_MODE) };
        if fd < 0 {
            return Err(io::Error::last_os_error().into());
        }
        // SAFETY: `fd` was just opened and is owned by nothing else.
        let f = unsafe { File::from_raw_fd(fd) };
        fchmod(&f, FILE_MODE)?;
        check(&self.path.join(name), &fstat(&f)?, false).map_err(OpenError::NotPrivate)?;
        Ok(f)
    }

    /// Remove the entry `name` (a link itself, never its target).
    /// The directory's descriptor.
    pub(super) fn raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }

    pub(super) fn unlink(&self, name: &str) -> io::Result<()> {
        let c = cstr(OsStr::new(name))?;
        // SAFETY: `c` is NUL-terminated and outlives the call; the fd is open.
        if unsafe { libc::unlinkat(self.fd.as_raw_fd(), c.as_ptr(), 0) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Rename `from` to `to`, both in this directory.
    pub(super) fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let (f, t) = (cstr(OsStr::new(from))?, cstr(OsStr::new(to))?);
        let fd = self.fd.as_raw_fd();
        // SAFETY: both names are NUL-terminated and outlive the call.
        if unsafe { libc::renameat(fd, f.as_ptr(), fd, t.as_ptr()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub(super) fn sync(&self) -> io::Result<()> {
        // SAFETY: plain syscall on an fd we own.
        if unsafe { libc::fsync(self.fd.as_raw_fd()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The names in this directory (not `.` and `..`).
    pub(super) fn names(&self) -> io::Result<Vec<OsString>> {
        // fdopendir takes over a descriptor: give it a copy.
        // SAFETY: plain syscall on an fd we own.
        let fd = unsafe { libc::fcntl(self.fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor of this directory, which the
        // stream owns from here on (closedir closes it).
        let d = unsafe { libc::fdopendir(fd) };
        if d.is_null() {
            let err = io::Error::last_os_error();
            // SAFETY: fdopendir failed, so `fd` is still ours to close.
            unsafe { libc::close(fd) };
            return Err(err);
        }
        // The copy shares its offset with the original: start at the top.
        // SAFETY: `d` is a live directory stream.
        unsafe { libc::rewinddir(d) };
        let mut out = Vec::new();
        loop {
            // SAFETY: `d` is a live directory stream; errno is reset so
            // that the end can be told from an error.
            let e = unsafe {
                *libc::__errno_location() = 0;
                libc::readdir64(d)
            };
            if e.is_null() {
                let err = io::Error::last_os_error();
                // SAFETY: `d` is live and closed once.
                unsafe { libc::closedir(d) };
                if err.raw_os_error().unwrap_or(0) != 0 {
                    return Err(err);
                }
                return Ok(out);
            }
            // SAFETY: readdir returned a valid entry whose d_name is a
            // NUL-terminated string, valid until the next readdir call.
            let name = unsafe { std::ffi::CStr::from_ptr((*e).d_name.as_ptr()) };
            let name = name.to_bytes();
            if name != b"." && name != b".." {
                out.push(OsString::from_vec(name.to_vec()));
            }
        }
    }
}

fn dir_flags(nofollow: bool) -> libc::c_int {
    let f = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC;
    if nofollow {
        f | libc::O_NOFOLLOW
    } else {
        f
    }
}
