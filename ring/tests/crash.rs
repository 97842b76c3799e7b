//! Crash tests: a scripted run of producer and consumer on a
//! [`FaultyDevice`], interrupted at every write (power loss before it, or
//! a torn write after each of its sectors), at every failed write and at
//! every failed sync. After the failure both sides attach again and must
//! find every record whose `advance` returned `Ok` intact and in order,
//! nothing that was never advanced, and the batch whose `advance` was
//! interrupted either whole or not at all. Records damaged on the device
//! must come back as `Error::Corrupt` with their position, never as data.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tt_ring::{BlockDevice, Consumer, Error, Faults, FaultyDevice, Item, MemDevice, Producer};

const HEADER_SECTORS: u64 = 5;

fn align_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

fn record_size(len: u64) -> u64 {
    align_up(8 + len, 8)
}

fn payload(id: u64, len: u64) -> Vec<u8> {
    let mut v: Vec<u8> = (0..len)
        .map(|i| (id.wrapping_mul(131) ^ i.wrapping_mul(7)) as u8)
        .collect();
    let tag = id.to_le_bytes();
    let n = v.len().min(8);
    v[..n].copy_from_slice(&tag[..n]);
    v
}

/// A small deterministic generator, so every replay of a script is the same.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Debug, Clone, Copy)]
enum Step {
    Push(u64),
    ProducerAdvance,
    ProducerState,
    Pop,
    Fold,
    /// Free up to the end of the last popped record (or the fold's cursor).
    ConsumerAdvance,
    Suspend,
    Resume,
    ConsumerReattach,
}

