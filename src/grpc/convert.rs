//! Proto ⇄ OpenAI JSON: requests become the JSON body the REST door would have received,
//! answers and stream chunks are read back into proto messages.

use bytes::Bytes;
use serde::Deserialize;
use serde_json::Value;

use super::pb;
use crate::core::GatewayError;
use crate::core::catalogue::{ModelRecord, ModelVersion, Rollout};
use crate::core::records::Usage;

/// The JSON body for a proto request; `stream` also asks for the final usage chunk.
///
/// Written straight from the proto (no `Value` tree), byte for byte what a `serde_json::Map`
/// of the same members would give: members in key order, `extra`'s members where the typed
/// fields do not set the same key.
pub fn request_json(request: &pb::ChatRequest, stream: bool) -> Result<Bytes, GatewayError> {
    check_parts(request)?;
    let mut out = Vec::with_capacity(body_size_hint(request));
    serde_json::to_writer(&mut out, &RequestBody { request, stream })
        .map_err(|e| GatewayError::invalid_request(e.to_string(), None))?;
    Ok(Bytes::from(out))
}

/// Refuses the parts that cannot become JSON, the first one first.
fn check_parts(request: &pb::ChatRequest) -> Result<(), GatewayError> {
    for (i, message) in request.messages.iter().enumerate() {
        for (j, part) in message.parts.iter().enumerate() {
            let field = || format!("messages[{i}].parts[{j}]");
            match &part.part {
                Some(pb::content_part::Part::Image(image))
                    if !image.mime_type.starts_with("image/") =>
                {
                    return Err(GatewayError::invalid_request(
                        format!(
                            "`{}.image.mime_type` must be an image type such as image/png",
                            field()
                        ),
                        Some(&format!("{}.image.mime_type", field())),
                    ));
                }
                None => {
                    return Err(GatewayError::invalid_request(
                        format!("`{}` has no content", field()),
                        Some(&field()),
                    ));
                }
                Some(_) => {}
            }
        }
    }
    Ok(())
}

/// Room for the body, so that it is written without growing (inline images dominate).
fn body_size_hint(request: &pb::ChatRequest) -> usize {
    let parts: usize = request
        .messages
        .iter()
        .flat_map(|m| &m.parts)
        .map(|part| match &part.part {
            Some(pb::content_part::Part::Text(text)) => text.len() + 32,
            Some(pb::content_part::Part::ImageUrl(image)) => image.url.len() + 64,
            Some(pb::content_part::Part::Image(image)) => {
                image.data.len().div_ceil(3) * 4 + image.mime_type.len() + 64
            }
            None => 0,
        })
        .sum();
    let messages: usize = request.messages.iter().map(|m| m.text.len() + 48).sum();
    let extra = request.extra.as_ref().map_or(0, |e| e.fields.len() * 32);
    256 + request.model.len() + messages + parts + extra
}

struct RequestBody<'a> {
    request: &'a pb::ChatRequest,
    stream: bool,
}

/// A top-level member the typed fields decide.
enum Member<'a> {
    /// Not set: `extra`'s member of that name, if any, goes out.
    Unset,
    /// Left out, `extra`'s too (`stream` of a unary call).
    Removed,
    Str(&'a str),
    /// `float` fields go out as the `f64` they widen to, as `json!` wrote them.
    Float(f32),
    U32(u32),
    I64(i64),
    Messages(&'a [pb::Message]),
    Stop(&'a [String]),
    True,
    IncludeUsage,
}

impl serde::Serialize for Member<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        match self {
            Member::Unset | Member::Removed => s.serialize_unit(),
            Member::Str(v) => s.serialize_str(v),
            Member::Float(v) => s.serialize_f64(f64::from(*v)),
            Member::U32(v) => s.serialize_u32(*v),
            Member::I64(v) => s.serialize_i64(*v),
            Member::Messages(messages) => s.collect_seq(messages.iter().map(MessageJson)),
            Member::Stop(stop) => s.collect_seq(stop.iter()),
            Member::True => s.serialize_bool(true),
            Member::IncludeUsage => {
                let mut map = s.serialize_map(Some(1))?;
                map.serialize_entry("include_usage", &true)?;
                map.end()
            }
        }
    }
}

