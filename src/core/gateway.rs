//! The gate itself: the in-memory key index, authentication, policy, limits and quota
//! reservations, and the settlement of every admitted call.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use dashmap::DashMap;

use super::error::GatewayError;
use super::images::ImageSize;
use super::keys::{self, SecretHash};
use super::limits::{Figure, Grant, LimitScope, LimitSpec, Limiter, RateFigures};
use super::quota::{self, TokenAsk};
use super::records::{
    CallOutcome, CallRecord, KeyCounters, KeyRecord, Usage, UserRecord, now_micros, now_unix,
};
use crate::metrics::{Door, Metrics, SettledCall, StoreFigures};
use crate::store::{Store, StoreHealth, UsageSink};

/// A key as the gate holds it: the record plus live counters and its limiter.
#[derive(Debug)]
pub struct KeyState {
    record: RwLock<Arc<KeyRecord>>,
    /// Requests charged so far plus those admitted and not yet settled.
    requests_reserved: AtomicU64,
    requests_used: AtomicU64,
    /// Tokens charged so far plus those reserved by calls in flight.
    tokens_committed: AtomicU64,
    prompt_tokens_used: AtomicU64,
    completion_tokens_used: AtomicU64,
    /// Images charged so far plus those of calls in flight.
    images_committed: AtomicU64,
    images_used: AtomicU64,
    limiter: Limiter,
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

    /// What the key has been charged so far (settled calls only).
    pub fn counters(&self) -> KeyCounters {
        KeyCounters {
            requests: self.requests_used.load(Ordering::Acquire),
            prompt_tokens: self.prompt_tokens_used.load(Ordering::Acquire),
            completion_tokens: self.completion_tokens_used.load(Ordering::Acquire),
            images: self.images_used.load(Ordering::Acquire),
        }
    }
}

/// A user as the gate holds it: the record and the limits summed over the user's keys.
#[derive(Debug)]
pub struct UserState {
    record: RwLock<Arc<UserRecord>>,
    limiter: Limiter,
}

impl UserState {
    pub(super) fn new(record: UserRecord) -> Self {
        UserState {
            record: RwLock::new(Arc::new(record)),
            limiter: Limiter::default(),
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
}

/// What is left of a key's quotas; `None` is unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Remaining {
    pub requests: Option<u64>,
    pub tokens: Option<u64>,
    pub images: Option<u64>,
}

impl Remaining {
    /// The `x-quota-remaining-*` pairs, both doors.
    pub fn pairs(&self) -> impl Iterator<Item = (&'static str, Figure)> + use<> {
        [
            ("x-quota-remaining-requests", self.requests),
            ("x-quota-remaining-tokens", self.tokens),
            ("x-quota-remaining-images", self.images),
        ]
        .into_iter()
        .filter_map(|(name, value)| Some((name, Figure::Count(value?))))
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
}

impl Caller {
    pub fn usage_summary(&self) -> UsageSummary {
        let record = &self.record;
        let limits = key_limits(record);
        UsageSummary {
            key_id: record.id.clone(),
            key_name: record.name.clone(),
            key_prefix: record.prefix.clone(),
            user_id: self.user_record.id.clone(),
            user_name: self.user_record.name.clone(),
            used: self.key.counters(),
            request_quota: record.request_quota,
            token_quota: record.token_quota,
            image_quota: record.image_quota,
            remaining: self.remaining(),
            limits,
            figures: self.figures(),
            models: record.models.clone(),
            created_at: record.created_at,
            expires_at: record.expires_at,
        }
    }

    pub fn remaining(&self) -> Remaining {
        let key = &self.key;
        Remaining {
            requests: quota::remaining(
                self.record.request_quota,
                key.requests_reserved.load(Ordering::Acquire),
            ),
            tokens: quota::remaining(
                self.record.token_quota,
                key.tokens_committed.load(Ordering::Acquire),
            ),
            images: quota::remaining(
                self.record.image_quota,
                key.images_committed.load(Ordering::Acquire),
            ),
        }
    }

