//! The commands behind the binary. Each takes validated arguments, prints what an operator
//! reads, and returns the exit code from the design: 0 all in place, 1 some key failed or KPS
//! unreachable, 2 the command line or the manifest is invalid (nothing attempted).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::auth::Auth;
use crate::daemon::systemd::{self, Notifier};
use crate::daemon::{self, DaemonConfig};
use crate::kps::connect::{self, SetupError, trusted_credentials};
use crate::kps::{KpsClient, RetryPolicy};
use crate::manifest::{self, Manifest};
use crate::plan::{Change, PublicChange};
use crate::reconcile::{self, PassOptions, PassReport};
use crate::state;

pub const EXIT_OK: u8 = 0;
pub const EXIT_FAILED: u8 = 1;
pub const EXIT_INVALID: u8 = 2;

/// How long a one-shot `reconcile` waits for the lock held by a daemon or another run.
pub const LOCK_WAIT: Duration = Duration::from_secs(10);

/// Load the manifest or print why not.
pub fn load_manifest(path: &Path) -> Result<Manifest, u8> {
    let manifest = manifest::load(path).map_err(|e| {
        // One `error:` line per problem, so each can be found with grep.
        for line in e.to_string().lines() {
            eprintln!("error: {line}");
        }
        EXIT_INVALID
    })?;
    if manifest.keys.is_empty() {
        eprintln!(
            "warning: {}: no keys under `keys:`, so nothing is managed; add `name: /path` lines",
            manifest.path.display()
        );
    }
    Ok(manifest)
}

fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Resolve the auth source and build the client, or print why not.
pub fn client_for(manifest: &Manifest) -> Result<Arc<KpsClient>, u8> {
    build_client(manifest).map_err(|e| {
        eprintln!("error: {e}");
        EXIT_INVALID
    })
}

fn build_client(manifest: &Manifest) -> Result<Arc<KpsClient>, SetupError> {
    connect::client_for(manifest, RetryPolicy::default()).map(Arc::new)
}

/// Take the state folder's lock, waiting up to [`LOCK_WAIT`], or print why not.
pub async fn take_lock(manifest: &Manifest) -> Result<state::Lock, u8> {
    let state_dir = manifest.settings.state_dir.clone();
    match tokio::task::spawn_blocking(move || state::lock(&state_dir, LOCK_WAIT)).await {
        Ok(Ok(lock)) => Ok(lock),
        Ok(Err(e)) => {
            eprintln!("error: {e}");
            Err(EXIT_FAILED)
        }
        Err(e) => {
            eprintln!("error: cannot take the state lock: {e}");
            Err(EXIT_FAILED)
        }
    }
}

/// `kps-sync run`: the daemon, with SIGTERM/SIGINT as its shutdown and SIGHUP as its reload.
/// Exits 0 when stopped; at start, 2 for an invalid manifest or credentials, 1 when the lock is
/// held, metrics cannot be served or signals cannot be set up.
pub async fn run(manifest_path: &Path) -> u8 {
    // Signals first, so a SIGTERM during the first pass is ours to handle.
    let (shutdown, reload) = match signal_inputs() {
        Ok(inputs) => inputs,
        Err(e) => {
            eprintln!("error: cannot install signal handlers: {e}");
            return EXIT_FAILED;
        }
    };
    let config = DaemonConfig {
        lock_wait: LOCK_WAIT,
        notifier: Notifier::from_env(),
        watchdog: systemd::watchdog_interval_from_env(),
        ..DaemonConfig::new(manifest_path)
    };
    match daemon::run(config, shutdown, reload).await {
        Ok(_) => EXIT_OK,
        Err(e) => {
            eprintln!("error: {e}");
            if e.is_invalid_input() {
                EXIT_INVALID
            } else {
                EXIT_FAILED
            }
        }
    }
}

/// SIGTERM and SIGINT cancel the token; each SIGHUP asks for a reload (one waiting already
/// covers the next).
fn signal_inputs() -> std::io::Result<(CancellationToken, mpsc::Receiver<()>)> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let shutdown = CancellationToken::new();
    let (tx, reload) = mpsc::channel(1);
    let token = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        token.cancel();
    });
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading the manifest");
            let _ = tx.try_send(());
        }
    });
    Ok((shutdown, reload))
}

