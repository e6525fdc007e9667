//! Traces: the real binary exports each call's spans over OTLP/gRPC to a receiver started
//! here (opentelemetry-proto's `TraceService`), configured by `STEP3GW_TELEMETRY_*`. The
//! span tree, the GenAI attributes, the client's `traceparent` as the parent, the one the
//! model server saw, and no secret anywhere.

use std::collections::HashMap;
use std::process::Command;
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use reqwest::StatusCode;
use serde_json::{Value, json};
use step3_gateway::grpc::pb;
use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;

use crate::common::binary::{ConfigFile, GatewayProcess, UPSTREAM_KEY, serve_command, upstream};
use crate::common::{ADMIN_TOKEN, MODEL, RestApi, chat_request};

/// A span as exported, with its resource's attributes.
type Exported = (Vec<KeyValue>, Span);

/// What the receiver took: every span.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Exported>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let resource = resource_spans
                .resource
                .map(|r| r.attributes)
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    spans.push((resource.clone(), span));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// An OTLP/gRPC receiver on a port of its own; its URL.
async fn start_receiver() -> (String, Receiver) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let receiver = Receiver::default();
    let server = Server::builder()
        .add_service(TraceServiceServer::new(receiver.clone()))
        .serve_with_incoming(TcpIncoming::from(listener));
    tokio::spawn(server);
    (url, receiver)
}

fn text(value: &AnyValue) -> String {
    match &value.value {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(any_value::Value::ArrayValue(a)) => {
            a.values.iter().map(text).collect::<Vec<_>>().join(",")
        }
        other => format!("{other:?}"),
    }
}

fn attributes(list: &[KeyValue]) -> HashMap<String, String> {
    list.iter()
        .map(|kv| {
            (
                kv.key.clone(),
                kv.value.as_ref().map(text).unwrap_or_default(),
            )
        })
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The spans of one trace, by id.
struct Trace<'a> {
    spans: Vec<&'a Span>,
}

impl<'a> Trace<'a> {
    fn of(all: &'a [Exported], trace_id: &str) -> Self {
        Trace {
            spans: all
                .iter()
                .map(|(_, s)| s)
                .filter(|s| hex(&s.trace_id) == trace_id)
                .collect(),
        }
    }

    /// The one span named `name`.
    fn named(&self, name: &str) -> &'a Span {
        let found: Vec<_> = self.spans.iter().filter(|s| s.name == name).collect();
        assert_eq!(
            found.len(),
            1,
            "spans named {name}: {:?}",
            self.spans
                .iter()
                .map(|s| (&s.name, attributes(&s.attributes)))
                .collect::<Vec<_>>()
        );
        found[0]
    }

    /// The names of the spans whose parent is `parent`, sorted.
    fn children(&self, parent: &Span) -> Vec<String> {
        let mut names: Vec<String> = self
            .spans
            .iter()
            .filter(|s| s.parent_span_id == parent.span_id)
            .map(|s| s.name.clone())
            .collect();
        names.sort();
        names
    }
}

