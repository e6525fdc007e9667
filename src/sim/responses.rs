//! `POST /v1/responses`, the Responses API as vLLM serves it for a model that is not
//! gpt-oss: a `response` object whose `output` holds a reasoning item (when the model
//! thinks), then a message or a function call; streamed as named SSE events
//! (`event: response.output_text.delta` …), with no `[DONE]`.

use std::fmt::Write as _;

use bytes::Bytes;
use serde_json::{Map, Value, json};

use super::answer::{ToolChoice, answer};
use super::config::SimulatorConfig;
use super::models::{Api, check_model};
use super::prompt::{Question, TOKENS_PER_MESSAGE, estimate_prompt_tokens, text_tokens};
use super::reply::{Reply, Token, completion_limit, optional_bool, optional_u64, saturate_u32};
use super::stream::StreamFormat;
use super::wire::{ApiError, object, random_id, unix_now};

/// The fields of a Responses request the simulator acts on.
#[derive(Debug)]
pub(super) struct ResponsesRequest<'a> {
    pub stream: bool,
    reply: Reply<'a>,
    /// What the response object repeats of the request (instructions, tools, …).
    echo: Map<String, Value>,
}

impl<'a> ResponsesRequest<'a> {
    /// Validates `body` the way vLLM would.
    pub fn parse(body: &'a Value, config: &SimulatorConfig) -> Result<Self, ApiError> {
        let Value::Object(body) = body else {
            return Err(ApiError::bad_request(
                "Request body must be a JSON object",
                None,
            ));
        };
        check_model(body, config, Api::Responses)?;
        let instructions = match body.get("instructions") {
            None | Some(Value::Null) => None,
            Some(Value::String(text)) => Some(text.as_str()),
            Some(_) => {
                return Err(ApiError::bad_request(
                    "instructions: Input should be a valid string",
                    Some("instructions"),
                ));
            }
        };
        let (question, input_tokens) = match body.get("input") {
            None | Some(Value::Null) => {
                return Err(ApiError::bad_request(
                    "input: Field required",
                    Some("input"),
                ));
            }
            Some(Value::String(text)) => (
                Question::from_text(text),
                TOKENS_PER_MESSAGE + text_tokens(text),
            ),
            Some(Value::Array(items)) => {
                if let Some(index) = items.iter().position(|item| !item.is_object()) {
                    return Err(ApiError::bad_request(
                        format!("input.{index}: Input should be an object"),
                        Some("input"),
                    ));
                }
                (
                    Question::from_messages(items),
                    estimate_prompt_tokens(items),
                )
            }
            Some(_) => {
                return Err(ApiError::bad_request(
                    "input: Input should be a valid string or a valid list",
                    Some("input"),
                ));
            }
        };
        // The instructions are a system message in front of the input.
        let prompt_tokens =
            input_tokens + instructions.map_or(0, |text| TOKENS_PER_MESSAGE + text_tokens(text));
        let max_output_tokens = optional_u64(body, "max_output_tokens")?;
        if max_output_tokens == Some(0) {
            return Err(ApiError::bad_request(
                "max_output_tokens must be at least 1, got 0.",
                Some("max_output_tokens"),
            ));
        }
        let stream = optional_bool(body, "stream")?.unwrap_or(false);
        let tool = tool_choice(body, &question)?;
        let context = u64::from(config.max_model_len);
        let limit = completion_limit(prompt_tokens, max_output_tokens, context)?;

        // The response repeats these, with the defaults vLLM fills in.
        let field = |name: &str, default: Value| match body.get(name) {
            None | Some(Value::Null) => default,
            Some(value) => value.clone(),
        };
        let echo = [
            ("instructions", field("instructions", Value::Null)),
            ("metadata", field("metadata", Value::Null)),
            (
                "parallel_tool_calls",
                field("parallel_tool_calls", json!(true)),
            ),
            ("temperature", field("temperature", json!(1.0))),
            ("tool_choice", field("tool_choice", json!("auto"))),
            ("tools", field("tools", json!([]))),
            ("top_p", field("top_p", json!(1.0))),
            ("background", json!(false)),
            ("max_output_tokens", json!(limit)),
            ("max_tool_calls", field("max_tool_calls", Value::Null)),
            ("previous_response_id", Value::Null),
            ("prompt", Value::Null),
            ("reasoning", field("reasoning", Value::Null)),
            ("service_tier", field("service_tier", json!("auto"))),
            ("text", field("text", Value::Null)),
            ("top_logprobs", Value::Null),
            ("truncation", field("truncation", json!("disabled"))),
            ("user", field("user", Value::Null)),
        ]
        .into_iter()
        .map(|(key, value)| (key.to_owned(), value))
        .collect();

        let reply = Reply::plan(
            answer(&question, tool),
            saturate_u32(prompt_tokens),
            1,
            limit,
            config.reply_tokens,
            config.reasoning_tokens,
        );
        Ok(Self {
            stream,
            reply,
            echo,
        })
    }

