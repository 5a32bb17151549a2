//! Where credentials come from, read and checked without any network: the Huawei SDK's
//! environment variables and credentials file, and the one-secret files the manifest names.
//!
//! The SDK's sources are read the way `huaweicloudsdkcore` 3.1.219 reads them
//! (`auth/provider.py`: `os.getenv`, Python's `configparser` with its defaults), so a host that
//! already works with the SDK or KooCLI needs no new setup and a file the SDK would refuse is
//! refused here too.
//!
//! Invariants: secret values go straight into [`SecretString`]; no error, warning or `Debug`
//! output carries a value read from the environment or a file, only the variable's or file's
//! name, the line number and what to do.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use crate::secret::SecretString;

pub const ENV_AK: &str = "HUAWEICLOUD_SDK_AK";
pub const ENV_SK: &str = "HUAWEICLOUD_SDK_SK";
pub const ENV_SECURITY_TOKEN: &str = "HUAWEICLOUD_SDK_SECURITY_TOKEN";
pub const ENV_CREDENTIALS_FILE: &str = "HUAWEICLOUD_SDK_CREDENTIALS_FILE";

/// The credentials file section the SDK reads for regional services such as KPS.
const SECTION: &str = "basic";
/// configparser's default section: its keys are inherited by every other section.
const DEFAULT_SECTION: &str = "DEFAULT";
/// A one-secret file larger than this is not a secret file (IAM tokens are a few KiB).
const SECRET_FILE_LIMIT: u64 = 64 * 1024;

/// AK/SK as found.
#[derive(Debug, Clone)]
pub struct AkSk {
    /// Access key id; not a secret (it is sent in the clear) but still never logged needlessly.
    pub ak: String,
    pub sk: SecretString,
    /// Present for temporary credentials; sent as `X-Security-Token`.
    pub security_token: Option<SecretString>,
    /// Where they came from, for logs and errors: `env HUAWEICLOUD_SDK_AK`,
    /// `file /root/.huaweicloud/credentials [basic]`.
    pub origin: String,
}

/// A credential source that exists but cannot be used. Each message names the variable, file
/// or line and says what to do; none carries a value.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{set} is set but {missing} is not: set both, or unset {set}")]
    EnvIncomplete {
        set: &'static str,
        missing: &'static str,
    },
    #[error(
        "{ENV_SECURITY_TOKEN} is set without {ENV_AK} and {ENV_SK}: a security token only works \
         with the temporary AK/SK issued with it; set all three, or unset it"
    )]
    EnvTokenWithoutKeys,
    #[error("cannot read {}: {source}; check the path and that kps-sync may read it", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error(
        "{}, line {line}: {problem}; the Huawei Cloud SDK would refuse this file too",
        path.display()
    )]
    Syntax {
        path: PathBuf,
        line: usize,
        problem: &'static str,
    },
    #[error("{}, line {line}: `{key}` {problem}", path.display())]
    Value {
        path: PathBuf,
        line: usize,
        key: &'static str,
        problem: &'static str,
    },
    #[error(
        "{} [basic] has `{present}` but no `{missing}`: add `{missing} = ...`, or remove `{present}`",
        path.display()
    )]
    FileIncomplete {
        path: PathBuf,
        present: &'static str,
        missing: &'static str,
    },
    #[error(
        "{} [basic] uses idp_id/id_token_file (federated identity), which kps-sync does not \
         support: add `ak` and `sk`, or name an auth method in the manifest",
        path.display()
    )]
    FileFederated { path: PathBuf },
    #[error("{} is empty: write the secret into it (a trailing newline is fine)", path.display())]
    SecretFileEmpty { path: PathBuf },
    #[error("{} is not UTF-8 text: write the secret as plain text", path.display())]
    SecretFileNotText { path: PathBuf },
    #[error(
        "{} holds more than one line: put only the secret in it, on one line",
        path.display()
    )]
    SecretFileLines { path: PathBuf },
    #[error(
        "{} is larger than {SECRET_FILE_LIMIT} bytes, too large for a secret: check the path",
        path.display()
    )]
    SecretFileTooLarge { path: PathBuf },
}

