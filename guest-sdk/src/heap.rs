//! The global allocator.
//!
//! The heap is everything between the end of the image and the stack
//! guard (see [`layout`]). It is a
//! first-fit free list kept sorted by address, with neighbours coalesced
//! on free. Blocks carry no header: `dealloc` gets the size from the
//! `Layout`, and sizes are rounded up to 16 bytes, so every free block
//! can hold its own list node. Allocation is O(free blocks), which is fine
//! for the single-threaded guests this SDK targets.
//!
//! When the heap is exhausted, `alloc` returns null and Rust's default
//! handler panics with "memory allocation of N bytes failed", which the
//! SDK reports and turns into exit status 255.

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;
use core::ptr;
use core::sync::atomic::{AtomicBool, Ordering};

/// Bytes reserved for the stack at the top of memory when memory is too
/// small for a guarded 2 MiB stack.
pub const STACK_SIZE: u64 = 1 << 20;

/// Allocation granule and minimum alignment.
const GRAIN: usize = 16;

#[repr(C)]
struct FreeBlock {
    size: usize,
    next: *mut FreeBlock,
}

/// A first-fit, address-ordered free-list allocator over one region.
pub struct FreeList {
    head: *mut FreeBlock,
    free: usize,
    total: usize,
}

fn align_up(x: usize, a: usize) -> Option<usize> {
    Some(x.checked_add(a - 1)? & !(a - 1))
}

fn block_size(layout: &Layout) -> Option<usize> {
    Some(align_up(layout.size(), GRAIN)?.max(GRAIN))
}

impl FreeList {
    /// An empty allocator (every allocation fails until [`FreeList::init`]).
    pub const fn empty() -> FreeList {
        FreeList {
            head: ptr::null_mut(),
            free: 0,
            total: 0,
        }
    }

    /// Hand `[start, end)` to the allocator.
    ///
    /// # Safety
    ///
    /// The region must be writable, unused by anything else for as long as
    /// the allocator lives, and this must be called at most once.
    pub unsafe fn init(&mut self, start: usize, end: usize) {
        let (Some(s), e) = (align_up(start, GRAIN), end & !(GRAIN - 1)) else {
            return;
        };
        if e <= s || e - s < GRAIN {
            return;
        }
        let b = s as *mut FreeBlock;
        // SAFETY: the caller gives us the writable region [s, e).
        unsafe {
            b.write(FreeBlock {
                size: e - s,
                next: ptr::null_mut(),
            })
        };
        self.head = b;
        self.free = e - s;
        self.total = e - s;
    }

    /// Bytes currently free (not all of them may be usable for one big
    /// allocation because of fragmentation).
    pub fn free_bytes(&self) -> usize {
        self.free
    }

    /// Bytes managed in total.
    pub fn total_bytes(&self) -> usize {
        self.total
    }

    /// Number of free blocks (a fragmentation measure).
    pub fn free_blocks(&self) -> usize {
        let mut n = 0;
        let mut cur = self.head;
        while !cur.is_null() {
            n += 1;
            // SAFETY: every node on the list is a valid FreeBlock we wrote.
            cur = unsafe { (*cur).next };
        }
        n
    }

    /// Allocate; null if no free block fits.
    pub fn alloc(&mut self, layout: Layout) -> *mut u8 {
        let Some(size) = block_size(&layout) else {
            return ptr::null_mut();
        };
        let align = layout.align().max(GRAIN);
        let mut prev: *mut *mut FreeBlock = &mut self.head;
        // SAFETY: `prev` always points at `self.head` or at the `next`
        // field of a live list node, and every node on the list is a valid
        // FreeBlock inside the region we own.
        unsafe {
            let mut cur = *prev;
            while !cur.is_null() {
                let b = cur as usize;
                let bend = b + (*cur).size;
                let next = (*cur).next;
                if let Some(a) = align_up(b, align) {
                    if let Some(aend) = a.checked_add(size) {
                        if aend <= bend {
                            // [b, a) stays free (a multiple of GRAIN, maybe 0),
                            // [aend, bend) becomes a new free block.
                            let mut link = next;
                            if aend < bend {
                                let nb = aend as *mut FreeBlock;
                                nb.write(FreeBlock {
                                    size: bend - aend,
                                    next,
                                });
                                link = nb;
                            }
                            if a > b {
                                (*cur).size = a - b;
                                (*cur).next = link;
                            } else {
                                *prev = link;
                            }
                            self.free -= size;
                            return a as *mut u8;
                        }
                    }
                }
                prev = &mut (*cur).next;
                cur = next;
            }
        }
        ptr::null_mut()
    }

