//! Snapshots: the state of a paused guest, written to a directory and read
//! back by `tt-host restore` (docs/SNAPSHOT.md).
//!
//! A snapshot directory holds two files:
//! - `state`: a [`Snapshot`] in the versioned container of [`encode`]:
//!   the 8-byte magic `TTSNAP\r\n`, the format version (u32 LE), the body's
//!   length (u64 LE), the body (postcard), and a CRC-32 (u32 LE) of
//!   everything before it. A reader checks the magic, then the version (an
//!   unknown one is refused by number, before the body is looked at), then
//!   the length and the CRC, and only then decodes the body. Nothing in the
//!   file is trusted: every size is bounded before anything is allocated.
//! - `memory`: guest RAM, byte for byte from guest physical address 0
//!   ([`Snapshot::mem_size`] bytes; pages of zeros are holes).
//!
//! The body says everything that is not RAM: how the guest was launched
//! (its image file, memory size, device options), the vCPU's registers and
//! MSRs, the CPL 3 monitor's view of the CPU, and each device's identity
//! (a block device's image), so that a restore can refuse a disk that
//! changed since.

use serde::{Deserialize, Serialize};

/// The first bytes of a state file.
pub const MAGIC: [u8; 8] = *b"TTSNAP\r\n";
/// The format this tt-host writes, and the only one it reads.
pub const VERSION: u32 = 1;
/// The name of the state file in a snapshot directory.
pub const STATE_FILE: &str = "state";
/// The name of the memory file in a snapshot directory.
pub const MEMORY_FILE: &str = "memory";
/// The largest body a reader accepts: an image is at most
/// [`crate::loader::MAX_SPAN`], and the rest is a few KiB.
pub const MAX_BODY: u64 = crate::loader::MAX_SPAN + (1 << 20);

const HEADER: usize = 8 + 4 + 8;

/// Why a state file cannot be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("not a tt-host snapshot (its first bytes are not the magic 'TTSNAP')")]
    Magic,
    #[error(
        "snapshot format version {found} is not one this tt-host reads (it reads version \
         {VERSION}); restore it with the tt-host that wrote it (docs/SNAPSHOT.md)"
    )]
    Version { found: u32 },
    #[error("the state file is truncated: {len} bytes, the header says {want}")]
    Truncated { len: u64, want: u64 },
    #[error("the state file's body is {0} bytes, more than any snapshot has ({MAX_BODY})")]
    TooLarge(u64),
    #[error("the state file has {0} bytes after its end")]
    Trailing(u64),
    #[error(
        "the state file is corrupt: its CRC is {found:#010x}, its contents give {computed:#010x}"
    )]
    Crc { found: u32, computed: u32 },
    #[error("the state file's body cannot be decoded: {0}")]
    Body(String),
}

/// How the guest was launched: what a restore needs to rebuild the same
/// VM (the devices' files come from the restoring command line, or from
/// these options).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Launch {
    /// The image file as it was read (an ELF; at most
    /// [`crate::loader::MAX_SPAN`] bytes).
    #[serde(with = "serde_bytes")]
    pub image: Vec<u8>,
    /// Its path, for messages.
    pub image_path: String,
    pub mem_mb: u64,
    /// Every device option: (option, device, value).
    pub devices: Vec<(String, Option<String>, String)>,
    pub guest_args: Vec<String>,
    /// Did the image run at CPL 3 under the monitor?
    pub cpl3: bool,
    pub solo5_hvt_boot: bool,
    /// The unikernel's name in the policy tree, if it had one.
    pub name: Option<String>,
}

/// The vCPU, as KVM gives it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Vcpu {
    pub regs: kvm_bindings::kvm_regs,
    pub sregs: kvm_bindings::kvm_sregs,
    /// KVM_GET_XSAVE's 4 KiB region (FPU, SSE, AVX state).
    #[serde(with = "serde_bytes")]
    pub xsave: Vec<u8>,
    pub xcrs: kvm_bindings::kvm_xcrs,
    pub events: kvm_bindings::kvm_vcpu_events,
    /// (index, value) of the MSRs that matter (`vmm::state::MSRS`).
    pub msrs: Vec<(u32, u64)>,
    /// The guest's TSC when it was paused.
    pub tsc: u64,
    /// The TSC frequency the guest was told (its boot info).
    pub tsc_khz: u32,
}

/// The CPL 3 monitor's view of the CPU (`vmm::monitor::emulate::Shadow`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shadow {
    pub gdt: (u64, u16),
    pub idt: (u64, u16),
    pub tr: u16,
    pub ldt: u16,
    pub segments: [u16; 6],
    pub interrupts: bool,
    pub cr2: u64,
}

/// One block device's backing image, as it was when the snapshot was
/// taken (every acknowledged write applied to it and synced).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskIdentity {
    /// The device's name in the manifest.
    pub device: String,
    /// The image's path, for messages.
    pub path: String,
    pub len: u64,
    /// Last modification, in nanoseconds since the epoch.
    pub mtime_ns: i128,
    /// A CRC-32 of the first and last MiB (a cheap check that the bytes
    /// are the same, where the modification time survived a copy).
    pub sample_crc: u32,
}

