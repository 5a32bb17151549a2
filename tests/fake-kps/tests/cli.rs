//! The `fake-kps` binary's command line.

use std::process::Command;

#[test]
fn help_prints_usage_and_exits_0() {
    for flag in ["--help", "-h"] {
        let out = Command::new(env!("CARGO_BIN_EXE_fake-kps"))
            .arg(flag)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{flag}: {out:?}");
        assert!(stdout.starts_with("usage: fake-kps"), "{stdout}");
        assert!(stdout.contains("--latency-ms"), "{stdout}");
    }
}

#[test]
fn unknown_argument_is_an_error_with_usage() {
    let out = Command::new(env!("CARGO_BIN_EXE_fake-kps"))
        .arg("--nope")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr.contains("unknown argument --nope") && stderr.contains("usage:"),
        "{stderr}"
    );
}
