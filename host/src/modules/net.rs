//! Network devices (TAP) and POLL: NET_WRITE, NET_READ, POLL.
//!
//! Each device is a TAP interface: an existing one that is up, opened
//! through /dev/net/tun (`IFF_TAP | IFF_NO_PI`) as solo5-hvt's
//! `tap_attach` does (`--net:NAME=TAP`), or one a launcher opened and
//! passed as a file descriptor (`--net:NAME=@FD`). Either way it is
//! non-blocking, and its MTU (SIOCGIFMTU, as solo5-hvt reads it) is the
//! guest's: NET_WRITE takes frames of up to MTU + 14 bytes and NET_READ
//! buffers of at least MTU + 14. NET_READ answers `AGAIN` when no frame
//! is waiting; POLL sleeps until a device has a frame or the timeout
//! passes and returns the set of ready handles and their number. Where
//! this differs from solo5-hvt (frame lengths, TAP errors) docs/ABI.md
//! says so.

use super::kind::{Attached, Context, DeviceError, DeviceKind, Given, OptionSpec};
use super::poll::Readiness;
use super::{
    check_range, check_writable, read_args_mut, set_out, Action, GuestError, GuestMem, Module,
};
use crate::abi::{ret, HcNetRead, HcNetWrite, Hypercall};
use crate::loader::manifest::DeviceInfo;
use crate::resources::Unikernel;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use vm_memory::{Bytes, GuestAddress};

/// Why a network device could not be attached.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("net device '{name}': TAP interface '{tap}' does not exist (create it first, e.g. `ip tuntap add {tap} mode tap`)")]
    NoSuchTap { name: String, tap: String },
    #[error("net device '{name}': TAP interface '{tap}' is down (bring it up first, e.g. `ip link set {tap} up`)")]
    TapDown { name: String, tap: String },
    #[error("net device '{name}': TAP interface '{tap}' is already in use (by another tt-host, solo5-hvt or another device of this guest)")]
    TapBusy { name: String, tap: String },
    #[error("net device '{name}': interface '{tap}' is not a single-queue TAP interface (create one with `ip tuntap add {tap} mode tap`)")]
    NotATap { name: String, tap: String },
    #[error("net device '{name}': interface name '{tap}' is not valid (1 to 15 bytes, no '/', ':' or spaces)")]
    BadTapName { name: String, tap: String },
    #[error("net device '{name}': cannot attach to TAP '{tap}': {err}")]
    Attach {
        name: String,
        tap: String,
        err: std::io::Error,
    },
    #[error("net device '{name}': '{tap}' is not a file descriptor (use @FD with FD a decimal number, e.g. @3, or a TAP interface's name)")]
    BadFd { name: String, tap: String },
    #[error("net device '{name}': file descriptor {fd} is not open (the launcher must pass the TAP's descriptor to tt-host open and without FD_CLOEXEC)")]
    FdNotOpen { name: String, fd: RawFd },
    #[error("net device '{name}': file descriptor {fd} is not a TAP device (expected an open /dev/net/tun attached to a TAP interface)")]
    FdNotTun { name: String, fd: RawFd },
    #[error("net device '{name}': file descriptor {fd} is a /dev/net/tun file attached to no interface (attach it with TUNSETIFF first)")]
    FdDetached { name: String, fd: RawFd },
    #[error("net device '{name}': file descriptor {fd} is attached to '{tap}', which is {what}; tt-host needs a TAP opened with IFF_TAP | IFF_NO_PI and no IFF_VNET_HDR")]
    FdWrongKind {
        name: String,
        fd: RawFd,
        tap: String,
        what: &'static str,
    },
    #[error("net device '{name}': TAP interface '{tap}' is already attached as another network device of this guest")]
    SameTapTwice { name: String, tap: String },
    #[error("net device '{name}': '{mac}' is not a guest MAC address: {why}")]
    BadMac {
        name: String,
        mac: String,
        why: &'static str,
    },
}

