//! The KPS listing end to end, the real binary against the fake: paging and the page-size
//! fallback, the listing cadence, rotation, adoption, a listing refused (403), frozen and
//! unhosted keys, and every error body form.

mod common;

use common::*;
use fake_kps::ErrorForm;
use std::os::unix::fs::MetadataExt;

fn keys_yaml(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("  {n}: out/{n}.pem\n"))
        .collect()
}

/// The inode and mtime of a file: what "not rewritten" means.
fn identity(path: &std::path::Path) -> (u64, i64, i64) {
    let m = std::fs::metadata(path).unwrap();
    (m.ino(), m.mtime(), m.mtime_nsec())
}

fn state_json(sb: &Sandbox) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(sb.path("state/state.json")).unwrap()).unwrap()
}

#[test]
fn a_listing_limited_to_small_pages_still_lands_every_key() {
    let sb = Sandbox::new();
    let names: Vec<String> = (0..120).map(|i| format!("k{i:03}")).collect();
    for n in &names {
        sb.fake.add_key(n);
    }
    sb.fake.set_max_page(Some(50));
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    sb.manifest("", &keys_yaml(&refs));
    let run = sb.reconcile();
    assert_eq!(run.code, 0, "{run:?}");
    for n in &names {
        assert_eq!(
            std::fs::read_to_string(sb.path(&format!("out/{n}.pem"))).unwrap(),
            sb.fake.private_key(n).unwrap()
        );
    }
    let stats = sb.fake.stats();
    assert_eq!(
        stats.list_calls, 4,
        "limit=1000 refused, then 50 + 50 + 20: {stats:?}"
    );
    assert_eq!(
        run.stderr.matches("refused the listing page size").count(),
        1,
        "warned once: {run:?}"
    );
}

#[test]
fn large_pages_take_one_listing_call_per_thousand_keys() {
    let sb = Sandbox::new();
    let names: Vec<String> = (0..1001).map(|i| format!("k{i:04}")).collect();
    for n in &names {
        sb.fake.add_key(n);
    }
    sb.manifest("", &keys_yaml(&["k0000", "k1000"]));
    let run = sb.reconcile();
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(sb.fake.stats().list_calls, 2, "1000 + 1");
    assert!(
        sb.path("out/k1000.pem").exists(),
        "found on the second page"
    );
}

#[test]
fn a_no_op_pass_inside_the_rotation_window_calls_nothing_and_reads_no_credential() {
    let sb = Sandbox::new();
    sb.fake.add_key("a");
    sb.manifest("", &keys_yaml(&["a"]));
    assert_eq!(sb.reconcile().code, 0);
    assert!(state_json(&sb)["last_listing"].is_string());

    sb.fake.reset_stats();
    std::fs::remove_file(sb.path("token")).unwrap();
    let run = sb.reconcile();
    assert_eq!(run.code, 0, "no credential was needed: {run:?}");
    assert_eq!(
        sb.fake.stats(),
        fake_kps::Stats::default(),
        "no call at all"
    );

    // --check-rotation lists now, so it needs the credential.
    let run = sb.run(&["reconcile", "--check-rotation"]);
    assert_eq!(run.code, 1, "{run:?}");
    std::fs::write(sb.path("token"), format!("{}\n", fake_kps::TOKEN)).unwrap();
    let run = sb.run(&["reconcile", "--check-rotation"]);
    assert_eq!(run.code, 0, "{run:?}");
    let stats = sb.fake.stats();
    assert_eq!(
        (stats.list_calls, stats.names_exported),
        (1, 0),
        "{stats:?}"
    );
}

