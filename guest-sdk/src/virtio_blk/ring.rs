//! The memory the driver shares with the device: one split virtqueue
//! (descriptor table, available ring, used ring) plus a request header and
//! a status byte per descriptor index, in one zeroed, page-aligned heap
//! allocation. Guest memory is identity mapped, so a pointer is the
//! guest-physical address the device is given.
//!
//! Nothing here hands out Rust references into the region: the device
//! writes to it concurrently, so every access is a volatile read or write
//! through a raw pointer.

use alloc::alloc::{alloc_zeroed, dealloc, Layout};
use core::mem::{offset_of, size_of};
use core::ptr::{addr_of, addr_of_mut};

/// `struct virtq_desc`.
#[repr(C)]
pub struct Desc {
    /// Guest-physical address of the buffer.
    pub addr: u64,
    /// Its length in bytes.
    pub len: u32,
    /// [`DESC_F_NEXT`], [`DESC_F_WRITE`].
    pub flags: u16,
    /// The next descriptor of the chain (with [`DESC_F_NEXT`]).
    pub next: u16,
}

/// `struct virtq_used_elem`.
#[repr(C)]
pub struct UsedElem {
    /// Head descriptor index of the completed chain.
    pub id: u32,
    /// Bytes the device wrote into the chain's device-writable buffers.
    pub len: u32,
}

/// `struct virtio_blk_req`'s header (what precedes the data).
#[repr(C)]
pub struct ReqHeader {
    /// `VIRTIO_BLK_T_*`.
    pub ty: u32,
    /// Zero.
    pub reserved: u32,
    /// First 512-byte sector.
    pub sector: u64,
}

/// The chain continues in `next`.
pub const DESC_F_NEXT: u16 = 1;
/// The device writes this buffer (otherwise it only reads it).
pub const DESC_F_WRITE: u16 = 2;
/// `virtq_used.flags`: the device does not want notifications.
pub const USED_F_NO_NOTIFY: u16 = 1;

const _: () = assert!(size_of::<Desc>() == 16 && size_of::<UsedElem>() == 8);
const _: () = assert!(size_of::<ReqHeader>() == 16 && offset_of!(ReqHeader, sector) == 8);

const fn align_up(x: usize, a: usize) -> usize {
    (x + a - 1) & !(a - 1)
}

/// Byte offsets of the parts of a queue of size `n` inside the region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offsets {
    /// Descriptor table: 16 bytes per entry, 16-byte aligned.
    pub desc: usize,
    /// Available ring: `flags, idx, ring[n], used_event` (u16s), 2-aligned.
    pub avail: usize,
    /// Used ring: `flags, idx` (u16), `ring[n]` (8 bytes), `avail_event`
    /// (u16), 4-aligned.
    pub used: usize,
    /// Request headers, one per descriptor index.
    pub hdr: usize,
    /// Status bytes, one per descriptor index.
    pub status: usize,
    /// Total bytes.
    pub len: usize,
}

impl Offsets {
    /// The layout for a queue of `n` entries.
    pub const fn new(n: usize) -> Offsets {
        let desc = 0;
        let avail = desc + 16 * n;
        let used = align_up(avail + 6 + 2 * n, 4);
        let hdr = align_up(used + 6 + 8 * n, 16);
        let status = hdr + 16 * n;
        Offsets {
            desc,
            avail,
            used,
            hdr,
            status,
            len: status + n,
        }
    }
}

/// One queue's shared memory (see the module doc).
pub struct Ring {
    base: *mut u8,
    layout: Layout,
    size: u16,
    off: Offsets,
}

impl Ring {
    /// Allocate and zero the memory of a queue of `size` entries (a power
    /// of two, at most 32768). `None` if the heap cannot supply it.
    pub fn new(size: u16) -> Option<Ring> {
        let off = Offsets::new(size as usize);
        let layout = Layout::from_size_align(off.len, 4096).ok()?;
        // SAFETY: the layout has a non-zero size (size >= 1 gives >= 40 bytes).
        let base = unsafe { alloc_zeroed(layout) };
        if base.is_null() {
            return None;
        }
        Some(Ring {
            base,
            layout,
            size,
            off,
        })
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    fn at<T>(&self, offset: usize) -> *mut T {
        debug_assert!(offset + size_of::<T>() <= self.off.len);
        // SAFETY: callers pass offsets inside the region (indices are
        // reduced modulo or checked against the queue size).
        unsafe { self.base.add(offset) as *mut T }
    }

    /// Guest-physical address of the descriptor table.
    pub fn desc_addr(&self) -> u64 {
        self.base as u64 + self.off.desc as u64
    }

    /// Guest-physical address of the available ring.
    pub fn avail_addr(&self) -> u64 {
        self.base as u64 + self.off.avail as u64
    }

    /// Guest-physical address of the used ring.
    pub fn used_addr(&self) -> u64 {
        self.base as u64 + self.off.used as u64
    }

    /// Guest-physical address of descriptor `i`'s request header.
    pub fn hdr_addr(&self, i: u16) -> u64 {
        self.base as u64 + (self.off.hdr + 16 * i as usize) as u64
    }

    /// Guest-physical address of descriptor `i`'s status byte.
    pub fn status_addr(&self, i: u16) -> u64 {
        self.base as u64 + (self.off.status + i as usize) as u64
    }

    /// Write descriptor `i` (`i < size`).
    pub fn set_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        assert!(i < self.size);
        let d: *mut Desc = self.at(self.off.desc + 16 * i as usize);
        // SAFETY: `d` is an aligned descriptor slot inside the region.
        unsafe {
            addr_of_mut!((*d).addr).write_volatile(addr);
            addr_of_mut!((*d).len).write_volatile(len);
            addr_of_mut!((*d).flags).write_volatile(flags);
            addr_of_mut!((*d).next).write_volatile(next);
        }
    }

