//! Callers known by an identity provider instead of a key: a verified token's subject
//! names a gateway user (`UserRecord::subject`), and the user's calls are booked on one
//! key of its own, its *identity key*, made on first use. That key carries the quotas (a
//! user has per-minute limits only), shows in every report and the call log, and can be
//! limited, deactivated or revoked like any key; it has no secret anyone knows.
//!
//! The token itself is checked at the call path (signature, `exp`, `nbf`, `iss`, `aud`);
//! what a subject may then do is decided here, once, for both doors.

use std::net::IpAddr;

use super::error::GatewayError;
use super::gateway::Gateway;
use super::key_index::{Caller, Narrowing};
use super::keys;
use super::limits::KeyLimits;
use super::records::{KeyCounters, KeyRecord, UserRecord};
use super::time::now_unix;

/// What becomes of subjects, from configuration.
#[derive(Clone, Debug, Default)]
pub struct SubjectPolicy {
    /// A subject no user stands for gets a user of its own (with no limits) instead of
    /// being refused.
    pub create_unknown: bool,
    /// The limits (quotas included) of an identity key when it is made.
    pub key_limits: KeyLimits,
}

/// The longest subject taken (IdP subjects are ids, a few dozen characters).
const MAX_SUBJECT_LEN: usize = 255;

impl Gateway {
    /// The caller a verified `subject` stands for, calling from `client`.
    pub fn authenticate_subject(
        &self,
        subject: &str,
        policy: &SubjectPolicy,
        client: Option<IpAddr>,
    ) -> Result<Caller, GatewayError> {
        self.subject_caller(subject, policy, client)
            .map_err(|e| self.refused(e))
    }

    fn subject_caller(
        &self,
        subject: &str,
        policy: &SubjectPolicy,
        client: Option<IpAddr>,
    ) -> Result<Caller, GatewayError> {
        let user_id = match self.keys.subjects.get(subject).map(|id| id.value().clone()) {
            Some(id) => id,
            None if policy.create_unknown => self.create_subject_user(subject)?,
            None => {
                return Err(GatewayError::InvalidApiKey(
                    "The token's subject is not a user of this gateway.",
                ));
            }
        };
        let key_id = identity_key_id(&user_id);
        let state = match self.keys.key_state(&key_id) {
            Ok(state) => state,
            Err(GatewayError::NotFound { .. }) => {
                self.create_identity_key(&user_id, &key_id, policy)?
            }
            Err(e) => return Err(e),
        };
        self.keys.caller_of(state, client)
    }

    fn create_subject_user(&self, subject: &str) -> Result<String, GatewayError> {
        let subject = check_subject(subject)?;
        let now = now_unix();
        let user = UserRecord {
            id: keys::generate_id("usr"),
            name: subject.chars().take(200).collect(),
            email: None,
            active: true,
            subject: Some(subject.to_owned()),
            limits: Default::default(),
            created_at: now,
            updated_at: now,
        };
        // Two first calls of one subject at once: the first to claim it wins, the other
        // uses its user.
        match self.keys.subjects.entry(subject.to_owned()) {
            dashmap::Entry::Occupied(taken) => return Ok(taken.get().clone()),
            dashmap::Entry::Vacant(slot) => {
                self.store.put_user(&user)?;
                self.keys.users.insert(
                    user.id.clone(),
                    std::sync::Arc::new(super::key_index::UserState::new(user.clone())),
                );
                slot.insert(user.id.clone());
            }
        }
        tracing::info!(user_id = %user.id, "made a user for a new token subject");
        Ok(user.id)
    }

    fn create_identity_key(
        &self,
        user_id: &str,
        key_id: &str,
        policy: &SubjectPolicy,
    ) -> Result<std::sync::Arc<super::key_index::KeyState>, GatewayError> {
        let now = now_unix();
        // A secret nobody is told: the key is reached through its subject only.
        let secret = keys::generate_secret();
        let record = KeyRecord {
            prefix: "(token)".into(),
            ..KeyRecord::fresh(
                key_id.to_owned(),
                user_id.to_owned(),
                "identity provider".into(),
                &secret,
                policy.key_limits.clone(),
                now,
            )
        };
        self.store.put_key(&record)?;
        self.keys.index_key(record, KeyCounters::default())
    }

    /// `subject` for user `user_id`, checked: sane, and no other user's.
    pub(super) fn claim_subject(
        &self,
        subject: Option<&str>,
        user_id: &str,
    ) -> Result<Option<String>, GatewayError> {
        let Some(subject) = subject.map(str::trim).filter(|s| !s.is_empty()) else {
            return Ok(None);
        };
        let subject = check_subject(subject)?;
        if let Some(owner) = self.keys.subjects.get(subject)
            && owner.value() != user_id
        {
            return Err(GatewayError::invalid_request(
                format!("`subject` is already user `{}`'s", owner.value()),
                Some("subject"),
            ));
        }
        Ok(Some(subject.to_owned()))
    }

    /// Keeps the subject index in step with `user`, whose subject was `before`.
    pub(super) fn index_subject(&self, before: Option<&str>, user: &UserRecord) {
        if let Some(before) = before
            && user.subject.as_deref() != Some(before)
        {
            self.keys.subjects.remove(before);
        }
        if let Some(subject) = &user.subject {
            self.keys.subjects.insert(subject.clone(), user.id.clone());
        }
    }
}

