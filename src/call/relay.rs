//! The relay: carries a stream from the model server to the client, metering each event
//! and hiding usage the client did not ask for, and settles the call when the stream ends
//! however it ends.

use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::time::Sleep;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::cache::{CacheKey, CompletionAssembler, ResponseCache};
use crate::core::Admission;
use crate::core::records::CallOutcome;
use crate::core::request::Endpoint;
use crate::upstream::sse::{self, DONE_EVENT};
use crate::upstream::{EventStream, StreamStep};

/// How long the end of an upstream body is awaited after `[DONE]`.
const DRAIN_LIMIT: Duration = Duration::from_millis(500);

/// Room made in the output buffer at a time: a few chunks' worth, so that it is not grown
/// for every event, and little held by an idle stream.
const OUT_RESERVE: usize = 1024;

/// Which usage the client sees in a stream (the upstream is always asked for all of it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UsageView {
    pub final_chunk: bool,
    pub every_chunk: bool,
}

/// One event for a door that takes events one by one (gRPC).
#[derive(Clone, Debug, PartialEq)]
pub enum RelayEvent {
    /// A chunk: its `data:` JSON.
    Chunk(Bytes),
    /// The stream ends with an error (the model server's, or the gateway's when it cut the
    /// stream): its message.
    Error(String),
    /// The normal end.
    Done,
}

/// What an event in the output is, for [`Relay::next_events`].
#[derive(Debug)]
enum Kind {
    Chunk,
    Error(String),
    Done,
}

/// Carries a stream from the upstream to the client. Dropping it (the client left) drops
/// the upstream request, which stops the generation, and settles the call through the
/// admission.
///
/// This runs for every chunk of every stream, so the timers and the shutdown signal are
/// made once per stream (the idle timer is moved, not remade, when an event arrives) and
/// the events for the client are written into one reused buffer.
pub struct UpstreamRelay {
    upstream: EventStream,
    /// The longest wait for the next whole event: bytes that never complete one (a
    /// trickle) do not keep the stream alive.
    idle_timeout: Duration,
    /// Fires `idle_timeout` after the last whole event arrived.
    idle: Pin<Box<Sleep>>,
    /// Fires at the call's total time limit.
    deadline: Pin<Box<Sleep>>,
    /// The events read from the upstream and not yet taken (kept for its allocation).
    events: Vec<Bytes>,
    /// The bytes for the client not handed out yet, whole events only.
    out: BytesMut,
    /// Where each event in `out` ends, and what it is.
    ends: Vec<(usize, Kind)>,
    admission: Option<Admission>,
    /// Chat and text completion chunks, or the Responses API's typed events.
    endpoint: Endpoint,
    view: UsageView,
    /// `[DONE]` was seen and settled; what is left of the upstream body is read and dropped.
    draining: bool,
    /// Events dropped as unreadable (comments, junk lines, data that is not JSON).
    junk: u64,
    /// Resolves when the shutdown grace period is over.
    hard_stop: Pin<Box<WaitForCancellationFutureOwned>>,
    /// A cacheable stream: its chunks are put together and the answer kept if it ends whole.
    keep: Option<Box<KeepAnswer>>,
    /// For a door that takes events one by one: events read together, metered and handed
    /// out one per call, so that the door translates each before the next is metered. A
    /// door that cannot translate one settles the call with what came before it, as the
    /// model server had sent them one at a time.
    backlog: Vec<Bytes>,
}

/// Where a whole streamed answer is kept, and its chunks so far.
pub(super) struct KeepAnswer {
    pub(super) cache: Arc<ResponseCache>,
    pub(super) key: CacheKey,
    pub(super) model: String,
    pub(super) assembler: CompletionAssembler,
}

/// A stream for a door: relayed from the model server, or replayed from the cache.
#[expect(
    clippy::large_enum_variant,
    reason = "the relayed stream is the common case: boxing it would allocate once per stream"
)]
pub enum Relay {
    Upstream(UpstreamRelay),
    Cached(CachedRelay),
}

impl Relay {
    /// The next events, one by one, `None` at the end. A stream the upstream breaks off
    /// ends with an error and `Done`.
    pub async fn next_events(&mut self) -> Option<Vec<RelayEvent>> {
        match self {
            Relay::Upstream(relay) => relay.next_events().await,
            Relay::Cached(replay) => replay.next_events(),
        }
    }

