use super::*;
use crate::block::testing::{contents, Cut, ModelImage, Power};
use crate::block::{FileBackend, Geometry, Info, ID_LEN};
use proptest::prelude::*;
use tt_ring::{FaultyDevice, Producer};

const SECTOR: u64 = 512;
const CAP: u64 = 64 * SECTOR;
const RING: u64 = 64 << 10;

fn info(name: &str) -> Info {
    Info {
        name: name.into(),
        geometry: Geometry {
            capacity: CAP,
            sector_size: SECTOR,
        },
        id: [7; ID_LEN],
        durable_writes: false,
        max_atomic_write: CAP,
    }
}

fn new_ring() -> Arc<FaultyDevice> {
    let r = Arc::new(FaultyDevice::new(RING, 512));
    Producer::create(&*r).unwrap();
    r
}

fn opts() -> Options {
    Options {
        journal: tt_journal::Config {
            retry_interval: Duration::from_millis(2),
            full_timeout: Duration::from_secs(5),
            ..Default::default()
        },
        drain_stall: Duration::from_secs(5),
        first_seq: 0,
    }
}

fn start<D: BlockDevice + Send + Sync + 'static, I: Image>(
    ring: Arc<D>,
    image: Arc<I>,
    o: Options,
) -> JournaledBackend<D, I> {
    JournaledBackend::start(info("disk"), "/img", ring, image, o, None).unwrap()
}

/// A write of `len` sectors at sector `at`, every byte `tag`.
fn write(at: u64, len: u64, tag: u8) -> Request {
    let g = info("disk").geometry;
    Request::write(&g, at * SECTOR, vec![tag; (len * SECTOR) as usize]).unwrap()
}

fn read(b: &mut dyn Backend, at: u64, len: u64) -> Vec<u8> {
    let g = b.info().geometry;
    match b.execute(Request::read(&g, at * SECTOR, len * SECTOR).unwrap()) {
        Ok(Response::Read(d)) => d,
        other => panic!("read: {other:?}"),
    }
}

/// `read` through [`Backend::read_into`], into three buffers cut at
/// byte offsets that are not sector boundaries.
fn read_split(b: &mut dyn Backend, at: u64, len: u64) -> Vec<u8> {
    let g = b.info().geometry;
    let n = (len * SECTOR) as usize;
    let (c1, c2) = (n / 3 + 1, n / 2 + 7);
    let mut buf = vec![0xeeu8; n];
    let (p, rest) = buf.split_at_mut(c1.min(n));
    let (q, r) = rest.split_at_mut(c2.min(rest.len()));
    let dst = [
        vm_memory::VolatileSlice::from(p),
        vm_memory::VolatileSlice::from(q),
        vm_memory::VolatileSlice::from(r),
    ];
    b.read_into(g.span(at * SECTOR, len * SECTOR).unwrap(), &dst)
        .unwrap();
    buf
}

/// Wait on the backend's eventfd and poll until `n` completions came.
fn reap(b: &mut dyn Backend, n: usize) -> Vec<Completion> {
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while out.len() < n {
        let mut pfd = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(b.event()),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, for the duration of the call.
        unsafe { libc::poll(&mut pfd, 1, 100) };
        b.poll(&mut out);
        assert!(
            Instant::now() < deadline,
            "{} of {n} completions",
            out.len()
        );
    }
    out
}

#[test]
fn reads_see_durable_writes_the_journal_has_not_applied() {
    let (ring, image) = (new_ring(), Arc::new(FaultyDevice::new(CAP, 512)));
    let mut o = opts();
    // The applier waits up to a minute before performing: nothing is
    // applied while the test looks.
    o.journal.flush_interval = Duration::from_secs(60);
    let mut b = start(ring, Arc::new(ModelImage(image.clone())), o);
    b.execute(write(0, 4, 1)).unwrap();
    b.execute(write(2, 4, 2)).unwrap(); // overlaps: newest wins
    b.execute(write(10, 1, 3)).unwrap();
    assert!(b.unapplied() >= 1, "the applier should still be waiting");
    assert!(contents(&image)[..8 * 512].iter().all(|&x| x == 0));
    let got = read(&mut b, 0, 12);
    let mut want = vec![0u8; 12 * 512];
    want[..2 * 512].fill(1);
    want[2 * 512..6 * 512].fill(2);
    want[10 * 512..11 * 512].fill(3);
    assert_eq!(got, want);
    // Shutdown drains: then the image itself holds it, durably.
    b.shutdown().unwrap();
    assert_eq!(b.unapplied(), 0);
    image.crash();
    assert_eq!(contents(&image)[..12 * 512], want[..]);
}

