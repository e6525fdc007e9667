//! Admin REST input as people send it: JSON without a `Content-Type` (or with curl's form
//! label) is read as JSON, and a mistake in a body or a query string names its field in
//! the error's `param`, as the chat route does.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::common::{ADMIN_TOKEN, RestApi, TestGateway, expect_error};

/// `method /admin/v1<path>` with `body` sent as it is, labelled `content_type` if given.
async fn send(
    gw: &TestGateway,
    method: Method,
    path: &str,
    body: &str,
    content_type: Option<&str>,
) -> reqwest::Response {
    let mut request = gw
        .http
        .request(method, gw.url(&format!("/admin/v1{path}")))
        .bearer_auth(ADMIN_TOKEN)
        .body(body.to_owned());
    if let Some(content_type) = content_type {
        request = request.header("content-type", content_type);
    }
    request.send().await.unwrap()
}

#[tokio::test]
async fn admin_bodies_are_json_whatever_their_content_type() {
    let gw = TestGateway::start().await;
    for content_type in [
        None,
        Some("application/x-www-form-urlencoded"),
        Some("text/plain"),
    ] {
        let created = send(
            &gw,
            Method::POST,
            "/users",
            r#"{"name": "Partner Co", "rpm_limit": 60}"#,
            content_type,
        )
        .await;
        assert_eq!(created.status(), StatusCode::CREATED, "{content_type:?}");
        let user: Value = created.json().await.unwrap();
        assert_eq!(user["rpm_limit"], 60);

        let path = format!("/users/{}", user["id"].as_str().unwrap());
        let patched = send(&gw, Method::PATCH, &path, r#"{"name": "P"}"#, content_type).await;
        assert_eq!(patched.status(), StatusCode::OK, "{content_type:?}");
    }
}

#[tokio::test]
async fn admin_input_mistakes_name_their_field_in_param() {
    let gw = TestGateway::start().await;
    let key = gw.create_key(json!({})).await;
    let key_path = format!("/keys/{}", key.id);
    let rotate_path = format!("{key_path}/rotate");
    let usage_path = format!("{key_path}/usage?group_by=week");
    let user = json!({"name": "x", "user_id": key.user_id}).to_string();
    // (method, path, body, the `param` expected: `None` when no one field is at fault)
    let cases: Vec<(Method, &str, String, Option<&str>)> = vec![
        (
            Method::POST,
            "/keys",
            r#"{"name": "x"}"#.into(),
            Some("user_id"),
        ),
        (
            Method::POST,
            "/keys",
            r#"{"user_id": 5}"#.into(),
            Some("user_id"),
        ),
        (
            Method::POST,
            "/keys",
            user.replace("\"x\"", "7"),
            Some("name"),
        ),
        (
            Method::POST,
            "/users",
            r#"{"name": "a", "email": 7}"#.into(),
            Some("email"),
        ),
        (
            Method::POST,
            "/users",
            r#"{"name": "a", "rpm_limit": "x"}"#.into(),
            Some("rpm_limit"),
        ),
        (
            Method::POST,
            "/users",
            r#"{"name": "a", "rpm_limitt": 1}"#.into(),
            Some("rpm_limitt"),
        ),
        (
            Method::PATCH,
            &key_path,
            r#"{"models": "m"}"#.into(),
            Some("models"),
        ),
        (
            Method::PATCH,
            &key_path,
            r#"{"active": "yes"}"#.into(),
            Some("active"),
        ),
        (
            Method::PATCH,
            &key_path,
            r#"{"expires_at": "soon"}"#.into(),
            Some("expires_at"),
        ),
        (
            Method::POST,
            &rotate_path,
            r#"{"grace_seconds": "x"}"#.into(),
            Some("grace_seconds"),
        ),
        (Method::POST, "/users", r#"{"name": "a""#.into(), None),
        (Method::POST, "/users", "[1]".into(), None),
        (Method::GET, "/keys?limit=abc", String::new(), Some("limit")),
        (Method::GET, &usage_path, String::new(), Some("group_by")),
        (
            Method::GET,
            "/calls?status=abc",
            String::new(),
            Some("status"),
        ),
    ];
    for (method, path, body, param) in cases {
        let response = send(&gw, method.clone(), path, &body, None).await;
        let error = expect_error(response, StatusCode::BAD_REQUEST).await;
        assert_eq!(
            error["param"].as_str(),
            param,
            "{method} {path} {body} → {error}"
        );
        assert_eq!(error["type"], "invalid_request_error");
    }
    // A body over the limit is still a 413.
    let huge = format!(r#"{{"name": "{}"}}"#, "x".repeat(3 * 1024 * 1024));
    let response = send(&gw, Method::POST, "/users", &huge, None).await;
    expect_error(response, StatusCode::PAYLOAD_TOO_LARGE).await;
    // Nothing above was made.
    let (_, users) = gw.admin(Method::GET, "/users", None).await;
    assert_eq!(users["users"].as_array().unwrap().len(), 1, "{users}");
}
