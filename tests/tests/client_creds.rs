//! `tt-host run --x-client=UID:GID`: what a client names (the image, its
//! block images, its TAPs) is opened with the client's rights, not
//! root's. Real KVM, real processes, run as root; the client is uid and
//! gid 4242, which needs no passwd entry.
//!
//! - An image, a block image or a directory on the way that uid 4242 may
//!   not read, write or traverse is refused, naming the file and the uid;
//!   the same command without --x-client (root) boots.
//! - Files that uid 4242 owns boot, and the guest's writes land in its
//!   block image, which is journaled under its path.
//! - A TAP whose owner is 4242 opens; one owned by root is refused under
//!   --x-client=4242 and opens without it; one owned by no one opens only
//!   if uid 4242 may open /dev/net/tun itself.
//! - A descriptor (`@FD`) or a /proc magic link cannot stand in for a
//!   path under --x-client.

use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;
use tt_tests::netns::Netns;
use tt_tests::*;

const CLIENT: u32 = 4242;
const X_CLIENT: &str = "--x-client=4242:4242";
/// The blk guest writes and checks every sector of this.
const DISK_BYTES: u64 = 256 << 10;

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn chown(p: &Path, uid: u32) {
    std::os::unix::fs::chown(p, Some(uid), Some(uid)).unwrap();
}

/// A scratch directory uid 4242 may traverse, with a state directory,
/// a copy of guest `name` and a zeroed disk, both root's, mode 0644.
struct Setup {
    dir: Scratch,
    image: PathBuf,
    disk: PathBuf,
    state: PathBuf,
}

impl Setup {
    fn new(tag: &str, name: &str) -> Setup {
        let dir = Scratch::new(tag);
        chmod(&dir.0, 0o755);
        let image = dir.path(name);
        std::fs::copy(guest(name), &image).unwrap();
        chmod(&image, 0o644);
        let disk = dir.path("disk.img");
        std::fs::File::create(&disk)
            .unwrap()
            .set_len(DISK_BYTES)
            .unwrap();
        chmod(&disk, 0o644);
        let state = dir.path("state");
        Setup {
            dir,
            image,
            disk,
            state,
        }
    }

    /// `tt-host run` of the blk guest on `disk`, with `extra` options.
    fn blk(&self, extra: &[&str], disk: &Path) -> Run {
        tt_with(
            Command::new(tt_host())
                .arg("run")
                .arg("--mem=16")
                .arg(format!("--state-dir={}", self.state.display()))
                .args(extra)
                .arg(format!("--block:storage={}", disk.display()))
                .arg(&self.image),
        )
    }
}

#[track_caller]
fn assert_booted(r: &Run) {
    assert_eq!(r.status, 0, "{r:?}");
    assert!(r.stdout.contains("blk: OK"), "{r:?}");
}

#[test]
fn an_image_the_client_cannot_read_is_refused() {
    if !kvm() {
        return;
    }
    let s = Setup::new("xc-image", "blk");
    chmod(&s.image, 0o600);
    chown(&s.disk, CLIENT);
    let r = s.blk(&[X_CLIENT], &s.disk);
    assert_error(
        &r,
        &format!(
            "cannot open image {} with the client's rights (uid 4242): Permission denied",
            s.image.display()
        ),
    );
    // root may.
    assert_booted(&s.blk(&[], &s.disk));
}

#[test]
fn a_block_image_the_client_cannot_write_is_refused() {
    if !kvm() {
        return;
    }
    let s = Setup::new("xc-ro", "blk");
    // Readable by 4242, writable by root alone.
    let r = s.blk(&[X_CLIENT], &s.disk);
    assert_error(
        &r,
        &format!(
            "block device 'storage': cannot open {} read-write with the client's rights \
             (uid 4242): Permission denied",
            s.disk.display()
        ),
    );
    assert_booted(&s.blk(&[], &s.disk));
}

