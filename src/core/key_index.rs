//! The keys and users the gate holds in memory, found by the hash of a secret, and the
//! authentication of callers. A key is loaded from the store the first time it is used,
//! so start-up and memory do not grow with the keys issued; each key has exactly one live
//! state (counters in flight, limiter) however it is found.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use dashmap::DashMap;

use super::access::{self, IpAllowlist};
use super::error::GatewayError;
use super::keys::{self, SecretHash};
use super::money::Money;
use super::period::Period;
use super::quota;
use super::rate_limit::{Figure, LimitSpec, Limiter, RateFigures};
use super::records::{KeyCounters, KeyRecord, UserRecord};
use super::store::Store;
use super::time::{UnixTime, now_unix};

/// A key as the gate holds it: the record plus live counters and its limiter.
#[derive(Debug)]
pub struct KeyState {
    record: RwLock<Arc<KeyRecord>>,
    /// Requests charged so far plus those admitted and not yet settled.
    pub(super) requests_reserved: AtomicU64,
    pub(super) requests_used: AtomicU64,
    /// Tokens charged so far plus those reserved by calls in flight.
    pub(super) tokens_committed: AtomicU64,
    pub(super) prompt_tokens_used: AtomicU64,
    pub(super) completion_tokens_used: AtomicU64,
    /// Images charged so far plus those of calls in flight.
    pub(super) images_committed: AtomicU64,
    pub(super) images_used: AtomicU64,
    /// Nano-units charged so far plus the worst cost of calls in flight.
    pub(super) cost_committed: AtomicU64,
    pub(super) cost_used: AtomicU64,
    /// Where the key's current period began in the counters above (for keys with a
    /// period); found on first need.
    pub(super) period: Mutex<Option<PeriodMark>>,
    pub(super) limiter: Limiter,
}

/// The current period of a key or user: its bounds, and the counters as they stood when
/// it began (what the period has used is the counters now less these).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeriodMark {
    pub period: Option<Period>,
    /// `UnixTime::MIN` and `UnixTime::MAX` for a lifetime.
    pub start: UnixTime,
    pub end: UnixTime,
    pub base: KeyCounters,
}

impl KeyState {
    fn new(record: KeyRecord, counters: KeyCounters) -> Self {
        KeyState {
            record: RwLock::new(Arc::new(record)),
            requests_reserved: AtomicU64::new(counters.requests),
            requests_used: AtomicU64::new(counters.requests),
            tokens_committed: AtomicU64::new(counters.tokens()),
            prompt_tokens_used: AtomicU64::new(counters.prompt_tokens),
            completion_tokens_used: AtomicU64::new(counters.completion_tokens),
            images_committed: AtomicU64::new(counters.images),
            images_used: AtomicU64::new(counters.images),
            cost_committed: AtomicU64::new(counters.cost.0),
            cost_used: AtomicU64::new(counters.cost.0),
            period: Mutex::new(None),
            limiter: Limiter::default(),
        }
    }

