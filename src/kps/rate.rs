//! How fast this client may call KPS: an adaptive rate limiter shared by every request of one
//! client, so a fleet that shares one KPS budget backs off together instead of in lock-step.
//!
//! The shape follows the AWS SDKs' adaptive retry mode: a token bucket (one token, refilled at
//! `rate` per second) that is off until the first throttle, with additive increase and
//! multiplicative decrease (AIMD) once it is on:
//! - **slow start**: until the first 429, at most `window` requests are in flight, starting at 1
//!   and growing by one with every success (TCP's slow start: the window doubles each round
//!   trip), so a host alone reaches full concurrency within two round trips (the listing, then
//!   two exports, then four) while 30 hosts started together send one call each, then two, not
//!   `concurrency` each, before they learn KPS is busy;
//! - **a 429** ends slow start and turns pacing on at `BETA` times the rate this client was
//!   actually getting served (at most once per `Retry-After` period, since the calls already in
//!   flight answer 429 for the same overload), and holds every request until `Retry-After` has
//!   passed, plus a jitter of up to one pacing step so the fleet does not come back in step;
//! - **while paced**, the rate grows by `ALPHA` calls/s per second, never above
//!   `settings.max_rps` when set (a hard ceiling from the first request).
//!
//! Invariants: the lock is never held across an `.await`; waiting never spins (it sleeps until
//! the next instant a request may go, or until a request in flight ends).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::Notify;

/// Multiplicative decrease on a throttle.
const BETA: f64 = 0.5;
/// Additive increase, calls/s gained per second while paced. Small, because a fleet adds it up:
/// 30 hosts regain 1.5 calls/s per second together.
const ALPHA: f64 = 0.05;
/// Slow start: successes per step of the window. One, as TCP: at two (half TCP's pace) a full
/// sync spent about 1.5 round trips more reaching `concurrency` 4, 6 % of its ideal time.
const GROWTH: usize = 1;
/// Never slower than this (one call every 4 s).
const MIN_RATE: f64 = 0.25;
/// The slow-start window stops mattering past this (the client's own concurrency rules).
const MAX_WINDOW: usize = 64;
/// The longest `Retry-After` honoured; beyond it the retry budget decides.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// Parse a `Retry-After` value: delay-seconds or an HTTP-date (RFC 9110 §10.2.3). A date in the
/// past means "now"; anything unreadable is ignored (`None`). Capped at [`MAX_RETRY_AFTER`].
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    let delay = if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // A huge number of seconds is still "a long time", not an error.
        Duration::from_secs(value.parse::<u64>().unwrap_or(u64::MAX))
    } else {
        let at = httpdate::parse_http_date(value).ok()?;
        at.duration_since(now).unwrap_or(Duration::ZERO)
    };
    Some(delay.min(MAX_RETRY_AFTER))
}

/// The limiter. One per client; every request goes through [`Limiter::acquire`].
#[derive(Debug)]
pub struct Limiter {
    inner: Mutex<Inner>,
    /// Wakes requests waiting for a slow-start slot when one ends.
    freed: Notify,
}

#[derive(Debug)]
struct Inner {
    /// `settings.max_rps`: a hard ceiling, from the first request.
    ceiling: Option<f64>,
    /// Calls/s while paced; `None` until the first throttle (and no ceiling).
    rate: Option<f64>,
    /// Slow start: requests allowed in flight; `None` once it is over.
    window: Option<usize>,
    in_flight: usize,
    /// Successes so far (slow start only).
    successes: usize,
    /// The earliest instant the next request may start.
    next: Instant,
    /// When the rate was last raised (additive increase is by elapsed time).
    raised: Instant,
    /// The last decrease: another 429 before `Retry-After` is over is the same overload.
    calm_until: Option<Instant>,
    /// Successes in the last second: the rate KPS was actually serving us.
    served: VecDeque<Instant>,
}

/// Held while one request is in flight; tell the limiter how it ended, or drop it (an error
/// that says nothing about KPS's load).
#[derive(Debug)]
pub struct Permit<'a> {
    limiter: &'a Limiter,
    done: bool,
}

impl Permit<'_> {
    /// KPS served the request.
    pub fn success(mut self) {
        self.done = true;
        self.limiter.success(Instant::now());
    }

    /// KPS answered 429 (or APIG.0308), asking to wait `retry_after` if it said so.
    pub fn throttled(mut self, retry_after: Option<Duration>) {
        self.done = true;
        self.limiter
            .throttled(Instant::now(), retry_after, fastrand::f64());
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.limiter.release();
        }
    }
}

