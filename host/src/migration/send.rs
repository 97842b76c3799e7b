//! The source side of a live migration, run by the control socket's
//! thread of `tt-host run --control` while the guest runs (see the module
//! doc of [`super`] for the protocol).

use super::{check_hello, hello, tag, Config, Conn, HELLO_MEMFD, PAGE, PEER_TIMEOUT};
use crate::vmm::control::{Inbox, Op, Source, NOT_PAUSED};
use crate::vmm::dirty::{self, HostDirty};
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress};

/// `migrate-send`'s knobs.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Stop copying while the guest runs once what is left would take
    /// at most this long to send at the rate measured so far.
    pub downtime: Duration,
    /// Give up (the guest runs on here) if that has not happened after
    /// this long.
    pub max_time: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            downtime: Duration::from_millis(50),
            max_time: Duration::from_secs(30),
        }
    }
}

/// Pages per PAGES frame.
const BATCH: usize = 256;

/// How it went.
#[derive(Debug, Default)]
struct Stats {
    rounds: u32,
    pages: u64,
    /// Time spent sending pages, for the rate.
    sending: Duration,
    downtime: Duration,
}

impl Stats {
    /// Bytes per second sent so far (a floor, so that one fast round does
    /// not promise too much).
    fn rate(&self) -> f64 {
        let secs = self.sending.as_secs_f64().max(1e-3);
        (self.pages as f64 * PAGE as f64 / secs).max(1e6)
    }
}

/// Migrate the guest over `conn` (connected, authenticated). `Ok`: the
/// target runs it and this run ends; `Err`: the guest runs on here.
pub fn send(mut conn: Conn, inbox: &Inbox, opts: &Options) -> Result<String, String> {
    let src = inbox
        .source()
        .ok_or("this tt-host cannot migrate its guest")?;
    let net = |e: std::io::Error| format!("migration stream: {e}");
    conn.set_timeout(Some(PEER_TIMEOUT)).map_err(net)?;
    // Over a Unix socket the target is on this host: RAM goes as the
    // memfd it lives in, never copied.
    let memfd = conn.is_unix();
    conn.send(tag::HELLO, &hello(if memfd { HELLO_MEMFD } else { 0 }))
        .map_err(net)?;
    check_hello(&conn.recv(64).map_err(net)?)?;
    let h = &src.handles;
    let mem_size: u64 = {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        h.mem.iter().map(|r| r.len()).sum()
    };
    let config = Config {
        launch: src.launch.clone(),
        mem_size,
    };
    let bytes = postcard::to_stdvec(&config).map_err(|e| e.to_string())?;
    let memfd_fd = [std::os::fd::AsRawFd::as_raw_fd(&*h.memfd)];
    conn.send_with_fds(tag::CONFIG, &bytes, if memfd { &memfd_fd } else { &[] })
        .map_err(net)?;

    let mut stats = Stats::default();
    let started = Instant::now();
    let mut pending = Vec::new();
    if !memfd {
        match precopy(&mut conn, &src, opts, &mut stats, started) {
            Ok(left) => pending = left,
            Err(e) => {
                let e = target_reason(&mut conn, e);
                stop_tracking(&src);
                let _ = conn.send(tag::ABORT, e.as_bytes());
                return Err(e);
            }
        }
    }

    // The guest stops here; from now on a failure resumes it. (With a
    // memfd nothing happens between the pause and the switch: `switch`
    // pauses it in the same step.)
    let paused = Instant::now();
    if !memfd {
        inbox.call(Op::Pause).inspect_err(|_| stop_tracking(&src))?;
        phase("paused", paused);
    }
    let switched = switch(&mut conn, inbox, &src, memfd, pending, &mut stats);
    match switched {
        Ok(entry_taken) => {
            stats.downtime = paused.elapsed();
            stop_tracking(&src);
            let _ = inbox.call(Op::HandOver { entry_taken });
            Ok(format!(
                "migrated: {} rounds, {} pages copied while running, {:.1} ms paused, {:.0} ms \
                 in all",
                stats.rounds,
                stats.pages,
                stats.downtime.as_secs_f64() * 1e3,
                started.elapsed().as_secs_f64() * 1e3
            ))
        }
        Err(e) => {
            let e = target_reason(&mut conn, e);
            stop_tracking(&src);
            let _ = conn.send(tag::ABORT, e.as_bytes());
            drop(conn);
            // (If the switch failed before the pause, the guest runs on
            // already and its devices were never suspended.)
            let back = take_locks(&src.lock_fds)
                .and_then(|()| match inbox.call(Op::Suspend(false)) {
                    Err(e) if e == NOT_PAUSED => Ok(String::new()),
                    r => r,
                })
                .and_then(|_| inbox.call(Op::Resume));
            match back {
                Ok(_) => Err(format!("{e}; the guest runs on here")),
                Err(b) => Err(format!(
                    "{e}; and the guest cannot run on here: {b} (it stays paused: stop it)"
                )),
            }
        }
    }
}

