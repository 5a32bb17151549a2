//! The fake over real HTTP: auth, errors, paging, zips, IAM, metadata and the knobs.
//! A tiny blocking HTTP/1.1 client keeps these tests synchronous and dependency-free.

use std::io::{Cursor, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use fake_kps::{AK, AuthMethod, ErrorForm, FakeKps, Hostile, Layout, PROJECT_ID, SK, TOKEN, sign};
use serde_json::{Value, json};

struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    fn error_code(&self) -> String {
        self.json()["error_code"].as_str().unwrap_or("").to_string()
    }
}

/// Sends one request on a fresh connection. `headers` go out as given; a `Host` header is
/// added unless present, and `Content-Length` always.
fn send(fake: &FakeKps, method: &str, target: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
    let mut s = TcpStream::connect(fake.addr()).unwrap();
    let mut req = format!("{method} {target} HTTP/1.1\r\n");
    if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
        req.push_str(&format!("Host: {}\r\n", fake.addr()));
    }
    for (n, v) in headers {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    req.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    ));
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("headers end");
    let head = String::from_utf8(raw[..split].to_vec()).unwrap();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .map(|l| {
            let (n, v) = l.split_once(':').unwrap();
            (n.trim().to_string(), v.trim().to_string())
        })
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(n, v)| n.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    if chunked {
        let mut out = Vec::new();
        let mut rest = &body[..];
        loop {
            let eol = rest.windows(2).position(|w| w == b"\r\n").unwrap();
            let len =
                usize::from_str_radix(std::str::from_utf8(&rest[..eol]).unwrap(), 16).unwrap();
            if len == 0 {
                break;
            }
            out.extend_from_slice(&rest[eol + 2..eol + 2 + len]);
            rest = &rest[eol + 4 + len..];
        }
        body = out;
    }
    Resp {
        status,
        headers,
        body,
    }
}

fn kps_path(rest: &str) -> String {
    format!("/v3/{PID}/keypairs{rest}", PID = PROJECT_ID)
}

fn with_token(fake: &FakeKps, method: &str, target: &str, body: &[u8]) -> Resp {
    send(
        fake,
        method,
        target,
        &[
            ("X-Auth-Token", TOKEN),
            ("Content-Type", "application/json"),
        ],
        body,
    )
}

fn batch_body(names: &[&str]) -> Vec<u8> {
    let items: Vec<Value> = names
        .iter()
        .map(|n| json!({"keypair": {"name": n}}))
        .collect();
    serde_json::to_vec(&items).unwrap()
}

/// A request signed like the SDK does: every header sent (but Content-Length) is signed.
struct Signed<'a> {
    ak: &'a str,
    sk: &'a str,
    security_token: Option<&'a str>,
    date: SystemTime,
}

impl Signed<'_> {
    fn new() -> Signed<'static> {
        Signed {
            ak: AK,
            sk: SK,
            security_token: None,
            date: SystemTime::now(),
        }
    }
    fn headers(&self, fake: &FakeKps) -> Vec<(String, String)> {
        let mut h = vec![
            (
                "Content-Type".to_string(),
                "application/json;charset=utf-8".to_string(),
            ),
            ("Host".to_string(), fake.addr().to_string()),
            ("X-Project-Id".to_string(), PROJECT_ID.to_string()),
            ("X-Sdk-Date".to_string(), sign::format_sdk_date(self.date)),
        ];
        if let Some(t) = self.security_token {
            h.push(("X-Security-Token".to_string(), t.to_string()));
        }
        h
    }
    fn authorization(
        &self,
        headers: &[(String, String)],
        method: &str,
        target: &str,
        body: &[u8],
    ) -> String {
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let refs: Vec<(&str, &str)> = headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        sign::authorization(self.ak, self.sk, method, path, query, &refs, body)
    }
    fn send(&self, fake: &FakeKps, method: &str, target: &str, body: &[u8]) -> Resp {
        let mut headers = self.headers(fake);
        let auth = self.authorization(&headers, method, target, body);
        headers.push(("Authorization".to_string(), auth));
        let refs: Vec<(&str, &str)> = headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        send(fake, method, target, &refs, body)
    }
}

