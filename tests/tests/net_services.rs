//! The net example's services, seen from the host side of its TAP: UDP
//! echo, TCP echo, and the outgoing UDP probe, directly on the subnet and
//! through the gateway. These are what later tests build port forwards and
//! outgoing-traffic filtering on.
//!
//! As in net.rs, everything happens inside a network namespace each test
//! creates (tt_tests::netns): the TAP `tap0` at 10.0.0.1/24, the guest at
//! 10.0.0.2 with gw=10.0.0.1, and the test's own sockets, which are
//! opened inside it. No traffic leaves it; the kernel deletes it with its
//! TAP when the test ends, passed or failed, and the guest's tt-host is
//! killed when its guard drops.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tt_tests::guest_output::{Host, WAIT};
use tt_tests::netns::Netns;
use tt_tests::*;

const HOST: [u8; 4] = [10, 0, 0, 1];
/// An address of the namespace off the guest's subnet: reachable from the
/// guest only through its gateway (10.0.0.1, the namespace itself, which
/// owns the address and so answers for it).
const FAR: [u8; 4] = [192, 168, 77, 1];
/// How long an expected answer may take once the guest is ready: enough
/// for ARP both ways and a few probe intervals; only catches a failure.
const ANSWER: Duration = Duration::from_secs(5);

/// A namespace holding TAP `tap0` (up, MTU 1500) at 10.0.0.1/24.
fn namespace() -> Netns {
    let ns = Netns::new();
    ns.add_tap("tap0");
    ns.set_mtu("tap0", 1500);
    ns.set_addr("tap0", HOST, 24);
    ns.set_up("tap0", true);
    ns
}

/// The net guest as 10.0.0.2/24 with gateway 10.0.0.1 on tap0, given
/// `args` too; returns once it says `net: ready`.
fn start_guest(ns: &Netns, args: &[&str]) -> Host {
    let mut cmd = ns.command(tt_host());
    cmd.args([
        "run",
        "--mem=32",
        "--net:service0=tap0",
        "--net-mac:service0=02:00:00:00:00:02",
        guest("net").to_str().unwrap(),
        "--",
        "ip=10.0.0.2/24",
        "gw=10.0.0.1",
    ])
    .args(args);
    let mut g = Host::spawn(&mut cmd);
    wait_for(&mut g, "net: ready", WAIT);
    g
}

/// Read the guest's lines until one contains `needle`; panics, showing
/// them all, if none does within `within`.
fn wait_for(g: &mut Host, needle: &str, within: Duration) -> String {
    let end = Instant::now() + within;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match g.line_within(left) {
            Some(l) if l.contains(needle) => return l,
            Some(_) => {}
            None => panic!(
                "no {needle:?} within {within:?}; the guest said: {:#?}",
                g.arrived()
            ),
        }
    }
}

