//! Admission across processes: the policy tree of [`crate::resources`] and
//! the running unikernels, kept in a state directory shared by every
//! `tt-host` process on the host.
//!
//! The directory (`--state-dir`, else `$TT_HOST_STATE_DIR`, else
//! `/var/lib/tt-host`) holds `state.json` with the policies, `lock`, and
//! `running/` with one file per running unikernel. Every access takes an
//! exclusive `flock` on `lock` and reads the state: `state.json` and the
//! entry files. A policy change writes `state.json` back crash-safely (a
//! new temporary file, `fdatasync`, `rename`, then `fsync` of the
//! directory: a reader sees the old state or the new one, never half of
//! one; a temporary file left behind is removed, never written through).
//! A launch writes its entry into a new file of its own in `running/`,
//! under the state lock, with no sync (after a power loss nothing runs:
//! an entry lost is a dead one), and its exit removes that file; neither
//! rewrites `state.json`, so a launch costs no `fdatasync`. So the check
//! of a launch and its registration are one atomic step across processes:
//! twenty `tt-host run` at once under a policy of five admit exactly five.
//! A `state.json` or entry file that does not parse, or a state that
//! describes an impossible tree, is an error naming the file and what is
//! wrong in it.
//!
//! Each running unikernel holds an `flock` on its entry file for as long
//! as its [`Admission`] lives, so a `tt-host run` killed with SIGKILL,
//! whose release never ran, does not keep its reservation: the kernel
//! drops the lock with the process, and the next reader removes every
//! entry file nobody holds. (An older tt-host kept the entries in
//! `state.json`, with an empty file in `running/` to lock; such entries
//! are still read and reaped the same way.) A lock, unlike a
//! process id, means the same in every PID namespace (a `tt-host` in a
//! container, or with another `/proc`, reaped the others' entries as
//! dead) and does not survive a reboot. Entries written before these
//! files existed are judged by their process id and the start time the
//! kernel gives that process (`/proc/PID/stat`): gone, a zombie, or
//! another process that reused the id is dead.
//!
//! The root policy is the host's resources unless it was set: all online
//! CPUs, the physical memory, the free disk in the state directory plus
//! what running unikernels' block devices already take, and every bridge
//! and TAP interface. A stored policy or running unikernel beyond that
//! (the host changed since) widens the default, so the stored tree stays
//! consistent.

use crate::resources::{Name, Path, Policy, Refusal, Resources, Unikernel};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::path::{Path as FsPath, PathBuf};

/// Version of `state.json`'s layout.
const STATE_VERSION: u32 = 1;
const STATE_FILE: &str = "state.json";
const LOCK_FILE: &str = "lock";
/// The default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/tt-host";
/// Environment variable naming the state directory.
pub const STATE_DIR_ENV: &str = "TT_HOST_STATE_DIR";

/// What went wrong with admission or the state directory.
#[derive(Debug, thiserror::Error)]
pub enum AdmitError {
    /// A policy refuses the launch or the policy change.
    #[error("refused: {0}")]
    Refused(#[from] Refusal),
    #[error("state directory {dir}: {what}: {err}")]
    Io {
        dir: String,
        what: String,
        err: std::io::Error,
    },
    /// `state.json` does not parse or describes an impossible tree.
    #[error("state directory {dir}: {what}")]
    BadState { dir: String, what: String },
    #[error("{0}")]
    Invalid(String),
}

/// One running unikernel, as stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct Running {
    name: String,
    pid: u32,
    /// The process's start time in clock ticks since boot.
    start: u64,
    resources: Unikernel,
    /// Its file in `running/`, locked while it runs (absent in entries
    /// written before such files: judged by `pid` and `start`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lock: Option<String>,
    /// Read from its own file in `running/` (which holds the entry), not
    /// from `state.json`; never written to `state.json`.
    #[serde(skip)]
    in_file: bool,
}

/// Largest entry file in `running/` read (an entry is a few hundred bytes).
const ENTRY_FILE_MAX: u64 = 64 << 10;

const RUNNING_DIR: &str = "running";

/// Numbers this process's entry files in `running/` apart.
static ENTRY_N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Open `path` read-only without waiting for a FIFO's writer (a plain
/// open of a FIFO blocks until one comes).
fn open_nonblocking(path: &FsPath) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
}

/// Try to take `file`'s flock without waiting: true if it was free (then
/// held by `file` until it is closed).
fn try_flock(file: &File) -> bool {
    // SAFETY: flock on a file descriptor we own; no memory involved.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

/// `state.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Stored {
    version: u32,
    /// The root policy, if set; `None`: the host's resources.
    root: Option<Policy>,
    /// Every other policy, by path.
    policies: Vec<(String, Policy)>,
    running: Vec<Running>,
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

/// The state, read under the exclusive lock (held until this is dropped).
struct Locked<'a> {
    sd: &'a StateDir,
    _lock: File,
    stored: Stored,
}

impl StateDir {
    /// The directory given, else `$TT_HOST_STATE_DIR`, else the default.
    pub fn resolve(given: Option<&FsPath>) -> StateDir {
        Self::resolve_from(given, std::env::var_os(STATE_DIR_ENV))
    }

    /// [`resolve`](Self::resolve) with the environment variable's value.
    /// An empty value counts as unset (as XDG's variables do), not as the
    /// current directory.
    fn resolve_from(given: Option<&FsPath>, env: Option<std::ffi::OsString>) -> StateDir {
        let dir = given
            .map(PathBuf::from)
            .or_else(|| env.filter(|v| !v.is_empty()).map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        StateDir { dir }
    }

    pub fn path(&self) -> &FsPath {
        &self.dir
    }

    fn io(&self, what: impl Into<String>) -> impl FnOnce(std::io::Error) -> AdmitError + '_ {
        let what = what.into();
        move |err| AdmitError::Io {
            dir: self.dir.display().to_string(),
            what,
            err,
        }
    }

