//! Requests to a running VM from another thread (the control socket's,
//! [`crate::control`]): pause, resume, snapshot.
//!
//! The vCPU thread owns the VM; a request is queued in the [`Inbox`] and
//! the vCPU is kicked out of `KVM_RUN` (or out of a POLL hypercall's wait:
//! the guest sees POLL return early with nothing ready, as Solo5's tender
//! returns it on `EINTR`) by [`signal::kick`]. At the top of its loop the
//! vCPU thread serves every queued request ([`Vm::serve_control`]) and
//! answers each on its own channel. While paused it waits for the next
//! request, or for SIGINT/SIGTERM, which stop a paused guest as a running
//! one.

use super::{signal, Vm, VmError};
use crate::snapshot;
use std::collections::VecDeque;
use std::fs::File;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// What a request asks.
#[derive(Debug)]
pub enum Op {
    /// Stop running guest code, with every device quiesced.
    Pause,
    /// Run again after a pause.
    Resume,
    /// Save the guest (pausing it first if it runs) to `state` and
    /// `memory` (empty files, open for writing); then resume it, or with
    /// `stop` end the run (tt-host exits 0).
    Snapshot {
        state: File,
        memory: File,
        stop: bool,
    },
    /// Is the guest running or paused?
    Status,
    /// With the guest paused: its state file's bytes (a snapshot without
    /// RAM), sent on the channel.
    Save(mpsc::Sender<Result<Vec<u8>, String>>),
    /// With the guest paused: suspend every device (their files handed
    /// over), or resume them (`false`) after a failed migration.
    Suspend(bool),
    /// A migration's switch in one step (one wake-up of the vCPU thread
    /// instead of three, in the downtime): pause if it runs, then [`Save`]
    /// and `Suspend(true)`. The state's bytes, or why not, on the channel.
    Switch(mpsc::Sender<Result<Vec<u8>, String>>),
    /// The guest went to another tt-host: end the run (exit 0) without
    /// touching the devices, which are the target's now; `entry_taken`:
    /// the target adopted the admission entry too (a local migration).
    HandOver { entry_taken: bool },
}

/// What a migration's sender needs besides the inbox, set up before the
/// sandbox: the VM's memory and fd, how it was launched, the descriptors
/// holding its disks' locks, and its admission entry.
pub struct Source {
    pub handles: super::Handles,
    pub launch: snapshot::Launch,
    pub lock_fds: Vec<std::os::fd::RawFd>,
    /// The admission entry's file and name ([`crate::admission::Admission::entry`]).
    pub admission: Option<(std::os::fd::RawFd, String)>,
    /// Device descriptors a local migration hands over (TAPs), by name.
    pub handover: Vec<(String, std::os::fd::RawFd)>,
}

/// The answer: a one-line report, or why the request failed.
pub type Reply = Result<String, String>;

struct Request {
    op: Op,
    reply: mpsc::Sender<Reply>,
}

/// Requests waiting for the vCPU thread.
pub struct Inbox {
    queue: Mutex<VecDeque<Request>>,
    /// Readable while the queue may hold requests: a paused vCPU waits
    /// on it.
    event: EventFd,
    source: Mutex<Option<Arc<Source>>>,
    /// The guest was handed over to another tt-host.
    handed_over: std::sync::atomic::AtomicBool,
    /// ... with its admission entry.
    entry_taken: std::sync::atomic::AtomicBool,
    /// The migration's client has its answer (the run may end).
    answered: (Mutex<bool>, std::sync::Condvar),
}

impl Inbox {
    pub fn new() -> std::io::Result<Arc<Inbox>> {
        Ok(Arc::new(Inbox {
            queue: Mutex::new(VecDeque::new()),
            event: EventFd::new(EFD_NONBLOCK)?,
            source: Mutex::new(None),
            handed_over: std::sync::atomic::AtomicBool::new(false),
            entry_taken: std::sync::atomic::AtomicBool::new(false),
            answered: (Mutex::new(false), std::sync::Condvar::new()),
        }))
    }

