//! The backends serving models: routing by model to the least loaded healthy backend,
//! active and passive health, retries where they are safe, and reload without dropping
//! calls in flight.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderName, HeaderValue, Method, Request, Uri};
use serde::Serialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::answer::UpstreamAnswer;
use super::backend::{Backend, BackendLease, BackendSettings, HealthCheck};
use super::client::{HttpClient, RequestBody, UpstreamResponse};
use super::{
    REQUEST_ID_HEADER, error_chain, error_from_response, is_timeout, read_bounded, transport_error,
};
use crate::core::error::GatewayError;
use crate::core::request::Endpoint;
use crate::core::time::{monotonic_ms, now_unix};

/// How the pool behaves.
#[derive(Clone, Debug)]
pub struct PoolSettings {
    pub backends: Vec<BackendSettings>,
    /// Client-facing model name → served name.
    pub aliases: HashMap<String, String>,
    pub connect_timeout: Duration,
    /// Until the answer's headers (for JSON answers, that is the whole generation).
    pub first_byte_timeout: Duration,
    /// The longest silence while reading a JSON answer; the longest wait for the next
    /// whole event of a stream.
    pub idle_timeout: Duration,
    /// A whole call, stream included.
    pub total_timeout: Duration,
    /// Largest JSON answer held whole; a larger one is dropped and answered 502.
    pub max_response_bytes: usize,
    /// Largest single SSE event (one line without its end, in practice) held while
    /// waiting for its end; a larger one ends the stream.
    pub max_event_bytes: usize,
    /// Further attempts, on another backend when there is one, when nothing reached the client.
    pub max_retries: u32,
    /// Consecutive failures that eject a backend, and for how long.
    pub eject_after_failures: u32,
    pub eject_for: Duration,
    pub health_interval: Duration,
    pub health_timeout: Duration,
}

/// The least time between two health checks that failed calls ask for.
const RECHECK_GAP: Duration = Duration::from_millis(250);

/// What `/health`, metrics and the admin API show of a backend.
#[derive(Clone, Debug, Serialize)]
pub struct BackendStatus {
    pub name: String,
    /// Not shown on `/health` (which needs no key): the network's inside stays inside.
    #[serde(skip)]
    pub url: String,
    pub healthy: bool,
    pub ejected: bool,
    pub in_flight: u32,
    pub errors: u64,
    pub models: Vec<String>,
    /// When the last active health check ran (seconds since the epoch).
    pub checked_at: Option<i64>,
    /// Why the last health check failed (no address, no secret); `None` when it passed.
    pub last_error: Option<String>,
}

/// The backends and the one HTTP client to all of them.
pub struct UpstreamPool {
    client: HttpClient,
    settings: RwLock<Arc<PoolSettings>>,
    backends: RwLock<Arc<Vec<Arc<Backend>>>>,
    /// Spreads ties between equally loaded backends.
    next: AtomicUsize,
    /// Rings when a backend failed a call: its health is checked at once.
    recheck: Arc<Notify>,
}

impl UpstreamPool {
    pub fn new(settings: PoolSettings) -> Result<Self, GatewayError> {
        // A redirect is answered as the error it is: a model server has no business sending
        // a prompt elsewhere, and the client follows none.
        let client = HttpClient::new(settings.connect_timeout).map_err(|e| {
            GatewayError::UpstreamUnavailable(format!("cannot build HTTP client: {e}"))
        })?;
        let recheck = Arc::new(Notify::new());
        let backends = build_backends(&settings.backends, &[], &recheck)?;
        Ok(UpstreamPool {
            client,
            settings: RwLock::new(Arc::new(settings)),
            backends: RwLock::new(Arc::new(backends)),
            next: AtomicUsize::new(0),
            recheck,
        })
    }

    pub fn settings(&self) -> Arc<PoolSettings> {
        self.settings
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn backends(&self) -> Arc<Vec<Arc<Backend>>> {
        self.backends
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces the backend list and routing. Calls in flight keep their backend; a backend
    /// with the same name and URL keeps its health and counters.
    pub fn reload(&self, settings: PoolSettings) -> Result<(), GatewayError> {
        let current = self.backends();
        let backends = build_backends(&settings.backends, &current, &self.recheck)?;
        *self.backends.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(backends);
        *self.settings.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(settings);
        tracing::info!(backends = self.backends().len(), "upstream list reloaded");
        Ok(())
    }

    /// The served name for a client-facing model name.
    pub fn resolve_model<'a>(&self, model: &'a str) -> std::borrow::Cow<'a, str> {
        match self.settings().aliases.get(model) {
            Some(served) => std::borrow::Cow::Owned(served.clone()),
            None => std::borrow::Cow::Borrowed(model),
        }
    }

