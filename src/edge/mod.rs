//! What both doors share at the edge, and nothing else: the request id, the model label
//! of a response, bearer parsing, gRPC detection, limit figures as headers (the gRPC door
//! sends the same as metadata), the OpenAI error body, and the one router every port
//! serves (`router`), and where a request comes from (`client_addr`). The doors depend on
//! this; it depends on no door.

pub mod client_addr;
pub mod router;

use std::io::Write as _;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use rand::RngExt;

use crate::core::Remaining;
use crate::core::keys;
use crate::core::rate_limit::{Figure, RateFigures};

/// The header that carries the request id from the client and back to it.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The request's id, as taken from `x-request-id` or generated (a request extension).
#[derive(Clone, Debug)]
pub struct RequestId(pub String);

impl RequestId {
    /// A new id, `req_` and 96 random bits in hex.
    pub fn generate() -> Self {
        let bytes: [u8; 12] = rand::rng().random();
        RequestId(format!("req_{}", keys::to_hex(&bytes)))
    }

    /// The client's id when it is sane (printable, at most 128 characters), else a new one.
    pub fn from_client(value: Option<&str>) -> Self {
        match value.filter(|v| is_sane_request_id(v)) {
            Some(id) => RequestId(id.to_owned()),
            None => RequestId::generate(),
        }
    }
}

fn is_sane_request_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// The model a response was about, for the `model` label of `step3gw_requests_total`
/// (a response extension).
#[derive(Clone, Debug)]
pub struct ModelLabel(pub String);

/// The token of an `Authorization: Bearer <token>` header value (REST header or gRPC
/// metadata).
pub fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token)
}

/// The token of a request's `Authorization: Bearer <token>` header.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    bearer_token(headers.get(header::AUTHORIZATION)?.to_str().ok()?)
}

/// Whether a request speaks gRPC (`content-type: application/grpc…`).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// A gRPC answer that is only a status (trailers-only).
pub fn grpc_status_response(status: tonic::Status) -> Response {
    let mut response = status.into_http::<axum::body::Body>().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    response
}

/// The OpenAI error body: `{"error": {"message", "type", "param", "code"}}`.
pub fn error_body(
    message: &str,
    kind: &str,
    param: Option<&str>,
    code: Option<&str>,
) -> serde_json::Value {
    serde_json::json!({"error": {"message": message, "type": kind, "param": param, "code": code}})
}

/// The rate-limit figures of a call and the quota its key has left: the `x-ratelimit-*`
/// and `x-quota-remaining-*` headers (REST), or metadata (gRPC).
pub fn add_limit_headers(headers: &mut HeaderMap, figures: RateFigures, remaining: Remaining) {
    for (name, figure) in figures.pairs().chain(remaining.pairs()) {
        let value = match figure {
            Figure::Count(n) => HeaderValue::from(n),
            Figure::Reset(_) | Figure::Amount(_) => {
                // "59m59s" (or an amount) at most: written on the stack, copied once into the header.
                let mut text = [0u8; 32];
                let mut cursor = std::io::Cursor::new(&mut text[..]);
                if write!(cursor, "{figure}").is_err() {
                    continue;
                }
                let len = usize::try_from(cursor.position()).unwrap_or(0);
                match HeaderValue::from_bytes(&text[..len]) {
                    Ok(value) => value,
                    Err(_) => continue,
                }
            }
        };
        headers.insert(HeaderName::from_static(name), value);
    }
}

/// A request body that did not arrive within the connection's body deadline; the server
/// makes it, the doors answer it (408, DEADLINE_EXCEEDED).
#[derive(Debug)]
pub struct BodyReadTimeout {
    pub limit: Duration,
    /// What the gRPC door answers (tonic finds a `Status` in an error's source chain).
    status: tonic::Status,
}

impl BodyReadTimeout {
    pub fn new(limit: Duration) -> Self {
        BodyReadTimeout {
            limit,
            status: tonic::Status::deadline_exceeded(format!(
                "the request body did not arrive within {} s",
                limit.as_secs()
            )),
        }
    }
}

impl std::fmt::Display for BodyReadTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the request body did not arrive within {} s",
            self.limit.as_secs()
        )
    }
}

impl std::error::Error for BodyReadTimeout {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.status)
    }
}
