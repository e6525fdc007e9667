//! Admin operations on users and keys, as core functions both doors call.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::error::GatewayError;
use super::gateway::Gateway;
use super::key_index::{KeyState, UserState};
use super::keys;
use super::limits::{KeyLimits, LimitChanges, UserLimits};
use super::money::Money;
use super::period::Period;
use super::records::{CallRecord, KeyCounters, KeyRecord, UserRecord};
use super::shared_limits::Change;
use super::store::{CallCursor, CallQuery};
use super::time::{UnixTime, now_unix};

/// A time given either as seconds since the epoch or as an RFC 3339 string.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum TimeInput {
    Unix(UnixTime),
    Text(String),
}

impl TimeInput {
    pub fn resolve(&self, field: &str) -> Result<UnixTime, GatewayError> {
        match self {
            TimeInput::Unix(t) => Ok(*t),
            TimeInput::Text(text) => humantime::parse_rfc3339_weak(text)
                .map_err(|e| {
                    GatewayError::invalid_request(
                        format!("`{field}`: {e} (use seconds since the epoch or RFC 3339)"),
                        Some(field),
                    )
                })
                .map(|t| {
                    t.duration_since(std::time::UNIX_EPOCH)
                        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
                        .unwrap_or(0)
                }),
        }
    }
}

fn parse_duration(text: &str, field: &str) -> Result<i64, GatewayError> {
    humantime::parse_duration(text)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .map_err(|e| {
            GatewayError::invalid_request(
                format!("`{field}`: {e} (e.g. \"30d\", \"12h\")"),
                Some(field),
            )
        })
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct NewUser {
    pub name: String,
    #[serde(default)]
    pub email: Option<String>,
    /// The identity provider's subject this user stands for (see `[jwt]`).
    #[serde(default)]
    pub subject: Option<String>,
    /// Limits on the sum of the user's keys: every other member, checked (an unknown
    /// member is refused there, by name).
    #[serde(flatten)]
    pub limits: LimitChanges,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct UserPatch {
    #[serde(default)]
    pub name: Option<String>,
    /// `Some(None)` clears the email.
    #[serde(default, with = "double_option")]
    pub email: Option<Option<String>>,
    #[serde(default)]
    pub active: Option<bool>,
    /// `Some(None)` clears the subject.
    #[serde(default, with = "double_option")]
    pub subject: Option<Option<String>>,
    /// Every other member: a limit to set, or to remove when `null`.
    #[serde(flatten)]
    pub limits: LimitChanges,
}

/// A new key's settings; absent limits are unlimited.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct NewKey {
    pub user_id: String,
    #[serde(default)]
    pub name: Option<String>,
    /// Every other member: a limit, checked (an unknown member is refused, by name).
    #[serde(flatten)]
    pub limits: LimitChanges,
    #[serde(default)]
    pub expires_at: Option<TimeInput>,
    /// A lifetime such as "30d", instead of `expires_at`.
    #[serde(default)]
    pub expires_in: Option<String>,
    #[serde(default)]
    pub models: Option<Vec<String>>,
}

/// Changes to a key; a field set to `null` removes that limit.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct KeyPatch {
    #[serde(default)]
    pub name: Option<String>,
    /// Every other member: a limit to set, or to remove when `null`.
    #[serde(flatten)]
    pub limits: LimitChanges,
    #[serde(default, with = "double_option")]
    pub expires_at: Option<Option<TimeInput>>,
    #[serde(default)]
    pub expires_in: Option<String>,
    #[serde(default, with = "double_option")]
    pub models: Option<Option<Vec<String>>>,
    #[serde(default)]
    pub active: Option<bool>,
}

/// Distinguishes an absent field (`None`) from an explicit `null` (`Some(None)`).
mod double_option {
    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, T, D>(de: D) -> Result<Option<Option<T>>, D::Error>
    where
        T: Deserialize<'de>,
        D: Deserializer<'de>,
    {
        Option::<T>::deserialize(de).map(Some)
    }
}

