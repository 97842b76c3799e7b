//! Fuzz the daemon's request decoder with arbitrary bytes on a
//! connection: frames (4-byte big-endian length, JSON body) read as the
//! daemon reads them, each decoded and vetted as the daemon does before
//! it touches any state.
//!
//! Nothing may panic or allocate beyond the frame limit; a request that
//! decodes must encode back to one that decodes the same (the client and
//! the daemon agree on every request either can make), and vetting must
//! give a verdict, never a panic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use std::io::Cursor;
use tt_host::daemon::proto::{self, FrameError};
use tt_host::daemon::server;

fuzz_target!(|data: &[u8]| {
    // The whole input as one body, as a daemon reads a frame's body.
    check_body(data);
    // And as a stream of frames.
    let mut r = Cursor::new(data);
    for _ in 0..64 {
        match proto::read_frame(&mut r) {
            Ok(Some(body)) => {
                assert!(body.len() <= proto::MAX_FRAME);
                check_body(&body);
            }
            Ok(None) | Err(FrameError::Io(_)) | Err(FrameError::TooLong(_)) => break,
        }
    }
});

fn check_body(body: &[u8]) {
    if let Ok(req) = proto::decode_request(body) {
        let framed = proto::encode(&req);
        let again = proto::decode_request(&framed[4..]).expect("a request encodes to a request");
        assert_eq!(again, req);
        let _ = server::vet(&req.op);
    }
}