    /// The per-minute standing of the key and its user, without taking anything.
    pub fn figures(&self) -> RateFigures {
        RateFigures::tighter(
            self.key.limiter.figures(&key_limits(&self.record)),
            self.user.limiter.figures(&user_limits(&self.user_record)),
        )
    }
}

pub fn key_limits(record: &KeyRecord) -> LimitSpec {
    LimitSpec {
        rpm: record.rpm_limit,
        tpm: record.tpm_limit,
        concurrent: record.max_concurrent,
    }
}

pub fn user_limits(record: &UserRecord) -> LimitSpec {
    LimitSpec {
        rpm: record.rpm_limit,
        tpm: record.tpm_limit,
        concurrent: record.max_concurrent,
    }
}

/// Settings of the gate that come from configuration.
#[derive(Clone, Debug)]
pub struct GateSettings {
    /// Keep request and response bodies in the call log.
    pub log_bodies: bool,
    /// The output cap assumed (and, for keys with a token quota, sent) when a client gives none.
    pub default_max_tokens: u64,
    /// Images one request may carry, for every key (a key may set a lower cap).
    pub max_images_per_request: Option<u32>,
}

impl Default for GateSettings {
    fn default() -> Self {
        GateSettings {
            log_bodies: false,
            default_max_tokens: 4096,
            max_images_per_request: None,
        }
    }
}

/// The gate shared by both doors. Every check lives here once.
pub struct Gateway {
    pub(super) store: Arc<dyn Store>,
    sink: UsageSink,
    metrics: Arc<Metrics>,
    /// Keys in use, by the hashes of their secrets: the current one, and the previous one
    /// while a rotation's grace period may still run. A key is loaded from the store the
    /// first time it is used, so start-up and memory do not grow with the keys issued.
    keys_by_hash: DashMap<SecretHash, Arc<KeyState>>,
    /// The same keys by id: each key's one live state (counters in flight, limiter).
    pub(super) keys_by_id: DashMap<String, Arc<KeyState>>,
    pub(super) users: DashMap<String, Arc<UserState>>,
    admin_token_hash: SecretHash,
    settings: GateSettings,
}

impl Gateway {
    /// Loads the users from the store; keys are loaded when first used.
    pub fn load(
        store: Arc<dyn Store>,
        sink: UsageSink,
        metrics: Arc<Metrics>,
        admin_token_hash: SecretHash,
        settings: GateSettings,
    ) -> Result<Self, GatewayError> {
        let gateway = Gateway {
            metrics,
            keys_by_hash: DashMap::new(),
            keys_by_id: DashMap::new(),
            users: DashMap::new(),
            store,
            sink,
            admin_token_hash,
            settings,
        };
        for user in gateway.store.load_users()? {
            gateway
                .users
                .insert(user.id.clone(), Arc::new(UserState::new(user)));
        }
        Ok(gateway)
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

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Counts a refusal by the gate in the metrics, and passes it on.
    pub fn refused(&self, e: GatewayError) -> GatewayError {
        if let Some(reason) = e.refusal_reason() {
            self.metrics.refusal(reason);
        }
        e
    }

    pub fn logs_bodies(&self) -> bool {
        self.settings.log_bodies
    }

    pub fn usage_backlog(&self) -> u64 {
        self.sink.backlog()
    }

    /// Whether the store takes writes, and what it holds back when it does not.
    pub fn store_health(&self) -> &StoreHealth {
        self.sink.health()
    }

    pub fn store_figures(&self) -> StoreFigures {
        let health = self.sink.health();
        StoreFigures {
            backlog: self.sink.backlog(),
            available: health.is_available(),
            unrecorded: health.unrecorded(),
            failures: health.failures(),
        }
    }

    /// Checks `Authorization: Bearer <secret>` (the value after `Bearer `).
    pub fn authenticate(&self, secret: Option<&str>) -> Result<Caller, GatewayError> {
        self.check_key(secret).map_err(|e| self.refused(e))
    }

    fn check_key(&self, secret: Option<&str>) -> Result<Caller, GatewayError> {
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
        let record = state.record();
        if !record.is_current_secret(&hash, now_unix()) {
            return Err(GatewayError::InvalidApiKey(
                "This API key was rotated and its grace period is over.",
            ));
        }
        if !record.active || record.revoked_at.is_some() {
            return Err(GatewayError::InvalidApiKey(
                "This API key has been revoked or deactivated.",
            ));
        }
        if record.expires_at.is_some_and(|at| at <= now_unix()) {
            return Err(GatewayError::InvalidApiKey("This API key has expired."));
        }
        let user = self
            .users
            .get(&record.user_id)
            .map(|entry| entry.value().clone())
            .ok_or(GatewayError::InvalidApiKey(UNKNOWN))?;
        let user_record = user.record();
        if !user_record.active {
            return Err(GatewayError::InvalidApiKey(
                "The user owning this API key is deactivated.",
            ));
        }
        Ok(Caller {
            key: state,
            record,
            user,
            user_record,
        })
    }

    /// Checks the admin token in constant time.
    pub fn authenticate_admin(&self, token: Option<&str>) -> Result<(), GatewayError> {
        match token {
            Some(token) if keys::secret_matches(token.trim(), &self.admin_token_hash) => Ok(()),
            _ => Err(self.refused(GatewayError::InvalidAdminToken)),
        }
    }

    /// Whether the caller may use `model` (its allowlist).
    pub fn authorize_model(&self, caller: &Caller, model: &str) -> Result<(), GatewayError> {
        if caller.record.allows_model(model) {
            Ok(())
        } else {
            Err(GatewayError::ModelNotAllowed {
                model: model.to_owned(),
            })
        }
    }

    /// Policy, quotas and limits for one call, all or nothing. On success the call's
    /// request, tokens and images are reserved, and the returned [`Admission`] must travel
    /// with the call until it ends.
    pub fn admit(&self, caller: &Caller, facts: CallFacts) -> Result<Admission, GatewayError> {
        self.reserve(caller, facts).map_err(|e| self.refused(e))
    }

    fn reserve(&self, caller: &Caller, facts: CallFacts) -> Result<Admission, GatewayError> {
        // A call that could not be recorded is not made (its usage would be held in memory
        // only): refused while the store fails, at the cost of one atomic load.
        if !self.sink.health().is_available() {
            return Err(GatewayError::StoreUnavailable);
        }
        self.authorize_model(caller, &facts.model)?;
        let record = &caller.record;
        let per_request = [
            record.max_images_per_request,
            self.settings.max_images_per_request,
        ]
        .into_iter()
        .flatten()
        .min();
        if let Some(cap) = per_request
            && facts.images > cap
        {
            return Err(GatewayError::invalid_request(
                format!(
                    "this request has {} images; at most {cap} are allowed per request",
                    facts.images
                ),
                Some("messages"),
            ));
        }
        let key = &caller.key;
        let mut admission = Admission {
            caller: caller.clone(),
            key_limits: key_limits(record),
            user_limits: user_limits(&caller.user_record),
            facts,
            sink: self.sink.clone(),
            metrics: self.metrics.clone(),
            log_bodies: self.settings.log_bodies,
            started: Instant::now(),
            reserved: Reserved::default(),
            upstream_cap: None,
            figures: RateFigures::default(),
            admitted: false,
            forwarded: None,
            upstream_done: None,
            usage: None,
            chunks_seen: 0,
            response_body: None,
            settled: false,
        };

        // Quotas first, so a call they refuse takes nothing from the per-minute limits.
        let mut plan = None;
        let choices = admission.facts.choices.max(1);
        // A tokens-per-minute limit below the default cap would refuse every call that gives
        // no cap: such calls get the room under the limit as their cap instead.
        let tpm = [admission.key_limits.tpm, admission.user_limits.tpm]
            .into_iter()
            .flatten()
            .min();
        let ask = TokenAsk {
            prompt_estimate: admission.facts.prompt_estimate,
            client_cap: admission.facts.client_cap,
            choices,
            default_cap: self.settings.default_max_tokens,
            default_ceiling: tpm
                .map(|t| t.saturating_sub(admission.facts.prompt_estimate) / choices),
        };
        let tokens =
            key.tokens_committed
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |committed| {
                    plan = quota::plan_tokens(quota::remaining(record.token_quota, committed), ask);
                    plan.map(|p| committed.saturating_add(p.reserve))
                });
        let plan = match (tokens, plan) {
            (Ok(_), Some(plan)) => plan,
            _ => {
                return Err(GatewayError::QuotaExceeded {
                    what: "tokens",
                    limit: record.token_quota.unwrap_or_default(),
                });
            }
        };
        admission.reserved.tokens = plan.reserve;
        admission.upstream_cap = plan.upstream_cap;
        reserve_one(&key.requests_reserved, record.request_quota, 1).map_err(|limit| {
            GatewayError::QuotaExceeded {
                what: "requests",
                limit,
            }
        })?;
        admission.reserved.request = true;
        let images = u64::from(admission.facts.images);
        if images > 0 {
            reserve_one(&key.images_committed, record.image_quota, images).map_err(|limit| {
                GatewayError::QuotaExceeded {
                    what: "images",
                    limit,
                }
            })?;
            admission.reserved.images = images;
        }

        let key_grant = key
            .limiter
            .acquire(&admission.key_limits, LimitScope::Key, plan.reserve)
            .map_err(GatewayError::from)?;
        admission.reserved.key_grant = Some(key_grant);
        let user_grant = caller
            .user
            .limiter
            .acquire(&admission.user_limits, LimitScope::User, plan.reserve)
            .map_err(GatewayError::from)?;
        admission.reserved.user_grant = Some(user_grant);
        admission.figures = RateFigures::from_grants(&key_grant, &user_grant);
        admission.admitted = true;
        self.metrics.call_started(admission.facts.door);
        Ok(admission)
    }
}

/// Adds `amount` to `counter` if the result stays within `quota`; else the quota.
fn reserve_one(counter: &AtomicU64, quota: Option<u64>, amount: u64) -> Result<(), u64> {
    match quota {
        None => {
            counter.fetch_add(amount, Ordering::AcqRel);
            Ok(())
        }
        Some(quota) => counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                n.checked_add(amount).filter(|&total| total <= quota)
            })
            .map(drop)
            .map_err(|_| quota),
    }
}

