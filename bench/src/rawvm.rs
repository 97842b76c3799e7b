//! The smallest KVM program we can write: one vCPU in 16-bit real mode.
//!
//! It is the yardstick for the other benchmarks. [`floor_guest`] boots a
//! guest made of a single `hlt`, so a whole `tt-bench floor-guest` process
//! costs what any KVM launcher must pay (process start, `/dev/kvm`,
//! `KVM_CREATE_VM`, one vCPU, one `KVM_RUN`) and nothing more.
//! [`exit_round_trip`] times a guest loop of `out dx, eax`, each one a full
//! exit to this process and back, the same round trip a hypercall makes.
//!
//! Real mode keeps the setup to one segment register: `cs` base 0, `rip`
//! 0x1000. The guest runs at CPL 0, which on a kvm-pvm host means KVM's
//! instruction emulator executes it.

use kvm_bindings::{kvm_regs, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use std::time::{Duration, Instant};

/// Guest memory size: 2 MiB.
const MEM_SIZE: usize = 2 << 20;
/// Guest-physical address where the code is placed and `rip` starts.
const CODE_ADDR: usize = 0x1000;
/// The port the exit loop writes to: Solo5's hvt hypercall 1 (WALLTIME).
pub const EXIT_PORT: u16 = 0x501;

/// `hlt`.
const HLT: [u8; 1] = [0xf4];
/// `l: out dx, eax; dec ecx; jnz l; hlt` (16-bit code, hence the 0x66
/// operand-size prefixes). `ecx` = iterations, `dx` = port.
const OUT_LOOP: [u8; 7] = [0x66, 0xef, 0x66, 0x49, 0x75, 0xfa, 0xf4];
/// The same loop with the `out` replaced by `xchg eax, eax` (a 2-byte
/// no-op), to subtract the cost of the loop itself.
const NOP_LOOP: [u8; 7] = [0x66, 0x90, 0x66, 0x49, 0x75, 0xfa, 0xf4];

/// Anonymous host memory backing the guest; unmapped on drop.
struct Mem {
    ptr: *mut u8,
    len: usize,
}

impl Mem {
    fn new(len: usize) -> Result<Mem, String> {
        // SAFETY: an anonymous private mapping with a null hint touches no
        // existing memory; the result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(format!(
                "cannot map {} KiB of guest memory: {}",
                len >> 10,
                std::io::Error::last_os_error()
            ));
        }
        Ok(Mem {
            ptr: ptr.cast(),
            len,
        })
    }

    fn write(&mut self, offset: usize, bytes: &[u8]) {
        assert!(
            offset + bytes.len() <= self.len,
            "write outside guest memory"
        );
        // SAFETY: the range was checked to lie inside the mapping, which is
        // exclusively ours (`&mut self`) and cannot overlap `bytes`.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.add(offset), bytes.len()) }
    }
}

impl Drop for Mem {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly the mapping made in `Mem::new`,
        // and the VM using it is dropped before this (see `RealModeVm`).
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// A VM with one vCPU in real mode, about to execute `code` at 0x1000.
pub struct RealModeVm {
    // Field order matters: the vCPU and VM close before memory unmaps.
    vcpu: VcpuFd,
    _vm: VmFd,
    _mem: Mem,
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> String {
    move |e| format!("KVM: {what} failed: {e}")
}

impl RealModeVm {
    /// Create the VM, copy `code` to 0x1000, point `cs:ip` at it and set the
    /// general registers with `regs` (`rip`/`rflags` already set).
    pub fn new(code: &[u8], regs: impl FnOnce(&mut kvm_regs)) -> Result<RealModeVm, String> {
        RealModeVm::new_timed(code, regs, &mut |_| {})
    }

    /// As [`RealModeVm::new`], calling `lap` after each step with its name.
    fn new_timed(
        code: &[u8],
        regs: impl FnOnce(&mut kvm_regs),
        lap: &mut dyn FnMut(&'static str),
    ) -> Result<RealModeVm, String> {
        let kvm = Kvm::new()
            .map_err(|e| format!("cannot open /dev/kvm: {e} (is KVM available to this user?)"))?;
        let vm = kvm.create_vm().map_err(kvm_err("create VM"))?;
        lap("open /dev/kvm + KVM_CREATE_VM");

        let mut mem = Mem::new(MEM_SIZE)?;
        mem.write(CODE_ADDR, code);
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: MEM_SIZE as u64,
            userspace_addr: mem.ptr as u64,
        };
        // SAFETY: the region is a live mapping owned by `mem`, which the
        // returned RealModeVm keeps until after the VM fd is closed.
        unsafe { vm.set_user_memory_region(region) }.map_err(kvm_err("set memory region"))?;
        lap("mmap 2 MiB + KVM_SET_USER_MEMORY_REGION");

        let vcpu = vm.create_vcpu(0).map_err(kvm_err("create vCPU"))?;
        let mut sregs = vcpu.get_sregs().map_err(kvm_err("get sregs"))?;
        // The reset state is real mode with cs = f000:fff0 (base ffff0000).
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        vcpu.set_sregs(&sregs).map_err(kvm_err("set sregs"))?;
        let mut r = kvm_regs {
            rip: CODE_ADDR as u64,
            rflags: 0x2,
            ..Default::default()
        };
        regs(&mut r);
        vcpu.set_regs(&r).map_err(kvm_err("set regs"))?;
        lap("KVM_CREATE_VCPU + set registers");
        Ok(RealModeVm {
            vcpu,
            _vm: vm,
            _mem: mem,
        })
    }