/// Parse a `--net-mac` value: six bytes of one or two hex digits each
/// (`02:00:0a:ff:10:01`, `2:0:a:ff:10:1`), separated by `:` (as
/// solo5-hvt reads it) or `-`, one separator throughout. All zeros means
/// "no address given", as in solo5-hvt's setup: the result is a random one.
/// A guest's address must be unicast (bit 0 of the first byte clear;
/// solo5-hvt passes a multicast one on); the error says what is wrong.
pub fn parse_mac(s: &str) -> Result<[u8; 6], &'static str> {
    let sep = if s.contains('-') { '-' } else { ':' };
    let parts: Vec<&str> = s.split(sep).collect();
    if parts.len() != 6
        || parts
            .iter()
            .any(|p| !(1..=2).contains(&p.len()) || !p.bytes().all(|c| c.is_ascii_hexdigit()))
    {
        return Err("expected six hex bytes like 02:00:00:00:00:01");
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(parts) {
        *b = u8::from_str_radix(p, 16).expect("one or two hex digits");
    }
    if mac == [0; 6] {
        return Ok(random_mac());
    }
    if mac[0] & 1 != 0 {
        return Err("a multicast address (the first byte is odd)");
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
    /// The TAP interface's MTU when it was attached: the guest's MTU.
    pub mtu: u16,
    /// The TAP interface's name.
    pub tap_name: String,
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

    /// Longest frame the guest may send or must take: MTU + header.
    pub fn frame_max(&self) -> usize {
        self.mtu as usize + ETH_HEADER as usize
    }

    /// Attach device `name` to `tap`: a TAP interface's name, or `@FD`
    /// for a TAP a launcher opened as file descriptor FD.
    pub fn attach(name: &str, handle: u64, tap: &str, mac: [u8; 6]) -> Result<Self, NetError> {
        match tap.strip_prefix('@') {
            Some(_) => Self::open_fd(name, handle, parse_fd(name, tap)?, mac),
            None => Self::open_tap(name, handle, tap, mac),
        }
    }

    /// Attach the existing TAP interface `tap` as device `name`.
    pub fn open_tap(name: &str, handle: u64, tap: &str, mac: [u8; 6]) -> Result<Self, NetError> {
        Self::open_tap_with(name, handle, tap, mac, Self::open_tun)
    }

    /// Open /dev/net/tun, non-blocking, for [`Self::open_tap_with`].
    pub fn open_tun() -> std::io::Result<File> {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
    }

    /// [`Self::open_tap`] through the /dev/net/tun file `tun` gives
    /// (`--x-client` opens it beforehand, as tt-host, and attaches it to
    /// the TAP with the client's rights, which the kernel checks then).
    pub fn open_tap_with(
        name: &str,
        handle: u64,
        tap: &str,
        mac: [u8; 6],
        tun: impl FnOnce() -> std::io::Result<File>,
    ) -> Result<Self, NetError> {
        if tap.is_empty() || tap.len() >= libc::IFNAMSIZ || tap.contains(['/', ':', ' ', '\0']) {
            return Err(NetError::BadTapName {
                name: name.into(),
                tap: tap.into(),
            });
        }
        let attach = |err| NetError::Attach {
            name: name.into(),
            tap: tap.into(),
            err,
        };
        // As solo5-hvt's tap_attach: the interface must exist (else
        // TUNSETIFF would create a fresh TAP nobody routes to) and be up.
        let sock = ifreq_socket().map_err(attach)?;
        match interface_flags(sock.as_fd(), tap) {
            Ok(flags) if flags & libc::IFF_UP != 0 => {}
            Ok(_) => {
                return Err(NetError::TapDown {
                    name: name.into(),
                    tap: tap.into(),
                })
            }
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => {
                return Err(NetError::NoSuchTap {
                    name: name.into(),
                    tap: tap.into(),
                })
            }
            Err(err) => return Err(attach(err)),
        }
        let file = tun().map_err(attach)?;
        let mut ifr = ifreq(tap);
        ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes one struct ifreq, which we own.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr) } < 0 {
            let err = std::io::Error::last_os_error();
            return Err(match err.raw_os_error() {
                Some(libc::EBUSY) => NetError::TapBusy {
                    name: name.into(),
                    tap: tap.into(),
                },
                Some(libc::EINVAL) => NetError::NotATap {
                    name: name.into(),
                    tap: tap.into(),
                },
                _ => attach(err),
            });
        }
        // Read after attaching, so that it is the interface we hold.
        let mtu = interface_mtu(sock.as_fd(), tap).map_err(attach)?;
        Ok(NetDevice {
            name: name.into(),
            handle,
            mac,
            mtu,
            tap_name: tap.into(),
            tap: file,
            dropped: 0,
            reported: false,
        })
    }

    /// The /dev/net/tun file attached to the TAP, for a launcher that
    /// passes it on as `--net:NAME=@FD` (`tt-host run --x-client`).
    pub fn into_file(self) -> File {
        self.tap
    }

    /// Attach the TAP that file descriptor `fd` (inherited from a launcher)
    /// holds, as device `name`. The descriptor must be a /dev/net/tun file
    /// attached to a TAP interface with `IFF_NO_PI` (checked where /sys
    /// shows the interface) and without `IFF_VNET_HDR`, so that it
    /// carries frames as NET_WRITE and NET_READ do, and the interface must
    /// be up. tt-host uses a duplicate of it, made
    /// non-blocking (which the launcher's copy shares, as with
    /// solo5-hvt), and leaves `fd` itself open.
    pub fn open_fd(name: &str, handle: u64, fd: RawFd, mac: [u8; 6]) -> Result<Self, NetError> {
        // SAFETY: F_GETFD takes no pointer; on a closed fd it fails EBADF.
        if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(NetError::FdNotOpen {
                name: name.into(),
                fd,
            });
        }
        // SAFETY: fd is open (checked above) and stays open while borrowed:
        // nothing in this function closes it, and tt-host's other threads
        // (none yet) never touch descriptors they did not open.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        let (tap, flags) = tun_interface(borrowed).map_err(|err| match err.raw_os_error() {
            Some(libc::EBADFD) => NetError::FdDetached {
                name: name.into(),
                fd,
            },
            _ => NetError::FdNotTun {
                name: name.into(),
                fd,
            },
        })?;
        let attach = |err| NetError::Attach {
            name: name.into(),
            tap: tap.clone(),
            err,
        };
        // The name is looked up in the TAP's own network namespace, which
        // may not be tt-host's (a launcher may open it in another one).
        let (sock, ours) = ifreq_socket_for(borrowed).map_err(attach)?;
        // TUNGETIFF reports IFF_NO_PI's bit set whenever no socket filter
        // is attached (it is also IFF_NOFILTER), so that one comes from
        // the interface's tun_flags in sysfs, where tt-host can see it.
        let no_pi = if ours {
            sysfs_tun_flags(sock.as_fd(), &tap).map(|f| f & libc::IFF_NO_PI != 0)
        } else {
            None
        };
        let what = if flags & libc::IFF_TAP == 0 {
            Some("a TUN (IP packets, no Ethernet header)")
        } else if no_pi == Some(false) {
            Some("opened without IFF_NO_PI (each frame has a packet information header)")
        } else if flags & libc::IFF_VNET_HDR != 0 {
            Some("opened with IFF_VNET_HDR (each frame has a virtio-net header)")
        } else {
            None
        };
        if let Some(what) = what {
            return Err(NetError::FdWrongKind {
                name: name.into(),
                fd,
                tap: tap.clone(),
                what,
            });
        }
        match interface_flags(sock.as_fd(), &tap) {
            Ok(f) if f & libc::IFF_UP != 0 => {}
            Ok(_) => {
                return Err(NetError::TapDown {
                    name: name.into(),
                    tap: tap.clone(),
                })
            }
            Err(err) => return Err(attach(err)),
        }
        let mtu = interface_mtu(sock.as_fd(), &tap).map_err(attach)?;
        let file: File = borrowed.try_clone_to_owned().map_err(attach)?.into();
        // SAFETY: F_GETFL/F_SETFL take no pointers; the results are checked.
        let fl = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
        // SAFETY: as above.
        if fl < 0
            || unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK) } < 0
        {
            return Err(attach(std::io::Error::last_os_error()));
        }
        Ok(NetDevice {
            name: name.into(),
            handle,
            mac,
            mtu,
            tap_name: tap,
            tap: file,
            dropped: 0,
            reported: false,
        })
    }
}

