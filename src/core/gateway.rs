//! The gate itself: the in-memory key index, authentication, policy, limits and quota
//! reservations, and the settlement of every admitted call.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use dashmap::DashMap;

use super::error::GatewayError;
use super::keys::{self, SecretHash};
use super::limits::{RateLimiter, RateStatus};
use super::records::{
    CallOutcome, CallRecord, KeyCounters, KeyRecord, Usage, UserRecord, now_micros, now_unix,
};
use crate::store::{Store, UsageSink};

/// A key as the gate holds it: the record plus live counters and its limiter.
#[derive(Debug)]
pub struct KeyState {
    record: RwLock<Arc<KeyRecord>>,
    /// Requests charged so far plus those admitted and not yet settled.
    requests_reserved: AtomicU64,
    requests_used: AtomicU64,
    prompt_tokens_used: AtomicU64,
    completion_tokens_used: AtomicU64,
    limiter: RateLimiter,
}

impl KeyState {
    fn new(record: KeyRecord, counters: KeyCounters) -> Self {
        KeyState {
            record: RwLock::new(Arc::new(record)),
            requests_reserved: AtomicU64::new(counters.requests),
            requests_used: AtomicU64::new(counters.requests),
            prompt_tokens_used: AtomicU64::new(counters.prompt_tokens),
            completion_tokens_used: AtomicU64::new(counters.completion_tokens),
            limiter: RateLimiter::default(),
        }
    }

    pub fn record(&self) -> Arc<KeyRecord> {
        self.record
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn replace(&self, record: KeyRecord) {
        *self.record.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(record);
    }

    /// What the key has been charged so far (settled calls only).
    pub fn counters(&self) -> KeyCounters {
        KeyCounters {
            requests: self.requests_used.load(Ordering::Acquire),
            prompt_tokens: self.prompt_tokens_used.load(Ordering::Acquire),
            completion_tokens: self.completion_tokens_used.load(Ordering::Acquire),
        }
    }

    fn tokens_used(&self) -> u64 {
        self.prompt_tokens_used.load(Ordering::Acquire)
            + self.completion_tokens_used.load(Ordering::Acquire)
    }
}

fn parse_hash(record: &KeyRecord, hex: &str) -> Result<SecretHash, GatewayError> {
    keys::from_hex(hex)
        .ok_or_else(|| GatewayError::Store(format!("key `{}` has a malformed hash", record.id)))
}

/// An authenticated caller: the key and its owner at the time of the call.
#[derive(Clone, Debug)]
pub struct Caller {
    pub key: Arc<KeyState>,
    pub record: Arc<KeyRecord>,
    pub user: Arc<UserRecord>,
}

/// What is left of a key's quotas; `None` is unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Remaining {
    pub requests: Option<u64>,
    pub tokens: Option<u64>,
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
    pub remaining: Remaining,
    pub rpm_limit: Option<u32>,
    pub models: Option<Vec<String>>,
    pub created_at: i64,
    pub expires_at: Option<i64>,
}

impl Caller {
    pub fn usage_summary(&self) -> UsageSummary {
        let record = &self.record;
        UsageSummary {
            key_id: record.id.clone(),
            key_name: record.name.clone(),
            key_prefix: record.prefix.clone(),
            user_id: self.user.id.clone(),
            user_name: self.user.name.clone(),
            used: self.key.counters(),
            request_quota: record.request_quota,
            token_quota: record.token_quota,
            remaining: self.remaining(),
            rpm_limit: record.rpm_limit,
            models: record.models.clone(),
            created_at: record.created_at,
            expires_at: record.expires_at,
        }
    }

    pub fn remaining(&self) -> Remaining {
        let counters = self.key.counters();
        Remaining {
            requests: self
                .record
                .request_quota
                .map(|q| q.saturating_sub(self.key.requests_reserved.load(Ordering::Acquire))),
            tokens: self
                .record
                .token_quota
                .map(|q| q.saturating_sub(counters.tokens())),
        }
    }
}

/// Settings of the gate that come from configuration.
#[derive(Clone, Debug, Default)]
pub struct GateSettings {
    /// Keep request and response bodies in the call log.
    pub log_bodies: bool,
}

