//! The pass in-process, against the fake KPS: the library's `reconcile_once` with a manifest,
//! asserting the typed outcome of each key (its cause, class and label), what the pass
//! records, and what a cancellation through the caller's token leaves behind.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use fake_kps::FakeKps;
use kps_sync::kps::export::{ExportError, FallbackReason};
use kps_sync::kps::{Class, KpsClient};
use kps_sync::manifest::Manifest;
use kps_sync::plan::{Change, ConflictReason};
use kps_sync::reconcile::{
    self, Cause, FailureClass, Outcome, PassOptions, PassReport, Unexportable,
};
use kps_sync::state::State;
use tokio_util::sync::CancellationToken;

struct Setup {
    dir: tempfile::TempDir,
    fake: FakeKps,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, fake_kps::TOKEN).unwrap();
        std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        Setup {
            dir,
            fake: FakeKps::start(),
        }
    }

    fn path(&self, rel: &str) -> std::path::PathBuf {
        self.dir.path().join(rel)
    }

    /// Load a manifest with these `settings:` lines and `keys:` lines, and a client for it.
    fn load(&self, settings: &str, keys: &str) -> (Manifest, Arc<KpsClient>) {
        let text = format!(
            "version: 1\nkps:\n  endpoint: {}\n  project_id: {}\n  auth:\n    token_file: token\n\
             settings:\n  state_dir: state\n{settings}keys:\n{keys}",
            self.fake.url(),
            fake_kps::PROJECT_ID,
        );
        let path = self.path("manifest.yaml");
        std::fs::write(&path, text).unwrap();
        let manifest = kps_sync::manifest::load(&path).unwrap();
        let client = kps_sync::cli::commands::client_for(&manifest).unwrap();
        (manifest, client)
    }

    fn state(&self) -> State {
        State::load(&self.path("state")).unwrap()
    }
}

async fn pass(manifest: &Manifest, client: &Arc<KpsClient>, options: &PassOptions) -> PassReport {
    reconcile::reconcile_once(manifest, client, options)
        .await
        .unwrap()
}

fn outcome<'a>(report: &'a PassReport, key: &str) -> &'a Outcome {
    let mut of_key = report.outcomes.iter().filter(|o| o.key == key);
    let first = of_key
        .next()
        .unwrap_or_else(|| panic!("no outcome for {key}: {report:?}"));
    assert!(
        of_key.next().is_none(),
        "{key} has two outcomes: {report:?}"
    );
    first
}

