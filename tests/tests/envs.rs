//! Environments end to end (issue 21): a real daemon in a network
//! namespace of its own (its bridges, TAPs and nftables tables go with
//! the namespace, also when a test fails), real guests, real templates.
//!
//! The guest is `counter` (tests/guest_output.rs): it prints `count K`
//! every few ms and records K on its disk "disk", so a unikernel that was
//! saved and resumed is told from one that booted again (a second
//! `count 1`).

use std::path::PathBuf;
use std::time::{Duration, Instant};
use tt_tests::daemon::Daemon;
use tt_tests::{guest, kvm, Run};

#[track_caller]
fn ok(r: &Run) -> &str {
    assert_eq!(r.status, 0, "{r:?}");
    &r.stdout
}

#[track_caller]
fn refused<'a>(r: &'a Run, needle: &str) -> &'a str {
    assert_ne!(r.status, 0, "expected a refusal: {r:?}");
    assert!(r.stderr.contains(needle), "expected '{needle}': {r:?}");
    &r.stderr
}

/// 64 KiB (128 sectors: counter's disk) starting with `marker`.
fn disk_bytes(marker: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; 64 << 10];
    b[..marker.len()].copy_from_slice(marker);
    b
}

fn daemon(tag: &str) -> Daemon {
    Daemon::started_in_netns(tag, &["--env-mgmt-interval=300"])
}

/// A template `name` holding [`disk_bytes`]`(name)`.
fn template(d: &Daemon, name: &str) -> Vec<u8> {
    let bytes = disk_bytes(name.as_bytes());
    let f = d.dir.file(&format!("{name}.img"), &bytes);
    ok(&d.cli(&["template", "add", name, f.to_str().unwrap()]));
    bytes
}

/// A counter unikernel's `tt-host create` arguments (without NAME).
fn counter(extra: &[&str]) -> String {
    let mut words: Vec<String> = vec!["--mem=32".into()];
    words.extend(extra.iter().map(|s| s.to_string()));
    words.push(guest("counter").display().to_string());
    words.push("--".into());
    words.extend(["count".into(), "20".into()]);
    words.join(" ")
}

/// The net guest's `tt-host create` arguments (without NAME): on the
/// env's network as `service0`, with its address as `ip=A.B.C.D/N` and
/// `gw=`, and `args` for the guest.
fn net_guest(extra: &[&str], args: &[&str]) -> String {
    let mut words: Vec<String> = vec![
        "--mem=32".into(),
        "--env-net=service0".into(),
        "--ip-arg=ip={ip}/{prefix}".into(),
        "--ip-arg=gw={gateway}".into(),
    ];
    words.extend(extra.iter().map(|s| s.to_string()));
    words.push(guest("net").display().to_string());
    words.push("--".into());
    words.extend(args.iter().map(|s| s.to_string()));
    words.join(" ")
}

/// Write a units file: one `NAME ARGS` line per unit.
fn units_file(d: &Daemon, lines: &[String]) -> String {
    let f = d.dir.file("units", lines.join("\n").as_bytes());
    f.display().to_string()
}

/// The `env list` row of `env`, if it is listed.
fn env_row(d: &Daemon, env: &str) -> Option<String> {
    let r = d.cli(&["env", "list"]);
    ok(&r)
        .lines()
        .find(|l| l.split_whitespace().next() == Some(env))
        .map(String::from)
}

/// The state `list` shows for unikernel `name`.
fn state(d: &Daemon, name: &str) -> Option<String> {
    let r = d.cli(&["list"]);
    ok(&r)
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().nth(1).map(String::from))
}

/// The counts unikernel `name` printed so far.
fn counts(d: &Daemon, name: &str) -> Vec<u64> {
    let r = d.cli(&["console", name]);
    r.stdout
        .lines()
        .filter_map(|l| l.trim().strip_prefix("count ")?.parse().ok())
        .collect()
}

/// The runtime image made for device `dev` of unikernel `name` (from
/// its command line, as `info` shows it).
fn runtime_image(d: &Daemon, name: &str, dev: &str) -> PathBuf {
    let r = d.cli(&["info", name]);
    let needle = format!("--block:{dev}=");
    let path = ok(&r)
        .split_whitespace()
        .find_map(|w| w.strip_prefix(&needle))
        .unwrap_or_else(|| panic!("no {needle} in {r:?}"));
    PathBuf::from(path)
}

