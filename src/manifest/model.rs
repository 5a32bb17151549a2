//! The validated manifest: what every later step reads. Built only by `manifest::load`, so
//! nothing downstream re-checks input: paths are absolute, owners are looked up, recipients are
//! parsed, modes are within the allowed set.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// A loaded, validated manifest.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// The manifest file, absolute; errors and `status` name it.
    pub path: PathBuf,
    pub kps: KpsConfig,
    pub settings: Settings,
    /// Every managed key, sorted by name so plans and output are stable.
    pub keys: Vec<KeySpec>,
}

/// Where KPS is and how to authenticate to it.
#[derive(Debug, Clone)]
pub struct KpsConfig {
    /// `region` as written, if any (the IAM endpoint default derives from it).
    pub region: Option<String>,
    /// Base URL without a trailing slash: `https://kms.{region}.myhuaweicloud.com` or `endpoint`.
    pub endpoint: String,
    /// 32 hex characters; part of every KPS path.
    pub project_id: String,
    pub auth: AuthConfig,
    /// Extra CA certificates (PEM) trusted besides the system roots.
    pub ca_file: Option<PathBuf>,
}

/// The one auth method the manifest names. Paths are absolute (resolved against the manifest's
/// folder; `$CREDENTIALS_DIRECTORY` expanded). Secrets are never in the manifest itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthConfig {
    /// The manifest names no method: the environment and the SDK credentials file decide.
    Unspecified,
    /// `X-Auth-Token` read from this file on every pass.
    TokenFile(PathBuf),
    /// AK/SK signing with keys read from files.
    AkSk {
        access_key_file: PathBuf,
        secret_key_file: PathBuf,
        security_token_file: Option<PathBuf>,
    },
    /// IAM password -> token.
    Iam {
        user: String,
        domain: String,
        password_file: PathBuf,
        /// `https://iam.{region}.myhuaweicloud.com` when not given.
        endpoint: Option<String>,
    },
    /// Temporary AK/SK from the ECS metadata service (an agency).
    EcsMetadata {
        /// `http://169.254.169.254` when not given.
        endpoint: Option<String>,
    },
}

/// How the daemon notices changes to the manifest and destinations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchMode {
    Inotify,
    Poll,
}

/// `settings:`; every field has a default.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Holds `state.json` and the lock. Default `/var/lib/kps-sync`.
    pub state_dir: PathBuf,
    /// Daemon: full check this often. Default 5m.
    pub interval: Duration,
    /// Daemon: quiet time after a manifest change. Default 250ms.
    pub debounce: Duration,
    /// Batch-export calls in flight. Default 4, 1..=64.
    pub concurrency: usize,
    /// Delete files of keys removed from the manifest. Default false.
    pub prune: bool,
    /// Longest an `on_change` hook may run. Default 30s.
    pub hook_timeout: Duration,
    /// List KPS before an export and check each exported key against it (names exist, are
    /// hosted, not frozen; the private key matches the listed public key). Default true.
    pub verify_remote: bool,
    /// A pass with nothing to export still lists KPS (to see rotations) once the last
    /// successful listing is this old. Default 1h; zero lists on every pass.
    pub rotation_check: Duration,
    /// Default inotify.
    pub watch: WatchMode,
    /// Cap on KPS requests per second, if any.
    pub max_rps: Option<f64>,
    /// Prometheus text file written after every pass, if any.
    pub metrics_file: Option<PathBuf>,
    /// Serve `/metrics` here, if any: a loopback address unless `allow_remote_metrics`.
    pub metrics_listen: Option<SocketAddr>,
    /// More variables passed from kps-sync's environment to hooks, besides `hooks::PASSED`;
    /// never a credential (the loader refuses one).
    pub hook_env: Vec<String>,
}

/// One managed key: a KPS key pair name and the file it must be.
#[derive(Debug, Clone)]
pub struct KeySpec {
    /// KPS key pair name, `[A-Za-z0-9_-]{1,255}`.
    pub name: String,
    /// Destination, absolute.
    pub path: PathBuf,
    /// Permission bits, never granting anything to other, write to group or execute.
    pub mode: u32,
    /// Owner to chown to; `None` leaves the writer's own uid.
    pub owner: Option<Principal>,
    /// Group to chown to; `None` leaves the writer's own gid.
    pub group: Option<Principal>,
    /// Write age ciphertext instead of the key.
    pub encryption: Option<Encryption>,
    /// argv run once after the file changed; empty for none.
    pub on_change: Vec<String>,
    /// Also write the key's public half here (`public_key: true` gives `PATH.pub`), mode
    /// 0644, same owner and group.
    pub public_key: Option<PathBuf>,
    /// Where the key is declared in the manifest, for error messages.
    pub line: usize,
}

/// A user or group as written and as resolved on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub name: String,
    pub id: u32,
}

/// age encryption of one key.
#[derive(Clone)]
pub struct Encryption {
    /// Parsed recipients, in declared order.
    pub recipients: Vec<Recipient>,
    /// ASCII armor instead of binary age.
    pub armor: bool,
}

pub use super::recipient::{ParsedRecipient, Recipient, RecipientError};

impl std::fmt::Debug for Encryption {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let texts: Vec<&str> = self.recipients.iter().map(|r| r.text.as_str()).collect();
        f.debug_struct("Encryption")
            .field("recipients", &texts)
            .field("armor", &self.armor)
            .finish()
    }
}

impl Encryption {
    /// A stable fingerprint of what the ciphertext is for: the sorted recipients and the armor
    /// flag. The state file keeps it so that a change of recipients triggers `re-encrypt`.
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut texts: Vec<&str> = self.recipients.iter().map(|r| r.text.trim()).collect();
        texts.sort_unstable();
        texts.dedup();
        let mut hasher = Sha256::new();
        for text in texts {
            hasher.update(text.as_bytes());
            hasher.update(b"\n");
        }
        hasher.update(if self.armor { "armor" } else { "binary" }.as_bytes());
        format!("sha256:{}", hex::encode(hasher.finalize()))
    }
}

impl KeySpec {
    /// The recipients' fingerprint, or `None` for a plain key.
    pub fn recipients_fingerprint(&self) -> Option<String> {
        self.encryption.as_ref().map(Encryption::fingerprint)
    }
}
