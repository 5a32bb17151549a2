//! The loader's one error type. Its `Display` is the whole report: every problem found, one per
//! line, each as `FILE:LINE:COLUMN: what is wrong; what to write instead`, so `validate`, `run`
//! and the daemon's reload log can print it as is.
//!
//! Invariant: no message carries a secret. Inline secrets are named by their field only, and
//! YAML type errors under `kps:` have their string values cut out (see `raw_error_problem`).

use std::fmt;
use std::path::{Path, PathBuf};

/// A 1-based line and column in the manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Location {
    pub line: usize,
    pub column: usize,
}

/// One thing wrong with the manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Where it is; `None` only when the YAML parser could not say (e.g. several documents).
    pub location: Option<Location>,
    /// What is wrong and what to write instead.
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The file could not be read at all.
    #[error("cannot read the manifest {}: {cause}; {hint}", path.display())]
    Read {
        path: PathBuf,
        /// Not a `#[source]`: its text is already in the message, and chains would repeat it.
        cause: std::io::Error,
        hint: &'static str,
    },
    /// The manifest, or a folder above it, could be changed by someone kps-sync does not trust
    /// (strict modes): it is not read.
    #[error("{found}")]
    Untrusted {
        path: PathBuf,
        found: crate::trust::Untrusted,
    },
    /// The file was read but is not a valid manifest. `problems` is never empty and is sorted by
    /// location. YAML syntax, type and unknown-field errors stop parsing, so they come alone;
    /// rule violations found after parsing are all reported together.
    #[error("{}", Render { path, problems })]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

impl ManifestError {
    /// The manifest file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            ManifestError::Read { path, .. }
            | ManifestError::Untrusted { path, .. }
            | ManifestError::Invalid { path, .. } => path,
        }
    }

    /// The problems found; empty for a read error or an untrusted manifest.
    pub fn problems(&self) -> &[Problem] {
        match self {
            ManifestError::Read { .. } | ManifestError::Untrusted { .. } => &[],
            ManifestError::Invalid { problems, .. } => problems,
        }
    }
}

struct Render<'a> {
    path: &'a Path,
    problems: &'a [Problem],
}

impl fmt::Display for Render<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            match problem.location {
                Some(Location { line, column }) => write!(
                    f,
                    "{}:{line}:{column}: {}",
                    self.path.display(),
                    problem.message
                )?,
                None => write!(f, "{}: {}", self.path.display(), problem.message)?,
            }
        }
        Ok(())
    }
}

/// Turn a serde_yaml error (syntax, type, unknown field, our own duplicate-key check) into a
/// problem with its location and a hint where we have a better one than serde's.
pub(super) fn raw_error_problem(err: &serde_yaml::Error) -> Problem {
    let location = err.location().map(|l| Location {
        line: l.line(),
        column: l.column(),
    });
    let mut message = err.to_string();
    // serde_yaml and libyaml put the mark in the text; we print it in front instead.
    if let Some(l) = &location {
        message = message.replacen(&format!(" at line {} column {}", l.line, l.column), "", 1);
    }
    // serde_yaml prefixes the dotted path (`kps.auth: ...`).
    let (yaml_path, rest) = match message.split_once(": ") {
        Some((p, r)) if !p.contains(' ') && !p.is_empty() => (p.to_string(), r.to_string()),
        _ => (String::new(), message.clone()),
    };
    if let Some(field) = unknown_field(&rest) {
        return Problem {
            location,
            message: unknown_field_message(&yaml_path, field, &rest),
        };
    }
    if yaml_path == "kps" || yaml_path.starts_with("kps.") {
        message = redact_strings(&message);
    }
    if message == "EOF while parsing a value" {
        message =
            "the manifest is empty: it needs at least `version: 1`, `kps:` and `keys:`".into();
    }
    Problem { location, message }
}

/// The field name in serde's "unknown field `x`, expected ..." message.
fn unknown_field(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("unknown field `")?;
    let end = rest.find('`')?;
    Some(&rest[..end])
}

