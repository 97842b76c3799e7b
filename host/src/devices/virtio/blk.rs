//! virtio-blk (virtio 1.x section 5.2) over the block layer.
//!
//! [`VirtioBlk`] is the whole device: the transport's registers, the
//! queue, the [`Backend`] and the requests in flight. Requests are parsed
//! ([`super::request`]), submitted with `user_data` = the chain's head in
//! the low 16 bits and the device's reset generation above them (a
//! completion from before a reset is dropped, never written to guest
//! memory), and completed when the backend's completion arrives, in any
//! order: up to the queue size are in flight together, so a journal's
//! group commit serves them with one sync.
//!
//! [`VirtioBlk::process_queue`] serves the available ring;
//! [`VirtioBlk::reap`] completes what the backend finished. A
//! [`Worker`] thread does both when the notify eventfd or the backend's
//! eventfd fires.

use super::mmio::{Action, Transport};
use super::request::{self, Buf, Limits, ParseError, Refused};
use super::{features, range_ok, Forbidden, MmioDevice};
use crate::block::{self, Backend, Completion, Response};
use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// virtio device id of a block device.
pub const DEVICE_ID: u32 = tt_hvt_abi::virtio::blk::DEVICE_ID;

/// Why a device could not be made or run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "virtio-blk '{device}': queue size {queue_max} is not a power of two between 2 and \
         32768; pick one that is"
    )]
    QueueMax { device: String, queue_max: u16 },
    #[error("virtio-blk '{device}': cannot create an eventfd: {source}")]
    EventFd {
        device: String,
        #[source]
        source: std::io::Error,
    },
    #[error("virtio-blk '{device}': cannot start its thread: {source}")]
    Thread {
        device: String,
        #[source]
        source: std::io::Error,
    },
    #[error("virtio-blk '{device}': its thread panicked")]
    Panicked { device: String },
    #[error(transparent)]
    Backend(#[from] block::Error),
}

/// virtio-blk configuration space (section 5.2.4), as far as it is
/// offered: capacity, size_max (not offered), seg_max, geometry (not
/// offered), blk_size.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct BlkConfig {
    pub capacity: u64,
    pub size_max: u32,
    pub seg_max: u32,
    pub cylinders: u16,
    pub heads: u8,
    pub sectors: u8,
    pub blk_size: u32,
}
// SAFETY: plain integers, `repr(C)`, no padding (8+4+4+2+1+1+4 = 24).
unsafe impl ByteValued for BlkConfig {}

/// A request handed to the backend, waiting for its completion.
#[derive(Debug)]
struct InFlight {
    head: u16,
    data_in: Vec<Buf>,
    status: u64,
    /// Bytes of a write (counted once it completes); 0 for other types.
    write_len: u64,
}

/// The virtio-blk device.
pub struct VirtioBlk {
    name: String,
    transport: Transport,
    backend: Box<dyn Backend>,
    mem: Option<GuestMemoryMmap>,
    forbidden: Vec<Forbidden>,
    config: BlkConfig,
    notify: EventFd,
    ready: EventFd,
    generation: u64,
    in_flight: HashMap<u64, InFlight>,
    scratch: Vec<Completion>,
    /// Used entries added since the last notification decision.
    unpublished: bool,
    last_error: Option<ParseError>,
    watch: Arc<Watch>,
    /// Where to mark what it writes into guest memory while a migration
    /// copies it.
    dirty: Option<Arc<crate::vmm::dirty::HostDirty>>,
}

/// What POLL needs to know about a device, kept apart from it: the worker
/// holds the device's lock while it serves a batch of requests, and a
/// guest waiting in POLL must see each completion as it is published, not
/// when the batch is done.
#[derive(Default)]
pub struct Watch {
    state: Mutex<WatchState>,
}

#[derive(Default)]
struct WatchState {
    mem: Option<GuestMemoryMmap>,
    /// The ready queue's driver area, device area and size.
    ring: Option<(u64, u64, u16)>,
    event_idx: bool,
    needs_reset: bool,
}

fn lock_watch(w: &Watch) -> std::sync::MutexGuard<'_, WatchState> {
    // Plain data, consistent after every critical section.
    w.state.lock().unwrap_or_else(|e| e.into_inner())
}

