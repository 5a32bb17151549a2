//! `kps-sync reconcile` end to end: the real binary against the fake KPS.

mod common;

use common::*;
use std::time::Duration;

fn keys_yaml(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("  {n}: out/{n}.pem\n"))
        .collect()
}

#[test]
fn creates_missing_keys_0600_with_the_exported_bytes_then_does_nothing() {
    let sb = Sandbox::new();
    let names: Vec<String> = (0..23).map(|i| format!("key-{i:02}")).collect();
    for n in &names {
        sb.fake.add_key(n);
    }
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    sb.manifest("", &keys_yaml(&refs));

    let run = sb.reconcile();
    assert_eq!(run.code, 0, "{run:?}");
    for n in &names {
        let path = sb.path(&format!("out/{n}.pem"));
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            sb.fake.private_key(n).unwrap()
        );
        assert_eq!(mode_of(&path), 0o600);
    }
    assert_eq!(
        mode_of(&sb.path("out")),
        0o700,
        "missing parents are created 0700"
    );
    assert!(run.stdout.contains("created"), "{run:?}");
    assert!(
        run.stdout.contains("23 managed, 23 in place, 0 failed"),
        "{run:?}"
    );
    let stats = sb.fake.stats();
    assert_eq!(
        stats.batch_export_calls, 3,
        "23 keys = batches of 10, 10, 3"
    );
    assert_eq!(stats.single_export_calls, 0);

    sb.fake.reset_stats();
    let again = sb.reconcile();
    assert_eq!(again.code, 0, "{again:?}");
    assert_eq!(
        sb.fake.stats().batch_export_calls,
        0,
        "a no-op pass calls KPS not at all"
    );
    assert!(!again.stdout.contains("created"), "{again:?}");
    assert_eq!(mode_of(&sb.path("state/state.json")), 0o600);
    let state = std::fs::read_to_string(sb.path("state/state.json")).unwrap();
    assert!(
        !state.contains("PRIVATE KEY"),
        "the state never holds a key"
    );
}

#[test]
fn restores_a_deleted_or_altered_file_and_fixes_its_mode() {
    let sb = Sandbox::new();
    sb.fake.add_key("a");
    sb.fake.add_key("b");
    sb.fake.add_key("c");
    sb.manifest("", &keys_yaml(&["a", "b", "c"]));
    assert_eq!(sb.reconcile().code, 0);

    std::fs::remove_file(sb.path("out/a.pem")).unwrap();
    std::fs::write(sb.path("out/b.pem"), "tampered").unwrap();
    std::fs::set_permissions(
        sb.path("out/c.pem"),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    sb.fake.reset_stats();

    let plan = sb.run(&["plan", "--detailed-exitcode"]);
    assert_eq!(plan.code, 2, "{plan:?}");
    assert!(
        plan.stdout.contains("restore") && plan.stdout.contains("fix-meta"),
        "{plan:?}"
    );

    let run = sb.reconcile();
    assert_eq!(run.code, 0, "{run:?}");
    for n in ["a", "b", "c"] {
        let path = sb.path(&format!("out/{n}.pem"));
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            sb.fake.private_key(n).unwrap()
        );
        assert_eq!(mode_of(&path), 0o600);
    }
    assert_eq!(
        sb.fake.stats().batch_export_calls,
        1,
        "a and b in one batch; c needs no export"
    );
    assert_eq!(sb.run(&["plan", "--detailed-exitcode"]).code, 0);
}

#[test]
fn a_file_not_written_by_kps_sync_is_kept_and_reported() {
    let sb = Sandbox::new();
    sb.fake.add_key("a");
    sb.fake.add_key("b");
    std::fs::create_dir_all(sb.path("out")).unwrap();
    std::fs::write(sb.path("out/a.pem"), "the operator's own file").unwrap();
    sb.manifest("", &keys_yaml(&["a", "b"]));

    let run = sb.reconcile();
    assert_eq!(run.code, 1, "{run:?}");
    assert_eq!(
        std::fs::read_to_string(sb.path("out/a.pem")).unwrap(),
        "the operator's own file"
    );
    assert!(sb.path("out/b.pem").exists());
    let line = run
        .stderr
        .lines()
        .find(|l| l.contains("key a "))
        .expect("one line for key a");
    assert!(
        line.contains("did not write") && line.contains("Move it away"),
        "{line}"
    );
}

