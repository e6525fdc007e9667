//! A sliding window of call counts, kept with atomics on the request path and read by the
//! monitor: calls, failed calls and slow calls over the last `window`.
//!
//! The window is 60 slots of `window / 60` each (at least 1 s). A slot is reset by the
//! first call that finds it holding an older period; a call racing that reset may be lost
//! or counted in the new period. Alerting needs shares, not exact sums: that is accepted
//! so that recording stays a few atomic operations with no lock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

const SLOTS: usize = 60;

#[derive(Debug, Default)]
struct Slot {
    /// The period (`now / slot length`) the counts belong to.
    period: AtomicU64,
    calls: AtomicU64,
    /// Calls that count against the error rate, or that were slower than the threshold.
    marked: AtomicU64,
}

/// Counts of calls, and of those marked (failed, or slow), over a sliding window.
#[derive(Debug)]
pub struct CallWindow {
    slot_ms: u64,
    slots: Vec<Slot>,
}

/// What the window holds now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WindowCounts {
    pub calls: u64,
    pub marked: u64,
}

impl WindowCounts {
    /// The marked share, in percent.
    pub fn percent(&self) -> f64 {
        if self.calls == 0 {
            0.0
        } else {
            self.marked as f64 * 100.0 / self.calls as f64
        }
    }
}

impl CallWindow {
    pub fn new(window: Duration) -> Self {
        let window_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
        CallWindow {
            slot_ms: (window_ms / SLOTS as u64).max(1000),
            slots: (0..SLOTS).map(|_| Slot::default()).collect(),
        }
    }

    /// Counts one call at `now_ms` (any monotonic milliseconds), marked or not.
    pub fn record(&self, now_ms: u64, marked: bool) {
        let period = now_ms / self.slot_ms;
        let Some(slot) = self.slots.get(index(period)) else {
            return;
        };
        let seen = slot.period.load(Ordering::Acquire);
        if seen != period
            && slot
                .period
                .compare_exchange(seen, period, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            slot.calls.store(0, Ordering::Release);
            slot.marked.store(0, Ordering::Release);
        }
        slot.calls.fetch_add(1, Ordering::AcqRel);
        if marked {
            slot.marked.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// The counts of the last `SLOTS` periods up to `now_ms`.
    pub fn counts(&self, now_ms: u64) -> WindowCounts {
        let current = now_ms / self.slot_ms;
        let oldest = current.saturating_sub(SLOTS as u64 - 1);
        let mut counts = WindowCounts::default();
        for slot in &self.slots {
            let period = slot.period.load(Ordering::Acquire);
            if (oldest..=current).contains(&period) {
                counts.calls += slot.calls.load(Ordering::Acquire);
                counts.marked += slot.marked.load(Ordering::Acquire);
            }
        }
        counts
    }
}

fn index(period: u64) -> usize {
    usize::try_from(period % SLOTS as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_cover_the_window_and_forget_what_left_it() {
        // 60 slots of 1 s.
        let window = CallWindow::new(Duration::from_secs(60));
        let start = 1_000_000;
        window.record(start, false);
        window.record(start + 10, true);
        window.record(start + 30_000, true);
        assert_eq!(
            window.counts(start + 30_000),
            WindowCounts {
                calls: 3,
                marked: 2
            }
        );
        // 61 s later the first two have left the window; the slot they used is reused.
        assert_eq!(
            window.counts(start + 61_000),
            WindowCounts {
                calls: 1,
                marked: 1
            }
        );
        window.record(start + 60_000, false);
        assert_eq!(window.counts(start + 61_000).calls, 2);
        assert!((window.counts(start + 61_000).percent() - 50.0).abs() < 1e-9);
        assert_eq!(window.counts(start + 200_000), WindowCounts::default());
    }
}