/// Parse `@FD` (decimal, as solo5-hvt reads it).
fn parse_fd(name: &str, tap: &str) -> Result<RawFd, NetError> {
    tap.strip_prefix('@')
        .filter(|d| !d.is_empty() && d.bytes().all(|c| c.is_ascii_digit()))
        .and_then(|d| d.parse().ok())
        .ok_or_else(|| NetError::BadFd {
            name: name.into(),
            tap: tap.into(),
        })
}

/// The TAP interface `tap` names: itself, or for `@FD` the interface that
/// descriptor FD is attached to (for admission, which knows interfaces).
pub fn interface_of(name: &str, tap: &str) -> Result<String, NetError> {
    if !tap.starts_with('@') {
        return Ok(tap.into());
    }
    let fd = parse_fd(name, tap)?;
    // SAFETY: F_GETFD takes no pointer; on a closed fd it fails EBADF.
    if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(NetError::FdNotOpen {
            name: name.into(),
            fd,
        });
    }
    // SAFETY: fd is open (checked above) and nothing closes it meanwhile.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    tun_interface(borrowed)
        .map(|(tap, _)| tap)
        .map_err(|err| match err.raw_os_error() {
            Some(libc::EBADFD) => NetError::FdDetached {
                name: name.into(),
                fd,
            },
            _ => NetError::FdNotTun {
                name: name.into(),
                fd,
            },
        })
}

use std::os::unix::fs::OpenOptionsExt;

/// An ifreq naming interface `name` (shorter than IFNAMSIZ: checked by
/// the caller or given by the kernel), the rest zero.
fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name[..libc::IFNAMSIZ - 1]
        .iter_mut()
        .zip(name.bytes())
    {
        *dst = src as libc::c_char;
    }
    ifr
}

/// A socket to ask interface ioctls on, in this process's network
/// namespace.
fn ifreq_socket() -> std::io::Result<OwnedFd> {
    // SAFETY: socket() takes no pointers; the result is checked below.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a socket we just opened and own nowhere else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A socket to ask interface ioctls on, in the network namespace of the
/// TAP that `tun` is attached to, and whether that is tt-host's. It is
/// taken to be unless TUNGETDEVNETNS (Linux 5.2, CAP_NET_ADMIN over the
/// TAP's namespace) names another one, where the socket is made by a
/// thread that enters it (setns, CAP_SYS_ADMIN): a socket keeps the
/// namespace it was made in.
fn ifreq_socket_for(tun: BorrowedFd<'_>) -> std::io::Result<(OwnedFd, bool)> {
    // SAFETY: TUNGETDEVNETNS takes no argument and returns a new fd.
    let ns = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNGETDEVNETNS) };
    if ns < 0 {
        // An older kernel, or no CAP_NET_ADMIN there: assume ours.
        return Ok((ifreq_socket()?, true));
    }
    // SAFETY: the ioctl returned a new fd that nothing else owns.
    let ns = unsafe { OwnedFd::from_raw_fd(ns) };
    let theirs = File::from(ns.try_clone()?).metadata()?;
    let ours = std::fs::metadata("/proc/thread-self/ns/net")?;
    use std::os::unix::fs::MetadataExt;
    if (theirs.dev(), theirs.ino()) == (ours.dev(), ours.ino()) {
        return Ok((ifreq_socket()?, true));
    }
    let sock = std::thread::spawn(move || {
        // SAFETY: ns is an open namespace fd; setns changes this thread
        // only, which ends right after making the socket.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        ifreq_socket()
    })
    .join()
    .map_err(|_| std::io::Error::other("the namespace thread panicked"))??;
    Ok((sock, false))
}

