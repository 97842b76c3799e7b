//! Block devices: the hvt BLOCK_WRITE and BLOCK_READ hypercalls, a thin
//! adapter over the block layer ([`crate::block`]).
//!
//! A request is decoded from its argument struct and checked by the block
//! layer's one validation ([`crate::block::Geometry::span`]): it must name
//! a block device, start at a sector-aligned offset, cover a whole,
//! non-zero number of sectors and end inside the device; otherwise the
//! guest gets `EINVAL` and nothing is read or written. A buffer outside
//! guest memory, or a BLOCK_READ buffer (or an argument struct) where the
//! guest may not write itself ([`super::check_writable`]), stops the guest. The request is then served by the
//! device's [`Backend`] with one request in flight (one vCPU, one
//! hypercall): with the journal (`--block-durability=journal`, the
//! default) a write returns only once it is durable; with `none` it is in
//! the page cache, as under solo5-hvt. A host I/O or journal error gives
//! `EUNSPEC`, reported once per device on stderr.
//!
//! Long requests are served in pieces, so the host copies a bounded amount
//! of guest data at a time: a write in pieces of the backend's largest
//! all-or-nothing write (a journal record, at most 8 MiB), at least 1 MiB;
//! a read in pieces of 1 MiB.

use super::kind::{Attached, Context, DeviceError, DeviceKind, Given, OptionSpec};
use super::{
    check_range, check_writable, read_args_mut, set_out, Action, GuestError, GuestMem, Module,
    CHUNK,
};
use crate::abi::{ret, HcBlockRead, HcBlockWrite, Hypercall};
use crate::block::home::{self, HomeError, JournalOptions};
use crate::block::{Backend, Request};
use crate::loader::manifest::DeviceInfo;
use crate::resources::Unikernel;
use std::os::fd::RawFd;
use std::path::Path;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

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
    #[error("block device '{name}': '{value}' {why}")]
    BadImage {
        name: String,
        value: String,
        why: String,
    },
    #[error(
        "the block devices grew while tt-host started: {admitted_mb} MB admitted, {now_mb} MB now"
    )]
    Grew { admitted_mb: u64, now_mb: u64 },
    #[error("block device '{name}': {source}")]
    Home {
        name: String,
        #[source]
        source: HomeError,
    },
}

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

/// One attached block device.
pub struct BlockDevice {
    /// Its index in the manifest.
    pub handle: u64,
    backend: Box<dyn Backend>,
    /// An error was reported (once per device: a guest may retry).
    reported: bool,
}

impl BlockDevice {
    /// Device `handle`, served by `backend` (its [`crate::block::Info`]
    /// names the device and gives its geometry).
    pub fn new(handle: u64, backend: Box<dyn Backend>) -> Self {
        BlockDevice {
            handle,
            backend,
            reported: false,
        }
    }

    /// The device's name, for messages.
    pub fn name(&self) -> &str {
        &self.backend.info().name
    }

    /// Size in bytes.
    pub fn capacity(&self) -> u64 {
        self.backend.info().geometry.capacity
    }

    /// Sector size in bytes.
    pub fn sector_size(&self) -> u64 {
        self.backend.info().geometry.sector_size
    }

    /// Tell the operator about an error the guest gets as EUNSPEC, the
    /// first time only.
    fn report(&mut self, err: &crate::block::Error) {
        if !std::mem::replace(&mut self.reported, true) {
            eprintln!(
                "tt-host: {err} (the guest gets an error; further errors of this device are \
                 not reported)"
            );
        }
    }

