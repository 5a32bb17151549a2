//! Authentication end to end (issue #3): the real binary against the fake KPS, IAM and
//! metadata service, once per credential source, through renewals in the middle of a run, and
//! for each failure an operator will meet. No test output may carry a credential.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::*;
use fake_kps::AuthMethod;

const KEYS: [&str; 3] = ["web-prod", "db-backup", "ci"];

/// Every variable that could pick a credential behind a test's back.
const AUTH_VARS: [&str; 7] = [
    "KPS_SYNC_AUTH_TOKEN",
    "HUAWEICLOUD_SDK_AK",
    "HUAWEICLOUD_SDK_SK",
    "HUAWEICLOUD_SDK_SECURITY_TOKEN",
    "HUAWEICLOUD_SDK_CREDENTIALS_FILE",
    "CREDENTIALS_DIRECTORY",
    "RUST_LOG",
];

/// A manifest pointing at the fake with `auth_yaml` as the `kps.auth` block (each line
/// indented by 4 spaces; empty: no `auth:` at all), `settings_extra` lines, and `names`.
fn manifest(sb: &Sandbox, auth_yaml: &str, settings_extra: &str, names: &[String]) {
    let auth = if auth_yaml.is_empty() {
        String::new()
    } else {
        format!("  auth:\n{auth_yaml}")
    };
    let keys: String = names
        .iter()
        .map(|n| format!("  {n}: out/{n}.pem\n"))
        .collect();
    sb.write_manifest(&format!(
        "version: 1\nkps:\n  endpoint: {}\n  project_id: {}\n{auth}settings:\n  state_dir: state\n{settings_extra}keys:\n{keys}",
        sb.fake.url(),
        fake_kps::PROJECT_ID
    ));
}

fn names(n: usize) -> Vec<String> {
    if n <= KEYS.len() {
        return KEYS[..n].iter().map(|s| s.to_string()).collect();
    }
    (0..n).map(|i| format!("key-{i:03}")).collect()
}

/// A sandbox whose fake holds `n` keys.
fn sandbox_with_keys(n: usize) -> (Sandbox, Vec<String>) {
    let sb = Sandbox::new();
    let names = names(n);
    for name in &names {
        sb.fake.add_key(name);
    }
    (sb, names)
}

fn secret_file(sb: &Sandbox, rel: &str, text: &str, mode: u32) -> PathBuf {
    let path = sb.path(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, format!("{text}\n")).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
    path
}

