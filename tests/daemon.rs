//! `kps-sync run` end to end: the real binary against the fake KPS, in a temp folder, driven by
//! file edits and signals. Conditions are polled with a deadline, never waited for blindly.

mod common;

use common::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::fs::File;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Time enough for anything these tests wait for, on a loaded 2-core machine.
const DEADLINE: Duration = Duration::from_secs(10);

/// Fast triggers; a 1h interval, so the safety-net pass cannot be what fixed things.
const FAST: &str = "  debounce: 50ms\n  interval: 1h\n";

fn wait_for(what: &str, cond: impl FnMut() -> bool) {
    wait_until(what, DEADLINE, cond);
}

fn keys_yaml(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("  {n}: out/{n}.pem\n"))
        .collect()
}

/// A running daemon; killed on drop so a failed test leaves nothing behind.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn start(sb: &Sandbox, env: &[(&str, &str)]) -> Daemon {
        Daemon::start_with(sb, env, &[])
    }

    fn start_with(sb: &Sandbox, env: &[(&str, &str)], args: &[&str]) -> Daemon {
        // The log lives outside the manifest's folder: the daemon must not watch its own log.
        let log = sb.path(&format!("logs/daemon-{}.log", fastrand::u32(..)));
        std::fs::create_dir_all(log.parent().unwrap()).unwrap();
        let mut cmd = sb.cmd(&["run"]);
        cmd.args(args)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        Daemon {
            child: cmd.spawn().unwrap(),
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), sig).unwrap();
    }

    fn wait_log(&self, needle: &str) {
        wait_for(&format!("{needle:?} in the log"), || {
            self.log().contains(needle)
        });
    }

    fn count_in_log(&self, needle: &str) -> usize {
        self.log().matches(needle).count()
    }

    /// Wait for the process to exit, up to `within`.
    fn exit_within(&mut self, within: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < within {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- daemon log\n{}", self.log());
        }
    }
}

fn content_is(sb: &Sandbox, name: &str) -> bool {
    std::fs::read_to_string(sb.path(&format!("out/{name}.pem"))).ok() == sb.fake.private_key(name)
}

/// Wait for the first pass: every named key in place.
fn wait_in_place(sb: &Sandbox, names: &[&str]) {
    wait_for(&format!("{names:?} in place"), || {
        names.iter().all(|n| content_is(sb, n))
    });
}

fn temp_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".tmp"))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn restores_a_deleted_file_and_an_altered_one_with_one_export_each() {
    let sb = Sandbox::new();
    sb.fake.add_key("a");
    sb.fake.add_key("b");
    sb.manifest(FAST, &keys_yaml(&["a", "b"]));
    let d = Daemon::start(&sb, &[]);
    wait_in_place(&sb, &["a", "b"]);
    d.wait_log("pass done");
    sb.fake.reset_stats();

    std::fs::remove_file(sb.path("out/a.pem")).unwrap();
    wait_in_place(&sb, &["a"]);
    d.wait_log("drift=1");
    assert!(
        d.log().contains("out/a.pem"),
        "the drift is logged with its path"
    );

    std::fs::write(sb.path("out/b.pem"), "tampered").unwrap();
    wait_for("b restored", || content_is(&sb, "b"));
    d.wait_log("drift=2");
    assert_eq!(mode_of(&sb.path("out/b.pem")), 0o600);

    // Nothing else should follow: one export per restored key, and the re-plan after our own
    // writes finds nothing to do.
    std::thread::sleep(Duration::from_millis(500));
    let stats = sb.fake.stats();
    assert_eq!(
        stats.batch_export_calls, 2,
        "one export for each drifted key: {stats:?}"
    );
    assert!(temp_files(&sb.path("out")).is_empty());
}

#[test]
fn a_chmod_is_fixed_without_an_export() {
    let sb = Sandbox::new();
    sb.fake.add_key("a");
    sb.manifest(FAST, &keys_yaml(&["a"]));
    let d = Daemon::start(&sb, &[]);
    wait_in_place(&sb, &["a"]);
    d.wait_log("pass done");
    sb.fake.reset_stats();
    std::fs::set_permissions(
        sb.path("out/a.pem"),
        std::os::unix::fs::PermissionsExt::from_mode(0o640),
    )
    .unwrap();
    wait_for("mode back to 0600", || {
        mode_of(&sb.path("out/a.pem")) == 0o600
    });
    d.wait_log("drift=1");
    assert_eq!(sb.fake.stats().batch_export_calls, 0);
}