/// `kps-sync reconcile`: one pass, then exit.
pub async fn reconcile(manifest_path: &Path, splay: Option<Duration>, check_rotation: bool) -> u8 {
    let manifest = match load_manifest(manifest_path) {
        Ok(m) => m,
        Err(code) => return code,
    };
    let client = match client_for(&manifest) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if let Some(splay) = splay.filter(|s| !s.is_zero()) {
        let delay = Duration::from_millis(fastrand::u64(0..=splay.as_millis() as u64));
        tracing::info!(
            delay_ms = delay.as_millis() as u64,
            "splay: waiting before the pass"
        );
        tokio::time::sleep(delay).await;
    }
    let lock = match take_lock(&manifest).await {
        Ok(lock) => lock,
        Err(code) => return code,
    };
    let options = PassOptions {
        check_rotation,
        progress: crate::progress::Progress::if_enabled(),
        ..PassOptions::default()
    };
    let result = reconcile::reconcile_once(&manifest, &client, &options).await;
    options.progress.finish();
    drop(lock);
    match result {
        Ok(report) => {
            print_report(&report);
            if report.is_success() {
                EXIT_OK
            } else {
                EXIT_FAILED
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            EXIT_FAILED
        }
    }
}

/// Print what a pass did: one line per change on stdout, one line per failure on stderr.
pub fn print_report(report: &PassReport) {
    print_rows(
        report
            .outcomes
            .iter()
            .filter(|o| o.change.is_pending() && o.result.is_ok())
            .map(|o| (past_tense(&o.change), o.key.as_str(), o.path.as_path())),
    );
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "{} managed, {} in place, {} failed",
        report.managed, report.in_place, report.failed
    );
    drop(out);
    for o in &report.outcomes {
        if let Err(f) = &o.result {
            eprintln!(
                "error: key {} ({}): {}",
                o.key,
                o.path.display(),
                f.one_line()
            );
        }
    }
    for h in &report.hook_failures {
        eprintln!("error: {h}");
    }
    if let Some(e) = &report.listing_error {
        eprintln!("error: {e}");
    }
}

/// `action  key  path` lines, the key column aligned.
fn print_rows<'a>(rows: impl Iterator<Item = (&'a str, &'a str, &'a Path)>) {
    let rows: Vec<_> = rows.collect();
    let width = rows.iter().map(|(_, key, _)| key.len()).max().unwrap_or(0);
    let mut out = std::io::stdout().lock();
    for (word, key, path) in rows {
        let _ = writeln!(out, "{word:<12} {key:<width$}  {}", path.display());
    }
}

fn past_tense(change: &Change) -> &'static str {
    match change {
        Change::Create => "created",
        Change::Restore(_) => "restored",
        Change::FixMeta => "fixed-meta",
        Change::ReEncrypt => "re-encrypted",
        Change::Rotate => "rotated",
        Change::Adopt { .. } => "adopted",
        Change::Prune => "pruned",
        other => other.word(),
    }
}

/// `kps-sync plan`: what a pass would do; writes nothing, exports nothing.
pub async fn plan(manifest_path: &Path, detailed_exitcode: bool) -> u8 {
    let manifest = match load_manifest(manifest_path) {
        Ok(m) => m,
        Err(code) => return if detailed_exitcode { EXIT_FAILED } else { code },
    };
    let observation = match reconcile::Observation::read(&manifest).await {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_FAILED;
        }
    };
    let plan = plan_with_listing(&manifest, &observation).await;
    let public_paths: std::collections::BTreeMap<&str, &Path> = manifest
        .keys
        .iter()
        .filter_map(|k| Some((k.name.as_str(), k.public_key.as_deref()?)))
        .collect();
    print_rows(
        plan.actions
            .iter()
            .filter(|a| a.change != Change::Forget)
            .flat_map(|a| {
                let public = a.public.as_ref().and_then(|p| {
                    let word = match p {
                        PublicChange::Write => "write-pub",
                        PublicChange::Adopt { .. } => "adopt-pub",
                        PublicChange::Conflict(_) => "conflict",
                    };
                    Some((word, a.key.as_str(), *public_paths.get(a.key.as_str())?))
                });
                std::iter::once((a.change.word(), a.key.as_str(), a.path.as_path())).chain(public)
            }),
    );
    let mut out = std::io::stdout().lock();
    let pending = plan.pending().count();
    let conflicts = plan.conflicts().count();
    let _ = writeln!(
        out,
        "{pending} to change, {} in place, {conflicts} in conflict",
        plan.actions
            .iter()
            .filter(|a| a.change == Change::Keep)
            .count()
    );
    drop(out);
    for a in plan.conflicts() {
        eprintln!(
            "warning: key {} ({}): {}",
            a.key,
            a.path.display(),
            a.change
        );
    }
    for a in &plan.actions {
        if let (Some(PublicChange::Conflict(reason)), Some(path)) =
            (&a.public, public_paths.get(a.key.as_str()))
        {
            eprintln!(
                "warning: key {} ({}): conflict: {reason}",
                a.key,
                path.display()
            );
        }
    }
    match (detailed_exitcode, pending > 0) {
        (true, true) => 2,
        _ => EXIT_OK,
    }
}

