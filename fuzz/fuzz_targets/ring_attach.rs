//! Fuzz attaching to a tt-ring device image and reading it.
//!
//! The input is the device image, unchanged (so `seeds/ring_attach/*.ring`
//! and any crash artifact are device images). It is attached as a
//! `MemDevice` with 512-byte sectors and, when bit 0 of the input's last
//! byte is set, also with 4096-byte sectors (bytes past the last whole
//! sector are not part of the device, so a seed can carry that bit in a
//! trailing byte).
//!
//! For each device:
//! - `Producer::attach` and `Consumer::attach` agree (they check the same
//!   header and control blocks).
//! - An attached consumer folds over every record, then pops them again
//!   from the freed position; both passes see the same records and stop
//!   the same way, every record is well-formed (strictly increasing
//!   positions, `next` = position + record size, nothing past the
//!   producer's position), a `Corrupt` leaves the cursor on the bad record
//!   and repeats. Then it seeks to positions taken from the input (record
//!   positions seen earlier must give the same record again, others must
//!   be accepted or refused by the documented rule), and advances past
//!   what it read.
//! - An attached producer answers `state`, pushes one item and advances;
//!   that must not touch the header, the consumer's control slots or any
//!   sector the consumer has not freed, and a fresh consumer that seeks to
//!   the item's position must read it back intact.
//!
//! Nothing may panic, hang, fail with an I/O error (the device is memory and
//! every access must stay inside it) or make an allocation larger than the
//! device (checked by the allocator below, on top of libFuzzer's
//! `-malloc_limit_mb`).

#![no_main]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use libfuzzer_sys::fuzz_target;
use tt_ring::format::{self, DATA_START};
use tt_ring::{BlockDevice, Consumer, Error, Item, MemDevice, Producer, State};

