//! The KPS HTTP client: batch export, single export, list; `archive` unpacks the batch
//! export's zip under hard limits, and `export` falls back to single exports where a batch
//! cannot be used. Retries throttling and server
//! errors with backoff and jitter (honouring `Retry-After`) within a bounded budget, refreshes
//! credentials once on a 401, caps every response body, and logs each `X-Request-Id`.
//!
//! Invariants: response bodies that can hold keys go straight into zeroizing buffers; no
//! request or response body is ever logged.

pub mod archive;
pub mod connect;
mod error;
pub mod export;
pub mod rate;

pub use error::{Class, KpsError};

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde::Deserialize;
use zeroize::Zeroizing;

use crate::auth::Auth;
use crate::manifest::{KpsConfig, Settings};
use crate::secret::{SecretBytes, SecretString};

/// Largest batch the API accepts.
pub const MAX_BATCH: usize = 10;
/// The listing page size asked for first: the API documents no maximum.
pub const LARGE_PAGE: usize = 1000;
/// The documented default page size, used once KPS refuses [`LARGE_PAGE`].
pub const DEFAULT_PAGE: usize = 50;
/// The page size in use. Process-wide, because the daemon builds a new client on each
/// manifest reload and KPS's answer does not change with it.
static PAGE_SIZE: AtomicUsize = AtomicUsize::new(LARGE_PAGE);
/// Caps on response bodies: a zip of 10 keys is a few KiB.
const MAX_ZIP_BODY: usize = 4 << 20;
const MAX_JSON_BODY: usize = 1 << 20;
/// A page of a thousand key pairs with their public keys is well under 1 MiB; leave room.
const MAX_LIST_BODY: usize = 4 << 20;

/// How hard to try before giving up on one request.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// First backoff; doubles each time, with full jitter.
    pub base_delay: Duration,
    pub max_delay: Duration,
    /// Stop retrying once this much time has gone by since the first attempt.
    pub budget: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 6,
            base_delay: Duration::from_millis(250),
            max_delay: Duration::from_secs(8),
            budget: Duration::from_secs(60),
        }
    }
}

/// One key pair from the listing.
#[derive(Debug, Clone, Deserialize)]
pub struct KeypairInfo {
    pub name: String,
    #[serde(default)]
    pub public_key: Option<String>,
    #[serde(default)]
    pub fingerprint: Option<String>,
    #[serde(default = "yes")]
    pub is_key_protection: bool,
    /// `"0"` or `0` is normal; anything else is frozen.
    #[serde(default)]
    pub frozen_state: Option<serde_json::Value>,
}

fn yes() -> bool {
    true
}

impl KeypairInfo {
    pub fn is_frozen(&self) -> bool {
        match &self.frozen_state {
            None | Some(serde_json::Value::Null) => false,
            Some(serde_json::Value::String(s)) => s != "0",
            Some(serde_json::Value::Number(n)) => n.as_u64() != Some(0),
            Some(_) => true,
        }
    }
}

/// The KPS listing of the project, by key pair name.
pub type Listing = BTreeMap<String, KeypairInfo>;

impl KeypairInfo {
    /// `SHA256:<unpadded base64>` of the listed public key: hashed from `public_key` (the
    /// blob in its second field), else `fingerprint` when it is already in that form. `None`
    /// when KPS lists neither (an MD5 `fingerprint` alone cannot be compared with it).
    pub fn fingerprint_sha256(&self) -> Option<String> {
        if let Some(line) = &self.public_key
            && let Some(fp) = public_key_fingerprint(line)
        {
            return Some(fp);
        }
        self.fingerprint
            .as_deref()
            .map(str::trim)
            .filter(|f| f.starts_with("SHA256:"))
            .map(|f| f.trim_end_matches('=').to_owned())
    }
}

/// `SHA256:<unpadded base64>` of an OpenSSH public key line's blob (`type base64 [comment]`),
/// as `ssh-keygen -l` prints it.
pub fn public_key_fingerprint(line: &str) -> Option<String> {
    crate::keys::public_key_fingerprints(line)
        .ok()
        .map(|f| f.sha256)
}

