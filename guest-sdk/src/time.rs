//! Clocks.
//!
//! The monotonic clock counts TSC cycles since boot and converts them to
//! nanoseconds with the TSC frequency from the boot info (128-bit math, no
//! overflow for centuries). The wall clock is the host's `WALLTIME` read
//! once at boot plus the monotonic time since then, so it never jumps and
//! costs no hypercall.

use core::sync::atomic::{AtomicU64, Ordering};
use core::time::Duration;

use crate::hypercall;

static TSC_BASE: AtomicU64 = AtomicU64::new(0);
static TSC_HZ: AtomicU64 = AtomicU64::new(1_000_000_000);
static WALL_BASE: AtomicU64 = AtomicU64::new(0);

/// Used if the tender reports a TSC frequency of 0.
const FALLBACK_HZ: u64 = 1_000_000_000;

/// Read the time-stamp counter.
#[inline]
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no side effects; CR4.TSD is clear so it is allowed
    // at CPL 3.
    unsafe { core::arch::x86_64::_rdtsc() }
}

#[cfg_attr(test, allow(dead_code))]
pub(crate) fn init() {
    let hz = crate::boot::boot_info().cpu_cycle_freq;
    TSC_HZ.store(if hz == 0 { FALLBACK_HZ } else { hz }, Ordering::Relaxed);
    TSC_BASE.store(rdtsc(), Ordering::Relaxed);
    WALL_BASE.store(hypercall::walltime(), Ordering::Relaxed);
}

/// TSC frequency in Hz, as reported by the tender.
pub fn tsc_hz() -> u64 {
    TSC_HZ.load(Ordering::Relaxed)
}

/// Convert `cycles` at `hz` to nanoseconds.
/// Saturates at `u64::MAX` (a tender reporting an absurdly low frequency
/// must not make the clock wrap and go backwards).
pub fn cycles_to_ns(cycles: u64, hz: u64) -> u64 {
    u64::try_from(cycles as u128 * 1_000_000_000 / hz.max(1) as u128).unwrap_or(u64::MAX)
}

/// Nanoseconds since boot. Never decreases.
pub fn monotonic_ns() -> u64 {
    let cycles = rdtsc().wrapping_sub(TSC_BASE.load(Ordering::Relaxed));
    cycles_to_ns(cycles, tsc_hz())
}

/// Nanoseconds since the Unix epoch (host wall clock at boot + monotonic
/// time since boot).
pub fn wallclock_ns() -> u64 {
    // Saturating: the base is whatever the host said.
    WALL_BASE
        .load(Ordering::Relaxed)
        .saturating_add(monotonic_ns())
}

/// A point on the monotonic clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Instant(u64);

impl Instant {
    /// Now.
    pub fn now() -> Instant {
        Instant(monotonic_ns())
    }

    /// Nanoseconds since boot at this instant.
    pub fn as_nanos(self) -> u64 {
        self.0
    }

    /// Time elapsed since `self`.
    pub fn elapsed(self) -> Duration {
        Instant::now().duration_since(self)
    }

    /// Time from `earlier` to `self` (zero if `earlier` is later).
    pub fn duration_since(self, earlier: Instant) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }
}

impl core::ops::Add<Duration> for Instant {
    type Output = Instant;

    /// `self + d`, saturating.
    fn add(self, d: Duration) -> Instant {
        Instant(
            self.0
                .saturating_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
        )
    }
}

/// Sleep for at least `d`. The host blocks the vCPU (a `POLL` hypercall)
/// instead of spinning; network input arriving meanwhile does not cut the
/// sleep short. But POLL cannot block while a network device is ready (a
/// frame waits unread, or its TAP failed, which counts as ready for
/// good): then each POLL returns at once and this sleep issues them back
/// to back until the deadline. Read what is ready before sleeping.
pub fn sleep(d: Duration) {
    let deadline = Instant::now() + d;
    loop {
        let now = Instant::now();
        if now >= deadline {
            return;
        }
        hypercall::poll(deadline.0 - now.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cycle_conversion_does_not_overflow() {
        assert_eq!(cycles_to_ns(3_000_000_000, 3_000_000_000), 1_000_000_000);
        // 100 years at 5 GHz.
        let c = 5_000_000_000u64 * 3600 * 24 * 365 * 100;
        assert_eq!(
            cycles_to_ns(c, 5_000_000_000),
            3600 * 24 * 365 * 100 * 1_000_000_000
        );
    }

    #[test]
    fn a_bogus_frequency_saturates_instead_of_wrapping() {
        assert_eq!(cycles_to_ns(u64::MAX, 1), u64::MAX);
        assert_eq!(cycles_to_ns(1 << 40, 1), u64::MAX);
        assert_eq!(cycles_to_ns(5, 0), 5_000_000_000, "0 Hz is taken as 1");
    }
}
