//! One pass: manifest -> plan -> export -> unpack/check -> encrypt -> write -> state -> hooks.
//! Every trigger (the one-shot command, the daemon's start, a manifest change, a file change,
//! the timer, SIGHUP) calls [`reconcile_once`] the same way.
//!
//! A pass lists KPS only when it needs to: it has keys to export (and `verify_remote` is on),
//! a file it did not write that might hold the listed key (adoption), `--check-rotation`, or a
//! last successful listing older than `settings.rotation_check`. The listing then feeds the
//! (pure) planner, which sees rotations and adoptions in it. So a pass with nothing to do
//! inside that window makes no KPS call and reads no credential.
//!
//! Invariants: a failure on one key never stops the others and never deletes or truncates a good
//! file; key bytes exist only in zeroizing buffers (`SecretBytes`, `keys::PrivateKey`) between the HTTP body and the atomic writer;
//! the state is saved at least every second while writing and at the end, so a crash loses at
//! most a second of records (those files are then seen as not ours and kept, never overwritten).

mod export;
mod observe;
mod outcome;
mod place;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Instant, SystemTime};

use tokio_util::sync::CancellationToken;

use crate::kps::{Class, KpsClient, KpsError, Listing};
use crate::manifest::{KeySpec, Manifest};
use crate::plan::{Change, Desired, Plan, PublicChange};
use crate::state::{self, ErrorRecord, FileRecord, PassRecord, State, StateError};
use crate::{hooks, write};

use export::{Job, export_and_write};
pub use observe::Observation;
use outcome::failure;
pub use outcome::{FailureClass, KeyFailure, Outcome, PassError, PassReport};
use place::{check_listing, display_public, public_key_file};

/// Inputs of a pass besides the manifest.
#[derive(Clone, Default)]
pub struct PassOptions {
    /// Cancelled by the caller (the daemon on SIGTERM) to stop the pass: the file being
    /// written is finished, nothing new starts, exports in flight are dropped, and what was
    /// written is saved at once. The default token is never cancelled.
    pub shutdown: CancellationToken,
    /// List KPS whatever `rotation_check` says (`reconcile --check-rotation`).
    pub check_rotation: bool,
    /// The live progress line of a `reconcile` at a terminal (off by default).
    pub progress: crate::progress::Progress,
    /// Keys not to export in this pass, with the permanent failure they keep reporting (the
    /// daemon holds them until the manifest changes or the next interval pass).
    pub held: BTreeMap<String, KeyFailure>,
}

impl PassOptions {
    fn stopping(&self) -> bool {
        self.shutdown.is_cancelled()
    }
}

/// The plan without a listing: what `status` shows. Touches nothing, calls nothing.
pub async fn compute_plan(manifest: &Manifest) -> Result<(Plan, State), StateError> {
    let observation = Observation::read(manifest).await?;
    let plan = observation.plan(manifest, None);
    Ok((plan, observation.state))
}

