//! Raw manifest -> validated [`Manifest`]: paths resolved, owners looked up, recipients parsed,
//! every rule checked. All rule violations are collected, each with the path of the YAML node
//! it is about; locations are looked up only at the end, once per problem.
//!
//! Invariant: a `Manifest` comes out only when no problem was found.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use super::error::{Location, Problem};
use super::locate::{Seg, Target, locate, path, scan_key_lines};
use super::raw::{
    Present, RawAuth, RawDefaults, RawKey, RawKps, RawManifest, RawMode, RawOnChange, RawSettings,
    Text,
};
use super::{
    AuthConfig, Encryption, KeySpec, KpsConfig, Manifest, Principal, Recipient, Settings,
    WatchMode, duration,
};

/// Looks up users and groups; the real one asks the system (NSS), tests use a table.
pub(super) trait Accounts {
    /// The uid of `name`, `Ok(None)` if there is no such user.
    fn user(&self, name: &str) -> Result<Option<u32>, String>;
    /// The gid of `name`, `Ok(None)` if there is no such group.
    fn group(&self, name: &str) -> Result<Option<u32>, String>;
}

/// getpwnam/getgrnam through `nix`.
pub(super) struct SystemAccounts;

impl Accounts for SystemAccounts {
    fn user(&self, name: &str) -> Result<Option<u32>, String> {
        nix::unistd::User::from_name(name)
            .map(|u| u.map(|u| u.uid.as_raw()))
            .map_err(|e| e.to_string())
    }
    fn group(&self, name: &str) -> Result<Option<u32>, String> {
        nix::unistd::Group::from_name(name)
            .map(|g| g.map(|g| g.gid.as_raw()))
            .map_err(|e| e.to_string())
    }
}

/// What the loader needs from the outside world besides the text.
pub(super) struct Context<'a> {
    /// The manifest file, absolute and normalized.
    pub manifest: &'a Path,
    /// Reads an environment variable (only `CREDENTIALS_DIRECTORY`).
    pub env: &'a dyn Fn(&str) -> Option<OsString>,
    pub accounts: &'a dyn Accounts,
}

pub(super) const DEFAULT_STATE_DIR: &str = "/var/lib/kps-sync";
const DEFAULT_INTERVAL: Duration = Duration::from_secs(300);
const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(250);
const DEFAULT_CONCURRENCY: usize = 4;
const MAX_CONCURRENCY: i64 = 64;
const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_MODE: u32 = 0o600;
/// Recipients files are a few lines; refuse to slurp something else by mistake.
const MAX_RECIPIENTS_FILE: u64 = 1 << 20;

pub(super) fn validate(
    raw: RawManifest,
    text: &str,
    ctx: &Context<'_>,
) -> Result<Manifest, Vec<Problem>> {
    let mut c = Checker {
        text,
        dir: ctx
            .manifest
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("/")),
        ctx,
        pending: Vec::new(),
        recipients_files: HashMap::new(),
    };
    c.version(raw.version.as_ref());
    let kps = match raw.kps {
        Some(kps) => c.kps(kps),
        None => {
            c.at_start(
                "the `kps:` section is missing: add `kps:` with `region:` (or `endpoint:`) and \
                 `project_id:`",
            );
            None
        }
    };
    let settings = c.settings(raw.settings.unwrap_or_default());
    let keys = c.keys(raw.defaults, raw.keys.unwrap_or_default());
    let problems = c.finish();
    match (kps, settings) {
        (Some(kps), Some(settings)) if problems.is_empty() => Ok(Manifest {
            path: ctx.manifest.to_path_buf(),
            kps,
            settings,
            keys,
        }),
        _ => Err(problems),
    }
}

struct Pending {
    at: Option<(Vec<Seg>, Target)>,
    message: String,
}

struct Checker<'a> {
    text: &'a str,
    /// The manifest's folder: relative paths resolve against it.
    dir: PathBuf,
    ctx: &'a Context<'a>,
    pending: Vec<Pending>,
    /// Each recipients file is read and judged once, however many keys name it. `None`: it
    /// failed and was reported.
    recipients_files: HashMap<PathBuf, Option<Vec<Recipient>>>,
}

