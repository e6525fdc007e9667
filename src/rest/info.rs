//! Service information, health, and the caller's models and usage.

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::{AppState, parse_json};
use crate::call::key_tokens::TokenRequest;
use crate::core::GatewayError;
use crate::edge::client_addr::Client;
use crate::edge::{RequestId, bearer};
use crate::metrics::BackendFigures;

pub const SERVICE: &str = "step3-gateway";
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

pub async fn root() -> Json<Value> {
    Json(json!({
        "service": SERVICE,
        "version": VERSION,
        "description": "OpenAI-compatible gateway in front of a STEP3-VL model server",
        "endpoints": {
            "chat": "POST /v1/chat/completions",
            "completions": "POST /v1/completions",
            "embeddings": "POST /v1/embeddings",
            "responses": "POST /v1/responses",
            "models": "GET /v1/models[/{id}]",
            "usage": "GET /v1/usage",
            "health": "GET /health",
            "admin": "/admin/v1/{users,keys}",
        },
    }))
}

/// Always 200 while the gateway runs; `status` says how many model servers answer:
/// `ok` (all), `degraded` (some, or the shared limits do not answer: keys with a quota are
/// then refused), `unavailable` (none, or the books fail: calls are then refused with
/// `store_unavailable`). `store` names the part that is down: `books` (sled or Postgres,
/// as the usage writer last found them) and, with several replicas, `limits` (Redis, as
/// the last call or probe found it). The figures are those of the last checks, so this
/// costs the backends and the store nothing.
pub async fn health(State(state): State<AppState>) -> Json<Value> {
    let backends = state.call.upstream.status();
    let healthy = backends.iter().filter(|b| b.healthy).count();
    let gateway = state.gateway();
    let store = gateway.store_health();
    let limits = gateway.shared_limits_health();
    let limits_down = limits.is_some_and(|l| !l.is_available());
    // A failing store refuses every call, as surely as having no model server.
    let status = if !store.is_available() {
        "unavailable"
    } else if healthy == backends.len() && !limits_down {
        "ok"
    } else if healthy > 0 || healthy == backends.len() {
        "degraded"
    } else {
        "unavailable"
    };
    let part = |available: bool| if available { "ok" } else { "unavailable" };
    let mut store_json = json!({
        "status": if store.is_available() { "ok" } else { "failing" },
        "books": part(store.is_available()),
        "usage_backlog": gateway.store_figures().backlog,
        "unrecorded_calls": store.unrecorded(),
        "error": store.last_error(),
    });
    if let Some(limits) = limits {
        store_json["limits"] = json!(part(limits.is_available()));
        store_json["limits_error"] = json!(limits.last_error());
    }
    Json(json!({
        "status": status,
        "service": SERVICE,
        "version": VERSION,
        "upstreams": backends,
        "store": store_json,
    }))
}

/// Prometheus metrics (text format). Like most exporters it needs no key: keep it off the
/// public side of the proxy in front (the nginx site in `deploy/` answers 404 for it).
pub async fn metrics(State(state): State<AppState>) -> Response {
    let backends: Vec<BackendFigures> = state
        .call
        .upstream
        .status()
        .into_iter()
        .map(|b| BackendFigures {
            name: b.name,
            healthy: b.healthy,
            in_flight: b.in_flight,
            errors: b.errors,
        })
        .collect();
    let text = state.metrics.render_with_deliveries(
        &backends,
        &state.gateway().store_figures(),
        &state.gateway().delivery_figures(),
        state.call.cache.as_ref().map(|_| {
            let c = state.call.cache_stats();
            crate::metrics::CacheFigures {
                hits: c.hits,
                misses: c.misses,
                evictions: c.evictions,
                bytes: c.bytes,
                entries: c.entries,
            }
        }),
    );
    (
        [(
            axum::http::header::CONTENT_TYPE,
            crate::metrics::CONTENT_TYPE,
        )],
        text,
    )
        .into_response()
}

