//! A cluster of tt-host nodes on etcd (issue 22), end to end: a real
//! 3-member etcd cluster in a network namespace of its own
//! (tests/etcd.rs) and 3 `tt-host daemon --cluster` nodes, each with its
//! own state directory and network namespace linked to the cluster's.
//! Nodes use a 3 s lease so that the tests see expiries quickly.

use std::time::{Duration, Instant};
use tt_host::cluster::store::keys;
use tt_tests::daemon::Daemon;
use tt_tests::etcd::EtcdCluster;
use tt_tests::{guest, kvm, Run};

const TTL: &str = "--lease-ttl=3";

/// Node `i` of `etcd`, started, with `extra` options.
fn node(etcd: &EtcdCluster, i: usize, extra: &[&str]) -> Daemon {
    etcd.node_daemon(i, "cluster", extra)
}

/// `tt-host create NAME` of a unikernel that runs until stopped.
fn create(d: &Daemon, name: &str) -> Run {
    d.cli(&[
        "create",
        name,
        "--mem=8",
        guest("unit").to_str().unwrap(),
        "--",
        "tick",
        "1000",
    ])
}

/// The reservations etcd holds (their keys, `/tt-host/n/NODE/res/NAME`).
fn reservations(etcd: &EtcdCluster) -> Vec<String> {
    let r = etcd.etcdctl(&["get", "--prefix", "/tt-host/n/", "--keys-only"]);
    assert_eq!(r.status, 0, "{r:?}");
    r.stdout
        .lines()
        .filter(|l| keys::parse_res("/tt-host", l.trim()).is_some())
        .map(String::from)
        .collect()
}

#[track_caller]
fn ok(r: &Run) -> &str {
    assert_eq!(r.status, 0, "{r:?}");
    &r.stdout
}

/// 20 concurrent creates spread over the nodes; the names admitted.
fn twenty_creates(nodes: &[Daemon], prefix: &str) -> Vec<String> {
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..20)
            .map(|k| {
                let d = &nodes[k % nodes.len()];
                let name = format!("alice:{prefix}{k}");
                s.spawn(move || (name.clone(), create(d, &name)))
            })
            .collect();
        let mut admitted = Vec::new();
        for h in handles {
            let (name, r) = h.join().unwrap();
            if r.status == 0 {
                admitted.push(name);
            } else {
                assert!(
                    r.stderr.contains("refused by the cluster")
                        || r.stderr.contains("conflicting admissions"),
                    "{name}: not a cluster refusal: {r:?}"
                );
            }
        }
        admitted
    })
}

