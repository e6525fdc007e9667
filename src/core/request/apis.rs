//! The other OpenAI APIs vLLM serves: legacy text completions, embeddings and the Responses
//! API. Each is read as far as the gate needs (model, stream, output cap, images, a prompt
//! estimate) and otherwise passed on as the client sent it.

use std::borrow::Cow;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::{
    Endpoint, MAX_JSON_DEPTH, MessageView, PreparedCall, RequestOptions, body_error,
    measure_messages, nests_deeper_than, present_raw, require_object, stream_usage,
};
use crate::core::error::GatewayError;

/// vLLM's (and OpenAI's) output cap for a text completion that gives none.
const COMPLETION_DEFAULT_MAX_TOKENS: u64 = 16;

/// Reads `body` as `T` after the checks every request gets (depth, UTF-8, an object); a
/// refused body is read again to name the field.
fn read_view<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, GatewayError> {
    if nests_deeper_than(body, MAX_JSON_DEPTH) {
        return Err(GatewayError::invalid_request(
            format!("The JSON body is nested deeper than {MAX_JSON_DEPTH} levels."),
            None,
        ));
    }
    let text = require_object(body)?;
    let mut de = serde_json::Deserializer::from_str(text);
    match serde_path_to_error::deserialize::<_, T>(&mut de) {
        Ok(view) => {
            de.end().map_err(|e| {
                GatewayError::invalid_request(
                    format!("We could not parse the JSON body of your request: {e}"),
                    None,
                )
            })?;
            Ok(view)
        }
        Err(e) => Err(body_error(e)),
    }
}

fn check_model(model: &str) -> Result<String, GatewayError> {
    if model.trim().is_empty() {
        return Err(GatewayError::invalid_request(
            "`model` must name a model",
            Some("model"),
        ));
    }
    Ok(model.to_owned())
}

/// What a prompt given as text, texts, tokens or token lists holds: how many prompts, and
/// its size in tokens (counted when given as tokens, estimated from the text otherwise).
#[derive(Debug, Default, PartialEq, Eq)]
struct PromptSize {
    prompts: u64,
    tokens: u64,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum PromptView<'a> {
    Text(#[serde(borrow)] Cow<'a, str>),
    Texts(#[serde(borrow)] Vec<Cow<'a, str>>),
    Tokens(Vec<u64>),
    TokenLists(Vec<Vec<u64>>),
}

fn prompt_size(raw: &RawValue, field: &str) -> Result<PromptSize, GatewayError> {
    let view: PromptView<'_> = serde_json::from_str(raw.get()).map_err(|_| {
        GatewayError::invalid_request(
            format!("`{field}` must be a string, an array of strings, or token ids"),
            Some(field),
        )
    })?;
    let text = |t: &str| (t.chars().count() as u64).div_ceil(4);
    let size = match view {
        PromptView::Text(t) => PromptSize {
            prompts: 1,
            tokens: text(&t),
        },
        PromptView::Texts(texts) => PromptSize {
            prompts: texts.len() as u64,
            tokens: texts.iter().map(|t| text(t)).sum(),
        },
        PromptView::Tokens(tokens) => PromptSize {
            prompts: 1,
            tokens: tokens.len() as u64,
        },
        PromptView::TokenLists(lists) => PromptSize {
            prompts: lists.len() as u64,
            tokens: lists.iter().map(|l| l.len() as u64).sum(),
        },
    };
    if size.prompts == 0 {
        return Err(GatewayError::invalid_request(
            format!("`{field}` must not be empty"),
            Some(field),
        ));
    }
    Ok(size)
}

#[derive(Deserialize)]
#[serde(expecting = "a completion request object")]
struct CompletionView<'a> {
    #[serde(borrow)]
    model: Cow<'a, str>,
    #[serde(borrow)]
    prompt: &'a RawValue,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default, borrow, deserialize_with = "present_raw")]
    stream_options: Option<&'a RawValue>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    n: Option<u64>,
    /// Candidates generated per prompt, of which `n` are returned: each may run to the cap.
    #[serde(default)]
    best_of: Option<u64>,
    #[serde(default, borrow)]
    suffix: Option<Cow<'a, str>>,
}

/// Reads a legacy text completion request (`POST /v1/completions`).
pub fn prepare_completion(
    body: Bytes,
    options: &RequestOptions,
) -> Result<PreparedCall, GatewayError> {
    let view: CompletionView<'_> = read_view(&body)?;
    let model = check_model(&view.model)?;
    let prompt = prompt_size(view.prompt, "prompt")?;
    let suffix = view
        .suffix
        .as_deref()
        .map_or(0, |s| s.chars().count() as u64);
    let per_prompt = view.n.unwrap_or(1).max(view.best_of.unwrap_or(1)).max(1);
    let stream = view.stream.unwrap_or(false);
    let usage = stream_usage(&body, stream, view.stream_options, options.continuous_usage)?;
    Ok(PreparedCall {
        endpoint: Endpoint::Completions,
        model,
        stream,
        client_wants_usage: usage.client_wants_usage,
        client_wants_continuous_usage: usage.client_wants_continuous_usage,
        images: 0,
        image_sizes: Vec::new(),
        image_hosts: Vec::new(),
        images_to_fetch: Vec::new(),
        // The API's own default, not the gateway's: a client that gives none gets 16.
        max_tokens: Some(view.max_tokens.unwrap_or(COMPLETION_DEFAULT_MAX_TOKENS)),
        choices: prompt.prompts.saturating_mul(per_prompt),
        prompt_estimate: prompt.tokens + suffix.div_ceil(4),
        upstream_body: usage.upstream_body,
        client_body: body,
    })
}

