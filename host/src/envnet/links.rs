//! Bridges and TAPs with system calls alone (no `ip` program): socket
//! ioctls for bridges, addresses and flags, /dev/net/tun for TAPs, one
//! rtnetlink request to delete a link.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::{NetError, Subnet};

/// Bridge ioctls (linux/sockios.h), which the libc crate does not export
/// for Linux.
const SIOCBRADDBR: libc::Ioctl = 0x89a0;
const SIOCBRADDIF: libc::Ioctl = 0x89a2;
/// `IFLA_IFNAME` (linux/if_link.h): the attribute naming a link.
const IFLA_IFNAME: u16 = 3;

/// Check that `name` can name an interface here: 1 to 15 bytes (the
/// kernel's limit) of ASCII letters, digits, '-', '_' or '.', not "." or
/// "..". The kernel refuses '/', ':' and whitespace; the rest of ASCII
/// punctuation is refused too because the name goes into nft scripts.
pub fn validate_ifname(name: &str) -> Result<(), NetError> {
    let bad = |why| {
        Err(NetError::InterfaceName {
            name: name.into(),
            why,
        })
    };
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return bad("it must be 1 to 15 bytes long");
    }
    if name == "." || name == ".." {
        return bad("it must not be \".\" or \"..\"");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return bad("only ASCII letters, digits, '-', '_' and '.' may be used (no '/', ':', spaces or quotes)");
    }
    Ok(())
}

/// The error of a failed system call `op` on interface `name`.
fn link_err(op: impl Into<String>, name: &str) -> impl FnOnce(io::Error) -> NetError {
    let (op, name) = (op.into(), name.to_string());
    move |source| NetError::Link { op, name, source }
}

/// `r`, or the error it reports (`-1` and errno).
fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// A socket of `domain` and `ty` in the calling thread's namespace.
fn socket(domain: libc::c_int, ty: libc::c_int, proto: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: socket() takes no pointers.
    let fd = cvt(unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, proto) })?;
    // SAFETY: fd was just opened and is owned nowhere else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// An AF_INET datagram socket, the handle of the interface ioctls.
fn inet_socket() -> io::Result<OwnedFd> {
    socket(libc::AF_INET, libc::SOCK_DGRAM, 0)
}

/// An ifreq naming `name` (validated: shorter than IFNAMSIZ), the rest
/// zero.
fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    ifr
}

/// Interface ioctl `req` on `ifr` through `fd`.
fn ioctl_ifreq(fd: &impl AsRawFd, req: libc::Ioctl, ifr: &mut libc::ifreq) -> io::Result<()> {
    // SAFETY: every request passed here (SIOC[GS]IF*, SIOCBRADDIF,
    // TUNSETIFF) reads and writes one struct ifreq, which we own.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), req, ifr as *mut libc::ifreq) }).map(|_| ())
}

/// `addr` as a `sockaddr` holding a `sockaddr_in`, as the address ioctls
/// take it.
fn sockaddr_in(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(addr.octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: both are 16 bytes of plain data, and any bytes are a valid
    // sockaddr.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// `name`'s index, 0 if there is no such interface.
fn index_of(name: &str) -> Result<u32, NetError> {
    validate_ifname(name)?;
    let c = CString::new(name).map_err(|_| NetError::InterfaceName {
        name: name.into(),
        why: "it contains a NUL byte",
    })?;
    // SAFETY: c is a NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if index == 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::ENODEV) {
            return Err(link_err("look up", name)(err));
        }
    }
    Ok(index)
}

/// Whether interface `name` exists in the calling thread's namespace.
pub fn link_exists(name: &str) -> Result<bool, NetError> {
    index_of(name).map(|i| i != 0)
}

/// The interfaces whose names start with `prefix`, in the calling
/// thread's namespace (through `if_nameindex`, so not depending on which
/// namespace /sys shows), to delete what a crashed run left.
pub fn links_with_prefix(prefix: &str) -> Result<Vec<String>, NetError> {
    // SAFETY: if_nameindex takes no arguments; we free what it returns
    // below, once.
    let list = unsafe { libc::if_nameindex() };
    if list.is_null() {
        return Err(link_err("list", "interfaces")(io::Error::last_os_error()));
    }
    let mut names = Vec::new();
    let mut p = list;
    // SAFETY: the list is an array ending with an entry whose index is 0;
    // every entry before it holds a NUL-terminated name. p stays inside
    // the array.
    unsafe {
        while (*p).if_index != 0 {
            let name = CStr::from_ptr((*p).if_name).to_string_lossy();
            if name.starts_with(prefix) {
                names.push(name.into_owned());
            }
            p = p.add(1);
        }
        libc::if_freenameindex(list);
    }
    names.sort();
    Ok(names)
}

