//! tt-guest: write Solo5-hvt unikernels in plain (no_std) Rust.
//!
//! # The model
//!
//! A tt-guest image is a static x86-64 ELF executable, built with plain
//! cargo for the `x86_64-unknown-linux-gnu` target and linked by the
//! `tt-guest-build` helper at 1 MiB. It speaks the Solo5 hvt ABI only, so
//! the same image runs under `tt-host` and under Solo5's `solo5-hvt`.
//!
//! The guest has one CPU, no interrupts and no threads. It runs in two
//! privilege levels:
//!
//! * **CPL 0** — a few hundred hand-written instructions in `arch.rs`:
//!   set EFER.NXE/CR0.WP and enable SSE/AVX, build W^X page tables, load a
//!   GDT/IDT/TSS, and `iretq` to user mode. On exception, store the
//!   registers and `iretq` into the user-mode fault reporter. Some KVM
//!   hosts emulate supervisor code instruction by instruction, so nothing
//!   else runs there.
//! * **CPL 3** — everything written in Rust, including your `main`,
//!   running natively; the TSS I/O bitmap lets it issue hypercalls (`out`
//!   to port `0x500 + nr`, see [`hypercall`]) without a mode switch.
//!
//! Memory is identity mapped (virtual == physical): text is R+X, rodata R,
//! data/bss/heap/stack RW and non-executable, page 0 is unmapped and the
//! tender's data below 1 MiB (boot info, command line, manifest) is
//! read-only. The heap ([`heap`]) spans from the end of the image to 1 MiB
//! below the top of memory; the stack grows down from the top.
//!
//! # Writing a guest
//!
//! ```ignore
//! #![no_std]
//! #![no_main]
//!
//! tt_guest::main!(app_main, devices: [block "storage"]);
//!
//! fn app_main() -> i32 {
//!     tt_guest::println!("Hello, world");
//!     let disk = tt_guest::block::Block::acquire("storage").unwrap();
//!     tt_guest::println!("{} bytes", disk.capacity());
//!     0
//! }
//! ```
//!
//! [`main!`] declares the entry function and the Solo5 application
//! manifest (the devices the guest uses, by name); the SDK emits the ABI
//! note itself. `main` may return `()`, an `i32` exit status, or a
//! `Result` (an `Err` is printed and exits with status 1). A panic prints
//! its message and location and exits with status 255, as does any CPU
//! exception (after a register dump). See `README.md` for the build setup.
//!
//! # Modules
//!
//! * [`console`], [`print!`], [`println!`]: console output, one hypercall
//!   per call.
//! * [`time`]: monotonic clock (TSC), wall clock, sleeping.
//! * [`boot`]: boot info and command-line arguments.
//! * [`block`], [`net`]: devices declared in the manifest.
//! * [`virtio_blk`]: tt-host's virtio-blk devices (many requests in
//!   flight; tt-host only).
//! * [`exit`], [`abort`]: stop the guest.
//! * [`heap`]: the global allocator (`alloc` works out of the box).
//! * [`manifest`]: the manifest note layout, used by [`main!`].
//! * [`hypercall`]: the raw ABI, for anything not wrapped.

#![cfg_attr(not(test), no_std)]

extern crate alloc;

#[cfg(not(test))]
mod arch;
pub mod block;
pub mod boot;
pub mod console;
pub mod exception;
pub mod heap;
pub mod hypercall;
pub mod manifest;
#[cfg(not(test))]
mod mem;
pub mod net;
mod rt;
pub mod time;
pub mod virtio_blk;

pub use rt::{abort, exit, Termination};

/// Declare the guest's entry function and its application manifest.
///
/// ```ignore
/// tt_guest::main!(app_main);                                   // no devices
/// tt_guest::main!(app_main, devices: [block "storage", net "service0"]);
/// tt_guest::main!(app_main, devices: [virtio_blk "disk"]);    // tt-host only
/// ```
///
/// `app_main` is any `fn() -> T` with `T:` [`Termination`] (`()`, `i32`,
/// `Result<T, E: Debug>`). Each device is `block "NAME"`, `net "NAME"` or
/// `virtio_blk "NAME"` (see [`virtio_blk`]: solo5-hvt refuses such images);
/// names must be unique and 1 to 67 ASCII letters and digits (checked at
/// compile time). Use the macro exactly once, in the binary crate.
#[macro_export]
macro_rules! main {
    ($main:path) => {
        $crate::main!($main, devices: []);
    };
    ($main:path, devices: [$($kind:ident $name:literal),* $(,)?]) => {
        #[used]
        #[unsafe(link_section = ".note.solo5.manifest")]
        static __TT_GUEST_MANIFEST: $crate::manifest::MftNote<
            { 1 + <[()]>::len(&[$($crate::__tt_unit!($name)),*]) },
        > = $crate::manifest::MftNote::new([
            $crate::manifest::MftEntry::reserved_first(),
            $($crate::manifest::MftEntry::$kind($name)),*
        ]);

        #[unsafe(no_mangle)]
        pub fn __tt_guest_main() -> i32 {
            $crate::Termination::report($main())
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __tt_unit {
    ($x:tt) => {
        ()
    };
}
