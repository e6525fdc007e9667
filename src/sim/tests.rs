use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

use super::prompt::estimate_prompt_tokens;
use super::*;

async fn start(config: SimulatorConfig) -> RunningSimulator {
    Simulator::new(config)
        .spawn(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap()
}

/// `config` with the embedding model, which the simulator only serves when asked to.
fn with_embeddings(config: SimulatorConfig) -> SimulatorConfig {
    SimulatorConfig {
        embedding_model: Some(DEFAULT_EMBEDDING_MODEL.to_owned()),
        ..config
    }
}

fn chat_url(sim: &RunningSimulator) -> String {
    format!("{}/v1/chat/completions", sim.url())
}

fn hello(extra: Value) -> Value {
    let mut body = json!({
        "model": DEFAULT_MODEL,
        "messages": [{"role": "user", "content": "Describe this picture, please."}],
    });
    for (key, value) in extra.as_object().unwrap() {
        body[key] = value.clone();
    }
    body
}

async fn post(sim: &RunningSimulator, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(chat_url(sim))
        .json(body)
        .send()
        .await
        .unwrap()
}

/// Splits an SSE body into its `data:` payloads.
fn events(body: &str) -> Vec<String> {
    assert!(body.ends_with("\n\n"), "unterminated event in {body:?}");
    body.split_terminator("\n\n")
        .map(|event| event.strip_prefix("data: ").unwrap().to_owned())
        .collect()
}

fn json_events(events: &[String]) -> Vec<Value> {
    events
        .iter()
        .filter(|e| *e != "[DONE]")
        .map(|e| serde_json::from_str(e).unwrap())
        .collect()
}

async fn stream_events(sim: &RunningSimulator, body: &Value) -> Vec<String> {
    let response = post(sim, body).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    events(&response.text().await.unwrap())
}

/// Concatenated `delta.<field>` of all chunks.
fn collect_delta(chunks: &[Value], field: &str) -> String {
    chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"][field].as_str())
        .collect()
}

async fn wait_for(sim: &Simulator, what: &str, done: impl Fn(SimStats) -> bool) -> SimStats {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let stats = sim.stats();
        if done(stats) {
            return stats;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

const PROMPT: u64 = 4 + 8; // "Describe this picture, please." is 30 chars.

#[test]
fn prompt_estimate_counts_text_and_images() {
    let messages = json!([
        {"role": "system", "content": "abcd"},
        {"role": "user", "content": [
            {"type": "text", "text": "abcde"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
        ]},
        {"role": "assistant", "content": null},
    ]);
    let expected = (4 + 1) + (4 + 2 + 2 * 256) + 4;
    assert_eq!(
        estimate_prompt_tokens(messages.as_array().unwrap()),
        expected
    );
}

#[tokio::test]
async fn health_and_models() {
    let sim = start(SimulatorConfig::default()).await;
    let client = reqwest::Client::new();
    let health = client
        .get(format!("{}/health", sim.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    assert!(health.bytes().await.unwrap().is_empty());

    let models: Value = client
        .get(format!("{}/v1/models", sim.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["object"], "list");
    let model = &models["data"][0];
    assert_eq!(model["id"], DEFAULT_MODEL);
    assert_eq!(model["root"], DEFAULT_MODEL);
    assert_eq!(model["owned_by"], "vllm");
    assert_eq!(model["max_model_len"], 65_536);
    assert!(model["created"].as_u64().unwrap() > 0);
    sim.shutdown().await;
}

#[tokio::test]
async fn json_completion_shape_and_usage() {
    let sim = start(SimulatorConfig::default()).await;
    let response = post(&sim, &hello(json!({}))).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "application/json");
    let body: Value = response.json().await.unwrap();

    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], DEFAULT_MODEL);
    assert_eq!(body["prompt_logprobs"], Value::Null);
    let choice = &body["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["finish_reason"], "stop");
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["message"]["reasoning_content"], "Let me think about");
    let content = choice["message"]["content"].as_str().unwrap();
    assert!(
        content.starts_with("The question was about this picture. This reply comes"),
        "{content}"
    );
    // One word per token: 24 tokens, 4 of them reasoning.
    assert_eq!(content.split_whitespace().count(), 20, "{content}");
    assert_eq!(choice["message"]["tool_calls"], json!([]));

    let usage = &body["usage"];
    assert_eq!(usage["prompt_tokens"], PROMPT);
    assert_eq!(usage["completion_tokens"], 24);
    assert_eq!(usage["total_tokens"], PROMPT + 24);

    let stats = sim.simulator.stats();
    assert_eq!(stats.chat_requests, 1);
    assert_eq!(stats.completion_tokens_sent, 24);
    sim.shutdown().await;
}

#[tokio::test]
async fn max_tokens_cuts_with_length() {
    let sim = start(SimulatorConfig::default()).await;
    let body: Value = post(&sim, &hello(json!({"max_tokens": 6})))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(body["usage"]["completion_tokens"], 6);
    assert_eq!(body["choices"][0]["message"]["content"], "The question");

    // max_completion_tokens wins over max_tokens; all-reasoning leaves content null.
    let body: Value = post(
        &sim,
        &hello(json!({"max_tokens": 6, "max_completion_tokens": 3})),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(body["usage"]["completion_tokens"], 3);
    assert_eq!(
        body["choices"][0]["message"]["reasoning_content"],
        "Let me think"
    );
    assert_eq!(body["choices"][0]["message"]["content"], Value::Null);

    // A limit above the reply length does not cut it.
    let body: Value = post(&sim, &hello(json!({"max_tokens": 100})))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(body["usage"]["completion_tokens"], 24);
    sim.shutdown().await;
}

#[tokio::test]
async fn stream_without_usage() {
    let config = SimulatorConfig {
        reply_tokens: 6,
        reasoning_tokens: 2,
        ..SimulatorConfig::default()
    };
    let sim = start(config).await;
    let events = stream_events(&sim, &hello(json!({"stream": true}))).await;
    // role, 6 tokens, finish, [DONE]
    assert_eq!(events.len(), 9, "{events:?}");
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks = json_events(&events);
    for chunk in &chunks {
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["id"], chunks[0]["id"]);
        assert_eq!(chunk["model"], DEFAULT_MODEL);
        assert!(chunk.get("usage").is_none(), "{chunk}");
    }
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    // Reasoning chunks strictly precede content chunks.
    let kinds: Vec<&str> = chunks[1..7]
        .iter()
        .map(|c| {
            let delta = c["choices"][0]["delta"].as_object().unwrap();
            assert_eq!(delta.len(), 1, "{delta:?}");
            delta.keys().next().unwrap().as_str()
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "reasoning_content",
            "reasoning_content",
            "content",
            "content",
            "content",
            "content"
        ]
    );
    assert_eq!(collect_delta(&chunks, "reasoning_content"), "Let me");
    assert_eq!(collect_delta(&chunks, "content"), "The question was about");
    let finish = &chunks[7]["choices"][0];
    assert_eq!(finish["delta"], json!({}));
    assert_eq!(finish["finish_reason"], "stop");
    assert!(
        chunks[..7]
            .iter()
            .all(|c| c["choices"][0]["finish_reason"].is_null())
    );

    let stats = wait_for(&sim.simulator, "finished stream", |s| {
        s.streams_finished == 1
    })
    .await;
    assert_eq!(stats.completion_tokens_sent, 6);
    assert_eq!(stats.streams_cancelled, 0);
    sim.shutdown().await;
}

#[tokio::test]
async fn stream_include_usage_adds_final_usage_chunk() {
    let sim = start(SimulatorConfig::default()).await;
    let body = hello(json!({
        "stream": true,
        "max_tokens": 5,
        "stream_options": {"include_usage": true},
    }));
    let events = stream_events(&sim, &body).await;
    // role, 5 tokens, finish, usage, [DONE]
    assert_eq!(events.len(), 9, "{events:?}");
    let chunks = json_events(&events);
    assert_eq!(chunks[6]["choices"][0]["finish_reason"], "length");
    let usage = &chunks[7];
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["prompt_tokens"], PROMPT);
    assert_eq!(usage["usage"]["completion_tokens"], 5);
    assert_eq!(usage["usage"]["total_tokens"], PROMPT + 5);
    assert!(chunks[..7].iter().all(|c| c.get("usage").is_none()));
    sim.shutdown().await;
}

#[tokio::test]
async fn stream_continuous_usage_on_every_chunk() {
    let config = SimulatorConfig {
        reply_tokens: 3,
        ..SimulatorConfig::default()
    };
    let sim = start(config).await;
    let body = hello(json!({
        "stream": true,
        "stream_options": {"include_usage": true, "continuous_usage_stats": true},
    }));
    let events = stream_events(&sim, &body).await;
    let chunks = json_events(&events);
    // role, 3 tokens, finish, usage
    let completion: Vec<u64> = chunks
        .iter()
        .map(|c| {
            assert_eq!(c["usage"]["prompt_tokens"], PROMPT);
            let n = c["usage"]["completion_tokens"].as_u64().unwrap();
            assert_eq!(c["usage"]["total_tokens"].as_u64().unwrap(), PROMPT + n);
            n
        })
        .collect();
    assert_eq!(completion, [0, 1, 2, 3, 3, 3]);
    assert_eq!(events.last().unwrap(), "[DONE]");
    sim.shutdown().await;
}

#[tokio::test]
async fn status_fault_then_normal() {
    let sim = start(SimulatorConfig::default()).await;
    let error = r#"{"error":{"message":"overloaded","type":"ServiceUnavailableError","param":null,"code":503}}"#;
    sim.simulator.push_fault(Fault::Status {
        status: 503,
        body: error.to_owned(),
    });
    sim.simulator.push_fault(Fault::Status {
        status: 429,
        body: "{}".to_owned(),
    });
    let first = post(&sim, &hello(json!({}))).await;
    assert_eq!(first.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(first.headers()["content-type"], "application/json");
    assert_eq!(first.text().await.unwrap(), error);
    assert_eq!(post(&sim, &hello(json!({}))).await.status(), 429);
    assert_eq!(post(&sim, &hello(json!({}))).await.status(), 200);
    sim.shutdown().await;
}

#[tokio::test]
async fn delay_fault_delays_first_byte() {
    let sim = start(SimulatorConfig::default()).await;
    sim.simulator
        .push_fault(Fault::Delay(Duration::from_millis(150)));
    let started = Instant::now();
    let response = post(&sim, &hello(json!({}))).await;
    assert!(started.elapsed() >= Duration::from_millis(150));
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.json::<Value>().await.unwrap()["usage"]["completion_tokens"],
        24
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn drop_connection_is_a_client_error_before_any_status() {
    let sim = start(SimulatorConfig::default()).await;
    let client = reqwest::Client::new();
    for body in [hello(json!({})), hello(json!({"stream": true}))] {
        sim.simulator.push_fault(Fault::DropConnection);
        let result = client.post(chat_url(&sim)).json(&body).send().await;
        let err = result.expect_err("a dropped connection must not yield a response");
        assert!(!err.is_status() && err.status().is_none(), "{err:?}");
    }
    // The server keeps working for later requests on fresh connections.
    let ok = client
        .post(chat_url(&sim))
        .json(&hello(json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    sim.shutdown().await;
}

#[tokio::test]
async fn stream_cut_fault_aborts_mid_body() {
    let sim = start(SimulatorConfig::default()).await;
    sim.simulator.push_fault(Fault::StreamCutAfter(3));
    let mut response = post(&sim, &hello(json!({"stream": true}))).await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut received = Vec::new();
    let err = loop {
        match response.chunk().await {
            Ok(Some(bytes)) => received.extend_from_slice(&bytes),
            Ok(None) => panic!("body ended cleanly; expected an abort"),
            Err(err) => break err,
        }
    };
    assert!(
        err.is_body() || err.is_decode() || err.is_request(),
        "{err:?}"
    );
    let events = events(std::str::from_utf8(&received).unwrap());
    assert_eq!(events.len(), 4, "role + 3 tokens: {events:?}");
    assert!(!events.iter().any(|e| e == "[DONE]"));

    let stats = sim.simulator.stats();
    assert_eq!(stats.completion_tokens_sent, 3);
    assert_eq!((stats.streams_finished, stats.streams_cancelled), (0, 0));
    sim.shutdown().await;
}

#[tokio::test]
async fn stream_end_fault_closes_cleanly_without_done() {
    let sim = start(SimulatorConfig::default()).await;
    sim.simulator.push_fault(Fault::StreamEndAfter(2));
    let events = stream_events(&sim, &hello(json!({"stream": true}))).await;
    assert_eq!(events.len(), 3, "role + 2 tokens: {events:?}");
    assert!(!events.iter().any(|e| e == "[DONE]"));
    let stats = sim.simulator.stats();
    assert_eq!((stats.streams_finished, stats.streams_cancelled), (0, 0));
    sim.shutdown().await;
}

#[tokio::test]
async fn stream_error_fault_sends_error_event_then_done() {
    let sim = start(SimulatorConfig::default()).await;
    sim.simulator.push_fault(Fault::StreamErrorAfter(2));
    let body = hello(json!({"stream": true, "stream_options": {"include_usage": true}}));
    let events = stream_events(&sim, &body).await;
    // role, 2 tokens, error, [DONE]: no finish chunk, no usage.
    assert_eq!(events.len(), 5, "{events:?}");
    let error: Value = serde_json::from_str(&events[3]).unwrap();
    assert_eq!(error["error"]["type"], "InternalServerError");
    assert_eq!(error["error"]["code"], 500);
    assert!(error["error"]["message"].is_string());
    assert_eq!(events[4], "[DONE]");
    let stats = wait_for(&sim.simulator, "finished stream", |s| {
        s.streams_finished == 1
    })
    .await;
    assert_eq!(stats.completion_tokens_sent, 2);
    sim.shutdown().await;
}

#[tokio::test]
async fn stream_fault_beyond_reply_fires_before_finish() {
    let config = SimulatorConfig {
        reply_tokens: 2,
        ..SimulatorConfig::default()
    };
    let sim = start(config).await;
    sim.simulator.push_fault(Fault::StreamEndAfter(50));
    let events = stream_events(&sim, &hello(json!({"stream": true}))).await;
    assert_eq!(events.len(), 3, "role + 2 tokens, no finish: {events:?}");
    sim.shutdown().await;
}

#[tokio::test]
async fn no_usage_fault() {
    let sim = start(SimulatorConfig::default()).await;
    sim.simulator.push_fault(Fault::NoUsage);
    let body: Value = post(&sim, &hello(json!({}))).await.json().await.unwrap();
    assert!(body.get("usage").is_none(), "{body}");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");

    sim.simulator.push_fault(Fault::NoUsage);
    let body = hello(json!({
        "stream": true,
        "stream_options": {"include_usage": true, "continuous_usage_stats": true},
    }));
    let events = stream_events(&sim, &body).await;
    assert_eq!(events.len(), 24 + 3, "role, tokens, finish, [DONE]");
    assert!(
        json_events(&events)
            .iter()
            .all(|c| c.get("usage").is_none())
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn client_disconnect_cancels_stream() {
    let config = SimulatorConfig {
        token_latency: Duration::from_millis(20),
        ..SimulatorConfig::default()
    };
    let sim = start(config).await;
    let mut response = post(&sim, &hello(json!({"stream": true}))).await;
    let mut received = String::new();
    // role chunk + 2 token chunks
    while received.matches("\n\n").count() < 3 {
        let bytes = response.chunk().await.unwrap().unwrap();
        received.push_str(std::str::from_utf8(&bytes).unwrap());
    }
    drop(response);

    let stats = wait_for(&sim.simulator, "cancelled stream", |s| {
        s.streams_cancelled == 1
    })
    .await;
    assert!(stats.completion_tokens_sent < 24, "{stats:?}");
    assert_eq!(stats.streams_finished, 0);
    // No further tokens are produced once the stream is gone.
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert_eq!(sim.simulator.stats(), stats);
    sim.shutdown().await;
}

#[tokio::test]
async fn api_key_is_enforced_on_v1_routes() {
    let config = SimulatorConfig {
        api_key: Some("sekrit".to_owned()),
        ..SimulatorConfig::default()
    };
    let sim = start(config).await;
    let client = reqwest::Client::new();

    let health = client
        .get(format!("{}/health", sim.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    let models = client
        .get(format!("{}/v1/models", sim.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(models.status(), StatusCode::UNAUTHORIZED);

    for auth in [
        None,
        Some("Bearer wrong"),
        Some("bearer sekrit"),
        Some("sekrit"),
    ] {
        let mut request = client.post(chat_url(&sim)).json(&hello(json!({})));
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{auth:?}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], 401);
        assert_eq!(body["error"]["message"], "Unauthorized");
    }

    // Faults are only consumed by requests that pass the key check.
    sim.simulator.push_fault(Fault::Status {
        status: 502,
        body: "{}".to_owned(),
    });
    let unauthorised = client
        .post(chat_url(&sim))
        .json(&hello(json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthorised.status(), StatusCode::UNAUTHORIZED);
    let faulted = client
        .post(chat_url(&sim))
        .bearer_auth("sekrit")
        .json(&hello(json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(faulted.status(), StatusCode::BAD_GATEWAY);
    let ok = client
        .post(chat_url(&sim))
        .bearer_auth("sekrit")
        .json(&hello(json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    sim.shutdown().await;
}

#[tokio::test]
async fn invalid_requests_get_vllm_errors() {
    let sim = start(SimulatorConfig {
        max_model_len: 100,
        ..SimulatorConfig::default()
    })
    .await;
    let client = reqwest::Client::new();

    let bad_json = client
        .post(chat_url(&sim))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(bad_json.status(), StatusCode::BAD_REQUEST);
    let body: Value = bad_json.json().await.unwrap();
    assert_eq!(body["error"]["type"], "BadRequestError");
    assert_eq!(body["error"]["code"], 400);
    assert_eq!(body["error"]["param"], Value::Null);
    assert!(body["error"]["message"].is_string());

    let unknown = post(&sim, &json!({"model": "gpt-4o", "messages": []})).await;
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    let body: Value = unknown.json().await.unwrap();
    assert_eq!(
        body,
        json!({"error": {
            "message": "The model `gpt-4o` does not exist.",
            "type": "NotFoundError",
            "param": "model",
            "code": 404,
        }})
    );

    let cases = [
        json!({"model": DEFAULT_MODEL}),
        json!({"model": DEFAULT_MODEL, "messages": "hi"}),
        hello(json!({"max_tokens": 0})),
        hello(json!({"max_tokens": -1})),
        hello(json!({"stream_options": {"include_usage": true}})),
        hello(json!({"max_tokens": 90})), // 12 prompt + 90 > 100
        json!({"messages": [{"role": "user", "content": "x".repeat(400)}]}),
    ];
    for case in cases {
        let response = post(&sim, &case).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{case}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["type"], "BadRequestError", "{case}");
    }

    // Without max_tokens the reply is bounded by what is left of the context window.
    let tight = json!({"messages": [{"role": "user", "content": "x".repeat(352)}]});
    let body: Value = post(&sim, &tight).await.json().await.unwrap();
    assert_eq!(body["usage"]["prompt_tokens"], 92);
    assert_eq!(body["usage"]["completion_tokens"], 8);
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    sim.shutdown().await;
}

#[tokio::test]
async fn records_requests_in_order() {
    let sim = start(SimulatorConfig::default()).await;
    let client = reqwest::Client::new();
    let first = hello(json!({"max_tokens": 3}));
    client
        .post(chat_url(&sim))
        .header("x-request-id", "req-1")
        .json(&first)
        .send()
        .await
        .unwrap();
    client
        .post(chat_url(&sim))
        .body("garbage")
        .send()
        .await
        .unwrap();

    let requests = sim.simulator.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[0].headers["x-request-id"], "req-1");
    assert_eq!(requests[0].body, first);
    assert_eq!(requests[1].body, Value::Null);
    assert_eq!(&requests[1].raw_body[..], b"garbage");
    assert_eq!(sim.simulator.stats().chat_requests, 2);
    sim.shutdown().await;
}

#[tokio::test]
async fn shutdown_ends_in_flight_streams_promptly() {
    let config = SimulatorConfig {
        token_latency: Duration::from_secs(10),
        ..SimulatorConfig::default()
    };
    let sim = start(config).await;
    let mut response = post(&sim, &hello(json!({"stream": true}))).await;
    // The role chunk is immediate; the first token would take 10 s.
    assert!(response.chunk().await.unwrap().is_some());
    let simulator = sim.simulator.clone();
    tokio::time::timeout(Duration::from_secs(2), sim.shutdown())
        .await
        .expect("shutdown should not wait for the 10 s token");
    assert!(response.chunk().await.is_err());
    assert_eq!(simulator.stats().streams_cancelled, 0);
}

#[tokio::test]
async fn recording_can_be_disabled() {
    let sim = start(SimulatorConfig {
        record_requests: false,
        ..SimulatorConfig::default()
    })
    .await;
    assert_eq!(post(&sim, &hello(json!({}))).await.status(), StatusCode::OK);
    assert!(sim.simulator.requests().is_empty());
    assert_eq!(sim.simulator.stats().chat_requests, 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn raw_fault_sends_any_status_type_and_body() {
    let sim = start(SimulatorConfig::default()).await;
    sim.simulator.push_fault(Fault::Raw {
        status: 502,
        content_type: "text/html".into(),
        body: "<html>502</html>".into(),
    });
    let response = post(&sim, &hello(json!({"stream": true}))).await;
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(response.headers()["content-type"], "text/html");
    assert_eq!(response.text().await.unwrap(), "<html>502</html>");
    sim.shutdown().await;
}

#[tokio::test]
async fn inject_fault_writes_its_bytes_between_chunks() {
    let sim = start(SimulatorConfig::default()).await;
    sim.simulator.push_fault(Fault::StreamInject {
        after: 2,
        raw: ": junk\n\n".into(),
    });
    let text = post(&sim, &hello(json!({"stream": true})))
        .await
        .text()
        .await
        .unwrap();
    let events: Vec<&str> = text.split_terminator("\n\n").collect();
    // role, two tokens, the junk, then the rest as usual.
    assert_eq!(events[3], ": junk", "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"));
    sim.shutdown().await;
}

#[tokio::test]
async fn oversized_and_cut_json_faults_shape_the_body() {
    let sim = start(SimulatorConfig::default()).await;
    sim.simulator.push_fault(Fault::Oversized(1 << 20));
    let body = post(&sim, &hello(json!({}))).await.bytes().await.unwrap();
    assert!(body.len() > 1 << 20);
    let value: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(value["object"], "chat.completion");
    assert_eq!(sim.simulator.stats().fault_bytes_sent, body.len() as u64);

    sim.simulator.push_fault(Fault::JsonCutAfter(10));
    let mut response = post(&sim, &hello(json!({}))).await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut received = Vec::new();
    let err = loop {
        match response.chunk().await {
            Ok(Some(bytes)) => received.extend_from_slice(&bytes),
            Ok(None) => panic!("body ended cleanly; expected an abort"),
            Err(err) => break err,
        }
    };
    assert!(err.is_body() || err.is_decode(), "{err:?}");
    assert_eq!(received.len(), 10);
    sim.shutdown().await;
}

// --- Answers in keeping with the question ------------------------------------------

async fn post_to(sim: &RunningSimulator, path: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}{path}", sim.url()))
        .json(body)
        .send()
        .await
        .unwrap()
}

async fn json_from(sim: &RunningSimulator, path: &str, body: &Value) -> Value {
    let response = post_to(sim, path, body).await;
    assert_eq!(response.status(), StatusCode::OK, "{body}");
    response.json().await.unwrap()
}

fn user(content: Value) -> Value {
    json!({"messages": [{"role": "user", "content": content}]})
}

#[tokio::test]
async fn answers_follow_the_question() {
    let sim = start(SimulatorConfig {
        reply_tokens: 24,
        reasoning_tokens: 8,
        ..SimulatorConfig::default()
    })
    .await;
    let image = json!({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}});
    let tool_turns = json!({"messages": [
        {"role": "user", "content": "What's the weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [{
            "id": "call-1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{}"},
        }]},
        {"role": "tool", "tool_call_id": "call-1", "content": "sunny, 21 C"},
    ]});
    // (request, reasoning, start of the answer)
    let cases = [
        (
            user(json!("What is 2+2?")),
            "Let me work out 2+2.",
            "The answer is 4.",
        ),
        (
            user(json!("what's 12 * 7")),
            "Let me work out 12 * 7.",
            "The answer is 84.",
        ),
        (
            user(json!("Compute 7/2, please")),
            "Let me work out 7/2.",
            "The answer is 3.5.",
        ),
        (
            user(json!("What is 0.1 + 0.2?")),
            "Let me work out 0.1 + 0.2.",
            "The answer is 0.3.",
        ),
        (
            user(json!("What is -3 - 4?")),
            "Let me work out -3 - 4.",
            "The answer is -7.",
        ),
        (
            user(json!("What is 5 / 0?")),
            "Let me work out 5 / 0.",
            "The answer is undefined",
        ),
        // Not trivial arithmetic: answered by topic.
        (
            user(json!("What is 1+2+3?")),
            "Let me think about 1+2+3.",
            "The question was about 1+2+3.",
        ),
        (
            user(json!("Please tell me about the history of Rome, please!")),
            "Let me think about the history",
            "The question was about the history of Rome.",
        ),
        (
            user(json!("")),
            "Let me think about your message.",
            "The question was about your message.",
        ),
        (
            user(json!([image, {"type": "text", "text": "What is in this picture?"}])),
            "Let me look at the image first.",
            "The image you shared arrived; you asked about this picture.",
        ),
        (
            user(json!([image, image, image])),
            "Let me look at the three images first.",
            "The three images you shared arrived; you asked about what it shows.",
        ),
        (
            tool_turns,
            "Let me read what the tool",
            "The get_weather tool returned sunny, 21 C.",
        ),
    ];
    for (request, reasoning, answer) in cases {
        let body = json_from(&sim, "/v1/chat/completions", &request).await;
        let message = &body["choices"][0]["message"];
        let content = message["content"].as_str().unwrap();
        assert!(content.starts_with(answer), "{request}: {content}");
        let thought = message["reasoning_content"].as_str().unwrap();
        assert!(thought.starts_with(reasoning), "{request}: {thought}");
        assert_eq!(thought.split_whitespace().count(), 8, "{thought}");
        // One word per token, whatever the question.
        assert_eq!(content.split_whitespace().count(), 16, "{content}");
    }
    // Deterministic: the same question gets the same words.
    let once = json_from(&sim, "/v1/chat/completions", &hello(json!({}))).await;
    let twice = json_from(&sim, "/v1/chat/completions", &hello(json!({}))).await;
    assert_eq!(once["choices"], twice["choices"]);
    sim.shutdown().await;
}

#[tokio::test]
async fn long_replies_go_on_past_the_answer() {
    let sim = start(SimulatorConfig {
        reply_tokens: 500,
        reasoning_tokens: 50,
        ..SimulatorConfig::default()
    })
    .await;
    let body = json_from(&sim, "/v1/chat/completions", &hello(json!({}))).await;
    let message = &body["choices"][0]["message"];
    let reasoning = message["reasoning_content"].as_str().unwrap();
    let content = message["content"].as_str().unwrap();
    assert_eq!(reasoning.split_whitespace().count(), 50);
    assert_eq!(content.split_whitespace().count(), 450);
    assert!(content.contains("STEP3-VL simulator"), "{content}");
    sim.shutdown().await;
}

#[tokio::test]
async fn enable_thinking_false_turns_reasoning_off() {
    let sim = start(SimulatorConfig::default()).await;
    let off = hello(json!({"chat_template_kwargs": {"enable_thinking": false}}));
    let body = json_from(&sim, "/v1/chat/completions", &off).await;
    let message = &body["choices"][0]["message"];
    assert_eq!(message["reasoning_content"], Value::Null);
    let content = message["content"].as_str().unwrap();
    assert_eq!(content.split_whitespace().count(), 24, "{content}");
    assert_eq!(body["usage"]["completion_tokens"], 24);

    let mut stream = off.clone();
    stream["stream"] = json!(true);
    let chunks = json_events(&stream_events(&sim, &stream).await);
    assert_eq!(collect_delta(&chunks, "reasoning_content"), "");
    assert!(collect_delta(&chunks, "content").starts_with("The question was about"));

    // vLLM ignores unknown top-level fields, and so does the simulator.
    let top_level = hello(json!({"enable_thinking": false}));
    let body = json_from(&sim, "/v1/chat/completions", &top_level).await;
    assert!(body["choices"][0]["message"]["reasoning_content"].is_string());

    let bad = hello(json!({"chat_template_kwargs": "no"}));
    assert_eq!(post(&sim, &bad).await.status(), StatusCode::BAD_REQUEST);
    sim.shutdown().await;
}

// --- n choices ------------------------------------------------------------------------

#[tokio::test]
async fn n_choices_share_the_answer_and_add_up_in_usage() {
    let sim = start(SimulatorConfig::default()).await;
    let body = json_from(&sim, "/v1/chat/completions", &hello(json!({"n": 3}))).await;
    let choices = body["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    for (i, choice) in choices.iter().enumerate() {
        assert_eq!(choice["index"], i);
        assert_eq!(choice["message"], choices[0]["message"]);
        assert_eq!(choice["finish_reason"], "stop");
    }
    assert_eq!(body["usage"]["completion_tokens"], 3 * 24);
    assert_eq!(body["usage"]["prompt_tokens"], PROMPT);
    assert_eq!(sim.simulator.stats().completion_tokens_sent, 3 * 24);

    for bad in [json!(0), json!(-1), json!(129), json!("2")] {
        let response = post(&sim, &hello(json!({ "n": bad }))).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "n = {bad}");
    }
    sim.shutdown().await;
}

#[tokio::test]
async fn n_choices_stream_interleaved_by_index() {
    let sim = start(SimulatorConfig {
        reply_tokens: 3,
        reasoning_tokens: 1,
        ..SimulatorConfig::default()
    })
    .await;
    let body = hello(json!({
        "n": 2,
        "stream": true,
        "stream_options": {"include_usage": true, "continuous_usage_stats": true},
    }));
    let events = stream_events(&sim, &body).await;
    let chunks = json_events(&events);
    // 2 role chunks, 2 x 3 tokens, 2 finish chunks, usage.
    assert_eq!(chunks.len(), 2 + 6 + 2 + 1, "{events:?}");
    let indices: Vec<u64> = chunks[..10]
        .iter()
        .map(|c| c["choices"][0]["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indices, [0, 1, 0, 1, 0, 1, 0, 1, 0, 1]);
    let seen: Vec<u64> = chunks[..10]
        .iter()
        .map(|c| c["usage"]["completion_tokens"].as_u64().unwrap())
        .collect();
    assert_eq!(seen, [0, 0, 1, 1, 2, 2, 3, 3, 3, 3], "per-choice counts");
    for index in 0..2 {
        let mine: Vec<&Value> = chunks[2..8]
            .iter()
            .filter(|c| c["choices"][0]["index"] == index)
            .collect();
        let text: String = mine
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(text, "The question", "choice {index}");
    }
    assert_eq!(chunks[8]["choices"][0]["finish_reason"], "stop");
    assert_eq!(chunks[9]["choices"][0]["finish_reason"], "stop");
    assert_eq!(chunks[10]["usage"]["completion_tokens"], 6);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let stats = wait_for(&sim.simulator, "finished stream", |s| {
        s.streams_finished == 1
    })
    .await;
    assert_eq!(stats.completion_tokens_sent, 6);
    sim.shutdown().await;
}

// --- Tools ---------------------------------------------------------------------------

fn weather_tools() -> Value {
    json!([
        {"type": "function", "function": {
            "name": "get_weather",
            "description": "The weather somewhere",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                    "days": {"type": "integer"},
                    "hourly": {"type": "boolean"},
                },
                "required": ["unit", "city", "days", "hourly"],
            },
        }},
        {"type": "function", "function": {"name": "get_time"}},
    ])
}

fn weather_question(extra: Value) -> Value {
    let mut body = json!({
        "model": DEFAULT_MODEL,
        "messages": [{"role": "user", "content": "What's the weather in Paris?"}],
        "tools": weather_tools(),
    });
    for (key, value) in extra.as_object().unwrap() {
        body[key] = value.clone();
    }
    body
}

#[tokio::test]
async fn offered_tools_get_called() {
    let sim = start(SimulatorConfig::default()).await;
    let body = json_from(&sim, "/v1/chat/completions", &weather_question(json!({}))).await;
    let choice = &body["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert_eq!(choice["message"]["content"], Value::Null);
    assert_eq!(
        choice["message"]["reasoning_content"],
        "Let me call get_weather"
    );
    let calls = choice["message"]["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1);
    let call = &calls[0];
    assert!(call["id"].as_str().unwrap().starts_with("chatcmpl-tool-"));
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "get_weather");
    // The required properties, in the schema's order, as vLLM's parsers write them.
    let arguments = call["function"]["arguments"].as_str().unwrap();
    assert_eq!(
        arguments,
        r#"{"unit": "celsius", "city": "the weather in Paris", "days": 1, "hourly": true}"#
    );
    // Reasoning, then one token for the name and one per four characters of arguments.
    let tokens = 4 + 1 + arguments.chars().count().div_ceil(4) as u64;
    assert_eq!(body["usage"]["completion_tokens"], tokens);

    // A named function is called even when it is not the first, and ends with "stop".
    let named = weather_question(json!({
        "tool_choice": {"type": "function", "function": {"name": "get_time"}},
    }));
    let body = json_from(&sim, "/v1/chat/completions", &named).await;
    let choice = &body["choices"][0];
    assert_eq!(choice["finish_reason"], "stop");
    assert_eq!(
        choice["message"]["tool_calls"][0]["function"]["name"],
        "get_time"
    );
    assert_eq!(
        choice["message"]["tool_calls"][0]["function"]["arguments"],
        "{}"
    );

    let required = weather_question(json!({"tool_choice": "required"}));
    let body = json_from(&sim, "/v1/chat/completions", &required).await;
    assert_eq!(body["choices"][0]["finish_reason"], "tool_calls");

    let none = weather_question(json!({"tool_choice": "none"}));
    let body = json_from(&sim, "/v1/chat/completions", &none).await;
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(body["choices"][0]["message"]["tool_calls"], json!([]));
    assert!(body["choices"][0]["message"]["content"].is_string());

    // n choices each call, with ids of their own.
    let body = json_from(
        &sim,
        "/v1/chat/completions",
        &weather_question(json!({"n": 2})),
    )
    .await;
    let ids: Vec<&str> = body["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["message"]["tool_calls"][0]["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 2);
    assert_ne!(ids[0], ids[1]);
    sim.shutdown().await;
}

#[tokio::test]
async fn a_tool_result_gets_a_text_answer() {
    let sim = start(SimulatorConfig::default()).await;
    let mut body = weather_question(json!({}));
    body["messages"] = json!([
        {"role": "user", "content": "What's the weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [{
            "id": "call-1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{}"},
        }]},
        {"role": "tool", "tool_call_id": "call-1", "content": "sunny, 21 C"},
    ]);
    let answer = json_from(&sim, "/v1/chat/completions", &body).await;
    let choice = &answer["choices"][0];
    assert_eq!(choice["finish_reason"], "stop");
    assert_eq!(choice["message"]["tool_calls"], json!([]));
    let content = choice["message"]["content"].as_str().unwrap();
    assert!(
        content.starts_with("The get_weather tool returned sunny, 21 C."),
        "{content}"
    );

    // "required" still forces another call.
    body["tool_choice"] = json!("required");
    let answer = json_from(&sim, "/v1/chat/completions", &body).await;
    assert_eq!(answer["choices"][0]["finish_reason"], "tool_calls");
    sim.shutdown().await;
}

#[tokio::test]
async fn a_tool_call_cut_by_max_tokens_is_text() {
    let sim = start(SimulatorConfig::default()).await;
    let body = json_from(
        &sim,
        "/v1/chat/completions",
        &weather_question(json!({"max_tokens": 7})),
    )
    .await;
    let choice = &body["choices"][0];
    assert_eq!(choice["finish_reason"], "length");
    assert_eq!(choice["message"]["tool_calls"], json!([]));
    // Reasoning (4), the name (1), then two four-character pieces of arguments.
    assert_eq!(choice["message"]["content"], r#"{"unit":"#);
    assert_eq!(body["usage"]["completion_tokens"], 7);
    sim.shutdown().await;
}

#[tokio::test]
async fn tool_calls_stream_as_vllm_streams_them() {
    let sim = start(SimulatorConfig {
        reasoning_tokens: 1,
        ..SimulatorConfig::default()
    })
    .await;
    let body = weather_question(json!({"stream": true}));
    let events = stream_events(&sim, &body).await;
    let chunks = json_events(&events);
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(
        chunks[1]["choices"][0]["delta"],
        json!({"reasoning_content": "Let"})
    );
    let first = &chunks[2]["choices"][0]["delta"]["tool_calls"][0];
    assert_eq!(first["index"], 0);
    assert_eq!(first["type"], "function");
    assert_eq!(first["function"], json!({"name": "get_weather"}));
    assert!(first["id"].as_str().unwrap().starts_with("chatcmpl-tool-"));
    let arguments: String = chunks[3..]
        .iter()
        .filter_map(|c| {
            let call = &c["choices"][0]["delta"]["tool_calls"][0];
            assert!(call.is_null() || call.get("id").is_none(), "{c}");
            call["function"]["arguments"].as_str()
        })
        .collect();
    let arguments: Value = serde_json::from_str(&arguments).unwrap();
    assert_eq!(arguments["unit"], "celsius");
    let finish = &chunks[chunks.len() - 1]["choices"][0];
    assert_eq!(finish["delta"], json!({}));
    assert_eq!(finish["finish_reason"], "tool_calls");
    assert_eq!(events.last().unwrap(), "[DONE]");
    sim.shutdown().await;
}

#[tokio::test]
async fn tool_requests_get_vllm_errors() {
    let sim = start(SimulatorConfig::default()).await;
    let cases = [
        weather_question(json!({"tools": []})),
        weather_question(json!({"tools": "get_weather"})),
        weather_question(json!({"tools": [{"type": "function", "function": {}}]})),
        hello(json!({"tool_choice": "auto"})),
        weather_question(json!({"tool_choice": "sometimes"})),
        weather_question(
            json!({"tool_choice": {"type": "function", "function": {"name": "nope"}}}),
        ),
        weather_question(json!({"tool_choice": {"type": "function"}})),
    ];
    for case in cases {
        let response = post(&sim, &case).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{case}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["type"], "BadRequestError", "{case}");
    }
    // "none" needs no tools.
    let none = hello(json!({"tool_choice": "none"}));
    assert_eq!(post(&sim, &none).await.status(), StatusCode::OK);
    sim.shutdown().await;
}

// --- Legacy completions ------------------------------------------------------------------

#[tokio::test]
async fn completions_continue_the_prompt() {
    let sim = start(SimulatorConfig::default()).await;
    let body = json_from(
        &sim,
        "/v1/completions",
        &json!({"model": DEFAULT_MODEL, "prompt": "What is 2+2?"}),
    )
    .await;
    assert!(body["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(body["object"], "text_completion");
    assert_eq!(body["model"], DEFAULT_MODEL);
    let choice = &body["choices"][0];
    assert_eq!(choice["index"], 0);
    let text = choice["text"].as_str().unwrap();
    // A continuation: every token after a space, no reasoning part.
    assert!(text.starts_with(" The answer is 4."), "{text:?}");
    // vLLM's default max_tokens for completions is 16.
    assert_eq!(text.split_whitespace().count(), 16);
    assert_eq!(choice["finish_reason"], "length");
    assert_eq!(choice["logprobs"], Value::Null);
    // ceil(12 / 4) + the BOS token.
    assert_eq!(body["usage"]["prompt_tokens"], 4);
    assert_eq!(body["usage"]["completion_tokens"], 16);
    assert_eq!(body["usage"]["total_tokens"], 20);

    let body = json_from(
        &sim,
        "/v1/completions",
        &json!({"prompt": ["Tell me about cats", [1, 2, 3]], "n": 2, "max_tokens": 100, "echo": true}),
    )
    .await;
    let choices = body["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 4);
    for (i, choice) in choices.iter().enumerate() {
        assert_eq!(choice["index"], i);
        assert_eq!(choice["finish_reason"], "stop");
    }
    let first = choices[0]["text"].as_str().unwrap();
    assert!(
        first.starts_with("Tell me about cats The question was about cats."),
        "{first}"
    );
    assert_eq!(choices[1]["text"], choices[0]["text"]);
    // Token ids have no text to echo.
    assert!(
        choices[2]["text"]
            .as_str()
            .unwrap()
            .starts_with(" The question was about your message.")
    );
    assert_eq!(body["usage"]["prompt_tokens"], (5 + 1) + 3);
    assert_eq!(body["usage"]["completion_tokens"], 4 * 24);
    assert_eq!(sim.simulator.stats().completion_tokens_sent, 16 + 4 * 24);

    // Echo alone.
    let body = json_from(
        &sim,
        "/v1/completions",
        &json!({"prompt": "abc", "echo": true, "max_tokens": 0}),
    )
    .await;
    assert_eq!(body["choices"][0]["text"], "abc");
    assert_eq!(body["usage"]["completion_tokens"], 0);
    sim.shutdown().await;
}

#[tokio::test]
async fn completions_stream_text_chunks_then_usage() {
    let sim = start(SimulatorConfig::default()).await;
    let body = json!({
        "prompt": "Say hi",
        "max_tokens": 3,
        "n": 2,
        "echo": true,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let response = post_to(&sim, "/v1/completions", &body).await;
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let events = events(&response.text().await.unwrap());
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks = json_events(&events);
    // No role chunk: 2 x 3 tokens, 2 finish chunks, usage.
    assert_eq!(chunks.len(), 6 + 2 + 1, "{events:?}");
    for chunk in &chunks {
        assert_eq!(chunk["object"], "text_completion");
        assert_eq!(chunk["id"], chunks[0]["id"]);
    }
    let text = |index: u64| -> String {
        chunks
            .iter()
            .filter(|c| c["choices"][0]["index"] == index)
            .filter_map(|c| c["choices"][0]["text"].as_str())
            .collect()
    };
    assert_eq!(text(0), "Say hi The question was");
    assert_eq!(text(1), text(0));
    assert_eq!(chunks[6]["choices"][0]["finish_reason"], "length");
    assert_eq!(chunks[7]["choices"][0]["finish_reason"], "length");
    let usage = &chunks[8];
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["prompt_tokens"], 3);
    assert_eq!(usage["usage"]["completion_tokens"], 6);
    let stats = wait_for(&sim.simulator, "finished stream", |s| {
        s.streams_finished == 1
    })
    .await;
    assert_eq!(stats.completion_tokens_sent, 6);
    sim.shutdown().await;
}

#[tokio::test]
async fn completion_requests_get_vllm_errors() {
    let sim = start(SimulatorConfig {
        max_model_len: 100,
        ..SimulatorConfig::default()
    })
    .await;
    let cases = [
        json!({}),
        json!({"prompt": ""}),
        json!({"prompt": []}),
        json!({"prompt": {"text": "hi"}}),
        json!({"prompt": [1, "two"]}),
        json!({"prompt": "hi", "max_tokens": 0}),
        json!({"prompt": "hi", "suffix": "!"}),
        json!({"prompt": "hi", "stream_options": {"include_usage": true}}),
        json!({"prompt": "hi", "max_tokens": 99}),
    ];
    for case in cases {
        let response = post_to(&sim, "/v1/completions", &case).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{case}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["type"], "BadRequestError", "{case}");
    }
    sim.shutdown().await;
}

// --- Responses -----------------------------------------------------------------------------

/// Splits a named-event SSE body into `(event, data)` pairs.
fn named_events(body: &str) -> Vec<(String, Value)> {
    assert!(body.ends_with("\n\n"), "unterminated event in {body:?}");
    body.split_terminator("\n\n")
        .map(|event| {
            let (name, data) = event.split_once('\n').unwrap();
            let name = name.strip_prefix("event: ").unwrap().to_owned();
            let data: Value = serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap();
            assert_eq!(data["type"], name.as_str());
            (name, data)
        })
        .collect()
}

#[tokio::test]
async fn responses_answer_with_reasoning_and_message_items() {
    let sim = start(SimulatorConfig::default()).await;
    let body = json!({
        "model": DEFAULT_MODEL,
        "input": "What is 6/3?",
        "instructions": "Be brief.",
    });
    let answer = json_from(&sim, "/v1/responses", &body).await;
    assert!(answer["id"].as_str().unwrap().starts_with("resp_"));
    assert_eq!(answer["object"], "response");
    assert_eq!(answer["status"], "completed");
    assert_eq!(answer["incomplete_details"], Value::Null);
    assert_eq!(answer["instructions"], "Be brief.");
    assert_eq!(answer["model"], DEFAULT_MODEL);
    assert!(answer["created_at"].as_u64().unwrap() > 0);
    let output = answer["output"].as_array().unwrap();
    assert_eq!(output.len(), 2);
    assert_eq!(output[0]["type"], "reasoning");
    assert!(output[0]["id"].as_str().unwrap().starts_with("rs_"));
    assert_eq!(
        output[0]["content"],
        json!([{"type": "reasoning_text", "text": "Let me work out"}])
    );
    assert_eq!(output[1]["type"], "message");
    assert_eq!(output[1]["role"], "assistant");
    assert_eq!(output[1]["status"], "completed");
    let text = output[1]["content"][0]["text"].as_str().unwrap();
    assert_eq!(output[1]["content"][0]["type"], "output_text");
    assert!(text.starts_with("The answer is 2."), "{text}");
    // Input: the instructions and the input as two messages.
    let usage = &answer["usage"];
    assert_eq!(usage["input_tokens"], (4 + 3) + (4 + 3));
    assert_eq!(usage["output_tokens"], 24);
    assert_eq!(usage["output_tokens_details"]["reasoning_tokens"], 4);
    assert_eq!(usage["total_tokens"], 14 + 24);

    // Cut short by max_output_tokens.
    let cut = json!({"input": [{"role": "user", "content": [
        {"type": "input_text", "text": "What is in this picture?"},
        {"type": "input_image", "image_url": "data:image/png;base64,AAAA"},
    ]}], "max_output_tokens": 7});
    let answer = json_from(&sim, "/v1/responses", &cut).await;
    assert_eq!(answer["status"], "incomplete");
    assert_eq!(
        answer["incomplete_details"],
        json!({"reason": "max_output_tokens"})
    );
    assert_eq!(answer["max_output_tokens"], 7);
    assert_eq!(answer["output"][1]["content"][0]["text"], "The image you");
    assert_eq!(answer["usage"]["input_tokens"], 4 + 6 + 256);
    sim.shutdown().await;
}

#[tokio::test]
async fn responses_stream_named_events() {
    let sim = start(SimulatorConfig {
        reply_tokens: 6,
        reasoning_tokens: 2,
        ..SimulatorConfig::default()
    })
    .await;
    let response = post_to(
        &sim,
        "/v1/responses",
        &json!({"input": "Tell me about bees", "stream": true}),
    )
    .await;
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let text = response.text().await.unwrap();
    assert!(!text.contains("[DONE]"));
    let events = named_events(&text);
    let names: Vec<&str> = events.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(
        names,
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.reasoning_text.delta",
            "response.reasoning_text.delta",
            "response.reasoning_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed",
        ]
    );
    for (i, (_, event)) in events.iter().enumerate() {
        assert_eq!(event["sequence_number"], i);
    }
    assert_eq!(events[0].1["response"]["status"], "in_progress");
    assert_eq!(events[0].1["response"]["output"], json!([]));
    let deltas: String = events
        .iter()
        .filter(|(name, _)| name == "response.output_text.delta")
        .map(|(_, e)| e["delta"].as_str().unwrap())
        .collect();
    assert_eq!(deltas, "The question was about");
    assert_eq!(events[15].1["text"], deltas);
    let completed = &events[18].1["response"];
    assert_eq!(completed["status"], "completed");
    assert_eq!(completed["output"][0]["type"], "reasoning");
    assert_eq!(completed["output"][1]["content"][0]["text"], deltas);
    assert_eq!(completed["output"][1]["id"], events[9].1["item"]["id"]);
    assert_eq!(completed["usage"]["output_tokens"], 6);
    let stats = wait_for(&sim.simulator, "finished stream", |s| {
        s.streams_finished == 1
    })
    .await;
    assert_eq!(stats.completion_tokens_sent, 6);
    sim.shutdown().await;
}

#[tokio::test]
async fn responses_call_function_tools() {
    let sim = start(SimulatorConfig::default()).await;
    let tools = json!([{"type": "function", "name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
    }}]);
    let body = json!({"input": "Weather in Paris?", "tools": tools});
    let answer = json_from(&sim, "/v1/responses", &body).await;
    let call = &answer["output"][1];
    assert_eq!(call["type"], "function_call");
    assert_eq!(call["name"], "get_weather");
    assert_eq!(call["arguments"], r#"{"city": "Weather in Paris"}"#);
    assert_eq!(call["status"], "completed");
    assert!(call["call_id"].as_str().unwrap().starts_with("call_"));
    assert_eq!(answer["tools"], tools);

    let result = json!({"tools": tools, "input": [
        {"role": "user", "content": "Weather in Paris?"},
        call,
        {"type": "function_call_output", "call_id": call["call_id"], "output": "rainy"},
    ]});
    let answer = json_from(&sim, "/v1/responses", &result).await;
    let text = answer["output"][1]["content"][0]["text"].as_str().unwrap();
    assert!(
        text.starts_with("The get_weather tool returned rainy."),
        "{text}"
    );

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let text = post_to(&sim, "/v1/responses", &streamed)
        .await
        .text()
        .await
        .unwrap();
    let events = named_events(&text);
    let arguments: String = events
        .iter()
        .filter(|(name, _)| name == "response.function_call_arguments.delta")
        .map(|(_, e)| e["delta"].as_str().unwrap())
        .collect();
    assert_eq!(arguments, r#"{"city": "Weather in Paris"}"#);
    let done = events
        .iter()
        .find(|(name, _)| name == "response.function_call_arguments.done")
        .unwrap();
    assert_eq!(done.1["arguments"], arguments);
    let (_, completed) = events.last().unwrap();
    assert_eq!(completed["response"]["output"][1]["type"], "function_call");
    sim.shutdown().await;
}

#[tokio::test]
async fn response_requests_get_vllm_errors() {
    let sim = start(SimulatorConfig {
        max_model_len: 100,
        ..SimulatorConfig::default()
    })
    .await;
    let cases = [
        json!({}),
        json!({"input": 5}),
        json!({"input": ["hi"]}),
        json!({"input": "hi", "instructions": 5}),
        json!({"input": "hi", "max_output_tokens": 0}),
        json!({"input": "hi", "max_output_tokens": 99}),
        json!({"input": "hi", "tool_choice": "required"}),
        json!({"input": "hi", "tools": [{"type": "function"}]}),
    ];
    for case in cases {
        let response = post_to(&sim, "/v1/responses", &case).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{case}");
    }
    sim.shutdown().await;
}

// --- Models ----------------------------------------------------------------------------

#[tokio::test]
async fn each_model_answers_only_its_apis() {
    let sim = start(with_embeddings(SimulatorConfig::default())).await;
    let models: Value = reqwest::get(format!("{}/v1/models", sim.url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [DEFAULT_MODEL, DEFAULT_EMBEDDING_MODEL]);
    assert_eq!(models["data"][1]["max_model_len"], EMBEDDING_MAX_MODEL_LEN);

    let chat =
        json!({"model": DEFAULT_EMBEDDING_MODEL, "messages": [{"role": "user", "content": "hi"}]});
    let completion = json!({"model": DEFAULT_EMBEDDING_MODEL, "prompt": "hi"});
    let response = json!({"model": DEFAULT_EMBEDDING_MODEL, "input": "hi"});
    let embedding = json!({"model": DEFAULT_MODEL, "input": "hi"});
    let cases = [
        ("/v1/chat/completions", chat, "Chat Completions"),
        ("/v1/completions", completion, "Completions"),
        ("/v1/responses", response, "Responses"),
        ("/v1/embeddings", embedding, "Embeddings"),
    ];
    for (path, body, api) in cases {
        let response = post_to(&sim, path, &body).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{path}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(
            error["error"]["message"],
            format!("The model does not support {api} API")
        );
        // An unknown name is vLLM's 404 on every route.
        let mut unknown = body.clone();
        unknown["model"] = json!("gpt-4o");
        let response = post_to(&sim, path, &unknown).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{path}");
    }
    let missing = reqwest::get(format!("{}/v1/audio/speech", sim.url()))
        .await
        .unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        missing.json::<Value>().await.unwrap(),
        json!({"detail": "Not Found"})
    );
    sim.shutdown().await;

    // By default there is no embedding model: a vLLM serving STEP3-VL alone.
    let sim = start(SimulatorConfig::default()).await;
    let models: Value = reqwest::get(format!("{}/v1/models", sim.url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"].as_array().unwrap().len(), 1);
    let response = post_to(&sim, "/v1/embeddings", &json!({"input": "hi"})).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    sim.shutdown().await;
}

// --- Embeddings ------------------------------------------------------------------------

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn floats(value: &Value) -> Vec<f32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

#[tokio::test]
async fn embeddings_are_deterministic_unit_vectors() {
    let sim = start(with_embeddings(SimulatorConfig {
        embedding_dimensions: 64,
        ..SimulatorConfig::default()
    }))
    .await;
    let body = json!({
        "model": DEFAULT_EMBEDDING_MODEL,
        "input": ["The cat sat on the mat", "the CAT sat on a mat!", "Quarterly tax report"],
    });
    let answer = json_from(&sim, "/v1/embeddings", &body).await;
    assert!(answer["id"].as_str().unwrap().starts_with("embd-"));
    assert_eq!(answer["object"], "list");
    assert_eq!(answer["model"], DEFAULT_EMBEDDING_MODEL);
    let data = answer["data"].as_array().unwrap();
    assert_eq!(data.len(), 3);
    let vectors: Vec<Vec<f32>> = data
        .iter()
        .enumerate()
        .map(|(i, d)| {
            assert_eq!(d["index"], i);
            assert_eq!(d["object"], "embedding");
            floats(&d["embedding"])
        })
        .collect();
    for v in &vectors {
        assert_eq!(v.len(), 64);
        assert!((cosine(v, v) - 1.0).abs() < 1e-4);
    }
    // Texts sharing words point the same way more than unrelated texts.
    assert!(cosine(&vectors[0], &vectors[1]) > 0.6);
    assert!(cosine(&vectors[0], &vectors[1]) > cosine(&vectors[0], &vectors[2]) + 0.3);
    // ceil(chars / 4) + 2 special tokens per text; no completion.
    assert_eq!(
        answer["usage"]["prompt_tokens"],
        (6 + 2) + (6 + 2) + (5 + 2)
    );
    assert_eq!(
        answer["usage"]["total_tokens"],
        answer["usage"]["prompt_tokens"]
    );
    assert_eq!(answer["usage"]["completion_tokens"], 0);

    // The same text, another request: the same vector; base64 carries the same floats.
    let again = json_from(
        &sim,
        "/v1/embeddings",
        &json!({"input": "The cat sat on the mat"}),
    )
    .await;
    assert_eq!(floats(&again["data"][0]["embedding"]), vectors[0]);
    let encoded = json_from(
        &sim,
        "/v1/embeddings",
        &json!({"input": "The cat sat on the mat", "encoding_format": "base64"}),
    )
    .await;
    let bytes = base64::Engine::decode(
        &base64::engine::general_purpose::STANDARD,
        encoded["data"][0]["embedding"].as_str().unwrap(),
    )
    .unwrap();
    let decoded: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(decoded, vectors[0]);

    // Token ids: one input or several; the count is the tokens.
    let tokens = json_from(&sim, "/v1/embeddings", &json!({"input": [[1, 2, 3], [4]]})).await;
    assert_eq!(tokens["data"].as_array().unwrap().len(), 2);
    assert_eq!(tokens["usage"]["prompt_tokens"], 4);
    let one = json_from(&sim, "/v1/embeddings", &json!({"input": [5, 6]})).await;
    assert_eq!(one["data"].as_array().unwrap().len(), 1);
    // Embedding tokens are prompt tokens, not completion tokens.
    assert_eq!(sim.simulator.stats().completion_tokens_sent, 0);
    sim.shutdown().await;
}

#[tokio::test]
async fn embedding_requests_get_vllm_errors() {
    let sim = start(with_embeddings(SimulatorConfig::default())).await;
    let long = "word ".repeat(7000);
    let cases = [
        json!({}),
        json!({"input": []}),
        json!({"input": 5}),
        json!({"input": [1, "two"]}),
        json!({"input": "hi", "encoding_format": "bytes"}),
        json!({"input": "hi", "dimensions": 256}),
        json!({"input": long}),
    ];
    for case in cases {
        let response = post_to(&sim, "/v1/embeddings", &case).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{case}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["type"], "BadRequestError", "{case}");
    }
    let response = post_to(
        &sim,
        "/v1/embeddings",
        &json!({"input": "hi", "dimensions": 8}),
    )
    .await;
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body["error"]["message"],
        "Model \"BAAI/bge-m3\" does not support matryoshka representation, changing output \
         dimensions will lead to poor results."
    );
    sim.shutdown().await;
}

// --- Faults and records on every API ---------------------------------------------------------

fn api_requests(stream: bool) -> Vec<(&'static str, Value)> {
    let mut requests = vec![
        ("/v1/chat/completions", hello(json!({}))),
        ("/v1/completions", json!({"prompt": "hi"})),
        ("/v1/responses", json!({"input": "hi"})),
    ];
    if stream {
        for (_, body) in &mut requests {
            body["stream"] = json!(true);
        }
    } else {
        requests.push(("/v1/embeddings", json!({"input": "hi"})));
    }
    requests
}

#[tokio::test]
async fn every_api_takes_one_fault_per_authorised_post() {
    let sim = start(with_embeddings(SimulatorConfig {
        api_key: Some("sekrit".to_owned()),
        embedding_dimensions: 8,
        ..SimulatorConfig::default()
    }))
    .await;
    let client = reqwest::Client::new();
    for (path, body) in api_requests(false) {
        sim.simulator.push_fault(Fault::Status {
            status: 503,
            body: "{}".to_owned(),
        });
        let url = format!("{}{path}", sim.url());
        let unauthorised = client.post(&url).json(&body).send().await.unwrap();
        assert_eq!(unauthorised.status(), StatusCode::UNAUTHORIZED, "{path}");
        let faulted = client
            .post(&url)
            .bearer_auth("sekrit")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(faulted.status(), StatusCode::SERVICE_UNAVAILABLE, "{path}");
        let normal = client
            .post(&url)
            .bearer_auth("sekrit")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(normal.status(), StatusCode::OK, "{path}");

        // No usage, and a JSON answer cut off.
        sim.simulator.push_fault(Fault::NoUsage);
        let answer: Value = client
            .post(&url)
            .bearer_auth("sekrit")
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert!(
            answer.get("usage").is_none_or(Value::is_null),
            "{path}: {answer}"
        );
        sim.simulator.push_fault(Fault::JsonCutAfter(12));
        let mut cut = client
            .post(&url)
            .bearer_auth("sekrit")
            .json(&body)
            .send()
            .await
            .unwrap();
        let mut received = Vec::new();
        while let Ok(Some(bytes)) = cut.chunk().await {
            received.extend_from_slice(&bytes);
        }
        assert_eq!(received.len(), 12, "{path}");
    }
    // Every POST is counted and recorded, with its route; chat_requests counts chat only.
    let stats = sim.simulator.stats();
    assert_eq!(stats.requests, 4 * 5);
    assert_eq!(stats.chat_requests, 5);
    let paths: Vec<&str> = sim.simulator.requests().iter().map(|r| r.path).collect();
    assert_eq!(paths.len(), 20);
    assert_eq!(paths[0], "/v1/chat/completions");
    assert_eq!(paths[19], "/v1/embeddings");
    sim.shutdown().await;
}

#[tokio::test]
async fn stream_faults_apply_to_every_streaming_api() {
    let sim = start(SimulatorConfig::default()).await;
    for (path, body) in api_requests(true) {
        // Cut after three tokens: the body breaks off, no end marker.
        sim.simulator.push_fault(Fault::StreamCutAfter(3));
        let before = sim.simulator.stats().completion_tokens_sent;
        let mut response = post_to(&sim, path, &body).await;
        let mut received = Vec::new();
        let err = loop {
            match response.chunk().await {
                Ok(Some(bytes)) => received.extend_from_slice(&bytes),
                Ok(None) => panic!("{path}: body ended cleanly; expected an abort"),
                Err(err) => break err,
            }
        };
        assert!(
            err.is_body() || err.is_decode() || err.is_request(),
            "{err:?}"
        );
        let text = String::from_utf8(received).unwrap();
        assert!(
            !text.contains("[DONE]") && !text.contains("response.completed"),
            "{text}"
        );
        assert_eq!(
            sim.simulator.stats().completion_tokens_sent - before,
            3,
            "{path}"
        );

        // An engine failure is reported in-band and the stream still ends properly.
        sim.simulator.push_fault(Fault::StreamErrorAfter(2));
        let text = post_to(&sim, path, &body).await.text().await.unwrap();
        if path == "/v1/responses" {
            let events = named_events(&text);
            let (name, error) = events.last().unwrap();
            assert_eq!(name, "error");
            assert!(
                error["message"]
                    .as_str()
                    .unwrap()
                    .contains("after 2 tokens")
            );
        } else {
            let events = events(&text);
            assert_eq!(events.last().unwrap(), "[DONE]");
            let error: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
            assert_eq!(error["error"]["code"], 500, "{path}");
        }

        // No usage: the stream carries none.
        sim.simulator.push_fault(Fault::NoUsage);
        let mut with_usage = body.clone();
        if path != "/v1/responses" {
            with_usage["stream_options"] = json!({"include_usage": true});
        }
        let text = post_to(&sim, path, &with_usage).await.text().await.unwrap();
        assert!(!text.contains("\"usage\":{"), "{path}: {text}");

        // Oversized: the API's opening, then one endless-looking event.
        sim.simulator.push_fault(Fault::Oversized(1 << 16));
        let text = post_to(&sim, path, &body).await.text().await.unwrap();
        assert!(text.len() > 1 << 16, "{path}");
        let opening = if path == "/v1/responses" {
            "event: response.created"
        } else {
            "data: {"
        };
        assert!(text.starts_with(opening), "{path}: {}", &text[..80]);
    }
    sim.shutdown().await;
}

#[tokio::test]
async fn oversized_json_looks_like_each_api() {
    let sim = start(with_embeddings(SimulatorConfig::default())).await;
    let objects = ["chat.completion", "text_completion", "response", "list"];
    for ((path, body), object) in api_requests(false).into_iter().zip(objects) {
        sim.simulator.push_fault(Fault::Oversized(1 << 16));
        let bytes = post_to(&sim, path, &body).await.bytes().await.unwrap();
        let value: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(value["object"], object, "{path}");
    }
    sim.shutdown().await;
}
