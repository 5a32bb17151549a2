//! Authentication to KPS: exactly one source is chosen per run, and it puts its headers on each
//! request: `X-Auth-Token` for a token, an `SDK-HMAC-SHA256` signature for AK/SK.
//!
//! Which source ([`Auth::resolve`]):
//! 1. the method the manifest names, and only it (`token_file`; `access_key_file` +
//!    `secret_key_file` (+ `security_token_file`); `iam`; `ecs_metadata`);
//! 2. with none named: `HUAWEICLOUD_SDK_AK` + `HUAWEICLOUD_SDK_SK` (+
//!    `HUAWEICLOUD_SDK_SECURITY_TOKEN`), then `KPS_SYNC_AUTH_TOKEN`, then the SDK credentials
//!    file's `[basic]` section (`HUAWEICLOUD_SDK_CREDENTIALS_FILE`, else
//!    `~/.huaweicloud/credentials`). A source that is present but broken (an AK without its
//!    SK, a malformed credentials file) is an error, not a reason to try the next one.
//!
//! When credentials are read:
//! - files (token, AK/SK, SDK credentials file): at the first request of every pass
//!   ([`Auth::begin_pass`]) and again after a 401 ([`Auth::invalidate`]), so rotating a file
//!   takes effect without a restart;
//! - environment variables: once, at start (a process's environment does not change);
//! - IAM tokens and ECS agency keys: fetched on first use, kept across passes, renewed a
//!   margin before they expire and at once after a 401 (see [`renew`]).
//!
//! Invariants: secrets are read into `SecretString` and never logged; a [`Source`]'s `Display`
//! names where a credential comes from (a path, a variable, an endpoint) but never its value;
//! every error names the method and the file, variable or endpoint involved and says what to
//! check.

pub mod ecs;
pub mod iam;
pub mod renew;
pub mod sign;
pub mod sources;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use reqwest::header::{HeaderName, HeaderValue};
use tokio::sync::Mutex;
use zeroize::{Zeroize, Zeroizing};

use crate::manifest::{AuthConfig, KpsConfig};
use crate::secret::SecretString;
use ecs::{EcsError, MetadataClient};
use iam::{IamClient, IamError};
use renew::{Renewal, Renewing};
use sources::{AkSk, SourceError};

/// A token for `X-Auth-Token`, when the manifest names no method.
pub const ENV_TOKEN: &str = "KPS_SYNC_AUTH_TOKEN";

/// Where credentials come from; shown by `validate` and in errors. Never holds a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `token_file:`
    TokenFile(PathBuf),
    /// `KPS_SYNC_AUTH_TOKEN`
    TokenEnv,
    /// `access_key_file:` / `secret_key_file:` / `security_token_file:`
    AkSkFiles {
        access_key_file: PathBuf,
        secret_key_file: PathBuf,
        security_token_file: Option<PathBuf>,
    },
    /// `HUAWEICLOUD_SDK_AK` / `_SK`, with `_SECURITY_TOKEN` when `security_token`.
    AkSkEnv { security_token: bool },
    /// The SDK credentials file, `[basic]`.
    CredentialsFile(PathBuf),
    /// `iam:`; `endpoint` is the one in use (given, or derived from the region).
    Iam {
        user: String,
        domain: String,
        password_file: PathBuf,
        endpoint: String,
    },
    /// `ecs_metadata:`; `endpoint` is the one in use.
    EcsMetadata { endpoint: String },
}

