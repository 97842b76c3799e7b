//! What the monitor does at a trap: emulate a privileged instruction
//! against the image's shadow state, or deliver the exception to the
//! image's own handler. Pure logic over a [`Machine`] (the vCPU and guest
//! memory), so that it is tested without KVM.

use super::has_error_code;
use iced_x86::{Code, Decoder, DecoderOptions, Instruction, Mnemonic, OpKind, Register};

/// The exception frame the CPU pushed on the monitor's stack (a trap from
/// CPL 3), which the stub's `iretq` returns through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Frame {
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

/// One trap: the vector and error code the stub pushed, the frame, and
/// the image's general registers (rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi,
/// r8-r15: x86's numbering; `gprs[4]`, rsp, is the frame's).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Trapped {
    pub vector: u8,
    pub error: u64,
    pub frame: Frame,
    pub gprs: [u64; 16],
    /// Set when a general register was changed (to be written back).
    pub gprs_changed: bool,
}

/// Control registers as the vCPU has them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Control {
    pub cr0: u64,
    /// The address of the last page fault (real CR2).
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
}

/// The vCPU and memory, as the monitor uses them at a trap.
pub trait Machine {
    /// Read image memory (at or above 1 MiB, in RAM); `false` if it is
    /// not memory the image may read.
    fn read(&self, gpa: u64, buf: &mut [u8]) -> bool;
    /// Write image memory the image may write itself; `false` otherwise.
    fn write(&mut self, gpa: u64, buf: &[u8]) -> bool;
    fn control(&mut self) -> Control;
    /// An MSR as the vCPU has it; `None` if KVM has no such MSR.
    fn msr(&mut self, index: u32) -> Option<u64>;
    /// Set FS_BASE, GS_BASE or KERNEL_GS_BASE.
    fn set_msr(&mut self, index: u32, value: u64) -> bool;
}

pub const MSR_FS_BASE: u32 = 0xc000_0100;
pub const MSR_GS_BASE: u32 = 0xc000_0101;
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// CR4.UMIP: tt-host sets it under the monitor (where the CPU has it) so
/// that `sgdt`, `sidt`, `sldt`, `str` and `smsw` trap at CPL 3 and show
/// the image its own values; the image never sees the bit.
pub const CR4_UMIP: u64 = 1 << 11;

const RFLAGS_TF: u64 = 1 << 8;
const RFLAGS_IF: u64 = 1 << 9;
const RFLAGS_NT: u64 = 1 << 14;
const RFLAGS_RF: u64 = 1 << 16;
/// Flags CPL 3 code sets itself (popf, iretq): CF PF AF ZF SF TF DF OF AC
/// ID; IF, IOPL, NT, RF, VM are the monitor's.
const RFLAGS_USER: u64 = 0x0004_0dd5 | (1 << 21);

/// The image's view of its CPU where it differs from the real one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shadow {
    pub gdt: (u64, u16),
    pub idt: (u64, u16),
    pub tr: u16,
    pub ldt: u16,
    pub cs: u16,
    pub ss: u16,
    pub ds: u16,
    pub es: u16,
    pub fs: u16,
    pub gs: u16,
    /// RFLAGS.IF as the image set it (`cli`/`sti`, `iretq`, gates).
    pub interrupts: bool,
    /// CR2 as the image reads it: the last page fault delivered to it.
    pub cr2: u64,
}

impl Default for Shadow {
    /// tt-host's boot state (docs/ABI.md): its GDT, no IDT, flat
    /// segments 0x08/0x10, interrupts off.
    fn default() -> Self {
        Shadow {
            gdt: (super::GDT_BASE, 3 * 8 - 1),
            idt: (0, 0),
            tr: 0,
            ldt: 0,
            cs: super::layout::SEL_CODE,
            ss: super::layout::SEL_DATA,
            ds: super::layout::SEL_DATA,
            es: super::layout::SEL_DATA,
            fs: super::layout::SEL_DATA,
            gs: super::layout::SEL_DATA,
            interrupts: false,
            cr2: 0,
        }
    }
}

