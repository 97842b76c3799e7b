//! The seed corpus is only useful if the loader accepts it: a rejected seed
//! would leave the fuzzer starting from error paths. Run with
//! `cargo test --manifest-path fuzz/Cargo.toml` (stable is fine).

use std::path::Path;
use tt_host::abi::{MFT_DEV_BLOCK_BASIC, MFT_DEV_NET_BASIC};
use tt_host::loader::parse_image;

fn seed(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("seeds/loader")
        .join(name);
    std::fs::read(&path)
        .unwrap_or_else(|e| panic!("{}: {e}; run `python3 fuzz/make_seeds.py`", path.display()))
}

#[test]
fn every_seed_is_accepted_at_the_smallest_and_default_memory_sizes() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds/loader");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let file = std::fs::read(&path).unwrap();
        for mem in [4 << 20, 512 << 20] {
            if let Err(e) = parse_image(&file, mem) {
                panic!("{} rejected with --mem={}: {e}", path.display(), mem >> 20);
            }
        }
        n += 1;
    }
    assert!(n >= 3, "expected at least 3 seeds in {}", dir.display());
}

#[test]
fn the_devices_seed_declares_a_block_and_a_net_device() {
    let img = parse_image(&seed("devices.hvt"), 512 << 20).unwrap();
    assert_eq!(img.manifest.handle_of("storage"), Some(1));
    assert_eq!(img.manifest.handle_of("service0"), Some(2));
    assert_eq!(img.manifest.entries[0].ty, MFT_DEV_BLOCK_BASIC);
    assert_eq!(img.manifest.entries[1].ty, MFT_DEV_NET_BASIC);
}

#[test]
fn the_three_segment_seed_has_text_rodata_and_data() {
    let img = parse_image(&seed("three-segments.hvt"), 512 << 20).unwrap();
    let prots: Vec<_> = img
        .segments
        .iter()
        .map(|s| (s.prot.read, s.prot.write, s.prot.exec))
        .collect();
    assert_eq!(
        prots,
        [
            (true, false, true),
            (true, false, false),
            (true, true, false)
        ]
    );
    assert_eq!(img.entry, 0x10_0001);
    assert_eq!(img.kernel_end, 0x10_6000);
}

#[test]
fn the_solo5_layout_seed_keeps_its_bss_segment_and_device_handle() {
    let img = parse_image(&seed("solo5-layout.hvt"), 512 << 20).unwrap();
    assert_eq!(img.segments.len(), 4);
    let bss = &img.segments[3];
    assert!(bss.filesz == 0 && bss.memsz == 0x2000 && bss.prot.write);
    assert_eq!(img.kernel_end, 0x10_5000);
    assert_eq!(img.manifest.handle_of("storage"), Some(2));
    assert_eq!(img.manifest.unused.len(), 1);
}