#[test]
fn every_answer_has_a_request_id() {
    let fake = FakeKps::start();
    for r in [
        with_token(&fake, "GET", &kps_path(""), b""),
        send(&fake, "GET", &kps_path(""), &[], b""),
        send(&fake, "GET", "/nowhere", &[], b""),
        send(&fake, "POST", "/v3/auth/tokens", &[], b"{}"),
        send(&fake, "GET", "/openstack/latest/securitykey", &[], b""),
    ] {
        let id = r.header("x-request-id").expect("X-Request-Id");
        assert_eq!(id.len(), 32);
    }
}

#[test]
fn token_auth_accepts_valid_and_refuses_missing_wrong_expired_revoked() {
    let fake = FakeKps::start();
    assert_eq!(with_token(&fake, "GET", &kps_path(""), b"").status, 200);

    let r = send(&fake, "GET", &kps_path(""), &[], b"");
    assert_eq!((r.status, r.error_code().as_str()), (401, "APIGW.0301"));
    let r = send(
        &fake,
        "GET",
        &kps_path(""),
        &[("X-Auth-Token", "nope")],
        b"",
    );
    assert_eq!(r.status, 401);

    fake.set_token_valid("short", Some(Duration::from_millis(200)));
    assert_eq!(
        send(
            &fake,
            "GET",
            &kps_path(""),
            &[("X-Auth-Token", "short")],
            b""
        )
        .status,
        200
    );
    std::thread::sleep(Duration::from_millis(250));
    assert_eq!(
        send(
            &fake,
            "GET",
            &kps_path(""),
            &[("X-Auth-Token", "short")],
            b""
        )
        .status,
        401
    );

    fake.revoke_token(TOKEN);
    assert_eq!(with_token(&fake, "GET", &kps_path(""), b"").status, 401);
    let st = fake.stats();
    assert_eq!(st.unauthorized, 4);
    assert_eq!(st.list_calls, 6);
    assert_eq!(st.auth_methods_seen, [AuthMethod::Token].into());
}