    /// The next events as one buffer of SSE (what an SSE body writes), `None` at the end.
    pub async fn next_bytes(&mut self) -> Option<Bytes> {
        match self {
            Relay::Upstream(relay) => relay.next_bytes().await,
            Relay::Cached(replay) => replay.next_bytes(),
        }
    }

    /// Ends the stream because a door cannot translate an event (see [`UpstreamRelay::fail`]).
    pub fn fail(&mut self) {
        match self {
            Relay::Upstream(relay) => relay.fail(),
            Relay::Cached(replay) => replay.fail(),
        }
    }
}

/// A cached answer replayed as a stream: its chunks and `[DONE]` at once. The call is
/// settled when they are handed out (or, if the client leaves first, by the admission's
/// drop).
pub struct CachedRelay {
    chunks: Vec<Bytes>,
    admission: Option<Admission>,
}

impl CachedRelay {
    pub(super) fn new(chunks: Vec<Bytes>, admission: Admission) -> Self {
        CachedRelay {
            chunks,
            admission: Some(admission),
        }
    }

    fn take(&mut self) -> Option<Vec<Bytes>> {
        let admission = self.admission.take()?;
        admission.settle(CallOutcome::Completed, 200);
        Some(std::mem::take(&mut self.chunks))
    }

    fn next_events(&mut self) -> Option<Vec<RelayEvent>> {
        let mut events: Vec<RelayEvent> = self.take()?.into_iter().map(RelayEvent::Chunk).collect();
        events.push(RelayEvent::Done);
        Some(events)
    }

    fn next_bytes(&mut self) -> Option<Bytes> {
        let chunks = self.take()?;
        let size = chunks.iter().map(|c| c.len() + 8).sum::<usize>() + DONE_EVENT.len();
        let mut out = BytesMut::with_capacity(size);
        for chunk in chunks {
            out.extend_from_slice(b"data: ");
            out.extend_from_slice(&chunk);
            out.extend_from_slice(b"\n\n");
        }
        out.extend_from_slice(DONE_EVENT);
        Some(out.freeze())
    }

    fn fail(&mut self) {
        if let Some(admission) = self.admission.take() {
            admission.settle(CallOutcome::StreamIncomplete, 502);
        }
    }
}

/// What ended a wait for the upstream.
enum Wake {
    Step(StreamStep),
    Idle,
    Deadline,
    Stop,
}

impl UpstreamRelay {
    pub(super) fn new(
        upstream: EventStream,
        admission: Admission,
        endpoint: Endpoint,
        view: UsageView,
        idle_timeout: Duration,
        deadline: tokio::time::Instant,
        hard_stop: &CancellationToken,
    ) -> Self {
        let now = tokio::time::Instant::now();
        UpstreamRelay {
            upstream,
            idle_timeout,
            idle: Box::pin(tokio::time::sleep_until(now + idle_timeout)),
            deadline: Box::pin(tokio::time::sleep_until(deadline)),
            events: Vec::new(),
            out: BytesMut::new(),
            ends: Vec::new(),
            admission: Some(admission),
            endpoint,
            // The Responses API always streams its usage, in the event that ends the stream.
            view: if endpoint.streams_chunks() {
                view
            } else {
                UsageView {
                    final_chunk: true,
                    every_chunk: true,
                }
            },
            draining: false,
            junk: 0,
            hard_stop: Box::pin(hard_stop.clone().cancelled_owned()),
            keep: None,
            backlog: Vec::new(),
        }
    }

    /// Keeps the answer in the cache if the stream ends whole.
    pub(super) fn keeping(mut self, keep: Option<KeepAnswer>) -> Self {
        self.keep = keep.map(Box::new);
        self
    }

