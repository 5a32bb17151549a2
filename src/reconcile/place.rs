//! Carry out one key's change on disk: check the exported key against the listing and the
//! key on disk, encrypt it where asked, record the intent, and write it (and its public key
//! file) through the atomic writer; adopt or report a public key file that needs no export.
//!
//! Invariants: every file goes through `write`; a key file is written only after its intent
//! is durable in the journal; a failure names the path and leaves the file as it was.
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use super::export::{Job, Placed};
use super::outcome::{KeyFailure, Outcome, failure};
use crate::kps::KeypairInfo;
use crate::manifest::KeySpec;
use crate::meta::FileMeta;
use crate::observe;
use crate::plan::{self, Action, Desired, PublicChange};
use crate::state::{self, FileRecord, PublicRecord, State};
use crate::write::Prior;
use crate::{encrypt, keys, write};

pub(super) fn check_listing(
    remote: &BTreeMap<String, KeypairInfo>,
    name: &str,
) -> Result<(), KeyFailure> {
    match remote.get(name) {
        None => Err(failure(
            "KPS.6004",
            "the key pair is not in the KPS listing of this project; check the name, the region and the project id".into(),
        )),
        Some(info) if !info.is_key_protection => Err(failure(
            "KPS.6005",
            "KPS does not hold this private key (is_key_protection: false); import it into KPS or stop managing it here".into(),
        )),
        Some(info) if info.is_frozen() => Err(failure(
            "frozen",
            "the key pair is frozen in KPS; unfreeze it in the console".into(),
        )),
        Some(_) => Ok(()),
    }
}

