//! `POST /v1/completions`, the legacy text-completion API: the model continues each
//! prompt (no chat template, so no reasoning part), `n` times each.

use bytes::Bytes;
use serde_json::{Map, Value};

use super::answer::answer;
use super::config::SimulatorConfig;
use super::models::{Api, check_model};
use super::prompt::{Question, text_tokens};
use super::reply::{
    Reply, choices, completion_limit, optional_bool, optional_u64, saturate_u32, stream_options,
};
use super::stream::{DONE, StreamFormat, error_then_done, push_sse};
use super::wire::{ApiError, object, unix_now, usage_json};

/// vLLM's default `max_tokens` for completions (OpenAI's too): a request that sets none
/// gets at most 16 tokens.
const DEFAULT_MAX_TOKENS: u64 = 16;

/// Tokens a text prompt costs beyond its text: the BOS token vLLM adds
/// (`add_special_tokens` defaults to true for completions).
const SPECIAL_TOKENS: u64 = 1;

/// The fields of a completion request the simulator acts on.
#[derive(Debug)]
pub(super) struct CompletionRequest<'a> {
    pub stream: bool,
    include_usage: bool,
    continuous_usage: bool,
    echo: bool,
    /// One per prompt, in order. Invariant: all have the same `completion_tokens` and
    /// `choices`, so choice `i` of the response is choice `i % n` of prompt `i / n`.
    prompts: Vec<Prompt<'a>>,
}

#[derive(Debug)]
struct Prompt<'a> {
    /// The prompt as text, for `echo`; `None` for token ids (there is no tokenizer).
    text: Option<&'a str>,
    reply: Reply<'a>,
}

impl<'a> CompletionRequest<'a> {
    /// Validates `body` the way vLLM would.
    pub fn parse(body: &'a Value, config: &SimulatorConfig) -> Result<Self, ApiError> {
        let Value::Object(body) = body else {
            return Err(ApiError::bad_request(
                "Request body must be a JSON object",
                None,
            ));
        };
        check_model(body, config, Api::Completions)?;
        let prompts = read_prompts(body)?;
        if body.get("suffix").is_some_and(|s| !s.is_null()) {
            return Err(ApiError::bad_request(
                "suffix is not currently supported",
                Some("suffix"),
            ));
        }
        let echo = optional_bool(body, "echo")?.unwrap_or(false);
        let max_tokens = optional_u64(body, "max_tokens")?.unwrap_or(DEFAULT_MAX_TOKENS);
        // With echo, zero tokens means "just the prompt back".
        if max_tokens == 0 && !echo {
            return Err(ApiError::bad_request(
                "max_tokens must be at least 1, got 0.",
                Some("max_tokens"),
            ));
        }
        let choices = choices(body)?;
        let stream = optional_bool(body, "stream")?.unwrap_or(false);
        let (include_usage, continuous_usage) = stream_options(body, stream)?;
        let context = u64::from(config.max_model_len);
        let prompts = prompts
            .into_iter()
            .map(|prompt| {
                let (text, tokens, question) = match prompt {
                    PromptInput::Text(text) => (
                        Some(text),
                        text_tokens(text) + SPECIAL_TOKENS,
                        Question::from_text(text),
                    ),
                    PromptInput::Tokens(count) => (None, count, Question::default()),
                };
                let limit = completion_limit(tokens, Some(max_tokens), context)?;
                let reply = Reply::plan(
                    answer(&question, None),
                    saturate_u32(tokens),
                    choices,
                    limit,
                    config.reply_tokens,
                    0,
                );
                Ok(Prompt { text, reply })
            })
            .collect::<Result<Vec<_>, ApiError>>()?;
        Ok(Self {
            stream,
            include_usage,
            continuous_usage,
            echo,
            prompts,
        })
    }

    /// Completion tokens over all prompts and choices.
    pub fn completion_tokens(&self) -> u32 {
        self.prompts.iter().fold(0, |sum, p| {
            sum.saturating_add(p.reply.total_completion_tokens())
        })
    }