    /// Write descriptor `i`'s request header and set its status byte to
    /// `0xff` (no virtio status), so a device that never writes it is
    /// noticed.
    pub fn set_request(&self, i: u16, ty: u32, sector: u64) {
        assert!(i < self.size);
        let h: *mut ReqHeader = self.at(self.off.hdr + 16 * i as usize);
        let s: *mut u8 = self.at(self.off.status + i as usize);
        // SAFETY: `h` and `s` are aligned slots inside the region.
        unsafe {
            addr_of_mut!((*h).ty).write_volatile(ty);
            addr_of_mut!((*h).reserved).write_volatile(0);
            addr_of_mut!((*h).sector).write_volatile(sector);
            s.write_volatile(0xff);
        }
    }

    /// Descriptor `i`'s status byte.
    pub fn status(&self, i: u16) -> u8 {
        assert!(i < self.size);
        let s: *mut u8 = self.at(self.off.status + i as usize);
        // SAFETY: inside the region.
        unsafe { s.read_volatile() }
    }

    /// `avail.ring[idx % size] = head`.
    pub fn set_avail_entry(&self, idx: u16, head: u16) {
        let slot = (idx % self.size) as usize;
        // SAFETY: slot < size: inside the available ring.
        unsafe {
            self.at::<u16>(self.off.avail + 4 + 2 * slot)
                .write_volatile(head)
        }
    }

    /// `avail.idx = idx`.
    pub fn set_avail_idx(&self, idx: u16) {
        // SAFETY: inside the region, 2-aligned.
        unsafe { self.at::<u16>(self.off.avail + 2).write_volatile(idx) }
    }

    /// `avail.used_event = v` (with `VIRTIO_RING_F_EVENT_IDX`).
    pub fn set_used_event(&self, v: u16) {
        let o = self.off.avail + 4 + 2 * self.size as usize;
        // SAFETY: inside the region, 2-aligned.
        unsafe { self.at::<u16>(o).write_volatile(v) }
    }

    /// `used.flags`.
    pub fn used_flags(&self) -> u16 {
        // SAFETY: inside the region, 4-aligned.
        unsafe { self.at::<u16>(self.off.used).read_volatile() }
    }

    /// `used.idx`.
    pub fn used_idx(&self) -> u16 {
        // SAFETY: inside the region, 2-aligned.
        unsafe { self.at::<u16>(self.off.used + 2).read_volatile() }
    }

    /// `used.ring[idx % size]` as `(id, len)`.
    pub fn used_elem(&self, idx: u16) -> (u32, u32) {
        let slot = (idx % self.size) as usize;
        let e: *mut UsedElem = self.at(self.off.used + 4 + 8 * slot);
        // SAFETY: slot < size: inside the used ring, 4-aligned.
        unsafe {
            (
                addr_of!((*e).id).read_volatile(),
                addr_of!((*e).len).read_volatile(),
            )
        }
    }

    /// `used.avail_event` (with `VIRTIO_RING_F_EVENT_IDX`).
    pub fn avail_event(&self) -> u16 {
        let o = self.off.used + 4 + 8 * self.size as usize;
        // SAFETY: inside the region, 2-aligned.
        unsafe { self.at::<u16>(o).read_volatile() }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout. The driver drops a
        // ring only once the device was reset (or never set up), so the
        // device no longer uses it; otherwise it leaks it.
        unsafe { dealloc(self.base, self.layout) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_queue_parts_are_aligned_as_the_spec_requires_and_do_not_overlap() {
        for n in [1usize, 2, 8, 64, 256, 1024, 32768] {
            let o = Offsets::new(n);
            assert_eq!(o.desc % 16, 0);
            assert!(o.avail >= o.desc + 16 * n && o.avail % 2 == 0);
            assert!(o.used >= o.avail + 6 + 2 * n && o.used % 4 == 0);
            assert!(o.hdr >= o.used + 6 + 8 * n && o.hdr % 16 == 0);
            assert!(o.status >= o.hdr + 16 * n && o.len == o.status + n);
        }
    }
}
