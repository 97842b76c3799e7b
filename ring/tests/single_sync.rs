//! A commit is one sync (docs/FORMAT.md, "Commit"): its records and its
//! control block are written, then synced together, so a power loss before
//! that sync finishes may persist any subset of those sectors, in any
//! order. These tests persist every subset and check that the commit comes
//! back whole or not at all, that everything committed before it is
//! intact, that nothing is reported corrupt, and that the ring goes on
//! working; and that sectors left by two different interrupted commits at
//! the same position never combine into records.

use std::sync::Arc;
use tt_ring::{Consumer, Error, Faults, FaultyDevice, Producer};

const SS: u32 = 512;

fn payload(tag: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| tag.wrapping_mul(31) ^ (i as u8)).collect()
}

/// Every record readable from the freed position on.
fn read_all(dev: &Arc<FaultyDevice>) -> Vec<Vec<u8>> {
    let mut c = Consumer::attach(dev.clone()).expect("consumer attaches");
    let mut out = Vec::new();
    loop {
        match c.pop() {
            Ok(it) => out.push(it.data),
            Err(Error::Retry) => return out,
            Err(e) => panic!("reading the recovered ring: {e}"),
        }
    }
}

/// A ring holding one committed batch `a`; then batch `batch` pushed and
/// its advance interrupted at its sync. Returns the device and the batch's
/// unsynced sectors.
fn interrupted(a: &[Vec<u8>], batch: &[Vec<u8>]) -> (Arc<FaultyDevice>, Vec<u64>) {
    let dev = Arc::new(FaultyDevice::new((5 + 32) * SS as u64, SS));
    Producer::create(&dev).unwrap();
    let mut p = Producer::attach(dev.clone()).unwrap();
    for r in a {
        p.push(r).unwrap();
    }
    p.advance().unwrap();
    interrupt(&dev, p, batch)
}

/// Push `batch` with `p` and fail the sync of its advance.
fn interrupt(
    dev: &Arc<FaultyDevice>,
    mut p: Producer<Arc<FaultyDevice>>,
    batch: &[Vec<u8>],
) -> (Arc<FaultyDevice>, Vec<u64>) {
    for r in batch {
        p.push(r).unwrap();
    }
    dev.set_faults(Faults {
        fail_sync: Some(0),
        ..Faults::default()
    });
    assert!(p.advance().is_err(), "the advance's sync was made to fail");
    let dirty = dev.unsynced_sectors();
    (dev.clone(), dirty)
}

fn subset(dirty: &[u64], mask: u32) -> impl Fn(u64) -> bool + '_ {
    move |s| {
        dirty
            .iter()
            .position(|&d| d == s)
            .is_some_and(|i| mask & (1 << i) != 0)
    }
}

#[test]
fn an_interrupted_commit_is_whole_or_absent_whatever_sectors_persist() {
    let a = vec![payload(1, 40), payload(2, 600)];
    // Three records over three sectors, plus the padding record.
    let b = vec![payload(3, 700), payload(4, 20), payload(5, 300)];
    let (_, dirty) = interrupted(&a, &b);
    // The batch's data sectors and one producer control slot.
    assert!(
        (3..=5).contains(&dirty.len()),
        "unsynced sectors: {dirty:?}"
    );
    let control_slots = [1u64, 2];
    let (mut whole, mut absent) = (0, 0);
    for mask in 0..1u32 << dirty.len() {
        let (dev, d2) = interrupted(&a, &b);
        assert_eq!(d2, dirty, "the replay is deterministic");
        dev.crash_keeping(subset(&dirty, mask));
        let got = read_all(&dev);
        let control_kept = dirty
            .iter()
            .enumerate()
            .any(|(i, s)| control_slots.contains(s) && mask & (1 << i) != 0);
        let all_kept = mask == (1 << dirty.len()) - 1;
        let mut with_b = a.clone();
        with_b.extend(b.iter().cloned());
        if got == with_b {
            whole += 1;
            assert!(
                control_kept,
                "mask {mask:b}: B visible without its control block"
            );
        } else {
            assert_eq!(got, a, "mask {mask:b}: neither A alone nor A then B");
            absent += 1;
            assert!(
                !all_kept,
                "mask {mask:b}: every sector persisted, yet B is gone"
            );
        }
        // The ring goes on: a new commit after recovery reads back after
        // whatever survived.
        let mut p = Producer::attach(dev.clone()).unwrap();
        let c = payload(6, 900);
        p.push(&c).unwrap();
        p.advance().unwrap();
        let mut expect = got.clone();
        expect.push(c);
        assert_eq!(read_all(&dev), expect, "mask {mask:b}: after a new commit");
    }
    assert!(whole >= 1 && absent >= 1, "whole {whole}, absent {absent}");
}

