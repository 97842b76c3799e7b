//! The net example answers ARP and ICMP echo on a TAP device.
//!
//! Everything happens inside a network namespace each test creates
//! (tt_tests::netns, system calls only): the TAP device, the host address
//! 10.0.0.1/24, the guest (10.0.0.2) and the pings, which the test sends
//! itself from a raw socket. No traffic leaves that namespace, which the
//! kernel deletes with its TAPs when the test ends, passed or failed.

use std::io::{BufRead, BufReader, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tt_tests::netns::{inherit_fd, Netns, Ping};
use tt_tests::*;

const HOST: [u8; 4] = [10, 0, 0, 1];
const GUEST: [u8; 4] = [10, 0, 0, 2];
/// IPv4 and ICMP headers: an echo of MTU - 28 payload bytes fills a
/// frame of MTU + 14.
const IP_ICMP: usize = 28;

/// A namespace holding TAP `tap0` (MTU `mtu`, up) at 10.0.0.1/24.
fn with_tap(mtu: u32) -> Netns {
    let ns = Netns::new();
    ns.add_tap("tap0");
    configure(&ns, "tap0", mtu);
    ns
}

/// Give `tap` MTU `mtu` and 10.0.0.1/24, and bring it up.
fn configure(ns: &Netns, tap: &str, mtu: u32) {
    ns.set_mtu(tap, mtu);
    ns.set_addr(tap, HOST, 24);
    ns.set_up(tap, true);
}

/// The net guest as 10.0.0.2 with `--net:service0=NET` and MAC `mac`,
/// exiting 0 after answering `limit` echo requests, inside `ns`.
fn guest_cmd(ns: &Netns, net: &str, mac: &str, limit: u32) -> Command {
    let mut cmd = ns.command(tt_host());
    cmd.args([
        "run",
        "--mem=32",
        &format!("--net:service0={net}"),
        &format!("--net-mac:service0={mac}"),
        guest("net").to_str().unwrap(),
        "--",
        "10.0.0.2",
        &format!("limit={limit}"),
    ]);
    cmd
}

/// A running tt-host, killed if the test ends before it does.
struct Guest {
    child: Option<Child>,
    lines: mpsc::Receiver<String>,
    stdout: Option<JoinHandle<String>>,
    stderr: Option<JoinHandle<String>>,
}

impl Guest {
    fn spawn(mut cmd: Command) -> Guest {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tt-host");
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        let stdout = std::thread::spawn(move || {
            let mut all = String::new();
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line.clone());
                all.push_str(&line);
                all.push('\n');
            }
            all
        });
        let mut err = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut all = String::new();
            let _ = err.read_to_string(&mut all);
            all
        });
        Guest {
            child: Some(child),
            lines,
            stdout: Some(stdout),
            stderr: Some(stderr),
        }
    }

    /// Wait until the guest says `net: ready` (it reads its device from
    /// then on); false if it ended first or took over 60 s.
    fn ready(&self) -> bool {
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains("net: ready") => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    }

    /// Wait for tt-host to exit by itself; one that does not must not
    /// hang the suite (killed after 30 s).
    fn wait(mut self) -> Run {
        let mut child = self.child.take().unwrap();
        let pid = child.id();
        let (tx, rx) = mpsc::channel();
        let waiter = std::thread::spawn(move || tx.send(child.wait()));
        let status = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(st) => st,
            Err(_) => {
                kill(pid, libc::SIGKILL);
                rx.recv().unwrap()
            }
        };
        let _ = waiter.join();
        Run {
            status: status.unwrap().code().unwrap_or(-1),
            stdout: self.stdout.take().unwrap().join().unwrap(),
            stderr: self.stderr.take().unwrap().join().unwrap(),
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill(c.id(), libc::SIGKILL);
            let _ = c.wait();
        }
    }
}

/// Start the net guest on tap0 (MAC 02:00:00:00:00:02) in `ns`.
fn guest_on_tap0(ns: &Netns, limit: u32) -> Guest {
    Guest::spawn(guest_cmd(ns, "tap0", "02:00:00:00:00:02", limit))
}

/// Wait for the guest, then ping it until it answers once: it is up.
/// (Pinging only once it is ready keeps requests from piling up in the
/// TAP and being answered later, which its `limit` would count.)
fn answered_once(ns: &Netns, g: &Guest) -> bool {
    g.ready()
        && ns
            .pinger()
            .ping(GUEST, Ping::until_answered(1, 56, Duration::from_secs(1)))
            .received
            == 1
}

#[test]
fn net_guest_answers_ping_inside_a_namespace() {
    if !kvm() {
        return;
    }
    let ns = with_tap(1500);
    let g = guest_on_tap0(&ns, 3);
    let ready = g.ready();
    let echoes = ns.pinger().ping(
        GUEST,
        Ping::until_answered(3, 56, Duration::from_millis(200)),
    );
    let r = g.wait();
    assert!(ready && echoes.received == 3, "{echoes:?}, guest: {r:?}");
    assert_eq!(
        r.status, 0,
        "guest should exit 0 after 3 echo replies: {r:?}"
    );
    assert!(r.stdout.contains(" mtu=1500 "), "{r:?}");
}

