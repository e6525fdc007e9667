//! The books: charged exactly once, under concurrency, on disconnect, across restarts.

use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::join_all;
use reqwest::StatusCode;
use serde_json::{Value, json};
use step3_gateway::sim::Fault;

use crate::common::{RestApi, TestGateway, chat_body, sse_payloads, stream_body};

#[tokio::test]
async fn concurrent_calls_on_one_key_never_pass_its_request_quota() {
    let gw = TestGateway::builder()
        .sim(|s| s.token_latency = Duration::from_millis(2))
        .start()
        .await;
    let key = gw.create_key(json!({"request_quota": 40})).await;
    let calls = (0..120).map(|i| {
        let gw = &gw;
        let secret = key.secret.clone();
        async move {
            let mut body = chat_body(&format!("call number {i}"));
            if i % 2 == 0 {
                body["stream"] = json!(true);
                body["stream_options"] = json!({"include_usage": true});
            }
            let response = gw.chat(&secret, &body).await;
            let status = response.status();
            let text = response.text().await.unwrap();
            let tokens = if status != StatusCode::OK {
                0
            } else if i % 2 == 0 {
                sse_payloads(&text)
                    .iter()
                    .filter_map(|p| serde_json::from_str::<Value>(p).ok())
                    .filter_map(|c| c["usage"]["total_tokens"].as_u64())
                    .next_back()
                    .unwrap()
            } else {
                serde_json::from_str::<Value>(&text).unwrap()["usage"]["total_tokens"]
                    .as_u64()
                    .unwrap()
            };
            (status, tokens)
        }
    });
    let results = join_all(calls).await;
    let served: Vec<u64> = results
        .iter()
        .filter(|(s, _)| *s == StatusCode::OK)
        .map(|(_, t)| *t)
        .collect();
    let refused = results
        .iter()
        .filter(|(s, _)| *s == StatusCode::TOO_MANY_REQUESTS)
        .count();
    let statuses: Vec<StatusCode> = results.iter().map(|(s, _)| *s).collect();
    assert_eq!(served.len(), 40, "{statuses:?}");
    assert_eq!(refused, 80);
    assert_eq!(gw.sim.simulator.stats().chat_requests, 40);

    let usage = gw.usage(&key.secret).await;
    assert_eq!(usage["requests"]["used"], 40);
    assert_eq!(usage["requests"]["remaining"], 0);
    assert_eq!(usage["tokens"]["used"], served.iter().sum::<u64>());
    assert_eq!(gw.wait_for_calls(&key.id, 40).await.len(), 40);
}

#[tokio::test]
async fn a_client_that_leaves_a_stream_stops_the_upstream_and_pays_for_what_was_generated() {
    let gw = TestGateway::builder()
        .sim(|s| {
            s.token_latency = Duration::from_millis(30);
            s.reply_tokens = 500;
            s.reasoning_tokens = 0;
        })
        .start()
        .await;
    let key = gw.create_key(json!({})).await;
    let body = stream_body("a long answer please");
    let response = gw.chat(&key.secret, &body).await;
    let mut stream = response.bytes_stream();
    let mut received = String::new();
    while received.matches("\"content\":\"").count() < 4 {
        received.push_str(std::str::from_utf8(&stream.next().await.unwrap().unwrap()).unwrap());
    }
    drop(stream);

    // The gateway drops the upstream request: the simulator sees its stream cancelled.
    crate::common::wait_for_cancelled_streams(&gw.sim.simulator, 1).await;
    let stats = gw.sim.simulator.stats();
    assert_eq!(stats.streams_cancelled, 1, "the upstream kept generating");
    assert!(stats.completion_tokens_sent < 500);

    let calls = gw.wait_for_calls(&key.id, 1).await;
    let call = &calls[0];
    assert_eq!(call["outcome"], "client_disconnected");
    assert_eq!(call["usage_estimated"], false);
    let charged = call["usage"]["completion_tokens"].as_u64().unwrap();
    // At least what the client saw, at most what the upstream produced.
    assert!(charged >= 3, "{call}");
    assert!(
        charged <= stats.completion_tokens_sent,
        "{call} vs {stats:?}"
    );
    let usage = gw.usage(&key.secret).await;
    assert_eq!(usage["requests"]["used"], 1);
    assert_eq!(usage["tokens"]["completion"], charged);
}

#[tokio::test]
async fn a_stream_the_upstream_breaks_off_ends_well_formed_and_is_charged_once() {
    let gw = TestGateway::builder()
        .sim(|s| {
            s.reply_tokens = 20;
            s.reasoning_tokens = 0;
        })
        .start()
        .await;
    let key = gw.create_key(json!({})).await;
    gw.sim.simulator.push_fault(Fault::StreamCutAfter(5));
    let body = stream_body("hi");
    let text = gw.chat(&key.secret, &body).await.text().await.unwrap();
    let payloads = sse_payloads(&text);
    assert_eq!(payloads.last().unwrap(), "[DONE]", "{text}");
    let error: Value = serde_json::from_str(&payloads[payloads.len() - 2]).unwrap();
    assert_eq!(error["error"]["code"], "stream_incomplete");

    let calls = gw.wait_for_calls(&key.id, 1).await;
    assert_eq!(calls[0]["outcome"], "stream_incomplete");
    assert_eq!(calls[0]["usage"]["completion_tokens"], 5);
    let usage = gw.usage(&key.secret).await;
    assert_eq!(usage["tokens"]["completion"], 5);
    assert_eq!(usage["requests"]["used"], 1);
}

