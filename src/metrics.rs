//! Prometheus metrics: one set for both modes, encoded by the official `prometheus-client` crate
//! in the Prometheus text format 0.0.4 (what node_exporter's textfile collector and
//! `promtool check metrics` read).
//!
//! - `settings.metrics_file`: after every pass (one-shot or daemon), the whole set is written
//!   through the atomic writer, mode 0644, so node_exporter never reads half a file.
//! - `settings.metrics_listen`: the daemon serves the same set at `GET /metrics`. Only a
//!   loopback address is accepted unless the manifest says `allow_remote_metrics: true`.
//!
//! Invariants: the set is process-wide (the KPS client counts requests where they happen, the
//! pass records its report once it is over); label values are fixed words, key pair names
//! never (a fleet's cardinality stays flat however many keys it manages), and nothing secret
//! is ever a label. Counters of a one-shot `reconcile` count that run only; the gauges
//! (`kps_sync_keys`, the timestamps) are what alerts use, and the last success is carried over
//! from the previous file so a failed run does not erase it.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{LazyLock, Mutex, Once};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::manifest::Manifest;
use crate::output::meta::FileMeta;
use crate::output::write::{self, Prior};

/// node_exporter runs as its own user and must be able to read the file; it holds no secret.
const METRICS_FILE_MODE: u32 = 0o644;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    /// `list`, `batch_export`, `export`, `detail`.
    operation: String,
    /// `2xx`, `4xx`, `5xx`, or `network` when no answer came.
    outcome: &'static str,
    /// The KPS error code (`KPS.6004`, `APIG.0308`, ...), empty on success.
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ExportLabels {
    /// `batch` or `single`.
    path: &'static str,
    /// Why the single call was used (`missing_from_zip`, ...); empty for batch exports.
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

/// What a pass did, counted for the metrics (the pass's report computes it; this module knows
/// nothing of the pass).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PassFigures {
    /// Every managed key in place and every hook ran.
    pub success: bool,
    /// Managed keys by state at the end of the pass.
    pub in_place: usize,
    pub failed: usize,
    /// Not attempted (the pass stopped early, or could not list).
    pub pending: usize,
    pub conflict: usize,
    /// Files put back after someone else deleted or altered them.
    pub restores: u64,
    /// Files whose mode, owner or group was put back.
    pub fix_meta: u64,
    /// Keys rewritten because KPS lists a new key pair under their name.
    pub rotations: u64,
}

/// Every metric kps-sync exports.
pub struct Metrics {
    registry: Registry,
    keys: Family<StateLabel, Gauge>,
    last_success: Gauge<f64, std::sync::atomic::AtomicU64>,
    last_pass: Gauge<f64, std::sync::atomic::AtomicU64>,
    pass_duration: Histogram,
    passes: Family<OutcomeLabel, Counter>,
    requests: Family<RequestLabels, Counter>,
    exports: Family<ExportLabels, Counter>,
    drift: Family<KindLabel, Counter>,
    rotations: Counter,
    hooks: Family<OutcomeLabel, Counter>,
    /// Serialises writers of the metrics file (the daemon's passes never overlap, but a test
    /// process may run several).
    file_lock: Mutex<()>,
    /// The last success is read back from the metrics file once per process.
    resumed: Once,
}

