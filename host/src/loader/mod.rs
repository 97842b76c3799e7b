//! Image loader: validates an hvt ELF image and describes how to load it.
//!
//! [`parse_image`] is pure: it takes the image bytes and the guest memory
//! size and returns an [`Image`] (entry point, loadable segments with their
//! protections, the end of the kernel, and the manifest), or a [`LoadError`]
//! naming what is wrong. Nothing here touches KVM, so the fuzzer drives it
//! directly.
//!
//! What is checked, following Solo5's tender (`tenders/common/elf.c`) and
//! the boot issue; docs/ABI.md lists where tt-host is stricter or looser:
//! - ELF64, little-endian, version 1, x86-64, `ET_EXEC`, a 64-byte header,
//!   program headers inside the file;
//! - every `PT_LOAD` with a non-zero `p_memsz` (a `.bss`-only one too) lies
//!   at or above 1 MiB, its pages inside guest memory, with
//!   `p_filesz <= p_memsz`, its file bytes inside the file, no page shared
//!   with another segment, and never both writable and executable;
//! - the entry point is inside an executable segment;
//! - a Solo5 ABI note (`ABI1`) for target hvt, ABI version 2;
//! - a Solo5 manifest note (`MFT1`), see [`manifest`].
//!
//! Notes are looked up as solo5-hvt does (the first note of each `PT_NOTE`
//! segment, in program-header order), then, if that finds none, among the
//! later notes of each segment.

pub mod manifest;
pub mod synth;

use crate::abi;
pub use manifest::{Manifest, ManifestEntry};
use vm_memory::ByteValued;

const PAGE: u64 = 4096;

/// Why an image was refused. Each message names the problem.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LoadError {
    #[error("not an ELF file (bad magic)")]
    NotElf,
    #[error(
        "the file is {size} bytes ({} MiB); tt-host reads image files of at most {} MiB: \
         is this the right file?",
        size >> 20,
        max >> 20
    )]
    FileTooLarge { size: u64, max: u64 },
    #[error(
        "its program headers and segments span {span} bytes of the file; tt-host reads at \
         most {} MiB of an image (guest images are mapped below 232 MiB)",
        max >> 20
    )]
    SpanTooLarge { span: u64, max: u64 },
    #[error("truncated ELF: {0}")]
    Truncated(&'static str),
    #[error("unsupported ELF: {0}")]
    Unsupported(String),
    #[error("invalid ELF: {0}")]
    Invalid(String),
    #[error("segment {index}: {what}")]
    Segment { index: usize, what: String },
    #[error("missing Solo5 ABI note (.note.solo5.abi): not an hvt unikernel image")]
    MissingAbiNote,
    #[error("bad Solo5 ABI note: {0}")]
    BadAbiNote(String),
    #[error("missing Solo5 manifest note (.note.solo5.manifest)")]
    MissingManifest,
    #[error("bad Solo5 manifest: {0}")]
    BadManifest(String),
}

/// Page protections of a loaded segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prot {
    pub read: bool,
    pub write: bool,
    pub exec: bool,
    /// Not accessible from CPL 3 ([`abi::PF_TT_SUPERVISOR`]).
    pub supervisor: bool,
}

/// One `PT_LOAD` segment, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical (= virtual) address of the first byte.
    pub vaddr: u64,
    /// Bytes copied from the file.
    pub filesz: u64,
    /// Bytes in memory (the rest after `filesz` is zeroed).
    pub memsz: u64,
    /// Offset of the segment's bytes in the file.
    pub offset: u64,
    pub prot: Prot,
}

impl Segment {
    /// First page of the segment.
    pub fn page_start(&self) -> u64 {
        self.vaddr & !(PAGE - 1)
    }
    /// End of the segment's last page (exclusive).
    pub fn page_end(&self) -> u64 {
        (self.vaddr + self.memsz).div_ceil(PAGE) * PAGE
    }
}

/// A validated image.
#[derive(Debug, Clone)]
pub struct Image {
    pub entry: u64,
    pub segments: Vec<Segment>,
    /// First page-aligned address after every segment.
    pub kernel_end: u64,
    pub manifest: Manifest,
}

/// A guest-physical range `[start, end)` (page-aligned) that the guest's
/// own code at CPL 3 cannot write, and so no device or hypercall may write
/// for it either. See [`Image::protected_ranges`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Protected {
    pub start: u64,
    pub end: u64,
    /// What it is, for messages (e.g. "the image's code").
    pub what: &'static str,
}