/// Moves `counter` from `reserved` to `charged`.
fn settle_counter(counter: &AtomicU64, reserved: u64, charged: u64) {
    if charged >= reserved {
        counter.fetch_add(charged - reserved, Ordering::AcqRel);
    } else {
        counter.fetch_sub(reserved - charged, Ordering::AcqRel);
    }
}

/// What the gate knows of a call before it is forwarded.
#[derive(Clone, Debug)]
pub struct CallFacts {
    pub request_id: String,
    pub model: String,
    pub stream: bool,
    /// Prompt tokens estimated from the text and images.
    pub prompt_estimate: u64,
    /// The client's output cap (`max_tokens` / `max_completion_tokens`).
    pub client_cap: Option<u64>,
    /// Choices to generate (`n`).
    pub choices: u64,
    pub door: Door,
    /// The model as a metrics label: a configured name, or `other`.
    pub metric_model: String,
    pub images: u32,
    /// Sizes of the inline images, as read from their headers.
    pub image_sizes: Vec<ImageSize>,
    /// The request body, kept only when the call log stores bodies.
    pub request_body: Option<String>,
}

/// What an admission holds until it settles.
#[derive(Debug, Default)]
struct Reserved {
    request: bool,
    tokens: u64,
    images: u64,
    key_grant: Option<Grant>,
    user_grant: Option<Grant>,
}

