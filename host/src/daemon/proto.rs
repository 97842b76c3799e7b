//! The control protocol between `tt-host` clients and the daemon.
//!
//! A connection carries frames: a 4-byte big-endian length, then that
//! many bytes of JSON (at most [`MAX_FRAME`]). The client sends one
//! [`Request`]; the daemon answers with one [`Reply`], or, for a console
//! with `follow`, with any number of `Console` replies until the client
//! closes. Every request names the protocol [`VERSION`] it speaks; the
//! daemon refuses another with an error reply. A frame that is too long,
//! or does not parse as a request, gets an error reply and the
//! connection is closed. docs/PROTOCOL.md is the reference.

use serde::{Deserialize, Serialize};
use std::io::{self, Read, Write};

/// The protocol's version: a request with another is refused.
pub const VERSION: u32 = 1;
/// The longest frame either side accepts (1 MiB).
pub const MAX_FRAME: usize = 1 << 20;

/// One request: the protocol version and what to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub v: u32,
    #[serde(flatten)]
    pub op: Op,
}

/// What a client asks. Names are unikernel names (`alice:bob:web`),
/// paths are policy paths (`alice:bob`, `:` for the root).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Op {
    /// Start a unikernel and keep it ([`NewUnit`]).
    Create(NewUnit),
    Destroy {
        name: String,
    },
    Restart {
        name: String,
    },
    /// The unikernels below `path` (all the caller may see without one).
    List {
        #[serde(default)]
        path: Option<String>,
    },
    Info {
        name: String,
    },
    /// Act on a running unikernel through its control socket
    /// (docs/SNAPSHOT.md): `action` is pause, resume, status, snapshot
    /// (into `dir`, an absolute path, then `stop`ped or not) or migrate
    /// (to `to`, with the key file `psk`). Files are created, sockets
    /// connected and keys read with the caller's rights.
    Control {
        name: String,
        action: String,
        #[serde(default)]
        dir: Option<String>,
        #[serde(default)]
        stop: bool,
        #[serde(default)]
        to: Option<String>,
        #[serde(default)]
        psk: Option<String>,
        #[serde(default)]
        downtime_ms: Option<u64>,
        #[serde(default)]
        timeout_s: Option<u64>,
    },
    /// Console output: the last `last` lines, or what came since
    /// `since_ns` (Unix time in ns), or all that is kept; then, with
    /// `follow`, what comes next until the client closes.
    Console {
        name: String,
        #[serde(default)]
        since_ns: Option<u64>,
        #[serde(default)]
        last: Option<u32>,
        #[serde(default)]
        follow: bool,
    },
    /// Counters of one unikernel, or of all the caller may see.
    Stats {
        #[serde(default)]
        name: Option<String>,
    },
    /// The counters in Prometheus' text format.
    Metrics,
    /// `tt-host policy ARGS` (set, remove or show) done by the daemon.
    Policy {
        args: Vec<String>,
    },
    /// A capacity pool, empty, owned by `owner` (root only).
    PoolCreate {
        name: String,
        owner: String,
        #[serde(default)]
        sponsor: Option<String>,
        /// On a cluster node: the nodes whose unikernels may draw from it
        /// (`None`: any).
        #[serde(default)]
        nodes: Option<Vec<String>>,
    },
    /// One pool, or all the caller may see.
    PoolShow {
        #[serde(default)]
        name: Option<String>,
    },
    /// A signed reservation's envelope (JSON text) to top up a pool.
    PoolReserve {
        envelope: String,
    },
    /// Register an ed25519 public key for `user` (root only).
    KeyAdd {
        user: String,
        key: String,
    },
    /// An environment (docs/ENVIRONMENTS.md): a group of unikernels with
    /// an end time, its own bridge and firewall table; `units` are created
    /// with it, all or none.
    EnvCreate {
        name: String,
        lifetime_s: u64,
        #[serde(default)]
        deny_outgoing: bool,
        #[serde(default)]
        blacklist: Vec<String>,
        #[serde(default)]
        bridge: Option<String>,
        #[serde(default)]
        subnet: Option<String>,
        #[serde(default)]
        units: Vec<NewUnit>,
        /// On the cluster's node with room for all its unikernels.
        #[serde(default)]
        anywhere: bool,
    },
    /// Move an environment's end `by_s` seconds later.
    EnvExtend {
        name: String,
        by_s: u64,
    },
    /// Save the environment's unikernels and stop them.
    EnvStop {
        name: String,
    },
    /// Bring a stopped environment's unikernels back where they were.
    EnvStart {
        name: String,
    },
    EnvDestroy {
        name: String,
    },
    /// The environments the caller may see.
    EnvList,
    /// A template disk from the file `disk` (absolute, read with the
    /// caller's rights; root only).
    TemplateAdd {
        name: String,
        disk: String,
    },
    TemplateList,
    TemplateRemove {
        name: String,
    },
    /// A snapshot `snap` of the runtime image of unikernel `name` (its
    /// device `device` if it has several), removed after `life_time_s`.
    DiskSnapshot {
        name: String,
        snap: String,
        #[serde(default)]
        device: Option<String>,
        #[serde(default)]
        life_time_s: Option<u64>,
    },
    /// Put the snapshot's bytes back into the runtime image (the
    /// unikernel is stopped meanwhile and boots again on it).
    DiskRevert {
        name: String,
        snap: String,
        #[serde(default)]
        device: Option<String>,
    },
    /// The snapshots of a unikernel's runtime images.
    DiskSnapshots {
        name: String,
    },
    /// From `tt-host run` on a cluster node, once its state directory
    /// admitted it: admit the unikernel `name` through the cluster
    /// (docs/CLUSTER.md).
    ClusterAdmit {
        name: String,
        memory_mb: u64,
        block_mb: u64,
        /// It arrives by live migration (another node may still hold its
        /// name until the source's run ends).
        #[serde(default)]
        incoming: bool,
    },
    /// Every node's unikernels (those the caller may see), from the
    /// cluster's reservations.
    ClusterList,
    /// Every node's environments (those the caller may see), from the
    /// cluster's records (`env list --cluster`).
    ClusterEnvList,
}

