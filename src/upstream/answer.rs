//! A model server's answer, as the call path receives it: one JSON answer read whole (its
//! usage read once, here), or a stream of whole SSE events. The call path never sees the
//! HTTP response itself.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Body;
use serde::Deserialize;

use super::backend::BackendLease;
use super::client::{BoxError, UpstreamBody, UpstreamResponse};
use super::sse::SseFramer;
use super::{error_chain, invalid_response, read_body};
use crate::core::GatewayError;
use crate::core::records::Usage;

/// The most bytes gathered from chunks that had already arrived before events are handed on.
const GATHER_LIMIT: usize = 16 * 1024;

/// An answer whose headers arrived (2xx), with the backend it came from.
pub struct UpstreamAnswer {
    pub(super) response: UpstreamResponse,
    pub(super) lease: BackendLease,
}

/// A whole JSON answer: the bytes as the model server sent them and the usage it reports.
#[derive(Debug)]
pub struct JsonAnswer {
    pub body: Bytes,
    pub usage: Option<Usage>,
    /// `application/json…` as the model server gave it, `None` when it named another type.
    pub content_type: Option<String>,
    lease: BackendLease,
}

impl UpstreamAnswer {
    /// Reads the whole answer, which must be a JSON object, by `deadline`, with `idle` as
    /// the longest silence and at most `limit` bytes. A failure counts against the backend.
    pub async fn read_json(
        self,
        deadline: tokio::time::Instant,
        idle: Duration,
        limit: usize,
    ) -> Result<JsonAnswer, GatewayError> {
        let UpstreamAnswer { response, lease } = self;
        // The answer is JSON whatever the upstream called it (an odd proxy may say HTML).
        let content_type = response
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .filter(|v| v.starts_with("application/json"))
            .map(str::to_owned);
        let read = async {
            let body =
                tokio::time::timeout_at(deadline, read_body(response.into_body(), idle, limit))
                    .await
                    .unwrap_or(Err(GatewayError::UpstreamTimeout))?;
            let usage = usage_of(&body).map_err(|e| {
                tracing::warn!(error = %e, "the model server sent an unreadable answer");
                invalid_response(&e.to_string())
            })?;
            Ok((body, usage))
        };
        match read.await {
            Ok((body, usage)) => Ok(JsonAnswer {
                body,
                usage,
                content_type,
                lease,
            }),
            Err(e) => {
                lease.fail();
                Err(e)
            }
        }
    }

    /// The answer as a stream of events; an answer of another kind (an HTML page, a JSON
    /// answer to a stream request) is the model server's failure.
    pub fn into_events(self, max_event_bytes: usize) -> Result<EventStream, GatewayError> {
        let UpstreamAnswer { response, lease } = self;
        if let Some(other) = response
            .headers()
            .get(http::header::CONTENT_TYPE)
            .filter(|v| !v.as_bytes().starts_with(b"text/event-stream"))
        {
            let other = String::from_utf8_lossy(other.as_bytes()).into_owned();
            tracing::warn!(content_type = %other, "the model server answered a stream request with no stream");
            lease.fail();
            return Err(invalid_response(&format!(
                "a stream was asked for and `{other}` came back"
            )));
        }
        Ok(EventStream {
            body: response.into_body(),
            framer: SseFramer::new(max_event_bytes),
            held: None,
            lease: Some(lease),
        })
    }
}

impl JsonAnswer {
    /// The answer could not be used (a door could not read it): it counts against the backend.
    pub fn fail(&self) {
        self.lease.fail();
    }
}

#[derive(Deserialize)]
struct UsageOnly {
    #[serde(default)]
    usage: Option<Usage>,
}

/// The usage an answer reports; an error if the answer is not a JSON object.
pub fn usage_of(body: &[u8]) -> Result<Option<Usage>, serde_json::Error> {
    if !body.trim_ascii_start().starts_with(b"{") {
        return Err(serde::de::Error::custom("the answer is not a JSON object"));
    }
    Ok(serde_json::from_slice::<UsageOnly>(body)?.usage)
}

/// What a wait on an [`EventStream`] brought.
#[derive(Debug)]
pub enum StreamStep {
    /// Whole events were added.
    Events,
    /// The body ended (without `[DONE]`, or the reader would have stopped before).
    Ended,
    /// The connection failed mid-stream.
    Broken(String),
    /// An event grew past the limit; the stream cannot go on.
    TooLarge(String),
}

/// A model server's stream, as whole SSE events. Dropping it drops the request, which
/// stops the generation.
pub struct EventStream {
    body: UpstreamBody,
    framer: SseFramer,
    /// The body's end or failure, read while taking the chunks that had already arrived:
    /// given on the next poll, after the events before it.
    held: Option<Option<Result<Bytes, BoxError>>>,
    /// Counts the call on its backend until the stream is dropped.
    lease: Option<BackendLease>,
}

impl EventStream {
    /// Adds the events that have arrived to `events`, waiting only while there are none.
    /// Chunks already arrived are taken together (up to a limit), so that events sent
    /// together reach the client together.
    pub fn poll_events(
        &mut self,
        cx: &mut Context<'_>,
        events: &mut Vec<Bytes>,
    ) -> Poll<StreamStep> {
        let before = events.len();
        let mut gathered = 0;
        loop {
            let item = match self.held.take() {
                Some(item) => Poll::Ready(item),
                None => poll_chunk(&mut self.body, cx),
            };
            match item {
                Poll::Ready(Some(Ok(chunk))) => {
                    gathered += chunk.len();
                    if let Err(e) = self.framer.push_bytes(chunk, events) {
                        events.truncate(before);
                        return Poll::Ready(StreamStep::TooLarge(e.to_string()));
                    }
                    if gathered >= GATHER_LIMIT && events.len() > before {
                        return Poll::Ready(StreamStep::Events);
                    }
                }
                Poll::Ready(end) if events.len() > before => {
                    self.held = Some(end);
                    return Poll::Ready(StreamStep::Events);
                }
                Poll::Ready(Some(Err(e))) => {
                    return Poll::Ready(StreamStep::Broken(error_chain(&*e)));
                }
                Poll::Ready(None) => return Poll::Ready(StreamStep::Ended),
                Poll::Pending if events.len() > before => return Poll::Ready(StreamStep::Events),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// The stream failed after its answer began: it counts against the backend (once).
    pub fn fail(&mut self) {
        if let Some(lease) = self.lease.take() {
            lease.fail();
        }
    }

    /// After the last event, reads what is left of the body (at most `within`), so that
    /// its connection can be reused; a server that keeps the body open does not hold us.
    pub async fn drain(&mut self, within: Duration) {
        let rest = async { while let Some(Ok(_)) = self.body.frame().await {} };
        let _ = tokio::time::timeout(within, rest).await;
    }
}

/// The next chunk of a body's bytes; trailers, which carry nothing the gateway reads, are
/// passed over.
fn poll_chunk(
    body: &mut UpstreamBody,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Bytes, BoxError>>> {
    loop {
        match Pin::new(&mut *body).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Ok(chunk) = frame.into_data() {
                    return Poll::Ready(Some(Ok(chunk)));
                }
            }
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => return Poll::Pending,
        }
    }
}