/// The gate shared by both doors. Every check lives here once.
pub struct Gateway {
    pub(super) store: Arc<dyn Store>,
    sink: UsageSink,
    /// Current secrets, and previous ones while a rotation's grace period may still run.
    keys_by_hash: DashMap<SecretHash, Arc<KeyState>>,
    pub(super) keys_by_id: DashMap<String, Arc<KeyState>>,
    pub(super) users: DashMap<String, Arc<UserRecord>>,
    admin_token_hash: SecretHash,
    settings: GateSettings,
}

impl Gateway {
    /// Loads users, keys and counters from the store.
    pub fn load(
        store: Arc<dyn Store>,
        sink: UsageSink,
        admin_token_hash: SecretHash,
        settings: GateSettings,
    ) -> Result<Self, GatewayError> {
        let gateway = Gateway {
            keys_by_hash: DashMap::new(),
            keys_by_id: DashMap::new(),
            users: DashMap::new(),
            store,
            sink,
            admin_token_hash,
            settings,
        };
        for user in gateway.store.load_users()? {
            gateway.users.insert(user.id.clone(), Arc::new(user));
        }
        let mut counters = gateway.store.load_counters()?;
        for key in gateway.store.load_keys()? {
            let used = counters.remove(&key.id).unwrap_or_default();
            gateway.index_key(key, used)?;
        }
        Ok(gateway)
    }

    pub(super) fn index_key(
        &self,
        record: KeyRecord,
        counters: KeyCounters,
    ) -> Result<(), GatewayError> {
        let hash = parse_hash(&record, &record.hash)?;
        let previous = match &record.previous_hash {
            Some(previous) => Some(parse_hash(&record, previous)?),
            None => None,
        };
        let id = record.id.clone();
        let state = Arc::new(KeyState::new(record, counters));
        self.keys_by_hash.insert(hash, state.clone());
        if let Some(previous) = previous {
            self.keys_by_hash.insert(previous, state.clone());
        }
        self.keys_by_id.insert(id, state);
        Ok(())
    }

    /// Points a new secret at an existing key and forgets the secret before the previous.
    pub(super) fn index_rotated_secret(
        &self,
        record: &KeyRecord,
        forgotten: Option<&str>,
    ) -> Result<(), GatewayError> {
        let state = self
            .keys_by_id
            .get(&record.id)
            .map(|s| s.value().clone())
            .ok_or_else(|| GatewayError::NotFound {
                what: "key",
                id: record.id.clone(),
            })?;
        self.keys_by_hash
            .insert(parse_hash(record, &record.hash)?, state);
        if let Some(forgotten) = forgotten.and_then(keys::from_hex) {
            self.keys_by_hash.remove(&forgotten);
        }
        Ok(())
    }

    /// Replaces a key's record in place, keeping its counters and limiter.
    pub(super) fn update_indexed_key(&self, record: KeyRecord) -> Result<(), GatewayError> {
        match self.keys_by_id.get(&record.id) {
            Some(state) => {
                state.replace(record);
                Ok(())
            }
            None => Err(GatewayError::NotFound {
                what: "key",
                id: record.id,
            }),
        }
    }

    pub fn logs_bodies(&self) -> bool {
        self.settings.log_bodies
    }

    pub fn usage_backlog(&self) -> u64 {
        self.sink.backlog()
    }

    /// Checks `Authorization: Bearer <secret>` (the value after `Bearer `).
    pub fn authenticate(&self, secret: Option<&str>) -> Result<Caller, GatewayError> {
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
            .keys_by_hash
            .get(&hash)
            .map(|entry| entry.value().clone())
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
        if !user.active {
            return Err(GatewayError::InvalidApiKey(
                "The user owning this API key is deactivated.",
            ));
        }
        Ok(Caller {
            key: state,
            record,
            user,
        })
    }

