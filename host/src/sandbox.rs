//! The sandbox: once the devices are open and the VM is built, tt-host
//! confines itself to the system calls that running a guest needs.
//!
//! [`confine`] first clears every capability of every thread
//! ([`drop_capabilities`]), then sets `PR_SET_NO_NEW_PRIVS` and installs a seccomp BPF
//! allowlist ([`filter`]) on every thread of the process at once
//! (`SECCOMP_FILTER_FLAG_TSYNC`): the vCPU thread and the device threads
//! that already run (journal committer and applier, virtio-blk worker,
//! block completion waiter). Any other system call kills the whole process
//! (`SECCOMP_RET_KILL_PROCESS`): it dies by `SIGSYS`, which a shell reports
//! as status 159 (128 + 31). A compromised VMM can then do little more than
//! the guest could: it cannot open sockets, execute programs, create
//! threads or processes, map executable memory, or issue KVM ioctls other
//! than those of the run loop.
//!
//! What stays allowed, and why:
//! - `ioctl` only with the request numbers of the run loop and the CPL 3
//!   monitor: `KVM_RUN`, `KVM_GET/SET_REGS`, `KVM_GET/SET_SREGS`,
//!   `KVM_GET/SET_MSRS`; no TUN or socket ioctl (nets are set up before);
//! - reads and writes on open descriptors (console, TAPs, block images,
//!   journals, eventfds), `fdatasync`/`fsync`, `ppoll`/`poll`;
//! - memory: `mmap`/`mprotect` without `PROT_EXEC`, `munmap`, `mremap`,
//!   `madvise`, `brk`;
//! - threads already running: `futex`, `sched_yield`, sleeps, clocks,
//!   signal return and masks, `exit`; and the last steps of a thread's
//!   start-up, which a device thread spawned just before may not have
//!   finished when the filter reaches it (`rseq`, `set_robust_list`,
//!   `prctl(PR_SET_NAME)`, `sigaltstack`, memory);
//! - `openat` read-only only, and `sched_getaffinity` (glibc's malloc
//!   reads a `/proc` file and counts CPUs as a thread first allocates): nothing is created or opened for writing;
//! - the end of a run: releasing the admission entry (`unlinkat` on the
//!   descriptor of the state directory's `running/`, which admission
//!   keeps open, and on no other; `flock`, `close`), `getrusage` (the
//!   stats file's end record), `exit_group`.
//!
//! `tt-host run --no-seccomp` skips the filter, for debugging.

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use std::collections::BTreeMap;
use std::os::fd::RawFd;

/// The environment variable of the test-only probe: set to `1`, tt-host
/// attempts a forbidden system call (`socket`) right after [`confine`], so
/// that a test can see the filter kill it. Without the filter the call
/// succeeds and the run goes on.
pub const PROBE_ENV: &str = "TT_HOST_TEST_SECCOMP_PROBE";

/// Why the sandbox could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("cannot build the seccomp filter: {0} (a bug in tt-host's allowlist)")]
    Build(#[source] seccompiler::BackendError),
    #[error(
        "cannot install the seccomp filter: {0} (the kernel needs seccomp filters with TSYNC, \
         Linux 3.17 or later; run with --no-seccomp to go without the sandbox)"
    )]
    Install(#[source] seccompiler::Error),
    #[error(
        "cannot drop the capabilities of tt-host's threads: {0} (run with --no-seccomp to go \
         without the sandbox)"
    )]
    Capabilities(String),
}

/// Threads that have dropped their capabilities, and those that failed.
static DROPPED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static DROP_FAILED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Clear the calling thread's capability sets (effective, permitted,
/// inheritable): async-signal-safe, one system call.
fn clear_own_capabilities() -> bool {
    // struct __user_cap_header_struct and two __user_cap_data_struct
    // (version 3: 64 capability bits), all zero but the version.
    let header: [u32; 2] = [0x2008_0522, 0]; // _LINUX_CAPABILITY_VERSION_3, this thread
    let data = [0u32; 6];
    // SAFETY: both pointers are valid for the sizes capset reads
    // (8 bytes of header, 2 x 12 bytes of data) for the call.
    unsafe { libc::syscall(libc::SYS_capset, header.as_ptr(), data.as_ptr()) == 0 }
}

extern "C" fn on_drop_signal(_: libc::c_int) {
    let counter = if clear_own_capabilities() {
        &DROPPED
    } else {
        &DROP_FAILED
    };
    counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
}

