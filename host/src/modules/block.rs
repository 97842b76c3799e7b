//! Block devices: BLOCK_WRITE and BLOCK_READ over a [`BlockBackend`].
//!
//! A request is served only if it names a block device, starts at a
//! block-aligned offset, covers a whole, non-zero number of blocks, and ends
//! inside the device; otherwise the guest gets `EINVAL`. A host I/O error
//! gives `EUNSPEC`.

use super::{check_range, read_arg, Action, GuestError, Module, CHUNK};
use crate::abi::{layout, ret, Hypercall};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Storage behind a guest block device.
pub trait BlockBackend {
    /// Size in bytes.
    fn capacity(&self) -> u64;
    /// Fill `buf` from `offset` (inside capacity).
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
    /// Write `buf` at `offset` (inside capacity).
    fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()>;
    /// Make every completed write durable.
    fn sync(&mut self) -> std::io::Result<()>;
}

/// Why a block device could not be attached.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("block device '{name}': cannot open {path}: {err}")]
    Open {
        name: String,
        path: String,
        err: std::io::Error,
    },
    #[error(
        "block device '{name}': sector size {size} must be a power of two >= 512 (and <= 32768)"
    )]
    SectorSize { name: String, size: u64 },
    #[error(
        "block device '{name}': Backing storage size must be block aligned: {path} is {len} \
         bytes, not a whole number of {size}-byte sectors"
    )]
    NotMultiple {
        name: String,
        path: String,
        len: u64,
        size: u64,
    },
    #[error(
        "block device '{name}': {path} is empty; it must hold at least one {size}-byte sector"
    )]
    Empty {
        name: String,
        path: String,
        size: u64,
    },
}

/// A plain read-write file.
pub struct FileBackend {
    file: File,
    capacity: u64,
}

impl FileBackend {
    /// Can a file with metadata `meta` back a block device: is it a regular
    /// file or a block device? The error says what it is instead. Check a
    /// path's `stat` with this before opening it: opening a FIFO blocks.
    pub fn check_type(meta: &std::fs::Metadata) -> std::io::Result<()> {
        use std::os::unix::fs::FileTypeExt;
        let t = meta.file_type();
        if t.is_file() || t.is_block_device() {
            return Ok(());
        }
        let what = if t.is_dir() {
            "a directory, "
        } else if t.is_fifo() {
            "a FIFO, "
        } else if t.is_char_device() {
            "a character device, "
        } else if t.is_socket() {
            "a socket, "
        } else {
            ""
        };
        Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{what}not a regular file or block device"),
        ))
    }

    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)?;
        Self::check_type(&file.metadata()?)?;
        let capacity = std::io::Seek::seek(&mut &file, std::io::SeekFrom::End(0))?;
        Ok(FileBackend { file, capacity })
    }
}

impl BlockBackend for FileBackend {
    fn capacity(&self) -> u64 {
        self.capacity
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.file.write_all_at(buf, offset)
    }
    fn sync(&mut self) -> std::io::Result<()> {
        self.file.sync_data()
    }
}

/// One attached block device.
pub struct BlockDevice {
    /// The name the manifest gives it, for messages.
    pub name: String,
    pub handle: u64,
    pub block_size: u64,
    pub backend: Box<dyn BlockBackend>,
}

impl BlockDevice {
    /// Attach the file at `path` as device `name` with `block_size`-byte
    /// sectors, checking the sector size and the file size.
    pub fn open_file(
        name: &str,
        handle: u64,
        path: &Path,
        block_size: u64,
    ) -> Result<Self, BlockError> {
        if !block_size.is_power_of_two() || !(512..=32768).contains(&block_size) {
            return Err(BlockError::SectorSize {
                name: name.into(),
                size: block_size,
            });
        }
        let backend = FileBackend::open(path).map_err(|err| BlockError::Open {
            name: name.into(),
            path: path.display().to_string(),
            err,
        })?;
        let len = backend.capacity();
        if len == 0 {
            return Err(BlockError::Empty {
                name: name.into(),
                path: path.display().to_string(),
                size: block_size,
            });
        }
        if len % block_size != 0 {
            return Err(BlockError::NotMultiple {
                name: name.into(),
                path: path.display().to_string(),
                len,
                size: block_size,
            });
        }
        Ok(BlockDevice {
            name: name.into(),
            handle,
            block_size,
            backend: Box::new(backend),
        })
    }

    /// Is `[offset, offset+len)` a whole number of blocks inside the device?
    fn valid(&self, offset: u64, len: u64) -> bool {
        len > 0
            && offset % self.block_size == 0
            && len % self.block_size == 0
            && offset
                .checked_add(len)
                .is_some_and(|end| end <= self.backend.capacity())
    }
}

/// The block module: all attached block devices.
pub struct Block {
    devices: Vec<BlockDevice>,
}

impl Block {
    pub fn new(devices: Vec<BlockDevice>) -> Self {
        Block { devices }
    }

    fn transfer(
        &mut self,
        write: bool,
        arg: u64,
        mem: &GuestMemoryMmap,
    ) -> Result<Action, GuestError> {
        let a = read_arg::<{ layout::BLOCK_SIZE }>(mem, arg)?;
        let (handle, offset, data, len) = (a.u64(0), a.u64(8), a.u64(16), a.u64(24));
        let Some(dev) = self.devices.iter_mut().find(|d| d.handle == handle) else {
            a.set_i32(mem, 32, ret::EINVAL);
            return Ok(Action::Continue);
        };
        if !dev.valid(offset, len) {
            a.set_i32(mem, 32, ret::EINVAL);
            return Ok(Action::Continue);
        }
        check_range(mem, "block buffer", data, len)?;
        let mut buf = vec![0u8; (len as usize).min(CHUNK)];
        let mut done = 0u64;
        let mut result = ret::OK;
        while done < len {
            let n = ((len - done) as usize).min(CHUNK);
            let (g, o) = (GuestAddress(data + done), offset + done);
            let io = if write {
                let _ = mem.read_slice(&mut buf[..n], g);
                dev.backend.write_at(&buf[..n], o)
            } else {
                dev.backend.read_at(&mut buf[..n], o).map(|()| {
                    let _ = mem.write_slice(&buf[..n], g);
                })
            };
            if io.is_err() {
                result = ret::EUNSPEC;
                break;
            }
            done += n as u64;
        }
        a.set_i32(mem, 32, result);
        Ok(Action::Continue)
    }
}

impl Module for Block {
    fn name(&self) -> &'static str {
        "block"
    }

    fn hypercalls(&self) -> &'static [Hypercall] {
        &[Hypercall::BlockWrite, Hypercall::BlockRead]
    }

    fn handle(
        &mut self,
        call: Hypercall,
        arg: u64,
        mem: &GuestMemoryMmap,
    ) -> Result<Action, GuestError> {
        self.transfer(call == Hypercall::BlockWrite, arg, mem)
    }

    fn shutdown(&mut self) -> Result<(), String> {
        // Flush every device, even after one failed.
        let failed: Vec<String> = self
            .devices
            .iter_mut()
            .filter_map(|d| {
                d.backend.sync().err().map(|e| {
                    format!(
                        "block device '{}' could not be flushed ({e}): what the guest \
                         wrote may not be on disk",
                        d.name
                    )
                })
            })
            .collect();
        if failed.is_empty() {
            Ok(())
        } else {
            Err(failed.join("; "))
        }
    }
}
