//! Fuzz a tt-ring through its API against a model.
//!
//! The input is decoded (see `decode`) into a ring geometry (512- or
//! 4096-byte sectors, 7 to 64 sectors) and up to `MAX_OPS` operations on a
//! producer and a consumer sharing one `FaultyDevice`: push, producer
//! advance, pop, fold, consumer advance (to the cursor, to a popped item's
//! `next`, or to a bad position), seek, suspend, resume, both sides'
//! `state`, re-attaching either side, a power loss (`crash`), and arming
//! injected device faults.
//!
//! Every outcome is checked against `Model`, which knows the rules:
//! - a push of payload length `len` is `TooBig` iff `len > max_item`; when
//!   nothing is staged it first acknowledges the consumer's suspend flag
//!   and is `Suspended` if that flag is set; it is `Retry` unless
//!   `align_up(end + s, sector) <= align_down(freed, sector) + capacity`
//!   (`s = align8(8 + len)`, `end` = committed + staged sizes); otherwise
//!   it returns `end`;
//! - advance commits the staged items and pads to the sector boundary;
//! - the consumer delivers exactly the committed items, in order, intact;
//!   `Retry` (cursor at the producer position) when there are no more;
//! - consumer advance accepts record boundaries between freed and cursor;
//! - suspend/resume/state follow the two-flag handshake (the producer's
//!   `state` acknowledges only with nothing staged);
//! - re-attaching the producer drops staged items; re-attaching the
//!   consumer moves its cursor back to the freed position.
//!
//! Injected faults: when an operation fails with an I/O error (only
//! allowed while faults are armed), the device loses power and both sides
//! attach again. What is durable must then be the state before or after
//! the failed operation (an advance that returned Ok is never lost, one
//! that failed may or may not have committed), and a fresh consumer must
//! read every committed record from the freed position intact and in
//! order, nothing else. The model continues from the state found.

#![no_main]

use std::collections::VecDeque;
use std::sync::Arc;

use libfuzzer_sys::arbitrary::{Result as AResult, Unstructured};
use libfuzzer_sys::fuzz_target;
use tt_ring::format::{self, record_size};
use tt_ring::{BlockDevice, Consumer, Error, Faults, FaultyDevice, Item, Producer, State};

type Dev = Arc<FaultyDevice>;

/// Operations per input, at most.
const MAX_OPS: usize = 512;

/// Attaching again after a failed sync without a power loss must report
/// only durable state (`attach` syncs the device first). `true` checks
/// exactly that; `false` would make the harness sync before re-attaching,
/// hiding a regression.
const STRICT_REATTACH: bool = true;

#[derive(Debug, Clone, Copy)]
enum Len {
    Small(u8),
    Any(u16),
    Max,
    TooBig(u8),
}

#[derive(Debug, Clone, Copy)]
enum FaultKind {
    FailWrite,
    FailSync,
    Tear(u8),
    CrashBeforeWrite,
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Push {
        len: Len,
        fill: u8,
    },
    Advance,
    Pop,
    Fold,
    FreeToCursor,
    FreeToItem(u8),
    FreeInvalid(u8),
    Seek(u8),
    Suspend,
    Resume,
    ProducerState,
    ConsumerState,
    ReattachProducer,
    ReattachConsumer,
    Crash,
    /// Arm a fault at the Nth device call from now. When it fires, either
    /// the power is lost (`power_loss`) or both sides just attach again.
    Fault {
        kind: FaultKind,
        n: u8,
        power_loss: bool,
    },
}

