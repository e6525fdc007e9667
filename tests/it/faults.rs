//! Faults from the model server, through every door (REST JSON, REST SSE, gRPC Complete,
//! gRPC StreamComplete): the client gets a well-formed answer, the call is settled exactly
//! once with what was really used, memory stays bounded, and the gateway serves on.
//!
//! Each fault is one row, run by [`run`]: the fault, and per door what the client sees and
//! what the books say. A row is a test of its own, named for what it shows.

use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::join_all;
use reqwest::StatusCode;
use serde_json::{Value, json};
use step3_gateway::config::GatewayConfig;
use step3_gateway::grpc::pb;
use step3_gateway::sim::Fault;
use tonic::Code;

use crate::common::{
    Builder, RestApi, TestGateway, TestKey, chat_body, chat_request, expect_error, sse_payloads,
    stream_body,
};

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

// ---- The table ------------------------------------------------------------------------

/// One fault from the model server and what each door's client and books must show.
struct Row {
    /// What the model server does with each door's call (unless the door names its own).
    fault: Fault,
    calls: Calls,
    /// The doors tried, in the order their calls are made; each with a fresh key, so each
    /// key's books hold exactly one call.
    doors: Vec<Cell>,
    upstream: Upstream,
}

/// How a row's calls are made.
enum Calls {
    /// Each door's fault is queued just before its call, and the next call waits for the
    /// answer. Doors may play different faults.
    OneAfterAnother,
    /// All faults are queued, then all calls made at once (for faults that take a timeout
    /// to end). Every door plays the row's fault.
    AtOnce,
}

/// What the model server must have seen once all of a row's calls are answered.
#[derive(Default)]
struct Upstream {
    chat_requests: Option<u64>,
    /// Streams the gateway hung up on (waited for, bounded).
    streams_cancelled: Option<u64>,
    /// The fault bytes sent must be more than this.
    fault_bytes_over: Option<u64>,
}

/// The four doors a chat call can come through.
#[derive(Clone, Copy, Debug)]
enum Door {
    /// REST, a JSON answer.
    Json,
    /// REST, `stream: true` asking for the final usage.
    Sse,
    /// gRPC `Complete`.
    Unary,
    /// gRPC `StreamComplete`.
    Stream,
}

/// One door of a row.
struct Cell {
    door: Door,
    /// The door's own fault, instead of the row's.
    fault: Option<Fault>,
    sees: Sees,
    settled: Settled,
}

impl Door {
    /// What this door's client sees and what the books say of its call.
    fn sees(self, sees: Sees, settled: Settled) -> Cell {
        Cell {
            door: self,
            fault: None,
            sees,
            settled,
        }
    }
}

impl Cell {
    /// Plays `fault` at this door instead of the row's.
    fn fault(mut self, fault: Fault) -> Cell {
        self.fault = Some(fault);
        self
    }
}

/// What a door's client must see.
#[derive(Debug)]
struct Sees {
    end: End,
    /// The OpenAI error's `code` (REST: the error body, or the SSE error event).
    code: Option<&'static str>,
    /// The OpenAI error's `type` (REST).
    kind: Option<&'static str>,
    /// Text the error's message (gRPC: the status message) must hold, and must not.
    says: Option<&'static str>,
    hides: Option<&'static str>,
    /// The gRPC stream's chunks before its end.
    chunks: Chunks,
    /// Bytes the model server must have sent during this call (one call after another).
    sent_over: Option<u64>,
}

#[derive(Debug)]
enum End {
    /// REST: refused with this status before any answer, with an OpenAI error.
    Refused(StatusCode),
    /// SSE: the stream began and ends with an error event just before `[DONE]`.
    ErrorEvent,
    /// gRPC: the call failed, or the stream ended, with this code.
    Ended(Code),
    /// The answer is whole, and tells the client this many completion tokens.
    Completed(u64),
}

#[derive(Debug)]
enum Chunks {
    Any,
    None,
    AtLeastOne,
    Exactly(usize),
    /// This many chunks with content.
    WithContent(usize),
}

fn refused(status: StatusCode) -> Sees {
    sees(End::Refused(status))
}

fn error_event() -> Sees {
    sees(End::ErrorEvent)
}

