//! The life of a guest disk's journal, end to end: real KVM, real
//! tt-host processes, each test with its own state directory.
//!
//! - A second tt-host on an image in use is refused, through the same
//!   path, a hard link or a symlink, in both durability modes, and the
//!   first one keeps running.
//! - An image changed behind a journal that holds unapplied writes
//!   (resized, or replaced by another file) is refused with a message
//!   that says how to recover; `tt-host journal drain` / `discard`
//!   recover. An empty journal on a changed image is fine.
//! - `tt-host journal list` shows a journal whose image was deleted, and
//!   `discard` asks before it throws a journal away.
//! - SIGTERM drains the journal into the image before tt-host exits.
//! - Through a `solo5-hvt` link a block device uses the journal unless
//!   `--block-durability=none`.
//!
//! To leave unapplied writes in a journal, a test SIGKILLs tt-host right
//! after the guest printed an acknowledgement: the write is durable in
//! the ring, and the background applier (which gathers records for up to
//! 20 ms before it writes them to the image) has usually not applied it
//! yet. `journal list` tells whether it had; if so the test tries again.

#[path = "../writes.rs"]
mod writes;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tt_tests::*;
use writes::{acks, Writes};

const SECTOR: u64 = 512;
/// Size of the test images: 8192 sectors.
const IMAGE_BYTES: u64 = 4 << 20;

/// A child that is SIGKILLed and reaped when dropped, so a failing test
/// leaves no tt-host behind.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A test's image and state directory, removed when dropped.
struct Setup {
    dir: Scratch,
    image: PathBuf,
    state: PathBuf,
}

impl Setup {
    /// A zeroed image of [`IMAGE_BYTES`] and an empty state directory.
    fn new(tag: &str) -> Setup {
        let dir = Scratch::new(tag);
        let image = dir.path("disk.img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(IMAGE_BYTES)
            .unwrap();
        let state = dir.path("state");
        Setup { dir, image, state }
    }

    /// `tt-host run` of blkwriter on `image` with this state directory.
    fn writer(&self, image: &Path, extra: &[&str], guest_args: &[String]) -> Command {
        writer(&self.state, image, extra, guest_args)
    }

    /// A blkwriter run of `count` writes (numbered from `start`) that halts.
    fn clean_run(&self, start: u64, count: u64, extra: &[&str]) -> Run {
        tt_with(&mut self.writer(
            &self.image,
            extra,
            &[
                format!("seed={}", start * 7919),
                format!("start={start}"),
                format!("count={count}"),
            ],
        ))
    }

    /// `tt-host journal ARGS --state-dir=STATE`.
    fn journal(&self, args: &[&str]) -> Run {
        self.journal_with_stdin(args, Stdio::null())
    }

    fn journal_with_stdin(&self, args: &[&str], stdin: impl Into<Stdio>) -> Run {
        journal(&self.state, args, stdin)
    }

    /// What `journal list` says of this setup's image: its line (image
    /// path, state, unapplied writes).
    fn listed(&self) -> String {
        let r = self.journal(&["list"]);
        assert_eq!(r.status, 0, "journal list: {r:?}");
        let path = canonical(&self.image);
        r.stdout
            .lines()
            .find(|l| l.starts_with(&format!("{path}: ")))
            .unwrap_or_else(|| panic!("journal list does not show {path}: {r:?}"))
            .to_string()
    }

    /// The number of unapplied writes `journal list` shows for the image.
    fn pending(&self) -> u64 {
        pending_of(&self.listed())
    }
}

/// `tt-host journal ARGS --state-dir=STATE`, with `stdin`.
fn journal(state: &Path, args: &[&str], stdin: impl Into<Stdio>) -> Run {
    tt_with(
        Command::new(tt_host())
            .arg("journal")
            .args(args)
            .arg(format!("--state-dir={}", state.display()))
            .stdin(stdin),
    )
}

/// The canonical path of `p` (its directory's, if `p` is gone), as the
/// journal's metadata records it.
fn canonical(p: &Path) -> String {
    std::fs::canonicalize(p)
        .unwrap_or_else(|_| {
            std::fs::canonicalize(p.parent().unwrap())
                .unwrap()
                .join(p.file_name().unwrap())
        })
        .display()
        .to_string()
}

/// Unapplied writes in a `journal list` line: `...; N unapplied writes
/// (B bytes)` or `...; no unapplied writes`.
fn pending_of(line: &str) -> u64 {
    if line.contains("; no unapplied writes") {
        return 0;
    }
    let (_, rest) = line
        .rsplit_once("; ")
        .unwrap_or_else(|| panic!("no unapplied-writes count in {line:?}"));
    rest.split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no unapplied-writes count in {line:?}"))
}

/// `tt-host run` of blkwriter on `image`, with `extra` tt-host options.
fn writer(state: &Path, image: &Path, extra: &[&str], guest_args: &[String]) -> Command {
    let mut cmd = Command::new(tt_host());
    cmd.arg("run")
        .arg("--mem=16")
        .arg(format!("--state-dir={}", state.display()))
        .arg(format!("--block:storage={}", image.display()))
        .args(extra)
        .arg(guest("blkwriter"))
        .arg("--")
        .args(guest_args);
    cmd
}

/// A running blkwriter whose acknowledgements the test can wait for.
struct Running {
    child: Guard,
    acks: mpsc::Receiver<()>,
    seen: usize,
    stdout: Option<JoinHandle<String>>,
    stderr: Option<JoinHandle<String>>,
}

impl Running {
    fn start(cmd: &mut Command) -> Running {
        let mut child = Guard(
            cmd.stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn tt-host"),
        );
        let out = child.0.stdout.take().unwrap();
        let mut err = child.0.stderr.take().unwrap();
        let (tx, acks) = mpsc::channel();
        let stdout = std::thread::spawn(move || {
            let mut all = String::new();
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if line.starts_with("ack ") {
                    let _ = tx.send(());
                }
                all.push_str(&line);
                all.push('\n');
            }
            all
        });
        let stderr = std::thread::spawn(move || {
            let mut all = String::new();
            let _ = err.read_to_string(&mut all);
            all
        });
        Running {
            child,
            acks,
            seen: 0,
            stdout: Some(stdout),
            stderr: Some(stderr),
        }
    }

