//! Guest low-memory layout and the initial page tables.
//!
//! ```text
//! 0x0000_0000  unmapped page (a null dereference faults)
//! 0x0000_1000  GDT: null, code (0x08), data (0x10)
//! 0x0000_2000  PML4
//! 0x0000_3000  PDPT
//! 0x0000_4000  4 page directories (up to 4 GiB of guest memory)
//! 0x0000_8000  page tables for 4 KiB mappings of [0, align_up(kernel_end, 2 MiB)),
//!              then, if the VM has MMIO devices, the page directory and the
//!              page table of the MMIO window (2 pages)
//! 0x0007_c000  the CPL 3 monitor (`--cpl=3`, see [`super::monitor`]): its
//!              IDT, TSS, exception stubs and stack, supervisor-only
//! 0x0008_0000  struct hvt_boot_info, then the manifest
//! 0x0008_2000  command line (8192 bytes)
//! 0x0010_0000  the image (PT_LOAD segments), then heap ... stack at the top
//! ```
//!
//! Memory is identity-mapped. Pages of the image get the protections of
//! their ELF segment (text R+X, rodata R, data R+W; never W+X); the heap
//! and stack are R+W and not executable. Above the image, 2 MiB pages are
//! used. Low memory is protected as solo5-hvt (0.6.0 and later) protects
//! it: the tender's own structures are not mapped, and what the guest is
//! given to read (`BOOT_INFO_BASE` up to 1 MiB) is read-only, also at
//! CPL 0 since CR0.WP is set.
//!
//! Pages from 1 MiB up and the boot info, manifest and command line are
//! user-accessible (U=1). So a guest can run its code at CPL 3 without
//! building page tables of its own. A segment flagged
//! `abi::PF_TT_SUPERVISOR` is not user-accessible. An image with one (a
//! tt-guest image) also keeps the GDT and page tables mapped (read-write,
//! supervisor-only): it adjusts the host's page tables in place instead of
//! building its own.
//!
//! Above guest RAM, only the MMIO window is mapped: `VIRTIO_MMIO_BASE`
//! (4 GiB) up to one 4 KiB page per device, identity-mapped, R+W, not
//! executable, user-accessible (tt-guest touches device registers at
//! CPL 3). Every access there exits to the host ([`super::bus`]).

use crate::abi;
use crate::loader::Image;

pub const PAGE: u64 = 0x1000;
pub const HUGE: u64 = 0x20_0000;
pub const GDT_BASE: u64 = 0x1000;
pub const PML4_BASE: u64 = 0x2000;
pub const PDPT_BASE: u64 = 0x3000;
pub const PD_BASE: u64 = 0x4000;
pub const PD_COUNT: u64 = 4;
pub const PT_BASE: u64 = 0x8000;
pub const PT_LIMIT: u64 = MONITOR_BASE;
/// The CPL 3 monitor's 4 pages (IDT, TSS, stubs, stack), below the boot
/// info; mapped only when it runs ([`super::monitor`]).
pub const MONITOR_BASE: u64 = 0x7_c000;
pub const BOOT_INFO_BASE: u64 = 0x8_0000;
pub const MFT_BASE: u64 = BOOT_INFO_BASE + 64;
pub const CMDLINE_BASE: u64 = 0x8_2000;
/// Largest guest memory: hypercall arguments are 32-bit addresses.
pub const MAX_MEM: u64 = PD_COUNT << 30;
/// solo5-hvt maps nothing below this address (`X86_PT0_MAP_START`, where
/// it puts the boot info); see [`build_solo5_hvt`].
pub const SOLO5_PT0_MAP_START: u64 = 0x1_0000;
/// Smallest guest memory we accept.
pub const MIN_MEM: u64 = 2 * HUGE;
/// Start of the MMIO window: device `k`'s registers are at
/// `MMIO_BASE + k * MMIO_PAGE`.
pub const MMIO_BASE: u64 = abi::VIRTIO_MMIO_BASE;
/// Bytes of one device's registers in the MMIO window.
pub const MMIO_PAGE: u64 = abi::VIRTIO_MMIO_SIZE;
/// Most devices in the MMIO window.
pub const MAX_MMIO_DEVICES: u64 = 64;

