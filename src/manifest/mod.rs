//! The manifest: YAML in, a validated [`Manifest`] out, or an error naming the file, the line
//! and column, and what to write instead.
//!
//! Parse, then validate, in one parse of the text:
//! 1. `raw`: serde structs with `deny_unknown_fields`, every mapping read through `dupkeys`,
//!    which refuses a repeated key at its own line and column (serde_yaml would keep the last
//!    one silently); syntax, type errors and unknown fields stop here, with serde_yaml's
//!    location.
//! 2. `validate`: every rule, all violations collected, each located with `locate`.
//!
//! Paths in the manifest: relative paths resolve against the manifest's folder (the manifest
//! path made absolute first). A path that starts with `$CREDENTIALS_DIRECTORY/` or
//! `${CREDENTIALS_DIRECTORY}/` takes that prefix from the environment (systemd sets it for a
//! unit with `LoadCredential=`); loading fails when it is unset. No other `$VAR` or `~` is
//! expanded: such a path is refused rather than taken literally.
//!
//! `defaults:` fields apply field by field: a key's own `mode`, `owner`, `age_recipients`...
//! replace the default of that one field. `age_recipients` and `age_recipients_file` are two
//! fields, and a key is encrypted to both lists together; `age_recipients: []` or
//! `on_change: []` on a key clears the default. `armor: true` in `defaults:` applies only to
//! keys that have recipients. An `age_recipients_file` is read at load time (one recipient a
//! line, `#` comments and blank lines skipped, like `age -R`); an empty one is an error, since
//! the key would silently be written in the clear.
//!
//! Strict modes (`crate::trust`): [`load`] refuses a manifest that anyone but root or the user
//! kps-sync runs as could change (the file or a folder above it) before reading it, and the
//! validator refuses a `state_dir`, `ca_file`, recipients or credential file in the same case,
//! each located at the line that names it. `settings.hook_env` may not list a credential
//! variable (`hooks::is_credential`).
//!
//! Modes must be quoted strings of octal digits (`mode: "0600"`). serde_yaml reads YAML 1.2,
//! where a bare `0600` is the string "0600", but YAML 1.1 tools read it as a number, so a bare
//! mode is refused too, as are `600`, `0o600` and other numbers.
//!
//! Costs: the text is parsed once; each key's line comes from a
//! one-pass scan of block-style `keys:`. Only error locations, and keys written in flow style,
//! take one more parse each.

mod dupkeys;
mod duration;
mod error;
mod locate;
mod model;
mod raw;
mod recipient;
mod regions;
mod rules;
mod validate;

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use error::{Location, ManifestError, Problem};
pub use model::*;

/// Where the manifest is when the command line does not say.
pub const DEFAULT_PATH: &str = "/etc/kps-sync/manifest.yaml";

/// The environment variable that overrides [`DEFAULT_PATH`].
pub const PATH_ENV: &str = "KPS_SYNC_MANIFEST";

/// `$KPS_SYNC_MANIFEST` if set and not empty, else `/etc/kps-sync/manifest.yaml`.
pub fn default_path() -> PathBuf {
    default_path_from(std::env::var_os(PATH_ENV))
}

fn default_path_from(env: Option<OsString>) -> PathBuf {
    match env {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(DEFAULT_PATH),
    }
}

/// Read and validate the manifest at `path`.
pub fn load(path: &Path) -> Result<Manifest, ManifestError> {
    let path = absolute(path);
    let bytes = read(&path)?;
    load_bytes(bytes, &path)
}

/// The manifest's bytes, once its strict modes are checked (see [`check_trusted`]). A caller
/// that hashes the manifest (the daemon) hashes these, so what it judges is what it hashed.
pub fn read(path: &Path) -> Result<Vec<u8>, ManifestError> {
    check_trusted(path)?;
    std::fs::read(path).map_err(|cause| read_error(path, cause))
}

/// Validate manifest bytes read from `path` (see [`load_str`]).
pub fn load_bytes(bytes: Vec<u8>, path: &Path) -> Result<Manifest, ManifestError> {
    let text = String::from_utf8(bytes).map_err(|_| {
        let cause = std::io::Error::new(std::io::ErrorKind::InvalidData, "it is not UTF-8 text");
        read_error(path, cause)
    })?;
    load_str(&text, path)
}

fn read_error(path: &Path, cause: std::io::Error) -> ManifestError {
    let hint = match cause.kind() {
        std::io::ErrorKind::NotFound => {
            "create it, or point `-m/--manifest` or $KPS_SYNC_MANIFEST at yours"
        }
        std::io::ErrorKind::PermissionDenied => {
            "run kps-sync as a user that can read it (usually root), or fix the file's \
             permissions"
        }
        std::io::ErrorKind::IsADirectory => "point at the manifest file, not a folder",
        std::io::ErrorKind::InvalidData => "save it as UTF-8 YAML",
        _ => "check that the path names a readable YAML file",
    };
    ManifestError::Read {
        path: absolute(path),
        cause,
        hint,
    }
}

/// Strict modes for the manifest file itself: it and every folder above it must be owned by
/// root or by the user kps-sync runs as, and not writable by group or other (see `trust`).
/// [`load`] and [`read`] check this before reading.
pub fn check_trusted(path: &Path) -> Result<(), ManifestError> {
    crate::trust::check(path, crate::trust::Input::Manifest).map_err(|found| {
        ManifestError::Untrusted {
            path: path.to_path_buf(),
            found,
        }
    })
}

