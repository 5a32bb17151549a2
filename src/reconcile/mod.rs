//! One pass: plan, then export, then place, then save, then hooks. Every trigger (the
//! one-shot command, the daemon's start, a manifest change, a file change, the timer, SIGHUP)
//! calls [`reconcile_once`] the same way.
//!
//! Where to read, in the order of the pass ([`pass`] is the flow and nothing else):
//! - `observe`: the state and every destination, read before planning;
//! - [`plan_with_listing`]: the (pure) plan, with the KPS listing when one is needed;
//! - `planned`: one [`Planned`] per key, its declaration, its action and its outcomes together
//!   from here to the report, in a [`Ledger`] with the state;
//! - `local`: what needs no export (fix-meta, adopt, forget, conflicts), which also decides
//!   what to export; afterwards, the public key files and the prunes;
//! - `export` and `place`: the batches, and each key checked, encrypted and written;
//! - `report`: errors and counts into the state and the [`PassReport`]; the hooks;
//! - `outcome`: the typed [`Cause`] of each failure, and what the pass reports.
//!
//! A pass lists KPS only when it needs to: it has keys to export (and `verify_remote` is on),
//! a file it did not write that might hold the listed key (adoption), `--check-rotation`, or a
//! last successful listing older than `settings.rotation_check`. The listing then feeds the
//! (pure) planner, which sees rotations and adoptions in it. So a pass with nothing to do
//! inside that window makes no KPS call and reads no credential.
//!
//! I/O placement: the pass is async because its exports and hooks are, but its filesystem
//! work (the observation, the state's saves, the journal, fix-meta, adoption, placing each key,
//! prune) runs on blocking threads through `spawn_blocking`, never on the runtime's workers:
//! a slow disk or an fsync never stalls the HTTP calls, the daemon's signals or its watchdog.
//! The [`Ledger`] is owned so that it can be moved onto a blocking thread and back; a save
//! writes a copy of the state. A fully synchronous pass was the alternative; it would need a
//! runtime inside it for the exports, and the daemon would lose its responsiveness during it.
//!
//! Shutdown is the caller's [`CancellationToken`]: once cancelled, the file being written is
//! finished, no new export or write starts, exports in flight are dropped, hooks not yet run
//! are skipped, and what was written is saved.
//!
//! Invariants: a failure on one key never stops the others and never deletes or truncates a good
//! file; key bytes exist only in zeroizing buffers (`SecretBytes`, `keys::PrivateKey`) between
//! the HTTP body and the atomic writer; no key is written before the state folder proved
//! writable in this pass; the state is saved at least every second while writing and at the
//! end, so a crash loses at most a second of records (and the intent journal keeps even those).

mod export;
mod local;
mod observe;
mod outcome;
mod place;
mod planned;
mod report;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Instant, SystemTime};

use tokio_util::sync::CancellationToken;

use crate::kps::{Class, KpsClient, KpsError, Listing};
use crate::manifest::Manifest;
use crate::plan::Plan;
use crate::state::{self, State, StateError};

pub use observe::Observation;
pub use outcome::{
    Cause, FailureClass, ListingError, Outcome, PassError, PassReport, Unexportable,
};
use planned::{Ledger, Planned};

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
    pub held: BTreeMap<String, Cause>,
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
    let figures = result.as_ref().ok().map(PassReport::figures);
    crate::metrics::after_pass(manifest, figures.as_ref(), started.elapsed());
    result
}

async fn pass(
    manifest: &Manifest,
    client: &Arc<KpsClient>,
    options: &PassOptions,
) -> Result<PassReport, PassError> {
    client.auth().begin_pass().await;
    sweep_temps(manifest).await;
    let observation = Observation::read(manifest).await?;
    let listed = plan_with_listing(manifest, client, &observation, options).await?;
    let mut ledger = Ledger {
        keys: Planned::join(&manifest.keys, observation.desired, listed.plan),
        state: observation.state,
        found: observation.found,
        state_dir: manifest.settings.state_dir.clone(),
    };
    // What the plan was made from: not held through the exports.
    drop(observation.observed);
    if let Some(at) = listed.at {
        ledger.state.last_listing = Some(humantime::format_rfc3339_seconds(at).to_string());
    }
    // A state folder that cannot be written fails the pass before any key is, so no key is
    // ever written without its record.
    if ledger.keys.iter().any(|k| k.action.is_pending()) {
        save(&ledger.state, &ledger.state_dir).await?;
    }
    let held = options.held.clone();
    let (mut ledger, jobs) = blocking(move || {
        let jobs = ledger.apply_local(&held);
        (ledger, jobs)
    })
    .await;
    let mut exported = export::Exported::default();
    if !jobs.is_empty() {
        client.auth().ready().await?;
        // The listing checks exports only where asked (a rotation check may have listed).
        let remote = listed.remote.filter(|_| manifest.settings.verify_remote);
        let concurrency = manifest.settings.concurrency;
        exported = export::run(&mut ledger, jobs, client, remote, concurrency, options).await?;
    }
    let stopping = options.stopping();
    let mut ledger = blocking(move || {
        ledger.public_files();
        if !stopping {
            ledger.prune();
        }
        ledger
    })
    .await;
    let mut report = ledger.tally(manifest.keys.len());
    end_pass(std::mem::take(&mut ledger.state), &ledger.state_dir).await?;
    clear_journal(&ledger.state_dir).await;
    report.hook_failures =
        report::run_hooks(&ledger.keys, &manifest.settings, || options.stopping()).await;
    report.interrupted = exported.interrupted;
    report.fallbacks = exported.fallbacks;
    report.listing_error = listed.error;
    Ok(report)
}

