//! The served model, checked the way vLLM checks a request's `model`, and the
//! `/v1/models` list.

use axum::http::StatusCode;
use serde_json::{Map, Value, json};

use super::config::SimulatorConfig;
use super::wire::{ApiError, unix_now};

/// Checks the `model` `body` asks for: missing or null means the served model (vLLM's
/// default), another name gets vLLM's 404.
pub(super) fn check_model(
    body: &Map<String, Value>,
    config: &SimulatorConfig,
) -> Result<(), ApiError> {
    match body.get("model") {
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(model)) if *model == config.model => Ok(()),
        Some(Value::String(model)) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("The model `{model}` does not exist."),
            Some("model"),
        )),
        Some(_) => Err(ApiError::bad_request(
            "model: must be a string",
            Some("model"),
        )),
    }
}

/// The `/v1/models` list.
pub(super) fn list(config: &SimulatorConfig) -> Value {
    json!({
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
    })
}
