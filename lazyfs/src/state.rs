//! The in-memory model behind the mount: every inode has its current state
//! (what the mount shows) and its durable state (what a power cut leaves).
//!
//! This module knows nothing of FUSE: [`crate::fuse`] maps requests onto
//! it, and its unit tests drive it directly. Errors are `errno` values.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::time::SystemTime;

use crate::{Options, Stats};

/// Size of the pages that data is tracked, synced and dropped in.
pub(crate) const PAGE: usize = 4096;
/// The root directory's inode number (FUSE's).
pub(crate) const ROOT: u64 = 1;
/// The largest file size accepted (beyond it: `EFBIG`).
const MAX_SIZE: u64 = 1 << 44;
/// Longest name accepted (beyond it: `ENAMETOOLONG`).
const NAME_MAX: usize = 255;

/// An `errno` value.
pub(crate) type Errno = i32;
type R<T> = Result<T, Errno>;

type Page = Box<[u8; PAGE]>;

fn zero_page() -> Page {
    Box::new([0; PAGE])
}

fn page_count(size: u64) -> u64 {
    size.div_ceil(PAGE as u64)
}

/// A file's bytes: a size and the pages that hold data; a missing page
/// below the size reads as zeros. Invariants: no page at or past
/// `page_count(size)`, and bytes past `size` in the last page are zero.
#[derive(Clone, Default)]
struct Pages {
    size: u64,
    map: HashMap<u64, Page>,
}

impl Pages {
    fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        if offset >= self.size {
            return Vec::new();
        }
        let end = self.size.min(offset.saturating_add(len as u64));
        let mut out = vec![0u8; (end - offset) as usize];
        let mut pos = offset;
        while pos < end {
            let idx = pos / PAGE as u64;
            let in_page = (pos % PAGE as u64) as usize;
            let n = (PAGE - in_page).min((end - pos) as usize);
            if let Some(p) = self.map.get(&idx) {
                let at = (pos - offset) as usize;
                out[at..at + n].copy_from_slice(&p[in_page..in_page + n]);
            }
            pos += n as u64;
        }
        out
    }

    /// Apply `f(page, range in page)` to every page in `[offset, end)`,
    /// creating missing ones, and mark them dirty.
    fn for_each_page(
        &mut self,
        offset: u64,
        end: u64,
        dirty: &mut HashSet<u64>,
        mut f: impl FnMut(&mut [u8; PAGE], usize, usize, u64),
    ) {
        let mut pos = offset;
        while pos < end {
            let idx = pos / PAGE as u64;
            let in_page = (pos % PAGE as u64) as usize;
            let n = (PAGE - in_page).min((end - pos) as usize);
            let page = self.map.entry(idx).or_insert_with(zero_page);
            f(page, in_page, n, pos - offset);
            dirty.insert(idx);
            pos += n as u64;
        }
    }

    /// Set the size. Shrinking drops whole pages and zeroes the tail of
    /// the new last page; every page it touches is marked dirty.
    fn set_size(&mut self, size: u64, dirty: &mut HashSet<u64>) {
        if size < self.size {
            let keep = page_count(size);
            let gone: Vec<u64> = self.map.keys().copied().filter(|&i| i >= keep).collect();
            for i in gone {
                self.map.remove(&i);
                dirty.insert(i);
            }
            let tail = (size % PAGE as u64) as usize;
            if tail != 0 {
                let idx = size / PAGE as u64;
                if let Some(p) = self.map.get_mut(&idx) {
                    p[tail..].fill(0);
                    dirty.insert(idx);
                }
            }
        }
        self.size = size;
    }

    /// Zero `[offset, end)` (inside the size), freeing whole pages.
    fn zero(&mut self, offset: u64, end: u64, dirty: &mut HashSet<u64>) {
        let end = end.min(self.size);
        let mut pos = offset;
        while pos < end {
            let idx = pos / PAGE as u64;
            let in_page = (pos % PAGE as u64) as usize;
            let n = (PAGE - in_page).min((end - pos) as usize);
            if n == PAGE {
                self.map.remove(&idx);
            } else if let Some(p) = self.map.get_mut(&idx) {
                p[in_page..in_page + n].fill(0);
            }
            dirty.insert(idx);
            pos += n as u64;
        }
    }
}

/// What an inode is, with its current and durable contents.
enum Body {
    File {
        cur: Pages,
        durable: Pages,
        /// Pages whose current and durable contents may differ. The size
        /// is durable at every sync, dirty pages or not.
        dirty: HashSet<u64>,
    },
    Dir {
        cur: BTreeMap<OsString, u64>,
        durable: BTreeMap<OsString, u64>,
        /// Current parent (the root is its own parent).
        parent: u64,
    },
    /// A symlink's target is written with it and durable with its entry.
    Symlink { target: OsString },
}

/// What kind of inode: the FUSE layer maps it to `FileType`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    File,
    Dir,
    Symlink,
}

/// Ownership, permissions and times of an inode.
#[derive(Clone, Copy)]
pub(crate) struct Meta {
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    pub crtime: SystemTime,
}

