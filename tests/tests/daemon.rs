//! `tt-host daemon` end to end: real KVM, real `tt-host run` processes,
//! a daemon killed with SIGKILL and started again, a simulated reboot,
//! restart rules, access by subtree, many clients, console followers.
//!
//! Each test has a daemon of its own ([`Daemon`]), which kills it and
//! every unikernel it started when the test ends, failed or not.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::process::Command;
use std::time::{Duration, Instant};
use tt_tests::daemon::Daemon;
use tt_tests::{guest, kill, kvm, tt_host, Run};

/// The test guest: `tick MS [N]`, `exit CODE`, `idle`, `chatty BYTES MS`.
fn unit() -> String {
    guest("unit").display().to_string()
}

#[track_caller]
fn ok(r: &Run) -> &str {
    assert_eq!(r.status, 0, "{r:?}");
    &r.stdout
}

/// `tt-host list` as name -> (state, pid, restarts, last end).
fn list(d: &Daemon) -> BTreeMap<String, (String, Option<u32>, u32, String)> {
    let r = d.cli(&["list"]);
    ok(&r)
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].to_string(),
                (
                    f[1].to_string(),
                    f[2].parse().ok(),
                    f[3].parse().unwrap(),
                    f[4..].join(" "),
                ),
            )
        })
        .collect()
}

/// The console lines of `name` (all that is kept).
fn console(d: &Daemon, name: &str) -> Vec<String> {
    let r = d.cli(&["console", name]);
    ok(&r).lines().map(String::from).collect()
}

/// The tick numbers in console lines, checked to be 1, 2, 3, ... with
/// none missing.
#[track_caller]
fn ticks(lines: &[String]) -> u64 {
    let ticks: Vec<u64> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("tick ").and_then(|n| n.parse().ok()))
        .collect();
    for (i, t) in ticks.iter().enumerate() {
        assert_eq!(
            *t,
            i as u64 + 1,
            "tick lines lost or out of order: {lines:?}"
        );
    }
    ticks.len() as u64
}

/// `client ARGS` (a copy of tt-host) run as uid and gid 4242.
fn as_uid_4242(d: &Daemon, client: &std::path::Path, args: &[&str]) -> Run {
    d.cli_as(4242, client, args)
}

fn alive(pid: u32) -> bool {
    kill(pid, 0)
}

#[test]
fn twenty_unikernels_outlive_a_daemon_killed_with_sigkill() {
    if !kvm() {
        return;
    }
    let mut d = Daemon::started("d-twenty", &[]);
    let names: Vec<String> = (0..20).map(|i| format!("u{i}")).collect();
    for n in &names {
        ok(&d.cli(&["create", n, "--mem=8", &unit(), "tick", "100"]));
    }
    let before = list(&d);
    assert_eq!(before.len(), 20, "{before:?}");
    assert!(before.values().all(|u| u.0 == "running"), "{before:?}");
    d.wait_for(30, "every unikernel ticked twice", || {
        names.iter().all(|n| ticks(&console(&d, n)) >= 2)
    });
    let ticked: Vec<u64> = names.iter().map(|n| ticks(&console(&d, n))).collect();

    d.kill9();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(d.unit_pids().len(), 20, "the unikernels outlive the daemon");
    d.start();

    let after = list(&d);
    assert_eq!(after.len(), 20, "{after:?}\n{}", d.log());
    for (n, u) in &after {
        assert_eq!(u.0, "running", "{n}: {after:?}");
        assert_eq!(u.1, before[n].1, "{n} is the same process, re-adopted");
    }
    d.wait_for(30, "every console goes on after the restart", || {
        names
            .iter()
            .zip(&ticked)
            .all(|(n, t)| ticks(&console(&d, n)) >= t + 3)
    });
    // Stats still come from the re-adopted processes.
    let s = d.cli(&["stats", "u7"]);
    assert!(ok(&s).contains("running: yes"), "{s:?}");
    assert!(!ok(&s).contains("vm exits: 0\n"), "{s:?}");
}

