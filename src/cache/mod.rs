//! The response cache and in-flight deduplication: answers that ask for the same thing
//! every time are kept (bounded by bytes, each for its model's time to live) and served
//! again without the model; identical calls arriving while the first is generated share
//! that one model call. Who is charged what for a hit is core's (`ChargeFactor`); this
//! module only knows answers by their keys.
//!
//! Architecture invariant: the scope (key, user or everyone) is hashed into every key, so
//! no answer is ever served across scopes.

mod key;
mod replay;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::DashMap;
use futures_util::FutureExt as _;
use futures_util::future::{BoxFuture, Shared, WeakShared};
use moka::notification::RemovalCause;

pub use key::{CacheKey, KeyedRequest, asks_same_answer, key_request};
pub use replay::{CompletionAssembler, chat_chunks};

use crate::core::records::Usage;
use crate::core::{ChargeFactor, GatewayError};

/// Who may be served an answer another call paid for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CacheScope {
    /// The same key only (the default).
    #[default]
    Key,
    /// Any key of the same user.
    User,
    /// Every caller.
    Shared,
}

/// The client's wish for one call (`x-cache` header or metadata).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CacheChoice {
    /// Cached when the request is deterministic (temperature 0 or a fixed seed).
    #[default]
    Default,
    /// Cached (and looked up) whatever the sampling.
    Use,
    /// Neither looked up nor stored, nor shared with an identical call in flight.
    Skip,
}

impl CacheChoice {
    /// Reads an `x-cache` request value: `use`, `skip` (or none).
    pub fn parse(value: Option<&str>) -> Result<CacheChoice, GatewayError> {
        match value.map(str::trim) {
            None | Some("") => Ok(CacheChoice::Default),
            Some(v) if v.eq_ignore_ascii_case("use") => Ok(CacheChoice::Use),
            Some(v) if v.eq_ignore_ascii_case("skip") => Ok(CacheChoice::Skip),
            Some(_) => Err(GatewayError::invalid_request(
                "`x-cache` must be `use` or `skip`",
                Some("x-cache"),
            )),
        }
    }
}

/// How a cacheable call was answered (`x-cache: hit|miss`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheStatus {
    Hit,
    Miss,
}

impl CacheStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Hit => "hit",
            CacheStatus::Miss => "miss",
        }
    }
}

/// The cache's configuration.
#[derive(Clone, Debug)]
pub struct CacheSettings {
    /// The most bytes of answers held (bodies plus a fixed overhead per entry).
    pub max_bytes: u64,
    /// How long an answer is kept, unless its model has a time of its own.
    pub ttl: Duration,
    pub model_ttl: HashMap<String, Duration>,
    pub scope: CacheScope,
    /// What a hit is charged of the answer's usage.
    pub hit_charge: ChargeFactor,
}

/// A whole JSON answer as the model server gave it, and the usage it reported.
#[derive(Debug)]
pub struct CachedAnswer {
    pub body: Bytes,
    pub content_type: Option<String>,
    pub usage: Option<Usage>,
    /// How long it is kept (its model's time to live).
    ttl: Duration,
}

impl CachedAnswer {
    /// Bytes an entry costs besides its body: key, counts, the map's own bookkeeping.
    const OVERHEAD: u64 = 256;

    fn weight(&self) -> u32 {
        u32::try_from(self.body.len() as u64 + Self::OVERHEAD).unwrap_or(u32::MAX)
    }
}

/// What one model call shared by identical callers ends with.
pub type FlightResult = Result<Arc<CachedAnswer>, GatewayError>;
type Flight = Shared<BoxFuture<'static, FlightResult>>;

/// The figures `/metrics` shows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    /// Answers removed to stay within the byte bound (not those that expired).
    pub evictions: u64,
    pub bytes: u64,
    pub entries: u64,
}

struct Expiry;

