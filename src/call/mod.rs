//! One call's life, the same for every door: admit, forward, then read the answer or relay
//! the stream, and settle exactly once. The doors only translate their protocol to and
//! from this; the model server's wire is `upstream`'s.

mod cached;
pub mod image_fetch;
mod image_hosts;
pub mod jwt;
pub mod key_tokens;
mod relay;
pub mod trace;

use std::sync::Arc;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

pub use crate::cache::{CacheChoice, CacheStats, CacheStatus};
pub use relay::{CachedRelay, Relay, RelayEvent, UpstreamRelay, UsageView};

use crate::core::catalogue::{Deprecation, ModelRecord};
use crate::core::events::Door;
use crate::core::rate_limit::RateFigures;
use crate::core::records::CallOutcome;
use crate::core::request::{
    Endpoint, PreparedCall, RequestOptions, prepare_chat, prepare_completion, prepare_embedding,
    prepare_response, with_inline_images, with_model, with_output_cap,
};
use crate::core::{Admission, CallFacts, Caller, Gateway, GatewayError, Remaining};
use crate::upstream::{UpstreamAnswer, UpstreamPool};

/// What every door needs to run a call.
#[derive(Clone)]
pub struct CallPath {
    pub gateway: Arc<Gateway>,
    pub upstream: Arc<UpstreamPool>,
    /// How requests are read and rewritten.
    pub options: Arc<RequestOptions>,
    /// Cancelled when the shutdown grace period is over: calls still running end now.
    pub hard_stop: CancellationToken,
    /// Checks bearer tokens from the identity provider, when one is configured.
    pub identity: Option<Arc<jwt::JwtVerifier>>,
    /// Makes and checks the short-lived tokens key holders ask for.
    pub key_tokens: Arc<key_tokens::KeyTokens>,
    /// Fetches image URLs in fetch mode (`image_policy.fetch`); `None` otherwise.
    pub image_fetcher: Option<Arc<image_fetch::ImageFetcher>>,
    /// The response cache and in-flight deduplication, when `[cache]` is on.
    pub cache: Option<Arc<crate::cache::ResponseCache>>,
}

/// A whole JSON answer, already settled, with what the door read of it.
#[derive(Debug)]
pub struct Completion<T> {
    pub body: Bytes,
    /// The door's reading of `body` (its protocol's answer), made before the call settled.
    pub answer: T,
    pub content_type: Option<String>,
    pub processing_ms: u64,
    pub figures: RateFigures,
    /// What the key has left after this call.
    pub remaining: Remaining,
    /// The version's deprecation, for the `Deprecation`/`Sunset` headers.
    pub deprecation: Option<Deprecation>,
    /// How the cache answered, for a call it could answer (`x-cache`).
    pub cache: Option<CacheStatus>,
}

/// A stream in progress, with the limits as they stood when it started.
pub struct StreamStart {
    pub relay: Relay,
    pub figures: RateFigures,
    pub remaining: Remaining,
    /// The version's deprecation, for the `Deprecation`/`Sunset` headers.
    pub deprecation: Option<Deprecation>,
    /// How the cache answered, for a call it could answer (`x-cache`).
    pub cache: Option<CacheStatus>,
}

/// Where a call goes: the model it is booked under, the catalogue's version (if the
/// catalogue knows the name), and the name the model server is sent.
#[derive(Clone, Debug)]
struct Route {
    model: String,
    version: Option<String>,
    served: String,
    deprecation: Option<Deprecation>,
}

/// Where a call came from: its request id, its door, the client's W3C `traceparent`, and
/// the call's span ([`trace::call_span`]; disabled unless traces are exported).
#[derive(Clone, Debug)]
pub struct Origin {
    pub request_id: String,
    pub door: Door,
    pub traceparent: Option<String>,
    pub span: tracing::Span,
    /// The client's wish about the response cache for this call.
    pub cache: CacheChoice,
}

impl CallPath {
    /// `model` as a metrics label: a name the configuration or a backend knows, else `other`
    /// (a client could otherwise invent a new label value with every request).
    pub fn metric_model(&self, model: &str) -> String {
        // The catalogue's names are as bounded as the configuration's: an admin makes them.
        if let Some(known) = self.gateway.catalogue().model_of(model) {
            known.name.clone()
        } else if self.upstream.knows_model(model) {
            model.to_owned()
        } else {
            "other".to_owned()
        }
    }

