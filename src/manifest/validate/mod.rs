//! Raw manifest -> validated [`Manifest`]: paths resolved, owners looked up, recipients parsed,
//! every rule checked. All rule violations are collected, each with the path of the YAML node
//! it is about; locations are looked up only at the end, once per problem.
//!
//! Invariant: a `Manifest` comes out only when no problem was found.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustc_hash::FxHashMap;

use super::error::{Location, Problem};
use super::locate::{Seg, Target, locate, path, scan_key_lines};
use super::raw::{
    Present, RawAuth, RawDefaults, RawEcs, RawIam, RawKey, RawKps, RawManifest, RawMode,
    RawOnChange, RawPublicKey, RawSettings, Text,
};
use super::regions;
use super::rules::{
    HttpRule, check_url, is_normal, normal_starts_with, normalize, parse_mode, valid_name,
    valid_region,
};
use crate::trust::Input;

use super::{
    AuthConfig, Encryption, KeySpec, KpsConfig, Manifest, ParsedRecipient, Principal, Recipient,
    Settings, WatchMode, duration,
};

mod kps;
mod settings;

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

/// Each distinct name asked once: a manifest of thousands of keys with the same `owner:` costs
/// one lookup (NSS may read `/etc/passwd` or ask a directory server every time).
struct AskedOnce<'a> {
    inner: &'a dyn Accounts,
    users: RefCell<HashMap<String, Result<Option<u32>, String>>>,
    groups: RefCell<HashMap<String, Result<Option<u32>, String>>>,
}

impl AskedOnce<'_> {
    fn ask(
        seen: &RefCell<HashMap<String, Result<Option<u32>, String>>>,
        name: &str,
        lookup: impl FnOnce(&str) -> Result<Option<u32>, String>,
    ) -> Result<Option<u32>, String> {
        if let Some(found) = seen.borrow().get(name) {
            return found.clone();
        }
        let found = lookup(name);
        seen.borrow_mut().insert(name.to_owned(), found.clone());
        found
    }
}

