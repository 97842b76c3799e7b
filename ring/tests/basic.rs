//! Basic behaviour of producer and consumer on one device.

use std::sync::Arc;
use tt_ring::{Consumer, Error, MemDevice, Producer, State};

fn ring(size: u64) -> Arc<MemDevice> {
    let d = Arc::new(MemDevice::new(size, 512));
    Producer::create(&d).unwrap();
    d
}

#[test]
fn pushed_items_are_invisible_until_advance_then_delivered_in_order() {
    let d = ring(64 << 10);
    let mut p = Producer::attach(d.clone()).unwrap();
    let mut c = Consumer::attach(d.clone()).unwrap();
    p.push(b"one").unwrap();
    p.push(b"").unwrap();
    assert!(matches!(c.pop(), Err(Error::Retry)));
    p.advance().unwrap();
    let a = c.pop().unwrap();
    let b = c.pop().unwrap();
    assert_eq!(
        (a.data.as_slice(), b.data.as_slice()),
        (&b"one"[..], &b""[..])
    );
    assert!(matches!(c.pop(), Err(Error::Retry)));
    c.advance(b.next).unwrap();
}

#[test]
fn full_ring_says_retry_and_frees_space_on_consumer_advance() {
    let d = ring(8 * 512); // 3 data sectors
    let mut p = Producer::attach(d.clone()).unwrap();
    let mut c = Consumer::attach(d.clone()).unwrap();
    let item = [7u8; 500];
    p.push(&item).unwrap();
    p.advance().unwrap();
    p.push(&item).unwrap();
    p.advance().unwrap();
    p.push(&item).unwrap();
    p.advance().unwrap();
    assert!(matches!(p.push(&item), Err(Error::Retry)));
    let (n, next) = c
        .fold(0, |n, it| {
            assert_eq!(it.data, item);
            n + 1
        })
        .unwrap();
    assert_eq!(n, 3);
    c.advance(next).unwrap();
    // Wraps around.
    for _ in 0..10 {
        p.push(&item).unwrap();
        p.advance().unwrap();
        let it = c.pop().unwrap();
        assert_eq!(it.data, item);
        c.advance(it.next).unwrap();
    }
}

#[test]
fn an_item_that_can_never_fit_is_refused() {
    let d = ring(8 * 512);
    let mut p = Producer::attach(d).unwrap();
    let max = p.max_item();
    assert!(matches!(
        p.push(&vec![0; max as usize + 1]),
        Err(Error::TooBig { .. })
    ));
    p.push(&vec![1; max as usize]).unwrap();
    p.advance().unwrap();
}

#[test]
fn suspend_handshake() {
    let d = ring(64 << 10);
    let mut p = Producer::attach(d.clone()).unwrap();
    let mut c = Consumer::attach(d.clone()).unwrap();
    c.suspend().unwrap();
    assert_eq!(c.state().unwrap(), State::Running, "not yet acknowledged");
    assert!(matches!(c.resume(), Err(Error::Retry)));
    assert!(matches!(p.push(b"x"), Err(Error::Suspended)));
    assert_eq!(c.state().unwrap(), State::Suspended);
    c.resume().unwrap();
    assert!(
        matches!(c.suspend(), Err(Error::Retry)),
        "resume not yet acknowledged"
    );
    p.push(b"x").unwrap();
    assert_eq!(c.state().unwrap(), State::Running);
}

/// A suspend requested while records are staged is acknowledged only
/// after they are committed: a consumer that saw the acknowledgement
/// never sees the ring grow afterwards.
#[test]
fn suspend_is_not_acknowledged_with_records_staged() {
    let d = ring(64 << 10);
    let mut p = Producer::attach(d.clone()).unwrap();
    let mut c = Consumer::attach(d.clone()).unwrap();
    p.push(b"staged").unwrap();
    c.suspend().unwrap();
    assert_eq!(p.state().unwrap(), State::Running, "records are staged");
    assert_eq!(c.state().unwrap(), State::Running);
    let end = p.advance().unwrap();
    assert!(matches!(p.push(b"late"), Err(Error::Suspended)));
    assert_eq!(c.state().unwrap(), State::Suspended);
    // Everything committed was committed before the acknowledgement.
    assert_eq!(c.pop().unwrap().data, b"staged");
    assert!(matches!(c.pop(), Err(Error::Retry)));
    assert_eq!(Producer::attach(d.clone()).unwrap().position(), end);
}

