//! Building and running the hand-assembled images of tests/cpl3.rs: the
//! data segment's layout, an assembler with helpers for hypercalls and
//! checks, a Solo5-style boot, and runs at `--cpl=0` and `--cpl=3` whose
//! outcomes are compared.

use core::mem::offset_of;
use iced_x86::code_asm::*;
use iced_x86::BlockEncoderOptions;
use std::process::Command;
use tt_host::abi::{self, Hypercall};
use tt_host::loader::synth::{self, Synth};
use tt_tests::*;

pub type Asm = Result<(), IcedError>;

pub const TEXT: u64 = synth::TEXT;
pub const DATA: u64 = synth::DATA;
/// Guest memory, in MiB.
pub const MEM_MB: u64 = 8;
/// `rsp` at entry: `mem_size - 8`.
pub const ENTRY_RSP: u64 = (MEM_MB << 20) - 8;
/// `rsp` after [`Image::solo5_boot`], which leaves room above the stack
/// as a Solo5 image's C entry code does.
pub const BOOTED_RSP: u64 = ENTRY_RSP - 0x38;
/// Control registers at entry (docs/ABI.md, "Boot state").
pub const BOOT_CR0: u64 = 0x8001_0021;
pub const BOOT_CR3: u64 = 0x2000;
pub const BOOT_CR4: u64 = 0x620;

/// tt-host's low memory: its GDT, and the monitor's IDT, TSS, stubs and
/// stack (a page each, from [`MONITOR`]).
pub const HOST_GDT: u64 = 0x1000;
pub const MONITOR: u64 = 0x7_c000;
pub const MONITOR_TSS: u64 = MONITOR + 0x1000;
pub const MONITOR_STUBS: u64 = MONITOR + 0x2000;
pub const MONITOR_STACK: u64 = MONITOR + 0x3000;
pub const BOOT_INFO: u64 = 0x8_0000;

// The data segment: the image's own structures.
/// `struct hvt_hc_halt`.
pub const HALT: u64 = DATA;
/// `struct hvt_hc_puts`.
pub const PUTS: u64 = DATA + 0x10;
/// Operands of `lgdt` and `lidt` (limit, base).
pub const GDTR: u64 = DATA + 0x20;
pub const IDTR: u64 = DATA + 0x30;
/// Free for each test (64 bytes, 16-aligned).
pub const SCRATCH: u64 = DATA + 0x40;
/// Console messages.
pub const TEXTS: u64 = DATA + 0x80;
/// The image's GDT: null, code 0x08, data 0x10, its TSS at 0x18.
pub const GDT: u64 = DATA + 0x100;
pub const GDT_LIMIT: u16 = 5 * 8 - 1;
pub const SEL_CODE: u16 = 0x08;
pub const SEL_DATA: u16 = 0x10;
pub const SEL_TSS: u16 = 0x18;
/// The image's TSS (104 bytes): IST1 is [`IST_TOP`].
pub const TSS: u64 = DATA + 0x180;
/// Where the next trap record goes (a pointer into [`RECORDS`]).
pub const NEXT_RECORD: u64 = DATA + 0x1f8;
/// Trap records, [`RECORD_WORDS`] quadwords each.
pub const RECORDS: u64 = DATA + 0x200;
/// What the records must be, followed by an all-zero record (no more
/// traps than expected).
pub const EXPECTED: u64 = DATA + 0x800;
/// The image's IDT: 256 gates.
pub const IDT: u64 = DATA + 0x1000;
pub const IDT_LIMIT: u16 = 256 * 16 - 1;
/// The stack its TSS names as IST1: the page below this address.
pub const IST_TOP: u64 = DATA + 0x3000;
pub const DATA_SIZE: usize = 0x3000;

pub const MSR_FS_BASE: u32 = 0xc000_0100;
pub const MSR_GS_BASE: u32 = 0xc000_0101;
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
pub const MSR_EFER: u32 = 0xc000_0080;
pub const MSR_APIC_BASE: u32 = 0x1b;
/// EFER at entry: LME | LMA | NXE.
pub const BOOT_EFER: u64 = 0xd00;