fn ended(code: Code) -> Sees {
    sees(End::Ended(code))
}

fn completed(completion_tokens: u64) -> Sees {
    sees(End::Completed(completion_tokens))
}

fn sees(end: End) -> Sees {
    Sees {
        end,
        code: None,
        kind: None,
        says: None,
        hides: None,
        chunks: Chunks::Any,
        sent_over: None,
    }
}

impl Sees {
    fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    fn kind(mut self, kind: &'static str) -> Self {
        self.kind = Some(kind);
        self
    }

    fn says(mut self, text: &'static str) -> Self {
        self.says = Some(text);
        self
    }

    fn hides(mut self, text: &'static str) -> Self {
        self.hides = Some(text);
        self
    }

    fn chunks(mut self, chunks: Chunks) -> Self {
        self.chunks = chunks;
        self
    }

    fn sent_over(mut self, bytes: u64) -> Self {
        self.sent_over = Some(bytes);
        self
    }
}

/// What the books must say about the one call a key made.
#[derive(Clone, Copy, Debug)]
struct Settled {
    outcome: &'static str,
    status: u16,
    charged: bool,
    estimated: bool,
    prompt: Tokens,
    completion: Tokens,
}

/// Tokens charged, as far as the test knows them.
#[derive(Clone, Copy, Debug)]
enum Tokens {
    Any,
    Positive,
    Exactly(u64),
}

/// A call the upstream failed before answering anything usable: logged, not charged.
fn not_charged_502(outcome: &'static str) -> Settled {
    Settled {
        outcome,
        status: 502,
        charged: false,
        estimated: false,
        prompt: Tokens::Exactly(0),
        completion: Tokens::Exactly(0),
    }
}

/// A stream that began and was cut: charged, with `completion` tokens.
fn incomplete(status: u16, estimated: bool, completion: u64) -> Settled {
    Settled {
        outcome: "stream_incomplete",
        status,
        charged: true,
        estimated,
        prompt: Tokens::Any,
        completion: Tokens::Exactly(completion),
    }
}

/// A JSON answer the gateway's timeout ended: the model worked, so the prompt is charged
/// as an estimate and nothing else.
fn timed_out(prompt: Tokens) -> Settled {
    Settled {
        outcome: "timed_out",
        status: 504,
        charged: true,
        estimated: true,
        prompt,
        completion: Tokens::Exactly(0),
    }
}

/// Runs one row on a fresh gateway: the calls, what each client saw, the model server's
/// figures, each call settled exactly once, and a normal call served afterwards.
async fn run(row: Row) {
    let gw = builder().start().await;
    let mut keys = Vec::new();
    for _ in &row.doors {
        keys.push(gw.create_key(json!({})).await);
    }
    let fault = |cell: &Cell| cell.fault.clone().unwrap_or_else(|| row.fault.clone());
    let mut answers = Vec::new();
    match row.calls {
        Calls::OneAfterAnother => {
            for (cell, key) in row.doors.iter().zip(&keys) {
                gw.sim.simulator.push_fault(fault(cell));
                let before = gw.sim.simulator.stats().fault_bytes_sent;
                let answer = call(&gw, cell.door, key).await;
                let sent = gw.sim.simulator.stats().fault_bytes_sent - before;
                answers.push((answer, Some(sent)));
            }
        }
        Calls::AtOnce => {
            for cell in &row.doors {
                assert!(
                    cell.fault.is_none(),
                    "{:?}: calls at once share one fault",
                    cell.door
                );
                gw.sim.simulator.push_fault(fault(cell));
            }
            let calls = row
                .doors
                .iter()
                .zip(&keys)
                .map(|(c, k)| call(&gw, c.door, k));
            answers.extend(join_all(calls).await.into_iter().map(|a| (a, None)));
        }
    }
    for (cell, (answer, sent)) in row.doors.iter().zip(&answers) {
        check(cell.door, &cell.sees, answer, *sent);
    }
    let stats = gw.sim.simulator.stats();
    if let Some(n) = row.upstream.chat_requests {
        assert_eq!(stats.chat_requests, n);
    }
    if let Some(bytes) = row.upstream.fault_bytes_over {
        assert!(stats.fault_bytes_sent > bytes, "{stats:?}");
    }
    for (cell, key) in row.doors.iter().zip(&keys) {
        assert_settled_once(&gw, key, &cell.settled).await;
    }
    if let Some(n) = row.upstream.streams_cancelled {
        crate::common::wait_for_cancelled_streams(&gw.sim.simulator, n).await;
        assert_eq!(gw.sim.simulator.stats().streams_cancelled, n);
    }
    assert_still_serves(&gw).await;
}

