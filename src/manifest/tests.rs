//! Loader tests: whole manifests in, `Manifest` or located problems out.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::validate::Accounts;
use super::*;

/// A real ssh-ed25519 public key line (from `ssh-keygen -t ed25519`; the private half is gone).
const SSH_ED25519: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGpxsNruaWJc7pllQTth9nNVvqH81weyVeKOFOs1jNTo ops@laptop";

const MANIFEST: &str = "/etc/kps-sync/manifest.yaml";

struct FakeAccounts;

impl Accounts for FakeAccounts {
    fn user(&self, name: &str) -> Result<Option<u32>, String> {
        Ok(match name {
            "root" => Some(0),
            "backup" => Some(34),
            "ops" => Some(1000),
            _ => None,
        })
    }
    fn group(&self, name: &str) -> Result<Option<u32>, String> {
        Ok(match name {
            "root" => Some(0),
            "backup" => Some(34),
            "ssl-cert" => Some(110),
            _ => None,
        })
    }
}

fn no_env(_: &str) -> Option<OsString> {
    None
}

fn creds_env(name: &str) -> Option<OsString> {
    (name == "CREDENTIALS_DIRECTORY").then(|| "/run/credentials/kps-sync.service".into())
}

fn age_recipient() -> String {
    age::x25519::Identity::generate().to_public().to_string()
}

fn load_at(text: &str, path: &Path) -> Result<Manifest, ManifestError> {
    load_text(text, path, &no_env, &FakeAccounts)
}

fn ok(text: &str) -> Manifest {
    match load_at(text, Path::new(MANIFEST)) {
        Ok(m) => m,
        Err(e) => panic!("expected the manifest to load, got:\n{e}"),
    }
}

/// Each problem as `LINE:COLUMN: message`.
fn problems(text: &str) -> Vec<String> {
    problems_with(text, &no_env)
}

fn problems_with(text: &str, env: &dyn Fn(&str) -> Option<OsString>) -> Vec<String> {
    match load_text(text, Path::new(MANIFEST), env, &FakeAccounts) {
        Ok(_) => panic!("expected problems, the manifest loaded:\n{text}"),
        Err(e) => e
            .problems()
            .iter()
            .map(|p| match p.location {
                Some(l) => format!("{}:{}: {}", l.line, l.column, p.message),
                None => format!("?: {}", p.message),
            })
            .collect(),
    }
}

/// The single problem, which must be at `at` ("LINE:COLUMN") and mention every `needle`.
fn assert_problem(text: &str, at: &str, needles: &[&str]) {
    let found = problems(text);
    assert_eq!(found.len(), 1, "expected one problem, got {found:#?}");
    assert!(
        found[0].starts_with(&format!("{at}: ")),
        "expected at {at}: {found:#?}"
    );
    for needle in needles {
        assert!(
            found[0].contains(needle),
            "expected {needle:?} in {found:#?}"
        );
    }
}

const HEAD: &str = "\
version: 1
kps:
  region: cn-north-4
  project_id: 0123456789abcdef0123456789abcdef
";

fn with_head(rest: &str) -> String {
    format!("{HEAD}{rest}")
}

fn key<'m>(m: &'m Manifest, name: &str) -> &'m KeySpec {
    m.keys.iter().find(|k| k.name == name).expect("key present")
}

// ---- whole manifests ----

#[test]
fn the_design_example_loads() {
    let age = age_recipient();
    let text = format!(
        r#"version: 1
kps:
  region: cn-north-4                  # endpoint https://kms.cn-north-4.myhuaweicloud.com
  # endpoint: https://kms.example.internal   # override (private cloud, tests)
  project_id: 0123456789abcdef0123456789abcdef
  auth:                               # exactly one way; secrets are never inline
    token_file: /run/credentials/kps-sync.service/kps-token      # X-Auth-Token
  # ca_file: /etc/ssl/private-cloud-ca.pem
defaults:                             # any per-key field except path
  mode: "0600"
  owner: root
  group: root
settings:
  state_dir: /var/lib/kps-sync        # relative paths here and below: to the manifest's folder
  interval: 5m                        # daemon: full check of every file this often
  debounce: 250ms                     # daemon: quiet time after a manifest change
  concurrency: 4                      # batch-export calls in flight
  prune: false                        # delete files of keys removed from the manifest
keys:
  web-prod: /etc/ssh/keys/web-prod.pem          # short form: name -> path
  db-backup:
    path: /srv/backup/.ssh/id_backup
    mode: "0400"
    owner: backup
    group: backup
    age_recipients:                   # write age ciphertext instead of the key
      - {age}
      - {SSH_ED25519}
    on_change: ["systemctl", "reload", "backup-agent"]   # argv, run after the file changed
"#
    );
    let m = ok(&text);
    assert_eq!(m.path, PathBuf::from(MANIFEST));
    assert_eq!(m.kps.region.as_deref(), Some("cn-north-4"));
    assert_eq!(m.kps.endpoint, "https://kms.cn-north-4.myhuaweicloud.com");
    assert_eq!(m.kps.project_id, "0123456789abcdef0123456789abcdef");
    assert_eq!(
        m.kps.auth,
        AuthConfig::TokenFile("/run/credentials/kps-sync.service/kps-token".into())
    );
    assert_eq!(m.kps.ca_file, None);
    assert_eq!(m.settings.state_dir, PathBuf::from("/var/lib/kps-sync"));
    assert_eq!(m.settings.interval, Duration::from_secs(300));
    assert_eq!(m.settings.debounce, Duration::from_millis(250));
    assert_eq!(m.settings.concurrency, 4);
    assert!(!m.settings.prune);

    let names: Vec<&str> = m.keys.iter().map(|k| k.name.as_str()).collect();
    assert_eq!(names, ["db-backup", "web-prod"], "sorted by name");

    let web = key(&m, "web-prod");
    assert_eq!(web.path, PathBuf::from("/etc/ssh/keys/web-prod.pem"));
    assert_eq!(web.mode, 0o600);
    let root = Principal {
        name: "root".into(),
        id: 0,
    };
    assert_eq!(web.owner.as_ref(), Some(&root));
    assert_eq!(web.group.as_ref(), Some(&root));
    assert!(web.encryption.is_none());
    assert!(web.on_change.is_empty());
    assert_eq!(web.line, 20);

    let db = key(&m, "db-backup");
    assert_eq!(db.path, PathBuf::from("/srv/backup/.ssh/id_backup"));
    assert_eq!(db.mode, 0o400);
    assert_eq!(db.owner.as_ref().map(|p| p.id), Some(34));
    assert_eq!(db.group.as_ref().map(|p| p.name.as_str()), Some("backup"));
    let enc = db.encryption.as_ref().expect("encrypted");
    assert!(!enc.armor);
    assert_eq!(enc.recipients.len(), 2);
    assert_eq!(enc.recipients[0].text, age);
    assert!(matches!(
        enc.recipients[0].parsed,
        ParsedRecipient::X25519(_)
    ));
    assert_eq!(enc.recipients[1].text, SSH_ED25519);
    assert!(matches!(enc.recipients[1].parsed, ParsedRecipient::Ssh(_)));
    assert_eq!(db.on_change, ["systemctl", "reload", "backup-agent"]);
    assert_eq!(db.line, 21);
}

