//! KPS errors: parsed from the body the way `kps-api.md` describes, and classified so the client
//! knows whether to retry, refresh credentials, isolate a name, or give up.

use std::fmt;

/// What the client should do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// 429: wait (Retry-After) and retry.
    Throttled,
    /// 5xx, timeouts, connection resets: retry with backoff.
    Transient,
    /// 401: credentials missing, wrong or expired; refresh once.
    Unauthorized,
    /// KPS.4016 / KPS.6004: the key pair does not exist. Per key.
    NotFound,
    /// KPS.6005: KPS does not hold this private key. Per key.
    NotHosted,
    /// Credentials could not be obtained (a file, IAM or the metadata service failed); the
    /// message says what to check.
    Credentials,
    /// Anything else: a permanent failure (403, bad request, a response we cannot read).
    Permanent,
}

#[derive(Debug, Clone)]
pub struct KpsError {
    pub class: Class,
    /// What we were doing: "batch export", "export", "list".
    pub operation: &'static str,
    pub status: Option<u16>,
    /// `KPS.6004`, `APIG.0308`, ...
    pub code: Option<String>,
    /// The server's message, or our description of a transport problem. Never holds secrets.
    pub message: String,
    pub request_id: Option<String>,
}

impl KpsError {
    pub fn is_retryable(&self) -> bool {
        matches!(self.class, Class::Throttled | Class::Transient)
    }

    /// Affects one key only: the batch should be split to find it.
    pub fn is_per_key(&self) -> bool {
        matches!(self.class, Class::NotFound | Class::NotHosted)
    }

    /// A short label for the code: `KPS.6004`, or `HTTP 503`, or `network`.
    pub fn code_label(&self) -> String {
        match (&self.code, self.status) {
            (Some(code), _) => code.clone(),
            (None, Some(status)) => format!("HTTP {status}"),
            (None, None) => "network".into(),
        }
    }

    /// What the operator should do.
    pub fn hint(&self) -> &'static str {
        match self.class {
            Class::NotFound => {
                "check the key pair name in the manifest, or create it in KPS in this project and region"
            }
            Class::NotHosted => {
                "KPS does not hold this private key (is_key_protection is false); import it into KPS or stop managing it here"
            }
            Class::Unauthorized => {
                "check the credentials: the token may be expired or the AK/SK wrong, and the host's clock must be within 15 minutes"
            }
            Class::Throttled => {
                "KPS kept throttling; lower settings.concurrency or settings.max_rps, or spread hosts out with --splay"
            }
            Class::Transient => {
                "KPS or the network failed repeatedly; it is retried on the next pass"
            }
            Class::Credentials => "",
            Class::Permanent => match self.status {
                Some(403) => {
                    "the credentials lack permission for KPS (kps:keypairs:*) in this project, or the account is frozen"
                }
                Some(404) => "check kps.endpoint / kps.region and kps.project_id",
                _ => {
                    "check kps.endpoint, kps.project_id and the request id with Huawei Cloud support"
                }
            },
        }
    }

    pub fn transport(operation: &'static str, err: &reqwest::Error) -> KpsError {
        let message = crate::auth::transport_message(err);
        KpsError {
            class: Class::Transient,
            operation,
            status: None,
            code: None,
            message,
            request_id: None,
            // A TLS failure will not fix itself, but retrying a few times is harmless.
        }
    }

    /// Build from an HTTP error answer.
    pub fn from_response(
        operation: &'static str,
        status: u16,
        body: &[u8],
        request_id: Option<String>,
    ) -> KpsError {
        let (code, message) = parse_error_body(body);
        let class = classify(status, code.as_deref());
        let message = message.unwrap_or_else(|| {
            reqwest::StatusCode::from_u16(status)
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or("error")
                .to_owned()
        });
        KpsError {
            class,
            operation,
            status: Some(status),
            code,
            message,
            request_id,
        }
    }
}

impl fmt::Display for KpsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KPS {} failed: {}", self.operation, self.code_label())?;
        if let (Some(status), Some(_)) = (self.status, &self.code) {
            write!(f, " (HTTP {status})")?;
        }
        write!(f, ": {}", self.message)?;
        if let Some(id) = &self.request_id {
            write!(f, " [request id {id}]")?;
        }
        match self.hint() {
            "" => Ok(()),
            hint => write!(f, "; {hint}"),
        }
    }
}

impl std::error::Error for KpsError {}

/// The code and message of an error body, read the way the official SDK's exception handler
/// reads them: `error_code`/`error_msg`, then `errorCode`/`errorMsg`, then top-level
/// `code`/`message`, then the first nested object (depth first, in key order) that has one of
/// these pairs, as in `{"error":{"code":..,"message":..}}`. A pair counts when its code is
/// there; codes may be strings or numbers. Anything else (HTML, empty) gives nothing, and the
/// caller falls back to the HTTP status.
fn parse_error_body(body: &[u8]) -> (Option<String>, Option<String>) {
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(serde_json::Value::Object(map)) => match find_pair(&map, 0) {
            Some((code, message)) => (Some(clip(&code, 64)), message.map(|m| clip(&m, 300))),
            None => (None, None),
        },
        _ => (None, None),
    }
}

/// Bodies are capped at 1 MiB, but nesting is not: stop looking this deep.
const MAX_ERROR_DEPTH: usize = 8;

