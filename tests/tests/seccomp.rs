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

/// The capability sets of every thread of a running tt-host (from
/// /proc), read once the guest has printed `ready`.
fn capabilities_while_running(extra: &[&str]) -> Vec<(String, String)> {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(tt_host())
        .env("TT_HOST_STATE_DIR", state_dir())
        .args(["run", "--mem=16"])
        .args(extra)
        .arg(guest("time"))
        .arg("sleep-forever")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn tt-host");
    let pid = child.id();
    // Killed whatever happens below.
    struct Kill(u32);
    impl Drop for Kill {
        fn drop(&mut self) {
            kill(self.0, libc::SIGKILL);
        }
    }
    let _guard = Kill(pid);
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    loop {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) if line.contains("time: sleeping") => break,
            Ok(_) => {}
            Err(_) => panic!("the guest never said it was sleeping"),
        }
    }
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        for l in status.lines() {
            if l.starts_with("CapEff:") || l.starts_with("CapPrm:") {
                out.push((comm.trim().to_string(), l.to_string()));
            }
        }
    }
    kill(pid, libc::SIGTERM);
    let _ = child.wait();
    out
}

/// In the sandbox no thread of tt-host keeps a capability (root's
/// CAP_DAC_OVERRIDE, CAP_NET_ADMIN, ...: capabilities are per thread, so
/// each thread drops its own); it keeps root's user id for its own
/// files. With `--no-seccomp` they stay.
#[test]
fn no_thread_keeps_a_capability_in_the_sandbox() {
    if !kvm() {
        return;
    }
    let caps = capabilities_while_running(&[]);
    assert!(caps.len() >= 2, "{caps:?}");
    for (thread, line) in &caps {
        assert!(line.ends_with("0000000000000000"), "{thread}: {line}");
    }
    let caps = capabilities_while_running(&["--no-seccomp"]);
    assert!(
        caps.iter().any(|(_, l)| !l.ends_with("0000000000000000")),
        "tests run as root: without the sandbox tt-host keeps root's capabilities: {caps:?}"
    );
}