    /// Free a block returned by [`FreeList::alloc`].
    ///
    /// # Safety
    ///
    /// `p` must come from `alloc` on this allocator with the same `layout`
    /// and not have been freed since.
    pub unsafe fn dealloc(&mut self, p: *mut u8, layout: Layout) {
        let Some(size) = block_size(&layout) else {
            return;
        };
        let start = p as usize;
        let end = start + size;
        // SAFETY: list invariants as in `alloc`; [start, end) is ours again
        // per the caller's contract, so we may write a node there.
        unsafe {
            let mut prev: *mut FreeBlock = ptr::null_mut();
            let mut cur = self.head;
            while !cur.is_null() && (cur as usize) < start {
                prev = cur;
                cur = (*cur).next;
            }
            let (mut nsize, mut nnext) = (size, cur);
            if !cur.is_null() && cur as usize == end {
                nsize += (*cur).size;
                nnext = (*cur).next;
            }
            if !prev.is_null() && prev as usize + (*prev).size == start {
                (*prev).size += nsize;
                (*prev).next = nnext;
            } else {
                let nb = start as *mut FreeBlock;
                nb.write(FreeBlock {
                    size: nsize,
                    next: nnext,
                });
                if prev.is_null() {
                    self.head = nb;
                } else {
                    (*prev).next = nb;
                }
            }
        }
        self.free += size;
    }

    /// Grow or shrink in place if possible; returns false if the caller
    /// must move the data.
    ///
    /// # Safety
    ///
    /// As for [`FreeList::dealloc`].
    unsafe fn resize_in_place(&mut self, p: *mut u8, layout: Layout, new_size: usize) -> bool {
        let (Some(old), Some(new)) = (
            block_size(&layout),
            align_up(new_size, GRAIN).map(|n| n.max(GRAIN)),
        ) else {
            return false;
        };
        if new == old {
            return true;
        }
        let start = p as usize;
        if new < old {
            // SAFETY: the tail [start+new, start+old) is ours; freeing it
            // as a block of its own keeps the list consistent.
            unsafe {
                let tail = Layout::from_size_align_unchecked(old - new, GRAIN);
                self.dealloc((start + new) as *mut u8, tail);
            }
            return true;
        }
        let end = start + old;
        let want = new - old;
        // SAFETY: list invariants as in `alloc`.
        unsafe {
            let mut prev: *mut *mut FreeBlock = &mut self.head;
            let mut cur = *prev;
            while !cur.is_null() && (cur as usize) < end {
                prev = &mut (*cur).next;
                cur = *prev;
            }
            if cur.is_null() || cur as usize != end || (*cur).size < want {
                return false;
            }
            let rest = (*cur).size - want;
            let next = (*cur).next;
            if rest == 0 {
                *prev = next;
            } else {
                let nb = (end + want) as *mut FreeBlock;
                nb.write(FreeBlock { size: rest, next });
                *prev = nb;
            }
        }
        self.free -= want;
        true
    }
}

/// The SDK's global allocator: a [`FreeList`] behind a flag that turns
/// accidental re-entry into a clean failure instead of corruption.
pub struct Heap {
    busy: AtomicBool,
    inner: UnsafeCell<FreeList>,
}

// SAFETY: the guest is single-threaded with interrupts off; `busy`
// serialises access to `inner` anyway.
unsafe impl Sync for Heap {}

impl Heap {
    /// An uninitialised heap.
    pub const fn new() -> Heap {
        Heap {
            busy: AtomicBool::new(false),
            inner: UnsafeCell::new(FreeList::empty()),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut FreeList) -> R) -> R {
        if self.busy.swap(true, Ordering::Acquire) {
            reentered();
        }
        // SAFETY: `busy` gives us exclusive access until we clear it.
        let r = f(unsafe { &mut *self.inner.get() });
        self.busy.store(false, Ordering::Release);
        r
    }

    /// (free bytes, total bytes, free blocks).
    pub fn stats(&self) -> (usize, usize, usize) {
        self.with(|h| (h.free_bytes(), h.total_bytes(), h.free_blocks()))
    }
}

