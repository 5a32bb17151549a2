//! One pass: manifest -> plan -> export -> unpack/check -> encrypt -> write -> state -> hooks.
//! Every trigger (the one-shot command, the daemon's start, a manifest change, a file change,
//! the timer, SIGHUP) calls [`reconcile_once`] the same way.
//!
//! Invariants: a failure on one key never stops the others and never deletes or truncates a good
//! file; key bytes exist only inside `SecretBytes` between the HTTP body and the atomic writer;
//! the state is saved at least every second while writing and at the end, so a crash loses at
//! most a second of records (those files are then seen as not ours and kept, never overwritten).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::kps::export::{self, ExportError};
use crate::kps::{KeypairInfo, KpsClient, MAX_BATCH};
use crate::manifest::{KeySpec, Manifest};
use crate::observe;
use crate::plan::{self, Change, Desired, Plan};
use crate::secret::SecretBytes;
use crate::state::{self, ErrorRecord, FileRecord, PassRecord, State, StateError};
use crate::write::Prior;
use crate::{encrypt, hooks, keycheck, write};

/// Why one key is not in place after the pass.
#[derive(Debug, Clone)]
pub struct KeyFailure {
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
}

impl PassReport {
    /// All managed keys in place and every hook ran.
    pub fn is_success(&self) -> bool {
        self.failed == 0 && self.hook_failures.is_empty() && !self.interrupted
    }
}

/// A failure of the pass as a whole (nothing per key could be judged).
#[derive(Debug, thiserror::Error)]
pub enum PassError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("{0}")]
    Credentials(#[from] crate::auth::AuthError),
    #[error("cannot list key pairs in KPS (verify_remote): {0}")]
    List(crate::kps::KpsError),
}

/// Inputs of a pass besides the manifest.
#[derive(Clone, Default)]
pub struct PassOptions {
    /// Set by SIGTERM: finish the file being written, start nothing new.
    pub shutdown: Option<Arc<AtomicBool>>,
}

impl PassOptions {
    fn stopping(&self) -> bool {
        self.shutdown
            .as_ref()
            .is_some_and(|s| s.load(Ordering::Relaxed))
    }

