//! The desired state: every unikernel created and not destroyed, with
//! what it was created with, kept so that the daemon can bring them back
//! after its own restart or the host's.
//!
//! It is an append-only log in the state directory, `daemon/desired.log`:
//! one line per change, `CRC32 JSON` (the CRC in hex, of the JSON's
//! bytes). A create appends `{"create": spec}`, a destroy
//! `{"destroy": name}`, each written and then made durable with one
//! `fdatasync` before the daemon answers. A line that a crash left torn
//! (the last one, with a bad CRC or no newline) was never acknowledged
//! and is dropped; a bad line before the last is an error naming its
//! number. At each start the daemon rewrites the log with one create per
//! unikernel (a new file, fdatasync, rename, fsync of the directory), so
//! it stays as long as what it describes.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Who created a unikernel: the client's identity, under which its files
/// are opened at every start (`tt-host run --x-client`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

/// A unikernel as created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spec {
    pub name: String,
    /// The `tt-host run` command line after `run`, paths absolute.
    pub args: Vec<String>,
    pub restart_on_fail: Option<Vec<u8>>,
    pub owner: Owner,
    /// When it was created (Unix ns).
    pub created_ns: u64,
    /// The capacity pool it draws from (`create --pool`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// The environment it belongs to (`create --env`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<String>,
    /// Runtime images the daemon made for it (`create --disk-from`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<RuntimeImage>,
    /// Its place on its environment's network (`create --env-net`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<UnitNet>,
}

/// A block device made from a template: the unikernel's own copy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeImage {
    /// The hvt block device (`--block:DEVICE=PATH`).
    pub device: String,
    pub template: String,
    pub path: PathBuf,
    /// `--keep-image`: left in place when the unikernel goes.
    pub keep: bool,
}

/// A unikernel's TAP on its environment's bridge, its address, and the
/// host ports forwarded to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitNet {
    /// The hvt net device (`--net:DEVICE=TAP`).
    pub device: String,
    pub tap: String,
    pub ip: std::net::Ipv4Addr,
    /// `HOST:GUEST[/udp]`, as given to create.
    pub ports: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Change {
    Create(Box<Spec>),
    Destroy(String),
}

/// The log, open for appending.
pub struct Desired {
    path: PathBuf,
    file: File,
}

/// What went wrong with the log; names the file.
#[derive(Debug, thiserror::Error)]
pub enum DesiredError {
    #[error("{path}: {err}")]
    Io { path: String, err: io::Error },
    #[error("{path}, line {line}: {what}")]
    Bad {
        path: String,
        line: usize,
        what: String,
    },
}

fn line_of(change: &Change) -> Vec<u8> {
    let json = serde_json::to_vec(change).expect("specs always encode");
    let mut line = format!("{:08x} ", crc32fast::hash(&json)).into_bytes();
    line.extend_from_slice(&json);
    line.push(b'\n');
    line
}

fn parse_line(line: &[u8]) -> Result<Change, String> {
    let text = std::str::from_utf8(line).map_err(|_| "not UTF-8".to_string())?;
    let (crc, json) = text
        .split_once(' ')
        .ok_or_else(|| "no CRC before the JSON".to_string())?;
    let crc = u32::from_str_radix(crc, 16).map_err(|_| format!("bad CRC '{crc}'"))?;
    if crc32fast::hash(json.as_bytes()) != crc {
        return Err("CRC does not match".into());
    }
    serde_json::from_str(json).map_err(|e| e.to_string())
}

