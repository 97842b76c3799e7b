//! Loader tests: every check of `parse_image`, on images built by `synth`.

use super::synth::{self, Synth};
use super::*;
use crate::abi::{MFT_DEV_BLOCK_BASIC as BLOCK, MFT_DEV_NET_BASIC as NET};
use std::mem::offset_of;

const MEM: u64 = 64 << 20;

fn parse(s: &Synth) -> Result<Image, LoadError> {
    parse_image(&s.build(), MEM)
}

fn err(s: &Synth) -> String {
    parse(s).unwrap_err().to_string()
}

#[test]
fn accepts_a_minimal_image() {
    let img = parse(&Synth::default()).unwrap();
    assert_eq!(img.entry, synth::TEXT);
    assert_eq!(img.segments.len(), 2);
    assert!(img.segments[0].prot.exec && !img.segments[0].prot.write);
    assert!(img.segments[1].prot.write && !img.segments[1].prot.exec);
    assert_eq!(img.kernel_end, 0x10_2000);
    assert!(img.manifest.entries.is_empty());
}

#[test]
fn reads_the_manifest_devices_in_order() {
    let s = Synth {
        devices: vec![("storage".into(), BLOCK), ("service0".into(), NET)],
        ..Synth::default()
    };
    let img = parse(&s).unwrap();
    assert_eq!(img.manifest.handle_of("storage"), Some(1));
    assert_eq!(img.manifest.handle_of("service0"), Some(2));
    assert_eq!(img.manifest.entries[1].ty, NET);
}

#[test]
fn rejects_non_elf_and_truncated_files() {
    assert_eq!(
        parse_image(b"hello world", MEM).unwrap_err(),
        LoadError::NotElf
    );
    assert_eq!(parse_image(b"", MEM).unwrap_err(), LoadError::NotElf);
    let full = Synth::default().build();
    for cut in [10, 63, 64 + 56, 0x1000 + 3] {
        let e = parse_image(&full[..cut], MEM).unwrap_err().to_string();
        assert!(e.contains("truncated"), "cut at {cut}: {e}");
    }
}

#[test]
fn rejects_wrong_class_machine_and_type() {
    let mut f = Synth::default().build();
    f[4] = 1;
    assert!(parse_image(&f, MEM)
        .unwrap_err()
        .to_string()
        .contains("64-bit"));
    let mut f = Synth::default().build();
    f[18] = 183; // aarch64
    assert!(parse_image(&f, MEM)
        .unwrap_err()
        .to_string()
        .contains("x86-64"));
    let mut f = Synth::default().build();
    f[16] = 3; // ET_DYN
    assert!(parse_image(&f, MEM)
        .unwrap_err()
        .to_string()
        .contains("ET_EXEC"));
}

#[test]
fn rejects_writable_executable_segments() {
    let s = Synth {
        text_flags: 7,
        ..Synth::default()
    };
    assert!(err(&s).contains("both writable and executable"));
}

#[test]
fn rejects_segments_outside_guest_memory() {
    let f = Synth::default().build();
    let e = parse_image(&f, 0x10_1000).unwrap_err().to_string();
    assert!(e.contains("beyond guest memory"), "{e}");
    let s = Synth {
        entry: 0x5000,
        ..Synth::default()
    };
    assert!(err(&s).contains("entry point"));
    // Segment below 1 MiB.
    let mut f = Synth::default().build();
    f[64 + 16..64 + 24].copy_from_slice(&0x8000u64.to_le_bytes());
    let e = parse_image(&f, MEM).unwrap_err().to_string();
    assert!(e.contains("below the 1 MiB"), "{e}");
}

#[test]
fn rejects_overlapping_segments() {
    let mut f = Synth::default().build();
    // Move the data segment onto the text page.
    let o = 64 + 56 + 16;
    f[o..o + 8].copy_from_slice(&0x10_0800u64.to_le_bytes());
    let e = parse_image(&f, MEM).unwrap_err().to_string();
    assert!(e.contains("overlap"), "{e}");
}

#[test]
fn requires_the_abi_note_for_hvt_version_2() {
    let s = Synth {
        with_abi_note: false,
        ..Synth::default()
    };
    assert_eq!(parse(&s).unwrap_err(), LoadError::MissingAbiNote);
    let s = Synth {
        abi_target: 2,
        ..Synth::default()
    };
    assert!(err(&s).contains("spt"));
    let s = Synth {
        abi_version: 1,
        ..Synth::default()
    };
    assert!(err(&s).contains("ABI version 1"));
}

