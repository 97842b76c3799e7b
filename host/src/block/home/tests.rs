use super::*;
use crate::block::journaled::Op;
use crate::block::{Backend, Request, Response};
use std::time::Duration;

/// A temporary directory, removed on drop (also after a failure).
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "tt-block-{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const SIZE: u64 = 64 << 10;

fn opts() -> JournalOptions {
    JournalOptions {
        ring_size: 1 << 20,
        backend: Options {
            journal: tt_journal::Config {
                retry_interval: Duration::from_millis(2),
                ..Default::default()
            },
            drain_stall: Duration::from_secs(5),
            first_seq: 0,
        },
    }
}

/// A temp dir with a zeroed image and a journals directory.
fn setup(name: &str) -> (TempDir, PathBuf, PathBuf) {
    let t = TempDir::new(name);
    let img = t.0.join("disk.img");
    std::fs::write(&img, vec![0u8; SIZE as usize]).unwrap();
    let journals = t.0.join("state/journals");
    (t, img, journals)
}

fn ring_of(journals: &Path, img: &Path) -> PathBuf {
    let id = Identity::of(&File::open(img).unwrap()).unwrap();
    files(journals, &id.key()).ring
}

/// Leave `ops` unapplied in the (empty) ring at `ring`, as a tt-host
/// killed before its journal applied them would.
fn leave_records(ring: &Path, ops: &[(u64, u8)]) {
    let sector = ring_sector(ring).unwrap();
    let dev = Arc::new(FileDevice::open(ring, sector).unwrap());
    let cfg = tt_journal::Config {
        retry_interval: Duration::from_millis(1),
        ..Default::default()
    };
    let j = tt_journal::Journal::<Op, _>::start(dev, cfg, |_: &[Op]| {
        Err::<(), _>("the test keeps the image out of reach")
    })
    .unwrap();
    for (i, &(offset, tag)) in ops.iter().enumerate() {
        let op = Op {
            seq: 1000 + i as u64,
            offset,
            data: Arc::from(vec![tag; 512]),
        };
        let _ = j.push(&op).unwrap();
    }
    drop(j);
}

fn file_bytes(p: &Path, at: u64, len: usize) -> Vec<u8> {
    std::fs::read(p).unwrap()[at as usize..at as usize + len].to_vec()
}

#[test]
fn a_second_open_through_any_path_is_refused() {
    let (t, img, journals) = setup("lock");
    let link = t.0.join("hard.img");
    let sym = t.0.join("sym.img");
    std::fs::hard_link(&img, &link).unwrap();
    std::os::unix::fs::symlink(&img, &sym).unwrap();
    let first = open(&journals, "disk", &img, 512, &opts()).unwrap();
    for p in [&img, &link, &sym] {
        let e = open(&journals, "disk", p, 512, &opts()).err().unwrap();
        assert!(
            matches!(e, HomeError::Locked { .. }),
            "{}: {e}",
            p.display()
        );
        assert!(e.to_string().contains("in use by another tt-host"), "{e}");
        assert!(matches!(
            open_plain("disk", p, 512).err().unwrap(),
            HomeError::Locked { .. }
        ));
    }
    let l = list(&journals).unwrap();
    assert_eq!(l.len(), 1);
    assert!(l[0].in_use);
    assert!(matches!(
        discard(&journals, &img).unwrap_err(),
        HomeError::Locked { .. }
    ));
    drop(first);
    let mut again = open(&journals, "disk", &sym, 512, &opts()).unwrap();
    again.shutdown().unwrap();
}

#[test]
fn reopening_replays_what_a_killed_run_left_in_the_journal() {
    let (_t, img, journals) = setup("replay");
    let mut b = open(&journals, "disk", &img, 512, &opts()).unwrap();
    let g = b.info().geometry;
    b.execute(Request::write(&g, 0, vec![1; 512]).unwrap())
        .unwrap();
    b.shutdown().unwrap();
    let first_run = b.next_seq();
    drop(b);
    let ring = ring_of(&journals, &img);
    leave_records(&ring, &[(512, 9), (4096, 8)]);
    let l = list(&journals).unwrap();
    assert_eq!(l[0].pending.map(|p| p.0), Some(2));
    assert_eq!(l[0].image, ImageState::Present);
    assert_eq!(file_bytes(&img, 512, 512), vec![0; 512]);
    let mut b = open(&journals, "disk", &img, 512, &opts()).unwrap();
    // Replayed before open returned (before a guest could boot).
    assert_eq!(file_bytes(&img, 512, 512), vec![9; 512]);
    assert_eq!(file_bytes(&img, 4096, 512), vec![8; 512]);
    assert_eq!(file_bytes(&img, 0, 512), vec![1; 512]);
    assert!(b.next_seq() > 1001 && b.next_seq() > first_run);
    let before = b.next_seq();
    b.shutdown().unwrap();
    drop(b);
    assert_eq!(list(&journals).unwrap()[0].pending.map(|p| p.0), Some(0));
    // The ring is empty now; the numbers still do not go back.
    let b = open(&journals, "disk", &img, 512, &opts()).unwrap();
    assert!(b.next_seq() >= before, "{} < {before}", b.next_seq());
}