#[test]
fn a_minimal_manifest_gets_every_default() {
    let m = ok(&with_head("keys:\n  a: /k/a\n"));
    assert_eq!(m.kps.auth, AuthConfig::Unspecified);
    let s = &m.settings;
    assert_eq!(s.state_dir, PathBuf::from("/var/lib/kps-sync"));
    assert_eq!(s.interval, Duration::from_secs(300));
    assert_eq!(s.debounce, Duration::from_millis(250));
    assert_eq!(s.concurrency, 4);
    assert!(!s.prune);
    assert_eq!(s.hook_timeout, Duration::from_secs(30));
    assert!(s.verify_remote);
    assert_eq!(s.rotation_check, Duration::from_secs(3600));
    assert_eq!(s.watch, WatchMode::Inotify);
    assert_eq!(s.max_rps, None);
    assert_eq!(s.metrics_file, None);
    assert_eq!(s.metrics_listen, None);
    let a = key(&m, "a");
    assert_eq!(a.mode, 0o600);
    assert_eq!(a.owner, None);
    assert_eq!(a.group, None);
    assert_eq!(a.line, 6);
}

#[test]
fn empty_or_missing_keys_manage_nothing() {
    assert!(ok(&with_head("keys: {}\n")).keys.is_empty());
    assert!(ok(HEAD).keys.is_empty());
}

#[test]
fn short_and_long_forms_are_equivalent() {
    let m = ok(&with_head("keys:\n  a: /k/a\n  b:\n    path: /k/b\n"));
    assert_eq!(key(&m, "a").path, PathBuf::from("/k/a"));
    assert_eq!(key(&m, "b").path, PathBuf::from("/k/b"));
    assert_eq!(key(&m, "a").mode, key(&m, "b").mode);
}

#[test]
fn per_key_fields_override_defaults() {
    let age = age_recipient();
    let m = ok(&with_head(&format!(
        r#"defaults:
  mode: "0640"
  owner: ops
  group: ssl-cert
  age_recipients: ["{age}"]
  armor: true
  on_change: [systemctl, reload, nginx]
keys:
  inherits: /k/a
  overrides:
    path: /k/b
    mode: "0400"
    owner: "0"
    group: root
    age_recipients: []
    on_change: []
"#
    )));
    let a = key(&m, "inherits");
    assert_eq!(a.mode, 0o640);
    assert_eq!(a.owner.as_ref().map(|p| p.id), Some(1000));
    assert_eq!(a.group.as_ref().map(|p| p.id), Some(110));
    let enc = a.encryption.as_ref().expect("defaults' recipients apply");
    assert!(enc.armor);
    assert_eq!(enc.recipients[0].text, age);
    assert_eq!(a.on_change, ["systemctl", "reload", "nginx"]);

    let b = key(&m, "overrides");
    assert_eq!(b.mode, 0o400);
    assert_eq!(
        b.owner,
        Some(Principal {
            name: "0".into(),
            id: 0
        })
    );
    assert_eq!(b.group.as_ref().map(|p| p.id), Some(0));
    assert!(
        b.encryption.is_none(),
        "an empty list overrides the defaults' recipients"
    );
    assert!(b.on_change.is_empty());
}

#[test]
fn key_lines_are_found_in_flow_style_too() {
    let m = ok(&with_head("keys: {b: /k/b,\n  a: {path: /k/a}}\n"));
    assert_eq!(key(&m, "b").line, 5);
    assert_eq!(key(&m, "a").line, 6);
}