#[test]
fn a_rotation_in_kps_is_replaced_on_the_next_pass_with_exactly_one_export() {
    let sb = Sandbox::new();
    sb.fake.add_key("a");
    sb.fake.add_key("b");
    let hook_out = sb.path("hook.out");
    sb.manifest(
        "  rotation_check: 0s\n",
        &format!(
            "  a:\n    path: out/a.pem\n    on_change: [\"sh\", \"-c\", \"echo $KPS_SYNC_KEY $KPS_SYNC_ACTION >> {}\"]\n  b: out/b.pem\n",
            hook_out.display()
        ),
    );
    assert_eq!(sb.reconcile().code, 0);
    assert_eq!(std::fs::read_to_string(&hook_out).unwrap(), "a create\n");
    let fingerprint = state_json(&sb)["files"]["a"]["fingerprint"].clone();
    assert!(
        fingerprint
            .as_str()
            .is_some_and(|f| f.starts_with("SHA256:")),
        "the state keeps the public fingerprint: {fingerprint}"
    );
    let b_before = identity(&sb.path("out/b.pem"));

    let new_key = sb.fake.rotate_key("a").unwrap();
    let plan = sb.run(&["plan", "--detailed-exitcode"]);
    assert_eq!(plan.code, 2, "{plan:?}");
    assert!(
        plan.stdout
            .lines()
            .any(|l| l.starts_with("rotate") && l.contains(" a ")),
        "{plan:?}"
    );

    sb.fake.reset_stats();
    let run = sb.reconcile();
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains("rotated"), "{run:?}");
    let stats = sb.fake.stats();
    assert_eq!(stats.names_exported, 1, "exactly one export: {stats:?}");
    assert_eq!(stats.list_calls, 1);
    assert_eq!(
        std::fs::read_to_string(sb.path("out/a.pem")).unwrap(),
        new_key
    );
    assert_eq!(identity(&sb.path("out/b.pem")), b_before, "b untouched");
    assert_eq!(
        std::fs::read_to_string(&hook_out).unwrap(),
        "a create\na rotate\n"
    );
    assert_ne!(state_json(&sb)["files"]["a"]["fingerprint"], fingerprint);

    // The next pass lists again (rotation_check: 0s) and finds nothing to do.
    sb.fake.reset_stats();
    let run = sb.reconcile();
    assert_eq!(run.code, 0, "{run:?}");
    let stats = sb.fake.stats();
    assert_eq!(
        (stats.list_calls, stats.names_exported),
        (1, 0),
        "{stats:?}"
    );
}

#[test]
fn an_identical_hand_placed_key_is_adopted_with_zero_writes() {
    let sb = Sandbox::new();
    let text = sb.fake.add_key("a");
    sb.fake.add_key("b");
    std::fs::create_dir(sb.path("out")).unwrap();
    let a = sb.path("out/a.pem");
    std::fs::write(&a, &text).unwrap();
    std::fs::set_permissions(&a, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    // Another key where b belongs: not KPS's key for b, so it stays a conflict.
    let b = sb.path("out/b.pem");
    let foreign = sb.fake.add_key("unrelated");
    std::fs::write(&b, &foreign).unwrap();
    sb.manifest("", &keys_yaml(&["a", "b"]));
    let a_before = identity(&a);
    let b_before = identity(&b);

    let plan = sb.run(&["plan", "--detailed-exitcode"]);
    assert_eq!(plan.code, 2, "{plan:?}");
    assert!(
        plan.stdout
            .lines()
            .any(|l| l.starts_with("adopt") && l.contains(" a ")),
        "{plan:?}"
    );
    assert!(
        plan.stdout
            .lines()
            .any(|l| l.starts_with("conflict") && l.contains(" b ")),
        "{plan:?}"
    );

    sb.fake.reset_stats();
    let run = sb.reconcile();
    assert_eq!(run.code, 1, "b is a conflict: {run:?}");
    assert!(run.stdout.contains("adopted"), "{run:?}");
    let stats = sb.fake.stats();
    assert_eq!(stats.names_exported, 0, "nothing exported: {stats:?}");
    assert_eq!(stats.list_calls, 1);
    assert_eq!(identity(&a), a_before, "a not rewritten");
    assert_eq!(identity(&b), b_before, "b kept");
    assert_eq!(std::fs::read_to_string(&b).unwrap(), foreign);
    let state = state_json(&sb);
    assert!(state["files"]["a"]["sha256"].is_string(), "{state}");
    assert!(state["files"]["a"]["fingerprint"].is_string(), "{state}");
    assert!(state["files"].get("b").is_none(), "{state}");

    // Adopted means managed: deleted, it is restored.
    std::fs::remove_file(&a).unwrap();
    std::fs::remove_file(&b).unwrap();
    let run = sb.reconcile();
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains("restored"), "{run:?}");
    assert_eq!(std::fs::read_to_string(&a).unwrap(), text);
}

#[test]
fn an_adopted_key_with_loose_mode_is_recorded_and_its_mode_fixed() {
    let sb = Sandbox::new();
    let text = sb.fake.add_key("a");
    std::fs::create_dir(sb.path("out")).unwrap();
    let a = sb.path("out/a.pem");
    std::fs::write(&a, &text).unwrap();
    std::fs::set_permissions(&a, std::os::unix::fs::PermissionsExt::from_mode(0o640)).unwrap();
    let before = std::fs::metadata(&a).unwrap().ino();
    sb.manifest("", &keys_yaml(&["a"]));
    let run = sb.reconcile();
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(mode_of(&a), 0o600);
    assert_eq!(std::fs::metadata(&a).unwrap().ino(), before);
    assert_eq!(sb.fake.stats().names_exported, 0);
    assert_eq!(sb.run(&["plan", "--detailed-exitcode"]).code, 0);
}