fn failure<'a>(report: &'a PassReport, key: &str) -> &'a Cause {
    match &outcome(report, key).result {
        Err(cause) => cause,
        Ok(()) => panic!("{key} did not fail: {report:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_key_has_one_typed_outcome_with_its_class_and_label() {
    let s = Setup::new();
    s.fake.add_key("web");
    s.fake.add_key("db");
    s.fake.add_unhosted_key("imported");
    // db is missing from the batch zip: exported on its own, counted as a fallback.
    s.fake.set_omit_from_zip(Some("db".into()));
    std::fs::create_dir(s.path("out")).unwrap();
    std::fs::write(s.path("out/theirs.pem"), "someone else's\n").unwrap();
    let (manifest, client) = s.load(
        "",
        "  web: out/web.pem\n  db: out/db.pem\n  gone: out/gone.pem\n  imported: out/imported.pem\n  theirs: out/theirs.pem\n",
    );

    let report = pass(&manifest, &client, &PassOptions::default()).await;

    for key in ["web", "db"] {
        let o = outcome(&report, key);
        assert_eq!(
            (&o.change, o.result.is_ok()),
            (&Change::Create, true),
            "{o:?}"
        );
        assert!(s.path(&format!("out/{key}.pem")).is_file());
    }
    assert_eq!(
        report.fallbacks,
        BTreeMap::from([(FallbackReason::MissingName, 1)])
    );

    let gone = failure(&report, "gone");
    assert!(
        matches!(gone, Cause::Listed(Unexportable::NotListed)),
        "{gone:?}"
    );
    assert_eq!(
        (gone.class(), gone.label().as_ref()),
        (FailureClass::Permanent, "KPS.6004")
    );
    let imported = failure(&report, "imported");
    assert!(
        matches!(imported, Cause::Listed(Unexportable::NotHosted)),
        "{imported:?}"
    );
    assert_eq!(imported.label(), "KPS.6005");
    let theirs = failure(&report, "theirs");
    assert!(
        matches!(
            theirs,
            Cause::Conflict {
                reason: ConflictReason::NotOurs,
                ..
            }
        ),
        "{theirs:?}"
    );
    assert_eq!(
        (theirs.class(), theirs.label().as_ref()),
        (FailureClass::Permanent, "conflict")
    );
    assert!(theirs.is_conflict());
    assert_eq!(
        std::fs::read_to_string(s.path("out/theirs.pem")).unwrap(),
        "someone else's\n"
    );

    assert_eq!((report.managed, report.in_place, report.failed), (5, 2, 3));
    assert!(!report.is_success() && !report.interrupted);
    // The state's error records are `label: message`, from the same causes.
    let state = s.state();
    assert_eq!(state.errors["gone"].message, gone.record());
    assert!(
        state.errors["gone"]
            .message
            .starts_with("KPS.6004: the key pair is not in the KPS listing")
    );
    assert!(state.errors["theirs"].message.starts_with("conflict: "));
    assert!(!state.errors.contains_key("web"));
    assert!(state.files.contains_key("web") && state.files.contains_key("db"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_failure_keeps_the_kps_error_and_its_class() {
    let s = Setup::new();
    s.fake.add_key("web");
    // Without the check against the listing, the export itself meets the missing name.
    let (manifest, client) = s.load(
        "  verify_remote: false\n",
        "  web: out/web.pem\n  gone: out/gone.pem\n",
    );

    let report = pass(&manifest, &client, &PassOptions::default()).await;

    assert!(outcome(&report, "web").result.is_ok());
    let gone = failure(&report, "gone");
    match gone {
        Cause::Export(ExportError::Kps(e)) => assert_eq!(e.class, Class::NotFound),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        (gone.class(), gone.label().as_ref()),
        (FailureClass::Permanent, "KPS.6004")
    );
    // The KPS error names its code already: the one-line error does not repeat it.
    assert_eq!(gone.one_line(), gone.to_string());
    assert!(
        gone.one_line()
            .starts_with("KPS batch export failed: KPS.6004")
            || gone.one_line().starts_with("KPS export failed: KPS.6004"),
        "{}",
        gone.one_line()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_key_reports_its_failure_and_is_not_exported() {
    let s = Setup::new();
    s.fake.add_key("web");
    s.fake.add_key("db");
    let (manifest, client) = s.load("", "  web: out/web.pem\n  db: out/db.pem\n");
    let held = Cause::Listed(Unexportable::Frozen);
    let options = PassOptions {
        held: BTreeMap::from([("db".to_string(), held)]),
        ..PassOptions::default()
    };

    let report = pass(&manifest, &client, &options).await;

    assert!(outcome(&report, "web").result.is_ok());
    let db = failure(&report, "db");
    assert!(matches!(db, Cause::Listed(Unexportable::Frozen)), "{db:?}");
    assert_eq!(db.label(), "frozen");
    assert!(!s.path("out/db.pem").exists());
    assert_eq!(s.fake.stats().names_exported, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_mid_pass_leaves_every_file_whole_and_recorded() {
    let s = Setup::new();
    let names: Vec<String> = (0..30).map(|i| format!("k{i:02}")).collect();
    let mut keys = String::new();
    for name in &names {
        s.fake.add_key(name);
        keys.push_str(&format!("  {name}: out/{name}.pem\n"));
    }
    // One batch of 10 in flight at a time, each answered slowly: the token is cancelled while
    // the second batch waits on KPS.
    let (manifest, client) = s.load("  concurrency: 1\n", &keys);
    s.fake.set_latency(Duration::from_millis(400));
    let token = CancellationToken::new();
    let options = PassOptions {
        shutdown: token.clone(),
        ..PassOptions::default()
    };
    let running = {
        let (manifest, client, options) = (manifest.clone(), client.clone(), options.clone());
        tokio::spawn(async move { pass(&manifest, &client, &options).await })
    };
    let out = s.path("out");
    wait_for(|| count_keys(&out) > 0).await;
    token.cancel();
    let report = tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .expect("the pass stops soon after the token is cancelled")
        .unwrap();

    assert!(report.interrupted && !report.is_success(), "{report:?}");
    let written = count_keys(&out);
    assert!(
        (1..names.len()).contains(&written),
        "{written} keys written"
    );
    // Nothing half-written: no temporary file is left, every file is recorded with the
    // bytes on disk, and the keys not reached have no outcome at all.
    let leftovers: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| !n.ends_with(".pem"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let state = s.state();
    assert_eq!(state.files.len(), written);
    for (name, record) in &state.files {
        let bytes = std::fs::read(&record.path).unwrap();
        assert_eq!(
            kps_sync::observe::sha256_of(&bytes),
            record.sha256,
            "{name}"
        );
    }
    assert_eq!(report.outcomes.len(), written, "{:?}", report.outcomes);
    assert_eq!(report.failed, names.len() - written);

    // The next pass finds what was written in place and writes only the rest.
    s.fake.set_latency(Duration::ZERO);
    let next = pass(&manifest, &client, &PassOptions::default()).await;
    assert!(next.is_success(), "{next:?}");
    let kept = next
        .outcomes
        .iter()
        .filter(|o| o.change == Change::Keep)
        .count();
    assert_eq!(kept, written);
}

fn count_keys(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |entries| {
        entries
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".pem"))
            })
            .count()
    })
}

async fn wait_for(mut ready: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !ready() {
        assert!(tokio::time::Instant::now() < deadline, "timed out");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
