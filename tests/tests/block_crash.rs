//! Crash tests of guest disks. The `blkwriter` guest writes numbered,
//! checksummed sectors at random offsets and prints each write's number
//! once the hypercall returned; tt-host is SIGKILLed at a random moment,
//! started again on the same image (which replays its journal), and the
//! image must hold every acknowledged write, with no torn or misplaced
//! sector.
//!
//! - SIGKILL alone: 100 rounds (`TT_LONG=1`: 1000).
//! - A power cut: image and state directory on tt-lazyfs, a FUSE file
//!   system that keeps unsynced data in memory; after the SIGKILL it drops
//!   everything unsynced, as a power cut would. With the journal, every
//!   acknowledged write survives; with `--block-durability=none` (a plain
//!   `pwrite`, as solo5-hvt does) writes are lost, which shows that the
//!   test can tell the two apart.
//! - Both again through virtio-blk, with the `vblk` guest keeping 32 writes
//!   in flight (`ack N sector=S` per completed write; any of the 32 in
//!   flight at the kill may or may not be on the disk).

#[path = "../writes.rs"]
mod writes;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use tt_tests::*;
use writes::{acks, Writes};

/// A child that is SIGKILLed and reaped when dropped, so a failing test
/// leaves no tt-host behind.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// splitmix64, seeded from the clock: the kill moments and guest seeds.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

const SECTOR: u64 = 512;

/// Which guest writes: blkwriter on the hvt block device (one write at a
/// time), or vblk on a virtio-blk device keeping `depth` writes in flight.
#[derive(Clone, Copy)]
enum Guest {
    Hvt,
    Virtio { depth: u64 },
}

/// `tt-host run` of the writer on `image`, with `extra` tt-host options.
fn writer(
    state: &std::path::Path,
    image: &str,
    extra: &[&str],
    guest_args: &[String],
    g: Guest,
) -> Command {
    let mut cmd = Command::new(tt_host());
    cmd.arg("run")
        .arg("--mem=32")
        .arg(format!("--state-dir={}", state.display()));
    match g {
        Guest::Hvt => cmd
            .arg(format!("--block:storage={image}"))
            .args(extra)
            .arg(guest("blkwriter"))
            .arg("--"),
        Guest::Virtio { depth } => cmd
            .arg(format!("--block:disk={image}"))
            .args(extra)
            .arg(guest("vblk"))
            .arg("--")
            .arg("ack")
            .arg(format!("depth={depth}")),
    };
    cmd.args(guest_args);
    cmd
}

/// Run a writer until it has acknowledged at least one write, then for a
/// random time more, then SIGKILL it. Returns its acknowledged writes and
/// the numbers of the writes that may have been in flight.
fn run_and_kill(
    cmd: &mut Command,
    rng: &mut Rng,
    start: u64,
    depth: u64,
) -> (Vec<(u64, u64, u64)>, Vec<u64>) {
    let mut child = Guard(
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tt-host"),
    );
    let stdout = child.0.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.starts_with("ack ") {
                let _ = tx.send(());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    // Wait for the first acknowledgement (the journal replayed, the guest
    // runs), then kill at a random moment up to 60 ms later.
    let t = Instant::now();
    while rx.recv_timeout(Duration::from_secs(60)).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "no write acknowledged"
        );
    }
    std::thread::sleep(Duration::from_micros(rng.next() % 60_000));
    child.0.kill().expect("SIGKILL tt-host");
    let status = child.0.wait().expect("reap tt-host");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9),
        "tt-host ended before it was killed: {status:?}"
    );
    let out = reader.join().unwrap();
    if out.contains("FAIL") {
        panic!("the guest failed:\n{out}");
    }
    let acked = acks(&out);
    // Up to `depth` writes are in flight, numbered in submission order:
    // every write up to `depth` past the highest acknowledged one that was
    // not acknowledged may have reached the disk.
    let top = acked.iter().map(|a| a.0).max().unwrap_or(start) + depth;
    let last: Vec<u64> = (start..=top)
        .filter(|n| !acked.iter().any(|a| a.0 == *n))
        .collect();
    (acked, last)
}

