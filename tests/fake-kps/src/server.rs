//! The HTTP side: one fallback handler that routes by hand, so every answer, rejections
//! included, carries the real service's error body and an `X-Request-Id`.
//!
//! Order on a KPS call, as a gateway in front of a backend would do it: count the call, sleep the
//! latency, authenticate (401), throttle (429), injected failures (`fail_next`, then the error
//! rate), project check (403), then the call itself. Failed authentication never consumes
//! `fail_next` entries, so a test's injected failures land on real, authenticated calls.

use std::collections::BTreeSet;
use std::ops::Bound;
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Request, State as AxState};
use axum::http::request::Parts;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::{AccessKey, AuthMethod, ErrorForm, Hostile, PROJECT_ID, Shared, State, lock, sign};

/// Larger request bodies are refused; the biggest real one (10 names) is under 3 KiB.
const MAX_BODY: usize = 1 << 20;
/// How far `X-Sdk-Date` may be from the fake's clock.
const MAX_SKEW: Duration = Duration::from_secs(15 * 60);
/// The longest session a metadata token may ask for, as on the real service.
const MAX_METADATA_TTL: u64 = 21_600;

pub(crate) fn router(shared: Shared) -> Router {
    Router::new().fallback(handle).with_state(shared)
}

async fn handle(AxState(shared): AxState<Shared>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let mut resp = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(body) => dispatch(&shared, &parts, &body).await,
        Err(_) => kps_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "KPS.0002",
            "The request body is too large.",
        ),
    };
    let id = random_string(32, fastrand::lowercase);
    resp.headers_mut().insert(
        "x-request-id",
        HeaderValue::from_str(&id).expect("ASCII letters"),
    );
    let form = {
        let mut s = lock(&shared);
        match resp.status().as_u16() {
            401 => s.stats.unauthorized += 1,
            429 => s.stats.throttled += 1,
            500.. => s.stats.server_errors += 1,
            _ => {}
        }
        s.error_form
    };
    let status = resp.status();
    if status.is_client_error() || status.is_server_error() {
        resp = reshape_error(resp, form).await;
    }
    resp
}

/// Re-shape a `{"error_code","error_msg"}` body as `form` asks; other bodies (IAM's, the
/// metadata service's text) stay as they are.
async fn reshape_error(resp: Response, form: ErrorForm) -> Response {
    if form == ErrorForm::ErrorCode {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let bytes = axum::body::to_bytes(body, MAX_BODY)
        .await
        .unwrap_or_default();
    let reshaped = serde_json::from_slice::<Value>(&bytes).ok().and_then(|v| {
        let code = v.get("error_code")?.clone();
        let msg = v.get("error_msg")?.clone();
        Some(match form {
            ErrorForm::CodeMessage => json!({"code": code, "message": msg}),
            ErrorForm::Nested => json!({"error": {"code": code, "message": msg}}),
            ErrorForm::ErrorCode => v,
        })
    });
    let body = match reshaped {
        Some(v) => axum::body::Body::from(serde_json::to_vec(&v).expect("serializes")),
        None => axum::body::Body::from(bytes),
    };
    let mut resp = Response::from_parts(parts, body);
    resp.headers_mut().remove(header::CONTENT_LENGTH);
    resp
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call<'a> {
    BatchExport,
    Export,
    List,
    Detail(&'a str),
}

async fn dispatch(shared: &Shared, parts: &Parts, body: &Bytes) -> Response {
    let path = parts.uri.path();
    let segs: Vec<&str> = path.split('/').skip(1).collect();
    let m = &parts.method;
    match segs.as_slice() {
        ["v3", "auth", "tokens"] if m == Method::POST => iam_token(&mut lock(shared), body),
        ["meta-data", "latest", "api", "token"] if m == Method::PUT => {
            metadata_token(&mut lock(shared), parts)
        }
        ["openstack", "latest", "securitykey"] if m == Method::GET => {
            securitykey(&mut lock(shared), parts)
        }
        ["v3", pid, "keypairs", rest @ ..] => {
            let call = match rest {
                ["private-key", "batch-export"] if m == Method::POST => Call::BatchExport,
                ["private-key", "export"] if m == Method::POST => Call::Export,
                [] if m == Method::GET => Call::List,
                [name] if m == Method::GET => Call::Detail(name),
                _ => return no_such_api(),
            };
            kps(shared, parts, body, pid, call).await
        }
        _ => no_such_api(),
    }
}

/// Decrements the in-flight count even when the client hangs up mid-request.
struct InFlight(Shared);

impl Drop for InFlight {
    fn drop(&mut self) {
        lock(&self.0).in_flight -= 1;
    }
}

async fn kps(shared: &Shared, parts: &Parts, body: &Bytes, pid: &str, call: Call<'_>) -> Response {
    let latency = {
        let mut s = lock(shared);
        match call {
            Call::BatchExport => s.stats.batch_export_calls += 1,
            Call::Export => s.stats.single_export_calls += 1,
            Call::List => s.stats.list_calls += 1,
            Call::Detail(_) => s.stats.detail_calls += 1,
        }
        s.in_flight += 1;
        s.stats.max_in_flight = s.stats.max_in_flight.max(s.in_flight);
        s.latency
    };
    let _in_flight = InFlight(shared.clone());
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let mut s = lock(shared);
    kps_after_latency(&mut s, parts, body, pid, call)
}

fn kps_after_latency(
    s: &mut State,
    parts: &Parts,
    body: &[u8],
    pid: &str,
    call: Call<'_>,
) -> Response {
    match authenticate(s, parts, body) {
        Ok(method) => {
            s.stats.auth_methods_seen.insert(method);
        }
        Err(why) => return unauthorized(why),
    }
    if let Some(limit) = s.rate_limit {
        let now = Instant::now();
        while s
            .admitted
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1))
        {
            s.admitted.pop_front();
        }
        if s.admitted.len() >= limit as usize {
            return failure(429);
        }
        s.admitted.push_back(now);
    }
    if let Some(status) = s.fail_next.pop_front() {
        return failure(status);
    }
    if s.error_rate > 0.0 && s.rng.f64() < s.error_rate {
        return failure(500);
    }
    if pid != PROJECT_ID {
        return kps_error(
            StatusCode::FORBIDDEN,
            "KPS.9003",
            "No permission for this project: the project id in the path is not the one \
             the credentials are scoped to.",
        );
    }
    match call {
        Call::BatchExport => batch_export(s, body),
        Call::Export => single_export(s, body),
        Call::List => list(s, parts.uri.query().unwrap_or("")),
        Call::Detail(name) => detail(s, name),
    }
}