/// Validate manifest text. `path` names it in messages and anchors relative paths; it need not
/// exist. The files the text names (state_dir, ca_file, recipients and credential files) are
/// checked for strict modes; the manifest file itself is not (see [`check_trusted`]).
pub fn load_str(text: &str, path: &Path) -> Result<Manifest, ManifestError> {
    load_text(
        text,
        &absolute(path),
        &|name| std::env::var_os(name),
        &validate::SystemAccounts,
    )
}

/// [`load_str`] without the host: no environment (`$CREDENTIALS_DIRECTORY` unset) and a fixed
/// account table (`root` = 0, `nobody` = 65534) instead of NSS. The same parse and validation,
/// for the manifest fuzz target in `fuzz/`, whose results must not depend on the machine. Files
/// the text names are still looked at (strict modes, recipients files): that is the loader.
#[doc(hidden)]
pub fn load_str_isolated(text: &str, path: &Path) -> Result<Manifest, ManifestError> {
    struct Fixed;
    impl validate::Accounts for Fixed {
        fn user(&self, name: &str) -> Result<Option<u32>, String> {
            Ok(match name {
                "root" => Some(0),
                "nobody" => Some(65534),
                _ => None,
            })
        }
        fn group(&self, name: &str) -> Result<Option<u32>, String> {
            self.user(name)
        }
    }
    load_text(text, &absolute(path), &|_| None, &Fixed)
}

fn load_text(
    text: &str,
    path: &Path,
    env: &dyn Fn(&str) -> Option<OsString>,
    accounts: &dyn validate::Accounts,
) -> Result<Manifest, ManifestError> {
    let invalid = |problems: Vec<Problem>| ManifestError::Invalid {
        path: path.to_path_buf(),
        problems,
    };
    let blank = text.lines().all(|l| {
        let l = l.trim();
        l.is_empty() || l.starts_with('#') || l == "---" || l == "..."
    });
    if blank {
        return Err(invalid(vec![Problem {
            location: Some(Location { line: 1, column: 1 }),
            message: "the manifest is empty: it needs at least `version: 1`, `kps:` and `keys:`"
                .into(),
        }]));
    }
    if let Some(problem) = stray_line_break(text) {
        return Err(invalid(vec![problem]));
    }
    // One parse: duplicate keys are refused inside it (see `dupkeys`).
    let raw =
        dupkeys::Unique::<raw::RawManifest>::deserialize(serde_yaml::Deserializer::from_str(text))
            .map_err(|e| {
                // serde_yaml reads events as the structs ask for them, so a type error can come
                // before a syntax error further on; the syntax error is the one to fix first.
                let e = match serde_yaml::from_str::<serde::de::IgnoredAny>(text) {
                    Err(syntax) => syntax,
                    Ok(_) => e,
                };
                let problem =
                    dupkeys::problem(&e, text).unwrap_or_else(|| error::raw_error_problem(&e));
                invalid(vec![tab_indentation(text, problem)])
            })?
            .0;
    let ctx = validate::Context {
        manifest: path,
        env,
        accounts,
    };
    validate::validate(raw, text, &ctx).map_err(invalid)
}

/// libyaml reads a lone CR, NEL, LS and PS as line breaks; editors mostly do not, nor does
/// `str::lines`. After one, every line number the parser gives would point elsewhere than the
/// operator looks (the fuzzer's `\r\r/` was refused "at line 3" of a one-line file), so such
/// a character is refused first, at the line and column an editor shows.
fn stray_line_break(text: &str) -> Option<Problem> {
    text.split('\n').enumerate().find_map(|(i, line)| {
        let line = line.strip_suffix('\r').unwrap_or(line);
        let (column, c) = line
            .chars()
            .enumerate()
            .find(|(_, c)| matches!(c, '\r' | '\u{85}' | '\u{2028}' | '\u{2029}'))?;
        let what = match c {
            '\r' => "a carriage return without a line feed (old Mac line ends)",
            '\u{85}' => "a next-line character (U+0085)",
            '\u{2028}' => "a line separator (U+2028)",
            _ => "a paragraph separator (U+2029)",
        };
        Some(Problem {
            location: Some(Location {
                line: i + 1,
                column: column + 1,
            }),
            message: format!(
                "{what}: YAML reads it as a line break where editors show none, so lines would \
                 not match; remove it, and save the manifest with LF (or CRLF) line ends"
            ),
        })
    })
}

/// YAML indents with spaces only, and libyaml's word for a tab there ("found character that
/// cannot start any token") does not say so. When the parse failed at or after a line whose
/// indentation holds a tab, name that tab instead.
fn tab_indentation(text: &str, problem: Problem) -> Problem {
    let upto = problem.location.map_or(usize::MAX, |l| l.line);
    let tab = text.lines().enumerate().take(upto).find_map(|(i, line)| {
        let indent = &line[..line.len() - line.trim_start_matches([' ', '\t']).len()];
        indent.find('\t').map(|col| Location {
            line: i + 1,
            column: col + 1,
        })
    });
    match tab {
        Some(location) => Problem {
            location: Some(location),
            message: "a tab in the indentation: YAML indents with spaces only; use spaces".into(),
        },
        None => problem,
    }
}

/// The path made absolute against the current folder, `.` and `..` removed, so messages and
/// relative paths do not depend on where the process started later.
fn absolute(path: &Path) -> PathBuf {
    let joined = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(path))
            .unwrap_or_else(|_| path.to_path_buf())
    };
    rules::normalize(&joined)
}

#[cfg(test)]
mod tests;
