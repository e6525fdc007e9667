//! Settlement: every admitted call gives back its reservation and is charged its real
//! usage exactly once — on success, on the model server's failure, on timeout, and when
//! the client goes away (the admission's `Drop`) — then reported and recorded.

use std::sync::atomic::{AtomicU64, Ordering};

use super::admission::Admission;
use super::events::{QuotaCrossing, SettledCall};
use super::money::Money;
use super::pricing::Charge;
use super::records::KeyCounters;
use super::records::{CallOutcome, CallRecord, EncodedCall, Usage};
use super::shared_limits::SharedSettlement;

impl Admission {
    /// Ends the call with the real outcome.
    pub fn settle(mut self, outcome: CallOutcome, status: u16) {
        self.finish(outcome, status);
    }

    /// Gives back every reservation, charging `charged` and `cost` (and the request, if
    /// `charge_request`). Returns the key's counters before this call's charge.
    fn release(&mut self, charged: Usage, charge_request: bool, cost: Money) -> KeyCounters {
        let this = &mut *self.0;
        let key = &this.caller.key;
        let reserved = std::mem::take(&mut this.reserved);
        let mut before = KeyCounters::default();
        if reserved.request {
            if charge_request {
                before.requests = key.requests_used.fetch_add(1, Ordering::AcqRel);
            } else {
                key.requests_reserved.fetch_sub(1, Ordering::AcqRel);
            }
        }
        settle_counter(&key.tokens_committed, reserved.tokens, charged.total());
        before.prompt_tokens = key
            .prompt_tokens_used
            .fetch_add(charged.prompt_tokens, Ordering::AcqRel);
        before.completion_tokens = key
            .completion_tokens_used
            .fetch_add(charged.completion_tokens, Ordering::AcqRel);
        let images = if charge_request { reserved.images } else { 0 };
        settle_counter(&key.images_committed, reserved.images, images);
        before.images = key.images_used.fetch_add(images, Ordering::AcqRel);
        settle_counter(&key.cost_committed, reserved.cost.0, cost.0);
        before.cost = Money(key.cost_used.fetch_add(cost.0, Ordering::AcqRel));
        let user = &this.caller.user;
        settle_counter(&user.cost_committed, reserved.user_cost.0, cost.0);
        user.cost_used.fetch_add(cost.0, Ordering::AcqRel);
        let refused = !this.admitted;
        if let (Some(shared), Some(claim)) = (&this.shared, this.shared_claim.take()) {
            shared.settle(SharedSettlement {
                claim,
                charged_request: charge_request,
                charged_tokens: charged.total(),
                charged_images: images,
                charged_cost: cost.0,
                withdrawn: refused,
            });
        }
        if let Some(grant) = reserved.key_grant {
            key.limiter
                .release(&grant, &this.key_limits, charged.total(), refused);
        }
        if let Some(grant) = reserved.user_grant {
            this.caller
                .user
                .limiter
                .release(&grant, &this.user_limits, charged.total(), refused);
        }
        before
    }

