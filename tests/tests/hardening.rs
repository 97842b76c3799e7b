//! Issue 17's hardening, end to end with hand-assembled guests (the
//! images of tests/cpl3.rs, `tt_host::loader::synth` images assembled
//! with iced-x86):
//!
//! - hypercalls respect the image's protections: a BLOCK_READ into the
//!   image's code, or a WALLTIME or POLL whose argument struct lies in
//!   code or in the boot info, stops the guest (exit 1, a message naming
//!   the range) and serves nothing;
//! - console output never stalls the guest or tt-host: with a stdout
//!   nobody reads, SIGTERM stops tt-host within 1 s; with a slow reader,
//!   every byte is either written or counted as lost on stderr.

#[path = "cpl3/image.rs"]
#[allow(dead_code)]
mod image;

use core::mem::offset_of;
use iced_x86::code_asm::*;
use image::*;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use tt_host::abi::{self, Hypercall};
use tt_tests::*;

/// The BLOCK_READ argument struct, in the image's scratch area.
const BLOCK_ARG: u64 = SCRATCH;
/// Handle of the image's one block device (entry 0 is reserved).
const DISK: u64 = 1;

/// An image that reads the first 512 bytes of its disk into `buf`, then
/// prints "served" and halts 0.
fn block_read_into(buf: u64) -> Result<Vec<u8>, IcedError> {
    let mut img = Image::new();
    img.d
        .devices
        .push(("disk".into(), abi::MFT_DEV_BLOCK_BASIC));
    let field = |f: usize| BLOCK_ARG + f as u64;
    img.d
        .put_u64(field(offset_of!(abi::HcBlockRead, handle)), DISK);
    img.d
        .put_u64(field(offset_of!(abi::HcBlockRead, offset)), 0);
    img.d
        .put_u64(field(offset_of!(abi::HcBlockRead, data)), buf);
    img.d.put_u64(field(offset_of!(abi::HcBlockRead, len)), 512);
    img.hypercall(Hypercall::BlockRead, BLOCK_ARG)?;
    img.puts("served\n")?;
    img.halt(0)?;
    Ok(img.build())
}

/// Run `elf` with a 512-byte disk full of `hlt` (code, if it ever landed
/// in the image's text).
fn run_with_disk(elf: &[u8]) -> Run {
    let dir = Scratch::new("hardening");
    let img = dir.file("guest.hvt", elf);
    let disk = dir.file("disk.img", &[0xf4; 512]);
    tt(&[
        "run",
        &format!("--mem={MEM_MB}"),
        &format!("--block:disk={}", disk.display()),
        "--block-durability=none",
        img.to_str().unwrap(),
    ])
}

#[test]
fn block_read_into_the_images_code_is_refused_and_the_code_is_unchanged() -> Result<(), IcedError> {
    if !kvm() {
        return Ok(());
    }
    // Into writable data: served (the setup works).
    let r = run_with_disk(&block_read_into(SCRATCH + 0x100)?);
    assert_eq!((r.status, r.stdout.as_str()), (0, "served\n"), "{r:?}");
    // Into the code it is running: refused before the disk is read. Had
    // the host written it, the guest would run the disk's `hlt`s.
    let code = "overlaps 0x100000..0x101000, the image's code";
    let low = "overlaps 0x0..0x100000, tt-host's boot structures";
    for (buf, range) in [(TEXT, code), (TEXT + 0x10, code), (TEXT - 0x100, low)] {
        let r = run_with_disk(&block_read_into(buf)?);
        assert_error(
            &r,
            &format!("block buffer at {buf:#x} (+512 bytes) {range}"),
        );
        assert!(!r.stderr.contains("HLT"), "{r:?}");
        assert_eq!(r.stdout, "", "{r:?}");
    }
    Ok(())
}

/// An image that makes hypercall `call` with its argument struct at
/// `arg`, then prints "served" and halts 0.
fn hypercall_at(call: Hypercall, arg: u64) -> Result<Vec<u8>, IcedError> {
    let mut img = Image::new();
    img.hypercall(call, arg)?;
    img.puts("served\n")?;
    img.halt(0)?;
    Ok(img.build())
}

fn run(elf: &[u8]) -> Run {
    let dir = Scratch::new("hardening");
    let img = dir.file("guest.hvt", elf);
    tt(&["run", &format!("--mem={MEM_MB}"), img.to_str().unwrap()])
}

#[test]
fn walltime_and_poll_with_their_struct_in_code_or_boot_info_are_refused() -> Result<(), IcedError> {
    if !kvm() {
        return Ok(());
    }
    // In writable data: served.
    for call in [Hypercall::Walltime, Hypercall::Poll] {
        let r = run(&hypercall_at(call, SCRATCH)?);
        assert_eq!((r.status, r.stdout.as_str()), (0, "served\n"), "{r:?}");
    }
    for (call, arg, range) in [
        (
            Hypercall::Walltime,
            TEXT,
            "0x100000..0x101000, the image's code",
        ),
        (
            Hypercall::Poll,
            TEXT + 8,
            "0x100000..0x101000, the image's code",
        ),
        (
            Hypercall::Walltime,
            BOOT_INFO,
            "0x0..0x100000, tt-host's boot structures",
        ),
        (
            Hypercall::Poll,
            BOOT_INFO + 0x2000,
            "0x0..0x100000, tt-host's boot structures",
        ),
    ] {
        let r = run(&hypercall_at(call, arg)?);
        assert_error(&r, &format!("hypercall argument at {arg:#x}"));
        assert!(r.stderr.contains(range), "{call:?}: {r:?}");
        assert_eq!(r.stdout, "", "{r:?}");
    }
    Ok(())
}