pub(super) fn display_public(spec: &KeySpec) -> String {
    spec.public_key
        .as_deref()
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

/// Carry out a public key file's change that needs no export: adopt it, or report what is in
/// the way.
pub(super) fn public_key_file(
    action: &Action,
    public: &PublicChange,
    specs: &BTreeMap<&str, &KeySpec>,
    found: &HashMap<PathBuf, String>,
    state: &mut State,
    outcomes: &mut Vec<Outcome>,
) {
    let spec = specs[action.key.as_str()];
    let Some(path) = &spec.public_key else {
        return;
    };
    let result = match public {
        PublicChange::Write => return,
        PublicChange::Conflict(reason) => {
            Err(failure("conflict", format!("{}: {reason}", path.display())))
        }
        PublicChange::Adopt { .. }
            if state
                .files
                .get(&action.key)
                .filter(|r| r.path == spec.path)
                .and_then(|r| r.fingerprint.as_ref())
                != found.get(path) =>
        {
            // The key was not written (its failure is reported), or is not the one this file
            // holds: leave the file alone.
            return;
        }
        PublicChange::Adopt { fix_meta } => {
            let seen = action.public_seen.clone().unwrap_or_default();
            let meta = FileMeta {
                mode: plan::PUBLIC_MODE,
                ..Desired::from(spec).meta
            };
            let fixed = if *fix_meta {
                write::fix_meta(path, meta, &seen)
                    .map_err(|e| KeyFailure::transient("write", e.to_string()))
            } else {
                Ok(())
            };
            if let (Ok(()), Some(rec)) = (&fixed, state.files.get_mut(&action.key)) {
                tracing::info!(key = %action.key, path = %path.display(), "adopted the public key file: it holds the key's public half");
                rec.public_key = Some(PublicRecord {
                    path: path.clone(),
                    sha256: seen,
                });
            }
            fixed
        }
    };
    outcomes.push(Outcome {
        key: action.key.clone(),
        path: path.clone(),
        change: action.change.clone(),
        result,
    });
}

/// Write the public half of `key` beside it, mode 0644, owner and group as the key's. The
/// line is `type base64 name`.
fn place_public(
    spec: &KeySpec,
    public_seen: Option<&str>,
    line: &str,
) -> Result<PublicRecord, KeyFailure> {
    let Some(path) = &spec.public_key else {
        unreachable!("only jobs for keys with public_key write one");
    };
    let text = format!("{line} {}\n", spec.name);
    let meta = FileMeta {
        mode: plan::PUBLIC_MODE,
        ..Desired::from(spec).meta
    };
    let prior = match public_seen {
        Some(sha256) => Prior::Sha256(sha256),
        None => Prior::Absent,
    };
    write::write_atomic(path, text.as_bytes(), meta, prior).map_err(|e| {
        let code = match e {
            write::WriteError::Changed { .. } | write::WriteError::Symlink { .. } => "conflict",
            _ => "write",
        };
        failure(code, e.to_string())
    })?;
    Ok(PublicRecord {
        path: path.clone(),
        sha256: observe::sha256_of(text.as_bytes()),
    })
}

/// Check, write the key file where asked, and write its public key file where asked. Runs on
/// a blocking thread.
pub(super) fn carry_out(
    job: &Job,
    key: keys::PrivateKey,
    remote: Option<&BTreeMap<String, KeypairInfo>>,
    state_dir: &Path,
) -> Result<Placed, KeyFailure> {
    if let Some(expect) = &job.expect
        && *expect != key.fingerprint_sha256()
    {
        return Err(failure(
            "public-key",
            format!(
                "{}: KPS now holds another key for this name than the one on disk; not written. \
                 The next listing rotates the key (or run `reconcile --check-rotation`)",
                display_public(&job.spec)
            ),
        ));
    }
    let public = job.public.then(|| key.public_openssh());
    let record = if job.key_file {
        Some(place(
            &job.spec,
            job.seen.as_deref(),
            key,
            remote,
            state_dir,
        )?)
    } else {
        verify_listed(&job.spec.name, &key, remote)?;
        None
    };
    let public = match public {
        Some(line) => Some(place_public(&job.spec, job.public_seen.as_deref(), &line)?),
        None => None,
    };
    Ok(Placed { record, public })
}

/// Verify against the listing, encrypt where asked, and write one key. Runs on a blocking
/// thread. What is written is the normalised key (or its age ciphertext).
fn place(
    spec: &KeySpec,
    seen: Option<&str>,
    key: keys::PrivateKey,
    remote: Option<&BTreeMap<String, KeypairInfo>>,
    state_dir: &Path,
) -> Result<FileRecord, KeyFailure> {
    verify_listed(&spec.name, &key, remote)?;
    // Kept in the state so a later listing can show a rotation.
    let fingerprint = Some(key.fingerprint_sha256());
    let bytes = match &spec.encryption {
        Some(enc) => encrypt::encrypt(key.normalised(), enc)
            .map_err(|e| failure("encrypt", e.to_string()))?,
        None => key.into_normalised(),
    };
    let meta = Desired::from(spec).meta;
    let prior = match seen {
        Some(sha256) => Prior::Sha256(sha256),
        None => Prior::Absent,
    };
    let sha256 = observe::sha256_of(bytes.expose());
    // Durable before the rename: a crash after it leaves a file the next start knows is ours.
    state::journal::record(
        state_dir,
        &state::journal::Intent {
            key: spec.name.clone(),
            path: spec.path.clone(),
            sha256: sha256.clone(),
            fingerprint: fingerprint.clone(),
            recipients: spec.recipients_fingerprint(),
        },
    )
    .map_err(|e| {
        KeyFailure::transient(
            "write",
            format!(
                "{}: cannot record the intent to write it in {}: {e}; check state_dir's permissions and free space",
                spec.path.display(),
                state_dir.join(state::journal::JOURNAL_FILE).display()
            ),
        )
    })?;
    write::write_atomic(&spec.path, bytes.expose(), meta, prior).map_err(|e| match e {
        write::WriteError::Changed { .. } | write::WriteError::Symlink { .. } => {
            failure("conflict", e.to_string())
        }
        _ => KeyFailure::transient("write", e.to_string()),
    })?;
    Ok(FileRecord {
        path: spec.path.clone(),
        sha256,
        written_at: state::now_rfc3339(),
        recipients: spec.recipients_fingerprint(),
        fingerprint,
        public_key: None,
    })
}

/// Where KPS lists a public key or fingerprint for the name, the key must be that one.
fn verify_listed(
    name: &str,
    key: &keys::PrivateKey,
    remote: Option<&BTreeMap<String, KeypairInfo>>,
) -> Result<(), KeyFailure> {
    let Some(info) = remote.and_then(|r| r.get(name)) else {
        return Ok(());
    };
    match key.verify_listed(info.public_key.as_deref(), info.fingerprint.as_deref()) {
        Ok(keys::Verified::Unreadable) => {
            tracing::warn!(key = %name, "KPS lists a public key or fingerprint for this name that kps-sync cannot read; the key is written without that check");
            Ok(())
        }
        Ok(_) => Ok(()),
        Err(e) => Err(failure(e.code(), e.to_string())),
    }
}
