//! How long a reply is and how it ends: the model's answer cut to the token budget, the
//! same for every one of the `n` choices.

use serde_json::{Map, Value};

use super::answer::{Answer, Body, Script, ToolCall};
use super::wire::ApiError;

/// Most choices (`n`) one request may ask for; a bound of the simulator, not of vLLM,
/// so that one request cannot make it build gigabytes of text.
pub(super) const MAX_CHOICES: u64 = 128;

/// The completion the simulator produces for one request.
///
/// Invariant: `reasoning_tokens <= completion_tokens`; every choice has the same tokens.
#[derive(Clone, Debug)]
pub(super) struct Reply<'a> {
    pub prompt_tokens: u32,
    /// `n`: how many choices there are, all alike.
    pub choices: u32,
    /// Tokens of one choice, reasoning included.
    pub completion_tokens: u32,
    /// Leading tokens of each choice that are reasoning.
    pub reasoning_tokens: u32,
    pub finish_reason: &'static str,
    pub reasoning: Script<'a>,
    pub body: Body<'a>,
}

/// What one token of a choice is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Token<'r> {
    /// A word of reasoning or of the answer; `first` when it opens its part (no space).
    Reasoning {
        index: u32,
        first: bool,
    },
    Text {
        index: u32,
        first: bool,
    },
    /// The function name of a tool call.
    CallName(&'r str),
    /// Characters of a tool call's arguments.
    CallArguments(&'r str),
}

impl<'a> Reply<'a> {
    /// Cuts `answer` to `limit` tokens per choice. A text answer wants `reply_tokens`
    /// tokens, the first `thinking_tokens` of them reasoning; a tool call wants its
    /// reasoning plus the call. Less than wanted ends with `finish_reason: "length"`.
    pub fn plan(
        answer: Answer<'a>,
        prompt_tokens: u32,
        choices: u32,
        limit: u64,
        reply_tokens: u32,
        thinking_tokens: u32,
    ) -> Self {
        let (wanted, complete) = match &answer.body {
            Body::Text(_) => (u64::from(reply_tokens), "stop"),
            Body::Call(call) => (
                u64::from(thinking_tokens) + u64::from(call.tokens()),
                call.finish_reason,
            ),
        };
        let completion = wanted.min(limit);
        let finish_reason = if completion < wanted {
            "length"
        } else {
            complete
        };
        let completion_tokens = saturate_u32(completion);
        Self {
            prompt_tokens,
            choices,
            completion_tokens,
            reasoning_tokens: thinking_tokens.min(completion_tokens),
            finish_reason,
            reasoning: answer.reasoning,
            body: answer.body,
        }
    }

    /// Completion tokens over all choices, as usage reports them.
    pub fn total_completion_tokens(&self) -> u32 {
        self.completion_tokens.saturating_mul(self.choices)
    }

    pub fn token(&self, index: u32) -> Token<'_> {
        if index < self.reasoning_tokens {
            return Token::Reasoning {
                index,
                first: index == 0,
            };
        }
        let index = index - self.reasoning_tokens;
        match &self.body {
            Body::Text(_) => Token::Text {
                index,
                first: index == 0,
            },
            Body::Call(call) if index == 0 => Token::CallName(&call.name),
            Body::Call(call) => Token::CallArguments(call.argument_piece(index)),
        }
    }

    /// The text of a word token as streamed: the word and its punctuation, after a space
    /// unless it opens its part and `space_first` is false.
    pub fn word(&self, token: Token<'_>, space_first: bool) -> String {
        let (script, index, first) = match (token, &self.body) {
            (Token::Reasoning { index, first }, _) => (&self.reasoning, index, first),
            (Token::Text { index, first }, Body::Text(text)) => (text, index, first),
            (Token::CallName(text) | Token::CallArguments(text), _) => return text.to_owned(),
            (Token::Text { .. }, Body::Call(_)) => return String::new(),
        };
        let mut out = String::new();
        if !first || space_first {
            out.push(' ');
        }
        let (word, end) = script.word(index);
        out.push_str(word);
        out.push_str(end);
        out
    }

    /// Tokens of each choice after the reasoning.
    pub fn body_tokens(&self) -> u32 {
        self.completion_tokens - self.reasoning_tokens
    }

    /// The reasoning text, or `None` when there is none.
    pub fn reasoning_text(&self) -> Option<String> {
        (self.reasoning_tokens > 0).then(|| self.reasoning.text(self.reasoning_tokens, false))
    }

    /// The answer's text, or `None` when every token was reasoning or a tool was called.
    /// A call cut short by the token limit is not a call (vLLM's tool parsers only find
    /// complete ones): its arguments so far come back as text.
    /// `space_first`: the first word too comes after a space, as in a legacy completion,
    /// which continues its prompt.
    pub fn content_text(&self, space_first: bool) -> Option<String> {
        let tokens = self.body_tokens();
        if tokens == 0 {
            return None;
        }
        match &self.body {
            Body::Text(text) => Some(text.text(tokens, space_first)),
            Body::Call(_) if self.call().is_some() => None,
            Body::Call(call) => Some(call.arguments_after(tokens).to_owned()),
        }
    }

    /// The tool call, when the reply is one and it was not cut short.
    pub fn call(&self) -> Option<&ToolCall<'a>> {
        match &self.body {
            Body::Call(call) if self.body_tokens() >= call.tokens() => Some(call),
            _ => None,
        }
    }

    pub fn is_call(&self) -> bool {
        matches!(self.body, Body::Call(_))
    }

    pub fn into_owned(self) -> Reply<'static> {
        Reply {
            prompt_tokens: self.prompt_tokens,
            choices: self.choices,
            completion_tokens: self.completion_tokens,
            reasoning_tokens: self.reasoning_tokens,
            finish_reason: self.finish_reason,
            reasoning: self.reasoning.into_owned(),
            body: match self.body {
                Body::Text(text) => Body::Text(text.into_owned()),
                Body::Call(call) => Body::Call(call.into_owned()),
            },
        }
    }
}