#[test]
fn a_write_larger_than_a_record_is_split_and_read_back_whole() {
    // A small ring: 4 KiB records, so the write takes two windows.
    let ring = Arc::new(FaultyDevice::new(RING / 2, 512));
    Producer::create(&*ring).unwrap();
    let image = Arc::new(FaultyDevice::new(CAP, 512));
    let mut b = start(ring, Arc::new(ModelImage(image.clone())), opts());
    let limit = b.info().max_atomic_write;
    assert_eq!(limit, record_limit(RING / 2, SECTOR));
    assert!(
        limit * (WINDOW as u64) < CAP,
        "the test needs a write longer than a window of records"
    );
    let g = b.info().geometry;
    let data: Vec<u8> = (0..CAP).map(|i| (i / 512) as u8 ^ 0x5a).collect();
    let before = b.next_seq();
    b.execute(Request::write(&g, 0, data.clone()).unwrap())
        .unwrap();
    assert_eq!(
        b.next_seq() - before,
        CAP.div_ceil(limit),
        "one seq per record"
    );
    assert_eq!(read(&mut b, 0, CAP / SECTOR), data);
    b.shutdown().unwrap();
    assert_eq!(contents(&image), data);
}

#[test]
fn many_requests_in_flight_complete_through_the_eventfd() {
    let (ring, image) = (new_ring(), Arc::new(FaultyDevice::new(CAP, 512)));
    let mut b = start(ring, Arc::new(ModelImage(image)), opts());
    for i in 0..CAP / SECTOR {
        b.submit(i, write(i, 1, i as u8 + 1)).unwrap();
    }
    assert!(matches!(b.execute(Request::Flush), Err(Error::Busy { .. })));
    let done = reap(&mut b, (CAP / SECTOR) as usize);
    let mut seen: Vec<u64> = done
        .iter()
        .map(|c| {
            assert!(matches!(c.result, Ok(Response::Written)), "{c:?}");
            c.user_data
        })
        .collect();
    seen.sort();
    assert_eq!(seen, (0..CAP / SECTOR).collect::<Vec<_>>());
    assert_eq!(b.in_flight(), 0);
    // A read, a flush and a get-id through the queue too.
    let g = b.info().geometry;
    b.submit(100, Request::read(&g, 5 * SECTOR, SECTOR).unwrap())
        .unwrap();
    b.submit(101, Request::Flush).unwrap();
    b.submit(102, Request::GetId).unwrap();
    let mut done = reap(&mut b, 3);
    done.sort_by_key(|c| c.user_data);
    assert_eq!(
        done[0].result.as_ref().unwrap(),
        &Response::Read(vec![6; 512])
    );
    assert_eq!(done[1].result.as_ref().unwrap(), &Response::Flushed);
    assert_eq!(done[2].result.as_ref().unwrap(), &Response::Id([7; ID_LEN]));
    b.shutdown().unwrap();
    assert!(matches!(
        b.submit(1, Request::Flush),
        Err(Error::ShutDown { .. })
    ));
}

#[test]
fn reopening_replays_unapplied_writes_before_start_returns() {
    let (ring, image) = (new_ring(), Arc::new(FaultyDevice::new(CAP, 512)));
    // The image's power is off: the applier cannot apply anything.
    let dead = Arc::new(Cut {
        dev: image.clone(),
        power: Power::new(0),
    });
    let mut b = start(ring.clone(), dead, opts());
    b.execute(write(3, 2, 9)).unwrap();
    b.execute(write(20, 1, 8)).unwrap();
    let last = b.next_seq() - 1;
    // Killed without a drain, then the power goes: only the ring has it.
    drop(b);
    ring.crash();
    image.crash();
    assert!(contents(&image).iter().all(|&x| x == 0));
    let mut b = start(ring, Arc::new(ModelImage(image.clone())), opts());
    let img = contents(&image);
    assert!(img[3 * 512..5 * 512].iter().all(|&x| x == 9));
    assert!(img[20 * 512..21 * 512].iter().all(|&x| x == 8));
    assert!(
        b.next_seq() > last,
        "sequence numbers continue after the replayed ones ({} <= {last})",
        b.next_seq()
    );
    b.shutdown().unwrap();
}

