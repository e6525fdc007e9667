//! The sled implementation of [`Store`]: one tree per kind of record, JSON values; the
//! call log beside it in a [`CallLog`] of its own.

use std::collections::{HashMap, HashSet};
use std::ops::{Bound, ControlFlow};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use serde::Serialize;
use serde::de::DeserializeOwned;
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};

use super::SCHEMA_VERSION;
use super::call_log::{CallLog, LogPosition, SegmentFilter};
use crate::core::catalogue::ModelRecord;
use crate::core::export::setting_bytes;
use crate::core::keys::to_hex;
use crate::core::pricing::PriceRecord;
use crate::core::records::AuditRecord;
use crate::core::records::ExportRecord;
use crate::core::records::{
    CallRecord, EncodedCall, KeyCounters, KeyRecord, UsageBucket, UserRecord,
};
use crate::core::store::{CallCursor, CallQuery, Store, StoreError};
use crate::core::time::UnixTime;

const SCHEMA_KEY: &str = "schema_version";

/// Meta entry: the call log position up to which counters and hourly usage count the calls.
const APPLIED_KEY: &str = "calls_applied";

/// Meta entry: calls older than this (µs since the epoch) have left the call log (retention),
/// even those whose segment is still on disk.
const HIDDEN_KEY: &str = "calls_hidden_before";

/// sled's page cache by default: what it holds now is users, keys, counters and hourly
/// usage, all small (the call log is not in sled).
pub const DEFAULT_CACHE_BYTES: u64 = 16 * 1024 * 1024;

pub struct SledStore {
    path: PathBuf,
    cache_bytes: u64,
    /// `None` only while [`Store::reopen`] swaps the handle.
    trees: RwLock<Option<Arc<Trees>>>,
    log: CallLog,
    /// Held by a batch from its log append to its sled transaction, and by a flush from the
    /// log's sync to sled's: sled never has durable counters for calls the log has not.
    writes: Mutex<Writes>,
    /// The mark last written (see [`MARK_FILE`]).
    marked: Mutex<Option<LogPosition>>,
    hidden_before: AtomicI64,
}

/// Where the books and the log stand, as the writing side knows it.
#[derive(Debug, Default)]
struct Writes {
    /// The log position the counters count up to.
    applied: LogPosition,
    /// The end of the log at the last successful flush: a call retried after a failure was
    /// written after it, if at all.
    flushed: LogPosition,
}

/// A file beside sled's own naming the log position that the books counted up to at the
/// last flush.
///
/// sled reads its log up to the first damaged byte and silently drops the rest, as it
/// would a write torn by a crash: a flipped byte in the middle of `db` rolls the books back
/// without an error. Books that count less than a flush confirmed prove such a loss, and
/// the store refuses to open. (Schema 3 wrote the log key of the last call instead.)
const MARK_FILE: &str = "durable-call";

/// One open sled database and its trees.
struct Trees {
    db: sled::Db,
    users: sled::Tree,
    keys: sled::Tree,
    /// SHA-256 of a key's current secret (and of its previous one during a rotation's
    /// grace) → key id, so that a key is found without loading every key.
    key_hashes: sled::Tree,
    counters: sled::Tree,
    usage: sled::Tree,
    meta: sled::Tree,
    /// Prices: `model NUL big-endian(effective_from)` → the price.
    prices: sled::Tree,
    /// The model catalogue: name → model.
    models: sled::Tree,
    /// The audit log: record id (time-ordered) → record.
    audit: sled::Tree,
}

/// The trees of schema 3 that held the call log, moved to the [`CallLog`] at the first
/// open by schema 4: the log, its index by key, and the index of reservations.
const OLD_CALL_TREES: [&str; 3] = ["calls", "calls_by_key", "reservations"];

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Io(e.to_string())
    }
}

impl SledStore {
    /// Opens (or creates) the store in `path` with sled's default page cache.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        SledStore::open_with_cache(path, DEFAULT_CACHE_BYTES)
    }

    /// Opens (or creates) the store in `path`, sled caching up to `cache_bytes`. Writes are
    /// durable once [`Store::flush`] returns (sled's own periodic flush is off: the call log
    /// is synced first, so sled never has counters for calls the log could lose).
    ///
    /// Calls the log has and the books do not count yet (a hard stop between a batch's log
    /// append and sled's next flush) are counted here, before anything reads the books.
    ///
    /// sled locks the directory; a process that is still exiting holds the lock for a
    /// moment, so a locked directory is retried for up to two seconds.
    pub fn open_with_cache(path: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        let trees = open_trees(path, cache_bytes)?;
        let log = CallLog::open(&path.join("calls"))?;
        let marked = read_mark(path)?;
        let applied = trees.applied()?;
        let end = log.end();
        if let Some(mark) = marked {
            if applied < mark {
                return Err(StoreError::Corrupt {
                    tree: "sled",
                    message: format!(
                        "{} lost records it had confirmed durable (the books counted the call \
                         log up to {mark:?} and now count it up to {applied:?}): its files were \
                         damaged or truncated, and sled drops everything after the first \
                         damaged byte. Restore a backup, or delete {} to accept the loss",
                        path.display(),
                        path.join(MARK_FILE).display()
                    ),
                });
            }
            if end < mark {
                return Err(StoreError::Corrupt {
                    tree: "calls",
                    message: format!(
                        "{} lost records it had confirmed durable (the call log was synced up \
                         to {mark:?} and now ends at {end:?}). Restore a backup, or delete {} \
                         to accept the loss",
                        path.join("calls").display(),
                        path.join(MARK_FILE).display()
                    ),
                });
            }
        }
        let store = SledStore {
            path: path.to_owned(),
            cache_bytes,
            hidden_before: AtomicI64::new(trees.hidden_before()?),
            trees: RwLock::new(Some(Arc::new(trees))),
            log,
            writes: Mutex::new(Writes {
                applied,
                flushed: end,
            }),
            marked: Mutex::new(marked),
        };
        store.count_unapplied()?;
        Ok(store)
    }

    fn trees(&self) -> Result<Arc<Trees>, StoreError> {
        self.trees
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| StoreError::Io(format!("{} is being reopened", self.path.display())))
    }

    fn writes(&self) -> std::sync::MutexGuard<'_, Writes> {
        self.writes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts in the books the calls the log holds past the position they count up to.
    fn count_unapplied(&self) -> Result<(), StoreError> {
        let t = self.trees()?;
        let mut writes = self.writes();
        let end = self.log.end();
        if end < writes.applied {
            // Only a power cut can do this, between a batch's log append and the next flush:
            // sled's unsynced pages reached the disk, the log's did not.
            tracing::warn!(
                data = %self.path.display(),
                "the books count calls the call log lost in a power cut; they stay counted"
            );
            t.meta.insert(APPLIED_KEY, &end.to_bytes())?;
            writes.applied = end;
            return Ok(());
        }
        let mut batch = Vec::new();
        let mut counted = 0;
        let mut failure = None;
        self.log.read_forward(writes.applied, &mut |at, call| {
            batch.push(call);
            if batch.len() == 1024 {
                if let Err(e) = apply(&t, &batch, at) {
                    failure = Some(e);
                    return ControlFlow::Break(());
                }
                counted += batch.len();
                batch.clear();
            }
            ControlFlow::Continue(())
        })?;
        if let Some(e) = failure {
            return Err(e);
        }
        if !batch.is_empty() || counted > 0 {
            apply(&t, &batch, end)?;
            counted += batch.len();
            tracing::info!(
                calls = counted,
                "counted the calls the call log had and the books did not yet (a hard stop \
                 came between the two)"
            );
        }
        writes.applied = end;
        Ok(())
    }

    /// Writes a batch; `dedupe` skips calls already recorded (a retried batch, a recovery).
    fn record(&self, calls: &[EncodedCall], dedupe: bool) -> Result<(), StoreError> {
        let t = self.trees()?;
        let mut writes = self.writes();
        let kept;
        let calls = if dedupe {
            kept = self.not_recorded(calls, writes.flushed)?;
            kept.as_slice()
        } else {
            calls
        };
        if calls.is_empty() {
            return Ok(());
        }
        let end = self.log.append(calls)?;
        apply(&t, calls.iter().map(|c| &c.call), end)?;
        writes.applied = end;
        Ok(())
    }

    /// The calls of `calls` not in the log: neither their reservation, nor (among the calls
    /// written since `flushed`) their time and request id; each once.
    fn not_recorded(
        &self,
        calls: &[EncodedCall],
        flushed: LogPosition,
    ) -> Result<Vec<EncodedCall>, StoreError> {
        let reservations: HashSet<u64> = calls.iter().filter_map(|c| c.call.reservation).collect();
        let mut seen_reservations = self.log.reservations_in(&reservations)?;
        let mut seen: HashSet<(i64, String)> = HashSet::new();
        self.log.read_forward(flushed, &mut |_, call| {
            seen.insert((call.at_micros, call.request_id));
            ControlFlow::Continue(())
        })?;
        Ok(calls
            .iter()
            .filter(|c| seen.insert((c.call.at_micros, c.call.request_id.clone())))
            .filter(|c| {
                c.call
                    .reservation
                    .is_none_or(|id| seen_reservations.insert(id))
            })
            .cloned()
            .collect())
    }
}

