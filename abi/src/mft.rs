//! The Solo5 ELF notes (`elf_abi.h`) and the application manifest
//! (`mft_abi.h`).
//!
//! An image carries two notes owned by "Solo5": `ABI1` ([`Abi1Info`]: the
//! target and ABI version it was built for) and `MFT1` (the manifest: a
//! [`MftHeader`] followed by `entries` [`MftEntry`]s, the devices the image
//! wants, by name and type). A device's handle is its entry's index; entry
//! 0 is always [`MFT_RESERVED_FIRST`]. At launch the tender copies the
//! manifest into guest memory, fills in each attached device's properties
//! ([`MftProps`]) and its `attached` flag, and passes the copy's address in
//! [`crate::BootInfo::mft`].

use core::mem::{align_of, size_of};

/// Owner name of both Solo5 notes, its NUL included (`ABI1_NOTE_NAME`,
/// `MFT1_NOTE_NAME`).
pub const NOTE_NAME: &[u8; 6] = b"Solo5\0";
/// Note type of the ABI note, "ABI1" (`ABI1_NOTE_TYPE`).
pub const NOTE_TYPE_ABI1: u32 = 0x3149_4241;
/// Note type of the manifest note, "MFT1" (`MFT1_NOTE_TYPE`).
pub const NOTE_TYPE_MFT1: u32 = 0x3154_464d;
/// `abi_target` of the hvt tender (`HVT_ABI_TARGET`).
pub const ABI_TARGET_HVT: u32 = 1;

abi_struct! {
    /// `struct abi1_nhdr` / `struct mft1_nhdr`: an ELF note header with the
    /// Solo5 owner name, padded to 4 bytes.
    pub struct NoteHeader {
        /// Name length, NUL included (6).
        pub n_namesz: u32,
        /// Descriptor length (internal alignment padding included).
        pub n_descsz: u32,
        /// [`NOTE_TYPE_ABI1`] or [`NOTE_TYPE_MFT1`].
        pub n_type: u32,
        /// [`NOTE_NAME`], NUL-padded.
        pub n_name: [u8; 8],
    }
}

impl NoteHeader {
    /// The header of a Solo5 note of type `n_type` with `n_descsz`
    /// descriptor bytes.
    pub const fn solo5(n_type: u32, n_descsz: u32) -> NoteHeader {
        NoteHeader {
            n_namesz: NOTE_NAME.len() as u32,
            n_descsz,
            n_type,
            n_name: *b"Solo5\0\0\0",
        }
    }
}

/// Size of a Solo5 note header.
pub const NOTE_HEADER_SIZE: usize = size_of::<NoteHeader>();

abi_struct! {
    /// `struct abi1_info`: the descriptor of the `ABI1` note.
    #[derive(Default)]
    pub struct Abi1Info {
        /// `enum abi_target` ([`ABI_TARGET_HVT`] for hvt).
        pub abi_target: u32,
        /// The target's ABI version ([`crate::ABI_VERSION`]).
        pub abi_version: u32,
        /// Reserved, 0.
        pub reserved0: u32,
        /// Reserved, 0.
        pub reserved1: u32,
    }
}

/// Size of the `ABI1` note descriptor.
pub const ABI1_DESC_SIZE: usize = size_of::<Abi1Info>();
/// Alignment of [`Abi1Info`] inside its note (`ABI1_NOTE_ALIGN`): the
/// descriptor starts with padding from the header up to it.
pub const ABI1_NOTE_ALIGN: usize = align_of::<Abi1Info>();

/// Manifest format version (`MFT_VERSION`).
pub const MFT_VERSION: u32 = 1;
/// Maximum number of manifest entries, entry 0 included (`MFT_MAX_ENTRIES`).
pub const MFT_MAX_ENTRIES: usize = 64;
/// Bytes of [`MftEntry::name`], the terminating NUL included
/// (`MFT_NAME_SIZE`).
pub const MFT_NAME_SIZE: usize = 68;
/// Longest device name (`MFT_NAME_MAX`).
pub const MFT_NAME_MAX: usize = MFT_NAME_SIZE - 1;

