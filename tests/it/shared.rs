//! The shared store: several gateways on one Postgres share keys and one set of books,
//! and with Redis their limits and quotas hold across them exactly; a batch written twice
//! counts once; admin changes reach every replica; a store that cannot be reached or is
//! newer than the build is refused at start with a message that hides the URL's password.

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use reqwest::{Method, StatusCode};
use serde_json::json;
use step3_gateway::app;
use step3_gateway::config::{GatewayConfig, SecretUrl, StoreBackend};
use step3_gateway::core::records::{CallOutcome, CallRecord, Usage};
use step3_gateway::core::store::Store;
use step3_gateway::store::PostgresStore;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::common::postgres::{fresh_database, psql};
use crate::common::redis::{OwnRedis, fresh_prefix};
use crate::common::{RestApi, TestGateway, chat_body, expect_error};

async fn replica(url: &str) -> TestGateway {
    TestGateway::builder().shared_store(url).start().await
}

/// Three replicas on one Postgres and one Redis, each in front of a model server of its own.
async fn three_replicas() -> Vec<TestGateway> {
    let (url, redis) = (fresh_database(), fresh_prefix());
    let mut replicas = Vec::new();
    for _ in 0..3 {
        let gw = TestGateway::builder()
            .shared_store(&url)
            .shared_limits(&redis)
            .start()
            .await;
        replicas.push(gw);
    }
    replicas
}

/// `n` calls with `secret`, spread over the replicas in turn, all at once; their statuses.
async fn spread(replicas: &[TestGateway], secret: &str, n: usize) -> Vec<StatusCode> {
    let calls = (0..n).map(|i| {
        let gw = &replicas[i % replicas.len()];
        async move { gw.chat(secret, &chat_body("spread")).await.status() }
    });
    join_all(calls).await
}

fn count(statuses: &[StatusCode], status: StatusCode) -> usize {
    statuses.iter().filter(|s| **s == status).count()
}

fn served(replicas: &[TestGateway]) -> u64 {
    replicas
        .iter()
        .map(|gw| gw.sim.simulator.stats().chat_requests)
        .sum()
}

#[tokio::test]
async fn a_per_minute_limit_holds_across_replicas_for_a_key_and_for_a_user() {
    let replicas = three_replicas().await;
    let key = replicas[0].create_key(json!({"rpm_limit": 30})).await;
    let statuses = spread(&replicas, &key.secret, 60).await;
    assert_eq!(count(&statuses, StatusCode::OK), 30, "{statuses:?}");
    assert_eq!(count(&statuses, StatusCode::TOO_MANY_REQUESTS), 30);
    assert_eq!(served(&replicas), 30);
    // A user's limit over two keys, on every replica.
    let user = replicas[1]
        .create_user(json!({"name": "team", "rpm_limit": 12}))
        .await;
    let first = replicas[1].create_key_for(&user, json!({})).await;
    let second = replicas[2].create_key_for(&user, json!({})).await;
    let (a, b) = tokio::join!(
        spread(&replicas, &first.secret, 15),
        spread(&replicas, &second.secret, 15)
    );
    assert_eq!(count(&a, StatusCode::OK) + count(&b, StatusCode::OK), 12);
    assert_eq!(served(&replicas), 42);
}

#[tokio::test]
async fn a_request_quota_holds_exactly_under_concurrent_calls_across_replicas() {
    let mut replicas = three_replicas().await;
    let key = replicas[0].create_key(json!({"request_quota": 100})).await;
    let statuses = spread(&replicas, &key.secret, 200).await;
    assert_eq!(count(&statuses, StatusCode::OK), 100, "{statuses:?}");
    assert_eq!(served(&replicas), 100);
    // The books agree: call log, hourly usage, and the counters a replica loads.
    assert_eq!(replicas[1].wait_for_calls(&key.id, 100).await.len(), 100);
    let (_, usage) = replicas[2]
        .admin(Method::GET, &format!("/keys/{}/usage", key.id), None)
        .await;
    assert_eq!(usage["requests"], 100, "{usage}");
    replicas[2].restart().await;
    let (_, shown) = replicas[2]
        .admin(Method::GET, &format!("/keys/{}", key.id), None)
        .await;
    assert_eq!(shown["requests_used"], 100, "{shown}");
    assert_eq!(shown["prompt_tokens_used"], usage["prompt_tokens"]);
    let refused = replicas[2].chat(&key.secret, &chat_body("one more")).await;
    assert_eq!(
        expect_error(refused, StatusCode::TOO_MANY_REQUESTS).await["code"],
        "insufficient_quota"
    );
}

