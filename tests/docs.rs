//! Golden tests: what the README shows kps-sync printing is what kps-sync prints. Each case runs
//! the real binary, replaces only what differs by host (temp paths, the fake's address, request
//! ids), and compares with the README's text, line by line.

mod common;

use std::path::Path;

use common::*;

fn readme() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap()
}

/// The body of the first fenced block after the line containing `marker`.
fn block_after(readme: &str, marker: &str) -> Vec<String> {
    let start = readme
        .find(marker)
        .unwrap_or_else(|| panic!("README lacks {marker:?}"));
    let mut lines = readme[start..]
        .lines()
        .skip_while(|l| !l.starts_with("```"));
    lines.next();
    lines
        .take_while(|l| !l.starts_with("```"))
        .map(str::to_owned)
        .collect()
}

/// Request ids are random: the README shows `[request id 5c1e...]`.
fn mask_request_id(line: &str) -> String {
    match (line.find("[request id "), line.find("];")) {
        (Some(a), Some(b)) if a < b => {
            format!("{}[request id 5c1e...]{}", &line[..a], &line[b + 1..])
        }
        _ => line.to_owned(),
    }
}

#[test]
fn readme_error_line_is_the_real_one() {
    let sb = Sandbox::new();
    sb.fake.add_key("web-prod");
    sb.manifest(
        "  verify_remote: false\n",
        "  web-prod: out/web-prod.pem\n  db-backup: out/id_backup\n",
    );
    let run = sb.reconcile();
    assert_eq!(run.code, 1, "{run:?}");
    let real: Vec<String> = run
        .stderr
        .lines()
        .filter(|l| l.starts_with("error: "))
        .map(|l| {
            mask_request_id(&l.replace(
                &sb.path("out/id_backup").display().to_string(),
                "/srv/backup/.ssh/id_backup",
            ))
        })
        .collect();
    let documented = block_after(
        &readme(),
        "Each key that is not in place gets exactly one line",
    );
    assert_eq!(real, documented);
}

#[test]
fn readme_check_example_is_the_real_output() {
    let sb = Sandbox::new();
    sb.fake.add_key("web-prod");
    for i in 0..13 {
        sb.fake.add_key(&format!("other-{i:02}"));
    }
    let creds = sb.path("creds");
    std::fs::create_dir(&creds).unwrap();
    for (file, value) in [("kps_ak", fake_kps::AK), ("kps_sk", fake_kps::SK)] {
        std::fs::write(creds.join(file), format!("{value}\n")).unwrap();
        std::fs::set_permissions(
            creds.join(file),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
    }
    sb.write_manifest(&format!(
        "version: 1\nkps:\n  endpoint: {}\n  project_id: {}\n  auth:\n    access_key_file: $CREDENTIALS_DIRECTORY/kps_ak\n    secret_key_file: $CREDENTIALS_DIRECTORY/kps_sk\nsettings:\n  state_dir: state\nkeys:\n  web-prod: /etc/ssh/keys/web-prod.pem\n  db-backup: /srv/backup/.ssh/id_backup\n",
        sb.fake.url(),
        fake_kps::PROJECT_ID
    ));
    let out = sb
        .cmd(&["check"])
        .env("CREDENTIALS_DIRECTORY", &creds)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let real: Vec<String> = text
        .lines()
        .filter(|l| !l.contains(" WARN "))
        .map(|l| {
            l.replace(&sb.fake.url(), "https://kms.cn-north-4.myhuaweicloud.com")
                .replace(
                    &creds.display().to_string(),
                    "/run/credentials/kps-sync.service",
                )
        })
        .collect();
    let documented: Vec<String> = block_after(&readme(), "`kps-sync check` asks KPS, once")
        .into_iter()
        .skip(1) // the `$ kps-sync check` prompt
        .collect();
    assert_eq!(real, documented);
}

#[test]
fn readme_validate_example_is_the_real_output() {
    let sb = Sandbox::new();
    let creds = sb.path("credentials");
    std::fs::create_dir(&creds).unwrap();
    for (file, value, mode) in [("ak", fake_kps::AK, 0o600), ("sk", fake_kps::SK, 0o640)] {
        std::fs::write(creds.join(file), format!("{value}\n")).unwrap();
        std::fs::set_permissions(
            creds.join(file),
            std::os::unix::fs::PermissionsExt::from_mode(mode),
        )
        .unwrap();
    }
    let keys: String = (0..12)
        .map(|i| format!("  k{i:02}: out/k{i:02}.pem\n"))
        .collect();
    sb.write_manifest(&format!(
        "version: 1\nkps:\n  region: cn-north-4\n  project_id: {}\n  auth:\n    access_key_file: credentials/ak\n    secret_key_file: credentials/sk\nsettings:\n  state_dir: state\nkeys:\n{keys}",
        fake_kps::PROJECT_ID
    ));
    let run = sb.run(&["validate"]);
    assert_eq!(run.code, 0, "{run:?}");
    let dir = sb.dir.path().display().to_string();
    let real: Vec<String> = (run.stderr.clone() + &run.stdout)
        .lines()
        .map(|l| {
            l.replace(
                &format!("{dir}/manifest.yaml"),
                "/etc/kps-sync/manifest.yaml",
            )
            .replace(&format!("{dir}/credentials"), "/etc/kps-sync/credentials")
        })
        .collect();
    let documented: Vec<String> = block_after(&readme(), "uses no network. It shows the")
        .into_iter()
        .skip(1)
        .collect();
    assert_eq!(real, documented);
}