/// The upstream's models, filtered by the caller's allowlist.
pub async fn models(
    State(state): State<AppState>,
    axum::Extension(RequestId(request_id)): axum::Extension<RequestId>,
    client: Client,
    headers: HeaderMap,
) -> Result<Json<Value>, GatewayError> {
    let caller = state
        .call
        .authenticate(bearer(&headers), client.0, client.1.as_deref())
        .await?;
    Ok(Json(state.call.models(&caller, &request_id).await?))
}

/// One model of the list (the SDKs' `models.retrieve`); ids may hold slashes
/// (`stepfun-ai/Step3-VL-10B`). A model the key may not use is as unknown as one nobody
/// serves.
pub async fn model(
    State(state): State<AppState>,
    axum::Extension(RequestId(request_id)): axum::Extension<RequestId>,
    axum::extract::Path(id): axum::extract::Path<String>,
    client: Client,
    headers: HeaderMap,
) -> Result<Json<Value>, GatewayError> {
    let caller = state
        .call
        .authenticate(bearer(&headers), client.0, client.1.as_deref())
        .await?;
    let list = state.call.models(&caller, &request_id).await?;
    list.get("data")
        .and_then(Value::as_array)
        .and_then(|models| {
            models
                .iter()
                .find(|m| m.get("id").and_then(Value::as_str) == Some(id.as_str()))
        })
        .map(|model| Json(model.clone()))
        .ok_or(GatewayError::ModelNotAllowed { model: id })
}

/// The caller's own key: what it used, what remains, its limits and lifetime.
pub async fn usage(State(state): State<AppState>, client: Client, headers: HeaderMap) -> Response {
    let caller = match state
        .call
        .authenticate(bearer(&headers), client.0, client.1.as_deref())
        .await
    {
        Ok(caller) => caller,
        Err(e) => return e.into_response(),
    };
    let summary = match state.gateway().usage_summary(&caller) {
        Ok(summary) => summary,
        Err(e) => return e.into_response(),
    };
    Json(json!({
        "object": "usage",
        "key_id": summary.key_id,
        "key_name": summary.key_name,
        "key_prefix": summary.key_prefix,
        "user_id": summary.user_id,
        "user_name": summary.user_name,
        "requests": {
            "used": summary.used.requests,
            "limit": summary.request_quota,
            "remaining": summary.remaining.requests,
        },
        "tokens": {
            "used": summary.used.tokens(),
            "prompt": summary.used.prompt_tokens,
            "completion": summary.used.completion_tokens,
            "limit": summary.token_quota,
            "remaining": summary.remaining.tokens,
        },
        "images": {
            "used": summary.used.images,
            "limit": summary.image_quota,
            "remaining": summary.remaining.images,
        },
        "rate_limit": {
            "requests_per_minute": summary.limits.rpm,
            "tokens_per_minute": summary.limits.tpm,
            "max_concurrent": summary.limits.concurrent,
            "requests_this_minute_remaining": summary.figures.requests.map(|r| r.remaining),
            "tokens_this_minute_remaining": summary.figures.tokens.map(|r| r.remaining),
        },
        "cost": {
            "used": summary.used.cost,
            "budget": summary.budget,
            "remaining": summary.remaining.budget,
            "currency": summary.currency,
        },
        "period": {
            "every": summary.period.map(|p| p.as_str()),
            "start": summary.period_start,
            "end": summary.period_end,
        },
        "models": summary.models,
        "created_at": summary.created_at,
        "expires_at": summary.expires_at,
    }))
    .into_response()
}

/// A short-lived token for the caller's key (`POST /v1/tokens`): made with the key's own
/// secret only, never with another token. The body is optional.
pub async fn create_token(
    State(state): State<AppState>,
    client: Client,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, GatewayError> {
    let caller = state.gateway().authenticate(bearer(&headers), client.0)?;
    let request: TokenRequest = if body.iter().all(u8::is_ascii_whitespace) {
        TokenRequest::default()
    } else {
        parse_json(&body)?
    };
    let issued = state.call.key_tokens.issue(&caller, request)?;
    Ok((axum::http::StatusCode::CREATED, Json(issued)).into_response())
}
