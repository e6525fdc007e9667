//! Exact books: reservations bound spending before the GPU works; limits per key and per
//! user; every figure reported; concurrency cannot overdraw a quota.

use std::time::Duration;

use futures_util::future::join_all;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use step3_gateway::grpc::pb;
use step3_gateway::sim::Fault;

use crate::common::{
    MODEL, RestApi, TestGateway, chat_body, chat_request, expect_error, sse_payloads, stream_body,
};

fn with_cap(text: &str, max_tokens: u64) -> Value {
    let mut body = chat_body(text);
    body["max_tokens"] = json!(max_tokens);
    body
}

#[tokio::test]
async fn a_cap_the_quota_cannot_cover_is_lowered_before_the_gpu_works() {
    let gw = TestGateway::builder()
        .sim(|s| s.reply_tokens = 500)
        .start()
        .await;
    let key = gw.create_key(json!({"token_quota": 100})).await;
    // "hi" is estimated at 5 prompt tokens: 95 remain for the answer, not 400.
    let answer: Value = gw
        .chat(&key.secret, &with_cap("hi", 400))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(gw.sim.simulator.requests()[0].body["max_tokens"], 95);
    assert_eq!(answer["usage"]["total_tokens"], 100);
    assert_eq!(answer["choices"][0]["finish_reason"], "length");
    let usage = gw.usage(&key.secret).await;
    assert_eq!(usage["tokens"]["used"], 100);
    assert_eq!(usage["tokens"]["remaining"], 0);
    let error = expect_error(
        gw.chat(&key.secret, &chat_body("more")).await,
        StatusCode::TOO_MANY_REQUESTS,
    )
    .await;
    assert_eq!(error["code"], "insufficient_quota");
    assert_eq!(gw.sim.simulator.stats().chat_requests, 1);
}

#[tokio::test]
async fn a_key_with_a_token_quota_always_sends_a_cap_and_others_are_left_alone() {
    let gw = TestGateway::builder()
        .config(|c| c.limits.default_max_tokens = 64)
        .start()
        .await;
    let bounded = gw.create_key(json!({"token_quota": 1_000_000})).await;
    let open = gw.create_key(json!({})).await;
    gw.chat(&bounded.secret, &chat_body("a")).await;
    gw.chat(&bounded.secret, &with_cap("b", 10)).await;
    gw.chat(&open.secret, &chat_body("c")).await;
    let seen = gw.sim.simulator.requests();
    assert_eq!(seen[0].body["max_tokens"], 64);
    assert_eq!(seen[1].body["max_tokens"], 10);
    assert!(seen[2].body.get("max_tokens").is_none());
}

#[tokio::test]
async fn hundreds_of_concurrent_calls_never_overdraw_a_token_quota() {
    let gw = TestGateway::builder()
        .sim(|s| {
            s.token_latency = Duration::from_millis(3);
            s.reply_tokens = 40;
            s.reasoning_tokens = 0;
        })
        .start()
        .await;
    let quota = 3_000u64;
    let key = gw.create_key(json!({"token_quota": quota})).await;
    let calls = (0..240).map(|i| {
        let gw = &gw;
        let secret = key.secret.clone();
        async move {
            let mut body = with_cap(&format!("question {i:03}"), 30);
            if i % 3 == 0 {
                body["stream"] = json!(true);
                body["stream_options"] = json!({"include_usage": true});
            }
            let response = gw.chat(&secret, &body).await;
            let status = response.status();
            let text = response.text().await.unwrap();
            let reported = match status {
                StatusCode::OK if i % 3 == 0 => sse_payloads(&text)
                    .iter()
                    .filter_map(|p| serde_json::from_str::<Value>(p).ok())
                    .filter_map(|c| c["usage"]["total_tokens"].as_u64())
                    .next_back()
                    .unwrap(),
                StatusCode::OK => {
                    serde_json::from_str::<Value>(&text).unwrap()["usage"]["total_tokens"]
                        .as_u64()
                        .unwrap()
                }
                _ => {
                    let error: Value = serde_json::from_str(&text).unwrap();
                    assert_eq!(error["error"]["code"], "insufficient_quota", "{text}");
                    0
                }
            };
            (status, reported)
        }
    });
    let results = join_all(calls).await;
    let served: Vec<u64> = results
        .iter()
        .filter(|(s, _)| *s == StatusCode::OK)
        .map(|(_, t)| *t)
        .collect();
    let reported: u64 = served.iter().sum();
    assert!(
        !served.is_empty() && served.len() < 240,
        "{} served",
        served.len()
    );
    // The simulator counts prompts exactly as the gateway estimates them: no estimate error.
    assert!(reported <= quota, "charged {reported} of {quota}");
    let usage = gw.usage(&key.secret).await;
    assert_eq!(
        usage["tokens"]["used"], reported,
        "charged = what the upstream reported"
    );
    assert_eq!(usage["requests"]["used"], served.len());
    assert_eq!(gw.sim.simulator.stats().chat_requests, served.len() as u64);
    assert_eq!(
        gw.wait_for_calls(&key.id, served.len()).await.len(),
        served.len()
    );
}

