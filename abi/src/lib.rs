//! tt-hvt-abi: the Solo5 hvt guest ABI, defined once.
//!
//! A Solo5 hvt guest and its tender share a handful of memory layouts: the
//! boot info the tender passes at entry, one argument struct per
//! hypercall, the application manifest and the two ELF notes an image
//! carries. Solo5 keeps them in one header pair (`include/hvt_abi.h`,
//! `mft_abi.h`, with `elf_abi.h`) included by both its tender and its
//! bindings; this crate is that pair for tt-host (the tender) and tt-guest
//! (the bindings). The numbers and layouts are facts taken from those
//! headers; `src/tests.rs` checks every size and field offset against them.
//!
//! # The model
//!
//! * A hypercall is a 32-bit `out` to port [`HYPERCALL_PIO_BASE`] + its
//!   number ([`Hypercall::port`]), with the guest-physical address of its
//!   argument struct in `eax`. The structs (`Hc*`) have IN fields the guest
//!   fills and OUT fields the tender writes back before the guest resumes.
//! * Every struct is `#[repr(C)]`, built from fixed-size integers and byte
//!   arrays only, and spells out its padding as `_pad` fields. A
//!   compile-time check (`abi_struct!`) refuses a struct whose size is not
//!   the sum of its fields, so no struct has an implicit padding byte: every
//!   byte of every value is initialised, and any byte pattern is a valid
//!   value. That is what makes the optional `vm-memory` feature's
//!   `ByteValued` implementations sound.
//! * Integers are little-endian (x86-64); guest pointers are `u64`
//!   guest-physical addresses (`hvt_gpa_t`), since guests run identity
//!   mapped. C's `size_t` is `u64`, `int` is `i32` and `bool` is `u8`.
//! * tt-host's own extensions of the ABI ([`PF_TT_SUPERVISOR`],
//!   [`ENTRY_RSI_TT_HOST`]) live here too, so both sides agree on them;
//!   other tenders ignore them.
//!
//! The crate is `no_std` and has no dependencies unless the `vm-memory`
//! feature is enabled.

#![no_std]
#![deny(missing_docs)]