/// A random script of about `steps` steps for a ring whose largest item
/// is `max`.
fn script(seed: u64, steps: usize, max: u64) -> Vec<Step> {
    let mut r = Rng(seed);
    let mut v = Vec::new();
    while v.len() < steps {
        match r.below(100) {
            0..=24 => v.push(Step::Push(r.below(48).min(max))),
            25..=36 => v.push(Step::Push(r.below(max.min(1500) + 1))),
            37..=52 => v.push(Step::ProducerAdvance),
            53..=67 => v.push(Step::Pop),
            68..=73 => v.push(Step::Fold),
            74..=92 => v.push(Step::ConsumerAdvance),
            // An item of nearly the largest size, into an emptied ring.
            93..=94 => v.extend([
                Step::ProducerAdvance,
                Step::Fold,
                Step::ConsumerAdvance,
                Step::Push(max - r.below(max.min(16) + 1)),
                Step::ProducerAdvance,
            ]),
            // A suspend/resume handshake: each step writes a control block.
            95..=96 => v.extend([
                Step::ProducerAdvance,
                Step::Suspend,
                Step::Push(1),
                Step::Resume,
                Step::ProducerState,
            ]),
            97..=98 => v.push(Step::Pop),
            _ => v.push(Step::ConsumerReattach),
        }
    }
    v
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rec {
    position: u64,
    next: u64,
    data: Vec<u8>,
}

impl Rec {
    fn is(&self, it: &Item) -> bool {
        self.position == it.position && self.next == it.next && self.data == it.data
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Producer,
    Consumer,
}

/// What the run has been told so far: which records are committed (their
/// `advance` returned `Ok`), which batch was being committed when the
/// failure hit, and how far the consumer has durably freed.
#[derive(Default, Debug)]
struct Track {
    sector: u64,
    committed: Vec<Rec>,
    committed_pos: u64,
    staged: Vec<Rec>,
    /// The batch whose `advance` failed, and the position it would commit.
    in_flight: Option<(Vec<Rec>, u64)>,
    freed: u64,
    /// The position a failed consumer `advance` tried to free up to.
    freeing: Option<u64>,
    last_next: Option<u64>,
    next_id: u64,
    commits: u64,
    consumer_advances: u64,
}

/// The handles at the end of a run, and the error that stopped it early
/// with the side that got it.
struct Outcome<D: BlockDevice> {
    p: Producer<D>,
    c: Consumer<D>,
    failure: Option<(Side, Error)>,
}

/// Run `steps` against the ring on `dev`, stopping at the first error.
/// `arm` runs once both sides are attached (attach syncs the device), so
/// that fault counters count the steps' writes and syncs only.
fn run<D: BlockDevice + Clone>(
    dev: &D,
    steps: &[Step],
    t: &mut Track,
    arm: &dyn Fn(),
) -> Outcome<D> {
    let mut p = Producer::attach(dev.clone()).unwrap();
    let mut c = Consumer::attach(dev.clone()).unwrap();
    arm();
    macro_rules! fail {
        ($side:expr, $e:expr) => {
            return Outcome {
                p,
                c,
                failure: Some(($side, $e)),
            }
        };
    }
    for &step in steps {
        match step {
            Step::Push(len) => {
                let data = payload(t.next_id, len);
                match p.push(&data) {
                    Ok(position) => {
                        let end = t.staged.last().map_or(t.committed_pos, |r| r.next);
                        assert_eq!(position, end, "push position");
                        t.staged.push(Rec {
                            position,
                            next: position + record_size(len),
                            data,
                        });
                        t.next_id += 1;
                    }
                    Err(Error::Retry | Error::Suspended) => {}
                    Err(e) => fail!(Side::Producer, e),
                }
            }
            Step::ProducerAdvance => {
                let end = t.staged.last().map_or(t.committed_pos, |r| r.next);
                let padded = align_up(end, t.sector);
                match p.advance() {
                    Ok(position) => {
                        assert_eq!(position, padded, "advance position");
                        if !t.staged.is_empty() {
                            t.commits += 1;
                        }
                        t.committed.append(&mut t.staged);
                        t.committed_pos = position;
                    }
                    Err(e) => {
                        t.in_flight = Some((std::mem::take(&mut t.staged), padded));
                        fail!(Side::Producer, e)
                    }
                }
            }
            Step::ProducerState => {
                if let Err(e) = p.state() {
                    fail!(Side::Producer, e)
                }
            }
            Step::Pop => match c.pop() {
                Ok(it) => {
                    assert!(
                        t.committed.iter().any(|r| r.is(&it)),
                        "popped a record that was never committed: {it:?}"
                    );
                    t.last_next = Some(it.next);
                }
                Err(Error::Retry) => {}
                Err(e) => fail!(Side::Consumer, e),
            },
            Step::Fold => match c.fold(Vec::new(), |mut v, it| {
                v.push(it);
                v
            }) {
                Ok((items, cursor)) => {
                    for it in &items {
                        assert!(
                            t.committed.iter().any(|r| r.is(it)),
                            "folded a record that was never committed: {it:?}"
                        );
                    }
                    t.last_next = Some(cursor);
                }
                Err(e) => fail!(Side::Consumer, e),
            },
            Step::ConsumerAdvance => {
                if let Some(to) = t.last_next {
                    match c.advance(to) {
                        Ok(()) => {
                            t.freed = to;
                            t.consumer_advances += 1;
                        }
                        Err(e) => {
                            t.freeing = Some(to);
                            fail!(Side::Consumer, e)
                        }
                    }
                }
            }
            Step::Suspend => match c.suspend() {
                Ok(()) | Err(Error::Retry) => {}
                Err(e) => fail!(Side::Consumer, e),
            },
            Step::Resume => match c.resume() {
                Ok(()) | Err(Error::Retry) => {}
                Err(e) => fail!(Side::Consumer, e),
            },
            Step::ConsumerReattach => {
                // attach syncs the device, so a failing sync can land here.
                let dev = c.detach();
                match Consumer::attach(dev.clone()) {
                    Ok(fresh) => c = fresh,
                    Err(e) => {
                        c = Consumer::attach(dev).expect("re-attach after a failed sync");
                        fail!(Side::Consumer, e)
                    }
                }
                t.last_next = None;
            }
        }
    }
    Outcome {
        p,
        c,
        failure: None,
    }
}

fn collect<D: BlockDevice>(c: &mut Consumer<D>, what: &str) -> (Vec<Item>, u64) {
    c.fold(Vec::new(), |mut v, it| {
        v.push(it);
        v
    })
    .unwrap_or_else(|e| panic!("{what}: reading the ring after the failure: {e}"))
}

/// Attach again and check that what the ring holds agrees with `t`.
/// With `exercise`, also check that the ring keeps working: free
/// everything, lift any suspension, push, commit and read back new records.
fn check_recovered<D: BlockDevice + Clone>(dev: &D, t: &Track, exercise: bool, what: &str) {
    let mut p = Producer::attach(dev.clone())
        .unwrap_or_else(|e| panic!("{what}: producer attach after the failure: {e}"));
    let mut c = Consumer::attach(dev.clone())
        .unwrap_or_else(|e| panic!("{what}: consumer attach after the failure: {e}"));

    let committed = p.position();
    let with_in_flight = match &t.in_flight {
        Some((_, padded)) if committed == *padded && committed != t.committed_pos => true,
        _ => {
            assert_eq!(
                committed, t.committed_pos,
                "{what}: producer position is neither the last committed one nor the in-flight one"
            );
            false
        }
    };
    let freed = c.position();
    assert!(
        freed == t.freed || Some(freed) == t.freeing,
        "{what}: consumer position {freed}: expected {} or {:?}",
        t.freed,
        t.freeing
    );

    let mut want: Vec<&Rec> = t.committed.iter().collect();
    if with_in_flight {
        want.extend(t.in_flight.as_ref().unwrap().0.iter());
    }
    want.retain(|r| r.position >= freed);
    let (got, cursor) = collect(&mut c, what);
    assert_eq!(
        got.len(),
        want.len(),
        "{what}: delivered {} records, expected {} (in flight included: {with_in_flight})",
        got.len(),
        want.len()
    );
    for (g, w) in got.iter().zip(&want) {
        assert!(w.is(g), "{what}: delivered {g:?}, expected {w:?}");
    }
    assert_eq!(cursor, committed, "{what}: cursor after reading everything");

    if !exercise {
        return;
    }
    c.advance(cursor).unwrap();
    loop {
        match c.resume() {
            Ok(()) => break,
            Err(Error::Retry) => {
                p.state().unwrap();
            }
            Err(e) => panic!("{what}: resume: {e}"),
        }
    }
    let lens = [0, 17, p.max_item() / 2, 3];
    let mut pushed = Vec::new();
    for (i, &len) in lens.iter().enumerate() {
        let data = payload(1_000_000 + i as u64, len);
        match p.push(&data) {
            Ok(pos) => pushed.push((pos, data)),
            Err(Error::Retry) => break,
            Err(e) => panic!("{what}: push after recovery: {e}"),
        }
    }
    assert!(
        pushed.len() >= 3,
        "{what}: an empty ring took only {pushed:?}"
    );
    p.advance().unwrap();
    let (got, _) = collect(&mut c, what);
    let got: Vec<(u64, Vec<u8>)> = got.into_iter().map(|it| (it.position, it.data)).collect();
    assert_eq!(got, pushed, "{what}: records pushed after recovery");
}

/// A [`BlockDevice`] that records the size (in sectors) of every write and
/// counts syncs, to know the fault points of a run.
struct Recorder {
    dev: Arc<FaultyDevice>,
    writes: Mutex<Vec<u64>>,
    syncs: AtomicU64,
}

impl BlockDevice for Recorder {
    fn sector_size(&self) -> u32 {
        self.dev.sector_size()
    }
    fn size(&self) -> u64 {
        self.dev.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.dev.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let sectors = (buf.len() as u64).div_ceil(self.sector_size() as u64);
        self.writes.lock().unwrap().push(sectors);
        self.dev.write_at(buf, offset)
    }
    fn sync(&self) -> std::io::Result<()> {
        self.syncs.fetch_add(1, Ordering::Relaxed);
        self.dev.sync()
    }
}

fn fresh(ss: u32, data_sectors: u64) -> Arc<FaultyDevice> {
    let d = Arc::new(FaultyDevice::new(
        (HEADER_SECTORS + data_sectors) * ss as u64,
        ss,
    ));
    Producer::create(&d).unwrap();
    d
}

/// Run `steps` with `faults` injected; return what the run was told and
/// the side and error that stopped it (if any).
fn run_with(
    ss: u32,
    data_sectors: u64,
    steps: &[Step],
    faults: Faults,
) -> (Arc<FaultyDevice>, Track, Option<(Side, Error)>) {
    let dev = fresh(ss, data_sectors);
    let mut t = Track {
        sector: ss as u64,
        ..Track::default()
    };
    let Outcome {
        mut p,
        mut c,
        failure,
    } = run(&dev, steps, &mut t, &|| dev.set_faults(faults));
    let stopped = match failure {
        None => None,
        Some((side, e)) => {
            if side == Side::Producer {
                // The producer's view is uncertain after a failed write
                // or sync: it must refuse to go on.
                assert!(
                    matches!(p.advance(), Err(Error::Poisoned)),
                    "producer not poisoned after {e}"
                );
                assert!(matches!(p.push(b"x"), Err(Error::Poisoned)));
            }
            if !dev.is_dead() {
                // A failed consumer advance is safe to retry.
                if let Some(to) = t.freeing {
                    c.advance(to)
                        .unwrap_or_else(|e| panic!("retrying a failed consumer advance: {e}"));
                    t.freed = to;
                    t.freeing = None;
                }
            }
            Some((side, e))
        }
    };
    (dev, t, stopped)
}

struct Clean {
    steps: Vec<Step>,
    writes: Vec<u64>,
    syncs: u64,
}

fn clean_run(ss: u32, data_sectors: u64, script: Script) -> Clean {
    let max = {
        let d = fresh(ss, data_sectors);
        Producer::attach(d).unwrap().max_item()
    };
    let steps = script.steps(max);
    let dev = fresh(ss, data_sectors);
    dev.set_faults(Faults::default()); // count from here, as run_with does
    let rec = Arc::new(Recorder {
        dev: dev.clone(),
        writes: Mutex::new(Vec::new()),
        syncs: AtomicU64::new(0),
    });
    let mut t = Track {
        sector: ss as u64,
        ..Track::default()
    };
    assert!(
        run(&rec, &steps, &mut t, &|| {
            rec.writes.lock().unwrap().clear();
            rec.syncs.store(0, Ordering::Relaxed);
        })
        .failure
        .is_none(),
        "the clean run fails"
    );
    let cap = data_sectors * ss as u64;
    assert!(
        t.committed_pos > cap + data_sectors / 2 * ss as u64,
        "the script should wrap around the ring (committed {}, capacity {cap})",
        t.committed_pos
    );
    assert!(
        match script {
            Script::LargeItems => t.commits == 3 && t.consumer_advances == 3 && t.next_id == 5,
            Script::Random(..) => t.commits >= 10 && t.consumer_advances >= 10 && t.next_id >= 25,
        },
        "the script should commit and free often: {} records in {} commits, {} consumer advances",
        t.next_id,
        t.commits,
        t.consumer_advances
    );
    let writes = rec.writes.lock().unwrap().clone();
    assert_eq!(writes.len() as u64, dev.writes());
    check_recovered(&dev, &t, true, "clean run");
    let syncs = rec.syncs.load(Ordering::Relaxed);
    Clean {
        steps,
        writes,
        syncs,
    }
}

#[derive(Debug, Clone, Copy)]
enum Script {
    /// `script(seed, len, max_item)`.
    Random(u64, usize),
    /// Items of hundreds of KiB in a ring larger than the producer's 1 MiB
    /// write-behind buffer: a push writes staged sectors before the
    /// commit, and a batch wraps around the end of the data area.
    LargeItems,
}

impl Script {
    fn steps(self, max: u64) -> Vec<Step> {
        use Step::*;
        match self {
            Script::Random(seed, len) => script(seed, len, max),
            Script::LargeItems => vec![
                Push(max / 2 + 4096 * 20),
                Push(max / 2 - 4096 * 30),
                ProducerAdvance,
                Pop,
                ConsumerAdvance,
                Push(20),
                ProducerAdvance,
                Fold,
                ConsumerAdvance,
                Push(max * 3 / 4),
                Push(max / 5),
                ProducerAdvance,
                Pop,
                Pop,
                ConsumerAdvance,
            ],
        }
    }
}

/// The geometries and scripts of the crash tests: 512-byte sectors with a
/// roomy and a minimal ring, 4096-byte sectors, and large items.
const CASES: &[(u32, u64, Script)] = &[
    (512, 16, Script::Random(1, 220)),
    (512, 2, Script::Random(2, 240)),
    (4096, 3, Script::Random(3, 160)),
    (512, 9, Script::Random(4, 220)),
    (4096, 300, Script::LargeItems),
];

/// How many sectors of an `n`-sector write to let through when tearing it:
/// every count for short writes, the edges and the middle for long ones.
fn tear_points(n: u64) -> Vec<u64> {
    if n <= 16 {
        (0..=n).collect()
    } else {
        let mut v = vec![0, 1, 2, n / 2, n - 2, n - 1, n];
        v.dedup();
        v
    }
}

#[test]
fn power_loss_before_any_write_keeps_every_committed_record() {
    let mut runs = 0;
    for &(ss, n, script) in CASES {
        let clean = clean_run(ss, n, script);
        for k in 0..clean.writes.len() as u64 {
            let faults = Faults {
                crash_before_write: Some(k),
                ..Faults::default()
            };
            let (dev, t, stopped) = run_with(ss, n, &clean.steps, faults);
            let what = format!("{ss}x{n} {script:?}: crash before write {k}");
            assert!(
                stopped.is_some() && dev.is_dead(),
                "{what}: run did not stop"
            );
            dev.crash();
            check_recovered(&dev, &t, true, &what);
            runs += 1;
        }
    }
    eprintln!("{runs} crash points checked");
}

#[test]
fn torn_writes_keep_every_committed_record() {
    let mut runs = 0;
    for &(ss, n, script) in CASES {
        let clean = clean_run(ss, n, script);
        for (k, &sectors) in clean.writes.iter().enumerate() {
            // 0..sectors tear the write; `sectors` lets it land whole but
            // lose power before the caller hears of it.
            for kept in tear_points(sectors) {
                let faults = Faults {
                    tear_write: Some((k as u64, kept)),
                    ..Faults::default()
                };
                let (dev, t, stopped) = run_with(ss, n, &clean.steps, faults);
                let what =
                    format!("{ss}x{n} {script:?}: write {k} torn after {kept}/{sectors} sectors");
                assert!(
                    stopped.is_some() && dev.is_dead(),
                    "{what}: run did not stop"
                );
                dev.crash();
                check_recovered(&dev, &t, true, &what);
                runs += 1;
            }
        }
    }
    eprintln!("{runs} torn writes checked");
}

#[test]
fn a_failed_write_poisons_the_producer_and_loses_nothing_committed() {
    let mut runs = 0;
    for &(ss, n, script) in CASES {
        let clean = clean_run(ss, n, script);
        for k in 0..clean.writes.len() as u64 {
            let faults = Faults {
                fail_write: Some(k),
                ..Faults::default()
            };
            let (dev, t, stopped) = run_with(ss, n, &clean.steps, faults);
            let what = format!("{ss}x{n} {script:?}: write {k} fails");
            let (_, e) = stopped.unwrap_or_else(|| panic!("{what}: run did not stop"));
            assert!(matches!(e, Error::Io(_)), "{what}: {e}");
            // Without power loss, then after it.
            check_recovered(&dev, &t, false, &what);
            dev.crash();
            check_recovered(&dev, &t, true, &format!("{what}, then power loss"));
            runs += 1;
        }
    }
    eprintln!("{runs} failed writes checked");
}

#[test]
fn a_failed_sync_poisons_the_producer_and_loses_nothing_committed() {
    let mut runs = 0;
    let mut in_advance = 0;
    for &(ss, n, script) in CASES {
        let clean = clean_run(ss, n, script);
        for k in 0..clean.syncs {
            let faults = Faults {
                fail_sync: Some(k),
                ..Faults::default()
            };
            let (dev, t, stopped) = run_with(ss, n, &clean.steps, faults);
            let what = format!("{ss}x{n} {script:?}: sync {k} fails");
            let (side, e) = stopped.unwrap_or_else(|| panic!("{what}: run did not stop"));
            assert!(matches!(e, Error::Io(_)), "{what}: {e}");
            if side == Side::Producer && t.in_flight.is_some() {
                in_advance += 1;
            }
            check_recovered(&dev, &t, false, &what);
            dev.crash();
            check_recovered(&dev, &t, true, &format!("{what}, then power loss"));
            runs += 1;
        }
    }
    assert!(in_advance > 0, "no sync failed inside Producer::advance");
    eprintln!("{runs} failed syncs checked ({in_advance} inside advance)");
}

/// Interrupting `Producer::create` anywhere leaves a device that attach
/// rejects as not a ring, or a complete empty ring: never a half-made one.
#[test]
fn a_crash_during_create_leaves_no_ring_or_an_empty_one() {
    for (ss, n) in [(512u32, 4u64), (4096, 2)] {
        let size = (HEADER_SECTORS + n) * ss as u64;
        let writes = {
            let d = FaultyDevice::new(size, ss);
            Producer::create(&d).unwrap();
            d.writes()
        };
        let mut empty_rings = 0;
        let mut faults = Vec::new();
        for k in 0..=writes {
            faults.push(Faults {
                crash_before_write: Some(k),
                ..Faults::default()
            });
            for kept in 0..=1 {
                faults.push(Faults {
                    tear_write: Some((k, kept)),
                    ..Faults::default()
                });
            }
        }
        for f in faults {
            let d = Arc::new(FaultyDevice::new(size, ss));
            d.set_faults(f);
            let created = Producer::create(&d);
            d.crash();
            match Producer::attach(d.clone()) {
                Err(Error::NotARing(_)) => {
                    assert!(created.is_err(), "{f:?}: create succeeded, attach refuses");
                    assert!(matches!(
                        Consumer::attach(d.clone()),
                        Err(Error::NotARing(_))
                    ));
                }
                Ok(p) => {
                    assert_eq!(p.position(), 0, "{f:?}");
                    drop(p);
                    let t = Track {
                        sector: ss as u64,
                        ..Track::default()
                    };
                    check_recovered(&d, &t, true, &format!("{f:?}"));
                    empty_rings += 1;
                }
                Err(e) => panic!("{f:?}: attach after a crash in create: {e}"),
            }
        }
        // The last write of create is its commit point.
        assert!(empty_rings >= 1);
    }
}

/// Re-creating a used ring and crashing anywhere in it never brings the old
/// ring's records back as records of the new one.
#[test]
fn a_crash_while_recreating_a_used_ring_never_mixes_old_and_new() {
    let (ss, n) = (512u32, 6u64);
    let writes = {
        let d = FaultyDevice::new((HEADER_SECTORS + n) * ss as u64, ss);
        Producer::create(&d).unwrap();
        d.writes()
    };
    for k in 0..=writes {
        let d = fresh(ss, n);
        let mut p = Producer::attach(d.clone()).unwrap();
        for i in 0..5 {
            p.push(&payload(i, 100)).unwrap();
        }
        p.advance().unwrap();
        drop(p);
        d.set_faults(Faults {
            crash_before_write: Some(k),
            ..Faults::default()
        });
        let created = Producer::create(&d);
        d.crash();
        match (k, Consumer::attach(d.clone())) {
            // Nothing was written: the old ring is untouched.
            (0, Ok(mut c)) => assert_eq!(collect(&mut c, "old ring").0.len(), 5),
            (_, Err(Error::NotARing(_))) => assert!(created.is_err()),
            (_, Ok(mut c)) => {
                assert!(k >= writes, "crash before write {k}: a ring is back");
                assert!(collect(&mut c, "new ring").0.is_empty());
            }
            (_, Err(e)) => panic!("crash before write {k} of create: {e}"),
        }
    }
}

// ---------------------------------------------------------------------------
// Damaged records.

/// A 512 x 32 ring in memory holding records of 20, 1200 and 30 bytes
/// (the second spans three sectors), committed as one batch and followed
/// by a second commit; returns the device image and the three records.
fn committed_image() -> (Vec<u8>, Vec<Rec>) {
    let d = MemDevice::new((HEADER_SECTORS + 32) * 512, 512);
    Producer::create(&d).unwrap();
    let mut p = Producer::attach(&d).unwrap();
    let mut recs = Vec::new();
    for (i, len) in [20u64, 1200, 30].into_iter().enumerate() {
        let data = payload(i as u64, len);
        let position = p.push(&data).unwrap();
        recs.push(Rec {
            position,
            next: position + record_size(len),
            data,
        });
    }
    p.advance().unwrap();
    // A second commit after it, so the damage below lies in a commit that
    // is not the last one: a reader checks the last commit as a whole
    // against its control block and takes a damaged one for an
    // interrupted commit (see the single-sync tests), but reports damage
    // to any earlier commit record by record.
    p.push(&payload(99, 10)).unwrap();
    p.advance().unwrap();
    drop(p);
    (d.contents(), recs)
}

/// Byte offset in the image of stream position `pos` (first lap).
fn at(pos: u64) -> usize {
    (HEADER_SECTORS * 512 + pos) as usize
}

/// Read the damaged image: the records before `bad` come back intact, then
/// pop reports `Corrupt` at `bad`'s position, again on a second try (the
/// cursor stays put), and fold does too.
fn expect_corrupt_at(image: Vec<u8>, recs: &[Rec], bad: usize, bad_pos: u64, what: &str) {
    let d = MemDevice::from_bytes(image, 512);
    let mut c = Consumer::attach(&d).unwrap();
    for r in &recs[..bad] {
        let it = c
            .pop()
            .unwrap_or_else(|e| panic!("{what}: record before the damage: {e}"));
        assert!(r.is(&it), "{what}: {it:?}");
    }
    let cursor = c.cursor();
    for attempt in 0..2 {
        match c.pop() {
            Err(Error::Corrupt {
                position: Some(p), ..
            }) => assert_eq!(p, bad_pos, "{what}: attempt {attempt}"),
            other => {
                panic!("{what}: attempt {attempt}: expected Corrupt at {bad_pos}, got {other:?}")
            }
        }
        assert_eq!(
            c.cursor(),
            cursor,
            "{what}: the cursor moved past a bad record"
        );
    }
    match c.fold(0, |n, _| n + 1) {
        Err(Error::Corrupt {
            position: Some(p), ..
        }) => assert_eq!(p, bad_pos, "{what}: fold"),
        other => panic!("{what}: fold: expected Corrupt at {bad_pos}, got {other:?}"),
    }
}

#[test]
fn a_damaged_payload_byte_is_reported_as_corrupt_at_its_record() {
    let (mut img, recs) = committed_image();
    img[at(recs[1].position + 8 + 700)] ^= 0x40;
    expect_corrupt_at(img, &recs, 1, recs[1].position, "flipped payload byte");
}

#[test]
fn a_torn_record_is_reported_as_corrupt_at_its_record() {
    // The record's middle sector never reached the disk (it still holds
    // zeroes, as a stale sector would).
    let (mut img, recs) = committed_image();
    let mid = at(512);
    assert!(at(recs[1].position) < mid && mid + 512 < at(recs[1].next));
    img[mid..mid + 512].fill(0);
    expect_corrupt_at(img, &recs, 1, recs[1].position, "torn record");

    // Only the first sector of the second record reached the disk; the
    // sectors after it hold stale bytes.
    let (mut img, recs) = committed_image();
    img[at(512)..at(3 * 512)].fill(0xee);
    expect_corrupt_at(img, &recs, 1, recs[1].position, "stale tail");
}

#[test]
fn a_damaged_record_header_is_reported_as_corrupt_at_its_record() {
    for (what, offset, value) in [
        ("length runs past the committed end", 0, 100_000u32),
        ("length one byte short", 0, 1199),
        ("length one byte long", 0, 1201),
        ("length claims padding", 0, u32::MAX),
        ("length is the largest possible", 0, u32::MAX - 1),
        ("checksum", 4, 0x1234_5678),
    ] {
        let (mut img, recs) = committed_image();
        let o = at(recs[1].position) + offset;
        img[o..o + 4].copy_from_slice(&value.to_le_bytes());
        expect_corrupt_at(img, &recs, 1, recs[1].position, what);
    }
}

#[test]
fn a_damaged_padding_record_is_reported_as_corrupt_at_its_position() {
    let (mut img, recs) = committed_image();
    let pad = recs[2].next;
    img[at(pad) + 4] ^= 1;
    expect_corrupt_at(img, &recs, 3, pad, "padding checksum");
}

#[test]
fn a_record_moved_or_from_another_ring_is_reported_as_corrupt() {
    // The first record copied over the third: its checksum binds it to
    // position 0.
    let (mut img, recs) = committed_image();
    let first = img[at(0)..at(recs[0].next)].to_vec();
    img[at(recs[2].position)..at(recs[2].position) + first.len()].copy_from_slice(&first);
    expect_corrupt_at(
        img,
        &recs,
        2,
        recs[2].position,
        "record from another position",
    );

    // The same records written to another ring (another identity): none of
    // them is accepted.
    let (mut img, recs) = committed_image();
    let (other, _) = committed_image();
    img[at(0)..at(recs[2].next)].copy_from_slice(&other[at(0)..at(recs[2].next)]);
    expect_corrupt_at(img, &recs, 0, 0, "records from another ring");
}

/// Control blocks that pass their checksum but hold positions at the very
/// end of the u64 range are refused as corrupt; they must not make
/// position arithmetic overflow (a panic, or wrapped positions).
#[test]
fn positions_at_the_end_of_the_range_are_refused_not_overflowed() {
    use tt_ring::format::{Control, Header, Side};
    let (ss, n) = (512u64, 8u64);
    let cap = ss * n;
    let set = |d: &MemDevice, position: u64| {
        let h = Header::read(d).unwrap();
        for side in [Side::Producer, Side::Consumer] {
            Control {
                seq: 2,
                position,
                start: position,
                ..Control::default()
            }
            .write(d, &h, side)
            .unwrap();
        }
    };
    for position in [
        u64::MAX - (ss - 1),
        u64::MAX - (cap - 1),
        u64::MAX / ss * ss - cap,
    ] {
        let d = MemDevice::new((HEADER_SECTORS + n) * ss, ss as u32);
        Producer::create(&d).unwrap();
        set(&d, position);
        assert!(
            matches!(
                Producer::attach(&d),
                Err(Error::Corrupt { position: None, .. })
            ),
            "producer attach at {position}"
        );
        assert!(
            matches!(
                Consumer::attach(&d),
                Err(Error::Corrupt { position: None, .. })
            ),
            "consumer attach at {position}"
        );
    }

    // A ring a few laps before the limit works as usual up to it, then
    // refuses to go on (Corrupt, not a panic or a wrapped position).
    let d = MemDevice::new((HEADER_SECTORS + n) * ss, ss as u32);
    Producer::create(&d).unwrap();
    let start = (u64::MAX - 3 * cap - (1 << 20)) / ss * ss - 4 * cap;
    set(&d, start);
    let mut p = Producer::attach(&d).unwrap();
    let mut c = Consumer::attach(&d).unwrap();
    let mut laps = 0;
    loop {
        let data = payload(laps, p.max_item() - laps * 100);
        let pos = match p.push(&data) {
            Ok(pos) => pos,
            Err(Error::Corrupt { position: None, .. }) => break,
            Err(e) => panic!("push at {}: {e}", p.position()),
        };
        p.advance().unwrap();
        let it = c.pop().unwrap();
        assert_eq!((it.position, it.data), (pos, data));
        c.advance(it.next).unwrap();
        laps += 1;
    }
    assert!(laps >= 4, "stopped after {laps} laps");
}
