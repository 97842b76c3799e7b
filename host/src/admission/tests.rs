//! Tests of the state directory: admission, policies, reaping, and hostile
//! contents.

use super::host::physical_memory_mb;
use super::store::*;
use super::*;
use crate::resources::Resource;

fn scratch(tag: &str) -> StateDir {
    let d = std::env::temp_dir().join(format!("tt-admission-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    StateDir::resolve(Some(&d))
}

fn uk(mem: u64) -> Unikernel {
    Unikernel {
        memory_mb: mem,
        cpus: host_cpus(),
        block_mb: 0,
        bridges: BTreeSet::new(),
    }
}

/// An entry whose pid is nobody here (above the kernel's pid_max),
/// with lock file `lock` (None: an entry from before lock files).
fn gone(name: &str, lock: Option<&str>) -> Running {
    Running {
        name: name.into(),
        pid: 1 << 23,
        start: 1,
        resources: uk(8),
        lock: lock.map(Into::into),
        in_file: false,
    }
}

/// Store `entries` as running, as other tt-host processes would.
fn store(sd: &StateDir, entries: impl IntoIterator<Item = Running>) {
    let mut st = sd.lock().unwrap();
    st.stored.running.extend(entries);
    st.save().unwrap();
}

#[test]
fn admissions_persist_and_release_on_drop() {
    let sd = scratch("persist");
    let alice: Path = "alice".parse().unwrap();
    sd.set_policy(
        &alice,
        &PolicyChange {
            set: PartialPolicy {
                unikernels: Some(1),
                ..PartialPolicy::default()
            },
            ..PolicyChange::default()
        },
    )
    .unwrap();
    let name: Name = "alice:a".parse().unwrap();
    let a = sd.admit(Some(&name), "x", uk(8)).unwrap();
    let other: Name = "alice:b".parse().unwrap();
    let e = sd.admit(Some(&other), "x", uk(8)).unwrap_err();
    assert!(e.to_string().contains("alice: unikernels: limit 1"), "{e}");
    drop(a);
    let b = sd.admit(Some(&other), "x", uk(8)).unwrap();
    let shown = sd.show(&Path::root()).unwrap();
    assert!(shown.contains('b') && !shown.contains(" a "), "{shown}");
    drop(b);
    std::fs::remove_dir_all(sd.path()).unwrap();
}

/// A launch and its exit touch only the entry's own file: state.json
/// (policies) is neither rewritten nor synced, yet other readers see
/// the entry while it runs and not after.
#[test]
fn a_launch_leaves_state_json_alone() {
    use std::os::unix::fs::MetadataExt;
    let sd = scratch("nosync");
    let alice: Path = "alice".parse().unwrap();
    let one = PolicyChange {
        set: PartialPolicy {
            unikernels: Some(1),
            ..PartialPolicy::default()
        },
        ..PolicyChange::default()
    };
    sd.set_policy(&alice, &one).unwrap();
    let state = sd.path().join(STATE_FILE);
    let before = (
        std::fs::read(&state).unwrap(),
        state.metadata().unwrap().ino(),
    );
    let name: Name = "alice:a".parse().unwrap();
    let a = sd.admit(Some(&name), "x", uk(8)).unwrap();
    let other = StateDir::resolve(Some(sd.path()));
    let shown = other.show(&Path::root()).unwrap();
    assert!(
        shown.contains("unikernels 1/1") && shown.contains("running"),
        "{shown}"
    );
    let e = other.admit(Some(&"alice:b".parse().unwrap()), "x", uk(8));
    assert!(e.unwrap_err().to_string().contains("limit 1, in use 1"));
    drop(a);
    let shown = other.show(&Path::root()).unwrap();
    assert!(
        shown.contains("unikernels 0/1") && !shown.contains("running"),
        "{shown}"
    );
    let after = (
        std::fs::read(&state).unwrap(),
        state.metadata().unwrap().ino(),
    );
    assert_eq!(before, after, "state.json was rewritten");
    let files = std::fs::read_dir(sd.path().join(RUNNING_DIR))
        .unwrap()
        .count();
    assert_eq!(files, 0, "the entry file is removed at exit");
    std::fs::remove_dir_all(sd.path()).unwrap();
}

#[test]
fn unnamed_launches_get_unique_names() {
    let sd = scratch("unique");
    let a = sd.admit(None, "hello.hvt", uk(8)).unwrap();
    let b = sd.admit(None, "hello.hvt", uk(8)).unwrap();
    assert_eq!(a.name().to_string(), "hello.hvt");
    assert_eq!(b.name().to_string(), "hello.hvt.2");
    let weird = sd.admit(None, "my image!", uk(8)).unwrap();
    assert_eq!(weird.name().to_string(), "my-image-");
    drop((a, b, weird));
    std::fs::remove_dir_all(sd.path()).unwrap();
}

#[test]
fn entries_of_dead_processes_are_reaped() {
    let sd = scratch("reap");
    let root = Path::root();
    sd.set_policy(
        &root,
        &PolicyChange {
            set: PartialPolicy {
                unikernels: Some(1),
                ..PartialPolicy::default()
            },
            ..PolicyChange::default()
        },
    )
    .unwrap();
    // An entry left by a process that is gone (a pid that cannot be
    // running: above the kernel's pid_max).
    store(&sd, [gone("ghost", None)]);
    let a = sd.admit(None, "live", uk(8)).unwrap();
    assert!(!sd.show(&root).unwrap().contains("ghost"));
    drop(a);
    std::fs::remove_dir_all(sd.path()).unwrap();
}

#[test]
fn an_empty_state_dir_variable_means_the_default_not_the_current_dir() {
    let given = FsPath::new("/given");
    let resolve = |env: Option<&str>| StateDir::resolve_from(None, env.map(Into::into)).dir;
    assert_eq!(resolve(Some("")), PathBuf::from(DEFAULT_STATE_DIR));
    assert_eq!(resolve(None), PathBuf::from(DEFAULT_STATE_DIR));
    assert_eq!(resolve(Some("/env")), PathBuf::from("/env"));
    let d = StateDir::resolve_from(Some(given), Some("/env".into())).dir;
    assert_eq!(d, given, "--state-dir wins over the variable");
}

/// Removing the root policy goes back to the host's resources only if
/// what is stored fits in them as they are; the host default is not
/// widened to make it fit (which let everything below exceed the
/// host).
#[test]
fn removing_the_root_policy_refuses_what_the_host_cannot_hold() {
    let sd = scratch("unroot");
    let huge = physical_memory_mb().saturating_mul(4).max(1);
    let set = |path: &str, mem| {
        sd.set_policy(
            &path.parse().unwrap(),
            &PolicyChange {
                set: PartialPolicy {
                    memory_mb: Some(mem),
                    ..PartialPolicy::default()
                },
                ..PolicyChange::default()
            },
        )
    };
    set(":", huge).unwrap();
    set("alice", huge).unwrap();
    let e = sd.remove_policy(&Path::root()).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("cannot go back to the host's resources")
            && msg.contains("the stored policy at alice"),
        "{msg}"
    );
    // Nothing changed: the root policy is still there.
    assert!(!sd
        .show(&Path::root())
        .unwrap()
        .contains("the host's resources"));
    // Once alice fits in the host, the root can go back to it.
    set("alice", 1).unwrap();
    sd.remove_policy(&Path::root()).unwrap();
    assert!(sd
        .show(&Path::root())
        .unwrap()
        .contains("the host's resources"));
    std::fs::remove_dir_all(sd.path()).unwrap();
}

/// The root's CPUs are the host's, not this process's affinity: a
/// `policy set` under `taskset -c 0` must not shrink the root to CPU 0.
#[test]
fn the_host_default_has_the_online_cpus_whatever_the_affinity() {
    let online = online_cpus();
    // SAFETY: cpu_set_t is plain data; the calls read/write one set
    // for this thread (pid 0).
    unsafe {
        let mut saved: libc::cpu_set_t = std::mem::zeroed();
        let size = std::mem::size_of::<libc::cpu_set_t>();
        assert_eq!(libc::sched_getaffinity(0, size, &mut saved), 0);
        let mut only0: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(*online.first().unwrap() as usize, &mut only0);
        assert_eq!(libc::sched_setaffinity(0, size, &only0), 0);
        let cpus = host_policy().cpus;
        assert_eq!(libc::sched_setaffinity(0, size, &saved), 0);
        assert_eq!(cpus, online);
    }
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert!(online.len() >= n, "{online:?} vs {n} CPUs");
}

/// Stored numbers are input too: block sizes that add up past u64
/// are refused as a bad state, not an overflow (a panic in debug).
#[test]
fn stored_block_use_that_overflows_is_a_bad_state() {
    let sd = scratch("overflow");
    // Entries of a live process (this one), so they are not reaped.
    store(
        &sd,
        [("a", u64::MAX), ("b", 1)].map(|(name, block_mb)| Running {
            pid: std::process::id(),
            start: own_start_time(),
            resources: Unikernel { block_mb, ..uk(8) },
            ..gone(name, None)
        }),
    );
    let e = sd.show(&Path::root()).unwrap_err();
    assert!(e.to_string().contains("past 2^64 MB"), "{e}");
    let e = sd.admit(None, "x", uk(8)).unwrap_err();
    assert!(e.to_string().contains("past 2^64 MB"), "{e}");
    // With a root policy set, the tree's own checks refuse it.
    let mut st = sd.lock().unwrap();
    st.stored.root = Some(host_policy().into());
    st.save().unwrap();
    drop(st);
    let e = sd.show(&Path::root()).unwrap_err();
    assert!(matches!(e, AdmitError::BadState { .. }), "{e}");
    std::fs::remove_dir_all(sd.path()).unwrap();
}

#[test]
fn a_state_file_that_is_not_a_regular_file_is_refused_not_read() {
    let sd = scratch("fifo");
    std::fs::create_dir_all(sd.path()).unwrap();
    let fifo = std::ffi::CString::new(
        sd.path()
            .join(STATE_FILE)
            .into_os_string()
            .into_encoded_bytes(),
    )
    .unwrap();
    // SAFETY: mkfifo reads a NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    // Reading it would block until a writer comes: never.
    let e = sd.show(&Path::root()).unwrap_err();
    assert!(
        e.to_string().contains("state.json is not a regular file"),
        "{e}"
    );
    std::fs::remove_dir_all(sd.path()).unwrap();
}

/// Whether an entry still runs is its lock file's flock, not its pid:
/// an entry whose process id means nothing here (another PID
/// namespace, another /proc) stays while its file is held, and goes
/// once it is not (its process was killed: the kernel dropped the lock).
#[test]
fn entries_live_while_their_lock_is_held_whatever_their_pid() {
    let sd = scratch("flock");
    sd.set_policy(
        &Path::root(),
        &PolicyChange {
            set: PartialPolicy {
                unikernels: Some(2),
                ..PartialPolicy::default()
            },
            ..PolicyChange::default()
        },
    )
    .unwrap();
    let running = sd.path().join(RUNNING_DIR);
    // One entry as another namespace's tt-host writes it: a pid that
    // is nobody here, its file locked (by this test, standing in for
    // that process).
    std::fs::create_dir_all(&running).unwrap();
    let held = File::create(running.join("8388608-1-0.lock")).unwrap();
    assert!(try_flock(&held));
    // One left by a killed process: its file exists, nobody holds it.
    File::create(running.join("8388608-1-1.lock")).unwrap();
    store(
        &sd,
        [
            gone("foreign", Some("8388608-1-0.lock")),
            gone("killed", Some("8388608-1-1.lock")),
        ],
    );
    let a = sd.admit(None, "live", uk(8)).unwrap();
    let shown = sd.show(&Path::root()).unwrap();
    assert!(
        shown.contains("foreign") && !shown.contains("killed"),
        "{shown}"
    );
    assert!(
        !running.join("8388608-1-1.lock").exists(),
        "a reaped entry's file is removed"
    );
    // The limit of 2 is reached: foreign + live.
    let e = sd.admit(None, "third", uk(8)).unwrap_err();
    assert!(e.to_string().contains("unikernels: limit 2"), "{e}");
    // The foreign process ends: its entry is reaped, its slot free.
    drop(held);
    let b = sd.admit(None, "third", uk(8)).unwrap();
    drop((a, b));
    let left = std::fs::read_dir(&running).unwrap().count();
    assert_eq!(left, 0, "released entries remove their files");
    std::fs::remove_dir_all(sd.path()).unwrap();
}

/// A lock file name comes from state.json and a reaped entry's file
/// is deleted: one that is a path outside running/ is a bad state,
/// never opened or removed.
#[test]
fn a_stored_lock_name_that_is_a_path_is_refused() {
    let sd = scratch("lockpath");
    let victim = sd.path().join("victim");
    store(&sd, [gone("x", Some("../victim"))]);
    std::fs::write(&victim, b"keep me").unwrap();
    let e = sd.admit(None, "y", uk(8)).unwrap_err();
    assert!(e.to_string().contains("not a file name"), "{e}");
    assert_eq!(std::fs::read(&victim).unwrap(), b"keep me");
    std::fs::remove_dir_all(sd.path()).unwrap();
}

#[test]
fn a_garbled_state_file_is_an_error_naming_it() {
    let sd = scratch("garbled");
    std::fs::create_dir_all(sd.path()).unwrap();
    std::fs::write(sd.path().join(STATE_FILE), b"{\"version\": 1, \"root\": 7").unwrap();
    let e = sd.admit(None, "x", uk(8)).unwrap_err();
    assert!(e.to_string().contains("state.json does not parse"), "{e}");
    std::fs::remove_dir_all(sd.path()).unwrap();
}

/// Make a FIFO at `path`.
fn mkfifo(path: &FsPath) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mkfifo reads a NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

/// Run `f` on a thread; its result, or a failure if it takes longer
/// than 20 s (it hangs: the thread is left blocked).
fn within<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(20))
        .expect("hangs")
}

