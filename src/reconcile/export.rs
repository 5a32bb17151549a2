//! Export the keys a pass needs, in batches of at most 10, and place each batch's keys (on a
//! blocking thread) as soon as its zip arrives. `concurrency` permits bound the export calls in
//! flight and cover the call only: while one batch is being placed, the next ones are already
//! being exported, so a full sync runs at the round-trip limit.
//!
//! Invariants: at most `2 x concurrency` batches exist at once (exporting, or exported and
//! being placed), so memory stays bounded whatever the number of keys, and a disk slower than
//! the exports holds back new calls instead of piling up exported keys; once the shutdown token
//! is cancelled, nothing new is exported or written (the file being written is finished),
//! exports in flight are dropped, and the keys not placed have no outcome (the report says the
//! pass was interrupted); the state is saved at least every second while writing, off the
//! pipeline (one save at a time), so a crash loses at most a second of records, and the intent
//! journal keeps even those.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::outcome::{Cause, PassError};
use super::place::{Placed, check_listing, place_batch};
use super::planned::{Declared, Ledger, Planned};
use super::{PassOptions, blocking};
use crate::kps::export::{self, BatchExport, Fallback, FallbackReason};
use crate::kps::{KpsClient, Listing, MAX_BATCH};
use crate::plan::PublicChange;
use crate::state::journal::Journal;
use crate::state::{State, StateError};

/// One key to export, and what to write from it.
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
/// listing is checked (`remote`), a name it shows cannot be exported fails without a call, and
/// each batch takes its own names' entries out of it (all the archive and the checks need).
pub(super) async fn run(
    ledger: &mut Ledger,
    jobs: Vec<Job>,
    client: &Arc<KpsClient>,
    mut remote: Option<Listing>,
    concurrency: usize,
    options: &PassOptions,
) -> Result<Exported, PassError> {
    let mut exportable = Vec::with_capacity(jobs.len());
    for job in jobs {
        match remote
            .as_ref()
            .map(|r| check_listing(r, &job.key.want.name))
        {
            Some(Err(cause)) => ledger.keys[job.at].report(Err(cause)),
            _ => exportable.push(job),
        }
    }
    options.progress.set_total(exportable.len());
    let journal = Arc::new(Journal::new(&ledger.state_dir));
    let mut pending = exportable.into_iter();
    let mut pipeline = Pipeline::new(concurrency);
    let mut done = Exported::default();
    let mut fallbacks = Vec::new();
    let mut saves = Saves::new();
    loop {
        while pipeline.has_room() {
            let jobs: Vec<Job> = pending.by_ref().take(MAX_BATCH).collect();
            if jobs.is_empty() {
                break;
            }
            // Each batch takes its names' entries: the listing shrinks as the state grows.
            let listed = remote.as_mut().map(|r| {
                jobs.iter()
                    .filter_map(|j| r.remove_entry(&j.key.want.name))
                    .collect()
            });
            let batch = Batch {
                jobs,
                client: client.clone(),
                remote: listed,
                options: options.clone(),
                journal: journal.clone(),
            };
            pipeline.start(batch.export(), |(batch, exported)| batch.place(exported));
        }
        let Some(batch) = pipeline.next().await else {
            break;
        };
        fallbacks.extend(batch.fallbacks);
        done.interrupted |= batch.stopped;
        for (at, key_file, result) in batch.placed {
            ledger.settle(at, key_file, result);
        }
        saves.tick(ledger).await?;
    }
    saves.finish().await?;
    done.fallbacks = warn_fallbacks(&fallbacks);
    Ok(done)
}

/// The state's saves while keys are written: at least every second, each on a blocking thread
/// while the batches go on, one at a time (two renames of the state file in flight could land
/// out of order), and the last one awaited before the pass's own final save.
struct Saves {
    last: Instant,
    in_flight: Option<tokio::task::JoinHandle<Result<(), StateError>>>,
}

impl Saves {
    fn new() -> Saves {
        Saves {
            last: Instant::now(),
            in_flight: None,
        }
    }

    /// Start a save if a second has passed and none is in flight; report a failed one.
    async fn tick(&mut self, ledger: &Ledger) -> Result<(), StateError> {
        if self.in_flight.as_ref().is_some_and(|h| h.is_finished()) {
            self.finish().await?;
        }
        if self.in_flight.is_none() && self.last.elapsed() >= Duration::from_secs(1) {
            // Serialized here, not cloned: the bytes are smaller than a copy of the state.
            let bytes = ledger.state.to_bytes();
            let state_dir = ledger.state_dir.clone();
            self.in_flight = Some(tokio::task::spawn_blocking(move || {
                State::save_bytes(&bytes, &state_dir)
            }));
            self.last = Instant::now();
        }
        Ok(())
    }

    /// Wait for the save in flight, if any.
    async fn finish(&mut self) -> Result<(), StateError> {
        match self.in_flight.take() {
            Some(save) => save
                .await
                .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic())),
            None => Ok(()),
        }
    }
}

/// One batch's export and placing, moved into its task.
struct Batch {
    jobs: Vec<Job>,
    client: Arc<KpsClient>,
    /// The listing's entries for the batch's names, where exports are checked against it.
    remote: Option<Listing>,
    options: PassOptions,
    journal: Arc<Journal>,
}

