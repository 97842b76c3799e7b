//! The control socket of one `tt-host run` (`--control=PATH`): pause,
//! resume and snapshot a running guest from another process.
//!
//! Protocol (docs/SNAPSHOT.md): on a Unix stream socket, each request is
//! one line of JSON, `{"op": "pause" | "resume" | "status" | "snapshot",
//! "stop": bool}`, and each answer one line, `{"ok": "what happened"}` or
//! `{"error": "why not"}`. A snapshot request carries two open file
//! descriptors (SCM_RIGHTS) in the message that starts it: the state file
//! and the memory file, created by the client. So the running tt-host,
//! confined to its system-call allowlist ([`crate::sandbox`]), never opens
//! a path after it started, and a client can only write a snapshot where
//! it can create files itself.
//!
//! The socket's thread only parses and forwards: the vCPU thread does the
//! work between two guest instructions ([`crate::vmm::control`]).

use crate::vmm::control::{Inbox, Op};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// The longest request line.
const MAX_REQUEST: usize = 4096;

/// Why the control socket could not be set up or used.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("--control={path}: {what}: {err}")]
    Io {
        path: String,
        what: &'static str,
        err: std::io::Error,
    },
    #[error("--control={path}: {0}", path = .1)]
    Exists(&'static str, String),
    #[error("control socket {path}: {msg}")]
    Reply { path: String, msg: String },
}

/// One request as it travels.
#[derive(Debug, Serialize, Deserialize)]
pub struct Request {
    pub op: String,
    #[serde(default)]
    pub stop: bool,
    /// migrate: the downtime budget, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
    /// migrate: how long pre-copy may take before giving up, in ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ms: Option<u64>,
}

/// One answer as it travels.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Answer {
    Ok(String),
    Error(String),
}

/// A listening control socket and its thread.
pub struct Server {
    inbox: Arc<Inbox>,
    /// The socket's directory and name, to remove it at the end (by
    /// descriptor: the sandbox allows `unlinkat` on it).
    dir: OwnedFd,
    name: std::ffi::CString,
}

impl Server {
    /// Listen at `path` (replacing a stale socket, never another file)
    /// and serve requests on a thread. Call with SIGINT/SIGTERM blocked
    /// (the thread must not take them).
    pub fn start(path: &Path) -> Result<Server, ControlError> {
        use std::os::unix::fs::FileTypeExt;
        let p = path.display().to_string();
        let io = |what, err| ControlError::Io {
            path: p.clone(),
            what,
            err,
        };
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => {
                if UnixStream::connect(path).is_ok() {
                    return Err(ControlError::Exists(
                        "another process serves a control socket there",
                        p,
                    ));
                }
                std::fs::remove_file(path).map_err(|e| io("cannot remove the stale socket", e))?;
            }
            Ok(_) => return Err(ControlError::Exists("exists and is not a socket", p)),
            Err(_) => {}
        }
        let parent = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = path
            .file_name()
            .ok_or_else(|| ControlError::Exists("names no file", p.clone()))?;
        let name = std::ffi::CString::new(name.as_encoded_bytes())
            .map_err(|_| ControlError::Exists("contains a NUL byte", p.clone()))?;
        let dir: OwnedFd = File::open(&parent)
            .map_err(|e| io("cannot open its directory", e))?
            .into();
        let listener = UnixListener::bind(path).map_err(|e| io("cannot listen", e))?;
        let inbox = Inbox::new().map_err(|e| io("cannot create an eventfd", e))?;
        let served = inbox.clone();
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || accept_loop(listener, served))
            .map_err(|e| io("cannot start its thread", e))?;
        Ok(Server { inbox, dir, name })
    }

    /// The requests' queue, which the VM serves.
    pub fn inbox(&self) -> Arc<Inbox> {
        self.inbox.clone()
    }

    /// The descriptor of the socket's directory (the sandbox lets the run
    /// remove the socket from it).
    pub fn dir_fd(&self) -> RawFd {
        self.dir.as_raw_fd()
    }
}

impl Drop for Server {
    /// Remove the socket (by descriptor, as the sandbox allows).
    fn drop(&mut self) {
        // SAFETY: a valid directory descriptor and a NUL-terminated name.
        unsafe { libc::unlinkat(self.dir.as_raw_fd(), self.name.as_ptr(), 0) };
    }
}

fn accept_loop(listener: UnixListener, inbox: Arc<Inbox>) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        // One client at a time: requests to one VM are served in order.
        let _ = serve(conn, &inbox);
    }
}

