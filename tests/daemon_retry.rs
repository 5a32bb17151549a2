//! The daemon in-process (`daemon::run` with an injected shutdown token and reload channel)
//! against the fake KPS: it starts, places keys, reloads on request, stops when cancelled, and
//! its retries follow the failure's class on the schedule it promises.
//!
//! Where time is what is tested, the clock is paused and frozen (see [`Frozen`]): only the test
//! moves it, with `tokio::time::advance`, and only while the daemon is idle, so each deadline is
//! asserted exactly, and the real I/O of a pass (HTTP to the fake, file writes, inotify) takes
//! no time on the daemon's clock. The binary-level tests in tests/daemon.rs prove the signals
//! and the systemd protocol.

mod common;

use common::*;
use kps_sync::daemon::{self, DaemonConfig, DaemonError, FIRST_RETRY, JITTER, Snapshot, Stopped};
use kps_sync::kps::RetryPolicy;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Real time allowed for anything a pass does against the fake, on a loaded 2-core machine.
const DEADLINE: Duration = Duration::from_secs(30);

/// One attempt per request: the client's own backoff would wait on the frozen clock.
fn one_attempt() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 1,
        ..RetryPolicy::default()
    }
}

/// A daemon running as a task of the test's runtime.
struct InProcess {
    shutdown: CancellationToken,
    reload: mpsc::Sender<()>,
    snapshots: watch::Receiver<Snapshot>,
    task: JoinHandle<Result<Stopped, DaemonError>>,
}

impl InProcess {
    fn start(sb: &Sandbox, retry: RetryPolicy) -> InProcess {
        let (tx, snapshots) = watch::channel(Snapshot::default());
        let config = DaemonConfig {
            retry,
            snapshots: Some(tx),
            ..DaemonConfig::new(sb.path("manifest.yaml"))
        };
        let shutdown = CancellationToken::new();
        let (reload, reload_rx) = mpsc::channel(1);
        let task = tokio::spawn(daemon::run(config, shutdown.clone(), reload_rx));
        InProcess {
            shutdown,
            reload,
            snapshots,
            task,
        }
    }

    fn now(&self) -> Snapshot {
        self.snapshots.borrow().clone()
    }

    /// The snapshot once `cond` holds; fails after [`DEADLINE`] of real time.
    async fn wait(&mut self, what: &str, cond: impl FnMut(&Snapshot) -> bool) -> Snapshot {
        let waited = real_timeout(DEADLINE, async {
            self.snapshots.wait_for(cond).await.map(|s| s.clone())
        })
        .await;
        match waited {
            Some(Ok(s)) => s,
            Some(Err(_)) => panic!("the daemon ended while waiting for {what}: {:?}", self.task),
            None => panic!("timed out waiting for {what}; last {:?}", self.now()),
        }
    }

    async fn passes_done(&mut self, n: u64) -> Snapshot {
        self.wait(&format!("pass {n} done"), |s| s.passes_done >= n)
            .await
    }

    async fn stop(self) -> Stopped {
        self.shutdown.cancel();
        real_timeout(DEADLINE, self.task)
            .await
            .expect("the daemon returns once cancelled")
            .expect("the daemon task does not panic")
            .expect("the daemon stops with Ok")
    }
}

/// `fut`, or `None` after `limit` of real time, whatever the tokio clock does.
async fn real_timeout<F: std::future::Future>(limit: Duration, fut: F) -> Option<F::Output> {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let timer = std::thread::spawn(move || {
        std::thread::sleep(limit);
        let _ = tx.send(());
    });
    drop(timer);
    tokio::select! {
        out = fut => Some(out),
        _ = rx => None,
    }
}

/// Holds a blocking task for as long as it lives: tokio does not auto-advance a paused clock
/// while one runs, so the clock moves only when the test advances it.
struct Frozen(Option<std::sync::mpsc::Sender<()>>);

fn freeze_clock() -> Frozen {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    tokio::task::spawn_blocking(move || {
        let _ = rx.recv();
    });
    Frozen(Some(tx))
}

impl Drop for Frozen {
    fn drop(&mut self) {
        self.0.take();
    }
}

/// Move the frozen clock past `deadline`: tokio fires a timer in the millisecond after it.
async fn advance_past(deadline: Instant) {
    tokio::time::advance(deadline + Duration::from_millis(1) - Instant::now()).await;
}

