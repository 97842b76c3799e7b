//! Network devices (TAP) and POLL: NET_WRITE, NET_READ, POLL.
//!
//! Each device is an existing TAP interface opened through /dev/net/tun
//! (`IFF_TAP | IFF_NO_PI`), non-blocking. NET_READ answers `AGAIN` when no
//! frame is waiting; POLL sleeps until a device has a frame or the timeout
//! passes and returns the set of ready handles.

use super::{check_range, read_arg, Action, GuestError, Module};
use crate::abi::{layout, ret, Hypercall, NET_FRAME_MAX};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Why a network device could not be attached.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("net device '{name}': TAP interface '{tap}' does not exist (create it first, e.g. `ip tuntap add {tap} mode tap`)")]
    NoSuchTap { name: String, tap: String },
    #[error("net device '{name}': interface name '{tap}' is not valid (1 to 15 bytes, no '/', ':' or spaces)")]
    BadTapName { name: String, tap: String },
    #[error("net device '{name}': cannot attach to TAP '{tap}': {err}")]
    Attach {
        name: String,
        tap: String,
        err: std::io::Error,
    },
    #[error("net device '{name}': '{mac}' is not a guest MAC address: {why}")]
    BadMac {
        name: String,
        mac: String,
        why: &'static str,
    },
}

/// Parse `aa:bb:cc:dd:ee:ff` (or `aa-bb-...`): six bytes of two hex
/// digits each, one separator throughout. A guest's address must be a
/// unicast one (bit 0 of the first byte clear) and not all zeros; the
/// error says what is wrong.
pub fn parse_mac(s: &str) -> Result<[u8; 6], &'static str> {
    let sep = if s.contains('-') { '-' } else { ':' };
    let parts: Vec<&str> = s.split(sep).collect();
    if parts.len() != 6
        || parts
            .iter()
            .any(|p| p.len() != 2 || !p.bytes().all(|c| c.is_ascii_hexdigit()))
    {
        return Err("expected six hex bytes like 02:00:00:00:00:01");
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(parts) {
        *b = u8::from_str_radix(p, 16).expect("two hex digits");
    }
    if mac[0] & 1 != 0 {
        return Err("a multicast address (the first byte is odd)");
    }
    if mac == [0; 6] {
        return Err("all zeros");
    }
    Ok(mac)
}

/// A random locally administered unicast MAC.
pub fn random_mac() -> [u8; 6] {
    let mut mac = [0u8; 6];
    if File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut mac))
        .is_err()
    {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
            ^ std::process::id() as u128;
        mac.copy_from_slice(&t.to_le_bytes()[..6]);
    }
    mac[0] = (mac[0] | 0x02) & !0x01;
    mac
}

/// One attached TAP device.
pub struct NetDevice {
    /// The name the manifest gives it, for messages.
    pub name: String,
    pub handle: u64,
    pub mac: [u8; 6],
    tap: File,
    /// Frames dropped for being longer than the guest's MTU allows.
    dropped: u64,
    /// A TAP error was reported (once per device: a guest may retry a
    /// failing read in a loop).
    reported: bool,
}

impl NetDevice {
    /// Tell the operator about a TAP error the guest gets as EUNSPEC, the
    /// first time only.
    fn report(&mut self, what: &str) {
        if !std::mem::replace(&mut self.reported, true) {
            eprintln!(
                "tt-host: net device '{}': {what} (the guest gets an error; \
                 further TAP errors are not reported)",
                self.name
            );
        }
    }

    /// Attach the existing TAP interface `tap` as device `name`.
    pub fn open_tap(name: &str, handle: u64, tap: &str, mac: [u8; 6]) -> Result<Self, NetError> {
        if tap.is_empty() || tap.len() >= libc::IFNAMSIZ || tap.contains(['/', ':', ' ', '\0']) {
            return Err(NetError::BadTapName {
                name: name.into(),
                tap: tap.into(),
            });
        }
        let cname = std::ffi::CString::new(tap).expect("no NUL: checked above");
        // SAFETY: cname is a valid NUL-terminated string.
        if unsafe { libc::if_nametoindex(cname.as_ptr()) } == 0 {
            return Err(NetError::NoSuchTap {
                name: name.into(),
                tap: tap.into(),
            });
        }
        let attach = |err| NetError::Attach {
            name: name.into(),
            tap: tap.into(),
            err,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(attach)?;
        // SAFETY: ifreq is plain data; all-zero is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in ifr.ifr_name.iter_mut().zip(tap.bytes()) {
            *dst = src as libc::c_char;
        }
        ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes one struct ifreq, which we own.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr) } < 0 {
            return Err(attach(std::io::Error::last_os_error()));
        }
        Ok(NetDevice {
            name: name.into(),
            handle,
            mac,
            tap: file,
            dropped: 0,
            reported: false,
        })
    }
}

