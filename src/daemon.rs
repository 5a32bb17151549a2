//! The daemon (`kps-sync run`): a first pass, then one loop that every trigger wakes, each
//! running the same [`reconcile_once`](crate::reconcile::reconcile_once) as the one-shot command
//! (the kube-runtime pattern: events only wake the loop, the interval pass is the safety net
//! because events get lost).
//!
//! [`run`] is the whole daemon as a library call, as mini-redis's `server::run(listener,
//! shutdown)`: it takes a [`DaemonConfig`], a shutdown token and a channel of reload requests,
//! and needs nothing from the command line. The binary turns SIGTERM/SIGINT into the token and
//! SIGHUP into reloads; a test hands in its own and runs the same loop in-process.
//!
//! Triggers: a manifest change (its folder is watched; debounced; only a change of content
//! counts), a reload request (re-read now), a managed file or its folder changed (drift), the
//! interval, and the retry backoff after a failed pass.
//!
//! Invariants:
//! - the manifest is read, the client built and the state lock taken in one place each
//!   (`Loaded::read`, [`take_lock`]), at start and on every reload alike;
//! - the state lock is held for the daemon's whole life: one daemon per state folder, and a
//!   cron `reconcile` waits for it, then gives up with a clear message;
//! - at most one pass runs at a time; wakes that arrive during a pass are remembered and
//!   answered by one more pass after it (which is a no-op plan when the only change was our own
//!   write, so it costs no KPS call);
//! - a manifest that does not load changes nothing: the last good manifest stays in force;
//! - shutdown finishes the file being written, starts nothing new, and [`run`] returns `Ok`
//!   within [`STOP_GRACE`];
//! - retries follow the failure's class: a transient one (429, 5xx, transport, a failed write)
//!   is retried with a doubling, jittered backoff capped at `interval`; a permanent one (not
//!   found, not hosted, frozen, conflict, mismatch) is held, not exported again, until the
//!   manifest changes, a reload, or the next `interval` pass; never a spin, never an exit;
//! - the daemon's own writes never wake it: a file event is drift only if some managed file
//!   there is no longer as the last pass left it (the bytes it recorded, the declared mode,
//!   owner and group; or still missing after a failed export);
//! - idle, the loop sleeps in `select!` until the next deadline: no polling unless
//!   `watch: poll` asks for it.

mod schedule;
mod status;
pub mod systemd;
pub mod watcher;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinError, JoinHandle};
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::kps::connect::{self, SetupError};
use crate::kps::{KpsClient, RetryPolicy};
use crate::manifest::{self, KeySpec, Manifest, ManifestError, Settings};
use crate::observe::{self, Observed};
use crate::plan::Change;
use crate::reconcile::{self, Cause, FailureClass, PassError, PassOptions, PassReport};
use crate::state::{self, State, StateError};
use systemd::Notifier;
use watcher::{Targets, Wake, Watcher};

pub use schedule::{Backoff, Debouncer, FIRST_RETRY, JITTER};
use schedule::{Schedule, sleep_until};
pub use status::{LastPass, Snapshot, Verdict, status_text, verdict};

/// After shutdown, how long the pass in flight may take to finish the file it is writing. Past
/// this, requests still waiting on KPS are dropped (no file is half-written: the writer renames
/// a complete temporary file into place or leaves the old file alone).
pub const STOP_GRACE: Duration = Duration::from_millis(1500);

/// How often `watch: poll` looks, at most (less when `interval` is shorter).
pub const POLL_EVERY: Duration = Duration::from_secs(2);

/// What the daemon is given besides its shutdown and reload inputs.
#[derive(Debug)]
pub struct DaemonConfig {
    /// The manifest as given (made absolute by [`run`]): what is read, re-read and watched.
    pub manifest_path: PathBuf,
    /// How long to wait at start for a state lock held by a one-shot `reconcile`.
    pub lock_wait: Duration,
    /// How hard the KPS client tries each request; the daemon's own retries come on top.
    pub retry: RetryPolicy,
    /// systemd's notify socket: `READY=1` after the first pass, `STATUS=`, `STOPPING=1`.
    pub notifier: Option<Notifier>,
    /// How often to send `WATCHDOG=1` (half of systemd's `WATCHDOG_USEC`), if at all.
    pub watchdog: Option<Duration>,
    /// Where to publish a [`Snapshot`] whenever a pass starts or ends.
    pub snapshots: Option<watch::Sender<Snapshot>>,
}

