//! Live migration of a running guest between two tt-host processes
//! (docs/SNAPSHOT.md, "Live migration").
//!
//! The source is a `tt-host run --control=SOCK`; `tt-host migrate-send`
//! connects to the target (and authenticates, over TCP), then hands the
//! connected socket to the source's control thread, which runs [`send`]
//! while the guest keeps running. The target is `tt-host migrate-receive`,
//! which takes its devices from its own command line.
//!
//! The stream is a sequence of frames: a tag byte, a u32 LE length, the
//! payload ([`Frame`]; at most [`MAX_FRAME`] bytes).
//!
//! 1. Both send HELLO (magic, version, flags); the source's flag
//!    [`HELLO_MEMFD`] says its RAM will come as a memfd (over a Unix
//!    socket: a local upgrade) instead of as pages.
//! 2. The source sends CONFIG (how the guest was launched, postcard; with
//!    the memfd as a descriptor). The target builds its VM meanwhile.
//! 3. Pre-copy, unless memfd: PAGES frames (each page: its guest address,
//!    u64 LE, and 4096 bytes) while the guest runs: all of RAM, then what
//!    the guest and the host dirtied since, round after round, until what
//!    is left fits the downtime budget at the measured rate (or, if it
//!    never does within the time limit, the source sends ABORT and runs
//!    on).
//! 4. The source pauses the guest (its disks drained), sends the last
//!    dirty pages and STATE (a snapshot state file, [`crate::snapshot`]),
//!    and lets go of its disk locks. Over a Unix socket STATE carries the
//!    admission entry as a descriptor (so that the guest is never counted
//!    twice).
//! 5. The target attaches its devices, loads the state, and answers READY
//!    (one byte: 1 if it adopts the admission entry) or ABORT with the
//!    reason. The source answers READY with COMMIT and
//!    exits 0; only then does the target run the guest. If the target
//!    fails or dies before READY, the source takes its locks back and
//!    resumes; if the source dies before COMMIT, the target discards.

pub mod receive;
pub mod send;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// The first bytes of a HELLO.
pub const MAGIC: [u8; 8] = *b"TTMIGRT\0";
/// The protocol this tt-host speaks (and the only one it accepts).
pub const VERSION: u32 = 1;
/// HELLO flag: guest RAM comes as a memfd with STATE.
pub const HELLO_MEMFD: u32 = 1;
/// The largest frame payload.
pub const MAX_FRAME: u32 = 16 << 20;
/// A page as PAGES carries it.
pub const PAGE: usize = 4096;
/// How long either side waits for the other before giving up.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(30);

/// Frame tags.
pub mod tag {
    pub const HELLO: u8 = 1;
    pub const CONFIG: u8 = 2;
    pub const PAGES: u8 = 3;
    pub const STATE: u8 = 4;
    pub const READY: u8 = 5;
    pub const COMMIT: u8 = 6;
    pub const ABORT: u8 = 7;

    pub fn name(t: u8) -> &'static str {
        match t {
            HELLO => "HELLO",
            CONFIG => "CONFIG",
            PAGES => "PAGES",
            STATE => "STATE",
            READY => "READY",
            COMMIT => "COMMIT",
            ABORT => "ABORT",
            _ => "an unknown frame",
        }
    }
}

/// One frame as read, with the descriptors that came with it.
pub struct Frame {
    pub tag: u8,
    pub payload: Vec<u8>,
    pub fds: Vec<File>,
}

/// CONFIG's payload.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Config {
    pub launch: crate::snapshot::Launch,
    pub mem_size: u64,
}

/// The connection: a Unix socket (same host: descriptors can cross) or
/// TCP (authenticated first: [`auth`]).
pub enum Conn {
    Unix(UnixStream),
    Tcp(std::net::TcpStream),
}

