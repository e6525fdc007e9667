//! Reading a call's request: the few fields the gate needs (model, stream, output cap,
//! images, a prompt estimate), read without building a tree, and the body rewritten for
//! the upstream only where a rewrite is required. Chat completions are read here (the hot
//! path); the other OpenAI APIs in `apis`.

mod apis;

pub use apis::{prepare_completion, prepare_embedding, prepare_response};

use std::borrow::Cow;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::error::GatewayError;
use super::images::{ImageSize, ImageUrlPolicy, estimate_image_tokens};

/// How requests are read and rewritten, from configuration.
#[derive(Clone, Debug, Default)]
pub struct RequestOptions {
    /// Ask the upstream for usage on every stream chunk (vLLM `continuous_usage_stats`).
    pub continuous_usage: bool,
    /// Which image URLs may reach the upstream.
    pub image_policy: ImageUrlPolicy,
}

/// Which OpenAI API a call uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `POST /v1/chat/completions`
    ChatCompletions,
    /// `POST /v1/completions` (legacy text completions)
    Completions,
    /// `POST /v1/embeddings`
    Embeddings,
    /// `POST /v1/responses`
    Responses,
}

impl Endpoint {
    /// The path under the model server's `/v1`.
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chat/completions",
            Endpoint::Completions => "completions",
            Endpoint::Embeddings => "embeddings",
            Endpoint::Responses => "responses",
        }
    }

    /// The member that caps the output, when the API has one.
    fn cap_member(self) -> Option<&'static str> {
        match self {
            Endpoint::ChatCompletions | Endpoint::Completions => Some("max_tokens"),
            Endpoint::Responses => Some("max_output_tokens"),
            Endpoint::Embeddings => None,
        }
    }

    /// Streams end with `data: [DONE]` and carry `usage` beside `choices` (chat and text
    /// completions); the Responses API's stream is typed events instead.
    pub fn streams_chunks(self) -> bool {
        matches!(self, Endpoint::ChatCompletions | Endpoint::Completions)
    }
}

/// A request as the gate sees it, with the body to send upstream.
#[derive(Debug)]
pub struct PreparedCall {
    pub endpoint: Endpoint,
    pub model: String,
    pub stream: bool,
    /// The client asked for the final usage chunk (`stream_options.include_usage`).
    pub client_wants_usage: bool,
    /// The client asked for usage on every chunk (`stream_options.continuous_usage_stats`).
    pub client_wants_continuous_usage: bool,
    pub images: u32,
    /// Sizes of the inline images whose headers could be read.
    pub image_sizes: Vec<ImageSize>,
    /// Names of the hosts that image (and media) URLs point to, to be resolved and checked
    /// before the call is admitted (see [`ImageUrlPolicy::name_to_resolve`]); deduplicated.
    pub image_hosts: Vec<String>,
    /// In fetch mode, the image URLs the gateway fetches before the call is admitted and
    /// then sends on inline ([`with_inline_images`]).
    pub images_to_fetch: Vec<ImageToFetch>,
    /// The client's output cap: the smaller of `max_tokens` and `max_completion_tokens`.
    pub max_tokens: Option<u64>,
    /// Choices to generate (`n`); each may run to the cap.
    pub choices: u64,
    /// Prompt tokens estimated from the text and images, used when the upstream gives none.
    pub prompt_estimate: u64,
    /// What goes upstream: the client's bytes, or a copy with `stream_options` set.
    pub upstream_body: Bytes,
    /// The body as the client sent it (shares the buffer when there was no rewrite).
    pub client_body: Bytes,
}

#[derive(Deserialize)]
#[serde(expecting = "a chat completion request object")]
struct RequestView<'a> {
    #[serde(borrow)]
    model: Cow<'a, str>,
    #[serde(borrow)]
    messages: Vec<MessageView<'a>>,
    #[serde(default)]
    stream: Option<bool>,
    /// Kept even when `null`, so that a rewrite replaces it rather than adding a second key
    /// the upstream would read instead (JSON parsers keep the last duplicate).
    #[serde(default, borrow, deserialize_with = "present_raw")]
    stream_options: Option<&'a RawValue>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
    /// Choices to generate: each may run to the output cap.
    #[serde(default)]
    n: Option<u64>,
    /// Rendered into the prompt by the server, so counted in the estimate.
    #[serde(default, borrow)]
    tools: Option<&'a RawValue>,
    #[serde(default, borrow)]
    functions: Option<&'a RawValue>,
    #[serde(default, borrow)]
    tool_choice: Option<&'a RawValue>,
    #[serde(default, borrow)]
    response_format: Option<&'a RawValue>,
}

/// A field that is present, `null` included: `Some` with its raw text and position.
fn present_raw<'de: 'a, 'a, D: serde::Deserializer<'de>>(
    de: D,
) -> Result<Option<&'a RawValue>, D::Error> {
    <&'a RawValue as Deserialize<'de>>::deserialize(de).map(Some)
}

/// The output caps of a body, with where their values sit in it.
#[derive(Deserialize)]
struct CapView<'a> {
    #[serde(default, borrow, deserialize_with = "present_raw")]
    max_tokens: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present_raw")]
    max_completion_tokens: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present_raw")]
    max_output_tokens: Option<&'a RawValue>,
}

