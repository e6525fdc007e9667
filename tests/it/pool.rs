//! Several model servers: routing, failover, retries, ejection, timeouts, aliases, reload,
//! metrics, and the binary's own signals and logs.

use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::join_all;
use reqwest::StatusCode;
use serde_json::{Value, json};
use step3_gateway::config::BackendConfig;
use step3_gateway::sim::{Fault, SimulatorConfig};

use crate::common::{
    ADMIN_TOKEN, MODEL, RestApi, TestGateway, chat_body, expect_error, spawn_sim, sse_payloads,
    stream_body,
};

fn backend(name: &str, url: String) -> BackendConfig {
    BackendConfig {
        name: Some(name.into()),
        url,
        api_key: None,
        models: vec![MODEL.into()],
        weight: 1,
    }
}

async fn served(gw: &TestGateway, secret: &str, n: usize) -> Vec<StatusCode> {
    join_all((0..n).map(|i| async move {
        gw.chat(secret, &chat_body(&format!("call {i}")))
            .await
            .status()
    }))
    .await
}

#[tokio::test]
async fn traffic_moves_off_a_backend_that_dies_and_nothing_is_lost() {
    let a = spawn_sim(SimulatorConfig::default()).await;
    let b = spawn_sim(SimulatorConfig::default()).await;
    let (a_url, b_url) = (a.url(), b.url());
    let gw = TestGateway::builder()
        .config(move |c| c.upstream.backends = vec![backend("a", a_url), backend("b", b_url)])
        .start()
        .await;
    let key = gw.create_key(json!({})).await;
    assert!(
        served(&gw, &key.secret, 10)
            .await
            .iter()
            .all(|s| *s == StatusCode::OK)
    );
    let (a_before, b_before) = (
        a.simulator.stats().chat_requests,
        b.simulator.stats().chat_requests,
    );
    assert!(
        a_before > 0 && b_before > 0,
        "both take traffic: {a_before} / {b_before}"
    );

    a.shutdown().await;
    let statuses = served(&gw, &key.secret, 20).await;
    assert!(
        statuses.iter().all(|s| *s == StatusCode::OK),
        "{statuses:?}"
    );
    assert_eq!(b.simulator.stats().chat_requests, b_before + 20);
    let usage = gw.usage(&key.secret).await;
    assert_eq!(usage["requests"]["used"], 30);
    assert_eq!(gw.wait_for_calls(&key.id, 30).await.len(), 30);
    // The dead backend is reported, and ejected after its failures.
    let health: Value = gw.health().await;
    assert_eq!(health["status"], "degraded", "{health}");
}

#[tokio::test]
async fn a_backend_answering_503_is_retried_elsewhere_and_ejected() {
    let a = spawn_sim(SimulatorConfig::default()).await;
    let b = spawn_sim(SimulatorConfig::default()).await;
    for _ in 0..50 {
        a.simulator.push_fault(Fault::Status {
            status: 503,
            body: "{\"error\":{\"message\":\"overloaded\"}}".into(),
        });
    }
    let (a_url, b_url) = (a.url(), b.url());
    let gw = TestGateway::builder()
        .config(move |c| {
            c.upstream.backends = vec![backend("a", a_url), backend("b", b_url)];
            c.upstream.eject_after_failures = 2;
            c.upstream.eject_secs = 60;
        })
        .start()
        .await;
    let key = gw.create_key(json!({})).await;
    for _ in 0..10 {
        assert_eq!(
            gw.chat(&key.secret, &chat_body("hi")).await.status(),
            StatusCode::OK
        );
    }
    // Two 503s eject `a`; after that it gets nothing.
    assert_eq!(a.simulator.stats().chat_requests, 2);
    assert_eq!(b.simulator.stats().chat_requests, 10);
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains("step3gw_backend_healthy{backend=\"a\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("step3gw_backend_errors_total{backend=\"a\",kind=\"any\"} 2"),
        "{metrics}"
    );
    assert_eq!(gw.usage(&key.secret).await["requests"]["used"], 10);
}