#[test]
fn restart_on_fail_follows_the_exit_code_with_growing_delays() {
    if !kvm() {
        return;
    }
    let d = Daemon::started("d-restart", &["--restart-backoff=200,10000"]);
    ok(&d.cli(&[
        "create",
        "fails",
        "--restart-on-fail",
        "--mem=8",
        &unit(),
        "exit",
        "3",
    ]));
    ok(&d.cli(&[
        "create",
        "one",
        "--restart-on-fail",
        "--mem=8",
        &unit(),
        "exit",
        "1",
    ]));
    ok(&d.cli(&["create", "plain", "--mem=8", &unit(), "exit", "3"]));
    ok(&d.cli(&[
        "create",
        "listed",
        "--restart-on-fail=4,5",
        "--mem=8",
        &unit(),
        "exit",
        "3",
    ]));
    d.wait_for(30, "four restarts of 'fails'", || {
        list(&d).get("fails").is_some_and(|u| u.2 >= 4)
    });
    // Each instance printed its line; the gaps between them grow (200,
    // 400, 800 ms of backoff, plus a boot each).
    let r = d.cli(&["console", "fails", "--timestamps"]);
    let times: Vec<std::time::SystemTime> = ok(&r)
        .lines()
        .filter(|l| l.ends_with("exiting with 3"))
        .map(|l| humantime::parse_rfc3339(l.split(' ').next().unwrap()).unwrap())
        .collect();
    assert!(times.len() >= 4, "{r:?}");
    let gaps: Vec<Duration> = times
        .windows(2)
        .map(|w| w[1].duration_since(w[0]).unwrap())
        .collect();
    for w in gaps.windows(2) {
        assert!(w[1] > w[0], "delays must grow: {gaps:?}");
    }
    assert!(gaps[0] >= Duration::from_millis(200), "{gaps:?}");

    let all = list(&d);
    for n in ["one", "plain", "listed"] {
        assert_eq!(all[n].0, "exited", "{n}: {all:?}");
        assert_eq!(all[n].2, 0, "{n} is never restarted: {all:?}");
    }
    assert_eq!(all["one"].3, "exit 1");

    // A destroyed unikernel is not restarted, and leaves nothing behind.
    ok(&d.cli(&[
        "create",
        "ticker",
        "--restart-on-fail",
        "--mem=8",
        &unit(),
        "tick",
        "50",
    ]));
    let pid = list(&d)["ticker"].1.unwrap();
    ok(&d.cli(&["destroy", "ticker"]));
    assert!(!alive(pid), "destroy reaps the process");
    std::thread::sleep(Duration::from_millis(800));
    assert!(!list(&d).contains_key("ticker"));
    assert!(d.unit_pids().iter().all(|p| *p != pid));
    assert!(!d.runtime_dir().join("units/u-ticker").exists());
    let show = d.cli(&["policy", "show", "--daemon"]);
    assert!(
        ok(&show).contains("unikernels 0/"),
        "no admission entry is left: {show:?}"
    );
}

#[test]
fn restart_stops_and_reaps_the_old_instance_first() {
    if !kvm() {
        return;
    }
    let d = Daemon::started("d-restart-cmd", &[]);
    // Room for one unikernel: the new instance is admitted only if the
    // old one is gone, admission entry and all.
    ok(&d.cli(&["policy", "set", "one", "--unikernels", "1", "--daemon"]));
    ok(&d.cli(&["create", "one:web", "--mem=8", &unit(), "tick", "100"]));
    let old = list(&d)["one:web"].1.unwrap();
    d.wait_for(20, "the first instance ticks", || {
        ticks(&console(&d, "one:web")) >= 1
    });
    let r = d.cli(&["restart", "one:web"]);
    assert_eq!(r.status, 0, "{r:?}\n{}", d.log());
    assert!(!alive(old), "the old instance is reaped, not a zombie");
    let u = &list(&d)["one:web"];
    assert_eq!(u.0, "running");
    assert_ne!(u.1, Some(old));
    assert_eq!(u.2, 1, "one restart counted");
    d.wait_for(20, "the new instance ticks", || {
        console(&d, "one:web")
            .iter()
            .filter(|l| *l == "tick 1")
            .count()
            == 2
    });
}

