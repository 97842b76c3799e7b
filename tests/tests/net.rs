//! The net example answers ARP and ICMP echo on a TAP device.
//!
//! Everything happens inside a network namespace this test creates: the TAP
//! device, the host address 10.0.0.1/24, the guest (10.0.0.2) and the pings.
//! No traffic leaves that namespace.

use std::process::{Command, Stdio};
use tt_tests::*;

/// A network namespace, deleted (with its TAP device) when dropped.
struct Netns(String);

impl Netns {
    fn new() -> Netns {
        let name = format!("tt-test-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
        let ns = Netns(name);
        ns.ip(&["netns", "add", &ns.0], false);
        ns
    }
    fn ip(&self, args: &[&str], inside: bool) {
        let mut cmd = Command::new("ip");
        if inside {
            cmd.args(["netns", "exec", &self.0, "ip"]);
        }
        let out = cmd.args(args).output().expect("run ip (install iproute2)");
        assert!(
            out.status.success(),
            "ip {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    fn exec(&self, prog: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.0, prog]);
        cmd
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn net_guest_answers_ping_inside_a_namespace() {
    if !kvm() {
        return;
    }
    let image = guest("net");
    let ns = Netns::new();
    ns.ip(&["tuntap", "add", "tap0", "mode", "tap"], true);
    ns.ip(&["link", "set", "lo", "up"], true);
    ns.ip(&["link", "set", "tap0", "up"], true);
    ns.ip(&["addr", "add", "10.0.0.1/24", "dev", "tap0"], true);

    let guest = ns
        .exec(tt_host().to_str().unwrap())
        .args([
            "run",
            "--mem=32",
            "--net:service0=tap0",
            "--net-mac:service0=02:00:00:00:00:02",
            image.to_str().unwrap(),
            "--",
            "10.0.0.2",
            "limit=3",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // `-w`: keep sending until 3 echo requests are answered (the guest may
    // still be booting when the first one goes out; tt-host admits it
    // first, which takes a few synced writes), for at most 20 s.
    let ping = ns
        .exec("ping")
        .args(["-c", "3", "-i", "0.2", "-W", "5", "-w", "20", "10.0.0.2"])
        .output()
        .expect("run ping (install iputils-ping)");
    let ping_out = String::from_utf8_lossy(&ping.stdout).into_owned();

    // The guest exits by itself after answering 3 echo requests; a guest
    // that does not must not hang the suite.
    let pid = guest.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(guest.wait_with_output()));
    let r: Run = match rx.recv_timeout(std::time::Duration::from_secs(30)) {
        Ok(out) => out.unwrap().into(),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            rx.recv().unwrap().unwrap().into()
        }
    };
    assert!(
        ping.status.success() && ping_out.contains("3 received"),
        "ping failed:\n{ping_out}\n{}\nguest: {r:?}",
        String::from_utf8_lossy(&ping.stderr)
    );
    assert_eq!(
        r.status, 0,
        "guest should exit 0 after 3 echo replies: {r:?}"
    );
}

#[test]
fn missing_tap_is_a_clear_error() {
    if !kvm() {
        return;
    }
    let image = guest("net");
    let r = tt(&[
        "run",
        "--net:service0=tt-no-such-tap",
        image.to_str().unwrap(),
    ]);
    assert_error(&r, "TAP interface 'tt-no-such-tap' does not exist");
}