/// An entry's file in running/ that is a FIFO (put there by hand, or
/// by a hostile user of the directory) must not block the reaper,
/// which holds the state lock: every tt-host would wait behind it.
#[test]
fn a_fifo_in_running_does_not_hang_the_reaper() {
    let sd = scratch("lockfifo");
    std::fs::create_dir_all(sd.path().join(RUNNING_DIR)).unwrap();
    mkfifo(&sd.path().join(RUNNING_DIR).join("x.lock"));
    store(&sd, [gone("x", Some("x.lock"))]);
    let sd2 = sd.clone();
    let shown = within(move || sd2.show(&Path::root())).unwrap();
    // Not a file tt-host made: the entry counts as live (fail closed)
    // and the FIFO is left alone.
    assert!(shown.contains("x"), "{shown}");
    assert!(sd.path().join(RUNNING_DIR).join("x.lock").exists());
    std::fs::remove_dir_all(sd.path()).unwrap();
}

/// A `state.json.tmp` left behind (a crash, another user) is replaced,
/// never written through: not into a symlink's target, not into a FIFO
/// (which blocks until a reader comes: never).
#[test]
fn a_leftover_temporary_state_file_is_replaced_not_written_through() {
    let sd = scratch("tmplink");
    std::fs::create_dir_all(sd.path()).unwrap();
    let victim = sd.path().join("victim");
    std::fs::write(&victim, b"keep me").unwrap();
    let tmp = sd.path().join(format!("{STATE_FILE}.tmp"));
    std::os::unix::fs::symlink(&victim, &tmp).unwrap();
    let one = PolicyChange {
        set: PartialPolicy {
            unikernels: Some(1),
            ..PartialPolicy::default()
        },
        ..PolicyChange::default()
    };
    sd.set_policy(&"alice".parse().unwrap(), &one).unwrap();
    assert_eq!(std::fs::read(&victim).unwrap(), b"keep me");
    let state = sd.path().join(STATE_FILE);
    assert!(std::fs::symlink_metadata(&state).unwrap().is_file());
    assert!(sd.show(&Path::root()).unwrap().contains("alice"));

    mkfifo(&tmp);
    let sd2 = sd.clone();
    within(move || sd2.set_policy(&"bob".parse().unwrap(), &one)).unwrap();
    assert!(sd.show(&Path::root()).unwrap().contains("bob"));
    std::fs::remove_dir_all(sd.path()).unwrap();
}

