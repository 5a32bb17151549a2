//! Operating kps-sync like the rest of a fleet: the `check` preflight, metrics (file and
//! endpoint, both passing `promtool check metrics`), the alert rules, completions, the man page,
//! the progress line, and the small things an operator trips over (tabs, "ok" that is not,
//! plurals, an empty `keys:`). promtool comes from Debian's `prometheus` package; under CI its
//! absence is a failure.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn promtool() -> Option<&'static str> {
    if Command::new("promtool").arg("--version").output().is_ok() {
        return Some("promtool");
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "promtool is missing in CI (apt-get install prometheus)"
    );
    eprintln!("skipped: promtool not installed (apt-get install prometheus)");
    None
}

/// `promtool check metrics` on `text`: exit 0 and nothing to say.
fn assert_promtool_accepts(text: &str) {
    let Some(promtool) = promtool() else { return };
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n--- input\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The value of the sample `name` (with its labels, exactly as printed).
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
}

// ---- check ----------------------------------------------------------------------------------

#[test]
fn check_lists_once_reports_each_key_and_exits_1_when_one_cannot_be_exported() {
    let sb = Sandbox::new();
    sb.fake.add_key("ready-one");
    sb.fake.add_unhosted_key("imported");
    sb.manifest(
        "",
        "  ready-one: out/a.pem\n  imported: out/b.pem\n  nowhere: out/c.pem\n",
    );
    let before = tree(sb.dir.path());
    let run = sb.run(&["check"]);
    assert_eq!(run.code, 1, "{run:?}");
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert!(
        lines[0].contains("listed 2 key pairs") && lines[0].contains(fake_kps::PROJECT_ID),
        "{run:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("ready ") && l.contains("ready-one")),
        "{run:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("not-hosted ") && l.contains("imported")),
        "{run:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("missing ") && l.contains("nowhere")),
        "{run:?}"
    );
    assert!(
        run.stdout.contains("1 of 3 keys ready to export"),
        "{run:?}"
    );
    assert!(
        run.stderr.contains("error: key imported (")
            && run.stderr.contains("is_key_protection: false")
            && run.stderr.contains("error: key nowhere ("),
        "{run:?}"
    );
    // One listing; nothing exported; nothing written (no state, no key, no folder).
    let stats = sb.fake.stats();
    assert_eq!(stats.list_calls, 1, "{stats:?}");
    assert_eq!(stats.batch_export_calls + stats.single_export_calls, 0);
    assert_eq!(tree(sb.dir.path()), before);
}

#[test]
fn check_reports_a_frozen_key_and_exits_1() {
    let sb = Sandbox::new();
    sb.fake.add_key("cold");
    sb.fake.add_key("warm");
    sb.fake.set_frozen("cold", true);
    sb.manifest("", "  cold: out/cold.pem\n  warm: out/warm.pem\n");
    let run = sb.run(&["check", "--json"]);
    assert_eq!(run.code, 1, "{run:?}");
    let doc: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(doc["keys"][0]["standing"], "frozen");
    assert_eq!(doc["keys"][0]["present"], true);
    assert_eq!(doc["keys"][0]["hosted"], true);
    assert_eq!(doc["keys"][0]["frozen"], true);
    assert_eq!(doc["keys"][1]["standing"], "ready");
    assert!(
        run.stderr.contains("error: key cold (") && run.stderr.contains("unfreeze"),
        "{run:?}"
    );
    sb.fake.set_frozen("cold", false);
    assert_eq!(sb.run(&["check"]).code, 0);
}

