//! An image laid out as Solo5's own hvt linker script lays out MirageOS
//! images (fuzz/make_seeds.py, `solo5_layout`): execute-only text, the
//! notes inside rodata with a foreign note's PT_NOTE listed first, a
//! PT_TLS, a .bss-only PT_LOAD, and a manifest whose block device "storage"
//! comes after an unused entry, so its handle is 2. The guest reads a block
//! of handle 2 with its hypercall structs in .bss and exits with
//! 40 + the result.

use tt_tests::*;

const IMAGE: &[u8] = include_bytes!("../../fuzz/seeds/loader/solo5-layout.hvt");

#[test]
fn a_solo5_layout_image_runs_and_its_device_keeps_its_handle() {
    if !kvm() {
        return;
    }
    let dir = Scratch::new("solo5-layout");
    let img = dir.file("solo5-layout.hvt", IMAGE).display().to_string();
    let disk = dir.file("disk.img", &[0x5a; 4096]).display().to_string();
    let r = tt(&["run", "--mem=8", &format!("--block:storage={disk}"), &img]);
    // 42 would be EINVAL: handle 2 not being the block device.
    assert_eq!(r.status, 40, "{r:?}");
}

#[test]
fn the_unused_entry_needs_no_device() {
    let dir = Scratch::new("solo5-layout");
    let img = dir.file("solo5-layout.hvt", IMAGE).display().to_string();
    // Only "storage" is asked for; the unused entry is not a device.
    assert_error(
        &tt(&["run", &img]),
        "block device 'storage', which was not given",
    );
}