struct CountingLease {
    block: u64,
    reserved: Arc<Mutex<Vec<u64>>>,
}

impl SeqLease for CountingLease {
    fn reserve(&mut self, from: u64) -> std::io::Result<u64> {
        let limit = from + self.block;
        self.reserved.lock().unwrap().push(limit);
        Ok(limit)
    }
}

#[test]
fn sequence_numbers_never_go_back_across_restarts() {
    let (ring, image) = (new_ring(), Arc::new(FaultyDevice::new(CAP, 512)));
    let reserved = Arc::new(Mutex::new(Vec::new()));
    let lease = || {
        Some(Box::new(CountingLease {
            block: 4,
            reserved: reserved.clone(),
        }) as Box<dyn SeqLease>)
    };
    let mut b = JournaledBackend::start(
        info("disk"),
        "/img",
        ring.clone(),
        Arc::new(ModelImage(image.clone())),
        opts(),
        lease(),
    )
    .unwrap();
    for i in 0..10 {
        b.execute(write(i, 1, 1)).unwrap();
    }
    let used = b.next_seq();
    b.shutdown().unwrap();
    // The ring is empty now: tt-journal alone would start again at 0.
    let floor = *reserved.lock().unwrap().last().unwrap();
    assert!(floor >= used && reserved.lock().unwrap().len() >= 3);
    let mut o = opts();
    o.first_seq = floor;
    let b = JournaledBackend::start(
        info("disk"),
        "/img",
        ring,
        Arc::new(ModelImage(image)),
        o,
        lease(),
    )
    .unwrap();
    assert!(b.next_seq() >= used, "{} < {used}", b.next_seq());
}

/// An image whose every write fails.
struct BrokenImage;

impl Image for BrokenImage {
    fn read_at(&self, buf: &mut [u8], _: u64) -> std::io::Result<()> {
        buf.fill(0);
        Ok(())
    }
    fn write_at(&self, _: &[u8], _: u64) -> std::io::Result<()> {
        Err(std::io::Error::other("injected EIO"))
    }
    fn sync_data(&self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_drain_that_cannot_apply_fails_and_names_the_device() {
    let mut o = opts();
    o.drain_stall = Duration::from_millis(300);
    let ring = new_ring();
    let mut b = start(ring.clone(), Arc::new(BrokenImage), o);
    // Acknowledged: durable in the journal, whatever the image does.
    b.execute(write(1, 1, 4)).unwrap();
    assert_eq!(read(&mut b, 1, 1), vec![4; 512]);
    let e = b.shutdown().unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::Drain { pending: 1, .. }), "{msg}");
    assert!(
        msg.contains("'disk'") && msg.contains("injected EIO"),
        "{msg}"
    );
    assert!(msg.contains("tt-host journal drain /img"), "{msg}");
    drop(b);
    // A start on an image that still cannot be written fails, promptly,
    // naming the device and the image (no endless retry before boot).
    let t = Instant::now();
    let e = JournaledBackend::start(
        info("disk"),
        "/img",
        ring.clone(),
        Arc::new(BrokenImage),
        opts(),
        None,
    )
    .err()
    .unwrap();
    let msg = e.to_string();
    assert!(matches!(e, Error::Replay { .. }), "{msg}");
    assert!(msg.contains("'disk'") && msg.contains("/img"), "{msg}");
    assert!(t.elapsed() < Duration::from_secs(2));
    // It stayed in the ring: a start on a working image applies it.
    let image = Arc::new(FaultyDevice::new(CAP, 512));
    let mut b = start(ring, Arc::new(ModelImage(image.clone())), opts());
    assert!(contents(&image)[512..1024].iter().all(|&x| x == 4));
    b.shutdown().unwrap();
}

/// One step of a workload: (first sector, sectors, tag).
fn workload() -> Vec<(u64, u64, u8)> {
    vec![
        (0, 1, 1),
        (4, 8, 2),
        (6, 2, 3),
        (0, 40, 4), // several records
        (30, 3, 5),
        (63, 1, 6),
        (10, 20, 7),
        (1, 1, 8),
    ]
}