#[derive(Deserialize)]
#[serde(expecting = "an embeddings request object")]
struct EmbeddingView<'a> {
    #[serde(borrow)]
    model: Cow<'a, str>,
    #[serde(borrow)]
    input: &'a RawValue,
}

/// Reads an embeddings request (`POST /v1/embeddings`): no output is generated, so only
/// the input is reserved.
pub fn prepare_embedding(
    body: Bytes,
    _options: &RequestOptions,
) -> Result<PreparedCall, GatewayError> {
    let view: EmbeddingView<'_> = read_view(&body)?;
    let model = check_model(&view.model)?;
    let input = prompt_size(view.input, "input")?;
    Ok(PreparedCall {
        endpoint: Endpoint::Embeddings,
        model,
        stream: false,
        client_wants_usage: true,
        client_wants_continuous_usage: false,
        images: 0,
        image_sizes: Vec::new(),
        image_hosts: Vec::new(),
        images_to_fetch: Vec::new(),
        max_tokens: Some(0),
        choices: 1,
        prompt_estimate: input.tokens,
        upstream_body: body.clone(),
        client_body: body,
    })
}

#[derive(Deserialize)]
#[serde(expecting = "a response request object")]
struct ResponseView<'a> {
    #[serde(borrow)]
    model: Cow<'a, str>,
    #[serde(borrow)]
    input: &'a RawValue,
    #[serde(default, borrow)]
    instructions: Option<Cow<'a, str>>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    max_output_tokens: Option<u64>,
    /// Rendered into the prompt by the server, so counted in the estimate.
    #[serde(default, borrow)]
    tools: Option<&'a RawValue>,
    #[serde(default, borrow)]
    text: Option<&'a RawValue>,
}

/// One item of a Responses API `input`: a message (read like a chat message), or another
/// item (a function call or its output), counted by its JSON length.
#[derive(Deserialize)]
struct ItemView<'a> {
    #[serde(default, borrow, rename = "type")]
    kind: Option<Cow<'a, str>>,
}

/// Reads a Responses API request (`POST /v1/responses`). Its streams always end with the
/// usage (`response.completed`), so nothing needs adding for the gate to meter them. A
/// request continuing a stored conversation (`previous_response_id`) is estimated from what
/// it sends; the usage the server reports, earlier turns included, is what is charged.
pub fn prepare_response(
    body: Bytes,
    options: &RequestOptions,
) -> Result<PreparedCall, GatewayError> {
    let view: ResponseView<'_> = read_view(&body)?;
    let model = check_model(&view.model)?;
    let mut text_chars = view
        .instructions
        .as_deref()
        .map_or(0, |t| t.chars().count() as u64);
    text_chars += [view.tools, view.text]
        .into_iter()
        .flatten()
        .map(|raw| raw.get().len() as u64)
        .sum::<u64>();
    // Where each message read sits in `input` (other items are not messages).
    let mut positions = Vec::new();
    let (messages, others) = match view.input.get().trim_start().as_bytes().first() {
        Some(b'"') => {
            let text: Cow<'_, str> = serde_json::from_str(view.input.get())
                .map_err(|e| GatewayError::invalid_request(e.to_string(), Some("input")))?;
            text_chars += text.chars().count() as u64;
            (Vec::new(), 0)
        }
        Some(b'[') => {
            let items: Vec<&RawValue> = serde_json::from_str(view.input.get()).map_err(|e| {
                GatewayError::invalid_request(format!("`input`: {e}"), Some("input"))
            })?;
            let mut messages = Vec::new();
            let mut others = 0u64;
            for (i, item) in items.into_iter().enumerate() {
                let kind: ItemView<'_> = serde_json::from_str(item.get()).map_err(|e| {
                    GatewayError::invalid_request(
                        format!("`input[{i}]`: {e}"),
                        Some(&format!("input[{i}]")),
                    )
                })?;
                match kind.kind.as_deref() {
                    None | Some("message") => {
                        let message: MessageView<'_> =
                            serde_json::from_str(item.get()).map_err(|e| {
                                GatewayError::invalid_request(
                                    format!("`input[{i}]`: {e}"),
                                    Some(&format!("input[{i}]")),
                                )
                            })?;
                        messages.push(message);
                        positions.push(i);
                    }
                    Some(_) => others += item.get().len() as u64,
                }
            }
            (messages, others)
        }
        _ => {
            return Err(GatewayError::invalid_request(
                "`input` must be a string or an array of input items",
                Some("input"),
            ));
        }
    };
    let mut measured = measure_messages(&messages, &options.image_policy)
        .map_err(|e| rename_messages_param(e, "input"))?;
    for image in &mut measured.to_fetch {
        image.in_input(
            positions
                .get(image.message)
                .copied()
                .unwrap_or(image.message),
        );
    }
    Ok(PreparedCall {
        endpoint: Endpoint::Responses,
        model,
        stream: view.stream.unwrap_or(false),
        client_wants_usage: true,
        client_wants_continuous_usage: false,
        images: measured.images,
        image_sizes: measured.image_sizes,
        image_hosts: measured.image_hosts,
        images_to_fetch: measured.to_fetch,
        max_tokens: view.max_output_tokens,
        choices: 1,
        prompt_estimate: (measured.text_chars + text_chars + others).div_ceil(4)
            + 4 * messages.len() as u64
            + measured.image_tokens,
        upstream_body: body.clone(),
        client_body: body,
    })
}