impl serde::Serialize for RequestBody<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let r = self.request;
        let float = |v: Option<f32>| v.map_or(Member::Unset, Member::Float);
        let (stream, stream_options) = if self.stream {
            (Member::True, Member::IncludeUsage)
        } else {
            (Member::Removed, Member::Removed)
        };
        // In key order, to merge with `extra`'s (a BTreeMap, in the same order).
        let typed = [
            ("frequency_penalty", float(r.frequency_penalty)),
            (
                "max_tokens",
                r.max_tokens.map_or(Member::Unset, Member::U32),
            ),
            ("messages", Member::Messages(&r.messages)),
            ("model", Member::Str(&r.model)),
            ("n", r.n.map_or(Member::Unset, Member::U32)),
            ("presence_penalty", float(r.presence_penalty)),
            ("seed", r.seed.map_or(Member::Unset, Member::I64)),
            (
                "stop",
                if r.stop.is_empty() {
                    Member::Unset
                } else {
                    Member::Stop(&r.stop)
                },
            ),
            ("stream", stream),
            ("stream_options", stream_options),
            ("temperature", float(r.temperature)),
            ("top_p", float(r.top_p)),
        ];
        let mut extra = r.extra.iter().flat_map(|e| &e.fields).peekable();
        let mut map = s.serialize_map(None)?;
        for (name, member) in &typed {
            while let Some((k, v)) = extra.next_if(|(k, _)| k.as_str() < *name) {
                map.serialize_entry(k, &ValueJson(v))?;
            }
            let shadowed = extra.next_if(|(k, _)| k.as_str() == *name);
            match member {
                Member::Unset => {
                    if let Some((k, v)) = shadowed {
                        map.serialize_entry(k, &ValueJson(v))?;
                    }
                }
                Member::Removed => {}
                member => map.serialize_entry(name, member)?,
            }
        }
        for (k, v) in extra {
            map.serialize_entry(k, &ValueJson(v))?;
        }
        map.end()
    }
}

/// A message as `{"content", "name"?, "role"}`.
struct MessageJson<'a>(&'a pb::Message);

impl serde::Serialize for MessageJson<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let m = self.0;
        let mut map = s.serialize_map(None)?;
        if m.parts.is_empty() {
            map.serialize_entry("content", &m.text)?;
        } else {
            map.serialize_entry("content", &Parts(&m.parts))?;
        }
        if let Some(name) = &m.name {
            map.serialize_entry("name", name)?;
        }
        map.serialize_entry("role", &m.role)?;
        map.end()
    }
}

struct Parts<'a>(&'a [pb::ContentPart]);

impl serde::Serialize for Parts<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(PartJson))
    }
}

struct PartJson<'a>(&'a pb::ContentPart);

impl serde::Serialize for PartJson<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(2))?;
        match &self.0.part {
            Some(pb::content_part::Part::Text(text)) => {
                map.serialize_entry("text", text)?;
                map.serialize_entry("type", "text")?;
            }
            Some(pb::content_part::Part::ImageUrl(image)) => {
                map.serialize_entry(
                    "image_url",
                    &ImageUrlJson {
                        detail: image.detail.as_deref(),
                        url: UrlJson::Text(&image.url),
                    },
                )?;
                map.serialize_entry("type", "image_url")?;
            }
            Some(pb::content_part::Part::Image(image)) => {
                map.serialize_entry(
                    "image_url",
                    &ImageUrlJson {
                        detail: None,
                        url: UrlJson::Data(image),
                    },
                )?;
                map.serialize_entry("type", "image_url")?;
            }
            // Refused by `check_parts` before writing.
            None => return Err(serde::ser::Error::custom("a content part has no content")),
        }
        map.end()
    }
}

struct ImageUrlJson<'a> {
    detail: Option<&'a str>,
    url: UrlJson<'a>,
}

enum UrlJson<'a> {
    Text(&'a str),
    /// An inline image as a `data:` URL, base64 written straight into the body.
    Data(&'a pb::InlineImage),
}

impl serde::Serialize for ImageUrlJson<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(None)?;
        if let Some(detail) = self.detail {
            map.serialize_entry("detail", detail)?;
        }
        map.serialize_entry("url", &self.url)?;
        map.end()
    }
}

impl serde::Serialize for UrlJson<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            UrlJson::Text(url) => s.serialize_str(url),
            UrlJson::Data(image) => s.collect_str(&DataUrl(image)),
        }
    }
}

struct DataUrl<'a>(&'a pb::InlineImage);