impl Gateway {
    /// The caller a short-lived token of key `key_id` opens: the key as it is now (active,
    /// its user active, the address allowed), if its secret is still the one the token was
    /// made under (`secret_mark`: the start of the secret's hash), narrowed as the token says.
    pub fn authenticate_key_token(
        &self,
        key_id: &str,
        secret_mark: &str,
        narrowing: &Narrowing,
        client: Option<IpAddr>,
    ) -> Result<Caller, GatewayError> {
        let caller = match self.keys.key_state(key_id) {
            Ok(state)
                if secret_mark.len() >= 16 && state.record().hash.starts_with(secret_mark) =>
            {
                self.keys.caller_of(state, client)
            }
            Ok(_) => Err(GatewayError::InvalidToken(
                "the key this token was made from has been rotated".into(),
            )),
            Err(GatewayError::NotFound { .. }) => Err(GatewayError::InvalidToken(
                "the key this token was made from does not exist".into(),
            )),
            Err(e) => Err(e),
        }
        .map_err(|e| self.refused(e))?;
        Ok(caller.narrowed(narrowing))
    }
}

/// The identity key of a user: one per user, found by its id.
pub fn identity_key_id(user_id: &str) -> String {
    format!(
        "key_idp_{}",
        user_id.strip_prefix("usr_").unwrap_or(user_id)
    )
}

fn check_subject(subject: &str) -> Result<&str, GatewayError> {
    if subject.len() > MAX_SUBJECT_LEN || subject.chars().any(char::is_control) {
        return Err(GatewayError::invalid_request(
            format!("`subject` must be 1 to {MAX_SUBJECT_LEN} printable characters"),
            Some("subject"),
        ));
    }
    Ok(subject)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::GateSettings;
    use crate::core::admin::{NewUser, UserPatch};
    use crate::core::testing::{MemoryStore, gate};

    fn policy(create_unknown: bool) -> SubjectPolicy {
        SubjectPolicy {
            create_unknown,
            key_limits: KeyLimits {
                request_quota: Some(5),
                ..KeyLimits::default()
            },
        }
    }

    #[test]
    fn a_known_subject_calls_on_its_users_identity_key() {
        let (gateway, _queue, _) = gate(MemoryStore::default(), GateSettings::default());
        let user = gateway
            .create_user(NewUser {
                name: "billing service".into(),
                subject: Some("svc-billing".into()),
                ..NewUser::default()
            })
            .unwrap();
        let caller = gateway
            .authenticate_subject("svc-billing", &policy(false), None)
            .unwrap();
        assert_eq!(caller.user_record.id, user.id);
        assert_eq!(caller.record.id, identity_key_id(&user.id));
        assert_eq!(caller.record.limits.request_quota, Some(5));
        // The same key the next time, not a new one.
        let again = gateway
            .authenticate_subject("svc-billing", &policy(false), None)
            .unwrap();
        assert!(std::sync::Arc::ptr_eq(&caller.key, &again.key));
    }

    #[test]
    fn unknown_subjects_are_refused_or_made_users_as_configured() {
        let (gateway, _queue, _) = gate(MemoryStore::default(), GateSettings::default());
        let refused = gateway
            .authenticate_subject("stranger", &policy(false), None)
            .unwrap_err();
        assert!(matches!(refused, GatewayError::InvalidApiKey(_)));
        let caller = gateway
            .authenticate_subject("newcomer", &policy(true), None)
            .unwrap();
        assert_eq!(caller.user_record.subject.as_deref(), Some("newcomer"));
        assert!(
            gateway
                .list_users()
                .iter()
                .any(|u| u.id == caller.user_record.id)
        );
    }

    #[test]
    fn a_deactivated_user_or_revoked_identity_key_ends_its_tokens() {
        let (gateway, _queue, _) = gate(MemoryStore::default(), GateSettings::default());
        let caller = gateway
            .authenticate_subject("svc", &policy(true), None)
            .unwrap();
        gateway.revoke_key(&caller.record.id).unwrap();
        assert!(
            gateway
                .authenticate_subject("svc", &policy(true), None)
                .is_err()
        );
        let other = gateway
            .authenticate_subject("svc-2", &policy(true), None)
            .unwrap();
        gateway.deactivate_user(&other.user_record.id).unwrap();
        assert!(
            gateway
                .authenticate_subject("svc-2", &policy(true), None)
                .is_err()
        );
    }

    #[test]
    fn a_subject_belongs_to_one_user_and_moves_with_updates() {
        let (gateway, _queue, _) = gate(MemoryStore::default(), GateSettings::default());
        let a = gateway
            .create_user(NewUser {
                name: "a".into(),
                subject: Some("svc".into()),
                ..NewUser::default()
            })
            .unwrap();
        let taken = gateway
            .create_user(NewUser {
                name: "b".into(),
                subject: Some("svc".into()),
                ..NewUser::default()
            })
            .unwrap_err();
        assert!(matches!(taken, GatewayError::InvalidRequest { .. }));
        gateway
            .update_user(
                &a.id,
                UserPatch {
                    subject: Some(Some("svc-renamed".into())),
                    ..UserPatch::default()
                },
            )
            .unwrap();
        assert!(
            gateway
                .authenticate_subject("svc", &policy(false), None)
                .is_err()
        );
        let caller = gateway
            .authenticate_subject("svc-renamed", &policy(false), None)
            .unwrap();
        assert_eq!(caller.user_record.id, a.id);
    }
}
