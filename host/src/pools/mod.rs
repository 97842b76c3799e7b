//! Capacity pools (issue 19): signed reservations that fill a pool.
//!
//! - [`keys`]: users' ed25519 public keys ([`keys::KeyRing`]) and the
//!   secret seed files the signing helper reads;
//! - [`reservation`]: the signed envelope, its strict payload parser,
//!   [`reservation::verify`] and [`reservation::sign`];
//! - [`audit`]: the append-only log of accepted reservations, which
//!   gives back every accepted id (replay protection across restarts)
//!   and each pool's totals.

pub mod audit;
pub mod keys;
pub mod reservation;
