//! A guest for the snapshot/restore and live-migration tests: it counts,
//! records every count on its disk, and keeps changing (and checking) its
//! memory, so that a test can tell whether a guest that was paused, saved
//! and continued elsewhere lost or repeated a step, lost a disk write, or
//! came back with different memory.
//!
//! - `count MS [DIRTY_KIB_PER_S [BUF_MIB]]`: every MS milliseconds, for
//!   ever, adds one to a counter K kept in memory (from 1) and prints
//!   exactly one line `count K`. Tick K is due K * MS ms after the start,
//!   so the ticks do not drift (after a pause the missed ticks follow back
//!   to back, none is skipped); between wake-ups the guest sleeps in POLL.
//!
//!   Before printing line K it writes one 512-byte record to the block
//!   device "disk" at sector K % 128: the magic `TTCOUNT1`, K (u64 LE),
//!   the FNV-1a 64 checksum (LE) of those 16 bytes, then zeros. The line is
//!   printed only once the write returned OK, so a printed count is on the
//!   disk. The disk needs 512-byte blocks and at least 128 of them.
//!
//!   With DIRTY_KIB_PER_S > 0, or with BUF_MIB given, the guest first
//!   fills a buffer of BUF_MIB MiB (default 32, 4 KiB aligned) with a
//!   known pattern, before `count 1`. Then every 10 ms it rewrites the
//!   4 KiB pages the rate makes due, DIRTY_KIB_PER_S KiB per second in
//!   all, page after page round robin. Page P's content after its pass N
//!   (N = how many times it was rewritten, kept per page in a small array;
//!   pass 0 is the first fill) is 512 u64 words, word W being
//!   `splitmix64_mix((P << 32) | N) + W * 0x2545f491` (wrapping, see
//!   [`pattern`]), so a stale, misplaced or torn page differs from it.
//!   More than 100 ms of dirtying behind (after a pause) is dropped, not
//!   caught up. Memory is checked all the time: each page just before it
//!   is rewritten, and a sweep that checks the whole buffer once a second,
//!   a part every 10 ms. A page that differs from what its pass wrote
//!   prints `counter: CORRUPT page P pass N word W: expected X, found Y`
//!   and the guest exits 3. With DIRTY_KIB_PER_S = 0 and a BUF_MIB, the
//!   buffer is written once and then only checked.
//!
//! Nothing else is printed while all is well. A failed disk write, a
//! missing or too small disk, or a buffer that does not fit in memory
//! prints `counter: FAIL ...` and exits 1. Anything else prints
//! `counter: usage: ...` and exits 2.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;
use core::time::Duration;

use tt_guest::block::Block;
use tt_guest::println;
use tt_guest::time::{sleep, Instant};

tt_guest::main!(app_main, devices: [block "disk"]);

const USAGE: &str = "counter: usage: count MS [DIRTY_KIB_PER_S [BUF_MIB]]";

/// The first 8 bytes of every record.
const MAGIC: &[u8; 8] = b"TTCOUNT1";
/// A record's size, and the disk's block size it needs.
const SECTOR: usize = 512;
/// Record K goes to sector K % SLOTS.
const SLOTS: u64 = 128;

/// Words of a 4 KiB page.
const PAGE_WORDS: usize = 4096 / 8;
/// The buffer's size when only the dirtying rate is given.
const DEFAULT_BUF_MIB: u64 = 32;
/// How often a guest with a buffer wakes up to dirty and check it.
const STEP: Duration = Duration::from_millis(10);
/// The most dirtying owed that is still caught up (after a pause, the
/// rest is dropped: the point is a steady rate, not a total).
const MAX_BACKLOG: Duration = Duration::from_millis(100);

/// Exit statuses.
const EXIT_FAIL: i32 = 1;
const EXIT_USAGE: i32 = 2;
const EXIT_CORRUPT: i32 = 3;

/// FNV-1a, 64 bits.
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// The disk record of count `k`.
fn record(k: u64) -> [u8; SECTOR] {
    let mut r = [0u8; SECTOR];
    r[0..8].copy_from_slice(MAGIC);
    r[8..16].copy_from_slice(&k.to_le_bytes());
    let sum = fnv(&r[0..16]);
    r[16..24].copy_from_slice(&sum.to_le_bytes());
    r
}

/// splitmix64's finaliser: spreads (page, pass) over all 64 bits.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Word `w` of page `page`'s content after pass `pass`: different for
/// every word, page and pass, so a stale page (an old pass), a misplaced
/// one (another index) or a torn one (a mix) all differ from it.
fn pattern(page: usize, pass: u32, w: usize) -> u64 {
    mix(((page as u64) << 32) | pass as u64).wrapping_add((w as u64).wrapping_mul(0x2545_f491))
}