/// AK/SK from `HUAWEICLOUD_SDK_AK`, `_SK` and `_SECURITY_TOKEN`. `None` when neither AK nor SK
/// is set; an error when only one of them is, or when only the token is. As in the SDK, an
/// empty variable counts as unset; surrounding whitespace is dropped (it is never part of a key).
pub fn aksk_from_env(env: &dyn Fn(&str) -> Option<String>) -> Option<Result<AkSk, SourceError>> {
    let get = |name: &str| {
        env(name)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    };
    let ak = get(ENV_AK);
    let sk = get(ENV_SK).map(SecretString::new);
    let security_token = get(ENV_SECURITY_TOKEN).map(SecretString::new);
    match (ak, sk) {
        (Some(ak), Some(sk)) => Some(Ok(AkSk {
            ak,
            sk,
            security_token,
            origin: format!("env {ENV_AK}"),
        })),
        (Some(_), None) => Some(Err(SourceError::EnvIncomplete {
            set: ENV_AK,
            missing: ENV_SK,
        })),
        (None, Some(_)) => Some(Err(SourceError::EnvIncomplete {
            set: ENV_SK,
            missing: ENV_AK,
        })),
        (None, None) if security_token.is_some() => Some(Err(SourceError::EnvTokenWithoutKeys)),
        (None, None) => None,
    }
}

/// The SDK credentials file: `HUAWEICLOUD_SDK_CREDENTIALS_FILE` when set and not empty (taken
/// as is, like the SDK: no `~` expansion), else `$HOME/.huaweicloud/credentials`; `None` when
/// neither is set.
pub fn credentials_file_path(env: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
    if let Some(path) = env(ENV_CREDENTIALS_FILE).filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(path));
    }
    let home = env("HOME").filter(|h| !h.is_empty())?;
    Some(Path::new(&home).join(".huaweicloud").join("credentials"))
}

/// AK/SK from the text of an SDK credentials file (`path` only names it in errors and
/// `origin`). Parsed as Python's `configparser` does by default: `[basic]` exactly (case
/// matters), key names in any case, `=` or `:`, full-line `#`/`;` comments (a `#` after a value
/// is part of it), `[DEFAULT]` keys inherited, `%%` for `%`.
///
/// `Ok(None)` when the file holds no AK/SK for kps-sync: no `[basic]` section, or one with
/// neither `ak` nor `sk` (only `project_id`, say); the next source, or the "no credentials"
/// report, takes over. An error when the file is malformed, has only one of `ak`/`sk`, uses
/// federated identity (`idp_id`), or a value we read spans lines or uses `%(name)s`
/// interpolation (not supported: write the value out). `project_id` is not read here.
pub fn parse_credentials_file(text: &str, path: &Path) -> Result<Option<AkSk>, SourceError> {
    let sections = parse_ini(text, path)?;
    let Some(basic) = sections.get(SECTION) else {
        return Ok(None);
    };
    // Keys of [DEFAULT] apply unless [basic] sets them, as configparser's items() does.
    let lookup = |key: &'static str| -> Result<Option<String>, SourceError> {
        let Some(entry) = basic
            .get(key)
            .or_else(|| sections.get(DEFAULT_SECTION).and_then(|d| d.get(key)))
        else {
            return Ok(None);
        };
        let value = entry.value(path, key)?;
        Ok(Some(value).filter(|v| !v.is_empty()))
    };

    let ak = lookup("ak")?;
    let sk = lookup("sk")?.map(SecretString::new);
    match (ak, sk) {
        (Some(ak), Some(sk)) => Ok(Some(AkSk {
            ak,
            sk,
            security_token: lookup("security_token")?.map(SecretString::new),
            origin: format!("file {} [{SECTION}]", path.display()),
        })),
        (Some(_), None) => Err(SourceError::FileIncomplete {
            path: path.to_owned(),
            present: "ak",
            missing: "sk",
        }),
        (None, Some(_)) => Err(SourceError::FileIncomplete {
            path: path.to_owned(),
            present: "sk",
            missing: "ak",
        }),
        (None, None) => {
            if lookup("idp_id")?.is_some() && lookup("id_token_file")?.is_some() {
                Err(SourceError::FileFederated {
                    path: path.to_owned(),
                })
            } else {
                Ok(None)
            }
        }
    }
}