    /// Whether some backend, healthy or not, serves `model` (a served name): one whose
    /// configured model list names it, or that lists none (it serves whatever it serves).
    pub fn serves_model(&self, model: &str) -> bool {
        self.backends().iter().any(|b| b.serves(model))
    }

    /// Whether any backend is healthy (gRPC health: NOT_SERVING when none).
    pub fn any_healthy(&self) -> bool {
        let now = monotonic_ms();
        self.backends().iter().any(|b| b.is_healthy(now))
    }

    /// Whether `model` is one the configuration names (a bounded set, for metric labels).
    pub fn knows_model(&self, model: &str) -> bool {
        let settings = self.settings();
        settings.aliases.contains_key(model)
            || self.backends().iter().any(|b| {
                b.settings.models.iter().any(|m| m == model)
                    || b.reported_models
                        .read()
                        .unwrap_or_else(|p| p.into_inner())
                        .iter()
                        .any(|m| m == model)
            })
    }

    pub fn status(&self) -> Vec<BackendStatus> {
        let now = monotonic_ms();
        self.backends()
            .iter()
            .map(|b| {
                let check = b
                    .last_check
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                BackendStatus {
                    name: b.settings.name.clone(),
                    url: b.settings.url.clone(),
                    healthy: b.is_healthy(now),
                    ejected: b.ejected_until_ms.load(Ordering::Acquire) > now,
                    in_flight: b.in_flight.load(Ordering::Acquire),
                    errors: b.errors.load(Ordering::Relaxed),
                    models: b.settings.models.clone(),
                    checked_at: check.at,
                    last_error: check.error,
                }
            })
            .collect()
    }