/// A stored policy path that spells the root ("", ":", "(root)") would
/// silently replace the root policy, and a path listed twice would
/// keep whichever comes last: both are a bad state naming state.json.
#[test]
fn a_stored_policy_at_the_root_or_listed_twice_is_a_bad_state() {
    for (key, again) in [("", None), (":", None), ("(root)", None), ("a", Some("a"))] {
        let sd = scratch("rootkey");
        let pol: PartialPolicy = host_policy().into();
        let mut st = sd.lock().unwrap();
        st.stored.policies.push((key.into(), pol.clone()));
        if let Some(k) = again {
            st.stored.policies.push((k.into(), pol.clone()));
        }
        st.save().unwrap();
        drop(st);
        let e = sd.show(&Path::root()).unwrap_err();
        assert!(matches!(e, AdmitError::BadState { .. }), "{key:?}: {e}");
        let msg = e.to_string();
        assert!(msg.contains("state.json"), "{key:?}: {msg}");
        std::fs::remove_dir_all(sd.path()).unwrap();
    }
}

/// Every message about an impossible stored tree names state.json.
#[test]
fn stored_inconsistencies_name_the_state_file() {
    let sd = scratch("inconsistent");
    let alive = |name: &str| Running {
        pid: std::process::id(),
        start: own_start_time(),
        ..gone(name, None)
    };
    store(&sd, [alive("a"), alive("a")]);
    let e = sd.show(&Path::root()).unwrap_err();
    assert!(
        e.to_string()
            .contains("state.json: the running unikernel a"),
        "{e}"
    );
    let mut st = sd.lock().unwrap();
    st.stored.running = vec![alive("a::b")];
    st.save().unwrap();
    drop(st);
    let e = sd.show(&Path::root()).unwrap_err();
    assert!(
        e.to_string().contains("state.json: stored unikernel name"),
        "{e}"
    );
    std::fs::remove_dir_all(sd.path()).unwrap();
}

