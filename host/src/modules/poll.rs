//! POLL: wait until a device has something for the guest, or a timeout.
//!
//! POLL belongs to no one device kind: every device whose guest may wait
//! for it (a TAP with a frame to read, a virtio queue with completions the
//! guest has not seen) gives a [`Readiness`] when it is attached, and the
//! POLL hypercall waits on all of them at once. Its `ready_set` has bit
//! `handle` set for each ready device (handles of 64 and above cannot be
//! reported, as in solo5-hvt), and `ret` is their number (0 on timeout).
//!
//! A device is ready when its [`Readiness::ready`] says so: before POLL
//! waits (something may be pending already) and after its descriptor woke
//! the wait. A descriptor that wakes POLL for a device that then turns out
//! not to be ready (a stale notification) does not end the POLL: it waits
//! on until the timeout.

use super::{read_args_mut, set_out, Action, GuestError, GuestMem, Module};
use crate::abi::{HcPoll, Hypercall};
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

/// Something the POLL hypercall waits on.
pub trait Readiness: Send {
    /// The device's handle (its manifest index): its bit in `ready_set`.
    fn handle(&self) -> u64;
    /// A descriptor that polls readable (`POLLIN`), or failed
    /// (`POLLERR`, `POLLHUP`), when the device may have become ready. It
    /// must stay open as long as the readiness lives.
    fn fd(&self) -> RawFd;
    /// Is the device ready for the guest? `woken` says that its
    /// descriptor polled readable or failed since the last call. The
    /// default: exactly when woken (a TAP: a frame is waiting, or the TAP
    /// failed and a read will say so).
    fn ready(&mut self, woken: bool) -> bool {
        woken
    }
}

/// The POLL hypercall over every device's [`Readiness`].
pub struct Poll {
    sources: Vec<Box<dyn Readiness>>,
}

impl Poll {
    pub fn new(sources: Vec<Box<dyn Readiness>>) -> Self {
        Poll { sources }
    }

    /// Wait up to `timeout` for a source to be ready; the set of ready
    /// handles. Returns early, with what is ready, when a stopping signal
    /// arrives (the run loop then stops the guest).
    pub fn wait(&mut self, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        // Ready before any wait (work the device finished earlier)?
        let mut ready = self.collect(&[]);
        let mut fds: Vec<libc::pollfd> = self
            .sources
            .iter()
            .map(|s| libc::pollfd {
                fd: s.fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // After the sources (`collect` reads only theirs): readable once a
        // stopping signal came, even one that lands before `ppoll` starts.
        if let Some(fd) = crate::vmm::signal::wake_fd() {
            fds.push(libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            });
        }
        loop {
            if crate::vmm::signal::interrupted() {
                return ready;
            }
            // With something ready already, only look (timeout 0).
            let left = if ready != 0 {
                Duration::ZERO
            } else {
                deadline.saturating_duration_since(Instant::now())
            };
            let ts = libc::timespec {
                tv_sec: left.as_secs().min(i64::MAX as u64) as libc::time_t,
                tv_nsec: left.subsec_nanos() as libc::c_long,
            };
            for p in &mut fds {
                p.revents = 0;
            }
            // SAFETY: fds is a valid array of fds.len() pollfds; ts is valid.
            let n = unsafe {
                libc::ppoll(
                    fds.as_mut_ptr(),
                    fds.len() as libc::nfds_t,
                    &ts,
                    std::ptr::null(),
                )
            };
            let interrupted =
                n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted;
            if crate::vmm::signal::interrupted() {
                return ready;
            }
            if n > 0 {
                ready |= self.collect(&fds);
            }
            if ready != 0 || (!interrupted && Instant::now() >= deadline) || left.is_zero() {
                return ready;
            }
        }
    }

    /// Ask every source whether it is ready, `fds` saying which woke (none
    /// before the first wait).
    fn collect(&mut self, fds: &[libc::pollfd]) -> u64 {
        // A failed TAP (its interface deleted, for one) polls as POLLERR
        // forever, never POLLIN: it counts as woken, as solo5-hvt's epoll
        // reports it, so that the guest's read returns the error instead
        // of the guest polling in a loop, each poll returning at once.
        let woke = libc::POLLIN | libc::POLLERR | libc::POLLHUP | libc::POLLNVAL;
        let mut ready = 0u64;
        for (i, s) in self.sources.iter_mut().enumerate() {
            let woken = fds.get(i).is_some_and(|p| p.revents & woke != 0);
            if s.ready(woken) && s.handle() < 64 {
                ready |= 1 << s.handle();
            }
        }
        ready
    }
}

impl Module for Poll {
    fn name(&self) -> &'static str {
        "poll"
    }

