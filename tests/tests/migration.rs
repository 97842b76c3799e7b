//! Live migration end to end on real KVM: a `tt-host run --control=SOCK`
//! source, a `tt-host migrate-receive` target, and `tt-host migrate-send`
//! between them, mostly with the `counter` guest. The counter prints `count 1`,
//! `count 2`, ... and writes record K to its disk before it prints
//! `count K`; with a dirtying rate it also rewrites and checks a buffer,
//! printing `counter: CORRUPT ...` if a page comes back wrong. So a lost
//! or repeated step, a lost disk write or a page the migration got wrong
//! shows in its output or on its disk.
//!
//! - A local upgrade over a Unix socket with the same state directory:
//!   the count goes on from the source's output into the target's with no
//!   gap or repeat, the source exits 0, and the state directory's
//!   `running/` holds exactly one entry all along (none once the target
//!   is stopped).
//! - Over TCP with a pre-shared key, separate state directories and the
//!   same disk: the count goes on, and the disk holds every record.
//! - A wrong key: migrate-send says "authentication failed", the source
//!   counts on, the target exits 1.
//! - A guest dirtying 10 MiB/s still converges with the default downtime
//!   and shows no corruption on the target.
//! - With no downtime allowed and a 2 s limit it does not converge:
//!   migrate-send gives up, the source counts on with no gap, the target
//!   exits 1.
//! - A target SIGKILLed mid-migration: migrate-send fails, the source
//!   counts on uncorrupted, and a later migration to a fresh target works.
//! - A target that refuses the guest at the switch (its disk is another
//!   image): migrate-send says why and that the guest runs on, the source
//!   holds its disk again and counts on with no gap, and a later
//!   migration works.
//! - A source SIGKILLed mid-migration: the target discards (exit 1, a
//!   migration message) and leaves nothing admitted.
//! - migrate-send without --to, with a bad --to, over TCP without --psk,
//!   or to a target that is not listening: a one-line error, exit 1, and
//!   the source counts on.
//! - A net guest (the `net` example) in a network namespace the test
//!   makes: over a Unix socket the source hands its TAP to the target,
//!   which goes on answering ICMP echo and ARP with the same MAC,
//!   numbering its replies on from the source's.
//!
//! Every tt-host a test starts is SIGKILLed when the test ends early, and
//! each test checks at its end that none of its processes or admissions
//! is left.
//!
//! On kvm-pvm the guest's TSC is the host's, so nothing here asserts
//! timing, only the order and continuity of the counts (the few bounds
//! below only catch hangs).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tt_tests::guest_output::{acks, counter_record as record, Host, WAIT};
use tt_tests::netns::{Netns, Ping};
use tt_tests::*;

/// The counter's tick, in milliseconds.
const TICK_MS: &str = "50";

/// The dirtying guest's arguments: 10 MiB/s over a 32 MiB buffer.
const DIRTYING: [&str; 4] = ["count", TICK_MS, "10240", "32"];

/// A pre-shared key (32 bytes).
const KEY: &[u8] = b"migration-test-key-0123456789ab\n";

/// What these tests ask of a [`Host`] beyond the shared harness.
trait MigrationHost {
    fn counts_for(&mut self, d: Duration, next: u64) -> u64;
    fn stop(self, next: u64) -> u64;
    fn migrated_away(self, next: u64) -> u64;
    fn gave_up(self, needle: &str);
}

