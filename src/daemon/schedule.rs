//! When the daemon's next pass is due: the retry backoff, the debouncers, and the deadlines the
//! loop sleeps until. Pure values and `tokio::time::Instant`, so paused-time tests drive them.

use std::time::Duration;

use tokio::time::Instant;

/// First retry delay after a failed pass; doubles up to `interval`.
pub const FIRST_RETRY: Duration = Duration::from_secs(5);

/// Each retry waits up to this fraction of its step longer, drawn at random: hosts that failed
/// together (a KPS outage) do not all retry in the same second.
pub const JITTER: f64 = 0.1;

/// Retry delay after failed passes: [`FIRST_RETRY`], doubling, plus up to [`JITTER`], never
/// above `interval`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    step: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { step: FIRST_RETRY }
    }
}

impl Backoff {
    /// The delay before the next retry; the step doubles after it.
    pub fn next(&mut self, cap: Duration) -> Duration {
        let step = self.step.min(cap);
        self.step = self.step.saturating_mul(2).min(cap.max(FIRST_RETRY));
        (step + step.mul_f64(JITTER * fastrand::f64())).min(cap)
    }

    pub fn reset(&mut self) {
        *self = Backoff::default();
    }
}

/// A deadline that events push back (`quiet` after the last one) but never past `max_wait`
/// after the first, so a folder written to without pause still gets looked at.
#[derive(Debug, Clone)]
pub struct Debouncer {
    quiet: Duration,
    max_wait: Duration,
    first: Option<Instant>,
    deadline: Option<Instant>,
}

impl Debouncer {
    pub fn new(quiet: Duration, max_wait: Duration) -> Debouncer {
        Debouncer {
            quiet,
            max_wait,
            first: None,
            deadline: None,
        }
    }

    /// For file drift: the first change schedules the pass `debounce` later, and more changes
    /// do not delay it.
    pub fn drift(debounce: Duration) -> Debouncer {
        Debouncer::new(debounce, debounce)
    }

    /// For the manifest: quiet time `debounce`, and at most eight of them in a row, so an editor
    /// that writes in several steps is read once, at the end.
    pub fn manifest(debounce: Duration) -> Debouncer {
        Debouncer::new(debounce, debounce * 8)
    }

    /// An event now.
    pub fn poke(&mut self) {
        let now = Instant::now();
        let first = *self.first.get_or_insert(now);
        self.deadline = Some((now + self.quiet).min(first + self.max_wait.max(self.quiet)));
    }

    /// Due immediately (a reload, a new manifest).
    pub fn fire_now(&mut self) {
        let now = Instant::now();
        self.first.get_or_insert(now);
        self.deadline = Some(now);
    }

    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Acted upon: nothing pending.
    pub fn clear(&mut self) {
        self.first = None;
        self.deadline = None;
    }
}

/// Everything the loop waits for besides events. Each deadline is `None` when nothing is
/// pending.
#[derive(Debug)]
pub(super) struct Schedule {
    /// The interval pass, the safety net.
    pub next_full: Instant,
    /// A transient failure's retry.
    pub retry_at: Option<Instant>,
    /// The next pass runs whatever the file events were (a reload, a new manifest, lost
    /// events).
    pub forced: bool,
    /// The next pass, after file events or a reload.
    pub soon: Debouncer,
    /// The next look at the manifest after events in its folder.
    pub manifest_check: Debouncer,
    /// File events came during a pass: look again after it.
    pub dirty: bool,
    /// A reload came during a pass: reload after it.
    pub reload: bool,
    /// Shutdown asked for while a pass ran: stop waiting for it then.
    pub stop_by: Option<Instant>,
}

impl Schedule {
    pub fn new(interval: Duration, debounce: Duration) -> Schedule {
        Schedule {
            next_full: Instant::now() + interval,
            retry_at: None,
            forced: false,
            soon: Debouncer::drift(debounce),
            manifest_check: Debouncer::manifest(debounce),
            dirty: false,
            reload: false,
            stop_by: None,
        }
    }

