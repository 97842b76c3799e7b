//! The Solo5 hvt guest ABI, as tt-host implements it.
//!
//! The layouts and numbers are defined once, in the `tt-hvt-abi` crate
//! that tt-guest shares (as Solo5's tender and bindings share
//! `hvt_abi.h`); this module re-exports them, with `ByteValued` so that
//! modules read argument structs from guest memory as typed values (see
//! [`crate::modules::read_args`]). Only host-side choices live here.

pub use tt_hvt_abi::*;

/// Argument struct sizes, for code that still reads arguments by offset.
///
/// To be removed once `modules/block.rs`, `modules/net.rs` and the
/// hypercall fuzzer read the `Hc*` structs through
/// [`crate::modules::read_args`]; use `size_of::<HcPuts>()` and the like.
pub mod layout {
    use core::mem::size_of;

    /// `size_of::<HcPuts>()`.
    pub const PUTS_SIZE: usize = size_of::<super::HcPuts>();
    /// `size_of::<HcPoll>()`.
    pub const POLL_SIZE: usize = size_of::<super::HcPoll>();
    /// `size_of::<HcBlockRead>()` (and of `HcBlockWrite`).
    pub const BLOCK_SIZE: usize = size_of::<super::HcBlockRead>();
    /// `size_of::<HcNetRead>()` (and of `HcNetWrite`).
    pub const NET_SIZE: usize = size_of::<super::HcNetRead>();
    /// `size_of::<HcHalt>()`.
    pub const HALT_SIZE: usize = size_of::<super::HcHalt>();
    /// [`super::HALT_COOKIE_MAX`].
    pub const HALT_COOKIE_MAX: u64 = super::HALT_COOKIE_MAX;
}
