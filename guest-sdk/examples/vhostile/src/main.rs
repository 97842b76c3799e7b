//! A hostile virtio-blk driver: puts malformed queues in front of tt-host's
//! device "disk" and checks each gets its documented answer (docs/ABI.md,
//! "virtio-blk": a status byte of `VIRTIO_BLK_S_IOERR` or `_UNSUPP`, or
//! `DEVICE_NEEDS_RESET` in the status register), that the device works
//! again after a reset, and that nothing it must not touch was touched.
//!
//! It does not use the SDK's driver (`tt_guest::virtio_blk`), which would
//! refuse to build such requests: it finds the register window in the
//! manifest as that driver does and drives the virtio-mmio (version 2)
//! registers itself, with its descriptor table, available and used rings,
//! request headers, status bytes and data buffers in one static area.
//!
//! For each case it resets the device, sets it up (queue of 8), offers the
//! hostile chain (or queue addresses), and prints one line:
//!
//! ```text
//! vhostile: [NN] NAME -> ANSWER (expected EXPECTED) match; good write+read at sector S: ok
//! ```
//!
//! (`MISMATCH` instead of `match`, or the good request's error instead of
//! `ok`). The good request, after a reset and a fresh setup, writes 4 KiB
//! at sector `64 + 8 * NN` and reads it back: every 512-byte sector `s` of
//! it holds `VHOSTILE`, `s` (u64 LE), then `(s * 31 + i * 7) ^ 0x5a` at
//! byte `i`. Nothing else on the disk is written by a request the device
//! should serve; the hostile writes carry `HOSTILE!` bytes, so a device
//! that wrongly served one leaves them on the image.
//!
//! At the end it checks that its code and read-only data and the tender's
//! boot info page read back as before, and prints `vhostile: OK` (exit 0)
//! or `vhostile: FAILED ...` (exit 1).
#![no_std]
#![no_main]

extern crate alloc;

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::UnsafeCell;
use core::mem::{align_of, size_of};
use core::ptr::addr_of;
use core::sync::atomic::{fence, Ordering};

use tt_guest::manifest::{self, MFT_TT_VIRTIO_BLK};
use tt_guest::println;
use tt_guest::time::monotonic_ns;
use tt_hvt_abi::virtio::blk::{
    CONFIG_CAPACITY, DEVICE_ID as BLK_DEVICE_ID, S_IOERR, S_OK, S_UNSUPP, T_IN, T_OUT,
};
use tt_hvt_abi::virtio::feature::{BLK_F_FLUSH, F_VERSION_1};
use tt_hvt_abi::virtio::mmio::*;
use tt_hvt_abi::virtio::status::{
    ACKNOWLEDGE, DEVICE_NEEDS_RESET, DRIVER, DRIVER_OK, FAILED, FEATURES_OK,
};

tt_guest::main!(app_main, devices: [virtio_blk "disk"]);

/// Queue size this driver sets (the device offers up to 256).
const Q: u16 = 8;
/// `virtq_desc.flags`: the chain continues in `next`.
const DESC_F_NEXT: u16 = 1;
/// `virtq_desc.flags`: the device writes this buffer.
const DESC_F_WRITE: u16 = 2;
/// `virtq_desc.flags`: the buffer is an indirect descriptor table.
const DESC_F_INDIRECT: u16 = 4;

/// Byte offsets inside [`AREA`].
const DESC: usize = 0x000; // 16 * Q
const AVAIL: usize = 0x100; // 6 + 2 * Q
const USED: usize = 0x200; // 6 + 8 * Q
const HDR: usize = 0x300; // 16 bytes per head
const STATUS_BYTE: usize = 0x400; // 1 byte per head
const INDIRECT: usize = 0x800; // an indirect table of up to 64 entries
const BUF_W: usize = 0x1000; // 4 KiB: what writes send
const BUF_R: usize = 0x2000; // 4 KiB: where reads land
const AREA_LEN: usize = 0x3000;
const BLOCK: usize = 4096;

/// How long a request may take to be answered.
const ANSWER_NS: u64 = 5_000_000_000;
/// How long to wait to be sure no answer comes.
const SILENCE_NS: u64 = 500_000_000;

/// Everything the device shares with this driver: plain writable data
/// (.bss), which the device may read and write.
#[repr(C, align(4096))]
struct Area(UnsafeCell<[u8; AREA_LEN]>);
// SAFETY: one CPU, no threads; every access goes through `put`/`get`,
// volatile, because the device writes the area concurrently.
unsafe impl Sync for Area {}
static AREA: Area = Area(UnsafeCell::new([0; AREA_LEN]));

