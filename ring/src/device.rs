//! Block devices the ring lives on.
//!
//! A [`BlockDevice`] is a fixed-size array of sectors with positioned reads
//! and writes and a `sync` that makes every completed write durable. The
//! ring only ever writes whole, sector-aligned ranges. Three kinds:
//! [`FileDevice`] (a file or block device; `pread`/`pwrite`/`fdatasync`,
//! optionally `O_DIRECT`), [`MemDevice`] (memory, for tests and benches), and
//! [`FaultyDevice`] (memory with injected failures and simulated crashes).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// A device of `size()` bytes in `sector_size()`-byte sectors.
///
/// Methods take `&self` so that a producer and a consumer in one process
/// can share a device (`Arc<D>` implements the trait too).
pub trait BlockDevice {
    /// Sector size in bytes: a power of two, at least 512.
    fn sector_size(&self) -> u32;
    /// Size in bytes: a multiple of the sector size.
    fn size(&self) -> u64;
    /// Fill `buf` from `offset`. Callers pass sector-aligned ranges.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Write `buf` at `offset`; not durable until [`sync`](Self::sync).
    /// Callers pass sector-aligned ranges.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Make every write that completed before this call durable.
    fn sync(&self) -> io::Result<()>;
}

macro_rules! forward {
    ($($t:ty),*) => {$(
        impl<D: BlockDevice + ?Sized> BlockDevice for $t {
            fn sector_size(&self) -> u32 {
                (**self).sector_size()
            }
            fn size(&self) -> u64 {
                (**self).size()
            }
            fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
                (**self).read_at(buf, offset)
            }
            fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
                (**self).write_at(buf, offset)
            }
            fn sync(&self) -> io::Result<()> {
                (**self).sync()
            }
        }
    )*};
}

forward!(Arc<D>, &D);

fn out_of_range(offset: u64, len: usize, size: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("access {offset:#x}+{len:#x} is outside the device ({size:#x} bytes)"),
    )
}

fn check(offset: u64, len: usize, size: u64) -> io::Result<()> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= size => Ok(()),
        _ => Err(out_of_range(offset, len, size)),
    }
}

/// A file (or block device) accessed with `pread`/`pwrite`; `sync` is
/// `fdatasync`.
pub struct FileDevice {
    file: File,
    size: u64,
    sector: u32,
    direct: bool,
}

/// Alignment of O_DIRECT bounce buffers.
const DIRECT_ALIGN: usize = 4096;

impl FileDevice {
    /// Open an existing file read-write. Its size is taken as the device
    /// size, rounded down to whole sectors.
    pub fn open(path: &Path, sector_size: u32) -> io::Result<FileDevice> {
        Self::open_with(path, sector_size, false)
    }

    /// Open with `O_DIRECT` (bypassing the page cache): every transfer goes
    /// through an aligned bounce buffer, and `sector_size` should be at
    /// least the device's logical block size.
    pub fn open_direct(path: &Path, sector_size: u32) -> io::Result<FileDevice> {
        Self::open_with(path, sector_size, true)
    }

    fn open_with(path: &Path, sector: u32, direct: bool) -> io::Result<FileDevice> {
        if !sector.is_power_of_two() || sector < 512 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("sector size {sector} is not a power of two >= 512"),
            ));
        }
        let mut opts = OpenOptions::new();
        opts.read(true).write(true);
        if direct {
            opts.custom_flags(libc::O_DIRECT);
        }
        let file = opts.open(path)?;
        let len = std::io::Seek::seek(&mut &file, std::io::SeekFrom::End(0))?;
        Ok(FileDevice {
            file,
            size: len / sector as u64 * sector as u64,
            sector,
            direct,
        })
    }

    /// Create (or truncate) a file of `size` bytes, filled with zeros and
    /// synced, and open it.
    ///
    /// The zeros are written, not left as a hole or a preallocated extent:
    /// then every later write overwrites allocated, initialized blocks and
    /// its `fdatasync` flushes data only, with no block allocation or
    /// extent conversion to journal (PostgreSQL zero-fills new WAL
    /// segments for the same reason). They are written 1 MiB at a time:
    /// on ext4 a file filled with one huge write made later 256 KiB
    /// commits about 50% slower (larger page-cache folios). The directory
    /// entry is synced too, so the file survives a crash.
    pub fn create(path: &Path, size: u64, sector_size: u32) -> io::Result<FileDevice> {
        let f = File::create(path)?;
        let chunk = vec![0u8; 1 << 20];
        let mut off = 0;
        while off < size {
            let n = (size - off).min(chunk.len() as u64) as usize;
            f.write_all_at(&chunk[..n], off)?;
            off += n as u64;
        }
        f.sync_all()?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        File::open(dir)?.sync_all()?;
        Self::open(path, sector_size)
    }
}

