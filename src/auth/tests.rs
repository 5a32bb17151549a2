//! Source precedence, file checks, and every method applied to real requests against the fake
//! KPS (signatures verified by its independent checker, tokens issued by its IAM and metadata
//! service).

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use fake_kps::{FakeKps, PROJECT_ID};

use super::*;

const SDK_AK: &str = "AKENVEXAMPLE00000000";
const SDK_SK: &str = "SKenvSECRETexample000000000000000000000000";
const ENV_TOKEN_VALUE: &str = "env-token-SECRET-0123456789";

use super::sources::tests::env_of;

fn kps_with(auth: AuthConfig, endpoint: &str, region: Option<&str>) -> KpsConfig {
    KpsConfig {
        region: region.map(str::to_owned),
        endpoint: endpoint.to_owned(),
        project_id: PROJECT_ID.to_owned(),
        auth,
        ca_file: None,
    }
}

fn kps(auth: AuthConfig) -> KpsConfig {
    kps_with(
        auth,
        "https://kms.cn-north-4.myhuaweicloud.com",
        Some("cn-north-4"),
    )
}

fn write(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
    let path = dir.join(name);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path
}

/// A HOME holding `~/.huaweicloud/credentials` with the fake's AK/SK.
fn home_with_credentials() -> tempfile::TempDir {
    let home = tempfile::tempdir().unwrap();
    write(
        home.path(),
        ".huaweicloud/credentials",
        &format!("[basic]\nak = {}\nsk = {}\n", fake_kps::AK, fake_kps::SK),
        0o600,
    );
    home
}

fn resolve_env(vars: &[(&str, &str)]) -> Result<Auth, AuthError> {
    Auth::resolve(&kps(AuthConfig::Unspecified), &env_of(vars))
}

// Which source.

#[test]
fn with_no_method_in_the_manifest_sdk_env_comes_first_then_the_token_then_the_sdk_file() {
    let home = home_with_credentials();
    let home_s = home.path().to_str().unwrap();
    let file = home.path().join(".huaweicloud/credentials");

    let all = [
        ("HUAWEICLOUD_SDK_AK", SDK_AK),
        ("HUAWEICLOUD_SDK_SK", SDK_SK),
        (ENV_TOKEN, ENV_TOKEN_VALUE),
        ("HOME", home_s),
    ];
    assert_eq!(
        resolve_env(&all).unwrap().source(),
        &Source::AkSkEnv {
            security_token: false
        }
    );
    assert_eq!(resolve_env(&all[2..]).unwrap().source(), &Source::TokenEnv);
    assert_eq!(
        resolve_env(&all[3..]).unwrap().source(),
        &Source::CredentialsFile(file)
    );
    let with_token = [
        ("HUAWEICLOUD_SDK_AK", SDK_AK),
        ("HUAWEICLOUD_SDK_SK", SDK_SK),
        ("HUAWEICLOUD_SDK_SECURITY_TOKEN", "st"),
    ];
    assert_eq!(
        resolve_env(&with_token).unwrap().source(),
        &Source::AkSkEnv {
            security_token: true
        }
    );
}

#[test]
fn the_sdk_credentials_file_path_can_be_overridden() {
    let home = home_with_credentials();
    let other = tempfile::tempdir().unwrap();
    let named = write(
        other.path(),
        "creds.ini",
        "[basic]\nak = A\nsk = B\n",
        0o600,
    );
    let auth = resolve_env(&[
        ("HOME", home.path().to_str().unwrap()),
        ("HUAWEICLOUD_SDK_CREDENTIALS_FILE", named.to_str().unwrap()),
    ])
    .unwrap();
    assert_eq!(auth.source(), &Source::CredentialsFile(named));
}

