//! CPU exception reports.
//!
//! Any exception (vectors 0-31) ends the guest: the CPL 0 stub in
//! `arch.rs` saves the registers into [`FaultState`] and returns to
//! `tt_guest_fault_report` at CPL 3 on a dedicated stack, which prints
//!
//! ```text
//! tt-guest: exception #PF (page fault) at rip=0x102345 addr=0x0 error=0x4 (read of unmapped page, null pointer?)
//! tt-guest: rax=0x... rbx=0x... rcx=0x... rdx=0x...
//! ...
//! ```
//!
//! and halts with status 255. A fault while reporting halts with 255
//! directly from CPL 0.

/// Registers saved by the CPL 0 exception entry (layout shared with
/// `arch.rs`: do not reorder).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct FaultState {
    /// rax, rbx, rcx, rdx, rsi, rdi, rbp, r8-r15.
    pub gpr: [u64; 15],
    pub vector: u64,
    pub error: u64,
    pub cr2: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

const _: () = assert!(core::mem::size_of::<FaultState>() == 184);

const GPR_NAMES: [&str; 15] = [
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11", "r12", "r13", "r14",
    "r15",
];

/// Mnemonic and description of exception `vector`.
pub fn name(vector: u64) -> (&'static str, &'static str) {
    match vector {
        0 => ("#DE", "divide error"),
        1 => ("#DB", "debug"),
        2 => ("NMI", "non-maskable interrupt"),
        3 => ("#BP", "breakpoint"),
        4 => ("#OF", "overflow"),
        5 => ("#BR", "bound range exceeded"),
        6 => ("#UD", "invalid opcode"),
        7 => ("#NM", "device not available"),
        8 => ("#DF", "double fault"),
        9 => ("#CSO", "coprocessor segment overrun"),
        10 => ("#TS", "invalid TSS"),
        11 => ("#NP", "segment not present"),
        12 => ("#SS", "stack-segment fault"),
        13 => ("#GP", "general protection fault"),
        14 => ("#PF", "page fault"),
        16 => ("#MF", "x87 floating-point error"),
        17 => ("#AC", "alignment check"),
        18 => ("#MC", "machine check"),
        19 => ("#XM", "SIMD floating-point exception"),
        20 => ("#VE", "virtualization exception"),
        21 => ("#CP", "control protection exception"),
        28 => ("#HV", "hypervisor injection exception"),
        29 => ("#VC", "VMM communication exception"),
        30 => ("#SX", "security exception"),
        _ => ("#??", "reserved vector"),
    }
}

/// Explain a page-fault error code.
pub fn page_fault_reason(error: u64) -> &'static str {
    let present = error & 1 != 0;
    let write = error & 2 != 0;
    let fetch = error & 16 != 0;
    if error & 8 != 0 {
        return "reserved bit set in page table";
    }
    match (present, write, fetch) {
        (false, _, true) => "execute of unmapped page",
        (false, true, _) => "write to unmapped page",
        (false, false, _) => "read of unmapped page",
        (true, _, true) => "execute of non-executable page",
        (true, true, _) => "write to read-only page",
        (true, false, _) => "read of protected page",
    }
}

/// Vectors that push an error code.
fn has_error_code(vector: u64) -> bool {
    matches!(vector, 8 | 10..=14 | 17 | 21 | 29 | 30)
}

/// Print the report for `s`.
pub fn report(s: &FaultState) {
    #[cfg(not(test))]
    let guard = crate::heap::current_layout().guard;
    #[cfg(test)]
    let guard: Option<(u64, u64)> = None;
    report_with_guard(s, guard)
}

fn report_with_guard(s: &FaultState, guard: Option<(u64, u64)>) {
    use crate::println;
    let (mn, desc) = name(s.vector);
    let mode = if s.cs & 3 == 3 { "user" } else { "kernel" };
    if s.vector == 14 {
        let hint = if s.cr2 < 4096 {
            ", null pointer?"
        } else if guard.is_some_and(|(a, b)| (a..b).contains(&s.cr2)) {
            ", stack overflow?"
        } else {
            ""
        };
        println!(
            "tt-guest: exception {} ({}) at rip={:#x} addr={:#x} error={:#x} ({}{})",
            mn,
            desc,
            s.rip,
            s.cr2,
            s.error,
            page_fault_reason(s.error),
            hint
        );
    } else if has_error_code(s.vector) {
        println!(
            "tt-guest: exception {} ({}) at rip={:#x} error={:#x}",
            mn, desc, s.rip, s.error
        );
    } else {
        println!("tt-guest: exception {} ({}) at rip={:#x}", mn, desc, s.rip);
    }
    for row in 0..4 {
        let mut w = crate::console::LineWriter::new();
        let _ = core::fmt::Write::write_str(&mut w, "tt-guest:");
        for (name, value) in GPR_NAMES.iter().zip(s.gpr.iter()).skip(row * 4).take(4) {
            let _ = core::fmt::write(&mut w, format_args!(" {}={:#018x}", name, value));
        }
        if row == 3 {
            let _ = core::fmt::write(&mut w, format_args!(" rsp={:#018x}", s.rsp));
        }
        let _ = core::fmt::Write::write_str(&mut w, "\n");
    }
    println!(
        "tt-guest: rflags={:#x} cs={:#x} ss={:#x} ({} mode)",
        s.rflags, s.cs, s.ss, mode
    );
}

#[cfg(not(test))]
extern "C" {
    /// Written by the CPL 0 exception entry (`arch.rs`), hence `mut`:
    /// an immutable static that changes under Rust is undefined behaviour.
    static mut tt_fault_state: FaultState;
}

/// Entered from `tt_fault_trampoline` at CPL 3 after an exception.
#[cfg(not(test))]
#[no_mangle]
extern "C" fn tt_guest_fault_report() -> ! {
    // SAFETY: the CPL 0 entry wrote the whole struct before returning here
    // and nothing writes it again (a second fault halts at CPL 0).
    let s = unsafe { (&raw const tt_fault_state).read_volatile() };
    report(&s);
    crate::abort()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_fault_reasons() {
        assert_eq!(page_fault_reason(0x4), "read of unmapped page");
        assert_eq!(page_fault_reason(0x7), "write to read-only page");
        assert_eq!(page_fault_reason(0x15), "execute of non-executable page");
        assert_eq!(name(6), ("#UD", "invalid opcode"));
    }
}