/// An admitted call's reservation; it is settled exactly once, by [`Admission::settle`]
/// or, if the call is abandoned (client gone, task cancelled), by `Drop`. A call refused
/// half-way through admission gives back what it had reserved, and is not recorded.
#[derive(Debug)]
pub struct Admission {
    caller: Caller,
    key_limits: LimitSpec,
    user_limits: LimitSpec,
    facts: CallFacts,
    sink: UsageSink,
    metrics: Arc<Metrics>,
    log_bodies: bool,
    started: Instant,
    reserved: Reserved,
    upstream_cap: Option<u64>,
    figures: RateFigures,
    admitted: bool,
    /// When the request went to the model server.
    forwarded: Option<Instant>,
    /// When the model server's answer ended.
    upstream_done: Option<Instant>,
    usage: Option<Usage>,
    chunks_seen: u64,
    response_body: Option<String>,
    settled: bool,
}

impl Admission {
    pub fn request_id(&self) -> &str {
        &self.facts.request_id
    }

    /// The per-minute standing after this call was admitted (`x-ratelimit-*`).
    pub fn figures(&self) -> RateFigures {
        self.figures
    }

    /// The `max_tokens` the upstream must be held to, when the client's must change.
    pub fn upstream_cap(&self) -> Option<u64> {
        self.upstream_cap
    }

    pub fn caller(&self) -> &Caller {
        &self.caller
    }

    pub fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The quotas left with this call's reservation counted.
    pub fn remaining(&self) -> Remaining {
        self.caller.remaining()
    }

    /// The upstream has the request: from now on an abandoned call is charged.
    pub fn mark_forwarded(&mut self) {
        self.forwarded.get_or_insert_with(Instant::now);
    }

    /// The model server's answer has ended (its last byte arrived).
    pub fn mark_upstream_done(&mut self) {
        self.upstream_done.get_or_insert_with(Instant::now);
    }

    /// Usage reported by the upstream (cumulative; the latest report wins).
    pub fn observe_usage(&mut self, usage: Usage) {
        self.usage = Some(usage);
    }