/// Guest-physical (= virtual) address of `AREA + off`.
fn addr(off: usize) -> u64 {
    AREA.0.get() as u64 + off as u64
}

fn slot<T>(off: usize) -> *mut T {
    assert!(off + size_of::<T>() <= AREA_LEN && off.is_multiple_of(align_of::<T>()));
    addr(off) as *mut T
}

fn put<T>(off: usize, v: T) {
    // SAFETY: `slot` checked that the value lies inside AREA and is
    // aligned; nothing holds a reference into AREA.
    unsafe { slot::<T>(off).write_volatile(v) }
}

fn get<T>(off: usize) -> T {
    // SAFETY: as in `put`; every bit pattern is valid for the integer
    // types this is used with.
    unsafe { slot::<T>(off).read_volatile() }
}

extern "C" {
    /// Linker symbols (tt-guest.ld): text, rodata and the supervisor-only
    /// region.
    static _stext: u8;
    static _etext: u8;
    static _erodata: u8;
    static _skernel: u8;
}

/// FNV-1a 64 over `len` bytes at `start`, read one by one (volatile: a
/// device that wrote there must be seen).
fn checksum(start: u64, len: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for a in start..start + len {
        // SAFETY: callers pass ranges the guest may read: its own text and
        // rodata, and the tender's boot info pages (mapped user-readable).
        let b = unsafe { (a as *const u8).read_volatile() };
        h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// The good request's byte `j` of the 4 KiB written at sector `first`.
fn good_byte(first: u64, j: usize) -> u8 {
    let s = first + (j / 512) as u64;
    let i = j % 512;
    match i {
        0..8 => b"VHOSTILE"[i],
        8..16 => s.to_le_bytes()[i - 8],
        _ => (s.wrapping_mul(31).wrapping_add(i as u64 * 7) as u8) ^ 0x5a,
    }
}

/// The device's registers (its virtio-mmio window).
struct Regs(*mut u32);

impl Regs {
    fn r(&self, off: u64) -> u32 {
        // SAFETY: the window comes from the attached manifest entry (the
        // host maps its 4 KiB user read-write); `off` is a register
        // offset below 0x200, 4-aligned.
        unsafe { self.0.add(off as usize / 4).read_volatile() }
    }
    fn w(&self, off: u64, v: u32) {
        // SAFETY: as in `r`.
        unsafe { self.0.add(off as usize / 4).write_volatile(v) }
    }
}

/// What the device did with a case.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// A used entry: head `id`, `len` bytes, the status byte then read.
    Used { id: u32, len: u32, status: u8 },
    /// `DEVICE_NEEDS_RESET` in the status register (and, for a queue
    /// made ready, QueueReady reads 0).
    NeedsReset,
    /// A queue made ready was accepted (QueueReady reads 1).
    Accepted { status: u32 },
    /// Nothing within the time allowed.
    Silence,
}

fn status_name(s: u8) -> String {
    match s {
        S_OK => "OK".into(),
        S_IOERR => "IOERR".into(),
        S_UNSUPP => "UNSUPP".into(),
        0xff => "no status written".into(),
        s => format!("status {s:#x}"),
    }
}

impl core::fmt::Display for Answer {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            // An error answer writes nothing but the status byte.
            Answer::Used {
                id: 0,
                len: 1,
                status,
            } => f.write_str(&status_name(status)),
            Answer::Used { id, len, status } => {
                write!(f, "{} (used id {id}, len {len})", status_name(status))
            }
            Answer::NeedsReset => f.write_str("DEVICE_NEEDS_RESET"),
            Answer::Accepted { status } => {
                write!(f, "queue accepted (QueueReady 1, status {status:#x})")
            }
            Answer::Silence => f.write_str("no answer"),
        }
    }
}

/// What a case expects.
#[derive(Clone, Copy)]
enum Expect {
    /// This status byte, head 0, used length 1.
    Status(u8),
    NeedsReset,
    Silence,
}

impl Expect {
    fn answer(self) -> Answer {
        match self {
            Expect::Status(status) => Answer::Used {
                id: 0,
                len: 1,
                status,
            },
            Expect::NeedsReset => Answer::NeedsReset,
            Expect::Silence => Answer::Silence,
        }
    }
}