/// Let the daemon take in what real I/O brought (file events), without moving the clock.
async fn settle() {
    tokio::task::spawn_blocking(|| std::thread::sleep(Duration::from_millis(50)))
        .await
        .unwrap();
}

fn exports(sb: &Sandbox) -> u64 {
    let s = sb.fake.stats();
    s.batch_export_calls + s.single_export_calls
}

fn kps_calls(sb: &Sandbox) -> u64 {
    exports(sb) + sb.fake.stats().list_calls
}

fn content_is(sb: &Sandbox, name: &str) -> bool {
    std::fs::read_to_string(sb.path(&format!("out/{name}.pem"))).ok() == sb.fake.private_key(name)
}

#[tokio::test]
async fn runs_in_process_until_the_token_is_cancelled_and_leaves_the_state_saved() {
    let sb = Sandbox::new();
    sb.fake.add_key("a");
    sb.fake.add_key("b");
    sb.manifest(
        "  debounce: 50ms\n  interval: 1h\n",
        "  a: out/a.pem\n  b: out/b.pem\n",
    );
    let mut d = InProcess::start(&sb, RetryPolicy::default());
    let first = d.passes_done(1).await;
    assert!(content_is(&sb, "a") && content_is(&sb, "b"));
    assert!(
        matches!(
            first.last,
            Some(daemon::LastPass::Done {
                managed: 2,
                in_place: 2,
                failed: 0,
                ..
            })
        ),
        "{first:?}"
    );
    assert_eq!(first.retry_at, None);

    let stopped = d.stop().await;
    assert_eq!(stopped, Stopped { drift: 0 });
    let state = std::fs::read_to_string(sb.path("state/state.json")).unwrap();
    assert!(
        state.contains("out/a.pem") && state.contains("out/b.pem"),
        "{state}"
    );
    // The lock went with the daemon: a one-shot pass runs at once, with nothing to do.
    let run = sb.reconcile();
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout.contains("2 managed, 2 in place, 0 failed"),
        "{run:?}"
    );
}

#[tokio::test]
async fn a_reload_request_picks_up_a_manifest_edit_at_once_and_ignores_a_broken_one() {
    let sb = Sandbox::new();
    sb.fake.add_key("a");
    sb.fake.add_key("b");
    // A debounce of an hour: the watcher alone would not look at the edit within the test.
    let settings = "  debounce: 1h\n  interval: 1h\n";
    sb.manifest(settings, "  a: out/a.pem\n");
    let mut d = InProcess::start(&sb, RetryPolicy::default());
    d.passes_done(1).await;
    sb.manifest(settings, "  a: out/a.pem\n  b: out/b.pem\n");
    d.reload.send(()).await.unwrap();
    let second = d.passes_done(2).await;
    assert!(content_is(&sb, "b"), "{second:?}");
    assert!(
        matches!(second.last, Some(daemon::LastPass::Done { managed: 2, .. })),
        "{second:?}"
    );
    assert!(!second.manifest_rejected);

    // An edit that does not load changes nothing: the pass the reload asks for runs with the
    // last good manifest, and the daemon says the edit was rejected.
    sb.write_manifest(&(sb.header() + "keys:\n  a: [not, a, path]\n"));
    d.reload.send(()).await.unwrap();
    let third = d.passes_done(3).await;
    assert!(third.manifest_rejected, "{third:?}");
    assert!(
        matches!(
            third.last,
            Some(daemon::LastPass::Done {
                managed: 2,
                in_place: 2,
                ..
            })
        ),
        "{third:?}"
    );
    d.stop().await;
}

#[tokio::test]
async fn a_manifest_that_does_not_load_at_start_is_a_typed_error() {
    let sb = Sandbox::new();
    sb.write_manifest(&(sb.header() + "keys:\n  a: [not, a, path]\n"));
    let err = InProcess::start(&sb, RetryPolicy::default())
        .task
        .await
        .unwrap()
        .unwrap_err();
    assert!(err.is_invalid_input(), "{err:?}");
    assert!(err.to_string().contains("manifest.yaml:"), "{err}");
}

