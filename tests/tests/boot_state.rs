//! The boot state a Solo5 image sees, checked from inside hand-assembled
//! CPL 0 guests (`tt_host::loader::synth`) against what solo5-hvt sets up
//! (tenders/hvt/hvt_cpu_x86_64.{c,h}, hvt_kvm_x86_64.c, Solo5 0.6.0 and
//! later): control registers, the IDT, and low memory (the tender's own
//! structures unmapped, what it gives the guest read-only, even at CPL 0).
//! Each check runs in tt-host's boot state at CPL 0 (`--cpl=0`), at
//! CPL 3 under its monitor (`--cpl=3`: the image must see the same, but
//! for the differences docs/ABI.md lists), and in the solo5-hvt one
//! (`--x-solo5-hvt-boot`).

use tt_host::loader::synth::{self, Synth};
use tt_tests::*;

const MEM_MB: u64 = 8;

/// The three boot states each check runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Boot {
    Cpl0,
    Cpl3,
    Solo5Hvt,
}
const BOOTS: [Boot; 3] = [Boot::Cpl0, Boot::Cpl3, Boot::Solo5Hvt];

fn run_code(code: Vec<u8>, boot: Boot) -> Run {
    let dir = Scratch::new("boot-state");
    let img = dir.file(
        "guest.hvt",
        &Synth {
            code,
            ..Synth::default()
        }
        .build(),
    );
    let mem = format!("--mem={MEM_MB}");
    let mut args = vec!["run", mem.as_str()];
    args.push(match boot {
        Boot::Cpl0 => "--cpl=0",
        Boot::Cpl3 => "--cpl=3",
        Boot::Solo5Hvt => "--x-solo5-hvt-boot",
    });
    args.push(img.to_str().unwrap());
    tt(&args)
}

/// Code that leaves a value in `rax`, then halts with status 0 if
/// `rax & mask == want`, else with status `fail`.
fn check(read: &[u8], mask: u64, want: u64, fail: i32) -> Vec<u8> {
    let mut c = read.to_vec();
    c.extend_from_slice(&[0x48, 0xb9]); // mov rcx, mask
    c.extend_from_slice(&mask.to_le_bytes());
    c.extend_from_slice(&[0x48, 0x21, 0xc8]); // and rax, rcx
    c.extend_from_slice(&[0x48, 0xb9]); // mov rcx, want
    c.extend_from_slice(&want.to_le_bytes());
    c.extend_from_slice(&[0x48, 0x39, 0xc8]); // cmp rax, rcx
    let halt_fail = synth::code_halt(fail);
    c.extend_from_slice(&[0x74, halt_fail.len() as u8]); // je over the failure
    c.extend(halt_fail);
    c
}

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_EM: u64 = 1 << 2;
const CR0_TS: u64 = 1 << 3;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_AM: u64 = 1 << 18;
const CR0_NW: u64 = 1 << 29;
const CR0_CD: u64 = 1 << 30;
const CR0_PG: u64 = 1 << 31;
const EFER_SCE: u64 = 1;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const EFER_NXE: u64 = 1 << 11;

/// `mov rax, cr0`
const READ_CR0: &[u8] = &[0x0f, 0x20, 0xc0];
/// `mov rax, cr4`
const READ_CR4: &[u8] = &[0x0f, 0x20, 0xe0];
/// `mov ecx, IA32_EFER; rdmsr; shl rdx, 32; or rax, rdx`
const READ_EFER: &[u8] = &[
    0xb9, 0x80, 0x00, 0x00, 0xc0, 0x0f, 0x32, 0x48, 0xc1, 0xe2, 0x20, 0x48, 0x09, 0xd0,
];
/// `mov ecx, IA32_APIC_BASE; rdmsr; shl rdx, 32; or rax, rdx`
const READ_APIC_BASE: &[u8] = &[
    0xb9, 0x1b, 0x00, 0x00, 0x00, 0x0f, 0x32, 0x48, 0xc1, 0xe2, 0x20, 0x48, 0x09, 0xd0,
];
/// `pushfq; pop rax`
const READ_RFLAGS: &[u8] = &[0x9c, 0x58];
/// `mov rax, rsp`
const READ_RSP: &[u8] = &[0x48, 0x89, 0xe0];
/// `mov rax, rsi`
const READ_RSI: &[u8] = &[0x48, 0x89, 0xf0];

/// `sidt [DATA + 16]; mov rax, [DATA + 16]` (limit in bits 0-15, base above).
fn read_idtr() -> Vec<u8> {
    let at = (synth::DATA + 16) as u32;
    let mut c = vec![0x0f, 0x01, 0x0c, 0x25];
    c.extend_from_slice(&at.to_le_bytes());
    c.extend_from_slice(&[0x48, 0x8b, 0x04, 0x25]);
    c.extend_from_slice(&at.to_le_bytes());
    c
}

/// `mov al, [addr]`
fn read_byte(addr: u32) -> Vec<u8> {
    let mut c = vec![0x8a, 0x04, 0x25];
    c.extend_from_slice(&addr.to_le_bytes());
    c
}

