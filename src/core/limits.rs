//! Per-minute limits (requests and tokens) and concurrency caps, per key and per user.
//!
//! Each window is a sliding-window counter, O(1) in time and memory: the estimate is
//! `previous · (1 − elapsed/W) + current`, and an amount is admitted while the estimate plus
//! the amount stays within the limit. Unlike a fixed window, a burst at the boundary cannot
//! pass twice the limit. Each key and each user has its own lock; none is shared.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

const WINDOW_MS: u64 = 60_000;

/// Milliseconds on a monotonic clock shared by the whole process.
pub fn monotonic_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = START.get_or_init(Instant::now);
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Which limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitKind {
    Requests,
    Tokens,
    Concurrency,
}

impl LimitKind {
    pub fn describe(self) -> &'static str {
        match self {
            LimitKind::Requests => "requests per minute",
            LimitKind::Tokens => "tokens per minute",
            LimitKind::Concurrency => "concurrent requests",
        }
    }
}

/// Whose limit: the key's own, or its user's (summed over the user's keys).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitScope {
    Key,
    User,
}

impl LimitScope {
    pub fn describe(self) -> &'static str {
        match self {
            LimitScope::Key => "key",
            LimitScope::User => "user",
        }
    }
}

/// Where a limit stands after an admitted call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateStatus {
    pub limit: u64,
    pub remaining: u64,
    /// Until the window is back to its full allowance.
    pub reset: Duration,
}

impl RateStatus {
    /// The tighter of two figures (less remaining).
    fn tighter(a: Option<RateStatus>, b: Option<RateStatus>) -> Option<RateStatus> {
        match (a, b) {
            (Some(a), Some(b)) => Some(if b.remaining < a.remaining { b } else { a }),
            (a, b) => a.or(b),
        }
    }
}

/// The per-minute figures a response reports (`x-ratelimit-*`): the tighter of key and user.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateFigures {
    pub requests: Option<RateStatus>,
    pub tokens: Option<RateStatus>,
}

/// The limits that apply at one scope; `None` is unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LimitSpec {
    pub rpm: Option<u32>,
    pub tpm: Option<u64>,
    pub concurrent: Option<u32>,
}

impl LimitSpec {
    pub fn is_unlimited(&self) -> bool {
        self.rpm.is_none() && self.tpm.is_none() && self.concurrent.is_none()
    }
}

/// A limit refused the call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub scope: LimitScope,
    pub kind: LimitKind,
    pub limit: u64,
    /// How much the call needed (1 request, the reserved tokens, 1 slot).
    pub requested: u64,
    /// `None`: the call can never fit (it alone needs more than the limit).
    pub retry_after: Option<Duration>,
}

/// The amounts of one key's (or user's) current and previous one-minute windows.
#[derive(Debug, Default)]
pub struct SlidingWindow {
    start_ms: u64,
    current: u64,
    previous: u64,
}

impl SlidingWindow {
    /// Whether `amount` fits under `limit` at `now_ms`; on `Err`, how long until it does
    /// (`None`: never, the amount alone is over the limit). Takes nothing.
    pub fn check(&mut self, limit: u64, amount: u64, now_ms: u64) -> Result<(), Option<Duration>> {
        self.advance(now_ms);
        let elapsed = now_ms - self.start_ms;
        if self.estimate(elapsed) + amount as f64 <= limit as f64 {
            Ok(())
        } else if amount > limit {
            Err(None)
        } else {
            Err(Some(self.retry_after(limit as f64, amount as f64, elapsed)))
        }
    }

    /// Counts `amount` in the current window and reports the standing.
    pub fn take(&mut self, limit: u64, amount: u64, now_ms: u64) -> RateStatus {
        self.advance(now_ms);
        self.current = self.current.saturating_add(amount);
        self.status(limit, now_ms)
    }

    /// Admits `amount` if it fits (`check` then `take`).
    pub fn try_acquire(
        &mut self,
        limit: u64,
        amount: u64,
        now_ms: u64,
    ) -> Result<RateStatus, Option<Duration>> {
        self.check(limit, amount, now_ms)?;
        Ok(self.take(limit, amount, now_ms))
    }

    /// Corrects the current window by `delta` (a reservation settled at its real size).
    pub fn adjust(&mut self, delta: i64, now_ms: u64) {
        self.advance(now_ms);
        self.current = self.current.saturating_add_signed(delta);
    }

