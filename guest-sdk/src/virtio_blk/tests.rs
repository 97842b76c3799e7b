//! The driver against a device model: a virtio-mmio register file and a
//! virtio-blk device that serves the split ring the driver wrote, in the
//! same memory (the test process's addresses play guest-physical ones).

use super::*;
use crate::manifest::{MftEntry, MftProps, MFT_DEV_BLOCK_BASIC};
use std::cell::RefCell;
use std::rc::Rc;
use std::vec::Vec;

const ID: &[u8] = b"tt-model-disk";

/// The device side.
struct Dev {
    magic: u32,
    version: u32,
    device_id: u32,
    offered: u64,
    driver_features: [u32; 2],
    dev_sel: u32,
    drv_sel: u32,
    status: u32,
    status_writes: Vec<u32>,
    reject_features: bool,
    num_max: u32,
    num: u32,
    ready: u32,
    desc: u64,
    avail: u64,
    used: u64,
    capacity: u64,
    blk_size: u32,
    seg_max: u32,
    generation: u32,
    /// Change the capacity to this (and bump the generation) right after
    /// the driver's first capacity read.
    capacity_change: Option<u64>,
    disk: Vec<u8>,
    last_avail: u16,
    used_idx: u16,
    /// Heads taken from the available ring, not yet completed.
    pending: Vec<u16>,
    /// Complete everything at once on each notify.
    auto: bool,
    /// Complete everything pending when the driver idles.
    complete_on_idle: bool,
    /// Status byte to answer for a request at this sector.
    fail: Vec<(u64, u8)>,
    /// Report this used length instead of the true one.
    used_len_override: Option<u32>,
    notifies: usize,
    idles: usize,
    clock: u64,
}

impl Dev {
    fn new(sectors: u64) -> Dev {
        Dev {
            magic: regs::MAGIC,
            version: 2,
            device_id: 2,
            offered: feature::VERSION_1
                | feature::BLK_FLUSH
                | feature::BLK_SIZE
                | feature::BLK_SEG_MAX
                | feature::RING_EVENT_IDX,
            driver_features: [0; 2],
            dev_sel: 0,
            drv_sel: 0,
            status: 0,
            status_writes: Vec::new(),
            reject_features: false,
            num_max: 256,
            num: 0,
            ready: 0,
            desc: 0,
            avail: 0,
            used: 0,
            capacity: sectors,
            blk_size: 4096,
            seg_max: 126,
            generation: 0,
            capacity_change: None,
            disk: vec![0; (sectors * SECTOR_SIZE) as usize],
            last_avail: 0,
            used_idx: 0,
            pending: Vec::new(),
            auto: true,
            complete_on_idle: true,
            fail: Vec::new(),
            used_len_override: None,
            notifies: 0,
            idles: 0,
            clock: 0,
        }
    }

    fn negotiated(&self) -> u64 {
        self.driver_features[0] as u64 | (self.driver_features[1] as u64) << 32
    }

    fn n(&self) -> u64 {
        self.num as u64
    }

    // SAFETY (for the four accessors below): the addresses are those the
    // driver under test gave the device for its live ring allocation, or a
    // request buffer it owns while the request is in flight; tests only
    // use them while the driver exists.
    fn rd16(a: u64) -> u16 {
        // SAFETY: see above.
        unsafe { (a as *const u16).read_volatile() }
    }
    fn wr16(a: u64, v: u16) {
        // SAFETY: see above.
        unsafe { (a as *mut u16).write_volatile(v) }
    }
    fn rd<T: Copy>(a: u64) -> T {
        // SAFETY: see above.
        unsafe { (a as *const T).read_volatile() }
    }
    fn wr<T: Copy>(a: u64, v: T) {
        // SAFETY: see above.
        unsafe { (a as *mut T).write_volatile(v) }
    }

    /// Take newly available heads.
    fn fetch(&mut self) {
        let idx = Dev::rd16(self.avail + 2);
        while self.last_avail != idx {
            let slot = self.last_avail as u64 % self.n();
            self.pending.push(Dev::rd16(self.avail + 4 + 2 * slot));
            self.last_avail = self.last_avail.wrapping_add(1);
        }
        // As a device with EVENT_IDX does: ask for a kick at the next entry.
        if self.negotiated() & feature::RING_EVENT_IDX != 0 {
            Dev::wr16(self.used + 4 + 8 * self.n(), self.last_avail);
        }
    }