impl MigrationHost for Host {
    /// The lines that arrive within `d`, which must all be counts going
    /// on from `next` (no CORRUPT, no error); the last count read.
    fn counts_for(&mut self, d: Duration, next: u64) -> u64 {
        let deadline = Instant::now() + d;
        let mut last = next - 1;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(l) = (!left.is_zero()).then(|| self.line_within(left)).flatten() else {
                return last;
            };
            assert_eq!(
                l,
                format!("count {}", last + 1),
                "unexpected line; all: {:#?}",
                self.seen
            );
            last += 1;
        }
    }

    /// SIGTERM tt-host, which stops it with status 1 and a message naming
    /// the signal; the lines printed after those already read must go on
    /// from `next`; the last count printed.
    fn stop(self, next: u64) -> u64 {
        assert!(kill(self.pid(), libc::SIGTERM), "kill -TERM tt-host");
        let e = self.finish();
        assert_eq!(
            e.status.code(),
            Some(1),
            "exit after SIGTERM: {:?}",
            e.stderr
        );
        assert_eq!(e.stderr.len(), 1, "one-line message: {:?}", e.stderr);
        assert!(
            e.stderr[0].contains("exiting on signal 15 (SIGTERM)"),
            "{:?}",
            e.stderr
        );
        assert_consecutive(&e.stdout, next);
        next + e.stdout.len() as u64 - 1
    }

    /// The source after a successful migration: it exits 0 by itself;
    /// the lines it printed after those already read must go on from
    /// `next`; the last count it printed.
    fn migrated_away(self, next: u64) -> u64 {
        let e = self.finish();
        assert_eq!(
            e.status.code(),
            Some(0),
            "the source after the migration: {:?} {:?}",
            e.stdout,
            e.stderr
        );
        assert!(e.stderr.is_empty(), "the source said: {:?}", e.stderr);
        assert_consecutive(&e.stdout, next);
        next + e.stdout.len() as u64 - 1
    }

    /// A target that must give up by itself: it exits 1 with a message
    /// containing `needle` and has run no guest.
    fn gave_up(self, needle: &str) {
        let e = self.finish();
        assert_eq!(
            e.status.code(),
            Some(1),
            "the target: {:?} {:?}",
            e.stdout,
            e.stderr
        );
        assert!(
            e.stdout.is_empty(),
            "the target ran the guest: {:?}",
            e.stdout
        );
        assert!(
            e.stderr.iter().any(|l| l.contains(needle)),
            "the target's message should mention {needle:?}: {:?}",
            e.stderr
        );
        assert!(
            !e.stderr.iter().any(|l| l.contains("panicked")),
            "{:?}",
            e.stderr
        );
    }
}

/// `lines` are `count first`, `count first+1`, ...
#[track_caller]
fn assert_consecutive(lines: &[String], first: u64) {
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(
            *l,
            format!("count {}", first + i as u64),
            "all lines: {lines:#?}"
        );
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago (bound to port 0,
/// then released).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().unwrap().port()
}

/// Wait until something listens on 127.0.0.1:`port` (seen in
/// /proc/net/tcp, so that no connection is used up to find out).
fn wait_listening(port: u16) {
    let want = format!("0100007F:{port:04X}");
    let deadline = Instant::now() + WAIT;
    loop {
        let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
        let listening = table.lines().skip(1).any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1] == want && f[3] == "0A"
        });
        if listening {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "nothing listens on 127.0.0.1:{port}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Wait until the Unix socket `p` exists.
fn wait_socket(p: &Path) {
    use std::os::unix::fs::FileTypeExt;
    let deadline = Instant::now() + WAIT;
    while !std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket()) {
        assert!(Instant::now() < deadline, "no socket at {}", p.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The `*.lock` entries of `state`'s table of running unikernels.
fn admitted(state: &Path) -> Vec<String> {
    match std::fs::read_dir(state.join("running")) {
        Ok(d) => d
            .map_while(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".lock"))
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// The entries of `state`'s `running/` that some process holds (its
/// flock taken): those admission counts. An entry whose holder has gone
/// (SIGKILLed) is dead, and the next admission reaps it.
fn live(state: &Path) -> Vec<String> {
    use std::os::fd::AsRawFd;
    admitted(state)
        .into_iter()
        .filter(|n| {
            let Ok(f) = std::fs::File::open(state.join("running").join(n)) else {
                return false; // released meanwhile
            };
            // SAFETY: flock on a descriptor we own; no memory involved.
            let free = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } == 0;
            // Closing `f` lets go of the shared lock taken to look.
            !free
        })
        .collect()
}

/// Does some process hold a lock on `image` (as a running tt-host holds
/// its disks')?
fn locked(image: &Path) -> bool {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(image).expect("open the image");
    // SAFETY: flock on a descriptor we own; no memory involved.
    let free = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } == 0;
    // Closing `f` lets go of the shared lock taken to look.
    !free
}

/// A TCP relay on 127.0.0.1 for one connection: what the source sends
/// goes on to `to` at no more than `rate` bytes a second, the answers
/// come back unhindered. A slow link: a guest dirtying memory faster
/// than it never converges, and a migration over it lasts long enough
/// to be cut. Either end closing closes both. Its address.
fn slow_link(to: String, rate: u64) -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the relay");
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let Ok((a, _)) = l.accept() else { return };
        let Ok(b) = std::net::TcpStream::connect(&to) else {
            return;
        };
        let (a2, b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
        std::thread::spawn(move || pump(b2, a2, None));
        pump(a, b, Some(rate));
    });
    addr
}

