//! `settings:`, each with its default.

use super::*;

impl Checker<'_> {
    pub(super) fn settings(&mut self, s: RawSettings) -> Option<Settings> {
        let at = |k: &str| path(&["settings", k]);
        let mut ok = true;
        let state_dir = match &s.state_dir {
            None => {
                let dir = PathBuf::from(DEFAULT_STATE_DIR);
                self.trusted(&dir, Input::StateDir, None).then_some(dir)
            }
            Some(d) => self.resolve(d, at("state_dir"), "state_dir"),
        };
        let mut duration =
            |c: &mut Self, field: &str, raw: &Option<Text>, default: Duration, zero_ok: bool| {
                let Some(raw) = raw else {
                    return default;
                };
                match duration::parse(raw.as_str()) {
                    Ok(d) if d.is_zero() && !zero_ok => {
                        c.problem(
                            at(field),
                            Target::Value,
                            format!(
                                "`{field}` cannot be zero: write a positive duration like `5m`"
                            ),
                        );
                        ok = false;
                        default
                    }
                    Ok(d) => d,
                    Err(why) => {
                        c.problem(at(field), Target::Value, format!("`{field}`: {why}"));
                        ok = false;
                        default
                    }
                }
            };
        let interval = duration(self, "interval", &s.interval, DEFAULT_INTERVAL, false);
        let debounce = duration(self, "debounce", &s.debounce, DEFAULT_DEBOUNCE, true);
        let hook_timeout = duration(
            self,
            "hook_timeout",
            &s.hook_timeout,
            DEFAULT_HOOK_TIMEOUT,
            false,
        );
        let rotation_check = duration(
            self,
            "rotation_check",
            &s.rotation_check,
            DEFAULT_ROTATION_CHECK,
            true,
        );
        let concurrency = match s.concurrency {
            None => DEFAULT_CONCURRENCY,
            Some(n) if (1..=MAX_CONCURRENCY).contains(&n) => n as usize,
            Some(n) => {
                self.problem(
                    at("concurrency"),
                    Target::Value,
                    format!(
                        "`concurrency: {n}` is out of range: write a number from 1 to \
                         {MAX_CONCURRENCY} (default {DEFAULT_CONCURRENCY})"
                    ),
                );
                ok = false;
                DEFAULT_CONCURRENCY
            }
        };
        let watch = match s.watch.as_ref().map(Text::as_str) {
            None | Some("inotify") => WatchMode::Inotify,
            Some("poll") => WatchMode::Poll,
            Some(other) => {
                self.problem(
                    at("watch"),
                    Target::Value,
                    format!("`watch: {other}` is not a watch mode: write `inotify` or `poll`"),
                );
                ok = false;
                WatchMode::Inotify
            }
        };
        let max_rps = match s.max_rps {
            None => None,
            Some(r) if r.is_finite() && r > 0.0 => Some(r),
            Some(r) => {
                self.problem(
                    at("max_rps"),
                    Target::Value,
                    format!(
                        "`max_rps: {r}` must be a positive number of requests per second (e.g. \
                         `10`), or left out for no cap"
                    ),
                );
                ok = false;
                None
            }
        };
        let metrics_file = match &s.metrics_file {
            None => None,
            Some(f) => {
                let r = self.resolve(f, at("metrics_file"), "metrics_file");
                ok &= r.is_some();
                r
            }
        };
        let metrics_listen = match &s.metrics_listen {
            None => None,
            Some(a) => match a.as_str().parse::<SocketAddr>() {
                Ok(addr) if !addr.ip().is_loopback() && s.allow_remote_metrics != Some(true) => {
                    // The metrics say which keys fail and when: not for every host that can
                    // reach this one, unless the operator says so.
                    self.problem(
                        at("metrics_listen"),
                        Target::Value,
                        format!(
                            "`metrics_listen: {addr}` is not a loopback address: use \
                             `127.0.0.1:{}` and scrape it locally, or add \
                             `allow_remote_metrics: true` to serve other hosts",
                            addr.port()
                        ),
                    );
                    ok = false;
                    None
                }
                Ok(addr) => Some(addr),
                Err(_) => {
                    self.problem(
                        at("metrics_listen"),
                        Target::Value,
                        format!(
                            "`metrics_listen: {}` is not an address and port: write e.g. \
                             `127.0.0.1:9464` or `[::1]:9464`",
                            a.as_str()
                        ),
                    );
                    ok = false;
                    None
                }
            },
        };
        let hook_env = self.hook_env(s.hook_env.as_deref().unwrap_or_default(), &mut ok);
        let state_dir = state_dir?;
        ok.then_some(Settings {
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
