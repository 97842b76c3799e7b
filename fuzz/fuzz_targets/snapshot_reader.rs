//! Fuzz the snapshot reader (`tt-host restore`'s first step) with
//! arbitrary state-file bytes: both raw, and wrapped in a valid header and
//! CRC so that the body decoder itself is reached.
//!
//! Nothing may panic; a body that decodes must encode back to a file that
//! decodes to the same snapshot.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tt_host::snapshot;

fuzz_target!(|data: &[u8]| {
    check(data);
    let mut framed = snapshot::MAGIC.to_vec();
    framed.extend_from_slice(&snapshot::VERSION.to_le_bytes());
    framed.extend_from_slice(&(data.len() as u64).to_le_bytes());
    framed.extend_from_slice(data);
    let crc = crc32fast::hash(&framed);
    framed.extend_from_slice(&crc.to_le_bytes());
    check(&framed);
});

fn check(bytes: &[u8]) {
    if let Ok(s) = snapshot::decode(bytes) {
        let again = snapshot::decode(&snapshot::encode(&s)).expect("a snapshot re-encodes");
        assert_eq!(again, s);
    }
}
