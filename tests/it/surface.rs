//! The OpenAI surface as SDKs call it, and one story per call: what the client is told is
//! what the call log, `/health` and the metrics say.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;
use step3_gateway::sim::SimulatorConfig;

use crate::common::{MODEL, RestApi, TestGateway, chat_body, expect_error, spawn_sim};

#[tokio::test]
async fn a_model_is_retrieved_by_its_id_slashes_and_all_and_an_unknown_one_is_model_not_found() {
    let gw = TestGateway::start().await;
    let key = gw.create_key(json!({})).await;
    let (status, model) = gw
        .get(&format!("/v1/models/{MODEL}"), Some(&key.secret))
        .await;
    assert_eq!(status, StatusCode::OK, "{model}");
    assert_eq!(model["id"], MODEL);
    assert_eq!(model["object"], "model");

    let missing = gw
        .http
        .get(gw.url("/v1/models/no-such-model"))
        .bearer_auth(&key.secret)
        .send()
        .await
        .unwrap();
    let error = expect_error(missing, StatusCode::NOT_FOUND).await;
    assert_eq!(error["code"], "model_not_found");

    // A model the key may not use is as unknown as one nobody serves.
    let narrow = gw.create_key(json!({"models": ["other-model"]})).await;
    let (status, _) = gw
        .get(&format!("/v1/models/{MODEL}"), Some(&narrow.secret))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn the_model_servers_model_not_found_and_the_gateways_look_alike() {
    let gw = TestGateway::start().await;
    let open = gw.create_key(json!({})).await;
    let narrow = gw.create_key(json!({"models": [MODEL]})).await;
    let unknown =
        json!({"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]});
    let from_server =
        expect_error(gw.chat(&open.secret, &unknown).await, StatusCode::NOT_FOUND).await;
    let from_gateway = expect_error(
        gw.chat(&narrow.secret, &unknown).await,
        StatusCode::NOT_FOUND,
    )
    .await;
    for error in [&from_server, &from_gateway] {
        assert_eq!(error["code"], "model_not_found", "{error}");
        assert_eq!(error["type"], "invalid_request_error", "{error}");
        assert_eq!(error["param"], "model", "{error}");
    }
}

#[tokio::test]
async fn a_used_up_quota_tells_the_sdks_not_to_retry() {
    let gw = TestGateway::start().await;
    let key = gw.create_key(json!({"request_quota": 1})).await;
    assert_eq!(
        gw.chat(&key.secret, &chat_body("hi")).await.status(),
        StatusCode::OK
    );
    let refused = gw.chat(&key.secret, &chat_body("hi")).await;
    assert_eq!(refused.headers()["x-should-retry"], "false");
    let error = expect_error(refused, StatusCode::TOO_MANY_REQUESTS).await;
    assert_eq!(error["code"], "insufficient_quota");

    // A per-minute limit passes with time: the SDK may retry that one.
    let limited = gw.create_key(json!({"rpm_limit": 1})).await;
    gw.chat(&limited.secret, &chat_body("hi")).await;
    let refused = gw.chat(&limited.secret, &chat_body("hi")).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(refused.headers().get("x-should-retry").is_none());
}

#[tokio::test]
async fn a_backend_that_fails_a_call_is_checked_at_once_not_at_the_next_tick() {
    let upstream = spawn_sim(SimulatorConfig::default()).await;
    let url = upstream.url();
    let gw = TestGateway::builder()
        // Far longer than the test: only a failed call can bring the next check.
        .config(move |c| {
            c.upstream.url = url;
            c.upstream.health_interval_ms = 600_000;
        })
        .start()
        .await;
    let key = gw.create_key(json!({})).await;
    assert_eq!(gw.health().await["upstreams"][0]["healthy"], true);
    upstream.shutdown().await;

    let failed = gw.chat(&key.secret, &chat_body("hi")).await;
    assert_eq!(failed.status(), StatusCode::BAD_GATEWAY);
    let mut seen = None;
    for _ in 0..100 {
        let health = gw.health().await;
        if health["upstreams"][0]["healthy"] == false {
            seen = Some(health);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let health = seen.expect("the failed call made the gateway look again within 2 s");
    assert!(
        health["upstreams"][0]["last_error"].as_str().is_some(),
        "{health}"
    );
    // The next call is refused at once, not sent to a dead backend.
    let error = expect_error(
        gw.chat(&key.secret, &chat_body("hi")).await,
        StatusCode::SERVICE_UNAVAILABLE,
    )
    .await;
    assert_eq!(error["code"], "no_healthy_backend");
}