/// Counts `calls` in the counters and hourly usage, and moves the books' position in the
/// call log to `end`, in one sled transaction.
fn apply<'a>(
    t: &Trees,
    calls: impl IntoIterator<Item = &'a CallRecord>,
    end: LogPosition,
) -> Result<(), StoreError> {
    // Fold the batch first, so each counter and bucket is read and written once.
    let mut counters: HashMap<&str, KeyCounters> = HashMap::new();
    let mut buckets: HashMap<Vec<u8>, UsageBucket> = HashMap::new();
    for call in calls {
        counters
            .entry(&call.key_id)
            .or_default()
            .add(&call.counters());
        let hour = hour_of(call.at_micros);
        let mut bucket = UsageBucket::of(call, hour);
        let series = bucket.series();
        buckets
            .entry(timed_key(&call.key_id, hour, &series))
            .or_insert_with(|| std::mem::take(&mut bucket))
            .count(call);
    }
    let end = end.to_bytes();
    let result =
        (&t.counters, &t.usage, &t.meta).transaction(|(counter_tree, usage_tree, meta_tree)| {
            for (key_id, delta) in &counters {
                let mut total: KeyCounters = match counter_tree.get(key_id.as_bytes())? {
                    Some(bytes) => {
                        decode("counters", &bytes).map_err(ConflictableTransactionError::Abort)?
                    }
                    None => KeyCounters::default(),
                };
                total.add(delta);
                let bytes = encode(&total).map_err(ConflictableTransactionError::Abort)?;
                counter_tree.insert(key_id.as_bytes(), bytes)?;
            }
            for (key, delta) in &buckets {
                let mut bucket: UsageBucket = match usage_tree.get(key)? {
                    Some(bytes) => {
                        decode("usage", &bytes).map_err(ConflictableTransactionError::Abort)?
                    }
                    None => UsageBucket {
                        hour: delta.hour,
                        model: delta.model.clone(),
                        version: delta.version.clone(),
                        ..UsageBucket::default()
                    },
                };
                bucket.add(delta);
                let bytes = encode(&bucket).map_err(ConflictableTransactionError::Abort)?;
                usage_tree.insert(key.as_slice(), bytes)?;
            }
            meta_tree.insert(APPLIED_KEY, &end)?;
            Ok(())
        });
    match result {
        Ok(()) => Ok(()),
        Err(TransactionError::Abort(e)) => Err(e),
        Err(TransactionError::Storage(e)) => Err(e.into()),
    }
}

fn open_trees(path: &Path, cache_bytes: u64) -> Result<Trees, StoreError> {
    let config = sled::Config::new()
        .path(path)
        // sled would cache up to 1 GiB; the records the gateway reads back are few.
        .cache_capacity(cache_bytes)
        // Durable at our flush only, after the call log's sync (see `SledStore::writes`).
        .flush_every_ms(None);
    // A store that existed must still hold its schema version once opened: sled opens
    // some damaged logs as an empty database, and empty books must not be served.
    let existed = path.join("conf").exists() || path.join("db").exists();
    let mut attempts = 0;
    let db = loop {
        // sled panics on some damaged files instead of returning an error.
        let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| config.open()))
            .map_err(|panic| {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                StoreError::Corrupt {
                    tree: "sled",
                    message: format!("sled failed reading {}: {message}", path.display()),
                }
            })?;
        match opened {
            Ok(db) => break db,
            Err(e) if is_lock_error(&e) && attempts < 100 => {
                attempts += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) if is_lock_error(&e) => {
                return Err(StoreError::Io(format!(
                    "{} is locked: is another step3-gateway running on this data directory?",
                    path.display()
                )));
            }
            Err(e) => {
                return Err(StoreError::Io(format!(
                    "cannot open {}: {e}",
                    path.display()
                )));
            }
        }
    };
    let trees = Trees {
        users: db.open_tree("users")?,
        keys: db.open_tree("keys")?,
        key_hashes: db.open_tree("key_hashes")?,
        counters: db.open_tree("counters")?,
        usage: db.open_tree("usage")?,
        meta: db.open_tree("meta")?,
        prices: db.open_tree("prices")?,
        models: db.open_tree("models")?,
        audit: db.open_tree("audit")?,
        db,
    };
    trees.check_schema(path, existed)?;
    Ok(trees)
}