#[test]
fn a_symlink_at_the_destination_is_never_followed() {
    let sb = Sandbox::new();
    sb.fake.add_key("a");
    std::fs::create_dir_all(sb.path("out")).unwrap();
    std::fs::write(sb.path("victim"), "precious").unwrap();
    std::os::unix::fs::symlink(sb.path("victim"), sb.path("out/a.pem")).unwrap();
    sb.manifest("", &keys_yaml(&["a"]));

    let run = sb.reconcile();
    assert_eq!(run.code, 1, "{run:?}");
    assert_eq!(
        std::fs::read_to_string(sb.path("victim")).unwrap(),
        "precious"
    );
    assert!(
        std::fs::symlink_metadata(sb.path("out/a.pem"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert!(run.stderr.contains("symlink"), "{run:?}");
}

#[test]
fn one_bad_name_is_isolated_and_its_batch_mates_still_land() {
    let sb = Sandbox::new();
    let good: Vec<String> = (0..9).map(|i| format!("good-{i}")).collect();
    for n in &good {
        sb.fake.add_key(n);
    }
    sb.fake.add_unhosted_key("unhosted");
    let mut names: Vec<&str> = good.iter().map(String::as_str).collect();
    names.push("does-not-exist");
    names.push("unhosted");
    // Without the listing's check, the bad names reach the batch export.
    sb.manifest("  verify_remote: false\n", &keys_yaml(&names));

    let run = sb.reconcile();
    assert_eq!(run.code, 1, "{run:?}");
    for n in &good {
        assert!(
            sb.path(&format!("out/{n}.pem")).exists(),
            "{n} landed: {run:?}"
        );
    }
    assert!(!sb.path("out/does-not-exist.pem").exists());
    assert!(!sb.path("out/unhosted.pem").exists());
    let missing: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.contains("key does-not-exist "))
        .collect();
    assert_eq!(missing.len(), 1, "exactly one line per failed key: {run:?}");
    assert!(
        missing[0].contains("KPS.6004") && missing[0].contains("check the key pair name"),
        "{}",
        missing[0]
    );
    let unhosted: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.contains("key unhosted "))
        .collect();
    assert_eq!(unhosted.len(), 1, "{run:?}");
    assert!(unhosted[0].contains("KPS.6005"), "{}", unhosted[0]);
    assert!(
        run.stdout.contains("11 managed, 9 in place, 2 failed"),
        "{run:?}"
    );

    let status = sb.run(&["status", "--json"]);
    assert_eq!(status.code, 0, "{status:?}");
    let doc: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    let keys = doc["keys"].as_array().unwrap();
    let bad = keys.iter().find(|k| k["key"] == "does-not-exist").unwrap();
    assert!(bad["last_error"].as_str().unwrap().contains("KPS.6004"));
    let ok = keys.iter().find(|k| k["key"] == "good-0").unwrap();
    assert!(ok["last_error"].is_null() && ok["written_at"].is_string());
}

#[test]
fn every_zip_layout_is_understood() {
    for layout in [
        fake_kps::Layout::Pem,
        fake_kps::Layout::Bare,
        fake_kps::Layout::Folder,
        fake_kps::Layout::Txt,
    ] {
        let sb = Sandbox::new();
        sb.fake.set_layout(layout);
        sb.fake.add_key("alpha");
        sb.fake.add_key("beta");
        sb.manifest("", &keys_yaml(&["alpha", "beta"]));
        let run = sb.reconcile();
        assert_eq!(run.code, 0, "{layout:?}: {run:?}");
        assert_eq!(
            std::fs::read_to_string(sb.path("out/beta.pem")).unwrap(),
            sb.fake.private_key("beta").unwrap()
        );
    }
}

#[test]
fn a_name_missing_from_the_zip_falls_back_to_single_export() {
    let sb = Sandbox::new();
    sb.fake.add_key("a");
    sb.fake.add_key("b");
    sb.fake.set_omit_from_zip(Some("b".into()));
    sb.manifest("", &keys_yaml(&["a", "b"]));
    let run = sb.reconcile();
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(
        std::fs::read_to_string(sb.path("out/b.pem")).unwrap(),
        sb.fake.private_key("b").unwrap()
    );
    assert_eq!(sb.fake.stats().single_export_calls, 1);
}

#[test]
fn server_errors_and_throttling_are_retried() {
    let sb = Sandbox::new();
    for i in 0..5 {
        sb.fake.add_key(&format!("k{i}"));
    }
    sb.manifest("", &keys_yaml(&["k0", "k1", "k2", "k3", "k4"]));
    sb.fake.fail_next(2, 500);
    let run = sb.reconcile();
    assert_eq!(run.code, 0, "{run:?}");
    assert!(sb.fake.stats().server_errors >= 2);

    let sb = Sandbox::new();
    sb.fake.add_key("k0");
    sb.manifest("", &keys_yaml(&["k0"]));
    sb.fake.fail_next(1, 429);
    let started = std::time::Instant::now();
    let run = sb.reconcile();
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(sb.fake.stats().throttled, 1);
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After: 1 was honoured"
    );
}

