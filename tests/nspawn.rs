//! The Debian package under a real systemd: a throwaway container (`systemd-nspawn --ephemeral
//! --boot`, systemd as PID 1 on a minimal Debian root without procps) installs the .deb built
//! by `.ci/build-deb`, and the units are checked against the fake KPS on the host's loopback
//! (the container shares the host's network):
//! - install: the timer enabled and active, the daemon not enabled, /var/lib/kps-sync and
//!   /etc/kps-sync/credentials at 0700, the man page installed;
//! - the timer fires a clean oneshot that writes the keys (0600 root, 0400 backup:backup)
//!   under ProtectSystem=strict, with the token handed over by `LoadCredential=`;
//! - the daemon reaches `active (running)` on READY=1, restores deleted keys, keeps a 2 s
//!   watchdog fed, serves /metrics to the host, reloads (SIGHUP, no procps) and stops with 0.
//!
//! Needs root, systemd-nspawn (Debian's systemd-container), mmdebstrap and the .deb
//! (`KPS_SYNC_DEB`, else target/debian/kps-sync.deb). The root is built once, from Debian's
//! archive, and cached in /var/cache/kps-sync-ci/bookworm (`KPS_SYNC_NSPAWN_ROOT`). Outside CI
//! a missing piece skips the test with the reason; under CI it fails.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::FakeKps;

const DEFAULT_ROOT: &str = "/var/cache/kps-sync-ci/bookworm";

/// Why the test cannot run here, if it cannot.
fn missing_piece(deb: &Path) -> Option<String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Some("not root".into());
    }
    for tool in ["systemd-nspawn", "mmdebstrap", "nsenter"] {
        if Command::new(tool).arg("--version").output().is_err() {
            return Some(format!("{tool} is not installed"));
        }
    }
    if !deb.is_file() {
        return Some(format!(
            "{} does not exist: build it with .ci/build-deb",
            deb.display()
        ));
    }
    None
}

fn deb_path() -> PathBuf {
    std::env::var_os("KPS_SYNC_DEB")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/debian/kps-sync.deb"))
}

