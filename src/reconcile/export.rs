//! Export the keys a pass needs, in batches, `concurrency` in flight, and place each batch's
//! keys as soon as its zip arrives, so memory stays bounded by the batches in flight.
//!
//! Invariants: placing runs on a blocking thread; once shutdown is asked for, nothing new is
//! exported or written (the file being written is finished), and the pass saves at once; the
//! state is saved at least every second while writing.
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::PassOptions;
use super::outcome::{FailureClass, KeyFailure, Outcome, PassError, failure};
use super::place::carry_out;
use crate::kps::export::{self, ExportError, Fallback, FallbackReason};
use crate::kps::{KeypairInfo, KpsClient, MAX_BATCH};
use crate::manifest::{KeySpec, Manifest};
use crate::plan::{Action, Change, PublicChange};
use crate::state::{FileRecord, PublicRecord, State};

pub(super) struct ExportResults {
    pub(super) outcomes: Vec<Outcome>,
    pub(super) interrupted: bool,
    pub(super) fallbacks: BTreeMap<FallbackReason, usize>,
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
pub(super) struct Job {
    pub(super) spec: KeySpec,
    pub(super) change: Change,
    /// Write the key file; `false`: only its public key file (the key file is kept).
    pub(super) key_file: bool,
    pub(super) seen: Option<String>,
    /// Write the public key file too.
    pub(super) public: bool,
    pub(super) public_seen: Option<String>,
    /// With `key_file: false`, the fingerprint the exported key must have: the key on disk.
    pub(super) expect: Option<String>,
}

impl Job {
    pub(super) fn new(
        spec: &KeySpec,
        action: &Action,
        key_file: bool,
        expect: Option<String>,
    ) -> Job {
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
pub(super) struct Placed {
    pub(super) record: Option<FileRecord>,
    pub(super) public: Option<PublicRecord>,
}

/// Export in batches of at most 10, `concurrency` in flight; each batch's keys are checked,
/// encrypted and written as soon as its zip arrives, so memory stays bounded by the batches
/// in flight.
pub(super) async fn export_and_write(
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
