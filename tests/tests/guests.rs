//! The tt-guest example unikernels, each through `tt-host run` on real KVM.
//! They run their application code at CPL 3 (see docs/ABI.md).

use tt_tests::*;

fn run(args: &[&str]) -> Run {
    let mut a = vec!["run"];
    a.extend_from_slice(args);
    tt(&a)
}

fn img(name: &str) -> String {
    guest(name).display().to_string()
}

#[test]
fn hello_prints_its_arguments() {
    if !kvm() {
        return;
    }
    let r = run(&["--mem=16", &img("hello"), "--", "one", "two"]);
    assert_eq!(r.status, 0, "{r:?}");
    assert!(r.stdout.contains("Hello, world"), "{r:?}");
    assert!(r.stdout.contains("arg[1]: one"), "{r:?}");
    assert!(r.stdout.contains("arg[2]: two"), "{r:?}");
}

#[test]
fn hello_exit_status_reaches_the_host() {
    if !kvm() {
        return;
    }
    let r = run(&["--mem=16", &img("hello"), "exit=42"]);
    assert_eq!(r.status, 42, "{r:?}");
}

#[test]
fn time_clocks_advance_and_poll_sleeps_as_asked() {
    if !kvm() {
        return;
    }
    let r = run(&["--mem=16", &img("time")]);
    assert_eq!(r.status, 0, "{r:?}");
    assert!(r.stdout.contains("slept 100 ms"), "{r:?}");
    assert!(r.stdout.contains("slept 300 ms"), "{r:?}");
}

/// Both ways a block device acknowledges writes: once durable in the
/// image's journal, and solo5-hvt's plain write to the image. The BLOCK_*
/// semantics a guest sees must be the same in both.
const DURABILITY: [&str; 2] = ["journal", "none"];

/// Run the `blk` example on a fresh image of `blocks` sectors of `sector`
/// bytes, with `--block-durability=DURABILITY` and a state directory of
/// its own.
fn blk(sector: u64, blocks: u64, durability: &str) -> Run {
    let dir = Scratch::new("blk");
    let disk = dir.path("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(sector * blocks)
        .unwrap();
    let r = run(&[
        "--mem=32",
        &format!("--state-dir={}", dir.path("state").display()),
        &format!("--block:storage={}", disk.display()),
        &format!("--block-sector-size:storage={sector}"),
        &format!("--block-durability={durability}"),
        &img("blk"),
    ]);
    // What the guest wrote is in the file: block i starts with its index.
    if r.status == 0 {
        let data = std::fs::read(&disk).unwrap();
        assert_eq!(data.len() as u64, sector * blocks);
        assert!(
            data.iter().any(|&b| b != 0),
            "{durability}: nothing reached the disk file"
        );
    }
    r
}

#[test]
fn blk_verifies_every_block_and_rejects_bad_requests() {
    if !kvm() {
        return;
    }
    for durability in DURABILITY {
        for (sector, blocks) in [(512, 2048), (4096, 64)] {
            let r = blk(sector, blocks, durability);
            let case = format!("{durability}, sector {sector}");
            assert_eq!(r.status, 0, "{case}: {r:?}");
            assert!(
                r.stdout
                    .contains(&format!("{blocks} blocks of {sector} bytes verified")),
                "{case}: {r:?}"
            );
            assert!(r.stdout.contains("blk: OK"), "{case}: {r:?}");
        }
    }
}

#[test]
fn exceptions_are_reported_and_abort() {
    if !kvm() {
        return;
    }
    for (arg, needle) in [("null", "#PF"), ("ud", "#UD"), ("div0", "#DE")] {
        let r = run(&["--mem=16", &img("exception"), arg]);
        assert_eq!(r.status, 255, "{arg}: {r:?}");
        let all = format!("{}{}", r.stdout, r.stderr);
        assert!(
            all.contains(needle),
            "{arg}: report should name {needle}: {r:?}"
        );
        assert!(all.contains("rip="), "{arg}: report should give rip: {r:?}");
    }
}

#[test]
fn wx_violations_are_stopped() {
    if !kvm() {
        return;
    }
    for arg in [
        "write-text",
        "write-rodata",
        "exec-data",
        "exec-rodata",
        "exec-stack",
        "write-kernel",
        "write-cmdline",
    ] {
        let r = run(&["--mem=16", &img("wx"), arg]);
        let all = format!("{}{}", r.stdout, r.stderr);
        assert!(!all.contains("violation not caught"), "{arg}: {r:?}");
        assert_eq!(r.status, 255, "{arg}: {r:?}");
        assert!(all.contains("#PF"), "{arg}: {r:?}");
    }
}

#[test]
fn fpu_sse_and_avx_work() {
    if !kvm() {
        return;
    }
    let r = run(&["--mem=16", &img("fpu")]);
    assert_eq!(r.status, 0, "{r:?}");
    assert!(r.stdout.contains("fpu: sse ok"), "{r:?}");
    assert!(
        r.stdout.contains("fpu: avx ok") || r.stdout.contains("avx not supported"),
        "{r:?}"
    );
}

#[test]
fn heap_survives_allocation_stress() {
    if !kvm() {
        return;
    }
    let r = run(&["--mem=256", &img("heap")]);
    assert_eq!(r.status, 0, "{r:?}");
    assert!(r.stdout.contains("heap: OK"), "{r:?}");
}

#[test]
fn compute_runs() {
    if !kvm() {
        return;
    }
    let r = run(&["--mem=16", &img("compute"), "1000000"]);
    assert_eq!(r.status, 0, "{r:?}");
    assert!(!r.stdout.is_empty(), "{r:?}");
}

/// solo5-hvt itself cannot be installed here, so tt-host reproduces its
/// boot state (2 MiB read-write supervisor pages over all memory, no NX, no
/// CR0.WP): the SDK must then build its own page tables and still give the
/// same CPL 3, W^X and exception behaviour.
#[test]
fn sdk_images_behave_the_same_from_solo5_hvt_boot_state() {
    if !kvm() {
        return;
    }
    let solo5 = |args: &[&str]| {
        let mut a = vec!["--x-solo5-hvt-boot", "--mem=64"];
        a.extend_from_slice(args);
        run(&a)
    };
    let r = solo5(&[&img("hello"), "x", "exit=3"]);
    assert_eq!(r.status, 3, "{r:?}");
    assert!(r.stdout.contains("arg[1]: x"), "{r:?}");
    for arg in [
        "write-text",
        "write-rodata",
        "exec-data",
        "exec-rodata",
        "exec-stack",
        "write-kernel",
        "write-cmdline",
    ] {
        let r = solo5(&[&img("wx"), arg]);
        assert_eq!(r.status, 255, "{arg}: {r:?}");
        assert!(
            r.stdout.contains("#PF") || r.stderr.contains("#PF"),
            "{arg}: {r:?}"
        );
    }
    for (arg, needle) in [
        ("null", "null pointer"),
        ("stack", "stack overflow"),
        ("ud", "#UD"),
    ] {
        let r = solo5(&[&img("exception"), arg]);
        assert_eq!(r.status, 255, "{arg}: {r:?}");
        assert!(
            format!("{}{}", r.stdout, r.stderr).contains(needle),
            "{arg}: {r:?}"
        );
    }
    let r = solo5(&[&img("fpu")]);
    assert_eq!(r.status, 0, "{r:?}");
    assert!(r.stdout.contains("fpu: sse ok"), "{r:?}");
}
