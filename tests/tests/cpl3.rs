//! Hand-assembled CPL 0 images (as Solo5 images are) under `--cpl=0` and
//! `--cpl=3`: each privileged instruction tt-host's CPL 3 monitor
//! emulates, exceptions delivered to the image's own IDT handlers, the
//! W^X faults, and the monitor's pages out of the image's reach. Each
//! image runs in both modes, and both must end the same way: exit status,
//! console output, and the stop message up to its register dump (whose
//! `cpl=` differs). Images are `tt_host::loader::synth` images whose code
//! is assembled here with iced-x86.

#[path = "cpl3/image.rs"]
mod image;

use core::mem::offset_of;
use iced_x86::code_asm::*;
use image::*;
use std::process::Command;
use tt_host::abi::{self, Hypercall};
use tt_host::loader::synth::Synth;
use tt_tests::*;

#[test]
fn a_solo5_boot_runs_and_each_privileged_instruction_is_one_trap() -> Asm {
    if !kvm() {
        return Ok(());
    }
    let mut img = Image::new();
    img.solo5_boot()?;
    img.puts("booted\n")?;
    img.halt(0)?;
    let o = both_succeed(&img.build(), "booted\n");
    assert_eq!(o.traps, Some((9, 0)), "{o:#?}");
    Ok(())
}

#[test]
fn fs_gs_and_kernel_gs_base_are_set_read_and_swapped() -> Asm {
    if !kvm() {
        return Ok(());
    }
    let mut img = Image::new();
    let words = [
        0x1122_3344_5566_7788u64,
        0x99aa_bbcc_ddee_ff00,
        0x0bad_cafe_f00d_d00d,
    ];
    for (i, w) in words.iter().enumerate() {
        img.d.put_u64(SCRATCH + 8 * i as u64, *w);
    }
    img.solo5_boot()?;
    // TLS as Solo5 sets it up: wrmsr of FS_BASE, then fs-relative loads.
    img.wrmsr(MSR_FS_BASE, SCRATCH)?;
    img.a.mov(rax, qword_ptr(0u64).fs())?;
    img.expect(rax, words[0], 1)?;
    img.a.mov(rax, qword_ptr(8u64).fs())?;
    img.expect(rax, words[1], 2)?;
    img.rdmsr(MSR_FS_BASE)?;
    img.expect(rax, SCRATCH, 3)?;
    // All 64 bits of the base.
    let high = 0x0000_7654_0000_0000 | SCRATCH;
    img.wrmsr(MSR_FS_BASE, high)?;
    img.rdmsr(MSR_FS_BASE)?;
    img.expect(rax, high, 4)?;
    // GS_BASE, KERNEL_GS_BASE and swapgs.
    img.wrmsr(MSR_GS_BASE, SCRATCH + 8)?;
    img.wrmsr(MSR_KERNEL_GS_BASE, SCRATCH + 16)?;
    img.a.mov(rax, qword_ptr(0u64).gs())?;
    img.expect(rax, words[1], 5)?;
    img.a.swapgs()?;
    img.a.mov(rax, qword_ptr(0u64).gs())?;
    img.expect(rax, words[2], 6)?;
    img.rdmsr(MSR_GS_BASE)?;
    img.expect(rax, SCRATCH + 16, 7)?;
    img.rdmsr(MSR_KERNEL_GS_BASE)?;
    img.expect(rax, SCRATCH + 8, 8)?;
    // Other MSRs read as at CPL 0, and may be written unchanged.
    img.rdmsr(MSR_EFER)?;
    img.expect(rax, BOOT_EFER, 9)?;
    img.wrmsr(MSR_EFER, BOOT_EFER)?;
    img.rdmsr(MSR_APIC_BASE)?;
    img.expect(rax, 0, 10)?;
    img.puts("msr ok\n")?;
    img.halt(0)?;
    let o = both_succeed(&img.build(), "msr ok\n");
    // The boot's 9, 5 wrmsr, 6 rdmsr, swapgs.
    assert_eq!(o.traps, Some((21, 0)), "{o:#?}");
    Ok(())
}

#[test]
fn control_registers_read_as_at_boot_and_can_be_written_unchanged() -> Asm {
    if !kvm() {
        return Ok(());
    }
    let mut img = Image::new();
    for (cr, value, status) in [(cr0, BOOT_CR0, 1), (cr3, BOOT_CR3, 2), (cr4, BOOT_CR4, 3)] {
        img.a.xor(eax, eax)?;
        img.a.mov(rax, cr)?;
        img.expect(rax, value, status)?;
        img.a.mov(cr, rax)?;
    }
    img.a.mov(eax, 1)?;
    img.a.mov(rax, cr8)?;
    img.expect(rax, 0, 4)?;
    img.a.mov(rax, 0x1234_5000u64)?;
    img.a.mov(cr2, rax)?;
    img.a.xor(ebx, ebx)?;
    img.a.mov(rbx, cr2)?;
    img.expect(rbx, 0x1234_5000, 5)?;
    img.puts("cr ok\n")?;
    img.halt(0)?;
    let o = both_succeed(&img.build(), "cr ok\n");
    // 3 reads and 3 writes, the cr8 read, the cr2 write and read.
    assert_eq!(o.traps, Some((9, 0)), "{o:#?}");
    Ok(())
}