#[test]
fn signed_requests_are_accepted_and_tampered_ones_refused() {
    let fake = FakeKps::start();
    fake.add_key("kp-alpha");
    let target = kps_path("/private-key/export");
    let body = br#"{"keypair":{"name":"kp-alpha"}}"#;
    let s = Signed::new();
    let r = s.send(&fake, "POST", &target, body);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(fake.stats().auth_methods_seen, [AuthMethod::AkSk].into());

    // Query strings take part, in any order on the wire.
    fake.add_key("kp-beta");
    let r = s.send(
        &fake,
        "GET",
        &format!("{}?marker=kp-alpha&limit=5", kps_path("")),
        b"",
    );
    assert_eq!(r.status, 200);

    let headers = s.headers(&fake);
    let auth = s.authorization(&headers, "POST", &target, body);
    let send_with = |headers: &[(String, String)], body: &[u8]| {
        let mut refs: Vec<(&str, &str)> = headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        refs.push(("Authorization", &auth));
        send(&fake, "POST", &target, &refs, body)
    };
    assert_eq!(
        send_with(&headers, body).status,
        200,
        "untampered replays fine"
    );
    // Body changed.
    let r = send_with(&headers, br#"{"keypair":{"name":"kp-beta"}}"#);
    assert_eq!((r.status, r.error_code().as_str()), (401, "APIGW.0301"));
    // A signed header changed.
    let mut h = headers.clone();
    h[2].1 = "ffffffffffffffffffffffffffffffff".into();
    assert_eq!(send_with(&h, body).status, 401);
    // The date changed.
    let mut h = headers.clone();
    h[3].1 = sign::format_sdk_date(SystemTime::now() + Duration::from_secs(1));
    assert_eq!(send_with(&h, body).status, 401);

    // Wrong secret, unknown access key.
    assert_eq!(
        Signed {
            sk: "wrong",
            ..Signed::new()
        }
        .send(&fake, "POST", &target, body)
        .status,
        401
    );
    assert_eq!(
        Signed {
            ak: "AKUNKNOWN",
            ..Signed::new()
        }
        .send(&fake, "POST", &target, body)
        .status,
        401
    );
    fake.add_aksk("AKOTHER", "other-secret");
    let other = Signed {
        ak: "AKOTHER",
        sk: "other-secret",
        ..Signed::new()
    };
    assert_eq!(other.send(&fake, "POST", &target, body).status, 200);
}

#[test]
fn signed_headers_must_include_host_and_date() {
    let fake = FakeKps::start();
    let target = kps_path("");
    let date = sign::format_sdk_date(SystemTime::now());
    let host = fake.addr().to_string();
    // Signed correctly, but over content-type and x-sdk-date only.
    let signed = [
        ("Content-Type", "application/json"),
        ("X-Sdk-Date", date.as_str()),
    ];
    let auth = sign::authorization(AK, SK, "GET", &target, "", &signed, b"");
    let r = send(
        &fake,
        "GET",
        &target,
        &[
            signed[0],
            signed[1],
            ("Host", host.as_str()),
            ("Authorization", &auth),
        ],
        b"",
    );
    assert_eq!(r.status, 401);
    assert!(r.json()["error_msg"].as_str().unwrap().contains("host"));
}

#[test]
fn clock_skew_is_refused_unless_the_check_is_off() {
    let fake = FakeKps::start();
    let old = Signed {
        date: SystemTime::now() - Duration::from_secs(16 * 60),
        ..Signed::new()
    };
    let ahead = Signed {
        date: SystemTime::now() + Duration::from_secs(16 * 60),
        ..Signed::new()
    };
    let near = Signed {
        date: SystemTime::now() - Duration::from_secs(14 * 60),
        ..Signed::new()
    };
    assert_eq!(old.send(&fake, "GET", &kps_path(""), b"").status, 401);
    assert_eq!(ahead.send(&fake, "GET", &kps_path(""), b"").status, 401);
    assert_eq!(near.send(&fake, "GET", &kps_path(""), b"").status, 200);
    fake.set_clock_skew_check(false);
    assert_eq!(old.send(&fake, "GET", &kps_path(""), b"").status, 200);
}

#[test]
fn batch_export_returns_a_real_zip_in_each_layout() {
    let fake = FakeKps::start();
    let a = fake.add_key("kp-a");
    let b = fake.add_key("kp_b");
    for (layout, prefix, suffix) in [
        (Layout::Pem, "", ".pem"),
        (Layout::Bare, "", ""),
        (Layout::Folder, "keypairs/", ".pem"),
        (Layout::Txt, "", ".txt"),
    ] {
        fake.set_layout(layout);
        let r = with_token(
            &fake,
            "POST",
            &kps_path("/private-key/batch-export"),
            &batch_body(&["kp-a", "kp_b"]),
        );
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type"), Some("application/zip"));
        let mut z = zip::ZipArchive::new(Cursor::new(r.body)).unwrap();
        assert_eq!(z.len(), 2);
        for (name, text) in [("kp-a", &a), ("kp_b", &b)] {
            let mut f = z.by_name(&format!("{prefix}{name}{suffix}")).unwrap();
            let mut s = String::new();
            f.read_to_string(&mut s).unwrap();
            assert_eq!(&s, text);
        }
    }
    let st = fake.stats();
    assert_eq!((st.batch_export_calls, st.names_exported), (4, 8));
}

#[test]
fn export_errors_match_the_real_service() {
    let fake = FakeKps::start();
    fake.add_key("good");
    fake.add_unhosted_key("unhosted");
    let batch = kps_path("/private-key/batch-export");
    let eleven: Vec<String> = (0..11).map(|i| format!("k{i}")).collect();
    let eleven: Vec<&str> = eleven.iter().map(String::as_str).collect();
    for (body, status, code) in [
        (batch_body(&[]), 400, "KPS.0002"),
        (batch_body(&eleven), 400, "KPS.0002"),
        (
            b"{\"keypair\":{\"name\":\"good\"}}".to_vec(),
            400,
            "KPS.0002",
        ),
        (b"not json".to_vec(), 400, "KPS.0002"),
        (batch_body(&["bad name"]), 400, "KPS.0002"),
        (batch_body(&["good", "good"]), 400, "KPS.0002"),
        (batch_body(&["good", "missing"]), 400, "KPS.6004"),
        (batch_body(&["good", "unhosted"]), 400, "KPS.6005"),
    ] {
        let r = with_token(&fake, "POST", &batch, &body);
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (status, code),
            "{}",
            String::from_utf8_lossy(&body)
        );
        assert!(r.json()["error_msg"].is_string());
    }
    let single = kps_path("/private-key/export");
    for (name, code) in [
        ("missing", "KPS.6004"),
        ("unhosted", "KPS.6005"),
        ("a/b", "KPS.0002"),
    ] {
        let r = with_token(
            &fake,
            "POST",
            &single,
            json!({"keypair": {"name": name}}).to_string().as_bytes(),
        );
        assert_eq!((r.status, r.error_code().as_str()), (400, code));
    }
    let r = with_token(&fake, "GET", &kps_path("/missing"), b"");
    assert_eq!((r.status, r.error_code().as_str()), (400, "KPS.6004"));
    let r = with_token(
        &fake,
        "GET",
        &format!("/v3/{}/keypairs", "f".repeat(32)),
        b"",
    );
    assert_eq!((r.status, r.error_code().as_str()), (403, "KPS.9003"));
    let r = with_token(&fake, "DELETE", &kps_path("/good"), b"");
    assert_eq!((r.status, r.error_code().as_str()), (404, "APIGW.0101"));
    assert_eq!(fake.stats().names_exported, 0);
}

