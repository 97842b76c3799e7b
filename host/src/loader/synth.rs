//! Build minimal hvt images in memory, for tests and fuzz seeds.
//!
//! A [`Synth`] image has a text segment (R+X) at 1 MiB holding `code`, a
//! data segment (R+W) on the next page holding `data`, and the two Solo5
//! notes. Every field can be bent to make a malformed image on purpose.

use crate::abi;
use vm_memory::ByteValued;

/// Address of the text segment.
pub const TEXT: u64 = 0x10_0000;
/// Address of the data segment.
pub const DATA: u64 = 0x10_1000;

/// Description of an image to build.
#[derive(Debug, Clone)]
pub struct Synth {
    pub code: Vec<u8>,
    pub data: Vec<u8>,
    /// Name and `mft_type` of each device, in manifest order.
    pub devices: Vec<(String, u32)>,
    pub abi_target: u32,
    pub abi_version: u32,
    pub with_abi_note: bool,
    pub with_manifest: bool,
    /// Flags of the text segment (PF_R|PF_X = 5 by default).
    pub text_flags: u32,
    pub entry: u64,
}

impl Default for Synth {
    fn default() -> Self {
        Synth {
            code: code_halt(0),
            data: Vec::new(),
            devices: Vec::new(),
            abi_target: abi::ABI_TARGET_HVT,
            abi_version: abi::ABI_VERSION,
            with_abi_note: true,
            with_manifest: true,
            text_flags: 5,
            entry: TEXT,
        }
    }
}

/// x86-64 code: HALT hypercall with `status`, using a halt struct the code
/// itself writes at `DATA` (`mov qword [DATA], 0; mov dword [DATA+8],
/// status; mov eax, DATA; mov dx, 0x508; out dx, eax`).
pub fn code_halt(status: i32) -> Vec<u8> {
    let mut c = vec![0x48, 0xc7, 0x04, 0x25];
    c.extend_from_slice(&(DATA as u32).to_le_bytes());
    c.extend_from_slice(&0u32.to_le_bytes());
    c.extend_from_slice(&[0xc7, 0x04, 0x25]);
    c.extend_from_slice(&(DATA as u32 + 8).to_le_bytes());
    c.extend_from_slice(&status.to_le_bytes());
    c.push(0xb8);
    c.extend_from_slice(&(DATA as u32).to_le_bytes());
    c.extend_from_slice(&[0x66, 0xba, 0x08, 0x05, 0xef]);
    c
}

/// `mov byte [addr], 0x90` (a write to an absolute 32-bit address).
pub fn code_write_byte(addr: u32) -> Vec<u8> {
    let mut c = vec![0xc6, 0x04, 0x25];
    c.extend_from_slice(&addr.to_le_bytes());
    c.push(0x90);
    c
}

/// `mov eax, addr; jmp rax` (execute at an absolute address).
pub fn code_jump(addr: u32) -> Vec<u8> {
    let mut c = vec![0xb8];
    c.extend_from_slice(&addr.to_le_bytes());
    c.extend_from_slice(&[0xff, 0xe0]);
    c
}

/// A Solo5-owned ELF note of `ntype` with descriptor `desc`, padded to 4
/// bytes (concatenate notes to put several in one `PT_NOTE` segment).
pub fn note(ntype: u32, desc: &[u8]) -> Vec<u8> {
    note_owned(abi::NOTE_NAME, ntype, desc)
}

/// An ELF note with owner `name` (its NUL included), padded to 4 bytes.
pub fn note_owned(name: &[u8], ntype: u32, desc: &[u8]) -> Vec<u8> {
    let mut n = Vec::new();
    n.extend_from_slice(&(name.len() as u32).to_le_bytes());
    n.extend_from_slice(&(desc.len() as u32).to_le_bytes());
    n.extend_from_slice(&ntype.to_le_bytes());
    n.extend_from_slice(name);
    n.resize(n.len().next_multiple_of(4), 0);
    n.extend_from_slice(desc);
    n.resize(n.len().next_multiple_of(4), 0);
    n
}

impl Synth {
    /// The ABI note descriptor.
    pub fn abi_desc(&self) -> Vec<u8> {
        let info = abi::Abi1Info {
            abi_target: self.abi_target,
            abi_version: self.abi_version,
            ..Default::default()
        };
        info.as_slice().to_vec()
    }