/// [`parse_credentials_file`] on the file at `path`, read into a zeroizing buffer. A file that
/// is not UTF-8 is refused as the SDK refuses it.
pub fn read_credentials_file(path: &Path) -> Result<Option<AkSk>, SourceError> {
    let bytes = read_small_file(path)?;
    let text = std::str::from_utf8(&bytes).map_err(|_| SourceError::SecretFileNotText {
        path: path.to_owned(),
    })?;
    parse_credentials_file(text, path)
}

/// One secret from a file of its own (token, SK, password). Trailing whitespace, such as the
/// newline editors and `echo` add, is dropped; an empty file, a non-UTF-8 one, one with more than
/// one line or larger than 64 KiB is an error naming the path. Symlinks are followed, since
/// Kubernetes mounts secrets through them. The bytes live only in zeroizing buffers.
pub fn read_secret_file(path: &Path) -> Result<SecretString, SourceError> {
    let bytes = read_small_file(path)?;
    let Ok(text) = std::str::from_utf8(&bytes) else {
        return Err(SourceError::SecretFileNotText {
            path: path.to_owned(),
        });
    };
    let text = text.trim_end();
    if text.is_empty() {
        return Err(SourceError::SecretFileEmpty {
            path: path.to_owned(),
        });
    }
    if text.contains(['\n', '\r']) {
        return Err(SourceError::SecretFileLines {
            path: path.to_owned(),
        });
    }
    Ok(SecretString::new(text.to_owned()))
}

