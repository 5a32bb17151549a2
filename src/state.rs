//! The state file (`state_dir/state.json`) and the lock beside it.
//!
//! The state is how kps-sync knows a file is its own: for every file it wrote it records the key,
//! the path, the SHA-256 of the bytes, when, and the recipients' fingerprint, never the key.
//! A file at a managed path that is not recorded here was not written by kps-sync and is kept.
//! It is written 0600 through the one atomic writer. The lock (`flock` on `state_dir/lock`)
//! keeps two processes from reconciling the same state at once.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};

use crate::observe::{self, Observed};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub mod journal;

use crate::meta::FileMeta;
use crate::write::{self, Prior, WriteError};

pub const STATE_FILE: &str = "state.json";
pub const LOCK_FILE: &str = "lock";

/// Everything kps-sync remembers between passes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub version: u32,
    /// What kps-sync wrote, by key name.
    #[serde(default)]
    pub files: BTreeMap<String, FileRecord>,
    /// The last failure per key, cleared when the key is next in place.
    #[serde(default)]
    pub errors: BTreeMap<String, ErrorRecord>,
    /// When the last pass ended and how it went, for `status`.
    #[serde(default)]
    pub last_pass: Option<PassRecord>,
    /// RFC 3339 UTC of the last successful KPS listing: a pass with nothing to export lists
    /// again (to see rotations) only once this is older than `settings.rotation_check`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_listing: Option<String>,
}

/// One file kps-sync wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    pub path: PathBuf,
    /// `sha256:<hex>` of the bytes written (ciphertext when encrypted).
    pub sha256: String,
    /// RFC 3339, UTC.
    pub written_at: String,
    /// `Encryption::fingerprint` of the recipients, `None` for a plain key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipients: Option<String>,
    /// `SHA256:<base64>` of the key's public half (never the key): a listing that shows
    /// another public key for the name means the key pair was re-created in KPS (rotation).
    /// `None` in records of older versions, or when the key's type could not be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// The public key file written (or adopted) beside the key (`public_key:`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<PublicRecord>,
}

/// A public key file kps-sync wrote or adopted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublicRecord {
    pub path: PathBuf,
    /// `sha256:<hex>` of its bytes.
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorRecord {
    pub at: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PassRecord {
    pub at: String,
    pub managed: usize,
    pub in_place: usize,
    pub failed: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: cannot read the state file: {source}; check state_dir's permissions")]
    Read { path: PathBuf, source: io::Error },
    #[error(
        "{path}: the state file is corrupt ({source}); move it aside: kps-sync will then treat existing files as not its own and keep them, so remove those you want rewritten"
    )]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("cannot write the state file: {0}")]
    Write(#[from] WriteError),
    #[error("{path}: cannot open the lock file: {source}; check state_dir's permissions")]
    LockOpen { path: PathBuf, source: io::Error },
    #[error(
        "{path}: another kps-sync holds the lock (a daemon or a reconcile on the same state_dir); waited {waited:?}. Let it finish, or stop the daemon first"
    )]
    Locked { path: PathBuf, waited: Duration },
}

impl State {
    pub fn new() -> Self {
        State {
            version: 1,
            ..State::default()
        }
    }

    /// Load `state_dir/state.json`; a missing file is an empty state.
    pub fn load(state_dir: &Path) -> Result<State, StateError> {
        let path = state_dir.join(STATE_FILE);
        // Read it the way the writer writes it: never through a symlink.
        let mut file = match observe::open_regular(&path) {
            Ok((file, _)) => file,
            Err(Observed::Missing) => return Ok(State::new()),
            Err(found) => {
                let why = match found {
                    Observed::Unreadable(why) => why,
                    _ => "not a regular file (a symlink?); the state lives only in a regular file"
                        .into(),
                };
                return Err(StateError::Read {
                    path,
                    source: io::Error::other(why),
                });
            }
        };
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(|source| StateError::Read {
                path: path.clone(),
                source,
            })?;
        serde_json::from_slice(&bytes).map_err(|source| StateError::Corrupt { path, source })
    }

    /// Drop the record of `key` if it is still the one for `path` (a key moved to a new path
    /// may already have a newer record).
    pub fn forget(&mut self, key: &str, path: &Path) {
        if self.files.get(key).is_some_and(|r| r.path == path) {
            self.files.remove(key);
        }
    }

