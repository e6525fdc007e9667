//! Server-sent-event streaming of a simulated completion, token by token.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderValue, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use serde_json::{Value, json};

use super::request::Reply;
use super::state::{AppState, SimState};
use super::wire::{error_json, usage_json};

/// A stream-only fault, armed for one response.
#[derive(Clone, Copy, Debug)]
pub(super) enum StreamFault {
    /// Abort the connection after this many token chunks.
    Cut(u32),
    /// Send an error event and `[DONE]` after this many token chunks.
    Error(u32),
    /// End the body cleanly after this many token chunks.
    End(u32),
    /// Send nothing more after this many token chunks, connection open.
    Stall(u32),
    /// Write the plan's `inject` bytes after this many token chunks, then go on.
    Inject(u32),
}

/// Everything needed to stream one completion.
#[derive(Debug)]
pub(super) struct StreamPlan {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub reply: Reply,
    pub include_usage: bool,
    pub continuous_usage: bool,
    pub fault: Option<StreamFault>,
    /// What [`StreamFault::Inject`] writes.
    pub inject: Option<Bytes>,
    pub token_latency: Duration,
}

impl StreamPlan {
    /// A `text/event-stream` response that produces chunks lazily, so latency is real and
    /// a client going away drops the stream (and its [`StreamGuard`]) mid-way.
    pub fn into_response(self, state: AppState) -> Response {
        let stream = StreamState {
            guard: StreamGuard {
                sim: state.sim.clone(),
                settled: false,
            },
            plan: self,
            phase: Phase::Role,
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
    /// The opening `{"role":"assistant","content":""}` chunk.
    Role,
    /// Token chunks; the payload is how many were already sent.
    Token(u32),
    /// The empty-delta chunk carrying `finish_reason`.
    Finish,
    /// The `"choices":[]` chunk carrying final usage.
    Usage,
    /// `data: [DONE]`.
    Done,
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
        let reply = self.plan.reply;
        loop {
            match self.phase {
                Phase::Role => {
                    self.phase = Phase::Token(0);
                    let delta = json!({"role": "assistant", "content": ""});
                    return Some(Ok(self.chunk(delta, None, 0)));
                }
                Phase::Token(sent) => {
                    if let Some(event) = self.fault_event(sent).await {
                        return event;
                    }
                    if sent >= reply.completion_tokens {
                        self.phase = Phase::Finish;
                        continue;
                    }
                    if !self.app.pause(self.plan.token_latency).await {
                        // Shutting down: abort like a killed server would.
                        self.phase = Phase::Ended;
                        self.guard.settle();
                        return Some(Err(aborted("simulator shutting down")));
                    }
                    let text = reply.token_text(sent);
                    let field = if reply.is_reasoning(sent) {
                        "reasoning_content"
                    } else {
                        "content"
                    };
                    self.phase = Phase::Token(sent + 1);
                    self.app.sim.add_tokens_sent(1);
                    return Some(Ok(self.chunk(json!({ field: text }), None, sent + 1)));
                }
                Phase::Finish => {
                    self.phase = if self.plan.include_usage {
                        Phase::Usage
                    } else {
                        Phase::Done
                    };
                    let finish = Some(reply.finish_reason);
                    return Some(Ok(self.chunk(json!({}), finish, reply.completion_tokens)));
                }
                Phase::Usage => {
                    self.phase = Phase::Done;
                    let mut usage = self.envelope(Vec::new());
                    usage["usage"] = usage_json(reply.prompt_tokens, reply.completion_tokens);
                    return Some(Ok(sse(&usage)));
                }
                Phase::Done => {
                    self.phase = Phase::Ended;
                    self.guard.finish();
                    return Some(Ok(Bytes::from_static(b"data: [DONE]\n\n")));
                }
                Phase::Ended => return None,
            }
        }
    }

    /// What the armed fault emits once `sent` token chunks are out: `None` while it is
    /// not due, else the stream's next item (`None` inside meaning "end the body").
    /// A threshold beyond the reply length fires after the last token, before the finish.
    async fn fault_event(&mut self, sent: u32) -> Option<Option<io::Result<Bytes>>> {
        let fault = self.plan.fault?;
        let after = match fault {
            StreamFault::Cut(after)
            | StreamFault::Error(after)
            | StreamFault::End(after)
            | StreamFault::Stall(after)
            | StreamFault::Inject(after) => after,
        };
        if sent < after.min(self.plan.reply.completion_tokens) {
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
                // vLLM reports engine failures in-band, then still terminates with [DONE].
                self.phase = Phase::Done;
                let message = format!("Simulated engine failure after {sent} tokens");
                let error = error_json(StatusCode::INTERNAL_SERVER_ERROR, &message, None);
                Some(Ok(sse(&error)))
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

    /// A `chat.completion.chunk` with one choice; with continuous usage stats it also
    /// carries usage counting `completion_tokens` generated so far.
    fn chunk(&self, delta: Value, finish_reason: Option<&str>, completion_tokens: u32) -> Bytes {
        let mut chunk = self.envelope(vec![json!({
            "index": 0,
            "delta": delta,
            "logprobs": null,
            "finish_reason": finish_reason,
            "stop_reason": null,
        })]);
        if self.plan.continuous_usage {
            chunk["usage"] = usage_json(self.plan.reply.prompt_tokens, completion_tokens);
        }
        sse(&chunk)
    }

    fn envelope(&self, choices: Vec<Value>) -> Value {
        json!({
            "id": self.plan.id,
            "object": "chat.completion.chunk",
            "created": self.plan.created,
            "model": self.plan.model,
            "choices": choices,
        })
    }
}

fn sse(event: &Value) -> Bytes {
    Bytes::from(format!("data: {event}\n\n"))
}

fn aborted(reason: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, reason)
}
