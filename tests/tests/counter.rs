//! The `counter` guest, which the snapshot/restore and live-migration
//! tests run, behaves as they rely on under the real host:
//!
//! - `count MS` prints `count 1`, `count 2`, ... with none skipped or
//!   repeated, and every printed count is on its disk (record K at sector
//!   K % 128), even when tt-host is SIGKILLed (its journal is drained
//!   afterwards, as the next start would).
//! - With a dirtying rate it keeps counting and finds its memory intact.
//! - Memory changed behind its back (through /proc/PID/mem) is reported as
//!   `counter: CORRUPT page P` with exit status 3: the check the
//!   migration tests count on does catch corruption.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::Duration;
use tt_tests::guest_output::counter_record as record;
use tt_tests::*;

/// A child that is SIGKILLed and reaped when dropped, so a failing test
/// leaves no tt-host behind.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A running `tt-host run ... counter -- ARGS`, its console lines (stdout
/// and stderr) arriving on a channel.
struct Counter {
    child: Guard,
    lines: Receiver<String>,
}

/// How long any one expected line may take (ticks are 100 ms at most
/// here; this only catches a hang).
const LINE_TIMEOUT: Duration = Duration::from_secs(30);

/// Start the counter with `mem` MiB, its disk `image` and state directory
/// `state`, and guest arguments `args`.
fn start(mem: u32, image: &Path, state: &Path, args: &[&str]) -> Counter {
    let mut child = Guard(
        Command::new(tt_host())
            .arg("run")
            .arg(format!("--mem={mem}"))
            .arg(format!("--state-dir={}", state.display()))
            .arg(format!("--block:disk={}", image.display()))
            .arg(guest("counter"))
            .arg("--")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tt-host"),
    );
    let (tx, lines) = mpsc::channel();
    let out = child.0.stdout.take().unwrap();
    let err = child.0.stderr.take().unwrap();
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx2.send(format!("stderr: {line}"));
        }
    });
    Counter { child, lines }
}

impl Counter {
    /// The next line; panics after [`LINE_TIMEOUT`] or at the end of the
    /// output, showing `seen`.
    fn line(&self, seen: &[String]) -> String {
        match self.lines.recv_timeout(LINE_TIMEOUT) {
            Ok(l) => l,
            Err(e) => panic!("no line from the counter ({e}); so far: {seen:#?}"),
        }
    }

    /// Read lines until `n` of them were read; they must be `count 1` to
    /// `count n`.
    fn expect_counts(&self, n: u64) -> Vec<String> {
        let mut seen = Vec::new();
        for k in 1..=n {
            let l = self.line(&seen);
            seen.push(l.clone());
            assert_eq!(l, format!("count {k}"), "unexpected line; all: {seen:#?}");
        }
        seen
    }

    /// SIGKILL tt-host, reap it, and return every line it printed after
    /// those already read.
    fn kill(mut self) -> Vec<String> {
        self.child.0.kill().expect("SIGKILL tt-host");
        let status = self.child.0.wait().expect("reap tt-host");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL),
            "tt-host ended before it was killed: {status:?}; lines: {:#?}",
            self.lines.try_iter().collect::<Vec<_>>()
        );
        // Both readers end at end of file, which the kill brought.
        self.lines.iter().collect()
    }
}

/// A zeroed 1 MiB disk image and a state directory in `s`.
fn disk(s: &Scratch) -> (std::path::PathBuf, std::path::PathBuf) {
    let image = s.file("disk.img", &vec![0u8; 1 << 20]);
    (image, s.path("state"))
}

#[test]
fn counts_without_gaps_and_every_printed_count_is_on_disk() {
    if !kvm() {
        return;
    }
    let s = Scratch::new("counter");
    let (image, state) = disk(&s);
    let c = start(32, &image, &state, &["count", "20"]);
    let mut lines = c.expect_counts(8);
    lines.extend(c.kill());
    // Whatever was printed before the kill landed is `count 9`, `count
    // 10`, ... in order: the whole output is 1..=n.
    let n = lines.len() as u64;
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(*l, format!("count {}", i + 1), "all lines: {lines:#?}");
    }
    assert!(n < 128, "too many lines for this check: {n}");

    // Apply the journal (the writes the guest was told are done) to the
    // image, as the next tt-host start would.
    let r = tt(&[
        "journal",
        "drain",
        image.to_str().unwrap(),
        &format!("--state-dir={}", state.display()),
    ]);
    assert_eq!(r.status, 0, "journal drain: {r:?}");
    let bytes = std::fs::read(&image).unwrap();
    for k in 1..=n {
        let sector = &bytes[k as usize * 512..][..512];
        assert_eq!(record(sector), Ok(k), "sector {k} after {n} printed counts");
    }
    assert!(
        bytes[0..512].iter().all(|&b| b == 0),
        "sector 0 is written only by count 128"
    );
}

