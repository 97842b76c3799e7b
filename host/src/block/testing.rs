//! Test scaffolding: a model disk for images, which loses unsynced writes.

use super::Image;
use std::sync::Arc;
use tt_ring::{BlockDevice, FaultyDevice};

/// An image on a [`FaultyDevice`]: writes are volatile until
/// `sync_data`; `crash()` on the device drops what was not synced.
pub struct ModelImage(pub Arc<FaultyDevice>);

impl Image for ModelImage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.0.write_at(buf, offset)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.0.sync()
    }
}

/// A power supply shared by several devices: after `limit` writes and
/// syncs (counted together, over every device on it), every call on every
/// device fails, as if the machine lost power at that point. Then crash
/// each [`FaultyDevice`] (dropping what was not synced) and start again
/// on fresh [`Cut`] wrappers.
pub struct Power {
    count: std::sync::atomic::AtomicU64,
    limit: u64,
}

impl Power {
    pub fn new(limit: u64) -> Arc<Power> {
        Arc::new(Power {
            count: 0.into(),
            limit,
        })
    }
    /// Writes and syncs attempted so far.
    pub fn used(&self) -> u64 {
        self.count.load(std::sync::atomic::Ordering::SeqCst)
    }
    fn step(&self) -> std::io::Result<()> {
        let n = self.count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if n >= self.limit {
            Err(std::io::Error::other("power cut (simulated)"))
        } else {
            Ok(())
        }
    }
    fn on(&self) -> std::io::Result<()> {
        if self.used() > self.limit {
            Err(std::io::Error::other("power cut (simulated)"))
        } else {
            Ok(())
        }
    }
}

/// A [`FaultyDevice`] on a [`Power`] supply.
pub struct Cut {
    pub dev: Arc<FaultyDevice>,
    pub power: Arc<Power>,
}

impl BlockDevice for Cut {
    fn sector_size(&self) -> u32 {
        self.dev.sector_size()
    }
    fn size(&self) -> u64 {
        self.dev.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.power.on()?;
        self.dev.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.power.step()?;
        self.dev.write_at(buf, offset)
    }
    fn sync(&self) -> std::io::Result<()> {
        self.power.step()?;
        self.dev.sync()
    }
}

impl Image for Cut {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        BlockDevice::read_at(self, buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        BlockDevice::write_at(self, buf, offset)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        BlockDevice::sync(self)
    }
}

/// What `dev` holds now (volatile view).
pub fn contents(dev: &FaultyDevice) -> Vec<u8> {
    let mut v = vec![0u8; dev.size() as usize];
    dev.read_at(&mut v, 0).expect("read the model device");
    v
}