/// Copy `from` to `to` (at most `rate` bytes a second) until either
/// fails, then shut both down.
fn pump(mut from: std::net::TcpStream, mut to: std::net::TcpStream, rate: Option<u64>) {
    use std::io::{Read, Write};
    let start = Instant::now();
    let mut sent = 0u64;
    let mut buf = vec![0u8; 16 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        sent += n as u64;
        if let Some(r) = rate {
            let due = Duration::from_secs_f64(sent as f64 / r as f64);
            if let Some(w) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(w);
            }
        }
    }
    let _ = from.shutdown(std::net::Shutdown::Both);
    let _ = to.shutdown(std::net::Shutdown::Both);
}

/// The slow link's rate: 8 MiB/s, below the dirtying guest's 10 MiB/s.
const SLOW: u64 = 8 << 20;

/// One test's scratch directory: the counter's 1 MiB disk, the source's
/// state directory and control socket, a second state directory for a
/// target on "another host", and the key file.
struct Setup {
    s: Scratch,
    image: PathBuf,
    state: PathBuf,
    state2: PathBuf,
    sock: PathBuf,
    psk: PathBuf,
}

impl Setup {
    fn new(tag: &str) -> Setup {
        let s = Scratch::new(tag);
        let image = s.file("disk.img", &vec![0u8; 1 << 20]);
        let psk = s.file("psk", KEY);
        Setup {
            image,
            state: s.path("state"),
            state2: s.path("state2"),
            sock: s.path("ctl"),
            psk,
            s,
        }
    }

    fn control_arg(&self) -> String {
        format!("--control={}", self.sock.display())
    }

    fn psk_arg(&self) -> String {
        format!("--psk={}", self.psk.display())
    }

    /// `tt-host run --mem=MEM --control ... counter -- ARGS` with the
    /// disk and the source's state directory.
    fn run(&self, mem: &str, args: &[&str]) -> Host {
        Host::spawn(
            Command::new(tt_host())
                .args(["run", &format!("--mem={mem}"), "--name=counter"])
                .arg(format!("--state-dir={}", self.state.display()))
                .arg(self.control_arg())
                .arg(format!("--block:disk={}", self.image.display()))
                .arg(guest("counter"))
                .arg("--")
                .args(args),
        )
    }

    /// `tt-host migrate-receive --listen=ADDR EXTRA --state-dir=STATE` with
    /// the disk.
    fn receive(&self, listen: &str, extra: &[String], state: &Path) -> Host {
        Host::spawn(
            Command::new(tt_host())
                .arg("migrate-receive")
                .arg(format!("--listen={listen}"))
                .args(extra)
                .arg(format!("--state-dir={}", state.display()))
                .arg(format!("--block:disk={}", self.image.display())),
        )
    }

    /// A target listening on a fresh TCP port with the key, admitting
    /// into the second state directory; it and its `--to`.
    fn tcp_target(&self) -> (Host, String) {
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let h = self.receive(&addr, &[self.psk_arg()], &self.state2);
        wait_listening(port);
        (h, addr)
    }

    /// `tt-host migrate-send --control=SOCK EXTRA`, to completion.
    fn send(&self, extra: &[&str]) -> Run {
        let mut a = vec!["migrate-send".to_string(), self.control_arg()];
        a.extend(extra.iter().map(|s| s.to_string()));
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        tt(&a)
    }

    /// The same, in a thread.
    fn send_in_background(&self, extra: &[&str]) -> std::thread::JoinHandle<Run> {
        let mut a = vec!["migrate-send".to_string(), self.control_arg()];
        a.extend(extra.iter().map(|s| s.to_string()));
        std::thread::spawn(move || {
            let a: Vec<&str> = a.iter().map(String::as_str).collect();
            tt(&a)
        })
    }

    /// Apply `image`'s journal kept in `state` (as the next start would),
    /// then check that its sectors hold the records of the last counts up
    /// to `last`: the 127 before it and itself.
    fn check_disk(&self, state: &Path, last: u64) {
        let r = tt(&[
            "journal",
            "drain",
            self.image.to_str().unwrap(),
            &format!("--state-dir={}", state.display()),
        ]);
        assert_eq!(r.status, 0, "journal drain: {r:?}");
        let bytes = std::fs::read(&self.image).unwrap();
        for k in last.saturating_sub(126).max(1)..=last {
            let sector = &bytes[(k % 128) as usize * 512..][..512];
            assert_eq!(
                record(sector),
                Ok(k),
                "sector {} after count {last}",
                k % 128
            );
        }
    }