/// Which file-based field replaces an inline secret written as `field`, if it is one.
pub(super) fn inline_secret_replacement(field: &str) -> Option<&'static str> {
    let normalized = field.to_ascii_lowercase().replace('-', "_");
    Some(match normalized.as_str() {
        "token" | "auth_token" | "x_auth_token" => "token_file",
        "access_key" | "ak" | "access_key_id" | "accesskey" => "access_key_file",
        "secret_key" | "sk" | "secret_access_key" | "secretkey" | "secret" => "secret_key_file",
        "security_token" | "securitytoken" | "session_token" => "security_token_file",
        "password" | "passwd" | "pass" => "password_file",
        _ => return None,
    })
}

fn unknown_field_message(yaml_path: &str, field: &str, serde_message: &str) -> String {
    let place = if yaml_path.is_empty() || yaml_path == "." {
        "the top level".to_string()
    } else {
        format!("`{yaml_path}`")
    };
    if let Some(replacement) = inline_secret_replacement(field) {
        return format!(
            "`{field}:` in {place} would hold a secret inline; secrets are never inline: put it \
             in a file (mode 0600, or a systemd credential) and use `{replacement}:`"
        );
    }
    if field == "path" && yaml_path == "defaults" {
        return "`path` cannot have a default: every key names its own path under `keys:`".into();
    }
    let allowed = serde_message
        .split_once(", expected ")
        .map(|(_, a)| a.trim_start_matches("one of ").to_string());
    match allowed {
        Some(allowed) => format!("unknown field `{field}` in {place}; allowed: {allowed}"),
        None => format!("unknown field `{field}` in {place}; it takes no fields"),
    }
}

/// Cut quoted string values out of a serde message: under `kps:` a value in the wrong place may
/// be a secret someone pasted.
fn redact_strings(message: &str) -> String {
    let marker = "string \"";
    let mut out = String::new();
    let mut rest = message;
    while let Some(start) = rest.find(marker) {
        out.push_str(&rest[..start]);
        out.push_str("a string");
        let after = &rest[start + marker.len()..];
        // serde writes the value with Debug-like escaping; the closing quote is the first
        // unescaped `"`.
        let mut end = None;
        let mut escaped = false;
        for (i, c) in after.char_indices() {
            match c {
                '\\' if !escaped => escaped = true,
                '"' if !escaped => {
                    end = Some(i);
                    break;
                }
                _ => escaped = false,
            }
        }
        match end {
            Some(i) => rest = &after[i + 1..],
            None => {
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_puts_path_line_column_first_one_problem_per_line() {
        let err = ManifestError::Invalid {
            path: "/etc/kps-sync/manifest.yaml".into(),
            problems: vec![
                Problem {
                    location: Some(Location {
                        line: 12,
                        column: 5,
                    }),
                    message: "bad mode".into(),
                },
                Problem {
                    location: None,
                    message: "two documents".into(),
                },
            ],
        };
        assert_eq!(
            err.to_string(),
            "/etc/kps-sync/manifest.yaml:12:5: bad mode\n/etc/kps-sync/manifest.yaml: two documents"
        );
    }

    #[test]
    fn redact_strings_removes_quoted_values() {
        assert_eq!(
            redact_strings(r#"invalid type: string "hunter\"2", expected a map"#),
            "invalid type: a string, expected a map"
        );
        assert_eq!(redact_strings("nothing quoted"), "nothing quoted");
    }

    #[test]
    fn inline_secret_names_map_to_file_fields() {
        assert_eq!(inline_secret_replacement("token"), Some("token_file"));
        assert_eq!(inline_secret_replacement("SK"), Some("secret_key_file"));
        assert_eq!(inline_secret_replacement("password"), Some("password_file"));
        assert_eq!(
            inline_secret_replacement("security-token"),
            Some("security_token_file")
        );
        assert_eq!(inline_secret_replacement("token_file"), None);
    }
}
