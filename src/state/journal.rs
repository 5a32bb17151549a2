//! The intent journal (`state_dir/journal`): what kps-sync is about to publish, made durable
//! before the rename that publishes it, so a crash at any instant leaves nothing disowned.
//!
//! Without it, a file renamed into place just before a crash (SIGKILL, OOM, power loss) and
//! before the next state save would be taken for someone else's on the next start and kept
//! forever as a conflict.
//!
//! ## The ordering, and why it is enough
//! For each key file, in this order:
//! 1. [`record`]: append one line `(key, path, sha256, public fingerprint, recipients)` to the
//!    journal and `fdatasync` it (and the folder when the journal was just created). Only then:
//! 2. the writer creates the temporary file, writes it, `fsync`s it, renames it over the
//!    destination and `fsync`s the destination's folder (`write::write_atomic`);
//! 3. the pass records the file in the state (saved atomically: temporary file, `fsync`,
//!    rename, folder `fsync`) at least once a second and at the end;
//! 4. after the final save, [`clear`] removes the journal (and syncs the folder).
//!
//! On the next start, [`fold`] reads the journal before planning: a destination whose bytes
//! hash to a recorded intent is ours, and its record goes into the state.
//!
//! - Killed before 1 completes: nothing was renamed; the old file (or none) is there.
//! - Killed between 1 and the rename: the destination is the old file or absent. An intent
//!   whose hash matches nothing on disk is ignored; one that matches the old file means the old
//!   file holds exactly the bytes we meant to write, so claiming it is right.
//! - Killed after the rename, before the state save: the file's hash matches its intent: ours.
//! - Killed after the final save, before [`clear`]: the intents fold into records that already
//!   say the same; nothing changes.
//! - **Power loss**: the journal line is on disk (`fdatasync`) before the rename is even issued,
//!   and the renamed file's data before its rename (`fsync` of the temporary file). After the
//!   reboot each destination holds either its old content or the complete new file (the rename
//!   is atomic, made durable by the folder's `fsync`); in the second case the intent is there
//!   to claim it. A torn last journal line (a crash mid-append) is skipped: its rename never
//!   happened, since it comes after the sync.
//!
//! A pass that publishes nothing never touches the journal: no write, no fsync. The journal is
//! append-only, one JSON line per intent, created 0600 (`O_NOFOLLOW`, never through a link) in
//! the 0700 state folder; it holds hashes and fingerprints, never a key.

use std::fs::OpenOptions;
use std::io::{self, BufRead, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{FileRecord, State};
use crate::observe::{self, Observed};

pub const JOURNAL_FILE: &str = "journal";

/// One file about to be published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Intent {
    pub key: String,
    pub path: PathBuf,
    /// `sha256:<hex>` of the bytes about to be renamed into place.
    pub sha256: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipients: Option<String>,
}

/// Append `intent` and make it durable. Called from several threads at once: each intent is one
/// `write(2)` of one line on an `O_APPEND` descriptor, so lines never interleave.
pub fn record(state_dir: &Path, intent: &Intent) -> io::Result<()> {
    let path = state_dir.join(JOURNAL_FILE);
    let mut line = serde_json::to_vec(intent).map_err(io::Error::other)?;
    line.push(b'\n');
    let created = !path.exists();
    let mut file = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(&path)?;
    file.write_all(&line)?;
    file.sync_data()?;
    if created {
        std::fs::File::open(state_dir)?.sync_all()?;
    }
    Ok(())
}

/// Every whole intent in the journal, oldest first; none when there is no journal.
pub fn read(state_dir: &Path) -> Vec<Intent> {
    let Ok((file, _)) = observe::open_regular(&state_dir.join(JOURNAL_FILE)) else {
        return Vec::new();
    };
    io::BufReader::new(file)
        .split(b'\n')
        .map_while(Result::ok)
        // A torn line (a crash mid-append) does not parse: its rename never happened.
        .filter_map(|line| serde_json::from_slice(&line).ok())
        .collect()
}