impl Watch {
    /// Is there something for the guest to see: the device needs a
    /// reset, or (with `VIRTIO_RING_F_EVENT_IDX`) the used ring's index
    /// has passed the `used_event` the guest wrote, the index up to which
    /// it has seen. `None` without EVENT_IDX: then only the ready eventfd
    /// tells.
    pub fn unseen(&self) -> Option<bool> {
        let w = lock_watch(self);
        if w.needs_reset {
            return Some(true);
        }
        if !w.event_idx {
            return None;
        }
        let (Some(mem), Some((avail, used, size))) = (&w.mem, w.ring) else {
            return Some(false);
        };
        let at = |a: u64| mem.read_obj::<u16>(GuestAddress(a)).ok().map(u16::from_le);
        let (Some(idx), Some(seen)) = (at(used + 2), at(avail + 4 + 2 * u64::from(size))) else {
            return Some(false);
        };
        Some((idx.wrapping_sub(seen) as i16) > 0)
    }
}

impl VirtioBlk {
    /// A device serving `backend` with one queue of `queue_max` entries
    /// (a power of two), that never reads or writes guest memory in
    /// `forbidden`.
    pub fn new(
        backend: Box<dyn Backend>,
        queue_max: u16,
        forbidden: Vec<Forbidden>,
    ) -> Result<VirtioBlk, Error> {
        let info = backend.info().clone();
        let name = info.name.clone();
        let offered = (1u64 << features::F_VERSION_1)
            | (1 << features::BLK_F_FLUSH)
            | (1 << features::BLK_F_BLK_SIZE)
            | (1 << features::BLK_F_SEG_MAX)
            | (1 << features::RING_F_EVENT_IDX);
        let transport =
            Transport::new(DEVICE_ID, offered, queue_max).ok_or_else(|| Error::QueueMax {
                device: name.clone(),
                queue_max,
            })?;
        let efd = || {
            EventFd::new(EFD_NONBLOCK).map_err(|source| Error::EventFd {
                device: name.clone(),
                source,
            })
        };
        let config = BlkConfig {
            capacity: (info.geometry.capacity / request::SECTOR).to_le(),
            seg_max: (u32::from(queue_max).saturating_sub(2).max(1)).to_le(),
            blk_size: (info.geometry.sector_size as u32).to_le(),
            ..BlkConfig::default()
        };
        Ok(VirtioBlk {
            notify: efd()?,
            ready: efd()?,
            name,
            transport,
            backend,
            mem: None,
            forbidden,
            config,
            generation: 0,
            in_flight: HashMap::new(),
            scratch: Vec::new(),
            unpublished: false,
            last_error: None,
            watch: Arc::default(),
            dirty: None,
        })
    }

    /// While a migration tracks them: mark `[at, at + len)` as written.
    fn mark(&self, at: u64, len: u64) {
        if let Some(d) = self.dirty.as_ref().filter(|d| d.active()) {
            d.mark(at, len);
        }
    }

