//! The daemon (`kps-sync run`): a first pass, then one loop that every trigger wakes, each
//! running the same [`reconcile_once`] as the one-shot command (the kube-runtime pattern:
//! events only wake the loop, the interval pass is the safety net because events get lost).
//!
//! Triggers: a manifest change (its folder is watched; debounced; only a change of content
//! counts), SIGHUP (reload now), a managed file or its folder changed (drift), the interval,
//! and the retry backoff after a failed pass.
//!
//! Invariants:
//! - the state lock is held for the daemon's whole life: one daemon per state folder, and a
//!   cron `reconcile` waits for it, then gives up with a clear message;
//! - at most one pass runs at a time; wakes that arrive during a pass are remembered and
//!   answered by one more pass after it (which is a no-op plan when the only change was our own
//!   write, so it costs no KPS call);
//! - a manifest that does not load changes nothing: the last good manifest stays in force;
//! - SIGTERM/SIGINT set the pass's shutdown flag (finish the file being written, start nothing
//!   new) and the daemon exits 0 within [`STOP_GRACE`];
//! - retries follow the failure's class: a transient one (429, 5xx, transport, a failed write)
//!   is retried with a doubling backoff capped at `interval`; a permanent one (not found, not
//!   hosted, frozen, conflict, mismatch) is held, not exported again, until the manifest
//!   changes, SIGHUP, or the next `interval` pass; never a spin, never an exit;
//! - the daemon's own writes never wake it: a file event is drift only if some managed file
//!   there is no longer as the last pass left it (the bytes it recorded, the declared mode,
//!   owner and group; or still missing after a failed export);
//! - idle, the loop sleeps in `select!` until the next deadline: no polling unless
//!   `watch: poll` asks for it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::task::{JoinError, JoinHandle};
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::auth::Auth;
use crate::commands::{self, EXIT_FAILED, EXIT_OK};
use crate::kps::{KpsClient, RetryPolicy};
use crate::manifest::{self, Manifest, Settings};
use crate::observe::{self, Observed};
use crate::plan::Change;
use crate::reconcile::{self, FailureClass, KeyFailure, PassError, PassOptions, PassReport};
use crate::sdnotify::{self, Notifier};
use crate::state::{self, State};
use crate::watch::{Targets, Wake, Watcher};

/// After SIGTERM, how long the pass in flight may take to finish the file it is writing. Past
/// this, requests still waiting on KPS are dropped (no file is half-written: the writer renames
/// a complete temporary file into place or leaves the old file alone).
pub const STOP_GRACE: Duration = Duration::from_millis(1500);

/// First retry delay after a failed pass; doubles up to `interval`.
pub const FIRST_RETRY: Duration = Duration::from_secs(5);

/// How often `watch: poll` looks, at most (less when `interval` is shorter).
pub const POLL_EVERY: Duration = Duration::from_secs(2);

