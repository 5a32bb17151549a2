//! Credentials that expire (IAM tokens, ECS agency keys): fetched on first use, reused until a
//! margin before they expire, renewed then, and renewed at once after a 401.
//!
//! Invariants:
//! - one fetch at a time: concurrent requests wait for the fetch in flight instead of starting
//!   their own (the lock is held across it);
//! - the clock is `tokio::time::Instant`, measured from when the fetch started, never the host's
//!   wall clock against the issuer's: a host whose clock is off still renews on time;
//! - a renewal that fails while the old credential is still valid keeps the old one and tries
//!   again a little later, so a short IAM or metadata outage does not fail a run;
//! - a fetch that fails with nothing valid to fall back on is remembered until the next pass
//!   (`forget_failure`) or 401 (`invalidate`), so a pass with many batches reports one outage
//!   once instead of hammering the issuer once per batch.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::Mutex;
use tokio::time::Instant;

use super::AuthError;

/// When to renew: `min(lifetime × fraction, cap)` before the credential expires.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Renewal {
    pub fraction: f64,
    pub cap: Duration,
}

impl Renewal {
    /// IAM tokens (24 h): renew 5 minutes before expiry, or at 90 % of a shorter lifetime.
    /// Five minutes covers a request in flight with retries (KPS budget: 60 s) and clock
    /// drift during the token's life, and a 24 h token is still used for 23 h 55 min.
    pub const IAM: Renewal = Renewal {
        fraction: 0.1,
        cap: Duration::from_secs(5 * 60),
    };

    /// ECS agency keys: renew when fewer than 40 minutes remain (the SDK's rule), or after a
    /// third of a lifetime shorter than an hour, so that short-lived keys are not fetched again
    /// for every request.
    pub const ECS: Renewal = Renewal {
        fraction: 2.0 / 3.0,
        cap: Duration::from_secs(40 * 60),
    };

    /// How long before expiry to renew a credential that lives `lifetime`.
    pub fn margin(&self, lifetime: Duration) -> Duration {
        lifetime.mul_f64(self.fraction).min(self.cap)
    }
}

/// A freshly fetched credential and how long it lives from the moment the fetch started.
#[derive(Debug)]
pub struct Fetched<T> {
    pub value: T,
    pub lifetime: Duration,
}

/// After a failed renewal with the old credential still valid, try again after this long (or
/// half the time left, if sooner).
const RETRY_RENEWAL_AFTER: Duration = Duration::from_secs(30);

struct Held<T> {
    value: Arc<T>,
    renew_at: Instant,
    expires_at: Instant,
}

struct State<T> {
    held: Option<Held<T>>,
    /// The server refused the held credential: do not use it again.
    stale: bool,
    failed: Option<Arc<AuthError>>,
}

/// See the module docs. `what` names the credential in logs ("IAM token").
pub struct Renewing<T> {
    what: &'static str,
    policy: Renewal,
    state: Mutex<State<T>>,
}

impl<T> std::fmt::Debug for Renewing<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Renewing")
            .field("what", &self.what)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl<T> Renewing<T> {
    pub fn new(what: &'static str, policy: Renewal) -> Renewing<T> {
        Renewing {
            what,
            policy,
            state: Mutex::new(State {
                held: None,
                stale: false,
                failed: None,
            }),
        }
    }

    /// The current credential, fetching or renewing it with `fetch` when due.
    pub async fn get<F, Fut>(&self, fetch: F) -> Result<Arc<T>, AuthError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Fetched<T>, AuthError>>,
    {
        let mut state = self.state.lock().await;
        let now = Instant::now();
        if let Some(held) = &state.held
            && !state.stale
            && now < held.renew_at
        {
            return Ok(held.value.clone());
        }
        if let Some(failed) = &state.failed {
            return Err(AuthError::Failed(failed.clone()));
        }
        match fetch().await {
            Ok(fetched) => {
                let margin = self.policy.margin(fetched.lifetime);
                let value = Arc::new(fetched.value);
                state.held = Some(Held {
                    value: value.clone(),
                    renew_at: now + fetched.lifetime.saturating_sub(margin),
                    expires_at: now + fetched.lifetime,
                });
                state.stale = false;
                tracing::info!(
                    credential = self.what,
                    lifetime_s = fetched.lifetime.as_secs(),
                    renew_in_s = fetched.lifetime.saturating_sub(margin).as_secs(),
                    "obtained new credentials"
                );
                Ok(value)
            }
            Err(error) => {
                let later = Instant::now();
                let stale = state.stale;
                if let Some(held) = state.held.as_mut()
                    && !stale
                    && later < held.expires_at
                {
                    let left = held.expires_at - later;
                    held.renew_at = later + RETRY_RENEWAL_AFTER.min(left / 2);
                    tracing::warn!(
                        credential = self.what,
                        expires_in_s = left.as_secs(),
                        "{error}; renewing failed, keeping the current credentials while they last"
                    );
                    return Ok(held.value.clone());
                }
                let error = Arc::new(error);
                state.failed = Some(error.clone());
                Err(AuthError::Failed(error))
            }
        }
    }

    /// The server refused the credential (401): fetch a new one on the next `get`.
    pub async fn invalidate(&self) {
        let mut state = self.state.lock().await;
        state.stale = true;
        state.failed = None;
    }

    /// A new pass: a fetch that failed in the last one is tried again.
    pub async fn forget_failure(&self) {
        self.state.lock().await.failed = None;
    }
}

