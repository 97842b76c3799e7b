//! A `tt-host daemon` for the end-to-end tests, with its own state and
//! runtime directories, that cleans up after itself: dropped (also when a
//! test fails), it kills the daemon and every `tt-host run` started with
//! its state directory (they are in sessions of their own, so they are
//! found through /proc), then removes its directories.

use crate::{kill, tt_host, Run, Scratch};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Daemon {
    pub dir: Scratch,
    pub child: Option<Child>,
    /// Extra `tt-host daemon` options, used again by [`Daemon::start`].
    pub options: Vec<String>,
    /// The network namespace it runs in (its bridges, TAPs and rules
    /// go with it), dropped after the daemon and its unikernels.
    pub netns: Option<crate::netns::Netns>,
}

impl Daemon {
    /// A daemon on fresh directories (not started: see [`Daemon::start`]).
    pub fn new(tag: &str, options: &[&str]) -> Daemon {
        let dir = Scratch::new(tag);
        // Other users (the access tests) must reach the socket.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
        Daemon {
            dir,
            child: None,
            options: options.iter().map(|s| s.to_string()).collect(),
            netns: None,
        }
    }

    /// A daemon in a network namespace of its own, started.
    pub fn started_in_netns(tag: &str, options: &[&str]) -> Daemon {
        let mut d = Daemon::new(tag, options);
        d.netns = Some(crate::netns::Netns::new());
        d.start();
        d
    }

    /// A command for `program` in the daemon's network namespace (if it
    /// has one).
    pub fn command(&self, program: impl AsRef<Path>) -> Command {
        match &self.netns {
            Some(ns) => ns.command(program),
            None => Command::new(program.as_ref()),
        }
    }

    /// [`Daemon::new`] and [`Daemon::start`].
    pub fn started(tag: &str, options: &[&str]) -> Daemon {
        let mut d = Daemon::new(tag, options);
        d.start();
        d
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path("state")
    }

    pub fn runtime_dir(&self) -> PathBuf {
        self.dir.path("run")
    }

    pub fn socket(&self) -> PathBuf {
        self.runtime_dir().join("control.sock")
    }

    /// Start the daemon (again) and wait until it answers.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "the daemon runs already");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path("daemon.log"))
            .unwrap();
        let child = self
            .command(tt_host())
            .arg("daemon")
            .arg(format!("--state-dir={}", self.state_dir().display()))
            .arg(format!("--runtime-dir={}", self.runtime_dir().display()))
            .args(&self.options)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start tt-host daemon");
        self.child = Some(child);
        let t = Instant::now();
        loop {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("the daemon exited ({st}): {}", self.log());
            }
            // The socket is bound before the daemon is ready (a cluster
            // node joins first): a request then waits, and meets a reset
            // if the daemon gives up. Ready is when one is answered.
            if std::os::unix::net::UnixStream::connect(self.socket()).is_ok()
                && self.cli(&["list"]).status == 0
            {
                return;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "the daemon did not answer within 30 s: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A new ed25519 key for `user`, registered through this daemon
    /// (`key gen`, `key add`); the path of its seed file, in the scratch
    /// directory.
    pub fn add_key(&self, user: &str) -> String {
        let seed = self.dir.path(&format!("{user}.seed"));
        let r = self.cli(&["key", "gen", &seed.display().to_string()]);
        assert_eq!(r.status, 0, "{r:?}");
        let r = self.cli(&["key", "add", user, r.stdout.trim()]);
        assert_eq!(r.status, 0, "{r:?}");
        seed.display().to_string()
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path("daemon.log")).unwrap_or_default()
    }

    /// SIGKILL the daemon (its unikernels go on).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM the daemon and wait for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill(c.id(), libc::SIGTERM);
            let _ = c.wait();
        }
    }

    /// `tt-host ARGS` as a client of this daemon.
    pub fn cli(&self, args: &[&str]) -> Run {
        self.cli_with(self.command(tt_host()).args(args))
    }

    /// `client ARGS` (a copy of tt-host that `uid` can run) as a client of
    /// this daemon, run as uid and gid `uid` with no supplementary groups.
    pub fn cli_as(&self, uid: u32, client: &Path, args: &[&str]) -> Run {
        use std::os::unix::process::CommandExt;
        let mut cmd = self.command(client);
        cmd.args(args);
        // SAFETY: setgroups/setgid/setuid between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(uid) != 0
                    || libc::setuid(uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        self.cli_with(&mut cmd)
    }

    /// A prepared `tt-host` command as a client of this daemon.
    pub fn cli_with(&self, cmd: &mut Command) -> Run {
        cmd.env("TT_HOST_SOCKET", self.socket())
            .env("TT_HOST_STATE_DIR", self.state_dir());
        crate::tt_with(cmd)
    }

    /// The `tt-host run` processes of this daemon's unikernels (found by
    /// their --state-dir in /proc).
    pub fn unit_pids(&self) -> Vec<u32> {
        unit_pids(&self.state_dir())
    }

    /// Kill every unikernel (SIGKILL) and wait until they are gone.
    pub fn kill_units(&self) {
        let t = Instant::now();
        loop {
            let pids = self.unit_pids();
            if pids.is_empty() {
                return;
            }
            for p in &pids {
                kill(*p, libc::SIGKILL);
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "units do not die: {pids:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Wait until `f` holds (checking every 50 ms), or fail after
    /// `secs`, showing the last `tt-host list` and the daemon's log.
    #[track_caller]
    pub fn wait_for(&self, secs: u64, what: &str, mut f: impl FnMut() -> bool) {
        let t = Instant::now();
        while !f() {
            if t.elapsed() > Duration::from_secs(secs) {
                panic!(
                    "{what}: not within {secs} s\nlist: {:?}\nlog: {}",
                    self.cli(&["list"]),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The live processes whose command line has `--state-dir=DIR` and
/// `run` or `restore` (tt-host children of a daemon on DIR), zombies
/// excluded.
pub fn unit_pids(state_dir: &Path) -> Vec<u32> {
    let needle = format!("--state-dir={}", state_dir.display());
    let mut pids = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
        let is_run = matches!(args.get(1), Some(&b"run") | Some(&b"restore"));
        if is_run && args.contains(&needle.as_bytes()) {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let zombie = stat
                .rfind(')')
                .and_then(|i| stat[i + 1..].split_whitespace().next())
                == Some("Z");
            if !zombie {
                pids.push(pid);
            }
        }
    }
    pids
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        for _ in 0..100 {
            let pids = self.unit_pids();
            if pids.is_empty() {
                break;
            }
            for p in pids {
                kill(p, libc::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
