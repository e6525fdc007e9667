//! The sled implementation of [`Store`]: one tree per kind of record, JSON values.

use std::collections::HashMap;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use serde::Serialize;
use serde::de::DeserializeOwned;
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};

use super::SCHEMA_VERSION;
use crate::core::keys::to_hex;
use crate::core::records::ExportRecord;
use crate::core::records::{CallRecord, KeyCounters, KeyRecord, UsageBucket, UserRecord};
use crate::core::store::{CallCursor, CallQuery, Store, StoreError};
use crate::core::time::UnixTime;

const SCHEMA_KEY: &str = "schema_version";

/// sled's page cache: the hot records are users, keys and counters, all small.
const CACHE_BYTES: u64 = 64 * 1024 * 1024;

pub struct SledStore {
    path: PathBuf,
    flush_ms: u64,
    /// `None` only while [`Store::reopen`] swaps the handle.
    trees: RwLock<Option<Arc<Trees>>>,
    marks: Mutex<Marks>,
}

/// A file beside sled's own naming the last call a flush confirmed durable.
///
/// sled reads its log up to the first damaged byte and silently drops the rest, as it
/// would a write torn by a crash: a flipped byte in the middle of `db` rolls the books
/// back without an error. A call that was confirmed durable and is missing at open
/// proves such a loss, and the store refuses to open.
const MARK_FILE: &str = "durable-call";

/// The last call written, and the one [`MARK_FILE`] names (log keys).
#[derive(Debug, Default)]
struct Marks {
    written: Option<Vec<u8>>,
    marked: Option<Vec<u8>>,
}

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
    /// The call log: `big-endian(micros) request_id` → record.
    calls: sled::Tree,
    /// A key's calls: `key_id NUL big-endian(micros) request_id` → nothing.
    calls_by_key: sled::Tree,
    /// `big-endian(reservation)` → the call's log key: one call per durable reservation.
    reservations: sled::Tree,
    meta: sled::Tree,
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Io(e.to_string())
    }
}

impl SledStore {
    /// Writes a batch; `dedupe` skips calls already in the log (a retried batch).
    fn record(&self, calls: &[CallRecord], dedupe: bool) -> Result<(), StoreError> {
        let t = self.trees()?;
        // Fold the batch first, so each counter and bucket is read and written once.
        let mut counters: HashMap<&str, KeyCounters> = HashMap::new();
        let mut buckets: HashMap<Vec<u8>, UsageBucket> = HashMap::new();
        let mut log = Vec::with_capacity(calls.len());
        let mut seen =
            std::collections::HashSet::with_capacity(if dedupe { calls.len() } else { 0 });
        let mut seen_reservations = std::collections::HashSet::new();
        for call in calls {
            // A call already in the log is not counted again: a batch retried after a
            // failure may have reached the disk before it. Read outside the transaction:
            // the usage writer is the only writer of the log.
            let key = call_key(call.at_micros, &call.request_id);
            if dedupe && (!seen.insert(key.clone()) || t.calls.contains_key(&key)?) {
                continue;
            }
            // A call settled again at recovery has another time than the one the last run
            // may have written: its reservation tells.
            if dedupe
                && let Some(id) = call.reservation
                && (!seen_reservations.insert(id)
                    || t.reservations.contains_key(id.to_be_bytes())?)
            {
                continue;
            }
            counters
                .entry(&call.key_id)
                .or_default()
                .add(&call.counters());
            let hour = hour_of(call.at_micros);
            let bucket = buckets
                .entry(timed_key(&call.key_id, hour, &call.model))
                .or_insert_with(|| UsageBucket {
                    hour,
                    model: call.model.clone(),
                    ..UsageBucket::default()
                });
            bucket.requests += u64::from(call.charged_request);
            bucket.errors += u64::from(call.status >= 400);
            bucket.prompt_tokens += call.usage.prompt_tokens;
            bucket.completion_tokens += call.usage.completion_tokens;
            bucket.images += u64::from(call.images);
            log.push((
                key,
                timed_key(&call.key_id, call.at_micros, &call.request_id),
                encode(call)?,
                call.reservation,
            ));
        }
        let trees = (
            &t.counters,
            &t.usage,
            &t.calls,
            &t.calls_by_key,
            &t.reservations,
        );
        let result = trees.transaction(
            |(counter_tree, usage_tree, call_tree, by_key_tree, reservation_tree)| {
                for (key_id, delta) in &counters {
                    let mut total: KeyCounters = match counter_tree.get(key_id.as_bytes())? {
                        Some(bytes) => decode("counters", &bytes)
                            .map_err(ConflictableTransactionError::Abort)?,
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
                            ..UsageBucket::default()
                        },
                    };
                    bucket.requests += delta.requests;
                    bucket.errors += delta.errors;
                    bucket.prompt_tokens += delta.prompt_tokens;
                    bucket.completion_tokens += delta.completion_tokens;
                    bucket.images += delta.images;
                    let bytes = encode(&bucket).map_err(ConflictableTransactionError::Abort)?;
                    usage_tree.insert(key.as_slice(), bytes)?;
                }
                for (key, by_key, value, reservation) in &log {
                    call_tree.insert(key.as_slice(), value.as_slice())?;
                    by_key_tree.insert(by_key.as_slice(), &[])?;
                    if let Some(id) = reservation {
                        reservation_tree.insert(&id.to_be_bytes(), key.as_slice())?;
                    }
                }
                Ok(())
            },
        );
        match result {
            Ok(()) => {
                if let Some((key, _, _, _)) = log.last() {
                    self.marks.lock().unwrap_or_else(|p| p.into_inner()).written =
                        Some(key.clone());
                }
                Ok(())
            }
            Err(TransactionError::Abort(e)) => Err(e),
            Err(TransactionError::Storage(e)) => Err(e.into()),
        }
    }

    /// Opens (or creates) the store in `path`; sled makes writes durable every `flush_ms`.
    ///
    /// sled locks the directory; a process that is still exiting holds the lock for a
    /// moment, so a locked directory is retried for up to two seconds.
    pub fn open(path: &Path, flush_ms: u64) -> Result<Self, StoreError> {
        let trees = open_trees(path, flush_ms)?;
        let marked = read_mark(path)?;
        Ok(SledStore {
            path: path.to_owned(),
            flush_ms,
            trees: RwLock::new(Some(Arc::new(trees))),
            marks: Mutex::new(Marks {
                written: marked.clone(),
                marked,
            }),
        })
    }

    fn trees(&self) -> Result<Arc<Trees>, StoreError> {
        self.trees
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| StoreError::Io(format!("{} is being reopened", self.path.display())))
    }
}