/// The power-loss model: the ring and the image on one power supply, cut
/// after every possible number of writes and syncs. After the cut, both
/// lose what they had not synced, tt-host starts again (replay) and
/// drains. Every acknowledged write must be on the image; each sector
/// holds the last acknowledged write's data or that of the write that was
/// in flight at the cut.
#[test]
fn every_acknowledged_write_survives_a_power_cut_at_every_point() {
    let mut point = 0;
    let mut rounds_with_cut = 0;
    loop {
        let (ring, image) = (new_ring(), Arc::new(FaultyDevice::new(CAP, 512)));
        let power = Power::new(point);
        let cut = |d: &Arc<FaultyDevice>| {
            Arc::new(Cut {
                dev: d.clone(),
                power: power.clone(),
            })
        };
        let mut model = vec![0u8; CAP as usize];
        let mut in_flight: Option<(u64, u64, u8)> = None;
        let mut o = opts();
        o.drain_stall = Duration::from_millis(100);
        let started =
            JournaledBackend::start(info("disk"), "/img", cut(&ring), cut(&image), o, None);
        let mut finished = false;
        if let Ok(mut b) = started {
            finished = true;
            for (at, len, tag) in workload() {
                match b.execute(write(at, len, tag)) {
                    Ok(_) => {
                        model[(at * SECTOR) as usize..((at + len) * SECTOR) as usize].fill(tag)
                    }
                    Err(_) => {
                        in_flight = Some((at, len, tag));
                        finished = false;
                        break;
                    }
                }
            }
            if finished && b.shutdown().is_err() {
                finished = false;
            }
        }
        if finished {
            // No cut happened: every point has been tried.
            assert!(rounds_with_cut > 10, "only {rounds_with_cut} cut points");
            eprintln!("{rounds_with_cut} cut points");
            break;
        }
        rounds_with_cut += 1;
        // Power loss: unsynced sectors are gone on both devices. Then a
        // new run replays the ring into the image and drains.
        ring.crash();
        image.crash();
        let mut b = JournaledBackend::start(
            info("disk"),
            "/img",
            ring.clone(),
            Arc::new(ModelImage(image.clone())),
            opts(),
            None,
        )
        .unwrap_or_else(|e| panic!("cut at {point}: restart failed: {e}"));
        b.shutdown()
            .unwrap_or_else(|e| panic!("cut at {point}: drain failed: {e}"));
        image.crash(); // drained means synced
        let got = contents(&image);
        for s in 0..CAP / SECTOR {
            let r = (s * SECTOR) as usize..((s + 1) * SECTOR) as usize;
            let acked = model[r.start];
            let other = in_flight
                .filter(|(at, len, _)| (*at..at + len).contains(&s))
                .map(|(_, _, t)| t);
            let sector = &got[r];
            assert!(
                sector.iter().all(|&x| x == acked) || other.is_some_and(|t| sector.iter().all(|&x| x == t)),
                "cut at {point}: sector {s} holds {:?}..., want {acked} (acknowledged) or {other:?} (in flight)",
                &sector[..4]
            );
        }
        // Each record of the write in flight is all there or not at all.
        if let Some((at, len, tag)) = in_flight {
            let per = record_limit(RING, SECTOR) / SECTOR;
            for first in (at..at + len).step_by(per as usize) {
                let sectors = first..(first + per).min(at + len);
                let new: Vec<bool> = sectors
                    .clone()
                    .filter(|&s| model[(s * SECTOR) as usize] != tag)
                    .map(|s| got[(s * SECTOR) as usize] == tag)
                    .collect();
                assert!(
                    new.iter().all(|&n| n) || new.iter().all(|&n| !n),
                    "cut at {point}: record at sector {first} is torn: {new:?}"
                );
            }
        }
        point += 1;
    }
}

