//! The files a `tt-host run` publishes for a supervisor (tt-host's
//! daemon): the console ring (`--console-log`), the stats file
//! (`--stats-file`) and the ready byte (`--x-ready-fd`), on real KVM.

use std::os::unix::process::CommandExt;
use std::process::Command;
use tt_host::runfile::console::ConsoleLog;
use tt_host::runfile::stats::{State, StatsFile};
use tt_tests::*;

fn img(name: &str) -> String {
    guest(name).display().to_string()
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// The console's lines, joined from their records, and their times.
fn lines(log: &ConsoleLog) -> Vec<(u64, String)> {
    let c = log.read_from(0).unwrap();
    assert_eq!(c.lost, 0);
    assert_eq!(c.next, log.end().unwrap());
    let mut out: Vec<(u64, String)> = vec![];
    let mut open = false;
    for r in c.records {
        let text = String::from_utf8_lossy(&r.bytes).into_owned();
        match out.last_mut() {
            Some(last) if open => last.1.push_str(&text),
            _ => out.push((r.time_ns, text)),
        }
        open = r.partial;
    }
    out
}

#[test]
fn the_console_goes_to_the_ring_and_the_counters_match_the_guests_block_io() {
    if !kvm() {
        return;
    }
    let dir = Scratch::new("runfile-blk");
    let (blocks, sector) = (64u64, 512u64);
    let disk = dir.path("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(blocks * sector)
        .unwrap();
    let (console, stats) = (dir.path("console"), dir.path("stats"));
    let before = now_ns();
    let r = tt(&[
        "run",
        "--mem=32",
        &format!("--state-dir={}", dir.path("state").display()),
        &format!("--console-log={}", console.display()),
        "--console-log-size=65536",
        &format!("--stats-file={}", stats.display()),
        &format!("--block:storage={}", disk.display()),
        "--block-durability=none",
        &img("blk"),
    ]);
    let after = now_ns();
    assert_eq!(r.status, 0, "{r:?}");
    assert_eq!(r.stdout, "", "the console went to stdout: {r:?}");

    let log = ConsoleLog::open(&console).unwrap();
    assert_eq!(log.capacity(), 65536);
    let got = lines(&log);
    let text: Vec<&str> = got.iter().map(|(_, l)| l.as_str()).collect();
    assert_eq!(
        text.first().copied(),
        Some("blk: capacity 32768 bytes, block size 512, 64 blocks")
    );
    let at = |l: &str| {
        text.iter()
            .position(|t| *t == l)
            .unwrap_or_else(|| panic!("{l:?} in {text:?}"))
    };
    assert!(at("blk: wrote 64 blocks") < at("blk: last block 63 ok"));
    assert!(at("blk: last block 63 ok") < at("blk: 64 blocks of 512 bytes verified"));
    assert_eq!(text.last().copied(), Some("blk: OK"), "{text:?}");
    for w in got.windows(2) {
        assert!(w[0].0 <= w[1].0, "times go backwards: {got:?}");
    }
    assert!(
        got.iter().all(|(t, _)| (before..=after).contains(t)),
        "{got:?}"
    );
    let last = log.last(2).unwrap();
    assert_eq!(last.records.len(), 2);
    assert_eq!(last.records[1].bytes, b"blk: OK");

    let s = StatsFile::read(&stats).unwrap();
    assert_eq!(s.state, State::Exited(0), "{s:?}");
    assert!(!s.still_running(), "{s:?}");
    // Every block written once, read once, the last re-read, then the
    // last and the first read again; the refused requests do not count.
    assert_eq!((s.block_write_ops, s.block_write_bytes), (64, 64 * 512));
    assert_eq!((s.block_read_ops, s.block_read_bytes), (67, 67 * 512));
    assert_eq!((s.net_rx_packets, s.net_tx_packets), (0, 0));
    // At least one exit per hypercall: every PUTS and block request.
    assert!(s.vm_exits >= 131 + got.len() as u64, "{s:?}");
    assert!((before..=after).contains(&s.guest_started_ns), "{s:?}");
    assert!(
        s.max_rss_kib > 0 && s.user_cpu_ns + s.system_cpu_ns > 0,
        "{s:?}"
    );
    let mode = |p: &std::path::Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    };
    assert_eq!((mode(&console), mode(&stats)), (0o600, 0o600));
}

#[test]
fn the_end_record_has_the_guests_exit_code_or_the_launchs_failure() {
    if !kvm() {
        return;
    }
    let dir = Scratch::new("runfile-exit");
    let (console, stats) = (dir.path("console"), dir.path("stats"));
    let r = tt(&[
        "run",
        "--mem=16",
        &format!("--console-log={}", console.display()),
        &format!("--stats-file={}", stats.display()),
        &img("hello"),
        "--",
        "exit=7",
    ]);
    assert_eq!(r.status, 7, "{r:?}");
    let s = StatsFile::read(&stats).unwrap();
    assert_eq!(
        (s.state, s.state.exit_status()),
        (State::Exited(7), Some(7))
    );
    let got = lines(&ConsoleLog::open(&console).unwrap());
    let text: Vec<&str> = got.iter().map(|(_, l)| l.as_str()).collect();
    assert_eq!(text, ["Hello, world", "arg[1]: exit=7"]);

    // A launch that fails before the guest runs.
    let r = tt(&[
        "run",
        &format!("--stats-file={}", stats.display()),
        &dir.path("missing.hvt").display().to_string(),
    ]);
    assert_error(&r, "cannot read image");
    let s = StatsFile::read(&stats).unwrap();
    assert_eq!((s.state, s.guest_started_ns), (State::Failed, 0), "{s:?}");
    assert_eq!(s.state.exit_status(), Some(1));
}

/// A pipe whose write end a child gets as descriptor `w` (not closed on
/// exec there, closed on exec everywhere else).
fn pipe() -> (std::fs::File, i32) {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two descriptors.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: just created, owned here.
    (unsafe { std::fs::File::from_raw_fd(fds[0]) }, fds[1])
}

#[test]
fn the_ready_fd_gets_r_once_the_guest_runs_and_eof_if_the_launch_fails() {
    if !kvm() {
        return;
    }
    use std::io::Read;
    for (args, want) in [
        (vec!["--mem=16", "GUEST"], "R"),
        (
            vec!["--mem=16", "--block:storage=/nonexistent", "GUEST"],
            "",
        ),
    ] {
        let (mut read_end, w) = pipe();
        let mut cmd = Command::new(tt_host());
        cmd.arg("run").arg(format!("--x-ready-fd={w}"));
        let hello = img("hello");
        cmd.args(
            args.iter()
                .map(|a| if *a == "GUEST" { hello.as_str() } else { a }),
        );
        cmd.env("TT_HOST_STATE_DIR", state_dir());
        // SAFETY: fcntl is async-signal-safe; it only clears FD_CLOEXEC.
        unsafe {
            cmd.pre_exec(move || {
                if libc::fcntl(w, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // SAFETY: our copy of the write end, no longer needed.
        unsafe { libc::close(w) };
        let mut got = String::new();
        read_end.read_to_string(&mut got).unwrap();
        let out = child.wait_with_output().unwrap();
        assert_eq!(got, want, "{args:?}: {out:?}");
        if want.is_empty() {
            assert_eq!(out.status.code(), Some(1), "{out:?}");
        } else {
            assert!(out.status.success(), "{out:?}");
        }
    }
    // A descriptor that is not open is named.
    let r = tt(&["run", "--x-ready-fd=987", &img("hello")]);
    assert_error(&r, "--x-ready-fd=987: file descriptor 987 is not open");
    let r = tt(&["run", "--x-ready-fd=1", &img("hello")]);
    assert_error(
        &r,
        "--x-ready-fd=1: expected an open file descriptor number, 3 or more",
    );
}

/// Kills its child on drop (a failed test leaves no guest running).
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        // Not once reaped: its pid may be another process's by now.
        if matches!(self.0.try_wait(), Ok(None)) {
            kill(self.0.id(), libc::SIGKILL);
            let _ = self.0.wait();
        }
    }
}

#[test]
fn a_running_guest_is_seen_through_its_files_and_sigterm_is_its_end_record() {
    if !kvm() {
        return;
    }
    let dir = Scratch::new("runfile-term");
    let (console, stats) = (dir.path("console"), dir.path("stats"));
    // As the daemon starts it: no stdout, the console in the ring only.
    let mut child = Child(
        Command::new(tt_host())
            .env("TT_HOST_STATE_DIR", state_dir())
            .arg("run")
            .arg("--mem=16")
            .arg(format!("--console-log={}", console.display()))
            .arg(format!("--stats-file={}", stats.display()))
            .arg(guest("time"))
            .arg("sleep-forever")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut pos = 0;
    let mut seen = String::new();
    while !seen.contains("time: sleeping") {
        assert!(
            std::time::Instant::now() < deadline,
            "no 'time: sleeping' in {seen:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
        let Ok(log) = ConsoleLog::open(&console) else {
            continue;
        };
        let c = log.read_from(pos).unwrap();
        for r in c.records {
            seen.push_str(&String::from_utf8_lossy(&r.bytes));
            seen.push('\n');
        }
        pos = c.next;
    }
    let s = StatsFile::read(&stats).unwrap();
    assert_eq!(s.state, State::Running);
    assert!(s.still_running(), "{s:?}");
    assert_eq!(s.pid, child.0.id());
    assert!(s.guest_started_ns > 0 && s.vm_exits > 0, "{s:?}");

    assert!(kill(child.0.id(), libc::SIGTERM));
    let status = child.0.wait().unwrap();
    assert_eq!(status.code(), Some(1));
    let s = StatsFile::read(&stats).unwrap();
    assert_eq!(s.state, State::Signaled(libc::SIGTERM), "{s:?}");
    assert_eq!(s.state.exit_status(), Some(1));
    assert!(!s.still_running());
}

#[test]
fn virtio_blk_requests_are_counted_when_they_complete() {
    if !kvm() {
        return;
    }
    for durability in ["journal", "none"] {
        let dir = Scratch::new("runfile-vblk");
        let disk = dir.path("disk.img");
        std::fs::File::create(&disk)
            .unwrap()
            .set_len(16 << 20)
            .unwrap();
        let stats = dir.path("stats");
        let r = tt(&[
            "run",
            "--mem=64",
            &format!("--state-dir={}", dir.path("state").display()),
            &format!("--stats-file={}", stats.display()),
            &format!("--block:disk={}", disk.display()),
            &format!("--block-durability={durability}"),
            &img("vblk"),
            "depth=8",
            "count=64",
        ]);
        assert_eq!(r.status, 0, "{durability}: {r:?}");
        assert!(r.stdout.contains("vblk: OK"), "{durability}: {r:?}");
        let s = StatsFile::read(&stats).unwrap();
        // 64 writes of 4 KiB, a flush (not counted), 64 reads of 4 KiB.
        assert_eq!(
            (s.block_write_ops, s.block_write_bytes),
            (64, 64 * 4096),
            "{durability}: {s:?}"
        );
        assert_eq!(
            (s.block_read_ops, s.block_read_bytes),
            (64, 64 * 4096),
            "{durability}: {s:?}"
        );
        assert_eq!(s.state, State::Exited(0));
    }
}
