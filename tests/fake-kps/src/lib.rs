//! A faithful HTTP fake of Huawei Cloud KPS, IAM and the ECS metadata service, for kps-sync's
//! integration tests, examples and benchmarks.
//!
//! [`FakeKps::start`] binds `127.0.0.1:0` and serves on a thread of its own with its own tokio
//! runtime, so synchronous tests can drive a real subprocess against it; dropping the
//! [`FakeKps`] stops it. Every knob can be turned while the server runs. What it speaks is
//! `shared/kps-api.md`; where the real service is undocumented, the choices are listed in this
//! crate's README.

#![forbid(unsafe_code)]

mod server;
pub mod sign;
mod sshkey;
mod zip;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

/// The project every KPS path must name.
pub const PROJECT_ID: &str = "0123456789abcdef0123456789abcdef";
/// A token accepted by default, never expiring.
pub const TOKEN: &str = "fake-token-MIIfakeKpsToken0123456789abcdef";
/// An access key accepted by default (the kps-api.md vectors' key).
pub const AK: &str = "AKTESTEXAMPLE0000000";
/// The secret key of [`AK`].
pub const SK: &str = "SKtestexample0000000000000000000000000000";
/// An IAM user accepted by default: domain, user name and password.
pub const IAM_DOMAIN: &str = "fake-domain";
/// See [`IAM_DOMAIN`].
pub const IAM_USER: &str = "fake-user";
/// See [`IAM_DOMAIN`].
pub const IAM_PASSWORD: &str = "fake-password";

/// The inner layout of the batch-export zip, which the real API does not document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Layout {
    /// `name.pem`
    #[default]
    Pem,
    /// `name`
    Bare,
    /// `keypairs/name.pem`
    Folder,
    /// `name.txt`
    Txt,
}

impl Layout {
    /// The entry name this layout gives key pair `name`.
    pub fn entry_name(self, name: &str) -> String {
        match self {
            Layout::Pem => format!("{name}.pem"),
            Layout::Bare => name.to_string(),
            Layout::Folder => format!("keypairs/{name}.pem"),
            Layout::Txt => format!("{name}.txt"),
        }
    }
}

/// A hostile batch-export answer. Unless said otherwise, the first requested key's entry is
/// the hostile one and the other keys' entries are normal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hostile {
    /// `../name.pem`
    Traversal,
    /// `/etc/name.pem`
    Absolute,
    /// A second entry with the same name and a different key.
    Duplicate,
    /// A deflate entry expanding to over 1 GiB (1100 MiB of zeros) from about 1 MiB, while
    /// both headers claim 4096 bytes.
    Bomb,
    /// A Unix symlink entry (mode `0o120777`) pointing at `/etc/shadow`.
    Symlink,
    /// An entry with the encryption flag (bit 0) set.
    Encrypted,
    /// An extra entry, `not-requested` (+ layout), matching no requested name.
    Unmatched,
    /// The normal entries padded with tiny `filler-NNNNN.txt` entries to 10 000 in all.
    TooMany,
    /// The last requested name has no entry.
    MissingName,
    /// A 200 whose body is HTML, not a zip (still labelled `application/zip`).
    NotZip,
}

/// The shape of KPS error bodies. The official SDK reads all three; the real service is
/// documented to use the first, and gateways in front of it the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ErrorForm {
    /// `{"error_code":"KPS.6004","error_msg":"..."}`
    #[default]
    ErrorCode,
    /// `{"code":"KPS.6004","message":"..."}`
    CodeMessage,
    /// `{"error":{"code":"KPS.6004","message":"..."}}`
    Nested,
}

