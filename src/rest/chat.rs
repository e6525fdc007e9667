//! `POST /v1/chat/completions`: JSON answers and SSE streams, metered on the way through.

use std::convert::Infallible;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use super::{AppState, RequestId, bearer, read_body};
use crate::core::chat::{ChatCall, prepare_chat};
use crate::core::records::{CallOutcome, Usage};
use crate::core::{Admission, CallFacts, GatewayError, Remaining};
use crate::upstream::Upstream;
use crate::upstream::sse::{self, SseFramer};

/// How long the end of an upstream body is awaited after `[DONE]`.
const DRAIN_LIMIT: std::time::Duration = std::time::Duration::from_millis(500);

pub async fn chat_completions(
    State(state): State<AppState>,
    axum::Extension(RequestId(request_id)): axum::Extension<RequestId>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match complete(state, request_id, headers, body).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn complete(
    state: AppState,
    request_id: String,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, GatewayError> {
    let caller = state.gateway.authenticate(bearer(&headers))?;
    let body = read_body(body, state.settings.max_body_bytes).await?;
    let request_body = state
        .gateway
        .logs_bodies()
        .then(|| String::from_utf8_lossy(&body).into_owned());
    let call = prepare_chat(body, state.settings.continuous_usage_stats)?;
    let ChatCall {
        model,
        stream,
        client_wants_usage,
        client_wants_continuous_usage,
        prompt_estimate,
        upstream_body,
        ..
    } = call;
    let mut admission = state.gateway.admit(
        &caller,
        CallFacts {
            request_id: request_id.clone(),
            model,
            stream,
            prompt_estimate,
            request_body,
        },
    )?;

    admission.mark_forwarded();
    let sent = tokio::select! {
        sent = state.upstream.chat(upstream_body, &request_id, stream) => sent,
        () = state.hard_stop.cancelled() => Err(GatewayError::ShuttingDown),
    };
    let response = match sent {
        Ok(response) => response,
        Err(e) => {
            settle_failed(admission, &e);
            return Err(e);
        }
    };
    if stream {
        let relay = Relay {
            upstream: response.bytes_stream().boxed(),
            framer: SseFramer::default(),
            admission: Some(admission),
            client_wants_usage,
            client_wants_continuous_usage,
            draining: false,
            error: None,
            hard_stop: state.hard_stop.clone(),
        };
        let first = relay
            .admission
            .as_ref()
            .map(quota_headers)
            .unwrap_or_default();
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
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        // Tells nginx-style proxies in front of us not to buffer the stream.
        headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
        headers.extend(first);
        return Ok(response);
    }

    let content_type = response.headers().get(header::CONTENT_TYPE).cloned();
    let body = tokio::select! {
        body = Upstream::read_body(response) => body,
        () = state.hard_stop.cancelled() => Err(GatewayError::ShuttingDown),
    };
    let body = match body {
        Ok(body) => body,
        Err(e) => {
            settle_failed(admission, &e);
            return Err(e);
        }
    };
    if let Some(usage) = usage_of(&body) {
        admission.observe_usage(usage);
    }
    admission.keep_response_body(&body);
    let processing_ms = admission.elapsed_ms();
    let mut headers = quota_headers(&admission);
    admission.settle(CallOutcome::Completed, 200);
    // The remaining quota is shown after this call's charge.
    let remaining = caller.remaining();
    headers.extend(remaining_headers(remaining));
    let body = if state.settings.response_metadata {
        with_metadata(body, processing_ms, remaining)
    } else {
        body
    };
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = StatusCode::OK;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        content_type.unwrap_or(HeaderValue::from_static("application/json")),
    );
    response.headers_mut().extend(headers);
    response
        .headers_mut()
        .insert("x-processing-ms", HeaderValue::from(processing_ms));
    Ok(response)
}

fn settle_failed(admission: Admission, e: &GatewayError) {
    let (outcome, status) = match e {
        GatewayError::Upstream { status, .. } => (CallOutcome::UpstreamError, *status),
        GatewayError::UpstreamTimeout => (CallOutcome::UpstreamFailed, 504),
        GatewayError::ShuttingDown => (CallOutcome::Cancelled, 503),
        _ => (CallOutcome::UpstreamFailed, 502),
    };
    admission.settle(outcome, status);
}

#[derive(Deserialize)]
struct UsageOnly {
    #[serde(default)]
    usage: Option<UsageFields>,
}

#[derive(Deserialize)]
struct UsageFields {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
}

fn usage_of(body: &[u8]) -> Option<Usage> {
    let usage = serde_json::from_slice::<UsageOnly>(body).ok()?.usage?;
    Some(Usage {
        prompt_tokens: usage.prompt_tokens,
        completion_tokens: usage.completion_tokens,
    })
}

/// Rate-limit figures of the call and the quota left before it settles.
fn quota_headers(admission: &Admission) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if let Some(rate) = admission.rate() {
        headers.insert("x-ratelimit-limit-requests", HeaderValue::from(rate.limit));
        headers.insert(
            "x-ratelimit-remaining-requests",
            HeaderValue::from(rate.remaining),
        );
        if let Ok(value) = HeaderValue::from_str(&format!("{}s", rate.reset.as_secs().max(1))) {
            headers.insert("x-ratelimit-reset-requests", value);
        }
    }
    headers.extend(remaining_headers(admission.remaining()));
    headers
}