/// The name of an entry's file in running/ is its process id and start
/// time; a tt-host in another PID namespace can have both. A file of
/// that name held by someone else is no reason to refuse the launch.
#[test]
fn an_entry_file_name_held_by_another_process_is_skipped() {
    let sd = scratch("collide");
    let running = sd.path().join(RUNNING_DIR);
    std::fs::create_dir_all(&running).unwrap();
    let (pid, start) = (std::process::id(), own_start_time());
    let next = ENTRY_N.load(std::sync::atomic::Ordering::Relaxed);
    let held: Vec<File> = (next..next + 64)
        .map(|n| {
            let f = File::create(running.join(format!("{pid}-{start}-{n}.lock"))).unwrap();
            assert!(try_flock(&f));
            f
        })
        .collect();
    let a = sd.admit(None, "x", uk(8)).unwrap();
    drop(a);
    drop(held);
    std::fs::remove_dir_all(sd.path()).unwrap();
}

/// Releasing removes this admission's own entry, the one on its file,
/// not another entry of the same name, pid and start time (another
/// PID namespace's tt-host, admitted after this entry was reaped).
#[test]
fn release_removes_only_its_own_entry() {
    let sd = scratch("release");
    let name: Name = "web".parse().unwrap();
    let a = sd.admit(Some(&name), "x", uk(8)).unwrap();
    let running = sd.path().join(RUNNING_DIR);
    let held = File::create(running.join("foreign.lock")).unwrap();
    assert!(try_flock(&held));
    let mut st = sd.lock().unwrap();
    st.stored.running = vec![Running {
        pid: std::process::id(),
        start: own_start_time(),
        ..gone("web", Some("foreign.lock"))
    }];
    st.save().unwrap();
    drop(st);
    drop(a);
    let shown = sd.show(&Path::root()).unwrap();
    assert!(shown.contains("web"), "the foreign entry stays: {shown}");
    drop(held);
    std::fs::remove_dir_all(sd.path()).unwrap();
}