/// Claim, in `state`, every destination that holds exactly the bytes an intent recorded.
/// Returns how many records it added or replaced. Writes nothing.
pub fn fold(state: &mut State, state_dir: &Path) -> usize {
    let mut folded = 0;
    for intent in read(state_dir) {
        let recorded = state
            .files
            .get(&intent.key)
            .is_some_and(|r| r.path == intent.path && r.sha256 == intent.sha256);
        if recorded {
            continue;
        }
        let Observed::Regular(facts) = observe::observe(&intent.path) else {
            continue;
        };
        if facts.sha256 != intent.sha256 {
            continue;
        }
        tracing::info!(key = %intent.key, path = %intent.path.display(), "a file published just before kps-sync stopped is recorded as its own (intent journal)");
        let public_key = state
            .files
            .get(&intent.key)
            .and_then(|r| r.public_key.clone());
        state.files.insert(
            intent.key.clone(),
            FileRecord {
                path: intent.path,
                sha256: intent.sha256,
                written_at: super::now_rfc3339(),
                recipients: intent.recipients,
                fingerprint: intent.fingerprint,
                public_key,
                // Not read since the crash: the next pass hashes it and records its stat.
                stat: None,
            },
        );
        folded += 1;
    }
    folded
}

/// Remove the journal once the state holding its intents is saved. Nothing to do (and no
/// fsync) when there is none.
pub fn clear(state_dir: &Path) -> io::Result<()> {
    let path = state_dir.join(JOURNAL_FILE);
    // A look first: a pass that published nothing attempts no unlink either.
    if std::fs::symlink_metadata(&path).is_err_and(|e| e.kind() == io::ErrorKind::NotFound) {
        return Ok(());
    }
    match std::fs::remove_file(&path) {
        Ok(()) => std::fs::File::open(state_dir)?.sync_all(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Remove the writer's temporary files (`.kps-sync-*.tmp`) that a killed kps-sync left in
/// `folders`. Safe under the state lock: no other pass of ours is writing. Regular files only,
/// never through a symlink; a temporary file never holds more than the key it was to become,
/// at its final mode. Returns how many were removed.
pub fn sweep_temps<'a>(folders: impl IntoIterator<Item = &'a Path>) -> usize {
    let mut removed = 0;
    for folder in folders {
        let Ok(entries) = std::fs::read_dir(folder) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if !(name.starts_with(".kps-sync-") && name.ends_with(".tmp")) {
                continue;
            }
            if entry.file_type().is_ok_and(|t| t.is_file())
                && std::fs::remove_file(entry.path()).is_ok()
            {
                tracing::info!(path = %entry.path().display(), "removed a temporary file left by an interrupted kps-sync");
                removed += 1;
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn intent(key: &str, path: &Path, bytes: &[u8]) -> Intent {
        Intent {
            key: key.into(),
            path: path.into(),
            sha256: observe::sha256_of(bytes),
            fingerprint: Some("SHA256:x".into()),
            recipients: None,
        }
    }

    #[test]
    fn a_file_matching_an_intent_is_claimed_and_others_are_not() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let ours = dir.join("ours.pem");
        let other = dir.join("other.pem");
        std::fs::write(&ours, b"published").unwrap();
        std::fs::write(&other, b"someone else's").unwrap();
        record(dir, &intent("a", &ours, b"published")).unwrap();
        record(dir, &intent("b", &other, b"what we meant to write")).unwrap();
        record(dir, &intent("c", &dir.join("never.pem"), b"x")).unwrap();
        // A torn last line is skipped.
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.join(JOURNAL_FILE))
            .unwrap();
        f.write_all(b"{\"key\":\"d\",\"pa").unwrap();
        assert_eq!(read(dir).len(), 3);

        let mut state = State::new();
        assert_eq!(fold(&mut state, dir), 1);
        let rec = &state.files["a"];
        assert_eq!(
            (rec.path.as_path(), rec.sha256.as_str()),
            (ours.as_path(), observe::sha256_of(b"published").as_str())
        );
        assert_eq!(rec.fingerprint.as_deref(), Some("SHA256:x"));
        assert!(!state.files.contains_key("b") && !state.files.contains_key("c"));
        assert_eq!(fold(&mut state, dir), 0, "folding twice changes nothing");

        clear(dir).unwrap();
        assert!(!dir.join(JOURNAL_FILE).exists());
        clear(dir).unwrap();
        assert!(read(dir).is_empty());
    }

    #[test]
    fn the_journal_is_private() {
        use std::os::unix::fs::MetadataExt;
        let tmp = tempfile::tempdir().unwrap();
        record(tmp.path(), &intent("a", &tmp.path().join("k"), b"k")).unwrap();
        let mode = std::fs::metadata(tmp.path().join(JOURNAL_FILE))
            .unwrap()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