/// A page whose content is not what its last pass wrote.
struct Corrupt {
    page: usize,
    pass: u32,
    word: usize,
    expected: u64,
    found: u64,
}

/// One page of the buffer, aligned so that rewriting it dirties exactly
/// one 4 KiB page of guest memory.
#[repr(C, align(4096))]
struct Page([u64; PAGE_WORDS]);

/// The buffer that is dirtied and checked, with each page's pass.
struct Memory {
    buf: Vec<Page>,
    pass: Vec<u32>,
    /// The next page to rewrite.
    write_cursor: usize,
    /// The next page the sweep checks.
    check_cursor: usize,
}

impl Memory {
    /// Allocate `mib` MiB and fill every page with its pass-0 pattern;
    /// `None` if that does not fit in the heap.
    fn new(mib: u64) -> Option<Memory> {
        let pages = usize::try_from(mib.checked_mul(256)?).ok()?;
        let mut buf = Vec::new();
        buf.try_reserve_exact(pages).ok()?;
        let mut pass = Vec::new();
        pass.try_reserve_exact(pages).ok()?;
        for page in 0..pages {
            buf.push(Page(core::array::from_fn(|w| pattern(page, 0, w))));
            pass.push(0);
        }
        Some(Memory {
            buf,
            pass,
            write_cursor: 0,
            check_cursor: 0,
        })
    }

    fn pages(&self) -> usize {
        self.pass.len()
    }

    /// Check that `page` holds its last pass's pattern. The reads are
    /// volatile: the compiler must not answer them from what it knows was
    /// written, since the point is to see what memory holds now.
    fn check(&self, page: usize) -> Result<(), Corrupt> {
        let pass = self.pass[page];
        for (w, word) in self.buf[page].0.iter().enumerate() {
            // SAFETY: `word` is a reference into `self.buf`, so it is
            // valid and aligned for a read of a u64.
            let found = unsafe { core::ptr::read_volatile(word) };
            let expected = pattern(page, pass, w);
            if found != expected {
                return Err(Corrupt {
                    page,
                    pass,
                    word: w,
                    expected,
                    found,
                });
            }
        }
        Ok(())
    }

    /// Check the next page in round-robin order.
    fn check_next(&mut self) -> Result<(), Corrupt> {
        let page = self.check_cursor;
        self.check_cursor = (page + 1) % self.pages();
        self.check(page)
    }

    /// Check, then rewrite with its next pass, the next page in
    /// round-robin order.
    fn write_next(&mut self) -> Result<(), Corrupt> {
        let page = self.write_cursor;
        self.write_cursor = (page + 1) % self.pages();
        self.check(page)?;
        let pass = self.pass[page].wrapping_add(1);
        for (w, word) in self.buf[page].0.iter_mut().enumerate() {
            *word = pattern(page, pass, w);
        }
        self.pass[page] = pass;
        Ok(())
    }
}

/// Work done at a steady rate of `per_s` units a second since a start:
/// how many units are due by a given time, minus those already taken.
struct Pace {
    per_s: u64,
    /// Units owed since the start (taken or dropped).
    owed: u64,
    /// The most units handed out at once.
    cap: u64,
}

impl Pace {
    fn new(per_s: u64, cap: u64) -> Pace {
        Pace {
            per_s,
            owed: 0,
            cap: cap.max(1),
        }
    }

    /// The units to do now, `elapsed` after the start. Beyond `cap`, the
    /// backlog is dropped.
    fn take(&mut self, elapsed: Duration) -> u64 {
        let due = elapsed.as_nanos() * self.per_s as u128 / 1_000_000_000;
        let due = u64::try_from(due).unwrap_or(u64::MAX);
        let n = due.saturating_sub(self.owed);
        self.owed = self.owed.max(due);
        n.min(self.cap)
    }
}

/// Sleep (in POLL) until `t`; at once if it has passed.
fn sleep_until(t: Instant) {
    let now = Instant::now().as_nanos();
    if t.as_nanos() > now {
        sleep(Duration::from_nanos(t.as_nanos() - now));
    }
}

/// The instant `n` periods of `period` after `start`.
fn after(start: Instant, period: Duration, n: u64) -> Instant {
    let ns = u64::try_from(period.as_nanos()).unwrap_or(u64::MAX);
    start + Duration::from_nanos(ns.saturating_mul(n))
}

