//! The response cache and in-flight deduplication (issue 20), through both doors: what is
//! kept, for whom, what a hit costs, and how identical calls in flight share one model call.

use std::time::Duration;

use futures_util::future::join_all;
use reqwest::StatusCode;
use serde_json::{Value, json};
use step3_gateway::config::CacheScopeConfig;
use step3_gateway::sim::Fault;

use crate::common::{
    RestApi, TestGateway, TestKey, chat_body, chat_request, run_python, sse_payloads,
};

/// A request that asks for the same answer every time.
fn fixed(text: &str) -> Value {
    let mut body = chat_body(text);
    body["temperature"] = json!(0);
    body
}

/// The `x-cache` header of a REST answer, when it has one.
fn x_cache(response: &reqwest::Response) -> Option<String> {
    response
        .headers()
        .get("x-cache")
        .map(|v| v.to_str().unwrap().to_owned())
}

/// Calls with `x-cache` set to `choice`; returns the `x-cache` answer header and body.
async fn call(
    gw: &TestGateway,
    key: &TestKey,
    body: &Value,
    choice: Option<&str>,
) -> (Option<String>, Value) {
    let mut request = gw
        .http
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(&key.secret)
        .json(body);
    if let Some(choice) = choice {
        request = request.header("x-cache", choice);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let header = x_cache(&response);
    (header, response.json().await.unwrap())
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no `{series}` in\n{text}"))
}

fn chat_requests(gw: &TestGateway) -> u64 {
    gw.sim.simulator.stats().chat_requests
}

#[tokio::test]
async fn a_deterministic_call_is_answered_by_the_model_once_then_from_the_cache() {
    let gw = TestGateway::start().await;
    let key = gw.create_key(json!({})).await;
    let (first, answer) = call(&gw, &key, &fixed("Describe the picture"), None).await;
    // Key order and number spelling do not make another request.
    let reordered: Value = serde_json::from_str(&format!(
        r#"{{"temperature":0.0,"messages":[{{"content":"Describe the picture","role":"user"}}],"model":"{}"}}"#,
        crate::common::MODEL
    ))
    .unwrap();
    let (second, again) = call(&gw, &key, &reordered, None).await;
    assert_eq!(
        (first.as_deref(), second.as_deref()),
        (Some("miss"), Some("hit"))
    );
    assert_eq!(answer, again);
    assert_eq!(chat_requests(&gw), 1);

    // The default policy: a hit is free, but on the books as a call, marked.
    let usage = gw.usage(&key.secret).await;
    assert_eq!(usage["requests"]["used"], 1);
    assert_eq!(usage["tokens"]["used"], answer["usage"]["total_tokens"]);
    let calls = gw.wait_for_calls(&key.id, 2).await;
    let hits: Vec<&Value> = calls.iter().filter(|c| c["cache_hit"] == true).collect();
    assert_eq!(hits.len(), 1, "{calls:?}");
    assert_eq!(hits[0]["usage"]["completion_tokens"], 0);
    let (status, report) = gw
        .admin(
            reqwest::Method::GET,
            &format!("/keys/{}/usage?from=0", key.id),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(report["cache_hits"], 1, "{report}");

    let metrics = gw.metrics().await;
    assert_eq!(metric(&metrics, "step3gw_cache_hits_total "), 1.0);
    assert_eq!(metric(&metrics, "step3gw_cache_misses_total "), 1.0);
    assert!(metric(&metrics, "step3gw_cache_bytes ") > 0.0);
}

#[tokio::test]
async fn sampled_calls_are_cached_only_when_asked_and_skip_bypasses_the_cache() {
    let gw = TestGateway::start().await;
    let key = gw.create_key(json!({})).await;
    let sampled = chat_body("Write a poem");
    for _ in 0..2 {
        assert_eq!(call(&gw, &key, &sampled, None).await.0, None);
    }
    assert_eq!(chat_requests(&gw), 2);
    assert_eq!(
        call(&gw, &key, &sampled, Some("use")).await.0.as_deref(),
        Some("miss")
    );
    assert_eq!(
        call(&gw, &key, &sampled, Some("use")).await.0.as_deref(),
        Some("hit")
    );
    assert_eq!(chat_requests(&gw), 3);
    // `skip`: neither looked up nor kept.
    let deterministic = fixed("Count to three");
    assert_eq!(call(&gw, &key, &deterministic, Some("skip")).await.0, None);
    assert_eq!(
        call(&gw, &key, &deterministic, None).await.0.as_deref(),
        Some("miss")
    );
    assert_eq!(chat_requests(&gw), 5);

    let response = gw
        .http
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(&key.secret)
        .header("x-cache", "maybe")
        .json(&deterministic)
        .send()
        .await
        .unwrap();
    let error = crate::common::expect_error(response, StatusCode::BAD_REQUEST).await;
    assert_eq!(error["param"], "x-cache");
}

#[tokio::test]
async fn a_key_whose_policy_forbids_the_cache_is_never_answered_from_it() {
    let gw = TestGateway::start().await;
    let key = gw.create_key(json!({"cache": false})).await;
    for _ in 0..2 {
        assert_eq!(call(&gw, &key, &fixed("Hello"), Some("use")).await.0, None);
    }
    assert_eq!(chat_requests(&gw), 2);
}

#[tokio::test]
async fn an_answer_kept_for_one_key_is_never_served_to_another() {
    let gw = TestGateway::start().await;
    let user = gw.create_user(json!({"name": "one user"})).await;
    let a = gw.create_key_for(&user, json!({})).await;
    let b = gw.create_key_for(&user, json!({})).await;
    let body = fixed("What is in the image?");
    assert_eq!(call(&gw, &a, &body, None).await.0.as_deref(), Some("miss"));
    assert_eq!(call(&gw, &b, &body, None).await.0.as_deref(), Some("miss"));
    assert_eq!(call(&gw, &a, &body, None).await.0.as_deref(), Some("hit"));
    assert_eq!(chat_requests(&gw), 2);
}

#[tokio::test]
async fn under_user_scope_the_keys_of_one_user_share_answers_and_no_one_else() {
    let gw = TestGateway::builder()
        .config(|c| c.cache.scope = CacheScopeConfig::User)
        .start()
        .await;
    let user = gw.create_user(json!({"name": "one user"})).await;
    let a = gw.create_key_for(&user, json!({})).await;
    let b = gw.create_key_for(&user, json!({})).await;
    let stranger = gw.create_key(json!({})).await;
    let body = fixed("What is in the image?");
    assert_eq!(call(&gw, &a, &body, None).await.0.as_deref(), Some("miss"));
    assert_eq!(call(&gw, &b, &body, None).await.0.as_deref(), Some("hit"));
    assert_eq!(
        call(&gw, &stranger, &body, None).await.0.as_deref(),
        Some("miss")
    );
    assert_eq!(chat_requests(&gw), 2);
}

/// The content of a streamed answer, and its last usage.
fn streamed(text: &str) -> (String, Option<Value>) {
    let payloads = sse_payloads(text);
    assert_eq!(
        payloads.last().map(String::as_str),
        Some("[DONE]"),
        "{text}"
    );
    let mut content = String::new();
    let mut usage = None;
    for payload in &payloads[..payloads.len() - 1] {
        let chunk: Value = serde_json::from_str(payload).unwrap();
        assert_eq!(chunk["object"], "chat.completion.chunk");
        for choice in chunk["choices"].as_array().unwrap() {
            if let Some(part) = choice["delta"]["content"].as_str() {
                content.push_str(part);
            }
        }
        if !chunk["usage"].is_null() {
            usage = Some(chunk["usage"].clone());
        }
    }
    (content, usage)
}

#[tokio::test]
async fn a_streaming_client_gets_a_kept_answer_as_a_well_formed_stream_with_its_usage() {
    let gw = TestGateway::start().await;
    let key = gw.create_key(json!({})).await;
    let (_, answer) = call(&gw, &key, &fixed("Describe the picture"), None).await;
    let mut body = fixed("Describe the picture");
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let response = gw.chat(&key.secret, &body).await;
    assert_eq!(x_cache(&response).as_deref(), Some("hit"));
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let (content, usage) = streamed(&response.text().await.unwrap());
    assert_eq!(
        content,
        answer["choices"][0]["message"]["content"].as_str().unwrap()
    );
    assert_eq!(usage.unwrap(), answer["usage"]);
    // Without `include_usage`, no usage chunk.
    body["stream_options"] = Value::Null;
    let (_, usage) = streamed(&gw.chat(&key.secret, &body).await.text().await.unwrap());
    assert_eq!(usage, None);
    assert_eq!(chat_requests(&gw), 1);
}

#[tokio::test]
async fn a_whole_streamed_answer_is_kept_and_serves_json_clients_too() {
    let gw = TestGateway::start().await;
    let key = gw.create_key(json!({})).await;
    let mut body = fixed("Tell me about bees");
    body["stream"] = json!(true);
    let response = gw.chat(&key.secret, &body).await;
    assert_eq!(x_cache(&response).as_deref(), Some("miss"));
    let (content, _) = streamed(&response.text().await.unwrap());
    let (hit, answer) = call(&gw, &key, &fixed("Tell me about bees"), None).await;
    assert_eq!(hit.as_deref(), Some("hit"));
    assert_eq!(answer["choices"][0]["message"]["content"], content);
    assert_eq!(answer["choices"][0]["finish_reason"], "stop");
    assert!(answer["usage"]["total_tokens"].as_u64().unwrap() > 0);
    assert_eq!(chat_requests(&gw), 1);
}

#[tokio::test]
async fn errors_and_cut_streams_are_never_kept() {
    let gw = TestGateway::start().await;
    let key = gw.create_key(json!({})).await;
    gw.sim.simulator.push_fault(Fault::Status {
        status: 500,
        body: json!({"error": {"message": "engine failed"}}).to_string(),
    });
    let response = gw.chat(&key.secret, &fixed("Hello")).await;
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(
        call(&gw, &key, &fixed("Hello"), None).await.0.as_deref(),
        Some("miss")
    );

    let mut body = fixed("A streamed story");
    body["stream"] = json!(true);
    for fault in [
        Fault::StreamCutAfter(3),
        Fault::StreamEndAfter(3),
        Fault::StreamErrorAfter(3),
    ] {
        gw.sim.simulator.push_fault(fault);
        let text = gw.chat(&key.secret, &body).await.text().await.unwrap();
        assert!(text.contains("error"), "{text}");
    }
    let response = gw.chat(&key.secret, &body).await;
    assert_eq!(x_cache(&response).as_deref(), Some("miss"));
    assert_eq!(chat_requests(&gw), 6);
}

#[tokio::test]
async fn the_hit_billing_policy_is_free_a_fraction_or_full_price() {
    for percent in [0u64, 50, 100] {
        let gw = TestGateway::builder()
            .config(move |c| c.cache.hit_charge_percent = u8::try_from(percent).unwrap())
            .start()
            .await;
        let key = gw.create_key(json!({"request_quota": 10})).await;
        let (_, answer) = call(&gw, &key, &fixed("Describe the picture"), None).await;
        let (hit, _) = call(&gw, &key, &fixed("Describe the picture"), None).await;
        assert_eq!(hit.as_deref(), Some("hit"));
        let prompt = answer["usage"]["prompt_tokens"].as_u64().unwrap();
        let completion = answer["usage"]["completion_tokens"].as_u64().unwrap();
        let share = |n: u64| (n * percent).div_ceil(100);
        let usage = gw.usage(&key.secret).await;
        assert_eq!(
            usage["requests"]["used"],
            1 + u64::from(percent > 0),
            "{percent}%"
        );
        assert_eq!(
            usage["tokens"]["prompt"],
            prompt + share(prompt),
            "{percent}%"
        );
        assert_eq!(
            usage["tokens"]["used"],
            prompt + completion + share(prompt) + share(completion),
            "{percent}%"
        );
        let calls = gw.wait_for_calls(&key.id, 2).await;
        let hit = calls.iter().find(|c| c["cache_hit"] == true).unwrap();
        assert_eq!(
            hit["usage"]["completion_tokens"],
            share(completion),
            "{percent}%"
        );
    }
}

#[tokio::test]
async fn the_grpc_door_hits_and_misses_and_says_which_in_its_metadata() {
    let gw = TestGateway::start().await;
    let key = gw.create_key(json!({})).await;
    let mut client = gw.grpc_chat(&key.secret).await;
    let mut request = chat_request("Describe the picture");
    request.temperature = Some(0.0);
    let first = client.complete(request.clone()).await.unwrap();
    let second = client.complete(request.clone()).await.unwrap();
    let cache =
        |m: &tonic::metadata::MetadataMap| m.get("x-cache").map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(cache(first.metadata()).as_deref(), Some("miss"));
    assert_eq!(cache(second.metadata()).as_deref(), Some("hit"));
    assert_eq!(first.into_inner(), second.into_inner());

    // A stream of the same request is answered from the cache too.
    let stream = client.stream_complete(request.clone()).await.unwrap();
    assert_eq!(cache(stream.metadata()).as_deref(), Some("hit"));
    let mut chunks = stream.into_inner();
    let mut got = 0;
    while let Some(chunk) = chunks.message().await.unwrap() {
        got += 1;
        let _ = chunk;
    }
    assert!(got > 0);
    assert_eq!(chat_requests(&gw), 1);

    // `skip` in the metadata.
    let mut skipping = tonic::Request::new(request);
    skipping
        .metadata_mut()
        .insert("x-cache", "skip".parse().unwrap());
    let skipped = client.complete(skipping).await.unwrap();
    assert_eq!(cache(skipped.metadata()), None);
    assert_eq!(chat_requests(&gw), 2);
}

#[tokio::test]
async fn a_streamed_hit_parses_with_the_official_openai_package() {
    let gw = TestGateway::start().await;
    let key = gw.create_key(json!({})).await;
    let env = vec![
        ("STEP3GW_BASE_URL", gw.url("/v1")),
        ("STEP3GW_API_KEY", key.secret),
        ("STEP3GW_MODEL", crate::common::MODEL.to_owned()),
    ];
    let (stdout, stderr) = run_python("tests/python/cache_stream.py", env).await;
    assert!(stdout.contains("cache stream: ok"), "{stdout}\n{stderr}");
    assert_eq!(chat_requests(&gw), 1);
}

#[tokio::test]
async fn fifty_identical_concurrent_calls_make_one_model_call() {
    let gw = TestGateway::builder()
        .sim(|s| s.token_latency = Duration::from_millis(20))
        .start()
        .await;
    let key = gw.create_key(json!({})).await;
    let body = fixed("One answer for everyone");
    let calls = (0..50).map(|_| call(&gw, &key, &body, None));
    let answers = join_all(calls).await;
    assert_eq!(chat_requests(&gw), 1);
    let misses = answers
        .iter()
        .filter(|(h, _)| h.as_deref() == Some("miss"))
        .count();
    assert_eq!(misses, 1);
    assert!(answers.iter().all(|(_, a)| *a == answers[0].1));
    // Each caller is admitted and on the books once: one model call, 49 hits.
    let calls = gw.wait_for_calls(&key.id, 50).await;
    assert_eq!(calls.iter().filter(|c| c["cache_hit"] == true).count(), 49);
    assert_eq!(gw.usage(&key.secret).await["requests"]["used"], 1);
}

/// Calls in flight on the backend, as `/metrics` shows them.
async fn backend_in_flight(gw: &TestGateway) -> f64 {
    let text = gw.metrics().await;
    text.lines()
        .find(|l| l.starts_with("step3gw_backend_in_flight{"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no backend in flight in\n{text}"))
}

#[tokio::test]
async fn a_caller_leaving_does_not_stop_the_others_and_the_last_one_stops_the_model() {
    let gw = TestGateway::builder()
        .sim(|s| s.token_latency = Duration::from_millis(50))
        .start()
        .await;
    let key = gw.create_key(json!({})).await;
    let body = fixed("A long answer");
    let leaver = tokio::spawn({
        let (http, url, secret, body) = (
            gw.http.clone(),
            gw.url("/v1/chat/completions"),
            key.secret.clone(),
            body.clone(),
        );
        async move { http.post(url).bearer_auth(secret).json(&body).send().await }
    });
    // Waits until the model call is under way, then joins it and hangs the first up.
    while backend_in_flight(&gw).await < 1.0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let stayer = call(&gw, &key, &body, None);
    let leave = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        leaver.abort();
    };
    let ((hit, answer), ()) = tokio::join!(stayer, leave);
    assert_eq!(hit.as_deref(), Some("hit"));
    assert!(answer["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    assert_eq!(chat_requests(&gw), 1);

    // Every caller of another call leaves: its model call is dropped.
    let body = fixed("Another long answer");
    let callers: Vec<_> = (0..3)
        .map(|_| {
            let (http, url, secret, body) = (
                gw.http.clone(),
                gw.url("/v1/chat/completions"),
                key.secret.clone(),
                body.clone(),
            );
            tokio::spawn(async move { http.post(url).bearer_auth(secret).json(&body).send().await })
        })
        .collect();
    while backend_in_flight(&gw).await < 1.0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for caller in &callers {
        caller.abort();
    }
    for _ in 0..200 {
        if backend_in_flight(&gw).await == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(backend_in_flight(&gw).await, 0.0);
    assert_eq!(chat_requests(&gw), 2);
    // Nothing was kept: the next caller makes the call again.
    assert_eq!(
        call(&gw, &key, &body, None).await.0.as_deref(),
        Some("miss")
    );
}

#[tokio::test]
async fn a_flood_of_distinct_answers_stays_within_the_cache_bound() {
    let gw = TestGateway::builder()
        .sim(|s| s.reply_tokens = 200)
        .config(|c| c.cache.max_mib = 1)
        .start()
        .await;
    let key = gw.create_key(json!({})).await;
    for batch in 0..40 {
        let bodies: Vec<Value> = (0..20)
            .map(|i| fixed(&format!("question {batch}-{i}")))
            .collect();
        join_all(bodies.iter().map(|body| call(&gw, &key, body, None))).await;
    }
    let metrics = gw.metrics().await;
    let bytes = metric(&metrics, "step3gw_cache_bytes ");
    assert!(bytes <= 1024.0 * 1024.0, "{bytes}");
    assert!(bytes > 512.0 * 1024.0, "{bytes}: the cache is used");
    assert!(metric(&metrics, "step3gw_cache_evictions_total ") > 0.0);
}