impl Conn {
    /// From a connected socket descriptor of either kind.
    pub fn from_file(f: File) -> std::io::Result<Conn> {
        let mut domain: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `domain`.
        let rc = unsafe {
            libc::getsockopt(
                f.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_DOMAIN,
                (&mut domain as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fd = std::os::fd::OwnedFd::from(f);
        Ok(if domain == libc::AF_UNIX {
            Conn::Unix(UnixStream::from(fd))
        } else {
            let s = std::net::TcpStream::from(fd);
            // Every frame is written whole: none should wait for an ACK.
            s.set_nodelay(true)?;
            Conn::Tcp(s)
        })
    }

    /// Another handle on the same connection.
    pub fn try_clone(&self) -> std::io::Result<Conn> {
        Ok(match self {
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
            Conn::Tcp(s) => Conn::Tcp(s.try_clone()?),
        })
    }

    pub fn is_unix(&self) -> bool {
        matches!(self, Conn::Unix(_))
    }

    fn stream(&mut self) -> &mut dyn ReadWrite {
        match self {
            Conn::Unix(s) => s,
            Conn::Tcp(s) => s,
        }
    }

    pub fn set_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            Conn::Unix(s) => s.set_read_timeout(t).and_then(|()| s.set_write_timeout(t)),
            Conn::Tcp(s) => s.set_read_timeout(t).and_then(|()| s.set_write_timeout(t)),
        }
    }

    /// Send a frame.
    pub fn send(&mut self, tag: u8, payload: &[u8]) -> std::io::Result<()> {
        self.send_with_fds(tag, payload, &[])
    }

    /// Send a frame with descriptors (Unix only; attached to its first
    /// byte).
    pub fn send_with_fds(&mut self, tag: u8, payload: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
        let len = u32::try_from(payload.len())
            .ok()
            .filter(|&n| n <= MAX_FRAME)
            .ok_or_else(|| std::io::Error::other("frame too large"))?;
        let mut head = [0u8; 5];
        head[0] = tag;
        head[1..].copy_from_slice(&len.to_le_bytes());
        match self {
            Conn::Unix(s) if !fds.is_empty() => {
                let n = s
                    .send_with_fds(&[&head[..]], fds)
                    .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
                s.write_all(&head[n..])?;
            }
            Conn::Tcp(_) if !fds.is_empty() => {
                return Err(std::io::Error::other("descriptors cannot cross TCP"))
            }
            // A small frame goes in one write: with the header and the
            // payload in two, TCP holds the second back (Nagle) until the
            // first is acknowledged, which a delayed ACK puts off by 40 ms.
            _ if payload.len() <= 64 << 10 => {
                let mut frame = Vec::with_capacity(5 + payload.len());
                frame.extend_from_slice(&head);
                frame.extend_from_slice(payload);
                return self.stream().write_all(&frame);
            }
            _ => self.stream().write_all(&head)?,
        }
        self.stream().write_all(payload)
    }

    /// Read a frame of at most `max` bytes of payload.
    pub fn recv(&mut self, max: u32) -> std::io::Result<Frame> {
        let mut head = [0u8; 5];
        let mut fds = Vec::new();
        let mut got = 0;
        if let Conn::Unix(s) = self {
            // The header's first byte carries any descriptors: read it
            // with recvmsg (a plain read would drop them).
            let mut raw = [-1 as RawFd; 4];
            let mut iov = [libc::iovec {
                iov_base: head.as_mut_ptr().cast(),
                iov_len: head.len(),
            }];
            // SAFETY: the iovec points into `head`, valid for writes of
            // its length.
            let (n, nfds) = unsafe { s.recv_with_fds(&mut iov, &mut raw) }
                .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
            // SAFETY: the kernel installed these descriptors for us.
            fds = raw[..nfds]
                .iter()
                .map(|&fd| unsafe { File::from_raw_fd(fd) })
                .collect();
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            got = n;
        }
        self.stream().read_exact(&mut head[got..])?;
        let len = u32::from_le_bytes(head[1..].try_into().unwrap());
        if len > max.min(MAX_FRAME) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "{} of {len} bytes is more than allowed ({})",
                    tag::name(head[0]),
                    max.min(MAX_FRAME)
                ),
            ));
        }
        let mut payload = vec![0u8; len as usize];
        self.stream().read_exact(&mut payload)?;
        Ok(Frame {
            tag: head[0],
            payload,
            fds,
        })
    }
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// A HELLO's payload.
pub fn hello(flags: u32) -> Vec<u8> {
    let mut v = MAGIC.to_vec();
    v.extend_from_slice(&VERSION.to_le_bytes());
    v.extend_from_slice(&flags.to_le_bytes());
    v
}

/// Check a peer's HELLO; its flags.
pub fn check_hello(f: &Frame) -> Result<u32, String> {
    if f.tag == tag::ABORT {
        return Err(format!(
            "the peer refused: {}",
            String::from_utf8_lossy(&f.payload)
        ));
    }
    let p = &f.payload;
    if f.tag != tag::HELLO || p.len() != 16 || p[..8] != MAGIC {
        return Err("the peer is not a tt-host migration endpoint".into());
    }
    let version = u32::from_le_bytes(p[8..12].try_into().unwrap());
    if version != VERSION {
        return Err(format!(
            "the peer speaks migration protocol version {version}; this tt-host speaks \
             {VERSION}"
        ));
    }
    Ok(u32::from_le_bytes(p[12..16].try_into().unwrap()))
}