impl DaemonConfig {
    /// The manifest at `manifest_path`, no lock wait, the client's default retries, no systemd.
    pub fn new(manifest_path: impl Into<PathBuf>) -> DaemonConfig {
        DaemonConfig {
            manifest_path: manifest_path.into(),
            lock_wait: Duration::ZERO,
            retry: RetryPolicy::default(),
            notifier: None,
            watchdog: None,
            snapshots: None,
        }
    }
}

/// Why the daemon could not start; nothing was exported.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The manifest, the credentials or the client they call for: the caller's input is at fault.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The state lock is held by another daemon or a pass, or could not be taken.
    #[error(transparent)]
    Lock(#[from] StateError),
    /// A blocking task (reading the manifest, taking the lock) stopped abnormally.
    #[error("cannot start: {0}")]
    Task(#[from] JoinError),
    #[error(
        "cannot serve metrics on {addr} (settings.metrics_listen): {source}; pick a free port or remove the setting"
    )]
    Metrics {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

impl DaemonError {
    /// Is the input at fault (the manifest or the credentials), rather than the host's state?
    pub fn is_invalid_input(&self) -> bool {
        matches!(self, DaemonError::Load(_))
    }
}

/// Why a manifest (at start or on reload) was not put in force.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Setup(#[from] SetupError),
    /// A reload moved `state_dir` to a folder whose lock is held.
    #[error("state_dir changed: {0}")]
    StateDir(StateError),
}

/// How the daemon ended: by shutdown, after the pass in flight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stopped {
    /// Managed files restored or fixed while it ran.
    pub drift: u64,
}

/// Run the daemon until `shutdown` is cancelled; each message on `reload` re-reads the manifest
/// and runs a pass now (a closed channel just means no more reloads).
pub async fn run(
    config: DaemonConfig,
    shutdown: CancellationToken,
    reload: mpsc::Receiver<()>,
) -> Result<Stopped, DaemonError> {
    let path =
        std::path::absolute(&config.manifest_path).unwrap_or_else(|_| config.manifest_path.clone());
    let (hash, loaded) = match Loaded::read(&path, None, &config.retry).await {
        Read::Changed { hash, loaded } => (hash, loaded?),
        Read::Unreadable(e) => return Err(LoadError::Manifest(e).into()),
        Read::Stopped(e) => return Err(DaemonError::Task(e)),
        Read::Unchanged => unreachable!("nothing was seen before"),
    };
    if loaded.manifest.keys.is_empty() {
        tracing::warn!(
            "{}: no keys under `keys:`, so nothing is managed; add `name: /path` lines",
            loaded.manifest.path.display()
        );
    }
    let lock = take_lock(&loaded.manifest.settings.state_dir, config.lock_wait).await?;
    let _metrics = serve_metrics(loaded.manifest.settings.metrics_listen).await?;
    let mut daemon = Daemon::new(config, path, loaded, hash, lock, shutdown, reload);
    daemon.serve().await;
    Ok(Stopped {
        drift: daemon.drift,
    })
}

/// The state folder's lock, waiting up to `wait` for a pass that holds it.
pub async fn take_lock(state_dir: &Path, wait: Duration) -> Result<state::Lock, DaemonError> {
    let dir = state_dir.to_path_buf();
    Ok(tokio::task::spawn_blocking(move || state::lock(&dir, wait)).await??)
}

/// Aborts the metrics server when the daemon returns.
struct AbortOnDrop(Option<JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(task) = &self.0 {
            task.abort();
        }
    }
}

async fn serve_metrics(addr: Option<SocketAddr>) -> Result<AbortOnDrop, DaemonError> {
    let Some(addr) = addr else {
        return Ok(AbortOnDrop(None));
    };
    let listener = crate::metrics::bind(addr)
        .await
        .map_err(|source| DaemonError::Metrics { addr, source })?;
    tracing::info!(%addr, "serving /metrics");
    Ok(AbortOnDrop(Some(tokio::spawn(crate::metrics::serve(
        listener,
    )))))
}

