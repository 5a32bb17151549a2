//! The state file (`state_dir/state.json`) and the lock beside it.
//!
//! The state is how kps-sync knows a file is its own: for every file it wrote it records the key,
//! the path, the SHA-256 of the bytes, when, and the recipients' fingerprint, never the key.
//! A file at a managed path that is not recorded here was not written by kps-sync and is kept.
//! It is written 0600 through the one atomic writer. The lock (`flock` on `state_dir/lock`)
//! keeps two processes from reconciling the same state at once.
//!
//! Each record also keeps the `stat` of its file from when the file last hashed to the record
//! (see `observe`): a later pass that finds the same stat trusts the hash without reading the
//! file. A record without one (just written, adopted, folded from the journal, or from an
//! older version) is read on the next pass, which then records it.
//!
//! The state is saved only when it changed ([`State::end_pass`]): a pass that changes nothing
//! writes and fsyncs nothing. "Changed" is judged on the state's value, not its bytes: a
//! 64-bit hash of every field, taken when it was loaded or saved, against one taken at the end
//! of the pass (a walk over the records; no serialization, no SHA-256 of megabytes). The time of such a pass is kept as the lock file's mtime (one
//! `utimensat`, no data, no fsync), and `status` shows the later of the two.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::hash::{Hash, Hasher};
use std::io::{self, Read};

use crate::observe::{self, Fresh, Known, Observed, ObservedFiles, Stat};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub mod journal;

use crate::output::meta::FileMeta;
use crate::output::write::{self, Prior, WriteError};

pub const STATE_FILE: &str = "state.json";
pub const LOCK_FILE: &str = "lock";

/// Everything kps-sync remembers between passes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// What this state was when last loaded or saved.
    #[serde(skip)]
    baseline: Baseline,
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
    /// The file's stat when it last hashed to `sha256` (see the module doc).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stat: Option<Stat>,
}

/// A public key file kps-sync wrote or adopted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublicRecord {
    pub path: PathBuf,
    /// `sha256:<hex>` of its bytes.
    pub sha256: String,
    /// The file's stat when it last hashed to `sha256`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stat: Option<Stat>,
}

/// What the state was when loaded or last saved: the hash of its value ([`State::value_hash`]),
/// to tell whether it changed, and its pass record. Not part of the state's value.
#[derive(Debug, Clone, Default)]
struct Baseline {
    hash: Option<u64>,
    pass: Option<PassRecord>,
}

impl PartialEq for Baseline {
    fn eq(&self, _: &Baseline) -> bool {
        true
    }
}

impl Eq for Baseline {}

/// Paths hash as their bytes: `Path`'s own `Hash` walks components, several times slower, and
/// recorded paths are already normal (the manifest normalizes them).
fn hash_path<H: Hasher>(path: &Path, h: &mut H) {
    path.as_os_str().as_encoded_bytes().hash(h);
}

// Written out rather than derived for the paths (see `hash_path`); the patterns name every
// field, so a field added later does not compile until it is hashed too.
impl Hash for FileRecord {
    fn hash<H: Hasher>(&self, h: &mut H) {
        let FileRecord {
            path,
            sha256,
            written_at,
            recipients,
            fingerprint,
            public_key,
            stat,
        } = self;
        hash_path(path, h);
        (
            sha256,
            written_at,
            recipients,
            fingerprint,
            public_key,
            stat,
        )
            .hash(h);
    }
}