impl Source {
    /// The method, as the manifest and the docs name it.
    pub fn method(&self) -> &'static str {
        match self {
            Source::TokenFile(_) | Source::TokenEnv => "token",
            Source::AkSkFiles { .. } | Source::AkSkEnv { .. } | Source::CredentialsFile(_) => {
                "AK/SK"
            }
            Source::Iam { .. } => "iam",
            Source::EcsMetadata { .. } => "ecs_metadata",
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::TokenFile(p) => write!(f, "token from file {}", p.display()),
            Source::TokenEnv => write!(f, "token from the environment variable {ENV_TOKEN}"),
            Source::AkSkFiles {
                access_key_file,
                secret_key_file,
                security_token_file,
            } => {
                write!(
                    f,
                    "AK/SK signing, keys from files {} and {}",
                    access_key_file.display(),
                    secret_key_file.display()
                )?;
                if let Some(t) = security_token_file {
                    write!(f, ", security token from file {}", t.display())?;
                }
                Ok(())
            }
            Source::AkSkEnv { security_token } => {
                write!(
                    f,
                    "AK/SK signing, keys from the environment variables {} and {}",
                    sources::ENV_AK,
                    sources::ENV_SK
                )?;
                if *security_token {
                    write!(f, ", security token from {}", sources::ENV_SECURITY_TOKEN)?;
                }
                Ok(())
            }
            Source::CredentialsFile(p) => write!(
                f,
                "AK/SK signing, keys from the Huawei Cloud SDK credentials file {} [basic]",
                p.display()
            ),
            Source::Iam {
                user,
                domain,
                password_file,
                endpoint,
            } => write!(
                f,
                "IAM token for user `{user}` in domain `{domain}` (password from file {}) from {endpoint}",
                password_file.display()
            ),
            Source::EcsMetadata { endpoint } => write!(
                f,
                "ECS agency: temporary AK/SK from the metadata service at {endpoint}"
            ),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error(
        "no KPS credentials: the manifest names no `kps.auth` method, and none of \
         HUAWEICLOUD_SDK_AK + HUAWEICLOUD_SDK_SK, KPS_SYNC_AUTH_TOKEN or {} [basic] (ak, sk) is \
         set. Add one to the manifest, e.g. `auth: {{ token_file: /path }}`, or set one of those",
        credentials_file.as_deref().map_or("~/.huaweicloud/credentials".into(), |p| p.display().to_string())
    )]
    NoneFound { credentials_file: Option<PathBuf> },
    /// A file or variable that cannot be used.
    #[error("{source_desc}: {error}")]
    Source {
        source_desc: String,
        error: SourceError,
    },
    /// Credentials read fine but unusable as they are.
    #[error("{source_desc}: {what}")]
    Unusable { source_desc: String, what: String },
    #[error(
        "`kps.auth.iam` has no `endpoint:` and `kps` has no `region:` to find IAM at \
         https://iam.{{region}}.myhuaweicloud.com: add one of them"
    )]
    IamNoEndpoint,
    #[error(transparent)]
    Iam(Box<IamError>),
    #[error(transparent)]
    Ecs(Box<EcsError>),
    /// A failure remembered for the rest of the pass (see `renew`).
    #[error(transparent)]
    Failed(Arc<AuthError>),
}

impl From<IamError> for AuthError {
    fn from(e: IamError) -> AuthError {
        AuthError::Iam(Box::new(e))
    }
}

impl From<EcsError> for AuthError {
    fn from(e: EcsError) -> AuthError {
        AuthError::Ecs(Box::new(e))
    }
}

/// A credential as applied to requests. Cheap to clone; the secrets stay in one place.
#[derive(Debug, Clone)]
enum Credential {
    Token(Arc<SecretString>),
    Key(Arc<AkSk>),
}

#[derive(Debug)]
enum Material {
    /// Read from files at the first request of a pass and after a 401.
    Reread(Mutex<Option<Credential>>),
    /// Taken from the environment at start.
    Fixed(Credential),
    Iam(IamClient, Renewing<SecretString>),
    Ecs(MetadataClient, Renewing<AkSk>),
}

/// The chosen credential source and its credentials.
#[derive(Debug)]
pub struct Auth {
    source: Source,
    /// Sent as `X-Project-Id` with a signature; the scope of IAM tokens.
    project_id: String,
    material: Material,
}