    fn desc(&self, i: u16) -> (u64, u32, u16, u16) {
        let a = self.desc + 16 * i as u64;
        (Dev::rd(a), Dev::rd(a + 8), Dev::rd(a + 12), Dev::rd(a + 14))
    }

    /// Serve the request whose chain starts at `head` and put it on the
    /// used ring.
    fn complete(&mut self, head: u16) {
        let pos = self.pending.iter().position(|&h| h == head).unwrap();
        self.pending.remove(pos);
        let mut chain = vec![self.desc(head)];
        while chain.last().unwrap().2 & DESC_F_NEXT != 0 {
            let next = chain.last().unwrap().3;
            chain.push(self.desc(next));
        }
        let (hdr, hlen, hflags, _) = chain[0];
        assert_eq!((hlen, hflags & DESC_F_WRITE), (16, 0), "header descriptor");
        let ty: u32 = Dev::rd(hdr);
        let sector: u64 = Dev::rd(hdr + 8);
        let (st_addr, st_len, st_flags, _) = *chain.last().unwrap();
        assert_eq!(
            (st_len, st_flags & DESC_F_WRITE),
            (1, DESC_F_WRITE),
            "status"
        );
        let data = &chain[1..chain.len() - 1];
        assert!(data.len() <= 1);
        let mut written = 0u32;
        let mut status = self
            .fail
            .iter()
            .find(|f| f.0 == sector && ty != req::GET_ID)
            .map_or(blk_status::OK, |f| f.1);
        if status == blk_status::OK {
            match ty {
                req::IN | req::OUT => {
                    let (addr, len, flags, _) = data[0];
                    let off = (sector * SECTOR_SIZE) as usize;
                    let range = off..off + len as usize;
                    if ty == req::IN {
                        assert_eq!(flags & DESC_F_WRITE, DESC_F_WRITE);
                        for (i, b) in self.disk[range].iter().enumerate() {
                            Dev::wr(addr + i as u64, *b);
                        }
                        written = len;
                    } else {
                        assert_eq!(flags & DESC_F_WRITE, 0);
                        for (i, b) in self.disk[range].iter_mut().enumerate() {
                            *b = Dev::rd(addr + i as u64);
                        }
                    }
                }
                req::FLUSH => assert!(data.is_empty()),
                req::GET_ID => {
                    let (addr, len, _, _) = data[0];
                    assert_eq!(len as usize, ID_LEN);
                    for i in 0..ID_LEN {
                        Dev::wr(addr + i as u64, ID.get(i).copied().unwrap_or(0));
                    }
                    written = len;
                }
                _ => status = blk_status::UNSUPP,
            }
        }
        Dev::wr(st_addr, status);
        let slot = self.used_idx as u64 % self.n();
        let e = self.used + 4 + 8 * slot;
        Dev::wr(e, head as u32);
        Dev::wr(e + 4, self.used_len_override.unwrap_or(written + 1));
        fence(Ordering::Release);
        self.used_idx = self.used_idx.wrapping_add(1);
        Dev::wr16(self.used + 2, self.used_idx);
    }

    fn complete_all(&mut self) {
        self.fetch();
        while let Some(&h) = self.pending.first() {
            self.complete(h);
        }
    }
}

/// A handle the driver owns as its transport; the test keeps a clone.
#[derive(Clone)]
struct Model(Rc<RefCell<Dev>>);

impl Model {
    fn new(sectors: u64) -> Model {
        Model(Rc::new(RefCell::new(Dev::new(sectors))))
    }
    fn dev(&self) -> std::cell::RefMut<'_, Dev> {
        self.0.borrow_mut()
    }
}