#[test]
fn attach_rejects_what_is_not_a_ring() {
    let zero = MemDevice::new(64 << 10, 512);
    assert!(matches!(Consumer::attach(&zero), Err(Error::NotARing(_))));
    let junk = MemDevice::from_bytes((0..65536u32).map(|i| (i * 7919 % 251) as u8).collect(), 512);
    assert!(matches!(Producer::attach(&junk), Err(Error::NotARing(_))));
    let short = MemDevice::new(0, 512);
    assert!(matches!(Consumer::attach(&short), Err(Error::NotARing(_))));
}

/// The producer checksums long payloads once and combines the CRCs, and
/// writes staged bytes out in 1 MiB pieces during a long batch. Every
/// commit must still carry the checksum readers compute: a new handle
/// accepts the last commit only if its data matches it (else it falls
/// back to the commit before, and the batch would be lost).
#[test]
fn long_mixed_batches_survive_reattach_with_their_checksums() {
    let d = Arc::new(MemDevice::new(3 << 20, 4096));
    Producer::create(&d).unwrap();
    let sizes = [100usize, 5000, 70_000, 3, 1023, 1024, 4096, 200_000, 0, 64];
    let item =
        |n: usize, len: usize| -> Vec<u8> { (0..len).map(|i| (i * 7 + n * 131) as u8).collect() };
    let mut n = 0;
    // Four commits of ~1.4 MiB each: each crosses the 1 MiB write-out
    // point and the stream wraps around the 3 MiB device.
    for _commit in 0..4 {
        let mut p = Producer::attach(d.clone()).unwrap();
        let first = n;
        let mut bytes = 0;
        while bytes < 1_400_000 {
            let len = sizes[n % sizes.len()];
            p.push(&item(n, len)).unwrap();
            bytes += len;
            n += 1;
        }
        let committed = p.advance().unwrap();
        drop(p);
        assert_eq!(Producer::attach(d.clone()).unwrap().position(), committed);
        let mut c = Consumer::attach(d.clone()).unwrap();
        for k in first..n {
            let got = c.pop().unwrap();
            assert_eq!(got.data, item(k, sizes[k % sizes.len()]), "item {k}");
        }
        assert!(matches!(c.pop(), Err(Error::Retry)));
        let end = c.cursor();
        c.advance(end).unwrap();
    }
}

/// A control block can pass its checksum with any `seq` (a crafted image,
/// since the checksum covers the ring's uuid). One at `u64::MAX` cannot
/// be followed: the writes that would follow it fail as corruption,
/// instead of overflowing (a panic in debug builds; in release a wrapped
/// seq 0 that loses to the old block, so an acknowledged commit vanished).
#[test]
fn a_control_block_at_the_largest_seq_is_corruption_not_an_overflow() {
    use tt_ring::format::{Control, Header, Side};
    let exhausted = |side| {
        let d = ring(64 << 10);
        let h = Header::read(&*d).unwrap();
        Control {
            seq: u64::MAX,
            ..Control::default()
        }
        .write(&*d, &h, side)
        .unwrap();
        d
    };
    let d = exhausted(Side::Producer);
    let mut p = Producer::attach(d.clone()).unwrap();
    p.push(b"hello").unwrap();
    let e = p.advance().unwrap_err();
    assert!(
        matches!(&e, Error::Corrupt { what, .. } if what.contains("sequence number")),
        "{e}"
    );
    let d = exhausted(Side::Consumer);
    let mut c = Consumer::attach(d.clone()).unwrap();
    assert!(matches!(c.suspend(), Err(Error::Corrupt { .. })));
    let mut p = Producer::attach(d.clone()).unwrap();
    p.push(b"x").unwrap();
    p.advance().unwrap();
    c.pop().unwrap();
    let end = c.cursor();
    assert!(matches!(c.advance(end), Err(Error::Corrupt { .. })));
}