#[test]
fn an_editor_save_by_rename_is_seen_and_a_touch_is_not() {
    let sb = Sandbox::new();
    sb.fake.add_key("a");
    sb.fake.add_key("b");
    let manifest = sb.manifest(FAST, &keys_yaml(&["a"]));
    let d = Daemon::start_with(&sb, &[], &["--log-level", "kps_sync=debug,info"]);
    wait_in_place(&sb, &["a"]);
    d.wait_log("pass done");

    // Same bytes again, as `touch` or a save without edits: hashed, not reloaded.
    let same = std::fs::read(&manifest).unwrap();
    std::fs::write(&manifest, &same).unwrap();
    d.wait_log("content unchanged");
    assert!(!d.log().contains("manifest loaded"), "{}", d.log());

    // vim/emacs style: write a sibling, rename it over the manifest.
    let text = format!("{}{}keys:\n{}", sb.header(), FAST, keys_yaml(&["a", "b"]));
    let swap = sb.path(".manifest.yaml.swp");
    std::fs::write(&swap, text).unwrap();
    std::fs::rename(&swap, &manifest).unwrap();
    wait_in_place(&sb, &["b"]);
    assert_eq!(d.count_in_log("manifest loaded"), 1, "{}", d.log());
}

#[test]
fn a_configmap_style_data_symlink_swap_is_seen() {
    let sb = Sandbox::new();
    sb.fake.add_key("a");
    sb.fake.add_key("b");
    // Absolute paths: what the manifest's relative paths mean is not under test here.
    let header = format!(
        "version: 1\nkps:\n  endpoint: {}\n  project_id: {}\n  auth:\n    token_file: {}\nsettings:\n  state_dir: {}\n{FAST}",
        sb.fake.url(),
        fake_kps::PROJECT_ID,
        sb.path("token").display(),
        sb.path("state").display(),
    );
    let keys = |names: &[&str]| -> String {
        names
            .iter()
            .map(|n| format!("  {n}: {}\n", sb.path(&format!("out/{n}.pem")).display()))
            .collect()
    };
    let cfg = sb.path("cfg");
    let version = |name: &str, text: String| {
        std::fs::create_dir_all(cfg.join(name)).unwrap();
        std::fs::write(cfg.join(name).join("manifest.yaml"), text).unwrap();
    };
    version(
        "..2024_01_01_00_00_00.1",
        format!("{header}keys:\n{}", keys(&["a"])),
    );
    std::os::unix::fs::symlink("..2024_01_01_00_00_00.1", cfg.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/manifest.yaml", cfg.join("manifest.yaml")).unwrap();
    // Not `sb.cmd`: that one points -m at the sandbox's own manifest.
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_kps-sync"));
    cmd.arg("run")
        .arg("-m")
        .arg(cfg.join("manifest.yaml"))
        .current_dir(sb.path(""))
        .env_remove("KPS_SYNC_AUTH_TOKEN")
        .env_remove("HUAWEICLOUD_SDK_AK")
        .env_remove("HUAWEICLOUD_SDK_SK")
        .env_remove("RUST_LOG")
        .env_remove("NOTIFY_SOCKET")
        .env("HOME", sb.path(""));
    let log = sb.path("cfg-daemon.log");
    let child = cmd
        .stdout(Stdio::null())
        .stderr(File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let d = Daemon { child, log };
    wait_in_place(&sb, &["a"]);
    d.wait_log("pass done");

    // What the kubelet does: a new timestamped folder, a new `..data_tmp` link renamed over
    // `..data`, the old folder removed.
    version(
        "..2024_01_01_00_01_00.2",
        format!("{header}keys:\n{}", keys(&["a", "b"])),
    );
    std::os::unix::fs::symlink("..2024_01_01_00_01_00.2", cfg.join("..data_tmp")).unwrap();
    std::fs::rename(cfg.join("..data_tmp"), cfg.join("..data")).unwrap();
    std::fs::remove_dir_all(cfg.join("..2024_01_01_00_00_00.1")).unwrap();
    wait_in_place(&sb, &["b"]);
    d.wait_log("manifest loaded");
}

#[test]
fn a_broken_edit_is_logged_with_its_line_and_ignored_then_a_fix_applies() {
    let sb = Sandbox::new();
    sb.fake.add_key("a");
    sb.fake.add_key("b");
    let manifest = sb.manifest(FAST, &keys_yaml(&["a"]));
    let d = Daemon::start(&sb, &[]);
    wait_in_place(&sb, &["a"]);
    d.wait_log("pass done");
    let before = tree(&sb.path("out"));

    let good = std::fs::read_to_string(&manifest).unwrap();
    let broken_line = good.lines().count() + 1;
    std::fs::write(&manifest, format!("{good}  b: [out/b.pem\n")).unwrap();
    d.wait_log("manifest edit ignored");
    let log = d.log();
    assert!(
        log.contains(&format!("line {broken_line} column 6")),
        "line and column: {log}"
    );
    assert_eq!(tree(&sb.path("out")), before, "no file touched");

    // The last good manifest stays in force: a drift is still repaired.
    std::fs::remove_file(sb.path("out/a.pem")).unwrap();
    wait_in_place(&sb, &["a"]);
    assert!(!sb.path("out/b.pem").exists());

    std::fs::write(&manifest, format!("{good}  b: out/b.pem\n")).unwrap();
    wait_in_place(&sb, &["b"]);
    d.wait_log("manifest loaded");
}

#[test]
fn sighup_reloads_now() {
    let sb = Sandbox::new();
    sb.fake.add_key("a");
    sb.fake.add_key("b");
    // A debounce far beyond the deadline: only SIGHUP can make the edit apply in time.
    let slow = "  debounce: 1h\n  interval: 1h\n";
    let manifest = sb.manifest(slow, &keys_yaml(&["a"]));
    let d = Daemon::start(&sb, &[]);
    wait_in_place(&sb, &["a"]);
    d.wait_log("pass done");
    sb.manifest(slow, &keys_yaml(&["a", "b"]));
    std::thread::sleep(Duration::from_millis(300));
    assert!(!sb.path("out/b.pem").exists(), "debounce 1h: not yet");
    d.signal(Signal::SIGHUP);
    wait_in_place(&sb, &["b"]);
    d.wait_log("SIGHUP");
    assert!(manifest.exists());
}

#[test]
fn sigterm_exits_zero_promptly() {
    let sb = Sandbox::new();
    sb.fake.add_key("a");
    sb.manifest(FAST, &keys_yaml(&["a"]));
    let mut d = Daemon::start(&sb, &[]);
    wait_in_place(&sb, &["a"]);
    d.wait_log("pass done");
    let start = Instant::now();
    d.signal(Signal::SIGTERM);
    let status = d
        .exit_within(Duration::from_secs(2))
        .expect("exited within 2 s");
    assert_eq!(status.code(), Some(0), "{}", d.log());
    assert!(start.elapsed() < Duration::from_secs(2));
    d.wait_log("stopped");
}

#[test]
fn sigterm_during_a_slow_pass_exits_zero_and_leaves_no_partial_file() {
    let sb = Sandbox::new();
    for n in ["a", "b", "c"] {
        sb.fake.add_key(n);
    }
    sb.fake.set_latency(Duration::from_secs(5));
    sb.manifest(
        &format!("{FAST}  concurrency: 1\n"),
        &keys_yaml(&["a", "b", "c"]),
    );
    let mut d = Daemon::start(&sb, &[]);
    wait_for("the export request in flight", || {
        sb.fake.stats().batch_export_calls > 0
    });
    d.signal(Signal::SIGINT);
    let status = d
        .exit_within(Duration::from_secs(3))
        .expect("exited within 3 s");
    assert_eq!(status.code(), Some(0), "{}", d.log());
    assert!(temp_files(&sb.path("out")).is_empty());
    for n in ["a", "b", "c"] {
        let p = sb.path(&format!("out/{n}.pem"));
        assert!(!p.exists() || content_is(&sb, n), "{n}: whole or absent");
    }
}

#[test]
fn keys_written_before_sigterm_stay_recorded_as_ours() {
    let sb = Sandbox::new();
    let names: Vec<String> = (0..20).map(|i| format!("k{i:02}")).collect();
    for n in &names {
        sb.fake.add_key(n);
    }
    // Slower than the daemon's grace period after SIGTERM, so only cancelling the export in
    // flight gets the state saved in time.
    sb.fake.set_latency(Duration::from_millis(3000));
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    sb.manifest(&format!("{FAST}  concurrency: 1\n"), &keys_yaml(&refs));
    let mut d = Daemon::start(&sb, &[]);
    // The first batch of ten lands; the second is in flight when SIGTERM comes.
    let written = || {
        std::fs::read_dir(sb.path("out"))
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| e.path().extension().is_some_and(|x| x == "pem"))
                    .count()
            })
            .unwrap_or(0)
    };
    wait_for("the first batch written", || written() == 10);
    d.signal(Signal::SIGTERM);
    let status = d
        .exit_within(Duration::from_secs(2))
        .expect("exited within 2 s");
    assert_eq!(status.code(), Some(0), "{}", d.log());
    sb.fake.set_latency(Duration::ZERO);
    sb.fake.reset_stats();
    assert_eq!(
        written(),
        10,
        "the batch in flight was dropped, not written"
    );
    let run = sb.reconcile();
    assert_eq!(
        run.code, 0,
        "no key written by the daemon is taken for someone else's: {run:?}"
    );
    assert_eq!(
        sb.fake.stats().batch_export_calls,
        1,
        "only the second batch is left"
    );
}

