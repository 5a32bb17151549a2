//! `on_change` hooks: run an argv (no shell) after a key's file changed, with a timeout.
//! The hook gets `KPS_SYNC_KEY`, `KPS_SYNC_PATH` and `KPS_SYNC_ACTION` (the first changed key
//! sharing the argv: its name, path and what was done: `create`, `restore`, `re-encrypt`,
//! `rotate`), `KPS_SYNC_KEYS` and `KPS_SYNC_ACTIONS` (all of them, space-separated, in the same
//! order) in its environment, never the key.
//!
//! Invariants: a hook starts with a clean environment: [`PASSED`] from kps-sync's own
//! environment (a default `PATH` when it has none), the `KPS_SYNC_*` variables set here, and
//! the names the manifest lists in `settings.hook_env`, nothing else. A credential variable
//! ([`is_credential`]) never reaches a hook: the manifest loader refuses to list one, and
//! [`run`] skips it again should one get through. stdin is closed, the working folder is `/`,
//! and the hook is killed when `hook_timeout` runs out.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

/// Variables a hook gets from kps-sync's environment without being listed: what a program
/// needs to run (`PATH`, `LANG`) and what systemd gives a unit to log to the journal.
pub const PASSED: &[&str] = &["PATH", "LANG", "INVOCATION_ID", "JOURNAL_STREAM"];

/// `PATH` for a hook when kps-sync itself has none (systemd's default).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Whether `name` holds, or leads to, a KPS credential: the auth sources' variables
/// (`HUAWEICLOUD_SDK_*`, `KPS_SYNC_AUTH_TOKEN`) and systemd's `CREDENTIALS_DIRECTORY`.
/// `KPS_SYNC_*` as a whole is kps-sync's own, set for the hook, never taken from outside.
pub fn is_credential(name: &str) -> bool {
    name.starts_with("HUAWEICLOUD_")
        || name == "CREDENTIALS_DIRECTORY"
        || name.starts_with("KPS_SYNC_")
}

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error(
        "hook {argv:?} for key {key}: cannot start: {source}; check the program path in on_change"
    )]
    Spawn {
        key: String,
        argv: Vec<String>,
        source: std::io::Error,
    },
    #[error("hook {argv:?} for key {key}: exited with {status}; see its output above")]
    Failed {
        key: String,
        argv: Vec<String>,
        status: std::process::ExitStatus,
    },
    #[error(
        "hook {argv:?} for key {key}: still running after {timeout:?}, killed; raise settings.hook_timeout or fix the hook"
    )]
    Timeout {
        key: String,
        argv: Vec<String>,
        timeout: Duration,
    },
}

