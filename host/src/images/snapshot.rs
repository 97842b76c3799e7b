//! [`SnapshotStore`]: point-in-time copies of runtime images, with a life
//! time after which they are removed.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::{clone_file, io_err, read_json, remove_if_exists, unix_ms, write_json};
use super::{from_unix_ms, CloneKind, ImageError};
use crate::resources::Label;

/// One snapshot, as its `SNAP.json` records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub name: String,
    /// The runtime image it was taken of.
    pub image: PathBuf,
    /// Size of the image then, in bytes.
    pub size: u64,
    /// When it was taken, in milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// How long it is kept, in milliseconds; `None`: until removed.
    pub life_time_ms: Option<u64>,
    /// How its copy was made.
    pub kind: CloneKind,
}

impl Snapshot {
    /// When it expires, if it has a life time.
    pub fn expires(&self) -> Option<SystemTime> {
        self.life_time_ms
            .map(|l| from_unix_ms(self.created_unix_ms.saturating_add(l)))
    }
}

/// Snapshots of runtime images under one root: `ROOT/IMAGE/SNAP.img`
/// (mode 0400) and `SNAP.json`, where `IMAGE` is the image's file name.
/// Images are told apart by their canonical path; two images with the
/// same file name in different directories cannot both have snapshots.
///
/// The expiry times are kept in memory, ordered, so
/// [`SnapshotStore::next_expiry`] is the first of them and
/// [`SnapshotStore::expire`] touches only what is due.
///
/// Every snapshot of a journaled disk must be taken (and reverted) with
/// the guest paused and its journal drained; see the module doc.
#[derive(Debug)]
pub struct SnapshotStore {
    root: PathBuf,
    /// (expiry in ms since the epoch, image directory, snapshot name).
    expiries: BTreeSet<(u64, String, String)>,
}