/// The mark, if there is one in this schema's form (`log <segment> <offset>`, hex).
fn read_mark(path: &Path) -> Result<Option<LogPosition>, StoreError> {
    let file = path.join(MARK_FILE);
    match std::fs::read_to_string(&file) {
        Ok(text) => {
            let mut words = text.split_whitespace();
            match (words.next(), words.next(), words.next()) {
                (Some("log"), Some(segment), Some(offset)) => {
                    let position = u64::from_str_radix(segment, 16)
                        .ok()
                        .zip(u64::from_str_radix(offset, 16).ok());
                    match position {
                        Some((segment, offset)) => Ok(Some(LogPosition { segment, offset })),
                        None => Err(StoreError::Corrupt {
                            tree: "calls",
                            message: format!("{} is not a mark this gateway wrote", file.display()),
                        }),
                    }
                }
                // Schema 3's form, checked (and replaced) when the call log moves out of sled.
                _ if crate::core::keys::bytes_from_hex(text.trim()).is_some() => Ok(None),
                _ => Err(StoreError::Corrupt {
                    tree: "calls",
                    message: format!("{} is not a mark this gateway wrote", file.display()),
                }),
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StoreError::Io(format!(
            "cannot read {}: {e}",
            file.display()
        ))),
    }
}

/// Replaces the mark atomically and durably: a new file, synced, renamed, dir synced.
fn write_mark(path: &Path, position: LogPosition) -> Result<(), StoreError> {
    use std::io::Write;
    let io = |e: std::io::Error| {
        StoreError::Io(format!(
            "cannot write {}: {e}",
            path.join(MARK_FILE).display()
        ))
    };
    let temporary = path.join(format!("{MARK_FILE}.new"));
    let mut file = std::fs::File::create(&temporary).map_err(io)?;
    let text = format!("log {:x} {:x}\n", position.segment, position.offset);
    file.write_all(text.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&temporary, path.join(MARK_FILE)).map_err(io)?;
    std::fs::File::open(path)
        .and_then(|dir| dir.sync_all())
        .map_err(io)?;
    Ok(())
}

impl Trees {
    fn check_schema(&self, path: &Path, existed: bool) -> Result<(), StoreError> {
        match self.meta.get(SCHEMA_KEY)? {
            Some(bytes) => {
                let found: u32 = decode("meta", &bytes)?;
                if found > SCHEMA_VERSION {
                    return Err(StoreError::NewerSchema {
                        found,
                        known: SCHEMA_VERSION,
                    });
                }
                if found < 2 {
                    self.index_key_hashes()?;
                }
                if found < 4 {
                    self.move_call_log(path)?;
                }
                if found < SCHEMA_VERSION {
                    self.meta.insert(SCHEMA_KEY, encode(&SCHEMA_VERSION)?)?;
                    self.db.flush()?;
                }
            }
            None if existed => {
                return Err(StoreError::Corrupt {
                    tree: "meta",
                    message: format!(
                        "{} holds a store without a schema version: it is damaged (or was \
                         left by a first start killed within milliseconds); refusing to \
                         serve with empty books. Move it away to start afresh",
                        path.display()
                    ),
                });
            }
            None => {
                // Durable at once, so that a store without it is known to be damaged.
                self.meta.insert(SCHEMA_KEY, encode(&SCHEMA_VERSION)?)?;
                self.db.flush()?;
            }
        }
        Ok(())
    }
}

impl Trees {
    /// Schema 3 → 4: the call log leaves sled for a [`CallLog`] beside it, in the order of
    /// its keys (time). A store that fails schema 3's check (the call its mark names is
    /// missing) is refused, not moved. A move a crash interrupted is begun again.
    fn move_call_log(&self, path: &Path) -> Result<(), StoreError> {
        let calls = self.db.open_tree(OLD_CALL_TREES[0])?;
        let mark = std::fs::read_to_string(path.join(MARK_FILE)).unwrap_or_default();
        if let Some(key) = crate::core::keys::bytes_from_hex(mark.trim()).filter(|k| !k.is_empty())
            && !calls.contains_key(&key)?
        {
            let (at, request_id) = key.split_at(8.min(key.len()));
            let micros = i64::from_be_bytes(at.try_into().unwrap_or_default());
            return Err(StoreError::Corrupt {
                tree: "calls",
                message: format!(
                    "{} lost records it had confirmed durable (call {} of {} µs since the \
                     epoch is missing): its files were damaged or truncated, and sled drops \
                     everything after the first damaged byte. Restore a backup, or delete {} \
                     to accept the loss",
                    path.display(),
                    String::from_utf8_lossy(request_id),
                    micros,
                    path.join(MARK_FILE).display()
                ),
            });
        }
        let dir = path.join("calls");
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .map_err(|e| StoreError::Io(format!("cannot remove {}: {e}", dir.display())))?;
        }
        let log = CallLog::open(&dir)?;
        let mut batch = Vec::with_capacity(1024);
        for value in calls.iter().values() {
            batch.push(EncodedCall::new(decode::<CallRecord>("calls", &value?)?));
            if batch.len() == 1024 {
                log.append(&batch)?;
                batch.clear();
            }
        }
        log.append(&batch)?;
        log.sync()?;
        let end = log.end();
        drop(log);
        write_mark(path, end)?;
        self.meta.insert(APPLIED_KEY, &end.to_bytes())?;
        self.meta.insert(SCHEMA_KEY, encode(&SCHEMA_VERSION)?)?;
        self.db.flush()?;
        for name in OLD_CALL_TREES {
            self.db.drop_tree(name)?;
        }
        self.db.flush()?;
        Ok(())
    }

    /// The call log position the counters count up to.
    fn applied(&self) -> Result<LogPosition, StoreError> {
        match self.meta.get(APPLIED_KEY)? {
            Some(bytes) => LogPosition::from_bytes(&bytes).ok_or(StoreError::Corrupt {
                tree: "meta",
                message: format!("`{APPLIED_KEY}` is not a log position"),
            }),
            None => Ok(LogPosition::default()),
        }
    }

    fn hidden_before(&self) -> Result<i64, StoreError> {
        Ok(self
            .meta
            .get(HIDDEN_KEY)?
            .and_then(|bytes| Some(i64::from_be_bytes(bytes.as_ref().try_into().ok()?)))
            .unwrap_or(i64::MIN))
    }

    /// Schema 1 → 2: builds the hash index from the keys.
    fn index_key_hashes(&self) -> Result<(), StoreError> {
        for value in self.keys.iter().values() {
            let key: KeyRecord = decode("keys", &value?)?;
            for hash in secret_hashes(&key)? {
                self.key_hashes.insert(hash, key.id.as_bytes())?;
            }
        }
        Ok(())
    }

    fn counters_of(&self, id: &str) -> Result<KeyCounters, StoreError> {
        match self.counters.get(id.as_bytes())? {
            Some(bytes) => decode("counters", &bytes),
            None => Ok(KeyCounters::default()),
        }
    }
}