/// Two entries on one lock file: releasing either deletes the file, and
/// the other, still running, would then be reaped. A bad state.
#[test]
fn two_entries_on_one_lock_file_are_a_bad_state() {
    let sd = scratch("sharedlock");
    store(&sd, [gone("a", Some("x.lock")), gone("b", Some("x.lock"))]);
    let e = sd.admit(None, "y", uk(8)).unwrap_err();
    assert!(
        e.to_string()
            .contains("state.json: lock file \"x.lock\" is listed for two running unikernels"),
        "{e}"
    );
    std::fs::remove_dir_all(sd.path()).unwrap();
}

/// Admissions at once contend on the state lock's flock (each opens
/// the lock file itself, as separate processes do): under a policy of
/// five, sixteen at once admit exactly five, and the refusals name the
/// policy and the numbers.
#[test]
fn admissions_at_once_never_share_the_last_slot() {
    let sd = scratch("race");
    let five = PolicyChange {
        set: PartialPolicy {
            unikernels: Some(5),
            ..PartialPolicy::default()
        },
        ..PolicyChange::default()
    };
    sd.set_policy(&"alice".parse().unwrap(), &five).unwrap();
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(16));
    let threads: Vec<_> = (0..16)
        .map(|i| {
            let (sd, barrier) = (sd.clone(), barrier.clone());
            std::thread::spawn(move || {
                let name: Name = format!("alice:u{i}").parse().unwrap();
                barrier.wait();
                sd.admit(Some(&name), "x", uk(8))
            })
        })
        .collect();
    let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let admitted = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(admitted, 5);
    for e in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(
            e.to_string(),
            "refused: alice: unikernels: limit 5, in use 5, requested 1"
        );
    }
    drop(results);
    assert!(!sd.show(&Path::root()).unwrap().contains("alice:u"));
    std::fs::remove_dir_all(sd.path()).unwrap();
}