#[test]
fn a_large_manifest_loads_with_every_line_right() {
    let mut text = with_head("keys:\n");
    for i in 0..2000 {
        text.push_str(&format!(
            "  key-{i:04}:\n    path: /k/{i}\n    mode: \"0400\"\n"
        ));
    }
    let started = std::time::Instant::now();
    let m = ok(&text);
    assert_eq!(m.keys.len(), 2000);
    for (i, k) in m.keys.iter().enumerate() {
        assert_eq!(k.name, format!("key-{i:04}"));
        assert_eq!(k.line, 6 + 3 * i, "{}", k.name);
    }
    // Generous: a parse per key (the slow path) would take minutes in a debug build.
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn quoted_and_numeric_key_names_load() {
    let m = ok(&with_head("keys:\n  \"quoted\": /k/q\n  2024: /k/n\n"));
    assert_eq!(key(&m, "quoted").line, 6);
    assert_eq!(key(&m, "2024").line, 7);
}

// ---- structure ----

#[test]
fn empty_file_is_refused() {
    assert_problem("", "1:1", &["empty", "version: 1"]);
    assert_problem("# only a comment\n", "1:1", &["empty"]);
}

#[test]
fn a_leading_document_marker_is_fine_but_two_documents_are_not() {
    let m = ok(&format!("---\n{HEAD}keys:\n  a: /k/a\n"));
    assert_eq!(key(&m, "a").line, 7);
    let found = problems(&format!("{HEAD}---\nversion: 1\n"));
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].contains("more than one document"), "{found:?}");
}

#[test]
fn broken_yaml_names_its_line() {
    let found = problems(&with_head("keys:\n  a: [/k/a\n  b: /k/b\n"));
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].starts_with("7:4: "), "{found:?}");
    assert!(
        !found[0].contains("at line 7 column 4"),
        "said once: {found:?}"
    );
}

#[test]
fn version_is_required_and_must_be_1() {
    assert_problem(
        "kps:\n  region: cn-north-4\n  project_id: 0123456789abcdef0123456789abcdef\n",
        "1:1",
        &["version: 1"],
    );
    assert_problem(
        &HEAD.replace("version: 1", "version: 2"),
        "1:10",
        &["version 2"],
    );
    assert_problem(
        &HEAD.replace("version: 1", "version: \"1\""),
        "1:10",
        &["unquoted"],
    );
}

#[test]
fn unknown_fields_are_named_with_the_allowed_ones() {
    assert_problem(
        &with_head("kyes: {}\n"),
        "5:1",
        &["unknown field `kyes`", "top level", "`keys`", "`settings`"],
    );
    assert_problem(
        &with_head("keys:\n  a:\n    path: /k/a\n    mdoe: \"0600\"\n"),
        "8:5",
        &["unknown field `mdoe`", "`mode`", "`on_change`"],
    );
    assert_problem(
        &with_head("settings:\n  intervall: 5m\n"),
        "6:3",
        &["unknown field `intervall`", "`settings`", "`interval`"],
    );
    assert_problem(
        &with_head("  auth:\n    iam: {user: u, domain: d, password_file: /p, extra: 1}\n"),
        "6:50",
        &["unknown field `extra`", "`kps.auth.iam`", "`password_file`"],
    );
}

#[test]
fn path_in_defaults_is_explained() {
    assert_problem(
        &with_head("defaults:\n  path: /k\n"),
        "6:3",
        &["`path` cannot have a default"],
    );
}

#[test]
fn duplicate_keys_fail_at_every_depth() {
    assert_problem(
        &with_head("keys: {}\nversion: 1\n"),
        "6:1",
        &["duplicate key `version`", "first at line 1, column 1"],
    );
    assert_problem(
        &with_head("keys:\n  a: /k/a\n  a: /k/b\n"),
        "7:3",
        &["duplicate key `a` in `keys`", "first at line 6, column 3"],
    );
    assert_problem(
        &with_head("keys:\n  a:\n    path: /k/a\n    owner: root\n    path: /k/b\n"),
        "9:5",
        &[
            "duplicate key `path` in `keys.a`",
            "first at line 7, column 5",
        ],
    );
    assert_problem(
        "version: 1\nkps:\n  region: x\n  region: y\n",
        "4:3",
        &["duplicate key `region` in `kps`", "line 3"],
    );
}

// ---- kps ----

#[test]
fn region_makes_the_endpoint_and_endpoint_overrides_it() {
    let m = ok(&with_head(
        "  endpoint: https://kms.example.internal:8443/kps/\n",
    ));
    assert_eq!(m.kps.endpoint, "https://kms.example.internal:8443/kps");
    assert_eq!(m.kps.region.as_deref(), Some("cn-north-4"));
    let m = ok(
        "version: 1\nkps:\n  endpoint: http://127.0.0.1:8080\n  project_id: 0123456789abcdef0123456789abcdef\n",
    );
    assert_eq!(m.kps.endpoint, "http://127.0.0.1:8080");
    assert_eq!(m.kps.region, None);
    for loopback in ["http://localhost:1", "http://[::1]:9/", "http://127.8.9.10"] {
        let m = ok(&format!(
            "version: 1\nkps:\n  endpoint: {loopback}\n  project_id: 0123456789abcdef0123456789abcdef\n"
        ));
        assert_eq!(m.kps.endpoint, loopback.trim_end_matches('/'));
    }
}

#[test]
fn region_or_endpoint_is_required() {
    assert_problem(
        "version: 1\nkps:\n  project_id: 0123456789abcdef0123456789abcdef\n",
        "2:1",
        &["`region:`", "`endpoint:`"],
    );
}

