//! `POST /v1/chat/completions`: validation as vLLM does it, the `chat.completion` object
//! and its `chat.completion.chunk` stream, with STEP3-VL's `reasoning_content`, `n`
//! choices and tool calls.

use bytes::Bytes;
use serde_json::{Map, Value, json};

use super::answer::{ToolChoice, answer};
use super::config::SimulatorConfig;
use super::models::{Api, check_model};
use super::prompt::{Question, estimate_prompt_tokens};
use super::reply::{
    Reply, Token, choices, completion_limit, optional_bool, optional_u64, saturate_u32,
    stream_options,
};
use super::stream::{DONE, StreamFormat, error_then_done, push_sse};
use super::wire::{ApiError, object, random_id, unix_now, usage_json};

/// The fields of a chat request the simulator acts on.
#[derive(Debug)]
pub(super) struct ChatRequest<'a> {
    pub stream: bool,
    pub include_usage: bool,
    pub continuous_usage: bool,
    pub reply: Reply<'a>,
}

impl<'a> ChatRequest<'a> {
    /// Validates `body` the way vLLM would (status codes and messages mimic its errors).
    pub fn parse(body: &'a Value, config: &SimulatorConfig) -> Result<Self, ApiError> {
        let Value::Object(body) = body else {
            return Err(ApiError::bad_request(
                "Request body must be a JSON object",
                None,
            ));
        };
        check_model(body, config, Api::ChatCompletions)?;

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
        let choices = choices(body)?;
        let stream = optional_bool(body, "stream")?.unwrap_or(false);
        let (include_usage, continuous_usage) = stream_options(body, stream)?;
        let question = Question::from_messages(messages);
        let tool = tool_choice(body, &question)?;
        let thinking = if thinking_disabled(body)? {
            0
        } else {
            config.reasoning_tokens
        };

        let prompt_tokens = estimate_prompt_tokens(messages);
        let limit = completion_limit(prompt_tokens, max_tokens, u64::from(config.max_model_len))?;
        let reply = Reply::plan(
            answer(&question, tool),
            saturate_u32(prompt_tokens),
            choices,
            limit,
            config.reply_tokens,
            thinking,
        );
        Ok(Self {
            stream,
            include_usage,
            continuous_usage,
            reply,
        })
    }

    /// The `chat.completion` object. Texts are moved into it, not copied (but for the
    /// second and later of `n` choices).
    pub fn json(&self, id: &str, model: &str, with_usage: bool) -> Value {
        let reply = &self.reply;
        let reasoning = reply.reasoning_text();
        let content = match (reply.content_text(false), &reasoning) {
            (Some(content), _) => Value::String(content),
            // vLLM's reasoning parser leaves content null when everything was reasoning,
            // and a tool call has none either.
            (None, Some(_)) => Value::Null,
            (None, None) if reply.call().is_some() => Value::Null,
            (None, None) => Value::String(String::new()),
        };
        let message = object([
            ("role", Value::from("assistant")),
            ("content", content),
            (
                "reasoning_content",
                reasoning.map_or(Value::Null, Value::String),
            ),
            ("tool_calls", Value::Array(Vec::new())),
        ]);
        let choice = |index: u32, mut message: Value| {
            if let Some(call) = reply.call() {
                message["tool_calls"] = json!([{
                    "id": tool_call_id(),
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments},
                }]);
            }
            object([
                ("index", Value::from(index)),
                ("message", message),
                ("logprobs", Value::Null),
                ("finish_reason", Value::from(reply.finish_reason)),
                ("stop_reason", Value::Null),
            ])
        };
        // Every choice but the last gets a copy; the last takes the message itself.
        let last = reply.choices.saturating_sub(1);
        let mut choices: Vec<Value> = (0..last).map(|i| choice(i, message.clone())).collect();
        choices.push(choice(last, message));
        let mut completion = object([
            ("id", Value::from(id)),
            ("object", Value::from("chat.completion")),
            ("created", Value::from(unix_now())),
            ("model", Value::from(model)),
            ("choices", Value::Array(choices)),
            ("prompt_logprobs", Value::Null),
        ]);
        if with_usage {
            completion["usage"] = usage_json(reply.prompt_tokens, reply.total_completion_tokens());
        }
        completion
    }

    /// The stream of `chat.completion.chunk`s.
    pub fn into_stream(self, id: String, model: String, with_usage: bool) -> ChatStream {
        let reply = self.reply.into_owned();
        ChatStream {
            tool_call_ids: if reply.is_call() {
                (0..reply.choices).map(|_| tool_call_id()).collect()
            } else {
                Vec::new()
            },
            id,
            created: unix_now(),
            model,
            include_usage: self.include_usage && with_usage,
            continuous_usage: self.continuous_usage && with_usage,
            reply,
        }
    }
}

