//! Admission: policy, quotas and per-minute limits for one call, all or nothing, and the
//! reservation an admitted call carries until it settles.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use super::error::GatewayError;
use super::events::{Door, GateEvents, QuotaCrossing};
use super::gateway::Gateway;
use super::images::ImageSize;
use super::journal::{Reservation, ReservationJournal};
use super::key_index::{Caller, PeriodMark, Remaining, UserMark};
use super::limits::KeyLimits;
use super::money::Money;
use super::pricing::{ImageTiers, PriceRecord};
use super::quota::{self, TokenAsk};
use super::rate_limit::{Grant, LimitScope, LimitSpec, RateFigures};
use super::records::Usage;
use super::shared_limits::{SharedAsk, SharedClaim, SharedLimits, SharedRefusal};
use super::time::{Clock, now_micros};
use super::usage_sink::UsageSink;

/// What the gate knows of a call before it is forwarded.
#[derive(Clone, Debug)]
pub struct CallFacts {
    pub request_id: String,
    /// The model as the client named it, or, when the catalogue knows the name, the
    /// catalogue's name of its model.
    pub model: String,
    /// The catalogue version the call goes to (the served name); `None` when the
    /// catalogue does not know the model.
    pub version: Option<String>,
    pub stream: bool,
    /// Prompt tokens estimated from the text and images.
    pub prompt_estimate: u64,
    /// The client's output cap (`max_tokens` / `max_completion_tokens`).
    pub client_cap: Option<u64>,
    /// Choices to generate (`n`).
    pub choices: u64,
    pub door: Door,
    /// The model as a metrics label: a configured name, or `other`.
    pub metric_model: String,
    pub images: u32,
    /// Sizes of the inline images, as read from their headers.
    pub image_sizes: Vec<ImageSize>,
    /// The request body, kept only when the call log stores bodies.
    pub request_body: Option<String>,
    /// The call's span (disabled unless traces are exported): settlement records the
    /// usage and outcome on it and opens its `settle` stage under it.
    pub span: tracing::Span,
}

/// The target of the spans and events that make a call's trace; off for the logs.
pub const TRACE_TARGET: &str = "step3gw::otel";

/// What an admission holds until it settles.
#[derive(Debug, Default)]
pub(super) struct Reserved {
    pub(super) request: bool,
    pub(super) tokens: u64,
    pub(super) images: u64,
    pub(super) key_grant: Option<Grant>,
    pub(super) user_grant: Option<Grant>,
    /// The worst cost counted in flight on the key and on its user.
    pub(super) cost: Money,
    pub(super) user_cost: Money,
}

/// The price a call is charged by (the one in effect when it was admitted).
#[derive(Clone, Debug)]
pub(super) struct Priced {
    pub(super) price: Arc<PriceRecord>,
    pub(super) tiers: Arc<ImageTiers>,
}

/// An admitted call's reservation; it is settled exactly once, by [`Admission::settle`]
/// or, if the call is abandoned (client gone, task cancelled), by `Drop`. A call refused
/// half-way through admission gives back what it had reserved, and is not recorded.
///
/// Boxed: each step of the call path moves it into its future, and its state is about
/// 1.3 KB (a copy at every step, measured as `memcpy` in the call's profile).
#[derive(Debug)]
pub struct Admission(pub(super) Box<AdmissionState>);

impl std::ops::Deref for Admission {
    type Target = AdmissionState;

    fn deref(&self) -> &AdmissionState {
        &self.0
    }
}

impl std::ops::DerefMut for Admission {
    fn deref_mut(&mut self) -> &mut AdmissionState {
        &mut self.0
    }
}

