//! Bad and hostile clients: slow heads and bodies, idle connections, a reader that barely
//! reads, absurd JSON and headers. Each is cut or refused within a bound, and another,
//! normal client is served meanwhile.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::{
    MODEL, RestApi, TestGateway, TestKey, chat_body, chat_request, expect_error, expect_status,
    stream_body,
};

/// A bound for things that should take about a second: generous, since this machine is
/// shared; the tests check that a connection is closed, not how fast.
const CLOSE_BOUND: Duration = Duration::from_secs(30);

/// A gateway whose connection timeouts are one second each.
async fn impatient_gateway() -> TestGateway {
    TestGateway::builder()
        .config(|c| {
            c.server.header_read_timeout_secs = 1;
            c.server.body_read_timeout_secs = 1;
            c.server.idle_timeout_secs = 1;
        })
        .start()
        .await
}

/// Reads until the peer closes; `None` if it is still open after `bound`.
async fn read_until_closed(
    socket: &mut (impl AsyncReadExt + Unpin),
    bound: Duration,
) -> Option<Vec<u8>> {
    let mut received = Vec::new();
    let read = tokio::time::timeout(bound, async {
        let mut buf = [0u8; 4096];
        loop {
            match socket.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    read.ok().map(|()| received)
}

/// The gateway through a client that opens a connection per request. (Not one from the
/// shared pool: a pooled connection idle for a second is being closed by these impatient
/// gateways.)
struct Unpooled<'a> {
    gw: &'a TestGateway,
    http: reqwest::Client,
}

fn unpooled(gw: &TestGateway) -> Unpooled<'_> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    Unpooled { gw, http }
}

impl RestApi for Unpooled<'_> {
    fn http(&self) -> &reqwest::Client {
        &self.http
    }

    fn url(&self, path: &str) -> String {
        self.gw.url(path)
    }
}

/// A normal call on a connection of its own succeeds.
async fn assert_served(gw: &TestGateway, key: &TestKey) {
    let response = unpooled(gw)
        .chat(&key.secret, &chat_body("meanwhile"))
        .await;
    expect_status(response, StatusCode::OK).await;
}