/// The host as `host_policy` sees it, with bridges `b`.
fn host_with(b: &[&str]) -> Policy {
    Policy {
        bridges: b.iter().map(|s| s.to_string()).collect(),
        ..host_policy()
    }
}

/// 8 MB pinned to CPU 0, attached to `bridge`.
fn on(bridge: &str) -> Unikernel {
    Unikernel {
        bridges: [bridge.to_string()].into(),
        cpus: [0].into(),
        ..uk(8)
    }
}

/// The issue's case: `policy set alice --unikernels 2 --mem 1024` on a host
/// with no TAP yet, then a TAP is made. alice's bridges and block limit
/// were copied from the host at that moment ("bridges none") and every
/// launch on the new TAP was refused. Now they are not stored, shown as
/// inherited, and the TAP is open to alice at the next launch.
#[test]
fn fields_left_out_of_policy_set_follow_the_host() {
    let sd = scratch("inherit");
    let alice: Path = "alice".parse().unwrap();
    let change = PolicyChange {
        set: PartialPolicy {
            unikernels: Some(2),
            memory_mb: Some(1024),
            ..PartialPolicy::default()
        },
        ..PolicyChange::default()
    };
    sd.set_policy(&alice, &change).unwrap();
    let stored = std::fs::read_to_string(sd.path().join(STATE_FILE)).unwrap();
    let json: serde_json::Value = serde_json::from_str(&stored).unwrap();
    assert_eq!(
        json["policies"][0][1],
        serde_json::json!({"unikernels": 2, "memory_mb": 1024}),
        "only what was given is stored: {stored}"
    );
    let shown = sd.show(&alice).unwrap();
    assert!(
        shown.contains("memory 0/1024 MB  block 0/unlimited MB (inherited from the host)")
            && shown.contains(" (inherited from the host)\n"),
        "{shown}"
    );
    let web: Name = "alice:web".parse().unwrap();
    let st = sd.lock().unwrap();
    // Before the TAP: refused at the root, not at alice.
    let before = st.build_tree(host_with(&[]), false).unwrap();
    let e = before.check(&web, &on("tap7")).unwrap_err();
    assert_eq!(
        e.to_string(),
        "(root): bridge tap7 not in allowed bridges none"
    );
    // After: admitted, with alice's own limits still in force.
    let after = st.build_tree(host_with(&["tap7"]), false).unwrap();
    after.check(&web, &on("tap7")).unwrap();
    assert_eq!(after.find_policy(&alice).unwrap().memory_mb, 1024);
    drop(st);
    std::fs::remove_dir_all(sd.path()).unwrap();
}

/// A policy stored by an older tt-host, with the host's bridges and free
/// disk of that moment copied into it, still loads as it was (refusing
/// the new TAP), and `--bridges inherit --block inherit` mends it.
#[test]
fn inherit_mends_a_policy_stored_with_copied_values() {
    let sd = scratch("mend");
    std::fs::create_dir_all(sd.path()).unwrap();
    let old = r#"{"version":1,"root":null,"policies":[["alice",
        {"unikernels":2,"memory_mb":1024,"cpus":[0],"block_mb":79899,"bridges":[]}]],
        "running":[]}"#;
    std::fs::write(sd.path().join(STATE_FILE), old).unwrap();
    let alice: Path = "alice".parse().unwrap();
    let web: Name = "alice:web".parse().unwrap();
    let shown = sd.show(&alice).unwrap();
    assert!(
        shown.contains("block 0/79899 MB  cpus 0  bridges none\n"),
        "{shown}"
    );
    let st = sd.lock().unwrap();
    let e = st
        .build_tree(host_with(&["tap7"]), false)
        .unwrap()
        .check(&web, &on("tap7"))
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "alice: bridge tap7 not in allowed bridges none"
    );
    drop(st);
    let mend = PolicyChange {
        inherit: [Resource::Bridges, Resource::Block].into(),
        ..PolicyChange::default()
    };
    sd.set_policy(&alice, &mend).unwrap();
    let st = sd.lock().unwrap();
    let tree = st.build_tree(host_with(&["tap7"]), false).unwrap();
    tree.check(&web, &on("tap7")).unwrap();
    let set = tree.find_set_fields(&alice).unwrap();
    assert_eq!((set.unikernels, set.bridges.as_ref()), (Some(2), None));
    assert_eq!(set.block_mb, None);
    drop(st);
    std::fs::remove_dir_all(sd.path()).unwrap();
}