#[test]
fn access_is_by_subtree() {
    if !kvm() {
        return;
    }
    let d = Daemon::started("d-access", &[]);
    // The image where uid 4242 can read it.
    let image = d.dir.path("unit.hvt");
    std::fs::copy(guest("unit"), &image).unwrap();
    let image = image.display().to_string();
    ok(&d.cli(&["policy", "set", "alice", "--users", "4242", "--daemon"]));
    ok(&d.cli(&["policy", "set", "carol", "--mem", "64", "--daemon"]));
    // tt-host itself where uid 4242 can run it (the checkout may be in a
    // directory it cannot traverse, such as /root).
    let client = d.dir.path("tt-host");
    std::fs::copy(tt_host(), &client).unwrap();
    let as_user = |args: &[&str]| as_uid_4242(&d, &client, args);
    let r = as_user(&["create", "alice:bob:web", "--mem=8", &image, "tick", "200"]);
    assert_eq!(r.status, 0, "{r:?}\n{}", d.log());
    let r = as_user(&["create", "carol:web", "--mem=8", &image, "tick", "200"]);
    assert_eq!(r.status, 1, "{r:?}");
    assert!(r.stderr.contains("carol"), "names the path: {r:?}");
    let r = as_user(&["policy", "set", "alice", "--mem", "4096", "--daemon"]);
    assert_eq!(r.status, 1, "{r:?}");
    assert!(r.stderr.contains("alice"), "{r:?}");
    let r = as_user(&["policy", "set", "alice:bob", "--mem", "512", "--daemon"]);
    assert_eq!(r.status, 0, "{r:?}");
    ok(&d.cli(&["create", "carol:db", "--mem=8", &image, "tick", "200"]));
    let r = as_user(&["list"]);
    assert!(ok(&r).contains("alice:bob:web"), "{r:?}");
    assert!(
        !ok(&r).contains("carol"),
        "only its subtree is listed: {r:?}"
    );
    let r = as_user(&["destroy", "carol:db"]);
    assert_eq!(r.status, 1, "{r:?}");
    let r = as_user(&["console", "alice:bob:web"]);
    assert_eq!(r.status, 0, "{r:?}");
    // The files of a create are opened with the caller's rights.
    let secret = d.dir.path("secret.hvt");
    std::fs::copy(guest("unit"), &secret).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let r = as_user(&[
        "create",
        "alice:bob:x",
        "--mem=8",
        &secret.display().to_string(),
        "idle",
    ]);
    assert_eq!(r.status, 1, "{r:?}");
    assert!(r.stderr.contains("secret.hvt"), "{r:?}");
    assert!(
        !list(&d).contains_key("alice:bob:x"),
        "a failed create is not kept"
    );
}

#[test]
fn without_a_daemon_the_cli_says_so_in_one_line() {
    let r = tt_tests::tt(&["list", "--socket=/nonexistent/control.sock"]);
    tt_tests::assert_error(&r, "cannot reach the daemon at /nonexistent/control.sock");
    let r = tt_tests::tt(&[
        "create",
        "web",
        "--socket=/nonexistent/s",
        "--no-seccomp",
        "img",
    ]);
    tt_tests::assert_error(&r, "--no-seccomp cannot be given to create");
    let r = tt_tests::tt(&["console", "web", "--last=3", "--since=5m"]);
    tt_tests::assert_error(&r, "give --since or --last, not both");
}

#[test]
fn a_reboot_brings_back_what_was_created() {
    if !kvm() {
        return;
    }
    let mut d = Daemon::started("d-reboot", &[]);
    for n in ["a", "b", "c"] {
        ok(&d.cli(&["create", n, "--mem=8", &unit(), "tick", "100"]));
    }
    ok(&d.cli(&["destroy", "b"]));
    let before = list(&d);
    // A reboot: everything stops, and /run is empty again.
    d.stop();
    d.kill_units();
    std::fs::remove_dir_all(d.runtime_dir()).unwrap();
    d.start();
    // Started again at the daemon's start; running once each has booted.
    d.wait_for(20, "both running again", || {
        list(&d).values().all(|u| u.0 == "running")
    });
    let after = list(&d);
    assert_eq!(after.keys().collect::<Vec<_>>(), ["a", "c"], "{}", d.log());
    for (n, u) in &after {
        assert_eq!(u.0, "running", "{n}: {after:?}");
        assert_ne!(u.1, before[n].1, "{n} runs as a new process");
    }
    d.wait_for(20, "the consoles start again", || {
        ticks(&console(&d, "a")) >= 2
    });
}