/// The device, and where the interesting addresses are.
struct Dev {
    regs: Regs,
    avail_idx: u16,
    last_used: u16,
    /// Capacity in 512-byte sectors.
    capacity: u64,
    /// End of guest RAM.
    mem: u64,
    /// A page of this image's code (the one holding `app_main`).
    text: u64,
    /// The first page of its read-only data.
    rodata: u64,
    /// The first page of its supervisor-only region.
    kernel: u64,
    /// The tender's boot info page (manifest, under tt-host).
    boot: u64,
}

/// Where the write in flight at a reset goes: the image then holds the
/// good pattern there, or what it held before.
const IN_FLIGHT_SECTOR: u64 = 48;

/// tt-host's page tables start here (docs/ABI.md: GDT and page tables in
/// 0x0-0x7ffff; the PML4 is at 0x2000).
const PAGE_TABLES: u64 = 0x2000;

impl Dev {
    /// Write 0 to Status, wait for it to read 0, and clear the rings.
    fn reset(&mut self) -> Result<(), String> {
        self.regs.w(STATUS, 0);
        let t0 = monotonic_ns();
        while self.regs.r(STATUS) != 0 {
            if monotonic_ns() - t0 > 1_000_000_000 {
                return Err("the device did not reset".into());
            }
            tt_guest::hypercall::poll(1_000_000);
        }
        for off in (0..BUF_W).step_by(8) {
            put::<u64>(off, 0);
        }
        self.avail_idx = 0;
        self.last_used = 0;
        Ok(())
    }

    /// Reset, ACKNOWLEDGE, DRIVER, features (VERSION_1 and FLUSH),
    /// FEATURES_OK; returns the status so far.
    fn negotiate(&mut self) -> Result<u32, String> {
        self.reset()?;
        let mut st = ACKNOWLEDGE | DRIVER;
        self.regs.w(STATUS, ACKNOWLEDGE);
        self.regs.w(STATUS, st);
        let mut offered = 0u64;
        for sel in 0..2u32 {
            self.regs.w(DEVICE_FEATURES_SEL, sel);
            offered |= u64::from(self.regs.r(DEVICE_FEATURES)) << (32 * sel);
        }
        let want = (1u64 << F_VERSION_1) | (1 << BLK_F_FLUSH);
        if offered & want != want {
            return Err(format!("the device offers features {offered:#x}"));
        }
        for sel in 0..2u32 {
            self.regs.w(DRIVER_FEATURES_SEL, sel);
            self.regs.w(DRIVER_FEATURES, (want >> (32 * sel)) as u32);
        }
        st |= FEATURES_OK;
        self.regs.w(STATUS, st);
        if self.regs.r(STATUS) & FEATURES_OK == 0 {
            return Err("the device refused FEATURES_OK".into());
        }
        Ok(st)
    }

    /// Set queue 0 to size Q at these addresses and write QueueReady 1.
    fn queue(&mut self, desc: u64, avail: u64, used: u64) -> Result<Answer, String> {
        self.regs.w(QUEUE_SEL, 0);
        let max = self.regs.r(QUEUE_NUM_MAX);
        if max < u32::from(Q) {
            return Err(format!("QueueNumMax is {max}"));
        }
        self.regs.w(QUEUE_NUM, u32::from(Q));
        for (low, high, a) in [
            (QUEUE_DESC_LOW, QUEUE_DESC_HIGH, desc),
            (QUEUE_DRIVER_LOW, QUEUE_DRIVER_HIGH, avail),
            (QUEUE_DEVICE_LOW, QUEUE_DEVICE_HIGH, used),
        ] {
            self.regs.w(low, a as u32);
            self.regs.w(high, (a >> 32) as u32);
        }
        fence(Ordering::SeqCst);
        self.regs.w(QUEUE_READY, 1);
        let ready = self.regs.r(QUEUE_READY);
        let status = self.regs.r(STATUS);
        Ok(match (ready, status & DEVICE_NEEDS_RESET != 0) {
            (0, true) => Answer::NeedsReset,
            (0, false) => Answer::Silence,
            _ => Answer::Accepted { status },
        })
    }