#[test]
fn twenty_concurrent_creates_on_three_nodes_under_a_limit_of_five_admit_five_and_a_dead_nodes_room_comes_back(
) {
    if !kvm() {
        return;
    }
    let etcd = EtcdCluster::start(3);
    let mut nodes: Vec<Daemon> = (0..3).map(|i| node(&etcd, i, &[])).collect();
    let r = nodes[0].cli(&["policy", "set", "alice", "--unikernels", "5", "--daemon"]);
    assert!(ok(&r).contains("cluster policy at alice set"), "{r:?}");
    // Another node sees it: one tree for the cluster.
    let r = nodes[2].cli(&["policy", "show", "alice", "--daemon"]);
    assert!(ok(&r).contains("\"unikernels\":5"), "{r:?}");

    let admitted = twenty_creates(&nodes, "u");
    assert_eq!(admitted.len(), 5, "admitted: {admitted:?}");
    assert_eq!(reservations(&etcd).len(), 5, "{:?}", reservations(&etcd));
    let running: usize = nodes.iter().map(|d| d.unit_pids().len()).sum();
    assert_eq!(running, 5);
    let r = nodes[1].cli(&["policy", "show", "alice", "--daemon"]);
    assert!(ok(&r).contains("5 unikernel(s)"), "{r:?}");
    // Every node's unikernels, seen from any node.
    let r = nodes[2].cli(&["list", "--cluster"]);
    let rows: Vec<&str> = ok(&r).lines().filter(|l| l.contains("alice:u")).collect();
    assert_eq!(rows.len(), 5, "{r:?}");
    for name in &admitted {
        assert!(r.stdout.contains(name.as_str()), "{name} not listed: {r:?}");
    }

    // A node dies (its daemon and its unikernels): after its lease's TTL
    // its reservations are gone and the others may use the room.
    let victim = (0..3).max_by_key(|i| nodes[*i].unit_pids().len()).unwrap();
    let lost = nodes[victim].unit_pids().len();
    assert!(lost > 0);
    nodes[victim].kill9();
    nodes[victim].kill_units();
    let others: Vec<usize> = (0..3).filter(|i| *i != victim).collect();
    let t = Instant::now();
    let mut made = 0;
    while made < lost && t.elapsed() < Duration::from_secs(20) {
        let d = &nodes[others[made % 2]];
        if create(d, &format!("alice:after{made}")).status == 0 {
            made += 1;
        } else {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    assert_eq!(made, lost, "the dead node's room did not come back");
    assert!(
        t.elapsed() >= Duration::from_secs(1),
        "room came back before the lease could expire"
    );
    assert_eq!(reservations(&etcd).len(), 5);
    assert_ne!(create(&nodes[others[0]], "alice:one-too-many").status, 0);
    // The survivors report the dead node's unikernels lost (each looks
    // once a second).
    let lost_rows = || {
        let r = nodes[others[0]].cli(&["list", "--cluster"]);
        ok(&r).lines().filter(|l| l.contains("LOST")).count()
    };
    nodes[others[0]].wait_for(10, "the lost unikernels", || lost_rows() == lost);
    nodes[others[1]].wait_for(10, "the report of the lost ones", || {
        nodes[others[1]].log().contains("its unikernels are lost")
    });
    drop(nodes.remove(victim));
}

#[test]
fn admission_goes_on_with_one_etcd_member_down_and_stops_without_quorum() {
    if !kvm() {
        return;
    }
    let etcd = EtcdCluster::start(3);
    // Kept on partition: with quorum gone, a node cannot tell a dead etcd
    // from being cut off with a minority, and would otherwise fence.
    let nodes: Vec<Daemon> = (0..2)
        .map(|i| node(&etcd, i, &["--keep-on-partition"]))
        .collect();
    ok(&create(&nodes[0], "alice:a"));
    etcd.kill(0);
    etcd.wait_healthy();
    ok(&create(&nodes[1], "alice:b"));
    let pids: Vec<u32> = nodes.iter().flat_map(|d| d.unit_pids()).collect();
    assert_eq!(pids.len(), 2);
    etcd.kill(1);
    let t = Instant::now();
    let r = create(&nodes[0], "alice:c");
    assert_ne!(r.status, 0, "admitted without quorum: {r:?}");
    assert!(
        r.stderr.contains("etcd") || r.stderr.contains("cut off"),
        "not a clear error: {r:?}"
    );
    assert!(t.elapsed() < Duration::from_secs(30));
    // The running unikernels run on, past the lease's TTL.
    std::thread::sleep(Duration::from_secs(4));
    for p in &pids {
        assert!(tt_tests::kill(*p, 0), "unikernel {p} was stopped");
    }
    etcd.restart(1);
    etcd.wait_healthy();
    // Back: admission works again.
    let t = Instant::now();
    loop {
        let r = create(&nodes[1], "alice:d");
        if r.status == 0 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "{r:?}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn a_node_cut_off_from_etcd_stops_its_unikernels_before_others_can_take_their_room() {
    if !kvm() {
        return;
    }
    let etcd = EtcdCluster::start(3);
    let nodes: Vec<Daemon> = (0..2).map(|i| node(&etcd, i, &[])).collect();
    ok(&nodes[0].cli(&["policy", "set", "alice", "--unikernels", "2", "--daemon"]));
    ok(&create(&nodes[0], "alice:a"));
    ok(&create(&nodes[0], "alice:b"));
    assert_ne!(create(&nodes[1], "alice:c").status, 0, "over the limit");
    assert_eq!(nodes[0].unit_pids().len(), 2);

    // Cut node 0 off: its link to the cluster's network goes down.
    let t = Instant::now();
    nodes[0].netns.as_ref().unwrap().set_up("eth0", false);
    let mut fenced_at = None;
    let mut room_at = None;
    while (fenced_at.is_none() || room_at.is_none()) && t.elapsed() < Duration::from_secs(30) {
        if fenced_at.is_none() && nodes[0].unit_pids().is_empty() {
            fenced_at = Some(t.elapsed());
        }
        if room_at.is_none() && create(&nodes[1], "alice:c").status == 0 {
            room_at = Some(t.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let (fenced_at, room_at) = (
        fenced_at.expect("node 0 never stopped its unikernels"),
        room_at.expect("the room never came back"),
    );
    assert!(
        fenced_at < room_at,
        "the room was reused ({room_at:?}) while node 0's unikernels still ran (until {fenced_at:?})"
    );
    assert!(nodes[0].log().contains("fencing"), "{}", nodes[0].log());
    // A create on the cut-off node is refused, saying why.
    let r = create(&nodes[0], "alice:d");
    assert_ne!(r.status, 0);
    assert!(r.stderr.contains("etcd"), "{r:?}");
    // Back on the network, it admits again (within the room there is).
    nodes[0].netns.as_ref().unwrap().set_up("eth0", true);
    let t = Instant::now();
    loop {
        let r = create(&nodes[0], "alice:e");
        if r.status == 0 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{r:?}\n{}",
            nodes[0].log()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn create_anywhere_places_each_unikernel_on_the_node_with_the_most_free_memory() {
    if !kvm() {
        return;
    }
    let etcd = EtcdCluster::start(3);
    let nodes: Vec<Daemon> = (0..3).map(|i| node(&etcd, i, &[])).collect();
    let mut on = Vec::new();
    for k in 0..3 {
        let r = nodes[0].cli(&[
            "create",
            &format!("alice:any{k}"),
            "--anywhere",
            "--mem=8",
            guest("unit").to_str().unwrap(),
            "--",
            "tick",
            "1000",
        ]);
        let out = ok(&r);
        let node = out
            .split("created on node ")
            .nth(1)
            .and_then(|s| s.split(',').next())
            .unwrap_or_else(|| panic!("{r:?}"))
            .to_string();
        on.push(node);
    }
    // All nodes offer the same memory: each next one goes where the most
    // is free, so the three spread over the three nodes.
    on.sort();
    assert_eq!(on, ["n0", "n1", "n2"]);
    for d in &nodes {
        assert_eq!(d.unit_pids().len(), 1, "{}", d.log());
    }
    let r = nodes[1].cli(&["list", "--cluster"]);
    for n in ["n0", "n1", "n2"] {
        assert!(
            ok(&r)
                .lines()
                .any(|l| l.starts_with(n) && l.contains("alice:any")),
            "{r:?}"
        );
    }
    // A node's unikernel is that node's: listed and destroyed there.
    let r = nodes[2].cli(&["list"]);
    assert!(ok(&r).contains("alice:any"), "{r:?}");
}

#[test]
fn nodes_speak_tls_to_etcd_and_one_without_a_client_certificate_is_refused() {
    if !kvm() {
        return;
    }
    let etcd = EtcdCluster::start_tls(3);
    assert!(
        etcd.endpoints().starts_with("https://"),
        "{}",
        etcd.endpoints()
    );
    let c = etcd.certs.as_ref().unwrap();
    let tls = [
        format!("--cluster-ca={}", c.ca.display()),
        format!("--cluster-cert={}", c.client_cert.display()),
        format!("--cluster-key={}", c.client_key.display()),
    ];
    let tls: Vec<&str> = tls.iter().map(String::as_str).collect();
    let n0 = node(&etcd, 0, &tls);
    ok(&n0.cli(&["policy", "set", "alice", "--unikernels", "1", "--daemon"]));
    ok(&create(&n0, "alice:a"));
    assert_ne!(create(&n0, "alice:b").status, 0, "over the limit");
    assert_eq!(reservations(&etcd).len(), 1);

    // Without its client certificate, a node cannot join.
    let mut d = Daemon::new(
        "cluster-nocert",
        &[
            &format!("--cluster={}", etcd.endpoints()),
            "--node-id=n1",
            TTL,
            tls[0],
        ],
    );
    d.netns = Some(etcd.node_netns(1));
    let r = tt_tests::tt_with(
        d.command(tt_tests::tt_host())
            .arg("daemon")
            .arg(format!("--state-dir={}", d.state_dir().display()))
            .arg(format!("--runtime-dir={}", d.runtime_dir().display()))
            .args(&d.options),
    );
    assert_ne!(r.status, 0, "joined without a client certificate: {r:?}");
    assert!(r.stderr.contains("cannot reach etcd"), "{r:?}");
}

/// A reservation of `cu` CU-seconds for `pool`, signed with `seed`.
fn reservation(d: &Daemon, id: &str, pool: &str, cu: u64, seed: &str) -> String {
    let payload = d.dir.path(&format!("{id}.payload"));
    std::fs::write(
        &payload,
        format!(r#"{{"id":"{id}","pool":"{pool}","customer":"alice","cu":{cu},"su":0,"ipv4u":0}}"#),
    )
    .unwrap();
    let r = d.cli(&[
        "pool",
        "sign",
        &format!("--key={seed}"),
        &payload.display().to_string(),
    ]);
    let env = d.dir.path(&format!("{id}.json"));
    std::fs::write(&env, ok(&r)).unwrap();
    env.display().to_string()
}

/// `tt-host create NAME --pool=POOL` (0.5 CU per second) on `d`.
fn create_in_pool(d: &Daemon, name: &str, pool: &str, extra: &[&str]) -> Run {
    let mut args = vec!["create", name];
    args.extend_from_slice(extra);
    let pool = format!("--pool={pool}");
    let image = guest("unit").display().to_string();
    args.extend_from_slice(&[&pool, "--mem=2048", &image, "--", "tick", "100000"]);
    d.cli(&args)
}

/// The state column of `name` in `d`'s `tt-host list`.
fn state(d: &Daemon, name: &str) -> String {
    let r = d.cli(&["list"]);
    ok(&r)
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .map(|l| l.split_whitespace().skip(1).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

#[test]
fn pools_are_the_clusters_reservations_count_once_and_a_pool_empties_on_every_node_at_once() {
    if !kvm() {
        return;
    }
    let etcd = EtcdCluster::start(3);
    let pool_opts = ["--pool-min-run=1", "--pool-warning=1"];
    let mut nodes: Vec<Daemon> = (0..3).map(|i| node(&etcd, i, &pool_opts)).collect();
    let seed = nodes[0].add_key("alice");
    let r = nodes[0].cli(&["pool", "create", "p1", "--owner=alice", "--nodes=n0,n1"]);
    ok(&r);
    // One set of pools: n2 sees it, with its node list.
    let r = nodes[2].cli(&["pool", "show", "p1"]);
    assert!(ok(&r).contains("nodes n0,n1"), "{r:?}");
    let again = nodes[1].cli(&["pool", "create", "p1", "--owner=alice"]);
    assert!(
        again.stderr.contains("exists in the cluster"),
        "{again:?}\n{}",
        nodes[1].log()
    );

    // A reservation made on n1 with the key added on n0 tops up the one
    // pool; the same reservation on n0 is a replay.
    let r1 = reservation(&nodes[1], "r1", "p1", 15, &seed);
    let r = nodes[1].cli(&["pool", "reserve", &r1]);
    assert!(ok(&r).contains("reservation r1 accepted"), "{r:?}");
    let replay = nodes[0].cli(&["pool", "reserve", &r1]);
    assert_ne!(replay.status, 0, "{replay:?}");
    assert!(replay.stderr.contains("replayed"), "{replay:?}");
    let r = nodes[2].cli(&["pool", "show", "p1"]);
    assert!(ok(&r).contains("CU left 15.000"), "{r:?}");

    // n0 and n1 draw from it; n2 is not on its list.
    ok(&create_in_pool(&nodes[0], "web0", "p1", &[]));
    ok(&create_in_pool(&nodes[1], "web1", "p1", &[]));
    let r = create_in_pool(&nodes[2], "web2", "p1", &[]);
    assert_ne!(r.status, 0, "{r:?}");
    assert!(r.stderr.contains("pool p1 is for nodes n0, n1"), "{r:?}");
    let r = nodes[2].cli(&["pool", "show", "p1"]);
    assert!(ok(&r).contains("CU left"), "{r:?}");
    assert!(r.stdout.contains("draw 1.000000 per second"), "{r:?}");
    assert!(r.stdout.contains("drawn by 1 unikernel(s) on n0"), "{r:?}");
    assert!(r.stdout.contains("drawn by 1 unikernel(s) on n1"), "{r:?}");
    // Placement keeps to the pool's nodes.
    let r = create_in_pool(&nodes[2], "web3", "p1", &["--anywhere"]);
    assert!(ok(&r).contains("created on node n"), "{r:?}");
    assert!(!r.stdout.contains("node n2"), "{r:?}");

    // 15 CU-s at 1.5 CU/s: the pool empties within 10 s, and every node
    // stops its unikernels then (all see the same counters).
    let t = Instant::now();
    let mut stopped: Vec<(String, Duration)> = Vec::new();
    while stopped.len() < 3 && t.elapsed() < Duration::from_secs(30) {
        for (i, name) in [(0, "web0"), (1, "web1"), (0, "web3"), (1, "web3")] {
            let s = state(&nodes[i], name);
            if s.contains("stopped: pool p1 empty") && !stopped.iter().any(|(n, _)| n == name) {
                stopped.push((name.to_string(), t.elapsed()));
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(stopped.len(), 3, "stopped: {stopped:?}");
    let first = stopped.iter().map(|s| s.1).min().unwrap();
    let last = stopped.iter().map(|s| s.1).max().unwrap();
    assert!(
        last - first < Duration::from_secs(3),
        "not stopped together: {stopped:?}"
    );
    assert!(
        first > Duration::from_secs(5),
        "stopped before 15 CU-s at 1.5 CU/s were spent: {stopped:?}"
    );

    // Topped up again; a node dies: after its lease what its unikernels
    // drew is no longer charged.
    let r2 = reservation(&nodes[0], "r2", "p1", 1000, &seed);
    ok(&nodes[0].cli(&["pool", "reserve", &r2]));
    ok(&nodes[0].cli(&["restart", "web0"]));
    ok(&nodes[1].cli(&["restart", "web1"]));
    let r = nodes[0].cli(&["pool", "show", "p1"]);
    assert!(ok(&r).contains("draw 1.000000 per second"), "{r:?}");
    nodes[1].kill9();
    nodes[1].kill_units();
    nodes[0].wait_for(15, "n1's draw to be taken away", || {
        let r = nodes[0].cli(&["pool", "show", "p1"]);
        r.stdout.contains("draw 0.500000 per second") && !r.stdout.contains("on n1")
    });
    drop(nodes.remove(1));
}

#[test]
fn with_etcd_roles_each_node_writes_its_own_keys_and_not_another_nodes() {
    if !kvm() {
        return;
    }
    // TLS, client certificates and etcd's auth on, with docs/CLUSTER.md's
    // roles: node i's certificate (common name n<i>) is user n<i>.
    let etcd = EtcdCluster::start_tls_auth(3, "/tt-host", 3);
    let c = etcd.certs.as_ref().unwrap();
    let nodes: Vec<Daemon> = (0..3)
        .map(|i| {
            let tls = [
                format!("--cluster-ca={}", c.ca.display()),
                format!("--cluster-cert={}", c.nodes[i].0.display()),
                format!("--cluster-key={}", c.nodes[i].1.display()),
            ];
            let tls: Vec<&str> = tls.iter().map(String::as_str).collect();
            node(&etcd, i, &tls)
        })
        .collect();

    // The nodes admit and release as without auth: a policy (a shared
    // key), creates on every node up to its limit, and the room of a
    // destroyed one comes back.
    ok(&nodes[0].cli(&["policy", "set", "alice", "--unikernels", "3", "--daemon"]));
    for (i, d) in nodes.iter().enumerate() {
        ok(&create(d, &format!("alice:r{i}")));
    }
    let r = create(&nodes[1], "alice:r3");
    assert_ne!(r.status, 0, "over the limit: {r:?}");
    assert!(r.stderr.contains("refused by the cluster"), "{r:?}");
    assert_eq!(reservations(&etcd).len(), 3, "{:?}", reservations(&etcd));
    ok(&nodes[2].cli(&["destroy", "alice:r2"]));
    nodes[0].wait_for(10, "the room of alice:r2", || {
        create(&nodes[0], "alice:r4").status == 0
    });
    let r = nodes[1].cli(&["list", "--cluster"]);
    assert!(
        ok(&r).contains("alice:r4") && !r.stdout.contains("alice:r2"),
        "{r:?}"
    );

    // The leases work under auth (a grant and keep-alives need no key
    // permission): past twice the nodes' 3 s TTL their keys are there.
    std::thread::sleep(Duration::from_secs(7));
    assert_eq!(reservations(&etcd).len(), 3, "{:?}", reservations(&etcd));
    let r = etcd.etcdctl_as_node(0, &["lease", "grant", "30"]);
    let lease = ok(&r)
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("{r:?}"))
        .to_string();
    ok(&etcd.etcdctl_as_node(0, &["lease", "keep-alive", "--once", &lease]));

    // With n0's certificate: n1's usage, reservations and node key are
    // refused, n0's own keys are not.
    let denied = |r: &Run, what: &str| {
        assert_ne!(r.status, 0, "n0 could {what}: {r:?}");
        assert!(r.stderr.contains("permission denied"), "{what}: {r:?}");
    };
    let usage = keys::usage("/tt-host", "n1", &"alice".parse().unwrap());
    let res = keys::res("/tt-host", "n1", "alice:r1");
    let fake = r#"{"unikernels":0,"memory_mb":0,"block_mb":0}"#;
    denied(
        &etcd.etcdctl_as_node(0, &["put", &usage, fake]),
        "write n1's usage",
    );
    denied(
        &etcd.etcdctl_as_node(0, &["del", &res]),
        "delete n1's reservation",
    );
    denied(
        &etcd.etcdctl_as_node(0, &["put", &keys::res("/tt-host", "n1", "alice:x"), "{}"]),
        "add a reservation for n1",
    );
    denied(
        &etcd.etcdctl_as_node(0, &["del", "--prefix", &keys::own("/tt-host", "n1")]),
        "clear n1's keys",
    );
    denied(
        &etcd.etcdctl_as_node(0, &["put", &keys::node("/tt-host", "n1"), "{}"]),
        "replace n1's node key",
    );
    let r = etcd.etcdctl(&["get", "--print-value-only", &usage]);
    assert!(ok(&r).contains("\"unikernels\":1"), "{r:?}");
    assert_eq!(reservations(&etcd).len(), 3);
    // n0 may write below its own prefix, and read everything.
    let mine = format!("{}probe", keys::own("/tt-host", "n0"));
    ok(&etcd.etcdctl_as_node(0, &["put", &mine, "1"]));
    ok(&etcd.etcdctl_as_node(0, &["del", &mine]));
    let r = etcd.etcdctl_as_node(0, &["get", "--print-value-only", &res]);
    assert!(ok(&r).contains("alice:r1"), "{r:?}");
    // And a shared key: a policy.
    ok(&etcd.etcdctl_as_node(
        0,
        &[
            "put",
            &keys::policy("/tt-host", &"bob".parse().unwrap()),
            "{}",
        ],
    ));
    // Nor may it revoke n1's lease (which would take n1's keys with it).
    let r = etcd.etcdctl(&["get", "-w", "json", &keys::node("/tt-host", "n1")]);
    let v: serde_json::Value = serde_json::from_str(ok(&r)).unwrap();
    let n1_lease = v["kvs"][0]["lease"]
        .as_i64()
        .expect("n1's key is on a lease");
    denied(
        &etcd.etcdctl_as_node(0, &["lease", "revoke", &format!("{n1_lease:x}")]),
        "revoke n1's lease",
    );
    // The cluster's usage, read by a node through its role.
    let r = nodes[0].cli(&["policy", "show", "alice", "--daemon"]);
    assert!(ok(&r).contains("3 unikernel(s)"), "{r:?}");
    // Nothing a node does on its own was refused.
    for d in &nodes {
        assert!(!d.log().contains("refuses this node"), "{}", d.log());
    }

    // Policies kept to the operator (docs/CLUSTER.md): without write on
    // policy/, a node's policy set is refused, saying so at once.
    ok(&etcd.etcdctl(&[
        "role",
        "revoke-permission",
        "tt-host",
        "--prefix",
        "/tt-host/policy/",
    ]));
    let t = Instant::now();
    let r = nodes[1].cli(&["policy", "set", "alice", "--unikernels", "9", "--daemon"]);
    assert_ne!(r.status, 0, "{r:?}");
    assert!(
        r.stderr.contains("etcd refuses this node's request"),
        "{r:?}"
    );
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    let r = nodes[1].cli(&["policy", "show", "alice", "--daemon"]);
    assert!(ok(&r).contains("\"unikernels\":3"), "{r:?}");
}
