//! A hook's environment holds no credential, whichever auth source kps-sync used: it gets
//! `PATH`, `LANG`, the `KPS_SYNC_*` variables kps-sync sets, the systemd variables, and what
//! `settings.hook_env` lists; nothing else from kps-sync's environment.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::Sandbox;

/// Run one reconcile with `auth_yaml` (the `auth:` block, or nothing) and `env`, a hook writing
/// its environment to a file; return the hook's `NAME=value` lines.
fn hook_env_with(sb: &Sandbox, auth_yaml: &str, env: &[(&str, String)]) -> Vec<String> {
    sb.fake.add_key("web");
    let out = sb.path("hook-env");
    let text = format!(
        "version: 1\nkps:\n  endpoint: {}\n  project_id: {}\n{auth_yaml}settings:\n  state_dir: state\n  \
         hook_env: [LISTED_VAR]\nkeys:\n  web:\n    path: {}\n    on_change: [sh, -c, 'env > {}']\n",
        sb.fake.url(),
        fake_kps::PROJECT_ID,
        sb.path("keys/web").display(),
        out.display()
    );
    sb.write_manifest(&text);
    let mut cmd = sb.cmd(&["reconcile"]);
    cmd.env("LISTED_VAR", "listed")
        .env("UNLISTED_VAR", "unlisted");
    for (name, value) in env {
        cmd.env(name, value);
    }
    let run = cmd.output().unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let text = std::fs::read_to_string(&out).expect("the hook ran");
    text.lines().map(str::to_owned).collect()
}

/// No credential name or value, no unlisted variable; the listed one and the hook's own are
/// there.
fn assert_clean(lines: &[String], secrets: &[&str]) {
    let all = lines.join("\n");
    for secret in secrets {
        assert!(
            !all.contains(secret),
            "a credential reached the hook:\n{all}"
        );
    }
    for name in [
        "HUAWEICLOUD_SDK_AK=",
        "HUAWEICLOUD_SDK_SK=",
        "HUAWEICLOUD_SDK_SECURITY_TOKEN=",
        "KPS_SYNC_AUTH_TOKEN=",
        "CREDENTIALS_DIRECTORY=",
        "HOME=",
        "UNLISTED_VAR=",
    ] {
        assert!(
            !lines.iter().any(|l| l.starts_with(name)),
            "{name} reached the hook:\n{all}"
        );
    }
    for line in ["LISTED_VAR=listed", "KPS_SYNC_KEY=web"] {
        assert!(lines.iter().any(|l| l == line), "{line} missing:\n{all}");
    }
    assert!(lines.iter().any(|l| l.starts_with("PATH=")), "{all}");
}

#[test]
fn token_from_the_environment_does_not_reach_the_hook() {
    let sb = Sandbox::new();
    let lines = hook_env_with(
        &sb,
        "",
        &[("KPS_SYNC_AUTH_TOKEN", fake_kps::TOKEN.to_owned())],
    );
    assert_clean(&lines, &[fake_kps::TOKEN]);
}

#[test]
fn aksk_from_the_environment_does_not_reach_the_hook() {
    let sb = Sandbox::new();
    let lines = hook_env_with(
        &sb,
        "",
        &[
            ("HUAWEICLOUD_SDK_AK", fake_kps::AK.to_owned()),
            ("HUAWEICLOUD_SDK_SK", fake_kps::SK.to_owned()),
        ],
    );
    assert_clean(&lines, &[fake_kps::AK, fake_kps::SK]);
}

#[test]
fn aksk_from_the_sdk_credentials_file_does_not_reach_the_hook() {
    let sb = Sandbox::new();
    let dir = sb.path(".huaweicloud");
    std::fs::create_dir(&dir).unwrap();
    let file = dir.join("credentials");
    std::fs::write(
        &file,
        format!("[basic]\nak = {}\nsk = {}\n", fake_kps::AK, fake_kps::SK),
    )
    .unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    // HOME (the sandbox) leads to the file; it is not passed either.
    let lines = hook_env_with(&sb, "", &[]);
    assert_clean(&lines, &[fake_kps::AK, fake_kps::SK]);
}

#[test]
fn a_token_file_in_the_systemd_credentials_directory_does_not_reach_the_hook() {
    let sb = Sandbox::new();
    let creds = sb.path("credentials");
    std::fs::create_dir(&creds).unwrap();
    let token = creds.join("kps-token");
    std::fs::write(&token, fake_kps::TOKEN).unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o400)).unwrap();
    let lines = hook_env_with(
        &sb,
        "  auth:\n    token_file: $CREDENTIALS_DIRECTORY/kps-token\n",
        &[(
            "CREDENTIALS_DIRECTORY",
            creds.to_string_lossy().into_owned(),
        )],
    );
    assert_clean(&lines, &[fake_kps::TOKEN, &creds.to_string_lossy()]);
}