/// Serve one connection's requests until it closes or misbehaves.
fn serve(conn: UnixStream, inbox: &Inbox) -> std::io::Result<()> {
    // A client that connects and says nothing must not keep others out.
    conn.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    let mut out = conn.try_clone()?;
    loop {
        let (line, fds) = match read_request(&conn)? {
            Some(r) => r,
            None => return Ok(()),
        };
        let answer = match decode(&line, fds) {
            Ok(Decoded::Op(op)) => inbox.call(op),
            Ok(Decoded::Migrate(conn, opts)) => match crate::migration::Conn::from_file(conn) {
                Ok(c) => crate::migration::send::send(c, inbox, &opts),
                Err(e) => Err(format!("the migration's socket: {e}")),
            },
            Err(e) => Err(e),
        };
        let answer = match answer {
            Ok(m) => Answer::Ok(m),
            Err(m) => Answer::Error(m),
        };
        let mut bytes = serde_json::to_vec(&answer).expect("an answer serializes");
        bytes.push(b'\n');
        let written = out.write_all(&bytes);
        if inbox.handed_over() {
            inbox.set_answered();
        }
        written?;
    }
}

/// Read one request line and the descriptors sent with its first bytes.
/// `None` at the end of the connection.
fn read_request(conn: &UnixStream) -> std::io::Result<Option<(Vec<u8>, Vec<File>)>> {
    let mut buf = vec![0u8; MAX_REQUEST];
    let mut fds = [-1 as RawFd; 2];
    let mut iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    // SAFETY: the one iovec points into `buf`, valid for writes of its
    // length while it lives; any bytes may be written there.
    let (n, nfds) = unsafe { conn.recv_with_fds(&mut iov, &mut fds) }
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    // SAFETY: the kernel installed these `nfds` descriptors for us with
    // the message; nothing else owns them.
    let files: Vec<File> = fds[..nfds]
        .iter()
        .map(|&fd| unsafe { File::from_raw_fd(fd) })
        .collect();
    if n == 0 {
        return Ok(None);
    }
    buf.truncate(n);
    // The rest of the line, if it came in more than one piece.
    let mut more = BufReader::new(conn.take((MAX_REQUEST - n) as u64));
    if !buf.contains(&b'\n') {
        more.read_until(b'\n', &mut buf)?;
    }
    if !buf.ends_with(b"\n") {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "request too long or not one line",
        ));
    }
    Ok(Some((buf, files)))
}

/// What a request asks for.
enum Decoded {
    Op(Op),
    /// Migrate over this connected socket.
    Migrate(File, crate::migration::send::Options),
}

/// The operation a request line asks for.
fn decode(line: &[u8], mut fds: Vec<File>) -> Result<Decoded, String> {
    let r: Request = serde_json::from_slice(line).map_err(|e| format!("malformed request: {e}"))?;
    let want = match r.op.as_str() {
        "snapshot" => 2,
        "migrate" => 1,
        _ => 0,
    };
    if fds.len() != want {
        return Err(format!(
            "'{}' takes {want} file descriptors, {} came",
            crate::text::quote(&r.op),
            fds.len()
        ));
    }
    if r.op == "migrate" {
        let mut opts = crate::migration::send::Options::default();
        if let Some(ms) = r.downtime_ms {
            opts.downtime = std::time::Duration::from_millis(ms);
        }
        if let Some(ms) = r.max_ms {
            opts.max_time = std::time::Duration::from_millis(ms);
        }
        return Ok(Decoded::Migrate(fds.pop().expect("one descriptor"), opts));
    }
    Ok(Decoded::Op(match r.op.as_str() {
        "pause" => Op::Pause,
        "resume" => Op::Resume,
        "status" => Op::Status,
        "snapshot" => {
            let memory = fds.pop().expect("two descriptors");
            let state = fds.pop().expect("two descriptors");
            Op::Snapshot {
                state,
                memory,
                stop: r.stop,
            }
        }
        other => {
            return Err(format!(
                "unknown operation '{}' (pause, resume, status, snapshot, migrate)",
                crate::text::quote(other)
            ))
        }
    }))
}

/// Send `req` (with `fds`) to the control socket at `path`; its answer.
pub fn call(path: &Path, req: &Request, fds: &[RawFd]) -> Result<String, ControlError> {
    let p = path.display().to_string();
    let io = |what, err| ControlError::Io {
        path: p.clone(),
        what,
        err,
    };
    let conn = UnixStream::connect(path).map_err(|e| io("cannot connect", e))?;
    let mut line = serde_json::to_vec(req).expect("a request serializes");
    line.push(b'\n');
    conn.send_with_fds(&[&line[..]], fds)
        .map_err(|e| io("cannot send", std::io::Error::from_raw_os_error(e.errno())))?;
    let mut answer = String::new();
    BufReader::new(&conn)
        .read_line(&mut answer)
        .map_err(|e| io("cannot read the answer", e))?;
    match serde_json::from_str::<Answer>(&answer) {
        Ok(Answer::Ok(m)) => Ok(m),
        Ok(Answer::Error(msg)) => Err(ControlError::Reply { path: p, msg }),
        Err(_) if answer.is_empty() => Err(ControlError::Reply {
            path: p,
            msg: "the VM closed the connection without answering (it stopped?)".into(),
        }),
        Err(e) => Err(ControlError::Reply {
            path: p,
            msg: format!("malformed answer: {e}"),
        }),
    }
}

