//! Model-based tests: random sequences of producer and consumer operations
//! on small rings (so the stream wraps around often), each outcome compared
//! with a plain in-memory model of what the interface promises.
//!
//! The model keeps the committed records (position, next, payload), the
//! staged batch, the consumer's freed position and read cursor, and the
//! suspend handshake's two flags. Free space follows the ring's rule: a
//! record of size `s` fits iff
//! `align_up(end + s, sector) <= align_down(freed, sector) + capacity`,
//! where `end` is the committed position plus the staged record sizes and
//! every commit pads to a sector boundary.

use std::collections::VecDeque;
use std::sync::Arc;

use proptest::prelude::*;
use tt_ring::{Consumer, Error, Item, MemDevice, Producer, State};

const HEADER_SECTORS: u64 = 5;

fn align_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

fn align_down(x: u64, a: u64) -> u64 {
    x / a * a
}

fn record_size(len: u64) -> u64 {
    align_up(8 + len, 8)
}

/// Payload of the `id`th pushed item: recognisable, so a misplaced or
/// mixed-up record shows.
fn payload(id: u64, len: u64) -> Vec<u8> {
    let mut v: Vec<u8> = (0..len)
        .map(|i| (id.wrapping_mul(131) ^ i.wrapping_mul(7)) as u8)
        .collect();
    let tag = id.to_le_bytes();
    let n = v.len().min(8);
    v[..n].copy_from_slice(&tag[..n]);
    v
}

#[derive(Debug, Clone)]
enum Len {
    /// A small item (most pushes).
    Small(u64),
    /// Any size up to the largest the ring takes (`sel % (max + 1)`).
    Any(u64),
    /// `Producer::max_item()`.
    Max,
    /// More than `max_item()` by 1 + the value: `TooBig`.
    TooBig(u64),
    /// Exactly the largest item that fits right now (or max, if larger).
    FitsNow,
    /// One byte more than fits right now: `Retry` (unless suspended or too big).
    FitsNowPlusOne,
}

#[derive(Debug, Clone)]
enum Op {
    Push(Len),
    ProducerAdvance,
    ProducerState,
    ProducerReattach,
    Pop,
    Fold,
    /// Advance the consumer to a valid record boundary chosen by the value.
    ConsumerAdvance(usize),
    /// Advance the consumer to a position it must refuse.
    ConsumerAdvanceInvalid(u8),
    /// Seek the consumer to an unfreed record boundary chosen by the value.
    Seek(usize),
    Suspend,
    Resume,
    ConsumerState,
    ConsumerReattach,
}

fn op() -> impl Strategy<Value = Op> {
    op_with(6)
}

/// Operations with pushes of any size weighted `any_weight` (small: 12).
fn op_with(any_weight: u32) -> impl Strategy<Value = Op> {
    let len = prop_oneof![
        12 => (0u64..80).prop_map(Len::Small),
        any_weight => any::<u64>().prop_map(Len::Any),
        1 => Just(Len::Max),
        1 => (0u64..20).prop_map(Len::TooBig),
        2 => Just(Len::FitsNow),
        1 => Just(Len::FitsNowPlusOne),
    ];
    prop_oneof![
        30 => len.prop_map(Op::Push),
        10 => Just(Op::ProducerAdvance),
        2 => Just(Op::ProducerState),
        1 => Just(Op::ProducerReattach),
        16 => Just(Op::Pop),
        3 => Just(Op::Fold),
        14 => any::<usize>().prop_map(Op::ConsumerAdvance),
        1 => any::<u8>().prop_map(Op::ConsumerAdvanceInvalid),
        1 => any::<usize>().prop_map(Op::Seek),
        1 => Just(Op::Suspend),
        5 => Just(Op::Resume),
        1 => Just(Op::ConsumerState),
        1 => Just(Op::ConsumerReattach),
    ]
}