impl Auth {
    /// Choose the source: the manifest's method, else the environment and the SDK credentials
    /// file (see the module docs). `env` reads a variable (`HOME` included), injected for
    /// tests. Touches no network; reads the SDK credentials file only when the manifest names
    /// no method (to know whether it holds keys), and `kps.ca_file` for IAM.
    pub fn resolve(
        kps: &KpsConfig,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Auth, AuthError> {
        let (source, material) = match &kps.auth {
            AuthConfig::TokenFile(path) => (Source::TokenFile(path.clone()), Material::reread()),
            AuthConfig::AkSk {
                access_key_file,
                secret_key_file,
                security_token_file,
            } => (
                Source::AkSkFiles {
                    access_key_file: access_key_file.clone(),
                    secret_key_file: secret_key_file.clone(),
                    security_token_file: security_token_file.clone(),
                },
                Material::reread(),
            ),
            AuthConfig::Iam {
                user,
                domain,
                password_file,
                endpoint,
            } => {
                let endpoint = match (endpoint, &kps.region) {
                    (Some(e), _) => e.trim_end_matches('/').to_owned(),
                    (None, Some(region)) => format!("https://iam.{region}.myhuaweicloud.com"),
                    (None, None) => return Err(AuthError::IamNoEndpoint),
                };
                iam_source(user, domain, password_file, endpoint, kps)?
            }
            AuthConfig::EcsMetadata { endpoint } => {
                let endpoint = endpoint
                    .as_deref()
                    .unwrap_or(ecs::DEFAULT_ENDPOINT)
                    .trim_end_matches('/')
                    .to_owned();
                ecs_source(endpoint, kps)?
            }
            AuthConfig::Unspecified => from_environment(env)?,
        };
        Ok(Auth {
            source,
            project_id: kps.project_id.clone(),
            material,
        })
    }

    pub fn source(&self) -> &Source {
        &self.source
    }

    /// A new pass: files are read again at its first request, and an IAM or metadata failure
    /// of the last pass is tried again. Valid IAM tokens and agency keys are kept.
    pub async fn begin_pass(&self) {
        match &self.material {
            Material::Reread(cached) => *cached.lock().await = None,
            Material::Fixed(_) => {}
            Material::Iam(_, cache) => cache.forget_failure().await,
            Material::Ecs(_, cache) => cache.forget_failure().await,
        }
    }

    /// Obtain the credentials now (read the files, log in to IAM, ask the metadata service),
    /// so a pass that cannot authenticate fails once, up front, instead of once per key.
    pub async fn ready(&self) -> Result<(), AuthError> {
        self.credential().await.map(|_| ())
    }

    /// The server said 401: read or fetch the credentials again before the one retry.
    pub async fn invalidate(&self) {
        match &self.material {
            Material::Reread(cached) => *cached.lock().await = None,
            Material::Fixed(_) => {}
            Material::Iam(_, cache) => cache.invalidate().await,
            Material::Ecs(_, cache) => cache.invalidate().await,
        }
    }

    /// Put this source's headers on a request that is otherwise ready to send: nothing may
    /// be added or changed after this, since a signature covers the method, URL, headers and
    /// body. With AK/SK the URL's query is rewritten to its canonical form, which is what the
    /// SDK sends too.
    pub async fn apply(&self, request: &mut reqwest::Request) -> Result<(), AuthError> {
        match self.credential().await? {
            Credential::Token(token) => {
                let mut value = HeaderValue::from_str(token.expose()).map_err(|_| {
                    self.unusable(
                        "the token holds characters not allowed in an HTTP header; check that \
                         the file or variable holds only the token",
                    )
                })?;
                value.set_sensitive(true);
                request.headers_mut().insert("X-Auth-Token", value);
                Ok(())
            }
            Credential::Key(key) => {
                sign_request(request, &key, &self.project_id, SystemTime::now())
                    .map_err(|what| self.unusable(what))
            }
        }
    }

    async fn credential(&self) -> Result<Credential, AuthError> {
        match &self.material {
            Material::Fixed(credential) => Ok(credential.clone()),
            Material::Reread(cached) => {
                let mut cached = cached.lock().await;
                if let Some(credential) = &*cached {
                    return Ok(credential.clone());
                }
                let credential = self.read_files()?;
                *cached = Some(credential.clone());
                Ok(credential)
            }
            Material::Iam(client, cache) => cache
                .get(|| async { client.fetch().await.map_err(AuthError::from) })
                .await
                .map(Credential::Token),
            Material::Ecs(client, cache) => cache
                .get(|| async { client.fetch().await.map_err(AuthError::from) })
                .await
                .map(Credential::Key),
        }
    }

    fn read_files(&self) -> Result<Credential, AuthError> {
        let wrap = |error| AuthError::Source {
            source_desc: self.source.to_string(),
            error,
        };
        match &self.source {
            Source::TokenFile(path) => Ok(Credential::Token(Arc::new(
                sources::read_secret_file(path).map_err(wrap)?,
            ))),
            Source::AkSkFiles {
                access_key_file,
                secret_key_file,
                security_token_file,
            } => {
                // The AK is an identifier, sent in the clear: a plain String is fine.
                let ak = sources::read_secret_file(access_key_file)
                    .map_err(wrap)?
                    .expose()
                    .to_owned();
                let sk = sources::read_secret_file(secret_key_file).map_err(wrap)?;
                let security_token = security_token_file
                    .as_deref()
                    .map(sources::read_secret_file)
                    .transpose()
                    .map_err(wrap)?;
                Ok(Credential::Key(Arc::new(AkSk {
                    ak,
                    sk,
                    security_token,
                    origin: format!("files {}", access_key_file.display()),
                })))
            }
            Source::CredentialsFile(path) => {
                match sources::read_credentials_file(path).map_err(wrap)? {
                    Some(key) => Ok(Credential::Key(Arc::new(key))),
                    None => Err(self.unusable(
                        "the file no longer holds `ak` and `sk` under [basic]: put them back, or \
                     name an auth method in the manifest",
                    )),
                }
            }
            Source::TokenEnv
            | Source::AkSkEnv { .. }
            | Source::Iam { .. }
            | Source::EcsMetadata { .. } => {
                unreachable!("only file sources are re-read")
            }
        }
    }

    fn unusable(&self, what: &str) -> AuthError {
        AuthError::Unusable {
            source_desc: self.source.to_string(),
            what: what.to_owned(),
        }
    }
}

/// IAM as the source: tokens fetched with the password, renewed before they expire.
fn iam_source(
    user: &str,
    domain: &str,
    password_file: &Path,
    endpoint: String,
    kps: &KpsConfig,
) -> Result<(Source, Material), AuthError> {
    if endpoint.starts_with("http://") {
        tracing::warn!(%endpoint, "IAM is reached over plain http: the password crosses the wire unencrypted; use https:// outside tests");
    }
    let source = Source::Iam {
        user: user.to_owned(),
        domain: domain.to_owned(),
        password_file: password_file.to_owned(),
        endpoint: endpoint.clone(),
    };
    let http = http_client(
        &source,
        kps.ca_file.as_deref(),
        iam::CONNECT_TIMEOUT,
        iam::TIMEOUT,
        true,
    )?;
    let client = IamClient {
        http,
        endpoint,
        user: user.to_owned(),
        domain: domain.to_owned(),
        password_file: password_file.to_owned(),
        project_id: kps.project_id.clone(),
    };
    let material = Material::Iam(client, Renewing::new("IAM token", Renewal::IAM));
    Ok((source, material))
}

/// The ECS metadata service as the source: agency credentials, renewed before they expire.
fn ecs_source(endpoint: String, kps: &KpsConfig) -> Result<(Source, Material), AuthError> {
    let source = Source::EcsMetadata {
        endpoint: endpoint.clone(),
    };
    // Never through a proxy: the service answers only this instance, directly.
    let http = http_client(
        &source,
        kps.ca_file.as_deref(),
        ecs::TIMEOUT,
        ecs::TIMEOUT,
        false,
    )?;
    let material = Material::Ecs(
        MetadataClient { http, endpoint },
        Renewing::new("ECS agency credentials", Renewal::ECS),
    );
    Ok((source, material))
}

/// The choice when the manifest names no method.
fn from_environment(env: &dyn Fn(&str) -> Option<String>) -> Result<(Source, Material), AuthError> {
    if let Some(found) = sources::aksk_from_env(env) {
        let key = found.map_err(|error| AuthError::Source {
            source_desc: "AK/SK from the environment".into(),
            error,
        })?;
        let source = Source::AkSkEnv {
            security_token: key.security_token.is_some(),
        };
        return Ok((source, Material::Fixed(Credential::Key(Arc::new(key)))));
    }
    if let Some(token) = env(ENV_TOKEN) {
        let token = SecretString::new(token);
        if !token.expose().trim().is_empty() {
            let token = SecretString::new(token.expose().trim().to_owned());
            return Ok((
                Source::TokenEnv,
                Material::Fixed(Credential::Token(Arc::new(token))),
            ));
        }
    }
    let path = sources::credentials_file_path(env);
    if let Some(path) = &path {
        // A missing file at the default place just means the SDK is not set up; a path the
        // operator named must exist.
        let named = env(sources::ENV_CREDENTIALS_FILE).is_some_and(|p| !p.is_empty());
        match sources::read_credentials_file(path) {
            Ok(Some(_)) => return Ok((Source::CredentialsFile(path.clone()), Material::reread())),
            Ok(None) => {}
            Err(SourceError::Read { source, .. })
                if !named && source.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => {
                return Err(AuthError::Source {
                    source_desc: Source::CredentialsFile(path.clone()).to_string(),
                    error,
                });
            }
        }
    }
    Err(AuthError::NoneFound {
        credentials_file: path,
    })
}

impl Material {
    fn reread() -> Material {
        Material::Reread(Mutex::new(None))
    }
}

/// Headers [`sign::sign`] adds; stale copies are removed before signing.
const SIGNATURE_HEADERS: [&str; 5] = [
    "host",
    "x-sdk-date",
    "x-project-id",
    "x-security-token",
    "authorization",
];

/// Sign `request` with `key` as of `now`: rewrite its query to the canonical form (what is
/// signed is then byte for byte what is sent), sign the method, path, query, every header it
/// carries and its body, and add `X-Sdk-Date`, `X-Project-Id`, `X-Security-Token` (temporary
/// keys) and `Authorization`. Headers reqwest adds at send time (`User-Agent`, `Accept`) are
/// sent unsigned, which the gateway accepts: it checks the headers `SignedHeaders` lists.
/// The error says why the request cannot be signed; it holds no secret.
pub fn sign_request(
    request: &mut reqwest::Request,
    key: &AkSk,
    project_id: &str,
    now: SystemTime,
) -> Result<(), &'static str> {
    for name in SIGNATURE_HEADERS {
        request.headers_mut().remove(name);
    }
    let query = sign::canonical_query(request.url());
    request
        .url_mut()
        .set_query(Some(query.as_str()).filter(|q| !q.is_empty()));
    let headers: Vec<(String, String)> = request
        .headers()
        .iter()
        .map(|(name, value)| {
            value
                .to_str()
                .map(|v| (name.as_str().to_owned(), v.to_owned()))
        })
        .collect::<Result<_, _>>()
        .map_err(|_| "a request header is not plain text, so it cannot be signed")?;
    let headers: Vec<(&str, &str)> = headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    let body = match request.body() {
        None => &[][..],
        Some(body) => body
            .as_bytes()
            .ok_or("a streamed request body cannot be signed")?,
    };
    let signing_key = sign::SigningKey {
        ak: &key.ak,
        sk: &key.sk,
        security_token: key.security_token.as_ref(),
    };
    let mut added = sign::sign(
        request.method().as_str(),
        request.url(),
        &headers,
        body,
        Some(project_id),
        &signing_key,
        now,
    );
    let mut result = Ok(());
    for (name, value) in &added {
        let name = HeaderName::from_bytes(name.as_bytes()).expect("sign() adds valid names");
        match HeaderValue::from_str(value) {
            Ok(mut value) => {
                value.set_sensitive(name != "x-sdk-date" && name != "x-project-id");
                request.headers_mut().insert(name, value);
            }
            Err(_) => {
                result = Err(
                    "the access key or security token holds characters not allowed in an HTTP \
                     header; check that it was copied whole",
                );
                break;
            }
        }
    }
    // The security token and the signature are credentials for the next 15 minutes.
    for (_, value) in &mut added {
        value.zeroize();
    }
    result
}