/// TUN interface `name`'s `IFF_*` flags from sysfs, if /sys shows the
/// same interface as `sock`'s namespace (same index); `None` otherwise.
fn sysfs_tun_flags(sock: BorrowedFd<'_>, name: &str) -> Option<libc::c_int> {
    let dir = std::path::Path::new("/sys/class/net").join(name);
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok();
    let index: libc::c_int = read("ifindex")?.trim().parse().ok()?;
    let mut ifr = ifreq(name);
    // SAFETY: SIOCGIFINDEX reads the name from and writes the index into
    // one struct ifreq, which we own.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFINDEX, &mut ifr) } < 0 {
        return None;
    }
    // SAFETY: SIOCGIFINDEX succeeded, so it filled in ifru_ifindex.
    if unsafe { ifr.ifr_ifru.ifru_ifindex } != index {
        return None;
    }
    let flags = read("tun_flags")?;
    libc::c_int::from_str_radix(flags.trim().trim_start_matches("0x"), 16).ok()
}

/// The interface a /dev/net/tun file is attached to, and its `IFF_*`
/// TUN flags (TUNGETIFF). `EBADFD` if it is attached to none; another
/// error if `fd` is no /dev/net/tun file.
fn tun_interface(fd: BorrowedFd<'_>) -> std::io::Result<(String, libc::c_int)> {
    let mut ifr = ifreq("");
    // SAFETY: TUNGETIFF writes one struct ifreq, which we own; on any
    // other kind of file the ioctl fails without writing.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNGETIFF, &mut ifr) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let name: Vec<u8> = ifr
        .ifr_name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    // SAFETY: TUNGETIFF succeeded, so it filled in ifru_flags.
    let flags = unsafe { ifr.ifr_ifru.ifru_flags } as libc::c_int & 0xffff;
    Ok((String::from_utf8_lossy(&name).into_owned(), flags))
}

/// The `IFF_*` flags of network interface `name` (`ENODEV` if there is
/// none) in the network namespace of `sock`.
fn interface_flags(sock: BorrowedFd<'_>, name: &str) -> std::io::Result<libc::c_int> {
    let mut ifr = ifreq(name);
    // SAFETY: SIOCGIFFLAGS reads the name from and writes the flags into
    // one struct ifreq, which we own.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFFLAGS succeeded, so it filled in ifru_flags.
    Ok(unsafe { ifr.ifr_ifru.ifru_flags } as libc::c_int & 0xffff)
}

/// The MTU of network interface `name` in the network namespace of
/// `sock` (SIOCGIFMTU, as solo5-hvt reads it), as the manifest's 16 bits.
fn interface_mtu(sock: BorrowedFd<'_>, name: &str) -> std::io::Result<u16> {
    let mut ifr = ifreq(name);
    // SAFETY: SIOCGIFMTU reads the name from and writes the MTU into one
    // struct ifreq, which we own.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFMTU, &mut ifr) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFMTU succeeded, so it filled in ifru_mtu.
    let mtu = unsafe { ifr.ifr_ifru.ifru_mtu };
    // Linux keeps an Ethernet device's MTU within 68..=65535.
    u16::try_from(mtu).map_err(|_| std::io::Error::other(format!("its MTU {mtu} is out of range")))
}

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

    /// What POLL waits on for each TAP: a frame to read, or the TAP
    /// failed (then a read returns the error). Each holds its own
    /// descriptor of the TAP (a duplicate), so it lives on its own.
    pub fn readiness(&self) -> std::io::Result<Vec<Box<dyn Readiness>>> {
        self.devices
            .iter()
            .map(|d| {
                let tap = d.tap.try_clone()?;
                Ok(Box::new(TapReady {
                    handle: d.handle,
                    tap,
                }) as Box<dyn Readiness>)
            })
            .collect()
    }

    /// NET_WRITE: send one frame of `len` bytes.
    fn write(&mut self, arg: u64, mem: &GuestMem) -> Result<Action, GuestError> {
        let (
            HcNetWrite {
                handle, data, len, ..
            },
            at,
        ) = read_args_mut::<HcNetWrite>(mem, arg)?;
        let set_ret = |r: i32| set_out!(mem, at, HcNetWrite.ret = r);
        let Some(dev) = self.devices.iter_mut().find(|d| d.handle == handle) else {
            set_ret(ret::EINVAL);
            return Ok(Action::Continue);
        };
        // The buffer is checked first, as solo5-hvt does: a buffer outside
        // guest memory stops the guest whatever its length.
        check_range(mem, "net frame", data, len)?;
        if !(ETH_HEADER..=dev.frame_max() as u64).contains(&len) {
            set_ret(ret::EINVAL);
            return Ok(Action::Continue);
        }
        let mut buf = vec![0u8; len as usize];
        let _ = mem.read_slice(&mut buf, GuestAddress(data));
        let r = match dev.tap.write(&buf) {
            Ok(n) if n == buf.len() => {
                crate::runfile::stats::counters().net_tx(n as u64);
                ret::OK
            }
            Ok(n) => {
                dev.report(&format!("wrote {n} of a {}-byte frame", buf.len()));
                ret::EUNSPEC
            }
            Err(e) => {
                dev.report(&format!("write failed: {e}"));
                ret::EUNSPEC
            }
        };
        set_ret(r);
        Ok(Action::Continue)
    }

    /// NET_READ: receive one frame into a buffer of at least MTU + 14
    /// bytes; `len` becomes the frame's length.
    fn read(&mut self, arg: u64, mem: &GuestMem) -> Result<Action, GuestError> {
        let (
            HcNetRead {
                handle, data, len, ..
            },
            at,
        ) = read_args_mut::<HcNetRead>(mem, arg)?;
        let set_ret = |r: i32| set_out!(mem, at, HcNetRead.ret = r);
        let Some(dev) = self.devices.iter_mut().find(|d| d.handle == handle) else {
            set_ret(ret::EINVAL);
            return Ok(Action::Continue);
        };
        // The host fills it: only where the guest could write itself.
        check_writable(mem, "net buffer", data, len)?;
        if len < dev.frame_max() as u64 {
            set_ret(ret::EINVAL);
            return Ok(Action::Continue);
        }
        match read_frame(dev, &mut self.rx) {
            Ok(n) => {
                let _ = mem.write_slice(&self.rx[..n], GuestAddress(data));
                set_out!(mem, at, HcNetRead.len = n as u64);
                set_ret(ret::OK);
                crate::runfile::stats::counters().net_rx(n as u64);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => set_ret(ret::AGAIN),
            Err(e) => {
                dev.report(&format!("read failed: {e}"));
                set_ret(ret::EUNSPEC)
            }
        }
        Ok(Action::Continue)
    }
}

