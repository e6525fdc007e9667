//! Secrets stay secret: no client key, admin token or upstream key in an answer, an error
//! body, `/metrics`, the call log or the request sent upstream (logs: see `binary.rs`).

use futures_util::StreamExt;
use reqwest::{Method, StatusCode};
use serde_json::json;
use step3_gateway::grpc::pb;
use step3_gateway::sim::Fault;

use crate::common::{ADMIN_TOKEN, RestApi, TestGateway, chat_body, stream_body};

const UPSTREAM_KEY: &str = "upstream-secret-key-5a5a5a5a";
const WRONG_KEY: &str = "sk-step3-0123456789abcdef0123456789abcdef01234567";

#[tokio::test]
async fn no_secret_reaches_answers_metrics_the_call_log_or_the_upstream() {
    let gw = TestGateway::builder()
        .sim(|s| s.api_key = Some(UPSTREAM_KEY.into()))
        .config(|c| {
            c.upstream.api_key = Some(UPSTREAM_KEY.into());
            // Bodies in the call log too: the key is in no body.
            c.store.log_bodies = true;
        })
        .start()
        .await;
    let key = gw.create_key(json!({"request_quota": 100})).await;
    let mut seen = Vec::new();

    // Calls that succeed, stream, fail upstream, and are refused.
    let ok = gw.chat(&key.secret, &chat_body("hi")).await;
    seen.push(format!("{:?}", ok.headers()));
    seen.push(ok.text().await.unwrap());
    let mut stream = gw
        .chat(&key.secret, &stream_body("hi"))
        .await
        .bytes_stream();
    while let Some(chunk) = stream.next().await {
        seen.push(String::from_utf8_lossy(&chunk.unwrap()).into_owned());
    }
    gw.sim.simulator.push_fault(Fault::Status {
        status: 500,
        body: json!({"object": "error", "message": "engine died", "type": "InternalServerError", "code": 500}).to_string(),
    });
    gw.sim.simulator.push_fault(Fault::Status {
        status: 500,
        body: "plain failure".into(),
    });
    let failed = gw.chat(&key.secret, &chat_body("fail")).await;
    seen.push(failed.text().await.unwrap());
    for secret in [WRONG_KEY, ADMIN_TOKEN, UPSTREAM_KEY] {
        let refused = gw.chat(secret, &chat_body("hi")).await;
        assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
        seen.push(refused.text().await.unwrap());
    }
    for token in [key.secret.as_str(), WRONG_KEY, UPSTREAM_KEY] {
        let refused = gw
            .http
            .get(gw.url("/admin/v1/calls"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
        seen.push(refused.text().await.unwrap());
    }
    let status = gw
        .grpc_chat(WRONG_KEY)
        .await
        .get_usage(pb::GetUsageRequest {})
        .await
        .unwrap_err();
    seen.push(format!("{status:?}"));
    seen.push(gw.usage(&key.secret).await.to_string());

    // What an operator sees.
    let calls = gw.wait_for_calls(&key.id, 3).await;
    assert!(calls.len() >= 3);
    seen.push(json!(calls).to_string());
    for path in ["/calls?limit=1000", "/keys", &format!("/keys/{}", key.id)] {
        let (status, body) = gw.admin(Method::GET, path, None).await;
        assert_eq!(status, StatusCode::OK);
        seen.push(body.to_string());
    }
    let grpc_calls = gw
        .grpc_admin()
        .await
        .list_calls(pb::ListCallsRequest::default())
        .await
        .unwrap()
        .into_inner();
    seen.push(format!("{grpc_calls:?}"));
    let metrics = gw.metrics().await;
    assert!(metrics.contains("step3gw_requests_total"));
    seen.push(metrics);

    for text in &seen {
        for secret in [key.secret.as_str(), WRONG_KEY, ADMIN_TOKEN, UPSTREAM_KEY] {
            assert!(!text.contains(secret), "{secret} in: {text}");
        }
    }
    // The model server sees the gateway's key, never the client's.
    let requests = gw.sim.simulator.requests();
    assert!(!requests.is_empty());
    for request in requests {
        let authorization = request.headers["authorization"].to_str().unwrap();
        assert_eq!(authorization, format!("Bearer {UPSTREAM_KEY}"));
        assert!(
            request
                .headers
                .values()
                .all(|v| !String::from_utf8_lossy(v.as_bytes()).contains(&key.secret))
        );
    }
}
