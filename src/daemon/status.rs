//! What the daemon says about itself: the follow-up a pass calls for ([`verdict`]), the
//! `STATUS=` line systemd shows, and the [`Snapshot`] an embedding caller (a test) can watch.
//! Built from counts, key names, error codes and timestamps only: never key material.

use std::fmt::Write as _;

use tokio::time::Instant;

use crate::reconcile::{Cause, FailureClass, PassReport};

/// How the daemon follows up a pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Every key in place: next, the interval.
    Healthy,
    /// Only permanent failures: held until the manifest changes or the next interval.
    Permanent,
    /// A transient failure (or the pass itself failed): retry with backoff.
    Transient,
}

/// The follow-up a pass report calls for. Hook failures do not count: their keys are in place
/// and a retry would not run the hook again.
pub fn verdict(report: &PassReport) -> Verdict {
    let failures: Vec<&Cause> = report
        .outcomes
        .iter()
        .filter_map(|o| o.result.as_ref().err())
        .collect();
    if report.interrupted
        || failures
            .iter()
            .any(|f| f.class() == FailureClass::Transient)
        || report.failed > failures.len()
    {
        Verdict::Transient
    } else if report.failed > 0 || !failures.is_empty() {
        Verdict::Permanent
    } else {
        Verdict::Healthy
    }
}

/// The last pass as `STATUS=` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LastPass {
    Done {
        at: String,
        managed: usize,
        in_place: usize,
        failed: usize,
        /// `key: code` for each key not in place.
        failed_keys: Vec<String>,
    },
    Failed {
        at: String,
        message: String,
    },
}

impl LastPass {
    /// A pass that ran to its end (some keys may have failed).
    pub fn done(at: String, report: &PassReport) -> LastPass {
        LastPass::Done {
            at,
            managed: report.managed,
            in_place: report.in_place,
            failed: report.failed,
            failed_keys: report
                .outcomes
                .iter()
                .filter_map(|o| Some(format!("{}: {}", o.key, o.result.as_ref().err()?.label())))
                .collect(),
        }
    }
}

/// The daemon as an embedding caller sees it, published after each pass starts and ends.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Passes started since start.
    pub passes_started: u64,
    /// Passes that ran to their end (a pass cut short by shutdown is not counted).
    pub passes_done: u64,
    /// The last pass done.
    pub last: Option<LastPass>,
    /// When a transient failure is retried, if one is pending.
    pub retry_at: Option<Instant>,
    /// When the interval pass is due.
    pub next_full: Option<Instant>,
    /// Keys held after a permanent failure, not exported again until the manifest changes, a
    /// reload, or the next interval pass.
    pub held: Vec<String>,
    /// Managed files restored or fixed since start.
    pub drift: u64,
    /// The manifest on disk did not load; the last good one is in force.
    pub manifest_rejected: bool,
}

/// How many failed keys `STATUS=` names before "+N more".
const STATUS_KEYS: usize = 3;

/// The `STATUS=` text: counts, failed keys, last pass time, drift count.
pub fn status_text(last: Option<&LastPass>, drift: u64, manifest_rejected: bool) -> String {
    let mut text = match last {
        None => "first pass running".to_owned(),
        Some(LastPass::Done {
            at,
            managed,
            in_place,
            failed,
            failed_keys,
        }) => {
            let mut t = format!("{managed} managed, {in_place} in place, {failed} failed");
            if !failed_keys.is_empty() {
                let shown: Vec<&str> = failed_keys
                    .iter()
                    .take(STATUS_KEYS)
                    .map(String::as_str)
                    .collect();
                let _ = write!(t, " ({}", shown.join(", "));
                if failed_keys.len() > STATUS_KEYS {
                    let _ = write!(t, ", +{} more", failed_keys.len() - STATUS_KEYS);
                }
                t.push(')');
            }
            let _ = write!(t, "; last pass {at}");
            t
        }
        Some(LastPass::Failed { at, message }) => format!("last pass failed at {at}: {message}"),
    };
    let _ = write!(text, "; drift {drift}");
    if manifest_rejected {
        text.push_str("; manifest edit rejected, last good one in force (see log)");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_names_counts_failures_time_and_drift() {
        assert_eq!(status_text(None, 0, false), "first pass running; drift 0");
        let ok = LastPass::Done {
            at: "2025-01-02T03:04:05Z".into(),
            managed: 3,
            in_place: 3,
            failed: 0,
            failed_keys: vec![],
        };
        assert_eq!(
            status_text(Some(&ok), 2, false),
            "3 managed, 3 in place, 0 failed; last pass 2025-01-02T03:04:05Z; drift 2"
        );
        let bad = LastPass::Done {
            at: "2025-01-02T03:04:05Z".into(),
            managed: 6,
            in_place: 1,
            failed: 5,
            failed_keys: ["a: KPS.6004", "b: conflict", "c: write", "d: x", "e: y"]
                .map(String::from)
                .to_vec(),
        };
        assert_eq!(
            status_text(Some(&bad), 0, true),
            "6 managed, 1 in place, 5 failed (a: KPS.6004, b: conflict, c: write, +2 more); \
             last pass 2025-01-02T03:04:05Z; drift 0; manifest edit rejected, last good one in force (see log)"
        );
        let failed = LastPass::Failed {
            at: "T".into(),
            message: "cannot read the state file".into(),
        };
        assert_eq!(
            status_text(Some(&failed), 1, false),
            "last pass failed at T: cannot read the state file; drift 1"
        );
    }
}