/// What an [`Admission`] holds.
#[derive(Debug)]
pub struct AdmissionState {
    pub(super) caller: Caller,
    pub(super) key_limits: LimitSpec,
    pub(super) user_limits: LimitSpec,
    pub(super) facts: CallFacts,
    pub(super) sink: UsageSink,
    pub(super) events: Arc<dyn GateEvents>,
    pub(super) log_bodies: bool,
    pub(super) started: Instant,
    pub(super) reserved: Reserved,
    pub(super) upstream_cap: Option<u64>,
    pub(super) figures: RateFigures,
    pub(super) admitted: bool,
    /// When the request went to the model server.
    pub(super) forwarded: Option<Instant>,
    /// When the model server's answer ended.
    pub(super) upstream_done: Option<Instant>,
    pub(super) usage: Option<Usage>,
    pub(super) chunks_seen: u64,
    pub(super) response_body: Option<String>,
    pub(super) settled: bool,
    /// Durable mode: the journal, and this call's reservation in it once written.
    pub(super) journal: Option<Arc<dyn ReservationJournal>>,
    pub(super) reservation: Option<u64>,
    /// Shares of a quota whose crossing the watchers are told of.
    pub(super) quota_alert_percents: Arc<[u8]>,
    /// Why the model stopped (`stop`, `length`, …), each once, for the trace only.
    pub(super) finish_reasons: Vec<String>,
    /// Several replicas: the shared counters, and this call's claim once they granted it.
    pub(super) shared: Option<Arc<dyn SharedLimits>>,
    pub(super) shared_claim: Option<SharedClaim>,
    /// The price of the call; `None`: the model has none and the call costs nothing.
    pub(super) priced: Option<Priced>,
    /// The key's period, and its user's budget period (with a budget), at admission.
    pub(super) key_mark: PeriodMark,
    pub(super) user_mark: Option<UserMark>,
    pub(super) clock: Clock,
    /// Served from the response cache (or from another caller's identical call in flight)
    /// rather than by a model call of its own: charged by `charge`, marked in the log.
    pub(super) cache_hit: bool,
    /// The share of the usage this call is charged (the cache's hit billing policy).
    pub(super) charge: ChargeFactor,
}

/// What share of a call's usage is charged, in percent: the one place a discount (the
/// response cache's hit billing) is applied, in settlement, to everything charged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChargeFactor(u8);

impl ChargeFactor {
    pub const FULL: ChargeFactor = ChargeFactor(100);
    pub const FREE: ChargeFactor = ChargeFactor(0);

    /// `percent` of the price, at most 100.
    pub fn percent(percent: u8) -> ChargeFactor {
        ChargeFactor(percent.min(100))
    }

    pub fn as_percent(self) -> u8 {
        self.0
    }

    /// The tokens charged: the share of each count, rounded up, so that a fraction of a
    /// non-zero count is never free.
    pub fn apply(self, usage: Usage) -> Usage {
        let scale = |n: u64| (u128::from(n) * u128::from(self.0)).div_ceil(100);
        Usage {
            prompt_tokens: u64::try_from(scale(usage.prompt_tokens)).unwrap_or(u64::MAX),
            completion_tokens: u64::try_from(scale(usage.completion_tokens)).unwrap_or(u64::MAX),
        }
    }

    /// The cost charged: the share of the full cost, rounded up to a nano-unit.
    pub fn apply_money(self, cost: Money) -> Money {
        let scaled = (u128::from(cost.0) * u128::from(self.0)).div_ceil(100);
        Money(u64::try_from(scaled).unwrap_or(u64::MAX))
    }

    /// A free call does not count against the request and image quotas either.
    pub fn charges_request(self) -> bool {
        self.0 > 0
    }
}

impl Gateway {
    /// Policy, quotas and limits for one call, all or nothing. On success the call's
    /// request, tokens and images are reserved, and the returned [`Admission`] must travel
    /// with the call until it ends.
    pub fn admit(&self, caller: &Caller, facts: CallFacts) -> Result<Admission, GatewayError> {
        self.reserve(caller, facts).map_err(|e| {
            if let GatewayError::QuotaExceeded { what, limit } = &e {
                self.report_exhausted(caller, what, *limit);
            }
            self.refused(e)
        })
    }

