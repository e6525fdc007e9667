//! Hostile or unusual requests that once got past the books or the limits (found in review),
//! kept as regression tests.

use std::time::Duration;

use futures_util::StreamExt;
use reqwest::StatusCode;
use serde_json::{Value, json};
use step3_gateway::sim::Fault;
use tokio::io::AsyncWriteExt;

use crate::common::{
    MODEL, RestApi, TestGateway, chat_body, chat_request, expect_status, stream_body,
};

/// `"max_tokens": null` must be replaced, not shadowed: the upstream keeps the last of two
/// duplicate keys (as Python's json and vLLM do), so a prepended cap would be ignored.
#[tokio::test]
async fn a_null_max_tokens_is_still_capped_by_the_quota() {
    let gw = TestGateway::builder()
        .sim(|s| s.reply_tokens = 2000)
        .start()
        .await;
    let key = gw.create_key(json!({"token_quota": 100})).await;
    let mut body = chat_body("hi");
    body["max_tokens"] = Value::Null;
    let response = gw.chat(&key.secret, &body).await;
    assert_eq!(response.status(), StatusCode::OK);
    let sent = gw.sim.simulator.requests().last().unwrap().clone();
    assert!(
        !String::from_utf8_lossy(&sent.raw_body).contains("null"),
        "{:?}",
        sent.raw_body
    );
    let usage = gw.usage(&key.secret).await;
    let used = usage["tokens"]["used"].as_u64().unwrap();
    assert!(used <= 110, "quota 100, charged {used}: {usage}");
}

/// The same for `"stream_options": null`: the upstream must still be asked for usage.
#[tokio::test]
async fn null_stream_options_still_brings_usage_to_the_gateway() {
    let gw = TestGateway::start().await;
    let key = gw.create_key(json!({})).await;
    let mut body = stream_body("hi");
    body["stream_options"] = Value::Null;
    let text = gw.chat(&key.secret, &body).await.text().await.unwrap();
    assert!(text.contains("[DONE]"));
    let sent = gw.sim.simulator.requests().last().unwrap().clone();
    assert_eq!(sent.body["stream_options"]["include_usage"], true);
    let calls = gw.wait_for_calls(&key.id, 1).await;
    assert_eq!(calls[0]["usage_estimated"], json!(false), "{}", calls[0]);
}

/// A call refused by the user's limit has already passed the key's per-minute window; the
/// key must get that request back.
#[tokio::test]
async fn a_refusal_by_the_user_limit_gives_the_key_its_request_back() {
    let gw = TestGateway::builder()
        .sim(|s| s.token_latency = Duration::from_millis(40))
        .start()
        .await;
    let user_id = gw
        .create_user(json!({"name": "u", "max_concurrent": 1}))
        .await;
    let key = gw.create_key_for(&user_id, json!({"rpm_limit": 2})).await;
    let mut stream_body = chat_body("long");
    stream_body["stream"] = json!(true);
    let stream = gw.chat(&key.secret, &stream_body).await;
    assert_eq!(stream.status(), StatusCode::OK);
    // Refused by the user's concurrency cap: this call never ran.
    let refused = gw.chat(&key.secret, &chat_body("b")).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.headers()["x-ratelimit-scope"], "user");
    // Let the stream finish; the key has made exactly one call this minute (limit 2).
    let mut bytes = stream.bytes_stream();
    while bytes.next().await.is_some() {}
    tokio::time::sleep(Duration::from_millis(100)).await;
    let second = gw.chat(&key.secret, &chat_body("c")).await;
    expect_status(second, StatusCode::OK).await;
}

/// An unauthenticated gRPC-looking POST to `path`.
async fn post_as_grpc(gw: &TestGateway, path: &str) -> reqwest::Response {
    gw.http
        .post(gw.url(path))
        .header("content-type", "application/grpc")
        .send()
        .await
        .unwrap()
}

