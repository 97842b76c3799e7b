//! The monitor's decisions on a model machine: memory from 1 MiB to 4 MiB
//! with read-only ranges, fixed control registers, three MSRs.

use super::*;
use std::collections::HashMap;

const CODE: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STACK_TOP: u64 = 0x30_0000;
const IDT: u64 = 0x21_0000;
const GDT: u64 = 0x22_0000;
const TSS: u64 = 0x23_0000;
const IST1: u64 = 0x28_0000;
const HANDLER: u64 = 0x10_8000;

struct Model {
    mem: Vec<u8>,
    readonly: Vec<(u64, u64)>,
    msrs: HashMap<u32, u64>,
    control: Control,
}

impl Model {
    fn new() -> Model {
        Model {
            mem: vec![0; 4 << 20],
            readonly: vec![(CODE, CODE + 0x1_0000)],
            msrs: [(MSR_FS_BASE, 0), (MSR_GS_BASE, 0), (MSR_KERNEL_GS_BASE, 0)].into(),
            control: Control {
                cr0: 0x8001_0021,
                cr2: 0,
                cr3: 0x2000,
                cr4: 0x620,
            },
        }
    }
    fn put(&mut self, at: u64, bytes: &[u8]) {
        self.mem[at as usize..at as usize + bytes.len()].copy_from_slice(bytes);
    }
    fn word(&self, at: u64) -> u64 {
        u64::from_le_bytes(self.mem[at as usize..at as usize + 8].try_into().unwrap())
    }
    /// An IDT of `n` gates at IDT; gate `v` points at HANDLER + 16 v,
    /// interrupt gates, IST `ist(v)`.
    fn idt(&mut self, n: u64, ist: impl Fn(u64) -> u64) {
        for v in 0..n {
            let h = HANDLER + 16 * v;
            let lo =
                (h & 0xffff) | (0x08 << 16) | (ist(v) << 32) | (0x8e << 40) | ((h >> 16) << 48);
            self.put(IDT + 16 * v, &lo.to_le_bytes());
            self.put(IDT + 16 * v + 8, &(h >> 32).to_le_bytes());
        }
    }
    /// A GDT whose entry 0x28 is a TSS at TSS with IST1 = IST1.
    fn gdt_with_tss(&mut self) {
        let lo = 0x67 | ((TSS & 0xff_ffff) << 16) | (0x89 << 40) | ((TSS >> 24 & 0xff) << 56);
        self.put(GDT + 0x28, &lo.to_le_bytes());
        self.put(GDT + 0x30, &(TSS >> 32).to_le_bytes());
        self.put(TSS + 0x24, &IST1.to_le_bytes());
    }
}

impl Machine for Model {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> bool {
        let end = gpa as usize + buf.len();
        if gpa < 0x10_0000 || end > self.mem.len() {
            return false;
        }
        buf.copy_from_slice(&self.mem[gpa as usize..end]);
        true
    }
    fn write(&mut self, gpa: u64, buf: &[u8]) -> bool {
        let end = gpa + buf.len() as u64;
        if gpa < 0x10_0000
            || end > self.mem.len() as u64
            || self.readonly.iter().any(|&(s, e)| gpa < e && end > s)
        {
            return false;
        }
        self.put(gpa, buf);
        true
    }
    fn control(&mut self) -> Control {
        self.control
    }
    fn msr(&mut self, index: u32) -> Option<u64> {
        self.msrs.get(&index).copied()
    }
    fn set_msr(&mut self, index: u32, value: u64) -> bool {
        self.msrs.insert(index, value).is_some()
    }
}

/// A trap of `vector` at CODE, where `code` is, with rsp at `rsp`.
fn trapped(m: &mut Model, vector: u8, error: u64, code: &[u8], rsp: u64) -> Trapped {
    m.put(CODE, code);
    Trapped {
        vector,
        error,
        frame: Frame {
            rip: CODE,
            cs: 0x23,
            rflags: 0x10002,
            rsp,
            ss: 0x1b,
        },
        ..Trapped::default()
    }
}