/// The plan a pass would make: with a listing when the pass would list (so rotations and
/// adoptions show), else without. A listing that fails is a warning: the plan is still shown.
async fn plan_with_listing(
    manifest: &Manifest,
    observation: &reconcile::Observation,
) -> crate::plan::Plan {
    let unlisted = observation.plan(manifest, None);
    let Some(why) =
        observation.listing_reason(manifest, &unlisted, false, std::time::SystemTime::now())
    else {
        return unlisted;
    };
    let listing = match build_client(manifest) {
        Ok(client) => match client.auth().ready().await {
            Ok(()) => reconcile::list(&client, why)
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        },
        Err(e) => Err(e.to_string()),
    };
    match listing {
        Ok(Some(listing)) => observation.plan(manifest, Some(&listing)),
        Ok(None) => unlisted,
        Err(e) => {
            eprintln!("warning: cannot list KPS ({e}); rotations and adoptions are not shown");
            unlisted
        }
    }
}

/// `kps-sync validate`: the manifest and the credentials' presence; no network.
pub fn validate(manifest_path: &Path) -> u8 {
    let manifest = match load_manifest(manifest_path) {
        Ok(m) => m,
        Err(code) => return code,
    };
    let auth = match Auth::resolve(&manifest.kps, &env_var) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_INVALID;
        }
    };
    let mut code = EXIT_OK;
    if let Err(e) = trusted_credentials(&auth) {
        eprintln!("error: {e}");
        code = EXIT_INVALID;
    }
    for problem in auth.check_files() {
        match problem {
            crate::auth::FileCheck::Warning(w) => eprintln!("warning: {w}"),
            crate::auth::FileCheck::Error(e) => {
                eprintln!("error: {e}");
                code = EXIT_INVALID;
            }
        }
    }
    // "ok" only when it is: a missing credential file is not.
    let verdict = if code == EXIT_OK { "ok" } else { "invalid" };
    println!(
        "manifest {}: {verdict}, {}",
        manifest.path.display(),
        count(manifest.keys.len(), "key")
    );
    println!("endpoint {}", manifest.kps.endpoint);
    println!("auth: {}", auth.source());
    code
}

/// `1 key`, `2 keys`.
pub fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// `kps-sync status`: what is managed, when each file was written, last error per key.
pub async fn status(manifest_path: &Path, json: bool) -> u8 {
    let manifest = match load_manifest(manifest_path) {
        Ok(m) => m,
        Err(code) => return code,
    };
    let (plan, state) = match reconcile::compute_plan(&manifest).await {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_FAILED;
        }
    };
    let rows: Vec<StatusRow> = manifest
        .keys
        .iter()
        .map(|k| {
            let record = state.files.get(&k.name).filter(|r| r.path == k.path);
            let change = plan
                .actions
                .iter()
                .find(|a| a.key == k.name && a.path == k.path)
                .map(|a| a.change.word())
                .unwrap_or("keep");
            StatusRow {
                key: k.name.clone(),
                path: k.path.clone(),
                state: if change == "keep" { "in-place" } else { change }.to_owned(),
                written_at: record.map(|r| r.written_at.clone()),
                encrypted: k.encryption.is_some(),
                last_error: state
                    .errors
                    .get(&k.name)
                    .map(|e| format!("{} ({})", e.message, e.at)),
            }
        })
        .collect();
    // A pass that changed nothing did not save the state; it stamped the lock file instead.
    let mut last_pass = state.last_pass.clone();
    if let Some(pass) = &mut last_pass
        && let Some(at) = state.last_pass_at(&manifest.settings.state_dir)
    {
        pass.at = at;
    }
    if json {
        let doc = serde_json::json!({
            "manifest": manifest.path,
            "state_dir": manifest.settings.state_dir,
            "last_pass": last_pass,
            "keys": rows,
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&doc).expect("serializes")
        );
    } else {
        print_status(&rows, last_pass.as_ref());
    }
    EXIT_OK
}

#[derive(serde::Serialize)]
struct StatusRow {
    key: String,
    path: PathBuf,
    state: String,
    written_at: Option<String>,
    encrypted: bool,
    last_error: Option<String>,
}

fn print_status(rows: &[StatusRow], last_pass: Option<&state::PassRecord>) {
    match last_pass {
        Some(p) => println!(
            "last pass {}: {} managed, {} in place, {} failed",
            p.at, p.managed, p.in_place, p.failed
        ),
        None => println!("no pass recorded yet"),
    }
    let width = rows.iter().map(|r| r.key.len()).max().unwrap_or(0);
    for r in rows {
        println!(
            "{:<10} {:<width$}  {}  written {}{}",
            r.state,
            r.key,
            r.path.display(),
            r.written_at.as_deref().unwrap_or("never"),
            if r.encrypted { "  (age)" } else { "" }
        );
        if let Some(e) = &r.last_error {
            println!("           last error: {e}");
        }
    }
}

