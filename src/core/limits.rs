//! The limits a key or a user carries: one struct each, used wherever a limit is read,
//! written, shown or converted. Adding a limit is a field here, its proto fields and CLI
//! flag, and its enforcement; admin inputs, patches, `--clear` names and stored records
//! follow from the struct.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::access::IpAllowlist;
use super::error::GatewayError;
use super::money::Money;
use super::period::Period;
use super::rate_limit::LimitSpec;

/// Everything a key may be limited by; `None` is unlimited.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyLimits {
    /// Requests per minute.
    #[serde(default)]
    pub rpm_limit: Option<u32>,
    /// Tokens per minute (reserved at admission, corrected at settlement).
    #[serde(default)]
    pub tpm_limit: Option<u64>,
    /// Calls in flight at once.
    #[serde(default)]
    pub max_concurrent: Option<u32>,
    /// Requests in the key's lifetime.
    #[serde(default)]
    pub request_quota: Option<u64>,
    /// Tokens (prompt + completion) in the key's lifetime.
    #[serde(default)]
    pub token_quota: Option<u64>,
    /// Images in the key's lifetime.
    #[serde(default)]
    pub image_quota: Option<u64>,
    /// Images one request may carry.
    #[serde(default)]
    pub max_images_per_request: Option<u32>,
    /// Addresses the key may be used from (CIDRs); `None` is anywhere.
    #[serde(default)]
    pub allowed_ips: Option<IpAllowlist>,
    /// Spend in the configured currency (decimal text, e.g. "25.00").
    #[serde(default)]
    pub budget: Option<Money>,
    /// When the quotas and the budget start again; `None`: never (lifetime).
    #[serde(default)]
    pub period: Option<Period>,
    /// `false`: the response cache never answers this key's calls nor keeps their answers
    /// (for keys whose callers need a fresh generation every time); `None` allows it.
    #[serde(default)]
    pub cache: Option<bool>,
}

/// What a user's keys together may use; `None` is unlimited.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserLimits {
    /// Requests per minute, all of the user's keys together.
    #[serde(default)]
    pub rpm_limit: Option<u32>,
    /// Tokens per minute, all of the user's keys together.
    #[serde(default)]
    pub tpm_limit: Option<u64>,
    /// Calls in flight at once, all of the user's keys together.
    #[serde(default)]
    pub max_concurrent: Option<u32>,
    /// Addresses all of the user's keys may be used from (CIDRs); `None` is anywhere.
    #[serde(default)]
    pub allowed_ips: Option<IpAllowlist>,
    /// Spend of all of the user's keys together, in the configured currency.
    #[serde(default)]
    pub budget: Option<Money>,
    /// When the budget starts again; `None`: never (lifetime).
    #[serde(default)]
    pub period: Option<Period>,
}

/// A set of limits as the admin functions handle it.
pub trait Limits: Clone + Default + Serialize + DeserializeOwned {
    /// Refuses values that cannot be meant (a rate limit of zero would refuse everything).
    fn validate(&self) -> Result<(), GatewayError>;

    /// The field names, as admin requests, `--clear` and the proto spell them.
    fn field_names() -> Vec<String> {
        match serde_json::to_value(Self::default()) {
            Ok(Value::Object(fields)) => fields.into_iter().map(|(name, _)| name).collect(),
            _ => Vec::new(),
        }
    }
}

impl KeyLimits {
    /// The per-minute and concurrency part, which has a user's limits' shape.
    fn per_minute(&self) -> UserLimits {
        UserLimits {
            rpm_limit: self.rpm_limit,
            tpm_limit: self.tpm_limit,
            max_concurrent: self.max_concurrent,
            ..UserLimits::default()
        }
    }

    /// The per-minute and concurrency part, as the rate limiter takes it.
    pub fn rate(&self) -> LimitSpec {
        self.per_minute().rate()
    }
}

impl Limits for KeyLimits {
    fn validate(&self) -> Result<(), GatewayError> {
        self.per_minute().validate()?;
        check_allowlist(self.allowed_ips.as_ref())
    }
}

impl UserLimits {
    pub fn rate(&self) -> LimitSpec {
        LimitSpec {
            rpm: self.rpm_limit,
            tpm: self.tpm_limit,
            concurrent: self.max_concurrent,
        }
    }
}

impl Limits for UserLimits {
    fn validate(&self) -> Result<(), GatewayError> {
        check_positive(self.rpm_limit, "rpm_limit")?;
        check_positive(self.tpm_limit, "tpm_limit")?;
        check_positive(self.max_concurrent, "max_concurrent")?;
        check_allowlist(self.allowed_ips.as_ref())
    }
}

/// An empty allowlist would refuse every address; `null` is how to say "anywhere".
fn check_allowlist(list: Option<&IpAllowlist>) -> Result<(), GatewayError> {
    match list {
        Some(list) if list.is_empty() => Err(GatewayError::invalid_request(
            "`allowed_ips` must list at least one address or CIDR (or be null for anywhere)",
            Some("allowed_ips"),
        )),
        _ => Ok(()),
    }
}

/// A limit of zero would refuse everything; `null` is how to say "no limit".
fn check_positive<T: PartialEq + Default>(
    limit: Option<T>,
    field: &str,
) -> Result<(), GatewayError> {
    match limit {
        Some(value) if value == T::default() => Err(GatewayError::invalid_request(
            format!("`{field}` must be at least 1 (or null for no limit)"),
            Some(field),
        )),
        _ => Ok(()),
    }
}