#[test]
fn single_export_and_detail_match_the_listing() {
    let fake = FakeKps::start();
    let text = fake.add_key("web-prod");
    let r = with_token(
        &fake,
        "POST",
        &kps_path("/private-key/export"),
        br#"{"keypair":{"name":"web-prod"}}"#,
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["keypair"]["private_key"], text.as_str());
    assert_eq!(r.json()["keypair"]["name"], "web-prod");

    let d = with_token(&fake, "GET", &kps_path("/web-prod"), b"").json();
    let d = &d["keypair"];
    assert_eq!(d["frozen_state"], 0, "a number in detail");
    assert_eq!(d["is_key_protection"], true);
    let public_key = d["public_key"].as_str().unwrap();
    assert_eq!(Some(public_key.to_string()), fake.public_key("web-prod"));

    // The public blob embedded in the exported private key is the listed one.
    let b64: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
    let raw = STANDARD.decode(b64).unwrap();
    let blob = STANDARD
        .decode(public_key.strip_prefix("ssh-ed25519 ").unwrap())
        .unwrap();
    let at = raw
        .windows(blob.len())
        .position(|w| w == blob)
        .expect("blob inside the key");
    assert_eq!(&raw[at - 4..at], &(blob.len() as u32).to_be_bytes());
    use sha2::Digest;
    let fp = base64::engine::general_purpose::STANDARD_NO_PAD.encode(sha2::Sha256::digest(&blob));
    assert_eq!(d["fingerprint"], format!("SHA256:{fp}"));

    // add_key_pem serves the exact text.
    fake.add_key_pem(
        "exact",
        "-----BEGIN OPENSSH PRIVATE KEY-----\nnot really\n-----END OPENSSH PRIVATE KEY-----\n",
    );
    let r = with_token(
        &fake,
        "POST",
        &kps_path("/private-key/export"),
        br#"{"keypair":{"name":"exact"}}"#,
    );
    assert_eq!(
        r.json()["keypair"]["private_key"],
        fake.private_key("exact").unwrap().as_str()
    );
    fake.remove_key("exact");
    assert!(fake.private_key("exact").is_none());
}