#[tokio::test]
async fn tokens_per_minute_reserve_the_cap_and_release_what_was_not_used() {
    let gw = TestGateway::builder()
        .sim(|s| {
            s.reply_tokens = 10;
            s.reasoning_tokens = 0;
        })
        .start()
        .await;
    let key = gw.create_key(json!({"tpm_limit": 100})).await;
    // Each call reserves 5 + 60 and uses 5 + 10: the next call fits once the first settled.
    for _ in 0..3 {
        let response = gw.chat(&key.secret, &with_cap("hi", 60)).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["x-ratelimit-limit-tokens"], "100");
        assert!(
            response
                .headers()
                .contains_key("x-ratelimit-remaining-tokens")
        );
        assert!(response.headers().contains_key("x-ratelimit-reset-tokens"));
    }
    // 45 used; 65 more does not fit in 100.
    let response = gw.chat(&key.secret, &with_cap("hi", 60)).await;
    assert!(response.headers().contains_key("retry-after"));
    assert_eq!(response.headers()["x-ratelimit-limit-tokens"], "100");
    assert_eq!(response.headers()["x-ratelimit-remaining-tokens"], "0");
    let error = expect_error(response, StatusCode::TOO_MANY_REQUESTS).await;
    assert_eq!(
        (error["type"].as_str(), error["code"].as_str()),
        (Some("tokens"), Some("rate_limit_exceeded"))
    );
    // A request that could never fit says so.
    let error = expect_error(
        gw.chat(&key.secret, &with_cap("hi", 500)).await,
        StatusCode::TOO_MANY_REQUESTS,
    )
    .await;
    assert!(
        error["message"].as_str().unwrap().contains("too large"),
        "{error}"
    );
}

