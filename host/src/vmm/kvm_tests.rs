//! The MMIO window on real KVM: hand-assembled guests (on
//! [`crate::loader::synth`] images) read and write device registers at
//! 4 GiB, and the devices see what they did.
//!
//! These tests fail without /dev/kvm unless TT_SKIP_KVM=1.

use super::*;
use crate::loader::{parse_image, synth};
use crate::modules::console::Console;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const MEM: u64 = 8 << 20;
const BASE: u64 = layout::MMIO_BASE;

fn kvm() -> bool {
    if std::path::Path::new("/dev/kvm").exists() {
        return true;
    }
    if std::env::var("TT_SKIP_KVM").as_deref() == Ok("1") {
        eprintln!("SKIPPED: /dev/kvm is missing and TT_SKIP_KVM=1 is set");
        return false;
    }
    panic!("/dev/kvm is missing: KVM tests fail without it (set TT_SKIP_KVM=1 to skip them)");
}

/// Logs every access; a read returns `offset + i` in byte `i`.
#[derive(Default)]
struct Regs {
    log: Vec<(char, u64, Vec<u8>)>,
    mem_attached: bool,
}

impl MmioDevice for Regs {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = (offset as u8).wrapping_add(i as u8);
        }
        self.log.push(('r', offset, data.to_vec()));
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.log.push(('w', offset, data.to_vec()));
    }
    fn attach_memory(&mut self, _mem: GuestMemoryMmap) {
        self.mem_attached = true;
    }
}

fn region(k: u64, len: u64, dev: &Arc<Mutex<Regs>>) -> MmioRegion {
    MmioRegion {
        base: BASE + k * layout::MMIO_PAGE,
        len,
        device: dev.clone(),
        notify: Vec::new(),
    }
}