#[test]
fn dirtying_memory_keeps_counting_and_finds_no_corruption() {
    if !kvm() {
        return;
    }
    let s = Scratch::new("counter-dirty");
    let (image, state) = disk(&s);
    // 2 MiB/s over an 8 MiB buffer (2048 pages), which the guest checks
    // whole every second: 25 lines (1.25 s) rewrite some 640 pages, each
    // checked before, and sweep the buffer at least once.
    let c = start(64, &image, &state, &["count", "50", "2048", "8"]);
    let mut lines = c.expect_counts(25);
    lines.extend(c.kill());
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(*l, format!("count {}", i + 1), "all lines: {lines:#?}");
    }
}

#[test]
fn usage_and_setup_errors_are_reported() {
    if !kvm() {
        return;
    }
    let s = Scratch::new("counter-usage");
    let (image, state) = disk(&s);
    let small = s.file("small.img", &vec![0u8; 32 << 10]);
    let run = |image: &Path, args: &[&str]| {
        let disk = format!("--block:disk={}", image.display());
        let state = format!("--state-dir={}", state.display());
        let mut a = vec!["run", "--mem=32", &state, &disk];
        let g = guest("counter");
        a.push(g.to_str().unwrap());
        a.push("--");
        a.extend_from_slice(args);
        tt(&a)
    };
    for args in [
        &[][..],
        &["count"],
        &["count", "x"],
        &["count", "10", "1", "0"],
        &["count", "10", "1", "2", "3"],
        &["verify"],
    ] {
        let r = run(&image, args);
        assert_eq!(r.status, 2, "{args:?}: {r:?}");
        assert!(r.stdout.starts_with("counter: usage: "), "{args:?}: {r:?}");
    }
    let r = run(&small, &["count", "10"]);
    assert_eq!(r.status, 1, "{r:?}");
    assert!(
        r.stdout.starts_with("counter: FAIL disk has 64 blocks"),
        "{r:?}"
    );
    let r = run(&image, &["count", "10", "0", "100000"]);
    assert_eq!(r.status, 1, "{r:?}");
    assert!(
        r.stdout.starts_with("counter: FAIL cannot allocate"),
        "{r:?}"
    );
}

/// Word `w` of page `page` of the guest's buffer after pass `pass` (the
/// guest's `pattern`).
fn pattern(page: u64, pass: u32, w: u64) -> u64 {
    let mut z = ((page << 32) | pass as u64).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)).wrapping_add(w.wrapping_mul(0x2545_f491))
}

/// The address in process `pid` of the counter's buffer (page 0 with its
/// first-fill pattern, 4 KiB aligned), found by scanning its writable
/// mappings through `mem`. (Guest memory is one mapping, but
/// /proc/PID/maps may show it split or merged with its neighbours, so
/// its size does not tell which it is.)
fn find_buffer(pid: u32, mem: &std::fs::File) -> Option<u64> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let head: Vec<u8> = (0..4)
        .flat_map(|w| pattern(0, 0, w).to_le_bytes())
        .collect();
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(perms)) = (f.next(), f.next()) else {
            continue;
        };
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        let a = u64::from_str_radix(a, 16).unwrap();
        let b = u64::from_str_radix(b, 16).unwrap();
        if !perms.starts_with("rw") {
            continue;
        }
        let mut chunk = vec![0u8; 1 << 20];
        let mut at = a;
        while at < b {
            let len = chunk.len().min((b - at) as usize);
            if mem.read_exact_at(&mut chunk[..len], at).is_ok() {
                if let Some(p) = chunk[..len]
                    .chunks_exact(4096)
                    .position(|page| page.starts_with(&head))
                {
                    return Some(at + p as u64 * 4096);
                }
            }
            at += len as u64;
        }
    }
    None
}

#[test]
fn memory_changed_behind_its_back_is_reported_as_corrupt() {
    if !kvm() {
        return;
    }
    let s = Scratch::new("counter-corrupt");
    let (image, state) = disk(&s);
    // A 4 MiB buffer written once (rate 0) and swept every second.
    let c = start(32, &image, &state, &["count", "100", "0", "4"]);
    c.expect_counts(1);
    let pid = c.child.0.id();
    let mem = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/proc/{pid}/mem"))
    {
        Ok(m) => m,
        Err(e) => {
            eprintln!("SKIPPED: cannot open /proc/{pid}/mem to corrupt the guest: {e}");
            return;
        }
    };
    let buf = find_buffer(pid, &mem).expect("the counter's buffer in tt-host's memory");
    // Flip one word of page 300 (the guest's pattern is nowhere else).
    let (page, word) = (300u64, 7u64);
    let at = buf + page * 4096 + word * 8;
    let bad = !pattern(page, 0, word);
    mem.write_all_at(&bad.to_le_bytes(), at)
        .expect("write the guest's memory");
    let mut seen = Vec::new();
    loop {
        let l = c.line(&seen);
        if l.starts_with("counter: CORRUPT") {
            assert!(
                l.starts_with(&format!("counter: CORRUPT page {page} pass 0 word {word}:")),
                "{l}"
            );
            break;
        }
        assert!(
            l.starts_with("count "),
            "unexpected line {l:?}; all: {seen:#?}"
        );
        seen.push(l);
    }
    let mut child = c.child;
    let status = child.0.wait().expect("reap tt-host");
    assert_eq!(status.code(), Some(3), "exit status after CORRUPT");
}