    pub fn record(&self) -> Arc<KeyRecord> {
        self.record
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces the record in place, keeping the counters and the limiter.
    pub(super) fn replace(&self, record: KeyRecord) {
        *self.record.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(record);
    }

    /// Replaces the record with one read from the store, unless it changed here since
    /// `seen` was taken (a change made here meanwhile is newer than that read).
    pub(super) fn refresh_from(&self, seen: &Arc<KeyRecord>, record: KeyRecord) {
        let mut current = self.record.write().unwrap_or_else(|p| p.into_inner());
        if Arc::ptr_eq(&current, seen) {
            *current = Arc::new(record);
        }
    }

    /// What the key has been charged so far (settled calls only).
    pub fn counters(&self) -> KeyCounters {
        KeyCounters {
            requests: self.requests_used.load(Ordering::Acquire),
            prompt_tokens: self.prompt_tokens_used.load(Ordering::Acquire),
            completion_tokens: self.completion_tokens_used.load(Ordering::Acquire),
            images: self.images_used.load(Ordering::Acquire),
            cost: Money(self.cost_used.load(Ordering::Acquire)),
        }
    }

    /// The current period's mark, as last found.
    pub fn period_mark(&self) -> Option<PeriodMark> {
        *self.period.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A user as the gate holds it: the record and the limits summed over the user's keys.
#[derive(Debug)]
pub struct UserState {
    record: RwLock<Arc<UserRecord>>,
    pub(super) limiter: Limiter,
    /// What the user's keys' calls cost in this process (settled, plus the worst cost of
    /// those in flight), and settled only; a period's mark turns these into its spend.
    pub(super) cost_committed: AtomicU64,
    pub(super) cost_used: AtomicU64,
    /// The budget's current period, found on first need: `base` is signed, as the
    /// counters above start at zero with the process while the period may be older.
    pub(super) period: Mutex<Option<UserMark>>,
}

/// A user's budget period: its bounds, and what the spend of this process stood at when
/// it began less what the books already held of it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UserMark {
    pub period: Option<Period>,
    pub start: i64,
    pub end: i64,
    pub base: i128,
}

impl UserState {
    pub(super) fn new(record: UserRecord) -> Self {
        UserState {
            record: RwLock::new(Arc::new(record)),
            limiter: Limiter::default(),
            cost_committed: AtomicU64::new(0),
            cost_used: AtomicU64::new(0),
            period: Mutex::new(None),
        }
    }

    pub fn record(&self) -> Arc<UserRecord> {
        self.record
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(super) fn replace(&self, record: UserRecord) {
        *self.record.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(record);
    }

    /// As [`KeyState::refresh_from`]; whether the record was replaced.
    pub(super) fn refresh_from(&self, seen: &Arc<UserRecord>, record: UserRecord) -> bool {
        let mut current = self.record.write().unwrap_or_else(|p| p.into_inner());
        let fresh = Arc::ptr_eq(&current, seen);
        if fresh {
            *current = Arc::new(record);
        }
        fresh
    }
}

fn parse_hash(id: &str, hex: &str) -> Result<SecretHash, GatewayError> {
    keys::from_hex(hex)
        .ok_or_else(|| GatewayError::Store(format!("key `{id}` has a malformed hash")))
}

/// An authenticated caller: the key and its owner at the time of the call.
#[derive(Clone, Debug)]
pub struct Caller {
    pub key: Arc<KeyState>,
    pub record: Arc<KeyRecord>,
    pub user: Arc<UserState>,
    pub user_record: Arc<UserRecord>,
    /// Where the call comes from, as the edge found it (kept in the call log).
    pub client: Option<IpAddr>,
}

/// What a short-lived token made from a key may do, at most what the key may.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Narrowing {
    /// Only these models (each one the key may use).
    pub models: Option<Vec<String>>,
    /// A lower requests-per-minute limit, counted with the key's own calls.
    pub rpm_limit: Option<u32>,
}

impl Narrowing {
    /// Refuses a narrowing that would widen `key` (a model it may not use, a higher rpm).
    pub fn check(&self, key: &KeyRecord) -> Result<(), GatewayError> {
        if let Some(models) = &self.models {
            if models.is_empty() {
                return Err(GatewayError::invalid_request(
                    "`models` must name at least one model (or be left out)",
                    Some("models"),
                ));
            }
            if let Some(model) = models.iter().find(|m| !key.allows_model(m)) {
                return Err(GatewayError::invalid_request(
                    format!("this key may not use `{model}`, so its tokens may not either"),
                    Some("models"),
                ));
            }
        }
        if let Some(rpm) = self.rpm_limit
            && (rpm == 0 || key.limits.rpm_limit.is_some_and(|limit| rpm > limit))
        {
            return Err(GatewayError::invalid_request(
                "`rpm_limit` must be at least 1 and at most the key's",
                Some("rpm_limit"),
            ));
        }
        Ok(())
    }
}

impl Caller {
    /// The caller with its key's models and rpm narrowed (a short-lived token's).
    pub fn narrowed(mut self, narrowing: &Narrowing) -> Caller {
        if narrowing == &Narrowing::default() {
            return self;
        }
        let mut record = (*self.record).clone();
        if let Some(models) = &narrowing.models {
            record.models = Some(models.clone());
        }
        if let Some(rpm) = narrowing.rpm_limit {
            record.limits.rpm_limit = Some(record.limits.rpm_limit.map_or(rpm, |r| r.min(rpm)));
        }
        self.record = Arc::new(record);
        self
    }
}

/// What is left of a key's quotas; `None` is unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Remaining {
    pub requests: Option<u64>,
    pub tokens: Option<u64>,
    pub images: Option<u64>,
    /// Money left: the tighter of the key's budget and its user's.
    pub budget: Option<Money>,
}

impl Remaining {
    /// Every name `pairs` may give, in its order.
    pub const HEADER_NAMES: [&'static str; 4] = [
        "x-quota-remaining-requests",
        "x-quota-remaining-tokens",
        "x-quota-remaining-images",
        "x-budget-remaining",
    ];

