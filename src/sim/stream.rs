//! Server-sent-event streaming of a simulated completion, token by token, whatever the
//! API: the endpoint supplies the events ([`StreamFormat`]), this module the pace, the
//! stream faults and the books (tokens sent, streams finished or cancelled).

use std::fmt::Write as _;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderValue, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use serde_json::Value;

use super::state::{AppState, SimState};
use super::wire::error_json;

/// The events of one API's stream. Each token step carries exactly one generated token.
pub(super) trait StreamFormat: Send + 'static {
    /// Token steps in the whole stream (over all choices).
    fn tokens(&self) -> u32;
    /// What is sent before the first token, if anything (a role chunk, `response.created`).
    fn opening(&mut self) -> Option<Bytes>;
    /// The events of token step `step`, counted from 0.
    fn token(&mut self, step: u32) -> Bytes;
    /// Everything after the last token up to the end of the body (finish, usage, `[DONE]`).
    fn closing(&mut self) -> Bytes;
    /// The in-stream error an engine failure sends, and what ends the body after it.
    fn error(&mut self, message: &str) -> Bytes;
}

/// A stream-only fault, armed for one response.
#[derive(Clone, Copy, Debug)]
pub(super) enum StreamFault {
    /// Abort the connection after this many token chunks.
    Cut(u32),
    /// Send the error event (and what ends the stream) after this many token chunks.
    Error(u32),
    /// End the body cleanly after this many token chunks.
    End(u32),
    /// Send nothing more after this many token chunks, connection open.
    Stall(u32),
    /// Write the plan's `inject` bytes after this many token chunks, then go on.
    Inject(u32),
}

/// Everything needed to stream one completion.
pub(super) struct StreamPlan {
    pub format: Box<dyn StreamFormat>,
    pub fault: Option<StreamFault>,
    /// What [`StreamFault::Inject`] writes.
    pub inject: Option<Bytes>,
    pub token_latency: Duration,
}

impl StreamPlan {
    /// A `text/event-stream` response that produces events lazily, so latency is real and
    /// a client going away drops the stream (and its [`StreamGuard`]) mid-way.
    pub fn into_response(self, state: AppState) -> Response {
        let stream = StreamState {
            guard: StreamGuard {
                sim: state.sim.clone(),
                settled: false,
            },
            plan: self,
            phase: Phase::Opening,
            app: state,
        };
        let events = futures_util::stream::unfold(stream, |mut stream| async move {
            let event = stream.next_event().await?;
            Some((event, stream))
        });
        let mut response = Response::new(Body::from_stream(events));
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        response
    }
}

#[derive(Clone, Copy, Debug)]
enum Phase {
    Opening,
    /// Token steps; the payload is how many were already sent.
    Token(u32),
    Closing,
    Ended,
}

/// Counts a stream as cancelled unless it was settled (finished or ended on purpose)
/// before being dropped; hyper drops the body when the client disconnects.
struct StreamGuard {
    sim: Arc<SimState>,
    settled: bool,
}

impl StreamGuard {
    fn finish(&mut self) {
        self.settled = true;
        self.sim.count_stream_finished();
    }

    fn settle(&mut self) {
        self.settled = true;
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if !self.settled {
            self.sim.count_stream_cancelled();
        }
    }
}

struct StreamState {
    plan: StreamPlan,
    phase: Phase,
    guard: StreamGuard,
    app: AppState,
}

impl StreamState {
    async fn next_event(&mut self) -> Option<io::Result<Bytes>> {
        let tokens = self.plan.format.tokens();
        loop {
            match self.phase {
                Phase::Opening => {
                    self.phase = Phase::Token(0);
                    if let Some(opening) = self.plan.format.opening() {
                        return Some(Ok(opening));
                    }
                }
                Phase::Token(sent) => {
                    if let Some(event) = self.fault_event(sent, tokens).await {
                        return event;
                    }
                    if sent >= tokens {
                        self.phase = Phase::Closing;
                        continue;
                    }
                    if !self.app.pause(self.plan.token_latency).await {
                        // Shutting down: abort like a killed server would.
                        self.phase = Phase::Ended;
                        self.guard.settle();
                        return Some(Err(aborted("simulator shutting down")));
                    }
                    self.phase = Phase::Token(sent + 1);
                    self.app.sim.add_tokens_sent(1);
                    return Some(Ok(self.plan.format.token(sent)));
                }
                Phase::Closing => {
                    self.phase = Phase::Ended;
                    self.guard.finish();
                    return Some(Ok(self.plan.format.closing()));
                }
                Phase::Ended => return None,
            }
        }
    }

    /// What the armed fault emits once `sent` token chunks are out: `None` while it is
    /// not due, else the stream's next item (`None` inside meaning "end the body").
    /// A threshold beyond the stream's length fires after the last token, before the
    /// closing events.
    async fn fault_event(&mut self, sent: u32, tokens: u32) -> Option<Option<io::Result<Bytes>>> {
        let fault = self.plan.fault?;
        let after = match fault {
            StreamFault::Cut(after)
            | StreamFault::Error(after)
            | StreamFault::End(after)
            | StreamFault::Stall(after)
            | StreamFault::Inject(after) => after,
        };
        if sent < after.min(tokens) {
            return None;
        }
        self.plan.fault = None;
        Some(match fault {
            StreamFault::Cut(_) => {
                self.phase = Phase::Ended;
                self.guard.settle();
                // hyper buffers head and chunks until the body returns Pending and drops
                // the buffer on a body error; yield once so what was "sent" reaches the
                // socket before the abort.
                tokio::task::yield_now().await;
                Some(Err(aborted("simulated stream cut")))
            }
            StreamFault::Error(_) => {
                // vLLM reports engine failures in-band and still ends the stream properly.
                self.phase = Phase::Ended;
                self.guard.finish();
                let message = format!("Simulated engine failure after {sent} tokens");
                Some(Ok(self.plan.format.error(&message)))
            }
            StreamFault::End(_) => {
                self.phase = Phase::Ended;
                self.guard.settle();
                None
            }
            StreamFault::Stall(_) => {
                // Dropped by a client that gives up, the guard counts a cancelled stream.
                self.app.shutdown.cancelled().await;
                self.phase = Phase::Ended;
                self.guard.settle();
                Some(Err(aborted("simulator shutting down")))
            }
            StreamFault::Inject(_) => Some(Ok(self.plan.inject.take().unwrap_or_default())),
        })
    }
}

/// Appends one `data:` event to `out`.
pub(super) fn push_sse(out: &mut String, event: &Value) {
    // Writing into a String cannot fail.
    let _ = write!(out, "data: {event}\n\n");
}

pub(super) const DONE: &str = "data: [DONE]\n\n";

/// vLLM's in-stream report of an engine failure (`data: {"error": …}`), then `[DONE]`:
/// it ends a chat or completion stream properly even so.
pub(super) fn error_then_done(message: &str) -> Bytes {
    let mut out = String::new();
    push_sse(
        &mut out,
        &error_json(StatusCode::INTERNAL_SERVER_ERROR, message, None),
    );
    out.push_str(DONE);
    Bytes::from(out)
}

fn aborted(reason: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, reason)
}
