//! `tt-bench cpl3`: the CPL 3 monitor (issue 16). On kvm-pvm, code at
//! CPL 0 runs in KVM's instruction emulator; `tt-host run --cpl=3` runs a
//! Solo5 image's code at CPL 3 instead, natively. Three targets, each
//! against a baseline measured in the same run:
//!
//! 1. Solo5's `test_blk` on a 4 MiB disk with `--block-durability=none`:
//!    tt-host `--cpl=3` takes at most 1/16 of solo5-hvt's wall time.
//!    Rounds of: tt-host `--cpl=3` (none), tt-host `--cpl=3` with the
//!    default journal (reported), solo5-hvt, tt-host `--cpl=3` (none)
//!    again; each round's solo5-hvt time is divided by the mean of the two
//!    tt-host runs around it (solo5-hvt takes seconds, so it runs once per
//!    round and the cheap runs stand on both sides). tt-host `--cpl=0`
//!    runs once after the rounds, for the contrast.
//! 2. A CPU-bound CPL 0-style image: a synthetic image
//!    (`tt_host::loader::synth`) whose hand-encoded loop (xorshift64 and a
//!    multiply-add, [`loop_body`]) runs within 1.5x of the same bytes run
//!    natively here, from an executable mapping. The guest times its loop
//!    with `rdtsc` and prints the cycles and its result with the PUTS
//!    hypercall; the native run is timed with `rdtsc` around the call.
//!    Rounds of: native, guest, native; each guest figure against the
//!    mean of the two native ones. The guest's result is checked against
//!    the native one. Once, with 1/1000 of the iterations, the same image
//!    runs at `--cpl=0`, to show what the monitor saves.
//! 3. Solo5's `test_hello`, launch to exit (spawn to `wait4`): tt-host
//!    `--cpl=3` at most 0.5x solo5-hvt, 50 runs each, interleaved; ratio
//!    of the medians (and of each block of 10, to show the spread).
//!    tt-host `--cpl=0` runs as often beside them, reported.
//!
//! Solo5 is not in the repository: targets 1 and 3 take a Solo5 tree
//! built with `./configure.sh && make` from `$SOLO5_DIR` (its
//! `tests/test_*/test_*.hvt` and `tenders/hvt/solo5-hvt`); without it
//! they are skipped, and say so. Files (disk images, tt-host's state
//! directory with the journals): `$TT_CPL3_BENCH_DIR`, default
//! `<target>/tt-cpl3-bench`, removed at the end. Before each target, one
//! untimed run with `TT_HOST_STATS=1` prints tt-host's trap counts.

use crate::child::{self, ChildRun};
use crate::{at_least, judge, list, Opts, Verdict};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tt_benchutil::{bench_dir, median, zeroed_file};
use tt_host::loader::synth::{self, Synth, DATA};

const VAR: &str = "TT_CPL3_BENCH_DIR";
/// Target 1: solo5-hvt's time / tt-host `--cpl=3`'s, at least.
const BLK_TARGET: f64 = 16.0;
/// Target 2: guest loop / native loop, at most.
const LOOP_TARGET: f64 = 1.5;
/// Target 3: tt-host `--cpl=3` / solo5-hvt, at most.
const HELLO_TARGET: f64 = 0.5;
const BLK_ROUNDS: usize = 3;
const LOOP_ROUNDS: usize = 5;
const HELLO_RUNS: usize = 50;
/// Blocks of the hello runs, each with its own ratio of medians.
const HELLO_BLOCKS: usize = 5;
const DISK_BYTES: u64 = 4 << 20;
/// Guest memory of the test_blk runs (both tenders).
const BLK_MEM: &str = "--mem=32";
/// Guest memory of the hello runs (both tenders' default).
const HELLO_MEM: &str = "--mem=512";
/// Guest memory of the loop image.
const LOOP_MEM: &str = "--mem=8";
/// Loop iterations: about 0.2 s natively on the reference machine.
const DEFAULT_ITERS: u64 = 100_000_000;
/// The `--cpl=0` contrast runs this fraction of the iterations.
const CPL0_DIVISOR: u64 = 1000;
const SEED: u64 = crate::compute::SEED;
const MULT: u64 = 0x9E37_79B9_7F4A_7C15;

