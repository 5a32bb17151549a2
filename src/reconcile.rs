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

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::kps::export::{self, ExportError, Fallback, FallbackReason};
use crate::kps::{Class, KeypairInfo, KpsClient, KpsError, Listing, MAX_BATCH};
use crate::manifest::{KeySpec, Manifest};
use crate::observe::{self, Observed, ObservedFiles};
use crate::plan::{self, Action, Change, Desired, KeyFacts, Plan, PublicChange};
use crate::state::{self, ErrorRecord, FileRecord, PassRecord, PublicRecord, State, StateError};
use crate::write::{FileMeta, Prior};
use crate::{encrypt, hooks, keys, write};

/// Whether trying again soon can help; drives the daemon's retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureClass {
    /// 429, 5xx, transport, credentials that could not be fetched, a write that failed: retry
    /// with backoff.
    Transient,
    /// Not found, not hosted, frozen, conflict, not a key, mismatch, a refused archive: the
    /// same request would fail the same way; retry when the manifest changes or at `interval`.
    Permanent,
}

/// Why one key is not in place after the pass.
#[derive(Debug, Clone)]
pub struct KeyFailure {
    pub class: FailureClass,
    /// `KPS.6004`, `archive`, `not-a-key`, `write`, `conflict`, ...
    pub code: String,
    /// One line: what went wrong and what to do. Never key material.
    pub message: String,
}

/// What happened to one key (or one recorded file) in this pass.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub key: String,
    pub path: PathBuf,
    pub change: Change,
    pub result: Result<(), KeyFailure>,
}

/// The result of a pass, for output, exit codes, `STATUS=` and metrics.
#[derive(Debug, Clone, Default)]
pub struct PassReport {
    pub outcomes: Vec<Outcome>,
    /// Keys in the manifest.
    pub managed: usize,
    /// Keys in place as declared at the end of the pass.
    pub in_place: usize,
    /// Keys not in place (failed or in conflict).
    pub failed: usize,
    /// Hooks that failed (their keys are in place).
    pub hook_failures: Vec<String>,
    /// The pass stopped early for shutdown.
    pub interrupted: bool,
    /// The pass had to list KPS and could not; it went on without the listing.
    pub listing_error: Option<String>,
    /// Names exported one by one because the batch zip could not be used, by reason.
    pub fallbacks: BTreeMap<FallbackReason, usize>,
}

impl PassReport {
    /// All managed keys in place and every hook ran.
    pub fn is_success(&self) -> bool {
        self.failed == 0
            && self.hook_failures.is_empty()
            && !self.interrupted
            && self.listing_error.is_none()
    }
}

/// A failure of the pass as a whole (nothing per key could be judged).
#[derive(Debug, thiserror::Error)]
pub enum PassError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("{0}")]
    Credentials(#[from] crate::auth::AuthError),
    /// KPS refused the credentials on the listing: every other call would fail the same way.
    #[error("{0}")]
    Unauthorized(KpsError),
}

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

/// What a pass reads before it plans: the state, the destinations, and the key held by each
/// file kps-sync did not write.
pub struct Observation {
    pub state: State,
    desired: Vec<Desired>,
    observed: ObservedFiles,
    /// Adoption candidates: path -> `SHA256:` fingerprint of the key in the file (the private
    /// key at a key path, the public key at a `public_key` path).
    found: HashMap<PathBuf, String>,
    /// Some key file among them: only those need a listing to be judged (a public key file
    /// is judged against the state's fingerprint, or with its key file).
    key_candidates: bool,
}

/// Largest file read to see whether it holds a key (an RSA 16384 PEM is under 13 KiB).
const MAX_CANDIDATE: u64 = 64 << 10;