/// The hashes (raw bytes) of a key's current and previous secrets.
fn secret_hashes(key: &KeyRecord) -> Result<Vec<[u8; 32]>, StoreError> {
    std::iter::once(&key.hash)
        .chain(key.previous_hash.as_ref())
        .map(|hex| {
            crate::core::keys::from_hex(hex).ok_or_else(|| StoreError::Corrupt {
                tree: "keys",
                message: format!("key {} has a malformed secret hash", key.id),
            })
        })
        .collect()
}

/// sled reports a held directory lock only in its message.
fn is_lock_error(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(io) if io.to_string().contains("could not acquire lock"))
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|e| StoreError::Io(e.to_string()))
}

fn decode<T: DeserializeOwned>(tree: &'static str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        tree,
        message: e.to_string(),
    })
}

fn load_all<T: DeserializeOwned>(
    tree: &sled::Tree,
    name: &'static str,
) -> Result<Vec<T>, StoreError> {
    tree.iter()
        .values()
        .map(|value| decode(name, &value?))
        .collect()
}

/// `key_id NUL`, the prefix of a key's entries in `calls` and `usage`.
fn key_prefix(key_id: &str) -> Vec<u8> {
    let mut prefix = Vec::with_capacity(key_id.len() + 1);
    prefix.extend_from_slice(key_id.as_bytes());
    prefix.push(0);
    prefix
}

/// Orders a key's entries by time: `key_id NUL big-endian(time) suffix`.
fn timed_key(key_id: &str, time: i64, suffix: &str) -> Vec<u8> {
    let mut key = key_prefix(key_id);
    key.extend_from_slice(&time.to_be_bytes());
    key.extend_from_slice(suffix.as_bytes());
    key
}

/// A call log position as a page token: `<segment>.<offset>`, in hex.
fn to_cursor(at: LogPosition) -> CallCursor {
    CallCursor::new(format!("{:x}.{:x}", at.segment, at.offset))
}

fn from_cursor(cursor: &CallCursor) -> Option<LogPosition> {
    let (segment, offset) = cursor.as_str().split_once('.')?;
    Some(LogPosition {
        segment: u64::from_str_radix(segment, 16).ok()?,
        offset: u64::from_str_radix(offset, 16).ok()?,
    })
}

/// `model NUL big-endian(effective_from)`: a model's prices in time order.
fn price_key(price: &PriceRecord) -> Vec<u8> {
    timed_key(&price.model, price.effective_from, "")
}

fn hour_of(micros: i64) -> UnixTime {
    let secs = micros.div_euclid(1_000_000);
    secs - secs.rem_euclid(3600)
}

impl Store for SledStore {
    fn export(
        &self,
        visit: &mut dyn FnMut(ExportRecord) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let t = self.trees()?;
        for entry in t.meta.iter() {
            let (name, value) = entry?;
            // The schema version, the log position the books count to and the pruning
            // mark belong to this store's files, not to the books.
            if [SCHEMA_KEY, APPLIED_KEY, HIDDEN_KEY]
                .iter()
                .any(|k| name.as_ref() == k.as_bytes())
            {
                continue;
            }
            visit(ExportRecord::Meta {
                name: String::from_utf8_lossy(&name).into_owned(),
                value: to_hex(&value),
            })?;
        }
        for value in t.users.iter().values() {
            visit(ExportRecord::User(decode("users", &value?)?))?;
        }
        for value in t.keys.iter().values() {
            visit(ExportRecord::Key(decode("keys", &value?)?))?;
        }
        for entry in t.counters.iter() {
            let (key_id, value) = entry?;
            visit(ExportRecord::Counters {
                key_id: String::from_utf8_lossy(&key_id).into_owned(),
                counters: decode("counters", &value)?,
            })?;
        }
        for entry in t.usage.iter() {
            let (key, value) = entry?;
            let key_id = key.split(|&b| b == 0).next().unwrap_or_default();
            visit(ExportRecord::Usage {
                key_id: String::from_utf8_lossy(key_id).into_owned(),
                bucket: decode("usage", &value)?,
            })?;
        }
        // The call log, oldest first, without the calls already pruned from view.
        let hidden = self.hidden_before.load(Ordering::Relaxed);
        let mut failed = None;
        self.log
            .read_forward(LogPosition::default(), &mut |_, call| {
                if call.at_micros < hidden {
                    return ControlFlow::Continue(());
                }
                match visit(ExportRecord::Call(call)) {
                    Ok(()) => ControlFlow::Continue(()),
                    Err(e) => {
                        failed = Some(e);
                        ControlFlow::Break(())
                    }
                }
            })?;
        if let Some(e) = failed {
            return Err(e);
        }
        for value in t.prices.iter().values() {
            visit(ExportRecord::Price(decode("prices", &value?)?))?;
        }
        for value in t.models.iter().values() {
            visit(ExportRecord::Model(decode("models", &value?)?))?;
        }
        for value in t.audit.iter().values() {
            visit(ExportRecord::Audit(decode("audit", &value?)?))?;
        }
        Ok(())
    }

    fn import(&self, records: &[ExportRecord]) -> Result<(), StoreError> {
        let t = self.trees()?;
        let mut calls = Vec::new();
        for record in records {
            match record {
                ExportRecord::Meta { name, value } => {
                    t.meta
                        .insert(name.as_bytes(), setting_bytes(name, value)?)?;
                }
                ExportRecord::User(user) => {
                    t.users.insert(user.id.as_bytes(), encode(user)?)?;
                }
                ExportRecord::Key(key) => {
                    t.keys.insert(key.id.as_bytes(), encode(key)?)?;
                    for hash in secret_hashes(key)? {
                        t.key_hashes.insert(hash, key.id.as_bytes())?;
                    }
                }
                ExportRecord::Counters { key_id, counters } => {
                    t.counters.insert(key_id.as_bytes(), encode(counters)?)?;
                }
                ExportRecord::Usage { key_id, bucket } => {
                    t.usage.insert(
                        timed_key(key_id, bucket.hour, &bucket.series()),
                        encode(bucket)?,
                    )?;
                }
                ExportRecord::Call(call) => calls.push(EncodedCall::new(call.clone())),
                ExportRecord::Price(price) => {
                    t.prices.insert(price_key(price), encode(price)?)?;
                }
                ExportRecord::Model(model) => {
                    t.models.insert(model.name.as_bytes(), encode(model)?)?;
                }
                ExportRecord::Audit(record) => {
                    t.audit.insert(record.id.as_bytes(), encode(record)?)?;
                }
            }
        }
        if !calls.is_empty() {
            // The calls go to the log as they are; the books already count them (their
            // counters and hourly usage were imported above), so the position the books
            // count up to moves past them without applying them.
            let mut writes = self.writes();
            let end = self.log.append(&calls)?;
            t.meta.insert(APPLIED_KEY, &end.to_bytes())?;
            writes.applied = end;
        }
        Ok(())
    }