/// Clear the capabilities of every thread of tt-host (they are per
/// thread, and the device threads run already): each other thread gets
/// `SIGUSR2`, whose handler clears its own, as glibc makes every thread
/// take a `setuid`. After this, the process keeps root's user id (its
/// state directory and journals are root's) but no privilege beyond it:
/// no `CAP_DAC_OVERRIDE`, `CAP_NET_ADMIN`, `CAP_SYS_ADMIN`, ...
pub fn drop_capabilities() -> Result<(), SandboxError> {
    use std::sync::atomic::Ordering::SeqCst;
    let err = |what: String| SandboxError::Capabilities(what);
    // SAFETY: a zeroed sigaction is "no flags, empty mask"; the handler
    // does one system call and atomic increments (async-signal-safe).
    // SA_RESTART: the threads' own system calls go on after it.
    let rc = unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_drop_signal as *const () as libc::sighandler_t;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigaction(libc::SIGUSR2, &sa, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(err(format!(
            "sigaction: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: plain system calls without pointers.
    let (pid, me) = unsafe { (libc::getpid(), libc::gettid()) };
    let tasks =
        std::fs::read_dir("/proc/self/task").map_err(|e| err(format!("/proc/self/task: {e}")))?;
    let (before, failed_before) = (DROPPED.load(SeqCst), DROP_FAILED.load(SeqCst));
    let mut signalled = 0;
    for t in tasks.flatten() {
        let Some(tid) = t.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if tid == me {
            continue;
        }
        // SAFETY: plain system call; a thread that has ended meanwhile
        // gives ESRCH, which is fine.
        if unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, libc::SIGUSR2) } == 0 {
            signalled += 1;
        }
    }
    if !clear_own_capabilities() {
        return Err(err(format!("capset: {}", std::io::Error::last_os_error())));
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        let done = DROPPED.load(SeqCst) - before;
        let failed = DROP_FAILED.load(SeqCst) - failed_before;
        if failed > 0 {
            return Err(err(format!("{failed} threads could not clear theirs")));
        }
        if done >= signalled {
            // SAFETY: restoring the default disposition; no pointers kept.
            unsafe { libc::signal(libc::SIGUSR2, libc::SIG_DFL) };
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            return Err(err(format!("{} of {signalled} threads answered", done)));
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

// The ioctl request numbers the run loop and the CPL 3 monitor use.
vmm_sys_util::ioctl_io_nr!(KVM_RUN, kvm_bindings::KVMIO, 0x80);
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_REGS,
    kvm_bindings::KVMIO,
    0x81,
    kvm_bindings::kvm_regs
);
vmm_sys_util::ioctl_iow_nr!(
    KVM_SET_REGS,
    kvm_bindings::KVMIO,
    0x82,
    kvm_bindings::kvm_regs
);
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_SREGS,
    kvm_bindings::KVMIO,
    0x83,
    kvm_bindings::kvm_sregs
);
vmm_sys_util::ioctl_iow_nr!(
    KVM_SET_SREGS,
    kvm_bindings::KVMIO,
    0x84,
    kvm_bindings::kvm_sregs
);
vmm_sys_util::ioctl_iowr_nr!(
    KVM_GET_MSRS,
    kvm_bindings::KVMIO,
    0x88,
    kvm_bindings::kvm_msrs
);
vmm_sys_util::ioctl_iow_nr!(
    KVM_SET_MSRS,
    kvm_bindings::KVMIO,
    0x89,
    kvm_bindings::kvm_msrs
);

/// The ioctl request numbers allowed after setup.
pub fn allowed_ioctls() -> [std::os::raw::c_ulong; 7] {
    [
        KVM_RUN(),
        KVM_GET_REGS(),
        KVM_SET_REGS(),
        KVM_GET_SREGS(),
        KVM_SET_SREGS(),
        KVM_GET_MSRS(),
        KVM_SET_MSRS(),
    ]
}

vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_XSAVE,
    kvm_bindings::KVMIO,
    0xa4,
    kvm_bindings::kvm_xsave
);
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_XCRS,
    kvm_bindings::KVMIO,
    0xa6,
    kvm_bindings::kvm_xcrs
);
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_VCPU_EVENTS,
    kvm_bindings::KVMIO,
    0x9f,
    kvm_bindings::kvm_vcpu_events
);

vmm_sys_util::ioctl_iow_nr!(
    KVM_SET_USER_MEMORY_REGION,
    kvm_bindings::KVMIO,
    0x46,
    kvm_bindings::kvm_userspace_memory_region
);
vmm_sys_util::ioctl_iow_nr!(
    KVM_GET_DIRTY_LOG,
    kvm_bindings::KVMIO,
    0x42,
    kvm_bindings::kvm_dirty_log
);

