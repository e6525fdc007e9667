//! Simulated STEP3-VL backend: an in-process stand-in for vLLM's OpenAI-compatible
//! server, with scriptable faults, used by `serve --demo`, integration tests and benchmarks.
//!
//! The simulator speaks the part of vLLM's API the gateway forwards: `GET /health`,
//! `GET /v1/models`, `POST /v1/chat/completions` (JSON and SSE, `n` choices, tool calls,
//! STEP3-VL's `reasoning_content` and `chat_template_kwargs.enable_thinking`,
//! `stream_options.include_usage` / `continuous_usage_stats`), `POST /v1/completions`,
//! `POST /v1/responses` (named SSE events) and, when it has an embedding model,
//! `POST /v1/embeddings`. Answers are deterministic apart from ids and timestamps and
//! follow the question (its topic, its images, a simple sum, a tool's result); see
//! [`SimulatorConfig`] for the knobs and [`Fault`] for scripted misbehaviour.
//!
//! Module layering, each importing only modules further down: `handlers` (routes, auth,
//! faults) → `raw` and the APIs `chat`, `completions`, `responses`, `embeddings` →
//! `stream`, `reply`, `models` → `answer` → `prompt`; at the bottom `state`, `wire`,
//! `config`, `fault`. This file is the public face and only puts `handlers` on a socket.

mod answer;
mod chat;
mod completions;
mod config;
mod embeddings;
mod fault;
mod handlers;
mod models;
mod prompt;
mod raw;
mod reply;
mod responses;
#[cfg(test)]
mod sdk_tests;
mod state;
mod stream;
#[cfg(test)]
mod tests;
mod wire;

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use axum::Router;
use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use config::{
    DEFAULT_EMBEDDING_DIMENSIONS, DEFAULT_EMBEDDING_MODEL, DEFAULT_MAX_MODEL_LEN, DEFAULT_MODEL,
    EMBEDDING_MAX_MODEL_LEN, SimulatorConfig,
};
pub use fault::Fault;
use state::SimState;
pub use state::{RecordedRequest, SimStats};

/// A simulated vLLM server; cheap to clone, all clones share queue, records and counters.
#[derive(Clone)]
pub struct Simulator {
    inner: Arc<SimState>,
}

impl Simulator {
    pub fn new(config: SimulatorConfig) -> Self {
        Self {
            inner: Arc::new(SimState::new(config)),
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
        self.inner.push_fault(fault);
    }

    /// Every POST received so far, on any route, oldest first (empty if recording is off).
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.inner.requests()
    }

    pub fn stats(&self) -> SimStats {
        self.inner.stats()
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