    /// Resolves once shutdown is asked for (never without a flag), so exports still in flight
    /// are dropped and the pass saves what it wrote at once.
    async fn stopped(&self) {
        if self.shutdown.is_none() {
            return std::future::pending().await;
        }
        while !self.stopping() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Compute the plan without touching anything (used by `plan` and at the start of each pass).
pub async fn compute_plan(manifest: &Manifest) -> Result<(Plan, State), StateError> {
    let state = State::load(&manifest.settings.state_dir)?;
    let desired: Vec<Desired> = manifest.keys.iter().map(Desired::from).collect();
    let paths: std::collections::HashSet<PathBuf> = desired
        .iter()
        .map(|d| d.path.clone())
        .chain(state.files.values().map(|r| r.path.clone()))
        .collect();
    let observed = tokio::task::spawn_blocking(move || {
        observe::observe_all(paths.iter().map(PathBuf::as_path))
    })
    .await
    .expect("observe does not panic");
    let plan = plan::plan(&desired, manifest.settings.prune, &observed, &state);
    Ok((plan, state))
}

/// Run one pass. The caller holds the state lock.
pub async fn reconcile_once(
    manifest: &Manifest,
    client: &Arc<KpsClient>,
    options: &PassOptions,
) -> Result<PassReport, PassError> {
    client.auth().begin_pass().await;
    let (plan, mut state) = compute_plan(manifest).await?;
    let specs: BTreeMap<&str, &KeySpec> =
        manifest.keys.iter().map(|k| (k.name.as_str(), k)).collect();
    let mut outcomes: Vec<Outcome> = Vec::new();
    let mut to_export: Vec<(&KeySpec, Option<String>)> = Vec::new();
    let mut prunes = Vec::new();
    let mut changed: Vec<&KeySpec> = Vec::new();

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
            c if c.needs_export() => {
                to_export.push((specs[action.key.as_str()], action.seen.clone()));
                continue;
            }
            Change::FixMeta => {
                let spec = specs[action.key.as_str()];
                let seen = action.seen.as_deref().unwrap_or_default();
                outcome.result = write::fix_meta(&spec.path, Desired::from(spec).meta, seen)
                    .map_err(|e| failure("write", e.to_string()));
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
        outcomes.push(outcome);
    }

    let mut interrupted = false;
    if !to_export.is_empty() {
        client.auth().ready().await?;
        let remote = if manifest.settings.verify_remote {
            Some(listing(client).await.map_err(PassError::List)?)
        } else {
            None
        };
        let mut exportable = Vec::new();
        for (spec, seen) in to_export {
            match remote.as_ref().map(|r| check_listing(r, &spec.name)) {
                Some(Err(f)) => outcomes.push(Outcome {
                    key: spec.name.clone(),
                    path: spec.path.clone(),
                    change: plan_change(&plan, &spec.name),
                    result: Err(f),
                }),
                _ => exportable.push((spec, seen)),
            }
        }
        let remote = remote.map(Arc::new);
        let results = export_and_write(
            manifest, client, exportable, &plan, remote, options, &mut state,
        )
        .await?;
        interrupted = results.interrupted;
        for outcome in results.outcomes {
            if outcome.result.is_ok() {
                changed.push(specs[outcome.key.as_str()]);
            }
            outcomes.push(outcome);
        }
    }

    for action in prunes {
        let new_copy_failed = outcomes
            .iter()
            .any(|o| o.key == action.key && o.change.needs_export() && o.result.is_err());
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
    for outcome in &outcomes {
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
    let failed = outcomes
        .iter()
        .filter(|o| specs.contains_key(o.key.as_str()) && o.result.is_err())
        .count();
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

    // Hooks last, after the state records what was written: once per distinct argv, with
    // every changed key that shares it in KPS_SYNC_KEYS.
    let mut hook_failures = Vec::new();
    let mut by_argv: BTreeMap<&[String], Vec<&KeySpec>> = BTreeMap::new();
    for spec in changed.iter().filter(|s| !s.on_change.is_empty()) {
        by_argv.entry(&spec.on_change).or_default().push(spec);
    }
    for (argv, keys) in by_argv {
        if options.stopping() {
            break;
        }
        let names: Vec<&str> = keys.iter().map(|k| k.name.as_str()).collect();
        if let Err(e) =
            hooks::run(&names, &keys[0].path, argv, manifest.settings.hook_timeout).await
        {
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
    })
}

fn failure(code: &str, message: String) -> KeyFailure {
    KeyFailure {
        code: code.to_owned(),
        message,
    }
}

fn plan_change(plan: &Plan, key: &str) -> Change {
    plan.actions
        .iter()
        .find(|a| a.key == key && a.change.needs_export())
        .map(|a| a.change.clone())
        .unwrap_or(Change::Create)
}

async fn listing(
    client: &KpsClient,
) -> Result<BTreeMap<String, KeypairInfo>, crate::kps::KpsError> {
    Ok(client
        .list()
        .await?
        .into_iter()
        .map(|k| (k.name.clone(), k))
        .collect())
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
}

/// Export in batches of at most 10, `concurrency` in flight; each batch's keys are checked,
/// encrypted and written as soon as its zip arrives, so memory stays bounded by the batches
/// in flight.
async fn export_and_write(
    manifest: &Manifest,
    client: &Arc<KpsClient>,
    specs: Vec<(&KeySpec, Option<String>)>,
    plan: &Plan,
    remote: Option<Arc<BTreeMap<String, KeypairInfo>>>,
    options: &PassOptions,
    state: &mut State,
) -> Result<ExportResults, PassError> {
    let semaphore = Arc::new(Semaphore::new(manifest.settings.concurrency.max(1)));
    let mut tasks: JoinSet<Vec<(KeySpec, Result<FileRecord, KeyFailure>)>> = JoinSet::new();
    let mut interrupted = false;
    for chunk in specs.chunks(MAX_BATCH) {
        let chunk: Vec<(KeySpec, Option<String>)> = chunk
            .iter()
            .map(|(spec, seen)| ((*spec).clone(), seen.clone()))
            .collect();
        let semaphore = semaphore.clone();
        let remote = remote.clone();
        let options = options.clone();
        let client = client.clone();
        tasks.spawn(async move {
            let _permit = semaphore.acquire_owned().await.expect("never closed");
            if options.stopping() {
                return Vec::new();
            }
            let names: Vec<String> = chunk.iter().map(|(s, _)| s.name.clone()).collect();
            let exported = tokio::select! {
                exported = export::export_batch(&client, &names) => exported,
                () = options.stopped() => return Vec::new(),
            };
            let by_name: BTreeMap<String, (KeySpec, Option<String>)> = chunk
                .into_iter()
                .map(|(s, seen)| (s.name.clone(), (s, seen)))
                .collect();
            tokio::task::spawn_blocking(move || {
                exported
                    .into_iter()
                    .map(|(name, result)| {
                        let (spec, seen) = by_name[&name].clone();
                        if options.stopping() {
                            return (
                                spec,
                                Err(failure(
                                    "shutdown",
                                    "not written: kps-sync is stopping".into(),
                                )),
                            );
                        }
                        let record = result
                            .map_err(|e| export_failure(&e))
                            .and_then(|key| place(&spec, seen.as_deref(), key, remote.as_deref()));
                        (spec, record)
                    })
                    .collect()
            })
            .await
            .expect("placing keys does not panic")
        });
    }

    let mut outcomes = Vec::new();
    let mut last_save = Instant::now();
    while let Some(joined) = tasks.join_next().await {
        let batch = joined.expect("export task does not panic");
        if batch.is_empty() {
            interrupted = true;
        }
        for (spec, result) in batch {
            if result.as_ref().is_err_and(|f| f.code == "shutdown") {
                interrupted = true;
                continue;
            }
            let change = plan_change(plan, &spec.name);
            let result = match result {
                Ok(record) => {
                    tracing::info!(key = %spec.name, path = %spec.path.display(), action = change.word(), "wrote key");
                    state.files.insert(spec.name.clone(), record);
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
    })
}

fn export_failure(e: &ExportError) -> KeyFailure {
    failure(&e.code(), e.to_string())
}

/// Check, encrypt where asked, and write one key. Runs on a blocking thread.
fn place(
    spec: &KeySpec,
    seen: Option<&str>,
    key: SecretBytes,
    remote: Option<&BTreeMap<String, KeypairInfo>>,
) -> Result<FileRecord, KeyFailure> {
    keycheck::check_private_key(key.expose()).map_err(|e| {
        failure(
            "not-a-key",
            format!("what KPS returned for this name is not a usable private key: {e}"),
        )
    })?;
    if let Some(listed) = remote
        .and_then(|r| r.get(&spec.name))
        .and_then(|i| i.public_key.as_deref())
        && let Some(ours) = keycheck::openssh_public_key(key.expose())
        && !same_public_key(&ours, listed)
    {
        return Err(failure(
            "mismatch",
            "the exported private key does not match the public key KPS lists for this name; not written. Report it to Huawei Cloud support".into(),
        ));
    }
    let bytes = match &spec.encryption {
        Some(enc) => encrypt::encrypt(&key, enc).map_err(|e| failure("encrypt", e.to_string()))?,
        None => key,
    };
    let meta = Desired::from(spec).meta;
    let prior = match seen {
        Some(sha256) => Prior::Sha256(sha256),
        None => Prior::Absent,
    };
    write::write_atomic(&spec.path, bytes.expose(), meta, prior).map_err(|e| {
        let code = match e {
            write::WriteError::Changed { .. } | write::WriteError::Symlink { .. } => "conflict",
            _ => "write",
        };
        failure(code, e.to_string())
    })?;
    Ok(FileRecord {
        path: spec.path.clone(),
        sha256: observe::sha256_of(bytes.expose()),
        written_at: state::now_rfc3339(),
        recipients: spec.recipients_fingerprint(),
    })
}

/// Compare `type base64` ignoring comments.
fn same_public_key(a: &str, b: &str) -> bool {
    let head = |s: &str| s.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
    head(a) == head(b)
}
