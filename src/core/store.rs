//! The store port: what the gate needs kept across restarts, whatever keeps it. `store/`
//! implements it (sled today); core reads and writes only through this trait.

use super::catalogue::ModelRecord;
use super::error::GatewayError;
use super::pricing::PriceRecord;
use super::records::{
    AuditRecord, CallRecord, EncodedCall, ExportRecord, KeyCounters, KeyRecord, UsageBucket,
    UserRecord,
};
use super::time::UnixTime;

#[derive(Clone, Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store I/O error: {0}")]
    Io(String),
    #[error("corrupt record in `{tree}`: {message}")]
    Corrupt { tree: &'static str, message: String },
    #[error(
        "the data directory was written by a newer step3-gateway (schema {found}, this build knows {known}); upgrade the binary or use another directory"
    )]
    NewerSchema { found: u32, known: u32 },
    /// A page token this store did not give out.
    #[error("the page token is not one this store gave out")]
    UnknownCursor,
}

impl From<StoreError> for GatewayError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::UnknownCursor => GatewayError::invalid_request(
                "`page_token` is not one this gateway gave out",
                Some("page_token"),
            ),
            other => GatewayError::Store(other.to_string()),
        }
    }
}

/// A position in the call log as a page token: opaque to everyone but the store that gave
/// it out (each store writes its own form), so that core and the doors only pass it on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallCursor(String);

impl CallCursor {
    /// Longer tokens than this were not given out by any store.
    const MAX_LEN: usize = 256;

    /// A store's own token for a position in its log.
    pub fn new(token: String) -> Self {
        CallCursor(token)
    }

    /// The token as a store gave it out, for the store to read back.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn to_token(&self) -> String {
        self.0.clone()
    }

    /// A token from a client: `None` for what no store gives out (empty, too long, not
    /// printable ASCII). Whether it names a position is the store's to say
    /// ([`StoreError::UnknownCursor`]).
    pub fn from_token(token: &str) -> Option<Self> {
        (!token.is_empty()
            && token.len() <= CallCursor::MAX_LEN
            && token.bytes().all(|b| b.is_ascii_graphic()))
        .then(|| CallCursor(token.to_owned()))
    }
}

/// Which part of the call log to read.
#[derive(Clone, Debug, Default)]
pub struct CallQuery<'a> {
    pub key_id: Option<&'a str>,
    pub before: Option<CallCursor>,
    pub from_micros: Option<i64>,
    pub limit: usize,
    pub scan_limit: usize,
}