impl std::fmt::Display for DataUrl<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let data = base64::display::Base64Display::new(
            &self.0.data,
            &base64::engine::general_purpose::STANDARD,
        );
        write!(f, "data:{};base64,{data}", self.0.mime_type)
    }
}

/// A `google.protobuf.Value` as JSON.
struct ValueJson<'a>(&'a prost_types::Value);

impl serde::Serialize for ValueJson<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use prost_types::value::Kind;
        use serde::ser::SerializeMap;
        match &self.0.kind {
            None | Some(Kind::NullValue(_)) => s.serialize_unit(),
            Some(Kind::NumberValue(n)) => {
                // Protobuf numbers are doubles; integral ones go out as integers (`top_k: 20`).
                if n.fract() == 0.0 && n.abs() < 9.0e15 {
                    s.serialize_i64(*n as i64)
                } else {
                    s.serialize_f64(*n)
                }
            }
            Some(Kind::StringValue(v)) => s.serialize_str(v),
            Some(Kind::BoolValue(v)) => s.serialize_bool(*v),
            Some(Kind::StructValue(v)) => {
                let mut map = s.serialize_map(Some(v.fields.len()))?;
                for (k, v) in &v.fields {
                    map.serialize_entry(k, &ValueJson(v))?;
                }
                map.end()
            }
            Some(Kind::ListValue(list)) => s.collect_seq(list.values.iter().map(ValueJson)),
        }
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
    usage: Option<Usage>,
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

fn usage_proto(u: Usage) -> pb::Usage {
    pb::Usage {
        prompt_tokens: u.prompt_tokens,
        completion_tokens: u.completion_tokens,
        // Counts come from the upstream's JSON: near u64::MAX the sum must not overflow.
        total_tokens: u.prompt_tokens.saturating_add(u.completion_tokens),
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
        usage: view.usage.map(usage_proto),
    })
}

/// One stream chunk (the `data:` JSON of an event) as a proto chunk.
pub fn chunk_proto(data: &[u8]) -> Result<pb::ChatChunk, GatewayError> {
    // serde reads a struct from an array too; a chunk is an object.
    if !data.trim_ascii_start().starts_with(b"{") {
        return Err(unreadable(
            "stream chunk",
            &serde::de::Error::custom("not a JSON object"),
        ));
    }
    let view: CompletionView =
        serde_json::from_slice(data).map_err(|e| unreadable("stream chunk", &e))?;
    Ok(chunk_from_view(view))
}

fn chunk_from_view(view: CompletionView) -> pb::ChatChunk {
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
        usage: view.usage.map(usage_proto),
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
        self.push_to(chunk, |c| out.push(c));
        out
    }

    /// [`push`](Self::push) handing the messages to `send`: a stream queues them without a
    /// `Vec` per chunk.
    pub fn push_to(&mut self, chunk: pb::ChatChunk, mut send: impl FnMut(pb::ChatChunk)) {
        if chunk.choices.is_empty() && chunk.usage.is_some() {
            match self.pending.take() {
                Some(mut pending) => {
                    pending.usage = chunk.usage;
                    send(pending);
                }
                None => send(chunk),
            }
            return;
        }
        if let Some(pending) = self.pending.take() {
            send(pending);
        }
        if chunk.choices.iter().any(|c| !c.finish_reason.is_empty()) {
            self.pending = Some(chunk);
        } else {
            send(chunk);
        }
    }

    /// What is still held back, at the end of the stream.
    pub fn finish(&mut self) -> Option<pb::ChatChunk> {
        self.pending.take()
    }
}

/// The JSON body of `POST /v1/embeddings` for a proto request (vectors as floats).
pub fn embed_json(request: &pb::EmbedRequest) -> Result<Bytes, GatewayError> {
    let mut body = serde_json::json!({
        "model": request.model,
        "input": request.inputs,
        "encoding_format": "float",
    });
    if let Some(dimensions) = request.dimensions {
        body["dimensions"] = dimensions.into();
    }
    serde_json::to_vec(&body)
        .map(Bytes::from)
        .map_err(|e| GatewayError::invalid_request(e.to_string(), None))
}