    /// Serve one BLOCK_WRITE (`write`) or BLOCK_READ of `len` bytes at
    /// byte `offset` of the device, from or into guest memory at `data`:
    /// the hvt `ret` code, or a bad address.
    fn transfer(
        &mut self,
        write: bool,
        offset: u64,
        data: u64,
        len: u64,
        mem: &GuestMem,
    ) -> Result<i32, GuestError> {
        let info = self.backend.info();
        let geometry = info.geometry;
        if geometry.span(offset, len).is_err() {
            return Ok(ret::EINVAL);
        }
        if write {
            check_range(mem, "block buffer", data, len)?;
        } else {
            // The host fills it: only where the guest could write itself.
            check_writable(mem, "block buffer", data, len)?;
        }
        let sector = geometry.sector_size;
        let piece = if write {
            info.max_atomic_write.max(CHUNK as u64)
        } else {
            CHUNK as u64
        };
        let piece = (piece / sector).max(1) * sector;
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(piece);
            let at = GuestAddress(data + done);
            if !write {
                // Straight from the backend into guest memory.
                let (Ok(span), Ok(slice)) = (
                    geometry.span(offset + done, n),
                    mem.get_slice(at, n as usize),
                ) else {
                    return Ok(ret::EINVAL);
                };
                if let Err(e) = self.backend.read_into(span, &[slice]) {
                    self.report(&e);
                    return Ok(ret::EUNSPEC);
                }
                done += n;
                continue;
            }
            let mut buf = vec![0u8; n as usize];
            let _ = mem.read_slice(&mut buf, at);
            let request = Request::write(&geometry, offset + done, buf);
            // Checked above: every piece is a valid request.
            let Ok(request) = request else {
                return Ok(ret::EINVAL);
            };
            match self.backend.execute(request) {
                Ok(_) => {}
                Err(e) => {
                    self.report(&e);
                    return Ok(ret::EUNSPEC);
                }
            }
            done += n;
        }
        Ok(ret::OK)
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

    fn device(&mut self, handle: u64) -> Option<&mut BlockDevice> {
        self.devices.iter_mut().find(|d| d.handle == handle)
    }
}

