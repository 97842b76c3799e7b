//! The state directory is its owner's alone (issue 17): made 0700 with
//! 0600 files whatever the umask; one another user owns, or others can
//! write, is refused; no symbolic link in it is followed; the state lock
//! cannot be held by another user; a tt-host waiting for the lock stops
//! on SIGTERM or SIGINT; a huge `state.json` is refused, not read.
//!
//! The tests run as root; what another user could do is tried as
//! `nobody` (uid and gid 65534) in a forked child.

use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tt_tests::{assert_error, guest, kvm, tt, tt_host, Scratch};

const NOBODY: u32 = 65534;

/// A child `tt-host`, killed and reaped when dropped (a failed assertion
/// leaves no process behind).
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sd_arg(sd: &Path) -> String {
    format!("--state-dir={}", sd.display())
}

fn policy_set(sd: &Path) -> tt_tests::Run {
    tt(&["policy", "set", &sd_arg(sd), "alice", "--unikernels", "1"])
}

fn policy_show(sd: &Path) -> tt_tests::Run {
    tt(&["policy", "show", &sd_arg(sd)])
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

/// `tt-host run --state-dir=SD --mem=32 compute -- ITERS`, with umask
/// `umask`, in the background.
fn spawn_compute(sd: &Path, iters: u64, umask: Option<libc::mode_t>) -> Guard {
    let mut cmd = Command::new(tt_host());
    cmd.arg("run")
        .arg(sd_arg(sd))
        .arg("--mem=32")
        .arg(guest("compute"))
        .arg("--")
        .arg(iters.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(m) = umask {
        // SAFETY: umask is async-signal-safe and touches no memory.
        unsafe {
            cmd.pre_exec(move || {
                libc::umask(m);
                Ok(())
            });
        }
    }
    Guard(cmd.spawn().expect("spawn tt-host"))
}

/// In a child running as nobody: open `path` (read-only) and try to take
/// its flock without waiting. Returns 0 if nobody holds it, else the
/// errno of what failed.
fn as_nobody_flock(path: &Path) -> i32 {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: the child calls only async-signal-safe system calls on
    // memory prepared before the fork, then _exit.
    unsafe {
        let pid = libc::fork();
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let code = if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(NOBODY) != 0
                || libc::setuid(NOBODY) != 0
            {
                100
            } else {
                let fd = libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_NONBLOCK);
                if fd < 0 || libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) != 0 {
                    *libc::__errno_location()
                } else {
                    0
                }
            };
            libc::_exit(code);
        }
        let mut status = 0;
        assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
        assert!(libc::WIFEXITED(status), "child status {status:#x}");
        let code = libc::WEXITSTATUS(status);
        assert_ne!(code, 100, "cannot become nobody");
        code
    }
}

