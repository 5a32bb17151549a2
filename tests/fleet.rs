//! Sharing a throttled KPS: several real `kps-sync reconcile` processes (each its own client and
//! limiter, as on separate hosts) started together against a fake that admits 4 calls/s. They
//! all finish, and the adaptive limiter keeps the 429s well below the calls that did work.
//! (The 30-host figures are in `examples/bench.rs --fleet`.)

mod common;

use common::Sandbox;
use std::process::Stdio;
use std::time::{Duration, Instant};

#[test]
fn hosts_started_together_share_a_throttled_kps_politely() {
    const HOSTS: usize = 6;
    const KEYS: usize = 20;
    let sb = Sandbox::new();
    let mut manifests = Vec::new();
    for h in 0..HOSTS {
        let dir = sb.path(&format!("host{h}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut keys = String::new();
        for k in 0..KEYS {
            let name = format!("h{h}-k{k:02}");
            sb.fake.add_key(&name);
            keys.push_str(&format!("  {name}: keys/{name}.pem\n"));
        }
        let text = sb
            .header()
            .replace("token_file: token", "token_file: ../token")
            + "keys:\n"
            + &keys;
        let manifest = dir.join("manifest.yaml");
        std::fs::write(&manifest, text).unwrap();
        manifests.push(manifest);
    }
    sb.fake.set_latency(Duration::from_millis(20));
    sb.fake.set_rate_limit(Some(4));
    let started = Instant::now();
    let children: Vec<_> = manifests
        .iter()
        .map(|m| {
            std::process::Command::new(env!("CARGO_BIN_EXE_kps-sync"))
                .args(["reconcile", "-m"])
                .arg(m)
                .env_remove("RUST_LOG")
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let wall = started.elapsed();
    let stats = sb.fake.stats();
    // Each host lists once (the listing cadence) and exports in batches of 10.
    let useful =
        stats.batch_export_calls + stats.single_export_calls + stats.list_calls - stats.throttled;
    assert_eq!(stats.names_exported, (HOSTS * KEYS) as u64, "{stats:?}");
    assert!(useful <= (HOSTS + HOSTS * KEYS / 10) as u64, "{stats:?}");
    // 18 useful calls at 4/s: 4.5 s at best.
    assert!(wall < Duration::from_secs(20), "took {wall:?}");
    assert!(
        stats.throttled <= useful,
        "{} 429s for {useful} useful calls: {stats:?}",
        stats.throttled
    );
    for h in 0..HOSTS {
        for k in 0..KEYS {
            let name = format!("h{h}-k{k:02}");
            assert_eq!(
                std::fs::read_to_string(sb.path(&format!("host{h}/keys/{name}.pem"))).ok(),
                sb.fake.private_key(&name)
            );
        }
    }
}