impl Protected {
    /// Does `[addr, addr + len)` overlap it? An empty range overlaps
    /// nothing; a range past 2^64 overlaps everything above `addr`.
    pub fn overlaps(&self, addr: u64, len: u64) -> bool {
        len > 0 && addr < self.end && self.start < addr.saturating_add(len)
    }
}

impl Image {
    /// The bytes of `seg` in `file` (checked at parse time).
    pub fn segment_bytes<'a>(&self, file: &'a [u8], seg: &Segment) -> &'a [u8] {
        &file[seg.offset as usize..(seg.offset + seg.filesz) as usize]
    }

    /// What in guest memory the host must never write on the guest's
    /// behalf (a hypercall's OUT field or buffer, a virtio request's
    /// buffer), because the guest's CPL 3 code could not write it itself:
    /// everything below 1 MiB (tt-host's GDT, page tables and CPL 3
    /// monitor, then the boot info, manifest and command line, which the
    /// guest may only read), and every page of a segment that is not plain
    /// writable data: code (R+X), read-only data (R), and tt-guest's
    /// supervisor-only structures (`PF_TT_SUPERVISOR`). Page-aligned, in
    /// that order.
    pub fn protected_ranges(&self) -> Vec<Protected> {
        let mut out = vec![Protected {
            start: 0,
            end: abi::GUEST_MIN_BASE,
            what: "tt-host's boot structures below 1 MiB (read-only to the guest)",
        }];
        for s in &self.segments {
            let what = if s.prot.exec {
                "the image's code (an executable segment)"
            } else if !s.prot.write {
                "the image's read-only data"
            } else if s.prot.supervisor {
                "the image's supervisor-only segment"
            } else {
                continue;
            };
            out.push(Protected {
                start: s.page_start(),
                end: s.page_end(),
                what,
            });
        }
        out
    }
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const PF_X: u32 = 1;
const PF_W: u32 = 2;
const PF_R: u32 = 4;
const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;
/// Far more than any real image has; bounds the work done on hostile input.
const MAX_PHDRS: usize = 256;

struct Phdr {
    p_type: u32,
    flags: u32,
    offset: u64,
    vaddr: u64,
    filesz: u64,
    memsz: u64,
}

/// The largest image file tt-host reads at all. Far larger than any
/// image that can be loaded (see [`MAX_SPAN`]); anything bigger is the
/// wrong file, and is refused after its first 64 bytes are read.
pub const MAX_FILE_SIZE: u64 = 1 << 30;

/// The most leading bytes of an image file that tt-host reads: its ELF
/// header, program headers and the file bytes of its loadable and note
/// segments must all lie below this. The layout maps images that end
/// below 232 MiB of guest memory (`vmm::layout`), so no loadable image
/// needs more; what lies beyond the last segment (symbols, debug
/// information) is never read.
pub const MAX_SPAN: u64 = 256 << 20;

// Every image the layout can map fits in MAX_SPAN.
const _: () = {
    use crate::vmm::layout;
    assert!((layout::PT_LIMIT - layout::PT_BASE) / layout::PAGE * layout::HUGE <= MAX_SPAN);
};

/// An ELF header that passed [`parse_header`]'s checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub entry: u64,
    /// File offset of the program header table.
    pub phoff: u64,
    /// Number of program headers (1 to 256).
    pub phnum: usize,
}

impl Header {
    /// Size in bytes of the program header table.
    pub fn phdrs_len(&self) -> usize {
        self.phnum * PHDR_SIZE
    }
}

