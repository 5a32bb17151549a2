//! The command line contract: exit codes, bad manifests, validate, plan, status, logging, and
//! that no key or credential ever reaches the output.

mod common;

use common::*;

#[test]
fn a_bad_manifest_is_exit_2_naming_file_line_and_column_and_nothing_happens() {
    let sb = Sandbox::new();
    sb.fake.add_key("a");
    let cases = [
        ("  a: out/a.pem\n  a: out/b.pem\n", "duplicate"),
        ("  bad name!: out/a.pem\n", "name"),
        ("  a: out/x.pem\n  b: out/x.pem\n", "both write"),
        ("  a:\n    path: out/a.pem\n    mode: \"0644\"\n", "mode"),
        (
            "  a:\n    path: out/a.pem\n    colour: blue\n",
            "unknown field",
        ),
        (
            "  a:\n    path: out/a.pem\n    owner: no-such-user-xyz\n",
            "no-such-user-xyz",
        ),
        (
            "  a:\n    path: out/a.pem\n    age_recipients: [\"age1notvalid\"]\n",
            "recipient",
        ),
        ("  a: [unclosed\n", "yaml"),
        ("  a: state/a.pem\n", "inside state_dir"),
    ];
    for (keys, expect) in cases {
        let path = sb.manifest("", keys);
        for cmd in ["reconcile", "validate", "plan"] {
            let run = sb.run(&[cmd]);
            assert_eq!(run.code, 2, "{cmd} with {keys:?}: {run:?}");
            let text = run.stderr.to_lowercase();
            assert!(
                text.contains(&path.display().to_string().to_lowercase()),
                "{keys:?}: names the file: {run:?}"
            );
            assert!(
                text.contains(expect),
                "{keys:?}: expected {expect:?}: {run:?}"
            );
            // file:line:col
            let has_position = run
                .stderr
                .split(&path.display().to_string())
                .nth(1)
                .is_some_and(|rest| {
                    let mut parts = rest.trim_start_matches(':').splitn(3, ':');
                    parts.next().is_some_and(|l| l.parse::<u32>().is_ok())
                        && parts
                            .next()
                            .is_some_and(|c| c.trim().parse::<u32>().is_ok())
                });
            assert!(has_position, "{keys:?}: line and column: {run:?}");
        }
        assert!(!sb.path("out").exists(), "nothing written for {keys:?}");
        assert!(!sb.path("state").exists(), "no state for {keys:?}");
    }
    assert_eq!(sb.fake.stats().batch_export_calls, 0);
}

