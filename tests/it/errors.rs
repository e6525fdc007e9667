//! Every refusal: right status, OpenAI error body, nothing sent upstream, nothing charged.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::json;
use step3_gateway::sim::Fault;

use crate::common::{MODEL, RestApi, TestGateway, chat_body, expect_error};

async fn assert_nothing_charged(gw: &TestGateway, secret: &str) {
    let usage = gw.usage(secret).await;
    assert_eq!(usage["requests"]["used"], 0, "{usage}");
    assert_eq!(usage["tokens"]["used"], 0, "{usage}");
}

#[tokio::test]
async fn missing_unknown_and_malformed_keys_get_401_invalid_api_key() {
    let gw = TestGateway::start().await;
    let response = gw
        .http
        .post(gw.url("/v1/chat/completions"))
        .json(&chat_body("hi"))
        .send()
        .await
        .unwrap();
    let error = expect_error(response, StatusCode::UNAUTHORIZED).await;
    assert_eq!(error["code"], "invalid_api_key");
    for bad in [
        "sk-step3-0000000000000000000000000000000000000000",
        "",
        "Basic abc",
    ] {
        let response = gw.chat(bad, &chat_body("hi")).await;
        let error = expect_error(response, StatusCode::UNAUTHORIZED).await;
        assert_eq!(error["code"], "invalid_api_key");
    }
    assert_eq!(gw.sim.simulator.stats().chat_requests, 0);
}

#[tokio::test]
async fn revoked_expired_inactive_and_deactivated_user_keys_get_401() {
    let gw = TestGateway::start().await;
    let revoked = gw.create_key(json!({})).await;
    let (status, _) = gw
        .admin(Method::DELETE, &format!("/keys/{}", revoked.id), None)
        .await;
    assert_eq!(status, StatusCode::OK);

    // Expiry is kept in whole seconds: a key good for one second has expired two seconds on.
    let expired = gw.create_key(json!({"expires_in": "1s"})).await;

    let inactive = gw.create_key(json!({})).await;
    let (status, _) = gw
        .admin(
            Method::PATCH,
            &format!("/keys/{}", inactive.id),
            Some(json!({"active": false})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);

    let orphan = gw.create_key(json!({})).await;
    let (status, _) = gw
        .admin(Method::DELETE, &format!("/users/{}", orphan.user_id), None)
        .await;
    assert_eq!(status, StatusCode::OK);

    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    for key in [&revoked, &expired, &inactive, &orphan] {
        let response = gw.chat(&key.secret, &chat_body("hi")).await;
        let error = expect_error(response, StatusCode::UNAUTHORIZED).await;
        assert_eq!(error["code"], "invalid_api_key", "{key:?}");
    }
    assert_eq!(gw.sim.simulator.stats().chat_requests, 0);
}

#[tokio::test]
async fn a_model_outside_the_allowlist_is_refused_before_the_upstream() {
    let gw = TestGateway::start().await;
    let key = gw.create_key(json!({"models": ["another-model"]})).await;
    let response = gw.chat(&key.secret, &chat_body("hi")).await;
    let error = expect_error(response, StatusCode::NOT_FOUND).await;
    assert_eq!(error["code"], "model_not_found");
    assert_eq!(error["param"], "model");
    assert!(error["message"].as_str().unwrap().contains(MODEL));
    assert_eq!(gw.sim.simulator.stats().chat_requests, 0);
    assert_nothing_charged(&gw, &key.secret).await;
}

#[tokio::test]
async fn the_rate_limit_answers_429_with_retry_after() {
    let gw = TestGateway::start().await;
    let key = gw.create_key(json!({"rpm_limit": 2})).await;
    for remaining in ["1", "0"] {
        let response = gw.chat(&key.secret, &chat_body("hi")).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["x-ratelimit-limit-requests"], "2");
        assert_eq!(
            response.headers()["x-ratelimit-remaining-requests"],
            remaining
        );
    }
    let response = gw.chat(&key.secret, &chat_body("hi")).await;
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=120).contains(&retry_after), "{retry_after}");
    let error = expect_error(response, StatusCode::TOO_MANY_REQUESTS).await;
    assert_eq!(error["code"], "rate_limit_exceeded");
    assert_eq!(gw.sim.simulator.stats().chat_requests, 2);
    assert_eq!(gw.usage(&key.secret).await["requests"]["used"], 2);
}

