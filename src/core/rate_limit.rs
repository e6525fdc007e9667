//! Per-minute limits (requests and tokens) and concurrency caps, per key and per user.
//!
//! Each per-minute limit is a GCRA (generic cell rate algorithm): a limit of `L` per minute
//! lets one unit through every `60 s / L` on average, with a burst of up to `L` at once. The
//! state is one number, the theoretical arrival time, so a check is O(1) in time and memory.
//! A burst at a minute's edge cannot pass twice the limit in any sixty seconds, and a small
//! limit stays smooth: `rpm_limit = 1` means one call every sixty seconds. Each key and each
//! user has its own lock; none is shared.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use super::time::monotonic_ms;

const WINDOW_US: u64 = 60_000_000;

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

/// One GCRA limit: `limit` units per minute, kept as a "theoretical arrival time".
#[derive(Debug, Default)]
pub struct SlidingWindow {
    /// When the bucket will be empty again, in microseconds on the monotonic clock.
    tat_us: u64,
}

impl SlidingWindow {
    fn interval_us(limit: u64) -> f64 {
        WINDOW_US as f64 / limit.max(1) as f64
    }

    /// `amount` units' share of the minute, rounded up, in exact integers (so that the
    /// full allowance costs exactly one minute).
    fn cost_us(limit: u64, amount: u64) -> u64 {
        let limit = u128::from(limit.max(1));
        let cost = (u128::from(amount) * u128::from(WINDOW_US)).div_ceil(limit);
        u64::try_from(cost).unwrap_or(u64::MAX)
    }

    /// Whether `amount` fits under `limit` at `now_ms`; on `Err`, how long until it does
    /// (`None`: never, the amount alone is over the limit). Takes nothing.
    pub fn check(&mut self, limit: u64, amount: u64, now_ms: u64) -> Result<(), Option<Duration>> {
        if amount > limit {
            return Err(None);
        }
        let now = now_ms * 1000;
        let new_tat = self.tat_us.max(now) + Self::cost_us(limit, amount);
        match new_tat.saturating_sub(now).saturating_sub(WINDOW_US) {
            0 => Ok(()),
            over => Err(Some(Duration::from_micros(over))),
        }
    }

    /// Counts `amount` and reports the standing.
    pub fn take(&mut self, limit: u64, amount: u64, now_ms: u64) -> RateStatus {
        self.tat_us = self.tat_us.max(now_ms * 1000) + Self::cost_us(limit, amount);
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

    /// Corrects by `delta` units (a reservation settled at its real size).
    pub fn adjust(&mut self, limit: u64, delta: i64, now_ms: u64) {
        let now = now_ms * 1000;
        let shift = Self::cost_us(limit, delta.unsigned_abs());
        self.tat_us = if delta >= 0 {
            self.tat_us.max(now) + shift
        } else {
            self.tat_us.saturating_sub(shift).max(now)
        };
    }

    pub fn status(&mut self, limit: u64, now_ms: u64) -> RateStatus {
        let backlog = self.tat_us.saturating_sub(now_ms * 1000);
        let free = WINDOW_US.saturating_sub(backlog) as f64;
        RateStatus {
            limit,
            remaining: ((free / Self::interval_us(limit)).floor() as u64).min(limit),
            // The whole allowance is back once the backlog has drained.
            reset: Duration::from_micros(backlog),
        }
    }
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
    /// One request was counted in the per-minute window.
    pub request: bool,
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
            self.release(&grant, spec, 0, true);
            return Err(refusal);
        }
        if let Some(rpm) = spec.rpm {
            grant.requests = Some(windows.requests.take(u64::from(rpm), 1, now));
            grant.request = true;
        }
        if let Some(tpm) = spec.tpm {
            grant.token_status = Some(windows.tokens.take(tpm, tokens, now));
            grant.tokens = tokens;
        }
        Ok(grant)
    }

    /// Ends a granted call: frees its slot, corrects its tokens to `used`, and gives the
    /// request back when the call was refused after all (by another limit or quota).
    pub fn release(&self, grant: &Grant, spec: &LimitSpec, used: u64, refused: bool) {
        if grant.slot {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
        if refused
            && grant.request
            && let Some(rpm) = spec.rpm
        {
            let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
            windows.requests.adjust(u64::from(rpm), -1, monotonic_ms());
        }
        if spec.tpm.is_some() && used != grant.tokens {
            let delta = i64::try_from(used).unwrap_or(i64::MAX)
                - i64::try_from(grant.tokens).unwrap_or(i64::MAX);
            let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(tpm) = spec.tpm {
                windows.tokens.adjust(tpm, delta, monotonic_ms());
            }
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

/// One figure of the limit headers: a count, or the time until a limit resets, which
/// OpenAI writes as `120ms`, `12s`, `6m0s`. Kept as a number until a door writes it, so a
/// response's headers cost no string building.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Figure {
    Count(u64),
    Reset(Duration),
    /// Money left (`x-budget-remaining`), as decimal text.
    Amount(super::money::Money),
}

impl std::fmt::Display for Figure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Figure::Count(n) => write!(f, "{n}"),
            Figure::Amount(m) => write!(f, "{m}"),
            Figure::Reset(d) => {
                let secs = d.as_secs();
                if secs == 0 {
                    write!(f, "{}ms", d.subsec_millis())
                } else if secs < 60 {
                    write!(f, "{secs}s")
                } else {
                    write!(f, "{}m{}s", secs / 60, secs % 60)
                }
            }
        }
    }
}