    /// Make migrations possible ([`Source`]).
    pub fn set_source(&self, s: Source) {
        *self.source.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(s));
    }

    pub fn source(&self) -> Option<Arc<Source>> {
        self.source
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The control thread has answered the request that handed the guest
    /// over.
    pub fn set_answered(&self) {
        *self.answered.0.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.answered.1.notify_all();
    }

    /// Wait (at most `t`) until [`set_answered`](Self::set_answered): the
    /// run ends only once `migrate-send` has heard that it went well.
    pub fn wait_answered(&self, t: std::time::Duration) {
        let g = self.answered.0.lock().unwrap_or_else(|e| e.into_inner());
        let _ = self.answered.1.wait_timeout_while(g, t, |done| !*done);
    }

    /// Did the target adopt the run's admission entry?
    pub fn entry_taken(&self) -> bool {
        self.entry_taken.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Was the guest handed over?
    pub fn handed_over(&self) -> bool {
        self.handed_over.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Queue `op` for the vCPU thread, kick it, and wait for its answer.
    /// If the VM stops before it answers: an error saying so.
    pub fn call(&self, op: Op) -> Reply {
        let (tx, rx) = mpsc::channel();
        self.queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(Request { op, reply: tx });
        let _ = self.event.write(1);
        signal::kick();
        rx.recv()
            .unwrap_or_else(|_| Err("the guest has stopped".into()))
    }

    fn pop(&self) -> Option<Request> {
        let _ = self.event.read();
        self.queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front()
    }

    /// Wait until a request is queued or a stopping signal came.
    fn wait(&self) {
        let mut fds = vec![libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&self.event),
            events: libc::POLLIN,
            revents: 0,
        }];
        if let Some(fd) = signal::wake_fd() {
            fds.push(libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            });
        }
        // SAFETY: `fds` is a valid array of `fds.len()` pollfds; no
        // timeout (null) and no signal mask change (null).
        unsafe {
            libc::ppoll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                std::ptr::null(),
                std::ptr::null(),
            )
        };
    }
}

/// The answer to a request that needs the guest paused, when it is not.
pub const NOT_PAUSED: &str = "the guest is not paused";

/// What the run loop does after serving the control requests.
pub enum Flow {
    Run,
    /// End the run with this status.
    Exit(i32),
}

impl Vm {
    /// Serve the control requests queued (and, while paused, wait for
    /// more until one resumes the guest).
    pub(super) fn serve_control(&mut self) -> Result<Flow, VmError> {
        let Some(inbox) = self.control.clone() else {
            return Ok(Flow::Run);
        };
        let mut paused = false;
        loop {
            if let Some(sig) = signal::received() {
                return Err(VmError::Signal(sig));
            }
            let Some(req) = inbox.pop() else {
                if !paused {
                    return Ok(Flow::Run);
                }
                inbox.wait();
                continue;
            };
            let (reply, flow) = match req.op {
                Op::Switch(out) => {
                    let r = (if paused { Ok(()) } else { self.pause() })
                        .inspect(|()| paused = true)
                        .and_then(|()| self.state_bytes())
                        .and_then(|state| {
                            self.suspend_devices(true)?;
                            Ok(state)
                        });
                    let failed = r.is_err();
                    let _ = out.send(r);
                    (
                        if failed {
                            Err("switch failed".into())
                        } else {
                            Ok(String::new())
                        },
                        None,
                    )
                }
                Op::Save(_) | Op::Suspend(_) | Op::HandOver { .. } if !paused => {
                    (Err(NOT_PAUSED.into()), None)
                }
                Op::Save(out) => {
                    let r = self.state_bytes();
                    let _ = out.send(r);
                    (Ok(String::new()), None)
                }
                Op::Suspend(on) => (self.suspend_devices(on).map(|()| String::new()), None),
                Op::HandOver { entry_taken } => {
                    self.handed_over = true;
                    inbox
                        .entry_taken
                        .store(entry_taken, std::sync::atomic::Ordering::SeqCst);
                    inbox
                        .handed_over
                        .store(true, std::sync::atomic::Ordering::SeqCst);
                    (Ok("handed over".into()), Some(Flow::Exit(0)))
                }
                Op::Status => (Ok(if paused { "paused" } else { "running" }.into()), None),
                Op::Pause if paused => (Ok("paused (already)".into()), None),
                Op::Pause => match self.pause() {
                    Ok(()) => {
                        paused = true;
                        (Ok("paused".into()), None)
                    }
                    Err(e) => (Err(e), None),
                },
                Op::Resume if !paused => (Ok("running (was not paused)".into()), None),
                Op::Resume => match self.unfreeze_tsc() {
                    Ok(()) => (Ok("resumed".into()), Some(Flow::Run)),
                    Err(e) => (Err(e.to_string()), None),
                },
                Op::Snapshot {
                    state,
                    memory,
                    stop,
                } => {
                    let r = (if paused { Ok(()) } else { self.pause() })
                        .and_then(|()| self.snapshot(&state, &memory));
                    match r {
                        Ok(n) if stop => (
                            Ok(format!("snapshot written ({n}); the guest is stopped")),
                            Some(Flow::Exit(0)),
                        ),
                        Ok(n) if paused => (Ok(format!("snapshot written ({n})")), None),
                        Ok(n) => match self.unfreeze_tsc() {
                            Ok(()) => (
                                Ok(format!("snapshot written ({n}); the guest runs on")),
                                Some(Flow::Run),
                            ),
                            Err(e) => (Err(e.to_string()), None),
                        },
                        Err(e) if paused => (Err(e), None),
                        Err(e) => match self.unfreeze_tsc() {
                            Ok(()) => (Err(e), Some(Flow::Run)),
                            Err(e2) => (Err(format!("{e}; {e2}")), None),
                        },
                    }
                }
            };
            let _ = req.reply.send(reply);
            if let Some(flow) = flow {
                return Ok(flow);
            }
        }
    }