    /// Tells the watchers of each quota share (`quota_alert_percents`) this call's charge
    /// reached. Calls settling at once may each see the other's charge in part; a share
    /// is then reported twice or, rarely, not at all: the alerts that read this forgive
    /// the one and the refusal at 100% covers the other.
    fn report_quota_shares(&self, before: KeyCounters) {
        if self.quota_alert_percents.is_empty() {
            return;
        }
        let limits = &self.caller.record.limits;
        // Shares of this period's quotas: counted from where the period began.
        let base = self.key_mark.base;
        let before = before.since(&base);
        let charged = self.caller.key.counters().since(&base);
        for (what, quota, was, now) in [
            (
                "requests",
                limits.request_quota,
                before.requests,
                charged.requests.max(before.requests),
            ),
            (
                "tokens",
                limits.token_quota,
                before.tokens(),
                charged.tokens().max(before.tokens()),
            ),
            (
                "images",
                limits.image_quota,
                before.images,
                charged.images.max(before.images),
            ),
            // In nano-units.
            (
                "budget",
                limits.budget.map(|b| b.0),
                before.cost.0,
                charged.cost.0.max(before.cost.0),
            ),
        ] {
            let Some(quota) = quota.filter(|&q| q > 0) else {
                continue;
            };
            for &percent in self.quota_alert_percents.iter() {
                let mark = u128::from(quota) * u128::from(percent);
                if u128::from(was) * 100 < mark && u128::from(now) * 100 >= mark {
                    self.events.quota_crossed(&QuotaCrossing {
                        key_id: &self.caller.record.id,
                        key_name: &self.caller.record.name,
                        user_id: &self.caller.record.user_id,
                        what,
                        percent,
                        used: now,
                        quota,
                    });
                }
            }
        }
    }

    /// What the call costs at its price: its tokens, the images charged, and the model's
    /// time from forwarding to the answer's end (or to now, for an answer cut short).
    fn cost(&self, usage: Usage, served: bool) -> Money {
        let Some(priced) = &self.priced else {
            return Money::ZERO;
        };
        let (sized, unsized_images) = match served {
            true => (
                self.facts.image_sizes.as_slice(),
                self.facts.unsized_images(),
            ),
            false => (&[][..], 0),
        };
        let model_micros = self.forwarded.map_or(0, |sent| {
            let done = self.upstream_done.unwrap_or_else(std::time::Instant::now);
            u64::try_from(done.saturating_duration_since(sent).as_micros()).unwrap_or(u64::MAX)
        });
        priced.price.cost(
            &priced.tiers,
            &Charge {
                usage,
                sized_images: sized,
                unsized_images,
                model_micros,
                served,
            },
        )
    }