    /// Wait until the guest has printed `n` acknowledgements in all.
    fn wait_acks(&mut self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.seen < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.acks.recv_timeout(left) {
                Ok(()) => self.seen += 1,
                Err(_) => panic!(
                    "only {} of {n} writes acknowledged within 60 s (tt-host: {:?})",
                    self.seen,
                    self.child.0.try_wait()
                ),
            }
        }
    }

    /// Send `sig`, wait (at most 30 s) for tt-host to end, and return how.
    fn stop(mut self, sig: libc::c_int) -> Run {
        assert!(kill(self.child.0.id(), sig), "signal {sig} to tt-host");
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(st) = self.child.0.try_wait().expect("wait for tt-host") {
                break st;
            }
            assert!(
                Instant::now() < deadline,
                "tt-host did not end within 30 s of signal {sig}"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        use std::os::unix::process::ExitStatusExt;
        Run {
            status: status.code().unwrap_or(-status.signal().unwrap_or(0)),
            stdout: self.stdout.take().unwrap().join().unwrap(),
            stderr: self.stderr.take().unwrap().join().unwrap(),
        }
    }
}

/// Feed a run's acknowledged writes into `writes`; the write after the
/// last one may have been in flight when it ended.
fn record(writes: &mut Writes, r: &Run, start: u64) {
    assert!(!r.stdout.contains("FAIL"), "the guest failed: {r:?}");
    let acked = acks(&r.stdout);
    let next = acked.last().map_or(start, |a| a.0 + 1);
    for (n, off, len) in acked {
        writes.ack(n, off, len);
    }
    writes.maybe(next);
}

#[track_caller]
fn assert_image_holds(writes: &Writes, image: &Path) {
    assert!(writes.acked_count() > 0, "no write was acknowledged");
    let problems = writes.check(image, SECTOR);
    assert!(
        problems.is_empty(),
        "{} writes acknowledged; the image is wrong:\n{}",
        writes.acked_count(),
        problems.join("\n")
    );
}

