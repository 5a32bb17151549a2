//! The intent journal (`state_dir/journal`): what kps-sync is about to publish, made durable
//! before the rename that publishes it, so a crash at any instant (a kill or a power loss)
//! leaves nothing disowned.
//!
//! Without it, a file renamed into place just before a crash (SIGKILL, OOM, power loss) and
//! before the next state save would be taken for someone else's on the next start and kept
//! forever as a conflict.
//!
//! ## The ordering, and why it is enough
//! Keys are placed a batch (at most 10 keys) at a time, in this order:
//! 1. each key of the batch is checked and, where asked, encrypted, in memory;
//! 2. [`Journal::record`] appends one line `(key, path, sha256, public fingerprint,
//!    recipients)` per key file of the batch, all in one `write`, then `fdatasync`s the journal
//!    once. The pass's first record creates the journal and `fsync`s the state folder before
//!    writing, so the journal's name is as durable as its lines. Only then:
//! 3. for each key file, the writer creates the temporary file in the destination's folder,
//!    writes it, `fsync`s it (its bytes are durable before any name points at them) and renames
//!    it over the destination (`write::publish`); the folder is not synced yet;
//! 4. each distinct destination folder of the batch is `fsync`ed once (`write::sync_folders`):
//!    now every rename of the batch is durable. Only then are the batch's records handed to the
//!    pass's state;
//! 5. the pass saves the state (atomically: temporary file, `fsync`, rename, folder `fsync`)
//!    at least once a second and at the end;
//! 6. the journal is folded into the state once more ([`fold`]: a file renamed into place whose
//!    folder's `fsync` then failed is ours but has no record), the state is saved, and only
//!    then [`clear`] removes the journal (and syncs the folder).
//!
//! On the next start, [`fold`] reads the journal before planning: a destination whose bytes
//! hash to a recorded intent is ours, and its record goes into the state.
//!
//! If the process dies (SIGKILL, OOM; the kernel keeps everything written so far):
//! - before 2 completes: nothing of the batch was renamed; the old files (or none) are there;
//! - between 2 and a key's rename: its destination is the old file or absent. An intent whose
//!   hash matches nothing on disk is ignored; one that matches the old file means the old file
//!   holds exactly the bytes we meant to write, so claiming it is right;
//! - after a rename, before the state save that records it (whether or not 4 ran): the file's
//!   hash matches its intent: ours;
//! - after the final save, before [`clear`]: the intents fold into records that already say
//!   the same; nothing changes.
//!
//! If the power fails, only what was synced survives:
//! - the batch's journal lines are durable (2) before any of its renames is issued (3), so
//!   every rename that survives has its intent; a torn last line (a crash mid-append) is
//!   skipped, and its batch renamed nothing since the renames come after the sync;
//! - each renamed file's bytes are durable before its rename, so after the reboot each
//!   destination holds either its old content or the complete new file, never a torn one (a
//!   rename not yet made durable by 4 may be undone: the old file is back, the intent matches
//!   nothing or the old bytes, as above);
//! - a record reaches the state only after 4, and a state save is itself synced, so a state
//!   that survives never records a rename that did not: the next pass never takes the old file
//!   for an altered copy of ours.
//!
//! A pass that publishes nothing never touches the journal: no write, no fsync. The journal is
//! append-only, one JSON line per intent, created 0600 (`O_NOFOLLOW`, never through a link) in
//! the 0700 state folder; it holds hashes and fingerprints, never a key.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

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

impl Intent {
    /// The state's record of the file this intent published, written now. No public key file
    /// and no stat yet: the next pass hashes the file once and records its stat.
    pub fn into_record(self) -> FileRecord {
        FileRecord {
            path: self.path,
            sha256: self.sha256,
            written_at: super::now_rfc3339(),
            recipients: self.recipients,
            fingerprint: self.fingerprint,
            public_key: None,
            stat: None,
        }
    }
}

/// The journal of one pass, opened at its first record. Shared by the batches placed at the
/// same time: each record is one `write(2)` of whole lines on an `O_APPEND` descriptor, so
/// lines never interleave.
pub struct Journal {
    state_dir: PathBuf,
    /// Opened (created and its name made durable, if need be) by the first record.
    file: Mutex<Option<Arc<File>>>,
}

impl Journal {
    pub fn new(state_dir: &Path) -> Journal {
        Journal {
            state_dir: state_dir.to_owned(),
            file: Mutex::new(None),
        }
    }

