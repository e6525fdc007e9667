//! The durable records of the gateway: users, keys, usage and the call log.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::catalogue::ModelRecord;
use super::images::ImageSize;
use super::keys::{self, hex_matches};
use super::limits::{KeyLimits, UserLimits};
use super::money::Money;
use super::time::UnixTime;

/// A person or service that owns keys.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub email: Option<String>,
    pub active: bool,
    /// The identity provider's name for this user (a JWT's subject claim): tokens naming
    /// it are this user's calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// Limits on the sum of the user's keys.
    #[serde(flatten)]
    pub limits: UserLimits,
    pub created_at: UnixTime,
    pub updated_at: UnixTime,
}

/// An API key. The secret itself is never stored: only its SHA-256 and a short prefix.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub id: String,
    pub user_id: String,
    pub name: String,
    /// The first characters of the secret, enough to recognise it in a list.
    pub prefix: String,
    /// Hex SHA-256 of the secret.
    pub hash: String,
    /// Stored flat, as the fields were before they were gathered into one struct.
    #[serde(flatten)]
    pub limits: KeyLimits,
    #[serde(default)]
    pub expires_at: Option<UnixTime>,
    /// Models this key may use; `None` allows every model the upstream serves.
    #[serde(default)]
    pub models: Option<Vec<String>>,
    pub active: bool,
    pub created_at: UnixTime,
    pub updated_at: UnixTime,
    #[serde(default)]
    pub revoked_at: Option<UnixTime>,
    /// Hex SHA-256 of the secret before the last rotation, valid until `previous_valid_until`.
    #[serde(default)]
    pub previous_hash: Option<String>,
    #[serde(default)]
    pub previous_valid_until: Option<UnixTime>,
}

impl KeyRecord {
    /// A key made `now`, active, kept by its `secret`'s hash and prefix only, with no
    /// expiry, model list or rotation yet.
    pub fn fresh(
        id: String,
        user_id: String,
        name: String,
        secret: &str,
        limits: KeyLimits,
        now: UnixTime,
    ) -> KeyRecord {
        KeyRecord {
            id,
            user_id,
            name,
            prefix: keys::display_prefix(secret),
            hash: keys::to_hex(&keys::hash_secret(secret)),
            limits,
            expires_at: None,
            models: None,
            active: true,
            created_at: now,
            updated_at: now,
            revoked_at: None,
            previous_hash: None,
            previous_valid_until: None,
        }
    }

    /// Whether `hash` opens this key at `now`: the current secret, or the previous one
    /// within its grace period.
    pub fn is_current_secret(&self, hash: &[u8; 32], now: UnixTime) -> bool {
        if hex_matches(&self.hash, hash) {
            return true;
        }
        self.previous_hash
            .as_deref()
            .is_some_and(|previous| hex_matches(previous, hash))
            && self.previous_valid_until.is_some_and(|until| now < until)
    }

    pub fn allows_model(&self, model: &str) -> bool {
        self.models
            .as_ref()
            .is_none_or(|models| models.iter().any(|m| m == model))
    }
}

/// Tokens the upstream reported for one call. The one reading of every answer's and
/// stream chunk's `usage` member, both doors: chat and text completions name the counts
/// prompt/completion, the Responses API input/output; a count left out is zero.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    #[serde(default, alias = "input_tokens")]
    pub prompt_tokens: u64,
    #[serde(default, alias = "output_tokens")]
    pub completion_tokens: u64,
}

impl Usage {
    pub fn total(&self) -> u64 {
        self.prompt_tokens + self.completion_tokens
    }
}

/// What a key has consumed in total, as charged against its quotas.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyCounters {
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    #[serde(default)]
    pub images: u64,
    /// What the calls cost, at the prices in effect when each was made.
    #[serde(default)]
    pub cost: Money,
}

impl KeyCounters {
    pub fn tokens(&self) -> u64 {
        self.prompt_tokens + self.completion_tokens
    }

    pub fn add(&mut self, other: &KeyCounters) {
        self.requests += other.requests;
        self.prompt_tokens += other.prompt_tokens;
        self.completion_tokens += other.completion_tokens;
        self.images += other.images;
        self.cost = self.cost.saturating_add(other.cost);
    }

    /// What was counted since `earlier` (counters only grow).
    pub fn since(&self, earlier: &KeyCounters) -> KeyCounters {
        KeyCounters {
            requests: self.requests.saturating_sub(earlier.requests),
            prompt_tokens: self.prompt_tokens.saturating_sub(earlier.prompt_tokens),
            completion_tokens: self
                .completion_tokens
                .saturating_sub(earlier.completion_tokens),
            images: self.images.saturating_sub(earlier.images),
            cost: self.cost.saturating_sub(earlier.cost),
        }
    }
}

/// How a call ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallOutcome {
    /// The upstream answered and the answer reached the client.
    Completed,
    /// The upstream answered with an error status.
    UpstreamError,
    /// The upstream could not be reached.
    UpstreamFailed,
    /// The upstream had the request but did not answer in time: the GPU worked, so the call
    /// is charged (an estimate, unless usage was reported).
    TimedOut,
    /// A stream ended without `[DONE]`, or with an error event.
    StreamIncomplete,
    /// The client went away before the answer was complete.
    ClientDisconnected,
    /// The gateway stopped the call while shutting down.
    Cancelled,
    /// The gateway was killed while the call was in flight: settled at the next start from
    /// its durable reservation, with the reservation's estimate (`usage_estimated`).
    Interrupted,
}

