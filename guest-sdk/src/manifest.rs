//! The Solo5 application manifest.
//!
//! A guest declares the devices it uses in an ELF note
//! (`.note.solo5.manifest`, name "Solo5", type "MFT1"); [`crate::main!`]
//! builds it at compile time with [`MftNote::new`]. At launch the tender
//! copies the `struct mft` part into guest memory, fills in each device's
//! properties (capacity, MAC, ...) and the `attached` flag, and passes its
//! address in the boot info. Device handles are entry indices.
//! [`find`] looks entries up in that host-filled copy.

use core::mem::size_of;
use core::ops::{Deref, DerefMut};
use tt_hvt_abi as abi;

pub use tt_hvt_abi::{
    MftBlockBasic, MftNetBasic, MftProps, MftVirtio, MFT_DEV_BLOCK_BASIC, MFT_DEV_NET_BASIC,
    MFT_MAX_ENTRIES, MFT_NAME_SIZE, MFT_RESERVED_FIRST, MFT_TT_VIRTIO_BLK, MFT_VERSION,
    NOTE_TYPE_ABI1, NOTE_TYPE_MFT1, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE,
};

/// A manifest entry: Solo5's `struct mft_entry` ([`tt_hvt_abi::MftEntry`],
/// 104 bytes, reachable through `Deref`) with constructors that check
/// device names at compile time and typed accessors for the host-filled
/// properties.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MftEntry(pub abi::MftEntry);

const _: () = assert!(size_of::<MftEntry>() == abi::MFT_ENTRY_SIZE);

impl Deref for MftEntry {
    type Target = abi::MftEntry;
    fn deref(&self) -> &abi::MftEntry {
        &self.0
    }
}

impl DerefMut for MftEntry {
    fn deref_mut(&mut self) -> &mut abi::MftEntry {
        &mut self.0
    }
}

impl MftEntry {
    const fn named(name: &str, kind: u32) -> MftEntry {
        let b = name.as_bytes();
        assert!(!b.is_empty(), "manifest: device name must not be empty");
        assert!(
            b.len() < MFT_NAME_SIZE,
            "manifest: device name longer than 67 bytes"
        );
        let mut out = [0u8; MFT_NAME_SIZE];
        let mut i = 0;
        while i < b.len() {
            // As tt-host and Solo5's elftool require: letters and digits.
            assert!(
                b[i].is_ascii_alphanumeric(),
                "manifest: device names are ASCII letters and digits only"
            );
            out[i] = b[i];
            i += 1;
        }
        MftEntry(abi::MftEntry::new(out, kind))
    }

    /// The mandatory entry 0.
    pub const fn reserved_first() -> MftEntry {
        MftEntry(abi::MftEntry::reserved_first())
    }

    /// A block device entry (`BLOCK_BASIC`). Panics at compile time unless
    /// the name is 1 to 67 ASCII letters and digits.
    pub const fn block(name: &str) -> MftEntry {
        MftEntry::named(name, MFT_DEV_BLOCK_BASIC)
    }

    /// A network device entry (`NET_BASIC`). Same name rules as
    /// [`MftEntry::block`].
    pub const fn net(name: &str) -> MftEntry {
        MftEntry::named(name, MFT_DEV_NET_BASIC)
    }

    /// A virtio-blk device entry (tt-host's `MFT_TT_VIRTIO_BLK`; see
    /// [`crate::virtio_blk`]). Same name rules as [`MftEntry::block`].
    /// solo5-hvt refuses to start an image with such an entry.
    pub const fn virtio_blk(name: &str) -> MftEntry {
        MftEntry::named(name, MFT_TT_VIRTIO_BLK)
    }

    /// The name, up to the first NUL (empty if not UTF-8).
    pub fn name(&self) -> &str {
        core::str::from_utf8(self.0.name_bytes()).unwrap_or("")
    }

    /// Block device capacity in bytes (host-filled).
    pub fn block_capacity(&self) -> u64 {
        self.0.props.block_basic().capacity
    }

    /// Block size in bytes (host-filled).
    pub fn block_size(&self) -> u16 {
        self.0.props.block_basic().block_size
    }

    /// MAC address (host-filled).
    pub fn net_mac(&self) -> [u8; 6] {
        self.0.props.net_basic().mac
    }

    /// MTU (host-filled).
    pub fn net_mtu(&self) -> u16 {
        self.0.props.net_basic().mtu
    }

    /// A virtio device's register window (host-filled).
    pub fn virtio(&self) -> MftVirtio {
        self.0.props.virtio()
    }
}