impl Hash for PublicRecord {
    fn hash<H: Hasher>(&self, h: &mut H) {
        let PublicRecord { path, sha256, stat } = self;
        hash_path(path, h);
        (sha256, stat).hash(h);
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ErrorRecord {
    pub at: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
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
    /// The state says which files kps-sync owns, and so may rewrite or prune: only root (or
    /// the user kps-sync runs as) may be able to change it.
    #[error(
        "{path}: the state file is owned by uid {uid} with mode {mode:04o}; only root or the user kps-sync runs as may own it, and no one else may write it: fix it with `chown root: {path} && chmod 600 {path}` after checking its content"
    )]
    Untrusted { path: PathBuf, uid: u32, mode: u32 },
    #[error("{path}: cannot open the lock file: {source}; check state_dir's permissions")]
    LockOpen { path: PathBuf, source: io::Error },
    #[error(
        "{path}: another kps-sync holds the lock (a daemon or a reconcile on the same state_dir); waited {waited:?}. Let it finish, or stop the daemon first"
    )]
    Locked { path: PathBuf, waited: Duration },
}

/// Refuse a state file someone other than root or us could have written. The state folder is
/// already checked (0700-like, owned by root or us); this is the same rule for the file itself,
/// since its records decide what a pass may rewrite and prune.
fn untrusted(path: &Path, meta: &std::fs::Metadata) -> Result<(), StateError> {
    use std::os::unix::fs::MetadataExt;
    let ours = meta.uid() == 0 || meta.uid() == nix::unistd::geteuid().as_raw();
    if ours && meta.mode() & 0o022 == 0 {
        return Ok(());
    }
    Err(StateError::Untrusted {
        path: path.to_owned(),
        uid: meta.uid(),
        mode: meta.mode() & 0o7777,
    })
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
            Ok((file, meta)) => {
                untrusted(&path, &meta)?;
                file
            }
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
        let mut state: State = serde_json::from_slice(&bytes)
            .map_err(|source| StateError::Corrupt { path, source })?;
        state.set_baseline();
        Ok(state)
    }

    /// Drop the record of `key` if it is still the one for `path` (a key moved to a new path
    /// may already have a newer record).
    pub fn forget(&mut self, key: &str, path: &Path) {
        if self.files.get(key).is_some_and(|r| r.path == path) {
            self.files.remove(key);
        }
    }

    /// Save atomically, mode 0600, creating `state_dir` 0700 if needed.
    pub fn save(&mut self, state_dir: &Path) -> Result<(), StateError> {
        let bytes = self.to_bytes();
        State::save_bytes(&bytes, state_dir)?;
        self.set_baseline();
        Ok(())
    }

    fn set_baseline(&mut self) {
        self.baseline = Baseline {
            hash: Some(self.value_hash()),
            pass: self.last_pass.clone(),
        };
    }

    /// A hash of everything the state file holds. SipHash's 64 bits: a change goes unseen
    /// with a chance of about 2^-64 (and would cost a record's update until the next change,
    /// never a key).
    fn value_hash(&self) -> u64 {
        let State {
            baseline: _,
            version,
            files,
            errors,
            last_pass,
            last_listing,
        } = self;
        let mut h = std::hash::DefaultHasher::new();
        (version, files, errors, last_pass, last_listing).hash(&mut h);
        h.finish()
    }

    /// The bytes of `state.json`: compact JSON (a tenth smaller than pretty-printed, so
    /// quicker to read on every pass), in a buffer sized for them up front.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(self.files.len() * 400 + 4096);
        serde_json::to_writer(&mut bytes, self).expect("state serializes");
        bytes
    }

    /// Write `bytes` (from [`State::to_bytes`]) as the state file.
    pub fn save_bytes(bytes: &[u8], state_dir: &Path) -> Result<(), StateError> {
        write::write_atomic(
            &state_dir.join(STATE_FILE),
            bytes,
            FileMeta::PRIVATE,
            Prior::Anything,
        )?;
        Ok(())
    }

    /// Whether the state differs from what it was loaded from or last saved as.
    pub fn changed(&self) -> bool {
        self.baseline.hash != Some(self.value_hash())
    }

    /// End a pass whose record is in `last_pass`. The state is saved only when something in
    /// it changed besides that record's time (its counts included); otherwise only the lock
    /// file's mtime moves, so `status` still shows when the last pass ran. Returns whether the
    /// state was saved.
    pub fn end_pass(&mut self, state_dir: &Path) -> Result<bool, StateError> {
        let Some(pass) = self.last_pass.clone() else {
            return self.save(state_dir).map(|()| true);
        };
        let before = self.baseline.pass.as_ref().filter(|p| {
            (p.managed, p.in_place, p.failed) == (pass.managed, pass.in_place, pass.failed)
        });
        if let Some(before) = before {
            self.last_pass = Some(before.clone());
        }
        if before.is_some() && !self.changed() {
            let stamped = rustix::fs::utimensat(
                rustix::fs::CWD,
                state_dir.join(LOCK_FILE),
                &rustix::fs::Timestamps {
                    last_access: now_timespec(),
                    last_modification: now_timespec(),
                },
                rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
            );
            if let Err(e) = stamped {
                tracing::debug!(error = %e, "cannot stamp the lock file with the pass's time");
            }
            return Ok(false);
        }
        self.last_pass = Some(pass);
        self.save(state_dir)?;
        Ok(true)
    }

    /// When the last pass ended: the later of the saved record and the lock file's mtime
    /// (stamped by a pass that changed nothing).
    pub fn last_pass_at(&self, state_dir: &Path) -> Option<String> {
        let saved = self
            .last_pass
            .as_ref()
            .and_then(|p| humantime::parse_rfc3339(&p.at).ok());
        let stamped = std::fs::symlink_metadata(state_dir.join(LOCK_FILE))
            .ok()
            .filter(|m| m.file_type().is_file())
            .and_then(|m| m.modified().ok());
        let at = match (saved, stamped) {
            (Some(a), Some(b)) => a.max(b),
            (a, b) => a.or(b.filter(|_| self.last_pass.is_some()))?,
        };
        Some(humantime::format_rfc3339_seconds(at).to_string())
    }

    /// The stat each recorded file had when it last hashed to its record, by path.
    pub fn known(&self) -> Known {
        let mut known = Known::with_capacity(self.files.len());
        for rec in self.files.values() {
            if let Some(stat) = rec.stat {
                known.insert(rec.path.clone(), (stat, rec.sha256.clone()));
            }
            if let Some(public) = &rec.public_key
                && let Some(stat) = public.stat
            {
                known.insert(public.path.clone(), (stat, public.sha256.clone()));
            }
        }
        known
    }

    /// Keep the stat of each recorded file that was read this pass and still hashes to its
    /// record, so the next pass need not read it.
    pub fn remember(&mut self, observed: &ObservedFiles, fresh: &Fresh) {
        let holds = |path: &Path, sha256: &str| match observed.get(path) {
            Some(Observed::Regular(f)) if f.sha256 == sha256 => fresh.get(path).copied(),
            _ => None,
        };
        for rec in self.files.values_mut() {
            if let Some(stat) = holds(&rec.path, &rec.sha256) {
                rec.stat = Some(stat);
            }
            if let Some(public) = &mut rec.public_key
                && let Some(stat) = holds(&public.path, &public.sha256)
            {
                public.stat = Some(stat);
            }
        }
    }
}

