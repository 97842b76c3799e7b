//! `tt-bench daemon`: the daemon's own costs (issue 18), each beside a
//! baseline measured in the same run.
//!
//! 1. Per create: the daemon's own time from the request read to the
//!    unikernel's process spawned, the desired state's write and
//!    fdatasync included (`daemon_us` in its reply), against an append
//!    and fdatasync of the same size done here on the same file system.
//!    Target: at most 1 ms plus one fdatasync (median).
//! 2. Create to the first console line through the daemon, beside
//!    `tt-host run` to its first line on stdout (interleaved). Reported.
//! 3. With 200 idle unikernels (`unit idle`): the daemon's RSS and its CPU
//!    use over a quiet 20 s. Targets: under 64 MiB, under 1% of a core.
//! 4. `tt-host list` with those 200 running, whole process, beside
//!    `tt-host --version` (the process floor). Target: under 20 ms.

use crate::stats::{fmt, summarize};
use crate::{judge, Opts, Verdict};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tt_host::daemon::client::Connection;
use tt_host::daemon::proto::{NewUnit, Op, Reply};

const DEFAULT_RUNS: usize = 30;
const IDLE: usize = 200;

/// A `tt-host daemon` on scratch directories. Dropped (also on an
/// error), it kills the daemon and every unikernel it started, then
/// removes the directories.
pub struct Daemon {
    pub dir: PathBuf,
    child: Option<Child>,
}

impl Daemon {
    pub fn socket(&self) -> PathBuf {
        self.dir.join("run/control.sock")
    }

    pub fn call(&self, op: Op) -> Result<Reply, String> {
        Connection::open(Some(self.socket()))?.call(op)
    }