impl Meta {
    pub fn new(perm: u16, uid: u32, gid: u32) -> Meta {
        let now = SystemTime::now();
        Meta {
            perm: perm & 0o7777,
            uid,
            gid,
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
        }
    }
}

struct Inode {
    body: Body,
    meta: Meta,
    /// What `fsync` (not `fdatasync`) last made durable.
    durable_meta: Meta,
    /// Current links: names in directories, plus each directory's "."
    /// and its subdirectories' "..". 0 once removed.
    nlink: u32,
    /// Open handles (files and directories), which keep a removed inode.
    open: u32,
}

impl Inode {
    fn kind(&self) -> Kind {
        match self.body {
            Body::File { .. } => Kind::File,
            Body::Dir { .. } => Kind::Dir,
            Body::Symlink { .. } => Kind::Symlink,
        }
    }
}

/// Attributes of an inode as the mount reports them.
pub(crate) struct Attr {
    pub ino: u64,
    pub kind: Kind,
    pub size: u64,
    /// 512-byte blocks holding data.
    pub blocks: u64,
    pub nlink: u32,
    pub meta: Meta,
}

/// One entry of a directory listing.
pub(crate) struct DirEntry {
    pub ino: u64,
    pub kind: Kind,
    pub name: OsString,
}

/// Changes to make by `setattr`; `None` leaves a field alone.
#[derive(Default)]
pub(crate) struct SetAttr {
    pub perm: Option<u16>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SystemTime>,
    pub mtime: Option<SystemTime>,
}

/// The whole file system.
pub(crate) struct State {
    inodes: HashMap<u64, Inode>,
    /// Never reused, also across crashes, so an inode number names one
    /// file for the whole life of the mount.
    next_ino: u64,
    opts: Options,
    pub stats: Stats,
}

fn check_name(name: &OsStr) -> R<()> {
    use std::os::unix::ffi::OsStrExt;
    let b = name.as_bytes();
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') {
        return Err(libc::EINVAL);
    }
    if b.len() > NAME_MAX {
        return Err(libc::ENAMETOOLONG);
    }
    Ok(())
}

impl State {
    pub fn new(opts: Options) -> State {
        let mut inodes = HashMap::new();
        let meta = Meta::new(0o755, 0, 0);
        inodes.insert(
            ROOT,
            Inode {
                body: Body::Dir {
                    cur: BTreeMap::new(),
                    durable: BTreeMap::new(),
                    parent: ROOT,
                },
                meta,
                durable_meta: meta,
                nlink: 2,
                open: 0,
            },
        );
        State {
            inodes,
            next_ino: ROOT + 1,
            opts,
            stats: Stats::default(),
        }
    }

    fn inode(&self, ino: u64) -> R<&Inode> {
        self.inodes.get(&ino).ok_or(libc::ENOENT)
    }

    fn inode_mut(&mut self, ino: u64) -> R<&mut Inode> {
        self.inodes.get_mut(&ino).ok_or(libc::ENOENT)
    }

    fn entries(&self, dir: u64) -> R<&BTreeMap<OsString, u64>> {
        match &self.inode(dir)?.body {
            Body::Dir { cur, .. } => Ok(cur),
            _ => Err(libc::ENOTDIR),
        }
    }

    fn entries_mut(&mut self, dir: u64) -> R<&mut BTreeMap<OsString, u64>> {
        match &mut self.inode_mut(dir)?.body {
            Body::Dir { cur, .. } => Ok(cur),
            _ => Err(libc::ENOTDIR),
        }
    }

    fn touch_dir(&mut self, dir: u64) {
        if let Some(i) = self.inodes.get_mut(&dir) {
            let now = SystemTime::now();
            i.meta.mtime = now;
            i.meta.ctime = now;
        }
    }

    /// Link `name` in `dir` to `ino` (the name must be free), counting
    /// the link, and a subdirectory's "..".
    fn add_entry(&mut self, dir: u64, name: &OsStr, ino: u64) -> R<()> {
        self.entries_mut(dir)?.insert(name.to_os_string(), ino);
        let child = self.inode_mut(ino)?;
        child.nlink += 1;
        child.meta.ctime = SystemTime::now();
        if let Body::Dir { parent, .. } = &mut child.body {
            *parent = dir;
            self.inode_mut(dir)?.nlink += 1;
        }
        self.touch_dir(dir);
        Ok(())
    }

    /// Unlink `name` from `dir`; returns the inode it named.
    fn remove_entry(&mut self, dir: u64, name: &OsStr) -> R<u64> {
        let ino = self.entries_mut(dir)?.remove(name).ok_or(libc::ENOENT)?;
        let child = self.inode_mut(ino)?;
        child.nlink = child.nlink.saturating_sub(1);
        child.meta.ctime = SystemTime::now();
        if child.kind() == Kind::Dir {
            // A directory has one name: without it, it is gone.
            child.nlink = 0;
            let d = self.inode_mut(dir)?;
            d.nlink = d.nlink.saturating_sub(1);
        }
        self.touch_dir(dir);
        Ok(ino)
    }

