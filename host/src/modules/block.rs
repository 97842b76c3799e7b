//! Block devices: BLOCK_WRITE and BLOCK_READ over a [`BlockBackend`].
//!
//! A request is served only if it names a block device, starts at a
//! block-aligned offset, covers a whole, non-zero number of blocks, and ends
//! inside the device; otherwise the guest gets `EINVAL`. A host I/O error
//! gives `EUNSPEC`.

use super::kind::{Attached, DeviceError, DeviceKind, Given, OptionSpec};
use super::{check_range, read_arg, Action, GuestError, Module, CHUNK};
use crate::abi::{layout, ret, Hypercall};
use crate::loader::manifest::DeviceInfo;
use crate::resources::Unikernel;
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
        "block device '{name}': Block size must be a multiple of 2 greater than or equal 512: \
         sector size {size} must be a power of two from 512 to 32768"
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
    #[error(
        "the block devices grew while tt-host started: {admitted_mb} MB admitted, {now_mb} MB now"
    )]
    Grew { admitted_mb: u64, now_mb: u64 },
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

/// The block device kind: `--block:NAME=PATH` and
/// `--block-sector-size:NAME=BYTES`, as solo5-hvt's block module.
pub struct BlockKind;

/// The block device kind, as registered in [`super::kind::kinds`].
pub static KIND: BlockKind = BlockKind;

impl BlockKind {
    fn path<'a>(d: &Given<'a>) -> &'a Path {
        // match_devices checked that every declared device is given.
        Path::new(d.option("block").unwrap_or_default())
    }

    fn sector_size(d: &Given) -> u64 {
        d.option("block-sector-size")
            .and_then(|s| s.parse().ok())
            .unwrap_or(512)
    }
}

impl DeviceKind for BlockKind {
    fn name(&self) -> &'static str {
        "block"
    }

    fn mft_type(&self) -> u32 {
        crate::abi::MFT_DEV_BLOCK_BASIC
    }

    fn options(&self) -> &'static [OptionSpec] {
        &[
            OptionSpec {
                name: "block",
                value: "PATH",
                default_for_all: false,
                help: "attach the file or block device at PATH as\n\
                       the manifest's block device NAME",
            },
            OptionSpec {
                name: "block-sector-size",
                value: "BYTES",
                default_for_all: false,
                help: "sector (block) size of block device NAME: a\n\
                       power of two from 512 to 32768 (default 512);\n\
                       the file size must be a multiple of it",
            },
        ]
    }

    fn check(&self, option: &str, value: &str) -> Result<(), String> {
        if option == "block-sector-size" && value.parse::<u64>().is_err() {
            return Err("not a number of bytes".into());
        }
        Ok(())
    }

    fn resources(&self, devices: &[Given], uk: &mut Unikernel) -> Result<(), DeviceError> {
        let mut bytes = 0u64;
        for d in devices {
            let path = Self::path(d);
            let size = backing_size(path).map_err(|err| BlockError::Open {
                name: d.name.into(),
                path: path.display().to_string(),
                err,
            })?;
            bytes = bytes.saturating_add(size);
        }
        uk.block_mb = uk.block_mb.saturating_add(bytes.div_ceil(1 << 20));
        Ok(())
    }

    fn attach(&self, devices: &[Given], admitted: &Unikernel) -> Result<Attached, DeviceError> {
        let mut opened = Vec::new();
        for d in devices {
            let dev =
                BlockDevice::open_file(d.name, d.handle, Self::path(d), Self::sector_size(d))?;
            opened.push(dev);
        }
        check_block_growth(admitted.block_mb, &opened)?;
        let info = opened
            .iter()
            .map(|b| {
                let info = DeviceInfo::Block {
                    capacity: b.backend.capacity(),
                    block_size: b.block_size as u16,
                };
                (b.handle, info)
            })
            .collect();
        Ok(Attached {
            info,
            module: Box::new(Block::new(opened)),
        })
    }
}

/// Size in bytes of the regular file or block device at `path` (whatever
/// else it is gives an error, not a size or a hang).
fn backing_size(path: &Path) -> std::io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut file = crate::launch::open_checked(path, FileBackend::check_type)?;
    file.seek(SeekFrom::End(0))
}

/// The block devices were sized for admission before they were opened:
/// refuse to run if they have grown since (the guest would get more disk
/// than was admitted).
fn check_block_growth(admitted_mb: u64, blocks: &[BlockDevice]) -> Result<(), BlockError> {
    let bytes = blocks
        .iter()
        .fold(0u64, |sum, b| sum.saturating_add(b.backend.capacity()));
    let now_mb = bytes.div_ceil(1 << 20);
    if now_mb > admitted_mb {
        return Err(BlockError::Grew {
            admitted_mb,
            now_mb,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Sized(u64);

    impl BlockBackend for Sized {
        fn capacity(&self) -> u64 {
            self.0
        }
        fn read_at(&mut self, _: &mut [u8], _: u64) -> std::io::Result<()> {
            Ok(())
        }
        fn write_at(&mut self, _: &[u8], _: u64) -> std::io::Result<()> {
            Ok(())
        }
        fn sync(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn block_devices_that_grew_after_admission_are_refused() {
        let dev = |name: &str, bytes| BlockDevice {
            name: name.into(),
            handle: 1,
            block_size: 512,
            backend: Box::new(Sized(bytes)),
        };
        // 1.5 MiB + 1 MiB: admitted as their sum rounded up, 3 MB, as
        // BlockKind::resources computes it.
        let blocks = [dev("a", 3 << 19), dev("b", 1 << 20)];
        assert!(check_block_growth(3, &blocks).is_ok());
        let e = check_block_growth(2, &blocks).unwrap_err();
        assert!(e.to_string().contains("2 MB admitted, 3 MB now"), "{e}");
        assert!(check_block_growth(0, &[]).is_ok());
    }
}
