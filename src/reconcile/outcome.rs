//! What a pass reports: one [`Outcome`] per key (or recorded file), a [`PassReport`] for the
//! pass, or a [`PassError`] when nothing per key could be judged. The exit code, the one-line
//! errors, `status`, the daemon's retries and the metrics all read these values.
//!
//! Invariant: no failure holds key material; messages name the key's path and say what to do.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use crate::hooks::HookError;
use crate::keys::KeyError;
use crate::kps::KpsError;
use crate::kps::export::{ExportError, FallbackReason};
use crate::metrics::PassFigures;
use crate::output::encrypt::EncryptError;
use crate::output::write::WriteError;
use crate::plan::{Change, ConflictReason};
use crate::state::StateError;

/// Whether trying again soon can help; drives the daemon's retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureClass {
    /// 429, 5xx, transport, credentials that could not be fetched, a write that failed: retry
    /// with backoff.
    Transient,
    /// Not found, not hosted, frozen, conflict, not a key, mismatch, a refused archive: the
    /// same request would fail the same way; retry when the manifest changes or at `interval`.
    Permanent,
}

/// Why one key is not in place after the pass: the typed cause, from which come its class
/// ([`Cause::class`]), its stable short label ([`Cause::label`]: what output, `status`, the
/// state's error records and the logs show) and its one-line message (`Display`: what went
/// wrong and what to do, never key material).
#[derive(Debug, Clone, thiserror::Error)]
pub enum Cause {
    /// KPS failed the export (its class says whether a retry can help), or what it returned
    /// is not a usable private key.
    #[error("{0}")]
    Export(ExportError),
    /// The pass's listing shows that exporting the name cannot work.
    #[error("{0}")]
    Listed(Unexportable),
    /// The exported key is not the one KPS lists for the name.
    #[error("{0}")]
    Verify(KeyError),
    /// A file kps-sync did not write (or a symlink, or no regular file) is at the path.
    #[error("{path}: {reason}")]
    Conflict {
        path: PathBuf,
        reason: ConflictReason,
    },
    /// The file changed, or became a symlink, between the plan and the write: kept as it is.
    #[error("{0}")]
    Changed(Arc<WriteError>),
    /// Writing the file, or fixing its mode, owner or group, failed.
    #[error("{0}")]
    Write(Arc<WriteError>),
    /// The intent to write could not be made durable, so nothing was written.
    #[error(
        "{path}: cannot record the intent to write it in {}: {source}; check state_dir's permissions and free space",
        journal.display()
    )]
    Journal {
        path: PathBuf,
        journal: PathBuf,
        source: Arc<std::io::Error>,
    },
    /// age refused to encrypt for the recipients.
    #[error("{0}")]
    Encrypt(Arc<EncryptError>),
    /// A file of a key no longer in the manifest could not be deleted.
    #[error("{0}")]
    Prune(Arc<WriteError>),
    /// The public key file alone cannot be written: the key file's fingerprint is not recorded.
    #[error(
        "{0}: the key's fingerprint is not recorded, so its public key file cannot be written \
         without rewriting the key; remove the key file to have both written"
    )]
    PublicUnrecorded(String),
    /// The public key file alone cannot be written: KPS now holds another key than the one
    /// on disk.
    #[error(
        "{0}: KPS now holds another key for this name than the one on disk; not written. \
         The next listing rotates the key (or run `reconcile --check-rotation`)"
    )]
    PublicRotated(String),
}

/// What the listing says that makes an export pointless.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unexportable {
    #[error(
        "the key pair is not in the KPS listing of this project; check the name, the region and the project id"
    )]
    NotListed,
    #[error(
        "KPS does not hold this private key (is_key_protection: false); import it into KPS or stop managing it here"
    )]
    NotHosted,
    #[error("the key pair is frozen in KPS; unfreeze it in the console")]
    Frozen,
}

impl Cause {
    /// Whether trying again soon can help.
    pub fn class(&self) -> FailureClass {
        match self {
            Cause::Export(ExportError::Kps(e))
                if e.is_retryable() || e.class == crate::kps::Class::Credentials =>
            {
                FailureClass::Transient
            }
            Cause::Write(_) | Cause::Journal { .. } => FailureClass::Transient,
            _ => FailureClass::Permanent,
        }
    }

