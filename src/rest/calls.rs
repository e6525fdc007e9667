//! The model calls: `POST /v1/chat/completions`, `/v1/completions`, `/v1/embeddings` and
//! `/v1/responses`, each a thin adapter over the shared call path.

use std::convert::Infallible;
use std::net::IpAddr;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use tracing::Instrument as _;

use super::{AppState, read_body};
use crate::call::trace::{self, Stage};
use crate::call::{CacheChoice, CacheStatus, Origin, UsageView};
use crate::core::events::Door;
use crate::core::request::Endpoint;
use crate::core::{GatewayError, Remaining};
use crate::edge::client_addr::{certificate_subject, client_addr};
use crate::edge::{ModelLabel, RequestId, add_deprecation_headers, add_limit_headers, bearer};

pub async fn chat_completions(State(state): State<AppState>, request: Request) -> Response {
    call(state, Endpoint::ChatCompletions, request).await
}

pub async fn completions(State(state): State<AppState>, request: Request) -> Response {
    call(state, Endpoint::Completions, request).await
}

pub async fn embeddings(State(state): State<AppState>, request: Request) -> Response {
    call(state, Endpoint::Embeddings, request).await
}

pub async fn responses(State(state): State<AppState>, request: Request) -> Response {
    call(state, Endpoint::Responses, request).await
}

async fn call(state: AppState, endpoint: Endpoint, request: Request) -> Response {
    // Taken apart rather than extracted: extractors would copy the header map and the id.
    let (mut parts, body) = request.into_parts();
    let request_id = parts
        .extensions
        .remove::<RequestId>()
        .map(|RequestId(id)| id)
        .unwrap_or_default();
    let client = client_addr(&parts.extensions);
    let certificate = certificate_subject(&parts.extensions).map(str::to_owned);
    let headers = parts.headers;
    let traceparent = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let cache = match CacheChoice::parse(headers.get("x-cache").and_then(|v| v.to_str().ok())) {
        Ok(cache) => cache,
        Err(e) => return e.into_response(),
    };
    let span = trace::call_span(Door::Rest, endpoint, &request_id, traceparent.as_deref());
    let origin = Origin {
        request_id,
        door: Door::Rest,
        traceparent,
        span,
        cache,
    };
    let mut label = None;
    let credentials = (client, certificate);
    // Boxed: the call's state machine is kilobytes, and axum's layers move the handler's
    // future several times on its way in (issue 21: the memcpy in the profile).
    let answer = Box::pin(complete(
        state,
        endpoint,
        &origin,
        credentials,
        headers,
        body,
        &mut label,
    ))
    .await;
    let mut response = match answer {
        Ok(response) => response,
        Err(e) => {
            let status = e.http_status();
            trace::record_error(&origin.span, tracing::field::display(status), status >= 500);
            e.into_response()
        }
    };
    if let Some(label) = label {
        response.extensions_mut().insert(ModelLabel(label));
    }
    response
}

async fn complete(
    state: AppState,
    endpoint: Endpoint,
    origin: &Origin,
    (client, certificate): (Option<IpAddr>, Option<String>),
    headers: HeaderMap,
    body: Body,
    label: &mut Option<String>,
) -> Result<Response, GatewayError> {
    let caller = state
        .call
        .authenticate(bearer(&headers), client, certificate.as_deref())
        .instrument(trace::stage(&origin.span, Stage::Authenticate))
        .await?;
    let body = read_body(body, state.settings.max_body_bytes)
        .await
        .map_err(|e| state.gateway().refused(e))?;
    let call = state.call.prepare(endpoint, body)?;
    *label = Some(state.call.metric_model(&call.model));

    if call.stream {
        let view = UsageView {
            final_chunk: call.client_wants_usage,
            every_chunk: call.client_wants_continuous_usage,
        };
        let start = state.call.stream(&caller, call, origin, view).await?;
        let relay = start.relay;
        let body = Body::from_stream(futures_util::stream::unfold(
            relay,
            |mut relay| async move {
                relay
                    .next_bytes()
                    .await
                    .map(|bytes| (Ok::<_, Infallible>(bytes), relay))
            },
        ));
        let mut response = Response::new(body);
        let headers = response.headers_mut();
        headers.reserve(16);
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        // Tells nginx-style proxies in front of us not to buffer the stream.
        headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
        add_cache_header(headers, start.cache);
        add_limit_headers(headers, start.figures, start.remaining);
        add_deprecation_headers(headers, start.deprecation);
        return Ok(response);
    }

    let completion = state
        .call
        // The bytes go out as they came: the answer needs no reading of its own.
        .complete(&caller, call, origin, |_| Ok(()))
        .await?;
    let body = if state.settings.response_metadata && endpoint == Endpoint::ChatCompletions {
        with_metadata(
            completion.body,
            completion.processing_ms,
            completion.remaining,
        )
    } else {
        completion.body
    };
    let mut response = Response::new(Body::from(body));
    let headers = response.headers_mut();
    // Room for the limit and quota headers at once, instead of growing the map repeatedly.
    headers.reserve(16);
    let content_type = completion
        .content_type
        .and_then(|v| HeaderValue::from_str(&v).ok())
        .unwrap_or(HeaderValue::from_static("application/json"));
    headers.insert(header::CONTENT_TYPE, content_type);
    headers.insert(
        "x-processing-ms",
        HeaderValue::from(completion.processing_ms),
    );
    add_cache_header(headers, completion.cache);
    add_limit_headers(headers, completion.figures, completion.remaining);
    add_deprecation_headers(headers, completion.deprecation);
    Ok(response)
}

/// `x-cache: hit|miss` on the answers of calls the response cache could answer.
fn add_cache_header(headers: &mut HeaderMap, cache: Option<CacheStatus>) {
    if let Some(status) = cache {
        headers.insert("x-cache", HeaderValue::from_static(status.as_str()));
    }
}

/// The tutorial's `metadata` object, spliced into the answer without re-serialising it.
fn with_metadata(body: Bytes, processing_ms: u64, remaining: Remaining) -> Bytes {
    let trimmed = body.trim_ascii_end();
    let Some(without_close) = trimmed.strip_suffix(b"}") else {
        return body;
    };
    let metadata = serde_json::json!({
        "processing_time_ms": processing_ms,
        "remaining_requests": remaining.requests,
        "remaining_tokens": remaining.tokens,
        "gateway_version": super::info::VERSION,
    });
    let mut out = BytesMut::with_capacity(body.len() + 128);
    out.extend_from_slice(without_close);
    out.extend_from_slice(b",\"metadata\":");
    out.extend_from_slice(metadata.to_string().as_bytes());
    out.extend_from_slice(b"}");
    out.freeze()
}