    /// While a migration tracks them: mark the used ring (entries, index
    /// and avail_event), which serving the queue writes.
    fn mark_used_ring(&self) {
        if let Some((_, _, used, size)) = self.queue() {
            self.mark(used, 6 + 8 * u64::from(size));
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The eventfd for KVM_IOEVENTFD on QueueNotify (datamatch 0).
    pub fn notify_event(&self) -> &EventFd {
        &self.notify
    }

    /// Readable once used entries the guest asked to hear about are
    /// published; the POLL handler reads it to clear it.
    pub fn ready_event(&self) -> &EventFd {
        &self.ready
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.transport.status()
    }

    /// Why the device last refused a chain or set DEVICE_NEEDS_RESET.
    pub fn last_error(&self) -> Option<&ParseError> {
        self.last_error.as_ref()
    }

    /// The ready queue's guest addresses and size: (descriptor table,
    /// driver area, device area, size); `None` while it is not ready.
    pub fn queue(&self) -> Option<(u64, u64, u64, u16)> {
        let q = &self.transport.queue;
        q.ready()
            .then(|| (q.desc_table(), q.avail_ring(), q.used_ring(), q.size()))
    }

    /// Is there something for the guest to see, as POLL asks: see
    /// [`Watch::unseen`].
    pub fn unseen(&self) -> Option<bool> {
        self.watch.unseen()
    }

    /// What POLL reads without this device's lock.
    pub fn watch(&self) -> Arc<Watch> {
        self.watch.clone()
    }

    /// Bring the [`Watch`] up to date with the transport: after every
    /// register write and every failure.
    fn sync_watch(&self) {
        let mut w = lock_watch(&self.watch);
        w.ring = self
            .queue()
            .map(|(_, avail, used, size)| (avail, used, size));
        w.event_idx = self.transport.has_feature(features::RING_F_EVENT_IDX);
        w.needs_reset = self.status() & super::status::DEVICE_NEEDS_RESET != 0;
    }

    /// Requests submitted to the backend and not completed yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    fn limits(&self) -> Limits<'_> {
        Limits {
            geometry: self.backend.info().geometry,
            seg_max: u32::from_le(self.config.seg_max),
            forbidden: &self.forbidden,
        }
    }

    fn fail(&mut self, why: Option<ParseError>) {
        if why.is_some() {
            self.last_error = why;
        }
        self.transport.fail();
        self.sync_watch();
        // Wake a guest waiting in POLL so it sees the status.
        let _ = self.ready.write(1);
    }

    fn key(&self, head: u16) -> u64 {
        (self.generation << 16) | u64::from(head)
    }

    /// Serve the available ring: parse each new chain, submit it or
    /// answer it at once. Returns how many chains were taken. Does
    /// nothing unless the device is live.
    pub fn process_queue(&mut self) -> usize {
        let Some(mem) = self.mem.clone() else {
            return 0;
        };
        // Notification suppression writes the used ring's avail_event.
        self.mark_used_ring();
        let mut taken = 0;
        while self.transport.live() {
            let _ = self.transport.queue.disable_notification(&mem);
            let chains: Vec<_> = match self.transport.queue.iter(&mem) {
                Ok(it) => it.collect(),
                Err(_) => {
                    // The available index ran more than a queue ahead.
                    self.fail(None);
                    break;
                }
            };
            for chain in chains {
                taken += 1;
                let head = chain.head_index();
                if self.in_flight.contains_key(&self.key(head)) {
                    self.fail(Some(ParseError::HeadInFlight { head }));
                    break;
                }
                match request::parse(chain, &mem, &self.limits()) {
                    Ok(request::Parsed {
                        head,
                        request: block::Request::Read(span),
                        data_in,
                        status,
                    }) => {
                        let code = self.read_now(&mem, span, &data_in);
                        let len = if code == request::VIRTIO_BLK_S_OK {
                            crate::runfile::stats::counters().block_read(span.len());
                            span.len() as u32
                        } else {
                            0
                        };
                        self.complete(&mem, head, status, code, len);
                        // Tell a waiting guest now: it reaps and submits
                        // while the rest of the batch is read.
                        self.publish(&mem);
                    }
                    Ok(p) => {
                        let key = self.key(p.head);
                        let write_len = match &p.request {
                            block::Request::Write(w) => w.span().len(),
                            _ => 0,
                        };
                        self.in_flight.insert(
                            key,
                            InFlight {
                                head: p.head,
                                data_in: p.data_in,
                                status: p.status,
                                write_len,
                            },
                        );
                        if self.backend.submit(key, p.request).is_err() {
                            let f = self.in_flight.remove(&key);
                            if let Some(f) = f {
                                self.complete(
                                    &mem,
                                    f.head,
                                    f.status,
                                    request::VIRTIO_BLK_S_IOERR,
                                    0,
                                );
                            }
                        }
                    }
                    Err(Refused::Answer {
                        head,
                        status,
                        code,
                        error,
                    }) => {
                        self.last_error = Some(error);
                        self.complete(&mem, head, status, code, 0);
                    }
                    Err(Refused::Fatal(error)) => {
                        self.fail(Some(error));
                        break;
                    }
                }
            }
            if !self.transport.live() {
                break;
            }
            match self.transport.queue.enable_notification(&mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(_) => {
                    self.fail(None);
                    break;
                }
            }
        }
        self.publish(&mem);
        taken
    }

    /// Serve a read at once, from the backend straight into the guest's
    /// buffers (checked by `parse`: in RAM, clear of forbidden ranges,
    /// `span.len()` bytes in all). Returns the status code.
    fn read_now(&mut self, mem: &GuestMemoryMmap, span: block::Span, bufs: &[Buf]) -> u8 {
        let slices: Result<Vec<_>, _> = bufs
            .iter()
            .map(|b| mem.get_slice(GuestAddress(b.addr), b.len as usize))
            .collect();
        let Ok(slices) = slices else {
            // A buffer across two memory regions (the VMM maps one).
            return request::VIRTIO_BLK_S_IOERR;
        };
        match self.backend.read_into(span, &slices) {
            Ok(()) => request::VIRTIO_BLK_S_OK,
            Err(_) => request::VIRTIO_BLK_S_IOERR,
        }
    }

    /// Complete what the backend finished: write read data and status,
    /// add used entries, signal the ready eventfd if the guest asked.
    /// Returns how many completions were taken.
    pub fn reap(&mut self) -> usize {
        let mut done = std::mem::take(&mut self.scratch);
        let n = self.backend.poll(&mut done);
        if let Some(mem) = self.mem.clone() {
            for c in done.drain(..) {
                // Not found: from before a reset; drop it.
                if let Some(f) = self.in_flight.remove(&c.user_data) {
                    self.finish(&mem, f, c.result);
                }
            }
            self.publish(&mem);
        }
        done.clear();
        self.scratch = done;
        n
    }

    fn finish(
        &mut self,
        mem: &GuestMemoryMmap,
        f: InFlight,
        result: Result<Response, block::Error>,
    ) {
        let bytes: Option<&[u8]> = match &result {
            Ok(Response::Read(data)) => Some(data),
            Ok(Response::Id(id)) => {
                let total: u64 = f.data_in.iter().map(|b| u64::from(b.len)).sum();
                Some(&id[..request::id_len(total)])
            }
            _ => None,
        };
        match &result {
            Ok(Response::Written) => crate::runfile::stats::counters().block_write(f.write_len),
            Ok(Response::Read(data)) => {
                crate::runfile::stats::counters().block_read(data.len() as u64)
            }
            _ => {}
        }
        let code = if result.is_ok() {
            request::VIRTIO_BLK_S_OK
        } else {
            request::VIRTIO_BLK_S_IOERR
        };
        let mut written = 0u32;
        if let Some(bytes) = bytes {
            for b in &f.data_in {
                self.mark(b.addr, u64::from(b.len));
            }
            match write_bufs(mem, &f.data_in, bytes) {
                Some(n) => written = n,
                None => {
                    self.complete(mem, f.head, f.status, request::VIRTIO_BLK_S_IOERR, 0);
                    return;
                }
            }
        }
        self.complete(mem, f.head, f.status, code, written);
    }

    /// Write the status byte and add the used entry (`len` data bytes
    /// plus the status byte).
    fn complete(&mut self, mem: &GuestMemoryMmap, head: u16, status: u64, code: u8, len: u32) {
        self.mark(status, 1);
        self.mark_used_ring();
        if mem.write_obj(code, GuestAddress(status)).is_err() {
            self.fail(None);
            return;
        }
        if self
            .transport
            .queue
            .add_used(mem, head, len.saturating_add(1))
            .is_err()
        {
            self.fail(None);
            return;
        }
        self.unpublished = true;
    }

    /// Publish what was completed, now (a quiesce).
    fn publish_now(&mut self) {
        if let Some(mem) = self.mem.clone() {
            self.publish(&mem);
        }
    }

    /// Are the ready queue's rings in guest memory, clear of forbidden
    /// ranges (as the driver's QueueReady is checked)?
    fn rings_ok(&self) -> bool {
        let (desc, driver, device, size) = self.transport.queue_layout();
        let n = u64::from(size);
        self.mem.as_ref().is_some_and(|mem| {
            range_ok(mem, &self.forbidden, desc, 16 * n)
                && range_ok(mem, &self.forbidden, driver, 6 + 2 * n)
                && range_ok(mem, &self.forbidden, device, 6 + 8 * n)
        })
    }

    fn publish(&mut self, mem: &GuestMemoryMmap) {
        if !self.unpublished {
            return;
        }
        self.unpublished = false;
        // With EVENT_IDX: only when used_event was passed; without: always.
        if self.transport.queue.needs_notification(mem).unwrap_or(true) {
            let _ = self.ready.write(1);
        }
    }

    /// Forget every request: after a reset or a queue stop.
    fn drop_requests(&mut self) {
        self.generation = self.generation.wrapping_add(1) & ((1 << 48) - 1);
        self.in_flight.clear();
    }

    /// Check the queue's rings (in RAM, clear of forbidden ranges) and
    /// make it ready, or flag DEVICE_NEEDS_RESET.
    fn queue_ready(&mut self) {
        let (desc, driver, device, size) = self.transport.queue_layout();
        let n = u64::from(size);
        let ok = match &self.mem {
            Some(mem) => {
                range_ok(mem, &self.forbidden, desc, 16 * n)
                    && range_ok(mem, &self.forbidden, driver, 6 + 2 * n)
                    && range_ok(mem, &self.forbidden, device, 6 + 8 * n)
            }
            None => false,
        };
        if !(ok && self.transport.set_queue_ready()) {
            self.fail(None);
        }
    }

    /// Wait for requests in flight, make completed writes durable
    /// ([`Backend::shutdown`]) and complete what remains. The backend's
    /// error names the device.
    pub fn shutdown(&mut self) -> Result<(), block::Error> {
        let r = self.backend.shutdown();
        self.reap();
        r
    }
}

/// Write `bytes` across `bufs` in order; returns how many were written
/// (`None` if guest memory refused a write).
fn write_bufs(mem: &GuestMemoryMmap, bufs: &[Buf], mut bytes: &[u8]) -> Option<u32> {
    let mut n = 0u32;
    for b in bufs {
        if bytes.is_empty() {
            break;
        }
        let k = (b.len as usize).min(bytes.len());
        mem.write_slice(&bytes[..k], GuestAddress(b.addr)).ok()?;
        bytes = &bytes[k..];
        n = n.saturating_add(k as u32);
    }
    Some(n)
}

impl MmioDevice for VirtioBlk {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.transport.read(offset, data, self.config.as_slice());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let action = self.transport.write(offset, data);
        self.sync_watch();
        match action {
            Action::None => {}
            Action::Notify => {
                // No ioeventfd: a kick on the vCPU thread.
                self.process_queue();
                self.reap();
            }
            Action::Reset | Action::QueueStop => self.drop_requests(),
            Action::QueueReady => self.queue_ready(),
            Action::DriverOk => {
                // Serve what the driver made available before DRIVER_OK.
                self.process_queue();
                self.reap();
            }
        }
    }

