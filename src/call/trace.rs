//! A call's trace: one span per call named and described by OpenTelemetry's GenAI
//! conventions (`gen_ai.operation.name`, `gen_ai.request.model`, `gen_ai.usage.*`,
//! `gen_ai.response.finish_reasons`), child spans for the gateway's stages (authenticate,
//! admit, forward, settle; events for the first byte and the first token), the client's
//! W3C `traceparent` as its parent, and a `traceparent` for the model server.
//!
//! The spans have their own target ([`TRACE_TARGET`]), which only the exporter's layer
//! enables: with traces off they are disabled at their call site and cost a branch. No
//! field carries a secret: keys appear by id, bodies never.

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::Span;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;

pub use crate::core::admission::TRACE_TARGET;
use crate::core::events::Door;
use crate::core::request::{Endpoint, PreparedCall};

/// The GenAI operation of an API.
pub fn operation(endpoint: Endpoint) -> &'static str {
    match endpoint {
        Endpoint::ChatCompletions | Endpoint::Responses => "chat",
        Endpoint::Completions => "text_completion",
        Endpoint::Embeddings => "embeddings",
    }
}

/// The span of one call, child of the client's `traceparent` when it sent a valid one.
pub fn call_span(
    door: Door,
    endpoint: Endpoint,
    request_id: &str,
    traceparent: Option<&str>,
) -> Span {
    let operation = operation(endpoint);
    let span = tracing::info_span!(
        target: TRACE_TARGET,
        "call",
        otel.name = operation,
        otel.kind = "server",
        otel.status_code = Empty,
        gen_ai.operation.name = operation,
        gen_ai.provider.name = "vllm",
        gen_ai.request.model = Empty,
        gen_ai.request.max_tokens = Empty,
        gen_ai.response.model = Empty,
        gen_ai.response.finish_reasons = Empty,
        gen_ai.usage.input_tokens = Empty,
        gen_ai.usage.output_tokens = Empty,
        http.response.status_code = Empty,
        error.type = Empty,
        gateway.door = door.as_str(),
        gateway.request_id = request_id,
        gateway.key_id = Empty,
        gateway.stream = Empty,
        gateway.outcome = Empty,
        gateway.usage_estimated = Empty,
    );
    if let Some(traceparent) = traceparent
        && !span.is_disabled()
    {
        let carrier =
            std::collections::HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
        let parent = TraceContextPropagator::new().extract(&carrier);
        if parent.span().span_context().is_valid() {
            let _ = span.set_parent(parent);
        }
    }
    span
}

/// Names the call's span as the GenAI conventions do, `<operation> <model>`, once the
/// model is known. (Recording `otel.name` does not rename a span that has started.)
fn name_call(span: &Span, endpoint: Endpoint, model: &str) {
    span.context()
        .span()
        .update_name(format!("{} {model}", operation(endpoint)));
}

/// Records on the call's span what the request asks for and whose key it is.
pub fn record_request(span: &Span, call: &PreparedCall, key_id: &str) {
    if span.is_disabled() {
        return;
    }
    name_call(span, call.endpoint, &call.model);
    span.record("gen_ai.request.model", call.model.as_str());
    span.record("gateway.stream", call.stream);
    span.record("gateway.key_id", key_id);
    if let Some(cap) = call.max_tokens {
        span.record("gen_ai.request.max_tokens", cap);
    }
}

/// A stage of a call that gets a span of its own under the call's.
#[derive(Clone, Copy, Debug)]
pub enum Stage {
    Authenticate,
    Admit,
    /// Until the answer's head arrives (the `first_byte` event).
    Forward,
}

/// The span of `stage`, under the call's span.
pub fn stage(call: &Span, stage: Stage) -> Span {
    // A span's name is fixed where it is made: one call site per stage.
    match stage {
        Stage::Authenticate => {
            tracing::info_span!(target: TRACE_TARGET, parent: call, "authenticate")
        }
        Stage::Admit => tracing::info_span!(target: TRACE_TARGET, parent: call, "admit"),
        Stage::Forward => tracing::info_span!(target: TRACE_TARGET, parent: call, "forward"),
    }
}

/// A call that failed before it settled: `error_type` is the door's status (an HTTP status
/// or a gRPC code); `fault` when the failure was the server's side, not the caller's.
pub fn record_error(span: &Span, error_type: impl tracing::Value, fault: bool) {
    if span.is_disabled() {
        return;
    }
    span.record("error.type", error_type);
    if fault {
        span.record("otel.status_code", "ERROR");
    }
}

/// The `traceparent` to send the model server: the `forward` span's own when traces are
/// exported, else the client's as it came (so the model server's spans still join the
/// client's trace), else none.
pub fn upstream_traceparent(forward: &Span, client: Option<&str>) -> Option<String> {
    if !forward.is_disabled() {
        let context = forward.context();
        let span = context.span();
        let span_context = span.span_context();
        if span_context.is_valid() {
            return Some(format!(
                "00-{}-{}-{:02x}",
                span_context.trace_id(),
                span_context.span_id(),
                span_context.trace_flags().to_u8()
            ));
        }
    }
    client.filter(|tp| is_traceparent(tp)).map(str::to_owned)
}

/// `00-<32 hex>-<16 hex>-<2 hex>`: the only shape passed on as it came.
fn is_traceparent(text: &str) -> bool {
    let parts: Vec<&str> = text.split('-').collect();
    parts.len() == 4
        && [2, 32, 16, 2]
            .iter()
            .zip(&parts)
            .all(|(&len, part)| part.len() == len && part.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Records on the call's span what the answer says: the model that answered and why it
/// stopped (JSON answers; streams report their reasons chunk by chunk).
pub fn record_answer(span: &Span, body: &[u8]) -> Vec<String> {
    #[derive(serde::Deserialize)]
    struct Answer {
        model: Option<String>,
        #[serde(default)]
        choices: Vec<Choice>,
        status: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct Choice {
        finish_reason: Option<String>,
    }
    let Ok(answer) = serde_json::from_slice::<Answer>(body) else {
        return Vec::new();
    };
    if let Some(model) = &answer.model {
        span.record("gen_ai.response.model", model.as_str());
    }
    let mut reasons: Vec<String> = answer
        .choices
        .into_iter()
        .filter_map(|c| c.finish_reason)
        .collect();
    // The Responses API says `status` instead.
    reasons.extend(answer.status);
    reasons
}

/// The `finish_reason` values of a stream chunk's choices, found without parsing it all.
pub fn finish_reasons(event: &[u8]) -> Vec<String> {
    const KEY: &[u8] = br#""finish_reason":""#;
    let mut found = Vec::new();
    let mut rest = event;
    while let Some(at) = memchr::memmem::find(rest, KEY) {
        rest = &rest[at + KEY.len()..];
        if let Some(end) = memchr::memchr(b'"', rest) {
            found.push(String::from_utf8_lossy(&rest[..end]).into_owned());
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_well_formed_client_traceparent_is_passed_on() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(
            upstream_traceparent(&Span::none(), Some(tp)).as_deref(),
            Some(tp)
        );
        assert_eq!(upstream_traceparent(&Span::none(), Some("00-xyz")), None);
        assert_eq!(upstream_traceparent(&Span::none(), None), None);
    }

    #[test]
    fn finish_reasons_are_read_from_a_chunk() {
        let chunk = br#"data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"},{"finish_reason":"length"}]}"#;
        assert_eq!(finish_reasons(chunk), ["stop", "length"]);
        assert!(finish_reasons(br#"{"finish_reason":null}"#).is_empty());
    }
}