/// The names of the network interfaces in the daemon's namespace.
fn links(d: &Daemon) -> Vec<String> {
    let r = tt_tests::tt_with(d.command("/bin/ls").arg("/sys/class/net"));
    ok(&r).split_whitespace().map(String::from).collect()
}

/// The nftables tables in the daemon's namespace.
fn nft_tables(d: &Daemon) -> String {
    let r = tt_tests::tt_with(d.command("nft").args(["list", "tables"]));
    assert_eq!(
        r.status, 0,
        "nft is needed (apt-get install nftables): {r:?}"
    );
    r.stdout
}

fn runtime_images(d: &Daemon) -> Vec<String> {
    std::fs::read_dir(d.state_dir().join("images/runtime"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn an_env_ends_on_time_with_its_unikernels_and_kept_images_stay() {
    if !kvm() {
        return;
    }
    let d = daemon("env-end");
    template(&d, "base");
    let units = units_file(
        &d,
        &[
            format!(
                "lab:a {}",
                counter(&["--disk-from:disk=base", "--keep-image"])
            ),
            format!("lab:b {}", counter(&["--disk-from:disk=base"])),
            format!("lab:c {}", net_guest(&["--port=8080:7"], &["tcp-echo=7"])),
        ],
    );
    let t = Instant::now();
    let r = d.cli(&[
        "env",
        "create",
        "lab",
        "--lifetime=3s",
        &format!("--units={units}"),
    ]);
    assert!(ok(&r).contains("3 unikernel(s)"), "{r:?}");
    let row = env_row(&d, "lab").expect("listed");
    assert!(row.contains("running"), "{row}");
    assert_eq!(d.unit_pids().len(), 3);
    let kept = runtime_image(&d, "lab:a", "disk");
    let dropped = runtime_image(&d, "lab:b", "disk");
    assert!(kept.exists() && dropped.exists());
    assert!(links(&d).iter().any(|l| l == "tte0"), "{:?}", links(&d));
    assert!(links(&d).iter().any(|l| l == "tte0u0"), "{:?}", links(&d));
    assert!(nft_tables(&d).contains("tt-env-0"));

    d.wait_for(15, "the env's end", || env_row(&d, "lab").is_none());
    let took = t.elapsed();
    assert!(
        took >= Duration::from_secs(3) - Duration::from_millis(200),
        "ended early: {took:?}"
    );
    d.wait_for(5, "its processes' end", || d.unit_pids().is_empty());
    assert!(ok(&d.cli(&["list"])).lines().count() <= 1, "units remain");
    assert!(kept.exists(), "the kept image is gone");
    assert!(!dropped.exists(), "the other image stayed");
    assert_eq!(runtime_images(&d).len(), 1, "{:?}", runtime_images(&d));
    assert!(
        !links(&d).iter().any(|l| l.starts_with("tte")),
        "{:?}",
        links(&d)
    );
    assert!(!nft_tables(&d).contains("tt-env"), "{}", nft_tables(&d));
    assert!(d.log().contains("lifetime is over"), "{}", d.log());
}

#[test]
fn extend_stop_and_start_bring_the_same_unikernels_back_and_a_stopped_env_frees_admission() {
    if !kvm() {
        return;
    }
    let mut d = daemon("env-stop");
    // Room for two 32 MiB unikernels below 'lab'.
    ok(&d.cli(&["policy", "set", "lab", "--mem", "64", "--daemon"]));
    let units = units_file(
        &d,
        &[
            format!("lab:a {}", counter(&[])),
            format!("lab:b {}", counter(&[])),
        ],
    );
    let (a, b) = (
        d.dir.file("a.img", &disk_bytes(b"a")),
        d.dir.file("b.img", &disk_bytes(b"b")),
    );
    let units = std::fs::read_to_string(&units)
        .unwrap()
        .replace(
            "lab:a --mem=32",
            &format!("lab:a --mem=32 --block:disk={}", a.display()),
        )
        .replace(
            "lab:b --mem=32",
            &format!("lab:b --mem=32 --block:disk={}", b.display()),
        );
    let units = d.dir.file("units2", units.as_bytes());
    ok(&d.cli(&[
        "env",
        "create",
        "lab:env",
        "--lifetime=60s",
        &format!("--units={}", units.display()),
    ]));
    let extra = d.dir.file("x.img", &disk_bytes(b"x"));
    let create_x = |d: &Daemon| {
        d.cli(&[
            "create",
            "lab:x",
            "--mem=32",
            &format!("--block:disk={}", extra.display()),
            guest("counter").to_str().unwrap(),
            "--",
            "count",
            "20",
        ])
    };
    refused(&create_x(&d), "mem");

    // extend moves the end; a second operation at once is refused.
    let before = env_row(&d, "lab:env").unwrap();
    let r = d.cli(&["env", "extend", "lab:env", "1h"]);
    assert!(ok(&r).contains("now ends"), "{r:?}");
    refused(
        &d.cli(&["env", "extend", "lab:env", "1h"]),
        "one management operation per 300 ms",
    );
    let after = env_row(&d, "lab:env").unwrap();
    assert_ne!(before, after, "the end did not move");

    d.wait_for(10, "a few counts", || counts(&d, "lab:a").len() >= 5);
    std::thread::sleep(Duration::from_millis(350));
    let r = d.cli(&["env", "stop", "lab:env"]);
    assert!(ok(&r).contains("2 of 2 unikernel(s) saved"), "{r:?}");
    assert!(d.unit_pids().is_empty(), "stopped units still run");
    assert_eq!(state(&d, "lab:a").as_deref(), Some("stopped"));
    assert!(env_row(&d, "lab:env").unwrap().contains("stopped"));
    let stopped_at = *counts(&d, "lab:a").last().unwrap();

    // The room is free while it is stopped.
    let r = create_x(&d);
    assert!(ok(&r).contains("created"), "{r:?}");
    ok(&d.cli(&["destroy", "lab:x"]));

    // A stopped env survives a daemon restart as it is.
    d.stop();
    d.start();
    assert_eq!(state(&d, "lab:a").as_deref(), Some("stopped"));
    assert!(d.unit_pids().is_empty());

    std::thread::sleep(Duration::from_millis(350));
    let r = d.cli(&["env", "start", "lab:env"]);
    assert!(ok(&r).contains("2 unikernel(s) running"), "{r:?}");
    assert_eq!(d.unit_pids().len(), 2);
    d.wait_for(10, "counting on", || {
        counts(&d, "lab:a")
            .last()
            .is_some_and(|c| *c > stopped_at + 2)
    });
    let c = counts(&d, "lab:a");
    assert_eq!(
        c.iter().filter(|k| **k == 1).count(),
        1,
        "lab:a booted again instead of resuming: {c:?}"
    );
    // No tick lost or repeated across the stop.
    for w in c.windows(2) {
        assert_eq!(w[1], w[0] + 1, "{c:?}");
    }
    refused(&create_x(&d), "mem");
}

#[test]
fn a_templates_copy_is_its_own_and_snapshots_revert_the_exact_bytes_and_expire() {
    if !kvm() {
        return;
    }
    let d = daemon("env-disk");
    let original = template(&d, "base");
    let tpl = d.state_dir().join("images/templates/base.img");
    ok(&d.cli(&["env", "create", "lab", "--lifetime=1h"]));
    ok(&d.cli(&[
        "create",
        "lab:a",
        "--env=lab",
        "--disk-from:disk=base",
        "--mem=32",
        guest("counter").to_str().unwrap(),
        "--",
        "count",
        "20",
    ]));
    let image = runtime_image(&d, "lab:a", "disk");
    d.wait_for(10, "records on the disk", || counts(&d, "lab:a").len() >= 5);
    assert_eq!(
        std::fs::read(&tpl).unwrap(),
        original,
        "the template changed"
    );
    assert_ne!(
        std::fs::read(&image).unwrap(),
        original,
        "the guest's writes are not on its image"
    );

    let r = d.cli(&["disk", "snapshot", "lab:a", "s1"]);
    assert!(ok(&r).contains("snapshot s1 of lab:a taken"), "{r:?}");
    let snap = std::fs::read(
        d.state_dir()
            .join("images/snapshots")
            .join(image.file_name().unwrap())
            .join("s1.img"),
    )
    .unwrap();
    // The snapshot is consistent: every count record in it was printed.
    let printed = counts(&d, "lab:a");
    for sector in snap.chunks(512) {
        if let Ok(k) = tt_tests::guest_output::counter_record(sector) {
            assert!(printed.contains(&k), "record {k} was never acknowledged");
        }
    }
    ok(&d.cli(&["disk", "snapshot", "lab:a", "short", "--life-time=1s"]));
    let listed = d.cli(&["disk", "snapshots", "lab:a"]);
    assert!(ok(&listed).contains("s1") && listed.stdout.contains("short"));

    // Saved with its env, then reverted: the image is the snapshot's.
    d.wait_for(10, "more counts", || {
        counts(&d, "lab:a").len() > printed.len() + 3
    });
    std::thread::sleep(Duration::from_millis(350));
    ok(&d.cli(&["env", "stop", "lab"]));
    assert_ne!(std::fs::read(&image).unwrap(), snap, "nothing to revert");
    let r = d.cli(&["disk", "revert", "lab:a", "s1"]);
    assert!(ok(&r).contains("reverted"), "{r:?}");
    assert!(
        std::fs::read(&image).unwrap() == snap,
        "not the snapshot's bytes"
    );

    // The short-lived one is removed by the daemon.
    d.wait_for(10, "the expiry", || {
        !ok(&d.cli(&["disk", "snapshots", "lab:a"])).contains("short")
    });
    assert!(ok(&d.cli(&["disk", "snapshots", "lab:a"])).contains("s1"));
}

#[test]
fn a_daemon_killed_in_the_middle_of_an_envs_creation_leaves_it_whole_or_not_at_all() {
    if !kvm() {
        return;
    }
    for attempt in 0..2 {
        let mut d = daemon(&format!("env-crash{attempt}"));
        template(&d, "base");
        let lines: Vec<String> = (0..6)
            .map(|i| format!("lab:u{i} {}", counter(&["--disk-from:disk=base"])))
            .collect();
        let units = units_file(&d, &lines);
        let mut cmd = d.command(tt_tests::tt_host());
        cmd.args(["env", "create", "lab", "--lifetime=1h"])
            .arg(format!("--units={units}"))
            .env("TT_HOST_SOCKET", d.socket())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let mut client = cmd.spawn().unwrap();
        // Kill it as the first unikernel starts (attempt 0) or a little
        // later (attempt 1).
        let t = Instant::now();
        while d.unit_pids().len() <= attempt * 2 && t.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(2));
        }
        let up = d.unit_pids().len();
        d.kill9();
        let _ = client.wait();
        d.start();
        let outcome = env_row(&d, "lab");
        eprintln!("attempt {attempt}: killed with {up} unikernel(s) up; then: {outcome:?}");
        match outcome {
            Some(row) => {
                assert!(row.contains("running"), "{row}");
                d.wait_for(10, "all six", || d.unit_pids().len() == 6);
            }
            None => {
                d.wait_for(10, "no unikernel", || d.unit_pids().is_empty());
                assert!(ok(&d.cli(&["list"])).lines().count() <= 1);
                assert!(runtime_images(&d).is_empty(), "{:?}", runtime_images(&d));
                assert!(
                    !links(&d).iter().any(|l| l.starts_with("tte")),
                    "{:?}",
                    links(&d)
                );
                assert!(!nft_tables(&d).contains("tt-env"));
                assert!(!d.state_dir().join("envs/e0").exists(), "saved guests left");
                assert!(d.log().contains("cut short"), "{}", d.log());
            }
        }
    }
}

/// The console lines of unikernel `name` so far.
fn console(d: &Daemon, name: &str) -> String {
    d.cli(&["console", name]).stdout
}

/// An "uplink" in the daemon's namespace standing for the outside world:
/// TAP `up0` (up, nothing behind it) with 192.0.2.1/24 and 192.0.2.2/24,
/// addresses of the host itself, outside every env.
fn uplink(d: &Daemon) -> &tt_tests::netns::Netns {
    let ns = d.netns.as_ref().unwrap();
    ns.add_tap("up0");
    ns.set_addr("up0", [192, 0, 2, 1], 24);
    ns.set_up("up0", true);
    ns
}

/// A UDP echo server on `addr` in `ns`, counting what it got.
fn udp_echo(
    ns: &tt_tests::netns::Netns,
    addr: &str,
) -> std::sync::Arc<std::sync::atomic::AtomicU32> {
    let sock = ns.run(|| std::net::UdpSocket::bind(addr)).unwrap();
    let got = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let g = got.clone();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        // Ends with the test process; answers whatever comes.
        loop {
            if let Ok((n, from)) = sock.recv_from(&mut buf) {
                g.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let _ = sock.send_to(&buf[..n], from);
            }
        }
    });
    got
}