#[test]
fn listing_pages_with_markers_until_null() {
    let fake = FakeKps::start();
    for i in 0..7 {
        fake.add_key(&format!("key-{i}"));
    }
    fake.add_unhosted_key("key-9");
    let mut marker: Option<String> = None;
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let q = match &marker {
            Some(m) => format!("?limit=3&marker={m}"),
            None => "?limit=3".into(),
        };
        let v = with_token(&fake, "GET", &format!("{}{q}", kps_path("")), b"").json();
        pages += 1;
        for kp in v["keypairs"].as_array().unwrap() {
            let kp = &kp["keypair"];
            assert_eq!(kp["frozen_state"], "0", "a string in the listing");
            assert_eq!(kp["type"], "ssh");
            seen.push((
                kp["name"].as_str().unwrap().to_string(),
                kp["is_key_protection"].as_bool().unwrap(),
            ));
        }
        assert_eq!(
            v["page_info"]["current_count"],
            v["keypairs"].as_array().unwrap().len()
        );
        match &v["page_info"]["next_marker"] {
            Value::Null => break,
            Value::String(m) => marker = Some(m.clone()),
            other => panic!("next_marker {other}"),
        }
    }
    assert_eq!(pages, 3);
    let names: Vec<&str> = seen.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "key-0", "key-1", "key-2", "key-3", "key-4", "key-5", "key-6", "key-9"
        ]
    );
    assert!(!seen.last().unwrap().1, "key-9 is unhosted");
    for bad in ["?limit=0", "?limit=abc", "?marker=a%2Fb"] {
        let r = with_token(&fake, "GET", &format!("{}{bad}", kps_path("")), b"");
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (400, "KPS.0002"),
            "{bad}"
        );
    }
}

#[test]
fn iam_password_flow_issues_expiring_tokens() {
    let fake = FakeKps::start();
    fake.add_iam_user("acme", "ops", "s3cret");
    let body = |password: &str| {
        json!({"auth": {"identity": {"methods": ["password"], "password": {"user": {
            "domain": {"name": "acme"}, "name": "ops", "password": password}}},
            "scope": {"project": {"id": PROJECT_ID}}}})
        .to_string()
    };
    let r = send(
        &fake,
        "POST",
        "/v3/auth/tokens",
        &[("Content-Type", "application/json")],
        body("wrong").as_bytes(),
    );
    assert_eq!(r.status, 401);
    assert_eq!(
        r.json(),
        json!({"error": {"code": 401, "message": "The username or password is wrong."}})
    );

    fake.set_iam_token_lifetime(Duration::from_millis(300));
    let r = send(
        &fake,
        "POST",
        "/v3/auth/tokens",
        &[],
        body("s3cret").as_bytes(),
    );
    assert_eq!(r.status, 201);
    let token = r.header("x-subject-token").unwrap().to_string();
    let expires = r.json()["token"]["expires_at"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        expires.ends_with('Z') && expires.len() == "2026-11-26T09:05:22.701000Z".len(),
        "{expires}"
    );
    let at = humantime::parse_rfc3339(&expires).unwrap();
    assert!(at > SystemTime::now() && at < SystemTime::now() + Duration::from_secs(1));
    let list = |t: &str| send(&fake, "GET", &kps_path(""), &[("X-Auth-Token", t)], b"").status;
    assert_eq!(list(&token), 200);
    std::thread::sleep(Duration::from_millis(350));
    assert_eq!(list(&token), 401);

    // A project scope by name works too; a foreign project id does not.
    let by_name = body("s3cret").replace(
        &format!("\"id\":\"{PROJECT_ID}\""),
        "\"name\":\"cn-north-4\"",
    );
    assert_eq!(
        send(&fake, "POST", "/v3/auth/tokens", &[], by_name.as_bytes()).status,
        201
    );
    let foreign = body("s3cret").replace(PROJECT_ID, &"f".repeat(32));
    assert_eq!(
        send(&fake, "POST", "/v3/auth/tokens", &[], foreign.as_bytes()).status,
        400
    );
    assert_eq!(fake.stats().iam_token_calls, 4);
}