/// A key as admin answers show it (never with its hash): the one shape of a key in REST
/// answers and the CLI's output, with the field names of the gRPC `Key` message (which
/// grpcurl prints in the proto3 JSON mapping: `requestsUsed`, 64-bit numbers as strings).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KeyView {
    pub id: String,
    pub user_id: String,
    pub name: String,
    pub prefix: String,
    #[serde(flatten)]
    pub limits: KeyLimits,
    pub expires_at: Option<UnixTime>,
    pub models: Option<Vec<String>>,
    pub active: bool,
    pub created_at: UnixTime,
    pub updated_at: UnixTime,
    pub revoked_at: Option<UnixTime>,
    /// Until when the secret before the last rotation still works.
    pub previous_secret_valid_until: Option<UnixTime>,
    /// Shown as `requests_used`, `prompt_tokens_used`, `completion_tokens_used`,
    /// `images_used` and `cost_used`, as the proto names them.
    #[serde(flatten, serialize_with = "used_fields")]
    pub used: KeyCounters,
}

fn used_fields<S: serde::Serializer>(used: &KeyCounters, serializer: S) -> Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    struct Used {
        requests_used: u64,
        prompt_tokens_used: u64,
        completion_tokens_used: u64,
        images_used: u64,
        cost_used: Money,
    }
    Used {
        requests_used: used.requests,
        prompt_tokens_used: used.prompt_tokens,
        completion_tokens_used: used.completion_tokens,
        images_used: used.images,
        cost_used: used.cost,
    }
    .serialize(serializer)
}

/// A created key: the only answer that carries the secret.
#[derive(Clone, Debug, Serialize)]
pub struct CreatedKey {
    #[serde(flatten)]
    pub key: KeyView,
    pub secret: String,
}

/// Which keys to list.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct KeyFilter {
    #[serde(default)]
    pub user_id: Option<String>,
}

/// One page of keys, in creation order.
#[derive(Clone, Debug, Default, Serialize)]
pub struct KeyPage {
    pub keys: Vec<KeyView>,
    /// The last key id of this page; empty on the last page.
    pub next_page_token: String,
}

/// Whose usage to report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UsageSubject {
    Key(String),
    User(String),
}

/// How to bucket usage over time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UsageGrouping {
    #[default]
    Hour,
    /// Days and months begin in the configured time zone.
    Day,
    Month,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageQuery {
    pub subject: UsageSubject,
    /// Default: 30 days before `to`.
    pub from: Option<UnixTime>,
    /// Default: now.
    pub to: Option<UnixTime>,
    pub group_by: UsageGrouping,
    pub by_model: bool,
    /// One row per key too (a user's report).
    pub by_key: bool,
}

/// Usage in one period (and one model, when grouped by model).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct UsageRow {
    pub start: UnixTime,
    /// Empty unless grouped by key.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub key_id: String,
    /// Empty unless grouped by model.
    pub model: String,
    /// Empty unless grouped by model and the catalogue knew the model.
    pub version: String,
    pub requests: u64,
    pub errors: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub images: u64,
    pub cost: Money,
    /// Of `requests`, those answered by the response cache.
    pub cache_hits: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct UsageReport {
    pub from: UnixTime,
    pub to: UnixTime,
    pub buckets: Vec<UsageRow>,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub images: u64,
    pub cost: Money,
    pub currency: String,
    pub cache_hits: u64,
}

