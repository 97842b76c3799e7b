//! The compute benchmark's loop kernel, shared so a native benchmark can run
//! exactly the same arithmetic (`tt_example_compute::kernel`).
//!
//! Each iteration is one xorshift64 step plus a multiply-add:
//!
//! ```text
//! x ^= x << 13; x ^= x >> 7; x ^= x << 17;
//! acc = acc.wrapping_mul(0x9E3779B97F4A7C15).wrapping_add(x);
//! ```
//!
//! starting from `x = seed | 1`, `acc = 0`; the result is `acc`.
#![no_std]

/// Run `iters` iterations from `seed` and return the accumulator.
#[inline(never)]
pub fn kernel(iters: u64, seed: u64) -> u64 {
    let mut x = seed | 1;
    let mut acc: u64 = 0;
    let mut i = 0;
    while i < iters {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        acc = acc.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(x);
        i += 1;
    }
    acc
}

/// Default number of iterations.
pub const DEFAULT_ITERS: u64 = 200_000_000;

/// Default seed.
pub const DEFAULT_SEED: u64 = 0x2545_F491_4F6C_DD1D;

#[cfg(test)]
mod tests {
    #[test]
    fn kernel_is_deterministic() {
        assert_eq!(super::kernel(0, 5), 0);
        assert_eq!(super::kernel(1000, 5), super::kernel(1000, 5));
        assert_ne!(super::kernel(1000, 5), super::kernel(1001, 5));
    }
}
