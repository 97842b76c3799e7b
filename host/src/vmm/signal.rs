//! SIGINT and SIGTERM stop the guest the way a halt does.
//!
//! solo5-hvt exits 1 on either signal, and albatross stops a unikernel by
//! sending its tender SIGTERM. tt-host goes one step further: the run loop
//! stops, every module shuts down as on a halt (block devices are
//! flushed), and `tt-host` exits 1 saying which signal it was.
//!
//! The handler only records the signal and sets the vCPU's
//! `immediate_exit` byte. tt-host runs its one vCPU on the thread that
//! receives the signal, so a `KVM_RUN` in progress returns `EINTR`; one
//! about to start returns at once because of `immediate_exit` (the flag
//! alone would miss a signal that lands between the loop's check and the
//! ioctl). A `ppoll` for the POLL hypercall returns `EINTR` too and goes
//! back to the loop instead of sleeping on; and since a signal can land
//! just before the `ppoll` starts, the handler also writes an eventfd
//! ([`wake_fd`]) that POLL waits on.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, AtomicU64, Ordering};

/// The signal received, or 0.
static RECEIVED: AtomicI32 = AtomicI32::new(0);
/// The running vCPU's `kvm_run.immediate_exit`, or null.
static IMMEDIATE_EXIT: AtomicPtr<u8> = AtomicPtr::new(std::ptr::null_mut());
/// An eventfd the handler writes, or -1: readable once a signal came.
static WAKE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(signo: libc::c_int) {
    RECEIVED.store(signo, Ordering::SeqCst);
    let fd = WAKE.load(Ordering::SeqCst);
    if fd >= 0 {
        let one = 1u64;
        // SAFETY: `write` is async-signal-safe; `one` is 8 valid bytes
        // and `fd` an eventfd that stays open for the process's life.
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
    let p = IMMEDIATE_EXIT.load(Ordering::SeqCst);
    if !p.is_null() {
        // SAFETY: `p` is registered by `Armed` only while the kvm_run
        // mapping it points into is alive (unregistered before it is
        // dropped); a byte store is async-signal-safe.
        unsafe { p.write_volatile(1) };
    }
}

/// Install the handler for SIGINT and SIGTERM (without `SA_RESTART`, so
/// blocking calls return `EINTR`), and create the [`wake_fd`].
pub fn install() -> std::io::Result<()> {
    if WAKE.load(Ordering::SeqCst) < 0 {
        // SAFETY: plain syscall; the fd is kept for the process's life.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        WAKE.store(fd, Ordering::SeqCst);
    }
    // SAFETY: as below, for a handler that does nothing.
    let rc = unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_kick as *const () as libc::sighandler_t;
        libc::sigfillset(&mut sa.sa_mask);
        libc::sigaction(KICK_SIGNAL, &sa, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask"
        // value; we then set a handler that only does async-signal-safe
        // work (atomic stores) and fill its mask.
        let rc = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as libc::sighandler_t;
            libc::sigfillset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A descriptor that polls readable once SIGINT or SIGTERM came (after
/// [`install`]): a wait that includes it cannot miss a signal that lands
/// just before it starts.
pub fn wake_fd() -> Option<std::os::fd::RawFd> {
    let fd = WAKE.load(Ordering::SeqCst);
    (fd >= 0).then_some(fd)
}

/// A control request is waiting for the vCPU thread ([`kick`]).
static KICKED: AtomicBool = AtomicBool::new(false);
/// The vCPU thread (a `pthread_t`), 0 before [`Armed`].
static VCPU_THREAD: AtomicU64 = AtomicU64::new(0);

/// The kick's signal: it only interrupts a blocking call of the vCPU
/// thread (`KVM_RUN`, POLL's `ppoll`).
const KICK_SIGNAL: libc::c_int = libc::SIGUSR1;

extern "C" fn on_kick(_: libc::c_int) {}

/// Get the vCPU thread to look at its control requests soon: set the flag,
/// make its next `KVM_RUN` return at once (`immediate_exit`), wake a POLL
/// wait ([`wake_fd`]), and interrupt a `KVM_RUN` or `ppoll` in progress
/// (`SIGUSR1`). Called from another thread.
pub fn kick() {
    KICKED.store(true, Ordering::SeqCst);
    let p = IMMEDIATE_EXIT.load(Ordering::SeqCst);
    if !p.is_null() {
        // SAFETY: as in `on_signal`: registered only while the mapping
        // lives; a byte store from another thread into the shared
        // kvm_run page is what KVM expects of `immediate_exit`.
        unsafe { p.write_volatile(1) };
    }
    let fd = WAKE.load(Ordering::SeqCst);
    if fd >= 0 {
        let one = 1u64;
        // SAFETY: writes 8 valid bytes to an eventfd kept open for the
        // process's life.
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
    let t = VCPU_THREAD.load(Ordering::SeqCst);
    if t != 0 {
        // SAFETY: `t` is the vCPU thread's pthread_t, registered by
        // `Armed` while that thread runs the loop; pthread_kill only
        // queues a signal, whose handler does nothing.
        unsafe { libc::pthread_kill(t as libc::pthread_t, KICK_SIGNAL) };
    }
}

/// Called by the vCPU thread at the top of its loop: undo a kick's
/// `immediate_exit` (unless a stopping signal wants it), and take the kick
/// if one came (clearing the wake descriptor a kick wrote). True if the
/// control requests must be served.
pub fn take_kick() -> bool {
    let p = IMMEDIATE_EXIT.load(Ordering::SeqCst);
    if !p.is_null() && received().is_none() {
        // SAFETY: see `on_signal`.
        unsafe { p.write_volatile(0) };
        // A stopping signal handled between the check and the store
        // (this thread takes them) must still end the next KVM_RUN.
        if received().is_some() {
            // SAFETY: as above.
            unsafe { p.write_volatile(1) };
        }
    }
    if !KICKED.swap(false, Ordering::SeqCst) {
        return false;
    }
    clear_wake();
    true
}

/// Empty the wake descriptor after a kick, unless a stopping signal
/// (which must keep it readable) came.
fn clear_wake() {
    let fd = WAKE.load(Ordering::SeqCst);
    if fd >= 0 && received().is_none() {
        let mut v = 0u64;
        // SAFETY: reads 8 bytes into `v` from a non-blocking eventfd.
        unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
        if received().is_some() {
            let one = 1u64;
            // SAFETY: as in `kick`.
            unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
        }
    }
}

/// Must a blocking wait of the vCPU thread (POLL) end now: a stopping
/// signal or a control request?
pub fn interrupted() -> bool {
    received().is_some() || KICKED.load(Ordering::SeqCst)
}

/// The signal that asked tt-host to stop, if one did.
pub fn received() -> Option<i32> {
    match RECEIVED.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// While alive, SIGINT and SIGTERM are blocked in this thread and in
/// every thread it starts (they inherit the mask); dropping it unblocks
/// them here, and one that came meanwhile is delivered then. A launch
/// holds one while it attaches devices, whose threads (a journal's
/// committer and applier, a virtio device's worker) must never take the
/// signal: the vCPU thread must, since only there does it interrupt
/// `KVM_RUN` or POLL's `ppoll`.
pub struct Blocked(libc::sigset_t);

impl Blocked {
    pub fn new() -> std::io::Result<Blocked> {
        // SAFETY: sigset_t is plain data; sigemptyset/sigaddset fill it,
        // and pthread_sigmask reads `set` and writes the old mask to
        // `old`, both live locals.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGTERM);
            let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
            if rc != 0 {
                return Err(std::io::Error::from_raw_os_error(rc));
            }
            Ok(Blocked(old))
        }
    }
}

impl Drop for Blocked {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved by `new`, a valid sigset_t.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.0, std::ptr::null_mut()) };
    }
}

/// Its name, for messages.
pub fn name(signo: i32) -> &'static str {
    match signo {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        _ => "a signal",
    }
}

/// While alive, a signal also sets `immediate_exit` at the given address.
pub struct Armed(());

impl Armed {
    /// # Safety
    /// `immediate_exit` must stay valid for writes until the `Armed` is
    /// dropped.
    pub unsafe fn new(immediate_exit: *mut u8) -> Armed {
        IMMEDIATE_EXIT.store(immediate_exit, Ordering::SeqCst);
        // SAFETY: pthread_self has no preconditions.
        VCPU_THREAD.store(unsafe { libc::pthread_self() } as u64, Ordering::SeqCst);
        // A signal that came before the store set only the flag.
        if received().is_some() || KICKED.load(Ordering::SeqCst) {
            // SAFETY: valid for writes, per this function's contract.
            unsafe { immediate_exit.write_volatile(1) };
        }
        Armed(())
    }
}

impl Drop for Armed {
    fn drop(&mut self) {
        VCPU_THREAD.store(0, Ordering::SeqCst);
        IMMEDIATE_EXIT.store(std::ptr::null_mut(), Ordering::SeqCst);
    }
}