    /// The test is over: no process names its scratch directory any more
    /// (every tt-host it started has exited, or its guard killed it), and
    /// nothing is left admitted in either state directory.
    fn done(self) {
        let dir = self.s.0.display().to_string();
        let mut left = Vec::new();
        for e in std::fs::read_dir("/proc").unwrap().map_while(Result::ok) {
            let name = e.file_name();
            if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
                continue;
            };
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(&dir) {
                left.push(format!("{}: {cmdline}", name.to_string_lossy()));
            }
        }
        assert!(left.is_empty(), "processes of the test remain: {left:#?}");
        for st in [&self.state, &self.state2] {
            let a = live(st);
            assert!(a.is_empty(), "{} stays admitted: {a:?}", st.display());
        }
    }
}

/// A successful migrate-send: exit 0 and the one `migrated: ...` line.
#[track_caller]
fn assert_migrated(r: &Run) {
    assert_eq!(r.status, 0, "migrate-send: {r:?}");
    assert!(r.stdout.starts_with("migrated: "), "migrate-send: {r:?}");
    assert!(r.stdout.contains(" rounds, "), "migrate-send: {r:?}");
    assert!(r.stderr.is_empty(), "migrate-send: {r:?}");
}

#[test]
fn local_upgrade_over_a_unix_socket_continues_the_count_with_one_admission() {
    if !kvm() {
        return;
    }
    let set = Setup::new("mig-local");
    let mut src = set.run("32", &["count", TICK_MS]);
    let last = src.counts(1, 5);
    assert_eq!(admitted(&set.state).len(), 1, "the source's entry");

    let mig = set.s.path("mig");
    let mut tgt = set.receive(
        mig.to_str().unwrap(),
        &[],
        &set.state, // the same state directory: a local upgrade
    );
    wait_socket(&mig);
    assert_eq!(
        admitted(&set.state).len(),
        1,
        "a listening target admits nothing yet"
    );

    // Watch running/ all through the migration: one entry at every look.
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (stop, state) = (stop.clone(), set.state.clone());
        std::thread::spawn(move || {
            let mut looks = 0u64;
            let mut wrong = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let a = admitted(&state);
                if a.len() != 1 {
                    wrong.push(a);
                }
                looks += 1;
                std::thread::sleep(Duration::from_millis(1));
            }
            (looks, wrong)
        })
    };
    let r = set.send(&[&format!("--to={}", mig.display())]);
    assert_migrated(&r);
    let last = src.migrated_away(last + 1);
    let next = tgt.counts(last + 1, 5) + 1;
    stop.store(true, Ordering::Relaxed);
    let (looks, wrong) = watcher.join().unwrap();
    assert!(looks > 0);
    assert!(
        wrong.is_empty(),
        "running/ did not hold exactly one entry at {} of {looks} looks: {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
    assert_eq!(admitted(&set.state).len(), 1, "after the migration");
    assert!(!mig.exists(), "the listening socket stays behind");

    let last = tgt.stop(next);
    assert!(admitted(&set.state).is_empty(), "after the target stopped");
    set.check_disk(&set.state, last);
    set.done();
}

#[test]
fn tcp_with_a_key_continues_the_count_and_keeps_the_disk() {
    if !kvm() {
        return;
    }
    let set = Setup::new("mig-tcp");
    let mut src = set.run("32", &["count", TICK_MS]);
    let last = src.counts(1, 5);
    let (mut tgt, addr) = set.tcp_target();
    let r = set.send(&[&format!("--to={addr}"), &set.psk_arg()]);
    assert_migrated(&r);
    let last = src.migrated_away(last + 1);
    // The source released its entry (the target did not take it over:
    // only a Unix socket carries it); the target holds its own.
    assert!(
        admitted(&set.state).is_empty(),
        "the source's entry stays: {:?}",
        admitted(&set.state)
    );
    assert_eq!(live(&set.state2).len(), 1, "the target's entry");
    let next = tgt.counts(last + 1, 10) + 1;
    let last = tgt.stop(next);
    set.check_disk(&set.state2, last);
    set.done();
}

