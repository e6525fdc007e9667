//! Prometheus metrics: one `prometheus_client` registry per gateway (no global registry, so
//! several gateways can live in one process), rendered in the Prometheus text format.
//!
//! Every label value is bounded: doors and outcomes are enums, routes are the router's
//! patterns or known gRPC methods, models are those named in the configuration (else
//! `other`), backends are configured names. No label ever carries a key or a secret.

use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use prometheus_client::encoding::{
    EncodeLabelSet, EncodeLabelValue, LabelValueEncoder, prometheus_text,
};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::core::events::{Door, GateEvents, SettledCall};
use crate::core::notifier::DeliveryFigures;
use crate::core::usage_sink::StoreFigures;

/// The `content-type` of [`Metrics::render`]'s text (Prometheus text format 0.0.4).
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Seconds; the whole call, from milliseconds to the longest streams.
const CALL_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
];
/// Seconds; the gateway's own share of a call, microseconds to milliseconds.
const OVERHEAD_BUCKETS: &[f64] = &[
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1,
];

/// A label value learnt at run time (a route, a model, a status, an outcome), stored once and
/// shared by every series that carries it: finding a series clones a reference, never a
/// string.
///
/// Invariant: made only by [`Labels::get`], so within one [`Metrics`] equal texts are one
/// allocation; a series is therefore found by hashing and comparing an address (one word),
/// not the text.
#[derive(Clone, Debug)]
struct Label(Arc<str>);

impl PartialEq for Label {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Label {}

impl Hash for Label {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_usize(Arc::as_ptr(&self.0).cast::<u8>().addr());
    }
}

impl EncodeLabelValue for Label {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&&*self.0, encoder)
    }
}