fn now_timespec() -> rustix::fs::Timespec {
    rustix::fs::Timespec {
        tv_sec: 0,
        tv_nsec: rustix::fs::UTIME_NOW,
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
    fn a_state_file_others_could_write_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state");
        State::new().save(&dir).unwrap();
        let file = dir.join(STATE_FILE);
        assert!(State::load(&dir).is_ok());
        for mode in [0o620, 0o602, 0o666] {
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
            let err = State::load(&dir).unwrap_err();
            assert!(
                matches!(err, StateError::Untrusted { .. }),
                "{mode:o}: {err}"
            );
            assert!(err.to_string().contains("chmod 600"), "{err}");
        }
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(
            State::load(&dir).is_ok(),
            "readable by others is not writable by them"
        );
        if nix::unistd::geteuid().is_root() {
            std::os::unix::fs::chown(&file, Some(65534), None).unwrap();
            let err = State::load(&dir).unwrap_err();
            assert!(err.to_string().contains("uid 65534"), "{err}");
        }
    }

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
                    stat: None,
                }),
                stat: None,
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
    fn a_pass_that_changed_nothing_saves_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let _lock = lock(dir, Duration::ZERO).unwrap();
        let end = |state: &mut State, at: &str, failed| {
            state.last_pass = Some(PassRecord {
                at: at.into(),
                managed: 1,
                in_place: 1 - failed,
                failed,
            });
            state.end_pass(dir).unwrap()
        };
        let mut state = State::load(dir).unwrap();
        assert!(state.changed(), "a new state is saved once");
        assert!(end(&mut state, "2026-01-01T00:00:00Z", 0));
        let saved = std::fs::read(dir.join(STATE_FILE)).unwrap();

        let mut state = State::load(dir).unwrap();
        assert!(!state.changed());
        assert!(!end(&mut state, "2026-01-01T00:05:00Z", 0));
        assert_eq!(std::fs::read(dir.join(STATE_FILE)).unwrap(), saved);
        // The time of that pass is the lock's stamp, later than the saved record.
        let shown = state.last_pass_at(dir).unwrap();
        assert!(shown.as_str() > "2026-01-01T00:00:00Z", "{shown}");

        // Other counts, or any other change, are saved.
        assert!(end(&mut state, "2026-01-01T00:10:00Z", 1));
        state.last_listing = Some(now_rfc3339());
        assert!(state.changed());
        assert!(end(&mut state, "2026-01-01T00:15:00Z", 1));
        assert_eq!(State::load(dir).unwrap(), state);
    }

    #[test]
    fn any_change_to_a_record_is_a_change_and_undoing_it_is_none() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let mut state = State::new();
        let stat = Stat {
            dev: 1,
            ino: 2,
            size: 3,
            mtime: 4,
            ctime: 5,
            seen: 6,
        };
        for name in ["a", "b"] {
            state.files.insert(
                name.into(),
                FileRecord {
                    path: format!("/k/{name}").into(),
                    sha256: "sha256:00".into(),
                    written_at: "2026-01-01T00:00:00Z".into(),
                    recipients: None,
                    fingerprint: None,
                    public_key: Some(PublicRecord {
                        path: format!("/k/{name}.pub").into(),
                        sha256: "sha256:01".into(),
                        stat: Some(stat),
                    }),
                    stat: Some(stat),
                },
            );
        }
        state.save(dir).unwrap();
        let mut state = State::load(dir).unwrap();
        assert!(!state.changed());
        let edits: Vec<fn(&mut FileRecord)> = vec![
            |r| r.path.push("x"),
            |r| r.sha256.push('1'),
            |r| r.written_at.push('Z'),
            |r| r.recipients = Some(String::new()),
            |r| r.fingerprint = Some("SHA256:x".into()),
            |r| r.stat.as_mut().unwrap().ctime += 1,
            |r| r.stat.as_mut().unwrap().seen += 1,
            |r| r.stat = None,
            |r| r.public_key.as_mut().unwrap().path.push("x"),
            |r| r.public_key.as_mut().unwrap().stat.as_mut().unwrap().ino += 1,
            |r| r.public_key = None,
        ];
        for (i, edit) in edits.into_iter().enumerate() {
            let before = state.files["b"].clone();
            edit(state.files.get_mut("b").unwrap());
            assert!(state.changed(), "edit {i} went unseen");
            state.files.insert("b".into(), before);
            assert!(!state.changed(), "edit {i} undone");
        }
        // A record's path moving to its neighbour's field is a change too.
        let a = state.files.remove("a").unwrap();
        state.files.insert("c".into(), a);
        assert!(state.changed());
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
