//! The router a port serves: the doors' routes, one fallback for both protocols (gRPC
//! `UNIMPLEMENTED` for gRPC requests, an OpenAI-style 404 for the rest), the panic guard,
//! and the middleware that gives each request its id and counts it.

use std::sync::Arc;

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;

use super::client_addr::{self, ClientAddr, PeerAddr};
use super::{ModelLabel, REQUEST_ID_HEADER, RequestId, error_body, grpc_status_response, is_grpc};
use crate::core::access::IpAllowlist;
use crate::core::events::Door;
use crate::metrics::Metrics;

/// What the edge does to every request of a port, besides routing it.
pub struct Edge {
    pub metrics: Arc<Metrics>,
    /// Proxies whose `X-Forwarded-For` / `X-Real-IP` name the client; `None`: nobody's.
    pub trusted_proxies: Option<IpAllowlist>,
}

/// `routes` (REST, gRPC, or both merged) as one port serves them.
pub fn serve(routes: Router, edge: Arc<Edge>) -> Router {
    routes
        .fallback(not_found)
        .layer(CatchPanicLayer::custom(panic_response))
        // One middleware for the id, the client's address and the metrics: each layer of
        // `from_fn` boxes a future per request. Outside the panic guard, so a panic is
        // counted as the 500 it becomes.
        .layer(middleware::from_fn_with_state(edge, track_request))
        .layer(SetSensitiveRequestHeadersLayer::new([
            header::AUTHORIZATION,
        ]))
}

async fn not_found(request: Request) -> Response {
    if is_grpc(request.headers()) {
        return grpc_status_response(tonic::Status::unimplemented(format!(
            "unknown method {}",
            request.uri().path()
        )));
    }
    let message = format!(
        "Unknown request URL: {} {}.",
        request.method(),
        request.uri().path()
    );
    let body = error_body(&message, "invalid_request_error", None, Some("unknown_url"));
    (StatusCode::NOT_FOUND, axum::Json(body)).into_response()
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let body = error_body(
        "The gateway hit an internal error; the request was not completed.",
        "server_error",
        None,
        Some("internal_error"),
    );
    (StatusCode::INTERNAL_SERVER_ERROR, axum::Json(body)).into_response()
}

/// gRPC methods are labelled by name when they are ours; anything else is `unknown`.
const KNOWN_GRPC_PREFIXES: [&str; 4] = [
    "/step3.gateway.v1.",
    "/grpc.health.v1.",
    "/grpc.reflection.v1.",
    "/grpc.reflection.v1alpha.",
];

/// Gives every request its id (echoed in the response) and its client's address, counts it
/// by door, route, model and status, and times those that are not chat calls (a chat call
/// is timed whole, stream included, when it settles).
async fn track_request(
    axum::extract::State(edge): axum::extract::State<Arc<Edge>>,
    mut request: Request,
    next: Next,
) -> Response {
    let started = std::time::Instant::now();
    let metrics = &edge.metrics;
    if let Some(PeerAddr(peer)) = request.extensions().get::<PeerAddr>().copied() {
        let client = client_addr::find(peer.ip(), request.headers(), edge.trusted_proxies.as_ref());
        request.extensions_mut().insert(ClientAddr(client));
    }
    let id = RequestId::from_client(
        request
            .headers()
            .get(REQUEST_ID_HEADER)
            .and_then(|v| v.to_str().ok()),
    );
    let id_header = HeaderValue::from_str(&id.0).ok();
    request.extensions_mut().insert(id);
    let grpc = is_grpc(request.headers());
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
    // A model call is timed whole, stream included, when it settles.
    let model_call = matches!(
        route.as_str(),
        "/v1/chat/completions" | "/v1/completions" | "/v1/embeddings" | "/v1/responses"
    ) || route.starts_with("/step3.gateway.v1.Chat/")
        && route.ends_with("Complete");
    if !model_call {
        metrics.request_duration(door, &route, started.elapsed());
    }
    if let Some(value) = id_header {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    response
}