/// A manifest and the client built for it: what a pass runs with.
struct Loaded {
    manifest: Arc<Manifest>,
    client: Arc<KpsClient>,
}

/// What reading the manifest found.
enum Read {
    /// Its bytes hash to what was seen last: nothing to do.
    Unchanged,
    /// New bytes (or a forced read), loaded or not.
    Changed {
        hash: [u8; 32],
        loaded: Result<Loaded, LoadError>,
    },
    /// It could not be read, or its strict modes refuse it.
    Unreadable(ManifestError),
    /// The thread reading it stopped abnormally.
    Stopped(JoinError),
}

impl Loaded {
    /// Read the manifest at `path` and, unless its bytes hash to `seen`, validate it and build
    /// its client: the one place the daemon does any of it, at start and on every reload. One
    /// read serves both the hash and the load, so what is judged is what was hashed. Off the
    /// runtime's threads: it reads files and looks up accounts.
    async fn read(path: &Path, seen: Option<[u8; 32]>, retry: &RetryPolicy) -> Read {
        let (path, retry) = (path.to_path_buf(), retry.clone());
        tokio::task::spawn_blocking(move || Loaded::read_blocking(&path, seen, retry))
            .await
            .unwrap_or_else(Read::Stopped)
    }

    fn read_blocking(path: &Path, seen: Option<[u8; 32]>, retry: RetryPolicy) -> Read {
        let bytes = match manifest::read(path) {
            Ok(bytes) => bytes,
            Err(e) => return Read::Unreadable(e),
        };
        let hash: [u8; 32] = Sha256::digest(&bytes).into();
        if seen == Some(hash) {
            return Read::Unchanged;
        }
        let loaded = manifest::load_bytes(bytes, path)
            .map_err(LoadError::from)
            .and_then(|manifest| {
                let client = connect::client_for(&manifest, retry)?;
                Ok(Loaded {
                    manifest: Arc::new(manifest),
                    client: Arc::new(client),
                })
            });
        Read::Changed { hash, loaded }
    }
}

type PassResult = Result<Result<PassReport, PassError>, JoinError>;

/// What the loop waits for; each is answered by one short handler.
enum Event {
    Shutdown,
    Reload,
    Wake(Wake),
    ManifestDue,
    PassDone(PassResult),
    PassDue,
    StopTimeout,
    Watchdog,
}

