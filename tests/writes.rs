//! What the `blkwriter` example wrote, and a check of a disk image
//! against it: the model the crash and power-cut tests share.
//!
//! `blkwriter` prints `ack N off=SECTOR len=SECTORS` once write N
//! returned; every sector it writes says which write and which sector it
//! is, with a checksum (see guest-sdk/examples/blkwriter). A test feeds
//! the acknowledged writes of each run into a [`Writes`], and the numbers
//! of writes that may have been in flight when the host died, then checks
//! the image.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The writes acknowledged so far, and those that may have reached the
/// disk without an acknowledgement (in flight when the host died).
#[derive(Debug, Default)]
pub struct Writes {
    /// For each sector, the acknowledged writes that covered it, in order.
    acked: BTreeMap<u64, Vec<u64>>,
    /// Every acknowledged write: number -> (first sector, sectors).
    extents: BTreeMap<u64, (u64, u64)>,
    /// Writes that may or may not be on the disk.
    maybe: BTreeSet<u64>,
}

/// Parse the acknowledgements in a run's console output: blkwriter's
/// `ack N off=S len=L`, and vblk's `ack N sector=S` (a 4 KiB write: 8
/// sectors of 512 bytes), as (write, first sector, sectors).
pub fn acks(stdout: &str) -> Vec<(u64, u64, u64)> {
    stdout
        .lines()
        .filter_map(|l| {
            let mut w = l.strip_prefix("ack ")?.split(' ');
            let n = w.next()?.parse().ok()?;
            let at = w.next()?;
            if let Some(s) = at.strip_prefix("sector=") {
                return Some((n, s.parse().ok()?, 8));
            }
            let off = at.strip_prefix("off=")?.parse().ok()?;
            let len = w.next()?.strip_prefix("len=")?.parse().ok()?;
            Some((n, off, len))
        })
        .collect()
}

impl Writes {
    /// Write `n` of `len` sectors at sector `off` was acknowledged.
    pub fn ack(&mut self, n: u64, off: u64, len: u64) {
        self.extents.insert(n, (off, len));
        for s in off..off + len {
            self.acked.entry(s).or_default().push(n);
        }
    }

    /// Write `n` may have reached the disk, unacknowledged.
    pub fn maybe(&mut self, n: u64) {
        self.maybe.insert(n);
    }

    /// The highest write number seen.
    pub fn last(&self) -> u64 {
        let a = self.extents.keys().next_back().copied().unwrap_or(0);
        let m = self.maybe.iter().next_back().copied().unwrap_or(0);
        a.max(m)
    }

    pub fn acked_count(&self) -> usize {
        self.extents.len()
    }

    /// Check the image at `path` (sectors of `bs` bytes): every sector
    /// holds the last acknowledged write that covered it, or a later write
    /// that covered it (acknowledged or in flight); a sector no
    /// acknowledged write covered is zero or holds such a write; no sector
    /// is torn or belongs elsewhere. Returns the problems found, at most
    /// 10 (empty: the image is right).
    pub fn check(&self, path: &Path, bs: u64) -> Vec<String> {
        let image = std::fs::read(path).expect("read the image");
        let mut problems = Vec::new();
        for (s, sector) in image.chunks(bs as usize).enumerate() {
            let s = s as u64;
            let want = self.acked.get(&s).and_then(|v| v.last()).copied();
            let got = match decode(sector, s) {
                Ok(got) => got,
                Err(why) => {
                    problems.push(format!("sector {s}: {why} (want write {want:?})"));
                    continue;
                }
            };
            let covered = |n: u64| {
                self.maybe.contains(&n)
                    || self
                        .extents
                        .get(&n)
                        .is_some_and(|&(o, l)| (o..o + l).contains(&s))
            };
            let ok = match (want, got) {
                (None, None) => true,
                (Some(_), None) => false,
                (w, Some(n)) => w.is_none_or(|w| n >= w) && covered(n),
            };
            if !ok {
                problems.push(format!(
                    "sector {s}: holds write {got:?}, want write {want:?} or a later one \
                     that covered it"
                ));
            }
            if problems.len() >= 10 {
                break;
            }
        }
        problems
    }
}

/// What sector `s` holds: `None` if it is all zero, `Some(n)` for a whole
/// sector of write n; an error if it is torn or foreign.
fn decode(sector: &[u8], s: u64) -> Result<Option<u64>, String> {
    if sector.iter().all(|&b| b == 0) {
        return Ok(None);
    }
    if &sector[0..8] != b"TTWRITE1" {
        return Err("no blkwriter magic: torn or foreign data".into());
    }
    let n = u64::from_le_bytes(sector[8..16].try_into().unwrap());
    let index = u64::from_le_bytes(sector[16..24].try_into().unwrap());
    let sum = u64::from_le_bytes(sector[24..32].try_into().unwrap());
    let fnv = |h: u64, b: &[u8]| {
        b.iter()
            .fold(h, |h, &x| (h ^ x as u64).wrapping_mul(0x100_0000_01b3))
    };
    if fnv(fnv(0xcbf2_9ce4_8422_2325, &sector[0..24]), &sector[32..]) != sum {
        return Err(format!("write {n}'s sector has a bad checksum: torn"));
    }
    if index != s {
        return Err(format!("holds sector {index} of write {n}: misplaced"));
    }
    Ok(Some(n))
}
