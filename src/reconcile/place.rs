//! Place one exported key: check it against the listing and the key on disk, encrypt it where
//! asked, record the intent, and write it (and its public key file) through the atomic writer.
//! Runs on a blocking thread.
//!
//! Invariants: every file goes through `write`; a key file is written only after its intent
//! is durable in the journal; a failure names the path and leaves the file as it was; what is
//! written is the normalised key (or its age ciphertext), never the text KPS sent.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use super::export::Job;
use super::outcome::{Cause, Unexportable};
use super::planned::Declared;
use crate::kps::KeypairInfo;
use crate::output::meta::FileMeta;
use crate::output::write::Prior;
use crate::output::{encrypt, write};
use crate::state::{self, FileRecord, PublicRecord};
use crate::{keys, observe, plan};

/// What placing one key did: the key file's record if it was written, and the public key
/// file's record if it was (or why it was not). A key file written with a public key file that
/// failed keeps its record: the file is ours either way.
pub(super) struct Placed {
    pub record: Option<FileRecord>,
    pub public: Result<Option<PublicRecord>, Cause>,
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

/// Check, write the key file where asked, and write its public key file where asked.
pub(super) fn carry_out(
    job: &Job,
    key: keys::PrivateKey,
    remote: Option<&BTreeMap<String, KeypairInfo>>,
    state_dir: &Path,
) -> Result<Placed, Cause> {
    if let Some(expect) = &job.expect
        && *expect != key.fingerprint_sha256()
    {
        return Err(Cause::PublicRotated(display_public(&job.key)));
    }
    let public = job.public.then(|| key.public_openssh());
    let record = if job.key_file {
        Some(place(job, key, remote, state_dir)?)
    } else {
        verify_listed(&job.key.spec.name, &key, remote)?;
        None
    };
    let public = match public {
        Some(line) => place_public(job, &line).map(Some),
        None => Ok(None),
    };
    Ok(Placed { record, public })
}

/// Verify against the listing, encrypt where asked, and write one key.
fn place(
    job: &Job,
    key: keys::PrivateKey,
    remote: Option<&BTreeMap<String, KeypairInfo>>,
    state_dir: &Path,
) -> Result<FileRecord, Cause> {
    let (spec, want) = (&job.key.spec, &job.key.want);
    verify_listed(&spec.name, &key, remote)?;
    // Kept in the state so a later listing can show a rotation.
    let fingerprint = Some(key.fingerprint_sha256());
    let bytes = match &spec.encryption {
        Some(enc) => {
            encrypt::encrypt(key.normalised(), enc).map_err(|e| Cause::Encrypt(Arc::new(e)))?
        }
        None => key.into_normalised(),
    };
    let sha256 = observe::sha256_of(bytes.expose());
    // Durable before the rename: a crash after it leaves a file the next start knows is ours.
    let intent = state::journal::Intent {
        key: spec.name.clone(),
        path: want.path.clone(),
        sha256: sha256.clone(),
        fingerprint: fingerprint.clone(),
        recipients: want.recipients.clone(),
    };
    state::journal::record(state_dir, &intent).map_err(|e| Cause::Journal {
        path: want.path.clone(),
        journal: state_dir.join(state::journal::JOURNAL_FILE),
        source: Arc::new(e),
    })?;
    write::write_atomic(
        &want.path,
        bytes.expose(),
        want.meta,
        prior(job.seen.as_deref()),
    )
    .map_err(Cause::of_write)?;
    Ok(FileRecord {
        path: want.path.clone(),
        sha256,
        written_at: state::now_rfc3339(),
        recipients: want.recipients.clone(),
        fingerprint,
        public_key: None,
        stat: None,
    })
}

/// Write the public half of the key beside it, mode 0644, owner and group as the key's. The
/// line is `type base64 name`.
fn place_public(job: &Job, line: &str) -> Result<PublicRecord, Cause> {
    let Some(path) = &job.key.want.public_key else {
        unreachable!("only jobs for keys with public_key write one");
    };
    let text = format!("{line} {}\n", job.key.spec.name);
    let meta = FileMeta {
        mode: plan::PUBLIC_MODE,
        ..job.key.want.meta
    };
    write::write_atomic(
        path,
        text.as_bytes(),
        meta,
        prior(job.public_seen.as_deref()),
    )
    .map_err(Cause::of_write)?;
    Ok(PublicRecord {
        path: path.clone(),
        sha256: observe::sha256_of(text.as_bytes()),
        stat: None,
    })
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
