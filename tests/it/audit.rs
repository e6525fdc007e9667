//! The audit log: every admin change, by which door, before and after, read back over
//! REST, gRPC and the CLI.

use clap::Parser;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use step3_gateway::admin_client;
use step3_gateway::cli::{Cli, Command as CliCommand};
use step3_gateway::grpc::pb;

use crate::common::{ADMIN_TOKEN, RestApi, TestGateway};

#[tokio::test]
async fn admin_changes_of_every_door_are_in_the_audit_log_newest_first() {
    let gw = TestGateway::start().await;
    let key = gw.create_key(json!({"rpm_limit": 10})).await;
    let (status, _) = gw
        .admin(
            Method::PATCH,
            &format!("/keys/{}", key.id),
            Some(json!({"rpm_limit": 20})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    // A change through gRPC, then one through the CLI (which says it is the CLI).
    let mut grpc = gw.grpc_admin().await;
    grpc.rotate_key(pb::RotateKeyRequest {
        id: key.id.clone(),
        grace_seconds: Some(0),
    })
    .await
    .unwrap();
    let argv = [
        "step3-gateway",
        "admin",
        "--url",
        &gw.running().grpc_url(),
        "--token",
        ADMIN_TOKEN,
        "keys",
        "revoke",
        &key.id,
    ];
    let CliCommand::Admin(args) = Cli::try_parse_from(argv).unwrap().command else {
        panic!("not an admin command");
    };
    admin_client::run(*args, &mut Vec::new()).await.unwrap();

    let (status, page) = gw.admin(Method::GET, "/audit?limit=3", None).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let entries = page["entries"].as_array().unwrap();
    let seen: Vec<(&str, &str)> = entries
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap(),
                e["actor"]["door"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("key.revoke", "cli"),
            ("key.rotate", "grpc"),
            ("key.update", "rest")
        ]
    );
    assert_eq!(entries[2]["before"]["rpm_limit"], 10);
    assert_eq!(entries[2]["after"]["rpm_limit"], 20);
    assert_eq!(entries[0]["target"], key.id.as_str());
    assert_eq!(entries[0]["after"]["active"], false);
    // The rest of the log is on the next page: the key's and the user's creation.
    let token = page["next_page_token"].as_str().unwrap();
    let (_, rest) = gw
        .admin(Method::GET, &format!("/audit?page_token={token}"), None)
        .await;
    let actions: Vec<&str> = rest["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["key.create", "user.create"]);
    assert_eq!(rest["next_page_token"], "");
    // No secret is ever written down.
    let all = format!("{page}{rest}");
    assert!(!all.contains(&key.secret), "{all}");

    // The same log over gRPC, and from the CLI.
    let answer = grpc
        .list_audit(pb::ListAuditRequest {
            page_size: 1,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.entries.len(), 1);
    assert_eq!(answer.entries[0].action, "key.revoke");
    assert_eq!(answer.entries[0].door, "cli");
    let after: Value =
        serde_json::from_str(answer.entries[0].after_json.as_deref().unwrap()).unwrap();
    assert_eq!(after["active"], false);
    let argv = [
        "step3-gateway",
        "admin",
        "--url",
        &gw.running().grpc_url(),
        "--token",
        ADMIN_TOKEN,
        "audit",
        "--page-size",
        "2",
    ];
    let CliCommand::Admin(args) = Cli::try_parse_from(argv).unwrap().command else {
        panic!("not an admin command");
    };
    let mut out = Vec::new();
    admin_client::run(*args, &mut out).await.unwrap();
    let printed: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(printed["entries"].as_array().unwrap().len(), 2, "{printed}");
    assert_eq!(printed["entries"][1]["action"], "key.rotate");
}

#[tokio::test]
async fn the_audit_log_needs_the_admin_token() {
    let gw = TestGateway::start().await;
    let key = gw.create_key(json!({})).await;
    let response = gw
        .http
        .get(gw.url("/admin/v1/audit"))
        .bearer_auth(&key.secret)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn the_audit_log_is_in_backups_and_restored_with_them() {
    let gw = TestGateway::start().await;
    let key = gw.create_key(json!({})).await;
    let (status, _) = gw
        .admin(Method::DELETE, &format!("/keys/{}", key.id), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("backup.jsonl");
    step3_gateway::admin_client::backup(
        &gw.running().grpc_url(),
        ADMIN_TOKEN,
        &file,
        &mut |_, _| {},
    )
    .await
    .unwrap();
    let target = dir.path().join("restored");
    step3_gateway::app::restore(&file, &target, false, &mut |_| true).unwrap();
    let store = step3_gateway::store::SledStore::open(&target).unwrap();
    let actions: Vec<String> = step3_gateway::core::store::Store::audit(&store, None, 10)
        .unwrap()
        .into_iter()
        .map(|e| e.action)
        .collect();
    assert_eq!(actions, ["key.revoke", "key.create", "user.create"]);
}