/// The system allocator, remembering the largest single request.
struct Tracking;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to `System` unchanged.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        System.alloc_zeroed(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOC: Tracking = Tracking;

/// Slack for the fixed-size allocations (a sector buffer or two, messages).
const SLACK: usize = 3 * 4096;

/// Upper bound on pops in one pass: records are at least 8 bytes and lie
/// in at most one capacity of stream, so more than capacity / 8 records
/// means the consumer is going round in circles.
fn pop_cap(capacity: u64) -> u64 {
    capacity / format::RECORD_ALIGN + 2
}

fuzz_target!(|data: &[u8]| {
    LARGEST.store(0, Ordering::Relaxed);
    run(data, 512);
    if data.last().is_some_and(|b| b & 1 == 1) {
        run(data, 4096);
    }
    let largest = LARGEST.load(Ordering::Relaxed);
    assert!(
        largest <= data.len() + SLACK,
        "allocated {largest} bytes at once for a {}-byte image",
        data.len()
    );
});

/// Bytes of the input used to derive seek positions and the pushed item:
/// the last 32 bytes (or fewer), so they mostly lie in the data area or
/// past the last sector and mutating them leaves the header alone.
fn knobs(data: &[u8]) -> [u8; 32] {
    let mut k = [0u8; 32];
    let tail = &data[data.len().saturating_sub(32)..];
    k[..tail.len()].copy_from_slice(tail);
    k
}

fn run(data: &[u8], ss: u32) {
    let dev = MemDevice::from_bytes(data.to_vec(), ss);
    let k = knobs(data);
    let p = Producer::attach(&dev);
    let c = Consumer::attach(&dev);
    match (&p, &c) {
        (Ok(_), Ok(_)) => {}
        (Err(a), Err(b)) => assert_eq!(
            std::mem::discriminant(a),
            std::mem::discriminant(b),
            "producer and consumer attach disagree: {a:?} vs {b:?}"
        ),
        _ => panic!(
            "producer attach {:?} but consumer attach {:?}",
            p.as_ref().err(),
            c.as_ref().err()
        ),
    }
    for e in [p.as_ref().err(), c.as_ref().err()].into_iter().flatten() {
        assert!(
            matches!(e, Error::NotARing(_) | Error::Corrupt { .. }),
            "attach failed with {e:?}"
        );
    }
    let (Ok(p), Ok(c)) = (p, c) else { return };
    let pi = p.debug_info();
    let ci = c.debug_info();
    let ss64 = ss as u64;
    assert_eq!(pi.sector_size, ss);
    assert!(pi.capacity >= 2 * ss64 && pi.capacity % ss64 == 0);
    assert!((DATA_START * ss64 + pi.capacity) <= dev.size());
    assert_eq!(pi.position % ss64, 0);
    assert!(ci.position <= pi.position && pi.position - ci.position <= pi.capacity);
    assert_eq!((pi.other, ci.other), (ci.position, pi.position));
    assert_eq!(ci.cursor, ci.position, "consumer cursor starts at freed");
    assert_eq!(
        p.max_item(),
        (pi.capacity - ss64 - format::RECORD_HEADER).min(u32::MAX as u64 - 1)
    );
    drop(p);
    read_all(c, &k, ss64);
    // The consumer advanced; attach again and write as the producer.
    let c = Consumer::attach(&dev).expect("consumer attaches after its own advance");
    let freed = c.position();
    drop(c);
    produce(&dev, &k, freed);
}

/// What one pass over the records saw: how many, a hash of them, and how
/// it ended (cursor, and the error if any).
#[derive(Debug, PartialEq, Eq)]
struct Pass {
    count: u64,
    hash: u64,
    cursor: u64,
    end: Option<Option<u64>>,
}

fn mix(h: u64, item: &Item) -> u64 {
    let mut h = h ^ item.position.rotate_left(17) ^ item.next.rotate_left(41);
    for &b in &item.data {
        h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
    h.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// Checks one popped record against the previous one.
struct Walk {
    ss: u64,
    producer: u64,
    capacity: u64,
    last_next: Option<u64>,
}

impl Walk {
    fn item(&mut self, item: &Item) {
        assert!(
            item.next > item.position && item.next <= self.producer,
            "record {}..{} outside the committed stream (producer at {})",
            item.position,
            item.next,
            self.producer
        );
        assert_eq!(
            item.next - item.position,
            format::record_size(item.data.len() as u64),
            "record at {} has {} bytes of payload but ends at {}",
            item.position,
            item.data.len(),
            item.next
        );
        assert!((item.data.len() as u64) < self.capacity);
        assert_eq!(item.position % format::RECORD_ALIGN, 0);
        if let Some(last) = self.last_next {
            assert!(
                item.position == last
                    || (item.position > last && item.position.is_multiple_of(self.ss)),
                "record at {} after one ending at {last}: only padding may lie between",
                item.position
            );
        }
        self.last_next = Some(item.next);
    }
}

fn read_all(mut c: Consumer<&MemDevice>, k: &[u8; 32], ss: u64) {
    let info = c.debug_info();
    let (freed, producer, capacity) = (info.position, info.other, info.capacity);
    let mut walk = Walk {
        ss,
        producer,
        capacity,
        last_next: None,
    };
    let fold = c.fold((0u64, 0u64), |(n, h), item| {
        walk.item(&item);
        (n + 1, mix(h, &item))
    });
    assert!(walk.last_next.is_none_or(|n| n <= producer));
    let fold = match fold {
        Ok(((count, hash), cursor)) => {
            assert_eq!(cursor, producer, "fold ended before the producer position");
            assert_eq!(c.cursor(), cursor);
            Pass {
                count,
                hash,
                cursor,
                end: None,
            }
        }
        Err(e) => {
            let at = corrupt_at(&e);
            assert_eq!(c.cursor(), at.unwrap_or(c.cursor()));
            // Count what was folded before the error by popping again below.
            Pass {
                count: u64::MAX,
                hash: 0,
                cursor: c.cursor(),
                end: Some(at),
            }
        }
    };

    // Second pass: pop from the freed position, remembering a few records
    // (picked by the input) to seek back to.
    c.seek(freed).expect("seek to the freed position");
    let picks: Vec<u64> = k[..4].iter().map(|&b| b as u64).collect();
    let mut seen: Vec<Item> = Vec::new();
    let mut walk = Walk {
        ss,
        producer,
        capacity,
        last_next: None,
    };
    let (mut count, mut hash) = (0u64, 0u64);
    let end = loop {
        assert!(
            count <= pop_cap(capacity),
            "more records than fit in the ring"
        );
        let before = c.cursor();
        match c.pop() {
            Ok(item) => {
                walk.item(&item);
                assert_eq!(c.cursor(), item.next);
                if picks.contains(&(count % 256)) && seen.len() < 4 {
                    seen.push(item.clone());
                }
                count += 1;
                hash = mix(hash, &item);
            }
            Err(Error::Retry) => {
                assert_eq!(c.cursor(), producer, "Retry before the producer position");
                break None;
            }
            Err(e) => {
                let at = corrupt_at(&e);
                assert!(c.cursor() >= before);
                if let Some(at) = at {
                    assert_eq!(
                        c.cursor(),
                        at,
                        "Corrupt must leave the cursor on the record"
                    );
                }
                let again = c.pop().expect_err("a corrupt record stays corrupt");
                assert_eq!(corrupt_at(&again), at, "second pop: {again:?}");
                break Some(at);
            }
        }
    };
    let pass = Pass {
        count: if fold.end.is_some() { u64::MAX } else { count },
        hash: if fold.end.is_some() { 0 } else { hash },
        cursor: c.cursor(),
        end,
    };
    assert_eq!(fold, pass, "fold and pop disagree");
    let stop = c.cursor();

    // Seek back to remembered records: the same record again.
    for item in &seen {
        c.seek(item.position)
            .expect("seek to a record popped earlier");
        assert_eq!(&c.pop().expect("pop after seeking to a record"), item);
    }
    // Seek to positions derived from the input.
    for chunk in k[4..28].chunks(8) {
        let raw = u64::from_le_bytes(chunk.try_into().unwrap());
        let span = producer - freed + 64;
        for pos in [freed.wrapping_add(raw % span), raw] {
            let ok = pos >= freed && pos <= producer && pos % format::RECORD_ALIGN == 0;
            match c.seek(pos) {
                Ok(()) => {
                    assert!(ok, "seek to {pos} accepted outside [{freed}, {producer}]");
                    assert_eq!(c.cursor(), pos);
                    walk.last_next = None;
                    for _ in 0..4 {
                        match c.pop() {
                            Ok(item) => walk.item(&item),
                            Err(Error::Retry) => {
                                assert_eq!(c.cursor(), producer);
                                break;
                            }
                            Err(e) => {
                                corrupt_at(&e);
                                break;
                            }
                        }
                    }
                }
                Err(Error::Invalid(_)) => assert!(!ok, "seek to {pos} refused"),
                Err(e) => panic!("seek to {pos}: {e:?}"),
            }
        }
    }

    // Free what the passes read.
    c.seek(freed).expect("seek to the freed position");
    let target = if stop == freed {
        freed
    } else {
        // Pop up to `stop` again so it is at or behind the cursor.
        let mut n = 0;
        while c.cursor() < stop {
            n += 1;
            assert!(n <= pop_cap(capacity));
            if c.pop().is_err() {
                break;
            }
        }
        c.cursor()
    };
    match c.advance(target) {
        Ok(()) => assert_eq!(c.position(), target),
        Err(e) => panic!("advance to {target} (freed {freed}): {e:?}"),
    }
    assert!(matches!(c.advance(target + 8), Err(Error::Invalid(_))));
}

/// The position of a `Corrupt` from `pop`; any other error is a bug.
fn corrupt_at(e: &Error) -> Option<u64> {
    match e {
        Error::Corrupt { position, .. } => {
            assert!(
                position.is_some(),
                "pop on an unchanging device: Corrupt without a position: {e:?}"
            );
            *position
        }
        _ => panic!("pop: unexpected error {e:?}"),
    }
}

/// Push one item as the producer and check what the write touched.
fn produce(dev: &MemDevice, k: &[u8; 32], freed: u64) {
    let mut p = Producer::attach(dev).expect("producer attaches");
    let info = p.debug_info();
    let (ss, cap, start) = (info.sector_size as u64, info.capacity, info.position);
    let state = p.state().expect("producer state");
    let len = k[28] as usize % 100;
    let item: Vec<u8> = (0..len).map(|i| k[29].wrapping_add(i as u8)).collect();
    let before = dev.contents();
    let pos = match p.push(&item) {
        Ok(pos) => {
            assert_eq!(state, State::Running);
            pos
        }
        Err(Error::Suspended) => {
            assert_eq!(state, State::Suspended);
            return;
        }
        Err(Error::Retry) => {
            assert!(
                start + format::record_size(len as u64) > freed / ss * ss + cap,
                "Retry with room: producer {start}, freed {freed}, capacity {cap}"
            );
            return;
        }
        Err(e) => panic!("push of {len} bytes: {e:?}"),
    };
    assert_eq!(pos, start);
    let end = p.advance().expect("advance");
    assert_eq!(end % ss, 0);
    assert!(end > start && end <= freed / ss * ss + cap);
    let after = dev.contents();
    let ssz = ss as usize;
    // Header and consumer control slots untouched.
    assert_eq!(before[..ssz], after[..ssz], "header rewritten");
    let cons = format::CONSUMER_SLOT as usize * ssz..DATA_START as usize * ssz;
    assert_eq!(
        before[cons.clone()],
        after[cons],
        "consumer control rewritten"
    );
    // No unfreed sector rewritten: stream [align_down(freed), start).
    let base = DATA_START * ss;
    let mut s = freed / ss * ss;
    while s < start {
        let o = (base + s % cap) as usize;
        assert_eq!(
            before[o..o + ssz],
            after[o..o + ssz],
            "producer rewrote unfreed stream sector at {s}"
        );
        s += ss;
    }
    drop(p);
    let mut c = Consumer::attach(dev).expect("consumer attaches after a producer advance");
    c.seek(pos).expect("seek to the pushed item");
    let got = c.pop().expect("pop the pushed item");
    assert_eq!((got.position, got.data), (pos, item));
    assert!(matches!(c.pop(), Err(Error::Retry)));
    assert_eq!(c.cursor(), end);
}