/// A TCP connection from the daemon's namespace to `addr`, a line sent
/// and its echo read back.
fn tcp_echo(ns: &tt_tests::netns::Netns, addr: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let addr: std::net::SocketAddr = addr.parse().unwrap();
    let mut s =
        ns.run(|| std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(b"hello through the forward\n")?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

#[test]
fn a_port_forward_reaches_a_guest_and_deny_outgoing_keeps_the_env_in() {
    if !kvm() {
        return;
    }
    let d = daemon("env-net");
    let ns = uplink(&d);
    let outside = udp_echo(ns, "192.0.2.1:9000");

    // Outgoing allowed: the probe to the host's outside address is
    // answered. (So the denial below is the rules' doing.)
    let units = units_file(
        &d,
        &[format!(
            "open:p {}",
            net_guest(&[], &["probe=192.0.2.1:9000"])
        )],
    );
    ok(&d.cli(&[
        "env",
        "create",
        "open",
        "--lifetime=1h",
        &format!("--units={units}"),
    ]));
    d.wait_for(10, "an answer from outside", || {
        console(&d, "open:p").contains("net: probe reply from 192.0.2.1:9000")
    });
    ok(&d.cli(&["env", "destroy", "open"]));
    let before = outside.load(std::sync::atomic::Ordering::SeqCst);
    assert!(before > 0);

    // Denied: web serves through a forward; p probes the outside and its
    // neighbour web (UDP echo), and only the neighbour answers.
    let units = units_file(
        &d,
        &[
            format!(
                "lab:web {}",
                net_guest(
                    &["--port=8080:7", "--port=8081:7/udp"],
                    &["tcp-echo=7", "echo=7"]
                )
            ),
            format!("lab:p {}", net_guest(&[], &["probe=192.0.2.1:9000"])),
        ],
    );
    let r = d.cli(&[
        "env",
        "create",
        "lab",
        "--lifetime=1h",
        "--deny-outgoing",
        &format!("--units={units}"),
    ]);
    ok(&r);
    // The forward: from the host's outside address to web's TCP echo.
    let mut echoed = Err(std::io::Error::other("not tried"));
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(10) {
        echoed = tcp_echo(ns, "192.0.2.1:8080");
        if echoed.is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        echoed.as_deref().ok(),
        Some("hello through the forward\n"),
        "{echoed:?}\n{}",
        console(&d, "lab:web")
    );
    // p sends for a while: nothing reaches the outside, nothing answers.
    d.wait_for(10, "probes sent", || {
        console(&d, "lab:p").contains("net: probe sent 5")
    });
    assert_eq!(
        outside.load(std::sync::atomic::Ordering::SeqCst),
        before,
        "a probe got out"
    );
    assert!(!console(&d, "lab:p").contains("probe reply"));
    ok(&d.cli(&["destroy", "lab:p"]));

    // Inside the env, traffic passes: q probes web's UDP echo.
    ok(&d.cli(&[
        "create",
        "lab:q",
        "--env=lab",
        "--mem=32",
        "--env-net=service0",
        "--ip-arg=ip={ip}/{prefix}",
        "--ip-arg=gw={gateway}",
        guest("net").to_str().unwrap(),
        "--",
        "probe=10.213.0.2:7",
    ]));
    d.wait_for(10, "an answer from inside the env", || {
        console(&d, "lab:q").contains("net: probe reply from 10.213.0.2:7")
    });

    // The forward goes with its unikernel.
    ok(&d.cli(&["destroy", "lab:web"]));
    assert!(
        tcp_echo(ns, "192.0.2.1:8080").is_err(),
        "the forward stayed"
    );
    let table = tt_tests::tt_with(d.command("nft").args(["list", "table", "inet", "tt-env-0"]));
    assert!(!ok(&table).contains("8080"), "{table:?}");
    ok(&d.cli(&["env", "destroy", "lab"]));
    assert!(
        !links(&d).iter().any(|l| l.starts_with("tte")),
        "{:?}",
        links(&d)
    );
    assert!(!nft_tables(&d).contains("tt-env"), "{}", nft_tables(&d));
}

#[test]
fn an_envs_bridge_must_be_one_its_owners_policy_allows() {
    if !kvm() {
        return;
    }
    let d = daemon("env-bridges");
    ok(&d.cli(&[
        "policy",
        "set",
        ":",
        "--bridges",
        "labbr,otherbr",
        "--daemon",
    ]));
    ok(&d.cli(&["policy", "set", "lab", "--bridges", "labbr", "--daemon"]));
    let units = units_file(&d, &[format!("lab:web {}", net_guest(&[], &[]))]);
    let units = format!("--units={units}");
    let r = d.cli(&[
        "env",
        "create",
        "lab:e",
        "--lifetime=1h",
        "--bridge=otherbr",
        &units,
    ]);
    refused(&r, "otherbr");
    assert!(env_row(&d, "lab:e").is_none(), "a refused env stayed");
    assert!(!links(&d).iter().any(|l| l == "otherbr"), "{:?}", links(&d));
    let r = d.cli(&[
        "env",
        "create",
        "lab:e",
        "--lifetime=1h",
        "--bridge=labbr",
        &units,
    ]);
    assert!(ok(&r).contains("bridge labbr"), "{r:?}");
    d.wait_for(10, "the guest", || {
        console(&d, "lab:web").contains("net: ready")
    });
}

#[test]
fn a_user_who_is_not_root_runs_an_env_of_runtime_images_and_stops_and_starts_it() {
    if !kvm() {
        return;
    }
    let d = daemon("env-user");
    template(&d, "base");
    ok(&d.cli(&["policy", "set", "alice", "--users", "4242", "--daemon"]));
    // The guest and tt-host itself where uid 4242 can read them (the
    // checkout may be below /root).
    let image = d.dir.path("counter.hvt");
    std::fs::copy(guest("counter"), &image).unwrap();
    let client = d.dir.path("tt-host");
    std::fs::copy(tt_tests::tt_host(), &client).unwrap();
    let alice = |args: &[&str]| d.cli_as(4242, &client, args);
    ok(&alice(&["env", "create", "alice:lab", "--lifetime=1h"]));
    let r = alice(&[
        "create",
        "alice:lab:a",
        "--env=alice:lab",
        "--disk-from:disk=base",
        "--mem=32",
        image.to_str().unwrap(),
        "--",
        "count",
        "20",
    ]);
    assert_eq!(r.status, 0, "{r:?}\n{}", d.log());
    let img = runtime_image(&d, "alice:lab:a", "disk");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&img).unwrap().uid(), 4242, "not alice's");
    d.wait_for(10, "counts", || counts(&d, "alice:lab:a").len() >= 3);
    ok(&alice(&["disk", "snapshot", "alice:lab:a", "s1"]));
    // Another user may not touch it.
    let r = d.cli_as(4343, &client, &["env", "stop", "alice:lab"]);
    assert_ne!(r.status, 0, "{r:?}");
    std::thread::sleep(Duration::from_millis(350));
    let r = alice(&["env", "stop", "alice:lab"]);
    assert!(ok(&r).contains("1 of 1 unikernel(s) saved"), "{r:?}");
    let stopped_at = *counts(&d, "alice:lab:a").last().unwrap();
    std::thread::sleep(Duration::from_millis(350));
    let r = alice(&["env", "start", "alice:lab"]);
    assert!(
        ok(&r).contains("1 unikernel(s) running"),
        "{r:?}\n{}",
        d.log()
    );
    d.wait_for(10, "counting on", || {
        counts(&d, "alice:lab:a")
            .last()
            .is_some_and(|c| *c > stopped_at + 1)
    });
    let c = counts(&d, "alice:lab:a");
    assert_eq!(
        c.iter().filter(|k| **k == 1).count(),
        1,
        "booted again: {c:?}"
    );
    let r = alice(&["env", "list"]);
    assert!(ok(&r).contains("alice:lab"), "{r:?}");
}