    /// A fresh, live device with its queue in [`AREA`].
    fn start(&mut self) -> Result<(), String> {
        let st = self.negotiate()?;
        match self.queue(addr(DESC), addr(AVAIL), addr(USED))? {
            Answer::Accepted { .. } => {}
            a => return Err(format!("a good queue was refused: {a}")),
        }
        self.regs.w(STATUS, st | DRIVER_OK);
        let s = self.regs.r(STATUS);
        if s & (DEVICE_NEEDS_RESET | FAILED) != 0 || s & DRIVER_OK == 0 {
            return Err(format!("status {s:#x} after DRIVER_OK"));
        }
        let lo = u64::from(self.regs.r(CONFIG + CONFIG_CAPACITY));
        let hi = u64::from(self.regs.r(CONFIG + CONFIG_CAPACITY + 4));
        self.capacity = lo | hi << 32;
        Ok(())
    }

    /// Descriptor `i` of the table in AREA.
    fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let o = DESC + 16 * usize::from(i);
        put::<u64>(o, addr);
        put::<u32>(o + 8, len);
        put::<u16>(o + 12, flags);
        put::<u16>(o + 14, next);
    }

    /// Entry `i` of the indirect table in AREA.
    fn indirect(&self, i: usize, addr: u64, len: u32, flags: u16, next: u16) {
        let o = INDIRECT + 16 * i;
        put::<u64>(o, addr);
        put::<u32>(o + 8, len);
        put::<u16>(o + 12, flags);
        put::<u16>(o + 14, next);
    }

    /// Head `head`'s request header, and its status byte set to 0xff.
    fn header(&self, head: u16, ty: u32, sector: u64) -> u64 {
        let o = HDR + 16 * usize::from(head);
        put::<u32>(o, ty);
        put::<u32>(o + 4, 0);
        put::<u64>(o + 8, sector);
        put::<u8>(STATUS_BYTE + usize::from(head), 0xff);
        addr(o)
    }

    fn status_addr(&self, head: u16) -> u64 {
        addr(STATUS_BYTE + usize::from(head))
    }

    /// The usual chain in descriptors head..head+2: header, one data
    /// buffer with `flags`, status byte.
    fn chain(&self, head: u16, ty: u32, sector: u64, data: u64, len: u32, flags: u16) {
        let h = self.header(head, ty, sector);
        self.desc(head, h, 16, DESC_F_NEXT, head + 1);
        self.desc(head + 1, data, len, flags | DESC_F_NEXT, head + 2);
        self.desc(head + 2, self.status_addr(head), 1, DESC_F_WRITE, 0);
    }

    /// Put `head` in the available ring, publish it, kick.
    fn offer(&mut self, head: u16) {
        put::<u16>(AVAIL + 4 + 2 * usize::from(self.avail_idx % Q), head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        fence(Ordering::SeqCst);
        put::<u16>(AVAIL + 2, self.avail_idx);
        fence(Ordering::SeqCst);
        self.regs.w(QUEUE_NOTIFY, 0);
    }

    /// The next used entry, DEVICE_NEEDS_RESET, or nothing within
    /// `timeout_ns`.
    fn wait(&mut self, timeout_ns: u64) -> Answer {
        self.wait_for(timeout_ns, true)
    }

    /// The next used entry, or nothing within `timeout_ns`; with
    /// `status`, DEVICE_NEEDS_RESET ends the wait too.
    fn wait_for(&mut self, timeout_ns: u64, status: bool) -> Answer {
        let t0 = monotonic_ns();
        loop {
            if get::<u16>(USED + 2) != self.last_used {
                fence(Ordering::SeqCst);
                let o = USED + 4 + 8 * usize::from(self.last_used % Q);
                let (id, len) = (get::<u32>(o), get::<u32>(o + 4));
                self.last_used = self.last_used.wrapping_add(1);
                let status = if id < u32::from(Q) {
                    get::<u8>(STATUS_BYTE + id as usize)
                } else {
                    0xfe
                };
                return Answer::Used { id, len, status };
            }
            if status && self.regs.r(STATUS) & DEVICE_NEEDS_RESET != 0 {
                return Answer::NeedsReset;
            }
            if monotonic_ns() - t0 >= timeout_ns {
                return Answer::Silence;
            }
            tt_guest::hypercall::poll(1_000_000);
        }
    }

    /// Start, build the usual chain at head 0, offer it, wait.
    fn request(&mut self, ty: u32, sector: u64, data: u64, len: u32, flags: u16) -> Run {
        self.start()?;
        self.chain(0, ty, sector, data, len, flags);
        self.offer(0);
        Ok(self.wait(ANSWER_NS))
    }

    /// A read (device-writable data) of `len` bytes at sector 0 into `data`.
    fn read_into(&mut self, data: u64, len: u32) -> Run {
        self.request(T_IN, 0, data, len, DESC_F_WRITE)
    }

    /// A write of `len` bytes from `data` at `sector`.
    fn write_from(&mut self, sector: u64, data: u64, len: u32) -> Run {
        self.request(T_OUT, sector, data, len, 0)
    }

    /// Negotiate, then offer a queue at these addresses.
    fn rings(&mut self, desc: u64, avail: u64, used: u64) -> Run {
        self.negotiate()?;
        self.queue(desc, avail, used)
    }

    /// After a reset: write the good pattern at `sector` and read it back.
    fn good(&mut self, sector: u64) -> Result<(), String> {
        self.start()?;
        for j in 0..BLOCK {
            put::<u8>(BUF_W + j, good_byte(sector, j));
            put::<u8>(BUF_R + j, 0);
        }
        self.chain(0, T_OUT, sector, addr(BUF_W), BLOCK as u32, 0);
        self.offer(0);
        match self.wait(ANSWER_NS) {
            Answer::Used {
                id: 0,
                status: S_OK,
                ..
            } => {}
            a => return Err(format!("write: {a}")),
        }
        self.chain(0, T_IN, sector, addr(BUF_R), BLOCK as u32, DESC_F_WRITE);
        self.offer(0);
        match self.wait(ANSWER_NS) {
            Answer::Used {
                id: 0,
                status: S_OK,
                len,
            } if len == BLOCK as u32 + 1 => {}
            a => return Err(format!("read: {a}")),
        }
        match (0..BLOCK).find(|&j| get::<u8>(BUF_R + j) != good_byte(sector, j)) {
            None => Ok(()),
            Some(j) => Err(format!("read back differs at byte {j}")),
        }
    }
}

