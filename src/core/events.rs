//! The events port: what the gate tells whoever watches it (the metrics exporter, the
//! alerts) about the calls it admits, refuses and settles. The gate says what happened; it
//! does not know who listens or how it is shown.

use std::net::IpAddr;
use std::sync::Arc;
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
    /// The HTTP status the client was told (the model server's own when it answered).
    pub status: u16,
    pub stream: bool,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub images: u64,
    /// What the call cost, in nano-units of the configured currency.
    pub cost_nanos: u64,
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
    /// A secret (a client key or the admin token) was refused, from `client` when the door
    /// knows the address. Reported besides [`GateEvents::refused`]; watchers that do not
    /// follow addresses ignore it.
    fn auth_failed(&self, _client: Option<IpAddr>) {}
    /// A key's use of one of its quotas reached a share the gate was asked to report
    /// ([`crate::core::GateSettings::quota_alert_percents`]).
    fn quota_crossed(&self, _crossing: &QuotaCrossing<'_>) {}
}

/// A key whose use of a quota reached `percent` of it.
#[derive(Debug)]
pub struct QuotaCrossing<'a> {
    pub key_id: &'a str,
    pub key_name: &'a str,
    pub user_id: &'a str,
    /// `requests`, `tokens` or `images`.
    pub what: &'static str,
    pub percent: u8,
    pub used: u64,
    pub quota: u64,
}

/// Several watchers, each told every event in turn.
#[derive(Debug, Default)]
pub struct Watchers(pub Vec<Arc<dyn GateEvents>>);

impl GateEvents for Watchers {
    fn call_started(&self, door: Door) {
        self.0.iter().for_each(|w| w.call_started(door));
    }
    fn call_settled(&self, call: &SettledCall<'_>) {
        self.0.iter().for_each(|w| w.call_settled(call));
    }
    fn call_withdrawn(&self, door: Door) {
        self.0.iter().for_each(|w| w.call_withdrawn(door));
    }
    fn first_chunk(&self, door: Door, model: &str, after: Duration) {
        self.0
            .iter()
            .for_each(|w| w.first_chunk(door, model, after));
    }
    fn refused(&self, reason: &'static str) {
        self.0.iter().for_each(|w| w.refused(reason));
    }
    fn auth_failed(&self, client: Option<IpAddr>) {
        self.0.iter().for_each(|w| w.auth_failed(client));
    }
    fn quota_crossed(&self, crossing: &QuotaCrossing<'_>) {
        self.0.iter().for_each(|w| w.quota_crossed(crossing));
    }
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
