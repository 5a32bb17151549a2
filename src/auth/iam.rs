//! IAM password -> token: `POST {iam}/v3/auth/tokens`, scoped to the manifest's project, the
//! token in the `X-Subject-Token` header of a 201 and its `expires_at` in the body.
//!
//! Invariants: the password is read from its file for each fetch (so rotating the file just
//! works) into a zeroizing buffer, is written only into the request body, and never appears
//! in an error: IAM's own message is dropped if it echoes it. The body is serialized into a
//! zeroizing buffer sized up front so no partial copy is left behind by a reallocation; once
//! handed to the HTTP stack it is that stack's to free.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::renew::{self, Fetched};
use super::sources::{SourceError, read_secret_file};
use super::{read_limited, said, transport_message};
use crate::secret::SecretString;

/// IAM's answer with the catalog left out is about a KiB; with it, hundreds.
const MAX_ANSWER: usize = 1 << 20;
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// Exchanges a password for a project-scoped token.
#[derive(Debug)]
pub struct IamClient {
    pub(super) http: reqwest::Client,
    /// Base URL without a trailing `/`; named in every error.
    pub(super) endpoint: String,
    pub(super) user: String,
    pub(super) domain: String,
    pub(super) password_file: PathBuf,
    /// The token is scoped to the project whose key pairs we export.
    pub(super) project_id: String,
}

/// An IAM failure: names the user, the domain and the endpoint, never the password.
#[derive(Debug, thiserror::Error)]
#[error("IAM token for user `{user}` in domain `{domain}` from {endpoint}: {problem}")]
pub struct IamError {
    pub endpoint: String,
    pub user: String,
    pub domain: String,
    pub problem: IamProblem,
}

#[derive(Debug, thiserror::Error)]
pub enum IamProblem {
    #[error("cannot read the password: {0}")]
    Password(SourceError),
    #[error(
        "cannot reach IAM: {0}; check `kps.auth.iam.endpoint` (or `kps.region`), DNS, the proxy \
         settings and the firewall"
    )]
    Transport(String),
    #[error(
        "IAM refused the user name or password (HTTP 401{}); check `user` and `domain` in the \
         manifest and the password in {}",
        said(.message),
        .password_file.display()
    )]
    WrongPassword {
        message: Option<String>,
        password_file: PathBuf,
    },
    #[error("IAM answered HTTP {status}{}; {hint}", said(.message))]
    Refused {
        status: u16,
        message: Option<String>,
        hint: &'static str,
    },
    #[error(
        "IAM's answer {0}; check that the endpoint is IAM \
         (https://iam.{{region}}.myhuaweicloud.com)"
    )]
    BadAnswer(&'static str),
}

#[derive(Serialize)]
struct TokenRequest<'a> {
    auth: AuthBody<'a>,
}
#[derive(Serialize)]
struct AuthBody<'a> {
    identity: Identity<'a>,
    scope: Scope<'a>,
}
#[derive(Serialize)]
struct Identity<'a> {
    methods: [&'static str; 1],
    password: PasswordBody<'a>,
}
#[derive(Serialize)]
struct PasswordBody<'a> {
    user: User<'a>,
}
#[derive(Serialize)]
struct User<'a> {
    domain: Named<'a>,
    name: &'a str,
    password: &'a str,
}
#[derive(Serialize)]
struct Named<'a> {
    name: &'a str,
}
#[derive(Serialize)]
struct Scope<'a> {
    project: ProjectId<'a>,
}
#[derive(Serialize)]
struct ProjectId<'a> {
    id: &'a str,
}

#[derive(Deserialize)]
struct TokenAnswer {
    token: TokenBody,
}
#[derive(Deserialize)]
struct TokenBody {
    expires_at: String,
    #[serde(default)]
    issued_at: Option<String>,
}

