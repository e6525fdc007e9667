//! Backups: taken from a gateway under load, restored, and the books (counters, call log,
//! hourly usage) are those of the moment of the backup; a damaged backup is refused and
//! changes nothing; a running gateway's store is never overwritten; scheduled backups keep
//! the newest few.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::json;
use step3_gateway::core::export::{ExportReader, ExportRecord, verify_export};
use step3_gateway::core::records::{KeyCounters, UsageBucket};

use crate::common::{ADMIN_TOKEN, RestApi, TestGateway, chat_body, stream_body};

fn read_records(path: &Path) -> Vec<ExportRecord> {
    let file = std::io::BufReader::new(std::fs::File::open(path).unwrap());
    let mut reader = ExportReader::new(file).unwrap();
    let mut records = Vec::new();
    while let Some(record) = reader.next_record().unwrap() {
        records.push(record);
    }
    records
}

/// Hourly buckets by key, hour and model.
type Buckets = BTreeMap<(String, i64, String), UsageBucket>;

/// The counters and hourly buckets the calls of `records` add up to.
fn books_from_calls(records: &[ExportRecord]) -> (BTreeMap<String, KeyCounters>, Buckets) {
    let mut counters: BTreeMap<String, KeyCounters> = BTreeMap::new();
    let mut buckets = Buckets::new();
    for record in records {
        let ExportRecord::Call(call) = record else {
            continue;
        };
        counters
            .entry(call.key_id.clone())
            .or_default()
            .add(&call.counters());
        let hour = call.at_micros / 1_000_000 / 3600 * 3600;
        let bucket = buckets
            .entry((call.key_id.clone(), hour, call.model.clone()))
            .or_insert_with(|| UsageBucket {
                hour,
                model: call.model.clone(),
                ..UsageBucket::default()
            });
        bucket.requests += u64::from(call.charged_request);
        bucket.errors += u64::from(call.status >= 400);
        bucket.prompt_tokens += call.usage.prompt_tokens;
        bucket.completion_tokens += call.usage.completion_tokens;
        bucket.images += u64::from(call.images);
        bucket.cache_hits += u64::from(call.cache_hit);
    }
    (counters, buckets)
}

fn restore(
    file: &Path,
    target: &Path,
    force: bool,
) -> anyhow::Result<step3_gateway::app::Restored> {
    step3_gateway::app::restore(file, target, force, &mut |_| true)
}

async fn online_backup(gw: &TestGateway, out: &Path) -> step3_gateway::core::export::ExportSummary {
    step3_gateway::admin_client::backup(&gw.running().grpc_url(), ADMIN_TOKEN, out, &mut |_, _| {})
        .await
        .unwrap()
}