    /// Suspend every device (`on`), or resume them.
    fn suspend_devices(&mut self, on: bool) -> Result<(), String> {
        for m in &mut self.modules {
            if on {
                m.suspend()?;
            } else {
                m.resume()?;
            }
        }
        self.each_mmio(|_, d| if on { d.suspend() } else { d.resume() })
    }

    /// Stop between instructions with every device quiesced. The guest's
    /// TSC is frozen: read now, and written back on resume, so that the
    /// guest's clock does not count the pause (its timers do not all fire
    /// at once when it runs again).
    fn pause(&mut self) -> Result<(), String> {
        self.complete_exit().map_err(|e| e.to_string())?;
        self.freeze_tsc().map_err(|e| e.to_string())?;
        for m in &mut self.modules {
            m.quiesce()?;
        }
        self.each_mmio(|_, d| d.quiesce())
    }

    /// Write the paused guest's state and memory; a summary.
    fn snapshot(&mut self, state: &File, memory: &File) -> Result<String, String> {
        use std::os::unix::fs::FileExt;
        let s = self.state()?;
        let io = |what: &str, e: std::io::Error| format!("cannot write the {what} file: {e}");
        self.write_memory(memory).map_err(|e| io("memory", e))?;
        let bytes = snapshot::encode(&s);
        state.set_len(0).map_err(|e| io("state", e))?;
        state.write_all_at(&bytes, 0).map_err(|e| io("state", e))?;
        state.sync_data().map_err(|e| io("state", e))?;
        Ok(format!(
            "{} MiB of memory, {} bytes of state",
            s.mem_size >> 20,
            bytes.len()
        ))
    }

    fn state_bytes(&mut self) -> Result<Vec<u8>, String> {
        Ok(snapshot::encode(&self.state()?))
    }

    /// The paused guest's state but RAM.
    fn state(&mut self) -> Result<snapshot::Snapshot, String> {
        let Some(launch) = self.launch.clone() else {
            return Err("this VM was not started by a launch that can be restored".into());
        };
        let mut disks = self.disks()?;
        for d in &mut disks {
            d.path = launch
                .devices
                .iter()
                .find(|(o, dev, _)| o == "block" && dev.as_deref() == Some(&d.device))
                .map(|(_, _, v)| v.clone())
                .unwrap_or_default();
        }
        Ok(snapshot::Snapshot {
            launch,
            mem_size: self.mem_size(),
            vcpu: self.save_vcpu().map_err(|e| e.to_string())?,
            monitor: self.save_monitor(),
            disks,
            mmio: self.save_mmio()?,
            nets: self.modules.iter().flat_map(|m| m.net_macs()).collect(),
        })
    }
}
