//! Pieces of vLLM's wire format every route uses: the error body, usage, timestamps.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use rand::RngExt;
use serde_json::{Map, Value, json};

/// vLLM's `UsageInfo`, shared by JSON replies and stream chunks.
pub(super) fn usage_json(prompt_tokens: u32, completion_tokens: u32) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "total_tokens": u64::from(prompt_tokens) + u64::from(completion_tokens),
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": null,
    })
}

pub(super) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

/// An OpenAI-style error reply: `{"error":{"message","type","param","code"}}`.
#[derive(Debug)]
pub(super) struct ApiError {
    status: StatusCode,
    message: String,
    param: Option<&'static str>,
}

impl ApiError {
    pub fn new(
        status: StatusCode,
        message: impl Into<String>,
        param: Option<&'static str>,
    ) -> Self {
        Self {
            status,
            message: message.into(),
            param,
        }
    }

    pub fn bad_request(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message, param)
    }
}

/// The error body vLLM uses, for JSON replies and in-stream error events alike.
pub(super) fn error_json(status: StatusCode, message: &str, param: Option<&str>) -> Value {
    // vLLM names the type after the HTTP status, mirroring OpenAI's SDK exception names.
    let kind = match status {
        StatusCode::BAD_REQUEST => "BadRequestError",
        StatusCode::UNAUTHORIZED => "AuthenticationError",
        StatusCode::NOT_FOUND => "NotFoundError",
        _ => "InternalServerError",
    };
    json!({
        "error": {
            "message": message,
            "type": kind,
            "param": param,
            "code": status.as_u16(),
        }
    })
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(error_json(self.status, &self.message, self.param)),
        )
            .into_response()
    }
}

/// A JSON object from `(key, value)` pairs, moving the values in (`json!` would clone
/// every value given as an expression, which matters for long texts).
pub(super) fn object<const N: usize>(pairs: [(&'static str, Value); N]) -> Value {
    // Inserted one by one like `json!` does: collecting would sort through a scratch Vec.
    let mut map = Map::new();
    for (key, value) in pairs {
        map.insert(key.to_owned(), value);
    }
    Value::Object(map)
}

/// A random id in vLLM's style: `prefix` and 32 hex digits.
pub(super) fn random_id(prefix: &str) -> String {
    format!("{prefix}{:032x}", rand::rng().random::<u128>())
}