#[test]
fn requires_a_valid_manifest() {
    let s = Synth {
        with_manifest: false,
        ..Synth::default()
    };
    assert_eq!(parse(&s).unwrap_err(), LoadError::MissingManifest);

    let base = Synth {
        devices: vec![("storage".into(), BLOCK)],
        ..Synth::default()
    };
    let bad = |edit: &dyn Fn(&mut Vec<u8>)| manifest_error(&base, edit);
    let e1 = 12 + abi::MFT_ENTRY_SIZE;
    assert!(bad(&|d| d[4] = 9).contains("version 9"));
    assert!(bad(&|d| d[8] = 3).contains("3 entries need"));
    assert!(bad(&|d| d[8..12].copy_from_slice(&65u32.to_le_bytes())).contains("65 entries"));
    assert!(bad(&|d| d[12 + 68] = 1).contains("reserved first entry"));
    assert!(bad(&|d| d[e1 + 68] = 7).contains("unknown device type 7"));
    assert!(bad(&|d| d[e1..e1 + 68].fill(b'a')).contains("not NUL-terminated"));
    assert!(bad(&|d| d[e1] = 0).contains("name must be"));
    assert!(bad(&|d| d.truncate(30)).contains("need"));

    let dup = Synth {
        devices: vec![("a".into(), BLOCK), ("a".into(), NET)],
        ..Synth::default()
    };
    assert!(err(&dup).contains("appears twice"));
    let many = Synth {
        devices: (0..64).map(|i| (format!("d{i}"), BLOCK)).collect(),
        ..Synth::default()
    };
    assert!(err(&many).contains("65 entries"));
}

#[test]
fn guest_manifest_has_devices_filled_in() {
    let s = Synth {
        devices: vec![("storage".into(), BLOCK), ("service0".into(), NET)],
        ..Synth::default()
    };
    let img = parse(&s).unwrap();
    let bytes = img.manifest.to_guest_bytes(|h, _| {
        if h == 1 {
            manifest::DeviceInfo::Block {
                capacity: 1 << 20,
                block_size: 4096,
            }
        } else {
            manifest::DeviceInfo::Net {
                mac: [2, 0, 0, 0, 0, 9],
                mtu: 1500,
            }
        }
    });
    // The guest view parses back to the same manifest.
    assert_eq!(Manifest::parse_guest_view(&bytes).unwrap(), img.manifest);
    let e1 = 8 + abi::MFT_ENTRY_SIZE;
    let e2 = 8 + 2 * abi::MFT_ENTRY_SIZE;
    assert_eq!(&bytes[e1..e1 + 8], b"storage\0");
    assert_eq!(
        u64::from_le_bytes(bytes[e1 + 72..e1 + 80].try_into().unwrap()),
        1 << 20
    );
    assert_eq!(
        u16::from_le_bytes(bytes[e1 + 80..e1 + 82].try_into().unwrap()),
        4096
    );
    assert_eq!(bytes[e1 + 96], 1, "attached");
    assert_eq!(&bytes[e2 + 72..e2 + 78], &[2, 0, 0, 0, 0, 9]);
    assert_eq!(
        u16::from_le_bytes(bytes[e2 + 78..e2 + 80].try_into().unwrap()),
        1500
    );
}

#[test]
fn hostile_headers_do_not_panic() {
    let full = Synth::default().build();
    // Flip every byte of the headers and notes to a few values.
    let note_start = 0x2000;
    for i in (0..64 + 4 * 56).chain(note_start..full.len()) {
        for v in [0u8, 0xff, 0x80, 1] {
            let mut f = full.clone();
            f[i] = v;
            let _ = parse_image(&f, MEM);
        }
    }
}

// Differences from Solo5's loader (tenders/common/elf.c, mft.c), fixed.

#[test]
fn rejects_a_bad_elf_version_or_header_size() {
    // elf.c ehdr_is_valid: e_version must be EV_CURRENT, e_ehsize 64.
    let mut f = Synth::default().build();
    f[20] = 0;
    let e = parse_image(&f, MEM).unwrap_err().to_string();
    assert!(e.contains("ELF version 0"), "{e}");
    let mut f = Synth::default().build();
    f[52] = 52;
    let e = parse_image(&f, MEM).unwrap_err().to_string();
    assert!(e.contains("ELF header size 52"), "{e}");
}

#[test]
fn a_segment_s_pages_must_fit_in_guest_memory() {
    // elf.c elf_load: the segment's end rounded up to its page must be in
    // memory. The data segment is 0x101000 + 0x100: its page ends at
    // 0x102000.
    let f = Synth::default().build();
    let e = parse_image(&f, 0x10_1800).unwrap_err().to_string();
    assert!(e.contains("beyond guest memory"), "{e}");
    let img = parse_image(&f, 0x10_2000).unwrap();
    assert_eq!(img.kernel_end, 0x10_2000);
}

fn mft_note(devices: &[(&str, u32)]) -> Vec<u8> {
    let s = Synth {
        devices: devices.iter().map(|(n, k)| (n.to_string(), *k)).collect(),
        ..Synth::default()
    };
    synth::note(abi::NOTE_TYPE_MFT1, &s.manifest_desc())
}

