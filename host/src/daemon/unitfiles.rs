//! What a unikernel's `tt-host run` publishes for the daemon, in the
//! unit's runtime directory: its console ring and its stats file
//! ([`crate::runfile`]), read here into the daemon's terms.

use super::proto::{ConsoleRecord, UnitStats};
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
    /// `None` while the instance runs.
    pub end: Option<End>,
    pub stats: UnitStats,
}

/// Read a unit's stats file.
pub fn read_stats(_path: &Path) -> io::Result<Published> {
    Err(io::Error::from(io::ErrorKind::NotFound))
}

/// Is the process `p` names still that same process (pid alive, same
/// start time)?
pub fn same_process(p: &Published) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{}/stat", p.pid)) else {
        return false;
    };
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
        return false;
    };
    // starttime is field 22 (19 after the state).
    rest.split(' ')
        .nth(19)
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|s| s == p.start_time)
}

/// A unit's console ring, open for reading.
pub struct Console {}

/// Records read from a console: `next` is where to read on from.
pub struct Read {
    pub records: Vec<ConsoleRecord>,
    pub next: u64,
    pub lost: u64,
}

impl Console {
    pub fn open(_path: &Path) -> io::Result<Console> {
        Err(io::Error::from(io::ErrorKind::NotFound))
    }
    pub fn end(&self) -> u64 {
        0
    }
    pub fn read_from(&self, pos: u64) -> io::Result<Read> {
        Ok(Read {
            records: vec![],
            next: pos,
            lost: 0,
        })
    }
    pub fn last(&self, _n: usize) -> io::Result<Read> {
        self.read_from(0)
    }
    pub fn since(&self, _ns: u64) -> io::Result<Read> {
        self.read_from(0)
    }
}

impl Console {
    /// Is this the ring now at `path` (not one replaced since)?
    pub fn is_current(&self, _path: &Path) -> bool {
        true
    }
}