/// How many traps of each kind the monitor served.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    pub emulated: u64,
    pub delivered: u64,
}

/// The monitor's state for one vCPU.
#[derive(Debug, Clone, Default)]
pub struct Monitor {
    pub shadow: Shadow,
    pub counts: Counts,
}

/// The guest must stop: the message says why (as for a CPL 0 guest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stop(pub String);

const TRIPLE_FAULT: &str = "guest triple fault (an exception the guest could not handle)";
/// The stop message for HLT, at CPL 0 (`vmm::decode`) and 3: the guest
/// has no interrupt controller, so nothing can wake it.
pub const HLT: &str = "guest executed HLT and will never wake (it has no interrupts)";

impl Monitor {
    /// Serve one trap: afterwards `t.frame` (and `t.gprs` if
    /// `gprs_changed`) say where and how the image goes on.
    pub fn trap(&mut self, t: &mut Trapped, m: &mut dyn Machine) -> Result<(), Stop> {
        match t.vector {
            6 | 13 => {
                let insn = fetch(t.frame.rip, m);
                if let Some(done) = self.emulate(&insn, t, m)? {
                    if done {
                        self.counts.emulated += 1;
                    }
                    return Ok(());
                }
                let error = has_error_code(t.vector).then_some(t.error);
                self.deliver(t.vector, error, t.frame.rip, t, m)
            }
            14 => {
                // A far return or `iretq` to CPL 0 near the top of the
                // stack: at CPL 3 the CPU reads a return frame of the
                // outer-privilege size (4 or 5 words) before it refuses
                // the return, so it can fault on words a CPL 0 return
                // never reads. Emulate it, reading what CPL 0 would.
                let insn = fetch(t.frame.rip, m);
                if matches!(insn.mnemonic(), Mnemonic::Retf | Mnemonic::Iretq) {
                    if let Some(true) = self.emulate(&insn, t, m)? {
                        self.counts.emulated += 1;
                        return Ok(());
                    }
                }
                let cr2 = m.control().cr2;
                self.shadow.cr2 = cr2;
                // As the image would have seen it at CPL 0: a supervisor
                // access, to an absent page if it is tt-host's low memory.
                let mut error = t.error & !(1 << 2);
                if cr2 < super::layout::BOOT_INFO_BASE {
                    error &= !1;
                }
                self.deliver(14, Some(error), t.frame.rip, t, m)
            }
            v => {
                let error = has_error_code(v).then_some(t.error);
                self.deliver(v, error, t.frame.rip, t, m)
            }
        }
    }

