//! The transport and virtio-blk on a real `GuestMemoryMmap`, with queues
//! built by `virtio_queue::mock::MockSplitQueue`, against a
//! [`FileBackend`] over a temporary file.

use super::blk::{VirtioBlk, Worker};
use super::mmio::*;
use super::request::*;
use super::{features, status, Forbidden, MmioDevice};
use crate::block::{Backend, Completion, FileBackend, Geometry, Info, Request, Response, ID_LEN};
use std::sync::{Arc, Mutex};
use virtio_queue::desc::{split::Descriptor as Desc, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: u64 = 1 << 20;
const QSIZE: u16 = 16;
const NEXT: u16 = 1;
const WRITE: u16 = 2;
/// The used ring. (Not the mock's: its used ring overlaps its available
/// ring's tail, virtio-queue 0.18's `SplitQueueRing::end` counts entries
/// as bytes.)
const USED: u64 = 0x2000;
const HDR: u64 = 0x8000;
const ST: u64 = 0x9000;
const DATA: u64 = 0x10000;
const CAPACITY: u64 = 64 << 10;

/// A temporary image file, deleted on drop.
struct TempImage {
    path: std::path::PathBuf,
    file: Arc<std::fs::File>,
}

impl TempImage {
    fn new() -> TempImage {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "tt-virtio-blk-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.set_len(CAPACITY).unwrap();
        // Recognisable contents: byte i is i * 7.
        let bytes: Vec<u8> = (0..CAPACITY).map(|i| (i * 7) as u8).collect();
        std::os::unix::fs::FileExt::write_all_at(&file, &bytes, 0).unwrap();
        TempImage {
            path,
            file: Arc::new(file),
        }
    }
    fn bytes(&self) -> Vec<u8> {
        std::fs::read(&self.path).unwrap()
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn info() -> Info {
    Info {
        name: "vd0".into(),
        geometry: Geometry {
            capacity: CAPACITY,
            sector_size: 512,
        },
        id: *b"tt-test-id-123456789",
        durable_writes: false,
        max_atomic_write: 4096,
    }
}

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap()
}

fn w32(d: &mut VirtioBlk, off: u64, v: u32) {
    d.write(off, &v.to_le_bytes());
}
fn r32(d: &mut VirtioBlk, off: u64) -> u32 {
    let mut b = [0u8; 4];
    d.read(off, &mut b);
    u32::from_le_bytes(b)
}

/// Negotiate `feats` and set up the queue at the mock's addresses.
fn bring_up(d: &mut VirtioBlk, q: &MockSplitQueue<'_, GuestMemoryMmap>, feats: u64) {
    w32(d, STATUS, status::ACKNOWLEDGE | status::DRIVER);
    w32(d, DRIVER_FEATURES_SEL, 0);
    w32(d, DRIVER_FEATURES, feats as u32);
    w32(d, DRIVER_FEATURES_SEL, 1);
    w32(d, DRIVER_FEATURES, (feats >> 32) as u32);
    w32(
        d,
        STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    w32(d, QUEUE_SEL, 0);
    w32(d, QUEUE_NUM, u32::from(QSIZE));
    let set = |d: &mut VirtioBlk, lo, hi, a: GuestAddress| {
        w32(d, lo, a.0 as u32);
        w32(d, hi, (a.0 >> 32) as u32);
    };
    set(d, QUEUE_DESC_LOW, QUEUE_DESC_HIGH, q.desc_table_addr());
    set(d, QUEUE_DRIVER_LOW, QUEUE_DRIVER_HIGH, q.avail_addr());
    set(d, QUEUE_DEVICE_LOW, QUEUE_DEVICE_HIGH, GuestAddress(USED));
    w32(d, QUEUE_READY, 1);
    w32(
        d,
        STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
    );
}

fn v1() -> u64 {
    1 << features::F_VERSION_1
}

struct Rig {
    mem: GuestMemoryMmap,
    image: TempImage,
}

impl Rig {
    fn new() -> Rig {
        Rig {
            mem: mem(),
            image: TempImage::new(),
        }
    }
    fn device(&self, forbidden: Vec<Forbidden>) -> VirtioBlk {
        let backend = FileBackend::new(info(), self.image.file.clone()).unwrap();
        self.device_on(Box::new(backend), forbidden)
    }
    fn device_on(&self, backend: Box<dyn Backend>, forbidden: Vec<Forbidden>) -> VirtioBlk {
        let mut d = VirtioBlk::new(backend, QSIZE, forbidden).unwrap();
        d.attach_memory(self.mem.clone());
        d
    }
    fn header(&self, at: u64, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(at)).unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(ST)).unwrap();
    }
    fn status(&self, at: u64) -> u8 {
        self.mem.read_obj(GuestAddress(at)).unwrap()
    }
}

fn d(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(Desc::new(addr, len, flags, next))
}

/// A three-descriptor request at table index `at`: header, one data
/// buffer, status.
fn req(at: u16, hdr: u64, data: u64, len: u32, data_flags: u16, status: u64) -> [RawDescriptor; 3] {
    [
        d(hdr, 16, NEXT, at + 1),
        d(data, len, data_flags | NEXT, at + 2),
        d(status, 1, WRITE, 0),
    ]
}

/// The used ring's entries: (head, len).
fn used(mem: &GuestMemoryMmap) -> Vec<(u32, u32)> {
    let n: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
    (0..u64::from(n))
        .map(|i| {
            let at = USED + 4 + 8 * i;
            let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
            (id, len)
        })
        .collect()
}

fn kick(dev: &mut VirtioBlk) {
    w32(dev, QUEUE_NOTIFY, 0);
}

#[test]
fn registers_identify_a_version_2_block_device_and_its_config() {
    let rig = Rig::new();
    let mut dev = rig.device(vec![]);
    assert_eq!(r32(&mut dev, MAGIC_VALUE), 0x7472_6976);
    assert_eq!(r32(&mut dev, VERSION), 2);
    assert_eq!(r32(&mut dev, DEVICE_ID), 2);
    assert_eq!(r32(&mut dev, QUEUE_NUM_MAX), u32::from(QSIZE));
    w32(&mut dev, DEVICE_FEATURES_SEL, 0);
    let lo = r32(&mut dev, DEVICE_FEATURES);
    w32(&mut dev, DEVICE_FEATURES_SEL, 1);
    let hi = r32(&mut dev, DEVICE_FEATURES);
    let f = u64::from(lo) | (u64::from(hi) << 32);
    for bit in [
        features::F_VERSION_1,
        features::BLK_F_FLUSH,
        features::BLK_F_BLK_SIZE,
        features::BLK_F_SEG_MAX,
        features::RING_F_EVENT_IDX,
    ] {
        assert!(f & (1 << bit) != 0, "feature {bit} not offered");
    }
    let mut cap = [0u8; 8];
    dev.read(CONFIG, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), CAPACITY / 512);
    assert_eq!(r32(&mut dev, CONFIG + 12), u32::from(QSIZE) - 2); // seg_max
    assert_eq!(r32(&mut dev, CONFIG + 20), 512); // blk_size
                                                 // Wrong sizes, unaligned offsets and offsets past everything read 0.
    let mut b2 = [0xaau8; 2];
    dev.read(MAGIC_VALUE, &mut b2);
    assert_eq!(b2, [0, 0]);
    assert_eq!(r32(&mut dev, 1), 0);
    assert_eq!(r32(&mut dev, 0xffc), 0);
    assert_eq!(r32(&mut dev, u64::MAX - 1), 0);
    let mut big = [0xaau8; 16];
    dev.read(CONFIG, &mut big);
    assert_eq!(big, [0; 16]);
    // Odd writes are ignored.
    dev.write(STATUS, &[1]);
    dev.write(u64::MAX, &[1, 2, 3, 4]);
    assert_eq!(r32(&mut dev, STATUS), 0);
}

