//! A minimal TCP (RFC 9293) echo responder: just enough for a client to
//! connect, send a few bytes, read them back and close.
//!
//! The model: every byte received in order is sent back at once in one
//! segment, so nothing is ever buffered, and our sequence numbers mirror
//! the peer's. There is no retransmission (the tests run on a local
//! bridge) and no congestion or window logic beyond advertising a fixed
//! window; what the peer retransmits is re-acknowledged so that it stops.
//! A connection ends when the peer closes: its FIN is answered with ours
//! (FIN-ACK) and the slot is freed once that is acknowledged.

use tt_guest::println;

use crate::ipv4::{Packet, PAYLOAD, PROTO_TCP};
use crate::wire::{be16, be32, fold, pseudo_sum, put16, put32, sum, Addr, Ip};
use crate::Ports;

const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const PSH: u8 = 0x08;
const ACK: u8 = 0x10;

const TCP_HDR: usize = 20;
/// The window we advertise: fixed, since we echo (and so consume) each
/// segment as it arrives. No window scaling, so at most 65535.
const WINDOW: u16 = 0xffff;
/// Connections served at once.
const SLOTS: usize = 4;
/// A connection idle this long gives up its slot to a new one when all are
/// taken: without retransmission, one whose peer vanished (or whose last
/// ACK was lost) would otherwise hold it for ever.
const IDLE_NS: u64 = 5_000_000_000;

/// A received TCP segment.
pub struct Segment<'a> {
    pub src_port: u16,
    pub dst_port: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub data: &'a [u8],
}

impl Segment<'_> {
    /// The sequence space it takes: its data, plus one each for SYN and
    /// FIN.
    fn seq_len(&self) -> u32 {
        self.data.len() as u32 + u32::from(self.flags & SYN != 0) + u32::from(self.flags & FIN != 0)
    }
}

/// The TCP segment `p` carries, if its header is whole and its checksum
/// (over the pseudo-header too) is right.
pub fn parse<'a>(p: &Packet<'a>, ip: Addr) -> Option<Segment<'a>> {
    let t = p.payload;
    if p.proto != PROTO_TCP || t.len() < TCP_HDR {
        return None;
    }
    let off = (t[12] >> 4) as usize * 4;
    if off < TCP_HDR || off > t.len() {
        return None;
    }
    if fold(sum(pseudo_sum(p.src, ip, PROTO_TCP, t.len()), t)) != 0 {
        return None;
    }
    Some(Segment {
        src_port: be16(t),
        dst_port: be16(&t[2..]),
        seq: be32(&t[4..]),
        ack: be32(&t[8..]),
        flags: t[13],
        data: &t[off..],
    })
}

/// A segment to send (to the peer the received one came from).
pub struct Out<'a> {
    pub src_port: u16,
    pub dst_port: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    /// An MSS option to put in a SYN.
    pub mss: Option<u16>,
    pub data: &'a [u8],
}

/// Write the segment `s` from `src` to `dst` at `buf[PAYLOAD..]`; returns
/// its length (the IPv4 payload length), or None if it does not fit.
pub fn write(buf: &mut [u8], src: Addr, dst: Addr, s: &Out) -> Option<usize> {
    let hdr = TCP_HDR + if s.mss.is_some() { 4 } else { 0 };
    let len = hdr + s.data.len();
    let t = buf.get_mut(PAYLOAD..PAYLOAD + len)?;
    put16(&mut t[0..], s.src_port);
    put16(&mut t[2..], s.dst_port);
    put32(&mut t[4..], s.seq);
    put32(&mut t[8..], s.ack);
    t[12] = ((hdr / 4) as u8) << 4;
    t[13] = s.flags;
    put16(&mut t[14..], WINDOW);
    put16(&mut t[16..], 0); // checksum, below
    put16(&mut t[18..], 0); // urgent pointer
    if let Some(mss) = s.mss {
        t[20] = 2; // kind: maximum segment size
        t[21] = 4; // option length
        put16(&mut t[22..], mss);
    }
    t[hdr..].copy_from_slice(s.data);
    let c = fold(sum(pseudo_sum(src, dst, PROTO_TCP, len), t));
    put16(&mut t[16..], c);
    Some(len)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    /// We answered the SYN and wait for the ACK of ours.
    SynReceived,
    Established,
    /// The peer closed, we sent our FIN and wait for its ACK.
    LastAck,
}