    /// Tokens of one choice (all are alike), for the time a JSON answer takes.
    pub fn tokens_per_choice(&self) -> u32 {
        self.prompts
            .first()
            .map_or(0, |prompt| prompt.reply.completion_tokens)
    }

    fn prompt_tokens(&self) -> u32 {
        self.prompts
            .iter()
            .fold(0, |sum, p| sum.saturating_add(p.reply.prompt_tokens))
    }

    /// The `text_completion` object.
    pub fn json(&self, id: &str, model: &str, with_usage: bool) -> Value {
        let mut choices = Vec::new();
        for prompt in &self.prompts {
            let reply = &prompt.reply;
            let text = reply.content_text(true).unwrap_or_default();
            let text = match prompt.text {
                Some(echo) if self.echo => format!("{echo}{text}"),
                _ => text,
            };
            for _ in 0..reply.choices {
                choices.push(object([
                    ("index", Value::from(choices.len())),
                    ("text", Value::String(text.clone())),
                    ("logprobs", Value::Null),
                    ("finish_reason", Value::from(reply.finish_reason)),
                    ("stop_reason", Value::Null),
                    ("prompt_logprobs", Value::Null),
                ]));
            }
        }
        let mut completion = object([
            ("id", Value::from(id)),
            ("object", Value::from("text_completion")),
            ("created", Value::from(unix_now())),
            ("model", Value::from(model)),
            ("choices", Value::Array(choices)),
        ]);
        if with_usage {
            completion["usage"] = usage_json(self.prompt_tokens(), self.completion_tokens());
        }
        completion
    }

    pub fn into_stream(self, id: String, model: String, with_usage: bool) -> CompletionStream {
        let prompt_tokens = self.prompt_tokens();
        let prompts = self
            .prompts
            .into_iter()
            .map(|p| {
                (
                    p.text.filter(|_| self.echo).map(str::to_owned),
                    p.reply.into_owned(),
                )
            })
            .collect();
        CompletionStream {
            id,
            created: unix_now(),
            model,
            include_usage: self.include_usage && with_usage,
            continuous_usage: self.continuous_usage && with_usage,
            prompt_tokens,
            prompts,
        }
    }
}

/// One prompt of the request: text, or token ids (of which only the count matters).
enum PromptInput<'a> {
    Text(&'a str),
    Tokens(u64),
}

/// `prompt`: a string, a list of strings, a list of token ids, or a list of such lists.
fn read_prompts(body: &Map<String, Value>) -> Result<Vec<PromptInput<'_>>, ApiError> {
    let empty = || {
        ApiError::bad_request(
            "Either prompt or prompt_embeds must be provided and non-empty.",
            Some("prompt"),
        )
    };
    let invalid = || {
        ApiError::bad_request(
            "prompt: Input should be a valid string, a list of strings, a list of token ids \
             or a list of lists of token ids",
            Some("prompt"),
        )
    };
    let token_count = |ids: &[Value]| {
        if ids.iter().all(Value::is_u64) {
            Ok(ids.len() as u64)
        } else {
            Err(invalid())
        }
    };
    match body.get("prompt") {
        None | Some(Value::Null) => Err(empty()),
        Some(Value::String(text)) if text.is_empty() => Err(empty()),
        Some(Value::String(text)) => Ok(vec![PromptInput::Text(text)]),
        Some(Value::Array(items)) if items.is_empty() => Err(empty()),
        Some(Value::Array(items)) if items.iter().all(Value::is_number) => {
            Ok(vec![PromptInput::Tokens(token_count(items)?)])
        }
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                Value::String(text) => Ok(PromptInput::Text(text)),
                Value::Array(ids) => Ok(PromptInput::Tokens(token_count(ids)?)),
                _ => Err(invalid()),
            })
            .collect(),
        Some(_) => Err(invalid()),
    }
}