impl Limiter {
    /// `max_rps`: the manifest's `settings.max_rps`, a hard ceiling.
    pub fn new(max_rps: Option<f64>) -> Limiter {
        let now = Instant::now();
        Limiter {
            inner: Mutex::new(Inner {
                ceiling: max_rps,
                rate: max_rps,
                window: Some(1),
                in_flight: 0,
                successes: 0,
                next: now,
                raised: now,
                calm_until: None,
                served: VecDeque::new(),
            }),
            freed: Notify::new(),
        }
    }

    /// Wait until a request may start, and reserve its place.
    pub async fn acquire(&self) -> Permit<'_> {
        loop {
            let freed = self.freed.notified();
            match self.try_start(Instant::now()) {
                Ok(()) => {
                    return Permit {
                        limiter: self,
                        done: false,
                    };
                }
                Err(Some(wait)) => tokio::time::sleep(wait).await,
                // Window full: wait for a request to end (or a second, should a wake be lost).
                Err(None) => {
                    let _ = tokio::time::timeout(Duration::from_secs(1), freed).await;
                }
            }
        }
    }

    /// Start now, or say how long to wait (`None`: until a request in flight ends).
    fn try_start(&self, now: Instant) -> Result<(), Option<Duration>> {
        let mut s = self.lock();
        s.raise(now);
        if s.next > now {
            return Err(Some(s.next - now));
        }
        if s.window.is_some_and(|w| s.in_flight >= w) {
            return Err(None);
        }
        s.in_flight += 1;
        if let Some(rate) = s.rate {
            s.next = now + Duration::from_secs_f64(1.0 / rate);
        }
        Ok(())
    }

    fn success(&self, now: Instant) {
        let mut s = self.lock();
        s.in_flight = s.in_flight.saturating_sub(1);
        s.served.push_back(now);
        while s
            .served
            .front()
            .is_some_and(|t| now.duration_since(*t) > Duration::from_secs(1))
        {
            s.served.pop_front();
        }
        if s.window.is_some() {
            s.successes += 1;
            let w = 1 + s.successes / GROWTH;
            s.window = (w < MAX_WINDOW).then_some(w);
        }
        drop(s);
        self.freed.notify_waiters();
    }

    fn throttled(&self, now: Instant, retry_after: Option<Duration>, random: f64) {
        let mut s = self.lock();
        s.in_flight = s.in_flight.saturating_sub(1);
        s.window = None;
        let wait = retry_after.unwrap_or(Duration::from_secs(1));
        if s.calm_until.is_none_or(|c| now >= c) {
            s.raise(now);
            let served = s.served.len() as f64;
            let current = s.rate.map_or(served, |r| r.min(served.max(MIN_RATE)));
            let rate = (current * BETA).max(MIN_RATE);
            s.rate = Some(s.ceiling.map_or(rate, |c| rate.min(c)));
            s.raised = now;
            s.calm_until = Some(now + wait);
            let rate = s.rate.expect("just set");
            tracing::debug!(
                rate,
                retry_after_ms = wait.as_millis() as u64,
                "KPS throttles: slowing down"
            );
            let jitter = Duration::from_secs_f64(random / rate);
            s.next = s.next.max(now + wait + jitter);
        } else {
            s.next = s.next.max(now + wait);
        }
        drop(s);
        self.freed.notify_waiters();
    }

    fn release(&self) {
        let mut s = self.lock();
        s.in_flight = s.in_flight.saturating_sub(1);
        drop(s);
        self.freed.notify_waiters();
    }

    /// The current paced rate, for tests and logs (`None`: not paced).
    pub fn rate(&self) -> Option<f64> {
        self.lock().rate
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Inner {
    /// Additive increase by the time since the last raise, never above the ceiling. Only once
    /// throttled: before that the rate is the ceiling or none.
    fn raise(&mut self, now: Instant) {
        if self.calm_until.is_none() {
            return;
        }
        let Some(rate) = self.rate else { return };
        let gained = ALPHA * now.duration_since(self.raised).as_secs_f64();
        let raised = rate + gained;
        self.rate = Some(self.ceiling.map_or(raised, |c| raised.min(c)));
        self.raised = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_in_seconds_and_as_an_http_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after("3", now), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("99999999999999999999999", now),
            Some(MAX_RETRY_AFTER)
        );
        let later = httpdate::fmt_http_date(now + Duration::from_secs(7));
        assert_eq!(parse_retry_after(&later, now), Some(Duration::from_secs(7)));
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(parse_retry_after(&earlier, now), Some(Duration::ZERO));
        let far = httpdate::fmt_http_date(now + Duration::from_secs(3600));
        assert_eq!(parse_retry_after(&far, now), Some(MAX_RETRY_AFTER));
        for junk in ["", "-1", "1.5", "soon", "Mon, 99 Foo 2024 00:00:00 GMT"] {
            assert_eq!(parse_retry_after(junk, now), None, "{junk:?}");
        }
    }

    #[test]
    fn slow_start_then_unpaced_until_the_first_throttle() {
        let l = Limiter::new(None);
        let t0 = Instant::now();
        assert_eq!(l.try_start(t0), Ok(()));
        assert_eq!(l.try_start(t0), Err(None), "one in flight at first");
        l.success(t0);
        assert_eq!(l.try_start(t0), Ok(()));
        assert_eq!(
            l.try_start(t0),
            Ok(()),
            "one success: the window grew to two"
        );
        assert_eq!(l.try_start(t0), Err(None), "and no further");
        l.success(t0);
        l.success(t0);
        for _ in 0..4 {
            assert_eq!(l.try_start(t0), Ok(()), "three successes: four in flight");
        }
        assert_eq!(l.try_start(t0), Err(None));
        assert_eq!(l.rate(), None, "no pacing before a throttle");
    }

    #[test]
    fn a_throttle_halves_the_served_rate_and_holds_for_retry_after() {
        let l = Limiter::new(None);
        let t0 = Instant::now();
        for i in 0..8 {
            let t = t0 + Duration::from_millis(100 * i);
            l.try_start(t).unwrap();
            l.success(t);
        }
        let t = t0 + Duration::from_millis(800);
        l.try_start(t).unwrap();
        l.throttled(t, Some(Duration::from_secs(2)), 0.0);
        // 8 served in the last second -> 4 calls/s.
        assert_eq!(l.rate(), Some(4.0));
        assert_eq!(
            l.try_start(t + Duration::from_millis(1999)),
            Err(Some(Duration::from_millis(1))),
            "held for Retry-After"
        );
        // A second 429 for the same overload does not halve again (the check above raised
        // the rate by ALPHA per second since the throttle).
        l.throttled(t + Duration::from_millis(1500), None, 0.0);
        assert_eq!(l.rate(), Some(4.0 + ALPHA * 1.999));
        // That 429 still holds for its own (default) second; then paced, growing by ALPHA
        // per second: 4.25 calls/s at t + 2.5 s.
        let t2 = t + Duration::from_millis(2500);
        l.try_start(t2).unwrap();
        let rate = l.rate().unwrap();
        assert!((rate - (4.0 + ALPHA * 2.5)).abs() < 1e-9, "{rate}");
        let step = Duration::from_secs_f64(1.0 / rate);
        assert!(l.try_start(t2 + step - Duration::from_millis(5)).is_err());
        assert!(l.try_start(t2 + step).is_ok());
    }

    #[test]
    fn never_below_the_floor_and_never_above_max_rps() {
        let l = Limiter::new(Some(2.0));
        let t0 = Instant::now();
        l.try_start(t0).unwrap();
        assert!(
            l.try_start(t0 + Duration::from_millis(100)).is_err(),
            "max_rps paces from the first call"
        );
        l.throttled(t0, Some(Duration::ZERO), 0.0);
        assert_eq!(l.rate(), Some(MIN_RATE), "nothing served yet: the floor");
        let later = t0 + Duration::from_secs(3600);
        let _ = l.try_start(later);
        assert_eq!(
            l.rate(),
            Some(2.0),
            "grows back to the ceiling, not past it"
        );
    }

    #[test]
    fn a_dropped_permit_frees_its_slot() {
        let l = Limiter::new(None);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            let p = l.acquire().await;
            drop(p);
            let p = tokio::time::timeout(Duration::from_millis(100), l.acquire())
                .await
                .expect("the slot was freed");
            p.success();
        });
    }
}
