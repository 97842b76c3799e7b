//! Host-side build helper for tt-guest unikernels.
//!
//! A guest is an ordinary cargo binary crate for the
//! `x86_64-unknown-linux-gnu` target that depends on `tt-guest`. Its
//! `build.rs` is one line:
//!
//! ```text
//! fn main() {
//!     tt_guest_build::link();
//! }
//! ```
//!
//! [`link`] writes the tt-guest linker script into `OUT_DIR` and tells cargo
//! to link the crate's binaries as static, non-PIE ELF executables at 1 MiB
//! with no C start files, which is what the Solo5 hvt ABI expects. The
//! crate must also build with `panic = "abort"` (set it in the `dev` and
//! `release` profiles of the workspace root).

use std::env;
use std::fs;
use std::path::PathBuf;

/// The linker script, also readable in `build/src/tt-guest.ld`.
pub const LINKER_SCRIPT: &str = include_str!("tt-guest.ld");

/// File name of the linker script written into `OUT_DIR`.
pub const LINKER_SCRIPT_NAME: &str = "tt-guest.ld";

/// The linker arguments [`link`] passes for every binary, given the path of
/// the linker script.
pub fn link_args(script: &str) -> Vec<String> {
    vec![
        "-nostartfiles".into(),
        "-nodefaultlibs".into(),
        "-static".into(),
        "-no-pie".into(),
        format!("-T{script}"),
        "-Wl,--build-id=none".into(),
        "-Wl,-z,max-page-size=0x1000".into(),
        "-Wl,-z,noexecstack".into(),
        "-Wl,--no-eh-frame-hdr".into(),
    ]
}

/// Configure the current crate's binaries to link as tt-guest images.
///
/// Call from `build.rs`. Panics (failing the build with a message) if
/// `OUT_DIR` is not set, i.e. when not run by cargo, or if the linker
/// script cannot be written.
pub fn link() {
    let out =
        PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR not set: call link() from build.rs"));
    let script = out.join(LINKER_SCRIPT_NAME);
    fs::write(&script, LINKER_SCRIPT)
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", script.display()));
    println!("cargo:rustc-link-search=native={}", out.display());
    for arg in link_args(&script.to_string_lossy()) {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
    println!("cargo:rerun-if-changed=build.rs");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_declares_both_notes_and_wx_segments() {
        assert!(LINKER_SCRIPT.contains(".note.solo5.abi"));
        assert!(LINKER_SCRIPT.contains(".note.solo5.manifest"));
        assert!(LINKER_SCRIPT.contains("text     PT_LOAD FLAGS(5)"));
        assert!(LINKER_SCRIPT.contains("data     PT_LOAD FLAGS(6)"));
    }

    #[test]
    fn args_are_static_non_pie() {
        let a = link_args("/x/tt-guest.ld");
        assert!(a.contains(&"-static".to_string()));
        assert!(a.contains(&"-no-pie".to_string()));
        assert!(a.contains(&"-T/x/tt-guest.ld".to_string()));
    }
}
