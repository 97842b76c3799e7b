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
//! The directory is its owner's alone (module `private`): made 0700 with
//! 0600 files whatever the umask; one that another user owns or others
//! can write is refused, as is a symbolic link inside it (every file is
//! opened relative to its directory with `O_NOFOLLOW`); and cleanup
//! removes only files named as tt-host names its entries. So no other
//! user can hold the state lock or an entry's lock. A wait for the state
//! lock ends on SIGINT or SIGTERM ([`AdmitError::Signal`]), and a
//! `state.json` over [`STATE_FILE_MAX`] is refused unread.
//!
//! A policy stores only the fields `tt-host policy set` was given
//! ([`PartialPolicy`]); the others are inherited, when each launch is
//! checked, from the nearest policy above that sets them, and at the root from the host as it is at that moment:
//! all online CPUs, the physical memory, no limit on unikernels, **no
//! limit on block storage**, and every bridge and TAP interface (TAPs
//! made after the policy was set included). The root's block limit is
//! unlimited unless a policy sets one: the free space of the state
//! directory's file system says nothing of the file systems that hold the
//! disk images (and a FUSE mount reports none), so block storage is
//! bounded only by the `--block` limits that policies set. A stored policy
//! or running unikernel beyond the host's resources (the host changed
//! since) widens the default, so the stored tree stays consistent. A
//! policy stored by an older tt-host, with every field copied from above,
//! still loads, with every field set; `policy set PATH --FIELD inherit`
//! unsets one. A policy's access grants (`users`, `groups`: uids and
//! gids) are stored with it when set and left out otherwise, so a
//! `state.json` without them loads as before and an older tt-host reads
//! one with them (and drops them if it rewrites the file).

mod host;
mod legacy;
mod names;
mod private;
mod store;
#[cfg(test)]
mod tests;

pub use crate::resources::PolicyChange;
pub use host::{host_cpus, host_policy, network_of_tap, online_cpus, pin_to_cpu};
pub use private::{create_private_dir, NotPrivate, DIR_MODE, FILE_MODE};
pub use store::STATE_FILE_MAX;

