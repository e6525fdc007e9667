//! Alerts, with receivers started here: an HTTP server that checks each channel's body and
//! signature, and an SMTP sink of a few lines of tokio. The conditions are real: a killed
//! backend, a failing store, failing and slow calls, a key's quota used up, bad keys.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, Uri};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, KeyInit, Mac};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sha2::Sha256;
use step3_gateway::grpc::pb;
use step3_gateway::notify::settings::{
    AlertsConfig, ChannelConfig, ChannelKind, EventKind, Secret, SmtpSecurity,
};
use step3_gateway::sim::{Fault, SimulatorConfig};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::common::{RestApi, TestGateway, chat_body, spawn_sim};

/// One request the receiver took.
#[derive(Clone, Debug)]
pub struct Received {
    pub path: String,
    pub query: String,
    pub headers: HeaderMap,
    pub body: Value,
    pub raw: Bytes,
}

/// An HTTP server taking every POST; `/flaky` fails its first `fail_first` requests.
#[derive(Clone)]
pub struct Receiver {
    pub url: String,
    seen: Arc<Mutex<Vec<Received>>>,
    fail_first: Arc<AtomicU32>,
}

impl Receiver {
    pub async fn start() -> Self {
        let seen: Arc<Mutex<Vec<Received>>> = Arc::default();
        let fail_first = Arc::new(AtomicU32::new(0));
        let (record, fails) = (seen.clone(), fail_first.clone());
        let app = axum::Router::new().fallback(move |uri: Uri, headers: HeaderMap, raw: Bytes| {
            let (record, fails) = (record.clone(), fails.clone());
            async move {
                record.lock().unwrap().push(Received {
                    path: uri.path().to_owned(),
                    query: uri.query().unwrap_or_default().to_owned(),
                    headers,
                    body: serde_json::from_slice(&raw).unwrap_or(Value::Null),
                    raw,
                });
                if uri.path() == "/flaky"
                    && fails
                        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                        .is_ok()
                {
                    return (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "down for a moment".to_owned(),
                    );
                }
                // What the robots answer when they take a message.
                (StatusCode::OK, json!({"errcode": 0, "code": 0}).to_string())
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Receiver {
            url,
            seen,
            fail_first,
        }
    }

    pub fn at(&self, path: &str) -> Vec<Received> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.path == path)
            .cloned()
            .collect()
    }

    /// Waits (bounded) until `path` has taken `n` requests, and returns them.
    async fn wait_for(&self, path: &str, n: usize) -> Vec<Received> {
        for _ in 0..300 {
            let seen = self.at(path);
            if seen.len() >= n {
                return seen;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("{path} took {:?}, not {n} requests", self.at(path));
    }

    /// The generic webhook bodies at `path` whose `event` and `state` match.
    fn bodies(&self, path: &str, event: &str, state: &str) -> Vec<Value> {
        self.at(path)
            .into_iter()
            .map(|r| r.body)
            .filter(|b| b["event"] == event && b["state"] == state)
            .collect()
    }

    async fn wait_for_body(&self, path: &str, event: &str, state: &str) -> Value {
        for _ in 0..300 {
            if let Some(body) = self.bodies(path, event, state).pop() {
                return body;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("no {event} {state} at {path}: {:?}", self.at(path));
    }
}

/// A message the SMTP sink took.
#[derive(Clone, Debug, Default)]
struct Mail {
    auth: Option<String>,
    from: String,
    to: Vec<String>,
    data: String,
}

/// An SMTP server that takes every message (no TLS): enough of RFC 5321 for lettre.
async fn smtp_sink() -> (u16, Arc<Mutex<Vec<Mail>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mails: Arc<Mutex<Vec<Mail>>> = Arc::default();
    let taken = mails.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let taken = taken.clone();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).lines();
                write.write_all(b"220 sink ESMTP\r\n").await.unwrap();
                let mut mail = Mail::default();
                while let Ok(Some(line)) = lines.next_line().await {
                    let upper = line.to_ascii_uppercase();
                    let reply: &[u8] = if upper.starts_with("EHLO") {
                        b"250-sink\r\n250-AUTH PLAIN LOGIN\r\n250 8BITMIME\r\n"
                    } else if upper.starts_with("AUTH PLAIN") {
                        mail.auth = line.split_whitespace().nth(2).map(str::to_owned);
                        b"235 2.7.0 accepted\r\n"
                    } else if upper.starts_with("MAIL FROM:") {
                        mail.from = line[10..].trim().to_owned();
                        b"250 ok\r\n"
                    } else if upper.starts_with("RCPT TO:") {
                        mail.to.push(line[8..].trim().to_owned());
                        b"250 ok\r\n"
                    } else if upper == "DATA" {
                        write.write_all(b"354 go on\r\n").await.unwrap();
                        while let Ok(Some(data)) = lines.next_line().await {
                            if data == "." {
                                break;
                            }
                            mail.data.push_str(&data);
                            mail.data.push('\n');
                        }
                        taken.lock().unwrap().push(std::mem::take(&mut mail));
                        b"250 queued\r\n"
                    } else if upper == "QUIT" {
                        let _ = write.write_all(b"221 bye\r\n").await;
                        return;
                    } else {
                        b"250 ok\r\n"
                    };
                    write.write_all(reply).await.unwrap();
                }
            });
        }
    });
    (port, mails)
}