struct Daemon {
    /// The manifest as given, made absolute: what is re-read and watched.
    manifest_path: PathBuf,
    /// The last good manifest; a pass always runs with this one.
    manifest: Arc<Manifest>,
    client: Arc<KpsClient>,
    /// Hash of the manifest bytes last looked at, loaded or not: a touch, or a rewrite with the
    /// same bytes, does nothing, and a bad edit is reported once, not on every event.
    seen_hash: Option<[u8; 32]>,
    /// Held for life: one daemon per state folder.
    _lock: state::Lock,
    /// For the client of each manifest reloaded.
    retry: RetryPolicy,
    notifier: Option<Notifier>,
    watchdog: Option<Interval>,
    snapshots: Option<watch::Sender<Snapshot>>,
    watcher: Watcher,
    shutdown: CancellationToken,
    reload: mpsc::Receiver<()>,
    /// Handed to each pass and cancelled when the loop takes in the shutdown (finish the file
    /// being written, start nothing new): a token of its own, so a pass never ends by shutdown
    /// before the loop knows it is stopping, and is not taken for a failed one.
    stop_pass: CancellationToken,
    /// The pass in flight.
    running: Option<JoinHandle<Result<PassReport, PassError>>>,
    schedule: Schedule,
    /// `READY=1` was sent (after the first pass).
    ready: bool,
    passes_started: u64,
    passes_done: u64,
    /// Managed files restored or fixed since start (deleted, altered, chmod/chown'ed by others).
    drift: u64,
    backoff: Backoff,
    /// Keys whose last failure was permanent: not exported again until the manifest changes,
    /// a reload, or the next interval pass.
    held: BTreeMap<String, Cause>,
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
    fn new(
        config: DaemonConfig,
        manifest_path: PathBuf,
        loaded: Loaded,
        hash: [u8; 32],
        lock: state::Lock,
        shutdown: CancellationToken,
        reload: mpsc::Receiver<()>,
    ) -> Daemon {
        let settings = &loaded.manifest.settings;
        let watcher = Watcher::new(settings.watch, poll_every(settings));
        tracing::info!(
            manifest = %manifest_path.display(),
            keys = loaded.manifest.keys.len(),
            interval = %humantime::format_duration(settings.interval),
            watch = if watcher.is_polling() { "poll" } else { "inotify" },
            "daemon starting"
        );
        let watchdog = config.watchdog.map(|period| {
            tracing::debug!("systemd watchdog enabled");
            let mut i = tokio::time::interval(period);
            i.set_missed_tick_behavior(MissedTickBehavior::Delay);
            i
        });
        let mut daemon = Daemon {
            manifest_path,
            schedule: Schedule::new(settings.interval, settings.debounce),
            manifest: loaded.manifest,
            client: loaded.client,
            seen_hash: Some(hash),
            _lock: lock,
            retry: config.retry,
            notifier: config.notifier,
            watchdog,
            snapshots: config.snapshots,
            watcher,
            shutdown,
            reload,
            stop_pass: CancellationToken::new(),
            running: None,
            ready: false,
            passes_started: 0,
            passes_done: 0,
            drift: 0,
            backoff: Backoff::default(),
            held: BTreeMap::new(),
            drifted: BTreeSet::new(),
            settled: Vec::new(),
            last: None,
            manifest_rejected: false,
        };
        daemon.watcher.set_targets(daemon.targets());
        daemon
    }

    async fn serve(&mut self) {
        self.notify(&systemd::status("first pass running"));
        self.start_pass();
        loop {
            let event = self.next_event().await;
            if self.handle(event).await.is_break() {
                break;
            }
        }
        tracing::info!(drift = self.drift, "stopped");
    }

    /// Sleep until the next event. Every branch is cancel-safe.
    async fn next_event(&mut self) -> Event {
        let stopping = self.schedule.stop_by.is_some();
        let busy = self.running.is_some();
        let idle = !busy && !stopping;
        let pass_at = idle.then(|| self.schedule.pass_at());
        let manifest_at = self.schedule.manifest_check.deadline().filter(|_| idle);
        let watching_dog = self.watchdog.is_some();
        tokio::select! {
            () = self.shutdown.cancelled(), if !stopping => Event::Shutdown,
            () = next_reload(&mut self.reload), if !stopping => Event::Reload,
            wake = self.watcher.next(), if !stopping => Event::Wake(wake),
            () = sleep_until(manifest_at), if manifest_at.is_some() => Event::ManifestDue,
            joined = join(&mut self.running), if busy => Event::PassDone(joined),
            () = sleep_until(pass_at), if pass_at.is_some() => Event::PassDue,
            () = sleep_until(self.schedule.stop_by), if stopping => Event::StopTimeout,
            () = tick(&mut self.watchdog), if watching_dog => Event::Watchdog,
        }
    }

    async fn handle(&mut self, event: Event) -> ControlFlow<()> {
        match event {
            Event::Shutdown => return self.on_shutdown(),
            Event::Reload => self.on_reload().await,
            Event::Wake(wake) => self.on_wake(wake),
            Event::ManifestDue => self.on_manifest_due().await,
            Event::PassDone(joined) => return self.on_pass_done(joined).await,
            Event::PassDue => self.on_pass_due().await,
            Event::StopTimeout => {
                tracing::warn!("stopping without waiting for KPS requests still in flight");
                if let Some(handle) = self.running.take() {
                    handle.abort();
                }
                return ControlFlow::Break(());
            }
            Event::Watchdog => self.notify(systemd::WATCHDOG),
        }
        ControlFlow::Continue(())
    }

