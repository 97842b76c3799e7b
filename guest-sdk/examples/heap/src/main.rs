//! Stresses the SDK's allocator.
//!
//! Phases, each verified: random-size Vec/Box/String churn with a xorshift
//! PRNG (keeping a bounded set of live allocations and checking their
//! contents before freeing), fragmentation (free every other block, then
//! allocate larger ones), growth by `Vec::push`, a large allocation of
//! 64 MiB (or half the heap if it is smaller), and a final check that
//! everything was returned. Output: `heap: ...` progress lines and
//! `heap: OK` (exit 0); on failure `heap: FAIL ...` (exit 1).
#![no_std]
#![no_main]

extern crate alloc;

use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write;

use tt_guest::heap::HEAP;
use tt_guest::println;

tt_guest::main!(app_main);

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

enum Obj {
    Bytes(Vec<u8>, u8),
    Words(Box<[u64]>, u64),
    Text(String, u64),
}

impl Obj {
    fn make(r: &mut Rng) -> Obj {
        let v = r.next();
        match v % 3 {
            0 => {
                let len = (v >> 8) as usize % 4096 + 1;
                let tag = (v >> 32) as u8;
                Obj::Bytes((0..len).map(|i| tag.wrapping_add(i as u8)).collect(), tag)
            }
            1 => {
                let len = (v >> 8) as usize % 512 + 1;
                let tag = v >> 20;
                Obj::Words((0..len as u64).map(|i| tag ^ i).collect(), tag)
            }
            _ => {
                let n = (v >> 8) % 200;
                let mut s = String::new();
                for i in 0..n {
                    let _ = write!(s, "{},", i ^ (v >> 40));
                }
                Obj::Text(s, v >> 40)
            }
        }
    }

    fn check(&self) -> bool {
        match self {
            Obj::Bytes(b, tag) => b
                .iter()
                .enumerate()
                .all(|(i, &x)| x == tag.wrapping_add(i as u8)),
            Obj::Words(w, tag) => w.iter().enumerate().all(|(i, &x)| x == tag ^ i as u64),
            Obj::Text(s, k) => s
                .split(',')
                .filter(|p| !p.is_empty())
                .enumerate()
                .all(|(i, p)| p.parse::<u64>() == Ok(i as u64 ^ k)),
        }
    }
}

fn churn(r: &mut Rng, rounds: usize, max_live: usize) -> Result<(), &'static str> {
    let mut live: Vec<Obj> = Vec::new();
    for _ in 0..rounds {
        let v = r.next();
        if live.len() < max_live && (!v.is_multiple_of(3) || live.is_empty()) {
            live.push(Obj::make(r));
        } else {
            let i = (v >> 16) as usize % live.len();
            let o = live.swap_remove(i);
            if !o.check() {
                return Err("churn: corrupted allocation");
            }
        }
    }
    if !live.iter().all(Obj::check) {
        return Err("churn: corrupted allocation at end");
    }
    Ok(())
}

fn fragment(r: &mut Rng) -> Result<(), &'static str> {
    let mut blocks: Vec<Option<Vec<u8>>> = (0..2000)
        .map(|i| Some(alloc::vec![i as u8; (r.next() % 256 + 16) as usize]))
        .collect();
    for b in blocks.iter_mut().step_by(2) {
        *b = None;
    }
    let (_, _, frags) = HEAP.stats();
    let big: Vec<Vec<u8>> = (0..500).map(|i| alloc::vec![!(i as u8); 1024]).collect();
    for (i, b) in blocks.iter().enumerate() {
        if let Some(b) = b {
            if b.iter().any(|&x| x != i as u8) {
                return Err("fragment: small block corrupted");
            }
        }
    }
    for (i, b) in big.iter().enumerate() {
        if b.iter().any(|&x| x != !(i as u8)) {
            return Err("fragment: large block corrupted");
        }
    }
    println!(
        "heap: fragmentation phase ok ({} free blocks at peak)",
        frags
    );
    Ok(())
}

fn grow() -> Result<(), &'static str> {
    let mut v: Vec<u32> = Vec::new();
    for i in 0..1_000_000u32 {
        v.push(i.wrapping_mul(2654435761));
    }
    if v.iter()
        .enumerate()
        .any(|(i, &x)| x != (i as u32).wrapping_mul(2654435761))
    {
        return Err("grow: Vec contents wrong after growth");
    }
    v.truncate(10);
    v.shrink_to_fit();
    if v.capacity() < 10 || v[9] != 9u32.wrapping_mul(2654435761) {
        return Err("grow: shrink_to_fit lost data");
    }
    Ok(())
}

fn large() -> Result<usize, &'static str> {
    let (free, _, _) = HEAP.stats();
    let size = if free >= 96 << 20 { 64 << 20 } else { free / 2 };
    let mut v: Vec<u64> = Vec::new();
    if v.try_reserve_exact(size / 8).is_err() {
        return Err("large: allocation failed");
    }
    v.extend((0..(size / 8) as u64).map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15)));
    if v.iter()
        .enumerate()
        .any(|(i, &x)| x != (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
    {
        return Err("large: contents wrong");
    }
    Ok(size)
}

/// One verified phase of the test.
type Step = fn(&mut Rng) -> Result<(), &'static str>;

fn app_main() -> i32 {
    let (free0, total, _) = HEAP.stats();
    println!("heap: {} MiB managed, {} bytes free", total >> 20, free0);
    let mut r = Rng(0x9E37_79B9_7F4A_7C15);
    let steps: [(&str, Step); 3] = [
        ("churn", |r| churn(r, 200_000, 2000)),
        ("fragment", fragment),
        ("grow", |_| grow()),
    ];
    for (name, f) in steps {
        if let Err(e) = f(&mut r) {
            println!("heap: FAIL {}", e);
            return 1;
        }
        println!("heap: {} ok", name);
    }
    match large() {
        Ok(size) => println!("heap: large allocation of {} MiB verified", size >> 20),
        Err(e) => {
            println!("heap: FAIL {}", e);
            return 1;
        }
    }
    let (free1, _, blocks) = HEAP.stats();
    if free1 != free0 {
        println!(
            "heap: FAIL {} bytes leaked ({} free before, {} after)",
            free0 as i64 - free1 as i64,
            free0,
            free1
        );
        return 1;
    }
    println!("heap: all memory returned ({} free block(s))", blocks);
    println!("heap: OK");
    0
}
