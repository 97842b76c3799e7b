//! Pause, resume, snapshot and restore a running guest through its control
//! socket (`tt-host run --control=SOCK`), end to end on real KVM, with the
//! `counter` guest: it prints `count 1`, `count 2`, ... and writes record
//! K to its disk before it prints `count K`, so a lost or repeated step,
//! or a disk that does not match the memory, shows in its output and on
//! its disk.
//!
//! - `snapshot --stop` ends the run (exit 0) and `restore` continues it:
//!   the two outputs together are `count 1..N` with no gap or repeat, and
//!   the disk holds every printed count's record.
//! - A snapshot of a running guest lets it run on; one taken while paused
//!   restores (on a copy of the disk made meanwhile) to the count after
//!   the last one printed before the pause.
//! - While paused nothing is printed; after resume counting goes on with
//!   no gap.
//! - A disk image changed since the snapshot, a state file of another
//!   format version, a corrupted one and a missing one are refused with
//!   a one-line message saying which, and leave nothing admitted.
//! - A disk named on restore's command line (a copy with the same bytes
//!   and modification time) replaces the snapshot's.
//! - A restored guest is snapshotted and restored again.
//! - A virtio-blk guest with writes in flight is snapshotted and restored:
//!   every write is acknowledged once, none lost.
//!
//! Every tt-host a test starts is SIGKILLed when the test ends early, and
//! each test checks at its end that none of its processes, admissions or
//! control sockets is left.
//!
//! On kvm-pvm the guest's TSC is the host's, so after a pause or a restore
//! the counter prints the ticks it missed back to back: nothing here
//! asserts timing, only the order and continuity of the counts.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tt_tests::guest_output::{acks, counter_record as record, Host};
use tt_tests::*;

/// The counter's tick, in milliseconds.
const TICK_MS: &str = "50";

/// What these tests ask of a [`Host`] beyond the shared harness.
trait SnapshotHost {
    fn drain_until_quiet(&mut self, quiet: Duration) -> Vec<String>;
    fn stop(self, sig: libc::c_int, name: &str, next: u64) -> u64;
}

impl SnapshotHost for Host {
    /// The lines that arrive until none has for `quiet` (the console's
    /// writer thread may still hold lines the guest printed before it
    /// was paused).
    fn drain_until_quiet(&mut self, quiet: Duration) -> Vec<String> {
        std::iter::from_fn(|| self.line_within(quiet)).collect()
    }

    /// Send `sig` (SIGTERM or SIGINT, named `name`), which stops tt-host
    /// with status 1 and a message naming the signal; the lines printed
    /// after those already read, which must go on from `next`; the last
    /// count printed.
    fn stop(self, sig: libc::c_int, name: &str, next: u64) -> u64 {
        assert!(kill(self.pid(), sig), "kill -{name} tt-host");
        let e = self.finish();
        assert_eq!(
            e.status.code(),
            Some(1),
            "exit after SIG{name}: {:?}",
            e.stderr
        );
        assert_eq!(e.stderr.len(), 1, "one-line message: {:?}", e.stderr);
        let want = format!("exiting on signal {sig} (SIG{name})");
        assert!(e.stderr[0].contains(&want), "{:?}", e.stderr);
        assert_consecutive(&e.stdout, next);
        next + e.stdout.len() as u64 - 1
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

/// Copy `from` to `to` with its modification time (as `cp -p` does):
/// the same image to a restore, which compares bytes and time.
fn copy_as_is(from: &Path, to: &Path) {
    std::fs::copy(from, to).expect("copy the image");
    let mtime = std::fs::metadata(from).unwrap().modified().unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(to)
        .unwrap()
        .set_modified(mtime)
        .expect("set the copy's modification time");
}

/// Overwrite the byte at `at` in `file` with `b`.
fn poke(file: &Path, at: u64, b: u8) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(file)
        .unwrap()
        .write_all_at(&[b], at)
        .expect("write into the file");
}

/// One test's scratch directory: the counter's 1 MiB disk, a private
/// state directory, the control socket's path.
struct Setup {
    s: Scratch,
    image: PathBuf,
    state: PathBuf,
    sock: PathBuf,
}

impl Setup {
    fn new(tag: &str) -> Setup {
        let s = Scratch::new(tag);
        let image = s.file("disk.img", &vec![0u8; 1 << 20]);
        let state = s.path("state");
        let sock = s.path("ctl");
        Setup {
            s,
            image,
            state,
            sock,
        }
    }