#[test]
fn features_not_offered_are_refused_with_needs_reset() {
    let rig = Rig::new();
    let mut dev = rig.device(vec![]);
    w32(&mut dev, STATUS, status::ACKNOWLEDGE | status::DRIVER);
    w32(&mut dev, DRIVER_FEATURES_SEL, 1);
    w32(&mut dev, DRIVER_FEATURES, 1 | (1 << 2)); // VERSION_1 and bit 34
    w32(
        &mut dev,
        STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    let s = r32(&mut dev, STATUS);
    assert_eq!(s & status::FEATURES_OK, 0);
    assert_ne!(s & status::DEVICE_NEEDS_RESET, 0);
    // A reset clears it.
    w32(&mut dev, STATUS, 0);
    assert_eq!(r32(&mut dev, STATUS), 0);
    // A driver without VERSION_1 (legacy) is refused too.
    w32(&mut dev, STATUS, status::ACKNOWLEDGE | status::DRIVER);
    w32(
        &mut dev,
        STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    assert_ne!(r32(&mut dev, STATUS) & status::DEVICE_NEEDS_RESET, 0);
}

#[test]
fn queue_ready_with_bad_addresses_needs_reset() {
    let rig = Rig::new();
    let q = MockSplitQueue::create(&rig.mem, GuestAddress(0), QSIZE);
    type Spoil = Box<dyn Fn(&mut VirtioBlk)>;
    let cases: Vec<(&str, Spoil)> = vec![
        (
            "outside RAM",
            Box::new(|d| w32(d, QUEUE_DESC_LOW, (MEM - 16) as u32)),
        ),
        ("misaligned", Box::new(|d| w32(d, QUEUE_DESC_LOW, 8))),
        ("above 4 GiB", Box::new(|d| w32(d, QUEUE_DEVICE_HIGH, 1))),
        (
            "size not a power of two",
            Box::new(|d| w32(d, QUEUE_NUM, 12)),
        ),
        (
            "size above the maximum",
            Box::new(|d| w32(d, QUEUE_NUM, 32)),
        ),
    ];
    for (what, spoil) in cases {
        let mut dev = rig.device(vec![]);
        w32(&mut dev, STATUS, 3);
        w32(&mut dev, DRIVER_FEATURES_SEL, 1);
        w32(&mut dev, DRIVER_FEATURES, 1);
        w32(&mut dev, STATUS, 3 | status::FEATURES_OK);
        w32(&mut dev, QUEUE_DESC_LOW, q.desc_table_addr().0 as u32);
        w32(&mut dev, QUEUE_DRIVER_LOW, q.avail_addr().0 as u32);
        w32(&mut dev, QUEUE_DEVICE_LOW, USED as u32);
        spoil(&mut dev);
        w32(&mut dev, QUEUE_READY, 1);
        assert_eq!(r32(&mut dev, QUEUE_READY), 0, "{what}");
        assert_ne!(
            r32(&mut dev, STATUS) & status::DEVICE_NEEDS_RESET,
            0,
            "{what}"
        );
    }
    // Rings over a forbidden range.
    let mut dev = rig.device(vec![Forbidden {
        start: 0x100,
        len: 1,
    }]);
    bring_up(&mut dev, &q, v1());
    assert_ne!(r32(&mut dev, STATUS) & status::DEVICE_NEEDS_RESET, 0);
}

#[test]
fn out_then_in_round_trips_through_the_image() {
    let rig = Rig::new();
    let q = MockSplitQueue::create(&rig.mem, GuestAddress(0), QSIZE);
    let mut dev = rig.device(vec![]);
    bring_up(&mut dev, &q, v1());
    let payload: Vec<u8> = (0..1024u32).map(|i| (i * 13 + 5) as u8).collect();
    rig.mem.write_slice(&payload, GuestAddress(DATA)).unwrap();
    rig.header(HDR, VIRTIO_BLK_T_OUT, 4);
    q.add_desc_chains(&req(0, HDR, DATA, 1024, 0, ST), 0)
        .unwrap();
    kick(&mut dev);
    assert_eq!(rig.status(ST), VIRTIO_BLK_S_OK);
    assert_eq!(used(&rig.mem), vec![(0, 1)]);
    assert_eq!(&rig.image.bytes()[2048..3072], &payload[..]);

    // Read it back, split across two buffers.
    rig.header(HDR, VIRTIO_BLK_T_IN, 4);
    let descs = [
        d(HDR, 16, NEXT, 4),
        d(DATA + 0x1000, 512, WRITE | NEXT, 5),
        d(DATA + 0x3000, 512, WRITE | NEXT, 6),
        d(ST, 1, WRITE, 0),
    ];
    q.add_desc_chains(&descs, 3).unwrap();
    kick(&mut dev);
    assert_eq!(rig.status(ST), VIRTIO_BLK_S_OK);
    assert_eq!(used(&rig.mem)[1], (3, 1025));
    let mut a = vec![0u8; 512];
    let mut b = vec![0u8; 512];
    rig.mem
        .read_slice(&mut a, GuestAddress(DATA + 0x1000))
        .unwrap();
    rig.mem
        .read_slice(&mut b, GuestAddress(DATA + 0x3000))
        .unwrap();
    assert_eq!([a, b].concat(), payload);
}

#[test]
fn flush_get_id_and_unsupported_types() {
    let rig = Rig::new();
    let q = MockSplitQueue::create(&rig.mem, GuestAddress(0), QSIZE);
    let mut dev = rig.device(vec![]);
    bring_up(&mut dev, &q, v1());
    rig.header(HDR, VIRTIO_BLK_T_FLUSH, 0);
    q.add_desc_chains(&[d(HDR, 16, NEXT, 1), d(ST, 1, WRITE, 0)], 0)
        .unwrap();
    kick(&mut dev);
    assert_eq!(rig.status(ST), VIRTIO_BLK_S_OK);

    rig.header(HDR, VIRTIO_BLK_T_GET_ID, 0);
    q.add_desc_chains(&req(2, HDR, DATA, 32, WRITE, ST), 2)
        .unwrap();
    rig.mem
        .write_slice(&[0xee; 32], GuestAddress(DATA))
        .unwrap();
    kick(&mut dev);
    assert_eq!(rig.status(ST), VIRTIO_BLK_S_OK);
    let mut id = [0u8; 32];
    rig.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..ID_LEN], b"tt-test-id-123456789");
    assert_eq!(&id[ID_LEN..], &[0xee; 12], "wrote past the 20-byte id");
    assert_eq!(used(&rig.mem)[1], (2, ID_LEN as u32 + 1));

    rig.header(HDR, 11, 0); // DISCARD: not offered
    q.add_desc_chains(&req(5, HDR, DATA, 512, 0, ST), 5)
        .unwrap();
    kick(&mut dev);
    assert_eq!(rig.status(ST), VIRTIO_BLK_S_UNSUPP);
    assert_eq!(used(&rig.mem).len(), 3);
    assert_eq!(r32(&mut dev, STATUS) & status::DEVICE_NEEDS_RESET, 0);
}