    /// Whether a durable directory entry names `ino`.
    fn durably_named(&self, ino: u64) -> bool {
        self.inodes.values().any(|i| match &i.body {
            Body::Dir { durable, .. } => durable.values().any(|&c| c == ino),
            _ => false,
        })
    }

    /// Forget `ino` if nothing can reach it any more: no current name, no
    /// open handle, and no durable name (a crash could bring that back).
    fn maybe_free(&mut self, ino: u64) {
        let Some(i) = self.inodes.get(&ino) else {
            return;
        };
        if ino == ROOT || i.nlink > 0 || i.open > 0 || self.durably_named(ino) {
            return;
        }
        let children: Vec<u64> = match &i.body {
            Body::Dir { durable, .. } => durable.values().copied().collect(),
            _ => Vec::new(),
        };
        self.inodes.remove(&ino);
        for c in children {
            self.maybe_free(c);
        }
    }

    pub fn lookup(&self, dir: u64, name: &OsStr) -> R<u64> {
        self.entries(dir)?.get(name).copied().ok_or(libc::ENOENT)
    }

    pub fn attr(&self, ino: u64) -> R<Attr> {
        let i = self.inode(ino)?;
        let (size, blocks) = match &i.body {
            Body::File { cur, .. } => (cur.size, cur.map.len() as u64 * (PAGE as u64 / 512)),
            Body::Dir { .. } => (PAGE as u64, PAGE as u64 / 512),
            Body::Symlink { target } => (target.len() as u64, 0),
        };
        Ok(Attr {
            ino,
            kind: i.kind(),
            size,
            blocks,
            nlink: i.nlink,
            meta: i.meta,
        })
    }

    pub fn setattr(&mut self, ino: u64, s: SetAttr) -> R<Attr> {
        let i = self.inode_mut(ino)?;
        if let Some(size) = s.size {
            if size > MAX_SIZE {
                return Err(libc::EFBIG);
            }
            match &mut i.body {
                Body::File {
                    cur,
                    durable,
                    dirty,
                } => {
                    if size < cur.size {
                        // Durable pages past the new end must go at the
                        // next sync too, even if the file grows back.
                        let keep = page_count(size);
                        dirty.extend(durable.map.keys().copied().filter(|&p| p >= keep));
                    }
                    cur.set_size(size, dirty);
                    i.meta.mtime = SystemTime::now();
                }
                Body::Dir { .. } => return Err(libc::EISDIR),
                Body::Symlink { .. } => return Err(libc::EINVAL),
            }
        }
        if let Some(p) = s.perm {
            i.meta.perm = p & 0o7777;
        }
        if let Some(u) = s.uid {
            i.meta.uid = u;
        }
        if let Some(g) = s.gid {
            i.meta.gid = g;
        }
        if let Some(t) = s.atime {
            i.meta.atime = t;
        }
        if let Some(t) = s.mtime {
            i.meta.mtime = t;
        }
        i.meta.ctime = SystemTime::now();
        self.attr(ino)
    }

    fn new_inode(&mut self, body: Body, meta: Meta) -> u64 {
        let ino = self.next_ino;
        self.next_ino += 1;
        let nlink = match body {
            // Its ".": the entry in the parent adds the second link.
            Body::Dir { .. } => 1,
            _ => 0,
        };
        self.inodes.insert(
            ino,
            Inode {
                body,
                meta,
                durable_meta: meta,
                nlink,
                open: 0,
            },
        );
        ino
    }

    /// Create `name` in `dir`. Its entry is durable only once `dir` is
    /// synced (or, with `fsync_syncs_entries`, once it is).
    pub fn create(&mut self, dir: u64, name: &OsStr, kind: Kind, meta: Meta) -> R<u64> {
        self.create_with(dir, name, kind, meta, OsString::new())
    }

    pub fn symlink(&mut self, dir: u64, name: &OsStr, target: &OsStr, meta: Meta) -> R<u64> {
        self.create_with(dir, name, Kind::Symlink, meta, target.to_os_string())
    }

    fn create_with(
        &mut self,
        dir: u64,
        name: &OsStr,
        kind: Kind,
        meta: Meta,
        target: OsString,
    ) -> R<u64> {
        check_name(name)?;
        if self.entries(dir)?.contains_key(name) {
            return Err(libc::EEXIST);
        }
        let body = match kind {
            Kind::File => Body::File {
                cur: Pages::default(),
                durable: Pages::default(),
                dirty: HashSet::new(),
            },
            Kind::Dir => Body::Dir {
                cur: BTreeMap::new(),
                durable: BTreeMap::new(),
                parent: dir,
            },
            Kind::Symlink => Body::Symlink { target },
        };
        let ino = self.new_inode(body, meta);
        self.add_entry(dir, name, ino)?;
        Ok(ino)
    }

    pub fn link(&mut self, ino: u64, dir: u64, name: &OsStr) -> R<()> {
        check_name(name)?;
        if self.inode(ino)?.kind() == Kind::Dir {
            return Err(libc::EPERM);
        }
        if self.entries(dir)?.contains_key(name) {
            return Err(libc::EEXIST);
        }
        self.add_entry(dir, name, ino)
    }

