//! Attempts one W^X violation; the SDK's page tables must stop it.
//!
//! Argument: `write-text` (write to a function's code), `write-rodata`
//! (write to a constant), `exec-data` (call a `ret` copied into a static),
//! `exec-rodata` (call a `ret` in a constant), `exec-stack` (call a `ret`
//! copied into a stack buffer), `write-kernel` (write to the SDK's CPL 0
//! structures, which start at the linker symbol `_skernel`: page tables,
//! GDT, kernel stacks), `write-cmdline` (write to the tender's command
//! line). Prints `wx: attempting <arg>`; the run must
//! end with the SDK's `tt-guest: exception #PF ...` report and status 255.
//! If the violation goes unnoticed it prints `wx: violation not caught`
//! and exits 1; a bad argument prints a usage line and exits 2.
#![no_std]
#![no_main]

use core::hint::black_box;
use core::ptr;

use tt_guest::println;

tt_guest::main!(app_main);

static RODATA_RET: [u8; 16] = [0xc3; 16];

extern "C" {
    /// First byte of the SDK's supervisor-only region (tt-guest.ld).
    static _skernel: u8;
}
static mut DATA_BUF: [u8; 16] = [0; 16];

#[inline(never)]
fn victim() -> u32 {
    black_box(7)
}

/// Call `code` as a function.
///
/// # Safety
///
/// `code` must hold a `ret` (0xc3): it is either executed (and returns at
/// once) or faults.
unsafe fn call(code: *const u8) {
    // SAFETY: per the contract the target is `ret`, a valid function body.
    let f: extern "C" fn() = unsafe { core::mem::transmute(black_box(code)) };
    f();
}

fn app_main() -> i32 {
    let Some(what) = tt_guest::boot::args().next() else {
        println!(
            "wx: usage: wx write-text|write-rodata|exec-data|exec-rodata|exec-stack|write-kernel|write-cmdline"
        );
        return 2;
    };
    println!("wx: attempting {}", what);
    match what {
        "write-text" => {
            let p = black_box(victim as *const () as *mut u8);
            // SAFETY: deliberately writes to text; must fault (#PF).
            unsafe { ptr::write_volatile(p, 0xc3) };
            println!("wx: victim() = {}", victim());
        }
        "write-rodata" => {
            let p = black_box(RODATA_RET.as_ptr() as *mut u8);
            // SAFETY: deliberately writes to rodata; must fault (#PF).
            unsafe { ptr::write_volatile(p, 0x90) };
        }
        "exec-data" => {
            let p = ptr::addr_of_mut!(DATA_BUF) as *mut u8;
            // SAFETY: p points at DATA_BUF (16 bytes); then executes it,
            // which must fault (#PF, data is NX).
            unsafe {
                ptr::write_volatile(p, 0xc3);
                call(p);
            }
        }
        "exec-rodata" => {
            // SAFETY: RODATA_RET holds `ret`; executing rodata must fault.
            unsafe { call(RODATA_RET.as_ptr()) };
        }
        "exec-stack" => {
            let mut buf = [0u8; 16];
            // SAFETY: buf is a live stack buffer of 16 bytes; executing it
            // must fault (#PF, the stack is NX).
            unsafe {
                ptr::write_volatile(buf.as_mut_ptr(), 0xc3);
                call(buf.as_ptr());
            }
        }
        "write-kernel" => {
            let p = black_box(ptr::addr_of!(_skernel) as *mut u8);
            // SAFETY: deliberately writes to supervisor-only memory from
            // CPL 3; must fault (#PF).
            unsafe { ptr::write_volatile(p, 0) };
        }
        "write-cmdline" => {
            let p = black_box(tt_guest::boot::boot_info().cmdline as *mut u8);
            // SAFETY: deliberately writes to the tender's read-only command
            // line; must fault (#PF).
            unsafe { ptr::write_volatile(p, b'X') };
        }
        other => {
            println!(
                "wx: unknown argument {:?} (use write-text, write-rodata, exec-data, exec-rodata, exec-stack, write-kernel or write-cmdline)",
                other
            );
            return 2;
        }
    }
    println!("wx: violation not caught");
    1
}