#[tokio::test]
async fn a_backup_taken_under_load_restores_to_the_books_of_its_moment() {
    let gw = TestGateway::builder()
        .config(|c| c.store.call_log_retention_days = 0)
        .start()
        .await;
    let mut keys = Vec::new();
    for n in 0..3 {
        keys.push(gw.create_key(json!({"token_quota": 1_000_000 + n})).await);
    }
    let (http, url) = (gw.http.clone(), gw.url("/v1/chat/completions"));
    let load: Vec<_> = keys
        .iter()
        .map(|key| {
            let (http, url, secret) = (http.clone(), url.clone(), key.secret.clone());
            tokio::spawn(async move {
                for i in 0..40 {
                    let body = if i % 3 == 0 {
                        stream_body("hi")
                    } else {
                        chat_body("hi")
                    };
                    let response = http
                        .post(&url)
                        .bearer_auth(&secret)
                        .json(&body)
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(response.status(), StatusCode::OK);
                    response.bytes().await.unwrap();
                }
            })
        })
        .collect();
    gw.wait_for_calls(&keys[0].id, 5).await;

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("under-load.jsonl");
    let summary = online_backup(&gw, &file).await;
    for task in load {
        task.await.unwrap();
    }
    // Taken while calls were being recorded: some, not all, of the 120.
    assert!(summary.calls >= 5 && summary.calls < 120, "{summary:?}");
    assert_eq!(summary.keys, 3);

    // A consistent cut: every counter and hourly bucket is exactly what its calls add up to.
    let records = read_records(&file);
    let (counters, buckets) = books_from_calls(&records);
    let mut seen_counters = 0;
    for record in &records {
        match record {
            ExportRecord::Counters {
                key_id,
                counters: kept,
            } => {
                assert_eq!(Some(kept), counters.get(key_id), "counters of {key_id}");
                seen_counters += 1;
            }
            ExportRecord::Usage { key_id, bucket } => {
                let calls = &buckets[&(key_id.clone(), bucket.hour, bucket.model.clone())];
                assert_eq!(bucket, calls, "hourly usage of {key_id}");
            }
            _ => {}
        }
    }
    assert_eq!(seen_counters, counters.len());

    // Restored, the store holds exactly those records.
    let target = dir.path().join("restored");
    let restored = restore(&file, &target, false).unwrap();
    assert_eq!(restored.summary.records, summary.records);
    assert!(restored.moved_aside.is_none());
    let again = dir.path().join("again.jsonl");
    step3_gateway::app::backup_stopped(&target, &again).unwrap();
    assert_eq!(read_records(&again), records);

    // A gateway on the restored store serves those books.
    let restored_dir = target.clone();
    let back = TestGateway::builder()
        .config(move |c| c.store.path = restored_dir)
        .start()
        .await;
    for key in &keys {
        let (status, view) = back
            .admin(Method::GET, &format!("/keys/{}", key.id), None)
            .await;
        assert_eq!(status, StatusCode::OK, "{view}");
        let kept = counters.get(&key.id).copied().unwrap_or_default();
        assert_eq!(view["requests_used"], kept.requests, "{view}");
        assert_eq!(view["prompt_tokens_used"], kept.prompt_tokens, "{view}");
        assert_eq!(
            view["completion_tokens_used"], kept.completion_tokens,
            "{view}"
        );
        let logged: Vec<String> = back
            .calls(&key.id)
            .await
            .iter()
            .map(|c| c["request_id"].as_str().unwrap().to_owned())
            .collect();
        let mut expected: Vec<(i64, String)> = records
            .iter()
            .filter_map(|r| match r {
                ExportRecord::Call(c) if c.key_id == key.id => {
                    Some((c.at_micros, c.request_id.clone()))
                }
                _ => None,
            })
            .collect();
        expected.sort();
        let expected: Vec<String> = expected.into_iter().rev().map(|(_, id)| id).collect();
        assert_eq!(logged, expected);
        let (_, report) = back
            .admin(Method::GET, &format!("/keys/{}/usage?from=0", key.id), None)
            .await;
        assert_eq!(report["requests"], kept.requests, "{report}");
        assert_eq!(report["prompt_tokens"], kept.prompt_tokens, "{report}");
    }
    // The key secrets still open their keys: they are kept as hashes.
    let usage = back.usage(&keys[1].secret).await;
    assert_eq!(usage["key_id"], keys[1].id.as_str());
}

