//! Tender modules: each device kind handles its own hypercalls.
//!
//! As in Solo5's tender, the core ([`crate::vmm`]) knows nothing about
//! devices. A [`Module`] says which hypercalls it serves; the run loop
//! decodes the hypercall number and argument address and hands them to the
//! module that registered it. Adding a device kind means adding a module.
//!
//! A module reads its argument struct (one of the `Hc*` structs of
//! [`crate::abi`]) from guest memory with [`read_args`], or, when the
//! struct has OUT fields, with [`read_args_mut`], and writes each OUT field
//! back on its own with `set_out!`: never the whole struct, so the guest's
//! IN fields are left as they were. A guest address or length outside
//! guest memory is a [`GuestError`], which stops the guest with exit
//! status 1. A request that is well-addressed but wrong (bad handle,
//! unaligned block offset...) is answered with an error code in the
//! struct's `ret` field instead.
//!
//! Handlers see guest memory as a [`GuestMem`]: RAM from the boot info up,
//! and the ranges the host must never write for the guest
//! ([`crate::loader::Image::protected_ranges`]: the boot data below 1 MiB,
//! the image's code, read-only data and supervisor-only segments). An
//! argument struct with OUT fields, or a buffer the host fills, that
//! overlaps one is a [`GuestError::ReadOnly`], refused before anything is
//! served. The host still reads from them (PUTS of read-only data, a
//! BLOCK_WRITE of code).

pub mod block;
pub mod console;
pub mod kind;
pub mod net;
pub mod poll;

use crate::abi::Hypercall;
use crate::loader::Protected;
use std::marker::PhantomData;
use std::mem::size_of;
use std::sync::Arc;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

/// Guest memory as hypercall handlers see it: the memory (it derefs to
/// it, to read and to check ranges) and what in it the host must never
/// write for the guest, which [`check_writable`] and [`read_args_mut`]
/// enforce.
#[derive(Debug, Clone)]
pub struct GuestMem {
    mem: GuestMemoryMmap,
    protected: Arc<[Protected]>,
}

impl GuestMem {
    /// `mem`, of which the host may not write `protected` for the guest.
    pub fn new(mem: GuestMemoryMmap, protected: Vec<Protected>) -> Self {
        GuestMem {
            mem,
            protected: protected.into(),
        }
    }

    /// `mem` with nothing protected (tests and fuzzing).
    pub fn unprotected(mem: GuestMemoryMmap) -> Self {
        GuestMem::new(mem, Vec::new())
    }

    /// The memory itself.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The ranges the host may not write for the guest.
    pub fn protected(&self) -> &[Protected] {
        &self.protected
    }
}

impl std::ops::Deref for GuestMem {
    type Target = GuestMemoryMmap;
    fn deref(&self) -> &GuestMemoryMmap {
        &self.mem
    }
}

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
    /// Below the boot info lie tt-host's GDT, page tables and CPL 3
    /// monitor: the host never reads or writes them for the guest.
    #[error(
        "invalid hypercall address: {what} at {gpa:#x} (+{len} bytes) lies in tt-host's own \
         memory below {floor:#x} (GDT, page tables, CPL 3 monitor), which hypercalls cannot \
         use"
    )]
    Reserved {
        what: &'static str,
        gpa: u64,
        len: u64,
        floor: u64,
    },
    /// The host would write where the guest itself may not.
    #[error(
        "invalid hypercall address: {what} at {gpa:#x} (+{len} bytes) overlaps {start:#x}..{end:#x}, \
         {range}, which the host does not write for the guest: use writable memory (data, \
         heap or stack)"
    )]
    ReadOnly {
        what: &'static str,
        gpa: u64,
        len: u64,
        start: u64,
        end: u64,
        range: &'static str,
    },
}

impl GuestError {
    /// The error for `[gpa, gpa+len)`, which `mem` does not hold.
    fn bad(what: &'static str, gpa: u64, len: u64) -> GuestError {
        let floor = crate::vmm::layout::BOOT_INFO_BASE;
        if gpa < floor {
            GuestError::Reserved {
                what,
                gpa,
                len,
                floor,
            }
        } else {
            GuestError::BadAddress { what, gpa, len }
        }
    }
}