/// The complete manifest note with `N` entries (entry 0 included), laid
/// out exactly as solo5-hvt expects (`struct mft1_note`): 20-byte note
/// header, 4 bytes of padding, then `struct mft`.
#[repr(C, align(8))]
pub struct MftNote<const N: usize> {
    header: abi::NoteHeader,
    _pad: [u8; abi::MFT_NOTE_PAD],
    mft: abi::MftHeader,
    e: [MftEntry; N],
}

impl<const N: usize> MftNote<N> {
    /// Build the note. Panics (at compile time, in a static) if there are
    /// more than 64 entries, entry 0 is not `RESERVED_FIRST`, or two names
    /// are equal.
    pub const fn new(e: [MftEntry; N]) -> Self {
        assert!(N >= 1 && N <= MFT_MAX_ENTRIES, "manifest: 1 to 64 entries");
        assert!(
            e[0].0.ty == MFT_RESERVED_FIRST,
            "manifest: entry 0 must be RESERVED_FIRST"
        );
        let mut i = 1;
        while i < N {
            let mut j = i + 1;
            while j < N {
                let mut k = 0;
                let mut same = true;
                while k < MFT_NAME_SIZE {
                    if e[i].0.name[k] != e[j].0.name[k] {
                        same = false;
                    }
                    k += 1;
                }
                assert!(!same, "manifest: duplicate device name");
                j += 1;
            }
            i += 1;
        }
        let descsz = abi::MFT_NOTE_PAD + abi::MFT_HEADER_SIZE + N * abi::MFT_ENTRY_SIZE;
        MftNote {
            header: abi::NoteHeader::solo5(NOTE_TYPE_MFT1, descsz as u32),
            _pad: [0; abi::MFT_NOTE_PAD],
            mft: abi::MftHeader {
                version: MFT_VERSION,
                entries: N as u32,
            },
            e,
        }
    }
}

const _: () = assert!(size_of::<MftNote<1>>() == 32 + 104);
const _: () =
    assert!(core::mem::offset_of!(MftNote<1>, mft) == abi::NOTE_HEADER_SIZE + abi::MFT_NOTE_PAD);

/// The host-filled manifest entries (empty if the tender passed none or
/// it is malformed).
pub fn entries() -> &'static [MftEntry] {
    let addr = crate::boot::boot_info().mft as usize;
    if addr == 0 || addr % core::mem::align_of::<MftEntry>() != 0 {
        return &[];
    }
    let p = addr as *const abi::MftHeader;
    // SAFETY: the tender passes the address of its `struct mft` copy,
    // which is readable and unchanged for the guest's lifetime; we checked
    // alignment. The entry count is bounded by MFT_MAX_ENTRIES before
    // building the slice, every bit pattern is a valid MftEntry (an ABI
    // struct of integers and byte arrays), and MftEntry is a transparent
    // wrapper of abi::MftEntry.
    unsafe {
        let h = p.read_volatile();
        let n = h.entries as usize;
        if h.version != MFT_VERSION || n > MFT_MAX_ENTRIES {
            return &[];
        }
        core::slice::from_raw_parts(p.add(1) as *const MftEntry, n)
    }
}

/// Why a device could not be acquired.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcquireError {
    /// No manifest entry has this name: declare it in `main!`.
    NotFound,
    /// The entry exists but is a different kind of device.
    WrongType,
    /// The entry exists but the host attached no backend to it (e.g. no
    /// `--block:NAME=...` / `--net:NAME=...` option was given).
    NotAttached,
}

impl core::fmt::Display for AcquireError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            AcquireError::NotFound => "no such device in the manifest",
            AcquireError::WrongType => "device has another type",
            AcquireError::NotAttached => "device not attached by the host",
        })
    }
}

/// Find the entry called `name` of type `kind`; returns its handle
/// (index) and the entry.
pub fn find(name: &str, kind: u32) -> Result<(u64, &'static MftEntry), AcquireError> {
    find_in(entries(), name, kind)
}