/// The checked per-key fields of `defaults:` or of one key. The outer `Option` is "written",
/// the inner one "and valid" (a problem was recorded when it is `None`).
#[derive(Default, Clone)]
struct Fields {
    mode: Option<Option<u32>>,
    owner: Option<Option<Principal>>,
    group: Option<Option<Principal>>,
    recipients: Option<Option<Vec<Recipient>>>,
    recipients_file: Option<Option<Vec<Recipient>>>,
    /// The value and where it was written.
    armor: Option<(bool, Vec<Seg>)>,
    on_change: Option<Option<Vec<String>>>,
}

impl Checker<'_> {
    fn problem(&mut self, at: Vec<Seg>, target: Target, message: impl Into<String>) {
        self.pending.push(Pending {
            at: Some((at, target)),
            message: message.into(),
        });
    }

    fn at_start(&mut self, message: impl Into<String>) {
        self.pending.push(Pending {
            at: None,
            message: message.into(),
        });
    }

    fn finish(self) -> Vec<Problem> {
        let mut problems: Vec<Problem> = self
            .pending
            .into_iter()
            .map(|p| {
                let location = match p.at {
                    None => Some(Location { line: 1, column: 1 }),
                    Some((at, target)) => locate_or_parent(self.text, &at, target),
                };
                Problem {
                    location,
                    message: p.message,
                }
            })
            .collect();
        problems.sort_by(|a, b| a.location.cmp(&b.location).then(a.message.cmp(&b.message)));
        problems.dedup();
        problems
    }

    fn version(&mut self, version: Option<&serde_yaml::Value>) {
        match version {
            None => self.at_start(
                "`version:` is missing: add `version: 1` as the first line (the only manifest \
                 format this kps-sync reads)",
            ),
            Some(v) if v.as_u64() == Some(1) => {}
            Some(v) => {
                let shown = serde_yaml::to_string(v).unwrap_or_default();
                self.problem(
                    path(&["version"]),
                    Target::Value,
                    format!(
                        "unsupported manifest version {}: this kps-sync reads `version: 1` \
                         (an unquoted number)",
                        shown.trim()
                    ),
                );
            }
        }
    }

    // ---- kps ----

    fn kps(&mut self, kps: RawKps) -> Option<KpsConfig> {
        let region = kps.region.map(|r| r.0);
        if let Some(r) = &region
            && !valid_region(r)
        {
            self.problem(
                path(&["kps", "region"]),
                Target::Value,
                format!(
                    "`{r}` is not a region name: write one like `cn-north-4` (lowercase letters, \
                     digits and `-`)"
                ),
            );
        }
        let endpoint = match (&kps.endpoint, &region) {
            (Some(e), _) => match check_url(e.as_str(), HttpRule::LoopbackOnly) {
                Ok(url) => Some(url),
                Err(why) => {
                    self.problem(path(&["kps", "endpoint"]), Target::Value, why);
                    None
                }
            },
            (None, Some(r)) if valid_region(r) => {
                Some(format!("https://kms.{r}.myhuaweicloud.com"))
            }
            (None, Some(_)) => None,
            (None, None) => {
                self.problem(
                    path(&["kps"]),
                    Target::Key,
                    "`kps:` needs `region:` (e.g. `region: cn-north-4`) or `endpoint:` (an \
                     https:// URL)",
                );
                None
            }
        };
        let project_id = match kps.project_id {
            None => {
                self.problem(
                    path(&["kps"]),
                    Target::Key,
                    "`kps.project_id:` is missing: add the 32 hex characters of the project's \
                     ID (console: My Credentials > API Credentials)",
                );
                None
            }
            Some(p) if p.0.len() == 32 && p.0.bytes().all(|b| b.is_ascii_hexdigit()) => Some(p.0),
            Some(p) => {
                self.problem(
                    path(&["kps", "project_id"]),
                    Target::Value,
                    format!(
                        "`project_id` must be 32 hex characters (found {} characters{}): copy \
                         the project ID from the console (My Credentials > API Credentials)",
                        p.0.chars().count(),
                        if p.0.bytes().all(|b| b.is_ascii_hexdigit()) {
                            ""
                        } else {
                            ", not all hex"
                        }
                    ),
                );
                None
            }
        };
        let ca_file = kps
            .ca_file
            .and_then(|f| self.resolve(&f, path(&["kps", "ca_file"]), "ca_file"));
        let auth = self.auth(kps.auth.unwrap_or_default(), region.as_deref());
        Some(KpsConfig {
            region,
            endpoint: endpoint?,
            project_id: project_id?,
            auth: auth?,
            ca_file,
        })
    }

    fn auth(&mut self, auth: RawAuth, region: Option<&str>) -> Option<AuthConfig> {
        let at = |k: &str| path(&["kps", "auth", k]);
        // The methods written, each named by the field that selects it. AK/SK takes up to three
        // fields: it is named by the one written first.
        let mut methods: Vec<(Option<Location>, &str)> = Vec::new();
        let mut add = |names: &[(&'static str, bool)]| {
            let first = names
                .iter()
                .filter(|(_, given)| *given)
                .map(|(name, _)| (locate(self.text, &at(name), Target::Key), *name))
                .min();
            methods.extend(first);
        };
        add(&[("token_file", auth.token_file.is_some())]);
        add(&[
            ("access_key_file", auth.access_key_file.is_some()),
            ("secret_key_file", auth.secret_key_file.is_some()),
            ("security_token_file", auth.security_token_file.is_some()),
        ]);
        add(&[("iam", auth.iam.is_given())]);
        add(&[("ecs_metadata", auth.ecs_metadata.is_given())]);
        methods.sort();
        let methods: Vec<&str> = methods.into_iter().map(|(_, name)| name).collect();
        if methods.len() > 1 {
            let names: Vec<String> = methods.iter().map(|m| format!("`{m}`")).collect();
            // Point at the method written last: most likely the one added by mistake.
            let last = methods[methods.len() - 1];
            self.problem(
                at(last),
                Target::Key,
                format!(
                    "`kps.auth` names {} methods ({}): keep exactly one",
                    methods.len(),
                    names.join(" and ")
                ),
            );
            return None;
        }
        let method = methods.first().copied();
        match method {
            None => Some(AuthConfig::Unspecified),
            Some("token_file") => {
                let file = auth.token_file?;
                self.resolve(&file, at("token_file"), "token_file")
                    .map(AuthConfig::TokenFile)
            }
            Some("iam") => {
                let Present::Given(iam) = auth.iam else {
                    return None;
                };
                let iam_at = |k: &str| path(&["kps", "auth", "iam", k]);
                let mut missing = Vec::new();
                if iam.user.is_none() {
                    missing.push("user");
                }
                if iam.domain.is_none() {
                    missing.push("domain");
                }
                if iam.password_file.is_none() {
                    missing.push("password_file");
                }
                if !missing.is_empty() {
                    let list: Vec<String> = missing.iter().map(|m| format!("`{m}:`")).collect();
                    self.problem(
                        at("iam"),
                        Target::Key,
                        format!(
                            "`iam:` needs `user:`, `domain:` and `password_file:`; missing {}",
                            list.join(", ")
                        ),
                    );
                }
                let password_file = iam
                    .password_file
                    .and_then(|f| self.resolve(&f, iam_at("password_file"), "password_file"));
                let endpoint = match iam.endpoint {
                    None => {
                        if region.is_none() {
                            self.problem(
                                at("iam"),
                                Target::Key,
                                "`iam:` without `endpoint:` needs `kps.region:` to find IAM \
                                 (https://iam.{region}.myhuaweicloud.com): add one of them",
                            );
                        }
                        None
                    }
                    Some(e) => match check_url(e.as_str(), HttpRule::LoopbackOnly) {
                        Ok(url) => Some(url),
                        Err(why) => {
                            self.problem(iam_at("endpoint"), Target::Value, why);
                            return None;
                        }
                    },
                };
                Some(AuthConfig::Iam {
                    user: non_empty(iam.user?.0)?,
                    domain: non_empty(iam.domain?.0)?,
                    password_file: password_file?,
                    endpoint,
                })
            }
            Some("ecs_metadata") => {
                let Present::Given(ecs) = auth.ecs_metadata else {
                    return None;
                };
                let endpoint = match ecs.endpoint {
                    None => None,
                    Some(e) => match check_url(e.as_str(), HttpRule::Any) {
                        Ok(url) => Some(url),
                        Err(why) => {
                            self.problem(
                                path(&["kps", "auth", "ecs_metadata", "endpoint"]),
                                Target::Value,
                                why,
                            );
                            return None;
                        }
                    },
                };
                Some(AuthConfig::EcsMetadata { endpoint })
            }
            Some(_) => {
                let (Some(ak), Some(sk)) = (&auth.access_key_file, &auth.secret_key_file) else {
                    let missing = if auth.access_key_file.is_none() {
                        "access_key_file"
                    } else {
                        "secret_key_file"
                    };
                    let present = methods[0];
                    self.problem(
                        at(present),
                        Target::Key,
                        format!(
                            "AK/SK auth needs both `access_key_file:` and `secret_key_file:` \
                             (`security_token_file:` is optional); add `{missing}:`"
                        ),
                    );
                    return None;
                };
                let access_key_file = self.resolve(ak, at("access_key_file"), "access_key_file");
                let secret_key_file = self.resolve(sk, at("secret_key_file"), "secret_key_file");
                let security_token_file = match &auth.security_token_file {
                    None => None,
                    Some(t) => {
                        Some(self.resolve(t, at("security_token_file"), "security_token_file")?)
                    }
                };
                Some(AuthConfig::AkSk {
                    access_key_file: access_key_file?,
                    secret_key_file: secret_key_file?,
                    security_token_file,
                })
            }
        }
    }

    // ---- settings ----

    fn settings(&mut self, s: RawSettings) -> Option<Settings> {
        let at = |k: &str| path(&["settings", k]);
        let mut ok = true;
        let state_dir = match &s.state_dir {
            None => Some(PathBuf::from(DEFAULT_STATE_DIR)),
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
        let state_dir = state_dir?;
        ok.then_some(Settings {
            state_dir,
            interval,
            debounce,
            concurrency,
            prune: s.prune.unwrap_or(false),
            hook_timeout,
            verify_remote: s.verify_remote.unwrap_or(false),
            watch,
            max_rps,
            metrics_file,
            metrics_listen,
        })
    }

    // ---- keys ----

    fn keys(
        &mut self,
        defaults: Option<RawDefaults>,
        keys: BTreeMap<Text, RawKey>,
    ) -> Vec<KeySpec> {
        let defaults = defaults.unwrap_or_default();
        let defaults_armor = defaults.armor == Some(true);
        let defaults = self.fields(defaults, path(&["defaults"]));
        let lines = scan_key_lines(self.text);
        let mut specs = Vec::new();
        let mut any_recipients = has_recipients(&defaults);
        for (name, raw) in keys {
            let name = name.0;
            let key_at = path(&["keys", &name]);
            if !valid_name(&name) {
                self.problem(
                    key_at.clone(),
                    Target::Key,
                    format!(
                        "`{}` is not a KPS key pair name: use 1 to 255 letters, digits, `_` or \
                         `-`",
                        name.escape_debug()
                    ),
                );
            }
            let (raw_path, own, path_at) = match raw {
                RawKey::Short(p) => (Some(p), RawDefaults::default(), key_at.clone()),
                RawKey::Long(long) => {
                    let mut at = key_at.clone();
                    at.push(Seg::Key("path".into()));
                    let (p, fields) = long.split();
                    (p, fields, at)
                }
                RawKey::Empty => (None, RawDefaults::default(), key_at.clone()),
            };
            let own = self.fields(own, key_at.clone());
            any_recipients |= has_recipients(&own);
            let file = match raw_path {
                None => {
                    self.problem(
                        key_at.clone(),
                        Target::Key,
                        format!(
                            "key `{name}` has no path: write `{name}: /path/to/file` or give \
                             `path:` in its mapping"
                        ),
                    );
                    None
                }
                Some(p) => self.key_path(&p, path_at),
            };
            let line = lines
                .get(&name)
                .copied()
                .or_else(|| locate(self.text, &key_at, Target::Key))
                .map_or(0, |l| l.line);
            if let Some(spec) = self.merge(name, file, own, &defaults, line, key_at) {
                specs.push(spec);
            }
        }
        if defaults_armor && !any_recipients {
            self.problem(
                path(&["defaults", "armor"]),
                Target::Key,
                "`armor: true` without any recipient has nothing to armor: add \
                 `age_recipients:` or `age_recipients_file:`, or remove `armor:`",
            );
        }
        self.same_paths(&specs);
        specs
    }

    fn key_path(&mut self, raw: &Text, at: Vec<Seg>) -> Option<PathBuf> {
        if raw.as_str().ends_with('/') {
            self.problem(
                at,
                Target::Value,
                format!(
                    "`{}` names a folder: the path must name the key file, e.g. `{}id_key`",
                    raw.as_str(),
                    raw.as_str()
                ),
            );
            return None;
        }
        let p = self.resolve(raw, at.clone(), "path")?;
        if p.file_name().is_none() || p == Path::new("/") {
            self.problem(
                at,
                Target::Value,
                format!(
                    "`{}` does not name a file: write the key file's path",
                    raw.as_str()
                ),
            );
            return None;
        }
        Some(p)
    }

    /// One key's own fields over the defaults.
    fn merge(
        &mut self,
        name: String,
        file: Option<PathBuf>,
        own: Fields,
        defaults: &Fields,
        line: usize,
        key_at: Vec<Seg>,
    ) -> Option<KeySpec> {
        let mode = own.mode.or(defaults.mode).unwrap_or(Some(DEFAULT_MODE));
        let owner = match own.owner.clone().or_else(|| defaults.owner.clone()) {
            None => Some(None),
            Some(Some(p)) => Some(Some(p)),
            Some(None) => None,
        };
        let group = match own.group.clone().or_else(|| defaults.group.clone()) {
            None => Some(None),
            Some(Some(p)) => Some(Some(p)),
            Some(None) => None,
        };
        let recipients = own
            .recipients
            .clone()
            .or_else(|| defaults.recipients.clone())
            .unwrap_or(Some(Vec::new()));
        let from_file = own
            .recipients_file
            .clone()
            .or_else(|| defaults.recipients_file.clone())
            .unwrap_or(Some(Vec::new()));
        let on_change = own
            .on_change
            .clone()
            .or_else(|| defaults.on_change.clone())
            .unwrap_or(Some(Vec::new()));
        let (armor, armor_from_key) = match (&own.armor, &defaults.armor) {
            (Some((a, _)), _) => (*a, *a),
            (None, Some((a, _))) => (*a, false),
            (None, None) => (false, false),
        };
        let (mut recipients, from_file) = (recipients?, from_file?);
        recipients.extend(from_file);
        if armor_from_key && recipients.is_empty() {
            let mut at = key_at;
            at.push(Seg::Key("armor".into()));
            self.problem(
                at,
                Target::Key,
                format!(
                    "key `{name}` has `armor: true` but no recipient: add `age_recipients:` or \
                     `age_recipients_file:`, or remove `armor:`"
                ),
            );
            return None;
        }
        let encryption = (!recipients.is_empty()).then_some(Encryption { recipients, armor });
        Some(KeySpec {
            name,
            path: file?,
            mode: mode?,
            owner: owner?,
            group: group?,
            encryption,
            on_change: on_change?,
            line,
        })
    }

    /// Check the per-key fields of `defaults:` or of one key; `base` is where they live.
    fn fields(&mut self, raw: RawDefaults, base: Vec<Seg>) -> Fields {
        let at = |k: &str| {
            let mut p = base.clone();
            p.push(Seg::Key(k.into()));
            p
        };
        let mode = raw.mode.map(|m| match parse_mode(&m) {
            Ok(mode) => Some(mode),
            Err(why) => {
                self.problem(at("mode"), Target::Value, why);
                None
            }
        });
        let owner = raw
            .owner
            .map(|o| self.principal(&o, at("owner"), Kind::User));
        let group = raw
            .group
            .map(|g| self.principal(&g, at("group"), Kind::Group));
        let recipients = raw.age_recipients.map(|list| {
            let mut out = Vec::new();
            let mut ok = true;
            for (i, text) in list.iter().enumerate() {
                let mut item = at("age_recipients");
                item.push(Seg::Index(i));
                match crate::encrypt::parse_recipient(text.as_str()) {
                    Ok(parsed) => out.push(Recipient {
                        text: text.as_str().trim().to_string(),
                        parsed,
                    }),
                    Err(why) => {
                        self.problem(item, Target::Value, format!("age recipient: {why}"));
                        ok = false;
                    }
                }
            }
            ok.then_some(out)
        });
        let recipients_file = raw
            .age_recipients_file
            .map(|f| self.recipients_file(&f, at("age_recipients_file")));
        let armor = raw.armor.map(|a| (a, at("armor")));
        let on_change = raw.on_change.map(|o| match o {
            RawOnChange::List(argv) if argv.first().is_some_and(|a| a.as_str().is_empty()) => {
                self.problem(
                    at("on_change"),
                    Target::Value,
                    "`on_change:` starts with an empty program name: write the command first, \
                     e.g. [\"systemctl\", \"reload\", \"nginx\"]",
                );
                None
            }
            RawOnChange::List(argv) => Some(argv.into_iter().map(|a| a.0).collect()),
            RawOnChange::Plain(cmd) => {
                let words: Vec<String> = cmd
                    .split_whitespace()
                    .map(|w| format!("\"{}\"", w.escape_debug()))
                    .collect();
                self.problem(
                    at("on_change"),
                    Target::Value,
                    format!(
                        "`on_change:` must be a list (argv, run without a shell): write \
                         `on_change: [{}]`",
                        words.join(", ")
                    ),
                );
                None
            }
        });
        Fields {
            mode,
            owner,
            group,
            recipients,
            recipients_file,
            armor,
            on_change,
        }
    }

    fn principal(&mut self, raw: &Text, at: Vec<Seg>, kind: Kind) -> Option<Principal> {
        let name = raw.as_str();
        let (what, field, create) = match kind {
            Kind::User => ("user", "owner", "useradd"),
            Kind::Group => ("group", "group", "groupadd"),
        };
        if name.is_empty() {
            self.problem(
                at,
                Target::Value,
                format!("`{field}:` is empty: write a {what} name or a numeric id, or remove it"),
            );
            return None;
        }
        if name.bytes().all(|b| b.is_ascii_digit()) {
            return match name.parse::<u32>() {
                Ok(id) if id != u32::MAX => Some(Principal {
                    name: name.to_string(),
                    id,
                }),
                _ => {
                    self.problem(
                        at,
                        Target::Value,
                        format!("{what} id {name} is out of range: write a valid numeric id"),
                    );
                    None
                }
            };
        }
        let found = match kind {
            Kind::User => self.ctx.accounts.user(name),
            Kind::Group => self.ctx.accounts.group(name),
        };
        match found {
            Ok(Some(id)) => Some(Principal {
                name: name.to_string(),
                id,
            }),
            Ok(None) => {
                self.problem(
                    at,
                    Target::Value,
                    format!(
                        "there is no {what} `{}` on this host: create it ({create}) or write a \
                         numeric id",
                        name.escape_debug()
                    ),
                );
                None
            }
            Err(why) => {
                self.problem(
                    at,
                    Target::Value,
                    format!(
                        "cannot look up {what} `{}` ({why}): check /etc/nsswitch.conf, or write \
                         a numeric id",
                        name.escape_debug()
                    ),
                );
                None
            }
        }
    }

    fn recipients_file(&mut self, raw: &Text, at: Vec<Seg>) -> Option<Vec<Recipient>> {
        let file = self.resolve(raw, at.clone(), "age_recipients_file")?;
        if let Some(done) = self.recipients_files.get(&file) {
            return done.clone();
        }
        let result = self.read_recipients(&file, at);
        self.recipients_files.insert(file, result.clone());
        result
    }

    fn read_recipients(&mut self, file: &Path, at: Vec<Seg>) -> Option<Vec<Recipient>> {
        let shown = file.display();
        let text = std::fs::metadata(file).and_then(|m| {
            if m.len() > MAX_RECIPIENTS_FILE {
                Err(std::io::Error::other(format!(
                    "it is {} bytes, more than a recipients file should be",
                    m.len()
                )))
            } else {
                std::fs::read_to_string(file)
            }
        });
        let text = match text {
            Ok(t) => t,
            Err(e) => {
                let hint = match e.kind() {
                    std::io::ErrorKind::NotFound => {
                        "create it (one recipient per line) or fix the path"
                    }
                    std::io::ErrorKind::PermissionDenied => "make it readable by kps-sync",
                    _ => "check that it is a text file with one recipient per line",
                };
                self.problem(
                    at,
                    Target::Value,
                    format!("cannot read age_recipients_file {shown}: {e}; {hint}"),
                );
                return None;
            }
        };
        let mut out = Vec::new();
        let mut ok = true;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            match crate::encrypt::parse_recipient(line) {
                Ok(parsed) => out.push(Recipient {
                    text: line.to_string(),
                    parsed,
                }),
                Err(why) => {
                    self.problem(
                        at.clone(),
                        Target::Value,
                        format!("{shown}:{}: {why}; fix or delete that line", n + 1),
                    );
                    ok = false;
                }
            }
        }
        if ok && out.is_empty() {
            self.problem(
                at,
                Target::Value,
                format!(
                    "age_recipients_file {shown} names no recipient, so the key would be \
                     written unencrypted: add recipients (one per line) or remove the field"
                ),
            );
            return None;
        }
        ok.then_some(out)
    }

    /// Two keys on one file would overwrite each other on every pass.
    fn same_paths(&mut self, specs: &[KeySpec]) {
        let mut by_path: HashMap<&Path, &KeySpec> = HashMap::new();
        let mut ordered: Vec<&KeySpec> = specs.iter().collect();
        ordered.sort_by_key(|s| (s.line, s.name.clone()));
        for spec in ordered {
            if let Some(first) = by_path.get(spec.path.as_path()) {
                let message = format!(
                    "keys `{}` (line {}) and `{}` (line {}) both write {}: give each key its \
                     own path",
                    first.name,
                    first.line,
                    spec.name,
                    spec.line,
                    spec.path.display()
                );
                self.problem(path(&["keys", &spec.name]), Target::Key, message);
            } else {
                by_path.insert(&spec.path, spec);
            }
        }
    }

    // ---- paths ----

    /// A path from the manifest, absolute and normalized: `$CREDENTIALS_DIRECTORY/...`
    /// expanded, relative paths joined to the manifest's folder.
    fn resolve(&mut self, raw: &Text, at: Vec<Seg>, field: &str) -> Option<PathBuf> {
        let text = raw.as_str();
        if text.is_empty() {
            self.problem(
                at,
                Target::Value,
                format!("`{field}:` is empty: write a path"),
            );
            return None;
        }
        if text.contains('\0') {
            self.problem(at, Target::Value, format!("`{field}:` contains a NUL byte"));
            return None;
        }
        let rest = text
            .strip_prefix("$CREDENTIALS_DIRECTORY/")
            .or_else(|| text.strip_prefix("${CREDENTIALS_DIRECTORY}/"));
        let joined = if let Some(rest) = rest {
            match (self.ctx.env)("CREDENTIALS_DIRECTORY").filter(|v| !v.is_empty()) {
                Some(dir) => PathBuf::from(dir).join(rest),
                None => {
                    self.problem(
                        at,
                        Target::Value,
                        format!(
                            "`{field}: {text}` needs $CREDENTIALS_DIRECTORY, which is not set: \
                             systemd sets it for a service with `LoadCredential=`; run under \
                             such a unit, or write the file's real path"
                        ),
                    );
                    return None;
                }
            }
        } else if text.starts_with('$') || text.starts_with('~') {
            self.problem(
                at,
                Target::Value,
                format!(
                    "`{field}: {text}`: only `$CREDENTIALS_DIRECTORY/...` is expanded; write an \
                     absolute path, or one relative to the manifest's folder"
                ),
            );
            return None;
        } else {
            PathBuf::from(text)
        };
        // `join` keeps an absolute path as it is.
        Some(normalize(&self.dir.join(joined)))
    }
}