    pub fn completion_tokens(&self) -> u32 {
        self.reply.completion_tokens
    }

    /// The `response` object, complete.
    pub fn json(&self, id: &str, model: &str, with_usage: bool) -> Value {
        let reply = &self.reply;
        let mut output = Vec::new();
        if let Some(reasoning) = reply.reasoning_text() {
            output.push(reasoning_item(&random_id("rs_"), reasoning, None));
        }
        if let Some(call) = reply.call() {
            output.push(function_call_item(
                &random_id("fc_"),
                &random_id("call_"),
                &call.name,
                call.arguments.clone(),
                "completed",
            ));
        } else if reply.is_call() && reply.body_tokens() > 0 {
            // Cut short by max_output_tokens: the call so far, marked incomplete.
            let partial = reply.content_text(false).unwrap_or_default();
            let name = match reply.token(reply.reasoning_tokens) {
                Token::CallName(name) => name,
                _ => "",
            };
            output.push(function_call_item(
                &random_id("fc_"),
                &random_id("call_"),
                name,
                partial,
                "incomplete",
            ));
        } else if let Some(text) = reply.content_text(false) {
            output.push(message_item(&random_id("msg_"), text, "completed"));
        }
        response_object(
            id,
            unix_now(),
            model,
            &self.echo,
            status(reply),
            output,
            with_usage.then(|| usage(reply)),
        )
    }

    pub fn into_stream(self, id: String, model: String, with_usage: bool) -> ResponsesStream {
        ResponsesStream {
            id,
            created: unix_now(),
            model,
            echo: self.echo,
            reply: self.reply.into_owned(),
            with_usage,
            sequence: 0,
            open: None,
            output: Vec::new(),
        }
    }
}

/// The function the model calls, from Responses-style `tools`
/// (`{"type":"function","name","parameters"}`) and `tool_choice` (`"auto"` by default).
fn tool_choice<'a>(
    body: &'a Map<String, Value>,
    question: &Question<'_>,
) -> Result<Option<ToolChoice<'a>>, ApiError> {
    let functions: Vec<(&str, Option<&Value>)> = match body.get("tools") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(tools)) => tools
            .iter()
            .filter(|tool| tool.get("type").and_then(Value::as_str) == Some("function"))
            .map(|tool| match tool.get("name").and_then(Value::as_str) {
                Some(name) => Ok((name, tool.get("parameters"))),
                None => Err(ApiError::bad_request(
                    "tools: a function tool needs a `name`",
                    Some("tools"),
                )),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(ApiError::bad_request(
                "tools: Input should be a valid list",
                Some("tools"),
            ));
        }
    };
    let choose = |(name, parameters): (&'a str, Option<&'a Value>), named| ToolChoice {
        name,
        parameters,
        named,
    };
    match body.get("tool_choice") {
        None | Some(Value::Null) => Ok(auto(&functions, question).map(|f| choose(f, false))),
        Some(Value::String(choice)) if choice == "auto" => {
            Ok(auto(&functions, question).map(|f| choose(f, false)))
        }
        Some(Value::String(choice)) if choice == "none" => Ok(None),
        Some(Value::String(choice)) if choice == "required" => match functions.first() {
            Some(function) => Ok(Some(choose(*function, false))),
            None => Err(ApiError::bad_request(
                "When using `tool_choice`, `tools` must be set.",
                Some("tool_choice"),
            )),
        },
        Some(Value::Object(named)) => {
            let name = named.get("name").and_then(Value::as_str);
            match functions.iter().find(|(n, _)| Some(*n) == name) {
                Some(function) => Ok(Some(choose(*function, true))),
                None => Err(ApiError::bad_request(
                    "The tool specified in `tool_choice` does not match any of the specified \
                     `tools`",
                    Some("tool_choice"),
                )),
            }
        }
        Some(other) => Err(ApiError::bad_request(
            format!("Invalid value for `tool_choice`: {other}"),
            Some("tool_choice"),
        )),
    }
}

