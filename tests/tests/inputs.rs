//! Bounded work on wrong inputs, and block images that cannot be written
//! (issue 17, items 4 and 6), through real tt-host processes.
//!
//! - A 4 GiB sparse file that is not ELF is refused after its header is
//!   read: fast, with `bad magic`, and with a small peak RSS (the child's
//!   `ru_maxrss`, from `wait4`). A 4 GiB sparse file with a valid ELF
//!   header is refused for its size, which the message names. A valid
//!   image followed by 512 MiB of sparse bytes runs, without reading them.
//! - A block image whose owner has no write permission is refused at
//!   start, even for root (who could open it), naming the file and
//!   `chmod u+w`; in both durability modes.
//! - A block image on a read-only mount (a read-only bind mount in a
//!   mount namespace of tt-host's own, made between fork and exec) is
//!   refused at start, not at the guest's first write.
//!
//! The images are synthesized (`loader::synth`): one that halts with
//! status 0, with or without a block device `storage`. The refusals
//! happen before the VM is built, so only the image that runs needs KVM.

use std::ffi::CString;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tt_host::abi::MFT_DEV_BLOCK_BASIC;
use tt_host::loader::synth::Synth;
use tt_tests::*;

/// Peak RSS allowed for a refused (or tiny) image.
const MAX_RSS_KIB: i64 = 64 << 10;
const GIB: u64 = 1 << 30;

/// What a finished tt-host did, with its resource usage.
#[derive(Debug)]
struct Measured {
    run: Run,
    max_rss_kib: i64,
    took: Duration,
}

/// The probe's environment variable: tt-host's arguments, joined by
/// [`SEP`].
const PROBE_ENV: &str = "TT_INPUTS_RSS_PROBE";
const SEP: char = '\u{1f}';

/// Run `tt-host ARGS` and measure its peak RSS.
///
/// A child's `ru_maxrss` includes the RSS of the process it was spawned
/// from (exec records the old address space's peak), and this test
/// process may have grown large (a failing test's backtrace loads debug
/// information). So a fresh copy of this test binary, running only
/// [`rss_probe`], spawns tt-host and reports its `wait4` rusage.
fn run_measured(args: &[&str]) -> Measured {
    let joined = args.join(&SEP.to_string());
    let r = tt_with(
        Command::new(std::env::current_exe().unwrap())
            .args(["rss_probe", "--exact", "--nocapture", "--test-threads=1"])
            .env(PROBE_ENV, joined),
    );
    let field = |name: &str| -> Vec<&str> {
        r.stdout
            .lines()
            .filter_map(|l| l.strip_prefix(name))
            .collect()
    };
    let num = |name: &str| -> i64 {
        field(name)
            .first()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("the RSS probe reported no {name:?}: {r:?}"))
    };
    let mut stderr = field("probe-stderr ").join("\n");
    stderr.push('\n');
    Measured {
        run: Run {
            status: num("probe-status ") as i32,
            stdout: String::new(),
            stderr,
        },
        max_rss_kib: num("probe-maxrss-kib "),
        took: Duration::from_millis(num("probe-took-ms ") as u64),
    }
}

