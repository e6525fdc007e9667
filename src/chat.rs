//! The chat call both doors share: admit, forward, meter and settle. The REST and gRPC
//! handlers only translate their protocol to and from this.

use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use serde::Deserialize;
use tokio::time::Sleep;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::core::chat::{ChatCall, ChatOptions, prepare_chat, with_max_tokens, with_model};
use crate::core::limits::RateFigures;
use crate::core::records::{CallOutcome, Usage};
use crate::core::{Admission, CallFacts, Caller, Gateway, GatewayError, Remaining};
use crate::metrics::Door;
use crate::upstream::sse::{self, SseFramer};
use crate::upstream::{BackendLease, UpstreamAnswer, UpstreamPool};
use crate::upstream::{invalid_response, read_body};

/// How long the end of an upstream body is awaited after `[DONE]`.
const DRAIN_LIMIT: Duration = Duration::from_millis(500);

/// What both doors need to run a chat call.
#[derive(Clone)]
pub struct ChatPath {
    pub gateway: Arc<Gateway>,
    pub upstream: Arc<UpstreamPool>,
    /// How requests are read and rewritten.
    pub options: Arc<ChatOptions>,
    /// Cancelled when the shutdown grace period is over: calls still running end now.
    pub hard_stop: CancellationToken,
}

/// A whole JSON answer, already settled, with what the door read of it.
#[derive(Debug)]
pub struct Completion<T> {
    pub body: Bytes,
    /// The door's reading of `body` (its protocol's answer), made before the call settled.
    pub answer: T,
    pub content_type: Option<String>,
    pub processing_ms: u64,
    pub figures: RateFigures,
    /// What the key has left after this call.
    pub remaining: Remaining,
}

/// A door's reading of a whole answer: its protocol's form of it, and the usage the
/// answer reports (read in the same pass, so the answer is parsed once).
pub struct Reading<T> {
    pub answer: T,
    pub usage: Option<Usage>,
}

/// The REST door's reading: the bytes go out as they came; only the usage is read, which
/// also proves the answer is a JSON object.
pub fn read_usage(body: &Bytes) -> Result<Reading<()>, GatewayError> {
    let usage = usage_of(body).map_err(|e| invalid_response(&e.to_string()))?;
    Ok(Reading { answer: (), usage })
}

/// A stream in progress, with the limits as they stood when it started.
pub struct StreamStart {
    pub relay: Relay,
    pub figures: RateFigures,
    pub remaining: Remaining,
}

/// Where a call came from: its request id and its door.
#[derive(Clone, Debug)]
pub struct Origin {
    pub request_id: String,
    pub door: Door,
}

/// Which usage the client sees in a stream (the upstream is always asked for all of it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UsageView {
    pub final_chunk: bool,
    pub every_chunk: bool,
}

impl ChatPath {
    /// `model` as a metrics label: a name the configuration or a backend knows, else `other`
    /// (a client could otherwise invent a new label value with every request).
    pub fn metric_model(&self, model: &str) -> String {
        if self.upstream.knows_model(model) {
            model.to_owned()
        } else {
            "other".to_owned()
        }
    }

    /// Reads a chat request body as the client sent it.
    pub fn prepare(&self, body: Bytes) -> Result<ChatCall, GatewayError> {
        prepare_chat(body, &self.options).map_err(|e| self.gateway.refused(e))
    }

    fn admit(
        &self,
        caller: &Caller,
        call: &ChatCall,
        origin: &Origin,
        request_body: Option<String>,
    ) -> Result<Admission, GatewayError> {
        let metric_model = self.metric_model(&call.model);
        self.gateway.admit(
            caller,
            CallFacts {
                request_id: origin.request_id.clone(),
                model: call.model.clone(),
                stream: call.stream,
                prompt_estimate: call.prompt_estimate,
                client_cap: call.max_tokens,
                choices: call.choices,
                door: origin.door,
                metric_model,
                images: call.images,
                image_sizes: call.image_sizes.clone(),
                request_body,
            },
        )
    }