/// An image's data segment, and its devices.
pub struct Data {
    pub bytes: Vec<u8>,
    pub texts_end: u64,
    pub devices: Vec<(String, u32)>,
}

impl Data {
    pub fn put(&mut self, at: u64, bytes: &[u8]) {
        let o = (at - DATA) as usize;
        self.bytes[o..o + bytes.len()].copy_from_slice(bytes);
    }

    pub fn put_u64(&mut self, at: u64, v: u64) {
        self.put(at, &v.to_le_bytes());
    }

    /// A GDTR/IDTR operand at `at`.
    pub fn put_table_register(&mut self, at: u64, base: u64, limit: u16) {
        self.put(at, &limit.to_le_bytes());
        self.put(at + 2, &base.to_le_bytes());
    }

    /// Gate `vector` of the image's IDT: a DPL 0 interrupt gate to
    /// `handler` on IST stack `ist` (0: the current stack).
    pub fn gate(&mut self, vector: u8, handler: u64, ist: u64) {
        let lo = (handler & 0xffff)
            | (u64::from(SEL_CODE) << 16)
            | (ist << 32)
            | (0x8e << 40)
            | (((handler >> 16) & 0xffff) << 48);
        let at = IDT + 16 * u64::from(vector);
        self.put_u64(at, lo);
        self.put_u64(at + 8, handler >> 32);
    }

    /// The ELF file with this code.
    pub fn elf(self, code: Vec<u8>) -> Vec<u8> {
        Synth {
            code,
            data: self.bytes,
            devices: self.devices,
            ..Synth::default()
        }
        .build()
    }
}

/// An image under construction: its code (assembled at [`TEXT`]) and its
/// data. Checks jump to `fail`, which halts with the status in `r14d`.
pub struct Image {
    pub a: CodeAssembler,
    pub d: Data,
    pub fail: CodeLabel,
}

impl Image {
    pub fn new() -> Image {
        let mut a = CodeAssembler::new(64).expect("64-bit assembler");
        let fail = a.create_label();
        Image {
            a,
            d: Data {
                bytes: vec![0; DATA_SIZE],
                texts_end: TEXTS,
                devices: Vec::new(),
            },
            fail,
        }
    }

    /// The hypercall `call` with its argument struct at `arg`.
    pub fn hypercall(&mut self, call: Hypercall, arg: u64) -> Asm {
        self.a.mov(eax, arg as u32)?;
        self.a.mov(dx, u32::from(call.port()))?;
        self.a.out(dx, eax)
    }

    /// PUTS of `len` bytes at `at`, with the argument struct at [`PUTS`].
    pub fn puts_at(&mut self, at: u64, len: u64) -> Asm {
        let data = PUTS + offset_of!(abi::HcPuts, data) as u64;
        let size = PUTS + offset_of!(abi::HcPuts, len) as u64;
        self.a.mov(qword_ptr(data), at as i32)?;
        self.a.mov(qword_ptr(size), len as i32)?;
        self.hypercall(Hypercall::Puts, PUTS)
    }

    /// PUTS of `s`.
    pub fn puts(&mut self, s: &str) -> Asm {
        let at = self.d.texts_end;
        self.d.put(at, s.as_bytes());
        self.d.texts_end += s.len() as u64;
        assert!(self.d.texts_end <= GDT, "console texts overflow");
        self.puts_at(at, s.len() as u64)
    }

    /// HALT with exit status `status`.
    pub fn halt(&mut self, status: i32) -> Asm {
        self.a.mov(r14d, status)?;
        self.halt_r14()
    }

    /// HALT with the exit status in `r14d`.
    pub fn halt_r14(&mut self) -> Asm {
        let cookie = HALT + offset_of!(abi::HcHalt, cookie) as u64;
        let status = HALT + offset_of!(abi::HcHalt, exit_status) as u64;
        self.a.mov(qword_ptr(cookie), 0)?;
        self.a.mov(dword_ptr(status), r14d)?;
        self.hypercall(Hypercall::Halt, HALT)
    }