/// How one manifest key stands in the KPS listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
enum Standing {
    /// Listed, hosted, not frozen: an export would succeed.
    Ready,
    /// Not in the listing of this project.
    Missing,
    /// Listed, but KPS does not hold its private key.
    NotHosted,
    /// Listed and hosted, but frozen.
    Frozen,
}

impl Standing {
    fn word(self) -> &'static str {
        match self {
            Standing::Ready => "ready",
            Standing::Missing => "missing",
            Standing::NotHosted => "not-hosted",
            Standing::Frozen => "frozen",
        }
    }

    fn hint(self) -> &'static str {
        match self {
            Standing::Ready => "",
            Standing::Missing => {
                "not in the KPS listing of this project: check the name, the region and the project id, or create the key pair"
            }
            Standing::NotHosted => {
                "KPS does not hold its private key (is_key_protection: false): import it into KPS or stop managing it here"
            }
            Standing::Frozen => "frozen in KPS: unfreeze it in the console",
        }
    }
}

#[derive(serde::Serialize)]
struct CheckRow {
    key: String,
    path: PathBuf,
    present: bool,
    hosted: bool,
    frozen: bool,
    standing: Standing,
}

impl CheckRow {
    /// How `key` stands in the listing.
    fn judge(key: &crate::manifest::KeySpec, listed: &crate::kps::Listing) -> CheckRow {
        let info = listed.get(&key.name);
        let present = info.is_some();
        let hosted = info.is_some_and(|i| i.is_key_protection);
        let frozen = info.is_some_and(|i| i.is_frozen());
        let standing = match (present, hosted, frozen) {
            (false, _, _) => Standing::Missing,
            (true, false, _) => Standing::NotHosted,
            (true, true, true) => Standing::Frozen,
            (true, true, false) => Standing::Ready,
        };
        CheckRow {
            key: key.name.clone(),
            path: key.path.clone(),
            present,
            hosted,
            frozen,
            standing,
        }
    }
}

/// `kps-sync check`: the online preflight. One listing proves the credentials, the project and
/// the permission to list; each manifest key is then judged from it. Exports nothing, writes
/// nothing (not even the state or the metrics). Exit 0 when every key could be exported, 1
/// when one could not or KPS could not be listed, 2 for an invalid manifest or no credentials.
pub async fn check(manifest_path: &Path, json: bool) -> u8 {
    let manifest = match load_manifest(manifest_path) {
        Ok(m) => m,
        Err(code) => return code,
    };
    let client = match client_for(&manifest) {
        Ok(c) => c,
        Err(code) => return code,
    };
    client.auth().begin_pass().await;
    if let Err(e) = client.auth().ready().await {
        eprintln!("error: {e}");
        return EXIT_FAILED;
    }
    let listed = match client.list().await {
        Ok(listed) => listed,
        Err(e) => {
            eprintln!(
                "error: cannot list the key pairs of project {} at {}: {e}",
                manifest.kps.project_id, manifest.kps.endpoint
            );
            return EXIT_FAILED;
        }
    };
    let rows: Vec<CheckRow> = manifest
        .keys
        .iter()
        .map(|k| CheckRow::judge(k, &listed))
        .collect();
    let ready = rows
        .iter()
        .filter(|r| r.standing == Standing::Ready)
        .count();
    let all_ready = ready == rows.len();
    if json {
        let doc = serde_json::json!({
            "endpoint": manifest.kps.endpoint,
            "project_id": manifest.kps.project_id,
            "auth": client.auth().source().to_string(),
            "listed": listed.len(),
            "ready": all_ready,
            "keys": rows,
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&doc).expect("serializes")
        );
    } else {
        println!(
            "KPS {} project {}: listed {} with {}",
            manifest.kps.endpoint,
            manifest.kps.project_id,
            count(listed.len(), "key pair"),
            client.auth().source()
        );
        let width = rows.iter().map(|r| r.key.len()).max().unwrap_or(0);
        for r in &rows {
            println!(
                "{:<10} {:<width$}  {}",
                r.standing.word(),
                r.key,
                r.path.display()
            );
        }
        println!("{} of {} ready to export", ready, count(rows.len(), "key"));
    }
    for r in rows.iter().filter(|r| r.standing != Standing::Ready) {
        eprintln!(
            "error: key {} ({}): {}",
            r.key,
            r.path.display(),
            r.standing.hint()
        );
    }
    if all_ready { EXIT_OK } else { EXIT_FAILED }
}