/// `mft_type` of a basic block device.
pub const MFT_DEV_BLOCK_BASIC: u32 = 1;
/// `mft_type` of a basic network device.
pub const MFT_DEV_NET_BASIC: u32 = 2;
/// `mft_type` of entry 0; this type and those above it are not devices.
pub const MFT_RESERVED_FIRST: u32 = 1 << 30;
/// tt-host's extension: a virtio-blk device over virtio-mmio (version 2)
/// in the MMIO window above guest RAM ([`VIRTIO_MMIO_BASE`]). The entry's
/// properties are an [`MftVirtio`]. Below `MFT_RESERVED_FIRST`, so
/// solo5-hvt, which does not know the type, refuses such an image
/// cleanly ("declared but not attached") instead of running it without
/// its disk.
pub const MFT_TT_VIRTIO_BLK: u32 = 0x2000_0001;

/// Guest-physical base of the MMIO window: 4 GiB, above the largest guest
/// RAM (RAM is one block from 0, docs/ABI.md). Device `k` of the window
/// has its virtio-mmio registers at `VIRTIO_MMIO_BASE + k * VIRTIO_MMIO_SIZE`.
pub const VIRTIO_MMIO_BASE: u64 = 1 << 32;
/// Bytes of one virtio-mmio device's register window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;

abi_struct! {
    /// `struct mft` without its entries: the manifest's first 8 bytes,
    /// followed by `entries` [`MftEntry`]s.
    #[derive(Default)]
    pub struct MftHeader {
        /// [`MFT_VERSION`].
        pub version: u32,
        /// Number of entries, entry 0 included.
        pub entries: u32,
    }
}

abi_struct! {
    /// `struct mft_block_basic`: a block device's properties.
    #[derive(Default)]
    pub struct MftBlockBasic {
        /// Capacity in bytes.
        pub capacity: u64,
        /// Block size in bytes (the unit of I/O).
        pub block_size: u16,
        /// Padding to the struct's 8-byte alignment.
        pub _pad: [u8; 6],
    }
}

abi_struct! {
    /// `struct mft_net_basic`: a network device's properties.
    #[derive(Default)]
    pub struct MftNetBasic {
        /// The guest's MAC address.
        pub mac: [u8; 6],
        /// MTU: payload bytes, the 14-byte Ethernet header excluded.
        pub mtu: u16,
    }
}

abi_struct! {
    /// The properties of an [`MFT_TT_VIRTIO_BLK`] entry: where its
    /// virtio-mmio registers are. Its capacity and sector size are in the
    /// device's virtio config space.
    #[derive(Default)]
    pub struct MftVirtio {
        /// Guest-physical address of the device's virtio-mmio registers
        /// (in the MMIO window, mapped by the tender).
        pub mmio_base: u64,
        /// Bytes of that register window ([`VIRTIO_MMIO_SIZE`]).
        pub mmio_size: u32,
        /// Largest queue size the device offers.
        pub queue_max: u16,
        /// Zero.
        pub _pad: u16,
    }
}

/// The device-properties union of `struct mft_entry` (`u`): block, net or
/// virtio properties, as the entry's type says.
///
/// Its fields are private so that every value has all 16 bytes
/// initialised: a value is built from [`MftProps::ZERO`] or from bytes, and
/// the constructors write one member over zeroes. That keeps reading either
/// member, and `ByteValued`, sound.
#[repr(C)]
#[derive(Clone, Copy)]
pub union MftProps {
    block_basic: MftBlockBasic,
    net_basic: MftNetBasic,
    virtio: MftVirtio,
    raw: [u8; 16],
}

const _: () = assert!(size_of::<MftProps>() == size_of::<MftBlockBasic>());
const _: () = assert!(size_of::<MftProps>() == 16);

impl MftProps {
    /// All bytes zero (what the tender leaves in an unattached entry).
    pub const ZERO: MftProps = MftProps { raw: [0; 16] };

    /// Block device properties.
    pub const fn from_block_basic(b: MftBlockBasic) -> MftProps {
        let mut p = MftProps::ZERO;
        p.block_basic = b;
        p
    }

    /// Network device properties; the 8 bytes after them stay zero.
    pub const fn from_net_basic(n: MftNetBasic) -> MftProps {
        let mut p = MftProps::ZERO;
        p.net_basic = n;
        p
    }

    /// virtio device properties.
    pub const fn from_virtio(v: MftVirtio) -> MftProps {
        let mut p = MftProps::ZERO;
        p.virtio = v;
        p
    }

    /// The properties read as a virtio device's.
    pub const fn virtio(&self) -> MftVirtio {
        // SAFETY: as in `block_basic`; MftVirtio is 16 plain bytes.
        unsafe { self.virtio }
    }

    /// The properties read as a block device's.
    pub const fn block_basic(&self) -> MftBlockBasic {
        // SAFETY: all 16 bytes of every MftProps are initialised (see the
        // type's doc), and every byte pattern is a valid MftBlockBasic.
        unsafe { self.block_basic }
    }

