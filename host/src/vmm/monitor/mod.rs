//! The CPL 3 monitor: Solo5 images, which run all their code at CPL 0,
//! run it at CPL 3 instead (`--cpl=3`), where kvm-pvm runs code natively
//! rather than in its instruction emulator.
//!
//! # How
//!
//! The image is entered at CPL 3 (user code and data segments of tt-host's
//! GDT), on the page tables it always gets (its pages are user-accessible
//! already). Hypercalls are `out` instructions, which the TSS's I/O
//! permission bitmap allows for the hypercall ports; `rdtsc` and `cpuid`
//! work at CPL 3. The few privileged instructions a Solo5 image runs (at
//! boot `lgdt`, a far return, segment loads, `ltr`, `lidt`; `wrmsr` of
//! FS_BASE when it sets up TLS; `mov %cr2` in its trap handler; `cli;
//! hlt` at the very end) raise #GP. Every exception enters the monitor: an
//! IDT of tt-host's whose stubs, at CPL 0, push the vector and exit to
//! tt-host with a one-byte `out` to [`TRAP_PORT`]. tt-host then, at native
//! speed ([`emulate`]):
//! - emulates the privileged instruction against the image's *shadow*
//!   state (its GDTR, IDTR, TR, segment selectors, IF and CR2), or
//! - delivers the exception to the image's own IDT handler, with the
//!   frame a CPL 0 handler expects (its selectors, its IST stack), so that
//!   a Solo5 image still reports `Solo5: trap: ...` itself,
//!
//! and edits the exception frame on the monitor's stack, whose stub then
//! `iretq`s back to CPL 3. The stubs are three instructions; the kernel
//! emulates them (CPL 0), so a trap costs tens of microseconds, and a
//! Solo5 image traps about ten times per run.
//!
//! # What is protected
//!
//! The monitor's pages (IDT, TSS, stubs, stack: 4 pages at
//! [`layout::MONITOR_BASE`]) and the GDT are mapped supervisor-only: the
//! image cannot read or write them at CPL 3. tt-host never writes guest
//! memory below 1 MiB on a guest's behalf (hypercall results, block and
//! net reads, virtio buffers: see `Vm::guest_memory`), and what the
//! monitor writes for the image (exception frames, popped stacks) must
//! lie in memory the image may write itself.
//!
//! # What an image can tell
//!
//! docs/ABI.md, "CPL 3 for Solo5 images", lists it: mainly the low bits
//! of CS and SS as the image reads them (3), RFLAGS.IF as `pushf` sees it,
//! and `sgdt`/`sidt`/`str`, which are not privileged and show tt-host's
//! tables.

pub mod emulate;

use super::layout::{self, GDT_BASE, PAGE, PTE_NX, PTE_P, PTE_RW};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// The port the monitor's stubs exit through (`out %al, $TRAP_PORT`). The
/// image cannot reach it: the TSS's I/O bitmap opens only the hypercalls.
pub const TRAP_PORT: u16 = 0xf0;

/// The monitor's IDT: 32 gates (exceptions; a software interrupt from CPL
/// 3 through a DPL 0 gate raises #GP, which the monitor decodes).
pub const IDT: u64 = layout::MONITOR_BASE;
/// The TSS: RSP0, and the I/O permission bitmap.
pub const TSS: u64 = layout::MONITOR_BASE + PAGE;
/// The exception stubs, 16 bytes per vector.
pub const STUBS: u64 = layout::MONITOR_BASE + 2 * PAGE;
/// The stack the stubs run on (TSS.RSP0 is its top).
pub const STACK: u64 = layout::MONITOR_BASE + 3 * PAGE;
/// Gates in the IDT.
pub const VECTORS: u64 = 32;

/// Selectors of the GDT entries the monitor adds (RPL 3 for the user
/// segments): user data, user code (64-bit), TSS.
pub const SEL_USER_DATA: u16 = 0x18 | 3;
pub const SEL_USER_CODE: u16 = 0x20 | 3;
pub const SEL_TSS: u16 = 0x28;
/// GDT limit with the monitor's entries.
pub const GDT_LIMIT: u16 = 0x37;

/// Ports the image may use from CPL 3: the hypercalls.
const OPEN_PORTS: std::ops::Range<u16> = 0x500..0x600;
/// Bytes of the I/O bitmap: it covers ports 0..0x600; ports past its end
/// are refused (the TSS limit ends at the bitmap's 0xff end byte).
const IOMAP_BYTES: u64 = OPEN_PORTS.end as u64 / 8;
/// The TSS's limit: 104 bytes, the bitmap, its end byte.
pub const TSS_LIMIT: u32 = (0x68 + IOMAP_BYTES) as u32;

/// The GDT entries the monitor adds, as (offset, descriptor).
pub fn gdt_entries() -> [(u64, u64); 4] {
    let limit = u64::from(TSS_LIMIT);
    let tss_lo = (limit & 0xffff)
        | ((TSS & 0xff_ffff) << 16)
        | (0x89 << 40)
        | (((limit >> 16) & 0xf) << 48)
        | (((TSS >> 24) & 0xff) << 56);
    [
        (0x18, 0x00cf_f300_0000_ffff), // user data, DPL 3
        (0x20, 0x00af_fb00_0000_ffff), // user code, 64-bit, DPL 3
        (0x28, tss_lo),                // 64-bit TSS, available
        (0x30, TSS >> 32),
    ]
}

/// Page-table flags of low memory the monitor needs mapped
/// (supervisor-only), or `None` for a page it does not use.
pub fn page_flags(addr: u64) -> Option<u64> {
    match addr {
        GDT_BASE | IDT | TSS | STACK => Some(PTE_P | PTE_RW | PTE_NX),
        STUBS => Some(PTE_P),
        _ => None,
    }
}

