//! HTTP routes of the simulator: health, model list, chat completions and error replies.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::chat::ChatRequest;
use super::config::SimulatorConfig;
use super::fault::Fault;
use super::raw::{self, Tail};
use super::state::{AppState, SimState};
use super::stream::{StreamFault, StreamPlan};
use super::wire::{ApiError, random_id, unix_now};

/// vLLM has no body limit of its own and base64 images are large, so allow plenty.
const MAX_BODY_BYTES: usize = 256 * 1024 * 1024;

pub(super) fn router(sim: Arc<SimState>, shutdown: CancellationToken) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(list_models))
        .route("/v1/chat/completions", post(chat_completions))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(AppState { sim, shutdown })
}

async fn health() -> StatusCode {
    StatusCode::OK
}

async fn list_models(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let config = &state.sim.config;
    if let Err(err) = authorize(config, &headers) {
        return err.into_response();
    }
    Json(json!({
        "object": "list",
        "data": [{
            "id": config.model,
            "object": "model",
            "created": unix_now(),
            "owned_by": "vllm",
            "root": config.model,
            "parent": null,
            "max_model_len": config.max_model_len,
        }],
    }))
    .into_response()
}

async fn chat_completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    raw_body: Bytes,
) -> Response {
    let parsed = serde_json::from_slice::<Value>(&raw_body);
    state.sim.record(&headers, parsed.as_ref().ok(), &raw_body);
    // vLLM's API-key check is middleware, so it runs before anything else.
    if let Err(err) = authorize(&state.sim.config, &headers) {
        return err.into_response();
    }

    let mut no_usage = false;
    let mut stream_fault = None;
    let mut body_fault = None;
    let mut inject = None;
    let mut delay = Duration::ZERO;
    match state.sim.pop_fault() {
        None => {}
        Some(Fault::Status { status, body }) => return status_response(status, body),
        Some(Fault::Raw {
            status,
            content_type,
            body,
        }) => return raw::exact(status, &content_type, body),
        Some(Fault::TrickleErrorPage(every)) => return raw::trickle_error_page(state, every),
        Some(Fault::DropConnection) => return drop_connection(),
        Some(Fault::Delay(d)) => delay = d,
        Some(Fault::NoUsage) => no_usage = true,
        Some(Fault::StreamCutAfter(n)) => stream_fault = Some(StreamFault::Cut(n)),
        Some(Fault::StreamErrorAfter(n)) => stream_fault = Some(StreamFault::Error(n)),
        Some(Fault::StreamEndAfter(n)) => stream_fault = Some(StreamFault::End(n)),
        Some(Fault::StreamStallAfter(n)) => {
            stream_fault = Some(StreamFault::Stall(n));
            body_fault = Some(BodyFault::StallHalfway);
        }
        Some(Fault::JsonCutAfter(n)) => body_fault = Some(BodyFault::CutAfter(n)),
        Some(Fault::StreamInject { after, raw }) => {
            stream_fault = Some(StreamFault::Inject(after));
            inject = Some(Bytes::from(raw));
        }
        Some(Fault::Oversized(total)) => body_fault = Some(BodyFault::Oversized(total)),
        Some(Fault::Trickle(every)) => body_fault = Some(BodyFault::Trickle(every)),
    }
    if !state.pause(delay).await {
        return drop_connection();
    }

    let body = match parsed {
        Ok(body) => body,
        Err(err) => {
            return ApiError::bad_request(format!("Invalid JSON body: {err}"), None)
                .into_response();
        }
    };
    let request = match ChatRequest::parse(&body, &state.sim.config) {
        Ok(request) => request,
        Err(err) => return err.into_response(),
    };

    match body_fault {
        Some(BodyFault::Oversized(total)) => return raw::oversized(state, request.stream, total),
        Some(BodyFault::Trickle(every)) => return raw::trickle(state, request.stream, every),
        _ => {}
    }
    let id = random_id("chatcmpl-");
    let model = state.sim.config.model.clone();
    let with_usage = !no_usage;
    if request.stream {
        let plan = StreamPlan {
            format: Box::new(request.into_stream(id, model, with_usage)),
            fault: stream_fault,
            inject,
            token_latency: state.sim.config.token_latency,
        };
        return plan.into_response(state);
    }

    // The choices are generated side by side, so the wait is one choice's length.
    let generation = state
        .sim
        .config
        .token_latency
        .saturating_mul(request.reply.completion_tokens);
    if !state.pause(generation).await {
        return drop_connection();
    }
    let value = request.json(&id, &model, with_usage);
    // Serialising a `Value` cannot fail.
    let json = Bytes::from(serde_json::to_vec(&value).unwrap_or_default());
    match body_fault {
        Some(BodyFault::StallHalfway) => {
            let half = json.slice(..json.len() / 2);
            return raw::partial(state, "application/json", half, Tail::Stall);
        }
        Some(BodyFault::CutAfter(n)) => {
            let head = json.slice(..n.min(json.len()));
            return raw::partial(state, "application/json", head, Tail::Abort);
        }
        _ => {}
    }
    state
        .sim
        .add_tokens_sent(request.reply.total_completion_tokens());
    json_response(json)
}

fn json_response(json: Bytes) -> Response {
    let mut response = Response::new(Body::from(json));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// A non-streaming fault that shapes the body's bytes.
#[derive(Clone, Copy, Debug)]
enum BodyFault {
    StallHalfway,
    CutAfter(usize),
    Oversized(u64),
    Trickle(Duration),
}

fn authorize(config: &SimulatorConfig, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &config.api_key else {
        return Ok(());
    };
    // vLLM compares the whole header value, so the scheme is case-sensitive too.
    let presented = headers.get(AUTHORIZATION).map(HeaderValue::as_bytes);
    let expected = format!("Bearer {key}");
    if presented == Some(expected.as_bytes()) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            None,
        ))
    }
}

fn status_response(status: u16, body: String) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or_else(|_| {
        tracing::warn!(status, "simulator: invalid fault status, using 500");
        StatusCode::INTERNAL_SERVER_ERROR
    });
    let mut response = (status, body).into_response();
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// A response whose body fails before its first byte.
///
/// hyper buffers the status line and headers until the first body frame, so a body that
/// errors immediately makes it close the connection with nothing written: the client sees
/// a connection error rather than a status (see the `drop_connection_*` tests).
fn drop_connection() -> Response {
    let body = futures_util::stream::once(async {
        Err::<Bytes, _>(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "simulated dropped connection",
        ))
    });
    Response::new(Body::from_stream(body))
}