fn abi_note() -> Vec<u8> {
    synth::note(abi::NOTE_TYPE_ABI1, &Synth::default().abi_desc())
}

#[test]
fn the_manifest_is_the_one_solo5_hvt_would_read() {
    // elf.c elf_load_note reads the first note of each PT_NOTE segment, in
    // program-header order. Segment 0 holds the ABI note then a manifest
    // declaring "a"; segment 1 starts with a manifest declaring "b":
    // solo5-hvt reads "b", so tt-host must too.
    let a = mft_note(&[("a", BLOCK)]);
    let b = mft_note(&[("b", NET)]);
    let f = Synth::default().build_notes(&[[abi_note(), a.clone()].concat(), b]);
    let img = parse_image(&f, MEM).unwrap();
    assert_eq!(img.manifest.handle_of("b"), Some(1));
    assert_eq!(img.manifest.handle_of("a"), None);

    // A note that no segment starts with is still found (a superset of
    // solo5-hvt, which refuses this image), after a foreign note too.
    let openbsd = synth::note_owned(b"OpenBSD\0", 1, &[0; 4]);
    let f = Synth::default().build_notes(&[[openbsd, abi_note(), a].concat()]);
    let img = parse_image(&f, MEM).unwrap();
    assert_eq!(img.manifest.handle_of("a"), Some(1));
}

#[test]
fn manifest_fields_solo5_requires_to_be_clear_are_checked() {
    // mft.c mft_validate: entry 0 has an empty name, every name's last byte
    // is NUL, and no entry is marked attached.
    let base = Synth {
        devices: vec![("storage".into(), BLOCK)],
        ..Synth::default()
    };
    let bad = |edit: &dyn Fn(&mut Vec<u8>)| manifest_error(&base, edit);
    let e0 = 12;
    let e1 = 12 + abi::MFT_ENTRY_SIZE;
    let e = bad(&|d| d[e0] = b'x');
    assert!(e.contains("entry 0") && e.contains("has a name"), "{e}");
    // "storage\0" then garbage up to a non-NUL last byte.
    let e = bad(&|d| d[e1 + 67] = b'x');
    assert!(e.contains("entry 1: name is not NUL-terminated"), "{e}");
    for entry in [e0, e1] {
        let e = bad(&|d| d[entry + offset_of!(abi::MftEntry, attached)] = 1);
        assert!(e.contains("'attached' is set"), "{e}");
    }
}

