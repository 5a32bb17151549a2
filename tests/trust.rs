//! Strict modes: every input that steers what kps-sync does as root must be owned by root (or
//! the user it runs as) and not writable by group or other. A loose one is refused with exit 2
//! before anything is done: the fake KPS sees no export, and no key is written.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::{Run, Sandbox, have_root};

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// `kps-sync reconcile -m manifest` for a manifest outside the sandbox's usual place.
fn reconcile_at(sb: &Sandbox, manifest: &Path) -> Run {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kps-sync"))
        .args(["reconcile", "-m"])
        .arg(manifest)
        .current_dir(sb.dir.path())
        .env_remove("KPS_SYNC_AUTH_TOKEN")
        .env_remove("HUAWEICLOUD_SDK_AK")
        .env_remove("HUAWEICLOUD_SDK_SK")
        .env_remove("RUST_LOG")
        .env("HOME", sb.dir.path())
        .output()
        .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The sandbox's manifest text with absolute paths, to live in another folder.
fn absolute_manifest(sb: &Sandbox) -> String {
    let header = sb
        .header()
        .replace(
            "token_file: token",
            &format!("token_file: {}", sb.path("token").display()),
        )
        .replace(
            "state_dir: state",
            &format!("state_dir: {}", sb.path("state").display()),
        );
    format!("{header}keys:\n  web: {}\n", sb.path("keys/web").display())
}

fn sandbox_with_key() -> Sandbox {
    let sb = Sandbox::new();
    sb.fake.add_key("web");
    sb.manifest("", &format!("  web: {}\n", sb.path("keys/web").display()));
    sb
}

/// The run was refused as the issue asks: exit 2, the path, its owner and mode and the fix
/// named, nothing exported, no key written.
fn assert_refused(sb: &Sandbox, run: &Run, path: &Path, mode: &str, fix: &str) {
    assert_eq!(run.code, 2, "{run:?}");
    let err = &run.stderr;
    assert!(err.contains(&format!("{}: ", path.display())), "{run:?}");
    assert!(err.contains(&format!("mode {mode}")), "{run:?}");
    assert!(err.contains("owner root (uid 0)"), "{run:?}");
    assert!(err.contains(fix), "{run:?}");
    let stats = sb.fake.stats();
    assert_eq!(
        (stats.batch_export_calls, stats.single_export_calls),
        (0, 0),
        "nothing exported"
    );
    assert!(!sb.path("keys/web").exists(), "no key written");
}

#[test]
fn a_world_writable_manifest_is_refused_by_reconcile_and_validate() {
    let sb = sandbox_with_key();
    let manifest = sb.path("manifest.yaml");
    chmod(&manifest, 0o666);
    let fix = format!("run `chmod go-w {}`", manifest.display());
    let run = sb.reconcile();
    assert_refused(&sb, &run, &manifest, "0666", &fix);
    assert!(
        run.stderr
            .contains("the manifest is writable by its group and writable by every user"),
        "{run:?}"
    );
    let run = sb.run(&["validate"]);
    assert_refused(&sb, &run, &manifest, "0666", &fix);
    let run = sb.run(&["check"]);
    assert_refused(&sb, &run, &manifest, "0666", &fix);
    let run = sb.run(&["plan"]);
    assert_eq!(run.code, 2, "{run:?}");
    assert_eq!(sb.fake.stats().list_calls, 0, "no KPS call at all");

    chmod(&manifest, 0o644);
    let run = sb.reconcile();
    assert_eq!(run.code, 0, "{run:?}");
    assert!(sb.path("keys/web").exists());
}

#[test]
fn a_group_writable_folder_above_the_manifest_is_refused() {
    let sb = Sandbox::new();
    sb.fake.add_key("web");
    let etc = sb.path("etc");
    std::fs::create_dir(&etc).unwrap();
    std::fs::write(etc.join("manifest.yaml"), absolute_manifest(&sb)).unwrap();
    chmod(&etc, 0o775);
    let run = reconcile_at(&sb, &etc.join("manifest.yaml"));
    assert_refused(
        &sb,
        &run,
        &etc,
        "0775",
        &format!("`chmod go-w {}`, or move the manifest", etc.display()),
    );
    assert!(
        run.stderr.contains("a folder above the manifest"),
        "{run:?}"
    );
}

#[test]
fn a_folder_above_the_manifest_owned_by_another_user_is_refused() {
    if !have_root() {
        return;
    }
    let sb = sandbox_with_key();
    std::os::unix::fs::chown(sb.dir.path(), Some(4242), None).unwrap();
    let run = sb.reconcile();
    std::os::unix::fs::chown(sb.dir.path(), Some(0), None).unwrap();
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("is owned by uid 4242"), "{run:?}");
    assert!(
        run.stderr
            .contains(&format!("`chown root {}`", sb.dir.path().display())),
        "{run:?}"
    );
    assert_eq!(sb.fake.stats().batch_export_calls, 0);
}

#[test]
fn a_root_owned_sticky_folder_above_the_manifest_is_accepted() {
    let sb = Sandbox::new();
    sb.fake.add_key("web");
    let shared = sb.path("shared");
    std::fs::create_dir(&shared).unwrap();
    chmod(&shared, 0o1777);
    let manifest = shared.join("manifest.yaml");
    std::fs::write(&manifest, absolute_manifest(&sb)).unwrap();
    let run = reconcile_at(&sb, &manifest);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(sb.path("keys/web").exists());
}