    /// Emulate `insn` if it is one the monitor stands in for. `Ok(None)`:
    /// not one of them (a real fault, to deliver); `Ok(Some(true))`:
    /// emulated; `Ok(Some(false))`: turned into an exception delivered.
    fn emulate(
        &mut self,
        insn: &Instruction,
        t: &mut Trapped,
        m: &mut dyn Machine,
    ) -> Result<Option<bool>, Stop> {
        if insn.is_invalid() {
            return Ok(None);
        }
        let next = insn.next_ip();
        let name = || format!("{:?}", insn.mnemonic()).to_lowercase();
        let unsupported = |what: String| {
            Stop(format!(
                "the image ran `{what}` at {:#x}, a privileged operation tt-host's CPL 3 \
                 monitor does not emulate; run it with --cpl=0",
                t.frame.rip
            ))
        };
        match insn.mnemonic() {
            Mnemonic::Lgdt | Mnemonic::Lidt => {
                let Some(at) = self.address(insn, 0, t, m) else {
                    return Ok(None);
                };
                let mut b = [0u8; 10];
                if !m.read(at, &mut b) {
                    return self.page_fault(at, false, t, m);
                }
                let limit = u16::from_le_bytes([b[0], b[1]]);
                let base = u64::from_le_bytes(b[2..10].try_into().unwrap_or_default());
                if insn.mnemonic() == Mnemonic::Lgdt {
                    self.shadow.gdt = (base, limit);
                } else {
                    self.shadow.idt = (base, limit);
                }
            }
            Mnemonic::Ltr | Mnemonic::Lldt => {
                let sel = match self.operand16(insn, 0, t, m) {
                    None => return Ok(None),
                    Some(Err(at)) => return self.page_fault(at, false, t, m),
                    Some(Ok(sel)) => sel,
                };
                if insn.mnemonic() == Mnemonic::Ltr {
                    // As the CPU: an available 64-bit TSS of the image's
                    // GDT, which `ltr` marks busy; else #GP(selector).
                    let (gdt, limit) = self.shadow.gdt;
                    let index = u64::from(sel & !7);
                    let mut d = [0u8; 8];
                    let at = gdt.wrapping_add(index);
                    if index == 0 || index + 15 > u64::from(limit) || !m.read(at, &mut d) {
                        let error = u64::from(sel & !3);
                        return self.general_protection(error, t, m);
                    }
                    let desc = u64::from_le_bytes(d);
                    if (desc >> 40) & 0x1f != 0x09 {
                        let error = u64::from(sel & !3);
                        return self.general_protection(error, t, m);
                    }
                    if !m.write(at, &(desc | (2 << 40)).to_le_bytes()) {
                        return self.page_fault(at, true, t, m);
                    }
                    self.shadow.tr = sel;
                } else if sel & !3 == 0 {
                    self.shadow.ldt = 0;
                } else {
                    return Err(unsupported(format!("lldt {sel:#x}")));
                }
            }
            Mnemonic::Mov if insn.op0_register().is_segment_register() => {
                let sel = match self.operand16(insn, 1, t, m) {
                    None => return Ok(None),
                    Some(Err(at)) => return self.page_fault(at, false, t, m),
                    Some(Ok(sel)) => sel,
                };
                match insn.op0_register() {
                    Register::SS => self.shadow.ss = sel,
                    Register::DS => self.shadow.ds = sel,
                    Register::ES => self.shadow.es = sel,
                    Register::FS => self.shadow.fs = sel,
                    Register::GS => self.shadow.gs = sel,
                    _ => return Ok(None),
                }
            }
            Mnemonic::Sgdt | Mnemonic::Sidt => {
                // Privileged only because tt-host sets CR4.UMIP (where the
                // CPU has it): the image sees its own tables.
                let Some(at) = self.address(insn, 0, t, m) else {
                    return Ok(None);
                };
                let (base, limit) = if insn.mnemonic() == Mnemonic::Sgdt {
                    self.shadow.gdt
                } else {
                    self.shadow.idt
                };
                let mut b = [0u8; 10];
                b[..2].copy_from_slice(&limit.to_le_bytes());
                b[2..].copy_from_slice(&base.to_le_bytes());
                if !m.write(at, &b) {
                    return self.page_fault(at, true, t, m);
                }
            }
            Mnemonic::Str | Mnemonic::Sldt | Mnemonic::Smsw => {
                let value = match insn.mnemonic() {
                    Mnemonic::Str => u64::from(self.shadow.tr),
                    Mnemonic::Sldt => u64::from(self.shadow.ldt),
                    _ => m.control().cr0 & 0xffff,
                };
                match insn.op0_kind() {
                    OpKind::Register => {
                        let r = insn.op0_register();
                        if r.size() == 2 {
                            let i = r.full_register().number() % 16;
                            t.gprs[i] = (t.gprs[i] & !0xffff) | value;
                            t.gprs_changed = true;
                        } else {
                            set_gpr(t, r, value);
                        }
                    }
                    OpKind::Memory => {
                        let Some(at) = self.address(insn, 0, t, m) else {
                            return Ok(None);
                        };
                        if !m.write(at, &(value as u16).to_le_bytes()) {
                            return self.page_fault(at, true, t, m);
                        }
                    }
                    _ => return Ok(None),
                }
            }
            Mnemonic::Mov if insn.op1_register().is_cr() => {
                let value = match insn.op1_register() {
                    Register::CR0 => m.control().cr0,
                    Register::CR2 => self.shadow.cr2,
                    Register::CR3 => m.control().cr3,
                    Register::CR4 => m.control().cr4 & !CR4_UMIP,
                    Register::CR8 => 0,
                    _ => return Ok(None),
                };
                set_gpr(t, insn.op0_register(), value);
            }
            Mnemonic::Mov if insn.op0_register().is_cr() => {
                let value = gpr(t, insn.op1_register());
                let cr = insn.op0_register();
                let now = match cr {
                    Register::CR2 => {
                        self.shadow.cr2 = value;
                        value
                    }
                    Register::CR0 => m.control().cr0,
                    Register::CR3 => m.control().cr3,
                    Register::CR4 => m.control().cr4 & !CR4_UMIP,
                    Register::CR8 => 0,
                    _ => return Ok(None),
                };
                if now != value {
                    return Err(unsupported(format!(
                        "mov {value:#x} to {}",
                        format!("{cr:?}").to_lowercase()
                    )));
                }
            }
            Mnemonic::Retf => {
                let wide = matches!(insn.code(), Code::Retfq | Code::Retfq_imm16);
                if !(wide || matches!(insn.code(), Code::Retfd | Code::Retfd_imm16)) {
                    return Ok(None);
                }
                let size = if wide { 8 } else { 4 };
                let rsp = t.frame.rsp;
                let (Some(rip), Some(cs)) = (pop(m, rsp, size), pop(m, rsp + size, size)) else {
                    return self.page_fault(rsp, false, t, m);
                };
                let cs = cs as u16;
                if cs & 3 != 0 {
                    return Err(unsupported(format!("a far return to CPL {}", cs & 3)));
                }
                let extra = if insn.op_count() == 1 {
                    u64::from(insn.immediate16())
                } else {
                    0
                };
                self.shadow.cs = cs;
                t.frame.rip = rip;
                t.frame.rsp = rsp + 2 * size + extra;
                return Ok(Some(true));
            }
            Mnemonic::Iretq if insn.code() == Code::Iretq => {
                let rsp = t.frame.rsp;
                let mut w = [0u64; 5];
                for (i, v) in w.iter_mut().enumerate() {
                    match pop(m, rsp + 8 * i as u64, 8) {
                        Some(x) => *v = x,
                        None => return self.page_fault(rsp, false, t, m),
                    }
                }
                let [rip, cs, rflags, new_rsp, ss] = w;
                if cs & 3 != 0 {
                    return Err(unsupported(format!("iretq to CPL {}", cs & 3)));
                }
                self.shadow.cs = cs as u16;
                self.shadow.ss = ss as u16;
                self.shadow.interrupts = rflags & RFLAGS_IF != 0;
                t.frame.rip = rip;
                t.frame.rsp = new_rsp;
                t.frame.rflags = (t.frame.rflags & !RFLAGS_USER) | (rflags & RFLAGS_USER) | 2;
                return Ok(Some(true));
            }
            Mnemonic::Cli => self.shadow.interrupts = false,
            Mnemonic::Sti => self.shadow.interrupts = true,
            Mnemonic::Hlt => {
                // As at CPL 0, where KVM reports the HLT past it.
                t.frame.rip = next;
                return Err(Stop(HLT.into()));
            }
            Mnemonic::Rdmsr => {
                // Any MSR reads as it would at CPL 0; one KVM does not
                // have raises #GP, as on a CPU.
                let index = t.gprs[1] as u32;
                let Some(value) = m.msr(index) else {
                    return self.general_protection(0, t, m);
                };
                t.gprs[0] = value & 0xffff_ffff;
                t.gprs[2] = value >> 32;
                t.gprs_changed = true;
            }
            Mnemonic::Wrmsr => {
                // The segment bases are the image's; any other MSR only
                // keeps its value.
                let index = t.gprs[1] as u32;
                let value = (t.gprs[2] << 32) | (t.gprs[0] & 0xffff_ffff);
                if [MSR_FS_BASE, MSR_GS_BASE, MSR_KERNEL_GS_BASE].contains(&index) {
                    if !is_canonical(value) || !m.set_msr(index, value) {
                        return self.general_protection(0, t, m);
                    }
                } else if m.msr(index) != Some(value) {
                    return Err(unsupported(format!(
                        "wrmsr of {value:#x} to MSR {index:#x}"
                    )));
                }
            }
            Mnemonic::Swapgs => {
                let (Some(gs), Some(kernel)) = (m.msr(MSR_GS_BASE), m.msr(MSR_KERNEL_GS_BASE))
                else {
                    return Err(unsupported(name()));
                };
                m.set_msr(MSR_GS_BASE, kernel);
                m.set_msr(MSR_KERNEL_GS_BASE, gs);
            }
            // No-ops here: the TS flag is never set, the page tables and
            // caches are tt-host's.
            Mnemonic::Clts | Mnemonic::Invlpg | Mnemonic::Wbinvd | Mnemonic::Invd => {}
            Mnemonic::Int | Mnemonic::Int3 | Mnemonic::Int1 | Mnemonic::Into => {
                // Software interrupts reach the image's gate as at CPL 0
                // (through tt-host's DPL 0 gates they raise #GP).
                let vector = match insn.mnemonic() {
                    Mnemonic::Int => insn.immediate8(),
                    Mnemonic::Int3 => 3,
                    Mnemonic::Int1 => 1,
                    _ => return Ok(None),
                };
                return self.deliver(vector, None, next, t, m).map(|()| Some(false));
            }
            Mnemonic::In
            | Mnemonic::Out
            | Mnemonic::Insb
            | Mnemonic::Insw
            | Mnemonic::Insd
            | Mnemonic::Outsb
            | Mnemonic::Outsw
            | Mnemonic::Outsd => return Err(Stop(port_message(insn, t))),
            _ => return Ok(None),
        }
        t.frame.rip = next;
        Ok(Some(true))
    }