impl Module for Block {
    fn name(&self) -> &'static str {
        "block"
    }

    fn hypercalls(&self) -> &'static [Hypercall] {
        &[Hypercall::BlockWrite, Hypercall::BlockRead]
    }

    fn handle(&mut self, call: Hypercall, arg: u64, mem: &GuestMem) -> Result<Action, GuestError> {
        if call == Hypercall::BlockWrite {
            let (a, at) = read_args_mut::<HcBlockWrite>(mem, arg)?;
            let r = match self.device(a.handle) {
                Some(d) => d.transfer(true, a.offset, a.data, a.len, mem)?,
                None => ret::EINVAL,
            };
            if r == ret::OK {
                crate::runfile::stats::counters().block_write(a.len);
            }
            set_out!(mem, at, HcBlockWrite.ret = r);
        } else {
            let (a, at) = read_args_mut::<HcBlockRead>(mem, arg)?;
            let r = match self.device(a.handle) {
                Some(d) => d.transfer(false, a.offset, a.data, a.len, mem)?,
                None => ret::EINVAL,
            };
            if r == ret::OK {
                crate::runfile::stats::counters().block_read(a.len);
            }
            set_out!(mem, at, HcBlockRead.ret = r);
        }
        Ok(Action::Continue)
    }

    fn quiesce(&mut self) -> Result<(), String> {
        for d in &mut self.devices {
            d.backend.quiesce().map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    fn disks(&self) -> Result<Vec<crate::snapshot::DiskIdentity>, String> {
        let mut out = Vec::new();
        for d in &self.devices {
            if let Some(f) = d.backend.image_file() {
                let id = crate::snapshot::disk_identity(d.name(), f).map_err(|e| {
                    format!("block device '{}': cannot read its image: {e}", d.name())
                })?;
                out.push(id);
            }
        }
        Ok(out)
    }

    fn suspend(&mut self) -> Result<(), String> {
        for d in &mut self.devices {
            d.backend.suspend().map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    fn resume(&mut self) -> Result<(), String> {
        for d in &mut self.devices {
            d.backend.resume().map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    fn lock_fds(&self) -> Vec<std::os::fd::RawFd> {
        self.devices
            .iter()
            .flat_map(|d| d.backend.lock_fds())
            .collect()
    }

    fn shutdown(&mut self) -> Result<(), String> {
        // Drain and flush every device, even after one failed.
        let failed: Vec<String> = self
            .devices
            .iter_mut()
            .filter_map(|d| {
                d.backend
                    .shutdown()
                    .err()
                    .map(|e| format!("{e}: what the guest wrote may not be on its image"))
            })
            .collect();
        if failed.is_empty() {
            Ok(())
        } else {
            Err(failed.join("; "))
        }
    }
}

/// The block device kind: solo5-hvt's `--block:NAME=PATH` and
/// `--block-sector-size:NAME=BYTES`, and tt-host's durability options.
pub struct BlockKind;

/// The block device kind, as registered in [`super::kind::kinds`].
pub static KIND: BlockKind = BlockKind;

/// How a device's writes are acknowledged (`--block-durability`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Once durable in the image's journal (the default).
    Journal,
    /// Once written to the image (in the page cache), as solo5-hvt does.
    None,
}

impl Durability {
    fn parse(s: &str) -> Result<Durability, String> {
        match s {
            "journal" => Ok(Durability::Journal),
            "none" => Ok(Durability::None),
            _ => Err("expected 'journal' or 'none'".into()),
        }
    }
}

/// Smallest journal (`--block-journal`): room for a few records of the
/// largest sectors.
pub const MIN_JOURNAL: u64 = 1 << 20;
/// Largest journal.
pub const MAX_JOURNAL: u64 = 64 << 30;

/// Parse a journal size: bytes, or a number with a binary suffix `K`, `M`
/// or `G` (`KiB`, `MiB`, `GiB` also), a whole number of 4 KiB from 1 MiB
/// to 64 GiB.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(digits);
    let shift = match unit {
        "" => 0,
        "K" | "KiB" | "k" => 10,
        "M" | "MiB" => 20,
        "G" | "GiB" => 30,
        _ => return Err(format!("unknown unit '{unit}' (use K, M or G)")),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| "expected a size such as 64M or 1G".to_string())?;
    let bytes = n
        .checked_mul(1 << shift)
        .filter(|b| (MIN_JOURNAL..=MAX_JOURNAL).contains(b))
        .ok_or_else(|| "must be from 1M to 64G".to_string())?;
    if bytes % 4096 != 0 {
        return Err("must be a whole number of 4 KiB".into());
    }
    Ok(bytes)
}

/// A block device's image as `--block:NAME=` gives it: a path, or `@FD`,
/// a descriptor a launcher opened read-write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageArg<'a> {
    Path(&'a Path),
    Fd(RawFd),
}

impl<'a> ImageArg<'a> {
    /// `value` as an image: `@` and decimal digits is a descriptor (a
    /// file whose name starts with `@` is given as `./@...`).
    pub fn parse(value: &'a str) -> Result<ImageArg<'a>, String> {
        let Some(digits) = value.strip_prefix('@') else {
            return Ok(ImageArg::Path(Path::new(value)));
        };
        (!digits.is_empty() && digits.bytes().all(|c| c.is_ascii_digit()))
            .then(|| digits.parse().ok())
            .flatten()
            .map(ImageArg::Fd)
            .ok_or_else(|| {
                "not a file descriptor: use @FD with FD a decimal number, e.g. @3 (a file \
                 whose name starts with '@' is ./@...)"
                    .into()
            })
    }

    /// For messages: the path, or `fd N`.
    fn label(&self) -> String {
        match self {
            ImageArg::Path(p) => p.display().to_string(),
            ImageArg::Fd(fd) => format!("fd {fd}"),
        }
    }
}

impl BlockKind {
    fn image<'a>(d: &Given<'a>) -> Result<ImageArg<'a>, BlockError> {
        // match_devices checked that every declared device is given, and
        // the command line that its value parses.
        let value = d.option("block").unwrap_or_default();
        ImageArg::parse(value).map_err(|why| BlockError::BadImage {
            name: d.name.into(),
            value: value.into(),
            why,
        })
    }

    fn sector_size(d: &Given) -> u64 {
        d.option("block-sector-size")
            .and_then(crate::text::number)
            .unwrap_or(512)
    }

    fn durability(d: &Given) -> Durability {
        d.option("block-durability")
            .and_then(|s| Durability::parse(s).ok())
            .unwrap_or(Durability::Journal)
    }

    fn journal_size(d: &Given) -> u64 {
        d.option("block-journal")
            .and_then(|s| parse_size(s).ok())
            .unwrap_or(home::DEFAULT_RING_SIZE)
    }

    /// Check the sector size and the image's size as solo5-hvt checks
    /// them (with its messages, which scripts look for), before opening.
    fn check(d: &Given) -> Result<(), BlockError> {
        let (name, image, size) = (d.name, Self::image(d)?, Self::sector_size(d));
        if !size.is_power_of_two() || !(512..=32768).contains(&size) {
            return Err(BlockError::SectorSize {
                name: name.into(),
                size,
            });
        }
        let len = backing_size(name, image)?;
        if len == 0 {
            return Err(BlockError::Empty {
                name: name.into(),
                path: image.label(),
                size,
            });
        }
        if len % size != 0 {
            return Err(BlockError::NotMultiple {
                name: name.into(),
                path: image.label(),
                len,
                size,
            });
        }
        Ok(())
    }

    /// Open device `d` with its durability (its `--block` options): the
    /// backend of an hvt block device or a virtio-blk device.
    pub(crate) fn open(d: &Given, ctx: &Context) -> Result<Box<dyn Backend>, BlockError> {
        Self::check(d)?;
        let sector = Self::sector_size(d);
        let home_err = |source| BlockError::Home {
            name: d.name.into(),
            source,
        };
        let img = match Self::image(d)? {
            ImageArg::Path(path) => home::lock_image(path),
            ImageArg::Fd(fd) => home::lock_image_fd(fd),
        }
        .map_err(home_err)?;
        Ok(match Self::durability(d) {
            Durability::None => {
                Box::new(home::open_plain_locked(d.name, img, sector).map_err(home_err)?)
            }
            Durability::Journal => {
                let opts = JournalOptions {
                    ring_size: Self::journal_size(d),
                    ..JournalOptions::default()
                };
                let dir = ctx.state_dir.join("journals");
                Box::new(home::open_image(&dir, d.name, img, sector, &opts).map_err(home_err)?)
            }
        })
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
                value: "PATH|@FD",
                default_for_all: false,
                help: "attach the file or block device at PATH, or
                       the one a launcher opened read-write and
                       passed as file descriptor FD, as the
                       manifest's block device NAME",
            },
            OptionSpec {
                name: "block-sector-size",
                value: "BYTES",
                default_for_all: false,
                help: "sector (block) size of block device NAME: a
                       power of two from 512 to 32768 (default 512);
                       the file size must be a multiple of it",
            },
            OptionSpec {
                name: "block-durability",
                value: "journal|none",
                default_for_all: true,
                help: "when a guest's write is acknowledged: journal
                       (the default): once it is durable in the
                       image's journal, so it survives a crash or a
                       power cut; none: once it is in the page cache,
                       as under solo5-hvt (cheaper, not durable)",
            },
            OptionSpec {
                name: "block-journal",
                value: "SIZE",
                default_for_all: true,
                help: "size of the journal of a new image, e.g. 64M
                       (the default) or 1G; kept in the state
                       directory's journals/, counted as block",
            },
        ]
    }

    fn check(&self, option: &str, value: &str) -> Result<(), String> {
        match option {
            "block-sector-size" if crate::text::number::<u64>(value).is_none() => {
                Err("not a number of bytes".into())
            }
            "block-durability" => Durability::parse(value).map(|_| ()),
            "block-journal" => parse_size(value).map(|_| ()),
            "block" => ImageArg::parse(value).map(|_| ()),
            _ => Ok(()),
        }
    }

    fn resources(&self, devices: &[Given], uk: &mut Unikernel) -> Result<(), DeviceError> {
        let mut bytes = 0u64;
        for d in devices {
            let size = backing_size(d.name, Self::image(d)?)?;
            bytes = bytes.saturating_add(size);
            if Self::durability(d) == Durability::Journal {
                bytes = bytes.saturating_add(Self::journal_size(d));
            }
        }
        uk.block_mb = uk.block_mb.saturating_add(bytes.div_ceil(1 << 20));
        Ok(())
    }

    fn attach(&self, devices: &[Given], ctx: &Context) -> Result<Attached, DeviceError> {
        let mut opened = Vec::new();
        let mut journals = 0u64;
        for d in devices {
            opened.push(BlockDevice::new(d.handle, Self::open(d, ctx)?));
            if Self::durability(d) == Durability::Journal {
                journals = journals.saturating_add(Self::journal_size(d));
            }
        }
        check_block_growth(ctx.admitted.block_mb, journals, &opened)?;
        let info = opened
            .iter()
            .map(|b| {
                let info = DeviceInfo::Block {
                    capacity: b.capacity(),
                    block_size: b.sector_size() as u16,
                };
                (b.handle, info)
            })
            .collect();
        Ok(Attached {
            info,
            module: Box::new(Block::new(opened)),
            readiness: vec![],
            mmio: vec![],
        })
    }
}

