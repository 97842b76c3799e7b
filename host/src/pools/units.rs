//! Capacity units: what a unikernel draws from its pool each second.
//!
//! The formulas are threefoldtech tfexplorer's (`pkg/capacity`), as issue 19
//! states them, and they live here only:
//!
//! - **CU** (compute unit) `= min(memory GiB / 4, vCPUs / 2)`: one CU is
//!   4 GiB of memory with 2 vCPUs; a unikernel pays for the scarcer of the
//!   two. Memory is counted in GiB (2^30 bytes) because memory is sized in
//!   powers of two: tt-host's `--mem` is in MiB, and "4 GB of RAM" means
//!   4096 MiB. tt-host runs one vCPU per unikernel, so a unikernel's CU is
//!   at most 1/2.
//! - **SU** (storage unit) `= disk GB / 300`: one SU is 300 GB of SSD.
//!   Every tt-host disk counts as SSD (the formula's HDD term, `HDD GB /
//!   1200`, never applies). Disks are counted in GB (10^9 bytes), as disk
//!   capacity is sold: 300 GB is 300 x 10^9 bytes, not 300 GiB.
//! - **IPv4U** `= 1` per public IPv4 address or host port forward the
//!   unikernel holds. tt-host has neither yet, so callers pass 0.
//!
//! # Fixed point
//!
//! Amounts are integers, never floats: a draw is in micro-units per second
//! (1 CU = [`MICRO`] µCU), and a pool's counters are in µunit-nanoseconds
//! ([`PER_UNIT_SECOND`] of them make one unit-second), so that charging a
//! draw for any number of nanoseconds is an exact product with no rounding.
//!
//! # Rounding
//!
//! Converting resources to a draw is the only place that rounds, and it
//! rounds **up**, to the next µunit per second: a pool may be over-charged
//! by less than one µunit per second per counter, never under-charged, so
//! a unikernel cannot run longer than what was bought by choosing sizes
//! that round to zero. A unikernel with any disk at all draws at least
//! 1 µSU per second.

use serde::{Deserialize, Serialize};

/// Micro-units in one unit (1 CU = 1,000,000 µCU).
pub const MICRO: u64 = 1_000_000;

/// Nanoseconds in one second.
pub const NANOS_PER_SECOND: u64 = 1_000_000_000;

/// µunit-nanoseconds in one unit-second: the scale of a pool's counters.
pub const PER_UNIT_SECOND: u128 = MICRO as u128 * NANOS_PER_SECOND as u128;

/// MiB of memory in one CU (4 GiB).
pub const CU_MEMORY_MIB: u64 = 4 * 1024;

/// vCPUs in one CU.
pub const CU_VCPUS: u64 = 2;

/// Bytes of disk in one SU (300 GB, decimal).
pub const SU_DISK_BYTES: u64 = 300 * 1_000_000_000;

/// What one workload (a unikernel) holds that its pool charges for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Workload {
    /// Guest memory, in MiB (tt-host's `--mem`).
    pub memory_mib: u64,
    /// vCPUs: 1 for every tt-host unikernel today.
    pub vcpus: u64,
    /// Total size of all its block devices, in bytes.
    pub block_bytes: u64,
    /// Public IPv4 addresses plus host port forwards (0 until tt-host has
    /// port forwards).
    pub ipv4: u64,
}

/// What a workload (or the sum of a pool's workloads) draws, in µunits per
/// second of each kind: `cu: 500_000` spends half a CU-second every second.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Draw {
    /// µCU per second.
    pub cu: u64,
    /// µSU per second.
    pub su: u64,
    /// µIPv4U per second.
    pub ipv4u: u64,
}

impl Draw {
    /// Nothing drawn.
    pub const ZERO: Draw = Draw {
        cu: 0,
        su: 0,
        ipv4u: 0,
    };

    /// The draw of a unikernel with these resources (see the module doc
    /// for the formulas and the rounding, which is up).
    pub fn of(w: &Workload) -> Draw {
        // ceil(MiB * MICRO / 4096) and ceil(vcpus * MICRO / 2): since
        // ceil is monotone, the min of the two ceilings is the ceiling of
        // the min. u128 so no input overflows; the result saturates.
        let by_memory = div_ceil(w.memory_mib as u128 * MICRO as u128, CU_MEMORY_MIB as u128);
        let by_vcpus = div_ceil(w.vcpus as u128 * MICRO as u128, CU_VCPUS as u128);
        let su = div_ceil(w.block_bytes as u128 * MICRO as u128, SU_DISK_BYTES as u128);
        Draw {
            cu: saturate(by_memory.min(by_vcpus)),
            su: saturate(su),
            ipv4u: w.ipv4.saturating_mul(MICRO),
        }
    }

    /// Whether nothing is drawn.
    pub fn is_zero(&self) -> bool {
        *self == Draw::ZERO
    }