#[derive(Deserialize)]
#[serde(expecting = "a message object")]
struct MessageView<'a> {
    #[serde(default, borrow)]
    content: Option<&'a RawValue>,
    /// Also rendered into the prompt: counted by their JSON length.
    #[serde(default, borrow)]
    tool_calls: Option<&'a RawValue>,
    #[serde(default, borrow)]
    name: Option<&'a RawValue>,
    #[serde(default, borrow)]
    reasoning_content: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct PartView<'a> {
    #[serde(default, borrow, rename = "type")]
    kind: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    text: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    image_url: Option<ImageUrlView<'a>>,
    /// Other media a multimodal server would fetch: held to the same URL policy.
    #[serde(default, borrow)]
    video_url: Option<ImageUrlView<'a>>,
    #[serde(default, borrow)]
    audio_url: Option<ImageUrlView<'a>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ImageUrlView<'a> {
    Object {
        #[serde(borrow)]
        url: Cow<'a, str>,
    },
    /// Some clients send the URL itself as the value.
    Text(#[serde(borrow)] Cow<'a, str>),
}

impl ImageUrlView<'_> {
    fn url(&self) -> &str {
        match self {
            ImageUrlView::Object { url } | ImageUrlView::Text(url) => url,
        }
    }
}

/// An image URL the gateway fetches itself (fetch mode), and where it sits in the body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageToFetch {
    pub url: String,
    /// The field it came in, for errors: `messages[i].content[j].image_url.url`.
    pub param: String,
    /// Its message's index in the body's `messages` (or `input`) array.
    message: usize,
    /// Its part's index in that message's `content`.
    part: usize,
}

/// What the messages hold, as far as the gate cares.
#[derive(Default)]
struct Measured {
    text_chars: u64,
    images: u32,
    image_tokens: u64,
    image_sizes: Vec<ImageSize>,
    image_hosts: Vec<String>,
    to_fetch: Vec<ImageToFetch>,
}

impl ImageToFetch {
    /// An image to fetch at `url`, as if found at `param` (for tests of the fetcher).
    #[cfg(test)]
    pub(crate) fn for_test(url: &str, param: &str) -> Self {
        ImageToFetch {
            url: url.to_owned(),
            param: param.to_owned(),
            message: 0,
            part: 0,
        }
    }

    /// The same image in a Responses request, whose message is `input[index]`.
    fn in_input(&mut self, index: usize) {
        self.message = index;
        self.param = format!(
            "input[{index}]{}",
            self.param.split_once(']').map_or("", |(_, rest)| rest)
        );
    }
}

impl Measured {
    /// Keeps `url` to be fetched by the gateway, within the policy's count per request.
    fn fetch(
        &mut self,
        policy: &ImageUrlPolicy,
        url: &str,
        message: usize,
        part: usize,
        param: String,
    ) -> Result<(), GatewayError> {
        if self.to_fetch.len() >= policy.fetch_max_images as usize {
            return Err(GatewayError::invalid_request(
                format!(
                    "the gateway fetches at most {} image URLs per request; send the others \
                     inline (`data:` URLs)",
                    policy.fetch_max_images
                ),
                Some(&param),
            ));
        }
        self.to_fetch.push(ImageToFetch {
            url: url.to_owned(),
            param,
            message,
            part,
        });
        Ok(())
    }

    /// Keeps the host of `url` (already checked) when it is a name to resolve.
    fn note_host(&mut self, policy: &ImageUrlPolicy, url: &str) {
        if let Some(host) = policy.name_to_resolve(url)
            && !self.image_hosts.contains(&host)
        {
            self.image_hosts.push(host);
        }
    }
}

#[derive(Deserialize, Default)]
struct StreamOptionsView {
    #[serde(default)]
    include_usage: Option<bool>,
    #[serde(default)]
    continuous_usage_stats: Option<bool>,
}

/// Reads a chat completion request body.
///
/// Unknown fields are not looked at and reach the upstream untouched. For streams,
/// `stream_options.include_usage` (and, when `continuous_usage` is set, vLLM's
/// `continuous_usage_stats`) is set so that usage is known however the stream ends.
pub fn prepare_chat(body: Bytes, options: &RequestOptions) -> Result<PreparedCall, GatewayError> {
    let continuous_usage = options.continuous_usage;
    // Fields the gate does not read are skipped without a depth limit and passed on: the
    // model server's parser must not be the one to meet a hostile nesting.
    if nests_deeper_than(&body, MAX_JSON_DEPTH) {
        return Err(GatewayError::invalid_request(
            format!("The JSON body is nested deeper than {MAX_JSON_DEPTH} levels."),
            None,
        ));
    }
    let text = require_object(&body)?;
    let mut de = serde_json::Deserializer::from_str(text);
    // The plain parse is the fast path; a refused body is read again to name the field.
    let Ok(view) = RequestView::deserialize(&mut de) else {
        let mut again = serde_json::Deserializer::from_str(text);
        return Err(
            match serde_path_to_error::deserialize::<_, RequestView<'_>>(&mut again) {
                Err(e) => body_error(e),
                Ok(_) => GatewayError::invalid_request(
                    "We could not parse the JSON body of your request.",
                    None,
                ),
            },
        );
    };
    de.end().map_err(|e| {
        GatewayError::invalid_request(
            format!("We could not parse the JSON body of your request: {e}"),
            None,
        )
    })?;
    if view.model.trim().is_empty() {
        return Err(GatewayError::invalid_request(
            "`model` must name a model",
            Some("model"),
        ));
    }
    if view.messages.is_empty() {
        return Err(GatewayError::invalid_request(
            "`messages` must contain at least one message",
            Some("messages"),
        ));
    }
    let measured = measure_messages(&view.messages, &options.image_policy)?;
    // Tool definitions and the like are rendered into the prompt too: their JSON counts.
    let extra_chars: u64 = [
        view.tools,
        view.functions,
        view.tool_choice,
        view.response_format,
    ]
    .into_iter()
    .flatten()
    .map(|raw| raw.get().len() as u64)
    .sum();
    let prompt_estimate = (measured.text_chars + extra_chars).div_ceil(4)
        + 4 * view.messages.len() as u64
        + measured.image_tokens;
    let choices = view.n.unwrap_or(1).max(1);
    let max_tokens = match (view.max_tokens, view.max_completion_tokens) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };

    let stream = view.stream.unwrap_or(false);
    let usage = stream_usage(&body, stream, view.stream_options, continuous_usage)?;
    Ok(PreparedCall {
        endpoint: Endpoint::ChatCompletions,
        model: view.model.into_owned(),
        stream,
        client_wants_usage: usage.client_wants_usage,
        client_wants_continuous_usage: usage.client_wants_continuous_usage,
        images: measured.images,
        image_sizes: measured.image_sizes,
        image_hosts: measured.image_hosts,
        images_to_fetch: measured.to_fetch,
        max_tokens,
        choices,
        prompt_estimate,
        upstream_body: usage.upstream_body,
        client_body: body,
    })
}

