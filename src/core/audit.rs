//! The audit log: every admin change (users, keys, prices, models), who made it through which door, and
//! the record before and after. Doors make changes through [`Acting`], which performs
//! core's admin operation and then writes its audit record, so no door can forget one.

use serde::Serialize;
use serde_json::Value;

use super::admin::{CreatedKey, KeyPatch, KeyView, NewKey, NewUser, UserPatch};
use super::billing::NewPrice;
use super::catalogue::ModelRecord;
use super::error::GatewayError;
use super::gateway::Gateway;
use super::keys;
use super::model_admin::ModelPatch;
use super::pricing::PriceRecord;
use super::records::UserRecord;
pub use super::records::{Actor, AuditRecord};
use super::time::now_micros;

/// One page of the audit log, newest first.
#[derive(Clone, Debug, Default, Serialize)]
pub struct AuditPage {
    pub entries: Vec<AuditRecord>,
    /// The last id of this page; empty on the last page.
    pub next_page_token: String,
}

/// The admin operations as one actor makes them: each writes its audit record.
pub struct Acting<'a> {
    gateway: &'a Gateway,
    actor: Actor,
}

impl Gateway {
    /// Admin changes made by `actor`, recorded in the audit log.
    pub fn acting(&self, actor: Actor) -> Acting<'_> {
        Acting {
            gateway: self,
            actor,
        }
    }

    /// The audit log newest first, `page_size` (default 50, at most 1000) entries older
    /// than `page_token`.
    pub fn audit_log(
        &self,
        page_token: Option<&str>,
        page_size: Option<usize>,
    ) -> Result<AuditPage, GatewayError> {
        let size = page_size.unwrap_or(50).clamp(1, 1000);
        let before = page_token.filter(|t| !t.is_empty());
        let mut entries = self.store.audit(before, size + 1)?;
        let next_page_token = if entries.len() > size {
            entries.truncate(size);
            entries.last().map(|e| e.id.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(AuditPage {
            entries,
            next_page_token,
        })
    }
}

fn json<T: Serialize>(value: &T) -> Option<Value> {
    serde_json::to_value(value).ok()
}

impl Acting<'_> {
    /// Writes the record of a change already made. A failure to write it does not undo
    /// the change (a created key's secret would be lost): it is logged loudly instead.
    fn record(&self, action: &str, target: &str, before: Option<Value>, after: Option<Value>) {
        let record = AuditRecord {
            id: keys::generate_id("aud"),
            at_micros: now_micros(),
            actor: self.actor.clone(),
            action: action.to_owned(),
            target: target.to_owned(),
            before,
            after,
        };
        if let Err(e) = self.gateway.store.put_audit(&record) {
            tracing::error!(error = %e, action, target, "cannot write the audit record of an admin change");
        }
    }

    pub fn create_user(&self, new: NewUser) -> Result<UserRecord, GatewayError> {
        let user = self.gateway.create_user(new)?;
        self.record("user.create", &user.id, None, json(&user));
        Ok(user)
    }

    pub fn update_user(&self, id: &str, patch: UserPatch) -> Result<UserRecord, GatewayError> {
        let before = self.gateway.get_user(id).ok();
        let user = self.gateway.update_user(id, patch)?;
        self.record("user.update", &user.id, json(&before), json(&user));
        Ok(user)
    }

    pub fn deactivate_user(&self, id: &str) -> Result<UserRecord, GatewayError> {
        let before = self.gateway.get_user(id).ok();
        let user = self.gateway.deactivate_user(id)?;
        self.record("user.deactivate", &user.id, json(&before), json(&user));
        Ok(user)
    }

    pub fn create_key(&self, new: NewKey) -> Result<CreatedKey, GatewayError> {
        let created = self.gateway.create_key(new)?;
        self.record("key.create", &created.key.id, None, json(&created.key));
        Ok(created)
    }

    fn key_before(&self, id: &str) -> Option<KeyView> {
        self.gateway.get_key(id).ok()
    }

    pub fn update_key(&self, id: &str, patch: KeyPatch) -> Result<KeyView, GatewayError> {
        let before = self.key_before(id);
        let key = self.gateway.update_key(id, patch)?;
        self.record("key.update", &key.id, json(&before), json(&key));
        Ok(key)
    }

    pub fn revoke_key(&self, id: &str) -> Result<KeyView, GatewayError> {
        let before = self.key_before(id);
        let key = self.gateway.revoke_key(id)?;
        self.record("key.revoke", &key.id, json(&before), json(&key));
        Ok(key)
    }

    pub fn rotate_key(&self, id: &str, grace_secs: u64) -> Result<CreatedKey, GatewayError> {
        let before = self.key_before(id);
        let created = self.gateway.rotate_key(id, grace_secs)?;
        self.record(
            "key.rotate",
            &created.key.id,
            json(&before),
            json(&created.key),
        );
        Ok(created)
    }

    pub fn add_price(&self, new: NewPrice) -> Result<PriceRecord, GatewayError> {
        let price = self.gateway.add_price(new)?;
        let target = format!("{}@{}", price.model, price.effective_from);
        self.record("price.add", &target, None, json(&price));
        Ok(price)
    }

    pub fn create_model(&self, model: ModelRecord) -> Result<ModelRecord, GatewayError> {
        let model = self.gateway.create_model(model)?;
        self.record("model.create", &model.name, None, json(&model));
        Ok(model)
    }

    pub fn put_model(&self, model: ModelRecord) -> Result<ModelRecord, GatewayError> {
        let before = self.gateway.get_model(&model.name).ok();
        let model = self.gateway.put_model(model)?;
        self.record("model.put", &model.name, json(&before), json(&model));
        Ok(model)
    }

    pub fn update_model(&self, name: &str, patch: ModelPatch) -> Result<ModelRecord, GatewayError> {
        let before = self.gateway.get_model(name).ok();
        let model = self.gateway.update_model(name, patch)?;
        self.record("model.update", &model.name, json(&before), json(&model));
        Ok(model)
    }

    pub fn delete_model(&self, name: &str) -> Result<ModelRecord, GatewayError> {
        let model = self.gateway.delete_model(name)?;
        self.record("model.delete", &model.name, json(&model), None);
        Ok(model)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::gateway::GateSettings;
    use crate::core::testing::{MemoryStore, gate};

    #[test]
    fn every_change_is_recorded_newest_first_without_the_secret() {
        let (gateway, _queue, _events) = gate(MemoryStore::default(), GateSettings::default());
        let acting = gateway.acting(Actor::new("rest", "admin token"));
        let user = acting
            .create_user(NewUser {
                name: "Ada".into(),
                ..NewUser::default()
            })
            .unwrap();
        let key = acting
            .create_key(NewKey {
                user_id: user.id.clone(),
                ..NewKey::default()
            })
            .unwrap();
        acting.revoke_key(&key.key.id).unwrap();
        let page = gateway.audit_log(None, Some(2)).unwrap();
        let actions: Vec<&str> = page.entries.iter().map(|e| e.action.as_str()).collect();
        assert_eq!(actions, ["key.revoke", "key.create"]);
        assert_eq!(page.entries[0].before.as_ref().unwrap()["active"], true);
        assert_eq!(page.entries[0].after.as_ref().unwrap()["active"], false);
        assert_eq!(page.entries[0].actor.door, "rest");
        let rest = gateway
            .audit_log(Some(&page.next_page_token), Some(2))
            .unwrap();
        assert_eq!(rest.entries.len(), 1);
        assert_eq!(rest.entries[0].action, "user.create");
        assert!(rest.next_page_token.is_empty());
        let all = serde_json::to_string(&page.entries).unwrap();
        assert!(!all.contains(&key.secret));
    }
}