    fn bad(&self, what: impl Into<String>) -> AdmitError {
        AdmitError::BadState {
            dir: self.dir.display().to_string(),
            what: what.into(),
        }
    }

    /// Take the lock and read the state (an absent file is the empty state).
    fn lock(&self) -> Result<Locked<'_>, AdmitError> {
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
                // A lock file name is joined to running/ and the file may
                // be deleted when reaped: it must name a file in there.
                if let Some(r) = s.running.iter().find(|r| {
                    r.lock.as_deref().is_some_and(|l| {
                        l.is_empty() || l == "." || l == ".." || l.contains(['/', '\0'])
                    })
                }) {
                    return Err(self.bad(format!(
                        "{STATE_FILE}: unikernel '{}' has lock file {:?}, not a file name",
                        r.name,
                        r.lock.as_deref().unwrap_or("")
                    )));
                }
                // Two entries on one file: releasing one deletes it and
                // the other, still running, would be reaped.
                let mut locks = BTreeSet::new();
                if let Some(l) = s
                    .running
                    .iter()
                    .filter_map(|r| r.lock.as_deref())
                    .find(|l| !locks.insert(*l))
                {
                    return Err(self.bad(format!(
                        "{STATE_FILE}: lock file {l:?} is listed for two running unikernels"
                    )));
                }
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

    /// Admit the unikernel `name` (or, without a name, one named after
    /// `fallback`, made unique with a `.N` suffix) with resources `uk` for
    /// this process. The reservation lasts until the returned
    /// [`Admission`] is dropped or the process dies.
    pub fn admit(
        &self,
        name: Option<&Name>,
        fallback: &str,
        uk: Unikernel,
    ) -> Result<Admission, AdmitError> {
        let mut st = self.lock()?;
        st.reap();
        let mut tree = st.tree()?;
        let name = match name {
            Some(n) => n.clone(),
            None => unique_name(&tree, fallback)?,
        };
        tree.insert_unikernel(&name, uk.clone())?;
        let (pid, start) = (std::process::id(), own_start_time());
        // Lock this entry's file before the entry is visible: a reaper
        // that sees the entry sees it held.
        let dir = self.dir.join(RUNNING_DIR);
        std::fs::create_dir_all(&dir).map_err(self.io("cannot create running/"))?;
        // A new file of its own: the name (pid, start time) can be taken
        // by a tt-host in another PID namespace, or by a file left over.
        let mut tries = 0;
        let (lock_name, held) = loop {
            let n = ENTRY_N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let lock_name = format!("{pid}-{start}-{n}.lock");
            match OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(dir.join(&lock_name))
            {
                Ok(f) => break (lock_name, f),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && tries < 1000 => {
                    tries += 1;
                }
                Err(e) => return Err(self.io(format!("cannot create running/{lock_name}"))(e)),
            }
        };
        // Nobody else opens a file no entry names yet (reapers open only
        // those, under the state lock that this process holds).
        if !try_flock(&held) {
            let err = std::io::Error::last_os_error();
            let _ = std::fs::remove_file(dir.join(&lock_name));
            return Err(self.io(format!("cannot lock running/{lock_name}"))(err));
        }
        // The entry goes into the file: visible to the next reader (under
        // the state lock, which this process holds), with no sync (after a
        // power loss nothing runs, and a lost entry is a dead one).
        let entry = Running {
            name: name.to_string(),
            pid,
            start,
            resources: uk,
            lock: Some(lock_name.clone()),
            in_file: true,
        };
        let bytes = serde_json::to_vec(&entry)
            .map_err(|e| self.bad(format!("cannot encode the entry: {e}")))?;
        if let Err(e) = (&held).write_all(&bytes) {
            let _ = std::fs::remove_file(dir.join(&lock_name));
            return Err(self.io(format!("cannot write running/{lock_name}"))(e));
        }
        drop(st);
        Ok(Admission {
            sd: self.clone(),
            name,
            lock_name,
            _held: held,
        })
    }

    /// Set the policy at `path`: the fields given in `change`, the others
    /// copied from the nearest policy above (so an option left out gives as
    /// much as the parent has). Returns the policy set.
    pub fn set_policy(&self, path: &Path, change: &PolicyChange) -> Result<Policy, AdmitError> {
        let mut st = self.lock()?;
        st.reap();
        let mut tree = st.tree()?;
        let mut base = tree.find_policy(path).cloned().unwrap_or_else(|| {
            path.ancestors()
                .rev()
                .find_map(|a| tree.find_policy(&a).cloned())
                .expect("the root has a policy")
        });
        change.apply(&mut base);
        tree.set_policy(path, base.clone())?;
        if path.is_root() {
            st.stored.root = Some(base.clone());
        } else {
            let key = path.to_string();
            st.stored.policies.retain(|(p, _)| *p != key);
            st.stored.policies.push((key, base.clone()));
        }
        st.save()?;
        Ok(base)
    }

    /// Remove the policy at `path` (the root's: go back to the host's
    /// resources, if everything set and running fits in them).
    pub fn remove_policy(&self, path: &Path) -> Result<(), AdmitError> {
        let mut st = self.lock()?;
        st.reap();
        if path.is_root() {
            if st.stored.root.is_none() {
                return Err(AdmitError::Invalid(
                    "the root has no policy set (it is the host's resources)".into(),
                ));
            }
            st.stored.root = None;
            // What is stored must fit in the host as it is, not in a host
            // default widened to hold it.
            st.build_tree(true)?;
        } else {
            let mut tree = st.tree()?;
            tree.remove_policy(path)
                .map_err(|e| AdmitError::Invalid(e.to_string()))?;
            let key = path.to_string();
            st.stored.policies.retain(|(p, _)| *p != key);
        }
        st.save()
    }

