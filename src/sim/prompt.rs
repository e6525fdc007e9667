//! What the simulator reads from a prompt: how many tokens it is (estimated, there is no
//! tokenizer) and what its last turn asks. Everything here borrows from the request body.

use serde_json::Value;

/// Chat-template overhead charged per message (role markers and separators).
pub(super) const TOKENS_PER_MESSAGE: u64 = 4;
/// Tokens charged per image part, whatever the image.
pub(super) const TOKENS_PER_IMAGE: u64 = 256;

/// Deterministic stand-in for tokenising a chat prompt.
///
/// Each message costs [`TOKENS_PER_MESSAGE`] (4) tokens, plus `ceil(chars / 4)` for each
/// piece of text — a string `content`, or every text part of a list `content`
/// (`{"type":"text"}`, or the Responses API's `input_text` / `output_text`) — plus
/// [`TOKENS_PER_IMAGE`] (256) for every image part (`image_url`, `input_image`).
/// A Responses API tool result (`function_call_output`) costs its `output` like text.
/// Characters are Unicode scalar values; other part types and fields cost nothing.
pub(super) fn estimate_prompt_tokens(messages: &[Value]) -> u64 {
    messages
        .iter()
        .map(|message| {
            let content = match message.get("content").or_else(|| message.get("output")) {
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
        Some("text" | "input_text" | "output_text") => part
            .get("text")
            .and_then(Value::as_str)
            .map_or(0, text_tokens),
        Some("image_url" | "input_image") => TOKENS_PER_IMAGE,
        _ => 0,
    }
}

/// `ceil(chars / 4)`: the simulator's token count for a piece of text.
pub(super) fn text_tokens(text: &str) -> u64 {
    // usize -> u64 never truncates on supported targets.
    (text.chars().count() as u64).div_ceil(4)
}

/// What the last turn of a conversation asks, borrowed from the request body.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Question<'a> {
    /// The last user message's text (its last text part); `""` when there is none.
    pub text: &'a str,
    /// Image parts in the whole conversation: the model sees all of them.
    pub images: u32,
    /// Set when the conversation ends with a tool's result.
    pub tool_result: Option<ToolResult<'a>>,
}

/// A tool's answer the model is asked to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct ToolResult<'a> {
    /// The called function, when the call that asked for this result is in the history.
    pub name: Option<&'a str>,
    pub output: &'a str,
}

impl<'a> Question<'a> {
    /// Reads a chat `messages` list or a Responses API `input` item list (both may mix
    /// plain `{"role","content"}` messages with tool calls and their results).
    pub fn from_messages(messages: &'a [Value]) -> Self {
        let mut question = Self::default();
        for message in messages {
            if let Some(Value::Array(parts)) = message.get("content") {
                let images = parts
                    .iter()
                    .filter(|part| is_image(part.get("type").and_then(Value::as_str)))
                    .count();
                question.images = question
                    .images
                    .saturating_add(u32::try_from(images).unwrap_or(u32::MAX));
            }
        }
        if let Some(text) = messages
            .iter()
            .rev()
            .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
            .and_then(|m| m.get("content"))
            .and_then(content_text)
        {
            question.text = text;
        }
        question.tool_result = messages.last().and_then(|last| tool_result(last, messages));
        question
    }

    /// A bare prompt, as the legacy completions API sends it.
    pub fn from_text(text: &'a str) -> Self {
        Self {
            text,
            ..Self::default()
        }
    }
}

fn is_image(kind: Option<&str>) -> bool {
    matches!(kind, Some("image_url" | "input_image"))
}

/// A string `content`, or the last text part of a list `content`.
fn content_text(content: &Value) -> Option<&str> {
    match content {
        Value::String(text) => Some(text),
        Value::Array(parts) => {
            parts
                .iter()
                .rev()
                .find_map(|part| match part.get("type").and_then(Value::as_str) {
                    Some("text" | "input_text" | "output_text") => part.get("text")?.as_str(),
                    _ => None,
                })
        }
        _ => None,
    }
}

/// `last` as a tool result: a chat `{"role":"tool","tool_call_id","content"}` message or a
/// Responses API `{"type":"function_call_output","call_id","output"}` item.
fn tool_result<'a>(last: &'a Value, history: &'a [Value]) -> Option<ToolResult<'a>> {
    let (output, call_id) = if last.get("role").and_then(Value::as_str) == Some("tool") {
        (
            last.get("content").and_then(content_text)?,
            last.get("tool_call_id").and_then(Value::as_str),
        )
    } else if last.get("type").and_then(Value::as_str) == Some("function_call_output") {
        (
            last.get("output").and_then(content_text)?,
            last.get("call_id").and_then(Value::as_str),
        )
    } else {
        return None;
    };
    let name = call_id.and_then(|id| called_function(id, history));
    Some(ToolResult { name, output })
}

/// The name of the function the call `id` asked for: an assistant message's
/// `tool_calls[].id` (chat) or a `{"type":"function_call","call_id"}` item (Responses).
fn called_function<'a>(id: &str, history: &'a [Value]) -> Option<&'a str> {
    history.iter().rev().find_map(|item| {
        if item.get("type").and_then(Value::as_str) == Some("function_call") {
            return (item.get("call_id").and_then(Value::as_str) == Some(id))
                .then(|| item.get("name")?.as_str())
                .flatten();
        }
        item.get("tool_calls")?
            .as_array()?
            .iter()
            .find(|call| call.get("id").and_then(Value::as_str) == Some(id))?
            .get("function")?
            .get("name")?
            .as_str()
    })
}