/// Each bad request: its expected status byte, and the device stays usable.
#[test]
fn malformed_requests_with_a_status_byte_get_ioerr() {
    let rig = Rig::new();
    let forbidden = Forbidden {
        start: 0x40000,
        len: 0x1000,
    };
    let cases: Vec<(&str, u32, u64, Vec<RawDescriptor>)> = vec![
        (
            "data outside RAM",
            VIRTIO_BLK_T_IN,
            0,
            req(0, HDR, MEM - 256, 512, WRITE, ST).to_vec(),
        ),
        (
            "length overflows",
            VIRTIO_BLK_T_IN,
            0,
            req(0, HDR, u64::MAX - 100, 512, WRITE, ST).to_vec(),
        ),
        (
            "IN into a read-only buffer",
            VIRTIO_BLK_T_IN,
            0,
            req(0, HDR, DATA, 512, 0, ST).to_vec(),
        ),
        (
            "OUT from a write-only buffer",
            VIRTIO_BLK_T_OUT,
            0,
            req(0, HDR, DATA, 512, WRITE, ST).to_vec(),
        ),
        (
            "IN over a forbidden range",
            VIRTIO_BLK_T_IN,
            0,
            req(0, HDR, 0x40000 - 256, 512, WRITE, ST).to_vec(),
        ),
        (
            "OUT from a forbidden range",
            VIRTIO_BLK_T_OUT,
            0,
            req(0, HDR, 0x40200, 512, 0, ST).to_vec(),
        ),
        (
            "header in a forbidden range",
            VIRTIO_BLK_T_IN,
            0,
            req(0, 0x40000, DATA, 512, WRITE, ST).to_vec(),
        ),
        (
            "beyond the disk",
            VIRTIO_BLK_T_IN,
            CAPACITY / 512,
            req(0, HDR, DATA, 512, WRITE, ST).to_vec(),
        ),
        (
            "sector overflows",
            VIRTIO_BLK_T_IN,
            u64::MAX / 2,
            req(0, HDR, DATA, 512, WRITE, ST).to_vec(),
        ),
        (
            "partial sector",
            VIRTIO_BLK_T_OUT,
            0,
            req(0, HDR, DATA, 100, 0, ST).to_vec(),
        ),
        (
            "no data",
            VIRTIO_BLK_T_IN,
            0,
            vec![d(HDR, 16, NEXT, 1), d(ST, 1, WRITE, 0)],
        ),
        ("no header", VIRTIO_BLK_T_IN, 0, vec![d(ST, 1, WRITE, 0)]),
        (
            "short header",
            VIRTIO_BLK_T_IN,
            0,
            vec![
                d(HDR, 8, NEXT, 1),
                d(DATA, 512, WRITE | NEXT, 2),
                d(ST, 1, WRITE, 0),
            ],
        ),
        (
            "FLUSH with data",
            VIRTIO_BLK_T_FLUSH,
            0,
            req(0, HDR, DATA, 512, 0, ST).to_vec(),
        ),
    ];
    for (what, kind, sector, descs) in cases {
        let q = MockSplitQueue::create(&rig.mem, GuestAddress(0), QSIZE);
        let mut dev = rig.device(vec![forbidden]);
        bring_up(&mut dev, &q, v1());
        rig.mem
            .write_slice(&[0x5a; 0x1000], GuestAddress(0x40000))
            .unwrap();
        let before = rig.image.bytes();
        rig.header(HDR, kind, sector);
        q.add_desc_chains(&descs, 0).unwrap();
        kick(&mut dev);
        assert_eq!(rig.status(ST), VIRTIO_BLK_S_IOERR, "{what}");
        assert_eq!(used(&rig.mem), vec![(0, 1)], "{what}");
        assert_eq!(
            r32(&mut dev, STATUS) & status::DEVICE_NEEDS_RESET,
            0,
            "{what}"
        );
        assert!(dev.last_error().is_some(), "{what}");
        assert_eq!(rig.image.bytes(), before, "{what}: the image changed");
        let mut f = [0u8; 0x1000];
        rig.mem.read_slice(&mut f, GuestAddress(0x40000)).unwrap();
        assert!(
            f.iter().all(|&b| b == 0x5a),
            "{what}: forbidden range written"
        );
    }
}

