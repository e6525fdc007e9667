//! Short-lived tokens made from a key: they call like the key (narrowed as asked), on both
//! doors, and end at their expiry or at once when the key is rotated or revoked.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use step3_gateway::grpc::pb;
use tonic::Code;

use crate::common::{
    EMBED_MODEL, MODEL, RestApi, TestGateway, chat_body, chat_request, expect_error,
};

async fn make_token(gw: &TestGateway, secret: &str, body: Value) -> (StatusCode, Value) {
    let response = gw
        .http()
        .post(gw.url("/v1/tokens"))
        .bearer_auth(secret)
        .json(&body)
        .send()
        .await
        .unwrap();
    (response.status(), response.json().await.unwrap())
}

async fn embed(gw: &TestGateway, bearer: &str) -> StatusCode {
    gw.http()
        .post(gw.url("/v1/embeddings"))
        .bearer_auth(bearer)
        .json(&json!({"model": EMBED_MODEL, "input": "hello"}))
        .send()
        .await
        .unwrap()
        .status()
}

#[tokio::test]
async fn a_token_calls_like_its_key_narrowed_as_asked_on_both_doors() {
    let gw = TestGateway::builder().embedding_backend().start().await;
    let key = gw.create_key(json!({"rpm_limit": 10})).await;
    assert_eq!(embed(&gw, &key.secret).await, StatusCode::OK);

    let (status, issued) = make_token(
        &gw,
        &key.secret,
        json!({"ttl_seconds": 300, "models": [MODEL], "rpm_limit": 3}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{issued}");
    assert_eq!(issued["key_id"], key.id.as_str());
    let token = issued["token"].as_str().unwrap().to_owned();
    assert!(
        !token.contains(&key.secret),
        "the key's secret is not in its token"
    );

    assert_eq!(
        gw.chat(&token, &chat_body("hi")).await.status(),
        StatusCode::OK
    );
    let mut chat = gw.grpc_chat(&token).await;
    chat.complete(chat_request("hi")).await.unwrap();
    // Narrowed to the chat model: the embedding model the key may use is not the token's.
    assert_eq!(embed(&gw, &token).await, StatusCode::NOT_FOUND);
    // Narrowed to 3 a minute, counted with the key's own calls (one embedding, two chats).
    let error = expect_error(
        gw.chat(&token, &chat_body("hi")).await,
        StatusCode::TOO_MANY_REQUESTS,
    )
    .await;
    assert_eq!(error["code"], "rate_limit_exceeded", "{error}");
    // The key itself keeps its own limit.
    assert_eq!(
        gw.chat(&key.secret, &chat_body("hi")).await.status(),
        StatusCode::OK
    );

    // The token's calls are the key's.
    let (_, shown) = gw
        .admin(Method::GET, &format!("/keys/{}", key.id), None)
        .await;
    assert_eq!(shown["requests_used"], 4, "{shown}");

    // A token does not make tokens.
    let (status, _) = make_token(&gw, &token, json!({})).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn rotating_or_revoking_the_key_ends_its_tokens_at_once() {
    let gw = TestGateway::start().await;
    let key = gw.create_key(json!({})).await;
    let (_, issued) = make_token(&gw, &key.secret, json!({})).await;
    let token = issued["token"].as_str().unwrap().to_owned();
    assert_eq!(
        gw.chat(&token, &chat_body("hi")).await.status(),
        StatusCode::OK
    );
    let (status, rotated) = gw
        .admin(
            Method::POST,
            &format!("/keys/{}/rotate", key.id),
            Some(json!({"grace_seconds": 3600})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let error = expect_error(
        gw.chat(&token, &chat_body("hi")).await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
    assert!(
        error["message"].as_str().unwrap().contains("rotated"),
        "{error}"
    );

    // A token of the new secret, over gRPC this time; then the key is revoked.
    let new_secret = rotated["secret"].as_str().unwrap();
    let mut chat = gw.grpc_chat(new_secret).await;
    let issued = chat
        .create_token(pb::CreateTokenRequest {
            ttl_seconds: Some(600),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(issued.key_id, key.id);
    assert_eq!(
        gw.chat(&issued.token, &chat_body("hi")).await.status(),
        StatusCode::OK
    );
    let (status, _) = gw
        .admin(Method::DELETE, &format!("/keys/{}", key.id), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let mut by_token = gw.grpc_chat(&issued.token).await;
    let refused = by_token.complete(chat_request("hi")).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn a_token_ends_at_its_expiry_and_cannot_be_wider_than_its_key() {
    let gw = TestGateway::start().await;
    let key = gw
        .create_key(json!({"rpm_limit": 5, "models": [MODEL]}))
        .await;
    for (body, param) in [
        (json!({"models": ["another-model"]}), "models"),
        (json!({"rpm_limit": 6}), "rpm_limit"),
        (json!({"ttl_seconds": 0}), "ttl_seconds"),
        (json!({"ttl_seconds": 86_401}), "ttl_seconds"),
        (json!({"ttl_seconds": "soon"}), "ttl_seconds"),
        (json!({"colour": "red"}), "colour"),
    ] {
        let (status, error) = make_token(&gw, &key.secret, body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {error}");
        let named = error["error"]["param"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
            + error["error"]["message"].as_str().unwrap_or_default();
        assert!(named.contains(param), "{body}: {error}");
    }

    let (_, issued) = make_token(&gw, &key.secret, json!({"ttl_seconds": 1})).await;
    let token = issued["token"].as_str().unwrap().to_owned();
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let error = expect_error(
        gw.chat(&token, &chat_body("hi")).await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
    assert!(
        error["message"].as_str().unwrap().contains("expired"),
        "{error}"
    );
    // A forged one (our kid, someone else's signature) is refused too.
    let mut parts: Vec<&str> = token.split('.').collect();
    parts[2] = "AAAA";
    let forged = parts.join(".");
    let error = expect_error(
        gw.chat(&forged, &chat_body("hi")).await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
    assert!(
        error["message"].as_str().unwrap().contains("token"),
        "{error}"
    );
}
