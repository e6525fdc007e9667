//! One backend: its settings, its live state (load, failures, ejection, health) and the
//! lease a call holds on it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::Duration;

use http::{HeaderValue, Uri};
use tokio::sync::Notify;

use crate::core::GatewayError;
use crate::core::request::Endpoint;
use crate::core::time::{UnixTime, monotonic_ms};

/// One backend as configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendSettings {
    pub name: String,
    /// With or without the `/v1` suffix.
    pub url: String,
    /// Sent as the backend's own Bearer token (vLLM `--api-key`); never the client's key.
    pub api_key: Option<String>,
    /// The served model names; empty serves every model.
    pub models: Vec<String>,
    pub weight: u32,
}

/// A backend and its live state.
#[derive(Debug)]
pub struct Backend {
    pub(super) settings: BackendSettings,
    /// Where each API is, parsed once, in the order of [`Backend::url`].
    api_urls: [Uri; 4],
    pub(super) models_url: Uri,
    pub(super) health_url: Uri,
    pub(super) authorization: Option<HeaderValue>,
    pub(super) in_flight: AtomicU32,
    pub(super) consecutive_failures: AtomicU32,
    pub(super) ejected_until_ms: AtomicU64,
    /// The last active health check passed (true until the first check says otherwise).
    pub(super) checked_healthy: AtomicBool,
    /// The models the backend listed at its last health check (bounded, for metric labels).
    pub(super) reported_models: RwLock<Vec<String>>,
    pub(super) errors: AtomicU64,
    /// What the last active health check found, for `/health`.
    pub(super) last_check: Mutex<HealthCheck>,
    /// Wakes the pool's health checks: a backend that failed a call is checked at once.
    recheck: Arc<Notify>,
}

/// The result of a backend's last active health check.
#[derive(Clone, Debug, Default)]
pub struct HealthCheck {
    /// When it ran (seconds since the epoch).
    pub at: Option<UnixTime>,
    /// Why it failed; `None` when it passed.
    pub error: Option<String>,
}

impl Backend {
    pub(super) fn new(
        settings: BackendSettings,
        recheck: Arc<Notify>,
    ) -> Result<Self, GatewayError> {
        let base = settings.url.trim_end_matches('/');
        // Accept both `http://host:8000` and `http://host:8000/v1`.
        let api = if base.ends_with("/v1") {
            base.to_owned()
        } else {
            format!("{base}/v1")
        };
        let root = api.trim_end_matches("/v1").to_owned();
        let authorization = match &settings.api_key {
            Some(key) => {
                let mut value = HeaderValue::from_str(&format!("Bearer {key}")).map_err(|_| {
                    GatewayError::UpstreamUnavailable(format!(
                        "the API key of backend `{}` is not a valid header value",
                        settings.name
                    ))
                })?;
                value.set_sensitive(true);
                Some(value)
            }
            None => None,
        };
        let url = |url: String| parse_url(&url, &settings.name);
        let api_url = |endpoint: Endpoint| url(format!("{api}/{}", endpoint.path()));
        Ok(Backend {
            api_urls: [
                api_url(Endpoint::ChatCompletions)?,
                api_url(Endpoint::Completions)?,
                api_url(Endpoint::Embeddings)?,
                api_url(Endpoint::Responses)?,
            ],
            models_url: url(format!("{api}/models"))?,
            health_url: url(format!("{root}/health"))?,
            authorization,
            settings,
            in_flight: AtomicU32::new(0),
            consecutive_failures: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            checked_healthy: AtomicBool::new(true),
            reported_models: RwLock::new(Vec::new()),
            errors: AtomicU64::new(0),
            last_check: Mutex::new(HealthCheck::default()),
            recheck,
        })
    }

    /// The URL of `endpoint` on this backend.
    pub(super) fn url(&self, endpoint: Endpoint) -> &Uri {
        let i = match endpoint {
            Endpoint::ChatCompletions => 0,
            Endpoint::Completions => 1,
            Endpoint::Embeddings => 2,
            Endpoint::Responses => 3,
        };
        &self.api_urls[i]
    }

    pub fn name(&self) -> &str {
        &self.settings.name
    }

    pub(super) fn serves(&self, model: &str) -> bool {
        self.settings.models.is_empty() || self.settings.models.iter().any(|m| m == model)
    }

    pub(super) fn is_healthy(&self, now_ms: u64) -> bool {
        self.checked_healthy.load(Ordering::Acquire)
            && self.ejected_until_ms.load(Ordering::Acquire) <= now_ms
    }

    pub(super) fn record_success(&self) {
        self.consecutive_failures.store(0, Ordering::Release);
    }

    /// A connect error, reset or 5xx: enough of them in a row eject the backend for a while.
    pub(super) fn record_failure(&self, eject_after: u32, eject_for: Duration) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.recheck.notify_one();
        let failures = self.consecutive_failures.fetch_add(1, Ordering::AcqRel) + 1;
        if failures >= eject_after {
            let until = monotonic_ms() + u64::try_from(eject_for.as_millis()).unwrap_or(u64::MAX);
            self.ejected_until_ms.store(until, Ordering::Release);
            self.consecutive_failures.store(0, Ordering::Release);
            tracing::warn!(backend = %self.settings.name, failures, eject_secs = eject_for.as_secs(), "backend ejected");
        }
    }

    /// Whether `self` is less loaded than `other`, by in-flight calls per unit of weight.
    pub(super) fn less_loaded_than(&self, other: &Backend) -> bool {
        let mine = u64::from(self.in_flight.load(Ordering::Acquire))
            * u64::from(other.settings.weight.max(1));
        let theirs = u64::from(other.in_flight.load(Ordering::Acquire))
            * u64::from(self.settings.weight.max(1));
        mine < theirs
    }
}

/// An absolute `http` or `https` URL with a host: what the client can connect to.
fn parse_url(url: &str, backend: &str) -> Result<Uri, GatewayError> {
    let invalid = |why: &dyn std::fmt::Display| {
        GatewayError::UpstreamUnavailable(format!(
            "the URL of backend `{backend}` is not valid: {why}"
        ))
    };
    let uri: Uri = url.parse().map_err(|e| invalid(&e))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err(invalid(&"the scheme must be http or https")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(invalid(&"it names no host"));
    }
    Ok(uri)
}

/// A call in flight on a backend: counted until dropped.
#[derive(Debug)]
pub struct BackendLease {
    backend: Arc<Backend>,
    /// The pool's ejection settings when the call began.
    eject_after: u32,
    eject_for: Duration,
}

impl BackendLease {
    /// A lease whose failure counts with the pool's ejection settings of the moment.
    pub(super) fn new(backend: Arc<Backend>, eject_after: u32, eject_for: Duration) -> Self {
        backend.in_flight.fetch_add(1, Ordering::AcqRel);
        BackendLease {
            backend,
            eject_after,
            eject_for,
        }
    }

    /// The backend failed this call after its answer began (a stream broken off, an
    /// unreadable answer): it counts towards ejecting the backend.
    pub fn fail(&self) {
        self.backend
            .record_failure(self.eject_after, self.eject_for);
    }
}

impl Drop for BackendLease {
    fn drop(&mut self) {
        self.backend.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}