    async fn send(
        &self,
        admission: &mut Admission,
        call: ChatCall,
        request_id: &str,
    ) -> Result<UpstreamAnswer, GatewayError> {
        let served = self.upstream.resolve_model(&call.model).into_owned();
        let mut body = call.upstream_body;
        if served != call.model {
            body = with_model(&body, &served)?;
        }
        // The quota may hold the answer to fewer tokens than the client asked for.
        if let Some(cap) = admission.upstream_cap() {
            body = with_max_tokens(&body, cap)?;
        }
        admission.mark_forwarded();
        tokio::select! {
            sent = self.upstream.chat(&served, body, request_id) => sent,
            () = self.hard_stop.cancelled() => Err(GatewayError::ShuttingDown),
        }
    }

    /// Admits a call and forwards it within the total time limit (returned as a deadline
    /// for the rest of the call); a call that fails here is settled.
    async fn start(
        &self,
        caller: &Caller,
        call: ChatCall,
        origin: &Origin,
    ) -> Result<(Admission, UpstreamAnswer, tokio::time::Instant), GatewayError> {
        let request_body = self.logged_body(&call);
        let mut admission = self.admit(caller, &call, origin, request_body)?;
        let deadline = tokio::time::Instant::now() + self.upstream.settings().total_timeout;
        let sent = self.send(&mut admission, call, &origin.request_id);
        match tokio::time::timeout_at(deadline, sent).await {
            Ok(Ok(answer)) => Ok((admission, answer, deadline)),
            Ok(Err(e)) => Err(settle_failed(admission, e)),
            Err(_) => Err(settle_failed(admission, GatewayError::UpstreamTimeout)),
        }
    }

    /// A non-streaming call: forwarded, read whole, metered and settled. `read` is the
    /// door's reading of the answer and its usage; an answer it cannot read settles as the
    /// upstream's failure, not as a completed call.
    pub async fn complete<T>(
        &self,
        caller: &Caller,
        call: ChatCall,
        origin: &Origin,
        read: impl FnOnce(&Bytes) -> Result<Reading<T>, GatewayError>,
    ) -> Result<Completion<T>, GatewayError> {
        let request_id = origin.request_id.as_str();
        let settings = self.upstream.settings();
        let (mut admission, answer, deadline) = self.start(caller, call, origin).await?;
        let figures = admission.figures();
        let UpstreamAnswer { response, lease } = answer;
        // The answer is JSON whatever the upstream called it (an odd proxy may say HTML).
        let content_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .filter(|v| v.starts_with("application/json"))
            .map(str::to_owned);
        let reading = read_body(response, settings.idle_timeout, settings.max_response_bytes);
        let body = tokio::select! {
            body = tokio::time::timeout_at(deadline, reading) => {
                body.unwrap_or(Err(GatewayError::UpstreamTimeout))
            }
            () = self.hard_stop.cancelled() => Err(GatewayError::ShuttingDown),
        };
        let body = match body {
            Ok(body) => body,
            Err(e) => {
                self.upstream.record_stream_failure(&lease);
                return Err(settle_failed(admission, e));
            }
        };
        let answer = match read(&body) {
            Ok(Reading { answer, usage }) => {
                if let Some(usage) = usage {
                    admission.observe_usage(usage);
                }
                answer
            }
            Err(e) => {
                // Read again for which failure it is and what to bill: a 200 whose body is not
                // a JSON object is the upstream's failure; a JSON answer the door cannot
                // translate is billed the usage it reports.
                let e = match usage_of(&body) {
                    Ok(usage) => {
                        if let Some(usage) = usage {
                            admission.observe_usage(usage);
                        }
                        tracing::warn!(request_id, error = %e, "the model server sent an answer the door cannot read");
                        e
                    }
                    Err(json) => {
                        tracing::warn!(request_id, error = %json, "the model server sent an unreadable answer");
                        invalid_response(&json.to_string())
                    }
                };
                self.upstream.record_stream_failure(&lease);
                return Err(settle_failed(admission, e));
            }
        };
        drop(lease);
        admission.mark_upstream_done();
        admission.keep_response_body(&body);
        let processing_ms = admission.elapsed_ms();
        admission.settle(CallOutcome::Completed, 200);
        Ok(Completion {
            body,
            answer,
            content_type,
            processing_ms,
            figures,
            remaining: caller.remaining(),
        })
    }

