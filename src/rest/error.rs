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
        let (kind, code, param): (String, Option<String>, Option<String>) = match &self {
            GatewayError::InvalidApiKey(_) | GatewayError::InvalidToken(_) => (
                "invalid_request_error".into(),
                Some("invalid_api_key".into()),
                None,
            ),
            GatewayError::InvalidAdminToken => (
                "invalid_request_error".into(),
                Some("invalid_admin_token".into()),
                None,
            ),
            GatewayError::IpNotAllowed { .. } => (
                "permission_error".into(),
                Some("ip_not_allowed".into()),
                None,
            ),
            GatewayError::ModelNotAllowed { .. } => (
                "invalid_request_error".into(),
                Some("model_not_found".into()),
                Some("model".into()),
            ),
            GatewayError::ModelRetired { .. } => (
                "invalid_request_error".into(),
                Some("model_version_retired".into()),
                Some("model".into()),
            ),
            GatewayError::RateLimited(refusal) => (
                match refusal.kind {
                    LimitKind::Requests => "requests",
                    LimitKind::Tokens => "tokens",
                    LimitKind::Concurrency => "concurrency",
                }
                .into(),
                Some("rate_limit_exceeded".into()),
                None,
            ),
            GatewayError::QuotaExceeded { .. } | GatewayError::BudgetExceeded { .. } => (
                "insufficient_quota".into(),
                Some("insufficient_quota".into()),
                None,
            ),
            GatewayError::InvalidRequest { param, .. } => {
                ("invalid_request_error".into(), None, param.clone())
            }
            GatewayError::BodyTooLarge { .. } => (
                "invalid_request_error".into(),
                Some("request_too_large".into()),
                None,
            ),
            GatewayError::RequestTimeout { .. } => (
                "invalid_request_error".into(),
                Some("request_timeout".into()),
                None,
            ),
            GatewayError::NotFound { .. } => (
                "invalid_request_error".into(),
                Some("not_found".into()),
                None,
            ),
            GatewayError::Upstream {
                kind, param, code, ..
            } => (
                kind.clone().unwrap_or_else(|| "upstream_error".into()),
                code.clone(),
                param.clone(),
            ),
            GatewayError::UpstreamUnavailable(_) => (
                "upstream_error".into(),
                Some("upstream_unavailable".into()),
                None,
            ),
            GatewayError::NoHealthyBackend { .. } => (
                "upstream_error".into(),
                Some("no_healthy_backend".into()),
                None,
            ),
            GatewayError::UpstreamTimeout => (
                "upstream_error".into(),
                Some("upstream_timeout".into()),
                None,
            ),
            GatewayError::ShuttingDown => {
                ("server_error".into(), Some("shutting_down".into()), None)
            }
            GatewayError::StoreUnavailable => (
                "server_error".into(),
                Some("store_unavailable".into()),
                None,
            ),
            GatewayError::Store(_) => ("server_error".into(), Some("store_error".into()), None),
        };
        let status =
            StatusCode::from_u16(self.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
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
        if let GatewayError::QuotaExceeded { .. } | GatewayError::BudgetExceeded { .. } = &self {
            // The OpenAI SDKs retry every 429 unless told not to: a used-up quota does not
            // come back by waiting.
            response.headers_mut().insert(
                HeaderName::from_static("x-should-retry"),
                HeaderValue::from_static("false"),
            );
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