/// A generic webhook channel to `url`, told everything.
pub fn webhook(name: &str, url: &str) -> ChannelConfig {
    channel(name, ChannelKind::Webhook, Some(url.to_owned()))
}

fn channel(name: &str, kind: ChannelKind, url: Option<String>) -> ChannelConfig {
    ChannelConfig {
        name: name.into(),
        kind,
        events: Vec::new(),
        url: url.map(Secret),
        secret: None,
        smtp_host: None,
        smtp_port: None,
        smtp_security: SmtpSecurity::None,
        smtp_username: None,
        smtp_password: None,
        from: None,
        to: Vec::new(),
    }
}

/// Alerts checked every 20 ms, delivered at once, retried after 20 ms.
fn quick_alerts(channels: Vec<ChannelConfig>) -> AlertsConfig {
    AlertsConfig {
        channels,
        source: "it-gateway".into(),
        check_interval_ms: 20,
        retry_backoff_ms: 20,
        timeout_secs: 5,
        ..AlertsConfig::default()
    }
}

fn hmac_sha256(key: &[u8], message: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
    mac.update(message);
    mac.finalize().into_bytes().to_vec()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn header<'a>(received: &'a Received, name: &str) -> &'a str {
    received.headers.get(name).unwrap().to_str().unwrap()
}

fn query_param(query: &str, name: &str) -> String {
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
        .unwrap_or_else(|| panic!("no {name} in {query}"))
}