#[tokio::test]
async fn a_damaged_backup_is_refused_with_a_clear_error_and_changes_nothing() {
    let gw = TestGateway::start().await;
    let key = gw.create_key(json!({})).await;
    for _ in 0..3 {
        gw.chat(&key.secret, &chat_body("hi")).await;
    }
    gw.wait_for_calls(&key.id, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.jsonl");
    online_backup(&gw, &good).await;
    let text = std::fs::read_to_string(&good).unwrap();

    let cases: [(&str, String, &str); 4] = [
        (
            "cut",
            text[..text.len() - 30].to_owned(),
            "the backup is incomplete: it ends after",
        ),
        (
            "changed",
            text.replacen(r#""requests":3"#, r#""requests":4"#, 1),
            "its checksum does not match its contents",
        ),
        (
            "garbage",
            text.replacen(r#"{"type":"key""#, r#"{"type":"kee""#, 1),
            "is not a record",
        ),
        (
            "not a backup",
            "hello\n".to_owned(),
            "is not a step3-gateway backup",
        ),
    ];
    for (name, damaged, expected) in cases {
        assert_ne!(damaged, text, "{name}");
        let bad = dir.path().join(format!("{name}.jsonl"));
        std::fs::write(&bad, damaged).unwrap();
        let target = dir
            .path()
            .join(format!("restore-{}", name.replace(' ', "-")));
        let e = format!("{:#}", restore(&bad, &target, false).unwrap_err());
        assert!(e.contains(expected), "{name}: {e}");
        assert!(
            !target.exists(),
            "{name}: the restore left {}",
            target.display()
        );
        assert!(
            verify_export(std::io::BufReader::new(std::fs::File::open(&bad).unwrap())).is_err()
        );
    }

    // The command line says the same and fails.
    let bad = dir.path().join("cut.jsonl");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_step3-gateway"))
        .args(["restore", bad.to_str().unwrap(), "--data-dir"])
        .arg(dir.path().join("cli-target"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("the backup is incomplete"), "{stderr}");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_step3-gateway"))
        .args(["restore", "--check", good.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("is a whole backup: "), "{stderr}");
}

#[tokio::test]
async fn a_running_gateways_store_is_never_overwritten_and_a_stopped_one_only_when_forced() {
    let mut gw = TestGateway::start().await;
    let key = gw.create_key(json!({})).await;
    gw.chat(&key.secret, &chat_body("hi")).await;
    gw.wait_for_calls(&key.id, 1).await;
    let dir = tempfile::tempdir().unwrap();

    // Over REST: the same export, whole.
    let response = gw
        .http
        .get(gw.url("/admin/v1/backup"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "application/x-ndjson");
    let body = response.bytes().await.unwrap();
    let summary = verify_export(&body[..]).unwrap();
    assert_eq!(summary.keys, 1);
    let file = dir.path().join("rest.jsonl");
    std::fs::write(&file, &body).unwrap();

    let data = gw.config.store.path.clone();
    let e = format!("{:#}", restore(&file, &data, true).unwrap_err());
    assert!(e.contains("in use by a running gateway"), "{e}");
    let e = format!(
        "{:#}",
        step3_gateway::app::backup_stopped(&data, &dir.path().join("x.jsonl")).unwrap_err()
    );
    assert!(e.contains("in use by a running gateway"), "{e}");

    gw.stop().await;
    let e = format!("{:#}", restore(&file, &data, false).unwrap_err());
    assert!(e.contains("--force"), "{e}");
    // What is not the store's (a backups directory) stays where it is.
    std::fs::create_dir(data.join("backups")).unwrap();
    let restored = restore(&file, &data, true).unwrap();
    let aside = restored.moved_aside.unwrap();
    assert!(aside.join("conf").is_file() && aside.starts_with(&data));
    assert!(data.join("conf").is_file() && data.join("backups").is_dir());
    gw.restart().await;
    assert_eq!(gw.usage(&key.secret).await["requests"]["used"], 1);
}

#[tokio::test]
async fn scheduled_backups_keep_the_newest_few() {
    let dir = tempfile::tempdir().unwrap();
    let backups = dir.path().join("backups");
    let into = backups.clone();
    let gw = TestGateway::builder()
        .config(move |c| {
            c.backup.dir = Some(into);
            c.backup.interval_secs = 1;
            c.backup.keep = 2;
        })
        .start()
        .await;
    gw.create_key(json!({})).await;
    // Backups at about 1, 2 and 3 s: the first is deleted when the third is written.
    let started = step3_gateway::core::time::now_unix();
    tokio::time::sleep(Duration::from_millis(3400)).await;
    let kept = step3_gateway::backup::list(&backups).unwrap();
    assert_eq!(kept.len(), 2, "{kept:?}");
    let oldest = step3_gateway::core::snapshot::file_name(started + 1);
    assert!(
        kept[0].file_name().unwrap().to_string_lossy().as_ref() > oldest.as_str(),
        "{kept:?}"
    );
    for path in &kept {
        let summary =
            verify_export(std::io::BufReader::new(std::fs::File::open(path).unwrap())).unwrap();
        assert_eq!(summary.keys, 1);
    }
    let hidden: Vec<_> = std::fs::read_dir(&backups)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with('.'))
        .collect();
    assert!(hidden.is_empty(), "{hidden:?}");
}