    /// Checks the admin token in constant time.
    pub fn authenticate_admin(&self, token: Option<&str>) -> Result<(), GatewayError> {
        match token {
            Some(token) if keys::secret_matches(token.trim(), &self.admin_token_hash) => Ok(()),
            _ => Err(GatewayError::InvalidAdminToken),
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

    /// Policy, rate limit and quota for one call; on success the request is reserved and
    /// the returned [`Admission`] must travel with the call until it ends.
    pub fn admit(&self, caller: &Caller, call: CallFacts) -> Result<Admission, GatewayError> {
        self.authorize_model(caller, &call.model)?;
        let record = &caller.record;
        let key = &caller.key;
        if let Some(quota) = record.token_quota
            && key.tokens_used() >= quota
        {
            return Err(GatewayError::QuotaExceeded {
                what: "tokens",
                limit: quota,
            });
        }
        if let Some(quota) = record.request_quota
            && key.requests_reserved.load(Ordering::Acquire) >= quota
        {
            return Err(GatewayError::QuotaExceeded {
                what: "requests",
                limit: quota,
            });
        }
        let rate = match record.rpm_limit {
            Some(limit) => Some(
                key.limiter
                    .try_acquire(limit)
                    .map_err(|retry_after| GatewayError::RateLimited { limit, retry_after })?,
            ),
            None => None,
        };
        // The reservation itself: exact under concurrency, whatever the check above saw.
        if let Some(quota) = record.request_quota {
            key.requests_reserved
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| {
                    (r < quota).then_some(r + 1)
                })
                .map_err(|_| GatewayError::QuotaExceeded {
                    what: "requests",
                    limit: quota,
                })?;
        } else {
            key.requests_reserved.fetch_add(1, Ordering::AcqRel);
        }
        Ok(Admission {
            caller: caller.clone(),
            facts: call,
            sink: self.sink.clone(),
            log_bodies: self.settings.log_bodies,
            started: Instant::now(),
            rate,
            forwarded: false,
            usage: None,
            chunks_seen: 0,
            response_body: None,
            settled: false,
        })
    }
}

/// What the gate knows of a call before it is forwarded.
#[derive(Clone, Debug)]
pub struct CallFacts {
    pub request_id: String,
    pub model: String,
    pub stream: bool,
    pub prompt_estimate: u64,
    /// The request body, kept only when the call log stores bodies.
    pub request_body: Option<String>,
}

/// An admitted call's reservation; it is settled exactly once, by [`Admission::settle`]
/// or, if the call is abandoned (client gone, task cancelled), by `Drop`.
#[derive(Debug)]
pub struct Admission {
    caller: Caller,
    facts: CallFacts,
    sink: UsageSink,
    log_bodies: bool,
    started: Instant,
    rate: Option<RateStatus>,
    forwarded: bool,
    usage: Option<Usage>,
    chunks_seen: u64,
    response_body: Option<String>,
    settled: bool,
}

impl Admission {
    pub fn request_id(&self) -> &str {
        &self.facts.request_id
    }

    pub fn rate(&self) -> Option<RateStatus> {
        self.rate
    }

    pub fn caller(&self) -> &Caller {
        &self.caller
    }

    pub fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The quotas left once this call's reservation is counted.
    pub fn remaining(&self) -> Remaining {
        self.caller.remaining()
    }

    /// The upstream has the request: from now on an abandoned call is charged.
    pub fn mark_forwarded(&mut self) {
        self.forwarded = true;
    }

    /// Usage reported by the upstream (cumulative; the latest report wins).
    pub fn observe_usage(&mut self, usage: Usage) {
        self.usage = Some(usage);
    }

    /// A streamed chunk with choices reached the gate (the estimate when usage never comes).
    pub fn observe_chunk(&mut self) {
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

    fn finish(&mut self, outcome: CallOutcome, status: u16) {
        if std::mem::replace(&mut self.settled, true) {
            return;
        }
        let charged_request = self.forwarded && outcome.charges_request();
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
        let key = &self.caller.key;
        if !charged_request {
            key.requests_reserved.fetch_sub(1, Ordering::AcqRel);
        } else {
            key.requests_used.fetch_add(1, Ordering::AcqRel);
        }
        key.prompt_tokens_used
            .fetch_add(usage.prompt_tokens, Ordering::AcqRel);
        key.completion_tokens_used
            .fetch_add(usage.completion_tokens, Ordering::AcqRel);
        let latency_ms = self.elapsed_ms();
        tracing::info!(
            request_id = %self.facts.request_id,
            key_id = %self.caller.record.id,
            model = %self.facts.model,
            stream = self.facts.stream,
            status,
            outcome = ?outcome,
            prompt_tokens = usage.prompt_tokens,
            completion_tokens = usage.completion_tokens,
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