    /// Unless `reg` == `value`, halt with `status`.
    pub fn expect(&mut self, reg: AsmRegister64, value: u64, status: i32) -> Asm {
        self.a.mov(r13, value)?;
        self.a.mov(r14d, status)?;
        self.a.cmp(reg, r13)?;
        self.a.jne(self.fail)
    }

    /// `rdmsr` of `msr`, the value in `rax`.
    pub fn rdmsr(&mut self, msr: u32) -> Asm {
        self.a.mov(ecx, msr)?;
        self.a.rdmsr()?;
        self.a.shl(rdx, 32)?;
        self.a.or(rax, rdx)
    }

    /// `wrmsr` of `value` to `msr`.
    pub fn wrmsr(&mut self, msr: u32, value: u64) -> Asm {
        self.a.mov(ecx, msr)?;
        self.a.mov(eax, value as u32)?;
        self.a.mov(edx, (value >> 32) as u32)?;
        self.a.wrmsr()
    }

    /// A Solo5-style boot: `lgdt` of its own GDT, a far return to its
    /// code segment, its data segment into ss, ds, es, fs and gs, `ltr`
    /// of its TSS (IST1 = [`IST_TOP`]), `lidt` of its IDT (no gates
    /// yet). Nine privileged instructions.
    pub fn solo5_boot(&mut self) -> Asm {
        let tss_lo = 0x67 | ((TSS & 0xff_ffff) << 16) | (0x89 << 40) | (((TSS >> 24) & 0xff) << 56);
        let gdt = [
            0,
            0x00af_9b00_0000_ffff,
            0x00cf_9300_0000_ffff,
            tss_lo,
            TSS >> 32,
        ];
        for (i, d) in gdt.into_iter().enumerate() {
            self.d.put_u64(GDT + 8 * i as u64, d);
        }
        self.d.put_u64(TSS + 0x24, IST_TOP);
        self.d.put(TSS + 0x66, &0x68u16.to_le_bytes()); // no I/O bitmap
        self.d.put_table_register(GDTR, GDT, GDT_LIMIT);
        self.d.put_table_register(IDTR, IDT, IDT_LIMIT);

        let mut reloaded = self.a.create_label();
        self.a.sub(rsp, (ENTRY_RSP - BOOTED_RSP) as i32)?;
        self.a.lgdt(ptr(GDTR))?;
        self.a.lea(rax, ptr(reloaded))?;
        self.a.push(i32::from(SEL_CODE))?;
        self.a.push(rax)?;
        self.a.retf()?;
        self.a.set_label(&mut reloaded)?;
        self.a.mov(eax, u32::from(SEL_DATA))?;
        self.a.mov(ss, ax)?;
        self.a.mov(ds, ax)?;
        self.a.mov(es, ax)?;
        self.a.mov(fs, ax)?;
        self.a.mov(gs, ax)?;
        self.a.mov(eax, u32::from(SEL_TSS))?;
        self.a.ltr(ax)?;
        self.a.lidt(ptr(IDTR))
    }

    /// Assemble: the code, the addresses of `labels`, and the data.
    pub fn assemble(mut self, labels: &[CodeLabel]) -> (Vec<u8>, Vec<u64>, Data) {
        self.a.ud2().expect("assemble");
        self.a.set_label(&mut self.fail).expect("assemble");
        self.halt_r14().expect("assemble");
        let out = self
            .a
            .assemble_options(TEXT, BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)
            .expect("assemble");
        let at = labels
            .iter()
            .map(|l| out.label_ip(l).expect("label address"))
            .collect();
        (out.inner.code_buffer, at, self.d)
    }

    /// The ELF file.
    pub fn build(self) -> Vec<u8> {
        let (code, _, data) = self.assemble(&[]);
        data.elf(code)
    }
}

/// How a run ended.
#[derive(Debug)]
pub struct Outcome {
    pub status: i32,
    pub stdout: String,
    /// stderr without the stats lines.
    pub message: String,
    /// `emulated` and `delivered` of the `cpl3 traps` stats line.
    pub traps: Option<(u64, u64)>,
}

impl Outcome {
    /// The stop message up to its register dump.
    pub fn stop(&self) -> &str {
        self.message
            .split(" [rip=")
            .next()
            .unwrap_or_default()
            .trim()
    }

