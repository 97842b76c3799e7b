//! Fuzz the hvt image loader with arbitrary files.
//!
//! The input is the whole image file, unchanged, so a crash artifact can be
//! handed straight to `tt-host run`. Each input is parsed for three guest
//! memory sizes: the smallest tt-host accepts (4 MiB), the CLI default
//! (512 MiB), and one derived from the last two bytes of the input (a
//! multiple of 2 MiB from 4 MiB to 4 GiB, as `launch` computes it from
//! `--mem`).
//!
//! `parse_image` must never panic. When it accepts an image, everything the
//! VMM then does with it must also work without panicking, and the image
//! must satisfy what the VMM relies on (see `check_image`).

#![no_main]

use libfuzzer_sys::fuzz_target;
use tt_host::abi;
use tt_host::loader::{self, manifest::DeviceInfo, Image, Manifest};
use tt_host::vmm::layout;

fuzz_target!(|data: &[u8]| {
    for mem_size in [layout::MIN_MEM, 512 << 20, derived_mem(data)] {
        if let Ok(image) = loader::parse_image(data, mem_size) {
            check_image(data, mem_size, &image);
            check_layout(mem_size, &image);
            check_manifest(&image.manifest);
        }
    }
});

/// A guest memory size the host could use: `HUGE * n` for n in 2..=2048.
fn derived_mem(data: &[u8]) -> u64 {
    let n = match data {
        [.., a, b] => u16::from_le_bytes([*a, *b]) as u64,
        _ => 0,
    };
    let mem = (2 + n % (layout::MAX_MEM / layout::HUGE - 1)) * layout::HUGE;
    debug_assert!((layout::MIN_MEM..=layout::MAX_MEM).contains(&mem));
    mem
}

/// Invariants of every accepted image.
fn check_image(file: &[u8], mem_size: u64, image: &Image) {
    assert!(
        !image.segments.is_empty(),
        "accepted an image without segments"
    );
    for (i, s) in image.segments.iter().enumerate() {
        let end = s.vaddr.checked_add(s.memsz);
        assert!(
            s.vaddr >= abi::GUEST_MIN_BASE && end.is_some_and(|e| e <= mem_size),
            "segment {i} {:#x}+{:#x} outside [{:#x}, {mem_size:#x})",
            s.vaddr,
            s.memsz,
            abi::GUEST_MIN_BASE
        );
        assert!(s.memsz > 0, "segment {i} is empty");
        assert!(s.filesz <= s.memsz, "segment {i}: filesz > memsz");
        assert!(!(s.prot.write && s.prot.exec), "segment {i} is W+X");
        // The VMM copies these bytes into guest memory at vaddr.
        let bytes = image.segment_bytes(file, s);
        assert_eq!(
            bytes.len() as u64,
            s.filesz,
            "segment {i}: wrong byte count"
        );
        assert!(s.page_start() <= s.vaddr && s.vaddr + s.memsz <= s.page_end());
        assert!(
            s.page_end() <= image.kernel_end,
            "segment {i} ends after kernel_end"
        );
        for (j, o) in image.segments[..i].iter().enumerate() {
            assert!(
                s.page_end() <= o.page_start() || o.page_end() <= s.page_start(),
                "segments {j} and {i} share pages"
            );
        }
    }
    assert!(
        image.kernel_end <= mem_size,
        "kernel_end {:#x} beyond memory {mem_size:#x}",
        image.kernel_end
    );
    assert!(
        image.kernel_end.is_multiple_of(layout::PAGE),
        "kernel_end {:#x} is not page-aligned",
        image.kernel_end
    );
    assert!(
        image
            .segments
            .iter()
            .any(|s| s.prot.exec && image.entry >= s.vaddr && image.entry - s.vaddr < s.memsz),
        "entry {:#x} not inside an executable segment",
        image.entry
    );
}