    fn attach_memory(&mut self, mem: GuestMemoryMmap) {
        lock_watch(&self.watch).mem = Some(mem.clone());
        self.mem = Some(mem);
    }

    fn quiesce(&mut self) -> Result<(), String> {
        // Take what the guest made available (a notification the worker
        // has not served yet would be lost with this process), then wait
        // for every request in flight to complete into guest memory.
        self.process_queue();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            self.reap();
            if self.in_flight.is_empty() {
                break;
            }
            if std::time::Instant::now() >= deadline {
                return Err(format!(
                    "virtio-blk '{}': {} requests still in flight after 60 s",
                    self.name,
                    self.in_flight.len()
                ));
            }
            let mut fd = libc::pollfd {
                fd: self.backend.event().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, for the call.
            unsafe { libc::poll(&mut fd, 1, 50) };
        }
        self.publish_now();
        self.backend
            .quiesce()
            .map_err(|e| format!("virtio-blk: {e}"))
    }

    fn save(&self) -> Result<Vec<u8>, String> {
        if !self.in_flight.is_empty() {
            return Err(format!("virtio-blk '{}': requests in flight", self.name));
        }
        postcard::to_stdvec(&self.transport.save()).map_err(|e| e.to_string())
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), String> {
        let s: super::mmio::TransportState = postcard::from_bytes(state)
            .map_err(|e| format!("virtio-blk '{}': its saved state: {e}", self.name))?;
        let ok = self.transport.restore(&s) && (!s.ready || self.rings_ok());
        if !ok {
            self.transport.reset();
            self.sync_watch();
            return Err(format!(
                "virtio-blk '{}': its saved state is not one this device can take (features or \
                 queue)",
                self.name
            ));
        }
        self.sync_watch();
        // Anything the driver made available meanwhile is served.
        let _ = self.notify.write(1);
        Ok(())
    }

