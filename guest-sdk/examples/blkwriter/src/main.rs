//! Writes numbered, checksummed sectors to the block device "storage" at
//! random offsets and says on the console which writes the host
//! acknowledged; the crash tests kill the host under it and check the disk.
//!
//! Arguments (all optional): `seed=S` for the offsets, `start=N` the number
//! of the first write (numbers go up by one), `count=K` writes before it
//! exits (0: for ever), `maxlen=L` the largest write in sectors (each write
//! is 1 to L sectors, uniformly).
//!
//! Every sector a write covers holds: the magic `TTWRITE1`, the write's
//! number, the sector's own index on the disk, a checksum (FNV-1a 64) of
//! the rest of the sector, then bytes derived from the number and index.
//! So a reader can tell a whole sector of write N from a torn or foreign
//! one without knowing anything else. After a write returns, one line
//! `ack N off=SECTOR len=SECTORS` says so (a line is printed only once the
//! hypercall has returned OK). Output ends with `blkwriter: done`; a
//! failed write prints `blkwriter: FAIL ...` and exits 1.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec;

use tt_guest::block::Block;
use tt_guest::println;

tt_guest::main!(app_main, devices: [block "storage"]);

/// FNV-1a, 64 bits.
fn fnv(h: u64, bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(h, |h, &b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

const FNV_INIT: u64 = 0xcbf2_9ce4_8422_2325;

/// splitmix64: the offsets' generator.
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Fill `sector` as write `n` writes sector index `index`.
fn fill(sector: &mut [u8], n: u64, index: u64) {
    sector[0..8].copy_from_slice(b"TTWRITE1");
    sector[8..16].copy_from_slice(&n.to_le_bytes());
    sector[16..24].copy_from_slice(&index.to_le_bytes());
    for (i, b) in sector[32..].iter_mut().enumerate() {
        *b = (n.wrapping_mul(131) ^ index.wrapping_mul(7) ^ i as u64) as u8;
    }
    let sum = fnv(fnv(FNV_INIT, &sector[0..24]), &sector[32..]);
    sector[24..32].copy_from_slice(&sum.to_le_bytes());
}

fn arg(key: &str, default: u64) -> u64 {
    tt_guest::boot::arg_value(key)
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn app_main() -> Result<(), &'static str> {
    let disk = Block::acquire("storage").map_err(|_| "cannot acquire \"storage\"")?;
    let bs = disk.block_size();
    let sectors = disk.blocks();
    let mut rng = arg("seed", 1);
    let start = arg("start", 1);
    let count = arg("count", 0);
    let maxlen = arg("maxlen", 8).clamp(1, sectors);
    println!(
        "blkwriter: {} sectors of {} bytes, writes of 1 to {} sectors",
        sectors, bs, maxlen
    );
    let mut buf = vec![0u8; (maxlen * bs) as usize];
    let mut n = start;
    while count == 0 || n - start < count {
        let len = 1 + next(&mut rng) % maxlen;
        let off = next(&mut rng) % (sectors - len + 1);
        let data = &mut buf[..(len * bs) as usize];
        for (i, sector) in data.chunks_mut(bs as usize).enumerate() {
            fill(sector, n, off + i as u64);
        }
        if let Err(e) = disk.write(off * bs, data) {
            println!("blkwriter: FAIL write {} at sector {}: {}", n, off, e);
            return Err("write");
        }
        println!("ack {} off={} len={}", n, off, len);
        n += 1;
    }
    println!("blkwriter: done");
    Ok(())
}
