//! Moving over: a sled store copied into Postgres and back (`step3-gateway store copy`),
//! its keys working and its books (counters, hourly usage, call log) the same on a gateway
//! on the copy; a running gateway's directory and a target that holds books are refused.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use step3_gateway::store_copy::{Copied, StoreLocation, copy};

use crate::common::postgres::fresh_database;
use crate::common::{RestApi, TestGateway, TestKey, chat_body};

async fn copy_books(from: StoreLocation, to: StoreLocation, force: bool) -> anyhow::Result<Copied> {
    tokio::task::spawn_blocking(move || copy(&from, &to, force, &mut |_| true))
        .await
        .unwrap()
}

fn sled(dir: &std::path::Path) -> StoreLocation {
    StoreLocation::Sled(dir.to_owned())
}

fn postgres(url: &str) -> StoreLocation {
    StoreLocation::parse(url)
}

/// What a gateway's books say of a key once its `calls` calls are written: its hourly
/// usage (in a window that ends at a fixed time, so that two reads compare) and its call log.
async fn books(gw: &TestGateway, key: &TestKey, calls: usize) -> (Value, Vec<Value>) {
    let log = gw.wait_for_calls(&key.id, calls).await;
    let to = 4_000_000_000_i64;
    let (status, usage) = gw
        .admin(
            Method::GET,
            &format!("/keys/{}/usage?from=0&to={to}", key.id),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{usage}");
    (usage, log)
}

#[tokio::test]
async fn a_sled_store_copied_into_postgres_and_back_keeps_its_keys_and_books() {
    let mut gw = TestGateway::builder()
        .config(|c| c.store.backend = step3_gateway::config::StoreBackend::Sled)
        .start()
        .await;
    let key = gw.create_key(json!({"request_quota": 50})).await;
    for _ in 0..3 {
        let answer = gw.chat(&key.secret, &chat_body("before the move")).await;
        assert_eq!(answer.status(), StatusCode::OK);
    }
    let before = books(&gw, &key, 3).await;
    let data = gw.config.store.path.clone();
    let url = fresh_database();

    let e = format!(
        "{:#}",
        copy_books(sled(&data), postgres(&url), false)
            .await
            .unwrap_err()
    );
    assert!(e.contains("in use by a running gateway"), "{e}");
    gw.stop().await;

    let copied = copy_books(sled(&data), postgres(&url), false)
        .await
        .unwrap();
    assert_eq!(
        (copied.summary.keys, copied.summary.calls),
        (1, 3),
        "{copied:?}"
    );
    // Once there, the books are not written over without --force.
    let e = format!(
        "{:#}",
        copy_books(sled(&data), postgres(&url), false)
            .await
            .unwrap_err()
    );
    assert!(e.contains("--force") && !e.contains("***@"), "{e}");

    // A gateway on Postgres: the same books, and the old secret works.
    let on_postgres = TestGateway::builder().shared_store(&url).start().await;
    assert_eq!(books(&on_postgres, &key, 3).await, before);
    assert_eq!(on_postgres.usage(&key.secret).await["requests"]["used"], 3);
    let answer = on_postgres
        .chat(&key.secret, &chat_body("after the move"))
        .await;
    assert_eq!(answer.status(), StatusCode::OK);
    let on_postgres_books = books(&on_postgres, &key, 4).await;
    drop(on_postgres);

    // And back into a new data directory, for one gateway again.
    let dir = tempfile::tempdir().unwrap();
    let back = dir.path().join("back");
    let copied = copy_books(postgres(&url), sled(&back), false)
        .await
        .unwrap();
    assert_eq!(
        (copied.summary.keys, copied.summary.calls),
        (1, 4),
        "{copied:?}"
    );
    let e = format!(
        "{:#}",
        copy_books(postgres(&url), sled(&back), false)
            .await
            .unwrap_err()
    );
    assert!(e.contains("--force"), "{e}");
    let back_dir = back.clone();
    let on_sled = TestGateway::builder()
        .config(move |c| {
            c.store.backend = step3_gateway::config::StoreBackend::Sled;
            c.store.path = back_dir;
        })
        .start()
        .await;
    assert_eq!(books(&on_sled, &key, 4).await, on_postgres_books);
    assert_eq!(on_sled.usage(&key.secret).await["requests"]["used"], 4);
}

#[tokio::test]
async fn a_copy_stopped_halfway_leaves_the_target_as_it_was() {
    let mut gw = TestGateway::builder()
        .config(|c| c.store.backend = step3_gateway::config::StoreBackend::Sled)
        .start()
        .await;
    let key = gw.create_key(json!({})).await;
    assert_eq!(
        gw.chat(&key.secret, &chat_body("x")).await.status(),
        StatusCode::OK
    );
    gw.wait_for_calls(&key.id, 1).await;
    gw.stop().await;
    let data = gw.config.store.path.clone();
    let url = fresh_database();
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("copy");
    for to in [postgres(&url), sled(&target)] {
        let from = sled(&data);
        let stopped = tokio::task::spawn_blocking(move || copy(&from, &to, false, &mut |_| false))
            .await
            .unwrap();
        let e = format!("{:#}", stopped.unwrap_err());
        assert!(e.contains("interrupted"), "{e}");
    }
    // Nothing was left: both targets take a whole copy without --force.
    assert!(!target.exists());
    copy_books(sled(&data), postgres(&url), false)
        .await
        .unwrap();
    copy_books(sled(&data), sled(&target), false).await.unwrap();

    // The command line: the same copy, and its refusal of a target that holds books,
    // which shows the URL without its password.
    let cli = |to: &str, force: bool| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_step3-gateway"));
        command
            .args(["store", "copy", "--from"])
            .arg(&data)
            .args(["--to", to]);
        if force {
            command.arg("--force");
        }
        let output = command.output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        (output.status.success(), stderr)
    };
    let with_password = url.replacen('@', ":hunter2@", 1);
    let (ok, stderr) = cli(&with_password, false);
    assert!(!ok && !stderr.contains("hunter2"), "{stderr}");
    let (ok, stderr) = cli(&url, false);
    assert!(!ok && stderr.contains("--force"), "{stderr}");
    let e = format!(
        "{:#}",
        copy_books(postgres(&url), postgres(&url), true)
            .await
            .unwrap_err()
    );
    assert!(e.contains("both the source and the target"), "{e}");
    let e = format!(
        "{:#}",
        copy_books(sled(&data), sled(&data), true)
            .await
            .unwrap_err()
    );
    assert!(e.contains("both the source and the target"), "{e}");
    let (ok, stderr) = cli(&url, true);
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("copied") && stderr.contains("1 keys, 1 calls"),
        "{stderr}"
    );
    assert!(stderr.contains("were removed (--force)"), "{stderr}");
}
