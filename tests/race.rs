//! The symlink race (issue 12): an unprivileged user owns the folder of a key's path and, in a
//! tight loop, swaps it for a symlink to a root-owned folder, while reconcile passes restore,
//! fix-meta, prune and create the key hundreds of times. Nothing in the root-owned folder may
//! ever be created, changed, chowned or removed.
//!
//! The root-owned folder holds a file with the very name and bytes of the key, so only the
//! descriptor walk in `src/output/write.rs` stands between a pass and it: the planner, which looks by
//! path, does see it through the symlink, and a writer that went by path would chown, chmod or
//! delete it.
//!
//! `harness = false`: this binary is also the attacker. Run again with `RACE_SWAPPER` set, as
//! the unprivileged user (`Command::uid`/`gid`, like `setpriv`), it does the swapping.
//! Needs root (to create the user and to chown): under CI its absence fails the test.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kps_sync::output::write;
use kps_sync::reconcile::{self, PassOptions};

const USER: &str = "kps-sync-race";
const SWAPPER_ENV: &str = "RACE_SWAPPER";
const ROUNDS: usize = 200;

fn main() {
    if let Some(home) = std::env::var_os(SWAPPER_ENV) {
        swapper(Path::new(&home));
        return;
    }
    let start = Instant::now();
    if !common::have_root() || !common::have_tool("useradd", "passwd") {
        println!("test result: ok. 0 passed; 0 failed; 1 ignored (needs root and useradd)");
        return;
    }
    race();
    println!(
        "test result: ok. 1 passed; 0 failed; 0 ignored; finished in {:.2}s",
        start.elapsed().as_secs_f64()
    );
}

/// The attacker: exchange `keys` (a folder) and `decoy` (a symlink to the root-owned folder)
/// with `renameat2(RENAME_EXCHANGE)` as fast as it can, so `keys` is a folder one instant and
/// the symlink the next, never missing. Stops when `../stop` appears, leaving `keys` the folder,
/// and prints how many swaps it made.
fn swapper(home: &Path) {
    use rustix::fs::{self as rfs, Mode, OFlags, RenameFlags};
    let target = std::env::var_os("RACE_TARGET").expect("RACE_TARGET");
    let dir = rfs::open(home, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()).unwrap();
    rfs::symlinkat(Path::new(&target), &dir, "decoy").unwrap();
    let stop = home.parent().unwrap().join("stop");
    let mut swaps: u64 = 0;
    loop {
        if swaps.is_multiple_of(64) && stop.exists() {
            break;
        }
        rfs::renameat_with(&dir, "keys", &dir, "decoy", RenameFlags::EXCHANGE).unwrap();
        swaps += 1;
    }
    if !swaps.is_multiple_of(2) {
        rfs::renameat_with(&dir, "keys", &dir, "decoy", RenameFlags::EXCHANGE).unwrap();
    }
    println!("{swaps}");
}

/// The unprivileged user, created for the test and removed after it.
struct TestUser {
    uid: u32,
    gid: u32,
}

impl TestUser {
    fn create() -> TestUser {
        if nix::unistd::User::from_name(USER).unwrap().is_none() {
            let status = std::process::Command::new("useradd")
                .args(["--system", "--user-group", "--no-create-home"])
                .args(["--shell", "/usr/sbin/nologin", USER])
                .status()
                .unwrap();
            assert!(status.success(), "useradd {USER}");
        }
        let user = nix::unistd::User::from_name(USER).unwrap().unwrap();
        TestUser {
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
        }
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _ = std::process::Command::new("userdel").arg(USER).status();
    }
}

/// The attacker process; killed if the test fails before it is stopped, so it never outlives
/// the test (and `userdel` can remove its user).
struct Swapper(Option<std::process::Child>);

impl Swapper {
    /// Ask it to stop (the `stop` file), and return how many swaps it made.
    fn stop(mut self, root: &Path) -> u64 {
        std::fs::write(root.join("stop"), b"").unwrap();
        let out = self.0.take().unwrap().wait_with_output().unwrap();
        assert!(out.status.success(), "swapper failed");
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    }
}