impl Transport for Model {
    fn read32(&mut self, offset: u64) -> u32 {
        let mut d = self.dev();
        match offset {
            MAGIC_VALUE => d.magic,
            VERSION => d.version,
            DEVICE_ID => d.device_id,
            DEVICE_FEATURES => (d.offered >> (32 * d.dev_sel.min(1))) as u32,
            QUEUE_NUM_MAX => d.num_max,
            QUEUE_READY => d.ready,
            STATUS => d.status,
            CONFIG_GENERATION => d.generation,
            o if o == CONFIG + blk_config::CAPACITY => {
                let v = d.capacity as u32;
                if let Some(c) = d.capacity_change.take() {
                    d.capacity = c;
                    d.generation += 1;
                }
                v
            }
            o if o == CONFIG + blk_config::CAPACITY + 4 => (d.capacity >> 32) as u32,
            o if o == CONFIG + blk_config::SEG_MAX => d.seg_max,
            o if o == CONFIG + blk_config::BLK_SIZE => d.blk_size,
            o => panic!("driver read unknown register {o:#x}"),
        }
    }

    fn write32(&mut self, offset: u64, value: u32) {
        let mut d = self.dev();
        let hi = |old: u64| (old & 0xffff_ffff) | (value as u64) << 32;
        let lo = |old: u64| (old & !0xffff_ffff) | value as u64;
        match offset {
            DEVICE_FEATURES_SEL => d.dev_sel = value,
            DRIVER_FEATURES_SEL => d.drv_sel = value,
            DRIVER_FEATURES => {
                let s = d.drv_sel as usize;
                d.driver_features[s] = value;
            }
            QUEUE_SEL => assert_eq!(value, 0),
            QUEUE_NUM => d.num = value,
            QUEUE_READY => d.ready = value,
            QUEUE_NOTIFY => {
                assert_eq!(value, 0);
                d.notifies += 1;
                if d.auto {
                    d.complete_all();
                }
            }
            STATUS => {
                d.status_writes.push(value);
                if value == 0 {
                    d.status = 0;
                    d.ready = 0;
                    d.last_avail = 0;
                    d.used_idx = 0;
                    d.pending.clear();
                    d.driver_features = [0; 2];
                } else {
                    let mut v = value;
                    let extra = d.negotiated() & !d.offered != 0;
                    if v & st::FEATURES_OK != 0 && (d.reject_features || extra) {
                        v &= !st::FEATURES_OK;
                    }
                    d.status = v | (d.status & st::DEVICE_NEEDS_RESET);
                }
            }
            QUEUE_DESC_LOW => d.desc = lo(d.desc),
            QUEUE_DESC_HIGH => d.desc = hi(d.desc),
            QUEUE_DRIVER_LOW => d.avail = lo(d.avail),
            QUEUE_DRIVER_HIGH => d.avail = hi(d.avail),
            QUEUE_DEVICE_LOW => d.used = lo(d.used),
            QUEUE_DEVICE_HIGH => d.used = hi(d.used),
            o => panic!("driver wrote unknown register {o:#x}"),
        }
    }

    fn idle(&mut self, timeout_ns: u64) {
        let mut d = self.dev();
        d.idles += 1;
        d.clock += timeout_ns;
        if d.complete_on_idle {
            d.complete_all();
        }
    }

    fn now_ns(&mut self) -> u64 {
        self.dev().clock
    }
}

const SECTORS: u64 = 4096;

fn setup(f: impl FnOnce(&mut Dev)) -> (Model, VirtioBlk<Model>) {
    let m = Model::new(SECTORS);
    f(&mut m.dev());
    let b = VirtioBlk::new(m.clone(), 3, Options::default()).expect("driver init");
    (m, b)
}

fn pattern(sector: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (sector as usize * 7 + i * 13 + i / 512) as u8)
        .collect()
}

fn empties(n: usize) -> Vec<Completion> {
    (0..n).map(|_| Completion::EMPTY).collect()
}