#[test]
fn descriptor_table_and_segment_loads_go_to_the_shadow_and_step_over() {
    let mut m = Model::new();
    let mut mon = Monitor::default();
    // lgdt [rax]
    m.put(DATA, &[0x37, 0, 0x00, 0x00, 0x22, 0, 0, 0, 0, 0]);
    let mut t = trapped(&mut m, 13, 0, &[0x0f, 0x01, 0x10], STACK_TOP);
    t.gprs[0] = DATA;
    mon.trap(&mut t, &mut m).unwrap();
    assert_eq!(mon.shadow.gdt, (GDT, 0x37));
    assert_eq!(t.frame.rip, CODE + 3);
    // lidt [rsp+8]
    m.put(
        STACK_TOP + 8,
        &[0xff, 0x0f, 0x00, 0x00, 0x21, 0, 0, 0, 0, 0],
    );
    let mut t = trapped(&mut m, 13, 0, &[0x0f, 0x01, 0x5c, 0x24, 0x08], STACK_TOP);
    t.gprs[4] = STACK_TOP;
    mon.trap(&mut t, &mut m).unwrap();
    assert_eq!(mon.shadow.idt, (IDT, 0xfff));
    assert_eq!(t.frame.rip, CODE + 5);
    // ltr ax (an available TSS at 0x28, marked busy); mov ss, eax; mov
    // ds, eax.
    m.gdt_with_tss();
    for (code, check) in [
        (&[0x0f, 0x00, 0xd8][..], 0),
        (&[0x8e, 0xd0][..], 1),
        (&[0x8e, 0xd8][..], 2),
    ] {
        let mut t = trapped(&mut m, 13, 0, code, STACK_TOP);
        t.gprs[0] = 0x28 + check;
        mon.trap(&mut t, &mut m).unwrap();
        assert_eq!(t.frame.rip, CODE + code.len() as u64);
        let got = [mon.shadow.tr, mon.shadow.ss, mon.shadow.ds][check as usize];
        assert_eq!(got, 0x28 + check as u16);
        assert!(!t.gprs_changed);
    }
    assert_eq!(mon.counts.emulated, 5);
    assert_eq!((m.word(GDT + 0x28) >> 40) & 0xf, 0xb, "the TSS is busy");
    // ltr of it again (busy now), or of a selector past the GDT: #GP,
    // delivered (no IDT here: a triple fault).
    for sel in [0x28, 0x40] {
        let mut t = trapped(&mut m, 13, 0, &[0x0f, 0x00, 0xd8], STACK_TOP);
        t.gprs[0] = sel;
        let Stop(msg) = mon.trap(&mut t, &mut m).unwrap_err();
        assert!(msg.contains("exception 13"), "{msg}");
    }
}

#[test]
fn a_far_return_to_a_kernel_selector_pops_rip_and_cs() {
    let mut m = Model::new();
    let mut mon = Monitor::default();
    let sp = STACK_TOP - 0x100;
    m.put(sp, &0x10_4000u64.to_le_bytes());
    m.put(sp + 8, &0x08u64.to_le_bytes());
    let mut t = trapped(&mut m, 13, 0x08, &[0x48, 0xcb], sp);
    mon.trap(&mut t, &mut m).unwrap();
    assert_eq!((t.frame.rip, t.frame.rsp), (0x10_4000, sp + 16));
    assert_eq!(mon.shadow.cs, 0x08);
    // To CPL 3 selectors of its own: not something Solo5 does; refused.
    m.put(sp + 8, &0x2bu64.to_le_bytes());
    let mut t = trapped(&mut m, 13, 0x28, &[0x48, 0xcb], sp);
    let Stop(msg) = mon.trap(&mut t, &mut m).unwrap_err();
    assert!(
        msg.contains("far return to CPL 3") && msg.contains("--cpl=0"),
        "{msg}"
    );
}