    /// The `x-quota-remaining-*` pairs, both doors.
    pub fn pairs(&self) -> impl Iterator<Item = (&'static str, Figure)> + use<> {
        let [requests, tokens, images, budget] = Self::HEADER_NAMES;
        [
            (requests, self.requests.map(Figure::Count)),
            (tokens, self.tokens.map(Figure::Count)),
            (images, self.images.map(Figure::Count)),
            (budget, self.budget.map(Figure::Amount)),
        ]
        .into_iter()
        .filter_map(|(name, value)| Some((name, value?)))
    }
}

/// A key's own view of itself: what `GET /v1/usage` and `Chat.GetUsage` show.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageSummary {
    pub key_id: String,
    pub key_name: String,
    pub key_prefix: String,
    pub user_id: String,
    pub user_name: String,
    pub used: KeyCounters,
    pub request_quota: Option<u64>,
    pub token_quota: Option<u64>,
    pub image_quota: Option<u64>,
    pub remaining: Remaining,
    pub limits: LimitSpec,
    pub figures: RateFigures,
    pub models: Option<Vec<String>>,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub budget: Option<Money>,
    /// The key's period and its bounds (`None`: lifetime).
    pub period: Option<Period>,
    pub period_start: Option<UnixTime>,
    pub period_end: Option<UnixTime>,
    pub currency: String,
}

impl Caller {
    /// The key's own view of itself; `used` counts its current period (lifetime without
    /// one), as its mark was last found (see `Gateway::usage_summary`).
    pub fn usage_summary(&self) -> UsageSummary {
        let record = &self.record;
        let mark = self.key.period_mark().unwrap_or_default();
        let bounded = mark.period.is_some() && mark.period == record.limits.period;
        UsageSummary {
            key_id: record.id.clone(),
            key_name: record.name.clone(),
            key_prefix: record.prefix.clone(),
            user_id: self.user_record.id.clone(),
            user_name: self.user_record.name.clone(),
            used: self.key.counters().since(&mark.base),
            request_quota: record.limits.request_quota,
            token_quota: record.limits.token_quota,
            image_quota: record.limits.image_quota,
            remaining: self.remaining(),
            limits: record.limits.rate(),
            figures: self.figures(),
            models: record.models.clone(),
            created_at: record.created_at,
            expires_at: record.expires_at,
            budget: record.limits.budget,
            period: record.limits.period,
            period_start: bounded.then_some(mark.start),
            period_end: bounded.then_some(mark.end),
            currency: String::new(),
        }
    }

    /// What is left of the quotas and budgets in their current periods.
    pub fn remaining(&self) -> Remaining {
        let key = &self.key;
        let limits = &self.record.limits;
        let base = key.period_mark().unwrap_or_default().base;
        let left = |quota: Option<u64>, base: u64, counter: &AtomicU64| {
            quota::remaining(
                quota.map(|q| q.saturating_add(base)),
                counter.load(Ordering::Acquire),
            )
        };
        let key_budget = limits.budget.map(|b| {
            Money(
                b.0.saturating_add(base.cost.0)
                    .saturating_sub(key.cost_committed.load(Ordering::Acquire)),
            )
        });
        let user_budget = self.user_record.limits.budget.and_then(|b| {
            let mark = (*self.user.period.lock().unwrap_or_else(|p| p.into_inner()))?;
            let spent = i128::from(self.user.cost_committed.load(Ordering::Acquire)) - mark.base;
            Some(Money(
                u64::try_from((i128::from(b.0) - spent).max(0)).unwrap_or(u64::MAX),
            ))
        });
        Remaining {
            requests: left(limits.request_quota, base.requests, &key.requests_reserved),
            tokens: left(limits.token_quota, base.tokens(), &key.tokens_committed),
            images: left(limits.image_quota, base.images, &key.images_committed),
            budget: [key_budget, user_budget].into_iter().flatten().min(),
        }
    }

