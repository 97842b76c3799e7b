//! Command-line and image errors: each exits 1 with one line naming the
//! problem, before any guest runs.

use tt_host::abi::MFT_DEV_BLOCK_BASIC;
use tt_host::loader::synth::Synth;
use tt_tests::*;

fn blk_image(dir: &Scratch) -> String {
    let s = Synth {
        devices: vec![("storage".into(), MFT_DEV_BLOCK_BASIC)],
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
    // Solo5's tests.bats looks for solo5-hvt's own phrase.
    assert_error(&r, "Backing storage size must be block aligned");
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

/// Make a FIFO at `p` (opening it would block until a writer comes).
fn mkfifo(p: &std::path::Path) {
    let st = std::process::Command::new("mkfifo")
        .arg(p)
        .status()
        .expect("run mkfifo");
    assert!(st.success(), "mkfifo {} failed", p.display());
}

#[test]
fn non_utf8_argument_is_named() {
    use std::os::unix::ffi::OsStrExt;
    let r = tt_with(
        std::process::Command::new(tt_host())
            .args(["run", "--mem=8", "img.hvt", "--"])
            .arg(std::ffi::OsStr::from_bytes(b"\xff")),
    );
    assert_error(&r, r#"argument 5 ("\xFF") is not valid UTF-8"#);
}

#[test]
fn block_backing_must_be_a_file_or_block_device() {
    let dir = Scratch::new("cli");
    let img = blk_image(&dir);
    let state = format!("--state-dir={}", dir.path("state").display());
    let fifo = dir.path("fifo");
    mkfifo(&fifo);
    let sub = dir.path("sub");
    std::fs::create_dir(&sub).unwrap();
    for (p, what) in [
        (fifo.as_path(), "a FIFO"),
        (sub.as_path(), "a directory"),
        (std::path::Path::new("/dev/null"), "a character device"),
    ] {
        let r = tt(&[
            "run",
            &state,
            &format!("--block:storage={}", p.display()),
            &img,
        ]);
        assert_error(
            &r,
            &format!(
                "block device 'storage': cannot open {}: {what}, not a regular file or block device",
                p.display()
            ),
        );
    }
}

#[test]
fn image_must_be_a_regular_file_no_larger_than_guest_memory() {
    let dir = Scratch::new("cli");
    let fifo = dir.path("fifo.hvt");
    mkfifo(&fifo);
    let fifo = fifo.display().to_string();
    assert_error(
        &tt(&["run", &fifo]),
        &format!("cannot read image {fifo}: not a regular file"),
    );
    assert_error(
        &tt(&["run", "/dev/zero"]),
        "cannot read image /dev/zero: not a regular file",
    );
    // A sparse file past the largest guest memory (4 GiB) is refused by
    // its header (tests/inputs.rs checks the size bound and the RSS).
    let big = dir.path("big.hvt");
    std::fs::File::create(&big)
        .unwrap()
        .set_len((4 << 30) + 1)
        .unwrap();
    let big = big.display().to_string();
    assert_error(
        &tt(&["run", &big]),
        &format!("{big}: not an ELF file (bad magic)"),
    );
}

#[test]
fn policy_state_dir_must_not_be_empty() {
    let dir = Scratch::new("cli");
    for args in [
        &["policy", "show", "--state-dir="][..],
        &["policy", "show", "--state-dir"][..],
        &["policy", "set", ":", "--unikernels=3", "--state-dir="][..],
        &["policy", "remove", ":", "--state-dir="][..],
    ] {
        let r = tt_with(
            std::process::Command::new(tt_host())
                .args(args)
                .current_dir(&dir.0),
        );
        assert_error(&r, "--state-dir needs a directory");
        let left: Vec<_> = std::fs::read_dir(&dir.0).unwrap().collect();
        assert!(
            left.is_empty(),
            "{args:?} wrote to the current directory: {left:?}"
        );
    }
}

#[test]
fn policy_bridges_must_not_be_empty_names() {
    let dir = Scratch::new("cli");
    let state = format!("--state-dir={}", dir.path("state").display());
    for list in ["br0,,", ",br0", "br0, ,br1", ","] {
        let r = tt(&["policy", "set", ":", "--bridges", list, &state]);
        assert_error(
            &r,
            &format!("--bridges={list}: empty bridge name in the list"),
        );
    }
    let show = tt(&["policy", "show", &state]);
    assert_eq!(show.status, 0, "{show:?}");
    assert!(
        !show.stdout.contains("br0"),
        "a bad list was stored: {show:?}"
    );
    let r = tt(&["policy", "set", ":", "--bridges", " br0 ,br1", &state]);
    assert_eq!(r.status, 0, "{r:?}");
}

#[test]
fn errors_point_to_the_commands_own_help() {
    let dir = Scratch::new("cli");
    let state = format!("--state-dir={}", dir.path("state").display());
    for args in [
        &["policy"][..],
        &["policy", "set"][..],
        &["policy", "set", ":", "--mem=lots"][..],
        &["policy", "show", "--frob"][..],
        &["policy", "frob", ":"][..],
    ] {
        let mut a = args.to_vec();
        a.push(&state);
        let r = tt(&a);
        assert_error(&r, "(see 'tt-host policy --help')");
        assert_eq!(r.stderr.matches("--help").count(), 1, "{args:?}: {r:?}");
    }
    let r = tt(&["run", "--mem=0", "x.hvt"]);
    assert_error(&r, "(see 'tt-host run --help')");
    assert_eq!(r.stderr.matches("--help").count(), 1, "{r:?}");
}

/// Options that take one value are refused when given twice, as device
/// options are; the last spelling does not silently win.
#[test]
fn single_value_options_given_twice_are_refused() {
    for (a, b, name) in [
        ("--mem=64", "--mem=128", "--mem"),
        ("--name=web", "--name=db", "--name"),
        ("--cpu=0", "--cpu=1", "--cpu"),
        ("--state-dir=/a", "--state-dir=/b", "--state-dir"),
        ("--cpl=0", "--cpl=3", "--cpl"),
    ] {
        let r = tt(&["run", a, b, "x.hvt"]);
        assert_error(&r, &format!("{name} given twice"));
    }
}

/// A number is digits: `+64` is not one (Rust's parser takes it), in
/// `run` options, device options and policies alike.
#[test]
fn numbers_with_a_sign_are_refused() {
    for (args, needle) in [
        (
            &["run", "--mem=+64", "x.hvt"][..],
            "--mem=+64: expected a size",
        ),
        (
            &["run", "--cpu=+0", "x.hvt"][..],
            "--cpu=+0: expected a host CPU",
        ),
        (
            &["run", "--block-sector-size:d=+512", "x.hvt"][..],
            "--block-sector-size:d=+512: not a number",
        ),
        (
            &["policy", "set", ":", "--mem=+1"][..],
            "--mem=+1: not a size",
        ),
        (
            &["policy", "set", ":", "--cpus=+1"][..],
            "'+1' is not a CPU number",
        ),
        (
            &["policy", "set", ":", "--unikernels=+1"][..],
            "not a count",
        ),
    ] {
        assert_error(&tt(args), needle);
    }
}

/// Error messages quote at most about 100 characters of what was typed.
#[test]
fn long_input_is_quoted_short() {
    let long = "9".repeat(5000);
    for args in [
        vec!["run".to_string(), format!("--mem={long}"), "x.hvt".into()],
        vec!["run".to_string(), format!("--{long}"), "x.hvt".into()],
        vec!["run".to_string(), format!("--name={long}"), "x.hvt".into()],
        vec![long.clone()],
        vec![
            "policy".into(),
            "set".into(),
            ":".into(),
            format!("--mem={long}"),
        ],
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let r = tt(&args);
        assert_eq!(r.status, 1, "{args:?}");
        assert!(
            r.stderr.len() < 400,
            "{} bytes: {}",
            r.stderr.len(),
            r.stderr
        );
        assert!(r.stderr.contains("more characters)"), "{}", r.stderr);
    }
}

#[test]
fn a_device_option_with_a_colon_in_the_name_asks_for_name_and_path() {
    for a in ["--block::", "--block::=x", "--block:a:b=x"] {
        assert_error(&tt(&["run", a, "x.hvt"]), "--block:NAME=PATH|@FD expected");
    }
}