/// Check the ELF header at the start of `head` (the file's first 64 bytes,
/// or the whole file if it is shorter): an ELF64 little-endian x86-64
/// executable with well-formed program header sizes. Looks at nothing past
/// the header, so a caller can refuse a wrong file before reading it.
pub fn parse_header(head: &[u8]) -> Result<Header, LoadError> {
    if head.len() < 4 || &head[..4] != b"\x7fELF" {
        return Err(LoadError::NotElf);
    }
    if head.len() < EHDR_SIZE {
        return Err(LoadError::Truncated("file ends inside the ELF header"));
    }
    if head[4] != 2 {
        return Err(LoadError::Unsupported("not a 64-bit ELF (EI_CLASS)".into()));
    }
    if head[5] != 1 {
        return Err(LoadError::Unsupported("not little-endian (EI_DATA)".into()));
    }
    let e_type = u16_at(head, 16).unwrap();
    let e_machine = u16_at(head, 18).unwrap();
    let e_version = u32_at(head, 20).unwrap();
    let e_entry = u64_at(head, 24).unwrap();
    let e_phoff = u64_at(head, 32).unwrap();
    let e_ehsize = u16_at(head, 52).unwrap() as usize;
    let e_phentsize = u16_at(head, 54).unwrap() as usize;
    let e_phnum = u16_at(head, 56).unwrap() as usize;
    if e_version != 1 {
        return Err(LoadError::Unsupported(format!(
            "ELF version {e_version}, expected 1 (EV_CURRENT)"
        )));
    }
    if e_machine != 62 {
        return Err(LoadError::Unsupported(format!(
            "machine {e_machine} is not x86-64 (62)"
        )));
    }
    if e_type != 2 {
        return Err(LoadError::Unsupported(format!(
            "type {e_type} is not an executable (ET_EXEC); position-independent images are not supported"
        )));
    }
    if e_ehsize != EHDR_SIZE {
        return Err(LoadError::Invalid(format!(
            "ELF header size {e_ehsize}, expected {EHDR_SIZE}"
        )));
    }
    if e_phentsize != PHDR_SIZE {
        return Err(LoadError::Invalid(format!(
            "program header entry size {e_phentsize}, expected {PHDR_SIZE}"
        )));
    }
    if e_phnum == 0 || e_phnum > MAX_PHDRS {
        return Err(LoadError::Invalid(format!(
            "{e_phnum} program headers (expected 1 to {MAX_PHDRS})"
        )));
    }
    Ok(Header {
        entry: e_entry,
        phoff: e_phoff,
        phnum: e_phnum,
    })
}

/// Refuse an image file of `len` bytes larger than [`MAX_FILE_SIZE`].
pub fn check_file_size(len: u64) -> Result<(), LoadError> {
    if len > MAX_FILE_SIZE {
        return Err(LoadError::FileTooLarge {
            size: len,
            max: MAX_FILE_SIZE,
        });
    }
    Ok(())
}

/// How many leading bytes of a file of `file_len` bytes [`parse_image`]
/// needs, given its checked `header` and the `phdrs` table it points to
/// (shorter if the file ends inside it): the header, the table, and the
/// file bytes of every loadable and note segment, or the whole file if it
/// ends before them (then `parse_image` says what is cut off). More than
/// [`MAX_SPAN`] is refused.
pub fn span(header: &Header, phdrs: &[u8], file_len: u64) -> Result<u64, LoadError> {
    let table_end = header
        .phoff
        .saturating_add(header.phdrs_len() as u64)
        .max(EHDR_SIZE as u64);
    let span = phdrs
        .chunks_exact(PHDR_SIZE)
        .map(|ph| {
            let p_type = u32_at(ph, 0).unwrap();
            let used = p_type == PT_NOTE || (p_type == PT_LOAD && u64_at(ph, 40).unwrap() != 0);
            match used {
                true => u64_at(ph, 8)
                    .unwrap()
                    .saturating_add(u64_at(ph, 32).unwrap()),
                false => 0,
            }
        })
        .fold(table_end, u64::max)
        .min(file_len);
    if span > MAX_SPAN {
        return Err(LoadError::SpanTooLarge {
            span,
            max: MAX_SPAN,
        });
    }
    Ok(span)
}

/// Validate `file` as an hvt image for a guest with `mem_size` bytes.
pub fn parse_image(file: &[u8], mem_size: u64) -> Result<Image, LoadError> {
    let Header {
        entry: e_entry,
        phoff: e_phoff,
        phnum: e_phnum,
    } = parse_header(file)?;
    let ph_end = e_phoff
        .checked_add((e_phnum * PHDR_SIZE) as u64)
        .filter(|&end| end <= file.len() as u64)
        .ok_or(LoadError::Truncated(
            "program headers extend past the end of the file",
        ))?;
    let phdrs: Vec<Phdr> = (0..e_phnum)
        .map(|i| {
            let o = e_phoff as usize + i * PHDR_SIZE;
            debug_assert!((o + PHDR_SIZE) as u64 <= ph_end);
            Phdr {
                p_type: u32_at(file, o).unwrap(),
                flags: u32_at(file, o + 4).unwrap(),
                offset: u64_at(file, o + 8).unwrap(),
                vaddr: u64_at(file, o + 16).unwrap(),
                filesz: u64_at(file, o + 32).unwrap(),
                memsz: u64_at(file, o + 40).unwrap(),
            }
        })
        .collect();

    let segments = load_segments(file, &phdrs, mem_size)?;
    let kernel_end = segments.iter().map(Segment::page_end).max().unwrap_or(0);
    if !segments
        .iter()
        .any(|s| s.prot.exec && e_entry >= s.vaddr && e_entry < s.vaddr + s.memsz)
    {
        return Err(LoadError::Invalid(format!(
            "entry point {e_entry:#x} is not inside an executable segment"
        )));
    }

    let abi = find_note(file, &phdrs, abi::NOTE_TYPE_ABI1, abi::ABI1_NOTE_ALIGN)?
        .ok_or(LoadError::MissingAbiNote)?;
    check_abi_note(abi)?;
    let mft = find_note(file, &phdrs, abi::NOTE_TYPE_MFT1, abi::MFT_NOTE_ALIGN)?
        .ok_or(LoadError::MissingManifest)?;
    let manifest = Manifest::parse(mft).map_err(LoadError::BadManifest)?;

    Ok(Image {
        entry: e_entry,
        segments,
        kernel_end,
        manifest,
    })
}