#[derive(Deserialize)]
struct EmbeddingsView {
    #[serde(default)]
    model: String,
    #[serde(default)]
    data: Vec<EmbeddingView>,
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct EmbeddingView {
    #[serde(default)]
    index: u32,
    embedding: Vec<f32>,
}

/// An embeddings answer (OpenAI JSON, vectors as floats) as a proto answer.
pub fn embed_proto(body: &[u8]) -> Result<pb::EmbedResponse, GatewayError> {
    let view: EmbeddingsView =
        serde_json::from_slice(body).map_err(|e| unreadable("embeddings answer", &e))?;
    Ok(pb::EmbedResponse {
        model: view.model,
        data: view
            .data
            .into_iter()
            .map(|e| pb::Embedding {
                index: e.index,
                values: e.embedding,
            })
            .collect(),
        usage: view.usage.map(usage_proto),
    })
}

/// A catalogue model as the Admin service answers with it.
pub fn catalogue_model_proto(model: ModelRecord) -> pb::CatalogueModel {
    pb::CatalogueModel {
        versions: model
            .versions
            .into_iter()
            .map(|v| pb::ModelVersion {
                default: v.name == model.default_version,
                rollout_weight: model
                    .rollout
                    .as_ref()
                    .filter(|r| r.version == v.name)
                    .map(|r| u32::from(r.weight)),
                name: v.name,
                deprecated_at: v.deprecated_at,
                sunset_at: v.sunset_at,
            })
            .collect(),
        name: model.name,
        aliases: model.aliases,
        default_version: model.default_version,
        rollout: model.rollout.map(|r| pb::ModelRollout {
            version: r.version,
            weight: u32::from(r.weight),
        }),
        created_at: model.created_at,
        updated_at: model.updated_at,
    }
}

/// A model as `PutModel` gives it; checked by the same validation as REST's.
pub fn catalogue_model_from(model: pb::CatalogueModel) -> Result<ModelRecord, GatewayError> {
    let rollout = match model.rollout {
        Some(r) => Some(Rollout {
            version: r.version,
            weight: u8::try_from(r.weight).map_err(|_| {
                GatewayError::invalid_request(
                    format!("the rollout's weight is {}: at most 100", r.weight),
                    Some("rollout"),
                )
            })?,
        }),
        None => None,
    };
    Ok(ModelRecord {
        name: model.name,
        aliases: model.aliases,
        versions: model
            .versions
            .into_iter()
            .map(|v| ModelVersion {
                name: v.name,
                deprecated_at: v.deprecated_at,
                sunset_at: v.sunset_at,
            })
            .collect(),
        default_version: model.default_version,
        rollout,
        created_at: model.created_at,
        updated_at: model.updated_at,
    })
}

/// A version of a catalogue model as the REST list shows it (`call::CallPath::models`).
fn version_proto(v: &Value) -> Option<pb::ModelVersion> {
    Some(pb::ModelVersion {
        name: v.get("id")?.as_str()?.to_owned(),
        deprecated_at: v.get("deprecated_at").and_then(Value::as_i64),
        sunset_at: v.get("sunset_at").and_then(Value::as_i64),
        default: v
            .get("default")
            .and_then(Value::as_bool)
            .unwrap_or_default(),
        rollout_weight: v
            .get("rollout_weight")
            .and_then(Value::as_u64)
            .and_then(|w| u32::try_from(w).ok()),
    })
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
                        versions: m
                            .get("versions")
                            .and_then(Value::as_array)
                            .map(|vs| vs.iter().filter_map(version_proto).collect())
                            .unwrap_or_default(),
                        default_version: m
                            .get("default_version")
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                            .to_owned(),
                        aliases: m
                            .get("aliases")
                            .and_then(Value::as_array)
                            .map(|a| {
                                a.iter()
                                    .filter_map(|n| n.as_str().map(str::to_owned))
                                    .collect()
                            })
                            .unwrap_or_default(),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    pb::ListModelsResponse { models }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

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

    /// The `Value`-tree conversion `request_json` replaced, kept to show the same bytes.
    mod reference {
        use base64::Engine;
        use bytes::Bytes;
        use serde_json::{Map, Value, json};

        use super::super::pb;
        use crate::core::GatewayError;

        /// The JSON body for a proto request; `stream` also asks for the final usage chunk.
        pub fn request_json(
            request: &pb::ChatRequest,
            stream: bool,
        ) -> Result<Bytes, GatewayError> {
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

        fn part_json(
            message: usize,
            index: usize,
            part: &pb::ContentPart,
        ) -> Result<Value, GatewayError> {
            let field = || format!("messages[{message}].parts[{index}]");
            match &part.part {
                Some(pb::content_part::Part::Text(text)) => {
                    Ok(json!({"type": "text", "text": text}))
                }
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

        fn struct_to_json(value: &prost_types::Struct) -> Map<String, Value> {
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

    fn value(kind: prost_types::value::Kind) -> prost_types::Value {
        prost_types::Value { kind: Some(kind) }
    }

    fn assert_same_body(request: &pb::ChatRequest) {
        for stream in [false, true] {
            let new = request_json(request, stream);
            let old = reference::request_json(request, stream);
            match (&new, &old) {
                (Ok(new), Ok(old)) => assert_eq!(
                    String::from_utf8_lossy(new),
                    String::from_utf8_lossy(old),
                    "{request:?}"
                ),
                _ => assert_eq!(format!("{new:?}"), format!("{old:?}")),
            }
        }
    }

    /// The body is written byte for byte as the `Value` tree wrote it: member order, numbers,
    /// escapes, `extra` members the typed fields shadow or leave, `stream` of a unary call.
    #[test]
    fn request_bodies_are_the_bytes_the_value_tree_gave() {
        use prost_types::value::Kind;
        assert_same_body(&request());
        assert_same_body(&pb::ChatRequest::default());
        let numbers = [
            20.0,
            0.5,
            -3.0,
            -0.0,
            1e300,
            9.1e15,
            -8.9e15,
            1.5e-7,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
        ];
        let extra = |typed_set: bool| {
            let mut fields: std::collections::BTreeMap<String, prost_types::Value> = [
                ("a", Kind::StringValue("first \"quoted\" \u{1}\n é".into())),
                ("model", Kind::StringValue("from extra".into())),
                ("messages", Kind::NullValue(0)),
                ("max_tokens", Kind::NumberValue(99.0)),
                ("temperature", Kind::NumberValue(1.25)),
                ("stop", Kind::StringValue("x".into())),
                ("stream", Kind::BoolValue(true)),
                (
                    "stream_options",
                    Kind::StructValue(prost_types::Struct::default()),
                ),
                ("stream_x", Kind::BoolValue(false)),
                (
                    "n_best",
                    Kind::ListValue(prost_types::ListValue {
                        values: numbers
                            .iter()
                            .map(|n| value(Kind::NumberValue(*n)))
                            .collect(),
                    }),
                ),
                ("seed", Kind::NumberValue(-5.0)),
                ("top_p", Kind::NumberValue(0.25)),
                (
                    "zzz",
                    Kind::StructValue(prost_types::Struct {
                        fields: [
                            ("b".to_owned(), prost_types::Value { kind: None }),
                            (
                                "a".to_owned(),
                                value(Kind::ListValue(prost_types::ListValue::default())),
                            ),
                        ]
                        .into(),
                    }),
                ),
                ("", Kind::BoolValue(true)),
                ("\u{7f}", Kind::NumberValue(1.0)),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), value(v)))
            .collect();
            if typed_set {
                fields.remove("a");
            }
            Some(prost_types::Struct { fields })
        };
        let mut full = request();
        full.extra = extra(false);
        full.top_p = Some(0.7);
        full.presence_penalty = Some(-1.5);
        full.frequency_penalty = Some(f32::NAN);
        full.n = Some(3);
        full.stop = vec!["a\"b".into(), String::new()];
        full.seed = Some(i64::MIN);
        full.messages[0].name = Some("\u{2028}bob\\".into());
        full.messages[1].parts.push(pb::ContentPart {
            part: Some(pb::content_part::Part::Image(pb::InlineImage {
                data: (0..=255).collect(),
                mime_type: "image/\"odd\"\n".into(),
            })),
        });
        full.messages[1].parts.push(pb::ContentPart {
            part: Some(pb::content_part::Part::ImageUrl(pb::ImageUrl {
                url: "https://example.com/b.png".into(),
                detail: None,
            })),
        });
        assert_same_body(&full);
        // The typed fields unset: `extra`'s members of the same names stay.
        let mut sparse = pb::ChatRequest {
            model: "m".into(),
            extra: extra(true),
            temperature: Some(f32::MAX),
            ..Default::default()
        };
        assert_same_body(&sparse);
        sparse.extra = None;
        sparse.temperature = Some(f32::INFINITY);
        assert_same_body(&sparse);
        // Refusals come out the same, the first bad part first.
        let mut bad = request();
        bad.messages[1]
            .parts
            .insert(0, pb::ContentPart { part: None });
        assert_same_body(&bad);
        let mut bad = request();
        bad.messages[1].parts[1] = pb::ContentPart {
            part: Some(pb::content_part::Part::Image(pb::InlineImage {
                data: vec![],
                mime_type: String::new(),
            })),
        };
        bad.messages[1].parts.push(pb::ContentPart { part: None });
        assert_same_body(&bad);
    }

    proptest::proptest! {
        /// Requests of every shape: typed fields set or not, `extra` members of any name
        /// (the typed ones included) and type.
        #[test]
        fn any_request_body_is_the_bytes_the_value_tree_gave(
            model in ".{0,8}",
            texts in proptest::collection::vec(("[a-z]{1,6}", ".{0,12}", proptest::option::of(".{0,4}")), 0..3),
            floats in proptest::collection::vec(proptest::option::of(proptest::num::f32::ANY), 4),
            ints in (proptest::option::of(proptest::num::u32::ANY), proptest::option::of(proptest::num::i64::ANY), proptest::option::of(proptest::num::u32::ANY)),
            stop in proptest::collection::vec(".{0,4}", 0..3),
            extra in proptest::option::of(proptest::collection::btree_map(
                proptest::sample::select(vec![
                    "frequency_penalty", "max_tokens", "messages", "model", "n", "presence_penalty",
                    "seed", "stop", "stream", "stream_options", "temperature", "top_p", "top_k",
                    "a", "z", "mo", "streams", "",
                ]),
                (proptest::num::f64::ANY, ".{0,6}", proptest::num::u8::ANY),
                0..8,
            )),
        ) {
            use prost_types::value::Kind;
            let request = pb::ChatRequest {
                model,
                messages: texts
                    .into_iter()
                    .map(|(role, text, name)| pb::Message { role, text, name, ..Default::default() })
                    .collect(),
                temperature: floats[0],
                top_p: floats[1],
                presence_penalty: floats[2],
                frequency_penalty: floats[3],
                max_tokens: ints.0,
                seed: ints.1,
                n: ints.2,
                stop,
                extra: extra.map(|fields| prost_types::Struct {
                    fields: fields
                        .into_iter()
                        .map(|(k, (n, text, pick))| {
                            let kind = match pick % 5 {
                                0 => Kind::NumberValue(n),
                                1 => Kind::NumberValue(n.trunc()),
                                2 => Kind::StringValue(text),
                                3 => Kind::BoolValue(pick > 128),
                                _ => Kind::NullValue(0),
                            };
                            (k.to_owned(), value(kind))
                        })
                        .collect(),
                }),
            };
            assert_same_body(&request);
        }
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
    fn embeddings_go_as_json_and_come_back_as_vectors() {
        let body = embed_json(&pb::EmbedRequest {
            model: "e".into(),
            inputs: vec!["a".into(), "b".into()],
            dimensions: Some(8),
        })
        .unwrap();
        let sent: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            sent,
            json!({"model": "e", "input": ["a", "b"], "encoding_format": "float", "dimensions": 8})
        );
        let answer = br#"{"object":"list","model":"e","data":[{"object":"embedding","index":0,"embedding":[0.5,-1]},{"object":"embedding","index":1,"embedding":[2]}],"usage":{"prompt_tokens":3,"total_tokens":3}}"#;
        let proto = embed_proto(answer).unwrap();
        assert_eq!(proto.data[0].values, [0.5, -1.0]);
        assert_eq!(proto.data[1].index, 1);
        assert_eq!(proto.usage.unwrap().total_tokens, 3);
        assert!(embed_proto(br#"{"data":[{"embedding":"AAAA"}]}"#).is_err());
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

        let chunk = chunk_proto(b"{\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"x\"},\"finish_reason\":null}]}").unwrap();
        assert_eq!(chunk.choices[0].content, "x");
        assert!(chunk_proto(b"[\"c1\"]").is_err());
    }

    /// Found by the `grpc_chunk` fuzz target: `total_tokens` overflowed (a panic in a debug
    /// build, a wrong total in release) on counts near `u64::MAX` from the upstream.
    #[test]
    fn huge_token_counts_from_the_upstream_do_not_overflow() {
        let data = br#"{"choices":[],"usage":{"prompt_tokens":18446744073709551615,"completion_tokens":1}}"#;
        let answer = response_proto(data).unwrap();
        assert_eq!(answer.usage.unwrap().total_tokens, u64::MAX);
        let chunk = chunk_proto(data).unwrap();
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
