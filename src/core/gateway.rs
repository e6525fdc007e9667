//! The gate shared by both doors: what it holds and how it is set up. Its work is split by
//! responsibility: the key index and authentication (`key_index`), admission and
//! reservation (`admission`), settlement (`settlement`), admin changes (`admin`).

use std::sync::Arc;

use dashmap::DashMap;

use super::error::GatewayError;
use super::events::GateEvents;
use super::key_index::{Caller, KeyState, UserState};
use super::keys::SecretHash;
use super::store::Store;
use super::usage_sink::{StoreFigures, StoreHealth, UsageSink};

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
    pub(super) sink: UsageSink,
    pub(super) events: Arc<dyn GateEvents>,
    /// Keys in use, by the hashes of their secrets: the current one, and the previous one
    /// while a rotation's grace period may still run.
    pub(super) keys_by_hash: DashMap<SecretHash, Arc<KeyState>>,
    /// The same keys by id: each key's one live state (counters in flight, limiter).
    pub(super) keys_by_id: DashMap<String, Arc<KeyState>>,
    pub(super) users: DashMap<String, Arc<UserState>>,
    pub(super) admin_token_hash: SecretHash,
    pub(super) settings: GateSettings,
}

impl Gateway {
    /// Loads the users from the store; keys are loaded when first used.
    pub fn load(
        store: Arc<dyn Store>,
        sink: UsageSink,
        events: Arc<dyn GateEvents>,
        admin_token_hash: SecretHash,
        settings: GateSettings,
    ) -> Result<Self, GatewayError> {
        let gateway = Gateway {
            events,
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

    /// Tells the watchers of a refusal by the gate, and passes it on.
    pub fn refused(&self, e: GatewayError) -> GatewayError {
        if let Some(reason) = e.refusal_reason() {
            self.events.refused(reason);
        }
        e
    }

    pub fn logs_bodies(&self) -> bool {
        self.settings.log_bodies
    }

    /// Whether the store takes writes, and what it holds back when it does not.
    pub fn store_health(&self) -> &StoreHealth {
        self.sink.health()
    }

    pub fn store_figures(&self) -> StoreFigures {
        self.sink.figures()
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
}