use crate::resources::{Name, PartialPolicy, Path, Policy, Refusal, Resources, Unikernel};
use legacy::own_start_time;
use names::unique_name;
use std::collections::BTreeSet;
use std::fs::File;
use std::io::Write;
use std::path::{Path as FsPath, PathBuf};
use store::{try_flock, Locked, Running, ENTRY_N, RUNNING_DIR, STATE_FILE};

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
    /// A path in the state directory is not the user's own, or others
    /// can write it, or it is a symbolic link.
    #[error("state directory: {0}")]
    NotPrivate(#[from] private::NotPrivate),
    /// SIGINT or SIGTERM came while waiting for the state lock.
    #[error(
        "exiting on signal {0} ({name}) while waiting for the state directory's lock",
        name = crate::vmm::signal::name(*.0)
    )]
    Signal(i32),
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
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

    fn open_err(&self, what: impl Into<String>, e: private::OpenError) -> AdmitError {
        match e {
            private::OpenError::NotPrivate(p) => AdmitError::NotPrivate(p),
            private::OpenError::Io(err) => self.io(what)(err),
        }
    }

    fn bad(&self, what: impl Into<String>) -> AdmitError {
        AdmitError::BadState {
            dir: self.dir.display().to_string(),
            what: what.into(),
        }
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
        let dir = match st.running.take() {
            Some(d) => d,
            None => st
                .dir
                .subdir(RUNNING_DIR, true)
                .map_err(|e| self.open_err(format!("cannot create {RUNNING_DIR}/"), e))?
                .ok_or_else(|| self.bad(format!("{RUNNING_DIR}/ vanished")))?,
        };
        // A new file of its own (0600): the name (pid, start time) can be
        // taken by a tt-host in another PID namespace, or by a file left
        // over.
        let mut tries = 0;
        let (lock_name, held) = loop {
            let n = ENTRY_N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let lock_name = format!("{pid}-{start}-{n}.lock");
            match dir.create_new(&lock_name) {
                Ok(f) => break (lock_name, f),
                Err(private::OpenError::Io(e))
                    if e.kind() == std::io::ErrorKind::AlreadyExists && tries < 1000 =>
                {
                    tries += 1;
                }
                Err(e) => {
                    return Err(self.open_err(format!("cannot create running/{lock_name}"), e))
                }
            }
        };
        // Nobody else opens a file no entry names yet (reapers open only
        // those, under the state lock that this process holds).
        if !try_flock(&held) {
            let err = std::io::Error::last_os_error();
            let _ = dir.unlink(&lock_name);
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
            let _ = dir.unlink(&lock_name);
            return Err(self.io(format!("cannot write running/{lock_name}"))(e));
        }
        drop(st);
        Ok(Admission {
            running: dir,
            name,
            lock_name,
            _held: held,
            keep_entry: false,
        })
    }

    /// Is `held` the admission entry `lock_name` of this state directory
    /// (what [`adopt`](Self::adopt) takes over)?
    pub fn check_adoptable(&self, held: &File, lock_name: &str) -> Result<(), AdmitError> {
        use std::os::unix::fs::MetadataExt;
        let bad_name = lock_name.contains('/') || !lock_name.ends_with(".lock");
        let path = self.dir.join(RUNNING_DIR).join(lock_name);
        let there = std::fs::symlink_metadata(&path).ok();
        let mine = held
            .metadata()
            .map_err(self.io("cannot stat the handed-over entry"))?;
        if bad_name || !there.is_some_and(|m| m.dev() == mine.dev() && m.ino() == mine.ino()) {
            return Err(self.bad(format!(
                "the admission entry handed over ({lock_name}) is not one of this state \
                 directory's"
            )));
        }
        Ok(())
    }

    /// Take over the admission entry of another tt-host of this state
    /// directory, as a local live migration hands it over: `held` is that
    /// entry's file, open with its flock held (passed over a Unix socket),
    /// named `lock_name` in `running/`. The entry is rewritten with this
    /// process's pid; nothing is admitted twice. Refused if `held` is not
    /// that file of this state directory.
    pub fn adopt(&self, held: File, lock_name: &str) -> Result<Admission, AdmitError> {
        use std::os::unix::fs::FileExt;
        let st = self.lock()?;
        self.check_adoptable(&held, lock_name)?;
        let dir = st
            .dir
            .subdir(RUNNING_DIR, false)
            .map_err(|e| self.open_err(format!("cannot open {RUNNING_DIR}/"), e))?
            .ok_or_else(|| self.bad(format!("{RUNNING_DIR}/ is missing")))?;
        let mine = held
            .metadata()
            .map_err(self.io("cannot stat the handed-over entry"))?;
        let mut bytes = vec![0u8; mine.len().min(1 << 20) as usize];
        held.read_exact_at(&mut bytes, 0)
            .map_err(self.io(format!("cannot read running/{lock_name}")))?;
        let mut entry: Running = serde_json::from_slice(&bytes)
            .map_err(|e| self.bad(format!("running/{lock_name}: {e}")))?;
        (entry.pid, entry.start) = (std::process::id(), own_start_time());
        let name: Name = entry
            .name
            .parse()
            .map_err(|e| self.bad(format!("running/{lock_name}: its name: {e}")))?;
        let bytes = serde_json::to_vec(&entry)
            .map_err(|e| self.bad(format!("cannot encode the entry: {e}")))?;
        held.set_len(0)
            .and_then(|()| held.write_all_at(&bytes, 0))
            .map_err(self.io(format!("cannot write running/{lock_name}")))?;
        drop(st);
        Ok(Admission {
            running: dir,
            name,
            lock_name: lock_name.to_string(),
            _held: held,
            keep_entry: false,
        })
    }

    /// Change the policy at `path` (a new one sets nothing until then):
    /// set the fields `change` sets, unset those it inherits (then
    /// inherited from above), keep the others. Returns the policy in force
    /// at `path` now.
    pub fn set_policy(&self, path: &Path, change: &PolicyChange) -> Result<Policy, AdmitError> {
        let mut st = self.lock()?;
        st.reap();
        let mut tree = st.tree()?;
        let key = path.to_string();
        let mut set = if path.is_root() {
            st.stored.root.clone()
        } else {
            let stored = st.stored.policies.iter();
            stored
                .rev()
                .find(|(p, _)| *p == key)
                .map(|(_, p)| p.clone())
        }
        .unwrap_or_default();
        change.apply(&mut set);
        tree.set_policy(path, set.clone())?;
        let now = tree.find_policy(path).cloned().expect("set just above");
        if path.is_root() {
            st.stored.root = Some(set);
        } else {
            st.stored.policies.retain(|(p, _)| *p != key);
            st.stored.policies.push((key, set));
        }
        st.save()?;
        Ok(now)
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
            st.build_tree(host_policy(), true)?;
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

impl StateDir {
    /// The processes of the unikernels running now (after reaping): name
    /// and pid, for a node that must stop them all (cluster fencing).
    pub fn running_pids(&self) -> Result<Vec<(String, u32)>, AdmitError> {
        let mut st = self.lock()?;
        st.reap();
        Ok(st
            .stored
            .running
            .iter()
            .map(|r| (r.name.clone(), r.pid))
            .collect())
    }

    /// The policy tree and the unikernels running in it, as stored now
    /// (after reaping), as a copy: for access checks
    /// ([`Resources::may_act_on_unikernel`] and the others) and listings.
    /// It may be out of date as soon as it is returned.
    pub fn resources(&self) -> Result<Resources, AdmitError> {
        let mut st = self.lock()?;
        st.reap();
        st.tree()
    }
}

impl Locked<'_> {
    /// The tree the stored state describes.
    fn tree(&self) -> Result<Resources, AdmitError> {
        self.build_tree(host_policy(), false)
    }

    /// The tree on `host` (the host's resources, [`host_policy`]: what the
    /// root's fields not set are), with `strict`: the root is `host`, not
    /// widened to what is stored, and what does not fit in it is an
    /// `Invalid` error naming it (for removing the root policy).
    fn build_tree(&self, mut host: Policy, strict: bool) -> Result<Resources, AdmitError> {
        let sd = self.sd;
        let mut policies: Vec<(Path, &PartialPolicy)> = Vec::new();
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
        let used = running
            .iter()
            .try_fold(0u64, |sum, (_, u)| sum.checked_add(u.block_mb))
            .ok_or_else(|| {
                sd.bad(format!(
                    "{STATE_FILE}: the stored unikernels' block use adds up past 2^64 MB"
                ))
            })?;
        let root = self.stored.root.as_ref();
        if strict {
            return Self::fill(host, root, policies, running, |what, e| {
                AdmitError::Invalid(format!(
                    "cannot go back to the host's resources: {what} does not fit in them: {e}"
                ))
            });
        }
        // Widen the host's resources to what is stored, in case the host
        // changed since (a CPU offline, a bridge gone).
        for (_, p) in &policies {
            widen(&mut host, p);
        }
        if let Some(p) = root {
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
        Self::fill(host, root, policies, running, |what, e| {
            sd.bad(format!("{STATE_FILE}: {what} is inconsistent: {e}"))
        })
    }

    /// A tree with `host` as the root's default and `root` set over it,
    /// then the policies and the running unikernels; `err` makes the error
    /// for one that does not fit.
    fn fill(
        host: Policy,
        root: Option<&PartialPolicy>,
        mut policies: Vec<(Path, &PartialPolicy)>,
        running: Vec<(Name, &Unikernel)>,
        err: impl Fn(String, String) -> AdmitError,
    ) -> Result<Resources, AdmitError> {
        let mut tree = Resources::with_default(host);
        if let Some(p) = root {
            tree.set_policy(&Path::root(), p.clone())
                .map_err(|e| err("the stored root policy".into(), e.to_string()))?;
        }
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
}

/// A launch's reservation: released (under the lock) when dropped. A
/// process that dies without dropping it is reaped instead.
#[derive(Debug)]
pub struct Admission {
    /// `running/`, open.
    running: private::Dir,
    name: Name,
    /// Its file in `running/`, and that file open with its flock held.
    lock_name: String,
    _held: File,
    /// Handed over to another process (a local live migration): dropping
    /// this leaves the entry, which the other holds.
    keep_entry: bool,
}

impl Admission {
    /// The entry's file and name, to hand over ([`StateDir::adopt`]).
    pub fn entry(&self) -> (std::os::fd::RawFd, &str) {
        (
            std::os::fd::AsRawFd::as_raw_fd(&self._held),
            &self.lock_name,
        )
    }

    /// The entry was handed over: leave it when this is dropped.
    pub fn hand_over(&mut self) {
        self.keep_entry = true;
    }

    /// The name the unikernel was admitted under.
    pub fn name(&self) -> &Name {
        &self.name
    }

    /// The descriptor of `running/`, which releasing the entry removes a
    /// file from (the sandbox allows `unlinkat` there only).
    pub fn running_dir_fd(&self) -> std::os::fd::RawFd {
        self.running.raw_fd()
    }
}

impl Drop for Admission {
    /// Release: remove the entry's file, then let go of its flock (as
    /// `_held` drops). A reader either finds the file held, or does not
    /// find it, or takes the freed flock and reaps it: never a partial
    /// entry, and no state lock or `state.json` write is needed.
    fn drop(&mut self) {
        if self.keep_entry {
            return;
        }
        if let Err(e) = self.running.unlink(&self.lock_name) {
            if e.kind() != std::io::ErrorKind::NotFound {
                // Reaped by the next reader once this process has gone.
                eprintln!("tt-host: cannot release {}: {e}", self.name);
            }
        }
    }
}

/// Grow `host` so that the fields `p` sets fit in it.
fn widen(host: &mut Policy, p: &PartialPolicy) {
    if let Some(n) = p.unikernels {
        host.unikernels = host.unikernels.max(n);
    }
    if let Some(m) = p.memory_mb {
        host.memory_mb = host.memory_mb.max(m);
    }
    if let Some(c) = &p.cpus {
        host.cpus.extend(c.iter().copied());
    }
    if let Some(b) = &p.bridges {
        host.bridges.extend(b.iter().cloned());
    }
    if let Some(Some(b)) = p.block_mb {
        host.block_mb = Some(host.block_mb.unwrap_or(0).max(b));
    }
}