/// Percent-encode a query value: only `A-Za-z0-9-_.~` stay bare, as the signer expects.
fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Why the client could not be made: its `ca_file`. Each names the file and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{path}: cannot read ca_file: {source}")]
    CaFileRead {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a PEM certificate bundle: {source}")]
    CaFileNotPem {
        path: std::path::PathBuf,
        source: reqwest::Error,
    },
    #[error(
        "{path}: ca_file holds no PEM certificate (-----BEGIN CERTIFICATE-----); point it at the CA bundle"
    )]
    CaFileEmpty { path: std::path::PathBuf },
}

pub struct KpsClient {
    /// Built on the first request: a pass that calls nothing sets up no HTTP client and no TLS
    /// (loading the system's root certificates alone costs milliseconds and memory).
    http: std::sync::OnceLock<Result<reqwest::Client, reqwest::Error>>,
    /// The root certificates of `ca_file`, read (and checked) up front.
    extra_roots: Vec<reqwest::Certificate>,
    /// Idle connections kept per host: `settings.concurrency`.
    idle_per_host: usize,
    /// `{endpoint}/v3/{project_id}/keypairs`
    base: String,
    auth: Arc<Auth>,
    retry: RetryPolicy,
    /// Every request waits its turn here: slow start, adaptive pacing after a 429,
    /// `Retry-After`, and `settings.max_rps` as a ceiling.
    limiter: rate::Limiter,
}

impl KpsClient {
    pub fn new(
        kps: &KpsConfig,
        settings: &Settings,
        auth: Arc<Auth>,
        retry: RetryPolicy,
    ) -> Result<KpsClient, ClientError> {
        if kps.endpoint.starts_with("http://") {
            tracing::warn!(endpoint = %kps.endpoint, "KPS is reached over plain http: credentials and keys cross the wire unencrypted; use https:// outside tests");
        }
        let mut extra_roots = Vec::new();
        if let Some(ca_file) = &kps.ca_file {
            let pem = std::fs::read(ca_file).map_err(|source| ClientError::CaFileRead {
                path: ca_file.clone(),
                source,
            })?;
            extra_roots = reqwest::Certificate::from_pem_bundle(&pem).map_err(|source| {
                ClientError::CaFileNotPem {
                    path: ca_file.clone(),
                    source,
                }
            })?;
            if extra_roots.is_empty() {
                return Err(ClientError::CaFileEmpty {
                    path: ca_file.clone(),
                });
            }
        }
        Ok(KpsClient {
            http: std::sync::OnceLock::new(),
            extra_roots,
            idle_per_host: settings.concurrency.max(1),
            base: format!("{}/v3/{}/keypairs", kps.endpoint, kps.project_id),
            auth,
            retry,
            limiter: rate::Limiter::new(settings.max_rps),
        })
    }

    pub fn auth(&self) -> &Auth {
        &self.auth
    }

    /// The HTTP client, set up on first use.
    fn http(&self, operation: &'static str) -> Result<&reqwest::Client, KpsError> {
        let built = self.http.get_or_init(|| {
            let mut builder = reqwest::Client::builder()
                .use_rustls_tls()
                .user_agent(concat!("kps-sync/", env!("CARGO_PKG_VERSION")))
                .connect_timeout(Duration::from_secs(10))
                .timeout(Duration::from_secs(60))
                .pool_max_idle_per_host(self.idle_per_host)
                // reqwest keeps custom headers such as X-Auth-Token across a redirect to
                // another host; KPS never redirects, so follow none.
                .redirect(reqwest::redirect::Policy::none());
            for cert in &self.extra_roots {
                builder = builder.add_root_certificate(cert.clone());
            }
            builder.build()
        });
        built.as_ref().map_err(|e| KpsError {
            class: Class::Permanent,
            operation,
            status: None,
            code: Some("tls".into()),
            message: format!("cannot set up the HTTP client: {e}"),
            request_id: None,
        })
    }

    /// `POST .../private-key/batch-export`: the zip for 1 to 10 names.
    pub async fn batch_export(&self, names: &[String]) -> Result<SecretBytes, KpsError> {
        debug_assert!(!names.is_empty() && names.len() <= MAX_BATCH);
        let body: Vec<serde_json::Value> = names
            .iter()
            .map(|n| serde_json::json!({ "keypair": { "name": n } }))
            .collect();
        let body = serde_json::to_vec(&body).expect("serializes");
        self.send(
            "batch export",
            Method::POST,
            "/private-key/batch-export",
            Some(body),
            MAX_ZIP_BODY,
        )
        .await
    }