/// Undocumented details of the batch zip, the key text and the listing, each a switch of its
/// own (all off by default). See the crate README.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Variations {
    /// Each key's public key line as an extra entry, named as the layout names the key but
    /// with `.pub` (`name.pem` -> `name.pub`, `name` -> `name.pub`).
    pub pub_entries: bool,
    /// A `README.txt` entry of plain text, before the keys.
    pub stray_entry: bool,
    /// Entries named `key-0001.pem`, `key-0002.pem`, ... in reverse request order: nothing in
    /// a name tells which key pair it is.
    pub opaque_names: bool,
    /// Key text with CRLF line ends (batch and single export).
    pub crlf: bool,
    /// Key text that starts with a UTF-8 byte order mark (batch and single export).
    pub bom: bool,
    /// The listing's `fingerprint` in MD5 colon-hex form (`aa:bb:...`), not `SHA256:`.
    pub md5_fingerprints: bool,
    /// The listing carries no `public_key` (only the fingerprint).
    pub no_listed_public_key: bool,
}

impl Variations {
    /// The key text as this variation serves it.
    pub(crate) fn text(&self, text: &str) -> String {
        let mut out = if self.crlf {
            text.replace("\r\n", "\n").replace('\n', "\r\n")
        } else {
            text.to_string()
        };
        if self.bom {
            out.insert(0, '\u{feff}');
        }
        out
    }
}

/// Key types and file formats the fake can serve besides its own Ed25519 keys; generated by
/// `ssh-keygen`, which must be installed (openssh-client).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyType {
    /// `ssh-keygen -t ed25519`: OpenSSH format.
    Ed25519,
    /// `ssh-keygen -t ecdsa -b 256`: OpenSSH format.
    EcdsaP256,
    /// `ssh-keygen -t ecdsa -b 384`: OpenSSH format.
    EcdsaP384,
    /// `ssh-keygen -t rsa -b 2048`: OpenSSH format.
    RsaOpenSsh,
    /// `ssh-keygen -t rsa -b 2048 -m PEM`: `-----BEGIN RSA PRIVATE KEY-----` (PKCS#1).
    RsaPkcs1,
    /// `ssh-keygen -t rsa -b 2048 -m PKCS8`: `-----BEGIN PRIVATE KEY-----`.
    RsaPkcs8,
    /// `ssh-keygen -t ecdsa -m PKCS8`: `-----BEGIN PRIVATE KEY-----`.
    EcdsaPkcs8,
    /// `ssh-keygen -t ecdsa -m PEM`: `-----BEGIN EC PRIVATE KEY-----` (SEC1).
    EcdsaSec1,
}

/// How a KPS request authenticated, as recorded in [`Stats::auth_methods_seen`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AuthMethod {
    /// `X-Auth-Token`
    Token,
    /// `SDK-HMAC-SHA256` with a permanent AK/SK.
    AkSk,
    /// `SDK-HMAC-SHA256` with temporary keys and their `X-Security-Token`.
    AkSkSecurityToken,
}

/// Counters since start or the last [`FakeKps::reset_stats`]. Call counters count every request
/// that reached that route, whatever it was answered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub batch_export_calls: u64,
    pub single_export_calls: u64,
    pub list_calls: u64,
    pub detail_calls: u64,
    pub iam_token_calls: u64,
    pub metadata_token_calls: u64,
    pub securitykey_calls: u64,
    /// 401 answers on any route.
    pub unauthorized: u64,
    /// 429 answers.
    pub throttled: u64,
    /// 5xx answers.
    pub server_errors: u64,
    /// The most KPS requests being handled at once.
    pub max_in_flight: u64,
    /// Names delivered by successful exports: entries in 200 batch zips plus 200 single exports.
    pub names_exported: u64,
    /// Methods that passed authentication on KPS calls.
    pub auth_methods_seen: BTreeSet<AuthMethod>,
}

/// An access key the signature check accepts.
#[derive(Clone)]
pub(crate) struct AccessKey {
    pub secret: String,
    /// Temporary keys only: the `X-Security-Token` they must come with, and their end.
    pub temporary: Option<(String, SystemTime)>,
}