/// A Solo5 build: its test images and its hvt tender.
struct Solo5 {
    tests: PathBuf,
    hvt: PathBuf,
}

impl Solo5 {
    fn image(&self, name: &str) -> PathBuf {
        self.tests.join(format!("test_{name}/test_{name}.hvt"))
    }
}

/// `$SOLO5_DIR`, checked: `Ok(Err(why))` if it is not set, `Err` if it
/// is set but holds no build.
fn solo5() -> Result<Result<Solo5, String>, String> {
    let Some(dir) = std::env::var_os("SOLO5_DIR") else {
        return Ok(Err(
            "SOLO5_DIR is not set (point it at a Solo5 source tree built with \
                       ./configure.sh && make)"
                .into(),
        ));
    };
    let dir = PathBuf::from(dir);
    let s = Solo5 {
        tests: dir.join("tests"),
        hvt: dir.join("tenders/hvt/solo5-hvt"),
    };
    for p in [s.image("blk"), s.image("hello"), s.hvt.clone()] {
        if !p.is_file() {
            return Err(format!(
                "SOLO5_DIR={}: {} is missing (build Solo5 there with ./configure.sh && make, \
                 or unset SOLO5_DIR to run target 2 only)",
                dir.display(),
                p.display()
            ));
        }
    }
    Ok(Ok(s))
}

