//! Crash tests with real processes: a child process runs a journal on a
//! ring file and is killed with SIGKILL at a random moment; the journal
//! restarts and replays; the parent checks what was performed.
//!
//! The child (this test binary re-run, filtered to `child`, with
//! `TT_JOURNAL_CRASH_ROLE` set) starts a journal on the ring file (which
//! replays whatever the previous child left), whose `perform` appends each
//! op to a "performed" file with write + fdatasync; then three pusher
//! threads push ops and print `pusher idx` on stdout as soon as each push
//! returns `Ok`, and a fourth keeps 8 ops in flight with `submit` and
//! prints each once its `Pending::wait` returns `Ok`. The parent kills the child 0-40 ms after it prints
//! `ready` (or, one round in eight, 0-15 ms after spawning it, maybe
//! before or during its replay). Every few rounds, and after the last,
//! the parent restarts the journal in-process (replaying the last child's
//! ring) and checks the performed file:
//!
//! - every acknowledged op was performed at least once;
//! - every performed op is whole and valid (its payload is regenerated
//!   from its id and its checksum checked) and was pushed: at most one op
//!   past a pusher's last acknowledged one (8 for the submitter);
//! - each pusher's ops are first performed in push order;
//! - across pushers, ops are first performed in the journal's order, as
//!   far as stdout shows it: if op `a` was acknowledged (printed) before
//!   pusher B printed op `b - 1` (the submitter: `b - 8`), then `b` was
//!   pushed after `a` was sequenced, so `a` is first performed before `b`.
//!
//! Rounds: 200 (`TT_LONG=1`: 2000); `TT_SEED` changes the kill timing.

mod common;

use common::mix;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;
use tt_journal::{Config, Journal};
use tt_ring::{FileDevice, Producer};

const SECTOR: u32 = 4096;
const RING_SIZE: u64 = 1 << 20;
const PUSHERS: u32 = 4;
/// The last pusher is a submitter: one thread keeping `DEPTH` ops in
/// flight with `submit` (acknowledged when `Pending::wait` returns).
const SUBMITTER: u32 = PUSHERS - 1;
const DEPTH: u64 = 8;

/// How far past its last acknowledged op a pusher may have pushed.
fn ahead(pusher: u32) -> u64 {
    if pusher == SUBMITTER {
        DEPTH
    } else {
        1
    }
}
const ROLE: &str = "TT_JOURNAL_CRASH_ROLE";

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
struct Op {
    round: u32,
    pusher: u32,
    idx: u64,
    payload: Vec<u8>,
    sum: u64,
}