/// A device kind's hypercall handlers.
pub trait Module {
    /// Module name, for messages.
    fn name(&self) -> &'static str;
    /// The hypercalls this module handles.
    fn hypercalls(&self) -> &'static [Hypercall];
    /// Serve `call` with its argument struct at guest address `arg`.
    fn handle(&mut self, call: Hypercall, arg: u64, mem: &GuestMem) -> Result<Action, GuestError>;
    /// Called once when the guest stops: flush devices. An error (a
    /// message naming the device) means what the guest wrote may not be
    /// durable; the run then fails even if the guest exited cleanly.
    fn shutdown(&mut self) -> Result<(), String> {
        Ok(())
    }
    /// Something the user should know about the run that is not a failure
    /// (console output that was lost, say): asked once after
    /// [`Module::shutdown`], and printed on stderr.
    fn notice(&mut self) -> Option<String> {
        None
    }
    /// With the vCPU paused, for a snapshot or a migration: make what the
    /// guest was told is done complete on the host (every acknowledged
    /// block write durable on its image). The module keeps serving
    /// afterwards. An error names the device.
    fn quiesce(&mut self) -> Result<(), String> {
        Ok(())
    }
    /// After [`quiesce`](Self::quiesce): the identity of each image
    /// backing the module's devices.
    fn disks(&self) -> Result<Vec<crate::snapshot::DiskIdentity>, String> {
        Ok(Vec::new())
    }
    /// The descriptors holding the locks of the module's devices (see
    /// [`crate::block::Backend::lock_fds`]).
    fn lock_fds(&self) -> Vec<std::os::fd::RawFd> {
        Vec::new()
    }
    /// After [`quiesce`](Self::quiesce), the vCPU paused since: touch no
    /// device file until [`resume`](Self::resume) (a migration hands them
    /// over meanwhile).
    fn suspend(&mut self) -> Result<(), String> {
        Ok(())
    }
    /// After [`suspend`](Self::suspend), when the migration failed.
    fn resume(&mut self) -> Result<(), String> {
        Ok(())
    }
    /// Each net device's MAC, by device name (for a snapshot).
    fn net_macs(&self) -> Vec<(String, [u8; 6])> {
        Vec::new()
    }
    /// Descriptors a local migration hands to the target with the guest,
    /// by device name: a TAP, which cannot be attached twice.
    fn handover_fds(&self) -> Vec<(String, std::os::fd::RawFd)> {
        Vec::new()
    }
}

/// Read the argument struct `T` of a hypercall from guest address `gpa`,
/// for a hypercall that writes nothing back (PUTS, HALT). Returns a copy
/// of it: the guest may change the original meanwhile; use the copy only.
pub fn read_args<T: ByteValued>(mem: &GuestMemoryMmap, gpa: u64) -> Result<T, GuestError> {
    mem.read_obj::<T>(GuestAddress(gpa))
        .map_err(|_| GuestError::bad("hypercall argument", gpa, size_of::<T>() as u64))
}

/// Read the argument struct `T` of a hypercall that has OUT fields: the
/// whole struct must be memory the host may write for the guest
/// ([`check_writable`]), else nothing is served. Returns a copy of it (use
/// the copy only) and where it is, to write OUT fields back with
/// `set_out!`.
pub fn read_args_mut<T: ByteValued>(mem: &GuestMem, gpa: u64) -> Result<(T, ArgAt<T>), GuestError> {
    let val = read_args::<T>(mem, gpa)?;
    check_writable(mem, "hypercall argument", gpa, size_of::<T>() as u64)?;
    Ok((
        val,
        ArgAt {
            gpa,
            _ty: PhantomData,
        },
    ))
}

/// Where a hypercall's argument struct `T` lies in guest memory, as
/// [`read_args_mut`] found it: writable for the guest.
#[derive(Debug, Clone, Copy)]
pub struct ArgAt<T> {
    gpa: u64,
    _ty: PhantomData<fn() -> T>,
}

impl<T: ByteValued> ArgAt<T> {
    /// Write `val` at byte `offset` of the struct. Called by `set_out!`,
    /// which takes `offset` from `offset_of!` and checks that `val` has
    /// the field's type.
    pub(crate) fn write_field<F: ByteValued>(&self, mem: &GuestMemoryMmap, offset: usize, val: F) {
        debug_assert!(offset + size_of::<F>() <= size_of::<T>());
        // The whole struct was checked by read_args_mut: in guest memory
        // and clear of protected ranges.
        let _ = mem.write_obj(val, GuestAddress(self.gpa + offset as u64));
    }
}

/// Write one OUT field of a hypercall's argument struct back to guest
/// memory: `set_out!(mem, at, HcBlockRead.len = n)`, with `at` from
/// [`read_args_mut`]. The field's place comes from `core::mem::offset_of!`,
/// and `n` must have the field's type (checked at compile time).
macro_rules! set_out {
    ($mem:expr, $at:expr, $ty:ident . $field:ident = $val:expr) => {{
        let val = $val;
        // Never called: makes the compiler check `val` against the field.
        let _type_check = |a: &mut $ty| a.$field = val;
        let at: &$crate::modules::ArgAt<$ty> = &$at;
        at.write_field($mem, ::core::mem::offset_of!($ty, $field), val)
    }};
}
pub(crate) use set_out;

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
        Err(GuestError::bad(what, gpa, len))
    }
}

