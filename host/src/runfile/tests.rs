use super::console::{ConsoleError, ConsoleLog, ConsoleRing, Record, HEADER_SIZE};
use super::stats::{Snapshot, State, StatsError, StatsFile};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::PathBuf;

/// A scratch directory, removed when dropped (also after a failure).
struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Dir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("tt-runfile-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn rec(time_ns: u64, partial: bool, bytes: &str) -> Record {
    Record {
        time_ns,
        partial,
        bytes: bytes.as_bytes().to_vec(),
    }
}

#[test]
fn lines_and_unended_pieces_are_records_with_their_times() {
    let d = Dir::new("lines");
    let p = d.path("console");
    let mut w = ConsoleRing::create(&p, 4096).unwrap();
    w.append(10, b"hello\nprompt> ");
    w.append(11, b"typed\n\nlast");
    let log = ConsoleLog::open(&p).unwrap();
    let c = log.read_from(0).unwrap();
    assert_eq!(
        c.records,
        vec![
            rec(10, false, "hello"),
            rec(10, true, "prompt> "),
            rec(11, false, "typed"),
            rec(11, false, ""),
            rec(11, true, "last"),
        ]
    );
    assert_eq!(c.lost, 0);
    assert_eq!(c.next, log.end().unwrap());
    // Nothing new: an empty chunk at the same place.
    let again = log.read_from(c.next).unwrap();
    assert!(again.records.is_empty() && again.next == c.next && again.lost == 0);
    let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "readable by others");
    assert_eq!(
        std::fs::metadata(&p).unwrap().len(),
        HEADER_SIZE as u64 + 4096
    );
}

#[test]
fn a_line_longer_than_a_piece_is_cut_into_pieces() {
    let d = Dir::new("long");
    let p = d.path("console");
    let mut w = ConsoleRing::create(&p, 4096).unwrap();
    let line = vec![b'x'; 2500];
    w.append(5, &line);
    w.append(5, b"\n");
    let c = ConsoleLog::open(&p).unwrap().read_from(0).unwrap();
    let joined: Vec<u8> = c.records.iter().flat_map(|r| r.bytes.clone()).collect();
    assert_eq!(joined, line);
    assert!(c.records.len() >= 3, "{}", c.records.len());
    assert!(c.records.iter().all(|r| r.bytes.len() <= w.max_piece()));
    let (last, rest) = c.records.split_last().unwrap();
    assert!(!last.partial && rest.iter().all(|r| r.partial));
}

#[test]
fn after_wrapping_around_the_reader_gets_the_newest_whole_lines_and_counts_the_rest_lost() {
    let d = Dir::new("wrap");
    let p = d.path("console");
    let mut w = ConsoleRing::create(&p, 4096).unwrap();
    for i in 0..1000u64 {
        w.append(1000 + i, format!("line {i}\n").as_bytes());
    }
    let log = ConsoleLog::open(&p).unwrap();
    let end = log.end().unwrap();
    let c = log.read_from(0).unwrap();
    assert!(c.lost > end - 4096, "lost {}", c.lost);
    assert_eq!(c.next, end);
    let first: u64 = c.records[0].time_ns - 1000;
    for (k, r) in c.records.iter().enumerate() {
        let i = first + k as u64;
        assert_eq!(r, &rec(1000 + i, false, &format!("line {i}")));
    }
    assert_eq!(c.records.last().unwrap().time_ns, 1999);
    // Everything read plus everything lost is the whole stream.
    let bytes: u64 = c
        .records
        .iter()
        .map(|r| r.bytes.len() as u64 + 6)
        .sum::<u64>();
    assert_eq!(bytes + c.lost, end);

    let last = log.last(3).unwrap();
    assert_eq!(
        last.records,
        vec![
            rec(1997, false, "line 997"),
            rec(1998, false, "line 998"),
            rec(1999, false, "line 999")
        ]
    );
    assert_eq!(last.next, end);
    let since = log.since(1995).unwrap();
    let times: Vec<u64> = since.records.iter().map(|r| r.time_ns).collect();
    assert_eq!(times, vec![1995, 1996, 1997, 1998, 1999]);
    assert_eq!(since.next, end);
    assert!(log.since(5000).unwrap().records.is_empty());
    assert!(log.last(0).unwrap().records.is_empty());
}

#[test]
fn last_counts_a_line_with_its_pieces_and_an_unended_line_as_one() {
    let d = Dir::new("last");
    let p = d.path("console");
    let mut w = ConsoleRing::create(&p, 4096).unwrap();
    w.append(1, b"one\ntw");
    w.append(2, b"o\nthr");
    w.append(3, b"ee\nprompt");
    let log = ConsoleLog::open(&p).unwrap();
    let two = log.last(2).unwrap().records;
    assert_eq!(
        two,
        vec![
            rec(2, true, "thr"),
            rec(3, false, "ee"),
            rec(3, true, "prompt")
        ]
    );
    let three = log.last(3).unwrap().records;
    assert_eq!(three[..2], [rec(1, true, "tw"), rec(2, false, "o")]);
}