#[test]
fn a_wrong_key_is_refused_and_the_source_counts_on() {
    if !kvm() {
        return;
    }
    let set = Setup::new("mig-psk");
    let mut src = set.run("32", &["count", TICK_MS]);
    let last = src.counts(1, 3);
    let (tgt, addr) = set.tcp_target();
    let wrong = set.s.file("wrong", b"not-the-key-at-all-0123456789\n");
    let r = set.send(&[
        &format!("--to={addr}"),
        &format!("--psk={}", wrong.display()),
    ]);
    assert_error(&r, "authentication failed");
    tgt.gave_up("authentication failed");
    let next = src.counts(last + 1, 5) + 1;
    assert!(admitted(&set.state2).is_empty(), "the target admitted");
    src.stop(next);
    set.done();
}

#[test]
fn precopy_converges_with_a_guest_dirtying_10_mib_per_second() {
    if !kvm() {
        return;
    }
    let set = Setup::new("mig-dirty");
    let mut src = set.run("128", &DIRTYING);
    let last = src.counts(1, 10);
    let (mut tgt, addr) = set.tcp_target();
    let r = set.send(&[&format!("--to={addr}"), &set.psk_arg()]);
    assert_migrated(&r);
    let last = src.migrated_away(last + 1);
    // The guest checks its whole buffer once a second: a few seconds of
    // counting with no CORRUPT line show it came over intact.
    let last = tgt.counts_for(Duration::from_secs(4), last + 1);
    let next = tgt.counts(last + 1, 1) + 1;
    let last = tgt.stop(next);
    set.check_disk(&set.state2, last);
    set.done();
}

#[test]
fn a_migration_that_does_not_converge_gives_up_and_the_source_runs_on() {
    if !kvm() {
        return;
    }
    let set = Setup::new("mig-noconv");
    let mut src = set.run("128", &DIRTYING);
    let last = src.counts(1, 5);
    let (tgt, addr) = set.tcp_target();
    // The guest dirties its memory in bursts every 10 ms: on a fast link a
    // round can fall between two and find nothing dirty, which meets even
    // a downtime of 0. Over a link slower than the dirtying it never does.
    let link = slow_link(addr, SLOW);
    let t = Instant::now();
    let r = set.send(&[
        &format!("--to={link}"),
        &set.psk_arg(),
        "--downtime-ms=0",
        "--timeout=2",
    ]);
    let took = t.elapsed();
    assert_error(&r, "did not converge");
    // A bound that only catches a limit that is not kept at all.
    assert!(took < Duration::from_secs(20), "it took {took:?}");
    tgt.gave_up("did not converge");
    assert!(admitted(&set.state2).is_empty(), "the target admitted");
    // The guest ran all along: the counts go on with no gap, and its
    // buffer is still checked good.
    let last = src.counts_for(Duration::from_secs(2), last + 1);
    let next = src.counts(last + 1, 1) + 1;
    src.stop(next);
    set.done();
}

#[test]
fn a_target_killed_mid_migration_leaves_the_source_running() {
    if !kvm() {
        return;
    }
    let set = Setup::new("mig-killtgt");
    let mut src = set.run("128", &DIRTYING);
    let last = src.counts(1, 5);
    let (tgt, addr) = set.tcp_target();
    // A link slower than the dirtying: the pre-copy is still going on when
    // the process is killed (on a fast link it may be over already).
    let link = slow_link(addr, SLOW);
    let send = set.send_in_background(&[
        &format!("--to={link}"),
        &set.psk_arg(),
        "--downtime-ms=0",
        "--timeout=30",
    ]);
    std::thread::sleep(Duration::from_millis(500));
    assert!(kill(tgt.pid(), libc::SIGKILL), "the target is gone early");
    let _ = tgt.finish();
    let r = send.join().unwrap();
    assert_error(&r, "migration stream");
    // The target's entry (if it got that far) is gone with it; the
    // source counts on, its buffer intact.
    let last = src.counts_for(Duration::from_secs(2), last + 1);
    let last = src.counts(last + 1, 1);
    assert!(locked(&set.image), "the source does not hold its disk");

    // A fresh target gets the guest: the source still holds (or took
    // back) the disk's locks and can hand them over again.
    let (mut tgt, addr) = set.tcp_target();
    let r = set.send(&[&format!("--to={addr}"), &set.psk_arg()]);
    assert_migrated(&r);
    let last = src.migrated_away(last + 1);
    let last = tgt.counts_for(Duration::from_secs(2), last + 1);
    let next = tgt.counts(last + 1, 1) + 1;
    let last = tgt.stop(next);
    set.check_disk(&set.state2, last);
    set.done();
}

