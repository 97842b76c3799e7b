//! UDP (RFC 768): reading datagrams and writing them, with checksums.

use crate::ipv4::{Packet, PAYLOAD, PROTO_UDP};
use crate::wire::{be16, fold, pseudo_sum, put16, sum, Addr};

const UDP_HDR: usize = 8;

/// A received UDP datagram.
pub struct Datagram<'a> {
    pub src_port: u16,
    pub dst_port: u16,
    pub data: &'a [u8],
}

/// The UDP datagram `p` carries, if its length fields agree and its
/// checksum (when the sender set one: 0 means none) is right.
pub fn parse<'a>(p: &Packet<'a>, ip: Addr) -> Option<Datagram<'a>> {
    let u = p.payload;
    if p.proto != PROTO_UDP || u.len() < UDP_HDR {
        return None;
    }
    let len = be16(&u[4..]) as usize;
    if len < UDP_HDR || len > u.len() {
        return None;
    }
    let u = &u[..len];
    if be16(&u[6..]) != 0 && fold(sum(pseudo_sum(p.src, ip, PROTO_UDP, len), u)) != 0 {
        return None;
    }
    Some(Datagram {
        src_port: be16(u),
        dst_port: be16(&u[2..]),
        data: &u[UDP_HDR..],
    })
}

/// Ports and payload of a datagram to send.
pub struct Out<'a> {
    pub src_port: u16,
    pub dst_port: u16,
    pub data: &'a [u8],
}

/// Write the datagram `d` from `src` to `dst` at `buf[PAYLOAD..]`;
/// returns its length (the IPv4 payload length), or None if it does not
/// fit in `buf`.
pub fn write(buf: &mut [u8], src: Addr, dst: Addr, d: &Out) -> Option<usize> {
    let len = UDP_HDR + d.data.len();
    let u = buf.get_mut(PAYLOAD..PAYLOAD + len)?;
    put16(&mut u[0..], d.src_port);
    put16(&mut u[2..], d.dst_port);
    put16(&mut u[4..], len as u16);
    put16(&mut u[6..], 0);
    u[UDP_HDR..].copy_from_slice(d.data);
    // Optional over IPv4, but cheap, and it lets the receiver check us.
    // A computed 0 is sent as 0xffff: 0 would mean "no checksum".
    let c = fold(sum(pseudo_sum(src, dst, PROTO_UDP, len), u));
    put16(&mut u[6..], if c == 0 { 0xffff } else { c });
    Some(len)
}
