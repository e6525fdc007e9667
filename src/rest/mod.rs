//! The OpenAI-compatible REST door (axum): routes, handlers and error bodies over the
//! shared call path and core. It knows nothing of the gRPC door.

mod admin;
mod calls;
pub mod error;
mod info;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use serde::de::DeserializeOwned;
use tower_http::cors::{AllowOrigin, CorsLayer, ExposeHeaders};

use crate::call::CallPath;
use crate::core::request::field_error;
use crate::core::{Gateway, GatewayError};
use crate::edge::{BodyReadTimeout, error_body};
use crate::metrics::Metrics;

/// Settings of the REST door.
#[derive(Clone, Debug)]
pub struct RestSettings {
    pub max_body_bytes: usize,
    /// Add the tutorial's `metadata` object to JSON completions.
    pub response_metadata: bool,
    pub health_timeout: Duration,
    /// Browser origins the OpenAI API answers (`*` for any); empty: none.
    pub cors_allowed_origins: Vec<String>,
}

/// What every handler shares; axum clones it for each request, so it is a few `Arc`s
/// (`CallPath` alone is ten, and a cancellation token whose clone takes a lock).
#[derive(Clone)]
pub struct AppState {
    pub call: Arc<CallPath>,
    pub settings: Arc<RestSettings>,
    /// Rendered at `/metrics`.
    pub metrics: Arc<Metrics>,
}

impl AppState {
    pub fn gateway(&self) -> &Gateway {
        &self.call.gateway
    }
}

/// The REST routes (no fallback: the port's router gives one for both doors).
pub fn routes(state: AppState) -> Router {
    let api = Router::new()
        .route("/v1/models", get(info::models))
        .route("/v1/models/{*id}", get(info::model))
        .route("/v1/usage", get(info::usage))
        .route("/v1/tokens", post(info::create_token))
        .route("/v1/chat/completions", post(calls::chat_completions))
        .route("/v1/completions", post(calls::completions))
        .route("/v1/embeddings", post(calls::embeddings))
        .route("/v1/responses", post(calls::responses))
        // Before the CORS layer, so that the layer answers preflights (OPTIONS) first.
        .method_not_allowed_fallback(method_not_allowed);
    // Only the OpenAI API answers browsers of other origins: the admin API, `/health` and
    // `/metrics` never do (no CORS headers, so a browser keeps their answers from the page).
    let api = match cors(&state.settings.cors_allowed_origins) {
        Some(cors) => api.layer(cors),
        None => api,
    };
    Router::new()
        .route("/", get(info::root))
        .route("/health", get(info::health))
        .route("/metrics", get(info::metrics))
        .nest("/admin/v1", admin::router())
        .method_not_allowed_fallback(method_not_allowed)
        .merge(api)
        .with_state(state)
}

/// The CORS answer for `origins` (already checked by the config); `None` when empty.
/// Credentials (cookies) are never allowed: clients send their key as a bearer token.
fn cors(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let allow_origin = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow_origin)
            .allow_methods([Method::GET, Method::POST])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                HeaderName::from_static("x-request-id"),
                // What the OpenAI SDKs add in a browser.
                HeaderName::from_static("openai-organization"),
                HeaderName::from_static("openai-project"),
                HeaderName::from_static("x-stainless-arch"),
                HeaderName::from_static("x-stainless-lang"),
                HeaderName::from_static("x-stainless-os"),
                HeaderName::from_static("x-stainless-package-version"),
                HeaderName::from_static("x-stainless-retry-count"),
                HeaderName::from_static("x-stainless-runtime"),
                HeaderName::from_static("x-stainless-runtime-version"),
                HeaderName::from_static("x-stainless-timeout"),
            ])
            .expose_headers(ExposeHeaders::any())
            .max_age(Duration::from_secs(600)),
    )
}

async fn method_not_allowed(request: Request) -> Response {
    let message = format!(
        "Method {} is not allowed for {}.",
        request.method(),
        request.uri().path()
    );
    let body = error_body(
        &message,
        "invalid_request_error",
        None,
        Some("method_not_allowed"),
    );
    (StatusCode::METHOD_NOT_ALLOWED, axum::Json(body)).into_response()
}

/// Reads a request body up to `limit` bytes. The connection's body deadline
/// (`server.body_read_timeout_secs`) bounds how long that may take.
pub async fn read_body(body: Body, limit: usize) -> Result<Bytes, GatewayError> {
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let mut source = std::error::Error::source(&e);
        while let Some(cause) = source {
            if cause.is::<http_body_util::LengthLimitError>() {
                return GatewayError::BodyTooLarge { limit };
            }
            if let Some(timeout) = cause.downcast_ref::<BodyReadTimeout>() {
                return GatewayError::RequestTimeout {
                    secs: timeout.limit.as_secs(),
                };
            }
            source = cause.source();
        }
        GatewayError::invalid_request(format!("could not read the request body: {e}"), None)
    })
}

/// A JSON body of the REST door's own routes (admin, tokens), its mistakes in the OpenAI
/// error shape with `param` naming the field.
pub(super) fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, GatewayError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            GatewayError::invalid_request(format!("the body is not valid JSON: {inner}"), None)
        } else {
            field_error(&path, &inner.to_string())
        }
    })?;
    de.end().map_err(|e| {
        GatewayError::invalid_request(format!("the body is not one JSON value: {e}"), None)
    })?;
    Ok(value)
}