    /// A streaming call: forwarded, then relayed event by event by the returned [`Relay`].
    pub async fn stream(
        &self,
        caller: &Caller,
        call: ChatCall,
        origin: &Origin,
        view: UsageView,
    ) -> Result<StreamStart, GatewayError> {
        let request_id = origin.request_id.as_str();
        let settings = self.upstream.settings();
        let (admission, answer, deadline) = self.start(caller, call, origin).await?;
        let UpstreamAnswer { response, lease } = answer;
        // An HTML page or a JSON answer is no stream: the client gets an error, not its bytes.
        if let Some(other) = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .filter(|v| !v.as_bytes().starts_with(b"text/event-stream"))
        {
            let other = String::from_utf8_lossy(other.as_bytes()).into_owned();
            tracing::warn!(request_id, content_type = %other, "the model server answered a stream request with no stream");
            self.upstream.record_stream_failure(&lease);
            let e = invalid_response(&format!("a stream was asked for and `{other}` came back"));
            return Err(settle_failed(admission, e));
        }
        let figures = admission.figures();
        let remaining = admission.remaining();
        let now = tokio::time::Instant::now();
        Ok(StreamStart {
            relay: Relay {
                upstream: response.bytes_stream().boxed(),
                held: None,
                lease: Some(lease),
                pool: self.upstream.clone(),
                idle_timeout: settings.idle_timeout,
                idle: Box::pin(tokio::time::sleep_until(now + settings.idle_timeout)),
                deadline: Box::pin(tokio::time::sleep_until(deadline)),
                framer: SseFramer::new(settings.max_event_bytes),
                events: Vec::new(),
                out: BytesMut::new(),
                ends: Vec::new(),
                admission: Some(admission),
                view,
                draining: false,
                junk: 0,
                hard_stop: Box::pin(self.hard_stop.clone().cancelled_owned()),
            },
            figures,
            remaining,
        })
    }

    /// The upstream's model list (OpenAI JSON), keeping the models `caller` may use.
    pub async fn models(
        &self,
        caller: &Caller,
        request_id: &str,
    ) -> Result<serde_json::Value, GatewayError> {
        let mut list = self.upstream.models(request_id).await?;
        if let Some(serde_json::Value::Array(models)) = list.get_mut("data") {
            models.retain(|m| {
                m.get("id")
                    .and_then(serde_json::Value::as_str)
                    .is_some_and(|id| caller.record.allows_model(id))
            });
        }
        Ok(list)
    }

    fn logged_body(&self, call: &ChatCall) -> Option<String> {
        self.gateway
            .logs_bodies()
            .then(|| String::from_utf8_lossy(&call.client_body).into_owned())
    }
}

