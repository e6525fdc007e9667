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
use bytes::BufMut as _;
use rand::RngExt;

use crate::core::Remaining;
use crate::core::catalogue::Deprecation;
use crate::core::keys;
use crate::core::rate_limit::RateFigures;

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
    // Up to ten values: written into one buffer and cut from it, one allocation for all
    // (`HeaderValue::from(u64)` would make one each).
    let mut text = bytes::BytesMut::with_capacity(256);
    let mut values = Vec::with_capacity(10);
    for (name, figure) in figures.pairs().chain(remaining.pairs()) {
        let start = text.len();
        if write!((&mut text).writer(), "{figure}").is_ok() {
            values.push((name, start, text.len()));
        } else {
            text.truncate(start);
        }
    }
    let text = text.freeze();
    headers.reserve(values.len());
    for (name, start, end) in values {
        if let Ok(value) = HeaderValue::from_maybe_shared(text.slice(start..end)) {
            headers.insert(limit_header_name(name), value);
        }
    }
}

/// The limit figures' header names, made once: `HeaderName::from_static` checks its text
/// on every call.
fn limit_header_name(name: &'static str) -> HeaderName {
    static NAMES: std::sync::LazyLock<Vec<(&'static str, HeaderName)>> =
        std::sync::LazyLock::new(|| {
            RateFigures::HEADER_NAMES
                .iter()
                .chain(&Remaining::HEADER_NAMES)
                .map(|&name| (name, HeaderName::from_static(name)))
                .collect()
        });
    NAMES.iter().find(|(known, _)| *known == name).map_or_else(
        || HeaderName::from_static(name),
        |(_, header)| header.clone(),
    )
}

/// A deprecated version's `Deprecation` (RFC 9745: `@` and seconds since the epoch) and,
/// when it has one, `Sunset` (RFC 8594: an HTTP-date) headers (REST), or metadata (gRPC).
pub fn add_deprecation_headers(headers: &mut HeaderMap, deprecation: Option<Deprecation>) {
    let Some(deprecation) = deprecation else {
        return;
    };
    if let Ok(value) = HeaderValue::try_from(format!("@{}", deprecation.since)) {
        headers.insert(HeaderName::from_static("deprecation"), value);
    }
    if let Some(value) = deprecation
        .sunset
        .and_then(|t| HeaderValue::try_from(http_date(t)).ok())
    {
        headers.insert(HeaderName::from_static("sunset"), value);
    }
}

/// `Fri, 01 Jan 2027 00:00:00 GMT` (IMF-fixdate, RFC 9110) for seconds since the epoch.
pub fn http_date(unix: i64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    // Days to a civil date (Howard Hinnant's algorithm), the proleptic Gregorian calendar.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let weekday = DAYS[usize::try_from(days.rem_euclid(7)).unwrap_or(0)];
    let month = MONTHS[usize::try_from(month - 1).unwrap_or(0)];
    format!(
        "{weekday}, {day:02} {month} {year} {:02}:{:02}:{:02} GMT",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
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

#[cfg(test)]
mod date_tests {
    use super::http_date;

    #[test]
    fn http_dates_are_imf_fixdates() {
        assert_eq!(http_date(0), "Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(http_date(1_798_761_600), "Fri, 01 Jan 2027 00:00:00 GMT");
        assert_eq!(
            http_date(951_782_400 + 3_661),
            "Tue, 29 Feb 2000 01:01:01 GMT"
        );
    }
}