#[test]
fn nothing_found_says_where_it_looked_and_what_to_add() {
    let empty_home = tempfile::tempdir().unwrap();
    let err = resolve_env(&[("HOME", empty_home.path().to_str().unwrap())]).unwrap_err();
    assert!(matches!(err, AuthError::NoneFound { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("KPS_SYNC_AUTH_TOKEN"), "{text}");
    assert!(text.contains("HUAWEICLOUD_SDK_AK"), "{text}");
    assert!(
        text.contains(&format!(
            "{}/.huaweicloud/credentials",
            empty_home.path().display()
        )),
        "{text}"
    );
    assert!(text.contains("token_file"), "{text}");
    // A file without [basic] keys is not a source either.
    write(
        empty_home.path(),
        ".huaweicloud/credentials",
        "[basic]\nproject_id = x\n",
        0o600,
    );
    assert!(matches!(
        resolve_env(&[("HOME", empty_home.path().to_str().unwrap())]),
        Err(AuthError::NoneFound { .. })
    ));
    assert!(matches!(resolve_env(&[]), Err(AuthError::NoneFound { .. })));
}

#[test]
fn a_method_named_in_the_manifest_wins_over_the_environment() {
    let home = home_with_credentials();
    let env = env_of(&[
        ("HUAWEICLOUD_SDK_AK", SDK_AK),
        ("HUAWEICLOUD_SDK_SK", SDK_SK),
        (ENV_TOKEN, ENV_TOKEN_VALUE),
        ("HOME", home.path().to_str().unwrap()),
    ]);
    let auth = Auth::resolve(&kps(AuthConfig::TokenFile("/run/t".into())), &env).unwrap();
    assert_eq!(auth.source(), &Source::TokenFile("/run/t".into()));
    let aksk = AuthConfig::AkSk {
        access_key_file: "/run/ak".into(),
        secret_key_file: "/run/sk".into(),
        security_token_file: None,
    };
    assert_eq!(auth.source().method(), "token");
    let auth = Auth::resolve(&kps(aksk), &env).unwrap();
    assert_eq!(auth.source().method(), "AK/SK");
    assert!(matches!(auth.source(), Source::AkSkFiles { .. }));
}

#[test]
fn a_source_present_but_broken_is_an_error_not_a_reason_to_try_the_next() {
    let home = home_with_credentials();
    let home_s = home.path().to_str().unwrap();
    // An AK without its SK: the token and the file are not used instead.
    let err = resolve_env(&[
        ("HUAWEICLOUD_SDK_AK", SDK_AK),
        (ENV_TOKEN, ENV_TOKEN_VALUE),
        ("HOME", home_s),
    ])
    .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("HUAWEICLOUD_SDK_SK is not"), "{text}");
    assert!(!text.contains(SDK_AK), "{text}");

    // A malformed credentials file.
    let bad_home = tempfile::tempdir().unwrap();
    let path = write(
        bad_home.path(),
        ".huaweicloud/credentials",
        "[basic]\nak = A\n",
        0o600,
    );
    let err = resolve_env(&[("HOME", bad_home.path().to_str().unwrap())]).unwrap_err();
    let text = err.to_string();
    assert!(text.contains(&path.display().to_string()), "{text}");
    assert!(text.contains("no `sk`"), "{text}");

    // A credentials file the operator named must exist.
    let err = resolve_env(&[
        ("HOME", home_s),
        ("HUAWEICLOUD_SDK_CREDENTIALS_FILE", "/nonexistent/creds"),
    ])
    .unwrap_err();
    assert!(err.to_string().contains("/nonexistent/creds"), "{err}");
}

#[test]
fn iam_endpoint_defaults_from_the_region_and_is_required_without_one() {
    let iam = AuthConfig::Iam {
        user: "ops".into(),
        domain: "acme".into(),
        password_file: "/run/pw".into(),
        endpoint: None,
    };
    let auth = Auth::resolve(&kps(iam.clone()), &env_of(&[])).unwrap();
    assert_eq!(
        auth.source(),
        &Source::Iam {
            user: "ops".into(),
            domain: "acme".into(),
            password_file: "/run/pw".into(),
            endpoint: "https://iam.cn-north-4.myhuaweicloud.com".into(),
        }
    );
    let no_region = kps_with(iam, "https://kms.example.internal", None);
    let err = Auth::resolve(&no_region, &env_of(&[])).unwrap_err();
    assert!(matches!(err, AuthError::IamNoEndpoint), "{err:?}");
    assert!(err.to_string().contains("add one of them"), "{err}");

    let given = AuthConfig::Iam {
        user: "ops".into(),
        domain: "acme".into(),
        password_file: "/run/pw".into(),
        endpoint: Some("https://iam.example.internal/".into()),
    };
    let auth = Auth::resolve(
        &kps_with(given, "https://kms.example.internal", None),
        &env_of(&[]),
    )
    .unwrap();
    assert!(
        auth.source()
            .to_string()
            .ends_with("from https://iam.example.internal"),
        "{}",
        auth.source()
    );
}

#[test]
fn ecs_endpoint_defaults_to_the_link_local_address() {
    let auth = Auth::resolve(
        &kps(AuthConfig::EcsMetadata { endpoint: None }),
        &env_of(&[]),
    )
    .unwrap();
    assert_eq!(
        auth.source(),
        &Source::EcsMetadata {
            endpoint: "http://169.254.169.254".into()
        }
    );
    assert_eq!(auth.source().method(), "ecs_metadata");
}

#[test]
fn a_bad_ca_file_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let ca = write(dir.path(), "ca.pem", "not a certificate", 0o644);
    let mut cfg = kps(AuthConfig::Iam {
        user: "ops".into(),
        domain: "acme".into(),
        password_file: "/run/pw".into(),
        endpoint: None,
    });
    cfg.ca_file = Some(ca.clone());
    let err = Auth::resolve(&cfg, &env_of(&[])).unwrap_err();
    let text = err.to_string();
    assert!(text.contains(&ca.display().to_string()), "{text}");
    assert!(text.starts_with("IAM token for user `ops`"), "{text}");
}

