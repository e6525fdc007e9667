//! The model servers: a pool of backends behind one HTTP client, routing by model,
//! health, retries, timeouts, error normalisation, and answers handed on read (JSON) or
//! framed (SSE events).

mod answer;
mod backend;
mod client;
pub mod fetch;
mod h1;
mod pool;
pub mod sse;

use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Body;

pub use answer::{EventStream, JsonAnswer, StreamStep, UpstreamAnswer, usage_of};
pub use backend::{BackendLease, BackendSettings};
pub use pool::{BackendStatus, PoolSettings, UpstreamPool};

use crate::core::error::GatewayError;

/// The header that carries the request id to the upstream and back to the client.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Largest upstream answer read whole when no limit is configured (`upstream.max_response_bytes`).
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

/// Largest error body read for its message; an error page beyond it keeps only its status.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// The longest an error body or model list may take to arrive, on top of the headers.
const SMALL_BODY_TIME: Duration = Duration::from_secs(10);

/// A failure to talk to the upstream at all: sending a request (connect, TLS, write, the
/// answer's head) or reading an answer's body. Neither hyper nor the connector puts the
/// model server's address in an error, so the chain can be told as it is.
pub fn transport_error(e: &(dyn std::error::Error + 'static)) -> GatewayError {
    if is_timeout(e) {
        GatewayError::UpstreamTimeout
    } else if let Some(limit) = head_limit_passed(e) {
        GatewayError::UpstreamUnavailable(format!(
            "the model server's answer began with a head (status line and headers) larger \
             than the gateway reads ({limit} bytes)"
        ))
    } else if e
        .downcast_ref::<client::SendError>()
        .is_some_and(client::SendError::is_connect)
    {
        GatewayError::UpstreamUnavailable("cannot connect to the model server".into())
    } else {
        GatewayError::UpstreamUnavailable(format!(
            "the connection to the model server failed: {}",
            error_chain(e)
        ))
    }
}

/// The limit an answer's head went over, if that is why the attempt failed.
fn head_limit_passed(e: &(dyn std::error::Error + 'static)) -> Option<usize> {
    if any_cause(e, |cause| {
        matches!(
            cause.downcast_ref::<client::SendError>(),
            Some(client::SendError::Plain(h1::H1Error::HeadTooLarge))
        )
    }) {
        Some(h1::MAX_HEAD_BYTES)
    } else if any_cause(e, |cause| {
        cause
            .downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_parse_too_large)
    }) {
        Some(client::READ_BUFFER_BYTES)
    } else {
        None
    }
}

/// Whether a time limit of the client (the connect timeout) or of the OS ended the attempt.
fn is_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    any_cause(e, |cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
            || cause
                .downcast_ref::<hyper::Error>()
                .is_some_and(hyper::Error::is_timeout)
    })
}