#[tokio::test]
async fn every_response_of_a_limited_key_carries_both_rate_figures() {
    let gw = TestGateway::start().await;
    let key = gw
        .create_key(json!({"rpm_limit": 10, "tpm_limit": 100_000}))
        .await;
    let response = gw.chat(&key.secret, &chat_body("hi")).await;
    let headers = response.headers();
    assert_eq!(headers["x-ratelimit-limit-requests"], "10");
    assert_eq!(headers["x-ratelimit-remaining-requests"], "9");
    assert!(
        headers["x-ratelimit-reset-requests"]
            .to_str()
            .unwrap()
            .ends_with('s')
    );
    assert_eq!(headers["x-ratelimit-limit-tokens"], "100000");
    let remaining: u64 = headers["x-ratelimit-remaining-tokens"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(remaining < 100_000);
    let body = stream_body("stream");
    let response = gw.chat(&key.secret, &body).await;
    assert_eq!(response.headers()["x-ratelimit-remaining-requests"], "8");
    assert!(
        response
            .headers()
            .contains_key("x-ratelimit-remaining-tokens")
    );
    response.text().await.unwrap();
    let mine = gw.usage(&key.secret).await;
    assert_eq!(mine["rate_limit"]["requests_this_minute_remaining"], 8);
}

#[tokio::test]
async fn a_concurrency_cap_refuses_the_call_over_it_and_frees_its_slot() {
    let gw = TestGateway::builder()
        .sim(|s| s.token_latency = Duration::from_millis(100))
        .start()
        .await;
    let key = gw.create_key(json!({"max_concurrent": 2})).await;
    let slow = |i: usize| {
        let gw = &gw;
        let secret = key.secret.clone();
        async move {
            gw.chat(&secret, &with_cap(&format!("slow {i}"), 3))
                .await
                .status()
        }
    };
    let statuses = join_all((0..3).map(slow)).await;
    assert_eq!(
        statuses.iter().filter(|s| **s == StatusCode::OK).count(),
        2,
        "{statuses:?}"
    );
    assert_eq!(
        statuses
            .iter()
            .filter(|s| **s == StatusCode::TOO_MANY_REQUESTS)
            .count(),
        1
    );
    // Slots come back whatever the outcome: errors and disconnects too.
    gw.sim.simulator.push_fault(Fault::Status {
        status: 500,
        body: "{}".into(),
    });
    assert_eq!(
        gw.chat(&key.secret, &chat_body("fails")).await.status(),
        StatusCode::INTERNAL_SERVER_ERROR
    );
    let statuses = join_all((0..2).map(slow)).await;
    assert!(
        statuses.iter().all(|s| *s == StatusCode::OK),
        "{statuses:?}"
    );
}

#[tokio::test]
async fn a_user_limit_is_shared_by_all_of_the_users_keys() {
    let gw = TestGateway::start().await;
    let user_id = &gw
        .create_user(json!({"name": "team", "rpm_limit": 3}))
        .await;
    let first = gw.create_key_for(user_id, json!({"rpm_limit": 100})).await;
    let second = gw.create_key_for(user_id, json!({})).await;
    for key in [&first, &second, &first] {
        assert_eq!(
            gw.chat(&key.secret, &chat_body("hi")).await.status(),
            StatusCode::OK
        );
    }
    let response = gw.chat(&second.secret, &chat_body("hi")).await;
    assert_eq!(response.headers()["x-ratelimit-scope"], "user");
    let error = expect_error(response, StatusCode::TOO_MANY_REQUESTS).await;
    assert!(
        error["message"].as_str().unwrap().contains("user"),
        "{error}"
    );
    // The user's limit can be lifted at once.
    let (status, _) = gw
        .admin(
            Method::PATCH,
            &format!("/users/{user_id}"),
            Some(json!({"rpm_limit": null})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        gw.chat(&second.secret, &chat_body("hi")).await.status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn an_error_event_ends_the_stream_well_formed_and_settles_it_as_incomplete() {
    let gw = TestGateway::builder()
        .sim(|s| {
            s.reply_tokens = 20;
            s.reasoning_tokens = 0;
        })
        .start()
        .await;
    let key = gw.create_key(json!({})).await;
    gw.sim.simulator.push_fault(Fault::StreamErrorAfter(4));
    let body = stream_body("hi");
    let text = gw.chat(&key.secret, &body).await.text().await.unwrap();
    let payloads = sse_payloads(&text);
    assert_eq!(payloads.last().unwrap(), "[DONE]");
    assert!(payloads.iter().any(|p| p.contains("\"error\"")));
    let calls = gw.wait_for_calls(&key.id, 1).await;
    assert_eq!(calls[0]["outcome"], "stream_incomplete");
    assert_eq!(calls[0]["charged_request"], true);
    let completion = calls[0]["usage"]["completion_tokens"].as_u64().unwrap();
    assert_eq!(completion, 4, "{}", calls[0]);
}

#[tokio::test]
async fn grpc_calls_carry_the_same_figures_in_metadata() {
    let gw = TestGateway::start().await;
    let key = gw
        .create_key(json!({"rpm_limit": 5, "tpm_limit": 50_000, "token_quota": 100_000}))
        .await;
    let mut chat = gw.grpc_chat(&key.secret).await;
    let request = pb::ChatRequest {
        max_tokens: Some(20),
        ..chat_request("hi")
    };
    let response = chat.complete(request.clone()).await.unwrap();
    let metadata = response.metadata();
    assert_eq!(metadata.get("x-ratelimit-limit-requests").unwrap(), "5");
    assert_eq!(metadata.get("x-ratelimit-remaining-requests").unwrap(), "4");
    assert_eq!(metadata.get("x-ratelimit-limit-tokens").unwrap(), "50000");
    assert!(metadata.get("x-quota-remaining-tokens").is_some());
    let usage = chat
        .get_usage(pb::GetUsageRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(usage.requests_this_minute_remaining, Some(4));
    assert_eq!(usage.tpm_limit, Some(50_000));
}

fn image_body(urls: &[&str]) -> Value {
    let mut parts: Vec<Value> = urls
        .iter()
        .map(|url| json!({"type": "image_url", "image_url": {"url": url}}))
        .collect();
    parts.push(json!({"type": "text", "text": "What is in these?"}));
    json!({"model": MODEL, "messages": [{"role": "user", "content": parts}], "max_tokens": 5})
}

fn bee_data_url() -> String {
    use base64::Engine;
    let png = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/python/bee.png"
    ))
    .unwrap();
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(png)
    )
}

#[tokio::test]
async fn image_urls_into_the_gpu_servers_network_are_refused() {
    let gw = TestGateway::start().await;
    let key = gw.create_key(json!({})).await;
    for url in [
        "file:///etc/passwd",
        "http://169.254.169.254/latest/meta-data/",
        "http://localhost:8000/v1/models",
        "http://127.0.0.1/x.png",
        "http://[::1]/x.png",
        "http://10.0.0.5/x.png",
        "http://2130706433/x.png",
        "gopher://example.com/x",
    ] {
        let error = expect_error(
            gw.chat(&key.secret, &image_body(&[url])).await,
            StatusCode::BAD_REQUEST,
        )
        .await;
        assert_eq!(
            error["param"], "messages[0].content[0].image_url.url",
            "{url}: {error}"
        );
    }
    assert_eq!(gw.sim.simulator.stats().chat_requests, 0);
    let fine = gw
        .chat(&key.secret, &image_body(&["https://93.184.216.34/bee.jpg"]))
        .await;
    assert_eq!(fine.status(), StatusCode::OK);

    let open = TestGateway::builder()
        .config(|c| c.image_policy.allow_private_hosts = true)
        .start()
        .await;
    let key = open.create_key(json!({})).await;
    let inside = open
        .chat(&key.secret, &image_body(&["http://10.0.0.5/x.png"]))
        .await;
    assert_eq!(inside.status(), StatusCode::OK);
}

/// A name is resolved before the call is admitted (the text of `169.254.169.254.nip.io` looks
/// public); one that does not resolve here cannot be checked and is refused, naming it. The
/// test machines have no DNS of their own, so "does not resolve" is the case a test can make
/// without a network; where a name resolves to a private address is shown by the unit tests
/// of `call::image_hosts` with a resolver they control.
#[tokio::test]
async fn image_hosts_are_resolved_before_the_call_is_admitted() {
    let gw = TestGateway::start().await;
    let key = gw.create_key(json!({"request_quota": 5})).await;
    let error = expect_error(
        gw.chat(
            &key.secret,
            &image_body(&["https://images.invalid/bee.jpg"]),
        )
        .await,
        StatusCode::BAD_REQUEST,
    )
    .await;
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains("images.invalid") && message.contains("cannot be resolved"),
        "{error}"
    );
    let mut chat = gw.grpc_chat(&key.secret).await;
    let mut request = crate::common::chat_request("");
    request.messages[0].parts = vec![pb::ContentPart {
        part: Some(pb::content_part::Part::ImageUrl(pb::ImageUrl {
            url: "https://images.invalid/bee.jpg".into(),
            ..Default::default()
        })),
    }];
    let refused = chat.complete(request).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert_eq!(gw.sim.simulator.stats().chat_requests, 0);
    assert_eq!(gw.usage(&key.secret).await["requests"]["used"], 0);

    // Turned off, the name goes to the model server as it is.
    let unchecked = TestGateway::builder()
        .config(|c| c.image_policy.resolve_hosts = false)
        .start()
        .await;
    let key = unchecked.create_key(json!({})).await;
    let forwarded = unchecked
        .chat(
            &key.secret,
            &image_body(&["https://images.invalid/bee.jpg"]),
        )
        .await;
    assert_eq!(forwarded.status(), StatusCode::OK);
}

#[tokio::test]
async fn images_are_counted_sized_and_limited() {
    let gw = TestGateway::start().await;
    let key = gw.create_key(json!({"image_quota": 3})).await;
    let bee = bee_data_url();
    let response = gw
        .chat(
            &key.secret,
            &image_body(&[&bee, "https://93.184.216.34/b.jpg"]),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-quota-remaining-images"], "1");
    let calls = gw.wait_for_calls(&key.id, 1).await;
    assert_eq!(calls[0]["images"], 2);
    assert_eq!(calls[0]["image_sizes"], json!([{"width": 4, "height": 3}]));
    let usage = gw.usage(&key.secret).await;
    assert_eq!(
        usage["images"],
        json!({"used": 2, "limit": 3, "remaining": 1})
    );

    let error = expect_error(
        gw.chat(&key.secret, &image_body(&[&bee, &bee])).await,
        StatusCode::TOO_MANY_REQUESTS,
    )
    .await;
    assert_eq!(error["code"], "insufficient_quota");
    assert!(error["message"].as_str().unwrap().contains("images"));
    assert_eq!(
        gw.chat(&key.secret, &image_body(&[&bee])).await.status(),
        StatusCode::OK
    );

    // The report is read from the store: wait for the writer to have both calls.
    gw.wait_for_calls(&key.id, 2).await;
    let (_, report) = gw
        .admin(Method::GET, &format!("/keys/{}/usage", key.id), None)
        .await;
    assert_eq!(report["images"], 3);

    let capped = gw.create_key(json!({"max_images_per_request": 1})).await;
    let error = expect_error(
        gw.chat(&capped.secret, &image_body(&[&bee, &bee])).await,
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert!(
        error["message"].as_str().unwrap().contains("at most 1"),
        "{error}"
    );
    // Nothing was charged for the refused calls.
    assert_eq!(gw.usage(&capped.secret).await["requests"]["used"], 0);
}