// ---------------------------------------------------------------------------------------------
// Authentication

fn authenticate(s: &State, parts: &Parts, body: &[u8]) -> Result<AuthMethod, &'static str> {
    let now = SystemTime::now();
    if let Some(token) = parts.headers.get("x-auth-token") {
        let token = token.to_str().map_err(|_| "token is malformed")?;
        return match s.tokens.get(token) {
            Some(None) => Ok(AuthMethod::Token),
            Some(Some(until)) if now < *until => Ok(AuthMethod::Token),
            Some(Some(_)) => Err("token expired"),
            None => Err("token is invalid"),
        };
    }
    let Some(auth) = parts.headers.get(header::AUTHORIZATION) else {
        return Err("no X-Auth-Token and no Authorization header");
    };
    let auth = auth
        .to_str()
        .ok()
        .and_then(sign::parse_authorization)
        .ok_or("Authorization is not a well-formed SDK-HMAC-SHA256 header")?;
    if !auth.signed_headers.iter().any(|h| h == "host")
        || !auth.signed_headers.iter().any(|h| h == "x-sdk-date")
    {
        return Err("SignedHeaders must include host and x-sdk-date");
    }
    let date = parts
        .headers
        .get("x-sdk-date")
        .and_then(|v| v.to_str().ok())
        .and_then(sign::parse_sdk_date)
        .ok_or("X-Sdk-Date is missing or not YYYYMMDDTHHMMSSZ")?;
    let skew = now.duration_since(date).unwrap_or_else(|e| e.duration());
    if s.clock_skew_check && skew > MAX_SKEW {
        return Err("X-Sdk-Date is more than 15 minutes off");
    }
    let key: &AccessKey = s
        .access_keys
        .get(&auth.access)
        .ok_or("unknown access key")?;
    let mut method = AuthMethod::AkSk;
    if let Some((security_token, until)) = &key.temporary {
        let sent = parts
            .headers
            .get("x-security-token")
            .and_then(|v| v.to_str().ok());
        if sent != Some(security_token.as_str()) {
            return Err("temporary access key without its X-Security-Token");
        }
        if now >= *until {
            return Err("temporary access key expired");
        }
        method = AuthMethod::AkSkSecurityToken;
    }
    let headers: Vec<(&str, &str)> = parts
        .headers
        .iter()
        .filter_map(|(n, v)| v.to_str().ok().map(|v| (n.as_str(), v)))
        .collect();
    let query = parts.uri.query().unwrap_or("");
    let ok = sign::verify(
        &key.secret,
        &auth,
        parts.method.as_str(),
        parts.uri.path(),
        query,
        &headers,
        body,
    );
    if !ok {
        return Err("verify aksk signature fail");
    }
    Ok(method)
}