/// The buffer with the rates at which it is dirtied and checked.
struct Churn {
    mem: Memory,
    /// KiB to dirty.
    dirty: Pace,
    /// KiB due that do not make a whole page yet.
    carry: u64,
    /// Pages to check.
    sweep: Pace,
}

impl Churn {
    /// Fill a buffer of `mib` MiB, to be dirtied at `dirty_kib` KiB a
    /// second; `None` if it does not fit in the heap.
    fn new(mib: u64, dirty_kib: u64) -> Option<Churn> {
        let mem = Memory::new(mib)?;
        let pages = mem.pages() as u64;
        let backlog = MAX_BACKLOG.as_nanos() * dirty_kib as u128 / 1_000_000_000;
        Some(Churn {
            mem,
            dirty: Pace::new(dirty_kib, u64::try_from(backlog).unwrap_or(u64::MAX)),
            carry: 0,
            // The whole buffer once a second, at most once per step.
            sweep: Pace::new(pages, pages),
        })
    }

    /// Dirty and check the buffer as far as is due `elapsed` after the
    /// start.
    fn step(&mut self, elapsed: Duration) -> Result<(), Corrupt> {
        self.carry = self.carry.saturating_add(self.dirty.take(elapsed));
        for _ in 0..self.carry / 4 {
            self.mem.write_next()?;
        }
        self.carry %= 4;
        for _ in 0..self.sweep.take(elapsed) {
            self.mem.check_next()?;
        }
        Ok(())
    }
}

fn count(ms: u64, dirty_kib: u64, buf_mib: Option<u64>) -> i32 {
    let disk = match Block::acquire("disk") {
        Ok(d) => d,
        Err(e) => {
            println!("counter: FAIL block device \"disk\": {:?}", e);
            return EXIT_FAIL;
        }
    };
    if disk.block_size() != SECTOR as u64 || disk.blocks() < SLOTS {
        println!(
            "counter: FAIL disk has {} blocks of {} bytes, needs at least {} of {}",
            disk.blocks(),
            disk.block_size(),
            SLOTS,
            SECTOR
        );
        return EXIT_FAIL;
    }
    let mut churn = None;
    if dirty_kib > 0 || buf_mib.is_some() {
        let mib = buf_mib.unwrap_or(DEFAULT_BUF_MIB);
        churn = Churn::new(mib, dirty_kib);
        if churn.is_none() {
            println!("counter: FAIL cannot allocate a buffer of {} MiB", mib);
            return EXIT_FAIL;
        }
    }

    let period = Duration::from_millis(ms);
    let start = Instant::now();
    let mut k = 1u64;
    let mut step = 1u64;
    loop {
        let tick_at = after(start, period, k);
        if let Some(churn) = churn.as_mut() {
            // Wake for the next step or the tick, whichever is first.
            sleep_until(tick_at.min(after(start, STEP, step)));
            let elapsed = start.elapsed();
            let step_ns = STEP.as_nanos() as u64;
            step = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX) / step_ns + 1;
            if let Err(c) = churn.step(elapsed) {
                println!(
                    "counter: CORRUPT page {} pass {} word {}: expected {:#018x}, found {:#018x}",
                    c.page, c.pass, c.word, c.expected, c.found
                );
                return EXIT_CORRUPT;
            }
            if Instant::now() < tick_at {
                continue;
            }
        } else {
            sleep_until(tick_at);
        }
        let sector = k % SLOTS;
        if let Err(e) = disk.write(sector * SECTOR as u64, &record(k)) {
            println!(
                "counter: FAIL write of count {} at sector {}: {}",
                k, sector, e
            );
            return EXIT_FAIL;
        }
        println!("count {}", k);
        k += 1;
    }
}

fn app_main() -> i32 {
    let args: Vec<&str> = tt_guest::boot::args().collect();
    let num = |s: &str| s.parse::<u64>().ok();
    let parsed = match args.as_slice() {
        ["count", ms] => num(ms).map(|ms| (ms, 0, None)),
        ["count", ms, dirty] => num(ms).zip(num(dirty)).map(|(m, d)| (m, d, None)),
        ["count", ms, dirty, buf] => match (num(ms), num(dirty), num(buf)) {
            (Some(m), Some(d), Some(b)) if b > 0 => Some((m, d, Some(b))),
            _ => None,
        },
        _ => None,
    };
    match parsed {
        Some((ms, dirty_kib, buf_mib)) => count(ms, dirty_kib, buf_mib),
        None => {
            println!("{}", USAGE);
            EXIT_USAGE
        }
    }
}