#[tokio::test]
async fn exhausted_request_and_token_quotas_answer_insufficient_quota() {
    let gw = TestGateway::start().await;
    let requests = gw.create_key(json!({"request_quota": 1})).await;
    assert_eq!(
        gw.chat(&requests.secret, &chat_body("hi")).await.status(),
        StatusCode::OK
    );
    let error = expect_error(
        gw.chat(&requests.secret, &chat_body("hi")).await,
        StatusCode::TOO_MANY_REQUESTS,
    )
    .await;
    assert_eq!(error["code"], "insufficient_quota");
    assert_eq!(error["type"], "insufficient_quota");

    let tokens = gw.create_key(json!({"token_quota": 10})).await;
    assert_eq!(
        gw.chat(&tokens.secret, &chat_body("hi")).await.status(),
        StatusCode::OK
    );
    let error = expect_error(
        gw.chat(&tokens.secret, &chat_body("hi")).await,
        StatusCode::TOO_MANY_REQUESTS,
    )
    .await;
    assert_eq!(error["code"], "insufficient_quota");
    assert!(error["message"].as_str().unwrap().contains("tokens"));
    assert_eq!(gw.sim.simulator.stats().chat_requests, 2);
}

#[tokio::test]
async fn malformed_bodies_get_400_naming_the_problem() {
    let gw = TestGateway::start().await;
    let key = gw.create_key(json!({})).await;
    let error = expect_error(
        gw.chat_raw(&key.secret, "{\"model\": ").await,
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("parse the JSON"),
        "{error}"
    );
    let error = expect_error(
        gw.chat_raw(&key.secret, "[1,2,3]").await,
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert_eq!(error["type"], "invalid_request_error");

    let cases = [
        (
            json!({"messages": [{"role": "user", "content": "hi"}]}),
            "model",
        ),
        (json!({"model": MODEL}), "messages"),
        (json!({"model": MODEL, "messages": []}), "messages"),
        (
            json!({"model": 42, "messages": [{"role": "user", "content": "hi"}]}),
            "model",
        ),
        (json!({"model": MODEL, "messages": "hi"}), "messages"),
        (
            json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}),
            "stream",
        ),
    ];
    for (body, param) in cases {
        let error = expect_error(gw.chat(&key.secret, &body).await, StatusCode::BAD_REQUEST).await;
        assert_eq!(error["param"], param, "{body} → {error}");
        assert!(
            error["message"].as_str().unwrap().contains(param),
            "{error}"
        );
    }
    assert_eq!(gw.sim.simulator.stats().chat_requests, 0);
    assert_nothing_charged(&gw, &key.secret).await;
}

#[tokio::test]
async fn a_body_over_the_limit_gets_413() {
    let gw = TestGateway::builder()
        .config(|c| c.server.max_body_bytes = 64 * 1024)
        .start()
        .await;
    let key = gw.create_key(json!({})).await;
    let big = "x".repeat(100 * 1024);
    let error = expect_error(
        gw.chat(&key.secret, &chat_body(&big)).await,
        StatusCode::PAYLOAD_TOO_LARGE,
    )
    .await;
    assert_eq!(error["code"], "request_too_large");
    assert_eq!(
        gw.chat(&key.secret, &chat_body("small")).await.status(),
        StatusCode::OK
    );
    assert_eq!(gw.sim.simulator.stats().chat_requests, 1);
}