#[test]
fn sgdt_sidt_str_sldt_and_smsw_show_the_images_own_values() -> Asm {
    if !kvm() {
        return Ok(());
    }
    let mut img = Image::new();
    img.solo5_boot()?;
    // At CPL 3 these are privileged only with CR4.UMIP, which tt-host
    // sets where the CPU has it (CPUID.7.0:ECX bit 2).
    let mut no_umip = img.a.create_label();
    img.a.mov(eax, 7)?;
    img.a.xor(ecx, ecx)?;
    img.a.cpuid()?;
    img.a.test(ecx, 1 << 2)?;
    img.a.jz(no_umip)?;
    img.a.sgdt(ptr(SCRATCH))?;
    img.a.movzx(eax, word_ptr(SCRATCH))?;
    img.expect(rax, u64::from(GDT_LIMIT), 1)?;
    img.a.mov(rax, qword_ptr(SCRATCH + 2))?;
    img.expect(rax, GDT, 2)?;
    img.a.sidt(ptr(SCRATCH + 16))?;
    img.a.movzx(eax, word_ptr(SCRATCH + 16))?;
    img.expect(rax, u64::from(IDT_LIMIT), 3)?;
    img.a.mov(rax, qword_ptr(SCRATCH + 18))?;
    img.expect(rax, IDT, 4)?;
    img.a.xor(eax, eax)?;
    img.a.str(ax)?;
    img.expect(rax, u64::from(SEL_TSS), 5)?;
    img.a.mov(eax, 0x1234)?;
    img.a.sldt(ax)?;
    img.expect(rax, 0, 6)?;
    img.a.xor(eax, eax)?;
    img.a.smsw(ax)?;
    img.expect(rax, BOOT_CR0 & 0xffff, 7)?;
    img.puts("tables ok\n")?;
    img.halt(0)?;
    img.a.set_label(&mut no_umip)?;
    img.puts("no umip\n")?;
    img.halt(0)?;
    let umip = std::fs::read_to_string("/proc/cpuinfo")
        .is_ok_and(|c| c.split_whitespace().any(|flag| flag == "umip"));
    let (_, o) = both(&img.build(), &[]);
    assert_eq!(o.status, 0, "{o:#?}");
    if umip {
        assert_eq!(o.stdout, "tables ok\n", "{o:#?}");
        assert_eq!(o.traps, Some((14, 0)), "{o:#?}");
    }
    Ok(())
}

#[test]
fn far_returns_iretq_and_no_op_instructions_go_on_as_at_cpl0() -> Asm {
    if !kvm() {
        return Ok(());
    }
    let mut img = Image::new();
    img.solo5_boot()?;
    // lldt of the null selector; clts, invlpg, wbinvd; cli, sti, cli.
    img.a.xor(eax, eax)?;
    img.a.lldt(ax)?;
    img.a.clts()?;
    img.a.invlpg(byte_ptr(DATA))?;
    img.a.wbinvd()?;
    img.a.cli()?;
    img.a.sti()?;
    img.a.cli()?;
    // retfq $16: two argument words dropped with the return.
    let mut after_retf_imm = img.a.create_label();
    img.a.push(0x1111)?;
    img.a.push(0x2222)?;
    img.a.push(i32::from(SEL_CODE))?;
    img.a.lea(rax, ptr(after_retf_imm))?;
    img.a.push(rax)?;
    img.a.retf_1(16)?;
    img.a.set_label(&mut after_retf_imm)?;
    img.expect(rsp, BOOTED_RSP, 1)?;
    // retfd: a 32-bit rip and cs.
    let mut after_retfd = img.a.create_label();
    img.a.sub(rsp, 8)?;
    img.a.lea(rax, ptr(after_retfd))?;
    img.a.mov(dword_ptr(rsp), eax)?;
    img.a.mov(dword_ptr(rsp + 4), u32::from(SEL_CODE))?;
    img.a.db(&[0xcb])?; // retfd
    img.a.set_label(&mut after_retfd)?;
    img.expect(rsp, BOOTED_RSP, 2)?;
    // iretq to the same CPL, onto another stack.
    let other_stack = IST_TOP - 64;
    let mut after_iretq = img.a.create_label();
    img.a.push(i32::from(SEL_DATA))?;
    img.a.push(other_stack as i32)?;
    img.a.push(0x2)?; // RFLAGS: IF clear, as it is
    img.a.push(i32::from(SEL_CODE))?;
    img.a.lea(rax, ptr(after_iretq))?;
    img.a.push(rax)?;
    img.a.iretq()?;
    img.a.set_label(&mut after_iretq)?;
    img.expect(rsp, other_stack, 3)?;
    img.a.mov(rsp, BOOTED_RSP)?;
    img.puts("ok\n")?;
    img.halt(0)?;
    let o = both_succeed(&img.build(), "ok\n");
    // The boot's 9, then lldt, clts, invlpg, wbinvd, cli, sti, cli and
    // the three returns.
    assert_eq!(o.traps, Some((19, 0)), "{o:#?}");
    Ok(())
}

