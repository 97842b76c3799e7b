//! The virtual machine: guest memory, one vCPU in long mode, the run loop.
//!
//! [`Vm::new`] creates the KVM VM, maps guest memory, copies the image and
//! the low-memory structures ([`layout`]) in, and sets the vCPU registers as
//! Solo5's hvt tender does: CPL 0, long mode, paging on, `rdi` = boot info,
//! `rsp` = top of memory - 8. [`Vm::run`] then runs the vCPU and dispatches
//! every hypercall to the [`Module`] that registered it, and every MMIO
//! access in a device's region to that device ([`bus`]), until the guest
//! halts or does something the host must stop.
//!
//! Devices in the MMIO window ([`MmioRegion`]) may ask for their queue
//! notifications on eventfds (KVM_IOEVENTFD). Where KVM refuses to register
//! one, such a write reaches the device as an ordinary MMIO write instead.

pub mod bus;
pub mod control;
pub mod dirty;
#[cfg(test)]
mod kvm_tests;
pub mod layout;
pub mod monitor;
pub mod signal;
pub mod state;

use crate::abi::{self, Hypercall};
use crate::loader::Image;
use crate::modules::{Action, GuestMem, Module};
pub use bus::{Bus, BusError, MmioDevice, MmioRegion};
use kvm_bindings::{kvm_segment, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{IoEventAddress, Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Host-side failures: KVM calls, or a guest the host had to stop.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0} (is KVM available and are you allowed to use it?)")]
    OpenKvm(kvm_ioctls::Error),
    #[error("KVM: {what} failed: {err}")]
    Kvm {
        what: &'static str,
        err: kvm_ioctls::Error,
    },
    #[error("cannot allocate {0} MiB of guest memory")]
    Memory(u64),
    #[error(transparent)]
    Layout(#[from] layout::LayoutError),
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("MMIO region {base:#x}+{len:#x} is outside the MMIO window {:#x}..{end:#x} of its VM's {n} devices; device k's registers are at {:#x} + k * {:#x}", layout::MMIO_BASE, layout::MMIO_BASE, layout::MMIO_PAGE)]
    OutsideMmioWindow {
        base: u64,
        len: u64,
        end: u64,
        n: usize,
    },
    #[error(
        "the device at {0:#x} failed (it panicked) before the guest started; it cannot be attached"
    )]
    DevicePoisoned(u64),
    #[error("queue notification address {addr:#x} is not a 4-byte register inside its device's MMIO region {base:#x}+{len:#x}")]
    NotifyOutsideRegion { addr: u64, base: u64, len: u64 },
    #[error("guest command line is {0} bytes; at most {max} are allowed", max = abi::CMDLINE_SIZE - 1)]
    CmdlineTooLong(usize),
    #[error("guest fault: {0}")]
    Fault(String),
    /// The guest stopped, but a device could not be flushed.
    #[error("{0}")]
    Shutdown(String),
    /// SIGINT or SIGTERM: the guest was stopped (and its devices flushed),
    /// as solo5-hvt exits on either.
    #[error("exiting on signal {0} ({name}); the guest was stopped", name = signal::name(*.0))]
    Signal(i32),
    /// A snapshot or migration could not be saved or restored.
    #[error("{0}")]
    Restore(String),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |err| VmError::Kvm { what, err }
}

/// The VM's memory and fd, shared with a migration's sender (which reads
/// memory and the dirty log while the vCPU runs).
#[derive(Clone)]
pub struct Handles {
    pub vm: std::sync::Arc<VmFd>,
    /// All of guest RAM.
    pub mem: GuestMemoryMmap,
    pub memfd: std::sync::Arc<std::fs::File>,
    pub host_dirty: std::sync::Arc<dirty::HostDirty>,
}

/// Everything needed to boot one guest.
pub struct BootParams<'a> {
    pub image: &'a Image,
    pub file: &'a [u8],
    pub mem_size: u64,
    pub cmdline: &'a str,
    /// The manifest as the guest sees it (device fields filled in).
    pub manifest: &'a [u8],
    /// Start the guest in solo5-hvt's boot state instead of tt-host's
    /// (see [`layout::build_solo5_hvt`]); for portability tests.
    pub solo5_hvt_boot: bool,
    /// Run the image's code at CPL 3 under the [`monitor`].
    pub cpl3: bool,
}

