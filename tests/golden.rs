//! Golden CLI tests: for each case, the arguments, the exit code and the exact stdout and stderr
//! of the real binary against the fake KPS, kept in `tests/golden/NAME.txt`.
//!
//! The sandbox folder and the fake's URL are replaced by `[ROOT]` and `[URL]`; `[..]` in a
//! golden file matches anything up to the end of that line (used for timestamps). After a
//! deliberate change of output, rewrite the files with `SNAPSHOTS=overwrite cargo test --test
//! golden` and review the diff.

mod common;

use common::*;
use snapbox::{Assert, Data, Redactions};

fn golden(name: &str, sb: &Sandbox, args: &[&str]) {
    let run = sb.run(args);
    let actual = format!(
        "$ kps-sync {}\nexit: {}\n--- stdout\n{}--- stderr\n{}",
        args.join(" "),
        run.code,
        run.stdout,
        run.stderr
    );
    let mut redactions = Redactions::new();
    redactions
        .insert("[ROOT]", sb.dir.path().to_path_buf())
        .unwrap();
    redactions.insert("[URL]", sb.fake.url()).unwrap();
    let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(format!("{name}.txt"));
    Assert::new()
        .action_env("SNAPSHOTS")
        .redact_with(redactions)
        .eq(actual, Data::read_from(&file, None));
}

#[test]
fn help() {
    let sb = Sandbox::new();
    golden("help", &sb, &["--help"]);
    for cmd in ["reconcile", "run", "plan", "status", "validate", "check"] {
        golden(&format!("help-{cmd}"), &sb, &[cmd, "--help"]);
    }
}

/// Every kind of manifest error, as `validate` reports it (exit 2, file:line:column, what to do).
#[test]
fn manifest_errors() {
    let sb = Sandbox::new();
    std::fs::create_dir(sb.path("state")).unwrap();
    std::fs::set_permissions(
        sb.path("state"),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    let keys = [
        ("yaml-syntax", "  a: [unclosed\n"),
        ("duplicate-key", "  a: out/a.pem\n  a: out/b.pem\n"),
        ("bad-name", "  bad name!: out/a.pem\n"),
        ("same-path", "  a: out/x.pem\n  b: out/x.pem\n"),
        (
            "mode-too-open",
            "  a:\n    path: out/a.pem\n    mode: \"0644\"\n",
        ),
        (
            "mode-unquoted",
            "  a:\n    path: out/a.pem\n    mode: 0600\n",
        ),
        (
            "unknown-field",
            "  a:\n    path: out/a.pem\n    colour: blue\n",
        ),
        (
            "unknown-owner",
            "  a:\n    path: out/a.pem\n    owner: no-such-user-xyz\n",
        ),
        (
            "bad-recipient",
            "  a:\n    path: out/a.pem\n    age_recipients: [\"age1notvalid\"]\n",
        ),
        (
            "on-change-string",
            "  a:\n    path: out/a.pem\n    on_change: systemctl reload nginx\n",
        ),
        ("inside-state-dir", "  a: state/a.pem\n"),
    ];
    for (name, yaml) in keys {
        sb.manifest("", yaml);
        golden(&format!("manifest-{name}"), &sb, &["validate"]);
    }
    let whole = [
        ("no-kps", "version: 1\nkeys:\n  a: out/a.pem\n".to_string()),
        (
            "unknown-region",
            format!(
                "version: 1\nkps:\n  region: cn-north4\n  project_id: {}\nkeys:\n  a: out/a.pem\n",
                fake_kps::PROJECT_ID
            ),
        ),
        (
            "two-auth-methods",
            sb.header().replace(
                "    token_file: token\n",
                "    token_file: token\n    ecs_metadata: {}\n",
            ) + "keys:\n  a: out/a.pem\n",
        ),
        (
            "bad-setting",
            sb.header() + "  interval: soon\n  concurrency: 0\nkeys:\n  a: out/a.pem\n",
        ),
    ];
    for (name, text) in whole {
        sb.write_manifest(&text);
        golden(&format!("manifest-{name}"), &sb, &["validate"]);
    }
}

#[test]
fn plan_and_status() {
    let sb = Sandbox::new();
    sb.fake.add_key("web");
    sb.fake.add_key("db");
    sb.manifest(
        "",
        "  web: out/web.pem\n  db:\n    path: out/db.pem\n    public_key: true\n",
    );
    golden("plan-fresh", &sb, &["plan"]);
    golden("status-fresh", &sb, &["status"]);
    assert_eq!(sb.reconcile().code, 0);
    golden("plan-in-place", &sb, &["plan", "--detailed-exitcode"]);
    std::fs::write(sb.path("out/web.pem"), "edited\n").unwrap();
    golden("plan-drift", &sb, &["plan", "--detailed-exitcode"]);
    golden("status-drift", &sb, &["status"]);
    golden("status-json", &sb, &["status", "--json"]);
}

#[test]
fn reconcile_with_a_missing_key_then_status() {
    let sb = Sandbox::new();
    sb.fake.add_key("web");
    sb.manifest("", "  web: out/web.pem\n  gone: out/gone.pem\n");
    golden("reconcile-missing-key", &sb, &["reconcile"]);
    golden("status-failed", &sb, &["status"]);
    golden("reconcile-again", &sb, &["reconcile"]);
}