#[test]
fn a_page_fault_reaches_the_images_handler_with_a_cpl0_frame() {
    let mut m = Model::new();
    let mut mon = Monitor::default();
    m.idt(32, |_| 0);
    mon.shadow.idt = (IDT, 32 * 16 - 1);
    mon.shadow.interrupts = true;
    m.control.cr2 = 0x4_0000_0000;
    let sp = STACK_TOP - 0x28; // not 16-aligned: the CPU aligns it
    let mut t = trapped(&mut m, 14, 0x6, &[0x88, 0x08], sp);
    mon.trap(&mut t, &mut m).unwrap();
    assert_eq!(t.frame.rip, HANDLER + 14 * 16);
    let top = sp & !0xf;
    assert_eq!(t.frame.rsp, top - 48);
    let frame: Vec<u64> = (0..6).map(|i| m.word(top - 48 + 8 * i)).collect();
    // error (user bit cleared: a CPL 0 access), rip, cs, rflags, rsp, ss.
    assert_eq!(frame, [0x2, CODE, 0x08, 0x10202, sp, 0x10]);
    assert_eq!(mon.shadow.cr2, 0x4_0000_0000);
    assert!(!mon.shadow.interrupts, "an interrupt gate clears IF");
    assert_eq!(mon.counts.delivered, 1);
    // Its handler reads CR2 (mov rax, cr2): the shadow.
    let mut t = trapped(&mut m, 13, 0, &[0x0f, 0x20, 0xd0], top - 48);
    mon.trap(&mut t, &mut m).unwrap();
    assert_eq!(t.gprs[0], 0x4_0000_0000);
    assert!(t.gprs_changed);
    // And returns with iretq: everything popped, IF from the frame.
    let mut t = trapped(&mut m, 13, 0, &[0x48, 0xcf], top - 40);
    mon.trap(&mut t, &mut m).unwrap();
    assert_eq!((t.frame.rip, t.frame.rsp), (CODE, sp));
    assert!(mon.shadow.interrupts);
}

#[test]
fn a_fault_in_tt_hosts_low_memory_looks_like_an_absent_page() {
    let mut m = Model::new();
    let mut mon = Monitor::default();
    m.idt(32, |_| 0);
    mon.shadow.idt = (IDT, 32 * 16 - 1);
    m.control.cr2 = 0x7_c000;
    let mut t = trapped(&mut m, 14, 0x5, &[0x8b, 0x00], STACK_TOP);
    mon.trap(&mut t, &mut m).unwrap();
    assert_eq!(m.word(t.frame.rsp), 0, "present and user bits cleared");
}

#[test]
fn an_ist_gate_switches_to_the_stack_the_images_tss_names() {
    let mut m = Model::new();
    let mut mon = Monitor::default();
    m.idt(32, |v| if v == 13 { 1 } else { 0 });
    m.gdt_with_tss();
    mon.shadow.idt = (IDT, 32 * 16 - 1);
    mon.shadow.gdt = (GDT, 0x37);
    mon.shadow.tr = 0x28;
    // A genuine #GP (ud2 raises #UD; a non-privileged instruction here).
    let mut t = trapped(&mut m, 13, 0, &[0x8b, 0x00], STACK_TOP);
    mon.trap(&mut t, &mut m).unwrap();
    assert_eq!(t.frame.rip, HANDLER + 13 * 16);
    assert_eq!(t.frame.rsp, IST1 - 48);
    assert_eq!(m.word(IST1 - 16), STACK_TOP, "the interrupted rsp");
}

#[test]
fn software_interrupts_reach_their_gate_with_the_next_rip() {
    let mut m = Model::new();
    let mut mon = Monitor::default();
    m.idt(0x31, |_| 0);
    mon.shadow.idt = (IDT, 0x31 * 16 - 1);
    for (code, vector) in [(&[0xcc][..], 3u64), (&[0xcd, 0x30][..], 0x30)] {
        let mut t = trapped(&mut m, 13, vector * 8 + 2, code, STACK_TOP);
        mon.trap(&mut t, &mut m).unwrap();
        assert_eq!(t.frame.rip, HANDLER + 16 * vector);
        assert_eq!(t.frame.rsp, STACK_TOP - 40, "no error code");
        assert_eq!(m.word(STACK_TOP - 40), CODE + code.len() as u64);
    }
}