/// `mov rax, imm64`
fn mov_rax(v: u64) -> Vec<u8> {
    let mut c = vec![0x48, 0xb8];
    c.extend_from_slice(&v.to_le_bytes());
    c
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// Build and run a Synth image with `code` (then a HALT with status 0) and
/// these MMIO regions.
fn run(code: Vec<u8>, regions: Vec<MmioRegion>) -> (Result<i32, VmError>, Vm) {
    let mut code = code;
    code.extend(synth::code_halt(0));
    let mut vm = new_vm(code, regions);
    (vm.run(), vm)
}

fn new_vm(code: Vec<u8>, regions: Vec<MmioRegion>) -> Vm {
    let file = synth::Synth {
        code,
        ..synth::Synth::default()
    }
    .build();
    let image = parse_image(&file, MEM).unwrap();
    let manifest = image.manifest.to_guest_bytes(|_, _| unreachable!());
    let p = BootParams {
        image: &image,
        file: &file,
        mem_size: MEM,
        cmdline: "",
        manifest: &manifest,
        solo5_hvt_boot: false,
    };
    let console: Box<dyn Module> = Box::new(Console::new(std::io::sink()));
    Vm::new(&p, vec![console], regions).unwrap()
}

#[test]
fn guest_reads_and_writes_reach_the_device_at_their_offset_and_size() {
    if !kvm() {
        return;
    }
    let (a, b) = (Arc::default(), Arc::default());
    let code = cat(&[
        // 4-byte read, written back elsewhere.
        &mov_rax(BASE + 0x10),
        &[0x8b, 0x08], // mov ecx, [rax]
        &mov_rax(BASE + 0x20),
        &[0x89, 0x08], // mov [rax], ecx
        // 1 byte from the second device, back to it.
        &mov_rax(BASE + 0x1003),
        &[0x8a, 0x08], // mov cl, [rax]
        &mov_rax(BASE + 0x17f8),
        &[0x88, 0x08], // mov [rax], cl
        // A 2-byte immediate.
        &mov_rax(BASE + 0x30),
        &[0x66, 0xc7, 0x00, 0xef, 0xbe], // mov word [rax], 0xbeef
        // 8 bytes, to the last register of the window's first page.
        &mov_rax(BASE + 0x40),
        &[0x48, 0x8b, 0x08], // mov rcx, [rax]
        &mov_rax(BASE + 0xff8),
        &[0x48, 0x89, 0x08], // mov [rax], rcx
    ]);
    let (r, vm) = run(code, vec![region(0, 0x1000, &a), region(1, 0x1000, &b)]);
    assert_eq!(r.unwrap(), 0);
    assert_eq!(vm.mmio_exits, 7);
    let a = a.lock().unwrap();
    assert!(a.mem_attached, "the device got guest memory");
    assert_eq!(
        a.log,
        vec![
            ('r', 0x10, vec![0x10, 0x11, 0x12, 0x13]),
            ('w', 0x20, vec![0x10, 0x11, 0x12, 0x13]),
            ('w', 0x30, vec![0xef, 0xbe]),
            ('r', 0x40, (0x40..0x48).collect()),
            ('w', 0xff8, (0x40..0x48).collect()),
        ]
    );
    assert_eq!(
        b.lock().unwrap().log,
        vec![('r', 3, vec![3]), ('w', 0x7f8, vec![3])]
    );
}

#[test]
fn a_write_outside_every_region_stops_the_guest() {
    if !kvm() {
        return;
    }
    let d = Arc::default();
    // The window's page is mapped, but the device has only 0x100 bytes.
    let code = cat(&[&mov_rax(BASE + 0x200), &[0xc7, 0x00, 1, 0, 0, 0]]);
    let (r, _vm) = run(code, vec![region(0, 0x100, &d)]);
    let msg = r.unwrap_err().to_string();
    assert!(
        msg.contains("guest accessed 0x100000200, outside guest memory"),
        "{msg}"
    );
    assert!(d.lock().unwrap().log.is_empty());
}

#[test]
fn without_devices_the_window_is_not_mapped() {
    if !kvm() {
        return;
    }
    let code = cat(&[&mov_rax(BASE), &[0xc7, 0x00, 1, 0, 0, 0]]);
    let (r, _vm) = run(code, Vec::new());
    let msg = r.unwrap_err().to_string();
    // A page fault with no IDT: the access never leaves the guest.
    assert!(msg.contains("triple fault"), "{msg}");
    assert!(msg.contains("cr2=0x100000000"), "{msg}");
}

/// A queue notification (a 4-byte write of the queue index to its
/// address) reaches the device exactly once: on its eventfd if KVM took
/// the registration, else as an MMIO write. Other values are MMIO writes.
#[test]
fn queue_notifications_reach_the_device_once() {
    if !kvm() {
        return;
    }
    let d: Arc<Mutex<Regs>> = Arc::default();
    let fd = EventFd::new(EFD_NONBLOCK).unwrap();
    let mut r = region(0, 0x1000, &d);
    r.notify.push((BASE + 0x50, 1, fd.try_clone().unwrap()));
    let code = cat(&[
        &mov_rax(BASE + 0x50),
        &[0xc7, 0x00, 1, 0, 0, 0], // mov dword [rax], 1
        &[0xc7, 0x00, 2, 0, 0, 0], // mov dword [rax], 2
    ]);
    let (res, vm) = run(code, vec![r]);
    assert_eq!(res.unwrap(), 0);
    let log = d.lock().unwrap().log.clone();
    let signalled = fd.read().ok();
    eprintln!(
        "KVM_IOEVENTFD registered: {}; eventfd count {signalled:?}; device saw {log:?}",
        vm.notify_by_eventfd()
    );
    if vm.notify_by_eventfd() {
        assert_eq!(signalled, Some(1));
        assert_eq!(log, vec![('w', 0x50, vec![2, 0, 0, 0])]);
    } else {
        assert_eq!(signalled, None);
        assert_eq!(
            log,
            vec![('w', 0x50, vec![1, 0, 0, 0]), ('w', 0x50, vec![2, 0, 0, 0])]
        );
    }
}

#[test]
fn regions_outside_the_window_or_overlapping_are_refused() {
    // Checked before KVM is opened: no /dev/kvm needed.
    let d: Arc<Mutex<Regs>> = Arc::default();
    let file = synth::Synth::default().build();
    let image = parse_image(&file, MEM).unwrap();
    let p = BootParams {
        image: &image,
        file: &file,
        mem_size: MEM,
        cmdline: "",
        manifest: &[],
        solo5_hvt_boot: false,
    };
    let err = |regions| Vm::new(&p, Vec::new(), regions).err().unwrap();
    // One device: only the window's first page.
    let e = err(vec![region(1, 0x1000, &d)]);
    assert!(
        matches!(e, VmError::OutsideMmioWindow { base, .. } if base == BASE + 0x1000),
        "{e}"
    );
    let e = err(vec![region(0, 0x1001, &d)]);
    assert!(matches!(e, VmError::OutsideMmioWindow { .. }), "{e}");
    let e = err(vec![region(0, 0x1000, &d), region(0, 0x10, &d)]);
    assert!(matches!(e, VmError::Bus(BusError::Overlap { .. })), "{e}");
    let mut r = region(0, 0x100, &d);
    r.notify
        .push((BASE + 0xfe, 0, EventFd::new(EFD_NONBLOCK).unwrap()));
    let e = err(vec![r]);
    assert!(matches!(e, VmError::NotifyOutsideRegion { .. }), "{e}");
}

// ---- Cost of an MMIO exit, against a port-I/O hypercall ----------------

const GDT: u64 = synth::DATA + 0x100;
const GDTR: u64 = synth::DATA + 0x80;
const TSS: u64 = synth::DATA + 0x200;
/// The TSS's I/O bitmap covers ports 0..0x600 (the hypercalls).
const IOMAP_BYTES: u64 = 0x600 / 8;

/// `mov [addr32], rax`
fn store_rax(addr: u64) -> Vec<u8> {
    let mut c = vec![0x48, 0x89, 0x04, 0x25];
    c.extend_from_slice(&(addr as u32).to_le_bytes());
    c
}

/// Code that drops to CPL 3 and continues right after itself: a GDT with
/// user segments and a TSS whose I/O bitmap allows every port below
/// 0x600 (kvm-pvm ignores RFLAGS.IOPL at CPL 3), then `iretq`.
fn to_cpl3(at: u64) -> Vec<u8> {
    let limit = 0x68 + IOMAP_BYTES; // the bitmap's 0xff end byte included
    let tss_lo = (limit & 0xffff)
        | ((TSS & 0xff_ffff) << 16)
        | (0x89 << 40)
        | (((limit >> 16) & 0xf) << 48)
        | (((TSS >> 24) & 0xff) << 56);
    let entries = [
        (0x08, 0x00af_9b00_0000_ffff_u64), // kernel code
        (0x10, 0x00cf_9300_0000_ffff),     // kernel data
        (0x18, 0x00cf_f300_0000_ffff),     // user data
        (0x20, 0x00af_fb00_0000_ffff),     // user code
        (0x28, tss_lo),
        (0x30, TSS >> 32),
    ];
    let mut c = Vec::new();
    for (sel, desc) in entries {
        c.extend(mov_rax(desc));
        c.extend(store_rax(GDT + sel));
    }
    // TSS: I/O map base at 0x66; the byte after the bitmap is 0xff.
    c.extend(mov_rax(0x68 << 48));
    c.extend(store_rax(TSS + 0x60));
    c.extend(mov_rax(0xff));
    c.extend(store_rax(TSS + 0x68 + IOMAP_BYTES));
    // GDTR = (limit, base).
    c.extend(mov_rax(0x37 | (GDT << 16)));
    c.extend(store_rax(GDTR));
    c.extend([0x0f, 0x01, 0x14, 0x25]); // lgdt [GDTR]
    c.extend((GDTR as u32).to_le_bytes());
    c.extend([0x66, 0xb8, 0x28, 0x00, 0x0f, 0x00, 0xd8]); // mov ax, 0x28; ltr ax
    c.extend([0x6a, 0x1b]); // push ss
    c.extend(mov_rax(MEM - 0x1000));
    c.push(0x50); // push rsp
    c.extend([0x6a, 0x02]); // push rflags
    c.extend([0x6a, 0x23]); // push cs
    let after = at + c.len() as u64 + 10 + 1 + 2;
    c.extend(mov_rax(after));
    c.push(0x50); // push rip
    c.extend([0x48, 0xcf]); // iretq
    c
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Trip {
    /// WALLTIME: `out dx, eax` to port 0x501.
    Hypercall,
    /// A 4-byte write to a device register: an MMIO exit.
    Mmio,
    /// A 4-byte queue notification registered with KVM_IOEVENTFD.
    Ioeventfd,
}

/// Time `iters` round trips of `trip` at CPL 0 or 3.
fn timed(cpl3: bool, trip: Trip, iters: u32) -> Duration {
    let mut code = if cpl3 {
        to_cpl3(synth::TEXT)
    } else {
        Vec::new()
    };
    let stop = BASE + 0x800;
    match trip {
        Trip::Mmio | Trip::Ioeventfd => {
            code.extend(mov_rax(BASE + 0x60));
            code.push(0xb9); // mov ecx, iters
            code.extend(iters.to_le_bytes());
            // 1: mov dword [rax], 1; dec ecx; jnz 1b
            code.extend([0xc7, 0x00, 1, 0, 0, 0, 0xff, 0xc9, 0x75, 0xf6]);
        }
        Trip::Hypercall => {
            code.push(0xb8); // mov eax, DATA (the WALLTIME struct)
            code.extend((synth::DATA as u32).to_le_bytes());
            code.extend([0x66, 0xba, 0x01, 0x05]); // mov dx, 0x501
            code.push(0xb9);
            code.extend(iters.to_le_bytes());
            code.extend([0xef, 0xff, 0xc9, 0x75, 0xfb]); // 1: out dx, eax; dec ecx; jnz 1b
        }
    }
    // Stop (also from CPL 3) with a write outside the device's 0x100 bytes.
    code.extend(mov_rax(stop));
    code.extend([0x89, 0x08]);
    let d = Arc::default();
    let mut r = region(0, 0x100, &d);
    let fd = EventFd::new(EFD_NONBLOCK).unwrap();
    if trip == Trip::Ioeventfd {
        r.notify.push((BASE + 0x60, 1, fd.try_clone().unwrap()));
    }
    let mut vm = new_vm(code, vec![r]);
    let t = Instant::now();
    let r = vm.run();
    let dt = t.elapsed();
    let msg = r.unwrap_err().to_string();
    assert!(msg.contains("guest accessed 0x100000800"), "{msg}");
    assert!(
        msg.contains(&format!("cpl={}", if cpl3 { 3 } else { 0 })),
        "{msg}"
    );
    let (exits, signals) = match trip {
        Trip::Mmio => (iters as u64, None),
        Trip::Ioeventfd => (0, Some(iters as u64)),
        Trip::Hypercall => (0, None),
    };
    assert_eq!(vm.mmio_exits, exits);
    assert_eq!(fd.read().ok(), signals);
    dt
}

/// Not a check: prints what one round trip costs (`cargo test -p tt-host
/// --lib mmio_exit_cost -- --ignored --nocapture`).
#[test]
#[ignore = "a measurement, not a check: run by hand with --ignored --nocapture (docs/BENCHMARKS.md, virtio-blk)"]
fn mmio_exit_cost() {
    assert!(kvm());
    let iters = 20_000u32;
    for cpl3 in [false, true] {
        for trip in [Trip::Hypercall, Trip::Mmio, Trip::Ioeventfd] {
            let mut per: Vec<f64> = (0..5)
                .map(|_| {
                    let n = timed(cpl3, trip, iters);
                    let one = timed(cpl3, trip, 1);
                    n.saturating_sub(one).as_nanos() as f64 / (iters - 1) as f64
                })
                .collect();
            per.sort_by(f64::total_cmp);
            println!(
                "CPL {} {:<10} median {:>7.0} ns (runs: {per:.0?})",
                if cpl3 { 3 } else { 0 },
                format!("{trip:?}"),
                per[2]
            );
        }
    }
}

#[test]
#[ignore = "probe"]
fn probe_cpl3_monitor() {
    assert!(kvm());
    let n = 2000u32;
    let mut code = vec![0x0f, 0x01, 0x14, 0x25];
    code.extend((synth::DATA as u32).to_le_bytes()); // lgdt [DATA]
    code.push(0xb9);
    code.extend(n.to_le_bytes());
    code.extend([0xfa, 0xff, 0xc9, 0x75, 0xfb]); // 1: cli; dec ecx; jnz 1b
    code.extend(synth::code_halt(0));
    let vm = new_vm(code, vec![]);
    let mem = &vm.mem;
    let (idt, tss, stub, stack) = (0x7c000u64, 0x7d000u64, 0x7e000u64, 0x7f000u64);
    let iomap = 0x600 / 8;
    let limit = 0x68 + iomap;
    let tss_lo = (limit & 0xffff)
        | ((tss & 0xff_ffff) << 16)
        | (0x89 << 40)
        | (((limit >> 16) & 0xf) << 48)
        | (((tss >> 24) & 0xff) << 56);
    for (sel, desc) in [
        (0x18u64, 0x00cf_f300_0000_ffff_u64),
        (0x20, 0x00af_fb00_0000_ffff),
        (0x28, tss_lo),
        (0x30, tss >> 32),
    ] {
        mem.write_obj(desc, GuestAddress(layout::GDT_BASE + sel))
            .unwrap();
    }
    for (page, flags) in [
        (0x1000u64, 3u64),
        (idt, 3 | (1 << 63)),
        (tss, 3 | (1 << 63)),
        (stub, 1),
        (stack, 3 | (1 << 63)),
    ] {
        mem.write_obj(
            page | flags,
            GuestAddress(layout::PT_BASE + page / 4096 * 8),
        )
        .unwrap();
    }
    // TSS: rsp0, iomap base, bitmap (ports >= 0x500 open), end byte.
    mem.write_obj(stack + 0x1000, GuestAddress(tss + 4))
        .unwrap();
    mem.write_obj(0x68u16, GuestAddress(tss + 0x66)).unwrap();
    for p in 0..iomap {
        let v: u8 = if p * 8 >= 0x500 { 0 } else { 0xff };
        mem.write_obj(v, GuestAddress(tss + 0x68 + p)).unwrap();
    }
    mem.write_obj(0xffu8, GuestAddress(tss + 0x68 + iomap))
        .unwrap();
    for v in 0..32u64 {
        let at = stub + v * 16;
        let gate = (at & 0xffff) | (0x08 << 16) | (0x8eu64 << 40) | (((at >> 16) & 0xffff) << 48);
        mem.write_obj(gate, GuestAddress(idt + v * 16)).unwrap();
        mem.write_obj(at >> 32, GuestAddress(idt + v * 16 + 8))
            .unwrap();
        let has_ec = matches!(v, 8 | 10..=14 | 17);
        let mut s = Vec::new();
        if !has_ec {
            s.extend([0x6a, 0x00]);
        }
        s.extend([
            0x6a, v as u8, 0xe6, 0xe0, 0x48, 0x83, 0xc4, 0x10, 0x48, 0xcf,
        ]);
        mem.write_slice(&s, GuestAddress(at)).unwrap();
    }
    let mut sregs = vm.vcpu.get_sregs().unwrap();
    sregs.gdt.limit = 0x37;
    sregs.idt.base = idt;
    sregs.idt.limit = 0xfff;
    sregs.tr = kvm_segment {
        base: tss,
        limit: limit as u32,
        selector: 0x28,
        type_: 11,
        present: 1,
        ..Default::default()
    };
    let mut cs = segment(0x23, 0xb, 1, 0);
    cs.dpl = 3;
    let mut ds = segment(0x1b, 0x3, 0, 1);
    ds.dpl = 3;
    sregs.cs = cs;
    (sregs.ds, sregs.es, sregs.ss) = (ds, ds, ds);
    vm.vcpu.set_sregs(&sregs).unwrap();
    let mut vm = vm;
    let t = Instant::now();
    let mut traps = 0u32;
    loop {
        match vm.vcpu.run() {
            Ok(VcpuExit::IoOut(0xe0, _)) => {
                let regs = vm.vcpu.get_regs().unwrap();
                let mut f = [0u64; 7];
                for (i, w) in f.iter_mut().enumerate() {
                    *w = vm
                        .mem
                        .read_obj(GuestAddress(regs.rsp + 8 * i as u64))
                        .unwrap();
                }
                if traps == 0 {
                    println!("first trap frame {f:x?} rsp={:#x}", regs.rsp);
                }
                assert_eq!(f[0], 13, "{f:x?}");
                let len = if traps == 0 { 8 } else { 1 };
                vm.mem
                    .write_obj(f[2] + len, GuestAddress(regs.rsp + 16))
                    .unwrap();
                traps += 1;
            }
            Ok(VcpuExit::IoOut(0x508, _)) => break,
            Ok(e) => {
                let e = format!("{e:?}");
                let r = vm.vcpu.get_regs().unwrap();
                let s = vm.vcpu.get_sregs().unwrap();
                panic!(
                    "{e} rip={:#x} cpl={} after {traps}",
                    r.rip,
                    s.cs.selector & 3
                );
            }
            Err(e) => panic!("{e}"),
        }
    }
    let dt = t.elapsed();
    println!("{traps} traps in {dt:?}: {:?} each", dt / traps);
}