    fn hypercalls(&self) -> &'static [Hypercall] {
        &[Hypercall::Poll]
    }

    fn handle(&mut self, _call: Hypercall, arg: u64, mem: &GuestMem) -> Result<Action, GuestError> {
        let (a, at) = read_args_mut::<HcPoll>(mem, arg)?;
        let ready = self.wait(Duration::from_nanos(a.timeout_nsecs));
        set_out!(mem, at, HcPoll.ready_set = ready);
        // As solo5-hvt: `ret` is the number of ready devices (0 on timeout).
        set_out!(mem, at, HcPoll.ret = ready.count_ones() as i32);
        Ok(Action::Continue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    /// A source on an eventfd that is ready only while `pending` says so
    /// (a virtio queue: a stale kick is not readiness).
    struct Queue {
        handle: u64,
        event: EventFd,
        pending: std::sync::Arc<std::sync::atomic::AtomicBool>,
    }

    impl Readiness for Queue {
        fn handle(&self) -> u64 {
            self.handle
        }
        fn fd(&self) -> RawFd {
            self.event.as_raw_fd()
        }
        fn ready(&mut self, woken: bool) -> bool {
            if woken {
                let _ = self.event.read();
            }
            self.pending.load(std::sync::atomic::Ordering::SeqCst)
        }
    }

    fn queue(
        handle: u64,
    ) -> (
        Queue,
        EventFd,
        std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) {
        let event = EventFd::new(EFD_NONBLOCK).unwrap();
        let kick = event.try_clone().unwrap();
        let pending = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let q = Queue {
            handle,
            event,
            pending: pending.clone(),
        };
        (q, kick, pending)
    }

    #[test]
    fn work_pending_before_the_wait_is_reported_at_once() {
        let (q, _kick, pending) = queue(3);
        pending.store(true, std::sync::atomic::Ordering::SeqCst);
        let mut p = Poll::new(vec![Box::new(q)]);
        let t = Instant::now();
        assert_eq!(p.wait(Duration::from_secs(10)), 1 << 3);
        assert!(t.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn a_stale_wakeup_does_not_end_the_wait_and_a_real_one_does() {
        let (q, kick, pending) = queue(2);
        let (other, _k, _p) = queue(5);
        let mut p = Poll::new(vec![Box::new(q), Box::new(other)]);
        // Stale: the fd fires, nothing is pending: POLL waits on.
        kick.write(1).unwrap();
        let t = Instant::now();
        assert_eq!(p.wait(Duration::from_millis(100)), 0);
        assert!(t.elapsed() >= Duration::from_millis(100));
        // Real: work arrives while POLL waits.
        let waker = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            pending.store(true, std::sync::atomic::Ordering::SeqCst);
            kick.write(1).unwrap();
        });
        let t = Instant::now();
        assert_eq!(p.wait(Duration::from_secs(10)), 1 << 2);
        assert!(t.elapsed() < Duration::from_secs(5));
        waker.join().unwrap();
    }

    #[test]
    fn with_nothing_to_wait_on_poll_sleeps_its_timeout() {
        let mut p = Poll::new(vec![]);
        let t = Instant::now();
        assert_eq!(p.wait(Duration::from_millis(30)), 0);
        assert!(t.elapsed() >= Duration::from_millis(30));
    }
}
