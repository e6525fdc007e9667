//! Validation of chat-completion requests and the deterministic reply they get.

use axum::http::StatusCode;
use serde_json::{Map, Value};

use super::config::SimulatorConfig;
use super::wire::ApiError;

/// Chat-template overhead charged per message (role markers and separators).
pub(super) const TOKENS_PER_MESSAGE: u64 = 4;
/// Tokens charged per `image_url` part, whatever the image.
pub(super) const TOKENS_PER_IMAGE: u64 = 256;

/// The fields of a chat request the simulator acts on.
#[derive(Debug)]
pub(super) struct ChatRequest {
    pub stream: bool,
    pub include_usage: bool,
    pub continuous_usage: bool,
    pub reply: Reply,
}

/// The completion the simulator will produce for a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Reply {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// Leading completion tokens that are reasoning (at most `completion_tokens`).
    pub reasoning_tokens: u32,
    pub finish_reason: &'static str,
}

impl ChatRequest {
    /// Validates `body` the way vLLM would (status codes and messages mimic its errors).
    pub fn parse(body: &Value, config: &SimulatorConfig) -> Result<Self, ApiError> {
        let Value::Object(body) = body else {
            return Err(ApiError::bad_request(
                "Request body must be a JSON object",
                None,
            ));
        };

        // vLLM treats a missing model as "the served model".
        match body.get("model") {
            None | Some(Value::Null) => {}
            Some(Value::String(model)) if *model == config.model => {}
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
        }

        let messages = match body.get("messages") {
            Some(Value::Array(messages)) => messages,
            None | Some(Value::Null) => {
                return Err(ApiError::bad_request(
                    "messages: Field required",
                    Some("messages"),
                ));
            }
            Some(_) => {
                return Err(ApiError::bad_request(
                    "messages: Input should be a valid list",
                    Some("messages"),
                ));
            }
        };
        if let Some(index) = messages.iter().position(|m| !m.is_object()) {
            return Err(ApiError::bad_request(
                format!("messages.{index}: Input should be an object"),
                Some("messages"),
            ));
        }

        // vLLM prefers the newer `max_completion_tokens` over the legacy `max_tokens`.
        let max_tokens = match optional_u64(body, "max_completion_tokens")? {
            Some(max) => Some(max),
            None => optional_u64(body, "max_tokens")?,
        };
        if max_tokens == Some(0) {
            return Err(ApiError::bad_request(
                "max_tokens must be at least 1, got 0.",
                Some("max_tokens"),
            ));
        }

        let stream = optional_bool(body, "stream")?.unwrap_or(false);
        let (include_usage, continuous_usage) = match body.get("stream_options") {
            None | Some(Value::Null) => (false, false),
            Some(_) if !stream => {
                return Err(ApiError::bad_request(
                    "Stream options can only be defined when `stream=True`.",
                    Some("stream_options"),
                ));
            }
            Some(Value::Object(options)) => {
                let include = optional_bool(options, "include_usage")?.unwrap_or(false);
                let continuous = optional_bool(options, "continuous_usage_stats")?.unwrap_or(false);
                // Continuous stats ride on include_usage in vLLM.
                (include, include && continuous)
            }
            Some(_) => {
                return Err(ApiError::bad_request(
                    "stream_options: Input should be an object",
                    Some("stream_options"),
                ));
            }
        };

        let prompt_tokens = estimate_prompt_tokens(messages);
        let context = u64::from(config.max_model_len);
        let reply_limit = match max_tokens {
            Some(max) if prompt_tokens.saturating_add(max) > context => {
                return Err(ApiError::bad_request(
                    format!(
                        "This model's maximum context length is {context} tokens. However, you \
                         requested {} tokens ({prompt_tokens} in the messages, {max} in the \
                         completion). Please reduce the length of the messages or completion.",
                        prompt_tokens.saturating_add(max)
                    ),
                    None,
                ));
            }
            Some(max) => max,
            None if prompt_tokens >= context => {
                return Err(ApiError::bad_request(
                    format!(
                        "This model's maximum context length is {context} tokens. However, your \
                         request has {prompt_tokens} input tokens. Please reduce the length of \
                         the input messages."
                    ),
                    None,
                ));
            }
            // Without max_tokens vLLM generates up to the end of the context window.
            None => context - prompt_tokens,
        };

        let wanted = u64::from(config.reply_tokens);
        let completion_tokens = wanted.min(reply_limit);
        let finish_reason = if completion_tokens < wanted {
            "length"
        } else {
            "stop"
        };
        // Both values are bounded by u32 inputs (reply_tokens, max_model_len).
        let completion_tokens = saturate_u32(completion_tokens);
        Ok(Self {
            stream,
            include_usage,
            continuous_usage,
            reply: Reply {
                prompt_tokens: saturate_u32(prompt_tokens),
                completion_tokens,
                reasoning_tokens: config.reasoning_tokens.min(completion_tokens),
                finish_reason,
            },
        })
    }
}