#[test]
fn sources_and_their_debug_never_show_a_value() {
    let home = home_with_credentials();
    for vars in [
        vec![
            ("HUAWEICLOUD_SDK_AK", SDK_AK),
            ("HUAWEICLOUD_SDK_SK", SDK_SK),
            ("HUAWEICLOUD_SDK_SECURITY_TOKEN", "st-SECRET"),
        ],
        vec![(ENV_TOKEN, ENV_TOKEN_VALUE)],
        vec![("HOME", home.path().to_str().unwrap())],
    ] {
        let auth = resolve_env(&vars).unwrap();
        let shown = format!("{} {:?} {auth:?}", auth.source(), auth.source());
        for secret in [SDK_SK, ENV_TOKEN_VALUE, "st-SECRET", fake_kps::SK] {
            assert!(!shown.contains(secret), "{shown}");
        }
    }
}

// Applying credentials to requests.

fn request(method: reqwest::Method, url: &str, body: Option<&str>) -> reqwest::Request {
    let mut builder = reqwest::Client::new().request(method, url).header(
        reqwest::header::CONTENT_TYPE,
        "application/json;charset=utf-8",
    );
    if let Some(body) = body {
        builder = builder.body(body.to_owned());
    }
    builder.build().unwrap()
}

fn list_url(fake: &FakeKps, query: &str) -> String {
    format!("{}/v3/{PROJECT_ID}/keypairs{query}", fake.url())
}

/// Applies `auth` to a list request, sends it, returns the status.
async fn list_status(auth: &Auth, fake: &FakeKps) -> u16 {
    let mut req = request(reqwest::Method::GET, &list_url(fake, "?limit=5"), None);
    auth.apply(&mut req).await.unwrap();
    reqwest::Client::new()
        .execute(req)
        .await
        .unwrap()
        .status()
        .as_u16()
}

fn header(req: &reqwest::Request, name: &str) -> Option<String> {
    req.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
}