    /// The journal's path, for messages.
    pub fn path(&self) -> PathBuf {
        self.state_dir.join(JOURNAL_FILE)
    }

    /// Append `intents` in one write and make them durable with one `fdatasync`.
    pub fn record(&self, intents: &[Intent]) -> io::Result<()> {
        if intents.is_empty() {
            return Ok(());
        }
        let mut lines = Vec::with_capacity(intents.len() * 256);
        for intent in intents {
            serde_json::to_writer(&mut lines, intent).map_err(io::Error::other)?;
            lines.push(b'\n');
        }
        let file = self.open()?;
        (&*file).write_all(&lines)?;
        file.sync_data()
    }

    /// The open journal; the first call opens it, and when it creates the file, syncs the
    /// state folder before any record is made, so the journal's name survives a power loss.
    /// Under the lock, so that no batch appends to a journal whose name is not yet durable.
    fn open(&self) -> io::Result<Arc<File>> {
        let mut slot = self
            .file
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(file) = &*slot {
            return Ok(file.clone());
        }
        let path = self.path();
        let open = |create_new: bool| {
            OpenOptions::new()
                .append(true)
                .create_new(create_new)
                .mode(0o600)
                .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
                .open(&path)
        };
        let file = match open(true) {
            Ok(file) => {
                File::open(&self.state_dir)?.sync_all()?;
                file
            }
            // Left by a pass that stopped before clearing it; its name was synced when it was
            // created, before any of its records.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => open(false)?,
            Err(e) => return Err(e),
        };
        let file = Arc::new(file);
        *slot = Some(file.clone());
        Ok(file)
    }
}

/// Every whole intent in the journal, oldest first; none when there is no journal.
pub fn read(state_dir: &Path) -> Vec<Intent> {
    intents(state_dir).collect()
}

/// The journal's whole intents, read one line at a time.
fn intents(state_dir: &Path) -> impl Iterator<Item = Intent> {
    let file = observe::open_regular(&state_dir.join(JOURNAL_FILE))
        .ok()
        .map(|(file, _)| file);
    file.into_iter().flat_map(|file| {
        io::BufReader::new(file)
            .split(b'\n')
            .map_while(Result::ok)
            // A torn line (a crash mid-append) does not parse: its rename never happened.
            .filter_map(|line| serde_json::from_slice(&line).ok())
    })
}

/// Claim, in `state`, every destination that holds exactly the bytes an intent recorded.
/// Returns how many records it added or replaced. Writes nothing.
pub fn fold(state: &mut State, state_dir: &Path) -> usize {
    let mut folded = 0;
    for intent in intents(state_dir) {
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
        tracing::info!(key = %intent.key, path = %intent.path.display(), "a file kps-sync published but had not recorded (it stopped, or the folder's sync failed) is recorded as its own (intent journal)");
        let public_key = state
            .files
            .get(&intent.key)
            .and_then(|r| r.public_key.clone());
        let key = intent.key.clone();
        state.files.insert(
            key,
            FileRecord {
                public_key,
                ..intent.into_record()
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
        let journal = Journal::new(dir);
        journal
            .record(&[
                intent("a", &ours, b"published"),
                intent("b", &other, b"what we meant to write"),
            ])
            .unwrap();
        journal
            .record(&[intent("c", &dir.join("never.pem"), b"x")])
            .unwrap();
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
    fn a_journal_left_by_a_stopped_pass_is_appended_to_and_a_batch_is_one_write() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        Journal::new(dir)
            .record(&[intent("left", &dir.join("l"), b"l")])
            .unwrap();
        let journal = Journal::new(dir);
        journal.record(&[]).unwrap();
        let batch: Vec<Intent> = (0..10)
            .map(|i| intent(&format!("k{i}"), &dir.join(format!("k{i}")), b"k"))
            .collect();
        journal.record(&batch).unwrap();
        let read = read(dir);
        assert_eq!(read.len(), 11);
        assert_eq!(read[0].key, "left");
        assert_eq!(read[1..], batch[..]);
    }

    #[test]
    fn the_journal_is_private() {
        use std::os::unix::fs::MetadataExt;
        let tmp = tempfile::tempdir().unwrap();
        Journal::new(tmp.path())
            .record(&[intent("a", &tmp.path().join("k"), b"k")])
            .unwrap();
        let mode = std::fs::metadata(tmp.path().join(JOURNAL_FILE))
            .unwrap()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