/// Unauthenticated requests to made-up gRPC methods must not each make a metrics series.
#[tokio::test]
async fn made_up_grpc_paths_share_one_metrics_label() {
    let gw = TestGateway::start().await;
    for i in 0..50 {
        let path = format!("/step3.gateway.v1.Chat/Nope{i}{}", "x".repeat(2000));
        let response = post_as_grpc(&gw, &path).await;
        assert_eq!(response.status(), StatusCode::OK);
    }
    let text = gw.metrics().await;
    let series = text
        .lines()
        .filter(|l| l.starts_with("step3gw_requests_total") && l.contains("Nope"))
        .count();
    assert!(series <= 1, "{series} series from made-up paths");
}

/// A non-streaming call cut by the gateway's own timeout is charged: the model worked on it.
#[tokio::test]
async fn a_json_call_cut_by_the_gateway_timeout_is_charged() {
    let gw = TestGateway::builder()
        .config(|c| c.upstream.first_byte_timeout_secs = 1)
        .start()
        .await;
    let key = gw.create_key(json!({"request_quota": 10})).await;
    gw.sim
        .simulator
        .push_fault(Fault::Delay(Duration::from_secs(3)));
    let response = gw.chat(&key.secret, &chat_body("slow")).await;
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    let usage = gw.usage(&key.secret).await;
    assert_eq!(usage["requests"]["used"], json!(1), "{usage}");
}

/// A reset by the backend must not show the client the backend's internal address.
#[tokio::test]
async fn the_upstream_address_never_reaches_the_client() {
    let gw = TestGateway::start().await;
    let key = gw.create_key(json!({})).await;
    gw.sim.simulator.push_fault(Fault::DropConnection);
    gw.sim.simulator.push_fault(Fault::DropConnection);
    let response = gw.chat(&key.secret, &chat_body("x")).await;
    // Both attempts were reset: a gateway error, without the backend's address.
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    let text = response.text().await.unwrap();
    assert!(!text.contains(&gw.sim.addr.to_string()), "{text}");
}