    fn on_shutdown(&mut self) -> ControlFlow<()> {
        tracing::info!("stopping: finishing the file being written, starting nothing new");
        self.notify(systemd::STOPPING);
        self.stop_pass.cancel();
        if self.running.is_none() {
            return ControlFlow::Break(());
        }
        self.schedule.stop_by = Some(Instant::now() + STOP_GRACE);
        ControlFlow::Continue(())
    }

    async fn on_reload(&mut self) {
        tracing::debug!("reload requested");
        if self.running.is_some() {
            self.schedule.reload = true;
        } else {
            self.reload_now().await;
        }
    }

    /// Re-read the manifest whatever its hash, release the held keys, and run a pass now.
    async fn reload_now(&mut self) {
        self.check_manifest(true).await;
        self.held.clear();
        self.schedule.force_now();
    }

    fn on_wake(&mut self, wake: Wake) {
        match wake {
            Wake::Manifest => self.schedule.manifest_check.poke(),
            Wake::Drift(path) => {
                tracing::debug!(path = %path.display(), "change seen in a managed path");
                self.drifted.insert(path);
                self.look_again();
            }
            Wake::Rescan => {
                tracing::info!("file events were lost; checking everything");
                self.schedule.manifest_check.poke();
                self.schedule.forced = true;
                self.look_again();
            }
        }
    }

    /// A pass soon, or one more after the pass in flight.
    fn look_again(&mut self) {
        if self.running.is_some() {
            self.schedule.dirty = true;
        } else {
            self.schedule.soon.poke();
        }
    }

    async fn on_manifest_due(&mut self) {
        self.schedule.manifest_check.clear();
        if self.check_manifest(false).await {
            self.held.clear();
            self.schedule.force_now();
        }
    }

    async fn on_pass_done(&mut self, joined: PassResult) -> ControlFlow<()> {
        self.running = None;
        if self.schedule.stop_by.is_some() {
            return ControlFlow::Break(());
        }
        self.passes_done += 1;
        let verdict = self.after_pass(joined);
        self.schedule_retry(verdict);
        let status = systemd::status(&self.status_text());
        if self.ready {
            self.notify(&status);
        } else {
            self.ready = true;
            self.notify(&systemd::join(&[systemd::READY, &status]));
        }
        self.rewatch();
        if std::mem::take(&mut self.schedule.reload) {
            self.reload_now().await;
        }
        if std::mem::take(&mut self.schedule.dirty) {
            self.schedule.soon.poke();
        }
        self.publish();
        ControlFlow::Continue(())
    }

    fn schedule_retry(&mut self, verdict: Verdict) {
        let interval = self.manifest.settings.interval;
        self.schedule.retry_at = match verdict {
            Verdict::Healthy => {
                self.backoff.reset();
                None
            }
            Verdict::Permanent => {
                self.backoff.reset();
                let left = self
                    .schedule
                    .next_full
                    .saturating_duration_since(Instant::now());
                tracing::info!(keys = self.held.len(), retry_in = %humantime::format_duration(left), "keys failed for a reason retrying will not fix; retrying them at the next interval or when the manifest changes");
                None
            }
            Verdict::Transient => {
                let wait = self.backoff.next(interval);
                tracing::info!(retry_in = %humantime::format_duration(wait), "the pass did not bring every key in place; retrying");
                Some(Instant::now() + wait)
            }
        };
    }

    /// After a pass: watch the folders it may have made, and with polling, look once at every
    /// key it left in place (polling takes its baseline now, so a file changed while the pass
    /// was ending would never differ from it).
    fn rewatch(&mut self) {
        self.watcher.set_targets(self.targets());
        if self.watcher.is_polling() {
            self.drifted.extend(std::mem::take(&mut self.settled));
            if !self.drifted.is_empty() {
                self.schedule.soon.poke();
            }
        }
    }

    async fn on_pass_due(&mut self) {
        self.schedule.soon.clear();
        let now = Instant::now();
        let full = now >= self.schedule.next_full;
        let retry = self.schedule.retry_at.is_some_and(|r| now >= r);
        let drifted = std::mem::take(&mut self.drifted);
        let paths = drifted.len();
        if !full && !retry && !self.schedule.forced && self.all_own_writes(drifted).await {
            tracing::debug!(paths, "file events were our own writes; no pass");
            return;
        }
        if full {
            self.held.clear();
            self.schedule.next_full = now + self.manifest.settings.interval;
        }
        self.start_pass();
    }