/// Mutual authentication of a TCP connection with a pre-shared key:
/// each side proves it knows the key by an HMAC-SHA256 over the other's
/// random challenge (and its role, so that a proof cannot be reflected).
pub mod auth {
    use hmac::{Hmac, Mac};
    use sha2::Sha256;
    use std::io::{Read, Write};

    const NONCE: usize = 32;
    const MAC: usize = 32;
    /// The shortest key accepted.
    pub const MIN_KEY: usize = 16;

    fn mac(key: &[u8], role: &[u8], nonce: &[u8]) -> [u8; MAC] {
        let mut m = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
        m.update(b"tt-host migration v1 ");
        m.update(role);
        m.update(nonce);
        m.finalize().into_bytes().into()
    }

    fn verify(key: &[u8], role: &[u8], nonce: &[u8], proof: &[u8]) -> bool {
        let mut m = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
        m.update(b"tt-host migration v1 ");
        m.update(role);
        m.update(nonce);
        m.verify_slice(proof).is_ok()
    }

    fn nonce() -> std::io::Result<[u8; NONCE]> {
        let mut n = [0u8; NONCE];
        // SAFETY: getrandom writes at most NONCE bytes into `n`.
        let got = unsafe { libc::getrandom(n.as_mut_ptr().cast(), NONCE, 0) };
        if got != NONCE as isize {
            return Err(std::io::Error::other("getrandom failed"));
        }
        Ok(n)
    }

    /// Read a key file: its bytes, trailing whitespace removed.
    pub fn read_key(path: &std::path::Path) -> Result<Vec<u8>, String> {
        let mut k = std::fs::read(path)
            .map_err(|e| format!("--psk={}: cannot read it: {e}", path.display()))?;
        while k.last().is_some_and(|b| b.is_ascii_whitespace()) {
            k.pop();
        }
        if k.len() < MIN_KEY {
            return Err(format!(
                "--psk={}: the key is {} bytes; give at least {MIN_KEY}",
                path.display(),
                k.len()
            ));
        }
        Ok(k)
    }

    /// The listening side: challenge, check the proof, prove itself.
    pub fn server<S: Read + Write>(s: &mut S, key: &[u8]) -> Result<(), String> {
        let io = |e: std::io::Error| format!("authentication: {e}");
        let mine = nonce().map_err(io)?;
        s.write_all(&mine).map_err(io)?;
        let mut got = [0u8; MAC + NONCE];
        s.read_exact(&mut got).map_err(io)?;
        if !verify(key, b"source", &mine, &got[..MAC]) {
            return Err("authentication failed: the peer does not know the key".into());
        }
        s.write_all(&mac(key, b"target", &got[MAC..])).map_err(io)
    }

    /// The connecting side: answer the challenge, check the answer.
    pub fn client<S: Read + Write>(s: &mut S, key: &[u8]) -> Result<(), String> {
        let io = |e: std::io::Error| format!("authentication: {e}");
        let mut theirs = [0u8; NONCE];
        s.read_exact(&mut theirs).map_err(io)?;
        let mine = nonce().map_err(io)?;
        let mut out = mac(key, b"source", &theirs).to_vec();
        out.extend_from_slice(&mine);
        s.write_all(&out).map_err(io)?;
        let mut proof = [0u8; MAC];
        s.read_exact(&mut proof)
            .map_err(|_| "authentication failed: the target refused the key".to_string())?;
        if !verify(key, b"target", &mine, &proof) {
            return Err("authentication failed: the target does not know the key".into());
        }
        Ok(())
    }
}

/// Where `migrate-send --to` and `migrate-receive --listen` point: a Unix
/// socket path (`unix:PATH`, or anything with a `/`), or `tcp:HOST:PORT` /
/// `HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addr {
    Unix(std::path::PathBuf),
    Tcp(String),
}

impl std::str::FromStr for Addr {
    type Err = String;
    fn from_str(s: &str) -> Result<Addr, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            return Ok(Addr::Unix(p.into()));
        }
        if let Some(t) = s.strip_prefix("tcp:") {
            return Ok(Addr::Tcp(t.into()));
        }
        if s.contains('/') {
            return Ok(Addr::Unix(s.into()));
        }
        if s.rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            return Ok(Addr::Tcp(s.into()));
        }
        Err(format!(
            "'{}' is neither a Unix socket path (unix:PATH) nor HOST:PORT (tcp:HOST:PORT)",
            crate::text::quote(s)
        ))
    }
}

#[cfg(test)]
mod tests;