/// The bytes of a file of at most [`SECRET_FILE_LIMIT`] bytes, in a zeroizing buffer sized from
/// the file's length up front, so that growing it leaves no stale copy in freed memory.
fn read_small_file(path: &Path) -> Result<Zeroizing<Vec<u8>>, SourceError> {
    let read_error = |source| SourceError::Read {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(read_error)?;
    let len = file
        .metadata()
        .map_err(read_error)?
        .len()
        .min(SECRET_FILE_LIMIT);
    // Room for one byte past the limit, which tells "too large" from "exactly at the limit",
    // and for a file that grew a little since `metadata`.
    let mut bytes = Zeroizing::new(Vec::with_capacity(len as usize + 4096));
    file.take(SECRET_FILE_LIMIT + 1)
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    if bytes.len() as u64 > SECRET_FILE_LIMIT {
        return Err(SourceError::SecretFileTooLarge {
            path: path.to_owned(),
        });
    }
    Ok(bytes)
}

/// Warnings (empty when all is well) for a secret file others on the host could read or
/// replace: any permission bit for group or other. Each says what to run. Follows symlinks:
/// the file that holds the secret is what matters.
pub fn check_file_permissions(path: &Path) -> Result<Vec<String>, SourceError> {
    let metadata = std::fs::metadata(path).map_err(|source| SourceError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mode = metadata.permissions().mode() & 0o7777;
    let mut problems = Vec::new();
    for (mask, problem) in [
        (0o040, "readable by its group"),
        (0o004, "readable by every user"),
        (0o020, "writable by its group"),
        (0o002, "writable by every user"),
    ] {
        if mode & mask != 0 {
            problems.push(problem);
        }
    }
    if problems.is_empty() && mode & 0o011 == 0 {
        return Ok(Vec::new());
    }
    if problems.is_empty() {
        problems.push("executable by others");
    }
    Ok(vec![format!(
        "{} holds a credential and is {} (mode {mode:04o}): run `chmod 0600 {}`",
        path.display(),
        problems.join(", "),
        path.display()
    )])
}

/// One `key = value` as configparser keeps it until `items()` joins and interpolates it.
#[derive(Default)]
struct Entry {
    /// The line of `key = value`, for errors.
    line: usize,
    /// The first line's value, then one element per continuation (or blank) line.
    parts: Vec<String>,
}

impl Entry {
    /// The value as configparser's `items()` yields it, or an error when it spans lines or
    /// interpolates: never a shape an AK, SK or token takes.
    fn value(&self, path: &Path, key: &'static str) -> Result<String, SourceError> {
        let joined = self.parts.join("\n");
        let joined = joined.trim_end();
        let err = |problem| SourceError::Value {
            path: path.to_owned(),
            line: self.line,
            key,
            problem,
        };
        if joined.contains('\n') {
            return Err(err(
                "continues on an indented line below; write the whole value on its line",
            ));
        }
        let mut out = String::with_capacity(joined.len());
        let mut chars = joined.chars();
        while let Some(c) = chars.next() {
            if c != '%' {
                out.push(c);
                continue;
            }
            match chars.next() {
                Some('%') => out.push('%'),
                Some('(') => {
                    return Err(err(
                        "uses %(name)s interpolation, which kps-sync does not support; write \
                         the value out",
                    ));
                }
                _ => {
                    return Err(err(
                        "has a lone '%' (configparser needs '%%' for '%'); the Huawei Cloud SDK \
                         would refuse it too",
                    ));
                }
            }
        }
        Ok(out)
    }
}

type Sections = HashMap<String, HashMap<String, Entry>>;

/// Python's `ConfigParser().read_string()` with default settings, reduced to what decides
/// which keys exist and what their raw values are. Every line it would reject is rejected.
fn parse_ini(text: &str, path: &Path) -> Result<Sections, SourceError> {
    // Python's utf-8 codec keeps a BOM and then fails on it; dropping it is the one leniency.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut ini = Ini::default();
    for (index, raw) in text.lines().enumerate() {
        ini.line(index + 1, raw)
            .map_err(|problem| SourceError::Syntax {
                path: path.to_owned(),
                line: index + 1,
                problem,
            })?;
    }
    Ok(ini.sections)
}

/// The reader's state between lines.
#[derive(Default)]
struct Ini {
    sections: Sections,
    current: Option<String>,
    /// The key the next more-indented line continues, if any.
    open_key: Option<String>,
    indent_level: usize,
}

impl Ini {
    fn line(&mut self, line_no: usize, raw: &str) -> Result<(), &'static str> {
        let value = raw.trim();
        let is_comment = value.starts_with('#') || value.starts_with(';');
        if value.is_empty() || is_comment {
            // configparser keeps blank lines (not comments) inside a multi-line value.
            if !is_comment && let Some(entry) = self.open_entry() {
                entry.parts.push(String::new());
            }
            return Ok(());
        }
        let indent = raw.chars().take_while(|c| c.is_whitespace()).count();
        if indent > self.indent_level
            && let Some(entry) = self.open_entry()
        {
            entry.parts.push(value.to_owned());
            return Ok(());
        }
        self.indent_level = indent;
        if let Some(header) = section_header(value) {
            if self.sections.contains_key(header) {
                return Err("a section appears twice; merge the two into one");
            }
            self.sections.insert(header.to_owned(), HashMap::new());
            self.current = Some(header.to_owned());
            self.open_key = None;
            return Ok(());
        }
        self.entry(line_no, value)
    }

    /// The entry a continuation line would extend.
    fn open_entry(&mut self) -> Option<&mut Entry> {
        let (section, key) = (self.current.as_ref()?, self.open_key.as_ref()?);
        self.sections.get_mut(section)?.get_mut(key)
    }

    /// `key = value` or `key: value` in the current section.
    fn entry(&mut self, line_no: usize, value: &str) -> Result<(), &'static str> {
        let Some(section) = &self.current else {
            return Err("a line before any [section] header; put the keys under [basic]");
        };
        let Some(delimiter) = value.find(['=', ':']) else {
            return Err("a line that is neither `key = value`, a [section] nor a comment");
        };
        let key = value[..delimiter].trim_end().to_lowercase();
        if key.is_empty() {
            return Err("a line with a value but no key");
        }
        let keys = self.sections.entry(section.clone()).or_default();
        if keys.contains_key(&key) {
            return Err("a key set twice in one section (names ignore case); keep one");
        }
        keys.insert(
            key.clone(),
            Entry {
                line: line_no,
                parts: vec![value[delimiter + 1..].trim().to_owned()],
            },
        );
        self.open_key = Some(key);
        Ok(())
    }
}