impl CallOutcome {
    /// The name used in JSON and in the gRPC `Call.outcome`.
    pub fn as_str(self) -> &'static str {
        match self {
            CallOutcome::Completed => "completed",
            CallOutcome::UpstreamError => "upstream_error",
            CallOutcome::UpstreamFailed => "upstream_failed",
            CallOutcome::TimedOut => "timed_out",
            CallOutcome::StreamIncomplete => "stream_incomplete",
            CallOutcome::ClientDisconnected => "client_disconnected",
            CallOutcome::Cancelled => "cancelled",
            CallOutcome::Interrupted => "interrupted",
        }
    }

    /// Whether the call counts against the request quota: only calls the model served.
    pub fn charges_request(self) -> bool {
        matches!(
            self,
            CallOutcome::Completed
                | CallOutcome::TimedOut
                | CallOutcome::StreamIncomplete
                | CallOutcome::ClientDisconnected
                | CallOutcome::Cancelled
                | CallOutcome::Interrupted
        )
    }
}

/// One entry of the call log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallRecord {
    /// Microseconds since the epoch; with `key_id`, the log's order.
    pub at_micros: i64,
    pub request_id: String,
    pub key_id: String,
    pub user_id: String,
    /// The model as the client named it, or the catalogue's name of it when the catalogue
    /// knew the name (an alias or a pinned version is booked under its model).
    pub model: String,
    /// The version of a catalogue model the call was sent to (the name the model server
    /// served it under); `None` for a model the catalogue does not know.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// HTTP status given to the client (the upstream's when it answered).
    pub status: u16,
    pub outcome: CallOutcome,
    pub stream: bool,
    pub latency_ms: u64,
    /// Whether the call counted as one request against the quota.
    pub charged_request: bool,
    pub usage: Usage,
    /// True when the upstream gave no usage and the tokens are the gateway's estimate.
    pub usage_estimated: bool,
    /// Images charged with this call.
    #[serde(default)]
    pub images: u32,
    /// Sizes of the inline (`data:`) images, read from their headers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_sizes: Vec<ImageSize>,
    /// What the call cost, computed once at settlement.
    #[serde(default)]
    pub cost: Money,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_body: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_body: Option<String>,
    /// The caller's address, as the edge found it (the socket's peer, or what a trusted
    /// proxy said).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_addr: Option<String>,
    /// The journal id of the call's durable reservation (durable mode): the store keeps
    /// one call per reservation, so a call settled again at recovery is not counted twice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reservation: Option<u64>,
    /// Answered from the response cache or by another caller's identical call in flight,
    /// not by a model call of its own; `usage` is then what the hit billing charged.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cache_hit: bool,
}

/// A finished call with its record as the call log and the journal keep it (JSON).
///
/// Encoded once, by the task that settled the call: the journal's settlement and the call
/// log then share one encoding, and the usage writer, whose batches run between calls on
/// the same CPU, only copies bytes (issue 21: the writer's JSON made multi-millisecond
/// runs that held up every call in flight).
#[derive(Clone, Debug)]
pub struct EncodedCall {
    pub call: CallRecord,
    /// `serde_json` of `call`; empty if it could not be encoded. Read through
    /// [`EncodedCall::json`].
    pub json: Vec<u8>,
}

impl EncodedCall {
    pub fn new(call: CallRecord) -> EncodedCall {
        // A call without bodies encodes to 400-500 bytes: room for it at once, where
        // `to_vec` starts at 128 and grows twice.
        let mut json = Vec::with_capacity(512);
        if serde_json::to_writer(&mut json, &call).is_err() {
            json = Vec::new();
        }
        EncodedCall { call, json }
    }

    /// The call's encoding: the one made at settlement, or, where that failed, the error
    /// of encoding it again.
    pub fn json(&self) -> Result<std::borrow::Cow<'_, [u8]>, serde_json::Error> {
        if self.json.is_empty() {
            serde_json::to_vec(&self.call).map(std::borrow::Cow::Owned)
        } else {
            Ok(std::borrow::Cow::Borrowed(&self.json))
        }
    }
}

impl CallRecord {
    pub fn counters(&self) -> KeyCounters {
        KeyCounters {
            requests: u64::from(self.charged_request),
            prompt_tokens: self.usage.prompt_tokens,
            completion_tokens: self.usage.completion_tokens,
            images: u64::from(self.images),
            cost: self.cost,
        }
    }
}

/// Usage of one key for one model (and version) within one hour.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageBucket {
    /// Start of the hour, seconds since the epoch.
    pub hour: UnixTime,
    pub model: String,
    /// The version, when the catalogue knew the model; else empty.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub version: String,
    pub requests: u64,
    pub errors: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    #[serde(default)]
    pub images: u64,
    #[serde(default)]
    pub cost: Money,
    /// Of `requests`, those answered by the response cache (or a shared call in flight).
    #[serde(default)]
    pub cache_hits: u64,
}