#[test]
fn kps_down_is_exit_1_and_never_touches_the_file_on_disk() {
    let sb = Sandbox::new();
    sb.fake.add_key("a");
    sb.manifest("", &keys_yaml(&["a"]));
    assert_eq!(sb.reconcile().code, 0);
    std::fs::write(sb.path("out/a.pem"), "altered by hand").unwrap();
    sb.fake.set_error_rate(1.0);
    let run = sb.reconcile();
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stderr.contains("key a ") && run.stderr.contains("KPS.0004"),
        "{run:?}"
    );
    assert_eq!(
        std::fs::read_to_string(sb.path("out/a.pem")).unwrap(),
        "altered by hand",
        "a failed restore leaves the file as it was"
    );
    sb.fake.set_error_rate(0.0);
    assert_eq!(sb.reconcile().code, 0);
    assert_eq!(
        std::fs::read_to_string(sb.path("out/a.pem")).unwrap(),
        sb.fake.private_key("a").unwrap()
    );
}

#[test]
fn a_file_placed_while_the_key_is_being_exported_is_not_overwritten() {
    let sb = Sandbox::new();
    sb.fake.add_key("a");
    sb.fake.set_latency(Duration::from_millis(1500));
    sb.manifest("", &keys_yaml(&["a"]));
    std::fs::create_dir_all(sb.path("out")).unwrap();
    let child = sb
        .cmd(&["reconcile"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    std::fs::write(sb.path("out/a.pem"), "the admin's own file").unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(sb.path("out/a.pem")).unwrap(),
        "the admin's own file"
    );
    assert!(
        stderr.contains("key a ") && stderr.contains("conflict"),
        "{stderr}"
    );
    let leftovers: Vec<_> = std::fs::read_dir(sb.path("out")).unwrap().collect();
    assert_eq!(leftovers.len(), 1, "no temporary file left");
}

#[test]
fn a_moved_key_keeps_its_old_file_until_the_new_one_is_in_place() {
    let sb = Sandbox::new();
    sb.fake.add_key("a");
    sb.manifest("  prune: true\n", "  a: old/a.pem\n");
    assert_eq!(sb.reconcile().code, 0);
    sb.manifest("  prune: true\n", "  a: new/a.pem\n");
    sb.fake.set_error_rate(1.0);
    let run = sb.reconcile();
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        sb.path("old/a.pem").exists(),
        "not pruned while the new copy failed"
    );
    sb.fake.set_error_rate(0.0);
    let run = sb.reconcile();
    assert_eq!(run.code, 0, "{run:?}");
    assert!(sb.path("new/a.pem").exists());
    assert!(!sb.path("old/a.pem").exists(), "{run:?}");
}

#[test]
fn a_moved_key_whose_new_path_is_in_conflict_keeps_its_old_file() {
    let sb = Sandbox::new();
    sb.fake.add_key("a");
    sb.manifest("  prune: true\n", "  a: old/a.pem\n");
    assert_eq!(sb.reconcile().code, 0);
    let key = std::fs::read(sb.path("old/a.pem")).unwrap();
    std::fs::create_dir_all(sb.path("new")).unwrap();
    std::fs::write(sb.path("new/a.pem"), b"the admin's own file\n").unwrap();
    sb.manifest("  prune: true\n", "  a: new/a.pem\n");
    let run = sb.reconcile();
    assert_eq!(run.code, 1, "the conflict fails the key: {run:?}");
    assert_eq!(
        std::fs::read(sb.path("old/a.pem")).unwrap(),
        key,
        "the only copy of the key is not pruned while the new path holds another file: {run:?}"
    );
    assert_eq!(
        std::fs::read(sb.path("new/a.pem")).unwrap(),
        b"the admin's own file\n"
    );
}