#[test]
fn chains_without_a_usable_status_byte_need_reset() {
    let rig = Rig::new();
    let forbidden = Forbidden {
        start: 0x40000,
        len: 0x1000,
    };
    let cases: Vec<(&str, Vec<RawDescriptor>)> = vec![
        (
            "a loop",
            vec![d(HDR, 16, NEXT, 1), d(DATA, 512, WRITE | NEXT, 0)],
        ),
        (
            "next outside the table",
            vec![d(HDR, 16, NEXT, 1), d(DATA, 512, WRITE | NEXT, 200)],
        ),
        (
            "read-only status",
            vec![
                d(HDR, 16, NEXT, 1),
                d(DATA, 512, WRITE | NEXT, 2),
                d(ST, 1, 0, 0),
            ],
        ),
        (
            "status outside RAM",
            vec![d(HDR, 16, NEXT, 1), d(MEM, 1, WRITE, 0)],
        ),
        (
            "status in a forbidden range",
            vec![d(HDR, 16, NEXT, 1), d(0x40010, 1, WRITE, 0)],
        ),
        (
            "zero-length status",
            vec![d(HDR, 16, NEXT, 1), d(ST, 0, WRITE, 0)],
        ),
    ];
    for (what, descs) in cases {
        let q = MockSplitQueue::create(&rig.mem, GuestAddress(0), QSIZE);
        let mut dev = rig.device(vec![forbidden]);
        bring_up(&mut dev, &q, v1());
        rig.header(HDR, VIRTIO_BLK_T_IN, 0);
        q.add_desc_chains(&descs, 0).unwrap();
        kick(&mut dev);
        assert_ne!(
            r32(&mut dev, STATUS) & status::DEVICE_NEEDS_RESET,
            0,
            "{what}"
        );
        assert!(used(&rig.mem).is_empty(), "{what}");
        assert_eq!(rig.status(ST), 0xff, "{what}");
        // Nothing more is served until a reset.
        q.add_desc_chains(&req(4, HDR, DATA, 512, WRITE, ST), 4)
            .unwrap();
        kick(&mut dev);
        assert!(used(&rig.mem).is_empty(), "{what}");
    }
    // An available index more than a queue ahead.
    let q = MockSplitQueue::create(&rig.mem, GuestAddress(0), QSIZE);
    let mut dev = rig.device(vec![]);
    bring_up(&mut dev, &q, v1());
    q.avail().idx().store(QSIZE + 1);
    kick(&mut dev);
    assert_ne!(r32(&mut dev, STATUS) & status::DEVICE_NEEDS_RESET, 0);
}