#[derive(Clone, Copy)]
struct Conn {
    peer: Addr,
    peer_port: u16,
    port: u16,
    state: State,
    /// Our initial sequence number: what a retransmitted SYN is answered
    /// with again.
    iss: u32,
    /// The next sequence number we send.
    snd_nxt: u32,
    /// The next sequence number we expect from the peer.
    rcv_nxt: u32,
    /// Monotonic time of the last segment, for [`IDLE_NS`].
    last_ns: u64,
}

/// Where a segment goes, and whether sending it worked.
pub type Emit<'e, 'a> = dyn FnMut(Out<'a>) -> Result<(), tt_guest::net::NetError> + 'e;

/// The echo responder: its listening ports and its connections.
pub struct Responder {
    ports: Ports,
    conns: [Option<Conn>; SLOTS],
    /// The MSS we announce: the device's MTU less the IPv4 and TCP headers.
    mss: u16,
}

impl Responder {
    pub fn new(ports: Ports, mtu: u16) -> Responder {
        Responder {
            ports,
            conns: [None; SLOTS],
            mss: mtu.saturating_sub(40),
        }
    }

    /// Handle segment `s` from `peer`, sending what it calls for through
    /// `emit`. Every TCP segment to us comes here: one to a port we do not
    /// listen on is refused with RST.
    pub fn handle<'a>(
        &mut self,
        now_ns: u64,
        peer: Addr,
        s: &Segment<'a>,
        emit: &mut Emit<'_, 'a>,
    ) -> Result<(), tt_guest::net::NetError> {
        let found = self.conns.iter().position(|c| {
            c.is_some_and(|c| c.peer == peer && c.peer_port == s.src_port && c.port == s.dst_port)
        });
        if s.flags & RST != 0 {
            // The peer gave up on the connection: forget it; never answer
            // a RST (that could loop).
            if let Some(i) = found {
                self.conns[i] = None;
            }
            return Ok(());
        }
        let new_syn = s.flags & (SYN | ACK) == SYN;
        if let Some(i) = found.filter(|&i| new_syn && self.closing(i)) {
            // The peer starts over on the same port while we wait for the
            // last ACK of the old connection (which it must have sent, or
            // it would not reuse the port): the old one is over.
            self.conns[i] = None;
            return self.open(now_ns, peer, s, emit);
        }
        let Some(i) = found else {
            if new_syn && self.ports.contains(s.dst_port) {
                return self.open(now_ns, peer, s, emit);
            }
            return emit(reset(s));
        };
        let Some(c) = self.conns[i].as_mut() else {
            return Ok(());
        };
        c.last_ns = now_ns;
        let r = c.segment(s, self.mss, emit);
        if c.state == State::LastAck && s.flags & ACK != 0 && s.ack == c.snd_nxt {
            // Our FIN is acknowledged: the connection is over.
            self.conns[i] = None;
        }
        r
    }

    /// Connection `i` waits for the ACK of our FIN.
    fn closing(&self, i: usize) -> bool {
        self.conns[i].is_some_and(|c| c.state == State::LastAck)
    }

    /// A SYN for a listening port: take a slot and answer SYN-ACK.
    fn open<'a>(
        &mut self,
        now_ns: u64,
        peer: Addr,
        s: &Segment<'a>,
        emit: &mut Emit<'_, 'a>,
    ) -> Result<(), tt_guest::net::NetError> {
        let slot = self.conns.iter().position(Option::is_none).or_else(|| {
            self.conns
                .iter()
                .position(|c| c.is_some_and(|c| now_ns.saturating_sub(c.last_ns) > IDLE_NS))
        });
        let Some(slot) = slot else {
            // All slots busy: refuse rather than leave the client waiting.
            return emit(reset(s));
        };
        // RFC 6528 wants initial sequence numbers hard to guess; one from
        // the clock is enough for a test responder on a private bridge, and
        // differs between a connection and its quick successor.
        let iss = (now_ns >> 4) as u32 ^ (u32::from(s.src_port) << 16);
        let c = Conn {
            peer,
            peer_port: s.src_port,
            port: s.dst_port,
            state: State::SynReceived,
            iss,
            snd_nxt: iss.wrapping_add(1),
            rcv_nxt: s.seq.wrapping_add(1),
            last_ns: now_ns,
        };
        self.conns[slot] = Some(c);
        emit(c.syn_ack(self.mss))
    }
}

