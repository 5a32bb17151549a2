//! The steady state: a pass over files that are all in place reads none of them (the stat cache)
//! and writes nothing (the state is saved only when it changed), yet drift stays exact: an edit
//! that keeps the size and puts the mtime back is still caught, through the ctime.
//! Needs strace (Debian's `strace`); under CI its absence is a failure.

mod common;

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use common::*;

/// Files written within this long before a pass are read again by it (the racy window, 2 s).
const RACY: Duration = Duration::from_millis(2100);

/// Three keys written, then passes until the state trusts every file: the pass right after the
/// write reads them (a record of a file just written carries no stat yet) and records their
/// stat, which is trusted once the files are older than the racy window.
fn settled() -> Sandbox {
    let sb = Sandbox::new();
    for k in ["a", "b", "c"] {
        sb.fake.add_key(k);
    }
    sb.manifest(
        "",
        "  a: out/a.pem\n  b:\n    path: out/b.pem\n    public_key: out/b.pub\n  c: deep/c.pem\n",
    );
    assert_eq!(sb.reconcile().code, 0);
    std::thread::sleep(RACY);
    let run = sb.reconcile();
    assert_eq!(run.code, 0, "{run:?}");
    sb
}

/// `strace -f -y` of one `kps-sync reconcile`: the lines of the calls named.
fn traced(sb: &Sandbox, calls: &str) -> (Run, String) {
    let trace = sb.path("trace.txt");
    let mut cmd = std::process::Command::new("strace");
    cmd.args(["-f", "-y", "-qq", "-e"])
        .arg(format!("trace={calls}"))
        .arg("-o")
        .arg(&trace)
        .arg(env!("CARGO_BIN_EXE_kps-sync"))
        .args(["reconcile", "-m"])
        .arg(sb.path("manifest.yaml"))
        .current_dir(sb.dir.path())
        .env_remove("RUST_LOG")
        .env_remove("KPS_SYNC_AUTH_TOKEN")
        .env("HOME", sb.dir.path());
    let out = cmd.output().unwrap();
    let run = Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    (run, std::fs::read_to_string(&trace).unwrap())
}

#[test]
fn a_no_op_pass_opens_no_destination_and_writes_nothing() {
    if !have_tool("strace", "strace") {
        return;
    }
    let sb = settled();
    let state = sb.path("state/state.json");
    let before = (
        std::fs::read(&state).unwrap(),
        std::fs::metadata(&state).unwrap().mtime_nsec(),
    );
    sb.fake.reset_stats();
    let (run, trace) = traced(
        &sb,
        "open,openat,openat2,write,pwrite64,writev,rename,renameat,renameat2,fsync,fdatasync,sync_file_range,unlink,unlinkat,socket,connect",
    );
    // No call to make, so no HTTP client: no socket, and no TLS set-up (which reads the
    // system's root certificates even for an http:// endpoint).
    for line in trace.lines() {
        assert!(
            !line.contains("socket(") && !line.contains("connect("),
            "a no-op pass opened a socket: {line}"
        );
        assert!(
            !line.contains("/etc/ssl") && !line.contains("/certs"),
            "a no-op pass set up TLS: {line}"
        );
        assert!(
            !line.contains("/token"),
            "a no-op pass read the credential: {line}"
        );
    }
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout.contains("3 managed, 3 in place, 0 failed"),
        "{run:?}"
    );
    let ours = sb.dir.path().display().to_string();
    let mut opened_state = false;
    for line in trace.lines().filter(|l| l.contains(&ours)) {
        // The folders are listed (a killed pass's temporary files are swept), never a file in
        // them opened.
        let listing = line.contains("O_DIRECTORY") && !line.contains("O_CREAT");
        for dest in ["out", "deep"].iter().filter(|_| !listing) {
            assert!(
                !line.contains(&format!("{ours}/{dest}")),
                "a no-op pass touched a destination: {line}"
            );
        }
        opened_state |= line.contains("state.json") && line.contains("open");
        let call = line
            .split_once(' ')
            .map_or(line, |(_, rest)| rest)
            .trim_start();
        for forbidden in ["write", "pwrite", "rename", "fsync", "fdatasync", "unlink"] {
            assert!(
                !call.starts_with(forbidden),
                "a no-op pass wrote in the sandbox: {line}"
            );
        }
    }
    assert!(
        !trace.contains("fsync(") && !trace.contains("fdatasync("),
        "a no-op pass fsynced:\n{trace}"
    );
    assert!(
        opened_state,
        "the trace does not show the state read:\n{trace}"
    );
    let after = (
        std::fs::read(&state).unwrap(),
        std::fs::metadata(&state).unwrap().mtime_nsec(),
    );
    assert!(before == after, "the state file changed in a no-op pass");
    assert_eq!(sb.fake.stats(), fake_kps::Stats::default());

    // `status` still shows when that pass ran (the lock file's stamp), with its counts.
    let status = sb.run(&["status", "--json"]);
    let doc: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    let shown = humantime::parse_rfc3339(doc["last_pass"]["at"].as_str().unwrap()).unwrap();
    let lock = std::fs::metadata(sb.path("state/lock"))
        .unwrap()
        .modified()
        .unwrap();
    assert!(
        lock.duration_since(shown).unwrap_or_default() < Duration::from_secs(1),
        "status shows {shown:?}, the last pass ran at {lock:?}"
    );
    assert_eq!(doc["last_pass"]["in_place"], 3);
}

#[test]
fn an_edit_keeping_size_and_mtime_is_caught_through_ctime() {
    let sb = settled();
    let key = sb.path("out/a.pem");
    let good = std::fs::read(&key).unwrap();
    let meta = std::fs::metadata(&key).unwrap();
    // Same size, one byte changed, in place (same inode), then the mtime put back.
    let mut edited = good.clone();
    let i = edited.len() / 2;
    edited[i] = if edited[i] == b'A' { b'B' } else { b'A' };
    std::fs::write(&key, &edited).unwrap();
    let mtime = filetime_of(&meta);
    let status = std::process::Command::new("touch")
        .arg("-d")
        .arg(&mtime)
        .arg(&key)
        .status()
        .unwrap();
    assert!(status.success());
    let now = std::fs::metadata(&key).unwrap();
    assert_eq!(
        (now.ino(), now.size(), now.mtime(), now.mtime_nsec()),
        (meta.ino(), meta.size(), meta.mtime(), meta.mtime_nsec()),
        "the edit must keep inode, size and mtime for this test to mean anything"
    );
    assert_ne!(
        (now.ctime(), now.ctime_nsec()),
        (meta.ctime(), meta.ctime_nsec())
    );

    let run = sb.reconcile();
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout.contains("restored") && run.stdout.contains("a.pem"),
        "{run:?}"
    );
    assert_eq!(std::fs::read(&key).unwrap(), good);
}

/// `touch -d` argument for the file's exact mtime.
fn filetime_of(meta: &std::fs::Metadata) -> String {
    format!("@{}.{:09}", meta.mtime(), meta.mtime_nsec())
}
