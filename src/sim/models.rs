//! Which model answers which API, checked the way vLLM checks a request's `model`, and
//! the `/v1/models` list.

use axum::http::StatusCode;
use serde_json::{Map, Value, json};

use super::config::{EMBEDDING_MAX_MODEL_LEN, SimulatorConfig};
use super::wire::{ApiError, unix_now};

/// The APIs the simulator serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Api {
    ChatCompletions,
    Completions,
    Responses,
    Embeddings,
}

impl Api {
    /// The name vLLM uses in "The model does not support … API".
    fn name(self) -> &'static str {
        match self {
            Self::ChatCompletions => "Chat Completions",
            Self::Completions => "Completions",
            Self::Responses => "Responses",
            Self::Embeddings => "Embeddings",
        }
    }
}

/// The served model `body` asks `api` of: a missing or null `model` means the model that
/// serves `api` (vLLM's default); a served model that does not do `api` gets vLLM's 400,
/// any other name its 404.
pub(super) fn check_model<'c>(
    body: &Map<String, Value>,
    config: &'c SimulatorConfig,
    api: Api,
) -> Result<&'c str, ApiError> {
    let embedding = config.embedding_model.as_deref();
    let serving = match api {
        Api::Embeddings => embedding,
        _ => Some(config.model.as_str()),
    };
    let asked = match body.get("model") {
        None | Some(Value::Null) => serving,
        Some(Value::String(model)) if Some(model.as_str()) == serving => serving,
        Some(Value::String(model))
            if *model == config.model || Some(model.as_str()) == embedding =>
        {
            None
        }
        Some(Value::String(model)) => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("The model `{model}` does not exist."),
                Some("model"),
            ));
        }
        Some(_) => {
            return Err(ApiError::bad_request(
                "model: must be a string",
                Some("model"),
            ));
        }
    };
    asked.ok_or_else(|| {
        ApiError::bad_request(
            format!("The model does not support {} API", api.name()),
            Some("model"),
        )
    })
}

/// The `/v1/models` list: the chat model, then the embedding model if there is one.
pub(super) fn list(config: &SimulatorConfig) -> Value {
    let created = unix_now();
    let card = |id: &str, max_model_len: u32| {
        json!({
            "id": id,
            "object": "model",
            "created": created,
            "owned_by": "vllm",
            "root": id,
            "parent": null,
            "max_model_len": max_model_len,
        })
    };
    let mut data = vec![card(&config.model, config.max_model_len)];
    if let Some(embedding) = &config.embedding_model {
        data.push(card(embedding, EMBEDDING_MAX_MODEL_LEN));
    }
    json!({"object": "list", "data": data})
}