/// Start a daemon whose first pass waits on a KPS that answers in a minute, and return once
/// that pass has a request in flight.
async fn start_against_a_slow_kps(sb: &Sandbox, settings: &str) -> InProcess {
    sb.fake.add_key("a");
    sb.fake.set_latency(Duration::from_secs(60));
    sb.manifest(settings, "  a: out/a.pem\n");
    let mut d = InProcess::start(sb, one_attempt());
    d.wait("the first pass started", |s| s.passes_started == 1)
        .await;
    for _ in 0..600 {
        if kps_calls(sb) > 0 {
            break;
        }
        settle().await;
    }
    assert!(kps_calls(sb) > 0, "the pass asked KPS");
    d
}

fn nothing_half_written(sb: &Sandbox) {
    assert!(!sb.path("out/a.pem").exists());
    let leftovers: Vec<_> = std::fs::read_dir(sb.path("out"))
        .map(|rd| rd.filter_map(Result::ok).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// Cancelled while its pass waits on an export, the daemon stops that pass at once and returns
/// `Ok`: the clock is frozen, so the grace period cannot be what ended it.
#[tokio::test(start_paused = true)]
async fn a_cancel_during_a_slow_export_stops_the_pass_and_returns_ok() {
    let _frozen = freeze_clock();
    let sb = Sandbox::new();
    // No listing first: the request in flight is the export.
    let d = start_against_a_slow_kps(&sb, "  interval: 1h\n  verify_remote: false\n").await;
    assert_eq!(d.stop().await, Stopped { drift: 0 });
    nothing_half_written(&sb);
}

/// A pass that does not stop by itself is abandoned [`daemon::STOP_GRACE`] after the cancel,
/// and the daemon still returns `Ok`.
#[tokio::test(start_paused = true)]
async fn a_pass_still_running_after_the_grace_period_is_abandoned() {
    let _frozen = freeze_clock();
    let sb = Sandbox::new();
    let d = start_against_a_slow_kps(&sb, "  interval: 1h\n").await;
    d.shutdown.cancel();
    settle().await;
    advance_past(Instant::now() + daemon::STOP_GRACE).await;
    assert_eq!(d.stop().await, Stopped { drift: 0 });
    nothing_half_written(&sb);
}

/// A transient failure (KPS answering 500) is retried after 5 s, then 10 s, 20 s, ..., each up
/// to 10 % later, never waiting for the 1 h interval; once KPS answers, the key is placed and
/// the backoff is over.
#[tokio::test(start_paused = true)]
async fn a_transient_failure_is_retried_with_backoff() {
    let _frozen = freeze_clock();
    let sb = Sandbox::new();
    sb.fake.add_key("a");
    sb.manifest("  debounce: 50ms\n  interval: 1h\n", "  a: out/a.pem\n");
    sb.fake.set_error_rate(1.0);
    let mut d = InProcess::start(&sb, one_attempt());
    let mut done = d.passes_done(1).await;
    for (n, step) in [5u64, 10, 20, 40, 80].into_iter().enumerate() {
        let step = Duration::from_secs(step);
        let retry_at = done.retry_at.expect("a retry is scheduled");
        let wait = retry_at - Instant::now();
        assert!(
            step <= wait && wait <= step + step.mul_f64(JITTER),
            "retry {n}: {wait:?} after a step of {step:?}"
        );
        tokio::time::advance(wait - Duration::from_millis(1)).await;
        settle().await;
        assert_eq!(d.now().passes_started, n as u64 + 1, "retried early");
        advance_past(retry_at).await;
        done = d.passes_done(n as u64 + 2).await;
    }
    assert!(!content_is(&sb, "a"));

    sb.fake.set_error_rate(0.0);
    advance_past(done.retry_at.unwrap()).await;
    let healed = d.passes_done(7).await;
    assert!(content_is(&sb, "a"));
    assert_eq!(healed.retry_at, None, "healthy: no retry pending");
    d.stop().await;
}

/// The first retry is [`FIRST_RETRY`] again after a healthy pass: the backoff was reset.
#[tokio::test(start_paused = true)]
async fn the_backoff_starts_over_after_a_healthy_pass() {
    let _frozen = freeze_clock();
    let sb = Sandbox::new();
    sb.fake.add_key("a");
    sb.manifest("  debounce: 50ms\n  interval: 1h\n", "  a: out/a.pem\n");
    sb.fake.set_error_rate(1.0);
    let mut d = InProcess::start(&sb, one_attempt());
    for n in 1..=3 {
        let retry_at = d.passes_done(n).await.retry_at.unwrap();
        if n == 3 {
            sb.fake.set_error_rate(0.0);
        }
        advance_past(retry_at).await;
    }
    d.passes_done(4).await;
    assert!(content_is(&sb, "a"));
    // Someone deletes the key while KPS fails again: the restore is retried from 5 s.
    sb.fake.set_error_rate(1.0);
    std::fs::remove_file(sb.path("out/a.pem")).unwrap();
    let failed = drive_until(&mut d, |s| s.passes_done >= 5).await;
    let wait = failed.retry_at.unwrap() - Instant::now();
    assert!(
        FIRST_RETRY <= wait && wait <= FIRST_RETRY + FIRST_RETRY.mul_f64(JITTER),
        "{wait:?}"
    );
    d.stop().await;
}

/// Advance the clock by the drift debounce until `cond` holds: file events arrive in real time,
/// so the test cannot know the instant the daemon saw one. At most a few seconds of the
/// daemon's time go by, far from any interval or retry deadline these tests set.
async fn drive_until(d: &mut InProcess, mut cond: impl FnMut(&Snapshot) -> bool) -> Snapshot {
    for _ in 0..100 {
        let now = d.now();
        if cond(&now) {
            return now;
        }
        tokio::time::advance(Duration::from_millis(50)).await;
        settle().await;
    }
    panic!("the daemon did not get there; last {:?}", d.now())
}

/// Nothing happens for a while: let file events arrive and a few debounce periods pass.
async fn quiet_for_a_while(d: &InProcess, passes: u64) {
    for _ in 0..10 {
        tokio::time::advance(Duration::from_millis(100)).await;
        settle().await;
    }
    assert_eq!(d.now().passes_started, passes, "a pass started by itself");
}

/// A key that fails permanently (`gone`: not in KPS, KPS.6004) is held: a drift pass does not
/// export it again, nor does anything before the interval; the interval pass tries it once, and
/// a reload releases it. The daemon's own writes (the first pass's, the restore's) wake nobody.
#[tokio::test(start_paused = true)]
async fn own_writes_do_not_wake_the_daemon_and_a_permanent_failure_is_held() {
    let _frozen = freeze_clock();
    let sb = Sandbox::new();
    sb.fake.add_key("a");
    sb.fake.add_key("b");
    // No listing before an export: a key KPS does not have costs an export call each time it
    // is tried, so holding it shows in the call count.
    sb.manifest(
        "  debounce: 50ms\n  interval: 10m\n  verify_remote: false\n",
        "  a: out/a.pem\n  b: out/b.pem\n  gone: out/gone.pem\n",
    );
    let start = Instant::now();
    let mut d = InProcess::start(&sb, one_attempt());
    let first = d.passes_done(1).await;
    assert_eq!(first.held, ["gone"]);
    assert_eq!(
        first.retry_at, None,
        "a permanent failure is not retried on a backoff"
    );
    assert_eq!(first.next_full, Some(start + Duration::from_secs(600)));
    quiet_for_a_while(&d, 1).await;
    let after_first = exports(&sb);

    std::fs::remove_file(sb.path("out/a.pem")).unwrap();
    let drift = drive_until(&mut d, |s| s.passes_done >= 2).await;
    assert!(content_is(&sb, "a"));
    assert_eq!(drift.drift, 1);
    assert_eq!(
        exports(&sb) - after_first,
        1,
        "the drift pass exports `a` only; `gone` is held"
    );
    quiet_for_a_while(&d, 2).await;

    // Up to the interval, nothing; at the interval, `gone` is tried once more (and fails):
    // `a` and `b` are in place, so any KPS call is for `gone`.
    tokio::time::advance(start + Duration::from_secs(599) - Instant::now()).await;
    settle().await;
    assert_eq!(d.now().passes_started, 2);
    let before_interval = kps_calls(&sb);
    advance_past(start + Duration::from_secs(600)).await;
    let full = d.passes_done(3).await;
    assert!(
        kps_calls(&sb) > before_interval,
        "the interval pass tries `gone`"
    );
    assert_eq!(full.held, ["gone"]);
    assert_eq!(
        full.next_full,
        Some(Instant::now() + Duration::from_secs(600))
    );

    // A reload releases it at once.
    sb.fake.add_key("gone");
    d.reload.send(()).await.unwrap();
    let released = d.passes_done(4).await;
    assert!(content_is(&sb, "gone"), "{released:?}");
    assert!(released.held.is_empty());
    d.stop().await;
}
