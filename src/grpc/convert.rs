//! Proto ⇄ OpenAI JSON: requests become the JSON body the REST door would have received,
//! answers and stream chunks are read back into proto messages.

use std::borrow::Cow;

use base64::Engine;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::pb;
use crate::core::GatewayError;
use crate::upstream::sse;

/// The JSON body for a proto request; `stream` also asks for the final usage chunk.
pub fn request_json(request: &pb::ChatRequest, stream: bool) -> Result<Bytes, GatewayError> {
    let mut body = match &request.extra {
        Some(extra) => struct_to_json(extra),
        None => Map::new(),
    };
    body.insert("model".into(), request.model.clone().into());
    let messages: Vec<Value> = request
        .messages
        .iter()
        .enumerate()
        .map(|(i, m)| message_json(i, m))
        .collect::<Result<_, _>>()?;
    body.insert("messages".into(), messages.into());
    let mut set = |name: &str, value: Option<Value>| {
        if let Some(value) = value {
            body.insert(name.into(), value);
        }
    };
    set("max_tokens", request.max_tokens.map(Value::from));
    set("temperature", request.temperature.map(|v| json!(v)));
    set("top_p", request.top_p.map(|v| json!(v)));
    set("seed", request.seed.map(Value::from));
    set(
        "presence_penalty",
        request.presence_penalty.map(|v| json!(v)),
    );
    set(
        "frequency_penalty",
        request.frequency_penalty.map(|v| json!(v)),
    );
    set("n", request.n.map(Value::from));
    if !request.stop.is_empty() {
        set("stop", Some(request.stop.clone().into()));
    }
    if stream {
        set("stream", Some(true.into()));
        set("stream_options", Some(json!({"include_usage": true})));
    } else {
        body.remove("stream");
        body.remove("stream_options");
    }
    serde_json::to_vec(&body)
        .map(Bytes::from)
        .map_err(|e| GatewayError::invalid_request(e.to_string(), None))
}

fn message_json(index: usize, message: &pb::Message) -> Result<Value, GatewayError> {
    let content = if message.parts.is_empty() {
        Value::from(message.text.clone())
    } else {
        let parts: Vec<Value> = message
            .parts
            .iter()
            .enumerate()
            .map(|(j, part)| part_json(index, j, part))
            .collect::<Result<_, _>>()?;
        parts.into()
    };
    let mut object = Map::new();
    object.insert("role".into(), message.role.clone().into());
    object.insert("content".into(), content);
    if let Some(name) = &message.name {
        object.insert("name".into(), name.clone().into());
    }
    Ok(object.into())
}

fn part_json(message: usize, index: usize, part: &pb::ContentPart) -> Result<Value, GatewayError> {
    let field = || format!("messages[{message}].parts[{index}]");
    match &part.part {
        Some(pb::content_part::Part::Text(text)) => Ok(json!({"type": "text", "text": text})),
        Some(pb::content_part::Part::ImageUrl(image)) => {
            let mut url = json!({"url": image.url});
            if let Some(detail) = &image.detail {
                url["detail"] = detail.clone().into();
            }
            Ok(json!({"type": "image_url", "image_url": url}))
        }
        Some(pb::content_part::Part::Image(image)) => {
            if !image.mime_type.starts_with("image/") {
                return Err(GatewayError::invalid_request(
                    format!(
                        "`{}.image.mime_type` must be an image type such as image/png",
                        field()
                    ),
                    Some(&format!("{}.image.mime_type", field())),
                ));
            }
            let data = base64::engine::general_purpose::STANDARD.encode(&image.data);
            let url = format!("data:{};base64,{data}", image.mime_type);
            Ok(json!({"type": "image_url", "image_url": {"url": url}}))
        }
        None => Err(GatewayError::invalid_request(
            format!("`{}` has no content", field()),
            Some(&field()),
        )),
    }
}

pub fn struct_to_json(value: &prost_types::Struct) -> Map<String, Value> {
    value
        .fields
        .iter()
        .map(|(k, v)| (k.clone(), value_to_json(v)))
        .collect()
}

