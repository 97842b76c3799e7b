//! The target side of a live migration: `tt-host migrate-receive`
//! accepts one connection, reads the guest's launch and RAM, and hands
//! the state to the launch ([`crate::launch::receive`]), which attaches
//! the devices of its own command line and answers READY.

use super::{auth, check_hello, hello, tag, Addr, Config, Conn, Frame, HELLO_MEMFD, PAGE};
use super::{MAX_FRAME, PEER_TIMEOUT};
use std::fs::File;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// A connection that has sent HELLO and CONFIG.
pub struct Incoming {
    conn: Conn,
    /// Set once the source committed: see [`Incoming::aborter`].
    committed: std::sync::Arc<std::sync::atomic::AtomicBool>,
    pub config: Config,
    /// RAM is the source's memfd (a local upgrade): nothing is copied.
    pub memfd_mode: bool,
    /// That memfd, which came with CONFIG (taken by the launch).
    pub memfd: Option<File>,
}

/// What STATE brought.
pub struct Arrived {
    pub snapshot: crate::snapshot::Snapshot,
    /// The source's admission entry (file, name), over a Unix socket.
    pub entry: Option<(File, String)>,
    /// Device descriptors handed over (TAPs), by device name.
    pub devices: Vec<(String, File)>,
    /// Pages received while the guest still ran at the source.
    pub pages: u64,
}

/// Listen at `addr`, accept one source, authenticate it (TCP: with
/// `psk`, required), and read its HELLO and CONFIG.
pub fn accept(addr: &Addr, psk: Option<&[u8]>) -> Result<Incoming, String> {
    let conn = match addr {
        Addr::Unix(p) => {
            use std::os::unix::fs::FileTypeExt;
            if std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket()) {
                let _ = std::fs::remove_file(p);
            }
            let l = std::os::unix::net::UnixListener::bind(p)
                .map_err(|e| format!("--listen={}: {e}", p.display()))?;
            let (s, _) = l
                .accept()
                .map_err(|e| format!("--listen={}: {e}", p.display()))?;
            let _ = std::fs::remove_file(p);
            Conn::Unix(s)
        }
        Addr::Tcp(a) => {
            let Some(key) = psk else {
                return Err(format!(
                    "--listen={a}: a TCP listener needs --psk=FILE (a pre-shared key) to \
                     authenticate the source"
                ));
            };
            let l = std::net::TcpListener::bind(a).map_err(|e| format!("--listen={a}: {e}"))?;
            let (mut s, peer) = l.accept().map_err(|e| format!("--listen={a}: {e}"))?;
            s.set_read_timeout(Some(PEER_TIMEOUT))
                .map_err(|e| e.to_string())?;
            auth::server(&mut s, key).map_err(|e| format!("{peer}: {e}"))?;
            s.set_nodelay(true).map_err(|e| e.to_string())?;
            Conn::Tcp(s)
        }
    };
    start(conn)
}

/// Read HELLO and CONFIG from a connected source.
pub fn start(mut conn: Conn) -> Result<Incoming, String> {
    let net = |e: std::io::Error| format!("migration stream: {e}");
    conn.set_timeout(Some(PEER_TIMEOUT)).map_err(net)?;
    let flags = check_hello(&conn.recv(64).map_err(net)?)?;
    let memfd = flags & HELLO_MEMFD != 0;
    if memfd && !conn.is_unix() {
        return Err("the source offers its memory as a memfd over TCP".into());
    }
    conn.send(tag::HELLO, &hello(0)).map_err(net)?;
    let f = conn.recv(crate::snapshot::MAX_BODY as u32).map_err(net)?;
    let config: Config = match f.tag {
        tag::CONFIG => postcard::from_bytes(&f.payload)
            .map_err(|e| format!("the source's CONFIG cannot be decoded: {e}"))?,
        t => return Err(unexpected(t, "CONFIG", &f)),
    };
    let mb = config.launch.mem_mb;
    let size = (mb << 20) / crate::vmm::layout::HUGE * crate::vmm::layout::HUGE;
    if config.mem_size != size || mb > crate::cli::MAX_MEM_MB || size == 0 {
        return Err(format!(
            "the source's memory size {} does not match its --mem={mb}",
            config.mem_size
        ));
    }
    let file = match memfd {
        true => Some(
            f.fds
                .into_iter()
                .next()
                .ok_or("the source sent no memfd with its CONFIG")?,
        ),
        false => None,
    };
    Ok(Incoming {
        conn,
        committed: Default::default(),
        config,
        memfd_mode: memfd,
        memfd: file,
    })
}