/// A unikernel to create (`tt-host create`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewUnit {
    pub name: String,
    /// A `tt-host run` command line without `run` (options, IMAGE, `--`,
    /// guest arguments), with every path absolute.
    pub args: Vec<String>,
    /// `--restart-on-fail`: `None`: never restart; `Some([])`: on any
    /// exit code but 0, 1 and 60-64; `Some(codes)`: on those codes.
    #[serde(default)]
    pub restart_on_fail: Option<Vec<u8>>,
    /// `--pool`: the capacity pool it draws from.
    #[serde(default)]
    pub pool: Option<String>,
    /// `--env`: the environment it joins.
    #[serde(default)]
    pub env: Option<String>,
    /// `--disk-from:DEV=TEMPLATE`: block devices made from templates,
    /// as (device, template).
    #[serde(default)]
    pub disk_from: Vec<(String, String)>,
    /// `--keep-image`: its runtime images outlive it.
    #[serde(default)]
    pub keep_image: bool,
    /// `--env-net=DEV`: the hvt net device attached to the env's bridge.
    #[serde(default)]
    pub env_net: Option<String>,
    /// `--port=HOST:GUEST[/udp]`: forwards from the host to it.
    #[serde(default)]
    pub ports: Vec<String>,
    /// `--ip-arg=TEMPLATE`: guest arguments giving it its address
    /// (`{ip}`, `{prefix}`, `{gateway}`, `{netmask}` filled in).
    #[serde(default)]
    pub ip_args: Vec<String>,
    /// `--anywhere`: on the cluster node with room (docs/CLUSTER.md).
    #[serde(default)]
    pub anywhere: bool,
}

impl NewUnit {
    /// A plain unikernel: no pool, no environment.
    pub fn plain(name: String, args: Vec<String>) -> NewUnit {
        NewUnit {
            name,
            args,
            restart_on_fail: None,
            pool: None,
            env: None,
            disk_from: vec![],
            keep_image: false,
            env_net: None,
            ports: vec![],
            ip_args: vec![],
            anywhere: false,
        }
    }
}

/// The daemon's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum Reply {
    /// Done; a line for the user (may be empty).
    Ok {
        message: String,
    },
    /// Refused or failed: one line naming the problem.
    Error {
        message: String,
    },
    /// `create` and `restart`: started, with the daemon's own time.
    Started {
        name: String,
        pid: u32,
        /// From the request read to the process spawned, persisting the
        /// desired state included, in microseconds.
        daemon_us: u64,
        /// Of which the desired state's write and fdatasync.
        persist_us: u64,
    },
    List {
        units: Vec<UnitInfo>,
    },
    Info {
        unit: UnitInfo,
    },
    Stats {
        units: Vec<UnitStats>,
    },
    /// Text for the user (policy show, metrics).
    Text {
        text: String,
    },
    /// Console records; `lost`: bytes overwritten before they were read.
    Console {
        records: Vec<ConsoleRecord>,
        lost: u64,
    },
}

/// One console record: a line, or a piece of one not ended yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleRecord {
    pub time_ns: u64,
    pub partial: bool,
    /// The bytes, lossily as UTF-8 (guest output is mostly text).
    pub text: String,
}

