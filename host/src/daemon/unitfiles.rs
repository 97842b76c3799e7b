//! What a unikernel's `tt-host run` publishes for the daemon, in the
//! unit's runtime directory: its console ring and its stats file
//! ([`crate::runfile`]), read here into the daemon's terms.

use super::proto::{ConsoleRecord, UnitStats};
use crate::runfile::console::{Chunk, ConsoleLog};
use crate::runfile::stats::{State, StatsFile};
use std::io;
use std::path::Path;

/// How an instance ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The guest exited with this status (tt-host run's exit status).
    Exited(u8),
    /// tt-host run stopped on this signal (SIGINT or SIGTERM).
    Signal(i32),
    /// tt-host run failed before the guest ran (exit status 1).
    Failed,
    /// The process is gone without recording its end: killed (SIGKILL,
    /// or a signal it does not handle).
    Killed(Option<i32>),
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::Exited(c) => write!(f, "exit {c}"),
            End::Signal(s) => write!(f, "signal {s}"),
            End::Failed => write!(f, "failed to start (exit 1)"),
            End::Killed(Some(s)) => write!(f, "killed by signal {s}"),
            End::Killed(None) => write!(f, "killed"),
        }
    }
}

/// The stats file's contents.
#[derive(Debug, Clone, Default)]
pub struct Published {
    pub pid: u32,
    pub start_time: u64,
    pub boot_id: String,
    /// `None` while the instance runs (or if it was killed before it
    /// could record its end).
    pub end: Option<End>,
    /// Is the process that wrote the file still that process, running?
    pub running: bool,
    pub stats: UnitStats,
}

/// Read a unit's stats file.
pub fn read_stats(path: &Path) -> io::Result<Published> {
    let s = StatsFile::read(path).map_err(|e| io::Error::other(e.to_string()))?;
    let end = match s.state {
        State::Running => None,
        State::Exited(c) => Some(End::Exited((c & 0xff) as u8)),
        State::Signaled(sig) => Some(End::Signal(sig)),
        State::Failed => Some(End::Failed),
    };
    Ok(Published {
        pid: s.pid,
        start_time: s.start_time,
        boot_id: s.boot_id.clone(),
        end,
        running: s.still_running(),
        stats: UnitStats {
            name: String::new(),
            running: false,
            cpu_user_us: s.user_cpu_ns / 1000,
            cpu_system_us: s.system_cpu_ns / 1000,
            peak_rss_kib: s.max_rss_kib,
            block_read_ops: s.block_read_ops,
            block_read_bytes: s.block_read_bytes,
            block_write_ops: s.block_write_ops,
            block_write_bytes: s.block_write_bytes,
            net_rx_packets: s.net_rx_packets,
            net_rx_bytes: s.net_rx_bytes,
            net_tx_packets: s.net_tx_packets,
            net_tx_bytes: s.net_tx_bytes,
            vm_exits: s.vm_exits,
            restarts: 0,
        },
    })
}

/// A unit's console ring, open for reading.
pub struct Console(ConsoleLog);

/// Records read from a console: `next` is where to read on from.
pub struct Read {
    pub records: Vec<ConsoleRecord>,
    pub next: u64,
    pub lost: u64,
}

fn read(r: Result<Chunk, crate::runfile::console::ConsoleError>) -> io::Result<Read> {
    let c = r.map_err(|e| io::Error::other(e.to_string()))?;
    Ok(Read {
        records: c
            .records
            .into_iter()
            .map(|r| ConsoleRecord {
                time_ns: r.time_ns,
                partial: r.partial,
                text: String::from_utf8_lossy(&r.bytes).into_owned(),
            })
            .collect(),
        next: c.next,
        lost: c.lost,
    })
}

impl Console {
    pub fn open(path: &Path) -> io::Result<Console> {
        ConsoleLog::open(path)
            .map(Console)
            .map_err(|e| io::Error::other(e.to_string()))
    }

    /// Is this the ring now at `path` (not one replaced since)?
    pub fn is_current(&self, path: &Path) -> bool {
        self.0.is_current(path)
    }

    /// Where the oldest record still kept starts (0 before the ring
    /// wrapped): reading from here loses nothing.
    pub fn oldest(&self) -> io::Result<u64> {
        let end = self.0.end().map_err(|e| io::Error::other(e.to_string()))?;
        Ok(end.saturating_sub(self.0.capacity()))
    }

    pub fn read_from(&self, pos: u64) -> io::Result<Read> {
        read(self.0.read_from(pos))
    }

    pub fn last(&self, n: usize) -> io::Result<Read> {
        read(self.0.last(n))
    }

    pub fn since(&self, ns: u64) -> io::Result<Read> {
        read(self.0.since(ns))
    }
}
