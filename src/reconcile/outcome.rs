//! What a pass reports: one [`Outcome`] per key (or recorded file), a [`PassReport`] for the
//! pass, or a [`PassError`] when nothing per key could be judged. The exit code, the one-line
//! errors, `status`, the daemon's retries and the metrics all read these values.
//!
//! Invariant: no failure holds key material; messages name the key's path and say what to do.
use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::kps::KpsError;
use crate::kps::export::FallbackReason;
use crate::plan::Change;
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

/// Why one key is not in place after the pass.
#[derive(Debug, Clone)]
pub struct KeyFailure {
    pub class: FailureClass,
    /// `KPS.6004`, `archive`, `not-a-key`, `write`, `conflict`, ...
    pub code: String,
    /// One line: what went wrong and what to do. Never key material.
    pub message: String,
}

/// What happened to one key (or one recorded file) in this pass.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub key: String,
    pub path: PathBuf,
    pub change: Change,
    pub result: Result<(), KeyFailure>,
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
    pub hook_failures: Vec<String>,
    /// The pass stopped early for shutdown.
    pub interrupted: bool,
    /// The pass had to list KPS and could not; it went on without the listing.
    pub listing_error: Option<String>,
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
}

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

/// A permanent failure; see [`KeyFailure::transient`] for the others.
pub(super) fn failure(code: &str, message: String) -> KeyFailure {
    KeyFailure {
        class: FailureClass::Permanent,
        code: code.to_owned(),
        message,
    }
}

impl KeyFailure {
    pub(super) fn transient(code: &str, message: String) -> KeyFailure {
        KeyFailure {
            class: FailureClass::Transient,
            ..failure(code, message)
        }
    }
}
