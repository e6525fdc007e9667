//! What an OpenAI client sees of chat completions, JSON and streamed.

use futures_util::StreamExt;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::{MODEL, RestApi, TestGateway, chat_body, sse_payloads, stream_body};

#[tokio::test]
async fn json_completion_passes_through_and_charges_its_usage() {
    let gw = TestGateway::start().await;
    let key = gw
        .create_key(json!({"request_quota": 10, "token_quota": 10_000}))
        .await;
    let response = gw
        .chat(&key.secret, &chat_body("Describe the picture"))
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let remaining_requests = response.headers()["x-quota-remaining-requests"].clone();
    assert!(response.headers().contains_key("x-processing-ms"));
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert!(
        body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .len()
            > 10
    );
    assert!(body["choices"][0]["message"]["reasoning_content"].is_string());
    assert!(body.get("metadata").is_none(), "metadata is off by default");
    let usage = &body["usage"];
    let total = usage["total_tokens"].as_u64().unwrap();

    let mine = gw.usage(&key.secret).await;
    assert_eq!(mine["requests"]["used"], 1);
    assert_eq!(mine["requests"]["remaining"], 9);
    assert_eq!(remaining_requests, "9");
    assert_eq!(mine["tokens"]["used"], total);
    assert_eq!(mine["tokens"]["prompt"], usage["prompt_tokens"]);
    assert_eq!(mine["tokens"]["remaining"], 10_000 - total);
}

#[tokio::test]
async fn unknown_fields_and_images_reach_the_upstream_byte_for_byte() {
    let gw = TestGateway::start().await;
    let key = gw.create_key(json!({})).await;
    let body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://93.184.216.34/bee.jpg"}},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
            {"type": "text", "text": "What is in these images?"}]}],
        "top_k": 20,
        "repetition_penalty": 1.05,
        "chat_template_kwargs": {"enable_thinking": true},
        "max_tokens": 8
    });
    let raw = serde_json::to_vec(&body).unwrap();
    let response = gw.chat_raw(&key.secret, raw.clone()).await;
    assert_eq!(response.status(), StatusCode::OK);
    let answer: Value = response.json().await.unwrap();
    // Two images at the simulator's 256 tokens each, plus the text.
    assert!(answer["usage"]["prompt_tokens"].as_u64().unwrap() > 512);
    let seen = gw.sim.simulator.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].raw_body, raw);
}

