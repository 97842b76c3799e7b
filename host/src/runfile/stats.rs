//! The stats file: a `tt-host run` process's counters, identity and end
//! record, in a small mapped file (`tt-host run --stats-file=PATH`).
//!
//! The devices count into [`counters`]: one relaxed atomic add per
//! completed request, from whatever thread completes it. Without
//! `--stats-file` they count into a block of this process's memory; with
//! it, [`StatsFile::install`] points [`counters`] at the counters in the
//! file, which a supervisor reads at any time ([`StatsFile::read`]).
//!
//! The file also says which process wrote it (pid, start time from
//! `/proc/self/stat`, boot id), so that a supervisor can tell whether
//! that process still runs ([`Snapshot::still_running`]), and, once it
//! has ended, how ([`State`]): [`StatsFile::finish`] writes the end record
//! (CPU time, peak RSS, then the state last, with release ordering) as
//! `tt-host run` exits. A process killed by SIGKILL (or that crashed)
//! leaves [`State::Running`] behind while it no longer runs: its status is
//! then unknown.

use super::{create_mapped, now_ns, read_at};
use std::path::Path;
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;

/// The first bytes of a stats file.
pub const MAGIC: [u8; 8] = *b"TTSTATS\0";
/// The layout version this code writes and reads.
pub const VERSION: u32 = 1;

/// What the devices and the run loop count, shared by every thread.
#[repr(C)]
#[derive(Debug, Default)]
pub struct Counters {
    /// Block reads completed without error (hvt hypercalls and
    /// virtio-blk), and their bytes.
    pub block_read_ops: AtomicU64,
    pub block_read_bytes: AtomicU64,
    /// Block writes completed without error, and their bytes.
    pub block_write_ops: AtomicU64,
    pub block_write_bytes: AtomicU64,
    /// Frames the guest received, and their bytes.
    pub net_rx_packets: AtomicU64,
    pub net_rx_bytes: AtomicU64,
    /// Frames the guest sent, and their bytes.
    pub net_tx_packets: AtomicU64,
    pub net_tx_bytes: AtomicU64,
    /// Returns of KVM_RUN to tt-host (every exit to user space).
    pub vm_exits: AtomicU64,
    /// When the guest started to run (Unix time, ns); 0 before.
    pub guest_started_ns: AtomicU64,
}

impl Counters {
    /// A block read of `bytes` completed.
    #[inline]
    pub fn block_read(&self, bytes: u64) {
        self.block_read_ops.fetch_add(1, Relaxed);
        self.block_read_bytes.fetch_add(bytes, Relaxed);
    }

    /// A block write of `bytes` completed.
    #[inline]
    pub fn block_write(&self, bytes: u64) {
        self.block_write_ops.fetch_add(1, Relaxed);
        self.block_write_bytes.fetch_add(bytes, Relaxed);
    }

    /// The guest received a frame of `bytes`.
    #[inline]
    pub fn net_rx(&self, bytes: u64) {
        self.net_rx_packets.fetch_add(1, Relaxed);
        self.net_rx_bytes.fetch_add(bytes, Relaxed);
    }

    /// The guest sent a frame of `bytes`.
    #[inline]
    pub fn net_tx(&self, bytes: u64) {
        self.net_tx_packets.fetch_add(1, Relaxed);
        self.net_tx_bytes.fetch_add(bytes, Relaxed);
    }

    /// KVM_RUN returned. Only the vCPU thread counts exits: a load and a
    /// store, no read-modify-write.
    #[inline]
    pub fn vm_exit(&self) {
        self.vm_exits
            .store(self.vm_exits.load(Relaxed).wrapping_add(1), Relaxed);
    }

    /// The guest is about to run (now).
    pub fn guest_starts(&self) {
        self.guest_started_ns.store(now_ns().max(1), Relaxed);
    }

    /// Has the guest started to run?
    pub fn guest_started(&self) -> bool {
        self.guest_started_ns.load(Relaxed) != 0
    }
}