/// SIGKILL blkwriter right after an acknowledgement until `journal list`
/// shows unapplied writes for the image (at most 20 tries). Returns how
/// many; `writes` gets what was acknowledged.
fn leave_unapplied(s: &Setup, writes: &mut Writes) -> u64 {
    for attempt in 0..20 {
        let start = writes.last() + 1;
        let mut w = Running::start(&mut s.writer(
            &s.image,
            &[],
            &[
                format!("seed={}", 1000 + attempt),
                format!("start={start}"),
                "count=0".into(),
                "maxlen=64".into(),
            ],
        ));
        w.wait_acks(1);
        let r = w.stop(libc::SIGKILL);
        assert_eq!(r.status, -libc::SIGKILL, "tt-host ended by itself: {r:?}");
        record(writes, &r, start);
        let pending = s.pending();
        if pending > 0 {
            eprintln!("unapplied writes left after {} kill(s)", attempt + 1);
            return pending;
        }
    }
    panic!("20 SIGKILLs right after an acknowledgement left no unapplied write");
}

/// A second tt-host on the image, through any path, is refused while the
/// first runs; the first keeps writing, and its acknowledged writes are
/// on the image after it stops.
fn second_host_is_refused(durability: &str) {
    let s = Setup::new("inuse");
    let mode = format!("--block-durability={durability}");
    let extra = [mode.as_str()];
    let mut first = Running::start(&mut s.writer(
        &s.image,
        &extra,
        &["seed=5".into(), "start=1".into(), "count=0".into()],
    ));
    first.wait_acks(1);
    let hard = s.dir.path("hard-link.img");
    std::fs::hard_link(&s.image, &hard).unwrap();
    let sym = s.dir.path("symlink.img");
    std::os::unix::fs::symlink(&s.image, &sym).unwrap();
    // The lock is on the image, not in a state directory: one more that
    // shares nothing with the first is refused too.
    let other_state = s.dir.path("other-state");
    for (path, state) in [
        (&s.image, &s.state),
        (&hard, &s.state),
        (&sym, &s.state),
        (&hard, &other_state),
    ] {
        let r = tt_with(&mut writer(
            state,
            path,
            &extra,
            &["start=100000".into(), "count=1".into()],
        ));
        assert_error(&r, "is in use by another tt-host");
        assert!(
            r.stderr.contains(&path.display().to_string()),
            "the refusal should name {}: {r:?}",
            path.display()
        );
        assert!(!r.stdout.contains("ack "), "the second guest wrote: {r:?}");
    }
    let before = first.seen;
    first.wait_acks(before + 5);
    let r = first.stop(libc::SIGTERM);
    assert_error(&r, "exiting on signal 15 (SIGTERM)");
    let mut writes = Writes::default();
    record(&mut writes, &r, 1);
    assert_image_holds(&writes, &s.image);
}

#[test]
fn a_second_host_on_the_image_is_refused_with_the_journal() {
    if !kvm() {
        return;
    }
    second_host_is_refused("journal");
}

#[test]
fn a_second_host_on_the_image_is_refused_without_the_journal() {
    if !kvm() {
        return;
    }
    second_host_is_refused("none");
}

/// Assert that `r` is the refusal of an image that does not match its
/// journal, and that it names the image, the journal and `commands`.
#[track_caller]
fn assert_changed_refusal(r: &Run, s: &Setup, commands: &[&str]) {
    assert_error(r, "does not match its journal");
    let image = s.image.display().to_string();
    assert!(r.stderr.contains(&image), "should name {image}: {r:?}");
    let journals = s.state.join("journals").display().to_string();
    assert!(
        r.stderr.contains(&journals) && r.stderr.contains(".ring"),
        "should name the journal in {journals}: {r:?}"
    );
    for c in commands {
        let cmd = format!("tt-host journal {c} {image}");
        assert!(r.stderr.contains(&cmd), "should say {cmd:?}: {r:?}");
    }
    assert!(!r.stdout.contains("ack "), "the guest ran: {r:?}");
}

