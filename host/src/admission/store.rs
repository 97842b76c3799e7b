//! The state directory on disk: `state.json` (policies, and the running
//! entries an older tt-host kept there), its `lock`, and `running/` with
//! one flock-held file per running unikernel.

use super::legacy::{self, alive};
use super::private::Dir;
use super::{AdmitError, StateDir};
use crate::resources::{PartialPolicy, Unikernel};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::fs::File;
use std::io::Write;
use std::os::unix::io::AsRawFd;

/// Version of `state.json`'s layout.
pub(super) const STATE_VERSION: u32 = 1;
pub(super) const STATE_FILE: &str = "state.json";
pub(super) const LOCK_FILE: &str = "lock";

/// One running unikernel, as stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(super) struct Running {
    pub(super) name: String,
    pub(super) pid: u32,
    /// The process's start time in clock ticks since boot.
    pub(super) start: u64,
    pub(super) resources: Unikernel,
    /// Its file in `running/`, locked while it runs (absent in entries
    /// written before such files: judged by `pid` and `start`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) lock: Option<String>,
    /// Read from its own file in `running/` (which holds the entry), not
    /// from `state.json`; never written to `state.json`.
    #[serde(skip)]
    pub(super) in_file: bool,
}

/// Largest entry file in `running/` read (an entry is a few hundred bytes).
pub(super) const ENTRY_FILE_MAX: u64 = 64 << 10;

pub(super) const RUNNING_DIR: &str = "running";

/// Numbers this process's entry files in `running/` apart.
pub(super) static ENTRY_N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Largest `state.json` read: policies take a few hundred bytes each.
pub const STATE_FILE_MAX: u64 = 16 << 20;

/// Is `name` one tt-host gives its entry files in `running/`
/// (`PID-START-N.lock`)? Only those are read as entries or removed.
pub(super) fn is_entry_name(name: &str) -> bool {
    let Some(stem) = name.strip_suffix(".lock") else {
        return false;
    };
    let parts: Vec<&str> = stem.split('-').collect();
    parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.len() <= 20 && p.bytes().all(|b| b.is_ascii_digit()))
}

/// Try to take `file`'s flock without waiting: true if it was free (then
/// held by `file` until it is closed).
pub(super) fn try_flock(file: &File) -> bool {
    // SAFETY: flock on a file descriptor we own; no memory involved.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

/// `state.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(super) struct Stored {
    pub(super) version: u32,
    /// The root policy, if set; `None`: the host's resources.
    pub(super) root: Option<PartialPolicy>,
    /// Every other policy, by path.
    pub(super) policies: Vec<(String, PartialPolicy)>,
    pub(super) running: Vec<Running>,
}

/// The state, read under the exclusive lock (held until this is dropped).
pub(super) struct Locked<'a> {
    pub(super) sd: &'a StateDir,
    /// The state directory and its `running/` (if there is one), open.
    pub(super) dir: Dir,
    pub(super) running: Option<Dir>,
    pub(super) _lock: File,
    pub(super) stored: Stored,
}

impl StateDir {
    /// Open the state directory (made 0700 if absent) and check it: see
    /// [`private`](super::private).
    pub(super) fn open_dir(&self) -> Result<Dir, AdmitError> {
        Dir::open(&self.dir, true).map_err(|e| self.open_err("cannot create or open it", e))
    }