type Run = Result<Answer, String>;

struct Case {
    name: &'static str,
    expect: Expect,
    run: fn(&mut Dev) -> Run,
}

const IOERR: Expect = Expect::Status(S_IOERR);
const RESET: Expect = Expect::NeedsReset;

/// The cases, in order; tests/tests/virtio_hostile.rs lists the same.
fn cases() -> Vec<Case> {
    fn c(name: &'static str, expect: Expect, run: fn(&mut Dev) -> Run) -> Case {
        Case { name, expect, run }
    }
    let mut v = Vec::new();
    // Descriptor chains that do not end.
    v.push(c("descriptor loop", RESET, |d: &mut Dev| {
        d.start()?;
        let h = d.header(0, T_OUT, 0);
        d.desc(0, h, 16, DESC_F_NEXT, 1);
        d.desc(1, addr(BUF_W), 512, DESC_F_NEXT, 2);
        d.desc(2, addr(BUF_W + 512), 512, DESC_F_NEXT, 1);
        d.offer(0);
        Ok(d.wait(ANSWER_NS))
    }));
    v.push(c("chain longer than the queue", RESET, |d: &mut Dev| {
        d.start()?;
        let h = d.header(0, T_OUT, 0);
        d.desc(0, h, 16, DESC_F_NEXT, 1);
        for i in 1..Q {
            // Every descriptor, the last pointing back to the head.
            d.desc(i, addr(BUF_W), 512, DESC_F_NEXT, (i + 1) % Q);
        }
        d.offer(0);
        Ok(d.wait(ANSWER_NS))
    }));
    v.push(c("next outside the table", RESET, |d: &mut Dev| {
        d.start()?;
        let h = d.header(0, T_OUT, 0);
        d.desc(0, h, 16, DESC_F_NEXT, 1);
        d.desc(1, addr(BUF_W), 512, DESC_F_NEXT, Q);
        d.offer(0);
        Ok(d.wait(ANSWER_NS))
    }));
    v.push(c("indirect table with a loop", RESET, |d: &mut Dev| {
        // VIRTIO_F_INDIRECT_DESC is not offered; a loop inside the table
        // must still end the chain.
        d.start()?;
        let h = d.header(0, T_OUT, 0);
        d.indirect(0, h, 16, DESC_F_NEXT, 1);
        d.indirect(1, addr(BUF_W), 512, DESC_F_NEXT, 2);
        d.indirect(2, addr(BUF_W), 512, DESC_F_NEXT, 1);
        d.desc(0, addr(INDIRECT), 3 * 16, DESC_F_INDIRECT, 0);
        d.offer(0);
        Ok(d.wait(ANSWER_NS))
    }));
    v.push(c("indirect table outside RAM", RESET, |d: &mut Dev| {
        d.start()?;
        d.desc(0, d.mem, 3 * 16, DESC_F_INDIRECT, 0);
        d.offer(0);
        Ok(d.wait(ANSWER_NS))
    }));
    v.push(c(
        "data lengths past 4 GiB in total",
        RESET,
        |d: &mut Dev| {
            // virtio-queue stops walking a chain of 2^32 bytes or more.
            d.start()?;
            let h = d.header(0, T_OUT, 0);
            d.desc(0, h, 16, DESC_F_NEXT, 1);
            d.desc(1, addr(BUF_W), 0x8000_0000, DESC_F_NEXT, 2);
            d.desc(2, addr(BUF_W), 0x8000_0000, DESC_F_NEXT, 3);
            d.desc(3, d.status_addr(0), 1, DESC_F_WRITE, 0);
            d.offer(0);
            Ok(d.wait(ANSWER_NS))
        },
    ));
    // The available ring.
    v.push(c("head index >= queue size", RESET, |d: &mut Dev| {
        d.start()?;
        d.chain(0, T_OUT, 0, addr(BUF_W), 512, 0);
        d.offer(Q);
        Ok(d.wait(ANSWER_NS))
    }));
    v.push(c(
        "avail index more than a queue ahead",
        RESET,
        |d: &mut Dev| {
            d.start()?;
            for i in 0..Q {
                put::<u16>(AVAIL + 4 + 2 * usize::from(i), 0);
            }
            d.chain(0, T_OUT, 0, addr(BUF_W), 512, 0);
            d.avail_idx = Q;
            d.offer(0); // avail.idx = Q + 1
            Ok(d.wait(ANSWER_NS))
        },
    ));
    // Status bytes the device cannot or must not write.
    v.push(c("status in a device-readable descriptor", RESET, |d| {
        d.start()?;
        d.chain(0, T_OUT, 0, addr(BUF_W), BLOCK as u32, 0);
        d.desc(2, d.status_addr(0), 1, 0, 0);
        d.offer(0);
        Ok(d.wait(ANSWER_NS))
    }));
    v.push(c("status byte outside RAM", RESET, |d| {
        d.start()?;
        d.chain(0, T_OUT, 0, addr(BUF_W), BLOCK as u32, 0);
        d.desc(2, d.mem, 1, DESC_F_WRITE, 0);
        d.offer(0);
        Ok(d.wait(ANSWER_NS))
    }));
    v.push(c("status byte over .text", RESET, |d| {
        d.start()?;
        d.chain(0, T_IN, 0, addr(BUF_R), BLOCK as u32, DESC_F_WRITE);
        d.desc(2, d.text, 1, DESC_F_WRITE, 0);
        d.offer(0);
        Ok(d.wait(ANSWER_NS))
    }));
    v.push(c("status byte over the boot info page", RESET, |d| {
        d.start()?;
        d.chain(0, T_IN, 0, addr(BUF_R), BLOCK as u32, DESC_F_WRITE);
        d.desc(2, d.boot + 0x40, 1, DESC_F_WRITE, 0);
        d.offer(0);
        Ok(d.wait(ANSWER_NS))
    }));
    // Data buffers outside RAM or past 2^64.
    v.push(c("read into a buffer outside RAM", IOERR, |d| {
        d.read_into(d.mem, BLOCK as u32)
    }));
    v.push(c("read into a buffer across the end of RAM", IOERR, |d| {
        d.read_into(d.mem - 2048, BLOCK as u32)
    }));
    v.push(c("read whose address + length pass 2^64", IOERR, |d| {
        d.read_into(0xffff_ffff_ffff_f000, 0x2000)
    }));
    v.push(c("write whose address + length pass 2^64", IOERR, |d| {
        d.write_from(0, 0xffff_ffff_ffff_f000, 0x2000)
    }));
    // Data buffers over what the device must not touch.
    v.push(c("read into .text", IOERR, |d| {
        d.read_into(d.text, BLOCK as u32)
    }));
    v.push(c("read into .rodata", IOERR, |d| {
        d.read_into(d.rodata, BLOCK as u32)
    }));
    v.push(c("read into the supervisor-only region", IOERR, |d| {
        d.read_into(d.kernel, BLOCK as u32)
    }));
    v.push(c("read into page 0 and the GDT", IOERR, |d| {
        d.read_into(0, BLOCK as u32)
    }));
    v.push(c("read into tt-host's page tables", IOERR, |d| {
        d.read_into(PAGE_TABLES, BLOCK as u32)
    }));
    v.push(c("read into the boot info page", IOERR, |d| {
        d.read_into(d.boot, BLOCK as u32)
    }));
    v.push(c(
        "read across 1 MiB (tender's page, then .text)",
        IOERR,
        |d| {
            // 0xff000-0x100fff: the tender's memory, then the image's text.
            d.read_into(0xf_f000, 2 * BLOCK as u32)
        },
    ));
    v.push(c("write from .text", IOERR, |d| {
        d.write_from(8, d.text, BLOCK as u32)
    }));
    // Malformed requests with a good status byte.
    v.push(c("write with device-writable data", IOERR, |d| {
        d.request(T_OUT, 8, addr(BUF_W), BLOCK as u32, DESC_F_WRITE)
    }));
    v.push(c("read with device-readable data", IOERR, |d| {
        d.request(T_IN, 8, addr(BUF_R), BLOCK as u32, 0)
    }));
    v.push(c("write at a sector beyond capacity", IOERR, |d| {
        let s = d.capacity;
        d.write_from(s, addr(BUF_W), BLOCK as u32)
    }));
    v.push(c("write across the end of the disk", IOERR, |d| {
        let s = d.capacity - 4;
        d.write_from(s, addr(BUF_W), BLOCK as u32)
    }));
    v.push(c("write whose sector * 512 overflows", IOERR, |d| {
        d.write_from(1 << 56, addr(BUF_W), BLOCK as u32)
    }));
    v.push(c("write of 1000 bytes", IOERR, |d| {
        d.write_from(16, addr(BUF_W), 1000)
    }));
    v.push(c("read of 1000 bytes", IOERR, |d| {
        d.request(T_IN, 16, addr(BUF_R), 1000, DESC_F_WRITE)
    }));
    v.push(c("header in a device-writable descriptor", IOERR, |d| {
        d.start()?;
        d.chain(0, T_OUT, 16, addr(BUF_W), BLOCK as u32, 0);
        d.desc(0, addr(HDR), 16, DESC_F_NEXT | DESC_F_WRITE, 1);
        d.offer(0);
        Ok(d.wait(ANSWER_NS))
    }));
    v.push(c("unknown request type", Expect::Status(S_UNSUPP), |d| {
        d.request(0x7f, 16, addr(BUF_W), BLOCK as u32, 0)
    }));
    // Queues placed where the device must not go: QueueReady refused.
    v.push(c("descriptor table outside RAM", RESET, |d| {
        d.rings(d.mem, addr(AVAIL), addr(USED))
    }));
    v.push(c("descriptor table over .text", RESET, |d| {
        d.rings(d.text, addr(AVAIL), addr(USED))
    }));
    v.push(c("available ring over .text", RESET, |d| {
        d.rings(addr(DESC), d.text, addr(USED))
    }));
    v.push(c("used ring over .text", RESET, |d| {
        d.rings(addr(DESC), addr(AVAIL), d.text)
    }));
    v.push(c("used ring over tt-host's page tables", RESET, |d| {
        d.rings(addr(DESC), addr(AVAIL), PAGE_TABLES)
    }));
    v.push(c("used ring over the boot info page", RESET, |d| {
        d.rings(addr(DESC), addr(AVAIL), d.boot)
    }));
    v.push(c("used ring across the end of RAM", RESET, |d| {
        d.rings(addr(DESC), addr(AVAIL), d.mem - 8)
    }));
    v.push(c("used ring whose end passes 2^64", RESET, |d| {
        d.rings(addr(DESC), addr(AVAIL), 0xffff_ffff_ffff_fff0)
    }));
    v.push(c("misaligned descriptor table", RESET, |d| {
        d.rings(addr(DESC + 8), addr(AVAIL), addr(USED))
    }));
    // A device that needs a reset serves nothing more.
    v.push(c(
        "good write while DEVICE_NEEDS_RESET",
        Expect::Silence,
        |d| {
            d.start()?;
            let h = d.header(0, T_OUT, 0);
            d.desc(0, h, 16, DESC_F_NEXT, 0);
            d.offer(0);
            match d.wait(ANSWER_NS) {
                Answer::NeedsReset => {}
                a => return Err(format!("a self-loop got {a}, not DEVICE_NEEDS_RESET")),
            }
            d.chain(3, T_OUT, 24, addr(BUF_W), BLOCK as u32, 0);
            d.offer(3);
            Ok(d.wait_for(SILENCE_NS, false))
        },
    ));
    // A reset with a request in flight: its completion must not reach
    // the queue set up after the reset.
    v.push(c("reset with a write in flight", Expect::Silence, |d| {
        d.start()?;
        for j in 0..BLOCK {
            put::<u8>(BUF_W + j, good_byte(IN_FLIGHT_SECTOR, j));
        }
        d.chain(0, T_OUT, IN_FLIGHT_SECTOR, addr(BUF_W), BLOCK as u32, 0);
        d.offer(0);
        d.start()?;
        Ok(d.wait(SILENCE_NS))
    }));
    v
}