// ---------------------------------------------------------------------------------------------
// KPS calls

fn valid_name(name: &str) -> bool {
    (1..=255).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn bad_request(msg: &str) -> Response {
    kps_error(StatusCode::BAD_REQUEST, "KPS.0002", msg)
}

fn not_exist() -> Response {
    kps_error(
        StatusCode::BAD_REQUEST,
        "KPS.6004",
        "The keypair does not exist.",
    )
}

fn not_hosted() -> Response {
    kps_error(
        StatusCode::BAD_REQUEST,
        "KPS.6005",
        "The private key of the keypair is not hosted.",
    )
}

fn frozen() -> Response {
    kps_error(
        StatusCode::BAD_REQUEST,
        "KPS.6007",
        "The keypair is frozen.",
    )
}

/// The name in a `{"keypair":{"name":..}}` object, if well formed and valid.
fn keypair_name(v: &Value) -> Option<&str> {
    v.get("keypair")?
        .get("name")?
        .as_str()
        .filter(|n| valid_name(n))
}

fn batch_export(s: &mut State, body: &[u8]) -> Response {
    let Ok(Value::Array(items)) = serde_json::from_slice::<Value>(body) else {
        return bad_request("The request body must be a JSON array of keypair objects.");
    };
    if items.is_empty() || items.len() > 10 {
        return bad_request("The request must name 1 to 10 keypairs.");
    }
    let Some(names) = items.iter().map(keypair_name).collect::<Option<Vec<_>>>() else {
        return bad_request("Invalid keypair name.");
    };
    if names.iter().collect::<BTreeSet<_>>().len() != names.len() {
        return bad_request("Duplicate keypair names in the request.");
    }
    let mut keys = Vec::with_capacity(names.len());
    for name in &names {
        match s.keys.get(*name) {
            None => return not_exist(),
            Some(k) => keys.push((*name, k.private_key.as_deref())),
        }
    }
    if names.iter().any(|n| s.frozen.contains(*n)) {
        return frozen();
    }
    let Some(keys) = keys
        .into_iter()
        .map(|(n, k)| k.map(|k| (n, k)))
        .collect::<Option<Vec<_>>>()
    else {
        return not_hosted();
    };
    let omit = s.omit_from_zip.as_deref();
    let zip = crate::zip::varied_batch(s, &keys, omit);
    let delivered = match s.hostile {
        Some(Hostile::NotZip) => 0,
        Some(Hostile::MissingName) => names.len().saturating_sub(1),
        _ => names.len(),
    } - usize::from(omit.is_some_and(|o| names.contains(&o)));
    s.stats.names_exported += delivered as u64;
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/zip"),
            (
                header::CONTENT_DISPOSITION,
                "attachment; filename=keypairs.zip",
            ),
        ],
        zip,
    )
        .into_response()
}

fn single_export(s: &mut State, body: &[u8]) -> Response {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return bad_request("The request body is not valid JSON.");
    };
    let Some(name) = keypair_name(&v) else {
        return bad_request("Invalid keypair name.");
    };
    let Some(key) = s.keys.get(name) else {
        return not_exist();
    };
    if s.frozen.contains(name) {
        return frozen();
    }
    let Some(text) = key.private_key.clone() else {
        return not_hosted();
    };
    s.stats.names_exported += 1;
    json_response(
        StatusCode::OK,
        json!({"keypair": {"name": name, "private_key": s.variations.text(&text)}}),
    )
}

fn summary(
    name: &str,
    key: &crate::sshkey::KeyPair,
    frozen: bool,
    variations: &crate::Variations,
) -> serde_json::Map<String, Value> {
    let v = json!({
        "name": name,
        "type": "ssh",
        "scope": "user",
        "public_key": key.listed_public_key(variations),
        "fingerprint": key.listed_fingerprint(variations),
        "is_key_protection": key.private_key.is_some(),
        "frozen_state": if frozen { "1" } else { "0" },
    });
    match v {
        Value::Object(m) => m,
        _ => unreachable!("a JSON object literal"),
    }
}

