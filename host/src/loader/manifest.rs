//! The application manifest (Solo5 `MFT1` note).
//!
//! A manifest lists the devices an image wants, by name and kind. Entry 0 is
//! reserved; names are NUL-terminated, at most 67 bytes, and unique. The host
//! fills in each device's properties (block capacity and size, net MAC and
//! MTU) and copies the manifest into guest memory, where the guest finds it
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
}

/// A validated manifest. `entries[i]` has handle `i + 1` (handle 0 is the
/// reserved entry).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Manifest {
    pub entries: Vec<ManifestEntry>,
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
        let mut entries: Vec<ManifestEntry> = Vec::with_capacity(count - 1);
        for i in 0..count {
            let e = &desc[abi::MFT_HEADER_SIZE + i * abi::MFT_ENTRY_SIZE..][..abi::MFT_ENTRY_SIZE];
            let ty = u32::from_le_bytes(e[off::TYPE..off::TYPE + 4].try_into().unwrap());
            let raw_name = &e[..abi::MFT_NAME_SIZE];
            let len = raw_name
                .iter()
                .position(|&b| b == 0)
                .ok_or_else(|| format!("entry {i}: name is not NUL-terminated"))?;
            if i == 0 {
                if ty != abi::MFT_RESERVED_FIRST {
                    return Err("entry 0 is not the reserved first entry".into());
                }
                continue;
            }
            let kind = match ty {
                abi::MFT_DEV_BLOCK_BASIC => DeviceKind::Block,
                abi::MFT_DEV_NET_BASIC => DeviceKind::Net,
                _ => return Err(format!("entry {i}: unknown device type {ty}")),
            };
            let name = std::str::from_utf8(&raw_name[..len])
                .ok()
                .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_alphanumeric()))
                .ok_or_else(|| {
                    format!("entry {i}: name must be 1 to 67 ASCII letters or digits")
                })?;
            if entries.iter().any(|e| e.name == name) {
                return Err(format!("device name '{name}' appears twice"));
            }
            entries.push(ManifestEntry {
                name: name.to_string(),
                kind,
            });
        }
        Ok(Manifest { entries })
    }

    /// Handle (manifest index) of the device called `name`.
    pub fn handle_of(&self, name: &str) -> Option<u64> {
        self.entries
            .iter()
            .position(|e| e.name == name)
            .map(|i| i as u64 + 1)
    }

    /// The manifest as the guest sees it, with `info(handle, entry)`
    /// filled in for each attached device.
    pub fn to_guest_bytes(&self, info: impl Fn(u64, &ManifestEntry) -> DeviceInfo) -> Vec<u8> {
        let count = self.entries.len() + 1;
        let mut out = vec![0u8; abi::MFT_HEADER_SIZE + count * abi::MFT_ENTRY_SIZE];
        out[0..4].copy_from_slice(&abi::MFT_VERSION.to_le_bytes());
        out[4..8].copy_from_slice(&(count as u32).to_le_bytes());
        let entry = |i: usize| {
            let start = abi::MFT_HEADER_SIZE + i * abi::MFT_ENTRY_SIZE;
            start..start + abi::MFT_ENTRY_SIZE
        };
        out[entry(0)][off::TYPE..][..4].copy_from_slice(&abi::MFT_RESERVED_FIRST.to_le_bytes());
        for (i, dev) in self.entries.iter().enumerate() {
            let e = &mut out[entry(i + 1)];
            e[..dev.name.len()].copy_from_slice(dev.name.as_bytes());
            match info(i as u64 + 1, dev) {
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