#[test]
fn an_inline_secret_is_refused() {
    let sb = Sandbox::new();
    let text = sb
        .header()
        .replace("    token_file: token\n", "    token: abcdef\n")
        + "keys: {}\n";
    sb.write_manifest(&text);
    let run = sb.run(&["validate"]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(
        run.stderr.contains("token_file"),
        "says what to write instead: {run:?}"
    );
    assert!(
        !run.stderr.contains("abcdef"),
        "does not echo the secret: {run:?}"
    );
}

#[test]
fn usage_errors_are_exit_2() {
    let sb = Sandbox::new();
    assert_eq!(sb.run(&["frobnicate"]).code, 2);
    assert_eq!(sb.run(&["reconcile", "--no-such-flag"]).code, 2);
}

#[test]
fn validate_reports_the_auth_source_and_warns_on_loose_permissions() {
    let sb = Sandbox::new();
    sb.manifest("", "  a: out/a.pem\n");
    let run = sb.run(&["validate"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains("token from file"), "{run:?}");
    assert!(!run.all().contains(fake_kps::TOKEN));
    std::fs::set_permissions(
        sb.path("token"),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let run = sb.run(&["validate"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stderr.contains("chmod 0600"), "{run:?}");
    std::fs::remove_file(sb.path("token")).unwrap();
    let run = sb.run(&["validate"]);
    assert_eq!(run.code, 2, "{run:?}");
    assert_eq!(
        sb.fake.stats().batch_export_calls + sb.fake.stats().list_calls,
        0,
        "no network"
    );
}

#[test]
fn plan_writes_nothing_and_follows_terraforms_exit_codes() {
    let sb = Sandbox::new();
    sb.fake.add_key("a");
    sb.manifest("", "  a: out/a.pem\n");
    let run = sb.run(&["plan"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout.contains("create") && run.stdout.contains("a"),
        "{run:?}"
    );
    assert_eq!(sb.run(&["plan", "--detailed-exitcode"]).code, 2);
    assert!(!sb.path("out").exists());
    assert_eq!(sb.fake.stats().batch_export_calls, 0);
    assert_eq!(sb.reconcile().code, 0);
    let run = sb.run(&["plan", "--detailed-exitcode"]);
    assert_eq!(run.code, 0, "{run:?}");
    std::fs::write(sb.path("manifest.yaml"), "version: [").unwrap();
    assert_eq!(
        sb.run(&["plan", "--detailed-exitcode"]).code,
        1,
        "error is 1 with --detailed-exitcode"
    );
}

#[test]
fn status_shows_what_is_managed() {
    let sb = Sandbox::new();
    sb.fake.add_key("a");
    sb.manifest("", "  a: out/a.pem\n  b: out/b.pem\n");
    assert_eq!(sb.reconcile().code, 1);
    let run = sb.run(&["status"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout.contains("in-place") && run.stdout.contains("out/a.pem"),
        "{run:?}"
    );
    assert!(
        run.stdout.contains("last error") && run.stdout.contains("KPS.6004"),
        "{run:?}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&sb.run(&["status", "--json"]).stdout).unwrap();
    assert_eq!(json["last_pass"]["failed"], 1);
    assert_eq!(json["keys"][0]["state"], "in-place");
    assert_eq!(json["keys"][1]["state"], "create");
}

#[test]
fn global_flags_go_before_or_after_the_command_and_json_logs_are_json() {
    let sb = Sandbox::new();
    sb.fake.add_key("a");
    sb.manifest("", "  a: out/a.pem\n");
    let run = sb.run(&["--log-format", "json", "--log-level", "info", "reconcile"]);
    assert_eq!(run.code, 0, "{run:?}");
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert!(!lines.is_empty(), "{run:?}");
    for line in lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v["level"].is_string(), "{line}");
    }
    let run = sb.run(&["reconcile", "--log-level", "debug", "--log-format", "text"]);
    assert_eq!(run.code, 0, "{run:?}");
}

#[test]
fn no_key_or_token_in_any_output_even_at_trace_level() {
    let sb = Sandbox::new();
    for n in ["a", "b"] {
        sb.fake.add_key(n);
    }
    // A retried 500, a 401 that makes the credentials be read again, and the single-export
    // JSON path (b is left out of the zip) all run at trace level.
    sb.fake.fail_next(1, 500);
    sb.fake.fail_next(1, 401);
    sb.fake.set_omit_from_zip(Some("b".into()));
    sb.manifest("", "  a: out/a.pem\n  b: out/b.pem\n  missing: out/m.pem\n");
    let run = sb.run(&["--log-level", "trace", "reconcile"]);
    assert_eq!(run.code, 1, "{run:?}");
    let out = run.all();
    for n in ["a", "b"] {
        let key = sb.fake.private_key(n).unwrap();
        let body_line = key.lines().nth(1).unwrap();
        assert!(!out.contains(body_line), "key material of {n} leaked");
    }
    assert!(!out.contains("PRIVATE KEY"), "no key header in logs");
    assert!(!out.contains(fake_kps::TOKEN), "token leaked");
    let stats = sb.fake.stats();
    assert!(
        stats.single_export_calls >= 1 && stats.unauthorized >= 1,
        "{stats:?}"
    );
    assert!(sb.path("out/b.pem").exists());
}

#[test]
fn a_ca_file_that_is_not_pem_is_a_clear_error_before_any_call() {
    let sb = Sandbox::new();
    sb.fake.add_key("a");
    std::fs::write(sb.path("ca.pem"), "not a certificate").unwrap();
    let text = sb
        .header()
        .replace("  auth:\n", "  ca_file: ca.pem\n  auth:\n")
        + "keys:\n  a: out/a.pem\n";
    sb.write_manifest(&text);
    let run = sb.reconcile();
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("ca.pem"), "{run:?}");
    assert_eq!(sb.fake.stats().batch_export_calls, 0);
}
