//! Environments on a cluster (issue 22): their names are the cluster's,
//! their records (`envs/NAME` in etcd) follow them, every node lists every
//! node's, and those of a node that dies are reported lost. A real
//! 3-member etcd in a network namespace of its own (tests/etcd.rs) and
//! `tt-host daemon --cluster` nodes, each in its own namespace (where its
//! environments' bridges and rules go), with a 3 s lease.

use std::time::{Duration, Instant};
use tt_tests::daemon::Daemon;
use tt_tests::etcd::EtcdCluster;
use tt_tests::{guest, kvm, Run};

/// Node `i` of `etcd`, started.
fn node(etcd: &EtcdCluster, i: usize) -> Daemon {
    etcd.node_daemon(i, "cenvs", &[])
}

#[track_caller]
fn ok(r: &Run) -> &str {
    assert_eq!(r.status, 0, "{r:?}");
    &r.stdout
}

/// A units file on `d` with one unikernel `unit` that runs until stopped
/// (`image`: the guest's path).
fn units(d: &Daemon, unit: &str, image: &str) -> String {
    let line = format!("{unit} --mem=8 {image} -- tick 1000\n");
    let f = d.dir.file(&format!("{unit}.units"), line.as_bytes());
    f.display().to_string()
}

fn unit_image() -> String {
    guest("unit").display().to_string()
}

/// `env create NAME --lifetime=1h [--units=FILE]` on `d`.
fn env_create(d: &Daemon, name: &str, units: Option<&str>) -> Run {
    let mut args = vec!["env", "create", name, "--lifetime=1h"];
    let u;
    if let Some(f) = units {
        u = format!("--units={f}");
        args.push(&u);
    }
    d.cli(&args)
}

/// `envs/NAME` as etcd holds it: its record (JSON) and its lease.
fn record(etcd: &EtcdCluster, name: &str) -> Option<(serde_json::Value, i64)> {
    use base64::Engine;
    let r = etcd.etcdctl(&["get", &format!("/tt-host/envs/{name}"), "-w", "json"]);
    assert_eq!(r.status, 0, "{r:?}");
    let v: serde_json::Value = serde_json::from_str(&r.stdout).expect("etcdctl's JSON");
    let kv = v["kvs"].as_array()?.first()?.clone();
    let value = base64::engine::general_purpose::STANDARD
        .decode(kv["value"].as_str().unwrap())
        .unwrap();
    let rec = serde_json::from_slice(&value).expect("a record is JSON");
    Some((rec, kv["lease"].as_i64().unwrap_or(0)))
}

/// The `env list --cluster` rows of `d` for environment `name`.
fn cluster_rows(d: &Daemon, name: &str) -> Vec<String> {
    let r = d.cli(&["env", "list", "--cluster"]);
    ok(&r)
        .lines()
        .filter(|l| l.split_whitespace().nth(1) == Some(name))
        .map(String::from)
        .collect()
}