#[test]
fn bad_endpoints_are_refused() {
    for (endpoint, needle) in [
        ("http://kms.example.com", "only to this host"),
        ("http://10.0.0.1:80", "only to this host"),
        ("ftp://x", "https://"),
        ("kms.example.com", "https://"),
        ("https://user@host", "user@"),
        ("https://host:99999", "port"),
        ("https://", "host"),
        ("https://a]b", "host"),
        ("https://[not-v6]:1", "host"),
    ] {
        assert_problem(
            &format!(
                "version: 1\nkps:\n  endpoint: {endpoint}\n  project_id: 0123456789abcdef0123456789abcdef\n"
            ),
            "3:13",
            &[needle],
        );
    }
}

#[test]
fn bad_region_is_refused() {
    assert_problem(
        &HEAD.replace("cn-north-4", "cn/north"),
        "3:11",
        &["region name"],
    );
}

#[test]
fn unknown_region_names_the_closest_and_suggests_endpoint() {
    assert_problem(
        &HEAD.replace("cn-north-4", "cn-north4"),
        "3:11",
        &[
            "`cn-north4` is not a region where KPS exists",
            "did you mean `cn-north-4`? For a private cloud, give `endpoint:`",
            "endpoint:",
        ],
    );
    // With an endpoint, the region only names IAM: a private cloud's own region is fine.
    let m =
        ok(&with_head("  endpoint: https://kms.example.internal\n")
            .replace("cn-north-4", "private-1"));
    assert_eq!(m.kps.region.as_deref(), Some("private-1"));
    let m = ok(&HEAD.replace("cn-north-4", "my-kualalumpur-1"));
    assert_eq!(
        m.kps.endpoint,
        "https://kms.my-kualalumpur-1.myhuaweicloud.com"
    );
}

#[test]
fn project_id_must_be_32_hex() {
    assert_problem(
        &HEAD.replace("0123456789abcdef0123456789abcdef", "abc"),
        "4:15",
        &["32 hex", "3 characters"],
    );
    assert_problem(
        &HEAD.replace(
            "0123456789abcdef0123456789abcdef",
            "0123456789abcdef0123456789abcdeg",
        ),
        "4:15",
        &["not all hex"],
    );
    assert_problem(
        "version: 1\nkps:\n  region: cn-north-4\n",
        "2:1",
        &["project_id", "missing"],
    );
    // 32 digits is a YAML integer; it is still a valid id.
    let m = ok(&HEAD.replace(
        "0123456789abcdef0123456789abcdef",
        "12345678901234567890123456789012",
    ));
    assert_eq!(m.kps.project_id, "12345678901234567890123456789012");
}

#[test]
fn every_auth_method_loads() {
    let m = ok(&with_head(
        "  auth:\n    access_key_file: ak\n    secret_key_file: /c/sk\n    security_token_file: /c/st\n",
    ));
    assert_eq!(
        m.kps.auth,
        AuthConfig::AkSk {
            access_key_file: "/etc/kps-sync/ak".into(),
            secret_key_file: "/c/sk".into(),
            security_token_file: Some("/c/st".into()),
        }
    );
    let m = ok(&with_head(
        "  auth:\n    iam: {user: ops, domain: acme, password_file: pw, endpoint: \"https://iam.x/\"}\n",
    ));
    assert_eq!(
        m.kps.auth,
        AuthConfig::Iam {
            user: "ops".into(),
            domain: "acme".into(),
            password_file: "/etc/kps-sync/pw".into(),
            endpoint: Some("https://iam.x".into()),
        }
    );
    for ecs in ["ecs_metadata: {}", "ecs_metadata:", "ecs_metadata: null"] {
        let m = ok(&with_head(&format!("  auth:\n    {ecs}\n")));
        assert_eq!(
            m.kps.auth,
            AuthConfig::EcsMetadata { endpoint: None },
            "{ecs}"
        );
    }
    let m = ok(&with_head(
        "  auth:\n    ecs_metadata: {endpoint: \"http://169.254.169.254/\"}\n",
    ));
    assert_eq!(
        m.kps.auth,
        AuthConfig::EcsMetadata {
            endpoint: Some("http://169.254.169.254".into())
        }
    );
}

#[test]
fn two_auth_methods_are_named_both() {
    assert_problem(
        &with_head(
            "  auth:\n    token_file: /t\n    iam: {user: u, domain: d, password_file: /p}\n",
        ),
        "7:5",
        &["2 methods", "`token_file` and `iam`", "exactly one"],
    );
    assert_problem(
        &with_head(
            "  auth:\n    ecs_metadata: {}\n    secret_key_file: /s\n    access_key_file: /a\n",
        ),
        "7:5",
        &["`ecs_metadata` and `secret_key_file`"],
    );
}

#[test]
fn inline_secrets_are_refused_without_echoing_them() {
    for (field, replacement) in [
        ("token", "token_file"),
        ("sk", "secret_key_file"),
        ("secret_key", "secret_key_file"),
        ("ak", "access_key_file"),
        ("security_token", "security_token_file"),
    ] {
        let text = with_head(&format!("  auth:\n    {field}: hunter2-secret\n"));
        assert_problem(&text, "6:5", &["never inline", replacement]);
        assert!(!problems(&text)[0].contains("hunter2"));
    }
    let text = with_head("  auth:\n    iam: {user: u, domain: d, password: hunter2-secret}\n");
    assert_problem(&text, "6:31", &["never inline", "`password_file:`"]);
    assert!(!problems(&text)[0].contains("hunter2"));
}

#[test]
fn a_secret_in_the_wrong_place_is_not_echoed() {
    let text = with_head("  auth: hunter2-secret\n");
    let found = problems(&text);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].starts_with("5:9:"), "{found:?}");
    assert!(!found[0].contains("hunter2"), "{found:?}");
}

