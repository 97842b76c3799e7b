//! A tt-host child read line by line, and what the test guests print
//! (`counter`'s disk records, `vblk`'s acks): shared by the snapshot,
//! migration and counter tests.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// How long an expected line or exit may take: this only catches a hang.
pub const WAIT: Duration = Duration::from_secs(30);

/// A child that is SIGKILLed and reaped when dropped, so a failing test
/// leaves no tt-host behind.
pub struct Guard(pub Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A running tt-host, its stdout lines and its stderr lines (prefixed
/// `stderr: `) arriving on one channel.
pub struct Host {
    pub child: Guard,
    lines: Receiver<String>,
    /// Every line read so far, for failure messages.
    pub seen: Vec<String>,
}

/// How a [`Host`] ended: its status and the lines it printed after those
/// already read.
pub struct Ended {
    pub status: ExitStatus,
    pub stdout: Vec<String>,
    pub stderr: Vec<String>,
}

impl Host {
    pub fn spawn(cmd: &mut Command) -> Host {
        let mut child = Guard(
            cmd.stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn tt-host"),
        );
        let (tx, lines) = mpsc::channel();
        let out = child.0.stdout.take().unwrap();
        let err = child.0.stderr.take().unwrap();
        let tx2 = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx2.send(format!("stderr: {line}"));
            }
        });
        Host {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.0.id()
    }

    /// The next line; panics after [`WAIT`] or at the end of the output.
    pub fn line(&mut self) -> String {
        match self.lines.recv_timeout(WAIT) {
            Ok(l) => {
                self.seen.push(l.clone());
                l
            }
            Err(e) => panic!("no line from the guest ({e}); so far: {:#?}", self.seen),
        }
    }

    /// The next line if one comes within `d`.
    pub fn line_within(&mut self, d: Duration) -> Option<String> {
        match self.lines.recv_timeout(d) {
            Ok(l) => {
                self.seen.push(l.clone());
                Some(l)
            }
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => {
                panic!("tt-host closed its output; so far: {:#?}", self.seen)
            }
        }
    }

    /// The lines read so far and those that have arrived meanwhile, for a
    /// failure message.
    pub fn arrived(&mut self) -> &[String] {
        self.seen.extend(self.lines.try_iter());
        &self.seen
    }

    /// Read `n` lines, which must be `count first` .. `count first+n-1`;
    /// the last count read.
    pub fn counts(&mut self, first: u64, n: u64) -> u64 {
        for k in first..first + n {
            let l = self.line();
            assert_eq!(
                l,
                format!("count {k}"),
                "unexpected line; all: {:#?}",
                self.seen
            );
        }
        first + n - 1
    }

    /// Wait (at most [`WAIT`]) for tt-host to exit by itself; how it
    /// ended.
    pub fn finish(mut self) -> Ended {
        let deadline = Instant::now() + WAIT;
        let status = loop {
            if let Some(st) = self.child.0.try_wait().expect("wait for tt-host") {
                break st;
            }
            assert!(
                Instant::now() < deadline,
                "tt-host did not exit; its lines: {:#?}",
                self.seen
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        // Both readers end at the end of their pipe, which the exit brought.
        let (stderr, stdout): (Vec<String>, Vec<String>) =
            self.lines.iter().partition(|l| l.starts_with("stderr: "));
        Ended {
            status,
            stdout,
            stderr,
        }
    }
}

/// FNV-1a 64, as the `counter` guest computes it.
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// The count the `counter` guest recorded in `sector`, or why it is not a
/// valid record.
pub fn counter_record(sector: &[u8]) -> Result<u64, String> {
    if &sector[0..8] != b"TTCOUNT1" {
        return Err(format!("no magic: {:02x?}", &sector[0..24]));
    }
    let k = u64::from_le_bytes(sector[8..16].try_into().unwrap());
    let sum = u64::from_le_bytes(sector[16..24].try_into().unwrap());
    if sum != fnv(&sector[0..16]) {
        return Err(format!("bad checksum for count {k}"));
    }
    if sector[24..].iter().any(|&b| b != 0) {
        return Err(format!("count {k}: bytes after the checksum are not zero"));
    }
    Ok(k)
}

/// The `ack N` numbers the `vblk` guest printed among `lines`.
pub fn acks(lines: &[String]) -> Vec<u64> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix("ack "))
        .filter_map(|r| r.split(' ').next()?.parse().ok())
        .collect()
}