impl moka::Expiry<CacheKey, Arc<CachedAnswer>> for Expiry {
    fn expire_after_create(
        &self,
        _key: &CacheKey,
        value: &Arc<CachedAnswer>,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

/// The cache of one gateway process (per replica in the shared-store mode).
pub struct ResponseCache {
    settings: CacheSettings,
    entries: moka::sync::Cache<CacheKey, Arc<CachedAnswer>>,
    /// Model calls in flight by key: weak, so that when every caller has left, the call
    /// (and the generation) is dropped.
    flights: Arc<DashMap<CacheKey, WeakShared<BoxFuture<'static, FlightResult>>>>,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: Arc<AtomicU64>,
}

/// A caller's place in a model call shared by identical requests.
pub struct Joined {
    pub flight: Flight,
    /// This caller started the call (and is charged for it as for any model call).
    pub leads: bool,
}

impl ResponseCache {
    pub fn new(settings: CacheSettings) -> ResponseCache {
        let evictions = Arc::new(AtomicU64::new(0));
        let evicted = evictions.clone();
        let entries = moka::sync::Cache::builder()
            .max_capacity(settings.max_bytes)
            .weigher(|_key: &CacheKey, answer: &Arc<CachedAnswer>| answer.weight())
            .expire_after(Expiry)
            .eviction_listener(move |_key, _answer, cause| {
                if cause == RemovalCause::Size {
                    evicted.fetch_add(1, Ordering::Relaxed);
                }
            })
            .build();
        ResponseCache {
            settings,
            entries,
            flights: Arc::new(DashMap::new()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            evictions,
        }
    }

    pub fn settings(&self) -> &CacheSettings {
        &self.settings
    }

    /// The scope's part of a key: whose answers a caller may be served.
    pub fn scope_id(&self, key_id: &str, user_id: &str) -> String {
        match self.settings.scope {
            CacheScope::Key => format!("key:{key_id}"),
            CacheScope::User => format!("user:{user_id}"),
            CacheScope::Shared => "shared".to_owned(),
        }
    }

    /// The answer kept for `key`, counting a hit or a miss.
    pub fn get(&self, key: &CacheKey) -> Option<Arc<CachedAnswer>> {
        let found = self.entries.get(key);
        let counter = match found {
            Some(_) => &self.hits,
            None => &self.misses,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// A caller answered by another's model call counts as a hit (it was a miss when it
    /// looked).
    pub fn count_shared_hit(&self) {
        self.misses.fetch_sub(1, Ordering::Relaxed);
        self.hits.fetch_add(1, Ordering::Relaxed);
    }

    /// Keeps a complete answer of `model` for its time to live.
    pub fn insert(
        &self,
        key: CacheKey,
        model: &str,
        body: Bytes,
        content_type: Option<String>,
        usage: Option<Usage>,
    ) -> Arc<CachedAnswer> {
        let answer = Arc::new(CachedAnswer {
            body,
            content_type,
            usage,
            ttl: self.ttl_of(model),
        });
        self.entries.insert(key, answer.clone());
        answer
    }

    fn ttl_of(&self, model: &str) -> Duration {
        self.settings
            .model_ttl
            .get(model)
            .copied()
            .unwrap_or(self.settings.ttl)
    }

    /// Joins the model call in flight for `key`, or starts one with `call` (then this
    /// caller leads it). A successful answer is kept for `model`'s time to live before the
    /// callers see it; a failure is not kept. The call runs while at least one caller
    /// awaits it, and is dropped (with its upstream request) when the last one leaves.
    pub fn join_or_lead(
        self: &Arc<Self>,
        key: CacheKey,
        model: &str,
        call: impl FnOnce() -> BoxFuture<'static, Result<FreshAnswer, GatewayError>>,
    ) -> Joined {
        use dashmap::mapref::entry::Entry;
        match self.flights.entry(key) {
            Entry::Occupied(mut found) => {
                if let Some(flight) = found.get().upgrade() {
                    return Joined {
                        flight,
                        leads: false,
                    };
                }
                let flight = self.flight(key, model, call());
                if let Some(weak) = flight.downgrade() {
                    found.insert(weak);
                }
                Joined {
                    flight,
                    leads: true,
                }
            }
            Entry::Vacant(free) => {
                let flight = self.flight(key, model, call());
                if let Some(weak) = flight.downgrade() {
                    free.insert(weak);
                }
                Joined {
                    flight,
                    leads: true,
                }
            }
        }
    }

    fn flight(
        self: &Arc<Self>,
        key: CacheKey,
        model: &str,
        call: BoxFuture<'static, Result<FreshAnswer, GatewayError>>,
    ) -> Flight {
        let cache = Arc::clone(self);
        let model = model.to_owned();
        async move {
            // Leaves the table when the call ends or is dropped, however that happens.
            let mut listed = Listed {
                flights: cache.flights.clone(),
                key,
                ended: false,
            };
            let answer = call.await;
            listed.ended = true;
            let answer = answer?;
            Ok(cache.insert(key, &model, answer.body, answer.content_type, answer.usage))
        }
        .boxed()
        .shared()
    }

    /// The figures for `/metrics`.
    pub fn stats(&self) -> CacheStats {
        // Moka counts weights lazily: settle its pending work first.
        self.entries.run_pending_tasks();
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            bytes: self.entries.weighted_size(),
            entries: self.entries.entry_count(),
        }
    }
}

/// Removes a flight from the table when it ends or is dropped (every caller left).
struct Listed {
    flights: Arc<DashMap<CacheKey, WeakShared<BoxFuture<'static, FlightResult>>>>,
    key: CacheKey,
    /// The call ended: the entry is this flight's, callers still hold it.
    ended: bool,
}

impl Drop for Listed {
    fn drop(&mut self) {
        if self.ended {
            self.flights.remove(&self.key);
        } else {
            // Dropped: the entry is this flight's unless a newer call already replaced it.
            self.flights
                .remove_if(&self.key, |_, weak| weak.upgrade().is_none());
        }
    }
}

/// An answer a model call produced, before it is kept.
pub struct FreshAnswer {
    pub body: Bytes,
    pub content_type: Option<String>,
    pub usage: Option<Usage>,
}