/// Everything the gateway keeps across restarts.
///
/// Users are loaded whole at start and keys on first use, then written through on every
/// admin change; call records arrive in batches from the usage writer and update the
/// per-key counters, the hourly aggregates and the call log together.
pub trait Store: Send + Sync + 'static {
    fn load_users(&self) -> Result<Vec<UserRecord>, StoreError>;
    /// The id of the key whose current or previous secret hashes to `hash`.
    fn key_id_by_hash(&self, hash: &[u8; 32]) -> Result<Option<String>, StoreError>;
    /// One key and its counters as last recorded.
    fn load_key(&self, id: &str) -> Result<Option<(KeyRecord, KeyCounters)>, StoreError>;
    /// Keys in id order (which is creation order) strictly after `after`, each with its
    /// counters, until `visit` returns `false`.
    fn scan_keys(
        &self,
        after: Option<&str>,
        visit: &mut dyn FnMut(KeyRecord, KeyCounters) -> bool,
    ) -> Result<(), StoreError>;
    fn put_user(&self, user: &UserRecord) -> Result<(), StoreError>;
    /// Every price of every model (a handful: they are all held in memory).
    fn load_prices(&self) -> Result<Vec<PriceRecord>, StoreError>;
    /// Writes a price (one per model and moment: the same moment again replaces it).
    fn put_price(&self, price: &PriceRecord) -> Result<(), StoreError>;
    /// Writes a key and points the hashes of its secrets (current and previous) at it.
    fn put_key(&self, key: &KeyRecord) -> Result<(), StoreError>;
    /// Applies a batch of finished calls: counters, hourly usage and the call log, all or
    /// none (after a crash, at the latest when the store is opened again).
    /// Idempotent: a call with the same reservation as one in the log, or with the same
    /// time and request id as one written since the last flush, is skipped, so a batch whose
    /// fate is unknown after a failure, or a call settled again at recovery, can be written
    /// again.
    fn record_calls(&self, calls: &[CallRecord]) -> Result<(), StoreError>;
    /// [`Store::record_calls`] for calls never given to the store before, which need no
    /// look-up in the log (one read per call saved on the usage writer's normal path), each
    /// with its encoding for the log.
    fn record_new_calls(&self, calls: &[EncodedCall]) -> Result<(), StoreError> {
        let calls: Vec<CallRecord> = calls.iter().map(|c| c.call.clone()).collect();
        self.record_calls(&calls)
    }
    /// Which of `reservations` already have their call in the log (a call recorded with
    /// [`CallRecord::reservation`] set is kept once per reservation).
    fn recorded_reservations(
        &self,
        reservations: &[u64],
    ) -> Result<std::collections::HashSet<u64>, StoreError>;
    /// Calls newest first (in the order they were recorded): a key's (or everyone's),
    /// strictly before `cursor`, at or after `from_micros`, that pass `filter`. Scans at
    /// most `scan_limit` entries; the cursor returned is where a next page starts, `None`
    /// when the log is exhausted.
    fn calls(
        &self,
        query: &CallQuery<'_>,
        filter: &dyn Fn(&CallRecord) -> bool,
    ) -> Result<(Vec<CallRecord>, Option<CallCursor>), StoreError>;
    /// A key's hourly usage buckets with `from <= hour < to`, oldest first.
    fn usage(
        &self,
        key_id: &str,
        from: UnixTime,
        to: UnixTime,
    ) -> Result<Vec<UsageBucket>, StoreError>;
    /// The model catalogue, in name order.
    fn load_models(&self) -> Result<Vec<ModelRecord>, StoreError>;
    /// Writes a model of the catalogue (replacing the one of its name).
    fn put_model(&self, model: &ModelRecord) -> Result<(), StoreError>;
    /// Removes a model of the catalogue; nothing if there is none of that name.
    fn delete_model(&self, name: &str) -> Result<(), StoreError>;
    fn meta(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError>;
    fn put_meta(&self, name: &str, value: &[u8]) -> Result<(), StoreError>;
    /// Calls older than `before_micros` leave the call log (counters and hourly usage are
    /// kept): no longer listed at once, their space freed up to about `limit` calls at a
    /// time; returns how many calls' space was freed.
    fn prune_calls(&self, before_micros: i64, limit: usize) -> Result<usize, StoreError>;
    /// Makes every write so far durable.
    fn flush(&self) -> Result<(), StoreError>;
    /// Every record kept, in the order of the portable export (settings, users, keys,
    /// counters, hourly usage, the call log, the model catalogue), until `visit` fails. Not a snapshot by
    /// itself: the caller keeps the books from being written meanwhile.
    fn export(
        &self,
        visit: &mut dyn FnMut(ExportRecord) -> Result<(), StoreError>,
    ) -> Result<(), StoreError>;
    /// Writes exported records as they are: counters, hourly usage and the call log are
    /// taken, not recomputed from the calls (a pruned call log still has its counters).
    /// Indexes (keys by hash, calls by key) are rebuilt.
    fn import(&self, records: &[ExportRecord]) -> Result<(), StoreError>;
    /// Whether the store holds no user, key or call yet.
    fn is_empty(&self) -> Result<bool, StoreError>;
    /// After a failed write: closes and reopens the store, keeping only what reached the
    /// disk, so that it takes writes again once the cause (a full disk) is gone.
    fn reopen(&self) -> Result<(), StoreError> {
        Ok(())
    }
    /// Appends one record to the audit log (admin changes; ids are time-ordered).
    fn put_audit(&self, _record: &AuditRecord) -> Result<(), StoreError> {
        Err(StoreError::Io("this store keeps no audit log".into()))
    }
    /// Up to `limit` audit records with ids strictly before `before`, newest first.
    fn audit(&self, _before: Option<&str>, _limit: usize) -> Result<Vec<AuditRecord>, StoreError> {
        Ok(Vec::new())
    }
}