/// Bring interface `name` up (or down).
pub fn set_link_up(name: &str, up: bool) -> Result<(), NetError> {
    validate_ifname(name)?;
    let op = if up { "bring up" } else { "bring down" };
    let sock = inet_socket().map_err(link_err(op, name))?;
    let mut ifr = ifreq(name);
    ioctl_ifreq(&sock, libc::SIOCGIFFLAGS, &mut ifr).map_err(link_err(op, name))?;
    // SAFETY: SIOCGIFFLAGS filled in ifru_flags.
    let mut flags = unsafe { ifr.ifr_ifru.ifru_flags };
    if up {
        flags |= libc::IFF_UP as libc::c_short;
    } else {
        flags &= !(libc::IFF_UP as libc::c_short);
    }
    ifr.ifr_ifru.ifru_flags = flags;
    ioctl_ifreq(&sock, libc::SIOCSIFFLAGS, &mut ifr).map_err(link_err(op, name))
}

/// Deletes a link being created when dropped, unless disarmed: a
/// half-made bridge or TAP is not left behind.
struct Undo<'a>(Option<&'a str>);

impl Undo<'_> {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for Undo<'_> {
    fn drop(&mut self) {
        if let Some(name) = self.0 {
            if let Err(e) = delete_link(name) {
                log::warn!("cannot delete the half-made interface {name}: {e}");
            }
        }
    }
}

/// Create bridge `name` holding address `gateway`/`prefix` (which routes
/// the subnet to it), up. It fails if `name` exists, and leaves nothing
/// behind when it fails.
pub fn create_bridge(name: &str, gateway: Ipv4Addr, prefix: u8) -> Result<(), NetError> {
    if link_exists(name)? {
        return Err(NetError::Exists { name: name.into() });
    }
    if prefix > 32 {
        let err = io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("prefix length {prefix} is more than 32"),
        );
        return Err(link_err("set the address of", name)(err));
    }
    let sock = inet_socket().map_err(link_err("create bridge", name))?;
    let c = CString::new(name).expect("validated names hold no NUL");
    // SAFETY: SIOCBRADDBR reads the NUL-terminated name c points to,
    // which outlives the call.
    cvt(unsafe { libc::ioctl(sock.as_raw_fd(), SIOCBRADDBR, c.as_ptr()) })
        .map_err(link_err("create bridge", name))?;
    let undo = Undo(Some(name));
    let op = format!("set address {gateway}/{prefix} on");
    let mut ifr = ifreq(name);
    ifr.ifr_ifru.ifru_addr = sockaddr_in(gateway);
    ioctl_ifreq(&sock, libc::SIOCSIFADDR, &mut ifr).map_err(link_err(op.clone(), name))?;
    let mask = Subnet {
        net: gateway,
        prefix,
    }
    .mask();
    let mut ifr = ifreq(name);
    ifr.ifr_ifru.ifru_netmask = sockaddr_in(mask);
    ioctl_ifreq(&sock, libc::SIOCSIFNETMASK, &mut ifr).map_err(link_err(op, name))?;
    set_link_up(name, true)?;
    undo.disarm();
    log::debug!("bridge {name} created with {gateway}/{prefix}");
    Ok(())
}

/// Make interface `port` a port of bridge `bridge`.
pub fn attach_to_bridge(bridge: &str, port: &str) -> Result<(), NetError> {
    validate_ifname(bridge)?;
    let index = index_of(port)?;
    if index == 0 {
        return Err(NetError::NoSuchLink { name: port.into() });
    }
    let op = format!("attach {port} to bridge");
    let sock = inet_socket().map_err(link_err(op.clone(), bridge))?;
    let mut ifr = ifreq(bridge);
    ifr.ifr_ifru.ifru_ifindex = index as libc::c_int;
    ioctl_ifreq(&sock, SIOCBRADDIF, &mut ifr).map_err(link_err(op, bridge))
}

/// Create persistent TAP `name` as a port of `bridge`, up, for
/// `tt-host run --net:NAME=TAP` to open. It has the flags tt-host (and
/// solo5-hvt) opens TAPs with, `IFF_TAP | IFF_NO_PI`: one queue, no
/// virtio-net header. With `owner`, that user may open it without
/// CAP_NET_ADMIN (TUNSETOWNER). It fails if `name` exists, and leaves
/// nothing behind when it fails.
pub fn create_tap(name: &str, bridge: &str, owner: Option<u32>) -> Result<(), NetError> {
    validate_ifname(bridge)?;
    if link_exists(name)? {
        return Err(NetError::Exists { name: name.into() });
    }
    let op = "create TAP";
    let tun = File::options()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(link_err("open /dev/net/tun to create TAP", name))?;
    let mut ifr = ifreq(name);
    ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    ioctl_ifreq(&tun, libc::TUNSETIFF, &mut ifr).map_err(link_err(op, name))?;
    // Until TUNSETPERSIST, closing `tun` deletes the TAP; after it, Undo.
    if let Some(uid) = owner {
        let uid = libc::c_ulong::from(uid);
        // SAFETY: TUNSETOWNER takes an integer, not a pointer.
        cvt(unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETOWNER, uid) })
            .map_err(link_err(format!("give user {uid}"), name))?;
    }
    let on: libc::c_ulong = 1;
    // SAFETY: TUNSETPERSIST takes an integer, not a pointer.
    cvt(unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETPERSIST, on) })
        .map_err(link_err("make persistent", name))?;
    let undo = Undo(Some(name));
    drop(tun);
    attach_to_bridge(bridge, name)?;
    set_link_up(name, true)?;
    undo.disarm();
    log::debug!("TAP {name} created on bridge {bridge}");
    Ok(())
}

