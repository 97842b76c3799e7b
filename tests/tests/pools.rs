//! Capacity pools end to end: a real daemon, real guests, real
//! signatures, on pools sized to run out in seconds.
//!
//! A unikernel with `--mem=2048` draws 0.5 CU per second (its one vCPU
//! caps CU at 1/2), so a reservation of N CU-seconds lasts 2N seconds.

use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};
use tt_tests::daemon::Daemon;
use tt_tests::{guest, kvm, tt_host, Run};

#[track_caller]
fn ok(r: &Run) -> &str {
    assert_eq!(r.status, 0, "{r:?}");
    &r.stdout
}

/// A daemon whose pools need 1 s of run time and warn 1 s before.
fn daemon(tag: &str) -> Daemon {
    Daemon::started(tag, &["--pool-min-run=1", "--pool-warning=1"])
}

/// A reservation envelope signed with `seeds` (customer, then sponsor).
fn reservation(
    d: &Daemon,
    id: &str,
    pool: &str,
    customer: &str,
    cu: &str,
    seeds: &[&str],
) -> String {
    let payload = d.dir.path(&format!("{id}.payload"));
    std::fs::write(
        &payload,
        format!(
            r#"{{"id":"{id}","pool":"{pool}","customer":"{customer}","cu":{cu},"su":0,"ipv4u":0}}"#
        ),
    )
    .unwrap();
    let mut args = vec![
        "pool".to_string(),
        "sign".into(),
        format!("--key={}", seeds[0]),
    ];
    if let Some(s) = seeds.get(1) {
        args.push(format!("--sponsor-key={s}"));
    }
    args.push(payload.display().to_string());
    let r = d.cli(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let env = d.dir.path(&format!("{id}.json"));
    std::fs::write(&env, ok(&r)).unwrap();
    env.display().to_string()
}

/// The pool's EmptyAt from `pool show`.
fn empty_at(d: &Daemon, pool: &str) -> Option<SystemTime> {
    let r = d.cli(&["pool", "show", pool]);
    let line = ok(&r)
        .lines()
        .find(|l| l.trim_start().starts_with("empty at"))?
        .to_string();
    humantime::parse_rfc3339(
        line.trim_start()
            .strip_prefix("empty at ")?
            .split(' ')
            .next()?,
    )
    .ok()
}

/// The state of unikernel `name` in `tt-host list`.
fn state(d: &Daemon, name: &str) -> String {
    let r = d.cli(&["list"]);
    ok(&r)
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .map(|l| l.split_whitespace().skip(1).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Wait until `name` is stopped by its pool; when that was seen.
fn stopped_at(d: &Daemon, name: &str, limit: Duration) -> SystemTime {
    let t = Instant::now();
    loop {
        if state(d, name).contains("stopped: pool") {
            return SystemTime::now();
        }
        assert!(
            t.elapsed() < limit,
            "{name} not stopped: {}\n{}",
            state(d, name),
            d.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn unit() -> String {
    guest("unit").display().to_string()
}

#[track_caller]
fn within(a: SystemTime, b: SystemTime, tolerance: Duration) {
    let d = a.duration_since(b).unwrap_or_else(|e| e.duration());
    assert!(d <= tolerance, "{a:?} and {b:?} are {d:?} apart");
}

#[test]
fn a_pool_empties_on_schedule_and_a_top_up_extends_it() {
    if !kvm() {
        return;
    }
    let d = daemon("p-schedule");
    let alice = d.add_key("alice");
    ok(&d.cli(&["pool", "create", "p1", "--owner=alice"]));
    // Empty: a create is refused, naming the pool.
    let r = d.cli(&[
        "create",
        "web",
        "--pool=p1",
        "--mem=2048",
        &unit(),
        "tick",
        "200",
    ]);
    assert_eq!(r.status, 1, "{r:?}");
    assert!(r.stderr.contains("pool p1 would be empty at"), "{r:?}");
    ok(&d.cli(&[
        "pool",
        "reserve",
        &reservation(&d, "r1", "p1", "alice", "3", &[&alice]),
    ]));
    ok(&d.cli(&[
        "create",
        "web",
        "--pool=p1",
        "--mem=2048",
        &unit(),
        "tick",
        "200",
    ]));
    ok(&d.cli(&["create", "other", "--mem=8", &unit(), "tick", "200"]));
    let first = empty_at(&d, "p1").expect("web draws from p1");
    // 3 CU-s at 0.5 CU/s: about 6 s from now.
    let left = first.duration_since(SystemTime::now()).unwrap();
    assert!(
        left > Duration::from_secs(4) && left <= Duration::from_secs(6),
        "{left:?}"
    );
    // A top-up of 2 CU-s before expiry: 4 s more.
    std::thread::sleep(Duration::from_secs(1));
    ok(&d.cli(&[
        "pool",
        "reserve",
        &reservation(&d, "r2", "p1", "alice", "2", &[&alice]),
    ]));
    let later = empty_at(&d, "p1").unwrap();
    within(
        later,
        first + Duration::from_secs(4),
        Duration::from_millis(50),
    );
    // Still running past the first EmptyAt, stopped at the second.
    std::thread::sleep(
        first.duration_since(SystemTime::now()).unwrap() + Duration::from_millis(500),
    );
    assert_eq!(state(&d, "web").split(' ').next(), Some("running"));
    let stopped = stopped_at(&d, "web", Duration::from_secs(10));
    within(stopped, later, Duration::from_secs(1));
    assert!(state(&d, "other").starts_with("running"), "not in the pool");
    let r = d.cli(&["console", "web", "--last=1"]);
    assert!(ok(&r).contains("pool p1 is empty"), "{r:?}");
    assert!(
        d.log().contains("pool p1 is empty: stopping web"),
        "{}",
        d.log()
    );
    assert!(
        d.log().contains("pool p1 empties at"),
        "the warning: {}",
        d.log()
    );
}

#[test]
fn a_daemon_killed_and_back_charges_the_downtime_and_stops_on_time() {
    if !kvm() {
        return;
    }
    let mut d = daemon("p-downtime");
    let alice = d.add_key("alice");
    ok(&d.cli(&["pool", "create", "p1", "--owner=alice"]));
    ok(&d.cli(&[
        "pool",
        "reserve",
        &reservation(&d, "r1", "p1", "alice", "3", &[&alice]),
    ]));
    ok(&d.cli(&[
        "create",
        "web",
        "--pool=p1",
        "--mem=2048",
        &unit(),
        "tick",
        "200",
    ]));
    let at = empty_at(&d, "p1").unwrap();
    std::thread::sleep(Duration::from_secs(1));
    d.kill9();
    std::thread::sleep(Duration::from_secs(2));
    d.start();
    // The time away was charged: the same EmptyAt, not 2 s later.
    within(empty_at(&d, "p1").unwrap(), at, Duration::from_millis(50));
    let stopped = stopped_at(&d, "web", Duration::from_secs(10));
    within(stopped, at, Duration::from_secs(1));
    // And a replayed reservation stays refused after the restart.
    let r = d.cli(&[
        "pool",
        "reserve",
        &d.dir.path("r1.json").display().to_string(),
    ]);
    assert_eq!(r.status, 1, "{r:?}");
    assert!(r.stderr.contains("replayed"), "{r:?}");
}

#[test]
fn reservations_are_refused_with_their_reason() {
    if !kvm() {
        return;
    }
    let d = daemon("p-signatures");
    let alice = d.add_key("alice");
    let bank = d.add_key("bank");
    let mallory = d.add_key("mallory");
    ok(&d.cli(&["pool", "create", "p1", "--owner=alice"]));
    ok(&d.cli(&["pool", "create", "p2", "--owner=alice", "--sponsor=bank"]));
    let refused = |file: &str, why: &str| {
        let r = d.cli(&["pool", "reserve", file]);
        assert_eq!(r.status, 1, "{r:?}");
        assert!(r.stderr.contains(why), "{why}: {r:?}");
        assert_eq!(r.stderr.trim().lines().count(), 1, "{r:?}");
    };
    // Tampered: one byte of the payload's JSON (cu 3 -> 9).
    let good = reservation(&d, "t1", "p1", "alice", "3", &[&alice]);
    let env: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&good).unwrap()).unwrap();
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let payload = b64.decode(env["payload"].as_str().unwrap()).unwrap();
    let tampered = String::from_utf8(payload)
        .unwrap()
        .replace("\"cu\":3", "\"cu\":9");
    let mut env2 = env.clone();
    env2["payload"] = b64.encode(tampered).into();
    let f = d.dir.path("tampered.json");
    std::fs::write(&f, env2.to_string()).unwrap();
    refused(&f.display().to_string(), "signature");
    // Wrong key.
    refused(
        &reservation(&d, "t2", "p1", "alice", "3", &[&mallory]),
        "signature",
    );
    // Unknown pool, non-integer amount.
    refused(
        &reservation(&d, "t3", "nope", "alice", "3", &[&alice]),
        "pool",
    );
    refused(
        &reservation(&d, "t4", "p1", "alice", "1.5", &[&alice]),
        "cu",
    );
    // Sponsor missing where required; then both: accepted.
    refused(
        &reservation(&d, "t5", "p2", "alice", "3", &[&alice]),
        "sponsor",
    );
    ok(&d.cli(&[
        "pool",
        "reserve",
        &reservation(&d, "t6", "p2", "alice", "3", &[&alice, &bank]),
    ]));
    // Valid, then replayed.
    ok(&d.cli(&["pool", "reserve", &good]));
    refused(&good, "replayed");
    // The audit log keeps the two accepted, in order.
    let log = std::fs::read_to_string(d.state_dir().join("daemon/reservations.log")).unwrap();
    assert_eq!(log.lines().count(), 2, "{log}");
    // Only root creates pools (tt-host copied where uid 4242 reaches it).
    let client = d.dir.path("tt-host");
    std::fs::copy(tt_host(), &client).unwrap();
    let r = d.cli_with(
        Command::new(&client)
            .args(["pool", "create", "p3", "--owner=alice"])
            .uid(4242)
            .gid(4242),
    );
    assert_eq!(r.status, 1, "{r:?}");
    assert!(r.stderr.contains("root only"), "{r:?}");
}