    /// A call refused for a used-up quota: the key is at 100% as far as calls go, even when
    /// its charges stop short of the quota (what is left is less than a call needs).
    fn report_exhausted(&self, caller: &Caller, what: &'static str, quota: u64) {
        if self.quota_alert_percents.contains(&100) {
            self.events.quota_crossed(&QuotaCrossing {
                key_id: &caller.record.id,
                key_name: &caller.record.name,
                user_id: &caller.record.user_id,
                what,
                percent: 100,
                used: quota,
                quota,
            });
        }
    }

    /// Whether the caller may make a call of `facts`: a catalogue model is allowed by its
    /// model's name, or by the version's name (a key allowed one version only).
    fn authorize_call_model(&self, caller: &Caller, facts: &CallFacts) -> Result<(), GatewayError> {
        let allowed = caller.record.allows_model(&facts.model)
            || facts
                .version
                .as_deref()
                .is_some_and(|v| caller.record.allows_model(v));
        if allowed {
            Ok(())
        } else {
            Err(GatewayError::ModelNotAllowed {
                model: facts.model.clone(),
            })
        }
    }

    fn reserve(&self, caller: &Caller, facts: CallFacts) -> Result<Admission, GatewayError> {
        // A call that could not be recorded is not made (its usage would be held in memory
        // only): refused while the store fails, at the cost of one atomic load.
        if !self.sink.health().is_available() {
            return Err(GatewayError::StoreUnavailable);
        }
        self.authorize_call_model(caller, &facts)?;
        let limits: &KeyLimits = &caller.record.limits;
        let per_request = [
            limits.max_images_per_request,
            self.settings.max_images_per_request,
        ]
        .into_iter()
        .flatten()
        .min();
        if let Some(cap) = per_request
            && facts.images > cap
        {
            let images = if facts.images == 1 { "image" } else { "images" };
            let are = if cap == 1 { "is" } else { "are" };
            return Err(GatewayError::invalid_request(
                format!(
                    "this request has {} {images}; at most {cap} {are} allowed per request",
                    facts.images
                ),
                Some("messages"),
            ));
        }
        let key = &caller.key;
        let mut admission = Admission(Box::new(AdmissionState {
            caller: caller.clone(),
            key_limits: limits.rate(),
            user_limits: caller.user_record.limits.rate(),
            facts,
            sink: self.sink.clone(),
            events: self.events.clone(),
            log_bodies: self.settings.log_bodies,
            started: Instant::now(),
            reserved: Reserved::default(),
            upstream_cap: None,
            figures: RateFigures::default(),
            admitted: false,
            forwarded: None,
            upstream_done: None,
            usage: None,
            chunks_seen: 0,
            response_body: None,
            settled: false,
            journal: self.journal.clone(),
            reservation: None,
            quota_alert_percents: self.quota_alert_percents.clone(),
            finish_reasons: Vec::new(),
            shared: self.shared.clone(),
            shared_claim: None,
            priced: None,
            key_mark: PeriodMark::default(),
            user_mark: None,
            clock: self.settings.clock.clone(),
            cache_hit: false,
            charge: ChargeFactor::FULL,
        }));
        let now = self.settings.clock.now_unix();
        // A period's quotas are counted from where it began in the key's counters.
        let mark = self.key_mark(caller, now)?;
        admission.key_mark = mark;
        let base = mark.base;
        let shifted = |quota: Option<u64>, base: u64| quota.map(|q| q.saturating_add(base));
        let user_mark = match caller.user_record.limits.budget {
            Some(_) => Some(self.user_mark(caller, now)?),
            None => None,
        };
        admission.user_mark = user_mark;
        let priced = self
            .prices
            .price_at(
                admission
                    .facts
                    .version
                    .as_deref()
                    .unwrap_or(&admission.facts.model),
                now,
            )
            .map(|price| Priced {
                price,
                tiers: self.image_tiers.clone(),
            });
        let unsized_images = admission.facts.unsized_images();
        // What the budgets leave pays for so many output tokens: a cap like a token quota's.
        let user_limits = &caller.user_record.limits;
        let budget_left = [
            Gateway::key_budget_left(caller, &mark)
                .map(|m| (m, "key", limits.budget, limits.period)),
            user_mark
                .as_ref()
                .and_then(|m| Gateway::user_budget_left(caller, m))
                .map(|m| (m, "user", user_limits.budget, user_limits.period)),
        ]
        .into_iter()
        .flatten()
        .min_by_key(|(left, ..)| *left);
        let mut budget_tokens = None;
        if let (Some(priced), Some((left, whose, budget, period))) = (&priced, budget_left) {
            let affordable = priced.price.affordable_completion(
                &priced.tiers,
                left,
                admission.facts.prompt_estimate,
                &admission.facts.image_sizes,
                unsized_images,
            );
            if let Some(tokens) = affordable {
                if tokens < admission.facts.choices.max(1) {
                    return Err(super::spend::budget_exceeded(whose, budget, period));
                }
                budget_tokens = Some(admission.facts.prompt_estimate.saturating_add(tokens));
            }
        }

        // Quotas first, so a call they refuse takes nothing from the per-minute limits.
        let mut plan = None;
        let choices = admission.facts.choices.max(1);
        // A tokens-per-minute limit below the default cap would refuse every call that gives
        // no cap: such calls get the room under the limit as their cap instead.
        let tpm = [admission.key_limits.tpm, admission.user_limits.tpm]
            .into_iter()
            .flatten()
            .min();
        let ask = TokenAsk {
            prompt_estimate: admission.facts.prompt_estimate,
            client_cap: admission.facts.client_cap,
            choices,
            default_cap: self.settings.default_max_tokens,
            default_ceiling: tpm
                .map(|t| t.saturating_sub(admission.facts.prompt_estimate) / choices),
        };
        let tokens =
            key.tokens_committed
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |committed| {
                    let quota_left =
                        quota::remaining(shifted(limits.token_quota, base.tokens()), committed);
                    let left = [quota_left, budget_tokens].into_iter().flatten().min();
                    plan = quota::plan_tokens(left, ask);
                    plan.map(|p| committed.saturating_add(p.reserve))
                });
        let plan = match (tokens, plan) {
            (Ok(_), Some(plan)) => plan,
            _ => {
                return Err(GatewayError::QuotaExceeded {
                    what: "tokens",
                    limit: limits.token_quota.unwrap_or_default(),
                });
            }
        };
        admission.reserved.tokens = plan.reserve;
        admission.upstream_cap = plan.upstream_cap;
        reserve_one(
            &key.requests_reserved,
            shifted(limits.request_quota, base.requests),
            1,
        )
        .map_err(|_| GatewayError::QuotaExceeded {
            what: "requests",
            limit: limits.request_quota.unwrap_or_default(),
        })?;
        admission.reserved.request = true;
        let images = u64::from(admission.facts.images);
        if images > 0 {
            reserve_one(
                &key.images_committed,
                shifted(limits.image_quota, base.images),
                images,
            )
            .map_err(|_| GatewayError::QuotaExceeded {
                what: "images",
                limit: limits.image_quota.unwrap_or_default(),
            })?;
            admission.reserved.images = images;
        }
        // The worst cost known in advance, against the key's budget, then the user's.
        if let Some(priced) = &priced {
            let worst = priced.price.worst_cost(
                &priced.tiers,
                admission.facts.prompt_estimate,
                plan.reserve.saturating_sub(admission.facts.prompt_estimate),
                &admission.facts.image_sizes,
                unsized_images,
            );
            Gateway::reserve_key_cost(caller, &mark, worst)?;
            admission.reserved.cost = worst;
            Gateway::reserve_user_cost(caller, user_mark.as_ref(), worst)?;
            admission.reserved.user_cost = worst;
        }
        admission.priced = priced;

