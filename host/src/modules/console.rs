//! Console and time: WALLTIME, PUTS and HALT.
//!
//! Guest console output must never stall the guest: a stdout that nobody
//! reads (a full pipe) would block PUTS in `write` forever, and with it
//! the vCPU thread, which is the one that takes SIGTERM. So for `tt-host
//! run` ([`Console::stdout`]) PUTS copies the bytes into a buffer of
//! [`CONSOLE_BUFFER`] bytes, which a writer thread of its own drains into
//! stdout, and waits until they are written, as solo5-hvt's PUTS does (so
//! the output of a guest killed right after is out), but for at most
//! [`PUTS_WAIT`]: then stdout is stalled, and PUTS returns at once until
//! the writer has caught up. When the buffer is full, what does not fit
//! is dropped and counted. When the guest stops, tt-host waits for the buffer to drain
//! while stdout takes something at least every [`EXIT_STALL`] (and for at
//! most [`SIGNAL_WAIT`] after SIGINT or SIGTERM), then reports on stderr
//! how many bytes were dropped or never written ([`Module::notice`]).

use super::{
    check_range, read_args, read_args_mut, set_out, Action, GuestError, GuestMem, Module, CHUNK,
};
use crate::abi::{HcHalt, HcPuts, HcWalltime, Hypercall, HALT_COOKIE_MAX};
use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Bytes of guest console output tt-host holds for a stdout that does not
/// keep up (1 MiB); beyond that, output is dropped.
pub const CONSOLE_BUFFER: usize = 1 << 20;
/// When the guest has stopped, tt-host stops waiting for buffered output
/// to reach stdout once stdout has taken nothing for this long.
pub const EXIT_STALL: Duration = Duration::from_secs(1);
/// After SIGINT or SIGTERM, tt-host waits at most this long for buffered
/// output, so that it always stops within a second.
pub const SIGNAL_WAIT: Duration = Duration::from_millis(200);
/// The writer hands stdout at most this much at a time (a pipe's default
/// size), so that a slow reader is seen to make progress.
const PIECE: usize = 64 << 10;
/// PUTS returns once its bytes are written, as with solo5-hvt (so what
/// the guest printed before a crash or a SIGKILL is out), but waits at
/// most this long: then stdout counts as stalled, and PUTS stops waiting
/// until the writer has caught up.
pub const PUTS_WAIT: Duration = Duration::from_millis(100);

/// Serves WALLTIME, PUTS and HALT; writes guest console output to a host
/// writer (stdout for `tt-host run`).
pub struct Console {
    out: Out,
}

enum Out {
    /// Written in the hypercall itself (a writer that never blocks).
    Direct(Box<dyn Write + Send>),
    /// Queued for a writer thread.
    Queued(Queue),
}

impl Console {
    /// Output written to `out` during PUTS itself: for writers that never
    /// block (tests, fuzzing, a sink).
    pub fn new(out: impl Write + Send + 'static) -> Self {
        Console {
            out: Out::Direct(Box::new(out)),
        }
    }

    /// Output to tt-host's stdout, buffered ([`CONSOLE_BUFFER`] bytes) and
    /// written by a thread of its own, so that PUTS never waits for it.
    pub fn stdout() -> Self {
        Console::queued(std::io::stdout(), CONSOLE_BUFFER)
    }

    /// Output to `out`, buffered up to `capacity` bytes and written by a
    /// thread of its own (which never takes SIGINT or SIGTERM). If the
    /// thread cannot be started, output is written during PUTS instead.
    pub fn queued(out: impl Write + Send + 'static, capacity: usize) -> Self {
        let out = match Queue::start(out, capacity) {
            Ok(q) => Out::Queued(q),
            Err(out) => Out::Direct(out),
        };
        Console { out }
    }
}