#[tokio::test]
async fn a_token_file_is_read_again_at_each_pass_and_after_a_401_not_in_between() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "token", "first\n", 0o600);
    let auth = Auth::resolve(&kps(AuthConfig::TokenFile(path.clone())), &env_of(&[])).unwrap();
    let token_of = async |auth: &Auth| {
        let mut req = request(reqwest::Method::GET, "https://kms.example/x", None);
        auth.apply(&mut req).await.unwrap();
        assert!(req.headers()["x-auth-token"].is_sensitive());
        header(&req, "x-auth-token").unwrap()
    };
    assert_eq!(token_of(&auth).await, "first");
    std::fs::write(&path, "second\n").unwrap();
    assert_eq!(token_of(&auth).await, "first", "cached within a pass");
    auth.begin_pass().await;
    assert_eq!(token_of(&auth).await, "second");
    std::fs::write(&path, "third\n").unwrap();
    auth.invalidate().await;
    assert_eq!(token_of(&auth).await, "third");
}

#[tokio::test]
async fn a_token_from_the_environment_is_sent() {
    let fake = FakeKps::start();
    let auth = resolve_env(&[(ENV_TOKEN, fake_kps::TOKEN)]).unwrap();
    assert_eq!(list_status(&auth, &fake).await, 200);
    assert!(
        fake.stats()
            .auth_methods_seen
            .contains(&fake_kps::AuthMethod::Token)
    );
}

#[tokio::test]
async fn a_missing_token_file_is_an_error_naming_it_and_the_method() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent");
    let auth = Auth::resolve(&kps(AuthConfig::TokenFile(path.clone())), &env_of(&[])).unwrap();
    let mut req = request(reqwest::Method::GET, "https://kms.example/x", None);
    let err = auth.apply(&mut req).await.unwrap_err().to_string();
    assert!(err.starts_with("token from file"), "{err}");
    assert!(err.contains(&path.display().to_string()), "{err}");
}

fn aksk_files(dir: &Path, ak: &str, sk: &str) -> AuthConfig {
    AuthConfig::AkSk {
        access_key_file: write(dir, "ak", &format!("{ak}\n"), 0o600),
        secret_key_file: write(dir, "sk", &format!("{sk}\n"), 0o600),
        security_token_file: None,
    }
}