/// Run the daemon until SIGTERM or SIGINT (exit 0). Startup failures exit like `reconcile`:
/// 2 for an invalid manifest or credentials, 1 when the lock is held or signals cannot be set up.
pub async fn run(manifest_path: &Path) -> u8 {
    // Signals first, so a SIGTERM during the first pass is ours to handle.
    let signals = match Signals::new() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: cannot install signal handlers: {e}");
            return EXIT_FAILED;
        }
    };
    let given = std::path::absolute(manifest_path).unwrap_or_else(|_| manifest_path.to_path_buf());
    let seen_hash = manifest_hash(&given).ok();
    let manifest = match commands::load_manifest(&given) {
        Ok(m) => m,
        Err(code) => return code,
    };
    let client = match commands::client_for(&manifest) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let lock = match commands::take_lock(&manifest).await {
        Ok(lock) => lock,
        Err(code) => return code,
    };
    if let Some(addr) = manifest.settings.metrics_listen {
        match crate::metrics::bind(addr).await {
            Ok(listener) => {
                tracing::info!(%addr, "serving /metrics");
                tokio::spawn(crate::metrics::serve(listener));
            }
            Err(e) => {
                eprintln!(
                    "error: cannot serve metrics on {addr} (settings.metrics_listen): {e}; pick a free port or remove the setting"
                );
                return EXIT_FAILED;
            }
        }
    }
    let watcher = Watcher::new(manifest.settings.watch, poll_every(&manifest.settings));
    tracing::info!(
        manifest = %given.display(),
        keys = manifest.keys.len(),
        interval = %humantime::format_duration(manifest.settings.interval),
        watch = if watcher.is_polling() { "poll" } else { "inotify" },
        "daemon starting"
    );
    let mut daemon = Daemon {
        manifest_path: given,
        manifest: Arc::new(manifest),
        seen_hash,
        client,
        _lock: lock,
        notifier: Notifier::from_env(),
        watcher,
        shutdown: CancellationToken::new(),
        drift: 0,
        backoff: Backoff::default(),
        held: BTreeMap::new(),
        drifted: BTreeSet::new(),
        settled: Vec::new(),
        last: None,
        manifest_rejected: false,
    };
    daemon.watcher.set_targets(daemon.targets());
    daemon.serve(signals).await
}

/// SIGTERM, SIGINT and SIGHUP as streams.
struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

impl Signals {
    fn new() -> std::io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }
}