/// A backend that holds completions until released: requests stay in
/// flight.
struct Held {
    inner: FileBackend,
    held: Arc<Mutex<Vec<Completion>>>,
    release: Arc<std::sync::atomic::AtomicBool>,
}

impl Backend for Held {
    fn info(&self) -> &Info {
        self.inner.info()
    }
    fn submit(&mut self, user_data: u64, request: Request) -> Result<(), crate::block::Error> {
        self.inner.submit(user_data, request)?;
        let mut v = Vec::new();
        self.inner.poll(&mut v);
        self.held.lock().unwrap().extend(v);
        Ok(())
    }
    fn poll(&mut self, out: &mut Vec<Completion>) -> usize {
        if !self.release.load(std::sync::atomic::Ordering::SeqCst) {
            return 0;
        }
        let mut h = self.held.lock().unwrap();
        let n = h.len();
        out.append(&mut h);
        n
    }
    fn event(&self) -> &vmm_sys_util::eventfd::EventFd {
        self.inner.event()
    }
    fn in_flight(&self) -> usize {
        self.held.lock().unwrap().len()
    }
    fn execute(&mut self, request: Request) -> Result<Response, crate::block::Error> {
        self.inner.execute(request)
    }
    fn read_into(
        &mut self,
        span: crate::block::Span,
        dst: &[vm_memory::VolatileSlice<'_>],
    ) -> Result<(), crate::block::Error> {
        self.inner.read_into(span, dst)
    }
    fn shutdown(&mut self) -> Result<(), crate::block::Error> {
        self.inner.shutdown()
    }
    fn quiesce(&mut self) -> Result<(), crate::block::Error> {
        self.inner.quiesce()
    }
}

fn held(rig: &Rig) -> (Held, Arc<std::sync::atomic::AtomicBool>) {
    let release = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let b = Held {
        inner: FileBackend::new(info(), rig.image.file.clone()).unwrap(),
        held: Default::default(),
        release: release.clone(),
    };
    (b, release)
}

#[test]
fn many_requests_are_in_flight_at_once_and_complete_later() {
    let rig = Rig::new();
    let q = MockSplitQueue::create(&rig.mem, GuestAddress(0), QSIZE);
    let (backend, release) = held(&rig);
    let mut dev = rig.device_on(Box::new(backend), vec![]);
    bring_up(&mut dev, &q, v1());
    let n = 5u16;
    for i in 0..n {
        let hdr = HDR + u64::from(i) * 16;
        let st = ST + u64::from(i);
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
        h[8..].copy_from_slice(&u64::from(i).to_le_bytes());
        rig.mem.write_slice(&h, GuestAddress(hdr)).unwrap();
        let data = DATA + u64::from(i) * 512;
        rig.mem
            .write_slice(&[0x10 + i as u8; 512], GuestAddress(data))
            .unwrap();
        let descs = req(i * 3, hdr, data, 512, 0, st);
        q.add_desc_chains(&descs, i * 3).unwrap();
    }
    kick(&mut dev);
    assert_eq!(dev.in_flight(), usize::from(n));
    assert!(used(&rig.mem).is_empty());
    release.store(true, std::sync::atomic::Ordering::SeqCst);
    dev.reap();
    assert_eq!(dev.in_flight(), 0);
    let mut heads: Vec<u32> = used(&rig.mem).iter().map(|e| e.0).collect();
    heads.sort();
    assert_eq!(heads, (0..n).map(|i| u32::from(i) * 3).collect::<Vec<_>>());
    let image = rig.image.bytes();
    for i in 0..n {
        let at = usize::from(i) * 512;
        assert_eq!(image[at..at + 512], [0x10 + i as u8; 512]);
        assert_eq!(rig.status(ST + u64::from(i)), VIRTIO_BLK_S_OK);
    }
}

#[test]
fn a_head_reused_while_in_flight_needs_reset() {
    let rig = Rig::new();
    let q = MockSplitQueue::create(&rig.mem, GuestAddress(0), QSIZE);
    let (backend, _release) = held(&rig);
    let mut dev = rig.device_on(Box::new(backend), vec![]);
    bring_up(&mut dev, &q, v1());
    rig.header(HDR, VIRTIO_BLK_T_OUT, 0);
    q.add_desc_chains(&req(0, HDR, DATA, 512, 0, ST), 0)
        .unwrap();
    kick(&mut dev);
    q.add_desc_chains(&req(0, HDR, DATA, 512, 0, ST), 0)
        .unwrap();
    kick(&mut dev);
    assert_ne!(r32(&mut dev, STATUS) & status::DEVICE_NEEDS_RESET, 0);
}

#[test]
fn a_completion_from_before_a_reset_never_touches_guest_memory() {
    let rig = Rig::new();
    let q = MockSplitQueue::create(&rig.mem, GuestAddress(0), QSIZE);
    let (backend, release) = held(&rig);
    let mut dev = rig.device_on(Box::new(backend), vec![]);
    bring_up(&mut dev, &q, v1());
    // GET_ID: its answer is written into guest memory at completion
    // (reads are served at once, see `reads_are_served_at_once...`).
    rig.header(HDR, VIRTIO_BLK_T_GET_ID, 0);
    rig.mem
        .write_slice(&[0u8; 512], GuestAddress(DATA))
        .unwrap();
    q.add_desc_chains(&req(0, HDR, DATA, 512, WRITE, ST), 0)
        .unwrap();
    kick(&mut dev);
    assert_eq!(dev.in_flight(), 1);
    w32(&mut dev, STATUS, 0);
    assert_eq!(r32(&mut dev, STATUS), 0);
    assert_eq!(dev.in_flight(), 0);
    release.store(true, std::sync::atomic::Ordering::SeqCst);
    dev.reap();
    let mut b = [0u8; 512];
    rig.mem.read_slice(&mut b, GuestAddress(DATA)).unwrap();
    assert_eq!(b, [0u8; 512]);
    assert_eq!(rig.status(ST), 0xff);
    assert!(used(&rig.mem).is_empty());
}

#[test]
fn event_idx_signals_ready_only_when_used_event_is_passed() {
    let rig = Rig::new();
    let q = MockSplitQueue::create(&rig.mem, GuestAddress(0), QSIZE);
    let mut dev = rig.device(vec![]);
    bring_up(&mut dev, &q, v1() | (1 << features::RING_F_EVENT_IDX));
    let used_event = q.avail_addr().0 + 4 + 2 * u64::from(QSIZE);
    // The guest wants to hear after the 3rd used entry (used_event = 2).
    rig.mem.write_obj(2u16, GuestAddress(used_event)).unwrap();
    rig.header(HDR, VIRTIO_BLK_T_FLUSH, 0);
    for i in 0..3u16 {
        q.add_desc_chains(&[d(HDR, 16, NEXT, i * 2 + 1), d(ST, 1, WRITE, 0)], i * 2)
            .unwrap();
        kick(&mut dev);
        let signalled = dev.ready_event().read().is_ok();
        assert_eq!(signalled, i == 2, "after request {i}");
    }
    // The device asks to be kicked at the next new entry (avail_event).
    let avail_event = USED + 4 + 8 * u64::from(QSIZE);
    assert_eq!(
        rig.mem.read_obj::<u16>(GuestAddress(avail_event)).unwrap(),
        3
    );
}

/// POLL's view of the device ([`Watch`]) needs no lock the worker holds
/// while it serves a batch: a guest waiting in POLL sees each completion
/// when it is published.
#[test]
fn poll_sees_completions_while_the_device_is_locked() {
    let rig = Rig::new();
    let q = MockSplitQueue::create(&rig.mem, GuestAddress(0), QSIZE);
    let mut dev = rig.device(vec![]);
    bring_up(&mut dev, &q, v1() | (1 << features::RING_F_EVENT_IDX));
    let watch = dev.watch();
    assert_eq!(watch.unseen(), Some(false));
    rig.header(HDR, VIRTIO_BLK_T_FLUSH, 0);
    q.add_desc_chains(&[d(HDR, 16, NEXT, 1), d(ST, 1, WRITE, 0)], 0)
        .unwrap();
    kick(&mut dev);
    let dev = Arc::new(Mutex::new(dev));
    let _held = dev.lock().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(watch.unseen()).unwrap());
    let seen = rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("POLL's readiness waited for the device's lock");
    assert_eq!(seen, Some(true), "one used entry the guest has not seen");
}

