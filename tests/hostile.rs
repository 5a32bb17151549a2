//! Hostile answers from "KPS": every kind of bad zip is refused as a whole (nothing from it is
//! used), one warning names the reason, and the keys still land through the documented single
//! export: the very keys KPS holds, nothing written anywhere else.

mod common;

use common::*;
use fake_kps::Hostile;

fn check(hostile: Hostile, expect_in_warning: &str) {
    let sb = Sandbox::new();
    sb.fake.add_key("alpha");
    sb.fake.add_key("beta");
    sb.manifest("", "  alpha: out/alpha.pem\n  beta: out/beta.pem\n");
    let run = sb.reconcile();
    assert_eq!(run.code, 0, "{run:?}");
    // alpha is due a restore and beta a create: the hostile batch carries both.
    std::fs::write(sb.path("out/alpha.pem"), "altered alpha").unwrap();
    std::fs::remove_file(sb.path("out/beta.pem")).unwrap();
    let before = tree(sb.dir.path());

    sb.fake.set_hostile(Some(hostile));
    sb.fake.reset_stats();
    let run = sb.reconcile();
    assert_eq!(run.code, 0, "{hostile:?}: {run:?}");
    let warnings: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("one by one"))
        .collect();
    assert_eq!(
        warnings.len(),
        1,
        "{hostile:?}: one warning per pass: {run:?}"
    );
    assert!(
        warnings[0].to_lowercase().contains(expect_in_warning),
        "{hostile:?}: expected {expect_in_warning:?} in {}",
        warnings[0]
    );
    assert_eq!(sb.fake.stats().batch_export_calls, 1, "{hostile:?}");
    assert_eq!(sb.fake.stats().single_export_calls, 2, "{hostile:?}");
    // The keys written are the ones KPS holds (the Duplicate zip carries another alpha).
    for name in ["alpha", "beta"] {
        let written = std::fs::read_to_string(sb.path(&format!("out/{name}.pem"))).unwrap();
        assert_eq!(
            written,
            sb.fake.private_key(name).unwrap(),
            "{hostile:?}: {name}"
        );
    }
    let after = tree(sb.dir.path());
    let before_no_state: Vec<_> = before.iter().filter(|p| !p.starts_with("state/")).collect();
    let after_no_state: Vec<_> = after
        .iter()
        .filter(|p| !p.starts_with("state/") && *p != "out/beta.pem")
        .collect();
    assert_eq!(
        before_no_state, after_no_state,
        "{hostile:?}: no file but the two keys"
    );
    // Nothing escaped the sandbox: the traversal/absolute names target these.
    assert!(!sb.dir.path().parent().unwrap().join("alpha.pem").exists());
    assert!(!std::path::Path::new("/etc/alpha.pem").exists());
}

#[test]
fn traversal_entry() {
    check(Hostile::Traversal, "..");
}

#[test]
fn absolute_entry() {
    check(Hostile::Absolute, "absolute");
}

#[test]
fn duplicate_entry() {
    check(Hostile::Duplicate, "two entries");
}

#[test]
fn zip_bomb() {
    check(Hostile::Bomb, "over the limit");
}

#[test]
fn symlink_entry() {
    check(Hostile::Symlink, "symbolic link");
}

#[test]
fn encrypted_entry() {
    check(Hostile::Encrypted, "encrypted");
}

#[test]
fn unmatched_entry() {
    check(Hostile::Unmatched, "matches none");
}

#[test]
fn too_many_entries() {
    check(Hostile::TooMany, "entries");
}

#[test]
fn not_a_zip() {
    check(Hostile::NotZip, "zip signature");
}

#[test]
fn not_a_private_key() {
    let sb = Sandbox::new();
    sb.fake.add_key("alpha");
    sb.fake.add_key_pem("beta", "<html>502 Bad Gateway</html>");
    sb.manifest("", "  alpha: out/alpha.pem\n  beta: out/beta.pem\n");
    let run = sb.reconcile();
    assert_eq!(run.code, 1, "{run:?}");
    assert!(sb.path("out/alpha.pem").exists());
    assert!(!sb.path("out/beta.pem").exists());
    let line = run
        .stderr
        .lines()
        .find(|l| l.contains("key beta "))
        .unwrap();
    assert!(line.contains("not-a-key"), "{line}");
    assert!(
        !run.all().contains("Bad Gateway"),
        "the bytes are not echoed: {run:?}"
    );
}
