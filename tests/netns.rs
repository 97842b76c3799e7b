//! Network namespaces, TAP and veth interfaces, routes and ICMP echo for
//! the end-to-end tests, made with system calls alone: no `ip`, no `ping`.
//!
//! A [`Netns`] is an anonymous network namespace that lives as long as its
//! file descriptor and whatever runs in it: when the test drops it (or
//! dies) and its last process exits, the kernel deletes it with every
//! interface in it, TAPs included. Everything a test does with it (its
//! interfaces, the `tt-host` it starts, its pings) happens inside it, so
//! no traffic leaves it. All of it needs root (CAP_SYS_ADMIN and
//! CAP_NET_ADMIN) and /dev/net/tun.

use std::collections::BTreeSet;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// `r`, or the error it reports (`-1` and errno).
fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// A new socket of `domain`, `ty` and `proto`, in the calling thread's
/// network namespace.
fn socket(domain: libc::c_int, ty: libc::c_int, proto: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: socket() takes no pointers.
    let fd = cvt(unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, proto) })?;
    // SAFETY: fd was just opened and is owned nowhere else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// An ifreq naming `name`, the rest zero.
fn ifreq(name: &str) -> libc::ifreq {
    assert!(name.len() < libc::IFNAMSIZ, "interface name {name:?}");
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    ifr
}

/// `addr` as a `sockaddr` holding a `sockaddr_in`.
fn sockaddr_in(addr: [u8; 4]) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(addr),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: both are 16 bytes of plain data; a sockaddr holding a
    // sockaddr_in is how the socket ioctls take an IPv4 address.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// Interface ioctl `req` on `name` through `sock`, with `set` filling in
/// the request.
fn if_ioctl(
    sock: &OwnedFd,
    name: &str,
    req: libc::Ioctl,
    set: impl FnOnce(&mut libc::ifreq),
) -> io::Result<libc::ifreq> {
    let mut ifr = ifreq(name);
    set(&mut ifr);
    // SAFETY: every interface ioctl used here reads and writes one
    // struct ifreq, which we own.
    cvt(unsafe { libc::ioctl(sock.as_raw_fd(), req, &mut ifr) })?;
    Ok(ifr)
}

/// Open /dev/net/tun and attach it to interface `name` (created if there
/// is none) with TUN flags `flags`, in the calling thread's namespace.
fn tun_attach(name: &str, flags: libc::c_int) -> io::Result<OwnedFd> {
    let f = File::options()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    let mut ifr = ifreq(name);
    ifr.ifr_ifru.ifru_flags = flags as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one struct ifreq, which we own.
    cvt(unsafe { libc::ioctl(f.as_raw_fd(), libc::TUNSETIFF, &mut ifr) })?;
    Ok(f.into())
}

/// An anonymous network namespace; see the module doc.
pub struct Netns {
    ns: OwnedFd,
}