#[test]
fn a_resized_image_is_refused_while_its_journal_holds_records() {
    let (_t, img, journals) = setup("resize");
    open(&journals, "disk", &img, 512, &opts())
        .unwrap()
        .shutdown()
        .unwrap();
    // An empty journal on a changed image is fine: it is re-bound.
    File::options()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(2 * SIZE)
        .unwrap();
    let mut b = open(&journals, "disk", &img, 512, &opts()).unwrap();
    assert_eq!(b.info().geometry.capacity, 2 * SIZE);
    b.shutdown().unwrap();
    drop(b);
    leave_records(&ring_of(&journals, &img), &[(1024, 5)]);
    File::options()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(SIZE)
        .unwrap();
    let e = open(&journals, "disk", &img, 512, &opts()).err().unwrap();
    let msg = e.to_string();
    assert!(
        matches!(&e, HomeError::Changed(m) if m.pending == 1),
        "{msg}"
    );
    for want in [
        img.display().to_string(),
        format!("{SIZE} bytes"),
        format!("{} bytes", 2 * SIZE),
        "tt-host journal drain".into(),
        "tt-host journal discard".into(),
    ] {
        assert!(msg.contains(&want), "{want:?} not in: {msg}");
    }
    assert_eq!(file_bytes(&img, 1024, 512), vec![0; 512], "nothing applied");
    assert_eq!(
        list(&journals).unwrap()[0].image,
        ImageState::Resized { now: SIZE }
    );
    // The user says it is the right disk: drain applies it.
    assert_eq!(drain(&journals, &img).unwrap().records, 1);
    assert_eq!(file_bytes(&img, 1024, 512), vec![5; 512]);
    let mut b = open(&journals, "disk", &img, 512, &opts()).unwrap();
    b.shutdown().unwrap();
}

#[test]
fn a_replaced_image_is_refused_and_discard_clears_its_journal() {
    let (t, img, journals) = setup("replace");
    open(&journals, "disk", &img, 512, &opts())
        .unwrap()
        .shutdown()
        .unwrap();
    leave_records(&ring_of(&journals, &img), &[(0, 3)]);
    // Another file (another inode) takes the image's name.
    let other = t.0.join("new.img");
    std::fs::write(&other, vec![0u8; SIZE as usize]).unwrap();
    std::fs::rename(&other, &img).unwrap();
    let e = open(&journals, "disk", &img, 512, &opts()).err().unwrap();
    let msg = e.to_string();
    assert!(
        matches!(&e, HomeError::Changed(m) if m.pending == 1),
        "{msg}"
    );
    assert!(msg.contains("tt-host journal discard"), "{msg}");
    assert!(matches!(
        list(&journals).unwrap()[0].image,
        ImageState::Replaced { .. }
    ));
    assert!(matches!(
        drain(&journals, &img).unwrap_err(),
        HomeError::Changed(_)
    ));
    assert_eq!(file_bytes(&img, 0, 512), vec![0; 512], "never applied");
    // The new file gets a journal of its own (as a run on it with an
    // empty journal would leave); discard still finds the one with the
    // writes the refusal named.
    let new_ring = ring_of(&journals, &img);
    create_ring(&new_ring, 1 << 20, 512).unwrap();
    assert_eq!(list(&journals).unwrap().len(), 2);
    let found = find(&journals, &img).unwrap().unwrap();
    assert_eq!(found.pending.unwrap().0, 1);
    assert_ne!(found.ring, new_ring);
    assert_eq!(discard(&journals, &img).unwrap().records, 1);
    assert_eq!(list(&journals).unwrap().len(), 1);
    assert_eq!(find(&journals, &img).unwrap().unwrap().ring, new_ring);
    let mut b = open(&journals, "disk", &img, 512, &opts()).unwrap();
    b.shutdown().unwrap();
    assert_eq!(file_bytes(&img, 0, 512), vec![0; 512]);
}

#[test]
fn a_journal_whose_image_is_gone_is_listed_so_and_can_be_discarded() {
    let (_t, img, journals) = setup("missing");
    let mut b = open(&journals, "disk", &img, 4096, &opts()).unwrap();
    b.shutdown().unwrap();
    drop(b);
    let l = list(&journals).unwrap();
    assert_eq!(l[0].image, ImageState::Present);
    let meta = l[0].meta.clone().unwrap();
    assert_eq!(
        meta.path,
        std::fs::canonicalize(&img).unwrap().display().to_string()
    );
    assert_eq!(meta.size, SIZE);
    assert_eq!(ring_sector(&l[0].ring).unwrap(), 4096);
    std::fs::remove_file(&img).unwrap();
    assert_eq!(list(&journals).unwrap()[0].image, ImageState::Missing);
    assert_eq!(discard(&journals, &img).unwrap().records, 0);
    assert!(list(&journals).unwrap().is_empty());
    assert!(matches!(
        discard(&journals, &img).unwrap_err(),
        HomeError::NoJournal { .. }
    ));
}