/// A finding of `validate` about a credential file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileCheck {
    Warning(String),
    Error(String),
}

impl Auth {
    /// Check the files this source reads: present, readable, holding a usable credential,
    /// and not open to group or others (warnings). Touches no network; what is read is
    /// dropped (and wiped) at once.
    pub fn check_files(&self) -> Vec<FileCheck> {
        let mut out = Vec::new();
        let one_secret = |path: &Path| sources::read_secret_file(path).map(drop);
        let sdk_file = |path: &Path| match sources::read_credentials_file(path) {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err(format!(
                "{} holds no `ak` and `sk` under [basic]: add them",
                path.display()
            )),
            Err(e) => Err(e.to_string()),
        };
        let mut check = |path: &Path, content: Result<(), String>| match content {
            Err(e) => out.push(FileCheck::Error(e)),
            Ok(()) => match sources::check_file_permissions(path) {
                Ok(warnings) => out.extend(warnings.into_iter().map(FileCheck::Warning)),
                Err(e) => out.push(FileCheck::Error(e.to_string())),
            },
        };
        let secret = |path: &Path| one_secret(path).map_err(|e| e.to_string());
        match &self.source {
            Source::TokenFile(path) => check(path, secret(path)),
            Source::AkSkFiles {
                access_key_file,
                secret_key_file,
                security_token_file,
            } => {
                for path in [
                    Some(access_key_file),
                    Some(secret_key_file),
                    security_token_file.as_ref(),
                ]
                .into_iter()
                .flatten()
                {
                    check(path, secret(path));
                }
            }
            Source::CredentialsFile(path) => check(path, sdk_file(path)),
            Source::Iam { password_file, .. } => check(password_file, secret(password_file)),
            Source::TokenEnv | Source::AkSkEnv { .. } | Source::EcsMetadata { .. } => {}
        }
        out
    }
}