/// The guest has one thread and runs with interrupts off, so a busy heap
/// means the allocator was entered from inside itself (say a fault in the
/// middle of an allocation whose handling allocates). Waiting would hang
/// for ever: stop, saying why.
#[cold]
fn reentered() -> ! {
    #[cfg(not(test))]
    {
        crate::console::write_str("tt-guest: the heap allocator was re-entered; aborting\n");
        crate::abort()
    }
    #[cfg(test)]
    panic!("the heap allocator was re-entered")
}

impl Default for Heap {
    fn default() -> Self {
        Self::new()
    }
}

// SAFETY: FreeList returns disjoint, correctly aligned blocks of at least
// the requested size from memory nobody else uses, or null.
unsafe impl GlobalAlloc for Heap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.with(|h| h.alloc(layout))
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        // SAFETY: forwarded caller contract.
        self.with(|h| unsafe { h.dealloc(p, layout) })
    }

    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded caller contract.
        if self.with(|h| unsafe { h.resize_in_place(p, layout, new_size) }) {
            return p;
        }
        // SAFETY: `new_size` with the old alignment is a valid layout per
        // the GlobalAlloc::realloc contract.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: as above.
        let q = unsafe { self.alloc(new_layout) };
        if !q.is_null() {
            // SAFETY: both blocks are valid for min(old, new) bytes and are
            // distinct allocations.
            unsafe {
                ptr::copy_nonoverlapping(p, q, layout.size().min(new_size));
                self.dealloc(p, layout);
            }
        }
        q
    }
}

/// The allocator instance.
#[cfg_attr(not(test), global_allocator)]
pub static HEAP: Heap = Heap::new();

#[cfg(not(test))]
extern "C" {
    static _end: u8;
    static _tt_npt: u8;
}

/// Where the heap, the stack guard and the stack are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryLayout {
    /// First heap byte (end of the image, page aligned).
    pub heap_start: u64,
    /// End of the heap.
    pub heap_end: u64,
    /// The unmapped 2 MiB stack guard `[start, end)`, if there is one.
    pub guard: Option<(u64, u64)>,
    /// Lowest stack address (the stack grows down from `mem_size`).
    pub stack_bottom: u64,
}

/// Compute the memory layout for `mem_size` bytes of memory, an image
/// ending at `image_end`, and an image window of `npt` 2 MiB pages mapped
/// with 4 KiB pages.
///
/// With enough memory, the stack is the top 2 MiB page(s) of memory
/// (`[g + 2 MiB, mem_size)` where `g = (mem_size / 2 MiB - 2) * 2 MiB`),
/// `[g, g + 2 MiB)` is left unmapped by the boot code so that a stack
/// overflow faults instead of corrupting the heap, and the heap ends at
/// `g`. Small guests (where `g` would fall in the image's window) get no
/// guard and a [`STACK_SIZE`] stack. The boot code in `arch.rs` makes
/// the same decision.
pub fn layout(mem_size: u64, image_end: u64, npt: u64) -> MemoryLayout {
    let heap_start = image_end.div_ceil(4096) * 4096;
    let g = (mem_size >> 21).checked_sub(2);
    match g {
        Some(g) if g >= npt && g < 2048 => MemoryLayout {
            heap_start,
            heap_end: (g << 21).max(heap_start),
            guard: Some((g << 21, (g + 1) << 21)),
            stack_bottom: (g + 1) << 21,
        },
        _ => {
            let bottom = mem_size.saturating_sub(STACK_SIZE) & !4095;
            MemoryLayout {
                heap_start,
                heap_end: bottom.max(heap_start),
                guard: None,
                stack_bottom: bottom,
            }
        }
    }
}

/// This guest's memory layout.
#[cfg(not(test))]
pub fn current_layout() -> MemoryLayout {
    let bi = crate::boot::boot_info();
    // Linker-script symbols: only their addresses are used (`_tt_npt` is an
    // absolute symbol whose "address" is the page-table count).
    let image_end = core::ptr::addr_of!(_end) as u64;
    let npt = core::ptr::addr_of!(_tt_npt) as u64;
    layout(bi.mem_size, image_end.max(bi.kernel_end), npt)
}