impl SnapshotStore {
    /// Open (creating it if needed) the store under `root`, load every
    /// snapshot's expiry, and remove what a crashed take left: copies
    /// without metadata.
    pub fn open(root: &Path) -> Result<SnapshotStore, ImageError> {
        std::fs::create_dir_all(root).map_err(io_err("create directory", root))?;
        let mut store = SnapshotStore {
            root: root.to_path_buf(),
            expiries: BTreeSet::new(),
        };
        for entry in std::fs::read_dir(root).map_err(io_err("read directory", root))? {
            let dir = entry.map_err(io_err("read directory", root))?.path();
            let Some(key) = dir.file_name().and_then(|n| n.to_str()).map(str::to_string) else {
                continue;
            };
            if !dir.is_dir() {
                continue;
            }
            for entry in std::fs::read_dir(&dir).map_err(io_err("read directory", &dir))? {
                let path = entry.map_err(io_err("read directory", &dir))?.path();
                match path.extension().and_then(|e| e.to_str()) {
                    Some("img") if !path.with_extension("json").exists() => {
                        log::warn!(
                            "removing {} left by an interrupted snapshot",
                            path.display()
                        );
                        remove_if_exists(&path)?;
                    }
                    Some("tmp") => remove_if_exists(&path)?,
                    Some("json") => {
                        let s: Snapshot = read_json(&path)?;
                        if let Some(l) = s.life_time_ms {
                            let at = s.created_unix_ms.saturating_add(l);
                            store.expiries.insert((at, key.clone(), s.name));
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(store)
    }

    /// The directory name of `image`'s snapshots: its file name, which
    /// must be a valid label.
    fn key(image: &Path) -> Result<String, ImageError> {
        image
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| Label::new(n).ok())
            .map(|l| l.as_str().to_string())
            .ok_or_else(|| ImageError::BadImagePath(image.to_path_buf()))
    }

    /// How `image` is recorded and compared: its canonical path where it
    /// exists, so `./web.img` and `/state/web.img` are one image.
    fn ident(image: &Path) -> PathBuf {
        image.canonicalize().unwrap_or_else(|_| image.to_path_buf())
    }

    /// Every snapshot in the directory `key`, whichever image it was of.
    fn all_in(&self, key: &str) -> Result<Vec<Snapshot>, ImageError> {
        let dir = self.root.join(key);
        let mut out = Vec::new();
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(io_err("read directory", &dir)(e)),
        };
        for entry in rd {
            let path = entry.map_err(io_err("read directory", &dir))?.path();
            if path.extension().and_then(|e| e.to_str()) == Some("json") {
                out.push(read_json::<Snapshot>(&path)?);
            }
        }
        Ok(out)
    }

    fn snap_label(snap: &str) -> Result<Label, ImageError> {
        Label::new(snap).map_err(|source| ImageError::BadName {
            what: "snapshot",
            source,
        })
    }

    fn paths(&self, key: &str, snap: &Label) -> (PathBuf, PathBuf) {
        let dir = self.root.join(key);
        (
            dir.join(format!("{snap}.img")),
            dir.join(format!("{snap}.json")),
        )
    }

    /// Copy `image` as it is now into snapshot `snap`, kept for `life_time`
    /// from `now` (forever if `None`). Refused if `snap` exists.
    ///
    /// The guest must be paused with its journal drained (module doc).
    pub fn take(
        &mut self,
        image: &Path,
        snap: &str,
        life_time: Option<Duration>,
        now: SystemTime,
    ) -> Result<Snapshot, ImageError> {
        let key = Self::key(image)?;
        let label = Self::snap_label(snap)?;
        let image = &Self::ident(image);
        if let Some(other) = self.all_in(&key)?.into_iter().find(|s| &s.image != image) {
            return Err(ImageError::SnapshotDirTaken {
                image: image.clone(),
                other: other.image,
            });
        }
        let (img, json) = self.paths(&key, &label);
        let exists = || ImageError::SnapshotExists {
            image: image.to_path_buf(),
            snap: snap.to_string(),
        };
        if json.exists() {
            return Err(exists());
        }
        let dir = self.root.join(&key);
        std::fs::create_dir_all(&dir).map_err(io_err("create directory", &dir))?;
        let kind = clone_file(image, &img).map_err(|e| match e {
            ImageError::Exists(_) => exists(),
            e => e,
        })?;
        let done = (|| {
            std::fs::set_permissions(&img, std::fs::Permissions::from_mode(0o400))
                .map_err(io_err("make read-only", &img))?;
            let size = std::fs::metadata(&img).map_err(io_err("stat", &img))?.len();
            let s = Snapshot {
                name: snap.to_string(),
                image: image.to_path_buf(),
                size,
                created_unix_ms: unix_ms(now),
                life_time_ms: life_time.map(|l| u64::try_from(l.as_millis()).unwrap_or(u64::MAX)),
                kind,
            };
            write_json(&json, &s)?;
            Ok(s)
        })();
        match &done {
            Err(_) => {
                let _ = std::fs::remove_file(&img);
            }
            Ok(s) => {
                if let Some(l) = s.life_time_ms {
                    let at = s.created_unix_ms.saturating_add(l);
                    self.expiries.insert((at, key, s.name.clone()));
                }
            }
        }
        done
    }

    /// Snapshot `snap` of `image`, or [`ImageError::NoSnapshot`].
    pub fn get(&self, image: &Path, snap: &str) -> Result<Snapshot, ImageError> {
        let key = Self::key(image)?;
        let (_, json) = self.paths(&key, &Self::snap_label(snap)?);
        let none = || ImageError::NoSnapshot {
            image: image.to_path_buf(),
            snap: snap.to_string(),
        };
        if !json.exists() {
            return Err(none());
        }
        let s: Snapshot = read_json(&json)?;
        if s.image != Self::ident(image) {
            return Err(none());
        }
        Ok(s)
    }

    /// Put the exact bytes of snapshot `snap` back into `image`.
    ///
    /// The snapshot is cloned to a temporary file beside the image, synced,
    /// given the image's permissions and renamed over it: at every moment
    /// `image` holds either its old bytes or the snapshot's. The guest
    /// must be paused (module doc); it must reopen the image afterwards,
    /// as the rename gives the path a new file.
    pub fn revert(&self, image: &Path, snap: &str) -> Result<CloneKind, ImageError> {
        self.get(image, snap)?;
        let key = Self::key(image)?;
        let (img, _) = self.paths(&key, &Self::snap_label(snap)?);
        let mode = std::fs::metadata(image)
            .map_err(io_err("stat", image))?
            .permissions();
        let tmp = image.with_file_name(format!(".{key}.revert.tmp"));
        // A crash in an earlier revert may have left it.
        remove_if_exists(&tmp)?;
        let kind = clone_file(&img, &tmp)?;
        let done = std::fs::set_permissions(&tmp, mode)
            .map_err(io_err("set permissions of", &tmp))
            .and_then(|()| std::fs::rename(&tmp, image).map_err(io_err("rename over", image)))
            .and_then(|()| super::clone::sync_parent(image));
        if done.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        done.map(|()| kind)
    }

    /// Every snapshot of `image`, oldest first.
    pub fn list(&self, image: &Path) -> Result<Vec<Snapshot>, ImageError> {
        let image = Self::ident(image);
        let mut out: Vec<Snapshot> = self
            .all_in(&Self::key(&image)?)?
            .into_iter()
            .filter(|s| s.image == image)
            .collect();
        out.sort_by(|a, b| (a.created_unix_ms, &a.name).cmp(&(b.created_unix_ms, &b.name)));
        Ok(out)
    }

    /// Remove snapshot `snap` of `image`.
    pub fn remove(&mut self, image: &Path, snap: &str) -> Result<(), ImageError> {
        let s = self.get(image, snap)?;
        self.remove_files(&Self::key(image)?, &s)
    }

    fn remove_files(&mut self, key: &str, s: &Snapshot) -> Result<(), ImageError> {
        let (img, json) = self.paths(key, &Self::snap_label(&s.name)?);
        // Metadata first: a crash in between leaves an orphan copy, which
        // `open` removes.
        std::fs::remove_file(&json).map_err(io_err("remove", &json))?;
        remove_if_exists(&img)?;
        if let Some(l) = s.life_time_ms {
            let at = s.created_unix_ms.saturating_add(l);
            self.expiries.remove(&(at, key.to_string(), s.name.clone()));
        }
        super::clone::sync_parent(&json)
    }

    /// When the next snapshot expires, for the caller's timer; `None` if
    /// none has a life time.
    pub fn next_expiry(&self) -> Option<SystemTime> {
        self.expiries.first().map(|(at, _, _)| from_unix_ms(*at))
    }

    /// Remove every snapshot whose life time has passed at `now` (expiry
    /// at or before `now`); return them. Costs only what is removed.
    pub fn expire(&mut self, now: SystemTime) -> Result<Vec<Snapshot>, ImageError> {
        let now = unix_ms(now);
        let mut removed = Vec::new();
        while let Some((at, key, name)) = self.expiries.first().cloned() {
            if at > now {
                break;
            }
            let label = Self::snap_label(&name)?;
            let (_, json) = self.paths(&key, &label);
            match read_json::<Snapshot>(&json) {
                Ok(s) => {
                    self.remove_files(&key, &s)?;
                    removed.push(s);
                }
                // Already gone by other means: forget it.
                Err(ImageError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    log::debug!("snapshot {name} in {key} already gone");
                    self.expiries.remove(&(at, key, name));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    const S: Duration = Duration::from_secs(1);

    fn image(dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(name);
        let data: Vec<u8> = (0..(1usize << 20) + 17).map(|i| (i % 253) as u8).collect();
        std::fs::write(&p, data).unwrap();
        p
    }

    #[test]
    fn revert_restores_the_exact_bytes() {
        let tmp = tempfile::tempdir().unwrap();
        let mut store = SnapshotStore::open(&tmp.path().join("snaps")).unwrap();
        let img = image(tmp.path(), "web.img");
        let original = std::fs::read(&img).unwrap();
        let now = SystemTime::now();
        let s = store.take(&img, "before", None, now).unwrap();
        assert_eq!(s.size, original.len() as u64);
        assert_eq!(s.expires(), None);

        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        f.write_all_at(b"scribble", 4096).unwrap();
        f.set_len(3 << 20).unwrap();
        drop(f);
        store.take(&img, "after", None, now + S).unwrap();
        assert_ne!(std::fs::read(&img).unwrap(), original);

        store.revert(&img, "before").unwrap();
        assert_eq!(std::fs::read(&img).unwrap(), original);
        store.revert(&img, "before").unwrap();
        assert_eq!(
            std::fs::read(&img).unwrap(),
            original,
            "a snapshot reverts twice"
        );
        let names: Vec<String> = store
            .list(&img)
            .unwrap()
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(names, ["before", "after"]);
        store.revert(&img, "after").unwrap();
        assert_eq!(std::fs::metadata(&img).unwrap().len(), 3 << 20);
        let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n.to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn expire_removes_exactly_the_expired_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("snaps");
        let mut store = SnapshotStore::open(&root).unwrap();
        let a = image(tmp.path(), "a.img");
        let b = image(tmp.path(), "b.img");
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(store.next_expiry(), None);
        store.take(&a, "short", Some(10 * S), t0).unwrap();
        store.take(&a, "keep", None, t0).unwrap();
        store.take(&b, "mid", Some(20 * S), t0).unwrap();
        store.take(&b, "long", Some(30 * S), t0).unwrap();
        assert_eq!(store.next_expiry(), Some(t0 + 10 * S));

        assert!(store.expire(t0 + 9 * S).unwrap().is_empty());
        let gone = store.expire(t0 + 20 * S).unwrap();
        let names: Vec<&str> = gone.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["short", "mid"], "expiry at or before now, in order");
        assert_eq!(store.next_expiry(), Some(t0 + 30 * S));
        let left = |img: &Path| -> Vec<String> {
            store
                .list(img)
                .unwrap()
                .into_iter()
                .map(|s| s.name)
                .collect()
        };
        assert_eq!(left(&a), ["keep"]);
        assert_eq!(left(&b), ["long"]);
        assert!(!root.join("a.img/short.img").exists());

        // A reopened store (a restarted daemon) knows what is left.
        let mut store = SnapshotStore::open(&root).unwrap();
        assert_eq!(store.next_expiry(), Some(t0 + 30 * S));
        let gone = store.expire(t0 + 31 * S).unwrap();
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].image, b.canonicalize().unwrap());
        assert_eq!(store.next_expiry(), None);
        assert_eq!(store.list(&a).unwrap().len(), 1);
    }

    #[test]
    fn refusals_are_clear() {
        let tmp = tempfile::tempdir().unwrap();
        let mut store = SnapshotStore::open(&tmp.path().join("snaps")).unwrap();
        let img = image(tmp.path(), "web.img");
        let now = SystemTime::now();

        let e = store.take(&img, "a/b", None, now).unwrap_err();
        assert!(e.to_string().starts_with("bad snapshot name"), "{e}");
        let odd = image(tmp.path(), "web image");
        let e = store.take(&odd, "s", None, now).unwrap_err();
        assert!(matches!(e, ImageError::BadImagePath(_)), "{e}");

        store.take(&img, "s1", Some(S), now).unwrap();
        let e = store.take(&img, "s1", None, now).unwrap_err();
        assert!(e.to_string().contains("already has a snapshot 's1'"), "{e}");
        let e = store.revert(&img, "nope").unwrap_err();
        assert!(e.to_string().contains("has no snapshot 'nope'"), "{e}");
        let e = store
            .take(&tmp.path().join("gone.img"), "s", None, now)
            .unwrap_err();
        assert!(e.to_string().contains("gone.img"), "{e}");

        store.remove(&img, "s1").unwrap();
        assert_eq!(
            store.next_expiry(),
            None,
            "a removed snapshot never expires"
        );
        assert!(store.list(&img).unwrap().is_empty());
    }
}