#[test]
fn incomplete_auth_methods_say_what_is_missing() {
    assert_problem(
        &with_head("  auth:\n    secret_key_file: /s\n"),
        "6:5",
        &["add `access_key_file:`"],
    );
    assert_problem(
        &with_head("  auth:\n    iam: {user: u}\n"),
        "6:5",
        &["missing `domain:`, `password_file:`"],
    );
    assert_problem(
        "version: 1\nkps:\n  endpoint: https://k\n  project_id: 0123456789abcdef0123456789abcdef\n  auth:\n    iam: {user: u, domain: d, password_file: /p}\n",
        "6:5",
        &["`kps.region:`"],
    );
}

// ---- paths ----

#[test]
fn relative_paths_resolve_against_the_manifest_folder() {
    let text = with_head(
        "  ca_file: ../ca.pem\n  auth:\n    token_file: ./creds/token\nsettings:\n  state_dir: state\n  metrics_file: out/metrics.prom\nkeys:\n  a: keys/a.pem\n  b:\n    path: ./keys/../b.pem\n",
    );
    let m = load_at(&text, Path::new("/srv/conf/manifest.yaml")).unwrap();
    assert_eq!(m.kps.ca_file, Some(PathBuf::from("/srv/ca.pem")));
    assert_eq!(
        m.kps.auth,
        AuthConfig::TokenFile("/srv/conf/creds/token".into())
    );
    assert_eq!(m.settings.state_dir, PathBuf::from("/srv/conf/state"));
    assert_eq!(
        m.settings.metrics_file,
        Some(PathBuf::from("/srv/conf/out/metrics.prom"))
    );
    assert_eq!(key(&m, "a").path, PathBuf::from("/srv/conf/keys/a.pem"));
    assert_eq!(key(&m, "b").path, PathBuf::from("/srv/conf/b.pem"));
}

#[test]
fn credentials_directory_is_expanded() {
    for spelling in ["$CREDENTIALS_DIRECTORY", "${CREDENTIALS_DIRECTORY}"] {
        let text = with_head(&format!("  auth:\n    token_file: {spelling}/kps-token\n"));
        let m = load_text(&text, Path::new(MANIFEST), &creds_env, &FakeAccounts).unwrap();
        assert_eq!(
            m.kps.auth,
            AuthConfig::TokenFile("/run/credentials/kps-sync.service/kps-token".into())
        );
    }
}

#[test]
fn credentials_directory_unset_is_an_error() {
    let text = with_head("  auth:\n    token_file: $CREDENTIALS_DIRECTORY/kps-token\n");
    let found = problems(&text);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].starts_with("6:17: "), "{found:?}");
    assert!(found[0].contains("LoadCredential="), "{found:?}");
}

#[test]
fn other_variables_and_tilde_are_refused() {
    assert_problem(
        &with_head("keys:\n  a: $HOME/a\n"),
        "6:6",
        &["only `$CREDENTIALS_DIRECTORY"],
    );
    assert_problem(&with_head("keys:\n  a: ~/a\n"), "6:6", &["absolute path"]);
}

#[test]
fn key_paths_must_name_a_file() {
    assert_problem(
        &with_head("keys:\n  a: /etc/ssh/\n"),
        "6:6",
        &["names a folder"],
    );
    assert_problem(&with_head("keys:\n  a: \"\"\n"), "6:6", &["empty"]);
    assert_problem(&with_head("keys:\n  a:\n"), "6:3", &["has no path"]);
    assert_problem(
        &with_head("keys:\n  a:\n    mode: \"0600\"\n"),
        "6:3",
        &["has no path"],
    );
}

#[test]
fn two_keys_on_one_path_name_both() {
    assert_problem(
        &with_head("keys:\n  a: /k/x\n  b:\n    path: /k/./x\n"),
        "7:3",
        &["`a` (line 6) and `b` (line 7) both write /k/x"],
    );
    // Relative and absolute spellings of one file collide too.
    assert_problem(
        &with_head("keys:\n  z: keys/x\n  y: /etc/kps-sync/keys/x\n"),
        "7:3",
        &["`z` (line 6) and `y` (line 7)"],
    );
}

// ---- keys ----

#[test]
fn key_names_are_checked() {
    assert_problem(
        &with_head("keys:\n  \"web prod\": /k/a\n"),
        "6:3",
        &["`web prod`", "letters, digits"],
    );
    assert_problem(&with_head("keys:\n  \"a.b\": /k/a\n"), "6:3", &["`a.b`"]);
    let long = "x".repeat(256);
    assert_problem(
        &with_head(&format!("keys:\n  {long}: /k/a\n")),
        "6:3",
        &["1 to 255"],
    );
    ok(&with_head(&format!(
        "keys:\n  {}: /k/a\n  A_z-9: /k/b\n",
        "x".repeat(255)
    )));
}

#[test]
fn allowed_modes_load() {
    for (text, mode) in [
        ("0600", 0o600),
        ("600", 0o600),
        ("0400", 0o400),
        ("0640", 0o640),
        ("0440", 0o440),
    ] {
        let m = ok(&with_head(&format!(
            "keys:\n  a:\n    path: /k/a\n    mode: \"{text}\"\n"
        )));
        assert_eq!(key(&m, "a").mode, mode, "{text}");
    }
}