    /// The next events, one by one, `None` at the end. A stream the upstream breaks off
    /// ends with an error and `Done`.
    pub async fn next_events(&mut self) -> Option<Vec<RelayEvent>> {
        if !self.fill(true).await {
            return None;
        }
        let mut events = Vec::with_capacity(self.ends.len());
        let mut start = 0;
        for (end, kind) in self.ends.drain(..) {
            let event = self.out.split_to(end - start).freeze();
            start = end;
            events.push(match kind {
                Kind::Chunk => RelayEvent::Chunk(match sse::data_of(&event) {
                    Some(std::borrow::Cow::Borrowed(data)) => event.slice_ref(data),
                    Some(std::borrow::Cow::Owned(data)) => Bytes::from(data),
                    None => Bytes::new(),
                }),
                Kind::Error(message) => RelayEvent::Error(message),
                Kind::Done => RelayEvent::Done,
            });
        }
        Some(events)
    }

    /// The next events as one buffer of SSE (what an SSE body writes), `None` at the end.
    pub async fn next_bytes(&mut self) -> Option<Bytes> {
        if !self.fill(false).await {
            return None;
        }
        self.ends.clear();
        Some(self.out.split().freeze())
    }

    /// Reads the upstream until `out` holds at least one event for the client (`true`),
    /// or the stream is over (`false`).
    ///
    /// Cancel-safe: it waits only while `out` is empty. `one_by_one`: see `backlog`.
    async fn fill(&mut self, one_by_one: bool) -> bool {
        loop {
            if self.admission.is_none() {
                if std::mem::take(&mut self.draining) {
                    self.upstream.drain(DRAIN_LIMIT).await;
                }
                return false;
            }
            if !self.backlog.is_empty() {
                let mut events = std::mem::take(&mut self.backlog);
                self.take_events(&mut events, true);
                if !self.ends.is_empty() {
                    return true;
                }
                continue;
            }
            let events = match self.wait().await {
                Wake::Step(StreamStep::Events) => {
                    let now = tokio::time::Instant::now();
                    self.idle.as_mut().reset(now + self.idle_timeout);
                    std::mem::take(&mut self.events)
                }
                Wake::Step(StreamStep::Broken(e)) => {
                    let message = format!("the model server's stream broke off: {e}");
                    self.break_off(200, "stream_incomplete", &message);
                    return true;
                }
                Wake::Step(StreamStep::Ended) => {
                    self.break_off(
                        200,
                        "stream_incomplete",
                        "the model server ended the stream without finishing it",
                    );
                    return true;
                }
                Wake::Step(StreamStep::TooLarge(message)) => {
                    if let Some(admission) = &self.admission {
                        tracing::warn!(request_id = admission.request_id(), error = %message, "stream cut");
                    }
                    self.break_off(502, "upstream_response_too_large", &message);
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
                    self.end_with_error(
                        "stream_incomplete",
                        "the gateway is shutting down; the stream was cut short",
                    );
                    return true;
                }
            };
            let mut events = events;
            self.take_events(&mut events, one_by_one);
            events.clear();
            self.events = events;
            if !self.ends.is_empty() {
                return true;
            }
        }
    }