/// An HTTP client for IAM or the metadata service: rustls with the system roots plus
/// `ca_file`, as for KPS; no redirects (a 307 would re-send the IAM password elsewhere).
fn http_client(
    source: &Source,
    ca_file: Option<&Path>,
    connect_timeout: Duration,
    timeout: Duration,
    proxy: bool,
) -> Result<reqwest::Client, AuthError> {
    let setup = |what: String| AuthError::Unusable {
        source_desc: source.to_string(),
        what,
    };
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .user_agent(concat!("kps-sync/", env!("CARGO_PKG_VERSION")))
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(connect_timeout)
        .timeout(timeout);
    if !proxy {
        builder = builder.no_proxy();
    }
    if let Some(ca_file) = ca_file {
        let pem = std::fs::read(ca_file)
            .map_err(|e| setup(format!("cannot read ca_file {}: {e}", ca_file.display())))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
            setup(format!(
                "ca_file {} is not a PEM certificate bundle: {e}",
                ca_file.display()
            ))
        })?;
        if certs.is_empty() {
            return Err(setup(format!(
                "ca_file {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                ca_file.display()
            )));
        }
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    builder
        .build()
        .map_err(|e| setup(format!("cannot set up the HTTP client: {e}")))
}

/// A reqwest error with its causes; the URL it names holds no secret (a project id, key
/// names, an endpoint).
pub(crate) fn transport_message(err: &reqwest::Error) -> String {
    let mut message = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    message
}

/// The body, into a zeroizing buffer, refusing more than `cap` bytes.
async fn read_limited(
    mut response: reqwest::Response,
    cap: usize,
) -> Result<Zeroizing<Vec<u8>>, String> {
    if response.content_length().is_some_and(|n| n > cap as u64) {
        return Err(format!("the answer is larger than {cap} bytes"));
    }
    let mut buf = Zeroizing::new(Vec::with_capacity(4096));
    while let Some(chunk) = response.chunk().await.map_err(|e| transport_message(&e))? {
        if buf.len() + chunk.len() > cap {
            return Err(format!("the answer is larger than {cap} bytes"));
        }
        if buf.capacity() < buf.len() + chunk.len() {
            // Grow into a fresh zeroizing buffer so no stale copy is left in freed memory.
            let mut bigger = Zeroizing::new(Vec::with_capacity((buf.len() + chunk.len()) * 2));
            bigger.extend_from_slice(&buf);
            buf = bigger;
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf)
}

/// `: message` for an optional server message in an error, or nothing.
fn said(message: &Option<String>) -> String {
    message
        .as_deref()
        .map(|m| format!(": {m}"))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests;