/// The root's block limit is not the state directory's free space (none on
/// a FUSE mount, little on a small /var): unlimited unless a policy sets
/// one.
#[test]
fn the_roots_default_block_limit_is_unlimited() {
    assert_eq!(host_policy().block_mb, Some(u64::MAX));
    let sd = scratch("blockroot");
    let disk = Unikernel {
        block_mb: 1 << 40,
        ..uk(8)
    };
    let a = sd.admit(None, "disk", disk.clone()).unwrap();
    let shown = sd.show(&Path::root()).unwrap();
    assert!(
        shown.contains(&format!("block {}/unlimited MB (host)", 1u64 << 40)),
        "{shown}"
    );
    drop(a);
    // A policy that sets one bounds it.
    let two = PolicyChange {
        set: PartialPolicy {
            block_mb: Some(Some(2)),
            ..PartialPolicy::default()
        },
        ..PolicyChange::default()
    };
    sd.set_policy(&Path::root(), &two).unwrap();
    let e = sd.admit(None, "disk", disk).unwrap_err();
    assert!(
        e.to_string()
            .contains("(root): block: limit 2 MB, in use 0 MB, requested 1099511627776 MB"),
        "{e}"
    );
    std::fs::remove_dir_all(sd.path()).unwrap();
}

/// `policy set` changes only what it is given: a second `policy set` keeps
/// the fields the first one set.
#[test]
fn a_second_policy_set_keeps_what_the_first_set() {
    let sd = scratch("keep");
    let alice: Path = "alice".parse().unwrap();
    let with = |set: PartialPolicy| PolicyChange {
        set,
        ..PolicyChange::default()
    };
    sd.set_policy(
        &alice,
        &with(PartialPolicy {
            memory_mb: Some(512),
            ..PartialPolicy::default()
        }),
    )
    .unwrap();
    let now = sd
        .set_policy(
            &alice,
            &with(PartialPolicy {
                unikernels: Some(3),
                ..PartialPolicy::default()
            }),
        )
        .unwrap();
    assert_eq!((now.unikernels, now.memory_mb), (3, 512));
    std::fs::remove_dir_all(sd.path()).unwrap();
}

/// Cleanup removes only the files tt-host names its entries
/// (`PID-START-N.lock`), in running/ itself: another name that nobody
/// holds is left alone, and so is a link (never followed).
#[test]
fn cleanup_removes_only_tt_hosts_own_entry_files() {
    let sd = scratch("ownnames");
    let running = sd.path().join(RUNNING_DIR);
    let a = sd.admit(None, "x", uk(8)).unwrap();
    let victim = sd.path().join("victim.lock");
    std::fs::write(&victim, b"").unwrap();
    for n in ["notes.lock", "1-2-3.lock.bak", "1-2.lock"] {
        std::fs::write(running.join(n), b"").unwrap();
    }
    std::fs::write(running.join("8388608-1-7.lock"), b"").unwrap();
    sd.show(&Path::root()).unwrap();
    assert!(
        !running.join("8388608-1-7.lock").exists(),
        "a dead entry of ours is removed"
    );
    for n in ["notes.lock", "1-2-3.lock.bak", "1-2.lock"] {
        assert!(running.join(n).exists(), "{n} is not ours: left alone");
    }
    std::os::unix::fs::symlink(&victim, running.join("8388608-1-8.lock")).unwrap();
    let e = sd.show(&Path::root()).unwrap_err();
    assert!(e.to_string().contains("is a symbolic link"), "{e}");
    assert!(victim.exists());
    drop(a);
    std::fs::remove_dir_all(sd.path()).unwrap();
}

