//! Run a program as a whole process and measure it: wall time from
//! `spawn` to the return of `wait4`, exit status, peak RSS, output.
//!
//! The child's stdout and stderr go to memory-backed files, not pipes, so
//! the parent does nothing while the child runs and a chatty child can
//! never block on a full pipe.
//!
//! A caveat on `ru_maxrss`: `exec` carries over the high-water RSS of the
//! address space it replaces, and std spawns with `vfork` semantics, so a
//! child's `ru_maxrss` is at least this process's own RSS. [`run_hwm`]
//! therefore also reads the child's `VmHWM` at its exit, stopping it there
//! with ptrace, which counts only the exec'd program.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::FromRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How one run of a child went.
pub struct ChildRun {
    /// From just before `spawn` to just after `wait4` returned.
    pub wall: Duration,
    /// Exit code, or `None` if a signal killed the child.
    pub code: Option<i32>,
    /// The child's peak resident set size (`ru_maxrss`), KiB.
    pub maxrss_kib: u64,
    /// `VmHWM` of the exec'd program just before it exited, KiB (only
    /// from [`run_hwm`]).
    pub hwm_kib: Option<u64>,
    /// The child's CPU time, user + system (`wait4`'s rusage).
    pub cpu: Duration,
    pub stdout: String,
    pub stderr: String,
}

impl ChildRun {
    /// Fail unless the child exited with `expect`, quoting what it said.
    pub fn check_status(&self, what: &str, expect: i32) -> Result<(), String> {
        if self.code == Some(expect) {
            return Ok(());
        }
        let how = match self.code {
            Some(c) => format!("exited with status {c}"),
            None => "was killed by a signal".to_string(),
        };
        Err(format!(
            "{what} {how}, expected status {expect}\n  stdout: {}\n  stderr: {}",
            self.stdout.trim(),
            self.stderr.trim()
        ))
    }
}

fn memfd(name: &std::ffi::CStr) -> Result<File, String> {
    // SAFETY: `name` is a valid NUL-terminated string; the result is checked.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(format!(
            "memfd_create failed: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

fn read_back(mut f: File) -> String {
    let mut s = Vec::new();
    let _ = f.seek(SeekFrom::Start(0));
    let _ = f.read_to_end(&mut s);
    String::from_utf8_lossy(&s).into_owned()
}

fn tv(t: libc::timeval) -> Duration {
    Duration::from_secs(t.tv_sec.max(0) as u64) + Duration::from_micros(t.tv_usec.max(0) as u64)
}

/// Run `cmd` to completion and measure it.
pub fn run(cmd: &mut Command) -> Result<ChildRun, String> {
    run_inner(cmd, false)
}

/// As [`run`], and also read the child's `VmHWM` as it exits. The child
/// runs under ptrace (and is forked, not vforked), so do not time it.
pub fn run_hwm(cmd: &mut Command) -> Result<ChildRun, String> {
    // SAFETY: the closure runs in the forked child before exec and only
    // makes one system call, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            let r = libc::ptrace(libc::PTRACE_TRACEME, 0, 0usize, 0usize);
            if r == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    run_inner(cmd, true)
}

fn waitpid(pid: libc::pid_t) -> Result<libc::c_int, String> {
    let mut status = 0;
    loop {
        // SAFETY: `pid` is our child; `status` is valid for writes.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            return Ok(status);
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(format!("waitpid failed: {e}"));
        }
    }
}

fn ptrace(req: libc::c_uint, pid: libc::pid_t, data: usize) -> Result<(), String> {
    // SAFETY: the requests used here (SETOPTIONS, CONT) take an integer in
    // `data` and no pointer; `pid` is our stopped tracee.
    let r = unsafe { libc::ptrace(req, pid, 0usize, data) };
    if r == -1 {
        return Err(format!(
            "ptrace({req}) failed: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// `VmHWM` of `pid` in KiB, from /proc.
fn vm_hwm(pid: libc::pid_t) -> Result<u64, String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("cannot read /proc/{pid}/status: {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| format!("no VmHWM in /proc/{pid}/status"))
}

/// Follow a `PTRACE_TRACEME` child from its exec stop to its exit stop,
/// reading `VmHWM` there, and let it finish (the caller reaps it).
fn trace_to_exit(pid: libc::pid_t) -> Result<Option<u64>, String> {
    let status = waitpid(pid)?;
    if !libc::WIFSTOPPED(status) {
        return Err("traced child did not stop at exec".into());
    }
    ptrace(
        libc::PTRACE_SETOPTIONS,
        pid,
        (libc::PTRACE_O_TRACEEXIT | libc::PTRACE_O_EXITKILL) as usize,
    )?;
    ptrace(libc::PTRACE_CONT, pid, 0)?;
    let mut hwm = None;
    loop {
        // Peek without reaping, so that the caller's wait4 gets the rusage.
        // SAFETY: siginfo_t is plain old data; all-zero is a valid value.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is valid for writes; WNOWAIT leaves the child
        // reapable.
        let r = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WSTOPPED | libc::WNOWAIT,
            )
        };
        if r == -1 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(format!("waitid failed: {e}"));
        }
        if info.si_code == libc::CLD_EXITED
            || info.si_code == libc::CLD_KILLED
            || info.si_code == libc::CLD_DUMPED
        {
            return Ok(hwm);
        }
        // A ptrace stop: consume it, then resume.
        let status = waitpid(pid)?;
        let event = (status >> 16) & 0xff;
        let sig = if event == libc::PTRACE_EVENT_EXIT {
            hwm = Some(vm_hwm(pid)?);
            0
        } else if libc::WSTOPSIG(status) == libc::SIGTRAP {
            0
        } else {
            libc::WSTOPSIG(status) as usize
        };
        ptrace(libc::PTRACE_CONT, pid, sig)?;
    }
}

fn run_inner(cmd: &mut Command, trace: bool) -> Result<ChildRun, String> {
    let out = memfd(c"tt-bench-stdout")?;
    let err = memfd(c"tt-bench-stderr")?;
    let clone = |f: &File| f.try_clone().map_err(|e| format!("cannot dup memfd: {e}"));
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(clone(&out)?))
        .stderr(Stdio::from(clone(&err)?));

    let start = Instant::now();
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {:?}: {e}", cmd.get_program()))?;
    let pid = child.id() as libc::pid_t;
    let hwm_kib = if trace { trace_to_exit(pid)? } else { None };
    let mut status: libc::c_int = 0;
    // SAFETY: rusage is plain old data; all-zero is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: `pid` is our unreaped child; both out-pointers are valid
        // for writes. `child` is never waited on again, so std does not
        // touch the reaped pid.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if r == pid {
            break;
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(format!("wait4 failed: {e}"));
        }
    }
    let wall = start.elapsed();
    drop(child);

    Ok(ChildRun {
        wall,
        code: libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)),
        maxrss_kib: usage.ru_maxrss.max(0) as u64,
        hwm_kib,
        cpu: tv(usage.ru_utime) + tv(usage.ru_stime),
        stdout: read_back(out),
        stderr: read_back(err),
    })
}