    /// A field of the register dump (`cr2`, `rip`): "0x...".
    pub fn reg(&self, name: &str) -> Option<&str> {
        let (_, dump) = self.message.rsplit_once(" [")?;
        dump.trim_end()
            .trim_end_matches(']')
            .split(' ')
            .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
    }
}

/// Run `elf` with `--cpl=CPL`, `--mem=MEM_MB`, `args` and TT_HOST_STATS=1.
pub fn run_at(cpl: &str, elf: &[u8], args: &[&str]) -> Outcome {
    let dir = Scratch::new("cpl3");
    let image = dir.file("guest.hvt", elf);
    let r = tt_with(
        Command::new(tt_host())
            .arg("run")
            .arg(format!("--mem={MEM_MB}"))
            .arg(format!("--cpl={cpl}"))
            .args(args)
            .arg(image)
            .env("TT_HOST_STATS", "1"),
    );
    let mut message = String::new();
    let mut traps = None;
    for line in r.stderr.lines() {
        if let Some(counts) = line.strip_prefix("tt-host: stats: cpl3 traps ") {
            let n = |key: &str| -> u64 {
                counts
                    .split(' ')
                    .find_map(|f| f.strip_prefix(key))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("no {key} in {line:?}"))
            };
            traps = Some((n("emulated="), n("delivered=")));
        } else if !line.starts_with("tt-host: stats: ") {
            message.push_str(line);
            message.push('\n');
        }
    }
    let o = Outcome {
        status: r.status,
        stdout: r.stdout,
        message,
        traps,
    };
    assert!(!o.message.contains("panicked"), "{o:#?}");
    assert_eq!(
        o.traps.is_some(),
        cpl == "3",
        "the monitor runs if and only if --cpl=3: {o:#?}"
    );
    if o.message.contains(" [rip=") {
        assert!(
            o.message.contains(&format!("cpl={cpl}]")),
            "the guest stopped at CPL {cpl}: {o:#?}"
        );
    }
    o
}

/// Do two stop messages (up to the register dump) say the same? The
/// monitor's triple fault also names the exception it could not deliver
/// (": exception 14 at rip 0x100000 could not be delivered to the image's
/// handler"), which KVM's does not know.
pub fn same_stop(zero: &str, three: &str) -> bool {
    const TRIPLE: &str = "guest triple fault (an exception the guest could not handle)";
    zero == three
        || (zero.ends_with(TRIPLE)
            && three.strip_prefix(zero).is_some_and(|more| {
                more.starts_with(": exception ")
                    && more.ends_with(" could not be delivered to the image's handler")
            }))
}

/// Run `elf` at CPL 0 and at CPL 3: both runs must end the same way.
/// Returns both.
pub fn both(elf: &[u8], args: &[&str]) -> (Outcome, Outcome) {
    let zero = run_at("0", elf, args);
    let three = run_at("3", elf, args);
    let same = zero.status == three.status
        && zero.stdout == three.stdout
        && same_stop(zero.stop(), three.stop());
    assert!(same, "--cpl=0 and --cpl=3 differ:\n{zero:#?}\n{three:#?}");
    (zero, three)
}

/// Run `elf` in both modes: it must exit 0 having printed `ok`. Returns
/// the CPL 3 run.
pub fn both_succeed(elf: &[u8], ok: &str) -> Outcome {
    let (_, o) = both(elf, &[]);
    assert_eq!(o.status, 0, "{o:#?}");
    assert_eq!(o.stdout, ok, "{o:#?}");
    assert_eq!(o.message, "", "{o:#?}");
    o
}

/// Run `elf` in both modes (with `args`): both must stop with a one-line
/// message that contains `needle`.
pub fn both_stop(elf: &[u8], args: &[&str], needle: &str) -> (Outcome, Outcome) {
    let (zero, three) = both(elf, args);
    for o in [&zero, &three] {
        assert_eq!(o.status, 1, "{o:#?}");
        assert!(o.message.contains(needle), "expected {needle:?}: {o:#?}");
        assert_eq!(o.message.lines().count(), 1, "{o:#?}");
    }
    (zero, three)
}
