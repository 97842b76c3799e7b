//! Drives the virtio-blk device "disk" with many requests in flight.
//!
//! `vblk [depth=N] [count=M] [seed=S]` (defaults 8, 256, 1): writes M
//! patterned 4 KiB blocks at the start of the disk (block i at sector 8i)
//! keeping N requests in flight, flushes, reads them all back with N in
//! flight and checks the data and every request's status. Prints
//! `vblk: OK` and exits 0, or `vblk: FAIL ...` and exits 1.
//!
//! `vblk ack [depth=N] [count=M] [seed=S] [start=K]` (count 0: for
//! ever): the crash-test writer. Writes 4 KiB blocks at random 4 KiB-aligned
//! offsets (never two in flight at the same offset), numbered from K
//! (default 1), N in flight, and prints `ack N sector=S` once write N has
//! completed with status OK (so, under tt-host's journal, once it is
//! durable). Ends with `vblk: done`.
//!
//! `vblk randwrite [depth=N] [count=M] [seed=S]` (defaults 32, 2000, 1)
//! and `vblk seqread [depth=N] [count=M] [size=B]` (defaults 8, 2048,
//! 65536): the benchmark modes `tt-bench vblk` runs. randwrite writes M
//! 4 KiB blocks at random 4 KiB-aligned offsets (splitmix64, as
//! `blkbench`), N in flight, each carrying only its number (cheap to
//! fill); seqread reads M requests of B bytes in order from the start of
//! the disk, wrapping at its end, N in flight, unchecked. Both time the
//! loop with the TSC and print one line,
//! `vblk: MODE count=C depth=N bytes=B ns=E`, then `vblk: OK`.
//!
//! Every 512-byte sector written holds what the `blkwriter` example
//! writes: the magic `TTWRITE1`, the write's number, the sector's own
//! index on the disk, an FNV-1a 64 checksum of the rest, then bytes
//! derived from the number and index; a crash checker can tell a whole
//! sector of write N from anything else.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use tt_guest::println;
use tt_guest::time::Instant;
use tt_guest::virtio_blk::{Completion, Error, VirtioBlk};

tt_guest::main!(app_main, devices: [virtio_blk "disk"]);

/// Bytes per request.
const BLOCK: usize = 4096;
/// 512-byte sectors per request.
const SECTORS_PER_BLOCK: u64 = (BLOCK / 512) as u64;