#[cfg(not(test))]
pub(crate) fn init() {
    let l = current_layout();
    if l.heap_end > l.heap_start {
        // SAFETY: [heap_start, heap_end) lies between the image and the
        // stack guard/stack, is mapped RW, and is used by nothing else;
        // init runs once.
        HEAP.with(|h| unsafe { h.init(l.heap_start as usize, l.heap_end as usize) });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Region {
        buf: Vec<u128>,
        heap: FreeList,
    }

    fn region(bytes: usize) -> Region {
        let mut buf = vec![0u128; bytes / 16];
        let mut heap = FreeList::empty();
        let s = buf.as_mut_ptr() as usize;
        // SAFETY: the buffer is ours and outlives the heap (same struct).
        unsafe { heap.init(s, s + bytes) };
        Region { buf, heap }
    }

    #[test]
    #[should_panic(expected = "re-entered")]
    fn re_entering_the_heap_fails_instead_of_hanging() {
        let h = Heap::new();
        h.with(|_| h.stats());
    }

    #[test]
    fn layout_puts_a_guard_below_the_stack() {
        let l = layout(512 << 20, 0x123456, 1);
        assert_eq!(l.guard, Some((508 << 20, 510 << 20)));
        assert_eq!((l.heap_start, l.heap_end), (0x124000, 508 << 20));
        assert_eq!(l.stack_bottom, 510 << 20);
        // Too small for a guard outside the image window.
        let s = layout(4 << 20, 0x123456, 1);
        assert_eq!(s.guard, None);
        assert_eq!((s.heap_end, s.stack_bottom), (3 << 20, 3 << 20));
    }

    #[test]
    fn alloc_free_coalesces_back_to_one_block() {
        let mut r = region(1 << 16);
        let total = r.heap.free_bytes();
        let l = Layout::from_size_align(100, 8).unwrap();
        let ps: Vec<_> = (0..50).map(|_| r.heap.alloc(l)).collect();
        assert!(ps.iter().all(|p| !p.is_null()));
        for (i, p) in ps.iter().enumerate().filter(|(i, _)| i % 2 == 0) {
            let _ = i;
            // SAFETY: allocated above with `l`.
            unsafe { r.heap.dealloc(*p, l) };
        }
        for p in ps.iter().skip(1).step_by(2) {
            // SAFETY: allocated above with `l`.
            unsafe { r.heap.dealloc(*p, l) };
        }
        assert_eq!(r.heap.free_bytes(), total);
        assert_eq!(r.heap.free_blocks(), 1);
        assert!(!r.buf.is_empty());
    }

    #[test]
    fn honours_large_alignment_and_fails_when_full() {
        let mut r = region(1 << 16);
        let a = Layout::from_size_align(10, 4096).unwrap();
        let p = r.heap.alloc(a);
        assert_eq!(p as usize % 4096, 0);
        let big = Layout::from_size_align(1 << 17, 16).unwrap();
        assert!(r.heap.alloc(big).is_null());
        // SAFETY: allocated above.
        unsafe { r.heap.dealloc(p, a) };
        assert_eq!(r.heap.free_blocks(), 1);
    }

    #[test]
    fn random_stress_keeps_blocks_disjoint() {
        let mut r = region(1 << 20);
        let total = r.heap.free_bytes();
        let mut live: Vec<(usize, Layout)> = Vec::new();
        let mut x = 0x1234_5678_9abc_def0u64;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if x % 3 != 0 || live.is_empty() {
                let size = (x >> 8) as usize % 3000 + 1;
                let align = 1 << ((x >> 40) % 8);
                let l = Layout::from_size_align(size, align).unwrap();
                let p = r.heap.alloc(l);
                if p.is_null() {
                    continue;
                }
                assert_eq!(p as usize % align, 0);
                let (s, e) = (p as usize, p as usize + size);
                for &(q, lq) in &live {
                    assert!(e <= q || q + lq.size() <= s, "overlap");
                }
                live.push((s, l));
            } else {
                let i = (x >> 20) as usize % live.len();
                let (p, l) = live.swap_remove(i);
                // SAFETY: allocated above with `l`.
                unsafe { r.heap.dealloc(p as *mut u8, l) };
            }
        }
        for (p, l) in live.drain(..) {
            // SAFETY: allocated above with `l`.
            unsafe { r.heap.dealloc(p as *mut u8, l) };
        }
        assert_eq!(r.heap.free_bytes(), total);
        assert_eq!(r.heap.free_blocks(), 1);
    }
}