    pub fn status(&mut self, limit: u64, now_ms: u64) -> RateStatus {
        self.advance(now_ms);
        let elapsed = now_ms - self.start_ms;
        let used = self.estimate(elapsed);
        // Full allowance is back once this window's amounts have slid out too.
        let reset_ms = if self.current > 0 {
            2 * WINDOW_MS - elapsed
        } else if self.previous > 0 {
            WINDOW_MS - elapsed
        } else {
            0
        };
        RateStatus {
            limit,
            remaining: (limit as f64 - used).max(0.0).floor() as u64,
            reset: Duration::from_millis(reset_ms),
        }
    }

    fn advance(&mut self, now_ms: u64) {
        let start = now_ms - now_ms % WINDOW_MS;
        if start == self.start_ms {
            return;
        }
        self.previous = if start == self.start_ms + WINDOW_MS {
            self.current
        } else {
            0
        };
        self.current = 0;
        self.start_ms = start;
    }

    fn estimate(&self, elapsed_ms: u64) -> f64 {
        let weight = (WINDOW_MS - elapsed_ms) as f64 / WINDOW_MS as f64;
        self.previous as f64 * weight + self.current as f64
    }

    /// The shortest wait after which the estimate leaves room for `amount`.
    fn retry_after(&self, limit: f64, amount: f64, elapsed_ms: u64) -> Duration {
        let window = WINDOW_MS as f64;
        let current = self.current as f64;
        let previous = self.previous as f64;
        // Still in this window, once enough of the previous window has slid out.
        if current + amount <= limit && previous > 0.0 {
            let at = ceil_ms(window * (1.0 - (limit - current - amount) / previous));
            if at < WINDOW_MS {
                return Duration::from_millis(at.saturating_sub(elapsed_ms).max(1));
            }
        }
        // In the next window, once enough of this one has slid out.
        let into_next = if current > 0.0 && limit - amount < current {
            ceil_ms(window * (1.0 - (limit - amount) / current))
        } else {
            0
        };
        Duration::from_millis(WINDOW_MS - elapsed_ms + into_next)
    }
}

/// Rounds up to whole milliseconds, ignoring float noise (20000.000000000004 is 20000).
fn ceil_ms(ms: f64) -> u64 {
    (ms - 1e-6).ceil().max(0.0) as u64
}

#[derive(Debug, Default)]
struct Windows {
    requests: SlidingWindow,
    tokens: SlidingWindow,
}

/// The limits state of one key or one user.
#[derive(Debug, Default)]
pub struct Limiter {
    windows: Mutex<Windows>,
    in_flight: AtomicU32,
}

/// What one limiter granted a call, to be given back or corrected when it settles.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Grant {
    pub slot: bool,
    pub tokens: u64,
    pub requests: Option<RateStatus>,
    pub token_status: Option<RateStatus>,
}

impl Limiter {
    /// Admits one call that may use `tokens`, under `spec`; all or nothing.
    pub fn acquire(
        &self,
        spec: &LimitSpec,
        scope: LimitScope,
        tokens: u64,
    ) -> Result<Grant, Refusal> {
        let mut grant = Grant::default();
        if let Some(cap) = spec.concurrent {
            self.in_flight
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < cap).then_some(n + 1)
                })
                .map_err(|_| Refusal {
                    scope,
                    kind: LimitKind::Concurrency,
                    limit: u64::from(cap),
                    requested: 1,
                    retry_after: Some(Duration::from_secs(1)),
                })?;
            grant.slot = true;
        }
        if spec.rpm.is_none() && spec.tpm.is_none() {
            return Ok(grant);
        }
        let now = monotonic_ms();
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        let refuse = |kind, limit, requested, retry_after| Refusal {
            scope,
            kind,
            limit,
            requested,
            retry_after,
        };
        let checked = (|| {
            if let Some(rpm) = spec.rpm {
                windows
                    .requests
                    .check(u64::from(rpm), 1, now)
                    .map_err(|wait| refuse(LimitKind::Requests, u64::from(rpm), 1, wait))?;
            }
            if let Some(tpm) = spec.tpm {
                windows
                    .tokens
                    .check(tpm, tokens, now)
                    .map_err(|wait| refuse(LimitKind::Tokens, tpm, tokens, wait))?;
            }
            Ok(())
        })();
        if let Err(refusal) = checked {
            drop(windows);
            self.release(&grant, spec, 0);
            return Err(refusal);
        }
        if let Some(rpm) = spec.rpm {
            grant.requests = Some(windows.requests.take(u64::from(rpm), 1, now));
        }
        if let Some(tpm) = spec.tpm {
            grant.token_status = Some(windows.tokens.take(tpm, tokens, now));
            grant.tokens = tokens;
        }
        Ok(grant)
    }

    /// Ends a granted call: frees its slot, and corrects its tokens to `used`.
    pub fn release(&self, grant: &Grant, spec: &LimitSpec, used: u64) {
        if grant.slot {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
        if spec.tpm.is_some() && used != grant.tokens {
            let delta = i64::try_from(used).unwrap_or(i64::MAX)
                - i64::try_from(grant.tokens).unwrap_or(i64::MAX);
            let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
            windows.tokens.adjust(delta, monotonic_ms());
        }
    }

    /// The current figures under `spec`, without taking anything.
    pub fn figures(&self, spec: &LimitSpec) -> RateFigures {
        if spec.rpm.is_none() && spec.tpm.is_none() {
            return RateFigures::default();
        }
        let now = monotonic_ms();
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        RateFigures {
            requests: spec
                .rpm
                .map(|rpm| windows.requests.status(u64::from(rpm), now)),
            tokens: spec.tpm.map(|tpm| windows.tokens.status(tpm, now)),
        }
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Acquire)
    }
}

