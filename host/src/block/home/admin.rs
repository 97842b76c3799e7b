//! `tt-host journal list | drain IMAGE | discard IMAGE`: the journals in
//! a directory, applying one to its image, throwing one away.

use super::{
    all_journals, dir_err, files, flock_nb, inspect, lock_image, lock_ring, open_if_file,
    open_locked, read_meta, replaced, replaced_error, sync_dir, write_meta, HomeError, Identity,
    JournalOptions, Meta,
};
use crate::block::Geometry;
use std::fs::OpenOptions;
use std::io;
use std::path::{Path, PathBuf};

/// The state of a journal's image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageState {
    /// The image is there, as the metadata describes it.
    Present,
    /// Nothing is at the recorded path any more.
    Missing,
    /// Another file is at the recorded path.
    Replaced { now: Identity },
    /// The image's size is not the recorded one.
    Resized { now: u64 },
    /// The metadata is missing or unreadable.
    Unknown,
}

/// One line of `tt-host journal list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalEntry {
    pub ring: PathBuf,
    pub meta: Option<Meta>,
    pub image: ImageState,
    /// Unapplied records and their bytes (None if the ring cannot be read).
    pub pending: Option<(u64, u64)>,
    /// A tt-host holds it now.
    pub in_use: bool,
}

/// One journal as `tt-host journal list` shows it: the image and its
/// state, the writes not applied yet, the ring, and whether it is in use.
impl std::fmt::Display for JournalEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let image = self.meta.as_ref().map_or("(unknown image)", |m| &m.path);
        let state = match &self.image {
            ImageState::Present => "present".to_string(),
            ImageState::Missing => "image missing (no file at that path any more)".into(),
            ImageState::Replaced { now } => {
                format!("image replaced (another file is at that path now: {now})")
            }
            ImageState::Resized { now } => {
                let was = self.meta.as_ref().map_or(0, |m| m.size);
                format!("image resized ({was} bytes when last used, {now} now)")
            }
            ImageState::Unknown => "metadata missing or unreadable".into(),
        };
        let pending = match self.pending {
            Some((0, _)) => "no unapplied writes".to_string(),
            Some((n, bytes)) => format!("{n} unapplied writes ({bytes} bytes)"),
            None => "ring unreadable".into(),
        };
        let in_use = if self.in_use { ", in use" } else { "" };
        write!(
            f,
            "{image}: {state}; {pending}{in_use}\n  journal {}",
            self.ring.display()
        )
    }
}

/// Every journal in `dir` (none if it does not exist).
pub fn list(dir: &Path) -> Result<Vec<JournalEntry>, HomeError> {
    let mut out = Vec::new();
    for (key, meta) in all_journals(dir)? {
        let f = files(dir, &key);
        let in_use = match OpenOptions::new().read(true).write(true).open(&f.ring) {
            Ok(file) => !flock_nb(&file).unwrap_or(true),
            Err(_) => false,
        };
        let pending = inspect(&f.ring).ok().map(|s| (s.records, s.bytes));
        let image = match &meta {
            None => ImageState::Unknown,
            Some(m) => match open_if_file(Path::new(&m.path)) {
                None => ImageState::Missing,
                Some(file) => {
                    let now = Identity::of(&file);
                    let size = std::io::Seek::seek(&mut &file, std::io::SeekFrom::End(0));
                    match (now, size) {
                        (Ok(now), _) if now != m.identity => ImageState::Replaced { now },
                        (_, Ok(size)) if size != m.size => ImageState::Resized { now: size },
                        _ => ImageState::Present,
                    }
                }
            },
        };
        out.push(JournalEntry {
            ring: f.ring,
            meta,
            image,
            pending,
            in_use,
        });
    }
    Ok(out)
}

/// What [`drain`] or [`discard`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Unapplied records found (applied by drain, thrown away by discard).
    pub records: u64,
}

