//! A small IPv4 host on the network device "service0": answers ARP and
//! ICMP echo (ping) like Solo5's test_net, and optionally echoes UDP and
//! TCP and sends an outgoing UDP probe, so that tests can show port
//! forwards and outgoing-traffic filtering for unikernels.
//!
//! Arguments (all optional):
//! - `A.B.C.D`, `ip=A.B.C.D` or either with `/N`: the guest's address and
//!   prefix length (default 10.0.0.2/24); `prefix=N` sets the prefix alone.
//! - `gw=A.B.C.D`: the default gateway (on the subnet). Packets to
//!   addresses off the subnet go to its MAC.
//! - `limit=N`: exit 0 after answering N ICMP echo requests (default: run
//!   until killed).
//! - `echo=PORT` (repeatable, or `echo=P1,P2`): answer each UDP datagram
//!   to PORT with its payload, back to its sender.
//! - `tcp-echo=PORT` (same forms): accept TCP connections on PORT and send
//!   back every byte received, until the client closes (4 connections at
//!   once; no retransmission). A segment to another port, or to no known
//!   connection, is refused with RST.
//! - `probe=A.B.C.D:PORT`: send the UDP datagram `probe N` (from port
//!   40000) there every 200 ms, through `gw=` if off the subnet;
//!   `probe-limit=N` stops after N.
//!
//! The MAC comes from the host; neighbours' MACs are learned by ARP
//! (a cache of 8; the guest asks for the ones it needs and learns from
//! the ARP requests and replies meant for it). Replies (ICMP, UDP, TCP)
//! go back to the Ethernet source of the request, which is the sender on
//! the subnet and the router for anything routed.
//!
//! Output: `net: service0 mac=02:..:.. mtu=1500 ip=10.0.0.2`, with `gw=`
//! also `net: gw=A.B.C.D prefix=N`, then `net: ready`, and for each event:
//! - `net: arp reply to A.B.C.D` (an ARP request for our IP),
//! - `net: arp A.B.C.D is at MAC` (an ARP reply taught us a new MAC),
//! - `net: echo reply N to A.B.C.D` (a ping),
//! - `net: udp echo N to A.B.C.D:P` (N counts from 1),
//! - `net: tcp echo N bytes to A.B.C.D:P`,
//! - `net: probe arp pending A.B.C.D` (once, while the next hop's MAC is
//!   unknown), `net: probe sent N` (the first 5, then every 25th) and
//!   `net: probe reply from A.B.C.D:P` for each datagram that comes back
//!   from the probed address and port,
//!
//! and after `limit` echo replies `net: OK` (exit 0). Errors print
//! `net: FAIL ...` and exit 1: a bad argument, a gateway off the subnet,
//! a probe off the subnet without `gw=`, an MTU above 9216, a failed
//! device.
#![no_std]
#![no_main]

extern crate alloc;

mod arp;
mod ipv4;
mod probe;
mod tcp;
mod udp;
mod wire;

use alloc::vec;
use alloc::vec::Vec;
use core::fmt;
use core::time::Duration;

use tt_guest::net::{yield_until, Net, NetError};
use tt_guest::println;
use tt_guest::time::Instant;

use probe::Probe;
use wire::{
    be16, eth_src, mask, parse_ip, Addr, Ip, Mac, MacFmt, ETHERTYPE_ARP, ETHERTYPE_IPV4, ETH_HDR,
};

tt_guest::main!(app_main, devices: [net "service0"]);

/// The largest MTU this example takes (jumbo frames of 9216 bytes).
const MAX_MTU: usize = 9216;
/// How long the main loop waits for a frame when no timer is due sooner.
const IDLE_WAIT: Duration = Duration::from_secs(1);

/// A short set of ports (the `echo=` or `tcp-echo=` ones).
#[derive(Clone, Copy, Default)]
pub struct Ports {
    list: [u16; 8],
    len: usize,
}

impl Ports {
    pub fn contains(&self, port: u16) -> bool {
        self.list[..self.len].contains(&port)
    }

    /// Add the ports of `P` or `P1,P2,..`; false if one is not a port
    /// (1-65535) or there are more than 8.
    fn add_list(&mut self, s: &str) -> bool {
        for p in s.split(',') {
            match p.parse::<u16>() {
                Ok(p) if p != 0 && self.len < self.list.len() => {
                    self.list[self.len] = p;
                    self.len += 1;
                }
                _ => return false,
            }
        }
        true
    }
}

