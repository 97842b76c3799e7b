//! The Solo5 hvt guest ABI, as tt-host implements it.
//!
//! These are the layouts a guest shares with its tender, taken as facts from
//! Solo5's `include/hvt_abi.h`, `mft_abi.h` and `elf_abi.h`. All integers are
//! little-endian; all guest pointers are guest-physical addresses (guests run
//! identity-mapped).

/// Lowest guest address an image may be loaded at (1 MiB).
pub const GUEST_MIN_BASE: u64 = 0x10_0000;

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

/// I/O port of hypercall 0; hypercall `nr` is an `outl` to `PIO_BASE + nr`.
pub const HYPERCALL_PIO_BASE: u16 = 0x500;

/// Maximum size of the guest command line, including the terminating NUL.
pub const CMDLINE_SIZE: usize = 8192;

/// The hypercalls of ABI version 2, numbered as in `enum hvt_hypercall`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hypercall {
    Walltime = 1,
    Puts = 2,
    Poll = 3,
    BlockWrite = 4,
    BlockRead = 5,
    NetWrite = 6,
    NetRead = 7,
    Halt = 8,
}

impl Hypercall {
    /// Decode an I/O port number; `None` if it is not a hypercall port.
    pub fn from_port(port: u16) -> Option<Hypercall> {
        Some(match port.checked_sub(HYPERCALL_PIO_BASE)? {
            1 => Hypercall::Walltime,
            2 => Hypercall::Puts,
            3 => Hypercall::Poll,
            4 => Hypercall::BlockWrite,
            5 => Hypercall::BlockRead,
            6 => Hypercall::NetWrite,
            7 => Hypercall::NetRead,
            8 => Hypercall::Halt,
            _ => return None,
        })
    }
}

/// Result codes written to a hypercall's `ret` field (`solo5_result_t`).
pub mod ret {
    pub const OK: i32 = 0;
    /// Nothing to read now; try again after POLL says the device is ready.
    pub const AGAIN: i32 = 1;
    /// The request was malformed (bad handle, offset, length or address).
    pub const EINVAL: i32 = 2;
    /// The host could not perform a well-formed request.
    pub const EUNSPEC: i32 = 3;
}

/// Exit status a guest uses to say it aborted (`solo5_abort`).
pub const EXIT_ABORT: i32 = 255;

/// Argument layouts, with their byte offsets. Sizes are checked in tests.
pub mod layout {
    /// `struct hvt_boot_info`: mem_size, kernel_end, cpu_cycle_freq,
    /// cmdline, mft (five u64).
    pub const BOOT_INFO_SIZE: usize = 40;
    /// `struct hvt_hc_puts`: data @0, len @8.
    pub const PUTS_SIZE: usize = 16;
    /// `struct hvt_hc_poll`: timeout_nsecs @0, ready_set @8, ret @16.
    pub const POLL_SIZE: usize = 24;
    /// `struct hvt_hc_block_{read,write}`: handle @0, offset @8, data @16,
    /// len @24, ret @32.
    pub const BLOCK_SIZE: usize = 40;
    /// `struct hvt_hc_net_{read,write}`: handle @0, data @8, len @16, ret @24.
    pub const NET_SIZE: usize = 32;
    /// `struct hvt_hc_halt`: cookie @0, exit_status @8.
    pub const HALT_SIZE: usize = 16;
    /// Bytes a non-zero halt cookie points at (`HVT_HALT_COOKIE_MAX`).
    pub const HALT_COOKIE_MAX: u64 = 512;
}

/// ELF note owner of both Solo5 notes.
pub const NOTE_NAME: &[u8; 6] = b"Solo5\0";
/// Size of a Solo5 note header: n_namesz, n_descsz, n_type, name padded to 8.
pub const NOTE_HEADER_SIZE: usize = 20;
/// Note type of the ABI note ("ABI1").
pub const NOTE_TYPE_ABI1: u32 = 0x3149_4241;
/// Note type of the application manifest ("MFT1").
pub const NOTE_TYPE_MFT1: u32 = 0x3154_464d;
/// `abi_target` of the hvt tender.
pub const ABI_TARGET_HVT: u32 = 1;
/// The hvt ABI version tt-host implements.
pub const ABI_VERSION: u32 = 2;
/// Size of the ABI note descriptor (abi_target, abi_version, 2 reserved).
pub const ABI1_DESC_SIZE: usize = 16;

/// Manifest format version.
pub const MFT_VERSION: u32 = 1;
/// Maximum number of manifest entries, the reserved first one included.
pub const MFT_MAX_ENTRIES: usize = 64;
/// Bytes of `mft_entry.name`, the terminating NUL included.
pub const MFT_NAME_SIZE: usize = 68;
/// Size of `struct mft_entry`.
pub const MFT_ENTRY_SIZE: usize = 104;
/// Size of the `struct mft` header (version, entries).
pub const MFT_HEADER_SIZE: usize = 8;
/// Alignment of `struct mft` inside its note; the descriptor starts with
/// padding up to it.
pub const MFT_NOTE_ALIGN: usize = 8;
/// Largest manifest note descriptor accepted.
pub const MFT_NOTE_MAX_DESC: usize = (MFT_NOTE_ALIGN - NOTE_HEADER_SIZE % MFT_NOTE_ALIGN)
    % MFT_NOTE_ALIGN
    + MFT_HEADER_SIZE
    + MFT_MAX_ENTRIES * MFT_ENTRY_SIZE;

/// `mft_entry` field offsets.
pub mod mft_entry {
    pub const TYPE: usize = 68;
    pub const BLOCK_CAPACITY: usize = 72;
    pub const BLOCK_SIZE: usize = 80;
    pub const NET_MAC: usize = 72;
    pub const NET_MTU: usize = 78;
    pub const PRIVATE: usize = 88;
    pub const ATTACHED: usize = 96;
}

/// `mft_type` values.
pub const MFT_DEV_BLOCK_BASIC: u32 = 1;
pub const MFT_DEV_NET_BASIC: u32 = 2;
pub const MFT_RESERVED_FIRST: u32 = 1 << 30;