#[tokio::test]
async fn aksk_signatures_are_accepted_by_an_independent_verifier_over_the_wire() {
    let fake = FakeKps::start();
    fake.add_key("kp-alpha");
    let dir = tempfile::tempdir().unwrap();
    let auth = Auth::resolve(
        &kps_with(
            aksk_files(dir.path(), fake_kps::AK, fake_kps::SK),
            &fake.url(),
            None,
        ),
        &env_of(&[]),
    )
    .unwrap();
    let client = reqwest::Client::new();

    // A query out of order and needing escapes: it is sent as it was signed.
    let mut req = request(
        reqwest::Method::GET,
        &list_url(&fake, "?marker=kp-alpha&limit=5&note=a+b/c"),
        None,
    );
    auth.apply(&mut req).await.unwrap();
    assert_eq!(
        req.url().query(),
        Some("limit=5&marker=kp-alpha&note=a%20b%2Fc")
    );
    assert!(req.headers()["authorization"].is_sensitive());
    assert_eq!(header(&req, "x-project-id").as_deref(), Some(PROJECT_ID));
    let authorization = header(&req, "authorization").unwrap();
    assert!(
        authorization.contains("SignedHeaders=content-type;host;x-project-id;x-sdk-date,"),
        "{authorization}"
    );
    assert_eq!(client.execute(req).await.unwrap().status(), 200);

    // A body is signed too.
    let url = format!("{}/v3/{PROJECT_ID}/keypairs/private-key/export", fake.url());
    let mut req = request(
        reqwest::Method::POST,
        &url,
        Some(r#"{"keypair":{"name":"kp-alpha"}}"#),
    );
    auth.apply(&mut req).await.unwrap();
    assert_eq!(client.execute(req).await.unwrap().status(), 200);

    let stats = fake.stats();
    assert_eq!(stats.unauthorized, 0);
    assert!(
        stats
            .auth_methods_seen
            .contains(&fake_kps::AuthMethod::AkSk)
    );
}

#[tokio::test]
async fn a_wrong_sk_is_refused_by_the_server() {
    let fake = FakeKps::start();
    let dir = tempfile::tempdir().unwrap();
    let auth = Auth::resolve(
        &kps_with(
            aksk_files(dir.path(), fake_kps::AK, "SKwrong"),
            &fake.url(),
            None,
        ),
        &env_of(&[]),
    )
    .unwrap();
    assert_eq!(list_status(&auth, &fake).await, 401);
}

#[tokio::test]
async fn sdk_env_keys_and_the_sdk_credentials_file_sign_accepted_requests() {
    let fake = FakeKps::start();
    let endpoint = fake.url();
    let env_keys = Auth::resolve(
        &kps_with(AuthConfig::Unspecified, &endpoint, None),
        &env_of(&[
            ("HUAWEICLOUD_SDK_AK", fake_kps::AK),
            ("HUAWEICLOUD_SDK_SK", fake_kps::SK),
        ]),
    )
    .unwrap();
    assert_eq!(list_status(&env_keys, &fake).await, 200);
    let home = home_with_credentials();
    let file_keys = Auth::resolve(
        &kps_with(AuthConfig::Unspecified, &endpoint, None),
        &env_of(&[("HOME", home.path().to_str().unwrap())]),
    )
    .unwrap();
    assert!(matches!(file_keys.source(), Source::CredentialsFile(_)));
    assert_eq!(list_status(&file_keys, &fake).await, 200);
}

fn iam_auth(fake: &FakeKps, password_file: PathBuf) -> Auth {
    let cfg = kps_with(
        AuthConfig::Iam {
            user: fake_kps::IAM_USER.into(),
            domain: fake_kps::IAM_DOMAIN.into(),
            password_file,
            endpoint: Some(fake.url()),
        },
        &fake.url(),
        None,
    );
    Auth::resolve(&cfg, &env_of(&[])).unwrap()
}

#[tokio::test]
async fn an_iam_token_is_fetched_once_reused_and_fetched_again_after_a_401() {
    let fake = FakeKps::start();
    let dir = tempfile::tempdir().unwrap();
    let pw = write(
        dir.path(),
        "pw",
        &format!("{}\n", fake_kps::IAM_PASSWORD),
        0o600,
    );
    let auth = iam_auth(&fake, pw);
    assert_eq!(list_status(&auth, &fake).await, 200);
    auth.begin_pass().await;
    assert_eq!(list_status(&auth, &fake).await, 200);
    assert_eq!(fake.stats().iam_token_calls, 1, "kept across passes");

    let mut req = request(reqwest::Method::GET, &list_url(&fake, ""), None);
    auth.apply(&mut req).await.unwrap();
    fake.revoke_token(&header(&req, "x-auth-token").unwrap());
    assert_eq!(list_status(&auth, &fake).await, 401);
    auth.invalidate().await;
    assert_eq!(list_status(&auth, &fake).await, 200);
    assert_eq!(fake.stats().iam_token_calls, 2);
}

#[tokio::test]
async fn a_wrong_iam_password_is_one_clear_error_that_never_shows_it() {
    let fake = FakeKps::start();
    let dir = tempfile::tempdir().unwrap();
    let pw = write(dir.path(), "pw", "not-the-PASSWORD-123\n", 0o600);
    let auth = iam_auth(&fake, pw.clone());
    let mut req = request(reqwest::Method::GET, &list_url(&fake, ""), None);
    let err = auth.apply(&mut req).await.unwrap_err();
    let text = format!("{err} {err:?}");
    assert!(!text.contains("not-the-PASSWORD-123"), "{text}");
    let text = err.to_string();
    assert!(
        text.contains(&format!("user `{}`", fake_kps::IAM_USER)),
        "{text}"
    );
    assert!(text.contains(&fake.url()), "{text}");
    assert!(text.contains("HTTP 401"), "{text}");
    assert!(text.contains(&pw.display().to_string()), "{text}");
    // Reported once for the pass: no second IAM call.
    assert!(auth.apply(&mut req).await.is_err());
    assert_eq!(fake.stats().iam_token_calls, 1);
    auth.begin_pass().await;
    assert!(auth.apply(&mut req).await.is_err());
    assert_eq!(fake.stats().iam_token_calls, 2);
}

/// A loopback URL where nothing listens.
fn closed_port_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    format!("http://127.0.0.1:{port}")
}

