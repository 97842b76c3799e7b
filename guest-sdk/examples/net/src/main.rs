//! Answers ARP and ICMP echo (ping) on the network device "service0",
//! like Solo5's test_net.
//!
//! Arguments: the guest's IPv4 address, as `A.B.C.D` or `ip=A.B.C.D`
//! (default 10.0.0.2); `limit=N` to exit 0 after answering N echo
//! requests (default: run until killed). The MAC comes from the host.
//!
//! Output: `net: service0 mac=02:..:.. mtu=1500 ip=10.0.0.2`, then
//! `net: ready`, `net: arp reply to A.B.C.D` for each ARP request for our
//! IP, `net: echo reply N to A.B.C.D` for each ping, and after `limit`
//! replies `net: OK` (exit 0). Errors print `net: FAIL ...` and exit 1;
//! so does an MTU above 9216.
#![no_std]
#![no_main]

use core::time::Duration;

use tt_guest::net::{poll, Net, NetError};
use tt_guest::println;

tt_guest::main!(app_main, devices: [net "service0"]);

const ETH_HDR: usize = 14;
/// The largest MTU this example takes (jumbo frames of 9216 bytes).
const MAX_MTU: usize = 9216;
const ETHERTYPE_ARP: u16 = 0x0806;
const ETHERTYPE_IPV4: u16 = 0x0800;

struct Ip([u8; 4]);

impl core::fmt::Display for Ip {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}.{}.{}.{}", self.0[0], self.0[1], self.0[2], self.0[3])
    }
}