/// A completion as `text_completion` chunks: one per token with the choices taking
/// turns (a choice's first chunk starts with its prompt under `echo`), a finish chunk per
/// choice, the usage chunk if asked for, and `[DONE]`. No role chunk: this API has none.
pub(super) struct CompletionStream {
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
    continuous_usage: bool,
    prompt_tokens: u32,
    /// Per prompt: the text to echo, if any, and the reply.
    prompts: Vec<(Option<String>, Reply<'static>)>,
}

impl CompletionStream {
    fn choices_per_prompt(&self) -> u32 {
        self.prompts
            .first()
            .map_or(1, |(_, reply)| reply.choices.max(1))
    }

    fn all_choices(&self) -> u32 {
        self.choices_per_prompt()
            .saturating_mul(u32::try_from(self.prompts.len()).unwrap_or(u32::MAX))
    }

    fn tokens_per_choice(&self) -> u32 {
        self.prompts
            .first()
            .map_or(0, |(_, reply)| reply.completion_tokens)
    }

    /// The prompt (echo text and reply) of response choice `index`.
    fn prompt(&self, index: u32) -> Option<&(Option<String>, Reply<'static>)> {
        self.prompts
            .get((index / self.choices_per_prompt()) as usize)
    }

    fn chunk(
        &self,
        out: &mut String,
        index: u32,
        text: String,
        finish_reason: Option<&str>,
        completion_tokens: u32,
    ) {
        let mut chunk = object([
            ("id", Value::from(self.id.as_str())),
            ("object", Value::from("text_completion")),
            ("created", Value::from(self.created)),
            ("model", Value::from(self.model.as_str())),
            (
                "choices",
                Value::Array(vec![object([
                    ("index", Value::from(index)),
                    ("text", Value::String(text)),
                    ("logprobs", Value::Null),
                    (
                        "finish_reason",
                        finish_reason.map_or(Value::Null, Value::from),
                    ),
                    ("stop_reason", Value::Null),
                ])]),
            ),
        ]);
        if self.continuous_usage {
            let prompt_tokens = self
                .prompt(index)
                .map_or(0, |(_, reply)| reply.prompt_tokens);
            chunk["usage"] = usage_json(prompt_tokens, completion_tokens);
        }
        push_sse(out, &chunk);
    }
}

impl StreamFormat for CompletionStream {
    fn tokens(&self) -> u32 {
        self.all_choices().saturating_mul(self.tokens_per_choice())
    }

    fn opening(&mut self) -> Option<Bytes> {
        None
    }

    fn token(&mut self, step: u32) -> Bytes {
        let choices = self.all_choices().max(1);
        let (index, token) = (step % choices, step / choices);
        let mut text = String::new();
        if let Some((echo, reply)) = self.prompt(index) {
            if token == 0 {
                text.push_str(echo.as_deref().unwrap_or_default());
            }
            text.push_str(&reply.word(reply.token(token), true));
        }
        let mut out = String::new();
        self.chunk(&mut out, index, text, None, token + 1);
        Bytes::from(out)
    }

    fn closing(&mut self) -> Bytes {
        let mut out = String::new();
        let tokens = self.tokens_per_choice();
        for index in 0..self.all_choices() {
            let Some((echo, reply)) = self.prompt(index) else {
                continue;
            };
            // With no token to carry it (echo and max_tokens 0), the prompt comes here.
            let text = match echo {
                Some(echo) if tokens == 0 => echo.clone(),
                _ => String::new(),
            };
            let finish = Some(reply.finish_reason);
            self.chunk(&mut out, index, text, finish, tokens);
        }
        if self.include_usage {
            let completion_tokens = self.tokens();
            let usage = object([
                ("id", Value::from(self.id.as_str())),
                ("object", Value::from("text_completion")),
                ("created", Value::from(self.created)),
                ("model", Value::from(self.model.as_str())),
                ("choices", Value::Array(Vec::new())),
                ("usage", usage_json(self.prompt_tokens, completion_tokens)),
            ]);
            push_sse(&mut out, &usage);
        }
        out.push_str(DONE);
        Bytes::from(out)
    }

    fn error(&mut self, message: &str) -> Bytes {
        error_then_done(message)
    }
}