/// A new metric of type `M`, registered under `name` (after the `kps_sync_` prefix).
fn add<M>(registry: &mut Registry, name: &str, help: &str, unit: Option<Unit>) -> M
where
    M: prometheus_client::registry::Metric + Clone + Default,
{
    let metric = M::default();
    match unit {
        Some(unit) => registry.register_with_unit(name, help, unit, metric.clone()),
        None => registry.register(name, help, metric.clone()),
    }
    metric
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process-wide set.
pub fn global() -> &'static Metrics {
    &METRICS
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("kps_sync");
        let r = &mut registry;
        let keys: Family<StateLabel, Gauge> = add(
            r,
            "keys",
            "Managed keys by state after the last pass: in_place, failed, pending (not attempted), conflict",
            None,
        );
        for state in ["in_place", "failed", "pending", "conflict"] {
            keys.get_or_create(&StateLabel { state }).set(0);
        }
        let mut metrics = Metrics {
            keys,
            last_success: add(
                r,
                "last_success_timestamp",
                "Unix time of the end of the last pass that brought every key in place",
                Some(Unit::Seconds),
            ),
            last_pass: add(
                r,
                "last_pass_timestamp",
                "Unix time of the end of the last pass, successful or not",
                Some(Unit::Seconds),
            ),
            pass_duration: {
                let buckets = [
                    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
                ];
                let histogram = Histogram::new(buckets);
                r.register_with_unit(
                    "pass_duration",
                    "How long a pass took, from the plan to the last hook",
                    Unit::Seconds,
                    histogram.clone(),
                );
                histogram
            },
            passes: add(
                r,
                "passes",
                "Passes by outcome: success (every key in place, every hook ran), failed (some key or hook did not), error (the pass could not run)",
                None,
            ),
            requests: add(
                r,
                "kps_requests",
                "KPS HTTP requests by operation, outcome (status class, or network) and KPS error code",
                None,
            ),
            exports: add(
                r,
                "exports",
                "Keys exported, by path (batch, or single with the reason for the fallback)",
                None,
            ),
            drift: add(
                r,
                "drift_restores",
                "Managed files put back after someone else changed them: restore (deleted or altered, exported again) or fix_meta (mode, owner or group)",
                None,
            ),
            rotations: add(
                r,
                "rotations",
                "Keys rewritten because KPS lists a new key pair under the same name",
                None,
            ),
            hooks: add(r, "hook_runs", "on_change hooks run, by outcome", None),
            registry,
            file_lock: Mutex::new(()),
            resumed: Once::new(),
        };
        let build_info: Family<BuildLabels, Gauge> = add(
            &mut metrics.registry,
            "build_info",
            "Always 1; the version of kps-sync as a label",
            None,
        );
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        metrics
    }

    /// The whole set in the Prometheus text format 0.0.4.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
            .expect("writing to a String does not fail");
        out
    }

    /// One KPS request answered (`status`) or not (`None`: a network error).
    pub fn kps_request(&self, operation: &str, status: Option<u16>, code: Option<&str>) {
        let outcome = match status {
            None => "network",
            Some(200..=299) => "2xx",
            Some(400..=499) => "4xx",
            Some(500..=599) => "5xx",
            Some(_) => "other",
        };
        self.requests
            .get_or_create(&RequestLabels {
                operation: operation.replace(' ', "_"),
                outcome,
                code: code.unwrap_or_default().to_owned(),
            })
            .inc();
    }

    /// `keys` keys delivered by a batch export.
    pub fn batch_exported(&self, keys: usize) {
        self.exports
            .get_or_create(&ExportLabels {
                path: "batch",
                reason: String::new(),
            })
            .inc_by(keys as u64);
    }

    /// One key exported by the single call instead of a batch, and why.
    pub fn single_exported(&self, reason: &str) {
        self.exports
            .get_or_create(&ExportLabels {
                path: "single",
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// One `on_change` hook run.
    pub fn hook_run(&self, ok: bool) {
        let outcome = if ok { "ok" } else { "failed" };
        self.hooks.get_or_create(&OutcomeLabel { outcome }).inc();
    }

    /// Record a pass: its figures (`None` when the pass as a whole failed) and its duration.
    pub fn record_pass(&self, figures: Option<&PassFigures>, took: Duration) {
        let now = unix_now();
        self.pass_duration.observe(took.as_secs_f64());
        self.last_pass.set(now);
        let Some(f) = figures else {
            self.passes
                .get_or_create(&OutcomeLabel { outcome: "error" })
                .inc();
            return;
        };
        let outcome = if f.success {
            self.last_success.set(now);
            "success"
        } else {
            "failed"
        };
        self.passes.get_or_create(&OutcomeLabel { outcome }).inc();
        for (state, n) in [
            ("in_place", f.in_place),
            ("failed", f.failed),
            ("pending", f.pending),
            ("conflict", f.conflict),
        ] {
            let n = i64::try_from(n).unwrap_or(i64::MAX);
            self.keys.get_or_create(&StateLabel { state }).set(n);
        }
        for (kind, n) in [("restore", f.restores), ("fix_meta", f.fix_meta)] {
            self.drift.get_or_create(&KindLabel { kind }).inc_by(n);
        }
        self.rotations.inc_by(f.rotations);
    }

    /// Before the first pass of a one-shot run: carry the last success over from the file the
    /// previous run wrote, so that a failing run keeps reporting when things last worked.
    pub fn resume_from_file(&self, path: &Path) {
        let name = "kps_sync_last_success_timestamp_seconds ";
        let Ok(text) = std::fs::read_to_string(path) else {
            return;
        };
        if let Some(value) = text
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|v| v.is_finite() && *v > 0.0)
        {
            self.last_success.set(value);
        }
    }

    /// Write the set to `path` atomically (mode 0644). A failure is logged, never fatal: the
    /// keys matter more than their metrics.
    pub fn write_file(&self, path: &Path) {
        let _guard = self.file_lock.lock().unwrap_or_else(|e| e.into_inner());
        let meta = FileMeta {
            mode: METRICS_FILE_MODE,
            uid: None,
            gid: None,
        };
        if let Err(e) = write::write_atomic(path, self.encode().as_bytes(), meta, Prior::Anything) {
            tracing::warn!(path = %path.display(), error = %e, "cannot write the metrics file; check that its folder exists and is writable (ReadWritePaths= under systemd)");
        }
    }
}

/// After every pass, in both modes: record it, then write `settings.metrics_file` if set.
pub fn after_pass(manifest: &Manifest, figures: Option<&PassFigures>, took: Duration) {
    let metrics = global();
    if let Some(path) = &manifest.settings.metrics_file {
        metrics.resumed.call_once(|| metrics.resume_from_file(path));
    }
    metrics.record_pass(figures, took);
    if let Some(path) = &manifest.settings.metrics_file {
        metrics.write_file(path);
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// What the HTTP endpoint answers, as (status, content type, body).
fn answer(method: &hyper::Method, path: &str) -> (hyper::StatusCode, &'static str, String) {
    use hyper::{Method, StatusCode};
    match (method, path) {
        (&Method::GET | &Method::HEAD, "/metrics") => (
            StatusCode::OK,
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            global().encode(),
        ),
        (_, "/metrics") => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "use GET\n".into(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "kps-sync serves /metrics only\n".into(),
        ),
    }
}

/// Bind `addr` for `/metrics`. Separate from [`serve`] so the daemon can fail at start, with
/// the address in the message, rather than later.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

/// Serve `/metrics` on `listener` until the task is dropped. Each connection is its own task;
/// a client that misbehaves costs only its own connection.
pub async fn serve(listener: tokio::net::TcpListener) {
    use http_body_util::Full;
    use hyper::body::Bytes;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "metrics: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            let service = hyper::service::service_fn(|request: hyper::Request<_>| async move {
                let (status, content_type, body) = answer(request.method(), request.uri().path());
                let body = if request.method() == hyper::Method::HEAD {
                    Bytes::new()
                } else {
                    Bytes::from(body)
                };
                hyper::Response::builder()
                    .status(status)
                    .header(hyper::header::CONTENT_TYPE, content_type)
                    .body(Full::new(body))
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(io, service);
            if let Err(e) = tokio::time::timeout(Duration::from_secs(30), connection).await {
                tracing::debug!(%peer, error = %e, "metrics: connection timed out");
            }
        });
    }
}