/// A TAP as POLL waits on it: ready when a frame waits or it failed.
struct TapReady {
    handle: u64,
    tap: File,
}

impl Readiness for TapReady {
    fn handle(&self) -> u64 {
        self.handle
    }
    fn fd(&self) -> std::os::fd::RawFd {
        self.tap.as_raw_fd()
    }
}

/// Ethernet header: the shortest frame a guest may send.
const ETH_HEADER: u64 = 14;

/// Read the next frame the guest can take (at most its MTU + 14 bytes)
/// into `buf`; longer ones (the TAP's MTU was raised after tt-host read
/// it) are dropped, as a NIC drops frames over its MTU, and reported once
/// per device. `WouldBlock` when none is waiting
/// (or the read was empty).
fn read_frame(dev: &mut NetDevice, buf: &mut [u8]) -> std::io::Result<usize> {
    for _ in 0..MAX_DROPS_PER_READ {
        let n = dev.tap.read(buf)?;
        if n == 0 {
            // Nothing to hand on: solo5-hvt answers AGAIN to an empty read.
            break;
        }
        if n <= dev.frame_max() {
            return Ok(n);
        }
        dev.dropped += 1;
        if dev.dropped == 1 {
            eprintln!(
                "tt-host: net device '{}': dropped a {n}-byte frame, longer than \
                 the guest's MTU {} + 14 (was the MTU of TAP '{}' raised after \
                 the guest started?); further drops are not reported",
                dev.name, dev.mtu, dev.tap_name
            );
        }
    }
    Err(std::io::ErrorKind::WouldBlock.into())
}

impl Module for Net {
    fn name(&self) -> &'static str {
        "net"
    }

    fn net_macs(&self) -> Vec<(String, [u8; 6])> {
        self.devices
            .iter()
            .map(|d| (d.name.clone(), d.mac))
            .collect()
    }

    fn handover_fds(&self) -> Vec<(String, RawFd)> {
        self.devices
            .iter()
            .map(|d| (d.name.clone(), d.tap.as_raw_fd()))
            .collect()
    }

    fn hypercalls(&self) -> &'static [Hypercall] {
        &[Hypercall::NetWrite, Hypercall::NetRead]
    }

    fn handle(&mut self, call: Hypercall, arg: u64, mem: &GuestMem) -> Result<Action, GuestError> {
        match call {
            Hypercall::NetWrite => self.write(arg, mem),
            Hypercall::NetRead => self.read(arg, mem),
            _ => unreachable!("net registered only its own hypercalls"),
        }
    }
}

/// The net device kind: `--net:NAME=TAP` and `--net-mac:NAME=HWADDR`, as
/// solo5-hvt's net module.
pub struct NetKind;

/// The net device kind, as registered in [`super::kind::kinds`].
pub static KIND: NetKind = NetKind;