#[test]
fn a_far_return_at_the_top_of_the_stack_goes_on_as_at_cpl0() -> Asm {
    if !kvm() {
        return Ok(());
    }
    // Near the top of the stack (rsp = mem_size - 8 at entry), after
    // loading its own GDT (tt-host's is not mapped at CPL 0):
    // `push $0x08; push $1f; lretq; 1:`. At CPL 3 the CPU reads an
    // outer-privilege return frame past the top of memory before the
    // monitor sees the return.
    let mut img = Image::new();
    img.d.put_u64(GDT + 8, 0x00af_9b00_0000_ffff);
    img.d.put_table_register(GDTR, GDT, 15);
    img.a.lgdt(ptr(GDTR))?;
    let mut reloaded = img.a.create_label();
    img.a.lea(rax, ptr(reloaded))?;
    img.a.push(i32::from(SEL_CODE))?;
    img.a.push(rax)?;
    img.a.retf()?;
    img.a.set_label(&mut reloaded)?;
    img.expect(rsp, ENTRY_RSP, 1)?;
    img.puts("ok\n")?;
    img.halt(0)?;
    let o = both_succeed(&img.build(), "ok\n");
    assert_eq!(o.traps, Some((2, 0)), "{o:#?}");
    Ok(())
}

type Body = Box<dyn Fn(&mut Image) -> Asm>;

#[test]
fn what_the_monitor_does_not_emulate_stops_the_run_at_cpl3() -> Asm {
    if !kvm() {
        return Ok(());
    }
    let cases: Vec<(&str, Body)> = vec![
        (
            "mov 0x80000021 to cr0",
            Box::new(|img| {
                img.a.mov(rax, cr0)?;
                img.a.and(eax, !0x1_0000)?; // clear WP
                img.a.mov(cr0, rax)
            }),
        ),
        (
            "mov 0x3000 to cr3",
            Box::new(|img| {
                img.a.mov(eax, 0x3000)?;
                img.a.mov(cr3, rax)
            }),
        ),
        (
            "wrmsr of 0x901 to MSR 0xc0000080",
            Box::new(|img| img.wrmsr(MSR_EFER, 0x901)), // EFER.SCE, no NXE
        ),
        (
            "lldt 0x18",
            Box::new(|img| {
                img.a.mov(eax, 0x18)?;
                img.a.lldt(ax)
            }),
        ),
        (
            "iretq to CPL 3",
            Box::new(|img| {
                // RPL 3 selectors of the image's GDT (0x1b and 0x23 are
                // tt-host's own user segments, which iretq reaches itself).
                for w in [0x13, BOOTED_RSP as i32, 0x2, 0x0b, TEXT as i32] {
                    img.a.push(w)?;
                }
                img.a.iretq()
            }),
        ),
        (
            "a far return to CPL 3",
            Box::new(|img| {
                img.a.push(0x0b)?;
                img.a.push(TEXT as i32)?;
                img.a.retf()
            }),
        ),
    ];
    for (what, body) in cases {
        let mut img = Image::new();
        body(&mut img)?;
        img.halt(0)?;
        let o = run_at("3", &img.build(), &[]);
        assert_eq!(o.status, 1, "{o:#?}");
        let ran = format!("the image ran `{what}` at 0x");
        let why = "a privileged operation tt-host's CPL 3 monitor does not emulate; run it \
                   with --cpl=0";
        assert!(
            o.message.contains(&ran) && o.message.contains(why),
            "expected {ran:?}: {o:#?}"
        );
    }
    Ok(())
}

#[test]
fn hlt_with_interrupts_off_stops_in_both_modes() -> Asm {
    if !kvm() {
        return Ok(());
    }
    let mut img = Image::new();
    img.a.cli()?;
    img.a.hlt()?;
    img.halt(0)?;
    both_stop(
        &img.build(),
        &[],
        "guest executed HLT and will never wake (it has no interrupts)",
    );
    Ok(())
}

#[test]
fn hlt_with_interrupts_on_stops_the_same_way_in_both_modes() -> Asm {
    if !kvm() {
        return Ok(());
    }
    let mut img = Image::new();
    img.a.sti()?;
    img.a.hlt()?;
    img.halt(0)?;
    both_stop(&img.build(), &[], "guest executed HLT");
    Ok(())
}

/// Fields of a trap record, as the image's handlers write them.
const RECORD_FIELDS: [&str; 8] = [
    "vector",
    "error code",
    "saved rip",
    "saved cs",
    "saved ss",
    "saved rsp",
    "frame address (where the saved rip is)",
    "cr2 (#PF only)",
];
const RECORD_WORDS: u64 = RECORD_FIELDS.len() as u64;

/// An exception the image provokes, and what its handler must see.
struct Trigger {
    what: &'static str,
    vector: u8,
    error: u64,
    cr2: u64,
    /// Where the saved rip points: the faulting instruction, the next one
    /// (a trap), or an address it jumped to.
    rip: Rip,
}

#[derive(Clone, Copy)]
enum Rip {
    At,
    After,
    Is(u64),
}

fn fault(what: &'static str, vector: u8, error: u64) -> Trigger {
    Trigger {
        what,
        vector,
        error,
        cr2: 0,
        rip: Rip::At,
    }
}

fn page_fault(what: &'static str, error: u64, addr: u64) -> Trigger {
    Trigger {
        cr2: addr,
        ..fault(what, 14, error)
    }
}