    /// The caller a bearer value opens, from `client`: a gateway key, a token made from a
    /// key, or a token of the identity provider (a JWT) when one is configured. With no
    /// bearer value, a verified client certificate's subject (mutual TLS) names the caller.
    pub async fn authenticate(
        &self,
        bearer: Option<&str>,
        client: Option<std::net::IpAddr>,
        certificate: Option<&str>,
    ) -> Result<Caller, GatewayError> {
        let bearer = bearer.map(str::trim).filter(|b| !b.is_empty());
        if let (None, Some(subject)) = (bearer, certificate) {
            // Certificates name users an admin has named: never a new user.
            return self.gateway.authenticate_subject(
                subject,
                &crate::core::identity::SubjectPolicy::default(),
                client,
            );
        }
        match (&self.identity, bearer) {
            (_, Some(token))
                if jwt::JwtVerifier::looks_like_jwt(token) && key_tokens::is_key_token(token) =>
            {
                let (key_id, mark, narrowing) = self
                    .key_tokens
                    .verify(token)
                    .map_err(|e| self.gateway.auth_refused(e, client))?;
                self.gateway
                    .authenticate_key_token(&key_id, &mark, &narrowing, client)
            }
            (Some(identity), Some(token)) if jwt::JwtVerifier::looks_like_jwt(token) => {
                let subject = identity
                    .verify(token)
                    .await
                    .map_err(|e| self.gateway.auth_refused(e, client))?;
                self.gateway
                    .authenticate_subject(&subject, identity.subjects(), client)
            }
            _ => self.gateway.authenticate(bearer, client),
        }
    }

    /// Reads a request body of `endpoint` as the client sent it.
    pub fn prepare(&self, endpoint: Endpoint, body: Bytes) -> Result<PreparedCall, GatewayError> {
        prepare_with(endpoint, body, &self.options).map_err(|e| self.gateway.refused(e))
    }

    /// Fetch mode: the call with its image URLs fetched and its body read again with the
    /// images inline, so that they are sized, estimated and recorded as inline images are.
    /// The client's own body is kept for the call log.
    async fn inline_images(&self, call: PreparedCall) -> Result<PreparedCall, GatewayError> {
        let Some(fetcher) = &self.image_fetcher else {
            return Ok(call);
        };
        let fetched = fetcher.fetch_all(&call.images_to_fetch).await?;
        let member = match call.endpoint {
            Endpoint::Responses => "input",
            _ => "messages",
        };
        let body = with_inline_images(&call.client_body, member, &fetched)?;
        // The images are `data:` URLs now, whatever the schemes clients may send.
        let mut options = (*self.options).clone();
        options.image_policy.fetch = false;
        options.image_policy.allowed_schemes.push("data".into());
        let mut inlined = prepare_with(call.endpoint, body, &options)?;
        inlined.client_body = call.client_body;
        Ok(inlined)
    }

    /// The catalogue's reading of the client's `model` (a sunset version is refused here,
    /// before anything is reserved), else the upstream's aliases, as without a catalogue.
    fn route(&self, requested: &str) -> Result<Route, GatewayError> {
        Ok(match self.gateway.resolve_model(requested)? {
            Some(resolved) => Route {
                model: resolved.model,
                // A version is a name the model servers serve: sent as it is.
                served: resolved.version.clone(),
                version: Some(resolved.version),
                deprecation: resolved.deprecation,
            },
            None => Route {
                model: requested.to_owned(),
                version: None,
                served: self.upstream.resolve_model(requested).into_owned(),
                deprecation: None,
            },
        })
    }

