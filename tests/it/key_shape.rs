//! One shape for a key: `GET /admin/v1/keys/{id}`, `step3-gateway admin keys get` and
//! grpcurl's `Admin/GetKey` show the same fields with the same values (grpcurl in the
//! proto3 JSON mapping: lowerCamelCase, 64-bit numbers as strings, unset fields left out).

use clap::Parser;
use reqwest::{Method, StatusCode};
use serde_json::{Map, Value, json};
use step3_gateway::admin_client;
use step3_gateway::cli::{Cli, Command as CliCommand};

use crate::common::{ADMIN_TOKEN, RestApi, TestGateway, chat_body, venv_program};

/// `step3-gateway admin <args>` against `gw`, run in-process: what it printed, as JSON.
async fn cli(gw: &TestGateway, args: &[&str]) -> Value {
    let url = gw.running().grpc_url();
    let argv = [
        "step3-gateway",
        "admin",
        "--url",
        &url,
        "--token",
        ADMIN_TOKEN,
    ]
    .into_iter()
    .chain(args.iter().copied());
    let CliCommand::Admin(admin) = Cli::try_parse_from(argv).unwrap().command else {
        panic!("not an admin command");
    };
    let mut out = Vec::new();
    admin_client::run(*admin, &mut out).await.unwrap();
    serde_json::from_slice(&out).unwrap()
}

/// `Admin/GetKey` through grpcurl (with `-emit-defaults`), as it prints it.
async fn grpcurl_key(gw: &TestGateway, id: &str) -> Map<String, Value> {
    let grpcurl = venv_program("grpcurl");
    let addr = gw.running().grpc_addr.to_string();
    let request = json!({"id": id}).to_string();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(grpcurl)
            .args(["-plaintext", "-emit-defaults", "-H"])
            .arg(format!("authorization: Bearer {ADMIN_TOKEN}"))
            .args(["-d", &request, &addr, "step3.gateway.v1.Admin/GetKey"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(output.status.success(), "{output:?}");
    serde_json::from_slice(&output.stdout).unwrap()
}

/// `requests_used` → `requestsUsed`: the proto3 JSON name of a field.
fn camel(name: &str) -> String {
    let mut out = String::new();
    let mut upper = false;
    for c in name.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.push(c.to_ascii_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

#[tokio::test]
async fn a_key_reads_the_same_over_rest_the_cli_and_grpcurl() {
    let gw = TestGateway::start().await;
    // Every kind of field set: limits, expiry, an allowlist, a rotation, some usage.
    let key = gw
        .create_key(json!({
            "rpm_limit": 60, "tpm_limit": 100000, "max_concurrent": 4, "request_quota": 1000,
            "token_quota": 5000000000u64, "image_quota": 50, "max_images_per_request": 2,
            "expires_in": "30d", "models": [crate::common::MODEL],
            "allowed_ips": ["127.0.0.0/8", "::1"], "cache": false,
        }))
        .await;
    let rotated = gw
        .admin(
            Method::POST,
            &format!("/keys/{}/rotate", key.id),
            Some(json!({"grace_seconds": 3600})),
        )
        .await;
    assert_eq!(rotated.0, StatusCode::OK, "{}", rotated.1);
    let secret = rotated.1["secret"].as_str().unwrap();
    assert_eq!(
        gw.chat(secret, &chat_body("hi")).await.status(),
        StatusCode::OK
    );
    gw.wait_for_calls(&key.id, 1).await;

    let (status, rest) = gw
        .admin(Method::GET, &format!("/keys/{}", key.id), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(rest["requests_used"], 1, "{rest}");
    assert!(
        rest["completion_tokens_used"].as_u64().unwrap() > 0,
        "{rest}"
    );
    assert!(rest.get("used").is_none(), "{rest}");

    // The CLI prints exactly what REST answers.
    assert_eq!(cli(&gw, &["keys", "get", &key.id]).await, rest);
    let listed = cli(&gw, &["keys", "list", "--user", &key.user_id]).await;
    assert_eq!(listed["keys"][0], rest);

    // grpcurl: the same fields and values, in the proto3 JSON mapping.
    let grpc = grpcurl_key(&gw, &key.id).await;
    let rest = rest.as_object().unwrap();
    // Unset `optional` fields (`revokedAt`, `budget`, `period`: null in REST) are left
    // out by grpcurl.
    let expected: Vec<String> = rest
        .iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, _)| camel(k))
        .collect();
    let mut shown: Vec<&String> = grpc.keys().collect();
    shown.sort();
    let mut expected_sorted: Vec<&String> = expected.iter().collect();
    expected_sorted.sort();
    assert_eq!(shown, expected_sorted, "{grpc:?}");
    for (name, value) in rest {
        let Some(grpc_value) = grpc.get(&camel(name)) else {
            assert_eq!(*value, Value::Null, "{name}");
            continue;
        };
        // 64-bit integers are strings in the proto3 JSON mapping.
        let grpc_value = match grpc_value {
            Value::String(text) if value.is_number() => text.parse::<Value>().unwrap(),
            other => other.clone(),
        };
        assert_eq!(grpc_value, *value, "{name}");
    }

    // A created key: REST and the CLI both answer with the key's fields and its secret.
    let (_, created) = gw
        .admin(
            Method::POST,
            "/keys",
            Some(json!({"user_id": key.user_id, "rpm_limit": 5})),
        )
        .await;
    let by_cli = cli(
        &gw,
        &["keys", "create", "--user", &key.user_id, "--rpm", "5"],
    )
    .await;
    let names = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(names(&by_cli), names(&created));
    assert!(by_cli["secret"].as_str().unwrap().starts_with("sk-step3-"));
}