fn find_pair(
    map: &serde_json::Map<String, serde_json::Value>,
    depth: usize,
) -> Option<(String, Option<String>)> {
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    };
    for (code_key, message_key) in [
        ("error_code", "error_msg"),
        ("errorCode", "errorMsg"),
        ("code", "message"),
    ] {
        if let Some(code) = map.get(code_key).and_then(text) {
            return Some((code, map.get(message_key).and_then(text)));
        }
    }
    if depth >= MAX_ERROR_DEPTH {
        return None;
    }
    map.values().find_map(|v| match v {
        serde_json::Value::Object(inner) => find_pair(inner, depth + 1),
        _ => None,
    })
}

/// Server messages end up in logs; keep them to a sane length.
/// A server's text as it may appear in one log line: at most `max` characters, control
/// characters escaped, so a hostile body cannot forge lines or flood the log.
fn clip(text: &str, max: usize) -> String {
    text.chars()
        .take(max)
        .flat_map(|c| {
            let escaped: Vec<char> = if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            escaped
        })
        .collect()
}

fn classify(status: u16, code: Option<&str>) -> Class {
    match (status, code) {
        (_, Some("KPS.4016" | "KPS.6004")) => Class::NotFound,
        (_, Some("KPS.6005")) => Class::NotHosted,
        (429, _) | (_, Some("APIG.0308" | "APIGW.0308")) => Class::Throttled,
        (401, _) => Class::Unauthorized,
        (500..=599, _) => Class::Transient,
        (408, _) => Class::Transient,
        _ => Class::Permanent,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn hostile_codes_and_messages_cannot_forge_log_lines() {
        let long = "K".repeat(500);
        let body = format!(r#"{{"error_code":"KPS.1\nINFO forged {long}","error_msg":"a\r\nb"}}"#);
        let (code, message) = super::parse_error_body(body.as_bytes());
        let code = code.unwrap();
        assert!(!code.contains('\n') && code.contains("\\n"), "{code}");
        assert!(code.chars().count() <= 64 + 1, "{code}");
        let message = message.unwrap();
        assert_eq!(message, "a\\r\\nb");
    }

    use super::*;

    #[test]
    fn parses_flat_and_nested_bodies() {
        let e = KpsError::from_response(
            "batch export",
            400,
            br#"{"error_code":"KPS.6004","error_msg":"The keypair does not exist."}"#,
            Some("req-1".into()),
        );
        assert_eq!(e.class, Class::NotFound);
        assert!(e.is_per_key());
        let shown = e.to_string();
        assert!(
            shown.contains("KPS.6004") && shown.contains("req-1"),
            "{shown}"
        );

        let e = KpsError::from_response(
            "token",
            401,
            br#"{"error":{"code":401,"message":"The username or password is wrong."}}"#,
            None,
        );
        assert_eq!(e.class, Class::Unauthorized);
        assert_eq!(e.code.as_deref(), Some("401"));
    }

    #[test]
    fn reads_every_error_body_form_the_sdk_reads() {
        for (body, code, message) in [
            (
                r#"{"error_code":"KPS.6004","error_msg":"gone"}"#,
                "KPS.6004",
                "gone",
            ),
            (
                r#"{"errorCode":"KPS.0002","errorMsg":"bad"}"#,
                "KPS.0002",
                "bad",
            ),
            (
                r#"{"code":"APIGW.0301","message":"who are you"}"#,
                "APIGW.0301",
                "who are you",
            ),
            (r#"{"error":{"code":403,"message":"no"}}"#, "403", "no"),
            (
                r#"{"request":"x","fault":{"error_code":"KPS.9004","error_msg":"frozen"}}"#,
                "KPS.9004",
                "frozen",
            ),
            // The flat pair wins over a nested one.
            (
                r#"{"error":{"code":"X","message":"y"},"error_code":"KPS.0004","error_msg":"db"}"#,
                "KPS.0004",
                "db",
            ),
        ] {
            let e = KpsError::from_response("x", 400, body.as_bytes(), None);
            assert_eq!(e.code.as_deref(), Some(code), "{body}");
            assert_eq!(e.message, message, "{body}");
        }
        for body in [&b""[..], b"[]", b"{\"error\":\"flat string\"}", b"<html>"] {
            let e = KpsError::from_response("x", 418, body, None);
            assert_eq!(e.code, None);
            assert_eq!(e.code_label(), "HTTP 418");
        }
    }

    #[test]
    fn unknown_4xx_are_permanent_and_unknown_5xx_transient() {
        for (status, class) in [
            (400, Class::Permanent),
            (404, Class::Permanent),
            (409, Class::Permanent),
            (418, Class::Permanent),
            (500, Class::Transient),
            (502, Class::Transient),
            (599, Class::Transient),
        ] {
            let e =
                KpsError::from_response("x", status, br#"{"code":"NEW.1","message":"m"}"#, None);
            assert_eq!(e.class, class, "{status}");
        }
    }

    #[test]
    fn classifies_the_table_in_kps_api_md() {
        for (status, code, class) in [
            (400, "KPS.0002", Class::Permanent),
            (400, "KPS.4016", Class::NotFound),
            (400, "KPS.6005", Class::NotHosted),
            (401, "APIGW.0301", Class::Unauthorized),
            (403, "KPS.9004", Class::Permanent),
            (429, "APIG.0308", Class::Throttled),
            (500, "KPS.0004", Class::Transient),
            (503, "KPS.5001", Class::Transient),
        ] {
            let body = format!(r#"{{"error_code":"{code}","error_msg":"m"}}"#);
            let e = KpsError::from_response("x", status, body.as_bytes(), None);
            assert_eq!(e.class, class, "{status} {code}");
        }
        let e = KpsError::from_response("x", 502, b"<html>bad gateway</html>", None);
        assert_eq!(
            (e.class, e.code_label().as_str()),
            (Class::Transient, "HTTP 502")
        );
    }
}