    fn state_arg(&self) -> String {
        format!("--state-dir={}", self.state.display())
    }

    fn control_arg(&self) -> String {
        format!("--control={}", self.sock.display())
    }

    /// `tt-host run --control ... counter -- count 50` with the disk.
    fn run(&self) -> Host {
        Host::spawn(
            Command::new(tt_host())
                .args(["run", "--mem=32", "--name=counter"])
                .arg(self.state_arg())
                .arg(self.control_arg())
                .arg(format!("--block:disk={}", self.image.display()))
                .arg(guest("counter"))
                .args(["--", "count", TICK_MS]),
        )
    }

    /// `tt-host restore --state-dir=... EXTRA DIR`, running.
    fn restore(&self, extra: &[String], dir: &Path) -> Host {
        Host::spawn(
            Command::new(tt_host())
                .arg("restore")
                .arg(self.state_arg())
                .args(extra)
                .arg(dir),
        )
    }

    /// `tt-host restore --state-dir=... DIR` that must fail: how it ended.
    fn restore_refused(&self, dir: &Path) -> Run {
        let r = tt(&["restore", &self.state_arg(), dir.to_str().unwrap()]);
        assert!(self.nothing_admitted(), "a refused restore stays admitted");
        r
    }

    /// `tt-host OP --control=SOCK`, which must succeed; what it printed.
    fn ctl(&self, op: &str) -> String {
        let r = tt(&[op, &self.control_arg()]);
        assert_eq!(r.status, 0, "tt-host {op}: {r:?}");
        assert!(r.stderr.is_empty(), "tt-host {op}: {r:?}");
        r.stdout.trim().to_string()
    }

    /// `tt-host snapshot --control=SOCK DIR [--stop]`, which must
    /// succeed; what it printed.
    fn snapshot(&self, dir: &Path, stop: bool) -> String {
        let mut a = vec![
            "snapshot".to_string(),
            self.control_arg(),
            dir.display().to_string(),
        ];
        if stop {
            a.push("--stop".into());
        }
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let r = tt(&a);
        assert_eq!(r.status, 0, "tt-host {a:?}: {r:?}");
        assert!(
            r.stdout.starts_with("snapshot written ("),
            "tt-host {a:?}: {r:?}"
        );
        for f in ["state", "memory"] {
            assert!(dir.join(f).is_file(), "{} after {a:?}", f);
        }
        r.stdout.trim().to_string()
    }

    /// Is the state directory's table of running unikernels empty?
    fn nothing_admitted(&self) -> bool {
        match std::fs::read_dir(self.state.join("running")) {
            Ok(d) => d.count() == 0,
            Err(_) => true,
        }
    }