#[test]
fn the_plain_backend_serves_and_flushes_a_locked_image() {
    let (_t, img, _) = setup("plain");
    let mut b = open_plain("disk", &img, 512).unwrap();
    let g = b.info().geometry;
    assert_eq!(g.capacity, SIZE);
    b.execute(Request::write(&g, 512, vec![6; 1024]).unwrap())
        .unwrap();
    assert_eq!(
        b.execute(Request::read(&g, 1024, 512).unwrap()).unwrap(),
        Response::Read(vec![6; 512])
    );
    assert_eq!(b.execute(Request::Flush).unwrap(), Response::Flushed);
    assert_eq!(file_bytes(&img, 512, 1024), vec![6; 1024]);
    assert!(matches!(
        open_plain("disk", &img, 4096 * 32).err().unwrap(),
        HomeError::Locked { .. }
    ));
    b.shutdown().unwrap();
    drop(b);
    assert!(matches!(
        open_plain("disk", &img, 3000).err().unwrap(),
        HomeError::Size { .. }
    ));
}

/// Opening a new image removes the empty journals of images that are
/// gone, and keeps one that still holds writes, and every journal whose
/// image is there.
#[test]
fn a_new_journal_clears_empty_journals_of_images_that_are_gone() {
    let (t, img, journals) = setup("stale");
    let other = t.0.join("other.img");
    let kept = t.0.join("kept.img");
    let pending = t.0.join("pending.img");
    // Made now, so that it cannot take the inode of a removed image.
    let fresh = t.0.join("fresh.img");
    for p in [&other, &kept, &pending, &fresh] {
        std::fs::write(p, vec![0u8; SIZE as usize]).unwrap();
    }
    for p in [&img, &other, &kept, &pending] {
        let mut b = open(&journals, "disk", p, 512, &opts()).unwrap();
        b.shutdown().unwrap();
    }
    leave_records(&ring_of(&journals, &pending), &[(0, 7)]);
    let other_ring = ring_of(&journals, &other);
    std::fs::remove_file(&img).unwrap();
    std::fs::remove_file(&other).unwrap();
    std::fs::remove_file(&pending).unwrap();
    assert_eq!(list(&journals).unwrap().len(), 4);

    // Reopening an image that has its journal removes nothing.
    let mut b = open(&journals, "disk", &kept, 512, &opts()).unwrap();
    b.shutdown().unwrap();
    drop(b);
    assert_eq!(list(&journals).unwrap().len(), 4);

    let mut b = open(&journals, "disk", &fresh, 512, &opts()).unwrap();
    b.shutdown().unwrap();
    drop(b);
    let left = list(&journals).unwrap();
    let paths: Vec<String> = left
        .iter()
        .map(|e| e.meta.as_ref().unwrap().path.clone())
        .collect();
    assert_eq!(left.len(), 3, "{paths:?}");
    assert!(!other_ring.exists());
    let missing: Vec<_> = left
        .iter()
        .filter(|e| e.image == ImageState::Missing)
        .collect();
    assert_eq!(missing.len(), 1, "{paths:?}");
    assert_eq!(
        missing[0].pending.map(|p| p.0),
        Some(1),
        "the one with a write stays"
    );
}

/// An image given as a descriptor (`--block:NAME=@FD`) is the same image
/// as by its path: the same lock, the same journal (keyed by what fstat
/// says), recorded under its path, replayed whichever way it comes next.
#[test]
fn an_image_given_as_a_descriptor_is_locked_and_journaled_as_its_path() {
    let (_t, img, journals) = setup("fd");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    let fd = f.as_raw_fd();
    let locked = lock_image_fd(fd).unwrap();
    let canonical = std::fs::canonicalize(&img).unwrap();
    assert_eq!(
        locked.path.display().to_string(),
        format!("fd {fd} ({})", canonical.display())
    );
    let mut b = open_image(&journals, "disk", locked, 512, &opts()).unwrap();
    let e = open(&journals, "disk", &img, 512, &opts()).err().unwrap();
    assert!(matches!(e, HomeError::Locked { .. }), "{e}");
    let g = b.info().geometry;
    b.execute(Request::write(&g, 0, vec![7; 512]).unwrap())
        .unwrap();
    b.shutdown().unwrap();
    drop(b);
    let l = list(&journals).unwrap();
    assert_eq!(l.len(), 1);
    assert_eq!(
        l[0].meta.as_ref().map(|m| m.path.clone()),
        Some(canonical.display().to_string())
    );
    leave_records(&ring_of(&journals, &img), &[(1024, 5)]);
    drop(f);
    let _b = open(&journals, "disk", &img, 512, &opts()).unwrap();
    assert_eq!(file_bytes(&img, 0, 512), vec![7; 512]);
    assert_eq!(file_bytes(&img, 1024, 512), vec![5; 512]);
}