#[test]
fn wide_modes_are_refused_with_a_suggestion() {
    for (mode, why) in [
        ("0644", "other users"),
        ("0604", "other users"),
        ("0660", "group write"),
        ("0700", "executable"),
        ("4600", "setuid"),
        ("0200", "owner read"),
        (
            "0777",
            "executable, gives access to other users and lets the group write",
        ),
    ] {
        assert_problem(
            &with_head(&format!(
                "keys:\n  a:\n    path: /k/a\n    mode: \"{mode}\"\n"
            )),
            "8:11",
            &[why, "\"0600\"", "\"0640\""],
        );
    }
}

#[test]
fn malformed_modes_are_refused() {
    for mode in ["\"rw-------\"", "\"0800\"", "\"00600\"", "\"\""] {
        assert_problem(
            &with_head(&format!("keys:\n  a:\n    path: /k/a\n    mode: {mode}\n")),
            "8:11",
            &["not an octal file mode", "\"0600\""],
        );
    }
}

#[test]
fn numeric_modes_must_be_quoted() {
    for mode in ["600", "0o600", "384"] {
        assert_problem(
            &with_head(&format!("defaults:\n  mode: {mode}\nkeys:\n  a: /k/a\n")),
            "6:9",
            &["YAML number", "quoted", "\"0600\""],
        );
    }
}

#[test]
fn unquoted_leading_zero_modes_must_be_quoted() {
    assert_problem(
        &with_head("keys:\n  a:\n    path: /k/a\n    mode: 0600\n"),
        "8:11",
        &["unquoted", "`mode: \"0600\"`"],
    );
    assert_problem(
        &with_head("keys:\n  a: {path: /k/a, mode: 0400}\n"),
        "6:25",
        &["unquoted"],
    );
    // Quoted with either quote is fine, also when another mode is unquoted.
    let found = problems(&with_head(
        "defaults:\n  mode: '0640'\nkeys:\n  a: /k/a\n  b:\n    path: /k/b\n    mode: \"0400\"\n  c:\n    path: /k/c\n    mode: 0600\n",
    ));
    assert_eq!(found.len(), 1, "{found:#?}");
    assert!(found[0].starts_with("14:11: "), "{found:#?}");
}

#[test]
fn unknown_owner_or_group_is_named() {
    assert_problem(
        &with_head("keys:\n  a:\n    path: /k/a\n    owner: nobody-here\n"),
        "8:12",
        &["no user `nobody-here`", "useradd"],
    );
    assert_problem(
        &with_head("defaults:\n  group: wheel\nkeys:\n  a: /k/a\n  b: /k/b\n"),
        "6:10",
        &["no group `wheel`", "groupadd"],
    );
    let m = ok(&with_head(
        "keys:\n  a:\n    path: /k/a\n    owner: 4242\n    group: \"4343\"\n",
    ));
    assert_eq!(key(&m, "a").owner.as_ref().map(|p| p.id), Some(4242));
    assert_eq!(key(&m, "a").group.as_ref().map(|p| p.id), Some(4343));
}

#[test]
fn system_accounts_know_root() {
    use super::validate::SystemAccounts;
    assert_eq!(SystemAccounts.user("root"), Ok(Some(0)));
    assert_eq!(SystemAccounts.group("root"), Ok(Some(0)));
    assert_eq!(SystemAccounts.user("no-such-user-kps-sync"), Ok(None));
}

#[test]
fn a_bad_recipient_is_reported_at_its_entry() {
    let age = age_recipient();
    assert_problem(
        &with_head(&format!(
            "keys:\n  a:\n    path: /k/a\n    age_recipients:\n      - {age}\n      - age1notarecipient\n"
        )),
        "10:9",
        &["age recipient", "x25519"],
    );
    assert_problem(
        &with_head("keys:\n  a:\n    path: /k/a\n    age_recipients: [\"ssh-dss AAAA\"]\n"),
        "8:22",
        &["expected an age recipient"],
    );
}

#[test]
fn recipients_file_is_read_with_comments_and_blanks() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (age_recipient(), age_recipient());
    std::fs::write(
        dir.path().join("recipients.txt"),
        format!("# ops team\n{a}\n\n   {SSH_ED25519}  \n# old: {b}\n"),
    )
    .unwrap();
    let manifest = dir.path().join("manifest.yaml");
    let text = with_head(&format!(
        "keys:\n  a:\n    path: /k/a\n    age_recipients: [\"{b}\"]\n    age_recipients_file: recipients.txt\n    armor: true\n"
    ));
    let m = load_at(&text, &manifest).unwrap();
    let enc = key(&m, "a").encryption.clone().unwrap();
    let texts: Vec<&str> = enc.recipients.iter().map(|r| r.text.as_str()).collect();
    assert_eq!(texts, [b.as_str(), a.as_str(), SSH_ED25519]);
    assert!(enc.armor);
}

#[test]
fn recipients_file_errors_name_the_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("r.txt");
    std::fs::write(&file, format!("# c\n{}\nage1bogus\n", age_recipient())).unwrap();
    let text = with_head(&format!(
        "keys:\n  a:\n    path: /k/a\n    age_recipients_file: {}\n",
        file.display()
    ));
    let err = load_at(&text, Path::new(MANIFEST)).unwrap_err();
    assert_eq!(err.problems().len(), 1, "{err}");
    let shown = err.to_string();
    assert!(
        shown.starts_with(&format!("{MANIFEST}:8:26: {}:3: ", file.display())),
        "{shown}"
    );

    std::fs::write(&file, "# nobody\n\n").unwrap();
    let err = load_at(&text, Path::new(MANIFEST)).unwrap_err();
    assert!(err.to_string().contains("names no recipient"), "{err}");

    std::fs::remove_file(&file).unwrap();
    let err = load_at(&text, Path::new(MANIFEST)).unwrap_err();
    assert!(
        err.to_string().contains("cannot read age_recipients_file"),
        "{err}"
    );
    assert!(err.to_string().contains("create it"), "{err}");
}