fn decode_op(u: &mut Unstructured) -> AResult<Op> {
    let tag: u8 = u.arbitrary()?;
    Ok(match tag % 26 {
        0..=6 => {
            let kind: u8 = u.arbitrary()?;
            let len = match kind % 8 {
                0..=3 => Len::Small(u.arbitrary()?),
                4 | 5 => Len::Any(u.arbitrary()?),
                6 => Len::Max,
                _ => Len::TooBig(u.arbitrary()?),
            };
            Op::Push {
                len,
                fill: u.arbitrary()?,
            }
        }
        7..=9 => Op::Advance,
        10..=12 => Op::Pop,
        13 => Op::Fold,
        14 => Op::FreeToCursor,
        15 => Op::FreeToItem(u.arbitrary()?),
        16 => Op::FreeInvalid(u.arbitrary()?),
        17 => Op::Seek(u.arbitrary()?),
        18 => Op::Suspend,
        19 => Op::Resume,
        20 => Op::ProducerState,
        21 => Op::ConsumerState,
        22 => Op::ReattachProducer,
        23 => Op::ReattachConsumer,
        24 => Op::Crash,
        _ => {
            let k: u8 = u.arbitrary()?;
            let kind = match k % 4 {
                0 => FaultKind::FailWrite,
                1 => FaultKind::FailSync,
                2 => FaultKind::Tear(k / 4 % 4),
                _ => FaultKind::CrashBeforeWrite,
            };
            Op::Fault {
                kind,
                n: u.arbitrary()?,
                power_loss: k & 0x80 != 0,
            }
        }
    })
}

/// Sector size, sector count and the operations.
fn decode(data: &[u8]) -> (u32, u64, Vec<Op>) {
    let mut u = Unstructured::new(data);
    let g: u8 = u.arbitrary().unwrap_or(0);
    let n: u8 = u.arbitrary().unwrap_or(0);
    let ss = if g & 1 == 1 { 4096 } else { 512 };
    let sectors = 7 + n as u64 % 58;
    let mut ops = Vec::new();
    while !u.is_empty() && ops.len() < MAX_OPS {
        match decode_op(&mut u) {
            Ok(op) => ops.push(op),
            Err(_) => break,
        }
    }
    (ss, sectors, ops)
}

fn align_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

fn align_down(x: u64, a: u64) -> u64 {
    x / a * a
}

