//! Admission through the delegation tree with real guests and real
//! `tt-host` processes: albatross's Alice/Bob/Charlie promise, many
//! launches at once under one policy, and the reservation of a SIGKILLed
//! `tt-host run` being reaped.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tt_tests::{assert_error, guest, kvm, tt, tt_host, Scratch};

/// `tt-host ARGS` with the state directory `sd`.
fn tt_in(sd: &Scratch, args: &[&str]) -> tt_tests::Run {
    let mut a = vec![args[0].to_string()];
    if args[0] == "policy" {
        a.push(args[1].to_string());
        a.push(format!("--state-dir={}", sd.0.display()));
        a.extend(args[2..].iter().map(|s| s.to_string()));
    } else {
        a.push(format!("--state-dir={}", sd.0.display()));
        a.extend(args[1..].iter().map(|s| s.to_string()));
    }
    tt(&a.iter().map(String::as_str).collect::<Vec<_>>())
}

/// Start `tt-host run --name NAME --mem=32 compute -- ITERS` in the
/// background.
fn spawn_compute(sd: &Scratch, name: &str, iters: u64) -> Child {
    Command::new(tt_host())
        .arg("run")
        .arg(format!("--state-dir={}", sd.0.display()))
        .arg(format!("--name={name}"))
        .arg("--mem=32")
        .arg(guest("compute"))
        .arg("--")
        .arg(iters.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tt-host")
}

/// Iterations no test waits for (hours of guest CPU time).
const FOREVER: u64 = 1 << 50;

/// Names of the unikernels `policy show` lists as running (lines without
/// a policy's "unikernels" column).
fn running(sd: &Scratch) -> Vec<String> {
    let r = tt_in(sd, &["policy", "show"]);
    assert_eq!(r.status, 0, "{r:?}");
    r.stdout
        .lines()
        .filter(|l| !l.contains("unikernels") && !l.starts_with('('))
        .map(|l| l.split_whitespace().next().unwrap_or("").to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

/// Wait until `policy show` lists `n` running unikernels.
fn wait_running(sd: &Scratch, n: usize) {
    let t = Instant::now();
    loop {
        let r = running(sd);
        if r.len() == n {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "expected {n} running, still {r:?} after 60 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn kill9(c: &mut Child) {
    let _ = c.kill(); // SIGKILL
    let _ = c.wait();
}

#[test]
fn alice_bob_and_charlie_share_alices_two_unikernels() {
    if !kvm() {
        return;
    }
    let sd = Scratch::new("abc");
    for (path, n) in [("alice", "2"), ("alice:bob", "2"), ("alice:charlie", "2")] {
        let r = tt_in(&sd, &["policy", "set", path, "--unikernels", n]);
        assert_eq!(r.status, 0, "policy set {path}: {r:?}");
    }
    // Bob's runs for a few seconds, Charlie's until killed.
    let mut bob = spawn_compute(&sd, "alice:bob:a", 2_000_000_000);
    let mut charlie = spawn_compute(&sd, "alice:charlie:b", FOREVER);
    wait_running(&sd, 2);
    // Each fits in its own policy (2), but not in alice's together.
    let hello = guest("hello");
    let hello = hello.to_str().unwrap();
    let r = tt_in(&sd, &["run", "--name=alice:bob:c", "--mem=32", hello]);
    assert_error(
        &r,
        "refused: alice: unikernels: limit 2, in use 2, requested 1",
    );
    // Once Bob's first exits (on its own, status 0), the third is admitted.
    let st = bob.wait().unwrap();
    assert_eq!(st.code(), Some(0), "bob's compute guest");
    let r = tt_in(&sd, &["run", "--name=alice:bob:c", "--mem=32", hello]);
    assert_eq!(r.status, 0, "{r:?}");
    assert!(r.stdout.contains("Hello"), "{r:?}");
    // Its reservation was released when it exited: one is left.
    assert_eq!(running(&sd), vec!["b".to_string()]);
    kill9(&mut charlie);
}

#[test]
fn twenty_launches_at_once_under_a_policy_of_five_admit_exactly_five() {
    if !kvm() {
        return;
    }
    let sd = Scratch::new("twenty");
    let r = tt_in(&sd, &["policy", "set", "team", "--unikernels", "5"]);
    assert_eq!(r.status, 0, "{r:?}");
    let mut kids: Vec<Child> = (0..20)
        .map(|i| spawn_compute(&sd, &format!("team:u{i}"), FOREVER))
        .collect();
    // The refused exit at once; the admitted run until killed.
    let t = Instant::now();
    let mut refused = Vec::new();
    while refused.len() < 15 && t.elapsed() < Duration::from_secs(60) {
        for (i, k) in kids.iter_mut().enumerate() {
            if refused.iter().any(|(j, _)| *j == i) {
                continue;
            }
            if let Some(st) = k.try_wait().unwrap() {
                let mut err = String::new();
                use std::io::Read;
                k.stderr.take().unwrap().read_to_string(&mut err).unwrap();
                refused.push((i, (st.code(), err)));
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Give a sixth admission time to show up, if there were one.
    std::thread::sleep(Duration::from_millis(500));
    let still: Vec<usize> = (0..20)
        .filter(|&i| kids[i].try_wait().unwrap().is_none())
        .collect();
    assert_eq!(refused.len(), 15, "refused: {refused:?}");
    for (i, (code, err)) in &refused {
        assert_eq!(*code, Some(1), "team:u{i}: {err}");
        assert!(
            err.contains("refused: team: unikernels: limit 5, in use 5, requested 1"),
            "team:u{i}: {err}"
        );
    }
    assert_eq!(still.len(), 5, "running: {still:?}");
    assert_eq!(running(&sd).len(), 5);
    for k in &mut kids {
        kill9(k);
    }
}

#[test]
fn a_sigkilled_run_has_its_reservation_reaped() {
    if !kvm() {
        return;
    }
    let sd = Scratch::new("reap");
    let r = tt_in(&sd, &["policy", "set", "solo", "--unikernels", "1"]);
    assert_eq!(r.status, 0, "{r:?}");
    let mut first = spawn_compute(&sd, "solo:first", FOREVER);
    wait_running(&sd, 1);
    let hello = guest("hello");
    let hello = hello.to_str().unwrap();
    let r = tt_in(&sd, &["run", "--name=solo:second", "--mem=32", hello]);
    assert_error(&r, "refused: solo: unikernels: limit 1, in use 1");
    // SIGKILL: no destructor runs, the entry's file stays in running/ ...
    kill9(&mut first);
    let entries = || -> String {
        std::fs::read_dir(sd.path("running"))
            .unwrap()
            .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap_or_default())
            .collect()
    };
    assert!(entries().contains("solo:first"), "{}", entries());
    // ... until the next admission finds its flock free and reaps it.
    let r = tt_in(&sd, &["run", "--name=solo:second", "--mem=32", hello]);
    assert_eq!(r.status, 0, "{r:?}");
    assert!(!entries().contains("solo:first"), "{}", entries());
    assert!(running(&sd).is_empty());
}

#[test]
fn policy_commands_refuse_what_does_not_fit_with_the_reason() {
    let sd = Scratch::new("policy");
    assert_eq!(
        tt_in(&sd, &["policy", "set", "alice", "--mem=1024"]).status,
        0
    );
    assert_error(
        &tt_in(&sd, &["policy", "set", "alice:bob", "--mem=2048"]),
        "memory",
    );
    assert_eq!(
        tt_in(&sd, &["policy", "set", "alice:bob", "--mem=512"]).status,
        0
    );
    assert_error(
        &tt_in(&sd, &["policy", "set", "alice", "--mem=256"]),
        "alice:bob",
    );
    let shown = tt_in(&sd, &["policy", "show", "alice"]);
    assert_eq!(shown.status, 0);
    assert!(shown.stdout.contains("memory 0/1024 MB"), "{shown:?}");
    assert!(shown.stdout.contains("memory 0/512 MB"), "{shown:?}");
    assert_eq!(tt_in(&sd, &["policy", "remove", "alice:bob"]).status, 0);
    assert!(!tt_in(&sd, &["policy", "show"]).stdout.contains("bob"));
    assert_error(&tt_in(&sd, &["policy", "set", "a/b"]), "path 'a/b'");
}

#[test]
fn block_devices_count_their_size_in_mb_rounded_up() {
    if !kvm() {
        return;
    }
    let sd = Scratch::new("blocklimit");
    let disk = sd.path("disk.img");
    // 1 MiB and one sector: 2 MB once rounded up.
    std::fs::File::create(&disk)
        .unwrap()
        .set_len((1 << 20) + 512)
        .unwrap();
    let blk = guest("blk");
    let block = format!("--block:storage={}", disk.display());
    let args = [
        "run",
        "--name=store:a",
        "--mem=32",
        &block,
        blk.to_str().unwrap(),
    ];
    assert_eq!(
        tt_in(&sd, &["policy", "set", "store", "--block=1"]).status,
        0
    );
    assert_error(
        &tt_in(&sd, &args),
        "refused: store: block: limit 1 MB, in use 0 MB, requested 2 MB",
    );
    assert_eq!(
        tt_in(&sd, &["policy", "set", "store", "--block=none"]).status,
        0
    );
    assert_error(&tt_in(&sd, &args), "store");
    assert_eq!(
        tt_in(&sd, &["policy", "set", "store", "--block=2"]).status,
        0
    );
    let r = tt_in(&sd, &args);
    assert_eq!(r.status, 0, "{r:?}");
}