#[derive(Clone, Copy)]
enum Kind {
    User,
    Group,
}

fn has_recipients(f: &Fields) -> bool {
    matches!(&f.recipients, Some(Some(r)) if !r.is_empty())
        || matches!(&f.recipients_file, Some(Some(r)) if !r.is_empty())
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

/// The location of `at`, or of the nearest enclosing entry that exists (a missing field is
/// reported at its parent).
fn locate_or_parent(text: &str, at: &[Seg], target: Target) -> Option<Location> {
    if let Some(l) = locate(text, at, target) {
        return Some(l);
    }
    let mut at = at.to_vec();
    while !at.is_empty() {
        at.pop();
        if let Some(l) = locate(text, &at, Target::Key) {
            return Some(l);
        }
    }
    Some(Location { line: 1, column: 1 })
}

/// `.` and `..` removed lexically, so that two spellings of one path compare equal.
pub(super) fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// KPS key pair names: `[A-Za-z0-9_-]{1,255}`.
pub(super) fn valid_name(name: &str) -> bool {
    (1..=255).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn valid_region(region: &str) -> bool {
    !region.is_empty()
        && region.len() <= 64
        && region
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// The mode, or why it is refused and what to write instead.
pub(super) fn parse_mode(raw: &RawMode) -> Result<u32, String> {
    const HINT: &str = "use \"0600\" (owner only) or \"0640\" (owner, plus read for the group)";
    let text = match raw {
        RawMode::Number(n) => {
            return Err(format!(
                "`mode: {n}` is a YAML number, which YAML readers disagree about (octal or \
                 decimal): write the mode quoted, e.g. `mode: \"0600\"`"
            ));
        }
        RawMode::Text(t) => t.trim(),
    };
    if text.is_empty() || text.len() > 4 || !text.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
        return Err(format!(
            "`{}` is not an octal file mode: {HINT}",
            text.escape_debug()
        ));
    }
    let mode = u32::from_str_radix(text, 8).map_err(|e| e.to_string())?;
    let mut wrong = Vec::new();
    if mode & 0o7000 != 0 {
        wrong.push("sets setuid, setgid or sticky");
    }
    if mode & 0o111 != 0 {
        wrong.push("makes it executable");
    }
    if mode & 0o007 != 0 {
        wrong.push("gives access to other users");
    }
    if mode & 0o020 != 0 {
        wrong.push("lets the group write");
    }
    if mode & 0o400 == 0 {
        wrong.push("does not let the owner read it");
    }
    if wrong.is_empty() {
        Ok(mode)
    } else {
        Err(format!(
            "mode {text} {} a private key file: {HINT}",
            join_reasons(&wrong)
        ))
    }
}

fn join_reasons(reasons: &[&str]) -> String {
    match reasons {
        [] => String::new(),
        [one] => format!("{one} on"),
        [init @ .., last] => format!("{} and {last} on", init.join(", ")),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum HttpRule {
    /// `http://` only to this host itself (tests, a local proxy); https elsewhere.
    LoopbackOnly,
    /// `http://` anywhere (the ECS metadata service speaks plain http on a link-local address).
    Any,
}

/// A base URL: `https://host[:port][/path]`, returned without trailing `/`.
pub(super) fn check_url(text: &str, http: HttpRule) -> Result<String, String> {
    let shown = text.escape_debug();
    let bad = |why: &str| Err(format!("`{shown}` is not a usable endpoint: {why}"));
    let (is_http, rest) = if let Some(rest) = text.strip_prefix("https://") {
        (false, rest)
    } else if let Some(rest) = text.strip_prefix("http://") {
        (true, rest)
    } else {
        return bad("write an https:// URL, e.g. `https://kms.cn-north-4.myhuaweicloud.com`");
    };
    if text
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '?' | '#' | '@' | '\\'))
    {
        return bad("write a plain base URL, without spaces, `?query`, `#fragment` or `user@`");
    }
    let authority = rest.split('/').next().unwrap_or("");
    let host = if let Some(v6) = authority.strip_prefix('[') {
        let Some(end) = v6.find(']') else {
            return bad("unclosed `[` in the host");
        };
        let port = &v6[end + 1..];
        if !port.is_empty() && !valid_port(port.strip_prefix(':').unwrap_or("x")) {
            return bad("the port must be a number from 1 to 65535");
        }
        &authority[..end + 2]
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => {
                if !valid_port(port) {
                    return bad("the port must be a number from 1 to 65535");
                }
                host
            }
            None => authority,
        }
    };
    if host.is_empty()
        || !host.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'[' | b']' | b':')
        })
    {
        return bad("the host name is missing or has characters a host cannot have");
    }
    if is_http && http == HttpRule::LoopbackOnly && !is_loopback(host) {
        return bad(
            "plain http:// is allowed only to this host (localhost, 127.0.0.1, [::1]); use https://",
        );
    }
    Ok(text.trim_end_matches('/').to_string())
}

fn valid_port(port: &str) -> bool {
    !port.is_empty()
        && port.len() <= 5
        && port.bytes().all(|b| b.is_ascii_digit())
        && port.parse::<u32>().is_ok_and(|p| (1..=65535).contains(&p))
}

fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host == "[::1]"
        || host.parse::<Ipv4Addr>().is_ok_and(|ip| ip.is_loopback())
}