    /// The least loaded healthy backend for `model`, avoiding `tried` when another exists.
    fn pick(&self, model: &str, tried: &[Arc<Backend>]) -> Option<Arc<Backend>> {
        let now = monotonic_ms();
        let backends = self.backends();
        let healthy: Vec<&Arc<Backend>> = backends
            .iter()
            .filter(|b| b.serves(model) && b.is_healthy(now))
            .collect();
        let fresh: Vec<&Arc<Backend>> = healthy
            .iter()
            .copied()
            .filter(|b| !tried.iter().any(|t| Arc::ptr_eq(t, b)))
            .collect();
        let pool = if fresh.is_empty() { healthy } else { fresh };
        if pool.is_empty() {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % pool.len();
        let mut best = pool[start];
        for offset in 1..pool.len() {
            let candidate = pool[(start + offset) % pool.len()];
            if candidate.less_loaded_than(best) {
                best = candidate;
            }
        }
        Some(best.clone())
    }

    /// Sends a call of `endpoint` for `model` (the served name). Retries on another backend
    /// when the attempt failed before any answer (refused, reset, 502, 503); a non-2xx answer
    /// becomes [`GatewayError::Upstream`].
    pub async fn send(
        &self,
        endpoint: Endpoint,
        model: &str,
        body: Bytes,
        request_id: &str,
        traceparent: Option<&str>,
    ) -> Result<UpstreamAnswer, GatewayError> {
        let settings = self.settings();
        let mut tried: Vec<Arc<Backend>> = Vec::new();
        let mut last_error = None;
        for _attempt in 0..=settings.max_retries {
            let Some(backend) = self.pick(model, &tried) else {
                break;
            };
            tried.push(backend.clone());
            let lease = BackendLease::new(
                backend.clone(),
                settings.eject_after_failures,
                settings.eject_for,
            );
            // An id the edge made or accepted is a valid header value; one that is not is
            // left out rather than failing the call.
            let id_header = HeaderValue::from_str(request_id).ok();
            let traceparent_header = traceparent.and_then(|t| HeaderValue::from_str(t).ok());
            let build = || {
                let mut request =
                    request_to(Method::POST, backend.url(endpoint), &backend, body.clone());
                let headers = request.headers_mut();
                headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                // W3C trace context: the model server's spans join the call's trace.
                if let Some(traceparent) = &traceparent_header {
                    headers.insert(HeaderName::from_static("traceparent"), traceparent.clone());
                }
                if let Some(id) = &id_header {
                    headers.insert(HeaderName::from_static(REQUEST_ID_HEADER), id.clone());
                }
                request
            };
            let sent =
                match tokio::time::timeout(settings.first_byte_timeout, self.client.send(build))
                    .await
                {
                    Ok(sent) => sent,
                    Err(_) => {
                        // The model may be working on it: not safe to send again.
                        backend.record_failure(settings.eject_after_failures, settings.eject_for);
                        return Err(GatewayError::UpstreamTimeout);
                    }
                };
            match sent {
                Ok(response) if response.status().is_success() => {
                    backend.record_success();
                    return Ok(UpstreamAnswer { response, lease });
                }
                Ok(response) => {
                    let status = response.status().as_u16();
                    let error = error_from_response(response, settings.idle_timeout).await;
                    if status >= 500 {
                        backend.record_failure(settings.eject_after_failures, settings.eject_for);
                    } else {
                        backend.record_success();
                    }
                    if matches!(status, 502 | 503) {
                        tracing::warn!(backend = %backend.name(), status, request_id, "backend refused; trying another");
                        last_error = Some(error);
                        continue;
                    }
                    return Err(error);
                }
                Err(e) => {
                    backend.record_failure(settings.eject_after_failures, settings.eject_for);
                    tracing::warn!(backend = %backend.name(), error = %error_chain(&e), request_id, "backend unreachable");
                    last_error = Some(transport_error(&e));
                }
            }
        }
        Err(
            last_error.unwrap_or_else(|| GatewayError::NoHealthyBackend {
                model: model.to_owned(),
            }),
        )
    }

    /// The models of the healthy backends (each once), plus the configured aliases.
    pub async fn models(&self, request_id: &str) -> Result<serde_json::Value, GatewayError> {
        let now = monotonic_ms();
        let backends: Vec<Arc<Backend>> = self
            .backends()
            .iter()
            .filter(|b| b.is_healthy(now))
            .cloned()
            .collect();
        if backends.is_empty() {
            return Err(GatewayError::NoHealthyBackend {
                model: "any".into(),
            });
        }
        let settings = self.settings();
        let timeout = settings.first_byte_timeout.min(Duration::from_secs(30));
        let mut data: Vec<serde_json::Value> = Vec::new();
        let mut last_error = None;
        let id_header = HeaderValue::from_str(request_id).ok();
        for backend in backends {
            let build = || {
                let mut request = request_to(
                    Method::GET,
                    &backend.models_url,
                    &backend,
                    RequestBody::default(),
                );
                if let Some(id) = &id_header {
                    request
                        .headers_mut()
                        .insert(HeaderName::from_static(REQUEST_ID_HEADER), id.clone());
                }
                request
            };
            // `timeout` bounds the whole exchange, the list's bytes included.
            let fetch = async {
                match self.client.send(build).await {
                    Ok(response) if response.status().is_success() => {
                        read_bounded(response, settings.max_response_bytes, timeout).await
                    }
                    Ok(response) => Err(error_from_response(response, timeout).await),
                    Err(e) => Err(transport_error(&e)),
                }
            };
            let list = tokio::time::timeout(timeout, fetch)
                .await
                .unwrap_or(Err(GatewayError::UpstreamTimeout));
            match list.and_then(|body| {
                serde_json::from_slice::<serde_json::Value>(&body).map_err(|e| {
                    GatewayError::Upstream {
                        status: 502,
                        message: format!("the model server sent an unreadable model list: {e}"),
                        kind: Some("upstream_error".into()),
                        param: None,
                        code: None,
                    }
                })
            }) {
                Ok(list) => {
                    for model in list
                        .get("data")
                        .and_then(|d| d.as_array())
                        .into_iter()
                        .flatten()
                    {
                        let id = model.get("id").and_then(|i| i.as_str()).unwrap_or_default();
                        if backend.serves(id)
                            && !data.iter().any(|m| m.get("id") == model.get("id"))
                        {
                            data.push(model.clone());
                        }
                    }
                }
                Err(e) => last_error = Some(e),
            }
        }
        if data.is_empty()
            && let Some(e) = last_error
        {
            return Err(e);
        }
        for (alias, served) in &self.settings().aliases {
            if let Some(target) = data
                .iter()
                .find(|m| m.get("id").and_then(|i| i.as_str()) == Some(served))
            {
                let mut entry = target.clone();
                entry["id"] = alias.clone().into();
                entry["root"] = served.clone().into();
                data.push(entry);
            }
        }
        Ok(serde_json::json!({"object": "list", "data": data}))
    }

    /// Checks every backend's `/health` once.
    pub async fn check_health(&self) {
        let settings = self.settings();
        let backends = self.backends();
        let checks = backends.iter().cloned().map(|backend| {
            let client = self.client.clone();
            let timeout = settings.health_timeout;
            let limit = settings.max_response_bytes;
            async move {
                let build = || {
                    request_to(
                        Method::GET,
                        &backend.health_url,
                        &backend,
                        RequestBody::default(),
                    )
                };
                let late = || {
                    Some(format!(
                        "its /health did not answer within {} ms",
                        timeout.as_millis()
                    ))
                };
                let error = match tokio::time::timeout(timeout, client.send(build)).await {
                    Ok(Ok(r)) if r.status().is_success() => None,
                    Ok(Ok(r)) => Some(format!("its /health answered HTTP {}", r.status().as_u16())),
                    Ok(Err(e)) if is_timeout(&e) => late(),
                    Err(_) => late(),
                    // The address stays out of what `/health` shows.
                    Ok(Err(e)) => Some(transport_error(&e).to_string()),
                };
                let healthy = error.is_none();
                if healthy {
                    refresh_models(&client, &backend, timeout, limit).await;
                }
                let was = backend.checked_healthy.swap(healthy, Ordering::AcqRel);
                if was != healthy {
                    tracing::warn!(backend = %backend.name(), healthy, error = error.as_deref().unwrap_or_default(), "backend health changed");
                }
                *backend
                    .last_check
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = HealthCheck {
                    at: Some(now_unix()),
                    error,
                };
            }
        });
        futures_util::future::join_all(checks).await;
    }

    /// Checks health every `health_interval` until `stop`, and at once (at most every
    /// [`RECHECK_GAP`]) when a backend failed a call, so that a dead backend is known dead
    /// before the next call finds out.
    pub fn spawn_health_checks(self: &Arc<Self>, stop: CancellationToken) {
        let pool = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                pool.check_health().await;
                let interval = pool.settings().health_interval;
                let next = tokio::time::sleep(interval);
                tokio::select! {
                    () = next => {}
                    () = async {
                        tokio::time::sleep(RECHECK_GAP.min(interval)).await;
                        pool.recheck.notified().await;
                    } => {}
                    () = stop.cancelled() => break,
                }
            }
        });
    }
}

