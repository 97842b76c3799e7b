//! Tender modules: each device kind handles its own hypercalls.
//!
//! As in Solo5's tender, the core ([`crate::vmm`]) knows nothing about
//! devices. A [`Module`] says which hypercalls it serves; the run loop
//! decodes the hypercall number and argument address and hands them to the
//! module that registered it. Adding a device kind means adding a module.
//!
//! A module reads its argument struct from guest memory through the checked
//! accessors in this file: a guest address or length outside guest memory
//! is a [`GuestError`], which stops the guest with exit status 1. A request
//! that is well-addressed but wrong (bad handle, unaligned block offset...)
//! is answered with an error code in the struct's `ret` field instead.

pub mod block;
pub mod console;
pub mod kind;
pub mod net;

use crate::abi::Hypercall;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// What the run loop does after a hypercall.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Continue,
    /// The guest halted with this exit status.
    Exit(i32),
}

/// A guest request the host refuses to serve at all: the run ends.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum GuestError {
    #[error(
        "invalid hypercall address: {what} at {gpa:#x} (+{len} bytes) is outside guest memory"
    )]
    BadAddress {
        what: &'static str,
        gpa: u64,
        len: u64,
    },
}

/// A device kind's hypercall handlers.
pub trait Module {
    /// Module name, for messages.
    fn name(&self) -> &'static str;
    /// The hypercalls this module handles.
    fn hypercalls(&self) -> &'static [Hypercall];
    /// Serve `call` with its argument struct at guest address `arg`.
    fn handle(
        &mut self,
        call: Hypercall,
        arg: u64,
        mem: &GuestMemoryMmap,
    ) -> Result<Action, GuestError>;
    /// Called once when the guest stops: flush devices. An error (a
    /// message naming the device) means what the guest wrote may not be
    /// durable; the run then fails even if the guest exited cleanly.
    fn shutdown(&mut self) -> Result<(), String> {
        Ok(())
    }
}

/// Read the `N`-byte argument struct of a hypercall.
pub fn read_arg<const N: usize>(mem: &GuestMemoryMmap, gpa: u64) -> Result<Arg<N>, GuestError> {
    let mut bytes = [0u8; N];
    mem.read_slice(&mut bytes, GuestAddress(gpa))
        .map_err(|_| GuestError::BadAddress {
            what: "hypercall argument",
            gpa,
            len: N as u64,
        })?;
    Ok(Arg { gpa, bytes })
}

/// A hypercall argument struct, copied out of guest memory.
pub struct Arg<const N: usize> {
    gpa: u64,
    bytes: [u8; N],
}

impl<const N: usize> Arg<N> {
    pub fn u64(&self, off: usize) -> u64 {
        u64::from_le_bytes(self.bytes[off..off + 8].try_into().unwrap())
    }
    pub fn i32(&self, off: usize) -> i32 {
        i32::from_le_bytes(self.bytes[off..off + 4].try_into().unwrap())
    }
    /// Write an output field back into guest memory. The struct was
    /// readable, so it is writable too (guest memory is one RAM region).
    pub fn set_u64(&self, mem: &GuestMemoryMmap, off: usize, val: u64) {
        let _ = mem.write_slice(&val.to_le_bytes(), GuestAddress(self.gpa + off as u64));
    }
    pub fn set_i32(&self, mem: &GuestMemoryMmap, off: usize, val: i32) {
        let _ = mem.write_slice(&val.to_le_bytes(), GuestAddress(self.gpa + off as u64));
    }
}

/// Check that `[gpa, gpa+len)` is guest memory. An empty range must
/// still start inside it, as in solo5-hvt (`HVT_CHECKED_GPA_P`): a
/// zero-length buffer at a wild address is a bad address, not a no-op.
pub fn check_range(
    mem: &GuestMemoryMmap,
    what: &'static str,
    gpa: u64,
    len: u64,
) -> Result<(), GuestError> {
    use vm_memory::GuestMemoryBackend;
    let at = GuestAddress(gpa);
    let fits = usize::try_from(len).is_ok_and(|n| {
        GuestMemoryBackend::check_range(mem, at, n) && (n > 0 || mem.address_in_range(at))
    });
    if fits {
        Ok(())
    } else {
        Err(GuestError::BadAddress { what, gpa, len })
    }
}

/// Bounce buffer size for copying guest data to and from host files.
pub const CHUNK: usize = 1 << 20;