/// Copy RAM while the guest runs; the pages still dirty when what is
/// left fits the downtime budget.
fn precopy(
    conn: &mut Conn,
    src: &Source,
    opts: &Options,
    stats: &mut Stats,
    started: Instant,
) -> Result<Vec<u64>, String> {
    let h = &src.handles;
    h.host_dirty.set_active(true);
    dirty::set_dirty_logging(&h.vm, &h.mem, true).map_err(|e| {
        format!("{e}: this host's KVM cannot log dirty pages, so the guest cannot migrate live")
    })?;
    // Round 0: every page that is not zero (the target's RAM starts
    // zeroed).
    let words = h.host_dirty.take().len();
    let all = vec![u64::MAX; words];
    send_pages(conn, &h.mem, &all, true, stats)?;
    loop {
        stats.rounds += 1;
        let mut d = dirty::guest_dirty(&h.vm, &h.mem).map_err(|e| e.to_string())?;
        or_into(&mut d, &h.host_dirty.take());
        let n: u64 = d.iter().map(|w| u64::from(w.count_ones())).sum();
        let eta = n as f64 * PAGE as f64 / stats.rate();
        if eta <= opts.downtime.as_secs_f64() {
            return Ok(d);
        }
        if started.elapsed() >= opts.max_time {
            return Err(format!(
                "the migration did not converge in {:.1} s: after {} rounds the guest still had \
                 {} dirty pages ({} MiB), {:.0} ms of sending at {:.0} MiB/s, more than the \
                 downtime budget of {} ms",
                opts.max_time.as_secs_f64(),
                stats.rounds,
                n,
                (n * PAGE as u64) >> 20,
                eta * 1e3,
                stats.rate() / (1 << 20) as f64,
                opts.downtime.as_millis()
            ));
        }
        send_pages(conn, &h.mem, &d, false, stats)?;
    }
}

/// Paused: send what is left and the state, hand the devices over, and
/// wait for the target's READY; whether it adopted the admission entry.
fn switch(
    conn: &mut Conn,
    inbox: &Inbox,
    src: &Source,
    memfd: bool,
    mut pending: Vec<u64>,
    stats: &mut Stats,
) -> Result<bool, String> {
    let h = &src.handles;
    let net = |e: std::io::Error| format!("migration stream: {e}");
    if !memfd {
        let d = dirty::guest_dirty(&h.vm, &h.mem).map_err(|e| e.to_string())?;
        or_into(&mut pending, &d);
        or_into(&mut pending, &h.host_dirty.take());
        for p in dirty::low_pages() {
            pending[(p / 64) as usize] |= 1 << (p % 64);
        }
        send_pages(conn, &h.mem, &pending, false, stats)?;
    }
    let t = Instant::now();
    let (tx, rx) = std::sync::mpsc::channel();
    let _ = inbox.call(Op::Switch(tx));
    let state = rx.recv().map_err(|_| "the guest stopped".to_string())??;
    release_locks(&src.lock_fds);
    phase("paused, state saved, devices suspended", t);
    // STATE's payload: the entry's name (for the target to adopt it), the
    // names of the devices whose descriptors follow it (TAPs), then the
    // state file. Descriptors cross only a Unix socket.
    let unix = conn.is_unix();
    let mut fds = Vec::new();
    let mut entry = "";
    if let (true, Some((fd, name))) = (unix, &src.admission) {
        fds.push(*fd);
        entry = name;
    }
    let handed: &[(String, std::os::fd::RawFd)] = if unix { &src.handover } else { &[] };
    let mut payload = (entry.len() as u32).to_le_bytes().to_vec();
    payload.extend_from_slice(entry.as_bytes());
    payload.extend_from_slice(&(handed.len() as u32).to_le_bytes());
    for (name, fd) in handed {
        payload.extend_from_slice(&(name.len() as u32).to_le_bytes());
        payload.extend_from_slice(name.as_bytes());
        fds.push(*fd);
    }
    payload.extend_from_slice(&state);
    conn.send_with_fds(tag::STATE, &payload, &fds)
        .map_err(net)?;
    phase("state sent", t);
    let answer = conn.recv(4096).map_err(|e| {
        format!("the target did not answer the state ({e}): it failed or was stopped")
    })?;
    phase("target ready", t);
    match answer.tag {
        // READY says whether the target adopted the admission entry.
        tag::READY => {
            let adopted = answer.payload.first() == Some(&1) && !fds.is_empty();
            conn.send(tag::COMMIT, &[]).map_err(net)?;
            Ok(adopted)
        }
        tag::ABORT => Err(format!(
            "the target refused the guest: {}",
            String::from_utf8_lossy(&answer.payload)
        )),
        t => Err(format!(
            "the target answered with {} instead of READY",
            tag::name(t)
        )),
    }
}

