//! Hostile answers from "KPS": every kind of bad zip gets a clear error naming the keys, and
//! nothing at all is written, anywhere, and no good file is touched.

mod common;

use common::*;
use fake_kps::Hostile;

fn check(hostile: Hostile, expect_in_error: &str) {
    let sb = Sandbox::new();
    sb.fake.add_key("alpha");
    sb.fake.add_key("beta");
    sb.manifest("", "  alpha: out/alpha.pem\n  beta: out/beta.pem\n");
    // A good file from an earlier pass must survive the hostile one untouched.
    let run = sb.reconcile();
    assert_eq!(run.code, 0, "{run:?}");
    // alpha is due a restore and beta a create: the hostile batch carries both, and neither
    // the altered alpha nor the folder may change.
    std::fs::write(sb.path("out/alpha.pem"), "altered alpha").unwrap();
    let good = std::fs::read(sb.path("out/alpha.pem")).unwrap();
    std::fs::remove_file(sb.path("out/beta.pem")).unwrap();
    let before = tree(sb.dir.path());

    sb.fake.set_hostile(Some(hostile));
    let run = sb.reconcile();
    assert_eq!(run.code, 1, "{hostile:?}: {run:?}");
    let line = run
        .stderr
        .lines()
        .find(|l| l.contains("key beta "))
        .unwrap_or_else(|| panic!("{hostile:?}: no error line for beta: {run:?}"));
    assert!(
        line.to_lowercase().contains(expect_in_error),
        "{hostile:?}: expected {expect_in_error:?} in {line}"
    );
    let after = tree(sb.dir.path());
    let before_no_state: Vec<_> = before.iter().filter(|p| !p.starts_with("state/")).collect();
    let after_no_state: Vec<_> = after.iter().filter(|p| !p.starts_with("state/")).collect();
    assert_eq!(
        before_no_state, after_no_state,
        "{hostile:?}: nothing written"
    );
    assert_eq!(std::fs::read(sb.path("out/alpha.pem")).unwrap(), good);
    // Nothing escaped the sandbox either: the traversal/absolute names target these.
    assert!(!sb.dir.path().parent().unwrap().join("beta.pem").exists());
    assert!(!std::path::Path::new("/etc/beta.pem").exists());
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