    /// The linear address of `insn`'s memory operand `op`.
    fn address(
        &self,
        insn: &Instruction,
        op: u32,
        t: &Trapped,
        m: &mut dyn Machine,
    ) -> Option<u64> {
        if insn.op_kind(op) != OpKind::Memory {
            return None;
        }
        let seg_base = match insn.memory_segment() {
            Register::FS => m.msr(MSR_FS_BASE)?,
            Register::GS => m.msr(MSR_GS_BASE)?,
            _ => 0,
        };
        insn.virtual_address(op, 0, |reg, _, _| match reg {
            Register::ES | Register::CS | Register::SS | Register::DS => Some(0),
            Register::FS | Register::GS => Some(seg_base),
            r if r.is_gpr() => Some(gpr(t, r)),
            _ => None,
        })
    }

    /// A 16-bit source operand (register or memory): `Err(address)` if
    /// it is memory the image may not read (a page fault there).
    fn operand16(
        &self,
        insn: &Instruction,
        op: u32,
        t: &Trapped,
        m: &mut dyn Machine,
    ) -> Option<Result<u16, u64>> {
        match insn.op_kind(op) {
            OpKind::Register => Some(Ok(gpr(t, insn.op_register(op)) as u16)),
            OpKind::Memory => {
                let at = self.address(insn, op, t, m)?;
                let mut b = [0u8; 2];
                Some(if m.read(at, &mut b) {
                    Ok(u16::from_le_bytes(b))
                } else {
                    Err(at)
                })
            }
            _ => None,
        }
    }

