use super::*;
use proptest::prelude::*;

pub(crate) fn sample() -> Snapshot {
    let mut regs = kvm_bindings::kvm_regs {
        rip: 0x10_0000,
        rsp: 0x7f_fff8,
        ..Default::default()
    };
    regs.rax = 42;
    Snapshot {
        launch: Launch {
            image: b"\x7fELF not really".to_vec(),
            image_path: "/images/counter".into(),
            mem_mb: 32,
            devices: vec![("block".into(), Some("disk".into()), "/d.img".into())],
            guest_args: vec!["count".into(), "50".into()],
            cpl3: false,
            solo5_hvt_boot: false,
            name: Some("a.b".into()),
        },
        mem_size: 32 << 20,
        vcpu: Vcpu {
            regs,
            sregs: Default::default(),
            xsave: vec![7; 4096],
            xcrs: Default::default(),
            events: Default::default(),
            msrs: vec![(0xc000_0082, 0xffff_8000)],
            tsc: 123_456_789,
            tsc_khz: 2_400_000,
        },
        monitor: None,
        disks: vec![DiskIdentity {
            device: "disk".into(),
            path: "/d.img".into(),
            len: 1 << 20,
            mtime_ns: 1_700_000_000_123_456_789,
            sample_crc: 0xdead_beef,
        }],
        mmio: vec![MmioState {
            base: 0x1_0000_0000,
            state: vec![1, 2, 3],
        }],
        nets: vec![("service0".into(), [2, 0, 0, 0, 0, 2])],
    }
}

#[test]
fn a_state_file_reads_back_as_it_was_written() {
    let s = sample();
    let bytes = encode(&s);
    assert_eq!(&bytes[..8], b"TTSNAP\r\n");
    assert_eq!(decode(&bytes).unwrap(), s);
}

#[test]
fn an_unknown_version_is_refused_by_number_before_the_body_is_read() {
    let mut bytes = encode(&sample());
    bytes[8..12].copy_from_slice(&2u32.to_le_bytes());
    // The CRC no longer matches either: the version is what is reported.
    let e = decode(&bytes).unwrap_err();
    assert_eq!(e, FormatError::Version { found: 2 });
    assert!(e.to_string().contains("version 2"), "{e}");
    assert!(e.to_string().contains("reads version 1"), "{e}");
}

#[test]
fn wrong_magic_truncation_trailing_bytes_and_huge_lengths_are_refused() {
    let bytes = encode(&sample());
    assert_eq!(decode(b"ELF\0\0\0\0\0\0\0\0\0"), Err(FormatError::Magic));
    assert_eq!(decode(&[]), Err(FormatError::Magic));
    assert!(matches!(
        decode(&bytes[..bytes.len() - 1]),
        Err(FormatError::Truncated { .. })
    ));
    assert!(matches!(
        decode(&bytes[..15]),
        Err(FormatError::Truncated { .. })
    ));
    let mut longer = bytes.clone();
    longer.push(0);
    assert_eq!(decode(&longer), Err(FormatError::Trailing(1)));
    let mut huge = bytes.clone();
    huge[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
    assert_eq!(decode(&huge), Err(FormatError::TooLarge(u64::MAX)));
}

#[test]
fn a_well_formed_body_that_contradicts_itself_is_refused() {
    let mut s = sample();
    s.mem_size = 16 << 20;
    let e = decode(&encode(&s)).unwrap_err();
    assert!(e.to_string().contains("does not match --mem=32"), "{e}");
    let mut s = sample();
    s.launch.cpl3 = true;
    let e = decode(&encode(&s)).unwrap_err();
    assert!(e.to_string().contains("CPL 3 monitor"), "{e}");
}

#[test]
fn a_changed_disk_is_told_from_the_one_the_snapshot_saw() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.img");
    std::fs::write(&p, vec![1u8; 3 << 20]).unwrap();
    let f = std::fs::File::open(&p).unwrap();
    let then = disk_identity("disk", &f).unwrap();
    assert_eq!(then.len, 3 << 20);
    assert_eq!(
        disk_changed(&then, &disk_identity("disk", &f).unwrap()),
        None
    );
    // A byte in the last MiB: the sample differs.
    let w = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&w, &[2], (3 << 20) - 10).unwrap();
    let why = disk_changed(&then, &disk_identity("disk", &f).unwrap()).unwrap();
    assert!(why.contains("contents differ"), "{why}");
    // Back to the same bytes, but written since: the time says so.
    std::os::unix::fs::FileExt::write_all_at(&w, &[1], (3 << 20) - 10).unwrap();
    let now = disk_identity("disk", &f).unwrap();
    if now.mtime_ns != then.mtime_ns {
        let why = disk_changed(&then, &now).unwrap();
        assert!(why.contains("modified since"), "{why}");
    }
    w.set_len(4 << 20).unwrap();
    let why = disk_changed(&then, &disk_identity("disk", &f).unwrap()).unwrap();
    assert!(why.contains("size"), "{why}");
}

proptest! {
    /// Any one byte changed anywhere in the file is refused; never
    /// accepted as another snapshot, never a panic.
    #[test]
    fn every_single_byte_change_is_refused(at in 0usize..4096, x in 1u8..=255) {
        let bytes = encode(&sample());
        let at = at % bytes.len();
        let mut bad = bytes.clone();
        bad[at] ^= x;
        prop_assert!(decode(&bad).is_err());
    }

    /// Arbitrary bytes after a valid header never panic the reader.
    #[test]
    fn arbitrary_bodies_are_refused_without_panicking(body in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&VERSION.to_le_bytes());
        bytes.extend_from_slice(&(body.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&body);
        let crc = crc32fast::hash(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        let _ = decode(&bytes);
    }
}
