//! The audit log of accepted reservations.
//!
//! An append-only file (the daemon keeps it in its state directory), one
//! line per accepted reservation: `CRC32 JSON`, the CRC in 8 hex digits
//! of the JSON's bytes, as in the daemon's desired-state log. The JSON is
//!
//! ```text
//! {"time_ns": N, "id": ..., "pool": ..., "customer": ..., "cu": N, "su": N, "ipv4u": N,
//!  "envelope": {"payload": ..., "customer_signature": ..., "sponsor_signature": ...}}
//! ```
//!
//! with the whole envelope, so anyone can verify each line again
//! ([`Entry::envelope`], [`super::reservation::verify`]). A line is
//! written and made durable (`fdatasync`) by [`AuditLog::record`] before
//! it returns, so a reservation is reported accepted only once it is on
//! disk.
//!
//! Opening the log reads every line: the ids accepted (a second
//! reservation with one of them is refused as replayed, across restarts)
//! and each pool's totals. A last line that a crash left torn (no
//! newline, or a bad CRC) was never acknowledged: it is cut off, so the
//! next line starts clean. A bad line before the last is an error naming
//! its number; nothing is repaired then. Lines are never rewritten. The
//! file is created mode 0600 and set to 0600 if it was not.

use super::reservation::{Accepted, Envelope, Reservation};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// One accepted reservation, as logged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// When it was accepted (Unix ns).
    pub time_ns: u64,
    pub id: String,
    pub pool: String,
    pub customer: String,
    pub cu: u64,
    pub su: u64,
    pub ipv4u: u64,
    /// The envelope as accepted.
    pub envelope: Envelope,
}

/// Unit-seconds reserved into one pool, summed over its reservations
/// (saturating at `u64::MAX`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub cu: u64,
    pub su: u64,
    pub ipv4u: u64,
    /// How many reservations.
    pub count: u64,
}

impl Totals {
    fn add(&mut self, e: &Entry) {
        self.cu = self.cu.saturating_add(e.cu);
        self.su = self.su.saturating_add(e.su);
        self.ipv4u = self.ipv4u.saturating_add(e.ipv4u);
        self.count += 1;
    }
}

/// What went wrong with the audit log; names the file.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("{path}: {err}")]
    Io {
        path: String,
        #[source]
        err: io::Error,
    },
    #[error("{path}, line {line}: {what}; the audit log is damaged, restore it from a backup")]
    Bad {
        path: String,
        line: usize,
        what: String,
    },
    #[error("replayed id '{0}': a reservation with this id was already accepted")]
    Replayed(String),
    #[error(
        "{path}: a failed append could not be undone, so nothing more is appended; \
         restart the daemon (opening the log cuts the torn line off)"
    )]
    Broken { path: String },
}

/// The log, open for appending, with what it holds.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    file: File,
    /// The length of the log's whole lines.
    len: u64,
    /// Set when a failed append could not be cut off again.
    broken: bool,
    ids: HashSet<String>,
    totals: BTreeMap<String, Totals>,
}

fn line_of(entry: &Entry) -> Vec<u8> {
    let json = serde_json::to_vec(entry).expect("entries always encode");
    let mut line = format!("{:08x} ", crc32fast::hash(&json)).into_bytes();
    line.extend_from_slice(&json);
    line.push(b'\n');
    line
}

fn parse_line(line: &[u8]) -> Result<Entry, String> {
    let text = std::str::from_utf8(line).map_err(|_| "not UTF-8".to_string())?;
    let (crc, json) = text
        .split_once(' ')
        .ok_or_else(|| "no CRC before the JSON".to_string())?;
    let crc = u32::from_str_radix(crc, 16).map_err(|_| format!("bad CRC '{crc}'"))?;
    if crc32fast::hash(json.as_bytes()) != crc {
        return Err("CRC does not match".into());
    }
    let entry: Entry = serde_json::from_str(json).map_err(|e| e.to_string())?;
    let r = Reservation::parse(&entry.envelope.payload).map_err(|e| e.to_string())?;
    if (&r.id, &r.pool, &r.customer, r.cu, r.su, r.ipv4u)
        != (
            &entry.id,
            &entry.pool,
            &entry.customer,
            entry.cu,
            entry.su,
            entry.ipv4u,
        )
    {
        return Err(format!(
            "the fields of reservation '{}' differ from its envelope's payload",
            entry.id
        ));
    }
    Ok(entry)
}

/// Parse a log's bytes. Returns the entries and the length of the valid
/// prefix (shorter than `bytes` when the last line is torn). A line whose
/// id was seen before is an error too.
pub fn parse(path: &str, bytes: &[u8]) -> Result<(Vec<Entry>, usize), AuditError> {
    let mut entries = Vec::new();
    let mut ids = HashSet::new();
    let mut valid = 0;
    let lines: Vec<&[u8]> = bytes.split_inclusive(|b| *b == b'\n').collect();
    for (i, line) in lines.iter().enumerate() {
        let last = i + 1 == lines.len();
        let body = line.strip_suffix(b"\n");
        let parsed = parse_line(body.unwrap_or(line));
        match parsed {
            Ok(entry) if body.is_some() => {
                if !ids.insert(entry.id.clone()) {
                    return Err(AuditError::Bad {
                        path: path.into(),
                        line: i + 1,
                        what: format!("id '{}' appears a second time", entry.id),
                    });
                }
                entries.push(entry);
                valid += line.len();
            }
            Err(what) if !last => {
                return Err(AuditError::Bad {
                    path: path.into(),
                    line: i + 1,
                    what,
                })
            }
            _ => {} // the last line, torn: never acknowledged
        }
    }
    Ok((entries, valid))
}