#[tokio::test]
async fn upstream_errors_keep_their_status_and_message_and_charge_nothing() {
    let gw = TestGateway::builder()
        .config(|c| c.upstream.max_retries = 0)
        .start()
        .await;
    let key = gw.create_key(json!({"request_quota": 5})).await;
    gw.sim.simulator.push_fault(Fault::Status {
        status: 400,
        body: json!({"object": "error", "message": "This model's maximum context length is 65536 tokens.", "type": "BadRequestError", "param": null, "code": 400}).to_string(),
    });
    let error = expect_error(
        gw.chat(&key.secret, &chat_body("hi")).await,
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("maximum context length")
    );

    gw.sim.simulator.push_fault(Fault::Status {
        status: 502,
        body: "<html><body>502 Bad Gateway</body></html>".into(),
    });
    let error = expect_error(
        gw.chat(&key.secret, &chat_body("hi")).await,
        StatusCode::BAD_GATEWAY,
    )
    .await;
    assert!(error["message"].as_str().unwrap().contains("502"));

    let unknown =
        json!({"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]});
    let error = expect_error(gw.chat(&key.secret, &unknown).await, StatusCode::NOT_FOUND).await;
    assert!(error["message"].as_str().unwrap().contains("no-such-model"));

    assert_nothing_charged(&gw, &key.secret).await;
    assert_eq!(gw.usage(&key.secret).await["requests"]["remaining"], 5);
    let calls = gw.wait_for_calls(&key.id, 3).await;
    assert!(calls.iter().all(|c| c["outcome"] == "upstream_error"));
}

#[tokio::test]
async fn a_dead_upstream_gets_503_at_once_and_a_silent_one_504_charged_as_estimated() {
    let gw = TestGateway::builder()
        .config(|c| c.upstream.url = "http://127.0.0.1:9".into())
        .start()
        .await;
    let key = gw.create_key(json!({})).await;
    // Its health check failed at start: no call waits on it.
    let error = expect_error(
        gw.chat(&key.secret, &chat_body("hi")).await,
        StatusCode::SERVICE_UNAVAILABLE,
    )
    .await;
    assert_eq!(error["code"], "no_healthy_backend");
    assert_nothing_charged(&gw, &key.secret).await;
    // One call, one story: the call log and the metrics say what the client was told.
    let calls = gw.wait_for_calls(&key.id, 1).await;
    assert_eq!(calls[0]["status"], 503, "{}", calls[0]);
    assert_eq!(calls[0]["outcome"], "upstream_failed");
    assert!(
        gw.metrics().await.contains(r#"status="503""#),
        "the request metric counts the 503 the client saw"
    );
    // /health says why the backend is not taking calls, and when it last looked.
    let health = gw.health().await;
    let backend = &health["upstreams"][0];
    assert_eq!(backend["healthy"], false, "{health}");
    assert!(backend["checked_at"].as_i64().unwrap() > 0, "{health}");
    let why = backend["last_error"].as_str().unwrap();
    assert!(why.contains("connect"), "{why}");
    assert!(!why.contains("127.0.0.1:9"), "no address on /health: {why}");

    let slow = TestGateway::builder()
        .config(|c| c.upstream.first_byte_timeout_secs = 1)
        .start()
        .await;
    let key = slow.create_key(json!({})).await;
    slow.sim
        .simulator
        .push_fault(Fault::Delay(Duration::from_secs(5)));
    let error = expect_error(
        slow.chat(&key.secret, &chat_body("hi")).await,
        StatusCode::GATEWAY_TIMEOUT,
    )
    .await;
    assert_eq!(error["code"], "upstream_timeout");
    // The model had the request and worked on it until the timeout: the request is charged,
    // with the prompt estimate, marked as an estimate.
    let usage = slow.usage(&key.secret).await;
    assert_eq!(usage["requests"]["used"], 1);
    assert_eq!(usage["tokens"]["completion"], 0);
    let calls = slow.wait_for_calls(&key.id, 1).await;
    assert_eq!(calls[0]["outcome"], "timed_out");
    assert_eq!(calls[0]["usage_estimated"], true);
    assert!(calls[0]["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
}

#[tokio::test]
async fn a_dropped_upstream_connection_is_a_502() {
    let gw = TestGateway::builder()
        .config(|c| c.upstream.max_retries = 0)
        .start()
        .await;
    let key = gw.create_key(json!({})).await;
    gw.sim.simulator.push_fault(Fault::DropConnection);
    let error = expect_error(
        gw.chat(&key.secret, &chat_body("hi")).await,
        StatusCode::BAD_GATEWAY,
    )
    .await;
    assert_eq!(error["type"], "upstream_error");
    assert_nothing_charged(&gw, &key.secret).await;
}