    /// `POST .../private-key/export`: one key as JSON.
    pub async fn export(&self, name: &str) -> Result<SecretString, KpsError> {
        #[derive(Deserialize)]
        struct Answer {
            keypair: Inner,
        }
        #[derive(Deserialize)]
        struct Inner {
            private_key: Option<String>,
        }
        let body = serde_json::to_vec(&serde_json::json!({ "keypair": { "name": name } }))
            .expect("serializes");
        let bytes = self
            .send(
                "export",
                Method::POST,
                "/private-key/export",
                Some(body),
                MAX_JSON_BODY,
            )
            .await?;
        let answer: Answer = serde_json::from_slice(bytes.expose())
            .map_err(|_| bad_answer("export", "the answer is not the documented JSON"))?;
        match answer.keypair.private_key {
            // Moved, not copied, into the zeroizing holder.
            Some(key) => Ok(SecretString::new(key)),
            None => Err(bad_answer("export", "the answer has no private_key")),
        }
    }

    /// `GET ...?limit=&marker=`, paging until `next_marker` is null. A marker already seen is an
    /// error, never the end: a partial listing would call the keys it misses "not in KPS".
    ///
    /// Pages are asked for [`LARGE_PAGE`] at a time: one call per thousand key pairs. The API
    /// documents no maximum, so a 400 to that size switches this process to the documented
    /// default, [`DEFAULT_PAGE`], with one warning, and the page is asked for again.
    pub async fn list(&self) -> Result<Listing, KpsError> {
        let mut pages = Pages::default();
        let mut marker: Option<String> = None;
        loop {
            let limit = PAGE_SIZE.load(Ordering::Relaxed);
            let query = match &marker {
                Some(m) => format!("?limit={limit}&marker={}", percent_encode(m)),
                None => format!("?limit={limit}"),
            };
            let bytes = match self
                .send("list", Method::GET, &query, None, MAX_LIST_BODY)
                .await
            {
                Err(e) if e.status == Some(400) && limit != DEFAULT_PAGE => {
                    if PAGE_SIZE.swap(DEFAULT_PAGE, Ordering::Relaxed) != DEFAULT_PAGE {
                        tracing::warn!(limit, code = %e.code_label(), request_id = ?e.request_id, "KPS refused the listing page size; using the documented default of {DEFAULT_PAGE} from now on");
                    }
                    continue;
                }
                other => other?,
            };
            match pages.take(bytes.expose())? {
                Some(next) => marker = Some(next),
                None => return Ok(pages.into_listing()),
            }
        }
    }

    /// Send with auth, retries and a capped body. Returns the 2xx body.
    async fn send(
        &self,
        operation: &'static str,
        method: Method,
        suffix: &str,
        body: Option<Vec<u8>>,
        cap: usize,
    ) -> Result<SecretBytes, KpsError> {
        let url = format!("{}{}", self.base, suffix);
        let started = Instant::now();
        let mut attempt = 0u32;
        let mut refreshed = false;
        loop {
            attempt += 1;
            let permit = self.limiter.acquire().await;
            let result = self
                .send_once(operation, &method, &url, body.as_deref(), cap)
                .await;
            count_request(operation, &result);
            let (mut err, retry_after) = match result {
                Ok(bytes) => {
                    permit.success();
                    return Ok(bytes);
                }
                Err(e) => e,
            };
            if err.class == Class::Throttled {
                // The limiter holds every request of this client for Retry-After and slows down.
                permit.throttled(retry_after);
            } else {
                drop(permit);
            }
            if err.class == Class::Unauthorized && !refreshed {
                refreshed = true;
                tracing::info!(operation, request_id = ?err.request_id, "KPS answered 401; reading the credentials again and retrying once");
                self.auth.invalidate().await;
                continue;
            }
            if err.class == Class::Unauthorized {
                err.message = format!(
                    "{} (credentials: {}; KPS at {})",
                    err.message,
                    self.auth.source(),
                    self.base
                );
            }
            if !err.is_retryable() || attempt >= self.retry.max_attempts {
                return Err(err);
            }
            let delay = self.backoff(attempt, err.class, retry_after);
            if started.elapsed() + delay > self.retry.budget {
                return Err(err);
            }
            tracing::warn!(operation, attempt, code = %err.code_label(), request_id = ?err.request_id, delay_ms = delay.as_millis() as u64, "KPS call failed; retrying");
            if err.class != Class::Throttled {
                tokio::time::sleep(delay).await;
            }
        }
    }

