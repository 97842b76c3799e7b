//! The outgoing probe: a UDP datagram `probe N` to one address every
//! 200 ms, and a line for each one that comes back, so that a test can
//! see which outgoing traffic a host lets through (and back).

use core::time::Duration;

use tt_guest::net::NetError;
use tt_guest::println;
use tt_guest::time::Instant;

use crate::udp::{self, Datagram};
use crate::wire::{Addr, Ip};
use crate::Iface;

const INTERVAL: Duration = Duration::from_millis(200);
/// Our source port: the replies come back to it. Fixed, so that a test
/// (or a firewall rule) can name it.
pub const LOCAL_PORT: u16 = 40000;

/// Every send is printed up to this many, then every `QUIET_EVERY`th,
/// so that a long-running probe does not flood the console (each line is
/// a hypercall and a line in the host's log).
const LOUD_FIRST: u64 = 5;
const QUIET_EVERY: u64 = 25;

pub struct Probe {
    target: Addr,
    port: u16,
    /// Where the datagrams go on the link: the target itself if it is on
    /// our subnet, else the gateway.
    hop: Addr,
    limit: Option<u64>,
    sent: u64,
    next: Instant,
    /// "arp pending" was printed already.
    told_pending: bool,
}

impl Probe {
    pub fn new(target: Addr, port: u16, hop: Addr, limit: Option<u64>) -> Probe {
        Probe {
            target,
            port,
            hop,
            limit,
            sent: 0,
            next: Instant::now(),
            told_pending: false,
        }
    }

    /// When the next datagram is due; None once `probe-limit` are sent.
    pub fn due(&self) -> Option<Instant> {
        let done = self.limit.is_some_and(|l| self.sent >= l);
        (!done).then_some(self.next)
    }

    /// Send the next datagram if it is due. Until the next hop's MAC is
    /// known, ask for it instead (again at every tick: an ARP request or
    /// its reply may be lost, and a host may come up late).
    pub fn tick(&mut self, now: Instant, iface: &mut Iface) -> Result<(), NetError> {
        if self.due().is_none_or(|d| now < d) {
            return Ok(());
        }
        self.next = now + INTERVAL;
        let Some(mac) = iface.arp.lookup(self.hop) else {
            if !self.told_pending {
                println!("net: probe arp pending {}", Ip(self.hop));
                self.told_pending = true;
            }
            return iface.send_arp_request(self.hop);
        };
        self.sent += 1;
        let mut text = Text::default();
        let _ = core::fmt::write(&mut text, format_args!("probe {}", self.sent));
        let d = udp::Out {
            src_port: LOCAL_PORT,
            dst_port: self.port,
            data: text.as_bytes(),
        };
        iface.send_udp(mac, self.target, &d)?;
        if self.sent <= LOUD_FIRST || self.sent.is_multiple_of(QUIET_EVERY) {
            println!("net: probe sent {}", self.sent);
        }
        Ok(())
    }

    /// If `d` from `src` answers the probe, say so; true if it did.
    pub fn reply(&self, src: Addr, d: &Datagram) -> bool {
        if src != self.target || d.src_port != self.port || d.dst_port != LOCAL_PORT {
            return false;
        }
        println!("net: probe reply from {}:{}", Ip(src), self.port);
        true
    }
}

/// A short text formatted without the heap: `probe N` is at most 26
/// bytes.
#[derive(Default)]
struct Text {
    buf: [u8; 32],
    len: usize,
}

impl Text {
    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl core::fmt::Write for Text {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let end = self.len + s.len();
        let dst = self.buf.get_mut(self.len..end).ok_or(core::fmt::Error)?;
        dst.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}