/// Under `"auto"` the model calls the first function, unless it was just given a result.
fn auto<'a>(
    functions: &[(&'a str, Option<&'a Value>)],
    question: &Question<'_>,
) -> Option<(&'a str, Option<&'a Value>)> {
    match question.tool_result {
        Some(_) => None,
        None => functions.first().copied(),
    }
}

/// `incomplete` when the token limit cut the reply short, as vLLM reports it.
fn status(reply: &Reply<'_>) -> &'static str {
    if reply.finish_reason == "length" {
        "incomplete"
    } else {
        "completed"
    }
}

/// The Responses API's usage block.
fn usage(reply: &Reply<'_>) -> Value {
    json!({
        "input_tokens": reply.prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": reply.completion_tokens,
        "output_tokens_details": {
            "reasoning_tokens": reply.reasoning_tokens,
            "tool_output_tokens": 0,
        },
        "total_tokens": u64::from(reply.prompt_tokens) + u64::from(reply.completion_tokens),
    })
}

fn response_object(
    id: &str,
    created: u64,
    model: &str,
    echo: &Map<String, Value>,
    status: &str,
    output: Vec<Value>,
    usage: Option<Value>,
) -> Value {
    let incomplete = (status == "incomplete").then(|| json!({"reason": "max_output_tokens"}));
    let mut response = object([
        ("id", Value::from(id)),
        ("object", Value::from("response")),
        ("created_at", Value::from(created)),
        ("status", Value::from(status)),
        ("incomplete_details", incomplete.unwrap_or(Value::Null)),
        ("model", Value::from(model)),
        ("output", Value::Array(output)),
        ("usage", usage.unwrap_or(Value::Null)),
    ]);
    if let Value::Object(fields) = &mut response {
        fields.extend(echo.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    response
}

fn reasoning_item(id: &str, text: String, status: Option<&str>) -> Value {
    object([
        ("id", Value::from(id)),
        ("type", Value::from("reasoning")),
        ("summary", Value::Array(Vec::new())),
        ("content", json!([{"type": "reasoning_text", "text": text}])),
        ("encrypted_content", Value::Null),
        ("status", status.map_or(Value::Null, Value::from)),
    ])
}

fn message_item(id: &str, text: String, status: &str) -> Value {
    object([
        ("id", Value::from(id)),
        ("type", Value::from("message")),
        ("role", Value::from("assistant")),
        ("status", Value::from(status)),
        ("content", Value::Array(vec![output_text(text)])),
    ])
}

fn output_text(text: String) -> Value {
    object([
        ("type", Value::from("output_text")),
        ("text", Value::String(text)),
        ("annotations", Value::Array(Vec::new())),
        ("logprobs", Value::Array(Vec::new())),
    ])
}

fn function_call_item(
    id: &str,
    call_id: &str,
    name: &str,
    arguments: String,
    status: &str,
) -> Value {
    object([
        ("id", Value::from(id)),
        ("type", Value::from("function_call")),
        ("call_id", Value::from(call_id)),
        ("name", Value::from(name)),
        ("arguments", Value::String(arguments)),
        ("status", Value::from(status)),
    ])
}

/// What a token adds to the stream's output items.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ItemToken {
    Reasoning,
    Text,
    /// A call's first token: it opens the `function_call` item.
    CallName,
    CallArguments,
}

impl ItemToken {
    fn of(token: Token<'_>) -> Self {
        match token {
            Token::Reasoning { .. } => Self::Reasoning,
            Token::Text { .. } => Self::Text,
            Token::CallName(_) => Self::CallName,
            Token::CallArguments(_) => Self::CallArguments,
        }
    }
}

/// The output item a stream is writing into.
#[derive(Debug)]
enum Open {
    Reasoning {
        id: String,
        text: String,
    },
    Message {
        id: String,
        text: String,
    },
    Call {
        id: String,
        call_id: String,
        name: String,
        arguments: String,
    },
}

/// A response as named events: `response.created` and `response.in_progress`, then for
/// each output item `output_item.added`, its deltas and its `done` events, and finally
/// `response.completed` (with usage). Every event carries a rising `sequence_number`.
pub(super) struct ResponsesStream {
    id: String,
    created: u64,
    model: String,
    echo: Map<String, Value>,
    reply: Reply<'static>,
    with_usage: bool,
    sequence: u64,
    open: Option<Open>,
    /// Items already done.
    output: Vec<Value>,
}

impl ResponsesStream {
    fn event(&mut self, out: &mut String, kind: &str, mut event: Value) {
        if let Value::Object(fields) = &mut event {
            fields.insert("type".to_owned(), Value::from(kind));
            fields.insert("sequence_number".to_owned(), Value::from(self.sequence));
        }
        self.sequence += 1;
        // Writing into a String cannot fail.
        let _ = write!(out, "event: {kind}\ndata: {event}\n\n");
    }

    fn response(&self, status: &str, output: Vec<Value>, usage: Option<Value>) -> Value {
        response_object(
            &self.id,
            self.created,
            &self.model,
            &self.echo,
            status,
            output,
            usage,
        )
    }

    fn output_index(&self) -> usize {
        self.output.len()
    }

    /// Opens the item a token of `kind` belongs to, closing the one before if it is of
    /// another kind. `word` is the token's text (for a call's first token, its name).
    fn open_for(&mut self, out: &mut String, kind: ItemToken, word: &str) {
        let fits = matches!(
            (&self.open, kind),
            (Some(Open::Reasoning { .. }), ItemToken::Reasoning)
                | (Some(Open::Message { .. }), ItemToken::Text)
                | (Some(Open::Call { .. }), ItemToken::CallArguments)
        );
        if fits {
            return;
        }
        self.close(out);
        let index = self.output_index();
        let (open, item, part) = match kind {
            ItemToken::Reasoning => {
                let id = random_id("rs_");
                let item =
                    json!({"id": id, "type": "reasoning", "summary": [], "status": "in_progress"});
                let part = json!({"type": "reasoning_text", "text": ""});
                (
                    Open::Reasoning {
                        id,
                        text: String::new(),
                    },
                    item,
                    Some(part),
                )
            }
            ItemToken::Text => {
                let id = random_id("msg_");
                let item = json!({
                    "id": id, "type": "message", "role": "assistant", "status": "in_progress",
                    "content": [],
                });
                let part =
                    json!({"type": "output_text", "text": "", "annotations": [], "logprobs": []});
                (
                    Open::Message {
                        id,
                        text: String::new(),
                    },
                    item,
                    Some(part),
                )
            }
            ItemToken::CallName | ItemToken::CallArguments => {
                let (id, call_id) = (random_id("fc_"), random_id("call_"));
                let item = function_call_item(&id, &call_id, word, String::new(), "in_progress");
                let open = Open::Call {
                    id,
                    call_id,
                    name: word.to_owned(),
                    arguments: String::new(),
                };
                (open, item, None)
            }
        };
        let item_id = match &open {
            Open::Reasoning { id, .. } | Open::Message { id, .. } | Open::Call { id, .. } => {
                id.clone()
            }
        };
        self.open = Some(open);
        self.event(
            out,
            "response.output_item.added",
            json!({"output_index": index, "item": item}),
        );
        if let Some(part) = part {
            self.event(
                out,
                "response.content_part.added",
                json!({"output_index": index, "item_id": item_id, "content_index": 0, "part": part}),
            );
        }
    }

    /// Sends the `done` events of the open item and files it in the output.
    fn close(&mut self, out: &mut String) {
        let Some(open) = self.open.take() else {
            return;
        };
        let index = self.output_index();
        let item = match open {
            Open::Reasoning { id, text } => {
                self.event(
                    out,
                    "response.reasoning_text.done",
                    json!({"output_index": index, "item_id": id, "content_index": 0, "text": text}),
                );
                self.event(
                    out,
                    "response.content_part.done",
                    json!({
                        "output_index": index, "item_id": id, "content_index": 0,
                        "part": {"type": "reasoning_text", "text": text},
                    }),
                );
                reasoning_item(&id, text, Some("completed"))
            }
            Open::Message { id, text } => {
                self.event(
                    out,
                    "response.output_text.done",
                    json!({
                        "output_index": index, "item_id": id, "content_index": 0,
                        "text": text, "logprobs": [],
                    }),
                );
                self.event(
                    out,
                    "response.content_part.done",
                    json!({
                        "output_index": index, "item_id": id, "content_index": 0,
                        "part": output_text(text.clone()),
                    }),
                );
                message_item(&id, text, "completed")
            }
            Open::Call {
                id,
                call_id,
                name,
                arguments,
            } => {
                self.event(
                    out,
                    "response.function_call_arguments.done",
                    json!({
                        "output_index": index, "item_id": id, "name": name,
                        "arguments": arguments,
                    }),
                );
                let status = if self.reply.call().is_some() {
                    "completed"
                } else {
                    "incomplete"
                };
                function_call_item(&id, &call_id, &name, arguments, status)
            }
        };
        self.event(
            out,
            "response.output_item.done",
            json!({"output_index": index, "item": item}),
        );
        self.output.push(item);
    }
}

impl StreamFormat for ResponsesStream {
    fn tokens(&self) -> u32 {
        self.reply.completion_tokens
    }

    fn opening(&mut self) -> Option<Bytes> {
        let mut out = String::new();
        let response = self.response("in_progress", Vec::new(), None);
        self.event(
            &mut out,
            "response.created",
            json!({ "response": response }),
        );
        self.event(
            &mut out,
            "response.in_progress",
            json!({ "response": response }),
        );
        Some(Bytes::from(out))
    }

    fn token(&mut self, step: u32) -> Bytes {
        let mut out = String::new();
        let token = self.reply.token(step);
        let word = self.reply.word(token, false);
        let kind = ItemToken::of(token);
        self.open_for(&mut out, kind, &word);
        let index = self.output_index();
        let delta = match &mut self.open {
            Some(Open::Reasoning { id, text }) => {
                text.push_str(&word);
                let event = json!({"output_index": index, "item_id": id, "content_index": 0, "delta": word});
                Some(("response.reasoning_text.delta", event))
            }
            Some(Open::Message { id, text }) => {
                text.push_str(&word);
                let event = json!({
                    "output_index": index, "item_id": id, "content_index": 0,
                    "delta": word, "logprobs": [],
                });
                Some(("response.output_text.delta", event))
            }
            // The name token only opens the call; argument tokens extend it.
            Some(Open::Call { id, arguments, .. }) if kind == ItemToken::CallArguments => {
                arguments.push_str(&word);
                let event = json!({"output_index": index, "item_id": id, "delta": word});
                Some(("response.function_call_arguments.delta", event))
            }
            Some(Open::Call { .. }) | None => None,
        };
        if let Some((kind, event)) = delta {
            self.event(&mut out, kind, event);
        }
        Bytes::from(out)
    }

    fn closing(&mut self) -> Bytes {
        let mut out = String::new();
        self.close(&mut out);
        let usage = self.with_usage.then(|| usage(&self.reply));
        let output = std::mem::take(&mut self.output);
        let response = self.response(status(&self.reply), output, usage);
        self.event(
            &mut out,
            "response.completed",
            json!({ "response": response }),
        );
        Bytes::from(out)
    }

    fn error(&mut self, message: &str) -> Bytes {
        // OpenAI's error event; the stream ends after it, without `response.completed`.
        let mut out = String::new();
        let event = json!({"code": "server_error", "message": message, "param": null});
        self.event(&mut out, "error", event);
        Bytes::from(out)
    }
}