    async fn send_once(
        &self,
        operation: &'static str,
        method: &Method,
        url: &str,
        body: Option<&[u8]>,
        cap: usize,
    ) -> Result<SecretBytes, (KpsError, Option<Duration>)> {
        let http = self.http(operation).map_err(|e| (e, None))?;
        let mut builder = http.request(method.clone(), url);
        builder = builder.header(
            reqwest::header::CONTENT_TYPE,
            "application/json;charset=utf-8",
        );
        if let Some(body) = body {
            builder = builder.body(body.to_vec());
        }
        let mut request = builder
            .build()
            .map_err(|e| (KpsError::transport(operation, &e), None))?;
        self.auth.apply(&mut request).await.map_err(|e| {
            (
                KpsError {
                    class: Class::Credentials,
                    operation,
                    status: None,
                    code: Some("auth".into()),
                    message: e.to_string(),
                    request_id: None,
                },
                None,
            )
        })?;
        let mut response = http
            .execute(request)
            .await
            .map_err(|e| (KpsError::transport(operation, &e), None))?;
        let status = response.status();
        let request_id = response
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        tracing::debug!(operation, status = status.as_u16(), request_id = ?request_id, "KPS answered");
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| rate::parse_retry_after(v, std::time::SystemTime::now()));
        let body = read_capped(&mut response, cap).await.map_err(|e| match e {
            ReadError::TooLarge => (
                KpsError {
                    class: Class::Permanent,
                    operation,
                    status: Some(status.as_u16()),
                    code: None,
                    message: format!("the answer is larger than {cap} bytes; refusing it"),
                    request_id: request_id.clone(),
                },
                None,
            ),
            ReadError::Http(e) => (KpsError::transport(operation, &e), None),
        })?;
        if status.is_success() {
            return Ok(body);
        }
        let err = KpsError::from_response(operation, status.as_u16(), body.expose(), request_id);
        let retry_after =
            if status == StatusCode::TOO_MANY_REQUESTS || err.class == Class::Throttled {
                retry_after
            } else {
                None
            };
        Err((err, retry_after))
    }

    fn backoff(&self, attempt: u32, class: Class, retry_after: Option<Duration>) -> Duration {
        if class == Class::Throttled {
            // The limiter already holds the retry for Retry-After (or 1 s) plus jitter; this
            // only counts that wait against the retry budget.
            return retry_after.unwrap_or(Duration::from_secs(1));
        }
        let exp = self
            .retry
            .base_delay
            .saturating_mul(1 << (attempt - 1).min(16))
            .min(self.retry.max_delay);
        // Full jitter, never below a tenth of the step.
        let floor = exp.as_millis() as u64 / 10;
        Duration::from_millis(fastrand::u64(floor..=exp.as_millis() as u64))
    }
}

/// The listing as it is read, page by page: the paging rules without the network, so they are
/// unit-tested and fuzzed (`fuzz/`) on bodies alone.
///
/// Invariant: it asks for a marker at most once, so a server cannot make it page forever; a
/// marker already seen is an error, never the end, since a partial listing would call the keys
/// it misses "not in KPS".
#[doc(hidden)]
#[derive(Debug, Default)]
pub struct Pages {
    all: Listing,
    seen: std::collections::HashSet<String>,
}

impl Pages {
    /// Read one page's body: `Ok(Some(marker))` asks for the page at `marker` next, `Ok(None)`
    /// means the listing is complete. An empty page ends the listing whatever its marker says.
    pub fn take(&mut self, body: &[u8]) -> Result<Option<String>, KpsError> {
        #[derive(Deserialize)]
        struct Page {
            keypairs: Vec<Item>,
            page_info: Option<PageInfo>,
        }
        #[derive(Deserialize)]
        struct Item {
            keypair: KeypairInfo,
        }
        #[derive(Deserialize)]
        struct PageInfo {
            next_marker: Option<String>,
        }
        // The documented answer is an object; serde would also read the page from an array of
        // its fields, which no KPS sends.
        let object = body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
        let page: Page = serde_json::from_slice(body)
            .ok()
            .filter(|_| object)
            .ok_or_else(|| bad_answer("list", "the answer is not the documented JSON"))?;
        let count = page.keypairs.len();
        for item in page.keypairs {
            self.all.insert(item.keypair.name.clone(), item.keypair);
        }
        match page.page_info.and_then(|p| p.next_marker) {
            Some(next) if count > 0 && self.seen.insert(next.clone()) => Ok(Some(next)),
            Some(_) if count > 0 => Err(bad_answer(
                "list",
                "the listing's next_marker points back at a page already read, so the listing \
                 is incomplete",
            )),
            _ => Ok(None),
        }
    }

