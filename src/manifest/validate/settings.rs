//! `settings:`, each with its default.

use super::*;

/// A setting the checker found wrong (the problem is already recorded).
struct Reported;

fn at(field: &str) -> Vec<Seg> {
    path(&["settings", field])
}

impl Checker<'_> {
    pub(super) fn settings(&mut self, s: RawSettings) -> Option<Settings> {
        let state_dir = match &s.state_dir {
            None => {
                let dir = PathBuf::from(DEFAULT_STATE_DIR);
                self.trusted(&dir, Input::StateDir, None).then_some(dir)
            }
            Some(d) => self.resolve(d, at("state_dir"), "state_dir"),
        }
        .ok_or(Reported);
        let interval = self.duration("interval", s.interval.as_ref(), DEFAULT_INTERVAL, false);
        let debounce = self.duration("debounce", s.debounce.as_ref(), DEFAULT_DEBOUNCE, true);
        let hook_timeout = self.duration(
            "hook_timeout",
            s.hook_timeout.as_ref(),
            DEFAULT_HOOK_TIMEOUT,
            false,
        );
        let rotation_check = self.duration(
            "rotation_check",
            s.rotation_check.as_ref(),
            DEFAULT_ROTATION_CHECK,
            true,
        );
        let concurrency = self.concurrency(s.concurrency);
        let watch = self.watch(s.watch.as_ref());
        let max_rps = self.max_rps(s.max_rps);
        let metrics_file = match &s.metrics_file {
            None => Ok(None),
            Some(f) => self
                .resolve(f, at("metrics_file"), "metrics_file")
                .map(Some)
                .ok_or(Reported),
        };
        let metrics_listen = self.metrics_listen(&s);
        let mut hook_env_ok = true;
        let hook_env = self.hook_env(s.hook_env.as_deref().unwrap_or_default(), &mut hook_env_ok);
        // Every field is checked before giving up, so one run reports every problem.
        let (
            Ok(state_dir),
            Ok(interval),
            Ok(debounce),
            Ok(hook_timeout),
            Ok(rotation_check),
            Ok(concurrency),
            Ok(watch),
            Ok(max_rps),
            Ok(metrics_file),
            Ok(metrics_listen),
            true,
        ) = (
            state_dir,
            interval,
            debounce,
            hook_timeout,
            rotation_check,
            concurrency,
            watch,
            max_rps,
            metrics_file,
            metrics_listen,
            hook_env_ok,
        )
        else {
            return None;
        };
        Some(Settings {
            state_dir,
            interval,
            debounce,
            concurrency,
            prune: s.prune.unwrap_or(false),
            hook_timeout,
            verify_remote: s.verify_remote.unwrap_or(true),
            rotation_check,
            watch,
            max_rps,
            metrics_file,
            metrics_listen,
            hook_env,
        })
    }

    /// A duration like `5m`; zero only where it means "off".
    fn duration(
        &mut self,
        field: &str,
        raw: Option<&Text>,
        default: Duration,
        zero_ok: bool,
    ) -> Result<Duration, Reported> {
        let Some(raw) = raw else {
            return Ok(default);
        };
        let message = match duration::parse(raw.as_str()) {
            Ok(d) if d.is_zero() && !zero_ok => {
                format!("`{field}` cannot be zero: write a positive duration like `5m`")
            }
            Ok(d) => return Ok(d),
            Err(why) => format!("`{field}`: {why}"),
        };
        self.problem(at(field), Target::Value, message);
        Err(Reported)
    }

    fn concurrency(&mut self, raw: Option<i64>) -> Result<usize, Reported> {
        match raw {
            None => Ok(DEFAULT_CONCURRENCY),
            Some(n) if (1..=MAX_CONCURRENCY).contains(&n) => {
                Ok(usize::try_from(n).expect("1..=64 fits"))
            }
            Some(n) => {
                self.problem(
                    at("concurrency"),
                    Target::Value,
                    format!(
                        "`concurrency: {n}` is out of range: write a number from 1 to \
                         {MAX_CONCURRENCY} (default {DEFAULT_CONCURRENCY})"
                    ),
                );
                Err(Reported)
            }
        }
    }

    fn watch(&mut self, raw: Option<&Text>) -> Result<WatchMode, Reported> {
        match raw.map(Text::as_str) {
            None | Some("inotify") => Ok(WatchMode::Inotify),
            Some("poll") => Ok(WatchMode::Poll),
            Some(other) => {
                self.problem(
                    at("watch"),
                    Target::Value,
                    format!("`watch: {other}` is not a watch mode: write `inotify` or `poll`"),
                );
                Err(Reported)
            }
        }
    }

    fn max_rps(&mut self, raw: Option<f64>) -> Result<Option<f64>, Reported> {
        match raw {
            None => Ok(None),
            Some(r) if r.is_finite() && r > 0.0 => Ok(Some(r)),
            Some(r) => {
                self.problem(
                    at("max_rps"),
                    Target::Value,
                    format!(
                        "`max_rps: {r}` must be a positive number of requests per second (e.g. \
                         `10`), or left out for no cap"
                    ),
                );
                Err(Reported)
            }
        }
    }

    fn metrics_listen(&mut self, s: &RawSettings) -> Result<Option<SocketAddr>, Reported> {
        let Some(raw) = &s.metrics_listen else {
            return Ok(None);
        };
        let message = match raw.as_str().parse::<SocketAddr>() {
            // The metrics say which keys fail and when: not for every host that can reach this
            // one, unless the operator says so.
            Ok(addr) if !addr.ip().is_loopback() && s.allow_remote_metrics != Some(true) => {
                format!(
                    "`metrics_listen: {addr}` is not a loopback address: use \
                     `127.0.0.1:{}` and scrape it locally, or add \
                     `allow_remote_metrics: true` to serve other hosts",
                    addr.port()
                )
            }
            Ok(addr) => return Ok(Some(addr)),
            Err(_) => format!(
                "`metrics_listen: {}` is not an address and port: write e.g. \
                 `127.0.0.1:9464` or `[::1]:9464`",
                raw.as_str()
            ),
        };
        self.problem(at("metrics_listen"), Target::Value, message);
        Err(Reported)
    }

    /// `hook_env:`: environment variable names, none of them a credential.
    fn hook_env(&mut self, names: &[Text], ok: &mut bool) -> Vec<String> {
        let mut out = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let mut at = path(&["settings", "hook_env"]);
            at.push(Seg::Index(i));
            let name = name.as_str();
            let valid = !name.is_empty()
                && !name.starts_with(|c: char| c.is_ascii_digit())
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                self.problem(
                    at,
                    Target::Value,
                    format!(
                        "`hook_env` lists `{}`, which is not an environment variable name: \
                         use letters, digits and `_`, not starting with a digit",
                        name.escape_debug()
                    ),
                );
                *ok = false;
            } else if crate::hooks::is_credential(name) {
                let why = if name.starts_with("KPS_SYNC_") && name != "KPS_SYNC_AUTH_TOKEN" {
                    "kps-sync sets the `KPS_SYNC_*` variables a hook gets itself"
                } else {
                    "it holds or leads to a KPS credential, which a hook never gets"
                };
                self.problem(
                    at,
                    Target::Value,
                    format!("`hook_env` lists `{name}`: {why}; remove it from the list"),
                );
                *ok = false;
            } else if !out.iter().any(|n| n == name) {
                out.push(name.to_owned());
            }
        }
        out
    }
}