#[tokio::test]
async fn a_test_message_reaches_every_kind_of_channel_signed_as_each_expects() {
    let receiver = Receiver::start().await;
    let (smtp_port, mails) = smtp_sink().await;
    let url = |path: &str| Some(format!("{}{path}", receiver.url));
    let mut webhook = channel("hook", ChannelKind::Webhook, url("/hook"));
    webhook.secret = Some(Secret("whsec-0123".into()));
    let mut dingtalk = channel(
        "ding",
        ChannelKind::Dingtalk,
        url("/ding?access_token=tok1"),
    );
    dingtalk.secret = Some(Secret("SECding".into()));
    let mut feishu = channel("lark", ChannelKind::Feishu, url("/lark"));
    feishu.secret = Some(Secret("larksecret".into()));
    let wecom = channel("wecom", ChannelKind::Wecom, url("/wecom?key=k1"));
    let slack = channel("slack", ChannelKind::Slack, url("/slack"));
    let mut email = channel("mail", ChannelKind::Email, None);
    email.smtp_host = Some("127.0.0.1".into());
    email.smtp_port = Some(smtp_port);
    email.smtp_username = Some("gw".into());
    email.smtp_password = Some(Secret("smtp-pass".into()));
    email.from = Some("gateway <gw@example.com>".into());
    email.to = vec!["ops@example.com".into(), "oncall@example.com".into()];
    let alerts = quick_alerts(vec![webhook, dingtalk, feishu, wecom, slack, email]);
    let gw = TestGateway::builder()
        .config(move |c| c.alerts = alerts)
        .start()
        .await;

    let (status, answer) = gw
        .admin(Method::POST, "/alerts/test", Some(json!({})))
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let deliveries = answer["deliveries"].as_array().unwrap();
    assert_eq!(deliveries.len(), 6, "{answer}");
    assert!(
        deliveries.iter().all(|d| d["delivered"] == true),
        "{answer}"
    );

    // Generic webhook: the JSON body, signed over `<timestamp>.<body>`.
    let hook = &receiver.at("/hook")[0];
    let timestamp = header(hook, "x-step3gw-timestamp");
    let mut signed = format!("{timestamp}.").into_bytes();
    signed.extend_from_slice(&hook.raw);
    assert_eq!(
        header(hook, "x-step3gw-signature"),
        format!("sha256={}", hex(&hmac_sha256(b"whsec-0123", &signed)))
    );
    assert_eq!(header(hook, "x-step3gw-event"), "test");
    assert_eq!(hook.body["event"], "test");
    assert_eq!(hook.body["state"], "notice");
    assert_eq!(hook.body["source"], "it-gateway");
    assert_eq!(hook.body["incident"], "test:hook");
    assert!(hook.body["title"].as_str().unwrap().contains("hook"));

    // DingTalk: `timestamp` (ms) and `sign` in the query, beside the robot's token.
    let ding = &receiver.at("/ding")[0];
    assert_eq!(query_param(&ding.query, "access_token"), "tok1");
    let ms = query_param(&ding.query, "timestamp");
    assert_eq!(
        query_param(&ding.query, "sign"),
        BASE64.encode(hmac_sha256(b"SECding", format!("{ms}\nSECding").as_bytes()))
    );
    assert_eq!(ding.body["msgtype"], "markdown");
    assert!(
        ding.body["markdown"]["text"]
            .as_str()
            .unwrap()
            .contains("test message")
    );

    // Feishu: `timestamp` (s) and `sign` in the body; the key is `<timestamp>\n<secret>`.
    let lark = &receiver.at("/lark")[0];
    let seconds = lark.body["timestamp"].as_str().unwrap();
    assert_eq!(
        lark.body["sign"],
        BASE64.encode(hmac_sha256(
            format!("{seconds}\nlarksecret").as_bytes(),
            b""
        ))
    );
    assert_eq!(lark.body["msg_type"], "text");
    assert!(
        lark.body["content"]["text"]
            .as_str()
            .unwrap()
            .starts_with("[it-gateway] test message")
    );

    let wecom = &receiver.at("/wecom")[0];
    assert_eq!(query_param(&wecom.query, "key"), "k1");
    assert_eq!(wecom.body["msgtype"], "markdown");
    assert!(wecom.body["markdown"]["content"].is_string());
    let slack = &receiver.at("/slack")[0];
    assert!(
        slack.body["text"]
            .as_str()
            .unwrap()
            .contains("test message to channel slack")
    );
    assert_eq!(slack.body.as_object().unwrap().len(), 1, "{}", slack.body);

    let mail = mails.lock().unwrap()[0].clone();
    assert_eq!(
        BASE64.decode(mail.auth.unwrap()).unwrap(),
        b"\0gw\0smtp-pass"
    );
    assert_eq!(mail.from, "<gw@example.com>");
    assert_eq!(mail.to, ["<ops@example.com>", "<oncall@example.com>"]);
    assert!(
        mail.data
            .contains("Subject: [it-gateway] test message to channel mail"),
        "{}",
        mail.data
    );

    // One channel over gRPC, and through the command line; an unknown one is NotFound.
    let mut admin = gw.grpc_admin().await;
    let one = admin
        .test_alert(pb::TestAlertRequest {
            channel: "slack".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(one.deliveries.len(), 1);
    assert!(one.deliveries[0].delivered);
    let e = admin
        .test_alert(pb::TestAlertRequest {
            channel: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    let cli = <step3_gateway::cli::Cli as clap::Parser>::parse_from([
        "step3-gateway",
        "admin",
        "--url",
        &gw.running().grpc_url(),
        "--token",
        crate::common::ADMIN_TOKEN,
        "alerts",
        "test",
        "--channel",
        "wecom",
    ]);
    let step3_gateway::cli::Command::Admin(args) = cli.command else {
        unreachable!()
    };
    let mut out = Vec::new();
    step3_gateway::admin_client::run(*args, &mut out)
        .await
        .unwrap();
    let printed: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(printed["deliveries"][0]["channel"], "wecom");
    assert_eq!(receiver.at("/wecom").len(), 2);

    let metrics = gw.metrics().await;
    assert!(
        metrics.contains(r#"step3gw_notifications_total{channel="slack",result="sent"} 2"#),
        "{metrics}"
    );
    // No URL, token or secret of a channel is ever shown.
    for secret in [
        "tok1",
        "SECding",
        "larksecret",
        "whsec-0123",
        "smtp-pass",
        "key=k1",
    ] {
        assert!(!metrics.contains(secret));
    }
}

#[tokio::test]
async fn a_killed_backend_is_announced_down_then_up_and_the_store_failing_then_back() {
    let receiver = Receiver::start().await;
    let sim = spawn_sim(SimulatorConfig::default()).await;
    let addr: SocketAddr = sim.url().trim_start_matches("http://").parse().unwrap();
    let mut hook = channel(
        "ops",
        ChannelKind::Webhook,
        Some(format!("{}/ops", receiver.url)),
    );
    hook.events = vec![
        EventKind::BackendDown,
        EventKind::NoHealthyBackend,
        EventKind::StoreUnavailable,
    ];
    let alerts = quick_alerts(vec![hook]);
    let sim_url = sim.url();
    let gw = TestGateway::builder()
        .config(move |c| {
            c.alerts = alerts;
            c.upstream.url = sim_url;
        })
        .start()
        .await;

    sim.shutdown().await;
    let down = receiver
        .wait_for_body("/ops", "backend_down", "firing")
        .await;
    assert_eq!(down["subject"], "default");
    assert_eq!(down["severity"], "critical");
    receiver
        .wait_for_body("/ops", "no_healthy_backend", "firing")
        .await;

    let sim = step3_gateway::sim::Simulator::new(SimulatorConfig::default())
        .spawn(addr)
        .await
        .unwrap();
    let up = receiver
        .wait_for_body("/ops", "backend_down", "resolved")
        .await;
    assert!(up["title"].as_str().unwrap().contains("healthy again"));
    receiver
        .wait_for_body("/ops", "no_healthy_backend", "resolved")
        .await;
    // Many checks saw the backend down: one message for its start, one for its end.
    assert_eq!(receiver.bodies("/ops", "backend_down", "firing").len(), 1);
    assert_eq!(receiver.bodies("/ops", "backend_down", "resolved").len(), 1);

    // The store failing: the usage writer finds it taking writes again by itself.
    gw.running()
        .gateway
        .store_health()
        .fail("disk full (test)", 3);
    let failing = receiver
        .wait_for_body("/ops", "store_unavailable", "firing")
        .await;
    assert!(
        failing["text"]
            .as_str()
            .unwrap()
            .contains("disk full (test)"),
        "{failing}"
    );
    receiver
        .wait_for_body("/ops", "store_unavailable", "resolved")
        .await;
    sim.shutdown().await;
}

#[tokio::test]
async fn failing_and_slow_calls_over_their_thresholds_are_announced() {
    let receiver = Receiver::start().await;
    let mut hook = channel(
        "ops",
        ChannelKind::Webhook,
        Some(format!("{}/ops", receiver.url)),
    );
    hook.events = vec![EventKind::ErrorRate, EventKind::Latency];
    let mut alerts = quick_alerts(vec![hook]);
    alerts.error_rate.threshold_percent = 40.0;
    alerts.error_rate.min_calls = 6;
    alerts.latency.p95_ms = 60;
    alerts.latency.min_calls = 6;
    let gw = TestGateway::builder()
        // 24 tokens at 5 ms: a successful JSON call takes over 100 ms.
        .sim(|s| s.token_latency = Duration::from_millis(5))
        .config(move |c| {
            c.alerts = alerts;
            // Three 500s in a row would eject the one backend: later calls would fail too.
            c.upstream.eject_after_failures = 100;
        })
        .start()
        .await;
    let key = gw.create_key(json!({})).await;
    for _ in 0..3 {
        gw.sim.simulator.push_fault(Fault::Status {
            status: 500,
            body: r#"{"error":{"message":"GPU fell over"}}"#.into(),
        });
    }
    for _ in 0..6 {
        gw.chat(&key.secret, &chat_body("hello")).await;
    }
    let errors = receiver.wait_for_body("/ops", "error_rate", "firing").await;
    assert!(
        errors["text"].as_str().unwrap().starts_with("3 of 6 calls"),
        "{errors}"
    );
    let slow = receiver.wait_for_body("/ops", "latency", "firing").await;
    assert!(
        slow["title"].as_str().unwrap().contains("over 60 ms"),
        "{slow}"
    );
}

#[tokio::test]
async fn quota_shares_and_expiring_keys_are_announced_once_each() {
    let receiver = Receiver::start().await;
    let mut hook = channel(
        "ops",
        ChannelKind::Webhook,
        Some(format!("{}/ops", receiver.url)),
    );
    hook.events = vec![EventKind::Quota, EventKind::KeyExpiring];
    let mut alerts = quick_alerts(vec![hook]);
    alerts.key_expiry_check_secs = 1;
    let gw = TestGateway::builder()
        .config(move |c| c.alerts = alerts)
        .start()
        .await;
    let key = gw
        .create_key(json!({"request_quota": 5, "expires_in": "2d"}))
        .await;
    for _ in 0..4 {
        let response = gw.chat(&key.secret, &chat_body("hello")).await;
        assert_eq!(response.status(), StatusCode::OK);
    }
    let eighty = receiver.wait_for_body("/ops", "quota", "notice").await;
    assert_eq!(eighty["subject"], key.id);
    assert!(
        eighty["title"]
            .as_str()
            .unwrap()
            .ends_with("has used 80% of its request quota"),
        "{eighty}"
    );
    assert!(
        eighty["text"]
            .as_str()
            .unwrap()
            .starts_with("Used 4 of 5 requests")
    );
    gw.chat(&key.secret, &chat_body("hello")).await;
    // Refused calls past the quota say nothing new.
    for _ in 0..3 {
        let response = gw.chat(&key.secret, &chat_body("hello")).await;
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    }
    let expiring = receiver
        .wait_for_body("/ops", "key_expiring", "notice")
        .await;
    assert!(
        expiring["title"]
            .as_str()
            .unwrap()
            .ends_with("expires within 2 days"),
        "{expiring}"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let quotas: Vec<String> = receiver
        .bodies("/ops", "quota", "notice")
        .iter()
        .map(|b| b["title"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(quotas.len(), 2, "{quotas:?}");
    assert!(
        quotas[1].ends_with("has used up its request quota"),
        "{quotas:?}"
    );
    assert_eq!(receiver.bodies("/ops", "key_expiring", "notice").len(), 1);
}

#[tokio::test]
async fn a_burst_of_bad_keys_is_announced_and_delivered_after_retries() {
    let receiver = Receiver::start().await;
    receiver.fail_first.store(2, Ordering::Release);
    let mut hook = channel(
        "ops",
        ChannelKind::Webhook,
        Some(format!("{}/flaky", receiver.url)),
    );
    hook.events = vec![EventKind::AuthFailures];
    let mut alerts = quick_alerts(vec![hook]);
    alerts.auth_failures.count = 5;
    let gw = TestGateway::builder()
        .config(move |c| c.alerts = alerts)
        .start()
        .await;
    for i in 0..6 {
        let response = gw
            .chat(&format!("sk-step3-guess{i}"), &chat_body("hi"))
            .await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    }
    // Two failed tries, then the message.
    let tries = receiver.wait_for("/flaky", 3).await;
    let burst = &tries[2].body;
    assert_eq!(burst["event"], "auth_failures");
    assert_eq!(burst["state"], "firing");
    assert_eq!(burst["subject"], "127.0.0.1");
    assert!(
        burst["title"]
            .as_str()
            .unwrap()
            .starts_with("5 failed authentications from 127.0.0.1"),
        "{burst}"
    );
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains(r#"step3gw_notifications_total{channel="ops",result="sent"} 1"#)
            && metrics.contains(r#"step3gw_notifications_total{channel="ops",result="failed"} 0"#),
        "{metrics}"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(receiver.at("/flaky").len(), 3, "one incident, one message");
}

#[tokio::test]
async fn a_failing_channel_is_named_but_its_url_and_secrets_reach_no_answer_and_no_log() {
    let sim = crate::common::binary::upstream(0).await;
    // A port nothing listens on: every try fails.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = crate::common::binary::ConfigFile::new(&sim.url())
        .extra(&format!(
            r#"[alerts]
max_attempts = 2
retry_backoff_ms = 10
timeout_secs = 2
check_interval_ms = 20
auth_failures = {{ count = 2, window_secs = 60 }}
[[alerts.channels]]
name = "ding"
kind = "dingtalk"
url = "http://{closed}/robot/send?access_token=tok-in-url-5150"
secret = "SEC-signing-7788"
[[alerts.channels]]
name = "hook"
kind = "webhook"
url = "http://{closed}/hooks/path-secret-3131"
secret = "whsec-4242"
"#
        ))
        .write(dir.path());
    // Logging at `trace`: the libraries' own lines are searched too.
    let gw = crate::common::binary::GatewayProcess::start(&config).await;
    let (status, answer) = gw
        .admin(Method::POST, "/alerts/test", Some(json!({})))
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let deliveries = answer["deliveries"].as_array().unwrap();
    assert_eq!(deliveries.len(), 2, "{answer}");
    for delivery in deliveries {
        assert_eq!(delivery["delivered"], false, "{answer}");
        assert!(!delivery["error"].as_str().unwrap().is_empty(), "{answer}");
    }
    // A real incident too, so the delivery workers try, retry and log their failures.
    for _ in 0..2 {
        let response = gw.chat("sk-step3-guess", &chat_body("hi")).await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    }
    let mut metrics = String::new();
    for _ in 0..500 {
        metrics = gw.metrics().await;
        if ["ding", "hook"].iter().all(|c| {
            metrics.contains(&format!(
                r#"step3gw_notifications_total{{channel="{c}",result="failed"}} 2"#
            ))
        }) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gw.signal("TERM");
    let (status, logs) = gw.wait().await;
    assert!(status.success(), "{status:?}");
    let failures = logs
        .iter()
        .filter(|l| l.contains("alerts: delivery failed"))
        .count();
    assert_eq!(failures, 4, "two tries on each channel: {logs:#?}");
    let answer = answer.to_string();
    for secret in [
        "tok-in-url-5150",
        "SEC-signing-7788",
        "path-secret-3131",
        "whsec-4242",
    ] {
        assert!(!answer.contains(secret), "a secret in the answer: {answer}");
        assert!(!metrics.contains(secret), "a secret in /metrics");
        for line in &logs {
            assert!(!line.contains(secret), "a secret in the log: {line}");
        }
    }
}