/// A signal's next delivery; a closed stream (runtime shutting down) never fires, so a `None`
/// cannot turn the loop into a spin.
async fn next_signal(sig: &mut Signal) {
    if sig.recv().await.is_none() {
        std::future::pending::<()>().await;
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

async fn tick(interval: &mut Option<Interval>) {
    match interval {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

type PassResult = Result<Result<PassReport, PassError>, JoinError>;

async fn join(running: &mut Option<JoinHandle<Result<PassReport, PassError>>>) -> PassResult {
    match running {
        Some(handle) => handle.await,
        None => std::future::pending().await,
    }
}

struct Daemon {
    /// The manifest as given on the command line, made absolute: what is re-read and watched.
    manifest_path: PathBuf,
    /// The last good manifest; a pass always runs with this one.
    manifest: Arc<Manifest>,
    /// Hash of the manifest bytes last looked at, loaded or not: a touch, or a rewrite with the
    /// same bytes, does nothing, and a bad edit is reported once, not on every event.
    seen_hash: Option<[u8; 32]>,
    client: Arc<KpsClient>,
    /// Held for life: one daemon per state folder.
    _lock: state::Lock,
    notifier: Option<Notifier>,
    watcher: Watcher,
    /// Shared with the pass in flight: SIGTERM cancels it.
    shutdown: CancellationToken,
    /// Managed files restored or fixed since start (deleted, altered, chmod/chown'ed by others).
    drift: u64,
    backoff: Backoff,
    /// Keys whose last failure was permanent: not exported again until the manifest changes,
    /// SIGHUP, or the next interval pass.
    held: BTreeMap<String, KeyFailure>,
    /// Paths file events named since the last pass; judged before a drift pass runs.
    drifted: BTreeSet<PathBuf>,
    /// Paths of the keys the last pass left in place.
    settled: Vec<PathBuf>,
    /// The last pass, for `STATUS=`.
    last: Option<LastPass>,
    /// The manifest on disk did not load; `STATUS=` says so until a good one does.
    manifest_rejected: bool,
}

impl Daemon {
    async fn serve(&mut self, mut signals: Signals) -> u8 {
        let mut running = Some(self.start_pass());
        let mut ready = false;
        // Each deadline below is `None` when nothing is pending.
        let mut next_full = Instant::now() + self.manifest.settings.interval;
        // A transient failure's retry.
        let mut retry_at: Option<Instant> = None;
        // The next pass must run whatever the file events were (SIGHUP, a new manifest, lost
        // events, a retry).
        let mut forced = false;
        let mut soon = Debouncer::new(
            self.manifest.settings.debounce,
            self.manifest.settings.debounce,
        );
        let mut manifest_check = Debouncer::manifest(self.manifest.settings.debounce);
        let mut dirty = false;
        let mut reload = false;
        let mut stop_by: Option<Instant> = None;
        let mut watchdog = sdnotify::watchdog_interval_from_env().map(|period| {
            let mut i = tokio::time::interval(period);
            i.set_missed_tick_behavior(MissedTickBehavior::Delay);
            i
        });
        if watchdog.is_some() {
            tracing::debug!("systemd watchdog enabled");
        }
        self.notify(&sdnotify::status("first pass running"));

        loop {
            let idle = running.is_none() && stop_by.is_none();
            let pass_at = idle.then(|| {
                [soon.deadline(), retry_at]
                    .into_iter()
                    .flatten()
                    .fold(next_full, Instant::min)
            });
            tokio::select! {
                _ = async {
                    tokio::select! {
                        _ = next_signal(&mut signals.term) => {},
                        _ = next_signal(&mut signals.int) => {},
                    }
                }, if stop_by.is_none() => {
                    tracing::info!("stopping: finishing the file being written, starting nothing new");
                    self.notify(sdnotify::STOPPING);
                    self.shutdown.cancel();
                    if running.is_none() {
                        break;
                    }
                    stop_by = Some(Instant::now() + STOP_GRACE);
                }
                _ = next_signal(&mut signals.hup), if stop_by.is_none() => {
                    tracing::info!("SIGHUP: reloading the manifest");
                    if running.is_some() {
                        reload = true;
                    } else {
                        self.check_manifest(true);
                        self.held.clear();
                        forced = true;
                        soon.fire_now();
                    }
                }
                wake = self.watcher.next(), if stop_by.is_none() => match wake {
                    Wake::Manifest => manifest_check.poke(),
                    Wake::Drift(path) => {
                        tracing::debug!(path = %path.display(), "change seen in a managed path");
                        self.drifted.insert(path);
                        if running.is_some() { dirty = true } else { soon.poke() }
                    }
                    Wake::Rescan => {
                        tracing::info!("file events were lost; checking everything");
                        manifest_check.poke();
                        forced = true;
                        if running.is_some() { dirty = true } else { soon.poke() }
                    }
                },
                _ = sleep_until(manifest_check.deadline()), if running.is_none() && stop_by.is_none() => {
                    manifest_check.clear();
                    if self.check_manifest(false) {
                        self.held.clear();
                        forced = true;
                        soon.fire_now();
                    }
                }
                joined = join(&mut running), if running.is_some() => {
                    running = None;
                    if stop_by.is_some() {
                        break;
                    }
                    let interval = self.manifest.settings.interval;
                    retry_at = match self.after_pass(joined) {
                        Verdict::Healthy => {
                            self.backoff.reset();
                            None
                        }
                        Verdict::Permanent => {
                            self.backoff.reset();
                            tracing::info!(keys = self.held.len(), retry_in = %humantime::format_duration(next_full.saturating_duration_since(Instant::now())), "keys failed for a reason retrying will not fix; retrying them at the next interval or when the manifest changes");
                            None
                        }
                        Verdict::Transient => {
                            let wait = self.backoff.next(interval);
                            tracing::info!(retry_in = %humantime::format_duration(wait), "the pass did not bring every key in place; retrying");
                            Some(Instant::now() + wait)
                        }
                    };
                    let status = sdnotify::status(&self.status_text());
                    if ready {
                        self.notify(&status);
                    } else {
                        ready = true;
                        self.notify(&sdnotify::join(&[sdnotify::READY, &status]));
                    }
                    // The pass may have made missing folders: watch them now.
                    self.watcher.set_targets(self.targets());
                    if self.watcher.is_polling() {
                        // Polling takes its baseline now, after the pass: a file changed while
                        // the pass was ending would never differ from it. Look once at every
                        // key the pass left in place.
                        self.drifted.extend(std::mem::take(&mut self.settled));
                        if !self.drifted.is_empty() {
                            soon.poke();
                        }
                    }
                    if std::mem::take(&mut reload) {
                        self.check_manifest(true);
                        self.held.clear();
                        forced = true;
                        soon.fire_now();
                    }
                    if std::mem::take(&mut dirty) {
                        soon.poke();
                    }
                }
                _ = sleep_until(pass_at), if pass_at.is_some() => {
                    soon.clear();
                    let now = Instant::now();
                    let full = now >= next_full;
                    let retry = retry_at.is_some_and(|r| now >= r);
                    let drifted = std::mem::take(&mut self.drifted);
                    if !full && !retry && !std::mem::take(&mut forced) && self.all_own_writes(&drifted) {
                        tracing::debug!(paths = drifted.len(), "file events were our own writes; no pass");
                        continue;
                    }
                    if full {
                        self.held.clear();
                        next_full = now + self.manifest.settings.interval;
                    }
                    retry_at = None;
                    running = Some(self.start_pass());
                }
                _ = sleep_until(stop_by), if stop_by.is_some() => {
                    tracing::warn!("stopping without waiting for KPS requests still in flight");
                    if let Some(handle) = running.take() {
                        handle.abort();
                    }
                    break;
                }
                _ = tick(&mut watchdog), if watchdog.is_some() => self.notify(sdnotify::WATCHDOG),
            }
            // Settings may have changed with a reload.
            soon.quiet = self.manifest.settings.debounce;
            soon.max_wait = self.manifest.settings.debounce;
            manifest_check.quiet = self.manifest.settings.debounce;
        }
        tracing::info!(drift = self.drift, "stopped");
        EXIT_OK
    }

    fn notify(&self, message: &str) {
        if let Some(n) = &self.notifier {
            n.send(message);
        }
    }

    fn start_pass(&self) -> JoinHandle<Result<PassReport, PassError>> {
        let manifest = self.manifest.clone();
        let client = self.client.clone();
        let options = PassOptions {
            shutdown: self.shutdown.clone(),
            held: self.held.clone(),
            ..PassOptions::default()
        };
        tokio::spawn(async move { reconcile::reconcile_once(&manifest, &client, &options).await })
    }

    /// Log and count what the pass did, remember its permanent failures, and say how to retry.
    fn after_pass(&mut self, joined: PassResult) -> Verdict {
        let at = state::now_rfc3339();
        let report = match joined {
            Ok(Ok(report)) => report,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "the pass failed");
                self.last = Some(LastPass::Failed {
                    at,
                    message: e.to_string(),
                });
                return Verdict::Transient;
            }
            Err(e) => {
                tracing::error!(error = %e, "the pass stopped abnormally");
                self.last = Some(LastPass::Failed {
                    at,
                    message: "the pass stopped abnormally; see the log".into(),
                });
                return Verdict::Transient;
            }
        };
        for o in &report.outcomes {
            let what = match &o.change {
                Change::Restore(reason) => format!("restored ({reason:?})").to_lowercase(),
                Change::FixMeta => "fixed mode/owner/group".into(),
                _ => String::new(),
            };
            if !what.is_empty() && o.result.is_ok() {
                self.drift += 1;
                tracing::warn!(key = %o.key, path = %o.path.display(), drift = self.drift, "drift: {what}");
            }
            if let Err(f) = &o.result {
                tracing::error!(key = %o.key, path = %o.path.display(), code = %f.code, "not in place: {}", f.message);
            }
        }
        for h in &report.hook_failures {
            tracing::error!("{h}");
        }
        tracing::info!(
            managed = report.managed,
            in_place = report.in_place,
            failed = report.failed,
            drift = self.drift,
            "pass done"
        );
        let failed_keys = report
            .outcomes
            .iter()
            .filter_map(|o| {
                o.result
                    .as_ref()
                    .err()
                    .map(|f| format!("{}: {}", o.key, f.code))
            })
            .collect();
        self.last = Some(LastPass::Done {
            at,
            managed: report.managed,
            in_place: report.in_place,
            failed: report.failed,
            failed_keys,
        });
        let managed: std::collections::HashSet<&str> =
            self.manifest.keys.iter().map(|k| k.name.as_str()).collect();
        self.settled = report
            .outcomes
            .iter()
            .filter(|o| o.result.is_ok() && managed.contains(o.key.as_str()))
            .map(|o| o.path.clone())
            .collect();
        self.held = report
            .outcomes
            .iter()
            .filter(|o| o.change.needs_export())
            .filter_map(|o| match &o.result {
                Err(f) if f.class == FailureClass::Permanent => Some((o.key.clone(), f.clone())),
                _ => None,
            })
            .collect();
        verdict(&report)
    }

    /// Were the file events at `paths` all our own writes? Each managed file at or directly
    /// under each path must be as the last pass left it: the bytes the state records with the
    /// declared mode, owner and group, or still missing with no record (its export failed).
    /// Anything else, or a path that is no managed file nor its folder, is drift.
    fn all_own_writes(&self, paths: &BTreeSet<PathBuf>) -> bool {
        if paths.is_empty() {
            return false;
        }
        let Ok(state) = State::load(&self.manifest.settings.state_dir) else {
            return false;
        };
        // Each managed file by its own path and by its folder's.
        let mut by_path: std::collections::HashMap<&Path, Vec<&manifest::KeySpec>> =
            std::collections::HashMap::new();
        for k in &self.manifest.keys {
            by_path.entry(k.path.as_path()).or_default().push(k);
            if let Some(dir) = k.path.parent() {
                by_path.entry(dir).or_default().push(k);
            }
        }
        paths.iter().all(|path| {
            by_path.get(path.as_path()).is_some_and(|keys| {
                keys.iter().all(|k| {
                    let recorded = state.files.get(&k.name).filter(|r| r.path == k.path);
                    match observe::observe(&k.path) {
                        Observed::Regular(f) => {
                            recorded.is_some_and(|r| r.sha256 == f.sha256)
                                && f.mode == k.mode
                                && k.owner.as_ref().is_none_or(|o| o.id == f.uid)
                                && k.group.as_ref().is_none_or(|g| g.id == f.gid)
                        }
                        Observed::Missing => recorded.is_none(),
                        _ => false,
                    }
                })
            })
        })
    }

    fn status_text(&self) -> String {
        status_text(self.last.as_ref(), self.drift, self.manifest_rejected)
    }

    /// What to watch for the manifest in force.
    fn targets(&self) -> Targets {
        Targets::new(
            &self.manifest_path,
            crate::watch::resolution_chain(&self.manifest_path)
                .into_iter()
                .chain([self.manifest.path.clone()]),
            self.manifest.keys.iter().map(|k| k.path.clone()),
        )
    }

    /// Re-read the manifest if its content changed (or `force`, for SIGHUP). `true` when a new
    /// manifest is now in force. A manifest that does not load is logged with its line and
    /// column, and the last good one stays.
    fn check_manifest(&mut self, force: bool) -> bool {
        // Strict modes first: a manifest others could have written is not read at all.
        if let Err(e) = manifest::check_trusted(&self.manifest_path) {
            tracing::error!("manifest refused, the last good manifest stays in force: {e}");
            self.manifest_rejected = true;
            return false;
        }
        // One read serves both the hash and the load, so what is judged is what was hashed.
        let bytes = match std::fs::read(&self.manifest_path) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(
                    path = %self.manifest_path.display(),
                    error = %e,
                    "cannot read the manifest; the last good one stays in force"
                );
                return false;
            }
        };
        let hash: [u8; 32] = Sha256::digest(&bytes).into();
        if !force && self.seen_hash == Some(hash) {
            tracing::debug!("manifest touched, content unchanged");
            return false;
        }
        self.seen_hash = Some(hash);
        match self.load(bytes) {
            Ok(()) => {
                self.manifest_rejected = false;
                tracing::info!(
                    path = %self.manifest_path.display(),
                    keys = self.manifest.keys.len(),
                    "manifest loaded"
                );
                true
            }
            Err(message) => {
                self.manifest_rejected = true;
                tracing::error!(
                    "manifest edit ignored, the last good manifest stays in force: {message}"
                );
                self.notify(&sdnotify::status(&self.status_text()));
                false
            }
        }
    }

    /// Load the manifest and everything that depends on it, or change nothing.
    fn load(&mut self, bytes: Vec<u8>) -> Result<(), String> {
        let text = String::from_utf8(bytes).map_err(|_| {
            format!(
                "{}: it is not UTF-8 text; save it as UTF-8 YAML",
                self.manifest_path.display()
            )
        })?;
        let manifest = manifest::load_str(&text, &self.manifest_path).map_err(|e| e.to_string())?;
        let env = |name: &str| std::env::var(name).ok();
        let auth = Auth::resolve(&manifest.kps, &env).map_err(|e| e.to_string())?;
        crate::commands::trusted_credentials(&auth).map_err(|e| e.to_string())?;
        let client = KpsClient::new(
            &manifest.kps,
            &manifest.settings,
            Arc::new(auth),
            RetryPolicy::default(),
        )?;
        let old = &self.manifest.settings;
        if manifest.settings.state_dir != old.state_dir {
            // Take the new lock before letting go of the old one: never a moment without.
            let lock = state::lock(&manifest.settings.state_dir, Duration::ZERO)
                .map_err(|e| format!("state_dir changed: {e}"))?;
            self._lock = lock;
        }
        if manifest.settings.watch != old.watch {
            self.watcher = Watcher::new(manifest.settings.watch, poll_every(&manifest.settings));
        }
        self.manifest = Arc::new(manifest);
        self.client = Arc::new(client);
        self.watcher.set_targets(self.targets());
        Ok(())
    }
}

