//! The C memory functions the compiler emits calls to.
//!
//! There is no libc, so the SDK provides `memcpy`, `memmove`, `memset`,
//! `memcmp` and `bcmp`. The copy and fill functions are single `rep movsb`
//! / `rep stosb` instructions (fast on every CPU with ERMS, and impossible
//! for the compiler to turn back into a call to themselves). They run at
//! CPL 3, natively.

use core::arch::asm;

/// # Safety
///
/// C `memcpy` contract: `n` bytes readable at `src`, writable at `dst`,
/// not overlapping.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges are valid; DF is clear
    // (the ABI requires it at function boundaries).
    unsafe {
        asm!(
            "rep movsb",
            inout("rcx") n => _,
            inout("rdi") dst => _,
            inout("rsi") src => _,
            options(nostack, preserves_flags)
        );
    }
    dst
}

/// # Safety
///
/// C `memmove` contract: `n` bytes readable at `src`, writable at `dst`;
/// the ranges may overlap.
#[no_mangle]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize).wrapping_sub(src as usize) >= n {
        // dst is below src or the ranges do not overlap: copy forwards.
        // SAFETY: as for memcpy; a forward copy is correct here.
        unsafe {
            asm!(
                "rep movsb",
                inout("rcx") n => _,
                inout("rdi") dst => _,
                inout("rsi") src => _,
                options(nostack, preserves_flags)
            );
        }
    } else {
        // dst overlaps the tail of src: copy backwards, then restore DF.
        // SAFETY: n > 0 here (otherwise the first branch is taken), so
        // dst+n-1 and src+n-1 are the last bytes of the valid ranges.
        unsafe {
            asm!(
                "std",
                "rep movsb",
                "cld",
                inout("rcx") n => _,
                inout("rdi") dst.add(n - 1) => _,
                inout("rsi") src.add(n - 1) => _,
                options(nostack)
            );
        }
    }
    dst
}

/// # Safety
///
/// C `memset` contract: `n` bytes writable at `dst`.
#[no_mangle]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees the range is writable.
    unsafe {
        asm!(
            "rep stosb",
            inout("rcx") n => _,
            inout("rdi") dst => _,
            in("al") c as u8,
            options(nostack, preserves_flags)
        );
    }
    dst
}

/// # Safety
///
/// C `memcmp` contract: `n` bytes readable at `a` and `b`.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: i < n and the caller guarantees n readable bytes.
        let (x, y) = unsafe { (a.add(i).read_volatile(), b.add(i).read_volatile()) };
        if x != y {
            return x as i32 - y as i32;
        }
        i += 1;
    }
    0
}

/// # Safety
///
/// C `bcmp` contract: `n` bytes readable at `a` and `b`.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract.
    unsafe { memcmp(a, b, n) }
}
