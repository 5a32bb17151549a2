//! `SDK-HMAC-SHA256` request signing, written from the algorithm in `shared/kps-api.md`.
//!
//! The fake uses [`verify`] to check what actually arrived on the wire; [`authorization`] exists
//! so tests (here and in kps-sync) can produce independently signed requests. Invariants: the
//! canonical path always ends in `/` (signature only, never on the wire), query pairs are sorted
//! on their decoded form, and only the headers named in `SignedHeaders` take part.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// The algorithm name, first word of the `Authorization` header and first line of the string to sign.
pub const ALGORITHM: &str = "SDK-HMAC-SHA256";

type HmacSha256 = Hmac<Sha256>;

/// Percent-encodes everything except `A-Za-z0-9-_.~`, upper-case hex, as the SDK does.
pub fn uri_encode(s: &[u8]) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Decodes `%XX` escapes; anything malformed stays as it is (the gateway is lenient here too).
pub fn percent_decode(s: &str) -> Vec<u8> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex_val(bytes[i + 1]), hex_val(bytes[i + 2]))
        {
            out.push(h << 4 | l);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

fn hex_val(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// The canonical path: each segment decoded then re-encoded, with a `/` appended.
pub fn canonical_path(path: &str) -> String {
    let encoded: Vec<String> = path
        .split('/')
        .map(|seg| uri_encode(&percent_decode(seg)))
        .collect();
    let mut joined = encoded.join("/");
    if !joined.ends_with('/') {
        joined.push('/');
    }
    joined
}

/// The canonical query: pairs decoded, sorted, re-encoded, joined by `&` (empty when none).
pub fn canonical_query(query: &str) -> String {
    let mut pairs: Vec<(Vec<u8>, Vec<u8>)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", uri_encode(k), uri_encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// The six-line canonical request. `headers` are (name, value) as received, any case;
/// `signed` are the lower-case names to include, already sorted. A signed header that is
/// missing from `headers` contributes an empty value (and so a signature mismatch).
pub fn canonical_request(
    method: &str,
    path: &str,
    query: &str,
    headers: &[(&str, &str)],
    signed: &[String],
    body: &[u8],
) -> String {
    let mut canonical_headers = String::new();
    for name in signed {
        let value = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim())
            .unwrap_or("");
        canonical_headers.push_str(name);
        canonical_headers.push(':');
        canonical_headers.push_str(value);
        canonical_headers.push('\n');
    }
    [
        method.to_ascii_uppercase(),
        canonical_path(path),
        canonical_query(query),
        canonical_headers,
        signed.join(";"),
        hex::encode(Sha256::digest(body)),
    ]
    .join("\n")
}

/// Hex HMAC-SHA256 over the string to sign, keyed by the SK as is.
pub fn signature(sk: &str, sdk_date: &str, canonical: &str) -> String {
    hex::encode(mac(sk, sdk_date, canonical).finalize().into_bytes())
}

fn mac(sk: &str, sdk_date: &str, canonical: &str) -> HmacSha256 {
    let string_to_sign = format!(
        "{ALGORITHM}\n{sdk_date}\n{}",
        hex::encode(Sha256::digest(canonical.as_bytes()))
    );
    let mut mac = HmacSha256::new_from_slice(sk.as_bytes()).expect("HMAC takes any key length");
    mac.update(string_to_sign.as_bytes());
    mac
}

/// The signed header list for a request: every header name without `_`, lower-cased, sorted.
pub fn signed_header_names(headers: &[(&str, &str)]) -> Vec<String> {
    let mut names: Vec<String> = headers
        .iter()
        .map(|(n, _)| n.to_ascii_lowercase())
        .filter(|n| !n.contains('_'))
        .collect();
    names.sort();
    names.dedup();
    names
}

/// The `Authorization` header value for a request carrying exactly `headers`, which must
/// already include `Host` and `X-Sdk-Date` (and `X-Security-Token` for temporary keys).
pub fn authorization(
    ak: &str,
    sk: &str,
    method: &str,
    path: &str,
    query: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> String {
    let signed = signed_header_names(headers);
    let date = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("x-sdk-date"))
        .map(|(_, v)| v.trim())
        .unwrap_or("");
    let canonical = canonical_request(method, path, query, headers, &signed, body);
    format!(
        "{ALGORITHM} Access={ak}, SignedHeaders={}, Signature={}",
        signed.join(";"),
        signature(sk, date, &canonical)
    )
}

/// The parts of an `Authorization: SDK-HMAC-SHA256 ...` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedAuthorization {
    /// The access key id, used to look up the SK.
    pub access: String,
    /// Lower-cased as sent; order as sent (the verifier sorts nothing: the client's list is signed).
    pub signed_headers: Vec<String>,
    /// Hex signature as sent.
    pub signature: String,
}

/// Parses the header; `None` when it is not an `SDK-HMAC-SHA256` header with all three fields.
pub fn parse_authorization(value: &str) -> Option<ParsedAuthorization> {
    let rest = value.trim().strip_prefix(ALGORITHM)?;
    if !rest.starts_with(' ') {
        return None;
    }
    let (mut access, mut signed, mut sig) = (None, None, None);
    for part in rest.split(',') {
        let (k, v) = part.trim().split_once('=')?;
        match k.trim() {
            "Access" => access = Some(v.trim().to_string()),
            "SignedHeaders" => {
                signed = Some(
                    v.trim()
                        .split(';')
                        .map(|s| s.to_ascii_lowercase())
                        .collect::<Vec<_>>(),
                )
            }
            "Signature" => sig = Some(v.trim().to_string()),
            _ => return None,
        }
    }
    Some(ParsedAuthorization {
        access: access?,
        signed_headers: signed?,
        signature: sig?,
    })
}

/// Checks `signature_hex` against the request in constant time.
pub fn verify(
    sk: &str,
    parsed: &ParsedAuthorization,
    method: &str,
    path: &str,
    query: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> bool {
    let date = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("x-sdk-date"))
        .map(|(_, v)| v.trim())
        .unwrap_or("");
    let canonical = canonical_request(method, path, query, headers, &parsed.signed_headers, body);
    let Ok(sent) = hex::decode(&parsed.signature) else {
        return false;
    };
    mac(sk, date, &canonical).verify_slice(&sent).is_ok()
}

/// Parses `YYYYMMDDTHHMMSSZ` into a time.
pub fn parse_sdk_date(s: &str) -> Option<std::time::SystemTime> {
    let b = s.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    if !b[..8].iter().chain(&b[9..15]).all(u8::is_ascii_digit) {
        return None;
    }
    let rfc = format!(
        "{}-{}-{}T{}:{}:{}Z",
        &s[0..4],
        &s[4..6],
        &s[6..8],
        &s[9..11],
        &s[11..13],
        &s[13..15]
    );
    humantime::parse_rfc3339(&rfc).ok()
}

/// Formats a time as `YYYYMMDDTHHMMSSZ`.
pub fn format_sdk_date(t: std::time::SystemTime) -> String {
    // "2026-11-25T09:30:00Z" -> "20261125T093000Z"
    humantime::format_rfc3339_seconds(t)
        .to_string()
        .chars()
        .filter(|c| !matches!(c, '-' | ':'))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const AK: &str = "AKTESTEXAMPLE0000000";
    const SK: &str = "SKtestexample0000000000000000000000000000";
    const PID: &str = "0123456789abcdef0123456789abcdef";
    const HOST: &str = "kms.cn-north-4.myhuaweicloud.com";
    const DATE: &str = "20261125T093000Z";

    fn vector(method: &str, path: &str, query: &str, ct: &str, body: &[u8]) -> String {
        let headers = [
            ("Content-Type", ct),
            ("Host", HOST),
            ("X-Project-Id", PID),
            ("X-Sdk-Date", DATE),
        ];
        let auth = authorization(AK, SK, method, path, query, &headers, body);
        let parsed = parse_authorization(&auth).expect("own header parses");
        assert_eq!(parsed.access, AK);
        assert_eq!(
            parsed.signed_headers,
            ["content-type", "host", "x-project-id", "x-sdk-date"]
        );
        assert!(verify(SK, &parsed, method, path, query, &headers, body));
        parsed.signature
    }

    #[test]
    fn vector_batch_export() {
        let body = br#"[{"keypair": {"name": "kp-alpha"}}, {"keypair": {"name": "kp-beta"}}]"#;
        let path = format!("/v3/{PID}/keypairs/private-key/batch-export");
        let headers = [
            ("Content-Type", "application/json;charset=utf-8"),
            ("Host", HOST),
            ("X-Project-Id", PID),
            ("X-Sdk-Date", DATE),
        ];
        let canonical = canonical_request(
            "POST",
            &path,
            "",
            &headers,
            &signed_header_names(&headers),
            body,
        );
        let expected = format!(
            "POST\n{path}/\n\ncontent-type:application/json;charset=utf-8\nhost:{HOST}\n\
             x-project-id:{PID}\nx-sdk-date:{DATE}\n\ncontent-type;host;x-project-id;x-sdk-date\n\
             3fcc41142aa3053b64cbe11adae8889ff9fc26a7fd38dbee7cd9ea0961c6df43"
        );
        assert_eq!(canonical, expected);
        assert_eq!(
            vector("POST", &path, "", "application/json;charset=utf-8", body),
            "24d9f5931c991a66a9d34fc16290a88bb63378e66b7883ab5cce41bb2cb64d81"
        );
    }

    #[test]
    fn vector_single_export() {
        let body = br#"{"keypair": {"name": "kp-alpha"}}"#;
        let path = format!("/v3/{PID}/keypairs/private-key/export");
        assert_eq!(
            vector("POST", &path, "", "application/json;charset=utf-8", body),
            "548f47f582748f6bf894671746564d919892700a1b4c1279745f21817a183446"
        );
    }

    #[test]
    fn vector_list() {
        let path = format!("/v3/{PID}/keypairs");
        assert_eq!(
            vector("GET", &path, "limit=50&marker=abc", "application/json", b""),
            "aa3b4b1e0d269e863a88727b48f276cc6735150630d7147dd0fa2e96bf12b3de"
        );
        // Query order on the wire does not matter: the canonical form is sorted.
        assert_eq!(
            vector("GET", &path, "marker=abc&limit=50", "application/json", b""),
            "aa3b4b1e0d269e863a88727b48f276cc6735150630d7147dd0fa2e96bf12b3de"
        );
    }

    #[test]
    fn tampering_breaks_the_signature() {
        let path = format!("/v3/{PID}/keypairs/private-key/export");
        let body = br#"{"keypair": {"name": "kp-alpha"}}"#;
        let headers = [("Host", HOST), ("X-Sdk-Date", DATE)];
        let parsed =
            parse_authorization(&authorization(AK, SK, "POST", &path, "", &headers, body)).unwrap();
        assert!(verify(SK, &parsed, "POST", &path, "", &headers, body));
        assert!(!verify(SK, &parsed, "POST", &path, "", &headers, b"{}"));
        assert!(!verify(
            "other-sk", &parsed, "POST", &path, "", &headers, body
        ));
        assert!(!verify(SK, &parsed, "GET", &path, "", &headers, body));
        assert!(!verify(SK, &parsed, "POST", &path, "a=b", &headers, body));
        let other_date = [("Host", HOST), ("X-Sdk-Date", "20261125T093001Z")];
        assert!(!verify(SK, &parsed, "POST", &path, "", &other_date, body));
        let other_host = [("Host", "evil.example"), ("X-Sdk-Date", DATE)];
        assert!(!verify(SK, &parsed, "POST", &path, "", &other_host, body));
    }

    #[test]
    fn encoding_rules() {
        assert_eq!(uri_encode(b"a-b_c.d~e f/g"), "a-b_c.d~e%20f%2Fg");
        assert_eq!(canonical_path("/v3/x/keypairs/"), "/v3/x/keypairs/");
        assert_eq!(canonical_path("/a%20b/c"), "/a%20b/c/");
        assert_eq!(canonical_query(""), "");
        assert_eq!(canonical_query("b=2&a=%41"), "a=A&b=2");
        assert_eq!(percent_decode("%4"), b"%4");
    }

    #[test]
    fn sdk_dates_round_trip() {
        let t = parse_sdk_date(DATE).unwrap();
        assert_eq!(format_sdk_date(t), DATE);
        assert!(parse_sdk_date("2026-11-25T09:30:00Z").is_none());
        assert!(parse_sdk_date("20261325T093000Z").is_none());
    }

    #[test]
    fn parse_rejects_other_schemes() {
        assert!(parse_authorization("Bearer abc").is_none());
        assert!(parse_authorization("SDK-HMAC-SHA256 Access=a, Signature=b").is_none());
        assert!(parse_authorization("SDK-HMAC-SHA256X Access=a").is_none());
    }
}