    /// The stable short label: `KPS.6004`, `HTTP 503`, `not-a-key`, `mismatch`, `conflict`,
    /// `write`, `encrypt`, `prune`, `public-key`, `frozen`.
    pub fn label(&self) -> Cow<'static, str> {
        match self {
            Cause::Export(e) => e.code(),
            Cause::Listed(Unexportable::NotListed) => "KPS.6004".into(),
            Cause::Listed(Unexportable::NotHosted) => "KPS.6005".into(),
            Cause::Listed(Unexportable::Frozen) => "frozen".into(),
            Cause::Verify(e) => e.code().into(),
            Cause::Conflict { .. } | Cause::Changed(_) => "conflict".into(),
            Cause::Write(_) | Cause::Journal { .. } => "write".into(),
            Cause::Encrypt(_) => "encrypt".into(),
            Cause::Prune(_) => "prune".into(),
            Cause::PublicUnrecorded(_) | Cause::PublicRotated(_) => "public-key".into(),
        }
    }

    /// A failed write of the file at `path`: a file changed or swapped for a symlink since the
    /// plan is a conflict (left alone); anything else may pass.
    pub(super) fn of_write(e: WriteError) -> Cause {
        match e {
            WriteError::Changed { .. } | WriteError::Symlink { .. } => Cause::Changed(Arc::new(e)),
            _ => Cause::Write(Arc::new(e)),
        }
    }

    /// Something kps-sync did not write is in the way (metrics count these apart).
    pub fn is_conflict(&self) -> bool {
        matches!(self, Cause::Conflict { .. } | Cause::Changed(_))
    }

    /// `label: message`, as the state's error records and `status` show it.
    pub fn record(&self) -> String {
        format!("{}: {self}", self.label())
    }

    /// The one-line error of `reconcile`: `label: message`, without the label where the
    /// message already says it (a KPS error names its code).
    pub fn one_line(&self) -> String {
        let message = self.to_string();
        let label = self.label();
        if message.contains(label.as_ref()) {
            message
        } else {
            format!("{label}: {message}")
        }
    }
}

/// What happened to one key (or one recorded file) in this pass.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub key: String,
    pub path: PathBuf,
    pub change: Change,
    pub result: Result<(), Cause>,
}

/// The result of a pass, for output, exit codes, `STATUS=` and metrics.
#[derive(Debug, Clone, Default)]
pub struct PassReport {
    pub outcomes: Vec<Outcome>,
    /// Keys in the manifest.
    pub managed: usize,
    /// Keys in place as declared at the end of the pass.
    pub in_place: usize,
    /// Keys not in place (failed or in conflict).
    pub failed: usize,
    /// Hooks that failed (their keys are in place).
    pub hook_failures: Vec<Arc<HookError>>,
    /// The pass stopped early for shutdown.
    pub interrupted: bool,
    /// The pass had to list KPS and could not; it went on without the listing.
    pub listing_error: Option<ListingError>,
    /// Names exported one by one because the batch zip could not be used, by reason.
    pub fallbacks: BTreeMap<FallbackReason, usize>,
}

impl PassReport {
    /// All managed keys in place and every hook ran.
    pub fn is_success(&self) -> bool {
        self.failed == 0
            && self.hook_failures.is_empty()
            && !self.interrupted
            && self.listing_error.is_none()
    }

    /// The pass counted for the metrics: managed keys by state, and the drift it repaired.
    pub fn figures(&self) -> PassFigures {
        let mut f = PassFigures {
            success: self.is_success(),
            in_place: self.in_place,
            ..PassFigures::default()
        };
        let managed_failures = self
            .outcomes
            .iter()
            .filter(|o| o.change != Change::Prune && o.change != Change::Orphan)
            .filter_map(|o| o.result.as_ref().err());
        for cause in managed_failures {
            if cause.is_conflict() {
                f.conflict += 1;
            } else {
                f.failed += 1;
            }
        }
        f.pending = self.failed.saturating_sub(f.conflict + f.failed);
        for o in self.outcomes.iter().filter(|o| o.result.is_ok()) {
            match &o.change {
                Change::Restore(_) => f.restores += 1,
                Change::FixMeta => f.fix_meta += 1,
                Change::Rotate => f.rotations += 1,
                _ => {}
            }
        }
        f
    }
}

/// The pass had to list KPS and could not; it went on without the listing (no rotation check,
/// no adoption, no check of the exports against it).
#[derive(Debug, Clone, thiserror::Error)]
#[error("cannot list KPS key pairs: {0}")]
pub struct ListingError(pub KpsError);

