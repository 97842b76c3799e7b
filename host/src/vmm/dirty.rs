//! Which guest pages changed: for a live migration's pre-copy.
//!
//! Two sources, merged by the sender:
//! - the guest's own writes, from KVM's dirty log (a memory slot with
//!   `KVM_MEM_LOG_DIRTY_PAGES`; `KVM_GET_DIRTY_LOG` returns and clears its
//!   bitmap);
//! - the host's writes into guest memory on the guest's behalf (hypercall
//!   results, block and net reads, the CPL 3 monitor's frames), which KVM
//!   does not see: [`HostDirty`], marked by the run loop while a migration
//!   tracks them.

use super::{layout, VmError};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// The page size dirty tracking works in.
pub const PAGE: u64 = 4096;

/// A bitmap of guest pages the host wrote, one bit per page of RAM.
pub struct HostDirty {
    words: Box<[AtomicU64]>,
    active: AtomicBool,
}

impl HostDirty {
    pub fn new(mem_size: u64) -> HostDirty {
        let pages = mem_size.div_ceil(PAGE);
        HostDirty {
            words: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            active: AtomicBool::new(false),
        }
    }

    /// Is a migration tracking host writes?
    pub fn active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    /// Start or stop tracking (stopping forgets what was marked).
    pub fn set_active(&self, on: bool) {
        self.active.store(on, Ordering::SeqCst);
        if !on {
            self.take();
        }
    }

    /// Mark `[gpa, gpa + len)` (clipped to memory).
    pub fn mark(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = gpa / PAGE;
        let last = gpa.saturating_add(len - 1) / PAGE;
        let max = self.words.len() as u64 * 64;
        for p in first..=last.min(max.saturating_sub(1)) {
            self.words[(p / 64) as usize].fetch_or(1 << (p % 64), Ordering::Relaxed);
        }
    }

    /// The marked pages' bitmap (one u64 per 64 pages), cleared.
    pub fn take(&self) -> Vec<u64> {
        self.words
            .iter()
            .map(|w| w.swap(0, Ordering::SeqCst))
            .collect()
    }
}

/// Turn KVM's dirty logging on or off for every slot of `mem` (slot k is
/// the k-th region, as [`super::Vm::with_memory`] registered them).
pub fn set_dirty_logging(vm: &VmFd, mem: &GuestMemoryMmap, on: bool) -> Result<(), VmError> {
    for (slot, region) in mem.iter().enumerate() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|_| VmError::Restore("a memory region has no mapping".into()))?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: if on {
                kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the same live mapping the slot was registered with (the
        // caller holds `mem`, a clone of the VM's memory), only its flags
        // change.
        unsafe { vm.set_user_memory_region(r) }.map_err(|err| VmError::Kvm {
            what: "set dirty logging on a memory slot",
            err,
        })?;
    }
    Ok(())
}

/// The pages the guest wrote since the last call (or since logging
/// started), as a bitmap over all of RAM (one u64 per 64 pages).
pub fn guest_dirty(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<Vec<u64>, VmError> {
    let size: u64 = mem.iter().map(|r| r.len()).sum();
    let mut out = vec![0u64; size.div_ceil(PAGE).div_ceil(64) as usize];
    for (slot, region) in mem.iter().enumerate() {
        let bits = vm
            .get_dirty_log(slot as u32, region.len() as usize)
            .map_err(|err| VmError::Kvm {
                what: "get the dirty log",
                err,
            })?;
        let base = region.start_addr().0 / PAGE;
        or_shifted(&mut out, &bits, base, region.len() / PAGE);
    }
    Ok(out)
}

/// `out |= bits << base` for the first `n` bits of `bits`.
fn or_shifted(out: &mut [u64], bits: &[u64], base: u64, n: u64) {
    if base % 64 == 0 {
        let at = (base / 64) as usize;
        for (i, w) in bits.iter().enumerate() {
            if let Some(o) = out.get_mut(at + i) {
                *o |= *w;
            }
        }
        return;
    }
    for p in 0..n {
        if bits[(p / 64) as usize] & (1 << (p % 64)) != 0 {
            let q = base + p;
            out[(q / 64) as usize] |= 1 << (q % 64);
        }
    }
}

/// Every page below [`layout::BOOT_INFO_BASE`] (the GDT, page tables and
/// CPL 3 monitor: small, and written by the host): the last round of a
/// migration sends it whole.
pub fn low_pages() -> std::ops::Range<u64> {
    0..layout::BOOT_INFO_BASE / PAGE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_marks_cover_every_page_a_range_touches_and_take_clears_them() {
        let d = HostDirty::new(1 << 20);
        d.mark(4095, 2);
        d.mark(10 * PAGE, PAGE);
        d.mark(u64::MAX - 5, 100); // outside memory: nothing, no overflow
        d.mark((1 << 20) - 10, 100); // across the end: clipped to the last page
        let w = d.take();
        assert_eq!(w[0], 0b11 | 1 << 10);
        assert_eq!(w[3], 1 << 63, "the last page only");
        assert!(d.take().iter().all(|&w| w == 0));
    }

    #[test]
    fn slot_bitmaps_merge_at_their_page_offset() {
        let mut out = vec![0u64; 4];
        or_shifted(&mut out, &[0b101], 128, 3);
        assert_eq!(out[2], 0b101);
        let mut out = vec![0u64; 4];
        or_shifted(&mut out, &[1 << 63 | 1], 3, 64);
        assert_eq!((out[0], out[1]), (1 << 3, 1 << 2));
    }
}