fn poll_every(settings: &Settings) -> Duration {
    POLL_EVERY
        .min(settings.interval)
        .max(Duration::from_millis(50))
}

/// SHA-256 of the manifest's bytes, through any symlinks (a `..data` swap changes them).
pub fn manifest_hash(path: &Path) -> std::io::Result<[u8; 32]> {
    Ok(Sha256::digest(std::fs::read(path)?).into())
}

/// How the daemon follows up a pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Every key in place: next, the interval.
    Healthy,
    /// Only permanent failures: held until the manifest changes or the next interval.
    Permanent,
    /// A transient failure (or the pass itself failed): retry with backoff.
    Transient,
}

/// The follow-up a pass report calls for. Hook failures do not count: their keys are in place
/// and a retry would not run the hook again.
pub fn verdict(report: &PassReport) -> Verdict {
    let failures: Vec<&KeyFailure> = report
        .outcomes
        .iter()
        .filter_map(|o| o.result.as_ref().err())
        .collect();
    if report.interrupted
        || failures.iter().any(|f| f.class == FailureClass::Transient)
        || report.failed > failures.len()
    {
        Verdict::Transient
    } else if report.failed > 0 || !failures.is_empty() {
        Verdict::Permanent
    } else {
        Verdict::Healthy
    }
}

