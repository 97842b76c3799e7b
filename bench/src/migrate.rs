//! `tt-bench migrate`: snapshots and live migration (issue 20) of a
//! 64 MiB guest, each beside a baseline measured in the same run.
//!
//! 1. Snapshot and restore of `unit idle` (`--mem=64`):
//!    - snapshot: wall time of `tt-host snapshot --control=SOCK DIR --stop`
//!      as a whole process (its own exec, the pause, the state and memory
//!      files written and fdatasynced, the directory synced);
//!    - restore: from the spawn of `tt-host restore --control=SOCK2 DIR`
//!      until a `status` request on SOCK2 answers `running`. That answer
//!      comes from the vCPU thread between two guest instructions, after
//!      memory and state are loaded, so it is the first moment the guest
//!      is known to run again (`unit idle` prints nothing more, and a line
//!      from a ticking guest would add its tick to the figure);
//!    - baselines: the snapshot's memory file copied with `std::fs::copy`
//!      and fdatasynced (the least a snapshot of that memory costs), and a
//!      fresh `tt-host run` of the same guest to its first `running`
//!      status (what a restore saves or costs against a cold boot).
//! 2. Live migration over TCP loopback (pre-copy, PSK) of `unit idle`:
//!    downtime (X, "ms paused", measured by the source from the pause to
//!    the commit sent) and total (Y, "ms in all") from `migrate-send`'s
//!    answer. Targets: downtime < 10 ms, total < 1 s (worst of the runs).
//! 3. The same with `counter count 50 10240 32`, a guest dirtying
//!    10 MiB/s of a 32 MiB buffer. Target: downtime < 50 ms.
//! 4. A local upgrade over a Unix socket (the target maps the source's
//!    memfd, nothing is copied) of `unit idle`. Target: downtime < 5 ms.
//!
//! Baselines for 2-4, in every run: a pause + resume round trip on the
//! source's control socket, sent from this process (no CLI exec), which is
//! the floor of any downtime (the vCPU leaves the guest and comes back,
//! with the disks flushed); and, for TCP, 64 MiB written through a
//! loopback TCP connection to a thread here that reads it, the floor of a
//! pre-copy that sends every page once.
//!
//! Everything lives in `$TT_MIGRATE_BENCH_DIR` (default
//! `target/tt-migrate-bench`), removed at the end; every tt-host started
//! is killed if the benchmark fails.

use crate::stats::{fmt, summarize, Summary};
use crate::{judge, Opts, Verdict};
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tt_host::control::Request;

const DEFAULT_RUNS: usize = 5;
const MEM: &str = "--mem=64";
const MEM_BYTES: usize = 64 << 20;
/// How long a process may take to answer or end: this only catches a hang.
const WAIT: Duration = Duration::from_secs(30);

/// A tt-host started here: SIGKILLed and reaped when dropped.
struct Proc {
    child: Option<Child>,
    what: String,
    stderr: PathBuf,
}

impl Proc {
    fn errors(&self) -> String {
        std::fs::read_to_string(&self.stderr)
            .unwrap_or_default()
            .trim()
            .to_string()
    }

    /// Fail if it has exited (quoting its stderr).
    fn check_alive(&mut self) -> Result<(), String> {
        if let Some(c) = &mut self.child {
            if let Ok(Some(st)) = c.try_wait() {
                self.child = None;
                return Err(format!("{} ended ({st}): {}", self.what, self.errors()));
            }
        }
        Ok(())
    }

