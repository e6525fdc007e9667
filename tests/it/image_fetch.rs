//! Fetch mode (`image_policy.fetch`): the gateway fetches image URLs itself and the model
//! server is sent the images inline. The image server runs inside the test on 127.0.0.1,
//! a private address: the policy lets private hosts through (`allow_private_hosts`) but
//! lists `127.0.0.1` as the only allowed host, so every hop is still held to a list.

use std::net::SocketAddr;

use axum::Router;
use axum::http::{HeaderMap, StatusCode as AxumStatus, header};
use axum::response::IntoResponse;
use axum::routing::get;
use base64::Engine;
use reqwest::StatusCode;
use serde_json::{Value, json};
use step3_gateway::grpc::pb;
use step3_gateway::sim::Fault;

use crate::common::{MODEL, RestApi, TestGateway, chat_request, expect_error};

const FIELD: &str = "messages[0].content[0].image_url.url";

fn bee() -> Vec<u8> {
    std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/python/bee.png"
    ))
    .unwrap()
}

fn bee_data_url() -> String {
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bee())
    )
}

/// A PNG signature and IHDR chunk declaring `width` × `height`, padded to `len` bytes.
fn png_header(width: u32, height: u32, len: usize) -> Vec<u8> {
    let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR".to_vec();
    png.extend(width.to_be_bytes());
    png.extend(height.to_be_bytes());
    png.extend([8, 6, 0, 0, 0, 0, 0, 0, 0]);
    png.resize(len.max(png.len()), 0);
    png
}

fn image(bytes: Vec<u8>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "image/png")], bytes)
}

fn redirect(to: String) -> impl IntoResponse {
    let mut headers = HeaderMap::new();
    headers.insert(header::LOCATION, to.parse().unwrap());
    (AxumStatus::FOUND, headers)
}

/// The image server: a bee, redirects (to itself, to a host not allowed, in a loop), an
/// image too large in bytes and one too large in pixels, and an HTML page.
async fn image_server() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let port = addr.port();
    let app = Router::new()
        .route("/bee.png", get(|| async { image(bee()) }))
        .route("/hop", get(|| async { redirect("/bee.png".into()) }))
        .route(
            "/away",
            get(move || async move { redirect(format!("http://localhost:{port}/bee.png")) }),
        )
        .route("/loop", get(|| async { redirect("/loop".into()) }))
        .route("/big.png", get(|| async { image(png_header(4, 3, 5000)) }))
        .route(
            "/huge.png",
            get(|| async { image(png_header(2000, 2000, 100)) }),
        )
        .route(
            "/page.html",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "image/png")],
                    "<!doctype html><html><body>not a bee</body></html>",
                )
            }),
        );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

async fn fetching_gateway() -> TestGateway {
    TestGateway::builder()
        .config(|c| {
            c.image_policy.fetch = true;
            c.image_policy.allow_private_hosts = true;
            c.image_policy.allowed_hosts = vec!["127.0.0.1".into()];
            c.image_policy.fetch_max_bytes = 1024;
            c.image_policy.fetch_max_pixels = 1_000_000;
        })
        .start()
        .await
}

fn image_body(url: &str) -> Value {
    json!({"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "text", "text": "What is in this picture?"},
    ]}]})
}