#[tokio::test]
async fn the_client_key_never_goes_upstream_but_the_upstream_key_and_request_id_do() {
    let gw = TestGateway::builder()
        .sim(|s| s.api_key = Some("upstream-secret".into()))
        .config(|c| c.upstream.api_key = Some("upstream-secret".into()))
        .start()
        .await;
    let key = gw.create_key(json!({})).await;
    let response = gw
        .http
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(&key.secret)
        .header("x-request-id", "trace-42")
        .json(&chat_body("hi"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-request-id"], "trace-42");
    let seen = &gw.sim.simulator.requests()[0];
    assert_eq!(seen.headers["authorization"], "Bearer upstream-secret");
    assert_eq!(seen.headers["x-request-id"], "trace-42");
    let all_headers = format!("{:?}", seen.headers);
    assert!(!all_headers.contains(&key.secret));

    // Without a client id, one is made and still sent both ways.
    let response = gw.chat(&key.secret, &chat_body("hi")).await;
    let id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(id.starts_with("req_"));
    assert_eq!(
        gw.sim.simulator.requests()[1].headers["x-request-id"],
        id.as_str()
    );
}

#[tokio::test]
async fn a_stream_is_forwarded_chunk_by_chunk_while_the_model_generates() {
    let gw = TestGateway::builder()
        .sim(|s| {
            s.token_latency = std::time::Duration::from_millis(150);
            s.reply_tokens = 8;
            s.reasoning_tokens = 0;
        })
        .start()
        .await;
    let key = gw.create_key(json!({})).await;
    let body = stream_body("stream please");
    let response = gw.chat(&key.secret, &body).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut stream = response.bytes_stream();
    let mut received = String::new();
    while !received.contains("\"content\":\"The") {
        received.push_str(std::str::from_utf8(&stream.next().await.unwrap().unwrap()).unwrap());
    }
    // The first words are here while the model is still producing the rest.
    let stats = gw.sim.simulator.stats();
    assert_eq!(
        stats.streams_finished, 0,
        "the upstream finished before we saw a chunk"
    );
    assert!(stats.completion_tokens_sent < 8);
    while let Some(chunk) = stream.next().await {
        received.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    let payloads = sse_payloads(&received);
    assert_eq!(payloads.last().unwrap(), "[DONE]");
    let content: String = payloads
        .iter()
        .filter_map(|p| serde_json::from_str::<Value>(p).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(content.split_whitespace().count(), 8, "{content}");
}

async fn stream_payloads(gw: &TestGateway, secret: &str, options: Option<Value>) -> Vec<Value> {
    let mut body = stream_body("count the usage");
    if let Some(options) = options {
        body["stream_options"] = options;
    }
    let text = gw.chat(secret, &body).await.text().await.unwrap();
    let payloads = sse_payloads(&text);
    assert_eq!(
        payloads.last().map(String::as_str),
        Some("[DONE]"),
        "{text}"
    );
    payloads[..payloads.len() - 1]
        .iter()
        .map(|p| serde_json::from_str(p).unwrap())
        .collect()
}

#[tokio::test]
async fn stream_usage_reaches_the_client_only_as_far_as_it_asked() {
    let gw = TestGateway::start().await;
    let key = gw.create_key(json!({})).await;

    let plain = stream_payloads(&gw, &key.secret, None).await;
    assert!(plain.iter().all(|c| c.get("usage").is_none()), "{plain:?}");
    assert!(
        plain
            .iter()
            .all(|c| !c["choices"].as_array().unwrap().is_empty())
    );

    let final_only = stream_payloads(&gw, &key.secret, Some(json!({"include_usage": true}))).await;
    let (usage_chunks, others): (Vec<&Value>, Vec<&Value>) = final_only
        .iter()
        .partition(|c| c.get("usage").is_some_and(|u| !u.is_null()));
    assert_eq!(usage_chunks.len(), 1);
    assert_eq!(usage_chunks[0]["choices"], json!([]));
    assert!(!others.is_empty());

    let continuous = stream_payloads(
        &gw,
        &key.secret,
        Some(json!({"include_usage": true, "continuous_usage_stats": true})),
    )
    .await;
    assert!(continuous.iter().all(|c| c["usage"].is_object()));

    // Every one of those asked the upstream for continuous usage, and all were charged.
    for seen in gw.sim.simulator.requests() {
        assert_eq!(seen.body["stream_options"]["include_usage"], true);
        assert_eq!(seen.body["stream_options"]["continuous_usage_stats"], true);
    }
    let final_usage = &usage_chunks[0]["usage"];
    let mine = gw.usage(&key.secret).await;
    assert_eq!(mine["requests"]["used"], 3);
    assert_eq!(
        mine["tokens"]["used"],
        3 * final_usage["total_tokens"].as_u64().unwrap()
    );
}

#[tokio::test]
async fn models_are_filtered_by_the_key_allowlist() {
    let gw = TestGateway::start().await;
    let open = gw.create_key(json!({})).await;
    let narrow = gw.create_key(json!({"models": ["some-other-model"]})).await;
    assert_eq!(gw.models(&open.secret).await, vec![MODEL.to_owned()]);
    assert!(gw.models(&narrow.secret).await.is_empty());
    let (status, _) = gw.get("/v1/models", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn metadata_is_added_to_the_body_only_when_configured() {
    let gw = TestGateway::builder()
        .config(|c| c.server.response_metadata = true)
        .start()
        .await;
    let key = gw.create_key(json!({"request_quota": 5})).await;
    let body: Value = gw
        .chat(&key.secret, &chat_body("hi"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(body["metadata"]["remaining_requests"], 4);
    assert!(body["metadata"]["processing_time_ms"].is_u64());
    assert_eq!(body["object"], "chat.completion");
}

#[tokio::test]
async fn service_info_health_and_unknown_routes() {
    let gw = TestGateway::start().await;
    let (status, info) = gw.get("/", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(info["service"], "step3-gateway");
    assert_eq!(info["endpoints"]["chat"], "POST /v1/chat/completions");

    let health: Value = gw.health().await;
    assert_eq!(health["status"], "ok");
    assert_eq!(health["upstreams"][0]["healthy"], true);

    let response = gw.http.get(gw.url("/v1/nothing")).send().await.unwrap();
    let error = crate::common::expect_error(response, StatusCode::NOT_FOUND).await;
    assert_eq!(error["code"], "unknown_url");
    let response = gw
        .http
        .get(gw.url("/v1/chat/completions"))
        .send()
        .await
        .unwrap();
    crate::common::expect_error(response, StatusCode::METHOD_NOT_ALLOWED).await;
}

#[tokio::test]
async fn health_reports_a_dead_upstream_without_failing() {
    let gw = TestGateway::builder()
        .config(|c| c.upstream.url = "http://127.0.0.1:9".into())
        .start()
        .await;
    let (status, health) = gw.get("/health", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(health["status"], "unavailable");
    assert_eq!(health["upstreams"][0]["healthy"], false);
}
