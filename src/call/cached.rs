//! Calls the response cache can answer: a hit is admitted and settled like any call (the
//! gate's limits hold, the books get one record, marked a hit and charged by the hit
//! billing policy) but never forwarded; a miss shares one model call with the identical
//! calls in flight, and its whole answer is kept.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::FutureExt as _;

use super::relay::KeepAnswer;
use super::{
    CachedRelay, CallPath, Completion, Origin, Relay, Route, StreamStart, UsageView, settle_failed,
};
use crate::cache::{
    CacheChoice, CacheKey, CacheStatus, CachedAnswer, CompletionAssembler, FreshAnswer,
    ResponseCache, asks_same_answer, chat_chunks, key_request,
};
use crate::core::records::CallOutcome;
use crate::core::request::{Endpoint, PreparedCall, with_model};
use crate::core::{Admission, Caller, ChargeFactor, GatewayError};

/// A call the cache may answer: where, under which key, served by which model.
pub(super) struct CachePlan {
    cache: Arc<ResponseCache>,
    key: CacheKey,
    served: String,
}

impl CachePlan {
    /// Where a streamed miss keeps its answer.
    pub(super) fn keep(self) -> KeepAnswer {
        KeepAnswer {
            cache: self.cache,
            key: self.key,
            model: self.served,
            assembler: CompletionAssembler::default(),
        }
    }
}

impl CallPath {
    /// The cache's plan for `call`, when the cache is on, the call is a chat completion, the
    /// key does not forbid it, and the request is deterministic (or the client asked for
    /// the cache) and the client did not say `skip`.
    pub(super) fn cache_plan(
        &self,
        caller: &Caller,
        call: &PreparedCall,
        route: &Route,
        origin: &Origin,
    ) -> Option<CachePlan> {
        let cache = self.cache.as_ref()?;
        if origin.cache == CacheChoice::Skip
            || call.endpoint != Endpoint::ChatCompletions
            || caller.record.limits.cache == Some(false)
        {
            return None;
        }
        if origin.cache != CacheChoice::Use && !asks_same_answer(&call.client_body) {
            return None;
        }
        // The version the catalogue picked is part of the request: a rollout's two versions
        // never answer for each other.
        let served = route.served.clone();
        let scope = cache.scope_id(&caller.record.id, &caller.record.user_id);
        let keyed = key_request(&scope, call.endpoint.path(), &served, &call.client_body)?;
        (keyed.deterministic || origin.cache == CacheChoice::Use).then(|| CachePlan {
            cache: cache.clone(),
            key: keyed.key,
            served,
        })
    }

    /// Admits a call the cache answers: the gate's policy, quotas and limits as for any
    /// call, the shared counters too; charged by the hit policy. `None` when the quota
    /// held the call to fewer tokens than the kept answer may have and a hit is not free:
    /// the call is then made (so that spending stays bounded by the reservation).
    async fn admit_hit(
        &self,
        caller: &Caller,
        call: &PreparedCall,
        route: &Route,
        origin: &Origin,
        answer: &CachedAnswer,
    ) -> Result<Option<Admission>, GatewayError> {
        if !self.upstream.serves_model(&route.served) {
            return Err(self.gateway.refused(GatewayError::ModelNotAllowed {
                model: call.model.clone(),
            }));
        }
        let charge = self.hit_charge();
        let mut admission = self.admit(caller, call, route, origin)?;
        if admission.upstream_cap().is_some() && charge != ChargeFactor::FREE {
            // Given back at once: the call goes the usual way.
            admission.withdraw();
            return Ok(None);
        }
        if let Err(e) = admission.reserve_shared().await {
            return Err(settle_failed(admission, e));
        }
        admission.mark_cache_hit(charge);
        if let Some(usage) = answer.usage {
            admission.observe_usage(usage);
        }
        Ok(Some(admission))
    }

    fn hit_charge(&self) -> ChargeFactor {
        self.cache
            .as_ref()
            .map_or(ChargeFactor::FULL, |c| c.settings().hit_charge)
    }