    fn is_empty(&self) -> Result<bool, StoreError> {
        let t = self.trees()?;
        Ok(t.users.is_empty()
            && t.keys.is_empty()
            && t.counters.is_empty()
            && self.log.end() == LogPosition::default())
    }

    fn load_users(&self) -> Result<Vec<UserRecord>, StoreError> {
        let t = self.trees()?;
        load_all(&t.users, "users")
    }

    fn load_prices(&self) -> Result<Vec<PriceRecord>, StoreError> {
        let t = self.trees()?;
        load_all(&t.prices, "prices")
    }

    fn put_price(&self, price: &PriceRecord) -> Result<(), StoreError> {
        let t = self.trees()?;
        t.prices.insert(price_key(price), encode(price)?)?;
        self.flush()
    }

    fn load_models(&self) -> Result<Vec<ModelRecord>, StoreError> {
        let t = self.trees()?;
        load_all(&t.models, "models")
    }

    fn put_model(&self, model: &ModelRecord) -> Result<(), StoreError> {
        let t = self.trees()?;
        t.models.insert(model.name.as_bytes(), encode(model)?)?;
        // An admin change is durable when it is answered, like a key's (through the
        // store's flush: sled is never synced ahead of the call log).
        self.flush()
    }

    fn delete_model(&self, name: &str) -> Result<(), StoreError> {
        let t = self.trees()?;
        t.models.remove(name.as_bytes())?;
        self.flush()
    }

    fn key_id_by_hash(&self, hash: &[u8; 32]) -> Result<Option<String>, StoreError> {
        let t = self.trees()?;
        Ok(t.key_hashes
            .get(hash)?
            .map(|id| String::from_utf8_lossy(&id).into_owned()))
    }

    fn load_key(&self, id: &str) -> Result<Option<(KeyRecord, KeyCounters)>, StoreError> {
        let t = self.trees()?;
        match t.keys.get(id.as_bytes())? {
            Some(bytes) => Ok(Some((decode("keys", &bytes)?, t.counters_of(id)?))),
            None => Ok(None),
        }
    }

    fn scan_keys(
        &self,
        after: Option<&str>,
        visit: &mut dyn FnMut(KeyRecord, KeyCounters) -> bool,
    ) -> Result<(), StoreError> {
        let t = self.trees()?;
        let entries = match after {
            Some(after) => t
                .keys
                .range::<&[u8], _>((Bound::Excluded(after.as_bytes()), Bound::Unbounded)),
            None => t.keys.iter(),
        };
        for value in entries.values() {
            let key: KeyRecord = decode("keys", &value?)?;
            let counters = t.counters_of(&key.id)?;
            if !visit(key, counters) {
                break;
            }
        }
        Ok(())
    }

    fn put_user(&self, user: &UserRecord) -> Result<(), StoreError> {
        let t = self.trees()?;
        t.users.insert(user.id.as_bytes(), encode(user)?)?;
        // Durable before the admin call answers: a key handed out must survive a kill -9
        // (and the calls the journal settles for it at restart need their key).
        self.flush()
    }

    fn put_key(&self, key: &KeyRecord) -> Result<(), StoreError> {
        let t = self.trees()?;
        let value = encode(key)?;
        let hashes = secret_hashes(key)?;
        let result = (&t.keys, &t.key_hashes).transaction(|(keys, index)| {
            // Secrets the key no longer has (forgotten by a rotation) stop finding it.
            if let Some(old) = keys.insert(key.id.as_bytes(), value.as_slice())? {
                let old: KeyRecord =
                    decode("keys", &old).map_err(ConflictableTransactionError::Abort)?;
                for hash in secret_hashes(&old).map_err(ConflictableTransactionError::Abort)? {
                    if !hashes.contains(&hash) {
                        index.remove(&hash[..])?;
                    }
                }
            }
            for hash in &hashes {
                index.insert(&hash[..], key.id.as_bytes())?;
            }
            Ok(())
        });
        match result {
            Ok(()) => self.flush(),
            Err(TransactionError::Abort(e)) => Err(e),
            Err(TransactionError::Storage(e)) => Err(e.into()),
        }
    }

    fn record_calls(&self, calls: &[CallRecord]) -> Result<(), StoreError> {
        // Rare (a retry, a recovery): the calls are encoded here.
        let calls: Vec<EncodedCall> = calls.iter().cloned().map(EncodedCall::new).collect();
        self.record(&calls, true)
    }

    fn record_new_calls(&self, calls: &[EncodedCall]) -> Result<(), StoreError> {
        self.record(calls, false)
    }

    fn recorded_reservations(
        &self,
        reservations: &[u64],
    ) -> Result<std::collections::HashSet<u64>, StoreError> {
        self.log
            .reservations_in(&reservations.iter().copied().collect())
    }

    fn calls(
        &self,
        query: &CallQuery<'_>,
        filter: &dyn Fn(&CallRecord) -> bool,
    ) -> Result<(Vec<CallRecord>, Option<CallCursor>), StoreError> {
        let from = query
            .from_micros
            .unwrap_or(i64::MIN)
            .max(self.hidden_before.load(Ordering::Relaxed));
        // Only the calls the books count: the writer appends a batch to the log before it
        // counts it, and a call listed here must already be in the counters and the usage
        // reports (a reader polling the log, then reading a report, saw it missing there
        // while the writer was preempted between the two).
        let applied = self.writes().applied;
        let before = match &query.before {
            // Past what the books count: no page gave it out.
            Some(cursor) => match from_cursor(cursor) {
                Some(at) if at <= applied => at,
                _ => return Err(StoreError::UnknownCursor),
            },
            None => applied,
        };
        let mut found = Vec::new();
        let mut last = None;
        let mut scanned = 0;
        let mut more = false;
        self.log.read_backward(
            Some(before),
            &SegmentFilter {
                key_id: query.key_id,
                from_micros: from,
            },
            &mut |at, call| {
                if found.len() == query.limit || scanned == query.scan_limit {
                    more = true;
                    return ControlFlow::Break(());
                }
                scanned += 1;
                last = Some(at);
                if call.at_micros >= from
                    && query.key_id.is_none_or(|k| call.key_id == k)
                    && filter(&call)
                {
                    found.push(call);
                }
                ControlFlow::Continue(())
            },
        )?;
        let next = last.filter(|_| more).map(to_cursor);
        Ok((found, next))
    }

