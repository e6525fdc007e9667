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
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;

use crate::call::CallPath;
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
}

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub call: CallPath,
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
    Router::new()
        .route("/", get(info::root))
        .route("/health", get(info::health))
        .route("/metrics", get(info::metrics))
        .route("/v1/models", get(info::models))
        .route("/v1/models/{*id}", get(info::model))
        .route("/v1/usage", get(info::usage))
        .route("/v1/chat/completions", post(calls::chat_completions))
        .route("/v1/completions", post(calls::completions))
        .route("/v1/embeddings", post(calls::embeddings))
        .route("/v1/responses", post(calls::responses))
        .nest("/admin/v1", admin::router())
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
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