    /// Run until the guest halts; returns the number of port-write exits.
    pub fn run_to_hlt(&mut self) -> Result<u64, String> {
        let mut outs = 0u64;
        loop {
            match self.vcpu.run() {
                Ok(VcpuExit::Hlt) => return Ok(outs),
                Ok(VcpuExit::IoOut(EXIT_PORT, _)) => outs += 1,
                Ok(other) => return Err(format!("unexpected KVM exit {other:?}")),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Err(e) => return Err(format!("KVM: run vCPU failed: {e}")),
            }
        }
    }
}

/// The body of `tt-bench floor-guest`: boot a lone `hlt` and return.
pub fn floor_guest() -> Result<(), String> {
    let mut vm = RealModeVm::new(&HLT, |_| {})?;
    match vm.run_to_hlt()? {
        0 => Ok(()),
        n => Err(format!("floor guest made {n} port exits; expected none")),
    }
}

/// The floor guest's steps, timed in this process: what a whole
/// `floor-guest` process spends inside KVM.
pub fn floor_breakdown() -> Result<Vec<(&'static str, Duration)>, String> {
    let mut laps = Vec::new();
    let mut last = Instant::now();
    let mut lap = |name: &'static str| {
        let now = Instant::now();
        laps.push((name, now - last));
        last = now;
    };
    let mut vm = RealModeVm::new_timed(&HLT, |_| {}, &mut lap)?;
    vm.run_to_hlt()?;
    lap("KVM_RUN to hlt");
    drop(vm);
    lap("close vCPU + VM, munmap");
    Ok(laps)
}

/// Time of one guest loop of `iters` iterations, from the first `KVM_RUN`
/// to the `hlt` (VM creation excluded).
fn time_loop(code: &[u8], iters: u32, expect_exits: u64) -> Result<Duration, String> {
    let mut vm = RealModeVm::new(code, |r| {
        r.rcx = iters.into();
        r.rdx = EXIT_PORT.into();
    })?;
    let start = Instant::now();
    let exits = vm.run_to_hlt()?;
    let t = start.elapsed();
    if exits != expect_exits {
        return Err(format!(
            "exit loop made {exits} port exits; expected {expect_exits}"
        ));
    }
    Ok(t)
}

/// One measurement of the raw CPL-0 exit round trip.
pub struct ExitSample {
    /// Loop with an `out` per iteration.
    pub out_loop: Duration,
    /// The same loop without the `out`.
    pub nop_loop: Duration,
}

/// Time `iters` iterations of the `out` loop and of the no-op loop.
pub fn exit_round_trip(iters: u32) -> Result<ExitSample, String> {
    assert!(
        iters > 0,
        "the loop counts down from iters and needs at least one"
    );
    Ok(ExitSample {
        nop_loop: time_loop(&NOP_LOOP, iters, 0)?,
        out_loop: time_loop(&OUT_LOOP, iters, iters.into())?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether KVM tests may run; as in the `tests` crate, a missing
    /// /dev/kvm fails them unless TT_SKIP_KVM=1 says to skip, loudly.
    fn kvm() -> bool {
        if std::path::Path::new("/dev/kvm").exists() {
            return true;
        }
        if std::env::var("TT_SKIP_KVM").as_deref() == Ok("1") {
            eprintln!("SKIPPED: /dev/kvm is missing and TT_SKIP_KVM=1 is set");
            return false;
        }
        panic!("/dev/kvm is missing: KVM tests fail without it (set TT_SKIP_KVM=1 to skip them)");
    }

    #[test]
    fn floor_guest_halts_without_exits() {
        if kvm() {
            floor_guest().unwrap();
        }
    }

    #[test]
    fn exit_loop_makes_one_exit_per_iteration() {
        if kvm() {
            // time_loop checks the exit count; the no-op loop makes none.
            let s = exit_round_trip(50).unwrap();
            assert!(s.out_loop > Duration::ZERO && s.nop_loop > Duration::ZERO);
        }
    }
}