/// Run one hook to completion. Its stdout and stderr go to our stderr (the journal under systemd).
/// `keys` are the changed keys that share this argv (at least one); `actions` what was done to
/// each, in the same order; `path` is the first key's.
/// `pass_env` is `settings.hook_env`: more names to pass from kps-sync's environment.
pub async fn run(
    keys: &[&str],
    actions: &[&str],
    path: &Path,
    argv: &[String],
    timeout: Duration,
    pass_env: &[String],
) -> Result<(), HookError> {
    let key = keys.join(" ");
    let Some((program, args)) = argv.split_first() else {
        return Ok(());
    };
    let stderr = || {
        use std::os::fd::AsFd;
        std::io::stderr()
            .as_fd()
            .try_clone_to_owned()
            .map(Stdio::from)
            .unwrap_or_else(|_| Stdio::null())
    };
    let mut command = tokio::process::Command::new(program);
    command.env_clear();
    let passed = PASSED
        .iter()
        .copied()
        .chain(pass_env.iter().map(String::as_str));
    for name in passed.filter(|n| !is_credential(n)) {
        if let Some(value) = std::env::var_os(name) {
            command.env(name, value);
        }
    }
    if std::env::var_os("PATH").is_none() {
        command.env("PATH", DEFAULT_PATH);
    }
    let mut child = command
        .args(args)
        .current_dir("/")
        .env("KPS_SYNC_KEY", keys.first().copied().unwrap_or_default())
        .env("KPS_SYNC_KEYS", &key)
        .env("KPS_SYNC_PATH", path)
        .env(
            "KPS_SYNC_ACTION",
            actions.first().copied().unwrap_or_default(),
        )
        .env("KPS_SYNC_ACTIONS", actions.join(" "))
        .stdin(Stdio::null())
        .stdout(stderr())
        .stderr(stderr())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| HookError::Spawn {
            key: key.to_owned(),
            argv: argv.to_vec(),
            source,
        })?;
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) => Err(HookError::Failed {
            key: key.to_owned(),
            argv: argv.to_vec(),
            status,
        }),
        Ok(Err(source)) => Err(HookError::Spawn {
            key: key.to_owned(),
            argv: argv.to_vec(),
            source,
        }),
        Err(_) => {
            let _ = child.kill().await;
            Err(HookError::Timeout {
                key: key.to_owned(),
                argv: argv.to_vec(),
                timeout,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn runs_with_the_key_in_the_environment_and_reports_failures() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let argv = vec![
            "sh".to_owned(),
            "-c".to_owned(),
            format!(
                "echo \"$KPS_SYNC_KEY $KPS_SYNC_PATH $KPS_SYNC_KEYS $KPS_SYNC_ACTION $KPS_SYNC_ACTIONS\" > {}",
                out.display()
            ),
        ];
        run(
            &["web", "db"],
            &["rotate", "create"],
            Path::new("/k/web"),
            &argv,
            Duration::from_secs(5),
            &[],
        )
        .await
        .unwrap();
        assert_eq!(
            std::fs::read_to_string(&out).unwrap(),
            "web /k/web web db rotate rotate create\n"
        );

        let err = run(
            &["web"],
            &["create"],
            Path::new("/k"),
            &["false".into()],
            Duration::from_secs(5),
            &[],
        )
        .await;
        assert!(matches!(err, Err(HookError::Failed { .. })));
        let err = run(
            &["web"],
            &["create"],
            Path::new("/k"),
            &["sleep".into(), "5".into()],
            Duration::from_millis(100),
            &[],
        )
        .await;
        assert!(matches!(err, Err(HookError::Timeout { .. })));
        let err = run(
            &["web"],
            &["create"],
            Path::new("/k"),
            &["/nonexistent/prog".into()],
            Duration::from_secs(1),
            &[],
        )
        .await;
        assert!(matches!(err, Err(HookError::Spawn { .. })));
    }

    #[tokio::test]
    async fn the_environment_is_clean_stdin_closed_and_cwd_root() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let script = format!(
            "env > {out}; pwd >> {out}; if read -r line; then echo stdin-open >> {out}; fi",
            out = out.display()
        );
        let argv = vec!["sh".to_owned(), "-c".to_owned(), script];
        // HOME is in every test's environment; listed, it is passed. A credential name listed
        // anyway (the loader refuses it before this) is still not passed.
        let listed = vec!["HOME".to_owned(), "CREDENTIALS_DIRECTORY".to_owned()];
        run(
            &["web"],
            &["create"],
            Path::new("/k/web"),
            &argv,
            Duration::from_secs(5),
            &listed,
        )
        .await
        .unwrap();
        let text = std::fs::read_to_string(&out).unwrap();
        let mut names: Vec<&str> = text
            .lines()
            .filter_map(|l| l.split_once('=').map(|(n, _)| n))
            .filter(|n| !matches!(*n, "PWD" | "OLDPWD" | "SHLVL" | "_"))
            .collect();
        names.sort_unstable();
        let mut allowed = vec![
            "HOME",
            "KPS_SYNC_ACTION",
            "KPS_SYNC_ACTIONS",
            "KPS_SYNC_KEY",
            "KPS_SYNC_KEYS",
            "KPS_SYNC_PATH",
            "PATH",
        ];
        for name in ["LANG", "INVOCATION_ID", "JOURNAL_STREAM"] {
            if std::env::var_os(name).is_some() {
                allowed.push(name);
            }
        }
        allowed.sort_unstable();
        assert_eq!(names, allowed, "{text}");
        assert_eq!(text.lines().last(), Some("/"), "runs in /");
        assert!(!text.contains("stdin-open"), "stdin is closed");
    }

    #[test]
    fn credential_names_are_recognised() {
        for name in [
            "HUAWEICLOUD_SDK_AK",
            "HUAWEICLOUD_SDK_SK",
            "HUAWEICLOUD_SDK_SECURITY_TOKEN",
            "HUAWEICLOUD_SDK_CREDENTIALS_FILE",
            "KPS_SYNC_AUTH_TOKEN",
            "CREDENTIALS_DIRECTORY",
        ] {
            assert!(is_credential(name), "{name}");
        }
        for name in ["PATH", "LANG", "HOME", "TZ", "http_proxy"] {
            assert!(!is_credential(name), "{name}");
        }
    }
}