/// `chat_template_kwargs.enable_thinking: false`, STEP3-VL's switch for reasoning. vLLM
/// ignores unknown top-level fields, so a top-level `enable_thinking` changes nothing
/// here either.
fn thinking_disabled(body: &Map<String, Value>) -> Result<bool, ApiError> {
    match body.get("chat_template_kwargs") {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Object(kwargs)) => {
            Ok(kwargs.get("enable_thinking") == Some(&Value::Bool(false)))
        }
        Some(_) => Err(ApiError::bad_request(
            "chat_template_kwargs: Input should be a valid dictionary",
            Some("chat_template_kwargs"),
        )),
    }
}

/// The tool the model calls, after vLLM's checks of `tools` and `tool_choice`.
///
/// Offered tools default `tool_choice` to `"auto"`, under which the model calls the first
/// tool unless the conversation ends with a tool's result (then it answers with it);
/// `"required"` calls the first tool, a named function that one, `"none"` nothing. The
/// simulator stands for a vLLM started with `--enable-auto-tool-choice`.
fn tool_choice<'a>(
    body: &'a Map<String, Value>,
    question: &Question<'_>,
) -> Result<Option<ToolChoice<'a>>, ApiError> {
    let tools = match body.get("tools") {
        None | Some(Value::Null) => None,
        Some(Value::Array(tools)) if tools.is_empty() => {
            return Err(ApiError::bad_request(
                "`tools` must not be an empty array. Either provide at least one tool or omit \
                 the field entirely.",
                Some("tools"),
            ));
        }
        Some(Value::Array(tools)) => Some(tools),
        Some(_) => {
            return Err(ApiError::bad_request(
                "tools: Input should be a valid list",
                Some("tools"),
            ));
        }
    };
    let functions = tools
        .into_iter()
        .flatten()
        .enumerate()
        .map(|(index, tool)| {
            let function = tool.get("function");
            match function.and_then(|f| f.get("name")).and_then(Value::as_str) {
                Some(name) => Ok((name, function.and_then(|f| f.get("parameters")))),
                None => Err(ApiError::bad_request(
                    format!("tools.{index}.function.name: Field required"),
                    Some("tools"),
                )),
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    let call = |(name, parameters): (&'a str, Option<&'a Value>), named| ToolChoice {
        name,
        parameters,
        named,
    };
    let usage =
        "Correct usage: `{\"type\": \"function\", \"function\": {\"name\": \"my_function\"}}`";
    match body.get("tool_choice") {
        Some(Value::String(choice)) if choice == "none" => Ok(None),
        None | Some(Value::Null) if functions.is_empty() => Ok(None),
        Some(_) if functions.is_empty() => Err(ApiError::bad_request(
            "When using `tool_choice`, `tools` must be set.",
            Some("tool_choice"),
        )),
        None | Some(Value::Null) => Ok(auto(&functions, question).map(|f| call(f, false))),
        Some(Value::String(choice)) if choice == "auto" => {
            Ok(auto(&functions, question).map(|f| call(f, false)))
        }
        Some(Value::String(choice)) if choice == "required" => {
            Ok(functions.first().map(|f| call(*f, false)))
        }
        Some(Value::Object(named)) => {
            let name = named
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .filter(|name| !name.is_empty())
                .ok_or_else(|| {
                    ApiError::bad_request(
                        format!("Expected field `name` in `function` in `tool_choice`! {usage}"),
                        Some("tool_choice"),
                    )
                })?;
            let function = functions.iter().find(|(n, _)| *n == name).ok_or_else(|| {
                ApiError::bad_request(
                    "The tool specified in `tool_choice` does not match any of the specified \
                     `tools`",
                    Some("tool_choice"),
                )
            })?;
            Ok(Some(call(*function, true)))
        }
        Some(other) => Err(ApiError::bad_request(
            format!(
                "Invalid value for `tool_choice`: {other}! Only named tools, \"none\", \"auto\" \
                 or \"required\" are supported."
            ),
            Some("tool_choice"),
        )),
    }
}

/// Under `"auto"` the model calls the first tool, unless it was just given a tool's result.
fn auto<'a>(
    functions: &[(&'a str, Option<&'a Value>)],
    question: &Question<'_>,
) -> Option<(&'a str, Option<&'a Value>)> {
    match question.tool_result {
        Some(_) => None,
        None => functions.first().copied(),
    }
}

/// vLLM's tool-call ids.
fn tool_call_id() -> String {
    random_id("chatcmpl-tool-")
}

/// A chat completion as `chat.completion.chunk` events: a role chunk per choice, then
/// one chunk per token with the choices taking turns, a finish chunk per choice, the
/// usage chunk if asked for, and `[DONE]`.
pub(super) struct ChatStream {
    id: String,
    created: u64,
    model: String,
    reply: Reply<'static>,
    include_usage: bool,
    continuous_usage: bool,
    /// One per choice; sent with the call's first delta.
    tool_call_ids: Vec<String>,
}

impl ChatStream {
    /// A chunk with one choice; with continuous usage stats it also carries usage
    /// counting the choice's `completion_tokens` generated so far.
    fn chunk(
        &self,
        out: &mut String,
        index: u32,
        delta: Value,
        finish_reason: Option<&str>,
        completion_tokens: u32,
    ) {
        let mut chunk = self.envelope(vec![object([
            ("index", Value::from(index)),
            ("delta", delta),
            ("logprobs", Value::Null),
            (
                "finish_reason",
                finish_reason.map_or(Value::Null, Value::from),
            ),
            ("stop_reason", Value::Null),
        ])]);
        if self.continuous_usage {
            chunk["usage"] = usage_json(self.reply.prompt_tokens, completion_tokens);
        }
        push_sse(out, &chunk);
    }

    fn envelope(&self, choices: Vec<Value>) -> Value {
        object([
            ("id", Value::from(self.id.as_str())),
            ("object", Value::from("chat.completion.chunk")),
            ("created", Value::from(self.created)),
            ("model", Value::from(self.model.as_str())),
            ("choices", Value::Array(choices)),
        ])
    }

    fn delta(&self, choice: u32, token: Token<'_>) -> Value {
        match token {
            Token::Reasoning { .. } => object([(
                "reasoning_content",
                Value::String(self.reply.word(token, false)),
            )]),
            Token::Text { .. } => {
                object([("content", Value::String(self.reply.word(token, false)))])
            }
            // The first delta of a call names it, as vLLM's tool parsers stream it.
            Token::CallName(name) => json!({"tool_calls": [{
                "id": self.tool_call_ids.get(choice as usize),
                "type": "function",
                "index": 0,
                "function": {"name": name},
            }]}),
            Token::CallArguments(arguments) => json!({"tool_calls": [{
                "index": 0,
                "function": {"arguments": arguments},
            }]}),
        }
    }
}

impl StreamFormat for ChatStream {
    fn tokens(&self) -> u32 {
        self.reply.total_completion_tokens()
    }

    fn opening(&mut self) -> Option<Bytes> {
        let mut out = String::new();
        for index in 0..self.reply.choices {
            let delta = json!({"role": "assistant", "content": ""});
            self.chunk(&mut out, index, delta, None, 0);
        }
        Some(Bytes::from(out))
    }

    fn token(&mut self, step: u32) -> Bytes {
        let choice = step % self.reply.choices;
        let token = step / self.reply.choices;
        let delta = self.delta(choice, self.reply.token(token));
        let mut out = String::new();
        self.chunk(&mut out, choice, delta, None, token + 1);
        Bytes::from(out)
    }

    fn closing(&mut self) -> Bytes {
        let mut out = String::new();
        for index in 0..self.reply.choices {
            let finish = Some(self.reply.finish_reason);
            self.chunk(
                &mut out,
                index,
                json!({}),
                finish,
                self.reply.completion_tokens,
            );
        }
        if self.include_usage {
            let mut usage = self.envelope(Vec::new());
            usage["usage"] = usage_json(
                self.reply.prompt_tokens,
                self.reply.total_completion_tokens(),
            );
            push_sse(&mut out, &usage);
        }
        out.push_str(DONE);
        Bytes::from(out)
    }

    fn error(&mut self, message: &str) -> Bytes {
        error_then_done(message)
    }
}