#[test]
fn a_listing_refused_403_is_warned_about_once_and_keys_still_land() {
    let sb = Sandbox::new();
    sb.fake.add_key("a");
    sb.fake.add_key("b");
    sb.fake.set_list_forbidden(true);
    sb.manifest("", &keys_yaml(&["a", "b"]));
    let run = sb.reconcile();
    assert_eq!(run.code, 0, "{run:?}");
    assert!(sb.path("out/a.pem").exists() && sb.path("out/b.pem").exists());
    assert_eq!(
        run.stderr.matches("refused to list key pairs").count(),
        1,
        "{run:?}"
    );
    let stats = sb.fake.stats();
    assert_eq!(
        (stats.list_calls, stats.names_exported),
        (1, 2),
        "{stats:?}"
    );
}

#[test]
fn a_listing_whose_marker_loops_is_no_listing_not_a_missing_key() {
    // A server that ignores `marker` hands back the first page and its `next_marker` again.
    // Taking the first page as the whole listing would call every later key "not in KPS".
    let sb = Sandbox::new();
    let names: Vec<String> = (0..60).map(|i| format!("k{i:03}")).collect();
    for n in &names {
        sb.fake.add_key(n);
    }
    sb.fake.set_max_page(Some(50));
    sb.fake.set_list_ignores_marker(true);
    sb.manifest("", &keys_yaml(&["k000", "k055"]));
    let run = sb.reconcile();
    assert!(!run.stderr.contains("not in the KPS listing"), "{run:?}");
    assert_eq!(
        std::fs::read_to_string(sb.path("out/k055.pem")).unwrap(),
        sb.fake.private_key("k055").unwrap(),
        "{run:?}"
    );
    assert!(run.stderr.contains("next_marker"), "says why: {run:?}");
}

#[test]
fn frozen_and_unhosted_keys_fail_alone_and_are_never_exported() {
    let sb = Sandbox::new();
    sb.fake.add_key("a");
    sb.fake.add_key("f");
    sb.fake.set_frozen("f", true);
    sb.fake.add_unhosted_key("u");
    sb.manifest("", &keys_yaml(&["a", "f", "u"]));
    let run = sb.reconcile();
    assert_eq!(run.code, 1, "{run:?}");
    assert!(sb.path("out/a.pem").exists());
    assert!(!sb.path("out/f.pem").exists() && !sb.path("out/u.pem").exists());
    assert_eq!(sb.fake.stats().names_exported, 1);
    assert!(
        run.stderr
            .lines()
            .any(|l| l.contains("key f ") && l.contains("frozen")),
        "{run:?}"
    );
    assert!(
        run.stderr
            .lines()
            .any(|l| l.contains("key u ") && l.contains("KPS.6005")),
        "{run:?}"
    );

    // Unfrozen, it lands on the next pass.
    sb.fake.set_frozen("f", false);
    let run = sb.reconcile();
    assert_eq!(run.code, 1, "u still fails: {run:?}");
    assert!(sb.path("out/f.pem").exists());
}

#[test]
fn every_error_body_form_is_read_for_its_code_and_message() {
    for form in [
        ErrorForm::ErrorCode,
        ErrorForm::CodeMessage,
        ErrorForm::Nested,
    ] {
        let sb = Sandbox::new();
        sb.fake.set_error_form(form);
        sb.fake.add_key("a");
        // Without the listing's check, the export itself meets KPS.6004.
        sb.manifest("  verify_remote: false\n", &keys_yaml(&["a", "gone"]));
        let run = sb.reconcile();
        assert_eq!(run.code, 1, "{form:?}: {run:?}");
        assert!(sb.path("out/a.pem").exists(), "{form:?}: {run:?}");
        let line = run
            .stderr
            .lines()
            .find(|l| l.contains("key gone "))
            .unwrap_or_else(|| panic!("{form:?}: {run:?}"));
        assert!(
            line.contains("KPS.6004")
                && line.contains("The keypair does not exist.")
                && line.contains("request id"),
            "{form:?}: {line}"
        );

        // A 403 in that form reads as the permission problem it is. This pass lists first (a
        // rotation check: keys are recorded now, never listed), and that 403 only costs the
        // listing; the export's 403 fails the key.
        sb.fake.fail_next(2, 403);
        sb.manifest("  verify_remote: false\n", &keys_yaml(&["a", "c"]));
        sb.fake.add_key("c");
        let run = sb.reconcile();
        assert_eq!(run.code, 1, "{form:?}: {run:?}");
        assert!(
            run.stderr.contains("KPS.9003") && run.stderr.contains("lack permission"),
            "{form:?}: {run:?}"
        );
    }
}