    /// Take the lock and read the state (an absent file is the empty state).
    /// While another process holds the lock, SIGINT or SIGTERM (once
    /// [`crate::vmm::signal::install`]ed) ends the wait with
    /// [`AdmitError::Signal`] within a few milliseconds.
    pub(super) fn lock(&self) -> Result<Locked<'_>, AdmitError> {
        let dir = self.open_dir()?;
        let lock = dir
            .file(LOCK_FILE, true, true)
            .map_err(|e| self.open_err("cannot open its lock file", e))?
            .ok_or_else(|| self.bad(format!("{LOCK_FILE} vanished")))?;
        self.wait_for(&lock)?;
        // Reading a FIFO (or a device) would block or never end: the file
        // opened (not the path, which may change meanwhile) must be a
        // regular file, and one of a sane size.
        let path = self.dir.join(STATE_FILE);
        let read = |f: File| -> Result<Vec<u8>, AdmitError> {
            let len = f
                .metadata()
                .map_err(self.io(format!("cannot read {STATE_FILE}")))?
                .len();
            let too_big = || {
                self.bad(format!(
                    "{} is {len} bytes, over the limit of {STATE_FILE_MAX} bytes (16 MiB): \
                     it is not one tt-host wrote; move it away",
                    path.display()
                ))
            };
            if len > STATE_FILE_MAX {
                return Err(too_big());
            }
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(
                &mut std::io::Read::take(&f, STATE_FILE_MAX + 1),
                &mut bytes,
            )
            .map_err(self.io(format!("cannot read {STATE_FILE}")))?;
            if bytes.len() as u64 > STATE_FILE_MAX {
                return Err(too_big());
            }
            Ok(bytes)
        };
        let stored = match dir
            .file(STATE_FILE, false, false)
            .map_err(|e| self.open_err(format!("cannot read {STATE_FILE}"), e))?
        {
            Some(f) => {
                let bytes = read(f)?;
                let s: Stored = serde_json::from_slice(&bytes)
                    .map_err(|e| self.bad(format!("{STATE_FILE} does not parse: {e}")))?;
                if s.version != STATE_VERSION {
                    return Err(self.bad(format!(
                        "{STATE_FILE} has version {}; this tt-host reads version {STATE_VERSION}",
                        s.version
                    )));
                }
                legacy::check_entries(&s.running)
                    .map_err(|e| self.bad(format!("{STATE_FILE}: {e}")))?;
                s
            }
            None => Stored {
                version: STATE_VERSION,
                ..Stored::default()
            },
        };
        let mut stored = stored;
        let running = dir
            .subdir(RUNNING_DIR, false)
            .map_err(|e| self.open_err(format!("cannot open {RUNNING_DIR}/"), e))?;
        if let Some(running) = &running {
            self.load_entry_files(running, &mut stored)?;
        }
        Ok(Locked {
            sd: self,
            dir,
            running,
            _lock: lock,
            stored,
        })
    }

    /// Take `lock`'s flock, waiting while another process holds it; a
    /// SIGINT or SIGTERM that comes meanwhile ends the wait.
    fn wait_for(&self, lock: &File) -> Result<(), AdmitError> {
        let mut pause_ms = 1;
        loop {
            // SAFETY: flock on a file descriptor we own; no memory involved.
            if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Ok(());
            }
            let err = std::io::Error::last_os_error();
            if !matches!(
                err.raw_os_error(),
                Some(libc::EWOULDBLOCK) | Some(libc::EINTR)
            ) {
                return Err(self.io("cannot lock it")(err));
            }
            if let Some(sig) = crate::vmm::signal::received() {
                return Err(AdmitError::Signal(sig));
            }
            // Sleep a little, or until a signal comes (the handler makes
            // the wake fd readable, so one that lands just before the
            // poll is not missed).
            let mut fds = [libc::pollfd {
                fd: crate::vmm::signal::wake_fd().unwrap_or(-1),
                events: libc::POLLIN,
                revents: 0,
            }];
            // SAFETY: `fds` is a live array of one pollfd (a negative fd
            // is ignored by poll).
            unsafe { libc::poll(fds.as_mut_ptr(), 1, pause_ms) };
            pause_ms = (pause_ms * 2).min(20);
        }
    }

    /// Add the running entries kept in their own files in `running/`: since
    /// 2026-12-02 a launch writes its entry into the file whose flock it
    /// holds, instead of rewriting (and syncing) `state.json` on launch
    /// and on exit. A file nobody holds is a dead entry (or one whose
    /// launch died before it was complete): it is removed. Only files
    /// named as tt-host names them ([`is_entry_name`]) are entries; files
    /// named by `state.json` entries (written by an older tt-host) are
    /// left to [`Locked::reap`]; empty held files are not entries. An
    /// entry file that is not the user's own regular file, or that is held
    /// and does not parse, is an error naming it (fail closed: it may be a
    /// running unikernel).
    fn load_entry_files(&self, dir: &Dir, stored: &mut Stored) -> Result<(), AdmitError> {
        let names = dir
            .names()
            .map_err(self.io(format!("cannot list {RUNNING_DIR}/")))?;
        let listed: BTreeSet<String> = stored
            .running
            .iter()
            .filter_map(|r| r.lock.clone())
            .collect();
        for name in names {
            let Some(file) = name.to_str().map(str::to_owned) else {
                continue;
            };
            if !is_entry_name(&file) || listed.contains(&file) {
                continue;
            }
            let f = match dir.file(&file, false, false) {
                Ok(Some(f)) => f,
                Ok(None) => continue,
                Err(e) => return Err(self.open_err(format!("cannot open running/{file}"), e)),
            };
            if try_flock(&f) {
                let _ = dir.unlink(&file);
                continue;
            }
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut std::io::Read::take(&f, ENTRY_FILE_MAX), &mut bytes)
                .map_err(self.io(format!("cannot read running/{file}")))?;
            // Held but empty: an older tt-host's lock file (its entry is in
            // state.json, or it is no entry at all), never one of ours, whose
            // entry is written before any reader can take the state lock.
            if bytes.is_empty() {
                continue;
            }
            let r: Running = serde_json::from_slice(&bytes)
                .map_err(|e| self.bad(format!("running/{file} does not parse: {e}")))?;
            if r.lock.as_deref() != Some(file.as_str()) {
                return Err(self.bad(format!(
                    "running/{file} holds the entry of lock file {:?}",
                    r.lock.as_deref().unwrap_or("")
                )));
            }
            stored.running.push(Running { in_file: true, ..r });
        }
        Ok(())
    }
}