/// The model server's `traceparent` of its `n`th request.
fn upstream_traceparent(sim: &step3_gateway::sim::RunningSimulator, n: usize) -> String {
    let requests = sim.simulator.requests();
    requests[n].headers["traceparent"]
        .to_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn each_call_is_one_exported_span_under_the_clients_traceparent_and_the_model_server_joins_it()
 {
    let sim = upstream(0).await;
    let (otlp, receiver) = start_receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let config = ConfigFile::new(&sim.url()).write(dir.path());
    // At `trace`, so the exporter's own log lines are searched for secrets too.
    let mut command: Command = serve_command(&config, "trace");
    command
        .env("STEP3GW_TELEMETRY_ENABLED", "true")
        .env("STEP3GW_TELEMETRY_ENDPOINT", &otlp)
        .env("STEP3GW_TELEMETRY_SAMPLE_RATIO", "1")
        .env("STEP3GW_TELEMETRY_SERVICE_NAME", "it-gateway");
    let gw = GatewayProcess::start_command(command).await;
    let key = gw.create_key(json!({})).await;

    // 1. REST, JSON, under the client's trace.
    let client_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    let answer: Value = gw
        .http()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(&key.secret)
        .header("traceparent", format!("00-{client_trace}-{client_span}-01"))
        .json(&json!({"model": MODEL, "max_tokens": 50,
            "messages": [{"role": "user", "content": "trace me"}]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["object"], "chat.completion", "{answer}");

    // 2. gRPC, streamed, under another client trace (metadata).
    let grpc_trace = "0af7651916cd43dd8448eb211c80319c";
    let mut chat = pb::chat_client::ChatClient::connect(gw.base_url().to_owned())
        .await
        .unwrap();
    let mut request = tonic::Request::new(chat_request("stream me"));
    let metadata = request.metadata_mut();
    metadata.insert(
        "authorization",
        format!("Bearer {}", key.secret).parse().unwrap(),
    );
    metadata.insert(
        "traceparent",
        format!("00-{grpc_trace}-b7ad6b7169203331-01")
            .parse()
            .unwrap(),
    );
    let mut stream = chat.stream_complete(request).await.unwrap().into_inner();
    let mut last = None;
    while let Some(chunk) = stream.message().await.unwrap() {
        last = Some(chunk);
    }
    let streamed = last.unwrap().usage.unwrap();

    // 3. A client that said "not sampled": no span, and the model server is told so.
    let unsampled = "11111111111111111111111111111111";
    let response = gw
        .http()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(&key.secret)
        .header("traceparent", format!("00-{unsampled}-2222222222222222-00"))
        .json(&json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    // 4. A wrong key and no traceparent: a root span of its own, with the refusal.
    let refused = gw
        .http()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth("sk-step3-not-a-key")
        .json(&json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);

    // Stopping sends what the exporter still holds.
    gw.signal("TERM");
    let (status, logs) = gw.wait().await;
    assert!(status.success(), "{status:?} {logs:#?}");
    let all = receiver.spans.lock().unwrap().clone();

    // Every span says which service made it.
    for (resource, _) in &all {
        assert_eq!(attributes(resource)["service.name"], "it-gateway");
    }

    // 1: the call's span is the client span's child, its stages are its children.
    let rest = Trace::of(&all, client_trace);
    let call = rest.named(&format!("chat {MODEL}"));
    assert_eq!(hex(&call.parent_span_id), client_span);
    assert_eq!(call.kind, SpanKind::Server as i32);
    assert_eq!(
        rest.children(call),
        ["admit", "authenticate", "forward", "settle"]
    );
    let at = attributes(&call.attributes);
    let usage = &answer["usage"];
    assert_eq!(at["gen_ai.operation.name"], "chat");
    assert_eq!(at["gen_ai.request.model"], MODEL);
    assert_eq!(at["gen_ai.request.max_tokens"], "50");
    assert_eq!(
        at["gen_ai.response.model"],
        answer["model"].as_str().unwrap()
    );
    assert_eq!(
        at["gen_ai.usage.input_tokens"],
        usage["prompt_tokens"].to_string()
    );
    assert_eq!(
        at["gen_ai.usage.output_tokens"],
        usage["completion_tokens"].to_string()
    );
    assert_eq!(
        at["gen_ai.response.finish_reasons"],
        answer["choices"][0]["finish_reason"].as_str().unwrap()
    );
    assert_eq!(at["http.response.status_code"], "200");
    assert_eq!(at["gateway.door"], "rest");
    assert_eq!(at["gateway.key_id"], key.id);
    assert!(call.events.iter().any(|e| e.name == "first_byte"));
    // The model server was sent the forward span as its parent, in the client's trace.
    let forward = rest.named("forward");
    assert_eq!(
        upstream_traceparent(&sim, 0),
        format!("00-{client_trace}-{}-01", hex(&forward.span_id))
    );

    // 2: the same over gRPC, streamed; the first token is an event.
    let grpc = Trace::of(&all, grpc_trace);
    let call = grpc.named(&format!("chat {MODEL}"));
    assert_eq!(hex(&call.parent_span_id), "b7ad6b7169203331");
    assert_eq!(
        grpc.children(call),
        ["admit", "authenticate", "forward", "settle"]
    );
    let at = attributes(&call.attributes);
    assert_eq!(at["gateway.door"], "grpc");
    assert_eq!(at["gateway.stream"], "true");
    assert_eq!(
        at["gen_ai.usage.input_tokens"],
        streamed.prompt_tokens.to_string()
    );
    assert_eq!(
        at["gen_ai.usage.output_tokens"],
        streamed.completion_tokens.to_string()
    );
    assert_eq!(at["gen_ai.response.finish_reasons"], "stop");
    assert!(call.events.iter().any(|e| e.name == "first_token"));
    assert!(upstream_traceparent(&sim, 1).starts_with(&format!("00-{grpc_trace}-")));

    // 3: not exported; the decision travels on.
    assert!(Trace::of(&all, unsampled).spans.is_empty());
    assert!(upstream_traceparent(&sim, 2).starts_with(&format!("00-{unsampled}-")));
    assert!(upstream_traceparent(&sim, 2).ends_with("-00"));

    // 4: a root span, refused at authentication; nothing was forwarded.
    let roots: Vec<&Span> = all
        .iter()
        .map(|(_, s)| s)
        .filter(|s| s.parent_span_id.is_empty())
        .collect();
    assert_eq!(roots.len(), 1, "{roots:#?}");
    let refused = Trace::of(&all, &hex(&roots[0].trace_id));
    assert_eq!(refused.children(roots[0]), ["authenticate"]);
    assert_eq!(attributes(&roots[0].attributes)["error.type"], "401");
    assert_eq!(sim.simulator.requests().len(), 3);

    // No secret in any attribute, event or name, nor in the logs.
    let everything = format!("{all:?}{logs:?}");
    for secret in [
        key.secret.as_str(),
        ADMIN_TOKEN,
        UPSTREAM_KEY,
        "sk-step3-not-a-key",
    ] {
        assert!(
            !everything.contains(secret),
            "a secret in the spans or logs"
        );
    }
}

#[tokio::test]
async fn with_traces_off_the_clients_traceparent_still_reaches_the_model_server() {
    let sim = upstream(0).await;
    let dir = tempfile::tempdir().unwrap();
    let config = ConfigFile::new(&sim.url()).write(dir.path());
    let gw = GatewayProcess::start_logging(&config, "info").await;
    let key = gw.create_key(json!({})).await;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    for sent in [traceparent, "00-not-a-traceparent-01"] {
        let response = gw
            .http()
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(&key.secret)
            .header("traceparent", sent)
            .json(&json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }
    let requests = sim.simulator.requests();
    assert_eq!(requests[0].headers["traceparent"], traceparent);
    // A malformed one is not passed on.
    assert!(requests[1].headers.get("traceparent").is_none());
}

#[tokio::test]
async fn with_a_sample_ratio_of_0_only_the_calls_a_client_sampled_are_exported() {
    let sim = upstream(0).await;
    let (otlp, receiver) = start_receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let config = ConfigFile::new(&sim.url())
        .extra(&format!(
            "[telemetry]\nenabled = true\nendpoint = \"{otlp}\"\nsample_ratio = 0.0\n"
        ))
        .write(dir.path());
    let gw = GatewayProcess::start_logging(&config, "info").await;
    let key = gw.create_key(json!({})).await;
    for _ in 0..3 {
        let response = gw
            .chat(&key.secret, &crate::common::chat_body("not sampled"))
            .await;
        assert_eq!(response.status(), StatusCode::OK);
    }
    // A gRPC client that sampled its trace, with a wrong key.
    let sampled = "5bf92f3577b34da6a3ce929d0e0e4736";
    let mut chat = pb::chat_client::ChatClient::connect(gw.base_url().to_owned())
        .await
        .unwrap();
    let mut request = tonic::Request::new(chat_request("x"));
    request
        .metadata_mut()
        .insert("authorization", "Bearer sk-step3-wrong".parse().unwrap());
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{sampled}-00f067aa0ba902b7-01").parse().unwrap(),
    );
    let e = chat.complete(request).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);

    gw.signal("TERM");
    let (status, _) = gw.wait().await;
    assert!(status.success());
    let all = receiver.spans.lock().unwrap().clone();
    let names: Vec<&str> = all.iter().map(|(_, s)| s.name.as_str()).collect();
    assert_eq!(names.len(), 2, "only the sampled call: {names:?}");
    let trace = Trace::of(&all, sampled);
    let call = trace.named("chat");
    assert_eq!(trace.children(call), ["authenticate"]);
    assert_eq!(
        attributes(&call.attributes)["error.type"],
        "Unauthenticated"
    );
    assert_eq!(attributes(&call.attributes)["gateway.door"], "grpc");
}
