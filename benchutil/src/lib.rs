//! Helpers shared by the benchmarks that time real `fdatasync`s (tt-ring's
//! and tt-journal's): where their files go, whether that file system's
//! `fdatasync` waits for a disk, zero-filled files to overwrite, and the
//! medians criterion wrote in this run, for the benches' own summaries.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// The cargo target directory: `$CARGO_TARGET_DIR`, else the workspace's
/// `target/`.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
            crate_dir.parent().unwrap_or(crate_dir).join("target")
        })
}

/// Where a bench puts its files: `$var` if set, else `<target>/<default>`,
/// on the repository's file system (`/tmp` may be a tmpfs, whose
/// `fdatasync` waits for nothing).
pub fn bench_dir(var: &str, default: &str) -> PathBuf {
    std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join(default))
}

/// Where criterion writes its estimates (its own rule, short of running
/// `cargo metadata`).
pub fn criterion_dir() -> PathBuf {
    std::env::var_os("CRITERION_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("criterion"))
}

/// The file system holding `dir`: its name, and whether its `fdatasync`
/// waits for a disk (not on tmpfs or ramfs).
pub fn fs_kind(dir: &Path) -> (String, bool) {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return ("unknown".into(), true);
    };
    // SAFETY: statfs only writes into `st`, a plain C struct for which
    // all zeroes is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a writable statfs
    // that outlives the call.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return ("unknown".into(), true);
    }
    match st.f_type as i64 {
        0xEF53 => ("ext2/3/4".into(), true),
        0x5846_5342 => ("xfs".into(), true),
        0x9123_683E => ("btrfs".into(), true),
        0x0102_1994 => ("tmpfs".into(), false),
        0x8584_58f6 => ("ramfs".into(), false),
        t => (format!("f_type {t:#x}"), true),
    }
}

/// The header line every disk bench prints: where its files are, on what
/// file system, the cores and the load average; and a warning when that
/// file system's `fdatasync` does not wait for a disk (`var` is the
/// environment variable that moves the files).
pub fn print_setting(name: &str, dir: &Path, var: &str) {
    let (fs, real_sync) = fs_kind(dir);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "{name} benches in {} ({fs}); {} cores; load average {}",
        dir.display(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    if !real_sync {
        println!("WARNING: {fs} does not make fdatasync wait for a disk; set {var}");
    }
}

/// A file of `size` zero bytes, written in 1 MiB `pwrite`s and synced, so
/// that the timed writes overwrite allocated blocks.
///
/// The chunk size matters: the page cache keeps the folios these writes
/// create, and on this machine's ext4 a file filled by one 256 MiB write
/// made every later 256 KiB `pwrite` + `fdatasync` about 50% slower than
/// one filled in 1 MiB writes.
pub fn zeroed_file(path: &Path, size: u64) -> File {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    let chunk = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < size {
        let n = (size - off).min(chunk.len() as u64) as usize;
        f.write_all_at(&chunk[..n], off)
            .unwrap_or_else(|e| panic!("fill {}: {e}", path.display()));
        off += n as u64;
    }
    f.sync_all()
        .unwrap_or_else(|e| panic!("sync {}: {e}", path.display()));
    f
}

/// Median of a non-empty sample (the mean of the two middle values for an
/// even count).
pub fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Median time per iteration (ns) of one benchmark (the median of its
/// samples' means), from criterion's estimates, if this run (since
/// `since`) wrote them.
pub fn median_ns(group: &str, function: &str, since: SystemTime) -> Option<f64> {
    let path = criterion_dir()
        .join(group)
        .join(function)
        .join("new/estimates.json");
    if std::fs::metadata(&path).ok()?.modified().ok()? < since {
        return None;
    }
    parse_median(&std::fs::read_to_string(path).ok()?)
}

/// The median's point estimate in criterion's `estimates.json`.
fn parse_median(text: &str) -> Option<f64> {
    let rest = &text[text.find("\"median\"")?..];
    let key = "\"point_estimate\":";
    let rest = &rest[rest.find(key)? + key.len()..];
    let end = rest.find([',', '}'])?;
    rest[..end].trim().parse().ok()
}

/// "met" or "NOT met", for the summaries' target lines.
pub fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "NOT met"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_is_read_from_criterions_estimates() {
        let json = r#"{"mean":{"confidence_interval":{"confidence_level":0.95,"lower_bound":1.0,"upper_bound":3.0},"point_estimate":2.0,"standard_error":0.1},"median":{"confidence_interval":{"confidence_level":0.95,"lower_bound":4.0,"upper_bound":6.0},"point_estimate":5.5,"standard_error":0.2}}"#;
        assert_eq!(parse_median(json), Some(5.5));
        assert_eq!(parse_median(r#"{"mean":{"point_estimate":2.0}}"#), None);
    }

    #[test]
    fn a_zeroed_file_has_the_size_asked_for() {
        let dir = std::env::temp_dir().join(format!("tt-benchutil-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        let f = zeroed_file(&path, (3 << 20) + 4096);
        assert_eq!(f.metadata().unwrap().len(), (3 << 20) + 4096);
        let mut buf = [1u8; 4096];
        f.read_exact_at(&mut buf, 3 << 20).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