static LOCAL: Counters = Counters {
    block_read_ops: AtomicU64::new(0),
    block_read_bytes: AtomicU64::new(0),
    block_write_ops: AtomicU64::new(0),
    block_write_bytes: AtomicU64::new(0),
    net_rx_packets: AtomicU64::new(0),
    net_rx_bytes: AtomicU64::new(0),
    net_tx_packets: AtomicU64::new(0),
    net_tx_bytes: AtomicU64::new(0),
    vm_exits: AtomicU64::new(0),
    guest_started_ns: AtomicU64::new(0),
};
static INSTALLED: OnceLock<&'static Counters> = OnceLock::new();

/// This process's counters: those of the stats file once one is
/// installed ([`StatsFile::install`]), else a block of its own memory.
#[inline]
pub fn counters() -> &'static Counters {
    INSTALLED.get().copied().unwrap_or(&LOCAL)
}

/// How the process ended, in the end record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum State {
    /// Still running, or killed without a chance to write its end
    /// (SIGKILL, a crash): see [`Snapshot::still_running`].
    Running,
    /// The run ended with this status: the guest's exit status, or 1 if
    /// tt-host stopped the guest (a fault) after it started. The process
    /// exits with `code & 0xff`.
    Exited(i32),
    /// SIGINT or SIGTERM (this signal number) stopped the run; the process
    /// exits with 1.
    Signaled(i32),
    /// The launch failed before the guest ran (a bad image, option,
    /// device or policy); the process exits with 1.
    Failed,
}

impl State {
    /// The exit status of the process, once it has ended.
    pub fn exit_status(self) -> Option<u8> {
        match self {
            State::Running => None,
            State::Exited(code) => Some((code & 0xff) as u8),
            State::Signaled(_) | State::Failed => Some(1),
        }
    }

    fn encode(self) -> (u32, i32) {
        match self {
            State::Running => (0, 0),
            State::Exited(c) => (1, c),
            State::Signaled(s) => (2, s),
            State::Failed => (3, 1),
        }
    }

    fn decode(state: u32, code: i32) -> Option<State> {
        Some(match state {
            0 => State::Running,
            1 => State::Exited(code),
            2 => State::Signaled(code),
            3 => State::Failed,
            _ => return None,
        })
    }
}

/// The stats file's layout, at offset 0.
#[repr(C)]
pub struct Layout {
    pub magic: [u8; 8],
    pub version: u32,
    /// Size of this layout: the file's size.
    pub size: u32,
    pub pid: u32,
    pub reserved0: u32,
    /// Field 22 of /proc/PID/stat (clock ticks after boot).
    pub start_time: u64,
    /// /proc/sys/kernel/random/boot_id, as 16 bytes.
    pub boot_id: [u8; 16],
    /// When the file was created (Unix time, ns).
    pub created_ns: u64,
    pub counters: Counters,
    /// The end record: [`State`] as 0 to 3, written last (release).
    pub state: AtomicU32,
    /// The exit code or signal number.
    pub code: AtomicI32,
    pub user_cpu_ns: AtomicU64,
    pub system_cpu_ns: AtomicU64,
    /// getrusage's ru_maxrss (KiB).
    pub max_rss_kib: AtomicU64,
    pub reserved: [u64; 4],
}

/// The stats file's size.
pub const SIZE: usize = std::mem::size_of::<Layout>();

/// What went wrong with a stats file; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error("stats file {path}: {err}")]
    Io {
        path: String,
        #[source]
        err: std::io::Error,
    },
    #[error("stats file {path}: not a tt-host stats file (wrong magic bytes)")]
    Magic { path: String },
    #[error(
        "stats file {path}: layout version {version} of {size} bytes, this tt-host reads \
         version {VERSION} of {SIZE} bytes"
    )]
    Version {
        path: String,
        version: u32,
        size: u32,
    },
    #[error("stats file {path}: {len} bytes, expected {SIZE} (damaged or truncated)")]
    Size { path: String, len: u64 },
    #[error("stats file {path}: unknown end state {state} (damaged)")]
    State { path: String, state: u32 },
}