#[test]
fn init_follows_the_spec_sequence_and_takes_only_the_features_it_knows() {
    let (m, b) = setup(|d| {
        d.offered |= 1 << 1 | 1 << 28; // SIZE_MAX, INDIRECT_DESC: not used
        d.num_max = 100;
    });
    let d = m.dev();
    assert_eq!(
        d.status_writes,
        [0, 1, 3, 11, 15],
        "reset, ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK"
    );
    let want = feature::VERSION_1
        | feature::BLK_FLUSH
        | feature::BLK_SIZE
        | feature::BLK_SEG_MAX
        | feature::RING_EVENT_IDX;
    assert_eq!(d.negotiated(), want);
    assert_eq!(b.features(), want);
    assert_eq!(
        (d.num, b.queue_size()),
        (64, 64),
        "largest power of two <= 100"
    );
    assert_eq!(d.ready, 1);
    assert!(d.desc % 16 == 0 && d.avail % 2 == 0 && d.used % 4 == 0);
    assert!(d.desc != d.avail && d.avail != d.used);
    assert_eq!(b.capacity_sectors(), SECTORS);
    assert_eq!(b.capacity(), SECTORS * 512);
    assert_eq!((b.block_size(), b.seg_max()), (4096, 126));
    assert_eq!(b.handle(), 3);
}

#[test]
fn config_is_read_again_when_the_generation_changes_during_the_read() {
    let (_m, b) = setup(|d| d.capacity_change = Some(8192));
    assert_eq!(b.capacity_sectors(), 8192);
}

#[test]
fn without_blk_size_the_block_size_is_a_sector() {
    let (_m, b) = setup(|d| d.offered = feature::VERSION_1);
    assert_eq!((b.block_size(), b.seg_max()), (512, 0));
    assert_eq!(b.features(), feature::VERSION_1);
}

#[test]
fn init_refuses_what_is_not_a_virtio_1_block_device() {
    type Case = (fn(&mut Dev), Error);
    let cases: [Case; 6] = [
        (|d| d.magic = 0, Error::NotVirtio(0)),
        (|d| d.version = 1, Error::UnsupportedVersion(1)),
        (|d| d.device_id = 0, Error::NotBlock(0)),
        (|d| d.offered = feature::BLK_FLUSH, Error::NoVersion1),
        (
            |d| {
                d.offered = feature::VERSION_1;
                d.reject_features = true;
            },
            Error::FeaturesRejected(feature::VERSION_1),
        ),
        (|d| d.num_max = 0, Error::QueueUnavailable),
    ];
    for (prep, want) in cases {
        let m = Model::new(SECTORS);
        prep(&mut m.dev());
        let got = VirtioBlk::new(m.clone(), 1, Options::default()).err();
        assert_eq!(got, Some(want));
        let d = m.dev();
        if d.status_writes.len() > 1 {
            assert_eq!(
                d.status,
                st::FAILED,
                "{want:?}: driver gives up on the device"
            );
        }
    }
}

#[test]
fn thirty_two_writes_in_flight_then_reads_return_the_data() {
    let (m, mut b) = setup(|d| d.auto = false);
    let mut tokens = Vec::new();
    for i in 0..32u64 {
        tokens.push(b.submit_write(i * 8, pattern(i * 8, 4096)).unwrap());
    }
    assert_eq!(b.in_flight(), 32);
    m.dev().fetch();
    assert_eq!(m.dev().pending.len(), 32, "all 32 reach the device at once");
    assert_eq!(b.reap(&mut empties(4)).unwrap(), 0, "nothing done yet");
    m.dev().complete_all();
    let mut out = empties(40);
    assert_eq!(b.reap(&mut out).unwrap(), 32);
    assert_eq!(b.in_flight(), 0);
    for (i, c) in out[..32].iter().enumerate() {
        assert_eq!((c.token, c.op, c.result), (tokens[i], Op::Write, Ok(())));
        assert_eq!(c.buf, pattern(i as u64 * 8, 4096), "buffer handed back");
    }
    for i in 0..32u64 {
        let off = (i * 8 * 512) as usize;
        assert_eq!(m.dev().disk[off..off + 4096], pattern(i * 8, 4096)[..]);
    }
    for i in 0..32u64 {
        b.submit_read(i * 8, vec![0; 4096]).unwrap();
    }
    m.dev().complete_all();
    assert_eq!(b.reap(&mut out).unwrap(), 32);
    for c in &out[..32] {
        assert_eq!((c.op, c.result), (Op::Read, Ok(())));
        assert_eq!(c.buf, pattern(c.sector, 4096), "sector {}", c.sector);
    }
}

