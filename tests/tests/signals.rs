//! SIGTERM (how albatross stops a unikernel) and SIGINT (Ctrl-C) stop a
//! running guest as solo5-hvt does: exit status 1 and a one-line message
//! naming the signal, after the devices shut down as on a halt. Both a
//! guest asleep in POLL (the host in `ppoll`) and one spinning at CPL 3
//! (the host in `KVM_RUN`, no exits) are stopped.

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;
use tt_tests::*;

/// Run the `time` example in `mode` until it prints `ready`, send it
/// `signal` (named `name`), and return how tt-host ended.
fn stop_with(mode: &str, ready: &str, signal: libc::c_int, name: &str) -> Run {
    let mut child = Command::new(tt_host())
        .env("TT_HOST_STATE_DIR", state_dir())
        .args(["run", "--mem=16"])
        .arg(guest("time"))
        .arg(mode)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tt-host");
    let pid = child.id();
    let kill9 = |why: &str| -> ! {
        kill(pid, libc::SIGKILL);
        panic!("{why}");
    };
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line.clone());
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    loop {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) if line.contains(ready) => break,
            Ok(_) => {}
            Err(_) => kill9(&format!("the guest never printed {ready:?}")),
        }
    }
    assert!(kill(pid, signal), "kill -{signal} {pid}");
    let (done_tx, done_rx) = mpsc::channel();
    let mut stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        let mut err = String::new();
        let _ = stderr.read_to_string(&mut err);
        let _ = done_tx.send((child.wait(), err));
    });
    let (status, stderr) = match done_rx.recv_timeout(Duration::from_secs(30)) {
        Ok((status, stderr)) => (status.expect("wait for tt-host"), stderr),
        Err(_) => kill9(&format!("tt-host did not stop within 30 s of SIG{name}")),
    };
    Run {
        status: status.code().unwrap_or(-1),
        stdout: reader.join().unwrap(),
        stderr,
    }
}

#[test]
fn sigterm_stops_a_guest_asleep_in_poll() {
    if !kvm() {
        return;
    }
    let r = stop_with("sleep-forever", "time: sleeping", libc::SIGTERM, "TERM");
    assert_error(&r, "exiting on signal 15 (SIGTERM)");
}

#[test]
fn sigint_stops_a_guest_asleep_in_poll() {
    if !kvm() {
        return;
    }
    let r = stop_with("sleep-forever", "time: sleeping", libc::SIGINT, "INT");
    assert_error(&r, "exiting on signal 2 (SIGINT)");
}

#[test]
fn sigterm_stops_a_guest_spinning_without_exits() {
    if !kvm() {
        return;
    }
    let r = stop_with("spin-forever", "time: spinning", libc::SIGTERM, "TERM");
    assert_error(&r, "exiting on signal 15 (SIGTERM)");
}
