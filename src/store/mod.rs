//! Implementations of core's store port: sled (embedded), Postgres (shared by several
//! replicas) with Redis for the limits they share, the reservation journal (durable
//! mode), and the background writer that drains the gate's usage queue in batches so that
//! no request waits for the disk.

mod call_log;
mod journal;
mod postgres;
mod priority;
mod redis;
mod sled_store;
mod writer;

pub use journal::{FileJournal, WhenDurable};
pub use postgres::PostgresStore;
pub use redis::{RedisLimits, RedisSettings};
pub use sled_store::{DEFAULT_CACHE_BYTES, SledStore};
pub use writer::UsageWriter;

/// The schema this build writes; a store written by a newer build is refused at open.
/// 2: keys are found by the hash of their secret through an index tree (1 had none, and
/// a build of 1 would not keep that index up to date).
/// 3: calls may carry their journal reservation (indexed in a tree) and the outcome
/// `interrupted`, which a build of 2 could not read back from the call log.
/// 4: the call log is kept in files of its own beside sled (`calls/`), which a build of 3
/// would not read (it would list no calls and count none twice only by luck).
pub const SCHEMA_VERSION: u32 = 4;

/// The checksum of a record of `segment` in the journal's and the call log's files: the
/// segment's number and the record's length are in it, so a record copied into another
/// segment or cut short does not check.
pub(super) fn segment_crc(segment: u64, record: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&segment.to_le_bytes());
    hasher.update(
        &u32::try_from(record.len())
            .unwrap_or(u32::MAX)
            .to_le_bytes(),
    );
    hasher.update(record);
    hasher.finalize()
}
