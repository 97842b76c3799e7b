//! `tt-bench images`: a runtime image from a 1 GiB template (issue 21).
//!
//! The template is 1 GiB of non-zero bytes (no holes, so a copy has all of
//! it to move). Each round makes a runtime image from it three ways, in
//! turn, each synced (`fdatasync` of the file and `fsync` of its
//! directory, as [`clone_file`] does) and removed before the next:
//!
//! - `clone_file`: tt-host's way, a reflink (`FICLONE`) where the file
//!   system can, else `copy_file_range` over the data ranges;
//! - `std::fs::copy`: the standard library's full copy (on Linux itself
//!   `copy_file_range`, so it should be close to `clone_file`'s copy);
//! - `read/write`: 1 MiB `read`s and `write`s through a user buffer, the
//!   plainest copy.
//!
//! It runs in `$TT_IMAGES_BENCH_DIR` (default `target/tt-images-bench`, the
//! repository's file system) and again in `/dev/shm` (tmpfs), and prints
//! for each which kind `clone_file` made and, when not a reflink, the
//! error `FICLONE` gave. The template is in the page cache throughout (it
//! was just written): the figures are of the copy, not of reading a cold
//! disk. No target: the issue asks for the comparison.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tt_benchutil::{bench_dir, fs_kind, median};
use tt_host::images::{clone_file, CloneKind};

use crate::{Opts, Verdict};

const VAR: &str = "TT_IMAGES_BENCH_DIR";
const SIZE: u64 = 1 << 30;
const DEFAULT_RUNS: usize = 3;

/// Removes the bench directory at the end, also on an error.
struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn run(o: &Opts) -> Result<Vec<Verdict>, String> {
    let runs = o.runs.unwrap_or(DEFAULT_RUNS).max(1);
    let mut dirs = vec![bench_dir(VAR, "tt-images-bench")];
    if Path::new("/dev/shm").is_dir() {
        dirs.push(PathBuf::from(format!(
            "/dev/shm/tt-images-bench-{}",
            std::process::id()
        )));
    }
    println!("tt-bench images: a runtime image from a 1 GiB template, {runs} rounds per place");
    for d in dirs {
        println!();
        one_place(&d, runs)?;
    }
    Ok(vec![Verdict::Reported])
}

fn one_place(dir: &Path, runs: usize) -> Result<(), String> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let guard = Dir(dir.to_path_buf());
    let (fs, _) = fs_kind(dir);
    println!("in {} ({fs})", dir.display());
    println!("  FICLONE here: {}", probe_reflink(dir)?);

    let template = dir.join("template.img");
    let t = Instant::now();
    fill(&template)?;
    println!(
        "  template written and synced in {:.2} s",
        t.elapsed().as_secs_f64()
    );

    let dst = dir.join("runtime.img");
    let mut kinds = Vec::new();
    let (mut clone, mut stdcopy, mut rw) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let t = Instant::now();
        let kind = clone_file(&template, &dst).map_err(|e| e.to_string())?;
        clone.push(t.elapsed());
        kinds.push(kind);
        check_and_remove(&template, &dst)?;

        let t = Instant::now();
        std::fs::copy(&template, &dst).map_err(|e| format!("copy: {e}"))?;
        sync(&dst)?;
        stdcopy.push(t.elapsed());
        check_and_remove(&template, &dst)?;

        let t = Instant::now();
        read_write(&template, &dst)?;
        sync(&dst)?;
        rw.push(t.elapsed());
        check_and_remove(&template, &dst)?;
    }
    let kind = kinds[0];
    if kinds.iter().any(|k| *k != kind) {
        return Err(format!("clone_file made different kinds: {kinds:?}"));
    }
    let ms = |v: &[Duration]| -> Vec<f64> { v.iter().map(|d| d.as_secs_f64() * 1e3).collect() };
    let (c, s, r) = (median(&ms(&clone)), median(&ms(&stdcopy)), median(&ms(&rw)));
    println!("  {:<26} {:>10}  rounds (ms)", "1 GiB, synced", "median");
    let row = |name: &str, m: f64, v: &[Duration]| {
        println!("  {name:<26} {m:>7.1} ms  {}", crate::list(&ms(v), 1));
    };
    row(&format!("clone_file ({kind})"), c, &clone);
    row("std::fs::copy", s, &stdcopy);
    row("read/write 1 MiB", r, &rw);
    println!(
        "  clone_file / std::fs::copy: {:.2}x; clone_file / read/write: {:.2}x; \
         clone_file: {:.2} GiB/s",
        c / s,
        c / r,
        1e3 / c
    );
    if kind == CloneKind::Copy {
        println!("  clone_file copied: this file system cannot reflink (see FICLONE above)");
    }
    drop(guard);
    Ok(())
}