fn value_to_json(value: &prost_types::Value) -> Value {
    use prost_types::value::Kind;
    match &value.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::NumberValue(n)) => {
            // Protobuf numbers are doubles; integral ones go out as integers (`top_k: 20`).
            if n.fract() == 0.0 && n.abs() < 9.0e15 {
                Value::from(*n as i64)
            } else {
                json!(n)
            }
        }
        Some(Kind::StringValue(s)) => s.clone().into(),
        Some(Kind::BoolValue(b)) => (*b).into(),
        Some(Kind::StructValue(s)) => struct_to_json(s).into(),
        Some(Kind::ListValue(list)) => list
            .values
            .iter()
            .map(value_to_json)
            .collect::<Vec<_>>()
            .into(),
    }
}

#[derive(Deserialize)]
struct CompletionView {
    #[serde(default)]
    id: String,
    #[serde(default)]
    model: String,
    #[serde(default)]
    created: i64,
    #[serde(default)]
    choices: Vec<ChoiceView>,
    #[serde(default)]
    usage: Option<UsageView>,
}

#[derive(Deserialize)]
struct ChoiceView {
    #[serde(default)]
    index: u32,
    #[serde(default)]
    message: Option<MessageView>,
    #[serde(default)]
    delta: Option<MessageView>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct MessageView {
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    reasoning_content: Option<String>,
}

#[derive(Deserialize)]
struct UsageView {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
}

impl From<UsageView> for pb::Usage {
    fn from(u: UsageView) -> Self {
        pb::Usage {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            // Counts come from the upstream's JSON: near u64::MAX the sum must not overflow.
            total_tokens: u.prompt_tokens.saturating_add(u.completion_tokens),
        }
    }
}

fn unreadable(what: &str, e: &serde_json::Error) -> GatewayError {
    GatewayError::Upstream {
        status: 502,
        message: format!("the model server sent an unreadable {what}: {e}"),
        kind: Some("upstream_error".into()),
        param: None,
        code: None,
    }
}

/// A whole OpenAI chat completion as a proto answer.
pub fn response_proto(body: &[u8]) -> Result<pb::ChatResponse, GatewayError> {
    let view: CompletionView =
        serde_json::from_slice(body).map_err(|e| unreadable("answer", &e))?;
    Ok(pb::ChatResponse {
        id: view.id,
        model: view.model,
        created: view.created,
        choices: view
            .choices
            .into_iter()
            .map(|c| {
                let message = c.message.unwrap_or(MessageView {
                    role: None,
                    content: None,
                    reasoning_content: None,
                });
                pb::Choice {
                    index: c.index,
                    message: Some(pb::AssistantMessage {
                        role: message.role.unwrap_or_else(|| "assistant".into()),
                        content: message.content.unwrap_or_default(),
                        reasoning_content: message.reasoning_content,
                    }),
                    finish_reason: c.finish_reason.unwrap_or_default(),
                }
            })
            .collect(),
        usage: view.usage.map(Into::into),
    })
}

/// One SSE event of a stream, read for the gRPC door.
#[derive(Debug, PartialEq)]
pub enum StreamEvent {
    Chunk(pb::ChatChunk),
    /// The upstream (or the gateway) ended the stream with an error.
    Error(String),
    Done,
    /// A comment or keep-alive.
    Nothing,
}

pub fn stream_event(event: &[u8]) -> Result<StreamEvent, GatewayError> {
    let Some(data) = event_data(event) else {
        return Ok(StreamEvent::Nothing);
    };
    if data.trim_ascii() == b"[DONE]" {
        return Ok(StreamEvent::Done);
    }
    // The usual chunk, read once: `sse::inspect` (the error) and the chunk itself would each
    // parse it again. Whatever this one parse does not take falls to `stream_event_slow`, so
    // every odd event (not an object, not UTF-8, a field of the wrong type) reads as before:
    // when this parse succeeds, both of the slow path's succeed on the same members.
    if data.trim_ascii_start().starts_with(b"{")
        && let Ok(text) = std::str::from_utf8(&data)
        && let Ok(view) = serde_json::from_str::<ChunkView<'_>>(text)
    {
        return Ok(match view.error {
            Some(raw) => StreamEvent::Error(error_message(raw)),
            None => StreamEvent::Chunk(chunk_proto(CompletionView {
                id: view.id,
                model: view.model,
                created: view.created,
                choices: view.choices,
                usage: view.usage,
            })),
        });
    }
    stream_event_slow(event)
}

/// [`CompletionView`] with the `error` member `sse::inspect` looks for (not `flatten`ed:
/// that would read through serde's buffered map).
#[derive(Deserialize)]
struct ChunkView<'a> {
    #[serde(default)]
    id: String,
    #[serde(default)]
    model: String,
    #[serde(default)]
    created: i64,
    #[serde(default)]
    choices: Vec<ChoiceView>,
    #[serde(default)]
    usage: Option<UsageView>,
    #[serde(default, borrow)]
    error: Option<&'a serde_json::value::RawValue>,
}