/// A device in the MMIO window (virtio): its address and its state, in
/// the device's own encoding (virtio-blk: its transport's registers and
/// queue position, postcard).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioState {
    pub base: u64,
    #[serde(with = "serde_bytes")]
    pub state: Vec<u8>,
}

/// The whole state of a paused guest but its RAM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub launch: Launch,
    /// Guest RAM in bytes (the memory file's length).
    pub mem_size: u64,
    pub vcpu: Vcpu,
    /// With `launch.cpl3`.
    pub monitor: Option<Shadow>,
    pub disks: Vec<DiskIdentity>,
    /// Devices in the MMIO window.
    pub mmio: Vec<MmioState>,
    /// Each hvt net device's MAC (device name, MAC): the guest read it at
    /// boot and keeps it; a restore or a migration's target gives the
    /// device the same.
    pub nets: Vec<(String, [u8; 6])>,
}

/// How much of each end of an image [`DiskIdentity::sample_crc`] covers.
const SAMPLE: u64 = 1 << 20;

/// The identity of device `device`'s image `f` as it is now (`path` is
/// left empty for the caller, who knows it).
pub fn disk_identity(device: &str, f: &std::fs::File) -> std::io::Result<DiskIdentity> {
    use std::os::unix::fs::{FileExt, MetadataExt};
    let m = f.metadata()?;
    let len = m.len();
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; SAMPLE.min(len) as usize];
    f.read_exact_at(&mut buf, 0)?;
    h.update(&buf);
    if len > SAMPLE {
        let at = len - SAMPLE.min(len - SAMPLE);
        let mut tail = vec![0u8; (len - at) as usize];
        f.read_exact_at(&mut tail, at)?;
        h.update(&tail);
    }
    Ok(DiskIdentity {
        device: device.to_string(),
        path: String::new(),
        len,
        mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        sample_crc: h.finalize(),
    })
}

/// Is `now` the image `then` was? `None`, or what differs.
pub fn disk_changed(then: &DiskIdentity, now: &DiskIdentity) -> Option<String> {
    if then.len != now.len {
        return Some(format!(
            "its size is {} bytes, it was {}",
            now.len, then.len
        ));
    }
    if then.sample_crc != now.sample_crc {
        return Some("its contents differ".into());
    }
    if then.mtime_ns != now.mtime_ns {
        return Some("it was modified since (its modification time differs)".into());
    }
    None
}

/// The state file's bytes for `s`.
pub fn encode(s: &Snapshot) -> Vec<u8> {
    let body = postcard::to_stdvec(s).expect("a snapshot always serializes");
    let mut out = Vec::with_capacity(HEADER + body.len() + 4);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&body);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Read a state file's bytes: see the module doc for the checks.
pub fn decode(bytes: &[u8]) -> Result<Snapshot, FormatError> {
    let len = bytes.len() as u64;
    if bytes.len() < 8 || bytes[..8] != MAGIC {
        return Err(FormatError::Magic);
    }
    if bytes.len() < HEADER {
        return Err(FormatError::Truncated {
            len,
            want: HEADER as u64,
        });
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().unwrap());
    if version != VERSION {
        return Err(FormatError::Version { found: version });
    }
    let body_len = u64::from_le_bytes(bytes[12..20].try_into().unwrap());
    if body_len > MAX_BODY {
        return Err(FormatError::TooLarge(body_len));
    }
    let want = HEADER as u64 + body_len + 4;
    if len < want {
        return Err(FormatError::Truncated { len, want });
    }
    if len > want {
        return Err(FormatError::Trailing(len - want));
    }
    let end = HEADER + body_len as usize;
    let found = u32::from_le_bytes(bytes[end..end + 4].try_into().unwrap());
    let computed = crc32fast::hash(&bytes[..end]);
    if found != computed {
        return Err(FormatError::Crc { found, computed });
    }
    let s: Snapshot =
        postcard::from_bytes(&bytes[HEADER..end]).map_err(|e| FormatError::Body(e.to_string()))?;
    check(&s)?;
    Ok(s)
}

/// What a well-formed body must also satisfy before a restore uses it.
fn check(s: &Snapshot) -> Result<(), FormatError> {
    let bad = |m: String| Err(FormatError::Body(m));
    if s.mem_size != (s.launch.mem_mb << 20) / crate::vmm::layout::HUGE * crate::vmm::layout::HUGE {
        return bad(format!(
            "memory size {} does not match --mem={}",
            s.mem_size, s.launch.mem_mb
        ));
    }
    if s.launch.mem_mb > crate::cli::MAX_MEM_MB || s.mem_size == 0 {
        return bad(format!(
            "memory size {} MiB is out of range",
            s.launch.mem_mb
        ));
    }
    if s.launch.image.len() as u64 > crate::loader::MAX_SPAN {
        return bad("the image is larger than any tt-host loads".into());
    }
    if s.launch.cpl3 != s.monitor.is_some() {
        return bad("the CPL 3 monitor's state and the launch disagree".into());
    }
    if s.vcpu.msrs.len() > 64 {
        return bad(format!("{} MSRs", s.vcpu.msrs.len()));
    }
    if s.mmio.len() > 64 || s.disks.len() > 256 || s.nets.len() > 256 {
        return bad("more devices than a launch has".into());
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests;
