//! Simulated STEP3-VL backend: an in-process stand-in for vLLM's OpenAI-compatible
//! server, with scriptable faults, used by `serve --demo`, integration tests and benchmarks.
//!
//! The simulator speaks the subset of vLLM's API the gateway relies on: `GET /health`,
//! `GET /v1/models` and `POST /v1/chat/completions` (JSON and SSE streaming, with
//! `stream_options.include_usage` / `continuous_usage_stats` and STEP3-VL's
//! `reasoning_content`). Replies are deterministic apart from ids and timestamps; see
//! [`SimulatorConfig`] for the knobs and [`Fault`] for scripted misbehaviour.

mod handlers;
mod raw;
mod request;
mod stream;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::http::HeaderMap;
use axum::serve::ListenerExt;
use bytes::Bytes;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The model name the simulator serves unless configured otherwise.
pub const DEFAULT_MODEL: &str = "stepfun-ai/Step3-VL-10B";

/// Context window reported by `/v1/models` and enforced on requests (STEP3-VL-10B's).
pub const DEFAULT_MAX_MODEL_LEN: u32 = 65_536;

/// How the simulated backend behaves when no [`Fault`] is queued.
#[derive(Clone, Debug)]
pub struct SimulatorConfig {
    /// The served model name; requests naming another model get vLLM's 404.
    pub model: String,
    /// Delay before each streamed token; non-streaming replies wait `n * token_latency`.
    pub token_latency: Duration,
    /// Completion tokens in a reply that `max_tokens` does not cut short.
    pub reply_tokens: u32,
    /// Leading completion tokens emitted as `reasoning_content` (0 disables reasoning).
    pub reasoning_tokens: u32,
    /// When set, `/v1/*` requires `Authorization: Bearer <key>` like `vllm serve --api-key`.
    pub api_key: Option<String>,
    /// Context window: prompt plus completion tokens may not exceed it (vLLM's 400).
    pub max_model_len: u32,
    /// Keep every chat request for [`Simulator::requests`]; benchmarks turn this off so
    /// memory stays flat.
    pub record_requests: bool,
}

impl Default for SimulatorConfig {
    fn default() -> Self {
        Self {
            model: DEFAULT_MODEL.to_owned(),
            token_latency: Duration::ZERO,
            reply_tokens: 24,
            reasoning_tokens: 4,
            api_key: None,
            max_model_len: DEFAULT_MAX_MODEL_LEN,
            record_requests: true,
        }
    }
}

/// One scripted behaviour for the next authorised chat request.
///
/// Faults form a FIFO queue; each `POST /v1/chat/completions` that passes the API-key
/// check pops one (before its body is validated). With the queue empty the simulator
/// behaves normally.
#[derive(Clone, Debug)]
pub enum Fault {
    /// Reply with this status and body (`content-type: application/json`).
    Status { status: u16, body: String },
    /// Wait this long before answering normally (slow first byte).
    Delay(Duration),
    /// Abort the connection without sending a status line: the client sees a
    /// connection error, never a response.
    DropConnection,
    /// Streaming only: send this many token chunks, then abort the connection mid-body
    /// (no finish chunk, no usage, no `[DONE]`, no chunked-encoding terminator).
    /// A non-streaming request consumes the fault and is answered normally.
    StreamCutAfter(u32),
    /// Streaming only: after this many token chunks send vLLM's in-stream error event
    /// (`data: {"error":{..., "type":"InternalServerError", "code":500}}`) followed by
    /// `data: [DONE]`, as vLLM does when the engine fails mid-generation.
    /// A non-streaming request consumes the fault and is answered normally.
    StreamErrorAfter(u32),
    /// Streaming only: send this many token chunks, then end the body cleanly without a
    /// finish chunk or `[DONE]` (an upstream that stops early but closes politely).
    /// A non-streaming request consumes the fault and is answered normally.
    StreamEndAfter(u32),
    /// Behave like an upstream without usage support: ignore `stream_options` when
    /// streaming, omit the `usage` field otherwise.
    NoUsage,
    /// Reply with exactly this status, `content-type` and body: an HTML error page from a
    /// proxy in front of the model server, or a 200 whose body is not JSON.
    Raw {
        status: u16,
        content_type: String,
        body: String,
    },
    /// Streaming: send this many token chunks, then nothing more while keeping the
    /// connection open. Non-streaming: the headers and the first half of the JSON answer,
    /// then nothing more. Either way the body only ends when the client hangs up (then
    /// the stream counts as cancelled) or the simulator stops.
    StreamStallAfter(u32),
    /// Non-streaming only: the headers and this many bytes of the JSON answer, then abort
    /// the connection. A streaming request consumes the fault and is answered normally.
    JsonCutAfter(usize),
    /// Streaming only: after this many token chunks write `raw` into the body verbatim
    /// (junk lines, comments, a `data:` line that is not JSON), then go on normally.
    /// A non-streaming request consumes the fault and is answered normally.
    StreamInject { after: u32, raw: String },
    /// A 200 far larger than any real answer, made as it is sent (chunked, no length):
    /// non-streaming, a JSON answer of this many bytes; streaming, the role chunk and then
    /// one `data:` line of this many bytes that never gets its newline. `u64::MAX` is
    /// endless. Bytes handed to the body count in [`SimStats::fault_bytes_sent`].
    Oversized(u64),
    /// A 200 whose body never ends, one byte per interval: non-streaming, a JSON answer;
    /// streaming, the role chunk and then an event that never completes. Bytes handed to
    /// the body count in [`SimStats::fault_bytes_sent`].
    Trickle(Duration),
    /// A 502 `text/html` proxy page that never ends, one byte per interval (counted in
    /// [`SimStats::fault_bytes_sent`]).
    TrickleErrorPage(Duration),
}