impl Observation {
    /// Read the state and look at every destination. Reads no credential, calls nothing.
    pub async fn read(manifest: &Manifest) -> Result<Observation, StateError> {
        let mut state = State::load(&manifest.settings.state_dir)?;
        // Files published just before a crash, not yet in the state: ours (see state::journal).
        state::journal::fold(&mut state, &manifest.settings.state_dir);
        let desired: Vec<Desired> = manifest.keys.iter().map(Desired::from).collect();
        // Plain keys recorded by an older version, without the fingerprint rotation needs:
        // read it from the file, once, while the file is still the one kps-sync wrote.
        let unfingerprinted: Vec<(String, PathBuf, String)> = desired
            .iter()
            .filter(|d| d.recipients.is_none())
            .filter_map(|d| {
                let rec = state.files.get(&d.name)?;
                (rec.path == d.path && rec.fingerprint.is_none() && rec.recipients.is_none())
                    .then(|| (d.name.clone(), d.path.clone(), rec.sha256.clone()))
            })
            .collect();
        let paths: HashSet<PathBuf> = desired
            .iter()
            .flat_map(|d| std::iter::once(d.path.clone()).chain(d.public_key.clone()))
            .chain(state.files.values().map(|r| r.path.clone()))
            .collect();
        // Public key files with no record of ours.
        let public_candidates: Vec<PathBuf> = desired
            .iter()
            .filter_map(|d| {
                let path = d.public_key.as_ref()?;
                let recorded = state
                    .files
                    .get(&d.name)
                    .and_then(|r| r.public_key.as_ref())
                    .is_some_and(|p| &p.path == path);
                (!recorded).then(|| path.clone())
            })
            .collect();
        // Plain destinations with no record of ours for the key: a file there may be a copy of
        // the listed key, placed by hand or by another tool.
        let candidates: Vec<PathBuf> = desired
            .iter()
            .filter(|d| d.recipients.is_none())
            .filter(|d| state.files.get(&d.name).is_none_or(|r| r.path != d.path))
            .map(|d| d.path.clone())
            .collect();
        let ours: HashSet<(PathBuf, String)> = state
            .files
            .values()
            .map(|r| (r.path.clone(), r.sha256.clone()))
            .collect();
        let (observed, found, key_candidates, backfill) = tokio::task::spawn_blocking(move || {
            let observed = observe::observe_all(paths.iter().map(PathBuf::as_path));
            let backfill: Vec<(String, String)> = unfingerprinted
                .into_iter()
                .filter_map(|(name, path, sha256)| match observed.get(&path) {
                    Some(Observed::Regular(f)) if f.sha256 == sha256 => {
                        Some((name, held_key(&path, &sha256)?))
                    }
                    _ => None,
                })
                .collect();
            let mut found: HashMap<PathBuf, String> = candidates
                .into_iter()
                .filter_map(|path| match observed.get(&path) {
                    Some(Observed::Regular(f))
                        if !ours.contains(&(path.clone(), f.sha256.clone())) =>
                    {
                        let fp = held_key(&path, &f.sha256)?;
                        Some((path, fp))
                    }
                    _ => None,
                })
                .collect();
            let key_candidates = !found.is_empty();
            for path in public_candidates {
                if let Some(Observed::Regular(f)) = observed.get(&path)
                    && let Some(fp) = held_public_key(&path, &f.sha256)
                {
                    found.insert(path, fp);
                }
            }
            (observed, found, key_candidates, backfill)
        })
        .await
        .expect("observe does not panic");
        for (name, fingerprint) in backfill {
            if let Some(rec) = state.files.get_mut(&name) {
                rec.fingerprint = Some(fingerprint);
            }
        }
        Ok(Observation {
            state,
            desired,
            observed,
            found,
            key_candidates,
        })
    }

    /// The plan, with this pass's listing if it has one.
    pub fn plan(&self, manifest: &Manifest, listing: Option<&Listing>) -> Plan {
        let keys = KeyFacts {
            listed: listing.map(|l| {
                l.iter()
                    .map(|(name, info)| (name.clone(), info.fingerprint_sha256()))
                    .collect()
            }),
            found: self.found.clone(),
        };
        plan::plan(
            &self.desired,
            manifest.settings.prune,
            &self.observed,
            &self.state,
            &keys,
        )
    }

    /// Why this pass must list KPS, judged on the plan made without a listing; `None`: it
    /// need not.
    pub fn listing_reason(
        &self,
        manifest: &Manifest,
        unlisted: &Plan,
        forced: bool,
        now: SystemTime,
    ) -> Option<&'static str> {
        if forced {
            return Some("asked for (--check-rotation)");
        }
        if manifest.keys.is_empty() {
            return None;
        }
        if manifest.settings.verify_remote && unlisted.actions.iter().any(Action::needs_export) {
            return Some("keys to export");
        }
        if self.key_candidates {
            return Some("files kps-sync did not write hold keys: adoption");
        }
        // Only a key whose fingerprint is recorded can be seen to rotate.
        let rotatable = self.desired.iter().any(|d| {
            self.state
                .files
                .get(&d.name)
                .is_some_and(|r| r.path == d.path && r.fingerprint.is_some())
        });
        if rotatable
            && self
                .state
                .listing_due(manifest.settings.rotation_check, now)
        {
            return Some("rotation check due");
        }
        None
    }
}