    /// The instruction faults as it would at CPL 0: deliver #GP(`error`).
    fn general_protection(
        &mut self,
        error: u64,
        t: &mut Trapped,
        m: &mut dyn Machine,
    ) -> Result<Option<bool>, Stop> {
        self.deliver(13, Some(error), t.frame.rip, t, m)
            .map(|()| Some(false))
    }

    /// The image touched memory it may not (at CPL 0 too, as far as the
    /// monitor can tell): deliver a page fault at `addr`.
    fn page_fault(
        &mut self,
        addr: u64,
        write: bool,
        t: &mut Trapped,
        m: &mut dyn Machine,
    ) -> Result<Option<bool>, Stop> {
        self.shadow.cr2 = addr;
        let error = if write { 2 } else { 0 };
        self.deliver(14, Some(error), t.frame.rip, t, m)
            .map(|()| Some(false))
    }

    /// Deliver exception `vector` to the image's own IDT handler, as a CPU
    /// at CPL 0 would: on its stack (or the IST stack its TSS names), a
    /// frame with its selectors, RFLAGS with its IF, `rip` and the error
    /// code. If that fails, a double fault; if that fails too, the guest
    /// stops as a triple-faulting CPL 0 guest does.
    fn deliver(
        &mut self,
        vector: u8,
        error: Option<u64>,
        rip: u64,
        t: &mut Trapped,
        m: &mut dyn Machine,
    ) -> Result<(), Stop> {
        if self.try_deliver(vector, error, rip, t, m) {
            self.counts.delivered += 1;
            return Ok(());
        }
        if vector != 8 && self.try_deliver(8, Some(0), rip, t, m) {
            self.counts.delivered += 1;
            return Ok(());
        }
        Err(Stop(format!(
            "{TRIPLE_FAULT}: exception {vector} at rip {rip:#x} could not be delivered \
             to the image's handler"
        )))
    }