/// Where the image and state directory live, and what happens to them
/// after tt-host is killed.
trait Disk {
    /// The directory the image and the state directory are in.
    fn dir(&self) -> &std::path::Path;
    /// tt-host was just SIGKILLed.
    fn after_kill(&mut self) {}
}

/// A plain directory: a SIGKILL loses nothing that reached the page cache.
impl Disk for Scratch {
    fn dir(&self) -> &std::path::Path {
        &self.0
    }
}

/// `rounds` rounds: kill a writer, then a clean run (replay, one more
/// write, drain at halt), then check the image. Returns the problems of
/// the first round whose image was wrong, if `tolerate` (else panics).
fn crash_rounds(
    disk: &mut dyn Disk,
    rounds: u64,
    extra: &[&str],
    maxlens: &[u64],
    tolerate: bool,
    g: Guest,
) -> Option<Vec<String>> {
    let depth = match g {
        Guest::Hvt => 1,
        Guest::Virtio { depth } => depth,
    };
    let image = disk.dir().join("disk.img");
    std::fs::write(&image, vec![0u8; 4 << 20]).unwrap();
    sync_new_file(&image);
    let image = image.to_str().unwrap().to_string();
    let state = disk.dir().join("state");
    let mut rng = Rng(std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64);
    let seed0 = rng.0;
    let mut writes = Writes::default();
    for round in 0..rounds {
        let start = writes.last() + 1;
        let maxlen = maxlens[round as usize % maxlens.len()];
        let args = |count: u64| {
            let mut a = vec![
                format!("seed={}", rng.0 ^ round),
                format!("start={start}"),
                format!("count={count}"),
            ];
            if matches!(g, Guest::Hvt) {
                a.push(format!("maxlen={maxlen}"));
            }
            a
        };
        let (acked, inflight) = run_and_kill(
            &mut writer(&state, &image, extra, &args(0), g),
            &mut rng,
            start,
            depth,
        );
        disk.after_kill();
        for (n, off, len) in acked {
            writes.ack(n, off, len);
        }
        for n in inflight {
            writes.maybe(n);
        }
        // Start again on the same image: replay, one write, halt.
        let start = writes.last() + 1;
        let clean = tt_with(&mut writer(
            &state,
            &image,
            extra,
            &[
                format!("seed={round}"),
                format!("start={start}"),
                "count=1".into(),
            ],
            g,
        ));
        assert_eq!(clean.status, 0, "round {round}: restart failed: {clean:?}");
        for (n, off, len) in acks(&clean.stdout) {
            writes.ack(n, off, len);
        }
        let problems = writes.check(std::path::Path::new(&image), SECTOR);
        if tolerate && !problems.is_empty() {
            return Some(problems);
        }
        assert!(
            problems.is_empty(),
            "round {round} (seed {seed0:#x}, maxlen {maxlen}): {} writes acknowledged; the \
             image is wrong:\n{}",
            writes.acked_count(),
            problems.join("\n")
        );
    }
    eprintln!(
        "{rounds} rounds, {} writes acknowledged, all on the image",
        writes.acked_count()
    );
    None
}

/// Make a new file and its directory entry durable.
fn sync_new_file(path: &std::path::Path) {
    std::fs::File::open(path).unwrap().sync_all().unwrap();
    let parent = path.parent().unwrap();
    std::fs::File::open(parent).unwrap().sync_all().unwrap();
}

fn rounds() -> u64 {
    if std::env::var("TT_LONG").as_deref() == Ok("1") {
        1000
    } else {
        100
    }
}

/// Writes of 1 to 8 sectors, and up to 2 MiB (split into many journal
/// records), in turn.
#[test]
fn every_acknowledged_write_survives_sigkill() {
    if !kvm() {
        return;
    }
    let mut dir = Scratch::new("blkcrash");
    crash_rounds(&mut dir, rounds(), &[], &[8, 64, 4096], false, Guest::Hvt);
}

