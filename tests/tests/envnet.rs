//! tt_host::envnet on the real kernel: an environment's bridge and
//! nftables table carry, forward and refuse real traffic.
//!
//! Each test builds its own topology of network namespaces
//! (tt_tests::netns, system calls only), so nothing reaches an address
//! outside them and the kernel deletes everything (links, rules) when
//! the test ends, passed or failed:
//!
//! ```text
//!   G1 eth0 10.213.4.2 ──┐
//!                        ├─ ttv1/ttv2 ─ ttbr0 10.213.4.1 (H) out0 192.0.2.1 ── eth0 192.0.2.2, .3 (O)
//!   G2 eth0 10.213.4.3 ──┘
//! ```
//!
//! H is the host: it holds the environment's bridge and table, made by
//! the library inside H (`Netns::run`). The guests are namespaces behind
//! veth pairs instead of unikernels behind TAPs: the same bridge ports
//! for the rules. O is the outside world. Every exchange is a plain TCP
//! or UDP socket asking a service for its name. One test also puts a
//! real unikernel (the net example, under tt-host on /dev/kvm) on a TAP
//! of the bridge.
//!
//! The tests need root and the `nft` program (Debian's nftables package):
//! without it they fail and say so.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tt_host::envnet::{self, EnvNet, Forward, NetError, Subnet};
use tt_tests::guest_output::Host;
use tt_tests::netns::{Netns, Ping};
use tt_tests::{guest, kvm, tt_host};

const TABLE: &str = "tt-env-0";
const BRIDGE: &str = "ttbr0";
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 213, 4, 1);
const G1: Ipv4Addr = Ipv4Addr::new(10, 213, 4, 2);
const G2: Ipv4Addr = Ipv4Addr::new(10, 213, 4, 3);
/// H's address towards O.
const H_OUT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// O's two addresses.
const O: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
const O2: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 3);
/// Every service listens on this port, TCP and UDP.
const PORT: u16 = 80;
/// How long an exchange that must fail is given.
const SHORT: Duration = Duration::from_millis(300);
/// How long an exchange that must succeed is given (the first packets
/// wait for ARP).
const LONG: Duration = Duration::from_secs(3);

/// Panic with `what` and the error (which says how to install nft when
/// it is missing).
fn ok<T>(what: &str, r: Result<T, NetError>) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// A TCP and a UDP service on port [`PORT`] in a namespace, each
/// answering its name and counting whom it answered; stopped when
/// dropped.
struct Service {
    hits: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Service {
    fn start(ns: &Netns, name: &'static str) -> Service {
        let any = SocketAddr::from((Ipv4Addr::UNSPECIFIED, PORT));
        let (tcp, udp) = ns
            .run(|| Ok((TcpListener::bind(any)?, UdpSocket::bind(any)?)))
            .expect("bind the service");
        tcp.set_nonblocking(true).unwrap();
        udp.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (h, s) = (hits.clone(), stop.clone());
        let t1 = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match tcp.accept() {
                    Ok((mut c, _)) => {
                        h.fetch_add(1, Ordering::Relaxed);
                        let _ = c.write_all(name.as_bytes());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        let (h, s) = (hits.clone(), stop.clone());
        let t2 = std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while !s.load(Ordering::Relaxed) {
                if let Ok((_, from)) = udp.recv_from(&mut buf) {
                    h.fetch_add(1, Ordering::Relaxed);
                    let _ = udp.send_to(name.as_bytes(), from);
                }
            }
        });
        Service {
            hits,
            stop,
            threads: vec![t1, t2],
        }
    }

    /// How many requests it answered.
    fn hits(&self) -> usize {
        self.hits.load(Ordering::Relaxed)
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Via {
    Tcp,
    Udp,
}

/// Ask the service at `to` for its name from namespace `ns`, over `via`,
/// giving up after `wait`; None if nothing answered.
fn ask(ns: &Netns, via: Via, to: Ipv4Addr, port: u16, wait: Duration) -> Option<String> {
    let to = SocketAddr::V4(SocketAddrV4::new(to, port));
    let deadline = Instant::now() + wait;
    let mut reply = [0u8; 64];
    let r: io::Result<usize> = match via {
        Via::Tcp => ns
            .run(|| TcpStream::connect_timeout(&to, wait))
            .and_then(|mut c| {
                let left = deadline.saturating_duration_since(Instant::now());
                c.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
                let mut s = Vec::new();
                c.read_to_end(&mut s)?;
                reply[..s.len().min(64)].copy_from_slice(&s[..s.len().min(64)]);
                Ok(s.len().min(64))
            }),
        // A fresh socket each time: a new source port, so a new
        // connection for conntrack, which sees the rules as they are now.
        Via::Udp => ns
            .run(|| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)))
            .and_then(|s| {
                // Resend until the deadline: the first datagram may go
                // while ARP is still unanswered.
                loop {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(io::ErrorKind::TimedOut.into());
                    }
                    s.send_to(b"who?", to)?;
                    s.set_read_timeout(Some(left.min(Duration::from_millis(250))))?;
                    match s.recv_from(&mut reply) {
                        Ok((n, _)) => return Ok(n),
                        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => return Err(e),
                        Err(_) => continue,
                    }
                }
            }),
    };
    r.ok()
        .map(|n| String::from_utf8_lossy(&reply[..n]).into_owned())
}

