//! Durable records behind the `Store` trait, the sled implementation, and the background
//! writer that batches usage so that no request waits for the disk.

mod sled_store;
mod writer;

use std::collections::HashMap;

use crate::core::records::{CallRecord, KeyCounters, KeyRecord, UnixTime, UsageBucket, UserRecord};

pub use sled_store::SledStore;
pub use writer::{UsageSink, UsageWriter};

/// The schema this build writes; a store written by a newer build is refused at open.
pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store I/O error: {0}")]
    Io(String),
    #[error("corrupt record in `{tree}`: {message}")]
    Corrupt { tree: &'static str, message: String },
    #[error(
        "the data directory was written by a newer step3-gateway (schema {found}, this build knows {SCHEMA_VERSION}); upgrade the binary or use another directory"
    )]
    NewerSchema { found: u32 },
}

/// Everything the gateway keeps across restarts.
///
/// Users and keys are loaded whole at start and then written through on every admin
/// change; call records arrive in batches from the [`UsageWriter`] and update the
/// per-key counters, the hourly aggregates and the call log together.
pub trait Store: Send + Sync + 'static {
    fn load_users(&self) -> Result<Vec<UserRecord>, StoreError>;
    fn load_keys(&self) -> Result<Vec<KeyRecord>, StoreError>;
    fn load_counters(&self) -> Result<HashMap<String, KeyCounters>, StoreError>;
    fn put_user(&self, user: &UserRecord) -> Result<(), StoreError>;
    fn put_key(&self, key: &KeyRecord) -> Result<(), StoreError>;
    /// Applies a batch of finished calls: counters, hourly usage and the call log, atomically.
    fn record_calls(&self, calls: &[CallRecord]) -> Result<(), StoreError>;
    /// A key's calls, newest first, strictly older than `before_micros` when given.
    fn calls(
        &self,
        key_id: &str,
        before_micros: Option<i64>,
        limit: usize,
    ) -> Result<Vec<CallRecord>, StoreError>;
    /// A key's hourly usage buckets with `from <= hour < to`, oldest first.
    fn usage(
        &self,
        key_id: &str,
        from: UnixTime,
        to: UnixTime,
    ) -> Result<Vec<UsageBucket>, StoreError>;
    fn meta(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError>;
    fn put_meta(&self, name: &str, value: &[u8]) -> Result<(), StoreError>;
    /// Makes every write so far durable.
    fn flush(&self) -> Result<(), StoreError>;
}
