//! What every route shares: the configuration, the fault queue, recorded requests and
//! counters, plus the shutdown signal of the server the routes run in.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::http::HeaderMap;
use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use super::config::SimulatorConfig;
use super::fault::Fault;

/// The route [`SimStats::chat_requests`] counts.
pub(super) const CHAT_PATH: &str = "/v1/chat/completions";

/// What the simulator saw of one POST request.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    /// The route it was sent to, e.g. `/v1/chat/completions`.
    pub path: &'static str,
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
    /// Every POST received on any route, including rejected ones.
    pub requests: u64,
    /// Tokens actually handed to the HTTP body: one per streamed token chunk, or the whole
    /// completion (all choices) for a JSON reply. Embeddings generate none.
    pub completion_tokens_sent: u64,
    /// Streams that ended properly: `data: [DONE]` (also after an in-stream error), or a
    /// Responses stream's `response.completed` or `error` event.
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
    requests: AtomicU64,
    completion_tokens_sent: AtomicU64,
    streams_finished: AtomicU64,
    streams_cancelled: AtomicU64,
    fault_bytes_sent: AtomicU64,
}

/// The state all clones of a `Simulator` share.
pub(super) struct SimState {
    pub config: SimulatorConfig,
    faults: Mutex<VecDeque<Fault>>,
    requests: Mutex<Vec<RecordedRequest>>,
    counters: Counters,
}

impl SimState {
    pub fn new(config: SimulatorConfig) -> Self {
        Self {
            config,
            faults: Mutex::new(VecDeque::new()),
            requests: Mutex::new(Vec::new()),
            counters: Counters::default(),
        }
    }

    /// Counts a POST to `path` and, if recording, keeps a copy (`body` is `None` when the
    /// raw body was not valid JSON).
    pub fn record(
        &self,
        path: &'static str,
        headers: &HeaderMap,
        body: Option<&serde_json::Value>,
        raw_body: &Bytes,
    ) {
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        if path == CHAT_PATH {
            self.counters.chat_requests.fetch_add(1, Ordering::Relaxed);
        }
        if !self.config.record_requests {
            return;
        }
        let request = RecordedRequest {
            path,
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

    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn push_fault(&self, fault: Fault) {
        self.faults
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push_back(fault);
    }

    pub fn pop_fault(&self) -> Option<Fault> {
        self.faults
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop_front()
    }

    pub fn add_tokens_sent(&self, tokens: u32) {
        self.counters
            .completion_tokens_sent
            .fetch_add(u64::from(tokens), Ordering::Relaxed);
    }

    pub fn add_fault_bytes_sent(&self, bytes: usize) {
        self.counters
            .fault_bytes_sent
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub fn count_stream_finished(&self) {
        self.counters
            .streams_finished
            .fetch_add(1, Ordering::Relaxed);
    }

    pub fn count_stream_cancelled(&self) {
        self.counters
            .streams_cancelled
            .fetch_add(1, Ordering::Relaxed);
    }

    pub fn stats(&self) -> SimStats {
        let c = &self.counters;
        SimStats {
            chat_requests: c.chat_requests.load(Ordering::Relaxed),
            requests: c.requests.load(Ordering::Relaxed),
            completion_tokens_sent: c.completion_tokens_sent.load(Ordering::Relaxed),
            streams_finished: c.streams_finished.load(Ordering::Relaxed),
            streams_cancelled: c.streams_cancelled.load(Ordering::Relaxed),
            fault_bytes_sent: c.fault_bytes_sent.load(Ordering::Relaxed),
        }
    }
}

/// Per-router state: the shared simulator plus the shutdown signal of the server it runs in.
#[derive(Clone)]
pub(super) struct AppState {
    pub sim: Arc<SimState>,
    pub shutdown: CancellationToken,
}

impl AppState {
    /// Sleeps for `duration`; `false` if the server began shutting down meanwhile.
    pub async fn pause(&self, duration: Duration) -> bool {
        if duration.is_zero() {
            return true;
        }
        tokio::select! {
            () = tokio::time::sleep(duration) => true,
            () = self.shutdown.cancelled() => false,
        }
    }
}