/// What a door's client got.
#[derive(Debug)]
enum Answer {
    /// REST, refused before any answer: the status and the OpenAI error (shape checked).
    Refused(StatusCode, Value),
    /// SSE: every `data:` payload, each checked to be JSON or the final `[DONE]`.
    Sse(Vec<String>),
    /// gRPC: the chunks that came (none for `Complete`) and the status the call or the
    /// stream ended with (`None`: a normal end, whose answer the table does not read).
    Grpc(Vec<pb::ChatChunk>, Option<tonic::Status>),
}

async fn call(gw: &TestGateway, door: Door, key: &TestKey) -> Answer {
    match door {
        Door::Json => rest_json(gw, key).await,
        Door::Sse => rest_sse(gw, key, 0).await,
        Door::Unary => Answer::Grpc(Vec::new(), grpc_unary(gw, key).await.err()),
        Door::Stream => {
            let (chunks, status) = grpc_stream(gw, key).await;
            Answer::Grpc(chunks, status)
        }
    }
}

/// Asserts that `answer` is what `sees` says, at `door`; `sent`: the fault bytes sent
/// during the call, where the call was made alone.
fn check(door: Door, sees: &Sees, answer: &Answer, sent: Option<u64>) {
    match (&sees.end, answer) {
        (End::Refused(expected), Answer::Refused(status, error)) => {
            assert_eq!(status, expected, "{door:?}: {error}");
            check_error(door, sees, error);
        }
        (End::ErrorEvent, Answer::Sse(payloads)) => {
            check_error(door, sees, &error_before_done(payloads))
        }
        (End::Ended(code), Answer::Grpc(chunks, Some(status))) => {
            assert_eq!(status.code(), *code, "{door:?}: {status:?}");
            check_message(door, sees, status.message());
            check_chunks(door, &sees.chunks, chunks);
            assert!(
                sees.code.is_none() && sees.kind.is_none(),
                "{door:?}: no OpenAI error"
            );
        }
        (End::Completed(tokens), Answer::Sse(payloads)) => {
            assert!(
                payloads.iter().all(|p| !p.contains("\"error\"")),
                "{door:?}: {payloads:?}"
            );
            let usage: Value = serde_json::from_str(&payloads[payloads.len() - 2]).unwrap();
            assert_eq!(
                usage["usage"]["completion_tokens"], *tokens,
                "{door:?}: {usage}"
            );
        }
        (End::Completed(tokens), Answer::Grpc(chunks, None)) => {
            check_chunks(door, &sees.chunks, chunks);
            let usage = chunks.last().unwrap().usage.unwrap();
            assert_eq!(usage.completion_tokens, *tokens, "{door:?}: {chunks:?}");
        }
        (end, answer) => panic!("{door:?}: expected {end:?}, got {answer:?}"),
    }
    if let Some(bytes) = sees.sent_over {
        let sent = sent.unwrap_or_else(|| panic!("{door:?}: sent_over needs calls one at a time"));
        assert!(
            sent > bytes,
            "{door:?}: the upstream sent only {sent} bytes"
        );
    }
}

/// The OpenAI error's code, type and message.
fn check_error(door: Door, sees: &Sees, error: &Value) {
    if let Some(code) = sees.code {
        assert_eq!(error["code"], code, "{door:?}: {error}");
    }
    if let Some(kind) = sees.kind {
        assert_eq!(error["type"], kind, "{door:?}: {error}");
    }
    check_message(door, sees, error["message"].as_str().unwrap());
}

fn check_message(door: Door, sees: &Sees, message: &str) {
    if let Some(text) = sees.says {
        assert!(
            message.contains(text),
            "{door:?}: {message:?} lacks {text:?}"
        );
    }
    if let Some(text) = sees.hides {
        assert!(
            !message.contains(text),
            "{door:?}: {message:?} shows {text:?}"
        );
    }
}

