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

use crate::abi::{self, mft_entry as off};

/// Kinds of device a manifest can declare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    Block,
    Net,
}

impl DeviceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceKind::Block => "block",
            DeviceKind::Net => "net",
        }
    }
}

/// One declared device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestEntry {
    pub name: String,
    pub kind: DeviceKind,
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
    Block { capacity: u64, block_size: u16 },
    Net { mac: [u8; 6], mtu: u16 },
}

impl Manifest {
    /// Parse the manifest from the note descriptor (padding removed).
    pub fn parse(desc: &[u8]) -> Result<Manifest, String> {
        if desc.len() < abi::MFT_HEADER_SIZE {
            return Err(format!(
                "note is {} bytes, too short for a manifest",
                desc.len()
            ));
        }
        let version = u32::from_le_bytes(desc[0..4].try_into().unwrap());
        let count = u32::from_le_bytes(desc[4..8].try_into().unwrap()) as usize;
        if version != abi::MFT_VERSION {
            return Err(format!(
                "manifest version {version}, expected {}",
                abi::MFT_VERSION
            ));
        }
        if count == 0 || count > abi::MFT_MAX_ENTRIES {
            return Err(format!(
                "{count} entries, expected 1 to {}",
                abi::MFT_MAX_ENTRIES
            ));
        }
        let want = abi::MFT_HEADER_SIZE + count * abi::MFT_ENTRY_SIZE;
        if desc.len() != want {
            return Err(format!(
                "note is {} bytes but {count} entries need {want}",
                desc.len()
            ));
        }
        let mut m = Manifest::default();
        for i in 0..count {
            let e = &desc[abi::MFT_HEADER_SIZE + i * abi::MFT_ENTRY_SIZE..][..abi::MFT_ENTRY_SIZE];
            let ty = u32::from_le_bytes(e[off::TYPE..off::TYPE + 4].try_into().unwrap());
            let raw_name = &e[..abi::MFT_NAME_SIZE];
            // Solo5 requires the name field's last byte to be NUL, whatever
            // comes before it.
            if raw_name[abi::MFT_NAME_SIZE - 1] != 0 {
                return Err(format!("entry {i}: name is not NUL-terminated"));
            }
            let len = raw_name.iter().position(|&b| b == 0).unwrap();
            if e[off::ATTACHED] != 0 {
                return Err(format!(
                    "entry {i}: 'attached' is set; it is the host's to set"
                ));
            }
            if i == 0 {
                if ty != abi::MFT_RESERVED_FIRST {
                    return Err("entry 0 is not the reserved first entry".into());
                }
                if len != 0 {
                    return Err("entry 0 (the reserved first entry) has a name".into());
                }
                continue;
            }
            let handle = i as u64;
            let kind = match ty {
                abi::MFT_DEV_BLOCK_BASIC => DeviceKind::Block,
                abi::MFT_DEV_NET_BASIC => DeviceKind::Net,
                ty if ty >= abi::MFT_RESERVED_FIRST => {
                    m.unused.push(UnusedEntry {
                        handle,
                        ty,
                        name: raw_name[..len].to_vec(),
                    });
                    continue;
                }
                _ => return Err(format!("entry {i}: unknown device type {ty}")),
            };
            let name = std::str::from_utf8(&raw_name[..len])
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
                kind,
                handle,
            });
        }
        Ok(m)
    }

    /// Parse the manifest as the guest sees it ([`Manifest::to_guest_bytes`]):
    /// as [`Manifest::parse`], except that every device must be marked
    /// attached (and no other entry). For tests and the fuzzer.
    pub fn parse_guest_view(bytes: &[u8]) -> Result<Manifest, String> {
        let mut b = bytes.to_vec();
        let n = b.len().saturating_sub(abi::MFT_HEADER_SIZE) / abi::MFT_ENTRY_SIZE;
        for i in 0..n {
            let e = &mut b[abi::MFT_HEADER_SIZE + i * abi::MFT_ENTRY_SIZE..][..abi::MFT_ENTRY_SIZE];
            let ty = u32::from_le_bytes(e[off::TYPE..off::TYPE + 4].try_into().unwrap());
            let device = matches!(ty, abi::MFT_DEV_BLOCK_BASIC | abi::MFT_DEV_NET_BASIC);
            if e[off::ATTACHED] != device as u8 {
                return Err(format!(
                    "entry {i}: attached is {}, expected {}",
                    e[off::ATTACHED],
                    device as u8
                ));
            }
            e[off::ATTACHED] = 0;
        }
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
        let mut out = vec![0u8; abi::MFT_HEADER_SIZE + count * abi::MFT_ENTRY_SIZE];
        out[0..4].copy_from_slice(&abi::MFT_VERSION.to_le_bytes());
        out[4..8].copy_from_slice(&(count as u32).to_le_bytes());
        let entry = |i: usize| {
            let start = abi::MFT_HEADER_SIZE + i * abi::MFT_ENTRY_SIZE;
            start..start + abi::MFT_ENTRY_SIZE
        };
        out[entry(0)][off::TYPE..][..4].copy_from_slice(&abi::MFT_RESERVED_FIRST.to_le_bytes());
        for u in &self.unused {
            let e = &mut out[entry(u.handle as usize)];
            e[..u.name.len()].copy_from_slice(&u.name);
            e[off::TYPE..][..4].copy_from_slice(&u.ty.to_le_bytes());
        }
        for dev in &self.entries {
            let e = &mut out[entry(dev.handle as usize)];
            e[..dev.name.len()].copy_from_slice(dev.name.as_bytes());
            match info(dev.handle, dev) {
                DeviceInfo::Block {
                    capacity,
                    block_size,
                } => {
                    e[off::TYPE..][..4].copy_from_slice(&abi::MFT_DEV_BLOCK_BASIC.to_le_bytes());
                    e[off::BLOCK_CAPACITY..][..8].copy_from_slice(&capacity.to_le_bytes());
                    e[off::BLOCK_SIZE..][..2].copy_from_slice(&block_size.to_le_bytes());
                }
                DeviceInfo::Net { mac, mtu } => {
                    e[off::TYPE..][..4].copy_from_slice(&abi::MFT_DEV_NET_BASIC.to_le_bytes());
                    e[off::NET_MAC..][..6].copy_from_slice(&mac);
                    e[off::NET_MTU..][..2].copy_from_slice(&mtu.to_le_bytes());
                }
            }
            e[off::ATTACHED] = 1;
        }
        out
    }
}