/// Does the vector push an error code?
pub fn has_error_code(vector: u8) -> bool {
    matches!(vector, 8 | 10..=14 | 17 | 21 | 29 | 30)
}

/// The stub of `vector`: push a zero error code if the CPU pushes none,
/// push the vector, exit to tt-host, drop both and `iretq`.
fn stub(vector: u8) -> Vec<u8> {
    let mut s = Vec::with_capacity(16);
    if !has_error_code(vector) {
        s.extend([0x6a, 0x00]); // push $0
    }
    s.extend([0x6a, vector]); // push $vector (< 0x80: no sign change)
    s.extend([0xe6, TRAP_PORT as u8]); // out %al, $TRAP_PORT
    s.extend([0x48, 0x83, 0xc4, 0x10]); // add $16, %rsp
    s.extend([0x48, 0xcf]); // iretq
    s
}

/// Write the monitor's IDT, TSS and stubs into guest memory (the GDT
/// entries and page tables come from [`layout::build`]).
pub fn install(mem: &GuestMemoryMmap) {
    let mut idt = vec![0u8; PAGE as usize];
    let mut stubs = vec![0u8; PAGE as usize];
    for v in 0..VECTORS {
        let at = STUBS + v * 16;
        let gate_lo = (at & 0xffff)
            | (u64::from(layout::SEL_CODE) << 16)
            | (0x8e << 40) // present, DPL 0, 64-bit interrupt gate
            | (((at >> 16) & 0xffff) << 48);
        let o = (v * 16) as usize;
        idt[o..o + 8].copy_from_slice(&gate_lo.to_le_bytes());
        idt[o + 8..o + 16].copy_from_slice(&(at >> 32).to_le_bytes());
        let code = stub(v as u8);
        let o = (v * 16) as usize;
        stubs[o..o + code.len()].copy_from_slice(&code);
    }
    let mut tss = vec![0u8; PAGE as usize];
    tss[4..12].copy_from_slice(&(STACK + PAGE).to_le_bytes()); // RSP0
    tss[0x66..0x68].copy_from_slice(&0x68u16.to_le_bytes()); // I/O map base
    for byte in 0..IOMAP_BYTES {
        let first_port = (byte * 8) as u16;
        let open = OPEN_PORTS.contains(&first_port);
        tss[(0x68 + byte) as usize] = if open { 0 } else { 0xff };
    }
    tss[(0x68 + IOMAP_BYTES) as usize] = 0xff;
    for (at, bytes) in [(IDT, &idt), (TSS, &tss), (STUBS, &stubs)] {
        mem.write_slice(bytes, GuestAddress(at))
            .expect("the monitor's pages are in guest RAM (below 1 MiB)");
    }
}

/// Is CPL 0 guest code emulated by this host's KVM (kvm-pvm)? Then
/// `--cpl=auto` runs Solo5 images at CPL 3. kvm-pvm is a module of its
/// own (`/sys/module/kvm_pvm`); without it, a CPU with neither VMX nor
/// SVM cannot run CPL 0 guest code natively either.
pub fn cpl0_is_emulated() -> bool {
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        return true;
    }
    let l1 = core::arch::x86_64::__cpuid(1);
    let ext = core::arch::x86_64::__cpuid(0x8000_0001);
    let (vmx, svm) = (l1.ecx & (1 << 5) != 0, ext.ecx & (1 << 2) != 0);
    !(vmx || svm)
}

/// The vCPU and guest memory as the monitor sees them at a trap: image
/// memory from 1 MiB up, writable where the image's segments allow.
pub struct KvmMachine<'a> {
    pub vcpu: &'a kvm_ioctls::VcpuFd,
    pub mem: &'a GuestMemoryMmap,
    /// The image's read-only and executable segments, `[start, end)`.
    pub readonly: &'a [(u64, u64)],
    /// Control registers, read once per trap if needed.
    pub control: Option<emulate::Control>,
    /// Where to mark what the monitor writes, while a migration tracks it.
    pub dirty: Option<&'a super::dirty::HostDirty>,
}

impl emulate::Machine for KvmMachine<'_> {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> bool {
        gpa >= crate::abi::GUEST_MIN_BASE && self.mem.read_slice(buf, GuestAddress(gpa)).is_ok()
    }

    fn write(&mut self, gpa: u64, buf: &[u8]) -> bool {
        let Some(end) = gpa.checked_add(buf.len() as u64) else {
            return false;
        };
        if let Some(d) = self.dirty {
            d.mark(gpa, buf.len() as u64);
        }
        gpa >= crate::abi::GUEST_MIN_BASE
            && !self.readonly.iter().any(|&(s, e)| gpa < e && end > s)
            && self.mem.write_slice(buf, GuestAddress(gpa)).is_ok()
    }

    fn control(&mut self) -> emulate::Control {
        if let Some(c) = self.control {
            return c;
        }
        let c = match self.vcpu.get_sregs() {
            Ok(s) => emulate::Control {
                cr0: s.cr0,
                cr2: s.cr2,
                cr3: s.cr3,
                cr4: s.cr4,
            },
            Err(_) => emulate::Control::default(),
        };
        self.control = Some(c);
        c
    }

    fn msr(&mut self, index: u32) -> Option<u64> {
        let mut msrs = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
            index,
            ..Default::default()
        }])
        .ok()?;
        match self.vcpu.get_msrs(&mut msrs) {
            Ok(1) => Some(msrs.as_slice()[0].data),
            _ => None,
        }
    }

    fn set_msr(&mut self, index: u32, value: u64) -> bool {
        let Ok(msrs) = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
            index,
            data: value,
            ..Default::default()
        }]) else {
            return false;
        };
        matches!(self.vcpu.set_msrs(&msrs), Ok(1))
    }
}