/// Size in bytes of block device `name`'s image: the regular file or
/// block device at its path, or its descriptor, which must be open
/// read-write (whatever else it is gives an error, not a size or a hang).
fn backing_size(name: &str, image: ImageArg) -> Result<u64, BlockError> {
    use std::io::{Seek, SeekFrom};
    let open = |err| BlockError::Open {
        name: name.into(),
        path: image.label(),
        err,
    };
    let mut file = match image {
        ImageArg::Path(path) => crate::launch::open_checked(path, check_type).map_err(open)?,
        ImageArg::Fd(fd) => home::image_fd(fd).map_err(|source| BlockError::Home {
            name: name.into(),
            source,
        })?,
    };
    // For a descriptor, its offset moves; every backend reads and writes
    // at explicit offsets.
    file.seek(SeekFrom::End(0)).map_err(open)
}

/// The block devices were sized for admission before they were opened:
/// refuse to run if they have grown since (the guest would get more disk
/// than was admitted). `journals` is what their journals were admitted as.
fn check_block_growth(
    admitted_mb: u64,
    journals: u64,
    blocks: &[BlockDevice],
) -> Result<(), BlockError> {
    let bytes = blocks
        .iter()
        .fold(journals, |sum, b| sum.saturating_add(b.capacity()));
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
    use crate::block::{FileBackend, Geometry, Info};
    use std::sync::Arc;

    fn device(name: &str, capacity: u64) -> BlockDevice {
        let info = Info {
            name: name.into(),
            geometry: Geometry {
                capacity,
                sector_size: 512,
            },
            id: [0; crate::block::ID_LEN],
            durable_writes: false,
            max_atomic_write: 512,
        };
        let file = Arc::new(tempfile_of(capacity));
        BlockDevice::new(1, Box::new(FileBackend::new(info, file).unwrap()))
    }

    fn tempfile_of(len: u64) -> std::fs::File {
        let dir = std::env::temp_dir();
        let p = dir.join(format!("tt-block-test-{}-{len}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        let _ = std::fs::remove_file(&p);
        f.set_len(len).unwrap();
        f
    }

    /// What admitting device "disk" given as `--block:disk=VALUE` says.
    fn admit(value: &str) -> Result<u64, String> {
        use crate::modules::kind::DeviceOption;
        let opts = [DeviceOption {
            option: "block",
            device: Some("disk".into()),
            value: value.into(),
        }];
        let mut uk = Unikernel {
            memory_mb: 0,
            cpus: Default::default(),
            block_mb: 0,
            bridges: Default::default(),
        };
        let d = [Given::new("disk", 0, &opts)];
        KIND.resources(&d, &mut uk).map_err(|e| e.to_string())?;
        // The lock and the checks of attaching, without a journal.
        let opts = [
            opts[0].clone(),
            DeviceOption {
                option: "block-durability",
                device: None,
                value: "none".into(),
            },
        ];
        let image =
            crate::loader::parse_image(&crate::loader::synth::Synth::default().build(), 16 << 20)
                .unwrap();
        let dir = std::env::temp_dir();
        let ctx = Context {
            admitted: &uk,
            state_dir: &dir,
            image: &image,
            mmio_slots_used: 0,
        };
        let b = BlockKind::open(&Given::new("disk", 0, &opts), &ctx).map_err(|e| e.to_string())?;
        Ok(b.info().geometry.capacity)
    }

    /// `--block:NAME=@FD`: a descriptor open read-write is sized, checked
    /// and locked as a path is; the command line refuses what is no
    /// number, and the launch a descriptor that is not open, is open
    /// read-only, or is a directory, naming the device and the descriptor.
    #[test]
    fn block_images_given_as_descriptors() {
        use std::os::fd::AsRawFd;
        let rw = tempfile_of(1 << 20);
        assert_eq!(admit(&format!("@{}", rw.as_raw_fd())), Ok(1 << 20));

        for bad in ["@", "@x", "@-1", "@3x", "@99999999999"] {
            let e = KIND.check("block", bad).unwrap_err();
            assert!(e.contains("not a file descriptor: use @FD"), "{bad}: {e}");
        }
        assert!(KIND.check("block", "./@3").is_ok());

        let e = admit("@1000000").unwrap_err();
        assert!(
            e.contains("block device 'disk'") && e.contains("fd 1000000"),
            "{e}"
        );
        assert!(e.contains("not open"), "{e}");

        let path = std::env::temp_dir().join(format!("tt-block-ro-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let ro = std::fs::File::open(&path);
        let _ = std::fs::remove_file(&path);
        let ro = ro.unwrap();
        let e = admit(&format!("@{}", ro.as_raw_fd())).unwrap_err();
        assert!(
            e.contains(&format!(
                "block image fd {} is open read-only",
                ro.as_raw_fd()
            )),
            "{e}"
        );

        let dir = std::fs::File::open(std::env::temp_dir()).unwrap();
        let e = admit(&format!("@{}", dir.as_raw_fd())).unwrap_err();
        assert!(
            e.contains(&format!("fd {} is a directory", dir.as_raw_fd())),
            "{e}"
        );
    }

    #[test]
    fn block_devices_that_grew_after_admission_are_refused() {
        // 1.5 MiB + 1 MiB: admitted as their sum rounded up, 3 MB, as
        // BlockKind::resources computes it.
        let blocks = [device("a", 3 << 19), device("b", 1 << 20)];
        assert!(check_block_growth(3, 0, &blocks).is_ok());
        let e = check_block_growth(2, 0, &blocks).unwrap_err();
        assert!(e.to_string().contains("2 MB admitted, 3 MB now"), "{e}");
        assert!(check_block_growth(0, 0, &[]).is_ok());
        // A journal of 1 MiB is counted too.
        assert!(check_block_growth(3, 1 << 20, &blocks).is_err());
        assert!(check_block_growth(4, 1 << 20, &blocks).is_ok());
    }

    #[test]
    fn journal_sizes_parse_with_units_and_bounds() {
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("2MiB"), Ok(2 << 20));
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        for (bad, why) in [
            ("64X", "unknown unit"),
            ("M", "expected a size"),
            ("512K", "from 1M to 64G"),
            ("65G", "from 1M to 64G"),
            ("1048577", "4 KiB"),
            ("99999999999999999999G", "expected a size"),
        ] {
            let e = parse_size(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn block_read_into_protected_memory_is_refused_and_changes_nothing() {
        use crate::abi::HcBlockRead;
        use crate::loader::Protected;
        use vm_memory::GuestMemoryMmap;
        let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let text = Protected {
            start: 0x10000,
            end: 0x12000,
            what: "the image's code",
        };
        let rodata = Protected {
            start: 0x20000,
            end: 0x21000,
            what: "the image's read-only data",
        };
        let mem = GuestMem::new(m, vec![text, rodata]);
        mem.write_slice(&[0xc3; 0x2000], GuestAddress(0x10000))
            .unwrap();
        let mut block = Block::new(vec![device("d", 1 << 16)]);
        let read = |block: &mut Block, arg: u64, data: u64, len: u64| {
            let a = HcBlockRead {
                handle: 1,
                offset: 0,
                data,
                len,
                ret: 77,
                ..Default::default()
            };
            mem.write_obj(a, GuestAddress(arg)).unwrap();
            block.handle(Hypercall::BlockRead, arg, &mem)
        };
        // The buffer over the code, or straddling into it: refused.
        for data in [0x10000, 0x11e00, 0xff00] {
            let r = read(&mut block, 0x1000, data, 1024);
            let Err(GuestError::ReadOnly { start, end, .. }) = r else {
                panic!("{data:#x}: {r:?}");
            };
            assert_eq!((start, end), (0x10000, 0x12000));
            let ret: HcBlockRead = mem.read_obj(GuestAddress(0x1000)).unwrap();
            assert_eq!(ret.ret, 77, "nothing written back");
        }
        let mut text_now = vec![0u8; 0x2000];
        mem.read_slice(&mut text_now, GuestAddress(0x10000))
            .unwrap();
        assert!(text_now.iter().all(|&b| b == 0xc3), "the code was changed");
        // The struct in read-only data: refused before anything is read.
        let r = read(&mut block, 0x20010, 0x3000, 512);
        assert!(matches!(r, Err(GuestError::ReadOnly { .. })), "{r:?}");
        // Elsewhere it is served.
        assert_eq!(read(&mut block, 0x1000, 0x3000, 512), Ok(Action::Continue));
        let ret: HcBlockRead = mem.read_obj(GuestAddress(0x1000)).unwrap();
        assert_eq!(ret.ret, crate::abi::ret::OK);
        // A BLOCK_WRITE from the code only reads it: served.
        let w = crate::abi::HcBlockWrite {
            handle: 1,
            offset: 0,
            data: 0x10000,
            len: 512,
            ..Default::default()
        };
        mem.write_obj(w, GuestAddress(0x1000)).unwrap();
        assert_eq!(
            block.handle(Hypercall::BlockWrite, 0x1000, &mem),
            Ok(Action::Continue)
        );
    }
}