/// A stats file this process writes.
pub struct StatsFile {
    layout: &'static Layout,
}

/// Everything a stats file says, read at one moment.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Snapshot {
    pub pid: u32,
    /// Field 22 of /proc/PID/stat when the file was written.
    pub start_time: u64,
    /// The boot id, as the kernel prints it (`8-4-4-4-12` hex digits).
    pub boot_id: String,
    pub created_ns: u64,
    /// When the guest started to run; 0 if it never did.
    pub guest_started_ns: u64,
    pub block_read_ops: u64,
    pub block_read_bytes: u64,
    pub block_write_ops: u64,
    pub block_write_bytes: u64,
    pub net_rx_packets: u64,
    pub net_rx_bytes: u64,
    pub net_tx_packets: u64,
    pub net_tx_bytes: u64,
    pub vm_exits: u64,
    pub state: State,
    /// CPU time of the whole process (all threads), once it ended.
    pub user_cpu_ns: u64,
    pub system_cpu_ns: u64,
    /// Peak resident memory in KiB, once it ended.
    pub max_rss_kib: u64,
}

impl StatsFile {
    /// Create (or truncate) the stats file at `path`, mode 0600, with this
    /// process's identity, zero counters and [`State::Running`].
    pub fn create(path: &Path) -> Result<StatsFile, StatsError> {
        let io = |err| StatsError::Io {
            path: path.display().to_string(),
            err,
        };
        let base = create_mapped(path, SIZE).map_err(io)?;
        let layout = Layout {
            magic: MAGIC,
            version: VERSION,
            size: SIZE as u32,
            pid: std::process::id(),
            reserved0: 0,
            start_time: proc_start(std::process::id()).map_or(0, |(s, _)| s),
            boot_id: boot_id().unwrap_or([0; 16]),
            created_ns: now_ns(),
            counters: Counters::default(),
            state: AtomicU32::new(0),
            code: AtomicI32::new(0),
            user_cpu_ns: AtomicU64::new(0),
            system_cpu_ns: AtomicU64::new(0),
            max_rss_kib: AtomicU64::new(0),
            reserved: [0; 4],
        };
        // SAFETY: the mapping is SIZE bytes, page-aligned, never unmapped,
        // and nothing else in this process refers to it: it holds a
        // `Layout` from here on, shared only through `&'static Layout`
        // (all of whose mutable fields are atomics).
        let layout = unsafe {
            std::ptr::write(base.cast::<Layout>(), layout);
            &*base.cast::<Layout>()
        };
        Ok(StatsFile { layout })
    }

    /// Make [`counters`] this file's (what was counted before stays in
    /// the local block). Only the first file installed counts; false if
    /// another was installed before.
    pub fn install(&self) -> bool {
        INSTALLED.set(&self.layout.counters).is_ok()
    }