    fn notify(&self, message: &str) {
        if let Some(n) = &self.notifier {
            n.send(message);
        }
    }

    fn start_pass(&mut self) {
        self.schedule.retry_at = None;
        self.schedule.forced = false;
        self.passes_started += 1;
        let manifest = self.manifest.clone();
        let client = self.client.clone();
        let options = PassOptions {
            shutdown: self.stop_pass.clone(),
            held: self.held.clone(),
            ..PassOptions::default()
        };
        self.running = Some(tokio::spawn(async move {
            reconcile::reconcile_once(&manifest, &client, &options).await
        }));
        self.publish();
    }

    /// Log and count what the pass did, remember its permanent failures, and say how to retry.
    fn after_pass(&mut self, joined: PassResult) -> Verdict {
        let at = state::now_rfc3339();
        let message = match joined {
            Ok(Ok(report)) => {
                self.log_pass(&report);
                self.last = Some(LastPass::done(at, &report));
                self.remember(&report);
                return verdict(&report);
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "the pass failed");
                e.to_string()
            }
            Err(e) => {
                tracing::error!(error = %e, "the pass stopped abnormally");
                "the pass stopped abnormally; see the log".to_owned()
            }
        };
        self.last = Some(LastPass::Failed { at, message });
        Verdict::Transient
    }

    fn log_pass(&mut self, report: &PassReport) {
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
                tracing::error!(key = %o.key, path = %o.path.display(), code = %f.label(), "not in place: {f}");
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
    }

    /// The keys the pass left in place, and those to hold after a permanent failure.
    fn remember(&mut self, report: &PassReport) {
        let managed: HashSet<&str> = self.manifest.keys.iter().map(|k| k.name.as_str()).collect();
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
                Err(f) if f.class() == FailureClass::Permanent => Some((o.key.clone(), f.clone())),
                _ => None,
            })
            .collect();
    }

    /// Were the file events at `paths` all our own writes? Judged off the runtime's threads
    /// (it reads the state and hashes files); see [`all_own_writes`].
    async fn all_own_writes(&self, paths: BTreeSet<PathBuf>) -> bool {
        let manifest = self.manifest.clone();
        tokio::task::spawn_blocking(move || all_own_writes(&manifest, &paths))
            .await
            .unwrap_or(false)
    }

    fn status_text(&self) -> String {
        status_text(self.last.as_ref(), self.drift, self.manifest_rejected)
    }

    /// Tell the embedding caller, if it listens.
    fn publish(&self) {
        if let Some(tx) = &self.snapshots {
            tx.send_replace(Snapshot {
                passes_started: self.passes_started,
                passes_done: self.passes_done,
                last: self.last.clone(),
                retry_at: self.schedule.retry_at,
                next_full: Some(self.schedule.next_full),
                held: self.held.keys().cloned().collect(),
                drift: self.drift,
                manifest_rejected: self.manifest_rejected,
            });
        }
    }

    /// What to watch for the manifest in force.
    fn targets(&self) -> Targets {
        Targets::new(
            &self.manifest_path,
            watcher::resolution_chain(&self.manifest_path)
                .into_iter()
                .chain([self.manifest.path.clone()]),
            self.manifest.keys.iter().map(|k| k.path.clone()),
        )
    }

    /// Re-read the manifest if its content changed (or `force`, for a reload). `true` when a
    /// new manifest is now in force. A manifest that does not load is logged with its line and
    /// column, and the last good one stays.
    async fn check_manifest(&mut self, force: bool) -> bool {
        let seen = if force { None } else { self.seen_hash };
        let (hash, loaded) = match Loaded::read(&self.manifest_path, seen, &self.retry).await {
            Read::Changed { hash, loaded } => (hash, loaded),
            Read::Unchanged => {
                tracing::debug!("manifest touched, content unchanged");
                return false;
            }
            Read::Unreadable(e @ ManifestError::Untrusted { .. }) => {
                // Strict modes first: a manifest others could have written is not read at all.
                tracing::error!("manifest refused, the last good manifest stays in force: {e}");
                self.manifest_rejected = true;
                return false;
            }
            Read::Unreadable(e) => {
                tracing::warn!("{e}; the last good manifest stays in force");
                return false;
            }
            Read::Stopped(e) => {
                tracing::error!(error = %e, "reading the manifest stopped abnormally; the last good one stays in force");
                return false;
            }
        };
        self.seen_hash = Some(hash);
        if let Err(e) = loaded.and_then(|l| self.put_in_force(l)) {
            self.manifest_rejected = true;
            tracing::error!("manifest edit ignored, the last good manifest stays in force: {e}");
            self.notify(&systemd::status(&self.status_text()));
            return false;
        }
        self.manifest_rejected = false;
        tracing::info!(
            path = %self.manifest_path.display(),
            keys = self.manifest.keys.len(),
            "manifest loaded"
        );
        true
    }

    /// Put a loaded manifest in force, with everything that depends on it, or change nothing.
    fn put_in_force(&mut self, loaded: Loaded) -> Result<(), LoadError> {
        let new = &loaded.manifest.settings;
        let old = &self.manifest.settings;
        if new.state_dir != old.state_dir {
            // Take the new lock before letting go of the old one: never a moment without.
            self._lock =
                state::lock(&new.state_dir, Duration::ZERO).map_err(LoadError::StateDir)?;
        }
        if new.watch != old.watch {
            self.watcher = Watcher::new(new.watch, poll_every(new));
        }
        self.schedule.set_debounce(new.debounce);
        self.manifest = loaded.manifest;
        self.client = loaded.client;
        self.watcher.set_targets(self.targets());
        Ok(())
    }
}

