//! The clocks every part of the gate reads: wall time for records, a monotonic one for limits.

use std::sync::OnceLock;
use std::time::Instant;

/// Seconds since the Unix epoch, the unit of every stored and shown time.
pub type UnixTime = i64;

/// Now, in seconds since the Unix epoch.
pub fn now_unix() -> UnixTime {
    now_micros() / 1_000_000
}

/// Now, in microseconds since the Unix epoch (call-log ordering).
pub fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Milliseconds on a monotonic clock shared by the whole process.
pub fn monotonic_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = START.get_or_init(Instant::now);
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// The wall clock the gate reads for periods, prices and the call log: the system's,
/// moved by an offset that only tests set (a period's end is then minutes away, not days).
#[derive(Clone, Debug, Default)]
pub struct Clock {
    offset_micros: std::sync::Arc<std::sync::atomic::AtomicI64>,
}

impl Clock {
    pub fn now_micros(&self) -> i64 {
        now_micros().saturating_add(
            self.offset_micros
                .load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    pub fn now_unix(&self) -> UnixTime {
        self.now_micros().div_euclid(1_000_000)
    }

    /// Moves the clock forward by `secs` (a test's controllable clock).
    pub fn advance(&self, secs: i64) {
        self.offset_micros.fetch_add(
            secs.saturating_mul(1_000_000),
            std::sync::atomic::Ordering::Relaxed,
        );
    }
}

impl PartialEq for Clock {
    /// The same clock, not the same reading.
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.offset_micros, &other.offset_micros)
    }
}
