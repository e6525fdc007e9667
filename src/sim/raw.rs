//! Answers that misbehave at the byte level: a body that stalls, breaks off, trickles, or
//! grows far past any real answer. Large bodies are made as they are sent, so the
//! simulator itself holds only a few bytes of them.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderValue, StatusCode};
use axum::response::Response;
use bytes::Bytes;

use super::state::{AppState, SimState};

/// What an oversized body is filled with, handed out without allocating.
static FILL: [u8; 64 * 1024] = [b'a'; 64 * 1024];

/// Which answer a made-up body pretends to be, so its opening looks right to a client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Shape {
    Chat,
    Completion,
    Embedding,
    Response,
}

/// `(content type, what comes before the filler, what closes it)`. A stream's filler is
/// the text of one token event that never ends; a JSON body's the text of its answer.
fn frame(shape: Shape, stream: bool) -> (&'static str, &'static [&'static str], &'static str) {
    const SSE: &str = "text/event-stream";
    const JSON: &str = "application/json";
    match (shape, stream) {
        (Shape::Chat, false) => (JSON, &[CHAT_JSON_HEAD], CHAT_JSON_TAIL),
        (Shape::Chat, true) => (SSE, &[CHAT_ROLE_CHUNK, CHAT_EVENT_HEAD], ""),
        (Shape::Completion, false) => (JSON, &[COMPLETION_JSON_HEAD], COMPLETION_JSON_TAIL),
        (Shape::Completion, true) => (SSE, &[COMPLETION_EVENT_HEAD], ""),
        // Embeddings never stream.
        (Shape::Embedding, _) => (JSON, &[EMBEDDING_JSON_HEAD], EMBEDDING_JSON_TAIL),
        (Shape::Response, false) => (JSON, &[RESPONSE_JSON_HEAD], RESPONSE_JSON_TAIL),
        (Shape::Response, true) => (SSE, &[RESPONSE_CREATED, RESPONSE_EVENT_HEAD], ""),
    }
}

const CHAT_JSON_HEAD: &str = r#"{"id":"chatcmpl-oversized","object":"chat.completion","created":0,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":""#;
const CHAT_JSON_TAIL: &str = r#""},"finish_reason":"stop"}]}"#;
const CHAT_ROLE_CHUNK: &str = "data: {\"id\":\"chatcmpl-oversized\",\"object\":\"chat.completion.chunk\",\"created\":0,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n";
const CHAT_EVENT_HEAD: &str = "data: {\"id\":\"chatcmpl-oversized\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"";
const COMPLETION_JSON_HEAD: &str = r#"{"id":"cmpl-oversized","object":"text_completion","created":0,"model":"m","choices":[{"index":0,"text":""#;
const COMPLETION_JSON_TAIL: &str = r#"","finish_reason":"stop"}]}"#;
const COMPLETION_EVENT_HEAD: &str = "data: {\"id\":\"cmpl-oversized\",\"object\":\"text_completion\",\"created\":0,\"model\":\"m\",\"choices\":[{\"index\":0,\"text\":\"";
const EMBEDDING_JSON_HEAD: &str = r#"{"id":"embd-oversized","object":"list","created":0,"model":"m","data":[{"index":0,"object":"embedding","embedding":""#;
const EMBEDDING_JSON_TAIL: &str = r#""}]}"#;
const RESPONSE_JSON_HEAD: &str = r#"{"id":"resp_oversized","object":"response","created_at":0,"model":"m","status":"completed","output":[{"id":"msg_oversized","type":"message","role":"assistant","status":"completed","content":[{"type":"output_text","annotations":[],"text":""#;
const RESPONSE_JSON_TAIL: &str = r#""}]}]}"#;
const RESPONSE_CREATED: &str = "event: response.created\ndata: {\"type\":\"response.created\",\"sequence_number\":0,\"response\":{\"id\":\"resp_oversized\",\"object\":\"response\",\"status\":\"in_progress\",\"output\":[]}}\n\n";
const RESPONSE_EVENT_HEAD: &str = "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"sequence_number\":1,\"item_id\":\"msg_oversized\",\"output_index\":0,\"content_index\":0,\"delta\":\"";

/// Any status, content type and body, exactly.
pub(super) fn exact(status: u16, content_type: &str, body: String) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    if let Ok(value) = HeaderValue::from_str(content_type) {
        response.headers_mut().insert(CONTENT_TYPE, value);
    }
    response
}