/// Whole seconds to wait, rounded up, at least one (`Retry-After`).
pub fn retry_after_secs(d: Duration) -> u64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
}

/// OpenAI's header names for a limit's figures: limit, remaining, reset.
const REQUEST_HEADERS: [&str; 3] = [
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
];
const TOKEN_HEADERS: [&str; 3] = [
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
];

impl RateStatus {
    fn pairs(&self, [limit, remaining, reset]: [&'static str; 3]) -> [(&'static str, Figure); 3] {
        [
            (limit, Figure::Count(self.limit)),
            (remaining, Figure::Count(self.remaining)),
            (reset, Figure::Reset(self.reset)),
        ]
    }
}

impl Refusal {
    /// The figures a refusal reports, as (header or metadata name, value) pairs, both doors.
    pub fn pairs(&self) -> Vec<(&'static str, String)> {
        let wait = self.retry_after.unwrap_or(Duration::from_secs(60));
        let mut pairs = vec![
            ("retry-after", retry_after_secs(wait).to_string()),
            ("x-ratelimit-scope", self.scope.describe().to_owned()),
        ];
        match self.kind {
            LimitKind::Requests | LimitKind::Tokens => {
                let kind = if self.kind == LimitKind::Requests {
                    REQUEST_HEADERS
                } else {
                    TOKEN_HEADERS
                };
                let status = RateStatus {
                    limit: self.limit,
                    remaining: 0,
                    reset: wait,
                };
                pairs.extend(
                    status
                        .pairs(kind)
                        .map(|(name, figure)| (name, figure.to_string())),
                );
            }
            LimitKind::Concurrency => {
                pairs.push(("x-concurrency-limit", self.limit.to_string()));
            }
        }
        pairs
    }
}

impl RateFigures {
    /// Every name `pairs` may give.
    pub const HEADER_NAMES: [&'static str; 6] = [
        REQUEST_HEADERS[0],
        REQUEST_HEADERS[1],
        REQUEST_HEADERS[2],
        TOKEN_HEADERS[0],
        TOKEN_HEADERS[1],
        TOKEN_HEADERS[2],
    ];

