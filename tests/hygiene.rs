//! Memory hygiene of the running binary: no core file can be written (RLIMIT_CORE 0/0) and the
//! process is not dumpable (no core, no ptrace or /proc/PID/mem by other processes of its user).
//!
//! A non-dumpable process has the files in its /proc/PID owned by root, whoever runs it; so the
//! daemon runs as a user other than root (as `nobody` when the test runs as root, as in CI) and
//! the test checks who owns its /proc entry.

mod common;

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::Sandbox;

const NOBODY: u32 = 65534;

fn chown_tree(path: &std::path::Path, uid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(uid)).unwrap();
    if path.is_dir() && !path.is_symlink() {
        for entry in std::fs::read_dir(path).unwrap() {
            chown_tree(&entry.unwrap().path(), uid);
        }
    }
}

#[test]
fn the_daemon_cannot_dump_core_and_is_not_dumpable() {
    let sb = Sandbox::new();
    sb.fake.add_key("hyg");
    sb.manifest("", "  hyg: keys/hyg.pem\n");
    let root = nix::unistd::geteuid().is_root();
    if root {
        chown_tree(sb.dir.path(), NOBODY);
    }
    let mut cmd = sb.cmd(&["run"]);
    if root {
        cmd.uid(NOBODY).gid(NOBODY);
    }
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sb.path("keys/hyg.pem").exists() {
        assert!(
            Instant::now() < deadline,
            "the daemon's first pass never wrote the key"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    let fields: Vec<&str> = core.split_whitespace().collect();
    assert_eq!(
        &fields[4..6],
        ["0", "0"],
        "soft and hard core limit: {core}"
    );

    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    let real_uid: u32 = uid_line.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert_ne!(
        real_uid, 0,
        "the daemon must run unprivileged for this check"
    );
    let owner = std::fs::metadata(format!("/proc/{pid}/status"))
        .unwrap()
        .uid();
    assert_eq!(
        owner, 0,
        "/proc/{pid}/status is owned by uid {owner}: the process is dumpable"
    );

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(0));
}
