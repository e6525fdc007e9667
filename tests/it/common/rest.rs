//! The REST calls tests make, written once for both kinds of gateway under test: the
//! in-process [`TestGateway`](super::TestGateway) and the real binary
//! ([`GatewayProcess`](super::binary::GatewayProcess)).

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use super::{ADMIN_TOKEN, TestKey};

/// A gateway reached over HTTP. Implementors give the client and the address; every call
/// a test makes (admin chains, chat, usage, health, metrics, the call log) comes with it.
pub trait RestApi {
    /// The client every call goes through.
    fn http(&self) -> &reqwest::Client;

    /// `path` on the gateway, as a full URL.
    fn url(&self, path: &str) -> String;

    /// `method path` under `/admin/v1` with the admin token: the status and the JSON body
    /// (`Null` when there is none).
    async fn admin(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut request = self
            .http()
            .request(method, self.url(&format!("/admin/v1{path}")))
            .bearer_auth(ADMIN_TOKEN);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// `GET path`, with `secret` as the bearer token if given: the status and the body,
    /// which must be JSON.
    async fn get(&self, path: &str, secret: Option<&str>) -> (StatusCode, Value) {
        let mut request = self.http().get(self.url(path));
        if let Some(secret) = secret {
            request = request.bearer_auth(secret);
        }
        let response = request.send().await.unwrap();
        (response.status(), response.json().await.unwrap())
    }

    /// A user made through the admin API from `body` (at least a `name`); its id.
    async fn create_user(&self, body: Value) -> String {
        let (status, user) = self.admin(Method::POST, "/users", Some(body)).await;
        assert_eq!(status, StatusCode::CREATED, "{user}");
        user["id"].as_str().unwrap().to_owned()
    }

    /// A new user with one key; `settings` are merged into the key's creation body.
    async fn create_key(&self, settings: Value) -> TestKey {
        let user_id = self.create_user(json!({"name": "tester"})).await;
        self.create_key_for(&user_id, settings).await
    }

    /// A key of `user_id`; `settings` are merged into the key's creation body.
    async fn create_key_for(&self, user_id: &str, settings: Value) -> TestKey {
        let mut body = json!({"user_id": user_id, "name": "test key"});
        if let (Some(body), Some(extra)) = (body.as_object_mut(), settings.as_object()) {
            body.extend(extra.clone());
        }
        let (status, key) = self.admin(Method::POST, "/keys", Some(body)).await;
        assert_eq!(status, StatusCode::CREATED, "{key}");
        TestKey {
            id: key["id"].as_str().unwrap().to_owned(),
            user_id: user_id.to_owned(),
            secret: key["secret"].as_str().unwrap().to_owned(),
        }
    }

    /// `POST /v1/chat/completions` with `body` as JSON.
    async fn chat(&self, secret: &str, body: &Value) -> reqwest::Response {
        self.http()
            .post(self.url("/v1/chat/completions"))
            .bearer_auth(secret)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// `POST /v1/chat/completions` with `body` sent as it is, labelled `application/json`.
    async fn chat_raw(&self, secret: &str, body: impl Into<reqwest::Body>) -> reqwest::Response {
        self.http()
            .post(self.url("/v1/chat/completions"))
            .bearer_auth(secret)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap()
    }

    /// `/v1/usage` of the key (asserted to answer 200).
    async fn usage(&self, secret: &str) -> Value {
        let (status, usage) = self.get("/v1/usage", Some(secret)).await;
        assert_eq!(status, StatusCode::OK, "{usage}");
        usage
    }

    /// The model ids `/v1/models` lists for the key (asserted to answer 200).
    async fn models(&self, secret: &str) -> Vec<String> {
        let (status, models) = self.get("/v1/models", Some(secret)).await;
        assert_eq!(status, StatusCode::OK, "{models}");
        models["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_owned())
            .collect()
    }

    /// `/health`'s body, whatever its status (a gateway that cannot serve answers 503).
    async fn health(&self) -> Value {
        self.get("/health", None).await.1
    }

    /// `/metrics`, as Prometheus text.
    async fn metrics(&self) -> String {
        let response = self.http().get(self.url("/metrics")).send().await.unwrap();
        response.text().await.unwrap()
    }

    /// The key's call log (its first 1,000 entries), newest first.
    async fn calls(&self, key_id: &str) -> Vec<Value> {
        let path = format!("/keys/{key_id}/calls?limit=1000");
        let (status, body) = self.admin(Method::GET, &path, None).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["calls"].as_array().unwrap().clone()
    }

    /// Waits (bounded) until the key's call log has `n` entries: settlement of abandoned
    /// streams and the background writer both run after the client has its answer.
    async fn wait_for_calls(&self, key_id: &str, n: usize) -> Vec<Value> {
        for _ in 0..200 {
            let calls = self.calls(key_id).await;
            if calls.len() >= n {
                return calls;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("the call log of {key_id} never reached {n} entries");
    }
}
