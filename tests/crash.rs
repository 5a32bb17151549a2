//! Crash-proof: `reconcile` and the daemon killed with SIGKILL at random moments leave nothing
//! stuck. After every kill each destination is absent or byte-identical to the key in KPS and
//! the state loads; the next pass exits 0 with no conflict and leaves no temporary file.

mod common;

use common::Sandbox;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::process::Stdio;
use std::time::{Duration, Instant};

const KEYS: usize = 200;
/// Also age-encrypted: ciphertext cannot be adopted as "the key KPS lists", so only the intent
/// journal can tell the next pass that such a file is its own.
const SEALED: usize = 60;
const ROUNDS: usize = 50;
const RECIPIENT: &str = "age1jpe7c3v8gwzchz9rnv8n28zta43w97t0tp9ra5p4xaay0p9wwdqq66kgs7";

fn names() -> Vec<String> {
    (0..KEYS).map(|i| format!("k{i:03}")).collect()
}

fn sealed() -> Vec<String> {
    (0..SEALED).map(|i| format!("s{i:03}")).collect()
}

fn all_names() -> Vec<String> {
    names().into_iter().chain(sealed()).collect()
}

fn setup() -> Sandbox {
    let sb = Sandbox::new();
    let mut keys = String::new();
    for n in names() {
        sb.fake.add_key(&n);
        keys.push_str(&format!("  {n}: out/{n}.pem\n"));
    }
    for n in sealed() {
        sb.fake.add_key(&n);
        keys.push_str(&format!(
            "  {n}:\n    path: out/{n}.age\n    age_recipients: [{RECIPIENT}]\n"
        ));
    }
    // Slow enough calls that a pass spans a few hundred milliseconds.
    sb.fake.set_latency(Duration::from_millis(15));
    sb.manifest("  concurrency: 2\n", &keys);
    sb
}

/// Each destination absent or exactly the key; the state loads; no key file is half there.
fn check_after_kill(sb: &Sandbox, round: usize) {
    for n in names() {
        let path = sb.path(&format!("out/{n}.pem"));
        match std::fs::read_to_string(&path) {
            Ok(text) => assert_eq!(
                Some(text),
                sb.fake.private_key(&n),
                "round {round}: {n} is neither absent nor the key"
            ),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "round {round}: {n}"),
        }
    }
    for n in sealed() {
        match std::fs::read(sb.path(&format!("out/{n}.age"))) {
            Ok(bytes) => assert!(
                bytes.starts_with(b"age-encryption.org/v1\n"),
                "round {round}: {n} is not whole age ciphertext"
            ),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "round {round}: {n}"),
        }
    }
    kps_sync::state::State::load(&sb.path("state"))
        .unwrap_or_else(|e| panic!("round {round}: the state does not load: {e}"));
}

fn temp_files(sb: &Sandbox) -> Vec<String> {
    ["out", "state"]
        .iter()
        .flat_map(|d| std::fs::read_dir(sb.path(d)).into_iter().flatten())
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect()
}

/// A full pass: exit 0, no conflict, every key in place, no temporary file.
fn clean_pass(sb: &Sandbox, round: usize) {
    let run = sb.reconcile();
    assert_eq!(run.code, 0, "round {round}: {run:?}");
    assert!(!run.all().contains("conflict"), "round {round}: {run:?}");
    assert!(
        temp_files(sb).is_empty(),
        "round {round}: {:?}",
        temp_files(sb)
    );
    for n in names() {
        assert_eq!(
            std::fs::read_to_string(sb.path(&format!("out/{n}.pem"))).ok(),
            sb.fake.private_key(&n),
            "round {round}: {n}"
        );
    }
    for n in sealed() {
        assert!(
            sb.path(&format!("out/{n}.age")).exists(),
            "round {round}: {n}"
        );
    }
}

fn file_of(sb: &Sandbox, n: &str) -> std::path::PathBuf {
    let ext = if n.starts_with('s') { "age" } else { "pem" };
    sb.path(&format!("out/{n}.{ext}"))
}

#[test]
fn reconcile_killed_at_random_moments_leaves_nothing_stuck() {
    let sb = setup();
    let mut rng = fastrand::Rng::with_seed(0x6b696c6c);
    let started = Instant::now();
    let mut killed_mid_pass = 0;
    for round in 0..ROUNDS {
        // Deletions between rounds: a fifth of the keys to restore (all of them the first time).
        for n in all_names() {
            if rng.u8(..5) == 0 {
                let _ = std::fs::remove_file(file_of(&sb, &n));
            }
        }
        let mut child = sb
            .cmd(&["reconcile"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Kill after a random number of the missing files has been published (or, one round in
        // four, at a random instant), so kills land between a rename and the state save.
        let present = || {
            all_names()
                .iter()
                .filter(|n| file_of(&sb, n).exists())
                .count()
        };
        let missing = all_names().len() - present();
        if round % 4 == 3 || missing == 0 {
            std::thread::sleep(Duration::from_millis(rng.u64(0..400)));
        } else {
            let target = all_names().len() - missing + rng.usize(1..=missing);
            let deadline = Instant::now() + Duration::from_secs(20);
            while present() < target
                && Instant::now() < deadline
                && child.try_wait().unwrap().is_none()
            {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).unwrap();
        let status = child.wait().unwrap();
        if status.code().is_none() {
            killed_mid_pass += 1;
        }
        check_after_kill(&sb, round);
        clean_pass(&sb, round);
    }
    eprintln!(
        "{ROUNDS} rounds, {killed_mid_pass} killed before they finished, in {:?}",
        started.elapsed()
    );
    assert!(
        killed_mid_pass >= ROUNDS / 2,
        "most kills must land mid-pass to prove anything: {killed_mid_pass}/{ROUNDS}"
    );
}

#[test]
fn the_daemon_killed_during_a_drift_restore_leaves_nothing_stuck() {
    let sb = setup();
    let settings = "  concurrency: 2\n  debounce: 20ms\n  interval: 1h\n";
    let text = std::fs::read_to_string(sb.path("manifest.yaml"))
        .unwrap()
        .replace("  concurrency: 2\n", settings);
    sb.write_manifest(&text);
    clean_pass(&sb, 0);
    let mut rng = fastrand::Rng::with_seed(0x64616d6e);
    let mut killed_mid_pass = 0;
    for round in 0..10 {
        let mut child = sb
            .cmd(&["run"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Let the daemon start watching, then make drift for it to restore.
        std::thread::sleep(Duration::from_millis(300));
        for n in all_names() {
            if rng.u8(..3) == 0 {
                let _ = std::fs::remove_file(file_of(&sb, &n));
            }
        }
        std::thread::sleep(Duration::from_millis(rng.u64(20..300)));
        let missing = all_names()
            .iter()
            .filter(|n| !file_of(&sb, n).exists())
            .count();
        if missing > 0 {
            killed_mid_pass += 1;
        }
        kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).unwrap();
        child.wait().unwrap();
        check_after_kill(&sb, round);
        clean_pass(&sb, round);
    }
    assert!(
        killed_mid_pass >= 3,
        "{killed_mid_pass}/10 kills mid-restore"
    );
}