/// Not a test of its own: in a copy of this binary started by
/// [`run_measured`] (with [`PROBE_ENV`] set), run tt-host to completion
/// (SIGKILL after 60 s) and print its exit status, peak RSS (`wait4`),
/// run time and stderr. Without the variable it does nothing.
#[test]
fn rss_probe() {
    let Ok(args) = std::env::var(PROBE_ENV) else {
        return;
    };
    let start = Instant::now();
    // Reaped by wait4 below, which also gives its rusage.
    #[allow(clippy::zombie_processes)]
    let mut child = Command::new(tt_host())
        .args(args.split(SEP))
        .env("TT_HOST_STATE_DIR", state_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tt-host");
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: rusage is plain data; zeroes are a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let mut killed = false;
    loop {
        // SAFETY: status and usage point to live locals.
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        assert!(r >= 0, "wait4: {}", std::io::Error::last_os_error());
        if r == pid {
            break;
        }
        if !killed && start.elapsed() > Duration::from_secs(60) {
            kill(child.id(), libc::SIGKILL);
            killed = true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let took = start.elapsed();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -1
    };
    // After a newline: libtest prints "test rss_probe ... " first.
    println!("\nprobe-status {code}");
    println!("probe-maxrss-kib {}", usage.ru_maxrss);
    println!("probe-took-ms {}", took.as_millis());
    for l in stderr.lines() {
        println!("probe-stderr {l}");
    }
}

fn run_image(image: &Path) -> Measured {
    run_measured(&["run", "--mem=16", image.to_str().unwrap()])
}

/// A sparse file of `len` bytes starting with `head`.
fn sparse(dir: &Scratch, name: &str, head: &[u8], len: u64) -> std::path::PathBuf {
    let p = dir.file(name, head);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(len)
        .unwrap();
    p
}

#[test]
fn a_huge_sparse_non_elf_file_is_refused_after_its_header() {
    let dir = Scratch::new("inputs-nonelf");
    let p = sparse(&dir, "huge.img", b"not an ELF", 4 * GIB);
    let m = run_image(&p);
    assert_error(&m.run, "bad magic");
    assert!(m.run.stderr.contains("huge.img"), "{m:?}");
    assert!(
        m.max_rss_kib < MAX_RSS_KIB,
        "peak RSS {} KiB: the file was read: {m:?}",
        m.max_rss_kib
    );
    assert!(m.took < Duration::from_secs(5), "{m:?}");
}

#[test]
fn a_huge_sparse_file_with_an_elf_header_is_refused_for_its_size() {
    let dir = Scratch::new("inputs-hugeelf");
    let p = sparse(&dir, "huge.hvt", &Synth::default().build(), 4 * GIB);
    let m = run_image(&p);
    assert_error(&m.run, "the file is 4294967296 bytes (4096 MiB)");
    assert!(m.run.stderr.contains("at most 1024 MiB"), "{m:?}");
    assert!(m.max_rss_kib < MAX_RSS_KIB, "{m:?}");
    assert!(m.took < Duration::from_secs(5), "{m:?}");
}

#[test]
fn bytes_after_the_last_segment_are_not_read() {
    if !kvm() {
        return;
    }
    let dir = Scratch::new("inputs-tail");
    // Debug information and symbols lie there in real images.
    let p = sparse(&dir, "tail.hvt", &Synth::default().build(), 512 << 20);
    let m = run_image(&p);
    assert_eq!(m.run.status, 0, "{m:?}");
    assert!(m.max_rss_kib < MAX_RSS_KIB, "{m:?}");
}

/// A synthesized image with block device `storage`, and a 1 MiB disk.
fn block_setup(dir: &Scratch) -> (std::path::PathBuf, std::path::PathBuf) {
    let s = Synth {
        devices: vec![("storage".into(), MFT_DEV_BLOCK_BASIC)],
        ..Synth::default()
    };
    let image = dir.file("blk.hvt", &s.build());
    let disk = dir.path("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    (image, disk)
}

fn block_run(dir: &Scratch, image: &Path, disk: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(tt_host());
    cmd.arg("run")
        .arg("--mem=16")
        .arg(format!("--state-dir={}", dir.path("state").display()))
        .arg(format!("--block:storage={}", disk.display()))
        .args(extra)
        .arg(image);
    cmd
}

#[test]
fn a_block_image_without_write_permission_is_refused_even_for_root() {
    let dir = Scratch::new("inputs-mode");
    let (image, disk) = block_setup(&dir);
    for mode in [0o444, 0o044, 0o466] {
        std::fs::set_permissions(&disk, std::fs::Permissions::from_mode(mode)).unwrap();
        for extra in [&[][..], &["--block-durability=none"][..]] {
            let r = tt_with(&mut block_run(&dir, &image, &disk, extra));
            assert_error(&r, &format!("block image {} is read-only", disk.display()));
            assert!(r.stderr.contains(&format!("mode {mode:04o}")), "{r:?}");
            assert!(
                r.stderr
                    .contains(&format!("`chmod u+w {}`", disk.display())),
                "{r:?}"
            );
        }
    }
    // The owner's write bit is what counts.
    std::fs::set_permissions(&disk, std::fs::Permissions::from_mode(0o600)).unwrap();
    if kvm() {
        let r = tt_with(&mut block_run(&dir, &image, &disk, &[]));
        assert_eq!(r.status, 0, "{r:?}");
    }
}

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

#[test]
fn a_block_image_on_a_read_only_mount_is_refused_at_start() {
    let dir = Scratch::new("inputs-rofs");
    let ro = dir.path("ro");
    std::fs::create_dir(&ro).unwrap();
    let s = Synth {
        devices: vec![("storage".into(), MFT_DEV_BLOCK_BASIC)],
        ..Synth::default()
    };
    let image = dir.file("blk.hvt", &s.build());
    let disk = ro.join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let root = cstr(Path::new("/"));
    let target = cstr(&ro);
    for extra in [&[][..], &["--block-durability=none"][..]] {
        let mut cmd = block_run(&dir, &image, &disk, extra);
        let (root, target) = (root.clone(), target.clone());
        // SAFETY: the closure makes only system calls (no allocation) on
        // strings made before the fork. In its own mount namespace, the
        // child sees `ro` as a read-only bind mount of itself; the
        // namespace goes away with it.
        unsafe {
            cmd.pre_exec(move || {
                let null = std::ptr::null::<libc::c_char>();
                let ok = libc::unshare(libc::CLONE_NEWNS) == 0
                    && libc::mount(
                        null,
                        root.as_ptr(),
                        null,
                        libc::MS_REC | libc::MS_PRIVATE,
                        std::ptr::null(),
                    ) == 0
                    && libc::mount(
                        target.as_ptr(),
                        target.as_ptr(),
                        null,
                        libc::MS_BIND,
                        std::ptr::null(),
                    ) == 0
                    && libc::mount(
                        null,
                        target.as_ptr(),
                        null,
                        libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY,
                        std::ptr::null(),
                    ) == 0;
                if ok {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        let r = tt_with(&mut cmd);
        assert_error(
            &r,
            &format!(
                "block image {} is on a read-only file system",
                disk.display()
            ),
        );
        assert!(
            r.stderr.contains("refuses read-only ones at start"),
            "{r:?}"
        );
    }
    // Writable again outside that namespace: the same disk is fine.
    if kvm() {
        let r = tt_with(&mut block_run(&dir, &image, &disk, &[]));
        assert_eq!(r.status, 0, "{r:?}");
    }
}