/// The ioctls a snapshot or a migration adds (`--control`): the vCPU's
/// state beyond its registers, and dirty-page logging (turned on and off
/// on the existing memory slots, and read).
pub fn snapshot_ioctls() -> [std::os::raw::c_ulong; 5] {
    [
        KVM_GET_XSAVE(),
        KVM_GET_XCRS(),
        KVM_GET_VCPU_EVENTS(),
        KVM_SET_USER_MEMORY_REGION(),
        KVM_GET_DIRTY_LOG(),
    ]
}

/// System calls a control socket adds (`--control`).
const CONTROL: &[libc::c_long] = &[
    libc::SYS_accept4,
    libc::SYS_accept,
    libc::SYS_recvmsg,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_sendto,
    // Kicking the vCPU thread out of KVM_RUN (pthread_kill).
    libc::SYS_tgkill,
    // Sizing the snapshot's files.
    libc::SYS_ftruncate,
    // A migration's socket: its kind, its timeouts.
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
];

/// System calls allowed whatever their arguments.
const ALLOWED: &[libc::c_long] = &[
    // I/O on descriptors opened during setup.
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_lseek,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_ppoll,
    libc::SYS_poll,
    libc::SYS_close,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_fcntl,
    libc::SYS_flock,
    // Releasing the admission entry at exit: `unlinkat` in `running/`
    // only (see `rules`).
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getpid,
    libc::SYS_gettid,
    // The stats file's end record: this process's CPU time and peak RSS.
    libc::SYS_getrusage,
    // Memory (mmap and mprotect: see `rules`).
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    // glibc's malloc counts CPUs as a thread makes its first arena.
    libc::SYS_sched_getaffinity,
    // Threads that already run, time, signals.
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_clock_gettime,
    libc::SYS_gettimeofday,
    libc::SYS_getrandom,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_exit,
    libc::SYS_exit_group,
    // A device thread spawned just before the filter may still be
    // starting when TSYNC reaches it: glibc's and std's thread start-up
    // (prctl: see `rules`).
    libc::SYS_rseq,
    libc::SYS_set_robust_list,
];

type Built<T> = Result<T, seccompiler::BackendError>;

/// Argument `index` equals `value`.
fn arg_eq(index: u8, value: u64) -> Built<SeccompRule> {
    let cond = SeccompCondition::new(index, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)?;
    SeccompRule::new(vec![cond])
}

/// Argument `index`, a `PROT_*` set, lacks `PROT_EXEC`.
fn no_exec(index: u8) -> Built<SeccompRule> {
    let cond = SeccompCondition::new(
        index,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64),
        0,
    )?;
    SeccompRule::new(vec![cond])
}

/// The allowlist: system call number -> rules on its arguments (an empty
/// list allows the call whatever its arguments; otherwise one rule must
/// match).
///
/// `release_dir`: the descriptor of the state directory's `running/`,
/// the one directory a file may be removed from (the admission entry, at
/// exit); `None`: no file may be removed.
///
/// `control_dir`: with a control socket (`--control`), the descriptor of
/// its directory, from which the socket is removed at exit; the socket's
/// calls (accepting a client, messages with descriptors, kicking the vCPU
/// thread) and a snapshot's (the vCPU's other state, sizing the files it
/// writes) are then allowed too.
pub fn rules(
    release_dir: Option<RawFd>,
    control_dir: Option<RawFd>,
) -> Result<BTreeMap<i64, Vec<SeccompRule>>, SandboxError> {
    let built = || -> Built<_> {
        let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
            ALLOWED.iter().map(|&n| (n, Vec::new())).collect();
        let mut requests = allowed_ioctls().to_vec();
        if control_dir.is_some() {
            requests.extend(snapshot_ioctls());
            for n in CONTROL {
                rules.insert(*n, Vec::new());
            }
        }
        let ioctls = requests.into_iter().map(|req| arg_eq(1, req));
        rules.insert(libc::SYS_ioctl, ioctls.collect::<Built<_>>()?);
        // Allocation maps memory; nothing maps it executable.
        rules.insert(libc::SYS_mmap, vec![no_exec(2)?]);
        rules.insert(libc::SYS_mprotect, vec![no_exec(2)?]);
        // `unlinkat(running/, NAME, 0)` only: never a path of the host's
        // choosing relative to the working directory, never a directory.
        let mut unlink = Vec::new();
        for fd in [release_dir, control_dir]
            .into_iter()
            .flatten()
            .filter_map(|fd| u64::try_from(fd).ok())
        {
            let dir = SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, fd)?;
            let flags = SeccompCondition::new(2, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, 0)?;
            unlink.push(SeccompRule::new(vec![dir, flags])?);
        }
        if !unlink.is_empty() {
            rules.insert(libc::SYS_unlinkat, unlink);
        }
        // Read-only opens (glibc reads /proc/sys/vm/overcommit_memory as
        // a thread first allocates): nothing is created, truncated or
        // opened for writing.
        let writes = (libc::O_ACCMODE | libc::O_CREAT | libc::O_TRUNC) as u64;
        let cond = SeccompCondition::new(
            2,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::MaskedEq(writes),
            libc::O_RDONLY as u64,
        )?;
        // Naming a thread as it starts; no other prctl.
        let name = arg_eq(0, libc::PR_SET_NAME as u64)?;
        rules.insert(libc::SYS_prctl, vec![name]);
        rules.insert(libc::SYS_openat, vec![SeccompRule::new(vec![cond])?]);
        Ok(rules)
    };
    built().map_err(SandboxError::Build)
}