    fn suspend(&mut self) -> Result<(), String> {
        self.backend
            .suspend()
            .map_err(|e| format!("virtio-blk: {e}"))
    }

    fn resume(&mut self) -> Result<(), String> {
        self.backend
            .resume()
            .map_err(|e| format!("virtio-blk: {e}"))
    }

    fn disks(&self) -> Result<Vec<crate::snapshot::DiskIdentity>, String> {
        match self.backend.image_file() {
            Some(f) => crate::snapshot::disk_identity(&self.name, f)
                .map(|d| vec![d])
                .map_err(|e| format!("block device '{}': cannot read its image: {e}", self.name)),
            None => Ok(Vec::new()),
        }
    }

    fn lock_fds(&self) -> Vec<std::os::fd::RawFd> {
        self.backend.lock_fds()
    }

    fn track_writes(&mut self, dirty: Option<Arc<crate::vmm::dirty::HostDirty>>) {
        self.dirty = dirty;
    }
}

/// The device's thread: serves notifications and completions until
/// stopped.
pub struct Worker {
    device: Arc<Mutex<VirtioBlk>>,
    name: String,
    stop: EventFd,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn lock(m: &Mutex<VirtioBlk>) -> std::sync::MutexGuard<'_, VirtioBlk> {
    // Every critical section leaves the device consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Worker {
    /// Start the thread for `device` (the same `Arc` the bus holds).
    pub fn spawn(device: Arc<Mutex<VirtioBlk>>) -> Result<Worker, Error> {
        let (name, notify, backend) = {
            let d = lock(&device);
            let name = d.name.clone();
            let e = |source| Error::EventFd {
                device: name.clone(),
                source,
            };
            (
                name.clone(),
                d.notify.try_clone().map_err(e)?,
                d.backend.event().try_clone().map_err(e)?,
            )
        };
        let e = |source| Error::EventFd {
            device: name.clone(),
            source,
        };
        let stop = EventFd::new(EFD_NONBLOCK).map_err(e)?;
        let stop2 = stop.try_clone().map_err(e)?;
        let dev = device.clone();
        let thread = std::thread::Builder::new()
            .name(format!("virtio-blk {name}"))
            .spawn(move || serve(&dev, &notify, &backend, &stop2))
            .map_err(|source| Error::Thread {
                device: name.clone(),
                source,
            })?;
        Ok(Worker {
            device,
            name,
            stop,
            thread: Some(thread),
        })
    }