/// What `list` and `info` show of a unikernel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitInfo {
    pub name: String,
    /// `running`, `starting`, `exited`, `restarting` or `stopping`.
    pub state: String,
    pub pid: Option<u32>,
    /// The last instance's end: `exit N`, `signal N`, `failed`, `killed`.
    pub last_end: Option<String>,
    pub restarts: u32,
    pub restart_on_fail: Option<Vec<u8>>,
    /// When a restart is due (Unix ns), while `restarting`.
    pub restart_at_ns: Option<u64>,
    /// When the running instance started (Unix ns).
    pub started_ns: Option<u64>,
    pub args: Vec<String>,
    pub owner_uid: u32,
    /// The last lines tt-host itself wrote (its errors), for `info`.
    #[serde(default)]
    pub log: Vec<String>,
}

/// What `stats` shows of a unikernel (of its running or last instance).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitStats {
    pub name: String,
    pub running: bool,
    pub cpu_user_us: u64,
    pub cpu_system_us: u64,
    pub peak_rss_kib: u64,
    pub block_read_ops: u64,
    pub block_read_bytes: u64,
    pub block_write_ops: u64,
    pub block_write_bytes: u64,
    pub net_rx_packets: u64,
    pub net_rx_bytes: u64,
    pub net_tx_packets: u64,
    pub net_tx_bytes: u64,
    pub vm_exits: u64,
    pub restarts: u32,
}

/// A frame that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes is longer than the {MAX_FRAME} allowed")]
    TooLong(u64),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// The length prefix of a frame of `len` bytes.
pub fn header(len: usize) -> [u8; 4] {
    (len as u32).to_be_bytes()
}

/// Check a frame's length prefix.
pub fn frame_len(header: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header) as u64;
    if len > MAX_FRAME as u64 {
        return Err(FrameError::TooLong(len));
    }
    Ok(len as usize)
}

/// Encode `msg` as a frame.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    let body = serde_json::to_vec(msg).expect("protocol types always encode");
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&header(body.len()));
    out.extend_from_slice(&body);
    out
}

/// Decode a request's body, checking its version: the error is the
/// message of the reply.
pub fn decode_request(body: &[u8]) -> Result<Request, String> {
    // The version first, so that a newer client's unknown op is reported
    // as a version mismatch, not as a parse error.
    #[derive(Deserialize)]
    struct Versioned {
        v: Option<u32>,
    }
    let v = serde_json::from_slice::<Versioned>(body)
        .map_err(|e| format!("malformed request: {e}"))?
        .v;
    match v {
        Some(VERSION) => {}
        Some(v) => {
            return Err(format!(
                "protocol version {v} is not spoken here (this daemon speaks version {VERSION})"
            ))
        }
        None => return Err("malformed request: no protocol version (\"v\")".into()),
    }
    serde_json::from_slice(body).map_err(|e| format!("malformed request: {e}"))
}

/// Blocking: write one frame.
pub fn write_frame<T: Serialize>(w: &mut impl Write, msg: &T) -> io::Result<()> {
    w.write_all(&encode(msg))?;
    w.flush()
}

/// Blocking: read one frame's body; `Ok(None)` at a clean end of stream.
pub fn read_frame(r: &mut impl Read) -> Result<Option<Vec<u8>>, FrameError> {
    let mut h = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut h[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = frame_len(h)?;
    let mut body = vec![0; len];
    r.read_exact(&mut body)?;
    Ok(Some(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_name_their_version() {
        let req = Request {
            v: VERSION,
            op: Op::Create(NewUnit {
                restart_on_fail: Some(vec![3]),
                ..NewUnit::plain("alice:web".into(), vec!["--mem=8".into(), "/img".into()])
            }),
        };
        let framed = encode(&req);
        assert_eq!(
            frame_len(framed[..4].try_into().unwrap()).unwrap(),
            framed.len() - 4
        );
        assert_eq!(decode_request(&framed[4..]).unwrap(), req);
        let text = String::from_utf8(framed[4..].to_vec()).unwrap();
        assert!(text.contains("\"op\":\"create\""), "{text}");
    }

    #[test]
    fn bad_requests_are_named() {
        let e = decode_request(br#"{"v":2,"op":"list"}"#).unwrap_err();
        assert!(e.contains("version 2 is not spoken here"), "{e}");
        let e = decode_request(br#"{"op":"list"}"#).unwrap_err();
        assert!(e.contains("no protocol version"), "{e}");
        let e = decode_request(br#"{"v":1,"op":"fly"}"#).unwrap_err();
        assert!(e.contains("malformed request"), "{e}");
        let e = decode_request(b"\xff\x00").unwrap_err();
        assert!(e.contains("malformed request"), "{e}");
        let e = decode_request(br#"{"v":1,"op":"destroy"}"#).unwrap_err();
        assert!(e.contains("name"), "{e}");
        assert!(matches!(
            frame_len((MAX_FRAME as u32 + 1).to_be_bytes()),
            Err(FrameError::TooLong(_))
        ));
    }
}