/// What the console's buffer holds, shared with its writer thread.
#[derive(Default)]
struct State {
    /// Bytes waiting for the writer.
    pending: Vec<u8>,
    /// Bytes the writer took and has not written yet.
    in_flight: usize,
    /// Bytes written so far.
    written: u64,
    /// Bytes dropped because the buffer was full.
    dropped: u64,
    /// Bytes lost because stdout failed, and its first error.
    failed: u64,
    error: Option<String>,
    /// No more output: the writer exits once the buffer is empty.
    closing: bool,
    /// Bytes queued so far (written, failed or waiting).
    accepted: u64,
    /// A PUTS gave up waiting for stdout; cleared once all is written.
    stalled: bool,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled on new output, on closing, and on each write.
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The lock is never held across a panic that matters: a poisoned
        // state is still consistent counters and bytes.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A bounded buffer and the thread that writes it out.
struct Queue {
    shared: Arc<Shared>,
    capacity: usize,
    thread: Option<std::thread::JoinHandle<()>>,
    /// What to tell the user at the end, once known.
    notice: Option<String>,
}

type BoxedOut = Box<dyn Write + Send>;

impl Queue {
    fn start(out: impl Write + Send + 'static, capacity: usize) -> Result<Queue, BoxedOut> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        });
        // SIGINT and SIGTERM must reach the vCPU thread, never this one
        // (the thread inherits the mask).
        let Ok(blocked) = crate::vmm::signal::Blocked::new() else {
            return Err(Box::new(out));
        };
        // The writer is handed over only if the thread starts.
        let slot = Arc::new(Mutex::new(Some(Box::new(out) as BoxedOut)));
        let (s, w) = (shared.clone(), slot.clone());
        let thread = std::thread::Builder::new()
            .name("tt-console".into())
            .spawn(move || {
                let out = w.lock().ok().and_then(|mut o| o.take());
                if let Some(out) = out {
                    drain(&s, out);
                }
            });
        drop(blocked);
        match thread {
            Ok(t) => Ok(Queue {
                shared,
                capacity,
                thread: Some(t),
                notice: None,
            }),
            Err(_) => {
                let out = slot.lock().ok().and_then(|mut o| o.take());
                Err(out.unwrap_or_else(|| Box::new(std::io::sink())))
            }
        }
    }