/// Declare an ABI struct: `#[repr(C)]`, `Clone + Copy + Debug + Eq`, a
/// compile-time check that it has no implicit padding (its size is the sum
/// of its fields' sizes), and, with the `vm-memory` feature, `ByteValued`.
macro_rules! abi_struct {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $( $(#[$fmeta:meta])* pub $field:ident : $ty:ty, )*
        }
    ) => {
        $(#[$meta])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub struct $name {
            $( $(#[$fmeta])* pub $field: $ty, )*
        }

        const _: () = assert!(
            core::mem::size_of::<$name>() == 0 $( + core::mem::size_of::<$ty>() )*,
            concat!(stringify!($name), " has implicit padding: add an explicit _pad field"),
        );

        // SAFETY: `$name` is `repr(C)` and made only of integers, byte
        // arrays and other ABI types for which every byte pattern is a
        // valid value; the assertion above proves it has no padding bytes,
        // so every byte of a value is initialised. It holds no references
        // or pointers (guest addresses are plain `u64`), so it is `Send`,
        // `Sync` and `Copy`.
        #[cfg(feature = "vm-memory")]
        unsafe impl vm_memory::ByteValued for $name {}
    };
}

mod mft;
pub use mft::*;
pub mod virtio;

/// The hvt ABI version (`HVT_ABI_VERSION`) this crate describes.
pub const ABI_VERSION: u32 = 2;

/// Lowest guest address an image may be loaded at (`HVT_GUEST_MIN_BASE`,
/// 1 MiB).
pub const GUEST_MIN_BASE: u64 = 0x10_0000;

/// I/O port of hypercall 0 (`HVT_HYPERCALL_PIO_BASE`); hypercall `nr` is
/// an `outl` to `HYPERCALL_PIO_BASE + nr`.
pub const HYPERCALL_PIO_BASE: u16 = 0x500;

/// Maximum size of the guest command line, including the terminating NUL
/// (`HVT_CMDLINE_SIZE`).
pub const CMDLINE_SIZE: usize = 8192;

/// Bytes a non-zero halt cookie points at (`HVT_HALT_COOKIE_MAX`).
pub const HALT_COOKIE_MAX: u64 = 512;

/// Exit status of a guest that aborted (`SOLO5_EXIT_ABORT`).
pub const EXIT_ABORT: i32 = 255;

/// tt-host's extension of ELF segment flags, in the range ELF leaves to
/// the OS (`PF_MASKOS`): a `PT_LOAD` segment with this bit is mapped
/// supervisor-only (no U bit), and an image with such a segment keeps the
/// GDT and page tables mapped, supervisor-only, so that its CPL 0 code can
/// adjust them (docs/ABI.md, "CPL 3 on the host's page tables"). tt-guest
/// marks its CPL 0 structures so; other tenders ignore the bit.
pub const PF_TT_SUPERVISOR: u32 = 0x0010_0000;

/// `rsi` when tt-host enters an image: ASCII "TT-HOST1", little-endian.
/// solo5-hvt enters with `rsi` = 0, so an image can tell the two tenders
/// apart before it touches memory only one of them maps (solo5-hvt maps
/// nothing below 64 KiB, its page tables included).
pub const ENTRY_RSI_TT_HOST: u64 = u64::from_le_bytes(*b"TT-HOST1");

/// The hypercalls, numbered as in `enum hvt_hypercall` (0 is reserved).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Hypercall {
    /// [`HcWalltime`]
    Walltime = 1,
    /// [`HcPuts`]
    Puts = 2,
    /// [`HcPoll`]
    Poll = 3,
    /// [`HcBlockWrite`]
    BlockWrite = 4,
    /// [`HcBlockRead`]
    BlockRead = 5,
    /// [`HcNetWrite`]
    NetWrite = 6,
    /// [`HcNetRead`]
    NetRead = 7,
    /// [`HcHalt`]
    Halt = 8,
}

impl Hypercall {
    /// Every hypercall, in number order.
    pub const ALL: [Hypercall; 8] = [
        Hypercall::Walltime,
        Hypercall::Puts,
        Hypercall::Poll,
        Hypercall::BlockWrite,
        Hypercall::BlockRead,
        Hypercall::NetWrite,
        Hypercall::NetRead,
        Hypercall::Halt,
    ];

    /// The hypercall numbered `nr`; `None` for 0 (reserved) and numbers
    /// past the last one (`HVT_HYPERCALL_MAX` and up).
    pub const fn from_nr(nr: u16) -> Option<Hypercall> {
        match nr {
            1..=8 => Some(Hypercall::ALL[nr as usize - 1]),
            _ => None,
        }
    }

    /// Decode an I/O port; `None` if it is not a hypercall's port.
    pub const fn from_port(port: u16) -> Option<Hypercall> {
        match port.checked_sub(HYPERCALL_PIO_BASE) {
            Some(nr) => Hypercall::from_nr(nr),
            None => None,
        }
    }

    /// Its number.
    pub const fn nr(self) -> u16 {
        self as u16
    }

    /// The I/O port the guest writes to issue it.
    pub const fn port(self) -> u16 {
        HYPERCALL_PIO_BASE + self as u16
    }
}

/// Result codes a tender writes to a hypercall's `ret` field
/// (`solo5_result_t`).
pub mod ret {
    /// Success.
    pub const OK: i32 = 0;
    /// Nothing to read now; try again after POLL says the device is ready.
    pub const AGAIN: i32 = 1;
    /// The request was malformed (bad handle, offset, length or address).
    pub const EINVAL: i32 = 2;
    /// The host could not perform a well-formed request.
    pub const EUNSPEC: i32 = 3;
}

abi_struct! {
    /// `struct hvt_boot_info`: the tender passes its address in `rdi` at
    /// entry.
    #[derive(Default)]
    pub struct BootInfo {
        /// Guest memory size in bytes (memory is `[0, mem_size)`).
        pub mem_size: u64,
        /// First address after the loaded image.
        pub kernel_end: u64,
        /// TSC frequency in Hz.
        pub cpu_cycle_freq: u64,
        /// Address of the NUL-terminated command line.
        pub cmdline: u64,
        /// Address of the tender-filled manifest ([`MftHeader`] then
        /// its entries).
        pub mft: u64,
    }
}

abi_struct! {
    /// `struct hvt_hc_walltime` ([`Hypercall::Walltime`]).
    #[derive(Default)]
    pub struct HcWalltime {
        /// OUT: nanoseconds since the Unix epoch.
        pub nsecs: u64,
    }
}

abi_struct! {
    /// `struct hvt_hc_puts` ([`Hypercall::Puts`]): write `len` bytes at
    /// `data` to the console.
    #[derive(Default)]
    pub struct HcPuts {
        /// IN: address of the bytes.
        pub data: u64,
        /// IN: their number.
        pub len: u64,
    }
}

abi_struct! {
    /// `struct hvt_hc_poll` ([`Hypercall::Poll`]): wait up to
    /// `timeout_nsecs` for a network device to become readable.
    #[derive(Default)]
    pub struct HcPoll {
        /// IN: timeout, relative to the call.
        pub timeout_nsecs: u64,
        /// OUT: bit `handle` set for each readable device.
        pub ready_set: u64,
        /// OUT: the number of readable devices (0 on timeout).
        pub ret: i32,
        /// Padding to the struct's 8-byte alignment.
        pub _pad: u32,
    }
}

abi_struct! {
    /// `struct hvt_hc_block_write` ([`Hypercall::BlockWrite`]): write `len`
    /// bytes at `data` to device `handle` at byte `offset`.
    #[derive(Default)]
    pub struct HcBlockWrite {
        /// IN: the device's manifest index.
        pub handle: u64,
        /// IN: byte offset on the device.
        pub offset: u64,
        /// IN: address of the bytes.
        pub data: u64,
        /// IN: their number.
        pub len: u64,
        /// OUT: a [`ret`] code.
        pub ret: i32,
        /// Padding to the struct's 8-byte alignment.
        pub _pad: u32,
    }
}

abi_struct! {
    /// `struct hvt_hc_block_read` ([`Hypercall::BlockRead`]): read `len`
    /// bytes from device `handle` at byte `offset` into `data`.
    #[derive(Default)]
    pub struct HcBlockRead {
        /// IN: the device's manifest index.
        pub handle: u64,
        /// IN: byte offset on the device.
        pub offset: u64,
        /// IN: address of the buffer.
        pub data: u64,
        /// IN: the buffer's size; OUT: bytes read.
        pub len: u64,
        /// OUT: a [`ret`] code.
        pub ret: i32,
        /// Padding to the struct's 8-byte alignment.
        pub _pad: u32,
    }
}

abi_struct! {
    /// `struct hvt_hc_net_write` ([`Hypercall::NetWrite`]): send one frame
    /// of `len` bytes at `data` on device `handle`.
    #[derive(Default)]
    pub struct HcNetWrite {
        /// IN: the device's manifest index.
        pub handle: u64,
        /// IN: address of the frame.
        pub data: u64,
        /// IN: its length.
        pub len: u64,
        /// OUT: a [`ret`] code.
        pub ret: i32,
        /// Padding to the struct's 8-byte alignment.
        pub _pad: u32,
    }
}

abi_struct! {
    /// `struct hvt_hc_net_read` ([`Hypercall::NetRead`]): receive one frame
    /// from device `handle` into `data`.
    #[derive(Default)]
    pub struct HcNetRead {
        /// IN: the device's manifest index.
        pub handle: u64,
        /// IN: address of the buffer.
        pub data: u64,
        /// IN: the buffer's size; OUT: the frame's length.
        pub len: u64,
        /// OUT: a [`ret`] code.
        pub ret: i32,
        /// Padding to the struct's 8-byte alignment.
        pub _pad: u32,
    }
}

abi_struct! {
    /// `struct hvt_hc_halt` ([`Hypercall::Halt`]): stop the guest.
    #[derive(Default)]
    pub struct HcHalt {
        /// IN: 0, or the address of [`HALT_COOKIE_MAX`] bytes the tender
        /// may use (e.g. a trap frame for a core dump).
        pub cookie: u64,
        /// IN: the exit status ([`EXIT_ABORT`] for an abort).
        pub exit_status: i32,
        /// Padding to the struct's 8-byte alignment.
        pub _pad: u32,
    }
}

#[cfg(test)]
mod tests;