    fn try_deliver(
        &mut self,
        vector: u8,
        error: Option<u64>,
        rip: u64,
        t: &mut Trapped,
        m: &mut dyn Machine,
    ) -> bool {
        let (base, limit) = self.shadow.idt;
        let at = u64::from(vector) * 16;
        if at + 15 > u64::from(limit) {
            return false;
        }
        let mut g = [0u8; 16];
        if !m.read(base.wrapping_add(at), &mut g) {
            return false;
        }
        let lo = u64::from_le_bytes(g[..8].try_into().unwrap_or_default());
        let hi = u64::from_le_bytes(g[8..].try_into().unwrap_or_default());
        let kind = (lo >> 40) & 0xf;
        let present = lo & (1 << 47) != 0;
        if !present || !(kind == 0xe || kind == 0xf) {
            return false;
        }
        let handler = (lo & 0xffff) | ((lo >> 32) & 0xffff_0000) | (hi << 32);
        let ist = (lo >> 32) & 7;
        let stack = if ist == 0 {
            t.frame.rsp
        } else {
            match self.ist(ist, m) {
                Some(s) => s,
                None => return false,
            }
        };
        // As the CPU pushed it (RF set for a fault), with the image's IF.
        let flags =
            (t.frame.rflags & !RFLAGS_IF) | if self.shadow.interrupts { RFLAGS_IF } else { 0 };
        let mut words = vec![
            u64::from(self.shadow.ss),
            t.frame.rsp,
            flags,
            u64::from(self.shadow.cs),
            rip,
        ];
        if let Some(e) = error {
            words.push(e);
        }
        let top = stack & !0xf;
        let new_rsp = top.wrapping_sub(8 * words.len() as u64);
        let bytes: Vec<u8> = words.iter().rev().flat_map(|w| w.to_le_bytes()).collect();
        if !m.write(new_rsp, &bytes) {
            return false;
        }
        t.frame.rip = handler;
        t.frame.rsp = new_rsp;
        t.frame.rflags &= !(RFLAGS_TF | RFLAGS_NT | RFLAGS_RF);
        if kind == 0xe {
            self.shadow.interrupts = false;
        }
        true
    }

