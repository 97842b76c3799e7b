//! IPv4 (RFC 791) headers, and ICMP echo (RFC 792) on top.
//!
//! Received packets are checked (version, lengths, header checksum) and
//! fragments are dropped: nothing here sends datagrams large enough to
//! need them. Sent packets have a 20-byte header without options.

use crate::wire::{be16, checksum, put16, write_eth, Addr, Mac, ETHERTYPE_IPV4, ETH_HDR};

pub const IP_HDR: usize = 20;
/// Where a sent packet's payload starts in its frame.
pub const PAYLOAD: usize = ETH_HDR + IP_HDR;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// A received IPv4 packet addressed to us.
pub struct Packet<'a> {
    pub src: Addr,
    pub proto: u8,
    /// The payload, cut to the header's total length (a short frame is
    /// padded to 60 bytes on the wire; the padding is not payload).
    pub payload: &'a [u8],
}

/// The IPv4 packet in `frame` if it is a whole, unfragmented one for
/// `ip` with a correct header checksum.
pub fn parse(frame: &[u8], ip: Addr) -> Option<Packet<'_>> {
    let h = frame.get(ETH_HDR..)?;
    if h.len() < IP_HDR || h[0] >> 4 != 4 {
        return None;
    }
    let ihl = (h[0] & 0xf) as usize * 4;
    let total = be16(&h[2..]) as usize;
    if ihl < IP_HDR || total < ihl || total > h.len() || h[16..20] != ip {
        return None;
    }
    if be16(&h[6..]) & 0x3fff != 0 || checksum(&h[..ihl]) != 0 {
        return None; // a fragment, or a bad header checksum
    }
    let mut src = [0u8; 4];
    src.copy_from_slice(&h[12..16]);
    Some(Packet {
        src,
        proto: h[9],
        payload: &h[ihl..total],
    })
}

/// Put the Ethernet and IPv4 headers in front of the `len` payload bytes
/// already at `buf[PAYLOAD..]`; returns the frame's length.
pub fn finish(
    buf: &mut [u8],
    to: Mac,
    mac: Mac,
    src: Addr,
    dst: Addr,
    proto: u8,
    len: usize,
) -> usize {
    write_eth(buf, to, mac, ETHERTYPE_IPV4);
    let h = &mut buf[ETH_HDR..PAYLOAD];
    h[0] = 0x45; // version 4, 5 words of header
    h[1] = 0;
    put16(&mut h[2..], (IP_HDR + len) as u16);
    put16(&mut h[4..], 0); // identification: unused, as DF is set
    put16(&mut h[6..], 0x4000); // don't fragment
    h[8] = 64; // TTL
    h[9] = proto;
    put16(&mut h[10..], 0);
    h[12..16].copy_from_slice(&src);
    h[16..20].copy_from_slice(&dst);
    let c = checksum(h);
    put16(&mut h[10..], c);
    PAYLOAD + len
}

/// If `p` is an ICMP echo request with a correct checksum, write the echo
/// reply's ICMP message (same identifier, sequence and data) at
/// `out[PAYLOAD..]`; returns its length.
pub fn icmp_echo_reply(p: &Packet, out: &mut [u8]) -> Option<usize> {
    let m = p.payload;
    if p.proto != PROTO_ICMP || m.len() < 8 || m[0] != 8 || checksum(m) != 0 {
        return None; // not an echo request, or a bad ICMP checksum
    }
    let r = out.get_mut(PAYLOAD..PAYLOAD + m.len())?;
    r.copy_from_slice(m);
    r[0] = 0; // echo reply
    put16(&mut r[2..], 0);
    let c = checksum(r);
    put16(&mut r[2..], c);
    Some(m.len())
}