    pub fn unlink(&mut self, dir: u64, name: &OsStr) -> R<()> {
        let ino = self.lookup(dir, name)?;
        if self.inode(ino)?.kind() == Kind::Dir {
            return Err(libc::EISDIR);
        }
        self.remove_entry(dir, name)?;
        self.maybe_free(ino);
        Ok(())
    }

    pub fn rmdir(&mut self, dir: u64, name: &OsStr) -> R<()> {
        let ino = self.lookup(dir, name)?;
        if !self.entries(ino)?.is_empty() {
            return Err(libc::ENOTEMPTY);
        }
        self.remove_entry(dir, name)?;
        self.maybe_free(ino);
        Ok(())
    }

    /// Whether `ino` is `dir` or one of its ancestors.
    fn is_ancestor(&self, ino: u64, mut dir: u64) -> bool {
        loop {
            if dir == ino {
                return true;
            }
            match self.inodes.get(&dir).map(|i| &i.body) {
                Some(Body::Dir { parent, .. }) if *parent != dir => dir = *parent,
                _ => return false,
            }
        }
    }

    pub fn rename(
        &mut self,
        dir: u64,
        name: &OsStr,
        newdir: u64,
        newname: &OsStr,
        noreplace: bool,
        exchange: bool,
    ) -> R<()> {
        check_name(newname)?;
        let src = self.lookup(dir, name)?;
        self.entries(newdir)?;
        let dst = self.entries(newdir)?.get(newname).copied();
        let src_dir = self.inode(src)?.kind() == Kind::Dir;
        if src_dir && self.is_ancestor(src, newdir) {
            return Err(libc::EINVAL);
        }
        if exchange {
            let dst = dst.ok_or(libc::ENOENT)?;
            if self.inode(dst)?.kind() == Kind::Dir && self.is_ancestor(dst, dir) {
                return Err(libc::EINVAL);
            }
            self.remove_entry(dir, name)?;
            self.remove_entry(newdir, newname)?;
            self.add_entry(newdir, newname, src)?;
            self.add_entry(dir, name, dst)?;
            return Ok(());
        }
        if let Some(dst) = dst {
            if noreplace {
                return Err(libc::EEXIST);
            }
            if dst == src {
                return Ok(());
            }
            match (src_dir, self.inode(dst)?.kind() == Kind::Dir) {
                (true, false) => return Err(libc::ENOTDIR),
                (false, true) => return Err(libc::EISDIR),
                (true, true) if !self.entries(dst)?.is_empty() => return Err(libc::ENOTEMPTY),
                _ => {}
            }
            self.remove_entry(newdir, newname)?;
        }
        self.remove_entry(dir, name)?;
        self.add_entry(newdir, newname, src)?;
        if let Some(dst) = dst {
            self.maybe_free(dst);
        }
        Ok(())
    }

    pub fn readlink(&self, ino: u64) -> R<OsString> {
        match &self.inode(ino)?.body {
            Body::Symlink { target } => Ok(target.clone()),
            _ => Err(libc::EINVAL),
        }
    }

    pub fn open(&mut self, ino: u64) -> R<()> {
        self.inode_mut(ino)?.open += 1;
        Ok(())
    }

    pub fn release(&mut self, ino: u64) {
        if let Some(i) = self.inodes.get_mut(&ino) {
            i.open = i.open.saturating_sub(1);
        }
        self.maybe_free(ino);
    }

    pub fn read(&self, ino: u64, offset: u64, len: usize) -> R<Vec<u8>> {
        match &self.inode(ino)?.body {
            Body::File { cur, .. } => Ok(cur.read(offset, len)),
            Body::Dir { .. } => Err(libc::EISDIR),
            Body::Symlink { .. } => Err(libc::EINVAL),
        }
    }