fn load_segments(file: &[u8], phdrs: &[Phdr], mem_size: u64) -> Result<Vec<Segment>, LoadError> {
    let mut segments: Vec<Segment> = Vec::new();
    for (index, ph) in phdrs.iter().enumerate() {
        if ph.p_type != PT_LOAD || ph.memsz == 0 {
            continue;
        }
        let bad = |what: String| LoadError::Segment { index, what };
        if ph.filesz > ph.memsz {
            return Err(bad(format!(
                "file size {:#x} exceeds memory size {:#x}",
                ph.filesz, ph.memsz
            )));
        }
        if ph
            .offset
            .checked_add(ph.filesz)
            .is_none_or(|e| e > file.len() as u64)
        {
            return Err(LoadError::Truncated(
                "a loadable segment extends past the end of the file",
            ));
        }
        if ph.vaddr < abi::GUEST_MIN_BASE {
            return Err(bad(format!(
                "address {:#x} is below the 1 MiB minimum load address",
                ph.vaddr
            )));
        }
        // Its pages, not just its bytes, must be guest memory: they get the
        // segment's protections, and kernel_end is the end of the last one.
        let end = ph
            .vaddr
            .checked_add(ph.memsz)
            .and_then(|e| e.checked_next_multiple_of(PAGE))
            .ok_or_else(|| bad("address overflows".into()))?;
        if end > mem_size {
            return Err(bad(format!(
                "its pages end at {end:#x}, beyond guest memory ({mem_size:#x} bytes); try a larger --mem"
            )));
        }
        let prot = Prot {
            read: ph.flags & PF_R != 0,
            write: ph.flags & PF_W != 0,
            exec: ph.flags & PF_X != 0,
            supervisor: ph.flags & abi::PF_TT_SUPERVISOR != 0,
        };
        if prot.write && prot.exec {
            return Err(bad("is both writable and executable (W^X)".into()));
        }
        let seg = Segment {
            vaddr: ph.vaddr,
            filesz: ph.filesz,
            memsz: ph.memsz,
            offset: ph.offset,
            prot,
        };
        if let Some(other) = segments
            .iter()
            .find(|o| seg.page_start() < o.page_end() && o.page_start() < seg.page_end())
        {
            return Err(bad(format!(
                "pages {:#x}..{:#x} overlap another segment's pages {:#x}..{:#x}",
                seg.page_start(),
                seg.page_end(),
                other.page_start(),
                other.page_end()
            )));
        }
        segments.push(seg);
    }
    if segments.is_empty() {
        return Err(LoadError::Invalid("no loadable segments".into()));
    }
    Ok(segments)
}

/// One step of a walk through the notes of a `PT_NOTE` segment.
enum NoteAt<'a> {
    /// A whole note, and the offset of the next one (4-byte aligned).
    Note {
        name: &'a [u8],
        ntype: u32,
        desc: &'a [u8],
        next: usize,
    },
    /// A note header whose name or descriptor runs past the segment;
    /// `solo5` if its name starts with the Solo5 owner name.
    Cut { solo5: bool, ntype: u32 },
    /// No room for another note header.
    End,
}

