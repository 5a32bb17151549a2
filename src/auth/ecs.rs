//! ECS agency credentials: temporary AK/SK and a security token from the instance metadata
//! service, so no secret needs to be on the host's disk.
//!
//! A session token first (`PUT /meta-data/latest/api/token`; a service that does not offer
//! sessions answers 404, 405 or 503 and we go on without one), then
//! `GET /openstack/latest/securitykey` with it. Timeouts are short (3 s): the
//! service is on the local link or not there at all, and no proxy is ever used to reach it.
//!
//! Invariants: the answer is read into a zeroizing buffer and its secrets moved into
//! `SecretString`s; errors name the endpoint and the step, never a value.

use std::time::{Duration, SystemTime};

use serde::Deserialize;

use super::renew::{self, Fetched};
use super::sources::AkSk;
use super::{read_limited, transport_message};
use crate::secret::SecretString;

pub const DEFAULT_ENDPOINT: &str = "http://169.254.169.254";
pub const TIMEOUT: Duration = Duration::from_secs(3);
/// How long the metadata session may last: the service's maximum, 6 h.
const SESSION_TTL_SECONDS: &str = "21600";
/// The answer is a few hundred bytes (the security token is the bulk of it).
const MAX_ANSWER: usize = 64 << 10;

/// Fetches temporary keys from the metadata service.
#[derive(Debug)]
pub struct MetadataClient {
    pub(super) http: reqwest::Client,
    /// Base URL without a trailing `/`; named in every error.
    pub(super) endpoint: String,
}

/// A metadata failure: names the endpoint and the step.
#[derive(Debug, thiserror::Error)]
#[error("ECS agency credentials from the metadata service at {endpoint}: {problem}")]
pub struct EcsError {
    pub endpoint: String,
    pub problem: EcsProblem,
}

#[derive(Debug, thiserror::Error)]
pub enum EcsProblem {
    #[error(
        "cannot reach it: {0}; `ecs_metadata` works only on a Huawei Cloud ECS with the \
         metadata service enabled (check `kps.auth.ecs_metadata.endpoint` if you set one)"
    )]
    Transport(String),
    #[error(
        "the session token request (PUT /meta-data/latest/api/token) was answered HTTP {0}; \
         check the metadata service settings of this ECS"
    )]
    Session(u16),
    #[error(
        "GET /openstack/latest/securitykey was answered HTTP {0}; check that an agency \
         granting KPS access is attached to this ECS (console: ECS > the instance > Agency)"
    )]
    SecurityKey(u16),
    #[error("the securitykey answer {0}; is the endpoint really the ECS metadata service?")]
    BadAnswer(&'static str),
}

#[derive(Deserialize)]
struct Answer {
    credential: Credential,
}
#[derive(Deserialize)]
struct Credential {
    access: String,
    secret: String,
    #[serde(default)]
    securitytoken: Option<String>,
    expires_at: String,
}

impl MetadataClient {
    /// New temporary keys and their lifetime.
    pub async fn fetch(&self) -> Result<Fetched<AkSk>, EcsError> {
        let session = self.session().await?;
        let mut request = self
            .http
            .get(format!("{}/openstack/latest/securitykey", self.endpoint));
        if let Some(session) = &session {
            let mut value =
                reqwest::header::HeaderValue::from_str(session.expose()).map_err(|_| {
                    self.error(EcsProblem::BadAnswer("session token is not a header value"))
                })?;
            value.set_sensitive(true);
            request = request.header("X-Metadata-Token", value);
        }
        let response = request.send().await.map_err(|e| self.transport(&e))?;
        let status = response.status();
        if !status.is_success() {
            return Err(self.error(EcsProblem::SecurityKey(status.as_u16())));
        }
        let body = read_limited(response, MAX_ANSWER)
            .await
            .map_err(|e| self.error(EcsProblem::Transport(e)))?;
        let answer: Answer = serde_json::from_slice(&body).map_err(|_| {
            self.error(EcsProblem::BadAnswer(
                "is not {\"credential\":{\"access\",\"secret\",\"expires_at\"}}",
            ))
        })?;
        let c = answer.credential;
        // Moved, not copied, into their zeroizing holders.
        let sk = SecretString::new(c.secret);
        let security_token = c.securitytoken.map(SecretString::new);
        if c.access.trim().is_empty() || sk.expose().trim().is_empty() {
            return Err(self.error(EcsProblem::BadAnswer("has an empty access or secret")));
        }
        let expires_at = renew::parse_timestamp(&c.expires_at).ok_or_else(|| {
            self.error(EcsProblem::BadAnswer(
                "has an expires_at that is not a timestamp",
            ))
        })?;
        Ok(Fetched {
            value: AkSk {
                ak: c.access,
                sk,
                security_token: security_token.filter(|t| !t.expose().is_empty()),
                origin: format!("ECS metadata {}", self.endpoint),
            },
            lifetime: renew::lifetime(None, expires_at, SystemTime::now()),
        })
    }

    /// A metadata session token, or `None` where the service offers no sessions.
    async fn session(&self) -> Result<Option<SecretString>, EcsError> {
        let response = self
            .http
            .put(format!("{}/meta-data/latest/api/token", self.endpoint))
            .header("X-Metadata-Token-Ttl-Seconds", SESSION_TTL_SECONDS)
            .send()
            .await
            .map_err(|e| self.transport(&e))?;
        let status = response.status().as_u16();
        match status {
            200..=299 => {}
            404 | 405 | 503 => return Ok(None),
            _ => return Err(self.error(EcsProblem::Session(status))),
        }
        let body = read_limited(response, MAX_ANSWER)
            .await
            .map_err(|e| self.error(EcsProblem::Transport(e)))?;
        let text = std::str::from_utf8(&body)
            .map_err(|_| self.error(EcsProblem::BadAnswer("session token is not text")))?
            .trim();
        Ok(Some(SecretString::new(text.to_owned())).filter(|t| !t.is_empty()))
    }

    fn transport(&self, e: &reqwest::Error) -> EcsError {
        self.error(EcsProblem::Transport(transport_message(e)))
    }

    fn error(&self, problem: EcsProblem) -> EcsError {
        EcsError {
            endpoint: self.endpoint.clone(),
            problem,
        }
    }
}