/// Both backends, and a plain vector, given the same requests, return the
/// same reads; so does the image once each has shut down.
fn same_as_model(ops: &[(bool, u64, u64, u8)], queued: bool) {
    let ring = new_ring();
    let (ji, fi) = (
        Arc::new(FaultyDevice::new(CAP, 512)),
        Arc::new(FaultyDevice::new(CAP, 512)),
    );
    let mut o = opts();
    // Keep some writes unapplied, so the overlay serves reads too.
    o.journal.flush_interval = Duration::from_millis(3);
    let mut j = start(ring, Arc::new(ModelImage(ji.clone())), o);
    let mut f = FileBackend::new(info("disk"), Arc::new(ModelImage(fi.clone()))).unwrap();
    let mut model = vec![0u8; CAP as usize];
    for &(is_write, at, len, tag) in ops {
        let (at, len) = (at % (CAP / SECTOR), len % 9 + 1);
        let len = len.min(CAP / SECTOR - at);
        let (a, b) = ((at * SECTOR) as usize, ((at + len) * SECTOR) as usize);
        for be in [&mut j as &mut dyn Backend, &mut f] {
            if is_write {
                let req = write(at, len, tag);
                if queued {
                    be.submit(0, req).unwrap();
                    let c = reap(be, 1);
                    assert!(c[0].result.is_ok(), "{:?}", c[0]);
                } else {
                    be.execute(req).unwrap();
                }
            } else {
                let mut want = model[a..b].to_vec();
                if is_write {
                    want.fill(tag);
                }
                assert_eq!(read(be, at, len), want, "read {at}+{len}");
                assert_eq!(read_split(be, at, len), want, "read_into {at}+{len}");
            }
        }
        if is_write {
            model[a..b].fill(tag);
        }
    }
    j.shutdown().unwrap();
    f.shutdown().unwrap();
    ji.crash();
    fi.crash();
    assert_eq!(contents(&ji), model, "journaled image");
    assert_eq!(contents(&fi), model, "plain image");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn both_backends_serve_the_same_reads_and_writes(
        ops in proptest::collection::vec((any::<bool>(), 0u64..64, 0u64..64, 1u8..255), 1..40),
        queued in any::<bool>(),
    ) {
        same_as_model(&ops, queued);
    }
}

/// The power-loss model with requests in flight together (a virtio
/// queue): batches of 8 writes are submitted at once and reaped through
/// the eventfd. After a cut at every point, each sector holds the data
/// of the last acknowledged write to it, or of a write submitted after
/// that one and never acknowledged.
#[test]
fn queued_writes_survive_a_power_cut_at_every_point() {
    // (first sector, sectors), tag = index + 1; a fixed pseudo-random mix.
    let mut x = 0x2545_f491_u64;
    let writes: Vec<(u64, u64)> = (0..24)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 33) % 60, (x >> 20) % 3 + 1)
        })
        .collect();
    let mut point = 0;
    loop {
        let (ring, image) = (new_ring(), Arc::new(FaultyDevice::new(CAP, 512)));
        let power = Power::new(point);
        let cut = |d: &Arc<FaultyDevice>| {
            Arc::new(Cut {
                dev: d.clone(),
                power: power.clone(),
            })
        };
        let mut o = opts();
        o.drain_stall = Duration::from_millis(100);
        // acked[i]: write i completed Ok.
        let mut acked = vec![false; writes.len()];
        let mut clean = false;
        if let Ok(mut b) =
            JournaledBackend::start(info("disk"), "/img", cut(&ring), cut(&image), o, None)
        {
            clean = true;
            for batch in (0..writes.len()).collect::<Vec<_>>().chunks(8) {
                for &i in batch {
                    let (at, len) = writes[i];
                    b.submit(i as u64, write(at, len, i as u8 + 1)).unwrap();
                }
                for c in reap(&mut b, batch.len()) {
                    if c.result.is_ok() {
                        acked[c.user_data as usize] = true;
                    } else {
                        clean = false;
                    }
                }
                if !clean {
                    break;
                }
            }
            clean = clean && b.shutdown().is_ok();
        }
        if clean {
            assert!(point > 10, "only {point} cut points");
            break;
        }
        ring.crash();
        image.crash();
        let mut b = JournaledBackend::start(
            info("disk"),
            "/img",
            ring.clone(),
            Arc::new(ModelImage(image.clone())),
            opts(),
            None,
        )
        .unwrap_or_else(|e| panic!("cut at {point}: restart failed: {e}"));
        b.shutdown().unwrap();
        image.crash();
        let got = contents(&image);
        for s in 0..CAP / SECTOR {
            let covers = |i: &usize| {
                let (at, len) = writes[*i];
                (at..at + len).contains(&s)
            };
            let last_acked = (0..writes.len()).rev().filter(covers).find(|&i| acked[i]);
            let mut allowed: Vec<u8> = vec![last_acked.map_or(0, |i| i as u8 + 1)];
            allowed.extend(
                (0..writes.len())
                    .filter(covers)
                    .filter(|&i| !acked[i] && last_acked.is_none_or(|a| i > a))
                    .map(|i| i as u8 + 1),
            );
            let sector = &got[(s * SECTOR) as usize..((s + 1) * SECTOR) as usize];
            assert!(
                allowed.iter().any(|&t| sector.iter().all(|&b| b == t)),
                "cut at {point}: sector {s} holds {:?}..., allowed {allowed:?}",
                &sector[..4]
            );
        }
        point += 1;
    }
}
