//! The AK/SK signer (`kps_sync::auth::sign`): the canonical request of arbitrary methods,
//! paths, queries and headers, and the `Authorization` header built from it.
//!
//! Invariants checked besides "no panic":
//! - the canonical request is deterministic and has the documented shape: the method, the
//!   path (only unreserved bytes, `%XX` and `/`, ending in `/`), the sorted encoded query, one
//!   line per signed header, the names, the body's SHA-256;
//! - the canonical query is a fixed point: a URL carrying it (as the client sends it) signs
//!   the same;
//! - a verifier that recomputes the signature from what was sent (as the gateway and the fake
//!   KPS do) gets the one in `Authorization`, with the same `SignedHeaders`;
//! - neither the SK nor the security token appears in `Authorization`;
//! - `X-Sdk-Date` is the RFC 3339 time without separators.
#![no_main]

use std::time::{Duration, UNIX_EPOCH};

use arbitrary::Arbitrary;
use kps_sync::auth::sign::{
    ALGORITHM, SigningKey, canonical_query, canonical_request, sdk_date, sign, signature,
};
use kps_sync::secret::SecretString;
use libfuzzer_sys::fuzz_target;
use url::Url;

#[derive(Arbitrary, Debug)]
struct Input {
    method: String,
    host: u8,
    port: Option<u16>,
    path: String,
    /// Pairs as reqwest appends them (form encoding)...
    pairs: Vec<(String, String)>,
    /// ...or a query string as written.
    raw_query: Option<String>,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    project_id: Option<String>,
    ak: String,
    sk: String,
    token: Option<String>,
    secs: u64,
}

const ADDED: [&str; 5] = [
    "host",
    "x-sdk-date",
    "x-project-id",
    "x-security-token",
    "authorization",
];

/// What HTTP lets through as a header (what reqwest would accept), minus what `sign` adds.
fn valid_header(name: &str, value: &str) -> bool {
    url_header_name(name)
        && !ADDED.contains(&name.to_ascii_lowercase().as_str())
        && value
            .bytes()
            .all(|b| b == b'\t' || (b' '..=b'~').contains(&b))
}

fn url_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn shape(canonical: &str, method: &str, body: &[u8]) -> usize {
    let lines: Vec<&str> = canonical.split('\n').collect();
    assert_eq!(lines[0], method.to_ascii_uppercase());
    let path = lines[1];
    assert!(path.starts_with('/') && path.ends_with('/'), "{path:?}");
    assert_encoded(path, b"/");
    assert_encoded(lines[2], b"=&");
    let pairs: Vec<&str> = lines[2].split('&').collect();
    assert!(lines[2].is_empty() || pairs.iter().all(|p| p.contains('=')));
    let blank = lines[3..]
        .iter()
        .position(|l| l.is_empty())
        .expect("blank line")
        + 3;
    let names: Vec<&str> = lines[blank + 1].split(';').collect();
    assert_eq!(names.len(), blank - 3, "a line per signed header");
    for (line, name) in lines[3..blank].iter().zip(&names) {
        assert!(line.starts_with(&format!("{name}:")), "{line:?} for {name}");
    }
    assert!(names.windows(2).all(|w| w[0] <= w[1]), "sorted names");
    assert_eq!(lines.len(), blank + 3);
    assert_eq!(lines[blank + 2], kps_sync_fuzz::sha256_hex(body));
    blank - 3
}

/// Only `A-Za-z0-9-_.~`, `%XX` (upper-case hex) and `extra`.
fn assert_encoded(text: &str, extra: &[u8]) {
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            assert!(
                b.len() > i + 2
                    && b[i + 1..i + 3]
                        .iter()
                        .all(|c| c.is_ascii_digit() || (b'A'..=b'F').contains(c)),
                "{text:?}"
            );
            i += 3;
        } else {
            assert!(
                b[i].is_ascii_alphanumeric() || b"-_.~".contains(&b[i]) || extra.contains(&b[i]),
                "{text:?}"
            );
            i += 1;
        }
    }
}

