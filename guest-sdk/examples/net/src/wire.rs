//! Byte-level pieces every protocol module needs: address types and their
//! printed forms, big-endian fields, the Ethernet header and the Internet
//! checksum.
//!
//! Frames are plain byte slices; each protocol module reads and writes its
//! header at fixed offsets (all the headers here are fixed-size once
//! options are skipped), which keeps the example free of any framework.

use core::fmt;

/// An IPv4 address, in network byte order.
pub type Addr = [u8; 4];
/// An Ethernet MAC address.
pub type Mac = [u8; 6];

pub const ETH_HDR: usize = 14;
pub const ETHERTYPE_ARP: u16 = 0x0806;
pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const BROADCAST: Mac = [0xff; 6];

/// Prints an address as `A.B.C.D`.
pub struct Ip(pub Addr);

impl fmt::Display for Ip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}.{}", self.0[0], self.0[1], self.0[2], self.0[3])
    }
}

/// Prints a MAC as `aa:bb:cc:dd:ee:ff`.
pub struct MacFmt(pub Mac);

impl fmt::Display for MacFmt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// `A.B.C.D`, each part a decimal byte.
pub fn parse_ip(s: &str) -> Option<Addr> {
    let mut out = [0u8; 4];
    let mut parts = s.split('.');
    for o in out.iter_mut() {
        *o = parts.next()?.parse().ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// The netmask of a prefix length (0..=32) as a host-order integer.
pub fn mask(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

pub fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

pub fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

pub fn put16(b: &mut [u8], v: u16) {
    b[..2].copy_from_slice(&v.to_be_bytes());
}

pub fn put32(b: &mut [u8], v: u32) {
    b[..4].copy_from_slice(&v.to_be_bytes());
}

/// Fill in an Ethernet header at the start of `frame`.
pub fn write_eth(frame: &mut [u8], dst: Mac, src: Mac, ethertype: u16) {
    frame[0..6].copy_from_slice(&dst);
    frame[6..12].copy_from_slice(&src);
    put16(&mut frame[12..], ethertype);
}

/// The source MAC of a received frame (where a reply goes back to: the
/// sender itself on the subnet, the gateway for anything routed).
pub fn eth_src(frame: &[u8]) -> Mac {
    let mut m = [0u8; 6];
    m.copy_from_slice(&frame[6..12]);
    m
}

/// `data` added as big-endian 16-bit words to the running sum `acc` (an
/// odd last byte is padded with zero). Kept unfolded so that a TCP or UDP
/// checksum can cover its pseudo-header and the segment, which are not
/// contiguous, without copying them together.
pub fn sum(acc: u64, data: &[u8]) -> u64 {
    let mut chunks = data.chunks_exact(2);
    let mut s = acc;
    for c in &mut chunks {
        s += u64::from(be16(c));
    }
    if let [last] = chunks.remainder() {
        s += u64::from(*last) << 8;
    }
    s
}

/// Fold a running sum into the 16-bit one's-complement checksum.
pub fn fold(mut s: u64) -> u16 {
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// The Internet checksum (RFC 1071) of `data`; 0 over data that carries a
/// correct checksum.
pub fn checksum(data: &[u8]) -> u16 {
    fold(sum(0, data))
}

/// The sum of the TCP/UDP pseudo-header: both addresses, the protocol and
/// the segment's length.
pub fn pseudo_sum(src: Addr, dst: Addr, proto: u8, len: usize) -> u64 {
    let s = sum(sum(0, &src), &dst);
    s + u64::from(proto) + len as u64
}