/// The payload of an item: depends on its length and fill byte.
fn payload(len: u64, fill: u8) -> Vec<u8> {
    (0..len)
        .map(|i| fill.wrapping_add((i as u8).wrapping_mul(31)) ^ (i >> 8) as u8)
        .collect()
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rec {
    pos: u64,
    len: u64,
    fill: u8,
}

impl Rec {
    fn next(&self) -> u64 {
        self.pos + record_size(self.len)
    }
    fn out(&self) -> (u64, u64, Vec<u8>) {
        (self.pos, self.next(), payload(self.len, self.fill))
    }
}

/// An outcome, as the model predicts it or as the ring returned it.
#[derive(Debug, PartialEq, Eq)]
enum Out {
    Unit,
    Pos(u64),
    Item(u64, u64, Vec<u8>),
    Items(Vec<(u64, u64, Vec<u8>)>, u64),
    State(State),
    Retry,
    Suspended,
    TooBig { len: u64, max: u64 },
    Invalid,
}

fn item_out(it: Item) -> (u64, u64, Vec<u8>) {
    (it.position, it.next, it.data)
}

/// The ring's result as an `Out`; errors that no model outcome covers
/// (I/O, corruption, poisoned) are passed on.
fn conv<T>(r: Result<T, Error>, f: impl FnOnce(T) -> Out) -> Result<Out, Error> {
    match r {
        Ok(t) => Ok(f(t)),
        Err(Error::Retry) => Ok(Out::Retry),
        Err(Error::Suspended) => Ok(Out::Suspended),
        Err(Error::TooBig { len, max }) => Ok(Out::TooBig { len, max }),
        Err(Error::Invalid(_)) => Ok(Out::Invalid),
        Err(e) => Err(e),
    }
}

#[derive(Debug, Clone)]
struct Model {
    ss: u64,
    cap: u64,
    max_item: u64,
    /// Producer's committed position (durable).
    committed: u64,
    /// Pushed, not advanced.
    staged: Vec<Rec>,
    /// Committed records at or after `freed`, in order.
    ring: VecDeque<Rec>,
    /// Consumer's freed position (durable).
    freed: u64,
    /// Consumer's read cursor.
    cursor: u64,
    /// Consumer's suspend request (durable).
    c_flag: bool,
    /// Producer's acknowledgement (durable).
    p_flag: bool,
}

impl Model {
    fn new(ss: u64, sectors: u64) -> Model {
        let cap = (sectors - format::DATA_START) * ss;
        Model {
            ss,
            cap,
            max_item: (cap - ss - format::RECORD_HEADER).min(u32::MAX as u64 - 1),
            committed: 0,
            staged: Vec::new(),
            ring: VecDeque::new(),
            freed: 0,
            cursor: 0,
            c_flag: false,
            p_flag: false,
        }
    }

    fn end(&self) -> u64 {
        self.staged.last().map_or(self.committed, Rec::next)
    }

    fn push(&mut self, len: u64, fill: u8) -> Out {
        if len > self.max_item {
            return Out::TooBig {
                len,
                max: self.max_item,
            };
        }
        if self.staged.is_empty() {
            self.p_flag = self.c_flag;
            if self.p_flag {
                return Out::Suspended;
            }
        }
        let end = self.end();
        if align_up(end + record_size(len), self.ss) > align_down(self.freed, self.ss) + self.cap {
            return Out::Retry;
        }
        self.staged.push(Rec {
            pos: end,
            len,
            fill,
        });
        Out::Pos(end)
    }

    fn advance(&mut self) -> Out {
        if !self.staged.is_empty() {
            self.committed = align_up(self.end(), self.ss);
            self.ring.extend(self.staged.drain(..));
        }
        Out::Pos(self.committed)
    }

    fn pop(&mut self) -> Out {
        match self.ring.iter().find(|r| r.pos >= self.cursor) {
            Some(r) => {
                self.cursor = r.next();
                let (p, n, d) = r.out();
                Out::Item(p, n, d)
            }
            None => {
                self.cursor = self.committed;
                Out::Retry
            }
        }
    }

    fn fold(&mut self) -> Out {
        let items = self
            .ring
            .iter()
            .filter(|r| r.pos >= self.cursor)
            .map(Rec::out)
            .collect();
        self.cursor = self.committed;
        Out::Items(items, self.committed)
    }

    fn free(&mut self, pos: u64) -> Out {
        if pos < self.freed || pos > self.cursor || !pos.is_multiple_of(format::RECORD_ALIGN) {
            return Out::Invalid;
        }
        self.freed = pos;
        while self.ring.front().is_some_and(|r| r.pos < pos) {
            self.ring.pop_front();
        }
        Out::Unit
    }

    /// Only positions at or below the cursor are sought, so the consumer's
    /// possibly stale view of the producer position does not matter.
    fn seek(&mut self, pos: u64) -> Out {
        debug_assert!(pos <= self.cursor);
        if pos < self.freed || !pos.is_multiple_of(format::RECORD_ALIGN) {
            return Out::Invalid;
        }
        self.cursor = pos;
        Out::Unit
    }

    /// Records the consumer has popped and not freed.
    fn popped(&self) -> Vec<&Rec> {
        self.ring
            .iter()
            .filter(|r| r.next() <= self.cursor)
            .collect()
    }

    fn suspend(&mut self) -> Out {
        if self.c_flag {
            Out::Unit
        } else if self.p_flag {
            Out::Retry
        } else {
            self.c_flag = true;
            Out::Unit
        }
    }

    fn resume(&mut self) -> Out {
        if !self.c_flag {
            Out::Unit
        } else if !self.p_flag {
            Out::Retry
        } else {
            self.c_flag = false;
            Out::Unit
        }
    }

    fn flag_state(&self) -> Out {
        Out::State(if self.p_flag {
            State::Suspended
        } else {
            State::Running
        })
    }
}

struct Harness {
    dev: Dev,
    p: Producer<Dev>,
    c: Consumer<Dev>,
    m: Model,
    /// Faults are set (a failing device call is allowed).
    armed: bool,
    /// What to do when the armed fault fires.
    power_loss: bool,
}

impl Harness {
    fn new(ss: u32, sectors: u64) -> Harness {
        let dev = Arc::new(FaultyDevice::new(sectors * ss as u64, ss));
        Producer::create(&dev).expect("create");
        let p = Producer::attach(dev.clone()).expect("producer attach");
        let c = Consumer::attach(dev.clone()).expect("consumer attach");
        let m = Model::new(ss as u64, sectors);
        assert_eq!(p.max_item(), m.max_item);
        assert_eq!(p.debug_info().capacity, m.cap);
        Harness {
            dev,
            p,
            c,
            m,
            armed: false,
            power_loss: true,
        }
    }

    fn step(&mut self, op: Op) {
        let before = self.m.clone();
        let m = &mut self.m;
        let (expect, actual) = match op {
            Op::Push { len, fill } => {
                let len = match len {
                    Len::Small(b) => b as u64,
                    Len::Any(x) => x as u64 % (m.max_item + 1),
                    Len::Max => m.max_item,
                    Len::TooBig(b) => m.max_item + 1 + b as u64,
                };
                let data = payload(len, fill);
                (m.push(len, fill), conv(self.p.push(&data), Out::Pos))
            }
            Op::Advance => (m.advance(), conv(self.p.advance(), Out::Pos)),
            Op::Pop => (
                m.pop(),
                conv(self.c.pop(), |it| {
                    let (p, n, d) = item_out(it);
                    Out::Item(p, n, d)
                }),
            ),
            Op::Fold => (
                m.fold(),
                conv(
                    self.c.fold(Vec::new(), |mut v, it| {
                        v.push(item_out(it));
                        v
                    }),
                    |(v, end)| Out::Items(v, end),
                ),
            ),
            Op::FreeToCursor => {
                let pos = m.cursor;
                (m.free(pos), conv(self.c.advance(pos), |()| Out::Unit))
            }
            Op::FreeToItem(sel) => {
                let popped = m.popped();
                let pos = if popped.is_empty() {
                    m.cursor
                } else {
                    popped[sel as usize % popped.len()].next()
                };
                (m.free(pos), conv(self.c.advance(pos), |()| Out::Unit))
            }
            Op::FreeInvalid(sel) => {
                let pos = match sel % 3 {
                    0 if m.freed >= 8 => m.freed - 8,
                    1 => m.freed + 4,
                    _ => m.cursor + 8,
                };
                let expect = m.free(pos);
                assert_eq!(expect, Out::Invalid);
                (expect, conv(self.c.advance(pos), |()| Out::Unit))
            }
            Op::Seek(sel) => {
                let pos = if sel & 0x80 != 0 {
                    if sel & 1 == 0 && m.freed >= 8 {
                        m.freed - 8
                    } else {
                        m.freed + 4
                    }
                } else {
                    let mut cands: Vec<u64> = m.popped().iter().map(|r| r.pos).collect();
                    cands.push(m.freed);
                    cands.push(m.cursor);
                    cands[sel as usize % cands.len()]
                };
                if pos > m.cursor {
                    // freed + 4 past the cursor: invalid either way, but not
                    // something `Model::seek` reasons about.
                    (Out::Invalid, conv(self.c.seek(pos), |()| Out::Unit))
                } else {
                    (m.seek(pos), conv(self.c.seek(pos), |()| Out::Unit))
                }
            }
            Op::Suspend => (m.suspend(), conv(self.c.suspend(), |()| Out::Unit)),
            Op::Resume => (m.resume(), conv(self.c.resume(), |()| Out::Unit)),
            Op::ProducerState => {
                // Acknowledged only with nothing staged.
                if m.staged.is_empty() {
                    m.p_flag = m.c_flag;
                }
                (m.flag_state(), conv(self.p.state(), Out::State))
            }
            Op::ConsumerState => (m.flag_state(), conv(self.c.state(), Out::State)),
            Op::ReattachProducer => {
                m.staged.clear();
                let dev = self.dev.clone();
                let r = Producer::attach(dev).map(|p| self.p = p);
                (Out::Unit, conv(r, |()| Out::Unit))
            }
            Op::ReattachConsumer => {
                m.cursor = m.freed;
                let dev = self.dev.clone();
                let r = Consumer::attach(dev).map(|c| self.c = c);
                (Out::Unit, conv(r, |()| Out::Unit))
            }
            Op::Crash => {
                m.staged.clear();
                m.cursor = m.freed;
                let after = m.clone();
                self.recover(&after, true);
                return;
            }
            Op::Fault {
                kind,
                n,
                power_loss,
            } => {
                let n = n as u64 % 8;
                let mut f = Faults::default();
                match kind {
                    FaultKind::FailWrite => f.fail_write = Some(n),
                    FaultKind::FailSync => f.fail_sync = Some(n),
                    FaultKind::Tear(s) => f.tear_write = Some((n, s as u64 % 4)),
                    FaultKind::CrashBeforeWrite => f.crash_before_write = Some(n),
                }
                self.dev.set_faults(f);
                self.armed = true;
                self.power_loss = power_loss;
                return;
            }
        };
        match actual {
            Ok(out) => {
                assert_eq!(out, expect, "{op:?}");
                self.check_views(op);
            }
            Err(Error::Io(_)) if self.armed => {
                // Tears and crash-before-write leave the device dead: only
                // a power cycle brings it back.
                let power_loss = self.power_loss || self.dev.is_dead();
                self.recover(&before, power_loss);
            }
            Err(e) => panic!("{op:?}: unexpected error {e:?} (model expected {expect:?})"),
        }
    }

    /// Both handles agree with the model.
    fn check_views(&self, op: Op) {
        let (pi, ci) = (self.p.debug_info(), self.c.debug_info());
        let m = &self.m;
        assert_eq!(
            (pi.position, pi.cursor, pi.flag),
            (m.committed, m.end(), m.p_flag),
            "producer (position, end, flag) after {op:?}"
        );
        assert_eq!(
            (ci.position, ci.cursor, ci.flag),
            (m.freed, m.cursor, m.c_flag),
            "consumer (position, cursor, flag) after {op:?}"
        );
    }

    /// After a failed operation (or an explicit `Crash`): optionally lose
    /// power (unsynced writes are gone), then attach both sides again. The
    /// state found must be `before` or `self.m` (the model after the
    /// operation), component by component; the model continues from it.
    fn recover(&mut self, before: &Model, power_loss: bool) {
        let after = self.m.clone();
        if power_loss {
            self.dev.crash();
        } else {
            self.dev.set_faults(Faults::default());
            if !STRICT_REATTACH {
                // What `attach` should do itself (see STRICT_REATTACH):
                // make what it is about to read durable.
                self.dev.sync().expect("sync");
            }
        }
        self.armed = false;
        self.p = Producer::attach(self.dev.clone())
            .unwrap_or_else(|e| panic!("producer attach after a failure: {e:?}"));
        self.c = Consumer::attach(self.dev.clone())
            .unwrap_or_else(|e| panic!("consumer attach after a failure: {e:?}"));
        let (pi, ci) = (self.p.debug_info(), self.c.debug_info());
        let committed = pi.position;
        let mut ring = if committed == before.committed {
            before.ring.clone()
        } else if committed == after.committed {
            after.ring.clone()
        } else {
            panic!(
                "after recovery the producer is at {committed}; expected {} (before the failed operation) or {} (after it)",
                before.committed, after.committed
            );
        };
        let freed = ci.position;
        assert!(
            freed == before.freed || freed == after.freed,
            "after recovery the consumer is at {freed}; expected {} or {}",
            before.freed,
            after.freed
        );
        for (name, got, a, b) in [
            (
                "consumer suspend flag",
                ci.flag,
                before.c_flag,
                after.c_flag,
            ),
            (
                "producer suspend flag",
                pi.flag,
                before.p_flag,
                after.p_flag,
            ),
        ] {
            assert!(got == a || got == b, "after recovery the {name} is {got}");
        }
        assert_eq!((pi.other, ci.other), (freed, committed));
        ring.retain(|r| r.pos >= freed);
        self.m = Model {
            committed,
            staged: Vec::new(),
            ring,
            freed,
            cursor: freed,
            c_flag: ci.flag,
            p_flag: pi.flag,
            ..after
        };
        self.check_views(Op::Crash);
        self.check_contents();
    }

    /// A fresh consumer reads exactly the model's records from the freed
    /// position: every advanced record, intact, in order, and nothing else.
    fn check_contents(&self) {
        let mut c = Consumer::attach(self.dev.clone()).expect("consumer attach");
        let got = c
            .fold(Vec::new(), |mut v, it| {
                v.push(item_out(it));
                v
            })
            .unwrap_or_else(|e| panic!("reading the ring from the freed position: {e:?}"));
        let want: Vec<_> = self.m.ring.iter().map(Rec::out).collect();
        assert_eq!(got, (want, self.m.committed), "ring contents");
    }
}

fuzz_target!(|data: &[u8]| {
    let (ss, sectors, ops) = decode(data);
    let mut h = Harness::new(ss, sectors);
    for op in ops {
        h.step(op);
    }
    if h.armed {
        h.dev.set_faults(Faults::default());
        h.armed = false;
    }
    h.check_contents();
});