    /// The tree below `path`, with usage against limits, after reaping.
    pub fn show(&self, path: &Path) -> Result<String, AdmitError> {
        let mut st = self.lock()?;
        if st.reap() > 0 {
            st.save()?;
        }
        let tree = st.tree()?;
        let root_note = if st.stored.root.is_none() {
            "(root policy: the host's resources)\n"
        } else {
            ""
        };
        Ok(format!("{root_note}{}", tree.render(path)))
    }
}

impl Locked<'_> {
    /// Drop every running entry whose process is gone. Returns how many.
    fn reap(&mut self) -> usize {
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

    /// The tree the stored state describes.
    fn tree(&self) -> Result<Resources, AdmitError> {
        self.build_tree(false)
    }

    /// The tree, with `strict`: the root is the host's resources as they
    /// are now, not widened to what is stored, and what does not fit in
    /// it is an `Invalid` error naming it (for removing the root policy).
    fn build_tree(&self, strict: bool) -> Result<Resources, AdmitError> {
        let sd = self.sd;
        let mut policies: Vec<(Path, &Policy)> = Vec::new();
        let mut seen = BTreeSet::new();
        for (p, pol) in &self.stored.policies {
            let path: Path = p
                .parse()
                .map_err(|e| sd.bad(format!("{STATE_FILE}: stored policy path '{p}': {e}")))?;
            // The root's policy is `root`; one here would replace it.
            if path.is_root() {
                return Err(sd.bad(format!(
                    "{STATE_FILE}: stored policy path '{p}' is the root (whose policy is stored as \"root\")"
                )));
            }
            if !seen.insert(path.clone()) {
                return Err(sd.bad(format!(
                    "{STATE_FILE}: the policy at {path} is stored twice"
                )));
            }
            policies.push((path, pol));
        }
        let mut running = Vec::new();
        for r in &self.stored.running {
            let name: Name = r.name.parse().map_err(|e| {
                sd.bad(format!(
                    "{STATE_FILE}: stored unikernel name '{}': {e}",
                    r.name
                ))
            })?;
            running.push((name, &r.resources));
        }
        let root = match &self.stored.root {
            Some(p) => p.clone(),
            None => {
                let used = running
                    .iter()
                    .try_fold(0u64, |sum, (_, u)| sum.checked_add(u.block_mb))
                    .ok_or_else(|| {
                        sd.bad(format!(
                            "{STATE_FILE}: the stored unikernels' block use adds up past 2^64 MB"
                        ))
                    })?;
                let mut host = host_policy(&sd.dir, used);
                if strict {
                    return Self::fill(host, policies, running, |what, e| {
                        AdmitError::Invalid(format!(
                            "cannot go back to the host's resources: {what} does not fit in \
                             them: {e}"
                        ))
                    });
                }
                // Widen the host default to what is stored, in case the host
                // changed since (less free disk, a CPU offline).
                for (_, p) in &policies {
                    widen(&mut host, p);
                }
                let (mut n, mut mem) = (0u64, 0u64);
                for (_, u) in &running {
                    n += 1;
                    mem = mem.saturating_add(u.memory_mb);
                    host.cpus.extend(u.cpus.iter().copied());
                    host.bridges.extend(u.bridges.iter().cloned());
                }
                host.unikernels = host.unikernels.max(n.min(u32::MAX as u64) as u32);
                host.memory_mb = host.memory_mb.max(mem);
                host.block_mb = Some(host.block_mb.unwrap_or(0).max(used));
                host
            }
        };
        Self::fill(root, policies, running, |what, e| {
            sd.bad(format!("{STATE_FILE}: {what} is inconsistent: {e}"))
        })
    }

    /// A tree with `root`, then the policies and the running unikernels;
    /// `err` makes the error for one that does not fit.
    fn fill(
        root: Policy,
        mut policies: Vec<(Path, &Policy)>,
        running: Vec<(Name, &Unikernel)>,
        err: impl Fn(String, String) -> AdmitError,
    ) -> Result<Resources, AdmitError> {
        let mut tree = Resources::new(root);
        // Parents before children, so each fits when it is set.
        policies.sort_by_key(|(p, _)| p.depth());
        for (path, pol) in policies {
            tree.set_policy(&path, pol.clone())
                .map_err(|e| err(format!("the stored policy at {path}"), e.to_string()))?;
        }
        for (name, uk) in running {
            tree.insert_unikernel(&name, uk.clone())
                .map_err(|e| err(format!("the running unikernel {name}"), e.to_string()))?;
        }
        Ok(tree)
    }

    /// Write the state crash-safely: temporary file, fdatasync, rename,
    /// fsync of the directory.
    fn save(&self) -> Result<(), AdmitError> {
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

/// A launch's reservation: released (under the lock) when dropped. A
/// process that dies without dropping it is reaped instead.
#[derive(Debug)]
pub struct Admission {
    sd: StateDir,
    name: Name,
    /// Its file in `running/`, and that file open with its flock held.
    lock_name: String,
    _held: File,
}

impl Admission {
    /// The name the unikernel was admitted under.
    pub fn name(&self) -> &Name {
        &self.name
    }
}

impl Drop for Admission {
    /// Release: remove the entry's file, then let go of its flock (as
    /// `_held` drops). A reader either finds the file held, or does not
    /// find it, or takes the freed flock and reaps it: never a partial
    /// entry, and no state lock or `state.json` write is needed.
    fn drop(&mut self) {
        let path = self.sd.dir.join(RUNNING_DIR).join(&self.lock_name);
        if let Err(e) = std::fs::remove_file(&path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                // Reaped by the next reader once this process has gone.
                eprintln!("tt-host: cannot release {}: {e}", self.name);
            }
        }
    }
}

/// Which fields `tt-host policy set` changes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyChange {
    pub unikernels: Option<u32>,
    pub memory_mb: Option<u64>,
    pub cpus: Option<BTreeSet<u16>>,
    /// `Some(None)`: no block storage allowed.
    pub block_mb: Option<Option<u64>>,
    pub bridges: Option<BTreeSet<String>>,
}