#[tokio::test]
async fn iam_unreachable_names_the_endpoint_and_what_to_check() {
    let dir = tempfile::tempdir().unwrap();
    let pw = write(dir.path(), "pw", "pw\n", 0o600);
    let endpoint = closed_port_url();
    let cfg = kps_with(
        AuthConfig::Iam {
            user: "ops".into(),
            domain: "acme".into(),
            password_file: pw,
            endpoint: Some(endpoint.clone()),
        },
        "https://kms.example",
        None,
    );
    let auth = Auth::resolve(&cfg, &env_of(&[])).unwrap();
    let mut req = request(reqwest::Method::GET, "https://kms.example/x", None);
    let text = auth.apply(&mut req).await.unwrap_err().to_string();
    assert!(text.contains(&endpoint), "{text}");
    assert!(text.contains("cannot reach IAM"), "{text}");
}

fn ecs_auth(endpoint: &str, kps_endpoint: &str) -> Auth {
    let cfg = kps_with(
        AuthConfig::EcsMetadata {
            endpoint: Some(endpoint.to_owned()),
        },
        kps_endpoint,
        None,
    );
    Auth::resolve(&cfg, &env_of(&[])).unwrap()
}

#[tokio::test]
async fn ecs_agency_keys_sign_with_their_security_token_and_are_kept() {
    let fake = FakeKps::start();
    let auth = ecs_auth(&fake.url(), &fake.url());
    let mut req = request(reqwest::Method::GET, &list_url(&fake, ""), None);
    auth.apply(&mut req).await.unwrap();
    assert!(req.headers()["x-security-token"].is_sensitive());
    assert_eq!(
        reqwest::Client::new().execute(req).await.unwrap().status(),
        200
    );
    auth.begin_pass().await;
    assert_eq!(list_status(&auth, &fake).await, 200);
    let stats = fake.stats();
    assert_eq!(
        (stats.metadata_token_calls, stats.securitykey_calls),
        (1, 1)
    );
    assert!(
        stats
            .auth_methods_seen
            .contains(&fake_kps::AuthMethod::AkSkSecurityToken)
    );
    auth.invalidate().await;
    assert_eq!(list_status(&auth, &fake).await, 200);
    assert_eq!(fake.stats().securitykey_calls, 2);
}

#[tokio::test]
async fn metadata_down_names_the_endpoint_once_per_pass() {
    let endpoint = closed_port_url();
    let auth = ecs_auth(&endpoint, "https://kms.example");
    let mut req = request(reqwest::Method::GET, "https://kms.example/x", None);
    let text = auth.apply(&mut req).await.unwrap_err().to_string();
    assert!(
        text.starts_with(&format!(
            "ECS agency credentials from the metadata service at {endpoint}: cannot reach it"
        )),
        "{text}"
    );
    assert!(text.contains("Huawei Cloud ECS"), "{text}");
}

/// A metadata service without sessions: PUT answers 405, and securitykey must then be asked
/// without `X-Metadata-Token`. Returns its URL and whether any request carried that header.
async fn sessionless_metadata() -> (String, Arc<std::sync::atomic::AtomicBool>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let saw_token = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let saw = saw_token.clone();
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = socket.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                head.extend_from_slice(&buf[..n]);
            }
            let head = String::from_utf8_lossy(&head).to_lowercase();
            if head.contains("x-metadata-token:") {
                saw.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            let answer = if head.starts_with("put ") {
                "HTTP/1.1 405 Method Not Allowed\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    .to_owned()
            } else {
                let body = format!(
                    r#"{{"credential":{{"access":"{}","secret":"{}","securitytoken":"st","expires_at":"{}"}}}}"#,
                    fake_kps::AK,
                    fake_kps::SK,
                    humantime::format_rfc3339_micros(SystemTime::now() + Duration::from_secs(3600))
                );
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                )
            };
            socket.write_all(answer.as_bytes()).await.unwrap();
        }
    });
    (url, saw_token)
}

