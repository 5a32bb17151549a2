//! `on_change` hooks: run an argv (no shell) after a key's file changed, with a timeout.
//! The hook gets `KPS_SYNC_KEY`, `KPS_SYNC_PATH` and `KPS_SYNC_ACTION` (the first changed key
//! sharing the argv: its name, path and what was done: `create`, `restore`, `re-encrypt`,
//! `rotate`), `KPS_SYNC_KEYS` and `KPS_SYNC_ACTIONS` (all of them, space-separated, in the same
//! order) in its environment, never the key.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

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
pub async fn run(
    keys: &[&str],
    actions: &[&str],
    path: &Path,
    argv: &[String],
    timeout: Duration,
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
    let mut child = tokio::process::Command::new(program)
        .args(args)
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
        )
        .await;
        assert!(matches!(err, Err(HookError::Failed { .. })));
        let err = run(
            &["web"],
            &["create"],
            Path::new("/k"),
            &["sleep".into(), "5".into()],
            Duration::from_millis(100),
        )
        .await;
        assert!(matches!(err, Err(HookError::Timeout { .. })));
        let err = run(
            &["web"],
            &["create"],
            Path::new("/k"),
            &["/nonexistent/prog".into()],
            Duration::from_secs(1),
        )
        .await;
        assert!(matches!(err, Err(HookError::Spawn { .. })));
    }
}