    fn admit(
        &self,
        caller: &Caller,
        call: &PreparedCall,
        route: &Route,
        origin: &Origin,
    ) -> Result<Admission, GatewayError> {
        let request_body = self
            .gateway
            .logs_bodies()
            .then(|| String::from_utf8_lossy(&call.client_body).into_owned());
        trace::record_request(&origin.span, call, &caller.record.id);
        let _admitting = trace::stage(&origin.span, trace::Stage::Admit).entered();
        self.gateway.admit(
            caller,
            CallFacts {
                request_id: origin.request_id.clone(),
                model: route.model.clone(),
                version: route.version.clone(),
                stream: call.stream,
                prompt_estimate: call.prompt_estimate,
                client_cap: call.max_tokens,
                choices: call.choices,
                door: origin.door,
                metric_model: self.metric_model(&route.model),
                images: call.images,
                image_sizes: call.image_sizes.clone(),
                request_body,
                span: origin.span.clone(),
            },
        )
    }

    async fn send(
        &self,
        admission: &mut Admission,
        call: PreparedCall,
        served: &str,
        origin: &Origin,
    ) -> Result<UpstreamAnswer, GatewayError> {
        let mut body = call.upstream_body;
        if served != call.model {
            body = with_model(&body, served)?;
        }
        // The quota may hold the answer to fewer tokens than the client asked for.
        if let Some(cap) = admission.upstream_cap() {
            body = with_output_cap(&body, call.endpoint, cap)?;
        }
        admission.mark_forwarded();
        let forward = trace::stage(&origin.span, trace::Stage::Forward);
        let traceparent = trace::upstream_traceparent(&forward, origin.traceparent.as_deref());
        let sending = self.upstream.send(
            call.endpoint,
            served,
            body,
            &origin.request_id,
            traceparent.as_deref(),
        );
        let sent = tokio::select! {
            sent = sending => sent,
            () = self.hard_stop.cancelled() => Err(GatewayError::ShuttingDown),
        };
        drop(forward);
        if sent.is_ok() {
            tracing::info!(target: trace::TRACE_TARGET, parent: &origin.span, "first_byte");
        }
        sent
    }

    /// Admits a call, makes its reservation durable (durable mode) and forwards it, within
    /// the total time limit (returned as a deadline for the rest of the call); a call that
    /// fails here is settled.
    async fn start(
        &self,
        caller: &Caller,
        call: PreparedCall,
        route: &Route,
        origin: &Origin,
    ) -> Result<(Admission, UpstreamAnswer, tokio::time::Instant), GatewayError> {
        let call = self.checked(call, route).await?;
        let admission = self.admit(caller, &call, route, origin)?;
        self.forward(admission, call, route, origin).await
    }

    /// What is checked before anything is reserved: the model is served, image names
    /// resolve to allowed addresses; in fetch mode the images are fetched.
    async fn checked(
        &self,
        call: PreparedCall,
        route: &Route,
    ) -> Result<PreparedCall, GatewayError> {
        // A model no backend is configured for is as unknown as one nobody serves: refused
        // before anything is reserved, not left to look like an outage.
        if !self.upstream.serves_model(&route.served) {
            return Err(self
                .gateway
                .refused(GatewayError::ModelNotAllowed { model: call.model }));
        }
        // Before anything is reserved: a refused name or image costs the caller nothing.
        if !call.image_hosts.is_empty() {
            image_hosts::check(&call.image_hosts)
                .await
                .map_err(|e| self.gateway.refused(e))?;
        }
        match call.images_to_fetch.is_empty() {
            true => Ok(call),
            false => self
                .inline_images(call)
                .await
                .map_err(|e| self.gateway.refused(e)),
        }
    }

    /// Makes an admitted call's reservation shared and durable, then forwards it.
    async fn forward(
        &self,
        mut admission: Admission,
        call: PreparedCall,
        route: &Route,
        origin: &Origin,
    ) -> Result<(Admission, UpstreamAnswer, tokio::time::Instant), GatewayError> {
        let deadline = tokio::time::Instant::now() + self.upstream.settings().total_timeout;
        let sent = async {
            // Counted on every replica's books, then on this one's, before the model
            // server starts on it.
            admission.reserve_shared().await?;
            admission.make_durable().await?;
            self.send(&mut admission, call, &route.served, origin).await
        };
        match tokio::time::timeout_at(deadline, sent).await {
            Ok(Ok(answer)) => Ok((admission, answer, deadline)),
            Ok(Err(e)) => Err(settle_failed(admission, e)),
            Err(_) => Err(settle_failed(admission, GatewayError::UpstreamTimeout)),
        }
    }