/// `expires_at` as IAM and the metadata service write it: `2026-11-26T09:05:22.701000Z`, any
/// number of fractional digits, `Z` or `+00:00` (or nothing: UTC is meant).
pub fn parse_timestamp(text: &str) -> Option<SystemTime> {
    let text = text.trim();
    let text = text.strip_suffix("+00:00").unwrap_or(text);
    humantime::parse_rfc3339_weak(text).ok()
}

/// How long a credential lives: from `issued_at` to `expires_at` when the issuer gives both
/// (two readings of its own clock, so ours does not matter), else from `now`. Zero when it
/// has already expired.
pub fn lifetime(
    issued_at: Option<SystemTime>,
    expires_at: SystemTime,
    now: SystemTime,
) -> Duration {
    let from = issued_at.filter(|i| *i <= expires_at).unwrap_or(now);
    expires_at.duration_since(from).unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    const HOUR: Duration = Duration::from_secs(3600);

    fn ok(value: u32, lifetime: Duration) -> Result<Fetched<u32>, AuthError> {
        Ok(Fetched { value, lifetime })
    }

    fn down() -> Result<Fetched<u32>, AuthError> {
        Err(AuthError::Unusable {
            source_desc: "test issuer".into(),
            what: "down".into(),
        })
    }

    /// A fetch that counts its calls and returns the call number.
    fn counting(
        calls: &AtomicU32,
        lifetime: Duration,
    ) -> impl Future<Output = Result<Fetched<u32>, AuthError>> {
        let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
        async move { ok(n, lifetime) }
    }

    #[test]
    fn margins() {
        assert_eq!(Renewal::IAM.margin(24 * HOUR), Duration::from_secs(300));
        assert_eq!(
            Renewal::IAM.margin(Duration::from_secs(2)),
            Duration::from_millis(200)
        );
        assert_eq!(Renewal::ECS.margin(HOUR), Duration::from_secs(40 * 60));
        assert_eq!(Renewal::ECS.margin(6 * HOUR), Duration::from_secs(40 * 60));
        let short = Renewal::ECS.margin(Duration::from_secs(3));
        assert!(
            short > Duration::from_millis(1999) && short <= Duration::from_secs(2),
            "{short:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn iam_token_is_reused_until_five_minutes_before_expiry_then_renewed() {
        let cache = Renewing::new("test", Renewal::IAM);
        let calls = AtomicU32::new(0);
        assert_eq!(*cache.get(|| counting(&calls, 24 * HOUR)).await.unwrap(), 1);
        tokio::time::advance(24 * HOUR - Duration::from_secs(301)).await;
        assert_eq!(*cache.get(|| counting(&calls, 24 * HOUR)).await.unwrap(), 1);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(*cache.get(|| counting(&calls, 24 * HOUR)).await.unwrap(), 2);
        assert_eq!(*cache.get(|| counting(&calls, 24 * HOUR)).await.unwrap(), 2);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn ecs_keys_of_an_hour_are_renewed_after_twenty_minutes() {
        let cache = Renewing::new("test", Renewal::ECS);
        let calls = AtomicU32::new(0);
        cache.get(|| counting(&calls, HOUR)).await.unwrap();
        tokio::time::advance(Duration::from_secs(20 * 60 - 1)).await;
        assert_eq!(*cache.get(|| counting(&calls, HOUR)).await.unwrap(), 1);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(*cache.get(|| counting(&calls, HOUR)).await.unwrap(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_401_forces_a_new_fetch_even_when_fresh() {
        let cache = Renewing::new("test", Renewal::IAM);
        let calls = AtomicU32::new(0);
        cache.get(|| counting(&calls, 24 * HOUR)).await.unwrap();
        cache.invalidate().await;
        assert_eq!(*cache.get(|| counting(&calls, 24 * HOUR)).await.unwrap(), 2);
        assert_eq!(*cache.get(|| counting(&calls, 24 * HOUR)).await.unwrap(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_renewal_keeps_the_old_credential_while_it_lasts_and_retries_later() {
        let cache = Renewing::new("test", Renewal::IAM);
        let calls = AtomicU32::new(0);
        cache.get(|| counting(&calls, 24 * HOUR)).await.unwrap();
        tokio::time::advance(24 * HOUR - Duration::from_secs(200)).await;
        let failing = AtomicU32::new(0);
        let fail = || {
            failing.fetch_add(1, Ordering::SeqCst);
            async { down() }
        };
        assert_eq!(*cache.get(fail).await.unwrap(), 1, "old token still valid");
        // No new attempt for a while: the issuer is not hammered once per request.
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(*cache.get(fail).await.unwrap(), 1);
        assert_eq!(failing.load(Ordering::SeqCst), 1);
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(*cache.get(fail).await.unwrap(), 1);
        assert_eq!(failing.load(Ordering::SeqCst), 2);
        tokio::time::advance(Duration::from_secs(31)).await;
        assert_eq!(*cache.get(|| counting(&calls, 24 * HOUR)).await.unwrap(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn an_expired_credential_is_never_returned_when_renewal_fails() {
        let cache = Renewing::new("test", Renewal::IAM);
        let calls = AtomicU32::new(0);
        cache
            .get(|| counting(&calls, Duration::from_secs(2)))
            .await
            .unwrap();
        tokio::time::advance(Duration::from_secs(3)).await;
        assert!(cache.get(|| async { down() }).await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_401d_credential_is_not_returned_when_renewal_fails() {
        let cache = Renewing::new("test", Renewal::IAM);
        let calls = AtomicU32::new(0);
        cache.get(|| counting(&calls, 24 * HOUR)).await.unwrap();
        cache.invalidate().await;
        assert!(cache.get(|| async { down() }).await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_is_reported_once_per_pass_then_tried_again() {
        let cache: Renewing<u32> = Renewing::new("test", Renewal::IAM);
        let attempts = AtomicU32::new(0);
        let fail = || {
            attempts.fetch_add(1, Ordering::SeqCst);
            async { down() }
        };
        let first = cache.get(fail).await.unwrap_err();
        assert!(first.to_string().contains("test issuer: down"), "{first}");
        let second = cache.get(fail).await.unwrap_err();
        assert_eq!(second.to_string(), first.to_string());
        assert_eq!(attempts.load(Ordering::SeqCst), 1);
        cache.forget_failure().await;
        let calls = AtomicU32::new(0);
        assert_eq!(*cache.get(|| counting(&calls, HOUR)).await.unwrap(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_requests_share_one_fetch() {
        let cache = Arc::new(Renewing::new("test", Renewal::IAM));
        let calls = Arc::new(AtomicU32::new(0));
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let (cache, calls) = (cache.clone(), calls.clone());
                tokio::spawn(async move {
                    *cache
                        .get(|| async {
                            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            ok(n, HOUR)
                        })
                        .await
                        .unwrap()
                })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap(), 1);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn lifetime_counts_from_the_start_of_the_fetch() {
        // A slow issuer: the token's clock started when we asked, not when it answered.
        let cache = Renewing::new("test", Renewal::IAM);
        let calls = AtomicU32::new(0);
        cache
            .get(|| async {
                tokio::time::sleep(Duration::from_secs(1)).await;
                counting(&calls, Duration::from_secs(10)).await
            })
            .await
            .unwrap();
        tokio::time::advance(Duration::from_millis(7_900)).await;
        assert_eq!(
            *cache
                .get(|| counting(&calls, Duration::from_secs(10)))
                .await
                .unwrap(),
            1
        );
        tokio::time::advance(Duration::from_millis(200)).await;
        assert_eq!(
            *cache
                .get(|| counting(&calls, Duration::from_secs(10)))
                .await
                .unwrap(),
            2
        );
    }

    #[test]
    fn timestamps_as_iam_and_metadata_write_them() {
        let expected = humantime::parse_rfc3339("2026-11-26T09:05:22.701Z").unwrap();
        for text in [
            "2026-11-26T09:05:22.701000Z",
            "2026-11-26T09:05:22.701Z",
            " 2026-11-26T09:05:22.701000Z\n",
            "2026-11-26T09:05:22.701000+00:00",
            "2026-11-26T09:05:22.701000",
        ] {
            assert_eq!(parse_timestamp(text), Some(expected), "{text:?}");
        }
        assert_eq!(
            parse_timestamp("2026-11-25T10:30:00Z"),
            Some(humantime::parse_rfc3339("2026-11-25T10:30:00Z").unwrap())
        );
        for bad in [
            "",
            "tomorrow",
            "2026-13-01T00:00:00Z",
            "2026-11-26T09:05:22+08:00",
        ] {
            assert_eq!(parse_timestamp(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn lifetime_uses_the_issuers_two_stamps_when_it_has_both() {
        let issued = parse_timestamp("2026-11-25T09:05:22.701000Z").unwrap();
        let expires = parse_timestamp("2026-11-26T09:05:22.701000Z").unwrap();
        // Our clock is two hours off: irrelevant when issued_at is known.
        let skewed_now = issued + 2 * HOUR;
        assert_eq!(lifetime(Some(issued), expires, skewed_now), 24 * HOUR);
        assert_eq!(lifetime(None, expires, skewed_now), 22 * HOUR);
        // issued_at after expires_at is nonsense: fall back to now.
        assert_eq!(
            lifetime(Some(expires + HOUR), expires, skewed_now),
            22 * HOUR
        );
        assert_eq!(lifetime(None, expires, expires + HOUR), Duration::ZERO);
    }
}
