//! Place one batch of exported keys: check each against the listing and the key on disk,
//! encrypt it where asked, record the batch's intents, and write the files (and public key
//! files) through the atomic writer. Runs on a blocking thread.
//!
//! A batch is made durable with as few syncs as the crash-safety argument allows (see
//! `state::journal`): one journal `fdatasync` for all its intents, one `fsync` per file (its
//! bytes before its rename), and one `fsync` per distinct folder after all its renames.
//!
//! Invariants: every file goes through `write`; a key file is written only after its intent
//! is durable in the journal; a file's record is handed back only once its folder is synced,
//! so a saved state never records a rename a power loss could undo; a failure names the path
//! and leaves the file as it was; what is written is the normalised key (or its age
//! ciphertext), never the text KPS sent.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::export::Job;
use super::outcome::{Cause, Unexportable};
use super::planned::Declared;
use crate::kps::KeypairInfo;
use crate::kps::export::ExportError;
use crate::output::encrypt;
use crate::output::meta::FileMeta;
use crate::output::write::{self, Prior, Published};
use crate::secret::SecretBytes;
use crate::state::journal::{Intent, Journal};
use crate::state::{FileRecord, PublicRecord};
use crate::{keys, observe, plan};

/// What placing one key did: the key file's record if it was written, and the public key
/// file's record if it was (or why it was not). A key file written with a public key file that
/// failed keeps its record: the file is ours either way.
pub(super) struct Placed {
    pub record: Option<FileRecord>,
    pub public: Result<Option<PublicRecord>, Cause>,
}

/// One batch's placing: each placed key's result by its place in the ledger, and whether
/// shutdown stopped it before every key was placed.
pub(super) struct BatchPlaced {
    pub placed: Vec<(usize, bool, Result<Placed, Cause>)>,
    pub stopped: bool,
}

/// Check, record and write the keys of one batch, `exported[i]` being `jobs[i]`'s key.
pub(super) fn place_batch(
    jobs: &[Job],
    exported: Vec<Result<keys::PrivateKey, ExportError>>,
    remote: Option<&BTreeMap<String, KeypairInfo>>,
    journal: &Journal,
    stopping: impl Fn() -> bool,
) -> BatchPlaced {
    // 1. Checked and encrypted in memory.
    let mut ready: Vec<(&Job, Result<Ready, Cause>)> = jobs
        .iter()
        .zip(exported)
        .map(|(job, key)| {
            (
                job,
                key.map_err(Cause::Export)
                    .and_then(|key| prepare(job, key, remote)),
            )
        })
        .collect();
    // 2. Every intent of the batch durable in one write and one sync, before any rename.
    let intents: Vec<Intent> = ready
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok()?.file.as_ref().map(|f| f.intent.clone()))
        .collect();
    if let Err(e) = journal.record(&intents) {
        let source = Arc::new(e);
        for (job, result) in &mut ready {
            if result.as_ref().is_ok_and(|r| r.file.is_some()) {
                *result = Err(Cause::Journal {
                    path: job.key.want.path.clone(),
                    journal: journal.path(),
                    source: source.clone(),
                });
            }
        }
    }
    // 3. Each file written, synced and renamed into place.
    let mut stopped = false;
    let mut published: Vec<Published> = Vec::new();
    let mut written: Vec<(&Job, Result<Written, Cause>)> = Vec::with_capacity(ready.len());
    for (job, result) in ready {
        if stopping() {
            stopped = true;
            break;
        }
        written.push((job, result.and_then(|r| write(job, r, &mut published))));
    }
    // 4. Each folder synced once: only now are the renames durable, and the records handed on.
    let mut synced = write::sync_folders(published).into_iter();
    let mut next_synced = || {
        synced
            .next()
            .expect("one result per published file")
            .map_err(Cause::of_write)
    };
    let placed = written
        .into_iter()
        .map(|(job, result)| {
            let placed = result.and_then(|w| {
                // In the order `write` published them: the key file, then its public key file.
                let key = if w.record.is_some() {
                    next_synced()
                } else {
                    Ok(())
                };
                let public = match w.public {
                    Some(Ok(record)) => next_synced().map(|()| Some(record)),
                    Some(Err(cause)) => Err(cause),
                    None => Ok(None),
                };
                key?;
                Ok(Placed {
                    record: w.record,
                    public,
                })
            });
            (job.at, job.key_file, placed)
        })
        .collect();
    BatchPlaced { placed, stopped }
}

/// One key checked and made ready to write.
struct Ready {
    /// The key file's bytes, intent and record, where the key file is written.
    file: Option<Sealed>,
    /// The public key file's line, where it is written.
    public: Option<String>,
}

/// A key file's bytes (the normalised key or its age ciphertext) and its intent, from which
/// its record is made once it is written.
struct Sealed {
    bytes: SecretBytes,
    intent: Intent,
}

