//! `tt-host run --x-client=UID:GID[:G1,G2,...]`: open what a client named
//! with the client's rights, not root's.
//!
//! The daemon runs as root and starts `tt-host run` for clients, other
//! Unix users. A client must never reach a file through it that the client
//! could not open itself. So, before anything else touches a path the
//! client gave, [`open_as_client`] takes the client's identity for a
//! moment: its supplementary groups (`setgroups`), its group (`setegid`)
//! and its user (`seteuid`). With an effective uid other than 0 the kernel
//! clears the effective capabilities, so `CAP_DAC_OVERRIDE` and
//! `CAP_NET_ADMIN` no longer apply; the real and saved uids stay 0, which
//! is what lets tt-host take its own identity back. As the client it
//! opens the image read-only, every `--block` image read-write, and
//! attaches every `--net` TAP (`TUNSETIFF`, which checks the TAP's owner
//! and group against the effective ids, on a `/dev/net/tun` file tt-host
//! opened as itself, as it opens `/dev/kvm`). Paths are resolved without
//! following `/proc` magic links (`openat2` `RESOLVE_NO_MAGICLINKS`), so
//! `/proc/self/fd/N` cannot reach a file tt-host itself holds. Then it
//! returns to its own identity, checks that it did, and rewrites the
//! command line's `--block:NAME=PATH` and `--net:NAME=TAP` to
//! `--block:NAME=@FD` and `--net:NAME=@FD`, so the rest of the launch
//! (admission, journals, `/dev/kvm`, all as root) uses the open files.
//!
//! The switch is per thread at the system-call level; tt-host does it
//! while it has one thread, and refuses otherwise.

use crate::cli::RunArgs;
use crate::modules::net::{NetDevice, NetError};
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// The identity of a client: `--x-client=UID:GID[:G1,G2,...]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (none if not given).
    pub groups: Vec<u32>,
}

/// Most supplementary groups (Linux's `NGROUPS_MAX`).
const MAX_GROUPS: usize = 65536;

impl std::str::FromStr for Client {
    type Err = String;

    /// `UID:GID` or `UID:GID:G1,G2,...`, decimal ids (not 4294967295,
    /// which the system calls read as "unchanged").
    fn from_str(s: &str) -> Result<Client, String> {
        let id = |what: &str, v: &str| {
            crate::text::number::<u32>(v)
                .filter(|n| *n != u32::MAX && v.bytes().all(|c| c.is_ascii_digit()))
                .ok_or_else(|| format!("{what} '{v}' is not a decimal id below 4294967295"))
        };
        let mut parts = s.splitn(3, ':');
        let (Some(uid), Some(gid)) = (parts.next(), parts.next()) else {
            return Err("expected UID:GID or UID:GID:G1,G2,...".into());
        };
        let groups = match parts.next() {
            None | Some("") => Vec::new(),
            Some(list) => list
                .split(',')
                .map(|g| id("group", g))
                .collect::<Result<Vec<_>, _>>()?,
        };
        if groups.len() > MAX_GROUPS {
            return Err(format!("more than {MAX_GROUPS} supplementary groups"));
        }
        Ok(Client {
            uid: id("uid", uid)?,
            gid: id("gid", gid)?,
            groups,
        })
    }
}

/// Why the client's files could not be opened with its rights.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "--x-client: tt-host has {0} threads; it takes the client's identity only while it \
         has one"
    )]
    Threads(usize),
    #[error(
        "--x-client: cannot take the identity of uid {uid}, gid {gid}: {call}: {err} \
         (--x-client needs tt-host to run as root)"
    )]
    Become {
        uid: u32,
        gid: u32,
        call: &'static str,
        err: io::Error,
    },
    #[error(
        "--x-client: cannot return to tt-host's own identity after opening the client's \
         files: {0}"
    )]
    Restore(String),
    #[error(
        "--x-client: --{option}:{device}={value}: a client gives paths and TAP names, \
         which tt-host opens with the client's rights, not file descriptors"
    )]
    FdGiven {
        option: &'static str,
        device: String,
        value: String,
    },
    #[error("cannot open image {path} with the client's rights (uid {uid}): {err}")]
    Image {
        path: String,
        uid: u32,
        err: io::Error,
    },
    #[error(
        "block device '{device}': cannot open {path} read-write with the client's rights \
         (uid {uid}): {err}"
    )]
    Block {
        device: String,
        path: String,
        uid: u32,
        err: io::Error,
    },
    #[error(
        "net device '{device}': TAP interface '{tap}' {why}, and the client (uid {uid}) may \
         not open /dev/net/tun itself: give the TAP to the client (e.g. `ip tuntap add {tap} \
         mode tap user {uid}`)"
    )]
    TapNotGiven {
        device: String,
        tap: String,
        uid: u32,
        why: String,
    },
    #[error("{source} (opened with the client's rights, uid {uid})")]
    Net { uid: u32, source: NetError },
}