#[test]
fn metadata_hands_out_temporary_keys_bound_to_their_security_token() {
    let fake = FakeKps::start();
    let r = send(&fake, "PUT", "/meta-data/latest/api/token", &[], b"");
    assert_eq!(r.status, 400, "the TTL header is required");
    let r = send(&fake, "GET", "/openstack/latest/securitykey", &[], b"");
    assert_eq!(r.status, 401);
    let r = send(
        &fake,
        "GET",
        "/openstack/latest/securitykey",
        &[("X-Metadata-Token", "forged")],
        b"",
    );
    assert_eq!(r.status, 401);

    let r = send(
        &fake,
        "PUT",
        "/meta-data/latest/api/token",
        &[("X-Metadata-Token-Ttl-Seconds", "21600")],
        b"",
    );
    assert_eq!(r.status, 200);
    let session = String::from_utf8(r.body).unwrap();
    fake.set_metadata_credential_lifetime(Duration::from_millis(700));
    let r = send(
        &fake,
        "GET",
        "/openstack/latest/securitykey",
        &[("X-Metadata-Token", &session)],
        b"",
    );
    assert_eq!(r.status, 200);
    let c = r.json()["credential"].clone();
    let (ak, sk, st) = (
        c["access"].as_str().unwrap(),
        c["secret"].as_str().unwrap(),
        c["securitytoken"].as_str().unwrap(),
    );
    assert!(humantime::parse_rfc3339(c["expires_at"].as_str().unwrap()).is_ok());

    let with_token = Signed {
        ak,
        sk,
        security_token: Some(st),
        date: SystemTime::now(),
    };
    let without = Signed {
        ak,
        sk,
        security_token: None,
        date: SystemTime::now(),
    };
    let wrong = Signed {
        ak,
        sk,
        security_token: Some("other"),
        date: SystemTime::now(),
    };
    assert_eq!(
        with_token.send(&fake, "GET", &kps_path(""), b"").status,
        200
    );
    assert_eq!(without.send(&fake, "GET", &kps_path(""), b"").status, 401);
    assert_eq!(wrong.send(&fake, "GET", &kps_path(""), b"").status, 401);
    std::thread::sleep(Duration::from_millis(750));
    assert_eq!(
        with_token.send(&fake, "GET", &kps_path(""), b"").status,
        401,
        "expired"
    );
    let st = fake.stats();
    assert_eq!((st.metadata_token_calls, st.securitykey_calls), (2, 3));
    assert_eq!(st.auth_methods_seen, [AuthMethod::AkSkSecurityToken].into());
}