fn fnv(parts: &[&[u8]]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in parts.iter().flat_map(|p| p.iter()) {
        h = (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn checksum(round: u32, pusher: u32, idx: u64, payload: &[u8]) -> u64 {
    fnv(&[
        &round.to_le_bytes(),
        &pusher.to_le_bytes(),
        &idx.to_le_bytes(),
        payload,
    ])
}

/// The op pusher `pusher` of round `round` pushes `idx`-th: mostly small,
/// one in six 1-6 KiB (so records span 4 KiB sectors).
fn make_op(round: u32, pusher: u32, idx: u64) -> Op {
    let h = mix(((round as u64) << 48) ^ ((pusher as u64) << 40) ^ idx);
    let len = if h % 6 == 0 {
        1000 + (h >> 8) % 5000
    } else {
        (h >> 8) % 300
    } as usize;
    let payload: Vec<u8> = (0..len)
        .map(|k| (h >> (k % 7 * 8)) as u8 ^ k as u8)
        .collect();
    Op {
        round,
        pusher,
        idx,
        sum: checksum(round, pusher, idx, &payload),
        payload,
    }
}

fn valid(op: &Op) -> bool {
    op.sum == checksum(op.round, op.pusher, op.idx, &op.payload)
        && *op == make_op(op.round, op.pusher, op.idx)
}

fn config() -> Config {
    Config {
        retry_interval: Duration::from_millis(5),
        full_timeout: Duration::from_secs(10),
        max_batch: 32,
        ..Config::default()
    }
}

// The performed file: entries of [len: u32][postcard op][fnv64 of it],
// appended by `perform` with one write + fdatasync per batch. A kill in
// the middle of a write can leave a torn last entry (of a batch whose
// perform never returned, so it is replayed): whoever opens the file to
// append truncates it first, as an application recovering its state.

/// Parse entries of `bytes`: the ops and the length of the whole-entry
/// prefix.
fn parse(bytes: &[u8]) -> (Vec<Op>, usize) {
    let mut ops = Vec::new();
    let mut at = 0;
    while bytes.len() - at >= 4 {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        let Some(end) = (at + 4).checked_add(len).and_then(|e| e.checked_add(8)) else {
            break;
        };
        if end > bytes.len() {
            break;
        }
        let body = &bytes[at + 4..at + 4 + len];
        let sum = u64::from_le_bytes(bytes[end - 8..end].try_into().unwrap());
        if sum != fnv(&[body]) {
            break;
        }
        match postcard::from_bytes::<Op>(body) {
            Ok(op) => ops.push(op),
            // A whole entry that does not decode is not a torn write:
            // keep it visible to the checker.
            Err(e) => panic!("performed file entry at {at} does not decode: {e}"),
        }
        at = end;
    }
    (ops, at)
}

/// Open the performed file to append, truncating a torn tail after
/// `from` (a clean entry boundary).
fn open_performed(path: &Path, from: u64) -> File {
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    f.seek(SeekFrom::Start(from)).unwrap();
    let mut tail = Vec::new();
    f.read_to_end(&mut tail).unwrap();
    let (_, whole) = parse(&tail);
    if whole < tail.len() {
        f.set_len(from + whole as u64).unwrap();
        f.sync_all().unwrap();
    }
    f.seek(SeekFrom::Start(from + whole as u64)).unwrap();
    f
}

/// The `perform` of every run: append the batch, then fdatasync.
fn appender(mut f: File) -> impl FnMut(&[Op]) -> Result<(), String> + Send + 'static {
    move |ops| {
        let mut buf = Vec::new();
        for op in ops {
            let body = postcard::to_stdvec(op).map_err(|e| e.to_string())?;
            buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
            buf.extend_from_slice(&body);
            buf.extend_from_slice(&fnv(&[&body]).to_le_bytes());
        }
        f.write_all(&buf).map_err(|e| e.to_string())?;
        f.sync_data().map_err(|e| e.to_string())
    }
}

struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> XorShift {
        XorShift(mix(seed) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// A child process, killed and reaped when dropped (so a failed assertion
/// leaks no process).
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What the parent knows and has checked.
struct Checker {
    dir: PathBuf,
    /// Performed-file offset up to which entries were checked.
    offset: u64,
    /// Ops first performed: (round, pusher, idx).
    seen: HashSet<(u32, u32, u64)>,
    /// Per (round, pusher): last op first performed.
    last_first: HashMap<(u32, u32), u64>,
    /// Per round: acknowledged ops in stdout order, and line numbers.
    lines: HashMap<u32, Vec<(u32, u64)>>,
    line_of: HashMap<(u32, u32, u64), usize>,
    /// Per round: how many leading stdout lines have been performed.
    prefix: HashMap<u32, (usize, HashSet<usize>)>,
    /// Rounds whose child has been killed.
    rounds: u32,
    /// Acknowledged ops not yet checked.
    unchecked: Vec<(u32, u32, u64)>,
    performed_entries: u64,
    acked_total: u64,
}

impl Checker {
    fn ring(&self) -> PathBuf {
        self.dir.join("journal.ring")
    }
    fn performed(&self) -> PathBuf {
        self.dir.join("performed")
    }

    fn record(&mut self, round: u32, acked: Vec<(u32, u64)>) {
        for (n, &(p, i)) in acked.iter().enumerate() {
            self.line_of.insert((round, p, i), n);
            self.unchecked.push((round, p, i));
        }
        self.acked_total += acked.len() as u64;
        self.lines.insert(round, acked);
        self.rounds = round + 1;
    }

    /// Largest idx of `pusher` that may have been pushed in `round`.
    fn max_pushed(&self, round: u32, pusher: u32) -> u64 {
        self.lines[&round]
            .iter()
            .filter(|(p, _)| *p == pusher)
            .map(|(_, i)| i + ahead(pusher))
            .max()
            .unwrap_or(ahead(pusher) - 1)
    }

    /// Restart the journal in-process (replaying the last child's ring),
    /// then check the performed file's new entries.
    fn restart_and_check(&mut self, ctx: &str) {
        let dev = Arc::new(FileDevice::open(&self.ring(), SECTOR).unwrap());
        let f = open_performed(&self.performed(), self.offset);
        let j = Journal::<Op, _>::start(dev, config(), appender(f))
            .unwrap_or_else(|e| panic!("{ctx}: restart failed: {e}"));
        j.shutdown(false);
        drop(j);
        let mut f = File::open(self.performed()).unwrap();
        f.seek(SeekFrom::Start(self.offset)).unwrap();
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes).unwrap();
        let (ops, whole) = parse(&bytes);
        assert_eq!(whole, bytes.len(), "{ctx}: torn entry after a clean run");
        self.offset += whole as u64;
        self.performed_entries += ops.len() as u64;
        for op in ops {
            let (r, p, i) = (op.round, op.pusher, op.idx);
            assert!(valid(&op), "{ctx}: garbled op ({r}, {p}, {i})");
            assert!(r < self.rounds && p < PUSHERS, "{ctx}: unknown op {r} {p}");
            assert!(
                i <= self.max_pushed(r, p),
                "{ctx}: op ({r}, {p}, {i}) performed but never pushed (last acked: {:?})",
                self.max_pushed(r, p).checked_sub(1)
            );
            if !self.seen.insert((r, p, i)) {
                continue;
            }
            // Per-pusher order of first occurrences.
            if let Some(&last) = self.last_first.get(&(r, p)) {
                assert!(
                    last < i,
                    "{ctx}: round {r} pusher {p}: op {i} first performed after op {last}"
                );
            }
            self.last_first.insert((r, p), i);
            // Cross-pusher order, as far as stdout shows it.
            let (prefix, done) = self.prefix.entry(r).or_default();
            if let Some(&line) = self.line_of.get(&(r, p, i)) {
                done.insert(line);
                while done.remove(prefix) {
                    *prefix += 1;
                }
            }
            // Op i was pushed once op i - ahead(p) was acknowledged.
            if let Some(k) = i.checked_sub(ahead(p)) {
                if let Some(&before) = self.line_of.get(&(r, p, k)) {
                    assert!(
                        *prefix >= before,
                        "{ctx}: round {r}: op ({p}, {i}) performed before op {:?}, \
                         which was acknowledged before ({p}, {k}) was",
                        self.lines[&r][*prefix],
                    );
                }
            }
        }
        for a in self.unchecked.drain(..) {
            assert!(
                self.seen.contains(&a),
                "{ctx}: acknowledged op {a:?} was never performed"
            );
        }
    }
}

fn spawn_child(dir: &Path, round: u32, offset: u64) -> Killed {
    Killed(
        Command::new(std::env::current_exe().unwrap())
            .args(["child", "--exact", "--nocapture", "--test-threads=1"])
            .env(ROLE, "child")
            .env("TT_JOURNAL_DIR", dir)
            .env("TT_JOURNAL_ROUND", round.to_string())
            .env("TT_JOURNAL_PERFORMED_FROM", offset.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    )
}

#[test]
fn killed_journal_processes_lose_no_acknowledged_op() {
    if std::env::var_os(ROLE).is_some() {
        return;
    }
    let long = std::env::var_os("TT_LONG").is_some_and(|v| v != "0");
    let rounds: u32 = if long { 2000 } else { 200 };
    let seed: u64 = std::env::var("TT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x7474_6a6f_7572_6e6c);
    let dir =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("crash-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut c = Checker {
        dir: dir.clone(),
        offset: 0,
        seen: HashSet::new(),
        last_first: HashMap::new(),
        lines: HashMap::new(),
        line_of: HashMap::new(),
        prefix: HashMap::new(),
        rounds: 0,
        unchecked: Vec::new(),
        performed_entries: 0,
        acked_total: 0,
    };
    let dev = FileDevice::create(&c.ring(), RING_SIZE, SECTOR).unwrap();
    Producer::create(&dev).unwrap();
    drop(dev);
    File::create(c.performed()).unwrap().sync_all().unwrap();

    let started = std::time::Instant::now();
    let (mut checks, mut early_kills) = (0, 0);
    for round in 0..rounds {
        let ctx = format!("seed {seed} round {round}");
        let mut rng = XorShift::new(seed ^ (round as u64).wrapping_mul(0x9E37_79B9));
        let early = rng.next() % 8 == 0;
        let mut child = spawn_child(&dir, round, c.offset);
        let stdout = child.0.stdout.take().unwrap();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut acked = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.ends_with("ready") {
                    // (libtest may have printed "test child ... " first.)
                    let _ = ready_tx.send(());
                } else if let Some((p, i)) = line.split_once(' ') {
                    if let (Ok(p), Ok(i)) = (p.parse::<u32>(), i.parse::<u64>()) {
                        acked.push((p, i));
                    }
                }
                // (Anything else is the test harness talking.)
            }
            acked
        });
        let delay = if early {
            early_kills += 1;
            rng.next() % 16
        } else {
            if ready_rx.recv_timeout(Duration::from_secs(60)).is_err() {
                panic!("{ctx}: the child never became ready");
            }
            rng.next() % 41
        };
        std::thread::sleep(Duration::from_millis(delay));
        if let Some(status) = child.0.try_wait().unwrap() {
            panic!("{ctx}: the child exited by itself: {status}");
        }
        drop(child); // SIGKILL, then reap
        let acked = reader.join().unwrap();
        c.record(round, acked);
        if round + 1 == rounds || rng.next() % 3 == 0 {
            c.restart_and_check(&ctx);
            checks += 1;
        }
    }
    // The journal works after all that, and everything drains.
    {
        let dev = Arc::new(FileDevice::open(&c.ring(), SECTOR).unwrap());
        let f = open_performed(&c.performed(), c.offset);
        let j = Journal::<Op, _>::start(dev, config(), appender(f)).unwrap();
        j.push(&make_op(rounds, 0, 0)).unwrap().sync().unwrap();
        j.shutdown(true);
    }
    eprintln!(
        "{rounds} rounds ({early_kills} killed early, {checks} checked restarts) in {:.1?}: \
         {} ops acknowledged, {} distinct performed, {} performed entries",
        started.elapsed(),
        c.acked_total,
        c.seen.len(),
        c.performed_entries
    );
    assert!(
        c.acked_total >= rounds as u64,
        "too few ops acknowledged to mean anything"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The child's side; does nothing unless run by the test above.
#[test]
fn child() {
    if std::env::var(ROLE).is_err() {
        return;
    }
    let dir = PathBuf::from(std::env::var("TT_JOURNAL_DIR").unwrap());
    let round: u32 = std::env::var("TT_JOURNAL_ROUND").unwrap().parse().unwrap();
    let from: u64 = std::env::var("TT_JOURNAL_PERFORMED_FROM")
        .unwrap()
        .parse()
        .unwrap();
    // Never outlive a parent that died without killing us.
    std::thread::spawn(|| {
        std::thread::sleep(Duration::from_secs(60));
        eprintln!("crash child: not killed within 60 s, exiting");
        std::process::exit(4);
    });
    let fail = |what: String| -> ! {
        eprintln!("crash child: {what}");
        std::process::exit(3)
    };
    let dev = Arc::new(FileDevice::open(&dir.join("journal.ring"), SECTOR).unwrap());
    let f = open_performed(&dir.join("performed"), from);
    let j = Journal::<Op, _>::start(dev, config(), appender(f))
        .unwrap_or_else(|e| fail(format!("start: {e}")));
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "ready").unwrap();
        out.flush().unwrap();
    }
    /// Tell the parent that op `i` of pusher `p` is acknowledged.
    fn ack(p: u32, i: u64) {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{p} {i}").unwrap();
        out.flush().unwrap();
    }
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut in_flight = std::collections::VecDeque::new();
            for i in 0.. {
                if in_flight.len() as u64 == DEPTH {
                    let (k, p): (u64, tt_journal::Pending<_>) = in_flight.pop_front().unwrap();
                    match p.wait() {
                        Ok(_) => ack(SUBMITTER, k),
                        Err(e) => fail(format!("wait ({SUBMITTER}, {k}): {e}")),
                    }
                }
                match j.submit(&make_op(round, SUBMITTER, i)) {
                    Ok(p) => in_flight.push_back((i, p)),
                    Err(e) => fail(format!("submit ({SUBMITTER}, {i}): {e}")),
                }
            }
        });
        for p in 0..SUBMITTER {
            let j = &j;
            s.spawn(move || {
                for i in 0.. {
                    match j.push(&make_op(round, p, i)) {
                        Ok(w) => {
                            ack(p, i);
                            if p == 0 && i % 8 == 7 {
                                w.sync().unwrap_or_else(|e| fail(format!("sync: {e}")));
                            }
                        }
                        Err(e) => fail(format!("push ({p}, {i}): {e}")),
                    }
                }
            });
        }
    });
}