/// Limits as an admin request gives them: each member sets a limit, or removes it when
/// `null`; absent limits stay as they are. Taken flattened from a request's JSON, so the
/// members are checked here (names, types) and a mistake names its field.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(transparent)]
pub struct LimitChanges(Map<String, Value>);

impl LimitChanges {
    /// The limits `set` gives (its `None`s leave a limit as it is), and those named in
    /// `clear` removed; a limit both set and cleared is refused.
    pub fn from_parts<L: Limits>(set: &L, clear: &[String]) -> Result<Self, GatewayError> {
        let known = L::field_names();
        let mut changes = Map::new();
        if let Ok(Value::Object(fields)) = serde_json::to_value(set) {
            changes.extend(fields.into_iter().filter(|(_, v)| !v.is_null()));
        }
        for name in clear {
            if !known.contains(name) {
                return Err(GatewayError::invalid_request(
                    format!("cannot clear `{name}`; clearable: {}", known.join(", ")),
                    Some("clear"),
                ));
            }
            if changes.insert(name.clone(), Value::Null).is_some() {
                return Err(GatewayError::invalid_request(
                    format!("`{name}` is both set and cleared"),
                    Some("clear"),
                ));
            }
        }
        Ok(LimitChanges(changes))
    }

    /// Whether `name` is changed (set or cleared).
    pub fn touches(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }

    /// `current` with the changes made, checked.
    pub fn apply<L: Limits>(&self, current: L) -> Result<L, GatewayError> {
        let known = L::field_names();
        let mut merged = match serde_json::to_value(current) {
            Ok(Value::Object(fields)) => fields,
            _ => Map::new(),
        };
        for (name, value) in &self.0 {
            if !known.contains(name) {
                return Err(GatewayError::invalid_request(
                    format!(
                        "unknown field `{name}`; the limits are {}",
                        known.join(", ")
                    ),
                    Some(name),
                ));
            }
            // Read alone first, so that a value of the wrong type names its field.
            let alone = Map::from_iter([(name.clone(), value.clone())]);
            if let Err(e) = serde_json::from_value::<L>(Value::Object(alone)) {
                return Err(GatewayError::invalid_request(
                    format!("`{name}`: {e}"),
                    Some(name),
                ));
            }
            merged.insert(name.clone(), value.clone());
        }
        let limits: L = serde_json::from_value(Value::Object(merged))
            .map_err(|e| GatewayError::invalid_request(e.to_string(), None))?;
        limits.validate()?;
        Ok(limits)
    }
}

impl<L: Limits> From<L> for LimitChanges {
    fn from(limits: L) -> Self {
        // Nothing to clear: cannot fail.
        LimitChanges::from_parts(&limits, &[]).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn changes(json: &str) -> LimitChanges {
        serde_json::from_str(json).unwrap()
    }

    fn param(e: GatewayError) -> Option<String> {
        match e {
            GatewayError::InvalidRequest { param, .. } => param,
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn changes_set_clear_and_keep_limits() {
        let current = KeyLimits {
            rpm_limit: Some(60),
            token_quota: Some(1000),
            image_quota: Some(5),
            ..KeyLimits::default()
        };
        let next = changes(r#"{"rpm_limit": 10, "token_quota": null}"#)
            .apply(current)
            .unwrap();
        assert_eq!(
            next,
            KeyLimits {
                rpm_limit: Some(10),
                token_quota: None,
                image_quota: Some(5),
                ..KeyLimits::default()
            }
        );
    }

    #[test]
    fn a_mistake_names_its_field() {
        let e = changes(r#"{"rpm_limit": "many"}"#)
            .apply(KeyLimits::default())
            .unwrap_err();
        assert_eq!(param(e), Some("rpm_limit".into()));
        let e = changes(r#"{"rpm_limt": 5}"#)
            .apply(KeyLimits::default())
            .unwrap_err();
        assert_eq!(param(e), Some("rpm_limt".into()));
        let e = changes(r#"{"max_concurrent": 0}"#)
            .apply(KeyLimits::default())
            .unwrap_err();
        assert_eq!(param(e), Some("max_concurrent".into()));
        // A key's limit is no user's limit.
        let e = changes(r#"{"token_quota": 5}"#)
            .apply(UserLimits::default())
            .unwrap_err();
        assert_eq!(param(e), Some("token_quota".into()));
    }

    #[test]
    fn set_and_cleared_parts_become_changes() {
        let set = KeyLimits {
            tpm_limit: Some(500),
            ..KeyLimits::default()
        };
        let parts = LimitChanges::from_parts(&set, &["image_quota".into()]).unwrap();
        assert_eq!(parts, changes(r#"{"tpm_limit": 500, "image_quota": null}"#));
        assert!(LimitChanges::from_parts(&set, &["tpm_limit".into()]).is_err());
        assert!(LimitChanges::from_parts(&set, &["colour".into()]).is_err());
    }

    #[test]
    fn every_field_is_named() {
        // Names come out in the order of serde_json's map (alphabetical).
        assert_eq!(
            KeyLimits::field_names(),
            [
                "allowed_ips",
                "budget",
                "cache",
                "image_quota",
                "max_concurrent",
                "max_images_per_request",
                "period",
                "request_quota",
                "rpm_limit",
                "token_quota",
                "tpm_limit",
            ]
        );
        assert_eq!(
            UserLimits::field_names(),
            [
                "allowed_ips",
                "budget",
                "max_concurrent",
                "period",
                "rpm_limit",
                "tpm_limit"
            ]
        );
    }
}
