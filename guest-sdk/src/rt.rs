//! Runtime: the Rust entry point, exit, abort and the panic handler.

use core::fmt::Debug;

use crate::hypercall;

/// Stop the guest; the host exits with `status`.
///
/// Output written with [`crate::print!`] has already reached the host
/// (each call is one hypercall), so nothing is lost.
pub fn exit(status: i32) -> ! {
    hypercall::halt(status)
}

/// Stop the guest with status 255, the Solo5 convention for "aborted".
pub fn abort() -> ! {
    exit(255)
}

/// What `main` may return (see [`crate::main!`]).
pub trait Termination {
    /// Turn the value into an exit status.
    fn report(self) -> i32;
}

impl Termination for () {
    /// Returning normally is success: status 0.
    fn report(self) -> i32 {
        0
    }
}

impl Termination for i32 {
    /// The value is the exit status.
    fn report(self) -> i32 {
        self
    }
}

impl<T: Termination, E: Debug> Termination for Result<T, E> {
    /// `Ok(t)` reports `t`; `Err(e)` prints `tt-guest: main returned error:
    /// {e:?}` and reports 1.
    fn report(self) -> i32 {
        match self {
            Ok(t) => t.report(),
            Err(e) => {
                crate::println!("tt-guest: main returned error: {:?}", e);
                1
            }
        }
    }
}

#[cfg(not(test))]
extern "Rust" {
    /// Defined by [`crate::main!`] in the application crate.
    fn __tt_guest_main() -> i32;
}

/// Called (at CPL 3, FPU initialised, stack aligned) by `tt_user_start`.
#[cfg(not(test))]
#[no_mangle]
extern "C" fn tt_guest_rust_start(boot_info: *const crate::boot::BootInfo) -> ! {
    // SAFETY: the boot code passes the tender's boot-info address unchanged;
    // the tender guarantees it points at a valid, identity-mapped struct.
    unsafe { crate::boot::init(boot_info) };
    crate::time::init();
    crate::heap::init();
    // SAFETY: `__tt_guest_main` is a plain Rust fn emitted by `main!`.
    let status = unsafe { __tt_guest_main() };
    exit(status)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    use core::sync::atomic::{AtomicBool, Ordering};
    static PANICKING: AtomicBool = AtomicBool::new(false);
    if PANICKING.swap(true, Ordering::Relaxed) {
        hypercall::puts(b"tt-guest: panic while panicking\n");
        abort();
    }
    match info.location() {
        Some(l) => crate::println!(
            "tt-guest: panic at {}:{}:{}: {}",
            l.file(),
            l.line(),
            l.column(),
            info.message()
        ),
        None => crate::println!("tt-guest: panic: {}", info.message()),
    }
    abort()
}

/// The prebuilt `core` references the unwinding personality routine even
/// though guests are built with `panic = "abort"` and never unwind. It is
/// never called.
#[cfg(not(test))]
#[no_mangle]
extern "C" fn rust_eh_personality() {}

/// Landing pads in the prebuilt `alloc` (e.g. behind `format!`) end in a
/// call to `_Unwind_Resume`. With `panic = "abort"` nothing ever starts
/// unwinding, so no landing pad runs and this is never called; if it ever
/// were, stopping the guest is the only sound answer.
#[cfg(not(test))]
#[no_mangle]
#[allow(non_snake_case)]
extern "C" fn _Unwind_Resume() -> ! {
    abort()
}