#[test]
fn unused_manifest_entries_keep_the_handles_of_later_devices() {
    // solo5-hvt skips entries of type MFT_RESERVED_FIRST or above when it
    // checks that every device is attached; a device's handle is its index.
    let s = Synth {
        devices: vec![
            ("x".into(), BLOCK),
            ("storage".into(), BLOCK),
            ("y".into(), NET),
            ("service0".into(), NET),
        ],
        ..Synth::default()
    };
    let mut d = s.manifest_desc();
    let ty = |i: usize| 12 + i * abi::MFT_ENTRY_SIZE + offset_of!(abi::MftEntry, ty);
    d[ty(1)..ty(1) + 4].copy_from_slice(&abi::MFT_RESERVED_FIRST.to_le_bytes());
    d[ty(3)..ty(3) + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    let img = parse_image(&s.build_with(s.abi_desc(), d), MEM).unwrap();
    let m = &img.manifest;
    assert_eq!(m.count(), 5);
    assert_eq!(m.handle_of("storage"), Some(2));
    assert_eq!(m.handle_of("service0"), Some(4));
    assert_eq!(m.handle_of("x"), None);
    assert_eq!(m.entries.len(), 2);
    assert_eq!(
        (m.unused[0].handle, m.unused[0].ty, &m.unused[0].name[..]),
        (1, abi::MFT_RESERVED_FIRST, &b"x"[..])
    );
    assert_eq!((m.unused[1].handle, m.unused[1].ty), (3, u32::MAX));

    // The guest sees every entry at its index; unused ones unattached.
    let bytes = m.to_guest_bytes(|h, _| {
        if h == 2 {
            manifest::DeviceInfo::Block {
                capacity: 4096,
                block_size: 512,
            }
        } else {
            manifest::DeviceInfo::Net {
                mac: [2, 0, 0, 0, 0, 1],
                mtu: 1500,
            }
        }
    });
    assert_eq!(bytes.len(), 8 + 5 * abi::MFT_ENTRY_SIZE);
    let at = |i: usize, o: usize| 8 + i * abi::MFT_ENTRY_SIZE + o;
    assert_eq!(&bytes[at(2, 0)..at(2, 8)], b"storage\0");
    assert_eq!(bytes[at(2, offset_of!(abi::MftEntry, attached))], 1);
    assert_eq!(bytes[at(1, offset_of!(abi::MftEntry, attached))], 0);
    assert_eq!(&bytes[at(3, 68)..at(3, 72)], &u32::MAX.to_le_bytes());
    assert_eq!(&Manifest::parse_guest_view(&bytes).unwrap(), m);

    // Types below MFT_RESERVED_FIRST that are not devices stay refused.
    let mut d = s.manifest_desc();
    d[ty(1)..ty(1) + 4].copy_from_slice(&0u32.to_le_bytes());
    let e = parse_image(&s.build_with(s.abi_desc(), d), MEM)
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown device type 0"), "{e}");
}

#[test]
fn a_manifest_of_64_entries_is_accepted() {
    let s = Synth {
        devices: (0..63).map(|i| (format!("d{i}"), BLOCK)).collect(),
        ..Synth::default()
    };
    let img = parse(&s).unwrap();
    assert_eq!(img.manifest.count(), 64);
    assert_eq!(img.manifest.handle_of("d62"), Some(63));
}

/// The loader's error for `base`'s image with its manifest descriptor
/// edited by `edit`.
fn manifest_error(base: &Synth, edit: &dyn Fn(&mut Vec<u8>)) -> String {
    let mut d = base.manifest_desc();
    edit(&mut d);
    parse_image(&base.build_with(base.abi_desc(), d), MEM)
        .unwrap_err()
        .to_string()
}

#[test]
fn the_header_is_checked_on_its_own_before_the_file_is_read() {
    let file = Synth::default().build();
    let h = parse_header(&file[..EHDR_SIZE]).unwrap();
    assert_eq!(h.entry, synth::TEXT);
    assert_eq!(parse_header(&[0u8; 64]), Err(LoadError::NotElf));
    let mut bad = file[..EHDR_SIZE].to_vec();
    bad[18] = 3; // EM_386
    assert!(matches!(
        parse_header(&bad),
        Err(LoadError::Unsupported(m)) if m.contains("x86-64")
    ));
    assert!(check_file_size(MAX_FILE_SIZE).is_ok());
    let e = check_file_size(4 << 30).unwrap_err();
    assert_eq!(
        e,
        LoadError::FileTooLarge {
            size: 4 << 30,
            max: MAX_FILE_SIZE
        }
    );
    assert!(e.to_string().contains("4294967296 bytes"), "{e}");
}

#[test]
fn only_the_span_of_headers_and_segments_is_needed() {
    let file = Synth::default().build();
    let h = parse_header(&file).unwrap();
    let table = &file[h.phoff as usize..][..h.phdrs_len()];
    // Bytes after the last segment (symbols, debug information) are not
    // part of the span, and the image parses the same without them.
    let mut long = file.clone();
    long.resize(file.len() + (1 << 20), 0xcc);
    let span = span(&h, table, long.len() as u64).unwrap();
    assert!(span <= file.len() as u64, "{span} > {}", file.len());
    let whole = parse_image(&long, MEM).unwrap();
    let prefix = parse_image(&long[..span as usize], MEM).unwrap();
    assert_eq!(whole.segments, prefix.segments);
    assert_eq!(whole.manifest, prefix.manifest);
    // A file that ends early: the span is the file, and parse_image says
    // what is cut off.
    assert_eq!(super::span(&h, table, 100).unwrap(), 100);

    // A segment whose bytes lie 300 MiB into a file that long.
    let mut far = table.to_vec();
    let load = (0..h.phnum)
        .find(|i| u32_at(&far, i * PHDR_SIZE) == Some(PT_LOAD))
        .unwrap();
    far[load * PHDR_SIZE + 8..][..8].copy_from_slice(&(300u64 << 20).to_le_bytes());
    let e = super::span(&h, &far, 400 << 20).unwrap_err();
    assert!(
        matches!(e, LoadError::SpanTooLarge { max: MAX_SPAN, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("256 MiB"), "{e}");
}

#[test]
fn protected_ranges_are_low_memory_and_every_segment_but_plain_data() {
    let img = parse_image(&Synth::default().build(), 16 << 20).unwrap();
    let r: Vec<(u64, u64)> = img
        .protected_ranges()
        .iter()
        .map(|p| (p.start, p.end))
        .collect();
    // Low memory, then the text page; the R+W data page is not protected.
    assert_eq!(r, vec![(0, 0x10_0000), (synth::TEXT, synth::TEXT + 0x1000)]);
    assert!(img.protected_ranges()[1].what.contains("code"));
    let p = img.protected_ranges()[1];
    assert!(p.overlaps(synth::TEXT + 0xfff, 1) && !p.overlaps(synth::TEXT + 0x1000, 8));
    assert!(!p.overlaps(synth::TEXT, 0) && p.overlaps(0, u64::MAX));
}
