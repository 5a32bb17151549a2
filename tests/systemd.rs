//! The units in systemd/: `systemd-analyze verify` is clean (their man page included) and the service's exposure score is
//! at most 2.5. Needs systemd-analyze (Debian's `systemd`); under CI its absence is a failure.

use std::path::{Path, PathBuf};
use std::process::Command;

fn analyzer() -> Option<&'static str> {
    let found = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok();
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "systemd-analyze is missing in CI"
        );
        eprintln!("skipped: systemd-analyze not installed");
        return None;
    }
    Some("systemd-analyze")
}

/// The units, copied with ExecStart pointing at the binary under test (verify checks it exists).
fn units(dir: &Path) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd");
    [
        "kps-sync.service",
        "kps-sync-reconcile.service",
        "kps-sync-reconcile.timer",
    ]
    .iter()
    .map(|name| {
        let text = std::fs::read_to_string(root.join(name)).unwrap();
        let text = text.replace("/usr/bin/kps-sync", env!("CARGO_BIN_EXE_kps-sync"));
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    })
    .collect()
}

#[test]
fn units_verify_clean() {
    let Some(analyze) = analyzer() else { return };
    let dir = tempfile::tempdir().unwrap();
    let units = units(dir.path());
    // `Documentation=man:kps-sync(1)`: verify runs `man` on it, so the page we generate must
    // be found, as the package installs it.
    let man1 = dir.path().join("man/man1");
    std::fs::create_dir_all(&man1).unwrap();
    let page = Command::new(env!("CARGO_BIN_EXE_kps-sync"))
        .arg("man")
        .output()
        .unwrap();
    std::fs::write(man1.join("kps-sync.1"), page.stdout).unwrap();
    let out = Command::new(analyze)
        .arg("verify")
        .args(&units)
        .env("MANPATH", dir.path().join("man"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Lines about the host's own units are not ours to judge.
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains(dir.path().to_str().unwrap()) || l.contains("kps-sync"))
        .collect();
    assert!(out.status.success() && ours.is_empty(), "{stderr}");
}

#[test]
fn services_are_hardened_to_an_exposure_of_2_5_or_less() {
    let Some(analyze) = analyzer() else { return };
    let dir = tempfile::tempdir().unwrap();
    for unit in units(dir.path())
        .iter()
        .filter(|u| u.extension().is_some_and(|e| e == "service"))
    {
        let out = Command::new(analyze)
            .args(["security", "--offline=yes", "--no-pager"])
            .arg(unit)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find(|l| l.contains("Overall exposure level"))
            .unwrap_or_else(|| {
                panic!(
                    "no exposure line: {text}{}",
                    String::from_utf8_lossy(&out.stderr)
                )
            });
        let score: f64 = line
            .split(':')
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("cannot read the score in {line}"));
        assert!(score <= 2.5, "{}: {line}", unit.display());
    }
}