    /// This file's counters.
    pub fn counters(&self) -> &'static Counters {
        &self.layout.counters
    }

    /// Write the end record: this process's CPU time and peak RSS, then
    /// `state` (release), which a reader sees last.
    pub fn finish(&self, state: State) {
        let l = self.layout;
        // SAFETY: getrusage fills the zeroed struct it is given.
        let usage = unsafe {
            let mut u: libc::rusage = std::mem::zeroed();
            libc::getrusage(libc::RUSAGE_SELF, &mut u);
            u
        };
        let ns = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1000;
        l.user_cpu_ns.store(ns(usage.ru_utime), Relaxed);
        l.system_cpu_ns.store(ns(usage.ru_stime), Relaxed);
        l.max_rss_kib.store(usage.ru_maxrss.max(0) as u64, Relaxed);
        let (s, code) = state.encode();
        l.code.store(code, Relaxed);
        l.state.store(s, std::sync::atomic::Ordering::Release);
    }

    /// Read the stats file at `path` (of this or another process, running
    /// or ended).
    pub fn read(path: &Path) -> Result<Snapshot, StatsError> {
        let p = || path.display().to_string();
        let io = |err| StatsError::Io { path: p(), err };
        let file = std::fs::File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let mut raw = [0u8; SIZE];
        let read = |raw: &mut [u8; SIZE]| -> Result<Layout, StatsError> {
            read_at(&file, &mut raw[..], 0).map_err(|err| match err.kind() {
                std::io::ErrorKind::UnexpectedEof => StatsError::Size { path: p(), len },
                _ => io(err),
            })?;
            // SAFETY: `raw` holds SIZE bytes and every bit pattern is a
            // valid `Layout` (integers, atomic integers, byte arrays).
            Ok(unsafe { std::ptr::read_unaligned(raw.as_ptr().cast()) })
        };
        let mut l = read(&mut raw)?;
        if l.magic != MAGIC {
            return Err(StatsError::Magic { path: p() });
        }
        if l.version != VERSION || l.size as usize != SIZE {
            return Err(StatsError::Version {
                path: p(),
                version: l.version,
                size: l.size,
            });
        }
        if len != SIZE as u64 {
            return Err(StatsError::Size { path: p(), len });
        }
        if l.state.load(Relaxed) != 0 {
            // The end record is written before its state: a second read
            // sees all of it.
            l = read(&mut raw)?;
        }
        let (s, code) = (l.state.load(Relaxed), l.code.load(Relaxed));
        let state = State::decode(s, code).ok_or(StatsError::State {
            path: p(),
            state: s,
        })?;
        let c = &l.counters;
        Ok(Snapshot {
            pid: l.pid,
            start_time: l.start_time,
            boot_id: format_boot_id(&l.boot_id),
            created_ns: l.created_ns,
            guest_started_ns: c.guest_started_ns.load(Relaxed),
            block_read_ops: c.block_read_ops.load(Relaxed),
            block_read_bytes: c.block_read_bytes.load(Relaxed),
            block_write_ops: c.block_write_ops.load(Relaxed),
            block_write_bytes: c.block_write_bytes.load(Relaxed),
            net_rx_packets: c.net_rx_packets.load(Relaxed),
            net_rx_bytes: c.net_rx_bytes.load(Relaxed),
            net_tx_packets: c.net_tx_packets.load(Relaxed),
            net_tx_bytes: c.net_tx_bytes.load(Relaxed),
            vm_exits: c.vm_exits.load(Relaxed),
            state,
            user_cpu_ns: l.user_cpu_ns.load(Relaxed),
            system_cpu_ns: l.system_cpu_ns.load(Relaxed),
            max_rss_kib: l.max_rss_kib.load(Relaxed),
        })
    }
}

impl Snapshot {
    /// Is the process that wrote this file still running: same boot, its
    /// pid alive (not a zombie) with the same start time? A process that
    /// ended without its end record (SIGKILL) shows [`State::Running`]
    /// and is not running.
    pub fn still_running(&self) -> bool {
        let same_boot = boot_id().is_some_and(|b| format_boot_id(&b) == self.boot_id);
        same_boot && matches!(proc_start(self.pid), Some((s, false)) if s == self.start_time)
    }
}

/// Start time (clock ticks after boot, field 22) of process `pid`, and
/// whether it is a zombie, from /proc/PID/stat.
pub fn proc_start(pid: u32) -> Option<(u64, bool)> {
    if pid == 0 {
        return None;
    }
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces and
    // parentheses itself: fields are counted after the last ')'.
    let f: Vec<&str> = s[s.rfind(')')? + 1..].split_whitespace().collect();
    // f[0] is field 3 (state); field 22 is f[19].
    let state = *f.first()?;
    Some((f.get(19)?.parse().ok()?, state == "Z" || state == "X"))
}

/// This boot's id, as 16 bytes.
pub fn boot_id() -> Option<[u8; 16]> {
    let text = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let hex: Vec<u8> = text.trim().bytes().filter(|&b| b != b'-').collect();
    if hex.len() != 32 {
        return None;
    }
    let mut id = [0u8; 16];
    for (i, pair) in hex.chunks(2).enumerate() {
        id[i] = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(id)
}

fn format_boot_id(id: &[u8; 16]) -> String {
    let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}
