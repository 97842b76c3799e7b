//! Fuzz the hypercall handlers with arbitrary guest memory and requests.
//!
//! The guest is untrusted: every hypercall argument struct, buffer address
//! and length comes from guest memory. Here the console, block and net
//! modules (one in-memory block device, no net device) serve a sequence of
//! hypercalls whose argument structs and buffers lie in fuzzed guest
//! memory, and each outcome is checked against a model of the hvt ABI:
//!
//! - a struct or buffer outside guest memory stops the guest
//!   (`GuestError`), nothing else does;
//! - a block request with a bad handle, an unaligned or empty range, or a
//!   range past the device's end gets `EINVAL`, and leaves the disk alone;
//! - a good write changes exactly its range of the disk, to the guest's
//!   bytes; a good read brings the disk's bytes into guest memory;
//! - PUTS writes exactly the guest's bytes to the console;
//! - HALT exits with the guest's status, unless its cookie points outside
//!   guest memory.
//!
//! Input: byte 0 picks the sector size (512 << (b & 3)), byte 1 the
//! device's size in sectors (1 + b % 32), byte 2 the number N of
//! operations (N % 16); then N 3-byte operations (hypercall number, then
//! a 16-bit argument address inside the window, or a wild address when
//! the number's top bit is set); the rest, up to `WINDOW` bytes, is copied
//! into guest memory at `BASE`, where the argument structs and buffers
//! are. POLL is left out: with no net device it would sleep for the
//! guest's timeout.

#![no_main]

use libfuzzer_sys::fuzz_target;
use std::io::Write;
use std::sync::{Arc, Mutex};
use tt_host::abi::{layout, ret, Hypercall};
use tt_host::block::{FileBackend, Geometry, Image, Info, ID_LEN};
use tt_host::modules::block::{Block, BlockDevice};
use tt_host::modules::console::Console;
use tt_host::modules::net::Net;
use tt_host::modules::{Action, GuestError, GuestMem, Module};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: u64 = 1 << 20;
const BASE: u64 = 0x1000;
const WINDOW: usize = 0x2000;
const HANDLE: u64 = 0;

/// A disk in memory, shared with the checker.
struct Disk(Arc<Mutex<Vec<u8>>>);

