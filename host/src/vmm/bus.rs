//! Devices in guest-physical address space, reached through MMIO exits.
//!
//! A device kind hands the VM one [`MmioRegion`] per device: the guest
//! addresses of its registers and the [`MmioDevice`] that serves them. The
//! VM puts the regions on a [`Bus`], which routes each MMIO exit to the
//! device whose region holds the address, with the offset into that region.
//!
//! Regions never overlap (the bus refuses one that would) and an access
//! must lie wholly inside one region; anything else is not the bus's, and
//! the VM stops the guest as for any access outside guest memory.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device whose registers the guest reads and writes in its MMIO region.
pub trait MmioDevice: Send {
    /// A guest read of `data.len()` bytes at `offset` into the device's window.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A guest write of `data` at `offset` into the device's window.
    fn write(&mut self, offset: u64, data: &[u8]);
    /// Guest memory, once the VM exists (before the guest runs).
    fn attach_memory(&mut self, mem: vm_memory::GuestMemoryMmap) {
        let _ = mem;
    }
    /// With the vCPU paused, for a snapshot or a migration: finish what
    /// the guest asked (requests in flight completed into guest memory,
    /// acknowledged writes durable), so that the device's state is what
    /// [`save`](Self::save) returns. An error names the device.
    fn quiesce(&mut self) -> Result<(), String> {
        Err("this device cannot be paused for a snapshot".into())
    }
    /// The device's state after [`quiesce`](Self::quiesce), for a
    /// snapshot (its bytes are the device's to define).
    fn save(&self) -> Result<Vec<u8>, String> {
        Err("this device's state cannot be saved".into())
    }
    /// Take the state [`save`](Self::save) gave, on a device attached as
    /// the saved one was (and to the same guest memory).
    fn restore(&mut self, state: &[u8]) -> Result<(), String> {
        let _ = state;
        Err("this device's state cannot be restored".into())
    }
    /// After [`quiesce`](Self::quiesce), the vCPU paused since: touch no
    /// file until [`resume`](Self::resume) (a migration hands them over
    /// meanwhile); see `Module::suspend`.
    fn suspend(&mut self) -> Result<(), String> {
        Ok(())
    }
    /// After [`suspend`](Self::suspend), when the migration failed.
    fn resume(&mut self) -> Result<(), String> {
        Ok(())
    }
    /// The identity of the image backing the device, if any.
    fn disks(&self) -> Result<Vec<crate::snapshot::DiskIdentity>, String> {
        Ok(Vec::new())
    }
    /// The descriptors holding the device's locks (`Backend::lock_fds`).
    fn lock_fds(&self) -> Vec<std::os::fd::RawFd> {
        Vec::new()
    }
    /// While a migration copies memory: mark every write the device makes
    /// into guest memory here (`None`: stop).
    fn track_writes(&mut self, dirty: Option<Arc<crate::vmm::dirty::HostDirty>>) {
        let _ = dirty;
    }
}

/// One device in the MMIO window, as a device kind hands it to the VM.
pub struct MmioRegion {
    pub base: u64,
    pub len: u64,
    pub device: Arc<Mutex<dyn MmioDevice>>,
    /// Queue notifications to deliver on an eventfd (KVM_IOEVENTFD), not as MMIO exits:
    /// (guest address of QueueNotify, datamatch = queue index, the eventfd).
    pub notify: Vec<(u64, u32, vmm_sys_util::eventfd::EventFd)>,
}

/// Why a region could not be added, or an access not served.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("MMIO region {base:#x}+{len:#x} is empty or wraps around the address space; a region needs 1 to 2^64-1-base bytes")]
    BadRange { base: u64, len: u64 },
    #[error("MMIO region {base:#x}+{len:#x} overlaps the region {other_base:#x}+{other_len:#x}; give each device its own addresses")]
    Overlap {
        base: u64,
        len: u64,
        other_base: u64,
        other_len: u64,
    },
    #[error("guest accessed {addr:#x}, outside guest memory")]
    Unmapped { addr: u64 },
    #[error("guest made a {size}-byte access at {addr:#x}, across the end of the device registers at {base:#x}+{len:#x}")]
    Straddles {
        addr: u64,
        size: usize,
        base: u64,
        len: u64,
    },
    #[error("the device at {base:#x} failed earlier (it panicked) and cannot serve the guest's access at {addr:#x}")]
    Poisoned { base: u64, addr: u64 },
}