#[tokio::test]
async fn a_budget_holds_across_replicas_and_a_new_price_reaches_them_all() {
    use step3_gateway::core::money::Money;
    let (url, redis) = (fresh_database(), fresh_prefix());
    let mut replicas = Vec::new();
    for _ in 0..3 {
        let gw = TestGateway::builder()
            .shared_store(&url)
            .shared_limits(&redis)
            .config(|c| {
                c.billing.prices = vec![step3_gateway::config::PriceSeed {
                    model: crate::common::MODEL.into(),
                    completion_per_million: Money::parse("1000").unwrap(),
                    ..Default::default()
                }]
            })
            .start()
            .await;
        replicas.push(gw);
    }
    // 0.50 pays for 500 output tokens; each call may use 8.
    let key = replicas[0].create_key(json!({"budget": "0.50"})).await;
    let calls = (0..150).map(|i| {
        let gw = &replicas[i % 3];
        let secret = key.secret.clone();
        async move {
            let mut body = chat_body("spend");
            body["max_tokens"] = json!(8);
            gw.chat(&secret, &body).await.status()
        }
    });
    let statuses = join_all(calls).await;
    let ok = count(&statuses, StatusCode::OK);
    assert!(
        ok > 0 && count(&statuses, StatusCode::TOO_MANY_REQUESTS) > 0,
        "{statuses:?}"
    );
    assert_eq!(served(&replicas), ok as u64);
    let logged = replicas[1].wait_for_calls(&key.id, ok).await;
    let spent = logged.iter().fold(Money::ZERO, |sum, c| {
        sum.saturating_add(Money::parse(c["cost"].as_str().unwrap()).unwrap())
    });
    assert!(spent <= Money::parse("0.50").unwrap(), "spent {spent}");

    // A price added on one replica is the price on the others.
    let (status, _) = replicas[2]
        .admin(
            Method::POST,
            "/prices",
            Some(json!({"model": crate::common::MODEL, "per_call_minimum": "7"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let other = replicas[0].create_key(json!({})).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        replicas[0]
            .chat(&other.secret, &chat_body("now"))
            .await
            .text()
            .await
            .unwrap();
        let calls = replicas[0].calls(&other.id).await;
        if calls.first().is_some_and(|c| c["cost"] == "7.00") {
            break;
        }
        assert!(Instant::now() < deadline, "{calls:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    replicas.clear();
}

/// Calls `secret` on `gw` until it is refused with 401 (bounded, five seconds).
async fn wait_until_refused(gw: &TestGateway, secret: &str) -> Duration {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        if gw.chat(secret, &chat_body("still?")).await.status() == StatusCode::UNAUTHORIZED {
            return started.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the change never reached the other replica");
}

#[tokio::test]
async fn a_key_revoked_or_rotated_on_one_replica_is_refused_on_the_others() {
    let replicas = three_replicas().await;
    let (a, c) = (&replicas[0], &replicas[2]);
    let key = a.create_key(json!({})).await;
    let other = a.create_key(json!({})).await;
    for secret in [&key.secret, &other.secret] {
        // Held by replica C from here on.
        assert_eq!(
            c.chat(secret, &chat_body("hi")).await.status(),
            StatusCode::OK
        );
    }
    let (status, _) = a
        .admin(Method::DELETE, &format!("/keys/{}", key.id), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    wait_until_refused(c, &key.secret).await;
    let (status, rotated) = a
        .admin(
            Method::POST,
            &format!("/keys/{}/rotate", other.id),
            Some(json!({"grace_seconds": 0})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{rotated}");
    wait_until_refused(c, &other.secret).await;
    let new_secret = rotated["secret"].as_str().unwrap();
    assert_eq!(
        c.chat(new_secret, &chat_body("new")).await.status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn an_unreachable_redis_refuses_keys_with_a_quota_lets_others_through_and_recovers() {
    let mut redis = OwnRedis::start();
    let gw = TestGateway::builder()
        .shared_store(&fresh_database())
        .shared_limits(&(redis.url.clone(), "own".into()))
        .config(|c| c.store.timeout_ms = 300)
        .start()
        .await;
    let limited = gw.create_key(json!({"request_quota": 10})).await;
    let open = gw.create_key(json!({})).await;
    let ok = gw.chat(&limited.secret, &chat_body("before")).await;
    assert_eq!(ok.status(), StatusCode::OK);
    redis.stop();
    let refused = gw.chat(&limited.secret, &chat_body("after")).await;
    assert_eq!(refused.headers()["retry-after"], "1");
    let error = expect_error(refused, StatusCode::SERVICE_UNAVAILABLE).await;
    assert_eq!(error["code"], "store_unavailable");
    let open_call = gw.chat(&open.secret, &chat_body("after")).await;
    assert_eq!(open_call.status(), StatusCode::OK);
    assert_eq!(gw.sim.simulator.stats().chat_requests, 2);
    // A new, empty Redis: the key's counters come back from the books, so its quota
    // still counts the calls made before (bounded wait for the reconnection).
    redis.restart();
    let mut statuses = Vec::new();
    for _ in 0..100 {
        let status = gw.chat(&limited.secret, &chat_body("again")).await.status();
        statuses.push(status);
        if status == StatusCode::OK {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(statuses.last(), Some(&StatusCode::OK), "{statuses:?}");
    for _ in 0..8 {
        let status = gw.chat(&limited.secret, &chat_body("more")).await.status();
        assert_eq!(status, StatusCode::OK);
    }
    // 1 + 1 + 8 = the quota of 10.
    let refused = gw.chat(&limited.secret, &chat_body("over")).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
}

/// What `/health`, `/metrics` and gRPC health say of the store's parts, polled until
/// `done` holds (the probe runs every second; bounded wait, no timing asserted).
async fn wait_for_store_parts(
    gw: &TestGateway,
    done: impl Fn(&serde_json::Value) -> bool,
) -> (serde_json::Value, String) {
    let mut health = serde_json::Value::Null;
    for _ in 0..150 {
        health = gw.get("/health", None).await.1;
        if done(&health) {
            return (health, gw.metrics().await);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the store's parts never got there: {health}");
}

async fn grpc_part(gw: &TestGateway, service: &str) -> ServingStatus {
    let mut health = HealthClient::new(gw.channel().await);
    health
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status()
}

#[tokio::test]
async fn health_and_metrics_name_the_part_of_the_shared_store_that_is_down_and_see_it_recover() {
    let mut redis = OwnRedis::start();
    let postgres = crate::common::postgres::OwnPostgres::start();
    let gw = TestGateway::builder()
        .shared_store(&postgres.url)
        .shared_limits(&(redis.url.clone(), "own".into()))
        .config(|c| c.store.timeout_ms = 300)
        .start()
        .await;
    let key = gw.create_key(json!({})).await;
    assert_eq!(
        gw.chat(&key.secret, &chat_body("before")).await.status(),
        StatusCode::OK
    );
    let (health, metrics) = wait_for_store_parts(&gw, |h| h["store"]["limits"] == "ok").await;
    assert_eq!(health["status"], "ok", "{health}");
    assert_eq!(health["store"]["books"], "ok", "{health}");
    assert!(
        metrics.lines().any(|l| l == "step3gw_store_available 1"),
        "{metrics}"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l == "step3gw_shared_limits_available 1"),
        "{metrics}"
    );
    assert_eq!(
        grpc_part(&gw, "step3gw.store.limits").await,
        ServingStatus::Serving
    );

    // Redis down: the limits are named, the books are not; found with no call made.
    redis.stop();
    let (health, metrics) =
        wait_for_store_parts(&gw, |h| h["store"]["limits"] == "unavailable").await;
    assert_eq!(health["status"], "degraded", "{health}");
    assert_eq!(health["store"]["books"], "ok", "{health}");
    assert!(
        health["store"]["limits_error"]
            .as_str()
            .is_some_and(|e| e.starts_with("redis")),
        "{health}"
    );
    assert!(
        metrics.lines().any(|l| l == "step3gw_store_available 1"),
        "{metrics}"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l == "step3gw_shared_limits_available 0"),
        "{metrics}"
    );
    let (limits, books) = (
        grpc_part(&gw, "step3gw.store.limits").await,
        grpc_part(&gw, "step3gw.store.books").await,
    );
    assert_eq!(
        (limits, books),
        (ServingStatus::NotServing, ServingStatus::Serving)
    );
    assert_eq!(grpc_part(&gw, "").await, ServingStatus::Serving);

    // Back by itself.
    redis.restart();
    let (health, metrics) = wait_for_store_parts(&gw, |h| h["store"]["limits"] == "ok").await;
    assert_eq!(health["status"], "ok", "{health}");
    assert!(
        metrics
            .lines()
            .any(|l| l == "step3gw_shared_limits_available 1"),
        "{metrics}"
    );

    // Postgres down: the books are named once a write fails (calls are then refused).
    postgres.pause();
    for _ in 0..100 {
        let status = gw.chat(&key.secret, &chat_body("during")).await.status();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (health, metrics) =
        wait_for_store_parts(&gw, |h| h["store"]["books"] == "unavailable").await;
    assert_eq!(health["status"], "unavailable", "{health}");
    assert_eq!(health["store"]["limits"], "ok", "{health}");
    assert!(
        metrics.lines().any(|l| l == "step3gw_store_available 0"),
        "{metrics}"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l == "step3gw_shared_limits_available 1"),
        "{metrics}"
    );
    let (limits, books) = (
        grpc_part(&gw, "step3gw.store.limits").await,
        grpc_part(&gw, "step3gw.store.books").await,
    );
    assert_eq!(
        (limits, books),
        (ServingStatus::Serving, ServingStatus::NotServing)
    );
    assert_eq!(grpc_part(&gw, "").await, ServingStatus::NotServing);

    postgres.resume();
    let (health, metrics) = wait_for_store_parts(&gw, |h| h["store"]["books"] == "ok").await;
    assert_eq!(health["status"], "ok", "{health}");
    assert!(
        metrics.lines().any(|l| l == "step3gw_store_available 1"),
        "{metrics}"
    );
    assert_eq!(
        grpc_part(&gw, "step3gw.store.books").await,
        ServingStatus::Serving
    );
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
        version: None,
        cost: Default::default(),
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
        client_addr: None,
        reservation,
        cache_hit: false,
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
    // The next page starts after the second-newest call (its time leads the token).
    assert!(cursor.unwrap().as_str().starts_with("pg:2000:"));
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

#[tokio::test]
async fn postgres_stopped_under_load_loses_nothing_and_doubles_nothing() {
    let postgres = crate::common::postgres::OwnPostgres::start();
    let gw = TestGateway::builder()
        .shared_store(&postgres.url)
        .config(|c| c.store.timeout_ms = 500)
        .start()
        .await;
    let key = gw.create_key(json!({})).await;
    let body = chat_body("load");
    let load = |n: usize| {
        let calls = (0..n).map(|_| gw.chat(&key.secret, &body));
        async move {
            join_all(calls)
                .await
                .iter()
                .map(|r| r.status())
                .collect::<Vec<_>>()
        }
    };
    let before = load(20).await;
    postgres.pause();
    // Calls go on until the usage writer finds it cannot write; then they are refused.
    let mut during = Vec::new();
    for _ in 0..100 {
        let statuses = load(5).await;
        during.extend_from_slice(&statuses);
        if statuses.contains(&StatusCode::SERVICE_UNAVAILABLE) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        during.contains(&StatusCode::SERVICE_UNAVAILABLE),
        "{during:?}"
    );
    postgres.resume();
    // Back by itself: the held usage is written, and new calls are taken again.
    let mut after = Vec::new();
    for _ in 0..100 {
        after = load(5).await;
        if after.iter().all(|s| *s == StatusCode::OK) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(after.iter().all(|s| *s == StatusCode::OK), "{after:?}");
    let answered = [before, during, after]
        .concat()
        .iter()
        .filter(|s| **s == StatusCode::OK)
        .count();
    // Every call the model server answered is on the books once, none twice.
    let served = usize::try_from(gw.sim.simulator.stats().chat_requests).unwrap();
    assert_eq!(answered, served);
    let calls = gw.wait_for_calls(&key.id, served).await;
    assert_eq!(calls.len(), served);
    let (_, usage) = gw
        .admin(Method::GET, &format!("/keys/{}/usage", key.id), None)
        .await;
    assert_eq!(usage["requests"], served, "{usage}");
}