impl Netns {
    /// A fresh namespace, holding only `lo` (up).
    pub fn new() -> Netns {
        let ns = std::thread::spawn(|| -> io::Result<OwnedFd> {
            // SAFETY: unshare takes no pointers. It moves this thread
            // alone into a new namespace, and the thread ends right after.
            cvt(unsafe { libc::unshare(libc::CLONE_NEWNET) })?;
            Ok(File::open("/proc/thread-self/ns/net")?.into())
        })
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("cannot create a network namespace (run as root): {e}"));
        let ns = Netns { ns };
        ns.set_up("lo", true);
        ns
    }

    /// Run `f` on a thread inside the namespace: sockets and TAPs it makes
    /// belong to the namespace (and stay there once the thread is gone).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
        let ns = self.ns.as_raw_fd();
        std::thread::scope(|s| {
            s.spawn(move || {
                // SAFETY: ns is our namespace fd, open while self lives
                // (which outlives this scope); setns moves this thread
                // only, and it ends with the scope.
                cvt(unsafe { libc::setns(ns, libc::CLONE_NEWNET) })?;
                f()
            })
            .join()
            .unwrap()
        })
    }

    /// Run the future `f` makes to completion on a current-thread tokio
    /// runtime on a thread inside the namespace ([`Netns::run`]): the
    /// connections it opens start there.
    pub fn block_on<T: Send, Fut: std::future::Future<Output = T>>(
        &self,
        f: impl FnOnce() -> Fut + Send,
    ) -> T {
        self.run(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            Ok(rt.block_on(f()))
        })
        .expect("a tokio runtime in the namespace")
    }

    /// A command for `program` that runs inside the namespace, as
    /// `ip netns exec` runs it: in the namespace, with its own mount
    /// namespace where /sys shows the namespace's interfaces. Spawn it
    /// while `self` lives.
    pub fn command(&self, program: impl AsRef<Path>) -> Command {
        let ns = self.ns.as_raw_fd();
        let mut cmd = Command::new(program.as_ref());
        // SAFETY: the closure runs in the child between fork and exec and
        // makes only system calls (setns, unshare, mount, umount2), with
        // pointers to static C strings; ns is open in the child
        // (inherited; closed at exec). The mounts change the child's own
        // mount namespace only (made a slave of the test's first).
        unsafe {
            cmd.pre_exec(move || {
                let null = std::ptr::null();
                cvt(libc::setns(ns, libc::CLONE_NEWNET))?;
                cvt(libc::unshare(libc::CLONE_NEWNS))?;
                let flags = libc::MS_SLAVE | libc::MS_REC;
                cvt(libc::mount(null, c"/".as_ptr(), null, flags, null as _))?;
                // /sys may not be mounted at all: then nothing to undo.
                libc::umount2(c"/sys".as_ptr(), libc::MNT_DETACH);
                let sysfs = c"sysfs".as_ptr();
                cvt(libc::mount(sysfs, c"/sys".as_ptr(), sysfs, 0, null as _))?;
                Ok(())
            });
        }
        cmd
    }

    /// An AF_INET socket inside the namespace, for interface ioctls.
    fn inet(&self) -> OwnedFd {
        self.run(|| socket(libc::AF_INET, libc::SOCK_DGRAM, 0))
            .expect("socket in the namespace")
    }

    /// Interface ioctl `req` on `name` inside the namespace.
    fn ioctl(
        &self,
        name: &str,
        req: libc::Ioctl,
        set: impl FnOnce(&mut libc::ifreq),
    ) -> io::Result<libc::ifreq> {
        if_ioctl(&self.inet(), name, req, set)
    }

    /// Create a persistent TAP interface `name` (down, no address), as
    /// `ip tuntap add NAME mode tap` does.
    pub fn add_tap(&self, name: &str) {
        self.add_tun_kind(name, libc::IFF_TAP | libc::IFF_NO_PI);
    }

    /// Create a persistent TUN interface `name` (IP packets, no Ethernet).
    pub fn add_tun(&self, name: &str) {
        self.add_tun_kind(name, libc::IFF_TUN | libc::IFF_NO_PI);
    }

    fn add_tun_kind(&self, name: &str, flags: libc::c_int) {
        self.run(|| {
            let f = tun_attach(name, flags)?;
            // SAFETY: TUNSETPERSIST takes an integer, not a pointer.
            cvt(unsafe { libc::ioctl(f.as_raw_fd(), libc::TUNSETPERSIST, 1) })?;
            Ok(())
        })
        .unwrap_or_else(|e| panic!("create {name} (needs /dev/net/tun): {e}"));
    }

    /// Create TAP (or TUN) interface `name` with TUN flags `flags` and
    /// return the open /dev/net/tun file that holds it, as a launcher
    /// passes it to `--net:NAME=@FD`; the interface goes away with it.
    pub fn open_tap(&self, name: &str, flags: libc::c_int) -> OwnedFd {
        self.run(|| tun_attach(name, flags))
            .unwrap_or_else(|e| panic!("open {name} (needs /dev/net/tun): {e}"))
    }

    /// Set interface `name`'s MTU.
    pub fn set_mtu(&self, name: &str, mtu: u32) {
        self.ioctl(name, libc::SIOCSIFMTU, |r| r.ifr_ifru.ifru_mtu = mtu as _)
            .unwrap_or_else(|e| panic!("set the MTU of {name} to {mtu}: {e}"));
    }

    /// Bring interface `name` up or down.
    pub fn set_up(&self, name: &str, up: bool) {
        let sock = self.inet();
        let r = if_ioctl(&sock, name, libc::SIOCGIFFLAGS, |_| {}).and_then(|ifr| {
            // SAFETY: SIOCGIFFLAGS filled in ifru_flags.
            let mut flags = unsafe { ifr.ifr_ifru.ifru_flags };
            if up {
                flags |= libc::IFF_UP as libc::c_short;
            } else {
                flags &= !(libc::IFF_UP as libc::c_short);
            }
            if_ioctl(&sock, name, libc::SIOCSIFFLAGS, |r| {
                r.ifr_ifru.ifru_flags = flags
            })
        });
        r.unwrap_or_else(|e| panic!("set {name} up={up}: {e}"));
    }

    /// Give interface `name` the address `addr`/`prefix` (which adds the
    /// route to its subnet once the interface is up).
    pub fn set_addr(&self, name: &str, addr: [u8; 4], prefix: u32) {
        let mask = (u32::MAX.checked_shl(32 - prefix).unwrap_or(0)).to_be_bytes();
        let sock = self.inet();
        if_ioctl(&sock, name, libc::SIOCSIFADDR, |r| {
            r.ifr_ifru.ifru_addr = sockaddr_in(addr)
        })
        .and_then(|_| {
            if_ioctl(&sock, name, libc::SIOCSIFNETMASK, |r| {
                r.ifr_ifru.ifru_netmask = sockaddr_in(mask)
            })
        })
        .unwrap_or_else(|e| panic!("set {name}'s address {addr:?}/{prefix}: {e}"));
    }

    /// Forget the neighbour (ARP) entry of `addr` on `name`, as
    /// `ip neigh flush dev NAME` does for it.
    pub fn forget_neighbour(&self, name: &str, addr: [u8; 4]) {
        // SAFETY: arpreq is plain data; all-zero is a valid value.
        let mut req: libc::arpreq = unsafe { std::mem::zeroed() };
        req.arp_pa = sockaddr_in(addr);
        for (d, s) in req.arp_dev.iter_mut().zip(name.bytes()) {
            *d = s as libc::c_char;
        }
        let sock = self.inet();
        // SAFETY: SIOCDARP reads one struct arpreq, which we own.
        let r = cvt(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCDARP, &mut req) });
        match r {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {} // none
            Err(e) => panic!("forget the neighbour {addr:?} on {name}: {e}"),
        }
    }

    /// The hardware address the neighbour (ARP) entry of `addr` on `name`
    /// holds, as `ip neigh show dev NAME` shows it; None while there is no
    /// complete entry (none yet, or its ARP request unanswered).
    pub fn neighbour(&self, name: &str, addr: [u8; 4]) -> Option<[u8; 6]> {
        // SAFETY: arpreq is plain data; all-zero is a valid value.
        let mut req: libc::arpreq = unsafe { std::mem::zeroed() };
        req.arp_pa = sockaddr_in(addr);
        for (d, s) in req.arp_dev.iter_mut().zip(name.bytes()) {
            *d = s as libc::c_char;
        }
        let sock = self.inet();
        // SAFETY: SIOCGARP reads and writes one struct arpreq, which we own.
        let r = cvt(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGARP, &mut req) });
        match r {
            Ok(_) if req.arp_flags & libc::ATF_COM != 0 => {
                let mut mac = [0u8; 6];
                for (d, s) in mac.iter_mut().zip(req.arp_ha.sa_data) {
                    *d = s as u8;
                }
                Some(mac)
            }
            Ok(_) => None,
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => None, // none
            Err(e) => panic!("read the neighbour {addr:?} on {name}: {e}"),
        }
    }

    /// Delete interface `name`, as `ip link del NAME` does, through
    /// rtnetlink (RTM_DELLINK): no ioctl deletes a TAP another process
    /// holds.
    pub fn delete_link(&self, name: &str) {
        let index = self
            .ioctl(name, libc::SIOCGIFINDEX, |_| {})
            // SAFETY: SIOCGIFINDEX filled in ifru_ifindex.
            .map(|r| unsafe { r.ifr_ifru.ifru_ifindex })
            .unwrap_or_else(|e| panic!("index of {name}: {e}"));
        // struct ifinfomsg (family, pad, type, index, flags, change).
        let mut msg = vec![libc::AF_UNSPEC as u8, 0, 0, 0];
        msg.extend_from_slice(&index.to_ne_bytes());
        msg.extend_from_slice(&[0; 8]);
        self.rtnetlink(libc::RTM_DELLINK, 0, msg)
            .unwrap_or_else(|e| panic!("delete {name}: {e}"));
    }

    /// Create a veth pair, as `ip link add NAME type veth peer PEER netns
    /// PEER_NS` does: `name` here, `peer` in `peer_ns`, both down.
    pub fn add_veth(&self, name: &str, peer: &str, peer_ns: &Netns) {
        // Attribute types (linux/if_link.h, linux/veth.h).
        const IFLA_IFNAME: u16 = 3;
        const IFLA_LINKINFO: u16 = 18;
        const IFLA_NET_NS_FD: u16 = 28;
        const IFLA_INFO_KIND: u16 = 1;
        const IFLA_INFO_DATA: u16 = 2;
        const VETH_INFO_PEER: u16 = 1;
        const NESTED: u16 = 0x8000;
        let cstr = |s: &str| [s.as_bytes(), &[0]].concat();
        // An empty struct ifinfomsg, then IFLA_IFNAME.
        let link = |name: &str| [&[0u8; 16][..], &nla(IFLA_IFNAME, &cstr(name))].concat();
        let fd = (peer_ns.ns.as_raw_fd() as u32).to_ne_bytes();
        let peer_info = [link(peer), nla(IFLA_NET_NS_FD, &fd)].concat();
        let info = [
            nla(IFLA_INFO_KIND, &cstr("veth")),
            nla(
                IFLA_INFO_DATA | NESTED,
                &nla(VETH_INFO_PEER | NESTED, &peer_info),
            ),
        ]
        .concat();
        let msg = [link(name), nla(IFLA_LINKINFO | NESTED, &info)].concat();
        let flags = libc::NLM_F_CREATE | libc::NLM_F_EXCL;
        self.rtnetlink(libc::RTM_NEWLINK, flags as u16, msg)
            .unwrap_or_else(|e| panic!("create veth {name} (peer {peer}): {e}"));
    }

    /// Create a bridge `name` (down, no ports, no address), as `ip link
    /// add NAME type bridge` does.
    pub fn add_bridge(&self, name: &str) {
        const IFLA_IFNAME: u16 = 3;
        const IFLA_LINKINFO: u16 = 18;
        const IFLA_INFO_KIND: u16 = 1;
        const NESTED: u16 = 0x8000;
        let cstr = |s: &str| [s.as_bytes(), &[0]].concat();
        let info = nla(IFLA_INFO_KIND, &cstr("bridge"));
        let msg = [
            &[0u8; 16][..],
            &nla(IFLA_IFNAME, &cstr(name)),
            &nla(IFLA_LINKINFO | NESTED, &info),
        ]
        .concat();
        let flags = libc::NLM_F_CREATE | libc::NLM_F_EXCL;
        self.rtnetlink(libc::RTM_NEWLINK, flags as u16, msg)
            .unwrap_or_else(|e| panic!("create bridge {name}: {e}"));
    }

    /// Make interface `port` a port of bridge `bridge`, as `ip link set
    /// PORT master BRIDGE` does.
    pub fn attach_to_bridge(&self, bridge: &str, port: &str) {
        // linux/sockios.h; the libc crate lacks it.
        const SIOCBRADDIF: libc::Ioctl = 0x89a2;
        let sock = self.inet();
        if_ioctl(&sock, port, libc::SIOCGIFINDEX, |_| {})
            // SAFETY: SIOCGIFINDEX filled in ifru_ifindex.
            .map(|r| unsafe { r.ifr_ifru.ifru_ifindex })
            .and_then(|index| {
                if_ioctl(&sock, bridge, SIOCBRADDIF, |r| {
                    r.ifr_ifru.ifru_ifindex = index
                })
            })
            .unwrap_or_else(|e| panic!("attach {port} to bridge {bridge}: {e}"));
    }

    /// Add a default route via `gateway`, as `ip route add default via
    /// GATEWAY` does (the gateway must be on a subnet of an interface
    /// that is up).
    pub fn add_default_route(&self, gateway: [u8; 4]) {
        // SAFETY: rtentry is plain data (a null rt_dev means any device).
        let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
        rt.rt_dst = sockaddr_in([0; 4]);
        rt.rt_genmask = sockaddr_in([0; 4]);
        rt.rt_gateway = sockaddr_in(gateway);
        rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
        let sock = self.inet();
        // SAFETY: SIOCADDRT reads one struct rtentry, which we own.
        cvt(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCADDRT, &mut rt) })
            .unwrap_or_else(|e| panic!("add a default route via {gateway:?}: {e}"));
    }

    /// Send rtnetlink request `ty` (with `flags` beside NLM_F_REQUEST and
    /// NLM_F_ACK) whose body is `body` from inside the namespace, and
    /// return the kernel's answer.
    fn rtnetlink(&self, ty: u16, flags: u16, body: Vec<u8>) -> io::Result<()> {
        self.run(|| {
            let sock = socket(libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_ROUTE)?;
            // struct nlmsghdr (len, type, flags, seq, pid), then the body.
            let mut msg = Vec::with_capacity(16 + body.len());
            msg.extend_from_slice(&(16 + body.len() as u32).to_ne_bytes());
            msg.extend_from_slice(&ty.to_ne_bytes());
            let flags = flags | (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;
            msg.extend_from_slice(&flags.to_ne_bytes());
            msg.extend_from_slice(&1u32.to_ne_bytes());
            msg.extend_from_slice(&0u32.to_ne_bytes());
            msg.extend_from_slice(&body);
            // SAFETY: msg is a valid buffer of msg.len() bytes.
            let n = unsafe { libc::send(sock.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut ack = [0u8; 1024];
            // SAFETY: ack is a valid buffer of ack.len() bytes.
            let n = unsafe { libc::recv(sock.as_raw_fd(), ack.as_mut_ptr().cast(), ack.len(), 0) };
            if n < 20 {
                return Err(io::Error::other(format!("short netlink answer ({n})")));
            }
            // NLMSG_ERROR carries -errno after the 16-byte header; 0 is
            // the acknowledgement.
            let ty = u16::from_ne_bytes([ack[4], ack[5]]);
            let err = i32::from_ne_bytes([ack[16], ack[17], ack[18], ack[19]]);
            if ty != libc::NLMSG_ERROR as u16 {
                return Err(io::Error::other(format!("netlink answered type {ty}")));
            }
            if err != 0 {
                return Err(io::Error::from_raw_os_error(-err));
            }
            Ok(())
        })
    }

    /// An ICMP echo client inside the namespace.
    pub fn pinger(&self) -> Pinger {
        let sock = self
            .run(|| socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP))
            .unwrap_or_else(|e| panic!("raw ICMP socket (run as root): {e}"));
        static N: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Pinger {
            sock,
            id: (std::process::id() as u16).wrapping_mul(31).wrapping_add(n),
            seq: 0,
        }
    }
}

impl Default for Netns {
    fn default() -> Self {
        Netns::new()
    }
}

/// A netlink attribute: struct nlattr (length, type), `payload`, and
/// padding to 4 bytes.
fn nla(ty: u16, payload: &[u8]) -> Vec<u8> {
    let mut a = Vec::with_capacity(4 + payload.len() + 3);
    a.extend_from_slice(&(4 + payload.len() as u16).to_ne_bytes());
    a.extend_from_slice(&ty.to_ne_bytes());
    a.extend_from_slice(payload);
    a.resize(a.len().next_multiple_of(4), 0);
    a
}

/// The Internet checksum of `data`.
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32)
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// How to ping, in `ping`'s terms.
#[derive(Clone, Copy, Debug)]
pub struct Ping {
    /// Payload bytes of each echo request (`-s`); the IP packet is 28
    /// bytes longer, the Ethernet frame 42.
    pub size: usize,
    /// Replies wanted (`-c`).
    pub count: u32,
    /// Time between requests (`-i`).
    pub interval: Duration,
    /// Keep sending until `count` replies came or this much time passed
    /// (`-w`); without it, send `count` requests and wait `wait` after
    /// the last one.
    pub retry_for: Option<Duration>,
    /// Time to wait for replies after the last request (`-W`).
    pub wait: Duration,
}

