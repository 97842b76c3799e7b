//! tt-host in solo5-hvt's place: launchers such as albatross execute a
//! tender named `solo5-hvt` (or `solo5-hvt.N`), check its `--version`
//! output for the image's ABI version, and pass solo5-hvt's options with
//! no `run` in front.

use std::process::Command;
use tt_tests::*;

/// A link named `name` to the tt-host binary, in `dir`.
fn link(dir: &Scratch, name: &str) -> std::path::PathBuf {
    let p = dir.path(name);
    std::os::unix::fs::symlink(tt_host(), &p).unwrap();
    p
}

/// albatross's test (src/vmm_unix.ml, `check_solo5_tender`): some line of
/// the output splits on spaces into exactly `ABI version 2`.
fn reports_abi_2(r: &Run) -> bool {
    r.stdout
        .lines()
        .chain(r.stderr.lines())
        .any(|l| l.split(' ').collect::<Vec<_>>() == ["ABI", "version", "2"])
}

#[test]
fn version_reports_the_abi_version_as_solo5_hvt_does() {
    let dir = Scratch::new("solo5");
    let hvt = link(&dir, "solo5-hvt.2");
    for r in [
        tt(&["--version"]),
        tt(&["run", "--version"]),
        tt_with(Command::new(&hvt).arg("--version")),
    ] {
        assert_eq!(r.status, 0, "{r:?}");
        assert!(reports_abi_2(&r), "no 'ABI version 2' line: {r:?}");
    }
}

#[test]
fn a_link_named_solo5_hvt_takes_solo5_hvts_command_line() {
    let dir = Scratch::new("solo5");
    let hvt = link(&dir, "solo5-hvt");
    let r = tt_with(Command::new(&hvt).args(["--mem=8", "--", "/nonexistent.hvt", "a"]));
    assert_error(&r, "cannot read image /nonexistent.hvt");
    assert_error(&tt_with(&mut Command::new(&hvt)), "missing IMAGE");
    let r = tt_with(Command::new(&hvt).args(["--frob", "x.hvt"]));
    assert_error(&r, "unknown option '--frob'");
    let r = tt_with(Command::new(&hvt).arg("--help"));
    assert_eq!(r.status, 0, "{r:?}");
    assert!(r.stdout.contains("--block:NAME=PATH"), "{r:?}");
}

/// solo5-hvt-debug's options are refused by name, not as unknown.
/// (`--net:NAME=@FD` is supported: tests/tests/net.rs.)
#[test]
fn unsupported_solo5_options_are_named() {
    for (opt, needle) in [
        ("--gdb", "'--gdb' is a solo5-hvt-debug option"),
        (
            "--dumpcore=/tmp",
            "'--dumpcore=/tmp' is a solo5-hvt-debug option",
        ),
    ] {
        assert_error(&tt(&["run", opt, "x.hvt"]), needle);
    }
}

/// The command line albatross builds (src/vmm_unix.ml, `exec`), given to
/// a link named as the tender albatross looks for first.
#[test]
fn albatross_command_line_boots_guests() {
    if !kvm() {
        return;
    }
    let dir = Scratch::new("solo5");
    let hvt = link(&dir, "solo5-hvt.2");
    let state = dir.path("state");
    let tender = |args: &[&str]| {
        tt_with(
            Command::new(&hvt)
                .args(args)
                .env("TT_HOST_STATE_DIR", &state),
        )
    };
    let hello = guest("hello").display().to_string();
    let r = tender(&["--mem=16", "--", &hello, "one", "--", "two"]);
    assert_eq!(r.status, 0, "{r:?}");
    for line in ["arg[1]: one", "arg[2]: --", "arg[3]: two"] {
        assert!(r.stdout.contains(line), "{line}: {r:?}");
    }
    let disk = dir.path("web.storage");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(64 * 4096)
        .unwrap();
    let r = tender(&[
        "--mem=32",
        &format!("--block:storage={}", disk.display()),
        "--block-sector-size:storage=4096",
        "--",
        &guest("blk").display().to_string(),
    ]);
    assert_eq!(r.status, 0, "{r:?}");
    assert!(
        r.stdout.contains("64 blocks of 4096 bytes verified"),
        "{r:?}"
    );
}