#[tokio::test]
async fn a_backend_that_is_never_healthy_gets_nothing() {
    let b = spawn_sim(SimulatorConfig::default()).await;
    let b_url = b.url();
    let gw = TestGateway::builder()
        .config(move |c| {
            c.upstream.backends = vec![
                backend("dead", "http://127.0.0.1:9".into()),
                backend("b", b_url),
            ]
        })
        .start()
        .await;
    let key = gw.create_key(json!({})).await;
    assert!(
        served(&gw, &key.secret, 8)
            .await
            .iter()
            .all(|s| *s == StatusCode::OK)
    );
    assert_eq!(b.simulator.stats().chat_requests, 8);
    let health: Value = gw.health().await;
    let dead = health["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == "dead")
        .unwrap()
        .clone();
    assert_eq!(dead["healthy"], false);
}

#[tokio::test]
async fn slow_backends_hit_each_timeout_and_are_settled() {
    let gw = TestGateway::builder()
        .sim(|s| {
            s.token_latency = Duration::from_millis(1500);
            s.reasoning_tokens = 0;
        })
        .config(|c| {
            c.upstream.first_byte_timeout_secs = 1;
            c.upstream.idle_timeout_secs = 1;
            c.upstream.max_retries = 0;
        })
        .start()
        .await;
    let key = gw.create_key(json!({})).await;
    // A JSON answer that takes longer than the first-byte limit.
    let error = expect_error(
        gw.chat(&key.secret, &chat_body("slow")).await,
        StatusCode::GATEWAY_TIMEOUT,
    )
    .await;
    assert_eq!(error["code"], "upstream_timeout");
    // A stream that goes silent for longer than the idle limit: well-formed end, 504 logged.
    let body = stream_body("stream");
    let text = gw.chat(&key.secret, &body).await.text().await.unwrap();
    let payloads = sse_payloads(&text);
    assert_eq!(payloads.last().unwrap(), "[DONE]");
    assert!(text.contains("upstream_timeout"), "{text}");
    let calls = gw.wait_for_calls(&key.id, 2).await;
    let statuses: Vec<u64> = calls
        .iter()
        .map(|c| c["status"].as_u64().unwrap())
        .collect();
    assert_eq!(statuses, vec![504, 504]);
    // Both reached the model, which worked until the limit: both are charged.
    assert_eq!(gw.usage(&key.secret).await["requests"]["used"], 2);
}

#[tokio::test]
async fn an_alias_is_resolved_to_the_served_name_and_listed() {
    let gw = TestGateway::builder()
        .config(|c| {
            c.upstream.aliases.insert("step3-vl".into(), MODEL.into());
        })
        .start()
        .await;
    let key = gw.create_key(json!({"models": ["step3-vl"]})).await;
    let body = json!({"model": "step3-vl", "messages": [{"role": "user", "content": "hi"}]});
    assert_eq!(gw.chat(&key.secret, &body).await.status(), StatusCode::OK);
    assert_eq!(gw.sim.simulator.requests()[0].body["model"], MODEL);
    assert_eq!(
        gw.models(&key.secret).await,
        vec!["step3-vl"],
        "the key sees only the name it may use"
    );
}

#[tokio::test]
async fn a_reload_moves_new_calls_and_lets_calls_in_flight_finish() {
    let b = spawn_sim(SimulatorConfig::default()).await;
    let gw = TestGateway::builder()
        .sim(|s| {
            s.token_latency = Duration::from_millis(50);
            s.reply_tokens = 10;
        })
        .start()
        .await;
    let key = gw.create_key(json!({})).await;
    let body = stream_body("long");
    let response = gw.chat(&key.secret, &body).await;
    let mut stream = response.bytes_stream();
    stream.next().await.unwrap().unwrap();

    let mut config = gw.config.clone();
    config.upstream.backends = vec![backend("b", b.url())];
    gw.running().reload_upstreams(&config).unwrap();
    assert_eq!(
        gw.chat(&key.secret, &chat_body("after")).await.status(),
        StatusCode::OK
    );
    assert_eq!(b.simulator.stats().chat_requests, 1);

    let rest = crate::common::read_rest(&mut stream).await;
    assert!(rest.ends_with("data: [DONE]\n\n"));
    assert_eq!(gw.sim.simulator.stats().streams_finished, 1);
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no `{series}` in\n{text}"))
}

#[tokio::test]
async fn metrics_count_a_known_sequence_of_calls() {
    let gw = TestGateway::start().await;
    let key = gw.create_key(json!({"rpm_limit": 2})).await;
    let mut tokens = 0;
    for _ in 0..2 {
        let answer: Value = gw
            .chat(&key.secret, &chat_body("count"))
            .await
            .json()
            .await
            .unwrap();
        tokens += answer["usage"]["completion_tokens"].as_u64().unwrap();
    }
    assert_eq!(
        gw.chat(&key.secret, &chat_body("too many")).await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        gw.chat("sk-step3-bad", &chat_body("who")).await.status(),
        StatusCode::UNAUTHORIZED
    );
    let text = gw.metrics().await;
    let ok = format!(
        "step3gw_requests_total{{door=\"rest\",route=\"/v1/chat/completions\",model=\"{MODEL}\",status=\"200\"}}"
    );
    assert_eq!(metric(&text, &ok), 2.0);
    assert_eq!(
        metric(&text, "step3gw_refusals_total{reason=\"rate\"}"),
        1.0
    );
    assert_eq!(
        metric(&text, "step3gw_refusals_total{reason=\"auth\"}"),
        1.0
    );
    let completion = format!("step3gw_tokens_total{{kind=\"completion\",model=\"{MODEL}\"}}");
    assert_eq!(metric(&text, &completion), tokens as f64);
    let calls =
        format!("step3gw_calls_total{{door=\"rest\",model=\"{MODEL}\",outcome=\"completed\"}}");
    assert_eq!(metric(&text, &calls), 2.0);
    assert_eq!(
        metric(
            &text,
            "step3gw_gateway_overhead_seconds_count{door=\"rest\",route=\"chat\"}"
        ),
        2.0
    );
    assert_eq!(metric(&text, "step3gw_in_flight{door=\"rest\"}"), 0.0);
    assert!(!text.contains(&key.secret) && !text.contains(ADMIN_TOKEN));
    // A client cannot invent label values.
    let made_up =
        json!({"model": "made-up-model-123", "messages": [{"role": "user", "content": "x"}]});
    gw.chat(&key.secret, &made_up).await;
    let text = gw.metrics().await;
    assert!(!text.contains("made-up-model-123"));
}