/// The files [`open_as_client`] opened, kept open for as long as the
/// launch uses them (their descriptors are in the rewritten options).
#[derive(Debug)]
pub struct OpenedFiles {
    /// The image, open read-only (unless the caller had it already).
    pub image: Option<File>,
    /// `--block` images (read-write) and TAPs, by descriptor.
    pub devices: Vec<File>,
}

/// tt-host's own identity, to return to.
struct Own {
    euid: libc::uid_t,
    egid: libc::gid_t,
    groups: Vec<libc::gid_t>,
}

fn groups() -> io::Result<Vec<libc::gid_t>> {
    // SAFETY: with size 0 getgroups only returns the number of groups.
    let n = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut list = vec![0; n as usize];
    // SAFETY: `list` has room for `n` gids, as told.
    let n = unsafe { libc::getgroups(n, list.as_mut_ptr()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    list.truncate(n as usize);
    list.sort_unstable();
    Ok(list)
}

fn set_groups(list: &[libc::gid_t]) -> io::Result<()> {
    // SAFETY: `list` holds `list.len()` gids (at most NGROUPS_MAX, checked
    // when parsed or given by the kernel); setgroups only reads them.
    if unsafe { libc::setgroups(list.len(), list.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn current() -> Result<Own, ClientError> {
    Ok(Own {
        // SAFETY: geteuid and getegid cannot fail.
        euid: unsafe { libc::geteuid() },
        // SAFETY: as above.
        egid: unsafe { libc::getegid() },
        groups: groups().map_err(|e| ClientError::Restore(format!("getgroups: {e}")))?,
    })
}

/// How many threads the process has.
fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count())
}

/// Take `client`'s groups, gid and uid, in that order (setgroups and
/// setegid need root's capabilities, which seteuid then drops).
fn become_client(client: &Client) -> Result<(), ClientError> {
    let err = |call| ClientError::Become {
        uid: client.uid,
        gid: client.gid,
        call,
        err: io::Error::last_os_error(),
    };
    set_groups(&client.groups).map_err(|_| err("setgroups"))?;
    // SAFETY: plain system call on integers.
    if unsafe { libc::setegid(client.gid) } != 0 {
        return Err(err("setegid"));
    }
    // SAFETY: plain system call on integers.
    if unsafe { libc::seteuid(client.uid) } != 0 {
        return Err(err("seteuid"));
    }
    Ok(())
}

/// Return to `own` (uid first, which gives back the capabilities that
/// setegid and setgroups need) and check that every id is back.
fn restore(own: &Own) -> Result<(), ClientError> {
    let fail = |call: &str| ClientError::Restore(format!("{call}: {}", io::Error::last_os_error()));
    // SAFETY: plain system calls on integers.
    if unsafe { libc::seteuid(own.euid) } != 0 {
        return Err(fail("seteuid"));
    }
    // SAFETY: as above.
    if unsafe { libc::setegid(own.egid) } != 0 {
        return Err(fail("setegid"));
    }
    set_groups(&own.groups).map_err(|e| ClientError::Restore(format!("setgroups: {e}")))?;
    let now = current()?;
    if (now.euid, now.egid, &now.groups) != (own.euid, own.egid, &own.groups) {
        return Err(ClientError::Restore(format!(
            "the effective uid, gid and groups are {}, {}, {:?}, not {}, {}, {:?}",
            now.euid, now.egid, now.groups, own.euid, own.egid, own.groups
        )));
    }
    Ok(())
}

/// Run `f` with `client`'s identity, then return to tt-host's own. An
/// error from returning is final: the caller must stop (it returns it
/// from `launch::run`, and tt-host exits 1).
pub fn with_identity<R>(client: &Client, f: impl FnOnce() -> R) -> Result<R, ClientError> {
    let n = threads();
    if n != 1 {
        return Err(ClientError::Threads(n));
    }
    let own = current()?;
    if let Err(e) = become_client(client) {
        restore(&own)?;
        return Err(e);
    }
    let r = f();
    restore(&own)?;
    Ok(r)
}

/// Open `path` with `flags` (and `O_CLOEXEC | O_NOCTTY`), following
/// symbolic links but not `/proc` magic links: a client's path must not
/// reach, through `/proc/self/fd/N`, a file tt-host holds open.
pub fn open_no_magic_links(path: &Path, flags: libc::c_int) -> io::Result<File> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "the path holds a NUL byte"))?;
    // SAFETY: open_how is plain data; zeroed is a valid value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC | libc::O_NOCTTY) as u64;
    how.resolve = libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: a NUL-terminated path and an open_how of the size given, both
    // alive for the call; the result is a new descriptor or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            libc::AT_FDCWD,
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ELOOP) {
            return Err(io::Error::new(
                e.kind(),
                format!("{e}: a symbolic link loop, or a /proc magic link such as /proc/self/fd/N"),
            ));
        }
        return Err(e);
    }
    // SAFETY: openat2 returned a new descriptor that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd as libc::c_int) })
}