impl Ping {
    /// `count` replies of `size` payload bytes, sending every `interval`
    /// for up to 20 s (a guest may still be booting when the first goes).
    pub fn until_answered(count: u32, size: usize, interval: Duration) -> Ping {
        Ping {
            size,
            count,
            interval,
            retry_for: Some(Duration::from_secs(20)),
            wait: Duration::from_secs(5),
        }
    }

    /// Exactly `count` requests of `size` payload bytes, 0.2 s apart,
    /// then `wait` for the replies.
    pub fn exactly(count: u32, size: usize, wait: Duration) -> Ping {
        Ping {
            size,
            count,
            interval: Duration::from_millis(200),
            retry_for: None,
            wait,
        }
    }
}

/// Requests sent and whole, correct replies received.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Echoes {
    pub sent: u32,
    pub received: u32,
}

/// Sends ICMP echo requests from a raw socket and counts the replies
/// that come back whole: same identifier, sequence number and payload.
pub struct Pinger {
    sock: OwnedFd,
    id: u16,
    seq: u16,
}

impl Pinger {
    /// Ping `dst` as `how` says.
    pub fn ping(&mut self, dst: [u8; 4], how: Ping) -> Echoes {
        let start = Instant::now();
        let mut sent = BTreeSet::new();
        let mut got = BTreeSet::new();
        let mut next = start;
        let mut last = start;
        loop {
            if got.len() as u32 >= how.count {
                break;
            }
            let now = Instant::now();
            let more = match how.retry_for {
                Some(d) => now < start + d,
                None => (sent.len() as u32) < how.count,
            };
            let end = match how.retry_for {
                Some(d) => start + d,
                None => last + how.wait,
            };
            if !more && now >= end {
                break;
            }
            if more && now >= next {
                self.seq = self.seq.wrapping_add(1);
                self.send(dst, self.seq, how.size);
                sent.insert(self.seq);
                last = now;
                next = now + how.interval;
            }
            let until = if more { next.min(end) } else { end };
            if let Some(seq) = self.recv(dst, how.size, until) {
                if sent.contains(&seq) {
                    got.insert(seq);
                }
            }
        }
        Echoes {
            sent: sent.len() as u32,
            received: got.len() as u32,
        }
    }