/// Whether `e` or any error under it is what `test` looks for.
fn any_cause(
    e: &(dyn std::error::Error + 'static),
    test: impl Fn(&(dyn std::error::Error + 'static)) -> bool,
) -> bool {
    let mut cause = Some(e);
    while let Some(inner) = cause {
        if test(inner) {
            return true;
        }
        cause = inner.source();
    }
    false
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

/// The answer the gateway refuses to hold: larger than `limit` bytes.
pub fn response_too_large(limit: usize, what: &str) -> GatewayError {
    GatewayError::Upstream {
        status: 502,
        message: format!(
            "the model server sent {what} larger than the gateway accepts ({limit} bytes); \
             the answer was dropped"
        ),
        kind: Some("upstream_error".into()),
        param: None,
        code: Some("upstream_response_too_large".into()),
    }
}

/// A 2xx answer the gateway cannot read as what was asked for.
pub fn invalid_response(detail: &str) -> GatewayError {
    GatewayError::Upstream {
        status: 502,
        message: format!("the model server sent an unreadable answer: {detail}"),
        kind: Some("upstream_error".into()),
        param: None,
        code: Some("upstream_invalid_response".into()),
    }
}

/// Reads a whole (JSON) answer with `idle` as the longest silence. Memory is bounded:
/// an answer that says or turns out to be larger than `limit` is dropped unread (the
/// connection with it), so the gateway never holds more than `limit` plus one chunk.
async fn read_body(
    mut body: client::UpstreamBody,
    idle: Duration,
    limit: usize,
) -> Result<Bytes, GatewayError> {
    let declared = body.size_hint().exact().unwrap_or(0);
    if declared > u64::try_from(limit).unwrap_or(u64::MAX) {
        return Err(response_too_large(limit, "an answer"));
    }
    // The declared length is only a hint: the bytes themselves are counted below.
    let mut whole = Vec::with_capacity(usize::try_from(declared).unwrap_or(0));
    loop {
        let frame = tokio::time::timeout(idle, body.frame())
            .await
            .map_err(|_| GatewayError::UpstreamTimeout)?
            .transpose()
            .map_err(|e| transport_error(&*e))?;
        let Some(frame) = frame else { break };
        // Trailers carry nothing the gateway reads.
        let Ok(chunk) = frame.into_data() else {
            continue;
        };
        if whole.len() + chunk.len() > limit {
            return Err(response_too_large(limit, "an answer"));
        }
        whole.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(whole))
}

/// A small answer (model list, error body): at most `limit` bytes, all within `within`.
async fn read_bounded(
    response: client::UpstreamResponse,
    limit: usize,
    within: Duration,
) -> Result<Bytes, GatewayError> {
    tokio::time::timeout(within, read_body(response.into_body(), within, limit))
        .await
        .unwrap_or(Err(GatewayError::UpstreamTimeout))
}

/// Turns an upstream error answer into the client's error, keeping status and message.
///
/// vLLM answers `{"error": {...}}` in recent versions and a flat `{"object":"error",
/// "message":...}` in older ones; anything else (an HTML proxy page) keeps only its status.
/// A 401/403 means the model server refused the *gateway's* credentials: that is a gateway
/// problem (502), not something the client can fix. A body that is too large or does not
/// arrive within `within` is dropped: the status alone is the answer.
async fn error_from_response(response: client::UpstreamResponse, within: Duration) -> GatewayError {
    let status = response.status().as_u16();
    let within = within.min(SMALL_BODY_TIME);
    let body = read_bounded(response, MAX_ERROR_BODY, within)
        .await
        .unwrap_or_default();
    parse_error_body(status, &body)
}

pub fn parse_error_body(status: u16, body: &[u8]) -> GatewayError {
    if matches!(status, 401 | 403 | 407) {
        return GatewayError::Upstream {
            status: 502,
            message: format!(
                "the model server refused the gateway's credentials (HTTP {status}); check upstream.api_key"
            ),
            kind: Some("upstream_error".into()),
            param: None,
            code: Some("upstream_auth".into()),
        };
    }
    let value: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let object = value
        .get("error")
        .filter(|e| e.is_object())
        .unwrap_or(&value);
    let text = |field: &str| match object.get(field) {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    let message = text("message").unwrap_or_else(|| {
        let reason = http::StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("error");
        format!("the model server answered HTTP {status} ({reason})")
    });
    // vLLM says a model it does not serve is `NotFoundError` with code 404; the gateway's
    // own refusal of a model says `model_not_found`: the SDKs see one error either way.
    if status == 404 && message.to_ascii_lowercase().contains("model") {
        return GatewayError::Upstream {
            status,
            message,
            kind: Some("invalid_request_error".into()),
            param: Some("model".into()),
            code: Some("model_not_found".into()),
        };
    }
    GatewayError::Upstream {
        status,
        message,
        kind: text("type"),
        param: text("param"),
        code: text("code"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(e: GatewayError) -> (u16, String, Option<String>, Option<String>) {
        match e {
            GatewayError::Upstream {
                status,
                message,
                kind,
                code,
                ..
            } => (status, message, kind, code),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn nested_flat_and_html_errors_are_normalised() {
        let nested =
            br#"{"error":{"message":"too long","type":"BadRequestError","param":null,"code":400}}"#;
        assert_eq!(
            fields(parse_error_body(400, nested)),
            (
                400,
                "too long".into(),
                Some("BadRequestError".into()),
                Some("400".into())
            )
        );
        let flat = br#"{"object":"error","message":"The model `x` does not exist.","type":"NotFoundError","param":null,"code":404}"#;
        assert_eq!(
            fields(parse_error_body(404, flat)),
            (
                404,
                "The model `x` does not exist.".into(),
                Some("invalid_request_error".into()),
                Some("model_not_found".into())
            )
        );
        let html = b"<html><body>502 Bad Gateway</body></html>";
        let (status, message, kind, _) = fields(parse_error_body(502, html));
        assert_eq!(status, 502);
        assert!(message.contains("502 (Bad Gateway)"), "{message}");
        assert_eq!(kind, None);
    }
}