/// The /dev/net/tun file through which the client attaches TAP `tap`
/// (called with the client's identity): its own if it may open
/// /dev/net/tun, and then the kernel's check of the TAP's owner and group
/// is all there is, as if the client did it itself. If it may not,
/// tt-host's `ours`, but only for a TAP that has an owner or a group (the
/// kernel then checks that the client is that owner and in that group):
/// an ownerless TAP is open to whoever holds /dev/net/tun.
fn tun_for_client(
    device: &str,
    tap: &str,
    uid: u32,
    ours: Option<File>,
) -> Result<File, ClientError> {
    let err = |err| ClientError::Net {
        uid,
        source: NetError::Attach {
            name: device.into(),
            tap: tap.into(),
            err,
        },
    };
    let denied = match NetDevice::open_tun() {
        Ok(f) => return Ok(f),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EACCES | libc::EPERM)) => e,
        Err(e) => return Err(err(e)),
    };
    let Some(ours) = ours else {
        return Err(err(denied));
    };
    let not_given = |why: String| ClientError::TapNotGiven {
        device: device.into(),
        tap: tap.into(),
        uid,
        why,
    };
    // The owner and group the kernel checks, as /sys shows them (-1: none).
    let valid = !tap.is_empty() && !tap.contains('/') && tap != "." && tap != "..";
    let id = |what: &str| -> Result<i64, String> {
        let p = format!("/sys/class/net/{tap}/{what}");
        let text = std::fs::read_to_string(&p).map_err(|e| format!("{p}: {e}"))?;
        text.trim()
            .parse()
            .map_err(|_| format!("{p} holds '{}'", text.trim()))
    };
    match (valid.then(|| id("owner")), valid.then(|| id("group"))) {
        (Some(Ok(-1)), Some(Ok(-1))) => Err(not_given("has no owner or group".into())),
        (Some(Ok(_)), Some(Ok(_))) => Ok(ours),
        (Some(Err(e)), _) | (_, Some(Err(e))) => Err(not_given(format!(
            "is not a TAP whose owner tt-host can read ({e})"
        ))),
        _ => Err(not_given("is not a valid interface name".into())),
    }
}

