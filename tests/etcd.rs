//! A real etcd cluster for the end-to-end tests: members that can be
//! killed and restarted, and network namespaces for the tt-host nodes that
//! use it.
//!
//! The cluster runs in a network namespace of its own, "the cluster
//! network": a bridge `br0` with [`CLUSTER_ADDR`] (10.77.0.1/24), member
//! `i` listening on it for clients on port `2379 + 10 i` and for peers on
//! `2380 + 10 i`. Because every cluster has its own namespace, the fixed
//! addresses and ports never collide between tests running in parallel,
//! and nothing leaves the namespaces the test creates. A node (a tt-host
//! daemon) runs in a namespace of its own ([`EtcdCluster::node_netns`])
//! linked to the bridge by a veth pair, its side `eth0` with
//! 10.77.0.(10 + i)/24; it reaches the members at
//! [`EtcdCluster::endpoints`].
//!
//! Dropped (also when a test fails), the cluster SIGKILLs its members,
//! waits for them and removes their data; its namespace goes with its
//! last file descriptor and process.
//!
//! The tests need etcd and etcdctl (Debian: `etcd-server`, `etcd-client`)
//! and fail loudly without them.

use crate::netns::Netns;
use crate::{Run, Scratch};
use std::fs::File;
use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The members' address on the cluster network's bridge.
pub const CLUSTER_ADDR: [u8; 4] = [10, 77, 0, 1];

/// How long [`EtcdCluster::start`] and [`EtcdCluster::wait_healthy`] wait
/// for every running member to answer before they panic.
const HEALTHY_WITHIN: Duration = Duration::from_secs(20);

const ETCD: &str = "/usr/bin/etcd";
const ETCDCTL: &str = "/usr/bin/etcdctl";

/// Panic unless etcd and etcdctl are installed.
fn require_etcd() {
    for p in [ETCD, ETCDCTL] {
        assert!(
            Path::new(p).exists(),
            "{p} is missing: etcd is needed (apt-get install etcd-server etcd-client)"
        );
    }
}

fn ip(a: [u8; 4]) -> String {
    format!("{}.{}.{}.{}", a[0], a[1], a[2], a[3])
}

/// One member: its name, ports and, while it runs, its process.
struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
    /// Clients speak TLS to it (`https://`).
    tls: bool,
}

impl Member {
    fn client_url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}:{}", ip(CLUSTER_ADDR), self.client_port)
    }
    fn peer_url(&self) -> String {
        format!("http://{}:{}", ip(CLUSTER_ADDR), self.peer_port)
    }
    /// True while its process runs (reaping it if it exited).
    fn running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }
    /// SIGKILL it and wait for it (nothing if it is not running).
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A running etcd cluster; see the module doc.
pub struct EtcdCluster {
    /// The cluster network: the bridge and the members.
    ns: Netns,
    members: Mutex<Vec<Member>>,
    /// `name=peer-url,...` for `--initial-cluster`.
    initial_cluster: String,
    token: String,
    /// Data directories (`<name>.etcd`) and logs (`<name>.log`).
    dir: Scratch,
    /// With TLS: the certificates ([`EtcdCluster::start_tls`]).
    pub certs: Option<Certs>,
}

/// TLS material in PEM files, made with `openssl` for one test: a CA, the
/// members' server certificate (for 10.77.0.1), a client certificate the
/// CA signed (the harness's own etcdctl uses it), and one per node.
pub struct Certs {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// Node `i`'s client certificate and key, common name `n<i>`: with
    /// etcd's auth on, it is user `n<i>` ([`EtcdCluster::start_tls_auth`]).
    pub nodes: Vec<(PathBuf, PathBuf)>,
}

