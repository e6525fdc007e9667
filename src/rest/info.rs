//! Service information, health, and the caller's models and usage.

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::{AppState, RequestId, bearer};
use crate::core::GatewayError;

pub const SERVICE: &str = "step3-gateway";
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

pub async fn root() -> Json<Value> {
    Json(json!({
        "service": SERVICE,
        "version": VERSION,
        "description": "OpenAI-compatible gateway in front of a STEP3-VL model server",
        "endpoints": {
            "chat": "POST /v1/chat/completions",
            "models": "GET /v1/models",
            "usage": "GET /v1/usage",
            "health": "GET /health",
            "admin": "/admin/v1/{users,keys}",
        },
    }))
}

/// Always 200 while the gateway runs; `status` says whether the upstream answers.
pub async fn health(State(state): State<AppState>) -> Json<Value> {
    let upstream = state
        .chat
        .upstream
        .health(state.settings.health_timeout)
        .await;
    Json(json!({
        "status": if upstream.reachable { "ok" } else { "degraded" },
        "service": SERVICE,
        "version": VERSION,
        "upstream": upstream,
        "store": {"usage_backlog": state.gateway().usage_backlog()},
    }))
}

/// The upstream's models, filtered by the caller's allowlist.
pub async fn models(
    State(state): State<AppState>,
    axum::Extension(RequestId(request_id)): axum::Extension<RequestId>,
    headers: HeaderMap,
) -> Result<Json<Value>, GatewayError> {
    let caller = state.gateway().authenticate(bearer(&headers))?;
    let mut list = state.chat.upstream.models(&request_id).await?;
    if let Some(Value::Array(models)) = list.get_mut("data") {
        models.retain(|m| {
            m.get("id")
                .and_then(Value::as_str)
                .is_some_and(|id| caller.record.allows_model(id))
        });
    }
    Ok(Json(list))
}

/// The caller's own key: what it used, what remains, its limits and lifetime.
pub async fn usage(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let caller = match state.gateway().authenticate(bearer(&headers)) {
        Ok(caller) => caller,
        Err(e) => return e.into_response(),
    };
    let used = caller.key.counters();
    let remaining = caller.remaining();
    let record = &caller.record;
    Json(json!({
        "object": "usage",
        "key_id": record.id,
        "key_name": record.name,
        "key_prefix": record.prefix,
        "user_id": caller.user.id,
        "user_name": caller.user.name,
        "requests": {
            "used": used.requests,
            "limit": record.request_quota,
            "remaining": remaining.requests,
        },
        "tokens": {
            "used": used.tokens(),
            "prompt": used.prompt_tokens,
            "completion": used.completion_tokens,
            "limit": record.token_quota,
            "remaining": remaining.tokens,
        },
        "rate_limit": {"requests_per_minute": record.rpm_limit},
        "models": record.models,
        "created_at": record.created_at,
        "expires_at": record.expires_at,
    }))
    .into_response()
}