    fn stop_thread(&mut self) -> bool {
        let _ = self.stop.write(1);
        match self.thread.take() {
            Some(t) => t.join().is_ok(),
            None => true,
        }
    }

    /// Stop the thread, then drain the backend ([`VirtioBlk::shutdown`]):
    /// its error (or the thread's panic) is returned.
    pub fn shutdown(mut self) -> Result<(), Error> {
        let joined = self.stop_thread();
        lock(&self.device).shutdown()?;
        if joined {
            Ok(())
        } else {
            Err(Error::Panicked {
                device: self.name.clone(),
            })
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

fn serve(device: &Mutex<VirtioBlk>, notify: &EventFd, backend: &EventFd, stop: &EventFd) {
    let mut fds = [
        libc::pollfd {
            fd: notify.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: backend.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        for f in fds.iter_mut() {
            f.revents = 0;
        }
        // SAFETY: `fds` is a valid array of 3 pollfds that outlives the
        // call; the descriptors are owned by eventfds alive in this frame.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if r < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        if fds[2].revents != 0 {
            return;
        }
        if fds[0].revents != 0 {
            let _ = notify.read();
            let mut d = lock(device);
            d.process_queue();
            d.reap();
        } else if fds[1].revents != 0 {
            lock(device).reap();
        }
    }
}
