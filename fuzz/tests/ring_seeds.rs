//! Seeds for the `ring_attach` fuzz target: device images made by tt-ring
//! itself, each by a recipe below. The committed files are checked against
//! their recipes (same geometry, positions, flags and records; only the
//! ring's random UUID differs between runs):
//!
//!     cargo test --manifest-path fuzz/Cargo.toml --test ring_seeds
//!
//! Rewrite them (after changing a recipe or the on-disk format) with
//!
//!     TT_RING_WRITE_SEEDS=1 cargo test --manifest-path fuzz/Cargo.toml --test ring_seeds

use std::path::{Path, PathBuf};
use tt_ring::{Consumer, MemDevice, Producer};

/// What a reader sees in a ring: freed and committed positions, both
/// suspend flags, and the records from the freed position on.
#[derive(Debug, PartialEq, Eq)]
struct View {
    freed: u64,
    committed: u64,
    requested: bool,
    acknowledged: bool,
    records: Vec<(u64, Vec<u8>)>,
}

fn view(dev: &MemDevice) -> View {
    let p = Producer::attach(dev).expect("producer attaches");
    let mut c = Consumer::attach(dev).expect("consumer attaches");
    let (pi, ci) = (p.debug_info(), c.debug_info());
    let (records, end) = c
        .fold(Vec::new(), |mut v, it| {
            v.push((it.position, it.data));
            v
        })
        .expect("records read back");
    assert_eq!(end, pi.position);
    View {
        freed: ci.position,
        committed: pi.position,
        requested: ci.flag,
        acknowledged: pi.flag,
        records,
    }
}

fn item(n: usize, len: usize) -> Vec<u8> {
    (0..len).map(|i| (n * 37 + i) as u8).collect()
}

/// A fresh ring of the smallest size.
fn empty(_: &MemDevice) {}

/// Three commits of mixed sizes (one with padding, one ending exactly on a
/// sector boundary); the consumer freed part of the first, mid-sector.
fn items(d: &MemDevice) {
    let mut p = Producer::attach(d).unwrap();
    let mut c = Consumer::attach(d).unwrap();
    for (n, len) in [0, 1, 7, 8, 100].into_iter().enumerate() {
        p.push(&item(n, len)).unwrap();
    }
    p.advance().unwrap();
    p.push(&item(5, 1000)).unwrap();
    p.advance().unwrap();
    p.push(&item(6, 496)).unwrap(); // 504 + 8: exactly one sector
    p.advance().unwrap();
    c.pop().unwrap();
    let second = c.pop().unwrap();
    c.advance(second.next).unwrap();
}

/// The stream has gone round the data area several times; two commits are
/// unconsumed and the producer has acknowledged a suspend request.
fn wrapped(d: &MemDevice) {
    let mut p = Producer::attach(d).unwrap();
    let mut c = Consumer::attach(d).unwrap();
    for n in 0..9 {
        p.push(&item(n, 300 + n * 20)).unwrap();
        p.push(&item(n + 100, 60)).unwrap();
        p.advance().unwrap();
        let (_, next) = c.fold((), |(), _| ()).unwrap();
        c.advance(next).unwrap();
    }
    p.push(&item(50, 200)).unwrap();
    p.advance().unwrap();
    p.push(&item(51, 10)).unwrap();
    p.advance().unwrap();
    c.suspend().unwrap();
    p.state().unwrap();
}

/// 4096-byte sectors: a record spanning sectors, wrapped once, one
/// record popped but not freed.
fn wrapped_4k(d: &MemDevice) {
    let mut p = Producer::attach(d).unwrap();
    let mut c = Consumer::attach(d).unwrap();
    for n in 0..3 {
        p.push(&item(n, 6000)).unwrap();
        p.advance().unwrap();
        let it = c.pop().unwrap();
        c.advance(it.next).unwrap();
    }
    p.push(&item(10, 20)).unwrap();
    p.push(&item(11, 5000)).unwrap();
    p.advance().unwrap();
    c.pop().unwrap();
}

struct Seed {
    name: &'static str,
    sector: u32,
    sectors: u64,
    recipe: fn(&MemDevice),
}

/// Every seed. A 4096-byte-sector image gets one trailing byte with bit 0
/// set: `ring_attach` attaches with 4096-byte sectors only then.
const SEEDS: &[Seed] = &[
    Seed {
        name: "empty-512.ring",
        sector: 512,
        sectors: 7,
        recipe: empty,
    },
    Seed {
        name: "items-512.ring",
        sector: 512,
        sectors: 16,
        recipe: items,
    },
    Seed {
        name: "wrapped-512.ring",
        sector: 512,
        sectors: 8,
        recipe: wrapped,
    },
    Seed {
        name: "wrapped-4096.ring",
        sector: 4096,
        sectors: 8,
        recipe: wrapped_4k,
    },
];

fn build(s: &Seed) -> MemDevice {
    let d = MemDevice::new(s.sectors * s.sector as u64, s.sector);
    Producer::create(&d).unwrap();
    (s.recipe)(&d);
    d
}

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds/ring_attach")
}

#[test]
fn ring_attach_seeds_match_their_recipes() {
    let write = std::env::var_os("TT_RING_WRITE_SEEDS").is_some();
    for s in SEEDS {
        let path = dir().join(s.name);
        let made = build(s);
        if write {
            let mut bytes = made.contents();
            if s.sector == 4096 {
                bytes.push(1);
            }
            std::fs::create_dir_all(dir()).unwrap();
            std::fs::write(&path, bytes).unwrap();
        }
        let file = std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; write the seeds with TT_RING_WRITE_SEEDS=1",
                path.display()
            )
        });
        let size = s.sectors as usize * s.sector as usize;
        let tail = if s.sector == 4096 { 1 } else { 0 };
        assert_eq!(file.len(), size + tail, "{}: size", s.name);
        if s.sector == 4096 {
            assert_eq!(
                file[size], 1,
                "{}: trailing byte selecting 4096-byte sectors",
                s.name
            );
        }
        let stored = MemDevice::from_bytes(file, s.sector);
        assert_eq!(
            view(&stored),
            view(&made),
            "{} does not match its recipe",
            s.name
        );
    }
}

#[test]
fn the_seeds_cover_what_they_claim() {
    let v = |name: &str| {
        let s = SEEDS.iter().find(|s| s.name == name).unwrap();
        view(&build(s))
    };
    let e = v("empty-512.ring");
    assert_eq!((e.committed, e.records.len()), (0, 0));
    let i = v("items-512.ring");
    assert!(i.freed % 512 != 0 && i.records.len() == 5);
    let w = v("wrapped-512.ring");
    assert!(w.freed > 3 * 1536 && w.requested && w.acknowledged && w.records.len() == 2);
    let k = v("wrapped-4096.ring");
    assert!(k.freed > 4 * 4096 && k.records.len() == 2 && k.records[1].1.len() == 5000);
}
