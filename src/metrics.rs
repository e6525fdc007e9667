//! Prometheus metrics: counters, gauges and histograms kept in atomics, per gateway (no
//! global recorder, so several gateways can live in one process), rendered as text.
//!
//! Every label value is bounded: doors and outcomes are enums, routes are the router's
//! patterns or known gRPC methods, models are those named in the configuration (else
//! `other`), backends are configured names. No label ever carries a key or a secret.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::core::events::{Door, GateEvents, SettledCall};
use crate::core::usage_sink::StoreFigures;

/// Seconds; the whole call, from milliseconds to the longest streams.
const CALL_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
];
/// Seconds; the gateway's own share of a call, microseconds to milliseconds.
const OVERHEAD_BUCKETS: &[f64] = &[
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1,
];

type Labels = Vec<(&'static str, String)>;

#[derive(Debug)]
struct Histogram {
    buckets: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn new(buckets: &'static [f64]) -> Self {
        Histogram {
            buckets,
            counts: buckets.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    fn observe(&self, value: Duration) {
        let secs = value.as_secs_f64();
        if let Some(i) = self.buckets.iter().position(|&bound| secs <= bound)
            && let Some(count) = self.counts.get(i)
        {
            count.fetch_add(1, Ordering::Relaxed);
        }
        self.sum_micros.fetch_add(
            u64::try_from(value.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        self.count.fetch_add(1, Ordering::Relaxed);
    }
}

/// A family of series of one kind, by label values. A lookup builds its key in a reused
/// per-thread buffer, so counting a known series allocates nothing.
#[derive(Debug)]
struct Family<T> {
    names: &'static [&'static str],
    /// Label values joined by `SEPARATOR` → the series.
    series: RwLock<HashMap<String, Arc<T>>>,
}

const SEPARATOR: char = '\u{1f}';

thread_local! {
    static KEY: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

impl<T> Family<T> {
    fn new(names: &'static [&'static str]) -> Self {
        Family {
            names,
            series: RwLock::new(HashMap::new()),
        }
    }

    /// The series with these label values (in the order of `names`), made on first use.
    fn get(&self, values: &[&str], make: impl FnOnce() -> T) -> Arc<T> {
        KEY.with(|key| {
            let mut key = key.borrow_mut();
            key.clear();
            for (i, value) in values.iter().enumerate() {
                if i > 0 {
                    key.push(SEPARATOR);
                }
                key.push_str(value);
            }
            if let Some(found) = self
                .series
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(key.as_str())
            {
                return found.clone();
            }
            let mut series = self.series.write().unwrap_or_else(|p| p.into_inner());
            series
                .entry(key.clone())
                .or_insert_with(|| Arc::new(make()))
                .clone()
        })
    }

    /// Every series with its labels, in a stable order.
    fn snapshot(&self) -> Vec<(Labels, Arc<T>)> {
        let mut all: Vec<(Labels, Arc<T>)> = self
            .series
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(key, value)| {
                let labels = self
                    .names
                    .iter()
                    .copied()
                    .zip(key.split(SEPARATOR).map(str::to_owned))
                    .collect();
                (labels, value.clone())
            })
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }
}

/// A backend's figures at scrape time (the pool's own state).
#[derive(Clone, Debug)]
pub struct BackendFigures {
    pub name: String,
    pub healthy: bool,
    pub in_flight: u32,
    pub errors: u64,
}

/// One gateway's metrics.
#[derive(Debug)]
pub struct Metrics {
    requests: Family<AtomicU64>,
    calls: Family<AtomicU64>,
    request_duration: Family<Histogram>,
    overhead: Family<Histogram>,
    ttft: Family<Histogram>,
    tokens: Family<AtomicU64>,
    images: Family<AtomicU64>,
    refusals: Family<AtomicU64>,
    in_flight: [AtomicI64; 2],
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Family::new(&["door", "route", "model", "status"]),
            calls: Family::new(&["door", "model", "outcome"]),
            request_duration: Family::new(&["door", "route"]),
            overhead: Family::new(&["door", "route"]),
            ttft: Family::new(&["door", "model"]),
            tokens: Family::new(&["kind", "model"]),
            images: Family::new(&["model"]),
            refusals: Family::new(&["reason"]),
            in_flight: [AtomicI64::new(0), AtomicI64::new(0)],
        }
    }
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
        self.requests
            .get(&[door.as_str(), route, model, status], || AtomicU64::new(0))
            .fetch_add(1, Ordering::Relaxed);
    }

    /// How long a request took (for chat calls: the whole call, stream included).
    pub fn request_duration(&self, door: Door, route: &str, took: Duration) {
        self.request_duration
            .get(&[door.as_str(), route], || Histogram::new(CALL_BUCKETS))
            .observe(took);
    }

    /// A settled chat call: its outcome, tokens, images, and the gateway's own time in it.
    pub fn call_settled(&self, settled: &SettledCall<'_>) {
        let door = settled.door.as_str();
        self.calls
            .get(&[door, settled.model, settled.outcome], || {
                AtomicU64::new(0)
            })
            .fetch_add(1, Ordering::Relaxed);
        for (kind, amount) in [
            ("prompt", settled.prompt_tokens),
            ("completion", settled.completion_tokens),
        ] {
            if amount > 0 {
                self.tokens
                    .get(&[kind, settled.model], || AtomicU64::new(0))
                    .fetch_add(amount, Ordering::Relaxed);
            }
        }
        if settled.images > 0 {
            self.images
                .get(&[settled.model], || AtomicU64::new(0))
                .fetch_add(settled.images, Ordering::Relaxed);
        }
        self.request_duration(settled.door, "chat", settled.total);
        if let Some(overhead) = settled.overhead {
            self.overhead
                .get(&[door, "chat"], || Histogram::new(OVERHEAD_BUCKETS))
                .observe(overhead);
        }
    }

    /// The first chunk of a stream reached the gateway.
    pub fn time_to_first_token(&self, door: Door, model: &str, took: Duration) {
        self.ttft
            .get(&[door.as_str(), model], || Histogram::new(CALL_BUCKETS))
            .observe(took);
    }

    /// A call refused before it reached a model server.
    pub fn refusal(&self, reason: &'static str) {
        self.refusals
            .get(&[reason], || AtomicU64::new(0))
            .fetch_add(1, Ordering::Relaxed);
    }

    pub fn call_started(&self, door: Door) {
        if let Some(gauge) = self.in_flight.get(door_index(door)) {
            gauge.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn call_ended(&self, door: Door) {
        if let Some(gauge) = self.in_flight.get(door_index(door)) {
            gauge.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// The Prometheus text exposition of everything, plus the figures read at scrape time.
    pub fn render(&self, backends: &[BackendFigures], store: &StoreFigures) -> String {
        let mut out = String::with_capacity(8192);
        counter(
            &mut out,
            "step3gw_requests_total",
            "Requests answered, by door, route, model and status.",
            &self.requests,
        );
        counter(
            &mut out,
            "step3gw_calls_total",
            "Chat calls settled, by door, model and outcome.",
            &self.calls,
        );
        histogram(
            &mut out,
            "step3gw_request_duration_seconds",
            "Request time (chat: the whole call, stream included).",
            &self.request_duration,
        );
        histogram(
            &mut out,
            "step3gw_gateway_overhead_seconds",
            "The gateway's own share of a chat call: total minus model-server time.",
            &self.overhead,
        );
        histogram(
            &mut out,
            "step3gw_time_to_first_token_seconds",
            "From the request to the first streamed chunk.",
            &self.ttft,
        );
        counter(
            &mut out,
            "step3gw_tokens_total",
            "Tokens charged, by kind (prompt, completion) and model.",
            &self.tokens,
        );
        counter(
            &mut out,
            "step3gw_images_total",
            "Images charged, by model.",
            &self.images,
        );
        counter(
            &mut out,
            "step3gw_refusals_total",
            "Calls refused by the gateway, by reason.",
            &self.refusals,
        );
        let _ = writeln!(
            out,
            "# HELP step3gw_in_flight Chat calls in flight, by door.\n# TYPE step3gw_in_flight gauge"
        );
        for door in [Door::Rest, Door::Grpc] {
            let value = self
                .in_flight
                .get(door_index(door))
                .map_or(0, |g| g.load(Ordering::Relaxed));
            let _ = writeln!(
                out,
                "step3gw_in_flight{{door=\"{}\"}} {value}",
                door.as_str()
            );
        }
        let _ = writeln!(
            out,
            "# HELP step3gw_backend_healthy Whether a backend takes calls (1) or not (0).\n# TYPE step3gw_backend_healthy gauge"
        );
        for b in backends {
            let _ = writeln!(
                out,
                "step3gw_backend_healthy{{backend=\"{}\"}} {}",
                escape(&b.name),
                u8::from(b.healthy)
            );
        }
        let _ = writeln!(
            out,
            "# HELP step3gw_backend_in_flight Calls in flight on a backend.\n# TYPE step3gw_backend_in_flight gauge"
        );
        for b in backends {
            let _ = writeln!(
                out,
                "step3gw_backend_in_flight{{backend=\"{}\"}} {}",
                escape(&b.name),
                b.in_flight
            );
        }
        let _ = writeln!(
            out,
            "# HELP step3gw_backend_errors_total Connect errors, resets, timeouts and 5xx of a backend.\n# TYPE step3gw_backend_errors_total counter"
        );
        for b in backends {
            let _ = writeln!(
                out,
                "step3gw_backend_errors_total{{backend=\"{}\",kind=\"any\"}} {}",
                escape(&b.name),
                b.errors
            );
        }
        let _ = writeln!(
            out,
            "# HELP step3gw_store_write_backlog Finished calls queued for the store.\n# TYPE step3gw_store_write_backlog gauge\nstep3gw_store_write_backlog {}",
            store.backlog
        );
        let _ = writeln!(
            out,
            "# HELP step3gw_store_available 1 while the store takes writes; 0 while it fails and calls are refused.\n# TYPE step3gw_store_available gauge\nstep3gw_store_available {}",
            u8::from(store.available)
        );
        let _ = writeln!(
            out,
            "# HELP step3gw_store_unrecorded_calls Settled calls held in memory because the store fails.\n# TYPE step3gw_store_unrecorded_calls gauge\nstep3gw_store_unrecorded_calls {}",
            store.unrecorded
        );
        let _ = writeln!(
            out,
            "# HELP step3gw_store_write_failures_total Failed store writes and flushes.\n# TYPE step3gw_store_write_failures_total counter\nstep3gw_store_write_failures_total {}",
            store.failures
        );
        out
    }
}

impl GateEvents for Metrics {
    fn call_started(&self, door: Door) {
        Metrics::call_started(self, door);
    }

    fn call_settled(&self, call: &SettledCall<'_>) {
        self.call_ended(call.door);
        Metrics::call_settled(self, call);
    }

    fn first_chunk(&self, door: Door, model: &str, after: Duration) {
        self.time_to_first_token(door, model, after);
    }

    fn refused(&self, reason: &'static str) {
        self.refusal(reason);
    }
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn label_text(labels: &Labels) -> String {
    labels
        .iter()
        .map(|(name, value)| format!("{name}=\"{}\"", escape(value)))
        .collect::<Vec<_>>()
        .join(",")
}

fn counter(out: &mut String, name: &str, help: &str, family: &Family<AtomicU64>) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    for (labels, value) in family.snapshot() {
        let _ = writeln!(
            out,
            "{name}{{{}}} {}",
            label_text(&labels),
            value.load(Ordering::Relaxed)
        );
    }
}

fn histogram(out: &mut String, name: &str, help: &str, family: &Family<Histogram>) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    for (labels, histogram) in family.snapshot() {
        let labels = label_text(&labels);
        let mut cumulative = 0;
        for (bound, count) in histogram.buckets.iter().zip(&histogram.counts) {
            cumulative += count.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {cumulative}");
        }
        let count = histogram.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
        let sum = histogram.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_histograms_and_gauges_render_as_prometheus_text() {
        let metrics = Metrics::default();
        metrics.request(Door::Rest, "/v1/models", "", "200");
        metrics.request(Door::Rest, "/v1/models", "", "200");
        metrics.refusal("quota");
        metrics.call_started(Door::Grpc);
        metrics.call_settled(&SettledCall {
            door: Door::Grpc,
            model: "m",
            outcome: "completed",
            prompt_tokens: 5,
            completion_tokens: 7,
            images: 1,
            total: Duration::from_millis(30),
            overhead: Some(Duration::from_micros(40)),
        });
        let text = metrics.render(
            &[BackendFigures {
                name: "gpu-a".into(),
                healthy: true,
                in_flight: 2,
                errors: 1,
            }],
            &StoreFigures {
                backlog: 3,
                available: false,
                unrecorded: 2,
                failures: 4,
            },
        );
        assert!(text.contains(
            "step3gw_requests_total{door=\"rest\",route=\"/v1/models\",model=\"\",status=\"200\"} 2"
        ));
        assert!(text.contains("step3gw_refusals_total{reason=\"quota\"} 1"));
        assert!(text.contains("step3gw_tokens_total{kind=\"completion\",model=\"m\"} 7"));
        assert!(text.contains("step3gw_images_total{model=\"m\"} 1"));
        assert!(text.contains("step3gw_in_flight{door=\"grpc\"} 1"));
        assert!(text.contains(
            "step3gw_gateway_overhead_seconds_bucket{door=\"grpc\",route=\"chat\",le=\"0.00005\"} 1"
        ));
        assert!(
            text.contains("step3gw_request_duration_seconds_count{door=\"grpc\",route=\"chat\"} 1")
        );
        assert!(text.contains("step3gw_backend_healthy{backend=\"gpu-a\"} 1"));
        assert!(text.contains("step3gw_store_write_backlog 3"));
        assert!(text.contains("step3gw_store_available 0"));
        assert!(text.contains("step3gw_store_unrecorded_calls 2"));
        assert!(text.contains("step3gw_store_write_failures_total 4"));
    }
}