/// FNV-1a, 64 bits.
fn fnv(h: u64, bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(h, |h, &b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

const FNV_INIT: u64 = 0xcbf2_9ce4_8422_2325;

/// splitmix64.
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Fill `sector` (512 bytes) as write `n` writes sector `index`.
fn fill_sector(sector: &mut [u8], n: u64, index: u64) {
    sector[0..8].copy_from_slice(b"TTWRITE1");
    sector[8..16].copy_from_slice(&n.to_le_bytes());
    sector[16..24].copy_from_slice(&index.to_le_bytes());
    for (i, b) in sector[32..].iter_mut().enumerate() {
        *b = (n.wrapping_mul(131) ^ index.wrapping_mul(7) ^ i as u64) as u8;
    }
    let sum = fnv(fnv(FNV_INIT, &sector[0..24]), &sector[32..]);
    sector[24..32].copy_from_slice(&sum.to_le_bytes());
}

/// Fill a whole block as write `n` at `sector`.
fn fill(buf: &mut [u8], n: u64, sector: u64) {
    for (i, s) in buf.chunks_mut(512).enumerate() {
        fill_sector(s, n, sector + i as u64);
    }
}

fn arg(key: &str, default: u64) -> Result<u64, String> {
    match tt_guest::boot::arg_value(key) {
        None => Ok(default),
        Some(v) => v
            .parse()
            .map_err(|_| format!("{key}={v}: expected a number")),
    }
}

fn app_main() -> i32 {
    let has = |m: &str| tt_guest::boot::args().any(|a| a == m);
    let r = if has("ack") {
        ack_mode()
    } else if has("randwrite") {
        randwrite_mode()
    } else if has("seqread") {
        seqread_mode()
    } else {
        verify_mode()
    };
    match r {
        Ok(()) => 0,
        Err(e) => {
            println!("vblk: FAIL {}", e);
            1
        }
    }
}

/// Acquire the device and check `depth` fits its queue.
fn open(depth: u64) -> Result<VirtioBlk, String> {
    let disk = VirtioBlk::acquire("disk").map_err(|e| format!("acquire \"disk\": {e}"))?;
    // A read or write takes three descriptors.
    let max = disk.queue_size() as u64 / 3;
    if depth == 0 || depth > max {
        return Err(format!(
            "depth={depth}: must be 1 to {max} (queue of {} descriptors)",
            disk.queue_size()
        ));
    }
    Ok(disk)
}

/// Take completions (blocking until at least one), in `out`; a device or
/// driver error ends the run.
fn wait(disk: &mut VirtioBlk, out: &mut [Completion]) -> Result<usize, String> {
    disk.wait(out).map_err(|e| format!("wait: {e}"))
}

fn verify_mode() -> Result<(), String> {
    let depth = arg("depth", 8)?;
    let count = arg("count", 256)?;
    let seed = arg("seed", 1)?;
    let mut disk = open(depth)?;
    println!(
        "vblk: capacity {} sectors, block size {}, queue {}, depth {}, count {}",
        disk.capacity_sectors(),
        disk.block_size(),
        disk.queue_size(),
        depth,
        count
    );
    if count.saturating_mul(SECTORS_PER_BLOCK) > disk.capacity_sectors() {
        return Err(format!("count={count}: the disk holds fewer 4 KiB blocks"));
    }
    let id = disk.get_id().map_err(|e| format!("get-id: {e}"))?;
    let id: String = id
        .iter()
        .take_while(|&&b| b != 0)
        .map(|&b| if b.is_ascii_graphic() { b as char } else { '.' })
        .collect();
    println!("vblk: id \"{}\"", id);

    let mut out: Vec<Completion> = (0..depth).map(|_| Completion::EMPTY).collect();
    let mut pool: Vec<Vec<u8>> = Vec::new();
    // Write i is number seed + i, so runs with different seeds differ.
    let number = |block: u64| seed.wrapping_add(block);

    let t0 = Instant::now();
    let (mut next_block, mut done) = (0u64, 0u64);
    while done < count {
        while next_block < count && (disk.in_flight() as u64) < depth {
            let mut buf = pool.pop().unwrap_or_else(|| vec![0; BLOCK]);
            let sector = next_block * SECTORS_PER_BLOCK;
            fill(&mut buf, number(next_block), sector);
            disk.submit_write(sector, buf)
                .map_err(|r| format!("submit write at sector {sector}: {}", r.error))?;
            next_block += 1;
        }
        let n = wait(&mut disk, &mut out)?;
        for c in &mut out[..n] {
            c.result
                .map_err(|e| format!("write at sector {}: {e}", c.sector))?;
            pool.push(core::mem::take(&mut c.buf));
            done += 1;
        }
    }
    let write_ms = t0.elapsed().as_millis();
    println!(
        "vblk: wrote {} blocks of {} bytes at depth {} in {} ms",
        count, BLOCK, depth, write_ms
    );

    let t = disk.submit_flush().map_err(|e| format!("flush: {e}"))?;
    let n = wait(&mut disk, &mut out)?;
    if n != 1 || out[0].token != t {
        return Err(format!("flush: {n} completions for one request"));
    }
    out[0].result.map_err(|e| format!("flush: {e}"))?;
    println!("vblk: flushed");

    let t0 = Instant::now();
    let mut expect = vec![0u8; BLOCK];
    let (mut next_block, mut done) = (0u64, 0u64);
    while done < count {
        while next_block < count && (disk.in_flight() as u64) < depth {
            let mut buf = pool.pop().unwrap_or_else(|| vec![0; BLOCK]);
            buf.fill(0);
            let sector = next_block * SECTORS_PER_BLOCK;
            disk.submit_read(sector, buf)
                .map_err(|r| format!("submit read at sector {sector}: {}", r.error))?;
            next_block += 1;
        }
        let n = wait(&mut disk, &mut out)?;
        for c in &mut out[..n] {
            c.result
                .map_err(|e| format!("read at sector {}: {e}", c.sector))?;
            let block = c.sector / SECTORS_PER_BLOCK;
            fill(&mut expect, number(block), c.sector);
            if c.buf != expect {
                let at = c.buf.iter().zip(&expect).position(|(a, b)| a != b);
                return Err(format!(
                    "block {block} (sector {}) read back wrong data (first difference at byte {:?})",
                    c.sector, at
                ));
            }
            pool.push(core::mem::take(&mut c.buf));
            done += 1;
        }
    }
    let read_ms = t0.elapsed().as_millis();
    println!(
        "vblk: read back and verified {} blocks at depth {} in {} ms",
        count, depth, read_ms
    );
    println!("vblk: OK");
    Ok(())
}

fn ack_mode() -> Result<(), String> {
    let depth = arg("depth", 32)?;
    let count = arg("count", 0)?;
    let mut rng = arg("seed", 1)?;
    let start = arg("start", 1)?;
    let mut disk = open(depth)?;
    let blocks = disk.capacity_sectors() / SECTORS_PER_BLOCK;
    if blocks < 2 * depth {
        return Err(format!(
            "the disk has {blocks} 4 KiB blocks; depth={depth} needs at least {}",
            2 * depth
        ));
    }
    println!(
        "vblk: ack mode, {} blocks of {} bytes, depth {}",
        blocks, BLOCK, depth
    );
    let mut out: Vec<Completion> = (0..depth).map(|_| Completion::EMPTY).collect();
    let mut pool: Vec<Vec<u8>> = Vec::new();
    // Sectors with a write in flight: two writes to one place at once
    // would leave a crash checker unable to tell which should win.
    let mut busy: Vec<u64> = Vec::new();
    let mut n = start;
    loop {
        let more = |n: u64| count == 0 || n - start < count;
        while more(n) && (disk.in_flight() as u64) < depth {
            let sector = loop {
                let s = next(&mut rng) % blocks * SECTORS_PER_BLOCK;
                if !busy.contains(&s) {
                    break s;
                }
            };
            let mut buf = pool.pop().unwrap_or_else(|| vec![0; BLOCK]);
            fill(&mut buf, n, sector);
            disk.submit_write(sector, buf)
                .map_err(|r| format!("submit write {n} at sector {sector}: {}", r.error))?;
            busy.push(sector);
            n += 1;
        }
        if disk.in_flight() == 0 {
            break;
        }
        let got = wait(&mut disk, &mut out)?;
        for c in &mut out[..got] {
            let w = u64::from_le_bytes(c.buf[8..16].try_into().unwrap_or_default());
            c.result
                .map_err(|e: Error| format!("write {w} at sector {}: {e}", c.sector))?;
            println!("ack {} sector={}", w, c.sector);
            busy.retain(|&s| s != c.sector);
            pool.push(core::mem::take(&mut c.buf));
        }
    }
    println!("vblk: done");
    Ok(())
}

/// The benchmark modes' result line.
fn report(mode: &str, count: u64, depth: u64, bytes: u64, ns: u64) {
    println!(
        "vblk: {} count={} depth={} bytes={} ns={}",
        mode, count, depth, bytes, ns
    );
    println!("vblk: OK");
}

/// Run `count` requests of `size` bytes, `depth` in flight; `submit`
/// puts request number `i` on the queue with the buffer it is given.
/// Returns the loop's time in ns.
fn pump(
    disk: &mut VirtioBlk,
    depth: u64,
    count: u64,
    size: usize,
    mut submit: impl FnMut(&mut VirtioBlk, u64, Vec<u8>) -> Result<(), String>,
) -> Result<u64, String> {
    let mut out: Vec<Completion> = (0..depth).map(|_| Completion::EMPTY).collect();
    let mut pool: Vec<Vec<u8>> = (0..depth).map(|_| vec![0u8; size]).collect();
    let t0 = Instant::now();
    let (mut i, mut done) = (0u64, 0u64);
    while done < count {
        while i < count && (disk.in_flight() as u64) < depth {
            let buf = pool.pop().unwrap_or_else(|| vec![0u8; size]);
            submit(disk, i, buf)?;
            i += 1;
        }
        let n = wait(disk, &mut out)?;
        for c in &mut out[..n] {
            c.result
                .map_err(|e| format!("request at sector {}: {e}", c.sector))?;
            pool.push(core::mem::take(&mut c.buf));
            done += 1;
        }
    }
    Ok(t0.elapsed().as_nanos() as u64)
}

fn randwrite_mode() -> Result<(), String> {
    let depth = arg("depth", 32)?;
    let count = arg("count", 2000)?;
    let mut rng = arg("seed", 1)?;
    let mut disk = open(depth)?;
    let blocks = disk.capacity_sectors() / SECTORS_PER_BLOCK;
    if blocks == 0 {
        return Err("the disk holds no 4 KiB block".into());
    }
    let ns = pump(&mut disk, depth, count, BLOCK, |disk, i, mut buf| {
        let sector = next(&mut rng) % blocks * SECTORS_PER_BLOCK;
        buf[..8].copy_from_slice(&i.to_le_bytes());
        disk.submit_write(sector, buf)
            .map(|_| ())
            .map_err(|r| format!("submit write {i} at sector {sector}: {}", r.error))
    })?;
    report("randwrite", count, depth, count * BLOCK as u64, ns);
    Ok(())
}

fn seqread_mode() -> Result<(), String> {
    let depth = arg("depth", 8)?;
    let count = arg("count", 2048)?;
    let size = arg("size", 65536)?;
    let mut disk = open(depth)?;
    if size == 0 || size % 512 != 0 || size > 1 << 20 {
        return Err(format!(
            "size={size}: must be a multiple of 512 up to 1 MiB"
        ));
    }
    let per = size / 512;
    let slots = disk.capacity_sectors() / per;
    if slots == 0 {
        return Err(format!("size={size}: larger than the disk"));
    }
    let ns = pump(&mut disk, depth, count, size as usize, |disk, i, buf| {
        let sector = i % slots * per;
        disk.submit_read(sector, buf)
            .map(|_| ())
            .map_err(|r| format!("submit read {i} at sector {sector}: {}", r.error))
    })?;
    report("seqread", count, depth, count * size, ns);
    Ok(())
}