/// The last pass as `STATUS=` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LastPass {
    Done {
        at: String,
        managed: usize,
        in_place: usize,
        failed: usize,
        /// `key: code` for each key not in place.
        failed_keys: Vec<String>,
    },
    Failed {
        at: String,
        message: String,
    },
}

/// How many failed keys `STATUS=` names before "+N more".
const STATUS_KEYS: usize = 3;

/// The `STATUS=` text: counts, failed keys, last pass time, drift count.
pub fn status_text(last: Option<&LastPass>, drift: u64, manifest_rejected: bool) -> String {
    let mut text = match last {
        None => "first pass running".to_owned(),
        Some(LastPass::Done {
            at,
            managed,
            in_place,
            failed,
            failed_keys,
        }) => {
            let mut t = format!("{managed} managed, {in_place} in place, {failed} failed");
            if !failed_keys.is_empty() {
                let shown: Vec<&str> = failed_keys
                    .iter()
                    .take(STATUS_KEYS)
                    .map(String::as_str)
                    .collect();
                t.push_str(&format!(" ({}", shown.join(", ")));
                if failed_keys.len() > STATUS_KEYS {
                    t.push_str(&format!(", +{} more", failed_keys.len() - STATUS_KEYS));
                }
                t.push(')');
            }
            t.push_str(&format!("; last pass {at}"));
            t
        }
        Some(LastPass::Failed { at, message }) => format!("last pass failed at {at}: {message}"),
    };
    text.push_str(&format!("; drift {drift}"));
    if manifest_rejected {
        text.push_str("; manifest edit rejected, last good one in force (see log)");
    }
    text
}