/// What was renamed into place for one key, each file's folder not yet synced.
struct Written {
    record: Option<FileRecord>,
    public: Option<Result<PublicRecord, Cause>>,
}

/// Where the listing shows the name cannot be exported, why.
pub(super) fn check_listing(
    remote: &BTreeMap<String, KeypairInfo>,
    name: &str,
) -> Result<(), Cause> {
    match remote.get(name) {
        None => Err(Cause::Listed(Unexportable::NotListed)),
        Some(info) if !info.is_key_protection => Err(Cause::Listed(Unexportable::NotHosted)),
        Some(info) if info.is_frozen() => Err(Cause::Listed(Unexportable::Frozen)),
        Some(_) => Ok(()),
    }
}

/// The public key file's path as messages show it.
pub(super) fn display_public(key: &Declared) -> String {
    key.want
        .public_key
        .as_deref()
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

/// Check the key against the key on disk and the listing, and encrypt it where asked.
fn prepare(
    job: &Job,
    key: keys::PrivateKey,
    remote: Option<&BTreeMap<String, KeypairInfo>>,
) -> Result<Ready, Cause> {
    if let Some(expect) = &job.expect
        && *expect != key.fingerprint_sha256()
    {
        return Err(Cause::PublicRotated(display_public(&job.key)));
    }
    let want = &job.key.want;
    verify_listed(&want.name, &key, remote)?;
    let public = job.public.then(|| key.public_openssh());
    if !job.key_file {
        return Ok(Ready { file: None, public });
    }
    // Kept in the state so a later listing can show a rotation.
    let fingerprint = Some(key.fingerprint_sha256());
    let bytes = match &job.key.encryption {
        Some(enc) => {
            encrypt::encrypt(key.normalised(), enc).map_err(|e| Cause::Encrypt(Arc::new(e)))?
        }
        None => key.into_normalised(),
    };
    let intent = Intent {
        key: want.name.clone(),
        path: want.path.clone(),
        sha256: observe::sha256_of(bytes.expose()),
        fingerprint,
        recipients: want.recipients.clone(),
    };
    Ok(Ready {
        file: Some(Sealed { bytes, intent }),
        public,
    })
}

/// Write the key file (its intent is durable) and then its public key file, leaving each
/// folder's sync to the batch: `published` gets one entry per file renamed into place.
fn write(job: &Job, ready: Ready, published: &mut Vec<Published>) -> Result<Written, Cause> {
    let record = match ready.file {
        Some(sealed) => {
            let want = &job.key.want;
            let prior = prior(job.seen.as_deref());
            let done = write::publish(&want.path, sealed.bytes.expose(), want.meta, prior)
                .map_err(Cause::of_write)?;
            published.push(done);
            Some(sealed.intent.into_record())
        }
        None => None,
    };
    let public = ready.public.map(|line| {
        let (record, done) = place_public(job, &line)?;
        published.push(done);
        Ok(record)
    });
    Ok(Written { record, public })
}

/// Write the public half of the key beside it, mode 0644, owner and group as the key's. The
/// line is `type base64 name`.
fn place_public(job: &Job, line: &str) -> Result<(PublicRecord, Published), Cause> {
    let Some(path) = &job.key.want.public_key else {
        unreachable!("only jobs for keys with public_key write one");
    };
    let text = format!("{line} {}\n", job.key.want.name);
    let meta = FileMeta {
        mode: plan::PUBLIC_MODE,
        ..job.key.want.meta
    };
    let done = write::publish(
        path,
        text.as_bytes(),
        meta,
        prior(job.public_seen.as_deref()),
    )
    .map_err(Cause::of_write)?;
    let record = PublicRecord {
        path: path.clone(),
        sha256: observe::sha256_of(text.as_bytes()),
        stat: None,
    };
    Ok((record, done))
}

fn prior(seen: Option<&str>) -> Prior<'_> {
    match seen {
        Some(sha256) => Prior::Sha256(sha256),
        None => Prior::Absent,
    }
}

/// Where KPS lists a public key or fingerprint for the name, the key must be that one.
fn verify_listed(
    name: &str,
    key: &keys::PrivateKey,
    remote: Option<&BTreeMap<String, KeypairInfo>>,
) -> Result<(), Cause> {
    let Some(info) = remote.and_then(|r| r.get(name)) else {
        return Ok(());
    };
    match key.verify_listed(info.public_key.as_deref(), info.fingerprint.as_deref()) {
        Ok(keys::Verified::Unreadable) => {
            tracing::warn!(key = %name, "KPS lists a public key or fingerprint for this name that kps-sync cannot read; the key is written without that check");
            Ok(())
        }
        Ok(_) => Ok(()),
        Err(e) => Err(Cause::Verify(e)),
    }
}
