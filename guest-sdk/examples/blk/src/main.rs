//! Exercises the block device "storage".
//!
//! Writes a distinct pattern to every block (one block per request, or
//! `chunk=N` blocks per request), reads every block back and verifies it,
//! re-reads the last block, then checks that malformed requests fail:
//! beyond the end, straddling the end, unaligned offset, length 0, length
//! not a multiple of the block size — first through the SDK's checks
//! (`blk: sdk rejects ...`), then sent to the host unchecked
//! (`blk: host rejects ...`; skip with the argument `sdk-only`, e.g. under
//! solo5-hvt, which leaves alignment checks to the guest).
//!
//! Output ends with `blk: N blocks of S bytes verified` and `blk: OK`
//! (exit 0); any failure prints `blk: FAIL ...` and exits 1.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec;

use tt_guest::block::{Block, BlockError};
use tt_guest::println;

tt_guest::main!(app_main, devices: [block "storage"]);

fn pattern(block: u64, i: usize) -> u8 {
    (block.wrapping_mul(31) ^ (i as u64).wrapping_mul(7) ^ (block >> 8)) as u8
}

fn app_main() -> Result<(), &'static str> {
    let disk = match Block::acquire("storage") {
        Ok(d) => d,
        Err(e) => {
            println!("blk: FAIL cannot acquire \"storage\": {}", e);
            return Err("acquire");
        }
    };
    let bs = disk.block_size();
    let n = disk.blocks();
    println!(
        "blk: capacity {} bytes, block size {}, {} blocks",
        disk.capacity(),
        bs,
        n
    );
    if n == 0 {
        println!("blk: FAIL device has no blocks");
        return Err("empty device");
    }
    let chunk: u64 = tt_guest::boot::arg_value("chunk")
        .and_then(|c| c.parse().ok())
        .unwrap_or(1)
        .clamp(1, n);
    let sdk_only = tt_guest::boot::args().any(|a| a == "sdk-only");

    let mut buf = vec![0u8; (bs * chunk) as usize];
    let mut b = 0;
    while b < n {
        let k = chunk.min(n - b);
        let len = (k * bs) as usize;
        for (i, x) in buf[..len].iter_mut().enumerate() {
            *x = pattern(b + i as u64 / bs, i % bs as usize);
        }
        if let Err(e) = disk.write(b * bs, &buf[..len]) {
            println!("blk: FAIL write of block {}: {}", b, e);
            return Err("write");
        }
        b += k;
    }
    println!("blk: wrote {} blocks", n);
    let mut b = 0;
    while b < n {
        let k = chunk.min(n - b);
        let len = (k * bs) as usize;
        buf[..len].fill(0);
        if let Err(e) = disk.read(b * bs, &mut buf[..len]) {
            println!("blk: FAIL read of block {}: {}", b, e);
            return Err("read");
        }
        for (i, &x) in buf[..len].iter().enumerate() {
            let blk = b + i as u64 / bs;
            if x != pattern(blk, i % bs as usize) {
                println!("blk: FAIL block {} byte {} differs", blk, i % bs as usize);
                return Err("verify");
            }
        }
        b += k;
    }
    let last = n - 1;
    let mut one = vec![0u8; bs as usize];
    if disk.read(last * bs, &mut one).is_err()
        || one.iter().enumerate().any(|(i, &x)| x != pattern(last, i))
    {
        println!("blk: FAIL last block {} did not read back", last);
        return Err("last block");
    }
    println!("blk: last block {} ok", last);

    let cap = disk.capacity();
    let mut two = vec![0u8; 2 * bs as usize];
    let half = (bs / 2).max(1) as usize;
    type Case<'a> = (&'a str, u64, usize);
    let cases: [Case; 5] = [
        ("beyond the end", cap, bs as usize),
        ("straddling the end", cap - bs, 2 * bs as usize),
        ("at an unaligned offset", 1, bs as usize),
        ("of length 0", 0, 0),
        ("of a length not a multiple of the block size", 0, half),
    ];
    let mut passes: [(&str, bool); 2] = [("sdk", true), ("host", !sdk_only)];
    for (who, enabled) in passes.iter_mut() {
        if !*enabled {
            continue;
        }
        for &(what, off, len) in &cases {
            let raw = *who == "host";
            let w = if raw {
                disk.write_raw(off, &two[..len])
            } else {
                disk.write(off, &two[..len])
            };
            let r = if raw {
                disk.read_raw(off, &mut two[..len])
            } else {
                disk.read(off, &mut two[..len])
            };
            match (w, r) {
                (Err(we), Err(re)) => println!(
                    "blk: {} rejects write and read {} ({} / {})",
                    who, what, we, re
                ),
                _ => {
                    println!(
                        "blk: FAIL {} accepted a request {} (write {:?}, read {:?})",
                        who,
                        what,
                        w.err(),
                        r.err()
                    );
                    return Err("malformed request accepted");
                }
            }
        }
        *enabled = false;
    }
    // The invalid requests must not have changed the device.
    if disk.read(last * bs, &mut one).is_err()
        || one.iter().enumerate().any(|(i, &x)| x != pattern(last, i))
        || disk.read(0, &mut one).is_err()
        || one.iter().enumerate().any(|(i, &x)| x != pattern(0, i))
    {
        println!("blk: FAIL a rejected request changed the device");
        return Err("rejected request changed data");
    }
    let _ = BlockError::Invalid;
    println!("blk: {} blocks of {} bytes verified", n, bs);
    println!("blk: OK");
    Ok(())
}