    /// Waits for the next events, the idle or total time limit, or the shutdown; the limits
    /// and the shutdown come first when they are due together with events.
    async fn wait(&mut self) -> Wake {
        std::future::poll_fn(|cx| {
            if self.hard_stop.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Wake::Stop);
            }
            if self.deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Wake::Deadline);
            }
            if let Poll::Ready(step) = self.upstream.poll_events(cx, &mut self.events) {
                return Poll::Ready(Wake::Step(step));
            }
            if self.idle.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Wake::Idle);
            }
            Poll::Pending
        })
        .await
    }

    /// Meters whole events and writes what the client gets of them to `out`; the call is
    /// settled when the stream ends with them.
    fn take_events(&mut self, events: &mut Vec<Bytes>, one_by_one: bool) {
        let Some(admission) = self.admission.as_mut() else {
            return;
        };
        let mut done = false;
        let mut failed = false;
        let chunks = self.endpoint.streams_chunks();
        let mut pending = events.drain(..);
        while let Some(event) = pending.next() {
            if one_by_one && !self.ends.is_empty() {
                self.backlog.push(event);
                self.backlog.extend(pending);
                break;
            }
            let read = if chunks {
                sse::read_event(&event)
            } else {
                sse::read_response_event(&event)
            };
            let info = &read.info;
            if !info.readable {
                // Clients parse every `data:` line as JSON: junk stays here.
                if self.junk == 0 {
                    tracing::warn!(request_id = admission.request_id(), event = %String::from_utf8_lossy(&event[..event.len().min(200)]), "dropped an unreadable stream event");
                }
                self.junk += 1;
                continue;
            }
            if let Some(keep) = self.keep.as_mut()
                && !info.done
                && let Some(data) = sse::data_of(&event)
            {
                keep.assembler.push(&data);
            }
            if info.done {
                emit(&mut self.out, &mut self.ends, &event, Kind::Done);
                done = true;
                break;
            }
            if info.has_choices {
                admission.observe_chunk();
                if admission.traced() {
                    for reason in super::trace::finish_reasons(&event) {
                        admission.observe_finish_reason(&reason);
                    }
                }
            }
            if let Some(error) = &info.error {
                // The upstream's error ends the stream here, for either door: the client
                // gets it and `[DONE]`, the call is settled now, the rest is drained.
                tracing::warn!(request_id = admission.request_id(), %error, "the model server failed mid-stream");
                if let Some(usage) = info.usage {
                    admission.observe_usage(usage);
                }
                emit(
                    &mut self.out,
                    &mut self.ends,
                    &event,
                    Kind::Error(error.clone()),
                );
                if chunks {
                    emit(&mut self.out, &mut self.ends, DONE_EVENT, Kind::Done);
                }
                failed = true;
                break;
            }
            let Some(usage) = info.usage else {
                emit(&mut self.out, &mut self.ends, &event, Kind::Chunk);
                continue;
            };
            admission.observe_usage(usage);
            if !info.has_choices {
                // The final usage chunk: only for clients that asked for it.
                if self.view.final_chunk {
                    emit(&mut self.out, &mut self.ends, &event, Kind::Chunk);
                }
            } else if self.view.every_chunk {
                emit(&mut self.out, &mut self.ends, &event, Kind::Chunk);
            } else {
                // The event without its usage is no longer than the event.
                make_room(&mut self.out, event.len());
                if read.write_without_usage(&mut self.out) {
                    self.ends.push((self.out.len(), Kind::Chunk));
                } else {
                    emit(&mut self.out, &mut self.ends, &event, Kind::Chunk);
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
            self.keep_answer();
            self.finish(CallOutcome::Completed, 200);
        }
    }

    /// A stream that ended with `[DONE]`: its answer is kept if every choice finished and
    /// the usage came (a cut or failed stream never is).
    fn keep_answer(&mut self) {
        let Some(keep) = self.keep.take() else {
            return;
        };
        let KeepAnswer {
            cache,
            key,
            model,
            assembler,
        } = *keep;
        if let Some(body) = assembler.finish() {
            let usage = crate::upstream::usage_of(&body).ok().flatten();
            cache.insert(key, &model, body, Some("application/json".into()), usage);
        }
    }

    /// A well-formed end the gateway writes: an error event, then `[DONE]` (the Responses
    /// API's error event is its own end).
    fn end_with_error(&mut self, code: &str, message: &str) {
        let error = if self.endpoint.streams_chunks() {
            sse::error_event(code, message)
        } else {
            sse::response_error_event(code, message)
        };
        emit(
            &mut self.out,
            &mut self.ends,
            &error,
            Kind::Error(message.to_owned()),
        );
        if self.endpoint.streams_chunks() {
            emit(&mut self.out, &mut self.ends, DONE_EVENT, Kind::Done);
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
        self.end_with_error(code, message);
    }

    fn settle_broken(&mut self, status: u16) {
        self.upstream.fail();
        self.finish(CallOutcome::StreamIncomplete, status);
    }

    fn finish(&mut self, outcome: CallOutcome, status: u16) {
        if let Some(admission) = self.admission.take() {
            admission.settle(outcome, status);
        }
    }
}

/// Appends a whole event to the client's bytes.
fn emit(out: &mut BytesMut, ends: &mut Vec<(usize, Kind)>, event: &[u8], kind: Kind) {
    make_room(out, event.len());
    out.extend_from_slice(event);
    ends.push((out.len(), kind));
}

/// Makes room for `len` more bytes in `out`, at least [`OUT_RESERVE`] when it grows.
fn make_room(out: &mut BytesMut, len: usize) {
    if out.capacity() - out.len() < len {
        out.reserve(len.max(OUT_RESERVE));
    }
}