fn check_chunks(door: Door, expected: &Chunks, chunks: &[pb::ChatChunk]) {
    let ok = match expected {
        Chunks::Any => true,
        Chunks::None => chunks.is_empty(),
        Chunks::AtLeastOne => !chunks.is_empty(),
        Chunks::Exactly(n) => chunks.len() == *n,
        Chunks::WithContent(n) => {
            let content = chunks
                .iter()
                .filter(|c| c.choices.iter().any(|d| !d.content.is_empty()))
                .count();
            content == *n
        }
    };
    assert!(ok, "{door:?}: expected {expected:?} chunks, got {chunks:?}");
}

// ---- The doors ------------------------------------------------------------------------

/// A REST JSON call that must fail: its status and OpenAI error, checked for shape, never
/// HTML.
async fn rest_json(gw: &TestGateway, key: &TestKey) -> Answer {
    let response = gw.chat(&key.secret, &chat_body("json please")).await;
    let status = response.status();
    Answer::Refused(status, expect_error(response, status).await)
}

/// A REST stream asking for the final usage (and at most `max_tokens`, unless 0).
async fn rest_sse(gw: &TestGateway, key: &TestKey, max_tokens: u32) -> Answer {
    let mut body = stream_body("stream please");
    body["stream_options"] = json!({"include_usage": true});
    if max_tokens > 0 {
        body["max_tokens"] = json!(max_tokens);
    }
    let response = gw.chat(&key.secret, &body).await;
    if response.status() != StatusCode::OK {
        let status = response.status();
        return Answer::Refused(status, expect_error(response, status).await);
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
    Answer::Sse(payloads)
}

/// The SSE payloads of a stream that began; panics on a refusal.
fn sse_stream(answer: Answer) -> Vec<String> {
    match answer {
        Answer::Sse(payloads) => payloads,
        other => panic!("the stream had begun: {other:?}"),
    }
}

/// The error event just before `[DONE]`.
fn error_before_done(payloads: &[String]) -> Value {
    let error: Value = serde_json::from_str(&payloads[payloads.len() - 2]).unwrap();
    assert!(error["error"]["message"].is_string(), "{error}");
    error["error"].clone()
}

async fn grpc_unary(gw: &TestGateway, key: &TestKey) -> Result<pb::ChatResponse, tonic::Status> {
    let mut chat = gw.grpc_chat(&key.secret).await;
    chat.complete(chat_request("grpc please"))
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
        .stream_complete(chat_request("grpc stream please"))
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
    check_tokens(&call, "prompt_tokens", expected.prompt);
    check_tokens(&call, "completion_tokens", expected.completion);
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

fn check_tokens(call: &Value, field: &str, expected: Tokens) {
    let charged = &call["usage"][field];
    match expected {
        Tokens::Any => {}
        Tokens::Positive => assert!(charged.as_u64().unwrap() > 0, "{field}: {call}"),
        Tokens::Exactly(n) => assert_eq!(*charged, n, "{field}: {call}"),
    }
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
    let mut request = chat_request("still there?");
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
    let payloads = sse_stream(rest_sse(gw, &key, 8).await);
    assert!(payloads.iter().all(|p| !p.contains("\"error\"")));
}

// ---- The rows -------------------------------------------------------------------------

const BAD_GATEWAY: StatusCode = StatusCode::BAD_GATEWAY;
const GATEWAY_TIMEOUT: StatusCode = StatusCode::GATEWAY_TIMEOUT;

#[tokio::test]
async fn a_connection_reset_before_the_answer_is_a_502_on_every_door_and_charges_nothing() {
    let failed = not_charged_502("upstream_failed");
    run(Row {
        fault: Fault::DropConnection,
        calls: Calls::OneAfterAnother,
        doors: vec![
            Door::Json.sees(refused(BAD_GATEWAY).code("upstream_unavailable"), failed),
            Door::Sse.sees(refused(BAD_GATEWAY).code("upstream_unavailable"), failed),
            Door::Unary.sees(ended(Code::Unavailable), failed),
            Door::Stream.sees(ended(Code::Unavailable).chunks(Chunks::None), failed),
        ],
        upstream: Upstream {
            chat_requests: Some(4),
            ..Upstream::default()
        },
    })
    .await;
}

/// Non-streaming, the JSON answer breaks off after 40 bytes; streaming, the connection is
/// reset after five tokens.
#[tokio::test]
async fn a_reset_mid_answer_ends_streams_well_formed_and_charges_what_was_generated() {
    let failed = not_charged_502("upstream_failed");
    let five_tokens = || Fault::StreamCutAfter(5);
    run(Row {
        fault: Fault::JsonCutAfter(40),
        calls: Calls::OneAfterAnother,
        doors: vec![
            Door::Json.sees(refused(BAD_GATEWAY).code("upstream_unavailable"), failed),
            Door::Unary.sees(ended(Code::Unavailable), failed),
            Door::Sse
                .sees(
                    error_event().code("stream_incomplete"),
                    incomplete(200, false, 5),
                )
                .fault(five_tokens()),
            Door::Stream
                .sees(
                    ended(Code::Unavailable).chunks(Chunks::WithContent(5)),
                    incomplete(200, false, 5),
                )
                .fault(five_tokens()),
        ],
        upstream: Upstream::default(),
    })
    .await;
}

/// The JSON answers were half there: the model worked, so the prompt is charged as an
/// estimate. The streams reported usage with every chunk: exactly the three tokens sent.
/// The gateway hangs up on the two stalled streams (the JSON stalls are no streams).
#[tokio::test]
async fn a_stalled_answer_is_ended_by_the_idle_timeout_and_the_upstream_is_hung_up() {
    let json_timed_out = timed_out(Tokens::Positive);
    let stream_cut = incomplete(504, false, 3);
    run(Row {
        fault: Fault::StreamStallAfter(3),
        calls: Calls::AtOnce,
        doors: vec![
            Door::Json.sees(
                refused(GATEWAY_TIMEOUT).code("upstream_timeout"),
                json_timed_out,
            ),
            Door::Sse.sees(error_event().code("upstream_timeout"), stream_cut),
            Door::Unary.sees(ended(Code::DeadlineExceeded), json_timed_out),
            Door::Stream.sees(
                ended(Code::Unavailable).chunks(Chunks::AtLeastOne),
                stream_cut,
            ),
        ],
        upstream: Upstream {
            streams_cancelled: Some(2),
            ..Upstream::default()
        },
    })
    .await;
}

/// A JSON body that does not parse, or an HTML page with a 200, to both kinds of request:
/// no stream to relay, and nothing passed through.
#[tokio::test]
async fn an_answer_that_is_not_json_or_not_a_stream_is_a_502_never_passed_through() {
    let failed = not_charged_502("upstream_error");
    let html_200 = || Fault::Raw {
        status: 200,
        content_type: "text/html".into(),
        body: "<html><body>Welcome to nginx!</body></html>".into(),
    };
    let invalid = || {
        refused(BAD_GATEWAY)
            .code("upstream_invalid_response")
            .kind("upstream_error")
    };
    run(Row {
        fault: Fault::Raw {
            status: 200,
            content_type: "application/json".into(),
            body: "{\"id\": \"chatcmpl-1\", \"choices\": [ oops".into(),
        },
        calls: Calls::OneAfterAnother,
        doors: vec![
            Door::Json.sees(invalid(), failed),
            Door::Unary
                .sees(ended(Code::Unavailable), failed)
                .fault(html_200()),
            Door::Sse.sees(invalid().hides("oops"), failed),
            Door::Stream
                .sees(ended(Code::Unavailable).chunks(Chunks::None), failed)
                .fault(html_200()),
        ],
        upstream: Upstream::default(),
    })
    .await;
}

#[tokio::test]
async fn an_html_502_page_reaches_the_client_as_a_json_error() {
    let failed = not_charged_502("upstream_error");
    run(Row {
        fault: Fault::Raw {
            status: 502,
            content_type: "text/html".into(),
            body: "<html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center></body></html>".into(),
        },
        calls: Calls::OneAfterAnother,
        doors: vec![
            Door::Json.sees(
                refused(BAD_GATEWAY).says("502 (Bad Gateway)").hides("<"),
                failed,
            ),
            Door::Sse.sees(refused(BAD_GATEWAY).hides("<"), failed),
            Door::Unary.sees(ended(Code::Unavailable).hides("<"), failed),
            Door::Stream.sees(ended(Code::Unavailable).chunks(Chunks::None), failed),
        ],
        upstream: Upstream::default(),
    })
    .await;
}

/// Junk between the chunks is dropped, and the stream completes, charged exactly.
#[tokio::test]
async fn junk_in_a_stream_never_reaches_the_client_and_the_stream_completes() {
    let exact = Settled {
        outcome: "completed",
        status: 200,
        charged: true,
        estimated: false,
        prompt: Tokens::Any,
        completion: Tokens::Exactly(12),
    };
    run(Row {
        fault: Fault::StreamInject {
            after: 4,
            raw: "garbage without a field\n\n: a comment\n\ndata: {not json\n\nevent: ping\n\n\
                  data: [1, 2]\n\nretry: 10\n\n"
                .into(),
        },
        calls: Calls::OneAfterAnother,
        doors: vec![
            Door::Sse.sees(completed(12), exact),
            Door::Stream.sees(completed(12), exact),
        ],
        upstream: Upstream::default(),
    })
    .await;
}

/// vLLM's in-stream error event after three tokens, then its `[DONE]`.
#[tokio::test]
async fn an_error_event_in_a_stream_ends_it_well_formed_and_charges_what_was_generated() {
    let cut = incomplete(200, false, 3);
    run(Row {
        fault: Fault::StreamErrorAfter(3),
        calls: Calls::OneAfterAnother,
        doors: vec![
            Door::Sse.sees(error_event().says("engine failure"), cut),
            Door::Stream.sees(
                ended(Code::Unavailable)
                    .says("engine failure")
                    .chunks(Chunks::AtLeastOne),
                cut,
            ),
        ],
        upstream: Upstream::default(),
    })
    .await;
}

/// A 64 MiB JSON answer, sent without a length, is refused once past the 16 MiB response
/// limit; a stream whose second event never ends is cut at the 1 MiB event limit (both
/// the documented defaults: `the_size_limits_are_the_documented_defaults`). No usage came
/// from the stream: the prompt estimate and the one chunk seen, marked as an estimate.
#[tokio::test]
async fn an_oversized_answer_is_dropped_with_a_502_and_an_endless_line_ends_the_stream() {
    let failed = not_charged_502("upstream_error");
    let estimated = incomplete(502, true, 1);
    let endless_line = || Fault::Oversized(u64::MAX);
    run(Row {
        fault: Fault::Oversized(64 << 20),
        calls: Calls::OneAfterAnother,
        doors: vec![
            Door::Json.sees(
                refused(BAD_GATEWAY)
                    .code("upstream_response_too_large")
                    .sent_over(16 << 20),
                failed,
            ),
            Door::Unary.sees(ended(Code::Unavailable).says("larger than"), failed),
            Door::Sse
                .sees(
                    error_event()
                        .code("upstream_response_too_large")
                        .sent_over(1 << 20),
                    estimated,
                )
                .fault(endless_line()),
            Door::Stream
                .sees(
                    ended(Code::Unavailable).chunks(Chunks::Exactly(1)),
                    estimated,
                )
                .fault(endless_line()),
        ],
        upstream: Upstream::default(),
    })
    .await;
}

/// Idle one second, total three: a byte every 50 ms never leaves the connection silent, so
/// the total timeout ends the JSON answers; bytes that never complete an event do not count
/// as activity, so the idle timeout ends the streams after the role chunk.
#[tokio::test]
async fn a_trickle_is_ended_by_the_timeouts_not_waited_on_forever() {
    let json_timed_out = timed_out(Tokens::Any);
    let stream_cut = incomplete(504, true, 1);
    run(Row {
        fault: Fault::Trickle(Duration::from_millis(50)),
        calls: Calls::AtOnce,
        doors: vec![
            Door::Json.sees(
                refused(GATEWAY_TIMEOUT).code("upstream_timeout"),
                json_timed_out,
            ),
            Door::Sse.sees(error_event().code("upstream_timeout"), stream_cut),
            Door::Unary.sees(ended(Code::DeadlineExceeded), json_timed_out),
            Door::Stream.sees(
                ended(Code::Unavailable).chunks(Chunks::Exactly(1)),
                stream_cut,
            ),
        ],
        upstream: Upstream {
            fault_bytes_over: Some(20),
            ..Upstream::default()
        },
    })
    .await;
}

/// The page is given up on (within the idle timeout); its status is the answer.
#[tokio::test]
async fn an_error_page_that_never_ends_still_answers_its_status_in_time() {
    let failed = not_charged_502("upstream_error");
    run(Row {
        fault: Fault::TrickleErrorPage(Duration::from_millis(50)),
        calls: Calls::AtOnce,
        doors: vec![
            Door::Json.sees(refused(BAD_GATEWAY).says("502 (Bad Gateway)"), failed),
            Door::Sse.sees(refused(BAD_GATEWAY), failed),
            Door::Unary.sees(ended(Code::Unavailable), failed),
            Door::Stream.sees(ended(Code::Unavailable).chunks(Chunks::None), failed),
        ],
        upstream: Upstream {
            fault_bytes_over: Some(4),
            ..Upstream::default()
        },
    })
    .await;
}

/// The role chunk and two tokens, then a chunk gRPC cannot translate.
#[tokio::test]
async fn a_chunk_grpc_cannot_translate_ends_its_stream_settled_once() {
    run(Row {
        fault: Fault::StreamInject {
            after: 2,
            raw: "data: {\"id\": 7, \"choices\": \"none\"}\n\n".into(),
        },
        calls: Calls::OneAfterAnother,
        doors: vec![
            Door::Stream.sees(
                ended(Code::Unavailable)
                    .says("unreadable")
                    .chunks(Chunks::Exactly(3)),
                incomplete(502, false, 2),
            ),
        ],
        upstream: Upstream::default(),
    })
    .await;
}

/// Not a served request, but the tokens the upstream reported are charged (as for any
/// upstream error that reports usage).
#[tokio::test]
async fn a_json_answer_grpc_cannot_translate_is_the_upstreams_failure_not_a_completed_call() {
    let reported = Settled {
        outcome: "upstream_error",
        status: 502,
        charged: false,
        estimated: false,
        prompt: Tokens::Exactly(3),
        completion: Tokens::Exactly(4),
    };
    run(Row {
        fault: Fault::Raw {
            status: 200,
            content_type: "application/json".into(),
            body:
                r#"{"id": 7, "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}}"#
                    .into(),
        },
        calls: Calls::OneAfterAnother,
        doors: vec![Door::Unary.sees(ended(Code::Unavailable).says("unreadable"), reported)],
        upstream: Upstream::default(),
    })
    .await;
}

// ---- Beyond the table -----------------------------------------------------------------

/// The limits the oversized row's byte counts stand on.
#[test]
fn the_size_limits_are_the_documented_defaults() {
    let upstream = GatewayConfig::default().upstream;
    assert_eq!(upstream.max_response_bytes, 16 * 1024 * 1024);
    assert_eq!(upstream.max_event_bytes, 1024 * 1024);
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
    let sse_key = gw.create_key(json!({})).await;
    let stream_key = gw.create_key(json!({})).await;
    let (sse, stream) = tokio::join!(rest_sse(&gw, &sse_key, 0), grpc_stream(&gw, &stream_key));
    let payloads = sse_stream(sse);
    assert_eq!(error_before_done(&payloads)["code"], "upstream_timeout");
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
            prompt: Tokens::Any,
            completion: Tokens::Any,
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
    let too_large = refused(BAD_GATEWAY).code("upstream_response_too_large");
    check(Door::Json, &too_large, &rest_json(&gw, &key).await, None);
    let json_sent = gw.sim.simulator.stats().fault_bytes_sent;
    gw.sim.simulator.push_fault(Fault::Oversized(256 << 20));
    let cut = error_event().code("upstream_response_too_large");
    check(Door::Sse, &cut, &rest_sse(&gw, &key, 0).await, None);
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