/// What a stream's client asked of usage, and the body that asks the upstream for all of it.
struct StreamUsage {
    client_wants_usage: bool,
    client_wants_continuous_usage: bool,
    upstream_body: Bytes,
}

/// Reads `stream_options` (raw, as present in `body`); for a stream, sets
/// `include_usage` (and, when `continuous_usage` is set, vLLM's `continuous_usage_stats`)
/// so that usage is known however the stream ends.
fn stream_usage(
    body: &Bytes,
    stream: bool,
    stream_options: Option<&RawValue>,
    continuous_usage: bool,
) -> Result<StreamUsage, GatewayError> {
    let client_options = match stream_options {
        Some(raw) if raw.get() != "null" => serde_json::from_str::<StreamOptionsView>(raw.get())
            .map_err(|e| {
                GatewayError::invalid_request(
                    format!("`stream_options` is invalid: {e}"),
                    Some("stream_options"),
                )
            })?,
        _ => StreamOptionsView::default(),
    };
    let client_wants_usage = client_options.include_usage.unwrap_or(false);
    let client_wants_continuous_usage = client_options.continuous_usage_stats.unwrap_or(false);
    let needs_rewrite =
        stream && (!client_wants_usage || (continuous_usage && !client_wants_continuous_usage));
    let upstream_body = if needs_rewrite {
        let options_span = stream_options.map(|raw| span_of(body, raw.get()));
        with_stream_options(body, options_span, continuous_usage)?
    } else {
        body.clone()
    };
    Ok(StreamUsage {
        client_wants_usage,
        client_wants_continuous_usage,
        upstream_body,
    })
}

/// The deepest nesting of arrays and objects a request may have (serde_json's own limit
/// when it builds values).
pub const MAX_JSON_DEPTH: usize = 128;