    /// The daemon's log so far (for error messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// A `tt-host` client command (`args`) of this daemon.
    pub fn cli(&self, tt_host: &Path, args: &[&str]) -> Command {
        let mut c = Command::new(tt_host);
        c.args(args).env("TT_HOST_SOCKET", self.socket());
        c
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Its unikernels: every tt-host run on this state directory.
        let needle = format!("--state-dir={}", self.dir.join("state").display());
        for _ in 0..50 {
            let pids = pids_with(&needle);
            if pids.is_empty() {
                break;
            }
            for p in pids {
                // SAFETY: kill takes no pointers.
                unsafe { libc::kill(p as i32, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn pids_with(needle: &str) -> Vec<u32> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if cmd.split(|b| *b == 0).any(|a| a == needle.as_bytes()) {
            v.push(pid);
        }
    }
    v
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rfind(')').map_or("", |i| &stat[i + 2..]);
    let f: Vec<&str> = rest.split(' ').collect();
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    t(11) + t(12)
}

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Start a daemon on fresh directories in `$DIR_VAR`, default
/// `DEFAULT_DIR` under the workspace root, with the `extra` daemon
/// options; its log goes to `daemon.log` there.
pub fn start(
    tt_host: &Path,
    dir_var: &str,
    default_dir: &str,
    extra: &[&str],
) -> Result<Daemon, String> {
    let dir = std::env::var_os(dir_var)
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::root().join(default_dir));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let log = dir.join("daemon.log");
    let log = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
    let log2 = log.try_clone().map_err(|e| e.to_string())?;
    let child = Command::new(tt_host)
        .arg("daemon")
        .arg(format!("--state-dir={}", dir.join("state").display()))
        .arg(format!("--runtime-dir={}", dir.join("run").display()))
        .args(extra)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .spawn()
        .map_err(|e| format!("cannot start the daemon: {e}"))?;
    let mut d = Daemon {
        dir,
        child: Some(child),
    };
    let t = Instant::now();
    while std::os::unix::net::UnixStream::connect(d.socket()).is_err() {
        if let Some(Ok(Some(st))) = d.child.as_mut().map(|c| c.try_wait()) {
            return Err(format!("the daemon exited ({st}): {}", d.log().trim()));
        }
        if t.elapsed() > Duration::from_secs(20) {
            return Err("the daemon did not answer within 20 s".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(d)
}

fn create(d: &Daemon, name: &str, image: &Path, args: &[&str]) -> Result<(u64, u64), String> {
    let mut a = vec![
        "--mem=4".to_string(),
        image.display().to_string(),
        "--".into(),
    ];
    a.extend(args.iter().map(|s| s.to_string()));
    match d.call(Op::Create(NewUnit::plain(name.into(), a)))? {
        Reply::Started {
            daemon_us,
            persist_us,
            ..
        } => Ok((daemon_us, persist_us)),
        r => Err(format!("create {name}: {r:?}")),
    }
}

fn destroy(d: &Daemon, name: &str) -> Result<(), String> {
    d.call(Op::Destroy { name: name.into() }).map(drop)
}

/// The append + fdatasync baseline: one desired-state line's size.
fn fdatasync_baseline(dir: &Path, runs: usize) -> Result<Vec<Duration>, String> {
    let path = dir.join("baseline.log");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let line = vec![b'x'; 300];
    let mut v = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        f.write_all(&line).map_err(|e| e.to_string())?;
        f.sync_data().map_err(|e| e.to_string())?;
        v.push(t.elapsed());
    }
    Ok(v)
}

pub fn run(o: &Opts) -> Result<Vec<Verdict>, String> {
    let tt_host = crate::tt_host(o)?;
    let image = crate::image(o, "unit")?;
    let runs = o.runs.unwrap_or(DEFAULT_RUNS).max(5);
    let idle = o.iters.map_or(IDLE, |n| n as usize);
    let d = start(
        &tt_host,
        "TT_DAEMON_BENCH_DIR",
        "target/tt-daemon-bench",
        &[],
    )?;
    let mut verdicts = Vec::new();

    // 1. The daemon's own work per create, beside an fdatasync here.
    let mut own = Vec::new();
    let mut persist = Vec::new();
    let mut base = Vec::new();
    for i in 0..runs {
        base.extend(fdatasync_baseline(&d.dir, 1)?);
        let (us, p) = create(&d, &format!("c{i}"), &image, &["idle"])?;
        own.push(Duration::from_micros(us));
        persist.push(Duration::from_micros(p));
        destroy(&d, &format!("c{i}"))?;
    }
    let (own, persist, base) = (summarize(&own), summarize(&persist), summarize(&base));
    println!("daemon: create, request read -> process spawned ({runs} creates, medians)");
    println!(
        "  daemon's time, persisting included  {:>10} (p90 {})",
        fmt(own.median),
        fmt(own.p90)
    );
    println!(
        "  of which the desired state's sync  {:>10}",
        fmt(persist.median)
    );
    println!(
        "  baseline: append + fdatasync here  {:>10}",
        fmt(base.median)
    );
    let beyond = own.median.saturating_sub(base.median);
    verdicts.push(judge(
        "create: daemon time beyond one fdatasync (median, ms)",
        beyond.as_secs_f64() * 1e3,
        1.0,
        " ms",
    ));

    // 2. Create -> first console line, beside tt-host run -> first line.
    let mut via_daemon = Vec::new();
    let mut via_run = Vec::new();
    for i in 0..runs.min(20) {
        let t = Instant::now();
        let mut c = Command::new(&tt_host)
            .args(["run", "--mem=4"])
            .arg(&image)
            .args(["--", "idle"])
            .env("TT_HOST_STATE_DIR", d.dir.join("state"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| e.to_string())?;
        let mut line = String::new();
        BufReader::new(c.stdout.take().unwrap())
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        via_run.push(t.elapsed());
        let _ = c.kill();
        let _ = c.wait();

        let name = format!("f{i}");
        let t = Instant::now();
        create(&d, &name, &image, &["idle"])?;
        loop {
            if let Reply::Console { records, .. } = d.call(Op::Console {
                name: name.clone(),
                since_ns: None,
                last: Some(1),
                follow: false,
            })? {
                if !records.is_empty() {
                    break;
                }
            }
            if t.elapsed() > Duration::from_secs(10) {
                return Err(format!("{name}: no console line within 10 s"));
            }
        }
        via_daemon.push(t.elapsed());
        destroy(&d, &name)?;
    }
    let (vd, vr) = (summarize(&via_daemon), summarize(&via_run));
    println!("daemon: to the first console line (medians of {})", vd.n);
    println!(
        "  tt-host create + console  {:>10} (p90 {})",
        fmt(vd.median),
        fmt(vd.p90)
    );
    println!(
        "  tt-host run, stdout       {:>10} (p90 {})",
        fmt(vr.median),
        fmt(vr.p90)
    );

    // 3. Idle unikernels: the daemon's memory and CPU.
    let t = Instant::now();
    for i in 0..idle {
        create(&d, &format!("idle{i}"), &image, &["idle"])?;
    }
    println!(
        "daemon: {idle} idle unikernels created in {}",
        fmt(t.elapsed())
    );
    let pid = d.child.as_ref().map(|c| c.id()).unwrap_or(0);
    std::thread::sleep(Duration::from_secs(2));
    let window = Duration::from_secs(20);
    let (c0, t0) = (cpu_ticks(pid), Instant::now());
    std::thread::sleep(window);
    let (c1, el) = (cpu_ticks(pid), t0.elapsed());
    // SAFETY: sysconf is always safe.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let cpu = (c1 - c0) as f64 / hz / el.as_secs_f64() * 100.0;
    let rss = rss_kib(pid) as f64 / 1024.0;
    println!(
        "daemon: with {idle} idle unikernels over {}: CPU {cpu:.2}% of a core, RSS {rss:.1} MiB",
        fmt(el)
    );
    verdicts.push(judge("idle: daemon RSS (MiB)", rss, 64.0, " MiB"));
    verdicts.push(judge("idle: daemon CPU (% of a core)", cpu, 1.0, "%"));

    // 4. tt-host list with them running, beside the process floor.
    let mut list = Vec::new();
    let mut floor = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let st = Command::new(&tt_host)
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .map_err(|e| e.to_string())?;
        floor.push(t.elapsed());
        if !st.success() {
            return Err("tt-host --version failed".into());
        }
        let t = Instant::now();
        let out = Command::new(&tt_host)
            .arg("list")
            .env("TT_HOST_SOCKET", d.socket())
            .output()
            .map_err(|e| e.to_string())?;
        list.push(t.elapsed());
        let n = String::from_utf8_lossy(&out.stdout).lines().count();
        if !out.status.success() || n < idle + 1 {
            return Err(format!("tt-host list listed {} lines", n));
        }
    }
    let (l, f) = (summarize(&list), summarize(&floor));
    println!("daemon: tt-host list with {idle} running (20 runs, whole process)");
    println!(
        "  tt-host list       {:>10} (p90 {})",
        fmt(l.median),
        fmt(l.p90)
    );
    println!(
        "  tt-host --version  {:>10} (the process floor)",
        fmt(f.median)
    );
    verdicts.push(judge(
        "list with 200 running (median, ms)",
        l.median.as_secs_f64() * 1e3,
        20.0,
        " ms",
    ));
    Ok(verdicts)
}