#[test]
fn injected_failures_throttling_and_error_rate() {
    let fake = FakeKps::start();
    fake.fail_next(1, 429);
    fake.fail_next(1, 503);
    fake.fail_next(1, 500);
    let r = with_token(&fake, "GET", &kps_path(""), b"");
    assert_eq!(
        (r.status, r.error_code().as_str(), r.header("retry-after")),
        (429, "APIG.0308", Some("1"))
    );
    let r = with_token(&fake, "GET", &kps_path(""), b"");
    assert_eq!(r.status, 503);
    let r = with_token(&fake, "GET", &kps_path(""), b"");
    assert_eq!((r.status, r.error_code().as_str()), (500, "KPS.0004"));
    assert_eq!(with_token(&fake, "GET", &kps_path(""), b"").status, 200);
    // Unauthenticated calls do not use up injected failures.
    fake.fail_next(1, 500);
    assert_eq!(send(&fake, "GET", &kps_path(""), &[], b"").status, 401);
    assert_eq!(with_token(&fake, "GET", &kps_path(""), b"").status, 500);

    fake.set_rate_limit(Some(3));
    let statuses: Vec<u16> = (0..5)
        .map(|_| with_token(&fake, "GET", &kps_path(""), b"").status)
        .collect();
    assert_eq!(statuses, [200, 200, 200, 429, 429]);
    std::thread::sleep(Duration::from_millis(1050));
    assert_eq!(with_token(&fake, "GET", &kps_path(""), b"").status, 200);
    fake.set_rate_limit(None);

    fake.set_error_rate(1.0);
    assert_eq!(with_token(&fake, "GET", &kps_path(""), b"").status, 500);
    fake.set_error_rate(0.5);
    let failed = (0..40)
        .filter(|_| with_token(&fake, "GET", &kps_path(""), b"").status == 500)
        .count();
    assert!(
        (5..=35).contains(&failed),
        "{failed} of 40 failed at rate 0.5"
    );
    fake.set_error_rate(0.0);

    let st = fake.stats();
    assert_eq!(st.throttled, 3);
    assert_eq!(st.server_errors as usize, 4 + failed);
    assert_eq!(st.unauthorized, 1);
    fake.reset_stats();
    assert_eq!(fake.stats(), fake_kps::Stats::default());
}

#[test]
fn latency_lets_concurrency_show() {
    let fake = FakeKps::start();
    fake.set_latency(Duration::from_millis(300));
    let started = std::time::Instant::now();
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| assert_eq!(with_token(&fake, "GET", &kps_path(""), b"").status, 200));
        }
    });
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(300) && elapsed < Duration::from_millis(1100),
        "{elapsed:?}"
    );
    assert_eq!(fake.stats().max_in_flight, 4);
}

#[test]
fn omitted_names_are_missing_from_zips_but_export_singly() {
    let fake = FakeKps::start();
    fake.add_key("a");
    let b = fake.add_key("b");
    fake.set_omit_from_zip(Some("b".into()));
    let r = with_token(
        &fake,
        "POST",
        &kps_path("/private-key/batch-export"),
        &batch_body(&["a", "b"]),
    );
    let z = zip::ZipArchive::new(Cursor::new(r.body)).unwrap();
    assert_eq!(z.file_names().collect::<Vec<_>>(), ["a.pem"]);
    let r = with_token(
        &fake,
        "POST",
        &kps_path("/private-key/export"),
        br#"{"keypair":{"name":"b"}}"#,
    );
    assert_eq!(r.json()["keypair"]["private_key"], b.as_str());
    assert_eq!(fake.stats().names_exported, 2);
}

#[test]
fn hostile_zips_are_served() {
    let fake = FakeKps::start();
    fake.add_key("a");
    fake.add_key("b");
    let body = batch_body(&["a", "b"]);
    let target = kps_path("/private-key/batch-export");
    fake.set_hostile(Some(Hostile::NotZip));
    let r = with_token(&fake, "POST", &target, &body);
    assert_eq!(r.status, 200);
    assert_ne!(&r.body[..4], b"PK\x03\x04");
    fake.set_hostile(Some(Hostile::Traversal));
    let r = with_token(&fake, "POST", &target, &body);
    let z = zip::ZipArchive::new(Cursor::new(r.body)).unwrap();
    assert!(z.file_names().any(|n| n == "../a.pem"));
    fake.set_hostile(Some(Hostile::Bomb));
    let r = with_token(&fake, "POST", &target, &body);
    assert!(r.body.len() < 2 << 20, "a tiny zip, {} bytes", r.body.len());
    let mut z = zip::ZipArchive::new(Cursor::new(r.body)).unwrap();
    assert_eq!(z.by_name("a.pem").unwrap().size(), 4096);
    fake.set_hostile(None);
    let r = with_token(&fake, "POST", &target, &body);
    assert_eq!(zip::ZipArchive::new(Cursor::new(r.body)).unwrap().len(), 2);
}