fn open_trees(path: &Path, flush_ms: u64) -> Result<Trees, StoreError> {
    let config = sled::Config::new()
        .path(path)
        // sled would cache up to 1 GiB; the records the gateway reads back are few.
        .cache_capacity(CACHE_BYTES)
        .flush_every_ms(Some(flush_ms.max(1)));
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
        calls: db.open_tree("calls")?,
        calls_by_key: db.open_tree("calls_by_key")?,
        reservations: db.open_tree("reservations")?,
        meta: db.open_tree("meta")?,
        db,
    };
    trees.check_schema(path, existed)?;
    if let Some(mark) = read_mark(path)?
        && !trees.calls.contains_key(&mark)?
    {
        let (at, request_id) = mark.split_at(8.min(mark.len()));
        let micros = i64::from_be_bytes(at.try_into().unwrap_or_default());
        return Err(StoreError::Corrupt {
            tree: "calls",
            message: format!(
                "{} lost records it had confirmed durable (call {} of {} µs since the epoch \
                 is missing): its files were damaged or truncated, and sled drops everything \
                 after the first damaged byte. Restore a backup, or delete {} to accept the loss",
                path.display(),
                String::from_utf8_lossy(request_id),
                micros,
                path.join(MARK_FILE).display()
            ),
        });
    }
    Ok(trees)
}