/// Check that the host may write `[gpa, gpa+len)` for the guest: it is
/// guest memory ([`check_range`]) and overlaps none of `mem`'s protected
/// ranges (the guest's code, read-only data, supervisor-only segments and
/// the boot data below 1 MiB). Otherwise a bad address, naming the range.
pub fn check_writable(
    mem: &GuestMem,
    what: &'static str,
    gpa: u64,
    len: u64,
) -> Result<(), GuestError> {
    check_range(mem, what, gpa, len)?;
    match mem.protected.iter().find(|p| p.overlaps(gpa, len)) {
        None => Ok(()),
        Some(p) => Err(GuestError::ReadOnly {
            what,
            gpa,
            len,
            start: p.start,
            end: p.end,
            range: p.what,
        }),
    }
}

/// Bounce buffer size for copying guest data to and from host files.
pub const CHUNK: usize = 1 << 20;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::{ret, HcNetRead};

    #[test]
    fn set_out_writes_one_field_and_leaves_the_rest_of_the_struct_alone() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let guest = HcNetRead {
            handle: 3,
            data: 0x2000,
            len: 2048,
            ret: -7,
            _pad: 0xdead_beef,
        };
        mem.write_obj(guest, GuestAddress(0x1000)).unwrap();
        let mem = GuestMem::unprotected(mem);
        let a = read_args::<HcNetRead>(&mem, 0x1000).unwrap();
        assert_eq!(a, guest);
        let (a, at) = read_args_mut::<HcNetRead>(&mem, 0x1000).unwrap();
        assert_eq!(a, guest);
        set_out!(&mem, at, HcNetRead.len = 60);
        set_out!(&mem, at, HcNetRead.ret = ret::OK);
        let after = mem.read_obj::<HcNetRead>(GuestAddress(0x1000)).unwrap();
        assert_eq!(
            after,
            HcNetRead {
                len: 60,
                ret: ret::OK,
                ..guest
            }
        );
    }

    #[test]
    fn an_argument_struct_that_crosses_the_end_of_memory_is_a_bad_address() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let r = read_args::<HcNetRead>(&mem, (1 << 20) - 31);
        assert_eq!(
            r,
            Err(GuestError::BadAddress {
                what: "hypercall argument",
                gpa: (1 << 20) - 31,
                len: 32
            })
        );
    }

    /// Memory of 1 MiB whose page 0x2000 is code and 0x3000 read-only data.
    fn protected_mem() -> GuestMem {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let p = |start, what| Protected {
            start,
            end: start + 0x1000,
            what,
        };
        GuestMem::new(mem, vec![p(0x2000, "code"), p(0x3000, "rodata")])
    }

    #[test]
    fn a_struct_with_out_fields_in_protected_memory_is_refused_before_it_is_served() {
        let mem = protected_mem();
        for at in [0x2000, 0x3ff0, 0x1ff8] {
            mem.write_obj(0x5555u64, GuestAddress(at)).unwrap();
            // Readable for a hypercall that writes nothing back...
            assert!(read_args::<HcNetRead>(&mem, at).is_ok());
            // ... but not one that would write OUT fields.
            let e = read_args_mut::<HcNetRead>(&mem, at).unwrap_err();
            assert!(
                matches!(e, GuestError::ReadOnly { gpa, .. } if gpa == at),
                "{e:?}"
            );
            assert_eq!(mem.read_obj::<u64>(GuestAddress(at)).unwrap(), 0x5555);
        }
        let e = read_args_mut::<HcNetRead>(&mem, 0x3000).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("0x3000..0x4000, rodata"), "{msg}");
        assert!(read_args_mut::<HcNetRead>(&mem, 0x1fe0).is_ok());
        assert!(read_args_mut::<HcNetRead>(&mem, 0x4000).is_ok());
    }

    #[test]
    fn check_writable_refuses_any_overlap_with_a_protected_range() {
        let mem = protected_mem();
        assert!(check_writable(&mem, "buf", 0x1000, 0x1000).is_ok());
        assert!(check_writable(&mem, "buf", 0x4000, 0x1000).is_ok());
        // Empty: writes nothing, overlaps nothing.
        assert!(check_writable(&mem, "buf", 0x2000, 0).is_ok());
        for (at, len) in [(0x1fff, 2), (0x2000, 1), (0x3fff, 1), (0x1000, 0x4000)] {
            let e = check_writable(&mem, "buf", at, len).unwrap_err();
            assert!(
                matches!(e, GuestError::ReadOnly { .. }),
                "{at:#x}+{len}: {e:?}"
            );
        }
        // Outside memory is still that error first.
        let e = check_writable(&mem, "buf", 1 << 20, 1).unwrap_err();
        assert!(matches!(e, GuestError::BadAddress { .. }), "{e:?}");
    }
}
