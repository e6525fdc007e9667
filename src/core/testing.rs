//! Records and an in-memory store for unit tests of the gate and of the store
//! implementations.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use super::catalogue::ModelRecord;
use super::events::{Door, GateEvents, SettledCall};
use super::export::ExportRecord;
use super::gateway::{GateSettings, Gateway};
use super::journal::{PendingReservation, Reservation, ReservationJournal, Unsettled};
use super::keys;
use super::limits::{KeyLimits, UserLimits};
use super::records::{
    AuditRecord, CallOutcome, CallRecord, EncodedCall, KeyCounters, KeyRecord, Usage, UsageBucket,
    UserRecord,
};
use super::store::{CallCursor, CallQuery, Store, StoreError};
use super::time::UnixTime;
use super::usage_sink::{UsageQueue, usage_channel};

pub(crate) fn call(key: &str, at_micros: i64, model: &str, tokens: u64) -> CallRecord {
    CallRecord {
        at_micros,
        request_id: format!("req-{at_micros}"),
        key_id: key.into(),
        user_id: "usr_1".into(),
        model: model.into(),
        version: None,
        cost: Default::default(),
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
        client_addr: None,
        reservation: None,
        cache_hit: false,
    }
}

pub(crate) fn key(id: &str, secret: &str) -> KeyRecord {
    KeyRecord {
        id: id.into(),
        user_id: "usr_1".into(),
        name: "k".into(),
        prefix: "sk-step3-x".into(),
        hash: hex_of(secret),
        limits: KeyLimits::default(),
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

pub(crate) fn user(id: &str) -> UserRecord {
    UserRecord {
        id: id.into(),
        name: "u".into(),
        email: None,
        subject: None,
        active: true,
        limits: UserLimits::default(),
        created_at: 0,
        updated_at: 0,
    }
}

pub(crate) fn hex_of(secret: &str) -> String {
    keys::to_hex(&keys::hash_secret(secret))
}

/// A store kept in memory: enough of the port for the gate's own tests.
#[derive(Default)]
pub(crate) struct MemoryStore {
    users: Mutex<BTreeMap<String, UserRecord>>,
    keys: Mutex<BTreeMap<String, (KeyRecord, KeyCounters)>>,
    meta: Mutex<BTreeMap<String, Vec<u8>>>,
    calls: Mutex<Vec<CallRecord>>,
    prices: Mutex<Vec<crate::core::pricing::PriceRecord>>,
    models: Mutex<BTreeMap<String, ModelRecord>>,
    audit: Mutex<BTreeMap<String, AuditRecord>>,
}

impl MemoryStore {
    pub(crate) fn with(users: Vec<UserRecord>, keys: Vec<KeyRecord>) -> Self {
        let store = MemoryStore::default();
        for u in users {
            store.put_user(&u).unwrap();
        }
        for k in keys {
            store.put_key(&k).unwrap();
        }
        store
    }

    /// Every call recorded, in order.
    pub(crate) fn calls_recorded(&self) -> Vec<CallRecord> {
        self.calls.lock().unwrap().clone()
    }
}

impl Store for MemoryStore {
    fn put_audit(&self, record: &AuditRecord) -> Result<(), StoreError> {
        self.audit
            .lock()
            .unwrap()
            .insert(record.id.clone(), record.clone());
        Ok(())
    }
    fn audit(&self, before: Option<&str>, limit: usize) -> Result<Vec<AuditRecord>, StoreError> {
        let audit = self.audit.lock().unwrap();
        Ok(audit
            .values()
            .rev()
            .filter(|r| before.is_none_or(|b| r.id.as_str() < b))
            .take(limit)
            .cloned()
            .collect())
    }
    fn load_users(&self) -> Result<Vec<UserRecord>, StoreError> {
        Ok(self.users.lock().unwrap().values().cloned().collect())
    }
    fn key_id_by_hash(&self, hash: &[u8; 32]) -> Result<Option<String>, StoreError> {
        let hex = keys::to_hex(hash);
        Ok(self
            .keys
            .lock()
            .unwrap()
            .values()
            .find(|(k, _)| k.hash == hex || k.previous_hash.as_deref() == Some(hex.as_str()))
            .map(|(k, _)| k.id.clone()))
    }
    fn load_key(&self, id: &str) -> Result<Option<(KeyRecord, KeyCounters)>, StoreError> {
        Ok(self.keys.lock().unwrap().get(id).cloned())
    }
    fn scan_keys(
        &self,
        after: Option<&str>,
        visit: &mut dyn FnMut(KeyRecord, KeyCounters) -> bool,
    ) -> Result<(), StoreError> {
        let keys = self.keys.lock().unwrap().clone();
        for (id, (record, counters)) in keys {
            if after.is_some_and(|a| id.as_str() <= a) {
                continue;
            }
            if !visit(record, counters) {
                break;
            }
        }
        Ok(())
    }
    fn put_user(&self, user: &UserRecord) -> Result<(), StoreError> {
        self.users
            .lock()
            .unwrap()
            .insert(user.id.clone(), user.clone());
        Ok(())
    }
    fn put_key(&self, key: &KeyRecord) -> Result<(), StoreError> {
        let mut keys = self.keys.lock().unwrap();
        let counters = keys.get(&key.id).map(|(_, c)| *c).unwrap_or_default();
        keys.insert(key.id.clone(), (key.clone(), counters));
        Ok(())
    }
    fn record_calls(&self, calls: &[CallRecord]) -> Result<(), StoreError> {
        let mut keys = self.keys.lock().unwrap();
        let mut log = self.calls.lock().unwrap();
        for call in calls {
            if call.reservation.is_some() && log.iter().any(|c| c.reservation == call.reservation) {
                continue;
            }
            if let Some((_, counters)) = keys.get_mut(&call.key_id) {
                counters.add(&call.counters());
            }
            log.push(call.clone());
        }
        Ok(())
    }
    fn recorded_reservations(
        &self,
        reservations: &[u64],
    ) -> Result<std::collections::HashSet<u64>, StoreError> {
        let log = self.calls.lock().unwrap();
        Ok(reservations
            .iter()
            .copied()
            .filter(|id| log.iter().any(|c| c.reservation == Some(*id)))
            .collect())
    }
    fn calls(
        &self,
        _: &CallQuery<'_>,
        _: &dyn Fn(&CallRecord) -> bool,
    ) -> Result<(Vec<CallRecord>, Option<CallCursor>), StoreError> {
        Ok((Vec::new(), None))
    }
    /// One bucket per call: enough for sums over a period.
    fn usage(
        &self,
        key_id: &str,
        from: UnixTime,
        to: UnixTime,
    ) -> Result<Vec<UsageBucket>, StoreError> {
        let log = self.calls.lock().unwrap();
        Ok(log
            .iter()
            .filter(|c| c.key_id == key_id)
            .map(|c| (c, c.at_micros.div_euclid(1_000_000)))
            .filter(|(_, at)| *at - at.rem_euclid(3600) >= from && *at < to)
            .map(|(c, at)| {
                let mut bucket = UsageBucket::of(c, at - at.rem_euclid(3600));
                bucket.count(c);
                bucket
            })
            .collect())
    }
    fn load_prices(&self) -> Result<Vec<crate::core::pricing::PriceRecord>, StoreError> {
        Ok(self.prices.lock().unwrap().clone())
    }
    fn put_price(&self, price: &crate::core::pricing::PriceRecord) -> Result<(), StoreError> {
        self.prices.lock().unwrap().push(price.clone());
        Ok(())
    }
    fn load_models(&self) -> Result<Vec<ModelRecord>, StoreError> {
        Ok(self.models.lock().unwrap().values().cloned().collect())
    }
    fn put_model(&self, model: &ModelRecord) -> Result<(), StoreError> {
        self.models
            .lock()
            .unwrap()
            .insert(model.name.clone(), model.clone());
        Ok(())
    }
    fn delete_model(&self, name: &str) -> Result<(), StoreError> {
        self.models.lock().unwrap().remove(name);
        Ok(())
    }
    fn meta(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.meta.lock().unwrap().get(name).cloned())
    }
    fn put_meta(&self, name: &str, value: &[u8]) -> Result<(), StoreError> {
        self.meta
            .lock()
            .unwrap()
            .insert(name.to_owned(), value.to_vec());
        Ok(())
    }
    fn prune_calls(&self, _: i64, _: usize) -> Result<usize, StoreError> {
        Ok(0)
    }
    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
    fn export(
        &self,
        visit: &mut dyn FnMut(ExportRecord) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        for user in self.users.lock().unwrap().values() {
            visit(ExportRecord::User(user.clone()))?;
        }
        for (key, _) in self.keys.lock().unwrap().values() {
            visit(ExportRecord::Key(key.clone()))?;
        }
        for model in self.models.lock().unwrap().values() {
            visit(ExportRecord::Model(model.clone()))?;
        }
        Ok(())
    }
    fn import(&self, records: &[ExportRecord]) -> Result<(), StoreError> {
        for record in records {
            match record {
                ExportRecord::User(user) => self.put_user(user)?,
                ExportRecord::Key(key) => self.put_key(key)?,
                ExportRecord::Model(model) => self.put_model(model)?,
                _ => {}
            }
        }
        Ok(())
    }
    fn is_empty(&self) -> Result<bool, StoreError> {
        Ok(self.users.lock().unwrap().is_empty() && self.keys.lock().unwrap().is_empty())
    }
}

/// What the gate told its watcher, in order.
#[derive(Debug, Default)]
pub(crate) struct SeenEvents(pub(crate) Mutex<Vec<String>>);

impl GateEvents for SeenEvents {
    fn call_started(&self, door: Door) {
        self.0
            .lock()
            .unwrap()
            .push(format!("started {}", door.as_str()));
    }
    fn call_settled(&self, call: &SettledCall<'_>) {
        self.0
            .lock()
            .unwrap()
            .push(format!("settled {}", call.outcome));
    }
    fn call_withdrawn(&self, door: Door) {
        self.0
            .lock()
            .unwrap()
            .push(format!("withdrawn {}", door.as_str()));
    }
    fn first_chunk(&self, _: Door, _: &str, _: std::time::Duration) {
        self.0.lock().unwrap().push("first chunk".into());
    }
    fn refused(&self, reason: &'static str) {
        self.0.lock().unwrap().push(format!("refused {reason}"));
    }
}

/// A gate over `store`, the queue its settled calls go to, and what it reported.
pub(crate) fn gate(
    store: MemoryStore,
    settings: GateSettings,
) -> (Gateway, UsageQueue, Arc<SeenEvents>) {
    let (sink, queue) = usage_channel();
    let events = Arc::new(SeenEvents::default());
    let gateway = Gateway::load(
        Arc::new(store),
        sink,
        events.clone(),
        keys::hash_secret("admin-token"),
        settings,
    )
    .unwrap();
    (gateway, queue, events)
}

/// A journal that answers every reservation at once, as `fail` says, and keeps what it is
/// told.
#[derive(Debug, Default)]
pub(crate) struct TestJournal {
    pub(crate) fail: bool,
    pub(crate) reserved: Mutex<Vec<(u64, Reservation)>>,
    pub(crate) settled: Mutex<Vec<CallRecord>>,
    pub(crate) closed: Mutex<Vec<u64>>,
}

impl ReservationJournal for TestJournal {
    fn reserve(&self, reservation: Reservation) -> PendingReservation {
        let mut reserved = self.reserved.lock().unwrap();
        let id = reserved.len() as u64 + 1;
        reserved.push((id, reservation));
        let (done, durable) = tokio::sync::oneshot::channel();
        let answer = if self.fail {
            Err(StoreError::Io(
                "No space left on device (os error 28)".into(),
            ))
        } else {
            Ok(())
        };
        done.send(answer).unwrap();
        PendingReservation { id, durable }
    }
    fn settled(&self, call: &EncodedCall) {
        self.settled.lock().unwrap().push(call.call.clone());
    }
    fn close(&self, reservations: Vec<u64>) {
        self.closed.lock().unwrap().extend(reservations);
    }
    fn unsettled(&self) -> Vec<Unsettled> {
        Vec::new()
    }
}