impl Accounts for AskedOnce<'_> {
    fn user(&self, name: &str) -> Result<Option<u32>, String> {
        Self::ask(&self.users, name, |n| self.inner.user(n))
    }
    fn group(&self, name: &str) -> Result<Option<u32>, String> {
        Self::ask(&self.groups, name, |n| self.inner.group(n))
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
const DEFAULT_ROTATION_CHECK: Duration = Duration::from_secs(3600);
const DEFAULT_MODE: u32 = 0o600;
/// Recipients files are a few lines; refuse to slurp something else by mistake.
const MAX_RECIPIENTS_FILE: u64 = 1 << 20;

pub(super) fn validate(
    raw: RawManifest,
    text: &str,
    ctx: &Context<'_>,
) -> Result<Manifest, Vec<Problem>> {
    let accounts = AskedOnce {
        inner: ctx.accounts,
        users: RefCell::default(),
        groups: RefCell::default(),
    };
    let ctx = &Context {
        accounts: &accounts,
        ..*ctx
    };
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
        unquoted_mode_possible: unquoted_mode_possible(text),
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
    if let Some(settings) = &settings {
        c.reserved_paths(&keys, &settings.state_dir, ctx.manifest);
    }
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
    /// Whether some `mode:` is followed by a bare digit; only then is each mode's quoting
    /// checked, since that takes a parse per mode.
    unquoted_mode_possible: bool,
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
    armor: Option<bool>,
    on_change: Option<Option<Vec<String>>>,
    public_key: Option<Option<PublicKeyChoice>>,
}

/// Where the public half goes, as checked.
#[derive(Clone)]
enum PublicKeyChoice {
    Off,
    /// `PATH.pub`
    Beside,
    Path(PathBuf),
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
}

impl Checker<'_> {
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
                .get(name.as_str())
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
        // Each field: the key's, else the default's, else the built-in; `None` when the chosen
        // value was invalid (already reported).
        let mode = own.mode.or(defaults.mode).unwrap_or(Some(DEFAULT_MODE));
        let owner = own
            .owner
            .or_else(|| defaults.owner.clone())
            .map_or(Some(None), |p| p.map(Some));
        let group = own
            .group
            .or_else(|| defaults.group.clone())
            .map_or(Some(None), |p| p.map(Some));
        let recipients = own
            .recipients
            .or_else(|| defaults.recipients.clone())
            .unwrap_or(Some(Vec::new()));
        let from_file = own
            .recipients_file
            .or_else(|| defaults.recipients_file.clone())
            .unwrap_or(Some(Vec::new()));
        let on_change = own
            .on_change
            .or_else(|| defaults.on_change.clone())
            .unwrap_or(Some(Vec::new()));
        let public_key = own
            .public_key
            .or_else(|| defaults.public_key.clone())
            .unwrap_or(Some(PublicKeyChoice::Off));
        // `armor: true` in defaults applies only where there are recipients (see module docs).
        let (armor, armor_from_key) = match (own.armor, defaults.armor) {
            (Some(a), _) => (a, a),
            (None, Some(a)) => (a, false),
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
        let file = file?;
        let public_key = match public_key? {
            PublicKeyChoice::Off => None,
            PublicKeyChoice::Beside => {
                let mut p = file.clone().into_os_string();
                p.push(".pub");
                Some(PathBuf::from(p))
            }
            PublicKeyChoice::Path(p) => Some(p),
        };
        Some(KeySpec {
            name,
            path: file,
            public_key,
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
        let in_defaults = matches!(&base[..], [Seg::Key(k)] if k == "defaults");
        Fields {
            mode: raw.mode.map(|m| self.mode(&m, at("mode"))),
            owner: raw
                .owner
                .map(|o| self.principal(&o, at("owner"), Kind::User)),
            group: raw
                .group
                .map(|g| self.principal(&g, at("group"), Kind::Group)),
            recipients: raw
                .age_recipients
                .map(|list| self.recipients(&list, &at("age_recipients"))),
            recipients_file: raw
                .age_recipients_file
                .map(|f| self.recipients_file(&f, at("age_recipients_file"))),
            armor: raw.armor,
            on_change: raw.on_change.map(|o| self.on_change(o, at("on_change"))),
            public_key: raw
                .public_key
                .map(|p| self.public_key(p, at("public_key"), in_defaults)),
        }
    }

    fn mode(&mut self, m: &RawMode, at: Vec<Seg>) -> Option<u32> {
        if let RawMode::Text(t) = m
            && self.unquoted_mode_possible
            && is_plain_scalar(self.text, &at)
        {
            self.problem(
                at,
                Target::Value,
                format!(
                    "`mode: {t}` is unquoted: YAML 1.1 readers take it as an octal or a \
                     decimal number; write it quoted: `mode: \"{t}\"`"
                ),
            );
            return None;
        }
        match parse_mode(m) {
            Ok(mode) => Some(mode),
            Err(why) => {
                self.problem(at, Target::Value, why);
                None
            }
        }
    }

    /// `age_recipients:`, each checked; `None` if any is wrong.
    fn recipients(&mut self, list: &[Text], at: &[Seg]) -> Option<Vec<Recipient>> {
        let mut out = Vec::new();
        let mut ok = true;
        for (i, text) in list.iter().enumerate() {
            let mut item = at.to_vec();
            item.push(Seg::Index(i));
            match ParsedRecipient::parse(text.as_str()) {
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
    }

    fn on_change(&mut self, raw: RawOnChange, at: Vec<Seg>) -> Option<Vec<String>> {
        match raw {
            RawOnChange::List(argv) if argv.first().is_some_and(|a| a.as_str().is_empty()) => {
                self.problem(
                    at,
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
                    at,
                    Target::Value,
                    format!(
                        "`on_change:` must be a list (argv, run without a shell): write \
                         `on_change: [{}]`",
                        words.join(", ")
                    ),
                );
                None
            }
        }
    }

    fn public_key(
        &mut self,
        raw: RawPublicKey,
        at: Vec<Seg>,
        in_defaults: bool,
    ) -> Option<PublicKeyChoice> {
        match raw {
            RawPublicKey::Flag(false) => Some(PublicKeyChoice::Off),
            RawPublicKey::Flag(true) => Some(PublicKeyChoice::Beside),
            RawPublicKey::Path(_) if in_defaults => {
                self.problem(
                    at,
                    Target::Value,
                    "a path in `defaults.public_key` would give every key the same public key \
                     file: write `public_key: true` (each key's PATH.pub), or give paths per key",
                );
                None
            }
            RawPublicKey::Path(p) => self
                .resolve(&p, at, "public_key")
                .map(PublicKeyChoice::Path),
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
        // Only a regular file: reading a FIFO or a terminal blocks the load forever, and a
        // device may never end (found while writing the loader's fuzz target).
        let text = std::fs::metadata(file).and_then(|m| {
            if !m.is_file() {
                Err(std::io::Error::other(
                    "it is not a regular file (a device, FIFO or socket)",
                ))
            } else if m.len() > MAX_RECIPIENTS_FILE {
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
            match ParsedRecipient::parse(line) {
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

    /// A key written into the state folder or over the manifest would destroy what kps-sync
    /// itself needs.
    fn reserved_paths(&mut self, specs: &[KeySpec], state_dir: &Path, manifest: &Path) {
        for spec in specs {
            let public = spec.public_key.as_deref();
            // Every path here is normal (see `resolve`).
            let what = if normal_starts_with(&spec.path, state_dir)
                || public.is_some_and(|p| normal_starts_with(p, state_dir))
            {
                format!("inside state_dir {}", state_dir.display())
            } else if spec.path == manifest || public == Some(manifest) {
                "the manifest itself".to_owned()
            } else {
                continue;
            };
            let message = format!(
                "key `{}` would write {}, which is {what}: choose a path outside kps-sync's own \
                 files",
                spec.name,
                spec.path.display()
            );
            self.problem(path(&["keys", &spec.name]), Target::Key, message);
        }
    }

    /// Two keys on one file would overwrite each other on every pass; so would a public key
    /// file on a key's path or on another public key file.
    fn same_paths(&mut self, specs: &[KeySpec]) {
        let mut by_path: FxHashMap<&Path, &KeySpec> =
            FxHashMap::with_capacity_and_hasher(specs.len() * 2, Default::default());
        let mut ordered: Vec<&KeySpec> = specs.iter().collect();
        ordered.sort_by_key(|s| (s.line, s.name.clone()));
        for spec in &ordered {
            by_path.entry(spec.path.as_path()).or_insert(spec);
        }
        for spec in &ordered {
            let Some(public) = &spec.public_key else {
                continue;
            };
            if let Some(other) = by_path.get(public.as_path()) {
                let message = format!(
                    "key `{}` writes its public key to {}, which is {}: give it another \
                     `public_key:` path",
                    spec.name,
                    public.display(),
                    if other.name == spec.name && other.path == *public {
                        "its own key file".to_owned()
                    } else if other.public_key.as_deref() == Some(public.as_path()) {
                        format!("key `{}`'s public key file too", other.name)
                    } else {
                        format!("key `{}`'s file", other.name)
                    }
                );
                self.problem(path(&["keys", &spec.name]), Target::Key, message);
            } else {
                by_path.insert(public, spec);
            }
        }
        let mut by_path: FxHashMap<&Path, &KeySpec> =
            FxHashMap::with_capacity_and_hasher(specs.len(), Default::default());
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
        // `join` keeps an absolute path as it is; `dir` is normal already.
        let resolved = if rest.is_none() && is_normal(text) {
            self.dir.join(joined)
        } else {
            normalize(&self.dir.join(joined))
        };
        let input = match field {
            "state_dir" => Some(Input::StateDir),
            "ca_file" => Some(Input::CaFile),
            "age_recipients_file" => Some(Input::RecipientsFile),
            "token_file"
            | "access_key_file"
            | "secret_key_file"
            | "security_token_file"
            | "password_file" => Some(Input::Credential),
            _ => None,
        };
        match input {
            Some(input) if !self.trusted(&resolved, input, Some(at)) => None,
            _ => Some(resolved),
        }
    }

    /// Strict modes (see `trust`) for an input the manifest names; a problem per finding.
    fn trusted(&mut self, file: &Path, input: Input, at: Option<Vec<Seg>>) -> bool {
        let Err(found) = crate::trust::check(file, input) else {
            return true;
        };
        for finding in found.findings {
            match &at {
                Some(at) => self.problem(at.clone(), Target::Value, finding.to_string()),
                None => self.at_start(finding.to_string()),
            }
        }
        false
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

/// A cheap over-approximation: a `mode:` followed by a digit anywhere in the text.
fn unquoted_mode_possible(text: &str) -> bool {
    text.match_indices("mode:").any(|(i, m)| {
        text[i + m.len()..]
            .trim_start_matches([' ', '\t'])
            .starts_with(|c: char| c.is_ascii_digit())
    })
}

/// Whether the scalar at `at` is written without quotes (serde cannot tell: YAML 1.2 reads a
/// bare `0600` as the string "0600").
fn is_plain_scalar(text: &str, at: &[Seg]) -> bool {
    locate(text, at, Target::Value)
        .and_then(|l| text.lines().nth(l.line - 1)?.chars().nth(l.column - 1))
        .is_some_and(|c| c != '"' && c != '\'')
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