#[test]
fn a_concurrent_reconcile_waits_for_the_daemons_lock_then_fails_clearly() {
    let sb = Sandbox::new();
    sb.fake.add_key("a");
    sb.manifest(FAST, &keys_yaml(&["a"]));
    let d = Daemon::start(&sb, &[]);
    wait_in_place(&sb, &["a"]);
    d.wait_log("pass done");
    let start = Instant::now();
    let run = sb.reconcile();
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("holds the lock"), "{run:?}");
    assert!(
        start.elapsed() >= Duration::from_secs(9),
        "it waited LOCK_WAIT first"
    );
    // A second daemon is refused the same way.
    let mut second = Daemon::start(&sb, &[]);
    let status = second
        .exit_within(Duration::from_secs(15))
        .expect("second daemon gives up");
    assert_eq!(status.code(), Some(1));
    assert!(second.log().contains("holds the lock"), "{}", second.log());
}

/// Collect datagrams until `until` matches one, or the deadline.
fn collect_until(sock: &UnixDatagram, got: &mut Vec<String>, until: impl Fn(&str) -> bool) {
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    while start.elapsed() < DEADLINE {
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            let done = until(&msg);
            got.push(msg);
            if done {
                return;
            }
        }
    }
    panic!("no matching notify message; got {got:?}");
}

