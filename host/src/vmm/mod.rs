//! The virtual machine: guest memory, one vCPU in long mode, the run loop.
//!
//! [`Vm::new`] creates the KVM VM, maps guest memory, copies the image and
//! the low-memory structures ([`layout`]) in, and sets the vCPU registers as
//! Solo5's hvt tender does: CPL 0, long mode, paging on, `rdi` = boot info,
//! `rsp` = top of memory - 8. [`Vm::run`] then runs the vCPU and dispatches
//! every hypercall to the [`Module`] that registered it, until the guest
//! halts or does something the host must stop.

pub mod layout;
pub mod signal;

use crate::abi::{self, Hypercall};
use crate::loader::Image;
use crate::modules::{Action, Module};
use kvm_bindings::{kvm_segment, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
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
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |err| VmError::Kvm { what, err }
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
}

/// A created, ready-to-run VM.
pub struct Vm {
    // Field order matters: the vCPU and VM fds close before memory unmaps.
    vcpu: VcpuFd,
    _vm: VmFd,
    mem: GuestMemoryMmap,
    modules: Vec<Box<dyn Module>>,
    /// `route[nr]` = index into `modules` of the handler of hypercall `nr`.
    route: [Option<usize>; 9],
    /// Number of hypercall exits served so far.
    pub exits: u64,
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

impl Vm {
    /// Create the VM for `p` with these device modules.
    pub fn new(p: &BootParams, modules: Vec<Box<dyn Module>>) -> Result<Vm, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let vm = kvm.create_vm().map_err(kvm_err("create VM"))?;

        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), p.mem_size as usize)])
            .map_err(|_| VmError::Memory(p.mem_size >> 20))?;
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

        // Image segments (memory is fresh and zeroed, so BSS needs nothing).
        for seg in &p.image.segments {
            mem.write_slice(p.image.segment_bytes(p.file, seg), GuestAddress(seg.vaddr))
                .expect("segment inside guest memory: checked by the loader");
        }
        let low = if p.solo5_hvt_boot {
            layout::build_solo5_hvt(p.mem_size)
        } else {
            layout::build(p.image, p.mem_size)?
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
        mem.write_obj(boot_info, GuestAddress(layout::BOOT_INFO_BASE))
            .unwrap();

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
        Ok(Vm {
            vcpu,
            _vm: vm,
            mem,
            modules,
            route,
            exits: 0,
        })
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
        for m in &mut self.modules {
            if let Err(e) = m.shutdown() {
                failed.push(e);
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
            let exit = match self.vcpu.run() {
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
            let (port, arg) = match exit {
                VcpuExit::IoOut(port, data) if data.len() == 4 => {
                    (port, u32::from_le_bytes(data.try_into().unwrap()) as u64)
                }
                VcpuExit::IoOut(port, data) => {
                    let msg = format!(
                        "invalid guest port access: {}-byte write to port {port:#x} (hypercalls are 4-byte writes)",
                        data.len()
                    );
                    return Err(self.fault(&msg));
                }
                VcpuExit::IoIn(port, _) => {
                    let msg = format!("invalid guest port access: read from port {port:#x}");
                    return Err(self.fault(&msg));
                }
                VcpuExit::MmioRead(addr, _) | VcpuExit::MmioWrite(addr, _) => {
                    let msg = format!("guest accessed {addr:#x}, outside guest memory");
                    return Err(self.fault(&msg));
                }
                VcpuExit::Shutdown => {
                    return Err(
                        self.fault("guest triple fault (an exception the guest could not handle)")
                    );
                }
                VcpuExit::Hlt => {
                    return Err(
                        self.fault("guest executed HLT with interrupts off and will never wake")
                    );
                }
                VcpuExit::InternalError => {
                    return Err(self.fault(
                        "KVM internal error: this host's KVM could not emulate a guest instruction \
                         (on kvm-pvm, SSE at CPL 0 can cause this)",
                    ));
                }
                VcpuExit::FailEntry(reason, _) => {
                    let msg =
                        format!("KVM could not enter the guest (hardware reason {reason:#x})");
                    return Err(self.fault(&msg));
                }
                other => {
                    let msg = format!("unexpected KVM exit {other:?}");
                    return Err(self.fault(&msg));
                }
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
            match self.modules[module].handle(call, arg, &self.mem) {
                Ok(Action::Continue) => {}
                Ok(Action::Exit(status)) => return Ok(status),
                Err(e) => {
                    let msg = e.to_string();
                    return Err(self.fault(&msg));
                }
            }
        }
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
