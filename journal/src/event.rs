//! A futex word that many threads sleep on until it changes.
//!
//! A commit wakes every pusher of its batch at once. With a condition
//! variable each woken pusher must take the state mutex again before it
//! can return, so 64 pushers file through that mutex one after another,
//! each with a context switch. Here a pusher sleeps on the word alone and
//! returns on its own: the committer publishes the new durable position
//! in an atomic, bumps the word and wakes all sleepers with one
//! `FUTEX_WAKE`.

use std::sync::atomic::{AtomicU32, Ordering};

/// A generation counter to wait on.
#[derive(Default)]
pub(crate) struct Event(AtomicU32);

impl Event {
    /// The current generation: read it, check the condition, then
    /// [`wait`](Self::wait) with it, so that a change in between is not
    /// missed.
    pub(crate) fn generation(&self) -> u32 {
        self.0.load(Ordering::Acquire)
    }

    /// Sleep until the generation differs from `seen` (or a spurious
    /// wake-up). Returns at once if it already differs.
    pub(crate) fn wait(&self, seen: u32) {
        // SAFETY: FUTEX_WAIT reads the u32 at the given address, which is
        // a live AtomicU32 borrowed for the whole call; a null timeout
        // means no timeout. The kernel compares it with `seen` atomically
        // before sleeping, so a `notify` after our check is not lost.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                self.0.as_ptr(),
                libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
                seen,
                std::ptr::null::<libc::timespec>(),
            );
        }
    }

    /// Start a new generation and wake every sleeper. Whatever the caller
    /// stored before this is visible to a thread that then sees the new
    /// generation.
    pub(crate) fn notify(&self) {
        self.0.fetch_add(1, Ordering::Release);
        // SAFETY: FUTEX_WAKE only uses the address as a key; it is a live
        // AtomicU32. i32::MAX wakes every waiter.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                self.0.as_ptr(),
                libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
                i32::MAX,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    #[test]
    fn wait_returns_at_once_when_the_generation_moved() {
        let e = Event::default();
        let seen = e.generation();
        e.notify();
        e.wait(seen); // would hang if it compared against the new value
        assert_eq!(e.generation(), seen.wrapping_add(1));
    }

    #[test]
    fn notify_wakes_every_sleeper() {
        let e = Arc::new(Event::default());
        let go = Arc::new(AtomicBool::new(false));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (e, go) = (e.clone(), go.clone());
                std::thread::spawn(move || loop {
                    let seen = e.generation();
                    if go.load(Ordering::Acquire) {
                        return;
                    }
                    e.wait(seen);
                })
            })
            .collect();
        std::thread::sleep(std::time::Duration::from_millis(20));
        go.store(true, Ordering::Release);
        e.notify();
        for t in threads {
            t.join().unwrap();
        }
    }
}