/// Each managed file at or directly under each of `paths` must be as the last pass left it
/// (see [`as_left`]). A path that is no managed file nor its folder is drift.
fn all_own_writes(manifest: &Manifest, paths: &BTreeSet<PathBuf>) -> bool {
    if paths.is_empty() {
        return false;
    }
    let Ok(state) = State::load(&manifest.settings.state_dir) else {
        return false;
    };
    // Each managed file by its own path and by its folder's.
    let mut by_path: HashMap<&Path, Vec<&KeySpec>> = HashMap::new();
    for k in &manifest.keys {
        by_path.entry(k.path.as_path()).or_default().push(k);
        if let Some(dir) = k.path.parent() {
            by_path.entry(dir).or_default().push(k);
        }
    }
    paths.iter().all(|path| {
        by_path
            .get(path.as_path())
            .is_some_and(|keys| keys.iter().all(|k| as_left(k, &state)))
    })
}

/// Is the managed file `k` as the last pass left it: the bytes the state records with the
/// declared mode, owner and group, or still missing with no record (its export failed)?
fn as_left(k: &KeySpec, state: &State) -> bool {
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
}

fn poll_every(settings: &Settings) -> Duration {
    POLL_EVERY
        .min(settings.interval)
        .max(Duration::from_millis(50))
}

/// The next reload request; a closed channel (no sender left) never fires, so it cannot turn
/// the loop into a spin.
async fn next_reload(rx: &mut mpsc::Receiver<()>) {
    if rx.recv().await.is_none() {
        std::future::pending::<()>().await;
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

async fn join(running: &mut Option<JoinHandle<Result<PassReport, PassError>>>) -> PassResult {
    match running {
        Some(handle) => handle.await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest_hash(path: &Path) -> [u8; 32] {
        Sha256::digest(manifest::read(path).unwrap()).into()
    }

    #[test]
    fn the_manifest_hash_follows_symlinks_and_ignores_touches() {
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
        let h1 = manifest_hash(&link);
        std::fs::write(v1.join("m.yaml"), "a").unwrap();
        assert_eq!(manifest_hash(&link), h1, "same bytes, same hash");
        let tmp_link = tmp.path().join("..data_tmp");
        std::os::unix::fs::symlink("v2", &tmp_link).unwrap();
        std::fs::rename(&tmp_link, &data).unwrap();
        assert_ne!(
            manifest_hash(&link),
            h1,
            "the swap is seen through the link"
        );
    }
}