    /// The per-minute standing of the key and its user, without taking anything.
    pub fn figures(&self) -> RateFigures {
        RateFigures::tighter(
            self.key.limiter.figures(&self.record.limits.rate()),
            self.user.limiter.figures(&self.user_record.limits.rate()),
        )
    }
}

/// The keys and users in memory, and the admin token's hash.
pub struct KeyIndex {
    store: Arc<dyn Store>,
    /// Keys in use, by the hashes of their secrets: the current one, and the previous one
    /// while a rotation's grace period may still run.
    keys_by_hash: DashMap<SecretHash, Arc<KeyState>>,
    /// The same keys by id: each key's one live state (counters in flight, limiter).
    pub(super) keys_by_id: DashMap<String, Arc<KeyState>>,
    pub(super) users: DashMap<String, Arc<UserState>>,
    /// User ids by the identity-provider subject they stand for (`UserRecord::subject`).
    pub(super) subjects: DashMap<String, String>,
    admin_token_hash: SecretHash,
}

impl KeyIndex {
    /// Loads the users from `store`; keys are loaded when first used.
    pub fn load(store: Arc<dyn Store>, admin_token_hash: SecretHash) -> Result<Self, GatewayError> {
        let users = DashMap::new();
        let subjects = DashMap::new();
        for user in store.load_users()? {
            if let Some(subject) = &user.subject {
                subjects.insert(subject.clone(), user.id.clone());
            }
            users.insert(user.id.clone(), Arc::new(UserState::new(user)));
        }
        Ok(KeyIndex {
            store,
            keys_by_hash: DashMap::new(),
            keys_by_id: DashMap::new(),
            users,
            subjects,
            admin_token_hash,
        })
    }

    /// Makes `record` (just stored, or just read from the store with its `counters`) the
    /// key's live state. When another call loaded the key meanwhile, that state stays: it
    /// may already carry calls in flight.
    pub(super) fn index_key(
        &self,
        record: KeyRecord,
        counters: KeyCounters,
    ) -> Result<Arc<KeyState>, GatewayError> {
        let hash = parse_hash(&record.id, &record.hash)?;
        let previous = match &record.previous_hash {
            Some(previous) => Some(parse_hash(&record.id, previous)?),
            None => None,
        };
        let state = match self.keys_by_id.entry(record.id.clone()) {
            dashmap::Entry::Occupied(live) => return Ok(live.get().clone()),
            dashmap::Entry::Vacant(slot) => slot
                .insert(Arc::new(KeyState::new(record, counters)))
                .clone(),
        };
        self.keys_by_hash.insert(hash, state.clone());
        if let Some(previous) = previous {
            self.keys_by_hash.insert(previous, state.clone());
        }
        Ok(state)
    }

    /// A key's live state by id, loaded from the store on first use.
    pub(super) fn key_state(&self, id: &str) -> Result<Arc<KeyState>, GatewayError> {
        if let Some(state) = self.keys_by_id.get(id) {
            return Ok(state.value().clone());
        }
        match self.store.load_key(id)? {
            Some((record, counters)) => self.index_key(record, counters),
            None => Err(GatewayError::NotFound {
                what: "key",
                id: id.to_owned(),
            }),
        }
    }