impl Certs {
    /// With the client certificate's common name `client_cn` and `nodes`
    /// node certificates.
    fn make(dir: &Scratch, client_cn: &str, nodes: usize) -> Certs {
        let p = |n: &str| dir.path(n);
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .output()
                .expect("openssl is needed for the TLS tests (apt-get install openssl)");
            assert!(out.status.success(), "openssl {args:?}: {out:?}");
        };
        let s = |p: &PathBuf| p.display().to_string();
        let certs = Certs {
            ca: p("ca.pem"),
            server_cert: p("server.pem"),
            server_key: p("server.key"),
            client_cert: p("client.pem"),
            client_key: p("client.key"),
            nodes: (0..nodes)
                .map(|i| (p(&format!("n{i}.pem")), p(&format!("n{i}.key"))))
                .collect(),
        };
        let ca_key = p("ca.key");
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=tt-tests etcd CA",
            "-keyout",
            &s(&ca_key),
            "-out",
            &s(&certs.ca),
        ]);
        let client = "extendedKeyUsage=clientAuth";
        let mut issue = vec![
            (
                &certs.server_cert,
                &certs.server_key,
                "etcd".to_string(),
                "subjectAltName=IP:10.77.0.1",
            ),
            (
                &certs.client_cert,
                &certs.client_key,
                client_cn.to_string(),
                client,
            ),
        ];
        for (i, (cert, key)) in certs.nodes.iter().enumerate() {
            issue.push((cert, key, format!("n{i}"), client));
        }
        for (cert, key, cn, ext) in issue {
            let csr = p(&format!("{cn}.csr"));
            let extfile = p(&format!("{cn}.ext"));
            std::fs::write(&extfile, format!("{ext}\n")).unwrap();
            openssl(&[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-subj",
                &format!("/CN={cn}"),
                "-keyout",
                &s(key),
                "-out",
                &s(&csr),
            ]);
            openssl(&[
                "x509",
                "-req",
                "-in",
                &s(&csr),
                "-CA",
                &s(&certs.ca),
                "-CAkey",
                &s(&ca_key),
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &s(&extfile),
                "-out",
                &s(cert),
            ]);
        }
        certs
    }
}

impl EtcdCluster {
    /// Start `members` members forming one new cluster, and wait until it
    /// is healthy (every member answers and a write succeeds).
    pub fn start(members: usize) -> EtcdCluster {
        Self::start_with(members, None)
    }

    /// [`EtcdCluster::start`], with clients speaking TLS and proving
    /// themselves with a certificate (`--client-cert-auth`): see
    /// [`EtcdCluster::certs`].
    pub fn start_tls(members: usize) -> EtcdCluster {
        Self::start_with(members, Some(("tt-host", 0)))
    }