use std::os::unix::fs::OpenOptionsExt;

/// The net module: all TAP devices, and POLL.
pub struct Net {
    devices: Vec<NetDevice>,
    /// Receive buffer, larger than any frame a TAP can deliver: a read
    /// into a smaller one silently cuts a longer frame to the buffer's
    /// size (the TAP reports no truncation), so a frame is measured here
    /// and only then handed on or dropped.
    rx: Box<[u8]>,
}

/// Longest frame a TAP delivers: its MTU is at most 65535, plus the
/// Ethernet header and a VLAN tag.
const TAP_FRAME_MAX: usize = 65535 + 14 + 4;

/// Oversized frames one NET_READ skips before answering AGAIN, so a flood
/// of them cannot keep the vCPU in the host.
const MAX_DROPS_PER_READ: usize = 64;

impl Net {
    pub fn new(devices: Vec<NetDevice>) -> Self {
        Net {
            devices,
            rx: vec![0u8; TAP_FRAME_MAX].into_boxed_slice(),
        }
    }

    fn poll(&mut self, arg: u64, mem: &GuestMemoryMmap) -> Result<Action, GuestError> {
        let a = read_arg::<{ layout::POLL_SIZE }>(mem, arg)?;
        let timeout = a.u64(0);
        let mut fds: Vec<libc::pollfd> = self
            .devices
            .iter()
            .map(|d| libc::pollfd {
                fd: d.tap.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let deadline = std::time::Instant::now() + std::time::Duration::from_nanos(timeout);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let ts = libc::timespec {
                tv_sec: left.as_secs().min(i64::MAX as u64) as libc::time_t,
                tv_nsec: left.subsec_nanos() as libc::c_long,
            };
            // SAFETY: fds is a valid array of fds.len() pollfds; ts is valid.
            let n = unsafe {
                libc::ppoll(
                    fds.as_mut_ptr(),
                    fds.len() as libc::nfds_t,
                    &ts,
                    std::ptr::null(),
                )
            };
            if n < 0
                && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
                && crate::vmm::signal::received().is_none()
            {
                continue;
            }
            break;
        }
        // A failed TAP (its interface deleted, for one) polls as POLLERR
        // forever, never POLLIN: report it ready, as solo5-hvt's epoll
        // does, so that the guest's read returns the error. Otherwise a
        // guest that reads only what poll reports ready (the Solo5 model)
        // polls in a loop, each poll returning at once, and never learns.
        let failed = libc::POLLERR | libc::POLLHUP | libc::POLLNVAL;
        let mut ready = 0u64;
        for (d, p) in self.devices.iter().zip(&fds) {
            if p.revents & (libc::POLLIN | failed) != 0 && d.handle < 64 {
                ready |= 1 << d.handle;
            }
        }
        a.set_u64(mem, 8, ready);
        a.set_i32(mem, 16, ret::OK);
        Ok(Action::Continue)
    }

    fn io(&mut self, write: bool, arg: u64, mem: &GuestMemoryMmap) -> Result<Action, GuestError> {
        let a = read_arg::<{ layout::NET_SIZE }>(mem, arg)?;
        let (handle, data, len) = (a.u64(0), a.u64(8), a.u64(16));
        let Some(dev) = self.devices.iter_mut().find(|d| d.handle == handle) else {
            a.set_i32(mem, 24, ret::EINVAL);
            return Ok(Action::Continue);
        };
        if write {
            if !(ETH_HEADER..=NET_FRAME_MAX as u64).contains(&len) {
                a.set_i32(mem, 24, ret::EINVAL);
                return Ok(Action::Continue);
            }
            check_range(mem, "net frame", data, len)?;
            let mut buf = vec![0u8; len as usize];
            let _ = mem.read_slice(&mut buf, GuestAddress(data));
            let r = match dev.tap.write(&buf) {
                Ok(n) if n == buf.len() => ret::OK,
                Ok(n) => {
                    dev.report(&format!("wrote {n} of a {}-byte frame", buf.len()));
                    ret::EUNSPEC
                }
                Err(e) => {
                    dev.report(&format!("write failed: {e}"));
                    ret::EUNSPEC
                }
            };
            a.set_i32(mem, 24, r);
        } else {
            if len < NET_FRAME_MAX as u64 {
                a.set_i32(mem, 24, ret::EINVAL);
                return Ok(Action::Continue);
            }
            check_range(mem, "net buffer", data, len)?;
            let r = read_frame(dev, &mut self.rx);
            match r {
                Ok(n) => {
                    let _ = mem.write_slice(&self.rx[..n], GuestAddress(data));
                    a.set_u64(mem, 16, n as u64);
                    a.set_i32(mem, 24, ret::OK);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    a.set_i32(mem, 24, ret::AGAIN)
                }
                Err(e) => {
                    dev.report(&format!("read failed: {e}"));
                    a.set_i32(mem, 24, ret::EUNSPEC)
                }
            }
        }
        Ok(Action::Continue)
    }
}

/// Ethernet header: the shortest frame a guest may send.
const ETH_HEADER: u64 = 14;

/// Read the next frame the guest can take (at most `NET_FRAME_MAX` bytes)
/// into `buf`; longer ones are dropped, as a NIC drops frames over its
/// MTU, and reported once per device. `WouldBlock` when none is waiting.
fn read_frame(dev: &mut NetDevice, buf: &mut [u8]) -> std::io::Result<usize> {
    for _ in 0..MAX_DROPS_PER_READ {
        let n = dev.tap.read(buf)?;
        if n <= NET_FRAME_MAX {
            return Ok(n);
        }
        dev.dropped += 1;
        if dev.dropped == 1 {
            eprintln!(
                "tt-host: net device '{}': dropped a {n}-byte frame, longer than \
                 the guest's {NET_FRAME_MAX} (is the TAP's MTU above 1500?); \
                 further drops are not reported",
                dev.name
            );
        }
    }
    Err(std::io::ErrorKind::WouldBlock.into())
}

impl Module for Net {
    fn name(&self) -> &'static str {
        "net"
    }

