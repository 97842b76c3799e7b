//! Hand-assembled CPL 0 guests (as Solo5 images run): exit status, and the
//! host's W^X page tables and fault reports. Images come from
//! `tt_host::loader::synth`.

use tt_host::loader::synth::{self, Synth};
use tt_tests::*;

fn run_synth(s: &Synth) -> Run {
    let dir = Scratch::new("cpl0");
    let img = dir.file("guest.hvt", &s.build());
    tt(&["run", "--mem=8", img.to_str().unwrap()])
}

#[test]
fn halt_status_is_the_exit_status() {
    if !kvm() {
        return;
    }
    for status in [0, 7, 255] {
        let r = run_synth(&Synth {
            code: synth::code_halt(status),
            ..Synth::default()
        });
        assert_eq!(r.status, status, "{r:?}");
        assert!(r.stderr.is_empty(), "{r:?}");
    }
}

#[test]
fn writing_text_is_stopped_by_the_host_page_tables() {
    if !kvm() {
        return;
    }
    let mut code = synth::code_write_byte(synth::TEXT as u32);
    code.extend(synth::code_halt(0));
    let r = run_synth(&Synth {
        code,
        ..Synth::default()
    });
    assert_error(&r, "triple fault");
    assert!(r.stderr.contains("cr2=0x100000"), "{r:?}");
}

#[test]
fn executing_data_is_stopped_by_the_host_page_tables() {
    if !kvm() {
        return;
    }
    // The data segment holds a HALT sequence; jumping to it must fault.
    let r = run_synth(&Synth {
        code: synth::code_jump(synth::DATA as u32),
        data: synth::code_halt(0),
        ..Synth::default()
    });
    assert_error(&r, "triple fault");
    assert!(r.stderr.contains("rip=0x101000"), "{r:?}");
}

#[test]
fn null_dereference_faults() {
    if !kvm() {
        return;
    }
    let mut code = synth::code_write_byte(0x10);
    code.extend(synth::code_halt(0));
    let r = run_synth(&Synth {
        code,
        ..Synth::default()
    });
    assert_error(&r, "triple fault");
    assert!(r.stderr.contains("cr2=0x10"), "{r:?}");
}

#[test]
fn invalid_hypercall_port_and_address_are_host_errors() {
    if !kvm() {
        return;
    }
    // out dx, eax to port 0x509 (not a hypercall).
    let r = run_synth(&Synth {
        code: vec![0x66, 0xba, 0x09, 0x05, 0xef],
        ..Synth::default()
    });
    assert_error(&r, "invalid guest port access: port 0x509");
    // PUTS with its argument struct beyond guest memory (8 MiB).
    let mut code = vec![0xb8];
    code.extend_from_slice(&0x0900_0000u32.to_le_bytes());
    code.extend_from_slice(&[0x66, 0xba, 0x02, 0x05, 0xef]);
    let r = run_synth(&Synth {
        code,
        ..Synth::default()
    });
    assert_error(&r, "invalid hypercall address");
}

#[test]
fn hlt_without_halt_hypercall_is_reported() {
    if !kvm() {
        return;
    }
    let r = run_synth(&Synth {
        code: vec![0xf4],
        ..Synth::default()
    });
    assert_error(&r, "HLT");
}
