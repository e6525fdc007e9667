//! The gate shared by both doors: what it holds and how it is set up. Its work is split by
//! responsibility: the key index and authentication (`key_index`), admission and
//! reservation (`admission`), settlement (`settlement`), admin changes (`admin`).

use std::net::IpAddr;
use std::sync::{Arc, OnceLock};

use super::access::IpAllowlist;
use super::catalogue::Catalogue;
use super::error::GatewayError;
use super::events::GateEvents;
use super::journal::ReservationJournal;
use super::key_index::{Caller, KeyIndex};
use super::keys::SecretHash;
use super::notifier::Notifier;
use super::period::Calendar;
use super::pricing::{ImageTiers, PriceBook};
use super::shared_limits::{Change, SharedLimits, SharedLimitsHealth};
use super::store::Store;
use super::time::Clock;
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
    /// Where the admin API may be used from; `None` is anywhere.
    pub admin_allowed_ips: Option<IpAllowlist>,
    /// Shares (percent) of a key's quota whose crossing is reported to the watchers
    /// ([`GateEvents::quota_crossed`]); empty reports none.
    pub quota_alert_percents: Vec<u8>,
    /// Where an online backup is written before it is sent; `None`: the system's
    /// temporary directory.
    pub snapshot_dir: Option<std::path::PathBuf>,
    /// The currency of every price, budget and cost (a label: the books count nano-units).
    pub currency: String,
    /// Image resolution tiers, as prices name them.
    pub image_tiers: ImageTiers,
    /// The calendar periods and reports follow.
    pub calendar: Calendar,
    /// The clock of periods, prices and the call log (tests move it).
    pub clock: Clock,
}

impl Default for GateSettings {
    fn default() -> Self {
        GateSettings {
            log_bodies: false,
            default_max_tokens: 4096,
            max_images_per_request: None,
            admin_allowed_ips: None,
            quota_alert_percents: Vec::new(),
            snapshot_dir: None,
            currency: "USD".into(),
            image_tiers: ImageTiers::default(),
            calendar: Calendar::default(),
            clock: Clock::default(),
        }
    }
}