/// What the simulator saw of one chat request.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub headers: HeaderMap,
    /// The parsed JSON body, or `Value::Null` when the body was not valid JSON.
    pub body: serde_json::Value,
    /// The body exactly as received, to check byte-for-byte forwarding.
    pub raw_body: Bytes,
}

/// Counters since the simulator was created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Every `POST /v1/chat/completions` received, including rejected ones.
    pub chat_requests: u64,
    /// Tokens actually handed to the HTTP body: one per streamed token chunk, or the whole
    /// completion for a JSON reply.
    pub completion_tokens_sent: u64,
    /// Streams that yielded `data: [DONE]`.
    pub streams_finished: u64,
    /// Streams whose body was dropped before `[DONE]` because the client went away.
    /// Streams ended by a [`Fault`] or by shutdown are not counted (a stalled stream the
    /// client leaves is).
    pub streams_cancelled: u64,
    /// Bytes of [`Fault::Oversized`] and [`Fault::Trickle`] bodies handed to the HTTP body.
    pub fault_bytes_sent: u64,
}

#[derive(Default)]
struct Counters {
    chat_requests: AtomicU64,
    completion_tokens_sent: AtomicU64,
    streams_finished: AtomicU64,
    streams_cancelled: AtomicU64,
    fault_bytes_sent: AtomicU64,
}

struct Inner {
    config: SimulatorConfig,
    faults: Mutex<VecDeque<Fault>>,
    requests: Mutex<Vec<RecordedRequest>>,
    counters: Counters,
}

impl Inner {
    /// Counts a chat request and, if recording, keeps a copy (`body` is `None` when the
    /// raw body was not valid JSON).
    fn record(&self, headers: &HeaderMap, body: Option<&serde_json::Value>, raw_body: &Bytes) {
        self.counters.chat_requests.fetch_add(1, Ordering::Relaxed);
        if !self.config.record_requests {
            return;
        }
        let request = RecordedRequest {
            headers: headers.clone(),
            body: body.cloned().unwrap_or_default(),
            raw_body: raw_body.clone(),
        };
        // A panicking test thread must not hide later requests, so ignore poisoning.
        self.requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(request);
    }

    fn pop_fault(&self) -> Option<Fault> {
        self.faults
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop_front()
    }

    fn add_tokens_sent(&self, tokens: u32) {
        self.counters
            .completion_tokens_sent
            .fetch_add(u64::from(tokens), Ordering::Relaxed);
    }
}

/// A simulated vLLM server; cheap to clone, all clones share queue, records and counters.
#[derive(Clone)]
pub struct Simulator {
    inner: Arc<Inner>,
}

impl Simulator {
    pub fn new(config: SimulatorConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                faults: Mutex::new(VecDeque::new()),
                requests: Mutex::new(Vec::new()),
                counters: Counters::default(),
            }),
        }
    }

    pub fn config(&self) -> &SimulatorConfig {
        &self.inner.config
    }

    /// The simulator's routes, sharing state with `self`, for callers that serve it
    /// themselves. Streams served this way are never interrupted by a shutdown signal.
    pub fn router(&self) -> Router {
        handlers::router(self.inner.clone(), CancellationToken::new())
    }

    /// Binds `addr` (port 0 picks a free one) and serves in a background task.
    pub async fn spawn(self, addr: SocketAddr) -> io::Result<RunningSimulator> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        // Without TCP_NODELAY, Nagle delays small SSE chunks and distorts latency figures.
        let listener = listener.tap_io(|tcp| {
            if let Err(err) = tcp.set_nodelay(true) {
                tracing::debug!(%err, "simulator: failed to set TCP_NODELAY");
            }
        });
        let shutdown = CancellationToken::new();
        let app = handlers::router(self.inner.clone(), shutdown.clone());
        let signal = shutdown.clone().cancelled_owned();
        let task = tokio::spawn(async move {
            if let Err(err) = axum::serve(listener, app)
                .with_graceful_shutdown(signal)
                .await
            {
                tracing::error!(%err, "simulator: server failed");
            }
        });
        tracing::debug!(%addr, "simulator: listening");
        Ok(RunningSimulator {
            addr,
            simulator: self,
            shutdown,
            task: Some(task),
        })
    }

    pub fn push_fault(&self, fault: Fault) {
        self.inner
            .faults
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push_back(fault);
    }

    /// Every chat request received so far, oldest first (empty if recording is off).
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.inner
            .requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn stats(&self) -> SimStats {
        let c = &self.inner.counters;
        SimStats {
            chat_requests: c.chat_requests.load(Ordering::Relaxed),
            completion_tokens_sent: c.completion_tokens_sent.load(Ordering::Relaxed),
            streams_finished: c.streams_finished.load(Ordering::Relaxed),
            streams_cancelled: c.streams_cancelled.load(Ordering::Relaxed),
            fault_bytes_sent: c.fault_bytes_sent.load(Ordering::Relaxed),
        }
    }
}

/// A simulator serving on a socket. Dropping it signals shutdown without waiting.
pub struct RunningSimulator {
    pub addr: SocketAddr,
    pub simulator: Simulator,
    shutdown: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl RunningSimulator {
    /// Base URL without a trailing slash; a wildcard bind address is reported as loopback
    /// so the URL is always connectable.
    pub fn url(&self) -> String {
        let ip = match self.addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        format!("http://{}", SocketAddr::new(ip, self.addr.port()))
    }

    /// Stops accepting connections, ends in-flight streams and delays, and waits for
    /// the server task to finish.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take()
            && let Err(err) = task.await
        {
            tracing::error!(%err, "simulator: server task failed");
        }
    }
}

impl Drop for RunningSimulator {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
