//! The live progress line of `kps-sync reconcile` at a terminal: keys done out of the keys to
//! export, exports in flight, and an ETA (`indicatif`).
//!
//! Invariant: it draws only when `main` enabled it, which it does only when stderr is a terminal
//! and logs are text; everywhere else (cron, systemd, JSON logs, the daemon, tests) every method
//! is a no-op and nothing is written. The line names no key and no path, only counts.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Turn the progress line on for this process (main does, for a terminal and text logs).
pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// A progress line, or nothing. Cloned into each export task.
#[derive(Clone, Default)]
pub struct Progress {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    bar: ProgressBar,
    in_flight: AtomicUsize,
}

impl Progress {
    /// A line if [`enable`] turned it on, else a no-op.
    pub fn if_enabled() -> Progress {
        if !ENABLED.load(Ordering::Relaxed) {
            return Progress::default();
        }
        let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template(
                "exporting {pos}/{len} keys [{wide_bar}] {msg}, ETA {eta}",
            )
            .expect("the template is valid")
            .progress_chars("=> "),
        );
        Progress {
            inner: Some(Arc::new(Inner {
                bar,
                in_flight: AtomicUsize::new(0),
            })),
        }
    }

    /// The pass knows how many keys it will export; the line appears.
    pub fn set_total(&self, keys: usize) {
        if let Some(i) = &self.inner {
            i.bar.set_length(keys as u64);
            i.bar.set_message("0 exports in flight");
            i.bar.enable_steady_tick(Duration::from_millis(200));
        }
    }

    /// A batch export call started.
    pub fn batch_started(&self) {
        if let Some(i) = &self.inner {
            let n = i.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
            i.bar.set_message(format!("{n} exports in flight"));
        }
    }

    /// A batch of `keys` came back (exported or failed).
    pub fn batch_done(&self, keys: usize) {
        if let Some(i) = &self.inner {
            let n = i
                .in_flight
                .fetch_sub(1, Ordering::Relaxed)
                .saturating_sub(1);
            i.bar.set_message(format!("{n} exports in flight"));
            i.bar.inc(keys as u64);
        }
    }

    /// Remove the line before the summary is printed.
    pub fn finish(&self) {
        if let Some(i) = &self.inner {
            i.bar.finish_and_clear();
        }
    }
}
