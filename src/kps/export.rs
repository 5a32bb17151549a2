//! Export a batch of names, isolating the bad ones so their batch-mates still land, and
//! falling back to the documented single export whenever the batch zip cannot be used.
//!
//! KPS fails a whole batch when one name does not exist or is not hosted, without saying which.
//! A per-key error therefore splits the batch in halves until the bad name stands alone.
//!
//! The zip's layout is not documented: when the archive is refused for any reason (hostile,
//! damaged, not a zip, an entry it cannot explain), every name of the batch is exported one by
//! one with `private-key/export`; when only some names have no usable entry, just those are.
//! Nothing from a refused zip is used. Each fallback is returned with its [`FallbackReason`] so
//! the pass can warn once and count them.
//!
//! Invariant: every key leaves this module parsed by the `keys` module (nothing downstream
//! reads key text again); key text is held only in zeroizing types.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;

use crate::keys::{KeyError, PrivateKey};
use crate::kps::archive::{self, Gap, Limits, Listing, Problem};
use crate::kps::{KpsClient, KpsError};

/// Why one key could not be exported.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ExportError {
    #[error("{0}")]
    Kps(KpsError),
    /// What KPS returned is not a private key kps-sync writes.
    #[error("what KPS returned for this name is not a usable private key: {0}")]
    Key(KeyError),
}

impl ExportError {
    /// The stable short label: `KPS.6004`, `HTTP 503`, `network`, `not-a-key`, ...
    pub fn code(&self) -> Cow<'static, str> {
        match self {
            ExportError::Kps(e) => e.code_label().into(),
            ExportError::Key(e) => e.code().into(),
        }
    }
}

/// Why names were exported one by one instead of from the batch zip.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FallbackReason {
    /// The answer was not a zip at all (an error page behind a 200).
    NotAZip,
    /// A truncated or damaged zip.
    Damaged,
    /// Over a hard limit: the zip's size, its entry count, an entry's or the total inflated
    /// size (a zip bomb).
    TooLarge,
    /// Zip64 or a compression method other than stored and deflate.
    Unsupported,
    /// A security refusal: `..`, an absolute path, a link or special file, an encrypted entry.
    Hostile,
    /// A private key entry matching no requested name, by name or by the listing.
    Unmatched,
    /// Two entries for one key.
    Duplicate,
    /// A key in the zip other than its `.pub` entry or the listing says.
    Mismatch,
    /// A requested name with no entry in the zip.
    MissingName,
    /// A requested name whose entry is not a private key.
    NotAKey,
}

impl FallbackReason {
    /// A stable label for logs and metrics (`reason="not_a_zip"`).
    pub fn as_str(self) -> &'static str {
        match self {
            FallbackReason::NotAZip => "not_a_zip",
            FallbackReason::Damaged => "damaged",
            FallbackReason::TooLarge => "too_large",
            FallbackReason::Unsupported => "unsupported",
            FallbackReason::Hostile => "hostile",
            FallbackReason::Unmatched => "unmatched",
            FallbackReason::Duplicate => "duplicate",
            FallbackReason::Mismatch => "mismatch",
            FallbackReason::MissingName => "missing_name",
            FallbackReason::NotAKey => "not_a_key",
        }
    }

    fn of_problem(problem: &Problem) -> FallbackReason {
        match problem {
            Problem::NotAZip => FallbackReason::NotAZip,
            Problem::Corrupt { .. } => FallbackReason::Damaged,
            Problem::ZipTooLarge { .. }
            | Problem::TooManyEntries { .. }
            | Problem::EntryTooLarge { .. }
            | Problem::TotalTooLarge { .. } => FallbackReason::TooLarge,
            Problem::Zip64 | Problem::UnsupportedCompression { .. } => FallbackReason::Unsupported,
            Problem::Traversal { .. }
            | Problem::AbsolutePath { .. }
            | Problem::Symlink { .. }
            | Problem::NotRegularFile { .. }
            | Problem::Encrypted { .. } => FallbackReason::Hostile,
            Problem::Unmatched { .. } => FallbackReason::Unmatched,
            Problem::Duplicate { .. } => FallbackReason::Duplicate,
            Problem::PublicMismatch { .. } | Problem::ListedMismatch { .. } => {
                FallbackReason::Mismatch
            }
        }
    }

    fn of_gap(gap: Gap) -> FallbackReason {
        match gap {
            Gap::Missing => FallbackReason::MissingName,
            Gap::NotAKey => FallbackReason::NotAKey,
        }
    }
}

impl fmt::Display for FallbackReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FallbackReason::NotAZip => "the batch answer was not a zip",
            FallbackReason::Damaged => "the batch zip was damaged",
            FallbackReason::TooLarge => "the batch zip was over a size limit",
            FallbackReason::Unsupported => "the batch zip used an unsupported format",
            FallbackReason::Hostile => "the batch zip was refused for security",
            FallbackReason::Unmatched => "the batch zip held a key matching no requested name",
            FallbackReason::Duplicate => "the batch zip held two entries for one key",
            FallbackReason::Mismatch => "a key in the batch zip did not match its public key",
            FallbackReason::MissingName => "a name was missing from the batch zip",
            FallbackReason::NotAKey => "an entry in the batch zip was not a private key",
        })
    }
}

/// Names exported one by one, and why.
#[derive(Debug, Clone)]
pub struct Fallback {
    pub reason: FallbackReason,
    pub names: Vec<String>,
    /// The archive's refusal in full (names the entry, never its content); empty for gaps.
    pub detail: String,
}