#[tokio::test]
async fn a_slowloris_head_is_cut_and_others_are_served_meanwhile() {
    let gw = impatient_gateway().await;
    let key = gw.create_key(json!({})).await;
    let socket = TcpStream::connect(gw.running().addr).await.unwrap();
    let (mut reader, mut writer) = socket.into_split();
    writer
        .write_all(b"GET /health HTTP/1.1\r\nhost: x\r\nx-slow: ")
        .await
        .unwrap();
    // One header byte every 100 ms, never the end of the head.
    let trickle = tokio::spawn(async move {
        for _ in 0..600 {
            if writer.write_all(b"a").await.is_err() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    });
    assert_served(&gw, &key).await;
    let received = read_until_closed(&mut reader, CLOSE_BOUND)
        .await
        .expect("a head trickled for 30 s was not cut");
    // No request was read: nothing was answered.
    assert!(
        !String::from_utf8_lossy(&received).contains(" 200 "),
        "{}",
        String::from_utf8_lossy(&received)
    );
    trickle.abort();
    assert_served(&gw, &key).await;
}

#[tokio::test]
async fn a_trickled_body_gets_408_and_its_connection_is_closed() {
    let gw = impatient_gateway().await;
    let key = gw.create_key(json!({})).await;
    let socket = TcpStream::connect(gw.running().addr).await.unwrap();
    let (mut reader, mut writer) = socket.into_split();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\n\
         content-type: application/json\r\ncontent-length: 100000\r\n\r\n{{\"model\":",
        key.secret
    );
    writer.write_all(head.as_bytes()).await.unwrap();
    let trickle = tokio::spawn(async move {
        for _ in 0..600 {
            if writer.write_all(b" ").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    assert_served(&gw, &key).await;
    let received = read_until_closed(&mut reader, CLOSE_BOUND)
        .await
        .expect("a body trickled for 30 s was not cut");
    let text = String::from_utf8_lossy(&received);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("\"code\":\"request_timeout\""), "{text}");
    trickle.abort();
    // Only the normal call reached the model server; the one that never arrived is not
    // charged.
    assert_eq!(gw.sim.simulator.stats().chat_requests, 1);
    let usage = unpooled(&gw).usage(&key.secret).await;
    assert_eq!(usage["requests"]["used"], 1, "{usage}");
}

#[tokio::test]
async fn a_thousand_idle_connections_are_closed_and_calls_go_on() {
    let gw = impatient_gateway().await;
    let key = gw.create_key(json!({})).await;
    let addr = gw.running().addr;
    // Connections that never send a byte...
    let mut silent = Vec::new();
    for _ in 0..1000 {
        silent.push(TcpStream::connect(addr).await.unwrap());
    }
    // ...and a keep-alive connection that made one request and then idles.
    let mut kept = TcpStream::connect(addr).await.unwrap();
    kept.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = kept.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // ...and an HTTP/2 connection that sent its preface and settings, then nothing.
    let mut h2 = TcpStream::connect(addr).await.unwrap();
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    assert_served(&gw, &key).await;
    // The server's settings and GOAWAY, then the end.
    read_until_closed(&mut h2, CLOSE_BOUND)
        .await
        .expect("an idle HTTP/2 connection was never closed");
    for socket in silent.iter_mut().chain(std::iter::once(&mut kept)) {
        let received = read_until_closed(socket, CLOSE_BOUND)
            .await
            .expect("an idle connection was never closed");
        assert!(
            received.is_empty(),
            "{}",
            String::from_utf8_lossy(&received)
        );
    }
    assert_served(&gw, &key).await;
}

/// A stream far larger than the socket buffers between the model server and the client
/// (~50 MB) is held back, not buffered, while the client reads a few bytes at a time; the
/// call is settled with what was generated when the client goes.
#[tokio::test]
async fn a_reader_that_barely_reads_holds_back_the_upstream() {
    const TOKENS: u64 = 200_000;
    let gw = TestGateway::builder()
        .sim(|s| {
            s.reply_tokens = TOKENS as u32;
            s.reasoning_tokens = 0;
            s.max_model_len = 10_000_000;
            s.record_requests = false;
        })
        .start()
        .await;
    let key = gw.create_key(json!({})).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut socket = socket.connect(gw.running().addr).await.unwrap();
    let body = stream_body("a long one").to_string();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\n\
         content-type: application/json\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        key.secret,
        body.len()
    );
    socket.write_all(head.as_bytes()).await.unwrap();

    // Sixteen bytes a read, with pauses, until the model server is held back: less than
    // 100 tokens (~26 KB) more sent in the last second. Unbounded buffering never stalls.
    let mut received = Vec::new();
    let mut buf = [0u8; 16];
    let mut history = std::collections::VecDeque::new();
    let mut stalled = false;
    for _ in 0..600 {
        for _ in 0..16 {
            let n = socket.read(&mut buf).await.unwrap();
            assert!(n > 0, "the stream ended early");
            received.extend_from_slice(&buf[..n]);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
        history.push_back(gw.sim.simulator.stats().completion_tokens_sent);
        if history.len() > 40 {
            history.pop_front();
            if history.back().unwrap() - history.front().unwrap() < 100 {
                stalled = true;
                break;
            }
        }
    }
    let stats = gw.sim.simulator.stats();
    let read = String::from_utf8_lossy(&received)
        .matches("data: {")
        .count() as u64;
    eprintln!(
        "slow reader: read {} bytes ({read} chunks); upstream held at {} of {TOKENS} tokens",
        received.len(),
        stats.completion_tokens_sent
    );
    assert!(stalled, "the upstream was never held back: {stats:?}");
    assert_eq!(stats.streams_finished, 0, "the whole stream was buffered");
    assert!(stats.completion_tokens_sent < TOKENS, "{stats:?}");
    // Another client is served while the stream is held back.
    assert_served(&gw, &key).await;

    // The reader goes: the model server stops, and the call is paid for what it generated.
    drop(socket);
    crate::common::wait_for_cancelled_streams(&gw.sim.simulator, 1).await;
    let stats = gw.sim.simulator.stats();
    assert_eq!(stats.streams_cancelled, 1, "the upstream kept generating");
    let calls = gw.wait_for_calls(&key.id, 2).await;
    let call = calls
        .iter()
        .find(|c| c["outcome"] == "client_disconnected")
        .unwrap_or_else(|| panic!("{calls:?}"));
    assert_eq!(call["usage_estimated"], false, "{call}");
    let charged = call["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(
        charged >= read.saturating_sub(1),
        "{call}: {read} chunks read"
    );
    assert!(
        charged <= stats.completion_tokens_sent,
        "{call} vs {stats:?}"
    );
}

fn nested(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

#[tokio::test]
async fn deeply_nested_json_is_a_400_wherever_it_hides() {
    let gw = TestGateway::start().await;
    let key = gw.create_key(json!({})).await;
    let deep = nested(100_000);
    let message = r#"[{"role":"user","content":"hi"}]"#;
    let bodies = [
        // The whole body.
        "[".repeat(100_000),
        deep.clone(),
        // A field the gateway does not read, passed on to the model server.
        format!(r#"{{"model":"{MODEL}","messages":{message},"extra":{deep}}}"#),
        // Fields the gateway reads as raw JSON.
        format!(r#"{{"model":"{MODEL}","messages":{message},"tools":{deep}}}"#),
        format!(
            r#"{{"model":"{MODEL}","messages":{message},"stream":true,"stream_options":{{"x":{deep}}}}}"#
        ),
        format!(r#"{{"model":"{MODEL}","messages":[{{"role":"user","content":{deep}}}]}}"#),
        format!(
            r#"{{"model":"{MODEL}","messages":[{{"role":"user","content":"hi","tool_calls":{deep}}}]}}"#
        ),
    ];
    for body in bodies {
        let error = expect_error(
            gw.chat_raw(&key.secret, body.clone().into_bytes()).await,
            StatusCode::BAD_REQUEST,
        )
        .await;
        let text = error["message"].as_str().unwrap();
        assert!(
            text.contains("nest") || text.contains("recursion"),
            "{} → {error}",
            &body[..80]
        );
    }
    assert_eq!(gw.sim.simulator.stats().chat_requests, 0);
    // The admin door too.
    let response = gw
        .http
        .post(gw.url("/admin/v1/users"))
        .bearer_auth(crate::common::ADMIN_TOKEN)
        .header("content-type", "application/json")
        .body(format!(r#"{{"name":"x","metadata":{deep}}}"#))
        .send()
        .await
        .unwrap();
    expect_error(response, StatusCode::BAD_REQUEST).await;
    // Nesting a model server would read is still passed on.
    let fine = format!(
        r#"{{"model":"{MODEL}","messages":{message},"extra":{}}}"#,
        nested(20)
    );
    assert_eq!(
        gw.chat_raw(&key.secret, fine.into_bytes()).await.status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn a_deep_struct_over_grpc_is_refused_and_the_door_stays_open() {
    use step3_gateway::grpc::pb;
    let gw = TestGateway::start().await;
    let key = gw.create_key(json!({})).await;
    let mut client = gw.grpc_chat(&key.secret).await;
    let request = |depth: usize| {
        let mut value = prost_types::Value {
            kind: Some(prost_types::value::Kind::NumberValue(1.0)),
        };
        for _ in 0..depth {
            value = prost_types::Value {
                kind: Some(prost_types::value::Kind::ListValue(
                    prost_types::ListValue {
                        values: vec![value],
                    },
                )),
            };
        }
        let mut extra = prost_types::Struct::default();
        extra.fields.insert("deep".into(), value);
        pb::ChatRequest {
            extra: Some(extra),
            ..chat_request("hi")
        }
    };
    let status = client.complete(request(500)).await.unwrap_err();
    assert!(
        matches!(
            status.code(),
            tonic::Code::InvalidArgument | tonic::Code::Internal
        ),
        "{status:?}"
    );
    client.complete(request(10)).await.unwrap();
}

#[tokio::test]
async fn huge_heads_get_431_or_a_closed_connection() {
    let gw = TestGateway::start().await;
    let key = gw.create_key(json!({})).await;
    let one_big = format!("x-big: {}\r\n", "a".repeat(1024 * 1024));
    let many: String = (0..10_000).map(|i| format!("x-h{i}: v\r\n")).collect();
    let big_key = format!("authorization: Bearer {}\r\n", "k".repeat(1024 * 1024));
    for headers in [one_big, many, big_key] {
        let mut socket = TcpStream::connect(gw.running().addr).await.unwrap();
        let head = format!("GET /v1/models HTTP/1.1\r\nhost: x\r\n{headers}\r\n");
        // The gateway may close before it has read everything: a failed write is fine.
        let _ = socket.write_all(head.as_bytes()).await;
        let received = read_until_closed(&mut socket, CLOSE_BOUND)
            .await
            .expect("a huge head kept its connection open");
        let text = String::from_utf8_lossy(&received);
        assert!(
            text.is_empty() || text.starts_with("HTTP/1.1 431"),
            "{}",
            &text[..text.len().min(300)]
        );
        assert!(received.len() < 4096, "{} bytes back", received.len());
    }
    assert_served(&gw, &key).await;
}

#[tokio::test]
async fn a_large_bogus_key_is_a_clean_401_never_echoed() {
    let gw = TestGateway::start().await;
    let key = gw.create_key(json!({})).await;
    let bogus = format!("sk-step3-{}", "q".repeat(200 * 1024));
    for path in ["/v1/chat/completions", "/admin/v1/users"] {
        let request = if path.starts_with("/admin") {
            gw.http.get(gw.url(path))
        } else {
            gw.http.post(gw.url(path)).json(&chat_body("hi"))
        };
        let response = request.bearer_auth(&bogus).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        let headers = format!("{:?}", response.headers());
        let text = response.text().await.unwrap();
        assert!(
            text.len() < 1024 && !text.contains("qqqq"),
            "{path}: {text}"
        );
        assert!(!headers.contains("qqqq"), "{headers}");
    }
    // Over gRPC, metadata that large is refused by the HTTP/2 layer.
    let mut client = gw.grpc_chat(&bogus).await;
    let status = client
        .get_usage(step3_gateway::grpc::pb::GetUsageRequest {})
        .await
        .unwrap_err();
    assert!(!status.message().contains("qqqq"), "{status:?}");
    assert_served(&gw, &key).await;
}

#[tokio::test]
async fn invalid_utf8_in_body_or_headers_gets_an_openai_error() {
    let gw = TestGateway::start().await;
    let key = gw.create_key(json!({})).await;
    let mut body =
        format!(r#"{{"model":"{MODEL}","messages":[{{"role":"user","content":"#).into_bytes();
    body.extend_from_slice(b"\"\xff\xfe\"}]}");
    let error = expect_error(
        gw.chat_raw(&key.secret, body).await,
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert!(
        error["message"].as_str().unwrap().contains("parse"),
        "{error}"
    );
    let mut model = br#"{"messages":[{"role":"user","content":"hi"}],"model":"#.to_vec();
    model.extend_from_slice(b"\"\xc3\x28\"}");
    expect_error(
        gw.chat_raw(&key.secret, model).await,
        StatusCode::BAD_REQUEST,
    )
    .await;

    // Header values are bytes on the wire. A key that is not text is refused like any
    // wrong key; another header that is not text is ignored (a request id is made).
    let raw = |headers: &[u8], body: &str| {
        let mut request = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\
             content-type: application/json\r\ncontent-length: {}\r\n",
            body.len()
        )
        .into_bytes();
        request.extend_from_slice(headers);
        request.extend_from_slice(b"\r\n");
        request.extend_from_slice(body.as_bytes());
        request
    };
    let body = chat_body("hi").to_string();
    let bad_key = b"authorization: Bearer sk-step3-\xff\xfe\r\n".to_vec();
    let mut bad_id = format!("authorization: Bearer {}\r\n", key.secret).into_bytes();
    bad_id.extend_from_slice(b"x-request-id: \xff\xfe\r\n");
    for (headers, status) in [(bad_key, "401"), (bad_id, "200")] {
        let mut socket = TcpStream::connect(gw.running().addr).await.unwrap();
        socket.write_all(&raw(&headers, &body)).await.unwrap();
        let received = read_until_closed(&mut socket, CLOSE_BOUND).await.unwrap();
        let text = String::from_utf8_lossy(&received);
        assert!(text.starts_with(&format!("HTTP/1.1 {status}")), "{text}");
        assert!(text.contains("x-request-id: req_"), "{text}");
        if status == "401" {
            let (_, body) = text.split_once("\r\n\r\n").unwrap();
            let body: Value = serde_json::from_str(body).unwrap();
            assert_eq!(body["error"]["code"], "invalid_api_key", "{body}");
        }
    }
}
