//! Permissions from the first byte: a pass under `strace -f` with umask 000. Every file and
//! folder kps-sync creates (keys, temporary files, journal, state, lock) is created with no
//! group or other bit beyond what the manifest declares; a rename only moves a file created so.
//! Needs strace (Debian's `strace`); under CI its absence is a failure.

mod common;

use common::*;

/// The mode argument of a creating call, if the line is one: `openat(..., O_...|O_CREAT..., 0600)`
/// or `mkdir(at)(..., 0700)`. Returns (the created path as strace shows it, mode).
fn created(line: &str) -> Option<(String, u32)> {
    let call = line
        .split_once(' ')
        .map_or(line, |(_, rest)| rest)
        .trim_start();
    let creating = (call.starts_with("openat(") || call.starts_with("open("))
        && call.contains("O_CREAT")
        || call.starts_with("mkdir(")
        || call.starts_with("mkdirat(");
    if !creating {
        return None;
    }
    let args = &call[call.find('(')? + 1..call.rfind(')')?];
    let mode = args.rsplit(", ").next()?.trim();
    let mode = u32::from_str_radix(mode.trim_start_matches("0o"), 8).ok()?;
    Some((args.to_owned(), mode))
}

/// Run `kps-sync reconcile` on the sandbox's manifest under `strace -f -y` (each descriptor's
/// path shown), tracing `syscalls`, with umask 000 so that only the modes kps-sync asks for
/// count; it must succeed. Returns the trace.
fn traced_reconcile(sb: &Sandbox, syscalls: &str) -> String {
    let trace = sb.path("trace.txt");
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(r#"umask 000; t=$0; o=$1; shift; exec strace -f -y -qq -e "trace=$t" -o "$o" "$@""#)
        .arg(syscalls)
        .arg(&trace)
        .arg(env!("CARGO_BIN_EXE_kps-sync"))
        .args(["reconcile", "-m"])
        .arg(sb.path("manifest.yaml"))
        .current_dir(sb.dir.path())
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read_to_string(&trace).unwrap()
}

#[test]
fn every_file_and_folder_is_created_with_no_bits_beyond_the_manifest() {
    if !have_tool("strace", "strace") {
        return;
    }
    let sb = Sandbox::new();
    sb.fake.add_key("plain");
    sb.fake.add_key("shared");
    sb.fake.add_key("sealed");
    sb.manifest(
        "",
        "  plain: out/deep/plain.pem\n  shared:\n    path: grp/shared.pem\n    mode: \"0640\"\n  sealed:\n    path: out/sealed.age\n    age_recipients: [age1jpe7c3v8gwzchz9rnv8n28zta43w97t0tp9ra5p4xaay0p9wwdqq66kgs7]\n",
    );
    let text = traced_reconcile(&sb, "open,openat,mkdir,mkdirat,rename,renameat,renameat2");
    let ours = sb.dir.path().to_str().unwrap();
    let mut checked = 0;
    let mut renames = 0;
    for line in text.lines() {
        if line.contains("rename") && line.contains(ours) {
            renames += 1;
        }
        let Some((args, mode)) = created(line) else {
            continue;
        };
        if !args.contains(ours) {
            continue;
        }
        checked += 1;
        // Only the 0640 key's folder may see a group-read file; nothing anywhere gets more.
        let allowed = if args.contains("/grp>") || args.contains("/grp/") {
            0o640
        } else {
            0o700
        };
        assert_eq!(
            mode & !allowed,
            0,
            "created with mode {mode:o} (allowed {allowed:o}): {line}"
        );
        assert_eq!(mode & 0o007, 0, "a bit for other: {line}");
    }
    assert!(
        checked >= 6,
        "the trace shows too few creations to judge:\n{text}"
    );
    assert!(renames >= 3, "no renames in the trace:\n{text}");
    assert_eq!(
        std::fs::read_to_string(sb.path("grp/shared.pem")).ok(),
        sb.fake.private_key("shared")
    );
}

/// A batch is made durable with one sync per thing that must be durable, not three per key:
/// ten keys in one folder, exported in one batch, cost one `fdatasync` of the intent journal
/// (all ten intents in one write), ten `fsync`s of the files (each file's bytes before its
/// rename) and one `fsync` of their folder (after the ten renames).
#[test]
fn a_batch_of_ten_keys_in_one_folder_costs_one_journal_sync_ten_file_syncs_and_one_folder_sync() {
    if !have_tool("strace", "strace") {
        return;
    }
    let sb = Sandbox::new();
    let names: Vec<String> = (0..10).map(|i| format!("k{i}")).collect();
    let mut keys = String::new();
    for n in &names {
        sb.fake.add_key(n);
        keys.push_str(&format!("  {n}: out/{n}.pem\n"));
    }
    sb.manifest("", &keys);
    let text = traced_reconcile(&sb, "fsync,fdatasync,write");
    for n in &names {
        assert_eq!(
            std::fs::read_to_string(sb.path(&format!("out/{n}.pem"))).ok(),
            sb.fake.private_key(n),
            "{n} not in place"
        );
    }
    // strace -y shows each descriptor's path as the kernel resolves it.
    let real = |rel: &str| {
        std::fs::canonicalize(sb.path(rel))
            .unwrap()
            .display()
            .to_string()
    };
    let (folder, journal) = (real("out"), format!("{}/journal", real("state")));
    let count = |call: &str, fd: &str| {
        text.lines()
            .filter(|l| l.contains(&format!(" {call}(")) && l.contains(fd))
            .count()
    };
    let journal_fd = format!("<{journal}>)");
    assert_eq!(
        count("fdatasync", &journal_fd) + count("fsync", &journal_fd),
        1,
        "one journal sync for the batch:\n{text}"
    );
    assert_eq!(
        text.lines()
            .filter(|l| l.contains(" write(") && l.contains(&format!("<{journal}>")))
            .count(),
        1,
        "the batch's ten intents in one write:\n{text}"
    );
    assert_eq!(
        count("fsync", &format!("<{folder}/.kps-sync-")),
        10,
        "one fsync per file:\n{text}"
    );
    assert_eq!(
        count("fsync", &format!("<{folder}>)")) + count("fdatasync", &format!("<{folder}>)")),
        1,
        "one fsync of the folder for the batch:\n{text}"
    );
}