/// The BPF program of the allowlist, every other call killing the process
/// (`release_dir`, `control_dir`: see [`rules`]).
pub fn filter(
    release_dir: Option<RawFd>,
    control_dir: Option<RawFd>,
) -> Result<BpfProgram, SandboxError> {
    let filter = SeccompFilter::new(
        rules(release_dir, control_dir)?,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(SandboxError::Build)?;
    filter.try_into().map_err(SandboxError::Build)
}

/// Enter the sandbox, unless `enabled` is false (`--no-seccomp`): set
/// `PR_SET_NO_NEW_PRIVS` and install [`filter`] on every thread. Then, if
/// [`PROBE_ENV`] is `1`, attempt a forbidden call (a test hook).
pub fn confine(
    enabled: bool,
    release_dir: Option<RawFd>,
    control_dir: Option<RawFd>,
) -> Result<(), SandboxError> {
    // Read before the filter: a test hook that costs nothing otherwise.
    let probe = std::env::var_os(PROBE_ENV).is_some_and(|v| v == "1");
    if enabled {
        drop_capabilities()?;
        let program = filter(release_dir, control_dir)?;
        // seccompiler sets PR_SET_NO_NEW_PRIVS, then installs the
        // program with SECCOMP_FILTER_FLAG_TSYNC.
        seccompiler::apply_filter_all_threads(&program).map_err(SandboxError::Install)?;
    }
    if probe {
        // SAFETY: socket takes no pointers; the descriptor, if any, is
        // closed at once.
        let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
        if fd >= 0 {
            // SAFETY: fd was just returned by socket and is owned here.
            unsafe { libc::close(fd) };
        }
    }
    Ok(())
}

/// Install [`filter`] on the calling thread only (no TSYNC), after
/// `PR_SET_NO_NEW_PRIVS`: for tt-bench, which times system calls through
/// the filter on a thread of its own. The thread keeps the filter until
/// it ends.
pub fn confine_this_thread() -> Result<(), SandboxError> {
    seccompiler::apply_filter(&filter(None, None)?).map_err(SandboxError::Install)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_compiles_and_allows_only_the_run_loops_ioctls() {
        let program = filter(Some(7), None).unwrap();
        assert!(!program.is_empty());
        let ioctls = allowed_ioctls();
        // Request numbers as Linux's headers give them.
        assert!(ioctls.contains(&0xae80), "KVM_RUN");
        assert!(ioctls.contains(&0x8090ae81), "KVM_GET_REGS");
        assert!(ioctls.contains(&0xc008ae88), "KVM_GET_MSRS");
        assert!(!ioctls.contains(&libc::TUNSETIFF));
        let r = rules(Some(7), None).unwrap();
        // Files are removed only from `running/`, by descriptor: one rule
        // for unlinkat, none for unlink; and none at all without it.
        assert_eq!(r.get(&libc::SYS_unlinkat).map(Vec::len), Some(1));
        assert!(!rules(None, None).unwrap().contains_key(&libc::SYS_unlinkat));
        for forbidden in [
            libc::SYS_unlink,
            libc::SYS_rmdir,
            libc::SYS_socket,
            libc::SYS_execve,
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_fork,
            libc::SYS_ptrace,
            libc::SYS_setns,
            libc::SYS_open,
            libc::SYS_rename,
            libc::SYS_kill,
        ] {
            assert!(!r.contains_key(&forbidden), "syscall {forbidden} allowed");
        }
    }
}
