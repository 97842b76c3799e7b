//! The sandbox (issue 17): once the VM is built, tt-host runs under a
//! seccomp allowlist, and a system call outside it kills the process by
//! SIGSYS (status 159 in a shell). `--no-seccomp` turns the filter off.
//!
//! The test-only hook `TT_HOST_TEST_SECCOMP_PROBE=1` makes tt-host call
//! `socket()` right after entering the sandbox, as a compromised VMM
//! would. That every real guest still runs under the filter is what the
//! rest of the suite shows: the filter is on by default.

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;
use tt_tests::*;

/// Run the hello guest with `extra` options and the probe set; return how
/// tt-host ended. Killed after 60 s.
fn probed(extra: &[&str]) -> Output {
    let mut cmd = Command::new(tt_host());
    cmd.env("TT_HOST_STATE_DIR", state_dir())
        .env("TT_HOST_TEST_SECCOMP_PROBE", "1")
        .args(["run", "--mem=16"])
        .args(extra)
        .arg(guest("hello"))
        .args(["--", "probed"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().expect("spawn tt-host");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output()));
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(out) => out.expect("wait for tt-host"),
        Err(_) => {
            kill(pid, libc::SIGKILL);
            panic!("tt-host {cmd:?} did not finish within 60 s");
        }
    }
}

#[test]
fn a_forbidden_call_after_setup_kills_tt_host_by_sigsys() {
    if !kvm() {
        return;
    }
    let out = probed(&[]);
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGSYS),
        "tt-host should die by SIGSYS: {out:?}"
    );
    // Killed before the guest ran: it printed nothing.
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("Hello"),
        "{out:?}"
    );
}

#[test]
fn with_no_seccomp_the_same_call_is_allowed_and_the_guest_runs() {
    if !kvm() {
        return;
    }
    let out = probed(&["--no-seccomp"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("arg[1]: probed"), "{out:?}");
}

#[test]
fn a_guest_runs_to_its_exit_status_under_the_filter() {
    if !kvm() {
        return;
    }
    let r = tt(&[
        "run",
        "--mem=16",
        &guest("hello").display().to_string(),
        "exit=7",
    ]);
    assert_eq!(r.status, 7, "{r:?}");
    assert!(r.stdout.contains("Hello, world"), "{r:?}");
}
