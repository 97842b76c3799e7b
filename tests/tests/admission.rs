//! Admission through the delegation tree with real guests and real
//! `tt-host` processes: albatross's Alice/Bob/Charlie promise, many
//! launches at once under one policy, and the reservation of a SIGKILLed
//! `tt-host run` being reaped.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
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

/// A block device counts its size in MB, rounded up, and with the
/// journal (the default) its journal's size too.
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
    let run = |durability: &str| {
        tt_in(
            &sd,
            &[
                "run",
                "--name=store:a",
                "--mem=32",
                &block,
                durability,
                blk.to_str().unwrap(),
            ],
        )
    };
    let plain = "--block-durability=none";
    assert_eq!(
        tt_in(&sd, &["policy", "set", "store", "--block=1"]).status,
        0
    );
    assert_error(
        &run(plain),
        "refused: store: block: limit 1 MB, in use 0 MB, requested 2 MB",
    );
    assert_eq!(
        tt_in(&sd, &["policy", "set", "store", "--block=none"]).status,
        0
    );
    assert_error(&run(plain), "store");
    assert_eq!(
        tt_in(&sd, &["policy", "set", "store", "--block=2"]).status,
        0
    );
    let r = run(plain);
    assert_eq!(r.status, 0, "{r:?}");
    // A 1 MiB journal: 3 MB.
    assert_error(
        &run("--block-journal=1M"),
        "refused: store: block: limit 2 MB, in use 0 MB, requested 3 MB",
    );
    assert_eq!(
        tt_in(&sd, &["policy", "set", "store", "--block=3"]).status,
        0
    );
    let r = run("--block-journal=1M");
    assert_eq!(r.status, 0, "{r:?}");
}

/// A persistent TAP interface in this network namespace, up, deleted
/// when dropped (with libc: no `ip` needed).
struct Tap(String);

impl Tap {
    fn new(name: &str) -> Tap {
        let tap = Tap(name.to_string());
        let tun = tap.open();
        // SAFETY: TUNSETPERSIST takes an int by value.
        let r = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETPERSIST, 1 as libc::c_ulong) };
        assert!(r == 0, "TUNSETPERSIST: {}", std::io::Error::last_os_error());
        drop(tun);
        let mut ifr = tap.ifreq();
        // SAFETY: socket() takes no pointers; checked below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        // SAFETY: fd was just opened and is owned nowhere else.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        ifr.ifr_ifru.ifru_flags = libc::IFF_UP as libc::c_short;
        // SAFETY: SIOCSIFFLAGS reads one struct ifreq, which we own.
        let r = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) };
        assert!(r == 0, "SIOCSIFFLAGS: {}", std::io::Error::last_os_error());
        tap
    }

    /// An ifreq naming this interface.
    fn ifreq(&self) -> libc::ifreq {
        // SAFETY: ifreq is plain data; all-zero is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        assert!(self.0.len() < libc::IFNAMSIZ);
        for (dst, src) in ifr.ifr_name.iter_mut().zip(self.0.bytes()) {
            *dst = src as libc::c_char;
        }
        ifr
    }

    /// /dev/net/tun attached to this TAP (made if missing).
    fn open(&self) -> std::fs::File {
        let tun = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .expect("open /dev/net/tun (needs root)");
        let mut ifr = self.ifreq();
        ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes one struct ifreq, which we own.
        let r = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut ifr) };
        assert!(
            r == 0,
            "TUNSETIFF {}: {}",
            self.0,
            std::io::Error::last_os_error()
        );
        tun
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let tun = self.open();
        // SAFETY: TUNSETPERSIST takes an int by value.
        unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETPERSIST, 0 as libc::c_ulong) };
    }
}