impl Image for Disk {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let d = self.0.lock().unwrap();
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let mut d = self.0.lock().unwrap();
        d[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn sync_data(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What the console wrote, shared with the checker.
#[derive(Clone, Default)]
struct Out(Arc<Mutex<Vec<u8>>>);

impl Write for Out {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Is `[gpa, gpa+len)` guest memory (an empty range must start inside)?
fn in_mem(gpa: u64, len: u64) -> bool {
    gpa.checked_add(len)
        .is_some_and(|end| end <= MEM && (len > 0 || gpa < MEM))
}

fn u64_at(mem: &GuestMemoryMmap, gpa: u64) -> u64 {
    mem.read_obj(GuestAddress(gpa)).unwrap()
}

fn bytes_at(mem: &GuestMemoryMmap, gpa: u64, len: u64) -> Vec<u8> {
    let mut v = vec![0u8; len as usize];
    mem.read_slice(&mut v, GuestAddress(gpa)).unwrap();
    v
}

fn call_of(n: u8) -> Option<Hypercall> {
    Hypercall::from_port(tt_host::abi::HYPERCALL_PIO_BASE + 1 + (n % 8) as u16)
        .filter(|c| *c != Hypercall::Poll)
}

fuzz_target!(|data: &[u8]| {
    let [b0, b1, n, rest @ ..] = data else {
        return;
    };
    let sector = 512u64 << (b0 & 3);
    let disk = Arc::new(Mutex::new(vec![
        0u8;
        (sector * (1 + *b1 as u64 % 32)) as usize
    ]));
    let (ops, window) = rest.split_at(rest.len().min(3 * (*n as usize % 16)));
    let window = &window[..window.len().min(WINDOW)];
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
    mem.write_slice(window, GuestAddress(BASE)).unwrap();
    // Nothing protected: every address in memory may be written.
    let mem = GuestMem::unprotected(mem);

    let out = Out::default();
    let mut console = Console::new(out.clone());
    let capacity = disk.lock().unwrap().len() as u64;
    let info = Info {
        name: "storage".into(),
        geometry: Geometry {
            capacity,
            sector_size: sector,
        },
        id: [0; ID_LEN],
        durable_writes: false,
        max_atomic_write: sector,
    };
    let backend = FileBackend::new(info, Arc::new(Disk(disk.clone()))).unwrap();
    let dev = BlockDevice::new(HANDLE, Box::new(backend));
    let mut block = Block::new(vec![dev]);
    let mut net = Net::new(Vec::new());

    for op in ops.chunks_exact(3) {
        let Some(call) = call_of(op[0]) else { continue };
        let arg = if op[0] & 0x80 != 0 {
            [
                MEM - 8,
                MEM,
                u32::MAX as u64,
                MEM - layout::BLOCK_SIZE as u64 + 8,
            ][op[1] as usize % 4]
        } else {
            BASE + (u16::from_le_bytes([op[1], op[2]]) as u64 % WINDOW as u64)
        };
        let size = match call {
            Hypercall::Walltime => 8,
            Hypercall::Puts => layout::PUTS_SIZE,
            Hypercall::BlockWrite | Hypercall::BlockRead => layout::BLOCK_SIZE,
            Hypercall::NetWrite | Hypercall::NetRead => layout::NET_SIZE,
            Hypercall::Halt => layout::HALT_SIZE,
            Hypercall::Poll => unreachable!(),
        } as u64;
        let arg_ok = in_mem(arg, size);
        // The struct's u64 words (past a short struct's end: whatever is
        // there, or 0 past the end of memory).
        let word = |i: u64| {
            let at = arg.saturating_add(8 * i);
            if arg_ok && in_mem(at, 8) {
                u64_at(&mem, at)
            } else {
                0
            }
        };
        let (w0, w1, w2, w3) = (word(0), word(1), word(2), word(3));
        let disk_before = disk.lock().unwrap().clone();
        let out_before = out.0.lock().unwrap().len();
        // What a block write will take from guest memory, before the call
        // writes its `ret` field (which the buffer may overlap).
        let write_data = (call == Hypercall::BlockWrite && in_mem(w2, w3) && w3 <= MEM)
            .then(|| bytes_at(&mem, w2, w3));
        let puts_data = (call == Hypercall::Puts && in_mem(w0, w1)).then(|| bytes_at(&mem, w0, w1));

        let r = match call {
            Hypercall::Walltime | Hypercall::Puts | Hypercall::Halt => {
                console.handle(call, arg, &mem)
            }
            Hypercall::BlockWrite | Hypercall::BlockRead => block.handle(call, arg, &mem),
            _ => net.handle(call, arg, &mem),
        };

        if !arg_ok {
            assert!(
                bad_address(&r),
                "{call:?}: struct at {arg:#x} outside memory gave {r:?}"
            );
            break;
        }
        let disk_after = disk.lock().unwrap().clone();
        match call {
            Hypercall::Walltime => assert_eq!(r, Ok(Action::Continue)),
            Hypercall::Puts => match &puts_data {
                None => {
                    assert!(bad_address(&r), "{r:?}");
                    break;
                }
                Some(bytes) => {
                    assert_eq!(r, Ok(Action::Continue));
                    assert_eq!(
                        &out.0.lock().unwrap()[out_before..],
                        &bytes[..],
                        "PUTS output"
                    );
                }
            },
            Hypercall::Halt => {
                if w0 != 0 && !in_mem(w0, layout::HALT_COOKIE_MAX) {
                    assert!(bad_address(&r), "{r:?}");
                } else {
                    assert_eq!(r, Ok(Action::Exit(w1 as u32 as i32)), "HALT status");
                }
                break;
            }
            Hypercall::BlockWrite | Hypercall::BlockRead => {
                let (handle, offset, buf, len) = (w0, w1, w2, w3);
                let cap = disk_before.len() as u64;
                let valid = handle == HANDLE
                    && len > 0
                    && offset % sector == 0
                    && len % sector == 0
                    && offset.checked_add(len).is_some_and(|e| e <= cap);
                let ret_field: i32 = mem.read_obj(GuestAddress(arg + 32)).unwrap();
                if !valid {
                    assert_eq!(r, Ok(Action::Continue), "{call:?} invalid request");
                    assert_eq!(ret_field, ret::EINVAL, "{call:?} invalid request");
                    assert!(
                        disk_after == disk_before,
                        "an invalid request changed the disk"
                    );
                    continue;
                }
                if !in_mem(buf, len) {
                    assert!(bad_address(&r), "{r:?}");
                    assert!(
                        disk_after == disk_before,
                        "a refused request changed the disk"
                    );
                    break;
                }
                assert_eq!(r, Ok(Action::Continue));
                assert_eq!(ret_field, ret::OK, "{call:?} of a valid request");
                let range = offset as usize..(offset + len) as usize;
                if call == Hypercall::BlockWrite {
                    let mut want = disk_before.clone();
                    want[range].copy_from_slice(write_data.as_deref().unwrap());
                    assert!(disk_after == want, "BLOCK_WRITE wrote other bytes");
                } else {
                    assert!(disk_after == disk_before, "BLOCK_READ changed the disk");
                    let got = bytes_at(&mem, buf, len);
                    // The `ret` field, written after the copy, may lie in
                    // the buffer.
                    for (i, (g, w)) in got.iter().zip(&disk_before[range]).enumerate() {
                        let at = buf + i as u64;
                        if !(arg + 32..arg + 36).contains(&at) {
                            assert_eq!(g, w, "BLOCK_READ byte at {at:#x}");
                        }
                    }
                }
            }
            Hypercall::NetWrite | Hypercall::NetRead => {
                // No net device: every handle is bad.
                assert_eq!(r, Ok(Action::Continue));
                let ret_field: i32 = mem.read_obj(GuestAddress(arg + 24)).unwrap();
                assert_eq!(ret_field, ret::EINVAL, "{call:?} without a net device");
            }
            Hypercall::Poll => unreachable!(),
        }
    }
});

/// Refused as a bad address: outside guest memory, or (for an address
/// below 0x80000, which this harness's memory holds but a VM's hypercall
/// view does not) in tt-host's own low memory.
fn bad_address(r: &Result<Action, GuestError>) -> bool {
    matches!(
        r,
        Err(GuestError::BadAddress { .. } | GuestError::Reserved { .. })
    )
}