impl Drop for Swapper {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Everything about a folder and its entries that a create, change, chown or remove would
/// touch (atime aside).
fn snapshot(dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let describe = |p: &Path| {
        let m = std::fs::symlink_metadata(p).unwrap();
        // The hash, not the bytes: a failure message must not print a key.
        let content = if m.is_file() {
            kps_sync::observe::sha256_of(&std::fs::read(p).unwrap())
        } else {
            String::new()
        };
        format!(
            "ino {} mode {:o} uid {} gid {} nlink {} size {} mtime {}.{} ctime {}.{} {}",
            m.ino(),
            m.mode(),
            m.uid(),
            m.gid(),
            m.nlink(),
            m.size(),
            m.mtime(),
            m.mtime_nsec(),
            m.ctime(),
            m.ctime_nsec(),
            content
        )
    };
    out.insert(".".to_owned(), describe(dir));
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        out.insert(
            entry.file_name().to_string_lossy().into_owned(),
            describe(&entry.path()),
        );
    }
    out
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn race() {
    let user = TestUser::create();
    let fake = fake_kps::FakeKps::start();
    fake.add_key("web");
    fake.add_key("stay");

    // root/            root 0755 (the user must traverse it)
    //   home/          the user's, 0755: where the swapping happens
    //     keys/        the user's: the folder of the key's path
    //     decoy ->     ../target (the user's symlink)
    //   target/        root's: must never change
    //   state/, token, m-*.yaml: root's
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    chmod(&root, 0o755);
    let home = root.join("home");
    let keys = home.join("keys");
    let target = root.join("target");
    std::fs::create_dir_all(&keys).unwrap();
    std::fs::create_dir(&target).unwrap();
    for dir in [&home, &keys] {
        std::os::unix::fs::chown(dir, Some(user.uid), Some(user.gid)).unwrap();
    }
    let token = root.join("token");
    std::fs::write(&token, fake_kps::TOKEN).unwrap();
    chmod(&token, 0o600);
    let key_path = keys.join("web");

    let manifest = |name: &str, web: Option<&str>| {
        let web = web.map_or(String::new(), |mode| {
            format!(
                "  web:\n    path: {}\n    mode: \"{mode}\"\n    owner: {USER}\n    group: {USER}\n",
                key_path.display()
            )
        });
        let text = format!(
            "version: 1\nkps:\n  endpoint: {}\n  project_id: {}\n  auth:\n    token_file: token\n\
             settings:\n  state_dir: state\n  prune: true\nkeys:\n  stay: {}\n{web}",
            fake.url(),
            fake_kps::PROJECT_ID,
            root.join("stay/stay.pem").display(),
        );
        let path = root.join(name);
        std::fs::write(&path, text).unwrap();
        kps_sync::manifest::load(&path).unwrap()
    };
    let with_0600 = manifest("m-0600.yaml", Some("0600"));
    let with_0400 = manifest("m-0400.yaml", Some("0400"));
    let without = manifest("m-none.yaml", None);
    let client = kps_sync::cli::commands::client_for(&with_0600).unwrap();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let pass = |m: &kps_sync::manifest::Manifest| {
        runtime
            .block_on(reconcile::reconcile_once(
                m,
                &Arc::clone(&client),
                &PassOptions::default(),
            ))
            .unwrap()
    };

    // A clean first pass, then the bait: root's file with the key's name and exact bytes.
    let first = pass(&with_0600);
    assert!(first.is_success(), "{:?}", first.outcomes);
    let written = std::fs::read(&key_path).unwrap();
    std::fs::write(target.join("web"), &written).unwrap();
    chmod(&target.join("web"), 0o644);
    std::fs::write(target.join("other"), b"root's own").unwrap();
    std::fs::create_dir(target.join("sub")).unwrap();
    let before = snapshot(&target);

    let swapper = Swapper(Some(
        std::process::Command::new(std::env::current_exe().unwrap())
            .env(SWAPPER_ENV, &home)
            .env("RACE_TARGET", &target)
            .uid(user.uid)
            .gid(user.gid)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    // Let it start swapping.
    let decoy = home.join("decoy");
    let wait = Instant::now();
    while std::fs::symlink_metadata(&decoy).is_err() {
        assert!(wait.elapsed() < Duration::from_secs(10), "swapper started");
        std::thread::sleep(Duration::from_millis(5));
    }

    // (change, ok) -> count, over every pass; and how often the walk refused the symlink.
    let mut tally: BTreeMap<(String, bool), usize> = BTreeMap::new();
    let mut refused = 0;
    let mut passes = 0;
    let mut deletions = 0;
    let ours = kps_sync::observe::sha256_of(&written);
    for round in 0..ROUNDS {
        // Someone deletes the key (through the same writer, so the race applies to it too):
        // the next pass restores it.
        if write::remove(&key_path, &ours).is_ok() {
            deletions += 1;
        }
        for m in [&with_0600, &with_0400, &without, &with_0600] {
            let report = pass(m);
            passes += 1;
            for o in report.outcomes.iter().filter(|o| o.key == "web") {
                let word = o.change.word();
                *tally
                    .entry((word.to_owned(), o.result.is_ok()))
                    .or_default() += 1;
                if let Err(f) = &o.result
                    && f.to_string().contains("CHASE_SAFE")
                {
                    refused += 1;
                }
            }
        }
        let after = snapshot(&target);
        assert_eq!(
            before, after,
            "round {round}: the root-owned folder changed"
        );
    }

    let swaps = swapper.stop(&root);

    assert_eq!(snapshot(&target), before, "the root-owned folder changed");
    // Nothing else was created beside the swapped folder, and no temporary file was left.
    let mut names: Vec<String> = std::fs::read_dir(&home)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["decoy", "keys"]);
    for entry in std::fs::read_dir(&keys).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        assert_eq!(name, "web", "only the key lives in its folder");
    }

    let ok = |word: &str| tally.get(&(word.to_owned(), true)).copied().unwrap_or(0);
    let failed: usize = tally
        .iter()
        .filter(|((_, ok), _)| !ok)
        .map(|(_, n)| n)
        .sum();
    eprintln!(
        "race: {ROUNDS} rounds, {passes} passes, {swaps} swaps, {deletions} deletions landed; \
         outcomes {tally:?}; {failed} failed, {refused} of them on the symlink"
    );
    // The race really happened both ways: passes met the symlink and were refused, and each
    // kind of change also landed when the folder was in place.
    assert!(swaps > 1000, "the swapper ran: {swaps} swaps");
    assert!(refused > 0, "no pass met the symlink");
    for word in ["restore", "fix-meta", "prune", "create"] {
        assert!(ok(word) > 0, "no {word} landed: {tally:?}");
    }
    drop(user);
}
