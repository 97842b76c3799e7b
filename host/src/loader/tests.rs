//! Loader tests: every check of `parse_image`, on images built by `synth`.

use super::synth::{self, Synth};
use super::*;

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
        devices: vec![
            ("storage".into(), DeviceKind::Block),
            ("service0".into(), DeviceKind::Net),
        ],
        ..Synth::default()
    };
    let img = parse(&s).unwrap();
    assert_eq!(img.manifest.handle_of("storage"), Some(1));
    assert_eq!(img.manifest.handle_of("service0"), Some(2));
    assert_eq!(img.manifest.entries[1].kind, DeviceKind::Net);
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
        devices: vec![("storage".into(), DeviceKind::Block)],
        ..Synth::default()
    };
    let bad = |edit: &dyn Fn(&mut Vec<u8>)| {
        let mut d = base.manifest_desc();
        edit(&mut d);
        parse_image(&base.build_with(base.abi_desc(), d), MEM)
            .unwrap_err()
            .to_string()
    };
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
        devices: vec![
            ("a".into(), DeviceKind::Block),
            ("a".into(), DeviceKind::Net),
        ],
        ..Synth::default()
    };
    assert!(err(&dup).contains("appears twice"));
    let many = Synth {
        devices: (0..64)
            .map(|i| (format!("d{i}"), DeviceKind::Block))
            .collect(),
        ..Synth::default()
    };
    assert!(err(&many).contains("65 entries"));
}

#[test]
fn guest_manifest_has_devices_filled_in() {
    let s = Synth {
        devices: vec![
            ("storage".into(), DeviceKind::Block),
            ("service0".into(), DeviceKind::Net),
        ],
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
    assert_eq!(Manifest::parse(&bytes).unwrap(), img.manifest);
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