impl Batch {
    /// The export call; `Err` when shutdown stopped it (nothing to place).
    async fn export(self) -> Result<(Batch, BatchExport), BatchDone> {
        let stopped = || BatchDone {
            stopped: true,
            ..BatchDone::default()
        };
        if self.options.stopping() {
            return Err(stopped());
        }
        let names: Vec<String> = self.jobs.iter().map(|j| j.key.want.name.clone()).collect();
        self.options.progress.batch_started();
        let exported = tokio::select! {
            exported = export::export_batch(&self.client, &names, self.remote.as_ref()) => exported,
            () = self.options.shutdown.cancelled() => return Err(stopped()),
        };
        self.options.progress.batch_done(names.len());
        Ok((self, exported))
    }

    /// Check, record and write the batch's keys, on a blocking thread.
    async fn place(self, exported: BatchExport) -> BatchDone {
        let fallbacks = exported.fallbacks;
        blocking(move || {
            let placed = place_batch(
                &self.jobs,
                exported.keys,
                self.remote.as_ref(),
                &self.journal,
                || self.options.stopping(),
            );
            BatchDone {
                placed: placed.placed,
                fallbacks,
                stopped: placed.stopped,
            }
        })
        .await
    }
}

/// The batches in flight. Each exports under one of `concurrency` permits and is placed
/// without it, so placing one batch never holds back the next export; at most
/// `2 x concurrency` batches exist at once, so memory stays bounded and a disk slower than the
/// exports holds back new calls instead of piling up exported keys.
struct Pipeline<T> {
    exports: Arc<Semaphore>,
    window: usize,
    tasks: JoinSet<T>,
}

impl<T: Send + 'static> Pipeline<T> {
    fn new(concurrency: usize) -> Pipeline<T> {
        let concurrency = concurrency.max(1);
        Pipeline {
            exports: Arc::new(Semaphore::new(concurrency)),
            window: 2 * concurrency,
            tasks: JoinSet::new(),
        }
    }

    /// Whether another batch may start.
    fn has_room(&self) -> bool {
        self.tasks.len() < self.window
    }

    /// Start a batch: `export` under a permit (`Err`: the batch ends there), then `place`.
    fn start<X, E, P, F>(&mut self, export: E, place: P)
    where
        X: Send + 'static,
        E: Future<Output = Result<X, T>> + Send + 'static,
        P: FnOnce(X) -> F + Send + 'static,
        F: Future<Output = T> + Send + 'static,
    {
        let exports = self.exports.clone();
        self.tasks.spawn(async move {
            let exported = {
                let _permit = exports.acquire_owned().await.expect("never closed");
                export.await
            };
            match exported {
                Ok(exported) => place(exported).await,
                Err(done) => done,
            }
        });
    }

    /// The next batch done, in the order they end; `None` when none is left. A panic in a
    /// batch is the caller's.
    async fn next(&mut self) -> Option<T> {
        let joined = self.tasks.join_next().await?;
        Some(joined.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic())))
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tokio::time::{Instant, sleep};

    /// Batches exporting, and batches existing (exporting, or exported and not yet placed):
    /// now and at most.
    #[derive(Default)]
    struct Count {
        exporting: (usize, usize),
        live: (usize, usize),
    }

    fn up(c: &mut (usize, usize)) {
        c.0 += 1;
        c.1 = c.1.max(c.0);
    }

    /// Run `batches` through a pipeline of `concurrency` whose exports take `export` and
    /// placings take `place`; the time it took (tokio's paused clock) and the counts.
    async fn run(batches: usize, concurrency: usize, export: u64, place: u64) -> (Duration, Count) {
        let count = Arc::new(Mutex::new(Count::default()));
        let started = Instant::now();
        let mut pipeline = Pipeline::new(concurrency);
        let mut todo = 0..batches;
        let mut done = 0;
        loop {
            while pipeline.has_room() {
                let Some(i) = todo.next() else { break };
                let (c1, c2) = (count.clone(), count.clone());
                pipeline.start(
                    async move {
                        {
                            let mut c = c1.lock().unwrap();
                            up(&mut c.exporting);
                            up(&mut c.live);
                        }
                        sleep(Duration::from_millis(export)).await;
                        c1.lock().unwrap().exporting.0 -= 1;
                        Ok::<usize, usize>(i)
                    },
                    move |i| async move {
                        sleep(Duration::from_millis(place)).await;
                        c2.lock().unwrap().live.0 -= 1;
                        i
                    },
                );
            }
            let Some(_) = pipeline.next().await else {
                break;
            };
            done += 1;
        }
        assert_eq!(done, batches);
        let count = Arc::try_unwrap(count).ok().unwrap().into_inner().unwrap();
        (started.elapsed(), count)
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_is_placed_while_the_next_ones_are_exported() {
        // 8 batches, 2 exports at a time, 100 ms each: the exports alone take 400 ms, and the
        // last batch's placing 100 ms more. Holding the permit while placing took 800 ms.
        let (took, count) = run(8, 2, 100, 100).await;
        assert_eq!(
            count.exporting.1, 2,
            "never more exports than the concurrency"
        );
        assert!(
            took >= Duration::from_millis(500) && took < Duration::from_millis(510),
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_placing_slower_than_the_exports_holds_back_new_exports() {
        // Placing takes 3 round trips: without a bound, exported batches would pile up.
        let (_, count) = run(40, 2, 100, 300).await;
        assert_eq!(count.exporting.1, 2);
        assert_eq!(
            count.live.1, 4,
            "at most 2 x concurrency batches exist at once"
        );
    }
}