/// An error event's message as `sse::inspect` reads it: `error.message`, else the raw value.
fn error_message(raw: &serde_json::value::RawValue) -> String {
    #[derive(Deserialize)]
    struct ErrorView {
        #[serde(default)]
        message: Option<String>,
    }
    serde_json::from_str::<ErrorView>(raw.get())
        .ok()
        .and_then(|e| e.message)
        .unwrap_or_else(|| raw.get().to_owned())
}

/// The joined `data:` lines of an event, as `sse::event_data` joins them, borrowed when
/// there is one line (vLLM sends one).
fn event_data(event: &[u8]) -> Option<Cow<'_, [u8]>> {
    let mut data: Option<Cow<'_, [u8]>> = None;
    let mut rest = event;
    while !rest.is_empty() {
        let (line, next) = match memchr::memchr(b'\n', rest) {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, &rest[rest.len()..]),
        };
        rest = next;
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(value) = line.strip_prefix(b"data:") {
            let value = value.strip_prefix(b" ").unwrap_or(value);
            match &mut data {
                Some(existing) => {
                    let existing = existing.to_mut();
                    existing.push(b'\n');
                    existing.extend_from_slice(value);
                }
                None => data = Some(Cow::Borrowed(value)),
            }
        }
    }
    data
}

/// The reading of an event the one-parse path of [`stream_event`] does not take.
fn stream_event_slow(event: &[u8]) -> Result<StreamEvent, GatewayError> {
    let Some(data) = sse::event_data(event) else {
        return Ok(StreamEvent::Nothing);
    };
    if data.trim_ascii() == b"[DONE]" {
        return Ok(StreamEvent::Done);
    }
    let info = sse::inspect(event);
    if let Some(message) = info.error {
        return Ok(StreamEvent::Error(message));
    }
    let view: CompletionView =
        serde_json::from_slice(&data).map_err(|e| unreadable("stream chunk", &e))?;
    Ok(StreamEvent::Chunk(chunk_proto(view)))
}

fn chunk_proto(view: CompletionView) -> pb::ChatChunk {
    pb::ChatChunk {
        id: view.id,
        model: view.model,
        created: view.created,
        choices: view
            .choices
            .into_iter()
            .map(|c| {
                let delta = c.delta.or(c.message);
                let (role, content, reasoning_content) = match delta {
                    Some(d) => (d.role, d.content, d.reasoning_content),
                    None => (None, None, None),
                };
                pb::ChoiceDelta {
                    index: c.index,
                    role: role.unwrap_or_default(),
                    content: content.unwrap_or_default(),
                    reasoning_content,
                    finish_reason: c.finish_reason.unwrap_or_default(),
                }
            })
            .collect(),
        usage: view.usage.map(Into::into),
    }
}

/// Holds back a chunk that finishes a choice so the usage chunk after it can join it: the
/// last message of a gRPC stream carries both the finish reason and the usage.
#[derive(Default)]
pub struct ChunkMerger {
    pending: Option<pb::ChatChunk>,
}

impl ChunkMerger {
    /// The messages to send for this chunk.
    pub fn push(&mut self, chunk: pb::ChatChunk) -> Vec<pb::ChatChunk> {
        let mut out = Vec::with_capacity(2);
        if chunk.choices.is_empty() && chunk.usage.is_some() {
            match self.pending.take() {
                Some(mut pending) => {
                    pending.usage = chunk.usage;
                    out.push(pending);
                }
                None => out.push(chunk),
            }
            return out;
        }
        out.extend(self.pending.take());
        if chunk.choices.iter().any(|c| !c.finish_reason.is_empty()) {
            self.pending = Some(chunk);
        } else {
            out.push(chunk);
        }
        out
    }