#[test]
fn a_source_killed_mid_migration_makes_the_target_discard() {
    if !kvm() {
        return;
    }
    let set = Setup::new("mig-killsrc");
    let mut src = set.run("128", &DIRTYING);
    src.counts(1, 5);
    let (tgt, addr) = set.tcp_target();
    // A link slower than the dirtying: the pre-copy is still going on when
    // the process is killed (on a fast link it may be over already).
    let link = slow_link(addr, SLOW);
    let send = set.send_in_background(&[
        &format!("--to={link}"),
        &set.psk_arg(),
        "--downtime-ms=0",
        "--timeout=30",
    ]);
    std::thread::sleep(Duration::from_millis(500));
    assert!(kill(src.pid(), libc::SIGKILL), "the source is gone early");
    let _ = src.finish();
    tgt.gave_up("migration stream");
    assert!(
        admitted(&set.state2).is_empty(),
        "the discarding target stays admitted"
    );
    let r = send.join().unwrap();
    assert_eq!(r.status, 1, "migrate-send: {r:?}");
    // The killed source's entry is dead (the next admission reaps it).
    assert!(
        live(&set.state).is_empty(),
        "the killed source's entry is held"
    );
    set.done();
}

#[test]
fn migrate_send_errors_are_one_line_and_leave_the_source_running() {
    if !kvm() {
        return;
    }
    let set = Setup::new("mig-errors");
    let mut src = set.run("32", &["count", TICK_MS]);
    let mut last = src.counts(1, 3);

    let r = set.send(&[]);
    assert_error(&r, "--to");
    let r = set.send(&["--to=nonsense"]);
    assert_error(&r, "neither a Unix socket path");
    let r = set.send(&[&format!("--to=127.0.0.1:{}", free_port())]);
    assert_error(&r, "needs --psk=FILE");
    let r = set.send(&[&format!("--to=127.0.0.1:{}", free_port()), &set.psk_arg()]);
    assert_error(&r, "cannot connect to 127.0.0.1:");
    let nobody = set.s.path("nobody");
    let r = set.send(&[&format!("--to={}", nobody.display())]);
    assert_error(&r, "cannot connect to");

    last = src.counts(last + 1, 3);
    assert_eq!(admitted(&set.state).len(), 1);
    src.stop(last + 1);
    set.done();
}

#[test]
fn a_target_that_refuses_at_the_switch_gives_the_disk_back_to_the_source() {
    if !kvm() {
        return;
    }
    let set = Setup::new("mig-refuse");
    let mut src = set.run("32", &["count", TICK_MS]);
    let last = src.counts(1, 5);

    // A target whose disk is another image: it refuses the state (after
    // the source paused and let go of its disk), and the source takes
    // its disk back and resumes.
    let other = set.s.file("other.img", &vec![0u8; 1 << 20]);
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let tgt = Host::spawn(
        Command::new(tt_host())
            .arg("migrate-receive")
            .arg(format!("--listen={addr}"))
            .arg(set.psk_arg())
            .arg(format!("--state-dir={}", set.state2.display()))
            .arg(format!("--block:disk={}", other.display())),
    );
    wait_listening(port);
    let r = set.send(&[&format!("--to={addr}"), &set.psk_arg()]);
    assert_error(&r, "the guest runs on here");
    assert!(r.stderr.contains("block device 'disk'"), "{r:?}");
    tgt.gave_up("block device 'disk'");
    assert!(admitted(&set.state2).is_empty(), "the target admitted");

    // Paused for the switch and resumed: the counts go on with no gap.
    let last = src.counts(last + 1, 5);
    assert!(locked(&set.image), "the source does not hold its disk");

    // And it can still go: to a target with the right disk.
    let (mut tgt, addr) = set.tcp_target();
    let r = set.send(&[&format!("--to={addr}"), &set.psk_arg()]);
    assert_migrated(&r);
    let last = src.migrated_away(last + 1);
    let next = tgt.counts(last + 1, 5) + 1;
    let last = tgt.stop(next);
    set.check_disk(&set.state2, last);
    set.done();
}

/// The net guest's address and MAC, and the host's end of its TAP.
const GUEST_IP: [u8; 4] = [10, 0, 0, 2];
const GUEST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const GUEST_MAC_ARG: &str = "02:00:00:00:00:02";
const HOST_IP: [u8; 4] = [10, 0, 0, 1];