fuzz_target!(|input: Input| {
    // A method as HTTP allows it (a token); anything else never reaches the signer.
    if !url_header_name(&input.method) {
        return;
    }
    let host = [
        "kms.cn-north-4.myhuaweicloud.com",
        "127.0.0.1",
        "[::1]",
        "KMS.Example.COM",
    ][usize::from(input.host) % 4];
    let port = input.port.map(|p| format!(":{p}")).unwrap_or_default();
    let Ok(mut url) = Url::parse(&format!("https://{host}{port}/")) else {
        return;
    };
    url.set_path(&input.path);
    if let Some(raw) = &input.raw_query {
        url.set_query(Some(raw));
    } else if !input.pairs.is_empty() {
        let mut q = url.query_pairs_mut();
        for (k, v) in &input.pairs {
            q.append_pair(k, v);
        }
    }
    let headers: Vec<(&str, &str)> = input
        .headers
        .iter()
        .filter(|(n, v)| valid_header(n, v))
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();

    let canonical = canonical_request(&input.method, &url, &headers, &input.body);
    assert_eq!(
        canonical,
        canonical_request(&input.method, &url, &headers, &input.body)
    );
    let signed = shape(&canonical, &input.method, &input.body);
    let unsigned = headers.iter().filter(|(n, _)| n.contains('_')).count();
    assert_eq!(
        signed,
        headers.len() + 1 - unsigned,
        "Host and every header without `_`"
    );

    // The client sends the canonical query; it must sign the same.
    let query = canonical_query(&url);
    let mut sent = url.clone();
    sent.set_query((!query.is_empty()).then_some(query.as_str()));
    assert_eq!(
        canonical_query(&sent),
        query,
        "the canonical query is a fixed point"
    );
    assert_eq!(
        canonical_request(&input.method, &sent, &headers, &input.body),
        canonical
    );

    // Sign, then verify as the gateway does, from what is on the wire.
    let ak: String = input
        .ak
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .collect();
    let project = input
        .project_id
        .filter(|p| valid_header("x-project-id-value", p));
    let token = input
        .token
        .filter(|t| !t.is_empty() && valid_header("x-token", t));
    if ak.is_empty() || input.sk.is_empty() || project.as_deref().is_some_and(str::is_empty) {
        return;
    }
    let sk = SecretString::new(input.sk.clone());
    let token_secret = token.clone().map(SecretString::new);
    let key = SigningKey {
        ak: &ak,
        sk: &sk,
        security_token: token_secret.as_ref(),
    };
    // Up to the year 9999, the range RFC 3339 (and X-Sdk-Date) can write.
    let date = UNIX_EPOCH + Duration::from_secs(input.secs % 253_402_300_800);
    let added = sign(
        &input.method,
        &sent,
        &headers,
        &input.body,
        project.as_deref(),
        &key,
        date,
    );
    let (auth_name, authorization) = added.last().expect("Authorization");
    assert_eq!(auth_name, "Authorization");
    let rest = authorization
        .strip_prefix(&format!("{ALGORITHM} Access={ak}, SignedHeaders="))
        .expect("the documented Authorization form");
    let (names, sig) = rest.split_once(", Signature=").expect("a signature");
    let mut wire: Vec<(&str, &str)> = headers.clone();
    wire.extend(
        added[..added.len() - 1]
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str())),
    );
    let date_header = &added[0].1;
    let recomputed = canonical_request(&input.method, &sent, &wire, &input.body);
    assert_eq!(
        signature(&recomputed, date_header, &sk),
        sig,
        "the verifier agrees"
    );
    assert_eq!(
        recomputed.split('\n').rev().nth(1),
        Some(names),
        "SignedHeaders"
    );
    // No SK or token: Authorization is exactly the AK, the signed names and a 64-hex signature.
    // (A substring check misfires: a fuzzed SK can span "AK, SignedHeaders=".)
    assert_eq!(sig.len(), 64);
    assert!(
        sig.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    );
    assert_eq!(
        authorization,
        &format!("{ALGORITHM} Access={ak}, SignedHeaders={names}, Signature={sig}")
    );

    let rfc = humantime::format_rfc3339_seconds(date)
        .to_string()
        .replace(['-', ':'], "");
    assert_eq!(sdk_date(date), rfc);
    assert_eq!(date_header, &rfc);
});