/// Delete interface `name` (a bridge, a TAP, whatever kind): Ok if there
/// is none. A bridge's ports stay, no longer ports; a TAP a process
/// holds goes all the same (the process's reads and writes fail).
///
/// This is one rtnetlink request (RTM_DELLINK by name), not an ioctl:
/// SIOCBRDELBR deletes only bridges, and TUNSETPERSIST 0 only TAPs that
/// nobody holds.
pub fn delete_link(name: &str) -> Result<(), NetError> {
    validate_ifname(name)?;
    let err = link_err("delete", name);
    match rtnl_dellink(name) {
        Ok(()) => {
            log::debug!("interface {name} deleted");
            Ok(())
        }
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(()),
        Err(e) => Err(err(e)),
    }
}

/// Send RTM_DELLINK for `name` and read the kernel's answer.
fn rtnl_dellink(name: &str) -> io::Result<()> {
    let sock = socket(libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_ROUTE)?;
    // struct nlmsghdr (len, type, flags, seq, pid), struct ifinfomsg
    // (family, pad, type, index 0: by name, flags, change), then the
    // IFLA_IFNAME attribute (len, type, name, NUL, padding to 4 bytes).
    let attr_len = 4 + name.len() + 1;
    let total = 16 + 16 + attr_len.next_multiple_of(4);
    let mut msg = Vec::with_capacity(total);
    msg.extend_from_slice(&(total as u32).to_ne_bytes());
    msg.extend_from_slice(&libc::RTM_DELLINK.to_ne_bytes());
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;
    msg.extend_from_slice(&flags.to_ne_bytes());
    let seq = 1u32;
    msg.extend_from_slice(&seq.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
    msg.extend_from_slice(&[0; 12]);
    msg.extend_from_slice(&(attr_len as u16).to_ne_bytes());
    msg.extend_from_slice(&IFLA_IFNAME.to_ne_bytes());
    msg.extend_from_slice(name.as_bytes());
    msg.resize(total, 0);
    // SAFETY: msg is a valid buffer of msg.len() bytes.
    let n = unsafe { libc::send(sock.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = [0u8; 1024];
    loop {
        // SAFETY: buf is a valid buffer of buf.len() bytes.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let mut answer = &buf[..n as usize];
        // Each message: nlmsghdr, then for NLMSG_ERROR the (negative)
        // errno, 0 meaning the acknowledgement.
        while answer.len() >= 20 {
            let len = u32::from_ne_bytes([answer[0], answer[1], answer[2], answer[3]]) as usize;
            let ty = u16::from_ne_bytes([answer[4], answer[5]]);
            let got = u32::from_ne_bytes([answer[8], answer[9], answer[10], answer[11]]);
            if ty == libc::NLMSG_ERROR as u16 && got == seq {
                let err = i32::from_ne_bytes([answer[16], answer[17], answer[18], answer[19]]);
                return match err {
                    0 => Ok(()),
                    e => Err(io::Error::from_raw_os_error(-e)),
                };
            }
            if len < 16 || len > answer.len() {
                break;
            }
            answer = &answer[len.next_multiple_of(4).min(answer.len())..];
        }
        if n == 0 {
            return Err(io::Error::other("rtnetlink closed without answering"));
        }
    }
}

/// Turn on IPv4 forwarding (`/proc/sys/net/ipv4/ip_forward`) in the
/// calling thread's namespace, which the port forwards and outgoing
/// traffic need; true if it was off.
pub fn enable_ip_forward() -> Result<bool, NetError> {
    let path = "/proc/sys/net/ipv4/ip_forward";
    let err = |source| NetError::IpForward { source };
    if std::fs::read_to_string(path).map_err(err)?.trim() == "1" {
        return Ok(false);
    }
    std::fs::write(path, "1\n").map_err(err)?;
    log::info!("IPv4 forwarding enabled");
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names() {
        for good in ["ttbr1", "tt-tap-1.2", "a", "x_y", &"x".repeat(15)] {
            validate_ifname(good).unwrap();
        }
        for (bad, says) in [
            ("", "1 to 15 bytes"),
            (&"x".repeat(16), "1 to 15 bytes"),
            (".", "\".\""),
            ("..", "\"..\""),
            ("br/0", "no '/'"),
            ("br:0", "no '/', ':'"),
            ("br 0", "spaces"),
            ("br\t0", "spaces"),
            ("br\"0", "quotes"),
            ("br\0x", "only ASCII"),
            ("brü", "only ASCII"),
        ] {
            let e = validate_ifname(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad:?}: {e}");
            assert!(e.starts_with("interface name"), "{e}");
        }
        // Bad names are refused before any system call.
        assert!(matches!(
            delete_link("a/b"),
            Err(NetError::InterfaceName { .. })
        ));
        assert!(matches!(
            create_tap("tap0", "b r", None),
            Err(NetError::InterfaceName { .. })
        ));
    }
}