#[test]
fn sectors_of_two_interrupted_commits_at_one_position_never_combine() {
    let a = vec![payload(1, 100)];
    // Two batches with the same record boundaries but other contents: a
    // mix of their sectors would pass every record's own checksum.
    let b1 = vec![payload(7, 500), payload(8, 500), payload(9, 500)];
    let b2 = vec![payload(17, 500), payload(18, 500), payload(19, 500)];
    let (_, d1) = interrupted(&a, &b1);
    let mut seen_b2 = 0;
    for m1 in 0..1u32 << d1.len() {
        for m2 in [0u32, 0b1, 0b10, 0b101, 0b1010, 0b1111, u32::MAX >> 1] {
            let (dev, _) = interrupted(&a, &b1);
            dev.crash_keeping(subset(&d1, m1));
            if read_all(&dev) != a {
                // B1 survived whole; nothing to mix with.
                continue;
            }
            let p = Producer::attach(dev.clone()).unwrap();
            let (_, d2) = interrupt(&dev, p, &b2);
            dev.crash_keeping(subset(&d2, m2));
            let got = read_all(&dev);
            let mut with_b2 = a.clone();
            with_b2.extend(b2.iter().cloned());
            if got == with_b2 {
                seen_b2 += 1;
            } else {
                assert_eq!(got, a, "masks {m1:b}/{m2:b}: a mix of two failed commits");
            }
        }
    }
    assert!(seen_b2 > 0);
}

/// The producer syncs a consumer's advance before it writes into the space
/// that advance freed: otherwise a power loss could keep the new records
/// and lose the advance, bringing back a consumer position whose records
/// were overwritten.
#[test]
fn space_freed_by_an_unsynced_consumer_advance_is_not_overwritten_unsynced() {
    let dev = Arc::new(FaultyDevice::new((5 + 8) * SS as u64, SS));
    Producer::create(&dev).unwrap();
    let mut p = Producer::attach(dev.clone()).unwrap();
    let mut c = Consumer::attach(dev.clone()).unwrap();
    // Fill the ring with committed records.
    let mut pushed = Vec::new();
    for i in 0.. {
        match p.push(&payload(i, 400)) {
            Ok(_) => pushed.push(payload(i, 400)),
            Err(Error::Retry) => break,
            Err(e) => panic!("{e}"),
        }
    }
    p.advance().unwrap();
    // The consumer reads and frees the first half, but that advance's
    // second sync (after its control block) fails: the block is written,
    // not durable.
    let mut next = 0;
    for _ in 0..pushed.len() / 2 {
        next = c.pop().unwrap().next;
    }
    dev.set_faults(Faults {
        fail_sync: Some(1),
        ..Faults::default()
    });
    assert!(c.advance(next).is_err());
    // The producer sees the freed space and writes a record there, but
    // its own commit's sync fails too.
    let fresh = payload(200, 400);
    p.push(&fresh).unwrap();
    dev.set_faults(Faults {
        fail_sync: Some(0),
        ..Faults::default()
    });
    assert!(p.advance().is_err());
    // Power loss keeps the new record's sectors but no consumer control
    // slot (sectors 3 and 4) that is not durable.
    dev.crash_keeping(|s| s != 3 && s != 4);
    let got = read_all(&dev);
    let half = pushed[pushed.len() / 2..].to_vec();
    let mut with_fresh = half.clone();
    with_fresh.push(fresh);
    assert!(
        got == half || got == with_fresh,
        "recovered {} records",
        got.len()
    );
}

/// The consumer may read a commit whose sync has not finished (it reads
/// what the producer wrote) and free part of it. Readers trust a commit
/// the consumer position is past, so a consumer advance must make that
/// commit durable before its own control block can be: it syncs first.
/// Fail either of the advance's two syncs, lose power keeping every
/// control sector (and nothing else unsynced): the ring must come back
/// readable, as "A only" or "N durable, its first record freed".
#[test]
fn a_consumer_advance_into_an_unsynced_commit_survives_power_loss() {
    let a = payload(1, 100);
    let n: Vec<Vec<u8>> = (2..5).map(|t| payload(t, 700)).collect();
    for failing in [0, 1] {
        let dev = Arc::new(FaultyDevice::new((5 + 32) * SS as u64, SS));
        Producer::create(&dev).unwrap();
        let mut p = Producer::attach(dev.clone()).unwrap();
        p.push(&a).unwrap();
        p.advance().unwrap();
        // Attached before the interrupted commit (attach syncs).
        let mut c = Consumer::attach(dev.clone()).unwrap();
        interrupt(&dev, p, &n);
        assert_eq!(c.pop().unwrap().data, a);
        let first = c.pop().unwrap();
        assert_eq!(first.data, n[0], "the consumer sees the unsynced commit");
        dev.set_faults(Faults {
            fail_sync: Some(failing),
            ..Faults::default()
        });
        assert!(c.advance(first.next).is_err());
        // Sector 0 is the header, 1-2 the producer's slots, 3-4 the
        // consumer's.
        dev.crash_keeping(|s| s <= 4);
        let got = read_all(&dev);
        let expected = if failing == 0 {
            vec![a.clone()]
        } else {
            n[1..].to_vec()
        };
        assert_eq!(got, expected, "sync {failing} of the advance failed");
    }
}