/// Settles a call that failed before its answer, and passes the error on.
fn settle_failed(admission: Admission, e: GatewayError) -> GatewayError {
    let (outcome, status) = match &e {
        GatewayError::Upstream { status, .. } => (CallOutcome::UpstreamError, *status),
        GatewayError::UpstreamTimeout => (CallOutcome::TimedOut, 504),
        GatewayError::ShuttingDown => (CallOutcome::Cancelled, 503),
        _ => (CallOutcome::UpstreamFailed, 502),
    };
    admission.settle(outcome, status);
    e
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

/// The usage an answer reports; an error if the answer is not a JSON object.
fn usage_of(body: &[u8]) -> Result<Option<Usage>, serde_json::Error> {
    if !body.trim_ascii_start().starts_with(b"{") {
        return Err(serde::de::Error::custom("the answer is not a JSON object"));
    }
    let usage = serde_json::from_slice::<UsageOnly>(body)?.usage;
    Ok(usage.map(|usage| Usage {
        prompt_tokens: usage.prompt_tokens,
        completion_tokens: usage.completion_tokens,
    }))
}

/// Carries a stream from the upstream to the client, metering each event and hiding
/// usage the client did not ask for. Dropping it (the client left) drops the upstream
/// request, which stops the generation, and settles the call through the admission.
///
/// This runs for every chunk of every stream, so the timers and the shutdown signal are
/// made once per stream (the idle timer is moved, not remade, when an event arrives) and
/// the events for the client are written into one reused buffer.
pub struct Relay {
    upstream: BoxStream<'static, reqwest::Result<Bytes>>,
    /// The upstream's end or failure, read while taking the chunks that had already
    /// arrived: handled on the next call, after the events before it are out.
    held: Option<Option<reqwest::Result<Bytes>>>,
    /// Counts the call on its backend until the relay ends.
    lease: Option<BackendLease>,
    pool: Arc<UpstreamPool>,
    /// The longest wait for the next whole event: bytes that never complete one (a
    /// trickle) do not keep the stream alive.
    idle_timeout: Duration,
    /// Fires `idle_timeout` after the last whole event arrived.
    idle: Pin<Box<Sleep>>,
    /// Fires at the call's total time limit.
    deadline: Pin<Box<Sleep>>,
    framer: SseFramer,
    /// The events of the chunk being read (kept for its allocation).
    events: Vec<Bytes>,
    /// The bytes for the client not handed out yet, whole events only.
    out: BytesMut,
    /// Where each event in `out` ends.
    ends: Vec<usize>,
    admission: Option<Admission>,
    view: UsageView,
    /// `[DONE]` was seen and settled; what is left of the upstream body is read and dropped.
    draining: bool,
    /// Events dropped as unreadable (comments, junk lines, data that is not JSON).
    junk: u64,
    /// Resolves when the shutdown grace period is over.
    hard_stop: Pin<Box<WaitForCancellationFutureOwned>>,
}

/// What ended a wait for the upstream.
enum Wake {
    Item(Option<reqwest::Result<Bytes>>),
    Idle,
    Deadline,
    Stop,
}

/// The most bytes gathered from chunks that had already arrived before they are handed on.
const GATHER_LIMIT: usize = 16 * 1024;

/// Room made in the output buffer at a time: a few chunks' worth, so that it is not grown
/// for every event, and little held by an idle stream.
const OUT_RESERVE: usize = 1024;

impl Relay {
    /// The next whole SSE events (each with its blank-line terminator), `None` at the end.
    /// A stream the upstream breaks off ends with an error event and `[DONE]`.
    pub async fn next_events(&mut self) -> Option<Vec<Bytes>> {
        if !self.fill().await {
            return None;
        }
        let mut events = Vec::with_capacity(self.ends.len());
        let mut start = 0;
        for end in self.ends.drain(..) {
            events.push(self.out.split_to(end - start).freeze());
            start = end;
        }
        Some(events)
    }

    /// The next events as one buffer (what an SSE body writes).
    pub async fn next_bytes(&mut self) -> Option<Bytes> {
        if !self.fill().await {
            return None;
        }
        self.ends.clear();
        Some(self.out.split().freeze())
    }

    /// Reads the upstream until `out` holds at least one event for the client (`true`),
    /// or the stream is over (`false`). Chunks that have already arrived when one is read
    /// are taken too, so that events sent together reach the client together.
    ///
    /// Cancel-safe: it waits only while `out` is empty.
    async fn fill(&mut self) -> bool {
        loop {
            if self.admission.is_none() {
                self.drain().await;
                return false;
            }
            let wake = match self.held.take() {
                Some(item) => Wake::Item(item),
                None => self.wait().await,
            };
            let chunk = match wake {
                Wake::Item(Some(Ok(chunk))) => chunk,
                Wake::Item(Some(Err(e))) => {
                    let message = format!("the model server's stream broke off: {e}");
                    self.break_off(200, "stream_incomplete", &message);
                    return true;
                }
                Wake::Item(None) => {
                    self.break_off(
                        200,
                        "stream_incomplete",
                        "the model server ended the stream without finishing it",
                    );
                    return true;
                }
                Wake::Idle => {
                    self.break_off(
                        504,
                        "upstream_timeout",
                        "the model server went silent in the middle of the stream",
                    );
                    return true;
                }
                Wake::Deadline => {
                    self.break_off(
                        504,
                        "upstream_timeout",
                        "the call ran past the gateway's total time limit",
                    );
                    return true;
                }
                Wake::Stop => {
                    self.finish(CallOutcome::Cancelled, 200);
                    self.emit(&sse::error_end(
                        "stream_incomplete",
                        "the gateway is shutting down; the stream was cut short",
                    ));
                    return true;
                }
            };
            if self.take_chunk(chunk) {
                return true;
            }
            while self.out.len() < GATHER_LIMIT {
                let ready =
                    std::future::poll_fn(|cx| Poll::Ready(self.upstream.poll_next_unpin(cx))).await;
                match ready {
                    Poll::Ready(Some(Ok(chunk))) => {
                        if self.take_chunk(chunk) {
                            return true;
                        }
                    }
                    Poll::Ready(end) => {
                        self.held = Some(end);
                        break;
                    }
                    Poll::Pending => break,
                }
            }
            if !self.ends.is_empty() {
                return true;
            }
        }
    }

    /// Waits for the next upstream item, the idle or total time limit, or the shutdown;
    /// the limits and the shutdown come first when they are due together with a chunk.
    async fn wait(&mut self) -> Wake {
        std::future::poll_fn(|cx| {
            if self.hard_stop.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Wake::Stop);
            }
            if self.deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Wake::Deadline);
            }
            if let Poll::Ready(item) = self.upstream.poll_next_unpin(cx) {
                return Poll::Ready(Wake::Item(item));
            }
            if self.idle.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Wake::Idle);
            }
            Poll::Pending
        })
        .await
    }

    /// Frames a chunk and takes its events; `true` when the stream ended with them.
    fn take_chunk(&mut self, chunk: Bytes) -> bool {
        let mut events = std::mem::take(&mut self.events);
        let ended = match self.framer.push_bytes(chunk, &mut events) {
            Ok(()) => {
                if !events.is_empty() {
                    let now = tokio::time::Instant::now();
                    self.idle.as_mut().reset(now + self.idle_timeout);
                }
                self.take_events(&mut events)
            }
            Err(e) => {
                if let Some(admission) = &self.admission {
                    tracing::warn!(request_id = admission.request_id(), error = %e, "stream cut");
                }
                let message = e.to_string();
                self.break_off(502, "upstream_response_too_large", &message);
                true
            }
        };
        events.clear();
        self.events = events;
        ended
    }

    /// Meters whole events and writes what the client gets of them to `out`; `true` when
    /// the stream ended with them.
    fn take_events(&mut self, events: &mut Vec<Bytes>) -> bool {
        let Some(admission) = self.admission.as_mut() else {
            return true;
        };
        let mut done = false;
        let mut failed = false;
        for event in events.drain(..) {
            let read = sse::read_event(&event);
            let info = &read.info;
            if !info.readable {
                // Clients parse every `data:` line as JSON: junk stays here.
                if self.junk == 0 {
                    tracing::warn!(request_id = admission.request_id(), event = %String::from_utf8_lossy(&event[..event.len().min(200)]), "dropped an unreadable stream event");
                }
                self.junk += 1;
                continue;
            }
            if info.done {
                emit(&mut self.out, &mut self.ends, &event);
                done = true;
                break;
            }
            if info.has_choices {
                admission.observe_chunk();
            }
            if let Some(error) = &info.error {
                // The upstream's error ends the stream here, for either door: the client
                // gets it and `[DONE]`, the call is settled now, the rest is drained.
                tracing::warn!(request_id = admission.request_id(), %error, "the model server failed mid-stream");
                if let Some(usage) = info.usage {
                    admission.observe_usage(usage);
                }
                emit(&mut self.out, &mut self.ends, &event);
                emit(&mut self.out, &mut self.ends, b"data: [DONE]\n\n");
                failed = true;
                break;
            }
            let Some(usage) = info.usage else {
                emit(&mut self.out, &mut self.ends, &event);
                continue;
            };
            admission.observe_usage(usage);
            if !info.has_choices {
                // The final usage chunk: only for clients that asked for it.
                if self.view.final_chunk {
                    emit(&mut self.out, &mut self.ends, &event);
                }
            } else if self.view.every_chunk {
                emit(&mut self.out, &mut self.ends, &event);
            } else {
                // The event without its usage is no longer than the event.
                make_room(&mut self.out, event.len());
                if read.write_without_usage(&mut self.out) {
                    self.ends.push(self.out.len());
                } else {
                    emit(&mut self.out, &mut self.ends, &event);
                }
            }
        }
        // Settle now, before the client can read `[DONE]` and ask for its usage.
        if failed {
            self.draining = true;
            self.finish(CallOutcome::StreamIncomplete, 200);
        } else if done {
            if let Some(admission) = self.admission.as_mut() {
                admission.mark_upstream_done();
            }
            self.draining = true;
            self.finish(CallOutcome::Completed, 200);
        }
        failed || done
    }

    fn emit(&mut self, event: &[u8]) {
        emit(&mut self.out, &mut self.ends, event);
    }

    /// After `[DONE]`, reads the upstream body to its end so its connection can be reused.
    async fn drain(&mut self) {
        if std::mem::take(&mut self.draining) {
            // A server that keeps the body open after `[DONE]` must not hold the client.
            let rest = async { while let Some(Ok(_)) = self.upstream.next().await {} };
            let _ = tokio::time::timeout(DRAIN_LIMIT, rest).await;
        }
    }

    /// Ends the stream because a door cannot translate an event the upstream sent (a chunk
    /// of the wrong shape): settled like any stream the upstream broke off. The door tells
    /// the client what went wrong.
    pub fn fail(&mut self) {
        self.settle_broken(502);
    }

    /// Ends a stream the upstream failed: the backend's failure counts against its health,
    /// the call is settled with what was seen, and the client gets a well-formed end.
    fn break_off(&mut self, status: u16, code: &str, message: &str) {
        self.settle_broken(status);
        self.emit(&sse::error_end(code, message));
    }

    fn settle_broken(&mut self, status: u16) {
        if let Some(lease) = self.lease.take() {
            self.pool.record_stream_failure(&lease);
        }
        self.finish(CallOutcome::StreamIncomplete, status);
    }

    fn finish(&mut self, outcome: CallOutcome, status: u16) {
        if let Some(admission) = self.admission.take() {
            admission.settle(outcome, status);
        }
    }
}