#[test]
fn completions_out_of_order_are_matched_to_their_own_requests() {
    let (m, mut b) = setup(|d| d.auto = false);
    for s in 0..5u64 {
        let off = (s * 8 * 512) as usize;
        m.dev().disk[off..off + 4096].copy_from_slice(&pattern(s * 8, 4096));
    }
    let tokens: Vec<Token> = (0..5u64)
        .map(|s| b.submit_read(s * 8, vec![0; 4096]).unwrap())
        .collect();
    m.dev().fetch();
    let heads = m.dev().pending.clone();
    for &i in &[4usize, 2, 0, 3, 1] {
        m.dev().complete(heads[i]);
    }
    let mut out = empties(2);
    let mut got = Vec::new();
    while b.in_flight() > 0 {
        let n = b.reap(&mut out).unwrap();
        assert!(n > 0);
        for c in &mut out[..n] {
            assert_eq!(c.result, Ok(()));
            assert_eq!(c.buf, pattern(c.sector, 4096));
            got.push(c.token);
        }
    }
    let want: Vec<Token> = [4usize, 2, 0, 3, 1].iter().map(|&i| tokens[i]).collect();
    assert_eq!(got, want);
    // Descriptors of reaped requests are reusable: fill the queue again.
    for s in 0..(256 / 3) as u64 {
        b.submit_read(s, vec![0; 512]).unwrap();
    }
}

#[test]
fn error_statuses_reach_the_completion_and_others_still_succeed() {
    let (m, mut b) = setup(|d| {
        d.fail = vec![(8, blk_status::IOERR), (16, blk_status::UNSUPP), (24, 7)];
    });
    for s in [0u64, 8, 16, 24, 32] {
        b.submit_write(s, vec![1; 4096]).unwrap();
    }
    b.submit_flush().unwrap();
    let mut out = empties(8);
    assert_eq!(b.reap(&mut out).unwrap(), 6);
    let r: Vec<(u64, Result<(), Error>)> = out[..5].iter().map(|c| (c.sector, c.result)).collect();
    assert_eq!(
        r,
        [
            (0, Ok(())),
            (8, Err(Error::IoError)),
            (16, Err(Error::Unsupported)),
            (24, Err(Error::BadStatus(7))),
            (32, Ok(())),
        ]
    );
    assert_eq!((out[5].op, out[5].result), (Op::Flush, Ok(())));
    assert!(m.dev().disk[8 * 512..9 * 512].iter().all(|&x| x == 0));
}

#[test]
fn a_read_the_device_reports_short_is_an_error() {
    let (m, mut b) = setup(|d| d.used_len_override = Some(100));
    b.submit_read(0, vec![0; 4096]).unwrap();
    let mut out = empties(1);
    assert_eq!(b.reap(&mut out).unwrap(), 1);
    assert_eq!(out[0].result, Err(Error::ShortRead(100)));
    m.dev().used_len_override = Some(4096);
    b.submit_read(0, vec![0; 4096]).unwrap();
    b.reap(&mut out).unwrap();
    assert_eq!(
        out[0].result,
        Ok(()),
        "length without the status byte is accepted"
    );
}

#[test]
fn a_full_queue_refuses_and_hands_the_buffer_back_until_reaped() {
    let m = Model::new(SECTORS);
    m.dev().auto = false;
    let opts = Options { queue_size: 8 };
    let mut b = VirtioBlk::new(m.clone(), 1, opts).unwrap();
    assert_eq!(b.queue_size(), 8);
    b.submit_write(0, vec![1; 512]).unwrap();
    b.submit_write(1, vec![2; 512]).unwrap();
    let r = b.submit_write(2, vec![3; 512]).unwrap_err();
    assert_eq!(r.error, Error::QueueFull);
    assert_eq!(r.buf, vec![3; 512]);
    b.submit_flush().unwrap(); // two descriptors still fit
    assert_eq!(b.submit_flush(), Err(Error::QueueFull));
    assert_eq!(b.in_flight(), 3);
    m.dev().complete_all();
    assert_eq!(b.reap(&mut empties(8)).unwrap(), 3);
    b.submit_write(2, r.buf).unwrap();
}