/// List KPS. `Ok(None)` when the credentials may not list (403): that is warned about once
/// per process, and the pass goes on without a listing.
pub async fn list(client: &KpsClient, why: &str) -> Result<Option<Listing>, KpsError> {
    static FORBIDDEN_WARNED: AtomicBool = AtomicBool::new(false);
    tracing::debug!(why, "listing KPS key pairs");
    match client.list().await {
        Ok(listing) => Ok(Some(listing)),
        Err(e) if e.status == Some(403) => {
            if !FORBIDDEN_WARNED.swap(true, Ordering::Relaxed) {
                tracing::warn!(code = %e.code_label(), request_id = ?e.request_id, "KPS refused to list key pairs (no list permission, kps:keypairs:list); going on without the listing: keys are still exported, but rotation, adoption and the check against the listing are off until the permission is granted");
            } else {
                tracing::debug!(code = %e.code_label(), "KPS still refuses to list key pairs");
            }
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Run one pass and record it in the metrics. The caller holds the state lock.
pub async fn reconcile_once(
    manifest: &Manifest,
    client: &Arc<KpsClient>,
    options: &PassOptions,
) -> Result<PassReport, PassError> {
    let started = Instant::now();
    let result = pass(manifest, client, options).await;
    crate::metrics::after_pass(manifest, result.as_ref().ok(), started.elapsed());
    result
}

async fn pass(
    manifest: &Manifest,
    client: &Arc<KpsClient>,
    options: &PassOptions,
) -> Result<PassReport, PassError> {
    client.auth().begin_pass().await;
    // A killed pass may have left temporary files; this pass holds the lock, so none is live.
    let folders: BTreeSet<PathBuf> = manifest
        .keys
        .iter()
        .filter_map(|k| k.path.parent().map(Path::to_path_buf))
        .chain([manifest.settings.state_dir.clone()])
        .collect();
    tokio::task::spawn_blocking(move || {
        state::journal::sweep_temps(folders.iter().map(PathBuf::as_path))
    })
    .await
    .expect("sweeping does not panic");
    let observation = Observation::read(manifest).await?;
    let unlisted = observation.plan(manifest, None);
    let started = SystemTime::now();
    let reason = observation.listing_reason(manifest, &unlisted, options.check_rotation, started);
    let mut listing_error = None;
    let remote = match reason {
        None => None,
        Some(why) => {
            client.auth().ready().await?;
            // A listing that fails costs this pass its rotation check, adoptions and the
            // check of exports against it, never the exports themselves.
            match list(client, why).await {
                Ok(listing) => listing,
                Err(e) if matches!(e.class, Class::Unauthorized | Class::Credentials) => {
                    return Err(PassError::Unauthorized(e));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot list KPS key pairs; going on without the listing this pass");
                    listing_error = Some(format!("cannot list KPS key pairs: {e}"));
                    None
                }
            }
        }
    };
    let plan = match &remote {
        Some(listing) => observation.plan(manifest, Some(listing)),
        None => unlisted,
    };
    let found = observation.found;
    let mut state = observation.state;
    if remote.is_some() {
        state.last_listing = Some(humantime::format_rfc3339_seconds(started).to_string());
    }
    let specs: BTreeMap<&str, &KeySpec> =
        manifest.keys.iter().map(|k| (k.name.as_str(), k)).collect();
    let mut outcomes: Vec<Outcome> = Vec::new();
    let mut to_export: Vec<Job> = Vec::new();
    let mut prunes = Vec::new();
    // Keys whose file changed, and how: their hooks run at the end.
    let mut changed: Vec<(&KeySpec, &'static str)> = Vec::new();

    // A state folder that cannot be written fails the pass before any key is, so no key is
    // ever written without its record.
    if plan.has_pending() {
        state.save(&manifest.settings.state_dir)?;
    }

    for action in &plan.actions {
        let mut outcome = Outcome {
            key: action.key.clone(),
            path: action.path.clone(),
            change: action.change.clone(),
            result: Ok(()),
        };
        match &action.change {
            c if c.needs_export() => match options.held.get(&action.key) {
                Some(held) => outcome.result = Err(held.clone()),
                None => {
                    to_export.push(Job::new(specs[action.key.as_str()], action, true, None));
                    continue;
                }
            },
            Change::FixMeta => {
                let spec = specs[action.key.as_str()];
                let seen = action.seen.as_deref().unwrap_or_default();
                outcome.result = write::fix_meta(&spec.path, Desired::from(spec).meta, seen)
                    .map_err(|e| KeyFailure::transient("write", e.to_string()));
                if outcome.result.is_ok() {
                    tracing::info!(key = %action.key, path = %action.path.display(), "fixed mode/owner/group");
                }
            }
            Change::Prune => {
                // After the exports: a key moved to a new path keeps its old file until the
                // new one is in place.
                prunes.push(action);
                continue;
            }
            Change::Adopt { fix_meta } => {
                let spec = specs[action.key.as_str()];
                let seen = action.seen.clone().unwrap_or_default();
                if *fix_meta {
                    outcome.result = write::fix_meta(&spec.path, Desired::from(spec).meta, &seen)
                        .map_err(|e| KeyFailure::transient("write", e.to_string()));
                }
                if outcome.result.is_ok() {
                    tracing::info!(key = %action.key, path = %action.path.display(), "adopted: the file holds the key KPS lists; recorded as managed, not rewritten");
                    state.files.insert(
                        action.key.clone(),
                        FileRecord {
                            path: spec.path.clone(),
                            sha256: seen,
                            written_at: state::now_rfc3339(),
                            recipients: None,
                            fingerprint: found.get(&spec.path).cloned(),
                            public_key: None,
                        },
                    );
                }
            }
            Change::Forget => state.forget(&action.key, &action.path),
            Change::Conflict(reason) => {
                outcome.result = Err(failure(
                    "conflict",
                    format!("{}: {reason}", action.path.display()),
                ));
            }
            Change::Keep | Change::Orphan => {}
            _ => unreachable!("needs_export covers the rest"),
        }
        // The key file is kept, but its public key file needs the key: export it, and check
        // it is still the key on disk before writing its public half.
        if action.public == Some(PublicChange::Write) && outcome.result.is_ok() {
            let spec = specs[action.key.as_str()];
            let expect = state
                .files
                .get(&action.key)
                .and_then(|r| r.fingerprint.clone());
            match expect {
                Some(expect) => to_export.push(Job::new(spec, action, false, Some(expect))),
                None => {
                    outcome.result = Err(failure(
                        "public-key",
                        format!(
                            "{}: the key's fingerprint is not recorded, so its public key file \
                             cannot be written without rewriting the key; remove the key file \
                             to have both written",
                            display_public(spec)
                        ),
                    ));
                }
            }
        }
        outcomes.push(outcome);
    }

    let mut interrupted = false;
    let mut fallbacks = BTreeMap::new();
    if !to_export.is_empty() {
        client.auth().ready().await?;
        // The listing checks exports only where asked (a rotation check may have listed).
        let remote = remote.filter(|_| manifest.settings.verify_remote);
        let mut exportable = Vec::new();
        for job in to_export {
            match remote.as_ref().map(|r| check_listing(r, &job.spec.name)) {
                Some(Err(f)) => outcomes.push(Outcome {
                    key: job.spec.name.clone(),
                    path: job.spec.path.clone(),
                    change: job.change.clone(),
                    result: Err(f),
                }),
                _ => exportable.push(job),
            }
        }
        let remote = remote.map(Arc::new);
        let results =
            export_and_write(manifest, client, exportable, remote, options, &mut state).await?;
        interrupted = results.interrupted;
        fallbacks = results.fallbacks;
        for outcome in results.outcomes {
            if outcome.result.is_ok() && outcome.change.needs_export() {
                changed.push((specs[outcome.key.as_str()], outcome.change.word()));
            }
            outcomes.push(outcome);
        }
    }

    // Public key files to adopt or report, now that their keys are recorded.
    for action in &plan.actions {
        if let Some(public) = &action.public {
            public_key_file(action, public, &specs, &found, &mut state, &mut outcomes);
        }
    }

    for action in prunes {
        // Any failure of the key's new copy (an export, a conflict in the way, an adoption
        // whose fix failed) keeps the old one: it may be the only copy on disk.
        let new_copy_failed = outcomes
            .iter()
            .any(|o| o.key == action.key && o.result.is_err());
        if new_copy_failed || options.stopping() {
            continue;
        }
        let seen = action.seen.as_deref().unwrap_or_default();
        let result = write::remove(&action.path, seen).map_err(|e| failure("prune", e.to_string()));
        if result.is_ok() {
            tracing::info!(key = %action.key, path = %action.path.display(), "pruned: no longer in the manifest");
            state.forget(&action.key, &action.path);
        }
        outcomes.push(Outcome {
            key: action.key.clone(),
            path: action.path.clone(),
            change: action.change.clone(),
            result,
        });
    }

    // Errors: remember the last failure per key, forget it once the key is in place.
    let now = state::now_rfc3339();
    // Successes first, so a key with one failed outcome of two keeps its error.
    let (fine, failures): (Vec<&Outcome>, Vec<&Outcome>) =
        outcomes.iter().partition(|o| o.result.is_ok());
    for outcome in fine.into_iter().chain(failures) {
        if !specs.contains_key(outcome.key.as_str()) {
            continue;
        }
        match &outcome.result {
            Ok(()) => {
                state.errors.remove(&outcome.key);
            }
            Err(f) => {
                state.errors.insert(
                    outcome.key.clone(),
                    ErrorRecord {
                        at: now.clone(),
                        message: format!("{}: {}", f.code, f.message),
                    },
                );
            }
        }
    }
    state.errors.retain(|k, _| specs.contains_key(k.as_str()));

    let managed = manifest.keys.len();
    // A key may have two outcomes (its file and its public key file): count keys.
    let failed = outcomes
        .iter()
        .filter(|o| specs.contains_key(o.key.as_str()) && o.result.is_err())
        .map(|o| o.key.as_str())
        .collect::<BTreeSet<_>>()
        .len();
    let attempted: BTreeSet<&str> = outcomes.iter().map(|o| o.key.as_str()).collect();
    let not_attempted = manifest
        .keys
        .iter()
        .filter(|k| !attempted.contains(k.name.as_str()))
        .count();
    let in_place = managed - failed - not_attempted;
    state.last_pass = Some(PassRecord {
        at: now,
        managed,
        in_place,
        failed,
    });
    state.save(&manifest.settings.state_dir)?;
    // Every intent is now a record in the saved state (or its write failed and renamed nothing).
    if let Err(e) = state::journal::clear(&manifest.settings.state_dir) {
        tracing::warn!(error = %e, "cannot remove the intent journal; it is read again on the next start");
    }

    // Hooks last, after the state records what was written: once per distinct argv, with
    // every changed key that shares it in KPS_SYNC_KEYS.
    let mut hook_failures = Vec::new();
    let mut by_argv: BTreeMap<&[String], Vec<(&KeySpec, &str)>> = BTreeMap::new();
    for (spec, action) in changed.iter().filter(|(s, _)| !s.on_change.is_empty()) {
        by_argv
            .entry(&spec.on_change)
            .or_default()
            .push((spec, action));
    }
    for (argv, keys) in by_argv {
        if options.stopping() {
            break;
        }
        let names: Vec<&str> = keys.iter().map(|(k, _)| k.name.as_str()).collect();
        let actions: Vec<&str> = keys.iter().map(|(_, a)| *a).collect();
        let settings = &manifest.settings;
        let ran = hooks::run(
            &names,
            &actions,
            &keys[0].0.path,
            argv,
            settings.hook_timeout,
            &settings.hook_env,
        )
        .await;
        crate::metrics::global().hook_run(ran.is_ok());
        if let Err(e) = ran {
            hook_failures.push(e.to_string());
        }
    }

    Ok(PassReport {
        outcomes,
        managed,
        in_place,
        failed: failed + not_attempted,
        hook_failures,
        interrupted,
        listing_error,
        fallbacks,
    })
}