    /// Save atomically, mode 0600, creating `state_dir` 0700 if needed.
    pub fn save(&self, state_dir: &Path) -> Result<(), StateError> {
        let bytes = serde_json::to_vec_pretty(self).expect("state serializes");
        write::write_atomic(
            &state_dir.join(STATE_FILE),
            &bytes,
            FileMeta::PRIVATE,
            Prior::Anything,
        )?;
        Ok(())
    }
}

/// Held while a pass (or the daemon) runs; dropping it releases the lock.
#[derive(Debug)]
pub struct Lock {
    _file: File,
}

/// Take the lock on `state_dir`, waiting up to `wait` for another holder to finish.
pub fn lock(state_dir: &Path, wait: Duration) -> Result<Lock, StateError> {
    write::create_dirs(state_dir)?;
    let path = state_dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(&path)
        .map_err(|source| StateError::LockOpen {
            path: path.clone(),
            source,
        })?;
    let start = Instant::now();
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(Lock { _file: file }),
            Err(std::fs::TryLockError::WouldBlock) if start.elapsed() < wait => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StateError::Locked { path, waited: wait });
            }
            Err(std::fs::TryLockError::Error(source)) => {
                return Err(StateError::LockOpen { path, source });
            }
        }
    }
}

impl State {
    /// Whether a pass with nothing to export must list KPS to look for rotations: never
    /// listed, listed at least `every` ago, or a recorded time that cannot be read or lies in
    /// the future (a clock that jumped back must not silence the check).
    pub fn listing_due(&self, every: Duration, now: std::time::SystemTime) -> bool {
        let Some(at) = self
            .last_listing
            .as_deref()
            .and_then(|t| humantime::parse_rfc3339(t).ok())
        else {
            return true;
        };
        match now.duration_since(at) {
            Ok(age) => age >= every,
            Err(_) => true,
        }
    }
}

/// Now as RFC 3339 UTC with seconds precision.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn round_trips_and_is_private() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state");
        assert_eq!(State::load(&dir).unwrap(), State::new());
        let mut state = State::new();
        state.files.insert(
            "web".into(),
            FileRecord {
                path: "/etc/k".into(),
                sha256: "sha256:00".into(),
                written_at: now_rfc3339(),
                recipients: None,
                fingerprint: Some("SHA256:abc".into()),
                public_key: Some(PublicRecord {
                    path: "/etc/k.pub".into(),
                    sha256: "sha256:01".into(),
                }),
            },
        );
        state.last_listing = Some(now_rfc3339());
        state.save(&dir).unwrap();
        assert_eq!(State::load(&dir).unwrap(), state);
        let meta = std::fs::metadata(dir.join(STATE_FILE)).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
    }

    #[test]
    fn listing_is_due_when_never_done_old_or_in_the_future() {
        let now = std::time::SystemTime::now();
        let mut state = State::new();
        assert!(state.listing_due(Duration::from_secs(3600), now));
        state.last_listing = Some(now_rfc3339());
        assert!(!state.listing_due(Duration::from_secs(3600), now));
        assert!(state.listing_due(Duration::ZERO, now));
        assert!(state.listing_due(Duration::from_secs(3600), now + Duration::from_secs(3601)));
        assert!(state.listing_due(Duration::from_secs(3600), now - Duration::from_secs(60)));
        state.last_listing = Some("yesterday".into());
        assert!(state.listing_due(Duration::from_secs(3600), now));
    }

    #[test]
    fn corrupt_state_is_an_error_naming_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join(STATE_FILE), b"{not json").unwrap();
        let err = State::load(tmp.path()).unwrap_err().to_string();
        assert!(
            err.contains("state.json") && err.contains("move it aside"),
            "{err}"
        );
    }

    #[test]
    fn second_lock_waits_then_fails() {
        let tmp = tempfile::tempdir().unwrap();
        let held = lock(tmp.path(), Duration::ZERO).unwrap();
        let err = lock(tmp.path(), Duration::from_millis(120)).unwrap_err();
        assert!(matches!(err, StateError::Locked { .. }), "{err}");
        drop(held);
        lock(tmp.path(), Duration::ZERO).unwrap();
    }
}