#[test]
fn invalid_requests_are_refused_before_the_device_sees_them() {
    let (m, mut b) = setup(|_| {});
    for (sector, len) in [
        (0, 0),
        (0, 100),
        (0, 513),
        (SECTORS - 1, 1024),
        (u64::MAX, 512),
    ] {
        let r = b.submit_read(sector, vec![0; len]).unwrap_err();
        assert_eq!((r.error, r.buf.len()), (Error::Invalid, len));
    }
    assert_eq!(m.dev().notifies, 0);
    b.submit_read(SECTORS - 1, vec![0; 512]).unwrap();
    assert_eq!(m.dev().notifies, 1);
}

#[test]
fn event_idx_kicks_only_when_the_device_asks_and_tells_the_device_what_was_seen() {
    let (m, mut b) = setup(|d| d.auto = false);
    for s in 0..5 {
        b.submit_write(s, vec![0; 512]).unwrap();
    }
    assert_eq!(
        m.dev().notifies,
        1,
        "device asked for a kick at index 0 only"
    );
    m.dev().fetch(); // avail_event = 5
    b.submit_write(5, vec![0; 512]).unwrap();
    assert_eq!(
        m.dev().notifies,
        2,
        "the device asked to hear about index 5"
    );
    m.dev().complete_all();
    assert_eq!(b.reap(&mut empties(3)).unwrap(), 3);
    let d = m.dev();
    let used_event = Dev::rd16(d.avail + 4 + 2 * d.n());
    assert_eq!(used_event, 3, "used_event = entries the driver has seen");
}

#[test]
fn without_event_idx_every_submit_kicks_unless_the_device_says_no_notify() {
    let (m, mut b) = setup(|d| {
        d.offered = feature::VERSION_1;
        d.auto = false;
    });
    for s in 0..3 {
        b.submit_write(s, vec![0; 512]).unwrap();
    }
    assert_eq!(m.dev().notifies, 3);
    let used = m.dev().used;
    Dev::wr16(used, USED_F_NO_NOTIFY);
    b.submit_write(3, vec![0; 512]).unwrap();
    assert_eq!(m.dev().notifies, 3);
    assert_eq!(
        b.submit_flush(),
        Err(Error::Unsupported),
        "no FLUSH offered"
    );
}

#[test]
fn wait_idles_until_the_device_completes() {
    let (m, mut b) = setup(|d| d.auto = false);
    let t = b.submit_write(0, vec![5; 4096]).unwrap();
    let mut out = empties(4);
    assert_eq!(b.wait(&mut out).unwrap(), 1);
    assert_eq!((out[0].token, out[0].result), (t, Ok(())));
    assert_eq!(m.dev().idles, 1, "blocked once, woken by the completion");
    assert_eq!(b.wait(&mut out).unwrap(), 0, "nothing in flight: no block");
    assert_eq!(m.dev().idles, 1);
}

#[test]
fn wait_timeout_gives_up_when_the_device_is_silent() {
    let (m, mut b) = setup(|d| {
        d.auto = false;
        d.complete_on_idle = false;
    });
    b.submit_read(0, vec![0; 512]).unwrap();
    let mut out = empties(1);
    assert_eq!(b.wait_timeout(&mut out, 50_000_000).unwrap(), 0);
    let d = m.dev();
    assert!(
        d.clock >= 50_000_000 && d.idles == 5,
        "{} {}",
        d.clock,
        d.idles
    );
}

#[test]
fn a_device_that_needs_reset_ends_waiting_and_further_requests() {
    let (m, mut b) = setup(|d| {
        d.auto = false;
        d.complete_on_idle = false;
    });
    b.submit_read(0, vec![0; 512]).unwrap();
    m.dev().status |= st::DEVICE_NEEDS_RESET;
    assert_eq!(b.wait(&mut empties(1)), Err(Error::Broken));
    let r = b.submit_read(0, vec![0; 512]).unwrap_err();
    assert_eq!(r.error, Error::Broken);
}

#[test]
fn a_used_entry_for_no_request_marks_the_device_broken() {
    let (m, mut b) = setup(|d| d.auto = false);
    b.submit_read(0, vec![0; 512]).unwrap();
    {
        let mut d = m.dev();
        let used = d.used;
        Dev::wr(used + 4, 200u32); // id 200: never a head
        Dev::wr(used + 8, 1u32);
        d.used_idx = 1;
        Dev::wr16(used + 2, 1);
    }
    assert_eq!(b.reap(&mut empties(1)), Err(Error::Broken));
    assert_eq!(b.submit_flush(), Err(Error::Broken));
}