/// What the command line asks for.
struct Config {
    ip: Addr,
    prefix: u8,
    gw: Option<Addr>,
    limit: Option<u64>,
    udp_echo: Ports,
    tcp_echo: Ports,
    probe: Option<(Addr, u16)>,
    probe_limit: Option<u64>,
}

/// A command-line argument that cannot be used.
enum ArgError {
    Limit(&'static str),
    Bad(&'static str),
    GatewayOffSubnet(Addr),
    ProbeNeedsGateway(Addr),
}

impl fmt::Display for ArgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArgError::Limit(n) => write!(f, "bad limit {n:?}"),
            ArgError::Bad(a) => write!(
                f,
                "bad argument {a:?} (use A.B.C.D[/N], ip=A.B.C.D[/N], prefix=N, gw=A.B.C.D, \
                 limit=N, echo=PORT, tcp-echo=PORT, probe=A.B.C.D:PORT or probe-limit=N)"
            ),
            ArgError::GatewayOffSubnet(g) => write!(f, "gateway {} is not on our subnet", Ip(*g)),
            ArgError::ProbeNeedsGateway(a) => {
                write!(
                    f,
                    "probe target {} is off our subnet and no gw= is given",
                    Ip(*a)
                )
            }
        }
    }
}

/// `A.B.C.D` or `A.B.C.D/N`.
fn parse_cidr(s: &str) -> Option<(Addr, Option<u8>)> {
    match s.split_once('/') {
        Some((a, n)) => Some((parse_ip(a)?, Some(parse_prefix(n)?))),
        None => Some((parse_ip(s)?, None)),
    }
}

fn parse_prefix(s: &str) -> Option<u8> {
    s.parse().ok().filter(|&n| n <= 32)
}

fn parse_endpoint(s: &str) -> Option<(Addr, u16)> {
    let (a, p) = s.split_once(':')?;
    Some((parse_ip(a)?, p.parse().ok().filter(|&p| p != 0)?))
}

impl Config {
    fn from_args(args: impl Iterator<Item = &'static str>) -> Result<Config, ArgError> {
        let mut c = Config {
            ip: [10, 0, 0, 2],
            prefix: 24,
            gw: None,
            limit: None,
            udp_echo: Ports::default(),
            tcp_echo: Ports::default(),
            probe: None,
            probe_limit: None,
        };
        for arg in args {
            let bad = ArgError::Bad(arg);
            let (key, value) = arg.split_once('=').unwrap_or(("ip", arg));
            match key {
                "limit" => c.limit = Some(value.parse().map_err(|_| ArgError::Limit(value))?),
                "ip" => {
                    let (ip, prefix) = parse_cidr(value).ok_or(bad)?;
                    c.ip = ip;
                    c.prefix = prefix.unwrap_or(c.prefix);
                }
                "prefix" => c.prefix = parse_prefix(value).ok_or(bad)?,
                "gw" => c.gw = Some(parse_ip(value).ok_or(bad)?),
                "echo" => c.udp_echo.add_list(value).then_some(()).ok_or(bad)?,
                "tcp-echo" => c.tcp_echo.add_list(value).then_some(()).ok_or(bad)?,
                "probe" => c.probe = Some(parse_endpoint(value).ok_or(bad)?),
                "probe-limit" => c.probe_limit = Some(value.parse().map_err(|_| bad)?),
                _ => return Err(bad),
            }
        }
        let subnet = Subnet {
            ip: c.ip,
            mask: mask(c.prefix),
        };
        if let Some(gw) = c.gw.filter(|&g| !subnet.contains(g)) {
            return Err(ArgError::GatewayOffSubnet(gw));
        }
        if let Some((target, _)) = c.probe {
            if !subnet.contains(target) && c.gw.is_none() {
                return Err(ArgError::ProbeNeedsGateway(target));
            }
        }
        Ok(c)
    }
}

/// Our address and netmask: which destinations are on the link.
#[derive(Clone, Copy)]
struct Subnet {
    ip: Addr,
    mask: u32,
}

impl Subnet {
    fn contains(&self, a: Addr) -> bool {
        (u32::from_be_bytes(a) ^ u32::from_be_bytes(self.ip)) & self.mask == 0
    }
}

/// The network interface: the device, our addresses, the ARP cache and a
/// buffer to build frames in.
pub struct Iface {
    dev: Net,
    mac: Mac,
    subnet: Subnet,
    gw: Option<Addr>,
    pub arp: arp::Cache,
    tx: Vec<u8>,
}

impl Iface {
    fn ip(&self) -> Addr {
        self.subnet.ip
    }

