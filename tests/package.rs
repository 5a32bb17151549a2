//! The Debian package's contents, as `dpkg-deb` lists them: the binary, the units, the
//! production manifest as a conffile, the man page and completions, and maintainer scripts that
//! make the 0700 folders and enable the timer only. Needs the .deb from `.ci/build-deb`
//! (`KPS_SYNC_DEB`, else target/debian/kps-sync.deb); under CI its absence is a failure.

use std::path::{Path, PathBuf};
use std::process::Command;

fn deb() -> Option<PathBuf> {
    let path = std::env::var_os("KPS_SYNC_DEB")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("target/debian/kps-sync.deb")
        });
    if path.is_file() {
        return Some(path);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{} is missing in CI: .ci/run builds it with .ci/build-deb",
        path.display()
    );
    eprintln!(
        "skipped: {} does not exist (build it with .ci/build-deb)",
        path.display()
    );
    None
}

fn dpkg_deb(args: &[&str], deb: &Path) -> String {
    let out = Command::new("dpkg-deb")
        .args(args)
        .arg(deb)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn package_contents_and_maintainer_scripts() {
    let Some(deb) = deb() else { return };
    let listing = dpkg_deb(&["-c"], &deb);
    // `-rwxr-xr-x root/root 123 2026-... ./usr/bin/kps-sync`: mode and path of each entry.
    let entry = |path: &str| -> String {
        listing
            .lines()
            .find(|l| l.ends_with(&format!(" .{path}")))
            .unwrap_or_else(|| panic!("{path} is not in the package:\n{listing}"))
            .split_whitespace()
            .next()
            .unwrap()
            .to_owned()
    };
    assert_eq!(entry("/usr/bin/kps-sync"), "-rwxr-xr-x");
    assert_eq!(entry("/etc/kps-sync/manifest.yaml"), "-rw-------");
    for unit in [
        "kps-sync.service",
        "kps-sync-reconcile.service",
        "kps-sync-reconcile.timer",
    ] {
        assert_eq!(entry(&format!("/lib/systemd/system/{unit}")), "-rw-r--r--");
    }
    for file in [
        "/usr/share/man/man1/kps-sync.1.gz",
        "/usr/share/bash-completion/completions/kps-sync",
        "/usr/share/zsh/vendor-completions/_kps-sync",
        "/usr/share/fish/vendor_completions.d/kps-sync.fish",
        "/usr/share/doc/kps-sync/README.md",
        "/usr/share/doc/kps-sync/examples/alerts.yaml",
        "/usr/share/doc/kps-sync/examples/cloud-init.yaml",
    ] {
        entry(file);
    }
    // The conffile is the production template, not the quickstart's manifest.
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    let conffile = std::fs::read_to_string(dir.path().join("etc/kps-sync/manifest.yaml")).unwrap();
    let template = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/production.yaml"),
    )
    .unwrap();
    assert_eq!(conffile, template);
    let control = tempfile::tempdir().unwrap();
    let out = Command::new("dpkg-deb")
        .arg("-e")
        .arg(&deb)
        .arg(control.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    let conffiles = std::fs::read_to_string(control.path().join("conffiles")).unwrap();
    assert_eq!(conffiles.trim(), "/etc/kps-sync/manifest.yaml");
    let postinst = std::fs::read_to_string(control.path().join("postinst")).unwrap();
    assert!(postinst.contains(
        "install -d -m 0700 -o root -g root /var/lib/kps-sync /etc/kps-sync/credentials"
    ));
    assert!(postinst.contains("deb-systemd-helper enable kps-sync-reconcile.timer"));
    assert!(!postinst.contains("enable kps-sync.service"), "{postinst}");
}