    /// Queue the `len` bytes at guest address `data` (checked to be guest
    /// memory): as many as fit, the rest dropped.
    fn push(&self, mem: &GuestMemoryMmap, data: u64, len: u64) {
        let mut st = self.shared.lock();
        let room = self.capacity - (st.pending.len() + st.in_flight).min(self.capacity);
        let take = (len as usize).min(room);
        if take > 0 {
            let start = st.pending.len();
            st.pending.resize(start + take, 0);
            // In range: checked by the caller.
            let _ = mem.read_slice(&mut st.pending[start..], GuestAddress(data));
            st.accepted += take as u64;
            self.shared.changed.notify_all();
        }
        st.dropped += len - take as u64;
        // Wait for the bytes to be written, unless stdout is stalled.
        let target = st.accepted;
        let deadline = Instant::now() + PUTS_WAIT;
        while !st.stalled && st.written + st.failed < target {
            if crate::vmm::signal::received().is_some() {
                return;
            }
            let now = Instant::now();
            if now >= deadline {
                st.stalled = true;
                return;
            }
            // Short slices, to see a signal promptly.
            let slice = (deadline - now).min(Duration::from_millis(20));
            st = match self.shared.changed.wait_timeout(st, slice) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
    }

    /// Let the writer finish: wait while stdout takes the buffered output
    /// (see the module doc for how long), then note what was lost.
    fn close(&mut self) {
        let mut st = self.shared.lock();
        st.closing = true;
        self.shared.changed.notify_all();
        let start = Instant::now();
        let mut progress = (st.written + st.failed, start);
        loop {
            if st.pending.is_empty() && st.in_flight == 0 {
                break;
            }
            let now = Instant::now();
            if crate::vmm::signal::received().is_some() && now >= start + SIGNAL_WAIT {
                break;
            }
            let done = st.written + st.failed;
            if done != progress.0 {
                progress = (done, now);
            } else if now >= progress.1 + EXIT_STALL {
                break;
            }
            // Wake up often enough to see a signal.
            let wait = Duration::from_millis(50);
            st = match self.shared.changed.wait_timeout(st, wait) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
        let unwritten = (st.pending.len() + st.in_flight) as u64;
        let mut lost = Vec::new();
        if st.dropped > 0 {
            lost.push(format!(
                "{} bytes were dropped because stdout did not keep up and the {} KiB \
                 console buffer was full",
                st.dropped,
                self.capacity >> 10
            ));
        }
        if st.failed > 0 {
            lost.push(format!(
                "{} bytes could not be written ({})",
                st.failed,
                st.error.as_deref().unwrap_or("error")
            ));
        }
        if unwritten > 0 {
            lost.push(format!(
                "{unwritten} bytes were still buffered when tt-host exited (stdout took \
                 nothing more)"
            ));
        }
        if !lost.is_empty() {
            self.notice = Some(format!(
                "console: guest output was lost: {}",
                lost.join("; ")
            ));
        }
        let drained = unwritten == 0;
        drop(st);
        if drained {
            // Done: the writer exits at once.
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
        // Otherwise the writer is stuck in `write`: leave it; the process
        // exits without it.
    }
}

/// The writer thread: hand `out` whatever is queued until closed.
fn drain(shared: &Shared, mut out: BoxedOut) {
    let mut buf = Vec::new();
    loop {
        {
            let mut st = shared.lock();
            while st.pending.is_empty() && !st.closing {
                st = match shared.changed.wait(st) {
                    Ok(g) => g,
                    Err(e) => e.into_inner(),
                };
            }
            if st.pending.is_empty() {
                return;
            }
            std::mem::swap(&mut buf, &mut st.pending);
            st.in_flight = buf.len();
        }
        for piece in buf.chunks(PIECE) {
            let r = out.write_all(piece).and_then(|()| out.flush());
            let mut st = shared.lock();
            st.in_flight -= piece.len();
            match r {
                Ok(()) => st.written += piece.len() as u64,
                Err(e) => {
                    st.failed += piece.len() as u64;
                    st.error.get_or_insert_with(|| e.to_string());
                }
            }
            if st.pending.is_empty() && st.in_flight == 0 {
                // Caught up: PUTS waits for its output again.
                st.stalled = false;
            }
            shared.changed.notify_all();
        }
        buf.clear();
    }
}

impl Module for Console {
    fn name(&self) -> &'static str {
        "console"
    }

    fn hypercalls(&self) -> &'static [Hypercall] {
        &[Hypercall::Walltime, Hypercall::Puts, Hypercall::Halt]
    }

    fn handle(&mut self, call: Hypercall, arg: u64, mem: &GuestMem) -> Result<Action, GuestError> {
        match call {
            Hypercall::Walltime => {
                let (_, at) = read_args_mut::<HcWalltime>(mem, arg)?;
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(0);
                set_out!(mem, at, HcWalltime.nsecs = now);
                Ok(Action::Continue)
            }
            Hypercall::Puts => {
                let HcPuts { data, len } = read_args::<HcPuts>(mem, arg)?;
                check_range(mem, "console output", data, len)?;
                match &mut self.out {
                    Out::Queued(q) => q.push(mem, data, len),
                    Out::Direct(out) => {
                        let mut buf = vec![0u8; (len as usize).min(CHUNK)];
                        let mut done = 0u64;
                        while done < len {
                            let n = ((len - done) as usize).min(CHUNK);
                            // In range: checked above.
                            let _ = mem.read_slice(&mut buf[..n], GuestAddress(data + done));
                            // A closed stdout must not stop the guest.
                            let _ = out.write_all(&buf[..n]);
                            done += n as u64;
                        }
                        let _ = out.flush();
                    }
                }
                Ok(Action::Continue)
            }
            Hypercall::Halt => {
                let a = read_args::<HcHalt>(mem, arg)?;
                // A cookie (for a core dump's notes; tt-host writes none
                // yet) must point at guest memory, as solo5-hvt checks.
                if a.cookie != 0 {
                    check_range(mem, "halt cookie", a.cookie, HALT_COOKIE_MAX)?;
                }
                Ok(Action::Exit(a.exit_status))
            }
            _ => unreachable!("console registered only its own hypercalls"),
        }
    }

    fn shutdown(&mut self) -> Result<(), String> {
        // Console output is best effort, as in solo5-hvt: a closed or
        // stalled stdout does not fail the run (lost output is a notice).
        match &mut self.out {
            Out::Direct(out) => {
                let _ = out.flush();
            }
            Out::Queued(q) => q.close(),
        }
        Ok(())
    }

    fn notice(&mut self) -> Option<String> {
        match &mut self.out {
            Out::Queued(q) => q.notice.take(),
            Out::Direct(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::ByteValued;

    const MEM: u64 = 2 << 20;
    const ARG: u64 = 0x1000;

    /// Guest memory with the argument struct `arg` at ARG.
    fn mem_with_arg<T: ByteValued>(arg: T) -> GuestMem {
        let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
        m.write_obj(arg, GuestAddress(ARG)).unwrap();
        GuestMem::unprotected(m)
    }

    /// A writer whose bytes the test can see.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn call<T: ByteValued>(c: Hypercall, arg: T) -> Result<Action, GuestError> {
        Console::new(Vec::new()).handle(c, ARG, &mem_with_arg(arg))
    }

    fn puts(data: u64, len: u64) -> Result<Action, GuestError> {
        call(Hypercall::Puts, HcPuts { data, len })
    }

    fn halt(cookie: u64, exit_status: i32) -> Result<Action, GuestError> {
        let a = HcHalt {
            cookie,
            exit_status,
            _pad: 0,
        };
        call(Hypercall::Halt, a)
    }

    #[test]
    fn an_empty_puts_at_an_address_outside_memory_stops_the_guest() {
        for data in [MEM, u64::MAX] {
            let r = puts(data, 0);
            assert!(matches!(r, Err(GuestError::BadAddress { .. })), "{r:?}");
        }
        assert_eq!(puts(0x2000, 0), Ok(Action::Continue));
    }

    #[test]
    fn puts_writes_the_guest_bytes_to_the_console() {
        let mem = mem_with_arg(HcPuts {
            data: 0x2000,
            len: 5,
        });
        mem.write_slice(b"hello, world", GuestAddress(0x2000))
            .unwrap();
        let out = Shared::default();
        let mut c = Console::new(out.clone());
        assert_eq!(c.handle(Hypercall::Puts, ARG, &mem), Ok(Action::Continue));
        assert_eq!(*out.0.lock().unwrap(), b"hello");
    }

    #[test]
    fn a_halt_cookie_must_point_at_guest_memory() {
        for cookie in [MEM - 8, MEM, u64::MAX] {
            let r = halt(cookie, 3);
            assert!(matches!(r, Err(GuestError::BadAddress { .. })), "{r:?}");
        }
        assert_eq!(halt(0, 3), Ok(Action::Exit(3)));
        assert_eq!(halt(MEM - 512, 3), Ok(Action::Exit(3)));
        assert_eq!(halt(0, -1), Ok(Action::Exit(-1)));
    }

    #[test]
    fn walltime_writes_only_nsecs() {
        let mem = mem_with_arg(HcWalltime { nsecs: 0 });
        mem.write_obj(u64::MAX, GuestAddress(ARG + 8)).unwrap();
        let before = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        let r = Console::new(Vec::new()).handle(Hypercall::Walltime, ARG, &mem);
        assert_eq!(r, Ok(Action::Continue));
        let nsecs = mem.read_obj::<HcWalltime>(GuestAddress(ARG)).unwrap().nsecs;
        assert!(nsecs >= before, "{nsecs} < {before}");
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(ARG + 8)).unwrap(),
            u64::MAX
        );
    }

    #[test]
    fn an_argument_struct_past_the_end_of_memory_stops_the_guest() {
        let mem = mem_with_arg(HcHalt::default());
        for call in [Hypercall::Walltime, Hypercall::Puts, Hypercall::Halt] {
            let r = Console::new(Vec::new()).handle(call, MEM - 4, &mem);
            assert!(
                matches!(r, Err(GuestError::BadAddress { .. })),
                "{call:?}: {r:?}"
            );
        }
    }

    #[test]
    fn walltime_into_protected_memory_is_refused_and_writes_nothing() {
        let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
        m.write_obj(7u64, GuestAddress(ARG)).unwrap();
        let code = crate::loader::Protected {
            start: ARG,
            end: ARG + 0x1000,
            what: "the image's code",
        };
        let mem = GuestMem::new(m, vec![code]);
        let r = Console::new(Vec::new()).handle(Hypercall::Walltime, ARG, &mem);
        assert!(matches!(r, Err(GuestError::ReadOnly { .. })), "{r:?}");
        assert_eq!(mem.read_obj::<u64>(GuestAddress(ARG)).unwrap(), 7);
        // PUTS and HALT only read their structs: allowed there.
        mem.write_obj(HcPuts { data: ARG, len: 8 }, GuestAddress(ARG))
            .unwrap();
        let r = Console::new(Vec::new()).handle(Hypercall::Puts, ARG, &mem);
        assert_eq!(r, Ok(Action::Continue));
    }

    /// PUTS `text` through `c` (its struct at ARG, the bytes after it).
    fn put(c: &mut Console, mem: &GuestMem, text: &[u8]) {
        let data = ARG + 0x100;
        mem.write_slice(text, GuestAddress(data)).unwrap();
        let a = HcPuts {
            data,
            len: text.len() as u64,
        };
        mem.write_obj(a, GuestAddress(ARG)).unwrap();
        assert_eq!(c.handle(Hypercall::Puts, ARG, mem), Ok(Action::Continue));
    }

    #[test]
    fn queued_output_is_all_written_in_order_by_shutdown() {
        let out = Shared::default();
        let mut c = Console::queued(out.clone(), 1 << 20);
        let mem = mem_with_arg(HcPuts::default());
        let mut want = Vec::new();
        for i in 0..200 {
            let line = format!("line {i}\n");
            put(&mut c, &mem, line.as_bytes());
            want.extend_from_slice(line.as_bytes());
        }
        c.shutdown().unwrap();
        assert_eq!(*out.0.lock().unwrap(), want);
        assert_eq!(c.notice(), None);
    }

    /// While stdout keeps up, PUTS returns only once its bytes are
    /// written, as solo5-hvt's does: a guest killed right after a PUTS
    /// (the crash tests SIGKILL tt-host after reading the guest's
    /// acknowledgements) has had its output written.
    #[test]
    fn while_stdout_keeps_up_puts_returns_with_its_bytes_written() {
        let out = Shared::default();
        let mut c = Console::queued(out.clone(), 1 << 20);
        let mem = mem_with_arg(HcPuts::default());
        let mut want = Vec::new();
        for i in 0..50 {
            let line = format!("ack {i}\n");
            put(&mut c, &mem, line.as_bytes());
            want.extend_from_slice(line.as_bytes());
            assert_eq!(*out.0.lock().unwrap(), want, "after PUTS {i}");
        }
        c.shutdown().unwrap();
    }

    /// A stdout nobody reads: every write blocks until the test ends.
    struct Stalled(std::sync::mpsc::Receiver<()>);

    impl Write for Stalled {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            let _ = self.0.recv();
            Err(std::io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_stdout_never_blocks_puts_and_what_is_lost_is_reported() {
        let (unstall, rx) = std::sync::mpsc::channel::<()>();
        let mut c = Console::queued(Stalled(rx), 4096);
        let mem = mem_with_arg(HcPuts::default());
        let t = Instant::now();
        // 64 KiB into a 4 KiB buffer whose writer never returns.
        for _ in 0..64 {
            put(&mut c, &mem, &[b'x'; 1024]);
        }
        assert!(t.elapsed() < Duration::from_secs(1), "PUTS waited");
        let t = Instant::now();
        c.shutdown().unwrap();
        let waited = t.elapsed();
        assert!(
            waited >= EXIT_STALL && waited < EXIT_STALL + Duration::from_secs(1),
            "{waited:?}"
        );
        let notice = c.notice().expect("lost output is reported");
        // 4096 bytes were held (taken by the writer or waiting), the
        // other 60 KiB dropped.
        assert!(notice.contains("61440 bytes were dropped"), "{notice}");
        assert!(
            notice.contains("4096 bytes were still buffered"),
            "{notice}"
        );
        drop(unstall);
    }
}
