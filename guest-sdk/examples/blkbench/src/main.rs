//! Times 4 KiB requests on the block device "storage", one at a time
//! (queue depth 1, as every hvt guest); `tt-bench blk` runs it.
//!
//! Modes (the first argument, then a count):
//!
//! - `write N`: N writes of 4 KiB at random 4 KiB-aligned offsets (a
//!   splitmix64 sequence, `seed=S`, default 1). Each returns once the host
//!   acknowledged it: durable under tt-host's journal. With `at=NS` the
//!   loop starts when the wall clock reaches NS (ns since the epoch), so
//!   that several guests start together; with `until=NS` it stops early
//!   when the wall clock passes NS.
//! - `read-unapplied N`: for each of blocks 0..N, write it, then read it
//!   back at once: the host still holds it in its journal (not yet
//!   applied to the image), so it serves the read from its overlay. Only
//!   the reads are timed.
//! - `read-applied N`: write blocks 0..N, sleep `sleep=MS` milliseconds
//!   (default 300: the journal applies within about 20 ms of a write),
//!   then read each back. Only the reads are timed.
//!
//! Reads are checked against what was written. The result is one line:
//! `blkbench: MODE count=C ns=E wall_start=S wall_end=T`, with C requests
//! timed, E their total time in ns (the TSC), and the wall clock at the
//! start and end of the loop (`WALLTIME` hypercalls: the two clocks can
//! be compared). Any failure prints `blkbench: FAIL ...` and exits 1; bad
//! arguments exit 2.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec;
use core::time::Duration;

use tt_guest::block::Block;
use tt_guest::hypercall::walltime;
use tt_guest::println;
use tt_guest::time::{sleep, wallclock_ns, Instant};

tt_guest::main!(app_main, devices: [block "storage"]);

const BS: u64 = 4096;

/// splitmix64: the write offsets' generator.
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Fill `buf` as write number `n` writes it (cheap, distinct per write).
fn fill(buf: &mut [u8], n: u64) {
    for (i, w) in buf.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&(n.wrapping_mul(0x1_0000_0001) ^ i as u64).to_le_bytes());
    }
}

fn arg(key: &str, default: u64) -> Result<u64, i32> {
    match tt_guest::boot::arg_value(key) {
        None => Ok(default),
        Some(v) => v.parse().map_err(|_| {
            println!("blkbench: {}={} is not a number", key, v);
            2
        }),
    }
}

fn report(mode: &str, count: u64, ns: u64, wall_start: u64, wall_end: u64) {
    println!(
        "blkbench: {} count={} ns={} wall_start={} wall_end={}",
        mode, count, ns, wall_start, wall_end
    );
}

fn app_main() -> i32 {
    let mut args = tt_guest::boot::args();
    let (mode, n) = match (args.next(), args.next().map(str::parse::<u64>)) {
        (Some(m), Some(Ok(n))) => (m, n),
        _ => {
            println!(
                "blkbench: usage: blkbench write|read-unapplied|read-applied N \
                 [seed=S] [at=NS] [until=NS] [sleep=MS]"
            );
            return 2;
        }
    };
    let disk = match Block::acquire("storage") {
        Ok(d) => d,
        Err(e) => {
            println!("blkbench: FAIL cannot acquire \"storage\": {}", e);
            return 1;
        }
    };
    let blocks = disk.capacity() / BS;
    if blocks == 0 || BS.checked_rem(disk.block_size()) != Some(0) {
        println!(
            "blkbench: FAIL the device ({} bytes, sectors of {}) holds no 4 KiB block",
            disk.capacity(),
            disk.block_size()
        );
        return 1;
    }
    let r = match mode {
        "write" => write(&disk, n, blocks),
        "read-unapplied" | "read-applied" if n > blocks => {
            println!("blkbench: {} blocks asked, the device has {}", n, blocks);
            return 2;
        }
        "read-unapplied" => read_unapplied(&disk, n),
        "read-applied" => read_applied(&disk, n),
        _ => {
            println!("blkbench: unknown mode '{}'", mode);
            return 2;
        }
    };
    match r {
        Ok(()) => 0,
        Err(code) => code,
    }
}

fn write(disk: &Block, n: u64, blocks: u64) -> Result<(), i32> {
    let mut rng = arg("seed", 1)?;
    let at = arg("at", 0)?;
    let until = arg("until", u64::MAX)?;
    let mut buf = vec![0u8; BS as usize];
    while wallclock_ns() < at {
        let left = at.saturating_sub(wallclock_ns());
        sleep(Duration::from_nanos(left.min(1_000_000)));
    }
    let wall_start = walltime();
    let t = Instant::now();
    let mut done = 0;
    while done < n && (until == u64::MAX || wallclock_ns() < until) {
        let off = next(&mut rng) % blocks * BS;
        buf[..8].copy_from_slice(&done.to_le_bytes());
        if let Err(e) = disk.write(off, &buf) {
            println!("blkbench: FAIL write {} at {:#x}: {}", done, off, e);
            return Err(1);
        }
        done += 1;
    }
    let ns = t.elapsed().as_nanos() as u64;
    report("write", done, ns, wall_start, walltime());
    Ok(())
}

fn check(i: u64, buf: &[u8], want: &mut [u8]) -> Result<(), i32> {
    fill(want, i);
    if buf != want {
        println!(
            "blkbench: FAIL block {} did not read back what was written",
            i
        );
        return Err(1);
    }
    Ok(())
}

fn read_unapplied(disk: &Block, n: u64) -> Result<(), i32> {
    let mut buf = vec![0u8; BS as usize];
    let mut want = vec![0u8; BS as usize];
    let wall_start = walltime();
    let mut ns = 0;
    for i in 0..n {
        fill(&mut buf, i);
        if let Err(e) = disk.write(i * BS, &buf) {
            println!("blkbench: FAIL write of block {}: {}", i, e);
            return Err(1);
        }
        buf.fill(0);
        let t = Instant::now();
        let r = disk.read(i * BS, &mut buf);
        ns += t.elapsed().as_nanos() as u64;
        if let Err(e) = r {
            println!("blkbench: FAIL read of block {}: {}", i, e);
            return Err(1);
        }
        check(i, &buf, &mut want)?;
    }
    report("read-unapplied", n, ns, wall_start, walltime());
    Ok(())
}

fn read_applied(disk: &Block, n: u64) -> Result<(), i32> {
    let pause = arg("sleep", 300)?;
    let mut buf = vec![0u8; BS as usize];
    let mut want = vec![0u8; BS as usize];
    for i in 0..n {
        fill(&mut buf, i);
        if let Err(e) = disk.write(i * BS, &buf) {
            println!("blkbench: FAIL write of block {}: {}", i, e);
            return Err(1);
        }
    }
    sleep(Duration::from_millis(pause));
    let wall_start = walltime();
    let mut ns = 0;
    for i in 0..n {
        buf.fill(0);
        let t = Instant::now();
        let r = disk.read(i * BS, &mut buf);
        ns += t.elapsed().as_nanos() as u64;
        if let Err(e) = r {
            println!("blkbench: FAIL read of block {}: {}", i, e);
            return Err(1);
        }
        check(i, &buf, &mut want)?;
    }
    report("read-applied", n, ns, wall_start, walltime());
    Ok(())
}