pub const PTE_P: u64 = 1;
pub const PTE_RW: u64 = 1 << 1;
/// User-accessible. tt-host sets it on every page from 1 MiB up (image,
/// heap, stack) and on all upper-level entries; low memory stays
/// supervisor-only. `PML4[0].U = 1` tells a guest it may run at CPL 3 on
/// these tables (see docs/ABI.md, "CPL 3 on the host's page tables").
pub const PTE_US: u64 = 1 << 2;
pub const PTE_PS: u64 = 1 << 7;
pub const PTE_NX: u64 = 1 << 63;

/// Selectors of the flat code and data segments in our GDT.
pub const SEL_CODE: u16 = 0x08;
pub const SEL_DATA: u16 = 0x10;

/// Low memory to copy into the guest: `bytes` go at `GDT_BASE`.
pub struct LowMem {
    pub bytes: Vec<u8>,
}

/// Why the page tables could not be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    #[error("the image ends at {end:#x}; tt-host maps images up to {max:#x} with 4 KiB pages")]
    ImageTooLarge { end: u64, max: u64 },
    #[error("{0} MMIO devices requested; a VM has at most {MAX_MMIO_DEVICES}")]
    TooManyMmioDevices(u64),
}

/// Build the GDT and page tables for `image` in `mem_size` bytes, with an
/// MMIO window of `mmio_devices` pages at [`MMIO_BASE`]. With `monitor`
/// (the image runs at CPL 3 under [`super::monitor`]), the GDT gets the
/// monitor's user segments and TSS, and the GDT and monitor pages are
/// mapped supervisor-only.
///
/// `mem_size` must be a multiple of 2 MiB between [`MIN_MEM`] and
/// [`MAX_MEM`] (the caller rounds and checks it).
pub fn build(
    image: &Image,
    mem_size: u64,
    mmio_devices: u64,
    monitor: bool,
) -> Result<LowMem, LayoutError> {
    assert!(mem_size % HUGE == 0 && (MIN_MEM..=MAX_MEM).contains(&mem_size));
    if mmio_devices > MAX_MMIO_DEVICES {
        return Err(LayoutError::TooManyMmioDevices(mmio_devices));
    }
    let small_end = image.kernel_end.div_ceil(HUGE) * HUGE;
    let pt_pages = small_end / HUGE;
    let mmio_tables = if mmio_devices > 0 { 2 } else { 0 };
    let max = ((PT_LIMIT - PT_BASE) / PAGE - mmio_tables) * HUGE;
    if small_end > max {
        return Err(LayoutError::ImageTooLarge {
            end: image.kernel_end,
            max,
        });
    }
    let tables_end = PT_BASE + (pt_pages + mmio_tables) * PAGE;
    let mut low = vec![0u8; (tables_end - GDT_BASE) as usize];
    let mut put = |gpa: u64, val: u64| {
        let o = (gpa - GDT_BASE) as usize;
        low[o..o + 8].copy_from_slice(&val.to_le_bytes());
    };

    // GDT: null, 64-bit code (type exec/read, accessed; L=1, G=1), data.
    put(GDT_BASE, 0);
    put(GDT_BASE + 8, 0x00af_9b00_0000_ffff);
    put(GDT_BASE + 16, 0x00cf_9300_0000_ffff);
    if monitor {
        for (offset, desc) in super::monitor::gdt_entries() {
            put(GDT_BASE + offset, desc);
        }
    }

    put(PML4_BASE, PDPT_BASE | PTE_P | PTE_RW | PTE_US);
    for i in 0..PD_COUNT {
        put(
            PDPT_BASE + i * 8,
            (PD_BASE + i * PAGE) | PTE_P | PTE_RW | PTE_US,
        );
    }
    // Page directories: 4 KiB tables below small_end, 2 MiB pages above.
    for i in 0..mem_size / HUGE {
        let pde = if i < pt_pages {
            (PT_BASE + i * PAGE) | PTE_P | PTE_RW | PTE_US
        } else {
            (i * HUGE) | PTE_P | PTE_RW | PTE_US | PTE_PS | PTE_NX
        };
        put(PD_BASE + i * 8, pde);
    }
    // An image that marks segments supervisor-only (abi::PF_TT_SUPERVISOR)
    // runs its code at CPL 3 and edits these page tables at CPL 0.
    let split = image.segments.iter().any(|s| s.prot.supervisor);
    // Page tables: page 0 absent; the GDT and page tables absent, as in
    // solo5-hvt, except for images that edit them; the tender's data for the
    // guest read-only; W^X from the segments; the rest R+W, NX.
    for page in 1..small_end / PAGE {
        let addr = page * PAGE;
        if monitor {
            if let Some(flags) = super::monitor::page_flags(addr) {
                put(PT_BASE + page * 8, addr | flags);
                continue;
            }
        }
        if addr < BOOT_INFO_BASE && !split {
            continue;
        }
        let seg = image
            .segments
            .iter()
            .find(|s| addr >= s.page_start() && addr < s.page_end());
        let boot_data = (BOOT_INFO_BASE..CMDLINE_BASE + abi::CMDLINE_SIZE as u64).contains(&addr);
        let tender_data = (BOOT_INFO_BASE..abi::GUEST_MIN_BASE).contains(&addr);
        let flags = match seg {
            Some(s) => {
                let mut f = PTE_P;
                if s.prot.write {
                    f |= PTE_RW;
                }
                if !s.prot.exec {
                    f |= PTE_NX;
                }
                f
            }
            None if tender_data => PTE_P | PTE_NX,
            None => PTE_P | PTE_RW | PTE_NX,
        };
        let supervisor = seg.is_some_and(|s| s.prot.supervisor);
        let user = if (addr >= abi::GUEST_MIN_BASE || boot_data) && !supervisor {
            PTE_US
        } else {
            0
        };
        put(PT_BASE + page * 8, addr | flags | user);
    }
    // The MMIO window: PDPT[4] -> its page directory -> its page table.
    if mmio_devices > 0 {
        const { assert!(MMIO_BASE == MAX_MEM && MMIO_BASE % (1 << 30) == 0) };
        let pd = PT_BASE + pt_pages * PAGE;
        let pt = pd + PAGE;
        let upper = PTE_P | PTE_RW | PTE_US;
        put(PDPT_BASE + (MMIO_BASE >> 30) * 8, pd | upper);
        put(pd, pt | upper);
        for k in 0..mmio_devices {
            let addr = MMIO_BASE + k * MMIO_PAGE;
            put(pt + k * 8, addr | PTE_P | PTE_RW | PTE_US | PTE_NX);
        }
    }
    Ok(LowMem { bytes: low })
}