    fn finish(&mut self, outcome: CallOutcome, status: u16) {
        if std::mem::replace(&mut self.settled, true) {
            return;
        }
        if !self.admitted {
            self.release(Usage::default(), false, Money::ZERO);
            return;
        }
        let settle = tracing::info_span!(target: super::admission::TRACE_TARGET, parent: &self.facts.span, "settle");
        let _settling = settle.enter();
        // A hit had no model call of its own, but was served as one.
        let served = self.forwarded.is_some() || self.cache_hit;
        let charged_request = served && outcome.charges_request() && self.charge.charges_request();
        let (usage, usage_estimated) = match self.usage {
            Some(usage) => (usage, false),
            // Served but never told how much: charge what the gate saw of it.
            None if charged_request => (
                Usage {
                    prompt_tokens: self.facts.prompt_estimate,
                    completion_tokens: self.chunks_seen,
                },
                true,
            ),
            None => (Usage::default(), false),
        };
        // The one place the hit billing policy (and any later discount) meets the books:
        // the counters, the usage report and the call log all see this charge, and the
        // cost is the full call's cost scaled alike.
        let full_usage = usage;
        let usage = self.charge.apply(usage);
        let images = if charged_request {
            self.facts.images
        } else {
            0
        };
        let cost = self
            .charge
            .apply_money(self.cost(full_usage, charged_request));
        let before = self.release(usage, charged_request, cost);
        self.report_quota_shares(before);
        if self.traced() {
            let span = &self.facts.span;
            span.record("gen_ai.usage.input_tokens", usage.prompt_tokens);
            span.record("gen_ai.usage.output_tokens", usage.completion_tokens);
            span.record("gateway.outcome", outcome.as_str());
            span.record("gateway.usage_estimated", usage_estimated);
            span.record("http.response.status_code", status);
            if !self.finish_reasons.is_empty() {
                span.record(
                    "gen_ai.response.finish_reasons",
                    self.finish_reasons.join(","),
                );
            }
            if status >= 500 {
                span.record("otel.status_code", "ERROR");
            }
        }
        let total = self.started.elapsed();
        let latency_ms = u64::try_from(total.as_millis()).unwrap_or(u64::MAX);
        self.events.call_settled(&SettledCall {
            door: self.facts.door,
            model: &self.facts.metric_model,
            outcome: outcome.as_str(),
            status,
            stream: self.facts.stream,
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            images: u64::from(images),
            cost_nanos: cost.0,
            total,
            // The gateway's own share: all but the time the model server held the call.
            overhead: match (self.forwarded, self.upstream_done) {
                (Some(sent), Some(done)) => {
                    Some(total.saturating_sub(done.saturating_duration_since(sent)))
                }
                _ => None,
            },
        });
        tracing::info!(
            request_id = %self.facts.request_id,
            key_id = %self.caller.record.id,
            model = %self.facts.model,
            stream = self.facts.stream,
            status,
            outcome = outcome.as_str(),
            prompt_tokens = usage.prompt_tokens,
            completion_tokens = usage.completion_tokens,
            images = self.facts.images,
            estimated = usage_estimated,
            latency_ms,
            "call"
        );
        let call = CallRecord {
            at_micros: self.clock.now_micros(),
            request_id: std::mem::take(&mut self.facts.request_id),
            key_id: self.caller.record.id.clone(),
            user_id: self.caller.record.user_id.clone(),
            model: std::mem::take(&mut self.facts.model),
            version: self.facts.version.take(),
            cost,
            status,
            outcome,
            stream: self.facts.stream,
            latency_ms,
            charged_request,
            usage,
            usage_estimated,
            images,
            image_sizes: std::mem::take(&mut self.facts.image_sizes),
            request_body: None,
            response_body: None,
            client_addr: self.caller.client.map(|a| a.to_canonical().to_string()),
            reservation: self.reservation,
            cache_hit: self.cache_hit,
        };
        // The journal keeps the settlement (without the bodies) until the store has the
        // call: a hard stop in between then costs the real usage, not the reservation.
        // Without bodies (the default) the call log keeps the same encoding.
        let mut encoded = EncodedCall::new(call);
        if let (Some(journal), Some(_)) = (&self.journal, self.reservation) {
            journal.settled(&encoded);
        }
        let (request_body, response_body) =
            (self.facts.request_body.take(), self.response_body.take());
        if request_body.is_some() || response_body.is_some() {
            let mut call = encoded.call;
            call.request_body = request_body;
            call.response_body = response_body;
            encoded = EncodedCall::new(call);
        }
        self.sink.record(encoded);
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        // 499: the client closed the request (nginx's convention).
        self.finish(CallOutcome::ClientDisconnected, 499);
    }
}