/// `tt-host snapshot`'s side: create `dir` (if needed) with empty state
/// and memory files, and have the VM at `control` write them; its answer.
pub fn snapshot(control: &Path, dir: &Path, stop: bool) -> Result<String, ControlError> {
    let files = snapshot_files(dir)?;
    snapshot_into(control, dir, files, stop)
}

/// The empty state and memory files of a snapshot in `dir` (created if
/// needed; an old state file is removed first, so that the directory never
/// holds a state that does not match its memory).
pub fn snapshot_files(dir: &Path) -> Result<(File, File), ControlError> {
    use std::os::unix::fs::OpenOptionsExt;
    let d = dir.display().to_string();
    let io = |what, err| ControlError::Io {
        path: d.clone(),
        what,
        err,
    };
    std::fs::create_dir_all(dir).map_err(|e| io("cannot create the snapshot directory", e))?;
    let state_path = dir.join(crate::snapshot::STATE_FILE);
    match std::fs::remove_file(&state_path) {
        Ok(()) => sync_dir(dir).map_err(|e| io("cannot sync the snapshot directory", e))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("cannot replace the old state file", e)),
    }
    let open = |name: &str| {
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(dir.join(name))
    };
    let memory = open(crate::snapshot::MEMORY_FILE).map_err(|e| io("cannot create memory", e))?;
    let state = open(crate::snapshot::STATE_FILE).map_err(|e| io("cannot create state", e))?;
    Ok((state, memory))
}

/// Have the VM at `control` write its snapshot into `files` (from
/// [`snapshot_files`] in `dir`); its answer. A failed snapshot leaves no
/// state file.
pub fn snapshot_into(
    control: &Path,
    dir: &Path,
    (state, memory): (File, File),
    stop: bool,
) -> Result<String, ControlError> {
    let state_path = dir.join(crate::snapshot::STATE_FILE);
    let req = Request {
        op: "snapshot".into(),
        stop,
        downtime_ms: None,
        max_ms: None,
    };
    let r = call(control, &req, &[state.as_raw_fd(), memory.as_raw_fd()]);
    if r.is_err() {
        let _ = std::fs::remove_file(&state_path);
    }
    let answer = r?;
    sync_dir(dir).map_err(|e| ControlError::Io {
        path: dir.display().to_string(),
        what: "cannot sync the snapshot directory",
        err: e,
    })?;
    Ok(answer)
}

/// `tt-host migrate-send`'s side: connect to the target at `to`
/// (authenticating with `psk` over TCP), and have the VM at `control`
/// migrate over that connection; its answer.
pub fn migrate(
    control: &Path,
    to: &crate::migration::Addr,
    psk: Option<&[u8]>,
    downtime_ms: Option<u64>,
    max_ms: Option<u64>,
) -> Result<String, ControlError> {
    let conn = connect_target(to, psk).map_err(|msg| ControlError::Reply {
        path: control.display().to_string(),
        msg,
    })?;
    migrate_over(control, conn, downtime_ms, max_ms)
}

/// Connect to a migration's target (authenticated over TCP).
pub fn connect_target(to: &crate::migration::Addr, psk: Option<&[u8]>) -> Result<OwnedFd, String> {
    use crate::migration::Addr;
    Ok(match to {
        Addr::Unix(p) => UnixStream::connect(p)
            .map_err(|e| format!("cannot connect to {}: {e}", p.display()))?
            .into(),
        Addr::Tcp(a) => {
            let key = psk.ok_or_else(|| {
                "migrating over TCP needs --psk=FILE (the target's pre-shared key)".to_string()
            })?;
            let mut s = std::net::TcpStream::connect(a)
                .map_err(|e| format!("cannot connect to {a}: {e}"))?;
            s.set_read_timeout(Some(crate::migration::PEER_TIMEOUT))
                .map_err(|e| e.to_string())?;
            crate::migration::auth::client(&mut s, key)?;
            s.set_read_timeout(None).map_err(|e| e.to_string())?;
            s.into()
        }
    })
}

/// Have the VM at `control` migrate over `conn` (connected to a target).
pub fn migrate_over(
    control: &Path,
    conn: OwnedFd,
    downtime_ms: Option<u64>,
    max_ms: Option<u64>,
) -> Result<String, ControlError> {
    let req = Request {
        op: "migrate".into(),
        stop: false,
        downtime_ms,
        max_ms,
    };
    call(control, &req, &[conn.as_raw_fd()])
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}