/// Solo5's hvt tender's page tables instead of ours, as solo5-hvt 0.6.0
/// and later (every release that runs hvt ABI 2 images) builds them
/// (`hvt_x86_setup_pagetables` in tenders/hvt/hvt_cpu_x86_64.c): the first
/// 2 MiB with 4 KiB pages, of which those below `SOLO5_PT0_MAP_START`
/// (zero page, GDT, page tables) are absent and the rest below 1 MiB
/// present and read-only; above, 2 MiB present writable pages. Nothing is
/// NX or user-accessible. `tt-host run --x-solo5-hvt-boot` uses them to
/// check that a guest also boots the way solo5-hvt starts it.
pub fn build_solo5_hvt(mem_size: u64) -> LowMem {
    assert!(mem_size % HUGE == 0 && (MIN_MEM..=MAX_MEM).contains(&mem_size));
    let mut low = vec![0u8; (PT_BASE + PAGE - GDT_BASE) as usize];
    let mut put = |gpa: u64, val: u64| {
        let o = (gpa - GDT_BASE) as usize;
        low[o..o + 8].copy_from_slice(&val.to_le_bytes());
    };
    put(GDT_BASE + 8, 0x00af_9b00_0000_ffff);
    put(GDT_BASE + 16, 0x00cf_9300_0000_ffff);
    put(PML4_BASE, PDPT_BASE | PTE_P | PTE_RW);
    for i in 0..PD_COUNT {
        put(PDPT_BASE + i * 8, (PD_BASE + i * PAGE) | PTE_P | PTE_RW);
    }
    put(PD_BASE, PT_BASE | PTE_P | PTE_RW);
    for i in 1..mem_size / HUGE {
        put(PD_BASE + i * 8, (i * HUGE) | PTE_P | PTE_RW | PTE_PS);
    }
    for page in SOLO5_PT0_MAP_START / PAGE..HUGE / PAGE {
        let addr = page * PAGE;
        let rw = if addr < abi::GUEST_MIN_BASE {
            0
        } else {
            PTE_RW
        };
        put(PT_BASE + page * 8, addr | PTE_P | rw);
    }
    LowMem { bytes: low }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::{Manifest, Prot, Segment};

    fn image() -> Image {
        let seg = |vaddr, memsz, read, write, exec| Segment {
            vaddr,
            filesz: 0,
            memsz,
            offset: 0,
            prot: Prot {
                read,
                write,
                exec,
                supervisor: false,
            },
        };
        Image {
            entry: 0x10_0000,
            segments: vec![
                seg(0x10_0000, 0x1800, true, false, true),
                seg(0x10_2000, 0x10, true, false, false),
                seg(0x10_3000, 0x2000, true, true, false),
            ],
            kernel_end: 0x10_5000,
            manifest: Manifest::default(),
        }
    }

    fn pte(low: &LowMem, addr: u64) -> u64 {
        let o = (PT_BASE + addr / PAGE * 8 - GDT_BASE) as usize;
        u64::from_le_bytes(low.bytes[o..o + 8].try_into().unwrap())
    }

    #[test]
    fn supervisor_segments_lose_the_user_bit_and_make_tender_data_read_only() {
        let mut img = image();
        img.segments.push(Segment {
            vaddr: 0x10_5000,
            filesz: 0,
            memsz: 0x2000,
            offset: 0,
            prot: Prot {
                read: true,
                write: true,
                exec: false,
                supervisor: true,
            },
        });
        img.kernel_end = 0x10_7000;
        let low = build(&img, 64 << 20, 0, false).unwrap();
        for addr in [0x10_5000, 0x10_6000] {
            assert_eq!(pte(&low, addr), addr | PTE_P | PTE_RW | PTE_NX, "{addr:#x}");
        }
        // Boot info, manifest and command line: user, read-only.
        for addr in [0x8_0000, 0x8_1000, 0x8_2000, 0x8_3000] {
            assert_eq!(pte(&low, addr), addr | PTE_P | PTE_US | PTE_NX, "{addr:#x}");
        }
        // The other segments and the heap are as without the flag.
        assert_eq!(
            pte(&low, 0x10_4000),
            0x10_4000 | PTE_P | PTE_RW | PTE_US | PTE_NX
        );
        assert_eq!(
            pte(&low, 0x10_7000),
            0x10_7000 | PTE_P | PTE_RW | PTE_US | PTE_NX
        );
    }

    #[test]
    fn segment_flags_become_page_protections() {
        let low = build(&image(), 64 << 20, 0, false).unwrap();
        assert_eq!(pte(&low, 0), 0, "page 0 must be unmapped");
        // boot info, manifest, command line: read-only, readable from user mode
        assert_eq!(pte(&low, 0x8_0000), 0x8_0000 | PTE_P | PTE_US | PTE_NX);
        assert_eq!(pte(&low, 0x8_3000), 0x8_3000 | PTE_P | PTE_US | PTE_NX);
        assert_eq!(pte(&low, 0x8_4000), 0x8_4000 | PTE_P | PTE_NX);
        // text: present, read-only, executable, user
        assert_eq!(pte(&low, 0x10_1000), 0x10_1000 | PTE_P | PTE_US);
        // rodata: read-only, no execute
        assert_eq!(pte(&low, 0x10_2000), 0x10_2000 | PTE_P | PTE_US | PTE_NX);
        // data: writable, no execute
        assert_eq!(
            pte(&low, 0x10_4000),
            0x10_4000 | PTE_P | PTE_RW | PTE_US | PTE_NX
        );
        // heap after the image: writable, no execute
        assert_eq!(
            pte(&low, 0x1f_f000),
            0x1f_f000 | PTE_P | PTE_RW | PTE_US | PTE_NX
        );
    }

    /// solo5-hvt (0.6.0 on, `hvt_x86_setup_pagetables`) maps neither its
    /// GDT nor its page tables, and low memory above them read-only.
    #[test]
    fn tender_structures_are_unmapped_and_low_memory_read_only() {
        let low = build(&image(), 64 << 20, 0, false).unwrap();
        for addr in (0..BOOT_INFO_BASE).step_by(PAGE as usize) {
            assert_eq!(pte(&low, addr), 0, "{addr:#x} must be unmapped");
        }
        for addr in (BOOT_INFO_BASE..abi::GUEST_MIN_BASE).step_by(PAGE as usize) {
            let e = pte(&low, addr);
            assert_eq!(e & (PTE_P | PTE_RW), PTE_P, "{addr:#x} must be read-only");
        }
    }

    /// A tt-guest image edits the host's page tables at CPL 0 (its stack
    /// guard page), so it keeps them mapped, supervisor-only.
    #[test]
    fn images_with_supervisor_segments_keep_the_page_tables_mapped() {
        let mut img = image();
        img.segments[2].prot.supervisor = true;
        let low = build(&img, 64 << 20, 0, false).unwrap();
        assert_eq!(pte(&low, 0), 0, "page 0 must be unmapped");
        for addr in [GDT_BASE, PML4_BASE, PD_BASE, PT_BASE] {
            assert_eq!(pte(&low, addr), addr | PTE_P | PTE_RW | PTE_NX, "{addr:#x}");
        }
        assert_eq!(pte(&low, 0x8_4000), 0x8_4000 | PTE_P | PTE_NX);
    }

    fn entry(low: &LowMem, gpa: u64) -> u64 {
        let o = (gpa - GDT_BASE) as usize;
        u64::from_le_bytes(low.bytes[o..o + 8].try_into().unwrap())
    }

    #[test]
    fn solo5_hvt_tables_are_solo5_hvts() {
        let mem = 64 << 20;
        let low = build_solo5_hvt(mem);
        assert_eq!(entry(&low, PML4_BASE), PDPT_BASE | PTE_P | PTE_RW);
        for i in 0..PD_COUNT {
            let want = (PD_BASE + i * PAGE) | PTE_P | PTE_RW;
            assert_eq!(entry(&low, PDPT_BASE + i * 8), want);
        }
        // The first 2 MiB: 4 KiB pages; nothing below 64 KiB (zero page,
        // GDT, page tables), then read-only up to 1 MiB, then writable.
        assert_eq!(entry(&low, PD_BASE), PT_BASE | PTE_P | PTE_RW);
        for page in 0..HUGE / PAGE {
            let addr = page * PAGE;
            let want = if addr < SOLO5_PT0_MAP_START {
                0
            } else if addr < abi::GUEST_MIN_BASE {
                addr | PTE_P
            } else {
                addr | PTE_P | PTE_RW
            };
            assert_eq!(pte(&low, addr), want, "{addr:#x}");
        }
        for i in 1..mem / HUGE {
            let want = (i * HUGE) | PTE_P | PTE_RW | PTE_PS;
            assert_eq!(entry(&low, PD_BASE + i * 8), want, "PD[{i}]");
        }
        assert_eq!(entry(&low, PD_BASE + mem / HUGE * 8), 0);
        // The boot info, manifest and command line land in the read-only part.
        const { assert!(BOOT_INFO_BASE >= SOLO5_PT0_MAP_START) };
        const { assert!(CMDLINE_BASE + abi::CMDLINE_SIZE as u64 <= abi::GUEST_MIN_BASE) };
    }

    #[test]
    fn no_page_is_writable_and_executable() {
        let low = build(&image(), 64 << 20, 0, false).unwrap();
        for page in 0..HUGE / PAGE {
            let e = pte(&low, page * PAGE);
            assert!(e & PTE_RW == 0 || e & PTE_NX != 0, "page {page:#x} is W+X");
        }
    }

    #[test]
    fn pml4_advertises_user_mode_pages() {
        let low = build(&image(), 64 << 20, 0, false).unwrap();
        let o = (PML4_BASE - GDT_BASE) as usize;
        let pml4e = u64::from_le_bytes(low.bytes[o..o + 8].try_into().unwrap());
        assert_ne!(pml4e & PTE_US, 0);
    }

    #[test]
    fn memory_above_the_image_uses_huge_non_executable_pages() {
        let low = build(&image(), 64 << 20, 0, false).unwrap();
        let o = (PD_BASE + 8 * 5 - GDT_BASE) as usize;
        let pde = u64::from_le_bytes(low.bytes[o..o + 8].try_into().unwrap());
        assert_eq!(pde, (5 * HUGE) | PTE_P | PTE_RW | PTE_US | PTE_PS | PTE_NX);
    }

    /// The entry at `gpa` in the tables of `low` (memory it does not
    /// cover is zero in a fresh guest).
    fn table_entry(low: &LowMem, gpa: u64) -> u64 {
        let o = (gpa - GDT_BASE) as usize;
        low.bytes
            .get(o..o + 8)
            .map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap()))
    }

    /// Every present leaf mapping of the tables in `low`:
    /// `(virtual address, page size, entry)`.
    fn leaves(low: &LowMem) -> Vec<(u64, u64, u64)> {
        let mut out = Vec::new();
        let next = |e: u64| e & 0x000f_ffff_ffff_f000;
        for i4 in 0..512 {
            let e4 = table_entry(low, PML4_BASE + i4 * 8);
            if e4 & PTE_P == 0 {
                continue;
            }
            for i3 in 0..512 {
                let e3 = table_entry(low, next(e4) + i3 * 8);
                if e3 & PTE_P == 0 {
                    continue;
                }
                for i2 in 0..512 {
                    let e2 = table_entry(low, next(e3) + i2 * 8);
                    let va2 = (i4 << 39) | (i3 << 30) | (i2 << 21);
                    if e2 & PTE_P == 0 {
                        continue;
                    }
                    if e2 & PTE_PS != 0 {
                        out.push((va2, HUGE, e2));
                        continue;
                    }
                    for i1 in 0..512 {
                        let e1 = table_entry(low, next(e2) + i1 * 8);
                        if e1 & PTE_P != 0 {
                            out.push((va2 | (i1 << 12), PAGE, e1));
                        }
                    }
                }
            }
        }
        out
    }

    #[test]
    fn the_mmio_window_is_mapped_rw_nx_user_and_nothing_else_above_ram() {
        for mem in [MIN_MEM, 64 << 20, MAX_MEM] {
            for n in [1, 3, MAX_MMIO_DEVICES] {
                let low = build(&image(), mem, n, false).unwrap();
                let above: Vec<_> = leaves(&low)
                    .into_iter()
                    .filter(|&(va, _, _)| va >= mem)
                    .collect();
                let want: Vec<_> = (0..n)
                    .map(|k| {
                        let addr = MMIO_BASE + k * MMIO_PAGE;
                        (addr, PAGE, addr | PTE_P | PTE_RW | PTE_US | PTE_NX)
                    })
                    .collect();
                assert_eq!(above, want, "mem {mem:#x}, {n} devices");
                // The upper levels let CPL 3 write there.
                let pdpte = table_entry(&low, PDPT_BASE + 4 * 8);
                assert_eq!(pdpte & (PTE_P | PTE_RW | PTE_US), PTE_P | PTE_RW | PTE_US);
                // RAM is mapped as without the window.
                let without = build(&image(), mem, 0, false).unwrap();
                let ram = |l: &LowMem| -> Vec<_> {
                    leaves(l)
                        .into_iter()
                        .filter(|&(va, _, _)| va < mem)
                        .collect()
                };
                assert_eq!(ram(&low), ram(&without), "mem {mem:#x}, {n} devices");
            }
        }
    }

    #[test]
    fn without_mmio_devices_nothing_above_ram_is_mapped() {
        let mem = 64 << 20;
        let low = build(&image(), mem, 0, false).unwrap();
        assert!(leaves(&low).iter().all(|&(va, _, _)| va < mem));
        assert_eq!(table_entry(&low, PDPT_BASE + 4 * 8), 0);
        // And no page-table page is spent on it.
        assert_eq!(low.bytes.len() as u64, PT_BASE + PAGE - GDT_BASE);
        // solo5-hvt's tables have no window either.
        let solo5 = build_solo5_hvt(mem);
        assert!(leaves(&solo5).iter().all(|&(va, _, _)| va < mem));
    }

    #[test]
    fn the_window_tables_sit_in_the_page_table_area() {
        let mut img = image();
        // The largest image that leaves room for the window's two tables.
        let max = ((PT_LIMIT - PT_BASE) / PAGE - 2) * HUGE;
        img.kernel_end = max;
        let low = build(&img, MAX_MEM, MAX_MMIO_DEVICES, false).unwrap();
        assert!(GDT_BASE + low.bytes.len() as u64 <= PT_LIMIT);
        let pd = table_entry(&low, PDPT_BASE + 4 * 8) & !0xfff;
        assert!((PT_BASE..PT_LIMIT - PAGE).contains(&pd), "{pd:#x}");
        img.kernel_end = max + 1;
        assert_eq!(
            build(&img, MAX_MEM, 1, false).err(),
            Some(LayoutError::ImageTooLarge { end: max + 1, max })
        );
        // Without devices, the larger image still fits.
        build(&img, MAX_MEM, 0, false).unwrap();
    }

    #[test]
    fn more_than_64_mmio_devices_are_refused() {
        assert_eq!(
            build(&image(), 64 << 20, MAX_MMIO_DEVICES + 1, false).err(),
            Some(LayoutError::TooManyMmioDevices(MAX_MMIO_DEVICES + 1))
        );
    }
}
