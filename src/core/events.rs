//! The events port: what the gate tells whoever watches it (the metrics exporter) about
//! the calls it admits, refuses and settles. The gate says what happened; it does not know
//! who listens or how it is shown.

use std::time::Duration;

/// Which door a call came through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Door {
    Rest,
    Grpc,
}

impl Door {
    pub fn as_str(self) -> &'static str {
        match self {
            Door::Rest => "rest",
            Door::Grpc => "grpc",
        }
    }
}

/// What a settled call reports.
#[derive(Debug)]
pub struct SettledCall<'a> {
    pub door: Door,
    /// The model as a bounded label: a configured name, or `other`.
    pub model: &'a str,
    pub outcome: &'a str,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub images: u64,
    pub total: Duration,
    /// The gateway's own share; `None` when the call never reached a model server.
    pub overhead: Option<Duration>,
}

/// Receives the gate's events. Called on the request path: implementations must be cheap
/// and must not block.
pub trait GateEvents: Send + Sync + std::fmt::Debug + 'static {
    /// A call was admitted and is now in flight.
    fn call_started(&self, door: Door);
    /// An admitted call settled (it is no longer in flight).
    fn call_settled(&self, call: &SettledCall<'_>);
    /// An admitted call was refused before it was forwarded, because its reservation could
    /// not be made durable: it is no longer in flight, and it does not settle.
    fn call_withdrawn(&self, door: Door);
    /// The first chunk of a stream reached the gate, `after` the call began.
    fn first_chunk(&self, door: Door, model: &str, after: Duration);
    /// The gate refused a call before it reached a model server; `reason` is a short label.
    fn refused(&self, reason: &'static str);
}

/// Events nobody watches (tools and tests that need a gate without metrics).
#[derive(Clone, Copy, Debug, Default)]
pub struct Unwatched;

impl GateEvents for Unwatched {
    fn call_started(&self, _: Door) {}
    fn call_settled(&self, _: &SettledCall<'_>) {}
    fn call_withdrawn(&self, _: Door) {}
    fn first_chunk(&self, _: Door, _: &str, _: Duration) {}
    fn refused(&self, _: &'static str) {}
}
