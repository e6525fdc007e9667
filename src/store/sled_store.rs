//! The sled implementation of [`Store`]: one tree per kind of record, JSON values.

use std::collections::HashMap;
use std::ops::Bound;
use std::path::Path;

use serde::Serialize;
use serde::de::DeserializeOwned;
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};

use super::{CallCursor, CallQuery, SCHEMA_VERSION, Store, StoreError};
use crate::core::records::{CallRecord, KeyCounters, KeyRecord, UnixTime, UsageBucket, UserRecord};

const SCHEMA_KEY: &str = "schema_version";

/// sled's page cache: the hot records are users, keys and counters, all small.
const CACHE_BYTES: u64 = 64 * 1024 * 1024;

pub struct SledStore {
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
    meta: sled::Tree,
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Io(e.to_string())
    }
}

impl SledStore {
    /// Opens (or creates) the store in `path`; sled makes writes durable every `flush_ms`.
    ///
    /// sled locks the directory; a process that is still exiting holds the lock for a
    /// moment, so a locked directory is retried for up to two seconds.
    pub fn open(path: &Path, flush_ms: u64) -> Result<Self, StoreError> {
        let config = sled::Config::new()
            .path(path)
            // sled would cache up to 1 GiB; the records the gateway reads back are few.
            .cache_capacity(CACHE_BYTES)
            .flush_every_ms(Some(flush_ms.max(1)));
        let mut attempts = 0;
        let db = loop {
            match config.open() {
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
        let store = SledStore {
            users: db.open_tree("users")?,
            keys: db.open_tree("keys")?,
            key_hashes: db.open_tree("key_hashes")?,
            counters: db.open_tree("counters")?,
            usage: db.open_tree("usage")?,
            calls: db.open_tree("calls")?,
            calls_by_key: db.open_tree("calls_by_key")?,
            meta: db.open_tree("meta")?,
            db,
        };
        store.check_schema()?;
        Ok(store)
    }

    fn check_schema(&self) -> Result<(), StoreError> {
        let found: u32 = match self.meta.get(SCHEMA_KEY)? {
            Some(bytes) => decode("meta", &bytes)?,
            None => SCHEMA_VERSION,
        };
        if found > SCHEMA_VERSION {
            return Err(StoreError::NewerSchema { found });
        }
        if found < 2 {
            self.index_key_hashes()?;
        }
        if found != SCHEMA_VERSION || self.meta.get(SCHEMA_KEY)?.is_none() {
            self.meta.insert(SCHEMA_KEY, encode(&SCHEMA_VERSION)?)?;
            self.db.flush()?;
        }
        Ok(())
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
    fn load_users(&self) -> Result<Vec<UserRecord>, StoreError> {
        load_all(&self.users, "users")
    }

    fn key_id_by_hash(&self, hash: &[u8; 32]) -> Result<Option<String>, StoreError> {
        Ok(self
            .key_hashes
            .get(hash)?
            .map(|id| String::from_utf8_lossy(&id).into_owned()))
    }

    fn load_key(&self, id: &str) -> Result<Option<(KeyRecord, KeyCounters)>, StoreError> {
        match self.keys.get(id.as_bytes())? {
            Some(bytes) => Ok(Some((decode("keys", &bytes)?, self.counters_of(id)?))),
            None => Ok(None),
        }
    }

    fn scan_keys(
        &self,
        after: Option<&str>,
        visit: &mut dyn FnMut(KeyRecord, KeyCounters) -> bool,
    ) -> Result<(), StoreError> {
        let entries = match after {
            Some(after) => self
                .keys
                .range::<&[u8], _>((Bound::Excluded(after.as_bytes()), Bound::Unbounded)),
            None => self.keys.iter(),
        };
        for value in entries.values() {
            let key: KeyRecord = decode("keys", &value?)?;
            let counters = self.counters_of(&key.id)?;
            if !visit(key, counters) {
                break;
            }
        }
        Ok(())
    }

    fn put_user(&self, user: &UserRecord) -> Result<(), StoreError> {
        self.users.insert(user.id.as_bytes(), encode(user)?)?;
        Ok(())
    }

    fn put_key(&self, key: &KeyRecord) -> Result<(), StoreError> {
        let value = encode(key)?;
        let hashes = secret_hashes(key)?;
        let result = (&self.keys, &self.key_hashes).transaction(|(keys, index)| {
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
            Ok(()) => Ok(()),
            Err(TransactionError::Abort(e)) => Err(e),
            Err(TransactionError::Storage(e)) => Err(e.into()),
        }
    }

    fn record_calls(&self, calls: &[CallRecord]) -> Result<(), StoreError> {
        // Fold the batch first, so each counter and bucket is read and written once.
        let mut counters: HashMap<&str, KeyCounters> = HashMap::new();
        let mut buckets: HashMap<Vec<u8>, UsageBucket> = HashMap::new();
        let mut log = Vec::with_capacity(calls.len());
        for call in calls {
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
                call_key(call.at_micros, &call.request_id),
                timed_key(&call.key_id, call.at_micros, &call.request_id),
                encode(call)?,
            ));
        }
        let trees = (&self.counters, &self.usage, &self.calls, &self.calls_by_key);
        let result = trees.transaction(|(counter_tree, usage_tree, call_tree, by_key_tree)| {
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
            for (key, by_key, value) in &log {
                call_tree.insert(key.as_slice(), value.as_slice())?;
                by_key_tree.insert(by_key.as_slice(), &[])?;
            }
            Ok(())
        });
        match result {
            Ok(()) => Ok(()),
            Err(TransactionError::Abort(e)) => Err(e),
            Err(TransactionError::Storage(e)) => Err(e.into()),
        }
    }

    fn calls(
        &self,
        query: &CallQuery<'_>,
        filter: &dyn Fn(&CallRecord) -> bool,
    ) -> Result<(Vec<CallRecord>, Option<CallCursor>), StoreError> {
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
                    self.calls_by_key
                        .range(start..before(prefix))
                        .keys()
                        .rev()
                        .map(move |k| k.map(|k| k[skip..].to_vec())),
                )
            }
            None => Box::new(
                self.calls
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
            let Some(value) = self.calls.get(&log_key)? else {
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
        self.usage
            .range(timed_key(key_id, from, "")..timed_key(key_id, to, ""))
            .map(|entry| decode("usage", &entry?.1))
            .collect()
    }

    fn meta(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.meta.get(name)?.map(|v| v.to_vec()))
    }

    fn put_meta(&self, name: &str, value: &[u8]) -> Result<(), StoreError> {
        self.meta.insert(name, value)?;
        Ok(())
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::records::{CallOutcome, Usage};

    fn call(key: &str, at_micros: i64, model: &str, tokens: u64) -> CallRecord {
        CallRecord {
            at_micros,
            request_id: format!("req-{at_micros}"),
            key_id: key.into(),
            user_id: "usr_1".into(),
            model: model.into(),
            status: 200,
            outcome: CallOutcome::Completed,
            stream: false,
            latency_ms: 3,
            charged_request: true,
            usage: Usage {
                prompt_tokens: tokens,
                completion_tokens: 1,
            },
            usage_estimated: false,
            images: 0,
            image_sizes: Vec::new(),
            request_body: None,
            response_body: None,
        }
    }

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
        let counters = |id| store.counters_of(id).unwrap();
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

    fn key(id: &str, secret: &str) -> KeyRecord {
        KeyRecord {
            id: id.into(),
            user_id: "usr_1".into(),
            name: "k".into(),
            prefix: "sk-step3-x".into(),
            hash: hex_of(secret),
            rpm_limit: None,
            tpm_limit: None,
            max_concurrent: None,
            request_quota: None,
            token_quota: None,
            image_quota: None,
            max_images_per_request: None,
            expires_at: None,
            models: None,
            active: true,
            created_at: 0,
            updated_at: 0,
            revoked_at: None,
            previous_hash: None,
            previous_valid_until: None,
        }
    }

    fn hex_of(secret: &str) -> String {
        crate::core::keys::to_hex(&crate::core::keys::hash_secret(secret))
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
            store.key_hashes.clear().unwrap();
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
            matches!(err, StoreError::NewerSchema { found: 99 }),
            "{err}"
        );
    }
}