/// Which calls to list; every set field must match.
#[derive(Clone, Debug, Default)]
pub struct CallFilter {
    pub key_id: Option<String>,
    pub user_id: Option<String>,
    pub model: Option<String>,
    pub status: Option<u16>,
    /// Seconds since the epoch.
    pub from: Option<UnixTime>,
    /// `next_page_token` of the previous page.
    pub page_token: Option<String>,
    pub page_size: Option<usize>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct CallPage {
    pub calls: Vec<CallRecord>,
    /// Empty on the last page.
    pub next_page_token: String,
}

/// How long a rotated-out secret keeps working by default.
pub const DEFAULT_ROTATION_GRACE_SECS: u64 = 24 * 3600;

fn check_name(name: &str, field: &str) -> Result<String, GatewayError> {
    let name = name.trim();
    if name.is_empty() || name.len() > 200 {
        return Err(GatewayError::invalid_request(
            format!("`{field}` must be 1 to 200 characters"),
            Some(field),
        ));
    }
    Ok(name.to_owned())
}

fn resolve_expiry(
    at: Option<&TimeInput>,
    within: Option<&str>,
    now: UnixTime,
) -> Result<Option<UnixTime>, GatewayError> {
    match (at, within) {
        (Some(_), Some(_)) => Err(GatewayError::invalid_request(
            "give `expires_at` or `expires_in`, not both",
            Some("expires_in"),
        )),
        (Some(at), None) => {
            let at = at.resolve("expires_at")?;
            if at <= now {
                return Err(GatewayError::invalid_request(
                    "`expires_at` is in the past; to stop a key, revoke it or set `active: false`",
                    Some("expires_at"),
                ));
            }
            Ok(Some(at))
        }
        (None, Some(within)) => Ok(Some(
            now.saturating_add(parse_duration(within, "expires_in")?),
        )),
        (None, None) => Ok(None),
    }
}

impl Gateway {
    pub fn create_user(&self, new: NewUser) -> Result<UserRecord, GatewayError> {
        let now = now_unix();
        let id = keys::generate_id("usr");
        let user = UserRecord {
            subject: self.claim_subject(new.subject.as_deref(), &id)?,
            id,
            name: check_name(&new.name, "name")?,
            email: new.email.filter(|e| !e.trim().is_empty()),
            active: true,
            limits: new.limits.apply(UserLimits::default())?,
            created_at: now,
            updated_at: now,
        };
        self.store.put_user(&user)?;
        self.index_subject(None, &user);
        self.keys
            .users
            .insert(user.id.clone(), Arc::new(UserState::new(user.clone())));
        Ok(user)
    }

    pub fn get_user(&self, id: &str) -> Result<UserRecord, GatewayError> {
        self.keys
            .user_state(id)?
            .map(|u| (*u.record()).clone())
            .ok_or_else(|| GatewayError::NotFound {
                what: "user",
                id: id.to_owned(),
            })
    }

    /// Every user, oldest first.
    pub fn list_users(&self) -> Vec<UserRecord> {
        // Users another replica made (a shared store) are not held here yet.
        if let Err(e) = self.keys.load_new_users() {
            // The list then shows the users this gateway holds.
            tracing::warn!(error = %e, "cannot read the users from the store");
        }
        let mut users: Vec<UserRecord> = self
            .keys
            .users
            .iter()
            .map(|u| (*u.record()).clone())
            .collect();
        users.sort_by(|a, b| a.id.cmp(&b.id));
        users
    }

    pub fn update_user(&self, id: &str, patch: UserPatch) -> Result<UserRecord, GatewayError> {
        let mut user = self.get_user(id)?;
        if let Some(name) = patch.name {
            user.name = check_name(&name, "name")?;
        }
        if let Some(email) = patch.email {
            user.email = email.filter(|e| !e.trim().is_empty());
        }
        if let Some(active) = patch.active {
            user.active = active;
        }
        let before = user.subject.clone();
        if let Some(subject) = patch.subject {
            user.subject = self.claim_subject(subject.as_deref(), &user.id)?;
        }
        user.limits = patch.limits.apply(user.limits)?;
        user.updated_at = now_unix();
        self.store.put_user(&user)?;
        self.index_subject(before.as_deref(), &user);
        if let Some(state) = self.keys.users.get(&user.id) {
            state.replace(user.clone());
        }
        self.announce(Change::User(user.id.clone()));
        Ok(user)
    }