    /// Apply `image`'s journal (as the next start would), then check that
    /// its sectors hold the records of the last counts up to `last`: the
    /// 127 before it and itself. (Not 128: record `last + 1` may be
    /// written and not printed when tt-host stops, in sector
    /// `(last + 1) % 128`.)
    fn check_disk(&self, image: &Path, last: u64) {
        let r = tt(&[
            "journal",
            "drain",
            image.to_str().unwrap(),
            &self.state_arg(),
        ]);
        assert_eq!(r.status, 0, "journal drain: {r:?}");
        let bytes = std::fs::read(image).unwrap();
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
    /// (every tt-host it started has exited, or its guard killed it),
    /// nothing is left admitted, and no control socket is left behind.
    fn done(self) {
        use std::os::unix::fs::FileTypeExt;
        for e in std::fs::read_dir(&self.s.0).unwrap().map_while(Result::ok) {
            assert!(
                !e.file_type().unwrap().is_socket(),
                "control socket {} left behind",
                e.path().display()
            );
        }
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
        assert!(self.nothing_admitted(), "a unikernel stays admitted");
    }
}

/// Run the counter until it printed `n` counts, then `snapshot --stop`
/// to `dir`: the first run exits 0; the last count it printed.
fn count_and_stop(set: &Setup, n: u64, dir: &Path) -> u64 {
    let mut h = set.run();
    h.counts(1, n);
    let msg = set.snapshot(dir, true);
    assert!(msg.ends_with("the guest is stopped"), "{msg}");
    let e = h.finish();
    assert_eq!(
        e.status.code(),
        Some(0),
        "after snapshot --stop: {:?}",
        e.stderr
    );
    assert!(e.stderr.is_empty(), "{:?}", e.stderr);
    assert_consecutive(&e.stdout, n + 1);
    n + e.stdout.len() as u64
}

#[test]
fn snapshot_stop_then_restore_continues_the_count() {
    if !kvm() {
        return;
    }
    let set = Setup::new("snap-stop");
    let dir = set.s.path("snap");
    let last = count_and_stop(&set, 5, &dir);
    assert!(set.nothing_admitted(), "the stopped run stays admitted");

    // The restore goes on from the next count (not from 1), and serves a
    // control socket of its own.
    let ctl2 = set.s.path("ctl2");
    let mut h = set.restore(&[format!("--control={}", ctl2.display())], &dir);
    let next = h.counts(last + 1, 5) + 1;
    let r = tt(&["status", &format!("--control={}", ctl2.display())]);
    assert_eq!((r.status, r.stdout.trim()), (0, "running"), "{r:?}");
    let last = h.stop(libc::SIGTERM, "TERM", next);
    set.check_disk(&set.image, last);
    set.done();
}

#[test]
fn snapshot_of_a_running_guest_lets_it_run_and_restores_from_that_point() {
    if !kvm() {
        return;
    }
    let set = Setup::new("snap-run");
    let mut h = set.run();
    let mut last = h.counts(1, 3);

    // Taken while it runs: it runs on, with no gap.
    let dir = set.s.path("snap");
    let msg = set.snapshot(&dir, false);
    assert!(msg.ends_with("the guest runs on"), "{msg}");
    assert_eq!(set.ctl("status"), "running");
    last = h.counts(last + 1, 3);

    // Taken while paused: the guest prints nothing in between, so the
    // snapshot is of the state right after the last count printed. Its
    // disk is copied meanwhile (every acknowledged write is on it), since
    // the run goes on writing to the original. It replaces the first
    // snapshot in the same directory.
    assert_eq!(set.ctl("pause"), "paused");
    let late = h.drain_until_quiet(Duration::from_millis(500));
    assert_consecutive(&late, last + 1);
    last += late.len() as u64;
    let msg = set.snapshot(&dir, false);
    assert!(
        !msg.contains("runs on"),
        "a paused guest stays paused: {msg}"
    );
    assert_eq!(set.ctl("status"), "paused");
    let copy = set.s.path("copy.img");
    copy_as_is(&set.image, &copy);
    assert_eq!(set.ctl("resume"), "resumed");
    let first_run_last = h.counts(last + 1, 5);
    let first_run_last = h.stop(libc::SIGTERM, "TERM", first_run_last + 1);
    set.check_disk(&set.image, first_run_last);

    // Restored, it repeats what the first run printed after the snapshot:
    // it is the earlier state.
    let mut r = set.restore(&[format!("--block:disk={}", copy.display())], &dir);
    let next = r.counts(last + 1, 5) + 1;
    let restored_last = r.stop(libc::SIGINT, "INT", next);
    set.check_disk(&copy, restored_last);
    set.done();
}

#[test]
fn pause_stops_the_output_and_resume_continues_without_a_gap() {
    if !kvm() {
        return;
    }
    let set = Setup::new("snap-pause");
    let mut h = set.run();
    let mut last = h.counts(1, 3);
    assert_eq!(set.ctl("status"), "running");
    assert_eq!(set.ctl("resume"), "running (was not paused)");
    assert_eq!(set.ctl("pause"), "paused");
    assert_eq!(set.ctl("status"), "paused");
    assert_eq!(set.ctl("pause"), "paused (already)");
    // Lines the guest printed before the pause may still be on their way.
    let late = h.drain_until_quiet(Duration::from_millis(300));
    assert_consecutive(&late, last + 1);
    last += late.len() as u64;
    // Paused: a second without a line (the guest ticks every 50 ms).
    let more = h.drain_until_quiet(Duration::from_secs(1));
    assert!(more.is_empty(), "lines while paused: {more:?}");
    assert_eq!(set.ctl("status"), "paused");
    assert_eq!(set.ctl("resume"), "resumed");
    assert_eq!(set.ctl("status"), "running");
    let last = h.counts(last + 1, 5);
    // SIGINT stops a paused guest as a running one.
    assert_eq!(set.ctl("pause"), "paused");
    let late = h.drain_until_quiet(Duration::from_millis(300));
    assert_consecutive(&late, last + 1);
    let last = h.stop(libc::SIGINT, "INT", last + late.len() as u64 + 1);
    set.check_disk(&set.image, last);
    set.done();
}

#[test]
fn a_disk_changed_since_the_snapshot_is_refused() {
    if !kvm() {
        return;
    }
    let set = Setup::new("snap-disk");
    let dir = set.s.path("snap");
    let last = count_and_stop(&set, 3, &dir);
    // One byte past the records the guest writes.
    let at = 200 * 512;
    let mtime = std::fs::metadata(&set.image).unwrap().modified().unwrap();
    poke(&set.image, at, 0x5a);
    let r = set.restore_refused(&dir);
    assert_error(
        &r,
        "block device 'disk': its image is not the one the snapshot saw",
    );
    assert!(r.stdout.is_empty(), "the guest did not run: {r:?}");

    // The same bytes with another modification time are refused too.
    poke(&set.image, at, 0);
    let r = set.restore_refused(&dir);
    assert_error(&r, "its image is not the one the snapshot saw");
    assert!(r.stderr.contains("modification time"), "{r:?}");

    // Put back as it was, the image is taken: nothing of the refused
    // restores stands in the way.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&set.image)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    let mut h = set.restore(&[], &dir);
    let next = h.counts(last + 1, 3) + 1;
    let last = h.stop(libc::SIGTERM, "TERM", next);
    set.check_disk(&set.image, last);
    set.done();
}

#[test]
fn bad_state_files_are_refused_saying_why() {
    if !kvm() {
        return;
    }
    let set = Setup::new("snap-state");
    let dir = set.s.path("snap");
    count_and_stop(&set, 2, &dir);
    let good = std::fs::read(dir.join("state")).unwrap();
    assert_eq!(&good[..8], b"TTSNAP\r\n");
    assert_eq!(u32::from_le_bytes(good[8..12].try_into().unwrap()), 1);
    let memory = dir.join("memory");
    let variant = |name: &str, state: Option<Vec<u8>>| -> PathBuf {
        let d = set.s.path(name);
        std::fs::create_dir(&d).unwrap();
        std::fs::hard_link(&memory, d.join("memory")).unwrap();
        if let Some(s) = state {
            std::fs::write(d.join("state"), s).unwrap();
        }
        d
    };

    let mut v = good.clone();
    v[8..12].copy_from_slice(&7u32.to_le_bytes());
    let r = set.restore_refused(&variant("version", Some(v)));
    assert_error(
        &r,
        "snapshot format version 7 is not one this tt-host reads",
    );

    let mut v = good.clone();
    v[good.len() / 2] ^= 0xff;
    let r = set.restore_refused(&variant("flipped", Some(v)));
    assert_error(&r, "CRC");

    let r = set.restore_refused(&variant("missing", None));
    assert_error(&r, "cannot open state");

    let d = variant("no-memory", Some(good.clone()));
    std::fs::remove_file(d.join("memory")).unwrap();
    let r = set.restore_refused(&d);
    assert_error(&r, "cannot open memory");

    let r = set.restore_refused(&variant("truncated", Some(good[..1000].to_vec())));
    assert_error(&r, "the state file is truncated");

    let d = set.s.path("short-memory");
    std::fs::create_dir(&d).unwrap();
    std::fs::write(d.join("state"), &good).unwrap();
    std::fs::copy(&memory, d.join("memory")).unwrap();
    std::fs::File::options()
        .write(true)
        .open(d.join("memory"))
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let r = set.restore_refused(&d);
    assert_error(&r, "the memory file is 16777216 bytes");

    // Refused before the guest was built: nothing changed the disk, which
    // the untouched snapshot still restores from.
    let mut h = set.restore(&[], &dir);
    let l = h.line();
    assert!(l.starts_with("count "), "{l}");
    h.stop(libc::SIGTERM, "TERM", l[6..].parse::<u64>().unwrap() + 1);
    set.done();
}

#[test]
fn a_disk_named_on_the_restore_command_line_replaces_the_snapshots() {
    if !kvm() {
        return;
    }
    let set = Setup::new("snap-other");
    let dir = set.s.path("snap");
    // Paused first, then saved and stopped: nothing is printed after the
    // lines that arrive while paused.
    let mut h = set.run();
    let last = h.counts(1, 4);
    assert_eq!(set.ctl("pause"), "paused");
    let late = h.drain_until_quiet(Duration::from_millis(300));
    assert_consecutive(&late, last + 1);
    let last = last + late.len() as u64;
    let msg = set.snapshot(&dir, true);
    assert!(msg.ends_with("the guest is stopped"), "{msg}");
    let e = h.finish();
    assert_eq!(e.status.code(), Some(0), "{:?}", e.stderr);
    assert!(e.stdout.is_empty(), "printed while paused: {:?}", e.stdout);
    let other = set.s.path("other.img");
    copy_as_is(&set.image, &other);
    // The snapshot's own disk changes: it would be refused.
    poke(&set.image, 300 * 512, 0x77);
    let changed = std::fs::read(&set.image).unwrap();

    let mut h = set.restore(&[format!("--block:disk={}", other.display())], &dir);
    let next = h.counts(last + 1, 5) + 1;
    let last = h.stop(libc::SIGTERM, "TERM", next);
    set.check_disk(&other, last);
    assert_eq!(
        std::fs::read(&set.image).unwrap(),
        changed,
        "the snapshot's own disk was left alone"
    );
    set.done();
}

#[test]
fn a_restored_guest_is_snapshotted_and_restored_again() {
    if !kvm() {
        return;
    }
    let set = Setup::new("snap-again");
    let first = set.s.path("first");
    let last = count_and_stop(&set, 3, &first);
    let mut h = set.restore(&[set.control_arg()], &first);
    let last = h.counts(last + 1, 3);
    let second = set.s.path("second");
    let msg = set.snapshot(&second, true);
    assert!(msg.ends_with("the guest is stopped"), "{msg}");
    let e = h.finish();
    assert_eq!(e.status.code(), Some(0), "{:?}", e.stderr);
    assert_consecutive(&e.stdout, last + 1);
    let last = last + e.stdout.len() as u64;
    let mut h = set.restore(&[], &second);
    let next = h.counts(last + 1, 3) + 1;
    let last = h.stop(libc::SIGTERM, "TERM", next);
    set.check_disk(&set.image, last);
    set.done();
}

/// The number `N` of the next `vblk ack` line, `ack N sector=S` (other
/// lines, its banner, are passed over).
fn next_ack(h: &mut Host) -> u64 {
    loop {
        let l = h.line();
        if let Some(rest) = l.strip_prefix("ack ") {
            let n = rest.split(' ').next().and_then(|n| n.parse().ok());
            return n.unwrap_or_else(|| panic!("not an ack line: {l:?}"));
        }
        assert!(l.starts_with("vblk: ack mode"), "unexpected line {l:?}");
    }
}

/// A virtio-blk guest with 8 writes in flight is snapshotted (its queue's
/// position and registers with it) and restored: the writes in flight at
/// the snapshot complete, each acknowledged once, none lost, and it goes
/// on writing. The same snapshot taken while it runs on leaves it running.
#[test]
fn a_virtio_blk_guest_is_snapshotted_and_restored_with_its_queue() {
    if !kvm() {
        return;
    }
    let set = Setup::new("snap-virtio");
    std::fs::File::options()
        .write(true)
        .open(&set.image)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let vblk = |cmd: &mut Command| {
        cmd.arg(format!("--block:disk={}", set.image.display()))
            .arg(guest("vblk"))
            .args(["ack", "count=0", "depth=8"]);
    };
    let mut run = Command::new(tt_host());
    run.args(["run", "--mem=64"])
        .arg(set.state_arg())
        .arg(set.control_arg());
    vblk(&mut run);
    let mut h = Host::spawn(&mut run);
    let first = next_ack(&mut h);
    // A snapshot of the running guest: it runs on.
    let dir = set.s.path("snap");
    assert!(set.snapshot(&dir, false).contains("runs on"));
    let after = next_ack(&mut h);
    assert!(after > first, "ack {after} after ack {first}");
    // Then one that stops it; every ack it printed, in any order (8 in
    // flight complete out of order), is unique.
    set.snapshot(&dir, true);
    let e = h.finish();
    assert_eq!(e.status.code(), Some(0), "{:?}", e.stderr);
    let mut before: Vec<u64> = vec![first, after];
    before.extend(acks(&e.stdout));
    // The restore acknowledges the writes that were in flight, and goes
    // on: together, 1..=N exactly once each.
    let mut r = set.restore(&[], &dir);
    let mut later = Vec::new();
    while later.len() < 200 {
        later.push(next_ack(&mut r));
    }
    assert!(kill(r.child.0.id(), libc::SIGTERM));
    let e = r.finish();
    assert_eq!(e.status.code(), Some(1), "{:?}", e.stderr);
    later.extend(acks(&e.stdout));
    let mut all = before.clone();
    all.extend(&later);
    all.sort_unstable();
    let n = all.len() as u64;
    assert!(
        all.iter().copied().eq(1..=n),
        "acks lost or repeated across the snapshot: {} acks before, first after {:?}",
        before.len(),
        later.first()
    );
    set.done();
}
