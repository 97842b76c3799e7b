//! Entries in older formats: running entries that an older tt-host kept in
//! `state.json` (with an empty lock file in `running/`, or, older still,
//! none: judged by process id and start time).

use super::store::Running;
use std::collections::BTreeSet;

/// Start time (clock ticks since boot) of process `pid`, and whether it is
/// a zombie, from /proc/PID/stat.
pub(super) fn proc_start(pid: u32) -> Option<(u64, bool)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may
    // itself contain spaces and parentheses.
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest's fields start at field 3 (state); starttime is field 22.
    let state = f.first()?;
    let start = f.get(19)?.parse().ok()?;
    Some((start, *state == "Z" || *state == "X"))
}

pub(super) fn own_start_time() -> u64 {
    proc_start(std::process::id()).map_or(0, |(s, _)| s)
}

/// Is the process that registered an entry still running?
pub(super) fn alive(pid: u32, start: u64) -> bool {
    matches!(proc_start(pid), Some((s, false)) if s == start)
}

/// Check the running entries stored in `state.json` by an older tt-host:
/// the message of the first whose lock file name cannot be used.
pub(super) fn check_entries(running: &[Running]) -> Result<(), String> {
    // A lock file name is joined to running/ and the file may be deleted
    // when reaped: it must name a file in there.
    if let Some(r) = running.iter().find(|r| {
        r.lock
            .as_deref()
            .is_some_and(|l| l.is_empty() || l == "." || l == ".." || l.contains(['/', '\0']))
    }) {
        return Err(format!(
            "unikernel '{}' has lock file {:?}, not a file name",
            r.name,
            r.lock.as_deref().unwrap_or("")
        ));
    }
    // Two entries on one file: releasing one deletes it and the other,
    // still running, would be reaped.
    let mut locks = BTreeSet::new();
    if let Some(l) = running
        .iter()
        .filter_map(|r| r.lock.as_deref())
        .find(|l| !locks.insert(*l))
    {
        return Err(format!(
            "lock file {l:?} is listed for two running unikernels"
        ));
    }
    Ok(())
}