/// The `SHA256:` fingerprint of the private key in `path`, if it is one and still the file
/// observed (`sha256`). The bytes read are wiped.
fn held_key(path: &Path, sha256: &str) -> Option<String> {
    let (file, meta) = observe::open_regular(path).ok()?;
    if meta.len() > MAX_CANDIDATE {
        return None;
    }
    let mut bytes = zeroize::Zeroizing::new(Vec::with_capacity(meta.len() as usize));
    file.take(MAX_CANDIDATE).read_to_end(&mut bytes).ok()?;
    if observe::sha256_of(&bytes) != sha256 {
        return None;
    }
    keys::PrivateKey::parse(&bytes)
        .ok()
        .map(|key| key.fingerprint_sha256())
}

/// The `SHA256:` fingerprint of the public key line in `path`, if it holds one and is still
/// the file observed (`sha256`).
fn held_public_key(path: &Path, sha256: &str) -> Option<String> {
    const MAX_PUBLIC: u64 = 16 << 10;
    let (file, meta) = observe::open_regular(path).ok()?;
    if meta.len() > MAX_PUBLIC {
        return None;
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_PUBLIC).read_to_end(&mut bytes).ok()?;
    if observe::sha256_of(&bytes) != sha256 {
        return None;
    }
    let text = std::str::from_utf8(&bytes).ok()?;
    let mut lines = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'));
    let line = lines.next()?;
    // Exactly one key line: a file that holds more (a private key after it) is no public key
    // file, and adopting it would give it mode 0644.
    if lines.next().is_some() {
        return None;
    }
    crate::kps::public_key_fingerprint(line)
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

/// A permanent failure; see [`KeyFailure::transient`] for the others.
fn failure(code: &str, message: String) -> KeyFailure {
    KeyFailure {
        class: FailureClass::Permanent,
        code: code.to_owned(),
        message,
    }
}

impl KeyFailure {
    fn transient(code: &str, message: String) -> KeyFailure {
        KeyFailure {
            class: FailureClass::Transient,
            ..failure(code, message)
        }
    }
}

fn check_listing(remote: &BTreeMap<String, KeypairInfo>, name: &str) -> Result<(), KeyFailure> {
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

struct ExportResults {
    outcomes: Vec<Outcome>,
    interrupted: bool,
    fallbacks: BTreeMap<FallbackReason, usize>,
}

/// What one batch task hands back: each job's result, and the batch's fallbacks.
type BatchDone = (Vec<(Job, Result<Placed, KeyFailure>)>, Vec<Fallback>);

/// One warning for the whole pass, however many batches fell back: the reasons, how many
/// names each cost, and the first refusal in full.
fn warn_fallbacks(all: &[Fallback]) -> BTreeMap<FallbackReason, usize> {
    let mut counts: BTreeMap<FallbackReason, usize> = BTreeMap::new();
    for f in all {
        *counts.entry(f.reason).or_default() += f.names.len();
    }
    if let Some(first) = all.first() {
        let reasons: Vec<String> = counts
            .iter()
            .map(|(reason, n)| format!("{reason} ({n} names)"))
            .collect();
        let detail = all
            .iter()
            .find(|f| !f.detail.is_empty())
            .map_or(String::new(), |f| format!("; first refusal: {}", f.detail));
        tracing::warn!(
            reason = first.reason.as_str(),
            "keys exported one by one with the single export call because the batch zip could not be used: {}{detail}",
            reasons.join(", ")
        );
    }
    counts
}

/// One key to export, and what to write from it.
#[derive(Clone)]
struct Job {
    spec: KeySpec,
    change: Change,
    /// Write the key file; `false`: only its public key file (the key file is kept).
    key_file: bool,
    seen: Option<String>,
    /// Write the public key file too.
    public: bool,
    public_seen: Option<String>,
    /// With `key_file: false`, the fingerprint the exported key must have: the key on disk.
    expect: Option<String>,
}

impl Job {
    fn new(spec: &KeySpec, action: &Action, key_file: bool, expect: Option<String>) -> Job {
        Job {
            spec: spec.clone(),
            change: action.change.clone(),
            key_file,
            seen: action.seen.clone(),
            public: action.public == Some(PublicChange::Write),
            public_seen: action.public_seen.clone(),
            expect,
        }
    }
}

/// What one job wrote: the key file's record, and the public key file's.
struct Placed {
    record: Option<FileRecord>,
    public: Option<PublicRecord>,
}

fn display_public(spec: &KeySpec) -> String {
    spec.public_key
        .as_deref()
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

/// Carry out a public key file's change that needs no export: adopt it, or report what is in
/// the way.
fn public_key_file(
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
fn carry_out(
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

/// Export in batches of at most 10, `concurrency` in flight; each batch's keys are checked,
/// encrypted and written as soon as its zip arrives, so memory stays bounded by the batches
/// in flight.
async fn export_and_write(
    manifest: &Manifest,
    client: &Arc<KpsClient>,
    jobs: Vec<Job>,
    remote: Option<Arc<BTreeMap<String, KeypairInfo>>>,
    options: &PassOptions,
    state: &mut State,
) -> Result<ExportResults, PassError> {
    let semaphore = Arc::new(Semaphore::new(manifest.settings.concurrency.max(1)));
    let mut tasks: JoinSet<BatchDone> = JoinSet::new();
    let mut interrupted = false;
    options.progress.set_total(jobs.len());
    for chunk in jobs.chunks(MAX_BATCH) {
        let chunk: Vec<Job> = chunk.to_vec();
        let semaphore = semaphore.clone();
        let remote = remote.clone();
        let options = options.clone();
        let client = client.clone();
        let state_dir = manifest.settings.state_dir.clone();
        tasks.spawn(async move {
            let _permit = semaphore.acquire_owned().await.expect("never closed");
            if options.stopping() {
                return BatchDone::default();
            }
            let names: Vec<String> = chunk.iter().map(|j| j.spec.name.clone()).collect();
            options.progress.batch_started();
            let exported = tokio::select! {
                exported = export::export_batch(&client, &names, remote.as_deref()) => exported,
                () = options.shutdown.cancelled() => return BatchDone::default(),
            };
            options.progress.batch_done(names.len());
            let fallbacks = exported.fallbacks;
            let by_name: BTreeMap<String, Job> = chunk
                .into_iter()
                .map(|j| (j.spec.name.clone(), j))
                .collect();
            let placed = tokio::task::spawn_blocking(move || {
                exported
                    .keys
                    .into_iter()
                    .map(|(name, result)| {
                        let job = by_name[&name].clone();
                        if options.stopping() {
                            return (
                                job,
                                Err(KeyFailure::transient(
                                    "shutdown",
                                    "not written: kps-sync is stopping".into(),
                                )),
                            );
                        }
                        let placed = result
                            .map_err(|e| export_failure(&e))
                            .and_then(|key| carry_out(&job, key, remote.as_deref(), &state_dir));
                        (job, placed)
                    })
                    .collect()
            })
            .await
            .expect("placing keys does not panic");
            (placed, fallbacks)
        });
    }

    let mut outcomes = Vec::new();
    let mut fallbacks = Vec::new();
    let mut last_save = Instant::now();
    while let Some(joined) = tasks.join_next().await {
        let (batch, batch_fallbacks) = joined.expect("export task does not panic");
        fallbacks.extend(batch_fallbacks);
        if batch.is_empty() {
            interrupted = true;
        }
        for (job, result) in batch {
            if result.as_ref().is_err_and(|f| f.code == "shutdown") {
                interrupted = true;
                continue;
            }
            let Job { spec, change, .. } = job;
            let result = match result {
                Ok(placed) => {
                    if let Some(record) = placed.record {
                        tracing::info!(key = %spec.name, path = %spec.path.display(), action = change.word(), "wrote key");
                        state.files.insert(spec.name.clone(), record);
                    }
                    if let Some(public) = placed.public {
                        tracing::info!(key = %spec.name, path = %public.path.display(), "wrote public key file");
                        if let Some(rec) = state.files.get_mut(&spec.name) {
                            rec.public_key = Some(public);
                        }
                    }
                    Ok(())
                }
                Err(f) => Err(f),
            };
            outcomes.push(Outcome {
                key: spec.name.clone(),
                path: spec.path.clone(),
                change,
                result,
            });
        }
        if last_save.elapsed() >= Duration::from_secs(1) {
            state.save(&manifest.settings.state_dir)?;
            last_save = Instant::now();
        }
    }
    Ok(ExportResults {
        outcomes,
        interrupted,
        fallbacks: warn_fallbacks(&fallbacks),
    })
}

fn export_failure(e: &ExportError) -> KeyFailure {
    let class = match e {
        ExportError::Kps(k) if k.is_retryable() || k.class == crate::kps::Class::Credentials => {
            FailureClass::Transient
        }
        _ => FailureClass::Permanent,
    };
    KeyFailure {
        class,
        ..failure(&e.code(), e.to_string())
    }
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