#[track_caller]
/// Assert that `ns` gets `name` from `to`:`port` over `via`.
fn assert_reaches(ns: &Netns, from: &str, via: Via, to: Ipv4Addr, port: u16, name: &str) {
    let got = ask(ns, via, to, port, LONG);
    assert_eq!(
        got.as_deref(),
        Some(name),
        "{from} -> {to}:{port} over {via:?} should reach {name}"
    );
}

#[track_caller]
/// Assert that nothing answers `ns` from `to`:`port` over `via`.
fn assert_blocked(ns: &Netns, from: &str, via: Via, to: Ipv4Addr, port: u16) {
    let got = ask(ns, via, to, port, SHORT);
    assert_eq!(
        got, None,
        "{from} -> {to}:{port} over {via:?} should get nothing"
    );
}

/// The namespaces of the module doc's picture, with the bridge (made by
/// the library) and the links, but no table yet.
struct Topology {
    h: Netns,
    g1: Netns,
    g2: Netns,
    o: Netns,
}

impl Topology {
    fn new() -> Topology {
        let t = Topology {
            h: Netns::new(),
            g1: Netns::new(),
            g2: Netns::new(),
            o: Netns::new(),
        };
        ok(
            "create the bridge",
            t.h.run(|| Ok(envnet::create_bridge(BRIDGE, GATEWAY, 24)))
                .unwrap(),
        );
        ok(
            "enable forwarding",
            t.h.run(|| Ok(envnet::enable_ip_forward())).unwrap(),
        );
        for (g, port, addr) in [(&t.g1, "ttv1", G1), (&t.g2, "ttv2", G2)] {
            t.h.add_veth(port, "eth0", g);
            ok(
                "attach a guest's veth",
                t.h.run(|| Ok(envnet::attach_to_bridge(BRIDGE, port)))
                    .unwrap(),
            );
            t.h.set_up(port, true);
            g.set_addr("eth0", addr.octets(), 24);
            g.set_up("eth0", true);
            g.add_default_route(GATEWAY.octets());
        }
        t.h.add_veth("out0", "eth0", &t.o);
        t.h.set_addr("out0", H_OUT.octets(), 24);
        t.h.set_up("out0", true);
        t.o.set_addr("eth0", O.octets(), 24);
        t.o.set_addr("eth0:1", O2.octets(), 24);
        t.o.set_up("eth0", true);
        t
    }

    /// The environment's network, no forwards, no policy.
    fn env() -> EnvNet {
        EnvNet::new(
            TABLE,
            BRIDGE,
            Subnet::new(Ipv4Addr::new(10, 213, 4, 0), 24).unwrap(),
        )
    }

    fn apply(&self, env: &EnvNet) {
        ok(
            "apply the table",
            self.h.run(|| Ok(envnet::apply(env))).unwrap(),
        );
    }

