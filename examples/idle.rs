//! `cargo run --release --example idle -- [SECONDS] [KEYS]`: what the daemon costs while
//! nothing happens. Starts the real `kps-sync run` (release build) against the fake KPS on
//! loopback with KEYS keys (default 100), waits for the first pass, then watches it idle for
//! SECONDS (default 20), once with inotify and once with `watch: poll`, and prints the CPU time
//! it used (from /proc/PID/stat), its memory (VmRSS, VmHWM from /proc/PID/status), the KPS calls
//! it made while idle, and how long SIGTERM took.
//!
//! Targets: idle CPU ~0, RSS within 20 MiB, no KPS call while idle, exit within 2 s.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// /proc reports CPU time in USER_HZ ticks, which Linux fixes at 100 for user space.
const USER_HZ: f64 = 100.0;

fn main() {
    let mut args = std::env::args().skip(1);
    let seconds: u64 = args
        .next()
        .map_or(20, |a| a.parse().expect("SECONDS: a number"));
    let keys: usize = args
        .next()
        .map_or(100, |a| a.parse().expect("KEYS: a number"));
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let bin = build_release_binary(root);
    println!(
        "kps-sync idle cost: {keys} keys, {seconds} s idle; binary {}",
        bin.display()
    );
    println!(
        "{:<10} {:>12} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "watch", "idle CPU", "CPU %", "VmRSS", "VmHWM", "KPS calls", "SIGTERM"
    );
    let mut ok = true;
    for mode in ["inotify", "poll"] {
        let m = measure(&bin, mode, keys, Duration::from_secs(seconds));
        println!(
            "{:<10} {:>10.3} s {:>9.3}% {:>7} KiB {:>6} KiB {:>10} {:>8.2} s",
            mode,
            m.cpu_seconds,
            100.0 * m.cpu_seconds / seconds as f64,
            m.rss_kib,
            m.hwm_kib,
            m.idle_kps_calls,
            m.stop.as_secs_f64()
        );
        ok &= m.rss_kib <= 20 * 1024
            && m.idle_kps_calls == 0
            && m.exit_code == Some(0)
            && m.stop < Duration::from_secs(2)
            && m.cpu_seconds / (seconds as f64) < 0.01;
    }
    println!(
        "targets (RSS <= 20 MiB, CPU < 1%, no KPS call, exit 0 within 2 s): {}",
        if ok { "met" } else { "NOT met" }
    );
}

struct Measured {
    cpu_seconds: f64,
    rss_kib: u64,
    hwm_kib: u64,
    idle_kps_calls: u64,
    stop: Duration,
    exit_code: Option<i32>,
}

fn measure(bin: &Path, watch: &str, keys: usize, idle: Duration) -> Measured {
    let fake = fake_kps::FakeKps::start();
    let dir = tempfile::tempdir().unwrap();
    let names: Vec<String> = (0..keys).map(|i| format!("idle-{i:04}")).collect();
    for n in &names {
        fake.add_key(n);
    }
    std::fs::write(dir.path().join("token"), fake_kps::TOKEN).unwrap();
    let mut text = format!(
        "version: 1\nkps:\n  endpoint: {}\n  project_id: {}\n  auth:\n    token_file: token\n\
         settings:\n  state_dir: state\n  watch: {watch}\nkeys:\n",
        fake.url(),
        fake_kps::PROJECT_ID
    );
    for n in &names {
        text.push_str(&format!("  {n}: keys/{n}.pem\n"));
    }
    std::fs::write(dir.path().join("manifest.yaml"), text).unwrap();
    let log = dir.path().join("daemon.log");
    let mut child = Command::new(bin)
        .args(["run", "-m"])
        .arg(dir.path().join("manifest.yaml"))
        .env_remove("NOTIFY_SOCKET")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_first_pass(&mut child, &log, &dir.path().join("keys"), keys);
    // Let the follow-up re-plan after our own writes settle before the clock starts.
    std::thread::sleep(Duration::from_secs(1));
    fake.reset_stats();
    let pid = child.id();
    let before = cpu_ticks(pid);
    std::thread::sleep(idle);
    let after = cpu_ticks(pid);
    let (rss_kib, hwm_kib) = memory_kib(pid);
    let idle_kps_calls = fake.stats().batch_export_calls;
    let started = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    Measured {
        cpu_seconds: (after - before) as f64 / USER_HZ,
        rss_kib,
        hwm_kib,
        idle_kps_calls,
        stop: started.elapsed(),
        exit_code: status.code(),
    }
}

fn wait_first_pass(child: &mut Child, log: &Path, keys_dir: &Path, keys: usize) {
    let start = Instant::now();
    loop {
        let written = std::fs::read_dir(keys_dir).map_or(0, |d| d.count());
        let logged = std::fs::read_to_string(log)
            .unwrap_or_default()
            .contains("pass done");
        if written >= keys && logged {
            return;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "kps-sync run exited ({status}):\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no first pass within 60 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// utime + stime of the process, in USER_HZ ticks: fields 14 and 15 of /proc/PID/stat,
/// counted after the `)` that ends the command name (which may hold spaces).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // after_name starts at field 3 (state); utime is field 14, stime field 15.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn build_release_binary(root: &Path) -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--release", "--quiet", "--bin", "kps-sync"])
        .current_dir(root)
        .status()
        .unwrap();
    assert!(status.success(), "building the release binary failed");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    target.join("release/kps-sync")
}