    /// A non-streaming call: forwarded, read whole, metered and settled. `read` is the
    /// door's reading of the answer; an answer it cannot read settles as the model
    /// server's failure (billed the usage it reports), not as a completed call.
    pub async fn complete<T>(
        &self,
        caller: &Caller,
        call: PreparedCall,
        origin: &Origin,
        read: impl FnOnce(&Bytes) -> Result<T, GatewayError>,
    ) -> Result<Completion<T>, GatewayError> {
        let route = self.route(&call.model)?;
        let mut completion = match self.cache_plan(caller, &call, &route, origin) {
            // Boxed: the cache's state machine is large, and an unboxed one is carried
            // (and copied) by every call's future, cached or not.
            Some(plan) => {
                Box::pin(self.complete_cached(caller, call, &route, origin, plan, read)).await?
            }
            None => {
                let (admission, answer, deadline) =
                    self.start(caller, call, &route, origin).await?;
                self.read_answer(caller, admission, answer, deadline, origin, read)
                    .await?
            }
        };
        completion.deprecation = route.deprecation;
        Ok(completion)
    }

    /// Reads a forwarded call's JSON answer whole, meters and settles it.
    async fn read_answer<T>(
        &self,
        caller: &Caller,
        mut admission: Admission,
        answer: UpstreamAnswer,
        deadline: tokio::time::Instant,
        origin: &Origin,
        read: impl FnOnce(&Bytes) -> Result<T, GatewayError>,
    ) -> Result<Completion<T>, GatewayError> {
        let settings = self.upstream.settings();
        let figures = admission.figures();
        let reading =
            answer.read_json(deadline, settings.idle_timeout, settings.max_response_bytes);
        let json = tokio::select! {
            json = reading => json,
            () = self.hard_stop.cancelled() => Err(GatewayError::ShuttingDown),
        };
        let json = match json {
            Ok(json) => json,
            Err(e) => return Err(settle_failed(admission, e)),
        };
        if let Some(usage) = json.usage {
            admission.observe_usage(usage);
        }
        if admission.traced() {
            for reason in trace::record_answer(&origin.span, &json.body) {
                admission.observe_finish_reason(&reason);
            }
        }
        let answer = match read(&json.body) {
            Ok(answer) => answer,
            Err(e) => {
                tracing::warn!(request_id = %origin.request_id, error = %e, "the model server sent an answer the door cannot read");
                json.fail();
                return Err(settle_failed(admission, e));
            }
        };
        admission.mark_upstream_done();
        admission.keep_response_body(&json.body);
        let processing_ms = admission.elapsed_ms();
        admission.settle(CallOutcome::Completed, 200);
        Ok(Completion {
            body: json.body,
            answer,
            content_type: json.content_type,
            processing_ms,
            figures,
            remaining: caller.remaining(),
            deprecation: None,
            cache: None,
        })
    }

    /// A streaming call: forwarded, then relayed event by event by the returned [`Relay`].
    pub async fn stream(
        &self,
        caller: &Caller,
        call: PreparedCall,
        origin: &Origin,
        view: UsageView,
    ) -> Result<StreamStart, GatewayError> {
        let route = self.route(&call.model)?;
        let plan = self.cache_plan(caller, &call, &route, origin);
        let mut keep = None;
        if let Some(plan) = plan {
            match Box::pin(self.stream_hit(caller, &call, &route, origin, &plan, view)).await? {
                Some(mut hit) => {
                    hit.deprecation = route.deprecation;
                    return Ok(hit);
                }
                None => keep = Some(plan.keep()),
            }
        }
        let settings = self.upstream.settings();
        let endpoint = call.endpoint;
        let (admission, answer, deadline) = self.start(caller, call, &route, origin).await?;
        let events = match answer.into_events(settings.max_event_bytes) {
            Ok(events) => events,
            Err(e) => return Err(settle_failed(admission, e)),
        };
        let figures = admission.figures();
        let remaining = admission.remaining();
        let cache = keep.as_ref().map(|_| CacheStatus::Miss);
        if admission.upstream_cap().is_some() {
            // An answer held short by this key's quota is not the answer to the request.
            keep = None;
        }
        Ok(StreamStart {
            relay: Relay::Upstream(
                UpstreamRelay::new(
                    events,
                    admission,
                    endpoint,
                    view,
                    settings.idle_timeout,
                    deadline,
                    &self.hard_stop,
                )
                .keeping(keep),
            ),
            figures,
            remaining,
            deprecation: route.deprecation,
            cache,
        })
    }

