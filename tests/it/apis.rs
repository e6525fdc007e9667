//! The OpenAI APIs beside chat that vLLM serves — text completions, embeddings and the
//! Responses API — through the gateway: the same keys, quotas and metering from the
//! model's own usage, streams where the API streams, and routing by model to the backend
//! that serves it.

use crate::common::{
    EMBED_MODEL, MODEL, RestApi, TestGateway, TestKey, expect_error, sse_payloads,
};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// A gateway whose pool has the embedding model's backend beside the chat model's.
async fn two_backends() -> TestGateway {
    TestGateway::builder().embedding_backend().start().await
}

async fn post(gw: &TestGateway, path: &str, key: &TestKey, body: &Value) -> reqwest::Response {
    gw.http
        .post(gw.url(path))
        .bearer_auth(&key.secret)
        .json(body)
        .send()
        .await
        .unwrap()
}

/// The tokens the key has been charged, from `/v1/usage`.
async fn charged(gw: &TestGateway, key: &TestKey) -> (u64, u64) {
    let usage = gw.usage(&key.secret).await;
    (
        usage["tokens"]["prompt"].as_u64().unwrap(),
        usage["tokens"]["completion"].as_u64().unwrap(),
    )
}

#[tokio::test]
async fn text_completions_are_charged_the_models_usage_json_and_streamed() {
    let gw = TestGateway::start().await;
    let key = gw.create_key(json!({"token_quota": 10_000})).await;
    let answer = post(
        &gw,
        "/v1/completions",
        &key,
        &json!({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 5}),
    )
    .await;
    assert_eq!(answer.status(), StatusCode::OK);
    let answer: Value = answer.json().await.unwrap();
    assert_eq!(answer["object"], "text_completion");
    assert!(answer["choices"][0]["text"].is_string(), "{answer}");
    let usage = &answer["usage"];
    let (prompt, completion) = charged(&gw, &key).await;
    assert_eq!(prompt, usage["prompt_tokens"].as_u64().unwrap());
    assert_eq!(completion, usage["completion_tokens"].as_u64().unwrap());
    assert_eq!(completion, 5);

    // A stream: the client did not ask for usage, so it sees none; it is charged anyway.
    let stream = post(
        &gw,
        "/v1/completions",
        &key,
        &json!({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 7, "stream": true}),
    )
    .await;
    assert_eq!(stream.status(), StatusCode::OK);
    let payloads = sse_payloads(&stream.text().await.unwrap());
    assert_eq!(payloads.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = payloads[..payloads.len() - 1]
        .iter()
        .map(|p| serde_json::from_str(p).unwrap())
        .collect();
    assert!(
        chunks
            .iter()
            .all(|c| c.get("usage").is_none_or(Value::is_null))
    );
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert!(!text.is_empty());
    let calls = gw.wait_for_calls(&key.id, 2).await;
    assert_eq!(calls[0]["usage"]["completion_tokens"], 7, "{}", calls[0]);
    assert_eq!(calls[0]["usage_estimated"], false);
    assert_eq!(charged(&gw, &key).await.1, 5 + 7);
    // The upstream was asked for the usage the client did not want.
    let sent = gw.sim.simulator.requests();
    let last = sent.last().unwrap();
    assert_eq!(last.path, "/v1/completions");
    assert_eq!(last.body["stream_options"]["include_usage"], true);
}

#[tokio::test]
async fn a_response_is_charged_its_input_and_output_tokens_json_and_streamed() {
    let gw = TestGateway::start().await;
    let key = gw.create_key(json!({})).await;
    let answer: Value = post(
        &gw,
        "/v1/responses",
        &key,
        &json!({"model": MODEL, "input": "What is 2+2?", "max_output_tokens": 12}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(answer["object"], "response", "{answer}");
    let usage = &answer["usage"];
    assert_eq!(
        charged(&gw, &key).await,
        (
            usage["input_tokens"].as_u64().unwrap(),
            usage["output_tokens"].as_u64().unwrap()
        )
    );

    let stream = post(
        &gw,
        "/v1/responses",
        &key,
        &json!({"model": MODEL, "input": "Tell me a story", "stream": true}),
    )
    .await;
    assert_eq!(stream.status(), StatusCode::OK);
    let text = stream.text().await.unwrap();
    // The Responses API's stream has no `[DONE]`: it ends with the completed response.
    let payloads = sse_payloads(&text);
    assert!(!payloads.iter().any(|p| p == "[DONE]"), "{text}");
    let last: Value = serde_json::from_str(payloads.last().unwrap()).unwrap();
    assert_eq!(last["type"], "response.completed");
    let streamed = last["response"]["usage"]["output_tokens"].as_u64().unwrap();
    let calls = gw.wait_for_calls(&key.id, 2).await;
    assert_eq!(calls[0]["usage"]["completion_tokens"], streamed);
    assert_eq!(calls[0]["outcome"], "completed");
}

#[tokio::test]
async fn a_token_quota_holds_a_response_to_what_is_left() {
    let gw = TestGateway::start().await;
    let key = gw.create_key(json!({"token_quota": 60})).await;
    let answer = post(
        &gw,
        "/v1/responses",
        &key,
        &json!({"model": MODEL, "input": "Hi", "max_output_tokens": 500}),
    )
    .await;
    assert_eq!(answer.status(), StatusCode::OK);
    let sent = gw.sim.simulator.requests();
    let cap = sent.last().unwrap().body["max_output_tokens"]
        .as_u64()
        .unwrap();
    assert!(cap < 60, "the model server was asked for {cap} tokens");
    let usage = gw.usage(&key.secret).await;
    assert!(usage["tokens"]["used"].as_u64().unwrap() <= 60, "{usage}");
}

#[tokio::test]
async fn embeddings_reach_the_backend_serving_them_on_both_doors_and_are_charged_their_input() {
    let gw = two_backends().await;
    let embed = gw.embed_sim.as_ref().unwrap();
    let key = gw.create_key(json!({"token_quota": 10_000})).await;
    let answer = post(
        &gw,
        "/v1/embeddings",
        &key,
        &json!({"model": EMBED_MODEL, "input": ["a bee", "a flower"]}),
    )
    .await;
    assert_eq!(answer.status(), StatusCode::OK);
    let answer: Value = answer.json().await.unwrap();
    assert_eq!(answer["data"].as_array().unwrap().len(), 2);
    assert_eq!(answer["data"][1]["embedding"].as_array().unwrap().len(), 8);
    let prompt = answer["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(charged(&gw, &key).await, (prompt, 0));
    assert_eq!(embed.simulator.stats().requests, 1);
    assert_eq!(
        gw.sim.simulator.stats().requests,
        0,
        "the chat backend got nothing"
    );

    let mut client = gw.grpc_chat(&key.secret).await;
    let answer = client
        .embed(step3_gateway::grpc::pb::EmbedRequest {
            model: EMBED_MODEL.into(),
            inputs: vec!["a bee".into()],
            dimensions: None,
        })
        .await
        .unwrap();
    assert!(answer.metadata().get("x-quota-remaining-tokens").is_some());
    let answer = answer.into_inner();
    assert_eq!(answer.data[0].values.len(), 8);
    let usage = answer.usage.unwrap();
    assert_eq!(usage.completion_tokens, 0);
    assert_eq!(charged(&gw, &key).await.0, prompt + usage.prompt_tokens);
    assert_eq!(embed.simulator.stats().requests, 2);

    // The chat model is no embedding model: the model server says so, and nothing is charged.
    let refused = post(
        &gw,
        "/v1/embeddings",
        &key,
        &json!({"model": MODEL, "input": "a bee"}),
    )
    .await;
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    assert_eq!(gw.usage(&key.secret).await["requests"]["used"], 2);
}

#[tokio::test]
async fn every_api_refuses_a_used_up_quota_and_a_malformed_body_the_same_way() {
    let gw = TestGateway::start().await;
    for (path, body) in [
        ("/v1/completions", json!({"model": MODEL, "prompt": "hi"})),
        ("/v1/responses", json!({"model": MODEL, "input": "hi"})),
    ] {
        let key = gw.create_key(json!({"request_quota": 1})).await;
        assert_eq!(post(&gw, path, &key, &body).await.status(), StatusCode::OK);
        let refused = post(&gw, path, &key, &body).await;
        assert_eq!(refused.headers()["x-should-retry"], "false", "{path}");
        let error = expect_error(refused, StatusCode::TOO_MANY_REQUESTS).await;
        assert_eq!(error["code"], "insufficient_quota", "{path}");

        let open = gw.create_key(json!({})).await;
        let error = expect_error(
            post(&gw, path, &open, &json!({"model": MODEL})).await,
            StatusCode::BAD_REQUEST,
        )
        .await;
        assert!(error["param"].is_string(), "{path}: {error}");
    }
}

#[tokio::test]
async fn a_route_the_gateway_does_not_serve_answers_an_openai_error_naming_it() {
    let gw = TestGateway::start().await;
    let key = gw.create_key(json!({})).await;
    let answer = post(&gw, "/v1/audio/transcriptions", &key, &json!({})).await;
    let error = expect_error(answer, StatusCode::NOT_FOUND).await;
    assert_eq!(error["code"], "unknown_url");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("/v1/audio/transcriptions")
    );
}