    fn usage(
        &self,
        key_id: &str,
        from: UnixTime,
        to: UnixTime,
    ) -> Result<Vec<UsageBucket>, StoreError> {
        let t = self.trees()?;
        t.usage
            .range(timed_key(key_id, from, "")..timed_key(key_id, to, ""))
            .map(|entry| decode("usage", &entry?.1))
            .collect()
    }

    fn meta(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let t = self.trees()?;
        Ok(t.meta.get(name)?.map(|v| v.to_vec()))
    }

    fn put_meta(&self, name: &str, value: &[u8]) -> Result<(), StoreError> {
        let t = self.trees()?;
        t.meta.insert(name, value)?;
        Ok(())
    }

    fn put_audit(&self, record: &AuditRecord) -> Result<(), StoreError> {
        let t = self.trees()?;
        t.audit.insert(record.id.as_bytes(), encode(record)?)?;
        // Durable with the change it records (which was flushed just before).
        self.flush()
    }

    fn audit(&self, before: Option<&str>, limit: usize) -> Result<Vec<AuditRecord>, StoreError> {
        let t = self.trees()?;
        let range = match before {
            Some(before) => t.audit.range(..before.as_bytes()),
            None => t.audit.iter(),
        };
        range
            .rev()
            .take(limit)
            .map(|entry| decode("audit", &entry?.1))
            .collect()
    }

    fn prune_calls(&self, before_micros: i64, limit: usize) -> Result<usize, StoreError> {
        // Listed no more at once; their space goes a whole segment at a time, once every
        // call in it is older.
        if before_micros > self.hidden_before.load(Ordering::Relaxed) {
            let t = self.trees()?;
            t.meta.insert(HIDDEN_KEY, &before_micros.to_be_bytes())?;
            self.hidden_before.store(before_micros, Ordering::Relaxed);
        }
        self.log.prune(before_micros, limit)
    }

    fn flush(&self) -> Result<(), StoreError> {
        let t = self.trees()?;
        let mut writes = self.writes();
        // The log first: sled must never have durable counters for calls the log could lose.
        self.log.sync()?;
        t.db.flush()?;
        writes.flushed = self.log.end();
        let applied = writes.applied;
        drop(writes);
        let mut marked = self.marked.lock().unwrap_or_else(|p| p.into_inner());
        if *marked != Some(applied) {
            write_mark(&self.path, applied)?;
            *marked = Some(applied);
        }
        Ok(())
    }

    /// sled's I/O errors are sticky: after one (ENOSPC), every later write of that handle
    /// fails, even once space is back. A new handle recovers what reached the disk.
    fn reopen(&self) -> Result<(), StoreError> {
        // Until the new handle is in place, other users get an error at once rather than
        // wait. The directory lock is released when the last handle is dropped; a reader
        // still holding one delays the open (which retries a held lock).
        let old = self.trees.write().unwrap_or_else(|p| p.into_inner()).take();
        drop(old);
        let trees = open_trees(&self.path, self.cache_bytes)?;
        let applied = trees.applied()?;
        *self.trees.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(trees));
        // What a failed write left at the end of the log is cut; what the log has and the
        // reopened books do not is counted now.
        self.log.reopen()?;
        self.writes().applied = applied;
        self.count_unapplied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::testing::{call, hex_of, key};

    #[test]
    fn calls_update_counters_buckets_and_log_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let hour = 1_700_000_000 - 1_700_000_000 % 3600;
        {
            let store = SledStore::open(dir.path()).unwrap();
            store
                .record_calls(&[
                    call("key_a", hour * 1_000_000 + 1, "m1", 10),
                    call("key_a", hour * 1_000_000 + 2, "m1", 20),
                    call("key_b", hour * 1_000_000 + 3, "m1", 5),
                ])
                .unwrap();
            store
                .record_calls(&[call("key_a", (hour + 3600) * 1_000_000, "m2", 1)])
                .unwrap();
            store.flush().unwrap();
        }
        let store = SledStore::open(dir.path()).unwrap();
        let counters = |id| counters_of(&store, id);
        assert_eq!(counters("key_a").requests, 3);
        assert_eq!(counters("key_a").prompt_tokens, 31);
        assert_eq!(counters("key_a").completion_tokens, 3);
        assert_eq!(counters("key_b").requests, 1);

        let query = |key_id, before, limit| CallQuery {
            key_id,
            before,
            from_micros: None,
            limit,
            scan_limit: 1000,
        };
        let all = |_: &CallRecord| true;
        let (calls, next) = store.calls(&query(Some("key_a"), None, 10), &all).unwrap();
        let times: Vec<i64> = calls.iter().map(|c| c.at_micros).collect();
        assert_eq!(
            times,
            vec![
                (hour + 3600) * 1_000_000,
                hour * 1_000_000 + 2,
                hour * 1_000_000 + 1
            ]
        );
        assert_eq!(next, None);
        let (page, next) = store.calls(&query(Some("key_a"), None, 2), &all).unwrap();
        assert_eq!(page.len(), 2);
        let (older, _) = store.calls(&query(Some("key_a"), next, 10), &all).unwrap();
        assert_eq!(older.len(), 1);
        assert_eq!(older[0].at_micros, hour * 1_000_000 + 1);
        let (everyone, _) = store.calls(&query(None, None, 10), &all).unwrap();
        assert_eq!(everyone.len(), 4);
        let only_b = |c: &CallRecord| c.key_id == "key_b";
        let (b, _) = store.calls(&query(None, None, 10), &only_b).unwrap();
        assert_eq!(b.len(), 1);