#[test]
fn a_block_image_in_a_directory_the_client_cannot_traverse_is_refused() {
    if !kvm() {
        return;
    }
    let s = Setup::new("xc-dir", "blk");
    let private = s.dir.path("private");
    std::fs::create_dir(&private).unwrap();
    chmod(&private, 0o700);
    let disk = private.join("disk.img");
    std::fs::rename(&s.disk, &disk).unwrap();
    chown(&disk, CLIENT);
    chmod(&disk, 0o666);
    let r = s.blk(&[X_CLIENT], &disk);
    assert_error(
        &r,
        &format!(
            "block device 'storage': cannot open {} read-write with the client's rights \
             (uid 4242): Permission denied",
            disk.display()
        ),
    );
}

#[test]
fn the_client_s_own_files_boot_and_its_writes_land() {
    if !kvm() {
        return;
    }
    let s = Setup::new("xc-own", "blk");
    for p in [&s.image, &s.disk] {
        chown(p, CLIENT);
        chmod(p, 0o600);
    }
    let r = s.blk(&[X_CLIENT], &s.disk);
    assert_booted(&r);
    // blk wrote its pattern to every sector: sector 1 starts with 31.
    let bytes = std::fs::read(&s.disk).unwrap();
    assert_eq!(bytes.len() as u64, DISK_BYTES);
    assert_eq!(bytes[512], 31, "the guest's writes are not on the image");
    // The journal opened through the descriptor is the image's own.
    let list = tt(&[
        "journal",
        "list",
        &format!("--state-dir={}", s.state.display()),
    ]);
    let canonical = std::fs::canonicalize(&s.disk).unwrap();
    assert!(
        list.stdout.contains(&format!("{}: ", canonical.display())),
        "{list:?}"
    );
}

/// virtio-blk devices take the same `--block` option: the client's own
/// disk serves the guest; one it may not write is refused.
#[test]
fn a_virtio_blk_disk_is_opened_with_the_client_s_rights() {
    if !kvm() {
        return;
    }
    let s = Setup::new("xc-vblk", "vblk");
    std::fs::File::options()
        .write(true)
        .open(&s.disk)
        .unwrap()
        .set_len(2 << 20)
        .unwrap();
    let run = |s: &Setup| {
        tt_with(
            Command::new(tt_host())
                .arg("run")
                .arg("--mem=32")
                .arg(X_CLIENT)
                .arg(format!("--state-dir={}", s.state.display()))
                .arg(format!("--block:disk={}", s.disk.display()))
                .arg(&s.image),
        )
    };
    assert_error(&run(&s), "block device 'disk': cannot open");
    chown(&s.disk, CLIENT);
    let r = run(&s);
    assert_eq!(r.status, 0, "{r:?}");
    assert!(r.stdout.contains("vblk: OK"), "{r:?}");
}

/// What a client names must be a path or a TAP name that tt-host opens
/// with its rights: a descriptor of tt-host's, or a path through /proc's
/// magic links to one, is refused.
#[test]
fn descriptors_and_proc_magic_links_are_refused_for_a_client() {
    if !kvm() {
        return;
    }
    let s = Setup::new("xc-fd", "blk");
    chown(&s.disk, CLIENT);
    let r = tt_with(
        Command::new(tt_host())
            .arg("run")
            .arg(X_CLIENT)
            .arg(format!("--state-dir={}", s.state.display()))
            .arg("--block:storage=@2")
            .arg(&s.image),
    );
    assert_error(&r, "--x-client: --block:storage=@2: a client gives paths");
    let r = tt_with(
        Command::new(tt_host())
            .arg("run")
            .arg(X_CLIENT)
            .arg(format!("--state-dir={}", s.state.display()))
            .arg(format!("--block:storage={}", s.disk.display()))
            .arg("/proc/self/fd/0")
            .stdin(std::fs::File::open(&s.image).unwrap()),
    );
    assert_error(&r, "magic link");
}

