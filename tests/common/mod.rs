//! Shared test harness: a temp folder with a manifest and a token file, the real `kps-sync`
//! binary run against the fake KPS on loopback.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub use fake_kps::FakeKps;

pub struct Sandbox {
    pub dir: tempfile::TempDir,
    pub fake: FakeKps,
}

/// What a run of the binary printed and how it exited.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn from(out: Output) -> Run {
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    pub fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

impl Sandbox {
    pub fn new() -> Sandbox {
        let dir = tempfile::tempdir().unwrap();
        let fake = FakeKps::start();
        let token = dir.path().join("token");
        std::fs::write(&token, format!("{}\n", fake_kps::TOKEN)).unwrap();
        std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        Sandbox { dir, fake }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// The `kps:` block pointing at the fake with the token file, plus a state_dir.
    pub fn header(&self) -> String {
        format!(
            "version: 1\nkps:\n  endpoint: {}\n  project_id: {}\n  auth:\n    token_file: token\nsettings:\n  state_dir: state\n",
            self.fake.url(),
            fake_kps::PROJECT_ID
        )
    }

    /// Write a manifest: the header, any extra `settings:` lines, then `keys:` with `keys_yaml`
    /// (already indented by two spaces).
    pub fn manifest(&self, settings_extra: &str, keys_yaml: &str) -> PathBuf {
        let text = format!("{}{}keys:\n{}", self.header(), settings_extra, keys_yaml);
        self.write_manifest(&text)
    }

    pub fn write_manifest(&self, text: &str) -> PathBuf {
        let path = self.path("manifest.yaml");
        std::fs::write(&path, text).unwrap();
        path
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kps-sync"));
        cmd.args(args)
            .arg("-m")
            .arg(self.path("manifest.yaml"))
            .current_dir(self.dir.path())
            .env_remove("KPS_SYNC_AUTH_TOKEN")
            .env_remove("HUAWEICLOUD_SDK_AK")
            .env_remove("HUAWEICLOUD_SDK_SK")
            .env_remove("RUST_LOG")
            .env("HOME", self.dir.path());
        cmd
    }

    pub fn run(&self, args: &[&str]) -> Run {
        Run::from(self.cmd(args).output().unwrap())
    }

    pub fn reconcile(&self) -> Run {
        self.run(&["reconcile"])
    }
}

pub fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).unwrap().mode() & 0o7777
}

/// Every file under `dir`, relative, sorted (to prove nothing else was written).
pub fn tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            let p = entry.path();
            let rel = p.strip_prefix(base).unwrap().display().to_string();
            if entry.file_type().unwrap().is_dir() {
                out.push(format!("{rel}/"));
                walk(base, &p, out);
            } else {
                out.push(rel);
            }
        }
    }
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// Is `tool` on PATH? Without it a test may skip on a developer's machine, saying so; where `CI`
/// is set, a missing tool is a failure, since CI installs every tool the tests need.
pub fn have_tool(tool: &str, package: &str) -> bool {
    if Command::new(tool)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok()
    {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{tool} must be installed in CI (apt-get install {package}); see .ci/run"
    );
    eprintln!("skipped: {tool} not found (apt-get install {package})");
    false
}

/// Are we root? Same rule as [`have_tool`]: CI runs as root, so there a non-root run fails.
pub fn have_root() -> bool {
    if nix::unistd::Uid::effective().is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "this test needs root, and CI runs as root"
    );
    eprintln!("skipped: needs root");
    false
}

/// Poll `cond` until it holds, or fail after `deadline` naming `what`.
pub fn wait_until(what: &str, deadline: std::time::Duration, mut cond: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while start.elapsed() < deadline {
        if cond() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    panic!("timed out after {deadline:?} waiting for: {what}");
}
