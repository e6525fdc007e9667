//! The admin API: token separation, users and keys, usage and calls.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::common::{ADMIN_TOKEN, RestApi, TestGateway, chat_body, expect_error};

/// Every admin route and method, with a body where it takes one.
fn admin_routes(user_id: &str, key_id: &str) -> Vec<(Method, String, Option<Value>)> {
    let user = format!("/users/{user_id}");
    let key = format!("/keys/{key_id}");
    let new_key = json!({"user_id": user_id});
    vec![
        (Method::GET, "/users".into(), None),
        (
            Method::POST,
            "/users".into(),
            Some(json!({"name": "intruder"})),
        ),
        (Method::GET, user.clone(), None),
        (Method::PATCH, user.clone(), Some(json!({"active": true}))),
        (Method::DELETE, user.clone(), None),
        (Method::GET, format!("{user}/usage"), None),
        (Method::GET, "/keys".into(), None),
        (Method::POST, "/keys".into(), Some(new_key)),
        (Method::GET, key.clone(), None),
        (Method::PATCH, key.clone(), Some(json!({"rpm_limit": 1}))),
        (Method::DELETE, key.clone(), None),
        (Method::POST, format!("{key}/rotate"), Some(json!({}))),
        (Method::GET, format!("{key}/usage"), None),
        (Method::GET, format!("{key}/calls"), None),
        (Method::GET, "/calls".into(), None),
        (Method::GET, "/audit".into(), None),
    ]
}