/// A created, ready-to-run VM.
pub struct Vm {
    // Field order matters: the vCPU and VM fds close before memory unmaps
    // (a migration's [`Handles`] hold the VM fd with a clone of memory).
    vcpu: VcpuFd,
    vm: std::sync::Arc<VmFd>,
    mem: GuestMemoryMmap,
    /// The memfd guest RAM lives in (shared with a local live upgrade).
    memfd: std::sync::Arc<std::fs::File>,
    /// Guest memory the host writes for the guest while a migration
    /// tracks it (KVM's dirty log sees only the guest's own writes).
    host_dirty: std::sync::Arc<dirty::HostDirty>,
    /// Guest memory from [`layout::BOOT_INFO_BASE`] up: what hypercall
    /// handlers and devices read and write on the guest's behalf. Below it
    /// lie the GDT, the page tables and the CPL 3 monitor, which no guest
    /// request can name. Hypercall handlers also get the image's protected
    /// ranges ([`Image::protected_ranges`]), which they never write.
    guest: GuestMem,
    modules: Vec<Box<dyn Module>>,
    bus: Bus,
    /// The queue-notification eventfds KVM signals (kept open for as long
    /// as the VM); those it refused are delivered as MMIO writes.
    _notify: Vec<vmm_sys_util::eventfd::EventFd>,
    notify_by_eventfd: bool,
    /// `route[nr]` = index into `modules` of the handler of hypercall `nr`.
    route: [Option<usize>; 9],
    /// Number of hypercall exits served so far.
    pub exits: u64,
    /// Number of MMIO exits served by devices so far.
    pub mmio_exits: u64,
    /// Every return of KVM_RUN to tt-host so far (hypercalls, MMIO,
    /// signals and anything else): the exits to user space.
    pub run_returns: u64,
    /// The CPL 3 monitor, when the image runs under it.
    pub monitor: Option<monitor::emulate::Monitor>,
    /// What the image may not write through the monitor
    /// ([`Image::protected_ranges`]: low memory, its read-only and
    /// executable segments), as `[start, end)` ranges.
    readonly: Vec<(u64, u64)>,
    /// The TSC frequency the guest was told, in kHz.
    tsc_khz: u32,
    /// Control requests ([`control`]), with `--control`.
    control: Option<std::sync::Arc<control::Inbox>>,
    /// How the guest was launched, for a snapshot.
    launch: Option<crate::snapshot::Launch>,
    /// The guest's TSC when it paused, while it is paused.
    frozen_tsc: Option<u64>,
    /// The guest went to another tt-host: its devices are not ours to
    /// flush at the end.
    handed_over: bool,
}