#[test]
fn without_event_idx_every_completion_signals_ready() {
    let rig = Rig::new();
    let q = MockSplitQueue::create(&rig.mem, GuestAddress(0), QSIZE);
    let mut dev = rig.device(vec![]);
    bring_up(&mut dev, &q, v1());
    rig.header(HDR, VIRTIO_BLK_T_FLUSH, 0);
    q.add_desc_chains(&[d(HDR, 16, NEXT, 1), d(ST, 1, WRITE, 0)], 0)
        .unwrap();
    kick(&mut dev);
    assert!(dev.ready_event().read().is_ok());
}

#[test]
fn the_worker_serves_ioeventfd_kicks_and_drains_at_shutdown() {
    let rig = Rig::new();
    let q = MockSplitQueue::create(&rig.mem, GuestAddress(0), QSIZE);
    let mut dev = rig.device(vec![]);
    bring_up(&mut dev, &q, v1());
    let dev = Arc::new(Mutex::new(dev));
    let worker = Worker::spawn(dev.clone()).unwrap();
    rig.mem
        .write_slice(&[0x42; 512], GuestAddress(DATA))
        .unwrap();
    rig.header(HDR, VIRTIO_BLK_T_OUT, 1);
    q.add_desc_chains(&req(0, HDR, DATA, 512, 0, ST), 0)
        .unwrap();
    // What KVM_IOEVENTFD does on a QueueNotify write.
    dev.lock().unwrap().notify_event().write(1).unwrap();
    let t = std::time::Instant::now();
    while used(&rig.mem).is_empty() {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(10),
            "never served"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert_eq!(rig.status(ST), VIRTIO_BLK_S_OK);
    worker.shutdown().unwrap();
    assert_eq!(&rig.image.bytes()[512..1024], &[0x42; 512]);
}

/// An image whose sync fails.
struct BadSync;
impl crate::block::Image for BadSync {
    fn read_at(&self, buf: &mut [u8], _: u64) -> std::io::Result<()> {
        buf.fill(0);
        Ok(())
    }
    fn write_at(&self, _: &[u8], _: u64) -> std::io::Result<()> {
        Ok(())
    }
    fn sync_data(&self) -> std::io::Result<()> {
        Err(std::io::Error::other("injected"))
    }
}

#[test]
fn worker_shutdown_reports_the_backend_error() {
    let rig = Rig::new();
    let backend = FileBackend::new(info(), Arc::new(BadSync)).unwrap();
    let dev = Arc::new(Mutex::new(rig.device_on(Box::new(backend), vec![])));
    let worker = Worker::spawn(dev).unwrap();
    let err = worker.shutdown().unwrap_err();
    assert!(err.to_string().contains("vd0"), "{err}");
}

#[test]
fn queue_max_must_be_a_power_of_two() {
    let rig = Rig::new();
    let backend = FileBackend::new(info(), rig.image.file.clone()).unwrap();
    assert!(VirtioBlk::new(Box::new(backend), 12, vec![]).is_err());
}

#[test]
fn more_data_buffers_than_seg_max_get_ioerr() {
    let rig = Rig::new();
    let q = MockSplitQueue::create(&rig.mem, GuestAddress(0), QSIZE);
    rig.header(HDR, VIRTIO_BLK_T_IN, 0);
    let chain = q
        .build_desc_chain(&[
            d(HDR, 16, 0, 0),
            d(DATA, 512, WRITE, 0),
            d(DATA + 512, 512, WRITE, 0),
            d(ST, 1, WRITE, 0),
        ])
        .unwrap();
    let limits = Limits {
        geometry: info().geometry,
        seg_max: 1,
        forbidden: &[],
    };
    match parse(chain, &rig.mem, &limits) {
        Err(Refused::Answer {
            code,
            error: ParseError::TooManySegments { count: 2, .. },
            ..
        }) => assert_eq!(code, VIRTIO_BLK_S_IOERR),
        other => panic!("{other:?}"),
    }
}

/// Found by the fuzzer: what was available at DRIVER_OK was submitted
/// but its completion waited for the next kick.
#[test]
fn requests_available_before_driver_ok_complete_at_driver_ok() {
    let rig = Rig::new();
    let q = MockSplitQueue::create(&rig.mem, GuestAddress(0), QSIZE);
    rig.header(HDR, VIRTIO_BLK_T_IN, 0);
    q.add_desc_chains(&req(0, HDR, DATA, 512, WRITE, ST), 0)
        .unwrap();
    let mut dev = rig.device(vec![]);
    bring_up(&mut dev, &q, v1());
    assert_eq!(dev.in_flight(), 0);
    assert_eq!(used(&rig.mem), vec![(0, 513)]);
    assert_eq!(rig.status(ST), VIRTIO_BLK_S_OK);
}

/// A journal ring whose sync is slow (as an `fdatasync` is) and counted.
struct SlowRing {
    dev: tt_ring::FaultyDevice,
    syncs: std::sync::atomic::AtomicU32,
}

impl tt_ring::BlockDevice for SlowRing {
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
        self.dev.write_at(buf, offset)
    }
    fn sync(&self) -> std::io::Result<()> {
        self.syncs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        std::thread::sleep(std::time::Duration::from_millis(20));
        self.dev.sync()
    }
}

