//! Every `Admin` method through the generated tonic client.

use serde_json::json;
use step3_gateway::grpc::pb;
use tonic::Code;

use crate::common::{Bearer, RestApi, TestGateway, chat_body};

#[tokio::test]
async fn users_are_managed_over_grpc() {
    let gw = TestGateway::start().await;
    let mut admin = gw.grpc_admin().await;
    let user = admin
        .create_user(pb::CreateUserRequest {
            name: "Partner".into(),
            email: Some("p@example.com".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(user.active);
    let fetched = admin
        .get_user(pb::GetUserRequest {
            id: user.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fetched, user);
    let updated = admin
        .update_user(pb::UpdateUserRequest {
            id: user.id.clone(),
            name: Some("Partner Co".into()),
            clear: vec!["email".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (updated.name.as_str(), updated.email.as_deref()),
        ("Partner Co", None)
    );
    let list = admin
        .list_users(pb::ListUsersRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.users.len(), 1);
    let gone = admin
        .deactivate_user(pb::DeactivateUserRequest {
            id: user.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!gone.active);

    let missing = admin
        .get_user(pb::GetUserRequest {
            id: "usr_nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    let bad = admin
        .update_user(pb::UpdateUserRequest {
            id: user.id,
            clear: vec!["name".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    let empty = admin
        .create_user(pb::CreateUserRequest {
            name: " ".into(),
            email: None,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(empty.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn keys_are_created_listed_updated_rotated_and_revoked_over_grpc() {
    let gw = TestGateway::start().await;
    let mut admin = gw.grpc_admin().await;
    let user = admin
        .create_user(pb::CreateUserRequest {
            name: "dev".into(),
            email: None,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut ids = Vec::new();
    let mut first_secret = String::new();
    for i in 0..3 {
        let created = admin
            .create_key(pb::CreateKeyRequest {
                user_id: user.id.clone(),
                name: format!("key {i}"),
                rpm_limit: Some(10),
                token_quota: Some(5000),
                expires_in: Some("7d".into()),
                models: vec![crate::common::MODEL.into()],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(created.secret.starts_with("sk-step3-"));
        let key = created.key.unwrap();
        assert_eq!(key.models, vec![crate::common::MODEL.to_owned()]);
        assert!(key.expires_at.unwrap() > key.created_at);
        if i == 0 {
            first_secret = created.secret;
        }
        ids.push(key.id);
    }

    let page = admin
        .list_keys(pb::ListKeysRequest {
            user_id: Some(user.id.clone()),
            page_size: 2,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        page.keys.iter().map(|k| k.id.clone()).collect::<Vec<_>>(),
        ids[..2]
    );
    let rest = admin
        .list_keys(pb::ListKeysRequest {
            user_id: Some(user.id.clone()),
            page_size: 2,
            page_token: page.next_page_token,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.keys.len(), 1);
    assert_eq!(rest.next_page_token, "");

    let updated = admin
        .update_key(pb::UpdateKeyRequest {
            id: ids[0].clone(),
            request_quota: Some(7),
            clear: vec!["rpm_limit".into(), "models".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((updated.rpm_limit, updated.request_quota), (None, Some(7)));
    assert!(updated.models.is_empty());
    let shown = admin
        .get_key(pb::GetKeyRequest { id: ids[0].clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(shown, updated);

    assert_eq!(
        gw.chat(&first_secret, &chat_body("hi")).await.status(),
        reqwest::StatusCode::OK
    );
    let rotated = admin
        .rotate_key(pb::RotateKeyRequest {
            id: ids[0].clone(),
            grace_seconds: Some(0),
        })
        .await
        .unwrap()
        .into_inner();
    let rotated_key = rotated.key.unwrap();
    assert_eq!(rotated_key.requests_used, 1);
    assert_eq!(
        gw.chat(&first_secret, &chat_body("old")).await.status(),
        reqwest::StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        gw.chat(&rotated.secret, &chat_body("new")).await.status(),
        reqwest::StatusCode::OK
    );

    let revoked = admin
        .revoke_key(pb::RevokeKeyRequest { id: ids[0].clone() })
        .await
        .unwrap()
        .into_inner();
    assert!(revoked.revoked_at.is_some() && !revoked.active);
    assert_eq!(
        gw.chat(&rotated.secret, &chat_body("gone")).await.status(),
        reqwest::StatusCode::UNAUTHORIZED
    );
    let again = admin
        .rotate_key(pb::RotateKeyRequest {
            id: ids[0].clone(),
            grace_seconds: None,
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn usage_and_calls_are_reported_over_grpc() {
    let gw = TestGateway::start().await;
    let first = gw.create_key(json!({})).await;
    let second = gw.create_key_for(&first.user_id, json!({})).await;
    for key in [&first, &second, &second] {
        assert_eq!(
            gw.chat(&key.secret, &chat_body("count")).await.status(),
            reqwest::StatusCode::OK
        );
    }
    gw.wait_for_calls(&second.id, 2).await;
    gw.wait_for_calls(&first.id, 1).await;
    let mut admin = gw.grpc_admin().await;

    let report = admin
        .get_usage(pb::GetUsageReportRequest {
            subject: Some(pb::get_usage_report_request::Subject::UserId(
                first.user_id.clone(),
            )),
            group_by: pb::UsageGrouping::Day.into(),
            by_model: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(report.requests, 3);
    assert_eq!(report.buckets.len(), 1);
    assert_eq!(report.buckets[0].model, crate::common::MODEL);
    assert_eq!(report.buckets[0].start % 86_400, 0);
    let one = admin
        .get_usage(pb::GetUsageReportRequest {
            subject: Some(pb::get_usage_report_request::Subject::KeyId(
                second.id.clone(),
            )),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(one.requests, 2);
    assert_eq!(one.buckets[0].model, "");
    let none = admin
        .get_usage(pb::GetUsageReportRequest::default())
        .await
        .unwrap_err();
    assert_eq!(none.code(), Code::InvalidArgument);

    let page = admin
        .list_calls(pb::ListCallsRequest {
            user_id: Some(first.user_id.clone()),
            page_size: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.calls.len(), 2);
    assert!(page.calls[0].at_micros >= page.calls[1].at_micros);
    assert_eq!(page.calls[0].outcome, "completed");
    let next = admin
        .list_calls(pb::ListCallsRequest {
            user_id: Some(first.user_id.clone()),
            page_size: 2,
            page_token: page.next_page_token,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next.calls.len(), 1);
    let by_key = admin
        .list_calls(pb::ListCallsRequest {
            key_id: Some(first.id.clone()),
            status: Some(200),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_key.calls.len(), 1);
    assert_eq!(by_key.calls[0].key_id, first.id);
}

#[tokio::test]
async fn admin_methods_refuse_client_keys_and_missing_tokens() {
    let gw = TestGateway::start().await;
    let key = gw.create_key(json!({})).await;
    let channel = gw.channel().await;
    let mut as_client = pb::admin_client::AdminClient::with_interceptor(
        channel.clone(),
        Bearer(key.secret.clone()),
    );
    // Every method, with real ids, so that only the token stands in the way.
    let (user, key_id) = (key.user_id.clone(), key.id.clone());
    let codes = [
        as_client
            .create_user(pb::CreateUserRequest {
                name: "intruder".into(),
                ..Default::default()
            })
            .await
            .map(drop),
        as_client
            .get_user(pb::GetUserRequest { id: user.clone() })
            .await
            .map(drop),
        as_client
            .list_users(pb::ListUsersRequest {})
            .await
            .map(drop),
        as_client
            .update_user(pb::UpdateUserRequest {
                id: user.clone(),
                active: Some(true),
                ..Default::default()
            })
            .await
            .map(drop),
        as_client
            .deactivate_user(pb::DeactivateUserRequest { id: user.clone() })
            .await
            .map(drop),
        as_client
            .create_key(pb::CreateKeyRequest {
                user_id: user.clone(),
                ..Default::default()
            })
            .await
            .map(drop),
        as_client
            .get_key(pb::GetKeyRequest { id: key_id.clone() })
            .await
            .map(drop),
        as_client
            .list_keys(pb::ListKeysRequest::default())
            .await
            .map(drop),
        as_client
            .update_key(pb::UpdateKeyRequest {
                id: key_id.clone(),
                rpm_limit: Some(1),
                ..Default::default()
            })
            .await
            .map(drop),
        as_client
            .revoke_key(pb::RevokeKeyRequest { id: key_id.clone() })
            .await
            .map(drop),
        as_client
            .rotate_key(pb::RotateKeyRequest {
                id: key_id.clone(),
                grace_seconds: Some(0),
            })
            .await
            .map(drop),
        as_client
            .get_usage(pb::GetUsageReportRequest {
                subject: Some(pb::get_usage_report_request::Subject::KeyId(key_id.clone())),
                ..Default::default()
            })
            .await
            .map(drop),
        as_client
            .list_calls(pb::ListCallsRequest::default())
            .await
            .map(drop),
    ];
    assert_eq!(codes.len(), 13, "one call per Admin method");
    for (i, result) in codes.into_iter().enumerate() {
        let status = result.expect_err("a client key opened an admin method");
        assert_eq!(
            status.code(),
            Code::Unauthenticated,
            "method {i}: {status:?}"
        );
    }
    // Nothing changed: the key still works.
    assert_eq!(
        gw.chat(&key.secret, &chat_body("hi")).await.status(),
        reqwest::StatusCode::OK
    );
    let mut anonymous = pb::admin_client::AdminClient::new(channel);
    let status = anonymous
        .create_key(pb::CreateKeyRequest {
            user_id: key.user_id,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    // The admin token opens no chat either.
    let status = gw
        .grpc_chat(crate::common::ADMIN_TOKEN)
        .await
        .get_usage(pb::GetUsageRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
}

/// Runs `step3-gateway admin …` against the gateway and parses its JSON answer.
async fn cli(gw: &TestGateway, args: &[&str]) -> serde_json::Value {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_step3-gateway"));
    command
        .args([
            "admin",
            "--url",
            &gw.running().grpc_url(),
            "--token",
            crate::common::ADMIN_TOKEN,
        ])
        .args(args);
    let output = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{args:?}: {stderr}");
    serde_json::from_slice(&output.stdout).unwrap()
}

#[tokio::test]
async fn the_admin_cli_manages_a_live_gateway() {
    let gw = TestGateway::start().await;
    let user = cli(
        &gw,
        &[
            "users",
            "create",
            "--name",
            "ops",
            "--email",
            "ops@example.com",
        ],
    )
    .await;
    let user_id = user["id"].as_str().unwrap();
    let created = cli(
        &gw,
        &[
            "keys",
            "create",
            "--user",
            user_id,
            "--rpm",
            "5",
            "--request-quota",
            "10",
        ],
    )
    .await;
    let secret = created["secret"].as_str().unwrap().to_owned();
    let key_id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(
        gw.chat(&secret, &chat_body("via cli key")).await.status(),
        reqwest::StatusCode::OK
    );

    let rotated = cli(&gw, &["keys", "rotate", &key_id, "--grace-seconds", "0"]).await;
    let new_secret = rotated["secret"].as_str().unwrap();
    assert_eq!(
        gw.chat(&secret, &chat_body("old")).await.status(),
        reqwest::StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        gw.chat(new_secret, &chat_body("new")).await.status(),
        reqwest::StatusCode::OK
    );
    gw.wait_for_calls(&key_id, 2).await;

    let updated = cli(&gw, &["keys", "update", &key_id, "--clear", "rpm_limit"]).await;
    assert_eq!(updated["rpm_limit"], serde_json::Value::Null);
    let usage = cli(&gw, &["usage", "--key", &key_id, "--group-by", "day"]).await;
    assert_eq!(usage["requests"], 2);
    let calls = cli(&gw, &["calls", "--user", user_id]).await;
    assert_eq!(calls["calls"].as_array().unwrap().len(), 2);
    let keys = cli(&gw, &["keys", "list", "--user", user_id]).await;
    assert_eq!(keys["keys"][0]["requests_used"], 2);
}
