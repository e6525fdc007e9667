//! Arbitrary gRPC `ChatRequest`s through the proto → JSON converter and then the same
//! `prepare_chat` the REST door uses.
//!
//! Properties:
//! - `request_json` refuses only a request with an empty part or a non-image inline type,
//!   with `InvalidRequest`; otherwise it gives a JSON object with the proto's model;
//! - `prepare_chat` accepts that body or refuses it with `InvalidRequest` (never a panic);
//! - when accepted: the stream flag is the door's (never `extra`'s), a stream already asks
//!   for usage (so nothing is rewritten unless continuous usage is on), and every image
//!   part is counted.
#![no_main]

use arbitrary::Arbitrary;
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use prost_types::value::Kind;
use step3_gateway::core::GatewayError;
use step3_gateway::core::request::{RequestOptions, prepare_chat};
use step3_gateway::grpc::convert::request_json;
use step3_gateway::grpc::pb;

#[derive(Arbitrary, Debug)]
struct Input {
    request: Request,
    stream: bool,
    continuous: bool,
}

#[derive(Arbitrary, Debug)]
struct Request {
    model: String,
    messages: Vec<Message>,
    max_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    stop: Vec<String>,
    seed: Option<i64>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    n: Option<u32>,
    extra: Option<Vec<(Key, Json)>>,
}

#[derive(Arbitrary, Debug)]
struct Message {
    role: String,
    text: String,
    parts: Vec<Part>,
    name: Option<String>,
}

#[derive(Arbitrary, Debug)]
enum Part {
    Text(String),
    ImageUrl { url: Url, detail: Option<String> },
    Image { data: Vec<u8>, mime_type: Mime },
    Empty,
}

/// Keys the server and the gate care about, or any other.
#[derive(Arbitrary, Debug)]
enum Key {
    Stream,
    StreamOptions,
    Model,
    Messages,
    MaxTokens,
    MaxCompletionTokens,
    N,
    Tools,
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum Url {
    Data(Vec<u8>),
    Https(String),
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum Mime {
    Png,
    Jpeg,
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum Json {
    Null,
    Number(f64),
    Str(String),
    Bool(bool),
    List(Vec<Json>),
    Object(Vec<(Key, Json)>),
}

fn key(key: &Key) -> String {
    match key {
        Key::Stream => "stream".into(),
        Key::StreamOptions => "stream_options".into(),
        Key::Model => "model".into(),
        Key::Messages => "messages".into(),
        Key::MaxTokens => "max_tokens".into(),
        Key::MaxCompletionTokens => "max_completion_tokens".into(),
        Key::N => "n".into(),
        Key::Tools => "tools".into(),
        Key::Other(s) => s.clone(),
    }
}

fn value(json: &Json) -> prost_types::Value {
    let kind = match json {
        Json::Null => Kind::NullValue(0),
        Json::Number(n) => Kind::NumberValue(*n),
        Json::Str(s) => Kind::StringValue(s.clone()),
        Json::Bool(b) => Kind::BoolValue(*b),
        Json::List(items) => Kind::ListValue(prost_types::ListValue {
            values: items.iter().map(value).collect(),
        }),
        Json::Object(fields) => Kind::StructValue(structure(fields)),
    };
    prost_types::Value { kind: Some(kind) }
}

fn structure(fields: &[(Key, Json)]) -> prost_types::Struct {
    prost_types::Struct {
        fields: fields.iter().map(|(k, v)| (key(k), value(v))).collect(),
    }
}

fn part(part: &Part) -> pb::ContentPart {
    use base64::Engine;
    let part = match part {
        Part::Text(text) => Some(pb::content_part::Part::Text(text.clone())),
        Part::ImageUrl { url, detail } => Some(pb::content_part::Part::ImageUrl(pb::ImageUrl {
            url: match url {
                Url::Data(bytes) => format!(
                    "data:image/png;base64,{}",
                    base64::engine::general_purpose::STANDARD.encode(bytes)
                ),
                Url::Https(host) => format!("https://{host}/a.png"),
                Url::Other(url) => url.clone(),
            },
            detail: detail.clone(),
        })),
        Part::Image { data, mime_type } => Some(pb::content_part::Part::Image(pb::InlineImage {
            data: data.clone(),
            mime_type: match mime_type {
                Mime::Png => "image/png".into(),
                Mime::Jpeg => "image/jpeg".into(),
                Mime::Other(s) => s.clone(),
            },
        })),
        Part::Empty => None,
    };
    pb::ContentPart { part }
}

fn proto(request: &Request) -> pb::ChatRequest {
    pb::ChatRequest {
        model: request.model.clone(),
        messages: request
            .messages
            .iter()
            .map(|m| pb::Message {
                role: m.role.clone(),
                text: m.text.clone(),
                parts: m.parts.iter().map(part).collect(),
                name: m.name.clone(),
            })
            .collect(),
        max_tokens: request.max_tokens,
        temperature: request.temperature,
        top_p: request.top_p,
        stop: request.stop.clone(),
        seed: request.seed,
        presence_penalty: request.presence_penalty,
        frequency_penalty: request.frequency_penalty,
        n: request.n,
        extra: request.extra.as_deref().map(structure),
    }
}

fuzz_target!(|input: Input| {
    let request = proto(&input.request);
    let convertible = request.messages.iter().all(|m| {
        m.parts.iter().all(|p| match &p.part {
            None => false,
            Some(pb::content_part::Part::Image(image)) => image.mime_type.starts_with("image/"),
            Some(_) => true,
        })
    });
    let body = match request_json(&request, input.stream) {
        Ok(body) => body,
        Err(GatewayError::InvalidRequest { .. }) => {
            assert!(!convertible, "a convertible request was refused");
            return;
        }
        Err(other) => panic!("request_json failed with {other:?}"),
    };
    assert!(convertible, "a request with an empty part was converted");
    let json: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&body).expect("request_json gives a JSON object");
    assert_eq!(json.get("model"), Some(&request.model.clone().into()));

    let options = RequestOptions {
        continuous_usage: input.continuous,
        ..RequestOptions::default()
    };
    let call = match prepare_chat(Bytes::clone(&body), &options) {
        Ok(call) => call,
        Err(GatewayError::InvalidRequest { .. }) => return,
        Err(other) => panic!("prepare_chat failed with {other:?}"),
    };
    assert_eq!(call.model, request.model);
    assert_eq!(
        call.stream, input.stream,
        "extra changed the door's stream flag"
    );
    if input.stream {
        assert!(call.client_wants_usage);
        if !input.continuous {
            assert_eq!(call.upstream_body, body, "a gRPC stream body was rewritten");
        }
    }
    let image_parts = request
        .messages
        .iter()
        .flat_map(|m| &m.parts)
        .filter(|p| {
            matches!(
                p.part,
                Some(pb::content_part::Part::Image(_) | pb::content_part::Part::ImageUrl(_))
            )
        })
        .count();
    assert_eq!(call.images as usize, image_parts);
    if let Some(cap) = request.max_tokens {
        assert!(call.max_tokens.is_some_and(|m| m <= u64::from(cap)));
    }
});