    /// Wait for it to exit by itself; its exit code.
    fn wait_exit(&mut self) -> Result<Option<i32>, String> {
        let t = Instant::now();
        let Some(c) = &mut self.child else {
            return Ok(None);
        };
        loop {
            if let Some(st) = c.try_wait().map_err(|e| e.to_string())? {
                self.child = None;
                return Ok(st.code());
            }
            if t.elapsed() > WAIT {
                return Err(format!("{} did not exit within {WAIT:?}", self.what));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// SIGTERM (tt-host stops its guest and leaves), then reap.
    fn stop(mut self) -> Result<(), String> {
        if let Some(c) = &self.child {
            // SAFETY: kill takes no pointers.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        }
        self.wait_exit().map(drop)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The scratch directory and what every run shares.
struct Bench {
    tt_host: PathBuf,
    unit: PathBuf,
    counter: PathBuf,
    dir: PathBuf,
    psk: PathBuf,
    disk: PathBuf,
    seq: usize,
}

impl Drop for Bench {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Bench {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn state_arg(&self) -> String {
        format!("--state-dir={}", self.path("state").display())
    }

    /// A fresh control socket path.
    fn socket(&mut self, tag: &str) -> PathBuf {
        self.seq += 1;
        self.path(&format!("{tag}{}.ctl", self.seq))
    }

    /// Spawn `tt-host ARGS` with stdout discarded and stderr kept.
    fn spawn(&mut self, what: &str, args: &[String]) -> Result<Proc, String> {
        self.seq += 1;
        let stderr = self.path(&format!("{what}{}.err", self.seq));
        let err = File::create(&stderr).map_err(|e| format!("{}: {e}", stderr.display()))?;
        let child = Command::new(&self.tt_host)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start tt-host {what}: {e}"))?;
        Ok(Proc {
            child: Some(child),
            what: format!("tt-host {what}"),
            stderr,
        })
    }

    /// `tt-host run --control=CTL --mem=64 IMAGE -- ARGS`, until it
    /// answers `running`; the process and the time that took.
    fn run_guest(&mut self, ctl: &Path, g: &Guest) -> Result<(Proc, Duration), String> {
        let mut a = vec![
            "run".to_string(),
            MEM.into(),
            self.state_arg(),
            format!("--control={}", ctl.display()),
        ];
        if g.disk {
            a.push(format!("--block:disk={}", self.disk.display()));
        }
        a.push(
            if g.counter { &self.counter } else { &self.unit }
                .display()
                .to_string(),
        );
        a.push("--".into());
        a.extend(g.args.iter().map(|s| s.to_string()));
        let t = Instant::now();
        let mut p = self.spawn("run", &a)?;
        wait_running(&mut p, ctl)?;
        Ok((p, t.elapsed()))
    }

    /// `tt-host ARGS` to completion; its wall time and stdout.
    fn tt(&self, args: &[String]) -> Result<(Duration, String), String> {
        let t = Instant::now();
        let out = Command::new(&self.tt_host)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot start tt-host: {e}"))?;
        let wall = t.elapsed();
        let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !out.status.success() {
            return Err(format!(
                "tt-host {args:?} failed ({}): {} {}",
                out.status,
                stdout,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok((wall, stdout))
    }
}

/// Which guest a measurement runs.
struct Guest {
    counter: bool,
    disk: bool,
    args: &'static [&'static str],
}

const IDLE: Guest = Guest {
    counter: false,
    disk: false,
    args: &["idle"],
};

/// `counter`: a tick every 50 ms, 10 MiB/s dirtied in a 32 MiB buffer.
const DIRTY: Guest = Guest {
    counter: true,
    disk: true,
    args: &["count", "50", "10240", "32"],
};

fn request(op: &str) -> Request {
    Request {
        op: op.into(),
        stop: false,
        downtime_ms: None,
        max_ms: None,
    }
}

/// Poll `ctl` with `status` until the guest of `p` answers `running`.
fn wait_running(p: &mut Proc, ctl: &Path) -> Result<(), String> {
    let t = Instant::now();
    loop {
        p.check_alive()?;
        if ctl.exists() {
            if let Ok(s) = tt_host::control::call(ctl, &request("status"), &[]) {
                if s.trim() == "running" {
                    return Ok(());
                }
                return Err(format!("{}: status answered '{s}'", p.what));
            }
        }
        if t.elapsed() > WAIT {
            return Err(format!("{} did not answer within {WAIT:?}", p.what));
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// A pause + resume round trip on `ctl`, from this process.
fn pause_resume(ctl: &Path) -> Result<Duration, String> {
    let t = Instant::now();
    for op in ["pause", "resume"] {
        tt_host::control::call(ctl, &request(op), &[]).map_err(|e| format!("{op}: {e}"))?;
    }
    Ok(t.elapsed())
}

/// 64 MiB through a loopback TCP connection to a reader thread: from the
/// connect to the last byte read.
fn tcp_copy() -> Result<Duration, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr = l.local_addr().map_err(|e| e.to_string())?;
    let reader = std::thread::spawn(move || -> std::io::Result<usize> {
        let (mut s, _) = l.accept()?;
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0;
        loop {
            match s.read(&mut buf)? {
                0 => return Ok(n),
                k => n += k,
            }
        }
    });
    let chunk = vec![0x5au8; 1 << 20];
    let t = Instant::now();
    let mut s = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    for _ in 0..MEM_BYTES / chunk.len() {
        s.write_all(&chunk).map_err(|e| e.to_string())?;
    }
    drop(s);
    let n = reader
        .join()
        .map_err(|_| "the TCP reader panicked".to_string())?
        .map_err(|e| e.to_string())?;
    let el = t.elapsed();
    if n != MEM_BYTES {
        return Err(format!("TCP baseline: {n} bytes arrived of {MEM_BYTES}"));
    }
    Ok(el)
}

/// A free loopback port (bound and released: another process could
/// take it meanwhile, which only makes a run fail).
fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

/// One `migrate-send` answer.
struct Migrated {
    rounds: u64,
    pages: u64,
    downtime: Duration,
    total: Duration,
}

/// Parse "migrated: N rounds, P pages copied while running, X ms paused,
/// Y ms in all".
fn parse_migrated(s: &str) -> Result<Migrated, String> {
    let bad = || format!("unexpected answer from migrate-send: '{s}'");
    let rest = s.strip_prefix("migrated: ").ok_or_else(bad)?;
    let f: Vec<&str> = rest.split(", ").collect();
    let num = |i: usize, suffix: &str| -> Result<f64, String> {
        f.get(i)
            .and_then(|p| p.strip_suffix(suffix))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .ok_or_else(bad)
    };
    let ms = |v: f64| Duration::from_secs_f64(v / 1e3);
    Ok(Migrated {
        rounds: num(0, " rounds")? as u64,
        pages: num(1, " pages copied while running")? as u64,
        downtime: ms(num(2, " ms paused")?),
        total: ms(num(3, " ms in all")?),
    })
}

/// Where a migration goes.
enum Via {
    Tcp,
    Unix,
}

/// One migration of `g` (started fresh) via `via`, with its baselines
/// measured on the same source just before.
struct MigRun {
    m: Migrated,
    pause_resume: Duration,
    /// Wall time of the `migrate-send` process.
    cli: Duration,
}

/// One migration: its figures, or (inner `Err`) why `migrate-send`
/// failed; an outer `Err` is a failure of the benchmark itself.
fn migrate_once(b: &mut Bench, g: &Guest, via: &Via) -> Result<Result<MigRun, String>, String> {
    let src_ctl = b.socket("src");
    let dst_ctl = b.socket("dst");
    let (mut src, _) = b.run_guest(&src_ctl, g)?;
    // Let it settle (a dirtying guest reaches its rate).
    std::thread::sleep(Duration::from_millis(300));
    let pause_resume = pause_resume(&src_ctl)?;
    let addr = match via {
        Via::Tcp => format!("127.0.0.1:{}", free_port()?),
        Via::Unix => b.socket("mig").display().to_string(),
    };
    let mut a = vec![
        "migrate-receive".to_string(),
        format!("--listen={addr}"),
        b.state_arg(),
        format!("--control={}", dst_ctl.display()),
    ];
    if matches!(via, Via::Tcp) {
        a.push(format!("--psk={}", b.psk.display()));
    }
    if g.disk {
        a.push(format!("--block:disk={}", b.disk.display()));
    }
    let mut dst = b.spawn("migrate-receive", &a)?;
    let mut send = vec![
        "migrate-send".to_string(),
        format!("--control={}", src_ctl.display()),
        format!("--to={addr}"),
    ];
    if matches!(via, Via::Tcp) {
        send.push(format!("--psk={}", b.psk.display()));
    }
    // The receiver gives no sign that it listens: retry the connect.
    let t = Instant::now();
    let (cli, answer) = loop {
        dst.check_alive()?;
        match b.tt(&send) {
            Ok(r) => break r,
            Err(e) if e.contains("cannot connect") && t.elapsed() < WAIT => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return failed(e, dst, &dst_ctl, src),
        }
    };
    let m = parse_migrated(&answer)?;
    // The guest runs on the target; the source has left.
    wait_running(&mut dst, &dst_ctl)?;
    let code = src.wait_exit()?;
    if code != Some(0) {
        return Err(format!(
            "the source exited with {code:?} after the migration: {}",
            src.errors()
        ));
    }
    dst.stop()?;
    Ok(Ok(MigRun {
        m,
        pause_resume,
        cli,
    }))
}

/// A migration that `migrate-send` reported as failed: where the guest
/// ended up, for the record. Both processes are stopped.
fn failed(
    err: String,
    mut dst: Proc,
    dst_ctl: &Path,
    mut src: Proc,
) -> Result<Result<MigRun, String>, String> {
    let on_target = wait_running(&mut dst, dst_ctl).is_ok();
    // The source leaves at once after a hand-over: give it a moment.
    let t = Instant::now();
    let source = loop {
        if let Err(e) = src.check_alive() {
            break e;
        }
        if t.elapsed() > Duration::from_secs(2) {
            break "the source still runs 2 s later".to_string();
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let receiver = dst.errors();
    Ok(Err(format!(
        "{err}\n    receiver's stderr: '{receiver}'; guest running on the target: {on_target}; \
         {source}"
    )))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn line(what: &str, s: &Summary) {
    println!(
        "  {what:<44} {:>10} {:>10} {:>10}",
        fmt(s.median),
        fmt(s.min),
        fmt(s.max)
    );
}

fn migration(
    b: &mut Bench,
    title: &str,
    g: &Guest,
    via: Via,
    runs: usize,
    limit_ms: f64,
    total_limit_ms: Option<f64>,
) -> Result<Vec<Verdict>, String> {
    let mut v = Vec::new();
    let mut failures = Vec::new();
    for _ in 0..runs {
        match migrate_once(b, g, &via)? {
            Ok(r) => v.push(r),
            Err(e) => failures.push(e),
        }
    }
    if v.is_empty() {
        return Err(format!(
            "{title}: every migration failed:\n  {}",
            failures.join("\n  ")
        ));
    }
    let tcp: Vec<Duration> = if matches!(via, Via::Tcp) {
        (0..v.len()).map(|_| tcp_copy()).collect::<Result<_, _>>()?
    } else {
        Vec::new()
    };
    let get = |f: fn(&MigRun) -> Duration| summarize(&v.iter().map(f).collect::<Vec<_>>());
    let (down, total) = (get(|r| r.m.downtime), get(|r| r.m.total));
    println!("{title} ({} migrations)", v.len());
    println!("  {:<44} {:>10} {:>10} {:>10}", "", "median", "min", "max");
    line("downtime (migrate-send's \"ms paused\")", &down);
    line("total (\"ms in all\")", &total);
    line("migrate-send, whole process", &get(|r| r.cli));
    line(
        "baseline: pause + resume round trip",
        &get(|r| r.pause_resume),
    );
    if !tcp.is_empty() {
        line("baseline: 64 MiB over loopback TCP", &summarize(&tcp));
    }
    println!(
        "  rounds: {}; pages copied while running: {}",
        v.iter()
            .map(|r| r.m.rounds.to_string())
            .collect::<Vec<_>>()
            .join(" "),
        v.iter()
            .map(|r| r.m.pages.to_string())
            .collect::<Vec<_>>()
            .join(" ")
    );
    for f in &failures {
        println!("  FAILED: {f}");
    }
    let mut verdicts = Vec::new();
    if !failures.is_empty() {
        println!(
            "target: {title}: every migration succeeds: MISSED ({} of {runs} failed)",
            failures.len()
        );
        verdicts.push(Verdict::Missed);
    }
    verdicts.push(judge(
        &format!("{title}: downtime (max of {}, ms)", v.len()),
        ms(down.max),
        limit_ms,
        " ms",
    ));
    if let Some(l) = total_limit_ms {
        verdicts.push(judge(
            &format!("{title}: total (max of {}, ms)", v.len()),
            ms(total.max),
            l,
            " ms",
        ));
    }
    Ok(verdicts)
}

fn snapshot_restore(b: &mut Bench, runs: usize) -> Result<(), String> {
    let (mut boot, mut snap, mut restore, mut copy) = (vec![], vec![], vec![], vec![]);
    // The memory file's length and allocated bytes; the copy's allocated.
    let mut sizes = (0u64, 0u64, 0u64);
    for i in 0..runs {
        let ctl = b.socket("snap");
        let (mut p, t) = b.run_guest(&ctl, &IDLE)?;
        boot.push(t);
        let dir = b.path(&format!("snapshot{i}"));
        let (t, out) = b.tt(&[
            "snapshot".into(),
            format!("--control={}", ctl.display()),
            dir.display().to_string(),
            "--stop".into(),
        ])?;
        if !out.starts_with("snapshot written (") {
            return Err(format!("tt-host snapshot answered '{out}'"));
        }
        snap.push(t);
        if p.wait_exit()? != Some(0) {
            return Err(format!("snapshot --stop: {}", p.errors()));
        }

        let mem = dir.join("memory");
        let to = b.path("memory.copy");
        let t = Instant::now();
        std::fs::copy(&mem, &to).map_err(|e| format!("copy {}: {e}", mem.display()))?;
        File::open(&to)
            .and_then(|f| f.sync_data())
            .map_err(|e| format!("fdatasync {}: {e}", to.display()))?;
        copy.push(t.elapsed());
        {
            use std::os::unix::fs::MetadataExt;
            let m = std::fs::metadata(&mem).map_err(|e| format!("{}: {e}", mem.display()))?;
            let c = std::fs::metadata(&to).map_err(|e| format!("{}: {e}", to.display()))?;
            sizes = (m.len(), m.blocks() * 512, c.blocks() * 512);
        }
        let _ = std::fs::remove_file(&to);

        let ctl2 = b.socket("restored");
        let t = Instant::now();
        let mut r = b.spawn(
            "restore",
            &[
                "restore".into(),
                b.state_arg(),
                format!("--control={}", ctl2.display()),
                dir.display().to_string(),
            ],
        )?;
        wait_running(&mut r, &ctl2)?;
        restore.push(t.elapsed());
        r.stop()?;
        let _ = std::fs::remove_dir_all(&dir);
    }
    println!("snapshot and restore, unit idle, --mem=64 ({runs} runs)");
    println!("  {:<44} {:>10} {:>10} {:>10}", "", "median", "min", "max");
    line("tt-host snapshot --stop, whole process", &summarize(&snap));
    line("baseline: copy memory file + fdatasync", &summarize(&copy));
    line(
        "tt-host restore, spawn -> status running",
        &summarize(&restore),
    );
    line("baseline: tt-host run, spawn -> running", &summarize(&boot));
    println!(
        "  memory file: {} MiB long, {} KiB allocated (its copy: {} KiB)",
        sizes.0 >> 20,
        sizes.1 >> 10,
        sizes.2 >> 10
    );
    Ok(())
}

pub fn run(o: &Opts) -> Result<Vec<Verdict>, String> {
    let tt_host = crate::tt_host(o)?;
    let unit = crate::image(o, "unit")?;
    let counter = crate::image(&Opts::default(), "counter")?;
    let runs = o.runs.unwrap_or(DEFAULT_RUNS).max(1);
    let dir = std::env::var_os("TT_MIGRATE_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::root().join("target/tt-migrate-bench"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("state")).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut b = Bench {
        psk: dir.join("psk"),
        disk: dir.join("disk.img"),
        tt_host,
        unit,
        counter,
        dir,
        seq: 0,
    };
    std::fs::write(&b.psk, b"tt-bench migrate pre-shared key\n")
        .map_err(|e| format!("{}: {e}", b.psk.display()))?;
    std::fs::write(&b.disk, vec![0u8; 1 << 20])
        .map_err(|e| format!("{}: {e}", b.disk.display()))?;

    snapshot_restore(&mut b, runs)?;
    println!();
    let mut verdicts = migration(
        &mut b,
        "TCP, unit idle",
        &IDLE,
        Via::Tcp,
        runs,
        10.0,
        Some(1000.0),
    )?;
    println!();
    verdicts.extend(migration(
        &mut b,
        "TCP, counter dirtying 10 MiB/s",
        &DIRTY,
        Via::Tcp,
        runs,
        50.0,
        None,
    )?);
    println!();
    verdicts.extend(migration(
        &mut b,
        "Unix (memfd), unit idle",
        &IDLE,
        Via::Unix,
        runs,
        5.0,
        None,
    )?);
    Ok(verdicts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_migrate_send_answer() {
        let m = parse_migrated(
            "migrated: 3 rounds, 1200 pages copied while running, 4.2 ms paused, 180 ms in all",
        )
        .unwrap();
        assert_eq!((m.rounds, m.pages), (3, 1200));
        assert_eq!(m.downtime.as_micros(), 4200);
        assert_eq!(m.total, Duration::from_millis(180));
        assert!(parse_migrated("snapshot written (x)").is_err());
    }
}