/// A reset time as OpenAI writes it: `120ms`, `12s`, `6m0s`.
pub fn format_reset(d: Duration) -> String {
    let secs = d.as_secs();
    if secs == 0 {
        format!("{}ms", d.subsec_millis())
    } else if secs < 60 {
        format!("{secs}s")
    } else {
        format!("{}m{}s", secs / 60, secs % 60)
    }
}

/// Whole seconds to wait, rounded up, at least one (`Retry-After`).
pub fn retry_after_secs(d: Duration) -> u64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
}

impl RateStatus {
    fn pairs(&self, kind: &str) -> [(String, String); 3] {
        [
            (format!("x-ratelimit-limit-{kind}"), self.limit.to_string()),
            (
                format!("x-ratelimit-remaining-{kind}"),
                self.remaining.to_string(),
            ),
            (
                format!("x-ratelimit-reset-{kind}"),
                format_reset(self.reset),
            ),
        ]
    }
}

impl Refusal {
    /// The figures a refusal reports, as (header or metadata name, value) pairs, both doors.
    pub fn pairs(&self) -> Vec<(String, String)> {
        let wait = self.retry_after.unwrap_or(Duration::from_secs(60));
        let mut pairs = vec![
            ("retry-after".to_owned(), retry_after_secs(wait).to_string()),
            (
                "x-ratelimit-scope".to_owned(),
                self.scope.describe().to_owned(),
            ),
        ];
        match self.kind {
            LimitKind::Requests | LimitKind::Tokens => {
                let kind = if self.kind == LimitKind::Requests {
                    "requests"
                } else {
                    "tokens"
                };
                let status = RateStatus {
                    limit: self.limit,
                    remaining: 0,
                    reset: wait,
                };
                pairs.extend(status.pairs(kind));
            }
            LimitKind::Concurrency => {
                pairs.push(("x-concurrency-limit".to_owned(), self.limit.to_string()));
            }
        }
        pairs
    }
}

impl RateFigures {
    /// The `x-ratelimit-*` pairs for a response, both doors.
    pub fn pairs(&self) -> Vec<(String, String)> {
        let mut pairs = Vec::with_capacity(6);
        if let Some(requests) = &self.requests {
            pairs.extend(requests.pairs("requests"));
        }
        if let Some(tokens) = &self.tokens {
            pairs.extend(tokens.pairs("tokens"));
        }
        pairs
    }

    /// The tighter of the key's and the user's figures.
    pub fn tighter(key: RateFigures, user: RateFigures) -> RateFigures {
        RateFigures {
            requests: RateStatus::tighter(key.requests, user.requests),
            tokens: RateStatus::tighter(key.tokens, user.tokens),
        }
    }

