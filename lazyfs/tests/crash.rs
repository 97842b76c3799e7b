//! tt-lazyfs on a real mount: what survives `crash()` and what does not.
//!
//! These tests need root and /dev/fuse. Without them they fail, unless
//! TT_SKIP_FUSE=1, when they say loudly that they skip.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use tt_lazyfs::{check_fuse, skip_requested, Error, LazyFs};
use tt_ring::{BlockDevice, Consumer, FileDevice, Producer};

/// A directory removed on drop (after the mount on it is gone).
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A mount on a fresh directory. Fields drop in order: unmount first.
struct Fixture {
    fs: LazyFs,
    _dir: TempDir,
}

impl Fixture {
    fn path(&self, name: &str) -> PathBuf {
        self.fs.path().join(name)
    }
}

/// Mount a tt-lazyfs for `test`, or `None` if FUSE is missing and
/// TT_SKIP_FUSE=1 asks to skip.
fn mount(test: &str) -> Option<Fixture> {
    if let Err(e) = check_fuse() {
        if skip_requested() {
            // Straight to fd 2, past the test harness's capture: a skip
            // must be seen.
            let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {e} (TT_SKIP_FUSE=1)");
            return None;
        }
        panic!("{test}: {e}");
    }
    let dir = std::env::temp_dir().join(format!("tt-lazyfs-{test}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    let dir = TempDir(dir);
    let fs = LazyFs::mount(&dir.0).unwrap();
    Some(Fixture { fs, _dir: dir })
}

fn sync_dir(p: &Path) {
    File::open(p).unwrap().sync_all().unwrap();
}

/// Create `name` holding `data`, with data and entry durable.
fn durable_file(f: &Fixture, name: &str, data: &[u8]) -> PathBuf {
    let p = f.path(name);
    let mut file = File::create(&p).unwrap();
    file.write_all(data).unwrap();
    file.sync_all().unwrap();
    sync_dir(f.fs.path());
    p
}

#[test]
fn unsynced_writes_and_an_unsynced_new_file_vanish_at_crash() {
    let Some(mut f) = mount("unsynced") else {
        return;
    };
    let a = durable_file(&f, "a", b"durable");
    OpenOptions::new()
        .write(true)
        .open(&a)
        .unwrap()
        .write_all_at(b"LOST-LOST-LOST", 3)
        .unwrap();
    let b = f.path("b");
    fs::write(&b, b"never synced").unwrap();
    // Before the power cut, all of it is there.
    assert_eq!(fs::read(&a).unwrap(), b"durLOST-LOST-LOST");
    assert_eq!(fs::read(&b).unwrap(), b"never synced");
    assert!(f.fs.unsynced_pages() >= 2);

    f.fs.crash().unwrap();

    assert_eq!(fs::read(&a).unwrap(), b"durable");
    assert!(!b.exists(), "an unsynced new file survived the crash");
    let s = f.fs.stats();
    assert_eq!(s.crashes, 1);
    assert!(s.pages_dropped >= 2 && s.inodes_dropped >= 1, "{s:?}");
    assert_eq!(f.fs.unsynced_pages(), 0);
}

#[test]
fn fdatasynced_data_survives_and_later_writes_do_not() {
    let Some(mut f) = mount("fdatasync") else {
        return;
    };
    let p = durable_file(&f, "img", b"");
    let file = OpenOptions::new().write(true).open(&p).unwrap();
    let synced: Vec<u8> = (0..3 * 4096).map(|i| (i % 251) as u8).collect();
    file.write_all_at(&synced, 8192).unwrap();
    let before = f.fs.stats().fdatasyncs;
    file.sync_data().unwrap();
    assert_eq!(f.fs.stats().fdatasyncs, before + 1);
    file.write_all_at(&[0xee; 4096], 4096).unwrap();
    file.write_all_at(&[0xee; 100], 8192 + 3 * 4096).unwrap();
    drop(file);

    f.fs.crash().unwrap();

    let got = fs::read(&p).unwrap();
    assert_eq!(
        got.len(),
        8192 + synced.len(),
        "the unsynced growth survived"
    );
    assert!(
        got[..8192].iter().all(|&b| b == 0),
        "an unsynced page survived"
    );
    assert_eq!(&got[8192..], &synced[..]);
}

#[test]
fn a_rename_without_directory_fsync_is_undone() {
    let Some(mut f) = mount("rename") else {
        return;
    };
    let dst = durable_file(&f, "state.json", b"old");
    let tmp = f.path("state.json.tmp");
    let root = f.fs.path().to_path_buf();
    let replace = |with_dir_sync: bool| {
        let mut t = File::create(&tmp).unwrap();
        t.write_all(b"new").unwrap();
        t.sync_all().unwrap();
        fs::rename(&tmp, &dst).unwrap();
        if with_dir_sync {
            sync_dir(&root);
        }
        assert_eq!(fs::read(&dst).unwrap(), b"new");
    };

    replace(false);
    f.fs.crash().unwrap();
    assert_eq!(fs::read(&dst).unwrap(), b"old", "the rename was not synced");
    assert!(!tmp.exists(), "the temporary name was never synced either");

    replace(true);
    f.fs.crash().unwrap();
    assert_eq!(fs::read(&dst).unwrap(), b"new");
    assert!(!tmp.exists());
}

/// A journal's commit survives the power cut and a page-cache write does
/// not: the difference a SIGKILL cannot show.
#[test]
fn a_committed_tt_ring_survives_and_a_plain_pwrite_does_not() {
    let Some(mut f) = mount("ring") else {
        return;
    };
    const SECTOR: u32 = 4096;
    let ring = f.path("ring");
    let plain = f.path("plain");
    let records: Vec<Vec<u8>> = (0..50u32)
        .map(|i| {
            format!("record {i} ")
                .repeat(i as usize % 7 + 1)
                .into_bytes()
        })
        .collect();
    {
        let dev = FileDevice::create(&ring, 1 << 20, SECTOR).unwrap();
        Producer::create(&dev).unwrap();
        let mut p = Producer::attach(dev).unwrap();
        for (i, r) in records.iter().enumerate() {
            p.push(r).unwrap();
            if i % 10 == 9 {
                p.advance().unwrap();
            }
        }
        // The same bytes, written as a plain file write without a sync.
        let dev = FileDevice::create(&plain, 1 << 20, SECTOR).unwrap();
        dev.write_at(&[0x5a; 4096], 0).unwrap();
        let mut b = vec![0u8; 4096];
        dev.read_at(&mut b, 0).unwrap();
        assert_eq!(b, [0x5a; 4096], "the write is visible before the crash");
    }
    let synced = f.fs.stats();
    assert!(
        synced.fdatasyncs >= 5 && synced.dir_fsyncs >= 2,
        "{synced:?}"
    );

    f.fs.crash().unwrap();

    let mut c = Consumer::attach(FileDevice::open(&ring, SECTOR).unwrap()).unwrap();
    let mut got = Vec::new();
    loop {
        match c.pop() {
            Ok(item) => got.push(item.data),
            Err(tt_ring::Error::Retry) => break,
            Err(e) => panic!("after the crash: {e}"),
        }
    }
    assert_eq!(got, records, "committed records lost or changed");
    let dev = FileDevice::open(&plain, SECTOR).unwrap();
    let mut b = vec![1u8; 4096];
    dev.read_at(&mut b, 0).unwrap();
    assert!(b.iter().all(|&x| x == 0), "an unsynced pwrite survived");
}

#[test]
fn o_direct_writes_and_syncs_work() {
    let Some(mut f) = mount("direct") else {
        return;
    };
    let p = f.path("dev");
    FileDevice::create(&p, 1 << 20, 4096).unwrap();
    let dev = FileDevice::open_direct(&p, 4096).unwrap();
    dev.write_at(&[7; 8192], 4096).unwrap();
    dev.sync().unwrap();
    dev.write_at(&[8; 4096], 65536).unwrap();
    drop(dev);
    f.fs.crash().unwrap();
    let got = fs::read(&p).unwrap();
    assert!(got[4096..12288].iter().all(|&b| b == 7));
    assert!(got[65536..69632].iter().all(|&b| b == 0));
}

fn flock(file: &File) -> bool {
    // SAFETY: flock on an open descriptor; no memory is passed.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

#[test]
fn flock_works_through_hard_links_and_symlinks() {
    let Some(mut f) = mount("flock") else {
        return;
    };
    let img = durable_file(&f, "img", &[0; 4096]);
    let hard = f.path("hard");
    let soft = f.path("soft");
    fs::hard_link(&img, &hard).unwrap();
    std::os::unix::fs::symlink(&img, &soft).unwrap();
    let ino = fs::metadata(&img).unwrap().ino();
    for p in [&hard, &soft] {
        assert_eq!(fs::metadata(p).unwrap().ino(), ino);
    }
    assert_eq!(fs::metadata(&img).unwrap().nlink(), 2);
    assert_eq!(fs::read_link(&soft).unwrap(), img);

    let held = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    assert!(flock(&held));
    for p in [&img, &hard, &soft] {
        let other = OpenOptions::new().read(true).write(true).open(p).unwrap();
        assert!(!flock(&other), "{} was not locked out", p.display());
    }
    drop(held);
    let again = File::open(&soft).unwrap();
    assert!(flock(&again), "the lock was not released on close");
    drop(again);

    // Neither link was synced in the directory: both are gone after the
    // cut, and the inode keeps its number.
    f.fs.crash().unwrap();
    assert!(!hard.exists() && fs::symlink_metadata(&soft).is_err());
    let m = fs::metadata(&img).unwrap();
    assert_eq!((m.ino(), m.nlink()), (ino, 1));
}

#[test]
fn a_large_file_synced_often_copies_only_its_dirty_pages() {
    let Some(f) = mount("dirty") else {
        return;
    };
    let size = 64u64 << 20;
    let dev = FileDevice::create(&f.path("img"), size, 4096).unwrap();
    let base = f.fs.stats().pages_synced;
    assert!(base >= size / 4096, "{base}");
    let mut x = 12345u64;
    for i in 0..200u64 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let page = (x >> 33) % (size / 4096);
        dev.write_at(&[i as u8; 4096], page * 4096).unwrap();
        dev.sync().unwrap();
    }
    assert_eq!(f.fs.stats().pages_synced - base, 200);
    assert_eq!(f.fs.unsynced_pages(), 0);
}

#[test]
fn truncate_and_fallocate_are_durable_only_when_synced() {
    let Some(mut f) = mount("truncate") else {
        return;
    };
    let p = durable_file(&f, "f", &[3; 3 * 4096]);
    let file = OpenOptions::new().write(true).open(&p).unwrap();
    file.set_len(100).unwrap();
    // SAFETY: fallocate on an open descriptor; no memory is passed.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, 1 << 20) };
    assert_eq!(r, 0, "fallocate: {}", std::io::Error::last_os_error());
    let m = fs::metadata(&p).unwrap();
    assert_eq!(m.len(), 1 << 20);
    assert!(m.blocks() * 512 >= 1 << 20, "fallocate allocated nothing");
    drop(file);
    f.fs.crash().unwrap();
    assert_eq!(fs::read(&p).unwrap(), vec![3; 3 * 4096]);

    let file = OpenOptions::new().write(true).open(&p).unwrap();
    file.set_len(100).unwrap();
    file.sync_data().unwrap();
    drop(file);
    f.fs.crash().unwrap();
    assert_eq!(fs::read(&p).unwrap(), vec![3; 100]);
}

#[test]
fn directories_inode_numbers_and_statfs() {
    let Some(mut f) = mount("dirs") else {
        return;
    };
    let d = f.path("state");
    fs::create_dir(&d).unwrap();
    fs::create_dir(d.join("running")).unwrap();
    fs::write(d.join("running/1"), b"x").unwrap();
    sync_dir(f.fs.path());
    sync_dir(&d);
    let ino = fs::metadata(&d).unwrap().ino();
    let mut names: Vec<String> = fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["running"]);

    f.fs.crash().unwrap();
    assert_eq!(fs::metadata(&d).unwrap().ino(), ino);
    assert!(d.join("running").is_dir());
    assert!(!d.join("running/1").exists(), "running/ was never synced");
    fs::remove_dir(d.join("running")).unwrap();

    let c = std::ffi::CString::new(f.fs.path().to_str().unwrap()).unwrap();
    // SAFETY: statvfs writes into the zeroed struct passed to it.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
    assert!(
        st.f_bavail * st.f_frsize >= 1 << 40,
        "only {} blocks free",
        st.f_bavail
    );
}

#[test]
fn crash_refuses_a_busy_mount_and_drop_detaches_it() {
    let Some(mut f) = mount("busy") else {
        return;
    };
    let p = durable_file(&f, "f", b"kept");
    let held = File::open(&p).unwrap();
    match f.fs.crash() {
        Err(Error::Busy { .. }) => {}
        other => panic!("crash with a file open: {other:?}"),
    }
    // Still mounted and served, nothing dropped.
    assert_eq!(fs::read(&p).unwrap(), b"kept");
    assert_eq!(f.fs.stats().crashes, 0);

    let dir = f.fs.path().to_path_buf();
    let Fixture { fs: lazy, _dir } = f;
    drop(lazy);
    let parent = fs::metadata(dir.parent().unwrap()).unwrap().dev();
    assert_eq!(fs::metadata(&dir).unwrap().dev(), parent, "still mounted");
    let mut b = [0u8; 4];
    held.read_exact_at(&mut b, 0).unwrap();
    assert_eq!(&b, b"kept", "the detached mount still serves its open file");
}

/// The child half of the next test: writes, reports, and waits for its
/// SIGKILL. A no-op when run as a test on its own.
#[test]
fn child_writer() {
    let Some(dir) = std::env::var_os("TT_LAZYFS_CHILD_DIR") else {
        return;
    };
    let dir = PathBuf::from(dir);
    let mut a = File::create(dir.join("synced")).unwrap();
    a.write_all(b"synced").unwrap();
    a.sync_data().unwrap();
    sync_dir(&dir);
    fs::write(dir.join("unsynced"), b"page cache only").unwrap();
    println!("TT-LAZYFS-CHILD-READY");
    std::io::stdout().flush().unwrap();
    loop {
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

/// Kills the child on drop, whatever happened.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_sigkill_loses_nothing_and_the_power_cut_drops_what_was_not_synced() {
    let Some(mut f) = mount("sigkill") else {
        return;
    };
    let mut child = Killed(
        Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "child_writer", "--nocapture", "--test-threads=1"])
            .env("TT_LAZYFS_CHILD_DIR", f.fs.path())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let out = child.0.stdout.take().unwrap();
    // Read on a thread, so a child stuck on the mount fails the test (and
    // is killed by its guard) instead of hanging it.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let ready = BufReader::new(out)
            .lines()
            .map_while(Result::ok)
            .any(|l| l.contains("TT-LAZYFS-CHILD-READY"));
        let _ = tx.send(ready);
    });
    let ready = rx.recv_timeout(std::time::Duration::from_secs(60));
    assert_eq!(ready, Ok(true), "the child did not get to write");
    child.0.kill().unwrap(); // SIGKILL
    child.0.wait().unwrap();
    drop(child);
    assert_eq!(fs::read(f.path("unsynced")).unwrap(), b"page cache only");

    f.fs.crash().unwrap();
    assert_eq!(fs::read(f.path("synced")).unwrap(), b"synced");
    assert!(!f.path("unsynced").exists());
}