fn app_main() -> i32 {
    match run() {
        Ok(()) => {
            println!("vhostile: OK");
            0
        }
        Err(e) => {
            println!("vhostile: FAILED {}", e);
            1
        }
    }
}

fn run() -> Result<(), String> {
    let (_, entry) =
        manifest::find("disk", MFT_TT_VIRTIO_BLK).map_err(|e| format!("device \"disk\": {e}"))?;
    let v = entry.virtio();
    let (base, size) = (v.mmio_base, v.mmio_size);
    if base == 0 || base % 4096 != 0 || size < 0x200 {
        return Err(format!("unusable register window {base:#x}+{size:#x}"));
    }
    let regs = Regs(base as usize as *mut u32);
    if regs.r(MAGIC_VALUE) != MAGIC
        || regs.r(VERSION) != VERSION_2
        || regs.r(DEVICE_ID) != BLK_DEVICE_ID
    {
        return Err("no virtio-mmio v2 block device in the window".into());
    }
    let text_start = addr_of!(_stext) as u64;
    let ro_end = addr_of!(_erodata) as u64;
    let boot = tt_guest::boot::boot_info().mft & !0xfff;
    let mut d = Dev {
        regs,
        avail_idx: 0,
        last_used: 0,
        capacity: 0,
        mem: tt_guest::boot::mem_size(),
        text: app_main as *const () as u64 & !0xfff,
        rodata: addr_of!(_etext) as u64,
        kernel: addr_of!(_skernel) as u64,
        boot,
    };
    if !(text_start..d.rodata).contains(&d.text) {
        return Err(format!("app_main at {:#x} is not in .text", d.text));
    }
    d.start()?;
    println!(
        "vhostile: capacity {} sectors, RAM {:#x}, .text page {:#x}, boot info page {:#x}",
        d.capacity, d.mem, d.text, d.boot
    );
    let code_sum = checksum(text_start, ro_end - text_start);
    let boot_sum = checksum(boot, 0x4000);

    let mut failed = Vec::new();
    for (k, case) in cases().into_iter().enumerate() {
        for j in (0..BLOCK).step_by(8) {
            put::<[u8; 8]>(BUF_W + j, *b"HOSTILE!");
        }
        let (answer, matched) = match (case.run)(&mut d) {
            Ok(a) => (format!("{a}"), a == case.expect.answer()),
            Err(e) => (format!("setup failed: {e}"), false),
        };
        let sector = 64 + 8 * k as u64;
        let good = match d.good(sector) {
            Ok(()) => "ok".into(),
            Err(e) => {
                failed.push(case.name);
                format!("FAILED: {e}")
            }
        };
        if !matched && failed.last() != Some(&case.name) {
            failed.push(case.name);
        }
        println!(
            "vhostile: [{:02}] {} -> {} (expected {}) {}; good write+read at sector {}: {}",
            k,
            case.name,
            answer,
            case.expect.answer(),
            if matched { "match" } else { "MISMATCH" },
            sector,
            good
        );
    }
    d.reset()?;

    let code_now = checksum(text_start, ro_end - text_start);
    if code_now == code_sum {
        println!(
            "vhostile: .text and .rodata unchanged ({} bytes)",
            ro_end - text_start
        );
    } else {
        failed.push(".text/.rodata changed");
    }
    if checksum(boot, 0x4000) == boot_sum {
        println!("vhostile: boot info, manifest and command line unchanged");
    } else {
        failed.push("boot info pages changed");
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("{} failed: {}", failed.len(), failed.join(", ")))
    }
}