    /// Deactivates a user: all of the user's keys stop working at once.
    pub fn deactivate_user(&self, id: &str) -> Result<UserRecord, GatewayError> {
        self.update_user(
            id,
            UserPatch {
                active: Some(false),
                ..UserPatch::default()
            },
        )
    }

    pub fn create_key(&self, new: NewKey) -> Result<CreatedKey, GatewayError> {
        let user = self.get_user(&new.user_id)?;
        if !user.active {
            return Err(GatewayError::invalid_request(
                format!("user `{}` is deactivated", user.id),
                Some("user_id"),
            ));
        }
        let now = now_unix();
        let secret = keys::generate_secret();
        let record = KeyRecord {
            expires_at: resolve_expiry(new.expires_at.as_ref(), new.expires_in.as_deref(), now)?,
            models: check_models(new.models)?,
            ..KeyRecord::fresh(
                keys::generate_id("key"),
                user.id,
                check_name(new.name.as_deref().unwrap_or("default"), "name")?,
                &secret,
                new.limits.apply(KeyLimits::default())?,
                now,
            )
        };
        self.store.put_key(&record)?;
        let view = key_view(&record, KeyCounters::default());
        self.keys.index_key(record, KeyCounters::default())?;
        Ok(CreatedKey { key: view, secret })
    }

    pub fn get_key(&self, id: &str) -> Result<KeyView, GatewayError> {
        let state = self.keys.key_state(id)?;
        Ok(key_view(&state.record(), state.counters()))
    }