#[test]
fn a_reader_racing_a_writer_never_returns_a_torn_or_overwritten_record() {
    let d = Dir::new("race");
    let p = d.path("console");
    let mut w = ConsoleRing::create(&p, 4096).unwrap();
    let lines = 200_000u64;
    // Line i is stamped i and says so, with a length that varies.
    let line = |i: u64| {
        format!(
            "{i} {}",
            "abcdefghijklmnopqrstuvwxyz".repeat((i % 5) as usize)
        )
    };
    // Appends of 1 to 40 lines, each stamped with its first line's
    // number: a long append overwrites much of the ring before it is
    // published.
    let writer = std::thread::spawn(move || {
        let mut i = 1;
        while i <= lines {
            let n = (i % 40 + 1).min(lines - i + 1);
            let text: String = (i..i + n).map(|k| format!("{}\n", line(k))).collect();
            w.append(i, text.as_bytes());
            i += n;
        }
    });
    let log = ConsoleLog::open(&p).unwrap();
    let (mut pos, mut prev, mut lost, mut gaps) = (0u64, 0u64, 0u64, 0u64);
    // Bytes lost since the last record read: a gap needs some.
    let mut unexplained = 0u64;
    let started = std::time::Instant::now();
    while prev < lines {
        // A reader that stops making progress fails, not hangs.
        assert!(
            started.elapsed() < std::time::Duration::from_secs(120),
            "reader stuck at {pos} after line {prev}"
        );
        let c = log.read_from(pos).unwrap();
        unexplained += c.lost;
        lost += c.lost;
        for r in &c.records {
            let k: u64 = std::str::from_utf8(&r.bytes)
                .ok()
                .and_then(|t| t.split(' ').next()?.parse().ok())
                .unwrap_or_else(|| panic!("torn record {r:?}"));
            assert!(k > prev && r.time_ns <= k, "line {k} after {prev}: {r:?}");
            assert_eq!(r.bytes, line(k).as_bytes(), "torn record");
            assert!(!r.partial);
            if k != prev + 1 {
                assert!(unexplained > 0, "line {} skipped, nothing lost", prev + 1);
                gaps += 1;
            }
            unexplained = 0;
            prev = k;
        }
        pos = c.next;
    }
    writer.join().unwrap();
    assert_eq!(prev, lines, "the last line was read");
    assert!(gaps == 0 || lost > 0, "{gaps} gaps but nothing lost");
}