#[test]
fn a_resized_image_with_unapplied_writes_is_refused_until_drained() {
    if !kvm() {
        return;
    }
    let s = Setup::new("resized");
    let mut writes = Writes::default();
    leave_unapplied(&s, &mut writes);
    // Grow the image by 8 whole sectors behind the journal's back.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&s.image)
        .unwrap()
        .set_len(IMAGE_BYTES + 8 * SECTOR)
        .unwrap();
    let before = std::fs::read(&s.image).unwrap();
    let r = s.clean_run(writes.last() + 1, 1, &[]);
    assert_changed_refusal(&r, &s, &["drain", "discard"]);
    assert_eq!(
        std::fs::read(&s.image).unwrap(),
        before,
        "the refused start changed the image"
    );
    let line = s.listed();
    assert!(line.contains("image resized"), "{line}");
    assert!(pending_of(&line) > 0, "{line}");

    let r = s.journal(&["drain", s.image.to_str().unwrap()]);
    assert_eq!(r.status, 0, "journal drain: {r:?}");
    assert!(r.stdout.contains("applied"), "{r:?}");
    assert_eq!(s.pending(), 0, "drained, yet unapplied writes are listed");
    assert_image_holds(&writes, &s.image);

    let start = writes.last() + 1;
    let r = s.clean_run(start, 3, &[]);
    assert_eq!(r.status, 0, "the drained image should start: {r:?}");
    record(&mut writes, &r, start);
    assert_image_holds(&writes, &s.image);
}

#[test]
fn a_replaced_image_with_unapplied_writes_is_refused_until_discarded() {
    if !kvm() {
        return;
    }
    let s = Setup::new("replaced");
    let mut writes = Writes::default();
    let pending = leave_unapplied(&s, &mut writes);
    // Another file renamed over the image's path.
    let other = s.dir.path("other.img");
    std::fs::copy(&s.image, &other).unwrap();
    std::fs::rename(&other, &s.image).unwrap();
    let before = std::fs::read(&s.image).unwrap();
    let r = s.clean_run(writes.last() + 1, 1, &[]);
    assert_changed_refusal(&r, &s, &["discard"]);
    assert!(r.stderr.contains("not the one"), "should say why: {r:?}");
    assert_eq!(
        std::fs::read(&s.image).unwrap(),
        before,
        "the refused start changed the new file"
    );

    let line = s.listed();
    assert!(line.contains("image replaced"), "{line}");
    let r = s.journal(&["drain", s.image.to_str().unwrap()]);
    assert_error(&r, "not the one the journal was written for");
    assert_eq!(
        std::fs::read(&s.image).unwrap(),
        before,
        "journal drain applied the writes to another file"
    );

    let r = s.journal(&["discard", s.image.to_str().unwrap(), "--yes"]);
    assert_eq!(r.status, 0, "journal discard --yes: {r:?}");
    assert!(
        r.stdout.contains(&format!(
            "journal discarded with {pending} unapplied writes"
        )),
        "{r:?}"
    );
    let r = s.clean_run(writes.last() + 1, 3, &[]);
    assert_eq!(r.status, 0, "the new file should start: {r:?}");
    assert_eq!(s.pending(), 0);
}

#[test]
fn an_empty_journal_on_a_changed_image_is_fine() {
    if !kvm() {
        return;
    }
    let s = Setup::new("emptyok");
    let mut writes = Writes::default();
    let r = s.clean_run(1, 5, &[]);
    assert_eq!(r.status, 0, "{r:?}");
    record(&mut writes, &r, 1);
    assert_eq!(s.pending(), 0, "a halt should drain the journal");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&s.image)
        .unwrap()
        .set_len(IMAGE_BYTES + 64 * SECTOR)
        .unwrap();
    let start = writes.last() + 1;
    let r = s.clean_run(start, 5, &[]);
    assert_eq!(r.status, 0, "an empty journal must not refuse: {r:?}");
    record(&mut writes, &r, start);
    let line = s.listed();
    assert!(line.contains(": present;"), "{line}");
    assert_image_holds(&writes, &s.image);
}