/// The gate shared by both doors. Every check lives here once.
pub struct Gateway {
    pub(super) store: Arc<dyn Store>,
    pub(super) sink: UsageSink,
    pub(super) events: Arc<dyn GateEvents>,
    pub(super) keys: KeyIndex,
    pub(super) settings: GateSettings,
    /// Durable mode: where each call's reservation is written before it is forwarded.
    pub(super) journal: Option<Arc<dyn ReservationJournal>>,
    pub(super) quota_alert_percents: Arc<[u8]>,
    /// The alerts, once the wiring has started them.
    pub(super) notifier: OnceLock<Arc<dyn Notifier>>,
    /// Several replicas: the counters they share, asked after the gate's own.
    pub(super) shared: Option<Arc<dyn SharedLimits>>,
    /// Every price, as the store keeps them.
    pub(super) prices: PriceBook,
    pub(super) image_tiers: Arc<ImageTiers>,
    /// The models clients may name, and their versions.
    pub(super) catalogue: Catalogue,
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
        let prices = PriceBook::default();
        prices.load(store.load_prices()?);
        Ok(Gateway {
            prices,
            image_tiers: Arc::new(settings.image_tiers.clone()),
            events,
            keys: KeyIndex::load(store.clone(), admin_token_hash)?,
            catalogue: Catalogue::new(store.load_models()?),
            store,
            sink,
            quota_alert_percents: settings.quota_alert_percents.clone().into(),
            settings,
            journal: None,
            notifier: OnceLock::new(),
            shared: None,
        })
    }

    /// Durable mode: every call's reservation goes to `journal` and is durable before the
    /// call is forwarded ([`crate::core::Admission::make_durable`]).
    pub fn with_journal(mut self, journal: Arc<dyn ReservationJournal>) -> Self {
        self.journal = Some(journal);
        self
    }

    pub fn with_shared_limits(mut self, shared: Arc<dyn SharedLimits>) -> Self {
        self.shared = Some(shared);
        self
    }

    /// Another replica changed a record: the copy held here is read again from the store
    /// (a key or user not held here is loaded on its next use anyway).
    pub fn refresh(&self, change: &Change) -> Result<(), GatewayError> {
        match change {
            Change::Key(id) => {
                let Some(state) = self.keys.keys_by_id.get(id).map(|s| s.value().clone()) else {
                    return Ok(());
                };
                // A change made here while the store was read is newer than the read.
                let seen = state.record();
                if let Some((record, _)) = self.store.load_key(id)? {
                    state.refresh_from(&seen, record);
                }
            }
            Change::Model(_) => self.refresh_catalogue()?,
            Change::User(id) => {
                let Some(state) = self.keys.users.get(id).map(|s| s.value().clone()) else {
                    return Ok(());
                };
                let seen = state.record();
                if let Some(user) = self.store.load_users()?.into_iter().find(|u| &u.id == id) {
                    let before = seen.subject.clone();
                    let subject_index = user.clone();
                    if state.refresh_from(&seen, user) {
                        self.index_subject(before.as_deref(), &subject_index);
                    }
                }
            }
            Change::Prices => self.prices.load(self.store.load_prices()?),
        }
        Ok(())
    }

    /// Tells the other replicas (if any) that a record changed.
    pub(super) fn announce(&self, change: Change) {
        if let Some(shared) = &self.shared {
            shared.announce(change);
        }
    }

    /// Checks `Authorization: Bearer <secret>` (the value after `Bearer `) from `client`,
    /// the caller's address as the edge found it.
    pub fn authenticate(
        &self,
        secret: Option<&str>,
        client: Option<IpAddr>,
    ) -> Result<Caller, GatewayError> {
        self.keys
            .authenticate(secret, client)
            .map_err(|e| self.auth_refused(e, client))
    }

    /// The caller key `id` makes now, for a holder who proved the key's secret earlier (a
    /// console session): refused as the secret would be (revoked, expired, a deactivated
    /// user, an address outside the allowlists).
    pub fn caller_by_key_id(
        &self,
        id: &str,
        client: Option<IpAddr>,
    ) -> Result<Caller, GatewayError> {
        let state = self.keys.key_state(id)?;
        self.keys.caller_of(state, client)
    }

    /// Checks the admin API's allowlist and the admin token (in constant time).
    pub fn authenticate_admin(
        &self,
        token: Option<&str>,
        client: Option<IpAddr>,
    ) -> Result<(), GatewayError> {
        self.keys
            .authenticate_admin(token, client, self.settings.admin_allowed_ips.as_ref())
            .map_err(|e| self.auth_refused(e, client))
    }

    /// A refusal of credentials from `client`, told to the watchers (a burst of them from
    /// one address is someone trying keys), and passed on.
    pub fn auth_refused(&self, e: GatewayError, client: Option<IpAddr>) -> GatewayError {
        // A store failure while looking a key up is not someone trying keys.
        if matches!(
            e,
            GatewayError::InvalidApiKey(_)
                | GatewayError::InvalidToken(_)
                | GatewayError::InvalidAdminToken
        ) {
            self.events.auth_failed(client);
        }
        self.refused(e)
    }

    /// Starts telling `notifier` what alerting needs to know; set once, by the wiring.
    pub fn set_notifier(&self, notifier: Arc<dyn Notifier>) {
        let _ = self.notifier.set(notifier);
    }

    pub fn notifier(&self) -> Option<&Arc<dyn Notifier>> {
        self.notifier.get()
    }

    /// The store behind the gate (the alerts read keys' expiry through it).
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
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
        StoreFigures {
            shared_limits_available: self.shared_limits_health().map(|h| h.is_available()),
            ..self.sink.figures()
        }
    }

    /// Several replicas: whether the shared limits answer; `None` without them.
    pub fn shared_limits_health(&self) -> Option<&SharedLimitsHealth> {
        self.shared.as_deref().map(|shared| shared.health())
    }
}