#[test]
fn entry_names_are_tt_hosts_pattern_only() {
    assert!(is_entry_name("12-345-0.lock"));
    for n in [
        "x.lock",
        "1-2.lock",
        "1-2-3-4.lock",
        "1--3.lock",
        "a-1-2.lock",
        "1-2-3",
    ] {
        assert!(!is_entry_name(n), "{n}");
    }
}

/// What tt-host creates is 0700 and 0600 (not the umask's 0755 and
/// 0644); the journals directory is made by the same rules. (The umask
/// is the process's: tests/tests/state_dir.rs runs tt-host under 000.)
#[test]
fn created_state_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let sd = scratch("private");
    let mode = |p: &FsPath| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let a = sd.admit(None, "x", uk(8)).unwrap();
    let journals = sd.path().join("journals");
    create_private_dir(&journals).unwrap();
    assert_eq!(mode(sd.path()), 0o700);
    assert_eq!(mode(&sd.path().join(RUNNING_DIR)), 0o700);
    assert_eq!(mode(&journals), 0o700);
    assert_eq!(mode(&sd.path().join(LOCK_FILE)), 0o600);
    drop(a);
    std::fs::remove_dir_all(sd.path()).unwrap();
}

#[test]
fn a_state_file_over_16_mib_is_refused_unread() {
    let sd = scratch("huge");
    std::fs::create_dir_all(sd.path()).unwrap();
    let f = File::create(sd.path().join(STATE_FILE)).unwrap();
    f.set_len(STATE_FILE_MAX + 1).unwrap();
    let e = sd.show(&Path::root()).unwrap_err();
    assert!(
        e.to_string().contains(&format!(
            "{} bytes, over the limit of 16777216",
            STATE_FILE_MAX + 1
        )),
        "{e}"
    );
    std::fs::remove_dir_all(sd.path()).unwrap();
}

/// Access grants are stored with the policy, shown by `policy show`, left
/// out of `state.json` when not set (so an older tt-host's file and ours
/// read the same), and unset by `inherit` without touching the limits.
#[test]
fn grants_are_stored_shown_and_unset() {
    use crate::resources::{Caller, Grantee};
    let sd = scratch("grants");
    let alice: Path = "alice".parse().unwrap();
    sd.set_policy(
        &alice,
        &PolicyChange {
            set: PartialPolicy {
                unikernels: Some(2),
                ..PartialPolicy::default()
            },
            ..PolicyChange::default()
        },
    )
    .unwrap();
    let state = sd.path().join(STATE_FILE);
    let json = std::fs::read_to_string(&state).unwrap();
    assert!(
        !json.contains("users") && !json.contains("groups"),
        "{json}"
    );
    sd.set_policy(
        &alice,
        &PolicyChange {
            set: PartialPolicy {
                users: Some([4242, 4243].into()),
                groups: Some(BTreeSet::new()),
                ..PartialPolicy::default()
            },
            ..PolicyChange::default()
        },
    )
    .unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    let stored = &json["policies"][0][1];
    assert_eq!(stored["users"], serde_json::json!([4242, 4243]), "{json}");
    assert_eq!(stored["groups"], serde_json::json!([]), "{json}");
    let shown = sd.show(&alice).unwrap();
    assert!(
        shown.contains("unikernels 0/2") && shown.contains("  users 4242,4243  groups none"),
        "{shown}"
    );
    // Another process reads the grant back.
    let other = StateDir::resolve(Some(sd.path()));
    let tree = other.resources().unwrap();
    let u = Caller {
        uid: 4243,
        gid: 1,
        groups: vec![],
    };
    tree.may_act_on_unikernel(&u, &"alice:web".parse().unwrap())
        .unwrap();
    tree.may_change_policy(&u, &"alice:bob".parse().unwrap())
        .unwrap();
    assert!(tree.may_change_policy(&u, &alice).is_err());
    // `--users inherit`: the grant goes, the limits stay.
    sd.set_policy(
        &alice,
        &PolicyChange {
            unset_grants: [Grantee::Users].into(),
            ..PolicyChange::default()
        },
    )
    .unwrap();
    let tree = other.resources().unwrap();
    assert!(tree
        .may_act_on_unikernel(&u, &"alice:web".parse().unwrap())
        .is_err());
    let set = tree.find_set_fields(&alice).unwrap();
    assert_eq!(
        (set.unikernels, set.users.as_ref(), set.groups.as_ref()),
        (Some(2), None, Some(&BTreeSet::new()))
    );
    std::fs::remove_dir_all(sd.path()).unwrap();
}