fn segment(selector: u16, type_: u8, l: u8, db: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db,
        s: 1,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

const CR0_PE: u64 = 1;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const EFER_NXE: u64 = 1 << 11;

/// The guest's initial `(CR0, CR4, EFER)`: solo5-hvt's
/// (`X86_CR0_INIT`, `X86_CR4_INIT`, `X86_EFER_INIT` in
/// tenders/hvt/hvt_cpu_x86_64.h), except that tt-host's own page tables
/// use NX bits and so need `EFER.NXE`.
fn boot_control_registers(solo5_hvt_boot: bool) -> (u64, u64, u64) {
    let cr0 = CR0_PE | CR0_NE | CR0_WP | CR0_PG;
    let cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    let efer = if solo5_hvt_boot {
        EFER_LME | EFER_LMA
    } else {
        EFER_LME | EFER_LMA | EFER_NXE
    };
    (cr0, cr4, efer)
}

/// Check that the regions lie in the MMIO window of a VM with that many
/// devices, with their notification registers inside them.
fn check_regions(regions: &[MmioRegion]) -> Result<(), VmError> {
    let window_end = layout::MMIO_BASE + regions.len() as u64 * layout::MMIO_PAGE;
    for r in regions {
        if r.base < layout::MMIO_BASE || r.base.saturating_add(r.len) > window_end {
            return Err(VmError::OutsideMmioWindow {
                base: r.base,
                len: r.len,
                end: window_end,
                n: regions.len(),
            });
        }
        for &(addr, _, _) in &r.notify {
            if addr < r.base || addr.saturating_add(4) > r.base + r.len {
                return Err(VmError::NotifyOutsideRegion {
                    addr,
                    base: r.base,
                    len: r.len,
                });
            }
        }
    }
    Ok(())
}

/// What a vCPU exit asks of the host, decoded from KVM's exit (separate
/// from serving it, so that decoding is tested without a VM).
#[derive(Debug, PartialEq, Eq)]
enum Exit<'a> {
    /// A hypercall: a 4-byte `out` of `arg` to `port`.
    Hypercall { port: u16, arg: u64 },
    /// A read of `data.len()` bytes at guest address `addr`, outside RAM.
    MmioRead { addr: u64, data: &'a mut [u8] },
    /// A write of `data` at guest address `addr`, outside RAM.
    MmioWrite { addr: u64, data: &'a [u8] },
    /// A stub of the CPL 3 monitor: a 1-byte `out` to
    /// [`monitor::TRAP_PORT`].
    Trap,
    /// Anything else: the host stops the guest, saying why.
    Stop(String),
}

fn decode(exit: VcpuExit<'_>) -> Exit<'_> {
    let stop = |s: &str| Exit::Stop(s.to_string());
    match exit {
        VcpuExit::IoOut(monitor::TRAP_PORT, [_]) => Exit::Trap,
        VcpuExit::IoOut(port, data) => match <[u8; 4]>::try_from(data) {
            Ok(word) => Exit::Hypercall {
                port,
                arg: u32::from_le_bytes(word) as u64,
            },
            Err(_) => Exit::Stop(format!(
                "invalid guest port access: {}-byte write to port {port:#x} (hypercalls are 4-byte writes)",
                data.len()
            )),
        },
        VcpuExit::IoIn(port, _) => {
            Exit::Stop(format!("invalid guest port access: read from port {port:#x}"))
        }
        VcpuExit::MmioRead(addr, data) => Exit::MmioRead { addr, data },
        VcpuExit::MmioWrite(addr, data) => Exit::MmioWrite { addr, data },
        VcpuExit::Shutdown => stop("guest triple fault (an exception the guest could not handle)"),
        VcpuExit::Hlt => stop(monitor::emulate::HLT),
        VcpuExit::InternalError => stop(
            "KVM internal error: this host's KVM could not emulate a guest instruction \
             (on kvm-pvm, SSE at CPL 0 can cause this)",
        ),
        VcpuExit::FailEntry(reason, _) => Exit::Stop(format!(
            "KVM could not enter the guest (hardware reason {reason:#x})"
        )),
        other => Exit::Stop(format!("unexpected KVM exit {other:?}")),
    }
}

/// Guest RAM: see [`guest_memory`].
pub struct Memory {
    /// All of it.
    pub all: GuestMemoryMmap,
    /// From [`layout::BOOT_INFO_BASE`] up: see `Vm::guest`.
    pub guest: GuestMemoryMmap,
    /// The memfd it is a shared mapping of.
    pub file: std::sync::Arc<std::fs::File>,
    /// Filled from elsewhere (a migration): [`Vm::with_memory`] writes
    /// nothing into it.
    pub incoming: bool,
}

/// Guest RAM of `size` bytes in a memfd (so that a local live upgrade can
/// hand it to the next tt-host: [`crate::migration`]), as two regions split
/// at [`layout::BOOT_INFO_BASE`] (one KVM memory slot each; the guest sees
/// one block), and the view of it without the first: see `Vm::guest`.
/// With `file`, the memfd is that one (received), else a new one.
pub fn guest_memory(size: u64, file: Option<std::fs::File>) -> Result<Memory, VmError> {
    use std::sync::Arc;
    use vm_memory::{FileOffset, GuestRegionMmap};
    let err = |_| VmError::Memory(size >> 20);
    let incoming = file.is_some();
    let file = match file {
        Some(f) => f,
        None => {
            // SAFETY: a NUL-terminated name and plain flags.
            let fd = unsafe { libc::memfd_create(c"tt-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
            if fd < 0 {
                return Err(VmError::Memory(size >> 20));
            }
            // SAFETY: memfd_create returned a new descriptor we own.
            let f = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
            f.set_len(size).map_err(|_| VmError::Memory(size >> 20))?;
            f
        }
    };
    match file.metadata() {
        Ok(m) if m.len() == size => {}
        _ => return Err(VmError::Memory(size >> 20)),
    }
    let file = Arc::new(file);
    let split = layout::BOOT_INFO_BASE;
    let region = |at: u64, len: u64| {
        let fo = FileOffset::from_arc(file.clone(), at);
        GuestRegionMmap::<()>::from_range(GuestAddress(at), len as usize, Some(fo))
            .map_err(|_| VmError::Memory(size >> 20))
    };
    let low = region(0, split)?;
    let high = Arc::new(region(split, size - split)?);
    let all = GuestMemoryMmap::from_arc_regions(vec![Arc::new(low), high.clone()]).map_err(err)?;
    let guest = GuestMemoryMmap::from_arc_regions(vec![high]).map_err(err)?;
    Ok(Memory {
        all,
        guest,
        file,
        incoming,
    })
}

impl Vm {
    /// Create the VM for `p` with these device modules and these devices
    /// in the MMIO window (the k-th of n at [`layout::MMIO_BASE`] +
    /// k * [`layout::MMIO_PAGE`]; the window is mapped in the guest's page
    /// tables, except in solo5-hvt's boot state, which has none). Each
    /// device gets guest memory ([`MmioDevice::attach_memory`]) before the
    /// guest runs.
    pub fn new(
        p: &BootParams,
        modules: Vec<Box<dyn Module>>,
        regions: Vec<MmioRegion>,
    ) -> Result<Vm, VmError> {
        Vm::with_memory(p, modules, regions, guest_memory(p.mem_size, None)?)
    }

    /// [`Vm::new`] on this memory; memory that is `incoming` (a
    /// migration's) is left as it is, for the vCPU state that goes with
    /// it ([`Vm::restore_vcpu`]).
    pub fn with_memory(
        p: &BootParams,
        modules: Vec<Box<dyn Module>>,
        regions: Vec<MmioRegion>,
        memory: Memory,
    ) -> Result<Vm, VmError> {
        check_regions(&regions)?;
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let vm = kvm.create_vm().map_err(kvm_err("create VM"))?;

        let Memory {
            all: mem,
            guest,
            file: memfd,
            incoming,
        } = memory;
        if mem.iter().map(|r| r.len()).sum::<u64>() != p.mem_size {
            return Err(VmError::Memory(p.mem_size >> 20));
        }
        for (slot, region) in mem.iter().enumerate() {
            let host = mem
                .get_host_address(region.start_addr())
                .map_err(|_| VmError::Memory(p.mem_size >> 20))?;
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region is a live mmap owned by `mem`, which the
            // returned Vm keeps alive for as long as the VM fd exists (the
            // fds are dropped first, see the field order of Vm).
            unsafe { vm.set_user_memory_region(r) }.map_err(kvm_err("set memory region"))?;
        }

        if !incoming {
            Self::write_boot_memory(p, &mem, regions.len() as u64)?;
        }
        let vcpu = vm.create_vcpu(0).map_err(kvm_err("create vCPU"))?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("get supported CPUID"))?;
        vcpu.set_cpuid2(&cpuid).map_err(kvm_err("set CPUID"))?;
        let tsc_khz = vcpu.get_tsc_khz().map_err(kvm_err("get TSC frequency"))?;

        let boot_info = abi::BootInfo {
            mem_size: p.mem_size,
            kernel_end: p.image.kernel_end,
            cpu_cycle_freq: tsc_khz as u64 * 1000,
            cmdline: layout::CMDLINE_BASE,
            mft: layout::MFT_BASE,
        };
        if !incoming {
            mem.write_obj(boot_info, GuestAddress(layout::BOOT_INFO_BASE))
                .unwrap();
        }

        let mut sregs = vcpu.get_sregs().map_err(kvm_err("get sregs"))?;
        let (cr0, cr4, efer) = boot_control_registers(p.solo5_hvt_boot);
        sregs.cr0 = cr0;
        sregs.cr3 = layout::PML4_BASE;
        sregs.cr4 = cr4;
        sregs.efer = efer;
        let code = segment(layout::SEL_CODE, 0xb, 1, 0);
        let data = segment(layout::SEL_DATA, 0x3, 0, 1);
        sregs.cs = code;
        (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
        sregs.gdt.base = layout::GDT_BASE;
        sregs.gdt.limit = 3 * 8 - 1;
        // No IDT until the guest loads one, as solo5-hvt starts it (KVM's
        // reset value has a 64 KiB limit).
        sregs.idt.base = 0;
        sregs.idt.limit = 0;
        // solo5-hvt passes IA32_APIC_BASE = 0 (APIC disabled): there is no
        // interrupt controller (KVM's reset value says enabled, at 0xfee00000).
        sregs.apic_base = 0;
        sregs.tr = kvm_segment {
            type_: 11, // 64-bit TSS, busy
            present: 1,
            ..Default::default()
        };
        sregs.ldt = kvm_segment {
            unusable: 1,
            ..Default::default()
        };
        if p.cpl3 {
            // The image starts at CPL 3 on the monitor's user segments,
            // with the monitor's IDT and TSS (see monitor's module doc).
            if !incoming {
                monitor::install(&mem);
            }
            let mut code = segment(monitor::SEL_USER_CODE, 0xb, 1, 0);
            let mut data = segment(monitor::SEL_USER_DATA, 0x3, 0, 1);
            (code.dpl, data.dpl) = (3, 3);
            sregs.cs = code;
            (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
            sregs.gdt.limit = monitor::GDT_LIMIT;
            sregs.idt.base = monitor::IDT;
            sregs.idt.limit = (monitor::VECTORS * 16 - 1) as u16;
            let umip = cpuid
                .as_slice()
                .iter()
                .any(|e| e.function == 7 && e.index == 0 && e.ecx & (1 << 2) != 0);
            if umip {
                sregs.cr4 |= monitor::emulate::CR4_UMIP;
            }
            sregs.tr = kvm_segment {
                base: monitor::TSS,
                limit: monitor::TSS_LIMIT,
                selector: monitor::SEL_TSS,
                type_: 11, // 64-bit TSS, busy
                present: 1,
                ..Default::default()
            };
        }
        vcpu.set_sregs(&sregs).map_err(kvm_err("set sregs"))?;

        let regs = kvm_bindings::kvm_regs {
            rip: p.image.entry,
            rflags: 0x2,
            rsp: p.mem_size - 8,
            rdi: layout::BOOT_INFO_BASE,
            // solo5-hvt leaves every other register 0; tt-host says who it
            // is in rsi (except when it plays solo5-hvt).
            rsi: if p.solo5_hvt_boot {
                0
            } else {
                abi::ENTRY_RSI_TT_HOST
            },
            ..Default::default()
        };
        vcpu.set_regs(&regs).map_err(kvm_err("set regs"))?;

        let guest = GuestMem::new(guest, p.image.protected_ranges());

        let mut route = [None; 9];
        for (i, m) in modules.iter().enumerate() {
            for &h in m.hypercalls() {
                assert!(
                    route[h as usize].is_none(),
                    "hypercall {h:?} registered twice"
                );
                route[h as usize] = Some(i);
            }
        }
        let host_dirty = std::sync::Arc::new(dirty::HostDirty::new(p.mem_size));
        let mut vm = Vm {
            vcpu,
            vm: std::sync::Arc::new(vm),
            mem,
            memfd,
            host_dirty,
            guest,
            modules,
            bus: Bus::new(),
            _notify: Vec::new(),
            notify_by_eventfd: true,
            route,
            exits: 0,
            mmio_exits: 0,
            run_returns: 0,
            monitor: p.cpl3.then(monitor::emulate::Monitor::default),
            readonly: p
                .image
                .protected_ranges()
                .iter()
                .map(|r| (r.start, r.end))
                .collect(),
            tsc_khz,
            control: None,
            launch: None,
            frozen_tsc: None,
            handed_over: false,
        };
        vm.attach_regions(regions)?;
        Ok(vm)
    }

    /// Put devices in the MMIO window: on the bus, with guest memory and
    /// their queue notifications on eventfds (KVM_IOEVENTFD). Where KVM
    /// refuses one, such a write reaches the device as an MMIO write.
    /// (A migration's target attaches its devices after its VM is built.)
    pub fn attach_regions(&mut self, regions: Vec<MmioRegion>) -> Result<(), VmError> {
        check_regions(&regions)?;
        for r in &regions {
            self.bus.insert(r.base, r.len, r.device.clone())?;
        }
        for r in &regions {
            let mut d = r
                .device
                .lock()
                .map_err(|_| VmError::DevicePoisoned(r.base))?;
            d.attach_memory(self.guest.memory().clone());
            d.track_writes(Some(self.host_dirty.clone()));
        }
        for (addr, queue, fd) in regions.into_iter().flat_map(|r| r.notify) {
            // A 4-byte write of `queue` signals `fd` instead of exiting. If
            // KVM refuses (kvm-pvm might), the write exits as any other and
            // the device treats it as the kick.
            match self
                .vm
                .register_ioevent(&fd, &IoEventAddress::Mmio(addr), queue)
            {
                Ok(()) => self._notify.push(fd),
                Err(_) => self.notify_by_eventfd = false,
            }
        }
        Ok(())
    }

    /// Serve hypercalls with `modules` (a VM built before its devices were
    /// attached: a migration's target).
    pub fn set_modules(&mut self, modules: Vec<Box<dyn Module>>) {
        let mut route = [None; 9];
        for (i, m) in modules.iter().enumerate() {
            for &h in m.hypercalls() {
                assert!(
                    route[h as usize].is_none(),
                    "hypercall {h:?} registered twice"
                );
                route[h as usize] = Some(i);
            }
        }
        self.modules = modules;
        self.route = route;
    }

    /// Serve control requests from `inbox`; `launch` describes the launch
    /// for snapshots.
    pub fn set_control(
        &mut self,
        inbox: std::sync::Arc<control::Inbox>,
        launch: crate::snapshot::Launch,
    ) {
        self.control = Some(inbox);
        self.launch = Some(launch);
    }

    /// Write the image, tt-host's low memory (GDT, page tables), the
    /// manifest and the command line into fresh guest memory.
    fn write_boot_memory(
        p: &BootParams,
        mem: &GuestMemoryMmap,
        devices: u64,
    ) -> Result<(), VmError> {
        // Image segments (memory is fresh and zeroed, so BSS needs nothing).
        for seg in &p.image.segments {
            mem.write_slice(p.image.segment_bytes(p.file, seg), GuestAddress(seg.vaddr))
                .expect("segment inside guest memory: checked by the loader");
        }
        let low = if p.solo5_hvt_boot {
            layout::build_solo5_hvt(p.mem_size)
        } else {
            layout::build(p.image, p.mem_size, devices, p.cpl3)?
        };
        mem.write_slice(&low.bytes, GuestAddress(layout::GDT_BASE))
            .expect("low memory fits");

        // Boot info, manifest, command line.
        if p.cmdline.len() >= abi::CMDLINE_SIZE || p.cmdline.contains('\0') {
            return Err(VmError::CmdlineTooLong(p.cmdline.len()));
        }
        let mut cmd = p.cmdline.as_bytes().to_vec();
        cmd.push(0);
        mem.write_slice(&cmd, GuestAddress(layout::CMDLINE_BASE))
            .unwrap();
        debug_assert!(layout::MFT_BASE + p.manifest.len() as u64 <= layout::CMDLINE_BASE);
        mem.write_slice(p.manifest, GuestAddress(layout::MFT_BASE))
            .unwrap();

        Ok(())
    }

    /// Whether KVM signals every queue-notification eventfd itself
    /// (KVM_IOEVENTFD); if not, some notifications reach their device as
    /// MMIO writes.
    pub fn notify_by_eventfd(&self) -> bool {
        self.notify_by_eventfd
    }

    /// Run the guest until it halts. Returns its exit status, or the
    /// reason the host stopped it.
    pub fn run(&mut self) -> Result<i32, VmError> {
        let immediate_exit = &mut self.vcpu.get_kvm_run().immediate_exit as *mut u8;
        // SAFETY: the kvm_run mapping lives as long as `self.vcpu`, which
        // outlives `armed` (dropped at the end of this block).
        let armed = unsafe { signal::Armed::new(immediate_exit) };
        let result = self.run_loop();
        drop(armed);
        let mut failed = Vec::new();
        for m in self.modules.iter_mut().filter(|_| !self.handed_over) {
            if let Err(e) = m.shutdown() {
                failed.push(e);
            }
            if let Some(n) = m.notice() {
                eprintln!("tt-host: {n}");
            }
        }
        match result {
            Ok(_) if !failed.is_empty() => Err(VmError::Shutdown(failed.join("; "))),
            Ok(status) => Ok(status),
            Err(e) => {
                // The run already failed; say what else went wrong.
                for f in failed {
                    eprintln!("tt-host: {f}");
                }
                Err(e)
            }
        }
    }

    fn run_loop(&mut self) -> Result<i32, VmError> {
        loop {
            if let Some(sig) = signal::received() {
                return Err(VmError::Signal(sig));
            }
            if signal::take_kick() {
                match self.serve_control()? {
                    control::Flow::Run => {}
                    control::Flow::Exit(status) => return Ok(status),
                }
            }
            let exit = self.vcpu.run();
            self.run_returns += 1;
            crate::runfile::stats::counters().vm_exit();
            let exit = match exit {
                Ok(exit) => exit,
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                Err(e) if e.errno() == libc::EFAULT => {
                    return Err(self.fault("host/guest translation fault"));
                }
                Err(err) => {
                    return Err(VmError::Kvm {
                        what: "run vCPU",
                        err,
                    })
                }
            };
            let (port, arg) = match decode(exit) {
                Exit::Hypercall { port, arg } => (port, arg),
                Exit::MmioRead { addr, data } => match self.bus.read(addr, data) {
                    Ok(()) => {
                        self.mmio_exits += 1;
                        continue;
                    }
                    Err(e) => return Err(self.fault(&e.to_string())),
                },
                Exit::MmioWrite { addr, data } => match self.bus.write(addr, data) {
                    Ok(()) => {
                        self.mmio_exits += 1;
                        continue;
                    }
                    Err(e) => return Err(self.fault(&e.to_string())),
                },
                Exit::Trap if self.monitor.is_some() => {
                    self.serve_trap()?;
                    continue;
                }
                Exit::Trap => {
                    return Err(self.fault(&format!(
                        "invalid guest port access: 1-byte write to port {:#x} (hypercalls \
                         are 4-byte writes)",
                        monitor::TRAP_PORT
                    )))
                }
                Exit::Stop(msg) => return Err(self.fault(&msg)),
            };
            let Some(call) = Hypercall::from_port(port) else {
                let msg = format!("invalid guest port access: port {port:#x} is not a hypercall");
                return Err(self.fault(&msg));
            };
            let Some(module) = self.route[call as usize] else {
                let msg = format!("guest made hypercall {call:?}, which no attached module serves");
                return Err(self.fault(&msg));
            };
            self.exits += 1;
            let result = self.modules[module].handle(call, arg, &self.guest);
            if self.host_dirty.active() {
                self.mark_host_writes(call, arg);
            }
            match result {
                Ok(Action::Continue) => {}
                Ok(Action::Exit(status)) => return Ok(status),
                Err(e) => {
                    let msg = e.to_string();
                    return Err(self.fault(&msg));
                }
            }
        }
    }

    /// The descriptors holding every device's locks.
    pub fn lock_fds(&self) -> Vec<std::os::fd::RawFd> {
        let mut fds: Vec<_> = self.modules.iter().flat_map(|m| m.lock_fds()).collect();
        for (_, d) in self.bus.devices() {
            fds.extend(d.lock().map(|d| d.lock_fds()).unwrap_or_default());
        }
        fds
    }

    /// Run `f` on every device in the MMIO window, in address order; the
    /// first error, naming the device's address if it panicked.
    pub(crate) fn each_mmio(
        &self,
        mut f: impl FnMut(u64, &mut dyn MmioDevice) -> Result<(), String>,
    ) -> Result<(), String> {
        for (base, d) in self.bus.devices() {
            let mut d = d
                .lock()
                .map_err(|_| format!("the device at {base:#x} failed (it panicked)"))?;
            f(base, &mut *d)?;
        }
        Ok(())
    }

    /// The descriptors every module hands over in a local migration.
    pub fn handover_fds(&self) -> Vec<(String, std::os::fd::RawFd)> {
        self.modules.iter().flat_map(|m| m.handover_fds()).collect()
    }

    /// While a migration tracks them: mark what hypercall `call` may have
    /// written into guest memory (its argument struct's OUT fields, and
    /// the buffer of a BLOCK_READ or NET_READ).
    fn mark_host_writes(&self, call: Hypercall, arg: u64) {
        self.host_dirty.mark(arg, 64);
        let buffer = match call {
            Hypercall::BlockRead => self
                .mem
                .read_obj::<abi::HcBlockRead>(GuestAddress(arg))
                .ok()
                .map(|a| (a.data, a.len)),
            Hypercall::NetRead => self
                .mem
                .read_obj::<abi::HcNetRead>(GuestAddress(arg))
                .ok()
                .map(|a| (a.data, a.len)),
            _ => None,
        };
        if let Some((data, len)) = buffer {
            // `len` is OUT now: the bytes the host wrote there.
            self.host_dirty.mark(data, len);
        }
    }

    /// What a migration needs of the VM while the guest runs.
    pub fn handles(&self) -> Handles {
        Handles {
            vm: self.vm.clone(),
            mem: self.mem.clone(),
            memfd: self.memfd.clone(),
            host_dirty: self.host_dirty.clone(),
        }
    }

    /// Serve a trap of the CPL 3 monitor: the stub's stack holds the
    /// vector, the error code and the CPU's frame; the monitor edits the
    /// frame (and registers), and the stub `iretq`s to it.
    fn serve_trap(&mut self) -> Result<(), VmError> {
        let mut regs = self.vcpu.get_regs().map_err(kvm_err("get regs"))?;
        let at = regs.rsp;
        let mut w = [0u64; 7];
        for (i, v) in w.iter_mut().enumerate() {
            *v = self
                .mem
                .read_obj(GuestAddress(at + 8 * i as u64))
                .map_err(|_| self.fault("the CPL 3 monitor's stack is outside guest memory"))?;
        }
        let [vector, error, rip, cs, rflags, rsp, ss] = w;
        if cs as u16 != monitor::SEL_USER_CODE {
            return Err(self.fault(&format!(
                "tt-host's CPL 3 monitor took exception {vector} at CPL 0 (rip {rip:#x})"
            )));
        }
        let mut t = monitor::emulate::Trapped {
            vector: vector as u8,
            error,
            frame: monitor::emulate::Frame {
                rip,
                cs,
                rflags,
                rsp,
                ss,
            },
            gprs: [
                regs.rax, regs.rcx, regs.rdx, regs.rbx, rsp, regs.rbp, regs.rsi, regs.rdi, regs.r8,
                regs.r9, regs.r10, regs.r11, regs.r12, regs.r13, regs.r14, regs.r15,
            ],
            gprs_changed: false,
        };
        let dirty = self.host_dirty.active().then_some(&*self.host_dirty);
        if let Some(d) = dirty {
            d.mark(at, 7 * 8);
        }
        let mut machine = monitor::KvmMachine {
            vcpu: &self.vcpu,
            mem: &self.mem,
            readonly: &self.readonly,
            control: None,
            dirty,
        };
        let monitor = self.monitor.as_mut().expect("served only with a monitor");
        if let Err(monitor::emulate::Stop(msg)) = monitor.trap(&mut t, &mut machine) {
            let cr2 = monitor.shadow.cr2;
            return Err(VmError::Fault(format!(
                "{msg} [rip={:#x} rsp={:#x} cr2={cr2:#x} cpl=3]",
                t.frame.rip, t.frame.rsp
            )));
        }
        for (i, v) in [(2, t.frame.rip), (4, t.frame.rflags), (5, t.frame.rsp)] {
            let _ = self.mem.write_obj(v, GuestAddress(at + 8 * i));
        }
        if t.gprs_changed {
            let g = t.gprs;
            (regs.rax, regs.rcx, regs.rdx, regs.rbx) = (g[0], g[1], g[2], g[3]);
            (regs.rbp, regs.rsi, regs.rdi) = (g[5], g[6], g[7]);
            (regs.r8, regs.r9, regs.r10, regs.r11) = (g[8], g[9], g[10], g[11]);
            (regs.r12, regs.r13, regs.r14, regs.r15) = (g[12], g[13], g[14], g[15]);
            self.vcpu.set_regs(&regs).map_err(kvm_err("set regs"))?;
        }
        Ok(())
    }

    /// A host-detected guest fault, with the vCPU's registers.
    fn fault(&self, what: &str) -> VmError {
        let regs = match (self.vcpu.get_regs(), self.vcpu.get_sregs()) {
            (Ok(r), Ok(s)) => format!(
                " [rip={:#x} rsp={:#x} cr2={:#x} cpl={}]",
                r.rip,
                r.rsp,
                s.cr2,
                s.cs.selector & 3
            ),
            _ => String::new(),
        };
        VmError::Fault(format!("{what}{regs}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hypercall handlers and devices get guest memory from the boot info
    /// up: a request that names the GDT, the page tables or the CPL 3
    /// monitor is refused with a message that says so, never served.
    #[test]
    fn guest_requests_cannot_name_tt_hosts_low_memory() {
        use crate::modules::{check_range, read_args, GuestError};
        let m = guest_memory(8 << 20, None).unwrap();
        let (all, guest) = (m.all, m.guest);
        for at in [
            layout::GDT_BASE,
            layout::PML4_BASE,
            monitor::IDT,
            monitor::STACK,
        ] {
            assert!(all.read_obj::<u64>(GuestAddress(at)).is_ok());
            let e = read_args::<abi::HcWalltime>(&guest, at).unwrap_err();
            assert!(matches!(e, GuestError::Reserved { .. }), "{e:?}");
            assert!(e.to_string().contains("CPL 3 monitor"), "{e}");
            let e = check_range(&guest, "block buffer", at, 512).unwrap_err();
            assert!(matches!(e, GuestError::Reserved { .. }), "{e:?}");
        }
        // Straddling the floor is refused too; the boot info and above
        // are the guest's.
        let floor = layout::BOOT_INFO_BASE;
        assert!(check_range(&guest, "buffer", floor - 8, 16).is_err());
        assert!(check_range(&guest, "buffer", floor, 16).is_ok());
        assert!(read_args::<abi::HcWalltime>(&guest, 0x10_0000).is_ok());
    }

    #[test]
    fn four_byte_port_writes_are_hypercalls_and_other_port_accesses_stop() {
        let arg = 0x1234_5678u32.to_le_bytes();
        assert_eq!(
            decode(VcpuExit::IoOut(0x508, &arg)),
            Exit::Hypercall {
                port: 0x508,
                arg: 0x1234_5678
            }
        );
        let Exit::Stop(msg) = decode(VcpuExit::IoOut(0x508, &[1, 2])) else {
            panic!("a 2-byte out is no hypercall");
        };
        assert!(msg.contains("2-byte write to port 0x508"), "{msg}");
        let Exit::Stop(msg) = decode(VcpuExit::IoIn(0x501, &mut [0; 4])) else {
            panic!("an in is no hypercall");
        };
        assert!(msg.contains("read from port 0x501"), "{msg}");
    }

    #[test]
    fn mmio_exits_keep_their_address_size_and_data() {
        let mut buf = [0u8; 2];
        let Exit::MmioRead { addr, data } = decode(VcpuExit::MmioRead(0x1_0000_0070, &mut buf))
        else {
            panic!("not a read");
        };
        assert_eq!((addr, data.len()), (0x1_0000_0070, 2));
        data.copy_from_slice(&[7, 8]);
        assert_eq!(buf, [7, 8], "the read's data goes back to KVM's buffer");
        assert_eq!(
            decode(VcpuExit::MmioWrite(0x1_0000_0050, &[1, 0, 0, 0])),
            Exit::MmioWrite {
                addr: 0x1_0000_0050,
                data: &[1, 0, 0, 0]
            }
        );
        assert!(matches!(decode(VcpuExit::Shutdown), Exit::Stop(m) if m.contains("triple fault")));
    }
}