/// Retry delay after failed passes: [`FIRST_RETRY`], doubling, never above `interval`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { next: FIRST_RETRY }
    }
}

impl Backoff {
    /// The delay before the next retry; doubles the one after.
    pub fn next(&mut self, cap: Duration) -> Duration {
        let wait = self.next.min(cap);
        self.next = self.next.saturating_mul(2).min(cap.max(FIRST_RETRY));
        wait
    }

    pub fn reset(&mut self) {
        *self = Backoff::default();
    }
}

/// A deadline that events push back (`quiet` after the last one) but never past `max_wait`
/// after the first, so a folder written to without pause still gets looked at.
#[derive(Debug, Clone)]
pub struct Debouncer {
    pub quiet: Duration,
    pub max_wait: Duration,
    first: Option<Instant>,
    deadline: Option<Instant>,
}

impl Debouncer {
    pub fn new(quiet: Duration, max_wait: Duration) -> Debouncer {
        Debouncer {
            quiet,
            max_wait,
            first: None,
            deadline: None,
        }
    }

    /// For the manifest: quiet time `debounce`, and at most eight of them in a row, so an editor
    /// that writes in several steps is read once, at the end.
    pub fn manifest(debounce: Duration) -> Debouncer {
        Debouncer::new(debounce, debounce * 8)
    }