/// Read `h`'s lines until one contains `needle`; all of them, that one
/// last.
fn until(h: &mut Host, needle: &str) -> Vec<String> {
    let mut got = Vec::new();
    loop {
        let l = h.line();
        let done = l.contains(needle);
        got.push(l);
        if done {
            return got;
        }
    }
}

/// A local migration of a net guest (the `net` example, which answers ARP
/// and ICMP echo and exits 0 after `limit=6` echo replies): it answers 3
/// pings on the source, moves over a Unix socket to a target whose
/// command line attaches the same TAP, and there answers 3 more, from the
/// same MAC, numbering them 4 to 6, and exits 0. The source hands its TAP
/// descriptor over (a TAP cannot be attached twice), exits 0, and the
/// target's replies prove the guest's state moved with it: a guest booted
/// afresh would number its replies from 1 and run on after the third.
///
/// Everything runs in a network namespace the test creates, holding TAP
/// `tap0` at 10.0.0.1/24 (see tt_tests::netns); the kernel deletes it
/// with the TAP when the test ends, passed or failed.
#[test]
fn a_net_guest_keeps_answering_ping_on_its_mac_across_a_local_migration() {
    if !kvm() {
        return;
    }
    let ns = Netns::new();
    ns.add_tap("tap0");
    ns.set_mtu("tap0", 1500);
    ns.set_addr("tap0", HOST_IP, 24);
    ns.set_up("tap0", true);
    let set = Setup::new("mig-net");
    let net_args = [
        "--net:service0=tap0".to_string(),
        format!("--net-mac:service0={GUEST_MAC_ARG}"),
    ];

    let mut cmd = ns.command(tt_host());
    cmd.args(["run", "--mem=32", "--name=net"])
        .arg(format!("--state-dir={}", set.state.display()))
        .arg(set.control_arg())
        .args(&net_args)
        .arg(guest("net"))
        .args(["--", "10.0.0.2", "limit=6"]);
    let mut src = Host::spawn(&mut cmd);
    let boot = until(&mut src, "net: ready");
    assert!(
        boot.iter()
            .any(|l| l.contains(&format!("net: service0 mac={GUEST_MAC_ARG} "))),
        "the guest's MAC: {boot:#?}"
    );

    // Exactly three requests (the guest counts every one it answers), each
    // answered.
    let mut pinger = ns.pinger();
    let before = pinger.ping(GUEST_IP, Ping::exactly(3, 56, WAIT));
    assert_eq!(before.received, 3, "{before:?}; source: {:#?}", src.seen);
    until(&mut src, "net: echo reply 3 to 10.0.0.1");
    assert_eq!(
        ns.neighbour("tap0", GUEST_IP),
        Some(GUEST_MAC),
        "the MAC that answered ARP on the source"
    );

    let mig = set.s.path("mig");
    let mut cmd = ns.command(tt_host());
    cmd.arg("migrate-receive")
        .arg(format!("--listen={}", mig.display()))
        .arg(format!("--state-dir={}", set.state.display()))
        .args(&net_args);
    let mut tgt = Host::spawn(&mut cmd);
    wait_socket(&mig);
    let r = set.send(&[&format!("--to={}", mig.display())]);
    assert_migrated(&r);
    let e = src.finish();
    assert_eq!(
        e.status.code(),
        Some(0),
        "the source after the migration: {:?} {:?}",
        e.stdout,
        e.stderr
    );
    assert!(e.stderr.is_empty(), "the source said: {:?}", e.stderr);
    assert!(
        e.stdout.is_empty(),
        "the source went on after the migration: {:?}",
        e.stdout
    );

    // Forget the guest's MAC: the next ping asks again by ARP, which the
    // target must answer with the same MAC.
    ns.forget_neighbour("tap0", GUEST_IP);
    let after = pinger.ping(GUEST_IP, Ping::exactly(3, 56, WAIT));
    assert_eq!(
        after.received,
        3,
        "{after:?}; the target so far: {:#?}",
        tgt.arrived()
    );
    assert_eq!(
        ns.neighbour("tap0", GUEST_IP),
        Some(GUEST_MAC),
        "the MAC that answered ARP on the target"
    );
    let e = tgt.finish();
    assert_eq!(
        e.status.code(),
        Some(0),
        "the target: {:?} {:?}",
        e.stdout,
        e.stderr
    );
    assert!(e.stderr.is_empty(), "the target said: {:?}", e.stderr);
    // The target printed nothing of a boot: the guest went on where it
    // was, answering ARP again and numbering its replies on.
    let replies: Vec<&String> = e
        .stdout
        .iter()
        .filter(|l| l.starts_with("net: echo reply"))
        .collect();
    assert_eq!(
        replies,
        [4, 5, 6]
            .map(|k| format!("net: echo reply {k} to 10.0.0.1"))
            .iter()
            .collect::<Vec<_>>(),
        "the target's output: {:#?}",
        e.stdout
    );
    assert!(
        e.stdout.contains(&"net: arp reply to 10.0.0.1".to_string()),
        "the target's output: {:#?}",
        e.stdout
    );
    assert_eq!(e.stdout.last().map(String::as_str), Some("net: OK"));
    assert!(
        !e.stdout
            .iter()
            .any(|l| l.contains("ready") || l.contains("FAIL")),
        "the target's output: {:#?}",
        e.stdout
    );
    assert!(live(&set.state).is_empty(), "after the target exited");
    set.done();
}

