//! Authentication to KPS: exactly one source is chosen per run, and it puts its headers on each
//! request. Sources: a token (`token_file`, `KPS_SYNC_AUTH_TOKEN`), AK/SK signing, an IAM password
//! exchanged for a token, and ECS agency credentials from the metadata service.
//!
//! Invariants: secrets are read into `SecretString` and never logged; `describe()` names the
//! source (a path, a variable) but never a value; credentials are re-read at the start of every
//! pass (`begin_pass`) and once after a 401 (`invalidate`), so rotating a file just works.

pub mod sign;
pub mod sources;

use std::path::{Path, PathBuf};

use tokio::sync::Mutex;

use crate::manifest::AuthConfig;
use crate::secret::SecretString;

/// Where a credential comes from; shown by `validate` and in errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    TokenFile(PathBuf),
    TokenEnv,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::TokenFile(p) => write!(f, "token from file {}", p.display()),
            Source::TokenEnv => {
                f.write_str("token from the environment variable KPS_SYNC_AUTH_TOKEN")
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error(
        "no KPS credentials: the manifest names no `kps.auth` method, and none of HUAWEICLOUD_SDK_AK/HUAWEICLOUD_SDK_SK, KPS_SYNC_AUTH_TOKEN or ~/.huaweicloud/credentials [basic] is set. Add `auth: {{ token_file: /path }}` (or another method) to the manifest"
    )]
    NoneFound,
    #[error(
        "{source_desc}: cannot read {path}: {error}; check the file exists and is readable by kps-sync (systemd: LoadCredential=)"
    )]
    ReadFile {
        source_desc: String,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{source_desc}: {path} is empty; put the credential in it")]
    EmptyFile { source_desc: String, path: PathBuf },
    #[error("auth method `{0}` is not supported by this build yet")]
    Unsupported(&'static str),
}

/// The chosen credential source and its cached value.
#[derive(Debug)]
pub struct Auth {
    source: Source,
    /// The token as last read; cleared by `begin_pass` and `invalidate`.
    token: Mutex<Option<SecretString>>,
}

impl Auth {
    /// Choose the source from the manifest, then the environment. Reads no secret yet.
    pub fn resolve(
        cfg: &AuthConfig,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Auth, AuthError> {
        let source = match cfg {
            AuthConfig::TokenFile(path) => Source::TokenFile(path.clone()),
            AuthConfig::Unspecified => {
                if env("KPS_SYNC_AUTH_TOKEN").is_some_and(|t| !t.trim().is_empty()) {
                    Source::TokenEnv
                } else {
                    return Err(AuthError::NoneFound);
                }
            }
            AuthConfig::AkSk { .. } => return Err(AuthError::Unsupported("AK/SK")),
            AuthConfig::Iam { .. } => return Err(AuthError::Unsupported("iam")),
            AuthConfig::EcsMetadata { .. } => return Err(AuthError::Unsupported("ecs_metadata")),
        };
        Ok(Auth {
            source,
            token: Mutex::new(None),
        })
    }

    pub fn source(&self) -> &Source {
        &self.source
    }

    /// Forget cached credentials so the next request reads them again (start of a pass).
    pub async fn begin_pass(&self) {
        *self.token.lock().await = None;
    }

    /// The server said 401: read the credentials again before the one retry.
    pub async fn invalidate(&self) {
        *self.token.lock().await = None;
    }

    /// Put this source's headers on a request.
    pub async fn apply(&self, request: &mut reqwest::Request) -> Result<(), AuthError> {
        let mut cached = self.token.lock().await;
        if cached.is_none() {
            *cached = Some(self.read_token()?);
        }
        let token = cached.as_ref().expect("just filled");
        let mut value = reqwest::header::HeaderValue::from_str(token.expose()).map_err(|_| {
            AuthError::EmptyFile {
                source_desc: self.source.to_string(),
                path: PathBuf::from("<token with characters not allowed in a header>"),
            }
        })?;
        value.set_sensitive(true);
        request.headers_mut().insert("X-Auth-Token", value);
        Ok(())
    }

    fn read_token(&self) -> Result<SecretString, AuthError> {
        match &self.source {
            Source::TokenFile(path) => read_secret_file(&self.source, path),
            Source::TokenEnv => Ok(SecretString::new(
                std::env::var("KPS_SYNC_AUTH_TOKEN")
                    .unwrap_or_default()
                    .trim()
                    .to_owned(),
            )),
        }
    }
}

/// Read a one-line secret file, trimming the trailing newline.
pub fn read_secret_file(source: &Source, path: &Path) -> Result<SecretString, AuthError> {
    let text = std::fs::read_to_string(path).map_err(|error| AuthError::ReadFile {
        source_desc: source.to_string(),
        path: path.to_owned(),
        error,
    })?;
    let secret = SecretString::new(text);
    let trimmed = secret.expose().trim();
    if trimmed.is_empty() {
        return Err(AuthError::EmptyFile {
            source_desc: source.to_string(),
            path: path.to_owned(),
        });
    }
    Ok(SecretString::new(trimmed.to_owned()))
}

/// A finding of `validate` about a credential file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileCheck {
    Warning(String),
    Error(String),
}

impl Auth {
    /// Check the files this source reads: present, readable, and not readable by group or
    /// others. Reads no secret into memory beyond opening the file.
    pub fn check_files(&self) -> Vec<FileCheck> {
        self.files()
            .iter()
            .flat_map(|p| check_secret_file(p))
            .collect()
    }

    fn files(&self) -> Vec<PathBuf> {
        match &self.source {
            Source::TokenFile(p) => vec![p.clone()],
            Source::TokenEnv => vec![],
        }
    }
}

/// Present, a regular file, readable, and private to its owner.
pub fn check_secret_file(path: &Path) -> Vec<FileCheck> {
    use std::os::unix::fs::PermissionsExt;
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) => {
            return vec![FileCheck::Error(format!(
                "{}: {e}; create it or fix the path in the manifest",
                path.display()
            ))];
        }
    };
    if !meta.is_file() {
        return vec![FileCheck::Error(format!(
            "{}: not a regular file",
            path.display()
        ))];
    }
    if let Err(e) = std::fs::File::open(path) {
        return vec![FileCheck::Error(format!(
            "{}: cannot be read by kps-sync: {e}",
            path.display()
        ))];
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return vec![FileCheck::Warning(format!(
            "{}: mode {mode:04o} lets group or others read it; run `chmod 0600 {}`",
            path.display(),
            path.display()
        ))];
    }
    vec![]
}