#[test]
fn a_loose_state_folder_is_refused() {
    let sb = sandbox_with_key();
    let state = sb.path("state");
    std::fs::create_dir(&state).unwrap();
    chmod(&state, 0o777);
    let run = sb.reconcile();
    assert_refused(
        &sb,
        &run,
        &state,
        "0777",
        &format!("run `chmod go-w {}`", state.display()),
    );
    // Located at the manifest line that names it.
    let manifest = sb.path("manifest.yaml");
    assert!(
        run.stderr
            .contains(&format!("{}:8:14: ", manifest.display())),
        "{run:?}"
    );
    assert!(run.stderr.contains("state_dir is writable"), "{run:?}");
    let run = sb.run(&["validate"]);
    assert_eq!(run.code, 2, "{run:?}");
}

#[test]
fn a_loose_recipients_file_is_refused() {
    let sb = Sandbox::new();
    sb.fake.add_key("web");
    let recipients = sb.path("recipients.txt");
    std::fs::write(
        &recipients,
        "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p\n",
    )
    .unwrap();
    chmod(&recipients, 0o646);
    sb.manifest(
        "",
        &format!(
            "  web:\n    path: {}\n    age_recipients_file: recipients.txt\n",
            sb.path("keys/web").display()
        ),
    );
    let run = sb.reconcile();
    assert_refused(
        &sb,
        &run,
        &recipients,
        "0646",
        &format!("run `chmod go-w {}`", recipients.display()),
    );
    assert!(
        run.stderr
            .contains("age_recipients_file is writable by every user"),
        "{run:?}"
    );
    chmod(&recipients, 0o644);
    let run = sb.reconcile();
    assert_eq!(run.code, 0, "{run:?}");
}

#[test]
fn a_credential_file_others_can_write_is_an_error_readable_only_a_warning() {
    let sb = sandbox_with_key();
    let token = sb.path("token");
    chmod(&token, 0o640);
    let run = sb.run(&["validate"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stderr.contains("warning:") && run.stderr.contains("readable by its group"),
        "{run:?}"
    );

    chmod(&token, 0o620);
    let run = sb.reconcile();
    assert_refused(
        &sb,
        &run,
        &token,
        "0620",
        &format!("run `chmod go-w {}`", token.display()),
    );
    assert!(
        run.stderr
            .contains("a credential file is writable by its group"),
        "{run:?}"
    );
    let run = sb.run(&["validate"]);
    assert_eq!(run.code, 2, "{run:?}");
}

#[test]
fn a_loose_ca_file_is_refused() {
    let sb = sandbox_with_key();
    let ca = sb.path("ca.pem");
    std::fs::write(&ca, "not read: refused before").unwrap();
    chmod(&ca, 0o666);
    let text = std::fs::read_to_string(sb.path("manifest.yaml"))
        .unwrap()
        .replace("  auth:\n", "  ca_file: ca.pem\n  auth:\n");
    sb.write_manifest(&text);
    let run = sb.reconcile();
    assert_refused(
        &sb,
        &run,
        &ca,
        "0666",
        &format!("run `chmod go-w {}`", ca.display()),
    );
}

#[test]
fn hook_env_cannot_list_a_credential() {
    let sb = sandbox_with_key();
    sb.manifest(
        "  hook_env: [TZ, HUAWEICLOUD_SDK_SK, \"1BAD\"]\n",
        &format!("  web: {}\n", sb.path("keys/web").display()),
    );
    let run = sb.run(&["validate"]);
    assert_eq!(run.code, 2, "{run:?}");
    let manifest = sb.path("manifest.yaml").display().to_string();
    assert!(
        run.stderr.contains(&format!(
            "{manifest}:9:18: `hook_env` lists `HUAWEICLOUD_SDK_SK`: it holds or leads to a KPS credential"
        )),
        "{run:?}"
    );
    assert!(
        run.stderr
            .contains(&format!("{manifest}:9:38: `hook_env` lists `1BAD`")),
        "{run:?}"
    );
    let run = sb.reconcile();
    assert_eq!(run.code, 2, "{run:?}");
    assert_eq!(sb.fake.stats().batch_export_calls, 0);
}

#[test]
fn a_writable_sdk_credentials_file_in_home_is_refused() {
    let sb = Sandbox::new();
    sb.fake.add_key("web");
    let text = std::fs::read_to_string(
        sb.manifest("", &format!("  web: {}\n", sb.path("keys/web").display())),
    )
    .unwrap()
    .replace("  auth:\n    token_file: token\n", "");
    sb.write_manifest(&text);
    let dir = sb.path(".huaweicloud");
    std::fs::create_dir(&dir).unwrap();
    let file = dir.join("credentials");
    std::fs::write(
        &file,
        format!("[basic]\nak = {}\nsk = {}\n", fake_kps::AK, fake_kps::SK),
    )
    .unwrap();
    chmod(&file, 0o666);
    for cmd in ["reconcile", "validate", "check"] {
        let run = sb.run(&[cmd]);
        assert_refused(
            &sb,
            &run,
            &file,
            "0666",
            &format!("run `chmod go-w {}`", file.display()),
        );
        assert!(!run.all().contains(fake_kps::SK), "{run:?}");
    }
    chmod(&file, 0o600);
    let run = sb.reconcile();
    assert_eq!(run.code, 0, "{run:?}");
}