/// Parse a log's bytes into the unikernels it describes, in creation
/// order. A torn last line is dropped.
pub fn parse(path: &str, bytes: &[u8]) -> Result<BTreeMap<String, Spec>, DesiredError> {
    let mut specs = BTreeMap::new();
    let lines: Vec<&[u8]> = bytes.split_inclusive(|b| *b == b'\n').collect();
    for (i, line) in lines.iter().enumerate() {
        let last = i + 1 == lines.len();
        let complete = line.ends_with(b"\n");
        let body = line.strip_suffix(b"\n").unwrap_or(line);
        match parse_line(body) {
            Ok(_) if !complete => {} // torn: never acknowledged
            Ok(Change::Create(s)) => {
                specs.insert(s.name.clone(), *s);
            }
            Ok(Change::Destroy(n)) => {
                specs.remove(&n);
            }
            Err(_) if last => {} // torn: never acknowledged
            Err(what) => {
                return Err(DesiredError::Bad {
                    path: path.into(),
                    line: i + 1,
                    what,
                })
            }
        }
    }
    Ok(specs)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Desired {
    /// Read the log at `path` (none yet: nothing created), rewrite it
    /// compacted, and open it for appending.
    pub fn open(path: &Path) -> Result<(Desired, BTreeMap<String, Spec>), DesiredError> {
        let name = path.display().to_string();
        let io = |err| DesiredError::Io {
            path: name.clone(),
            err,
        };
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io(e)),
        };
        let specs = parse(&name, &bytes)?;
        let tmp = path.with_extension("log.new");
        let mut out = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(io)?;
        let mut all: Vec<&Spec> = specs.values().collect();
        all.sort_by_key(|s| s.created_ns);
        for s in all {
            out.write_all(&line_of(&Change::Create(Box::new(s.clone()))))
                .map_err(io)?;
        }
        out.sync_data().map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)?;
        if let Some(dir) = path.parent() {
            sync_dir(dir).map_err(io)?;
        }
        let file = OpenOptions::new()
            .append(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(io)?;
        Ok((
            Desired {
                path: path.to_path_buf(),
                file,
            },
            specs,
        ))
    }

    fn append(&mut self, change: &Change) -> Result<(), DesiredError> {
        let io = |err| DesiredError::Io {
            path: self.path.display().to_string(),
            err,
        };
        self.file.write_all(&line_of(change)).map_err(io)?;
        self.file.sync_data().map_err(io)
    }

    /// Record a unikernel created (durable when this returns).
    pub fn create(&mut self, spec: &Spec) -> Result<(), DesiredError> {
        self.append(&Change::Create(Box::new(spec.clone())))
    }

    /// Record a unikernel destroyed (durable when this returns).
    pub fn destroy(&mut self, name: &str) -> Result<(), DesiredError> {
        self.append(&Change::Destroy(name.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, t: u64) -> Spec {
        Spec {
            name: name.into(),
            args: vec!["/img".into()],
            restart_on_fail: None,
            owner: Owner {
                uid: 0,
                gid: 0,
                groups: vec![],
            },
            created_ns: t,
            pool: None,
            env: None,
            images: vec![],
            net: None,
        }
    }

    #[test]
    fn creates_and_destroys_survive_reopening_and_compaction() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("desired.log");
        let (mut d, specs) = Desired::open(&path).unwrap();
        assert!(specs.is_empty());
        d.create(&spec("a", 1)).unwrap();
        d.create(&spec("b", 2)).unwrap();
        d.destroy("a").unwrap();
        d.create(&spec("c", 3)).unwrap();
        drop(d);
        let (_, specs) = Desired::open(&path).unwrap();
        assert_eq!(specs.keys().collect::<Vec<_>>(), ["b", "c"]);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2, "compacted: {text}");
    }

    #[test]
    fn a_torn_last_line_is_dropped_and_a_bad_middle_line_is_named() {
        let mut log = line_of(&Change::Create(Box::new(spec("a", 1))));
        let b = line_of(&Change::Create(Box::new(spec("b", 2))));
        log.extend_from_slice(&b[..b.len() - 5]);
        let specs = parse("log", &log).unwrap();
        assert_eq!(specs.keys().collect::<Vec<_>>(), ["a"]);

        let mut log = line_of(&Change::Create(Box::new(spec("a", 1))));
        log.extend_from_slice(b"0000 {\"destroy\":\"a\"}\n");
        log.extend_from_slice(&line_of(&Change::Create(Box::new(spec("c", 3)))));
        let e = parse("log", &log).unwrap_err().to_string();
        assert!(e.contains("log, line 2: CRC does not match"), "{e}");

        // A complete line whose JSON lacks its newline is torn too.
        let a = line_of(&Change::Destroy("a".into()));
        let mut log = line_of(&Change::Create(Box::new(spec("a", 1))));
        log.extend_from_slice(&a[..a.len() - 1]);
        assert_eq!(parse("log", &log).unwrap().len(), 1);
    }
}