#[test]
fn an_exception_that_cannot_be_delivered_is_a_double_then_a_triple_fault() {
    let mut m = Model::new();
    let mut mon = Monitor::default();
    // No IDT at all: as a CPL 0 image without one, the guest stops.
    let mut t = trapped(&mut m, 6, 0, &[0x0f, 0x0b], STACK_TOP);
    let Stop(msg) = mon.trap(&mut t, &mut m).unwrap_err();
    assert!(msg.starts_with("guest triple fault"), "{msg}");
    // A stack in read-only memory: the frame cannot be pushed, but the
    // double fault's IST stack can take it.
    m.idt(32, |v| if v == 8 { 1 } else { 0 });
    m.gdt_with_tss();
    mon.shadow.idt = (IDT, 32 * 16 - 1);
    mon.shadow.gdt = (GDT, 0x37);
    mon.shadow.tr = 0x28;
    let mut t = trapped(&mut m, 6, 0, &[0x0f, 0x0b], CODE + 0x800);
    mon.trap(&mut t, &mut m).unwrap();
    assert_eq!(t.frame.rip, HANDLER + 8 * 16);
}

#[test]
fn msrs_other_than_the_segment_bases_are_refused_with_the_way_out() {
    let mut m = Model::new();
    let mut mon = Monitor::default();
    let mut t = trapped(&mut m, 13, 0, &[0x0f, 0x30], STACK_TOP);
    t.gprs[1] = u64::from(MSR_FS_BASE);
    (t.gprs[0], t.gprs[2]) = (0x2000_1000, 0x7f);
    mon.trap(&mut t, &mut m).unwrap();
    assert_eq!(m.msrs[&MSR_FS_BASE], 0x7f_2000_1000);
    let mut t = trapped(&mut m, 13, 0, &[0x0f, 0x32], STACK_TOP);
    t.gprs[1] = u64::from(MSR_FS_BASE);
    mon.trap(&mut t, &mut m).unwrap();
    assert_eq!((t.gprs[0], t.gprs[2]), (0x2000_1000, 0x7f));
    // EFER: read as it is; written only with the value it has.
    m.msrs.insert(0xc000_0080, 0xd00);
    let mut t = trapped(&mut m, 13, 0, &[0x0f, 0x32], STACK_TOP);
    t.gprs[1] = 0xc000_0080;
    mon.trap(&mut t, &mut m).unwrap();
    assert_eq!((t.gprs[0], t.gprs[2]), (0xd00, 0));
    t.frame.rip = CODE;
    t.vector = 13;
    m.put(CODE, &[0x0f, 0x30]);
    mon.trap(&mut t, &mut m).unwrap();
    assert_eq!(t.frame.rip, CODE + 2, "the same value: a no-op");
    let mut t = trapped(&mut m, 13, 0, &[0x0f, 0x30], STACK_TOP);
    (t.gprs[0], t.gprs[1]) = (0x500, 0xc000_0080);
    let Stop(msg) = mon.trap(&mut t, &mut m).unwrap_err();
    assert!(
        msg.contains("wrmsr of 0x500 to MSR 0xc0000080") && msg.contains("--cpl=0"),
        "{msg}"
    );
    // An MSR KVM does not have: #GP, as on a CPU (no IDT: triple fault).
    let mut t = trapped(&mut m, 13, 0, &[0x0f, 0x32], STACK_TOP);
    t.gprs[1] = 0x1234;
    let Stop(msg) = mon.trap(&mut t, &mut m).unwrap_err();
    assert!(msg.starts_with("guest triple fault"), "{msg}");
}

#[test]
fn control_register_writes_other_than_no_ops_are_refused() {
    let mut m = Model::new();
    let mut mon = Monitor::default();
    let mut t = trapped(&mut m, 13, 0, &[0x0f, 0x22, 0xc0], STACK_TOP); // mov cr0, rax
    t.gprs[0] = 0x8001_0021;
    mon.trap(&mut t, &mut m).unwrap();
    assert_eq!(t.frame.rip, CODE + 3);
    t = trapped(&mut m, 13, 0, &[0x0f, 0x22, 0xc0], STACK_TOP);
    t.gprs[0] = 0x8000_0001;
    let Stop(msg) = mon.trap(&mut t, &mut m).unwrap_err();
    assert!(msg.contains("mov 0x80000001 to cr0"), "{msg}");
}

