//! virtio-blk end to end: the `vblk` guest (guest-sdk/examples/vblk)
//! writes patterned 4 KiB blocks keeping N requests in flight, flushes,
//! reads them all back N at a time and checks the data and every status,
//! through tt-host's virtio-mmio device on the journaled backend (and
//! without the journal). The device is given with `--block:disk=PATH`:
//! the manifest entry's type makes it virtio-blk.

use tt_tests::*;

fn vblk(dir: &Scratch, depth: u32, extra: &[&str]) -> Run {
    let image = dir.path("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let mut args = vec![
        "run".to_string(),
        "--mem=64".into(),
        format!("--state-dir={}", dir.path("state").display()),
        format!("--block:disk={}", image.display()),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args.push(guest("vblk").display().to_string());
    args.push(format!("depth={depth}"));
    args.push("count=512".into());
    tt(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

#[test]
fn vblk_writes_and_reads_back_at_depths_1_8_and_32_in_both_modes() {
    if !kvm() {
        return;
    }
    for durability in ["journal", "none"] {
        for depth in [1, 8, 32] {
            let dir = Scratch::new("vblk");
            let mode = format!("--block-durability={durability}");
            let r = vblk(&dir, depth, &[&mode]);
            assert_eq!(r.status, 0, "{durability}, depth {depth}: {r:?}");
            assert!(
                r.stdout.contains("vblk: OK"),
                "{durability}, depth {depth}: {r:?}"
            );
            assert!(
                r.stdout.contains(&format!(
                    "read back and verified 512 blocks at depth {depth}"
                )),
                "{r:?}"
            );
        }
    }
}

/// What the guest wrote is on the image once tt-host has exited: block
/// `i` of the image holds what vblk wrote there (its sectors say which
/// write and which sector they are, as blkwriter's do).
#[test]
fn the_image_holds_what_the_guest_wrote() {
    if !kvm() {
        return;
    }
    let dir = Scratch::new("vblkimage");
    let r = vblk(&dir, 32, &[]);
    assert_eq!(r.status, 0, "{r:?}");
    let image = std::fs::read(dir.path("disk.img")).unwrap();
    let written = image
        .chunks(512)
        .filter(|s| s.starts_with(b"TTWRITE1"))
        .count();
    assert!(written >= 512 * 8, "only {written} sectors written: {r:?}");
}

/// solo5-hvt's boot state has no MMIO window: a virtio image is refused
/// there with a message, not started without its disk.
#[test]
fn virtio_devices_are_refused_in_solo5_hvt_boot_state() {
    if !kvm() {
        return;
    }
    let dir = Scratch::new("vblkhvt");
    let r = vblk(&dir, 1, &["--x-solo5-hvt-boot"]);
    assert_error(&r, "solo5-hvt has no virtio");
}

/// A virtio-blk device takes the block options, and only a declared
/// device can be named.
#[test]
fn block_options_name_virtio_devices_and_only_declared_ones() {
    if !kvm() {
        return;
    }
    let dir = Scratch::new("vblkopts");
    let r = vblk(&dir, 8, &["--block-journal:disk=4M"]);
    assert_eq!(r.status, 0, "{r:?}");
    let r = vblk(&dir, 8, &["--block-journal:other=4M"]);
    assert_error(&r, "block device 'other' is not declared");
}