fn addr(ip: [u8; 4], port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

#[test]
fn udp_echo_sends_each_datagram_back_to_its_sender() {
    if !kvm() {
        return;
    }
    let ns = namespace();
    let mut g = start_guest(&ns, &["echo=7"]);
    let (got, from, local) = ns
        .run(|| {
            let s = UdpSocket::bind(addr(HOST, 0))?;
            s.set_read_timeout(Some(Duration::from_millis(500)))?;
            let mut buf = [0u8; 2048];
            // The first datagram waits for the kernel's ARP; send again
            // if one is lost anyway.
            let end = Instant::now() + ANSWER;
            loop {
                s.send_to(b"hello unikernel", addr([10, 0, 0, 2], 7))?;
                match s.recv_from(&mut buf) {
                    Ok((n, from)) => return Ok((buf[..n].to_vec(), from, s.local_addr()?)),
                    Err(e) if Instant::now() < end && is_timeout(&e) => {}
                    Err(e) => return Err(e),
                }
            }
        })
        .unwrap_or_else(|e| panic!("no UDP echo: {e}; the guest said: {:#?}", g.arrived()));
    assert_eq!(got, b"hello unikernel");
    assert_eq!(
        from,
        addr([10, 0, 0, 2], 7),
        "the echo comes from the port asked"
    );
    wait_for(
        &mut g,
        &format!("net: udp echo 1 to 10.0.0.1:{}", local.port()),
        ANSWER,
    );
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

/// One TCP echo exchange with the guest on `port`: connect, send `line`,
/// read it back, close our side and see the guest close its side.
fn tcp_echo(port: u16, line: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut c = TcpStream::connect_timeout(&addr([10, 0, 0, 2], port), ANSWER)?;
    c.set_read_timeout(Some(ANSWER))?;
    c.write_all(line)?;
    let mut back = vec![0u8; line.len()];
    c.read_exact(&mut back)?;
    // Our FIN: the guest answers with its own, which reads as the end.
    c.shutdown(Shutdown::Write)?;
    let mut rest = Vec::new();
    c.read_to_end(&mut rest)?;
    back.extend(rest);
    Ok(back)
}

#[test]
fn tcp_echo_returns_a_line_and_closes_and_other_ports_refuse() {
    if !kvm() {
        return;
    }
    let ns = namespace();
    let mut g = start_guest(&ns, &["tcp-echo=7"]);
    // Two connections at once (the guest has slots for 4), then one more
    // after they closed, whose slot must have been freed or reused.
    let r = ns.run(|| {
        let a = std::thread::spawn(|| tcp_echo(7, b"first line\n"));
        let b = std::thread::spawn(|| tcp_echo(7, b"second line\n"));
        let (a, b) = (a.join().unwrap()?, b.join().unwrap()?);
        let c = tcp_echo(7, b"third\n")?;
        let refused = TcpStream::connect_timeout(&addr([10, 0, 0, 2], 8), ANSWER).err();
        Ok((a, b, c, refused))
    });
    let (a, b, c, refused) =
        r.unwrap_or_else(|e| panic!("TCP echo failed: {e}; the guest said: {:#?}", g.arrived()));
    assert_eq!(a, b"first line\n");
    assert_eq!(b, b"second line\n");
    assert_eq!(c, b"third\n");
    assert_eq!(
        refused.map(|e| e.kind()),
        Some(ErrorKind::ConnectionRefused),
        "a port without tcp-echo answers RST"
    );
    wait_for(&mut g, "net: tcp echo 6 bytes to 10.0.0.1:", ANSWER);
}

/// A UDP echo server at `at` inside a namespace, on its own thread until
/// dropped: it answers the guest's probes (and keeps what it got).
struct EchoServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<String>>>,
}

impl EchoServer {
    fn start(ns: &Netns, at: SocketAddr) -> EchoServer {
        let s = ns
            .run(|| {
                let s = UdpSocket::bind(at)?;
                s.set_read_timeout(Some(Duration::from_millis(100)))?;
                Ok(s)
            })
            .unwrap_or_else(|e| panic!("bind {at}: {e}"));
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        // The socket stays in the namespace it was made in, whichever
        // thread uses it.
        let thread = std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut buf = [0u8; 2048];
            while !stopped.load(Ordering::Relaxed) {
                if let Ok((n, from)) = s.recv_from(&mut buf) {
                    let _ = s.send_to(&buf[..n], from);
                    got.push(format!("{from} {}", String::from_utf8_lossy(&buf[..n])));
                }
            }
            got
        });
        EchoServer {
            stop,
            thread: Some(thread),
        }
    }

    /// Stop; what it received, as `FROM PAYLOAD`.
    fn received(mut self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn probe_on_the_subnet_gets_replies() {
    if !kvm() {
        return;
    }
    let ns = namespace();
    let server = EchoServer::start(&ns, addr(HOST, 9000));
    let mut g = start_guest(&ns, &["probe=10.0.0.1:9000", "probe-limit=50"]);
    // Two replies: the probe keeps going (its timer runs while the guest
    // waits for frames).
    wait_for(&mut g, "net: probe reply from 10.0.0.1:9000", ANSWER);
    wait_for(&mut g, "net: probe reply from 10.0.0.1:9000", ANSWER);
    let got = server.received();
    assert!(
        got.iter().any(|l| l == "10.0.0.2:40000 probe 1"),
        "the server got: {got:?}"
    );
    assert!(
        got.iter().any(|l| l == "10.0.0.2:40000 probe 2"),
        "the server got: {got:?}"
    );
}

/// A probe to an address off the guest's subnet goes to the gateway's MAC
/// (the guest asks ARP for 10.0.0.1, not for the target), and the
/// gateway's answers come back.
#[test]
fn probe_off_the_subnet_goes_through_the_gateway() {
    if !kvm() {
        return;
    }
    let ns = namespace();
    // A second address on the TAP (an alias label, as `ifconfig tap0:1`):
    // the namespace routes nothing, it owns 192.168.77.1 itself.
    ns.set_addr("tap0:1", FAR, 24);
    let server = EchoServer::start(&ns, addr(FAR, 9000));
    let mut g = start_guest(&ns, &["probe=192.168.77.1:9000", "probe-limit=50"]);
    wait_for(&mut g, "net: probe reply from 192.168.77.1:9000", ANSWER);
    let got = server.received();
    assert!(
        got.iter().any(|l| l.starts_with("10.0.0.2:40000 probe ")),
        "the server got: {got:?}"
    );
    let said = g.arrived();
    assert!(
        said.iter().any(|l| l == "net: probe arp pending 10.0.0.1"),
        "the guest should resolve the gateway: {said:#?}"
    );
    assert!(
        !said.iter().any(|l| l.contains("arp pending 192.168.77.1")),
        "the guest asked ARP for an off-subnet address: {said:#?}"
    );
}

/// Arguments the guest cannot act on stop it at once with a line saying
/// why: here a probe off the subnet with no gateway to send it through.
#[test]
fn a_probe_off_the_subnet_without_a_gateway_is_refused() {
    if !kvm() {
        return;
    }
    let ns = namespace();
    let mut cmd = ns.command(tt_host());
    cmd.args([
        "run",
        "--mem=32",
        "--net:service0=tap0",
        guest("net").to_str().unwrap(),
        "--",
        "10.0.0.2",
        "probe=192.168.77.1:9000",
    ]);
    let mut g = Host::spawn(&mut cmd);
    wait_for(
        &mut g,
        "net: FAIL probe target 192.168.77.1 is off our subnet and no gw= is given",
        WAIT,
    );
    let end = g.finish();
    assert_eq!(end.status.code(), Some(1), "{:?}", end.stdout);
}