    /// The response cache's figures (zero when it is off).
    pub fn cache_stats(&self) -> CacheStats {
        self.cache.as_ref().map(|c| c.stats()).unwrap_or_default()
    }

    /// The upstream's model list (OpenAI JSON), keeping the models `caller` may use.
    pub async fn models(
        &self,
        caller: &Caller,
        request_id: &str,
    ) -> Result<serde_json::Value, GatewayError> {
        let mut list = self.upstream.models(request_id).await?;
        let catalogue = self.gateway.catalogue();
        // A served name the catalogue knows (a version) is listed to the keys its model
        // is listed to; other names as the key's allowlist says.
        let may_use = |id: &str| match catalogue.model_of(id) {
            Some(model) => {
                caller.record.allows_model(&model.name) || caller.record.allows_model(id)
            }
            None => caller.record.allows_model(id),
        };
        if let Some(serde_json::Value::Array(models)) = list.get_mut("data") {
            models.retain(|m| {
                m.get("id")
                    .and_then(serde_json::Value::as_str)
                    .is_some_and(|id| {
                        may_use(id) && catalogue.model_of(id).is_none_or(|m| m.name != id)
                    })
            });
            for model in self.gateway.list_models() {
                let whole = caller.record.allows_model(&model.name);
                if whole
                    || model
                        .versions
                        .iter()
                        .any(|v| caller.record.allows_model(&v.name))
                {
                    models.push(catalogue_entry(&model, |v| {
                        whole || caller.record.allows_model(v)
                    }));
                }
            }
        }
        Ok(list)
    }
}

/// A catalogue model in the OpenAI list's shape (`id`, `object`, `created`, `owned_by`),
/// with its versions as an extra member SDKs ignore: each with `default`, the rollout's
/// `rollout_weight`, and its deprecation.
fn catalogue_entry(model: &ModelRecord, listed: impl Fn(&str) -> bool) -> serde_json::Value {
    let versions: Vec<serde_json::Value> = model
        .versions
        .iter()
        .filter(|v| listed(&v.name))
        .map(|v| {
            let weight = match &model.rollout {
                Some(r) if r.version == v.name => Some(r.weight),
                Some(r) if v.name == model.default_version => Some(100 - r.weight),
                _ => None,
            };
            serde_json::json!({
                "id": v.name,
                "default": v.name == model.default_version,
                "rollout_weight": weight,
                "deprecated_at": v.deprecated_at,
                "sunset_at": v.sunset_at,
            })
        })
        .collect();
    serde_json::json!({
        "id": model.name,
        "object": "model",
        "created": model.created_at,
        "owned_by": "step3-gateway",
        "aliases": model.aliases,
        "default_version": model.default_version,
        "versions": versions,
    })
}

fn prepare_with(
    endpoint: Endpoint,
    body: Bytes,
    options: &RequestOptions,
) -> Result<PreparedCall, GatewayError> {
    match endpoint {
        Endpoint::ChatCompletions => prepare_chat(body, options),
        Endpoint::Completions => prepare_completion(body, options),
        Endpoint::Embeddings => prepare_embedding(body, options),
        Endpoint::Responses => prepare_response(body, options),
    }
}

/// Settles a call that failed before its answer with the status the client is told, and
/// passes the error on.
fn settle_failed(admission: Admission, e: GatewayError) -> GatewayError {
    let outcome = match &e {
        GatewayError::Upstream { .. } => CallOutcome::UpstreamError,
        GatewayError::UpstreamTimeout => CallOutcome::TimedOut,
        GatewayError::ShuttingDown => CallOutcome::Cancelled,
        _ => CallOutcome::UpstreamFailed,
    };
    admission.settle(outcome, e.http_status());
    e
}
