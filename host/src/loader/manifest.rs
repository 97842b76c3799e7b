//! The application manifest (Solo5 `MFT1` note).
//!
//! A manifest lists the devices an image wants, by name and kind; a
//! device's handle is its index in the manifest. The checks are those of
//! Solo5's `mft_validate` (`tenders/common/mft.c`): version 1, 1 to 64
//! entries, entry 0 `MFT_RESERVED_FIRST` with an empty name, every name
//! field NUL-terminated in its last byte, `attached` clear. Later entries
//! whose type is `MFT_RESERVED_FIRST` or above are unused: solo5-hvt skips
//! them, and so does tt-host, keeping them in place so that the devices after
//! them keep their handles. Device names must also be 1-67 ASCII letters or
//! digits (the only names solo5-hvt can attach) and unique. The host fills
//! in each device's properties (block capacity and size, net MAC and MTU)
//! and copies the manifest into guest memory, where the guest finds it
//! through the boot info.

use crate::abi::{
    self, MftBlockBasic, MftEntry, MftHeader, MftNetBasic, MftProps, MFT_ENTRY_SIZE,
    MFT_HEADER_SIZE, MFT_NAME_SIZE,
};
use crate::modules::kind::kind_of_type;
use std::mem::size_of;
use vm_memory::ByteValued;

/// One declared device: an entry whose type is a device kind tt-host
/// knows ([`crate::modules::kind::kinds`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestEntry {
    pub name: String,
    /// Its `mft_type` (`MFT_DEV_BLOCK_BASIC`, ...).
    pub ty: u32,
    /// Its index in the manifest (at least 1: entry 0 is reserved).
    pub handle: u64,
}

/// An unused entry after entry 0: its type is `MFT_RESERVED_FIRST` or
/// above. No device is attached to it; the guest sees it as it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnusedEntry {
    /// Its index in the manifest.
    pub handle: u64,
    pub ty: u32,
    /// The name's bytes up to its NUL (any bytes: nothing looks it up).
    pub name: Vec<u8>,
}

/// A validated manifest: its devices and unused entries, each with its
/// index; together with entry 0 they are entries `0..count()`, each index
/// once.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Manifest {
    /// The devices, in manifest order.
    pub entries: Vec<ManifestEntry>,
    /// The unused entries, in manifest order.
    pub unused: Vec<UnusedEntry>,
}

/// What the host fills in for one device before the guest starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceInfo {
    Block {
        capacity: u64,
        block_size: u16,
    },
    Net {
        mac: [u8; 6],
        mtu: u16,
    },
    /// A virtio device: where its registers are.
    Virtio {
        mmio_base: u64,
        mmio_size: u32,
        queue_max: u16,
    },
    /// A kind whose entries carry no properties.
    Plain,
}