/// A failure of the pass as a whole (nothing per key could be judged).
#[derive(Debug, thiserror::Error)]
pub enum PassError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("{0}")]
    Credentials(#[from] crate::auth::AuthError),
    /// KPS refused the credentials on the listing: every other call would fail the same way.
    #[error("{0}")]
    Unauthorized(KpsError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kps::KpsError;

    fn write_error(symlink: bool) -> Arc<WriteError> {
        let path = PathBuf::from("/keys/a.pem");
        Arc::new(if symlink {
            WriteError::Symlink { path }
        } else {
            WriteError::NotAFolder { path }
        })
    }

    /// The labels users see in output, `status`, the state's error records and the logs, and
    /// the class that drives the daemon's retries, for every cause.
    #[test]
    fn every_cause_has_its_stable_label_and_class() {
        use FailureClass::{Permanent, Transient};
        let kps = |status: u16, code: &str| {
            let body = format!(r#"{{"error_code":"{code}","error_msg":"m"}}"#);
            Cause::Export(ExportError::Kps(KpsError::from_response(
                "batch export",
                status,
                body.as_bytes(),
                None,
            )))
        };
        let path = PathBuf::from("/keys/a.pem");
        let cases = [
            (kps(400, "KPS.6004"), "KPS.6004", Permanent),
            (kps(400, "KPS.6005"), "KPS.6005", Permanent),
            (kps(503, "KPS.5001"), "KPS.5001", Transient),
            (kps(429, "APIG.0308"), "APIG.0308", Transient),
            (
                Cause::Export(ExportError::Key(KeyError::Empty)),
                "not-a-key",
                Permanent,
            ),
            (
                Cause::Listed(Unexportable::NotListed),
                "KPS.6004",
                Permanent,
            ),
            (
                Cause::Listed(Unexportable::NotHosted),
                "KPS.6005",
                Permanent,
            ),
            (Cause::Listed(Unexportable::Frozen), "frozen", Permanent),
            (Cause::Verify(KeyError::Html), "not-a-key", Permanent),
            (
                Cause::Verify(KeyError::Mismatch {
                    what: "public key",
                    listed: "SHA256:a".into(),
                    ours: "SHA256:b".into(),
                }),
                "mismatch",
                Permanent,
            ),
            (
                Cause::Conflict {
                    path: path.clone(),
                    reason: ConflictReason::NotOurs,
                },
                "conflict",
                Permanent,
            ),
            (
                Cause::of_write(Arc::into_inner(write_error(true)).unwrap()),
                "conflict",
                Permanent,
            ),
            (
                Cause::of_write(Arc::into_inner(write_error(false)).unwrap()),
                "write",
                Transient,
            ),
            (
                Cause::Journal {
                    path: path.clone(),
                    journal: "/state/journal".into(),
                    source: Arc::new(std::io::Error::other("disk full")),
                },
                "write",
                Transient,
            ),
            (
                Cause::Encrypt(Arc::new(EncryptError::NoRecipients)),
                "encrypt",
                Permanent,
            ),
            (Cause::Prune(write_error(false)), "prune", Permanent),
            (
                Cause::PublicUnrecorded("/keys/a.pem.pub".into()),
                "public-key",
                Permanent,
            ),
            (
                Cause::PublicRotated("/keys/a.pem.pub".into()),
                "public-key",
                Permanent,
            ),
        ];
        for (cause, label, class) in cases {
            assert_eq!(
                (cause.label().as_ref(), cause.class()),
                (label, class),
                "{cause:?}"
            );
            assert_eq!(cause.record(), format!("{label}: {cause}"));
            assert_eq!(cause.is_conflict(), label == "conflict", "{cause:?}");
        }
    }

    #[test]
    fn the_one_line_error_names_the_label_once() {
        let conflict = Cause::Conflict {
            path: "/keys/a.pem".into(),
            reason: ConflictReason::Symlink,
        };
        assert!(
            conflict
                .one_line()
                .starts_with("conflict: /keys/a.pem: a symlink is there")
        );
        let kps = Cause::Export(ExportError::Kps(KpsError::from_response(
            "export",
            400,
            br#"{"error_code":"KPS.6004","error_msg":"gone"}"#,
            None,
        )));
        assert!(
            kps.one_line().starts_with("KPS export failed: KPS.6004"),
            "{}",
            kps.one_line()
        );
    }
}