    /// Keys after `page_token` (a key id), oldest first, optionally of one user; at most
    /// `page_size` (default 100, at most 1000). Read from the store, with the live
    /// counters of keys in use.
    pub fn list_keys_page(
        &self,
        filter: &KeyFilter,
        page_token: Option<&str>,
        page_size: Option<usize>,
    ) -> Result<KeyPage, GatewayError> {
        let size = page_size.unwrap_or(100).clamp(1, 1000);
        let after = page_token.filter(|t| !t.is_empty());
        let mut keys = self.scan_keys(filter, after, size + 1)?;
        let next_page_token = if keys.len() > size {
            keys.truncate(size);
            keys.last().map(|k| k.id.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(KeyPage {
            keys,
            next_page_token,
        })
    }

    /// Up to `limit` keys after `after` that pass `filter`, in id order.
    pub(super) fn scan_keys(
        &self,
        filter: &KeyFilter,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<KeyView>, GatewayError> {
        let mut keys = Vec::new();
        self.store.scan_keys(after, &mut |record, counters| {
            if filter
                .user_id
                .as_deref()
                .is_none_or(|u| record.user_id == u)
            {
                keys.push(match self.keys.keys_by_id.get(&record.id) {
                    Some(live) => key_view(&live.record(), live.counters()),
                    None => key_view(&record, counters),
                });
            }
            keys.len() < limit
        })?;
        Ok(keys)
    }

    /// The ids of a user's keys, as the store has them (a scan of every key): for a user's
    /// usage report, and a user's first budgeted call in a process.
    pub(super) fn user_key_ids(&self, user_id: &str) -> Result<Vec<String>, GatewayError> {
        let mut ids = Vec::new();
        self.store.scan_keys(None, &mut |key, _| {
            if key.user_id == user_id {
                ids.push(key.id);
            }
            true
        })?;
        Ok(ids)
    }

    pub fn update_key(&self, id: &str, patch: KeyPatch) -> Result<KeyView, GatewayError> {
        let (state, mut record) = self.changeable_key(id, "changed")?;
        let now = now_unix();
        if let Some(name) = patch.name {
            record.name = check_name(&name, "name")?;
        }
        record.limits = patch.limits.apply(record.limits)?;
        if patch.expires_at.is_some() || patch.expires_in.is_some() {
            let at = patch.expires_at.clone().flatten();
            record.expires_at = resolve_expiry(at.as_ref(), patch.expires_in.as_deref(), now)?;
        }
        if let Some(models) = patch.models {
            record.models = check_models(models)?;
        }
        if let Some(active) = patch.active {
            if active && record.revoked_at.is_some() {
                return Err(GatewayError::invalid_request(
                    "a revoked key cannot be reactivated; create a new key",
                    Some("active"),
                ));
            }
            record.active = active;
        }
        record.updated_at = now;
        self.store_key(&state, record)
    }

    /// Revokes a key for good; its usage history stays.
    pub fn revoke_key(&self, id: &str) -> Result<KeyView, GatewayError> {
        let state = self.keys.key_state(id)?;
        let mut record = (*state.record()).clone();
        let now = now_unix();
        record.active = false;
        record.revoked_at.get_or_insert(now);
        record.updated_at = now;
        self.store_key(&state, record)
    }

    /// A key and a copy of its record to change; a revoked key cannot be `action`.
    fn changeable_key(
        &self,
        id: &str,
        action: &str,
    ) -> Result<(Arc<KeyState>, KeyRecord), GatewayError> {
        let state = self.keys.key_state(id)?;
        let record = (*state.record()).clone();
        if record.revoked_at.is_some() {
            return Err(GatewayError::invalid_request(
                format!("a revoked key cannot be {action}; create a new key"),
                Some("id"),
            ));
        }
        Ok((state, record))
    }

    /// Writes a changed key record, then puts it in place of the old one.
    fn store_key(&self, state: &KeyState, record: KeyRecord) -> Result<KeyView, GatewayError> {
        self.store.put_key(&record)?;
        let view = key_view(&record, state.counters());
        let id = record.id.clone();
        state.replace(record);
        self.announce(Change::Key(id));
        Ok(view)
    }

    /// A new secret for the key; the old one keeps working for `grace_secs`.
    pub fn rotate_key(&self, id: &str, grace_secs: u64) -> Result<CreatedKey, GatewayError> {
        let (state, mut record) = self.changeable_key(id, "rotated")?;
        let now = now_unix();
        let secret = keys::generate_secret();
        let forgotten = record.previous_hash.take();
        record.previous_hash = Some(std::mem::replace(
            &mut record.hash,
            keys::to_hex(&keys::hash_secret(&secret)),
        ));
        record.previous_valid_until =
            Some(now.saturating_add(i64::try_from(grace_secs).unwrap_or(i64::MAX)));
        record.prefix = keys::display_prefix(&secret);
        record.updated_at = now;
        let hash = record.hash.clone();
        let view = self.store_key(&state, record)?;
        self.keys
            .index_rotated_secret(&view.id, &hash, forgotten.as_deref())?;
        Ok(CreatedKey { key: view, secret })
    }

    /// Usage of a key, or of all of a user's keys, bucketed by hour or day.
    pub fn usage_report(&self, query: &UsageQuery) -> Result<UsageReport, GatewayError> {
        let key_ids = match &query.subject {
            UsageSubject::Key(id) => vec![self.get_key(id)?.id],
            UsageSubject::User(id) => {
                self.get_user(id)?;
                self.user_key_ids(id)?
            }
        };
        let to = query.to.unwrap_or_else(|| now_unix() + 1);
        let from = query.from.unwrap_or(to - 30 * 86_400);
        if from > to {
            return Err(GatewayError::invalid_request(
                "`from` is after `to`",
                Some("from"),
            ));
        }
        // Hourly buckets are stored; a bucket overlapping `from` counts whole.
        let first_hour = from - from.rem_euclid(3600);
        let calendar = &self.settings.calendar;
        let start_of = |hour: UnixTime| match query.group_by {
            UsageGrouping::Hour => hour,
            UsageGrouping::Day => calendar.start_of(Period::Day, hour),
            UsageGrouping::Month => calendar.start_of(Period::Month, hour),
        };
        let mut rows: std::collections::BTreeMap<(UnixTime, String, String, String), UsageRow> =
            Default::default();
        for key_id in &key_ids {
            let row_key = match query.by_key {
                true => key_id.clone(),
                false => String::new(),
            };
            for bucket in self.store.usage(key_id, first_hour, to)? {
                let start = start_of(bucket.hour);
                let (model, version) = match query.by_model {
                    true => (bucket.model, bucket.version),
                    false => Default::default(),
                };
                let row = rows
                    .entry((start, row_key.clone(), model.clone(), version.clone()))
                    .or_insert_with(|| UsageRow {
                        start,
                        key_id: row_key.clone(),
                        model,
                        version,
                        ..UsageRow::default()
                    });
                row.requests += bucket.requests;
                row.errors += bucket.errors;
                row.prompt_tokens += bucket.prompt_tokens;
                row.completion_tokens += bucket.completion_tokens;
                row.images += bucket.images;
                row.cost = row.cost.saturating_add(bucket.cost);
                row.cache_hits += bucket.cache_hits;
            }
        }
        let buckets: Vec<UsageRow> = rows.into_values().collect();
        Ok(UsageReport {
            from,
            to,
            cost: buckets
                .iter()
                .fold(Money::ZERO, |sum, b| sum.saturating_add(b.cost)),
            currency: self.settings.currency.clone(),
            requests: buckets.iter().map(|b| b.requests).sum(),
            prompt_tokens: buckets.iter().map(|b| b.prompt_tokens).sum(),
            completion_tokens: buckets.iter().map(|b| b.completion_tokens).sum(),
            images: buckets.iter().map(|b| b.images).sum(),
            cache_hits: buckets.iter().map(|b| b.cache_hits).sum(),
            buckets,
        })
    }

    /// The call log, newest first, one page at a time.
    pub fn list_calls(&self, filter: &CallFilter) -> Result<CallPage, GatewayError> {
        if let Some(key_id) = &filter.key_id {
            self.get_key(key_id)?;
        }
        if let Some(user_id) = &filter.user_id {
            self.get_user(user_id)?;
        }
        let before = match filter.page_token.as_deref().filter(|t| !t.is_empty()) {
            Some(token) => Some(CallCursor::from_token(token).ok_or_else(|| {
                GatewayError::invalid_request(
                    "`page_token` is not one this gateway gave out",
                    Some("page_token"),
                )
            })?),
            None => None,
        };
        let limit = filter.page_size.unwrap_or(50).clamp(1, 1000);
        let query = CallQuery {
            key_id: filter.key_id.as_deref(),
            before,
            from_micros: filter.from.map(|s| s.saturating_mul(1_000_000)),
            limit,
            // Bounds the work of one page when the filters match rarely.
            scan_limit: 100_000,
        };
        let matches = |call: &CallRecord| {
            filter.user_id.as_ref().is_none_or(|u| &call.user_id == u)
                && filter.model.as_ref().is_none_or(|m| &call.model == m)
                && filter.status.is_none_or(|s| call.status == s)
        };
        let (calls, next) = self.store.calls(&query, &matches)?;
        Ok(CallPage {
            calls,
            next_page_token: next.map(|c| c.to_token()).unwrap_or_default(),
        })
    }
}

fn check_models(models: Option<Vec<String>>) -> Result<Option<Vec<String>>, GatewayError> {
    match models {
        Some(models) if models.iter().any(|m| m.trim().is_empty()) => Err(
            GatewayError::invalid_request("`models` entries must be model names", Some("models")),
        ),
        other => Ok(other),
    }
}

pub fn key_view(record: &KeyRecord, used: KeyCounters) -> KeyView {
    KeyView {
        id: record.id.clone(),
        user_id: record.user_id.clone(),
        name: record.name.clone(),
        prefix: record.prefix.clone(),
        limits: record.limits.clone(),
        expires_at: record.expires_at,
        models: record.models.clone(),
        active: record.active,
        created_at: record.created_at,
        updated_at: record.updated_at,
        revoked_at: record.revoked_at,
        previous_secret_valid_until: record.previous_valid_until,
        used,
    }
}