fn trap(what: &'static str, vector: u8) -> Trigger {
    Trigger {
        rip: Rip::After,
        ..fault(what, vector, 0)
    }
}

type Code = Box<dyn Fn(&mut CodeAssembler) -> Asm>;

/// Vectors whose gates use IST1.
const IST_VECTORS: [u8; 2] = [6, 13];

/// An image that boots as Solo5 does, with handlers for vectors 0, 1, 3,
/// 6, 13, 14 and 0x30 (6 and 13 on IST1) that record what they see, then
/// provokes each of `cases` in turn, and exits 0 only if every record is
/// what the case expects (else 1 + the index of the first quadword that
/// differs: see [`Records::explain`]). Each case is what its handler must
/// see, code to run before, and the faulting instruction.
fn exception_image(cases: &[(Trigger, Code, Code)]) -> Result<(Vec<u8>, Records), IcedError> {
    let mut img = Image::new();
    img.d.put_u64(NEXT_RECORD, RECORDS);
    img.solo5_boot()?;
    // Each case sets r15 to where its handler resumes.
    let mut sites = Vec::new();
    for (_, before, faulting) in cases {
        let mut at = img.a.create_label();
        let mut resume = img.a.create_label();
        before(&mut img.a)?;
        img.a.lea(r15, ptr(resume))?;
        img.a.set_label(&mut at)?;
        faulting(&mut img.a)?;
        img.a.set_label(&mut resume)?;
        img.a.nop()?;
        sites.push((at, resume));
    }
    // Compare the records with what they must be, and one more: all zero.
    let words = (cases.len() as u64 + 1) * RECORD_WORDS;
    assert!(words < 255 && RECORDS + 8 * words <= EXPECTED);
    let mut all_match = img.a.create_label();
    img.a.mov(esi, RECORDS as u32)?;
    img.a.mov(edi, EXPECTED as u32)?;
    img.a.mov(ecx, words as u32)?;
    img.a.cld()?;
    img.a.repe().cmpsq()?;
    img.a.je(all_match)?;
    img.a.mov(r14d, words as u32)?;
    img.a.sub(r14d, ecx)?;
    img.a.jmp(img.fail)?;
    img.a.set_label(&mut all_match)?;
    img.puts("traps ok\n")?;
    img.halt(0)?;

    // The handlers: a stub per vector pushes an error code (0 if the CPU
    // pushes none) and its vector; the common part records the frame,
    // resumes at r15 and returns with iretq. A double fault exits 250.
    let vectors = [0u8, 1, 3, 6, 13, 14, 0x30];
    let mut stubs = Vec::new();
    let mut common = img.a.create_label();
    for v in vectors {
        let mut l = img.a.create_label();
        img.a.set_label(&mut l)?;
        if !matches!(v, 13 | 14) {
            img.a.push(0)?;
        }
        img.a.push(i32::from(v))?;
        img.a.jmp(common)?;
        stubs.push(l);
    }
    let mut double_fault = img.a.create_label();
    img.a.set_label(&mut double_fault)?;
    img.halt(250)?;
    stubs.push(double_fault);
    let mut no_cr2 = img.a.create_label();
    img.a.set_label(&mut common)?;
    img.a.mov(rbx, qword_ptr(NEXT_RECORD))?;
    for (field, from) in [(0, 0), (1, 8), (2, 16), (3, 24), (4, 48), (5, 40)] {
        img.a.mov(rax, qword_ptr(rsp + from))?;
        img.a.mov(qword_ptr(rbx + 8 * field), rax)?;
    }
    img.a.lea(rax, qword_ptr(rsp + 16))?;
    img.a.mov(qword_ptr(rbx + 48), rax)?;
    img.a.xor(eax, eax)?;
    img.a.cmp(qword_ptr(rsp), 14)?;
    img.a.jne(no_cr2)?;
    img.a.mov(rax, cr2)?;
    img.a.set_label(&mut no_cr2)?;
    img.a.mov(qword_ptr(rbx + 56), rax)?;
    img.a.add(rbx, (8 * RECORD_WORDS) as i32)?;
    img.a.mov(qword_ptr(NEXT_RECORD), rbx)?;
    img.a.mov(qword_ptr(rsp + 16), r15)?;
    img.a.add(rsp, 16)?;
    img.a.iretq()?;

    let mut labels = stubs.clone();
    for (at, resume) in &sites {
        labels.extend([*at, *resume]);
    }
    let (code, addrs, mut data) = img.assemble(&labels);
    for (i, v) in vectors.into_iter().chain([8]).enumerate() {
        data.gate(v, addrs[i], u64::from(IST_VECTORS.contains(&v)));
    }
    let frame_at = |v: u8| {
        let top = if IST_VECTORS.contains(&v) {
            IST_TOP
        } else {
            BOOTED_RSP & !0xf
        };
        top - 40
    };
    let mut records = Records(Vec::new());
    for (i, (t, _, _)) in cases.iter().enumerate() {
        let (at, after) = (addrs[stubs.len() + 2 * i], addrs[stubs.len() + 2 * i + 1]);
        let rip = match t.rip {
            Rip::At => at,
            Rip::After => after,
            Rip::Is(rip) => rip,
        };
        let record = [
            u64::from(t.vector),
            t.error,
            rip,
            u64::from(SEL_CODE),
            u64::from(SEL_DATA),
            BOOTED_RSP,
            frame_at(t.vector),
            t.cr2,
        ];
        for (k, w) in record.iter().enumerate() {
            data.put_u64(EXPECTED + 8 * (i as u64 * RECORD_WORDS + k as u64), *w);
        }
        records.0.push((t.what, record));
    }
    Ok((data.elf(code), records))
}