impl Locked<'_> {
    /// Drop every running entry whose process is gone. Returns how many.
    /// An entry's file is removed only if tt-host named it
    /// ([`is_entry_name`]) and it is the user's own regular file (opened
    /// in `running/` itself, never through a link).
    pub(super) fn reap(&mut self) -> usize {
        let before = self.stored.running.len();
        let running = self.running.as_ref();
        self.stored.running.retain(|r| {
            let Some(lock) = &r.lock else {
                return alive(r.pid, r.start);
            };
            let Some(dir) = running else {
                // No running/: no file, nobody holds it.
                return false;
            };
            // Not the user's own regular file (a link, a FIFO, another
            // user's) counts as held: fail closed. Opening does not wait
            // (a FIFO put there would block, state lock held).
            let live = match dir.file(lock, false, false) {
                Ok(Some(f)) => !try_flock(&f),
                Ok(None) => false,
                Err(_) => true,
            };
            if !live && is_entry_name(lock) {
                let _ = dir.unlink(lock);
            }
            live
        });
        before - self.stored.running.len()
    }

    /// Write the state crash-safely: temporary file (0600), fdatasync,
    /// rename, fsync of the directory.
    pub(super) fn save(&self) -> Result<(), AdmitError> {
        let sd = self.sd;
        // Entries kept in their own files stay there.
        let mut on_disk = self.stored.clone();
        on_disk.running.retain(|r| !r.in_file);
        let bytes = serde_json::to_vec_pretty(&on_disk)
            .map_err(|e| sd.bad(format!("cannot encode the state: {e}")))?;
        let tmp = format!("{STATE_FILE}.tmp");
        // One left behind (a crash, a hostile user) is replaced: opening
        // it would write through a symlink, block on a FIFO, or fail on
        // another user's file. Unlinking removes a link, not its target.
        if let Err(e) = self.dir.unlink(&tmp) {
            if e.kind() != std::io::ErrorKind::NotFound {
                return Err(sd.io(format!("cannot remove the old {tmp}"))(e));
            }
        }
        let mut f = self
            .dir
            .create_new(&tmp)
            .map_err(|e| sd.open_err(format!("cannot create {tmp}"), e))?;
        f.write_all(&bytes)
            .and_then(|_| f.sync_data())
            .map_err(sd.io(format!("cannot write {tmp}")))?;
        drop(f);
        self.dir
            .rename(&tmp, STATE_FILE)
            .map_err(sd.io(format!("cannot replace {STATE_FILE}")))?;
        self.dir
            .sync()
            .map_err(sd.io("cannot sync the directory"))?;
        Ok(())
    }
}