fn parse_ip(s: &str) -> Option<[u8; 4]> {
    let mut out = [0u8; 4];
    let mut parts = s.split('.');
    for o in out.iter_mut() {
        *o = parts.next()?.parse().ok()?;
    }
    parts.next().is_none().then_some(out)
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

/// The Internet checksum of `data`.
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in data.chunks(2) {
        sum += if c.len() == 2 {
            be16(c) as u32
        } else {
            (c[0] as u32) << 8
        };
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Turn an ARP request for `ip` into a reply in place; returns its length.
fn arp_reply(f: &mut [u8], n: usize, mac: [u8; 6], ip: [u8; 4]) -> Option<usize> {
    let a = f.get(ETH_HDR..ETH_HDR + 28)?;
    if n < ETH_HDR + 28 || be16(&a[0..]) != 1 || be16(&a[2..]) != 0x0800 || a[4] != 6 || a[5] != 4 {
        return None;
    }
    if be16(&a[6..]) != 1 || a[24..28] != ip {
        return None;
    }
    let mut sha = [0u8; 6];
    sha.copy_from_slice(&a[8..14]);
    let mut spa = [0u8; 4];
    spa.copy_from_slice(&a[14..18]);
    f[0..6].copy_from_slice(&sha);
    f[6..12].copy_from_slice(&mac);
    let a = &mut f[ETH_HDR..ETH_HDR + 28];
    a[6..8].copy_from_slice(&2u16.to_be_bytes());
    a[8..14].copy_from_slice(&mac);
    a[14..18].copy_from_slice(&ip);
    a[18..24].copy_from_slice(&sha);
    a[24..28].copy_from_slice(&spa);
    Some(ETH_HDR + 28)
}

/// Turn an ICMP echo request to `ip` into a reply in place; returns its
/// length and the requester's address.
fn echo_reply(f: &mut [u8], n: usize, mac: [u8; 6], ip: [u8; 4]) -> Option<(usize, [u8; 4])> {
    let h = f.get(ETH_HDR..n)?;
    if h.len() < 20 || h[0] >> 4 != 4 {
        return None;
    }
    let ihl = (h[0] & 0xf) as usize * 4;
    let total = be16(&h[2..]) as usize;
    if ihl < 20 || total < ihl + 8 || total > h.len() || h[9] != 1 || h[16..20] != ip {
        return None;
    }
    if be16(&h[6..]) & 0x3fff != 0 || checksum(&h[..ihl]) != 0 {
        return None; // fragment or bad header checksum
    }
    if h[ihl] != 8 || checksum(&h[ihl..total]) != 0 {
        return None; // not an echo request, or bad ICMP checksum
    }
    let mut src = [0u8; 4];
    src.copy_from_slice(&h[12..16]);
    let mut dmac = [0u8; 6];
    dmac.copy_from_slice(&f[6..12]);
    f[0..6].copy_from_slice(&dmac);
    f[6..12].copy_from_slice(&mac);
    let h = &mut f[ETH_HDR..ETH_HDR + total];
    h[12..16].copy_from_slice(&ip);
    h[16..20].copy_from_slice(&src);
    h[8] = 64;
    h[10..12].fill(0);
    let c = checksum(&h[..ihl]);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h[ihl] = 0;
    h[ihl + 2..ihl + 4].fill(0);
    let c = checksum(&h[ihl..total]);
    h[ihl + 2..ihl + 4].copy_from_slice(&c.to_be_bytes());
    Some((ETH_HDR + total, src))
}

fn app_main() -> i32 {
    let mut ip = [10, 0, 0, 2];
    let mut limit: Option<u64> = None;
    for arg in tt_guest::boot::args() {
        if let Some(n) = arg.strip_prefix("limit=") {
            match n.parse() {
                Ok(n) => limit = Some(n),
                Err(_) => {
                    println!("net: FAIL bad limit {:?}", n);
                    return 1;
                }
            }
        } else {
            match parse_ip(arg.strip_prefix("ip=").unwrap_or(arg)) {
                Some(a) => ip = a,
                None => {
                    println!(
                        "net: FAIL bad argument {:?} (use A.B.C.D, ip=A.B.C.D or limit=N)",
                        arg
                    );
                    return 1;
                }
            }
        }
    }
    let dev = match Net::acquire("service0") {
        Ok(d) => d,
        Err(e) => {
            println!("net: FAIL cannot acquire \"service0\": {}", e);
            return 1;
        }
    };
    let mac = dev.mac();
    println!(
        "net: service0 mac={:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x} mtu={} ip={}",
        mac[0],
        mac[1],
        mac[2],
        mac[3],
        mac[4],
        mac[5],
        dev.mtu(),
        Ip(ip)
    );
    // Frames of up to the device's MTU + 14 bytes (the host's TAP MTU:
    // 9014 on a jumbo-frame TAP), and NET_READ wants a buffer that large.
    let mut frame = [0u8; MAX_MTU + ETH_HDR];
    let size = dev.frame_len();
    if size > frame.len() {
        println!(
            "net: FAIL mtu {} is above the {} this example handles",
            dev.mtu(),
            MAX_MTU
        );
        return 1;
    }
    println!("net: ready");
    let mut replies = 0u64;
    loop {
        if limit.is_some_and(|l| replies >= l) {
            println!("net: OK");
            return 0;
        }
        let n = match dev.read(&mut frame[..size]) {
            Ok(n) => n,
            Err(NetError::Again) => {
                // As a Solo5 unikernel does: read again only once poll
                // reports the device ready (a failed device is reported
                // ready, and its read then fails).
                while !poll(Duration::from_secs(1)).contains(dev.handle()) {}
                continue;
            }
            Err(e) => {
                println!("net: FAIL read: {}", e);
                return 1;
            }
        };
        if n < ETH_HDR {
            continue;
        }
        let reply = match be16(&frame[12..]) {
            ETHERTYPE_ARP => arp_reply(&mut frame, n, mac, ip).inspect(|_| {
                println!(
                    "net: arp reply to {}",
                    Ip([frame[38], frame[39], frame[40], frame[41]])
                );
            }),
            ETHERTYPE_IPV4 => echo_reply(&mut frame, n, mac, ip).map(|(len, src)| {
                replies += 1;
                println!("net: echo reply {} to {}", replies, Ip(src));
                len
            }),
            _ => None,
        };
        if let Some(len) = reply {
            if let Err(e) = dev.write(&frame[..len]) {
                println!("net: FAIL write: {}", e);
                return 1;
            }
        }
    }
}