/// A virtio-blk guest with 8 writes in flight migrates over TCP (pre-copy:
/// the device's own writes into guest memory, used ring and read data,
/// are tracked as the guest's are), then on over a Unix socket (a local
/// upgrade): every write is acknowledged once, none lost, and the guest
/// writes on at the end.
#[test]
fn a_virtio_blk_guest_migrates_with_its_queue_there_and_back() {
    if !kvm() {
        return;
    }
    let set = Setup::new("mig-virtio");
    std::fs::File::options()
        .write(true)
        .open(&set.image)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let mut src = Host::spawn(
        Command::new(tt_host())
            .args(["run", "--mem=64", "--name=vblk"])
            .arg(format!("--state-dir={}", set.state.display()))
            .arg(set.control_arg())
            .arg(format!("--block:disk={}", set.image.display()))
            .arg(guest("vblk"))
            .args(["ack", "count=0", "depth=8"]),
    );
    let mut seen = Vec::new();
    while seen.len() < 50 {
        seen.extend(acks(&[src.line()]));
    }
    // There, over TCP, to "another host" (its own state directory), with
    // the target's own control socket.
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let ctl2 = set.s.path("ctl2");
    let mut tgt = Host::spawn(
        Command::new(tt_host())
            .arg("migrate-receive")
            .arg(format!("--listen={addr}"))
            .arg(set.psk_arg())
            .arg(format!("--state-dir={}", set.state2.display()))
            .arg(format!("--control={}", ctl2.display()))
            .arg(format!("--block:disk={}", set.image.display())),
    );
    wait_listening(port);
    assert_migrated(&set.send(&[&format!("--to={addr}"), &set.psk_arg()]));
    let e = src.finish();
    assert_eq!(e.status.code(), Some(0), "the source: {:?}", e.stderr);
    seen.extend(acks(&e.stdout));
    let mut more = 0;
    while more < 50 {
        let a = acks(&[tgt.line()]);
        more += a.len();
        seen.extend(a);
    }
    // And on, over a Unix socket, on that host (a local upgrade).
    let back = set.s.path("back.sock");
    let mut third = Host::spawn(
        Command::new(tt_host())
            .arg("migrate-receive")
            .arg(format!("--listen={}", back.display()))
            .arg(format!("--state-dir={}", set.state2.display()))
            .arg(format!("--block:disk={}", set.image.display())),
    );
    wait_socket(&back);
    let r = tt(&[
        "migrate-send",
        &format!("--control={}", ctl2.display()),
        &format!("--to={}", back.display()),
    ]);
    assert_migrated(&r);
    let e = tgt.finish();
    assert_eq!(e.status.code(), Some(0), "the first target: {:?}", e.stderr);
    seen.extend(acks(&e.stdout));
    let mut more = 0;
    while more < 50 {
        let a = acks(&[third.line()]);
        more += a.len();
        seen.extend(a);
    }
    assert!(kill(third.pid(), libc::SIGTERM));
    let e = third.finish();
    assert_eq!(e.status.code(), Some(1), "{:?}", e.stderr);
    seen.extend(acks(&e.stdout));
    seen.sort_unstable();
    let n = seen.len() as u64;
    assert!(
        seen.iter().copied().eq(1..=n),
        "acks lost or repeated across the migrations ({n} in all)"
    );
    set.done();
}