    /// A non-streaming call the cache may answer: a kept answer, else the identical call
    /// in flight, else a model call of its own that identical calls may join.
    pub(super) async fn complete_cached<T>(
        &self,
        caller: &Caller,
        call: PreparedCall,
        route: &Route,
        origin: &Origin,
        plan: CachePlan,
        read: impl FnOnce(&Bytes) -> Result<T, GatewayError>,
    ) -> Result<Completion<T>, GatewayError> {
        if let Some(answer) = plan.cache.get(&plan.key)
            && let Some(admission) = self
                .admit_hit(caller, &call, route, origin, &answer)
                .await?
        {
            return self.settle_answer(caller, admission, &answer, origin, CacheStatus::Hit, read);
        }
        let call = self.checked(call, route).await?;
        let mut admission = self.admit(caller, &call, route, origin)?;
        if admission.upstream_cap().is_some() {
            // An answer held short by this key's quota is this key's alone.
            let (admission, answer, deadline) =
                self.forward(admission, call, route, origin).await?;
            return self
                .read_answer(caller, admission, answer, deadline, origin, read)
                .await;
        }
        let settings = self.upstream.settings();
        let deadline = tokio::time::Instant::now() + settings.total_timeout;
        let ready = async {
            admission.reserve_shared().await?;
            admission.make_durable().await
        };
        match tokio::time::timeout_at(deadline, ready).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(settle_failed(admission, e)),
            Err(_) => return Err(settle_failed(admission, GatewayError::UpstreamTimeout)),
        }
        let body = match call.upstream_body {
            body if plan.served == call.model => body,
            body => match with_model(&body, &plan.served) {
                Ok(body) => body,
                Err(e) => return Err(settle_failed(admission, e)),
            },
        };
        let joined = plan.cache.join_or_lead(plan.key, &plan.served, || {
            let forward = super::trace::stage(&origin.span, super::trace::Stage::Forward);
            let traceparent =
                super::trace::upstream_traceparent(&forward, origin.traceparent.as_deref());
            let upstream = self.upstream.clone();
            let (endpoint, served) = (call.endpoint, plan.served.clone());
            let request_id = origin.request_id.clone();
            async move {
                let sending =
                    upstream.send(endpoint, &served, body, &request_id, traceparent.as_deref());
                let answer = tokio::time::timeout_at(deadline, sending)
                    .await
                    .unwrap_or(Err(GatewayError::UpstreamTimeout))?;
                let json = answer
                    .read_json(deadline, settings.idle_timeout, settings.max_response_bytes)
                    .await?;
                Ok(FreshAnswer {
                    body: json.body,
                    content_type: json.content_type,
                    usage: json.usage,
                })
            }
            .boxed()
        });
        if joined.leads {
            admission.mark_forwarded();
        }
        // Each caller waits within its own limits; leaving drops only its share.
        let shared = tokio::select! {
            answer = tokio::time::timeout_at(deadline, joined.flight) => {
                answer.unwrap_or(Err(GatewayError::UpstreamTimeout))
            }
            () = self.hard_stop.cancelled() => Err(GatewayError::ShuttingDown),
        };
        let answer = match shared {
            Ok(answer) => answer,
            // A caller that joined was not forwarded: its failure costs it nothing.
            Err(e) => return Err(settle_failed(admission, e)),
        };
        let status = if joined.leads {
            admission.mark_upstream_done();
            CacheStatus::Miss
        } else {
            plan.cache.count_shared_hit();
            admission.mark_cache_hit(self.hit_charge());
            CacheStatus::Hit
        };
        if let Some(usage) = answer.usage {
            admission.observe_usage(usage);
        }
        self.settle_answer(caller, admission, &answer, origin, status, read)
    }

    /// Settles a call answered by `answer` and hands the door its reading of it.
    fn settle_answer<T>(
        &self,
        caller: &Caller,
        mut admission: Admission,
        answer: &CachedAnswer,
        origin: &Origin,
        status: CacheStatus,
        read: impl FnOnce(&Bytes) -> Result<T, GatewayError>,
    ) -> Result<Completion<T>, GatewayError> {
        if admission.traced() {
            for reason in super::trace::record_answer(&origin.span, &answer.body) {
                admission.observe_finish_reason(&reason);
            }
        }
        let read = match read(&answer.body) {
            Ok(read) => read,
            Err(e) => return Err(settle_failed(admission, e)),
        };
        admission.keep_response_body(&answer.body);
        let processing_ms = admission.elapsed_ms();
        let figures = admission.figures();
        admission.settle(CallOutcome::Completed, 200);
        Ok(Completion {
            body: answer.body.clone(),
            answer: read,
            content_type: answer.content_type.clone(),
            processing_ms,
            figures,
            remaining: caller.remaining(),
            deprecation: None,
            cache: Some(status),
        })
    }

    /// A streaming call with a kept answer: the answer replayed as a stream. `None` on a
    /// miss.
    pub(super) async fn stream_hit(
        &self,
        caller: &Caller,
        call: &PreparedCall,
        route: &Route,
        origin: &Origin,
        plan: &CachePlan,
        view: UsageView,
    ) -> Result<Option<StreamStart>, GatewayError> {
        let Some(answer) = plan.cache.get(&plan.key) else {
            return Ok(None);
        };
        let Some(chunks) = chat_chunks(&answer.body, view.final_chunk) else {
            return Ok(None);
        };
        let Some(admission) = self.admit_hit(caller, call, route, origin, &answer).await? else {
            return Ok(None);
        };
        let figures = admission.figures();
        let remaining = admission.remaining();
        Ok(Some(StreamStart {
            relay: Relay::Cached(CachedRelay::new(chunks, admission)),
            figures,
            remaining,
            deprecation: None,
            cache: Some(CacheStatus::Hit),
        }))
    }
}