#[test]
fn armor_needs_recipients() {
    assert_problem(
        &with_head("keys:\n  a:\n    path: /k/a\n    armor: true\n"),
        "8:5",
        &["`armor: true` but no recipient"],
    );
    assert_problem(
        &with_head("defaults:\n  armor: true\nkeys:\n  a: /k/a\n"),
        "6:3",
        &["nothing to armor"],
    );
    // Defaults' armor applies only where there are recipients.
    let age = age_recipient();
    let m = ok(&with_head(&format!(
        "defaults:\n  armor: true\nkeys:\n  plain: /k/a\n  sealed:\n    path: /k/b\n    age_recipients: [\"{age}\"]\n"
    )));
    assert!(key(&m, "plain").encryption.is_none());
    assert!(key(&m, "sealed").encryption.as_ref().unwrap().armor);
}

#[test]
fn public_key_true_is_beside_the_key_and_a_path_is_resolved() {
    let m = ok(&with_head(
        "defaults:\n  public_key: true\nkeys:\n  a: /k/a\n  b:\n    path: /k/b\n    public_key: pubs/b.pub\n  c:\n    path: /k/c\n    public_key: false\n",
    ));
    assert_eq!(key(&m, "a").public_key, Some(PathBuf::from("/k/a.pub")));
    let dir = Path::new(MANIFEST).parent().unwrap();
    assert_eq!(key(&m, "b").public_key, Some(dir.join("pubs/b.pub")));
    assert_eq!(key(&m, "c").public_key, None);
    assert_eq!(
        key(&ok(&with_head("keys:\n  a: /k/a\n")), "a").public_key,
        None
    );
}

#[test]
fn public_key_paths_must_not_collide() {
    assert_problem(
        &with_head("defaults:\n  public_key: /k/all.pub\nkeys:\n  a: /k/a\n"),
        "6:15",
        &["same public key file", "`public_key: true`"],
    );
    assert_problem(
        &with_head("keys:\n  a: /k/a\n  b:\n    path: /k/b\n    public_key: /k/a\n"),
        "7:3",
        &["key `b` writes its public key to /k/a", "key `a`'s file"],
    );
    assert_problem(
        &with_head(
            "keys:\n  a:\n    path: /k/a\n    public_key: /k/x.pub\n  b:\n    path: /k/b\n    public_key: /k/x.pub\n",
        ),
        "9:3",
        &["public key file too"],
    );
    assert_problem(
        &with_head("keys:\n  a:\n    path: /k/a\n    public_key: 3\n"),
        "8:17",
        &["public key"],
    );
}

#[test]
fn on_change_must_be_a_list() {
    assert_problem(
        &with_head("keys:\n  a:\n    path: /k/a\n    on_change: systemctl reload nginx\n"),
        "8:16",
        &["must be a list", "[\"systemctl\", \"reload\", \"nginx\"]"],
    );
    assert_problem(
        &with_head("keys:\n  a:\n    path: /k/a\n    on_change: [\"\", x]\n"),
        "8:16",
        &["empty program name"],
    );
}

// ---- settings ----

#[test]
fn settings_are_read() {
    let m = ok(&with_head(
        "settings:\n  interval: 1h30m\n  debounce: 0s\n  concurrency: 64\n  prune: true\n  hook_timeout: 10s\n  verify_remote: false\n  rotation_check: 0s\n  watch: poll\n  max_rps: 2.5\n  metrics_listen: \"127.0.0.1:9464\"\n",
    ));
    let s = &m.settings;
    assert_eq!(s.interval, Duration::from_secs(5400));
    assert_eq!(s.debounce, Duration::ZERO);
    assert_eq!(s.concurrency, 64);
    assert!(s.prune && !s.verify_remote);
    assert_eq!(s.rotation_check, Duration::ZERO);
    assert_eq!(s.hook_timeout, Duration::from_secs(10));
    assert_eq!(s.watch, WatchMode::Poll);
    assert_eq!(s.max_rps, Some(2.5));
    assert_eq!(s.metrics_listen, Some("127.0.0.1:9464".parse().unwrap()));
    assert_eq!(
        ok(&with_head("settings:\n  max_rps: 3\n")).settings.max_rps,
        Some(3.0)
    );
}

#[test]
fn bad_settings_are_each_reported() {
    for (setting, at, needle) in [
        ("interval: 0s", "6:13", "cannot be zero"),
        ("interval: 300", "6:13", "`300s`"),
        ("hook_timeout: soon", "6:17", "not a duration"),
        ("concurrency: 0", "6:16", "1 to 64"),
        ("concurrency: 65", "6:16", "1 to 64"),
        ("watch: fanotify", "6:10", "`inotify` or `poll`"),
        ("max_rps: 0", "6:12", "positive"),
        ("max_rps: -1", "6:12", "positive"),
        ("metrics_listen: localhost", "6:19", "127.0.0.1:9464"),
    ] {
        assert_problem(
            &with_head(&format!("settings:\n  {setting}\n")),
            at,
            &[needle],
        );
    }
}

// ---- reporting ----