    /// The `x-ratelimit-*` pairs for a response, both doors.
    pub fn pairs(&self) -> impl Iterator<Item = (&'static str, Figure)> + use<> {
        let requests = self.requests.map(|s| s.pairs(REQUEST_HEADERS));
        let tokens = self.tokens.map(|s| s.pairs(TOKEN_HEADERS));
        requests.into_iter().chain(tokens).flatten()
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

    #[test]
    fn figures_are_written_as_openai_writes_them() {
        let text = |f: Figure| f.to_string();
        assert_eq!(text(Figure::Count(0)), "0");
        assert_eq!(
            text(Figure::Count(18_446_744_073_709_551_615)),
            "18446744073709551615"
        );
        assert_eq!(text(Figure::Reset(Duration::from_millis(120))), "120ms");
        assert_eq!(text(Figure::Reset(Duration::from_millis(12_400))), "12s");
        assert_eq!(text(Figure::Reset(Duration::from_secs(360))), "6m0s");
        assert_eq!(text(Figure::Reset(Duration::from_secs(3599))), "59m59s");
    }

    fn admitted(window: &mut SlidingWindow, limit: u64, at: u64, tries: u32) -> u32 {
        (0..tries)
            .filter(|_| window.try_acquire(limit, 1, at).is_ok())
            .count() as u32
    }

    #[test]
    fn admits_a_burst_up_to_the_limit_then_one_per_interval() {
        let mut w = SlidingWindow::default();
        for i in 0..5 {
            let status = w.try_acquire(5, 1, 1_000).unwrap();
            assert_eq!(status.remaining, 4 - i);
        }
        // Five per minute: the next one is due twelve seconds on.
        let wait = w.try_acquire(5, 1, 1_000).unwrap_err();
        assert_eq!(wait, Some(Duration::from_secs(12)));
        assert!(w.try_acquire(5, 1, 12_999).is_err());
        assert!(w.try_acquire(5, 1, 13_000).is_ok());
    }

    #[test]
    fn a_burst_at_the_window_edge_cannot_pass_twice_the_limit() {
        let mut w = SlidingWindow::default();
        assert_eq!(admitted(&mut w, 10, 59_999, 20), 10);
        // A fixed window would admit ten more a millisecond later; the rate does not.
        assert_eq!(admitted(&mut w, 10, 60_000, 20), 0);
        // Half a minute on, half of the allowance has come back.
        assert_eq!(admitted(&mut w, 10, 89_999, 20), 5);
    }

    #[test]
    fn one_per_minute_means_one_every_sixty_seconds() {
        let mut w = SlidingWindow::default();
        assert!(w.try_acquire(1, 1, 10_000).is_ok());
        assert_eq!(
            w.try_acquire(1, 1, 30_000),
            Err(Some(Duration::from_secs(40)))
        );
        assert!(w.try_acquire(1, 1, 70_000).is_ok());
    }

    #[test]
    fn an_idle_limit_is_full_again() {
        let mut w = SlidingWindow::default();
        admitted(&mut w, 2, 0, 2);
        assert_eq!(w.status(2, 0).remaining, 0);
        assert_eq!(admitted(&mut w, 2, 180_000, 5), 2);
    }

    #[test]
    fn tokens_are_admitted_by_amount_and_corrected_at_settlement() {
        let mut w = SlidingWindow::default();
        w.try_acquire(1000, 600, 0).unwrap();
        assert!(w.try_acquire(1000, 600, 0).is_err());
        assert_eq!(w.try_acquire(1000, 2000, 0), Err(None), "never fits");
        // The first call used only 100 of its 600.
        w.adjust(1000, -500, 0);
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
        limiter.release(&grant, &spec, 30, false);
        assert_eq!(limiter.in_flight(), 0);
        // 30 tokens used: 70 remain; 80 does not fit, and that refusal takes no request.
        let refused = limiter.acquire(&spec, LimitScope::Key, 80).unwrap_err();
        assert_eq!((refused.kind, refused.limit), (LimitKind::Tokens, 100));
        assert_eq!(limiter.in_flight(), 0);
        assert_eq!(limiter.figures(&spec).requests.unwrap().remaining, 9);
    }

    proptest! {
        /// Whatever the arrival times, no sixty-second span admits twice the limit.
        #[test]
        fn no_minute_admits_twice_the_limit(
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
                let in_span = admitted_at[i..].iter().take_while(|&&t| t < start + 60_000).count() as u64;
                prop_assert!(in_span < 2 * limit);
            }
        }

        /// Waiting the advertised time is always enough, and the figures stay in range.
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
                        now += wait.as_millis() as u64 + 1;
                        prop_assert!(w.try_acquire(limit, amount, now).is_ok());
                    }
                }
            }
        }
    }
}