fn registers(boot: Boot) -> Vec<u8> {
    let solo5_hvt_boot = boot == Boot::Solo5Hvt;
    // solo5-hvt: X86_CR0_INIT, X86_CR4_INIT, X86_EFER_INIT; tt-host adds
    // EFER.NXE for its NX page-table bits (docs/ABI.md).
    let cr0_bits = CR0_PE | CR0_MP | CR0_EM | CR0_TS | CR0_NE | CR0_WP | CR0_AM;
    let cr0_bits = cr0_bits | CR0_NW | CR0_CD | CR0_PG;
    let efer_bits = EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE;
    let efer = if solo5_hvt_boot {
        EFER_LME | EFER_LMA
    } else {
        EFER_LME | EFER_LMA | EFER_NXE
    };
    // First, before any check clobbers it: rsi, where only tt-host says
    // who it is (solo5-hvt leaves every register but rdi, rsp, rip and
    // rflags 0).
    let rsi = if solo5_hvt_boot {
        0
    } else {
        tt_host::abi::ENTRY_RSI_TT_HOST
    };
    let mut c = check(READ_RSI, u64::MAX, rsi, 17);
    c.extend(check(
        READ_CR0,
        cr0_bits,
        CR0_PE | CR0_NE | CR0_WP | CR0_PG,
        10,
    ));
    c.extend(check(
        READ_CR4,
        u64::MAX,
        (1 << 5) | (1 << 9) | (1 << 10),
        11,
    ));
    c.extend(check(READ_EFER, efer_bits, efer, 12));
    // Not the arithmetic flags (CF PF AF ZF SF OF): the checks before set them.
    // At CPL 3, `pushf` shows the real IF, which kvm-pvm keeps set in
    // user mode (docs/ABI.md: what an image can tell).
    let if_bit = if boot == Boot::Cpl3 { 1 << 9 } else { 0 };
    c.extend(check(READ_RFLAGS, !0x8d5 & !if_bit, 0x2, 13));
    c.extend(check(READ_RSP, u64::MAX, (MEM_MB << 20) - 8, 14));
    c.extend(check(&read_idtr(), 0xffff_ffff_ffff_ffff, 0, 15));
    c.extend(check(READ_APIC_BASE, u64::MAX, 0, 16));
    c.extend(synth::code_halt(0));
    c
}

/// CR0 = PE|NE|WP|PG (no MP), CR4 = PAE|OSFXSR|OSXMMEXCPT, EFER =
/// LME|LMA (+NXE), RFLAGS = 0x2, rsp = top - 8, no IDT and IA32_APIC_BASE
/// = 0 (its `kvm_sregs` leaves both zero), as solo5-hvt's
/// `hvt_vcpu_init` leaves them. Exit status 10+ names the failing check.
#[test]
fn registers_are_as_solo5_hvt_sets_them() {
    if !kvm() {
        return;
    }
    for boot in BOOTS {
        let r = run_code(registers(boot), boot);
        assert_eq!(r.status, 0, "{boot:?}: {r:?}");
    }
}

/// The command line (like all tender data below 1 MiB) is read-only, also
/// at CPL 0 (Solo5 issue #319, fixed by setting CR0.WP).
#[test]
fn writing_the_command_line_faults() {
    if !kvm() {
        return;
    }
    for boot in BOOTS {
        // The boot info is readable; the command line is not writable.
        let mut code = read_byte(0x8_0000);
        code.extend(synth::code_write_byte(0x8_2000));
        code.extend(synth::code_halt(0));
        let r = run_code(code, boot);
        assert_error(&r, "triple fault");
        assert!(r.stderr.contains("cr2=0x82000"), "{boot:?}: {r:?}");
    }
}

/// The tender's GDT and page tables are not mapped in the guest: a stray
/// access faults instead of corrupting the guest's own address space.
#[test]
fn the_tenders_page_tables_are_not_mapped() {
    if !kvm() {
        return;
    }
    for boot in BOOTS {
        // ... and at CPL 3 neither is the monitor (0x7c000-0x7ffff), which
        // tt-host leaves unmapped at CPL 0 (solo5-hvt maps it read-only).
        let monitor: &[u32] = if boot == Boot::Solo5Hvt {
            &[]
        } else {
            &[0x7c000, 0x7f000]
        };
        for &addr in [0x1000u32, 0x2000, 0x4000].iter().chain(monitor) {
            let mut code = read_byte(addr);
            code.extend(synth::code_halt(0));
            let r = run_code(code, boot);
            assert_error(&r, "triple fault");
            let cr2 = format!("cr2={addr:#x}");
            assert!(r.stderr.contains(&cr2), "{boot:?} {addr:#x}: {r:?}");
        }
    }
}

/// Page 0 is unmapped in solo5-hvt's boot state too.
#[test]
fn null_dereference_faults_from_solo5_hvt_boot_state() {
    if !kvm() {
        return;
    }
    let mut code = synth::code_write_byte(0x10);
    code.extend(synth::code_halt(0));
    let r = run_code(code, Boot::Solo5Hvt);
    assert_error(&r, "triple fault");
    assert!(r.stderr.contains("cr2=0x10"), "{r:?}");
}
