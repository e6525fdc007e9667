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