    /// What is still held back, at the end of the stream.
    pub fn finish(&mut self) -> Option<pb::ChatChunk> {
        self.pending.take()
    }
}

/// The proto form of the upstream's model list (OpenAI JSON).
pub fn models_proto(list: &Value) -> pb::ListModelsResponse {
    let models = list
        .get("data")
        .and_then(Value::as_array)
        .map(|models| {
            models
                .iter()
                .filter_map(|m| {
                    Some(pb::Model {
                        id: m.get("id")?.as_str()?.to_owned(),
                        owned_by: m
                            .get("owned_by")
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                            .to_owned(),
                        created: m.get("created").and_then(Value::as_i64).unwrap_or_default(),
                        max_model_len: m
                            .get("max_model_len")
                            .and_then(Value::as_u64)
                            .and_then(|n| u32::try_from(n).ok()),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    pb::ListModelsResponse { models }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> pb::ChatRequest {
        let extra = prost_types::Struct {
            fields: [
                (
                    "top_k".to_owned(),
                    prost_types::Value {
                        kind: Some(prost_types::value::Kind::NumberValue(20.0)),
                    },
                ),
                (
                    "chat_template_kwargs".to_owned(),
                    prost_types::Value {
                        kind: Some(prost_types::value::Kind::StructValue(prost_types::Struct {
                            fields: [(
                                "enable_thinking".to_owned(),
                                prost_types::Value {
                                    kind: Some(prost_types::value::Kind::BoolValue(false)),
                                },
                            )]
                            .into(),
                        })),
                    },
                ),
                (
                    "stream".to_owned(),
                    prost_types::Value {
                        kind: Some(prost_types::value::Kind::BoolValue(true)),
                    },
                ),
            ]
            .into(),
        };
        pb::ChatRequest {
            model: "m".into(),
            messages: vec![
                pb::Message {
                    role: "system".into(),
                    text: "be brief".into(),
                    ..Default::default()
                },
                pb::Message {
                    role: "user".into(),
                    parts: vec![
                        pb::ContentPart {
                            part: Some(pb::content_part::Part::Text("what is this?".into())),
                        },
                        pb::ContentPart {
                            part: Some(pb::content_part::Part::Image(pb::InlineImage {
                                data: vec![1, 2, 3],
                                mime_type: "image/png".into(),
                            })),
                        },
                        pb::ContentPart {
                            part: Some(pb::content_part::Part::ImageUrl(pb::ImageUrl {
                                url: "https://example.com/a.jpg".into(),
                                detail: Some("low".into()),
                            })),
                        },
                    ],
                    ..Default::default()
                },
            ],
            max_tokens: Some(64),
            temperature: Some(0.5),
            stop: vec!["END".into()],
            seed: Some(7),
            extra: Some(extra),
            ..Default::default()
        }
    }

    #[test]
    fn a_proto_request_becomes_the_openai_json_body() {
        let body: Value =
            serde_json::from_slice(&request_json(&request(), false).unwrap()).unwrap();
        assert_eq!(body["model"], "m");
        assert_eq!(
            body["messages"][0],
            json!({"role": "system", "content": "be brief"})
        );
        let parts = &body["messages"][1]["content"];
        assert_eq!(parts[0], json!({"type": "text", "text": "what is this?"}));
        assert_eq!(parts[1]["image_url"]["url"], "data:image/png;base64,AQID");
        assert_eq!(
            parts[2]["image_url"],
            json!({"url": "https://example.com/a.jpg", "detail": "low"})
        );
        assert_eq!(body["max_tokens"], 64);
        assert_eq!(body["temperature"], 0.5);
        assert_eq!(body["stop"], json!(["END"]));
        assert_eq!(body["seed"], 7);
        assert_eq!(body["top_k"], 20);
        assert_eq!(
            body["chat_template_kwargs"],
            json!({"enable_thinking": false})
        );
        // `extra` cannot turn a unary call into a stream.
        assert!(body.get("stream").is_none());
        let streamed: Value =
            serde_json::from_slice(&request_json(&request(), true).unwrap()).unwrap();
        assert_eq!(streamed["stream"], true);
        assert_eq!(streamed["stream_options"]["include_usage"], true);
    }

    #[test]
    fn an_inline_image_must_say_it_is_an_image() {
        let mut bad = request();
        bad.messages[1].parts[1] = pb::ContentPart {
            part: Some(pb::content_part::Part::Image(pb::InlineImage {
                data: vec![1],
                mime_type: "text/html".into(),
            })),
        };
        match request_json(&bad, false).unwrap_err() {
            GatewayError::InvalidRequest { param, .. } => {
                assert_eq!(
                    param.as_deref(),
                    Some("messages[1].parts[1].image.mime_type")
                );
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn answers_and_chunks_are_read_back() {
        let answer = br#"{"id":"c1","object":"chat.completion","created":5,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"hi","reasoning_content":"hmm"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}"#;
        let proto = response_proto(answer).unwrap();
        assert_eq!(proto.id, "c1");
        let message = proto.choices[0].message.as_ref().unwrap();
        assert_eq!(
            (
                message.content.as_str(),
                message.reasoning_content.as_deref()
            ),
            ("hi", Some("hmm"))
        );
        assert_eq!(proto.usage.unwrap().total_tokens, 5);

        let chunk = stream_event(b"data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"x\"},\"finish_reason\":null}]}\n\n").unwrap();
        let StreamEvent::Chunk(chunk) = chunk else {
            panic!("{chunk:?}")
        };
        assert_eq!(chunk.choices[0].content, "x");
        assert_eq!(
            stream_event(b"data: [DONE]\n\n").unwrap(),
            StreamEvent::Done
        );
        assert_eq!(
            stream_event(b"data: {\"error\":{\"message\":\"boom\"}}\n\n").unwrap(),
            StreamEvent::Error("boom".into())
        );
        assert_eq!(stream_event(b": ping\n\n").unwrap(), StreamEvent::Nothing);
    }

    /// The one-parse reading of stream events gives what the old reading (now the slow path:
    /// `sse::event_data`, `sse::inspect`, then the chunk) gives, odd events included.
    #[test]
    fn stream_events_read_once_as_they_were_read_before() {
        let events: &[&[u8]] = &[
            b"data: {\"id\":\"c1\",\"model\":\"m\",\"created\":7,\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"x\",\"reasoning_content\":\"r\"},\"finish_reason\":null}]}\n\n",
            b"data: {\"id\":\"c1\",\"choices\":[{\"index\":1,\"message\":{\"content\":\"y\"},\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4,\"total_tokens\":7}}\n\n",
            b"data: {\"id\":\"c1\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}}\n\n",
            b"data: {\"choices\":[{\"index\":0},{\"index\":1,\"delta\":{}}]}\r\n\r\n",
            b"data:{\"id\":\"no space\"}\n\n",
            b": comment\nevent: x\ndata: {\"id\":\"a\",\ndata: \"model\":\"two lines\"}\n\n",
            b"data: {\"error\":{\"message\":\"boom\",\"code\":1}}\n\n",
            b"data: {\"error\":\"plain\"}\n\n",
            b"data: {\"error\":{\"code\":500}}\n\n",
            b"data: {\"error\":{\"message\":5}}\n\n",
            b"data: {\"error\":null,\"choices\":[]}\n\n",
            b"data: {\"error\":{\"message\":\"typed wrong\"},\"id\":5}\n\n",
            b"data: {\"error\":\"a\",\"error\":\"b\"}\n\n",
            b"data: {\"id\":\"a\",\"id\":\"b\"}\n\n",
            b"data: {\"usage\":\"lots\"}\n\n",
            b"data: {\"usage\":{\"prompt_tokens\":-1}}\n\n",
            b"data: [\"c1\",\"m\",1,[],null]\n\n",
            b"data: {\"id\":\"c1\",\"x\":\"\xff\"}\n\n",
            b"data: {\"id\":\"c1\"\n\n",
            b"data: {\"id\":\"c1\"} trailing\n\n",
            b"data:  [DONE] \n\n",
            b"data: [DONE]\r\n\r\n",
            b"data:\n\n",
            b"data: \n\n",
            b": ping\n\n",
            b"",
            b"id: 3\n\n",
            b"data: {\"id\":\"\\u00e9\\n\",\"choices\":[{\"delta\":{\"content\":\"\\\"q\\\"\"}}]}\n\n",
        ];
        for event in events {
            assert_same_reading(event);
        }
    }

    fn assert_same_reading(event: &[u8]) {
        assert_eq!(
            format!("{:?}", stream_event(event)),
            format!("{:?}", stream_event_slow(event)),
            "{}",
            String::from_utf8_lossy(event)
        );
        assert_eq!(
            event_data(event).map(Cow::into_owned),
            sse::event_data(event),
            "{}",
            String::from_utf8_lossy(event)
        );
    }

    proptest::proptest! {
        /// Events put together from pieces of chunks, errors and SSE framing.
        #[test]
        fn any_event_reads_as_before(pieces in proptest::collection::vec(proptest::sample::select(vec![
            "data: ", "data:", "\n", "\r\n", "\n\n", ": c\n", "{", "}", "[", "]", ",", ":", "\"", "null",
            "\"id\"", "\"model\"", "\"created\"", "\"choices\"", "\"usage\"", "\"error\"",
            "\"message\"", "\"delta\"", "\"content\"", "\"finish_reason\"", "\"index\"",
            "\"prompt_tokens\"", "\"completion_tokens\"", "\"x\"", "1", "-2", "1.5", "true",
            "[DONE]", " ", "\u{e9}", "\\",
        ]), 0..40)) {
            let event = pieces.concat();
            assert_same_reading(event.as_bytes());
        }

        /// Well-formed objects of known and unknown members, each of any type, some twice.
        #[test]
        fn any_chunk_object_reads_as_before(members in proptest::collection::vec((
            proptest::sample::select(vec!["id", "model", "created", "choices", "usage", "error", "object", "x"]),
            proptest::sample::select(vec![
                "null", "\"s\"", "3", "-3", "2.5", "true", "[]", "{}", "\"\\u00ff\"",
                "[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"hi\"},\"finish_reason\":null}]",
                "[{\"index\":2,\"message\":{\"content\":\"a\",\"reasoning_content\":\"b\"},\"finish_reason\":\"stop\"}]",
                "[{\"index\":\"0\"}]",
                "{\"prompt_tokens\":18446744073709551615,\"completion_tokens\":1}",
                "{\"message\":\"boom\"}", "{\"message\":null}", "{\"message\":[1]}",
            ]),
        ), 0..6)) {
            let body: Vec<String> = members.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
            let event = format!("data: {{{}}}\n\n", body.join(","));
            assert_same_reading(event.as_bytes());
        }
    }

    /// Found by the `grpc_chunk` fuzz target: `total_tokens` overflowed (a panic in a debug
    /// build, a wrong total in release) on counts near `u64::MAX` from the upstream.
    #[test]
    fn huge_token_counts_from_the_upstream_do_not_overflow() {
        let data = br#"{"choices":[],"usage":{"prompt_tokens":18446744073709551615,"completion_tokens":1}}"#;
        let answer = response_proto(data).unwrap();
        assert_eq!(answer.usage.unwrap().total_tokens, u64::MAX);
        let mut event = b"data: ".to_vec();
        event.extend_from_slice(data);
        event.extend_from_slice(b"\n\n");
        let StreamEvent::Chunk(chunk) = stream_event(&event).unwrap() else {
            panic!("not a chunk")
        };
        assert_eq!(chunk.usage.unwrap().total_tokens, u64::MAX);
    }

    #[test]
    fn the_finish_chunk_waits_for_the_usage_chunk() {
        let delta = |content: &str, finish: &str| pb::ChatChunk {
            choices: vec![pb::ChoiceDelta {
                content: content.into(),
                finish_reason: finish.into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let usage = pb::ChatChunk {
            usage: Some(pb::Usage {
                prompt_tokens: 1,
                completion_tokens: 2,
                total_tokens: 3,
            }),
            ..Default::default()
        };
        let mut merger = ChunkMerger::default();
        assert_eq!(merger.push(delta("a", "")).len(), 1);
        assert!(merger.push(delta("", "stop")).is_empty());
        let last = merger.push(usage);
        assert_eq!(last.len(), 1);
        assert_eq!(last[0].choices[0].finish_reason, "stop");
        assert_eq!(last[0].usage.unwrap().total_tokens, 3);
        assert!(merger.finish().is_none());
    }
}