#[test]
fn speaks_the_notify_protocol_ready_status_watchdog_stopping() {
    let sb = Sandbox::new();
    sb.fake.add_key("a");
    sb.manifest(FAST, &keys_yaml(&["a"]));
    let sock_path = sb.path("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    let mut d = Daemon::start(
        &sb,
        &[
            ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "200000"),
        ],
    );
    let mut got = Vec::new();
    collect_until(&sock, &mut got, |m| m.contains("READY=1"));
    let ready = got.last().unwrap();
    assert!(
        ready.contains("STATUS=1 managed, 1 in place, 0 failed; last pass "),
        "{ready}"
    );
    assert!(ready.contains("drift 0"), "{ready}");
    assert!(content_is(&sb, "a"), "READY=1 only after the first pass");

    // The watchdog every 100 ms: several in half a second.
    let before = got.iter().filter(|m| *m == "WATCHDOG=1").count();
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(600) {
        collect_until(&sock, &mut got, |m| m == "WATCHDOG=1");
    }
    assert!(
        got.iter().filter(|m| *m == "WATCHDOG=1").count() >= before + 3,
        "{got:?}"
    );

    std::fs::remove_file(sb.path("out/a.pem")).unwrap();
    collect_until(&sock, &mut got, |m| {
        m.starts_with("STATUS=") && m.contains("drift 1")
    });

    d.signal(Signal::SIGTERM);
    collect_until(&sock, &mut got, |m| m == "STOPPING=1");
    assert_eq!(
        d.exit_within(Duration::from_secs(2)).and_then(|s| s.code()),
        Some(0)
    );
    assert_eq!(
        got.iter().filter(|m| m.contains("READY=1")).count(),
        1,
        "{got:?}"
    );
}

