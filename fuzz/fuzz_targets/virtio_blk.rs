//! Fuzz the virtio-blk device and its virtio-mmio transport with
//! arbitrary guest memory, register accesses and queue processing.
//!
//! Everything the guest controls is fuzzed: the contents of guest memory
//! (descriptor tables, rings, request headers, buffers), every register
//! write (features, queue size and addresses, status, notify) and the
//! order of kicks. The device serves an in-memory disk through the plain
//! backend (requests complete during the kick). After every operation:
//!
//! - nothing panicked;
//! - guest memory changed only where the guest wrote (a memory
//!   operation), in the used ring, or inside a device-writable descriptor
//!   of a chain that the operation completed (a new used entry);
//! - the forbidden range given to the device never changed;
//! - the disk changed only inside the range of an OUT request completed
//!   by the operation;
//! - a kick leaves nothing in flight, and unless the device flagged
//!   DEVICE_NEEDS_RESET, every chain it took has a new used entry whose
//!   status byte is OK, IOERR or UNSUPP.
//!
//! Input: byte 0 picks the queue size the bring-up operation writes
//! (2 << (b % 4)) and byte 1 the disk's size in 512-byte sectors
//! (1 + b % 64); byte 2 the number N of operations (N % 32); then N
//! 7-byte operations `[tag, a, b, v0, v1, v2, v3]` (see `step`); the
//! rest, up to `MEM` bytes, is guest memory from address 0.

#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::{Arc, Mutex};
use tt_host::block::{FileBackend, Geometry, Image, Info};
use tt_host::devices::virtio::blk::VirtioBlk;
use tt_host::devices::virtio::mmio;
use tt_host::devices::virtio::{status, Forbidden, MmioDevice};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: u64 = 0x8000;
const QUEUE_MAX: u16 = 16;
/// Guest memory the device must never touch.
const FORBIDDEN: Forbidden = Forbidden {
    start: 0x6000,
    len: 0x800,
};
/// Where the bring-up operation puts the rings.
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x400;
const USED: u64 = 0x800;

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

fn snapshot(mem: &GuestMemoryMmap) -> Vec<u8> {
    let mut v = vec![0u8; MEM as usize];
    mem.read_slice(&mut v, GuestAddress(0)).unwrap();
    v
}

fn w32(d: &mut VirtioBlk, off: u64, v: u32) {
    d.write(off, &v.to_le_bytes());
}

/// A byte range `[start, end)`, computed without overflow.
fn range(addr: u64, len: u64) -> (u64, u64) {
    (addr, addr.saturating_add(len))
}

fn u16_at(m: &[u8], a: u64) -> Option<u16> {
    let a = usize::try_from(a).ok()?;
    Some(u16::from_le_bytes([*m.get(a)?, *m.get(a + 1)?]))
}
fn u32_at(m: &[u8], a: u64) -> Option<u32> {
    let a = usize::try_from(a).ok()?;
    Some(u32::from_le_bytes(
        m.get(a..a.checked_add(4)?)?.try_into().ok()?,
    ))
}
fn u64_at(m: &[u8], a: u64) -> Option<u64> {
    let a = usize::try_from(a).ok()?;
    Some(u64::from_le_bytes(
        m.get(a..a.checked_add(8)?)?.try_into().ok()?,
    ))
}

/// A descriptor: (addr, len, flags, next).
fn desc(m: &[u8], table: u64, i: u64) -> Option<(u64, u32, u16, u16)> {
    let at = table.checked_add(16 * i)?;
    Some((
        u64_at(m, at)?,
        u32_at(m, at + 8)?,
        u16_at(m, at + 12)?,
        u16_at(m, at + 14)?,
    ))
}

/// The descriptors of the chain at `head`, as virtio-queue walks it
/// (following one level of indirect table), in memory `m`.
fn walk(m: &[u8], table: u64, size: u16, head: u16) -> Vec<(u64, u32, u16)> {
    let mut out = Vec::new();
    let (mut table, mut size, mut next) = (table, u64::from(size), u64::from(head));
    let mut ttl = size;
    let mut indirect = false;
    while ttl > 0 && next < size {
        let Some((addr, len, flags, n)) = desc(m, table, next) else {
            break;
        };
        if flags & 4 != 0 {
            if indirect || len % 16 != 0 {
                break;
            }
            indirect = true;
            table = addr;
            size = u64::from(len / 16);
            next = 0;
            ttl = size;
            continue;
        }
        out.push((addr, len, flags));
        if flags & 1 != 0 {
            next = u64::from(n);
            ttl -= 1;
        } else {
            break;
        }
    }
    out
}