    fn payload(seq: u16, size: usize) -> impl Iterator<Item = u8> {
        (0..size).map(move |i| (i as u16).wrapping_mul(7).wrapping_add(seq) as u8)
    }

    fn send(&self, dst: [u8; 4], seq: u16, size: usize) {
        let mut m = vec![8u8, 0, 0, 0];
        m.extend_from_slice(&self.id.to_be_bytes());
        m.extend_from_slice(&seq.to_be_bytes());
        m.extend(Self::payload(seq, size));
        let c = checksum(&m);
        m[2..4].copy_from_slice(&c.to_be_bytes());
        let to = sockaddr_in(dst);
        // SAFETY: m and to are valid for the lengths given.
        let n = unsafe {
            libc::sendto(
                self.sock.as_raw_fd(),
                m.as_ptr().cast(),
                m.len(),
                0,
                &to,
                std::mem::size_of::<libc::sockaddr>() as libc::socklen_t,
            )
        };
        // A request that cannot go out (no ARP answer yet) is lost, as
        // with ping.
        let _ = n;
    }

    /// The sequence number of the next whole echo reply from `dst` to
    /// this pinger with `size` payload bytes, if one comes by `until`.
    fn recv(&self, dst: [u8; 4], size: usize, until: Instant) -> Option<u16> {
        let mut buf = vec![0u8; 65536];
        loop {
            let left = until.saturating_duration_since(Instant::now());
            let mut p = libc::pollfd {
                fd: self.sock.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: p is one valid pollfd.
            let r = unsafe { libc::poll(&mut p, 1, left.as_millis().min(60_000) as libc::c_int) };
            if r <= 0 {
                return None;
            }
            // SAFETY: buf is valid for buf.len() bytes.
            let n = unsafe {
                libc::recv(
                    self.sock.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n <= 0 {
                continue;
            }
            if let Some(seq) = self.parse_reply(&buf[..n as usize], dst, size) {
                return Some(seq);
            }
        }
    }

    /// The sequence number of `pkt` if it is an echo reply from `dst` to
    /// this pinger, with the payload sent and a correct checksum.
    fn parse_reply(&self, pkt: &[u8], dst: [u8; 4], size: usize) -> Option<u16> {
        let ihl = (*pkt.first()? & 0xf) as usize * 4;
        let total = u16::from_be_bytes([*pkt.get(2)?, *pkt.get(3)?]) as usize;
        if pkt.len() < ihl + 8 || total != pkt.len() || pkt[9] != 1 || pkt[12..16] != dst {
            return None;
        }
        let icmp = &pkt[ihl..];
        if icmp[0] != 0 || icmp[1] != 0 || checksum(icmp) != 0 {
            return None;
        }
        if u16::from_be_bytes([icmp[4], icmp[5]]) != self.id || icmp.len() != 8 + size {
            return None;
        }
        let seq = u16::from_be_bytes([icmp[6], icmp[7]]);
        icmp[8..]
            .iter()
            .copied()
            .eq(Self::payload(seq, size))
            .then_some(seq)
    }
}

/// Clear FD_CLOEXEC on `fd` in a command's child, so that the program it
/// runs inherits `fd` (as a launcher passes a TAP to `--net:NAME=@FD`).
pub fn inherit_fd(cmd: &mut Command, fd: RawFd) {
    // SAFETY: fcntl is async-signal-safe; fd is open in the child (the
    // caller keeps it open until the command is spawned).
    unsafe {
        cmd.pre_exec(move || cvt(libc::fcntl(fd, libc::F_SETFD, 0)).map(|_| ()));
    }
}