#[test]
fn a_journal_whose_image_was_deleted_is_listed_and_discarded_on_confirmation() {
    if !kvm() {
        return;
    }
    let s = Setup::new("deleted");
    let r = s.clean_run(1, 3, &[]);
    assert_eq!(r.status, 0, "{r:?}");
    std::fs::remove_file(&s.image).unwrap();
    let line = s.listed();
    assert!(line.contains("image missing"), "{line}");
    let journals = s.state.join("journals");
    let rings = || {
        std::fs::read_dir(&journals)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .path()
                    .extension()
                    .is_some_and(|x| x == "ring")
            })
            .count()
    };
    assert_eq!(rings(), 1);

    let image = s.image.to_str().unwrap();
    let answer = |text: &str| {
        let p = s.dir.file("answer", text.as_bytes());
        std::fs::File::open(p).unwrap()
    };
    let r = s.journal_with_stdin(&["discard", image], answer("no\n"));
    assert_eq!(r.status, 1, "'no' must not discard: {r:?}");
    assert!(r.stderr.contains("not discarded"), "{r:?}");
    assert!(r.stderr.contains("image missing"), "should show it: {r:?}");
    assert_eq!(rings(), 1, "the journal is gone after 'no'");
    assert!(s.listed().contains("image missing"));

    let r = s.journal_with_stdin(&["discard", image], answer("yes\n"));
    assert_eq!(r.status, 0, "'yes' should discard: {r:?}");
    assert!(r.stdout.contains("journal discarded"), "{r:?}");
    assert_eq!(rings(), 0, "the ring is still there");
    let r = s.journal(&["list"]);
    assert_eq!(r.status, 0, "{r:?}");
    assert!(r.stdout.contains("no journals in"), "{r:?}");
}

#[test]
fn sigterm_during_writes_drains_the_journal_into_the_image() {
    if !kvm() {
        return;
    }
    let s = Setup::new("sigterm");
    let mut w = Running::start(&mut s.writer(
        &s.image,
        &[],
        &[
            "seed=9".into(),
            "start=1".into(),
            "count=0".into(),
            "maxlen=64".into(),
        ],
    ));
    w.wait_acks(20);
    let r = w.stop(libc::SIGTERM);
    assert_error(&r, "exiting on signal 15 (SIGTERM)");
    let mut writes = Writes::default();
    record(&mut writes, &r, 1);
    // No restart: the image already holds every acknowledged write.
    let line = s.listed();
    assert_eq!(pending_of(&line), 0, "{line}");
    assert!(!line.contains("in use"), "{line}");
    assert_image_holds(&writes, &s.image);
}

/// The signal mask (`SigBlk`) of every thread of process `pid` but its
/// first, with the thread's name.
fn other_threads_sigblk(pid: u32) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let t = t.unwrap();
        if t.file_name().to_str() == Some(&pid.to_string()) {
            continue;
        }
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        let mask = u64::from_str_radix(&field("SigBlk:"), 16).unwrap_or(0);
        out.push((field("Name:"), mask));
    }
    out
}

/// SIGTERM and SIGINT must reach the vCPU's thread, the only one where
/// they interrupt `KVM_RUN` or POLL's wait: the journal's threads block
/// them.
#[test]
fn device_threads_never_take_sigterm_or_sigint() {
    if !kvm() {
        return;
    }
    let s = Setup::new("sigmask");
    let mut w = Running::start(&mut s.writer(
        &s.image,
        &[],
        &["seed=3".into(), "start=1".into(), "count=0".into()],
    ));
    w.wait_acks(3);
    let threads = other_threads_sigblk(w.child.0.id());
    assert!(!threads.is_empty(), "the journal runs threads of its own");
    let both = (1u64 << (libc::SIGTERM - 1)) | (1u64 << (libc::SIGINT - 1));
    for (name, mask) in &threads {
        assert_eq!(
            mask & both,
            both,
            "thread {name} takes SIGTERM or SIGINT: {threads:?}"
        );
    }
    let r = w.stop(libc::SIGTERM);
    assert_error(&r, "exiting on signal 15 (SIGTERM)");
}

/// A link named `solo5-hvt` to the tt-host binary, in `dir`.
fn solo5_hvt(dir: &Scratch) -> PathBuf {
    let p = dir.path("solo5-hvt");
    std::os::unix::fs::symlink(tt_host(), &p).unwrap();
    p
}