fn used_idx(m: &[u8], layout: Option<(u64, u64, u64, u16)>) -> Option<u16> {
    layout.and_then(|(_, _, used, _)| u16_at(m, used.checked_add(2)?))
}

fuzz_target!(|data: &[u8]| {
    let [b0, b1, n, rest @ ..] = data else {
        return;
    };
    let qsize = 2u32 << (b0 % 4);
    let disk = Arc::new(Mutex::new(
        (0..512 * (1 + u64::from(*b1) % 64))
            .map(|i| (i * 7) as u8)
            .collect::<Vec<u8>>(),
    ));
    let (ops, window) = rest.split_at(rest.len().min(7 * (*n as usize % 32)));
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
    mem.write_slice(&window[..window.len().min(MEM as usize)], GuestAddress(0))
        .unwrap();
    let capacity = disk.lock().unwrap().len() as u64;
    let info = Info {
        name: "fuzz".into(),
        geometry: Geometry {
            capacity,
            sector_size: 512,
        },
        id: *b"fuzz-id-0123456789ab",
        durable_writes: false,
        max_atomic_write: 512,
    };
    let backend = FileBackend::new(info, Arc::new(Disk(disk.clone()))).unwrap();
    let mut dev = VirtioBlk::new(Box::new(backend), QUEUE_MAX, vec![FORBIDDEN]).unwrap();
    dev.attach_memory(mem.clone());
    let forbidden_before = snapshot(&mem)
        [FORBIDDEN.start as usize..(FORBIDDEN.start + FORBIDDEN.len) as usize]
        .to_vec();

    for op in ops.chunks_exact(7) {
        let before = snapshot(&mem);
        let disk_before = disk.lock().unwrap().clone();
        let layout_before = dev.queue();
        let used_before = used_idx(&before, layout_before);
        let mut allowed: Vec<(u64, u64)> = Vec::new();
        let mut kicked = None;

        let (tag, a, b) = (op[0], op[1], op[2]);
        let v = u32::from_le_bytes([op[3], op[4], op[5], op[6]]);
        match tag % 8 {
            // A register write: aligned 32-bit, or any size anywhere.
            0 => w32(&mut dev, u64::from(a) * 4, v),
            1 => {
                let len = 1 + (b as usize % 8);
                dev.write(u64::from(a) | (u64::from(b) << 8), &op[3..3 + len.min(4)]);
            }
            // A register read of any size.
            2 => {
                let mut buf = [0u8; 8];
                let len = 1 + (b as usize % 8);
                dev.read(u64::from(a) | (u64::from(b) << 8), &mut buf[..len]);
            }
            // A well-behaved bring-up (features from v), so that the
            // fuzzer reaches request parsing quickly.
            3 => {
                w32(&mut dev, mmio::STATUS, 0);
                w32(&mut dev, mmio::STATUS, status::ACKNOWLEDGE | status::DRIVER);
                w32(&mut dev, mmio::DRIVER_FEATURES_SEL, 0);
                w32(
                    &mut dev,
                    mmio::DRIVER_FEATURES,
                    v & (1 << 29 | 1 << 9 | 1 << 6 | 1 << 2),
                );
                w32(&mut dev, mmio::DRIVER_FEATURES_SEL, 1);
                w32(&mut dev, mmio::DRIVER_FEATURES, 1);
                let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
                w32(&mut dev, mmio::STATUS, s);
                w32(&mut dev, mmio::QUEUE_NUM, qsize);
                w32(&mut dev, mmio::QUEUE_DESC_LOW, DESC as u32);
                w32(&mut dev, mmio::QUEUE_DRIVER_LOW, AVAIL as u32);
                w32(&mut dev, mmio::QUEUE_DEVICE_LOW, USED as u32);
                w32(&mut dev, mmio::QUEUE_READY, 1);
                w32(&mut dev, mmio::STATUS, s | status::DRIVER_OK);
                // DRIVER_OK serves what is already available.
                kicked = Some(usize::MAX);
            }
            // A kick from the notify eventfd (the device thread's path).
            4 => {
                let taken = dev.process_queue();
                dev.reap();
                kicked = Some(taken);
            }
            // A QueueNotify MMIO write (no ioeventfd).
            5 => {
                w32(&mut dev, mmio::QUEUE_NOTIFY, u32::from(a % 2));
                kicked = Some(usize::MAX);
            }
            // The guest writes 4 bytes of its memory.
            6 => {
                let at = (u64::from(a) | (u64::from(b) << 8)) % (MEM - 4);
                if !FORBIDDEN.overlaps(at, 4) {
                    mem.write_slice(&op[3..7], GuestAddress(at)).unwrap();
                    allowed.push(range(at, 4));
                }
            }
            // A reset.
            _ => w32(&mut dev, mmio::STATUS, 0),
        }

        let after = snapshot(&mem);
        let layout = dev.queue().or(layout_before);
        assert_eq!(dev.in_flight(), 0, "the plain backend completes at once");

        // The used ring (with avail_event) may change.
        for (_, _, used, size) in [layout_before, dev.queue()].into_iter().flatten() {
            allowed.push(range(used, 6 + 8 * u64::from(size)));
        }
        // New used entries: the chains completed by this operation.
        let mut heads = Vec::new();
        // The device counts used entries from 0 after a (re)start.
        let ub = if tag % 8 == 3 || layout_before.is_none() {
            Some(0)
        } else {
            used_before
        };
        if let (Some((d, _, used, size)), Some(ub)) = (layout, ub) {
            let ua = used_idx(&after, layout).unwrap_or(ub);
            let new = ua.wrapping_sub(ub);
            for k in 0..new {
                let slot = u64::from(ub.wrapping_add(k) % size);
                let id = u32_at(&after, used + 4 + 8 * slot).unwrap_or(0);
                heads.push(id as u16);
                for m in [&before, &after] {
                    for (addr, len, flags) in walk(m, d, size, id as u16) {
                        if flags & 2 != 0 {
                            allowed.push(range(addr, u64::from(len)));
                        }
                    }
                }
            }
            // A lone completion's status byte holds a status (unless the
            // device gave up in this step: after DEVICE_NEEDS_RESET the
            // guest must reset it, and which entries are new is not
            // modelled).
            if new == 1 && dev.status() & status::DEVICE_NEEDS_RESET == 0 {
                let h = heads[0];
                let (wb, wa) = (walk(&before, d, size, h), walk(&after, d, size, h));
                if let (true, Some(&(st, _, _))) = (wb == wa, wb.last()) {
                    let code = after.get(st as usize).copied().unwrap_or(0);
                    assert!(code <= 2, "status byte {code} at {st:#x}");
                }
            }
            if let Some(taken) = kicked.filter(|&t| t != usize::MAX) {
                if dev.status() & status::DEVICE_NEEDS_RESET == 0 {
                    assert_eq!(
                        usize::from(new),
                        taken,
                        "a chain taken without a used entry"
                    );
                }
            }
        }
        // A head completed twice in one step was made available again
        // after its first completion, and that completion may have
        // rewritten its own chain (a status byte or read data inside its
        // descriptor or indirect table): the buffers of its second pass
        // are in neither snapshot, so only the forbidden range is checked.
        let mut sorted = heads.clone();
        sorted.sort_unstable();
        let rewritten = sorted.windows(2).any(|w| w[0] == w[1]);
        for (i, (x, y)) in before.iter().zip(&after).enumerate() {
            let i = i as u64;
            if x != y && !rewritten {
                assert!(
                    allowed.iter().any(|&(s, e)| s <= i && i < e),
                    "guest memory at {i:#x} changed outside the request's writable buffers"
                );
            }
        }
        assert_eq!(
            &after[FORBIDDEN.start as usize..(FORBIDDEN.start + FORBIDDEN.len) as usize],
            &forbidden_before[..],
            "the forbidden range changed"
        );

        // The disk changes only inside OUT requests completed now.
        let disk_after = disk.lock().unwrap().clone();
        if disk_after != disk_before {
            let mut outs = Vec::new();
            if let Some((d, _, _, size)) = layout {
                for &h in &heads {
                    for m in [&before, &after] {
                        let chain = walk(m, d, size, h);
                        let Some(&(hdr, _, _)) = chain.first() else {
                            continue;
                        };
                        if u32_at(m, hdr) != Some(1) {
                            continue;
                        }
                        let sector = u64_at(m, hdr + 8).unwrap_or(0);
                        // Data descriptors: between the header and the
                        // status (none in a chain of one or two).
                        let data = chain.get(1..chain.len().saturating_sub(1)).unwrap_or(&[]);
                        let total: u64 = data.iter().map(|c| u64::from(c.1)).sum();
                        outs.push(range(sector.saturating_mul(512), total));
                    }
                }
            }
            for (i, (x, y)) in disk_before.iter().zip(&disk_after).enumerate() {
                let i = i as u64;
                if x != y {
                    assert!(
                        outs.iter().any(|&(s, e)| s <= i && i < e),
                        "disk byte {i:#x} changed outside any OUT request"
                    );
                }
            }
        }
    }
});