/// Clear `O_NONBLOCK`, set only so the open did not wait on a FIFO.
fn blocking(file: &File) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL take no pointers; the results are checked.
    let fl = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    // SAFETY: as above.
    if fl < 0 || unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK) } < 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Open a `--block` image read-write, a file or block device (anything
/// else is refused once open, before any read or write).
fn open_block(path: &Path) -> io::Result<File> {
    let file = open_no_magic_links(path, libc::O_RDWR | libc::O_NONBLOCK)?;
    crate::modules::block::check_type(&file.metadata()?)?;
    blocking(&file)?;
    Ok(file)
}

/// Open, with `client`'s rights, the image (with `image`: a restore has
/// its image's bytes in the snapshot) and every file and TAP the device
/// options name, and rewrite those options to `@FD` (the image stays named
/// by its path, for messages and the default name; read it from
/// [`OpenedFiles::image`]). A descriptor given by the command line (`@FD`)
/// is refused: the client's files are named by path.
pub fn open_as_client(
    args: &mut RunArgs,
    client: &Client,
    image: bool,
) -> Result<OpenedFiles, ClientError> {
    for o in &args.devices {
        if matches!(o.option, "block" | "net") && o.value.starts_with('@') {
            return Err(ClientError::FdGiven {
                option: o.option,
                device: o.device.clone().unwrap_or_default(),
                value: o.value.clone(),
            });
        }
    }
    let uid = client.uid;
    // /dev/net/tun is tt-host's, as /dev/kvm is (it may be root's alone):
    // opened as tt-host; attaching it to a TAP is what the client may or
    // may not do, and the kernel checks that with the client's identity.
    let mut tuns = Vec::new();
    for o in args.devices.iter().filter(|o| o.option == "net") {
        tuns.push(NetDevice::open_tun().map_err(|err| ClientError::Net {
            uid,
            source: NetError::Attach {
                name: o.device.clone().unwrap_or_default(),
                tap: o.value.clone(),
                err,
            },
        })?);
    }
    let mut tuns = tuns.into_iter();
    let opened = with_identity(client, || -> Result<OpenedFiles, ClientError> {
        let image = image
            .then(|| {
                open_no_magic_links(&args.image, libc::O_RDONLY | libc::O_NONBLOCK).map_err(|err| {
                    ClientError::Image {
                        path: args.image.display().to_string(),
                        uid,
                        err,
                    }
                })
            })
            .transpose()?;
        let mut devices = Vec::new();
        for o in &args.devices {
            let device = o.device.clone().unwrap_or_default();
            let file = match o.option {
                "block" => open_block(Path::new(&o.value)).map_err(|err| ClientError::Block {
                    device,
                    path: o.value.clone(),
                    uid,
                    err,
                })?,
                "net" => {
                    let tun = tun_for_client(&device, &o.value, uid, tuns.next())?;
                    NetDevice::open_tap_with(&device, 0, &o.value, [2, 0, 0, 0, 0, 1], || Ok(tun))
                        .map_err(|source| ClientError::Net { uid, source })?
                        .into_file()
                }
                _ => continue,
            };
            devices.push(file);
        }
        Ok(OpenedFiles { image, devices })
    })??;
    let mut fds = opened.devices.iter();
    for o in &mut args.devices {
        if matches!(o.option, "block" | "net") {
            if let Some(f) = fds.next() {
                o.value = format!("@{}", f.as_raw_fd());
            }
        }
    }
    Ok(opened)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ids_parse_and_errors_name_the_part() {
        let c: Client = "4242:4243".parse().unwrap();
        assert_eq!((c.uid, c.gid, c.groups), (4242, 4243, vec![]));
        let c: Client = "1:2:3,4".parse().unwrap();
        assert_eq!(c.groups, vec![3, 4]);
        let c: Client = "1:2:".parse().unwrap();
        assert!(c.groups.is_empty());
        for (bad, why) in [
            ("4242", "expected UID:GID"),
            ("x:1", "uid 'x'"),
            ("1:-1", "gid '-1'"),
            ("4294967295:1", "uid '4294967295'"),
            ("1:2:3,,4", "group ''"),
            ("1:2:3:4", "group '3:4'"),
            ("+1:2", "uid '+1'"),
        ] {
            let e = bad.parse::<Client>().unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    /// A path through /proc/self/fd reaches a file this process holds
    /// whatever the directories above it allow: it is not followed.
    #[test]
    fn proc_magic_links_are_not_followed() {
        let f = File::open("/dev/null").unwrap();
        let link = format!("/proc/self/fd/{}", f.as_raw_fd());
        let e = open_no_magic_links(Path::new(&link), libc::O_RDONLY).unwrap_err();
        assert!(e.to_string().contains("(os error 40)"), "{e}");
        assert!(e.to_string().contains("magic link"), "{e}");
        assert!(open_no_magic_links(Path::new("/dev/null"), libc::O_RDONLY).is_ok());
    }

    #[test]
    fn the_identity_is_not_taken_with_several_threads() {
        let client: Client = "4242:4242".parse().unwrap();
        // The test harness runs this on a thread of its own.
        let r = with_identity(&client, || ());
        assert!(matches!(r, Err(ClientError::Threads(n)) if n > 1), "{r:?}");
    }
}
