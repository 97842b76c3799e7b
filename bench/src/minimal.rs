//! The smallest valid hvt image: four instructions that make the HALT
//! hypercall with status 0, written to a temporary file.
//!
//! `tt-bench launch` boots it with tt-host beside hello, which splits
//! tt-host's launch cost into the host's own work (this image: almost no
//! guest code) and the guest's boot (hello minus this image).
//!
//! Layout: R+X text at 1 MiB, R+W data page after it (the halt struct),
//! then the Solo5 ABI note (hvt, version 2) and a manifest with only the
//! reserved first entry. Constants are Solo5's (`elf_abi.h`, `mft_abi.h`).

use std::path::{Path, PathBuf};

const TEXT: u64 = 0x10_0000;
const DATA: u64 = 0x10_1000;
const NOTE_TYPE_ABI1: u32 = 0x3149_4241;
const NOTE_TYPE_MFT1: u32 = 0x3154_464d;
const ABI_TARGET_HVT: u32 = 1;
const ABI_VERSION: u32 = 2;
const MFT_VERSION: u32 = 1;
const MFT_ENTRY_SIZE: usize = 104;
const MFT_RESERVED_FIRST: u32 = 1 << 30;
const HALT_PORT: u16 = 0x508;

/// `mov eax, DATA; mov dx, 0x508; out dx, eax` (the halt struct at DATA is
/// zero: status 0, no cookie).
fn code() -> Vec<u8> {
    let mut c = vec![0xb8];
    c.extend_from_slice(&(DATA as u32).to_le_bytes());
    c.extend_from_slice(&[0x66, 0xba]);
    c.extend_from_slice(&HALT_PORT.to_le_bytes());
    c.push(0xef);
    c.push(0xf4); // hlt: never reached
    c
}

fn note(ntype: u32, desc: &[u8]) -> Vec<u8> {
    let mut n = Vec::new();
    for v in [6, desc.len() as u32, ntype] {
        n.extend_from_slice(&v.to_le_bytes());
    }
    n.extend_from_slice(b"Solo5\0\0\0");
    n.extend_from_slice(desc);
    n
}

/// The ELF file.
pub fn image() -> Vec<u8> {
    let mut abi = Vec::new();
    for v in [ABI_TARGET_HVT, ABI_VERSION, 0, 0] {
        abi.extend_from_slice(&v.to_le_bytes());
    }
    // 4 bytes of padding (the manifest is 8-aligned after a 20-byte note
    // header), version, entry count, then the reserved first entry.
    let mut mft = vec![0u8; 4 + 8 + MFT_ENTRY_SIZE];
    mft[4..8].copy_from_slice(&MFT_VERSION.to_le_bytes());
    mft[8..12].copy_from_slice(&1u32.to_le_bytes());
    mft[12 + 68..12 + 72].copy_from_slice(&MFT_RESERVED_FIRST.to_le_bytes());
    let notes = [note(NOTE_TYPE_ABI1, &abi), note(NOTE_TYPE_MFT1, &mft)];

    let code = code();
    let (text_off, data_off) = (0x1000usize, 0x2000usize);
    let mut f = vec![0u8; data_off];
    f[text_off..text_off + code.len()].copy_from_slice(&code);
    let mut note_pos = Vec::new();
    for n in &notes {
        f.resize(f.len().next_multiple_of(8), 0);
        note_pos.push((f.len() as u64, n.len() as u64));
        f.extend_from_slice(n);
    }

    f[0..4].copy_from_slice(b"\x7fELF");
    f[4..7].copy_from_slice(&[2, 1, 1]); // 64-bit, little-endian, version 1
    f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
    f[20..24].copy_from_slice(&1u32.to_le_bytes());
    f[24..32].copy_from_slice(&TEXT.to_le_bytes()); // e_entry
    f[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
    f[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
    f[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
    f[56..58].copy_from_slice(&4u16.to_le_bytes()); // e_phnum
                                                    // (type, flags, offset, vaddr, filesz, memsz, align)
    let code_len = code.len() as u64;
    let phdrs = [
        (
            1u32,
            5u32,
            text_off as u64,
            TEXT,
            code_len,
            code_len,
            0x1000u64,
        ),
        (1, 6, data_off as u64, DATA, 0, 0x100, 0x1000),
        (4, 4, note_pos[0].0, 0, note_pos[0].1, 0, 8),
        (4, 4, note_pos[1].0, 0, note_pos[1].1, 0, 8),
    ];
    for (i, (ty, flags, off, vaddr, filesz, memsz, align)) in phdrs.into_iter().enumerate() {
        let o = 64 + i * 56;
        f[o..o + 4].copy_from_slice(&ty.to_le_bytes());
        f[o + 4..o + 8].copy_from_slice(&flags.to_le_bytes());
        for (j, v) in [off, vaddr, vaddr, filesz, memsz, align].iter().enumerate() {
            f[o + 8 + j * 8..o + 16 + j * 8].copy_from_slice(&v.to_le_bytes());
        }
    }
    f
}

/// The image in a temporary file, deleted on drop.
pub struct TempImage(PathBuf);

impl TempImage {
    pub fn new() -> Result<TempImage, String> {
        let p = std::env::temp_dir().join(format!("tt-bench-minimal-{}.elf", std::process::id()));
        std::fs::write(&p, image()).map_err(|e| format!("cannot write {}: {e}", p.display()))?;
        Ok(TempImage(p))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_is_an_x86_64_executable_entering_its_text() {
        let f = image();
        assert_eq!(&f[0..4], b"\x7fELF");
        assert_eq!(u16::from_le_bytes([f[18], f[19]]), 62);
        assert_eq!(u64::from_le_bytes(f[24..32].try_into().unwrap()), TEXT);
        assert_eq!(&f[0x1000..0x1000 + code().len()], &code()[..]);
    }
}