/// An image that prints `count` times 4096 bytes (zeros, from the heap),
/// then halts 0; forever if `count` is 0.
fn printer(count: u32) -> Result<Vec<u8>, IcedError> {
    let mut img = Image::new();
    let mut top = img.a.create_label();
    img.a.mov(r12d, count)?;
    img.a.set_label(&mut top)?;
    img.puts_at(0x20_0000, 4096)?;
    if count == 0 {
        img.a.jmp(top)?;
    } else {
        img.a.dec(r12d)?;
        img.a.jnz(top)?;
    }
    img.halt(0)?;
    Ok(img.build())
}

/// Bytes waiting in the pipe behind `fd`.
fn queued(fd: &impl AsRawFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through the valid pointer.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) };
    assert_eq!(rc, 0, "FIONREAD: {}", std::io::Error::last_os_error());
    n as usize
}

/// Kills the child with SIGKILL when dropped (a failed test leaves no
/// tt-host behind).
struct Reaper(u32);

impl Drop for Reaper {
    fn drop(&mut self) {
        kill(self.0, libc::SIGKILL);
    }
}

#[test]
fn sigterm_stops_tt_host_within_a_second_while_nobody_reads_its_stdout() -> Result<(), IcedError> {
    if !kvm() {
        return Ok(());
    }
    let dir = Scratch::new("hardening");
    let img = dir.file("guest.hvt", &printer(0)?);
    let mut child = Command::new(tt_host())
        .env("TT_HOST_STATE_DIR", state_dir())
        .args(["run", &format!("--mem={MEM_MB}")])
        .arg(&img)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tt-host");
    let pid = child.id();
    let _reaper = Reaper(pid);
    // Never read: once the pipe is full, stdout is stalled for good.
    let stdout = child.stdout.take().unwrap();
    let t = Instant::now();
    while queued(&stdout) < 64 << 10 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the pipe never filled"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // Let the guest go on printing into the full buffer for a while.
    std::thread::sleep(Duration::from_millis(300));
    let mut stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut err = String::new();
        let _ = stderr.read_to_string(&mut err);
        let _ = tx.send((child.wait(), err));
    });
    let t = Instant::now();
    assert!(kill(pid, libc::SIGTERM), "SIGTERM {pid}");
    let (status, err) = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("tt-host did not stop within 10 s of SIGTERM");
    let took = t.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "stopping took {took:?}: {err}"
    );
    assert_eq!(status.unwrap().code(), Some(1), "{err}");
    assert!(err.contains("exiting on signal 15 (SIGTERM)"), "{err}");
    assert!(err.contains("guest output was lost"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    drop(stdout);
    Ok(())
}

/// The number before `what` in `s` ("123 bytes were dropped"), or 0.
fn count_before(s: &str, what: &str) -> u64 {
    s.find(what)
        .map(|i| {
            let head = s[..i].trim_end();
            let digits = head.len() - head.trim_end_matches(|c: char| c.is_ascii_digit()).len();
            head[head.len() - digits..].parse().unwrap()
        })
        .unwrap_or(0)
}

#[test]
fn output_beyond_the_buffer_with_a_slow_reader_is_written_or_reported_lost() -> Result<(), IcedError>
{
    if !kvm() {
        return Ok(());
    }
    // 4 MiB: four times the console buffer.
    const PUTS: u32 = 1024;
    let total = u64::from(PUTS) * 4096;
    let dir = Scratch::new("hardening");
    let img = dir.file("guest.hvt", &printer(PUTS)?);
    let mut child = Command::new(tt_host())
        .env("TT_HOST_STATE_DIR", state_dir())
        .args(["run", &format!("--mem={MEM_MB}")])
        .arg(&img)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tt-host");
    let _reaper = Reaper(child.id());
    let mut stdout = child.stdout.take().unwrap();
    // About 3 MB/s, slower than the guest prints.
    let reader = std::thread::spawn(move || {
        let mut got = 0u64;
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => return got,
                Ok(n) => got += n as u64,
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let mut stderr = child.stderr.take().unwrap();
    let mut err = String::new();
    stderr.read_to_string(&mut err).unwrap();
    let status = child.wait().unwrap();
    let got = reader.join().unwrap();
    assert_eq!(status.code(), Some(0), "{err}");
    let dropped = count_before(&err, "bytes were dropped");
    let unwritten = count_before(&err, "bytes were still buffered");
    assert_eq!(
        got + dropped + unwritten,
        total,
        "got {got}, dropped {dropped}, unwritten {unwritten}: {err}"
    );
    if got < total {
        assert!(err.contains("guest output was lost"), "{err}");
    }
    Ok(())
}
