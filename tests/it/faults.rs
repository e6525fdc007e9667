//! Faults from the model server, through every door (REST JSON, REST SSE, gRPC Complete,
//! gRPC StreamComplete): the client gets a well-formed answer, the call is settled exactly
//! once with what was really used, memory stays bounded, and the gateway serves on.

use std::time::Duration;

use futures_util::StreamExt;
use reqwest::StatusCode;
use serde_json::{Value, json};
use step3_gateway::config::GatewayConfig;
use step3_gateway::grpc::pb;
use step3_gateway::sim::Fault;
use tonic::Code;

use crate::common::{
    Builder, MODEL, RestApi, TestGateway, TestKey, chat_body, expect_error, sse_payloads,
    stream_body,
};

fn text_request(text: &str) -> pb::ChatRequest {
    pb::ChatRequest {
        model: MODEL.into(),
        messages: vec![pb::Message {
            role: "user".into(),
            text: text.into(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// A gateway with short timeouts and no retries (a retry would hide the fault).
fn builder() -> Builder {
    TestGateway::builder()
        .sim(|s| {
            s.reply_tokens = 12;
            s.reasoning_tokens = 0;
        })
        .config(|c: &mut GatewayConfig| {
            c.upstream.max_retries = 0;
            c.upstream.idle_timeout_secs = 1;
            c.upstream.total_timeout_secs = 3;
            c.upstream.first_byte_timeout_secs = 3;
            // One failing backend must not be ejected between the doors' calls.
            c.upstream.eject_after_failures = 1000;
        })
}

/// A REST JSON call that must fail: its OpenAI error, checked for shape, never HTML.
async fn rest_json_error(gw: &TestGateway, key: &TestKey, status: StatusCode) -> Value {
    let response = gw.chat(&key.secret, &chat_body("json please")).await;
    expect_error(response, status).await
}

/// How a REST stream ended.
#[derive(Debug)]
enum SseEnd {
    /// Refused before the stream began: the status and the OpenAI error.
    Refused(StatusCode, Value),
    /// A stream: every `data:` payload, each checked to be JSON or the final `[DONE]`.
    Stream(Vec<String>),
}

async fn rest_sse(gw: &TestGateway, key: &TestKey) -> SseEnd {
    rest_sse_with(gw, key, 0).await
}

/// A REST stream asking for the final usage (and at most `max_tokens`, unless 0).
async fn rest_sse_with(gw: &TestGateway, key: &TestKey, max_tokens: u32) -> SseEnd {
    let mut body = stream_body("stream please");
    body["stream_options"] = json!({"include_usage": true});
    if max_tokens > 0 {
        body["max_tokens"] = json!(max_tokens);
    }
    let response = gw.chat(&key.secret, &body).await;
    if response.status() != StatusCode::OK {
        let status = response.status();
        return SseEnd::Refused(status, expect_error(response, status).await);
    }
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let text = response.text().await.unwrap();
    // Every event a client reads is `data: <JSON>` or the last `data: [DONE]`.
    for event in text.split_terminator("\n\n") {
        assert!(
            event.starts_with("data: "),
            "junk reached the client: {text:?}"
        );
    }
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    let payloads = sse_payloads(&text);
    for payload in &payloads[..payloads.len() - 1] {
        let _: Value = serde_json::from_str(payload)
            .unwrap_or_else(|e| panic!("unreadable event {payload:?}: {e}"));
    }
    SseEnd::Stream(payloads)
}

/// The error event just before `[DONE]`.
fn error_event(payloads: &[String]) -> Value {
    let error: Value = serde_json::from_str(&payloads[payloads.len() - 2]).unwrap();
    assert!(error["error"]["message"].is_string(), "{error}");
    error["error"].clone()
}

async fn grpc_unary(gw: &TestGateway, key: &TestKey) -> Result<pb::ChatResponse, tonic::Status> {
    let mut chat = gw.grpc_chat(&key.secret).await;
    chat.complete(text_request("grpc please"))
        .await
        .map(tonic::Response::into_inner)
}

/// The chunks of a gRPC stream and the status it ended with (`None`: a normal end).
async fn grpc_stream(
    gw: &TestGateway,
    key: &TestKey,
) -> (Vec<pb::ChatChunk>, Option<tonic::Status>) {
    let mut chat = gw.grpc_chat(&key.secret).await;
    let mut stream = match chat
        .stream_complete(text_request("grpc stream please"))
        .await
    {
        Ok(response) => response.into_inner(),
        Err(status) => return (Vec::new(), Some(status)),
    };
    let mut chunks = Vec::new();
    while let Some(item) = stream.next().await {
        match item {
            Ok(chunk) => chunks.push(chunk),
            Err(status) => {
                // A status ends the stream: nothing may follow it.
                assert!(stream.next().await.is_none());
                return (chunks, Some(status));
            }
        }
    }
    (chunks, None)
}

/// What the books must say about the one call a key made.
#[derive(Debug)]
struct Settled {
    outcome: &'static str,
    status: u16,
    charged: bool,
    estimated: bool,
    /// Prompt and completion tokens charged, when the test knows them exactly.
    prompt: Option<u64>,
    completion: Option<u64>,
}

/// The key's one call: logged exactly once, as expected, and the key's counters agree.
async fn assert_settled_once(gw: &TestGateway, key: &TestKey, expected: &Settled) -> Value {
    gw.wait_for_calls(&key.id, 1).await;
    // Two flush intervals more: a second settlement would show up by now.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let calls = gw.calls(&key.id).await;
    assert_eq!(calls.len(), 1, "settled more than once: {calls:#?}");
    let call = calls[0].clone();
    assert_eq!(call["outcome"], expected.outcome, "{call}");
    assert_eq!(call["status"], expected.status, "{call}");
    assert_eq!(call["charged_request"], expected.charged, "{call}");
    assert_eq!(call["usage_estimated"], expected.estimated, "{call}");
    if let Some(prompt) = expected.prompt {
        assert_eq!(call["usage"]["prompt_tokens"], prompt, "{call}");
    }
    if let Some(completion) = expected.completion {
        assert_eq!(call["usage"]["completion_tokens"], completion, "{call}");
    }
    let usage = gw.usage(&key.secret).await;
    assert_eq!(
        usage["requests"]["used"],
        u64::from(expected.charged),
        "{usage}"
    );
    assert_eq!(
        usage["tokens"]["prompt"], call["usage"]["prompt_tokens"],
        "{usage}"
    );
    assert_eq!(
        usage["tokens"]["completion"], call["usage"]["completion_tokens"],
        "{usage}"
    );
    call
}

/// Four fresh keys, one per door, so each key's books hold exactly one call.
async fn four_keys(gw: &TestGateway) -> [TestKey; 4] {
    let mut keys = Vec::new();
    for _ in 0..4 {
        keys.push(gw.create_key(json!({})).await);
    }
    keys.try_into().unwrap()
}

/// After a fault the gateway still serves a normal call on both doors.
async fn assert_still_serves(gw: &TestGateway) {
    let key = gw.create_key(json!({})).await;
    let mut body = chat_body("still there?");
    body["max_tokens"] = json!(8);
    let response = gw.chat(&key.secret, &body).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert!(body["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    let mut request = text_request("still there?");
    request.max_tokens = Some(8);
    let answer = gw.grpc_chat(&key.secret).await.complete(request).await;
    assert!(
        answer
            .unwrap()
            .into_inner()
            .usage
            .unwrap()
            .completion_tokens
            > 0
    );
    match rest_sse_with(gw, &key, 8).await {
        SseEnd::Stream(payloads) => assert!(payloads.iter().all(|p| !p.contains("\"error\""))),
        SseEnd::Refused(status, error) => panic!("{status}: {error}"),
    }
}

/// A call the upstream failed before answering anything usable: logged, not charged.
fn not_charged_502(outcome: &'static str) -> Settled {
    Settled {
        outcome,
        status: 502,
        charged: false,
        estimated: false,
        prompt: Some(0),
        completion: Some(0),
    }
}

#[tokio::test]
async fn a_connection_reset_before_the_answer_is_a_502_on_every_door_and_charges_nothing() {
    let gw = builder().start().await;
    let [json_key, sse_key, unary_key, stream_key] = four_keys(&gw).await;
    for _ in 0..4 {
        gw.sim.simulator.push_fault(Fault::DropConnection);
    }
    let error = rest_json_error(&gw, &json_key, StatusCode::BAD_GATEWAY).await;
    assert_eq!(error["code"], "upstream_unavailable");
    match rest_sse(&gw, &sse_key).await {
        SseEnd::Refused(StatusCode::BAD_GATEWAY, error) => {
            assert_eq!(error["code"], "upstream_unavailable");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        grpc_unary(&gw, &unary_key).await.unwrap_err().code(),
        Code::Unavailable
    );
    let (chunks, status) = grpc_stream(&gw, &stream_key).await;
    assert!(chunks.is_empty());
    assert_eq!(status.unwrap().code(), Code::Unavailable);
    for key in [&json_key, &sse_key, &unary_key, &stream_key] {
        assert_settled_once(&gw, key, &not_charged_502("upstream_failed")).await;
    }
    assert_eq!(gw.sim.simulator.stats().chat_requests, 4);
    assert_still_serves(&gw).await;
}

#[tokio::test]
async fn a_reset_mid_answer_ends_streams_well_formed_and_charges_what_was_generated() {
    let gw = builder().start().await;
    let [json_key, sse_key, unary_key, stream_key] = four_keys(&gw).await;

    // Non-streaming: the JSON answer breaks off after 40 bytes.
    gw.sim.simulator.push_fault(Fault::JsonCutAfter(40));
    let error = rest_json_error(&gw, &json_key, StatusCode::BAD_GATEWAY).await;
    assert_eq!(error["code"], "upstream_unavailable");
    gw.sim.simulator.push_fault(Fault::JsonCutAfter(40));
    assert_eq!(
        grpc_unary(&gw, &unary_key).await.unwrap_err().code(),
        Code::Unavailable
    );
    for key in [&json_key, &unary_key] {
        assert_settled_once(&gw, key, &not_charged_502("upstream_failed")).await;
    }

    // Streaming: five tokens, then the connection is reset.
    gw.sim.simulator.push_fault(Fault::StreamCutAfter(5));
    let SseEnd::Stream(payloads) = rest_sse(&gw, &sse_key).await else {
        panic!("the stream had begun")
    };
    assert_eq!(error_event(&payloads)["code"], "stream_incomplete");
    gw.sim.simulator.push_fault(Fault::StreamCutAfter(5));
    let (chunks, status) = grpc_stream(&gw, &stream_key).await;
    let content: usize = chunks
        .iter()
        .filter(|c| c.choices.iter().any(|d| !d.content.is_empty()))
        .count();
    assert_eq!(content, 5, "{chunks:?}");
    assert_eq!(status.unwrap().code(), Code::Unavailable);
    for key in [&sse_key, &stream_key] {
        let expected = Settled {
            outcome: "stream_incomplete",
            status: 200,
            charged: true,
            estimated: false,
            prompt: None,
            completion: Some(5),
        };
        assert_settled_once(&gw, key, &expected).await;
    }
    assert_still_serves(&gw).await;
}

#[tokio::test]
async fn a_stalled_answer_is_ended_by_the_idle_timeout_and_the_upstream_is_hung_up() {
    let gw = builder().start().await;
    let [json_key, sse_key, unary_key, stream_key] = four_keys(&gw).await;
    for _ in 0..4 {
        gw.sim.simulator.push_fault(Fault::StreamStallAfter(3));
    }
    let (json, sse, unary, stream) = tokio::join!(
        rest_json_error(&gw, &json_key, StatusCode::GATEWAY_TIMEOUT),
        rest_sse(&gw, &sse_key),
        grpc_unary(&gw, &unary_key),
        grpc_stream(&gw, &stream_key),
    );
    assert_eq!(json["code"], "upstream_timeout");
    let SseEnd::Stream(payloads) = sse else {
        panic!("the stream had begun: {sse:?}")
    };
    assert_eq!(error_event(&payloads)["code"], "upstream_timeout");
    assert_eq!(unary.unwrap_err().code(), Code::DeadlineExceeded);
    let (chunks, status) = stream;
    assert!(!chunks.is_empty());
    assert_eq!(status.unwrap().code(), Code::Unavailable);

    // The JSON answer was half there: the model worked, so the prompt is charged as estimated.
    for key in [&json_key, &unary_key] {
        let expected = Settled {
            outcome: "timed_out",
            status: 504,
            charged: true,
            estimated: true,
            prompt: None,
            completion: Some(0),
        };
        let call = assert_settled_once(&gw, key, &expected).await;
        assert!(call["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
    }
    // The streams reported usage with every chunk: exactly the three tokens sent.
    for key in [&sse_key, &stream_key] {
        let expected = Settled {
            outcome: "stream_incomplete",
            status: 504,
            charged: true,
            estimated: false,
            prompt: None,
            completion: Some(3),
        };
        assert_settled_once(&gw, key, &expected).await;
    }
    // The gateway hung up on the two stalled streams (the JSON stalls are no streams).
    crate::common::wait_for_cancelled_streams(&gw.sim.simulator, 2).await;
    assert_eq!(gw.sim.simulator.stats().streams_cancelled, 2);
    assert_still_serves(&gw).await;
}

#[tokio::test]
async fn an_answer_that_is_not_json_or_not_a_stream_is_a_502_never_passed_through() {
    let gw = builder().start().await;
    let [json_key, sse_key, unary_key, stream_key] = four_keys(&gw).await;
    let not_json = || Fault::Raw {
        status: 200,
        content_type: "application/json".into(),
        body: "{\"id\": \"chatcmpl-1\", \"choices\": [ oops".into(),
    };
    let html_200 = || Fault::Raw {
        status: 200,
        content_type: "text/html".into(),
        body: "<html><body>Welcome to nginx!</body></html>".into(),
    };
    gw.sim.simulator.push_fault(not_json());
    let error = rest_json_error(&gw, &json_key, StatusCode::BAD_GATEWAY).await;
    assert_eq!(error["code"], "upstream_invalid_response");
    assert_eq!(error["type"], "upstream_error");
    gw.sim.simulator.push_fault(html_200());
    assert_eq!(
        grpc_unary(&gw, &unary_key).await.unwrap_err().code(),
        Code::Unavailable
    );
    // A stream request answered with a JSON body or an HTML page: no stream to relay.
    gw.sim.simulator.push_fault(not_json());
    match rest_sse(&gw, &sse_key).await {
        SseEnd::Refused(StatusCode::BAD_GATEWAY, error) => {
            assert_eq!(error["code"], "upstream_invalid_response");
            assert!(!error["message"].as_str().unwrap().contains("oops"));
        }
        other => panic!("{other:?}"),
    }
    gw.sim.simulator.push_fault(html_200());
    let (chunks, status) = grpc_stream(&gw, &stream_key).await;
    assert!(chunks.is_empty());
    assert_eq!(status.unwrap().code(), Code::Unavailable);
    for key in [&json_key, &sse_key, &unary_key, &stream_key] {
        assert_settled_once(&gw, key, &not_charged_502("upstream_error")).await;
    }
    assert_still_serves(&gw).await;
}

#[tokio::test]
async fn an_html_502_page_reaches_the_client_as_a_json_error() {
    let gw = builder().start().await;
    let [json_key, sse_key, unary_key, stream_key] = four_keys(&gw).await;
    for _ in 0..4 {
        gw.sim.simulator.push_fault(Fault::Raw {
            status: 502,
            content_type: "text/html".into(),
            body: "<html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center></body></html>".into(),
        });
    }
    let error = rest_json_error(&gw, &json_key, StatusCode::BAD_GATEWAY).await;
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains("502 (Bad Gateway)") && !message.contains('<'),
        "{message}"
    );
    match rest_sse(&gw, &sse_key).await {
        SseEnd::Refused(StatusCode::BAD_GATEWAY, error) => {
            assert!(!error["message"].as_str().unwrap().contains('<'));
        }
        other => panic!("{other:?}"),
    }
    let status = grpc_unary(&gw, &unary_key).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(!status.message().contains('<'), "{status:?}");
    let (chunks, status) = grpc_stream(&gw, &stream_key).await;
    assert!(chunks.is_empty());
    assert_eq!(status.unwrap().code(), Code::Unavailable);
    for key in [&json_key, &sse_key, &unary_key, &stream_key] {
        assert_settled_once(&gw, key, &not_charged_502("upstream_error")).await;
    }
    assert_still_serves(&gw).await;
}

#[tokio::test]
async fn junk_in_a_stream_never_reaches_the_client_and_an_error_event_ends_it_well_formed() {
    let gw = builder().start().await;
    let [junk_sse, junk_stream, error_sse, error_stream] = four_keys(&gw).await;
    let junk = || Fault::StreamInject {
        after: 4,
        raw: "garbage without a field\n\n: a comment\n\ndata: {not json\n\nevent: ping\n\n\
              data: [1, 2]\n\nretry: 10\n\n"
            .into(),
    };
    // Junk between the chunks: dropped, and the stream completes, charged exactly.
    gw.sim.simulator.push_fault(junk());
    let SseEnd::Stream(payloads) = rest_sse(&gw, &junk_sse).await else {
        panic!("a normal stream")
    };
    assert!(
        payloads.iter().all(|p| !p.contains("\"error\"")),
        "{payloads:?}"
    );
    let usage: Value = serde_json::from_str(&payloads[payloads.len() - 2]).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 12);
    gw.sim.simulator.push_fault(junk());
    let (chunks, status) = grpc_stream(&gw, &junk_stream).await;
    assert!(status.is_none(), "{status:?}");
    assert_eq!(chunks.last().unwrap().usage.unwrap().completion_tokens, 12);
    for key in [&junk_sse, &junk_stream] {
        let expected = Settled {
            outcome: "completed",
            status: 200,
            charged: true,
            estimated: false,
            prompt: None,
            completion: Some(12),
        };
        assert_settled_once(&gw, key, &expected).await;
    }

    // vLLM's in-stream error event after three tokens, then its `[DONE]`.
    gw.sim.simulator.push_fault(Fault::StreamErrorAfter(3));
    let SseEnd::Stream(payloads) = rest_sse(&gw, &error_sse).await else {
        panic!("the stream had begun")
    };
    assert!(
        error_event(&payloads)["message"]
            .as_str()
            .unwrap()
            .contains("engine failure")
    );
    gw.sim.simulator.push_fault(Fault::StreamErrorAfter(3));
    let (chunks, status) = grpc_stream(&gw, &error_stream).await;
    assert!(!chunks.is_empty());
    let status = status.unwrap();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().contains("engine failure"), "{status:?}");
    for key in [&error_sse, &error_stream] {
        let expected = Settled {
            outcome: "stream_incomplete",
            status: 200,
            charged: true,
            estimated: false,
            prompt: None,
            completion: Some(3),
        };
        assert_settled_once(&gw, key, &expected).await;
    }
    assert_still_serves(&gw).await;
}

#[tokio::test]
async fn an_oversized_answer_is_dropped_with_a_502_and_an_endless_line_ends_the_stream() {
    let gw = builder().start().await;
    let [json_key, sse_key, unary_key, stream_key] = four_keys(&gw).await;
    let limit = gw.config.upstream.max_response_bytes as u64;
    assert_eq!(limit, 16 * 1024 * 1024, "the documented default");

    // A 64 MiB JSON answer, sent without a length: refused once past the limit.
    gw.sim.simulator.push_fault(Fault::Oversized(64 << 20));
    let error = rest_json_error(&gw, &json_key, StatusCode::BAD_GATEWAY).await;
    assert_eq!(error["code"], "upstream_response_too_large");
    let sent = gw.sim.simulator.stats().fault_bytes_sent;
    assert!(sent > limit, "the upstream sent only {sent} bytes");
    gw.sim.simulator.push_fault(Fault::Oversized(64 << 20));
    let status = grpc_unary(&gw, &unary_key).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().contains("larger than"), "{status:?}");
    for key in [&json_key, &unary_key] {
        assert_settled_once(&gw, key, &not_charged_502("upstream_error")).await;
    }

    // A stream whose second event never ends: cut at the event limit.
    let before = gw.sim.simulator.stats().fault_bytes_sent;
    gw.sim.simulator.push_fault(Fault::Oversized(u64::MAX));
    let SseEnd::Stream(payloads) = rest_sse(&gw, &sse_key).await else {
        panic!("the stream had begun")
    };
    assert_eq!(
        error_event(&payloads)["code"],
        "upstream_response_too_large"
    );
    let sent = gw.sim.simulator.stats().fault_bytes_sent - before;
    let event_limit = gw.config.upstream.max_event_bytes as u64;
    assert_eq!(event_limit, 1024 * 1024, "the documented default");
    assert!(sent > event_limit, "the upstream sent only {sent} bytes");
    gw.sim.simulator.push_fault(Fault::Oversized(u64::MAX));
    let (chunks, status) = grpc_stream(&gw, &stream_key).await;
    assert_eq!(chunks.len(), 1, "the role chunk: {chunks:?}");
    assert_eq!(status.unwrap().code(), Code::Unavailable);
    // No usage came: the prompt estimate and one chunk seen, marked as an estimate.
    for key in [&sse_key, &stream_key] {
        let expected = Settled {
            outcome: "stream_incomplete",
            status: 502,
            charged: true,
            estimated: true,
            prompt: None,
            completion: Some(1),
        };
        assert_settled_once(&gw, key, &expected).await;
    }
    assert_still_serves(&gw).await;
}

#[tokio::test]
async fn a_trickle_is_ended_by_the_timeouts_not_waited_on_forever() {
    // Idle one second, total three: a byte every 50 ms never leaves the connection silent.
    let gw = builder().start().await;
    let [json_key, sse_key, unary_key, stream_key] = four_keys(&gw).await;
    for _ in 0..4 {
        gw.sim
            .simulator
            .push_fault(Fault::Trickle(Duration::from_millis(50)));
    }
    let (json, sse, unary, stream) = tokio::join!(
        rest_json_error(&gw, &json_key, StatusCode::GATEWAY_TIMEOUT),
        rest_sse(&gw, &sse_key),
        grpc_unary(&gw, &unary_key),
        grpc_stream(&gw, &stream_key),
    );
    // JSON: the total timeout ended it, after the upstream had sent bytes for a while.
    assert_eq!(json["code"], "upstream_timeout");
    assert_eq!(unary.unwrap_err().code(), Code::DeadlineExceeded);
    assert!(gw.sim.simulator.stats().fault_bytes_sent > 20);
    // Streams: bytes that never complete an event do not count as activity.
    let SseEnd::Stream(payloads) = sse else {
        panic!("the stream had begun: {sse:?}")
    };
    let error = error_event(&payloads);
    assert_eq!(error["code"], "upstream_timeout");
    let (chunks, status) = stream;
    assert_eq!(chunks.len(), 1, "the role chunk: {chunks:?}");
    assert_eq!(status.unwrap().code(), Code::Unavailable);
    for key in [&json_key, &unary_key] {
        let expected = Settled {
            outcome: "timed_out",
            status: 504,
            charged: true,
            estimated: true,
            prompt: None,
            completion: Some(0),
        };
        assert_settled_once(&gw, key, &expected).await;
    }
    for key in [&sse_key, &stream_key] {
        let expected = Settled {
            outcome: "stream_incomplete",
            status: 504,
            charged: true,
            estimated: true,
            prompt: None,
            completion: Some(1),
        };
        assert_settled_once(&gw, key, &expected).await;
    }
    assert_still_serves(&gw).await;
}

#[tokio::test]
async fn an_endless_stream_is_ended_by_the_total_timeout_and_charged_what_was_sent() {
    let gw = TestGateway::builder()
        .sim(|s| {
            s.reply_tokens = 60_000;
            s.reasoning_tokens = 0;
            s.token_latency = Duration::from_millis(2);
        })
        .config(|c| {
            c.upstream.max_retries = 0;
            c.upstream.idle_timeout_secs = 1;
            c.upstream.total_timeout_secs = 2;
        })
        .start()
        .await;
    let [sse_key, stream_key, _, _] = four_keys(&gw).await;
    let (sse, stream) = tokio::join!(rest_sse(&gw, &sse_key), grpc_stream(&gw, &stream_key));
    let SseEnd::Stream(payloads) = sse else {
        panic!("the stream had begun: {sse:?}")
    };
    assert_eq!(error_event(&payloads)["code"], "upstream_timeout");
    let (chunks, status) = stream;
    assert_eq!(status.unwrap().code(), Code::Unavailable);
    // Every token the client saw is charged, and no more than the upstream sent.
    let seen = [payloads.len() - 3, chunks.len() - 1];
    let sent = gw.sim.simulator.stats().completion_tokens_sent;
    for (key, seen) in [&sse_key, &stream_key].into_iter().zip(seen) {
        let expected = Settled {
            outcome: "stream_incomplete",
            status: 504,
            charged: true,
            estimated: false,
            prompt: None,
            completion: None,
        };
        let call = assert_settled_once(&gw, key, &expected).await;
        let charged = call["usage"]["completion_tokens"].as_u64().unwrap();
        assert!(
            charged as usize >= seen && charged <= sent,
            "{charged} vs seen {seen}, sent {sent}"
        );
        assert!(charged > 10 && charged < 60_000, "{call}");
    }
    crate::common::wait_for_cancelled_streams(&gw.sim.simulator, 2).await;
    assert_eq!(gw.sim.simulator.stats().streams_cancelled, 2);
    assert_still_serves(&gw).await;
}

/// The process's resident memory and its peak, in KiB, from `/proc/self/status`.
fn memory_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    };
    (field("VmRSS:"), field("VmHWM:"))
}

const RSS_CHILD: &str = "STEP3_FAULTS_RSS_CHILD";

/// Runs in a process of its own (the test binary again, this test only), so no other test
/// moves the memory figures.
#[tokio::test]
async fn a_256_mib_answer_is_refused_with_the_gateway_memory_bounded() {
    let name = "faults::a_256_mib_answer_is_refused_with_the_gateway_memory_bounded";
    if std::env::var_os(RSS_CHILD).is_none() {
        let output = tokio::task::spawn_blocking(move || {
            std::process::Command::new(std::env::current_exe().unwrap())
                .args([name, "--exact", "--nocapture", "--test-threads=1"])
                .env(RSS_CHILD, "1")
                .output()
        })
        .await
        .unwrap()
        .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{stdout}\n{stderr}");
        assert!(
            stdout.contains("1 passed"),
            "the child ran no test: {stdout}"
        );
        let figures = stderr.lines().find(|l| l.starts_with("memory:"));
        eprintln!(
            "{}",
            figures.unwrap_or_else(|| panic!("no figures: {stderr}"))
        );
        return;
    }
    let gw = builder().start().await;
    let key = gw.create_key(json!({})).await;
    // Warm up both kinds of call, so pools and buffers exist before the measurement.
    assert_still_serves(&gw).await;
    let (rss_before, _) = memory_kib();

    gw.sim.simulator.push_fault(Fault::Oversized(256 << 20));
    let error = rest_json_error(&gw, &key, StatusCode::BAD_GATEWAY).await;
    assert_eq!(error["code"], "upstream_response_too_large");
    let json_sent = gw.sim.simulator.stats().fault_bytes_sent;
    gw.sim.simulator.push_fault(Fault::Oversized(256 << 20));
    let SseEnd::Stream(payloads) = rest_sse(&gw, &key).await else {
        panic!("the stream had begun")
    };
    assert_eq!(
        error_event(&payloads)["code"],
        "upstream_response_too_large"
    );
    let stream_sent = gw.sim.simulator.stats().fault_bytes_sent - json_sent;
    let (rss_after, peak) = memory_kib();
    // The peak since the process began, less the resident size before: an upper bound
    // of what the two refusals cost.
    let growth_mib = peak.saturating_sub(rss_before) / 1024;
    eprintln!(
        "memory: resident before {} MiB, after {} MiB, peak {} MiB, peak growth at most {growth_mib} MiB; \
         upstream sent {} MiB (JSON) and {} MiB (SSE) before the gateway hung up",
        rss_before / 1024,
        rss_after / 1024,
        peak / 1024,
        json_sent >> 20,
        stream_sent >> 20,
    );
    // The upstream really sent past both limits: the refusal was not a shortcut.
    assert!(json_sent > 16 << 20, "{json_sent}");
    assert!(stream_sent > 1 << 20, "{stream_sent}");
    assert!(
        growth_mib < 64,
        "the gateway grew by up to {growth_mib} MiB"
    );

    // The meter sees the heap: touching 128 MiB moves the peak by about that much.
    let ballast = std::hint::black_box(vec![1u8; 128 << 20]);
    let (_, peak_with_ballast) = memory_kib();
    assert!(
        peak_with_ballast >= peak + 100 * 1024,
        "{peak} → {peak_with_ballast}"
    );
    drop(ballast);
    assert_still_serves(&gw).await;
}

#[tokio::test]
async fn an_error_page_that_never_ends_still_answers_its_status_in_time() {
    let gw = builder().start().await;
    let [json_key, sse_key, unary_key, stream_key] = four_keys(&gw).await;
    for _ in 0..4 {
        gw.sim
            .simulator
            .push_fault(Fault::TrickleErrorPage(Duration::from_millis(50)));
    }
    let (json, sse, unary, stream) = tokio::join!(
        rest_json_error(&gw, &json_key, StatusCode::BAD_GATEWAY),
        rest_sse(&gw, &sse_key),
        grpc_unary(&gw, &unary_key),
        grpc_stream(&gw, &stream_key),
    );
    // The page is given up on (within the idle timeout); its status is the answer.
    assert!(
        json["message"]
            .as_str()
            .unwrap()
            .contains("502 (Bad Gateway)"),
        "{json}"
    );
    assert!(
        matches!(sse, SseEnd::Refused(StatusCode::BAD_GATEWAY, _)),
        "{sse:?}"
    );
    assert_eq!(unary.unwrap_err().code(), Code::Unavailable);
    let (chunks, status) = stream;
    assert!(chunks.is_empty());
    assert_eq!(status.unwrap().code(), Code::Unavailable);
    assert!(gw.sim.simulator.stats().fault_bytes_sent > 4);
    for key in [&json_key, &sse_key, &unary_key, &stream_key] {
        assert_settled_once(&gw, key, &not_charged_502("upstream_error")).await;
    }
    assert_still_serves(&gw).await;
}

#[tokio::test]
async fn a_chunk_grpc_cannot_translate_ends_its_stream_settled_once() {
    let gw = builder().start().await;
    let key = gw.create_key(json!({})).await;
    gw.sim.simulator.push_fault(Fault::StreamInject {
        after: 2,
        raw: "data: {\"id\": 7, \"choices\": \"none\"}\n\n".into(),
    });
    let (chunks, status) = grpc_stream(&gw, &key).await;
    assert_eq!(chunks.len(), 3, "role and two tokens: {chunks:?}");
    let status = status.unwrap();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().contains("unreadable"), "{status:?}");
    let expected = Settled {
        outcome: "stream_incomplete",
        status: 502,
        charged: true,
        estimated: false,
        prompt: None,
        completion: Some(2),
    };
    assert_settled_once(&gw, &key, &expected).await;
    assert_still_serves(&gw).await;
}

#[tokio::test]
async fn a_json_answer_grpc_cannot_translate_is_the_upstreams_failure_not_a_completed_call() {
    let gw = builder().start().await;
    let key = gw.create_key(json!({})).await;
    gw.sim.simulator.push_fault(Fault::Raw {
        status: 200,
        content_type: "application/json".into(),
        body: r#"{"id": 7, "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}}"#
            .into(),
    });
    let status = grpc_unary(&gw, &key).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().contains("unreadable"), "{status:?}");
    // Not a served request, but the tokens the upstream reported are charged (as for any
    // upstream error that reports usage).
    let expected = Settled {
        outcome: "upstream_error",
        status: 502,
        charged: false,
        estimated: false,
        prompt: Some(3),
        completion: Some(4),
    };
    assert_settled_once(&gw, &key, &expected).await;
    assert_still_serves(&gw).await;
}