#[test]
fn a_state_folder_that_cannot_be_written_fails_before_any_key_is() {
    let sb = Sandbox::new();
    sb.fake.add_key("a");
    sb.manifest("", &keys_yaml(&["a"]));
    std::fs::create_dir_all(sb.path("state")).unwrap();
    std::fs::write(sb.path("elsewhere.json"), "{}").unwrap();
    std::os::unix::fs::symlink(sb.path("elsewhere.json"), sb.path("state/state.json")).unwrap();
    let run = sb.reconcile();
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("state.json"), "{run:?}");
    assert!(
        !sb.path("out/a.pem").exists(),
        "no key written without its record"
    );
    assert_eq!(sb.fake.stats().batch_export_calls, 0);
}

#[test]
fn batches_respect_concurrency() {
    let sb = Sandbox::new();
    let names: Vec<String> = (0..60).map(|i| format!("n{i}")).collect();
    for n in &names {
        sb.fake.add_key(n);
    }
    sb.fake.set_latency(Duration::from_millis(100));
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    sb.manifest("  concurrency: 2\n", &keys_yaml(&refs));
    let run = sb.reconcile();
    assert_eq!(run.code, 0, "{run:?}");
    let stats = sb.fake.stats();
    assert_eq!(stats.batch_export_calls, 6);
    // Never more than `concurrency`; the client's slow start (kps::rate) may keep it at one
    // for the first round trips, so reaching two depends on timing on a loaded machine.
    assert!(
        (1..=2).contains(&stats.max_in_flight),
        "{}",
        stats.max_in_flight
    );
}

#[test]
fn a_wrong_token_is_one_clear_error_without_the_token() {
    let sb = Sandbox::new();
    sb.fake.add_key("a");
    sb.manifest("", &keys_yaml(&["a"]));
    std::fs::write(sb.path("token"), "not-the-token-s3cr3t").unwrap();
    let run = sb.reconcile();
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stderr.contains("401") || run.stderr.contains("0301"),
        "{run:?}"
    );
    assert!(run.stderr.contains("check the credentials"), "{run:?}");
    assert!(!run.all().contains("s3cr3t"), "{run:?}");
    assert_eq!(sb.fake.stats().unauthorized, 2, "one refresh, then give up");
}

#[test]
fn the_token_can_come_from_the_environment() {
    let sb = Sandbox::new();
    sb.fake.add_key("a");
    let text =
        sb.header().replace("  auth:\n    token_file: token\n", "") + "keys:\n  a: out/a.pem\n";
    sb.write_manifest(&text);
    let run = sb
        .cmd(&["reconcile"])
        .env("KPS_SYNC_AUTH_TOKEN", fake_kps::TOKEN)
        .output()
        .unwrap();
    assert_eq!(
        run.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let none = sb.reconcile();
    assert_eq!(none.code, 2, "no credentials at all: {none:?}");
    assert!(none.stderr.contains("no KPS credentials"), "{none:?}");
}

#[test]
fn prune_deletes_only_our_intact_files() {
    let sb = Sandbox::new();
    for n in ["a", "b", "c"] {
        sb.fake.add_key(n);
    }
    sb.manifest("", &keys_yaml(&["a", "b", "c"]));
    assert_eq!(sb.reconcile().code, 0);
    std::fs::write(sb.path("out/c.pem"), "edited by hand").unwrap();

    sb.manifest("", &keys_yaml(&["a"]));
    let run = sb.reconcile();
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        sb.path("out/b.pem").exists(),
        "prune: false keeps removed keys' files"
    );

    sb.manifest("  prune: true\n", &keys_yaml(&["a"]));
    let run = sb.reconcile();
    assert_eq!(run.code, 0, "{run:?}");
    assert!(!sb.path("out/b.pem").exists(), "{run:?}");
    assert_eq!(
        std::fs::read_to_string(sb.path("out/c.pem")).unwrap(),
        "edited by hand"
    );
    assert!(sb.path("out/a.pem").exists());
}

#[test]
fn on_change_runs_once_after_the_file_changed() {
    let sb = Sandbox::new();
    sb.fake.add_key("a");
    let log = sb.path("hook.log");
    sb.manifest(
        "",
        &format!(
            "  a:\n    path: out/a.pem\n    on_change: [\"sh\", \"-c\", \"echo $KPS_SYNC_KEY >> {}\"]\n",
            log.display()
        ),
    );
    assert_eq!(sb.reconcile().code, 0);
    assert_eq!(sb.reconcile().code, 0);
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "a\n",
        "ran once, not on the no-op pass"
    );
}