/// The binary with `args`, a clean auth environment plus `env`.
fn run(sb: &Sandbox, args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd: Command = sb.cmd(args);
    for var in AUTH_VARS {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied());
    let out = cmd.output().unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn assert_exported(sb: &Sandbox, names: &[String], run: &Run) {
    assert_eq!(run.code, 0, "{run:?}");
    for n in names {
        let written = std::fs::read_to_string(sb.path(&format!("out/{n}.pem")))
            .unwrap_or_else(|e| panic!("out/{n}.pem: {e}\n{run:?}"));
        assert_eq!(written, sb.fake.private_key(n).unwrap(), "{n}");
    }
}

fn assert_hides(run: &Run, secrets: &[&str]) {
    let all = run.all();
    for secret in secrets {
        assert!(
            !all.contains(secret),
            "a credential leaked into the output: {run:?}"
        );
    }
}

/// Every credential the fake knows, and the prefix of every security token it issues.
const FAKE_SECRETS: [&str; 4] = [
    fake_kps::SK,
    fake_kps::TOKEN,
    fake_kps::IAM_PASSWORD,
    "gQpjbi1ub3J0aC00",
];

/// Reconcile at trace level with `auth_yaml` and `env`; the keys must land, the fake must
/// have seen `method`, and `validate` must name the source with `described`.
fn exports_with(
    sb: &Sandbox,
    names: &[String],
    auth_yaml: &str,
    env: &[(&str, &str)],
    method: AuthMethod,
    described: &str,
) {
    manifest(sb, auth_yaml, "", names);
    let validate = run(sb, &["validate"], env);
    assert_eq!(validate.code, 0, "{validate:?}");
    assert!(validate.stdout.contains(described), "{validate:?}");
    assert_eq!(
        sb.fake.stats().batch_export_calls
            + sb.fake.stats().iam_token_calls
            + sb.fake.stats().securitykey_calls,
        0,
        "validate touches no network"
    );
    let run = run(sb, &["--log-level", "trace", "reconcile"], env);
    assert_exported(sb, names, &run);
    let stats = sb.fake.stats();
    assert_eq!(
        stats.auth_methods_seen.iter().copied().collect::<Vec<_>>(),
        vec![method],
        "{stats:?}"
    );
    assert_eq!(stats.unauthorized, 0, "{stats:?}");
    assert_hides(&run, &FAKE_SECRETS);
    assert_hides(&validate, &FAKE_SECRETS);
}

// Each source.

#[test]
fn token_file() {
    let (sb, names) = sandbox_with_keys(3);
    exports_with(
        &sb,
        &names,
        "    token_file: token\n",
        &[],
        AuthMethod::Token,
        "token from file",
    );
}

#[test]
fn token_from_the_environment() {
    let (sb, names) = sandbox_with_keys(3);
    exports_with(
        &sb,
        &names,
        "",
        &[("KPS_SYNC_AUTH_TOKEN", fake_kps::TOKEN)],
        AuthMethod::Token,
        "token from the environment variable KPS_SYNC_AUTH_TOKEN",
    );
}

#[test]
fn aksk_files() {
    let (sb, names) = sandbox_with_keys(3);
    secret_file(&sb, "ak", fake_kps::AK, 0o600);
    secret_file(&sb, "sk", fake_kps::SK, 0o600);
    exports_with(
        &sb,
        &names,
        "    access_key_file: ak\n    secret_key_file: sk\n",
        &[],
        AuthMethod::AkSk,
        "AK/SK signing, keys from files",
    );
}

#[test]
fn aksk_from_the_sdk_environment() {
    let (sb, names) = sandbox_with_keys(3);
    exports_with(
        &sb,
        &names,
        "",
        &[
            ("HUAWEICLOUD_SDK_AK", fake_kps::AK),
            ("HUAWEICLOUD_SDK_SK", fake_kps::SK),
        ],
        AuthMethod::AkSk,
        "AK/SK signing, keys from the environment variables HUAWEICLOUD_SDK_AK and HUAWEICLOUD_SDK_SK",
    );
}

#[test]
fn aksk_from_the_sdk_credentials_file_in_home() {
    let (sb, names) = sandbox_with_keys(3);
    // The harness sets HOME to the sandbox.
    let text = format!(
        "[basic]\nak = {}\nsk = {}\nproject_id = {}",
        fake_kps::AK,
        fake_kps::SK,
        fake_kps::PROJECT_ID
    );
    secret_file(&sb, ".huaweicloud/credentials", &text, 0o600);
    exports_with(
        &sb,
        &names,
        "",
        &[],
        AuthMethod::AkSk,
        "Huawei Cloud SDK credentials file",
    );
}

#[test]
fn aksk_from_a_credentials_file_named_by_the_sdk_variable() {
    let (sb, names) = sandbox_with_keys(3);
    let text = format!("[basic]\nak = {}\nsk = {}", fake_kps::AK, fake_kps::SK);
    let path = secret_file(&sb, "elsewhere/creds", &text, 0o600);
    exports_with(
        &sb,
        &names,
        "",
        &[("HUAWEICLOUD_SDK_CREDENTIALS_FILE", path.to_str().unwrap())],
        AuthMethod::AkSk,
        &format!("{} [basic]", path.display()),
    );
}

fn iam_yaml(sb: &Sandbox) -> String {
    format!(
        "    iam:\n      user: {}\n      domain: {}\n      password_file: iam-password\n      endpoint: {}\n",
        fake_kps::IAM_USER,
        fake_kps::IAM_DOMAIN,
        sb.fake.url()
    )
}

#[test]
fn iam_password_exchanged_for_a_token() {
    let (sb, names) = sandbox_with_keys(3);
    secret_file(&sb, "iam-password", fake_kps::IAM_PASSWORD, 0o600);
    exports_with(
        &sb,
        &names,
        &iam_yaml(&sb),
        &[],
        AuthMethod::Token,
        &format!("IAM token for user `{}`", fake_kps::IAM_USER),
    );
    assert_eq!(sb.fake.stats().iam_token_calls, 1);
}

fn ecs_yaml(endpoint: &str) -> String {
    format!("    ecs_metadata:\n      endpoint: {endpoint}\n")
}

#[test]
fn ecs_agency_temporary_keys() {
    let (sb, names) = sandbox_with_keys(3);
    exports_with(
        &sb,
        &names,
        &ecs_yaml(&sb.fake.url()),
        &[],
        AuthMethod::AkSkSecurityToken,
        "ECS agency: temporary AK/SK from the metadata service at http://127.0.0.1:",
    );
    let stats = sb.fake.stats();
    assert_eq!(
        (stats.metadata_token_calls, stats.securitykey_calls),
        (1, 1)
    );
}

#[test]
fn systemd_credentials_directory() {
    let (sb, names) = sandbox_with_keys(2);
    let creds = sb.path("run-credentials");
    secret_file(&sb, "run-credentials/kps-token", fake_kps::TOKEN, 0o400);
    manifest(
        &sb,
        "    token_file: $CREDENTIALS_DIRECTORY/kps-token\n",
        "",
        &names,
    );
    let env = [("CREDENTIALS_DIRECTORY", creds.to_str().unwrap())];
    let validate = run(&sb, &["validate"], &env);
    assert_eq!(validate.code, 0, "{validate:?}");
    assert!(
        validate
            .stdout
            .contains(&format!("token from file {}/kps-token", creds.display())),
        "{validate:?}"
    );
    assert_exported(&sb, &names, &run(&sb, &["reconcile"], &env));
}

// Precedence.

#[test]
fn without_a_method_sdk_keys_win_over_the_token_and_the_credentials_file() {
    let (sb, names) = sandbox_with_keys(2);
    // Both of these would fail: only the SDK keys may be used.
    secret_file(
        &sb,
        ".huaweicloud/credentials",
        "[basic]\nak = AKBAD\nsk = SKBAD",
        0o600,
    );
    manifest(&sb, "", "", &names);
    let env = [
        ("HUAWEICLOUD_SDK_AK", fake_kps::AK),
        ("HUAWEICLOUD_SDK_SK", fake_kps::SK),
        ("KPS_SYNC_AUTH_TOKEN", "not-a-valid-token"),
    ];
    let run = run(&sb, &["reconcile"], &env);
    assert_exported(&sb, &names, &run);
    let stats = sb.fake.stats();
    assert_eq!(stats.auth_methods_seen.len(), 1, "{stats:?}");
    assert_eq!(stats.unauthorized, 0);
}

#[test]
fn a_method_in_the_manifest_wins_over_the_environment() {
    let (sb, names) = sandbox_with_keys(2);
    manifest(&sb, "    token_file: token\n", "", &names);
    let env = [
        ("HUAWEICLOUD_SDK_AK", "AKBAD"),
        ("HUAWEICLOUD_SDK_SK", "SKBAD"),
    ];
    assert_exported(&sb, &names, &run(&sb, &["reconcile"], &env));
    assert!(
        sb.fake
            .stats()
            .auth_methods_seen
            .contains(&AuthMethod::Token)
    );
}

#[test]
fn no_credentials_anywhere_is_exit_2_saying_what_to_add() {
    let (sb, names) = sandbox_with_keys(1);
    manifest(&sb, "", "", &names);
    for cmd in ["validate", "reconcile"] {
        let run = run(&sb, &[cmd], &[]);
        assert_eq!(run.code, 2, "{run:?}");
        assert!(run.stderr.contains("no KPS credentials"), "{run:?}");
        assert!(run.stderr.contains("token_file"), "{run:?}");
    }
    assert_eq!(sb.fake.stats().batch_export_calls, 0);
}

// Renewal in the middle of a run.

/// 60 keys, one batch in flight, 500 ms per KPS call: a pass of about 3 s (no listing first:
/// the token lifetimes below are tuned to that length).
const LONG_PASS_SETTINGS: &str = "  concurrency: 1\n  verify_remote: false\n";

fn long_pass() -> (Sandbox, Vec<String>) {
    let (sb, names) = sandbox_with_keys(60);
    sb.fake.set_latency(Duration::from_millis(500));
    (sb, names)
}

#[test]
fn an_iam_token_that_expires_during_a_pass_is_renewed_and_the_run_completes() {
    let (sb, names) = long_pass();
    sb.fake.set_iam_token_lifetime(Duration::from_secs(2));
    secret_file(&sb, "iam-password", fake_kps::IAM_PASSWORD, 0o600);
    manifest(&sb, &iam_yaml(&sb), LONG_PASS_SETTINGS, &names);
    let run = run(&sb, &["reconcile"], &[]);
    assert_exported(&sb, &names, &run);
    let stats = sb.fake.stats();
    assert!(stats.iam_token_calls >= 2, "{stats:?}");
    // Renewed before expiry (at 90 % of this short lifetime), or once after a 401 for a request
    // in flight as it expired: at most one 401 per token, never one per request. (A loaded
    // machine stretches the pass over more token lifetimes, hence not a fixed count.)
    assert!(stats.unauthorized < stats.iam_token_calls, "{stats:?}");
    assert!(stats.batch_export_calls >= 6, "{stats:?}");
}

#[test]
fn agency_keys_that_expire_during_a_pass_are_renewed_and_the_run_completes() {
    let (sb, names) = long_pass();
    sb.fake
        .set_metadata_credential_lifetime(Duration::from_secs(2));
    manifest(&sb, &ecs_yaml(&sb.fake.url()), LONG_PASS_SETTINGS, &names);
    let run = run(&sb, &["reconcile"], &[]);
    assert_exported(&sb, &names, &run);
    let stats = sb.fake.stats();
    assert!(stats.securitykey_calls >= 2, "{stats:?}");
    // Renewed a third into their life: no request is refused.
    assert_eq!(stats.unauthorized, 0, "{stats:?}");
}

// Failures: each names the method and the endpoint and says what to check.

#[test]
fn a_wrong_iam_password_is_one_clear_error_without_the_password() {
    let (sb, names) = sandbox_with_keys(25);
    secret_file(&sb, "iam-password", "Wrong-PASSWORD-4711", 0o600);
    manifest(&sb, &iam_yaml(&sb), "", &names);
    let run = run(&sb, &["--log-level", "trace", "reconcile"], &[]);
    assert_eq!(run.code, 1, "{run:?}");
    assert_hides(&run, &["Wrong-PASSWORD-4711"]);
    assert!(
        run.stderr.contains(&format!(
            "IAM token for user `{}` in domain `{}` from {}",
            fake_kps::IAM_USER,
            fake_kps::IAM_DOMAIN,
            sb.fake.url()
        )),
        "{run:?}"
    );
    assert!(
        run.stderr.contains("IAM refused the user name or password"),
        "{run:?}"
    );
    assert!(
        run.stderr.contains("iam-password"),
        "names the file to check: {run:?}"
    );
    let errors = run
        .stderr
        .lines()
        .filter(|l| l.starts_with("error:"))
        .count();
    assert_eq!(errors, 1, "one line for the pass, not one per key: {run:?}");
    let stats = sb.fake.stats();
    assert_eq!(
        stats.iam_token_calls, 1,
        "one IAM call for three batches: {stats:?}"
    );
    assert_eq!(stats.batch_export_calls, 0);
    assert!(!sb.path("out").exists() || std::fs::read_dir(sb.path("out")).unwrap().count() == 0);
}

#[test]
fn a_wrong_secret_key_fails_naming_the_source_and_the_endpoint() {
    let (sb, names) = sandbox_with_keys(2);
    secret_file(&sb, "ak", fake_kps::AK, 0o600);
    secret_file(&sb, "sk", "SKwrong-SECRET-0000000000000000000000000", 0o600);
    manifest(
        &sb,
        "    access_key_file: ak\n    secret_key_file: sk\n",
        "",
        &names,
    );
    let run = run(&sb, &["--log-level", "trace", "reconcile"], &[]);
    assert_eq!(run.code, 1, "{run:?}");
    assert_hides(&run, &["SKwrong-SECRET"]);
    assert!(run.stderr.contains("HTTP 401"), "{run:?}");
    assert!(
        run.stderr.contains("AK/SK signing, keys from files"),
        "{run:?}"
    );
    assert!(run.stderr.contains(&sb.fake.url()), "{run:?}");
    assert!(run.stderr.contains("check the credentials"), "{run:?}");
    // Read again once after the first 401, then given up.
    assert_eq!(sb.fake.stats().unauthorized, 2);
}

#[test]
fn metadata_down_fails_naming_the_endpoint() {
    let (sb, names) = sandbox_with_keys(2);
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    manifest(&sb, &ecs_yaml(&closed), "", &names);
    let run = run(&sb, &["reconcile"], &[]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stderr.contains(&format!(
            "ECS agency credentials from the metadata service at {closed}: cannot reach it"
        )),
        "{run:?}"
    );
    assert_eq!(
        run.stderr
            .lines()
            .filter(|l| l.starts_with("error:"))
            .count(),
        1,
        "{run:?}"
    );
    assert_eq!(sb.fake.stats().batch_export_calls, 0);
}

#[test]
fn a_missing_secret_file_fails_validate_and_reconcile_naming_it() {
    let (sb, names) = sandbox_with_keys(1);
    secret_file(&sb, "ak", fake_kps::AK, 0o600);
    manifest(
        &sb,
        "    access_key_file: ak\n    secret_key_file: sk\n",
        "",
        &names,
    );
    let validate = run(&sb, &["validate"], &[]);
    assert_eq!(validate.code, 2, "{validate:?}");
    assert!(
        validate
            .stderr
            .contains(&sb.path("sk").display().to_string()),
        "{validate:?}"
    );
    let run = run(&sb, &["reconcile"], &[]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stderr.contains(&sb.path("sk").display().to_string()),
        "{run:?}"
    );
}

// validate.

#[test]
fn validate_warns_about_every_credential_file_others_can_read() {
    let (sb, names) = sandbox_with_keys(1);
    secret_file(&sb, "ak", fake_kps::AK, 0o644);
    secret_file(&sb, "sk", fake_kps::SK, 0o640);
    manifest(
        &sb,
        "    access_key_file: ak\n    secret_key_file: sk\n",
        "",
        &names,
    );
    let run = run(&sb, &["validate"], &[]);
    assert_eq!(run.code, 0, "{run:?}");
    for f in ["ak", "sk"] {
        assert!(
            run.stderr
                .contains(&format!("chmod 0600 {}", sb.path(f).display())),
            "{run:?}"
        );
    }
    assert_hides(&run, &FAKE_SECRETS);
}