/// Apply `image`'s journal to it (`tt-host journal drain IMAGE`), even if
/// its size changed; then the journal is empty and bound to the image as
/// it is. Refused if the file at this path is not the one the journal was
/// written for.
pub fn drain(dir: &Path, image: &Path) -> Result<Outcome, HomeError> {
    // Replay writes records as they are; the sector size only shapes
    // requests, and none are served.
    let sector = 512;
    let img = lock_image(image)?;
    if let Some((journal, meta, pending)) = replaced(dir, &img)? {
        return Err(replaced_error(dir, &img, journal, &meta, pending));
    }
    let f = files(dir, &img.identity.key());
    if !f.ring.exists() {
        return Err(HomeError::NoJournal {
            path: image.display().to_string(),
            dir: dir.display().to_string(),
        });
    }
    let records = inspect(&f.ring)?.records;
    let geometry = Geometry {
        capacity: img.size / sector * sector,
        sector_size: sector,
    };
    let opts = JournalOptions::default();
    let meta_path = f.meta;
    let mut b = open_locked(dir, "drain", img, geometry, &opts, true)?;
    crate::block::Backend::shutdown(&mut b)?;
    // Records past the end of a shrunk image grew it again: bind the
    // journal to the image as the drain left it (while it is still
    // locked), so that it is not listed, or refused, as resized.
    if let Some(mut meta) = read_meta(&meta_path)? {
        let size = std::fs::metadata(image).map_err(|source| HomeError::Open {
            path: image.display().to_string(),
            source,
        })?;
        if meta.size != size.len() {
            meta.size = size.len();
            write_meta(&meta_path, &meta).map_err(|source| HomeError::Meta {
                path: meta_path.display().to_string(),
                source,
            })?;
        }
    }
    drop(b);
    Ok(Outcome { records })
}

/// The journal `discard` would remove for `image`: the journal of the
/// file at that path (by its identity) if it holds unapplied writes;
/// else one recorded for that path that holds some (the file was
/// replaced: the refusal at open names this one); else the file's own;
/// else any recorded for that path (the file is gone).
pub fn find(dir: &Path, image: &Path) -> Result<Option<JournalEntry>, HomeError> {
    let by_id = open_if_file(image)
        .and_then(|f| Identity::of(&f).ok())
        .map(|id| files(dir, &id.key()).ring);
    let path = std::fs::canonicalize(image)
        .unwrap_or_else(|_| normalize(image))
        .display()
        .to_string();
    let all = list(dir)?;
    let own = by_id.and_then(|ring| all.iter().find(|e| e.ring == ring));
    let for_path = |e: &&JournalEntry| e.meta.as_ref().is_some_and(|m| m.path == path);
    let pending = |e: &&JournalEntry| e.pending.is_some_and(|(n, _)| n > 0);
    let pick = own
        .filter(pending)
        .or_else(|| all.iter().filter(for_path).find(pending))
        .or(own)
        .or_else(|| all.iter().find(for_path));
    Ok(pick.cloned())
}

/// An absolute path for a file that may not exist: its directory
/// canonicalized where possible.
fn normalize(p: &Path) -> PathBuf {
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(p)
    };
    match (abs.parent(), abs.file_name()) {
        (Some(d), Some(n)) => std::fs::canonicalize(d)
            .map(|d| d.join(n))
            .unwrap_or(abs.clone()),
        _ => abs,
    }
}

/// Throw `image`'s journal away (`tt-host journal discard IMAGE`; the
/// caller asks for confirmation first, showing [`find`]'s answer). Works
/// when the image is gone. Refused while a tt-host uses the image or the
/// journal.
pub fn discard(dir: &Path, image: &Path) -> Result<Outcome, HomeError> {
    // Hold the image's lock if it is there, so no tt-host starts on it
    // meanwhile.
    let _img = match lock_image(image) {
        Ok(i) => Some(i),
        Err(e @ HomeError::Locked { .. }) => return Err(e),
        Err(_) => None,
    };
    let Some(entry) = find(dir, image)? else {
        return Err(HomeError::NoJournal {
            path: image.display().to_string(),
            dir: dir.display().to_string(),
        });
    };
    let _ring = lock_ring(&entry.ring, image)?;
    let meta = entry.ring.with_extension("json");
    std::fs::remove_file(&entry.ring).map_err(dir_err(dir))?;
    sync_dir(dir).map_err(dir_err(dir))?;
    match std::fs::remove_file(&meta) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(dir_err(dir)(e)),
    }
    sync_dir(dir).map_err(dir_err(dir))?;
    Ok(Outcome {
        records: entry.pending.map_or(0, |p| p.0),
    })
}
