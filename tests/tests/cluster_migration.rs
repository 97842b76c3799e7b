//! Live migration between two nodes of a cluster (issue 22 with the
//! migration of docs/SNAPSHOT.md): the target node admits the incoming
//! unikernel through the cluster while the source still runs it, so the
//! guest counts on both until the source's run ends; then the source's
//! reservation goes and the target's stays.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use tt_tests::daemon::Daemon;
use tt_tests::etcd::EtcdCluster;
use tt_tests::guest_output::Host;
use tt_tests::{guest, kvm, tt_host, Run};

/// Node `i` of `etcd`, started.
fn node(etcd: &EtcdCluster, i: usize) -> Daemon {
    etcd.node_daemon(i, "clmig", &[])
}

#[track_caller]
fn ok(r: &Run) -> &str {
    assert_eq!(r.status, 0, "{r:?}");
    &r.stdout
}

fn create(d: &Daemon, name: &str) -> Run {
    d.cli(&[
        "create",
        name,
        "--mem=8",
        guest("unit").to_str().unwrap(),
        "--",
        "tick",
        "100000",
    ])
}

/// A `migrate-receive` admitting into `d`'s state directory (so through
/// its node), listening on `sock`.
fn target(d: &Daemon, sock: &Path) -> Host {
    let _ = std::fs::remove_file(sock);
    let h = Host::spawn(
        Command::new(tt_host())
            .arg("migrate-receive")
            .arg(format!("--listen={}", sock.display()))
            .arg(format!("--state-dir={}", d.state_dir().display())),
    );
    let t = Instant::now();
    while !sock.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "no {}",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    h
}

/// The nodes `list --cluster` (seen from `d`) shows `name` on.
fn nodes_of(d: &Daemon, name: &str) -> Vec<String> {
    let r = d.cli(&["list", "--cluster"]);
    ok(&r)
        .lines()
        .filter(|l| l.split_whitespace().nth(1) == Some(name) && !l.contains("LOST"))
        .filter_map(|l| l.split_whitespace().next().map(String::from))
        .collect()
}

#[test]
fn a_unikernel_migrates_between_nodes_counted_on_both_until_the_source_lets_go() {
    if !kvm() {
        return;
    }
    let etcd = EtcdCluster::start(3);
    let nodes: Vec<Daemon> = (0..2).map(|i| node(&etcd, i)).collect();
    ok(&nodes[0].cli(&["policy", "set", "alice", "--unikernels", "2", "--daemon"]));
    ok(&create(&nodes[0], "alice:m"));
    ok(&create(&nodes[0], "alice:x"));
    let sock = nodes[1].dir.path("mig.sock");

    // No room for a second copy of alice:m under alice's 2: the target is
    // refused, says why, and the guest runs on at the source.
    let t = target(&nodes[1], &sock);
    let r = nodes[0].cli(&[
        "migrate-send",
        "alice:m",
        &format!("--to={}", sock.display()),
    ]);
    assert_ne!(r.status, 0, "{r:?}");
    assert!(
        r.stderr.contains("refused by the cluster"),
        "the refusal not passed on: {r:?}"
    );
    let ended = t.finish();
    assert!(!ended.status.success(), "{:?}", ended.stderr);
    assert!(
        ended
            .stderr
            .iter()
            .any(|l| l.contains("refused by the cluster")),
        "{:?}",
        ended.stderr
    );
    assert_eq!(nodes_of(&nodes[0], "alice:m"), ["n0"]);

    // With room, it moves; the cluster holds it on n1 alone once the
    // source's run ended (its node releases it within a second).
    ok(&nodes[0].cli(&["destroy", "alice:x"]));
    // Its node releases it at once (it looks a quarter second after a
    // unikernel of its ends).
    nodes[0].wait_for(10, "alice:x released", || {
        let r = nodes[0].cli(&["policy", "show", "alice", "--daemon"]);
        r.stdout.contains("1 unikernel(s)")
    });
    let _t = target(&nodes[1], &sock);
    let r = nodes[0].cli(&[
        "migrate-send",
        "alice:m",
        &format!("--to={}", sock.display()),
    ]);
    assert!(ok(&r).contains("migrated"), "{r:?}");
    nodes[1].wait_for(10, "alice:m on n1 alone", || {
        nodes_of(&nodes[1], "alice:m") == ["n1"]
    });
    let r = nodes[1].cli(&["policy", "show", "alice", "--daemon"]);
    assert!(ok(&r).contains("1 unikernel(s)"), "{r:?}");
    // Its name is n1's now: n0 cannot start another alice:m.
    let again = create(&nodes[0], "alice:m");
    assert_ne!(again.status, 0, "{again:?}");
}