/// Deterministic stand-in for tokenising the chat prompt (the simulator has no tokenizer).
///
/// Each message costs [`TOKENS_PER_MESSAGE`] (4) tokens, plus `ceil(chars / 4)` for each
/// piece of text — a string `content`, or every `{"type":"text","text":…}` part of a list
/// `content` — plus [`TOKENS_PER_IMAGE`] (256) for every `{"type":"image_url",…}` part.
/// Characters are Unicode scalar values; other part types and fields cost nothing.
pub(super) fn estimate_prompt_tokens(messages: &[Value]) -> u64 {
    messages
        .iter()
        .map(|message| {
            let content = match message.get("content") {
                Some(Value::String(text)) => text_tokens(text),
                Some(Value::Array(parts)) => parts.iter().map(part_tokens).sum(),
                _ => 0,
            };
            TOKENS_PER_MESSAGE + content
        })
        .sum()
}

fn part_tokens(part: &Value) -> u64 {
    match part.get("type").and_then(Value::as_str) {
        Some("text") => part
            .get("text")
            .and_then(Value::as_str)
            .map_or(0, text_tokens),
        Some("image_url") => TOKENS_PER_IMAGE,
        _ => 0,
    }
}

fn text_tokens(text: &str) -> u64 {
    // usize -> u64 never truncates on supported targets.
    (text.chars().count() as u64).div_ceil(4)
}

fn saturate_u32(value: u64) -> u32 {
    u32::try_from(value).unwrap_or(u32::MAX)
}

fn optional_u64(body: &Map<String, Value>, field: &'static str) -> Result<Option<u64>, ApiError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => value.as_u64().map(Some).ok_or_else(|| {
            ApiError::bad_request(
                format!("{field}: Input should be a non-negative integer"),
                Some(field),
            )
        }),
    }
}

fn optional_bool(body: &Map<String, Value>, field: &'static str) -> Result<Option<bool>, ApiError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => value.as_bool().map(Some).ok_or_else(|| {
            ApiError::bad_request(
                format!("{field}: Input should be a valid boolean"),
                Some(field),
            )
        }),
    }
}

/// Words the reasoning part of a reply cycles through, one token each.
const REASONING_WORDS: &[&str] = &[
    " Let", " me", " look", " at", " the", " image", " first", ".",
];

/// Words the answer part of a reply cycles through, one token each.
const CONTENT_WORDS: &[&str] = &[
    " The", " image", " shows", " a", " red", " bicycle", " leaning", " against", " a", " brick",
    " wall", " under", " soft", " morning", " light", ".",
];

impl Reply {
    /// Text of completion token `index`; reasoning tokens come first, then content.
    pub fn token_text(&self, index: u32) -> &'static str {
        let (words, local) = if index < self.reasoning_tokens {
            (REASONING_WORDS, index)
        } else {
            (CONTENT_WORDS, index - self.reasoning_tokens)
        };
        let word = words[local as usize % words.len()];
        // Each part starts without the separating space, as a tokenizer would emit it.
        if local == 0 { word.trim_start() } else { word }
    }

    pub fn is_reasoning(&self, index: u32) -> bool {
        index < self.reasoning_tokens
    }

    /// The concatenated reasoning text, or `None` when there is none.
    pub fn reasoning_text(&self) -> Option<String> {
        self.join(0..self.reasoning_tokens)
    }

    /// The concatenated answer text, or `None` when every token was reasoning.
    pub fn content_text(&self) -> Option<String> {
        self.join(self.reasoning_tokens..self.completion_tokens)
    }

    fn join(&self, range: std::ops::Range<u32>) -> Option<String> {
        if range.is_empty() {
            return None;
        }
        Some(range.map(|i| self.token_text(i)).collect())
    }
}