#[test]
fn under_umask_000_the_state_is_0700_and_0600() {
    if !kvm() {
        return;
    }
    let scratch = Scratch::new("sd-umask");
    let sd = scratch.path("state");
    let mut run = spawn_compute(&sd, 1 << 50, Some(0));
    let running = sd.join("running");
    let t = Instant::now();
    let entry = loop {
        let found = std::fs::read_dir(&running)
            .ok()
            .and_then(|mut d| d.find_map(|e| e.ok()))
            .map(|e| e.path());
        if let Some(p) = found {
            break p;
        }
        if let Ok(Some(st)) = run.0.try_wait() {
            panic!("tt-host exited ({st}) before its entry appeared");
        }
        assert!(t.elapsed() < Duration::from_secs(60), "no entry file");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut cmd = Command::new(tt_host());
    cmd.args(["policy", "set", &sd_arg(&sd), "alice", "--unikernels", "2"]);
    // SAFETY: umask is async-signal-safe and touches no memory.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    let r = tt_tests::tt_with(&mut cmd);
    assert_eq!(r.status, 0, "{r:?}");
    for (p, want) in [
        (sd.clone(), 0o700),
        (running.clone(), 0o700),
        (sd.join("lock"), 0o600),
        (sd.join("state.json"), 0o600),
        (entry.clone(), 0o600),
    ] {
        assert_eq!(mode(&p), want, "{}: mode {:o}", p.display(), mode(&p));
    }
}

#[test]
fn a_state_dir_owned_by_another_user_is_refused() {
    let scratch = Scratch::new("sd-owner");
    let sd = scratch.path("state");
    std::fs::create_dir(&sd).unwrap();
    std::os::unix::fs::chown(&sd, Some(NOBODY), Some(NOBODY)).unwrap();
    let r = policy_show(&sd);
    assert_error(&r, &format!("{} is owned by uid {NOBODY}", sd.display()));
    assert!(r.stderr.contains("chown 0"), "{r:?}");
    // A file in it owned by another user is refused too.
    std::os::unix::fs::chown(&sd, Some(0), Some(0)).unwrap();
    std::fs::write(sd.join("state.json"), b"{}").unwrap();
    std::os::unix::fs::chown(sd.join("state.json"), Some(NOBODY), None).unwrap();
    let r = policy_show(&sd);
    assert_error(&r, "state.json is owned by uid 65534");
}

#[test]
fn a_state_dir_others_can_write_is_refused() {
    let scratch = Scratch::new("sd-mode");
    let sd = scratch.path("state");
    for m in [0o777, 0o770, 0o702] {
        std::fs::create_dir_all(&sd).unwrap();
        std::fs::set_permissions(&sd, std::fs::Permissions::from_mode(m)).unwrap();
        let r = policy_show(&sd);
        assert_error(&r, "can be written by group or others");
        assert!(
            r.stderr.contains(&format!("chmod 700 {}", sd.display())),
            "{r:?}"
        );
    }
    std::fs::set_permissions(&sd, std::fs::Permissions::from_mode(0o700)).unwrap();
    assert_eq!(policy_set(&sd).status, 0);
    let lock = sd.join("lock");
    std::fs::set_permissions(&lock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let r = policy_show(&sd);
    assert_error(&r, "chmod 600");
    assert!(r.stderr.contains(&lock.display().to_string()), "{r:?}");
}

/// A `running -> /victim` link: before, tt-host deleted the victim's
/// `*.lock` files that nobody held.
#[test]
fn a_symlinked_running_dir_is_refused_and_its_target_untouched() {
    let scratch = Scratch::new("sd-link");
    let sd = scratch.path("state");
    assert_eq!(policy_set(&sd).status, 0);
    let victim = scratch.path("victim");
    std::fs::create_dir(&victim).unwrap();
    let files: Vec<PathBuf> = ["1-1-1.lock", "x.lock"]
        .iter()
        .map(|n| scratch.file(&format!("victim/{n}"), b"keep me"))
        .collect();
    let _ = std::fs::remove_dir_all(sd.join("running"));
    std::os::unix::fs::symlink(&victim, sd.join("running")).unwrap();
    let r = policy_show(&sd);
    assert_error(&r, "running is a symbolic link");
    for f in &files {
        assert_eq!(std::fs::read(f).unwrap(), b"keep me", "{}", f.display());
    }
    // A link as an entry file is not followed either.
    std::fs::remove_file(sd.join("running")).unwrap();
    std::fs::create_dir(sd.join("running")).unwrap();
    std::os::unix::fs::symlink(&files[0], sd.join("running/2-2-2.lock")).unwrap();
    let r = policy_show(&sd);
    assert_error(&r, "2-2-2.lock is a symbolic link");
    assert_eq!(std::fs::read(&files[0]).unwrap(), b"keep me");
}

/// Any local user could flock `lock` (0644) and stop every launch; now
/// only the owner can open it.
#[test]
fn another_user_cannot_hold_the_state_lock() {
    let scratch = Scratch::new("sd-nobody");
    // The scratch dir is root's 0755: nobody can reach what is below.
    let sd = scratch.path("state");
    assert_eq!(policy_set(&sd).status, 0);
    // The same lock, made readable to everyone under a 0755 directory,
    // as before: nobody takes it (this checks the child itself).
    let open = scratch.path("open-lock");
    std::fs::write(&open, b"").unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert_eq!(as_nobody_flock(&open), 0, "nobody can lock a 0644 file");
    assert_eq!(as_nobody_flock(&sd.join("lock")), libc::EACCES);
}

/// SIGTERM and SIGINT stop a tt-host waiting for the state lock within
/// 1 s (before, it waited until the lock was free, then ran the guest).
#[test]
fn a_signal_stops_a_launch_waiting_for_the_state_lock() {
    let scratch = Scratch::new("sd-wait");
    let sd = scratch.path("state");
    assert_eq!(policy_set(&sd).status, 0);
    let lock = std::fs::File::open(sd.join("lock")).unwrap();
    // SAFETY: flock on a descriptor this test owns.
    assert_eq!(
        unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
        0
    );
    for (sig, name) in [
        (libc::SIGTERM, "15 (SIGTERM)"),
        (libc::SIGINT, "2 (SIGINT)"),
    ] {
        let mut run = spawn_compute(&sd, 1, None);
        std::thread::sleep(Duration::from_millis(700));
        assert!(
            run.0.try_wait().unwrap().is_none(),
            "tt-host should be waiting for the lock"
        );
        assert!(tt_tests::kill(run.0.id(), sig));
        let t = Instant::now();
        let status = loop {
            if let Some(st) = run.0.try_wait().unwrap() {
                break st;
            }
            assert!(
                t.elapsed() < Duration::from_secs(1),
                "tt-host still runs 1 s after signal {name}"
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(run.0.stderr.as_mut().unwrap(), &mut stderr).unwrap();
        let r = tt_tests::Run {
            status: status.code().unwrap_or(-1),
            stdout: String::new(),
            stderr,
        };
        assert_error(&r, &format!("exiting on signal {name}"));
    }
}

/// A 17 MiB (sparse) state.json is refused at once, not read under the
/// lock.
#[test]
fn a_huge_state_file_is_refused_not_read() {
    let scratch = Scratch::new("sd-huge");
    let sd = scratch.path("state");
    assert_eq!(policy_set(&sd).status, 0);
    let state = sd.join("state.json");
    std::fs::File::options()
        .write(true)
        .open(&state)
        .unwrap()
        .set_len(17 << 20)
        .unwrap();
    assert!(std::fs::metadata(&state).unwrap().blocks() < 1024, "sparse");
    let t = Instant::now();
    let r = policy_show(&sd);
    assert_error(&r, &format!("{} is 17825792 bytes", state.display()));
    assert!(r.stderr.contains("16777216"), "{r:?}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}