#[tokio::test]
async fn a_metadata_service_without_sessions_is_asked_without_a_session_token() {
    let (url, saw_token) = sessionless_metadata().await;
    let auth = ecs_auth(&url, "https://kms.example");
    let mut req = request(reqwest::Method::GET, "https://kms.example/x", None);
    auth.apply(&mut req).await.unwrap();
    assert_eq!(header(&req, "x-security-token").as_deref(), Some("st"));
    assert!(
        header(&req, "authorization")
            .unwrap()
            .contains(fake_kps::AK)
    );
    assert!(!saw_token.load(std::sync::atomic::Ordering::SeqCst));
}

// validate's file checks.

#[test]
fn file_checks_warn_on_loose_modes_and_fail_on_missing_or_empty_files() {
    let dir = tempfile::tempdir().unwrap();
    let token = write(dir.path(), "token", "t\n", 0o600);
    let auth = Auth::resolve(&kps(AuthConfig::TokenFile(token.clone())), &env_of(&[])).unwrap();
    assert_eq!(auth.check_files(), vec![]);

    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
    match auth.check_files().as_slice() {
        [FileCheck::Warning(w)] => {
            assert!(w.contains("readable by every user"), "{w}");
            assert!(
                w.contains(&format!("chmod 0600 {}", token.display())),
                "{w}"
            );
        }
        other => panic!("{other:?}"),
    }

    std::fs::write(&token, "\n").unwrap();
    match auth.check_files().as_slice() {
        [FileCheck::Error(e)] => assert!(e.contains("is empty"), "{e}"),
        other => panic!("{other:?}"),
    }

    std::fs::remove_file(&token).unwrap();
    match auth.check_files().as_slice() {
        [FileCheck::Error(e)] => assert!(e.contains(&token.display().to_string()), "{e}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn file_checks_cover_every_file_a_source_reads() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = AuthConfig::AkSk {
        access_key_file: write(dir.path(), "ak", "A\n", 0o600),
        secret_key_file: write(dir.path(), "sk", "S\n", 0o640),
        security_token_file: Some(dir.path().join("missing")),
    };
    let checks = Auth::resolve(&kps(cfg), &env_of(&[]))
        .unwrap()
        .check_files();
    assert_eq!(checks.len(), 2, "{checks:?}");
    assert!(
        matches!(&checks[0], FileCheck::Warning(w) if w.contains("/sk ")),
        "{checks:?}"
    );
    assert!(
        matches!(&checks[1], FileCheck::Error(e) if e.contains("/missing")),
        "{checks:?}"
    );

    let pw = write(dir.path(), "pw", "p\n", 0o604);
    let iam = AuthConfig::Iam {
        user: "u".into(),
        domain: "d".into(),
        password_file: pw,
        endpoint: None,
    };
    let checks = Auth::resolve(&kps(iam), &env_of(&[]))
        .unwrap()
        .check_files();
    assert!(
        matches!(checks.as_slice(), [FileCheck::Warning(_)]),
        "{checks:?}"
    );

    let home = home_with_credentials();
    let file = home.path().join(".huaweicloud/credentials");
    let auth = resolve_env(&[("HOME", home.path().to_str().unwrap())]).unwrap();
    assert_eq!(auth.check_files(), vec![]);
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert!(matches!(
        auth.check_files().as_slice(),
        [FileCheck::Warning(_)]
    ));
    std::fs::write(&file, "[other]\n").unwrap();
    assert!(
        matches!(auth.check_files().as_slice(), [FileCheck::Error(e)] if e.contains("[basic]"))
    );

    let ecs = Auth::resolve(
        &kps(AuthConfig::EcsMetadata { endpoint: None }),
        &env_of(&[]),
    )
    .unwrap();
    assert_eq!(ecs.check_files(), vec![]);
}