/// Everything the knobs change and the handlers read; behind one mutex, never held across
/// an `.await`.
pub(crate) struct State {
    pub keys: BTreeMap<String, sshkey::KeyPair>,
    pub layout: Layout,
    pub latency: Duration,
    pub error_rate: f64,
    /// Seeded so a given error rate fails the same calls run after run.
    pub rng: fastrand::Rng,
    /// Statuses the next KPS calls answer with, in order.
    pub fail_next: VecDeque<u16>,
    pub rate_limit: Option<u32>,
    /// When the calls admitted in the last second arrived (sliding window).
    pub admitted: VecDeque<Instant>,
    pub hostile: Option<Hostile>,
    pub omit_from_zip: Option<String>,
    /// Key pairs listed as frozen; their export fails.
    pub frozen: BTreeSet<String>,
    /// Largest `limit` the listing accepts (400 above it); `None`: up to 1000.
    pub max_page: Option<usize>,
    /// The listing answers 403, as for credentials without the list permission.
    pub list_forbidden: bool,
    /// The listing ignores `marker` and answers the first page again (a paging bug).
    pub list_ignores_marker: bool,
    pub error_form: ErrorForm,
    pub variations: Variations,
    /// Accepted tokens and when they stop being accepted (`None`: never).
    pub tokens: HashMap<String, Option<SystemTime>>,
    pub access_keys: HashMap<String, AccessKey>,
    /// (domain, user) -> password.
    pub iam_users: HashMap<(String, String), String>,
    pub iam_token_lifetime: Duration,
    pub metadata_credential_lifetime: Duration,
    /// Metadata session tokens and their end.
    pub metadata_sessions: HashMap<String, SystemTime>,
    pub clock_skew_check: bool,
    pub stats: Stats,
    pub in_flight: u64,
}

impl State {
    fn new() -> State {
        let mut s = State {
            keys: BTreeMap::new(),
            layout: Layout::Pem,
            latency: Duration::ZERO,
            error_rate: 0.0,
            rng: fastrand::Rng::with_seed(0x6b70_735f_6661_6b65),
            fail_next: VecDeque::new(),
            rate_limit: None,
            admitted: VecDeque::new(),
            hostile: None,
            omit_from_zip: None,
            frozen: BTreeSet::new(),
            max_page: None,
            list_forbidden: false,
            list_ignores_marker: false,
            error_form: ErrorForm::ErrorCode,
            variations: Variations::default(),
            tokens: HashMap::new(),
            access_keys: HashMap::new(),
            iam_users: HashMap::new(),
            iam_token_lifetime: Duration::from_secs(24 * 3600),
            metadata_credential_lifetime: Duration::from_secs(3600),
            metadata_sessions: HashMap::new(),
            clock_skew_check: true,
            stats: Stats::default(),
            in_flight: 0,
        };
        s.tokens.insert(TOKEN.to_string(), None);
        s.access_keys.insert(
            AK.to_string(),
            AccessKey {
                secret: SK.to_string(),
                temporary: None,
            },
        );
        s.iam_users.insert(
            (IAM_DOMAIN.to_string(), IAM_USER.to_string()),
            IAM_PASSWORD.to_string(),
        );
        s
    }
}

pub(crate) type Shared = Arc<Mutex<State>>;

pub(crate) fn lock(shared: &Shared) -> MutexGuard<'_, State> {
    // A panicking handler must not wedge every later test assertion.
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

/// The running fake. Dropping it stops the server and joins its thread.
pub struct FakeKps {
    addr: SocketAddr,
    state: Shared,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for FakeKps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeKps")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl FakeKps {
    /// Starts on `127.0.0.1:0`. Panics if it cannot bind (a test cannot go on anyway).
    pub fn start() -> FakeKps {
        FakeKps::start_on(0).expect("fake KPS: binding 127.0.0.1:0")
    }