    /// [`EtcdCluster::start_tls`] with etcd's authentication on and the
    /// roles of docs/CLUSTER.md ("Roles", [`roles_commands`]) for `nodes`
    /// nodes `n0`, `n1`, ... below `prefix`: each node's certificate
    /// ([`Certs::nodes`]) makes it user `n<i>`, who may write its own keys
    /// and the shared ones only. The harness's own certificate is user
    /// `root`'s.
    pub fn start_tls_auth(members: usize, prefix: &str, nodes: usize) -> EtcdCluster {
        let cluster = Self::start_with(members, Some(("root", nodes)));
        let names: Vec<String> = (0..nodes).map(|i| format!("n{i}")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        for cmd in roles_commands(prefix, &names) {
            let args: Vec<&str> = cmd.iter().map(String::as_str).collect();
            let r = cluster.etcdctl(&args);
            assert_eq!(r.status, 0, "etcdctl {cmd:?}: {r:?}");
        }
        let r = cluster.etcdctl(&["auth", "enable"]);
        assert_eq!(r.status, 0, "etcdctl auth enable: {r:?}");
        cluster.wait_healthy();
        cluster
    }

    /// `tls`: the harness's client certificate's common name and the
    /// number of node certificates.
    fn start_with(members: usize, tls: Option<(&str, usize)>) -> EtcdCluster {
        require_etcd();
        assert!(
            (1..=9).contains(&members),
            "an etcd cluster of {members} members"
        );
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let token = format!("tt-tests-{}-{n}", std::process::id());

        let ns = Netns::new();
        ns.add_bridge("br0");
        ns.set_addr("br0", CLUSTER_ADDR, 24);
        ns.set_up("br0", true);

        let members: Vec<Member> = (0..members)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: 2379 + 10 * i as u16,
                peer_port: 2380 + 10 * i as u16,
                child: None,
                tls: tls.is_some(),
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect::<Vec<_>>()
            .join(",");
        let cluster = EtcdCluster {
            ns,
            members: Mutex::new(members),
            initial_cluster,
            token,
            dir: Scratch::new("etcd"),
            certs: None,
        };
        let mut cluster = cluster;
        if let Some((client_cn, nodes)) = tls {
            cluster.certs = Some(Certs::make(&cluster.dir, client_cn, nodes));
        }
        for i in 0..cluster.len() {
            cluster.spawn(i, "new");
        }
        cluster.wait_healthy();
        cluster
    }

    /// The number of members (running or not).
    pub fn len(&self) -> usize {
        self.members.lock().unwrap().len()
    }

    /// Always false: a cluster has at least one member.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The client URLs of every member (running or not), comma-separated,
    /// as `--endpoints` takes them; reachable from the cluster network and
    /// from every [`EtcdCluster::node_netns`].
    pub fn endpoints(&self) -> String {
        let members = self.members.lock().unwrap();
        let urls: Vec<String> = members.iter().map(Member::client_url).collect();
        urls.join(",")
    }

    /// The client URL of member `i`.
    pub fn endpoint(&self, i: usize) -> String {
        self.members.lock().unwrap()[i].client_url()
    }

    /// Node `i`'s address in its namespace ([`EtcdCluster::node_netns`]).
    pub fn node_addr(i: usize) -> [u8; 4] {
        assert!(i < 200, "node {i}: the cluster network has room for 200");
        [10, 77, 0, 10 + i as u8]
    }

    /// A new network namespace for node `i`, linked to the cluster network:
    /// its `eth0` has [`EtcdCluster::node_addr`]`(i)`/24 and is up, its
    /// peer `vn<i>` is a port of the cluster's bridge. Dropping it (and
    /// ending what runs in it) unlinks it. One per node number at a time.
    pub fn node_netns(&self, i: usize) -> Netns {
        let addr = Self::node_addr(i);
        let node = Netns::new();
        let port = format!("vn{i}");
        self.ns.add_veth(&port, "eth0", &node);
        self.ns.attach_to_bridge("br0", &port);
        self.ns.set_up(&port, true);
        node.set_addr("eth0", addr, 24);
        node.set_up("eth0", true);
        node
    }

    /// A `tt-host daemon` as node `n<i>` of this cluster (a 3 s lease, so
    /// that tests see expiries quickly), in [`EtcdCluster::node_netns`]`(i)`,
    /// its scratch directory tagged `tag`, with `extra` options; started
    /// (it answers once it has joined).
    pub fn node_daemon(&self, i: usize, tag: &str, extra: &[&str]) -> crate::daemon::Daemon {
        let mut opts = vec![
            format!("--cluster={}", self.endpoints()),
            format!("--node-id=n{i}"),
            "--lease-ttl=3".to_string(),
        ];
        opts.extend(extra.iter().map(|s| s.to_string()));
        let opts: Vec<&str> = opts.iter().map(String::as_str).collect();
        let mut d = crate::daemon::Daemon::new(&format!("{tag}-n{i}"), &opts);
        d.netns = Some(self.node_netns(i));
        d.start();
        d
    }

    /// Run `etcdctl ARGS` against every member from the cluster network.
    pub fn etcdctl(&self, args: &[&str]) -> Run {
        self.etcdctl_in(&self.ns, args)
    }

    /// Run `etcdctl ARGS` against every member from namespace `ns` (a
    /// [`EtcdCluster::node_netns`]). It dials for up to 2 s and gives a
    /// command 5 s unless `args` say otherwise (`--command-timeout=1s`).
    pub fn etcdctl_in(&self, ns: &Netns, args: &[&str]) -> Run {
        self.etcdctl_at(ns, &self.endpoints(), args)
    }

    /// Run `etcdctl ARGS` against every member from the cluster network,
    /// with node `node`'s certificate ([`Certs::nodes`]): as user
    /// `n<node>` when etcd's auth is on.
    pub fn etcdctl_as_node(&self, node: usize, args: &[&str]) -> Run {
        let c = self.certs.as_ref().expect("a cluster with TLS");
        let (cert, key) = c
            .nodes
            .get(node)
            .unwrap_or_else(|| panic!("no certificate for node {node}"));
        self.etcdctl_with(&self.ns, &self.endpoints(), Some((cert, key)), args)
    }

    /// Run `etcdctl ARGS` against `endpoints` from namespace `ns` (etcdctl
    /// adds a second `--endpoints` to the first rather than replacing it).
    fn etcdctl_at(&self, ns: &Netns, endpoints: &str, args: &[&str]) -> Run {
        let own = self.certs.as_ref().map(|c| (&c.client_cert, &c.client_key));
        self.etcdctl_with(ns, endpoints, own, args)
    }

    /// [`EtcdCluster::etcdctl_at`] with the client certificate `cert`.
    fn etcdctl_with(
        &self,
        ns: &Netns,
        endpoints: &str,
        cert: Option<(&PathBuf, &PathBuf)>,
        args: &[&str],
    ) -> Run {
        let endpoints = format!("--endpoints={endpoints}");
        let mut cmd = ns.command(ETCDCTL);
        clear_etcd_env(&mut cmd);
        cmd.env("ETCDCTL_API", "3")
            .args([&endpoints, "--dial-timeout=2s", "--command-timeout=5s"]);
        if let (Some(c), Some((cert, key))) = (&self.certs, cert) {
            cmd.arg(format!("--cacert={}", c.ca.display()))
                .arg(format!("--cert={}", cert.display()))
                .arg(format!("--key={}", key.display()));
        }
        cmd.args(args);
        run_for(&mut cmd, Duration::from_secs(60))
    }

    /// SIGKILL member `i` and wait for it to be gone (nothing if it is not
    /// running). Its data stays for [`EtcdCluster::restart`].
    pub fn kill(&self, i: usize) {
        self.members.lock().unwrap()[i].kill();
    }

    /// True while member `i`'s process runs.
    pub fn is_running(&self, i: usize) -> bool {
        self.members.lock().unwrap()[i].running()
    }

    /// Start member `i` again on its data directory, and wait until it
    /// listens for clients. It serves them once it has rejoined a
    /// quorum: [`EtcdCluster::wait_healthy`] waits for that.
    pub fn restart(&self, i: usize) {
        assert!(!self.is_running(i), "etcd member {i} runs already");
        self.spawn(i, "existing");
        let addr = SocketAddr::from((CLUSTER_ADDR, self.members.lock().unwrap()[i].client_port));
        let deadline = Instant::now() + HEALTHY_WITHIN;
        loop {
            let up = self
                .ns
                .run(|| TcpStream::connect_timeout(&addr, Duration::from_millis(200)))
                .is_ok();
            if up {
                return;
            }
            if !self.is_running(i) || Instant::now() > deadline {
                panic!(
                    "etcd member {i} did not listen on {addr} after a restart\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Wait until every running member reports itself healthy (which needs
    /// a quorum) and a write through them succeeds; panic with the
    /// members' logs after 20 s.
    pub fn wait_healthy(&self) {
        let deadline = Instant::now() + HEALTHY_WITHIN;
        let mut last;
        loop {
            let running: Vec<String> = {
                let mut members = self.members.lock().unwrap();
                members
                    .iter_mut()
                    .filter_map(|m| m.running().then(|| m.client_url()))
                    .collect()
            };
            assert!(
                !running.is_empty(),
                "no etcd member runs: none can become healthy\n{}",
                self.logs()
            );
            let health = self.etcdctl_at(
                &self.ns,
                &running.join(","),
                &["--command-timeout=1s", "endpoint", "health"],
            );
            last = health;
            if last.status == 0 {
                let put = self.etcdctl(&["--command-timeout=1s", "put", "/tt-tests/probe", "1"]);
                if put.status == 0 {
                    return;
                }
                last = put;
            }
            if Instant::now() > deadline {
                panic!(
                    "the etcd cluster is not healthy after {HEALTHY_WITHIN:?}: {last:?}\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The last lines of every member's log, for panic messages.
    pub fn logs(&self) -> String {
        let members = self.members.lock().unwrap();
        let mut out = String::new();
        for m in members.iter() {
            let path = self.log_path(&m.name);
            let mut text = String::new();
            let _ = File::open(&path).and_then(|mut f| f.read_to_string(&mut text));
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(30)..];
            out += &format!("--- {} (last {} lines)\n", path.display(), tail.len());
            for l in tail {
                out += l;
                out.push('\n');
            }
        }
        out
    }

    fn log_path(&self, name: &str) -> PathBuf {
        self.dir.path(&format!("{name}.log"))
    }

    /// Spawn member `i` with `--initial-cluster-state state`, its output
    /// appended to its log.
    fn spawn(&self, i: usize, state: &str) {
        let mut members = self.members.lock().unwrap();
        let m = &mut members[i];
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path(&m.name))
            .unwrap();
        let mut cmd = self.ns.command(ETCD);
        clear_etcd_env(&mut cmd);
        cmd.arg(format!("--name={}", m.name))
            .arg(format!(
                "--data-dir={}",
                self.dir.path(&format!("{}.etcd", m.name)).display()
            ))
            .arg(format!("--initial-cluster={}", self.initial_cluster))
            .arg(format!("--initial-cluster-state={state}"))
            .arg(format!("--initial-cluster-token={}", self.token))
            .arg(format!("--listen-peer-urls={}", m.peer_url()))
            .arg(format!("--initial-advertise-peer-urls={}", m.peer_url()))
            .arg(format!("--listen-client-urls={}", m.client_url()))
            .arg(format!("--advertise-client-urls={}", m.client_url()))
            // Elections within a second, for tests that kill members.
            .args(["--heartbeat-interval=50", "--election-timeout=500"])
            .args(["--logger=zap", "--log-outputs=stderr"]);
        if let Some(c) = &self.certs {
            cmd.arg(format!("--cert-file={}", c.server_cert.display()))
                .arg(format!("--key-file={}", c.server_key.display()))
                .arg(format!("--trusted-ca-file={}", c.ca.display()))
                .arg("--client-cert-auth");
        }
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("start etcd member {i} ({ETCD}): {e}"));
        m.child = Some(child);
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        // Poisoned when a test panicked holding it: kill the members anyway.
        let members = match self.members.get_mut() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        for m in members.iter_mut() {
            m.kill();
        }
        // Then the fields go: the namespace, and the scratch dir with the
        // members' data.
    }
}

/// The prefixes below a cluster's prefix that every node writes:
/// policies, `create --anywhere`'s requests and answers, pools, signing
/// keys, pool reservations and environments (docs/CLUSTER.md, "Roles").
pub const SHARED_PREFIXES: [&str; 7] = [
    "policy", "assign", "placed", "pools", "keys", "resv", "envs",
];

/// The `etcdctl` commands (their arguments) of docs/CLUSTER.md's "Roles"
/// for nodes `nodes` below `prefix`, before `auth enable`: user `root`
/// (etcd requires it), a role `tt-host` reading everything below the
/// prefix and writing the shared prefixes, and per node a role
/// `tt-host-NODE` writing its own keys (`n/NODE/` and `nodes/NODE`),
/// and a user NODE (no password: its certificate's common name) with both.
pub fn roles_commands(prefix: &str, nodes: &[&str]) -> Vec<Vec<String>> {
    let c = |args: &[&str]| args.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let mut out = vec![
        c(&["user", "add", "root", "--no-password"]),
        c(&["user", "grant-role", "root", "root"]),
        c(&["role", "add", "tt-host"]),
        c(&[
            "role",
            "grant-permission",
            "tt-host",
            "--prefix",
            "read",
            &format!("{prefix}/"),
        ]),
    ];
    for p in SHARED_PREFIXES {
        out.push(c(&[
            "role",
            "grant-permission",
            "tt-host",
            "--prefix",
            "readwrite",
            &format!("{prefix}/{p}/"),
        ]));
    }
    for n in nodes {
        let role = format!("tt-host-{n}");
        out.push(c(&["role", "add", &role]));
        out.push(c(&[
            "role",
            "grant-permission",
            &role,
            "--prefix",
            "readwrite",
            &format!("{prefix}/n/{n}/"),
        ]));
        out.push(c(&[
            "role",
            "grant-permission",
            &role,
            "readwrite",
            &format!("{prefix}/nodes/{n}"),
        ]));
        out.push(c(&["user", "add", n, "--no-password"]));
        out.push(c(&["user", "grant-role", n, "tt-host"]));
        out.push(c(&["user", "grant-role", n, &role]));
    }
    out
}

/// Keep the test's environment (ETCD_* and ETCDCTL_* settings) from
/// changing what etcd and etcdctl do.
fn clear_etcd_env(cmd: &mut Command) {
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("ETCD") {
            cmd.env_remove(k);
        }
    }
}

/// Run `cmd` to completion, killing it after `limit` (a hang is a
/// failure, not a stuck test suite).
fn run_for(cmd: &mut Command, limit: Duration) -> Run {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output()));
    match rx.recv_timeout(limit) {
        Ok(out) => out.expect("wait for etcdctl").into(),
        Err(_) => {
            crate::kill(pid, libc::SIGKILL);
            panic!("{cmd:?} did not finish within {limit:?}");
        }
    }
}