impl UsageBucket {
    /// An empty bucket for `call`'s hour, model and version.
    pub fn of(call: &CallRecord, hour: UnixTime) -> UsageBucket {
        UsageBucket {
            hour,
            model: call.model.clone(),
            version: call.version.clone().unwrap_or_default(),
            ..UsageBucket::default()
        }
    }

    /// Adds another bucket's figures (of the same hour, model and version).
    pub fn add(&mut self, other: &UsageBucket) {
        self.requests += other.requests;
        self.errors += other.errors;
        self.prompt_tokens += other.prompt_tokens;
        self.completion_tokens += other.completion_tokens;
        self.images += other.images;
        self.cost = self.cost.saturating_add(other.cost);
        self.cache_hits += other.cache_hits;
    }

    /// What the bucket adds to its key's counters.
    pub fn counters(&self) -> KeyCounters {
        KeyCounters {
            requests: self.requests,
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            images: self.images,
            cost: self.cost,
        }
    }

    /// Counts one call.
    pub fn count(&mut self, call: &CallRecord) {
        self.requests += u64::from(call.charged_request);
        self.errors += u64::from(call.status >= 400);
        self.prompt_tokens += call.usage.prompt_tokens;
        self.completion_tokens += call.usage.completion_tokens;
        self.images += u64::from(call.images);
        self.cost = self.cost.saturating_add(call.cost);
        self.cache_hits += u64::from(call.cache_hit);
    }

    /// `model NUL version`: what a bucket is kept by within its key and hour.
    pub fn series(&self) -> String {
        match self.version.is_empty() {
            true => self.model.clone(),
            false => format!("{}\0{}", self.model, self.version),
        }
    }
}

/// One record of the books, as the portable export (`export.rs`) carries it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ExportRecord {
    /// A setting the store keeps (the admin token's hash, the demo key's id), hex-encoded.
    Meta {
        name: String,
        value: String,
    },
    User(UserRecord),
    /// A key: its secret only as the SHA-256 `hash` (and `previous_hash` during a rotation).
    Key(KeyRecord),
    /// What a key has been charged in total.
    Counters {
        key_id: String,
        #[serde(flatten)]
        counters: KeyCounters,
    },
    /// One key's use of one model in one hour.
    Usage {
        key_id: String,
        #[serde(flatten)]
        bucket: UsageBucket,
    },
    /// One entry of the call log.
    Call(CallRecord),
    /// A price of a model version.
    Price(PriceRecord),
    /// One model of the catalogue.
    Model(ModelRecord),
    /// One admin change (the audit log).
    Audit(AuditRecord),
}

impl ExportRecord {
    /// Its place in an export's order: settings, users, keys, counters, usage, calls,
    /// prices, models, the audit log (the newer kinds last, so that exports of older builds
    /// are the same up to their end).
    pub fn kind(&self) -> usize {
        match self {
            ExportRecord::Meta { .. } => 0,
            ExportRecord::User(_) => 1,
            ExportRecord::Key(_) => 2,
            ExportRecord::Counters { .. } => 3,
            ExportRecord::Usage { .. } => 4,
            ExportRecord::Call(_) => 5,
            ExportRecord::Price(_) => 6,
            ExportRecord::Model(_) => 7,
            ExportRecord::Audit(_) => 8,
        }
    }
}

/// One price of a model version, in effect from `effective_from` until the next one.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PriceRecord {
    /// The model version (a name the model server serves), or a model's name.
    pub model: String,
    pub effective_from: UnixTime,
    #[serde(default)]
    pub prompt_per_million: Money,
    #[serde(default)]
    pub completion_per_million: Money,
    /// Per second of model time: from forwarding to the answer's last byte.
    #[serde(default)]
    pub per_second: Money,
    /// The least a call the model served costs.
    #[serde(default)]
    pub per_call_minimum: Money,
    /// Per image, by resolution tier name (`unknown`: an image whose size the gateway
    /// could not read, such as a URL the model server fetches).
    #[serde(default)]
    pub images: BTreeMap<String, Money>,
    #[serde(default)]
    pub created_at: UnixTime,
}

/// Who made a change: the door and, within it, the session or credential.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    /// `rest`, `grpc`, `cli` or `console`.
    pub door: String,
    /// What the door knows of the person: "admin token from 10.0.0.1", a console
    /// session's public id. Never a secret.
    pub who: String,
}

impl Actor {
    pub fn new(door: &str, who: impl Into<String>) -> Self {
        Actor {
            door: door.to_owned(),
            who: who.into(),
        }
    }
}

/// One admin change. Secrets never appear: keys are recorded as their admin view.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Time-ordered (`aud_…`), so the log reads newest first by id.
    pub id: String,
    pub at_micros: i64,
    pub actor: Actor,
    /// What was done, e.g. `key.create`, `key.revoke`, `user.update`.
    pub action: String,
    /// The id of the user or key changed.
    pub target: String,
    pub before: Option<serde_json::Value>,
    pub after: Option<serde_json::Value>,
}
