//! [`TemplateStore`]: named, read-only disks that runtime images start from.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::{clone_file, io_err, read_json, remove_if_exists, unix_ms, write_json};
use super::{CloneKind, ImageError};
use crate::resources::Label;

/// One template, as its `NAME.json` records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Template {
    pub name: String,
    /// Size of the disk, in bytes.
    pub size: u64,
    /// When it was added, in milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// The disk it was made from.
    pub source: PathBuf,
    /// How the store's copy was made.
    pub kind: CloneKind,
}

/// A directory of templates: `NAME.img` (mode 0400) and `NAME.json` each.
///
/// Names are resource labels ([`Label`]): 1 to 63 ASCII letters, digits,
/// `-` and `.`, so a name is always a plain file name.
#[derive(Debug)]
pub struct TemplateStore {
    dir: PathBuf,
}

impl TemplateStore {
    /// Open (creating it if needed) the store in `dir`, and remove what a
    /// crashed [`TemplateStore::add`] left: disks without metadata.
    pub fn open(dir: &Path) -> Result<TemplateStore, ImageError> {
        std::fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
        let store = TemplateStore {
            dir: dir.to_path_buf(),
        };
        for entry in std::fs::read_dir(dir).map_err(io_err("read directory", dir))? {
            let path = entry.map_err(io_err("read directory", dir))?.path();
            let ext = path.extension().and_then(|e| e.to_str());
            let orphan = match ext {
                Some("img") => !path.with_extension("json").exists(),
                Some("tmp") => true,
                _ => false,
            };
            if orphan {
                log::warn!("removing {} left by an interrupted add", path.display());
                remove_if_exists(&path)?;
            }
        }
        Ok(store)
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn label(name: &str) -> Result<Label, ImageError> {
        Label::new(name).map_err(|source| ImageError::BadName {
            what: "template",
            source,
        })
    }

    fn paths(&self, name: &Label) -> (PathBuf, PathBuf) {
        (
            self.dir.join(format!("{name}.img")),
            self.dir.join(format!("{name}.json")),
        )
    }

    /// Copy (or reflink) `disk` into the store as template `name`, read-only.
    /// Refused if `name` is taken; the caller's `disk` is left as it is.
    pub fn add(&self, name: &str, disk: &Path, now: SystemTime) -> Result<Template, ImageError> {
        let label = Self::label(name)?;
        let (img, json) = self.paths(&label);
        if json.exists() {
            return Err(ImageError::TemplateExists {
                name: name.to_string(),
                dir: self.dir.clone(),
            });
        }
        let kind = clone_file(disk, &img).map_err(|e| match e {
            ImageError::Exists(_) => ImageError::TemplateExists {
                name: name.to_string(),
                dir: self.dir.clone(),
            },
            e => e,
        })?;
        let done = (|| {
            std::fs::set_permissions(&img, std::fs::Permissions::from_mode(0o400))
                .map_err(io_err("make read-only", &img))?;
            let size = std::fs::metadata(&img).map_err(io_err("stat", &img))?.len();
            let t = Template {
                name: name.to_string(),
                size,
                created_unix_ms: unix_ms(now),
                source: disk.to_path_buf(),
                kind,
            };
            write_json(&json, &t)?;
            Ok(t)
        })();
        if done.is_err() {
            let _ = std::fs::remove_file(&img);
        }
        done
    }

    /// Template `name`, or [`ImageError::NoTemplate`].
    pub fn get(&self, name: &str) -> Result<Template, ImageError> {
        let label = Self::label(name)?;
        let (_, json) = self.paths(&label);
        if !json.exists() {
            return Err(ImageError::NoTemplate {
                name: name.to_string(),
                dir: self.dir.clone(),
            });
        }
        read_json(&json)
    }

    /// Path of template `name`'s disk (read-only).
    pub fn disk_path(&self, name: &str) -> Result<PathBuf, ImageError> {
        self.get(name)?;
        Ok(self.paths(&Self::label(name)?).0)
    }

    /// Every template, sorted by name.
    pub fn list(&self) -> Result<Vec<Template>, ImageError> {
        let mut out = Vec::new();
        let dir = &self.dir;
        for entry in std::fs::read_dir(dir).map_err(io_err("read directory", dir))? {
            let path = entry.map_err(io_err("read directory", dir))?.path();
            if path.extension().and_then(|e| e.to_str()) == Some("json") {
                out.push(read_json::<Template>(&path)?);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Remove template `name`. Runtime images made from it are independent
    /// copies and stay as they are.
    pub fn remove(&self, name: &str) -> Result<(), ImageError> {
        self.get(name)?;
        let (img, json) = self.paths(&Self::label(name)?);
        // Metadata first: a crash in between leaves an orphan disk, which
        // `open` removes, never metadata naming a missing disk.
        std::fs::remove_file(&json).map_err(io_err("remove", &json))?;
        remove_if_exists(&img)?;
        super::clone::sync_parent(&json)
    }

    /// Make `dst`, a new runtime image with template `name`'s bytes, owned
    /// by its unikernel (mode 0600) and independent of the template.
    pub fn instantiate(&self, name: &str, dst: &Path) -> Result<CloneKind, ImageError> {
        let src = self.disk_path(name)?;
        clone_file(&src, dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileExt, MetadataExt};

    fn disk(dir: &Path, name: &str, len: usize) -> PathBuf {
        let p = dir.join(name);
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8 + 1).collect();
        std::fs::write(&p, data).unwrap();
        p
    }

    #[test]
    fn a_copy_is_independent_of_its_template() {
        let tmp = tempfile::tempdir().unwrap();
        let store = TemplateStore::open(&tmp.path().join("templates")).unwrap();
        let src = disk(tmp.path(), "base.img", 1 << 20);
        let t = store.add("base", &src, SystemTime::now()).unwrap();
        assert_eq!(t.size, 1 << 20);
        assert_eq!(t.source, src);
        let tpath = store.disk_path("base").unwrap();
        assert_eq!(std::fs::metadata(&tpath).unwrap().mode() & 0o777, 0o400);
        let before = std::fs::read(&tpath).unwrap();

        let run = tmp.path().join("web.img");
        store.instantiate("base", &run).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&run).unwrap();
        f.write_all_at(&[0u8; 4096], 8192).unwrap();
        f.sync_all().unwrap();
        drop(f);

        assert_eq!(std::fs::read(&tpath).unwrap(), before, "template unchanged");
        assert_eq!(std::fs::read(&src).unwrap(), before, "source unchanged");
        let after = std::fs::read(&run).unwrap();
        assert_eq!(&after[8192..12288], &[0u8; 4096][..]);
        assert_eq!(&after[..8192], &before[..8192]);

        // Writing into the source after `add` does not reach the template.
        std::fs::write(&src, b"changed").unwrap();
        assert_eq!(std::fs::read(&tpath).unwrap(), before);
    }

    #[test]
    fn list_get_remove() {
        let tmp = tempfile::tempdir().unwrap();
        let store = TemplateStore::open(tmp.path()).unwrap();
        let src = disk(tmp.path(), "src", 4096);
        store.add("b.v2", &src, SystemTime::now()).unwrap();
        store.add("a-1", &src, SystemTime::now()).unwrap();
        let names: Vec<String> = store.list().unwrap().into_iter().map(|t| t.name).collect();
        assert_eq!(names, ["a-1", "b.v2"]);
        assert_eq!(store.get("a-1").unwrap().size, 4096);

        let run = tmp.path().join("run.img");
        store.instantiate("a-1", &run).unwrap();
        store.remove("a-1").unwrap();
        assert!(store.list().unwrap().iter().all(|t| t.name != "a-1"));
        assert_eq!(std::fs::read(&run).unwrap(), std::fs::read(&src).unwrap());
        let e = store.remove("a-1").unwrap_err();
        assert!(matches!(e, ImageError::NoTemplate { .. }), "{e}");
    }

    #[test]
    fn refusals_are_clear() {
        let tmp = tempfile::tempdir().unwrap();
        let store = TemplateStore::open(&tmp.path().join("t")).unwrap();
        let src = disk(tmp.path(), "src", 4096);

        for bad in ["", "../x", "a b", "a/b", &"x".repeat(64)] {
            let e = store.add(bad, &src, SystemTime::now()).unwrap_err();
            assert!(matches!(e, ImageError::BadName { .. }), "{bad:?}: {e}");
            assert!(e.to_string().starts_with("bad template name"), "{e}");
        }
        assert_eq!(std::fs::read_dir(store.dir()).unwrap().count(), 0);

        store.add("base", &src, SystemTime::now()).unwrap();
        let e = store.add("base", &src, SystemTime::now()).unwrap_err();
        assert!(
            e.to_string().starts_with("template 'base' already exists"),
            "{e}"
        );

        let e = store
            .instantiate("nope", &tmp.path().join("x.img"))
            .unwrap_err();
        assert!(e.to_string().starts_with("no template 'nope' in "), "{e}");
        assert!(!tmp.path().join("x.img").exists());

        let taken = tmp.path().join("taken.img");
        std::fs::write(&taken, b"keep").unwrap();
        let e = store.instantiate("base", &taken).unwrap_err();
        assert!(matches!(e, ImageError::Exists(_)), "{e}");
        assert_eq!(std::fs::read(&taken).unwrap(), b"keep");

        let e = store
            .add("other", &tmp.path().join("missing.img"), SystemTime::now())
            .unwrap_err();
        assert!(e.to_string().contains("missing.img"), "{e}");
    }

    #[test]
    fn open_removes_a_crashed_add() {
        let tmp = tempfile::tempdir().unwrap();
        let store = TemplateStore::open(tmp.path()).unwrap();
        let src = disk(tmp.path(), "src", 4096);
        store.add("kept", &src, SystemTime::now()).unwrap();
        std::fs::write(tmp.path().join("half.img"), b"no metadata").unwrap();
        let store = TemplateStore::open(tmp.path()).unwrap();
        assert!(!tmp.path().join("half.img").exists());
        assert_eq!(store.list().unwrap().len(), 1);
    }
}
