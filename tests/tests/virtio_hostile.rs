//! Malformed virtio queues from a hand-built guest, on real KVM: the
//! `vhostile` guest (guest-sdk/examples/vhostile) drives tt-host's
//! virtio-blk registers itself and offers descriptor loops, chains longer
//! than the queue, `next` outside the table, buffers outside RAM or past
//! 2^64, status bytes the device must not write, buffers and rings over
//! the image's code and tt-host's boot structures, avail indices and heads
//! out of range, writes beyond the disk or of partial sectors, and a reset
//! with a write in flight. Each
//! must get its documented answer (docs/ABI.md, "virtio-blk"), tt-host
//! must not crash, the device must serve a good request after a reset,
//! and the image must hold exactly its original bytes except where the
//! good requests wrote.

use tt_tests::*;

/// Sectors of the image (8 MiB).
const SECTORS: u64 = 16384;
/// The good request after case `k` writes 4 KiB at `FIRST_GOOD + 8 k`.
const FIRST_GOOD: u64 = 64;

const RESET: &str = "DEVICE_NEEDS_RESET";
const IOERR: &str = "IOERR";

/// Every case, in the guest's order, with the answer it must get.
const CASES: &[(&str, &str)] = &[
    ("descriptor loop", RESET),
    ("chain longer than the queue", RESET),
    ("next outside the table", RESET),
    ("indirect table with a loop", RESET),
    ("indirect table outside RAM", RESET),
    ("data lengths past 4 GiB in total", RESET),
    ("head index >= queue size", RESET),
    ("avail index more than a queue ahead", RESET),
    ("status in a device-readable descriptor", RESET),
    ("status byte outside RAM", RESET),
    ("status byte over .text", RESET),
    ("status byte over the boot info page", RESET),
    ("read into a buffer outside RAM", IOERR),
    ("read into a buffer across the end of RAM", IOERR),
    ("read whose address + length pass 2^64", IOERR),
    ("write whose address + length pass 2^64", IOERR),
    ("read into .text", IOERR),
    ("read into .rodata", IOERR),
    ("read into the supervisor-only region", IOERR),
    ("read into page 0 and the GDT", IOERR),
    ("read into tt-host's page tables", IOERR),
    ("read into the boot info page", IOERR),
    ("read across 1 MiB (tender's page, then .text)", IOERR),
    ("write from .text", IOERR),
    ("write with device-writable data", IOERR),
    ("read with device-readable data", IOERR),
    ("write at a sector beyond capacity", IOERR),
    ("write across the end of the disk", IOERR),
    ("write whose sector * 512 overflows", IOERR),
    ("write of 1000 bytes", IOERR),
    ("read of 1000 bytes", IOERR),
    ("header in a device-writable descriptor", IOERR),
    ("unknown request type", "UNSUPP"),
    ("descriptor table outside RAM", RESET),
    ("descriptor table over .text", RESET),
    ("available ring over .text", RESET),
    ("used ring over .text", RESET),
    ("used ring over tt-host's page tables", RESET),
    ("used ring over the boot info page", RESET),
    ("used ring across the end of RAM", RESET),
    ("used ring whose end passes 2^64", RESET),
    ("misaligned descriptor table", RESET),
    ("good write while DEVICE_NEEDS_RESET", "no answer"),
    ("reset with a write in flight", "no answer"),
];

/// The write in flight at a reset goes here (4 KiB): each sector then
/// holds the good pattern or its original bytes.
const IN_FLIGHT: std::ops::Range<u64> = 48..56;

/// Sector `s` of the image before the run.
fn original(s: u64) -> Vec<u8> {
    let mut b = b"ORIGINAL".to_vec();
    b.extend_from_slice(&s.to_le_bytes());
    b.extend((16..512u64).map(|i| (s * 13 + i * 3) as u8));
    b
}

/// Sector `s` as the guest's good requests write it (see vhostile).
fn good(s: u64) -> Vec<u8> {
    let mut b = b"VHOSTILE".to_vec();
    b.extend_from_slice(&s.to_le_bytes());
    b.extend((16..512u64).map(|i| (s.wrapping_mul(31).wrapping_add(i * 7) as u8) ^ 0x5a));
    b
}

fn hostile(durability: &str) {
    let dir = Scratch::new("vhostile");
    let before: Vec<u8> = (0..SECTORS).flat_map(original).collect();
    let image = dir.file("disk.img", &before);
    let r = tt(&[
        "run",
        "--mem=64",
        &format!("--state-dir={}", dir.path("state").display()),
        &format!("--block:disk={}", image.display()),
        &format!("--block-durability={durability}"),
        &guest("vhostile").display().to_string(),
    ]);
    assert_eq!(r.status, 0, "{durability}: {r:?}");
    assert!(!r.stderr.contains("panicked"), "{durability}: {r:?}");

    for (k, (name, answer)) in CASES.iter().enumerate() {
        let line = format!(
            "vhostile: [{k:02}] {name} -> {answer} (expected {answer}) match; \
             good write+read at sector {}: ok",
            FIRST_GOOD + 8 * k as u64
        );
        assert!(
            r.stdout.lines().any(|l| l == line),
            "{durability}: no line {line:?}: {r:?}"
        );
    }
    let cases = r
        .stdout
        .lines()
        .filter(|l| l.starts_with("vhostile: ["))
        .count();
    assert_eq!(cases, CASES.len(), "{durability}: {r:?}");
    for line in [
        "vhostile: .text and .rodata unchanged",
        "vhostile: boot info, manifest and command line unchanged",
        "vhostile: OK",
    ] {
        assert!(
            r.stdout.lines().any(|l| l.starts_with(line)),
            "{durability}: no line {line:?}: {r:?}"
        );
    }

    // Only the good requests' sectors changed, to exactly what they wrote.
    let after = std::fs::read(&image).unwrap();
    assert_eq!(
        after.len(),
        before.len(),
        "{durability}: image size changed"
    );
    let written = FIRST_GOOD..FIRST_GOOD + 8 * CASES.len() as u64;
    let wrong: Vec<u64> = (0..SECTORS)
        .filter(|&s| {
            let got = &after[s as usize * 512..(s as usize + 1) * 512];
            if written.contains(&s) {
                got != good(s)
            } else if IN_FLIGHT.contains(&s) {
                got != good(s) && got != original(s)
            } else {
                got != original(s)
            }
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "{durability}: {} sectors differ from what they should hold, first {:?}: {r:?}",
        wrong.len(),
        &wrong[..wrong.len().min(16)]
    );
}

#[test]
fn malformed_queues_get_their_answers_and_leave_the_image_intact_with_the_journal() {
    if !kvm() {
        return;
    }
    hostile("journal");
}

#[test]
fn malformed_queues_get_their_answers_and_leave_the_image_intact_without_the_journal() {
    if !kvm() {
        return;
    }
    hostile("none");
}
