//! Solo5 hvt hypercalls: argument layouts and thin wrappers.
//!
//! A hypercall is `out dx, eax` with `dx = 0x500 + nr` and `eax` = the
//! guest-physical address of the argument struct (memory is identity
//! mapped and below 4 GiB). The host reads the IN fields and writes the
//! OUT fields before the guest continues. tt-guest issues them from CPL 3
//! (the TSS I/O permission bitmap allows ports 0x500-0x5ff), so each costs
//! one VM exit and no mode switch inside the guest.
//!
//! Everything else in the SDK calls these wrappers; nothing else issues
//! `out` (except the CPL 0 abort path in `arch.rs`).

use core::arch::asm;

/// Hypercall numbers.
pub use tt_hvt_abi::Hypercall as Nr;
/// First hypercall port; hypercall `nr` uses port `PIO_BASE + nr`.
pub use tt_hvt_abi::HYPERCALL_PIO_BASE as PIO_BASE;
/// The argument structs, as `tt-hvt-abi` defines them for guest and host
/// (`struct hvt_hc_*`). Explicit `_pad` fields stand where C pads; set
/// them to 0 (`..Default::default()`).
pub use tt_hvt_abi::{
    HcBlockRead as BlockRead, HcBlockWrite as BlockWrite, HcHalt as Halt, HcNetRead as NetRead,
    HcNetWrite as NetWrite, HcPoll as Poll, HcPuts as Puts, HcWalltime as Walltime,
};

/// Status a host returns in the `ret` field.
pub const RET_OK: i32 = tt_hvt_abi::ret::OK;
/// Try again (net read: nothing available).
pub const RET_AGAIN: i32 = tt_hvt_abi::ret::AGAIN;
/// Invalid argument (bad handle, offset, length).
pub const RET_EINVAL: i32 = tt_hvt_abi::ret::EINVAL;
/// Unspecified host-side failure (I/O error).
pub const RET_EUNSPEC: i32 = tt_hvt_abi::ret::EUNSPEC;

/// Issue hypercall `nr` with argument struct `arg`.
///
/// # Safety
///
/// `arg` must point to a live, correctly laid out argument struct for `nr`
/// that lives below 4 GiB, and every guest address inside it must be valid
/// for the access the host will make (read for writes, write for reads)
/// for the given length.
#[inline(always)]
pub unsafe fn raw<T>(nr: Nr, arg: *mut T) {
    let addr = arg as usize;
    debug_assert!(addr <= u32::MAX as usize, "hypercall argument above 4 GiB");
    // SAFETY: the caller guarantees `arg` is valid. The asm has no memory
    // restrictions, so the compiler assumes it reads and writes memory
    // (the host writes the OUT fields during the exit).
    unsafe {
        asm!(
            "out dx, eax",
            in("dx") nr.port(),
            in("eax") addr as u32,
            options(nostack, preserves_flags)
        );
    }
}

/// Wall-clock time in nanoseconds since the Unix epoch, from the host.
pub fn walltime() -> u64 {
    let mut a = Walltime::default();
    // SAFETY: `a` is a live Walltime on the stack (below 4 GiB).
    unsafe { raw(Nr::Walltime, &mut a) };
    // SAFETY: `a` is live and aligned; volatile so the host's write is seen.
    unsafe { core::ptr::read_volatile(&a.nsecs) }
}

/// Write `bytes` to the console with one exit.
pub fn puts(bytes: &[u8]) {
    let mut a = Puts {
        data: bytes.as_ptr() as u64,
        len: bytes.len() as u64,
    };
    // SAFETY: `a` is live; `data`/`len` describe the readable slice.
    unsafe { raw(Nr::Puts, &mut a) };
}

/// Wait up to `timeout_ns` nanoseconds (relative) for network input.
/// Returns `(ready_set, ret)`.
pub fn poll(timeout_ns: u64) -> (u64, i32) {
    let mut a = Poll {
        timeout_nsecs: timeout_ns,
        ..Default::default()
    };
    // SAFETY: `a` is a live Poll struct.
    unsafe { raw(Nr::Poll, &mut a) };
    // SAFETY: `a` is live and aligned.
    unsafe {
        (
            core::ptr::read_volatile(&a.ready_set),
            core::ptr::read_volatile(&a.ret),
        )
    }
}

/// Write `data` to block device `handle` at byte `offset`. Returns `ret`.
pub fn block_write(handle: u64, offset: u64, data: &[u8]) -> i32 {
    let mut a = BlockWrite {
        handle,
        offset,
        data: data.as_ptr() as u64,
        len: data.len() as u64,
        ..Default::default()
    };
    // SAFETY: `a` is live; `data`/`len` describe the readable slice.
    unsafe { raw(Nr::BlockWrite, &mut a) };
    // SAFETY: `a` is live and aligned.
    unsafe { core::ptr::read_volatile(&a.ret) }
}

/// Read into `data` from block device `handle` at byte `offset`.
/// Returns `(ret, bytes the host reports as read)`.
pub fn block_read(handle: u64, offset: u64, data: &mut [u8]) -> (i32, u64) {
    let mut a = BlockRead {
        handle,
        offset,
        data: data.as_mut_ptr() as u64,
        len: data.len() as u64,
        ..Default::default()
    };
    // SAFETY: `a` is live; `data`/`len` describe the writable slice, which
    // the host fills with at most `len` bytes.
    unsafe { raw(Nr::BlockRead, &mut a) };
    // SAFETY: `a` is live and aligned.
    unsafe {
        (
            core::ptr::read_volatile(&a.ret),
            core::ptr::read_volatile(&a.len),
        )
    }
}

/// Send one frame on network device `handle`. Returns `ret`.
pub fn net_write(handle: u64, frame: &[u8]) -> i32 {
    let mut a = NetWrite {
        handle,
        data: frame.as_ptr() as u64,
        len: frame.len() as u64,
        ..Default::default()
    };
    // SAFETY: `a` is live; `data`/`len` describe the readable slice.
    unsafe { raw(Nr::NetWrite, &mut a) };
    // SAFETY: `a` is live and aligned.
    unsafe { core::ptr::read_volatile(&a.ret) }
}

/// Receive one frame from network device `handle` into `buf`.
/// Returns `(ret, frame length)`.
pub fn net_read(handle: u64, buf: &mut [u8]) -> (i32, u64) {
    let mut a = NetRead {
        handle,
        data: buf.as_mut_ptr() as u64,
        len: buf.len() as u64,
        ..Default::default()
    };
    // SAFETY: `a` is live; `data`/`len` describe the writable slice.
    unsafe { raw(Nr::NetRead, &mut a) };
    // SAFETY: `a` is live and aligned.
    unsafe {
        (
            core::ptr::read_volatile(&a.ret),
            core::ptr::read_volatile(&a.len),
        )
    }
}

/// Stop the guest with `status`. Never returns.
pub fn halt(status: i32) -> ! {
    let mut a = Halt {
        cookie: 0,
        exit_status: status,
        _pad: 0,
    };
    // SAFETY: `a` is a live Halt struct.
    unsafe { raw(Nr::Halt, &mut a) };
    // A conforming host never resumes a halted guest. If one does, stop
    // here without touching anything: `ud2` faults into the reporter, which
    // halts again.
    loop {
        // SAFETY: `ud2` only raises #UD.
        unsafe { asm!("ud2", options(nomem, nostack)) };
    }
}