    /// What `nft list tables` says in H.
    fn nft_tables(&self) -> String {
        let out = self
            .h
            .command("nft")
            .args(["list", "tables"])
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run nft: {e}; is nftables installed? (apt-get install nftables)")
            });
        assert!(out.status.success(), "nft list tables: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    }

    /// The interfaces /sys/class/net shows in H.
    fn sys_links(&self) -> Vec<String> {
        let out = self.h.command("ls").arg("/sys/class/net").output().unwrap();
        assert!(out.status.success(), "ls /sys/class/net: {out:?}");
        String::from_utf8(out.stdout)
            .unwrap()
            .split_whitespace()
            .map(String::from)
            .collect()
    }

    /// What the file `path` under /sys says in H.
    fn sys(&self, path: &str) -> String {
        let out = self.h.command("cat").arg(path).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

fn forwards() -> Vec<Forward> {
    vec![
        Forward::parse("8080:80").unwrap().to(G1),
        Forward::parse("5353:80/udp").unwrap().to(G1),
    ]
}

#[test]
fn port_forwards_reach_the_guest_until_removed() {
    let t = Topology::new();
    let _g1 = Service::start(&t.g1, "g1");
    let _g2 = Service::start(&t.g2, "g2");
    let mut env = Topology::env();
    env.forwards = forwards();
    t.apply(&env);

    assert_reaches(&t.o, "O", Via::Tcp, H_OUT, 8080, "g1");
    assert_reaches(&t.o, "O", Via::Udp, H_OUT, 5353, "g1");
    // The host itself, to its own (non-loopback) address: nat output.
    assert_reaches(&t.h, "H", Via::Tcp, H_OUT, 8080, "g1");
    // Another guest through the gateway: masqueraded so that the answer
    // comes back through the host.
    assert_reaches(&t.g2, "G2", Via::Tcp, GATEWAY, 8080, "g1");
    // Guests reach the world (masqueraded: O has no route back to them).
    let o = Service::start(&t.o, "o");
    assert_reaches(&t.g1, "G1", Via::Tcp, O, PORT, "o");
    assert_reaches(&t.g1, "G1", Via::Udp, O, PORT, "o");
    assert_eq!(o.hits(), 2);

    env.forwards.clear();
    t.apply(&env);
    assert_blocked(&t.o, "O", Via::Tcp, H_OUT, 8080);
    assert_blocked(&t.o, "O", Via::Udp, H_OUT, 5353);
    assert_blocked(&t.h, "H", Via::Tcp, H_OUT, 8080);

    // One forward back, the other not.
    env.forwards = forwards()[1..].to_vec();
    t.apply(&env);
    assert_reaches(&t.o, "O", Via::Udp, H_OUT, 5353, "g1");
    assert_blocked(&t.o, "O", Via::Tcp, H_OUT, 8080);
}

#[test]
fn deny_outgoing_keeps_guests_inside_but_answers_forwards() {
    let t = Topology::new();
    let _g1 = Service::start(&t.g1, "g1");
    let _g2 = Service::start(&t.g2, "g2");
    let h = Service::start(&t.h, "h");
    let o = Service::start(&t.o, "o");
    let mut env = Topology::env();
    env.forwards = forwards();
    t.apply(&env);

    // Outgoing allowed: everything goes (so that what follows can fail).
    assert_reaches(&t.g1, "G1", Via::Tcp, O, PORT, "o");
    assert_reaches(&t.g1, "G1", Via::Udp, O, PORT, "o");
    assert_reaches(&t.g1, "G1", Via::Tcp, GATEWAY, PORT, "h");
    assert_reaches(&t.g1, "G1", Via::Udp, H_OUT, PORT, "h");
    let (o_hits, h_hits) = (o.hits(), h.hits());
    assert_eq!((o_hits, h_hits), (2, 2));

    env.deny_outgoing = true;
    t.apply(&env);
    // Nothing leaves: neither to other networks nor to the host.
    for to in [O, O2] {
        assert_blocked(&t.g1, "G1", Via::Tcp, to, PORT);
        assert_blocked(&t.g1, "G1", Via::Udp, to, PORT);
    }
    for to in [GATEWAY, H_OUT] {
        assert_blocked(&t.g1, "G1", Via::Tcp, to, PORT);
        assert_blocked(&t.g1, "G1", Via::Udp, to, PORT);
    }
    assert_eq!(o.hits(), o_hits, "O's service heard from G1");
    assert_eq!(h.hits(), h_hits, "H's service heard from G1");
    // The guests still reach each other.
    assert_reaches(&t.g1, "G1", Via::Tcp, G2, PORT, "g2");
    assert_reaches(&t.g1, "G1", Via::Udp, G2, PORT, "g2");
    assert_reaches(&t.g2, "G2", Via::Tcp, G1, PORT, "g1");
    // Forwarded connections get their answers.
    assert_reaches(&t.o, "O", Via::Tcp, H_OUT, 8080, "g1");
    assert_reaches(&t.o, "O", Via::Udp, H_OUT, 5353, "g1");
    assert_reaches(&t.h, "H", Via::Tcp, H_OUT, 8080, "g1");
    assert_reaches(&t.h, "H", Via::Tcp, G1, PORT, "g1");

    // And back.
    env.deny_outgoing = false;
    t.apply(&env);
    assert_reaches(&t.g1, "G1", Via::Tcp, O, PORT, "o");
}

#[test]
fn blacklisted_addresses_are_unreachable() {
    let t = Topology::new();
    let o = Service::start(&t.o, "o");
    let h = Service::start(&t.h, "h");
    let mut env = Topology::env();
    t.apply(&env);
    assert_reaches(&t.g1, "G1", Via::Tcp, O2, PORT, "o");

    env.blacklist = vec![O2, GATEWAY];
    t.apply(&env);
    let (o_hits, h_hits) = (o.hits(), h.hits());
    assert_blocked(&t.g1, "G1", Via::Tcp, O2, PORT);
    assert_blocked(&t.g1, "G1", Via::Udp, O2, PORT);
    assert_blocked(&t.g2, "G2", Via::Udp, O2, PORT);
    assert_blocked(&t.g1, "G1", Via::Tcp, GATEWAY, PORT);
    assert_eq!(
        o.hits(),
        o_hits,
        "O's blacklisted address heard from a guest"
    );
    assert_eq!(
        h.hits(),
        h_hits,
        "the blacklisted gateway heard from a guest"
    );
    // Other addresses still work.
    assert_reaches(&t.g1, "G1", Via::Tcp, O, PORT, "o");
    assert_reaches(&t.g1, "G1", Via::Udp, O, PORT, "o");
    assert_reaches(&t.g1, "G1", Via::Tcp, H_OUT, PORT, "h");
}

#[test]
fn teardown_leaves_nothing() {
    let t = Topology::new();
    let mut env = Topology::env();
    env.forwards = forwards();
    env.deny_outgoing = true;
    env.blacklist = vec![O2];
    t.apply(&env);
    ok(
        "create a TAP",
        t.h.run(|| Ok(envnet::create_tap("tttap0", BRIDGE, None)))
            .unwrap(),
    );
    assert!(t.nft_tables().contains(&format!("table inet {TABLE}\n")));
    let tables = ok(
        "list tables",
        t.h.run(|| Ok(envnet::tables_with_prefix("tt-env-")))
            .unwrap(),
    );
    assert_eq!(tables, [TABLE]);
    let links = ok(
        "list links",
        t.h.run(|| Ok(envnet::links_with_prefix("tt"))).unwrap(),
    );
    assert_eq!(links, ["ttbr0", "tttap0", "ttv1", "ttv2"]);

    let r = t.h.run(|| {
        Ok((|| {
            envnet::remove_table(TABLE)?;
            for link in ["tttap0", "ttv1", "ttv2", BRIDGE] {
                envnet::delete_link(link)?;
            }
            // Again: what is absent is no error.
            envnet::remove_table(TABLE)?;
            envnet::delete_link(BRIDGE)?;
            envnet::delete_link("tttap0")?;
            Ok::<_, NetError>(())
        })())
    });
    ok("tear down", r.unwrap());

    let tables = t.nft_tables();
    assert!(!tables.contains("tt-env"), "tables left: {tables}");
    let sys = t.sys_links();
    assert!(
        sys.iter().all(|l| !l.starts_with("tt")),
        "links left in H: {sys:?}"
    );
    assert!(sys.contains(&"out0".to_string()), "{sys:?}");
    let left = ok(
        "list links",
        t.h.run(|| Ok(envnet::links_with_prefix("tt"))).unwrap(),
    );
    assert!(left.is_empty(), "{left:?}");
    let left = ok(
        "list tables",
        t.h.run(|| Ok(envnet::tables_with_prefix("tt-env-")))
            .unwrap(),
    );
    assert!(left.is_empty(), "{left:?}");
    // The guests' ends of the veths went with H's.
    for g in [&t.g1, &t.g2] {
        let gone = g.run(|| Ok(envnet::link_exists("eth0"))).unwrap();
        assert!(!ok("look up eth0", gone));
    }
}

#[test]
fn persistent_tap_on_the_bridge_opens_as_tt_host_opens_it() {
    let t = Topology::new();
    let tap = "tttap0";
    ok(
        "create a TAP",
        t.h.run(|| Ok(envnet::create_tap(tap, BRIDGE, Some(4242))))
            .unwrap(),
    );
    assert!(ok(
        "look up",
        t.h.run(|| Ok(envnet::link_exists(tap))).unwrap()
    ));
    let master =
        t.h.command("readlink")
            .arg(format!("/sys/class/net/{tap}/master"))
            .output()
            .unwrap();
    let master = String::from_utf8_lossy(&master.stdout);
    assert!(
        master.trim().ends_with(&format!("/{BRIDGE}")),
        "master: {master:?}"
    );
    assert_eq!(t.sys(&format!("/sys/class/net/{tap}/owner")), "4242");
    // IFF_TAP | IFF_NO_PI (what tt-host's --net:NAME=TAP asks for) and
    // IFF_PERSIST, nothing else: no IFF_VNET_HDR, no IFF_MULTI_QUEUE.
    assert_eq!(t.sys(&format!("/sys/class/net/{tap}/tun_flags")), "0x1802");
    let flags = t.sys(&format!("/sys/class/net/{tap}/flags"));
    let flags = u32::from_str_radix(flags.trim_start_matches("0x"), 16).unwrap();
    assert_ne!(flags & libc::IFF_UP as u32, 0, "the TAP is down");

    // A second one of the same name is refused; the first stays.
    let again =
        t.h.run(|| Ok(envnet::create_tap(tap, BRIDGE, None)))
            .unwrap();
    assert!(matches!(again, Err(NetError::Exists { .. })), "{again:?}");
    let again =
        t.h.run(|| Ok(envnet::create_bridge(BRIDGE, GATEWAY, 24)))
            .unwrap();
    assert!(matches!(again, Err(NetError::Exists { .. })), "{again:?}");
    // A bridge that does not exist: the TAP is not left behind.
    let r =
        t.h.run(|| Ok(envnet::create_tap("tttap1", "nobr", None)))
            .unwrap();
    assert!(r.is_err(), "{r:?}");
    assert!(!ok(
        "look up",
        t.h.run(|| Ok(envnet::link_exists("tttap1"))).unwrap()
    ));

    // tt-host opens it as --net:service0=tttap0 would; deleting it while
    // open works.
    let dev =
        t.h.run(|| {
            tt_host::modules::net::NetDevice::open_tap("service0", 0, tap, [2, 0, 0, 0, 0, 1])
                .map_err(io::Error::other)
        })
        .unwrap_or_else(|e| panic!("tt-host cannot open the TAP: {e}"));
    ok(
        "delete the TAP",
        t.h.run(|| Ok(envnet::delete_link(tap))).unwrap(),
    );
    assert!(!ok(
        "look up",
        t.h.run(|| Ok(envnet::link_exists(tap))).unwrap()
    ));
    drop(dev);
    assert!(!t.sys_links().iter().any(|l| l == tap));
}

#[test]
fn nft_errors_carry_what_nft_said() {
    let h = Netns::new();
    // A valid name for us, a keyword for nft.
    let mut env = Topology::env();
    env.table = "drop".into();
    let r = h.run(|| Ok(envnet::apply(&env))).unwrap();
    match r {
        Err(NetError::Nft { stderr, .. }) => assert!(stderr.contains("syntax error"), "{stderr}"),
        other => panic!("applying table 'drop' gave {other:?}"),
    }
    // Nothing was loaded.
    let tables = ok(
        "list",
        h.run(|| Ok(envnet::tables_with_prefix(""))).unwrap(),
    );
    assert!(tables.is_empty(), "{tables:?}");
}

#[test]
fn a_unikernel_on_an_env_tap_is_reached_across_the_bridge() {
    if !kvm() {
        return;
    }
    let t = Topology::new();
    let mut env = Topology::env();
    env.deny_outgoing = true;
    t.apply(&env);
    let tap = "tttap0";
    ok(
        "create a TAP",
        t.h.run(|| Ok(envnet::create_tap(tap, BRIDGE, None)))
            .unwrap(),
    );
    // The net example answers ARP and ICMP echo as 10.213.4.9.
    let unikernel = Ipv4Addr::new(10, 213, 4, 9);
    let mut host = Host::spawn(t.h.command(tt_host()).args([
        "run",
        "--mem=32",
        &format!("--net:service0={tap}"),
        "--net-mac:service0=02:00:00:00:00:09",
        guest("net").to_str().unwrap(),
        "--",
        &unikernel.to_string(),
    ]));
    while !host.line().contains("net: ready") {}
    let ping = Ping::until_answered(2, 56, Duration::from_millis(100));
    // From the host (the gateway) and from a guest on the same bridge,
    // deny-outgoing or not.
    let from_h = t.h.pinger().ping(unikernel.octets(), ping);
    assert_eq!(
        from_h.received, 2,
        "H -> unikernel: {from_h:?}; {:?}",
        host.seen
    );
    let from_g1 = t.g1.pinger().ping(unikernel.octets(), ping);
    assert_eq!(
        from_g1.received, 2,
        "G1 -> unikernel: {from_g1:?}; {:?}",
        host.seen
    );
    drop(host);
    ok(
        "delete the TAP",
        t.h.run(|| Ok(envnet::delete_link(tap))).unwrap(),
    );
}