#[test]
fn check_exits_0_when_every_key_is_ready_and_speaks_json() {
    let sb = Sandbox::new();
    sb.fake.add_key("a");
    sb.fake.add_key("b");
    sb.manifest("", "  a: out/a.pem\n  b: out/b.pem\n");
    let run = sb.run(&["check"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout.contains("2 of 2 keys ready to export"),
        "{run:?}"
    );

    sb.fake.add_unhosted_key("b");
    let run = sb.run(&["check", "--json"]);
    assert_eq!(run.code, 1, "{run:?}");
    let doc: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(doc["ready"], false);
    assert_eq!(doc["listed"], 2);
    assert_eq!(doc["project_id"], fake_kps::PROJECT_ID);
    let keys = doc["keys"].as_array().unwrap();
    assert_eq!(keys[0]["key"], "a");
    assert_eq!(keys[0]["standing"], "ready");
    assert_eq!(keys[1]["key"], "b");
    assert_eq!(keys[1]["standing"], "not-hosted");
    assert_eq!(keys[1]["present"], true);
    assert_eq!(keys[1]["hosted"], false);
    assert_eq!(keys[1]["frozen"], false);
    assert!(!sb.path("state").exists() && !sb.path("out").exists());
}

#[test]
fn check_with_refused_credentials_exits_1_and_says_what_to_check() {
    let sb = Sandbox::new();
    sb.fake.add_key("a");
    sb.fake.revoke_token(fake_kps::TOKEN);
    sb.manifest("", "  a: out/a.pem\n");
    let run = sb.run(&["check"]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stderr.contains("cannot list the key pairs of project")
            && run.stderr.contains("APIGW.0301")
            && run.stderr.contains("check the credentials"),
        "{run:?}"
    );
    assert!(!run.all().contains(fake_kps::TOKEN), "{run:?}");
}

// ---- metrics --------------------------------------------------------------------------------

#[test]
fn metrics_file_is_written_0644_after_each_pass_and_passes_promtool() {
    let sb = Sandbox::new();
    sb.fake.add_key("a");
    sb.fake.add_key("b");
    sb.manifest(
        "  metrics_file: metrics/kps-sync.prom\n",
        "  a: out/a.pem\n  b: out/b.pem\n  gone: out/gone.pem\n",
    );
    let path = sb.path("metrics/kps-sync.prom");
    let run = sb.reconcile();
    assert_eq!(run.code, 1, "{run:?}");
    assert_eq!(mode_of(&path), 0o644);
    let first = std::fs::read_to_string(&path).unwrap();
    assert_promtool_accepts(&first);
    assert_eq!(
        sample(&first, "kps_sync_keys{state=\"in_place\"}"),
        Some(2.0)
    );
    assert_eq!(sample(&first, "kps_sync_keys{state=\"failed\"}"), Some(1.0));
    assert_eq!(
        sample(&first, "kps_sync_last_success_timestamp_seconds"),
        Some(0.0)
    );
    assert!(sample(&first, "kps_sync_last_pass_timestamp_seconds").unwrap() > 1.7e9);
    assert_eq!(
        sample(&first, "kps_sync_passes_total{outcome=\"failed\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&first, "kps_sync_exports_total{path=\"batch\",reason=\"\"}"),
        Some(2.0)
    );
    // verify_remote: one listing, and the missing key is never asked for.
    assert_eq!(
        sample(
            &first,
            "kps_sync_kps_requests_total{operation=\"list\",outcome=\"2xx\",code=\"\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &first,
            "kps_sync_kps_requests_total{operation=\"batch_export\",outcome=\"2xx\",code=\"\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&first, "kps_sync_build_info{version=\"0.1.0\"}"),
        Some(1.0)
    );
    assert!(first.contains("kps_sync_pass_duration_seconds_bucket{le=\"+Inf\"} 1"));

    // Fixed: success; a deleted file is a drift restore; the next run's failure keeps the
    // last success it carries over from the file.
    sb.manifest(
        "  metrics_file: metrics/kps-sync.prom\n",
        "  a: out/a.pem\n  b: out/b.pem\n",
    );
    std::fs::remove_file(sb.path("out/a.pem")).unwrap();
    let run = sb.reconcile();
    assert_eq!(run.code, 0, "{run:?}");
    let second = std::fs::read_to_string(&path).unwrap();
    assert_promtool_accepts(&second);
    let success = sample(&second, "kps_sync_last_success_timestamp_seconds").unwrap();
    assert!(success > 1.7e9, "{second}");
    assert_eq!(
        sample(&second, "kps_sync_keys{state=\"failed\"}"),
        Some(0.0)
    );
    assert_eq!(
        sample(&second, "kps_sync_drift_restores_total{kind=\"restore\"}"),
        Some(1.0)
    );

    sb.fake.revoke_token(fake_kps::TOKEN);
    std::fs::remove_file(sb.path("out/b.pem")).unwrap();
    let run = sb.reconcile();
    assert_eq!(run.code, 1, "{run:?}");
    let third = std::fs::read_to_string(&path).unwrap();
    assert_promtool_accepts(&third);
    // Refused twice (the second time after reading the token again): a 4xx with its code.
    assert!(
        third.contains("outcome=\"4xx\",code=\"APIGW.0301\"} 2"),
        "{third}"
    );
    assert_eq!(
        sample(&third, "kps_sync_last_success_timestamp_seconds"),
        Some(success)
    );
    assert!(
        sample(&third, "kps_sync_last_pass_timestamp_seconds").unwrap()
            >= sample(&second, "kps_sync_last_pass_timestamp_seconds").unwrap()
    );
}

#[test]
fn hook_runs_are_counted_by_outcome() {
    let sb = Sandbox::new();
    sb.fake.add_key("a");
    sb.fake.add_key("b");
    sb.manifest(
        "  metrics_file: m.prom\n",
        "  a:\n    path: out/a.pem\n    on_change: [\"true\"]\n  b:\n    path: out/b.pem\n    on_change: [\"false\"]\n",
    );
    let run = sb.reconcile();
    assert_eq!(run.code, 1, "{run:?}");
    let text = std::fs::read_to_string(sb.path("m.prom")).unwrap();
    assert_eq!(
        sample(&text, "kps_sync_hook_runs_total{outcome=\"ok\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "kps_sync_hook_runs_total{outcome=\"failed\"}"),
        Some(1.0)
    );
    assert_promtool_accepts(&text);
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET path` over HTTP/1.0: (status line, body).
fn http_get(port: u16, path: &str) -> std::io::Result<(String, String)> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    Ok((head.to_owned(), body.to_owned()))
}

#[test]
fn daemon_serves_metrics_on_loopback_and_promtool_accepts_the_scrape() {
    let sb = Sandbox::new();
    sb.fake.add_key("a");
    let port = free_port();
    sb.manifest(
        &format!("  metrics_listen: 127.0.0.1:{port}\n"),
        "  a: out/a.pem\n",
    );
    let mut child = sb
        .cmd(&["run"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let scrape = loop {
        if let Ok((head, body)) = http_get(port, "/metrics")
            && body.contains("kps_sync_keys{state=\"in_place\"} 1")
        {
            break (head, body);
        }
        assert!(
            Instant::now() < deadline,
            "no scrape with the first pass in 20 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let (not_found, _) = http_get(port, "/").unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let (head, body) = scrape;
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    assert!(
        head.to_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    assert!(sample(&body, "kps_sync_last_success_timestamp_seconds").unwrap() > 1.7e9);
    assert!(not_found.contains(" 404"), "{not_found}");
    assert_promtool_accepts(&body);
}

#[test]
fn metrics_listen_off_loopback_needs_allow_remote_metrics() {
    let sb = Sandbox::new();
    sb.manifest("  metrics_listen: 0.0.0.0:9464\n", "  a: out/a.pem\n");
    let run = sb.run(&["validate"]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(
        run.stderr.contains("manifest.yaml:9:19:")
            && run.stderr.contains("not a loopback address")
            && run.stderr.contains("allow_remote_metrics: true"),
        "{run:?}"
    );
    sb.manifest(
        "  metrics_listen: 0.0.0.0:9464\n  allow_remote_metrics: true\n",
        "  a: out/a.pem\n",
    );
    let run = sb.run(&["validate"]);
    assert_eq!(run.code, 0, "{run:?}");
}

#[test]
fn alert_rules_pass_promtool_check_rules() {
    let Some(promtool) = promtool() else { return };
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/alerts.yaml");
    let out = Command::new(promtool)
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("SUCCESS: 3 rules found"), "{text}");
    let yaml = std::fs::read_to_string(&rules).unwrap();
    for metric in [
        "kps_sync_last_success_timestamp_seconds",
        "kps_sync_keys{state=\"failed\"}",
        "kps_sync_keys{state=\"conflict\"}",
    ] {
        assert!(yaml.contains(metric), "{metric}");
    }
}

// ---- completions, man page, progress ---------------------------------------------------------

fn bin(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kps-sync"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn completions_for_bash_zsh_and_fish_name_every_command() {
    for (shell, marker) in [
        ("bash", "complete -F _kps__sync"),
        ("zsh", "#compdef kps-sync"),
        ("fish", "complete -c kps-sync"),
    ] {
        let out = bin(&["completions", shell]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{shell}");
        assert!(text.contains(marker), "{shell}: {text}");
        for command in [
            "reconcile",
            "run",
            "plan",
            "validate",
            "status",
            "check",
            "man",
        ] {
            assert!(text.contains(command), "{shell} lacks {command}");
        }
    }
    // The bash script is valid bash.
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("kps-sync.bash");
    std::fs::write(&script, bin(&["completions", "bash"]).stdout).unwrap();
    let out = Command::new("bash")
        .arg("-n")
        .arg(&script)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bad = bin(&["completions", "tcsh"]);
    assert_eq!(bad.status.code(), Some(2));
}

#[test]
fn man_page_renders_with_every_command() {
    let out = bin(&["man"]);
    assert!(out.status.success());
    let page = String::from_utf8(out.stdout).unwrap();
    assert!(page.contains(".TH kps-sync 1"), "{page}");
    for command in [
        "reconcile",
        "run",
        "plan",
        "validate",
        "status",
        "check",
        "completions",
    ] {
        assert!(
            page.contains(&format!("kps\\-sync\\-{command}")) || page.contains(command),
            "{command}"
        );
    }
    // groff, where installed, formats it without a warning.
    if let Ok(mut groff) = Command::new("groff")
        .args(["-man", "-Tutf8", "-ww", "-z"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        groff
            .stdin
            .take()
            .unwrap()
            .write_all(page.as_bytes())
            .unwrap();
        let out = groff.wait_with_output().unwrap();
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Run `kps-sync reconcile` on a pseudo-terminal (util-linux `script`): what the terminal showed.
fn on_a_terminal(sb: &Sandbox, extra: &str) -> String {
    let cmd = format!(
        "{} reconcile -m {} {extra}",
        env!("CARGO_BIN_EXE_kps-sync"),
        sb.path("manifest.yaml").display()
    );
    let out = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .current_dir(sb.dir.path())
        .env("COLUMNS", "100")
        .output()
        .expect("script (util-linux) runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn progress_line_shows_at_a_terminal_and_never_in_logs() {
    let sb = Sandbox::new();
    for i in 0..30 {
        sb.fake.add_key(&format!("k{i:02}"));
    }
    let keys: String = (0..30)
        .map(|i| format!("  k{i:02}: out/k{i:02}.pem\n"))
        .collect();
    sb.manifest("  concurrency: 2\n", &keys);
    sb.fake.set_latency(Duration::from_millis(400));
    let shown = on_a_terminal(&sb, "");
    assert!(
        shown.contains("/30 keys") && shown.contains("exports in flight") && shown.contains("ETA"),
        "{shown}"
    );
    assert!(
        shown.contains("30 managed, 30 in place, 0 failed"),
        "{shown}"
    );

    // JSON logs at a terminal, and any run whose stderr is not a terminal: no line.
    for i in 0..30 {
        std::fs::remove_file(sb.path(&format!("out/k{i:02}.pem"))).unwrap();
    }
    let shown = on_a_terminal(&sb, "--log-format json");
    assert!(!shown.contains("exports in flight"), "{shown}");
    for i in 0..30 {
        std::fs::remove_file(sb.path(&format!("out/k{i:02}.pem"))).unwrap();
    }
    let run = sb.reconcile();
    assert_eq!(run.code, 0, "{run:?}");
    assert!(!run.stderr.contains("exports in flight"), "{run:?}");
}

// ---- small things ---------------------------------------------------------------------------

#[test]
fn a_tab_in_the_indentation_says_use_spaces_at_its_line_and_column() {
    let sb = Sandbox::new();
    let text = sb
        .header()
        .replace("  state_dir: state", "\tstate_dir: state")
        + "keys:\n  a: out/a.pem\n";
    let path = sb.write_manifest(&text);
    let run = sb.run(&["validate"]);
    assert_eq!(run.code, 2, "{run:?}");
    assert_eq!(
        run.stderr.trim(),
        format!(
            "error: {}:8:1: a tab in the indentation: YAML indents with spaces only; use spaces",
            path.display()
        )
    );
}

#[test]
fn validate_says_invalid_not_ok_when_a_credential_file_is_missing() {
    let sb = Sandbox::new();
    sb.manifest("", "  a: out/a.pem\n");
    std::fs::remove_file(sb.path("token")).unwrap();
    let run = sb.run(&["validate"]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(!run.stdout.contains(": ok"), "{run:?}");
    assert!(run.stdout.contains(": invalid, 1 key\n"), "{run:?}");
}

#[test]
fn validate_counts_one_key_in_the_singular() {
    let sb = Sandbox::new();
    sb.manifest("", "  a: out/a.pem\n");
    let run = sb.run(&["validate"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains(": ok, 1 key\n"), "{run:?}");
    sb.manifest("", "  a: out/a.pem\n  b: out/b.pem\n");
    assert!(sb.run(&["validate"]).stdout.contains(": ok, 2 keys\n"));
}

#[test]
fn a_manifest_without_keys_warns_and_manages_nothing() {
    let sb = Sandbox::new();
    sb.write_manifest(&(sb.header() + "keys: {}\n"));
    for cmd in ["validate", "reconcile", "plan"] {
        let run = sb.run(&[cmd]);
        assert_eq!(run.code, 0, "{cmd}: {run:?}");
        assert!(
            run.stderr.contains("warning:") && run.stderr.contains("no keys under `keys:`"),
            "{cmd}: {run:?}"
        );
    }
    assert_eq!(sb.fake.stats().batch_export_calls, 0);
}

#[test]
fn the_production_template_validates_unedited_and_manages_nothing() {
    // What the package installs as /etc/kps-sync/manifest.yaml.
    let template = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/production.yaml");
    let text = std::fs::read_to_string(&template).unwrap();
    for must in [
        "region: cn-north-4",
        "ecs_metadata: {}",
        "state_dir: /var/lib/kps-sync",
    ] {
        assert!(text.contains(must), "{must}");
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("manifest.yaml");
    std::fs::write(&path, &text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kps-sync"))
        .args(["validate", "-m"])
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("ok, 0 keys"), "{stdout}");
    assert!(
        stdout.contains("endpoint https://kms.cn-north-4.myhuaweicloud.com"),
        "{stdout}"
    );
    assert!(
        stdout.contains("auth: ") && stdout.to_lowercase().contains("metadata"),
        "{stdout}"
    );
}

#[test]
fn cloud_init_example_writes_a_valid_agency_manifest_and_enables_the_daemon() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/cloud-init.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.starts_with("#cloud-config\n"));
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let manifest = doc["write_files"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|f| f["path"] == "/etc/kps-sync/manifest.yaml")
        .expect("writes the manifest");
    assert_eq!(manifest["permissions"], "0600");
    let content = manifest["content"]
        .as_str()
        .unwrap()
        .replace("REGION", "cn-north-4")
        .replace("PROJECT_ID", "0123456789abcdef0123456789abcdef");
    assert!(content.contains("ecs_metadata: {}"), "{content}");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("manifest.yaml");
    std::fs::write(&file, &content).unwrap();
    let out = bin(&["validate", "-m", file.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(": ok, 1 key\n"), "{stdout}");
    let runcmd: Vec<String> = doc["runcmd"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_owned())
        .collect();
    let at = |needle: &str| {
        runcmd
            .iter()
            .position(|c| c.contains(needle))
            .unwrap_or_else(|| panic!("runcmd lacks {needle}: {runcmd:?}"))
    };
    assert!(at("apt-get install") < at("kps-sync check"));
    assert!(at("disable --now kps-sync-reconcile.timer") < at("enable --now kps-sync.service"));
}