/// The image and state directory on tt-lazyfs: a power cut after each
/// SIGKILL drops what was not synced.
struct PowerCut {
    fs: tt_lazyfs::LazyFs,
    /// Removed after `fs` is unmounted (fields drop in order).
    _dir: Scratch,
    /// One power-cut test at a time: a power cut remounts the file system,
    /// which takes the lowest free anonymous device number, and the
    /// journal knows the image by its device (FUSE has no fsid). Two
    /// tests remounting at once could swap numbers, which a real disk
    /// never does.
    _one_at_a_time: std::sync::MutexGuard<'static, ()>,
}

static POWER_CUTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl PowerCut {
    /// Mount tt-lazyfs; `None` if FUSE tests are to be skipped (said loudly).
    fn new() -> Option<PowerCut> {
        if tt_lazyfs::skip_requested() {
            eprintln!("SKIPPED: TT_SKIP_FUSE=1 is set: no power-cut test");
            return None;
        }
        let one = POWER_CUTS.lock().unwrap_or_else(|p| p.into_inner());
        let dir = Scratch::new("powercut");
        let mnt = dir.path("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let fs =
            tt_lazyfs::LazyFs::mount(&mnt).expect("mount tt-lazyfs (needs root and /dev/fuse)");
        // The state directory exists, durably, before the first launch.
        std::fs::create_dir(mnt.join("state")).unwrap();
        std::fs::File::open(&mnt).unwrap().sync_all().unwrap();
        Some(PowerCut {
            fs,
            _dir: dir,
            _one_at_a_time: one,
        })
    }
}

impl Disk for PowerCut {
    fn dir(&self) -> &std::path::Path {
        self.fs.path()
    }
    fn after_kill(&mut self) {
        self.fs.crash().expect("power cut on tt-lazyfs");
    }
}

#[test]
fn every_acknowledged_write_survives_a_power_cut() {
    if !kvm() {
        return;
    }
    let Some(mut disk) = PowerCut::new() else {
        return;
    };
    crash_rounds(&mut disk, 20, &[], &[8, 64, 4096], false, Guest::Hvt);
}

/// Without the journal (solo5-hvt's plain `pwrite`), a power cut loses
/// acknowledged writes: the test above can fail.
#[test]
fn without_the_journal_a_power_cut_loses_acknowledged_writes() {
    if !kvm() {
        return;
    }
    let Some(mut disk) = PowerCut::new() else {
        return;
    };
    let problems = crash_rounds(
        &mut disk,
        5,
        &["--block-durability=none"],
        &[8],
        true,
        Guest::Hvt,
    );
    let problems = problems.expect("no acknowledged write was lost without the journal");
    assert!(
        problems.iter().any(|p| p.contains("want write Some")),
        "{problems:?}"
    );
}

/// The power cut again, with the writes going through virtio-blk, 32 in
/// flight: every completed request is on the image after the restart.
#[test]
fn every_completed_virtio_write_at_depth_32_survives_a_power_cut() {
    if !kvm() {
        return;
    }
    let Some(mut disk) = PowerCut::new() else {
        return;
    };
    crash_rounds(&mut disk, 20, &[], &[0], false, Guest::Virtio { depth: 32 });
}

/// And SIGKILL alone, with virtio-blk at depth 32.
#[test]
fn every_completed_virtio_write_at_depth_32_survives_sigkill() {
    if !kvm() {
        return;
    }
    let mut dir = Scratch::new("vblkcrash");
    crash_rounds(&mut dir, 30, &[], &[0], false, Guest::Virtio { depth: 32 });
}

/// Without the journal, the virtio path loses completed writes in a power
/// cut: the test above can fail.
#[test]
fn without_the_journal_a_power_cut_loses_completed_virtio_writes() {
    if !kvm() {
        return;
    }
    let Some(mut disk) = PowerCut::new() else {
        return;
    };
    let problems = crash_rounds(
        &mut disk,
        5,
        &["--block-durability=none"],
        &[0],
        true,
        Guest::Virtio { depth: 32 },
    );
    let problems = problems.expect("no completed write was lost without the journal");
    assert!(
        problems.iter().any(|p| p.contains("want write Some")),
        "{problems:?}"
    );
}