/// The point of many requests in flight: writes submitted together share
/// journal commits, and each completes (on the device thread) once durable.
#[test]
fn writes_in_flight_together_share_journal_commits() {
    use crate::block::journaled::{JournaledBackend, Options};
    use crate::block::testing::ModelImage;
    use tt_ring::BlockDevice as _;
    let rig = Rig::new();
    let ring = Arc::new(SlowRing {
        dev: tt_ring::FaultyDevice::new(256 << 10, 512),
        syncs: 0.into(),
    });
    tt_ring::Producer::create(&*ring).unwrap();
    let image = Arc::new(tt_ring::FaultyDevice::new(CAPACITY, 512));
    let backend = JournaledBackend::start(
        info(),
        "/img",
        ring.clone(),
        Arc::new(ModelImage(image.clone())),
        Options::default(),
        None,
    )
    .unwrap();
    let q = MockSplitQueue::create(&rig.mem, GuestAddress(0), QSIZE);
    let mut dev = rig.device_on(Box::new(backend), vec![]);
    bring_up(&mut dev, &q, v1());
    let dev = Arc::new(Mutex::new(dev));
    let worker = Worker::spawn(dev.clone()).unwrap();
    let n = 5u16;
    let before = ring.syncs.load(std::sync::atomic::Ordering::SeqCst);
    for i in 0..n {
        let hdr = HDR + u64::from(i) * 16;
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
        h[8..].copy_from_slice(&u64::from(i).to_le_bytes());
        rig.mem.write_slice(&h, GuestAddress(hdr)).unwrap();
        let data = DATA + u64::from(i) * 512;
        rig.mem
            .write_slice(&[i as u8 + 1; 512], GuestAddress(data))
            .unwrap();
        let descs = req(i * 3, hdr, data, 512, 0, ST + u64::from(i));
        q.add_desc_chains(&descs, i * 3).unwrap();
    }
    dev.lock().unwrap().notify_event().write(1).unwrap();
    let t = std::time::Instant::now();
    while used(&rig.mem).len() < usize::from(n) {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(10),
            "{:?}",
            used(&rig.mem)
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let syncs = ring.syncs.load(std::sync::atomic::Ordering::SeqCst) - before;
    assert!(
        syncs < u32::from(n),
        "{n} writes in flight together took {syncs} journal syncs"
    );
    for i in 0..n {
        assert_eq!(rig.status(ST + u64::from(i)), VIRTIO_BLK_S_OK);
    }
    worker.shutdown().unwrap();
    for i in 0..n {
        let mut b = [0u8; 512];
        image.read_at(&mut b, u64::from(i) * 512).unwrap();
        assert_eq!(b, [i as u8 + 1; 512], "sector {i} after the drain");
    }
}
