//! The daemon's retries follow the failure's class, and its own writes never wake it: the real
//! binary (`kps-sync run`) against the fake KPS, counting the KPS calls each trigger costs.

mod common;

use common::*;
use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::Duration;

/// The client's own retries within a pass can take 15 s; room for a loaded machine.
const DEADLINE: Duration = Duration::from_secs(30);

fn wait_for(what: &str, cond: impl FnMut() -> bool) {
    wait_until(what, DEADLINE, cond);
}

struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn start(sb: &Sandbox) -> Daemon {
        let log = sb.path(&format!("logs/daemon-{}.log", fastrand::u32(..)));
        std::fs::create_dir_all(log.parent().unwrap()).unwrap();
        let child = sb
            .cmd(&["run", "--log-level", "debug"])
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Daemon { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn passes(&self) -> usize {
        self.log().matches("pass done").count()
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

fn exports(sb: &Sandbox) -> u64 {
    let s = sb.fake.stats();
    s.batch_export_calls + s.single_export_calls
}

/// A restore is the daemon's own rename in a watched folder: it must not start another pass,
/// and the key that fails permanently (`gone`: KPS.6004) is not exported again by the drift pass.
#[test]
fn own_writes_do_not_wake_the_daemon_and_a_permanent_failure_is_held() {
    let sb = Sandbox::new();
    sb.fake.add_key("a");
    sb.fake.add_key("b");
    sb.manifest(
        "  debounce: 50ms\n  interval: 1h\n",
        "  a: out/a.pem\n  b: out/b.pem\n  gone: out/gone.pem\n",
    );
    let d = Daemon::start(&sb);
    wait_for("the first pass, with `gone` held", || {
        d.log().contains("retrying them at the next interval")
    });
    assert_eq!(d.passes(), 1);
    let after_first = exports(&sb);

    // Quiet: nothing happens by itself (the first pass's own writes woke nobody).
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(d.passes(), 1, "the first pass's own writes started a pass");

    std::fs::remove_file(sb.path("out/a.pem")).unwrap();
    wait_for("a restored", || {
        std::fs::read_to_string(sb.path("out/a.pem")).ok() == sb.fake.private_key("a")
    });
    wait_for("the drift pass done", || d.passes() == 2);
    assert_eq!(
        exports(&sb) - after_first,
        1,
        "the drift pass exports `a` only, in one call; `gone` is held"
    );
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(
        d.passes(),
        2,
        "the restore's rename started another pass:\n{}",
        d.log()
    );
    assert!(d.log().contains("our own writes"), "{}", d.log());

    // A manifest change releases the held key: it is tried again, once.
    sb.fake.add_key("gone");
    let text = std::fs::read_to_string(sb.path("manifest.yaml")).unwrap();
    std::fs::write(sb.path("manifest.yaml"), format!("{text}# edited\n")).unwrap();
    wait_for("gone exported after the manifest changed", || {
        std::fs::read_to_string(sb.path("out/gone.pem")).ok() == sb.fake.private_key("gone")
    });
}

/// A transient failure (KPS answering 503 past the client's own retries) is retried by the
/// daemon after its backoff, long before the 1 h interval.
#[test]
fn a_transient_failure_is_retried_with_backoff() {
    let sb = Sandbox::new();
    sb.fake.add_key("a");
    sb.manifest("  debounce: 50ms\n  interval: 1h\n", "  a: out/a.pem\n");
    // More than the client's 6 attempts at the listing (which the pass then goes without) and
    // 6 more at the export: the key fails for a transient reason.
    sb.fake.fail_next(12, 503);
    let d = Daemon::start(&sb);
    wait_for("the first pass, failed and to be retried", || {
        d.log()
            .contains("the pass did not bring every key in place; retrying")
    });
    assert_eq!(d.passes(), 1);
    wait_for("a written by the retry", || {
        std::fs::read_to_string(sb.path("out/a.pem")).ok() == sb.fake.private_key("a")
    });
    wait_for("the retry pass done", || d.passes() == 2);
}