/// Remembers what a backend serves (at most 64 names), for metric labels.
async fn refresh_models(client: &HttpClient, backend: &Backend, timeout: Duration, limit: usize) {
    let build = || {
        request_to(
            Method::GET,
            &backend.models_url,
            backend,
            RequestBody::default(),
        )
    };
    let fetch = async {
        let response: UpstreamResponse = client.send(build).await.ok()?;
        read_bounded(response, limit, timeout).await.ok()
    };
    let Ok(Some(body)) = tokio::time::timeout(timeout, fetch).await else {
        return;
    };
    let Ok(list) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return;
    };
    let models: Vec<String> = list
        .get("data")
        .and_then(|d| d.as_array())
        .into_iter()
        .flatten()
        .filter_map(|m| m.get("id")?.as_str().map(str::to_owned))
        .take(64)
        .collect();
    *backend
        .reported_models
        .write()
        .unwrap_or_else(|p| p.into_inner()) = models;
}

/// A request to a backend with what every request to it carries: the backend's own key
/// (never the client's) and `accept: */*` (as reqwest sent it).
fn request_to(
    method: Method,
    uri: &Uri,
    backend: &Backend,
    body: RequestBody,
) -> Request<RequestBody> {
    let mut request = Request::new(body);
    *request.method_mut() = method;
    *request.uri_mut() = uri.clone();
    let headers = request.headers_mut();
    // The most a request carries: these two, content type and request id.
    headers.reserve(4);
    headers.insert(ACCEPT, HeaderValue::from_static("*/*"));
    if let Some(authorization) = &backend.authorization {
        headers.insert(AUTHORIZATION, authorization.clone());
    }
    request
}

fn build_backends(
    settings: &[BackendSettings],
    current: &[Arc<Backend>],
    recheck: &Arc<Notify>,
) -> Result<Vec<Arc<Backend>>, GatewayError> {
    settings
        .iter()
        .map(|s| {
            match current
                .iter()
                .find(|b| b.settings.name == s.name && b.settings.url == s.url && b.settings == *s)
            {
                Some(existing) => Ok(existing.clone()),
                None => Backend::new(s.clone(), recheck.clone()).map(Arc::new),
            }
        })
        .collect()
}

impl std::fmt::Debug for UpstreamPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamPool")
            .field("backends", &self.backends().len())
            .finish()
    }
}
