//! Boot information and command-line arguments.
//!
//! The tender passes a [`BootInfo`] at entry. tt-guest copies it before
//! `main` runs; the accessors here never fail.

use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// `struct hvt_boot_info` as passed by the tender (from `tt-hvt-abi`).
pub use tt_hvt_abi::BootInfo;

/// Longest command line the ABI allows, including the NUL.
pub const CMDLINE_MAX: usize = tt_hvt_abi::CMDLINE_SIZE;

static MEM_SIZE: AtomicU64 = AtomicU64::new(0);
static KERNEL_END: AtomicU64 = AtomicU64::new(0);
static CYCLE_FREQ: AtomicU64 = AtomicU64::new(0);
static MFT: AtomicU64 = AtomicU64::new(0);
static CMDLINE_PTR: AtomicUsize = AtomicUsize::new(0);
static CMDLINE_LEN: AtomicUsize = AtomicUsize::new(0);

/// Record the boot info. Called once, before `main`.
///
/// # Safety
///
/// `bi` must point to a valid boot info struct whose `cmdline`, if not 0,
/// points to readable memory that stays unchanged for the guest's lifetime.
#[cfg_attr(test, allow(dead_code))]
pub(crate) unsafe fn init(bi: *const BootInfo) {
    // SAFETY: guaranteed by the caller.
    let bi = unsafe { core::ptr::read_volatile(bi) };
    MEM_SIZE.store(bi.mem_size, Ordering::Relaxed);
    KERNEL_END.store(bi.kernel_end, Ordering::Relaxed);
    CYCLE_FREQ.store(bi.cpu_cycle_freq, Ordering::Relaxed);
    MFT.store(bi.mft, Ordering::Relaxed);
    if bi.cmdline != 0 {
        let p = bi.cmdline as usize as *const u8;
        let mut len = 0;
        // SAFETY: the caller guarantees the command line is readable; we
        // never read past CMDLINE_MAX bytes.
        while len < CMDLINE_MAX && unsafe { p.add(len).read_volatile() } != 0 {
            len += 1;
        }
        CMDLINE_PTR.store(p as usize, Ordering::Relaxed);
        CMDLINE_LEN.store(len, Ordering::Relaxed);
    }
}

/// The boot info the tender passed (a copy).
pub fn boot_info() -> BootInfo {
    BootInfo {
        mem_size: MEM_SIZE.load(Ordering::Relaxed),
        kernel_end: KERNEL_END.load(Ordering::Relaxed),
        cpu_cycle_freq: CYCLE_FREQ.load(Ordering::Relaxed),
        cmdline: CMDLINE_PTR.load(Ordering::Relaxed) as u64,
        mft: MFT.load(Ordering::Relaxed),
    }
}

/// Guest memory size in bytes.
pub fn mem_size() -> u64 {
    MEM_SIZE.load(Ordering::Relaxed)
}

/// The whole command line: the guest's arguments joined by spaces, as
/// Solo5 tenders pass them. Empty if the tender passed none. If the bytes
/// are not UTF-8, only the valid prefix is returned.
pub fn cmdline() -> &'static str {
    let p = CMDLINE_PTR.load(Ordering::Relaxed);
    let len = CMDLINE_LEN.load(Ordering::Relaxed);
    if p == 0 {
        return "";
    }
    // SAFETY: `init` checked that `len` bytes at `p` are readable, and the
    // tender's command line stays unchanged while the guest runs.
    let bytes = unsafe { core::slice::from_raw_parts(p as *const u8, len) };
    match core::str::from_utf8(bytes) {
        Ok(s) => s,
        // SAFETY: `valid_up_to` bytes were just checked to be UTF-8.
        Err(e) => unsafe { core::str::from_utf8_unchecked(&bytes[..e.valid_up_to()]) },
    }
}

/// The command-line arguments: [`cmdline`] split on spaces, empty words
/// skipped. There is no program name: the first item is the first
/// argument given after the image on the host's command line.
pub fn args() -> Args {
    split_args(cmdline())
}

/// Split a command line the way [`args`] does.
pub fn split_args(cmdline: &'static str) -> Args {
    Args {
        inner: cmdline.split(' '),
    }
}

/// Iterator returned by [`args`].
#[derive(Clone)]
pub struct Args {
    inner: core::str::Split<'static, char>,
}

impl Iterator for Args {
    type Item = &'static str;

    fn next(&mut self) -> Option<&'static str> {
        self.inner.by_ref().find(|w| !w.is_empty())
    }
}

/// The value of the first argument of the form `key=value`, if any.
pub fn arg_value(key: &str) -> Option<&'static str> {
    args().find_map(|a| a.strip_prefix(key)?.strip_prefix('='))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_split_on_spaces_and_skip_empty_words() {
        let v: Vec<_> = split_args("  a b  c=d ").collect();
        assert_eq!(v, ["a", "b", "c=d"]);
        assert_eq!(split_args("").count(), 0);
    }
}
