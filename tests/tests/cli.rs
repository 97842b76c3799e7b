//! Command-line and image errors: each exits 1 with one line naming the
//! problem, before any guest runs.

use tt_host::loader::synth::Synth;
use tt_host::loader::DeviceKind;
use tt_tests::*;

fn blk_image(dir: &Scratch) -> String {
    let s = Synth {
        devices: vec![("storage".into(), DeviceKind::Block)],
        ..Synth::default()
    };
    dir.file("blk.hvt", &s.build()).display().to_string()
}

#[test]
fn help_explains_every_option() {
    let r = tt(&["run", "--help"]);
    assert_eq!(r.status, 0);
    for opt in [
        "--mem=MB",
        "--block:NAME=PATH",
        "--block-sector-size:NAME=BYTES",
        "--net:NAME=TAP",
        "--net-mac:NAME=HWADDR",
    ] {
        assert!(r.stdout.contains(opt), "help lacks {opt}: {}", r.stdout);
    }
}

#[test]
fn missing_device_is_named() {
    let dir = Scratch::new("cli");
    let img = blk_image(&dir);
    assert_error(
        &tt(&["run", &img]),
        "block device 'storage', which was not given",
    );
}

#[test]
fn unknown_device_is_named() {
    let dir = Scratch::new("cli");
    let disk = dir.file("disk.img", &vec![0; 4096]).display().to_string();
    let img = blk_image(&dir);
    let r = tt(&[
        "run",
        &format!("--block:storage={disk}"),
        &format!("--block:other={disk}"),
        &img,
    ]);
    assert_error(&r, "block device 'other' is not declared");
    let r = tt(&[
        "run",
        &format!("--block:storage={disk}"),
        "--net:service0=tap0",
        &img,
    ]);
    assert_error(&r, "net device 'service0' is not declared");
}

#[test]
fn bad_sector_size_is_named() {
    let dir = Scratch::new("cli");
    let disk = dir.file("disk.img", &vec![0; 4096]).display().to_string();
    let img = blk_image(&dir);
    for size in ["1000", "256", "65536"] {
        let r = tt(&[
            "run",
            &format!("--block:storage={disk}"),
            &format!("--block-sector-size:storage={size}"),
            &img,
        ]);
        assert_error(&r, &format!("sector size {size} must be a power of two"));
    }
}

#[test]
fn disk_size_must_be_a_multiple_of_the_sector_size() {
    let dir = Scratch::new("cli");
    let disk = dir
        .file("disk.img", &vec![0; 4096 + 512])
        .display()
        .to_string();
    let img = blk_image(&dir);
    let r = tt(&[
        "run",
        &format!("--block:storage={disk}"),
        "--block-sector-size:storage=4096",
        &img,
    ]);
    assert_error(&r, "is 4608 bytes, not a whole number of 4096-byte sectors");
    let empty = dir.file("empty.img", b"").display().to_string();
    let r = tt(&["run", &format!("--block:storage={empty}"), &img]);
    assert_error(&r, "is empty");
    let r = tt(&["run", "--block:storage=/nonexistent/disk.img", &img]);
    assert_error(&r, "cannot open /nonexistent/disk.img");
}

#[test]
fn bad_images_are_named() {
    let dir = Scratch::new("cli");
    let not_elf = dir
        .file("text.hvt", b"#!/bin/sh\necho hi\n")
        .display()
        .to_string();
    assert_error(&tt(&["run", &not_elf]), "not an ELF file");
    let good = Synth::default().build();
    let trunc = dir.file("trunc.hvt", &good[..100]).display().to_string();
    assert_error(&tt(&["run", &trunc]), "truncated ELF");
    let no_abi = Synth {
        with_abi_note: false,
        ..Synth::default()
    };
    let p = dir.file("noabi.hvt", &no_abi.build()).display().to_string();
    assert_error(&tt(&["run", &p]), "missing Solo5 ABI note");
    let spt = Synth {
        abi_target: 2,
        ..Synth::default()
    };
    let p = dir.file("spt.hvt", &spt.build()).display().to_string();
    assert_error(&tt(&["run", &p]), "not hvt");
    let no_mft = Synth {
        with_manifest: false,
        ..Synth::default()
    };
    let p = dir.file("nomft.hvt", &no_mft.build()).display().to_string();
    assert_error(&tt(&["run", &p]), "missing Solo5 manifest note");
    let mut d = Synth::default().manifest_desc();
    d[4] = 2;
    let p = dir
        .file(
            "badmft.hvt",
            &Synth::default().build_with(Synth::default().abi_desc(), d),
        )
        .display()
        .to_string();
    assert_error(&tt(&["run", &p]), "bad Solo5 manifest: manifest version 2");
    assert_error(
        &tt(&["run", "/nonexistent.hvt"]),
        "cannot read image /nonexistent.hvt",
    );
}

#[test]
fn bad_options_are_named() {
    assert_error(&tt(&["run", "--mem=0", "x.hvt"]), "--mem=0");
    assert_error(&tt(&["run", "--frob", "x.hvt"]), "unknown option '--frob'");
    assert_error(&tt(&["run"]), "missing IMAGE");
    assert_error(&tt(&["frob"]), "unknown command 'frob'");
}