#[test]
fn hlt_and_port_io_stop_as_at_cpl0() {
    let mut m = Model::new();
    let mut mon = Monitor::default();
    let mut t = trapped(&mut m, 13, 0, &[0xfa], STACK_TOP); // cli
    mon.trap(&mut t, &mut m).unwrap();
    let mut t = trapped(&mut m, 13, 0, &[0xf4], STACK_TOP);
    let Stop(msg) = mon.trap(&mut t, &mut m).unwrap_err();
    assert_eq!(msg, HLT);
    assert_eq!(t.frame.rip, CODE + 1, "reported past the HLT, as at CPL 0");
    let mut t = trapped(&mut m, 13, 0, &[0xe6, 0x80], STACK_TOP); // out 0x80, al
    let Stop(msg) = mon.trap(&mut t, &mut m).unwrap_err();
    assert!(
        msg.contains("1-byte write to port 0x80 (hypercalls are 4-byte writes)"),
        "{msg}"
    );
    let mut t = trapped(&mut m, 13, 0, &[0xef], STACK_TOP); // out dx, eax
    t.gprs[2] = 0x600;
    let Stop(msg) = mon.trap(&mut t, &mut m).unwrap_err();
    assert!(msg.contains("port 0x600 is not a hypercall"), "{msg}");
}

#[test]
fn arbitrary_code_bytes_never_panic_the_monitor() {
    use proptest::prelude::*;
    proptest!(ProptestConfig::with_cases(2000), |(
        code in proptest::collection::vec(any::<u8>(), 1..16),
        vector in 0u8..32,
        regs in proptest::array::uniform16(any::<u64>()),
        rsp in any::<u64>(),
    )| {
        let mut m = Model::new();
        let mut mon = Monitor::default();
        m.idt(32, |_| 0);
        mon.shadow.idt = (IDT, 32 * 16 - 1);
        let mut t = trapped(&mut m, vector, 0, &code, rsp);
        t.gprs = regs;
        let _ = mon.trap(&mut t, &mut m);
    });
}

#[test]
fn with_umip_the_store_instructions_show_the_images_own_tables() {
    let mut m = Model::new();
    let mut mon = Monitor::default();
    mon.shadow.idt = (IDT, 0x1ff);
    mon.shadow.tr = 0x28;
    let mut t = trapped(&mut m, 13, 0, &[0x0f, 0x01, 0x08], STACK_TOP); // sidt [rax]
    t.gprs[0] = DATA;
    mon.trap(&mut t, &mut m).unwrap();
    assert_eq!(m.mem[DATA as usize..DATA as usize + 2], [0xff, 0x01]);
    assert_eq!(m.word(DATA + 2), IDT);
    let mut t = trapped(&mut m, 13, 0, &[0x66, 0x0f, 0x00, 0xc8], STACK_TOP); // str ax
    t.gprs[0] = 0xdead_0000_1234_5678;
    mon.trap(&mut t, &mut m).unwrap();
    assert_eq!(t.gprs[0], 0xdead_0000_1234_0028, "only ax");
    let mut t = trapped(&mut m, 13, 0, &[0x0f, 0x00, 0xc8], STACK_TOP); // str eax
    t.gprs[0] = 0xdead_0000_1234_5678;
    mon.trap(&mut t, &mut m).unwrap();
    assert_eq!(t.gprs[0], 0x28, "zero-extended");
    // Into read-only memory (its text): a page fault, not a write.
    let mut t = trapped(&mut m, 13, 0, &[0x0f, 0x01, 0x08], STACK_TOP);
    t.gprs[0] = CODE;
    let Stop(msg) = mon.trap(&mut t, &mut m).unwrap_err();
    assert!(msg.starts_with("guest triple fault"), "{msg}");
    // mov rax, cr4 hides UMIP.
    m.control.cr4 |= CR4_UMIP;
    let mut t = trapped(&mut m, 13, 0, &[0x0f, 0x20, 0xe0], STACK_TOP);
    mon.trap(&mut t, &mut m).unwrap();
    assert_eq!(t.gprs[0], 0x620);
}