#[test]
fn the_result_is_right_under_umask_000() {
    let sb = Sandbox::new();
    sb.fake.add_key("a");
    sb.manifest("", "  a:\n    path: deep/er/a.pem\n    mode: \"0400\"\n");
    let mut cmd = std::process::Command::new("sh");
    cmd.arg("-c")
        .arg(format!(
            "umask 000; exec {} reconcile -m manifest.yaml",
            env!("CARGO_BIN_EXE_kps-sync")
        ))
        .current_dir(sb.dir.path());
    let out = cmd.output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(mode_of(&sb.path("deep/er/a.pem")), 0o400);
    assert_eq!(mode_of(&sb.path("deep")), 0o700);
    assert_eq!(mode_of(&sb.path("state/state.json")), 0o600);
    assert_eq!(mode_of(&sb.path("state")), 0o700);
}

#[test]
fn owner_and_group_are_set() {
    if !have_root() {
        return;
    }
    let sb = Sandbox::new();
    sb.fake.add_key("a");
    sb.manifest(
        "",
        "  a:\n    path: out/a.pem\n    owner: \"4242\"\n    group: \"4343\"\n    mode: \"0640\"\n",
    );
    let run = sb.reconcile();
    assert_eq!(run.code, 0, "{run:?}");
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(sb.path("out/a.pem")).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid(), meta.mode() & 0o777),
        (4242, 4343, 0o640)
    );
}

#[test]
fn a_second_reconcile_waits_for_the_lock_then_fails() {
    let sb = Sandbox::new();
    sb.fake.add_key("a");
    sb.manifest("", &keys_yaml(&["a"]));
    std::fs::create_dir_all(sb.path("state")).unwrap();
    let held = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(sb.path("state/lock"))
        .unwrap();
    held.lock().unwrap();
    let started = std::time::Instant::now();
    let run = sb.reconcile();
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stderr.contains("another kps-sync holds the lock"),
        "{run:?}"
    );
    assert!(started.elapsed() >= Duration::from_secs(5));
    assert!(!sb.path("out/a.pem").exists());
    drop(held);
    assert_eq!(sb.reconcile().code, 0);
}

#[test]
fn verify_remote_fails_unlisted_names_without_exporting_them() {
    let sb = Sandbox::new();
    sb.fake.add_key("a");
    sb.fake.add_unhosted_key("u");
    sb.manifest("  verify_remote: true\n", &keys_yaml(&["a", "gone", "u"]));
    let run = sb.reconcile();
    assert_eq!(run.code, 1, "{run:?}");
    assert!(sb.path("out/a.pem").exists());
    let stats = sb.fake.stats();
    assert!(stats.list_calls >= 1);
    assert_eq!(
        stats.batch_export_calls, 1,
        "only `a` is exported: {stats:?}"
    );
    assert!(
        run.stderr
            .lines()
            .any(|l| l.contains("key gone ") && l.contains("not in the KPS listing")),
        "{run:?}"
    );
    assert!(
        run.stderr
            .lines()
            .any(|l| l.contains("key u ") && l.contains("KPS.6005")),
        "{run:?}"
    );
}

#[test]
fn a_throttling_gateway_is_waited_out_and_max_rps_paces_requests() {
    let sb = Sandbox::new();
    let names: Vec<String> = (0..40).map(|i| format!("t{i}")).collect();
    for n in &names {
        sb.fake.add_key(n);
    }
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    sb.fake.set_rate_limit(Some(2));
    sb.manifest("  max_rps: 1.5\n", &keys_yaml(&refs));
    let started = std::time::Instant::now();
    let run = sb.reconcile();
    assert_eq!(run.code, 0, "{run:?}");
    let stats = sb.fake.stats();
    assert_eq!(stats.batch_export_calls, 4);
    assert_eq!(stats.throttled, 0, "paced under the limit: {stats:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(1900),
        "4 calls at 1.5/s take 2 s"
    );

    // Without pacing the gateway throttles, and the 429s are retried until all land.
    let sb2 = Sandbox::new();
    for n in &names {
        sb2.fake.add_key(n);
    }
    sb2.fake.set_rate_limit(Some(1));
    sb2.manifest("", &keys_yaml(&refs));
    let run = sb2.reconcile();
    assert_eq!(run.code, 0, "{run:?}");
    assert!(sb2.fake.stats().throttled >= 1);
    for n in &names {
        assert!(sb2.path(&format!("out/{n}.pem")).exists());
    }
}