impl Manifest {
    /// Parse the manifest from the note descriptor (padding removed).
    pub fn parse(desc: &[u8]) -> Result<Manifest, String> {
        if desc.len() < MFT_HEADER_SIZE {
            return Err(format!(
                "note is {} bytes, too short for a manifest",
                desc.len()
            ));
        }
        let header: MftHeader = copy_out(desc);
        let count = header.entries as usize;
        if header.version != abi::MFT_VERSION {
            return Err(format!(
                "manifest version {}, expected {}",
                header.version,
                abi::MFT_VERSION
            ));
        }
        if count == 0 || count > abi::MFT_MAX_ENTRIES {
            return Err(format!(
                "{count} entries, expected 1 to {}",
                abi::MFT_MAX_ENTRIES
            ));
        }
        let want = MFT_HEADER_SIZE + count * MFT_ENTRY_SIZE;
        if desc.len() != want {
            return Err(format!(
                "note is {} bytes but {count} entries need {want}",
                desc.len()
            ));
        }
        let mut m = Manifest::default();
        for (i, e) in entries(desc).enumerate() {
            // Solo5 requires the name field's last byte to be NUL, whatever
            // comes before it.
            if e.name[MFT_NAME_SIZE - 1] != 0 {
                return Err(format!("entry {i}: name is not NUL-terminated"));
            }
            let raw_name = e.name_bytes();
            if e.attached != 0 {
                return Err(format!(
                    "entry {i}: 'attached' is set; it is the host's to set"
                ));
            }
            if i == 0 {
                if e.ty != abi::MFT_RESERVED_FIRST {
                    return Err("entry 0 is not the reserved first entry".into());
                }
                if !raw_name.is_empty() {
                    return Err("entry 0 (the reserved first entry) has a name".into());
                }
                continue;
            }
            let handle = i as u64;
            match e.ty {
                ty if kind_of_type(ty).is_some() => {}
                ty if ty >= abi::MFT_RESERVED_FIRST => {
                    m.unused.push(UnusedEntry {
                        handle,
                        ty,
                        name: raw_name.to_vec(),
                    });
                    continue;
                }
                ty => return Err(format!("entry {i}: unknown device type {ty}")),
            }
            let name = std::str::from_utf8(raw_name)
                .ok()
                .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_alphanumeric()))
                .ok_or_else(|| {
                    format!("entry {i}: name must be 1 to 67 ASCII letters or digits")
                })?;
            if m.entries.iter().any(|e| e.name == name) {
                return Err(format!("device name '{name}' appears twice"));
            }
            m.entries.push(ManifestEntry {
                name: name.to_string(),
                ty: e.ty,
                handle,
            });
        }
        Ok(m)
    }

    /// Parse the manifest as the guest sees it ([`Manifest::to_guest_bytes`]):
    /// as [`Manifest::parse`], except that every device must be marked
    /// attached (and no other entry). For tests and the fuzzer.
    pub fn parse_guest_view(bytes: &[u8]) -> Result<Manifest, String> {
        let mut b = bytes.get(..MFT_HEADER_SIZE).unwrap_or(bytes).to_vec();
        for (i, mut e) in entries(bytes).enumerate() {
            let device = kind_of_type(e.ty).is_some();
            if e.attached != device as u8 {
                return Err(format!(
                    "entry {i}: attached is {}, expected {}",
                    e.attached, device as u8
                ));
            }
            e.attached = 0;
            b.extend_from_slice(e.as_slice());
        }
        // A partial entry at the end: kept, for parse to refuse.
        let whole = bytes.len().saturating_sub(MFT_HEADER_SIZE) / MFT_ENTRY_SIZE;
        b.extend_from_slice(
            bytes
                .get(MFT_HEADER_SIZE + whole * MFT_ENTRY_SIZE..)
                .unwrap_or(&[]),
        );
        Manifest::parse(&b)
    }

    /// Number of entries, entry 0 and unused ones included.
    pub fn count(&self) -> usize {
        1 + self.entries.len() + self.unused.len()
    }

    /// Handle (manifest index) of the device called `name`.
    pub fn handle_of(&self, name: &str) -> Option<u64> {
        self.entries
            .iter()
            .find(|e| e.name == name)
            .map(|e| e.handle)
    }

    /// The manifest as the guest sees it, with `info(handle, entry)`
    /// filled in for each attached device. Unused entries keep their type
    /// and name and stay unattached.
    pub fn to_guest_bytes(&self, info: impl Fn(u64, &ManifestEntry) -> DeviceInfo) -> Vec<u8> {
        let count = self.count();
        let mut entries = vec![MftEntry::ZERO; count];
        entries[0] = MftEntry::reserved_first();
        for u in &self.unused {
            if let Some(e) = entries.get_mut(u.handle as usize) {
                *e = MftEntry::new(name_field(&u.name), u.ty);
            }
        }
        for dev in &self.entries {
            let Some(e) = entries.get_mut(dev.handle as usize) else {
                continue;
            };
            let props = match info(dev.handle, dev) {
                DeviceInfo::Block {
                    capacity,
                    block_size,
                } => MftProps::from_block_basic(MftBlockBasic {
                    capacity,
                    block_size,
                    _pad: [0; 6],
                }),
                DeviceInfo::Net { mac, mtu } => MftProps::from_net_basic(MftNetBasic { mac, mtu }),
                DeviceInfo::Virtio {
                    mmio_base,
                    mmio_size,
                    queue_max,
                } => MftProps::from_virtio(crate::abi::MftVirtio {
                    mmio_base,
                    mmio_size,
                    queue_max,
                    _pad: 0,
                }),
                DeviceInfo::Plain => MftProps::ZERO,
            };
            *e = MftEntry {
                props,
                attached: 1,
                ..MftEntry::new(name_field(dev.name.as_bytes()), dev.ty)
            };
        }
        let header = MftHeader {
            version: abi::MFT_VERSION,
            entries: count as u32,
        };
        let mut out = Vec::with_capacity(MFT_HEADER_SIZE + count * MFT_ENTRY_SIZE);
        out.extend_from_slice(header.as_slice());
        for e in &entries {
            out.extend_from_slice(e.as_slice());
        }
        out
    }
}

/// A `T` from the first bytes of `bytes`, which need not be aligned (a
/// note descriptor is 4-byte aligned at best). Bytes past the end of a
/// short slice read as 0.
fn copy_out<T: ByteValued>(bytes: &[u8]) -> T {
    let mut v = T::zeroed();
    let n = size_of::<T>().min(bytes.len());
    v.as_mut_slice()[..n].copy_from_slice(&bytes[..n]);
    v
}

/// The whole entries after the header of the manifest `m`, in order.
fn entries(m: &[u8]) -> impl Iterator<Item = MftEntry> + '_ {
    m.get(MFT_HEADER_SIZE..)
        .unwrap_or(&[])
        .chunks_exact(MFT_ENTRY_SIZE)
        .map(copy_out::<MftEntry>)
}

/// An entry's name field holding `name` (cut to 67 bytes, NUL-padded).
fn name_field(name: &[u8]) -> [u8; MFT_NAME_SIZE] {
    let mut f = [0u8; MFT_NAME_SIZE];
    let n = name.len().min(abi::MFT_NAME_MAX);
    f[..n].copy_from_slice(&name[..n]);
    f
}
