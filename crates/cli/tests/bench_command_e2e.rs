//! `courier bench` without the courier-bench program: the error names the
//! build that brings it. (With it, `crates/bench/tests/bench_e2e.rs`.)

use std::process::Command;

#[test]
fn courier_bench_without_the_bench_program_says_how_to_build_it() {
    // A `courier` alone in a directory, with nothing on the PATH.
    let dir = tempfile::tempdir().expect("temp dir");
    let alone = dir.path().join("courier");
    if std::fs::hard_link(env!("CARGO_BIN_EXE_courier"), &alone).is_err() {
        std::fs::copy(env!("CARGO_BIN_EXE_courier"), &alone).expect("copy courier");
    }
    let out = Command::new(&alone)
        .args(["bench", "--against", "nats", "--quick"])
        .env("PATH", dir.path().join("nothing-here"))
        .output()
        .expect("run courier bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("runs the courier-bench program, and there is none beside")
            && stderr.contains("cargo build --release -p courier-bench"),
        "{stderr}"
    );
}