/// The RST that refuses `s` (RFC 9293 section 3.10.7.1): it takes its
/// sequence number from the ACK of `s`, or else acknowledges `s`.
fn reset<'a>(s: &Segment) -> Out<'a> {
    let (seq, ack, flags) = if s.flags & ACK != 0 {
        (s.ack, 0, RST)
    } else {
        (0, s.seq.wrapping_add(s.seq_len()), RST | ACK)
    };
    Out {
        src_port: s.dst_port,
        dst_port: s.src_port,
        seq,
        ack,
        flags,
        mss: None,
        data: &[],
    }
}

impl Conn {
    fn out<'a>(&self, seq: u32, flags: u8, data: &'a [u8]) -> Out<'a> {
        Out {
            src_port: self.port,
            dst_port: self.peer_port,
            seq,
            ack: self.rcv_nxt,
            flags,
            mss: None,
            data,
        }
    }

    fn syn_ack<'a>(&self, mss: u16) -> Out<'a> {
        Out {
            mss: Some(mss),
            ..self.out(self.iss, SYN | ACK, &[])
        }
    }

    /// A segment of an existing connection.
    fn segment<'a>(
        &mut self,
        s: &Segment<'a>,
        mss: u16,
        emit: &mut Emit<'_, 'a>,
    ) -> Result<(), tt_guest::net::NetError> {
        if s.flags & SYN != 0 {
            if self.state == State::SynReceived && s.seq.wrapping_add(1) == self.rcv_nxt {
                // The peer did not get our SYN-ACK: send it again.
                return emit(self.syn_ack(mss));
            }
            // A SYN inside a connection: answer with an ACK saying where
            // we are (RFC 5961's challenge ACK) and let the peer decide.
            return emit(self.out(self.snd_nxt, ACK, &[]));
        }
        if s.flags & ACK == 0 {
            return Ok(()); // after the SYN every segment carries ACK
        }
        if self.state == State::SynReceived {
            if s.ack != self.snd_nxt {
                return emit(reset(s)); // acknowledges a SYN-ACK we never sent
            }
            self.state = State::Established;
        }
        if s.seq != self.rcv_nxt {
            // Old (the peer retransmitted what we have) or out of order
            // (we keep nothing): say what we expect next, and in LastAck
            // send our FIN again in case that is what got lost.
            if s.seq_len() > 0 {
                let (seq, flags) = match self.state {
                    State::LastAck => (self.snd_nxt.wrapping_sub(1), FIN | ACK),
                    _ => (self.snd_nxt, ACK),
                };
                return emit(self.out(seq, flags, &[]));
            }
            return Ok(());
        }
        if self.state != State::Established {
            return Ok(()); // in LastAck the peer has nothing more to send
        }
        if !s.data.is_empty() {
            // Take the data and send it back in the same breath; the echo
            // acknowledges it too.
            self.rcv_nxt = self.rcv_nxt.wrapping_add(s.data.len() as u32);
            emit(self.out(self.snd_nxt, ACK | PSH, s.data))?;
            self.snd_nxt = self.snd_nxt.wrapping_add(s.data.len() as u32);
            println!(
                "net: tcp echo {} bytes to {}:{}",
                s.data.len(),
                Ip(self.peer),
                self.peer_port
            );
        }
        if s.flags & FIN != 0 {
            // The peer is done: close our side too.
            self.rcv_nxt = self.rcv_nxt.wrapping_add(1);
            emit(self.out(self.snd_nxt, FIN | ACK, &[]))?;
            self.snd_nxt = self.snd_nxt.wrapping_add(1);
            self.state = State::LastAck;
        }
        Ok(())
    }
}
