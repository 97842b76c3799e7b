//! A guest's writes reach its block devices with the flush at exit; when
//! that flush fails, what the guest wrote may not be on disk, so the run
//! fails (exit 1 with a message) even though the guest exited with 0.
//! (It used to print a warning and exit with the guest's 0.)
//!
//! A real KVM guest (the loader's synthetic image, which halts at once)
//! with a block backend whose sync fails: no file system fails an
//! `fdatasync` on demand, so this one part is a stand-in.

use std::sync::Arc;
use tt_host::block::{FileBackend, Geometry, Image, Info, ID_LEN};
use tt_host::loader::{parse_image, synth::Synth};
use tt_host::modules::block::{Block, BlockDevice};
use tt_host::modules::{console::Console, Module};
use tt_host::vmm::{BootParams, Vm, VmError};
use tt_tests::kvm;

/// An image that serves I/O but whose sync fails when `fail`.
struct Disk {
    fail: bool,
}

impl Image for Disk {
    fn read_at(&self, buf: &mut [u8], _offset: u64) -> std::io::Result<()> {
        buf.fill(0);
        Ok(())
    }
    fn write_at(&self, _buf: &[u8], _offset: u64) -> std::io::Result<()> {
        Ok(())
    }
    fn sync_data(&self) -> std::io::Result<()> {
        if self.fail {
            Err(std::io::Error::other("injected I/O error"))
        } else {
            Ok(())
        }
    }
}

fn device(i: usize, fail: bool) -> BlockDevice {
    let info = Info {
        name: format!("disk{i}"),
        geometry: Geometry {
            capacity: 4096,
            sector_size: 512,
        },
        id: [0; ID_LEN],
        durable_writes: false,
        max_atomic_write: 512,
    };
    let backend = FileBackend::new(info, Arc::new(Disk { fail })).unwrap();
    BlockDevice::new(i as u64 + 1, Box::new(backend))
}

fn run_with(fail: &[bool]) -> Result<i32, VmError> {
    let file = Synth::default().build();
    let mem = 8 << 20;
    let image = parse_image(&file, mem).unwrap();
    let manifest = image.manifest.to_guest_bytes(|_, _| unreachable!());
    let p = BootParams {
        image: &image,
        file: &file,
        mem_size: mem,
        cmdline: "",
        manifest: &manifest,
        solo5_hvt_boot: false,
        cpl3: false,
    };
    let devices = fail
        .iter()
        .enumerate()
        .map(|(i, &fail)| device(i, fail))
        .collect();
    let modules: Vec<Box<dyn Module>> = vec![
        Box::new(Console::new(std::io::sink())),
        Box::new(Block::new(devices)),
    ];
    Vm::new(&p, modules, Vec::new()).unwrap().run()
}

#[test]
fn a_failed_flush_at_exit_fails_the_run() {
    if !kvm() {
        return;
    }
    assert_eq!(run_with(&[false, false]).unwrap(), 0, "clean flush");
    match run_with(&[false, true, true]) {
        Err(e @ VmError::Shutdown(_)) => {
            let msg = e.to_string();
            assert!(
                msg.contains("'disk1'") && msg.contains("'disk2'") && !msg.contains("'disk0'"),
                "names every failed device, and only those: {msg}"
            );
            assert!(msg.contains("may not be on disk"), "{msg}");
        }
        other => panic!("a failed flush must fail the run, got {other:?}"),
    }
}