fn read_mark(path: &Path) -> Result<Option<Vec<u8>>, StoreError> {
    let file = path.join(MARK_FILE);
    match std::fs::read_to_string(&file) {
        Ok(text) => from_hex(text.trim())
            .map(Some)
            .ok_or_else(|| StoreError::Corrupt {
                tree: "calls",
                message: format!("{} is not a mark this gateway wrote", file.display()),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StoreError::Io(format!(
            "cannot read {}: {e}",
            file.display()
        ))),
    }
}

/// Replaces the mark atomically and durably: a new file, synced, renamed, dir synced.
fn write_mark(path: &Path, key: &[u8]) -> Result<(), StoreError> {
    use std::io::Write;
    let io = |e: std::io::Error| {
        StoreError::Io(format!(
            "cannot write {}: {e}",
            path.join(MARK_FILE).display()
        ))
    };
    let temporary = path.join(format!("{MARK_FILE}.new"));
    let mut file = std::fs::File::create(&temporary).map_err(io)?;
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    file.write_all(hex.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&temporary, path.join(MARK_FILE)).map_err(io)?;
    std::fs::File::open(path)
        .and_then(|dir| dir.sync_all())
        .map_err(io)?;
    Ok(())
}

fn from_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
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

/// `big-endian(time) request_id`, the call log's order.
fn call_key(at_micros: i64, request_id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(8 + request_id.len());
    key.extend_from_slice(&at_micros.to_be_bytes());
    key.extend_from_slice(request_id.as_bytes());
    key
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
            // The schema version belongs to the store that holds the books, not to them.
            if name.as_ref() == SCHEMA_KEY.as_bytes() {
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
        for value in t.calls.iter().values() {
            visit(ExportRecord::Call(decode("calls", &value?)?))?;
        }
        Ok(())
    }

    fn import(&self, records: &[ExportRecord]) -> Result<(), StoreError> {
        let t = self.trees()?;
        let mut last_call = None;
        for record in records {
            match record {
                ExportRecord::Meta { name, value } => {
                    let bytes = from_hex(value).ok_or_else(|| StoreError::Corrupt {
                        tree: "meta",
                        message: format!("the setting `{name}` is not hex"),
                    })?;
                    t.meta.insert(name.as_bytes(), bytes)?;
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
                        timed_key(key_id, bucket.hour, &bucket.model),
                        encode(bucket)?,
                    )?;
                }
                ExportRecord::Call(call) => {
                    let log_key = call_key(call.at_micros, &call.request_id);
                    t.calls.insert(log_key.as_slice(), encode(call)?)?;
                    t.calls_by_key.insert(
                        timed_key(&call.key_id, call.at_micros, &call.request_id),
                        &[],
                    )?;
                    if let Some(id) = call.reservation {
                        t.reservations
                            .insert(id.to_be_bytes(), log_key.as_slice())?;
                    }
                    last_call = Some(log_key);
                }
            }
        }
        if let Some(key) = last_call {
            // The next flush names a call it made durable, as after any write of the log.
            self.marks.lock().unwrap_or_else(|p| p.into_inner()).written = Some(key);
        }
        Ok(())
    }

    fn is_empty(&self) -> Result<bool, StoreError> {
        let t = self.trees()?;
        Ok(t.users.is_empty() && t.keys.is_empty() && t.calls.is_empty() && t.counters.is_empty())
    }

    fn load_users(&self) -> Result<Vec<UserRecord>, StoreError> {
        let t = self.trees()?;
        load_all(&t.users, "users")
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
        t.db.flush()?;
        Ok(())
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
            Ok(()) => {
                t.db.flush()?;
                Ok(())
            }
            Err(TransactionError::Abort(e)) => Err(e),
            Err(TransactionError::Storage(e)) => Err(e.into()),
        }
    }

    fn record_calls(&self, calls: &[CallRecord]) -> Result<(), StoreError> {
        self.record(calls, true)
    }

    fn record_new_calls(&self, calls: &[CallRecord]) -> Result<(), StoreError> {
        self.record(calls, false)
    }

    fn recorded_reservations(
        &self,
        reservations: &[u64],
    ) -> Result<std::collections::HashSet<u64>, StoreError> {
        let t = self.trees()?;
        let mut found = std::collections::HashSet::new();
        for &id in reservations {
            if t.reservations.contains_key(id.to_be_bytes())? {
                found.insert(id);
            }
        }
        Ok(found)
    }

    fn calls(
        &self,
        query: &CallQuery<'_>,
        filter: &dyn Fn(&CallRecord) -> bool,
    ) -> Result<(Vec<CallRecord>, Option<CallCursor>), StoreError> {
        let t = self.trees()?;
        // Keys order as unsigned bytes, so times below zero would sort last: there are none.
        let from = query.from_micros.unwrap_or(0).max(0);
        let before = |prefix: Vec<u8>| match &query.before {
            Some(cursor) => {
                let mut end = prefix;
                end.extend_from_slice(&call_key(cursor.at_micros, &cursor.request_id));
                end
            }
            None => {
                let mut end = prefix;
                end.extend_from_slice(&i64::MAX.to_be_bytes());
                end
            }
        };
        // Each entry yields the log key (time, request id) of one call, newest first.
        let entries: Box<dyn Iterator<Item = sled::Result<Vec<u8>>>> = match query.key_id {
            Some(key_id) => {
                let prefix = key_prefix(key_id);
                let mut start = prefix.clone();
                start.extend_from_slice(&from.to_be_bytes());
                let skip = prefix.len();
                Box::new(
                    t.calls_by_key
                        .range(start..before(prefix))
                        .keys()
                        .rev()
                        .map(move |k| k.map(|k| k[skip..].to_vec())),
                )
            }
            None => Box::new(
                t.calls
                    .range(from.to_be_bytes().to_vec()..before(Vec::new()))
                    .keys()
                    .rev()
                    .map(|k| k.map(|k| k.to_vec())),
            ),
        };
        let mut found = Vec::new();
        let mut last = None;
        for (scanned, entry) in entries.enumerate() {
            if found.len() == query.limit || scanned == query.scan_limit {
                return Ok((found, last));
            }
            let log_key = entry?;
            let Some(value) = t.calls.get(&log_key)? else {
                continue;
            };
            let call: CallRecord = decode("calls", &value)?;
            last = Some(CallCursor {
                at_micros: call.at_micros,
                request_id: call.request_id.clone(),
            });
            if filter(&call) {
                found.push(call);
            }
        }
        Ok((found, None))
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

    fn prune_calls(&self, before_micros: i64, limit: usize) -> Result<usize, StoreError> {
        let t = self.trees()?;
        let mut end = before_micros.max(0).to_be_bytes().to_vec();
        // The call the durability mark names must stay: the next start looks for it.
        if let Some(marked) = &self.marks.lock().unwrap_or_else(|p| p.into_inner()).marked
            && *marked < end
        {
            end.clone_from(marked);
        }
        let mut pruned = 0;
        for entry in t.calls.range(..end).take(limit) {
            let (log_key, value) = entry?;
            if let Ok(call) = decode::<CallRecord>("calls", &value) {
                t.calls_by_key
                    .remove(timed_key(&call.key_id, call.at_micros, &call.request_id))?;
                if let Some(id) = call.reservation {
                    t.reservations.remove(id.to_be_bytes())?;
                }
            }
            t.calls.remove(log_key)?;
            pruned += 1;
        }
        Ok(pruned)
    }

    fn flush(&self) -> Result<(), StoreError> {
        let t = self.trees()?;
        t.db.flush()?;
        let mut marks = self.marks.lock().unwrap_or_else(|p| p.into_inner());
        if marks.written != marks.marked
            && let Some(written) = &marks.written
        {
            write_mark(&self.path, written)?;
            marks.marked = Some(written.clone());
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
        let trees = open_trees(&self.path, self.flush_ms)?;
        *self.trees.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(trees));
        Ok(())
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
            let store = SledStore::open(dir.path(), 100).unwrap();
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
        let store = SledStore::open(dir.path(), 100).unwrap();
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
        let store = SledStore::open(dir.path(), 100).unwrap();
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
        let store = SledStore::open(dir.path(), 100).unwrap();
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
            let store = SledStore::open(dir.path(), 100).unwrap();
            store.put_key(&key("key_a", "one")).unwrap();
            // What a schema-1 build left: keys, no index.
            store.trees().unwrap().key_hashes.clear().unwrap();
            store.put_meta(SCHEMA_KEY, b"1").unwrap();
            store.flush().unwrap();
            assert_eq!(found(&store, "one"), None);
        }
        let store = SledStore::open(dir.path(), 100).unwrap();
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
    fn pruning_removes_old_calls_from_the_log_and_keeps_the_books() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 100).unwrap();
        let hour = 3_600_000_000;
        store
            .record_calls(&[
                call("key_a", hour + 1, "m", 10),
                call("key_a", hour + 2, "m", 10),
                call("key_b", hour + 3, "m", 10),
                call("key_a", 3 * hour, "m", 10),
            ])
            .unwrap();
        assert_eq!(store.prune_calls(2 * hour, 2).unwrap(), 2);
        assert_eq!(store.prune_calls(2 * hour, 100).unwrap(), 1);
        assert_eq!(store.prune_calls(2 * hour, 100).unwrap(), 0);
        let query = |key_id| CallQuery {
            key_id,
            before: None,
            from_micros: None,
            limit: 10,
            scan_limit: 1000,
        };
        let times = |key_id| {
            let (calls, _) = store.calls(&query(key_id), &|_: &CallRecord| true).unwrap();
            calls.iter().map(|c| c.at_micros).collect::<Vec<_>>()
        };
        assert_eq!(times(None), [3 * hour]);
        assert_eq!(times(Some("key_a")), [3 * hour]);
        assert!(times(Some("key_b")).is_empty());
        assert_eq!(counters_of(&store, "key_a").requests, 3);
        assert_eq!(store.usage("key_b", 0, 7200).unwrap()[0].requests, 1);
    }

    #[test]
    fn pruning_keeps_the_call_the_durability_mark_names() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SledStore::open(dir.path(), 100).unwrap();
            store.record_calls(&[call("key_a", 5, "m", 1)]).unwrap();
            store.flush().unwrap();
            assert_eq!(store.prune_calls(i64::MAX, 100).unwrap(), 0);
            store.record_calls(&[call("key_a", 6, "m", 1)]).unwrap();
            store.flush().unwrap();
            assert_eq!(store.prune_calls(i64::MAX, 100).unwrap(), 1);
        }
        // The start-up check still finds the marked call.
        SledStore::open(dir.path(), 100).unwrap();
    }

    #[test]
    fn a_store_from_a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SledStore::open(dir.path(), 100).unwrap();
            store.put_meta(SCHEMA_KEY, b"99").unwrap();
            store.flush().unwrap();
        }
        let err = SledStore::open(dir.path(), 100).err().unwrap();
        assert!(
            matches!(err, StoreError::NewerSchema { found: 99, .. }),
            "{err}"
        );
    }

    #[test]
    fn a_call_already_in_the_log_is_not_counted_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 100).unwrap();
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
        let store = SledStore::open(dir.path(), 100).unwrap();
        let mut settled = call("key_a", 1_000_000, "m", 10);
        settled.reservation = Some(7);
        store.record_new_calls(&[settled]).unwrap();
        // Settled again at recovery, at another time: the reservation is already there.
        let mut again = call("key_a", 2_000_000, "m", 10);
        again.reservation = Some(7);
        let mut other = call("key_a", 3_000_000, "m", 10);
        other.reservation = Some(8);
        store.record_calls(&[again, other]).unwrap();
        assert_eq!(counters_of(&store, "key_a").requests, 2);
        let found = store.recorded_reservations(&[6, 7, 8]).unwrap();
        assert_eq!(found, [7, 8].into_iter().collect());
        // Pruned with its call.
        store.prune_calls(i64::MAX, 10).unwrap();
        assert!(store.recorded_reservations(&[7, 8]).unwrap().is_empty());
    }

    #[test]
    fn a_reopened_store_keeps_what_was_flushed_and_takes_writes() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 100).unwrap();
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
            let store = SledStore::open(dir.path(), 100).unwrap();
            store.trees().unwrap().meta.remove(SCHEMA_KEY).unwrap();
            store.flush().unwrap();
        }
        let err = SledStore::open(dir.path(), 100).err().unwrap();
        let message = err.to_string();
        assert!(
            message.contains(&dir.path().display().to_string())
                && message.contains("without a schema version"),
            "{message}"
        );
    }

    #[test]
    fn a_store_missing_a_call_it_confirmed_durable_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SledStore::open(dir.path(), 100).unwrap();
            store.record_calls(&[call("key_a", 1, "m", 10)]).unwrap();
            store.record_calls(&[call("key_a", 2, "m", 10)]).unwrap();
            store.flush().unwrap();
            // What sled does to a log damaged before this call: it is simply gone.
            store
                .trees()
                .unwrap()
                .calls
                .remove(call_key(2, "req-2"))
                .unwrap();
            store.trees().unwrap().db.flush().unwrap();
        }
        let message = SledStore::open(dir.path(), 100).err().unwrap().to_string();
        assert!(
            message.contains("lost records it had confirmed durable (call req-2")
                && message.contains(&dir.path().join(MARK_FILE).display().to_string()),
            "{message}"
        );
        // Deleting the mark accepts the loss.
        std::fs::remove_file(dir.path().join(MARK_FILE)).unwrap();
        assert!(SledStore::open(dir.path(), 100).is_ok());
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
        let store = SledStore::open(&dir.path().join("a"), 100).unwrap();
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

        let copy = SledStore::open(&dir.path().join("b"), 100).unwrap();
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