/// See [`Incoming::aborter`].
pub struct Aborter {
    conn: Conn,
    committed: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Aborter {
    /// Send the source `why` this target gives up, unless it committed.
    pub fn abort(mut self, why: &str) {
        if !self.committed.load(std::sync::atomic::Ordering::SeqCst) {
            let _ = self.conn.send(tag::ABORT, why.as_bytes());
        }
    }
}

/// Reads STATE's leading fields.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn u32(&mut self) -> Result<u32, String> {
        let (h, t) = self
            .0
            .split_at_checked(4)
            .ok_or("a malformed STATE frame")?;
        self.0 = t;
        Ok(u32::from_le_bytes(h.try_into().unwrap()))
    }

    /// A length-prefixed name of at most 255 bytes of UTF-8.
    fn name(&mut self) -> Result<String, String> {
        let n = self.u32()? as usize;
        if n > 255 || self.0.len() < n {
            return Err("a malformed STATE frame".into());
        }
        let (h, t) = self.0.split_at(n);
        self.0 = t;
        String::from_utf8(h.to_vec()).map_err(|_| "a malformed STATE frame".into())
    }
}

fn unexpected(t: u8, want: &str, f: &Frame) -> String {
    if t == tag::ABORT {
        format!(
            "the source gave up: {}",
            String::from_utf8_lossy(&f.payload)
        )
    } else {
        format!("the source sent {} where {want} was due", tag::name(t))
    }
}

impl Incoming {
    /// Receive RAM into `mem` (none with [`memfd_mode`](Self::memfd_mode)) until
    /// STATE comes. Every page is checked: aligned and inside RAM.
    pub fn receive(&mut self, mem: Option<&GuestMemoryMmap>) -> Result<Arrived, String> {
        let net = |e: std::io::Error| format!("migration stream: {e}");
        let mut pages = 0u64;
        loop {
            // Pre-copy can take long on a busy guest: no timeout here.
            self.conn.set_timeout(None).map_err(net)?;
            let f = self.conn.recv(MAX_FRAME).map_err(net)?;
            match f.tag {
                tag::PAGES => {
                    let Some(mem) = mem else {
                        return Err("the source sent pages after offering a memfd".into());
                    };
                    if f.payload.len() % (8 + PAGE) != 0 {
                        return Err("a PAGES frame is not a whole number of pages".into());
                    }
                    for p in f.payload.chunks_exact(8 + PAGE) {
                        let gpa = u64::from_le_bytes(p[..8].try_into().unwrap());
                        if gpa % PAGE as u64 != 0 || gpa >= self.config.mem_size {
                            return Err(format!(
                                "the source sent a page at {gpa:#x}, outside the guest's memory"
                            ));
                        }
                        mem.write_slice(&p[8..], GuestAddress(gpa))
                            .map_err(|e| format!("page {gpa:#x}: {e}"))?;
                        pages += 1;
                    }
                }
                tag::STATE => return self.arrived(f, pages),
                t => return Err(unexpected(t, "PAGES or STATE", &f)),
            }
        }
    }

    fn arrived(&mut self, f: Frame, pages: u64) -> Result<Arrived, String> {
        let mut r = Reader(&f.payload);
        let entry_name = r.name()?;
        let n = r.u32()?;
        if n > 64 {
            return Err("a malformed STATE frame (too many devices)".into());
        }
        let names = (0..n).map(|_| r.name()).collect::<Result<Vec<_>, _>>()?;
        let snapshot =
            crate::snapshot::decode(r.0).map_err(|e| format!("the source's state: {e}"))?;
        if snapshot.mem_size != self.config.mem_size {
            return Err("the state's memory size is not the CONFIG's".into());
        }
        let mut fds = f.fds.into_iter();
        let mut entry = None;
        let mut devices = Vec::new();
        if self.conn.is_unix() {
            if !entry_name.is_empty() {
                entry = fds.next().map(|f| (f, entry_name));
            }
            for name in names {
                let fd = fds
                    .next()
                    .ok_or("the source sent fewer descriptors than devices")?;
                devices.push((name, fd));
            }
        }
        Ok(Arrived {
            snapshot,
            entry,
            devices,
            pages,
        })
    }

    /// Say READY (with whether the admission entry is adopted) and wait
    /// for the source's COMMIT: `Ok` means the guest is ours to run.
    /// `adopting`: this side takes over the source's admission entry.
    pub fn ready(&mut self, adopting: bool) -> Result<(), String> {
        let net = |e: std::io::Error| format!("migration stream: {e}");
        self.conn.set_timeout(Some(PEER_TIMEOUT)).map_err(net)?;
        self.conn
            .send(tag::READY, &[u8::from(adopting)])
            .map_err(net)?;
        let f = self.conn.recv(4096).map_err(|e| {
            format!("the source did not commit ({e}): it failed or was stopped; discarding")
        })?;
        match f.tag {
            tag::COMMIT => {
                self.committed
                    .store(true, std::sync::atomic::Ordering::SeqCst);
                Ok(())
            }
            t => Err(unexpected(t, "COMMIT", &f)),
        }
    }

    /// A handle that can tell the source why this target gives up, after
    /// the `Incoming` itself is gone: until the source committed (after
    /// that the source is gone, and the sandbox forbids the call).
    pub fn aborter(&self) -> Option<Aborter> {
        Some(Aborter {
            conn: self.conn.try_clone().ok()?,
            committed: self.committed.clone(),
        })
    }

    /// Tell the source why this target gives up (best effort).
    pub fn abort(&mut self, why: &str) {
        let _ = self.conn.send(tag::ABORT, why.as_bytes());
    }
}