#[tokio::test]
async fn admin_routes_open_only_with_the_admin_token() {
    let gw = TestGateway::start().await;
    let key = gw.create_key(json!({})).await;
    for token in [
        None,
        Some(key.secret.as_str()),
        Some("wrong-admin-token-123"),
        Some(""),
    ] {
        for (method, path, body) in admin_routes(&key.user_id, &key.id) {
            let mut request = gw
                .http
                .request(method.clone(), gw.url(&format!("/admin/v1{path}")));
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            if let Some(body) = body {
                request = request.json(&body);
            }
            let error = expect_error(request.send().await.unwrap(), StatusCode::UNAUTHORIZED).await;
            assert_eq!(error["code"], "invalid_admin_token", "{method} {path}");
        }
    }
    // Nothing was changed: the key still works, with its limits, and nobody was added.
    assert_eq!(
        gw.chat(&key.secret, &chat_body("hi")).await.status(),
        StatusCode::OK
    );
    let (_, users) = gw.admin(Method::GET, "/users", None).await;
    assert_eq!(users["users"].as_array().unwrap().len(), 1, "{users}");
    // And the admin token is no client key.
    let error = expect_error(
        gw.chat(ADMIN_TOKEN, &chat_body("hi")).await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
    assert_eq!(error["code"], "invalid_api_key");
}

#[tokio::test]
async fn users_can_be_created_listed_updated_and_deactivated() {
    let gw = TestGateway::start().await;
    let (status, user) = gw
        .admin(
            Method::POST,
            "/users",
            Some(json!({"name": "Ada", "email": "ada@example.com"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let id = user["id"].as_str().unwrap();
    assert!(id.starts_with("usr_"));
    assert_eq!(user["active"], true);

    let (_, list) = gw.admin(Method::GET, "/users", None).await;
    assert_eq!(list["users"].as_array().unwrap().len(), 1);

    let (status, updated) = gw
        .admin(
            Method::PATCH,
            &format!("/users/{id}"),
            Some(json!({"name": "Ada L.", "email": null})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(updated["name"], "Ada L.");
    assert_eq!(updated["email"], Value::Null);

    let (_, gone) = gw
        .admin(Method::DELETE, &format!("/users/{id}"), None)
        .await;
    assert_eq!(gone["active"], false);
    let (status, body) = gw
        .admin(
            Method::POST,
            "/keys",
            Some(json!({"user_id": id, "name": "late"})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");

    let (status, body) = gw.admin(Method::GET, "/users/usr_missing", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"]["code"], "not_found");
    let (status, body) = gw
        .admin(
            Method::POST,
            "/users",
            Some(json!({"name": "x", "colour": "red"})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("colour"),
        "{body}"
    );
}

#[tokio::test]
async fn a_key_secret_is_shown_once_and_stored_only_as_a_hash() {
    let gw = TestGateway::start().await;
    let key = gw
        .create_key(json!({"rpm_limit": 5, "expires_in": "30d", "models": ["m"]}))
        .await;
    assert!(key.secret.starts_with("sk-step3-"));
    let (status, shown) = gw
        .admin(Method::GET, &format!("/keys/{}", key.id), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        shown.get("secret").is_none() && shown.get("hash").is_none(),
        "{shown}"
    );
    assert!(key.secret.starts_with(shown["prefix"].as_str().unwrap()));
    assert_eq!(shown["rpm_limit"], 5);
    let expires = shown["expires_at"].as_i64().unwrap();
    assert!((expires - shown["created_at"].as_i64().unwrap() - 30 * 86_400).abs() <= 1);

    let (_, listed) = gw.admin(Method::GET, "/keys", None).await;
    let dump = listed.to_string();
    assert!(!dump.contains(&key.secret));

    // Not on disk either.
    let mut gw = gw;
    gw.stop().await;
    let data = &gw.config.store.path;
    for entry in walk(data) {
        let bytes = std::fs::read(&entry).unwrap();
        assert!(
            !bytes
                .windows(key.secret.len())
                .any(|w| w == key.secret.as_bytes()),
            "secret found in {}",
            entry.display()
        );
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

#[tokio::test]
async fn key_changes_apply_to_the_next_call() {
    let gw = TestGateway::start().await;
    let key = gw.create_key(json!({"request_quota": 1})).await;
    assert_eq!(
        gw.chat(&key.secret, &chat_body("one")).await.status(),
        StatusCode::OK
    );
    assert_eq!(
        gw.chat(&key.secret, &chat_body("two")).await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );

    let (status, updated) = gw
        .admin(
            Method::PATCH,
            &format!("/keys/{}", key.id),
            Some(json!({"request_quota": null, "rpm_limit": 1})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{updated}");
    assert_eq!(updated["request_quota"], Value::Null);
    assert_eq!(updated["requests_used"], 1);
    assert_eq!(
        gw.chat(&key.secret, &chat_body("three")).await.status(),
        StatusCode::OK
    );
    assert_eq!(
        gw.chat(&key.secret, &chat_body("four")).await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );

    let (_, revoked) = gw
        .admin(Method::DELETE, &format!("/keys/{}", key.id), None)
        .await;
    assert!(revoked["revoked_at"].is_i64());
    assert_eq!(
        gw.chat(&key.secret, &chat_body("five")).await.status(),
        StatusCode::UNAUTHORIZED
    );
    let (status, _) = gw
        .admin(
            Method::PATCH,
            &format!("/keys/{}", key.id),
            Some(json!({"active": true})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn keys_are_listed_by_user_with_usage_and_calls() {
    let gw = TestGateway::start().await;
    let first = gw.create_key(json!({})).await;
    let second = gw.create_key_for(&first.user_id, json!({})).await;
    let other = gw.create_key(json!({})).await;
    for _ in 0..2 {
        assert_eq!(
            gw.chat(&first.secret, &chat_body("hello")).await.status(),
            StatusCode::OK
        );
    }
    let (_, mine) = gw
        .admin(
            Method::GET,
            &format!("/keys?user_id={}", first.user_id),
            None,
        )
        .await;
    let ids: Vec<&str> = mine["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![first.id.as_str(), second.id.as_str()]);
    assert!(!ids.contains(&other.id.as_str()));

    let calls = gw.wait_for_calls(&first.id, 2).await;
    assert_eq!(calls[0]["status"], 200);
    assert!(calls[0]["at_micros"].as_i64() >= calls[1]["at_micros"].as_i64());
    assert!(
        calls[0].get("request_body").is_none(),
        "bodies are off by default"
    );
    let (_, page) = gw
        .admin(
            Method::GET,
            &format!("/keys/{}/calls?limit=1", first.id),
            None,
        )
        .await;
    assert_eq!(page["calls"].as_array().unwrap().len(), 1);
    let token = page["next_page_token"].as_str().unwrap();
    assert!(!token.is_empty());
    let (_, page2) = gw
        .admin(
            Method::GET,
            &format!("/keys/{}/calls?limit=5&page_token={token}", first.id),
            None,
        )
        .await;
    assert_eq!(page2["calls"].as_array().unwrap().len(), 1);
    assert_ne!(
        page2["calls"][0]["request_id"],
        page["calls"][0]["request_id"]
    );
    assert_eq!(page2["next_page_token"], "");

    let (status, usage) = gw
        .admin(
            Method::GET,
            &format!("/keys/{}/usage?by_model=true", first.id),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{usage}");
    assert_eq!(usage["requests"], 2);
    let buckets = usage["buckets"].as_array().unwrap();
    assert_eq!(buckets.len(), 1);
    assert_eq!(buckets[0]["requests"], 2);
    assert_eq!(buckets[0]["model"], crate::common::MODEL);
    let (_, shown) = gw
        .admin(Method::GET, &format!("/keys/{}", first.id), None)
        .await;
    assert_eq!(usage["prompt_tokens"], shown["prompt_tokens_used"]);
    assert_eq!(usage["completion_tokens"], shown["completion_tokens_used"]);
}

#[tokio::test]
async fn usage_is_reported_per_user_by_day_and_calls_are_filtered() {
    let gw = TestGateway::start().await;
    let first = gw.create_key(json!({})).await;
    let second = gw.create_key_for(&first.user_id, json!({})).await;
    let stranger = gw.create_key(json!({})).await;
    for key in [&first, &second, &second, &stranger] {
        assert_eq!(
            gw.chat(&key.secret, &chat_body("count me")).await.status(),
            StatusCode::OK
        );
    }
    gw.wait_for_calls(&stranger.id, 1).await;
    gw.wait_for_calls(&second.id, 2).await;
    gw.wait_for_calls(&first.id, 1).await;

    let (status, report) = gw
        .admin(
            Method::GET,
            &format!("/users/{}/usage?group_by=day", first.user_id),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!(report["requests"], 3);
    let buckets = report["buckets"].as_array().unwrap();
    assert_eq!(buckets.len(), 1);
    assert_eq!(buckets[0]["start"].as_i64().unwrap() % 86_400, 0);
    assert_eq!(buckets[0]["model"], "");

    let (_, mine) = gw
        .admin(
            Method::GET,
            &format!("/calls?user_id={}", first.user_id),
            None,
        )
        .await;
    let calls = mine["calls"].as_array().unwrap();
    assert_eq!(calls.len(), 3);
    assert!(calls.iter().all(|c| c["user_id"] == first.user_id.as_str()));
    let (_, everyone) = gw
        .admin(Method::GET, "/calls?status=200&limit=10", None)
        .await;
    assert_eq!(everyone["calls"].as_array().unwrap().len(), 4);
    let (_, none) = gw.admin(Method::GET, "/calls?model=other", None).await;
    assert!(none["calls"].as_array().unwrap().is_empty());
    // Tokens no page gave out: not a token at all, one inside a call, one past the end.
    for token in ["garbage", "0.3", "0.ffffff", "ff.0"] {
        let (status, body) = gw
            .admin(Method::GET, &format!("/calls?page_token={token}"), None)
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{token}: {body}");
        assert_eq!(body["error"]["param"], "page_token", "{token}");
    }
}

#[tokio::test]
async fn a_rotated_key_has_a_new_secret_and_the_old_one_works_until_the_grace_ends() {
    let gw = TestGateway::start().await;
    let key = gw.create_key(json!({"request_quota": 10})).await;
    assert_eq!(
        gw.chat(&key.secret, &chat_body("before")).await.status(),
        StatusCode::OK
    );

    let (status, rotated) = gw
        .admin(
            Method::POST,
            &format!("/keys/{}/rotate", key.id),
            Some(json!({"grace_seconds": 3600})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{rotated}");
    let new_secret = rotated["secret"].as_str().unwrap().to_owned();
    assert_ne!(new_secret, key.secret);
    assert_eq!(rotated["id"], key.id.as_str());
    assert!(rotated["previous_secret_valid_until"].as_i64().unwrap() > 0);
    // Both secrets open the same key, with the same books.
    assert_eq!(
        gw.chat(&new_secret, &chat_body("new")).await.status(),
        StatusCode::OK
    );
    assert_eq!(
        gw.chat(&key.secret, &chat_body("old")).await.status(),
        StatusCode::OK
    );
    assert_eq!(gw.usage(&new_secret).await["requests"]["used"], 3);

    // A second rotation without grace: the first secret is gone, the second stops now.
    let (_, again) = gw
        .admin(
            Method::POST,
            &format!("/keys/{}/rotate", key.id),
            Some(json!({"grace_seconds": 0})),
        )
        .await;
    let newest = again["secret"].as_str().unwrap().to_owned();
    for old in [&key.secret, &new_secret] {
        let error = expect_error(
            gw.chat(old, &chat_body("no")).await,
            StatusCode::UNAUTHORIZED,
        )
        .await;
        assert_eq!(error["code"], "invalid_api_key");
    }
    assert_eq!(
        gw.chat(&newest, &chat_body("yes")).await.status(),
        StatusCode::OK
    );

    // After a restart the index is rebuilt the same way.
    let mut gw = gw;
    gw.restart().await;
    assert_eq!(
        gw.chat(&newest, &chat_body("still")).await.status(),
        StatusCode::OK
    );
    assert_eq!(
        gw.chat(&new_secret, &chat_body("no")).await.status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(gw.usage(&newest).await["requests"]["used"], 5);
}

#[tokio::test]
async fn bodies_are_logged_only_when_configured() {
    let gw = TestGateway::builder()
        .config(|c| c.store.log_bodies = true)
        .start()
        .await;
    let key = gw.create_key(json!({})).await;
    assert_eq!(
        gw.chat(&key.secret, &chat_body("log me")).await.status(),
        StatusCode::OK
    );
    let calls = gw.wait_for_calls(&key.id, 1).await;
    assert!(
        calls[0]["request_body"]
            .as_str()
            .unwrap()
            .contains("log me")
    );
    assert!(
        calls[0]["response_body"]
            .as_str()
            .unwrap()
            .contains("chat.completion")
    );
}