    /// A streamed chunk with choices reached the gate (the estimate when usage never comes).
    pub fn observe_chunk(&mut self) {
        if self.chunks_seen == 0 {
            self.metrics.time_to_first_token(
                self.facts.door,
                &self.facts.metric_model,
                self.started.elapsed(),
            );
        }
        self.chunks_seen += 1;
    }

    pub fn keep_response_body(&mut self, body: &[u8]) {
        if self.log_bodies {
            self.response_body = Some(String::from_utf8_lossy(body).into_owned());
        }
    }

    /// Ends the call with the real outcome.
    pub fn settle(mut self, outcome: CallOutcome, status: u16) {
        self.finish(outcome, status);
    }

    /// Gives back every reservation, charging `charged` (and the request, if `charge_request`).
    fn release(&mut self, charged: Usage, charge_request: bool) {
        let key = &self.caller.key;
        let reserved = std::mem::take(&mut self.reserved);
        if reserved.request {
            if charge_request {
                key.requests_used.fetch_add(1, Ordering::AcqRel);
            } else {
                key.requests_reserved.fetch_sub(1, Ordering::AcqRel);
            }
        }
        settle_counter(&key.tokens_committed, reserved.tokens, charged.total());
        key.prompt_tokens_used
            .fetch_add(charged.prompt_tokens, Ordering::AcqRel);
        key.completion_tokens_used
            .fetch_add(charged.completion_tokens, Ordering::AcqRel);
        let images = if charge_request { reserved.images } else { 0 };
        settle_counter(&key.images_committed, reserved.images, images);
        key.images_used.fetch_add(images, Ordering::AcqRel);
        let refused = !self.admitted;
        if let Some(grant) = reserved.key_grant {
            key.limiter
                .release(&grant, &self.key_limits, charged.total(), refused);
        }
        if let Some(grant) = reserved.user_grant {
            self.caller
                .user
                .limiter
                .release(&grant, &self.user_limits, charged.total(), refused);
        }
    }

    fn finish(&mut self, outcome: CallOutcome, status: u16) {
        if std::mem::replace(&mut self.settled, true) {
            return;
        }
        if !self.admitted {
            self.release(Usage::default(), false);
            return;
        }
        let charged_request = self.forwarded.is_some() && outcome.charges_request();
        let (usage, usage_estimated) = match self.usage {
            Some(usage) => (usage, false),
            // Served but never told how much: charge what the gate saw of it.
            None if charged_request => (
                Usage {
                    prompt_tokens: self.facts.prompt_estimate,
                    completion_tokens: self.chunks_seen,
                },
                true,
            ),
            None => (Usage::default(), false),
        };
        self.release(usage, charged_request);
        let total = self.started.elapsed();
        let latency_ms = u64::try_from(total.as_millis()).unwrap_or(u64::MAX);
        self.metrics.call_ended(self.facts.door);
        self.metrics.call_settled(&SettledCall {
            door: self.facts.door,
            model: &self.facts.metric_model,
            outcome: outcome.as_str(),
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            images: if charged_request {
                u64::from(self.facts.images)
            } else {
                0
            },
            total,
            // The gateway's own share: all but the time the model server held the call.
            overhead: match (self.forwarded, self.upstream_done) {
                (Some(sent), Some(done)) => {
                    Some(total.saturating_sub(done.saturating_duration_since(sent)))
                }
                _ => None,
            },
        });
        tracing::info!(
            request_id = %self.facts.request_id,
            key_id = %self.caller.record.id,
            model = %self.facts.model,
            stream = self.facts.stream,
            status,
            outcome = outcome.as_str(),
            prompt_tokens = usage.prompt_tokens,
            completion_tokens = usage.completion_tokens,
            images = self.facts.images,
            estimated = usage_estimated,
            latency_ms,
            "call"
        );
        self.sink.record(CallRecord {
            at_micros: now_micros(),
            request_id: std::mem::take(&mut self.facts.request_id),
            key_id: self.caller.record.id.clone(),
            user_id: self.caller.record.user_id.clone(),
            model: std::mem::take(&mut self.facts.model),
            status,
            outcome,
            stream: self.facts.stream,
            latency_ms,
            charged_request,
            usage,
            usage_estimated,
            images: if charged_request {
                self.facts.images
            } else {
                0
            },
            image_sizes: std::mem::take(&mut self.facts.image_sizes),
            request_body: self.facts.request_body.take(),
            response_body: self.response_body.take(),
        });
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        // 499: the client closed the request (nginx's convention).
        self.finish(CallOutcome::ClientDisconnected, 499);
    }
}
