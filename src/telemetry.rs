//! Logs and traces: the log lines on stderr, and, when `[telemetry]` is enabled, each call's
//! spans exported over OTLP/gRPC (`call/trace.rs` makes them).
//!
//! The call spans have a target of their own that the log filter always turns off: logs look
//! the same with traces on or off, and with traces off the spans are disabled where they are
//! made.

use std::io::IsTerminal;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use serde::{Deserialize, Serialize};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use crate::core::admission::TRACE_TARGET;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// Export traces (off by default).
    pub enabled: bool,
    /// The OTLP/gRPC endpoint of a collector (or Jaeger, Tempo, …).
    pub endpoint: String,
    /// The share of traces kept (0 to 1), for calls whose client sent no sampling
    /// decision; a client's `traceparent` decision is followed.
    pub sample_ratio: f64,
    /// `service.name` of the spans.
    pub service_name: String,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            enabled: false,
            endpoint: "http://127.0.0.1:4317".into(),
            sample_ratio: 1.0,
            service_name: "step3-gateway".into(),
        }
    }
}

impl TelemetryConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return Err("telemetry.sample_ratio must be within 0 and 1".into());
        }
        if self.enabled {
            match url::Url::parse(&self.endpoint) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
                _ => {
                    return Err(format!(
                        "telemetry.endpoint must be an http:// or https:// URL, got `{}`",
                        self.endpoint
                    ));
                }
            }
            if self.service_name.trim().is_empty() {
                return Err("telemetry.service_name must not be empty".into());
            }
        }
        Ok(())
    }
}

/// The trace exporter; [`Traces::shutdown`] sends what is still batched.
#[derive(Debug)]
pub struct Traces {
    provider: SdkTracerProvider,
}

impl Traces {
    /// Exports the spans still batched (blocks up to the exporter's timeout).
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "traces: the last spans could not be exported");
        }
    }
}

/// Sets up the logs at `level` (`RUST_LOG` overrides it), one JSON object a line when
/// `json`, and, with `telemetry` enabled, the trace exporter. Runs inside the tokio runtime
/// (the gRPC exporter's client needs it).
pub fn init(
    json: bool,
    level: &str,
    telemetry: Option<&TelemetryConfig>,
) -> anyhow::Result<Option<Traces>> {
    let off = format!("{TRACE_TARGET}=off").parse()?;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(level))
        .add_directive(off);
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        // Colour codes are for a terminal; in a file, a pipe or journald they are noise.
        .with_ansi(std::io::stderr().is_terminal());
    let logs: Box<dyn Layer<Registry> + Send + Sync> = if json {
        fmt.json().with_filter(filter).boxed()
    } else {
        fmt.with_filter(filter).boxed()
    };
    let traces = match telemetry.filter(|t| t.enabled) {
        Some(config) => Some(provider(config)?),
        None => None,
    };
    let exporting = traces.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("step3-gateway"))
            // The spans carry what a reader of the trace needs, not where in our code or on
            // which thread they were made.
            .with_location(false)
            .with_threads(false)
            .with_target(false)
            .with_tracked_inactivity(false)
            .with_filter(Targets::new().with_target(TRACE_TARGET, tracing::Level::INFO))
    });
    tracing_subscriber::registry()
        .with(logs)
        .with(exporting)
        .try_init()?;
    if let Some(config) = telemetry.filter(|t| t.enabled) {
        tracing::info!(
            endpoint = %config.endpoint,
            sample_ratio = config.sample_ratio,
            "traces: exporting each call's spans over OTLP/gRPC"
        );
    }
    Ok(traces.map(|provider| Traces { provider }))
}

fn provider(config: &TelemetryConfig) -> anyhow::Result<SdkTracerProvider> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(config.endpoint.clone())
        .build()?;
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            config.sample_ratio,
        ))))
        .with_resource(
            Resource::builder()
                .with_service_name(config.service_name.clone())
                .build(),
        )
        .build())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ratio_outside_0_to_1_or_an_endpoint_that_is_no_url_is_refused_clearly() {
        let mut config = TelemetryConfig {
            sample_ratio: 1.5,
            ..TelemetryConfig::default()
        };
        assert_eq!(
            config.validate().unwrap_err(),
            "telemetry.sample_ratio must be within 0 and 1"
        );
        config.sample_ratio = 0.25;
        config.enabled = true;
        config.endpoint = "collector:4317".into();
        assert!(
            config
                .validate()
                .unwrap_err()
                .starts_with("telemetry.endpoint must be an http:// or https:// URL")
        );
        config.endpoint = "http://collector:4317".into();
        assert_eq!(config.validate(), Ok(()));
        // Off, the endpoint is not read.
        config.enabled = false;
        config.endpoint = String::new();
        assert_eq!(config.validate(), Ok(()));
    }
}