#[test]
fn dropping_the_fake_stops_it() {
    let fake = FakeKps::start();
    let addr = fake.addr();
    fake.set_latency(Duration::from_secs(30));
    let pending = std::thread::spawn(move || {
        TcpStream::connect(addr).map(|mut s| {
            let _ = s.write_all(b"GET /v3/x/keypairs HTTP/1.1\r\nHost: x\r\n\r\n");
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf);
        })
    });
    std::thread::sleep(Duration::from_millis(100));
    let started = std::time::Instant::now();
    drop(fake);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "drop waited for a 30 s request"
    );
    let _ = pending.join();
    assert!(TcpStream::connect(addr).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_and_stops_inside_an_async_test() {
    let fake = FakeKps::start();
    let addr = fake.addr();
    fake.add_key("a");
    let r = tokio::task::spawn_blocking(move || {
        let r = with_token(&fake, "GET", &kps_path(""), b"");
        (r.status, fake)
    })
    .await
    .unwrap();
    assert_eq!(r.0, 200);
    drop(r.1);
    assert!(TcpStream::connect(addr).is_err());
}

#[test]
fn listing_knobs_page_limit_forbidden_frozen_and_rotation() {
    let fake = FakeKps::start();
    fake.add_key("a");
    fake.add_key("f");
    let list = |q: &str| with_token(&fake, "GET", &format!("{}{q}", kps_path("")), b"");
    assert_eq!(list("?limit=1000").status, 200);
    fake.set_max_page(Some(50));
    let r = list("?limit=1000");
    assert_eq!((r.status, r.error_code().as_str()), (400, "KPS.0002"));
    assert_eq!(list("?limit=50").status, 200);

    fake.set_frozen("f", true);
    let v = list("?limit=50").json();
    let states: Vec<(&str, &str)> = v["keypairs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            (
                k["keypair"]["name"].as_str().unwrap(),
                k["keypair"]["frozen_state"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(states, [("a", "0"), ("f", "1")]);
    let r = with_token(
        &fake,
        "POST",
        &kps_path("/private-key/batch-export"),
        &batch_body(&["a", "f"]),
    );
    assert_eq!((r.status, r.error_code().as_str()), (400, "KPS.6007"));
    fake.set_frozen("f", false);
    let r = with_token(
        &fake,
        "POST",
        &kps_path("/private-key/batch-export"),
        &batch_body(&["a", "f"]),
    );
    assert_eq!(r.status, 200);

    let before = fake.public_key("a").unwrap();
    let text = fake.rotate_key("a").unwrap();
    assert_eq!(fake.private_key("a").unwrap(), text);
    assert_ne!(fake.public_key("a").unwrap(), before);

    fake.set_list_forbidden(true);
    let r = list("?limit=50");
    assert_eq!((r.status, r.error_code().as_str()), (403, "KPS.9003"));
}

#[test]
fn error_bodies_take_the_form_asked_for() {
    let fake = FakeKps::start();
    let export = || {
        with_token(
            &fake,
            "POST",
            &kps_path("/private-key/export"),
            br#"{"keypair":{"name":"gone"}}"#,
        )
    };
    assert_eq!(
        export().json(),
        json!({"error_code": "KPS.6004", "error_msg": "The keypair does not exist."})
    );
    fake.set_error_form(ErrorForm::CodeMessage);
    assert_eq!(
        export().json(),
        json!({"code": "KPS.6004", "message": "The keypair does not exist."})
    );
    fake.set_error_form(ErrorForm::Nested);
    let r = export();
    assert_eq!(r.status, 400);
    assert!(r.header("x-request-id").is_some());
    assert_eq!(
        r.json(),
        json!({"error": {"code": "KPS.6004", "message": "The keypair does not exist."}})
    );
    fake.fail_next(1, 503);
    assert_eq!(export().json()["error"]["code"], "KPS.0003");
}
