//! Capacity pools (issue 19): budgets of unit-seconds that running
//! unikernels draw from, after threefoldtech tfexplorer's `pkg/capacity`.
//!
//! A delegation tree ([`crate::resources`]) says how much may run at once; a
//! pool says for how long. A pool holds three counters, CU-seconds
//! (compute), SU-seconds (storage) and IPv4U-seconds; each unikernel
//! created into it draws its CU, SU and IPv4U every second
//! ([`units`]: the formulas, in one place). The pool is charged lazily
//! ([`Pool::sync`]), and [`Pool::empty_at`] says when its first drawn
//! counter reaches 0: then its unikernels are stopped. A reservation tops
//! it up with whole unit-seconds ([`Pool::top_up`]).
//!
//! [`Pools`] keeps the EmptyAt of every pool in an ordered index, so the
//! daemon sets one timer for [`Pools::next_expiry`] instead of polling
//! every pool.
//!
//! Reservations fill pools: [`keys`] (users' ed25519 public keys),
//! [`reservation`] (the signed envelope, its strict payload parser,
//! [`reservation::verify`] and [`reservation::sign`]) and [`audit`] (the
//! append-only log of accepted reservations: every accepted id, for
//! replay protection across restarts, and each pool's totals).
//!
//! The model is pure: no files, no daemon, and no clock of its own.
//! Every instant is a parameter, in nanoseconds on the caller's clock (an
//! epoch clock, so time passed while the daemon was down is charged when
//! it comes back). All amounts are integers (see [`units`]).

pub mod audit;
pub mod index;
pub mod keys;
pub mod pool;
pub mod reservation;
pub mod units;

pub use index::{Pools, PoolsError, ScanPools};
pub use pool::{seconds_to_ns, Pool, PoolError, Unit};
pub use units::{Draw, Workload, MICRO, NANOS_PER_SECOND, PER_UNIT_SECOND};

#[cfg(test)]
mod tests;
