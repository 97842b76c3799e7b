//! Saving and restoring a paused VM: the vCPU's state and guest RAM
//! ([`crate::snapshot`] holds the format).
//!
//! The vCPU is saved between two runs of the loop, after KVM has finished
//! the exit it returned with (an I/O or MMIO exit is completed only by the
//! next `KVM_RUN`: [`Vm::complete_exit`] re-enters once with
//! `immediate_exit` set, which finishes it and runs no guest instruction).
//!
//! Time: the guest's clock is its TSC (Solo5 and tt-guest read it and
//! scale it by the boot info's frequency). The TSC is read as the guest
//! pauses, and written back (`IA32_TSC`) on resume and on restore, so that
//! on KVM with TSC offsetting (VMX, SVM) the guest's monotonic clock does
//! not jump over the time it spent paused or in transit; its wall clock
//! (the WALLTIME hypercall) is the host's, and does. kvm-pvm ignores the
//! write: a PVM guest reads the host's own TSC (docs/SNAPSHOT.md), so there
//! the guest's clock counts the pause, and a restore is refused on a host
//! whose TSC frequency differs. Elsewhere a restore on a host whose TSC
//! runs at another frequency asks KVM to scale it (`KVM_SET_TSC_KHZ`), and
//! is refused if KVM cannot.

use super::{kvm_err, Vm, VmError};
use crate::snapshot;
use kvm_bindings::{kvm_msr_entry, Msrs};
use std::fs::File;
use std::os::unix::fs::FileExt;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

/// IA32_TSC.
const MSR_TSC: u32 = 0x10;

/// The MSRs a guest may have set and that KVM keeps per vCPU: SYSENTER,
/// PAT, MISC_ENABLE, the SYSCALL MSRs, KERNEL_GS_BASE, TSC_AUX. (EFER and
/// the FS/GS bases are in the special registers; there is no local APIC.)
pub const MSRS: &[u32] = &[
    0x174,       // IA32_SYSENTER_CS
    0x175,       // IA32_SYSENTER_ESP
    0x176,       // IA32_SYSENTER_EIP
    0x1a0,       // IA32_MISC_ENABLE
    0x277,       // IA32_PAT
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0102, // KERNEL_GS_BASE
    0xc000_0103, // TSC_AUX
];

/// The (offset, length) ranges of `file`'s first `len` bytes that hold
/// data (`SEEK_DATA`/`SEEK_HOLE`); all of it where the file system cannot
/// say.
fn data_extents(file: &File, len: u64) -> std::io::Result<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut at = 0u64;
    while at < len {
        // SAFETY: lseek on an open descriptor; no pointers.
        let data = unsafe { libc::lseek(fd, at as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::ENXIO) => break, // only a hole is left
                Some(libc::EINVAL) if out.is_empty() && at == 0 => return Ok(vec![(0, len)]),
                _ => return Err(e),
            }
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let (d, h) = (data as u64, (hole as u64).min(len));
        if h > d {
            out.push((d, h - d));
        }
        at = h.max(d + 1);
    }
    Ok(out)
}

/// Memory is written in pieces of this size; a piece of zeros is a hole.
const PIECE: usize = 64 << 10;

impl Vm {
    /// Finish the exit KVM last returned (see the module doc): afterwards
    /// the vCPU's registers are the whole of its state.
    pub fn complete_exit(&mut self) -> Result<(), VmError> {
        let run = self.vcpu.get_kvm_run();
        run.immediate_exit = 1;
        let r = self.vcpu.run().map(|_| ());
        self.vcpu.get_kvm_run().immediate_exit = 0;
        match r {
            Ok(()) => Ok(()),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(()),
            Err(err) => Err(VmError::Kvm {
                what: "complete the last exit",
                err,
            }),
        }
    }