        let buckets = store.usage("key_a", hour, hour + 7200).unwrap();
        assert_eq!(buckets.len(), 2);
        assert_eq!((buckets[0].model.as_str(), buckets[0].requests), ("m1", 2));
        assert_eq!(buckets[0].prompt_tokens, 30);
        assert_eq!(buckets[1].model, "m2");
        assert!(
            store
                .usage("key_a", hour + 7200, hour + 9000)
                .unwrap()
                .is_empty()
        );
    }

    fn found(store: &SledStore, secret: &str) -> Option<String> {
        store
            .key_id_by_hash(&crate::core::keys::hash_secret(secret))
            .unwrap()
    }

    #[test]
    fn keys_are_found_by_their_current_and_previous_secrets_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let mut a = key("key_a", "one");
        store.put_key(&a).unwrap();
        store.put_key(&key("key_b", "other")).unwrap();
        assert_eq!(found(&store, "one").as_deref(), Some("key_a"));
        assert_eq!(found(&store, "nobody"), None);

        // A rotation keeps the previous secret; the next one forgets it.
        a.previous_hash = Some(std::mem::replace(&mut a.hash, hex_of("two")));
        store.put_key(&a).unwrap();
        assert_eq!(found(&store, "one").as_deref(), Some("key_a"));
        assert_eq!(found(&store, "two").as_deref(), Some("key_a"));
        a.previous_hash = Some(std::mem::replace(&mut a.hash, hex_of("three")));
        store.put_key(&a).unwrap();
        assert_eq!(found(&store, "one"), None);
        assert_eq!(found(&store, "two").as_deref(), Some("key_a"));
        assert_eq!(found(&store, "three").as_deref(), Some("key_a"));
        assert_eq!(found(&store, "other").as_deref(), Some("key_b"));

        let (loaded, counters) = store.load_key("key_a").unwrap().unwrap();
        assert_eq!((loaded, counters), (a, KeyCounters::default()));
        assert!(store.load_key("key_c").unwrap().is_none());
    }

    #[test]
    fn keys_are_scanned_in_id_order_from_a_cursor_with_their_counters() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        for id in ["key_3", "key_1", "key_2", "key_4"] {
            store.put_key(&key(id, id)).unwrap();
        }
        store.record_calls(&[call("key_2", 1, "m", 7)]).unwrap();
        let scan = |after, limit| {
            let mut seen = Vec::new();
            store
                .scan_keys(after, &mut |k, c| {
                    seen.push((k.id, c.prompt_tokens));
                    seen.len() < limit
                })
                .unwrap();
            seen
        };
        let ids = |seen: Vec<(String, u64)>| seen.into_iter().map(|(id, _)| id).collect::<Vec<_>>();
        assert_eq!(ids(scan(None, 10)), ["key_1", "key_2", "key_3", "key_4"]);
        assert_eq!(ids(scan(None, 2)), ["key_1", "key_2"]);
        assert_eq!(scan(Some("key_1"), 1), [("key_2".to_owned(), 7)]);
        assert_eq!(ids(scan(Some("key_4"), 10)), Vec::<String>::new());
    }

    #[test]
    fn a_schema_1_store_gets_its_key_index_at_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SledStore::open(dir.path()).unwrap();
            store.put_key(&key("key_a", "one")).unwrap();
            // What a schema-1 build left: keys, no index.
            store.trees().unwrap().key_hashes.clear().unwrap();
            store.put_meta(SCHEMA_KEY, b"1").unwrap();
            store.flush().unwrap();
            assert_eq!(found(&store, "one"), None);
        }
        let store = SledStore::open(dir.path()).unwrap();
        assert_eq!(found(&store, "one").as_deref(), Some("key_a"));
        assert_eq!(
            store.meta(SCHEMA_KEY).unwrap().as_deref(),
            Some(SCHEMA_VERSION.to_string().as_bytes())
        );
    }

    fn counters_of(store: &SledStore, id: &str) -> KeyCounters {
        store.trees().unwrap().counters_of(id).unwrap()
    }

    #[test]
    fn pruned_calls_leave_the_listing_at_once_and_for_good_and_the_books_stay() {
        let dir = tempfile::tempdir().unwrap();
        let hour = 3_600_000_000;
        {
            let store = SledStore::open(dir.path()).unwrap();
            store
                .record_calls(&[
                    call("key_a", hour + 1, "m", 10),
                    call("key_a", hour + 2, "m", 10),
                    call("key_b", hour + 3, "m", 10),
                    call("key_a", 3 * hour, "m", 10),
                ])
                .unwrap();
            // Their segment is the one being written: it stays on disk, they are not listed.
            assert_eq!(store.prune_calls(2 * hour, 2).unwrap(), 0);
            assert_eq!(times(&store, None), [3 * hour]);
            assert_eq!(times(&store, Some("key_a")), [3 * hour]);
            assert!(times(&store, Some("key_b")).is_empty());
            store.flush().unwrap();
        }
        let store = SledStore::open(dir.path()).unwrap();
        assert_eq!(times(&store, None), [3 * hour]);
        assert_eq!(counters_of(&store, "key_a").requests, 3);
        assert_eq!(store.usage("key_b", 0, 7200).unwrap()[0].requests, 1);
    }

    fn times(store: &SledStore, key_id: Option<&str>) -> Vec<i64> {
        let query = CallQuery {
            key_id,
            before: None,
            from_micros: None,
            limit: 10,
            scan_limit: 1000,
        };
        let (calls, _) = store.calls(&query, &|_: &CallRecord| true).unwrap();
        calls.iter().map(|c| c.at_micros).collect()
    }

    #[test]
    fn calls_the_log_has_and_the_books_lost_are_counted_at_the_next_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SledStore::open(dir.path()).unwrap();
            store.record_calls(&[call("key_a", 1, "m", 10)]).unwrap();
            store.flush().unwrap();
            // A hard stop after a batch reached the log and before sled had it.
            store
                .log
                .append(&[EncodedCall::new(call("key_a", 2, "m", 10))])
                .unwrap();
        }
        let store = SledStore::open(dir.path()).unwrap();
        assert_eq!(counters_of(&store, "key_a").requests, 2);
        assert_eq!(store.usage("key_a", 0, 7200).unwrap()[0].requests, 2);
        drop(store);
        // Counted once: the books now count the log to its end.
        let store = SledStore::open(dir.path()).unwrap();
        assert_eq!(counters_of(&store, "key_a").requests, 2);
    }

    #[test]
    fn a_schema_3_store_moves_its_call_log_out_of_sled_without_counting_it_again() {
        let dir = tempfile::tempdir().unwrap();
        let old_key = |at: i64, id: &str| {
            let mut key = at.to_be_bytes().to_vec();
            key.extend_from_slice(id.as_bytes());
            key
        };
        {
            // What a schema-3 build left: the calls in sled, counted, and its mark.
            let db = sled::open(dir.path()).unwrap();
            let calls = db.open_tree("calls").unwrap();
            for at in [1, 2] {
                let record = call("key_a", at, "m", 10);
                calls
                    .insert(old_key(at, &record.request_id), encode(&record).unwrap())
                    .unwrap();
            }
            let counters = KeyCounters {
                requests: 2,
                ..KeyCounters::default()
            };
            db.open_tree("counters")
                .unwrap()
                .insert("key_a", encode(&counters).unwrap())
                .unwrap();
            db.open_tree("meta")
                .unwrap()
                .insert(SCHEMA_KEY, encode(&3u32).unwrap())
                .unwrap();
            db.flush().unwrap();
            let mark: String = old_key(2, "req-2")
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            std::fs::write(dir.path().join(MARK_FILE), mark).unwrap();
        }
        for _ in 0..2 {
            let store = SledStore::open(dir.path()).unwrap();
            assert_eq!(times(&store, None), [2, 1]);
            assert_eq!(counters_of(&store, "key_a").requests, 2);
            let t = store.trees().unwrap();
            assert!(!t.db.tree_names().iter().any(|n| n.as_ref() == b"calls"));
            assert_eq!(
                store.meta(SCHEMA_KEY).unwrap().as_deref(),
                Some(SCHEMA_VERSION.to_string().as_bytes())
            );
        }
    }

    #[test]
    fn a_store_from_a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SledStore::open(dir.path()).unwrap();
            store.put_meta(SCHEMA_KEY, b"99").unwrap();
            store.flush().unwrap();
        }
        let err = SledStore::open(dir.path()).err().unwrap();
        assert!(
            matches!(err, StoreError::NewerSchema { found: 99, .. }),
            "{err}"
        );
    }

    #[test]
    fn a_call_already_in_the_log_is_not_counted_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let first = call("key_a", 1_000_000, "m", 10);
        let second = call("key_a", 2_000_000, "m", 20);
        store.record_calls(std::slice::from_ref(&first)).unwrap();
        // A retried batch that partly reached the store, with a repeat inside it.
        store
            .record_calls(&[first, second.clone(), second])
            .unwrap();
        let counters = counters_of(&store, "key_a");
        assert_eq!(counters.requests, 2);
        assert_eq!(counters.prompt_tokens, 30);
        let buckets = store.usage("key_a", 0, 7200).unwrap();
        assert_eq!(buckets[0].requests, 2);
    }

    #[test]
    fn a_call_is_kept_once_per_reservation_whatever_its_time() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let mut settled = call("key_a", 1_000_000, "m", 10);
        settled.reservation = Some(7);
        store
            .record_new_calls(&[EncodedCall::new(settled)])
            .unwrap();
        // Settled again at recovery, at another time: the reservation is already there.
        let mut again = call("key_a", 2_000_000, "m", 10);
        again.reservation = Some(7);
        let mut other = call("key_a", 3_000_000, "m", 10);
        other.reservation = Some(8);
        store.record_calls(&[again, other]).unwrap();
        assert_eq!(counters_of(&store, "key_a").requests, 2);
        let found = store.recorded_reservations(&[6, 7, 8]).unwrap();
        assert_eq!(found, [7, 8].into_iter().collect());
    }

    #[test]
    fn a_reopened_store_keeps_what_was_flushed_and_takes_writes() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        store.record_calls(&[call("key_a", 1, "m", 10)]).unwrap();
        store.flush().unwrap();
        store.reopen().unwrap();
        store.record_calls(&[call("key_a", 2, "m", 10)]).unwrap();
        assert_eq!(counters_of(&store, "key_a").requests, 2);
    }

    #[test]
    fn a_store_that_lost_its_schema_version_is_refused_not_served_empty() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SledStore::open(dir.path()).unwrap();
            store.trees().unwrap().meta.remove(SCHEMA_KEY).unwrap();
            store.flush().unwrap();
        }
        let err = SledStore::open(dir.path()).err().unwrap();
        let message = err.to_string();
        assert!(
            message.contains(&dir.path().display().to_string())
                && message.contains("without a schema version"),
            "{message}"
        );
    }

    #[test]
    fn books_that_count_less_than_a_flush_confirmed_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SledStore::open(dir.path()).unwrap();
            store.record_calls(&[call("key_a", 1, "m", 10)]).unwrap();
            store.record_calls(&[call("key_a", 2, "m", 10)]).unwrap();
            store.flush().unwrap();
            // What sled does to a log damaged before the last batch: it is simply gone.
            let t = store.trees().unwrap();
            t.meta
                .insert(APPLIED_KEY, &LogPosition::default().to_bytes())
                .unwrap();
            t.db.flush().unwrap();
        }
        let message = SledStore::open(dir.path()).err().unwrap().to_string();
        assert!(
            message.contains("lost records it had confirmed durable")
                && message.contains(&dir.path().join(MARK_FILE).display().to_string()),
            "{message}"
        );
        // Deleting the mark accepts the loss; the calls are counted again from the log.
        std::fs::remove_file(dir.path().join(MARK_FILE)).unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        assert_eq!(times(&store, None), [2, 1]);
    }

    fn exported(store: &SledStore) -> Vec<ExportRecord> {
        let mut records = Vec::new();
        store
            .export(&mut |r| {
                records.push(r);
                Ok(())
            })
            .unwrap();
        records
    }

    #[test]
    fn an_export_imported_into_an_empty_store_exports_the_same_books() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(&dir.path().join("a")).unwrap();
        store
            .put_user(&crate::core::testing::user("usr_1"))
            .unwrap();
        store.put_key(&key("key_a", "one")).unwrap();
        store.put_meta("admin_token_hash", &[0, 1, 255]).unwrap();
        let mut reserved = call("key_a", 7_200_000_000, "m2", 4);
        reserved.reservation = Some(42);
        store
            .record_calls(&[call("key_a", 3_600_000_001, "m", 10), reserved])
            .unwrap();
        // A pruned call leaves its counters and hourly usage: the export carries them as
        // they are, not as the log would sum them.
        store.prune_calls(3_600_000_002, 10).unwrap();
        let records = exported(&store);
        assert!(
            !records
                .iter()
                .any(|r| matches!(r, ExportRecord::Meta { name, .. } if name == SCHEMA_KEY))
        );

        let copy = SledStore::open(&dir.path().join("b")).unwrap();
        assert!(copy.is_empty().unwrap());
        copy.import(&records).unwrap();
        assert!(!copy.is_empty().unwrap());
        assert_eq!(exported(&copy), records);
        assert_eq!(counters_of(&copy, "key_a").requests, 2);
        assert_eq!(found(&copy, "one").as_deref(), Some("key_a"));
        assert_eq!(
            copy.meta("admin_token_hash").unwrap(),
            Some(vec![0, 1, 255])
        );
        assert_eq!(copy.recorded_reservations(&[42, 43]).unwrap().len(), 1);
        let (calls, _) = copy
            .calls(
                &CallQuery {
                    key_id: Some("key_a"),
                    before: None,
                    from_micros: None,
                    limit: 10,
                    scan_limit: 100,
                },
                &|_: &CallRecord| true,
            )
            .unwrap();
        assert_eq!(calls.len(), 1);
    }
}