/// What one batch export produced: one result per requested name, in the order of the
/// names, and the fallbacks it took.
#[derive(Debug, Default)]
pub struct BatchExport {
    pub keys: Vec<Result<PrivateKey, ExportError>>,
    pub fallbacks: Vec<Fallback>,
}

/// Export up to 10 names. `listing` (the pass's KPS listing, if any) matches zip entries that
/// are not named after their key pair.
pub fn export_batch<'a>(
    client: &'a KpsClient,
    names: &'a [String],
    listing: Option<&'a Listing>,
) -> Pin<Box<dyn Future<Output = BatchExport> + Send + 'a>> {
    Box::pin(async move {
        match client.batch_export(names).await {
            Ok(zip) => {
                let unpacked = archive::unpack(zip.expose(), names, listing, &Limits::default());
                drop(zip);
                use_archive(client, names, unpacked).await
            }
            Err(e) if e.is_per_key() && names.len() > 1 => {
                let (left, right) = names.split_at(names.len() / 2);
                tracing::debug!(batch = names.len(), code = %e.code_label(), "a name in the batch is bad; splitting to isolate it");
                let mut out = export_batch(client, left, listing).await;
                let right = export_batch(client, right, listing).await;
                out.keys.extend(right.keys);
                out.fallbacks.extend(right.fallbacks);
                out
            }
            Err(e) => BatchExport {
                keys: names
                    .iter()
                    .map(|_| Err(ExportError::Kps(e.clone())))
                    .collect(),
                fallbacks: Vec::new(),
            },
        }
    })
}

/// Take the keys from an unpacked archive and export its gaps one by one; or, when it was
/// refused, export every name one by one. A name the archive neither held nor reported as a
/// gap is exported one by one too, as missing.
async fn use_archive(
    client: &KpsClient,
    names: &[String],
    unpacked: Result<archive::Unpacked, archive::ArchiveError>,
) -> BatchExport {
    let mut fallbacks = Vec::new();
    let mut from_zip = match unpacked {
        Ok(unpacked) => {
            crate::metrics::global().batch_exported(unpacked.keys.len());
            fallbacks = unpacked
                .gaps
                .into_iter()
                .map(|(name, gap)| Fallback {
                    reason: FallbackReason::of_gap(gap),
                    names: vec![name],
                    detail: String::new(),
                })
                .collect();
            unpacked.keys
        }
        Err(e) => {
            tracing::debug!("{e}; exporting these names one by one");
            fallbacks.push(Fallback {
                reason: FallbackReason::of_problem(&e.problem),
                names: names.to_vec(),
                detail: e.to_string(),
            });
            BTreeMap::new()
        }
    };
    let mut keys = Vec::with_capacity(names.len());
    for name in names {
        let key = match from_zip.remove(name) {
            Some(key) => Ok(key),
            None => {
                // A gap, or every name of a refused zip: the single export call.
                let reason = match fallbacks.iter().find(|f| f.names.contains(name)) {
                    Some(f) => f.reason,
                    None => {
                        fallbacks.push(Fallback {
                            reason: FallbackReason::MissingName,
                            names: vec![name.clone()],
                            detail: String::new(),
                        });
                        FallbackReason::MissingName
                    }
                };
                tracing::debug!(key = %name, reason = reason.as_str(), "exporting with the single export call");
                let key = export_one(client, name).await;
                if key.is_ok() {
                    crate::metrics::global().single_exported(reason.as_str());
                }
                key
            }
        };
        keys.push(key);
    }
    BatchExport { keys, fallbacks }
}

/// The documented single export, parsed.
async fn export_one(client: &KpsClient, name: &str) -> Result<PrivateKey, ExportError> {
    let text = client.export(name).await.map_err(ExportError::Kps)?;
    PrivateKey::parse(text.expose().as_bytes()).map_err(ExportError::Key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kps::archive::EntryName;

    #[test]
    fn every_refusal_and_gap_has_a_reason_with_a_distinct_label() {
        let entry = || EntryName("a.pem".into());
        let key = || Some("a".to_string());
        let problems = [
            (Problem::NotAZip, "not_a_zip"),
            (
                Problem::Corrupt {
                    entry: None,
                    detail: String::new(),
                },
                "damaged",
            ),
            (Problem::ZipTooLarge { size: 2, limit: 1 }, "too_large"),
            (Problem::TooManyEntries { count: 2, limit: 1 }, "too_large"),
            (Problem::Zip64, "unsupported"),
            (
                Problem::Traversal {
                    entry: entry(),
                    key: key(),
                },
                "hostile",
            ),
            (
                Problem::Symlink {
                    entry: entry(),
                    key: key(),
                },
                "hostile",
            ),
            (
                Problem::Encrypted {
                    entry: entry(),
                    key: key(),
                },
                "hostile",
            ),
            (
                Problem::Unmatched {
                    entry: entry(),
                    listed: true,
                },
                "unmatched",
            ),
            (
                Problem::Duplicate {
                    key: key(),
                    first: entry(),
                    second: entry(),
                },
                "duplicate",
            ),
            (
                Problem::PublicMismatch {
                    entry: entry(),
                    key: "a".into(),
                },
                "mismatch",
            ),
        ];
        for (problem, label) in problems {
            assert_eq!(
                FallbackReason::of_problem(&problem).as_str(),
                label,
                "{problem:?}"
            );
        }
        assert_eq!(
            FallbackReason::of_gap(Gap::Missing).as_str(),
            "missing_name"
        );
        assert_eq!(FallbackReason::of_gap(Gap::NotAKey).as_str(), "not_a_key");
    }
}