#[tokio::test]
async fn a_stream_without_usage_is_charged_an_estimate_marked_as_such() {
    let gw = TestGateway::builder()
        .sim(|s| {
            s.reply_tokens = 7;
            s.reasoning_tokens = 0;
        })
        .start()
        .await;
    let key = gw.create_key(json!({})).await;
    gw.sim.simulator.push_fault(Fault::NoUsage);
    let body = stream_body("twelve chars");
    let text = gw.chat(&key.secret, &body).await.text().await.unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"));
    let calls = gw.wait_for_calls(&key.id, 1).await;
    assert_eq!(calls[0]["usage_estimated"], true);
    // One chunk per token, plus the role chunk and the finish chunk, which carry choices too.
    let completion = calls[0]["usage"]["completion_tokens"].as_u64().unwrap();
    assert!((7..=9).contains(&completion), "{}", calls[0]);
    assert!(calls[0]["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
}

#[tokio::test]
async fn usage_and_the_call_log_survive_a_restart() {
    let mut gw = TestGateway::start().await;
    let key = gw.create_key(json!({"request_quota": 10})).await;
    let mut total = 0;
    for _ in 0..3 {
        let body: Value = gw
            .chat(&key.secret, &chat_body("remember me"))
            .await
            .json()
            .await
            .unwrap();
        total += body["usage"]["total_tokens"].as_u64().unwrap();
    }
    let before = gw.usage(&key.secret).await;
    gw.restart().await;
    let after = gw.usage(&key.secret).await;
    assert_eq!(before, after);
    assert_eq!(after["requests"]["used"], 3);
    assert_eq!(after["tokens"]["used"], total);
    assert_eq!(gw.calls(&key.id).await.len(), 3);
    // The quota keeps counting from where it was.
    assert_eq!(
        gw.chat(&key.secret, &chat_body("again")).await.status(),
        StatusCode::OK
    );
    assert_eq!(gw.usage(&key.secret).await["requests"]["remaining"], 6);
}

#[tokio::test]
async fn a_graceful_stop_lets_a_stream_finish_and_keeps_its_usage() {
    let mut gw = TestGateway::builder()
        .sim(|s| {
            s.token_latency = Duration::from_millis(40);
            s.reply_tokens = 10;
            s.reasoning_tokens = 0;
        })
        .start()
        .await;
    let key = gw.create_key(json!({})).await;
    let body = stream_body("finish me");
    let response = gw.chat(&key.secret, &body).await;
    let mut stream = response.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    assert!(!first.is_empty());

    // Stop while the stream is in flight: it still runs to its end.
    let stopping = {
        let gateway = gw.take_running();
        tokio::spawn(gateway.shutdown())
    };
    let rest = crate::common::read_rest(&mut stream).await;
    assert!(rest.ends_with("data: [DONE]\n\n"), "{rest}");
    stopping.await.unwrap();

    gw.restart().await;
    let usage = gw.usage(&key.secret).await;
    assert_eq!(usage["requests"]["used"], 1);
    assert_eq!(usage["tokens"]["completion"], 10);
}

#[tokio::test]
async fn calls_older_than_the_retention_leave_the_log_and_the_books_stay() {
    use step3_gateway::core::records::{CallOutcome, CallRecord, Usage};
    let mut gw = TestGateway::builder()
        .config(|c| c.store.call_log_retention_days = 30)
        .start()
        .await;
    let key = gw.create_key(json!({})).await;
    let ok = gw.chat(&key.secret, &chat_body("recent")).await.status();
    assert_eq!(ok, StatusCode::OK);
    gw.stop().await;
    // Two calls from 100 days ago, as the gateway running then recorded them.
    {
        let store = crate::common::open_store(&gw.config);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        let old = i64::try_from(now.as_micros()).unwrap() - 100 * 86_400 * 1_000_000;
        let call = |n: i64| CallRecord {
            at_micros: old + n,
            request_id: format!("old-{n}"),
            key_id: key.id.clone(),
            user_id: key.user_id.clone(),
            model: "stepfun-ai/Step3-VL-10B".into(),
            version: None,
            cost: Default::default(),
            status: 200,
            outcome: CallOutcome::Completed,
            stream: false,
            latency_ms: 5,
            charged_request: true,
            usage: Usage {
                prompt_tokens: 7,
                completion_tokens: 3,
            },
            usage_estimated: false,
            images: 0,
            image_sizes: Vec::new(),
            request_body: None,
            response_body: None,
            client_addr: None,
            reservation: None,
            cache_hit: false,
        };
        store.record_calls(&[call(1), call(2)]).unwrap();
        store.flush().unwrap();
    }
    gw.restart().await;
    assert_eq!(gw.calls(&key.id).await.len(), 3);
    let ok = gw.chat(&key.secret, &chat_body("new")).await.status();
    assert_eq!(ok, StatusCode::OK);

    let mut left = Vec::new();
    for _ in 0..100 {
        left = gw.calls(&key.id).await;
        if left.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ids: Vec<&str> = left
        .iter()
        .filter_map(|c| c["request_id"].as_str())
        .collect();
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert!(ids.iter().all(|id| !id.starts_with("old-")), "{ids:?}");
    // The books keep what the pruned calls used.
    let usage = gw.usage(&key.secret).await;
    assert_eq!(usage["requests"]["used"], 4);
}