/// The page tables for an accepted image are W^X and map the entry point
/// executable; low memory (with one MMIO device's tables) stays below the
/// boot info.
fn check_layout(mem_size: u64, image: &Image) {
    // With the CPL 3 monitor's pages mapped too.
    let low = match layout::build(image, mem_size, 1, true) {
        Ok(low) => low,
        Err(layout::LayoutError::ImageTooLarge { .. }) => return,
        Err(e @ layout::LayoutError::TooManyMmioDevices(_)) => panic!("1 device: {e}"),
    };
    assert!(
        layout::GDT_BASE + low.bytes.len() as u64 <= layout::MONITOR_BASE,
        "low memory ({} bytes) runs into the CPL 3 monitor",
        low.bytes.len()
    );
    let entry = |gpa: u64| {
        let o = (gpa - layout::GDT_BASE) as usize;
        low.bytes
            .get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
    };
    // The image's page tables, then the MMIO window's page directory and
    // page table (2 pages, as layout.rs places them).
    let window = 2 * layout::PAGE;
    let tables_end = layout::GDT_BASE + low.bytes.len() as u64;
    let ptes = (tables_end - window - layout::PT_BASE) / 8;
    // The window's leaf entries: its device pages, never executable.
    for k in 0..layout::PAGE / 8 {
        let pte = entry(tables_end - layout::PAGE + k * 8).unwrap();
        assert!(
            pte & layout::PTE_P == 0 || pte & layout::PTE_NX != 0,
            "MMIO window page {k} is executable (pte {pte:#x})"
        );
    }
    for page in 0..ptes {
        let pte = entry(layout::PT_BASE + page * 8).unwrap();
        let present = pte & layout::PTE_P != 0;
        let writable = pte & layout::PTE_RW != 0;
        let exec = pte & layout::PTE_NX == 0;
        assert!(
            !(present && writable && exec),
            "page {:#x} is W+X",
            page * layout::PAGE
        );
    }
    // The GDT and the monitor's pages: mapped, never for CPL 3.
    for addr in [
        layout::GDT_BASE,
        layout::MONITOR_BASE,
        layout::MONITOR_BASE + 0x3000,
    ] {
        let pte = entry(layout::PT_BASE + addr / layout::PAGE * 8).unwrap();
        assert!(
            pte & layout::PTE_P != 0 && pte & layout::PTE_US == 0,
            "page {addr:#x} is not supervisor-only (pte {pte:#x})"
        );
    }
    let pte = entry(layout::PT_BASE + image.entry / layout::PAGE * 8)
        .expect("entry point page has a 4 KiB page-table entry");
    assert!(
        pte & layout::PTE_P != 0 && pte & layout::PTE_NX == 0,
        "entry page {:#x} not executable (pte {pte:#x})",
        image.entry
    );
}

/// Handles are the manifest indices, each used once; what the guest sees
/// round-trips, marks exactly the devices attached, and fits below the
/// command line.
fn check_manifest(m: &Manifest) {
    let mut seen = vec![false; m.count()];
    seen[0] = true;
    let handles = m
        .entries
        .iter()
        .map(|e| e.handle)
        .chain(m.unused.iter().map(|u| u.handle));
    for h in handles {
        let slot = seen
            .get_mut(h as usize)
            .unwrap_or_else(|| panic!("handle {h} outside the {} entries", m.count()));
        assert!(!*slot, "handle {h} used twice");
        *slot = true;
    }
    assert!(m.count() <= abi::MFT_MAX_ENTRIES, "{} entries", m.count());
    for e in &m.entries {
        assert_eq!(
            m.handle_of(&e.name),
            Some(e.handle),
            "handle of '{}'",
            e.name
        );
    }
    let bytes = m.to_guest_bytes(|handle, e| match e.ty {
        abi::MFT_DEV_BLOCK_BASIC => DeviceInfo::Block {
            capacity: handle << 20,
            block_size: 512,
        },
        abi::MFT_DEV_NET_BASIC => DeviceInfo::Net {
            mac: [2, 0, 0, 0, 0, handle as u8],
            mtu: 1500,
        },
        _ => DeviceInfo::Plain,
    });
    assert!(
        layout::MFT_BASE + bytes.len() as u64 <= layout::CMDLINE_BASE,
        "guest manifest ({} bytes) overlaps the command line",
        bytes.len()
    );
    let back = Manifest::parse_guest_view(&bytes).expect("guest manifest parses");
    assert_eq!(&back, m, "guest manifest does not round-trip");
}