    /// Where a packet to `dst` goes on the link: `dst` itself on the
    /// subnet, else the gateway (None if there is none).
    fn next_hop(&self, dst: Addr) -> Option<Addr> {
        if self.subnet.contains(dst) {
            Some(dst)
        } else {
            self.gw
        }
    }

    fn send(&self, len: usize) -> Result<(), NetError> {
        self.dev.write(&self.tx[..len])
    }

    pub fn send_arp_request(&mut self, ip: Addr) -> Result<(), NetError> {
        let len = arp::write(
            &mut self.tx,
            arp::REQUEST,
            self.mac,
            self.subnet.ip,
            ([0; 6], [0; 4]),
            ip,
        );
        self.send(len)
    }

    fn send_arp_reply(&mut self, to: (Mac, Addr)) -> Result<(), NetError> {
        let len = arp::write(&mut self.tx, arp::REPLY, self.mac, self.subnet.ip, to, to.1);
        self.send(len)
    }

    /// Send the IPv4 packet whose `len` payload bytes are already in
    /// place, to `dst` through the neighbour `to`.
    fn send_ipv4(&mut self, to: Mac, dst: Addr, proto: u8, len: usize) -> Result<(), NetError> {
        let len = ipv4::finish(&mut self.tx, to, self.mac, self.subnet.ip, dst, proto, len);
        self.send(len)
    }

    pub fn send_udp(&mut self, to: Mac, dst: Addr, d: &udp::Out) -> Result<(), NetError> {
        // Cannot fail to fit: every datagram sent is at most as long as
        // one received (an echo) or tiny (a probe).
        let Some(len) = udp::write(&mut self.tx, self.subnet.ip, dst, d) else {
            return Ok(());
        };
        self.send_ipv4(to, dst, ipv4::PROTO_UDP, len)
    }

    fn send_tcp(&mut self, to: Mac, dst: Addr, s: &tcp::Out) -> Result<(), NetError> {
        let Some(len) = tcp::write(&mut self.tx, self.subnet.ip, dst, s) else {
            return Ok(()); // as for UDP: an echo is no longer than its request
        };
        self.send_ipv4(to, dst, ipv4::PROTO_TCP, len)
    }
}

/// Everything the guest keeps between frames.
struct Host {
    iface: Iface,
    udp_echo: Ports,
    tcp: tcp::Responder,
    probe: Option<Probe>,
    /// ICMP echo replies sent (what `limit=` counts).
    pings: u64,
    udp_echoes: u64,
}

impl Host {
    /// Handle one received frame.
    fn frame(&mut self, f: &[u8]) -> Result<(), NetError> {
        if f.len() < ETH_HDR {
            return Ok(());
        }
        match be16(&f[12..]) {
            ETHERTYPE_ARP => self.arp(f),
            ETHERTYPE_IPV4 => self.ipv4(f),
            _ => Ok(()),
        }
    }

    fn arp(&mut self, f: &[u8]) -> Result<(), NetError> {
        let Some(a) = arp::parse(f) else {
            return Ok(());
        };
        let ip = self.iface.ip();
        if a.spa != [0; 4] && self.iface.arp.learn(a.spa, a.sha, a.tpa == ip) && a.op == arp::REPLY
        {
            println!("net: arp {} is at {}", Ip(a.spa), MacFmt(a.sha));
        }
        if a.op == arp::REQUEST && a.tpa == ip {
            self.iface.send_arp_reply((a.sha, a.spa))?;
            println!("net: arp reply to {}", Ip(a.spa));
        }
        Ok(())
    }

    fn ipv4(&mut self, f: &[u8]) -> Result<(), NetError> {
        let ip = self.iface.ip();
        let Some(p) = ipv4::parse(f, ip) else {
            return Ok(());
        };
        // Replies go back where the request came from on the link.
        let back = eth_src(f);
        match p.proto {
            ipv4::PROTO_ICMP => {
                if let Some(len) = ipv4::icmp_echo_reply(&p, &mut self.iface.tx) {
                    self.iface.send_ipv4(back, p.src, ipv4::PROTO_ICMP, len)?;
                    self.pings += 1;
                    println!("net: echo reply {} to {}", self.pings, Ip(p.src));
                }
                Ok(())
            }
            ipv4::PROTO_UDP => {
                let Some(d) = udp::parse(&p, ip) else {
                    return Ok(());
                };
                if self.probe.as_ref().is_some_and(|pr| pr.reply(p.src, &d)) {
                    return Ok(());
                }
                if !self.udp_echo.contains(d.dst_port) {
                    return Ok(());
                }
                let out = udp::Out {
                    src_port: d.dst_port,
                    dst_port: d.src_port,
                    data: d.data,
                };
                self.iface.send_udp(back, p.src, &out)?;
                self.udp_echoes += 1;
                println!(
                    "net: udp echo {} to {}:{}",
                    self.udp_echoes,
                    Ip(p.src),
                    d.src_port
                );
                Ok(())
            }
            ipv4::PROTO_TCP => {
                let Some(s) = tcp::parse(&p, ip) else {
                    return Ok(());
                };
                let iface = &mut self.iface;
                let now = Instant::now().as_nanos();
                self.tcp
                    .handle(now, p.src, &s, &mut |o| iface.send_tcp(back, p.src, &o))
            }
            _ => Ok(()),
        }
    }

