//! The etcd harness itself: a 3-member cluster reached from a node's
//! namespace keeps accepting writes with one member down, refuses them
//! with two down, and recovers when they come back.

use tt_tests::etcd::EtcdCluster;
use tt_tests::netns::Netns;
use tt_tests::Run;

/// A put of `key` from `node`'s namespace, giving up after `timeout`
/// (long enough for an election when a write should succeed: the killed
/// member may have been the leader).
fn put(c: &EtcdCluster, node: &Netns, key: &str, value: &str, timeout: &str) -> Run {
    let timeout = format!("--command-timeout={timeout}");
    c.etcdctl_in(node, &[&timeout, "put", key, value])
}

#[test]
fn quorum_survives_one_member_down_not_two() {
    let c = EtcdCluster::start(3);
    let node = c.node_netns(0);

    let r = put(&c, &node, "/tt-host/a", "1", "5s");
    assert_eq!(r.status, 0, "put with all members up: {r:?}");
    let r = c.etcdctl_in(&node, &["get", "--print-value-only", "/tt-host/a"]);
    assert_eq!((r.status, r.stdout.trim()), (0, "1"), "{r:?}");

    c.kill(2);
    assert!(!c.is_running(2));
    // A write that reaches a member still following the killed leader
    // waits out the server's request timeout: first let the two elect one.
    c.wait_healthy();
    let r = put(&c, &node, "/tt-host/b", "2", "5s");
    assert_eq!(r.status, 0, "put with 2 of 3 up: {r:?}\n{}", c.logs());

    c.kill(1);
    let r = put(&c, &node, "/tt-host/c", "3", "1s");
    assert_ne!(r.status, 0, "put with 1 of 3 members up succeeded: {r:?}");

    c.restart(1);
    c.restart(2);
    assert!(c.is_running(1) && c.is_running(2));
    c.wait_healthy();
    let r = put(&c, &node, "/tt-host/d", "4", "5s");
    assert_eq!(r.status, 0, "put after the restarts: {r:?}\n{}", c.logs());

    // Every write that succeeded is there. The one without quorum timed
    // out, which is no refusal: the member left may have put it in its
    // log, and then the quorum back commits it (seen in a CI run). Either
    // way, nothing else is there.
    let r = c.etcdctl(&["get", "--prefix", "/tt-host/", "--keys-only"]);
    let keys: Vec<&str> = r.stdout.split_whitespace().collect();
    assert!(
        keys == ["/tt-host/a", "/tt-host/b", "/tt-host/d"]
            || keys == ["/tt-host/a", "/tt-host/b", "/tt-host/c", "/tt-host/d"],
        "{r:?}"
    );
}

#[test]
fn nodes_have_namespaces_of_their_own() {
    let c = EtcdCluster::start(3);
    let a = c.node_netns(0);
    let b = c.node_netns(1);
    let r = put(&c, &a, "/tt-host/from-a", "a", "5s");
    assert_eq!(r.status, 0, "{r:?}");
    let r = c.etcdctl_in(&b, &["get", "--print-value-only", "/tt-host/from-a"]);
    assert_eq!((r.status, r.stdout.trim()), (0, "a"), "{r:?}");
    // The nodes reach each other over the cluster's bridge too.
    let mut pinger = a.pinger();
    let echoes = pinger.ping(
        EtcdCluster::node_addr(1),
        tt_tests::netns::Ping::until_answered(1, 8, std::time::Duration::from_millis(100)),
    );
    assert_eq!(echoes.received, 1, "node 0 reaches node 1 over the bridge");
}