#[test]
fn damaged_files_give_errors_or_skipped_bytes_never_a_panic() {
    let d = Dir::new("bad");
    let p = d.path("console");
    let mut w = ConsoleRing::create(&p, 4096).unwrap();
    w.append(7, b"good\n");
    let good = std::fs::read(&p).unwrap();

    // Too short for its header.
    std::fs::write(&p, &good[..10]).unwrap();
    assert!(matches!(
        ConsoleLog::open(&p),
        Err(ConsoleError::Size { .. })
    ));
    // Truncated data area.
    std::fs::write(&p, &good[..HEADER_SIZE + 100]).unwrap();
    assert!(matches!(
        ConsoleLog::open(&p),
        Err(ConsoleError::Size { .. })
    ));
    // Wrong magic.
    let mut bad = good.clone();
    bad[0] ^= 0xff;
    std::fs::write(&p, &bad).unwrap();
    let e = ConsoleLog::open(&p).err().unwrap();
    assert!(matches!(e, ConsoleError::Magic { .. }), "{e}");
    assert!(e.to_string().contains("not a tt-host console log"), "{e}");
    // A capacity that does not match the file.
    let mut bad = good.clone();
    bad[16..24].copy_from_slice(&8192u64.to_le_bytes());
    std::fs::write(&p, &bad).unwrap();
    assert!(matches!(
        ConsoleLog::open(&p),
        Err(ConsoleError::Size { .. })
    ));
    // An absurd capacity.
    bad[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&p, &bad).unwrap();
    assert!(matches!(
        ConsoleLog::open(&p),
        Err(ConsoleError::Size { .. })
    ));

    // Records that do not parse are skipped and counted.
    let mut bad = good.clone();
    let garbage = b"12x no flag\nnot a record\n99999999999999999999999 too long\n8 fine\n";
    bad[HEADER_SIZE..HEADER_SIZE + garbage.len()].copy_from_slice(garbage);
    bad[24..32].copy_from_slice(&(garbage.len() as u64).to_le_bytes());
    std::fs::write(&p, &bad).unwrap();
    let c = ConsoleLog::open(&p).unwrap().read_from(0).unwrap();
    assert_eq!(c.records, vec![rec(8, false, "fine")]);
    assert_eq!(c.lost, garbage.len() as u64 - 7);
    assert_eq!(c.next, garbage.len() as u64);
    // A data area without any newline, `written` far past the capacity.
    let mut bad = good.clone();
    bad[HEADER_SIZE..].fill(b'z');
    bad[24..32].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    std::fs::write(&p, &bad).unwrap();
    let log = ConsoleLog::open(&p).unwrap();
    let c = log.read_from(0).unwrap();
    assert!(c.records.is_empty());
    assert_eq!(c.next, u64::MAX / 2);
    assert!(log.last(10).unwrap().records.is_empty());
    assert!(log.since(0).unwrap().records.is_empty());
    // Random bytes everywhere after a valid header.
    let mut bad = good.clone();
    let mut x = 0x1234_5678_9abc_def0u64;
    for b in &mut bad[HEADER_SIZE..] {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    for written in [0u64, 17, 4096, 5000, 1 << 40] {
        bad[24..32].copy_from_slice(&written.to_le_bytes());
        std::fs::write(&p, &bad).unwrap();
        let log = ConsoleLog::open(&p).unwrap();
        let mut pos = 0;
        for _ in 0..100 {
            let c = log.read_from(pos).unwrap();
            assert!(c.records.iter().all(|r| !r.bytes.contains(&b'\n')));
            if c.next == pos {
                break;
            }
            pos = c.next;
        }
        let _ = log.last(5).unwrap();
    }
    // A position past the end: the log was started again.
    let log = ConsoleLog::open(&p).unwrap();
    let end = log.end().unwrap();
    assert!(matches!(
        log.read_from(end + 1),
        Err(ConsoleError::Ahead { .. })
    ));
    // A capacity outside the bounds is refused at creation.
    assert!(matches!(
        ConsoleRing::create(&d.path("small"), 100),
        Err(ConsoleError::Capacity(100))
    ));
}

#[test]
fn a_console_log_is_created_again_empty_and_private() {
    let d = Dir::new("again");
    let p = d.path("console");
    std::fs::write(&p, b"old contents").unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
    let _w = ConsoleRing::create(&p, 8192).unwrap();
    let meta = std::fs::metadata(&p).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let log = ConsoleLog::open(&p).unwrap();
    assert_eq!((log.capacity(), log.end().unwrap()), (8192, 0));
    // Never through a symbolic link.
    let link = d.path("link");
    std::os::unix::fs::symlink(d.path("target"), &link).unwrap();
    assert!(ConsoleRing::create(&link, 8192).is_err());
    assert!(!d.path("target").exists());
}

#[test]
fn a_stats_file_holds_the_counters_identity_and_end_record() {
    let d = Dir::new("stats");
    let p = d.path("stats");
    let f = StatsFile::create(&p).unwrap();
    let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let c = f.counters();
    c.block_read(512);
    c.block_read(4096);
    c.block_write(1024);
    c.net_rx(60);
    c.net_tx(1514);
    c.net_tx(100);
    for _ in 0..7 {
        c.vm_exit();
    }
    let s = StatsFile::read(&p).unwrap();
    assert_eq!(s.pid, std::process::id());
    assert_eq!(s.state, State::Running);
    assert_eq!(s.state.exit_status(), None);
    assert!(s.still_running(), "{s:?}");
    assert_eq!(s.boot_id.len(), 36);
    assert_eq!(
        (
            s.block_read_ops,
            s.block_read_bytes,
            s.block_write_ops,
            s.block_write_bytes
        ),
        (2, 4608, 1, 1024)
    );
    assert_eq!(
        (
            s.net_rx_packets,
            s.net_rx_bytes,
            s.net_tx_packets,
            s.net_tx_bytes
        ),
        (1, 60, 2, 1614)
    );
    assert_eq!((s.vm_exits, s.guest_started_ns), (7, 0));
    c.guest_starts();
    f.finish(State::Exited(259));
    let s = StatsFile::read(&p).unwrap();
    assert_eq!(s.state, State::Exited(259));
    assert_eq!(s.state.exit_status(), Some(3));
    assert!(s.guest_started_ns > 0);
    assert!(s.max_rss_kib > 0, "{s:?}");
    assert!(s.user_cpu_ns + s.system_cpu_ns > 0, "{s:?}");
    // serde round trip, as the daemon sends it.
    let json = serde_json::to_string(&s).unwrap();
    assert_eq!(serde_json::from_str::<Snapshot>(&json).unwrap(), s);
    for (state, status) in [
        (State::Signaled(15), 1),
        (State::Failed, 1),
        (State::Exited(0), 0),
    ] {
        f.finish(state);
        let s = StatsFile::read(&p).unwrap();
        assert_eq!((s.state, s.state.exit_status()), (state, Some(status)));
    }
    // Another process (or this pid at another start time) is not this one.
    let other = Snapshot {
        start_time: s.start_time + 1,
        ..s.clone()
    };
    assert!(!other.still_running());
    let gone = Snapshot {
        pid: u32::MAX - 1,
        ..s
    };
    assert!(!gone.still_running());
}

#[test]
fn damaged_stats_files_give_errors() {
    let d = Dir::new("badstats");
    let p = d.path("stats");
    let _f = StatsFile::create(&p).unwrap();
    let good = std::fs::read(&p).unwrap();
    std::fs::write(&p, &good[..20]).unwrap();
    assert!(matches!(StatsFile::read(&p), Err(StatsError::Size { .. })));
    let mut bad = good.clone();
    bad[3] ^= 1;
    std::fs::write(&p, &bad).unwrap();
    assert!(matches!(StatsFile::read(&p), Err(StatsError::Magic { .. })));
    let mut bad = good.clone();
    bad[8] = 9;
    std::fs::write(&p, &bad).unwrap();
    assert!(matches!(
        StatsFile::read(&p),
        Err(StatsError::Version { .. })
    ));
    let mut bad = good.clone();
    bad.extend_from_slice(&[0; 8]);
    std::fs::write(&p, &bad).unwrap();
    assert!(matches!(StatsFile::read(&p), Err(StatsError::Size { .. })));
    // An unknown end state.
    let mut bad = good.clone();
    let state_at = std::mem::offset_of!(super::stats::Layout, state);
    bad[state_at..state_at + 4].copy_from_slice(&77u32.to_le_bytes());
    std::fs::write(&p, &bad).unwrap();
    let e = StatsFile::read(&p).unwrap_err();
    assert!(e.to_string().contains("unknown end state 77"), "{e}");
    assert!(matches!(
        StatsFile::read(&d.path("missing")),
        Err(StatsError::Io { .. })
    ));
    // Unused here, but the daemon reads a file another process writes.
    let _ = std::fs::File::open(&p).unwrap().read_at(&mut [0; 1], 0);
}

#[test]
fn a_ring_opened_again_goes_on_and_one_of_another_size_is_replaced() {
    let d = Dir::new("reopen");
    let p = d.path("console");
    let mut w = ConsoleRing::open_or_create(&p, 4096).unwrap();
    w.append(1, b"first run\n");
    let old = ConsoleLog::open(&p).unwrap();
    let mut w = ConsoleRing::open_or_create(&p, 4096).unwrap();
    w.append(2, b"second run\n");
    let c = ConsoleLog::open(&p).unwrap().read_from(0).unwrap();
    assert_eq!(
        c.records,
        vec![rec(1, false, "first run"), rec(2, false, "second run")]
    );
    assert!(old.is_current(&p), "the same file went on");
    // Another size: a new ring, renamed over the old one, which a reader
    // holding it still reads whole.
    let mut w = ConsoleRing::open_or_create(&p, 8192).unwrap();
    w.append(3, b"third run\n");
    assert!(!old.is_current(&p));
    assert_eq!(old.read_from(0).unwrap().records.len(), 2);
    let c = ConsoleLog::open(&p).unwrap().read_from(0).unwrap();
    assert_eq!(c.records, vec![rec(3, false, "third run")]);
    // Garbage there is replaced too.
    std::fs::write(&p, b"not a ring").unwrap();
    let mut w = ConsoleRing::open_or_create(&p, 4096).unwrap();
    w.append(4, b"fresh\n");
    let c = ConsoleLog::open(&p).unwrap().read_from(0).unwrap();
    assert_eq!(c.records, vec![rec(4, false, "fresh")]);
}

#[test]
fn an_append_that_may_overwrite_everything_read_is_waited_for_not_skipped() {
    let d = Dir::new("inprogress");
    let p = d.path("console");
    let mut w = ConsoleRing::create(&p, 4096).unwrap();
    for i in 0..10 {
        w.append(i, b"line\n");
    }
    let log = ConsoleLog::open(&p).unwrap();
    let end = log.end().unwrap();
    // The writer announces an append longer than the ring (`writing`, at
    // offset 32 of the header): everything the reader copies may be torn.
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.write_at(&(end + 8192).to_le_bytes(), 32).unwrap();
    let c = log.read_from(0).unwrap();
    assert_eq!((c.records.len(), c.next, c.lost), (0, 0, 0), "{c:?}");
    // Published (here: withdrawn): the records are read, none skipped.
    f.write_at(&end.to_le_bytes(), 32).unwrap();
    let c = log.read_from(0).unwrap();
    assert_eq!((c.records.len(), c.next, c.lost), (10, end, 0), "{c:?}");
}