/// Chat errors name `messages[i]…`; in a Responses request the same places are `input[i]…`.
fn rename_messages_param(e: GatewayError, to: &str) -> GatewayError {
    match e {
        GatewayError::InvalidRequest { message, param } => GatewayError::InvalidRequest {
            message: message.replace("messages[", &format!("{to}[")),
            param: param.map(|p| p.replacen("messages", to, 1)),
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(value: serde_json::Value) -> Bytes {
        Bytes::from(value.to_string())
    }

    fn param(e: GatewayError) -> Option<String> {
        match e {
            GatewayError::InvalidRequest { param, .. } => param,
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn a_completion_reserves_its_prompts_times_its_choices_at_the_apis_default_cap() {
        let options = RequestOptions::default();
        let call = prepare_completion(
            body(json!({"model": "m", "prompt": ["abcdabcd", "abcd"], "n": 2})),
            &options,
        )
        .unwrap();
        assert_eq!(call.endpoint, Endpoint::Completions);
        assert_eq!((call.choices, call.max_tokens), (4, Some(16)));
        assert_eq!(call.prompt_estimate, 3);
        let tokens = prepare_completion(
            body(json!({"model": "m", "prompt": [1, 2, 3], "best_of": 3, "max_tokens": 5})),
            &options,
        )
        .unwrap();
        assert_eq!(
            (tokens.choices, tokens.max_tokens, tokens.prompt_estimate),
            (3, Some(5), 3)
        );
    }

    #[test]
    fn a_completion_stream_asks_the_upstream_for_usage() {
        let call = prepare_completion(
            body(json!({"model": "m", "prompt": "hi", "stream": true})),
            &RequestOptions::default(),
        )
        .unwrap();
        assert!(call.stream && !call.client_wants_usage);
        let sent: serde_json::Value = serde_json::from_slice(&call.upstream_body).unwrap();
        assert_eq!(sent["stream_options"]["include_usage"], true);
    }

    #[test]
    fn embeddings_reserve_their_input_and_generate_nothing() {
        let call = prepare_embedding(
            body(json!({"model": "e", "input": ["abcd", "abcdefgh"]})),
            &RequestOptions::default(),
        )
        .unwrap();
        assert_eq!(call.endpoint, Endpoint::Embeddings);
        assert_eq!((call.prompt_estimate, call.max_tokens), (3, Some(0)));
        assert_eq!(call.upstream_body, call.client_body);
        let e = prepare_embedding(
            body(json!({"model": "e", "input": []})),
            &RequestOptions::default(),
        )
        .unwrap_err();
        assert_eq!(param(e), Some("input".into()));
        let e =
            prepare_embedding(body(json!({"model": "e"})), &RequestOptions::default()).unwrap_err();
        assert_eq!(param(e), Some("input".into()));
    }

    #[test]
    fn a_response_counts_its_text_images_and_other_items() {
        let png = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAgAAAAIAQAAAAA=";
        let call = prepare_response(
            body(json!({
                "model": "m",
                "instructions": "be brief",
                "max_output_tokens": 50,
                "input": [
                    {"role": "user", "content": [
                        {"type": "input_text", "text": "what is this?"},
                        {"type": "input_image", "image_url": png}
                    ]},
                    {"type": "function_call_output", "call_id": "c", "output": "42"}
                ]
            })),
            &RequestOptions::default(),
        )
        .unwrap();
        assert_eq!(call.endpoint, Endpoint::Responses);
        assert_eq!((call.images, call.max_tokens), (1, Some(50)));
        assert!(call.prompt_estimate > 4, "{}", call.prompt_estimate);
        assert!(call.client_wants_usage);
    }

    #[test]
    fn a_response_image_the_policy_refuses_names_its_input_place() {
        let e = prepare_response(
            body(json!({"model": "m", "input": [{"role": "user", "content": [
                {"type": "input_image", "image_url": "file:///etc/passwd"}
            ]}]})),
            &RequestOptions::default(),
        )
        .unwrap_err();
        assert_eq!(param(e), Some("input[0].content[0].image_url.url".into()));
        let e = prepare_response(
            body(json!({"model": "m", "input": 5})),
            &RequestOptions::default(),
        )
        .unwrap_err();
        assert_eq!(param(e), Some("input".into()));
    }
}