/// The cached minimal root, built on first use.
fn root() -> PathBuf {
    let root = std::env::var_os("KPS_SYNC_NSPAWN_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_ROOT));
    if root.join("usr/lib/systemd/systemd").exists() {
        return root;
    }
    let building = root.with_extension("building");
    let _ = std::fs::remove_dir_all(&building);
    std::fs::create_dir_all(root.parent().unwrap()).unwrap();
    let started = Instant::now();
    let out = Command::new("mmdebstrap")
        .args([
            "--variant=minbase",
            "--include=systemd,systemd-sysv,dbus",
            "bookworm",
        ])
        .arg(&building)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mmdebstrap failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::rename(&building, &root).unwrap();
    eprintln!("built {} in {:?}", root.display(), started.elapsed());
    root
}

/// A booted container; powered off (then killed if need be) on drop.
struct Container {
    nspawn: Child,
    /// The container's PID 1 as the host sees it.
    init: u32,
}

impl Container {
    fn boot(root: &Path, log: &Path) -> Container {
        let log = std::fs::File::create(log).unwrap();
        let nspawn = Command::new("systemd-nspawn")
            .arg("-D")
            .arg(root)
            .args([
                "--ephemeral",
                "--boot",
                "--register=no",
                "--keep-unit",
                "-q",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let children = format!("/proc/{}/task/{}/children", nspawn.id(), nspawn.id());
        // nspawn's children come and go while it sets up (the ephemeral copy, helpers): the
        // init is the child that has become systemd.
        let init = loop {
            let text = std::fs::read_to_string(&children).unwrap_or_default();
            let systemd = text.split_whitespace().find(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .is_ok_and(|comm| comm.trim() == "systemd")
            });
            if let Some(pid) = systemd {
                break pid.parse().unwrap();
            }
            assert!(Instant::now() < deadline, "the container did not start");
            std::thread::sleep(Duration::from_millis(50));
        };
        let c = Container { nspawn, init };
        // Booted when the manager answers and its start-up jobs are done.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (_, state) = c.run(&["systemctl", "is-system-running"]);
            if matches!(state.trim(), "running" | "degraded") {
                break;
            }
            assert!(Instant::now() < deadline, "not booted: {state}");
            std::thread::sleep(Duration::from_millis(100));
        }
        c
    }

    /// Run a command inside (all its namespaces): exit code and stdout+stderr.
    fn run(&self, args: &[&str]) -> (i32, String) {
        let out = Command::new("nsenter")
            .args(["-t", &self.init.to_string(), "-a"])
            .args(args)
            .output()
            .unwrap();
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        (out.status.code().unwrap_or(-1), text)
    }

    fn ok(&self, args: &[&str]) -> String {
        let (code, text) = self.run(args);
        assert_eq!(code, 0, "{args:?}: {text}");
        text
    }

    /// `systemctl show -p NAME --value UNIT`.
    fn prop(&self, unit: &str, name: &str) -> String {
        self.ok(&["systemctl", "show", "-p", name, "--value", unit])
            .trim()
            .to_owned()
    }

    /// A path inside the container, seen from the host.
    fn path(&self, inside: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root{inside}", self.init))
    }

    fn write(&self, inside: &str, text: &str, mode: u32) {
        let path = self.path(inside);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    fn wait_for(&self, what: &str, secs: u64, mut done: impl FnMut(&Container) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !done(self) {
            assert!(
                Instant::now() < deadline,
                "{what}: not within {secs} s\n{}",
                self.run(&["journalctl", "--no-pager", "-n", "60"]).1
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = self.run(&["systemctl", "poweroff"]);
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.nspawn.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
    }
}

fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\n\r\n").ok()?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).ok()?;
    Some(answer)
}

#[test]
fn the_package_under_a_real_systemd() {
    let deb = deb_path();
    if let Some(why) = missing_piece(&deb) {
        assert!(
            std::env::var_os("CI").is_none(),
            "the real-systemd test cannot run in CI: {why}"
        );
        eprintln!("skipped: {why}");
        return;
    }
    let started = Instant::now();
    let root = root();
    let fake = FakeKps::start();
    fake.add_key("web");
    fake.add_key("db-backup");
    let scratch = tempfile::tempdir().unwrap();
    let c = Container::boot(&root, &scratch.path().join("console.log"));
    eprintln!("booted in {:?}", started.elapsed());
    assert!(
        !c.path("/usr/bin/kill").exists() && !c.path("/bin/kill").exists(),
        "the root must lack procps, as a minimal host does"
    );

    // Install.
    std::fs::copy(&deb, c.path("/tmp/kps-sync.deb")).unwrap();
    c.ok(&["dpkg", "-i", "/tmp/kps-sync.deb"]);
    assert_eq!(
        c.prop("kps-sync-reconcile.timer", "UnitFileState"),
        "enabled"
    );
    assert_eq!(c.prop("kps-sync-reconcile.timer", "ActiveState"), "active");
    assert_eq!(c.prop("kps-sync.service", "UnitFileState"), "disabled");
    assert_eq!(c.prop("kps-sync.service", "ActiveState"), "inactive");
    for dir in ["/var/lib/kps-sync", "/etc/kps-sync/credentials"] {
        let meta = std::fs::metadata(c.path(dir)).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o700, "{dir}");
    }
    let conffile = std::fs::read_to_string(c.path("/etc/kps-sync/manifest.yaml")).unwrap();
    assert!(conffile.contains("ecs_metadata: {}"), "{conffile}");
    assert!(c.path("/usr/share/man/man1/kps-sync.1.gz").exists());
    // The unedited template is valid and manages nothing.
    let out = c.ok(&["kps-sync", "validate"]);
    assert!(out.contains("ok, 0 keys"), "{out}");

    // Configure: a token in the credentials folder, the fake's endpoint, two keys.
    c.write(
        "/etc/kps-sync/credentials/token",
        &format!("{}\n", fake_kps::TOKEN),
        0o600,
    );
    std::fs::create_dir_all(c.path("/etc/ssh/keys")).unwrap();
    std::fs::set_permissions(
        c.path("/etc/ssh/keys"),
        std::fs::Permissions::from_mode(0o700),
    )
    .unwrap();
    let backup_dir = c.path("/srv/backup/.ssh");
    std::fs::create_dir_all(&backup_dir).unwrap();
    std::fs::set_permissions(&backup_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    // Debian's base-passwd: backup is uid and gid 34.
    nix::unistd::chown(&backup_dir, Some(34.into()), Some(34.into())).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    c.write(
        "/etc/kps-sync/manifest.yaml",
        &format!(
            "version: 1\nkps:\n  endpoint: {}\n  project_id: {}\n  auth:\n    token_file: $CREDENTIALS_DIRECTORY/kps_token\nsettings:\n  state_dir: /var/lib/kps-sync\n  metrics_listen: 127.0.0.1:{port}\nkeys:\n  web: /etc/ssh/keys/web.pem\n  db-backup:\n    path: /srv/backup/.ssh/id_backup\n    mode: \"0400\"\n    owner: backup\n    group: backup\n",
            fake.url(),
            fake_kps::PROJECT_ID
        ),
        0o600,
    );
    let paths = "[Service]\nReadWritePaths=/etc/ssh/keys /srv/backup/.ssh\n";
    c.write(
        "/etc/systemd/system/kps-sync.service.d/paths.conf",
        paths,
        0o644,
    );
    c.write(
        "/etc/systemd/system/kps-sync-reconcile.service.d/paths.conf",
        paths,
        0o644,
    );
    // Fire soon rather than at the next quarter hour.
    c.write(
        "/etc/systemd/system/kps-sync-reconcile.timer.d/soon.conf",
        "[Timer]\nOnActiveSec=1s\nRandomizedDelaySec=0\n",
        0o644,
    );
    c.write(
        "/etc/systemd/system/kps-sync.service.d/watchdog.conf",
        "[Service]\nWatchdogSec=2s\n",
        0o644,
    );
    c.ok(&["systemctl", "daemon-reload"]);
    c.ok(&["systemctl", "restart", "kps-sync-reconcile.timer"]);

    // The timer fires a clean oneshot.
    c.wait_for("the timer's oneshot ran", 30, |c| {
        c.prop(
            "kps-sync-reconcile.service",
            "ExecMainExitTimestampMonotonic",
        ) != "0"
    });
    assert_eq!(c.prop("kps-sync-reconcile.service", "Result"), "success");
    assert_eq!(c.prop("kps-sync-reconcile.service", "ExecMainStatus"), "0");
    let web = std::fs::metadata(c.path("/etc/ssh/keys/web.pem")).unwrap();
    assert_eq!((web.mode() & 0o7777, web.uid(), web.gid()), (0o600, 0, 0));
    let backup = std::fs::metadata(c.path("/srv/backup/.ssh/id_backup")).unwrap();
    assert_eq!(
        (backup.mode() & 0o7777, backup.uid(), backup.gid()),
        (0o400, 34, 34)
    );
    assert_eq!(
        std::fs::read_to_string(c.path("/etc/ssh/keys/web.pem")).unwrap(),
        fake.private_key("web").unwrap()
    );
    c.ok(&["systemctl", "disable", "--now", "kps-sync-reconcile.timer"]);

    // The daemon: start returns on READY=1, after a first pass that restores a deleted key.
    std::fs::remove_file(c.path("/etc/ssh/keys/web.pem")).unwrap();
    let exports_before = fake.stats().batch_export_calls;
    c.ok(&["systemctl", "start", "kps-sync.service"]);
    assert_eq!(c.prop("kps-sync.service", "ActiveState"), "active");
    assert_eq!(c.prop("kps-sync.service", "SubState"), "running");
    let status = c.prop("kps-sync.service", "StatusText");
    assert!(
        status.contains("2 managed, 2 in place, 0 failed"),
        "{status}"
    );
    assert!(c.path("/etc/ssh/keys/web.pem").exists());
    assert!(fake.stats().batch_export_calls > exports_before);
    let pid = c.prop("kps-sync.service", "MainPID");

    // The watchdog (2 s) stays fed for 5 s; /metrics answers on the host's loopback.
    let fed = c.prop("kps-sync.service", "WatchdogTimestampMonotonic");
    std::thread::sleep(Duration::from_secs(5));
    assert_ne!(
        c.prop("kps-sync.service", "WatchdogTimestampMonotonic"),
        fed
    );
    assert_eq!(c.prop("kps-sync.service", "MainPID"), pid);
    assert_eq!(c.prop("kps-sync.service", "NRestarts"), "0");
    let scrape = http_get(port, "/metrics").expect("the daemon's /metrics answers");
    assert!(
        scrape.contains("kps_sync_keys{state=\"in_place\"} 2"),
        "{scrape}"
    );

    // Reload: SIGHUP through the shell's kill, no procps; same process.
    c.ok(&["systemctl", "reload", "kps-sync.service"]);
    c.wait_for("SIGHUP logged", 10, |c| {
        c.run(&["journalctl", "-u", "kps-sync", "--no-pager"])
            .1
            .contains("SIGHUP: reloading the manifest")
    });
    assert_eq!(c.prop("kps-sync.service", "MainPID"), pid);
    assert_eq!(c.prop("kps-sync.service", "ActiveState"), "active");

    // Stop: exit 0.
    c.ok(&["systemctl", "stop", "kps-sync.service"]);
    assert_eq!(c.prop("kps-sync.service", "Result"), "success");
    assert_eq!(c.prop("kps-sync.service", "ExecMainStatus"), "0");
    let journal = c.run(&["journalctl", "--no-pager"]).1;
    assert!(
        !journal.contains(fake_kps::TOKEN),
        "the token reached the journal"
    );
    drop(c);
    eprintln!("real-systemd test took {:?}", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(180));
}
