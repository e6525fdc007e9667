//! The shared store: several gateways on one Postgres share keys and one set of books;
//! a batch written twice counts once; a store that cannot be reached or is newer than
//! the build is refused at start with a message that hides the URL's password.

use reqwest::{Method, StatusCode};
use serde_json::json;
use step3_gateway::app;
use step3_gateway::config::{GatewayConfig, SecretUrl, StoreBackend};
use step3_gateway::core::records::{CallOutcome, CallRecord, Usage};
use step3_gateway::core::store::Store;
use step3_gateway::store::PostgresStore;

use crate::common::postgres::{fresh_database, psql};
use crate::common::{RestApi, TestGateway, chat_body};

async fn replica(url: &str) -> TestGateway {
    TestGateway::builder().shared_store(url).start().await
}

#[tokio::test]
async fn replicas_share_keys_and_one_set_of_books() {
    let url = fresh_database();
    let a = replica(&url).await;
    let mut b = replica(&url).await;
    let key = a.create_key(json!({})).await;
    for gw in [&a, &b, &a, &b, &b] {
        let answer = gw.chat(&key.secret, &chat_body("one book")).await;
        assert_eq!(answer.status(), StatusCode::OK);
    }
    // Each replica's calls are in the one call log, whichever replica reads it.
    assert_eq!(a.wait_for_calls(&key.id, 5).await.len(), 5);
    assert_eq!(b.wait_for_calls(&key.id, 5).await.len(), 5);
    let (status, usage) = a
        .admin(Method::GET, &format!("/keys/{}/usage", key.id), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{usage}");
    assert_eq!(usage["requests"], 5);
    // A replica that starts again loads counters holding every replica's calls.
    b.restart().await;
    let (_, shown) = b
        .admin(Method::GET, &format!("/keys/{}", key.id), None)
        .await;
    assert_eq!(shown["requests_used"], 5, "{shown}");
    assert_eq!(shown["prompt_tokens_used"], usage["prompt_tokens"]);
    let users = b.admin(Method::GET, "/users", None).await.1;
    assert!(users.to_string().contains(&key.user_id), "{users}");
}

fn call(at_micros: i64, reservation: Option<u64>) -> CallRecord {
    CallRecord {
        at_micros,
        request_id: format!("req-{at_micros}"),
        key_id: "key_1".into(),
        user_id: "usr_1".into(),
        model: "m".into(),
        status: 200,
        outcome: CallOutcome::Completed,
        stream: false,
        latency_ms: 1,
        charged_request: true,
        usage: Usage {
            prompt_tokens: 10,
            completion_tokens: 2,
        },
        usage_estimated: false,
        images: 0,
        image_sizes: Vec::new(),
        request_body: None,
        response_body: None,
        reservation,
    }
}

fn open(url: &str, dir: &std::path::Path) -> PostgresStore {
    PostgresStore::open(url, dir, std::time::Duration::from_secs(5), 2).unwrap()
}

#[test]
fn a_batch_written_again_is_counted_once_and_reservations_are_per_replica() {
    let url = fresh_database();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (open(&url, dir_a.path()), open(&url, dir_b.path()));
    let batch = [call(1_000, Some(7)), call(2_000, None), call(2_000, None)];
    a.record_calls(&batch).unwrap();
    // A batch whose fate was unknown, written again, and the same call settled again at
    // recovery (another time, the same reservation): nothing counts twice.
    a.record_calls(&batch).unwrap();
    a.record_calls(&[call(5_000, Some(7))]).unwrap();
    // Replica B's journal numbers its reservations on its own: its 7 is another call.
    b.record_calls(&[call(9_000, Some(7))]).unwrap();
    a.put_key(&test_key()).unwrap();
    let (_, counters) = a.load_key("key_1").unwrap().unwrap();
    assert_eq!(counters.requests, 3);
    assert_eq!(counters.prompt_tokens, 30);
    let (log, cursor) = b
        .calls(
            &step3_gateway::core::store::CallQuery {
                limit: 10,
                scan_limit: 100,
                ..Default::default()
            },
            &|_| true,
        )
        .unwrap();
    assert_eq!(
        log.iter().map(|c| c.at_micros).collect::<Vec<_>>(),
        [9_000, 2_000, 1_000]
    );
    assert_eq!(cursor, None);
    let usage = a.usage("key_1", 0, 3600).unwrap();
    assert_eq!(usage.len(), 1);
    assert_eq!(usage[0].requests, 3);
    assert_eq!(a.recorded_reservations(&[7, 8]).unwrap().len(), 1);
    // A page that stops before the log's end says where the next one starts.
    let (page, cursor) = a
        .calls(
            &step3_gateway::core::store::CallQuery {
                limit: 2,
                scan_limit: 100,
                ..Default::default()
            },
            &|_| true,
        )
        .unwrap();
    assert_eq!(page.len(), 2);
    assert_eq!(cursor.unwrap().at_micros, 2_000);
    assert!(
        PostgresStore::open(&url, dir_a.path(), std::time::Duration::from_secs(5), 1)
            .unwrap_err()
            .to_string()
            .contains("data directory of its own")
    );
}

fn test_key() -> step3_gateway::core::records::KeyRecord {
    serde_json::from_value(json!({
        "id": "key_1", "user_id": "usr_1", "name": "k", "prefix": "sk-step3-x",
        "hash": "00".repeat(32), "active": true, "created_at": 0, "updated_at": 0,
    }))
    .unwrap()
}

async fn start_error(config: GatewayConfig) -> String {
    match app::start(config).await {
        Ok(_) => panic!("the gateway started"),
        Err(e) => format!("{e:#}"),
    }
}

fn shared_config(url: &str, dir: &std::path::Path) -> GatewayConfig {
    let mut config = GatewayConfig::default();
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    config.store.path = dir.to_owned();
    config.store.backend = StoreBackend::Shared;
    config.store.postgres_url = Some(SecretUrl::new(url));
    config.store.timeout_ms = 1000;
    config.admin.token = Some(crate::common::ADMIN_TOKEN.into());
    config
}

#[tokio::test]
async fn an_unreachable_store_fails_the_start_in_time_without_showing_its_password() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("postgres://gateway:hunter2-secret@127.0.0.1:{port}/books");
    let started = std::time::Instant::now();
    let error = start_error(shared_config(&url, dir.path())).await;
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    assert!(!error.contains("hunter2"), "{error}");
    assert!(
        error.contains("postgres://gateway:***@127.0.0.1"),
        "{error}"
    );
    let config = shared_config(&url, dir.path());
    assert!(!format!("{config:?}").contains("hunter2"));
}

#[tokio::test]
async fn a_database_written_by_a_newer_build_is_refused() {
    let url = fresh_database();
    let dir = tempfile::tempdir().unwrap();
    drop(open(&url, dir.path()));
    psql(
        &url,
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, \
         execution_time) VALUES (999, 'future', true, '\\x00', 0)",
    );
    let error = start_error(shared_config(&url, dir.path())).await;
    assert!(error.contains("newer step3-gateway"), "{error}");
}

#[test]
fn shared_needs_a_postgres_url() {
    let mut config = GatewayConfig::default();
    config.store.backend = StoreBackend::Shared;
    let error = config.validate().unwrap_err().to_string();
    assert!(error.contains("store.postgres_url"), "{error}");
    config.store.postgres_url = Some(SecretUrl::new("redis://x:pw@h/1"));
    let error = config.validate().unwrap_err().to_string();
    assert!(
        error.contains("postgres://") && !error.contains(":pw@"),
        "{error}"
    );
}
