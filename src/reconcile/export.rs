//! Export the keys a pass needs, in batches of at most 10, `concurrency` in flight, and place
//! each batch's keys (on a blocking thread) as soon as its zip arrives, so memory stays bounded
//! by the batches in flight.
//!
//! Invariants: once the shutdown token is cancelled, nothing new is exported or written (the
//! file being written is finished), exports in flight are dropped, and the keys not placed have
//! no outcome (the report says the pass was interrupted); the state is saved at least every
//! second while writing, so a crash loses at most a second of records.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::outcome::{Cause, PassError};
use super::place::{Placed, carry_out, check_listing};
use super::planned::{Declared, Ledger, Planned};
use super::{PassOptions, blocking, save};
use crate::kps::export::{self, Fallback, FallbackReason};
use crate::kps::{KeypairInfo, KpsClient, MAX_BATCH};
use crate::plan::PublicChange;

/// One key to export, and what to write from it.
#[derive(Clone)]
pub(super) struct Job {
    /// The key's place in the ledger.
    pub at: usize,
    pub key: Arc<Declared>,
    /// Write the key file; `false`: only its public key file (the key file is kept).
    pub key_file: bool,
    pub seen: Option<String>,
    /// Write the public key file too.
    pub public: bool,
    pub public_seen: Option<String>,
    /// With `key_file: false`, the fingerprint the exported key must have: the key on disk.
    pub expect: Option<String>,
}

impl Job {
    pub fn new(at: usize, key: &Planned, key_file: bool, expect: Option<String>) -> Job {
        Job {
            at,
            key: key
                .declared
                .clone()
                .expect("only declared keys are exported"),
            key_file,
            seen: key.action.seen.clone(),
            public: key.action.public == Some(PublicChange::Write),
            public_seen: key.action.public_seen.clone(),
            expect,
        }
    }
}

/// What the exports did to the pass as a whole.
#[derive(Default)]
pub(super) struct Exported {
    /// Shutdown stopped them before every key was placed.
    pub interrupted: bool,
    /// Names exported one by one because the batch zip could not be used, by reason.
    pub fallbacks: BTreeMap<FallbackReason, usize>,
}

/// What one batch task hands back.
#[derive(Default)]
struct BatchDone {
    /// Each placed key's result, by its place in the ledger.
    placed: Vec<(usize, bool, Result<Placed, Cause>)>,
    fallbacks: Vec<Fallback>,
    /// Shutdown stopped the batch before all its keys were placed.
    stopped: bool,
}

/// Export `jobs` and place each key, recording what became of it in the ledger. Where the
/// listing is checked (`remote`), a name it shows cannot be exported fails without a call.
pub(super) async fn run(
    ledger: &mut Ledger,
    jobs: Vec<Job>,
    client: &Arc<KpsClient>,
    remote: Option<BTreeMap<String, KeypairInfo>>,
    concurrency: usize,
    options: &PassOptions,
) -> Result<Exported, PassError> {
    let mut exportable = Vec::with_capacity(jobs.len());
    for job in jobs {
        match remote
            .as_ref()
            .map(|r| check_listing(r, &job.key.spec.name))
        {
            Some(Err(cause)) => ledger.keys[job.at].report(Err(cause)),
            _ => exportable.push(job),
        }
    }
    options.progress.set_total(exportable.len());
    let semaphore = Arc::new(Semaphore::new(concurrency.max(1)));
    let remote = remote.map(Arc::new);
    let mut tasks: JoinSet<BatchDone> = JoinSet::new();
    for chunk in exportable.chunks(MAX_BATCH) {
        let batch = Batch {
            jobs: chunk.to_vec(),
            client: client.clone(),
            remote: remote.clone(),
            options: options.clone(),
            state_dir: ledger.state_dir.clone(),
        };
        let semaphore = semaphore.clone();
        tasks.spawn(async move {
            let _permit = semaphore.acquire_owned().await.expect("never closed");
            batch.run().await
        });
    }
    let mut done = Exported::default();
    let mut fallbacks = Vec::new();
    let mut last_save = Instant::now();
    while let Some(joined) = tasks.join_next().await {
        let batch = joined.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        fallbacks.extend(batch.fallbacks);
        done.interrupted |= batch.stopped;
        for (at, key_file, result) in batch.placed {
            ledger.settle(at, key_file, result);
        }
        if last_save.elapsed() >= Duration::from_secs(1) {
            save(&ledger.state, &ledger.state_dir).await?;
            last_save = Instant::now();
        }
    }
    done.fallbacks = warn_fallbacks(&fallbacks);
    Ok(done)
}

/// One batch's export and placing, moved into its task.
struct Batch {
    jobs: Vec<Job>,
    client: Arc<KpsClient>,
    remote: Option<Arc<BTreeMap<String, KeypairInfo>>>,
    options: PassOptions,
    state_dir: std::path::PathBuf,
}

impl Batch {
    async fn run(self) -> BatchDone {
        let stopped = BatchDone {
            stopped: true,
            ..BatchDone::default()
        };
        if self.options.stopping() {
            return stopped;
        }
        let names: Vec<String> = self.jobs.iter().map(|j| j.key.spec.name.clone()).collect();
        self.options.progress.batch_started();
        let exported = tokio::select! {
            exported = export::export_batch(&self.client, &names, self.remote.as_deref()) => exported,
            () = self.options.shutdown.cancelled() => return stopped,
        };
        self.options.progress.batch_done(names.len());
        let fallbacks = exported.fallbacks;
        blocking(move || {
            let mut done = BatchDone {
                fallbacks,
                ..BatchDone::default()
            };
            for (job, result) in self.jobs.iter().zip(exported.keys) {
                if self.options.stopping() {
                    done.stopped = true;
                    break;
                }
                let placed = result
                    .map_err(Cause::Export)
                    .and_then(|key| carry_out(job, key, self.remote.as_deref(), &self.state_dir));
                done.placed.push((job.at, job.key_file, placed));
            }
            done
        })
        .await
    }
}

impl Ledger {
    /// Record what placing one key did: its records in the state, its outcome on the key.
    fn settle(&mut self, at: usize, key_file: bool, result: Result<Placed, Cause>) {
        let key = &mut self.keys[at];
        let name = &key.action.key;
        let result = result.and_then(|placed| {
            if let Some(record) = placed.record {
                tracing::info!(key = %name, path = %record.path.display(), action = key.action.change.word(), "wrote key");
                self.state.files.insert(name.clone(), record);
            }
            if let Some(public) = placed.public? {
                tracing::info!(key = %name, path = %public.path.display(), "wrote public key file");
                if let Some(rec) = self.state.files.get_mut(name) {
                    rec.public_key = Some(public);
                }
            }
            Ok(())
        });
        key.written = key_file && result.is_ok();
        key.report(result);
    }
}

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
