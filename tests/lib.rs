//! Helpers shared by the end-to-end tests: find (or build) the `tt-host`
//! binary and the example guests, require /dev/kvm, make scratch dirs,
//! signal processes, ([`netns`]) network namespaces, TAPs and pings, and
//! ([`etcd`]) an etcd cluster to kill members of.
//!
//! The tests run no program a fresh Debian machine with Rust lacks: they
//! build with `cargo` and use system calls for the rest (no `ip`, `ping`
//! or `kill`), except the etcd tests, which need etcd and etcdctl
//! (`.ci/run` installs them).
//!
//! KVM tests fail when /dev/kvm is missing unless `TT_SKIP_KVM=1` is set,
//! in which case they say loudly that they skipped.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

pub mod daemon;
pub mod etcd;
pub mod guest_output;
pub mod netns;

/// Send signal `sig` to process `pid`; false if it is gone.
pub fn kill(pid: u32, sig: libc::c_int) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: kill takes no pointers.
    unsafe { libc::kill(pid, sig) == 0 }
}

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// Path of the `tt-host` binary, built once (release) for this test run.
pub fn tt_host() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let st = cargo()
            .args([
                "build",
                "--release",
                "-q",
                "-p",
                "tt-host",
                "--bin",
                "tt-host",
                // The cluster tests need it; its build needs protoc
                // (README: the test command installs it).
                "--features",
                "cluster",
            ])
            .current_dir(root())
            .status()
            .expect("run cargo");
        assert!(st.success(), "building tt-host failed");
        target_dir().join("release/tt-host")
    })
}

/// Path of the example guest `name` (guest-sdk/examples), built once.
pub fn guest(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    let sdk = root().join("guest-sdk");
    BUILT.get_or_init(|| {
        let st = cargo()
            .args(["build", "--release", "-q"])
            .current_dir(&sdk)
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("RUSTFLAGS")
            .status()
            .expect("run cargo");
        assert!(st.success(), "building the example guests failed");
    });
    let p = sdk.join("target/release").join(name);
    assert!(p.exists(), "example guest {} was not built", p.display());
    p
}

/// True if KVM tests should run. Panics if /dev/kvm is missing, unless
/// TT_SKIP_KVM=1, which makes KVM tests skip with a loud message.
pub fn kvm() -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    if std::env::var("TT_SKIP_KVM").as_deref() == Ok("1") {
        eprintln!("SKIPPED: /dev/kvm is missing and TT_SKIP_KVM=1 is set");
        return false;
    }
    panic!("/dev/kvm is missing: KVM tests fail without it (set TT_SKIP_KVM=1 to skip them)");
}

/// A fresh scratch directory, removed when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("tt-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
    /// Write `bytes` to `name` in the scratch dir and return its path.
    pub fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Result of one `tt-host` run.
#[derive(Debug)]
pub struct Run {
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(o: Output) -> Run {
        Run {
            status: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

/// Run `tt-host ARGS` to completion (with a generous timeout: a hang is a
/// failure, not a stuck test suite).
pub fn tt(args: &[&str]) -> Run {
    tt_with(Command::new(tt_host()).args(args))
}

/// The state directory tt-host runs with in tests that give none:
/// `target/tt-tests-state`, so tests never touch the host's
/// /var/lib/tt-host (block journals live in a state directory).
pub fn state_dir() -> PathBuf {
    target_dir().join("tt-tests-state")
}

/// Run a prepared `tt-host` command to completion, killing it after 120 s.
/// Without a `TT_HOST_STATE_DIR` of its own it gets [`state_dir`].
pub fn tt_with(cmd: &mut Command) -> Run {
    if !cmd.get_envs().any(|(k, _)| k == "TT_HOST_STATE_DIR") {
        cmd.env("TT_HOST_STATE_DIR", state_dir());
    }
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    // A copy of tt-host (made for another user to run) can be "busy" for
    // a moment: another test's fork may still hold the copy's write
    // descriptor until its exec closes it.
    let mut tries = 0;
    let child = loop {
        match cmd.spawn() {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy && tries < 100 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            r => break r.expect("spawn tt-host"),
        }
    };
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output()));
    match rx.recv_timeout(std::time::Duration::from_secs(120)) {
        Ok(out) => out.expect("wait for tt-host").into(),
        Err(_) => {
            kill(pid, libc::SIGKILL);
            panic!("tt-host {cmd:?} did not finish within 120 s");
        }
    }
}

/// Assert that a run failed with status 1 and a message containing `needle`.
#[track_caller]
pub fn assert_error(r: &Run, needle: &str) {
    assert_eq!(r.status, 1, "expected exit status 1, got {r:?}");
    assert!(
        r.stderr.contains(needle),
        "stderr should mention {needle:?}: {r:?}"
    );
    assert_eq!(
        r.stderr.trim().lines().count(),
        1,
        "one-line message expected: {r:?}"
    );
    assert!(!r.stderr.contains("panicked"), "{r:?}");
}