/// Whether arrays and objects in `json` nest deeper than `limit`. One pass; the insides of
/// strings (inline images) are skipped with `memchr`. `json` need not be valid.
pub fn nests_deeper_than(json: &[u8], limit: usize) -> bool {
    let mut depth = 0usize;
    let mut i = 0;
    while let Some(&byte) = json.get(i) {
        match byte {
            b'"' => {
                // To the closing quote, past escaped characters.
                i += 1;
                loop {
                    match json
                        .get(i..)
                        .and_then(|rest| memchr::memchr2(b'"', b'\\', rest))
                    {
                        Some(k) if json[i + k] == b'\\' => i += k + 2,
                        Some(k) => {
                            i += k;
                            break;
                        }
                        None => return false,
                    }
                }
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    false
}

fn body_error(e: serde_path_to_error::Error<serde_json::Error>) -> GatewayError {
    let path = e.path().to_string();
    let inner = e.into_inner();
    if inner.is_syntax() || inner.is_eof() {
        return GatewayError::invalid_request(
            format!("We could not parse the JSON body of your request: {inner}"),
            None,
        );
    }
    field_error(&path, &inner.to_string())
}

/// The error for a body (or query) that parsed but does not fit: serde's `message` about
/// the member at `path` (`.` for the body itself), with `param` naming the field.
pub fn field_error(path: &str, message: &str) -> GatewayError {
    // serde reports a missing field at its parent; name the field itself.
    if let Some(rest) = message.strip_prefix("missing field `") {
        let field = rest.split('`').next().unwrap_or_default();
        let param = if path == "." {
            field.to_owned()
        } else {
            format!("{path}.{field}")
        };
        return GatewayError::invalid_request(
            format!("Missing required parameter: '{param}'."),
            Some(&param),
        );
    }
    let message = message.split(" at line ").next().unwrap_or(message);
    if path == "." && message.contains("expected struct ") {
        // serde names the Rust type it wanted; the reader needs to hear about the JSON.
        GatewayError::invalid_request("Invalid request body: it must be a JSON object.", None)
    } else if path == "." {
        GatewayError::invalid_request(format!("Invalid request body: {message}"), None)
    } else {
        GatewayError::invalid_request(format!("Invalid type for '{path}': {message}"), Some(path))
    }
}

/// Counts the characters of text content and the images (checked against the URL
/// policy, with the sizes of inline ones read from their headers).
fn measure_messages(
    messages: &[MessageView<'_>],
    policy: &ImageUrlPolicy,
) -> Result<Measured, GatewayError> {
    let mut measured = Measured::default();
    for (i, message) in messages.iter().enumerate() {
        measured.text_chars += [message.tool_calls, message.name, message.reasoning_content]
            .into_iter()
            .flatten()
            .map(|raw| raw.get().len() as u64)
            .sum::<u64>();
        let Some(content) = message.content else {
            continue;
        };
        let raw = content.get();
        let field = || format!("messages[{i}].content");
        match raw.as_bytes().first() {
            Some(b'"') => {
                let text: Cow<'_, str> = serde_json::from_str(raw)
                    .map_err(|e| GatewayError::invalid_request(e.to_string(), Some(&field())))?;
                measured.text_chars += text.chars().count() as u64;
            }
            Some(b'[') => {
                let parts: Vec<PartView<'_>> = serde_json::from_str(raw).map_err(|e| {
                    GatewayError::invalid_request(
                        format!("Invalid content parts: {e}"),
                        Some(&field()),
                    )
                })?;
                for (j, part) in parts.iter().enumerate() {
                    for (field, media) in [
                        ("video_url", &part.video_url),
                        ("audio_url", &part.audio_url),
                    ] {
                        if let Some(media) = media {
                            policy.check(media.url()).map_err(|e| {
                                GatewayError::invalid_request(
                                    e.to_string(),
                                    Some(&format!("messages[{i}].content[{j}].{field}.url")),
                                )
                            })?;
                            measured.note_host(policy, media.url());
                        }
                    }
                    match (part.kind.as_deref(), &part.image_url) {
                        (Some("image_url" | "input_image" | "image"), url) | (_, url @ Some(_)) => {
                            measured.images += 1;
                            let param = || format!("messages[{i}].content[{j}].image_url.url");
                            let refused = |e: super::images::ImagePolicyError| {
                                GatewayError::invalid_request(e.to_string(), Some(&param()))
                            };
                            let size = match url {
                                Some(url) => {
                                    let inline = policy.check(url.url()).map_err(refused)?;
                                    if policy.fetches(url.url()).map_err(refused)? {
                                        measured.fetch(policy, url.url(), i, j, param())?;
                                    } else {
                                        measured.note_host(policy, url.url());
                                    }
                                    inline.and_then(|image| image.size)
                                }
                                None => None,
                            };
                            measured.image_tokens += estimate_image_tokens(size);
                            measured.image_sizes.extend(size);
                        }
                        _ => {
                            measured.text_chars +=
                                part.text.as_ref().map_or(0, |t| t.chars().count() as u64);
                        }
                    }
                }
            }
            _ => {}
        }
    }
    Ok(measured)
}

/// The body as text, refusing what the partial reads below would let through although it
/// is not a JSON object: invalid UTF-8 (serde skips unknown members without checking their
/// strings) and an array (serde reads a struct from an array too, and the rewrites below
/// splice members into an object). Anything else that is not an object fails its
/// deserialisation with the usual message.
fn require_object(body: &[u8]) -> Result<&str, GatewayError> {
    let text = std::str::from_utf8(body).map_err(|e| {
        GatewayError::invalid_request(
            format!("We could not parse the JSON body of your request: it is not UTF-8 ({e})"),
            None,
        )
    })?;
    if text.trim_ascii_start().starts_with('[') {
        return Err(GatewayError::invalid_request(
            "Invalid request body: invalid type: sequence, expected a chat completion request object",
            None,
        ));
    }
    Ok(text)
}

/// `body`, a JSON object, with `"name":value` added as its first member.
fn with_first_member(body: &[u8], name: &str, value: &[u8]) -> Vec<u8> {
    // The body parsed as an object, so its first `{` opens it.
    let open = body.iter().position(|&b| b == b'{').map_or(0, |i| i + 1);
    let (head, rest) = body.split_at(open);
    let mut out = Vec::with_capacity(body.len() + name.len() + value.len() + 4);
    out.extend_from_slice(head);
    out.push(b'"');
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\":");
    out.extend_from_slice(value);
    // `{}` takes no comma after its only member.
    if !rest.trim_ascii_start().starts_with(b"}") {
        out.push(b',');
    }
    out.extend_from_slice(rest);
    out
}

/// The body with `model` replaced by `served` (an alias resolved to the served name).
pub fn with_model(body: &Bytes, served: &str) -> Result<Bytes, GatewayError> {
    #[derive(Deserialize)]
    struct ModelView<'a> {
        #[serde(borrow)]
        model: &'a RawValue,
    }
    let view: ModelView<'_> = serde_json::from_str(require_object(body)?).map_err(|e| {
        GatewayError::invalid_request(format!("cannot set the model: {e}"), Some("model"))
    })?;
    let span = span_of(body, view.model.get());
    let value = serde_json::to_string(served)
        .map_err(|e| GatewayError::invalid_request(e.to_string(), Some("model")))?;
    let mut out = Vec::with_capacity(body.len() + value.len());
    out.extend_from_slice(&body[..span.start]);
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(&body[span.end..]);
    Ok(Bytes::from(out))
}

/// The body with its output cap set to `cap`: every cap field present is replaced, or
/// `max_tokens` is added when there is none. The rest of the body is kept as it is.
pub fn with_max_tokens(body: &Bytes, cap: u64) -> Result<Bytes, GatewayError> {
    with_cap(body, cap, "max_tokens")
}

/// The body of an `endpoint` call with its output cap set to `cap` (an API without an
/// output cap is left as it is).
pub fn with_output_cap(body: &Bytes, endpoint: Endpoint, cap: u64) -> Result<Bytes, GatewayError> {
    match endpoint.cap_member() {
        Some(member) => with_cap(body, cap, member),
        None => Ok(body.clone()),
    }
}