    /// Starts on `127.0.0.1:port` (0 picks a free port).
    pub fn start_on(port: u16) -> std::io::Result<FakeKps> {
        let listener = TcpListener::bind(("127.0.0.1", port))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let state: Shared = Arc::new(Mutex::new(State::new()));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("fake-kps")
            .enable_all()
            .build()?;
        let served = state.clone();
        let thread = std::thread::Builder::new()
            .name("fake-kps".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener)
                        .expect("fake KPS: registering the listener");
                    tokio::select! {
                        r = axum::serve(listener, server::router(served)) => {
                            if let Err(e) = r { eprintln!("fake KPS stopped: {e}"); }
                        }
                        _ = rx => {}
                    }
                });
                // In-flight handlers (a long latency, say) are dropped, not awaited.
                runtime.shutdown_timeout(Duration::from_millis(200));
            })?;
        Ok(FakeKps {
            addr,
            state,
            shutdown: Some(tx),
            thread: Some(thread),
        })
    }

    /// `http://127.0.0.1:PORT`: KPS, IAM and metadata are all served here.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Adds (or replaces) a hosted key pair with a fresh ed25519 key; returns its private key text.
    pub fn add_key(&self, name: &str) -> String {
        let kp = sshkey::KeyPair::generate(name);
        let text = kp.private_key.clone().expect("generated keys are hosted");
        self.state().keys.insert(name.to_string(), kp);
        text
    }

    /// Adds (or replaces) a hosted key pair whose export returns exactly `private_key`.
    pub fn add_key_pem(&self, name: &str, private_key: &str) {
        let kp = sshkey::KeyPair::from_text(private_key);
        self.state().keys.insert(name.to_string(), kp);
    }

    /// Adds (or replaces) a hosted key pair of `key_type`, made by `ssh-keygen`; returns its
    /// private key text. Panics if ssh-keygen is missing or fails.
    pub fn add_key_of(&self, name: &str, key_type: KeyType) -> String {
        let kp = sshkey::KeyPair::generate_with_ssh_keygen(key_type, name);
        let text = kp.private_key.clone().expect("generated keys are hosted");
        self.state().keys.insert(name.to_string(), kp);
        text
    }

    /// Adds (or replaces) a hosted key pair whose export returns exactly `private_key` and
    /// whose listing shows `public_key` (an OpenSSH line), matching or not.
    pub fn add_key_with_public(&self, name: &str, private_key: &str, public_key: &str) {
        let kp = sshkey::KeyPair::with_public(private_key, public_key);
        self.state().keys.insert(name.to_string(), kp);
    }

    /// Turns the variations of the zip, the key text and the listing on or off.
    pub fn set_variations(&self, v: Variations) {
        self.state().variations = v;
    }

    /// Adds a key pair whose private key KPS does not hold: exports fail with KPS.6005.
    pub fn add_unhosted_key(&self, name: &str) {
        let kp = sshkey::KeyPair::unhosted(name);
        self.state().keys.insert(name.to_string(), kp);
    }

    /// Re-creates key pair `name` with fresh material (a rotation), keeping whether KPS hosts
    /// it; returns the new private key text (`None` for an unhosted key).
    pub fn rotate_key(&self, name: &str) -> Option<String> {
        let mut s = self.state();
        let hosted = s.keys.get(name).is_none_or(|k| k.private_key.is_some());
        let kp = if hosted {
            sshkey::KeyPair::generate(name)
        } else {
            sshkey::KeyPair::unhosted(name)
        };
        let text = kp.private_key.clone();
        s.keys.insert(name.to_string(), kp);
        text
    }

    /// Lists `name` with `frozen_state` `"1"` (or `"0"` again); a frozen key's export fails
    /// 400 `KPS.6007`, a code of the fake's choosing (the real one is not documented).
    pub fn set_frozen(&self, name: &str, frozen: bool) {
        let mut s = self.state();
        if frozen {
            s.frozen.insert(name.to_string());
        } else {
            s.frozen.remove(name);
        }
    }

    /// The largest `limit` the listing accepts; above it, 400 `KPS.0002`. `None`: 1000.
    pub fn set_max_page(&self, max: Option<usize>) {
        self.state().max_page = max;
    }

    /// Whether the listing answers 403 `KPS.9003`, as for credentials that may export but not
    /// list.
    pub fn set_list_forbidden(&self, on: bool) {
        self.state().list_forbidden = on;
    }

    /// Whether the listing ignores `marker`, answering the first page (and its `next_marker`)
    /// again and again.
    pub fn set_list_ignores_marker(&self, on: bool) {
        self.state().list_ignores_marker = on;
    }

    /// The shape of every KPS error body from now on.
    pub fn set_error_form(&self, form: ErrorForm) {
        self.state().error_form = form;
    }

    pub fn remove_key(&self, name: &str) {
        self.state().keys.remove(name);
    }

    /// The text an export of `name` returns, if the key exists and is hosted.
    pub fn private_key(&self, name: &str) -> Option<String> {
        self.state()
            .keys
            .get(name)
            .and_then(|k| k.private_key.clone())
    }

    /// The listing's `public_key` for `name` (`ssh-ed25519 AAAA...`).
    pub fn public_key(&self, name: &str) -> Option<String> {
        self.state().keys.get(name).map(|k| k.public_key_line())
    }

    pub fn set_layout(&self, layout: Layout) {
        self.state().layout = layout;
    }

    /// Added (as an async sleep) to every KPS call before it is answered.
    pub fn set_latency(&self, d: Duration) {
        self.state().latency = d;
    }

    /// That fraction (0.0..=1.0) of KPS calls answer 500 KPS.0004; the RNG is seeded.
    pub fn set_error_rate(&self, fraction: f64) {
        self.state().error_rate = fraction.clamp(0.0, 1.0);
    }

    /// The next `n` KPS calls (after authentication) answer `status`, added after any
    /// failures already queued.
    pub fn fail_next(&self, n: usize, status: u16) {
        self.state()
            .fail_next
            .extend(std::iter::repeat_n(status, n));
    }

    /// At most `per_second` KPS calls admitted in any one-second window; beyond: 429.
    pub fn set_rate_limit(&self, per_second: Option<u32>) {
        let mut s = self.state();
        s.rate_limit = per_second;
        s.admitted.clear();
    }

    pub fn set_hostile(&self, h: Option<Hostile>) {
        self.state().hostile = h;
    }

    /// Batch zips silently lack this name; single export still returns it.
    pub fn set_omit_from_zip(&self, name: Option<String>) {
        self.state().omit_from_zip = name;
    }

    /// Accepts `token` for `valid_for` from now (`None`: forever), replacing any earlier entry.
    pub fn set_token_valid(&self, token: &str, valid_for: Option<Duration>) {
        let until = valid_for.map(|d| SystemTime::now() + d);
        self.state().tokens.insert(token.to_string(), until);
    }

    pub fn revoke_token(&self, token: &str) {
        self.state().tokens.remove(token);
    }

    /// Accepts a permanent access key.
    pub fn add_aksk(&self, ak: &str, sk: &str) {
        self.state().access_keys.insert(
            ak.to_string(),
            AccessKey {
                secret: sk.to_string(),
                temporary: None,
            },
        );
    }

    /// Stops accepting an access key (permanent or temporary).
    pub fn remove_aksk(&self, ak: &str) {
        self.state().access_keys.remove(ak);
    }

    pub fn add_iam_user(&self, domain: &str, user: &str, password: &str) {
        self.state()
            .iam_users
            .insert((domain.to_string(), user.to_string()), password.to_string());
    }

    /// Lifetime of tokens IAM issues from now on (default 24 h).
    pub fn set_iam_token_lifetime(&self, d: Duration) {
        self.state().iam_token_lifetime = d;
    }

    /// Lifetime of temporary keys the metadata service hands out from now on (default 1 h).
    pub fn set_metadata_credential_lifetime(&self, d: Duration) {
        self.state().metadata_credential_lifetime = d;
    }

    /// Whether an `X-Sdk-Date` more than 15 minutes off is refused (default on).
    pub fn set_clock_skew_check(&self, on: bool) {
        self.state().clock_skew_check = on;
    }

    pub fn stats(&self) -> Stats {
        self.state().stats.clone()
    }

    pub fn reset_stats(&self) {
        let mut s = self.state();
        s.stats = Stats::default();
        // Requests still running count toward the new maximum.
        s.stats.max_in_flight = s.in_flight;
    }
}

impl Drop for FakeKps {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