/// How a partial body goes on after its bytes.
#[derive(Clone, Copy, Debug)]
pub(super) enum Tail {
    /// Nothing more, connection open, until the client leaves or the simulator stops.
    Stall,
    /// The connection is aborted.
    Abort,
}

/// A 200 with `head` and then `tail`.
pub(super) fn partial(
    state: AppState,
    content_type: &'static str,
    head: Bytes,
    tail: Tail,
) -> Response {
    let first = futures_util::stream::once(async move { Ok::<_, io::Error>(head) });
    let end = futures_util::stream::once(async move {
        if let Tail::Stall = tail {
            state.shutdown.cancelled().await;
        }
        // Let the bytes before reach the socket first (hyper drops them on a body error).
        tokio::task::yield_now().await;
        Err::<Bytes, _>(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "simulated broken body",
        ))
    });
    ok_body(
        content_type,
        Body::from_stream(futures_util::StreamExt::chain(first, end)),
    )
}

/// A 200 of `total` bytes made as it is sent (see [`super::fault::Fault::Oversized`]).
pub(super) fn oversized(state: AppState, shape: Shape, stream: bool, total: u64) -> Response {
    let (content_type, heads, tail) = frame(shape, stream);
    struct Fill {
        sim: Arc<SimState>,
        heads: std::slice::Iter<'static, &'static str>,
        left: u64,
        tail: Option<&'static str>,
    }
    let fill = Fill {
        sim: state.sim,
        heads: heads.iter(),
        left: total,
        tail: Some(tail).filter(|t| !t.is_empty()),
    };
    let body = futures_util::stream::unfold(fill, |mut fill| async move {
        let bytes = if let Some(head) = fill.heads.next() {
            Bytes::from_static(head.as_bytes())
        } else if fill.left > 0 {
            let n = usize::try_from(fill.left)
                .unwrap_or(usize::MAX)
                .min(FILL.len());
            fill.left -= n as u64;
            Bytes::from_static(&FILL[..n])
        } else {
            Bytes::from_static(fill.tail.take()?.as_bytes())
        };
        fill.sim.add_fault_bytes_sent(bytes.len());
        Some((Ok::<_, io::Error>(bytes), fill))
    });
    ok_body(content_type, Body::from_stream(body))
}

/// A 200 that never ends, one byte per `every` (see [`super::fault::Fault::Trickle`]).
pub(super) fn trickle(state: AppState, shape: Shape, stream: bool, every: Duration) -> Response {
    let (content_type, heads, _) = frame(shape, stream);
    ok_body(content_type, trickled(state, heads.concat(), every))
}

/// A 502 HTML page that never ends (see [`super::fault::Fault::TrickleErrorPage`]).
pub(super) fn trickle_error_page(state: AppState, every: Duration) -> Response {
    let head = "<html><head><title>502 Bad Gateway</title></head><body>".to_owned();
    let mut response = ok_body("text/html", trickled(state, head, every));
    *response.status_mut() = StatusCode::BAD_GATEWAY;
    response
}

/// `head`, then one byte per `every` until the client leaves or the simulator stops.
fn trickled(state: AppState, head: String, every: Duration) -> Body {
    let first = futures_util::stream::once(async move { Ok::<_, io::Error>(Bytes::from(head)) });
    let bytes = futures_util::stream::unfold(state, move |state| async move {
        if !state.pause(every).await {
            return None;
        }
        state.sim.add_fault_bytes_sent(1);
        Some((Ok(Bytes::from_static(b"a")), state))
    });
    Body::from_stream(futures_util::StreamExt::chain(first, bytes))
}

fn ok_body(content_type: &'static str, body: Body) -> Response {
    let mut response = Response::new(body);
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}
