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
    fn new(tag: &str) -> Netns {
        let name = format!("tt-test-{tag}-{}", std::process::id());
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

    /// A namespace holding TAP `tap0` (MTU `mtu`) at 10.0.0.1/24.
    fn with_tap(tag: &str, mtu: u32) -> Netns {
        let ns = Netns::new(tag);
        ns.ip(&["tuntap", "add", "tap0", "mode", "tap"], true);
        ns.ip(&["link", "set", "tap0", "mtu", &mtu.to_string()], true);
        ns.ip(&["link", "set", "lo", "up"], true);
        ns.ip(&["link", "set", "tap0", "up"], true);
        ns.ip(&["addr", "add", "10.0.0.1/24", "dev", "tap0"], true);
        ns
    }

    /// Start the net guest on tap0 as 10.0.0.2; it exits 0 after
    /// answering `limit` echo requests.
    fn guest(&self, limit: u32) -> std::process::Child {
        self.guest_on("tap0", "02:00:00:00:00:02", limit)
    }

    /// Start the net guest on interface `tap` with MAC `mac` as 10.0.0.2.
    fn guest_on(&self, tap: &str, mac: &str, limit: u32) -> std::process::Child {
        self.exec(tt_host().to_str().unwrap())
            .args([
                "run",
                "--mem=32",
                &format!("--net:service0={tap}"),
                &format!("--net-mac:service0={mac}"),
                guest("net").to_str().unwrap(),
                "--",
                "10.0.0.2",
                &format!("limit={limit}"),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// Ping the guest with `args`; its output.
    fn ping(&self, args: &[&str]) -> std::process::Output {
        self.exec("ping")
            .args(args)
            .arg("10.0.0.2")
            .output()
            .expect("run ping (install iputils-ping)")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Wait for the guest to exit by itself; one that does not must not hang
/// the suite (killed after 30 s).
fn wait(guest: std::process::Child) -> Run {
    let pid = guest.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(guest.wait_with_output()));
    match rx.recv_timeout(std::time::Duration::from_secs(30)) {
        Ok(out) => out.unwrap().into(),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            rx.recv().unwrap().unwrap().into()
        }
    }
}

// `-w`: keep sending until 3 echo requests are answered (the guest may
// still be booting when the first one goes out; tt-host admits it first,
// which takes a few synced writes), for at most 20 s.
const PING3: &[&str] = &["-c", "3", "-i", "0.2", "-W", "5", "-w", "20"];
/// The same for one answer.
const PING1: &[&str] = &["-c", "1", "-W", "5", "-w", "20"];

#[test]
fn net_guest_answers_ping_inside_a_namespace() {
    if !kvm() {
        return;
    }
    let ns = Netns::with_tap("ping", 1500);
    let guest = ns.guest(3);
    let ping = ns.ping(PING3);
    let ping_out = String::from_utf8_lossy(&ping.stdout).into_owned();
    let r = wait(guest);
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

/// A frame longer than the guest's MTU (here from a TAP whose MTU is
/// 9000) is dropped and reported once, not handed to the guest cut to
/// 1514 bytes as if whole; frames that fit still get through.
#[test]
fn frames_longer_than_the_guest_mtu_are_dropped_not_cut() {
    if !kvm() {
        return;
    }
    let ns = Netns::with_tap("jumbo", 9000);
    let guest = ns.guest(3);
    // Wait until the guest answers, then send it two 4,042-byte frames.
    let ready = ns.ping(&["-c", "1", "-W", "5", "-w", "20"]);
    assert!(ready.status.success(), "guest never answered: {ready:?}");
    let big = ns.ping(&[
        "-c", "2", "-i", "0.2", "-W", "1", "-s", "4000", "-M", "dont",
    ]);
    let big_out = String::from_utf8_lossy(&big.stdout).into_owned();
    let after = ns.ping(&["-c", "2", "-i", "0.2", "-W", "5"]);
    let r = wait(guest);
    assert!(
        big_out.contains(" 0 received"),
        "a jumbo frame got an answer: {big_out}"
    );
    assert!(
        after.status.success(),
        "pings after the jumbo frames failed: {after:?} {r:?}"
    );
    assert_eq!(r.status, 0, "{r:?}");
    assert_eq!(
        r.stderr.matches("dropped a 4042-byte frame").count(),
        1,
        "reported once: {r:?}"
    );
}

/// A TAP that fails under a running guest (here its interface is
/// deleted) is reported ready by poll, as by solo5-hvt, so a guest that
/// reads only what poll reports ready learns of it: its read fails. The
/// host names the device once. (Before, poll reported nothing ready and
/// returned at once, forever: the guest spun in poll.)
#[test]
fn a_tap_that_fails_under_the_guest_is_reported_ready_and_its_read_fails() {
    if !kvm() {
        return;
    }
    let ns = Netns::with_tap("gone", 1500);
    let guest = ns.guest(1000);
    let ready = ns.ping(&["-c", "1", "-W", "5", "-w", "20"]);
    assert!(ready.status.success(), "guest never answered: {ready:?}");
    ns.ip(&["link", "del", "tap0"], true);
    let r = wait(guest);
    assert!(r.stdout.contains("net: FAIL read"), "{r:?}");
    assert_eq!(r.status, 1, "{r:?}");
    assert_eq!(
        r.stderr
            .matches("net device 'service0': read failed")
            .count(),
        1,
        "reported once: {r:?}"
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

/// Assert that tt-host refused to start with one line naming the device
/// and containing `msg`.
fn assert_refused(r: &Run, msg: &str) {
    assert_eq!(r.status, 1, "{r:?}");
    assert!(
        r.stderr.contains("net device 'service0'") && r.stderr.contains(msg),
        "expected an error containing {msg:?}: {r:?}"
    );
    assert!(!r.stdout.contains("net: ready"), "the guest ran: {r:?}");
}

/// solo5-hvt's tap_attach refuses an interface that is not up
/// (ENETDOWN); so does tt-host, naming it. (Before, the guest started on
/// the down TAP, where its writes fail and nothing arrives.)
#[test]
fn a_tap_that_is_down_is_refused() {
    if !kvm() {
        return;
    }
    let ns = Netns::with_tap("down", 1500);
    ns.ip(&["link", "set", "tap0", "down"], true);
    let r = wait(ns.guest(1));
    assert_refused(&r, "TAP interface 'tap0' is down");
}

/// A TAP takes one user: a second tt-host on a TAP a running guest
/// holds is refused with a message saying so, and the first guest keeps
/// its network.
#[test]
fn a_tap_already_in_use_is_refused_and_its_guest_keeps_it() {
    if !kvm() {
        return;
    }
    let ns = Netns::with_tap("busy", 1500);
    let first = ns.guest(2);
    let ready = ns.ping(&["-c", "1", "-W", "5", "-w", "20"]);
    assert!(ready.status.success(), "guest never answered: {ready:?}");
    let second = wait(ns.guest(1));
    assert_refused(&second, "TAP interface 'tap0' is already in use");
    let again = ns.ping(&["-c", "1", "-W", "5"]);
    let r = wait(first);
    assert!(again.status.success(), "first guest lost its TAP: {r:?}");
    assert_eq!(r.status, 0, "{r:?}");
}

/// An interface that exists but is not a TAP (here a TUN device) is
/// refused as such, not with a bare "Invalid argument". (Admission
/// already refuses interfaces that are neither TUN/TAP nor bridges.)
#[test]
fn an_interface_that_is_not_a_tap_is_refused() {
    if !kvm() {
        return;
    }
    let ns = Netns::with_tap("nottap", 1500);
    ns.ip(&["tuntap", "add", "tun0", "mode", "tun"], true);
    ns.ip(&["link", "set", "tun0", "up"], true);
    let r = wait(ns.guest_on("tun0", "02:00:00:00:00:02", 1));
    assert_refused(&r, "interface 'tun0' is not a single-queue TAP");
}

/// `--net-mac` as solo5-hvt reads it: one hex digit per byte will do,
/// and all zeros means "make one up" (a random local unicast address).
#[test]
fn net_mac_takes_solo5_forms() {
    if !kvm() {
        return;
    }
    let ns = Netns::with_tap("mac", 1500);
    let short = ns.guest_on("tap0", "2:0:0:0:a:2", 1);
    let ping = ns.ping(PING1);
    let r = wait(short);
    assert!(
        r.stdout.contains("net: service0 mac=02:00:00:00:0a:02 "),
        "{r:?}"
    );
    assert!(ping.status.success(), "{ping:?} {r:?}");
    assert_eq!(r.status, 0, "{r:?}");

    ns.ip(&["neigh", "flush", "dev", "tap0"], true);
    let zeros = ns.guest_on("tap0", "00:00:00:00:00:00", 1);
    let ping = ns.ping(PING1);
    let r = wait(zeros);
    assert_eq!(r.status, 0, "{r:?} {ping:?}");
    let mac = r
        .stdout
        .split("net: service0 mac=")
        .nth(1)
        .and_then(|rest| rest.get(..17))
        .unwrap_or_else(|| panic!("no mac line: {r:?}"));
    assert_ne!(mac, "00:00:00:00:00:00", "{r:?}");
    let first = u8::from_str_radix(&mac[..2], 16).unwrap();
    assert_eq!(first & 0x03, 0x02, "local unicast: {mac}");
}