/// A client that never finishes sending its body must not keep a SIGTERM shutdown (and the
/// final write of the usage) waiting beyond the grace period.
#[tokio::test]
async fn a_stalled_upload_does_not_block_shutdown() {
    let mut gw = TestGateway::builder()
        .config(|c| c.server.shutdown_grace_secs = 1)
        .start()
        .await;
    let key = gw.create_key(json!({})).await;
    let mut socket = tokio::net::TcpStream::connect(gw.running().addr)
        .await
        .unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\n\
         content-type: application/json\r\ncontent-length: 1000\r\n\r\n{{\"model\":",
        key.secret
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let running = gw.take_running();
    let stopped = tokio::time::timeout(Duration::from_secs(8), running.shutdown()).await;
    assert!(
        stopped.is_ok(),
        "shutdown still waiting 7 s after the grace period"
    );
    drop(socket);
}

/// A `grpc-timeout` beyond what a deadline can hold is ignored (the spec allows 8 digits),
/// not a panic.
#[tokio::test]
async fn an_absurd_grpc_timeout_is_ignored_not_a_panic() {
    let gw = TestGateway::start().await;
    let key = gw.create_key(json!({})).await;
    let mut client = gw.grpc_chat(&key.secret).await;
    let mut request = tonic::Request::new(chat_request("hi"));
    request
        .metadata_mut()
        .insert("grpc-timeout", "18446744073709551615S".parse().unwrap());
    let result = client.stream_complete(request).await;
    match result {
        Ok(r) => {
            let first = r.into_inner().next().await;
            assert!(matches!(first, Some(Ok(_))), "{first:?}");
        }
        Err(status) => panic!("{status:?}"),
    }
}

/// A key whose `tpm_limit` is below `default_max_tokens` must still serve calls that omit
/// `max_tokens` (the OpenAI SDK's default): their cap becomes the room under the limit.
#[tokio::test]
async fn a_small_tpm_limit_caps_calls_that_give_no_max_tokens() {
    let gw = TestGateway::start().await;
    let key = gw.create_key(json!({"tpm_limit": 2000})).await;
    let response = gw.chat(&key.secret, &chat_body("hi")).await;
    expect_status(response, StatusCode::OK).await;
}

/// The gRPC door: `extra: {"max_tokens": null}` is capped like REST's null.
#[tokio::test]
async fn a_null_max_tokens_in_grpc_extra_is_still_capped() {
    use step3_gateway::grpc::pb;
    let gw = TestGateway::builder()
        .sim(|s| s.reply_tokens = 2000)
        .start()
        .await;
    let key = gw.create_key(json!({"token_quota": 100})).await;
    let mut client = gw.grpc_chat(&key.secret).await;
    let mut extra = prost_types::Struct::default();
    extra.fields.insert(
        "max_tokens".into(),
        prost_types::Value {
            kind: Some(prost_types::value::Kind::NullValue(0)),
        },
    );
    let answer = client
        .complete(pb::ChatRequest {
            extra: Some(extra),
            ..chat_request("hi")
        })
        .await
        .unwrap()
        .into_inner();
    let used = answer.usage.unwrap().completion_tokens;
    assert!(used < 100, "quota 100, generated {used}");
}

/// One unauthenticated request with a 60 KiB made-up gRPC path leaves nothing behind.
#[tokio::test]
async fn a_long_made_up_grpc_path_is_not_kept_in_metrics() {
    let gw = TestGateway::start().await;
    let path = format!("/step3.gateway.v1.{}", "y".repeat(60_000));
    let response = post_as_grpc(&gw, &path).await;
    assert_eq!(response.headers()["grpc-status"], "12");
    let text = gw.metrics().await;
    assert!(text.len() < 60_000, "/metrics is {} bytes", text.len());
}

/// `n` choices may each run to the cap: the reservation and the lowered cap count all of them.
#[tokio::test]
async fn several_choices_share_what_the_quota_has_left() {
    let gw = TestGateway::start().await;
    let key = gw.create_key(json!({"token_quota": 1000})).await;
    let mut body = chat_body("hi");
    body["n"] = json!(4);
    body["max_tokens"] = json!(900);
    assert_eq!(gw.chat(&key.secret, &body).await.status(), StatusCode::OK);
    // 1000 left, 5 for the prompt: 995 shared by 4 choices.
    assert_eq!(gw.sim.simulator.requests()[0].body["max_tokens"], 248);
}

/// Tool definitions are rendered into the prompt, so they count in its estimate.
#[tokio::test]
async fn tool_definitions_count_in_the_prompt_estimate() {
    let gw = TestGateway::start().await;
    let key = gw.create_key(json!({"token_quota": 1000})).await;
    let mut body = chat_body("hi");
    body["tools"] =
        json!([{"type": "function", "function": {"name": "f", "description": "x".repeat(2000)}}]);
    assert_eq!(gw.chat(&key.secret, &body).await.status(), StatusCode::OK);
    // About 520 of the 1000 tokens are the tools' JSON: the answer may use the rest only.
    let cap = gw.sim.simulator.requests()[0].body["max_tokens"]
        .as_u64()
        .unwrap();
    assert!((400..500).contains(&cap), "cap {cap}");
}

/// Video and audio URLs would be fetched by a multimodal server just like images: the same
/// SSRF policy applies to them.
#[tokio::test]
async fn video_and_audio_urls_are_held_to_the_url_policy() {
    let gw = TestGateway::start().await;
    let key = gw.create_key(json!({})).await;
    for (kind, field) in [("video_url", "video_url"), ("audio_url", "audio_url")] {
        let body = json!({"model": MODEL, "messages": [{"role": "user", "content": [
            {"type": kind, field: {"url": "http://169.254.169.254/latest/meta-data/"}}]}]});
        let error =
            crate::common::expect_error(gw.chat(&key.secret, &body).await, StatusCode::BAD_REQUEST)
                .await;
        assert_eq!(
            error["param"],
            format!("messages[0].content[0].{field}.url")
        );
    }
    assert_eq!(gw.sim.simulator.stats().chat_requests, 0);
}
