use super::receive::{start, Incoming};
use super::*;
use std::os::unix::net::UnixStream;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: u64 = 32 << 20;

fn frame(tag: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    v.extend_from_slice(payload);
    v
}

/// A well-formed source stream: HELLO, CONFIG, one PAGES frame with
/// `pages`, and STATE (the snapshot format's sample).
pub(crate) fn stream(pages: &[(u64, u8)]) -> Vec<u8> {
    let snap = crate::snapshot::tests::sample();
    let config = Config {
        launch: snap.launch.clone(),
        mem_size: MEM,
    };
    let mut s = frame(tag::HELLO, &hello(0));
    s.extend(frame(tag::CONFIG, &postcard::to_stdvec(&config).unwrap()));
    let mut p = Vec::new();
    for &(gpa, byte) in pages {
        p.extend_from_slice(&gpa.to_le_bytes());
        p.extend_from_slice(&[byte; PAGE]);
    }
    s.extend(frame(tag::PAGES, &p));
    let mut st = 0u32.to_le_bytes().to_vec(); // no admission entry
    st.extend(0u32.to_le_bytes()); // no devices handed over
    st.extend(crate::snapshot::encode(&snap));
    s.extend(frame(tag::STATE, &st));
    s
}

/// Run the target's side on `input`: the received memory, or the error.
fn receive(input: Vec<u8>) -> Result<(Incoming, GuestMemoryMmap, u64), String> {
    let (mut src, dst) = UnixStream::pair().unwrap();
    // The source's end stays open (returned by the writer) so that the
    // target's answers have somewhere to go.
    let w = std::thread::spawn(move || {
        let _ = src.write_all(&input);
        let _ = src.shutdown(std::net::Shutdown::Write);
        src
    });
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
    let r = start(Conn::Unix(dst)).and_then(|mut inc| {
        let a = inc.receive(Some(&mem))?;
        Ok((inc, a.pages))
    });
    let src = w.join().unwrap();
    drop(src);
    r.map(|(inc, pages)| (inc, mem, pages))
}

#[test]
fn a_well_formed_stream_fills_memory_and_brings_the_state() {
    if std::env::var_os("TT_WRITE_FUZZ_SEED").is_some() {
        std::fs::write("migration-stream", stream(&[(0x10_0000, 7)])).unwrap();
    }
    let (inc, mem, pages) = receive(stream(&[(0x10_0000, 7), (MEM - 4096, 9)])).unwrap();
    assert_eq!(pages, 2);
    assert_eq!(inc.config.mem_size, MEM);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x10_0fff)).unwrap(), 7);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(MEM - 1)).unwrap(), 9);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x20_0000)).unwrap(), 0);
}

#[test]
fn hostile_pages_are_refused_before_they_are_written() {
    for gpa in [MEM, 0x10_0001, !4095] {
        let e = receive(stream(&[(gpa, 1)])).err().unwrap();
        assert!(e.contains("outside the guest's memory"), "{gpa:#x}: {e}");
    }
}

#[test]
fn a_peer_of_another_version_or_kind_is_refused_by_name() {
    let mut s = stream(&[]);
    s[5 + 8] = 2; // HELLO's version
    let e = receive(s).err().unwrap();
    assert!(e.contains("protocol version 2"), "{e}");
    let e = receive(b"GET / HTTP/1.1\r\n\r\n".to_vec()).err().unwrap();
    assert!(
        e.contains("not a tt-host migration endpoint") || e.contains("more than allowed"),
        "{e}"
    );
    let e = receive(Vec::new()).err().unwrap();
    assert!(e.contains("migration stream"), "{e}");
}

#[test]
fn an_abort_in_place_of_state_says_the_sources_reason() {
    let mut s = frame(tag::HELLO, &hello(0));
    let snap = crate::snapshot::tests::sample();
    let config = Config {
        launch: snap.launch,
        mem_size: MEM,
    };
    s.extend(frame(tag::CONFIG, &postcard::to_stdvec(&config).unwrap()));
    s.extend(frame(tag::ABORT, b"did not converge"));
    let e = receive(s).err().unwrap();
    assert!(e.contains("the source gave up: did not converge"), "{e}");
}

#[test]
fn a_corrupt_state_is_refused_as_a_state_file_is() {
    let mut s = stream(&[]);
    let n = s.len();
    s[n - 10] ^= 0xff;
    let e = receive(s).err().unwrap();
    assert!(e.contains("the source's state"), "{e}");
}

#[test]
fn the_key_proves_both_sides_and_a_wrong_one_fails_on_both() {
    let key = b"0123456789abcdef-secret".to_vec();
    let (mut a, mut b) = UnixStream::pair().unwrap();
    let k = key.clone();
    let t = std::thread::spawn(move || auth::server(&mut a, &k));
    assert_eq!(auth::client(&mut b, &key), Ok(()));
    assert_eq!(t.join().unwrap(), Ok(()));

    let (mut a, mut b) = UnixStream::pair().unwrap();
    let t = std::thread::spawn(move || {
        let r = auth::server(&mut a, b"another key, 16+ bytes");
        drop(a);
        r
    });
    let client = auth::client(&mut b, &key);
    let server = t.join().unwrap();
    assert!(server.unwrap_err().contains("does not know the key"));
    assert!(client.unwrap_err().contains("authentication failed"));
}

#[test]
fn addresses_are_unix_paths_or_host_and_port() {
    assert_eq!(
        "/run/m.sock".parse::<Addr>(),
        Ok(Addr::Unix("/run/m.sock".into()))
    );
    assert_eq!(
        "unix:m.sock".parse::<Addr>(),
        Ok(Addr::Unix("m.sock".into()))
    );
    assert_eq!(
        "127.0.0.1:7000".parse::<Addr>(),
        Ok(Addr::Tcp("127.0.0.1:7000".into()))
    );
    assert_eq!("tcp:h:1".parse::<Addr>(), Ok(Addr::Tcp("h:1".into())));
    assert!("nonsense".parse::<Addr>().is_err());
    assert!("host:port".parse::<Addr>().is_err());
}