/// The image URLs of the chat requests the model server received.
fn upstream_image_urls(gw: &TestGateway) -> Vec<String> {
    gw.sim
        .simulator
        .requests()
        .iter()
        .filter(|r| r.path == "/v1/chat/completions")
        .map(|r| {
            r.body["messages"][0]["content"][0]["image_url"]["url"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect()
}

#[tokio::test]
async fn a_fetched_image_reaches_the_model_server_inline_and_is_sized_like_one() {
    let server = image_server().await;
    let gw = fetching_gateway().await;
    let key = gw.create_key(json!({})).await;

    // Through a redirect on the allowed host, without usage from the model server so the
    // estimate is what is charged.
    gw.sim.simulator.push_fault(Fault::NoUsage);
    let url = format!("http://{server}/hop");
    let response = gw.chat(&key.secret, &image_body(&url)).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(upstream_image_urls(&gw), [bee_data_url()]);
    let raw = &gw.sim.simulator.requests()[0].raw_body;
    assert!(
        !String::from_utf8_lossy(raw).contains(&server.to_string()),
        "the model server saw the URL"
    );
    let calls = gw.wait_for_calls(&key.id, 1).await;
    assert_eq!(calls[0]["images"], 1);
    assert_eq!(calls[0]["image_sizes"], json!([{"width": 4, "height": 3}]));
    assert_eq!(calls[0]["usage_estimated"], true);
    let fetched_estimate = calls[0]["usage"]["prompt_tokens"].clone();

    // The same image sent inline is estimated the same.
    gw.sim.simulator.push_fault(Fault::NoUsage);
    let response = gw.chat(&key.secret, &image_body(&bee_data_url())).await;
    assert_eq!(response.status(), StatusCode::OK);
    let calls = gw.wait_for_calls(&key.id, 2).await;
    for call in &calls {
        assert_eq!(call["usage_estimated"], true);
        assert_eq!(call["usage"]["prompt_tokens"], fetched_estimate, "{call}");
    }

    // gRPC: the same path.
    let mut chat = gw.grpc_chat(&key.secret).await;
    let reply = chat
        .complete(grpc_image_request(&format!("http://{server}/bee.png")))
        .await;
    assert!(reply.is_ok(), "{reply:?}");
    assert_eq!(upstream_image_urls(&gw).last().unwrap(), &bee_data_url());
}

fn grpc_image_request(url: &str) -> pb::ChatRequest {
    let mut request = chat_request("");
    request.messages[0].parts = vec![pb::ContentPart {
        part: Some(pb::content_part::Part::ImageUrl(pb::ImageUrl {
            url: url.into(),
            ..Default::default()
        })),
    }];
    request
}

#[tokio::test]
async fn images_the_policy_or_the_caps_refuse_cost_nothing_on_either_door() {
    let server = image_server().await;
    let gw = fetching_gateway().await;
    let key = gw.create_key(json!({"request_quota": 10})).await;

    let cases = [
        ("/away", "localhost"),
        ("/loop", "redirects more than 3 times"),
        ("/big.png", "larger than 1024 bytes"),
        ("/huge.png", "2000×2000 pixels"),
        ("/page.html", "not an image"),
        ("/missing.png", "404"),
    ];
    for (path, says) in cases {
        let error = expect_error(
            gw.chat(&key.secret, &image_body(&format!("http://{server}{path}")))
                .await,
            StatusCode::BAD_REQUEST,
        )
        .await;
        assert_eq!(error["param"], FIELD, "{path}: {error}");
        let message = error["message"].as_str().unwrap();
        assert!(message.contains(says), "{path}: {message}");
    }
    // A host not in the list is refused before anything is fetched.
    let error = expect_error(
        gw.chat(
            &key.secret,
            &image_body(&format!("http://localhost:{}/bee.png", server.port())),
        )
        .await,
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert_eq!(error["param"], FIELD, "{error}");

    let mut chat = gw.grpc_chat(&key.secret).await;
    for path in ["/page.html", "/away", "/huge.png"] {
        let refused = chat
            .complete(grpc_image_request(&format!("http://{server}{path}")))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{path}");
        assert!(
            refused.message().contains("could not use the image"),
            "{path}: {refused:?}"
        );
    }

    assert_eq!(gw.sim.simulator.stats().chat_requests, 0);
    let usage = gw.usage(&key.secret).await;
    assert_eq!(usage["requests"]["used"], 0, "{usage}");
}

#[tokio::test]
async fn fetch_mode_caps_the_image_urls_of_one_request() {
    let server = image_server().await;
    let gw = TestGateway::builder()
        .config(|c| {
            c.image_policy.fetch = true;
            c.image_policy.allow_private_hosts = true;
            c.image_policy.fetch_max_images = 2;
        })
        .start()
        .await;
    let key = gw.create_key(json!({})).await;
    let url = format!("http://{server}/bee.png");
    let mut body = image_body(&url);
    let part = json!({"type": "image_url", "image_url": {"url": url}});
    body["messages"][0]["content"] = json!([part, part, part]);
    let error = expect_error(gw.chat(&key.secret, &body).await, StatusCode::BAD_REQUEST).await;
    assert_eq!(error["param"], "messages[0].content[2].image_url.url");
    body["messages"][0]["content"] = json!([part, part]);
    assert_eq!(gw.chat(&key.secret, &body).await.status(), StatusCode::OK);
    let sent = &gw.sim.simulator.requests()[0].body["messages"][0]["content"];
    assert_eq!(sent[0]["image_url"]["url"], bee_data_url());
    assert_eq!(sent[1]["image_url"]["url"], bee_data_url());
}

#[tokio::test]
async fn streams_and_the_responses_api_are_sent_the_image_inline_too() {
    let server = image_server().await;
    let gw = fetching_gateway().await;
    let key = gw.create_key(json!({})).await;
    let url = format!("http://{server}/bee.png");

    let mut body = image_body(&url);
    body["stream"] = json!(true);
    let text = gw.chat(&key.secret, &body).await.text().await.unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert_eq!(upstream_image_urls(&gw), [bee_data_url()]);

    let response = gw
        .http
        .post(gw.url("/v1/responses"))
        .bearer_auth(&key.secret)
        .json(&json!({"model": MODEL, "max_output_tokens": 5, "input": [
            {"type": "function_call_output", "call_id": "c", "output": "x"},
            {"role": "user", "content": [
                {"type": "input_text", "text": "What is it?"},
                {"type": "input_image", "image_url": url},
            ]},
        ]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let sent = gw.sim.simulator.requests();
    let last = sent.last().unwrap();
    assert_eq!(last.path, "/v1/responses");
    assert_eq!(
        last.body["input"][1]["content"][1]["image_url"],
        bee_data_url()
    );
    let calls = gw.wait_for_calls(&key.id, 2).await;
    for call in &calls {
        assert_eq!(
            call["image_sizes"],
            json!([{"width": 4, "height": 3}]),
            "{call}"
        );
    }
}