impl PolicyChange {
    fn apply(&self, p: &mut Policy) {
        if let Some(n) = self.unikernels {
            p.unikernels = n;
        }
        if let Some(m) = self.memory_mb {
            p.memory_mb = m;
        }
        if let Some(c) = &self.cpus {
            p.cpus = c.clone();
        }
        if let Some(b) = self.block_mb {
            p.block_mb = b;
        }
        if let Some(b) = &self.bridges {
            p.bridges = b.clone();
        }
    }
}

/// Grow `host` so that `p` fits in it.
fn widen(host: &mut Policy, p: &Policy) {
    host.unikernels = host.unikernels.max(p.unikernels);
    host.memory_mb = host.memory_mb.max(p.memory_mb);
    host.cpus.extend(p.cpus.iter().copied());
    host.bridges.extend(p.bridges.iter().cloned());
    if let Some(b) = p.block_mb {
        host.block_mb = Some(host.block_mb.unwrap_or(0).max(b));
    }
}

/// `base`, or the first of `base.2`, `base.3`, ... not running, at the root.
fn unique_name(tree: &Resources, base: &str) -> Result<Name, AdmitError> {
    let label = sanitize_label(base);
    for i in 1u32.. {
        let candidate = if i == 1 {
            label.clone()
        } else {
            let suffix = format!(".{i}");
            let keep = label.len().min(63 - suffix.len());
            format!("{}{suffix}", &label[..keep])
        };
        let name: Name = candidate
            .parse()
            .map_err(|e| AdmitError::Invalid(format!("cannot name the unikernel: {e}")))?;
        if tree.find_unikernel(&name).is_none() && !taken_as_path(tree, &name) {
            return Ok(name);
        }
    }
    unreachable!("u32 suffixes run out")
}

/// Is `name` a path with a policy or with something below it?
fn taken_as_path(tree: &Resources, name: &Name) -> bool {
    let p = name.to_path();
    tree.iter_policies().any(|(q, _)| p.is_prefix_of(&q))
        || tree
            .iter_unikernels()
            .any(|(n, _)| p.is_prefix_of(n.path()))
}

/// A file name made into a label: letters, digits, '-' and '.', at most
/// 63 characters.
fn sanitize_label(s: &str) -> String {
    let mut l: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    if l.is_empty() {
        l.push_str("unikernel");
    }
    l
}

/// The host's resources, the default root policy; `block_in_use` MB of
/// running unikernels' block devices count as available (they are already
/// allocated on disk).
pub fn host_policy(state_dir: &FsPath, block_in_use: u64) -> Policy {
    Policy {
        unikernels: u32::MAX,
        memory_mb: physical_memory_mb(),
        cpus: online_cpus(),
        block_mb: Some(free_disk_mb(state_dir).saturating_add(block_in_use)),
        bridges: host_bridges(),
    }
}

fn physical_memory_mb() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let (pages, size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    if pages <= 0 || size <= 0 {
        return 0;
    }
    (pages as u64).saturating_mul(size as u64) >> 20
}

/// The host's online CPUs (`/sys/devices/system/cpu/online`), whatever
/// this process's own affinity is (`taskset`, or `run --cpu` pinning
/// itself before its admission); the CPUs this process may use if that
/// file cannot be read.
pub fn online_cpus() -> BTreeSet<u16> {
    std::fs::read_to_string("/sys/devices/system/cpu/online")
        .ok()
        .and_then(|s| crate::cli::parse_cpu_list(s.trim()).ok())
        .filter(|set| !set.is_empty())
        .unwrap_or_else(host_cpus)
}

/// The CPUs this process may run on.
pub fn host_cpus() -> BTreeSet<u16> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity writes at most
    // size_of::<cpu_set_t>() bytes into it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if r != 0 {
        return BTreeSet::from([0]);
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: i < CPU_SETSIZE, the bound CPU_ISSET requires.
        .filter(|&i| unsafe { libc::CPU_ISSET(i, &set) })
        .map(|i| i as u16)
        .collect()
}