/// Appends a whole event to the client's bytes.
fn emit(out: &mut BytesMut, ends: &mut Vec<usize>, event: &[u8]) {
    make_room(out, event.len());
    out.extend_from_slice(event);
    ends.push(out.len());
}

/// Makes room for `len` more bytes in `out`, at least [`OUT_RESERVE`] when it grows.
fn make_room(out: &mut BytesMut, len: usize) {
    if out.capacity() - out.len() < len {
        out.reserve(len.max(OUT_RESERVE));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The gRPC door bills from its own reading of the answer; whenever that reading
    /// succeeds it must find the usage the REST door's reading finds.
    #[test]
    fn both_doors_read_the_same_usage_from_an_answer() {
        let answers = [
            r#"{"id":"a","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":7,"total_tokens":19}}"#,
            r#"{"id":"a","usage":{"prompt_tokens":12}}"#,
            r#"{"id":"a","usage":{}}"#,
            r#"{"id":"a","usage":null}"#,
            r#"{"id":"a"}"#,
            r#"  {"usage":{"completion_tokens":3,"prompt_tokens_details":{"cached_tokens":1}},"model":"m"}"#,
            r#"{"choices":[{"index":0,"message":{"role":"assistant","content":"{\"usage\":{\"prompt_tokens\":99}}"}}],"usage":{"prompt_tokens":1,"completion_tokens":2}}"#,
        ];
        for answer in answers {
            let body = Bytes::from(answer);
            let rest = read_usage(&body).unwrap().usage;
            let grpc = crate::grpc::convert::read_answer(&body).unwrap().usage;
            assert_eq!(rest, grpc, "{answer}");
            assert_eq!(rest, usage_of(answer.as_bytes()).unwrap(), "{answer}");
        }
        // What is not a JSON object is refused by both.
        for answer in [r#"["id","m",0,[],null]"#, "null", "<html>", ""] {
            let body = Bytes::from(answer);
            assert!(read_usage(&body).is_err(), "{answer}");
            assert!(
                crate::grpc::convert::read_answer(&body).is_err(),
                "{answer}"
            );
        }
    }
}