    /// `self + other`, or `None` if a kind overflows u64.
    pub fn checked_add(&self, other: &Draw) -> Option<Draw> {
        Some(Draw {
            cu: self.cu.checked_add(other.cu)?,
            su: self.su.checked_add(other.su)?,
            ipv4u: self.ipv4u.checked_add(other.ipv4u)?,
        })
    }

    /// `self - other`, or `None` if `other` draws more of some kind.
    pub fn checked_sub(&self, other: &Draw) -> Option<Draw> {
        Some(Draw {
            cu: self.cu.checked_sub(other.cu)?,
            su: self.su.checked_sub(other.su)?,
            ipv4u: self.ipv4u.checked_sub(other.ipv4u)?,
        })
    }
}

fn div_ceil(a: u128, b: u128) -> u128 {
    a.div_ceil(b)
}

fn saturate(v: u128) -> u64 {
    u64::try_from(v).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draw(memory_mib: u64, vcpus: u64, block_bytes: u64, ipv4: u64) -> Draw {
        Draw::of(&Workload {
            memory_mib,
            vcpus,
            block_bytes,
            ipv4,
        })
    }

    #[test]
    fn no_memory_draws_no_compute() {
        assert_eq!(draw(0, 1, 0, 0), Draw::ZERO);
        assert_eq!(draw(0, 64, 0, 0).cu, 0);
    }

    #[test]
    fn four_gib_with_two_vcpus_is_exactly_one_cu() {
        assert_eq!(draw(4096, 2, 0, 0).cu, MICRO);
        // One MiB less is just under one CU; one more is capped by the
        // vCPUs at exactly one.
        assert_eq!(draw(4095, 2, 0, 0).cu, 999_756); // 999_755.86 rounded up
        assert_eq!(draw(4097, 2, 0, 0).cu, MICRO);
    }

    #[test]
    fn one_vcpu_caps_compute_at_half_a_cu() {
        // tt-host's unikernels have one vCPU: 4 GiB or 64 GiB, half a CU.
        assert_eq!(draw(4096, 1, 0, 0).cu, MICRO / 2);
        assert_eq!(draw(65536, 1, 0, 0).cu, MICRO / 2);
        // Below 2 GiB the memory is the scarcer.
        assert_eq!(draw(1024, 1, 0, 0).cu, MICRO / 4);
        assert_eq!(draw(2048, 1, 0, 0).cu, MICRO / 2);
    }

    #[test]
    fn rounding_is_up_so_a_pool_is_never_under_charged() {
        // 1 MiB is 244.140625 µCU/s: charged 245.
        assert_eq!(draw(1, 1, 0, 0).cu, 245);
        // One byte of disk is 1/300e9 SU: charged 1 µSU/s, not 0.
        assert_eq!(draw(0, 1, 1, 0).su, 1);
        // And the charge is never more than one µunit above the exact one.
        for mib in [1u64, 3, 7, 100, 4095] {
            let exact = mib as f64 * MICRO as f64 / 4096.0;
            let got = draw(mib, 2, 0, 0).cu as f64;
            assert!(
                got >= exact && got < exact + 1.0,
                "{mib} MiB: {got} vs {exact}"
            );
        }
    }

    #[test]
    fn su_is_decimal_gigabytes_over_300() {
        assert_eq!(draw(0, 1, 300_000_000_000, 0).su, MICRO);
        assert_eq!(draw(0, 1, 3_000_000_000, 0).su, MICRO / 100);
        // 300 GiB is more than one SU: 1.073741824 SU.
        assert_eq!(draw(0, 1, 300 << 30, 0).su, 1_073_742);
        assert_eq!(draw(0, 1, 0, 0).su, 0);
    }

    #[test]
    fn ipv4_is_one_unit_per_address() {
        assert_eq!(draw(0, 1, 0, 0).ipv4u, 0);
        assert_eq!(draw(0, 1, 0, 3).ipv4u, 3 * MICRO);
    }

    #[test]
    fn huge_resources_saturate_instead_of_overflowing() {
        let d = draw(u64::MAX, u64::MAX, u64::MAX, u64::MAX);
        assert_eq!(d.cu, u64::MAX);
        assert_eq!(d.su, u64::MAX / 300_000 + 1); // fits: ceil(2^64 * 1e6 / 3e11)
        assert_eq!(d.ipv4u, u64::MAX);
    }

    #[test]
    fn checked_arithmetic_refuses_underflow_and_overflow() {
        let a = Draw {
            cu: 5,
            su: 1,
            ipv4u: 0,
        };
        assert_eq!(a.checked_sub(&a), Some(Draw::ZERO));
        assert_eq!(Draw::ZERO.checked_sub(&a), None);
        let max = Draw {
            cu: u64::MAX,
            ..Draw::ZERO
        };
        assert_eq!(max.checked_add(&a), None);
    }
}