    /// Run what is due (the probe); returns when to look again.
    fn timers(&mut self, now: Instant) -> Result<Instant, NetError> {
        let mut next = now + IDLE_WAIT;
        if let Some(p) = self.probe.as_mut() {
            p.tick(now, &mut self.iface)?;
            next = p.due().map_or(next, |d| d.min(next));
        }
        Ok(next)
    }
}

fn app_main() -> i32 {
    let c = match Config::from_args(tt_guest::boot::args()) {
        Ok(c) => c,
        Err(e) => {
            println!("net: FAIL {}", e);
            return 1;
        }
    };
    let dev = match Net::acquire("service0") {
        Ok(d) => d,
        Err(e) => {
            println!("net: FAIL cannot acquire \"service0\": {}", e);
            return 1;
        }
    };
    let mac = dev.mac();
    println!(
        "net: service0 mac={} mtu={} ip={}",
        MacFmt(mac),
        dev.mtu(),
        Ip(c.ip)
    );
    if let Some(gw) = c.gw {
        println!("net: gw={} prefix={}", Ip(gw), c.prefix);
    }
    // Frames of up to the device's MTU + 14 bytes (the host's TAP MTU:
    // 9014 on a jumbo-frame TAP), and NET_READ wants a buffer that large.
    let size = dev.frame_len();
    if size > MAX_MTU + ETH_HDR {
        println!(
            "net: FAIL mtu {} is above the {} this example handles",
            dev.mtu(),
            MAX_MTU
        );
        return 1;
    }
    let iface = Iface {
        dev,
        mac,
        subnet: Subnet {
            ip: c.ip,
            mask: mask(c.prefix),
        },
        gw: c.gw,
        arp: arp::Cache::new(),
        tx: vec![0; size],
    };
    // Config::from_args made sure an off-subnet target has a gateway.
    let probe = c.probe.and_then(|(target, port)| {
        let hop = iface.next_hop(target)?;
        Some(Probe::new(target, port, hop, c.probe_limit))
    });
    let mut host = Host {
        tcp: tcp::Responder::new(c.tcp_echo, iface.dev.mtu()),
        iface,
        udp_echo: c.udp_echo,
        probe,
        pings: 0,
        udp_echoes: 0,
    };
    let mut frame = vec![0u8; size];
    println!("net: ready");
    match run(&mut host, &mut frame, c.limit) {
        Ok(()) => {
            println!("net: OK");
            0
        }
        Err((what, e)) => {
            println!("net: FAIL {}: {}", what, e);
            1
        }
    }
}

/// The main loop: read every frame there is, run the timers, and wait in
/// POLL until a frame arrives or the next timer is due, so that the vCPU
/// sleeps in the host instead of spinning (each hypercall is a VM exit).
/// Returns after `limit` echo replies, or the failed operation.
fn run(
    host: &mut Host,
    frame: &mut [u8],
    limit: Option<u64>,
) -> Result<(), (&'static str, NetError)> {
    let handle = host.iface.dev.handle();
    // Read first: frames may have queued before we looked.
    let mut readable = true;
    loop {
        if limit.is_some_and(|l| host.pings >= l) {
            return Ok(());
        }
        if readable {
            match host.iface.dev.read(frame) {
                Ok(n) => host.frame(&frame[..n]).map_err(|e| ("write", e))?,
                // As a Solo5 unikernel does: read again only once poll
                // reports the device ready (a failed device is reported
                // ready, and its read then fails).
                Err(NetError::Again) => readable = false,
                Err(e) => return Err(("read", e)),
            }
        }
        // Timers run between frames too, so that a stream of input does
        // not hold the probe back. (Reading the clock costs no exit.)
        let next = host.timers(Instant::now()).map_err(|e| ("write", e))?;
        if !readable {
            readable = yield_until(next).contains(handle);
        }
    }
}