        let key_grant = key
            .limiter
            .acquire(&admission.key_limits, LimitScope::Key, plan.reserve)
            .map_err(GatewayError::from)?;
        admission.reserved.key_grant = Some(key_grant);
        let user_grant = caller
            .user
            .limiter
            .acquire(&admission.user_limits, LimitScope::User, plan.reserve)
            .map_err(GatewayError::from)?;
        admission.reserved.user_grant = Some(user_grant);
        admission.figures = RateFigures::from_grants(&key_grant, &user_grant);
        admission.admitted = true;
        self.events.call_started(admission.facts.door);
        Ok(admission)
    }
}

/// Adds `amount` to `counter` if the result stays within `quota`; else the quota.
fn reserve_one(counter: &AtomicU64, quota: Option<u64>, amount: u64) -> Result<(), u64> {
    match quota {
        None => {
            counter.fetch_add(amount, Ordering::AcqRel);
            Ok(())
        }
        Some(quota) => counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                n.checked_add(amount).filter(|&total| total <= quota)
            })
            .map(drop)
            .map_err(|_| quota),
    }
}

impl CallFacts {
    /// Images whose size the gateway could not read (URLs the model server fetches).
    pub fn unsized_images(&self) -> u32 {
        self.images
            .saturating_sub(u32::try_from(self.image_sizes.len()).unwrap_or(u32::MAX))
    }
}