/// (sector size, data sectors): 7..40 sectors of 512 bytes, or a few
/// 4096-byte sectors.
fn geometry() -> impl Strategy<Value = (u32, u64)> {
    prop_oneof![
        3 => (Just(512u32), 2u64..=35),
        1 => (Just(4096u32), 2u64..=8),
    ]
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rec {
    position: u64,
    next: u64,
    data: Vec<u8>,
}

struct Model {
    ss: u64,
    cap: u64,
    max_item: u64,
    /// Producer's committed position.
    committed: u64,
    /// Staged records of the current batch.
    staged: Vec<Rec>,
    /// End of the staged records (== committed when nothing is staged).
    end: u64,
    /// Committed records not yet freed, in stream order.
    records: VecDeque<Rec>,
    freed: u64,
    cursor: u64,
    /// Suspend requested (consumer's flag) and acknowledged (producer's).
    requested: bool,
    acknowledged: bool,
    next_id: u64,
}

impl Model {
    fn new(ss: u64, data_sectors: u64) -> Model {
        let cap = ss * data_sectors;
        Model {
            ss,
            cap,
            max_item: (cap - ss - 8).min(u32::MAX as u64 - 1),
            committed: 0,
            staged: Vec::new(),
            end: 0,
            records: VecDeque::new(),
            freed: 0,
            cursor: 0,
            requested: false,
            acknowledged: false,
            next_id: 0,
        }
    }

    fn limit(&self) -> u64 {
        align_down(self.freed, self.ss) + self.cap
    }

    /// The largest payload that fits now, if any.
    fn fits_now(&self) -> Option<u64> {
        let room = self.limit().checked_sub(self.end)?;
        room.checked_sub(8)
    }

    fn push(&mut self, len: u64) -> Result<u64, Error> {
        if len > self.max_item {
            return Err(Error::TooBig {
                len,
                max: self.max_item,
            });
        }
        if self.staged.is_empty() {
            self.acknowledged = self.requested;
            if self.acknowledged {
                return Err(Error::Suspended);
            }
        }
        let size = record_size(len);
        if align_up(self.end + size, self.ss) > self.limit() {
            return Err(Error::Retry);
        }
        let position = self.end;
        self.staged.push(Rec {
            position,
            next: position + size,
            data: payload(self.next_id, len),
        });
        self.next_id += 1;
        self.end += size;
        Ok(position)
    }

    fn advance(&mut self) -> u64 {
        if !self.staged.is_empty() {
            self.committed = align_up(self.end, self.ss);
            self.end = self.committed;
            self.records.extend(self.staged.drain(..));
        }
        self.committed
    }

    fn pop(&mut self) -> Option<Rec> {
        match self.records.iter().find(|r| r.position >= self.cursor) {
            Some(r) => {
                self.cursor = r.next;
                Some(r.clone())
            }
            None => {
                // The consumer skips any padding up to the committed end.
                self.cursor = self.committed;
                None
            }
        }
    }

    /// Record boundaries the consumer may free up to: the freed position,
    /// the cursor, and the end of every record between them.
    fn advance_targets(&self) -> Vec<u64> {
        let mut t = vec![self.freed, self.cursor];
        t.extend(
            self.records
                .iter()
                .map(|r| r.next)
                .filter(|&n| n > self.freed && n <= self.cursor),
        );
        t
    }

    fn consumer_advance(&mut self, to: u64) {
        self.freed = to;
        while self.records.front().is_some_and(|r| r.position < to) {
            self.records.pop_front();
        }
    }

    /// Record boundaries the consumer may seek back to: the freed position
    /// and the start of every unfreed record before the cursor. (Seeking
    /// ahead is limited by the consumer's possibly stale view of the
    /// producer's position, which the model does not track.)
    fn seek_targets(&self) -> Vec<u64> {
        let mut t = vec![self.freed, self.cursor];
        t.extend(
            self.records
                .iter()
                .map(|r| r.position)
                .filter(|&p| p <= self.cursor),
        );
        t
    }

    fn state(&self) -> State {
        if self.acknowledged {
            State::Suspended
        } else {
            State::Running
        }
    }
}

fn same_item(got: &Item, want: &Rec) -> bool {
    got.position == want.position && got.next == want.next && got.data == want.data
}

/// Is `r` the outcome `want` (an error variant with no payload to compare)?
fn expect_err<T: std::fmt::Debug>(r: Result<T, Error>, want: &Error, what: &str) {
    let ok = matches!(
        (&r, want),
        (Err(Error::Retry), Error::Retry)
            | (Err(Error::Suspended), Error::Suspended)
            | (Err(Error::Invalid(_)), Error::Invalid(_))
    ) || matches!((&r, want),
        (Err(Error::TooBig { len: a, max: b }), Error::TooBig { len: c, max: d }) if a == c && b == d);
    assert!(ok, "{what}: got {r:?}, model says Err({want:?})");
}

fn run(ss: u32, data_sectors: u64, ops: &[Op]) {
    let dev = Arc::new(MemDevice::new(
        (HEADER_SECTORS + data_sectors) * ss as u64,
        ss,
    ));
    Producer::create(&dev).unwrap();
    let mut p = Some(Producer::attach(dev.clone()).unwrap());
    let mut c = Some(Consumer::attach(dev.clone()).unwrap());
    let mut m = Model::new(ss as u64, data_sectors);
    assert_eq!(p.as_ref().unwrap().max_item(), m.max_item);

    for (i, op) in ops.iter().enumerate() {
        let what = format!("op {i} {op:?}");
        let prod = p.as_mut().unwrap();
        let cons = c.as_mut().unwrap();
        match op {
            Op::Push(sel) => {
                let len = match *sel {
                    Len::Small(n) => n.min(m.max_item),
                    Len::Any(n) => n % (m.max_item + 1),
                    Len::Max => m.max_item,
                    Len::TooBig(n) => m.max_item + 1 + n,
                    Len::FitsNow => m.fits_now().unwrap_or(0).min(m.max_item),
                    Len::FitsNowPlusOne => m.fits_now().map_or(0, |n| n + 1),
                };
                let data = payload(m.next_id, len);
                let got = prod.push(&data);
                match m.push(len) {
                    Ok(pos) => assert_eq!(got.unwrap(), pos, "{what} (len {len})"),
                    Err(e) => expect_err(got, &e, &format!("{what} (len {len})")),
                }
            }
            Op::ProducerAdvance => {
                assert_eq!(prod.advance().unwrap(), m.advance(), "{what}");
            }
            Op::ProducerState => {
                if m.staged.is_empty() {
                    m.acknowledged = m.requested;
                }
                assert_eq!(prod.state().unwrap(), m.state(), "{what}");
            }
            Op::ProducerReattach => {
                let d = p.take().unwrap().detach();
                p = Some(Producer::attach(d).unwrap());
                m.staged.clear();
                m.end = m.committed;
            }
            Op::Pop => match (cons.pop(), m.pop()) {
                (Ok(got), Some(want)) => {
                    assert!(same_item(&got, &want), "{what}: {got:?} vs {want:?}")
                }
                (got, None) => expect_err(got, &Error::Retry, &what),
                (got, Some(want)) => panic!("{what}: got {got:?}, model says {want:?}"),
            },
            Op::Fold => {
                let (got, cursor) = cons
                    .fold(Vec::new(), |mut v, it| {
                        v.push(it);
                        v
                    })
                    .unwrap();
                let mut want = Vec::new();
                while let Some(r) = m.pop() {
                    want.push(r);
                }
                assert_eq!(got.len(), want.len(), "{what}");
                for (g, w) in got.iter().zip(&want) {
                    assert!(same_item(g, w), "{what}: {g:?} vs {w:?}");
                }
                assert_eq!(cursor, m.cursor, "{what}: cursor");
            }
            Op::ConsumerAdvance(sel) => {
                let t = m.advance_targets();
                let to = t[sel % t.len()];
                cons.advance(to)
                    .unwrap_or_else(|e| panic!("{what}: advance({to}): {e}"));
                m.consumer_advance(to);
            }
            Op::ConsumerAdvanceInvalid(kind) => {
                let to = match kind % 3 {
                    0 if m.freed >= 8 => m.freed - 8,
                    1 => m.cursor + 8,
                    _ => m.freed + 4,
                };
                expect_err(cons.advance(to), &Error::Invalid(String::new()), &what);
            }
            Op::Seek(sel) => {
                let t = m.seek_targets();
                let to = t[sel % t.len()];
                cons.seek(to)
                    .unwrap_or_else(|e| panic!("{what}: seek({to}): {e}"));
                m.cursor = to;
            }
            Op::Suspend => {
                let got = cons.suspend();
                if m.requested {
                    got.unwrap();
                } else if m.acknowledged {
                    expect_err(got, &Error::Retry, &what);
                } else {
                    got.unwrap();
                    m.requested = true;
                }
            }
            Op::Resume => {
                let got = cons.resume();
                if !m.requested {
                    got.unwrap();
                } else if !m.acknowledged {
                    expect_err(got, &Error::Retry, &what);
                } else {
                    got.unwrap();
                    m.requested = false;
                }
            }
            Op::ConsumerState => {
                assert_eq!(cons.state().unwrap(), m.state(), "{what}");
            }
            Op::ConsumerReattach => {
                let d = c.take().unwrap().detach();
                c = Some(Consumer::attach(d).unwrap());
                m.cursor = m.freed;
            }
        }
        let prod = p.as_ref().unwrap();
        let cons = c.as_ref().unwrap();
        assert_eq!(prod.position(), m.committed, "{what}: producer position");
        assert_eq!(prod.debug_info().cursor, m.end, "{what}: producer end");
        assert_eq!(cons.position(), m.freed, "{what}: consumer position");
        assert_eq!(cons.cursor(), m.cursor, "{what}: consumer cursor");
    }

    // Whatever happened, a fresh consumer sees exactly the unfreed
    // committed records.
    drop(p);
    drop(c);
    let mut cons = Consumer::attach(dev.clone()).unwrap();
    m.cursor = m.freed;
    let (got, _) = cons
        .fold(Vec::new(), |mut v, it| {
            v.push(it);
            v
        })
        .unwrap();
    let want: Vec<Rec> = m.records.iter().cloned().collect();
    assert_eq!(got.len(), want.len(), "final fold");
    for (g, w) in got.iter().zip(&want) {
        assert!(same_item(g, w), "final fold: {g:?} vs {w:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn ring_behaves_like_its_model(
        (ss, data_sectors) in geometry(),
        ops in prop::collection::vec(op(), 1..400),
    ) {
        run(ss, data_sectors, &ops);
    }
}

// Long runs on the smallest rings, where every push is near the
// boundaries: wrap-around, full ring, padding at every commit.
proptest! {
    #![proptest_config(ProptestConfig::with_cases(60))]

    #[test]
    fn tiny_rings_behave_like_their_model(
        ss in prop_oneof![Just(512u32), Just(4096u32)],
        data_sectors in 2u64..=3,
        ops in prop::collection::vec(op(), 500..1500),
    ) {
        run(ss, data_sectors, &ops);
    }
}

// Rings larger than the producer's 1 MiB write-behind buffer and the
// consumer's 256 KiB read-ahead, with items up to the largest: pushes
// that write staged sectors before the commit, reads that refill the
// read-ahead window mid-record.
proptest! {
    #![proptest_config(ProptestConfig::with_cases(8))]

    #[test]
    fn large_rings_behave_like_their_model(
        data_sectors in 300u64..=700,
        ops in prop::collection::vec(op_with(30), 20..120),
    ) {
        run(4096, data_sectors, &ops);
    }
}
