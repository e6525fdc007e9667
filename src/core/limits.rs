//! Per-key rate limits: a sliding-window counter, O(1) in time and memory per key.
//!
//! The window estimate is `previous · (1 − elapsed/W) + current`; a call is admitted while
//! the estimate plus the call stays within the limit. Unlike a fixed window, a burst at the
//! boundary cannot pass twice the limit.

use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

const WINDOW_MS: u64 = 60_000;

/// Milliseconds on a monotonic clock shared by the whole process.
pub fn monotonic_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = START.get_or_init(Instant::now);
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Where a limited key stands after an admitted call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateStatus {
    pub limit: u32,
    pub remaining: u32,
    /// Until the current window ends.
    pub reset: Duration,
}

/// The counts of one key's current and previous one-minute windows.
#[derive(Debug, Default)]
pub struct SlidingWindow {
    start_ms: u64,
    current: u32,
    previous: u32,
}

impl SlidingWindow {
    /// Admits one call at `now_ms` if `limit` allows it; otherwise says how long to wait.
    pub fn try_acquire(&mut self, limit: u32, now_ms: u64) -> Result<RateStatus, Duration> {
        self.advance(now_ms);
        let elapsed = now_ms - self.start_ms;
        let estimate = self.estimate(elapsed);
        let limit_f = f64::from(limit);
        if estimate + 1.0 <= limit_f {
            self.current += 1;
            let remaining = (limit_f - estimate - 1.0).floor();
            Ok(RateStatus {
                limit,
                // `remaining` lies in [0, limit), so the conversion cannot truncate.
                remaining: remaining as u32,
                reset: Duration::from_millis(WINDOW_MS - elapsed),
            })
        } else {
            Err(self.retry_after(limit_f, elapsed))
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
        f64::from(self.previous) * weight + f64::from(self.current)
    }

    /// The shortest wait after which the estimate leaves room for one more call.
    fn retry_after(&self, limit: f64, elapsed_ms: u64) -> Duration {
        let window = WINDOW_MS as f64;
        let current = f64::from(self.current);
        let previous = f64::from(self.previous);
        // Still in this window, once enough of the previous window has slid out.
        if current + 1.0 <= limit && previous > 0.0 {
            let at = ceil_ms(window * (1.0 - (limit - current - 1.0) / previous));
            if at < WINDOW_MS {
                return Duration::from_millis(at.saturating_sub(elapsed_ms).max(1));
            }
        }
        // In the next window, once enough of this one has slid out.
        let into_next = if current > 0.0 && limit - 1.0 < current {
            ceil_ms(window * (1.0 - (limit - 1.0) / current))
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

/// One key's request-per-minute limiter; the lock is the key's own, never shared.
#[derive(Debug, Default)]
pub struct RateLimiter {
    window: Mutex<SlidingWindow>,
}

impl RateLimiter {
    pub fn try_acquire(&self, limit: u32) -> Result<RateStatus, Duration> {
        let now = monotonic_ms();
        let mut window = self.window.lock().unwrap_or_else(|p| p.into_inner());
        window.try_acquire(limit, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admitted(window: &mut SlidingWindow, limit: u32, at: u64, tries: u32) -> u32 {
        (0..tries)
            .filter(|_| window.try_acquire(limit, at).is_ok())
            .count() as u32
    }

    #[test]
    fn admits_up_to_the_limit_then_refuses_with_a_wait() {
        let mut w = SlidingWindow::default();
        for i in 0..5 {
            let status = w.try_acquire(5, 1_000).unwrap();
            assert_eq!(status.remaining, 4 - i);
        }
        let wait = w.try_acquire(5, 1_000).unwrap_err();
        // The next window admits once a fifth of this one's five calls has slid out.
        assert_eq!(wait, Duration::from_millis(59_000 + 12_000));
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
        let wait = w.try_acquire(3, 70_000).unwrap_err().as_millis() as u64;
        assert_eq!(wait, 10_000);
        assert!(w.try_acquire(3, 70_000 + wait - 2).is_err());
        assert!(w.try_acquire(3, 70_000 + wait).is_ok());
    }

    #[test]
    fn an_idle_window_forgets_old_counts() {
        let mut w = SlidingWindow::default();
        admitted(&mut w, 2, 0, 2);
        assert_eq!(admitted(&mut w, 2, 180_000, 5), 2);
    }
}