impl DeviceKind for NetKind {
    fn name(&self) -> &'static str {
        "net"
    }

    fn mft_type(&self) -> u32 {
        crate::abi::MFT_DEV_NET_BASIC
    }

    fn options(&self) -> &'static [OptionSpec] {
        &[
            OptionSpec {
                name: "net",
                value: "TAP|@FD",
                default_for_all: false,
                help: "attach the existing TAP interface TAP, or the\n\
                       TAP a launcher opened and passed as file\n\
                       descriptor FD, as the manifest's network\n\
                       device NAME",
            },
            OptionSpec {
                name: "net-mac",
                value: "HWADDR",
                default_for_all: false,
                help: "MAC address of network device NAME\n\
                       (default: a random locally administered one)",
            },
        ]
    }

    fn check(&self, option: &str, value: &str) -> Result<(), String> {
        match option {
            "net-mac" => parse_mac(value)
                .map(|_| ())
                .map_err(|why| format!("not a guest MAC address: {why}")),
            _ => Ok(()),
        }
    }

    fn resources(&self, devices: &[Given], uk: &mut Unikernel) -> Result<(), DeviceError> {
        for d in devices {
            let tap = d.option("net").unwrap_or_default();
            if tap.starts_with('@') {
                // Admitted as the interface the descriptor holds.
                let tap = interface_of(d.name, tap)?;
                uk.bridges.insert(crate::admission::network_of_tap(&tap));
                continue;
            }
            // A TAP that does not exist is no network to admit: say so as
            // attaching it would.
            let plain = !tap.is_empty() && !tap.contains(['/', ':', ' ', '\0']) && tap != "..";
            if plain && !std::path::Path::new("/sys/class/net").join(tap).exists() {
                return Err(NetError::NoSuchTap {
                    name: d.name.into(),
                    tap: tap.into(),
                }
                .into());
            }
            uk.bridges.insert(crate::admission::network_of_tap(tap));
        }
        Ok(())
    }

    fn attach(&self, devices: &[Given], _: &Context) -> Result<Attached, DeviceError> {
        let mut opened = Vec::new();
        for d in devices {
            let mac = match d.option("net-mac") {
                Some(m) => parse_mac(m).map_err(|why| NetError::BadMac {
                    name: d.name.into(),
                    mac: m.into(),
                    why,
                })?,
                None => random_mac(),
            };
            let tap = d.option("net").unwrap_or_default();
            let dev = NetDevice::attach(d.name, d.handle, tap, mac)?;
            if opened
                .iter()
                .any(|n: &NetDevice| n.tap_name == dev.tap_name)
            {
                return Err(NetError::SameTapTwice {
                    name: d.name.into(),
                    tap: dev.tap_name,
                }
                .into());
            }
            opened.push(dev);
        }
        let info = opened
            .iter()
            .map(|n| {
                let info = DeviceInfo::Net {
                    mac: n.mac,
                    mtu: n.mtu,
                };
                (n.handle, info)
            })
            .collect();
        let net = Net::new(opened);
        let readiness = net
            .readiness()
            .map_err(|e| format!("cannot duplicate a TAP descriptor for POLL: {e}"))?;
        Ok(Attached {
            info,
            module: Box::new(net),
            readiness,
            mmio: vec![],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{FromRawFd, OwnedFd};
    use vm_memory::GuestMemoryMmap;

    const MEM: u64 = 1 << 20;
    const ARG: u64 = 0x1000;
    const BUF: u64 = 0x10000;

    fn mem() -> GuestMem {
        GuestMem::unprotected(
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap(),
        )
    }

    /// A device whose "TAP" is one end of a non-blocking datagram socket
    /// pair: like a TAP it keeps frame boundaries, polls readable when a
    /// frame waits, and cuts a frame to a shorter read buffer. The other
    /// end plays the host's network.
    fn fake(handle: u64) -> (NetDevice, File) {
        fake_mtu(handle, 1500)
    }

    /// The same with MTU `mtu`.
    fn fake_mtu(handle: u64, mtu: u16) -> (NetDevice, File) {
        let mut fds = [0; 2];
        // SAFETY: fds is a valid array of two ints for socketpair to fill.
        let r = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        assert_eq!(r, 0, "socketpair: {}", std::io::Error::last_os_error());
        // SAFETY: socketpair succeeded: both fds are open and ours alone.
        let (dev, peer) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let dev = NetDevice {
            name: format!("fake{handle}"),
            handle,
            mac: [2, 0, 0, 0, 0, 1],
            mtu,
            tap_name: format!("faketap{handle}"),
            tap: dev.into(),
            dropped: 0,
            reported: false,
        };
        (dev, peer.into())
    }

    /// Issue NET_WRITE or NET_READ for `handle` with buffer (`data`,
    /// `len`); the guest-visible (`ret`, `len`) fields afterwards.
    fn net_io(
        net: &mut Net,
        m: &GuestMem,
        call: Hypercall,
        handle: u64,
        data: u64,
        len: u64,
    ) -> Result<(i32, u64), GuestError> {
        for (off, v) in [(0, handle), (8, data), (16, len), (24, 0xdead)] {
            m.write_obj(v, GuestAddress(ARG + off)).unwrap();
        }
        net.handle(call, ARG, m)?;
        let ret: i32 = m.read_obj(GuestAddress(ARG + 24)).unwrap();
        let len: u64 = m.read_obj(GuestAddress(ARG + 16)).unwrap();
        Ok((ret, len))
    }

    /// Issue POLL over the net devices; the guest-visible (`ready_set`,
    /// `ret`).
    fn poll(net: &mut Net, m: &GuestMem, timeout_nsecs: u64) -> (u64, i32) {
        m.write_obj(timeout_nsecs, GuestAddress(ARG)).unwrap();
        m.write_obj(0xdeadu64, GuestAddress(ARG + 8)).unwrap();
        m.write_obj(0xdeadi32, GuestAddress(ARG + 16)).unwrap();
        let mut poll = crate::modules::poll::Poll::new(net.readiness().unwrap());
        assert_eq!(poll.handle(Hypercall::Poll, ARG, m), Ok(Action::Continue));
        (
            m.read_obj(GuestAddress(ARG + 8)).unwrap(),
            m.read_obj(GuestAddress(ARG + 16)).unwrap(),
        )
    }

    fn recv(peer: &mut File) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 65536];
        match peer.read(&mut buf) {
            Ok(n) => Some(buf[..n].to_vec()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
            Err(e) => panic!("{e}"),
        }
    }

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
        // solo5-hvt reads each byte with `%02hhx`: one digit is enough.
        assert_eq!(parse_mac("2:0:a:ff:10:1"), Ok([2, 0, 0xa, 0xff, 0x10, 1]));
        let shape = Err("expected six hex bytes like 02:00:00:00:00:01");
        for bad in [
            "02:00:0a:ff:10",
            "02:00:0a:ff:10:01:02",
            "zz:00:0a:ff:10:01",
            "+2:+0:00:00:00:01", // from_str_radix alone takes a sign
            "02:00-0a:ff:10:01", // mixed separators
            "002:00:0a:ff:10:01",
            "02::0a:ff:10:01",
            "02:00:0a:ff:10:01 ",
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
    }

    /// solo5-hvt takes an all-zero MAC as "none given" and makes up a
    /// random one; so does tt-host (it used to refuse it).
    #[test]
    fn an_all_zero_mac_becomes_a_random_one() {
        for zeros in ["00:00:00:00:00:00", "0:0:0:0:0:0"] {
            let m = parse_mac(zeros).unwrap();
            assert_ne!(m, [0; 6]);
            assert_eq!(m[0] & 0x03, 0x02, "local unicast: {m:02x?}");
        }
    }

    #[test]
    fn random_mac_is_local_unicast() {
        let m = random_mac();
        assert_eq!(m[0] & 0x03, 0x02);
    }

    /// NET_WRITE sends whole Ethernet frames of 14 to MTU + 14 bytes (the
    /// TAP's MTU: 1514 on a 1500 TAP, 9014 on a jumbo one), exactly as
    /// the guest wrote them; anything shorter or longer, or a handle that
    /// is not a net device, is EINVAL and sends nothing.
    #[test]
    fn net_write_frame_sizes_follow_the_mtu() {
        for mtu in [1500u16, 9000] {
            let max = mtu as usize + 14;
            let m = mem();
            let (dev, mut peer) = fake_mtu(1, mtu);
            let mut net = Net::new(vec![dev]);
            let frame: Vec<u8> = (0..max).map(|i| i as u8).collect();
            m.write_slice(&frame, GuestAddress(BUF)).unwrap();
            for len in [14, 60, 1514, max] {
                let r = net_io(&mut net, &m, Hypercall::NetWrite, 1, BUF, len as u64);
                assert_eq!(r.unwrap().0, ret::OK, "MTU {mtu}: {len}");
                assert_eq!(recv(&mut peer).as_deref(), Some(&frame[..len]), "{len}");
            }
            for len in [0, 13, max + 1, 65536] {
                let r = net_io(&mut net, &m, Hypercall::NetWrite, 1, BUF, len as u64);
                assert_eq!(r.unwrap().0, ret::EINVAL, "MTU {mtu}: {len}");
            }
            for handle in [0, 2, 1 << 40] {
                let r = net_io(&mut net, &m, Hypercall::NetWrite, handle, BUF, 60);
                assert_eq!(r.unwrap().0, ret::EINVAL, "handle {handle}");
            }
            assert_eq!(recv(&mut peer), None, "nothing else was sent");
        }
    }

    /// A buffer outside guest memory stops the guest, whatever its length,
    /// as solo5-hvt's checked address does before it looks at the length.
    /// (tt-host used to answer EINVAL when the length was also wrong.)
    #[test]
    fn a_buffer_outside_memory_stops_the_guest_whatever_its_length() {
        let m = mem();
        let (dev, _peer) = fake(1);
        let mut net = Net::new(vec![dev]);
        for (call, len) in [
            (Hypercall::NetWrite, 0),
            (Hypercall::NetWrite, 60),
            (Hypercall::NetWrite, 9014),
            (Hypercall::NetRead, 0),
            (Hypercall::NetRead, 60),
            (Hypercall::NetRead, 1514),
        ] {
            let r = net_io(&mut net, &m, call, 1, MEM + 0x1000, len);
            assert!(
                matches!(r, Err(GuestError::BadAddress { .. })),
                "{call:?} of {len} bytes: {r:?}"
            );
        }
        // Inside memory but running past its end.
        let r = net_io(&mut net, &m, Hypercall::NetWrite, 1, MEM - 10, 60);
        assert!(matches!(r, Err(GuestError::BadAddress { .. })), "{r:?}");
    }

    /// NET_READ takes a buffer of at least MTU + 14 bytes and fills it
    /// with one whole frame of up to that size, or answers AGAIN.
    #[test]
    fn net_read_delivers_one_whole_frame_or_again() {
        for mtu in [1500u16, 9000] {
            let max = mtu as usize + 14;
            let m = mem();
            let (dev, mut peer) = fake_mtu(0, mtu);
            let mut net = Net::new(vec![dev]);
            let read = |net: &mut Net, len: u64| net_io(net, &m, Hypercall::NetRead, 0, BUF, len);
            assert_eq!(read(&mut net, 65536).unwrap(), (ret::AGAIN, 65536));

            let frame: Vec<u8> = (0..max).map(|i| (i * 7) as u8).collect();
            peer.write_all(&frame).unwrap();
            // A buffer shorter than MTU + header is refused, and the frame stays.
            assert_eq!(read(&mut net, max as u64 - 1).unwrap().0, ret::EINVAL);
            assert_eq!(read(&mut net, max as u64).unwrap(), (ret::OK, max as u64));
            let mut got = vec![0u8; max];
            m.read_slice(&mut got, GuestAddress(BUF)).unwrap();
            assert_eq!(got, frame, "MTU {mtu}");

            // A frame over the MTU (the TAP's MTU grew since) is dropped,
            // not cut, even into a larger buffer; the next one comes.
            peer.write_all(&vec![0xaa; max + 1]).unwrap();
            peer.write_all(&frame[..60]).unwrap();
            assert_eq!(read(&mut net, 65536).unwrap(), (ret::OK, 60));
            assert_eq!(net.devices[0].dropped, 1);
            assert_eq!(read(&mut net, 65536).unwrap().0, ret::AGAIN);
        }
    }

    #[test]
    fn net_read_into_protected_memory_is_refused_and_the_frame_stays() {
        let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
        let text = crate::loader::Protected {
            start: BUF,
            end: BUF + 0x1000,
            what: "the image's code",
        };
        let m = GuestMem::new(m, vec![text]);
        let (dev, mut peer) = fake(0);
        let mut net = Net::new(vec![dev]);
        let frame = [0x5au8; 60];
        peer.write_all(&frame).unwrap();
        for data in [BUF, BUF - 100] {
            let r = net_io(&mut net, &m, Hypercall::NetRead, 0, data, 2048);
            assert!(matches!(r, Err(GuestError::ReadOnly { .. })), "{r:?}");
        }
        let mut text_now = vec![0u8; 0x1000];
        m.read_slice(&mut text_now, GuestAddress(BUF)).unwrap();
        assert!(text_now.iter().all(|&b| b == 0), "the code was written");
        // The struct itself in the code: refused too.
        for (off, v) in [(0, 0u64), (8, BUF + 0x2000), (16, 2048)] {
            m.write_obj(v, GuestAddress(BUF + 0x10 + off)).unwrap();
        }
        let r = net.handle(Hypercall::NetRead, BUF + 0x10, &m);
        assert!(matches!(r, Err(GuestError::ReadOnly { .. })), "{r:?}");
        // The frame is still there for a good buffer.
        let r = net_io(&mut net, &m, Hypercall::NetRead, 0, BUF + 0x2000, 2048);
        assert_eq!(r, Ok((ret::OK, 60)));
    }

    #[test]
    fn fd_syntax() {
        assert_eq!(parse_fd("n", "@3").unwrap(), 3);
        assert_eq!(parse_fd("n", "@0017").unwrap(), 17);
        for bad in ["@", "@-1", "@+3", "@3x", "@ 3", "@99999999999", "3"] {
            let e = parse_fd("n", bad).unwrap_err().to_string();
            assert!(e.contains("is not a file descriptor"), "{bad}: {e}");
        }
    }

    /// `--net:NAME=@FD` refuses, naming the descriptor, one that is
    /// closed, one that is not a /dev/net/tun file, and a /dev/net/tun
    /// file attached to no interface. (A TUN, and real TAPs, are in
    /// tests/tests/net.rs.)
    #[test]
    fn open_fd_refuses_what_is_not_a_tap() {
        let msg = |fd| match NetDevice::open_fd("service0", 0, fd, [2, 0, 0, 0, 0, 1]) {
            Ok(_) => panic!("fd {fd} was taken as a TAP"),
            Err(e) => e.to_string(),
        };
        let e = msg(1_000_000);
        assert!(e.contains("file descriptor 1000000 is not open"), "{e}");
        assert!(e.starts_with("net device 'service0'"), "{e}");
        let f = File::open("/proc/self/stat").unwrap();
        let e = msg(f.as_raw_fd());
        assert!(e.contains("is not a TAP device"), "{e}");
        assert!(interface_of("service0", &format!("@{}", f.as_raw_fd()))
            .unwrap_err()
            .to_string()
            .contains("is not a TAP device"));
        if let Ok(tun) = File::options().read(true).write(true).open("/dev/net/tun") {
            let e = msg(tun.as_raw_fd());
            assert!(e.contains("attached to no interface"), "{e}");
        }
        // The descriptors given were left open.
        // SAFETY: F_GETFD takes no pointer.
        assert!(unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFD) } >= 0);
    }

    /// An empty read is AGAIN, as in solo5-hvt, not a 0-byte frame.
    #[test]
    fn an_empty_read_is_again() {
        let m = mem();
        let (dev, mut peer) = fake(0);
        let mut net = Net::new(vec![dev]);
        assert_eq!(peer.write(&[]).unwrap(), 0); // one empty datagram
        let r = net_io(&mut net, &m, Hypercall::NetRead, 0, BUF, 2048).unwrap();
        assert_eq!(r, (ret::AGAIN, 2048));
    }

    /// POLL waits `timeout_nsecs` nanoseconds when nothing is ready, and
    /// reports each ready device as bit `handle` of `ready_set` with `ret`
    /// = the number of ready devices, as solo5-hvt's poll does (tt-host
    /// used to answer 0).
    #[test]
    fn poll_reports_ready_handles_and_their_number() {
        let m = mem();
        let (d1, mut p1) = fake(1);
        let (d3, mut p3) = fake(3);
        let mut net = Net::new(vec![d1, d3]);

        let t = std::time::Instant::now();
        assert_eq!(poll(&mut net, &m, 30_000_000), (0, 0));
        assert!(t.elapsed() >= std::time::Duration::from_millis(30));
        assert!(t.elapsed() < std::time::Duration::from_secs(5));

        p3.write_all(&[0u8; 60]).unwrap();
        let t = std::time::Instant::now();
        assert_eq!(poll(&mut net, &m, 10_000_000_000), (1 << 3, 1));
        assert!(t.elapsed() < std::time::Duration::from_secs(5));

        p1.write_all(&[0u8; 60]).unwrap();
        assert_eq!(poll(&mut net, &m, 0), (1 << 1 | 1 << 3, 2));
        // (A failed TAP counts as ready too: tests/tests/net.rs.)
    }

    /// Without net devices POLL is a plain sleep.
    #[test]
    fn poll_without_devices_sleeps() {
        let m = mem();
        let mut net = Net::new(Vec::new());
        let t = std::time::Instant::now();
        assert_eq!(poll(&mut net, &m, 20_000_000), (0, 0));
        assert!(t.elapsed() >= std::time::Duration::from_millis(20));
    }
}
