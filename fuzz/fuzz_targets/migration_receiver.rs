//! Fuzz the target side of a live migration with an arbitrary stream
//! from a hostile source: HELLO, CONFIG, PAGES and STATE as
//! `tt-host migrate-receive` reads them, into 8 MiB of guest memory.
//!
//! Nothing may panic or hang: every frame is bounded, every page address
//! checked, every state decoded as a state file.

#![no_main]

use libfuzzer_sys::fuzz_target;
use std::io::Write;
use std::os::unix::net::UnixStream;
use tt_host::migration::{receive, Conn};
use vm_memory::{GuestAddress, GuestMemoryMmap};

fuzz_target!(|data: &[u8]| {
    let (mut source, target) = UnixStream::pair().expect("socketpair");
    let input = data.to_vec();
    // The source writes the stream and closes; the target's answers
    // (HELLO, READY) are read and dropped by the kernel's buffer.
    let writer = std::thread::spawn(move || {
        let _ = source.write_all(&input);
        let _ = source.shutdown(std::net::Shutdown::Write);
        // Keep the socket open until the target is done reading.
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut source, &mut sink);
    });
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
    if let Ok(mut incoming) = receive::start(Conn::Unix(target)) {
        let copied = (!incoming.memfd_mode).then_some(&mem);
        if let Ok(a) = incoming.receive(copied) {
            assert_eq!(a.snapshot.mem_size, incoming.config.mem_size);
        }
    }
    writer.join().unwrap();
});