fn load() -> String {
    let l = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    l.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

/// The bench's files, removed on drop.
struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `tt-host run --cpl=CPL ARGS...` with the bench's state directory.
fn tt_cmd(tt_host: &Path, state: &Path, cpl: &str, args: &[&str]) -> Command {
    let mut c = Command::new(tt_host);
    c.env("TT_HOST_STATE_DIR", state)
        .env_remove("TT_HOST_STATS")
        .arg("run")
        .arg(format!("--cpl={cpl}"))
        .args(args);
    c
}

/// The `tt-host: stats:` lines of a run with `TT_HOST_STATS=1`.
fn stats_lines(r: &ChildRun) -> String {
    r.stderr
        .lines()
        .filter_map(|l| l.strip_prefix("tt-host: stats: "))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Run `cmd` once with `TT_HOST_STATS=1` and print its counters.
fn show_stats(what: &str, mut cmd: Command) -> Result<(), String> {
    let r = child::run(cmd.env("TT_HOST_STATS", "1"))?;
    r.check_status(what, 0)?;
    println!("  {what}, TT_HOST_STATS=1: {}", stats_lines(&r));
    Ok(())
}

/// Fail unless a Solo5 test exited 0 and printed `SUCCESS`.
fn check_success(r: &ChildRun, what: &str) -> Result<(), String> {
    r.check_status(what, 0)?;
    if r.stdout.contains("SUCCESS") {
        Ok(())
    } else {
        Err(format!(
            "{what} exited 0 without printing SUCCESS\n  stdout: {}",
            r.stdout.trim()
        ))
    }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

// ---- target 2: the loop image and the same loop natively ----

/// Where the loop starts in both the guest's code and the native code,
/// so that it has the same alignment in both.
const LOOP_AT: usize = 0x40;

/// The loop: `rcx` iterations (at least 1) of xorshift64 on `rax` and
/// `r10 = r10 * r9 + rax`; clobbers `rdx`. The same arithmetic as
/// [`crate::compute::kernel`] (with `r9` = [`MULT`]).
pub fn loop_body() -> Vec<u8> {
    let mut c = [
        &[0x48, 0x89, 0xc2][..],   // mov rdx, rax
        &[0x48, 0xc1, 0xe2, 13],   // shl rdx, 13
        &[0x48, 0x31, 0xd0],       // xor rax, rdx
        &[0x48, 0x89, 0xc2],       // mov rdx, rax
        &[0x48, 0xc1, 0xea, 7],    // shr rdx, 7
        &[0x48, 0x31, 0xd0],       // xor rax, rdx
        &[0x48, 0x89, 0xc2],       // mov rdx, rax
        &[0x48, 0xc1, 0xe2, 17],   // shl rdx, 17
        &[0x48, 0x31, 0xd0],       // xor rax, rdx
        &[0x4d, 0x0f, 0xaf, 0xd1], // imul r10, r9
        &[0x49, 0x01, 0xc2],       // add r10, rax
        &[0x48, 0xff, 0xc9],       // dec rcx
    ]
    .concat();
    let back = -(c.len() as i64 + 2);
    c.extend([0x75, back as i8 as u8]); // jnz to the top
    c
}

/// `mov r64, imm64` with this REX prefix and opcode.
fn mov_imm64(rex: u8, op: u8, v: u64) -> Vec<u8> {
    let mut c = vec![rex, op];
    c.extend(v.to_le_bytes());
    c
}

/// The loop's set-up after `rcx` and `rax`: `xor r10d, r10d; mov r9,
/// MULT`, then `nop`s up to [`LOOP_AT`], the loop.
fn setup_and_loop(mut c: Vec<u8>) -> Vec<u8> {
    c.extend([0x45, 0x31, 0xd2]);
    c.extend(mov_imm64(0x49, 0xb9, MULT));
    assert!(c.len() <= LOOP_AT, "the set-up fits before the loop");
    c.resize(LOOP_AT, 0x90);
    c.extend(loop_body());
    c
}

/// `rdtsc; shl rdx, 32; or rax, rdx`: the TSC in `rax`.
const RDTSC: [u8; 9] = [0x0f, 0x31, 0x48, 0xc1, 0xe2, 0x20, 0x48, 0x09, 0xd0];

/// The native function: `extern "sysv64" fn(iters, seed) -> result`.
fn native_code() -> Vec<u8> {
    // mov rcx, rdi; mov rax, rsi
    let mut c = setup_and_loop(vec![0x48, 0x89, 0xf9, 0x48, 0x89, 0xf0]);
    c.extend([0x4c, 0x89, 0xd0, 0xc3]); // mov rax, r10; ret
    c
}

/// The line the guest prints; it writes the hex digits in place.
const LINE: &str = "cpl3bench: tsc=0000000000000000 acc=0000000000000000\n";
/// The PUTS arguments (address, length) and the line, in the data page.
const PUTS_ARGS: u64 = DATA + 0x20;
const LINE_AT: u64 = DATA + 0x40;

/// Address just past the 16 digits after `key` in the guest's line.
fn digits_end(key: &str) -> u32 {
    let at = LINE.find(key).expect("key in LINE") + key.len() + 16;
    (LINE_AT + at as u64) as u32
}

/// Write `rax` as 16 hex digits ending just before `end`; clobbers `rax`,
/// `rcx`, `rdx`, `rdi`.
fn hex_out(end: u32) -> Vec<u8> {
    let mut c = vec![0xbf]; // mov edi, end
    c.extend(end.to_le_bytes());
    c.extend([0xb9, 16, 0, 0, 0]); // mov ecx, 16
    let top = c.len();
    c.extend([
        0x89, 0xc2, // mov edx, eax
        0x83, 0xe2, 0x0f, // and edx, 15
        0x83, 0xc2, 0x30, // add edx, '0'
        0x83, 0xfa, 0x39, // cmp edx, '9'
        0x76, 0x03, // jbe +3
        0x83, 0xc2, 0x27, // add edx, 'a' - '0' - 10
        0x48, 0xff, 0xcf, // dec rdi
        0x88, 0x17, // mov [rdi], dl
        0x48, 0xc1, 0xe8, 0x04, // shr rax, 4
        0xff, 0xc9, // dec ecx
    ]);
    let back = top as i64 - (c.len() as i64 + 2);
    c.extend([0x75, back as i8 as u8]); // jnz to the top
    c
}

/// The guest: TSC, the loop, TSC; print the cycles and the result; HALT 0.
fn guest_image(iters: u64) -> Vec<u8> {
    let mut c = RDTSC.to_vec();
    c.extend([0x49, 0x89, 0xc0]); // mov r8, rax
    c.extend(mov_imm64(0x48, 0xb9, iters)); // mov rcx, iters
    c.extend(mov_imm64(0x48, 0xb8, SEED)); // mov rax, SEED
    let mut c = setup_and_loop(c);
    c.extend(RDTSC);
    c.extend([0x4c, 0x29, 0xc0]); // sub rax, r8
    c.extend(hex_out(digits_end("tsc=")));
    c.extend([0x4c, 0x89, 0xd0]); // mov rax, r10
    c.extend(hex_out(digits_end("acc=")));
    c.push(0xb8); // mov eax, PUTS_ARGS; mov dx, 0x502; out dx, eax
    c.extend((PUTS_ARGS as u32).to_le_bytes());
    c.extend([0x66, 0xba, 0x02, 0x05, 0xef]);
    c.extend(synth::code_halt(0));

    let mut data = vec![0u8; 0x100];
    let args = (PUTS_ARGS - DATA) as usize;
    data[args..args + 8].copy_from_slice(&LINE_AT.to_le_bytes());
    data[args + 8..args + 16].copy_from_slice(&(LINE.len() as u64).to_le_bytes());
    let line = (LINE_AT - DATA) as usize;
    data[line..line + LINE.len()].copy_from_slice(LINE.as_bytes());
    Synth {
        code: c,
        data,
        ..Synth::default()
    }
    .build()
}

/// The guest's line: (TSC cycles of the loop, result).
fn parse_guest(out: &str) -> Option<(u64, u64)> {
    let line = out.lines().find_map(|l| l.strip_prefix("cpl3bench: "))?;
    let mut f = line.split_whitespace();
    let hex = |w: Option<&str>, key: &str| {
        u64::from_str_radix(w?.strip_prefix(key)?.strip_prefix('=')?, 16).ok()
    };
    Some((hex(f.next(), "tsc")?, hex(f.next(), "acc")?))
}

/// [`native_code`] in an executable mapping of this process.
struct NativeLoop {
    mem: *mut libc::c_void,
    len: usize,
}

impl NativeLoop {
    fn new() -> Result<NativeLoop, String> {
        let code = native_code();
        let len = code.len().next_multiple_of(4096);
        // SAFETY: a fresh anonymous mapping; the result is checked.
        let mem = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if mem == libc::MAP_FAILED {
            return Err(format!("mmap failed: {}", std::io::Error::last_os_error()));
        }
        let n = NativeLoop { mem, len };
        // SAFETY: `mem` is a writable mapping of `len >= code.len()` bytes
        // that nothing else uses.
        unsafe { std::ptr::copy_nonoverlapping(code.as_ptr(), mem.cast::<u8>(), code.len()) };
        // SAFETY: `mem`/`len` are the mapping made above.
        if unsafe { libc::mprotect(mem, len, libc::PROT_READ | libc::PROT_EXEC) } != 0 {
            return Err(format!(
                "mprotect to PROT_EXEC failed: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(n)
    }

    /// Run the loop: (TSC cycles, wall time, result).
    fn run(&self, iters: u64) -> (u64, Duration, u64) {
        assert!(iters >= 1, "the loop runs at least once");
        // SAFETY: the mapping holds `native_code`, a complete function of
        // the System V ABI taking two u64 and returning one, which only
        // touches caller-saved registers and no memory.
        let f: extern "sysv64" fn(u64, u64) -> u64 = unsafe { std::mem::transmute(self.mem) };
        let start = std::time::Instant::now();
        // SAFETY: rdtsc has no preconditions on x86-64.
        let t0 = unsafe { core::arch::x86_64::_rdtsc() };
        let acc = f(std::hint::black_box(iters), std::hint::black_box(SEED));
        // SAFETY: as above.
        let t1 = unsafe { core::arch::x86_64::_rdtsc() };
        (t1 - t0, start.elapsed(), acc)
    }
}

impl Drop for NativeLoop {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, no longer used.
        unsafe { libc::munmap(self.mem, self.len) };
    }
}

// ---- the rounds ----

pub fn run(o: &Opts) -> Result<Vec<Verdict>, String> {
    let tt_host = crate::tt_host(o)?;
    let solo5 = solo5()?;
    let dir = Dir(bench_dir(VAR, "tt-cpl3-bench"));
    let _ = std::fs::remove_dir_all(&dir.0);
    let state = dir.0.join("state");
    std::fs::create_dir_all(&state)
        .map_err(|e| format!("cannot create {}: {e}", state.display()))?;
    println!("files in {} (${VAR}), removed at the end", dir.0.display());
    let mut v = Vec::new();
    match &solo5 {
        Ok(s) => {
            v.push(blk(o, &tt_host, &state, &dir.0, s)?);
            println!();
        }
        Err(why) => println!("== target 1 (Solo5 test_blk) skipped: {why} =="),
    }
    v.push(cpu_loop(o, &tt_host, &state, &dir.0)?);
    match &solo5 {
        Ok(s) => {
            println!();
            v.push(hello(&tt_host, &state, s)?);
        }
        Err(why) => println!("== target 3 (Solo5 hello launch) skipped: {why} =="),
    }
    println!("load average at the end: {}", load());
    Ok(v)
}

fn blk(o: &Opts, tt_host: &Path, state: &Path, dir: &Path, s: &Solo5) -> Result<Verdict, String> {
    let rounds = o.runs.unwrap_or(BLK_ROUNDS).max(1);
    let image = s.image("blk");
    println!(
        "== target 1: Solo5 test_blk on a 4 MiB disk, {rounds} rounds (load average {}) ==",
        load()
    );
    let disk = |name: &str| -> String {
        let p = dir.join(name);
        zeroed_file(&p, DISK_BYTES);
        format!("--block:storage={}", p.display())
    };
    let (none, journal, hvt, cpl0) = (
        disk("none.img"),
        disk("journal.img"),
        disk("hvt.img"),
        disk("cpl0.img"),
    );
    let img = image.to_str().ok_or("SOLO5_DIR is not UTF-8")?;
    let tt = |cpl: &str, disk: &str, durable: bool| {
        let mut a = vec![BLK_MEM, disk];
        if !durable {
            a.push("--block-durability=none");
        }
        a.extend(["--", img]);
        tt_cmd(tt_host, state, cpl, &a)
    };
    let hvt_cmd = || {
        let mut c = Command::new(&s.hvt);
        c.args([BLK_MEM, &hvt, "--", img]);
        c
    };
    show_stats("tt-host --cpl=3 test_blk (none)", tt("3", &none, false))?;
    // Untimed: warm the page cache and make the journal's ring.
    check_success(
        &child::run(&mut tt("3", &journal, true))?,
        "tt-host test_blk",
    )?;

    let (mut t_none, mut t_journal, mut t_hvt) = (vec![], vec![], vec![]);
    for r in 0..rounds {
        let a = child::run(&mut tt("3", &none, false))?;
        check_success(&a, "tt-host --cpl=3 test_blk (none)")?;
        let j = child::run(&mut tt("3", &journal, true))?;
        check_success(&j, "tt-host --cpl=3 test_blk (journal)")?;
        let h = child::run(&mut hvt_cmd())?;
        check_success(&h, "solo5-hvt test_blk")?;
        let b = child::run(&mut tt("3", &none, false))?;
        check_success(&b, "tt-host --cpl=3 test_blk (none)")?;
        t_none.push(secs(a.wall));
        t_none.push(secs(b.wall));
        t_journal.push(secs(j.wall));
        t_hvt.push(secs(h.wall));
        println!(
            "  round {r}: tt-host --cpl=3 none {:.3} s, {:.3} s; journal {:.3} s; \
             solo5-hvt {:.3} s (load {})",
            secs(a.wall),
            secs(b.wall),
            secs(j.wall),
            secs(h.wall),
            load()
        );
    }
    let c0 = child::run(&mut tt("0", &cpl0, false))?;
    check_success(&c0, "tt-host --cpl=0 test_blk (none)")?;
    let ratios: Vec<f64> = t_hvt
        .iter()
        .enumerate()
        .map(|(i, h)| h / ((t_none[2 * i] + t_none[2 * i + 1]) / 2.0))
        .collect();
    let none_pairs: Vec<f64> = t_none.chunks(2).map(|p| (p[0] + p[1]) / 2.0).collect();
    println!("wall time, spawn to wait4 (s), medians over rounds:");
    println!(
        "  tt-host --cpl=3 --block-durability=none  {:>8.3}  (mean of the runs before and after solo5-hvt: {})",
        median(&none_pairs),
        list(&none_pairs, 3)
    );
    println!(
        "  tt-host --cpl=3 (journal, 820 synced)    {:>8.3}  ({})",
        median(&t_journal),
        list(&t_journal, 3)
    );
    println!(
        "  solo5-hvt                                {:>8.3}  ({})",
        median(&t_hvt),
        list(&t_hvt, 3)
    );
    println!(
        "  tt-host --cpl=0 --block-durability=none  {:>8.3}  (once, after the rounds)",
        secs(c0.wall)
    );
    println!(
        "  solo5-hvt / tt-host --cpl=3 (none) per round: {}",
        list(&ratios, 1)
    );
    Ok(at_least(
        "test_blk: solo5-hvt / tt-host --cpl=3 --block-durability=none =",
        median(&ratios),
        BLK_TARGET,
    ))
}

fn cpu_loop(o: &Opts, tt_host: &Path, state: &Path, dir: &Path) -> Result<Verdict, String> {
    let rounds = o.runs.unwrap_or(LOOP_ROUNDS).max(1);
    let iters = o.iters.unwrap_or(DEFAULT_ITERS);
    if iters < CPL0_DIVISOR {
        return Err(format!("--iters must be at least {CPL0_DIVISOR}"));
    }
    println!(
        "== target 2: a CPL 0-style synthetic image's loop, {iters} iterations, {rounds} rounds \
         (load average {}) ==",
        load()
    );
    let write = |name: &str, n: u64| -> Result<String, String> {
        let p = dir.join(name);
        std::fs::write(&p, guest_image(n))
            .map_err(|e| format!("cannot write {}: {e}", p.display()))?;
        p.to_str()
            .map(str::to_string)
            .ok_or_else(|| format!("{} is not UTF-8", p.display()))
    };
    let full = write("loop.hvt", iters)?;
    let small = iters / CPL0_DIVISOR;
    let tiny = write("loop-small.hvt", small)?;
    let native = NativeLoop::new()?;
    let expect = crate::compute::kernel(iters, SEED);
    let guest = |cpl: &str, img: &str, n: u64| -> Result<(u64, Duration), String> {
        let r = child::run(&mut tt_cmd(tt_host, state, cpl, &[LOOP_MEM, img]))?;
        r.check_status(&format!("tt-host --cpl={cpl} loop image"), 0)?;
        let (tsc, acc) = parse_guest(&r.stdout).ok_or_else(|| {
            format!(
                "the loop image printed no 'cpl3bench: tsc=... acc=...' line\n  stdout: {}",
                r.stdout.trim()
            )
        })?;
        let want = crate::compute::kernel(n, SEED);
        if acc != want {
            return Err(format!(
                "the loop image's result {acc:#x} is not the native loop's {want:#x} for {n} \
                 iterations"
            ));
        }
        Ok((tsc, r.wall))
    };
    show_stats(
        "tt-host --cpl=3 loop image",
        tt_cmd(tt_host, state, "3", &[LOOP_MEM, &tiny]),
    )?;
    let (_, _, acc) = native.run(iters);
    if acc != expect {
        return Err(format!(
            "the native loop's result {acc:#x} is not compute::kernel's {expect:#x}"
        ));
    }
    guest("3", &full, iters)?;

    let (mut nat_tsc, mut nat_ns, mut g_tsc, mut g_wall) = (vec![], vec![], vec![], vec![]);
    for r in 0..rounds {
        let (c0, d0, _) = native.run(iters);
        let (gt, gw) = guest("3", &full, iters)?;
        let (c1, d1, _) = native.run(iters);
        nat_tsc.extend([c0 as f64, c1 as f64]);
        nat_ns.extend([d0.as_nanos() as f64, d1.as_nanos() as f64]);
        g_tsc.push(gt as f64);
        g_wall.push(secs(gw));
        println!(
            "  round {r}: native {:.1} Mcycles, guest {:.1} Mcycles, native {:.1} Mcycles \
             (load {})",
            c0 as f64 / 1e6,
            gt as f64 / 1e6,
            c1 as f64 / 1e6,
            load()
        );
    }
    let (c0_tsc, c0_wall) = guest("0", &tiny, small)?;
    let ratios: Vec<f64> = g_tsc
        .iter()
        .enumerate()
        .map(|(i, g)| g / ((nat_tsc[2 * i] + nat_tsc[2 * i + 1]) / 2.0))
        .collect();
    let ns_per_cycle = median(&nat_ns) / median(&nat_tsc);
    let per_iter = |cycles: f64, n: u64| cycles / n as f64;
    println!("TSC cycles per iteration (medians; 1 cycle = {ns_per_cycle:.3} ns here):");
    println!(
        "  native, the same bytes in this process    {:>10.2}  (loop {:.1} ms)",
        per_iter(median(&nat_tsc), iters),
        median(&nat_ns) / 1e6
    );
    println!(
        "  guest at --cpl=3, by its own rdtsc        {:>10.2}  (loop {:.1} ms; whole process {:.1} ms)",
        per_iter(median(&g_tsc), iters),
        median(&g_tsc) * ns_per_cycle / 1e6,
        median(&g_wall) * 1e3
    );
    println!(
        "  guest at --cpl=0, {small} iterations, once {:>10.2}  (loop {:.1} ms; whole process {:.1} ms)",
        per_iter(c0_tsc as f64, small),
        c0_tsc as f64 * ns_per_cycle / 1e6,
        secs(c0_wall) * 1e3
    );
    println!(
        "  --cpl=0 / --cpl=3 per iteration: {:.0}x",
        per_iter(c0_tsc as f64, small) / per_iter(median(&g_tsc), iters)
    );
    println!(
        "  guest / native per round: {}; results match ({expect:#x})",
        list(&ratios, 3)
    );
    Ok(judge(
        "loop at --cpl=3 / the same loop natively =",
        median(&ratios),
        LOOP_TARGET,
        "",
    ))
}

fn hello(tt_host: &Path, state: &Path, s: &Solo5) -> Result<Verdict, String> {
    let image = s.image("hello");
    println!(
        "== target 3: Solo5 test_hello launch to exit, {HELLO_RUNS} runs each, interleaved, \
         tt-host --cpl=0 beside them (load average {}) ==",
        load()
    );
    let img = image.to_str().ok_or("SOLO5_DIR is not UTF-8")?;
    let tt = |cpl: &str| tt_cmd(tt_host, state, cpl, &[HELLO_MEM, img]);
    let hvt = || {
        let mut c = Command::new(&s.hvt);
        c.args([HELLO_MEM, img]);
        c
    };
    let check = |r: &ChildRun, what: &str| -> Result<(), String> {
        r.check_status(what, 0)?;
        if r.stdout.contains("Hello, World") {
            Ok(())
        } else {
            Err(format!(
                "{what} did not say hello\n  stdout: {}",
                r.stdout.trim()
            ))
        }
    };
    show_stats("tt-host --cpl=3 test_hello", tt("3"))?;
    // The three commands: tt-host --cpl=3 (judged), solo5-hvt (the
    // baseline), tt-host --cpl=0 (reported: tt-host's launch without the
    // monitor).
    let what = [
        "tt-host --cpl=3 test_hello",
        "solo5-hvt test_hello",
        "tt-host --cpl=0 test_hello",
    ];
    let cmd = |j: usize| match j {
        0 => tt("3"),
        1 => hvt(),
        _ => tt("0"),
    };
    for _ in 0..2 {
        for (j, what) in what.iter().enumerate() {
            check(&child::run(&mut cmd(j))?, what)?;
        }
    }
    let mut times: [Vec<f64>; 3] = Default::default();
    for i in 0..HELLO_RUNS {
        // Rotate which goes first, so that none always follows another.
        for k in 0..3 {
            let j = (i + k) % 3;
            let r = child::run(&mut cmd(j))?;
            check(&r, what[j])?;
            times[j].push(secs(r.wall) * 1e3);
        }
    }
    let [t_tt, t_hvt, t_tt0] = times;
    let block = HELLO_RUNS / HELLO_BLOCKS;
    let blocks: Vec<f64> = t_tt
        .chunks(block)
        .zip(t_hvt.chunks(block))
        .map(|(a, b)| median(a) / median(b))
        .collect();
    let row = |name: &str, v: &[f64]| {
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        println!(
            "  {name:<20} median {:>6.2} ms, min {:>6.2}, p90 {:>6.2}, max {:>6.2}",
            median(v),
            s[0],
            s[(s.len() * 9).div_ceil(10) - 1],
            s[s.len() - 1]
        );
    };
    row("tt-host --cpl=3", &t_tt);
    row("solo5-hvt", &t_hvt);
    row("tt-host --cpl=0", &t_tt0);
    println!(
        "  tt-host / solo5-hvt, ratio of medians per block of {block}: {} (load {})",
        list(&blocks, 2),
        load()
    );
    Ok(judge(
        "hello: median(tt-host --cpl=3) / median(solo5-hvt) =",
        median(&t_tt) / median(&t_hvt),
        HELLO_TARGET,
        "",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_native_loop_computes_what_the_guest_must_print() {
        let n = NativeLoop::new().expect("executable mapping");
        for iters in [1, 2, 1000, 123_457] {
            let (cycles, _, acc) = n.run(iters);
            assert_eq!(
                acc,
                crate::compute::kernel(iters, SEED),
                "{iters} iterations"
            );
            assert!(cycles > 0);
        }
    }

    #[test]
    fn guest_and_native_code_share_the_loop_at_the_same_offset() {
        let body = loop_body();
        let native = native_code();
        assert_eq!(&native[LOOP_AT..LOOP_AT + body.len()], &body[..]);
        let img = guest_image(5);
        // The text segment starts at file offset 0x1000 (synth's layout).
        let text = &img[0x1000..];
        assert_eq!(&text[LOOP_AT..LOOP_AT + body.len()], &body[..]);
        // The loop's jnz lands on its first instruction.
        assert_eq!(body[body.len() - 2..], [0x75, (-(body.len() as i8)) as u8]);
    }

    #[test]
    fn the_guests_line_is_parsed_and_a_bad_one_refused() {
        let out = "Solo5: x\ncpl3bench: tsc=00000000000003e8 acc=dd51c4a66d9496b1\n";
        assert_eq!(parse_guest(out), Some((1000, 0xdd51_c4a6_6d94_96b1)));
        assert_eq!(parse_guest(&out.replace(" acc", " acx")), None);
        assert_eq!(parse_guest("cpl3bench: tsc=zz acc=1\n"), None);
        assert_eq!(parse_guest(LINE), Some((0, 0)));
    }
}