#[test]
fn through_solo5_hvt_a_block_device_uses_the_journal_unless_none() {
    if !kvm() {
        return;
    }
    let s = Setup::new("solo5journal");
    let hvt = solo5_hvt(&s.dir);
    let run = |state: &Path, extra: &[&str]| {
        let r = tt_with(
            Command::new(&hvt)
                .env("TT_HOST_STATE_DIR", state)
                .arg("--mem=32")
                .arg(format!("--block:storage={}", s.image.display()))
                .args(extra)
                .arg("--")
                .arg(guest("blk")),
        );
        assert_eq!(r.status, 0, "{extra:?}: {r:?}");
        assert!(r.stdout.contains("blk: OK"), "{extra:?}: {r:?}");
    };
    run(&s.state, &[]);
    let line = s.listed();
    assert_eq!(pending_of(&line), 0, "{line}");

    let none = Scratch::new("solo5none");
    let none_state = none.path("state");
    run(&none_state, &["--block-durability=none"]);
    let r = journal(&none_state, &["list"], Stdio::null());
    assert_eq!(r.status, 0, "{r:?}");
    assert!(
        r.stdout.contains("no journals in"),
        "--block-durability=none made a journal: {r:?}"
    );
}

/// `journal drain` of a shrunk image: the writes it applies past the new
/// end grow the file again, and the journal must then be bound to the
/// image as it is after the drain (as `drain`'s doc says), not list it as
/// resized.
#[test]
fn a_drained_shrunk_image_is_listed_as_present() {
    if !kvm() {
        return;
    }
    let s = Setup::new("shrunk");
    let mut writes = Writes::default();
    leave_unapplied(&s, &mut writes);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&s.image)
        .unwrap()
        .set_len(SECTOR)
        .unwrap();
    let r = s.journal(&["drain", s.image.to_str().unwrap()]);
    assert_eq!(r.status, 0, "journal drain: {r:?}");
    let size = std::fs::metadata(&s.image).unwrap().len();
    let line = s.listed();
    assert!(
        line.contains(": present;"),
        "after the drain the image is {size} bytes: {line}"
    );
}

/// An image deleted and made again at the same path, with the same size,
/// is another disk: the old journal's writes must not be replayed onto
/// it. On ext4 the new file usually gets the freed inode number again, so
/// the image's identity (file system id, inode) is the same.
#[test]
fn a_recreated_image_with_unapplied_writes_is_refused() {
    if !kvm() {
        return;
    }
    let s = Setup::new("recreated");
    let mut writes = Writes::default();
    leave_unapplied(&s, &mut writes);
    std::fs::remove_file(&s.image).unwrap();
    std::fs::File::create(&s.image)
        .unwrap()
        .set_len(IMAGE_BYTES)
        .unwrap();
    let r = s.clean_run(writes.last() + 1, 1, &[]);
    assert_changed_refusal(&r, &s, &["discard"]);
    let image = std::fs::read(&s.image).unwrap();
    assert!(
        image.iter().all(|&b| b == 0),
        "old writes were applied to the new file"
    );
}

/// The recovery command a refusal suggests works as written, also when
/// tt-host ran with a `--state-dir` of its own.
#[test]
fn the_suggested_drain_command_works_as_written() {
    if !kvm() {
        return;
    }
    let s = Setup::new("suggested");
    let mut writes = Writes::default();
    leave_unapplied(&s, &mut writes);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&s.image)
        .unwrap()
        .set_len(IMAGE_BYTES + 8 * SECTOR)
        .unwrap();
    let r = s.clean_run(writes.last() + 1, 1, &[]);
    assert_eq!(r.status, 1, "{r:?}");
    let (_, rest) = r
        .stderr
        .split_once("`tt-host journal drain ")
        .unwrap_or_else(|| panic!("no drain command suggested: {r:?}"));
    let (args, _) = rest.split_once('`').unwrap();
    let mut cmd = Command::new(tt_host());
    cmd.args(["journal", "drain"]).args(args.split(' '));
    // The user's environment: tt-host's default state directory for tests,
    // not the one this run was given.
    let r = tt_with(&mut cmd);
    assert_eq!(r.status, 0, "the suggested `{args}` failed: {r:?}");
    assert_image_holds(&writes, &s.image);
}