/// Moves `counter` from `reserved` to `charged`.
fn settle_counter(counter: &AtomicU64, reserved: u64, charged: u64) {
    if charged >= reserved {
        counter.fetch_add(charged - reserved, Ordering::AcqRel);
    } else {
        counter.fetch_sub(reserved - charged, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use crate::core::admission::tests::facts;
    use crate::core::limits::KeyLimits;
    use crate::core::records::{CallOutcome, Usage};
    use crate::core::testing::{MemoryStore, gate, key, user};
    use crate::core::{GateSettings, Remaining};

    fn quota_gate() -> (
        crate::core::Gateway,
        crate::core::usage_sink::UsageQueue,
        std::sync::Arc<crate::core::testing::SeenEvents>,
    ) {
        let mut record = key("key_a", "sk-step3-a");
        record.limits = KeyLimits {
            request_quota: Some(10),
            token_quota: Some(1000),
            image_quota: Some(10),
            ..KeyLimits::default()
        };
        gate(
            MemoryStore::with(vec![user("usr_1")], vec![record]),
            GateSettings::default(),
        )
    }

    #[tokio::test]
    async fn a_settled_call_is_charged_its_real_usage_and_recorded_once() {
        let (gateway, mut queue, events) = quota_gate();
        let caller = gateway.authenticate(Some("sk-step3-a"), None).unwrap();
        let mut admission = gateway.admit(&caller, facts(1, Some(100))).unwrap();
        admission.mark_forwarded();
        admission.observe_usage(Usage {
            prompt_tokens: 12,
            completion_tokens: 30,
        });
        admission.settle(CallOutcome::Completed, 200);
        assert_eq!(
            caller.remaining(),
            Remaining {
                requests: Some(9),
                tokens: Some(958),
                images: Some(9),
                budget: None,
            }
        );
        let call = queue.try_recv().unwrap().call;
        assert_eq!((call.usage.total(), call.images, call.status), (42, 1, 200));
        assert!(!call.usage_estimated);
        assert!(queue.try_recv().is_none(), "recorded once");
        assert_eq!(
            *events.0.lock().unwrap(),
            ["started rest", "settled completed"]
        );
    }

    #[tokio::test]
    async fn a_call_dropped_after_forwarding_is_charged_as_the_client_leaving() {
        let (gateway, mut queue, _) = quota_gate();
        let caller = gateway.authenticate(Some("sk-step3-a"), None).unwrap();
        let mut admission = gateway.admit(&caller, facts(0, Some(100))).unwrap();
        admission.mark_forwarded();
        admission.observe_chunk();
        admission.observe_chunk();
        drop(admission);
        let call = queue.try_recv().unwrap().call;
        assert_eq!(call.outcome, CallOutcome::ClientDisconnected);
        assert_eq!(call.status, 499);
        // No usage came: the estimate (prompt) and the chunks seen are charged.
        assert!(call.usage_estimated);
        assert_eq!(call.usage.total(), 10 + 2);
        assert_eq!(caller.remaining().requests, Some(9));
        assert!(queue.try_recv().is_none());
    }

    #[tokio::test]
    async fn a_cache_hit_is_charged_its_share_of_the_usage_and_marked_in_the_log() {
        use crate::core::ChargeFactor;
        for (percent, charged, requests_left) in
            [(0, (0, 0), 10), (50, (6, 15), 9), (100, (12, 29), 9)]
        {
            let (gateway, mut queue, _) = quota_gate();
            let caller = gateway.authenticate(Some("sk-step3-a"), None).unwrap();
            let mut admission = gateway.admit(&caller, facts(0, Some(100))).unwrap();
            admission.mark_cache_hit(ChargeFactor::percent(percent));
            admission.observe_usage(Usage {
                prompt_tokens: 12,
                completion_tokens: 29,
            });
            admission.settle(CallOutcome::Completed, 200);
            let call = queue.try_recv().unwrap().call;
            assert!(call.cache_hit);
            // Rounded up: 29 tokens at 50% are 15.
            let expected = Usage {
                prompt_tokens: charged.0,
                completion_tokens: charged.1,
            };
            assert_eq!(call.usage, expected, "{percent}%");
            assert_eq!(call.charged_request, percent > 0);
            assert_eq!(caller.remaining().requests, Some(requests_left));
            assert_eq!(caller.remaining().tokens, Some(1000 - expected.total()));
        }
    }

    #[tokio::test]
    async fn a_call_that_never_reached_the_model_costs_nothing() {
        let (gateway, mut queue, _) = quota_gate();
        let caller = gateway.authenticate(Some("sk-step3-a"), None).unwrap();
        let admission = gateway.admit(&caller, facts(2, Some(100))).unwrap();
        admission.settle(CallOutcome::UpstreamFailed, 502);
        assert_eq!(
            caller.remaining(),
            Remaining {
                requests: Some(10),
                tokens: Some(1000),
                images: Some(10),
                budget: None,
            }
        );
        let call = queue.try_recv().unwrap().call;
        assert!(!call.charged_request);
        assert_eq!((call.usage.total(), call.images), (0, 0));
    }
}