impl EncodeLabelValue for Door {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

/// Every label value seen, each kept once; it grows only as far as the values are bounded.
/// FNV rather than the default keyed hash: the values are few, short and the gateway's own
/// (never a client's text), and this lookup runs several times per call.
#[derive(Debug, Default)]
struct Labels(RwLock<HashSet<Arc<str>, fnv::FnvBuildHasher>>);

impl Labels {
    fn get(&self, value: &str) -> Label {
        let known = self.0.read().unwrap_or_else(PoisonError::into_inner);
        if let Some(found) = known.get(value) {
            return Label(found.clone());
        }
        drop(known);
        let mut known = self.0.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(found) = known.get(value) {
            return Label(found.clone());
        }
        let new: Arc<str> = Arc::from(value);
        known.insert(new.clone());
        Label(new)
    }
}

// Label sets: the fields' order is the labels' order in the text.

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    door: Door,
    route: Label,
    model: Label,
    status: Label,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CallLabels {
    door: Door,
    model: Label,
    outcome: Label,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RouteLabels {
    door: Door,
    route: Label,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DoorModelLabels {
    door: Door,
    model: Label,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TokenLabels {
    kind: &'static str,
    model: Label,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ModelLabels {
    model: Label,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CrossingLabels {
    what: &'static str,
    percent: u8,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RefusalLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DoorLabels {
    door: Door,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BackendLabels {
    backend: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BackendErrorLabels {
    backend: String,
    kind: &'static str,
}

/// A backend's figures at scrape time (the pool's own state).
#[derive(Clone, Debug)]
pub struct BackendFigures {
    pub name: String,
    pub healthy: bool,
    pub in_flight: u32,
    pub errors: u64,
}

/// The response cache's figures at scrape time.
#[derive(Clone, Copy, Debug, Default)]
pub struct CacheFigures {
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
    pub bytes: u64,
    pub entries: u64,
}

/// One gateway's metrics. The families below are handles on the series in `registry`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    labels: Labels,
    /// The route of every chat call's duration, looked up once.
    chat: Label,
    requests: Family<RequestLabels, Counter>,
    calls: Family<CallLabels, Counter>,
    request_duration: Family<RouteLabels, Histogram>,
    overhead: Family<RouteLabels, Histogram>,
    ttft: Family<DoorModelLabels, Histogram>,
    tokens: Family<TokenLabels, Counter>,
    images: Family<ModelLabels, Counter>,
    refusals: Family<RefusalLabels, Counter>,
    /// Nano-units of the configured currency charged, by model.
    spend: Family<ModelLabels, Counter>,
    quota_crossings: Family<CrossingLabels, Counter>,
    /// Both doors' series, made at start so that an idle door shows 0.
    in_flight: [Gauge; 2],
}

impl Default for Metrics {
    fn default() -> Self {
        let labels = Labels::default();
        let chat = labels.get("chat");
        let requests = Family::default();
        let calls = Family::default();
        let request_duration = Family::new_with_constructor(call_histogram as fn() -> Histogram);
        let overhead = Family::new_with_constructor(overhead_histogram as fn() -> Histogram);
        let ttft = Family::new_with_constructor(call_histogram as fn() -> Histogram);
        let tokens = Family::default();
        let images = Family::default();
        let refusals = Family::default();
        let spend = Family::default();
        let quota_crossings = Family::default();
        let in_flight = Family::<DoorLabels, Gauge>::default();
        let in_flight_by_door = [Door::Rest, Door::Grpc]
            .map(|door| in_flight.get_or_create(&DoorLabels { door }).clone());

        // Names of counters go without `_total` and help texts without their full stop: the
        // encoder adds the one and the registry the other.
        let mut registry = Registry::default();
        registry.register(
            "step3gw_requests",
            "Requests answered, by door, route, model and status",
            requests.clone(),
        );
        registry.register(
            "step3gw_calls",
            "Chat calls settled, by door, model and outcome",
            calls.clone(),
        );
        registry.register(
            "step3gw_request_duration_seconds",
            "Request time (chat: the whole call, stream included)",
            request_duration.clone(),
        );
        registry.register(
            "step3gw_gateway_overhead_seconds",
            "The gateway's own share of a chat call: total minus model-server time",
            overhead.clone(),
        );
        registry.register(
            "step3gw_time_to_first_token_seconds",
            "From the request to the first streamed chunk",
            ttft.clone(),
        );
        registry.register(
            "step3gw_tokens",
            "Tokens charged, by kind (prompt, completion) and model",
            tokens.clone(),
        );
        registry.register("step3gw_images", "Images charged, by model", images.clone());
        registry.register(
            "step3gw_refusals",
            "Calls refused by the gateway, by reason",
            refusals.clone(),
        );
        registry.register(
            "step3gw_spend_nanos",
            "What calls cost, in nano-units (1e-9) of the configured currency, by model",
            spend.clone(),
        );
        registry.register(
            "step3gw_quota_crossings",
            "Shares of a key's quota or budget reached (quota_alert_percents), by what and percent",
            quota_crossings.clone(),
        );
        registry.register(
            "step3gw_in_flight",
            "Chat calls in flight, by door",
            in_flight,
        );
        Metrics {
            registry,
            labels,
            chat,
            requests,
            calls,
            request_duration,
            overhead,
            ttft,
            tokens,
            images,
            refusals,
            spend,
            quota_crossings,
            in_flight: in_flight_by_door,
        }
    }
}

fn call_histogram() -> Histogram {
    Histogram::new(CALL_BUCKETS.iter().copied())
}

fn overhead_histogram() -> Histogram {
    Histogram::new(OVERHEAD_BUCKETS.iter().copied())
}

fn door_index(door: Door) -> usize {
    match door {
        Door::Rest => 0,
        Door::Grpc => 1,
    }
}

impl Metrics {
    /// A request answered by either door (for a stream: when its answer began).
    pub fn request(&self, door: Door, route: &str, model: &str, status: &str) {
        let labels = RequestLabels {
            door,
            route: self.labels.get(route),
            model: self.labels.get(model),
            status: self.labels.get(status),
        };
        self.requests.get_or_create(&labels).inc();
    }

    /// How long a request took (for chat calls: the whole call, stream included).
    pub fn request_duration(&self, door: Door, route: &str, took: Duration) {
        self.observe_duration(door, self.labels.get(route), took);
    }

    fn observe_duration(&self, door: Door, route: Label, took: Duration) {
        self.request_duration
            .get_or_create(&RouteLabels { door, route })
            .observe(took.as_secs_f64());
    }

    /// A settled chat call: its outcome, tokens, images, and the gateway's own time in it.
    pub fn call_settled(&self, settled: &SettledCall<'_>) {
        let door = settled.door;
        let model = self.labels.get(settled.model);
        let outcome = self.labels.get(settled.outcome);
        self.calls
            .get_or_create(&CallLabels {
                door,
                model: model.clone(),
                outcome,
            })
            .inc();
        for (kind, amount) in [
            ("prompt", settled.prompt_tokens),
            ("completion", settled.completion_tokens),
        ] {
            if amount > 0 {
                self.tokens
                    .get_or_create(&TokenLabels {
                        kind,
                        model: model.clone(),
                    })
                    .inc_by(amount);
            }
        }
        if settled.images > 0 {
            self.images
                .get_or_create(&ModelLabels {
                    model: model.clone(),
                })
                .inc_by(settled.images);
        }
        if settled.cost_nanos > 0 {
            self.spend
                .get_or_create(&ModelLabels { model })
                .inc_by(settled.cost_nanos);
        }
        self.observe_duration(door, self.chat.clone(), settled.total);
        if let Some(overhead) = settled.overhead {
            self.overhead
                .get_or_create(&RouteLabels {
                    door,
                    route: self.chat.clone(),
                })
                .observe(overhead.as_secs_f64());
        }
    }

    /// The first chunk of a stream reached the gateway.
    pub fn time_to_first_token(&self, door: Door, model: &str, took: Duration) {
        self.ttft
            .get_or_create(&DoorModelLabels {
                door,
                model: self.labels.get(model),
            })
            .observe(took.as_secs_f64());
    }

    /// A call refused before it reached a model server.
    pub fn refusal(&self, reason: &'static str) {
        self.refusals.get_or_create(&RefusalLabels { reason }).inc();
    }

    pub fn call_started(&self, door: Door) {
        if let Some(gauge) = self.in_flight.get(door_index(door)) {
            gauge.inc();
        }
    }

    pub fn call_ended(&self, door: Door) {
        if let Some(gauge) = self.in_flight.get(door_index(door)) {
            gauge.dec();
        }
    }

    /// The Prometheus text exposition of everything, plus the figures read at scrape time.
    pub fn render(&self, backends: &[BackendFigures], store: &StoreFigures) -> String {
        self.render_with_deliveries(backends, store, &[], None)
    }

    /// [`Metrics::render`] with the alerts' delivery counts by channel.
    pub fn render_with_deliveries(
        &self,
        backends: &[BackendFigures],
        store: &StoreFigures,
        deliveries: &[DeliveryFigures],
        cache: Option<CacheFigures>,
    ) -> String {
        let mut out = String::with_capacity(8192);
        // Writing into a `String` cannot fail, and no value here is one the encoder refuses.
        let _ = prometheus_text::encode(&mut out, &self.registry);
        let mut scraped = scrape_registry(backends, store);
        register_deliveries(&mut scraped, deliveries);
        if let Some(cache) = cache {
            register_cache(&mut scraped, cache);
        }
        let _ = prometheus_text::encode(&mut out, &scraped);
        out
    }
}

/// The figures that others own (the pool, the usage writer), in a registry made for one
/// scrape: a backend gone from the configuration is gone from the next scrape.
fn scrape_registry(backends: &[BackendFigures], store: &StoreFigures) -> Registry {
    let healthy = Family::<BackendLabels, Gauge>::default();
    let in_flight = Family::<BackendLabels, Gauge>::default();
    let errors = Family::<BackendErrorLabels, Counter>::default();
    for b in backends {
        let labels = BackendLabels {
            backend: b.name.clone(),
        };
        healthy.get_or_create(&labels).set(i64::from(b.healthy));
        in_flight.get_or_create(&labels).set(i64::from(b.in_flight));
        errors
            .get_or_create(&BackendErrorLabels {
                backend: b.name.clone(),
                kind: "any",
            })
            .inc_by(b.errors);
    }
    let mut registry = Registry::default();
    registry.register(
        "step3gw_backend_healthy",
        "Whether a backend takes calls (1) or not (0)",
        healthy,
    );
    registry.register(
        "step3gw_backend_in_flight",
        "Calls in flight on a backend",
        in_flight,
    );
    registry.register(
        "step3gw_backend_errors",
        "Connect errors, resets, timeouts and 5xx of a backend",
        errors,
    );
    registry.register(
        "step3gw_store_write_backlog",
        "Finished calls queued for the store",
        ConstGauge::new(store.backlog),
    );
    registry.register(
        "step3gw_store_available",
        "1 while the store takes writes; 0 while it fails and calls are refused",
        ConstGauge::new(i64::from(store.available)),
    );
    if let Some(available) = store.shared_limits_available {
        registry.register(
            "step3gw_shared_limits_available",
            "Several replicas: 1 while the shared limits (Redis) answer; 0 while they do not and keys with a quota are refused",
            ConstGauge::new(i64::from(available)),
        );
    }
    registry.register(
        "step3gw_store_unrecorded_calls",
        "Settled calls held in memory because the store fails",
        ConstGauge::new(store.unrecorded),
    );
    registry.register(
        "step3gw_store_write_failures",
        "Failed store writes and flushes",
        ConstCounter::new(store.failures),
    );
    registry
}

/// The response cache: hits, misses, evictions (to stay within its byte bound), and what
/// it holds.
fn register_cache(registry: &mut Registry, cache: CacheFigures) {
    registry.register(
        "step3gw_cache_hits",
        "Calls answered by the response cache or by an identical call in flight",
        ConstCounter::new(cache.hits),
    );
    registry.register(
        "step3gw_cache_misses",
        "Cacheable calls the response cache could not answer",
        ConstCounter::new(cache.misses),
    );
    registry.register(
        "step3gw_cache_evictions",
        "Answers dropped from the response cache to stay within its size",
        ConstCounter::new(cache.evictions),
    );
    registry.register(
        "step3gw_cache_bytes",
        "Bytes the response cache holds (answers plus a fixed overhead each)",
        ConstGauge::new(i64::try_from(cache.bytes).unwrap_or(i64::MAX)),
    );
    registry.register(
        "step3gw_cache_entries",
        "Answers the response cache holds",
        ConstGauge::new(i64::try_from(cache.entries).unwrap_or(i64::MAX)),
    );
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DeliveryLabels {
    channel: String,
    result: &'static str,
}

/// `step3gw_notifications_total{channel, result}`: sent, failed (after every try) and
/// dropped (the channel's queue was full). Channels are configured names.
fn register_deliveries(registry: &mut Registry, deliveries: &[DeliveryFigures]) {
    if deliveries.is_empty() {
        return;
    }
    let family = Family::<DeliveryLabels, Counter>::default();
    for d in deliveries {
        for (result, n) in [
            ("sent", d.sent),
            ("failed", d.failed),
            ("dropped", d.dropped),
        ] {
            family
                .get_or_create(&DeliveryLabels {
                    channel: d.channel.clone(),
                    result,
                })
                .inc_by(n);
        }
    }
    registry.register(
        "step3gw_notifications",
        "Alert messages by channel and result (sent, failed after every try, dropped)",
        family,
    );
}

impl GateEvents for Metrics {
    fn call_started(&self, door: Door) {
        Metrics::call_started(self, door);
    }

    fn call_settled(&self, call: &SettledCall<'_>) {
        self.call_ended(call.door);
        Metrics::call_settled(self, call);
    }

    fn call_withdrawn(&self, door: Door) {
        self.call_ended(door);
    }

    fn first_chunk(&self, door: Door, model: &str, after: Duration) {
        self.time_to_first_token(door, model, after);
    }

    fn refused(&self, reason: &'static str) {
        self.refusal(reason);
    }

    fn quota_crossed(&self, crossing: &crate::core::events::QuotaCrossing<'_>) {
        self.quota_crossings
            .get_or_create(&CrossingLabels {
                what: crossing.what,
                percent: crossing.percent,
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settled(door: Door, model: &str) -> SettledCall<'_> {
        SettledCall {
            door,
            model,
            outcome: "completed",
            status: 200,
            stream: false,
            prompt_tokens: 5,
            completion_tokens: 7,
            images: 1,
            cost_nanos: 1500,
            total: Duration::from_millis(30),
            overhead: Some(Duration::from_micros(40)),
        }
    }

    fn figures() -> (Vec<BackendFigures>, StoreFigures) {
        (
            vec![BackendFigures {
                name: "gpu-a".into(),
                healthy: true,
                in_flight: 2,
                errors: 1,
            }],
            StoreFigures {
                backlog: 3,
                available: false,
                unrecorded: 2,
                failures: 4,
                shared_limits_available: Some(true),
            },
        )
    }

    #[test]
    fn counters_histograms_and_gauges_render_as_prometheus_text() {
        let metrics = Metrics::default();
        metrics.request(Door::Rest, "/v1/models", "", "200");
        metrics.request(Door::Rest, "/v1/models", "", "200");
        metrics.refusal("quota");
        metrics.call_started(Door::Grpc);
        metrics.call_settled(&settled(Door::Grpc, "m"));
        let (backends, store) = figures();
        let text = metrics.render(&backends, &store);
        for line in [
            "step3gw_requests_total{door=\"rest\",route=\"/v1/models\",model=\"\",status=\"200\"} 2",
            "step3gw_calls_total{door=\"grpc\",model=\"m\",outcome=\"completed\"} 1",
            "step3gw_refusals_total{reason=\"quota\"} 1",
            "step3gw_tokens_total{kind=\"prompt\",model=\"m\"} 5",
            "step3gw_tokens_total{kind=\"completion\",model=\"m\"} 7",
            "step3gw_images_total{model=\"m\"} 1",
            "step3gw_in_flight{door=\"rest\"} 0",
            "step3gw_in_flight{door=\"grpc\"} 1",
            // Go's float format, as Go clients write it (Prometheus 3 stores this form).
            "step3gw_gateway_overhead_seconds_bucket{door=\"grpc\",route=\"chat\",le=\"2.5e-05\"} 0",
            "step3gw_gateway_overhead_seconds_bucket{door=\"grpc\",route=\"chat\",le=\"5e-05\"} 1",
            "step3gw_request_duration_seconds_bucket{door=\"grpc\",route=\"chat\",le=\"0.025\"} 0",
            "step3gw_request_duration_seconds_bucket{door=\"grpc\",route=\"chat\",le=\"0.05\"} 1",
            "step3gw_request_duration_seconds_bucket{door=\"grpc\",route=\"chat\",le=\"+Inf\"} 1",
            "step3gw_request_duration_seconds_sum{door=\"grpc\",route=\"chat\"} 0.03",
            "step3gw_request_duration_seconds_count{door=\"grpc\",route=\"chat\"} 1",
            "step3gw_backend_healthy{backend=\"gpu-a\"} 1",
            "step3gw_backend_in_flight{backend=\"gpu-a\"} 2",
            "step3gw_backend_errors_total{backend=\"gpu-a\",kind=\"any\"} 1",
            "step3gw_store_write_backlog 3",
            "step3gw_store_available 0",
            "step3gw_shared_limits_available 1",
            "step3gw_store_unrecorded_calls 2",
            "step3gw_store_write_failures_total 4",
        ] {
            assert!(text.lines().any(|l| l == line), "no `{line}` in\n{text}");
        }
    }

    /// The names, types and help that the dashboard, the README and Prometheus rely on.
    #[test]
    fn each_metric_is_described_once_with_its_type_and_help() {
        let metrics = Metrics::default();
        metrics.request(Door::Rest, "/v1/models", "", "200");
        metrics.request_duration(Door::Rest, "/v1/models", Duration::from_millis(1));
        metrics.refusal("auth");
        metrics.time_to_first_token(Door::Rest, "m", Duration::from_millis(5));
        metrics.call_settled(&settled(Door::Rest, "m"));
        GateEvents::quota_crossed(
            &metrics,
            &crate::core::events::QuotaCrossing {
                key_id: "key_a",
                key_name: "a",
                user_id: "usr_a",
                what: "budget",
                percent: 80,
                used: 8,
                quota: 10,
            },
        );
        let (backends, store) = figures();
        let text = metrics.render(&backends, &store);
        assert!(
            text.contains("step3gw_quota_crossings_total{what=\"budget\",percent=\"80\"} 1"),
            "{text}"
        );
        let expected = [
            (
                "step3gw_requests_total",
                "counter",
                "Requests answered, by door, route, model and status.",
            ),
            (
                "step3gw_calls_total",
                "counter",
                "Chat calls settled, by door, model and outcome.",
            ),
            (
                "step3gw_request_duration_seconds",
                "histogram",
                "Request time (chat: the whole call, stream included).",
            ),
            (
                "step3gw_gateway_overhead_seconds",
                "histogram",
                "The gateway's own share of a chat call: total minus model-server time.",
            ),
            (
                "step3gw_time_to_first_token_seconds",
                "histogram",
                "From the request to the first streamed chunk.",
            ),
            (
                "step3gw_tokens_total",
                "counter",
                "Tokens charged, by kind (prompt, completion) and model.",
            ),
            (
                "step3gw_images_total",
                "counter",
                "Images charged, by model.",
            ),
            (
                "step3gw_refusals_total",
                "counter",
                "Calls refused by the gateway, by reason.",
            ),
            (
                "step3gw_in_flight",
                "gauge",
                "Chat calls in flight, by door.",
            ),
            (
                "step3gw_backend_healthy",
                "gauge",
                "Whether a backend takes calls (1) or not (0).",
            ),
            (
                "step3gw_backend_in_flight",
                "gauge",
                "Calls in flight on a backend.",
            ),
            (
                "step3gw_backend_errors_total",
                "counter",
                "Connect errors, resets, timeouts and 5xx of a backend.",
            ),
            (
                "step3gw_store_write_backlog",
                "gauge",
                "Finished calls queued for the store.",
            ),
            (
                "step3gw_store_available",
                "gauge",
                "1 while the store takes writes; 0 while it fails and calls are refused.",
            ),
            (
                "step3gw_shared_limits_available",
                "gauge",
                "Several replicas: 1 while the shared limits (Redis) answer; 0 while they do not and keys with a quota are refused.",
            ),
            (
                "step3gw_store_unrecorded_calls",
                "gauge",
                "Settled calls held in memory because the store fails.",
            ),
            (
                "step3gw_store_write_failures_total",
                "counter",
                "Failed store writes and flushes.",
            ),
            (
                "step3gw_spend_nanos_total",
                "counter",
                "What calls cost, in nano-units (1e-9) of the configured currency, by model.",
            ),
            (
                "step3gw_quota_crossings_total",
                "counter",
                "Shares of a key's quota or budget reached (quota_alert_percents), by what and percent.",
            ),
        ];
        let types: Vec<&str> = text.lines().filter(|l| l.starts_with("# TYPE ")).collect();
        assert_eq!(types.len(), expected.len(), "{text}");
        for (name, kind, help) in expected {
            assert!(
                types.contains(&format!("# TYPE {name} {kind}").as_str()),
                "{name}\n{text}"
            );
            assert!(
                text.lines().any(|l| l == format!("# HELP {name} {help}")),
                "{name}\n{text}"
            );
        }
        // Text format 0.0.4: no OpenMetrics trailer or unit lines.
        assert!(
            !text.contains("# EOF") && !text.contains("# UNIT"),
            "{text}"
        );
    }

    /// Prometheus rejects a scrape whose family is split or whose sample has no family.
    #[test]
    fn every_sample_follows_its_own_family_header() {
        let metrics = Metrics::default();
        for door in [Door::Rest, Door::Grpc] {
            metrics.request(door, "/a", "m", "200");
            metrics.request(door, "/b", "other", "500");
            metrics.call_settled(&settled(door, "m"));
            metrics.call_settled(&settled(door, "other"));
        }
        let (backends, store) = figures();
        let text = metrics.render(&backends, &store);
        let mut family = "";
        let mut seen = HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                family = rest.split(' ').next().unwrap_or_default();
                assert!(seen.insert(family), "{family} described twice:\n{text}");
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap_or_default();
                let of_family = name == family
                    || ["_bucket", "_sum", "_count"]
                        .iter()
                        .any(|suffix| name.strip_suffix(suffix) == Some(family));
                assert!(of_family, "`{line}` outside its family:\n{text}");
            }
        }
    }

    #[test]
    fn label_values_are_escaped() {
        let metrics = Metrics::default();
        let backends = [BackendFigures {
            name: "a\"b\\c\nd".into(),
            healthy: false,
            in_flight: 0,
            errors: 0,
        }];
        let text = metrics.render(&backends, &StoreFigures::default());
        assert!(
            text.contains("step3gw_backend_healthy{backend=\"a\\\"b\\\\c\\nd\"} 0"),
            "{text}"
        );
    }

    #[test]
    fn two_gateways_in_one_process_count_apart() {
        let a = Metrics::default();
        let b = Metrics::default();
        a.refusal("rate");
        a.call_started(Door::Rest);
        let store = StoreFigures::default();
        assert!(
            a.render(&[], &store)
                .contains("step3gw_refusals_total{reason=\"rate\"} 1")
        );
        let text = b.render(&[], &store);
        assert!(!text.contains("step3gw_refusals_total"), "{text}");
        assert!(
            text.contains("step3gw_in_flight{door=\"rest\"} 0"),
            "{text}"
        );
    }

    #[test]
    fn a_label_value_is_stored_once_however_often_it_is_counted() {
        let labels = Labels::default();
        let first = labels.get("/v1/chat/completions");
        let again = labels.get(&String::from("/v1/chat/completions"));
        assert!(Arc::ptr_eq(&first.0, &again.0));
        assert!(!Arc::ptr_eq(&first.0, &labels.get("/v1/models").0));
    }

    #[test]
    fn a_backend_gone_from_the_pool_is_gone_from_the_next_scrape() {
        let metrics = Metrics::default();
        let (backends, store) = figures();
        assert!(metrics.render(&backends, &store).contains("gpu-a"));
        assert!(!metrics.render(&[], &store).contains("gpu-a"));
    }
}