fn note_at(seg: &[u8], pos: usize) -> NoteAt<'_> {
    let (Some(namesz), Some(descsz), Some(ntype)) =
        (u32_at(seg, pos), u32_at(seg, pos + 4), u32_at(seg, pos + 8))
    else {
        return NoteAt::End;
    };
    let (namesz, descsz) = (namesz as usize, descsz as usize);
    let name_start = pos + 12;
    let desc_start = name_start.checked_add(namesz.div_ceil(4) * 4);
    let desc_end = desc_start.and_then(|d| d.checked_add(descsz));
    match (desc_start, desc_end) {
        (Some(desc_start), Some(desc_end)) if desc_end <= seg.len() => NoteAt::Note {
            name: &seg[name_start..name_start + namesz],
            ntype,
            desc: &seg[desc_start..desc_end],
            next: desc_start + descsz.div_ceil(4) * 4,
        },
        _ => NoteAt::Cut {
            solo5: seg.get(name_start..name_start + abi::NOTE_NAME.len()) == Some(abi::NOTE_NAME),
            ntype,
        },
    }
}

/// The descriptor of `note` if it is the Solo5 note of `note_type`, with
/// the internal alignment padding removed (the descriptor proper starts at
/// the header size rounded up to `desc_align`).
fn solo5_desc<'a>(
    note: &NoteAt<'a>,
    note_type: u32,
    desc_align: usize,
) -> Result<Option<&'a [u8]>, LoadError> {
    match *note {
        NoteAt::Note {
            name, ntype, desc, ..
        } if name == abi::NOTE_NAME && ntype == note_type => {
            let header = abi::NOTE_HEADER_SIZE;
            let pad = header.div_ceil(desc_align) * desc_align - header;
            desc.get(pad..)
                .map(Some)
                .ok_or_else(|| LoadError::Invalid("Solo5 note descriptor is too short".into()))
        }
        NoteAt::Cut { solo5: true, ntype } if ntype == note_type => Err(LoadError::Truncated(
            "a Solo5 note extends past its segment",
        )),
        _ => Ok(None),
    }
}

/// Find the Solo5 note of `note_type` among the `PT_NOTE` segments and
/// return its descriptor (see [`solo5_desc`]).
///
/// solo5-hvt (`elf_load_note`) looks at the first note of each `PT_NOTE`
/// segment only, in program-header order; its choice is taken whenever it
/// has one, so both tenders read the same note from the same image. Only
/// when no segment starts with the note are later notes searched (a
/// superset: solo5-hvt refuses such an image).
fn find_note<'a>(
    file: &'a [u8],
    phdrs: &[Phdr],
    note_type: u32,
    desc_align: usize,
) -> Result<Option<&'a [u8]>, LoadError> {
    let segs = phdrs
        .iter()
        .filter(|p| p.p_type == PT_NOTE)
        .map(|ph| {
            ph.offset
                .checked_add(ph.filesz)
                .filter(|&e| e <= file.len() as u64)
                .map(|e| &file[ph.offset as usize..e as usize])
                .ok_or(LoadError::Truncated(
                    "a note segment extends past the end of the file",
                ))
        })
        .collect::<Result<Vec<_>, _>>()?;
    for seg in &segs {
        if let Some(desc) = solo5_desc(&note_at(seg, 0), note_type, desc_align)? {
            return Ok(Some(desc));
        }
    }
    for seg in &segs {
        let mut pos = 0;
        loop {
            let note = note_at(seg, pos);
            if let Some(desc) = solo5_desc(&note, note_type, desc_align)? {
                return Ok(Some(desc));
            }
            match note {
                NoteAt::Note { next, .. } => pos = next,
                NoteAt::Cut { .. } | NoteAt::End => break,
            }
        }
    }
    Ok(None)
}

fn check_abi_note(desc: &[u8]) -> Result<(), LoadError> {
    if desc.len() != abi::ABI1_DESC_SIZE {
        return Err(LoadError::BadAbiNote(format!(
            "descriptor is {} bytes, expected {}",
            desc.len(),
            abi::ABI1_DESC_SIZE
        )));
    }
    let mut info = abi::Abi1Info::default();
    info.as_mut_slice().copy_from_slice(desc);
    let (target, version) = (info.abi_target, info.abi_version);
    if target != abi::ABI_TARGET_HVT {
        return Err(LoadError::BadAbiNote(format!(
            "image is built for Solo5 target {target} ({}), not hvt",
            match target {
                2 => "spt",
                3 => "virtio",
                4 => "muen",
                5 => "genode",
                _ => "unknown",
            }
        )));
    }
    if version != abi::ABI_VERSION {
        return Err(LoadError::BadAbiNote(format!(
            "image uses hvt ABI version {version}, tt-host implements version {}",
            abi::ABI_VERSION
        )));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests;
