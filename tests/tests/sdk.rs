//! The guest SDK's own unit tests (heap, manifest, argument parsing,
//! clock arithmetic: the parts that run on any machine). The SDK is a
//! cargo workspace of its own, so `cargo test --workspace` here would not
//! run them; this test does, so the suite's one command covers them.

use tt_tests::root;

#[test]
fn guest_sdk_unit_tests_pass() {
    let out = std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["test", "-q", "-p", "tt-guest", "--lib"])
        .current_dir(root().join("guest-sdk"))
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTFLAGS")
        .output()
        .expect("run cargo");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "tt-guest's unit tests failed:\n{text}"
    );
    assert!(text.contains("test result: ok"), "no test ran:\n{text}");
}