/// Send every page set in `bits` (one u64 per 64 pages); with
/// `skip_zero`, pages of zeros are left out.
fn send_pages(
    conn: &mut Conn,
    mem: &vm_memory::GuestMemoryMmap,
    bits: &[u64],
    skip_zero: bool,
    stats: &mut Stats,
) -> Result<(), String> {
    let t = Instant::now();
    let mut frame = Vec::with_capacity(BATCH * (8 + PAGE));
    let mut page = vec![0u8; PAGE];
    let mut n = 0;
    for (w, &word) in bits.iter().enumerate() {
        let mut word = word;
        while word != 0 {
            let b = word.trailing_zeros() as u64;
            word &= word - 1;
            let gpa = (w as u64 * 64 + b) * PAGE as u64;
            if mem.read_slice(&mut page, GuestAddress(gpa)).is_err() {
                continue; // past the end of RAM (the bitmap's last word)
            }
            if skip_zero && page.iter().all(|&x| x == 0) {
                continue;
            }
            frame.extend_from_slice(&gpa.to_le_bytes());
            frame.extend_from_slice(&page);
            n += 1;
            if n == BATCH {
                conn.send(tag::PAGES, &frame)
                    .map_err(|e| format!("migration stream: {e}"))?;
                stats.pages += n as u64;
                frame.clear();
                n = 0;
            }
        }
    }
    if n > 0 {
        conn.send(tag::PAGES, &frame)
            .map_err(|e| format!("migration stream: {e}"))?;
        stats.pages += n as u64;
    }
    stats.sending += t.elapsed();
    Ok(())
}

/// With `TT_HOST_STATS=1` (tt-bench): how long since `t`.
fn phase(what: &str, t: Instant) {
    if std::env::var_os("TT_HOST_STATS").is_some_and(|v| v == "1") {
        eprintln!(
            "tt-host: stats: migration {what}: +{:.2} ms",
            t.elapsed().as_secs_f64() * 1e3
        );
    }
}

/// After the stream failed: the target's own reason, if it sent one
/// (an ABORT waiting to be read), instead of the bare stream error.
fn target_reason(conn: &mut Conn, e: String) -> String {
    if !e.starts_with("migration stream") {
        return e;
    }
    let _ = conn.set_timeout(Some(Duration::from_millis(500)));
    // Skip whatever else the target sent (its HELLO was read already).
    for _ in 0..4 {
        match conn.recv(4096) {
            Ok(f) if f.tag == tag::ABORT => {
                return format!(
                    "the target refused the guest: {}",
                    String::from_utf8_lossy(&f.payload)
                )
            }
            Ok(_) => continue,
            Err(_) => break,
        }
    }
    e
}

fn or_into(a: &mut [u64], b: &[u64]) {
    for (x, y) in a.iter_mut().zip(b) {
        *x |= *y;
    }
}

fn stop_tracking(src: &Source) {
    let h = &src.handles;
    let _ = dirty::set_dirty_logging(&h.vm, &h.mem, false);
    HostDirty::set_active(&h.host_dirty, false);
}

fn release_locks(fds: &[std::os::fd::RawFd]) {
    for &fd in fds {
        // SAFETY: flock on a descriptor the devices keep open.
        unsafe { libc::flock(fd, libc::LOCK_UN) };
    }
}

/// Take the devices' locks back (the target may hold them for a moment
/// as it discards: retried for a few seconds).
fn take_locks(fds: &[std::os::fd::RawFd]) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    for &fd in fds {
        loop {
            // SAFETY: flock on a descriptor the devices keep open.
            if unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                break;
            }
            if Instant::now() >= deadline {
                return Err("another process holds the disk locks now".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(())
}