    /// The key a secret's hash opens, if any: from memory, else from the store's index.
    fn key_by_hash(&self, hash: &SecretHash) -> Result<Option<Arc<KeyState>>, GatewayError> {
        if let Some(state) = self.keys_by_hash.get(hash) {
            return Ok(Some(state.value().clone()));
        }
        let Some(id) = self.store.key_id_by_hash(hash)? else {
            return Ok(None);
        };
        match self.key_state(&id) {
            Ok(state) => Ok(Some(state)),
            Err(GatewayError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Points a key's new secret (`hash`, hex) at it and forgets the secret before the
    /// previous one.
    pub(super) fn index_rotated_secret(
        &self,
        id: &str,
        hash: &str,
        forgotten: Option<&str>,
    ) -> Result<(), GatewayError> {
        let state = self.key_state(id)?;
        self.keys_by_hash.insert(parse_hash(id, hash)?, state);
        if let Some(forgotten) = forgotten.and_then(keys::from_hex) {
            self.keys_by_hash.remove(&forgotten);
        }
        Ok(())
    }

    /// The caller a secret (the value after `Bearer `) opens: an active, unexpired,
    /// unrevoked key of an active user, used from an address the key's and the user's
    /// allowlists let in.
    pub fn authenticate(
        &self,
        secret: Option<&str>,
        client: Option<IpAddr>,
    ) -> Result<Caller, GatewayError> {
        let secret =
            secret
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .ok_or(GatewayError::InvalidApiKey(
                    "You didn't provide an API key. Send it as `Authorization: Bearer <key>`.",
                ))?;
        const UNKNOWN: &str = "Incorrect API key provided.";
        let hash = keys::hash_secret(secret);
        let state = self
            .key_by_hash(&hash)?
            .ok_or(GatewayError::InvalidApiKey(UNKNOWN))?;
        if !state.record().is_current_secret(&hash, now_unix()) {
            return Err(GatewayError::InvalidApiKey(
                "This API key was rotated and its grace period is over.",
            ));
        }
        self.caller_of(state, client)
    }

    /// The caller `state`'s key makes, however it was presented: an active, unexpired,
    /// unrevoked key of an active user, used from an address both lists let in.
    pub(super) fn caller_of(
        &self,
        state: Arc<KeyState>,
        client: Option<IpAddr>,
    ) -> Result<Caller, GatewayError> {
        const UNKNOWN: &str = "Incorrect API key provided.";
        let record = state.record();
        if !record.active || record.revoked_at.is_some() {
            return Err(GatewayError::InvalidApiKey(
                "This API key has been revoked or deactivated.",
            ));
        }
        if record.expires_at.is_some_and(|at| at <= now_unix()) {
            return Err(GatewayError::InvalidApiKey("This API key has expired."));
        }
        let user = self
            .user_state(&record.user_id)?
            .ok_or(GatewayError::InvalidApiKey(UNKNOWN))?;
        let user_record = user.record();
        if !user_record.active {
            return Err(GatewayError::InvalidApiKey(
                "The user owning this API key is deactivated.",
            ));
        }
        // Checked only once the key is known good: an unknown key learns nothing of lists.
        for (whose, list) in [
            ("key", record.limits.allowed_ips.as_ref()),
            ("user's keys", user_record.limits.allowed_ips.as_ref()),
        ] {
            if !access::allowed(list, client) {
                return Err(ip_not_allowed(whose, client));
            }
        }
        Ok(Caller {
            key: state,
            record,
            user,
            user_record,
            client,
        })
    }

    /// A user by id. One not in memory was made by another gateway sharing the store
    /// (users are loaded whole at start): the users are read again, once per such miss.
    pub(super) fn user_state(&self, id: &str) -> Result<Option<Arc<UserState>>, GatewayError> {
        if let Some(user) = self.users.get(id) {
            return Ok(Some(user.value().clone()));
        }
        self.load_new_users()?;
        Ok(self.users.get(id).map(|user| user.value().clone()))
    }

    /// Adds the users the store has and this gateway does not (made by another replica).
    pub(super) fn load_new_users(&self) -> Result<(), GatewayError> {
        for user in self.store.load_users()? {
            if let dashmap::Entry::Vacant(slot) = self.users.entry(user.id.clone()) {
                if let Some(subject) = &user.subject {
                    self.subjects.insert(subject.clone(), user.id.clone());
                }
                slot.insert(Arc::new(UserState::new(user)));
            }
        }
        Ok(())
    }

    /// Checks the admin API's allowlist, then the admin token in constant time.
    pub fn authenticate_admin(
        &self,
        token: Option<&str>,
        client: Option<IpAddr>,
        allowlist: Option<&IpAllowlist>,
    ) -> Result<(), GatewayError> {
        // Before the token: from outside the list, the token cannot even be tried.
        if !access::allowed(allowlist, client) {
            return Err(ip_not_allowed("admin API", client));
        }
        match token {
            Some(token) if keys::secret_matches(token.trim(), &self.admin_token_hash) => Ok(()),
            _ => Err(GatewayError::InvalidAdminToken),
        }
    }
}

fn ip_not_allowed(whose: &'static str, client: Option<IpAddr>) -> GatewayError {
    GatewayError::IpNotAllowed {
        whose,
        client: client.map_or_else(|| "an unknown address".to_owned(), |a| a.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::GateSettings;
    use crate::core::testing::{MemoryStore, gate, key, user};

    fn seen(events: &crate::core::testing::SeenEvents) -> Vec<String> {
        events.0.lock().unwrap().clone()
    }

    #[test]
    fn a_key_is_found_by_its_secret_and_loaded_once() {
        let (gateway, _queue, events) = gate(
            MemoryStore::with(vec![user("usr_1")], vec![key("key_a", "sk-step3-a")]),
            GateSettings::default(),
        );
        let first = gateway.authenticate(Some("sk-step3-a"), None).unwrap();
        let again = gateway.authenticate(Some(" sk-step3-a "), None).unwrap();
        assert_eq!(first.record.id, "key_a");
        assert!(
            Arc::ptr_eq(&first.key, &again.key),
            "one live state per key"
        );
        assert!(seen(&events).is_empty());
    }

    #[test]
    fn missing_unknown_revoked_expired_and_orphaned_keys_are_refused_and_counted() {
        let mut revoked = key("key_r", "sk-step3-r");
        revoked.revoked_at = Some(1);
        let mut expired = key("key_e", "sk-step3-e");
        expired.expires_at = Some(1);
        let mut orphan = key("key_o", "sk-step3-o");
        orphan.user_id = "usr_gone".into();
        let mut idle_user = user("usr_2");
        idle_user.active = false;
        let mut idle = key("key_i", "sk-step3-i");
        idle.user_id = "usr_2".into();
        let (gateway, _queue, events) = gate(
            MemoryStore::with(
                vec![user("usr_1"), idle_user],
                vec![revoked, expired, orphan, idle],
            ),
            GateSettings::default(),
        );
        for (secret, message) in [
            (None, "didn't provide"),
            (Some("  "), "didn't provide"),
            (Some("sk-step3-nope"), "Incorrect"),
            (Some("sk-step3-r"), "revoked"),
            (Some("sk-step3-e"), "expired"),
            (Some("sk-step3-o"), "Incorrect"),
            (Some("sk-step3-i"), "deactivated"),
        ] {
            let e = gateway.authenticate(secret, None).unwrap_err();
            assert!(e.to_string().contains(message), "{secret:?}: {e}");
        }
        assert_eq!(seen(&events), vec!["refused auth"; 7]);
    }

    #[test]
    fn a_rotated_secret_works_only_within_its_grace() {
        let mut rotated = key("key_a", "sk-step3-new");
        rotated.previous_hash = Some(crate::core::testing::hex_of("sk-step3-old"));
        rotated.previous_valid_until = Some(now_unix() + 60);
        let mut ended = key("key_b", "sk-step3-new-b");
        ended.previous_hash = Some(crate::core::testing::hex_of("sk-step3-old-b"));
        ended.previous_valid_until = Some(now_unix() - 1);
        let (gateway, _queue, _) = gate(
            MemoryStore::with(vec![user("usr_1")], vec![rotated, ended]),
            GateSettings::default(),
        );
        assert!(gateway.authenticate(Some("sk-step3-old"), None).is_ok());
        assert!(gateway.authenticate(Some("sk-step3-new"), None).is_ok());
        let e = gateway
            .authenticate(Some("sk-step3-old-b"), None)
            .unwrap_err();
        assert!(e.to_string().contains("grace period is over"), "{e}");
    }

    #[test]
    fn the_admin_token_is_checked_and_a_client_key_is_not_one() {
        let (gateway, _queue, _) = gate(
            MemoryStore::with(vec![user("usr_1")], vec![key("key_a", "sk-step3-a")]),
            GateSettings::default(),
        );
        assert!(
            gateway
                .authenticate_admin(Some("admin-token"), None)
                .is_ok()
        );
        assert!(
            gateway
                .authenticate_admin(Some("sk-step3-a"), None)
                .is_err()
        );
        assert!(gateway.authenticate_admin(None, None).is_err());
    }

    #[test]
    fn a_stale_read_never_overwrites_a_change_made_meanwhile() {
        let state = UserState::new(user("usr_1"));
        let seen = state.record();
        // Changed here (deactivated) after the store was read for a refresh...
        let mut deactivated = (*seen).clone();
        deactivated.active = false;
        state.replace(deactivated);
        // ...the stale read is dropped, not written over the newer record.
        assert!(!state.refresh_from(&seen, (*seen).clone()));
        assert!(!state.record().active);
        let now = state.record();
        assert!(state.refresh_from(&now, (*now).clone()));
    }
}