/// Pin this process to `cpu`.
pub fn pin_to_cpu(cpu: u16) -> Result<(), AdmitError> {
    if !host_cpus().contains(&cpu) {
        return Err(AdmitError::Invalid(format!(
            "--cpu {cpu}: not a CPU this process may run on (available: {})",
            crate::resources::CpuList(&host_cpus())
        )));
    }
    // SAFETY: as in host_cpus; cpu < CPU_SETSIZE since it was in the set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    unsafe { libc::CPU_SET(cpu as usize, &mut set) };
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if r != 0 {
        return Err(AdmitError::Invalid(format!(
            "--cpu {cpu}: cannot pin to it: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

fn free_disk_mb(dir: &FsPath) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return 0;
    };
    // SAFETY: statvfs is plain data, and statvfs() writes only into it.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return 0;
    }
    (st.f_bavail as u64).saturating_mul(st.f_frsize as u64) >> 20
}

/// Every bridge and TAP/TUN interface on the host (the networks a
/// unikernel can be attached to).
fn host_bridges() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    if let Ok(rd) = std::fs::read_dir("/sys/class/net") {
        for e in rd.flatten() {
            let p = e.path();
            if p.join("bridge").exists() || p.join("tun_flags").exists() {
                out.insert(e.file_name().to_string_lossy().into_owned());
            }
        }
    }
    out
}

/// The network a TAP interface connects a unikernel to: the bridge it is
/// a port of, or the TAP itself when it is in no bridge.
pub fn network_of_tap(tap: &str) -> String {
    std::fs::read_link(format!("/sys/class/net/{tap}/master"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| tap.to_string())
}

/// Start time (clock ticks since boot) of process `pid`, and whether it is
/// a zombie, from /proc/PID/stat.
fn proc_start(pid: u32) -> Option<(u64, bool)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may
    // itself contain spaces and parentheses.
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest's fields start at field 3 (state); starttime is field 22.
    let state = f.first()?;
    let start = f.get(19)?.parse().ok()?;
    Some((start, *state == "Z" || *state == "X"))
}

fn own_start_time() -> u64 {
    proc_start(std::process::id()).map_or(0, |(s, _)| s)
}

/// Is the process that registered an entry still running?
fn alive(pid: u32, start: u64) -> bool {
    matches!(proc_start(pid), Some((s, false)) if s == start)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> StateDir {
        let d = std::env::temp_dir().join(format!("tt-admission-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        StateDir::resolve(Some(&d))
    }

    fn uk(mem: u64) -> Unikernel {
        Unikernel {
            memory_mb: mem,
            cpus: host_cpus(),
            block_mb: 0,
            bridges: BTreeSet::new(),
        }
    }

    /// An entry whose pid is nobody here (above the kernel's pid_max),
    /// with lock file `lock` (None: an entry from before lock files).
    fn gone(name: &str, lock: Option<&str>) -> Running {
        Running {
            name: name.into(),
            pid: 1 << 23,
            start: 1,
            resources: uk(8),
            lock: lock.map(Into::into),
            in_file: false,
        }
    }

    /// Store `entries` as running, as other tt-host processes would.
    fn store(sd: &StateDir, entries: impl IntoIterator<Item = Running>) {
        let mut st = sd.lock().unwrap();
        st.stored.running.extend(entries);
        st.save().unwrap();
    }

    #[test]
    fn admissions_persist_and_release_on_drop() {
        let sd = scratch("persist");
        let alice: Path = "alice".parse().unwrap();
        sd.set_policy(
            &alice,
            &PolicyChange {
                unikernels: Some(1),
                ..PolicyChange::default()
            },
        )
        .unwrap();
        let name: Name = "alice:a".parse().unwrap();
        let a = sd.admit(Some(&name), "x", uk(8)).unwrap();
        let other: Name = "alice:b".parse().unwrap();
        let e = sd.admit(Some(&other), "x", uk(8)).unwrap_err();
        assert!(e.to_string().contains("alice: unikernels: limit 1"), "{e}");
        drop(a);
        let b = sd.admit(Some(&other), "x", uk(8)).unwrap();
        let shown = sd.show(&Path::root()).unwrap();
        assert!(shown.contains('b') && !shown.contains(" a "), "{shown}");
        drop(b);
        std::fs::remove_dir_all(sd.path()).unwrap();
    }

    /// A launch and its exit touch only the entry's own file: state.json
    /// (policies) is neither rewritten nor synced, yet other readers see
    /// the entry while it runs and not after.
    #[test]
    fn a_launch_leaves_state_json_alone() {
        use std::os::unix::fs::MetadataExt;
        let sd = scratch("nosync");
        let alice: Path = "alice".parse().unwrap();
        let one = PolicyChange {
            unikernels: Some(1),
            ..PolicyChange::default()
        };
        sd.set_policy(&alice, &one).unwrap();
        let state = sd.path().join(STATE_FILE);
        let before = (
            std::fs::read(&state).unwrap(),
            state.metadata().unwrap().ino(),
        );
        let name: Name = "alice:a".parse().unwrap();
        let a = sd.admit(Some(&name), "x", uk(8)).unwrap();
        let other = StateDir::resolve(Some(sd.path()));
        let shown = other.show(&Path::root()).unwrap();
        assert!(
            shown.contains("unikernels 1/1") && shown.contains("running"),
            "{shown}"
        );
        let e = other.admit(Some(&"alice:b".parse().unwrap()), "x", uk(8));
        assert!(e.unwrap_err().to_string().contains("limit 1, in use 1"));
        drop(a);
        let shown = other.show(&Path::root()).unwrap();
        assert!(
            shown.contains("unikernels 0/1") && !shown.contains("running"),
            "{shown}"
        );
        let after = (
            std::fs::read(&state).unwrap(),
            state.metadata().unwrap().ino(),
        );
        assert_eq!(before, after, "state.json was rewritten");
        let files = std::fs::read_dir(sd.path().join(RUNNING_DIR))
            .unwrap()
            .count();
        assert_eq!(files, 0, "the entry file is removed at exit");
        std::fs::remove_dir_all(sd.path()).unwrap();
    }

    #[test]
    fn unnamed_launches_get_unique_names() {
        let sd = scratch("unique");
        let a = sd.admit(None, "hello.hvt", uk(8)).unwrap();
        let b = sd.admit(None, "hello.hvt", uk(8)).unwrap();
        assert_eq!(a.name().to_string(), "hello.hvt");
        assert_eq!(b.name().to_string(), "hello.hvt.2");
        let weird = sd.admit(None, "my image!", uk(8)).unwrap();
        assert_eq!(weird.name().to_string(), "my-image-");
        drop((a, b, weird));
        std::fs::remove_dir_all(sd.path()).unwrap();
    }

    #[test]
    fn entries_of_dead_processes_are_reaped() {
        let sd = scratch("reap");
        let root = Path::root();
        sd.set_policy(
            &root,
            &PolicyChange {
                unikernels: Some(1),
                ..PolicyChange::default()
            },
        )
        .unwrap();
        // An entry left by a process that is gone (a pid that cannot be
        // running: above the kernel's pid_max).
        store(&sd, [gone("ghost", None)]);
        let a = sd.admit(None, "live", uk(8)).unwrap();
        assert!(!sd.show(&root).unwrap().contains("ghost"));
        drop(a);
        std::fs::remove_dir_all(sd.path()).unwrap();
    }

    #[test]
    fn an_empty_state_dir_variable_means_the_default_not_the_current_dir() {
        let given = FsPath::new("/given");
        let resolve = |env: Option<&str>| StateDir::resolve_from(None, env.map(Into::into)).dir;
        assert_eq!(resolve(Some("")), PathBuf::from(DEFAULT_STATE_DIR));
        assert_eq!(resolve(None), PathBuf::from(DEFAULT_STATE_DIR));
        assert_eq!(resolve(Some("/env")), PathBuf::from("/env"));
        let d = StateDir::resolve_from(Some(given), Some("/env".into())).dir;
        assert_eq!(d, given, "--state-dir wins over the variable");
    }

    /// Removing the root policy goes back to the host's resources only if
    /// what is stored fits in them as they are; the host default is not
    /// widened to make it fit (which let everything below exceed the
    /// host).
    #[test]
    fn removing_the_root_policy_refuses_what_the_host_cannot_hold() {
        let sd = scratch("unroot");
        let huge = physical_memory_mb().saturating_mul(4).max(1);
        let set = |path: &str, mem| {
            sd.set_policy(
                &path.parse().unwrap(),
                &PolicyChange {
                    memory_mb: Some(mem),
                    ..PolicyChange::default()
                },
            )
        };
        set(":", huge).unwrap();
        set("alice", huge).unwrap();
        let e = sd.remove_policy(&Path::root()).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("cannot go back to the host's resources")
                && msg.contains("the stored policy at alice"),
            "{msg}"
        );
        // Nothing changed: the root policy is still there.
        assert!(!sd
            .show(&Path::root())
            .unwrap()
            .contains("the host's resources"));
        // Once alice fits in the host, the root can go back to it.
        set("alice", 1).unwrap();
        sd.remove_policy(&Path::root()).unwrap();
        assert!(sd
            .show(&Path::root())
            .unwrap()
            .contains("the host's resources"));
        std::fs::remove_dir_all(sd.path()).unwrap();
    }

    /// The root's CPUs are the host's, not this process's affinity: a
    /// `policy set` under `taskset -c 0` must not shrink the root to CPU 0.
    #[test]
    fn the_host_default_has_the_online_cpus_whatever_the_affinity() {
        let online = online_cpus();
        // SAFETY: cpu_set_t is plain data; the calls read/write one set
        // for this thread (pid 0).
        unsafe {
            let mut saved: libc::cpu_set_t = std::mem::zeroed();
            let size = std::mem::size_of::<libc::cpu_set_t>();
            assert_eq!(libc::sched_getaffinity(0, size, &mut saved), 0);
            let mut only0: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(*online.first().unwrap() as usize, &mut only0);
            assert_eq!(libc::sched_setaffinity(0, size, &only0), 0);
            let cpus = host_policy(FsPath::new("/"), 0).cpus;
            assert_eq!(libc::sched_setaffinity(0, size, &saved), 0);
            assert_eq!(cpus, online);
        }
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert!(online.len() >= n, "{online:?} vs {n} CPUs");
    }

    /// Stored numbers are input too: block sizes that add up past u64
    /// are refused as a bad state, not an overflow (a panic in debug).
    #[test]
    fn stored_block_use_that_overflows_is_a_bad_state() {
        let sd = scratch("overflow");
        // Entries of a live process (this one), so they are not reaped.
        store(
            &sd,
            [("a", u64::MAX), ("b", 1)].map(|(name, block_mb)| Running {
                pid: std::process::id(),
                start: own_start_time(),
                resources: Unikernel { block_mb, ..uk(8) },
                ..gone(name, None)
            }),
        );
        let e = sd.show(&Path::root()).unwrap_err();
        assert!(e.to_string().contains("past 2^64 MB"), "{e}");
        let e = sd.admit(None, "x", uk(8)).unwrap_err();
        assert!(e.to_string().contains("past 2^64 MB"), "{e}");
        // With a root policy set, the tree's own checks refuse it.
        let mut st = sd.lock().unwrap();
        st.stored.root = Some(host_policy(sd.path(), 0));
        st.save().unwrap();
        drop(st);
        let e = sd.show(&Path::root()).unwrap_err();
        assert!(matches!(e, AdmitError::BadState { .. }), "{e}");
        std::fs::remove_dir_all(sd.path()).unwrap();
    }

    #[test]
    fn a_state_file_that_is_not_a_regular_file_is_refused_not_read() {
        let sd = scratch("fifo");
        std::fs::create_dir_all(sd.path()).unwrap();
        let fifo = std::ffi::CString::new(
            sd.path()
                .join(STATE_FILE)
                .into_os_string()
                .into_encoded_bytes(),
        )
        .unwrap();
        // SAFETY: mkfifo reads a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        // Reading it would block until a writer comes: never.
        let e = sd.show(&Path::root()).unwrap_err();
        assert!(
            e.to_string().contains("state.json is not a regular file"),
            "{e}"
        );
        std::fs::remove_dir_all(sd.path()).unwrap();
    }

    /// Whether an entry still runs is its lock file's flock, not its pid:
    /// an entry whose process id means nothing here (another PID
    /// namespace, another /proc) stays while its file is held, and goes
    /// once it is not (its process was killed: the kernel dropped the lock).
    #[test]
    fn entries_live_while_their_lock_is_held_whatever_their_pid() {
        let sd = scratch("flock");
        sd.set_policy(
            &Path::root(),
            &PolicyChange {
                unikernels: Some(2),
                ..PolicyChange::default()
            },
        )
        .unwrap();
        let running = sd.path().join(RUNNING_DIR);
        // One entry as another namespace's tt-host writes it: a pid that
        // is nobody here, its file locked (by this test, standing in for
        // that process).
        std::fs::create_dir_all(&running).unwrap();
        let held = File::create(running.join("foreign.lock")).unwrap();
        assert!(try_flock(&held));
        // One left by a killed process: its file exists, nobody holds it.
        File::create(running.join("killed.lock")).unwrap();
        store(
            &sd,
            [
                gone("foreign", Some("foreign.lock")),
                gone("killed", Some("killed.lock")),
            ],
        );
        let a = sd.admit(None, "live", uk(8)).unwrap();
        let shown = sd.show(&Path::root()).unwrap();
        assert!(
            shown.contains("foreign") && !shown.contains("killed"),
            "{shown}"
        );
        assert!(
            !running.join("killed.lock").exists(),
            "a reaped entry's file is removed"
        );
        // The limit of 2 is reached: foreign + live.
        let e = sd.admit(None, "third", uk(8)).unwrap_err();
        assert!(e.to_string().contains("unikernels: limit 2"), "{e}");
        // The foreign process ends: its entry is reaped, its slot free.
        drop(held);
        let b = sd.admit(None, "third", uk(8)).unwrap();
        drop((a, b));
        let left = std::fs::read_dir(&running).unwrap().count();
        assert_eq!(left, 0, "released entries remove their files");
        std::fs::remove_dir_all(sd.path()).unwrap();
    }

    /// A lock file name comes from state.json and a reaped entry's file
    /// is deleted: one that is a path outside running/ is a bad state,
    /// never opened or removed.
    #[test]
    fn a_stored_lock_name_that_is_a_path_is_refused() {
        let sd = scratch("lockpath");
        let victim = sd.path().join("victim");
        store(&sd, [gone("x", Some("../victim"))]);
        std::fs::write(&victim, b"keep me").unwrap();
        let e = sd.admit(None, "y", uk(8)).unwrap_err();
        assert!(e.to_string().contains("not a file name"), "{e}");
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep me");
        std::fs::remove_dir_all(sd.path()).unwrap();
    }

    #[test]
    fn a_garbled_state_file_is_an_error_naming_it() {
        let sd = scratch("garbled");
        std::fs::create_dir_all(sd.path()).unwrap();
        std::fs::write(sd.path().join(STATE_FILE), b"{\"version\": 1, \"root\": 7").unwrap();
        let e = sd.admit(None, "x", uk(8)).unwrap_err();
        assert!(e.to_string().contains("state.json does not parse"), "{e}");
        std::fs::remove_dir_all(sd.path()).unwrap();
    }

    /// Make a FIFO at `path`.
    fn mkfifo(path: &FsPath) {
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo reads a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }

    /// Run `f` on a thread; its result, or a failure if it takes longer
    /// than 20 s (it hangs: the thread is left blocked).
    fn within<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(std::time::Duration::from_secs(20))
            .expect("hangs")
    }

    /// An entry's file in running/ that is a FIFO (put there by hand, or
    /// by a hostile user of the directory) must not block the reaper,
    /// which holds the state lock: every tt-host would wait behind it.
    #[test]
    fn a_fifo_in_running_does_not_hang_the_reaper() {
        let sd = scratch("lockfifo");
        std::fs::create_dir_all(sd.path().join(RUNNING_DIR)).unwrap();
        mkfifo(&sd.path().join(RUNNING_DIR).join("x.lock"));
        store(&sd, [gone("x", Some("x.lock"))]);
        let sd2 = sd.clone();
        let shown = within(move || sd2.show(&Path::root())).unwrap();
        // Nobody holds it: the entry is dead.
        assert!(!shown.contains(" x "), "{shown}");
        std::fs::remove_dir_all(sd.path()).unwrap();
    }

    /// A `state.json.tmp` left behind (a crash, another user) is replaced,
    /// never written through: not into a symlink's target, not into a FIFO
    /// (which blocks until a reader comes: never).
    #[test]
    fn a_leftover_temporary_state_file_is_replaced_not_written_through() {
        let sd = scratch("tmplink");
        std::fs::create_dir_all(sd.path()).unwrap();
        let victim = sd.path().join("victim");
        std::fs::write(&victim, b"keep me").unwrap();
        let tmp = sd.path().join(format!("{STATE_FILE}.tmp"));
        std::os::unix::fs::symlink(&victim, &tmp).unwrap();
        let one = PolicyChange {
            unikernels: Some(1),
            ..PolicyChange::default()
        };
        sd.set_policy(&"alice".parse().unwrap(), &one).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep me");
        let state = sd.path().join(STATE_FILE);
        assert!(std::fs::symlink_metadata(&state).unwrap().is_file());
        assert!(sd.show(&Path::root()).unwrap().contains("alice"));

        mkfifo(&tmp);
        let sd2 = sd.clone();
        within(move || sd2.set_policy(&"bob".parse().unwrap(), &one)).unwrap();
        assert!(sd.show(&Path::root()).unwrap().contains("bob"));
        std::fs::remove_dir_all(sd.path()).unwrap();
    }

    /// A stored policy path that spells the root ("", ":", "(root)") would
    /// silently replace the root policy, and a path listed twice would
    /// keep whichever comes last: both are a bad state naming state.json.
    #[test]
    fn a_stored_policy_at_the_root_or_listed_twice_is_a_bad_state() {
        for (key, again) in [("", None), (":", None), ("(root)", None), ("a", Some("a"))] {
            let sd = scratch("rootkey");
            let pol = host_policy(FsPath::new("/"), 0);
            let mut st = sd.lock().unwrap();
            st.stored.policies.push((key.into(), pol.clone()));
            if let Some(k) = again {
                st.stored.policies.push((k.into(), pol.clone()));
            }
            st.save().unwrap();
            drop(st);
            let e = sd.show(&Path::root()).unwrap_err();
            assert!(matches!(e, AdmitError::BadState { .. }), "{key:?}: {e}");
            let msg = e.to_string();
            assert!(msg.contains("state.json"), "{key:?}: {msg}");
            std::fs::remove_dir_all(sd.path()).unwrap();
        }
    }

    /// Every message about an impossible stored tree names state.json.
    #[test]
    fn stored_inconsistencies_name_the_state_file() {
        let sd = scratch("inconsistent");
        let alive = |name: &str| Running {
            pid: std::process::id(),
            start: own_start_time(),
            ..gone(name, None)
        };
        store(&sd, [alive("a"), alive("a")]);
        let e = sd.show(&Path::root()).unwrap_err();
        assert!(
            e.to_string()
                .contains("state.json: the running unikernel a"),
            "{e}"
        );
        let mut st = sd.lock().unwrap();
        st.stored.running = vec![alive("a::b")];
        st.save().unwrap();
        drop(st);
        let e = sd.show(&Path::root()).unwrap_err();
        assert!(
            e.to_string().contains("state.json: stored unikernel name"),
            "{e}"
        );
        std::fs::remove_dir_all(sd.path()).unwrap();
    }

    /// The name of an entry's file in running/ is its process id and start
    /// time; a tt-host in another PID namespace can have both. A file of
    /// that name held by someone else is no reason to refuse the launch.
    #[test]
    fn an_entry_file_name_held_by_another_process_is_skipped() {
        let sd = scratch("collide");
        let running = sd.path().join(RUNNING_DIR);
        std::fs::create_dir_all(&running).unwrap();
        let (pid, start) = (std::process::id(), own_start_time());
        let next = ENTRY_N.load(std::sync::atomic::Ordering::Relaxed);
        let held: Vec<File> = (next..next + 64)
            .map(|n| {
                let f = File::create(running.join(format!("{pid}-{start}-{n}.lock"))).unwrap();
                assert!(try_flock(&f));
                f
            })
            .collect();
        let a = sd.admit(None, "x", uk(8)).unwrap();
        drop(a);
        drop(held);
        std::fs::remove_dir_all(sd.path()).unwrap();
    }

    /// Releasing removes this admission's own entry, the one on its file,
    /// not another entry of the same name, pid and start time (another
    /// PID namespace's tt-host, admitted after this entry was reaped).
    #[test]
    fn release_removes_only_its_own_entry() {
        let sd = scratch("release");
        let name: Name = "web".parse().unwrap();
        let a = sd.admit(Some(&name), "x", uk(8)).unwrap();
        let running = sd.path().join(RUNNING_DIR);
        let held = File::create(running.join("foreign.lock")).unwrap();
        assert!(try_flock(&held));
        let mut st = sd.lock().unwrap();
        st.stored.running = vec![Running {
            pid: std::process::id(),
            start: own_start_time(),
            ..gone("web", Some("foreign.lock"))
        }];
        st.save().unwrap();
        drop(st);
        drop(a);
        let shown = sd.show(&Path::root()).unwrap();
        assert!(shown.contains("web"), "the foreign entry stays: {shown}");
        drop(held);
        std::fs::remove_dir_all(sd.path()).unwrap();
    }

    /// Two entries on one lock file: releasing either deletes the file, and
    /// the other, still running, would then be reaped. A bad state.
    #[test]
    fn two_entries_on_one_lock_file_are_a_bad_state() {
        let sd = scratch("sharedlock");
        store(&sd, [gone("a", Some("x.lock")), gone("b", Some("x.lock"))]);
        let e = sd.admit(None, "y", uk(8)).unwrap_err();
        assert!(
            e.to_string()
                .contains("state.json: lock file \"x.lock\" is listed for two running unikernels"),
            "{e}"
        );
        std::fs::remove_dir_all(sd.path()).unwrap();
    }

    /// Admissions at once contend on the state lock's flock (each opens
    /// the lock file itself, as separate processes do): under a policy of
    /// five, sixteen at once admit exactly five, and the refusals name the
    /// policy and the numbers.
    #[test]
    fn admissions_at_once_never_share_the_last_slot() {
        let sd = scratch("race");
        let five = PolicyChange {
            unikernels: Some(5),
            ..PolicyChange::default()
        };
        sd.set_policy(&"alice".parse().unwrap(), &five).unwrap();
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(16));
        let threads: Vec<_> = (0..16)
            .map(|i| {
                let (sd, barrier) = (sd.clone(), barrier.clone());
                std::thread::spawn(move || {
                    let name: Name = format!("alice:u{i}").parse().unwrap();
                    barrier.wait();
                    sd.admit(Some(&name), "x", uk(8))
                })
            })
            .collect();
        let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let admitted = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(admitted, 5);
        for e in results.iter().filter_map(|r| r.as_ref().err()) {
            assert_eq!(
                e.to_string(),
                "refused: alice: unikernels: limit 5, in use 5, requested 1"
            );
        }
        drop(results);
        assert!(!sd.show(&Path::root()).unwrap().contains("alice:u"));
        std::fs::remove_dir_all(sd.path()).unwrap();
    }
}
