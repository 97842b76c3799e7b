//! Helpers shared by the journal's integration tests.
// Each test file uses only some of these.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use std::time::Duration;
use tt_ring::{BlockDevice, MemDevice, Producer};

/// SplitMix64's finalizer: a well-mixed u64 from any u64, to derive test
/// data from ids.
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A memory device that runs `before_sync` at the start of every sync:
/// a delay like a disk's (see [`slow_ring`]), or a gate a test holds.
pub struct HookedSync<F> {
    pub dev: MemDevice,
    pub before_sync: F,
}

impl<F: Fn() + Send + Sync> BlockDevice for HookedSync<F> {
    fn sector_size(&self) -> u32 {
        self.dev.sector_size()
    }
    fn size(&self) -> u64 {
        self.dev.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.dev.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.dev.write_at(buf, offset)
    }
    fn sync(&self) -> std::io::Result<()> {
        (self.before_sync)();
        self.dev.sync()
    }
}

/// A memory device whose `sync` takes `delay`, like a disk: while a
/// commit syncs, other pushers' ops queue up, so commits carry several.
pub type SlowSync = HookedSync<Box<dyn Fn() + Send + Sync>>;

/// A freshly formatted ring of `size` bytes (512-byte sectors) in memory,
/// whose syncs take `delay`.
pub fn slow_ring(size: u64, delay: Duration) -> Arc<SlowSync> {
    let d = Arc::new(HookedSync {
        dev: MemDevice::new(size, 512),
        before_sync: Box::new(move || std::thread::sleep(delay)) as Box<dyn Fn() + Send + Sync>,
    });
    Producer::create(&d).unwrap();
    d
}

/// The u64 ops a [`recorder`] has been given, in the order performed.
pub type Log = Arc<Mutex<Vec<u64>>>;

/// A `perform` that appends its ops to `log` and succeeds.
pub fn recorder(log: &Log) -> impl FnMut(&[u64]) -> Result<(), String> + Send + 'static {
    let log = log.clone();
    move |ops| {
        log.lock().unwrap().extend_from_slice(ops);
        Ok(())
    }
}