    pub fn from_grants(key: &Grant, user: &Grant) -> RateFigures {
        RateFigures::tighter(
            RateFigures {
                requests: key.requests,
                tokens: key.token_status,
            },
            RateFigures {
                requests: user.requests,
                tokens: user.token_status,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn admitted(window: &mut SlidingWindow, limit: u64, at: u64, tries: u32) -> u32 {
        (0..tries)
            .filter(|_| window.try_acquire(limit, 1, at).is_ok())
            .count() as u32
    }

    #[test]
    fn admits_up_to_the_limit_then_refuses_with_a_wait() {
        let mut w = SlidingWindow::default();
        for i in 0..5 {
            let status = w.try_acquire(5, 1, 1_000).unwrap();
            assert_eq!(status.remaining, 4 - i);
        }
        let wait = w.try_acquire(5, 1, 1_000).unwrap_err();
        // The next window admits once a fifth of this one's five calls has slid out.
        assert_eq!(wait, Some(Duration::from_millis(59_000 + 12_000)));
    }

    #[test]
    fn a_burst_at_the_window_edge_cannot_pass_twice_the_limit() {
        let mut w = SlidingWindow::default();
        assert_eq!(admitted(&mut w, 10, 59_999, 20), 10);
        // One millisecond later, a new fixed window would admit ten more; the slide does not.
        assert_eq!(admitted(&mut w, 10, 60_000, 20), 0);
        // Half a minute on, half of the old burst has slid out.
        assert_eq!(admitted(&mut w, 10, 90_000, 20), 5);
    }

    #[test]
    fn the_advertised_wait_is_enough_and_not_much_more() {
        let mut w = SlidingWindow::default();
        admitted(&mut w, 3, 10_000, 3);
        // At 70 s five sixths of the previous window still count: 2.5 + 1 > 3.
        let wait = w
            .try_acquire(3, 1, 70_000)
            .unwrap_err()
            .unwrap()
            .as_millis() as u64;
        assert_eq!(wait, 10_000);
        assert!(w.try_acquire(3, 1, 70_000 + wait - 2).is_err());
        assert!(w.try_acquire(3, 1, 70_000 + wait).is_ok());
    }

    #[test]
    fn an_idle_window_forgets_old_counts() {
        let mut w = SlidingWindow::default();
        admitted(&mut w, 2, 0, 2);
        assert_eq!(admitted(&mut w, 2, 180_000, 5), 2);
    }

    #[test]
    fn tokens_are_admitted_by_amount_and_corrected_at_settlement() {
        let mut w = SlidingWindow::default();
        w.try_acquire(1000, 600, 0).unwrap();
        assert!(w.try_acquire(1000, 600, 0).is_err());
        assert_eq!(w.try_acquire(1000, 2000, 0), Err(None), "never fits");
        // The first call used only 100 of its 600.
        w.adjust(-500, 0);
        assert_eq!(w.try_acquire(1000, 600, 0).unwrap().remaining, 300);
    }

    #[test]
    fn a_limiter_is_all_or_nothing_and_frees_its_slot() {
        let limiter = Limiter::default();
        let spec = LimitSpec {
            rpm: Some(10),
            tpm: Some(100),
            concurrent: Some(1),
        };
        let grant = limiter.acquire(&spec, LimitScope::Key, 80).unwrap();
        let busy = limiter.acquire(&spec, LimitScope::Key, 10).unwrap_err();
        assert_eq!(busy.kind, LimitKind::Concurrency);
        limiter.release(&grant, &spec, 30);
        assert_eq!(limiter.in_flight(), 0);
        // 30 tokens used: 70 remain; 80 does not fit, and that refusal takes no request.
        let refused = limiter.acquire(&spec, LimitScope::Key, 80).unwrap_err();
        assert_eq!((refused.kind, refused.limit), (LimitKind::Tokens, 100));
        assert_eq!(limiter.in_flight(), 0);
        assert_eq!(limiter.figures(&spec).requests.unwrap().remaining, 9);
    }

    proptest! {
        /// Whatever the arrival times, no 60-second span admits more than twice the limit,
        /// and no fixed minute admits more than the limit.
        #[test]
        fn no_window_admits_more_than_its_limit(
            limit in 1u64..50,
            gaps in proptest::collection::vec(0u64..5_000, 1..400),
        ) {
            let mut w = SlidingWindow::default();
            let mut now = 0;
            let mut admitted_at = Vec::new();
            for gap in gaps {
                now += gap;
                if w.try_acquire(limit, 1, now).is_ok() {
                    admitted_at.push(now);
                }
            }
            for (i, &start) in admitted_at.iter().enumerate() {
                let in_span = admitted_at[i..].iter().take_while(|&&t| t < start + WINDOW_MS).count() as u64;
                prop_assert!(in_span <= 2 * limit);
            }
            for minute in 0..=now / WINDOW_MS {
                let in_minute = admitted_at.iter().filter(|&&t| t / WINDOW_MS == minute).count() as u64;
                prop_assert!(in_minute <= limit);
            }
        }

        /// Waiting the advertised time is always enough.
        #[test]
        fn the_retry_after_is_sufficient(
            limit in 1u64..1000,
            amounts in proptest::collection::vec((1u64..200, 0u64..30_000), 1..60),
        ) {
            let mut w = SlidingWindow::default();
            let mut now = 0;
            for (amount, gap) in amounts {
                now += gap;
                match w.try_acquire(limit, amount, now) {
                    Ok(status) => prop_assert!(status.remaining <= limit),
                    Err(None) => prop_assert!(amount > limit),
                    Err(Some(wait)) => {
                        now += wait.as_millis() as u64;
                        prop_assert!(w.try_acquire(limit, amount, now).is_ok());
                    }
                }
            }
        }
    }
}