/// [`find`] over an explicit entry list.
pub fn find_in<'a>(
    entries: &'a [MftEntry],
    name: &str,
    kind: u32,
) -> Result<(u64, &'a MftEntry), AcquireError> {
    let (i, e) = entries
        .iter()
        .enumerate()
        .skip(1)
        .find(|(_, e)| e.name() == name)
        .ok_or(AcquireError::NotFound)?;
    if e.ty != kind {
        return Err(AcquireError::WrongType);
    }
    if e.attached == 0 {
        return Err(AcquireError::NotAttached);
    }
    Ok((i as u64, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn note_layout_matches_solo5() {
        let n = MftNote::new([
            MftEntry::reserved_first(),
            MftEntry::block("storage"),
            MftEntry::net("service0"),
        ]);
        assert_eq!(size_of::<MftNote<3>>(), 32 + 3 * 104);
        // SAFETY: MftNote is repr(C) and made of ABI structs without
        // implicit padding, its explicit padding initialised: every byte
        // is initialised.
        let bytes = unsafe {
            core::slice::from_raw_parts(&n as *const _ as *const u8, size_of::<MftNote<3>>())
        };
        assert_eq!(&bytes[0..4], &6u32.to_le_bytes());
        assert_eq!(&bytes[4..8], &(4 + 8 + 3 * 104u32).to_le_bytes());
        assert_eq!(&bytes[8..12], b"MFT1");
        assert_eq!(&bytes[12..20], b"Solo5\0\0\0");
        assert_eq!(&bytes[24..28], &1u32.to_le_bytes());
        assert_eq!(&bytes[28..32], &3u32.to_le_bytes());
        assert_eq!(&bytes[32 + 68..32 + 72], &MFT_RESERVED_FIRST.to_le_bytes());
        assert_eq!(&bytes[32 + 104..32 + 104 + 8], b"storage\0");
        assert_eq!(&bytes[32 + 104 + 68..32 + 104 + 72], &1u32.to_le_bytes());
        assert_eq!(&bytes[32 + 208 + 68..32 + 208 + 72], &2u32.to_le_bytes());
    }

    #[test]
    #[should_panic(expected = "ASCII letters and digits")]
    fn a_device_name_with_a_hyphen_is_refused_as_tt_host_and_solo5_refuse_it() {
        let _ = MftEntry::block("my-disk");
    }

    #[test]
    fn find_checks_name_type_and_attachment() {
        let mut e = [
            MftEntry::reserved_first(),
            MftEntry::block("storage"),
            MftEntry::net("service0"),
        ];
        assert_eq!(
            find_in(&e, "storage", MFT_DEV_BLOCK_BASIC).err(),
            Some(AcquireError::NotAttached)
        );
        e[1].attached = 1;
        e[1].props = MftProps::from_block_basic(MftBlockBasic {
            capacity: 1 << 20,
            block_size: 512,
            _pad: [0; 6],
        });
        let (h, b) = find_in(&e, "storage", MFT_DEV_BLOCK_BASIC).unwrap();
        assert_eq!((h, b.block_capacity(), b.block_size()), (1, 1 << 20, 512));
        assert_eq!(
            find_in(&e, "service0", MFT_DEV_BLOCK_BASIC).err(),
            Some(AcquireError::WrongType)
        );
        assert_eq!(
            find_in(&e, "", MFT_RESERVED_FIRST).err(),
            Some(AcquireError::NotFound)
        );
        let mut raw = [0; 16];
        raw[..8].copy_from_slice(&[2, 0, 0, 0, 0, 1, 0xdc, 0x05]);
        e[2].props = MftProps::from_bytes(raw);
        assert_eq!(e[2].net_mac(), [2, 0, 0, 0, 0, 1]);
        assert_eq!(e[2].net_mtu(), 1500);
    }

    #[test]
    fn a_virtio_blk_entry_has_tt_hosts_type_and_is_found_only_once_attached() {
        let n = MftNote::new([MftEntry::reserved_first(), MftEntry::virtio_blk("disk")]);
        assert_eq!(n.e[1].ty, MFT_TT_VIRTIO_BLK);
        assert_eq!(n.e[1].name(), "disk");
        let mut e = [MftEntry::reserved_first(), MftEntry::virtio_blk("disk")];
        assert_eq!(
            find_in(&e, "disk", MFT_TT_VIRTIO_BLK).err(),
            Some(AcquireError::NotAttached)
        );
        assert_eq!(
            find_in(&e, "disk", MFT_DEV_BLOCK_BASIC).err(),
            Some(AcquireError::WrongType)
        );
        e[1].attached = 1;
        e[1].props = MftProps::from_virtio(MftVirtio {
            mmio_base: VIRTIO_MMIO_BASE,
            mmio_size: VIRTIO_MMIO_SIZE as u32,
            queue_max: 256,
            _pad: 0,
        });
        let (h, d) = find_in(&e, "disk", MFT_TT_VIRTIO_BLK).unwrap();
        assert_eq!(h, 1);
        assert_eq!({ d.virtio().mmio_base }, 1 << 32);
        assert_eq!({ d.virtio().queue_max }, 256);
    }
}