/// [`with_max_tokens`], adding `member` when the body has no cap.
fn with_cap(body: &Bytes, cap: u64, member: &str) -> Result<Bytes, GatewayError> {
    let view: CapView<'_> = serde_json::from_str(require_object(body)?)
        .map_err(|e| GatewayError::invalid_request(format!("cannot set {member}: {e}"), None))?;
    let value = cap.to_string();
    let mut spans: Vec<std::ops::Range<usize>> = [
        view.max_tokens,
        view.max_completion_tokens,
        view.max_output_tokens,
    ]
    .into_iter()
    .flatten()
    .map(|raw| span_of(body, raw.get()))
    .collect();
    spans.sort_by_key(|span| span.start);
    if spans.is_empty() {
        return Ok(Bytes::from(with_first_member(
            body,
            member,
            value.as_bytes(),
        )));
    }
    let mut out = Vec::with_capacity(body.len() + 24);
    let mut at = 0;
    for span in spans {
        out.extend_from_slice(&body[at..span.start]);
        out.extend_from_slice(value.as_bytes());
        at = span.end;
    }
    out.extend_from_slice(&body[at..]);
    Ok(Bytes::from(out))
}

/// `body` with each fetched image's URL replaced by its `data:` URL, in the `member`
/// array (`messages`, or a Responses request's `input`) where [`ImageToFetch`] found it;
/// the rest of the body is kept byte for byte.
pub fn with_inline_images(
    body: &Bytes,
    member: &str,
    images: &[(ImageToFetch, String)],
) -> Result<Bytes, GatewayError> {
    #[derive(Deserialize)]
    struct Item<'a> {
        #[serde(default, borrow)]
        content: Option<&'a RawValue>,
    }
    #[derive(Deserialize)]
    struct Part<'a> {
        #[serde(default, borrow)]
        image_url: Option<&'a RawValue>,
    }
    #[derive(Deserialize)]
    struct UrlObject<'a> {
        #[serde(borrow)]
        url: &'a RawValue,
    }
    let lost = |param: &str| {
        GatewayError::invalid_request("the image could not be put back inline", Some(param))
    };
    #[derive(Deserialize)]
    struct Top<'a> {
        #[serde(default, borrow)]
        messages: Option<&'a RawValue>,
        #[serde(default, borrow)]
        input: Option<&'a RawValue>,
    }
    let top: Top<'_> = serde_json::from_str(require_object(body)?).map_err(|e| {
        GatewayError::invalid_request(format!("cannot inline the images: {e}"), None)
    })?;
    let array = if member == "input" {
        top.input
    } else {
        top.messages
    };
    let items: Vec<&RawValue> = array
        .map(|raw| serde_json::from_str(raw.get()))
        .transpose()
        .map_err(|e| GatewayError::invalid_request(e.to_string(), Some(member)))?
        .unwrap_or_default();
    let mut spans = Vec::with_capacity(images.len());
    for (image, data_url) in images {
        let url = items
            .get(image.message)
            .and_then(|item| serde_json::from_str::<Item<'_>>(item.get()).ok())
            .and_then(|item| item.content)
            .and_then(|content| serde_json::from_str::<Vec<&RawValue>>(content.get()).ok())
            .and_then(|parts| parts.get(image.part).copied())
            .and_then(|part| serde_json::from_str::<Part<'_>>(part.get()).ok())
            .and_then(|part| part.image_url)
            .and_then(|value| match value.get().as_bytes().first() {
                Some(b'"') => Some(value),
                _ => serde_json::from_str::<UrlObject<'_>>(value.get())
                    .ok()
                    .map(|object| object.url),
            })
            .ok_or_else(|| lost(&image.param))?;
        let value = serde_json::to_string(data_url)
            .map_err(|e| GatewayError::invalid_request(e.to_string(), Some(&image.param)))?;
        spans.push((span_of(body, url.get()), value));
    }
    spans.sort_by_key(|(span, _)| span.start);
    let mut out =
        Vec::with_capacity(body.len() + spans.iter().map(|(_, v)| v.len()).sum::<usize>());
    let mut at = 0;
    for (span, value) in spans {
        if span.start < at {
            return Err(GatewayError::invalid_request(
                "an image URL was given twice in one place",
                None,
            ));
        }
        out.extend_from_slice(&body[at..span.start]);
        out.extend_from_slice(value.as_bytes());
        at = span.end;
    }
    out.extend_from_slice(&body[at..]);
    Ok(Bytes::from(out))
}

/// The byte range of `inner`, a slice borrowed from `outer`.
fn span_of(outer: &[u8], inner: &str) -> std::ops::Range<usize> {
    let start = inner.as_ptr() as usize - outer.as_ptr() as usize;
    start..start + inner.len()
}

/// The body with `stream_options` replaced (or added) so that usage is always streamed.
fn with_stream_options(
    body: &[u8],
    options_span: Option<std::ops::Range<usize>>,
    continuous_usage: bool,
) -> Result<Bytes, GatewayError> {
    let mut options = match &options_span {
        Some(span) => serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(
            &body[span.clone()],
        )
        .unwrap_or_default(),
        None => serde_json::Map::new(),
    };
    options.insert("include_usage".into(), true.into());
    if continuous_usage {
        options.insert("continuous_usage_stats".into(), true.into());
    }
    let options = serde_json::to_vec(&options)
        .map_err(|e| GatewayError::invalid_request(e.to_string(), Some("stream_options")))?;
    let out = match options_span {
        Some(span) => [&body[..span.start], &options, &body[span.end..]].concat(),
        None => with_first_member(body, "stream_options", &options),
    };
    Ok(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{Value, json};
    use std::collections::BTreeMap;

    #[test]
    fn nesting_is_measured_outside_strings_only() {
        let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        assert!(!nests_deeper_than(deep(128).as_bytes(), 128));
        assert!(nests_deeper_than(deep(129).as_bytes(), 128));
        assert!(nests_deeper_than(&b"{".repeat(100_000), 128));
        let in_string = format!(r#"{{"a":"{}","b":"\\\"[[["}}"#, "[".repeat(1000));
        assert!(!nests_deeper_than(in_string.as_bytes(), 2));
        assert!(nests_deeper_than(br#"{"a":"\"",[[["#, 3));
        assert!(!nests_deeper_than(br#"{"a":"\"[[[[["#, 3));
    }

    fn options(continuous: bool) -> RequestOptions {
        RequestOptions {
            continuous_usage: continuous,
            ..RequestOptions::default()
        }
    }

    fn prepare(body: Value, continuous: bool) -> Result<PreparedCall, GatewayError> {
        prepare_chat(Bytes::from(body.to_string()), &options(continuous))
    }

    fn upstream_json(call: &PreparedCall) -> Value {
        serde_json::from_slice(&call.upstream_body).unwrap()
    }

    #[test]
    fn non_stream_bodies_go_upstream_byte_for_byte() {
        let body = r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"top_k":5,"repetition_penalty":1.1}"#;
        let call = prepare_chat(Bytes::from(body), &options(true)).unwrap();
        assert_eq!(call.upstream_body, body.as_bytes());
        assert!(!call.stream);
        assert_eq!(call.model, "m");
    }

    #[test]
    fn streams_get_usage_options_and_keep_other_fields() {
        let call = prepare(
            json!({"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true,"chat_template_kwargs":{"x":1}}),
            true,
        )
        .unwrap();
        let sent = upstream_json(&call);
        assert_eq!(
            sent["stream_options"],
            json!({"include_usage":true,"continuous_usage_stats":true})
        );
        assert_eq!(sent["chat_template_kwargs"], json!({"x":1}));
        assert!(!call.client_wants_usage);

        let call = prepare(
            json!({"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":false,"other":2}}),
            false,
        )
        .unwrap();
        let sent = upstream_json(&call);
        assert_eq!(
            sent["stream_options"],
            json!({"include_usage":true,"other":2})
        );
    }

    #[test]
    fn a_stream_that_already_asks_for_usage_is_not_rewritten() {
        let body = json!({"model":"m","messages":[{"role":"user","content":"x"}],"stream":true,
            "stream_options":{"include_usage":true,"continuous_usage_stats":true}})
        .to_string();
        let call = prepare_chat(Bytes::from(body.clone()), &options(true)).unwrap();
        assert_eq!(call.upstream_body, body.as_bytes());
        assert!(call.client_wants_usage && call.client_wants_continuous_usage);
    }

    #[test]
    fn errors_name_the_field() {
        let err = |v: Value| match prepare(v, true).unwrap_err() {
            GatewayError::InvalidRequest { message, param } => (message, param),
            other => panic!("unexpected {other:?}"),
        };
        let (_, param) = err(json!({"messages":[{"role":"user","content":"x"}]}));
        assert_eq!(param.as_deref(), Some("model"));
        let (_, param) = err(json!({"model":"m"}));
        assert_eq!(param.as_deref(), Some("messages"));
        let (message, param) = err(json!({"model":7,"messages":[]}));
        assert_eq!(param.as_deref(), Some("model"), "{message}");
        let (_, param) = err(json!({"model":"m","messages":[]}));
        assert_eq!(param.as_deref(), Some("messages"));
        let (_, param) = err(json!({"model":"m","messages":[{"content":"x"}],"stream":"yes"}));
        assert_eq!(param.as_deref(), Some("stream"));
        let (message, param) = err(json!("hello"));
        assert_eq!(param, None);
        assert!(
            message.contains("chat completion request object"),
            "{message}"
        );
        assert!(matches!(
            prepare_chat(Bytes::from_static(b"{\"model\":"), &options(true)),
            Err(GatewayError::InvalidRequest { param: None, .. })
        ));
    }

    #[test]
    fn images_and_text_are_counted_for_the_estimate() {
        let call = prepare(
            json!({"model":"m","messages":[
                {"role":"system","content":"abcdefgh"},
                {"role":"user","content":[
                    {"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"}},
                    {"type":"text","text":"abcd"}]},
                {"role":"assistant","content":null,"tool_calls":[]}]}),
            true,
        )
        .unwrap();
        assert_eq!(call.images, 1);
        // 12 characters of text and 2 of `tool_calls` (which the server renders too).
        assert_eq!(call.prompt_estimate, 4 + 12 + estimate_image_tokens(None));
    }

    #[test]
    fn the_output_cap_is_read_and_can_be_lowered_in_place() {
        let call = prepare(
            json!({"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":500,"max_completion_tokens":300,"top_k":3}),
            true,
        )
        .unwrap();
        assert_eq!(call.max_tokens, Some(300));
        let lowered: Value =
            serde_json::from_slice(&with_max_tokens(&call.upstream_body, 42).unwrap()).unwrap();
        assert_eq!(
            (
                lowered["max_tokens"].as_u64(),
                lowered["max_completion_tokens"].as_u64()
            ),
            (Some(42), Some(42))
        );
        assert_eq!(lowered["top_k"], 3);
        let renamed: Value =
            serde_json::from_slice(&with_model(&call.upstream_body, "served/name").unwrap())
                .unwrap();
        assert_eq!(renamed["model"], "served/name");
        assert_eq!(renamed["top_k"], 3);

        let call = prepare(
            json!({"model":"m","messages":[{"role":"user","content":"x"}]}),
            true,
        )
        .unwrap();
        assert_eq!(call.max_tokens, None);
        let added: Value =
            serde_json::from_slice(&with_max_tokens(&call.upstream_body, 7).unwrap()).unwrap();
        assert_eq!(added["max_tokens"], 7);
        assert_eq!(added["model"], "m");
    }

    /// A JSON array deserialises into the request struct positionally; the rewrite then put
    /// `stream_options` into the first object it found, a message.
    #[test]
    fn an_array_body_is_refused() {
        for body in [&br#"["m",[{"content":"x"}],true]"#[..], b" [\"m\",[{}]]"] {
            let err = prepare_chat(Bytes::from_static(body), &options(true)).unwrap_err();
            assert!(matches!(
                err,
                GatewayError::InvalidRequest { param: None, .. }
            ));
            assert!(with_model(&Bytes::from_static(body), "s").is_err());
            assert!(with_max_tokens(&Bytes::from_static(body), 1).is_err());
        }
    }

    /// Found by the `chat_request` fuzz target: invalid UTF-8 inside a member the gate does
    /// not read was accepted (serde skips such members unchecked) and sent upstream as if
    /// it were JSON.
    #[test]
    fn a_body_that_is_not_utf8_is_refused() {
        let body = Bytes::from_static(
            b"{\"model\":\"m\",\"messages\":[{\"content\":\"x\"}],\"u\":\"https://example.co\x94/a.png\"}",
        );
        let err = prepare_chat(body.clone(), &options(true)).unwrap_err();
        assert!(matches!(
            err,
            GatewayError::InvalidRequest { param: None, .. }
        ));
        assert!(with_model(&body, "s").is_err());
        assert!(with_max_tokens(&body, 1).is_err());
    }

    /// `{}` used to become `{"max_tokens":7,}`.
    #[test]
    fn a_cap_added_to_an_empty_object_is_valid_json() {
        let out = with_max_tokens(&Bytes::from_static(b"{ }"), 7).unwrap();
        assert_eq!(&out[..], b"{\"max_tokens\":7 }");
        let out = with_max_tokens(&Bytes::from_static(b"{\"a\":1}"), 7).unwrap();
        assert_eq!(&out[..], b"{\"max_tokens\":7,\"a\":1}");
    }

    type Members = BTreeMap<String, Box<RawValue>>;

    fn members(body: &[u8]) -> Members {
        serde_json::from_slice(body).unwrap()
    }

    /// Every member of `before` but `changed` is in `after` with the same text, and only
    /// `changed` may be new.
    fn only_changed(before: &Members, after: &Members, changed: &[&str]) {
        for (key, value) in before {
            if !changed.contains(&key.as_str()) {
                assert_eq!(after.get(key).map(|v| v.get()), Some(value.get()), "{key}");
            }
        }
        assert!(
            after
                .keys()
                .all(|k| before.contains_key(k) || changed.contains(&k.as_str()))
        );
    }

    /// A request body: the members the gate reads, in any order, spelled as clients do
    /// (with odd whitespace, `null`s and unknown fields next to them).
    fn request_body() -> impl Strategy<Value = (String, bool)> {
        let optional =
            |values: &'static [&'static str]| prop::option::of(prop::sample::select(values));
        (
            prop::sample::select(&["\"m\"", "\"st\\u0065p3\""][..]),
            optional(&["true", "false", "null"]),
            optional(&[
                "null",
                "{}",
                "{\"include_usage\":false,\"x\":[1e400]}",
                "{\"include_usage\":true}",
                "{\"continuous_usage_stats\":true,\"include_usage\":true}",
            ]),
            optional(&["null", "0", "5", "18446744073709551615"]),
            optional(&["null", "7"]),
            prop::sample::subsequence(
                &[
                    "\"top_k\":20",
                    "\"x\":{\"max_tokens\":1}",
                    "\"n\":2",
                    "\"u\":1.5e300",
                ][..],
                0..=3,
            ),
            any::<prop::sample::Index>(),
            prop::sample::select(&["", " ", "\n\t", "\r\n "][..]),
        )
            .prop_map(
                |(model, stream, options, max, completion, extra, order, space)| {
                    let mut fields = vec![
                        format!("\"model\"{space}:{model}"),
                        format!("\"messages\":[{space}{{\"role\":\"user\",\"content\":\"hi\"}}]"),
                    ];
                    let named = [
                        ("stream", stream),
                        ("stream_options", options),
                        ("max_tokens", max),
                        ("max_completion_tokens", completion),
                    ];
                    for (name, value) in named {
                        if let Some(value) = value {
                            fields.push(format!("\"{name}\":{space}{value}"));
                        }
                    }
                    fields.extend(extra.into_iter().map(str::to_owned));
                    let rotate = order.index(fields.len());
                    fields.rotate_left(rotate);
                    let body = format!(
                        "{space}{{{space}{}{space}}}{space}",
                        fields.join(format!("{space},").as_str())
                    );
                    (body, stream == Some("true"))
                },
            )
    }

    proptest! {
        #[test]
        fn rewrites_change_only_their_own_member(
            (body, stream) in request_body(),
            continuous in any::<bool>(),
            served in prop::sample::select(&["served/name", "q\"uote\\", "ü\u{2028}x"][..]),
            cap in any::<u64>(),
        ) {
            let body = Bytes::from(body);
            let call = prepare_chat(body.clone(), &options(continuous)).unwrap();
            prop_assert_eq!(call.stream, stream);
            let before = members(&body);
            let sent = members(&call.upstream_body);
            if call.upstream_body != body {
                prop_assert!(stream);
                only_changed(&before, &sent, &["stream_options"]);
                let options: Value = serde_json::from_str(sent["stream_options"].get()).unwrap();
                prop_assert_eq!(&options["include_usage"], &json!(true));
                if continuous {
                    prop_assert_eq!(&options["continuous_usage_stats"], &json!(true));
                }
            }

            let renamed = with_model(&call.upstream_body, served).unwrap();
            let renamed_members = members(&renamed);
            only_changed(&sent, &renamed_members, &["model"]);
            prop_assert_eq!(
                serde_json::from_str::<String>(renamed_members["model"].get()).unwrap(),
                served
            );

            let capped = with_max_tokens(&renamed, cap).unwrap();
            let capped_members = members(&capped);
            only_changed(&renamed_members, &capped_members, &["max_tokens", "max_completion_tokens"]);
            // Every cap present is replaced, or `max_tokens` is added when there is none.
            let had_completion = renamed_members.contains_key("max_completion_tokens");
            let add_max = renamed_members.contains_key("max_tokens") || !had_completion;
            let cap_text = cap.to_string();
            for (name, present) in [("max_tokens", add_max), ("max_completion_tokens", had_completion)] {
                let expected = present.then_some(cap_text.as_str());
                prop_assert_eq!(capped_members.get(name).map(|v| v.get()), expected, "{}", name);
            }
            let again = prepare_chat(capped, &options(continuous)).unwrap();
            prop_assert_eq!((again.max_tokens, again.stream), (Some(cap), stream));
            prop_assert_eq!(again.model, served);
        }
    }

    fn fetching(max_images: u32) -> RequestOptions {
        RequestOptions {
            image_policy: ImageUrlPolicy {
                fetch: true,
                fetch_max_images: max_images,
                ..ImageUrlPolicy::default()
            },
            ..RequestOptions::default()
        }
    }

    #[test]
    fn fetch_mode_lists_http_images_and_inlines_them_in_place() {
        // The second URL is written with escaped slashes, as some JSON encoders do.
        let body = r#"{"model":"m","messages":[{"role":"system","content":"hi"},{"role":"user","content":[{"type":"text","text":"a"},{"type":"image_url","image_url":{"url":"https://cdn.example/a.png","detail":"low"}},{"type":"image_url","image_url":"https:\/\/cdn.example\/b.png"}]}],"top_k":5}"#;
        let call = prepare_chat(Bytes::from(body), &fetching(8)).unwrap();
        assert!(call.image_hosts.is_empty());
        let params: Vec<_> = call
            .images_to_fetch
            .iter()
            .map(|i| (&*i.url, &*i.param))
            .collect();
        assert_eq!(
            params,
            [
                (
                    "https://cdn.example/a.png",
                    "messages[1].content[1].image_url.url"
                ),
                (
                    "https://cdn.example/b.png",
                    "messages[1].content[2].image_url.url"
                ),
            ]
        );
        let fetched: Vec<_> = call
            .images_to_fetch
            .iter()
            .zip(["data:image/png;base64,AAAA", "data:image/gif;base64,BBBB"])
            .map(|(image, data)| (image.clone(), data.to_owned()))
            .collect();
        let inlined = with_inline_images(&call.client_body, "messages", &fetched).unwrap();
        assert_eq!(
            std::str::from_utf8(&inlined).unwrap(),
            body.replace(
                "\"https://cdn.example/a.png\"",
                "\"data:image/png;base64,AAAA\""
            )
            .replace(
                r#""https:\/\/cdn.example\/b.png""#,
                "\"data:image/gif;base64,BBBB\""
            )
        );
        // Off, the same body is forwarded as it is, its host resolved first.
        let off = prepare_chat(Bytes::from(body), &RequestOptions::default()).unwrap();
        assert!(off.images_to_fetch.is_empty());
        assert_eq!(off.image_hosts, ["cdn.example"]);
    }

    #[test]
    fn fetch_mode_caps_the_urls_fetched_per_request() {
        let body = json!({"model": "m", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://cdn.example/a.png"}},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            {"type": "image_url", "image_url": {"url": "https://cdn.example/b.png"}},
        ]}]});
        let e = prepare_chat(Bytes::from(body.to_string()), &fetching(1)).unwrap_err();
        match e {
            GatewayError::InvalidRequest { param, message } => {
                assert_eq!(
                    param.as_deref(),
                    Some("messages[0].content[2].image_url.url")
                );
                assert!(message.contains("at most 1 image URL"), "{message}");
            }
            other => panic!("unexpected {other:?}"),
        }
        let call = prepare_chat(Bytes::from(body.to_string()), &fetching(2)).unwrap();
        assert_eq!((call.images, call.images_to_fetch.len()), (3, 2));
    }

    #[test]
    fn fetch_mode_finds_a_responses_image_by_its_input_item() {
        let body = json!({"model": "m", "input": [
            {"type": "function_call_output", "call_id": "c", "output": "x"},
            {"role": "user", "content": [
                {"type": "input_text", "text": "what is it?"},
                {"type": "input_image", "image_url": "https://cdn.example/a.png"},
            ]},
        ]});
        let body = Bytes::from(body.to_string());
        let call = prepare_response(body.clone(), &fetching(8)).unwrap();
        assert_eq!(call.images_to_fetch.len(), 1);
        assert_eq!(
            call.images_to_fetch[0].param,
            "input[1].content[1].image_url.url"
        );
        let fetched = [(
            call.images_to_fetch[0].clone(),
            "data:image/png;base64,AAAA".to_owned(),
        )];
        let inlined = with_inline_images(&body, "input", &fetched).unwrap();
        let value: Value = serde_json::from_slice(&inlined).unwrap();
        assert_eq!(
            value["input"][1]["content"][1]["image_url"],
            "data:image/png;base64,AAAA"
        );
        assert_eq!(value["input"][0]["output"], "x");
    }
}