    pub fn write(&mut self, ino: u64, offset: u64, data: &[u8]) -> R<()> {
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|&e| e <= MAX_SIZE)
            .ok_or(libc::EFBIG)?;
        let i = self.inode_mut(ino)?;
        let Body::File { cur, dirty, .. } = &mut i.body else {
            return Err(libc::EISDIR);
        };
        cur.for_each_page(offset, end, dirty, |page, at, n, from| {
            page[at..at + n].copy_from_slice(&data[from as usize..from as usize + n]);
        });
        cur.size = cur.size.max(end);
        let now = SystemTime::now();
        i.meta.mtime = now;
        i.meta.ctime = now;
        self.stats.writes += 1;
        self.stats.bytes_written += data.len() as u64;
        Ok(())
    }

    /// `fallocate(2)` modes: 0 (allocate, may grow), `KEEP_SIZE`,
    /// `PUNCH_HOLE | KEEP_SIZE` and `ZERO_RANGE` (with or without
    /// `KEEP_SIZE`). Others are `EOPNOTSUPP`.
    pub fn fallocate(&mut self, ino: u64, offset: u64, len: u64, mode: i32) -> R<()> {
        const KEEP: i32 = libc::FALLOC_FL_KEEP_SIZE;
        const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE;
        const ZERO: i32 = libc::FALLOC_FL_ZERO_RANGE;
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= MAX_SIZE)
            .ok_or(libc::EFBIG)?;
        if len == 0 {
            return Err(libc::EINVAL);
        }
        let i = self.inode_mut(ino)?;
        let Body::File { cur, dirty, .. } = &mut i.body else {
            return Err(libc::ENODEV);
        };
        let (zero, keep) = match mode {
            0 => (false, false),
            KEEP => (false, true),
            m if m == PUNCH | KEEP => (true, true),
            ZERO => (true, false),
            m if m == ZERO | KEEP => (true, true),
            _ => return Err(libc::EOPNOTSUPP),
        };
        if zero {
            cur.zero(offset, end, dirty);
        }
        if mode & PUNCH == 0 {
            // Allocate: zero pages where none are, up to the size it ends with.
            let new_size = if keep { cur.size } else { cur.size.max(end) };
            cur.size = new_size;
            let alloc_end = end.min(new_size);
            if offset < alloc_end {
                let first = offset / PAGE as u64;
                for idx in first..page_count(alloc_end) {
                    if let std::collections::hash_map::Entry::Vacant(v) = cur.map.entry(idx) {
                        v.insert(zero_page());
                        dirty.insert(idx);
                    }
                }
            }
        }
        i.meta.ctime = SystemTime::now();
        Ok(())
    }

    /// `fsync` (`datasync` false) or `fdatasync` of a file: its data and
    /// size become durable, and with `fsync` its other attributes too.
    /// With [`Options::fsync_syncs_entries`], the names that currently
    /// link to it become durable as well.
    pub fn fsync(&mut self, ino: u64, datasync: bool) -> R<()> {
        if datasync {
            self.stats.fdatasyncs += 1;
        } else {
            self.stats.fsyncs += 1;
        }
        let i = self.inode_mut(ino)?;
        if !datasync {
            i.durable_meta = i.meta;
        }
        let mut copied = 0;
        match &mut i.body {
            Body::File {
                cur,
                durable,
                dirty,
            } => {
                for idx in dirty.drain() {
                    match cur.map.get(&idx) {
                        Some(p) => {
                            durable.map.insert(idx, p.clone());
                            copied += 1;
                        }
                        None => {
                            durable.map.remove(&idx);
                        }
                    }
                }
                durable.size = cur.size;
            }
            Body::Dir { .. } => return self.sync_dir(ino),
            Body::Symlink { .. } => {}
        }
        self.stats.pages_synced += copied;
        if self.opts.fsync_syncs_entries {
            let names: Vec<(u64, OsString)> = self
                .inodes
                .iter()
                .filter_map(|(&d, i)| match &i.body {
                    Body::Dir { cur, .. } => Some(
                        cur.iter()
                            .filter(|(_, &c)| c == ino)
                            .map(move |(n, _)| (d, n.clone())),
                    ),
                    _ => None,
                })
                .flatten()
                .collect();
            for (d, n) in names {
                if let Some(Body::Dir { durable, .. }) =
                    self.inodes.get_mut(&d).map(|i| &mut i.body)
                {
                    let old = durable.insert(n, ino);
                    if let Some(old) = old.filter(|&o| o != ino) {
                        self.maybe_free(old);
                    }
                }
            }
        }
        Ok(())
    }

    /// `fsync` of a directory: its entries (and attributes) become durable.
    pub fn fsyncdir(&mut self, ino: u64) -> R<()> {
        self.stats.dir_fsyncs += 1;
        self.sync_dir(ino)
    }

    fn sync_dir(&mut self, ino: u64) -> R<()> {
        let i = self.inode_mut(ino)?;
        i.durable_meta = i.meta;
        let Body::Dir { cur, durable, .. } = &mut i.body else {
            return Err(libc::ENOTDIR);
        };
        let dropped: Vec<u64> = durable
            .iter()
            .filter(|(n, c)| cur.get(*n) != Some(c))
            .map(|(_, &c)| c)
            .collect();
        *durable = cur.clone();
        for c in dropped {
            self.maybe_free(c);
        }
        Ok(())
    }

    pub fn readdir(&self, ino: u64) -> R<Vec<DirEntry>> {
        let i = self.inode(ino)?;
        let Body::Dir { cur, parent, .. } = &i.body else {
            return Err(libc::ENOTDIR);
        };
        let mut out = vec![
            DirEntry {
                ino,
                kind: Kind::Dir,
                name: ".".into(),
            },
            DirEntry {
                ino: *parent,
                kind: Kind::Dir,
                name: "..".into(),
            },
        ];
        for (name, &c) in cur {
            out.push(DirEntry {
                ino: c,
                kind: self.inode(c)?.kind(),
                name: name.clone(),
            });
        }
        Ok(out)
    }

    /// Pages that hold data, and inodes.
    pub fn usage(&self) -> (u64, u64) {
        let pages = self
            .inodes
            .values()
            .map(|i| match &i.body {
                Body::File { cur, .. } => cur.map.len() as u64,
                _ => 1,
            })
            .sum();
        (pages, self.inodes.len() as u64)
    }

    /// Pages written (or truncated) since their file was last synced.
    pub fn unsynced_pages(&self) -> u64 {
        self.inodes
            .values()
            .map(|i| match &i.body {
                Body::File { dirty, .. } => dirty.len() as u64,
                _ => 0,
            })
            .sum()
    }

    /// The power cut: every inode goes back to its durable state, and
    /// what no durable entry reaches from the root is gone. Inode numbers
    /// of what survives do not change.
    pub fn crash(&mut self) {
        let mut dropped_pages = 0;
        for i in self.inodes.values_mut() {
            i.meta = i.durable_meta;
            i.open = 0;
            match &mut i.body {
                Body::File {
                    cur,
                    durable,
                    dirty,
                } => {
                    dropped_pages += dirty.len() as u64;
                    for idx in dirty.drain() {
                        match durable.map.get(&idx) {
                            Some(p) => {
                                cur.map.insert(idx, p.clone());
                            }
                            None => {
                                cur.map.remove(&idx);
                            }
                        }
                    }
                    cur.size = durable.size;
                }
                Body::Dir { cur, durable, .. } => *cur = durable.clone(),
                Body::Symlink { .. } => {}
            }
        }
        // Walk the durable tree from the root. Syncing one directory of a
        // rename but not the other can leave a directory durably named in
        // two places: it keeps the first name found, as fsck would.
        let mut reached = HashSet::from([ROOT]);
        let mut stack = vec![ROOT];
        for i in self.inodes.values_mut() {
            i.nlink = match i.body {
                Body::Dir { .. } => 1,
                _ => 0,
            };
        }
        if let Some(r) = self.inodes.get_mut(&ROOT) {
            r.nlink = 2;
        }
        while let Some(d) = stack.pop() {
            let names: Vec<(OsString, u64)> = match self.inodes.get(&d).map(|i| &i.body) {
                Some(Body::Dir { cur, .. }) => cur.iter().map(|(n, &c)| (n.clone(), c)).collect(),
                _ => continue,
            };
            for (name, c) in names {
                let is_dir = matches!(self.inodes.get(&c).map(|i| &i.body), Some(Body::Dir { .. }));
                let first = reached.insert(c);
                if is_dir && !first || !self.inodes.contains_key(&c) {
                    if let Some(Body::Dir { cur, durable, .. }) =
                        self.inodes.get_mut(&d).map(|i| &mut i.body)
                    {
                        cur.remove(&name);
                        durable.remove(&name);
                    }
                    continue;
                }
                if let Some(ci) = self.inodes.get_mut(&c) {
                    ci.nlink += 1;
                    if let Body::Dir { parent, .. } = &mut ci.body {
                        *parent = d;
                    }
                }
                if is_dir {
                    if let Some(di) = self.inodes.get_mut(&d) {
                        di.nlink += 1;
                    }
                }
                if first {
                    stack.push(c);
                }
            }
        }
        let before = self.inodes.len();
        self.inodes.retain(|ino, _| reached.contains(ino));
        self.stats.crashes += 1;
        self.stats.pages_dropped += dropped_pages;
        self.stats.inodes_dropped += (before - self.inodes.len()) as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> Meta {
        Meta::new(0o644, 0, 0)
    }

    fn fs() -> State {
        State::new(Options::default())
    }

    fn file(s: &mut State, dir: u64, name: &str) -> u64 {
        s.create(dir, OsStr::new(name), Kind::File, meta()).unwrap()
    }

    fn read_all(s: &State, ino: u64) -> Vec<u8> {
        s.read(ino, 0, usize::MAX >> 1).unwrap()
    }

    #[test]
    fn unsynced_writes_and_entries_are_dropped() {
        let mut s = fs();
        let a = file(&mut s, ROOT, "a");
        s.write(a, 0, b"durable").unwrap();
        s.fsync(a, true).unwrap();
        s.fsyncdir(ROOT).unwrap();
        s.write(a, 3, b"XXXXXXXXXX").unwrap();
        let b = file(&mut s, ROOT, "b");
        s.write(b, 0, b"lost").unwrap();
        s.fsync(b, false).unwrap(); // data durable, entry not
        s.crash();
        assert_eq!(read_all(&s, a), b"durable");
        assert_eq!(s.lookup(ROOT, OsStr::new("b")), Err(libc::ENOENT));
        assert!(s.attr(b).is_err(), "an unreachable inode is forgotten");
        assert_eq!(s.stats.inodes_dropped, 1);
    }

    #[test]
    fn a_durable_entry_without_synced_data_is_an_empty_file() {
        let mut s = fs();
        let a = file(&mut s, ROOT, "a");
        s.write(a, 0, &[1; 10_000]).unwrap();
        s.fsyncdir(ROOT).unwrap();
        s.crash();
        assert_eq!(s.lookup(ROOT, OsStr::new("a")), Ok(a));
        assert_eq!(s.attr(a).unwrap().size, 0);
    }

    #[test]
    fn sync_copies_only_dirty_pages() {
        let mut s = fs();
        let a = file(&mut s, ROOT, "img");
        let size = 64 << 20;
        s.fallocate(a, 0, size, 0).unwrap();
        s.fsync(a, true).unwrap();
        let base = s.stats.pages_synced;
        assert_eq!(base, size / PAGE as u64);
        for k in 0..100u64 {
            s.write(a, k * 7 * PAGE as u64 + 100, &[k as u8; 10])
                .unwrap();
            s.fsync(a, true).unwrap();
        }
        assert_eq!(s.stats.pages_synced - base, 100);
        assert_eq!(s.unsynced_pages(), 0);
    }

    #[test]
    fn shrink_then_grow_without_writes_syncs_the_zeros() {
        let mut s = fs();
        let a = file(&mut s, ROOT, "a");
        s.write(a, 0, &[9; 5 * PAGE]).unwrap();
        s.fsync(a, true).unwrap();
        let set = |size| SetAttr {
            size: Some(size),
            ..SetAttr::default()
        };
        s.setattr(a, set(100)).unwrap();
        s.fsync(a, true).unwrap();
        s.setattr(a, set(5 * PAGE as u64)).unwrap();
        s.fsync(a, true).unwrap();
        s.fsyncdir(ROOT).unwrap();
        s.crash();
        let got = read_all(&s, a);
        assert_eq!(got.len(), 5 * PAGE);
        assert!(got[..100].iter().all(|&b| b == 9));
        assert!(got[100..].iter().all(|&b| b == 0), "old bytes came back");
    }

    #[test]
    fn unsynced_truncate_is_undone() {
        let mut s = fs();
        let a = file(&mut s, ROOT, "a");
        s.write(a, 0, &[7; 3 * PAGE]).unwrap();
        s.fsync(a, true).unwrap();
        s.fsyncdir(ROOT).unwrap();
        s.setattr(
            a,
            SetAttr {
                size: Some(10),
                ..SetAttr::default()
            },
        )
        .unwrap();
        s.crash();
        assert_eq!(read_all(&s, a), vec![7; 3 * PAGE]);
    }

    #[test]
    fn rename_is_durable_with_its_directories_only() {
        let mut s = fs();
        let old = file(&mut s, ROOT, "f");
        s.write(old, 0, b"old").unwrap();
        s.fsync(old, false).unwrap();
        s.fsyncdir(ROOT).unwrap();
        let tmp = file(&mut s, ROOT, "f.tmp");
        s.write(tmp, 0, b"new").unwrap();
        s.fsync(tmp, false).unwrap();
        s.rename(
            ROOT,
            OsStr::new("f.tmp"),
            ROOT,
            OsStr::new("f"),
            false,
            false,
        )
        .unwrap();
        assert!(s.attr(old).is_ok(), "a durable name keeps the old inode");
        s.crash();
        assert_eq!(s.lookup(ROOT, OsStr::new("f")), Ok(old));
        assert_eq!(read_all(&s, old), b"old");
        assert!(s.lookup(ROOT, OsStr::new("f.tmp")).is_err());

        let tmp = file(&mut s, ROOT, "f.tmp");
        s.write(tmp, 0, b"new").unwrap();
        s.fsync(tmp, false).unwrap();
        s.rename(
            ROOT,
            OsStr::new("f.tmp"),
            ROOT,
            OsStr::new("f"),
            false,
            false,
        )
        .unwrap();
        s.fsyncdir(ROOT).unwrap();
        assert!(s.attr(old).is_err(), "the replaced inode is freed");
        s.crash();
        assert_eq!(s.lookup(ROOT, OsStr::new("f")), Ok(tmp));
        assert_eq!(read_all(&s, tmp), b"new");
    }

    #[test]
    fn fsync_syncs_entries_option_makes_a_new_file_survive() {
        let mut s = State::new(Options {
            fsync_syncs_entries: true,
        });
        let a = file(&mut s, ROOT, "a");
        s.write(a, 0, b"x").unwrap();
        s.fsync(a, true).unwrap();
        s.crash();
        assert_eq!(s.lookup(ROOT, OsStr::new("a")), Ok(a));
        assert_eq!(read_all(&s, a), b"x");
    }

    #[test]
    fn unsynced_unlink_is_undone_and_links_are_counted() {
        let mut s = fs();
        let a = file(&mut s, ROOT, "a");
        s.write(a, 0, b"data").unwrap();
        s.fsync(a, true).unwrap();
        s.link(a, ROOT, OsStr::new("b")).unwrap();
        assert_eq!(s.attr(a).unwrap().nlink, 2);
        s.fsyncdir(ROOT).unwrap();
        s.unlink(ROOT, OsStr::new("a")).unwrap();
        s.unlink(ROOT, OsStr::new("b")).unwrap();
        assert_eq!(s.attr(a).unwrap().nlink, 0);
        s.crash();
        assert_eq!(s.attr(a).unwrap().nlink, 2);
        assert_eq!(read_all(&s, a), b"data");
    }

    #[test]
    fn directories_need_their_parent_synced() {
        let mut s = fs();
        let d = s.create(ROOT, OsStr::new("d"), Kind::Dir, meta()).unwrap();
        let e = s.create(d, OsStr::new("e"), Kind::Dir, meta()).unwrap();
        assert_eq!(s.attr(d).unwrap().nlink, 3);
        assert_eq!(s.attr(ROOT).unwrap().nlink, 3);
        let f = file(&mut s, e, "f");
        s.fsyncdir(e).unwrap();
        s.fsyncdir(d).unwrap();
        s.crash();
        assert!(s.attr(d).is_err() && s.attr(e).is_err() && s.attr(f).is_err());
        assert_eq!(s.attr(ROOT).unwrap().nlink, 2);

        let d = s.create(ROOT, OsStr::new("d"), Kind::Dir, meta()).unwrap();
        s.fsyncdir(ROOT).unwrap();
        s.crash();
        assert_eq!(s.lookup(ROOT, OsStr::new("d")), Ok(d));
        assert_eq!(s.attr(d).unwrap().nlink, 2);
        assert_eq!(s.attr(ROOT).unwrap().nlink, 3);
    }

    #[test]
    fn a_directory_renamed_with_one_side_synced_keeps_one_name() {
        let mut s = fs();
        let a = s.create(ROOT, OsStr::new("a"), Kind::Dir, meta()).unwrap();
        let b = s.create(ROOT, OsStr::new("b"), Kind::Dir, meta()).unwrap();
        let c = s.create(a, OsStr::new("c"), Kind::Dir, meta()).unwrap();
        s.fsyncdir(a).unwrap();
        s.fsyncdir(ROOT).unwrap();
        s.rename(a, OsStr::new("c"), b, OsStr::new("c"), false, false)
            .unwrap();
        s.fsyncdir(b).unwrap();
        s.crash();
        let in_a = s.lookup(a, OsStr::new("c")).is_ok();
        let in_b = s.lookup(b, OsStr::new("c")).is_ok();
        assert!(in_a != in_b, "c in a: {in_a}, in b: {in_b}");
        assert_eq!(s.attr(c).unwrap().nlink, 2);
        let parents = s.attr(a).unwrap().nlink + s.attr(b).unwrap().nlink;
        assert_eq!(parents, 5);
    }

    #[test]
    fn rename_refuses_what_posix_refuses() {
        let mut s = fs();
        let d = s.create(ROOT, OsStr::new("d"), Kind::Dir, meta()).unwrap();
        s.create(d, OsStr::new("sub"), Kind::Dir, meta()).unwrap();
        file(&mut s, ROOT, "f");
        let r = |s: &mut State, a: &str, b: u64, n: &str| {
            s.rename(ROOT, OsStr::new(a), b, OsStr::new(n), false, false)
        };
        assert_eq!(r(&mut s, "d", d, "x"), Err(libc::EINVAL));
        assert_eq!(r(&mut s, "f", ROOT, "d"), Err(libc::EISDIR));
        assert_eq!(r(&mut s, "d", ROOT, "f"), Err(libc::ENOTDIR));
        s.create(ROOT, OsStr::new("e"), Kind::Dir, meta()).unwrap();
        assert_eq!(r(&mut s, "e", ROOT, "d"), Err(libc::ENOTEMPTY));
        assert_eq!(
            s.rename(ROOT, OsStr::new("f"), ROOT, OsStr::new("e"), true, false),
            Err(libc::EEXIST)
        );
        assert_eq!(r(&mut s, "missing", ROOT, "x"), Err(libc::ENOENT));
    }

    #[test]
    fn an_open_unlinked_file_lives_until_released() {
        let mut s = fs();
        let a = file(&mut s, ROOT, "a");
        s.open(a).unwrap();
        s.unlink(ROOT, OsStr::new("a")).unwrap();
        s.write(a, 0, b"still here").unwrap();
        assert_eq!(read_all(&s, a), b"still here");
        s.release(a);
        assert!(s.attr(a).is_err());
    }

    #[test]
    fn punch_hole_zeroes_and_frees() {
        let mut s = fs();
        let a = file(&mut s, ROOT, "a");
        s.write(a, 0, &[5; 4 * PAGE]).unwrap();
        s.fallocate(
            a,
            100,
            2 * PAGE as u64,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        )
        .unwrap();
        let got = read_all(&s, a);
        assert_eq!(got.len(), 4 * PAGE);
        assert!(got[..100].iter().all(|&b| b == 5));
        assert!(got[100..100 + 2 * PAGE].iter().all(|&b| b == 0));
        assert!(got[100 + 2 * PAGE..].iter().all(|&b| b == 5));
        assert_eq!(s.attr(a).unwrap().blocks, 3 * 8, "one whole page freed");
        assert_eq!(
            s.fallocate(a, 0, 1, libc::FALLOC_FL_COLLAPSE_RANGE),
            Err(libc::EOPNOTSUPP)
        );
    }
}