    fn hypercalls(&self) -> &'static [Hypercall] {
        &[Hypercall::NetWrite, Hypercall::NetRead, Hypercall::Poll]
    }

    fn handle(
        &mut self,
        call: Hypercall,
        arg: u64,
        mem: &GuestMemoryMmap,
    ) -> Result<Action, GuestError> {
        match call {
            Hypercall::Poll => self.poll(arg, mem),
            Hypercall::NetWrite => self.io(true, arg, mem),
            Hypercall::NetRead => self.io(false, arg, mem),
            _ => unreachable!("net registered only its own hypercalls"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_parsing() {
        assert_eq!(
            parse_mac("02:00:0a:FF:10:01"),
            Ok([2, 0, 0xa, 0xff, 0x10, 1])
        );
        assert_eq!(
            parse_mac("02-00-0a-ff-10-01"),
            Ok([2, 0, 0xa, 0xff, 0x10, 1])
        );
        let shape = Err("expected six hex bytes like 02:00:00:00:00:01");
        for bad in [
            "02:00:0a:ff:10",
            "02:00:0a:ff:10:01:02",
            "zz:00:0a:ff:10:01",
            "+2:+0:00:00:00:01", // from_str_radix alone takes a sign
            "02:00-0a:ff:10:01", // mixed separators
            "2:0:a:ff:10:1",
            "",
        ] {
            assert_eq!(parse_mac(bad), shape, "{bad:?}");
        }
        assert!(parse_mac("ff:ff:ff:ff:ff:ff")
            .unwrap_err()
            .contains("multicast"));
        assert!(parse_mac("01:00:5e:00:00:01")
            .unwrap_err()
            .contains("multicast"));
        assert_eq!(parse_mac("00:00:00:00:00:00"), Err("all zeros"));
    }

    #[test]
    fn random_mac_is_local_unicast() {
        let m = random_mac();
        assert_eq!(m[0] & 0x03, 0x02);
    }
}
