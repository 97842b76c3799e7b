//! The CPL 0 part of tt-guest: early boot and exception entry.
//!
//! Everything in this file runs in supervisor mode. On KVM hosts that
//! emulate supervisor code (kvm-pvm, shadow paging) every instruction here
//! costs about a microsecond, so it is hand-written assembly, uses no SSE,
//! and does as little as possible: all real work happens in Rust at CPL 3.
//!
//! # Boot (`_start`)
//!
//! The tender enters in 64-bit mode at CPL 0 with `rdi` = boot info and
//! `rsp` = top of memory. Under solo5-hvt only CR0.PE|PG|NE|WP,
//! CR4.PAE|OSFXSR|OSXMMEXCPT and EFER.LME|LMA are set and memory is mapped
//! with supervisor pages (RW from 1 MiB, read-only from 64 KiB, nothing
//! below), so `_start` sets up everything itself:
//!
//! 1. EFER.NXE; CR0.WP|MP (EM|TS cleared); CR4.OSFXSR|OSXMMEXCPT, and if
//!    the CPU has XSAVE and AVX, CR4.OSXSAVE and XCR0 = x87|SSE|AVX.
//! 2. Its own page tables (in the supervisor-only `.tt_kernel` region):
//!    4 KiB pages for `[0, _tt_low_end)` with page 0 absent, the tender's
//!    area below 1 MiB read-only NX, text user R+X, rodata user R NX,
//!    data/bss user RW NX, `.tt_kernel` supervisor RW NX, and 2 MiB user RW
//!    NX pages for the rest of memory, except a 2 MiB stack guard page (see
//!    [`crate::heap::layout`]). Every count comes from the linker script,
//!    so each region is one 3-instruction loop.
//! 3. GDT (null, kcode 0x08, kdata 0x10, ucode 0x1b, udata 0x23, TSS 0x28),
//!    IDT (built at assembly time: the stubs sit at a fixed address), TSS
//!    (RSP0 = kernel stack, IST1 = double-fault stack).
//!    On tt-host (which enters with `rsi` = "TT-HOST1"; solo5-hvt leaves
//!    it 0 and maps nothing below 64 KiB, its page tables included), whose
//!    W^X page tables are user-accessible and say so with PML4[0].U = 1,
//!    step 2 is skipped except for the stack guard page: the tender's
//!    tables are kept (see docs/ABI.md). They
//!    give the same protections: the linker script flags the `.tt_kernel`
//!    segment `PF_TT_SUPERVISOR`, which tt-host maps supervisor-only, and
//!    tt-host then maps its boot data read-only.
//! 4. `iretq` to CPL 3 at `tt_user_start` on the boot stack, interrupts
//!    off. Hypercalls (`out` to ports 0x500-0x5ff) work from user mode
//!    through the TSS I/O permission bitmap. (RFLAGS.IOPL 3 would do on
//!    hardware, but kvm-pvm ignores IOPL for guest user mode and honours
//!    only the bitmap, so the SDK relies on the bitmap everywhere.)
//!
//! # Exceptions
//!
//! Vectors 0-31 go to 16-byte stubs that push (error code, vector) and jump
//! to `tt_isr_common`, which stores the registers into `tt_fault_state`,
//! rewrites its iret frame to enter `tt_fault_trampoline` at CPL 3 on a
//! dedicated stack, and `iretq`s. The report is written by Rust
//! ([`crate::exception`]). A second exception (a fault in the reporter)
//! halts with status 255 straight from CPL 0.

use core::arch::global_asm;