/// The issue's case, end to end: `policy set alice --unikernels 2 --mem
/// 1024` on a host without the TAP, then the TAP is made: alice's bridges
/// were copied from the host ("none") and the launch was refused with
/// "alice: bridge tapN not in allowed bridges none". Now alice inherits
/// the host's interfaces as they are at each launch.
#[test]
fn a_tap_made_after_policy_set_is_open_to_the_policy() {
    if !kvm() {
        return;
    }
    let sd = Scratch::new("taplater");
    let name = format!("ttadm{}", std::process::id() % 100_000);
    let r = tt_in(
        &sd,
        &[
            "policy",
            "set",
            "alice",
            "--unikernels",
            "2",
            "--mem",
            "1024",
        ],
    );
    assert_eq!(r.status, 0, "{r:?}");
    let tap = Tap::new(&name);
    let mut child = Command::new(tt_host())
        .arg("run")
        .arg(format!("--state-dir={}", sd.0.display()))
        .args(["--name=alice:web", "--mem=32"])
        .arg(format!("--net:service0={}", tap.0))
        .arg(guest("net"))
        .args(["--", "10.0.0.2", "limit=1"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tt-host");
    let t = Instant::now();
    while running(&sd).is_empty() {
        if let Some(st) = child.try_wait().unwrap() {
            let mut err = String::new();
            use std::io::Read;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("alice:web on {name} exited ({st}) instead of running: {err}");
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "not admitted in 60 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let shown = tt_in(&sd, &["policy", "show", "alice"]).stdout;
    assert!(
        shown.contains(&name) && shown.contains("(inherited from the host)"),
        "{shown}"
    );
    kill9(&mut child);
}

/// What `policy set` was not given is stored as not set and shown as
/// inherited; `--FIELD inherit` unsets a field, which mends a policy an
/// older tt-host stored with the host's values copied into it.
#[test]
fn policy_set_stores_only_what_it_is_given_and_inherit_unsets() {
    let sd = Scratch::new("inheritcli");
    let set = |args: &[&str]| {
        let mut a = vec!["policy", "set", "alice"];
        a.extend_from_slice(args);
        let r = tt_in(&sd, &a);
        assert_eq!(r.status, 0, "{r:?}");
    };
    let alice_stored = || -> String {
        let s = std::fs::read_to_string(sd.path("state.json")).unwrap();
        let at = s.find("\"alice\"").expect("alice stored");
        s[at..]
            .split(']')
            .next()
            .unwrap()
            .split_whitespace()
            .collect()
    };
    set(&["--unikernels", "2", "--mem", "1024"]);
    assert_eq!(
        alice_stored(),
        r#""alice",{"unikernels":2,"memory_mb":1024}"#
    );
    let show = || tt_in(&sd, &["policy", "show"]).stdout;
    let shown = show();
    let alice = shown.lines().find(|l| l.contains("alice")).unwrap();
    assert!(
        alice.contains("memory 0/1024 MB  block 0/unlimited MB (inherited from the host)")
            && alice.contains(" (inherited from the host)"),
        "{shown}"
    );
    assert!(
        shown
            .lines()
            .find(|l| l.starts_with("(root) "))
            .unwrap()
            .contains("block 0/unlimited MB (host)"),
        "the root's block limit is unlimited: {shown}"
    );
    set(&["--mem", "inherit"]);
    assert_eq!(alice_stored(), r#""alice",{"unikernels":2}"#);
    // An older tt-host's copy: every field, bridges none, a block limit of
    // the state directory's free space.
    let old = r#"{"version":1,"root":null,"policies":[["alice",{"unikernels":2,"memory_mb":1024,"cpus":[0],"block_mb":79899,"bridges":[]}]],"running":[]}"#;
    std::fs::write(sd.path("state.json"), old).unwrap();
    let shown = show();
    assert!(
        shown.contains("block 0/79899 MB  cpus 0  bridges none"),
        "{shown}"
    );
    set(&[
        "--bridges",
        "inherit",
        "--block",
        "inherit",
        "--cpus=inherit",
    ]);
    assert_eq!(
        alice_stored(),
        r#""alice",{"unikernels":2,"memory_mb":1024}"#
    );
    let shown = show();
    let alice = shown.lines().find(|l| l.contains("alice")).unwrap();
    assert!(
        alice.contains("block 0/unlimited MB (inherited from the host)")
            && alice.ends_with("(inherited from the host)"),
        "{shown}"
    );
}