#[test]
fn get_id_returns_the_devices_id_and_refuses_while_busy() {
    let (m, mut b) = setup(|_| {});
    let id = b.get_id().unwrap();
    assert_eq!(&id[..ID.len()], ID);
    assert!(id[ID.len()..].iter().all(|&x| x == 0));
    m.dev().auto = false;
    b.submit_read(0, vec![0; 512]).unwrap();
    assert_eq!(b.get_id(), Err(Error::Busy));
}

#[test]
fn dropping_the_driver_resets_the_device() {
    let (m, b) = setup(|d| d.auto = false);
    let mut b = b;
    b.submit_write(0, vec![1; 512]).unwrap();
    drop(b);
    let d = m.dev();
    assert_eq!(d.status, 0);
    assert_eq!(d.status_writes.last(), Some(&0));
    assert_eq!(d.ready, 0);
}

#[test]
fn need_event_matches_the_spec_formula_across_wraparound() {
    assert!(need_event(0, 1, 0));
    assert!(!need_event(0, 2, 1));
    assert!(need_event(1, 3, 1));
    assert!(need_event(65535, 0, 65535));
    assert!(!need_event(5, 3, 2));
}

#[test]
fn acquire_needs_an_attached_virtio_entry_with_a_plausible_window() {
    let mut e = [
        MftEntry::reserved_first(),
        MftEntry::virtio_blk("disk"),
        MftEntry::block("storage"),
    ];
    let acq = |e: &[MftEntry], name| window(e, name).map(|(h, v)| (h, { v.mmio_base }));
    assert_eq!(
        acq(&e, "disk"),
        Err(Error::Acquire(AcquireError::NotAttached))
    );
    assert_eq!(
        acq(&e, "storage"),
        Err(Error::Acquire(AcquireError::WrongType))
    );
    assert_eq!(acq(&e, "nope"), Err(Error::Acquire(AcquireError::NotFound)));
    e[1].attached = 1;
    let good = MftVirtio {
        mmio_base: manifest::VIRTIO_MMIO_BASE + 0x1000,
        mmio_size: 0x1000,
        queue_max: 256,
        _pad: 0,
    };
    for bad in [
        MftVirtio {
            mmio_base: 0,
            ..good
        },
        MftVirtio {
            mmio_base: good.mmio_base + 4,
            ..good
        },
        MftVirtio {
            mmio_size: 0x100,
            ..good
        },
    ] {
        e[1].props = MftProps::from_virtio(bad);
        assert_eq!(window(&e, "disk").err(), Some(Error::BadWindow(bad)));
    }
    e[1].props = MftProps::from_virtio(good);
    assert_eq!(acq(&e, "disk"), Ok((1, (1 << 32) + 0x1000)));
    assert_ne!(e[2].ty, MFT_TT_VIRTIO_BLK);
    assert_eq!(e[2].ty, MFT_DEV_BLOCK_BASIC);
}

#[test]
fn ring_indices_wrap_past_65535_without_losing_a_request() {
    let m = Model::new(SECTORS);
    let mut b = VirtioBlk::new(m.clone(), 1, Options { queue_size: 4 }).unwrap();
    let mut out = empties(1);
    let mut buf = vec![0u8; 512];
    for i in 0..70_000u64 {
        buf[..8].copy_from_slice(&i.to_le_bytes());
        let t = b.submit_write(i % SECTORS, buf).unwrap();
        assert_eq!(b.reap(&mut out).unwrap(), 1, "request {i}");
        assert_eq!((out[0].token, out[0].result), (t, Ok(())));
        buf = core::mem::take(&mut out[0].buf);
    }
    let d = m.dev();
    assert_eq!(d.used_idx, (70_000u64 % 65_536) as u16);
    assert_eq!(
        d.notifies, 70_000,
        "EVENT_IDX: the device asked for every one"
    );
    let last = ((69_999 % SECTORS) * 512) as usize;
    assert_eq!(d.disk[last..last + 8], 69_999u64.to_le_bytes());
}