/// A heap buffer aligned for O_DIRECT.
struct Aligned {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let layout =
            std::alloc::Layout::from_size_align(len.max(1), DIRECT_ALIGN).expect("valid layout");
        // SAFETY: layout has non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        Aligned { ptr, layout }
    }
    fn as_mut(&mut self, len: usize) -> &mut [u8] {
        assert!(len <= self.layout.size());
        // SAFETY: ptr is a live allocation of layout.size() >= len bytes,
        // exclusively borrowed through &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, len) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: ptr was allocated with this layout in Aligned::new.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

impl BlockDevice for FileDevice {
    fn sector_size(&self) -> u32 {
        self.sector
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check(offset, buf.len(), self.size)?;
        if self.direct {
            let mut b = Aligned::new(buf.len());
            self.file.read_exact_at(b.as_mut(buf.len()), offset)?;
            buf.copy_from_slice(b.as_mut(buf.len()));
            Ok(())
        } else {
            self.file.read_exact_at(buf, offset)
        }
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        check(offset, buf.len(), self.size)?;
        if self.direct {
            let mut b = Aligned::new(buf.len());
            b.as_mut(buf.len()).copy_from_slice(buf);
            self.file.write_all_at(b.as_mut(buf.len()), offset)
        } else {
            self.file.write_all_at(buf, offset)
        }
    }
    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

/// A device in memory; `sync` does nothing (nothing is lost on a crash).
pub struct MemDevice {
    data: Mutex<Vec<u8>>,
    sector: u32,
}

impl MemDevice {
    /// A zero-filled device of `size` bytes (rounded down to sectors).
    pub fn new(size: u64, sector_size: u32) -> MemDevice {
        assert!(sector_size.is_power_of_two() && sector_size >= 512);
        let size = size / sector_size as u64 * sector_size as u64;
        MemDevice {
            data: Mutex::new(vec![0; size as usize]),
            sector: sector_size,
        }
    }
    /// A device holding `bytes` (truncated to whole sectors).
    pub fn from_bytes(mut bytes: Vec<u8>, sector_size: u32) -> MemDevice {
        let size = bytes.len() / sector_size as usize * sector_size as usize;
        bytes.truncate(size);
        MemDevice {
            data: Mutex::new(bytes),
            sector: sector_size,
        }
    }
    /// A copy of the contents.
    pub fn contents(&self) -> Vec<u8> {
        self.data.lock().unwrap().clone()
    }
}

impl BlockDevice for MemDevice {
    fn sector_size(&self) -> u32 {
        self.sector
    }
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let d = self.data.lock().unwrap();
        check(offset, buf.len(), d.len() as u64)?;
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut d = self.data.lock().unwrap();
        check(offset, buf.len(), d.len() as u64)?;
        d[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
}

/// What a [`FaultyDevice`] does wrong, counted from its creation or the
/// last [`FaultyDevice::crash`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Faults {
    /// Fail the Nth write (0-based) with an I/O error, writing nothing.
    pub fail_write: Option<u64>,
    /// Fail the Nth sync (0-based) with an I/O error, making nothing durable.
    pub fail_sync: Option<u64>,
    /// Tear the Nth write: only its first `sectors` sectors reach the device,
    /// then the device "crashes": it fails every later call until
    /// [`FaultyDevice::crash`] is called.
    pub tear_write: Option<(u64, u64)>,
    /// Crash (fail every call until [`FaultyDevice::crash`]) just before
    /// the Nth write.
    pub crash_before_write: Option<u64>,
}

#[derive(Default)]
struct FaultState {
    durable: Vec<u8>,
    volatile: Vec<u8>,
    writes: u64,
    syncs: u64,
    dead: bool,
    faults: Faults,
}

/// A memory device that models a disk with a volatile write cache:
/// writes land in the cache, `sync` makes them durable, and
/// [`crash`](Self::crash) throws away whatever was not synced. Faults are
/// injected as configured by [`Faults`].
pub struct FaultyDevice {
    st: Mutex<FaultState>,
    sector: u32,
}

fn dead() -> io::Error {
    io::Error::other("device crashed (simulated)")
}

impl FaultyDevice {
    pub fn new(size: u64, sector_size: u32) -> FaultyDevice {
        assert!(sector_size.is_power_of_two() && sector_size >= 512);
        let size = (size / sector_size as u64 * sector_size as u64) as usize;
        FaultyDevice {
            st: Mutex::new(FaultState {
                durable: vec![0; size],
                volatile: vec![0; size],
                ..FaultState::default()
            }),
            sector: sector_size,
        }
    }

    /// Set the faults to inject from now on (counters restart at 0).
    pub fn set_faults(&self, faults: Faults) {
        let mut s = self.st.lock().unwrap();
        s.faults = faults;
        s.writes = 0;
        s.syncs = 0;
    }

    /// Simulate power loss and reboot: unsynced writes are lost, faults are
    /// cleared, and the device works again.
    pub fn crash(&self) {
        let mut s = self.st.lock().unwrap();
        s.volatile = s.durable.clone();
        s.dead = false;
        s.faults = Faults::default();
        s.writes = 0;
        s.syncs = 0;
    }

    /// Simulate power loss in which the sectors written since the last
    /// successful sync reach the device or not, as `survives` says for
    /// each (by sector index): a disk's write cache may persist any subset
    /// of what it holds, in any order. Then reboot, as [`crash`](Self::crash).
    pub fn crash_keeping(&self, survives: impl Fn(u64) -> bool) {
        let mut s = self.st.lock().unwrap();
        let ss = self.sector as usize;
        for i in 0..s.volatile.len() / ss {
            let r = i * ss..(i + 1) * ss;
            if s.volatile[r.clone()] != s.durable[r.clone()] && survives(i as u64) {
                let v = s.volatile[r.clone()].to_vec();
                s.durable[r].copy_from_slice(&v);
            }
        }
        drop(s);
        self.crash();
    }

    /// Indices of the sectors whose contents are written but not durable.
    pub fn unsynced_sectors(&self) -> Vec<u64> {
        let s = self.st.lock().unwrap();
        let ss = self.sector as usize;
        (0..s.volatile.len() / ss)
            .filter(|&i| s.volatile[i * ss..(i + 1) * ss] != s.durable[i * ss..(i + 1) * ss])
            .map(|i| i as u64)
            .collect()
    }

    /// Number of writes since the last `set_faults` or `crash`.
    pub fn writes(&self) -> u64 {
        self.st.lock().unwrap().writes
    }

    /// Is the device in its crashed state (failing every call)?
    pub fn is_dead(&self) -> bool {
        self.st.lock().unwrap().dead
    }
}

impl BlockDevice for FaultyDevice {
    fn sector_size(&self) -> u32 {
        self.sector
    }
    fn size(&self) -> u64 {
        self.st.lock().unwrap().volatile.len() as u64
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let s = self.st.lock().unwrap();
        if s.dead {
            return Err(dead());
        }
        check(offset, buf.len(), s.volatile.len() as u64)?;
        buf.copy_from_slice(&s.volatile[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut s = self.st.lock().unwrap();
        if s.dead {
            return Err(dead());
        }
        check(offset, buf.len(), s.volatile.len() as u64)?;
        let n = s.writes;
        s.writes += 1;
        if s.faults.crash_before_write == Some(n) {
            s.dead = true;
            return Err(dead());
        }
        if s.faults.fail_write == Some(n) {
            return Err(io::Error::other("injected write failure"));
        }
        let mut len = buf.len();
        if let Some((at, sectors)) = s.faults.tear_write {
            if at == n {
                len = len.min((sectors * self.sector as u64) as usize);
                s.dead = true;
            }
        }
        let o = offset as usize;
        s.volatile[o..o + len].copy_from_slice(&buf[..len]);
        if s.dead {
            return Err(dead());
        }
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        let mut s = self.st.lock().unwrap();
        if s.dead {
            return Err(dead());
        }
        let n = s.syncs;
        s.syncs += 1;
        if s.faults.fail_sync == Some(n) {
            return Err(io::Error::other("injected sync failure"));
        }
        s.durable = s.volatile.clone();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faulty_device_loses_unsynced_writes_on_crash() {
        let d = FaultyDevice::new(4096, 512);
        d.write_at(&[1; 512], 0).unwrap();
        d.sync().unwrap();
        d.write_at(&[2; 512], 512).unwrap();
        d.crash();
        let mut b = [0u8; 1024];
        d.read_at(&mut b, 0).unwrap();
        assert!(b[..512].iter().all(|&x| x == 1));
        assert!(b[512..].iter().all(|&x| x == 0));
    }

    #[test]
    fn faulty_device_tears_at_a_sector_boundary() {
        let d = FaultyDevice::new(4096, 512);
        d.set_faults(Faults {
            tear_write: Some((0, 1)),
            ..Faults::default()
        });
        assert!(d.write_at(&[3; 1024], 0).is_err());
        assert!(d.read_at(&mut [0; 512], 0).is_err(), "dead until crash()");
        d.crash();
        let mut b = [0u8; 1024];
        d.read_at(&mut b, 0).unwrap();
        assert!(b.iter().all(|&x| x == 0), "nothing was synced");
    }

    #[test]
    fn failed_sync_makes_nothing_durable() {
        let d = FaultyDevice::new(4096, 512);
        d.set_faults(Faults {
            fail_sync: Some(0),
            ..Faults::default()
        });
        d.write_at(&[4; 512], 0).unwrap();
        assert!(d.sync().is_err());
        d.crash();
        let mut b = [0u8; 512];
        d.read_at(&mut b, 0).unwrap();
        assert_eq!(b, [0; 512]);
    }

    #[test]
    fn a_created_file_device_is_allocated_not_sparse() {
        use std::os::unix::fs::MetadataExt;
        let dir = std::env::temp_dir().join(format!("tt-ring-alloc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("dev");
        let size = (3 << 20) + 8192;
        let d = FileDevice::create(&p, size, 4096).unwrap();
        assert_eq!(d.size(), size);
        let m = std::fs::metadata(&p).unwrap();
        assert_eq!(m.len(), size);
        // st_blocks counts the 512-byte units allocated: after a plain
        // set_len (a hole) it would be 0.
        assert!(
            m.blocks() * 512 >= size,
            "{} of {size} bytes allocated",
            m.blocks() * 512
        );
        let mut b = vec![1u8; 8192];
        d.read_at(&mut b, 3 << 20).unwrap();
        assert!(b.iter().all(|&x| x == 0));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn file_device_round_trips_with_and_without_o_direct() {
        let dir = std::env::temp_dir().join(format!("tt-ring-dev-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("dev");
        let d = FileDevice::create(&p, 1 << 20, 4096).unwrap();
        d.write_at(&[7; 4096], 8192).unwrap();
        d.sync().unwrap();
        drop(d);
        for direct in [false, true] {
            let d = if direct {
                match FileDevice::open_direct(&p, 4096) {
                    Ok(d) => d,
                    // tmpfs has no O_DIRECT; nothing to test there.
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => continue,
                    Err(e) => panic!("{e}"),
                }
            } else {
                FileDevice::open(&p, 4096).unwrap()
            };
            let mut b = vec![0u8; 4096];
            d.read_at(&mut b, 8192).unwrap();
            assert!(b.iter().all(|&x| x == 7));
            assert!(d.read_at(&mut b, 1 << 20).is_err());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