    /// A new manifest's `debounce`, from the next event on.
    pub fn set_debounce(&mut self, debounce: Duration) {
        for (d, fresh) in [
            (&mut self.soon, Debouncer::drift(debounce)),
            (&mut self.manifest_check, Debouncer::manifest(debounce)),
        ] {
            d.quiet = fresh.quiet;
            d.max_wait = fresh.max_wait;
        }
    }

    /// Run a pass as soon as nothing else is running, whatever the file events were.
    pub fn force_now(&mut self) {
        self.forced = true;
        self.soon.fire_now();
    }

    /// The earliest of the pending pass deadlines.
    pub fn pass_at(&self) -> Instant {
        [self.soon.deadline(), self.retry_at]
            .into_iter()
            .flatten()
            .fold(self.next_full, Instant::min)
    }
}

/// Sleep until `deadline`; never, for `None`.
pub(super) async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Each wait lies in [step, step + 10 %], capped at `cap`.
    fn assert_within(wait: Duration, step: Duration, cap: Duration) {
        let low = step.min(cap);
        let high = (step + step.mul_f64(JITTER)).min(cap);
        assert!(
            low <= wait && wait <= high,
            "{wait:?} not in [{low:?}, {high:?}]"
        );
    }

    #[test]
    fn backoff_doubles_from_five_seconds_to_the_interval_with_bounded_jitter() {
        for _ in 0..50 {
            let mut b = Backoff::default();
            let cap = Duration::from_secs(60);
            for step in [5, 10, 20, 40, 60, 60] {
                assert_within(b.next(cap), Duration::from_secs(step), cap);
            }
            b.reset();
            assert_within(b.next(cap), FIRST_RETRY, cap);
        }
    }

    #[test]
    fn backoff_never_exceeds_a_short_interval() {
        let mut b = Backoff::default();
        let cap = Duration::from_secs(1);
        assert_eq!(b.next(cap), cap);
        assert_eq!(b.next(cap), cap);
    }

    #[tokio::test(start_paused = true)]
    async fn debouncer_waits_for_quiet() {
        let mut d = Debouncer::new(250 * MS, 2000 * MS);
        assert_eq!(d.deadline(), None);
        let start = Instant::now();
        d.poke();
        tokio::time::advance(200 * MS).await;
        d.poke();
        assert_eq!(
            d.deadline(),
            Some(start + 450 * MS),
            "pushed back by the second event"
        );
        tokio::time::timeout(249 * MS, sleep_until(d.deadline()))
            .await
            .unwrap_err();
        tokio::time::timeout(2 * MS, sleep_until(d.deadline()))
            .await
            .unwrap();
        d.clear();
        assert_eq!(d.deadline(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn debouncer_fires_by_max_wait_under_a_steady_stream() {
        let mut d = Debouncer::new(250 * MS, 1000 * MS);
        let start = Instant::now();
        for _ in 0..20 {
            d.poke();
            tokio::time::advance(100 * MS).await;
        }
        assert_eq!(d.deadline(), Some(start + 1000 * MS));
    }

    #[tokio::test(start_paused = true)]
    async fn drift_debouncer_is_not_pushed_back() {
        let mut d = Debouncer::drift(250 * MS);
        let start = Instant::now();
        d.poke();
        tokio::time::advance(200 * MS).await;
        d.poke();
        assert_eq!(d.deadline(), Some(start + 250 * MS));
        d.fire_now();
        assert_eq!(d.deadline(), Some(start + 200 * MS));
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_debounce_applies_to_the_next_event() {
        let mut s = Schedule::new(Duration::from_secs(3600), 250 * MS);
        s.set_debounce(50 * MS);
        let start = Instant::now();
        s.soon.poke();
        s.manifest_check.poke();
        assert_eq!(s.soon.deadline(), Some(start + 50 * MS));
        assert_eq!(s.manifest_check.deadline(), Some(start + 50 * MS));
        assert_eq!(s.pass_at(), start + 50 * MS);
        s.soon.clear();
        s.retry_at = Some(start + 5000 * MS);
        assert_eq!(
            s.pass_at(),
            start + 5000 * MS,
            "the retry before the interval"
        );
    }
}
