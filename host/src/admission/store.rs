//! The state directory on disk: `state.json` (policies, and the running
//! entries an older tt-host kept there), its `lock`, and `running/` with
//! one flock-held file per running unikernel.

use super::legacy::{self, alive};
use super::{AdmitError, StateDir};
use crate::resources::{PartialPolicy, Unikernel};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::path::Path as FsPath;

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

/// Open `path` read-only without waiting for a FIFO's writer (a plain
/// open of a FIFO blocks until one comes).
pub(super) fn open_nonblocking(path: &FsPath) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
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
    pub(super) _lock: File,
    pub(super) stored: Stored,
}

impl StateDir {
    /// Take the lock and read the state (an absent file is the empty state).
    pub(super) fn lock(&self) -> Result<Locked<'_>, AdmitError> {
        std::fs::create_dir_all(&self.dir).map_err(self.io("cannot create it"))?;
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(self.dir.join(LOCK_FILE))
            .map_err(self.io("cannot open its lock file"))?;
        loop {
            // SAFETY: flock on a file descriptor we own; no memory involved.
            let r = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
            if r == 0 {
                break;
            }
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(self.io("cannot lock it")(err));
            }
        }
        let state = self.dir.join(STATE_FILE);
        // Reading a FIFO (or a device) would block or never end: the file
        // opened (not the path, which may change meanwhile) must be a
        // regular file.
        let read = |mut f: File| -> std::io::Result<Result<Vec<u8>, AdmitError>> {
            if !f.metadata()?.is_file() {
                return Ok(Err(self.bad(format!("{STATE_FILE} is not a regular file"))));
            }
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut f, &mut bytes)?;
            Ok(Ok(bytes))
        };
        let stored = match open_nonblocking(&state).and_then(read) {
            Ok(bytes) => {
                let bytes = bytes?;
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
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Stored {
                version: STATE_VERSION,
                ..Stored::default()
            },
            Err(e) => return Err(self.io(format!("cannot read {STATE_FILE}"))(e)),
        };
        let mut stored = stored;
        self.load_entry_files(&mut stored)?;
        Ok(Locked {
            sd: self,
            _lock: lock,
            stored,
        })
    }

    /// Add the running entries kept in their own files in `running/`: since
    /// 2026-12-02 a launch writes its entry into the file whose flock it
    /// holds, instead of rewriting (and syncing) `state.json` on launch
    /// and on exit. A file nobody holds is a dead entry (or one whose
    /// launch died before it was complete): it is removed. Files named by
    /// `state.json` entries (written by an older tt-host) are left to
    /// [`Locked::reap`]; other names, non-regular files and empty held
    /// files are not entries. A held file that does not parse is an error
    /// naming it (fail closed: it may be a running unikernel).
    fn load_entry_files(&self, stored: &mut Stored) -> Result<(), AdmitError> {
        let dir = self.dir.join(RUNNING_DIR);
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(self.io("cannot list running/")(e)),
        };
        let listed: BTreeSet<String> = stored
            .running
            .iter()
            .filter_map(|r| r.lock.clone())
            .collect();
        for e in entries {
            let e = e.map_err(self.io("cannot list running/"))?;
            let Some(file) = e.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if !file.ends_with(".lock") || listed.contains(&file) {
                continue;
            }
            let path = dir.join(&file);
            let f = match open_nonblocking(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(self.io(format!("cannot open running/{file}"))(e)),
            };
            if !f.metadata().is_ok_and(|m| m.is_file()) {
                continue;
            }
            if try_flock(&f) {
                let _ = std::fs::remove_file(&path);
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
    pub(super) fn reap(&mut self) -> usize {
        let before = self.stored.running.len();
        let dir = self.sd.dir.join(RUNNING_DIR);
        self.stored.running.retain(|r| {
            let Some(lock) = &r.lock else {
                return alive(r.pid, r.start);
            };
            let path = dir.join(lock);
            // Unreadable (but present) counts as held: fail closed. Not
            // waiting: opening a FIFO put there would block, state lock held.
            let live = match open_nonblocking(&path) {
                Ok(f) => !try_flock(&f),
                Err(e) => e.kind() != std::io::ErrorKind::NotFound,
            };
            if !live {
                let _ = std::fs::remove_file(&path);
            }
            live
        });
        before - self.stored.running.len()
    }

    /// Write the state crash-safely: temporary file, fdatasync, rename,
    /// fsync of the directory.
    pub(super) fn save(&self) -> Result<(), AdmitError> {
        let sd = self.sd;
        // Entries kept in their own files stay there.
        let mut on_disk = self.stored.clone();
        on_disk.running.retain(|r| !r.in_file);
        let bytes = serde_json::to_vec_pretty(&on_disk)
            .map_err(|e| sd.bad(format!("cannot encode the state: {e}")))?;
        let tmp = sd.dir.join(format!("{STATE_FILE}.tmp"));
        // One left behind (a crash, another user, a hostile one) is
        // replaced: opening it would write through a symlink, block on a
        // FIFO, or fail on another user's file.
        if let Err(e) = std::fs::remove_file(&tmp) {
            if e.kind() != std::io::ErrorKind::NotFound {
                return Err(sd.io(format!("cannot remove the old {STATE_FILE}.tmp"))(e));
            }
        }
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(sd.io(format!("cannot create {STATE_FILE}.tmp")))?;
        f.write_all(&bytes)
            .and_then(|_| f.sync_data())
            .map_err(sd.io(format!("cannot write {STATE_FILE}.tmp")))?;
        drop(f);
        std::fs::rename(&tmp, sd.dir.join(STATE_FILE))
            .map_err(sd.io(format!("cannot replace {STATE_FILE}")))?;
        File::open(&sd.dir)
            .and_then(|d| d.sync_all())
            .map_err(sd.io("cannot sync the directory"))?;
        Ok(())
    }
}
