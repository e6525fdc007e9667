//! The shared-limits port: with several replicas, per-minute limits, calls in flight and
//! quota reservations are counted in one place every replica asks (`store/` implements it
//! with Redis), and admin changes are announced so each replica drops what it cached.
//! The gate's own counters still apply first; this port is the check that holds across
//! replicas.

use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use super::rate_limit::{LimitSpec, Refusal};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One call's claim on the shared counters.
#[derive(Clone, Debug)]
pub struct SharedAsk {
    /// Unique per call (not the client's request id, which need not be).
    pub call_id: String,
    pub key_id: String,
    pub user_id: String,
    pub key_limits: LimitSpec,
    pub user_limits: LimitSpec,
    pub request_quota: Option<u64>,
    pub token_quota: Option<u64>,
    pub image_quota: Option<u64>,
    /// Tokens reserved (prompt estimate plus output cap).
    pub tokens: u64,
    pub images: u64,
    /// The key's budget and the call's worst cost, in nano-units.
    pub budget: Option<u64>,
    pub cost: u64,
    /// A key with a period: the current period's bounds (its counters are the period's).
    pub period: Option<(i64, i64)>,
}

/// A call the shared counters admitted: its ask, and the generation of the key's quota
/// counters it was counted in (a settlement only corrects the generation it was taken
/// from: counters rebuilt since, after a Redis restart, never had its reservation).
#[derive(Clone, Debug)]
pub struct SharedClaim {
    pub ask: SharedAsk,
    pub generation: String,
}

/// Why the shared counters refused a call.
#[derive(Clone, Debug)]
pub enum SharedRefusal {
    /// A quota would be exceeded (`what`: requests, tokens, images or budget).
    Quota { what: &'static str, limit: u64 },
    /// A per-minute or concurrency limit, as the gate's own limiter reports one.
    Rate(Refusal),
    /// The shared counters could not be asked (unreachable, too slow).
    Unavailable(String),
}

/// What a call that the shared counters admitted gives back or is charged when it ends.
#[derive(Clone, Debug)]
pub struct SharedSettlement {
    pub claim: SharedClaim,
    pub charged_request: bool,
    pub charged_tokens: u64,
    pub charged_images: u64,
    pub charged_cost: u64,
    /// Refused after all (by a later step of admission): its per-minute request is given
    /// back too.
    pub withdrawn: bool,
}

/// An admin change other replicas must see: they reload the record from the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Key(String),
    User(String),
    /// A price was added: every replica reads the prices again.
    Prices,
    /// A model of the catalogue, by name (changed or deleted).
    Model(String),
}

/// Whether the shared counters answer, as the last admission or health probe found:
/// set by the implementation, read by `/health`, gRPC health and `/metrics`.
#[derive(Debug, Default)]
pub struct SharedLimitsHealth {
    failing: AtomicBool,
    last_error: Mutex<Option<String>>,
}

impl SharedLimitsHealth {
    /// False while the shared counters cannot be asked; one atomic load.
    pub fn is_available(&self) -> bool {
        !self.failing.load(Ordering::Relaxed)
    }

    /// The error that made them unavailable, while they are.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// They could not be asked: keys with a quota are refused until [`Self::recover`].
    pub fn fail(&self, error: &str) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(error.to_owned());
        if !self.failing.swap(true, Ordering::Relaxed) {
            tracing::error!(
                error,
                "the shared limits cannot be asked: keys with a quota are refused \
                 (503 store_unavailable) until they answer again"
            );
        }
    }

    /// They answered.
    pub fn recover(&self) {
        if self.failing.swap(false, Ordering::Relaxed) {
            *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
            tracing::warn!("the shared limits answer again: keys with a quota are served");
        }
    }
}

/// Counters every replica shares. `admit` is one atomic round trip; `settle` one more,
/// sent without waiting (a settlement that cannot be delivered leaves the reservation
/// counted, which refuses more, never less).
pub trait SharedLimits: Send + Sync + std::fmt::Debug + 'static {
    fn admit(&self, ask: SharedAsk) -> BoxFuture<'_, Result<SharedClaim, SharedRefusal>>;
    fn settle(&self, settlement: SharedSettlement);
    /// Tells every replica (this one included) that a record changed.
    fn announce(&self, change: Change);
    /// Whether they answer (the last admission's or probe's finding).
    fn health(&self) -> &SharedLimitsHealth;
}
