//! The OpenAI-compatible REST door (axum): routes, request ids, and error bodies.

mod admin;
mod chat;
pub mod error;
mod info;

pub(crate) use chat::add_limit_headers;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use rand::RngExt;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;

use crate::chat::ChatPath;
use crate::core::{Gateway, GatewayError, keys};
use crate::metrics::{Door, Metrics};
use crate::upstream::REQUEST_ID_HEADER;

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
    pub chat: ChatPath,
    pub settings: Arc<RestSettings>,
}

impl AppState {
    pub fn gateway(&self) -> &Gateway {
        &self.chat.gateway
    }
}

/// The request's id, as taken from `x-request-id` or generated.
#[derive(Clone, Debug)]
pub struct RequestId(pub String);

/// The REST routes, with `grpc` (the gRPC services' routes) merged in when given, behind
/// one fallback: gRPC `UNIMPLEMENTED` for gRPC requests, a JSON 404 for the rest.
pub fn router(state: AppState, grpc: Option<Router>) -> Router {
    let metrics = state.gateway().metrics().clone();
    let rest = Router::new()
        .route("/", get(info::root))
        .route("/health", get(info::health))
        .route("/metrics", get(info::metrics))
        .route("/v1/models", get(info::models))
        .route("/v1/usage", get(info::usage))
        .route("/v1/chat/completions", post(chat::chat_completions))
        .nest("/admin/v1", admin::router())
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state);
    let router = match grpc {
        Some(grpc) => rest.merge(grpc),
        None => rest,
    };
    with_common_layers(router.fallback(not_found), metrics)
}

/// A router with only the gRPC services (for a separate gRPC port).
pub fn grpc_only(grpc: Router, metrics: Arc<Metrics>) -> Router {
    with_common_layers(grpc.fallback(not_found), metrics)
}

fn with_common_layers(router: Router, metrics: Arc<Metrics>) -> Router {
    router
        .layer(CatchPanicLayer::custom(panic_response))
        // One middleware for the id and the metrics: each layer of `from_fn` boxes a future
        // per request. Outside the panic guard, so a panic is counted as the 500 it becomes.
        .layer(middleware::from_fn_with_state(metrics, track_request))
        .layer(SetSensitiveRequestHeadersLayer::new([
            header::AUTHORIZATION,
        ]))
}

async fn not_found(request: Request) -> Response {
    if crate::grpc::is_grpc(request.headers()) {
        return crate::grpc::unimplemented(request.uri().path());
    }
    let message = format!(
        "Unknown request URL: {} {}.",
        request.method(),
        request.uri().path()
    );
    let body = error::error_body(&message, "invalid_request_error", None, Some("unknown_url"));
    (StatusCode::NOT_FOUND, axum::Json(body)).into_response()
}

async fn method_not_allowed(request: Request) -> Response {
    let message = format!(
        "Method {} is not allowed for {}.",
        request.method(),
        request.uri().path()
    );
    let body = error::error_body(
        &message,
        "invalid_request_error",
        None,
        Some("method_not_allowed"),
    );
    (StatusCode::METHOD_NOT_ALLOWED, axum::Json(body)).into_response()
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let body = error::error_body(
        "The gateway hit an internal error; the request was not completed.",
        "server_error",
        None,
        Some("internal_error"),
    );
    (StatusCode::INTERNAL_SERVER_ERROR, axum::Json(body)).into_response()
}

/// The model a response was about, for the `model` label of `step3gw_requests_total`.
#[derive(Clone, Debug)]
pub struct ModelLabel(pub String);

/// gRPC methods are labelled by name when they are ours; anything else is `unknown`.
const KNOWN_GRPC_PREFIXES: [&str; 4] = [
    "/step3.gateway.v1.",
    "/grpc.health.v1.",
    "/grpc.reflection.v1.",
    "/grpc.reflection.v1alpha.",
];

/// Gives every request its id (echoed in the response), counts it by door, route, model
/// and status, and times those that are not chat calls (a chat call is timed whole, stream
/// included, when it settles).
async fn track_request(
    axum::extract::State(metrics): axum::extract::State<Arc<Metrics>>,
    mut request: Request,
    next: Next,
) -> Response {
    let started = std::time::Instant::now();
    let id_header = give_request_id(&mut request);
    let grpc = crate::grpc::is_grpc(request.headers());
    let route = if grpc {
        let path = request.uri().path();
        if KNOWN_GRPC_PREFIXES.iter().any(|p| path.starts_with(p)) {
            path.to_owned()
        } else {
            "unknown".to_owned()
        }
    } else {
        request
            .extensions()
            .get::<axum::extract::MatchedPath>()
            .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned())
    };
    let mut response = next.run(request).await;
    let door = if grpc { Door::Grpc } else { Door::Rest };
    // A gRPC error without a body says so in its headers; otherwise the call began well.
    let status = if grpc {
        response
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("0")
            .to_owned()
    } else {
        response.status().as_u16().to_string()
    };
    // Unknown methods are one label, not one per made-up path.
    let route = if grpc && status == "12" {
        "unknown".to_owned()
    } else {
        route
    };
    let model = response
        .extensions()
        .get::<ModelLabel>()
        .map_or("", |m| m.0.as_str());
    metrics.request(door, &route, model, &status);
    let chat = route == "/v1/chat/completions"
        || route.starts_with("/step3.gateway.v1.Chat/") && route.ends_with("Complete");
    if !chat {
        metrics.request_duration(door, &route, started.elapsed());
    }
    if let Some(value) = id_header {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    response
}

/// Takes `x-request-id` from the request when it is sane, else makes one; returns the
/// header that echoes it.
fn give_request_id(request: &mut Request) -> Option<HeaderValue> {
    let id = request
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| is_sane_request_id(v))
        .map(str::to_owned)
        .unwrap_or_else(|| {
            let bytes: [u8; 12] = rand::rng().random();
            format!("req_{}", keys::to_hex(&bytes))
        });
    let value = HeaderValue::from_str(&id).ok();
    request.extensions_mut().insert(RequestId(id));
    value
}

fn is_sane_request_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// The token of `Authorization: Bearer <token>`.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token)
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
            if let Some(timeout) = cause.downcast_ref::<crate::server::BodyReadTimeout>() {
                return GatewayError::RequestTimeout {
                    secs: timeout.limit.as_secs(),
                };
            }
            source = cause.source();
        }
        GatewayError::invalid_request(format!("could not read the request body: {e}"), None)
    })
}