/// A device as the bus shares it with its owner.
pub type SharedDevice = Arc<Mutex<dyn MmioDevice>>;

struct Entry {
    len: u64,
    device: Arc<Mutex<dyn MmioDevice>>,
}

/// Non-overlapping address ranges, each served by one device.
#[derive(Default)]
pub struct Bus {
    /// Keyed by base address.
    ranges: BTreeMap<u64, Entry>,
}

impl Bus {
    pub fn new() -> Bus {
        Bus::default()
    }

    /// Does no device serve any range?
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Every device, by its base address.
    pub fn devices(&self) -> Vec<(u64, SharedDevice)> {
        self.ranges
            .iter()
            .map(|(&base, e)| (base, e.device.clone()))
            .collect()
    }

    /// Serve `[base, base + len)` with `device`.
    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        device: Arc<Mutex<dyn MmioDevice>>,
    ) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::BadRange { base, len })?;
        // The only candidates for an overlap: the last region starting
        // before `end` (any earlier one ends before it starts, as regions
        // are disjoint).
        if let Some((&other_base, other)) = self.ranges.range(..end).next_back() {
            if other_base + other.len > base {
                return Err(BusError::Overlap {
                    base,
                    len,
                    other_base,
                    other_len: other.len,
                });
            }
        }
        self.ranges.insert(base, Entry { len, device });
        Ok(())
    }

    /// The region holding `addr`: its base, length and device.
    pub fn lookup(&self, addr: u64) -> Option<(u64, u64, &SharedDevice)> {
        let (&base, e) = self.ranges.range(..=addr).next_back()?;
        (addr - base < e.len).then_some((base, e.len, &e.device))
    }

    /// The device and offset for an access of `size` bytes at `addr`.
    fn route(&self, addr: u64, size: usize) -> Result<(u64, &SharedDevice), BusError> {
        let (base, len, device) = self.lookup(addr).ok_or(BusError::Unmapped { addr })?;
        let offset = addr - base;
        if size as u64 > len - offset {
            return Err(BusError::Straddles {
                addr,
                size,
                base,
                len,
            });
        }
        Ok((offset, device))
    }

    /// Serve a guest read of `data.len()` bytes at `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> Result<(), BusError> {
        let (offset, device) = self.route(addr, data.len())?;
        let base = addr - offset;
        let mut d = device
            .lock()
            .map_err(|_| BusError::Poisoned { base, addr })?;
        d.read(offset, data);
        Ok(())
    }

    /// Serve a guest write of `data` at `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), BusError> {
        let (offset, device) = self.route(addr, data.len())?;
        let base = addr - offset;
        let mut d = device
            .lock()
            .map_err(|_| BusError::Poisoned { base, addr })?;
        d.write(offset, data);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records every access; reads return `offset as u8 + i` per byte.
    #[derive(Default)]
    struct Recorder {
        log: Vec<(char, u64, Vec<u8>)>,
    }

    impl MmioDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = offset as u8 + i as u8;
            }
            self.log.push(('r', offset, data.to_vec()));
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.log.push(('w', offset, data.to_vec()));
        }
    }

    fn dev() -> Arc<Mutex<Recorder>> {
        Arc::new(Mutex::new(Recorder::default()))
    }

    #[test]
    fn overlapping_regions_are_refused_and_adjacent_ones_accepted() {
        let mut bus = Bus::new();
        bus.insert(0x1000, 0x1000, dev()).unwrap();
        bus.insert(0x3000, 0x1000, dev()).unwrap();
        // Adjacent on both sides.
        bus.insert(0x2000, 0x1000, dev()).unwrap();
        bus.insert(0x800, 0x800, dev()).unwrap();
        for (base, len, other_base) in [
            (0x1000, 0x1000, 0x1000), // same range
            (0x1fff, 1, 0x1000),      // last byte of one
            (0x3800, 0x1000, 0x3000), // starts inside, ends outside
            (0x0, 0x801, 0x800),      // ends one byte inside
            (0x0, 0x10000, 0x3000),   // covers several
        ] {
            let err = bus.insert(base, len, dev()).unwrap_err();
            assert!(
                matches!(err, BusError::Overlap { other_base: o, .. } if o == other_base),
                "{base:#x}+{len:#x}: {err:?}"
            );
        }
        bus.insert(0x4000, 1, dev()).unwrap();
    }

    #[test]
    fn empty_and_wrapping_regions_are_refused() {
        let mut bus = Bus::new();
        assert_eq!(
            bus.insert(0x1000, 0, dev()),
            Err(BusError::BadRange {
                base: 0x1000,
                len: 0
            })
        );
        assert!(bus.insert(u64::MAX, 2, dev()).is_err());
        bus.insert(u64::MAX - 1, 1, dev()).unwrap();
    }

    #[test]
    fn lookup_finds_the_region_up_to_its_last_byte() {
        let mut bus = Bus::new();
        bus.insert(0x1000, 0x100, dev()).unwrap();
        bus.insert(0x2000, 0x100, dev()).unwrap();
        assert!(bus.lookup(0xfff).is_none());
        assert_eq!(bus.lookup(0x1000).unwrap().0, 0x1000);
        assert_eq!(bus.lookup(0x10ff).unwrap().0, 0x1000);
        assert!(bus.lookup(0x1100).is_none());
        assert!(bus.lookup(0x1fff).is_none());
        assert_eq!(bus.lookup(0x2050).unwrap().0, 0x2000);
        assert!(bus.lookup(u64::MAX).is_none());
        assert!(Bus::new().lookup(0).is_none());
    }

    #[test]
    fn accesses_reach_their_device_at_the_offset_into_its_region() {
        let mut bus = Bus::new();
        let (a, b) = (dev(), dev());
        bus.insert(0x1_0000_0000, 0x1000, a.clone()).unwrap();
        bus.insert(0x1_0000_1000, 0x1000, b.clone()).unwrap();

        let mut word = [0u8; 4];
        bus.read(0x1_0000_0010, &mut word).unwrap();
        assert_eq!(word, [0x10, 0x11, 0x12, 0x13]);
        bus.write(0x1_0000_1ffc, &[1, 2, 3, 4]).unwrap();
        let mut byte = [0u8; 1];
        bus.read(0x1_0000_1000, &mut byte).unwrap();
        bus.write(0x1_0000_0000, &[9; 8]).unwrap();

        assert_eq!(
            a.lock().unwrap().log,
            vec![
                ('r', 0x10, vec![0x10, 0x11, 0x12, 0x13]),
                ('w', 0, vec![9; 8])
            ]
        );
        assert_eq!(
            b.lock().unwrap().log,
            vec![('w', 0xffc, vec![1, 2, 3, 4]), ('r', 0, vec![0])]
        );
    }

    #[test]
    fn accesses_outside_every_region_or_across_its_end_are_refused() {
        let mut bus = Bus::new();
        let d = dev();
        bus.insert(0x1000, 0x1000, d.clone()).unwrap();
        let mut word = [0u8; 4];
        assert_eq!(
            bus.read(0xffc, &mut word),
            Err(BusError::Unmapped { addr: 0xffc })
        );
        assert_eq!(
            bus.write(0x2000, &[0]),
            Err(BusError::Unmapped { addr: 0x2000 })
        );
        assert_eq!(
            bus.write(0x1ffe, &[0; 4]),
            Err(BusError::Straddles {
                addr: 0x1ffe,
                size: 4,
                base: 0x1000,
                len: 0x1000
            })
        );
        assert!(d.lock().unwrap().log.is_empty(), "no access reached it");
        assert!(BusError::Unmapped { addr: 0x2000 }
            .to_string()
            .contains("0x2000, outside guest memory"));
    }

    #[test]
    fn a_device_that_panicked_is_reported_not_served() {
        struct Panics;
        impl MmioDevice for Panics {
            fn read(&mut self, _: u64, _: &mut [u8]) {
                panic!("device bug");
            }
            fn write(&mut self, _: u64, _: &[u8]) {}
        }
        let mut bus = Bus::new();
        bus.insert(0x1000, 0x1000, Arc::new(Mutex::new(Panics)))
            .unwrap();
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _ = bus.read(0x1000, &mut [0]);
        }));
        assert!(caught.is_err());
        assert_eq!(
            bus.write(0x1004, &[0]),
            Err(BusError::Poisoned {
                base: 0x1000,
                addr: 0x1004
            })
        );
    }
}