/// The plan, and the listing it was made with if the pass had to list.
struct Listed {
    plan: Plan,
    remote: Option<Listing>,
    /// When the listing was asked for; `None` when the pass did not list (or could not).
    at: Option<SystemTime>,
    /// The pass had to list and could not: it goes on without the listing.
    error: Option<ListingError>,
}

/// Plan without a listing, list KPS if that plan (or the cadence) calls for it, and plan
/// again with the listing. A listing that fails costs this pass its rotation check, adoptions
/// and the check of exports against it, never the exports themselves; one that KPS refuses
/// for the credentials fails the pass, as every other call would.
async fn plan_with_listing(
    manifest: &Manifest,
    client: &KpsClient,
    observation: &Observation,
    options: &PassOptions,
) -> Result<Listed, PassError> {
    let unlisted = observation.plan(manifest, None);
    let started = SystemTime::now();
    let Some(why) =
        observation.listing_reason(manifest, &unlisted, options.check_rotation, started)
    else {
        return Ok(Listed {
            plan: unlisted,
            remote: None,
            at: None,
            error: None,
        });
    };
    client.auth().ready().await?;
    let (remote, error) = match list(client, why).await {
        Ok(listing) => (listing, None),
        Err(e) if matches!(e.class, Class::Unauthorized | Class::Credentials) => {
            return Err(PassError::Unauthorized(e));
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot list KPS key pairs; going on without the listing this pass");
            (None, Some(ListingError(e)))
        }
    };
    let plan = match &remote {
        Some(listing) => observation.plan(manifest, Some(listing)),
        None => unlisted,
    };
    Ok(Listed {
        plan,
        at: remote.as_ref().map(|_| started),
        remote,
        error,
    })
}

/// A killed pass may have left temporary files; this pass holds the lock, so none is live.
async fn sweep_temps(manifest: &Manifest) {
    let folders: BTreeSet<PathBuf> = manifest
        .keys
        .iter()
        .filter_map(|k| k.path.parent().map(Path::to_path_buf))
        .chain([manifest.settings.state_dir.clone()])
        .collect();
    blocking(move || state::journal::sweep_temps(folders.iter().map(PathBuf::as_path))).await;
}

/// Save the state (a copy of it, on a blocking thread).
/// Serialized here rather than cloned: a copy of a 10,000-record state costs more memory than
/// its bytes, which the save needs anyway.
async fn save(state: &State, state_dir: &Path) -> Result<(), StateError> {
    let (bytes, state_dir) = (state.to_bytes(), state_dir.to_path_buf());
    blocking(move || State::save_bytes(&bytes, &state_dir)).await
}

/// Save the state at the end of the pass if anything in it changed (see `State::end_pass`).
/// First the journal is folded in once more: a file this pass renamed into place but could not
/// record (its folder's `fsync` failed after the rename) is still ours, and the journal that
/// says so is about to be removed.
async fn end_pass(mut state: State, state_dir: &Path) -> Result<bool, StateError> {
    let state_dir = state_dir.to_path_buf();
    blocking(move || {
        state::journal::fold(&mut state, &state_dir);
        state.end_pass(&state_dir)
    })
    .await
}

/// Every intent is now a record in the saved state, or matches nothing on disk (its write
/// failed before the rename).
async fn clear_journal(state_dir: &Path) {
    let state_dir = state_dir.to_path_buf();
    if let Err(e) = blocking(move || state::journal::clear(&state_dir)).await {
        tracing::warn!(error = %e, "cannot remove the intent journal; it is read again on the next start");
    }
}

/// Run filesystem work on a blocking thread, off the runtime's workers; a panic there is
/// the caller's.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::journal::{Intent, JOURNAL_FILE, Journal};

    #[tokio::test]
    async fn a_file_renamed_into_place_but_not_recorded_is_claimed_before_the_journal_goes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let key = dir.join("a.pem");
        std::fs::write(&key, b"published").unwrap();
        Journal::new(dir)
            .record(&[Intent {
                key: "a".into(),
                path: key.clone(),
                sha256: crate::observe::sha256_of(b"published"),
                fingerprint: None,
                recipients: None,
            }])
            .unwrap();
        // The pass's state lacks the record, as when the folder's sync failed after the rename.
        assert!(end_pass(State::new(), dir).await.unwrap(), "saved");
        clear_journal(dir).await;
        assert!(!dir.join(JOURNAL_FILE).exists());
        let saved = State::load(dir).unwrap();
        assert_eq!(saved.files["a"].path, key, "the file is recorded as ours");
    }
}