/// One raw request on the socket; the reply's JSON.
fn raw(d: &Daemon, frame: &[u8]) -> String {
    let mut s = std::os::unix::net::UnixStream::connect(d.socket()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(frame).unwrap();
    let mut len = [0u8; 4];
    s.read_exact(&mut len).unwrap();
    let mut body = vec![0; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut body).unwrap();
    String::from_utf8(body).unwrap()
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut f = (body.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(body);
    f
}

#[test]
fn a_hundred_clients_at_once_and_bad_requests() {
    if !kvm() {
        return;
    }
    let d = Daemon::started("d-clients", &[]);
    ok(&d.cli(&["create", "web", "--mem=8", &unit(), "idle"]));
    let replies: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..100)
            .map(|i| {
                let d = &d;
                s.spawn(move || {
                    let body = match i % 4 {
                        0 => r#"{"v":1,"op":"list"}"#.to_string(),
                        1 => r#"{"v":1,"op":"info","name":"web"}"#.to_string(),
                        2 => r#"{"v":1,"op":"stats","name":"web"}"#.to_string(),
                        _ => r#"{"v":1,"op":"info","name":"nobody"}"#.to_string(),
                    };
                    raw(d, &frame(body.as_bytes()))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, r) in replies.iter().enumerate() {
        let want = [
            "\"list\"",
            "\"info\"",
            "\"stats\"",
            "no unikernel named nobody",
        ][i % 4];
        assert!(r.contains(want), "client {i}: {r}");
    }
    // Oversized, malformed, wrong version: an error reply each, and the
    // daemon goes on.
    let big = raw(&d, &(2u32 << 20).to_be_bytes());
    assert!(
        big.contains("error") && big.contains("longer than"),
        "{big}"
    );
    let bad = raw(&d, &frame(b"{not json"));
    assert!(bad.contains("malformed request"), "{bad}");
    let v = raw(&d, &frame(br#"{"v":9,"op":"list"}"#));
    assert!(v.contains("version 9"), "{v}");
    // A client that goes away in the middle of a frame.
    {
        let mut s = std::os::unix::net::UnixStream::connect(d.socket()).unwrap();
        s.write_all(&[0, 0, 1]).unwrap();
    }
    assert!(list(&d).contains_key("web"), "the daemon still serves");
}

/// The resident memory of `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[test]
fn ten_console_followers_of_a_chatty_guest_in_bounded_memory() {
    if !kvm() {
        return;
    }
    let d = Daemon::started("d-console", &[]);
    ok(&d.cli(&[
        "create",
        "chatty",
        "--mem=8",
        &unit(),
        "chatty",
        "1000",
        "2",
    ]));
    let daemon = d.child.as_ref().unwrap().id();
    let rss_before = rss_kib(daemon);
    let mut followers: Vec<std::process::Child> = (0..10)
        .map(|_| {
            Command::new(tt_host())
                .args(["console", "chatty", "--follow"])
                .env("TT_HOST_SOCKET", d.socket())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let counters: Vec<_> = followers
        .iter_mut()
        .map(|c| {
            let mut out = c.stdout.take().unwrap();
            std::thread::spawn(move || {
                let mut n = 0u64;
                let mut buf = vec![0u8; 1 << 16];
                while let Ok(k) = out.read(&mut buf) {
                    if k == 0 {
                        break;
                    }
                    n += k as u64;
                }
                n
            })
        })
        .collect();
    let mut peak = 0;
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(5) {
        peak = peak.max(rss_kib(daemon));
        std::thread::sleep(Duration::from_millis(100));
    }
    for c in &mut followers {
        let _ = c.kill();
        let _ = c.wait();
    }
    let got: Vec<u64> = counters.into_iter().map(|h| h.join().unwrap()).collect();
    for g in &got {
        assert!(*g > 200_000, "every follower got the stream: {got:?}");
    }
    assert!(
        peak < rss_before + 16 * 1024 && peak < 64 * 1024,
        "daemon RSS {rss_before} KiB before, {peak} KiB peak with 10 followers"
    );
    // The console's file is its ring, of a fixed size.
    let size = std::fs::metadata(d.runtime_dir().join("units/u-chatty/console"))
        .unwrap()
        .len();
    assert!(size <= (1 << 20) + 4096, "{size}");
}

#[test]
fn a_readopted_unikernel_s_exit_still_drives_its_restart() {
    if !kvm() {
        return;
    }
    let mut d = Daemon::started("d-adopt-exit", &["--restart-backoff=100,1000"]);
    // Both exit 0 after a while, which --restart-on-fail=0 restarts:
    // 'early' while the daemon is away, 'late' after it re-adopted it.
    ok(&d.cli(&[
        "create",
        "early",
        "--restart-on-fail=0",
        "--mem=8",
        &unit(),
        "tick",
        "200",
        "4",
    ]));
    ok(&d.cli(&[
        "create",
        "late",
        "--restart-on-fail=0",
        "--mem=8",
        &unit(),
        "tick",
        "300",
        "12",
    ]));
    d.kill9();
    std::thread::sleep(Duration::from_millis(2000));
    d.start();
    let l = list(&d);
    assert_eq!(l["late"].0, "running", "re-adopted: {l:?}\n{}", d.log());
    d.wait_for(30, "both restarted after exit 0", || {
        let l = list(&d);
        l["early"].2 >= 1 && l["late"].2 >= 1
    });
    let l = list(&d);
    assert_eq!(l["late"].3, "exit 0", "the end it recorded itself: {l:?}");
}

#[test]
fn counters_in_prometheus_format_on_the_cli_and_the_metrics_listener() {
    if !kvm() {
        return;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let d = Daemon::started("d-metrics", &[&format!("--metrics={port}")]);
    ok(&d.cli(&["create", "web", "--mem=8", &unit(), "tick", "50"]));
    d.wait_for(20, "some exits", || ticks(&console(&d, "web")) >= 3);
    let r = d.cli(&["stats", "--prometheus"]);
    let text = ok(&r);
    assert!(
        text.contains("# TYPE tt_host_unikernel_vm_exits_total counter"),
        "{text}"
    );
    let exits: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("tt_host_unikernel_vm_exits_total{name=\"web\"} "))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(exits > 3, "{text}");
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut http = String::new();
    s.read_to_string(&mut http).unwrap();
    assert!(http.starts_with("HTTP/1.1 200 OK"), "{http}");
    assert!(
        http.contains("tt_host_unikernel_up{name=\"web\"} 1"),
        "{http}"
    );
}

/// Pause, resume and snapshot reach a unikernel through the daemon, by
/// name: within the caller's subtree only, and a snapshot's files are
/// written with the caller's rights (a directory it cannot write is
/// refused, one it can is written and owned by it). The snapshot restores.
#[test]
fn pause_resume_and_snapshot_go_through_the_daemon_with_the_callers_rights() {
    if !kvm() {
        return;
    }
    let d = Daemon::started("d-control", &[]);
    let image = d.dir.path("unit.hvt");
    std::fs::copy(guest("unit"), &image).unwrap();
    let image = image.display().to_string();
    ok(&d.cli(&["policy", "set", "alice", "--users", "4242", "--daemon"]));
    let client = d.dir.path("tt-host");
    std::fs::copy(tt_host(), &client).unwrap();
    let as_user = |args: &[&str]| as_uid_4242(&d, &client, args);
    ok(&as_user(&[
        "create",
        "alice:web",
        "--mem=8",
        &image,
        "tick",
        "100",
    ]));
    ok(&d.cli(&["create", "bob", "--mem=8", &image, "tick", "100"]));
    d.wait_for(20, "alice:web ticked", || {
        ticks(&console(&d, "alice:web")) >= 2
    });

    assert_eq!(ok(&as_user(&["pause", "alice:web"])).trim(), "paused");
    assert_eq!(ok(&as_user(&["status", "alice:web"])).trim(), "paused");
    let held = ticks(&console(&d, "alice:web"));
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(
        ticks(&console(&d, "alice:web")),
        held,
        "no tick while paused"
    );
    let r = as_user(&["pause", "bob"]);
    assert_eq!(r.status, 1, "outside alice's subtree: {r:?}");

    // A directory uid 4242 cannot write: refused, nothing written.
    let root_only = d.dir.path("root-only");
    std::fs::create_dir(&root_only).unwrap();
    let r = as_user(&[
        "snapshot",
        "alice:web",
        &root_only.join("s").display().to_string(),
    ]);
    assert_eq!(r.status, 1, "{r:?}");
    assert!(r.stderr.contains("alice:web"), "{r:?}");
    assert!(!root_only.join("s").exists());
    // One it can: written, owned by it.
    let mine = d.dir.path("mine");
    std::fs::create_dir(&mine).unwrap();
    std::os::unix::fs::chown(&mine, Some(4242), Some(4242)).unwrap();
    let snap = mine.join("snap");
    let r = as_user(&["snapshot", "alice:web", &snap.display().to_string()]);
    assert!(ok(&r).contains("snapshot written"), "{r:?}");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(snap.join("state")).unwrap().uid(), 4242);
    assert_eq!(ok(&as_user(&["resume", "alice:web"])).trim(), "resumed");
    d.wait_for(20, "alice:web ticks again", || {
        ticks(&console(&d, "alice:web")) > held
    });

    // The snapshot restores (by root, outside the daemon) and ticks on
    // from where it was.
    ok(&d.cli(&["destroy", "alice:web"]));
    let mut restore = Command::new(tt_host());
    restore
        .arg("restore")
        .arg(format!("--state-dir={}", d.state_dir().display()))
        .arg(&snap)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = restore.spawn().unwrap();
    let pid = child.id();
    let mut out = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let mut buf = [0u8; 256];
        while !s.contains(&format!("tick {}\n", held + 2)) {
            match out.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => s.push_str(&String::from_utf8_lossy(&buf[..n])),
            }
        }
        s
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while !reader.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    kill(pid, libc::SIGKILL);
    let _ = child.wait();
    let s = reader.join().unwrap();
    let first: u64 = s
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("tick "))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert_eq!(first, held + 1, "the restore ticks on: {s:?}");
}