global_asm!(
    r#"
    .set TT_ISR_BASE, 0x100000

/* ---------------------------------------------------------------------
 * Exception stubs: first thing in .text (the linker script asserts they
 * sit at TT_ISR_BASE), 16 bytes each, so the IDT below is a constant.
 * ------------------------------------------------------------------- */
    .section .text.tt_isr,"ax",@progbits
    .globl tt_isr_stubs
    .balign 16
tt_isr_stubs:
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .balign 16
    .if (\n == 8) || (\n == 10) || (\n == 11) || (\n == 12) || (\n == 13) || (\n == 14) || (\n == 17) || (\n == 21) || (\n == 29) || (\n == 30)
    .else
    push 0
    .endif
    push \n
    jmp tt_isr_common
    .endr

/* ---------------------------------------------------------------------
 * Boot: runs once at CPL 0 (emulated on some hosts: keep it short).
 * ------------------------------------------------------------------- */
    .section .text.tt_boot,"ax",@progbits
    .globl _start
    .type _start,@function
_start:
    cld
    mov r15, rdi
    mov r13, rsp

    /* EFER.NXE */
    mov ecx, 0xC0000080
    rdmsr
    or eax, 0x800
    wrmsr

    /* CR0 |= WP | MP; CR0 &= ~(EM | TS) */
    mov rax, cr0
    or eax, 0x10002
    and eax, 0xFFFFFFF3
    mov cr0, rax

    /* CR4 |= OSFXSR | OSXMMEXCPT; with XSAVE and AVX also OSXSAVE, XCR0 = 7 */
    mov eax, 1
    cpuid
    mov rax, cr4
    or eax, 0x600
    and ecx, 0x14000000
    cmp ecx, 0x14000000
    jne 1f
    or eax, 0x40000
    mov cr4, rax
    xor ecx, ecx
    xor edx, edx
    mov eax, 7
    xsetbv
    jmp 2f
1:
    mov cr4, rax
2:

    /* Only tt-host enters with rsi = "TT-HOST1"; solo5-hvt leaves rsi 0
     * and does not map its page tables (nothing below 64 KiB), so they
     * must not be read there: build our own. */
    movabs rax, 0x3154534f482d5454
    cmp rsi, rax
    jne 23f

    /* On tt-host, PML4[0].U = 1 says the tender's page tables already map
     * the image W^X from its ELF segments with user pages (docs/ABI.md):
     * keep them, and only unmap the 2 MiB stack guard page (if it is a
     * 2 MiB page there), which saves ~2000 emulated instructions. */
    mov rax, cr3
    and rax, -4096
    mov rbx, qword ptr [rax]
    test bl, 4
    jz 23f
    mov rdx, 0x000FFFFFFFFFF000
    mov rcx, qword ptr [r15]
    shr rcx, 21
    sub rcx, 2
    jb 21f
    /* Only where heap::layout() puts the guard (g >= _tt_npt, g < 2048):
     * below _tt_npt the page may hold the image's end and the heap. */
    cmp rcx, offset _tt_npt
    jb 21f
    cmp rcx, 2048
    jae 21f
    and rbx, rdx
    mov rsi, rcx
    shr rsi, 9
    mov rbx, qword ptr [rbx + rsi * 8]
    test bl, 1
    jz 21f
    and rbx, rdx
    and ecx, 511
    lea rbx, [rbx + rcx * 8]
    test byte ptr [rbx], 0x80
    jz 21f
    mov qword ptr [rbx], 0
21:
    mov rax, cr3
    mov cr3, rax
    jmp 22f
23:

    /* Page tables. rdx = NX bit, rsi = stride. */
    mov eax, offset tt_pdpt + 7
    mov qword ptr [rip + tt_pml4], rax
    mov eax, offset tt_pd + 7
    mov qword ptr [rip + tt_pdpt], rax
    add eax, 4096
    mov qword ptr [rip + tt_pdpt + 8], rax
    add eax, 4096
    mov qword ptr [rip + tt_pdpt + 16], rax
    add eax, 4096
    mov qword ptr [rip + tt_pdpt + 24], rax

    /* PD[0 .. _tt_npt) -> PT[i] */
    mov edi, offset tt_pd
    mov eax, offset tt_pt + 7
    mov ecx, offset _tt_npt
    mov esi, 4096
3:
    stosq
    add rax, rsi
    loop 3b

    /* PD[_tt_npt ..) -> 2 MiB user RW NX pages up to align_up(mem_size, 2M),
     * at most 4 GiB. rdi already points at PD[_tt_npt]. */
    mov rdx, 0x8000000000000000
    mov rcx, qword ptr [r15]
    add rcx, 0x1FFFFF
    shr rcx, 21
    mov eax, 2048
    cmp rcx, rax
    cmova rcx, rax
    sub rcx, offset _tt_npt
    jbe 4f
    mov eax, offset _tt_low_end + 0x87
    or rax, rdx
    mov esi, 0x200000
5:
    stosq
    add rax, rsi
    loop 5b
4:
    /* Stack guard: unmap the 2 MiB page g = (mem_size >> 21) - 2 just below
     * the stack's (at least) 2 MiB, if it lies in the 2 MiB-page region.
     * Must match heap::layout(). */
    mov rcx, qword ptr [r15]
    shr rcx, 21
    sub rcx, 2
    jb 4f
    cmp rcx, offset _tt_npt
    jb 4f
    cmp rcx, 2048
    jae 4f
    mov qword ptr [tt_pd + rcx * 8], 0
4:

    /* 4 KiB pages of the low window, region by region (PT[0] stays 0). */
    mov esi, 4096
    mov edi, offset tt_pt + 8
    mov eax, 0x1000 + 5
    or rax, rdx
    mov ecx, 255
6:
    stosq
    add rax, rsi
    loop 6b

    mov eax, offset _stext + 5
    mov ecx, offset _tt_text_pages
    jrcxz 8f
7:
    stosq
    add rax, rsi
    loop 7b
8:
    mov eax, offset _etext + 5
    or rax, rdx
    mov ecx, offset _tt_rodata_pages
    jrcxz 8f
7:
    stosq
    add rax, rsi
    loop 7b
8:
    mov eax, offset _erodata + 7
    or rax, rdx
    mov ecx, offset _tt_data_pages
    jrcxz 8f
7:
    stosq
    add rax, rsi
    loop 7b
8:
    mov eax, offset _skernel + 3
    or rax, rdx
    mov ecx, offset _tt_kernel_pages
    jrcxz 8f
7:
    stosq
    add rax, rsi
    loop 7b
8:
    mov eax, offset _ekernel + 7
    or rax, rdx
    mov ecx, offset _tt_tail_pages
    jrcxz 8f
7:
    stosq
    add rax, rsi
    loop 7b
8:
    mov eax, offset tt_pml4
    mov cr3, rax
22:

    /* GDT: constant descriptors, then the TSS descriptor (base = tt_tss). */
    mov rax, 0x00AF9A000000FFFF
    mov qword ptr [rip + tt_gdt + 0x08], rax
    mov rax, 0x00CF92000000FFFF
    mov qword ptr [rip + tt_gdt + 0x10], rax
    mov rax, 0x00AFFA000000FFFF
    mov qword ptr [rip + tt_gdt + 0x18], rax
    mov rax, 0x00CFF2000000FFFF
    mov qword ptr [rip + tt_gdt + 0x20], rax
    mov eax, offset tt_tss
    mov edx, eax
    and edx, 0xFFFFFF
    shl rdx, 16
    shr eax, 24
    shl rax, 56
    or rdx, rax
    mov rax, 0x0000890000000128
    or rdx, rax
    mov qword ptr [rip + tt_gdt + 0x28], rdx
    lgdt [rip + tt_gdtr]
    lidt [rip + tt_idtr]
    mov ax, 0x28
    ltr ax

    /* To CPL 3: ss, rsp, rflags (IF 0, IOPL 0), cs, rip. */
    push 0x23
    push r13
    push 0x2
    push 0x1b
    mov eax, offset tt_user_start
    push rax
    mov rdi, r15
    iretq

/* ---------------------------------------------------------------------
 * Common exception entry (CPL 0). Stack: vector, error, rip, cs, rflags,
 * rsp, ss.
 * ------------------------------------------------------------------- */
tt_isr_common:
    cmp byte ptr [rip + tt_fault_active], 0
    jne tt_abort_direct
    mov byte ptr [rip + tt_fault_active], 1
    mov qword ptr [rip + tt_fault_state + 0], rax
    mov qword ptr [rip + tt_fault_state + 8], rbx
    mov qword ptr [rip + tt_fault_state + 16], rcx
    mov qword ptr [rip + tt_fault_state + 24], rdx
    mov qword ptr [rip + tt_fault_state + 32], rsi
    mov qword ptr [rip + tt_fault_state + 40], rdi
    mov qword ptr [rip + tt_fault_state + 48], rbp
    mov qword ptr [rip + tt_fault_state + 56], r8
    mov qword ptr [rip + tt_fault_state + 64], r9
    mov qword ptr [rip + tt_fault_state + 72], r10
    mov qword ptr [rip + tt_fault_state + 80], r11
    mov qword ptr [rip + tt_fault_state + 88], r12
    mov qword ptr [rip + tt_fault_state + 96], r13
    mov qword ptr [rip + tt_fault_state + 104], r14
    mov qword ptr [rip + tt_fault_state + 112], r15
    pop rax
    mov qword ptr [rip + tt_fault_state + 120], rax
    pop rax
    mov qword ptr [rip + tt_fault_state + 128], rax
    mov rax, cr2
    mov qword ptr [rip + tt_fault_state + 136], rax
    mov rax, qword ptr [rsp]
    mov qword ptr [rip + tt_fault_state + 144], rax
    mov rax, qword ptr [rsp + 8]
    mov qword ptr [rip + tt_fault_state + 152], rax
    mov rax, qword ptr [rsp + 16]
    mov qword ptr [rip + tt_fault_state + 160], rax
    mov rax, qword ptr [rsp + 24]
    mov qword ptr [rip + tt_fault_state + 168], rax
    mov rax, qword ptr [rsp + 32]
    mov qword ptr [rip + tt_fault_state + 176], rax
    mov eax, offset tt_fault_trampoline
    mov qword ptr [rsp], rax
    mov qword ptr [rsp + 8], 0x1b
    mov qword ptr [rsp + 16], 0x2
    mov eax, offset tt_fault_stack_top
    mov qword ptr [rsp + 24], rax
    mov qword ptr [rsp + 32], 0x23
    iretq

/* A fault while reporting a fault: HALT(255) directly. */
tt_abort_direct:
    mov dx, 0x508
    mov eax, offset tt_abort_halt
    out dx, eax
9:
    hlt
    jmp 9b

/* ---------------------------------------------------------------------
 * CPL 3 entry points (native speed).
 * ------------------------------------------------------------------- */
    .section .text.tt_user,"ax",@progbits
tt_user_start:
    fninit
    ldmxcsr [rip + tt_mxcsr_init]
    and rsp, -16
    call tt_guest_rust_start
    ud2

tt_fault_trampoline:
    fninit
    ldmxcsr [rip + tt_mxcsr_init]
    call tt_guest_fault_report
    ud2

/* ---------------------------------------------------------------------
 * Read-only tables.
 * ------------------------------------------------------------------- */
    .section .rodata.tt_tables,"a",@progbits
    .balign 16
tt_idt:
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .if \n == 8
    .quad ((TT_ISR_BASE + 16 * \n) & 0xFFFF) | (0x08 << 16) | (1 << 32) | (0x8E << 40) | (((TT_ISR_BASE + 16 * \n) >> 16) << 48)
    .else
    .quad ((TT_ISR_BASE + 16 * \n) & 0xFFFF) | (0x08 << 16) | (0x8E << 40) | (((TT_ISR_BASE + 16 * \n) >> 16) << 48)
    .endif
    .quad 0
    .endr
tt_idt_end:

    .balign 16
tt_tss:
    .long 0
    .quad tt_kstack_top
    .quad 0, 0, 0
    .quad tt_dfstack_top
    .quad 0, 0, 0, 0, 0, 0
    .quad 0
    .short 0
    .short 104
    /* I/O permission bitmap: user mode may access only the hypercall ports
     * 0x500-0x5ff. (kvm-pvm ignores RFLAGS.IOPL for guest user mode but
     * honours this bitmap, as does hardware.) The TSS limit (0x128) ends
     * after the 0xff terminator byte; ports above 0x5ff are denied. */
    .fill 0xA0, 1, 0xFF
    .fill 0x20, 1, 0x00
    .byte 0xFF

/* Guarantees a non-empty .data, so the RW segment has p_filesz > 0
 * (solo5-hvt skips PT_LOADs with p_filesz == 0). */
    .section .data.tt_marker,"aw",@progbits
    .balign 8
    .quad 0x7474677565737400
    .section .rodata.tt_tables,"a",@progbits

    .balign 8
    .short 0, 0, 0
tt_gdtr:
    /* Limit: through the 16-byte TSS descriptor at 0x28 (a 64-bit TSS
     * descriptor takes two GDT slots; LTR faults if its second half is
     * past the limit: Intel SDM vol. 3, 7.2.3). */
    .short 0x37
    .quad tt_gdt
    .short 0, 0, 0
tt_idtr:
    .short tt_idt_end - tt_idt - 1
    .quad tt_idt

    .balign 8
tt_abort_halt:
    .quad 0
    .long 255
    .long 0
tt_mxcsr_init:
    .long 0x1F80

/* The Solo5 ABI note: target hvt (1), ABI version 2. */
    .section .note.solo5.abi,"a",@note
    .balign 4
    .long 6
    .long 16
    .long 0x31494241
    .asciz "Solo5"
    .byte 0, 0
    .long 1, 2, 0, 0

/* ---------------------------------------------------------------------
 * Fault state and stack: user-readable (the reporter runs at CPL 3).
 * ------------------------------------------------------------------- */
    .section .bss.tt_fault,"aw",@nobits
    .balign 16
    .globl tt_fault_state
tt_fault_state:
    .zero 184
tt_fault_active:
    .zero 8
    .balign 16
tt_fault_stack:
    .zero 32768
tt_fault_stack_top:

/* ---------------------------------------------------------------------
 * Supervisor-only region (no U bit): page tables, GDT, kernel stacks.
 * NOLOAD: zeroed by the loader.
 * ------------------------------------------------------------------- */
    .section .tt_kernel,"aw",@nobits
    .balign 4096
tt_pml4:
    .zero 4096
tt_pdpt:
    .zero 4096
tt_pd:
    .zero 4096 * 4
tt_pt:
    .zero 4096 * 8
tt_gdt:
    .zero 64
    .balign 16
    .zero 8192
tt_kstack_top:
    .zero 4096
tt_dfstack_top:
"#
);