    fn msr(&self, index: u32) -> Option<u64> {
        let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
            index,
            ..Default::default()
        }])
        .ok()?;
        match self.vcpu.get_msrs(&mut msrs) {
            Ok(1) => Some(msrs.as_slice()[0].data),
            _ => None,
        }
    }

    fn set_msr(&self, index: u32, data: u64) -> Result<(), VmError> {
        let msrs = Msrs::from_entries(&[kvm_msr_entry {
            index,
            data,
            ..Default::default()
        }])
        .map_err(|_| VmError::Fault("cannot build an MSR list".into()))?;
        match self.vcpu.set_msrs(&msrs) {
            Ok(1) => Ok(()),
            Ok(_) => Err(VmError::Restore(format!(
                "this host's KVM refused to set MSR {index:#x} to {data:#x}"
            ))),
            Err(err) => Err(VmError::Kvm {
                what: "set MSRs",
                err,
            }),
        }
    }

    /// Note the guest's TSC as it pauses.
    pub fn freeze_tsc(&mut self) -> Result<(), VmError> {
        let tsc = self
            .msr(MSR_TSC)
            .ok_or_else(|| VmError::Restore("cannot read the guest's TSC".into()))?;
        self.frozen_tsc = Some(tsc);
        Ok(())
    }

    /// Set the guest's TSC back to where it paused.
    pub fn unfreeze_tsc(&mut self) -> Result<(), VmError> {
        match self.frozen_tsc.take() {
            Some(tsc) => self.set_msr(MSR_TSC, tsc),
            None => Ok(()),
        }
    }

    /// The vCPU's state (after [`complete_exit`](Self::complete_exit));
    /// its TSC as it paused, if it did.
    pub fn save_vcpu(&self) -> Result<snapshot::Vcpu, VmError> {
        let v = &self.vcpu;
        let tsc = match self.frozen_tsc {
            Some(t) => t,
            None => self
                .msr(MSR_TSC)
                .ok_or_else(|| VmError::Restore("cannot read the guest's TSC".into()))?,
        };
        Ok(snapshot::Vcpu {
            regs: v.get_regs().map_err(kvm_err("get regs"))?,
            sregs: v.get_sregs().map_err(kvm_err("get sregs"))?,
            xsave: v
                .get_xsave()
                .map_err(kvm_err("get XSAVE state"))?
                .region
                .iter()
                .flat_map(|w| w.to_le_bytes())
                .collect(),
            xcrs: v.get_xcrs().map_err(kvm_err("get XCRs"))?,
            events: v.get_vcpu_events().map_err(kvm_err("get vCPU events"))?,
            msrs: MSRS
                .iter()
                .filter_map(|&i| self.msr(i).map(|d| (i, d)))
                .collect(),
            tsc,
            tsc_khz: self.tsc_khz,
        })
    }

    /// Put the vCPU back in the state `s` (on a VM built for the same
    /// launch).
    pub fn restore_vcpu(&mut self, s: &snapshot::Vcpu) -> Result<(), VmError> {
        if s.tsc_khz != self.tsc_khz {
            self.vcpu.set_tsc_khz(s.tsc_khz).map_err(|e| {
                VmError::Restore(format!(
                    "the guest's TSC ran at {} kHz and this host's runs at {} kHz, which KVM \
                     cannot scale ({e}): the guest's clock would be wrong",
                    s.tsc_khz, self.tsc_khz
                ))
            })?;
            self.tsc_khz = s.tsc_khz;
        }
        let v = &self.vcpu;
        v.set_sregs(&s.sregs).map_err(kvm_err("set sregs"))?;
        v.set_regs(&s.regs).map_err(kvm_err("set regs"))?;
        v.set_xcrs(&s.xcrs).map_err(kvm_err("set XCRs"))?;
        let mut xsave = kvm_bindings::kvm_xsave::default();
        if s.xsave.len() != xsave.region.len() * 4 {
            return Err(VmError::Restore(format!(
                "the saved XSAVE state is {} bytes, not {}",
                s.xsave.len(),
                xsave.region.len() * 4
            )));
        }
        for (w, b) in xsave.region.iter_mut().zip(s.xsave.chunks_exact(4)) {
            *w = u32::from_le_bytes(b.try_into().unwrap());
        }
        // SAFETY: `xsave` is a kvm_xsave of the legacy 4 KiB size, without
        // a flexible array; KVM reads no more than that.
        unsafe { v.set_xsave(&xsave) }.map_err(kvm_err("set XSAVE state"))?;
        v.set_vcpu_events(&s.events)
            .map_err(kvm_err("set vCPU events"))?;
        for &(index, data) in &s.msrs {
            self.set_msr(index, data)?;
        }
        self.set_msr(MSR_TSC, s.tsc)
    }

    /// The identity of every image backing a device (see
    /// [`crate::modules::Module::disks`]).
    pub fn disks(&self) -> Result<Vec<snapshot::DiskIdentity>, String> {
        let mut out = Vec::new();
        for m in &self.modules {
            out.extend(m.disks()?);
        }
        self.each_mmio(|_, d| {
            out.extend(d.disks()?);
            Ok(())
        })?;
        Ok(out)
    }

    /// Every MMIO device's state (after they were quiesced).
    pub fn save_mmio(&self) -> Result<Vec<snapshot::MmioState>, String> {
        let mut out = Vec::new();
        self.each_mmio(|base, d| {
            out.push(snapshot::MmioState {
                base,
                state: d.save()?,
            });
            Ok(())
        })?;
        Ok(out)
    }

    /// Give each MMIO device its saved state: every device must have one,
    /// at its address, and every saved state a device.
    pub fn restore_mmio(&mut self, saved: &[snapshot::MmioState]) -> Result<(), VmError> {
        let mut bases = Vec::new();
        self.each_mmio(|base, d| {
            bases.push(base);
            let s = saved
                .iter()
                .find(|s| s.base == base)
                .ok_or_else(|| format!("the snapshot has no state for the device at {base:#x}"))?;
            d.restore(&s.state)
        })
        .map_err(VmError::Restore)?;
        if let Some(s) = saved.iter().find(|s| !bases.contains(&s.base)) {
            return Err(VmError::Restore(format!(
                "the snapshot has a device at {:#x}, which this launch does not",
                s.base
            )));
        }
        Ok(())
    }

    /// The CPL 3 monitor's state, if the image runs under it.
    pub fn save_monitor(&self) -> Option<snapshot::Shadow> {
        let m = &self.monitor.as_ref()?.shadow;
        Some(snapshot::Shadow {
            gdt: m.gdt,
            idt: m.idt,
            tr: m.tr,
            ldt: m.ldt,
            segments: [m.cs, m.ss, m.ds, m.es, m.fs, m.gs],
            interrupts: m.interrupts,
            cr2: m.cr2,
        })
    }

    /// Put the CPL 3 monitor's state back.
    pub fn restore_monitor(&mut self, s: Option<&snapshot::Shadow>) -> Result<(), VmError> {
        match (self.monitor.as_mut(), s) {
            (None, None) => Ok(()),
            (Some(m), Some(s)) => {
                let d = &mut m.shadow;
                (d.gdt, d.idt, d.tr, d.ldt) = (s.gdt, s.idt, s.tr, s.ldt);
                let [cs, ss, ds, es, fs, gs] = s.segments;
                (d.cs, d.ss, d.ds, d.es, d.fs, d.gs) = (cs, ss, ds, es, fs, gs);
                (d.interrupts, d.cr2) = (s.interrupts, s.cr2);
                Ok(())
            }
            _ => Err(VmError::Restore(
                "the snapshot and this launch disagree on the CPL 3 monitor".into(),
            )),
        }
    }

    /// Guest RAM in bytes.
    pub fn mem_size(&self) -> u64 {
        self.mem.iter().map(|r| r.len()).sum()
    }

    /// Each RAM region as (guest address, host slice).
    fn ram(&self) -> Vec<(u64, &[u8])> {
        self.mem
            .iter()
            .map(|r| {
                let host = self
                    .mem
                    .get_host_address(r.start_addr())
                    .expect("a region's start is in memory");
                // SAFETY: the region is a live mapping of `r.len()` bytes
                // owned by `self.mem`, borrowed for as long as `self`. The
                // guest is paused while this is read.
                let s = unsafe { std::slice::from_raw_parts(host, r.len() as usize) };
                (r.start_addr().0, s)
            })
            .collect()
    }

    /// Write guest RAM to `file` (from offset 0; pieces of zeros are left
    /// as holes), then sync it.
    pub fn write_memory(&self, file: &File) -> std::io::Result<()> {
        file.set_len(0)?;
        for (gpa, bytes) in self.ram() {
            for (i, piece) in bytes.chunks(PIECE).enumerate() {
                if piece.iter().all(|&b| b == 0) {
                    continue;
                }
                file.write_all_at(piece, gpa + (i * PIECE) as u64)?;
            }
        }
        file.set_len(self.mem_size())?;
        file.sync_data()
    }

    /// Read guest RAM from `file`, which must be exactly as long.
    pub fn read_memory(&mut self, file: &File) -> Result<(), VmError> {
        let len = file
            .metadata()
            .map_err(|e| VmError::Restore(format!("memory file: {e}")))?
            .len();
        if len != self.mem_size() {
            return Err(VmError::Restore(format!(
                "the memory file is {len} bytes; the guest has {} bytes of memory",
                self.mem_size()
            )));
        }
        // Only the file's data is read: its holes (pages of zeros, left
        // out when it was written) stay as the fresh memory is, zero.
        let err = |e: std::io::Error| VmError::Restore(format!("memory file: {e}"));
        for (at, len) in data_extents(file, len).map_err(err)? {
            for r in self.mem.iter() {
                let (start, end) = (r.start_addr().0, r.start_addr().0 + r.len());
                let (s, e) = (at.max(start), (at + len).min(end));
                if s >= e {
                    continue;
                }
                let host = self
                    .mem
                    .get_host_address(r.start_addr())
                    .expect("a region's start is in memory");
                // SAFETY: `[s, e)` lies inside the region, a live mapping
                // owned by `self.mem`; the guest does not run, so nothing
                // else reads or writes this memory meanwhile.
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(host.add((s - start) as usize), (e - s) as usize)
                };
                file.read_exact_at(dst, s).map_err(err)?;
            }
        }
        Ok(())
    }
}