    /// The manifest note descriptor (with its 4 bytes of leading padding).
    /// A device name longer than the name field is cut to its 68 bytes.
    pub fn manifest_desc(&self) -> Vec<u8> {
        let count = self.devices.len() + 1;
        let header = abi::MftHeader {
            version: abi::MFT_VERSION,
            entries: count as u32,
        };
        let mut d = vec![0u8; abi::MFT_NOTE_PAD];
        d.extend_from_slice(header.as_slice());
        d.extend_from_slice(abi::MftEntry::reserved_first().as_slice());
        for (name, kind) in &self.devices {
            let mut field = [0u8; abi::MFT_NAME_SIZE];
            let n = name.len().min(field.len());
            field[..n].copy_from_slice(&name.as_bytes()[..n]);
            let ty = *kind;
            d.extend_from_slice(abi::MftEntry::new(field, ty).as_slice());
        }
        d
    }

    /// The ELF file.
    pub fn build(&self) -> Vec<u8> {
        self.build_with(self.abi_desc(), self.manifest_desc())
    }

    /// The ELF file with these note descriptors, taken as they are.
    pub fn build_with(&self, abi_desc: Vec<u8>, mft_desc: Vec<u8>) -> Vec<u8> {
        let mut notes: Vec<Vec<u8>> = Vec::new();
        if self.with_abi_note {
            notes.push(note(abi::NOTE_TYPE_ABI1, &abi_desc));
        }
        if self.with_manifest {
            notes.push(note(abi::NOTE_TYPE_MFT1, &mft_desc));
        }
        self.build_notes(&notes)
    }

    /// The ELF file with one `PT_NOTE` segment per element of `notes`, each
    /// holding those bytes (one note or several, see [`note`]); the
    /// `with_*` fields and note descriptors of `self` are not used.
    pub fn build_notes(&self, notes: &[Vec<u8>]) -> Vec<u8> {
        let phnum = 2 + notes.len();
        // Layout: ehdr, phdrs, then text at 0x1000, data at 0x2000, notes after.
        let text_off = 0x1000u64;
        let data_off = 0x2000u64;
        let mut f = vec![0u8; data_off as usize + self.data.len()];
        f[text_off as usize..text_off as usize + self.code.len()].copy_from_slice(&self.code);
        f[data_off as usize..].copy_from_slice(&self.data);
        let mut note_pos = Vec::new();
        for n in notes {
            while f.len() % 8 != 0 {
                f.push(0);
            }
            note_pos.push((f.len() as u64, n.len() as u64));
            f.extend_from_slice(n);
        }
        // ELF header.
        f[0..4].copy_from_slice(b"\x7fELF");
        f[4] = 2; // 64-bit
        f[5] = 1; // little-endian
        f[6] = 1; // version
        f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        f[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
        f[20..24].copy_from_slice(&1u32.to_le_bytes());
        f[24..32].copy_from_slice(&self.entry.to_le_bytes());
        f[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        f[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
        f[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        f[56..58].copy_from_slice(&(phnum as u16).to_le_bytes());
        let mut ph = |i: usize,
                      ty: u32,
                      flags: u32,
                      off: u64,
                      vaddr: u64,
                      filesz: u64,
                      memsz: u64,
                      align: u64| {
            let o = 64 + i * 56;
            f[o..o + 4].copy_from_slice(&ty.to_le_bytes());
            f[o + 4..o + 8].copy_from_slice(&flags.to_le_bytes());
            f[o + 8..o + 16].copy_from_slice(&off.to_le_bytes());
            f[o + 16..o + 24].copy_from_slice(&vaddr.to_le_bytes());
            f[o + 24..o + 32].copy_from_slice(&vaddr.to_le_bytes());
            f[o + 32..o + 40].copy_from_slice(&filesz.to_le_bytes());
            f[o + 40..o + 48].copy_from_slice(&memsz.to_le_bytes());
            f[o + 48..o + 56].copy_from_slice(&align.to_le_bytes());
        };
        let code_len = self.code.len().max(1) as u64;
        ph(
            0,
            1,
            self.text_flags,
            text_off,
            TEXT,
            code_len,
            code_len,
            0x1000,
        );
        let data_len = self.data.len() as u64;
        ph(
            1,
            1,
            6,
            data_off,
            DATA,
            data_len,
            data_len.max(0x100),
            0x1000,
        );
        for (i, (off, len)) in note_pos.iter().enumerate() {
            ph(2 + i, 4, 4, *off, 0, *len, 0, 8);
        }
        f
    }
}