/// A child killed and reaped when dropped.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start the net guest on TAP `tap` in `ns` with `extra` options: Ok once
/// it says `net: ready` (it holds the TAP), else its exit and stderr.
fn net_guest(ns: &Netns, s: &Setup, tap: &str, extra: &[&str]) -> Result<(), Run> {
    let mut cmd = ns.command(tt_host());
    cmd.arg("run")
        .arg("--mem=32")
        .arg(format!("--state-dir={}", s.state.display()))
        .args(extra)
        .arg(format!("--net:service0={tap}"))
        .arg(&s.image)
        .args(["--", "10.0.0.2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut g = Guard(cmd.spawn().expect("spawn tt-host"));
    let out = g.0.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    loop {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(l) if l.contains("net: ready") => return Ok(()),
            Ok(_) => {}
            Err(_) => break,
        }
    }
    let mut stderr = String::new();
    let _ = std::io::Read::read_to_string(g.0.stderr.as_mut().unwrap(), &mut stderr);
    let status = g.0.wait().map_or(-1, |s| s.code().unwrap_or(-1));
    Err(Run {
        status,
        stdout: String::new(),
        stderr,
    })
}

/// Create persistent TAP `name` in `ns` owned by `owner` (none: no owner),
/// up.
fn add_tap_owned(ns: &Netns, name: &str, owner: Option<u32>) {
    ns.run(|| {
        let f = std::fs::File::options()
            .read(true)
            .write(true)
            .open("/dev/net/tun")?;
        // SAFETY: ifreq is plain data; all-zero is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, c) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
            *d = c as libc::c_char;
        }
        ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
        let fd = f.as_raw_fd();
        // SAFETY: TUNSETIFF reads and writes one ifreq, which we own;
        // TUNSETOWNER and TUNSETPERSIST take integers.
        unsafe {
            if libc::ioctl(fd, libc::TUNSETIFF, &mut ifr) < 0
                || owner.is_some_and(|o| libc::ioctl(fd, libc::TUNSETOWNER, o as libc::c_ulong) < 0)
                || libc::ioctl(fd, libc::TUNSETPERSIST, 1) < 0
            {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    })
    .unwrap_or_else(|e| panic!("create {name} (needs /dev/net/tun): {e}"));
    ns.set_up(name, true);
}

#[test]
fn only_a_tap_the_client_owns_opens_under_its_identity() {
    if !kvm() {
        return;
    }
    let s = Setup::new("xc-tap", "net");
    let ns = Netns::new();
    add_tap_owned(&ns, "tapc", Some(CLIENT));
    add_tap_owned(&ns, "taproot", Some(0));
    add_tap_owned(&ns, "tapnone", None);
    net_guest(&ns, &s, "tapc", &[X_CLIENT]).expect("the client's TAP opens as the client");
    let r = net_guest(&ns, &s, "taproot", &[X_CLIENT]).expect_err("root's TAP");
    assert_error(
        &r,
        "net device 'service0': cannot attach to TAP 'taproot': Operation not permitted \
         (os error 1) (opened with the client's rights, uid 4242)",
    );
    // A TAP without an owner is anyone's who may open /dev/net/tun: the
    // client's if it may (as on a stock Debian, mode 0666), else not.
    let tun_mode = std::fs::metadata("/dev/net/tun")
        .unwrap()
        .permissions()
        .mode();
    let r = net_guest(&ns, &s, "tapnone", &[X_CLIENT]);
    if tun_mode & 0o006 == 0o006 {
        r.expect("an ownerless TAP, /dev/net/tun open to all");
    } else {
        assert_error(
            &r.expect_err("an ownerless TAP"),
            "net device 'service0': TAP interface 'tapnone' has no owner or group, and the \
             client (uid 4242) may not open /dev/net/tun itself",
        );
    }
    for tap in ["taproot", "tapnone"] {
        net_guest(&ns, &s, tap, &[]).unwrap_or_else(|r| panic!("{tap} as root: {r:?}"));
    }
}