/// configparser's `\[(?P<header>.+)\]` matched at the start of a stripped line: the text up to
/// the last `]`, at least one character, kept as is (case and spaces included).
fn section_header(line: &str) -> Option<&str> {
    let rest = line.strip_prefix('[')?;
    let end = rest.rfind(']')?;
    (end > 0).then(|| &rest[..end])
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::HashMap;

    const AK: &str = "AKTESTEXAMPLE0000000";
    const SK: &str = "SKtestexample0000000000000000000000000000";

    /// An environment of exactly these variables, for the `env` parameters.
    pub(crate) fn env_of(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| map.get(name).cloned()
    }

    fn path() -> PathBuf {
        PathBuf::from("/root/.huaweicloud/credentials")
    }

    fn parse(text: &str) -> Result<Option<AkSk>, SourceError> {
        parse_credentials_file(text, &path())
    }

    /// Asserts that neither the error nor its Debug form carries `secret`.
    fn assert_hides(err: &SourceError, secret: &str) {
        let shown = format!("{err} {err:?}");
        assert!(!shown.contains(secret), "{shown}");
    }

    // Environment.

    #[test]
    fn env_with_ak_sk_and_token() {
        let env = env_of(&[
            (ENV_AK, AK),
            (ENV_SK, SK),
            (ENV_SECURITY_TOKEN, "token-value"),
        ]);
        let found = aksk_from_env(&env).unwrap().unwrap();
        assert_eq!(found.ak, AK);
        assert_eq!(found.sk.expose(), SK);
        assert_eq!(found.security_token.unwrap().expose(), "token-value");
        assert_eq!(found.origin, "env HUAWEICLOUD_SDK_AK");
    }

    #[test]
    fn env_without_keys_is_no_source_and_empty_counts_as_unset() {
        assert!(aksk_from_env(&env_of(&[])).is_none());
        assert!(aksk_from_env(&env_of(&[(ENV_AK, ""), (ENV_SK, " ")])).is_none());
        let found = aksk_from_env(&env_of(&[(ENV_AK, AK), (ENV_SK, SK)]))
            .unwrap()
            .unwrap();
        assert!(found.security_token.is_none());
    }

    #[test]
    fn env_ak_without_sk_names_the_missing_variable() {
        let err = aksk_from_env(&env_of(&[(ENV_AK, AK)]))
            .unwrap()
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("HUAWEICLOUD_SDK_SK is not"), "{msg}");
        assert_hides(&err, AK);
        let err = aksk_from_env(&env_of(&[(ENV_SK, SK)]))
            .unwrap()
            .unwrap_err();
        assert!(
            err.to_string().contains("HUAWEICLOUD_SDK_AK is not"),
            "{err}"
        );
        assert_hides(&err, SK);
    }

    #[test]
    fn env_token_alone_is_an_error() {
        let err = aksk_from_env(&env_of(&[(ENV_SECURITY_TOKEN, "tok")]))
            .unwrap()
            .unwrap_err();
        assert!(matches!(err, SourceError::EnvTokenWithoutKeys), "{err:?}");
    }

    #[test]
    fn credentials_file_path_prefers_the_override_then_home() {
        let env = env_of(&[(ENV_CREDENTIALS_FILE, "/etc/hw/creds"), ("HOME", "/root")]);
        assert_eq!(
            credentials_file_path(&env),
            Some(PathBuf::from("/etc/hw/creds"))
        );
        let env = env_of(&[(ENV_CREDENTIALS_FILE, ""), ("HOME", "/home/ops")]);
        assert_eq!(
            credentials_file_path(&env),
            Some(PathBuf::from("/home/ops/.huaweicloud/credentials"))
        );
        assert_eq!(credentials_file_path(&env_of(&[])), None);
    }

    // Credentials file.

    #[test]
    fn file_basic_section_with_token() {
        let text =
            format!("[basic]\nak = {AK}\nsk = {SK}\nproject_id = 0123\nsecurity_token = tok%%en\n");
        let found = parse(&text).unwrap().unwrap();
        assert_eq!(found.ak, AK);
        assert_eq!(found.sk.expose(), SK);
        assert_eq!(found.security_token.unwrap().expose(), "tok%en");
        assert_eq!(found.origin, "file /root/.huaweicloud/credentials [basic]");
    }

    #[test]
    fn file_follows_configparser_syntax() {
        // Key case ignored, ':' as delimiter, comments (indented too), text after the header,
        // CRLF line ends, a '#' after a value kept as part of it, blank lines.
        let text = format!(
            "# SDK credentials\r\n; more\r\n[global]\r\nak = other\r\n\r\n[basic] # hi\r\n  \
             # indented comment\r\nAK: {AK}\r\nSk = {SK} # kept\r\n\r\n"
        );
        let found = parse(&text).unwrap().unwrap();
        assert_eq!(found.ak, AK);
        assert_eq!(found.sk.expose(), format!("{SK} # kept"));
    }

    #[test]
    fn file_default_section_is_inherited() {
        let text = format!("[DEFAULT]\nak = {AK}\nsk = default-sk\n[basic]\nsk = {SK}\n");
        let found = parse(&text).unwrap().unwrap();
        assert_eq!(found.ak, AK);
        assert_eq!(found.sk.expose(), SK);
    }

    #[test]
    fn file_without_basic_aksk_is_no_source() {
        // Section names are case-sensitive in configparser, so [Basic] is not [basic].
        for text in [
            "",
            "# nothing\n",
            "[global]\nak = a\nsk = b\n",
            "[Basic]\nak = a\nsk = b\n",
            "[basic]\nproject_id = 0123\n",
            "[basic]\nak =\nsk =\n",
        ] {
            assert!(parse(text).unwrap().is_none(), "{text:?}");
        }
    }

    #[test]
    fn file_with_one_of_ak_sk_is_an_error_naming_the_missing_key() {
        let err = parse(&format!("[basic]\nak = {AK}\n")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("/root/.huaweicloud/credentials"), "{msg}");
        assert!(msg.contains("no `sk`"), "{msg}");
        assert_hides(&err, AK);
        let err = parse(&format!("[basic]\nsk = {SK}\nak = \n")).unwrap_err();
        assert!(err.to_string().contains("no `ak`"), "{err}");
        assert_hides(&err, SK);
    }

    #[test]
    fn file_with_federated_identity_is_refused() {
        let err = parse("[basic]\nidp_id = idp\nid_token_file = /t\n").unwrap_err();
        assert!(matches!(err, SourceError::FileFederated { .. }), "{err:?}");
    }

    #[test]
    fn file_syntax_errors_name_the_line_never_the_content() {
        let cases: [(&str, usize); 6] = [
            ("ak = SECRETVALUE\n[basic]\n", 1),
            ("[basic]\nSECRETVALUE\n", 2),
            ("[basic]\n= SECRETVALUE\n", 2),
            ("[basic]\nak = a\nAK = SECRETVALUE\n", 3),
            ("[basic]\nak = a\n[basic]\nsk = SECRETVALUE\n", 3),
            ("[]\nak = SECRETVALUE\n", 1),
        ];
        for (text, line) in cases {
            let err = parse(text).unwrap_err();
            match &err {
                SourceError::Syntax { line: l, .. } => assert_eq!(*l, line, "{text:?}"),
                other => panic!("{text:?}: {other:?}"),
            }
            assert_hides(&err, "SECRETVALUE");
        }
    }

    #[test]
    fn file_values_that_span_lines_or_interpolate_are_refused() {
        for (text, line) in [
            ("[basic]\nak = a\nsk = SECRET\n  VALUE\n", 3),
            ("[basic]\nak = a\nsk = SECRET\n\n  # c\n  VALUE\n", 3),
            ("[basic]\nak = a\nsk = %(ak)sSECRETVALUE\n", 3),
            ("[basic]\nak = a\nsk = SECRETVALUE%x\n", 3),
        ] {
            let err = parse(text).unwrap_err();
            match &err {
                SourceError::Value { line: l, key, .. } => {
                    assert_eq!((*l, *key), (line, "sk"), "{text:?}")
                }
                other => panic!("{text:?}: {other:?}"),
            }
            assert_hides(&err, "SECRET");
        }
    }

    #[test]
    fn file_indented_keys_and_other_multi_line_keys_are_fine() {
        // Indented key lines at one level are keys, not continuations; a multi-line value
        // under a key we do not read does not matter.
        let text = format!("[basic]\n  ak = {AK}\n  sk = {SK}\n  note = one\n    two\n");
        let found = parse(&text).unwrap().unwrap();
        assert_eq!((found.ak.as_str(), found.sk.expose()), (AK, SK));
    }

    #[test]
    fn file_with_bom_is_read() {
        let found = parse(&format!("\u{feff}[basic]\nak = {AK}\nsk = {SK}\n"))
            .unwrap()
            .unwrap();
        assert_eq!(found.ak, AK);
    }

    // Secret files.

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn secret_file_trailing_whitespace_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "sk", b"  s3cret value \r\n\n");
        assert_eq!(read_secret_file(&p).unwrap().expose(), "  s3cret value");
    }

    #[test]
    fn secret_file_problems_name_the_path_not_the_content() {
        let dir = tempfile::tempdir().unwrap();
        let cases: [(&str, Vec<u8>, &str); 4] = [
            ("empty", b" \n\n".to_vec(), "is empty"),
            (
                "lines",
                b"SECRETVALUE\nSECRETVALUE\n".to_vec(),
                "more than one line",
            ),
            ("binary", b"SECRETVALUE\xff\xfe".to_vec(), "not UTF-8"),
            (
                "big",
                vec![b'S'; SECRET_FILE_LIMIT as usize + 1],
                "too large",
            ),
        ];
        for (name, bytes, expected) in cases {
            let p = write(dir.path(), name, &bytes);
            let err = read_secret_file(&p).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains(expected), "{name}: {msg}");
            assert!(msg.contains(&p.display().to_string()), "{name}: {msg}");
            assert_hides(&err, "SECRETVALUE");
        }
        let at_limit = write(
            dir.path(),
            "at-limit",
            &vec![b'S'; SECRET_FILE_LIMIT as usize],
        );
        assert_eq!(
            read_secret_file(&at_limit).unwrap().expose().len(),
            SECRET_FILE_LIMIT as usize
        );
    }

    #[test]
    fn secret_file_missing_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("absent");
        let err = read_secret_file(&p).unwrap_err();
        assert!(matches!(err, SourceError::Read { .. }), "{err:?}");
        assert!(err.to_string().contains(&p.display().to_string()), "{err}");
    }

    #[test]
    fn secret_file_through_a_symlink_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let target = write(dir.path(), "target", b"tok\n");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert_eq!(read_secret_file(&link).unwrap().expose(), "tok");
    }

    #[test]
    fn permissions_0600_and_0400_are_quiet() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "sk", b"x");
        for mode in [0o600, 0o400] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            assert!(check_file_permissions(&p).unwrap().is_empty(), "{mode:o}");
        }
    }

    #[test]
    fn permissions_open_to_group_or_others_warn_with_chmod() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "sk", b"x");
        for (mode, says) in [
            (0o640, "readable by its group"),
            (0o604, "readable by every user"),
            (0o644, "readable by its group, readable by every user"),
            (0o620, "writable by its group"),
            (0o601, "executable by others"),
        ] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            let warnings = check_file_permissions(&p).unwrap();
            assert_eq!(warnings.len(), 1, "{mode:o}: {warnings:?}");
            let w = &warnings[0];
            assert!(w.contains(says), "{mode:o}: {w}");
            assert!(w.contains(&format!("mode {mode:04o}")), "{w}");
            assert!(
                w.contains(&format!("`chmod 0600 {}`", p.display())),
                "{mode:o}: {w}"
            );
        }
    }

    #[test]
    fn permissions_of_a_missing_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(check_file_permissions(&dir.path().join("absent")).is_err());
    }
}
