//! `GatewayError` as an HTTP answer: status, OpenAI error body, and retry headers.

use axum::Json;
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::core::GatewayError;
use crate::core::rate_limit::LimitKind;
use crate::edge::error_body;

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        let message = self.to_string();
        let (status, kind, code, param): (StatusCode, String, Option<String>, Option<String>) =
            match &self {
                GatewayError::InvalidApiKey(_) => (
                    StatusCode::UNAUTHORIZED,
                    "invalid_request_error".into(),
                    Some("invalid_api_key".into()),
                    None,
                ),
                GatewayError::InvalidAdminToken => (
                    StatusCode::UNAUTHORIZED,
                    "invalid_request_error".into(),
                    Some("invalid_admin_token".into()),
                    None,
                ),
                GatewayError::ModelNotAllowed { .. } => (
                    StatusCode::NOT_FOUND,
                    "invalid_request_error".into(),
                    Some("model_not_found".into()),
                    Some("model".into()),
                ),
                GatewayError::RateLimited(refusal) => (
                    StatusCode::TOO_MANY_REQUESTS,
                    match refusal.kind {
                        LimitKind::Requests => "requests",
                        LimitKind::Tokens => "tokens",
                        LimitKind::Concurrency => "concurrency",
                    }
                    .into(),
                    Some("rate_limit_exceeded".into()),
                    None,
                ),
                GatewayError::QuotaExceeded { .. } => (
                    StatusCode::TOO_MANY_REQUESTS,
                    "insufficient_quota".into(),
                    Some("insufficient_quota".into()),
                    None,
                ),
                GatewayError::InvalidRequest { param, .. } => (
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error".into(),
                    None,
                    param.clone(),
                ),
                GatewayError::BodyTooLarge { .. } => (
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "invalid_request_error".into(),
                    Some("request_too_large".into()),
                    None,
                ),
                GatewayError::RequestTimeout { .. } => (
                    StatusCode::REQUEST_TIMEOUT,
                    "invalid_request_error".into(),
                    Some("request_timeout".into()),
                    None,
                ),
                GatewayError::NotFound { .. } => (
                    StatusCode::NOT_FOUND,
                    "invalid_request_error".into(),
                    Some("not_found".into()),
                    None,
                ),
                GatewayError::Upstream {
                    status,
                    kind,
                    param,
                    code,
                    ..
                } => (
                    StatusCode::from_u16(*status)
                        .ok()
                        .filter(|s| s.is_client_error() || s.is_server_error())
                        .unwrap_or(StatusCode::BAD_GATEWAY),
                    kind.clone().unwrap_or_else(|| "upstream_error".into()),
                    code.clone(),
                    param.clone(),
                ),
                GatewayError::UpstreamUnavailable(_) => (
                    StatusCode::BAD_GATEWAY,
                    "upstream_error".into(),
                    Some("upstream_unavailable".into()),
                    None,
                ),
                GatewayError::NoHealthyBackend { .. } => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "upstream_error".into(),
                    Some("no_healthy_backend".into()),
                    None,
                ),
                GatewayError::UpstreamTimeout => (
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream_error".into(),
                    Some("upstream_timeout".into()),
                    None,
                ),
                GatewayError::ShuttingDown => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "server_error".into(),
                    Some("shutting_down".into()),
                    None,
                ),
                GatewayError::StoreUnavailable => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "server_error".into(),
                    Some("store_unavailable".into()),
                    None,
                ),
                GatewayError::Store(_) => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error".into(),
                    Some("store_error".into()),
                    None,
                ),
            };
        let body = error_body(&message, &kind, param.as_deref(), code.as_deref());
        let mut response = (status, Json(body)).into_response();
        if let GatewayError::RateLimited(refusal) = &self {
            let headers = response.headers_mut();
            for (name, value) in refusal.pairs() {
                if let Ok(value) = HeaderValue::try_from(value) {
                    headers.insert(HeaderName::from_static(name), value);
                }
            }
        }
        if let GatewayError::StoreUnavailable = &self {
            // The usage writer tries the store again every half second.
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                HeaderValue::from_static("1"),
            );
        }
        response
    }
}