impl Admission {
    pub fn request_id(&self) -> &str {
        &self.facts.request_id
    }

    /// The per-minute standing after this call was admitted (`x-ratelimit-*`).
    pub fn figures(&self) -> RateFigures {
        self.figures
    }

    /// The `max_tokens` the upstream must be held to, when the client's must change.
    pub fn upstream_cap(&self) -> Option<u64> {
        self.upstream_cap
    }

    pub fn caller(&self) -> &Caller {
        &self.caller
    }

    pub fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The quotas left with this call's reservation counted.
    pub fn remaining(&self) -> Remaining {
        self.caller.remaining()
    }

    /// Durable mode: writes this call's reservation to the journal and returns once it is
    /// durable (one sync shared with the calls reserved meanwhile). Must come before the
    /// call is forwarded: a call the model server sees is then settled exactly once, at the
    /// latest at the next start. Without a journal, returns at once.
    pub async fn make_durable(&mut self) -> Result<(), GatewayError> {
        let this = &mut *self.0;
        let Some(journal) = &this.journal else {
            return Ok(());
        };
        let pending = journal.reserve(Reservation {
            at_micros: now_micros(),
            request_id: this.facts.request_id.clone(),
            key_id: this.caller.record.id.clone(),
            user_id: this.caller.record.user_id.clone(),
            model: this.facts.model.clone(),
            version: this.facts.version.clone(),
            stream: this.facts.stream,
            estimate: Usage {
                prompt_tokens: this.facts.prompt_estimate,
                completion_tokens: this
                    .reserved
                    .tokens
                    .saturating_sub(this.facts.prompt_estimate),
            },
            images: this.facts.images,
            cost: this.reserved.cost,
        });
        // Known before the sync: if this call is dropped while waiting, its settlement
        // still names the reservation, and the two meet in the journal.
        this.reservation = Some(pending.id);
        let error = match pending.durable.await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "the reservation journal has stopped".to_owned(),
        };
        // A call that could not be recorded is not made: refused like one the gate turns
        // away while the store fails (which it now does, until the usage writer finds the
        // disk taking writes again), with everything it reserved given back and no entry
        // in the call log. The journal forgets the reservation if it did reach the disk.
        tracing::error!(request_id = %this.facts.request_id, error, "the reservation journal failed; the call is refused");
        this.sink.health().fail_write(&error);
        journal.close(vec![pending.id]);
        this.reservation = None;
        this.admitted = false;
        this.events.call_withdrawn(this.facts.door);
        let refusal = GatewayError::StoreUnavailable;
        if let Some(reason) = refusal.refusal_reason() {
            this.events.refused(reason);
        }
        Err(refusal)
    }

    /// Several replicas: claims the call's request, tokens, images, slot and per-minute
    /// share on the counters every replica shares, in one round trip. Must come before
    /// the call is forwarded. Without shared counters, returns at once.
    ///
    /// Shared counters that cannot be asked refuse keys with a quota (503, fail closed: a
    /// quota could be overspent); other keys go on under this replica's own limits.
    pub async fn reserve_shared(&mut self) -> Result<(), GatewayError> {
        let Some(shared) = self.shared.clone() else {
            return Ok(());
        };
        let limits = &self.caller.record.limits;
        let ask = SharedAsk {
            call_id: super::keys::generate_id("call"),
            key_id: self.caller.record.id.clone(),
            user_id: self.caller.record.user_id.clone(),
            key_limits: self.key_limits,
            user_limits: self.user_limits,
            request_quota: limits.request_quota,
            token_quota: limits.token_quota,
            image_quota: limits.image_quota,
            tokens: self.reserved.tokens,
            images: self.reserved.images,
            budget: limits.budget.map(|b| b.0),
            cost: self.reserved.cost.0,
            period: limits
                .period
                .map(|_| (self.key_mark.start, self.key_mark.end)),
        };
        let quota_limited = [
            ask.request_quota,
            ask.token_quota,
            ask.image_quota,
            ask.budget,
        ]
        .iter()
        .any(Option::is_some);
        let refusal = match shared.admit(ask.clone()).await {
            Ok(claim) => {
                self.shared_claim = Some(claim);
                return Ok(());
            }
            Err(SharedRefusal::Unavailable(error)) if !quota_limited => {
                tracing::warn!(request_id = %self.facts.request_id, error, "the shared limits cannot be asked; a key without quotas goes on under this replica's limits");
                return Ok(());
            }
            Err(SharedRefusal::Unavailable(error)) => {
                tracing::error!(request_id = %self.facts.request_id, error, "the shared limits cannot be asked; a key with a quota is refused");
                GatewayError::StoreUnavailable
            }
            Err(SharedRefusal::Quota { what: "budget", .. }) => {
                super::spend::budget_exceeded("key", limits.budget, limits.period)
            }
            Err(SharedRefusal::Quota { what, limit }) => {
                GatewayError::QuotaExceeded { what, limit }
            }
            Err(SharedRefusal::Rate(refusal)) => GatewayError::from(refusal),
        };
        // Refused like a call the gate turns away itself: what it reserved here is given
        // back when it drops, and it leaves no entry in the call log.
        self.admitted = false;
        self.events.call_withdrawn(self.facts.door);
        if let Some(reason) = refusal.refusal_reason() {
            self.events.refused(reason);
        }
        Err(refusal)
    }

    /// Gives back everything this call reserved, as if the gate had refused it: nothing is
    /// charged or recorded. For a call that is then admitted again to be made another way
    /// (a cache hit the quota's cap rules out is forwarded instead).
    pub fn withdraw(mut self) {
        self.admitted = false;
        self.events.call_withdrawn(self.facts.door);
    }

    /// The call is answered without a model call of its own (a cached answer, or another
    /// caller's identical call): it is charged `charge` of the usage it is given.
    pub fn mark_cache_hit(&mut self, charge: ChargeFactor) {
        self.cache_hit = true;
        self.charge = charge;
    }

    /// The upstream has the request: from now on an abandoned call is charged.
    pub fn mark_forwarded(&mut self) {
        self.forwarded.get_or_insert_with(Instant::now);
    }

    /// The model server's answer has ended (its last byte arrived).
    pub fn mark_upstream_done(&mut self) {
        self.upstream_done.get_or_insert_with(Instant::now);
    }

    /// Usage reported by the upstream (cumulative; the latest report wins).
    pub fn observe_usage(&mut self, usage: Usage) {
        self.usage = Some(usage);
    }

    /// A streamed chunk with choices reached the gate (the estimate when usage never comes).
    pub fn observe_chunk(&mut self) {
        if self.chunks_seen == 0 {
            self.events.first_chunk(
                self.facts.door,
                &self.facts.metric_model,
                self.started.elapsed(),
            );
            tracing::info!(target: TRACE_TARGET, parent: &self.facts.span, "first_token");
        }
        self.chunks_seen += 1;
    }

    /// Whether the call's trace is exported (what only the trace needs is read then only).
    pub fn traced(&self) -> bool {
        !self.facts.span.is_disabled()
    }

    /// A reason the model stopped, for the trace.
    pub fn observe_finish_reason(&mut self, reason: &str) {
        if !self.finish_reasons.iter().any(|r| r == reason) {
            self.finish_reasons.push(reason.to_owned());
        }
    }

    pub fn keep_response_body(&mut self, body: &[u8]) {
        if self.log_bodies {
            self.response_body = Some(String::from_utf8_lossy(body).into_owned());
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::core::GateSettings;
    use crate::core::testing::{MemoryStore, gate, key, user};

    pub(crate) fn facts(images: u32, client_cap: Option<u64>) -> CallFacts {
        CallFacts {
            request_id: "req_1".into(),
            model: "m".into(),
            version: None,
            stream: false,
            prompt_estimate: 10,
            client_cap,
            choices: 1,
            door: Door::Rest,
            metric_model: "m".into(),
            images,
            image_sizes: Vec::new(),
            request_body: None,
            span: tracing::Span::none(),
        }
    }

    fn gate_with(limits: KeyLimits) -> (Gateway, crate::core::usage_sink::UsageQueue) {
        let mut record = key("key_a", "sk-step3-a");
        record.limits = limits;
        let (gateway, queue, _) = gate(
            MemoryStore::with(vec![user("usr_1")], vec![record]),
            GateSettings::default(),
        );
        (gateway, queue)
    }

    #[test]
    fn an_admission_reserves_its_request_tokens_and_images() {
        let (gateway, _queue) = gate_with(KeyLimits {
            request_quota: Some(5),
            token_quota: Some(1000),
            image_quota: Some(3),
            ..KeyLimits::default()
        });
        let caller = gateway.authenticate(Some("sk-step3-a"), None).unwrap();
        let admission = gateway.admit(&caller, facts(2, Some(90))).unwrap();
        assert_eq!(
            admission.remaining(),
            Remaining {
                requests: Some(4),
                tokens: Some(900),
                images: Some(1),
                budget: None,
            }
        );
        assert_eq!(admission.upstream_cap(), None);
    }

    #[test]
    fn a_refusal_half_way_gives_back_what_it_had_taken() {
        let (gateway, _queue) = gate_with(KeyLimits {
            request_quota: Some(5),
            image_quota: Some(1),
            ..KeyLimits::default()
        });
        let caller = gateway.authenticate(Some("sk-step3-a"), None).unwrap();
        let e = gateway.admit(&caller, facts(2, None)).unwrap_err();
        assert!(
            matches!(e, GatewayError::QuotaExceeded { what: "images", .. }),
            "{e:?}"
        );
        // The request reserved before the images were refused is back.
        assert_eq!(caller.remaining().requests, Some(5));
        assert_eq!(caller.remaining().images, Some(1));
    }

    #[test]
    fn a_token_quota_lowers_the_cap_sent_upstream_or_refuses() {
        let (gateway, _queue) = gate_with(KeyLimits {
            token_quota: Some(100),
            ..KeyLimits::default()
        });
        let caller = gateway.authenticate(Some("sk-step3-a"), None).unwrap();
        let admission = gateway.admit(&caller, facts(0, Some(500))).unwrap();
        assert_eq!(admission.upstream_cap(), Some(90));
        let e = gateway.admit(&caller, facts(0, Some(500))).unwrap_err();
        assert!(matches!(
            e,
            GatewayError::QuotaExceeded { what: "tokens", .. }
        ));
    }

    #[test]
    fn images_over_the_per_request_cap_and_models_off_the_list_are_refused() {
        let mut record = key("key_a", "sk-step3-a");
        record.limits.max_images_per_request = Some(4);
        record.models = Some(vec!["other".into()]);
        let (gateway, _queue, _) = gate(
            MemoryStore::with(vec![user("usr_1")], vec![record]),
            GateSettings {
                max_images_per_request: Some(2),
                ..GateSettings::default()
            },
        );
        let caller = gateway.authenticate(Some("sk-step3-a"), None).unwrap();
        let e = gateway.admit(&caller, facts(0, None)).unwrap_err();
        assert!(matches!(e, GatewayError::ModelNotAllowed { .. }), "{e:?}");
        let mut three = facts(3, None);
        three.model = "other".into();
        let e = gateway.admit(&caller, three).unwrap_err();
        assert!(e.to_string().contains("at most 2"), "{e}");
    }

    fn journaled_gate(
        journal: Arc<crate::core::testing::TestJournal>,
    ) -> (
        Gateway,
        crate::core::usage_sink::UsageQueue,
        Arc<crate::core::testing::SeenEvents>,
    ) {
        let mut record = key("key_a", "sk-step3-a");
        record.limits.request_quota = Some(5);
        record.limits.token_quota = Some(1000);
        let (gateway, queue, events) = gate(
            MemoryStore::with(vec![user("usr_1")], vec![record]),
            GateSettings::default(),
        );
        (gateway.with_journal(journal), queue, events)
    }

    #[tokio::test]
    async fn a_durable_reservation_carries_its_estimate_and_its_id_to_the_settled_call() {
        let journal = Arc::new(crate::core::testing::TestJournal::default());
        let (gateway, mut queue, _) = journaled_gate(journal.clone());
        let caller = gateway.authenticate(Some("sk-step3-a"), None).unwrap();
        let mut admission = gateway.admit(&caller, facts(0, Some(90))).unwrap();
        admission.make_durable().await.unwrap();
        let (id, reservation) = journal.reserved.lock().unwrap()[0].clone();
        assert_eq!(
            (
                reservation.estimate.prompt_tokens,
                reservation.estimate.completion_tokens
            ),
            (10, 90)
        );
        admission.mark_forwarded();
        admission.settle(crate::core::records::CallOutcome::Completed, 200);
        let call = queue.try_recv().unwrap().call;
        assert_eq!(call.reservation, Some(id));
        assert_eq!(journal.settled.lock().unwrap()[0].reservation, Some(id));
    }

    #[tokio::test]
    async fn a_reservation_the_journal_cannot_keep_refuses_the_call_and_takes_nothing() {
        let journal = Arc::new(crate::core::testing::TestJournal {
            fail: true,
            ..Default::default()
        });
        let (gateway, mut queue, events) = journaled_gate(journal.clone());
        let caller = gateway.authenticate(Some("sk-step3-a"), None).unwrap();
        let mut admission = gateway.admit(&caller, facts(0, Some(90))).unwrap();
        let e = admission.make_durable().await.unwrap_err();
        assert!(matches!(e, GatewayError::StoreUnavailable), "{e:?}");
        drop(admission);
        assert_eq!(
            caller.remaining(),
            Remaining {
                requests: Some(5),
                tokens: Some(1000),
                images: None,
                budget: None,
            }
        );
        assert!(
            queue.try_recv().is_none(),
            "a refused call is not in the call log"
        );
        assert_eq!(*journal.closed.lock().unwrap(), [1]);
        assert!(!gateway.store_health().is_available());
        assert_eq!(
            *events.0.lock().unwrap(),
            ["started rest", "withdrawn rest", "refused store"]
        );
    }

    #[test]
    fn no_call_is_admitted_while_the_store_fails() {
        let (gateway, _queue) = gate_with(KeyLimits::default());
        let caller = gateway.authenticate(Some("sk-step3-a"), None).unwrap();
        gateway.store_health().fail("disk full", 0);
        let e = gateway.admit(&caller, facts(0, None)).unwrap_err();
        assert!(matches!(e, GatewayError::StoreUnavailable));
        gateway.store_health().recover(0);
        assert!(gateway.admit(&caller, facts(0, None)).is_ok());
    }
}