/// The first two fields of a public key line: what the listing's `public_key` is compared on.
fn key_fields(line: &str) -> String {
    line.split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn public_key_true_writes_path_pub_0644_from_the_key_and_as_kps_lists_it() {
    let sb = Sandbox::new();
    sb.fake.add_key("a");
    sb.fake.add_key("b");
    sb.manifest(
        "",
        "  a:\n    path: out/a.pem\n    public_key: true\n  b:\n    path: out/b.pem\n    public_key: pubs/b.pub\n",
    );
    let run = sb.reconcile();
    assert_eq!(run.code, 0, "{run:?}");
    for (name, path) in [("a", "out/a.pem.pub"), ("b", "pubs/b.pub")] {
        let path = sb.path(path);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            key_fields(&text),
            key_fields(&sb.fake.public_key(name).unwrap()),
            "{name}"
        );
        assert!(text.ends_with(&format!(" {name}\n")), "{text:?}");
        assert_eq!(mode_of(&path), 0o644);
    }
    assert_eq!(sb.fake.stats().names_exported, 2, "one export per key");
    assert!(state_json(&sb)["files"]["a"]["public_key"]["sha256"].is_string());
    // OpenSSH reads it, and it is the public half of the key written beside it.
    if have_tool("ssh-keygen", "openssh-client") {
        let derived = std::process::Command::new("ssh-keygen")
            .args(["-y", "-f"])
            .arg(sb.path("out/a.pem"))
            .output()
            .unwrap();
        assert!(derived.status.success(), "{derived:?}");
        let printed = std::process::Command::new("ssh-keygen")
            .args(["-l", "-f"])
            .arg(sb.path("out/a.pem.pub"))
            .output()
            .unwrap();
        assert!(printed.status.success(), "{printed:?}");
        let text = std::fs::read_to_string(sb.path("out/a.pem.pub")).unwrap();
        assert_eq!(
            key_fields(&text),
            key_fields(&String::from_utf8_lossy(&derived.stdout))
        );
        let fingerprint = state_json(&sb)["files"]["a"]["fingerprint"].clone();
        assert!(
            String::from_utf8_lossy(&printed.stdout).contains(fingerprint.as_str().unwrap()),
            "{printed:?} vs {fingerprint}"
        );
    }
    assert_eq!(sb.run(&["plan", "--detailed-exitcode"]).code, 0);
}

#[test]
fn a_deleted_public_key_file_is_written_again_and_the_key_file_kept() {
    let sb = Sandbox::new();
    sb.fake.add_key("a");
    let hook_out = sb.path("hook.out");
    sb.manifest(
        "",
        &format!(
            "  a:\n    path: out/a.pem\n    public_key: true\n    on_change: [\"sh\", \"-c\", \"echo $KPS_SYNC_ACTION >> {}\"]\n",
            hook_out.display()
        ),
    );
    assert_eq!(sb.reconcile().code, 0);
    let key_before = identity(&sb.path("out/a.pem"));
    let pub_path = sb.path("out/a.pem.pub");
    let text = std::fs::read_to_string(&pub_path).unwrap();
    std::fs::remove_file(&pub_path).unwrap();

    let plan = sb.run(&["plan", "--detailed-exitcode"]);
    assert_eq!(plan.code, 2, "{plan:?}");
    assert!(plan.stdout.contains("write-pub"), "{plan:?}");

    sb.fake.reset_stats();
    let run = sb.reconcile();
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(std::fs::read_to_string(&pub_path).unwrap(), text);
    assert_eq!(identity(&sb.path("out/a.pem")), key_before, "key file kept");
    assert_eq!(sb.fake.stats().names_exported, 1);
    assert_eq!(
        std::fs::read_to_string(&hook_out).unwrap(),
        "create\n",
        "no hook: the key did not change"
    );

    // Altered by hand: ours, so written again.
    std::fs::write(&pub_path, "ssh-ed25519 AAAA tampered\n").unwrap();
    assert_eq!(sb.reconcile().code, 0);
    assert_eq!(std::fs::read_to_string(&pub_path).unwrap(), text);
}