fn remaining_headers(remaining: Remaining) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if let Some(requests) = remaining.requests {
        headers.insert(
            HeaderName::from_static("x-quota-remaining-requests"),
            HeaderValue::from(requests),
        );
    }
    if let Some(tokens) = remaining.tokens {
        headers.insert(
            HeaderName::from_static("x-quota-remaining-tokens"),
            HeaderValue::from(tokens),
        );
    }
    headers
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

/// Carries a stream from the upstream to the client, metering each event and hiding
/// usage the client did not ask for. Dropping it (the client left) drops the upstream
/// request, which stops the generation, and settles the call through the admission.
struct Relay {
    upstream: BoxStream<'static, reqwest::Result<Bytes>>,
    framer: SseFramer,
    admission: Option<Admission>,
    client_wants_usage: bool,
    client_wants_continuous_usage: bool,
    /// `[DONE]` was seen and settled; what is left of the upstream body is read and dropped.
    draining: bool,
    error: Option<String>,
    hard_stop: CancellationToken,
}

impl Relay {
    async fn next_bytes(&mut self) -> Option<Bytes> {
        loop {
            let Some(admission) = self.admission.as_mut() else {
                return self.drain().await;
            };
            let item = tokio::select! {
                item = self.upstream.next() => item,
                () = self.hard_stop.cancelled() => {
                    self.finish(CallOutcome::Cancelled, 200);
                    return Some(sse::error_end("the gateway is shutting down; the stream was cut short"));
                }
            };
            let chunk = match item {
                Some(Ok(chunk)) => chunk,
                Some(Err(e)) => {
                    let message = format!("the model server's stream broke off: {e}");
                    self.finish(CallOutcome::StreamIncomplete, 200);
                    return Some(sse::error_end(&message));
                }
                None => {
                    self.finish(CallOutcome::StreamIncomplete, 200);
                    return Some(sse::error_end(
                        "the model server ended the stream without finishing it",
                    ));
                }
            };
            let events = match self.framer.push(&chunk) {
                Ok(events) => events,
                Err(e) => {
                    self.finish(CallOutcome::StreamIncomplete, 200);
                    return Some(sse::error_end(&e.to_string()));
                }
            };
            let mut out = BytesMut::new();
            let mut done = false;
            for event in events {
                let info = sse::inspect(&event);
                if info.done {
                    out.extend_from_slice(&event);
                    done = true;
                    break;
                }
                if info.has_choices {
                    admission.observe_chunk();
                }
                if let Some(error) = info.error {
                    self.error = Some(error);
                }
                let Some(usage) = info.usage else {
                    out.extend_from_slice(&event);
                    continue;
                };
                admission.observe_usage(usage);
                if !info.has_choices {
                    // The final usage chunk: only for clients that asked for it.
                    if self.client_wants_usage {
                        out.extend_from_slice(&event);
                    }
                } else if self.client_wants_continuous_usage {
                    out.extend_from_slice(&event);
                } else {
                    out.extend_from_slice(&sse::without_usage(&event).unwrap_or(event));
                }
            }
            if done {
                // Settle now, before the client can read `[DONE]` and ask for its usage.
                let outcome = if self.error.is_some() {
                    CallOutcome::StreamIncomplete
                } else {
                    self.draining = true;
                    CallOutcome::Completed
                };
                self.finish(outcome, 200);
            }
            if !out.is_empty() {
                return Some(out.freeze());
            }
        }
    }

    /// After `[DONE]`, reads the upstream body to its end so its connection can be reused.
    async fn drain(&mut self) -> Option<Bytes> {
        if std::mem::take(&mut self.draining) {
            // A server that keeps the body open after `[DONE]` must not hold the client.
            let rest = async { while let Some(Ok(_)) = self.upstream.next().await {} };
            let _ = tokio::time::timeout(DRAIN_LIMIT, rest).await;
        }
        None
    }

    fn finish(&mut self, outcome: CallOutcome, status: u16) {
        if let Some(admission) = self.admission.take() {
            admission.settle(outcome, status);
        }
    }
}
