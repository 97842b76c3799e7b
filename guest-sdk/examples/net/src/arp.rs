//! ARP (RFC 826) for IPv4 over Ethernet: reading ARP packets, writing
//! requests and replies, and a small cache of the MACs learned.

use crate::wire::{be16, put16, write_eth, Addr, Mac, BROADCAST, ETHERTYPE_ARP, ETH_HDR};

/// The ARP packet for Ethernet/IPv4: 8 bytes of header, then two MAC +
/// address pairs.
const ARP_LEN: usize = 28;
pub const REQUEST: u16 = 1;
pub const REPLY: u16 = 2;

/// A parsed Ethernet/IPv4 ARP packet.
pub struct Arp {
    pub op: u16,
    /// Sender hardware and protocol address.
    pub sha: Mac,
    pub spa: Addr,
    /// Target protocol address (the one being asked about).
    pub tpa: Addr,
}

/// The ARP packet in `frame` (a whole Ethernet frame), if it is one for
/// Ethernet and IPv4; anything else is not ours to answer.
pub fn parse(frame: &[u8]) -> Option<Arp> {
    let a = frame.get(ETH_HDR..ETH_HDR + ARP_LEN)?;
    if be16(&a[0..]) != 1 || be16(&a[2..]) != 0x0800 || a[4] != 6 || a[5] != 4 {
        return None;
    }
    let mut arp = Arp {
        op: be16(&a[6..]),
        sha: [0; 6],
        spa: [0; 4],
        tpa: [0; 4],
    };
    arp.sha.copy_from_slice(&a[8..14]);
    arp.spa.copy_from_slice(&a[14..18]);
    arp.tpa.copy_from_slice(&a[24..28]);
    Some(arp)
}

/// Write an ARP frame into `buf`: a request for `tpa` (broadcast) when
/// `op` is [`REQUEST`], a reply to `to` otherwise. Returns its length.
pub fn write(buf: &mut [u8], op: u16, mac: Mac, ip: Addr, to: (Mac, Addr), tpa: Addr) -> usize {
    let (eth_dst, tha) = if op == REQUEST {
        // The target's MAC is what we ask for: zero in the packet.
        (BROADCAST, [0; 6])
    } else {
        (to.0, to.0)
    };
    write_eth(buf, eth_dst, mac, ETHERTYPE_ARP);
    let a = &mut buf[ETH_HDR..ETH_HDR + ARP_LEN];
    put16(&mut a[0..], 1);
    put16(&mut a[2..], 0x0800);
    a[4] = 6;
    a[5] = 4;
    put16(&mut a[6..], op);
    a[8..14].copy_from_slice(&mac);
    a[14..18].copy_from_slice(&ip);
    a[18..24].copy_from_slice(&tha);
    a[24..28].copy_from_slice(&tpa);
    ETH_HDR + ARP_LEN
}

/// How many addresses the cache holds: the gateway and a few peers are
/// all this example ever talks to first.
const ENTRIES: usize = 8;

#[derive(Clone, Copy)]
struct Entry {
    ip: Addr,
    mac: Mac,
    /// When it was last used or confirmed (a counter, not a clock): the
    /// least recent entry makes room for a new one.
    used: u64,
}

/// The MACs of recently seen neighbours.
///
/// Entries never expire: a guest here lives for one test, on a bridge
/// whose members do not change MAC under it. An address that moves is
/// updated by the next ARP packet its new owner sends.
pub struct Cache {
    entries: [Option<Entry>; ENTRIES],
    tick: u64,
}

impl Cache {
    pub const fn new() -> Cache {
        Cache {
            entries: [None; ENTRIES],
            tick: 0,
        }
    }

    /// The MAC of `ip`, if known.
    pub fn lookup(&mut self, ip: Addr) -> Option<Mac> {
        self.tick += 1;
        let tick = self.tick;
        let e = self.entries.iter_mut().flatten().find(|e| e.ip == ip)?;
        e.used = tick;
        Some(e.mac)
    }

    /// Update the entry of `ip` if there is one (RFC 826's merge step);
    /// add one only if `add` (the packet was meant for us: a request for
    /// our address, or the reply to ours), so that a chatty subnet does
    /// not push out the neighbours we talk to. Returns true if the cache
    /// changed, i.e. `ip` is newly known or moved.
    pub fn learn(&mut self, ip: Addr, mac: Mac, add: bool) -> bool {
        self.tick += 1;
        let tick = self.tick;
        if let Some(e) = self.entries.iter_mut().flatten().find(|e| e.ip == ip) {
            let moved = e.mac != mac;
            e.mac = mac;
            e.used = tick;
            return moved;
        }
        if !add {
            return false;
        }
        let new = Some(Entry {
            ip,
            mac,
            used: tick,
        });
        // A free slot, else the least recently used one.
        let slot = match self.entries.iter().position(Option::is_none) {
            Some(i) => i,
            None => (0..ENTRIES)
                .min_by_key(|&i| self.entries[i].map_or(0, |e| e.used))
                .unwrap_or(0),
        };
        self.entries[slot] = new;
        true
    }
}