impl IamClient {
    /// A new token and its lifetime.
    pub async fn fetch(&self) -> Result<Fetched<SecretString>, IamError> {
        let password = read_secret_file(&self.password_file)
            .map_err(|e| self.error(IamProblem::Password(e)))?;
        let body = self.request_body(&password);
        // `nocatalog` keeps the answer small: we need only the token and its expiry.
        let url = format!("{}/v3/auth/tokens?nocatalog=true", self.endpoint);
        let response = self
            .http
            .post(url)
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/json;charset=utf8",
            )
            .body(body)
            .send()
            .await
            .map_err(|e| self.error(IamProblem::Transport(transport_message(&e))))?;
        let status = response.status();
        let token = response.headers().get("x-subject-token").cloned();
        let answer = read_limited(response, MAX_ANSWER)
            .await
            .map_err(|e| self.error(IamProblem::Transport(e)))?;
        if !status.is_success() {
            let message = error_message(&answer).filter(|m| !m.contains(password.expose()));
            return Err(self.error(refusal(status.as_u16(), message, &self.password_file)));
        }
        let token = token
            .as_ref()
            .and_then(|t| t.to_str().ok())
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| self.error(IamProblem::BadAnswer("has no X-Subject-Token header")))?;
        let token = SecretString::new(token.to_owned());
        let parsed: TokenAnswer = serde_json::from_slice(&answer).map_err(|_| {
            self.error(IamProblem::BadAnswer(
                "is not a token (no token.expires_at)",
            ))
        })?;
        let expires_at = renew::parse_timestamp(&parsed.token.expires_at).ok_or_else(|| {
            self.error(IamProblem::BadAnswer(
                "has a token.expires_at that is not a timestamp",
            ))
        })?;
        let issued_at = parsed
            .token
            .issued_at
            .as_deref()
            .and_then(renew::parse_timestamp);
        Ok(Fetched {
            value: token,
            lifetime: renew::lifetime(issued_at, expires_at, SystemTime::now()),
        })
    }

    /// The documented password request, serialized straight into a zeroizing buffer.
    fn request_body(&self, password: &SecretString) -> Vec<u8> {
        let request = TokenRequest {
            auth: AuthBody {
                identity: Identity {
                    methods: ["password"],
                    password: PasswordBody {
                        user: User {
                            domain: Named { name: &self.domain },
                            name: &self.user,
                            password: password.expose(),
                        },
                    },
                },
                scope: Scope {
                    project: ProjectId {
                        id: &self.project_id,
                    },
                },
            },
        };
        // JSON escaping at most sextuples a character (`\u00XX`); room for all of it up front.
        let capacity = 256 + 6 * (password.expose().len() + self.user.len() + self.domain.len());
        let mut buf = Zeroizing::new(Vec::with_capacity(capacity + self.project_id.len()));
        serde_json::to_writer(&mut *buf, &request).expect("plain strings serialize");
        std::mem::take(&mut *buf)
    }

    fn error(&self, problem: IamProblem) -> IamError {
        IamError {
            endpoint: self.endpoint.clone(),
            user: self.user.clone(),
            domain: self.domain.clone(),
            problem,
        }
    }
}

fn refusal(status: u16, message: Option<String>, password_file: &std::path::Path) -> IamProblem {
    let hint = match status {
        401 => {
            return IamProblem::WrongPassword {
                message,
                password_file: password_file.to_owned(),
            };
        }
        400 => "check `kps.project_id` (the token is scoped to it) and the user and domain names",
        403 => {
            "the user may be disabled, its password expired, or login protection or an IP \
             restriction may be on: check the user in the IAM console"
        }
        404 => "check that the endpoint is IAM (https://iam.{region}.myhuaweicloud.com)",
        429 => "IAM is throttling; it is tried again on the next pass",
        500.. => "IAM failed; it is tried again on the next pass",
        _ => "check the endpoint and the user in the IAM console",
    };
    IamProblem::Refused {
        status,
        message,
        hint,
    }
}

/// IAM's `{"error":{"message"}}`, or the gateway's `{"error_msg"}`, clipped.
fn error_message(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Flat {
        error_msg: Option<String>,
        error: Option<Nested>,
    }
    #[derive(Deserialize)]
    struct Nested {
        message: Option<String>,
    }
    let flat: Flat = serde_json::from_slice(body).ok()?;
    let message = flat.error.and_then(|e| e.message).or(flat.error_msg)?;
    Some(message.chars().take(300).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(password_file: PathBuf) -> IamClient {
        IamClient {
            http: reqwest::Client::new(),
            endpoint: "https://iam.cn-north-4.myhuaweicloud.com".into(),
            user: "ops".into(),
            domain: "acme".into(),
            password_file,
            project_id: "0123456789abcdef0123456789abcdef".into(),
        }
    }

    #[test]
    fn the_request_is_the_documented_one() {
        let c = client(PathBuf::from("/nowhere"));
        let body = c.request_body(&SecretString::new("pa\"ss\u{1}word".into()));
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"auth": {
                "identity": {"methods": ["password"], "password": {"user": {
                    "domain": {"name": "acme"}, "name": "ops", "password": "pa\"ss\u{1}word"}}},
                "scope": {"project": {"id": "0123456789abcdef0123456789abcdef"}}}})
        );
    }

    #[test]
    fn error_messages_are_read_from_either_shape() {
        assert_eq!(
            error_message(
                br#"{"error":{"code":401,"message":"The username or password is wrong."}}"#
            )
            .as_deref(),
            Some("The username or password is wrong.")
        );
        assert_eq!(
            error_message(br#"{"error_code":"APIGW.0101","error_msg":"no api"}"#).as_deref(),
            Some("no api")
        );
        assert_eq!(error_message(b"<html>"), None);
    }

    #[test]
    fn a_401_says_what_to_check_and_names_who_and_where() {
        let err = client(PathBuf::from("/etc/kps-sync/iam-password")).error(refusal(
            401,
            Some("The username or password is wrong.".into()),
            std::path::Path::new("/etc/kps-sync/iam-password"),
        ));
        let text = err.to_string();
        assert_eq!(
            text,
            "IAM token for user `ops` in domain `acme` from \
             https://iam.cn-north-4.myhuaweicloud.com: IAM refused the user name or password \
             (HTTP 401: The username or password is wrong.); check `user` and `domain` in the \
             manifest and the password in /etc/kps-sync/iam-password"
        );
    }
}