    /// The key pairs read so far, by name (a name listed twice keeps its last entry).
    pub fn into_listing(self) -> Listing {
        self.all
    }
}

/// Every attempt that reached KPS (or failed on the network) counts; credentials that could not
/// be obtained never left the host, so they do not.
fn count_request(operation: &str, result: &Result<SecretBytes, (KpsError, Option<Duration>)>) {
    let metrics = crate::metrics::global();
    match result {
        Ok(_) => metrics.kps_request(operation, Some(200), None),
        Err((e, _)) if e.class != Class::Credentials => {
            metrics.kps_request(operation, e.status, e.code.as_deref())
        }
        Err(_) => {}
    }
}

fn bad_answer(operation: &'static str, what: &str) -> KpsError {
    KpsError {
        class: Class::Permanent,
        operation,
        status: Some(200),
        code: None,
        message: what.to_owned(),
        request_id: None,
    }
}

enum ReadError {
    TooLarge,
    Http(reqwest::Error),
}

/// Read the body into a zeroizing buffer, refusing more than `cap` bytes. Growth copies into a
/// fresh zeroizing buffer so no stale copy of a key is left in freed memory by us.
async fn read_capped(
    response: &mut reqwest::Response,
    cap: usize,
) -> Result<SecretBytes, ReadError> {
    let hint = response.content_length().unwrap_or(0) as usize;
    if hint > cap {
        return Err(ReadError::TooLarge);
    }
    let mut buf = Zeroizing::new(Vec::with_capacity(hint.max(4096)));
    while let Some(chunk) = response.chunk().await.map_err(ReadError::Http)? {
        if buf.len() + chunk.len() > cap {
            return Err(ReadError::TooLarge);
        }
        if buf.capacity() < buf.len() + chunk.len() {
            let mut bigger = Zeroizing::new(Vec::with_capacity(
                (buf.len() + chunk.len()).max(buf.capacity() * 2),
            ));
            bigger.extend_from_slice(&buf);
            buf = bigger;
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(SecretBytes::new(std::mem::take(&mut *buf)))
}

#[cfg(test)]
mod tests {
    use super::Pages;

    fn page(names: &[&str], next: Option<&str>) -> Vec<u8> {
        let keypairs: Vec<_> = names
            .iter()
            .map(|n| serde_json::json!({ "keypair": { "name": n } }))
            .collect();
        serde_json::to_vec(&serde_json::json!({
            "keypairs": keypairs,
            "page_info": { "next_marker": next },
        }))
        .unwrap()
    }

    #[test]
    fn pages_follow_markers_until_null_and_keep_every_name() {
        let mut pages = Pages::default();
        assert_eq!(
            pages.take(&page(&["a", "b"], Some("b"))).unwrap(),
            Some("b".into())
        );
        assert_eq!(pages.take(&page(&["c"], None)).unwrap(), None);
        let names: Vec<String> = pages.into_listing().into_keys().collect();
        assert_eq!(names, ["a", "b", "c"]);
    }

    #[test]
    fn a_marker_seen_before_is_an_error_and_an_empty_page_the_end() {
        let mut pages = Pages::default();
        assert!(pages.take(&page(&["a"], Some("x"))).unwrap().is_some());
        let err = pages.take(&page(&["b"], Some("x"))).unwrap_err();
        assert!(err.message.contains("already read"), "{err}");
        assert_eq!(Pages::default().take(&page(&[], Some("y"))).unwrap(), None);
        assert!(Pages::default().take(b"<html>").is_err());
        // serde_json reads a struct from an array of its fields; the listing does not.
        let array = br#"[[{"keypair": {"name": "a"}}], {"next_marker": null}]"#;
        assert!(Pages::default().take(array).is_err());
    }
}