    /// The properties read as a network device's.
    pub const fn net_basic(&self) -> MftNetBasic {
        // SAFETY: as in `block_basic`; MftNetBasic is its first 8 bytes.
        unsafe { self.net_basic }
    }

    /// The 16 bytes.
    pub const fn to_bytes(&self) -> [u8; 16] {
        // SAFETY: as in `block_basic`.
        unsafe { self.raw }
    }

    /// Properties from their 16 bytes.
    pub const fn from_bytes(raw: [u8; 16]) -> MftProps {
        MftProps { raw }
    }
}

impl Default for MftProps {
    fn default() -> MftProps {
        MftProps::ZERO
    }
}

impl PartialEq for MftProps {
    fn eq(&self, other: &MftProps) -> bool {
        self.to_bytes() == other.to_bytes()
    }
}

impl Eq for MftProps {}

impl core::fmt::Debug for MftProps {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_tuple("MftProps").field(&self.to_bytes()).finish()
    }
}

// SAFETY: MftProps is `repr(C)`, 16 bytes, every value has all of them
// initialised (its fields are private and every constructor starts from
// all zeroes or from 16 bytes), and every byte pattern is a valid value of
// each member (integers and byte arrays only). It holds no pointers.
#[cfg(feature = "vm-memory")]
unsafe impl vm_memory::ByteValued for MftProps {}

abi_struct! {
    /// `struct mft_entry`: one manifest entry.
    pub struct MftEntry {
        /// The name, NUL-terminated in its last byte at the latest.
        pub name: [u8; MFT_NAME_SIZE],
        /// `mft_type`: [`MFT_DEV_BLOCK_BASIC`], [`MFT_DEV_NET_BASIC`], or
        /// [`MFT_RESERVED_FIRST`] and above for unused entries.
        pub ty: u32,
        /// Device properties (`u`), filled in by the tender.
        pub props: MftProps,
        /// Private to the tender (`b`: solo5-hvt keeps a host descriptor
        /// there); tt-host leaves it 0.
        pub backing: u64,
        /// Non-zero once the tender attached a backend (`bool attached`).
        pub attached: u8,
        /// Padding to the struct's 8-byte alignment.
        pub _pad: [u8; 7],
    }
}

impl MftEntry {
    /// All bytes zero.
    pub const ZERO: MftEntry = MftEntry::new([0; MFT_NAME_SIZE], 0);

    /// An unattached entry with this name field and type.
    pub const fn new(name: [u8; MFT_NAME_SIZE], ty: u32) -> MftEntry {
        MftEntry {
            name,
            ty,
            props: MftProps::ZERO,
            backing: 0,
            attached: 0,
            _pad: [0; 7],
        }
    }

    /// The mandatory entry 0: no name, type [`MFT_RESERVED_FIRST`].
    pub const fn reserved_first() -> MftEntry {
        MftEntry::new([0; MFT_NAME_SIZE], MFT_RESERVED_FIRST)
    }

    /// The name's bytes up to its first NUL (all of them if there is none).
    pub fn name_bytes(&self) -> &[u8] {
        let n = self
            .name
            .iter()
            .position(|&c| c == 0)
            .unwrap_or(MFT_NAME_SIZE);
        &self.name[..n]
    }
}

impl Default for MftEntry {
    fn default() -> MftEntry {
        MftEntry::ZERO
    }
}

/// Size of [`MftHeader`] (where the entries start).
pub const MFT_HEADER_SIZE: usize = size_of::<MftHeader>();
/// Size of [`MftEntry`].
pub const MFT_ENTRY_SIZE: usize = size_of::<MftEntry>();
/// Alignment of `struct mft` inside its note (`MFT1_NOTE_ALIGN`): the
/// descriptor starts with padding from the header up to it.
pub const MFT_NOTE_ALIGN: usize = align_of::<MftEntry>();
/// Bytes of padding between a note header and the manifest.
pub const MFT_NOTE_PAD: usize =
    NOTE_HEADER_SIZE.next_multiple_of(MFT_NOTE_ALIGN) - NOTE_HEADER_SIZE;
/// Largest manifest note descriptor, padding included
/// (`MFT1_NOTE_MAX_SIZE`).
pub const MFT_NOTE_MAX_DESC: usize =
    MFT_NOTE_PAD + MFT_HEADER_SIZE + MFT_MAX_ENTRIES * MFT_ENTRY_SIZE;
