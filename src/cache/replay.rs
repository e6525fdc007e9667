//! A kept answer in the other shape: a JSON chat completion replayed as the chunks of a
//! stream, and a stream's chunks put together into the JSON answer that is kept.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde_json::{Map, Value, json};

/// The `data:` payloads of a stream that says what the chat completion `body` says: per
/// choice one chunk with the whole message and one with its `finish_reason`, then the usage
/// chunk when `include_usage`. `None` when `body` is not a chat completion.
pub fn chat_chunks(body: &[u8], include_usage: bool) -> Option<Vec<Bytes>> {
    let answer: Map<String, Value> = serde_json::from_slice(body).ok()?;
    let choices = answer.get("choices")?.as_array()?;
    let chunk = |choices: Value| {
        let mut chunk = Map::new();
        for member in ["id", "created", "model", "system_fingerprint"] {
            if let Some(value) = answer.get(member) {
                chunk.insert(member.to_owned(), value.clone());
            }
        }
        chunk.insert("object".into(), "chat.completion.chunk".into());
        chunk.insert("choices".into(), choices);
        chunk
    };
    let mut out = Vec::with_capacity(choices.len() * 2 + 1);
    for (n, choice) in choices.iter().enumerate() {
        let index = choice.get("index").cloned().unwrap_or(json!(n));
        let mut delta = choice.get("message")?.as_object()?.clone();
        delta.retain(|_, value| !value.is_null());
        if let Some(Value::Array(calls)) = delta.get_mut("tool_calls") {
            // A streamed tool call names its place in the list.
            for (i, call) in calls.iter_mut().enumerate() {
                if let Some(call) = call.as_object_mut() {
                    call.insert("index".into(), json!(i));
                }
            }
        }
        out.push(to_bytes(&chunk(json!([{
            "index": index, "delta": delta, "logprobs": null, "finish_reason": null
        }])))?);
        out.push(to_bytes(&chunk(json!([{
            "index": index,
            "delta": {},
            "logprobs": null,
            "finish_reason": choice.get("finish_reason").cloned().unwrap_or(Value::Null)
        }])))?);
    }
    if include_usage && let Some(usage) = answer.get("usage") {
        let mut last = chunk(json!([]));
        last.insert("usage".into(), usage.clone());
        out.push(to_bytes(&last)?);
    }
    Some(out)
}

fn to_bytes(value: &Map<String, Value>) -> Option<Bytes> {
    serde_json::to_vec(value).ok().map(Bytes::from)
}

/// Gathers a chat completion stream's chunks into the JSON answer it amounts to, so that a
/// streamed answer can be kept and served again to JSON and stream clients alike.
#[derive(Debug, Default)]
pub struct CompletionAssembler {
    head: Map<String, Value>,
    choices: BTreeMap<u64, AssembledChoice>,
    usage: Option<Value>,
    /// Something this does not put together (tool calls, logprobs, an unreadable chunk):
    /// the answer is not kept.
    unsure: bool,
}

#[derive(Debug, Default)]
struct AssembledChoice {
    role: Option<String>,
    content: String,
    reasoning: Option<String>,
    finish_reason: Option<Value>,
}

impl CompletionAssembler {
    /// One chunk's `data:` JSON.
    pub fn push(&mut self, data: &[u8]) {
        if self.unsure {
            return;
        }
        let Ok(Value::Object(mut chunk)) = serde_json::from_slice::<Value>(data) else {
            self.unsure = true;
            return;
        };
        if let Some(usage) = chunk.remove("usage").filter(|u| !u.is_null()) {
            self.usage = Some(usage);
        }
        for member in ["id", "created", "model", "system_fingerprint"] {
            if let Some(value) = chunk.remove(member)
                && !self.head.contains_key(member)
            {
                self.head.insert(member.to_owned(), value);
            }
        }
        let Some(Value::Array(choices)) = chunk.remove("choices") else {
            return;
        };
        for choice in choices {
            let index = choice.get("index").and_then(Value::as_u64).unwrap_or(0);
            let entry = self.choices.entry(index).or_default();
            if choice.get("logprobs").is_some_and(|l| !l.is_null()) {
                self.unsure = true;
                return;
            }
            if let Some(delta) = choice.get("delta").and_then(Value::as_object) {
                for (name, value) in delta {
                    match (name.as_str(), value) {
                        (_, Value::Null) => {}
                        ("role", Value::String(role)) => entry.role = Some(role.clone()),
                        ("content", Value::String(text)) => entry.content.push_str(text),
                        ("reasoning_content", Value::String(text)) => entry
                            .reasoning
                            .get_or_insert_with(String::new)
                            .push_str(text),
                        _ => {
                            self.unsure = true;
                            return;
                        }
                    }
                }
            }
            if let Some(reason) = choice.get("finish_reason").filter(|r| !r.is_null()) {
                entry.finish_reason = Some(reason.clone());
            }
        }
    }

    /// The JSON answer, when the stream was whole: every choice finished, usage reported.
    pub fn finish(self) -> Option<Bytes> {
        if self.unsure
            || self.choices.is_empty()
            || self.choices.values().any(|c| c.finish_reason.is_none())
        {
            return None;
        }
        let usage = self.usage?;
        let mut answer = self.head;
        answer.insert("object".into(), "chat.completion".into());
        let choices: Vec<Value> = self
            .choices
            .into_iter()
            .map(|(index, c)| {
                let mut message = Map::new();
                message.insert(
                    "role".into(),
                    c.role.unwrap_or_else(|| "assistant".into()).into(),
                );
                message.insert("content".into(), c.content.into());
                if let Some(reasoning) = c.reasoning {
                    message.insert("reasoning_content".into(), reasoning.into());
                }
                json!({
                    "index": index,
                    "message": message,
                    "logprobs": null,
                    "finish_reason": c.finish_reason,
                })
            })
            .collect();
        answer.insert("choices".into(), choices.into());
        answer.insert("usage".into(), usage);
        serde_json::to_vec(&answer).ok().map(Bytes::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ANSWER: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","created":7,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"Hello there","reasoning_content":"think"},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#;

    #[test]
    fn an_answer_replayed_as_chunks_assembles_back_to_the_same_answer() {
        let chunks = chat_chunks(ANSWER.as_bytes(), true).unwrap();
        assert_eq!(chunks.len(), 3, "message, finish, usage");
        let mut assembler = CompletionAssembler::default();
        for chunk in &chunks {
            assembler.push(chunk);
        }
        let again: Value = serde_json::from_slice(&assembler.finish().unwrap()).unwrap();
        let original: Value = serde_json::from_str(ANSWER).unwrap();
        assert_eq!(again, original);
    }

    #[test]
    fn usage_is_replayed_only_when_asked_for() {
        let chunks = chat_chunks(ANSWER.as_bytes(), false).unwrap();
        assert!(
            chunks
                .iter()
                .all(|c| !c.windows(7).any(|w| w == b"\"usage\""))
        );
    }

    #[test]
    fn a_stream_without_its_finish_or_usage_is_not_an_answer() {
        let mut cut = CompletionAssembler::default();
        cut.push(
            br#"{"id":"x","choices":[{"index":0,"delta":{"content":"Hel"},"finish_reason":null}]}"#,
        );
        cut.push(br#"{"id":"x","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1}}"#);
        assert!(cut.finish().is_none());
        let mut no_usage = CompletionAssembler::default();
        no_usage.push(br#"{"id":"x","choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":"stop"}]}"#);
        assert!(no_usage.finish().is_none());
    }
}