    /// An event now.
    pub fn poke(&mut self) {
        let now = Instant::now();
        let first = *self.first.get_or_insert(now);
        self.deadline = Some((now + self.quiet).min(first + self.max_wait.max(self.quiet)));
    }

    /// Due immediately (SIGHUP, a new manifest).
    pub fn fire_now(&mut self) {
        let now = Instant::now();
        self.first.get_or_insert(now);
        self.deadline = Some(now);
    }

    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Acted upon: nothing pending.
    pub fn clear(&mut self) {
        self.first = None;
        self.deadline = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn backoff_doubles_from_five_seconds_to_the_interval() {
        let mut b = Backoff::default();
        let cap = Duration::from_secs(60);
        let waits: Vec<u64> = (0..6).map(|_| b.next(cap).as_secs()).collect();
        assert_eq!(waits, vec![5, 10, 20, 40, 60, 60]);
        b.reset();
        assert_eq!(b.next(cap), FIRST_RETRY);
    }

    #[test]
    fn backoff_never_exceeds_a_short_interval() {
        let mut b = Backoff::default();
        let cap = Duration::from_secs(1);
        assert_eq!(b.next(cap), cap);
        assert_eq!(b.next(cap), cap);
    }

    #[tokio::test(start_paused = true)]
    async fn debouncer_waits_for_quiet() {
        let mut d = Debouncer::new(250 * MS, 2000 * MS);
        assert_eq!(d.deadline(), None);
        let start = Instant::now();
        d.poke();
        tokio::time::advance(200 * MS).await;
        d.poke();
        assert_eq!(
            d.deadline(),
            Some(start + 450 * MS),
            "pushed back by the second event"
        );
        tokio::time::timeout(249 * MS, sleep_until(d.deadline()))
            .await
            .unwrap_err();
        tokio::time::timeout(2 * MS, sleep_until(d.deadline()))
            .await
            .unwrap();
        d.clear();
        assert_eq!(d.deadline(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn debouncer_fires_by_max_wait_under_a_steady_stream() {
        let mut d = Debouncer::new(250 * MS, 1000 * MS);
        let start = Instant::now();
        for _ in 0..20 {
            d.poke();
            tokio::time::advance(100 * MS).await;
        }
        assert_eq!(d.deadline(), Some(start + 1000 * MS));
    }

    #[tokio::test(start_paused = true)]
    async fn drift_debouncer_is_not_pushed_back() {
        // quiet == max_wait: the first change schedules the pass; more changes do not delay it.
        let mut d = Debouncer::new(250 * MS, 250 * MS);
        let start = Instant::now();
        d.poke();
        tokio::time::advance(200 * MS).await;
        d.poke();
        assert_eq!(d.deadline(), Some(start + 250 * MS));
        d.fire_now();
        assert_eq!(d.deadline(), Some(start + 200 * MS));
    }

    #[test]
    fn status_names_counts_failures_time_and_drift() {
        assert_eq!(status_text(None, 0, false), "first pass running; drift 0");
        let ok = LastPass::Done {
            at: "2025-01-02T03:04:05Z".into(),
            managed: 3,
            in_place: 3,
            failed: 0,
            failed_keys: vec![],
        };
        assert_eq!(
            status_text(Some(&ok), 2, false),
            "3 managed, 3 in place, 0 failed; last pass 2025-01-02T03:04:05Z; drift 2"
        );
        let bad = LastPass::Done {
            at: "2025-01-02T03:04:05Z".into(),
            managed: 6,
            in_place: 1,
            failed: 5,
            failed_keys: ["a: KPS.6004", "b: conflict", "c: write", "d: x", "e: y"]
                .map(String::from)
                .to_vec(),
        };
        assert_eq!(
            status_text(Some(&bad), 0, true),
            "6 managed, 1 in place, 5 failed (a: KPS.6004, b: conflict, c: write, +2 more); \
             last pass 2025-01-02T03:04:05Z; drift 0; manifest edit rejected, last good one in force (see log)"
        );
        let failed = LastPass::Failed {
            at: "T".into(),
            message: "cannot read the state file".into(),
        };
        assert_eq!(
            status_text(Some(&failed), 1, false),
            "last pass failed at T: cannot read the state file; drift 1"
        );
    }

    #[test]
    fn manifest_hash_follows_symlinks_and_ignores_touches() {
        let tmp = tempfile::tempdir().unwrap();
        let v1 = tmp.path().join("v1");
        let v2 = tmp.path().join("v2");
        std::fs::create_dir(&v1).unwrap();
        std::fs::create_dir(&v2).unwrap();
        std::fs::write(v1.join("m.yaml"), "a").unwrap();
        std::fs::write(v2.join("m.yaml"), "b").unwrap();
        let data = tmp.path().join("..data");
        std::os::unix::fs::symlink("v1", &data).unwrap();
        let link = tmp.path().join("m.yaml");
        std::os::unix::fs::symlink("..data/m.yaml", &link).unwrap();
        let h1 = manifest_hash(&link).unwrap();
        std::fs::write(v1.join("m.yaml"), "a").unwrap();
        assert_eq!(manifest_hash(&link).unwrap(), h1, "same bytes, same hash");
        let tmp_link = tmp.path().join("..data_tmp");
        std::os::unix::fs::symlink("v2", &tmp_link).unwrap();
        std::fs::rename(&tmp_link, &data).unwrap();
        assert_ne!(
            manifest_hash(&link).unwrap(),
            h1,
            "the swap is seen through the link"
        );
    }
}
