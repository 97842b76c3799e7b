//! Edge cases of the cluster's etcd store (host/src/cluster) that a
//! daemon meets only by timing, driven here directly against a real
//! etcd (one member in its own network namespace; the clients in a
//! node's namespace). No KVM, no daemon.
//!
//! - A name this node admits again with another claim, before the
//!   release of its earlier run: the cluster counts the new claim, not
//!   the old one (a `tt-host run` of a name that ended a moment ago,
//!   relaunched with more memory).
//! - A pool's draws are taken away only from nodes that are not members:
//!   a node that comes back (or joins) after another looked at the
//!   membership keeps its draws.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};
use tt_host::cluster::check::Claim;
use tt_host::cluster::pools::ClusterPool;
use tt_host::cluster::store::{Cluster, Config};
use tt_host::pools::{Draw, Pool};
use tt_host::resources::{Name, PartialPolicy, Path};
use tt_tests::etcd::EtcdCluster;

const PREFIX: &str = "/store";

fn config(endpoints: &str, node: &str, ttl: Duration) -> Config {
    Config {
        endpoints: endpoints.split(',').map(String::from).collect(),
        node: node.to_string(),
        prefix: PREFIX.to_string(),
        ttl,
        keep_on_partition: false,
        tls: None,
    }
}

fn name(s: &str) -> Name {
    s.parse().expect("a valid name")
}

fn mb(memory_mb: u64) -> Claim {
    Claim {
        memory_mb,
        block_mb: 0,
    }
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_nanos() as u64
}

/// The unikernels and MB of memory the cluster counts below `path`.
async fn running(n: &Cluster, path: &Path) -> (u64, u64) {
    let used = n.usage(path).await.expect("the cluster's usage");
    (used.unikernels, used.memory_mb)
}

#[test]
fn a_name_admitted_again_with_another_claim_counts_with_the_new_one() {
    let etcd = EtcdCluster::start(1);
    let endpoints = etcd.endpoints();
    let ns = etcd.node_netns(0);
    ns.block_on(|| async {
        let ttl = Duration::from_secs(10);
        let n0 = Cluster::connect(config(&endpoints, "n0", ttl))
            .await
            .expect("n0 joins");
        let n1 = Cluster::connect(config(&endpoints, "n1", ttl))
            .await
            .expect("n1 joins");
        let alice: Path = "alice".parse().expect("a path");
        let policy = PartialPolicy {
            memory_mb: Some(96),
            ..Default::default()
        };
        n0.put_policy(&alice, Some(&policy))
            .await
            .expect("set alice's policy");

        n0.admit(&name("alice:web"), mb(32))
            .await
            .expect("web's first run: 32 of 96 MB");
        // The run ends; before its node releases it, web runs again, with
        // twice the memory.
        n0.admit(&name("alice:web"), mb(64))
            .await
            .expect("web's second run: 64 of 96 MB");
        assert_eq!(
            running(&n1, &alice).await,
            (1, 64),
            "alice runs one unikernel of 64 MB"
        );
        let err = n1
            .admit(&name("alice:db"), mb(64))
            .await
            .expect_err("64 MB more than web's 64 is over alice's 96");
        assert!(
            err.to_string().contains("memory"),
            "the refusal names memory: {err}"
        );
        n1.admit(&name("alice:db"), mb(32))
            .await
            .expect("32 MB more fit");

        // The same claim again is a registration: nothing changes.
        n0.admit(&name("alice:web"), mb(64))
            .await
            .expect("web registered again");
        assert_eq!(running(&n1, &alice).await, (2, 96));
        let res = n1.reservations().await.expect("the reservations");
        let web: Vec<_> = res.iter().filter(|r| r.name == "alice:web").collect();
        assert_eq!(web.len(), 1, "one reservation for web: {res:?}");
        assert_eq!((web[0].node.as_str(), web[0].claim), ("n0", mb(64)));

        // Its release gives back all 64 MB.
        n0.release(&name("alice:web")).await.expect("release web");
        assert_eq!(running(&n1, &alice).await, (1, 32));
        n1.admit(&name("alice:cache"), mb(64))
            .await
            .expect("web's 64 MB are free again");
    });
}

#[test]
fn a_pools_draws_are_taken_only_from_nodes_that_are_not_members() {
    let etcd = EtcdCluster::start(1);
    let endpoints = etcd.endpoints();
    let ns = etcd.node_netns(0);
    ns.block_on(|| async {
        let n0 = Cluster::connect(config(&endpoints, "n0", Duration::from_secs(10)))
            .await
            .expect("n0 joins");
        // n2's lease is short and never renewed: it dies.
        let n2 = Cluster::connect(config(&endpoints, "n2", Duration::from_secs(3)))
            .await
            .expect("n2 joins");
        let mut pool = Pool::new("p", now_ns());
        pool.top_up(3600, 0, 0, now_ns()).expect("top up");
        n0.pool_create(ClusterPool {
            pool,
            owner: "alice".into(),
            sponsor: None,
            nodes: None,
            draws: Default::default(),
        })
        .await
        .expect("create pool p");
        let one_cu = Draw {
            cu: 1_000_000,
            su: 0,
            ipv4u: 0,
        };
        for (node, unit) in [(&n0, "web"), (&n2, "db")] {
            node.pool_start_drawing("p", unit, one_cu, now_ns(), 0)
                .await
                .expect("draw from p");
        }
        assert_eq!(drawing(&n0).await, ["n0", "n2"].map(String::from).into());

        // n0 is a member: a stale look that took it for gone (n1's view
        // before n0 came back) must not take its draws away.
        let stale: BTreeSet<String> = ["n0".to_string()].into();
        let forgot = n2.pool_forget_nodes("p", &stale, now_ns()).await;
        assert!(forgot.is_err(), "n0 is a member: {forgot:?}");
        assert_eq!(drawing(&n0).await, ["n0", "n2"].map(String::from).into());

        // n2 dies (its lease expires): then its draws go.
        let deadline = Instant::now() + Duration::from_secs(15);
        while n0
            .membership()
            .await
            .expect("the members")
            .contains_key("n2")
        {
            assert!(Instant::now() < deadline, "n2's lease never expired");
            n0.keep_alive().await.expect("n0 keeps its lease");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let gone: BTreeSet<String> = ["n2".to_string()].into();
        n0.pool_forget_nodes("p", &gone, now_ns())
            .await
            .expect("forget n2's draws");
        assert_eq!(drawing(&n0).await, ["n0"].map(String::from).into());
        let view = n0.pool_view().await.expect("the pools");
        let (p, _) = view.pools.first().expect("pool p");
        assert_eq!(p.pool.draw(), one_cu, "only web draws from p");
    });
}

/// The nodes drawing from pool `p`.
async fn drawing(n: &Cluster) -> BTreeSet<String> {
    let view = n.pool_view().await.expect("the pools");
    let (p, _) = (view.pools.into_iter())
        .find(|(p, _)| p.pool.name() == "p")
        .expect("pool p");
    p.draws.keys().cloned().collect()
}