#[test]
fn a_hand_placed_key_and_its_public_key_file_are_both_adopted_without_an_export() {
    let sb = Sandbox::new();
    let text = sb.fake.add_key("a");
    std::fs::create_dir(sb.path("out")).unwrap();
    let key = sb.path("out/a.pem");
    let public = sb.path("out/a.pem.pub");
    std::fs::write(&key, &text).unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    std::fs::write(
        &public,
        format!("{} me@laptop\n", sb.fake.public_key("a").unwrap()),
    )
    .unwrap();
    std::fs::set_permissions(&public, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let before = (identity(&key), identity(&public));
    sb.manifest("", "  a:\n    path: out/a.pem\n    public_key: true\n");
    let plan = sb.run(&["plan"]);
    assert!(
        plan.stdout.contains("adopt-pub") && plan.stdout.contains("adopt "),
        "{plan:?}"
    );
    let run = sb.reconcile();
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!((identity(&key), identity(&public)), before);
    assert_eq!(sb.fake.stats().names_exported, 0);
    assert_eq!(sb.run(&["plan", "--detailed-exitcode"]).code, 0);
}

#[test]
fn a_public_key_path_holding_more_than_the_public_key_is_not_adopted_nor_opened_up() {
    // The right public key line first, then the private key: adopting it as the public key
    // file would make it 0644, the private key with it.
    let sb = Sandbox::new();
    let text = sb.fake.add_key("a");
    std::fs::create_dir(sb.path("out")).unwrap();
    let public = sb.path("out/a.pem.pub");
    let both = format!("{}\n{text}", sb.fake.public_key("a").unwrap());
    std::fs::write(&public, &both).unwrap();
    std::fs::set_permissions(&public, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    sb.manifest("", "  a:\n    path: out/a.pem\n    public_key: true\n");
    let run = sb.reconcile();
    assert_eq!(run.code, 1, "a conflict: {run:?}");
    assert_eq!(std::fs::read_to_string(&public).unwrap(), both);
    assert_eq!(
        std::fs::metadata(&public).unwrap().mode() & 0o777,
        0o600,
        "not opened up: {run:?}"
    );
}

#[test]
fn a_foreign_public_key_file_is_kept_and_reported_while_the_key_lands() {
    let sb = Sandbox::new();
    sb.fake.add_key("a");
    std::fs::create_dir(sb.path("out")).unwrap();
    let public = sb.path("out/a.pem.pub");
    std::fs::write(
        &public,
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOther someone\n",
    )
    .unwrap();
    sb.manifest("", "  a:\n    path: out/a.pem\n    public_key: true\n");
    let run = sb.reconcile();
    assert_eq!(run.code, 1, "{run:?}");
    assert!(sb.path("out/a.pem").exists());
    assert_eq!(
        std::fs::read_to_string(&public).unwrap(),
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOther someone\n"
    );
    assert!(
        run.stderr
            .lines()
            .any(|l| l.contains("key a ") && l.contains("a.pem.pub") && l.contains("conflict")),
        "{run:?}"
    );
}

#[test]
fn a_rotation_rewrites_the_public_key_file_too() {
    let sb = Sandbox::new();
    sb.fake.add_key("a");
    sb.manifest(
        "  rotation_check: 0s\n",
        "  a:\n    path: out/a.pem\n    public_key: true\n",
    );
    assert_eq!(sb.reconcile().code, 0);
    sb.fake.rotate_key("a");
    sb.fake.reset_stats();
    let run = sb.reconcile();
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(sb.fake.stats().names_exported, 1);
    let text = std::fs::read_to_string(sb.path("out/a.pem.pub")).unwrap();
    assert_eq!(
        key_fields(&text),
        key_fields(&sb.fake.public_key("a").unwrap())
    );
}

#[test]
fn records_of_an_older_version_get_their_fingerprint_and_then_see_rotations() {
    let sb = Sandbox::new();
    sb.fake.add_key("a");
    sb.manifest("  rotation_check: 0s\n", &keys_yaml(&["a"]));
    assert_eq!(sb.reconcile().code, 0);
    // As an older kps-sync left it: no fingerprint, no listing recorded.
    let mut state = state_json(&sb);
    let recorded = state["files"]["a"]["fingerprint"].take();
    state.as_object_mut().unwrap().remove("last_listing");
    std::fs::write(
        sb.path("state/state.json"),
        serde_json::to_vec(&state).unwrap(),
    )
    .unwrap();
    assert!(recorded.is_string());
    let before = identity(&sb.path("out/a.pem"));
    let run = sb.reconcile();
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(state_json(&sb)["files"]["a"]["fingerprint"], recorded);
    assert_eq!(
        identity(&sb.path("out/a.pem")),
        before,
        "read, not rewritten"
    );

    let new_key = sb.fake.rotate_key("a").unwrap();
    let run = sb.reconcile();
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(
        std::fs::read_to_string(sb.path("out/a.pem")).unwrap(),
        new_key
    );
}