/// What each case of an [`exception_image`] must record.
struct Records(Vec<(&'static str, [u64; RECORD_WORDS as usize])>);

impl Records {
    /// What an exit status of an [`exception_image`] means.
    fn explain(&self, status: i32) -> String {
        let Ok(n) = u64::try_from(status - 1) else {
            return String::new();
        };
        let (case, field) = ((n / RECORD_WORDS) as usize, (n % RECORD_WORDS) as usize);
        match self.0.get(case) {
            Some((what, record)) => format!(
                "{what}: the {} is not {:#x}",
                RECORD_FIELDS[field], record[field]
            ),
            None if case == self.0.len() => "more traps than expected".into(),
            None => format!("status {status}"),
        }
    }

    /// Assert that `o` is a run that found every record as expected, and
    /// at CPL 3, that each case took one delivery and one emulated `iretq`
    /// (and, for a page fault, an emulated `mov %cr2`), after the boot's 9
    /// emulated instructions.
    fn assert_all_match(&self, o: &Outcome) {
        assert_eq!(o.status, 0, "{}: {o:#?}", self.explain(o.status));
        assert_eq!(o.stdout, "traps ok\n", "{o:#?}");
        if o.traps.is_some() {
            let n = self.0.len() as u64;
            let faults = self.0.iter().filter(|r| r.1[0] == 14).count() as u64;
            assert_eq!(o.traps, Some((9 + n + faults, n)), "{o:#?}");
        }
    }
}

#[test]
fn exceptions_reach_the_images_own_handlers_with_a_cpl0_frame() -> Asm {
    if !kvm() {
        return Ok(());
    }
    let nothing = || -> Code { Box::new(|_| Ok(())) };
    let unmapped = 0x4_0000_0000u64;
    let mut cases: Vec<(Trigger, Code, Code)> = vec![
        (
            page_fault("write to unmapped memory", 2, unmapped),
            Box::new(move |a| a.mov(rax, unmapped)),
            Box::new(|a| a.mov(byte_ptr(rax), 1)),
        ),
        (
            page_fault("write to text (W^X)", 3, TEXT),
            nothing(),
            Box::new(|a| a.mov(byte_ptr(TEXT), 1)),
        ),
        (
            page_fault("null write", 2, 0x10),
            nothing(),
            Box::new(|a| a.mov(byte_ptr(0x10u64), 1)),
        ),
        (
            page_fault("write to the boot info", 3, BOOT_INFO),
            nothing(),
            Box::new(|a| a.mov(byte_ptr(BOOT_INFO), 1)),
        ),
        (
            page_fault("write to the monitor's stubs", 2, MONITOR_STUBS),
            nothing(),
            Box::new(|a| a.mov(byte_ptr(MONITOR_STUBS), 1)),
        ),
        (
            Trigger {
                rip: Rip::Is(SCRATCH),
                ..page_fault("jump to data (W^X)", 0x11, SCRATCH)
            },
            Box::new(|a| a.mov(eax, SCRATCH as u32)),
            Box::new(|a| a.jmp(rax)),
        ),
        (
            Trigger {
                rip: Rip::Is(MONITOR_STUBS),
                ..page_fault("jump to the monitor's stubs", 0x10, MONITOR_STUBS)
            },
            Box::new(|a| a.mov(eax, MONITOR_STUBS as u32)),
            Box::new(|a| a.jmp(rax)),
        ),
        (fault("ud2", 6, 0), nothing(), Box::new(|a| a.ud2())),
        (
            fault("division by zero", 0, 0),
            Box::new(|a| a.xor(ecx, ecx)),
            Box::new(|a| a.div(ecx)),
        ),
        (
            fault("load from a non-canonical address", 13, 0),
            Box::new(|a| a.mov(rax, 0x8000_0000_0000_0000u64)),
            Box::new(|a| a.mov(rax, qword_ptr(rax))),
        ),
        (
            fault("rdmsr of an MSR the vCPU does not have", 13, 0),
            Box::new(|a| a.mov(ecx, 0x4b56_4d99u32)),
            Box::new(|a| a.rdmsr()),
        ),
        (
            fault("wrmsr of a non-canonical FS_BASE", 13, 0),
            Box::new(|a| {
                a.mov(ecx, MSR_FS_BASE)?;
                a.xor(eax, eax)?;
                a.mov(edx, 0x8000_0000u32)
            }),
            Box::new(|a| a.wrmsr()),
        ),
    ];
    for (what, addr) in [
        ("read of the monitor's IDT", MONITOR),
        ("read of the monitor's TSS", MONITOR_TSS),
        ("read of the monitor's stack", MONITOR_STACK + 0xff8),
        ("read of tt-host's GDT", HOST_GDT),
        ("read of tt-host's page tables", BOOT_CR3),
    ] {
        cases.push((
            page_fault(what, 0, addr),
            nothing(),
            Box::new(move |a| a.mov(rax, qword_ptr(addr))),
        ));
    }
    let (elf, records) = exception_image(&cases)?;
    let (zero, three) = both(&elf, &[]);
    records.assert_all_match(&zero);
    records.assert_all_match(&three);
    Ok(())
}

#[test]
fn software_interrupts_and_faulting_table_loads_reach_the_images_handlers_at_cpl3() -> Asm {
    if !kvm() {
        return Ok(());
    }
    // Only at CPL 3: on kvm-pvm, KVM's emulator stops with an internal
    // error on these at CPL 0 (int3 and lgdt of an unmapped operand).
    let nothing = || -> Code { Box::new(|_| Ok(())) };
    let cases: Vec<(Trigger, Code, Code)> = vec![
        (trap("int3", 3), nothing(), Box::new(|a| a.int3())),
        (trap("int1", 1), nothing(), Box::new(|a| a.int1())),
        (trap("int 0x30", 0x30), nothing(), Box::new(|a| a.int(0x30))),
        (
            page_fault("lgdt from the monitor's IDT", 0, MONITOR),
            nothing(),
            Box::new(|a| a.lgdt(ptr(MONITOR))),
        ),
        (
            page_fault("lidt from unmapped memory", 0, 0x4_0000_0000),
            Box::new(|a| a.mov(rax, 0x4_0000_0000u64)),
            Box::new(|a| a.lidt(ptr(rax))),
        ),
    ];
    let (elf, records) = exception_image(&cases)?;
    records.assert_all_match(&run_at("3", &elf, &[]));
    Ok(())
}

#[test]
fn segment_loads_from_unreadable_memory_deliver_a_page_fault_at_cpl3() -> Asm {
    if !kvm() {
        return Ok(());
    }
    let cases: Vec<(Trigger, Code, Code)> = vec![
        (
            page_fault("ltr from tt-host's GDT", 0, HOST_GDT),
            Box::new(|_| Ok(())),
            Box::new(|a| a.ltr(word_ptr(HOST_GDT))),
        ),
        (
            page_fault("mov ds from the monitor's IDT", 0, MONITOR),
            Box::new(|_| Ok(())),
            Box::new(|a| a.mov(ds, word_ptr(MONITOR))),
        ),
    ];
    let (elf, records) = exception_image(&cases)?;
    records.assert_all_match(&run_at("3", &elf, &[]));
    Ok(())
}

#[test]
fn faults_without_an_idt_stop_both_modes_alike_with_the_same_cr2() -> Asm {
    if !kvm() {
        return Ok(());
    }
    let read = |addr: u64| -> Code { Box::new(move |a| a.mov(rax, qword_ptr(addr))) };
    let write = |addr: u64| -> Code { Box::new(move |a| a.mov(byte_ptr(addr), 1)) };
    let jump = |addr: u64| -> Code {
        Box::new(move |a| {
            a.mov(eax, addr as u32)?;
            a.jmp(rax)
        })
    };
    // (what, code, cr2, rip if it must be the same)
    let mut cases: Vec<(&str, Code, u64, Option<u64>)> = vec![
        ("write to text (W^X)", write(TEXT), TEXT, None),
        ("jump to data (W^X)", jump(SCRATCH), SCRATCH, Some(SCRATCH)),
        ("null write", write(0x10), 0x10, None),
        ("null read", read(0), 0, None),
        (
            "write to the boot info",
            write(BOOT_INFO + 8),
            BOOT_INFO + 8,
            None,
        ),
        (
            "write to the monitor's TSS (rsp0)",
            write(MONITOR_TSS + 4),
            MONITOR_TSS + 4,
            None,
        ),
        (
            "jump to the monitor's stubs",
            jump(MONITOR_STUBS),
            MONITOR_STUBS,
            Some(MONITOR_STUBS),
        ),
    ];
    for (what, addr) in [
        ("read of the monitor's IDT", MONITOR),
        ("read of the monitor's TSS", MONITOR_TSS),
        ("read of the monitor's stubs", MONITOR_STUBS),
        ("read of the monitor's stack", MONITOR_STACK + 0xff8),
        ("read of tt-host's GDT", HOST_GDT),
        ("read of tt-host's page tables", BOOT_CR3),
        ("read of tt-host's page directory", 0x4000),
    ] {
        cases.push((what, read(addr), addr, None));
    }
    for (what, code, addr, rip) in cases {
        let mut img = Image::new();
        code(&mut img.a)?;
        img.halt(0)?;
        let (zero, three) = both_stop(&img.build(), &[], "guest triple fault");
        let fault_at = format!("{addr:#x}");
        for o in [&zero, &three] {
            assert_eq!(o.reg("cr2"), Some(&fault_at[..]), "{what}: {o:#?}");
            if let Some(rip) = rip {
                assert_eq!(
                    o.reg("rip"),
                    Some(&format!("{rip:#x}")[..]),
                    "{what}: {o:#?}"
                );
            }
        }
    }
    // Faults other than page faults, and a software interrupt.
    let cases: Vec<(&str, Code)> = vec![
        ("ud2", Box::new(|a| a.ud2())),
        (
            "division by zero",
            Box::new(|a| {
                a.xor(ecx, ecx)?;
                a.div(ecx)
            }),
        ),
        (
            "load from a non-canonical address",
            Box::new(|a| {
                a.mov(rax, 0x8000_0000_0000_0000u64)?;
                a.mov(rax, qword_ptr(rax))
            }),
        ),
    ];
    for (what, code) in cases {
        let mut img = Image::new();
        code(&mut img.a)?;
        img.halt(0)?;
        let (zero, three) = both_stop(&img.build(), &[], "guest triple fault");
        assert_eq!(zero.reg("cr2"), three.reg("cr2"), "{what}");
    }
    Ok(())
}

/// A hypercall whose argument struct (at `arg`, with `fields` as (offset,
/// value) pairs) or buffer lies where the image may not write or read.
struct Call {
    what: &'static str,
    call: Hypercall,
    arg: u64,
    fields: Vec<(usize, u64)>,
    /// The address the refusal names.
    named: u64,
    /// The image has a block device.
    block: bool,
}

#[test]
fn hypercalls_that_reach_the_monitors_pages_or_tt_hosts_tables_are_refused() -> Asm {
    if !kvm() {
        return Ok(());
    }
    let dir = Scratch::new("cpl3-disk");
    let disk = dir.file("disk.img", &vec![0x5a; 64 * 1024]);
    let disk_arg = format!("--block:disk={}", disk.display());
    let block_args = ["--block-durability=none", &disk_arg[..]];
    // Argument structs, as (field offset, value) pairs.
    let block_read = |data: u64| {
        use abi::HcBlockRead as S;
        let f = [
            offset_of!(S, handle),
            offset_of!(S, offset),
            offset_of!(S, data),
            offset_of!(S, len),
        ];
        f.into_iter().zip([1, 0, data, 512]).collect::<Vec<_>>()
    };
    let block_write = |data: u64| {
        use abi::HcBlockWrite as S;
        let f = [
            offset_of!(S, handle),
            offset_of!(S, offset),
            offset_of!(S, data),
            offset_of!(S, len),
        ];
        f.into_iter().zip([1, 0, data, 512]).collect::<Vec<_>>()
    };
    let puts = |data: u64| {
        use abi::HcPuts as S;
        vec![(offset_of!(S, data), data), (offset_of!(S, len), 16)]
    };
    use tt_host::abi::Hypercall::*;
    // The argument struct at `at`, which the refusal names.
    let direct = |what, call, at| Call {
        what,
        call,
        arg: at,
        fields: vec![],
        named: at,
        block: false,
    };
    // The argument struct at SCRATCH, with these fields; the refusal
    // names the buffer.
    let buffer = |what, call, fields, named| Call {
        what,
        call,
        arg: SCRATCH,
        fields,
        named,
        block: matches!(call, BlockRead | BlockWrite),
    };
    let cases = [
        direct("WALLTIME into the monitor's TSS", Walltime, MONITOR_TSS),
        direct("WALLTIME into tt-host's GDT", Walltime, HOST_GDT),
        direct(
            "WALLTIME into the monitor's stack",
            Walltime,
            MONITOR_STACK + 0xff0,
        ),
        direct("POLL into the monitor's stack", Poll, MONITOR_STACK + 0x800),
        buffer(
            "PUTS of the monitor's stubs",
            Puts,
            puts(MONITOR_STUBS),
            MONITOR_STUBS,
        ),
        buffer(
            "BLOCK_READ into the monitor's IDT",
            BlockRead,
            block_read(MONITOR),
            MONITOR,
        ),
        buffer(
            "BLOCK_READ into tt-host's page tables",
            BlockRead,
            block_read(BOOT_CR3),
            BOOT_CR3,
        ),
        buffer(
            "BLOCK_WRITE of the monitor's TSS",
            BlockWrite,
            block_write(MONITOR_TSS),
            MONITOR_TSS,
        ),
    ];
    for Call {
        what,
        call,
        arg,
        fields,
        named,
        block,
    } in cases
    {
        let mut img = Image::new();
        for (offset, value) in fields {
            img.d.put_u64(SCRATCH + offset as u64, value);
        }
        if block {
            img.d.devices = vec![("disk".into(), abi::MFT_DEV_BLOCK_BASIC)];
        }
        img.hypercall(call, arg)?;
        img.puts("served\n")?;
        img.halt(0)?;
        let args: &[&str] = if block { &block_args } else { &[] };
        let (zero, three) = both(&img.build(), args);
        for o in [&zero, &three] {
            assert_eq!(o.status, 1, "{what} was served: {o:#?}");
            assert_eq!(o.stdout, "", "{what}: {o:#?}");
            assert!(
                o.message.contains(&format!("{named:#x}")),
                "{what}: the refusal names {named:#x}: {o:#?}"
            );
        }
    }
    Ok(())
}

#[test]
fn sse_runs_at_cpl3() -> Asm {
    if !kvm() {
        return Ok(());
    }
    let mut img = Image::new();
    for (i, f) in [1.0f32, 2.0, 3.0, 4.0].iter().enumerate() {
        img.d.put(SCRATCH + 4 * i as u64, &f.to_le_bytes());
    }
    let bits = |lo: f32, hi: f32| u64::from(lo.to_bits()) | (u64::from(hi.to_bits()) << 32);
    img.a.movaps(xmm0, xmmword_ptr(SCRATCH))?;
    img.a.addps(xmm0, xmm0)?;
    img.a.movaps(xmmword_ptr(SCRATCH + 16), xmm0)?;
    img.a.mov(rax, qword_ptr(SCRATCH + 16))?;
    img.expect(rax, bits(2.0, 4.0), 1)?;
    img.a.mov(rax, qword_ptr(SCRATCH + 24))?;
    img.expect(rax, bits(6.0, 8.0), 2)?;
    img.a.mov(eax, 3)?;
    img.a.cvtsi2sd(xmm1, rax)?;
    img.a.movq(rax, xmm1)?;
    img.expect(rax, 3.0f64.to_bits(), 3)?;
    img.puts("sse ok\n")?;
    img.halt(0)?;
    // Not at CPL 0: there, kvm-pvm's emulator stops on SSE.
    let o = run_at("3", &img.build(), &[]);
    assert_eq!((o.status, &o.stdout[..]), (0, "sse ok\n"), "{o:#?}");
    assert_eq!(o.traps, Some((0, 0)), "{o:#?}");
    Ok(())
}

#[test]
fn port_io_outside_the_hypercalls_stops_both_modes_alike() -> Asm {
    if !kvm() {
        return Ok(());
    }
    let with_dx = |port: u32, then: Code| -> Code {
        Box::new(move |a| {
            a.mov(dx, port)?;
            a.mov(esi, DATA as u32)?;
            a.mov(edi, SCRATCH as u32)?;
            then(a)
        })
    };
    let cases: Vec<(&str, Code)> = vec![
        (
            "1-byte write to port 0x80 (hypercalls are 4-byte writes)",
            Box::new(|a| a.out(0x80, al)),
        ),
        (
            "1-byte write to port 0xf0 (hypercalls are 4-byte writes)",
            Box::new(|a| a.out(0xf0, al)),
        ),
        (
            "port 0xf0 is not a hypercall",
            with_dx(0xf0, Box::new(|a| a.out(dx, eax))),
        ),
        (
            "port 0x509 is not a hypercall",
            with_dx(0x509, Box::new(|a| a.out(dx, eax))),
        ),
        (
            "port 0x600 is not a hypercall",
            with_dx(0x600, Box::new(|a| a.out(dx, eax))),
        ),
        (
            "2-byte write to port 0x508 (hypercalls are 4-byte writes)",
            with_dx(0x508, Box::new(|a| a.out(dx, ax))),
        ),
        (
            "read from port 0x501",
            with_dx(0x501, Box::new(|a| a.in_(al, dx))),
        ),
        (
            "read from port 0x60",
            with_dx(0x60, Box::new(|a| a.in_(eax, dx))),
        ),
        (
            "1-byte write to port 0x80 (hypercalls are 4-byte writes)",
            with_dx(0x80, Box::new(|a| a.outsb())),
        ),
        ("read from port 0x60", with_dx(0x60, Box::new(|a| a.insd()))),
    ];
    for (needle, code) in cases {
        let mut img = Image::new();
        code(&mut img.a)?;
        img.halt(0)?;
        both_stop(
            &img.build(),
            &[],
            &format!("invalid guest port access: {needle}"),
        );
    }
    Ok(())
}

#[test]
fn the_cpl_option_is_checked_and_tt_guest_images_keep_their_own_entry() {
    if !kvm() {
        return;
    }
    let dir = Scratch::new("cpl3-cli");
    let synth = dir.file("synth.hvt", &Synth::default().build());
    let synth = synth.to_str().expect("utf-8 path");
    let r = tt(&["run", "--mem=8", "--cpl=7", synth]);
    assert_error(&r, "--cpl=7");
    let r = tt(&["run", "--mem=8", "--cpl=3", "--x-solo5-hvt-boot", synth]);
    assert_error(&r, "--x-solo5-hvt-boot");
    assert!(r.stderr.contains("--cpl=3"), "{r:?}");

    let hello = guest("hello");
    let hello = hello.to_str().expect("utf-8 path");
    let r = tt(&["run", "--mem=16", "--cpl=3", hello]);
    assert_error(&r, "supervisor-only segments");
    for cpl in [&["--cpl=auto"][..], &["--cpl=0"], &[]] {
        let r = tt(&[&["run", "--mem=16"], cpl, &[hello]].concat());
        assert_eq!(r.status, 0, "{cpl:?}: {r:?}");
        assert!(r.stdout.contains("Hello, world"), "{cpl:?}: {r:?}");
    }

    // auto: CPL 3 on kvm-pvm (where CPL 0 code is emulated), else 0.
    let expect_cpl3 = std::path::Path::new("/sys/module/kvm_pvm").exists();
    let r = tt_with(
        Command::new(tt_host())
            .args(["run", "--mem=8", synth])
            .env("TT_HOST_STATS", "1"),
    );
    assert_eq!(r.status, 0, "{r:?}");
    assert_eq!(
        r.stderr.contains("cpl3 traps"),
        expect_cpl3,
        "--cpl=auto on this host: {r:?}"
    );
}