/// What `FICLONE` does between two small files in `dir`.
fn probe_reflink(dir: &Path) -> Result<String, String> {
    let a = dir.join("probe-a");
    let b = dir.join("probe-b");
    std::fs::write(&a, [1u8; 4096]).map_err(|e| format!("write {}: {e}", a.display()))?;
    let from = File::open(&a).map_err(|e| format!("open {}: {e}", a.display()))?;
    let to = File::create(&b).map_err(|e| format!("create {}: {e}", b.display()))?;
    // SAFETY: both descriptors are open for the call; FICLONE takes the
    // source descriptor by value.
    let rc = unsafe { libc::ioctl(to.as_raw_fd(), 0x4004_9409 as _, from.as_raw_fd()) };
    let out = if rc == 0 {
        "supported (reflink)".to_string()
    } else {
        format!(
            "refused: {} (clone_file falls back to a copy)",
            std::io::Error::last_os_error()
        )
    };
    let _ = std::fs::remove_file(&a);
    let _ = std::fs::remove_file(&b);
    Ok(out)
}

/// 1 GiB of non-zero bytes, written in 1 MiB chunks and synced.
fn fill(path: &Path) -> Result<(), String> {
    let f = File::create(path).map_err(|e| format!("create {}: {e}", path.display()))?;
    let mut chunk: Vec<u8> = (0..1usize << 20).map(|i| (i % 255) as u8 + 1).collect();
    let mut off = 0u64;
    while off < SIZE {
        // Each chunk differs, so no layer can dedupe them.
        chunk[..8].copy_from_slice(&off.to_le_bytes());
        chunk[0] |= 1;
        f.write_all_at(&chunk, off)
            .map_err(|e| format!("write {}: {e}", path.display()))?;
        off += chunk.len() as u64;
    }
    f.sync_all()
        .map_err(|e| format!("sync {}: {e}", path.display()))
}

/// The plainest copy: `read` and `write` through a 1 MiB buffer.
fn read_write(src: &Path, dst: &Path) -> Result<(), String> {
    let mut from = File::open(src).map_err(|e| format!("open {}: {e}", src.display()))?;
    let mut to = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dst)
        .map_err(|e| format!("create {}: {e}", dst.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = from
            .read(&mut buf)
            .map_err(|e| format!("read {}: {e}", src.display()))?;
        if n == 0 {
            return Ok(());
        }
        to.write_all(&buf[..n])
            .map_err(|e| format!("write {}: {e}", dst.display()))?;
    }
}

/// `fdatasync` the file and `fsync` its directory, as `clone_file` does.
fn sync(path: &Path) -> Result<(), String> {
    File::open(path)
        .and_then(|f| f.sync_data())
        .map_err(|e| format!("sync {}: {e}", path.display()))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| format!("sync {}: {e}", dir.display()))
}

/// Check the copy has the template's size and a sample of its bytes
/// (the first and last MiB), then remove it.
fn check_and_remove(template: &Path, dst: &Path) -> Result<(), String> {
    let len = std::fs::metadata(dst)
        .map_err(|e| format!("stat {}: {e}", dst.display()))?
        .len();
    if len != SIZE {
        return Err(format!("{} is {len} bytes, not {SIZE}", dst.display()));
    }
    let (a, b) = (
        File::open(template).map_err(|e| e.to_string())?,
        File::open(dst).map_err(|e| e.to_string())?,
    );
    let mut x = vec![0u8; 1 << 20];
    let mut y = vec![0u8; 1 << 20];
    for off in [0, SIZE - (1 << 20)] {
        a.read_exact_at(&mut x, off).map_err(|e| e.to_string())?;
        b.read_exact_at(&mut y, off).map_err(|e| e.to_string())?;
        if x != y {
            return Err(format!(
                "{} differs from the template at {off}",
                dst.display()
            ));
        }
    }
    std::fs::remove_file(dst).map_err(|e| format!("remove {}: {e}", dst.display()))
}