/// Wait until `f` holds, up to `secs`.
#[track_caller]
fn wait(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < Duration::from_secs(secs),
            "{what}: not within {secs} s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn an_env_name_is_the_clusters_its_record_follows_it_and_a_restart_registers_it_again() {
    if !kvm() {
        return;
    }
    let etcd = EtcdCluster::start(3);
    let mut nodes: Vec<Daemon> = (0..2).map(|i| node(&etcd, i)).collect();
    let image = unit_image();

    let f = units(&nodes[0], "lab:a", &image);
    ok(&env_create(&nodes[0], "lab", Some(&f)));
    let (rec, lease) = record(&etcd, "lab").expect("envs/lab in etcd");
    assert_eq!(rec["node"], "n0", "{rec}");
    assert_eq!(rec["state"], "running", "{rec}");
    assert_eq!(rec["units"], 1, "{rec}");
    assert_eq!(rec["memory_mb"], 8, "{rec}");
    assert_ne!(lease, 0, "not on the node's lease: {rec}");

    // The same name on another node is refused, naming the node that has
    // it; nothing of it is made there.
    let r = env_create(&nodes[1], "lab", None);
    assert_ne!(r.status, 0, "{r:?}");
    assert!(r.stderr.contains("node n0"), "{r:?}");
    assert_eq!(ok(&nodes[1].cli(&["env", "list"])).lines().count(), 1);
    assert_eq!(record(&etcd, "lab").unwrap().0["node"], "n0");

    // Managed where it is: another node says which one that is.
    wait(5, "n1 naming the node of lab", || {
        let r = nodes[1].cli(&["env", "extend", "lab", "1h"]);
        r.status != 0 && r.stderr.contains("it is on node n0")
    });

    // Every node lists every node's environments.
    ok(&env_create(&nodes[1], "other", None));
    let rows = cluster_rows(&nodes[1], "lab");
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert!(
        rows[0].starts_with("n0 ") && rows[0].contains("running"),
        "{rows:?}"
    );
    assert_eq!(
        rows[0].split_whitespace().nth(3),
        Some("1"),
        "units: {rows:?}"
    );
    let rows = cluster_rows(&nodes[0], "other");
    assert!(rows.len() == 1 && rows[0].starts_with("n1 "), "{rows:?}");

    // A create that fails leaves no claim.
    let junk = nodes[1].dir.file("junk.hvt", b"not a unikernel");
    let bad = units(&nodes[1], "broken:a", junk.to_str().unwrap());
    let r = env_create(&nodes[1], "broken", Some(&bad));
    assert_ne!(r.status, 0, "{r:?}");
    assert!(
        record(&etcd, "broken").is_none(),
        "the claim of a failed create stayed"
    );

    // A stop is in the record; a destroy removes it, and frees the name.
    ok(&nodes[0].cli(&["env", "stop", "lab"]));
    assert_eq!(record(&etcd, "lab").unwrap().0["state"], "stopped");
    std::thread::sleep(Duration::from_millis(1100));
    ok(&nodes[0].cli(&["env", "destroy", "lab"]));
    assert!(
        record(&etcd, "lab").is_none(),
        "envs/lab stayed after its destroy"
    );
    ok(&env_create(&nodes[1], "lab", None));
    let rows = cluster_rows(&nodes[0], "lab");
    assert!(rows.len() == 1 && rows[0].starts_with("n1 "), "{rows:?}");

    // A daemon that restarts registers its environments again (on its new
    // lease) and removes its stale records.
    let r = etcd.etcdctl(&[
        "put",
        "/tt-host/envs/ghost",
        r#"{"name":"ghost","node":"n1","owner":0,"state":"running","end":1,"units":0}"#,
    ]);
    assert_eq!(r.status, 0, "{r:?}");
    let (_, before) = record(&etcd, "other").unwrap();
    nodes[1].kill9();
    nodes[1].start();
    wait(10, "re-registered on the new lease", || {
        record(&etcd, "other").is_some_and(|(_, l)| l != before)
            && record(&etcd, "lab").is_some_and(|(_, l)| l != before)
    });
    wait(10, "the stale record removed", || {
        record(&etcd, "ghost").is_none()
    });
    // Past the old lease's TTL, still there.
    std::thread::sleep(Duration::from_secs(4));
    for name in ["other", "lab"] {
        let (rec, _) = record(&etcd, name).unwrap_or_else(|| panic!("envs/{name} went"));
        assert_eq!(rec["node"], "n1");
    }
    assert!(cluster_rows(&nodes[0], "other")[0].starts_with("n1 "));

    // Without --cluster, env list --cluster says it is no cluster node.
    let plain = Daemon::started_in_netns("cenvs-plain", &[]);
    let r = plain.cli(&["env", "list", "--cluster"]);
    assert_ne!(r.status, 0, "{r:?}");
    assert!(r.stderr.contains("not a cluster node"), "{r:?}");
    ok(&plain.cli(&["env", "list"]));
}

#[test]
fn the_envs_of_a_node_that_dies_are_listed_lost_on_the_others() {
    if !kvm() {
        return;
    }
    let etcd = EtcdCluster::start(3);
    let mut nodes: Vec<Daemon> = (0..2).map(|i| node(&etcd, i)).collect();
    let f = units(&nodes[1], "doomed:a", &unit_image());
    ok(&env_create(&nodes[1], "doomed", Some(&f)));
    let rows = cluster_rows(&nodes[0], "doomed");
    assert!(rows.len() == 1 && rows[0].starts_with("n1 "), "{rows:?}");

    // Placed anywhere, an environment goes whole to the node with the most
    // free memory: node 0 (node 1 runs doomed:a).
    let f = units(&nodes[1], "spread:a", &unit_image());
    let r = nodes[1].cli(&[
        "env",
        "create",
        "spread",
        "--lifetime=1h",
        "--anywhere",
        &format!("--units={f}"),
    ]);
    assert!(ok(&r).contains("created on node n0"), "{r:?}");
    let (rec, _) = record(&etcd, "spread").expect("envs/spread");
    assert_eq!(
        (&rec["node"], &rec["units"]),
        (&"n0".into(), &1.into()),
        "{rec}"
    );
    assert_eq!(nodes[0].unit_pids().len(), 1);
    let r = nodes[0].cli(&["list"]);
    assert!(ok(&r).contains("spread:a"), "{r:?}");

    // Node 1 dies with its unikernels: after its lease's TTL, its record
    // is gone and node 0 lists the environment lost.
    nodes[1].kill9();
    nodes[1].kill_units();
    let t = Instant::now();
    nodes[0].wait_for(15, "the lost environment", || {
        cluster_rows(&nodes[0], "doomed")
            .iter()
            .any(|r| r.starts_with("n1 ") && r.contains("LOST"))
    });
    assert!(
        t.elapsed() >= Duration::from_secs(1),
        "lost before the lease could expire"
    );
    assert!(record(&etcd, "doomed").is_none());
    assert!(
        nodes[0].log().contains("its environments are lost: doomed"),
        "{}",
        nodes[0].log()
    );

    // Its name is free again; taken, it is listed where it is now.
    ok(&env_create(&nodes[0], "doomed", None));
    let rows = cluster_rows(&nodes[0], "doomed");
    assert!(rows.len() == 1 && rows[0].starts_with("n0 "), "{rows:?}");
}