    /// IST stack `n` (1-7) of the image's TSS, found through its TR and
    /// GDT.
    fn ist(&self, n: u64, m: &mut dyn Machine) -> Option<u64> {
        let (gdt, limit) = self.shadow.gdt;
        let index = u64::from(self.shadow.tr & !7);
        if index == 0 || index + 15 > u64::from(limit) {
            return None;
        }
        let mut d = [0u8; 16];
        if !m.read(gdt.wrapping_add(index), &mut d) {
            return None;
        }
        let lo = u64::from_le_bytes(d[..8].try_into().ok()?);
        let hi = u64::from_le_bytes(d[8..].try_into().ok()?);
        let tss =
            ((lo >> 16) & 0xff_ffff) | ((lo >> 32) & 0xff00_0000) | ((hi & 0xffff_ffff) << 32);
        pop(m, tss + 0x24 + 8 * (n - 1), 8)
    }
}

/// Decode the instruction at `rip` (as much of 15 bytes as is readable).
fn fetch(rip: u64, m: &dyn Machine) -> Instruction {
    let mut bytes = [0u8; 15];
    let mut n = bytes.len();
    while n > 0 && !m.read(rip, &mut bytes[..n]) {
        n -= 1;
    }
    let mut d = Decoder::with_ip(64, &bytes[..n], rip, DecoderOptions::NONE);
    d.decode()
}

fn pop(m: &dyn Machine, at: u64, size: u64) -> Option<u64> {
    let mut b = [0u8; 8];
    m.read(at, &mut b[..size as usize])
        .then(|| u64::from_le_bytes(b))
}

fn is_canonical(v: u64) -> bool {
    let top = v >> 47;
    top == 0 || top == 0x1_ffff
}

/// The value of general register `r` (any width).
fn gpr(t: &Trapped, r: Register) -> u64 {
    if !r.is_gpr() {
        return 0;
    }
    let full = r.full_register();
    let v = t.gprs[full.number() % 16];
    match r.size() {
        8 => v,
        4 => v & 0xffff_ffff,
        2 => v & 0xffff,
        _ => v & 0xff,
    }
}

/// Set general register `r`: 64-bit writes whole; 32-bit zero-extends.
fn set_gpr(t: &mut Trapped, r: Register, value: u64) {
    if !r.is_gpr() {
        return;
    }
    let i = r.full_register().number() % 16;
    t.gprs[i] = if r.size() == 4 {
        value & 0xffff_ffff
    } else {
        value
    };
    t.gprs_changed = true;
}

/// What a CPL 0 guest's run stops with for this port access (see
/// `vmm::decode`): at CPL 3 the I/O bitmap refuses it before any exit.
fn port_message(insn: &Instruction, t: &Trapped) -> String {
    let (port_op, data_op) = match insn.mnemonic() {
        Mnemonic::Out | Mnemonic::Outsb | Mnemonic::Outsw | Mnemonic::Outsd => (0, 1),
        _ => (1, 0),
    };
    let port = match insn.op_kind(port_op) {
        OpKind::Immediate8 => u16::from(insn.immediate8()),
        _ => t.gprs[2] as u16,
    };
    let width = match insn.mnemonic() {
        Mnemonic::Outsb | Mnemonic::Insb => 1,
        Mnemonic::Outsw | Mnemonic::Insw => 2,
        Mnemonic::Outsd | Mnemonic::Insd => 4,
        _ => insn.op_register(data_op).size(),
    };
    let writes = matches!(
        insn.mnemonic(),
        Mnemonic::Out | Mnemonic::Outsb | Mnemonic::Outsw | Mnemonic::Outsd
    );
    if !writes {
        format!("invalid guest port access: read from port {port:#x}")
    } else if width != 4 {
        format!(
            "invalid guest port access: {width}-byte write to port {port:#x} (hypercalls are \
             4-byte writes)"
        )
    } else {
        format!("invalid guest port access: port {port:#x} is not a hypercall")
    }
}

#[cfg(test)]
mod tests;