/// The guest's MTU is the TAP's (as solo5-hvt reports it): 9000 on a
/// TAP whose MTU is 9000, and jumbo frames of MTU + 14 = 9014 bytes pass
/// both ways (the host's echo request and the guest's reply, each one
/// frame). tt-host used to report 1500 and drop them.
#[test]
fn a_9000_mtu_tap_gives_the_guest_mtu_9000_and_jumbo_frames_pass() {
    if !kvm() {
        return;
    }
    let ns = with_tap(9000);
    let g = guest_on_tap0(&ns, 3);
    assert!(answered_once(&ns, &g), "the guest never answered");
    let jumbo = ns.pinger().ping(
        GUEST,
        Ping::exactly(2, 9000 - IP_ICMP, Duration::from_secs(5)),
    );
    let r = g.wait();
    assert!(r.stdout.contains(" mtu=9000 "), "{r:?}");
    assert_eq!(jumbo.received, 2, "jumbo echoes: {jumbo:?}, guest: {r:?}");
    assert_eq!(r.status, 0, "{r:?}");
    assert!(!r.stderr.contains("dropped"), "{r:?}");
}

/// A frame longer than the guest's MTU + 14 (here the TAP's MTU is
/// raised from 1500 to 9000 under the running guest) is dropped and
/// reported once, not handed to the guest cut to its buffer as if
/// whole; frames that fit still get through.
#[test]
fn frames_longer_than_the_guest_mtu_are_dropped_not_cut() {
    if !kvm() {
        return;
    }
    let ns = with_tap(1500);
    let g = guest_on_tap0(&ns, 3);
    assert!(answered_once(&ns, &g), "the guest never answered");
    ns.set_mtu("tap0", 9000);
    let mut pinger = ns.pinger();
    let big = pinger.ping(GUEST, Ping::exactly(2, 4000, Duration::from_secs(1)));
    let after = pinger.ping(GUEST, Ping::exactly(2, 56, Duration::from_secs(5)));
    let r = g.wait();
    assert!(r.stdout.contains(" mtu=1500 "), "{r:?}");
    assert_eq!(big.received, 0, "a 4042-byte frame got an answer: {r:?}");
    assert_eq!(after.received, 2, "pings after the big frames: {r:?}");
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
    let ns = with_tap(1500);
    let g = guest_on_tap0(&ns, 1000);
    assert!(answered_once(&ns, &g), "the guest never answered");
    ns.delete_link("tap0");
    let r = g.wait();
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
#[track_caller]
fn assert_refused(r: &Run, msg: &str) {
    assert_eq!(r.status, 1, "{r:?}");
    assert!(
        r.stderr.contains("net device 'service0'") && r.stderr.contains(msg),
        "expected an error containing {msg:?}: {r:?}"
    );
    assert_eq!(r.stderr.trim().lines().count(), 1, "one line: {r:?}");
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
    let ns = with_tap(1500);
    ns.set_up("tap0", false);
    let r = guest_on_tap0(&ns, 1).wait();
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
    let ns = with_tap(1500);
    let first = guest_on_tap0(&ns, 2);
    assert!(answered_once(&ns, &first), "the guest never answered");
    let second = guest_on_tap0(&ns, 1).wait();
    assert_refused(&second, "TAP interface 'tap0' is already in use");
    let again = ns
        .pinger()
        .ping(GUEST, Ping::exactly(1, 56, Duration::from_secs(5)));
    let r = first.wait();
    assert_eq!(again.received, 1, "first guest lost its TAP: {r:?}");
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
    let ns = with_tap(1500);
    ns.add_tun("tun0");
    ns.set_up("tun0", true);
    let r = Guest::spawn(guest_cmd(&ns, "tun0", "02:00:00:00:00:02", 1)).wait();
    assert_refused(&r, "interface 'tun0' is not a single-queue TAP");
}

/// `--net-mac` as solo5-hvt reads it: one hex digit per byte will do,
/// and all zeros means "make one up" (a random local unicast address).
#[test]
fn net_mac_takes_solo5_forms() {
    if !kvm() {
        return;
    }
    let ns = with_tap(1500);
    let short = Guest::spawn(guest_cmd(&ns, "tap0", "2:0:0:0:a:2", 1));
    let answered = answered_once(&ns, &short);
    let r = short.wait();
    assert!(
        r.stdout.contains("net: service0 mac=02:00:00:00:0a:02 "),
        "{r:?}"
    );
    assert!(answered, "{r:?}");
    assert_eq!(r.status, 0, "{r:?}");

    // The next guest has another MAC at the same address.
    ns.forget_neighbour("tap0", GUEST);
    let zeros = Guest::spawn(guest_cmd(&ns, "tap0", "00:00:00:00:00:00", 1));
    let answered = answered_once(&ns, &zeros);
    let r = zeros.wait();
    assert!(answered, "{r:?}");
    assert_eq!(r.status, 0, "{r:?}");
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

/// The net guest on `--net:service0=@FD`, with `tap` (which the test
/// holds) inherited as FD.
fn guest_on_fd(ns: &Netns, tap: &OwnedFd, limit: u32) -> Guest {
    let fd = tap.as_raw_fd();
    let mut cmd = guest_cmd(ns, &format!("@{fd}"), "02:00:00:00:00:02", limit);
    inherit_fd(&mut cmd, fd);
    Guest::spawn(cmd)
}

/// `--net:NAME=@FD`, as solo5-hvt takes it from launchers that open the
/// TAP themselves (urunc): tt-host attaches the TAP the inherited
/// descriptor holds, gives the guest that TAP's MTU, and frames of MTU +
/// 14 bytes pass both ways. (solo5-hvt fails here: "Could not attach
/// interface: @5: Success".)
#[test]
fn a_tap_passed_as_a_descriptor_is_attached_with_its_mtu() {
    if !kvm() {
        return;
    }
    for mtu in [1500, 9000] {
        let ns = Netns::new();
        let tap = ns.open_tap("tap0", libc::IFF_TAP | libc::IFF_NO_PI);
        configure(&ns, "tap0", mtu);
        let g = guest_on_fd(&ns, &tap, 3);
        assert!(
            answered_once(&ns, &g),
            "MTU {mtu}: the guest never answered"
        );
        let full = ns.pinger().ping(
            GUEST,
            Ping::exactly(2, mtu as usize - IP_ICMP, Duration::from_secs(5)),
        );
        let r = g.wait();
        assert!(r.stdout.contains(&format!(" mtu={mtu} ")), "{r:?}");
        assert_eq!(full.received, 2, "MTU {mtu}: {full:?}, guest: {r:?}");
        assert_eq!(r.status, 0, "{r:?}");
    }
}

/// `--net:NAME=@FD` refuses, naming the device and the descriptor, what
/// is not a usable TAP: a closed descriptor, a file, a TUN, a TAP opened
/// without IFF_NO_PI, and a TAP that is down.
#[test]
fn a_descriptor_that_is_not_a_usable_tap_is_refused() {
    if !kvm() {
        return;
    }
    let ns = with_tap(1500);
    let run = |net: &str, fd: Option<&OwnedFd>| {
        let mut cmd = guest_cmd(&ns, net, "02:00:00:00:00:02", 1);
        if let Some(fd) = fd {
            inherit_fd(&mut cmd, fd.as_raw_fd());
        }
        Guest::spawn(cmd).wait()
    };
    let r = run("@999", None);
    assert_refused(&r, "file descriptor 999 is not open");

    let file: OwnedFd = std::fs::File::open(tt_host()).unwrap().into();
    let r = run(&format!("@{}", file.as_raw_fd()), Some(&file));
    assert_refused(&r, "is not a TAP device");

    let tun = ns.open_tap("tun1", libc::IFF_TUN | libc::IFF_NO_PI);
    ns.set_up("tun1", true);
    let r = run(&format!("@{}", tun.as_raw_fd()), Some(&tun));
    assert_refused(&r, "attached to 'tun1', which is a TUN");

    let pi = ns.open_tap("tap1", libc::IFF_TAP);
    ns.set_up("tap1", true);
    let r = run(&format!("@{}", pi.as_raw_fd()), Some(&pi));
    assert_refused(&r, "without IFF_NO_PI");

    let down = ns.open_tap("tap2", libc::IFF_TAP | libc::IFF_NO_PI);
    let r = run(&format!("@{}", down.as_raw_fd()), Some(&down));
    assert_refused(&r, "TAP interface 'tap2' is down");

    let r = run("@x1", None);
    assert_refused(&r, "'@x1' is not a file descriptor");
}

/// A launcher may open the TAP in another network namespace than the one
/// it runs tt-host in; tt-host reads the MTU of the TAP its descriptor
/// holds, not of an interface of the same name in its own namespace.
/// (Here both are `tap0`: the descriptor's has MTU 9000, tt-host's 1500.)
#[test]
fn a_descriptor_s_mtu_is_read_in_the_tap_s_own_namespace() {
    if !kvm() {
        return;
    }
    let theirs = Netns::new();
    let tap = theirs.open_tap("tap0", libc::IFF_TAP | libc::IFF_NO_PI);
    configure(&theirs, "tap0", 9000);
    // tt-host runs here, beside another tap0 (so that admission, which
    // knows interfaces by name, finds one).
    let ours = with_tap(1500);
    let g = guest_on_fd(&ours, &tap, 1);
    let answered = answered_once(&theirs, &g);
    let r = g.wait();
    assert!(r.stdout.contains(" mtu=9000 "), "{r:?}");
    assert!(answered, "{r:?}");
    assert_eq!(r.status, 0, "{r:?}");
}