#[test]
fn failed_keys_still_report_ready_and_are_retried() {
    let sb = Sandbox::new();
    sb.fake.add_key("a");
    // `late` does not exist yet; a 1s interval caps the retry backoff at 1s.
    sb.manifest(
        "  debounce: 50ms\n  interval: 1s\n",
        &keys_yaml(&["a", "late"]),
    );
    let name = format!("kps-sync-test-{}-{}", std::process::id(), fastrand::u64(..));
    let addr =
        <std::os::unix::net::SocketAddr as std::os::linux::net::SocketAddrExt>::from_abstract_name(
            name.as_bytes(),
        )
        .unwrap();
    let sock = UnixDatagram::bind_addr(&addr).unwrap();
    let d = Daemon::start(&sb, &[("NOTIFY_SOCKET", &format!("@{name}"))]);
    let mut got = Vec::new();
    collect_until(&sock, &mut got, |m| m.contains("READY=1"));
    let ready = got.last().unwrap();
    assert!(
        ready.contains("2 managed, 1 in place, 1 failed (late: "),
        "{ready}"
    );
    d.wait_log("retrying");

    sb.fake.add_key("late");
    wait_in_place(&sb, &["late"]);
    collect_until(&sock, &mut got, |m| {
        m.contains("2 managed, 2 in place, 0 failed")
    });
}

#[test]
fn polling_mode_sees_drift_and_manifest_edits() {
    let sb = Sandbox::new();
    sb.fake.add_key("a");
    sb.fake.add_key("b");
    let settings = format!("{FAST}  watch: poll\n");
    sb.manifest(&settings, &keys_yaml(&["a"]));
    let d = Daemon::start(&sb, &[]);
    wait_in_place(&sb, &["a"]);
    d.wait_log("watch=\"poll\"");
    // Polling takes what a pass leaves as its new baseline, so delete only once the pass is
    // over: a deletion during the pass is left to the interval pass (see daemon/watcher.rs).
    d.wait_log("pass done");
    std::fs::remove_file(sb.path("out/a.pem")).unwrap();
    wait_in_place(&sb, &["a"]);
    sb.manifest(&settings, &keys_yaml(&["a", "b"]));
    wait_in_place(&sb, &["b"]);
}

#[test]
fn a_removed_destination_folder_is_made_again_and_watched_again() {
    let sb = Sandbox::new();
    sb.fake.add_key("a");
    sb.manifest(FAST, &keys_yaml(&["a"]));
    let d = Daemon::start(&sb, &[]);
    wait_in_place(&sb, &["a"]);
    d.wait_log("pass done");
    std::fs::remove_dir_all(sb.path("out")).unwrap();
    wait_in_place(&sb, &["a"]);
    // The new folder is watched: a second deletion is seen too.
    d.wait_log("drift=1");
    std::fs::remove_file(sb.path("out/a.pem")).unwrap();
    wait_in_place(&sb, &["a"]);
    d.wait_log("drift=2");
}

#[test]
fn a_daemon_pass_sees_a_rotation_in_kps_with_no_file_changed_and_replaces_only_that_key() {
    let sb = Sandbox::new();
    sb.fake.add_key("a");
    sb.fake.add_key("b");
    sb.manifest(
        "  interval: 1s\n  rotation_check: 0s\n",
        &keys_yaml(&["a", "b"]),
    );
    let d = Daemon::start(&sb, &[]);
    wait_in_place(&sb, &["a", "b"]);
    d.wait_log("pass done");
    let b_before = std::fs::metadata(sb.path("out/b.pem")).unwrap();
    sb.fake.reset_stats();
    sb.fake.rotate_key("a");
    // Nothing on disk changed: only a listing (at the latest, the 1 s interval pass) shows it.
    wait_in_place(&sb, &["a"]);
    d.wait_log("action=\"rotate\"");
    let stats = sb.fake.stats();
    assert_eq!(stats.names_exported, 1, "only the rotated key: {stats:?}");
    let b_after = std::fs::metadata(sb.path("out/b.pem")).unwrap();
    assert_eq!(
        std::os::unix::fs::MetadataExt::ino(&b_after),
        std::os::unix::fs::MetadataExt::ino(&b_before)
    );
}