#[test]
fn all_rule_violations_are_reported_in_file_order() {
    let text = with_head(
        "settings:\n  concurrency: 0\nkeys:\n  a:\n    path: /k/a\n    mode: \"0644\"\n    owner: ghost\n  b c: /k/b\n",
    );
    let found = problems(&text);
    assert_eq!(found.len(), 4, "{found:#?}");
    assert!(found[0].starts_with("6:16: "), "{found:#?}");
    assert!(found[1].starts_with("10:11: "), "{found:#?}");
    assert!(found[2].starts_with("11:12: "), "{found:#?}");
    assert!(found[3].starts_with("12:3: "), "{found:#?}");
    let err = load_at(&text, Path::new(MANIFEST)).unwrap_err();
    let lines: Vec<String> = err.to_string().lines().map(str::to_string).collect();
    assert_eq!(lines.len(), 4);
    assert!(
        lines.iter().all(|l| l.starts_with(&format!("{MANIFEST}:"))),
        "{lines:#?}"
    );
}

// ---- from disk ----

#[test]
fn load_reads_the_file_and_resolves_against_its_folder() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("manifest.yaml");
    std::fs::write(&path, with_head("keys:\n  a: a.pem\n")).unwrap();
    let m = load(&path).unwrap();
    assert_eq!(m.path, path);
    assert_eq!(key(&m, "a").path, dir.path().join("a.pem"));
}

#[test]
fn load_names_a_missing_file_and_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope.yaml");
    let err = load(&path).unwrap_err();
    assert!(matches!(err, ManifestError::Read { .. }));
    let shown = err.to_string();
    assert!(shown.contains(&path.display().to_string()), "{shown}");
    assert!(shown.contains("KPS_SYNC_MANIFEST"), "{shown}");
}

#[test]
fn load_refuses_a_folder_and_non_utf8() {
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(load(dir.path()), Err(ManifestError::Read { .. })));
    let path = dir.path().join("m.yaml");
    std::fs::write(&path, b"version: 1\n\xff\xfe\n").unwrap();
    let err = load(&path).unwrap_err();
    assert!(err.to_string().contains("UTF-8"), "{err}");
}

#[test]
fn load_str_makes_the_path_absolute() {
    let m = load_str(&with_head("keys:\n  a: a.pem\n"), Path::new("conf/m.yaml")).unwrap();
    let cwd = std::env::current_dir().unwrap();
    assert_eq!(m.path, cwd.join("conf/m.yaml"));
    assert_eq!(key(&m, "a").path, cwd.join("conf/a.pem"));
}

#[test]
fn default_path_prefers_the_environment() {
    assert_eq!(
        default_path_from(None),
        PathBuf::from("/etc/kps-sync/manifest.yaml")
    );
    assert_eq!(
        default_path_from(Some("".into())),
        PathBuf::from("/etc/kps-sync/manifest.yaml")
    );
    assert_eq!(
        default_path_from(Some("/x/m.yaml".into())),
        PathBuf::from("/x/m.yaml")
    );
}

#[test]
fn each_owner_and_group_name_is_looked_up_once() {
    struct Counting(std::cell::Cell<usize>);
    impl Accounts for Counting {
        fn user(&self, name: &str) -> Result<Option<u32>, String> {
            self.0.set(self.0.get() + 1);
            FakeAccounts.user(name)
        }
        fn group(&self, name: &str) -> Result<Option<u32>, String> {
            self.0.set(self.0.get() + 1);
            FakeAccounts.group(name)
        }
    }
    let keys: String = (0..50)
        .map(|i| format!("  k{i}:\n    path: /k/{i}\n    owner: backup\n    group: backup\n"))
        .collect();
    let text = with_head(&format!(
        "defaults:\n  owner: root\n  group: root\nkeys:\n{keys}"
    ));
    let counting = Counting(std::cell::Cell::new(0));
    let m = load_text(&text, Path::new(MANIFEST), &no_env, &counting).unwrap();
    assert_eq!(m.keys.len(), 50);
    assert!(
        m.keys
            .iter()
            .all(|k| k.owner.as_ref().is_some_and(|o| o.id == 34))
    );
    // root and backup, as user and as group.
    assert_eq!(counting.0.get(), 4);
}

/// Found by the manifest fuzz target (`fuzz/regressions/manifest/lone-cr`): libyaml counts a
/// lone CR as a line break, so this one-line manifest was refused "at line 3".
#[test]
fn a_line_break_only_yaml_sees_is_refused_where_an_editor_shows_it() {
    assert_problem(
        "\r\r/",
        "1:1",
        &["carriage return without a line feed", "LF"],
    );
    let text = "version: 1\nkps:\n  region: cn-north-4 # \u{2028}\nkeys: {}\n";
    assert_problem(text, "3:24", &["U+2028"]);
    // CRLF line ends are line ends, not stray breaks.
    let crlf = "version: 1\r\nkps:\r\n  region: nowhere-1\r\n";
    assert!(problems(crlf).iter().all(|p| !p.contains("line break")));
}

/// Found while writing the manifest fuzz target: an `age_recipients_file` that is a FIFO (or a
/// terminal such as /dev/console) blocked the load forever, and a device could be read without
/// end.
#[test]
fn a_recipients_file_that_is_not_a_regular_file_is_refused_without_reading_it() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("recipients");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let text = with_head(&format!(
        "keys:\n  a:\n    path: /k/a\n    age_recipients_file: {}\n",
        fifo.display()
    ));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(problems(&text));
    });
    let found = rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("the load returns instead of waiting for a writer");
    assert_eq!(found.len(), 1, "{found:#?}");
    assert!(found[0].contains("not a regular file"), "{found:#?}");
}