fn list(s: &mut State, query: &str) -> Response {
    if s.list_forbidden {
        return kps_error(
            StatusCode::FORBIDDEN,
            "KPS.9003",
            "No permission to list keypairs (kps:keypairs:list).",
        );
    }
    let max = s.max_page.unwrap_or(1000);
    let mut limit = 50usize;
    let mut marker: Option<String> = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = String::from_utf8_lossy(&sign::percent_decode(v)).into_owned();
        match k {
            "limit" => match v.parse::<usize>() {
                Ok(n) if (1..=max).contains(&n) => limit = n,
                _ => {
                    return bad_request(&format!("limit must be an integer from 1 to {max}."));
                }
            },
            "marker" if s.list_ignores_marker => {}
            "marker" if valid_name(&v) => marker = Some(v),
            "marker" => return bad_request("Invalid marker."),
            _ => {}
        }
    }
    let lower = marker.as_deref().map_or(Bound::Unbounded, Bound::Excluded);
    let mut page: Vec<(&String, &crate::sshkey::KeyPair)> = s
        .keys
        .range::<str, _>((lower, Bound::Unbounded))
        .take(limit + 1)
        .collect();
    let more = page.len() > limit;
    page.truncate(limit);
    let next_marker = more
        .then(|| page.last().map(|(n, _)| n.to_string()))
        .flatten();
    let previous_marker = marker
        .as_ref()
        .and_then(|_| page.first().map(|(n, _)| n.to_string()));
    let keypairs: Vec<Value> = page
        .iter()
        .map(|(n, k)| json!({ "keypair": summary(n, k, s.frozen.contains(n.as_str()), &s.variations) }))
        .collect();
    json_response(
        StatusCode::OK,
        json!({
            "keypairs": keypairs,
            "page_info": {
                "next_marker": next_marker,
                "previous_marker": previous_marker,
                "current_count": page.len(),
            }
        }),
    )
}

fn detail(s: &mut State, name: &str) -> Response {
    if !valid_name(name) {
        return bad_request("Invalid keypair name.");
    }
    let Some(key) = s.keys.get(name) else {
        return not_exist();
    };
    let frozen = s.frozen.contains(name);
    let mut m = summary(name, key, frozen, &s.variations);
    // The real service is inconsistent: a number here, a string in the listing.
    m.insert("frozen_state".into(), json!(u8::from(frozen)));
    m.insert("user_id".into(), json!("fakeuser0000000000000000000000id"));
    m.insert("create_time".into(), json!(1_764_000_000_000u64));
    m.insert("update_time".into(), json!(1_764_000_000_000u64));
    json_response(StatusCode::OK, json!({ "keypair": m }))
}

// ---------------------------------------------------------------------------------------------
// IAM

fn iam_error(status: StatusCode, message: &str) -> Response {
    json_response(
        status,
        json!({"error": {"code": status.as_u16(), "message": message}}),
    )
}

fn iam_token(s: &mut State, body: &[u8]) -> Response {
    s.stats.iam_token_calls += 1;
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return iam_error(StatusCode::BAD_REQUEST, "The request body is malformed.");
    };
    let password_method = v
        .pointer("/auth/identity/methods")
        .and_then(Value::as_array)
        .is_some_and(|m| m.iter().any(|x| x == "password"));
    let user = v.pointer("/auth/identity/password/user");
    let field = |p: &str| user.and_then(|u| u.pointer(p)).and_then(Value::as_str);
    let (Some(domain), Some(name), Some(password), true) = (
        field("/domain/name"),
        field("/name"),
        field("/password"),
        password_method,
    ) else {
        return iam_error(
            StatusCode::BAD_REQUEST,
            "The request body must use the password method with user name, domain name and password.",
        );
    };
    let known = s.iam_users.get(&(domain.to_string(), name.to_string()));
    if known.map(String::as_str) != Some(password) {
        return iam_error(
            StatusCode::UNAUTHORIZED,
            "The username or password is wrong.",
        );
    }
    let project = v.pointer("/auth/scope/project");
    let project_id = project.and_then(|p| p.get("id")).and_then(Value::as_str);
    let project_name = project.and_then(|p| p.get("name")).and_then(Value::as_str);
    match (project_id, project_name) {
        (Some(id), _) if id != PROJECT_ID => {
            return iam_error(StatusCode::BAD_REQUEST, "The project ID is invalid.");
        }
        (None, None) => {
            return iam_error(
                StatusCode::BAD_REQUEST,
                "This fake only issues project-scoped tokens: add auth.scope.project.",
            );
        }
        _ => {}
    }
    let token = format!("MIIfake{}", random_string(64, fastrand::alphanumeric));
    let issued = SystemTime::now();
    let expires = issued + s.iam_token_lifetime;
    s.tokens.insert(token.clone(), Some(expires));
    let mut resp = json_response(
        StatusCode::CREATED,
        json!({"token": {
            "expires_at": humantime::format_rfc3339_micros(expires).to_string(),
            "issued_at": humantime::format_rfc3339_micros(issued).to_string(),
            "methods": ["password"],
            "project": {"id": PROJECT_ID, "name": project_name.unwrap_or("cn-north-4"),
                        "domain": {"name": domain}},
            "user": {"name": name, "domain": {"name": domain}},
        }}),
    );
    resp.headers_mut().insert(
        "x-subject-token",
        HeaderValue::from_str(&token).expect("alphanumeric"),
    );
    resp
}