/// The most completion tokens a request may have per choice: `max_tokens` if it fits the
/// context window with the prompt, else the rest of the window (vLLM's 400s otherwise).
pub(super) fn completion_limit(
    prompt_tokens: u64,
    max_tokens: Option<u64>,
    context: u64,
) -> Result<u64, ApiError> {
    match max_tokens {
        Some(max) if prompt_tokens.saturating_add(max) > context => Err(ApiError::bad_request(
            format!(
                "This model's maximum context length is {context} tokens. However, you \
                     requested {} tokens ({prompt_tokens} in the messages, {max} in the \
                     completion). Please reduce the length of the messages or completion.",
                prompt_tokens.saturating_add(max)
            ),
            None,
        )),
        Some(max) => Ok(max),
        None if prompt_tokens >= context => Err(ApiError::bad_request(
            format!(
                "This model's maximum context length is {context} tokens. However, your \
                 request has {prompt_tokens} input tokens. Please reduce the length of the \
                 input messages."
            ),
            None,
        )),
        // Without max_tokens vLLM generates up to the end of the context window.
        None => Ok(context - prompt_tokens),
    }
}

pub(super) fn saturate_u32(value: u64) -> u32 {
    u32::try_from(value).unwrap_or(u32::MAX)
}

/// `n`: absent means one; vLLM refuses zero.
pub(super) fn choices(body: &Map<String, Value>) -> Result<u32, ApiError> {
    match optional_u64(body, "n")? {
        None => Ok(1),
        Some(0) => Err(ApiError::bad_request(
            "n must be at least 1, got 0.",
            Some("n"),
        )),
        Some(n) if n > MAX_CHOICES => Err(ApiError::bad_request(
            format!("n must be at most {MAX_CHOICES} in the simulator, got {n}."),
            Some("n"),
        )),
        Some(n) => Ok(saturate_u32(n)),
    }
}

pub(super) fn optional_u64(
    body: &Map<String, Value>,
    field: &'static str,
) -> Result<Option<u64>, ApiError> {
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

pub(super) fn optional_bool(
    body: &Map<String, Value>,
    field: &'static str,
) -> Result<Option<bool>, ApiError> {
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

/// `stream_options`: `(include_usage, continuous_usage_stats)`; vLLM refuses them without
/// `stream: true`, and continuous stats ride on `include_usage`.
pub(super) fn stream_options(
    body: &Map<String, Value>,
    stream: bool,
) -> Result<(bool, bool), ApiError> {
    match body.get("stream_options") {
        None | Some(Value::Null) => Ok((false, false)),
        Some(_) if !stream => Err(ApiError::bad_request(
            "Stream options can only be defined when `stream=True`.",
            Some("stream_options"),
        )),
        Some(Value::Object(options)) => {
            let include = optional_bool(options, "include_usage")?.unwrap_or(false);
            let continuous = optional_bool(options, "continuous_usage_stats")?.unwrap_or(false);
            Ok((include, include && continuous))
        }
        Some(_) => Err(ApiError::bad_request(
            "stream_options: Input should be an object",
            Some("stream_options"),
        )),
    }
}
