//! Who may call from where: IP allowlists of keys, users and the admin API on both doors,
//! forwarding headers believed only from trusted proxies, and CORS for browsers.
//!
//! The test gateway listens on 127.0.0.1, so every call here comes from 127.0.0.1 unless
//! a trusted proxy says otherwise.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use step3_gateway::core::access::IpAllowlist;
use step3_gateway::grpc::pb;
use tonic::Code;

use crate::common::{RestApi, TestGateway, chat_body, chat_request, expect_error, expect_status};

fn allowlist(entries: &[&str]) -> IpAllowlist {
    IpAllowlist::parse(entries).unwrap()
}

/// `POST /v1/chat/completions` with extra headers.
async fn chat_with(gw: &TestGateway, secret: &str, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut request = gw
        .http()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(secret)
        .json(&chat_body("where am I"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().await.unwrap()
}

/// A gRPC `Complete` with extra metadata; the status code it ends with.
async fn grpc_complete(gw: &TestGateway, secret: &str, metadata: &[(&'static str, &str)]) -> Code {
    let mut chat = gw.grpc_chat(secret).await;
    let mut request = tonic::Request::new(chat_request("where am I"));
    for (name, value) in metadata {
        request.metadata_mut().insert(*name, value.parse().unwrap());
    }
    match chat.complete(request).await {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

async fn requests_used(gw: &TestGateway, key_id: &str) -> u64 {
    let (status, key) = gw
        .admin(Method::GET, &format!("/keys/{key_id}"), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{key}");
    key["requests_used"].as_u64().unwrap()
}

#[tokio::test]
async fn a_key_is_refused_outside_its_allowlist_on_both_doors_and_nothing_is_charged() {
    let gw = TestGateway::start().await;
    let fenced = gw
        .create_key(json!({"allowed_ips": ["10.0.0.0/8", "2001:db8::/32"]}))
        .await;
    let error = expect_error(
        chat_with(&gw, &fenced.secret, &[]).await,
        StatusCode::FORBIDDEN,
    )
    .await;
    assert_eq!(error["code"], "ip_not_allowed", "{error}");
    assert_eq!(error["type"], "permission_error", "{error}");
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains("key") && message.contains("127.0.0.1"),
        "the message says whose list and which address: {message}"
    );
    assert_eq!(
        grpc_complete(&gw, &fenced.secret, &[]).await,
        Code::PermissionDenied
    );
    let (status, _) = gw.get("/v1/usage", Some(&fenced.secret)).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(requests_used(&gw, &fenced.id).await, 0);
    assert!(
        gw.metrics()
            .await
            .lines()
            .any(|l| l.contains("reason=\"address\"") && !l.ends_with(" 0")),
        "refusals are counted by reason"
    );

    // The same key's list, widened to loopback by the admin API, lets it in.
    let (status, key) = gw
        .admin(
            Method::PATCH,
            &format!("/keys/{}", fenced.id),
            Some(json!({"allowed_ips": ["127.0.0.0/8"]})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{key}");
    assert_eq!(key["allowed_ips"], json!(["127.0.0.0/8"]));
    expect_status(chat_with(&gw, &fenced.secret, &[]).await, StatusCode::OK).await;
    assert_eq!(grpc_complete(&gw, &fenced.secret, &[]).await, Code::Ok);
    let calls = gw.wait_for_calls(&fenced.id, 2).await;
    assert!(
        calls.iter().all(|c| c["client_addr"] == "127.0.0.1"),
        "the call log keeps the caller's address: {calls:?}"
    );

    // A list that cannot be meant is refused, naming the field.
    let (status, error) = gw
        .admin(
            Method::PATCH,
            &format!("/keys/{}", fenced.id),
            Some(json!({"allowed_ips": ["10.0.0.0/33"]})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{error}");
    assert_eq!(error["error"]["param"], "allowed_ips", "{error}");
    let (status, error) = gw
        .admin(
            Method::PATCH,
            &format!("/keys/{}", fenced.id),
            Some(json!({"allowed_ips": []})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{error}");
}

#[tokio::test]
async fn a_users_allowlist_holds_for_all_its_keys_and_clearing_it_opens_them() {
    let gw = TestGateway::start().await;
    let user = gw
        .create_user(json!({"name": "branch office", "allowed_ips": ["192.0.2.0/24"]}))
        .await;
    let key = gw.create_key_for(&user, json!({})).await;
    let error = expect_error(
        chat_with(&gw, &key.secret, &[]).await,
        StatusCode::FORBIDDEN,
    )
    .await;
    assert!(
        error["message"].as_str().unwrap().contains("user's keys"),
        "{error}"
    );
    assert_eq!(
        grpc_complete(&gw, &key.secret, &[]).await,
        Code::PermissionDenied
    );

    // Cleared over gRPC: the Admin service speaks allowlists too.
    let mut admin = gw.grpc_admin().await;
    let updated = admin
        .update_user(pb::UpdateUserRequest {
            id: user.clone(),
            clear: vec!["allowed_ips".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(updated.allowed_ips.is_empty());
    expect_status(chat_with(&gw, &key.secret, &[]).await, StatusCode::OK).await;

    // Set again over gRPC, on a key this time; a bad entry is INVALID_ARGUMENT.
    let created = admin
        .create_key(pb::CreateKeyRequest {
            user_id: user.clone(),
            name: "fenced".into(),
            allowed_ips: vec!["198.51.100.7".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created.key.unwrap().allowed_ips, ["198.51.100.7/32"]);
    assert_eq!(
        grpc_complete(&gw, &created.secret, &[]).await,
        Code::PermissionDenied
    );
    let bad = admin
        .create_key(pb::CreateKeyRequest {
            user_id: user,
            allowed_ips: vec!["the office".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().contains("the office"), "{}", bad.message());
}

#[tokio::test]
async fn forwarding_headers_count_only_from_a_trusted_proxy() {
    // No trusted proxy: a client cannot talk its way in by naming an address.
    let gw = TestGateway::start().await;
    let key = gw
        .create_key(json!({"allowed_ips": ["203.0.113.0/24"]}))
        .await;
    let forged = [
        ("x-forwarded-for", "203.0.113.9"),
        ("x-real-ip", "203.0.113.9"),
    ];
    expect_error(
        chat_with(&gw, &key.secret, &forged).await,
        StatusCode::FORBIDDEN,
    )
    .await;
    assert_eq!(
        grpc_complete(&gw, &key.secret, &forged).await,
        Code::PermissionDenied
    );

    // The gateway behind a proxy on loopback: the proxy's word is taken, from the right.
    let gw = TestGateway::builder()
        .config(|c| c.server.trusted_proxies = allowlist(&["127.0.0.1"]))
        .start()
        .await;
    let key = gw
        .create_key(json!({"allowed_ips": ["203.0.113.0/24"]}))
        .await;
    let via_proxy = [("x-forwarded-for", "10.9.9.9, 203.0.113.9")];
    expect_status(
        chat_with(&gw, &key.secret, &via_proxy).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(grpc_complete(&gw, &key.secret, &via_proxy).await, Code::Ok);
    let real_ip = [("x-real-ip", "203.0.113.10")];
    expect_status(chat_with(&gw, &key.secret, &real_ip).await, StatusCode::OK).await;
    // The client's own entry further left is not reached.
    let spoofed = [("x-forwarded-for", "203.0.113.9, 198.51.100.1")];
    expect_error(
        chat_with(&gw, &key.secret, &spoofed).await,
        StatusCode::FORBIDDEN,
    )
    .await;
    let calls = gw.wait_for_calls(&key.id, 3).await;
    let mut addrs: Vec<&str> = calls
        .iter()
        .map(|c| c["client_addr"].as_str().unwrap())
        .collect();
    addrs.sort_unstable();
    assert_eq!(addrs, ["203.0.113.10", "203.0.113.9", "203.0.113.9"]);
}

#[tokio::test]
async fn the_admin_api_has_an_allowlist_of_its_own() {
    let gw = TestGateway::builder()
        .config(|c| c.admin.allowed_ips = allowlist(&["10.0.0.0/8"]))
        .start()
        .await;
    let (status, body) = gw.admin(Method::GET, "/users", None).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["error"]["code"], "ip_not_allowed", "{body}");
    let refused = gw
        .grpc_admin()
        .await
        .list_users(pb::ListUsersRequest {})
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    // Even a wrong token gets the same answer: from outside, no token can be tried.
    let response = gw
        .http()
        .get(gw.url("/admin/v1/users"))
        .bearer_auth("not-the-token")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn browsers_of_allowed_origins_may_call_the_api_and_never_the_admin_routes() {
    const APP: &str = "https://app.example.com";
    let gw = TestGateway::builder()
        .config(|c| c.server.cors_allowed_origins = vec![APP.into()])
        .start()
        .await;
    let preflight = |path: &str, origin: &str| {
        gw.http()
            .request(Method::OPTIONS, gw.url(path))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization, content-type",
            )
            .send()
    };
    let allow_origin = |r: &reqwest::Response| {
        r.headers()
            .get("access-control-allow-origin")
            .map(|v| v.to_str().unwrap().to_owned())
    };

    let answer = preflight("/v1/chat/completions", APP).await.unwrap();
    assert!(answer.status().is_success(), "{}", answer.status());
    assert_eq!(allow_origin(&answer).as_deref(), Some(APP));
    let headers = answer.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(headers.contains("authorization") && headers.contains("content-type"));
    assert!(
        !answer
            .headers()
            .contains_key("access-control-allow-credentials"),
        "credentials are never allowed"
    );

    let other = preflight("/v1/chat/completions", "https://evil.example")
        .await
        .unwrap();
    assert_eq!(allow_origin(&other), None);
    let admin = preflight("/admin/v1/users", APP).await.unwrap();
    assert_eq!(
        allow_origin(&admin),
        None,
        "the admin API never answers a browser"
    );

    // The call itself carries the header the browser needs to read it.
    let key = gw.create_key(json!({})).await;
    let answer = chat_with(&gw, &key.secret, &[("origin", APP)]).await;
    assert_eq!(allow_origin(&answer).as_deref(), Some(APP));
    let body: Value = answer.json().await.unwrap();
    assert!(body["choices"].is_array());

    // By default no origin is answered.
    let plain = TestGateway::start().await;
    let key = plain.create_key(json!({})).await;
    let answer = chat_with(&plain, &key.secret, &[("origin", APP)]).await;
    assert_eq!(allow_origin(&answer), None);
}