// ---------------------------------------------------------------------------------------------
// ECS metadata

fn metadata_token(s: &mut State, parts: &Parts) -> Response {
    s.stats.metadata_token_calls += 1;
    let ttl = parts
        .headers
        .get("x-metadata-token-ttl-seconds")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|t| (1..=MAX_METADATA_TTL).contains(t));
    let Some(ttl) = ttl else {
        return (
            StatusCode::BAD_REQUEST,
            "X-Metadata-Token-Ttl-Seconds must be an integer from 1 to 21600\n",
        )
            .into_response();
    };
    let token = random_string(56, fastrand::alphanumeric);
    s.metadata_sessions
        .insert(token.clone(), SystemTime::now() + Duration::from_secs(ttl));
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain")],
        token,
    )
        .into_response()
}

fn securitykey(s: &mut State, parts: &Parts) -> Response {
    s.stats.securitykey_calls += 1;
    let now = SystemTime::now();
    let valid = parts
        .headers
        .get("x-metadata-token")
        .and_then(|v| v.to_str().ok())
        .and_then(|t| s.metadata_sessions.get(t))
        .is_some_and(|until| now < *until);
    if !valid {
        return (StatusCode::UNAUTHORIZED, "Unauthorized\n").into_response();
    }
    let access = format!("TMP{}", random_string(17, fastrand::uppercase));
    let secret = random_string(40, fastrand::alphanumeric);
    let security_token = format!(
        "gQpjbi1ub3J0aC00{}",
        random_string(300, fastrand::alphanumeric)
    );
    let expires = now + s.metadata_credential_lifetime;
    s.access_keys.insert(
        access.clone(),
        AccessKey {
            secret: secret.clone(),
            temporary: Some((security_token.clone(), expires)),
        },
    );
    json_response(
        StatusCode::OK,
        json!({"credential": {
            "access": access,
            "secret": secret,
            "securitytoken": security_token,
            "expires_at": humantime::format_rfc3339_micros(expires).to_string(),
        }}),
    )
}

// ---------------------------------------------------------------------------------------------
// Answers

fn random_string(n: usize, gen_char: fn() -> char) -> String {
    (0..n).map(|_| gen_char()).collect()
}

fn json_response(status: StatusCode, v: Value) -> Response {
    (status, axum::Json(v)).into_response()
}

fn kps_error(status: StatusCode, code: &str, msg: &str) -> Response {
    json_response(status, json!({"error_code": code, "error_msg": msg}))
}

fn no_such_api() -> Response {
    kps_error(
        StatusCode::NOT_FOUND,
        "APIGW.0101",
        "The API does not exist or has not been published in the environment.",
    )
}

fn unauthorized(why: &str) -> Response {
    kps_error(
        StatusCode::UNAUTHORIZED,
        "APIGW.0301",
        &format!("Incorrect IAM authentication information: {why}."),
    )
}

/// An injected failure with the body the real service gives that status.
fn failure(status: u16) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    match status {
        429 => {
            let mut r = kps_error(
                code,
                "APIG.0308",
                "The throttling threshold has been reached: policy user over ratelimit.",
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            r
        }
        401 => unauthorized("token expired"),
        403 => kps_error(code, "KPS.9003", "No permission."),
        400..=499 => kps_error(code, "KPS.0002", "Parameter error."),
        500 => kps_error(code, "KPS.0004", "Database error."),
        _ => kps_error(code, "KPS.0003", "Dependent service unavailable."),
    }
}