/// Read every entry of the log at `path` (for listing or re-verifying),
/// without opening it for appending. A torn last line is left out.
pub fn read(path: &Path) -> Result<Vec<Entry>, AuditError> {
    let name = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|err| AuditError::Io {
        path: name.clone(),
        err,
    })?;
    Ok(parse(&name, &bytes)?.0)
}

impl AuditLog {
    /// Open the log at `path`, creating it (mode 0600) if there is none,
    /// and read what it holds. A torn last line is cut off (and that made
    /// durable) so the next line appended starts clean.
    pub fn open(path: &Path) -> Result<AuditLog, AuditError> {
        let name = path.display().to_string();
        let io = |err| AuditError::Io {
            path: name.clone(),
            err,
        };
        let existed = path.exists();
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(io)?;
        if !existed {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
            }
        }
        let meta = file.metadata().map_err(io)?;
        if meta.permissions().mode() & 0o777 != 0o600 {
            file.set_permissions(std::fs::Permissions::from_mode(0o600))
                .map_err(io)?;
        }
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        io::Read::read_to_end(&mut file, &mut bytes).map_err(io)?;
        let (entries, valid) = parse(&name, &bytes)?;
        if valid < bytes.len() {
            file.set_len(valid as u64).map_err(io)?;
            file.sync_data().map_err(io)?;
        }
        let mut log = AuditLog {
            path: path.to_path_buf(),
            file,
            len: valid as u64,
            broken: false,
            ids: HashSet::new(),
            totals: BTreeMap::new(),
        };
        for e in &entries {
            log.note(e);
        }
        Ok(log)
    }

    fn note(&mut self, e: &Entry) {
        self.ids.insert(e.id.clone());
        self.totals.entry(e.pool.clone()).or_default().add(e);
    }

    /// Whether a reservation with this id was accepted (the `seen` of
    /// [`super::reservation::verify`]).
    pub fn contains(&self, id: &str) -> bool {
        self.ids.contains(id)
    }

    /// What was reserved into `pool` (zero if nothing).
    pub fn totals(&self, pool: &str) -> Totals {
        self.totals.get(pool).copied().unwrap_or_default()
    }

    /// Every pool's totals, by name.
    pub fn all_totals(&self) -> &BTreeMap<String, Totals> {
        &self.totals
    }

    /// Append `accepted`, accepted at `time_ns` (Unix ns), and make it
    /// durable before returning. An id already in the log is refused
    /// ([`AuditError::Replayed`]) and nothing is written. On an I/O error
    /// the reservation must be reported as not accepted; its id stays
    /// free, and what was written of its line is cut off again (if that
    /// fails too, every later call returns [`AuditError::Broken`]).
    pub fn record(&mut self, accepted: &Accepted, time_ns: u64) -> Result<Entry, AuditError> {
        let r = accepted.reservation();
        if self.contains(&r.id) {
            return Err(AuditError::Replayed(r.id.clone()));
        }
        let entry = Entry {
            time_ns,
            id: r.id.clone(),
            pool: r.pool.clone(),
            customer: r.customer.clone(),
            cu: r.cu,
            su: r.su,
            ipv4u: r.ipv4u,
            envelope: accepted.envelope().clone(),
        };
        let io = |err| AuditError::Io {
            path: self.path.display().to_string(),
            err,
        };
        if self.broken {
            return Err(AuditError::Broken {
                path: self.path.display().to_string(),
            });
        }
        let line = line_of(&entry);
        let written = self
            .file
            .write_all(&line)
            .and_then(|()| self.file.sync_data());
        if let Err(err) = written {
            let undone = self
                .file
                .set_len(self.len)
                .and_then(|()| self.file.sync_data());
            self.broken = undone.is_err();
            return Err(io(err));
        }
        self.len += line.len() as u64;
        self.note(&entry);
        Ok(entry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pools::reservation::tests::{key, payload, pools, ring, ALICE, BOB, SPONSOR};
    use crate::pools::reservation::{sign, verify, ReservationError};

    fn accept(id: &str, log: &AuditLog) -> Result<Accepted, ReservationError> {
        let env = sign(&payload(id, "web", "alice"), &key(ALICE), None);
        verify(&env, pools, &ring(), |id| log.contains(id))
    }

    #[test]
    fn accepted_ids_and_totals_survive_reopening_and_replays_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("reservations.log");
        let mut log = AuditLog::open(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        let a = accept("r1", &log).unwrap();
        log.record(&a, 1).unwrap();
        let env = sign(
            &payload("r2", "shared", "bob"),
            &key(BOB),
            Some(&key(SPONSOR)),
        );
        let b = verify(&env, pools, &ring(), |id| log.contains(id)).unwrap();
        log.record(&b, 2).unwrap();
        assert!(matches!(
            accept("r1", &log),
            Err(ReservationError::Replayed(_))
        ));
        let e = log.record(&a, 3).unwrap_err().to_string();
        assert!(e.starts_with("replayed id 'r1'"), "{e}");
        drop(log);

        let before = std::fs::read(&path).unwrap();
        let mut log = AuditLog::open(&path).unwrap();
        assert_eq!(
            std::fs::read(&path).unwrap(),
            before,
            "opening rewrites nothing"
        );
        assert!(matches!(
            accept("r1", &log),
            Err(ReservationError::Replayed(_))
        ));
        assert!(matches!(
            accept("r2", &log),
            Err(ReservationError::Replayed(_))
        ));
        let web = log.totals("web");
        assert_eq!((web.cu, web.su, web.ipv4u, web.count), (3600, 7200, 0, 1));
        assert_eq!(log.totals("shared").count, 1);
        assert_eq!(log.totals("none"), Totals::default());
        let c = accept("r3", &log).unwrap();
        log.record(&c, 4).unwrap();
        assert_eq!(log.totals("web").cu, 7200);
        drop(log);

        // Appending kept the earlier lines byte for byte.
        let after = std::fs::read(&path).unwrap();
        assert!(after.starts_with(&before));
        // Each line's envelope verifies again.
        let entries = read(&path).unwrap();
        assert_eq!(entries.len(), 3);
        assert_eq!(entries[1].time_ns, 2);
        for e in &entries {
            let again = verify(&e.envelope.to_json(), pools, &ring(), |_| false).unwrap();
            assert_eq!(again.reservation().id, e.id);
        }
    }

    #[test]
    fn a_torn_last_line_is_cut_off_and_a_bad_middle_line_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("reservations.log");
        let mut log = AuditLog::open(&path).unwrap();
        let a = accept("r1", &log).unwrap();
        log.record(&a, 1).unwrap();
        let b = accept("r2", &log).unwrap();
        let whole = log.record(&b, 2).unwrap();
        drop(log);
        let good = std::fs::read(&path).unwrap();
        let second = line_of(&whole);
        let first_len = good.len() - second.len();

        // Torn in the middle of the second line: r2 was never accepted.
        std::fs::write(&path, &good[..good.len() - 20]).unwrap();
        let mut log = AuditLog::open(&path).unwrap();
        assert!(log.contains("r1") && !log.contains("r2"));
        assert_eq!(
            std::fs::read(&path).unwrap().len(),
            first_len,
            "torn tail cut off"
        );
        let b = accept("r2", &log).unwrap();
        log.record(&b, 3).unwrap();
        drop(log);
        let log = AuditLog::open(&path).unwrap();
        assert!(log.contains("r2"));
        drop(log);

        // A whole line with a bad CRC, last: dropped; in the middle: named.
        let mut bad = good[..first_len].to_vec();
        let mut corrupt = second.clone();
        corrupt[0] ^= 1;
        bad.extend_from_slice(&corrupt);
        assert_eq!(parse("log", &bad).unwrap().0.len(), 1);
        bad.extend_from_slice(&second);
        let e = parse("log", &bad).unwrap_err().to_string();
        assert!(e.starts_with("log, line 2: CRC does not match"), "{e}");
        std::fs::write(&path, &bad).unwrap();
        let e = AuditLog::open(&path).unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
        assert_eq!(
            std::fs::read(&path).unwrap(),
            bad,
            "a damaged log is left as it is"
        );

        // The same id twice is damage too.
        let mut twice = good[..first_len].to_vec();
        twice.extend_from_slice(&good[..first_len]);
        twice.extend_from_slice(&second);
        let e = parse("log", &twice).unwrap_err().to_string();
        assert!(e.contains("line 2: id 'r1' appears a second time"), "{e}");
    }

    #[test]
    fn a_line_whose_fields_differ_from_its_envelope_is_refused() {
        let log_dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(&log_dir.path().join("l")).unwrap();
        let a = accept("r1", &log).unwrap();
        let mut entry = Entry {
            time_ns: 1,
            id: "r1".into(),
            pool: "web".into(),
            customer: "alice".into(),
            cu: 999_999,
            su: 7200,
            ipv4u: 0,
            envelope: a.envelope().clone(),
        };
        let mut bytes = line_of(&entry);
        bytes.extend_from_slice(&bytes.clone());
        let e = parse("log", &bytes).unwrap_err().to_string();
        assert!(
            e.contains("line 1") && e.contains("differ from its envelope"),
            "{e}"
        );
        entry.cu = 3600;
        assert_eq!(parse("log", &line_of(&entry)).unwrap().0, vec![entry]);
    }

    #[test]
    fn a_log_with_wider_permissions_is_set_to_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l");
        std::fs::write(&path, b"").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        AuditLog::open(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
