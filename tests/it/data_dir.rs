//! Data directory states: a damaged store, a store from a newer schema and a directory that
//! cannot be written each stop the real binary's start with a message that names the path
//! (never a panic, never a gateway serving empty books); a disk that fills at run time
//! makes the gateway refuse new calls, keep the usage it settled, and recover by itself.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use step3_gateway::core::store::Store;
use step3_gateway::store::SledStore;

use crate::common::binary::{ConfigFile, GatewayProcess, serve_command, upstream};
use crate::common::{RestApi, TestGateway, chat_body, chat_request, expect_error};

/// Runs `serve` and expects it to exit by itself; returns the exit code and stderr.
fn serve_expecting_exit(config: &Path) -> (Option<i32>, String) {
    let mut child = serve_command(config, "info").spawn().unwrap();
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let output = child.wait_with_output().unwrap();
            return (
                status.code(),
                String::from_utf8_lossy(&output.stderr).into_owned(),
            );
        }
        if started.elapsed() > Duration::from_secs(60) {
            child.kill().unwrap();
            let output = child.wait_with_output().unwrap();
            panic!(
                "the gateway kept running: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The last line of stderr: the error the binary reports at its edge.
fn last_line(stderr: &str) -> &str {
    stderr.lines().last().unwrap_or_default()
}

/// A data dir with one key and 150 calls on the books, left by a clean stop.
async fn used_data_dir(dir: &Path) -> (PathBuf, PathBuf) {
    let sim = upstream(0).await;
    let data = dir.join("data");
    let config = ConfigFile::new(&sim.url())
        .data(&data)
        .store("flush_interval_ms = 50")
        .write(dir);
    let gw = GatewayProcess::start_logging(&config, "info").await;
    let secret = gw.create_key(json!({})).await.secret;
    // Enough calls that sled's log spans a few hundred kilobytes.
    for _ in 0..150 {
        let response = gw.chat(&secret, &chat_body("hello")).await;
        assert!(response.status().is_success());
    }
    gw.signal("TERM");
    assert!(gw.wait().await.0.success());
    (config, data)
}

#[tokio::test]
async fn a_store_from_a_newer_schema_stops_the_start_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let (config, data) = used_data_dir(dir.path()).await;
    {
        let store = SledStore::open(&data).unwrap();
        store.put_meta("schema_version", b"99").unwrap();
        store.flush().unwrap();
    }
    let (code, stderr) = serve_expecting_exit(&config);
    assert_eq!(code, Some(1), "{stderr}");
    let error = last_line(&stderr);
    assert!(
        error.contains(&data.display().to_string())
            && error.contains("newer step3-gateway (schema 99"),
        "{stderr}"
    );
}

/// Overwrites `bytes` of `file` at `offset`.
fn damage(file: &Path, offset: u64, bytes: &[u8]) {
    use std::io::{Seek, SeekFrom, Write};
    let mut file = std::fs::OpenOptions::new().write(true).open(file).unwrap();
    file.seek(SeekFrom::Start(offset)).unwrap();
    file.write_all(bytes).unwrap();
    file.sync_all().unwrap();
}

/// sled reads its log up to the first damaged byte and often silently drops the rest (as
/// after a torn write): a few flipped bytes in the middle of `db` can roll the books back
/// with no error. The gateway notices that a call it had confirmed durable is gone and
/// refuses; where sled itself notices, its error names the path too.
#[tokio::test]
async fn a_damaged_store_stops_the_start_instead_of_serving_older_books() {
    let dir = tempfile::tempdir().unwrap();
    let (config, data) = used_data_dir(dir.path()).await;
    let db = data.join("db");
    let size = std::fs::metadata(&db).unwrap().len();
    damage(&db, size / 2, &[0xff; 8]);
    let error = expect_refused_as_damaged(&config, &data);
    eprintln!("damaged in the middle: {error}");
    // Damage at the very start: sled opens an empty database or reports the damage.
    damage(&db, 0, &vec![0; usize::try_from(size).unwrap()]);
    let error = expect_refused_as_damaged(&config, &data);
    eprintln!("zeroed: {error}");
}

/// The start fails with exit code 1 and an error naming `data` and the damage. Which check
/// catches it depends on where the bytes fall in sled's layout: sled's own (`Read corrupted
/// data`), the schema version (sled opened an empty database), or the durable mark (sled
/// dropped the log after the damage).
fn expect_refused_as_damaged(config: &Path, data: &Path) -> String {
    let (code, stderr) = serve_expecting_exit(config);
    assert_eq!(code, Some(1), "{stderr}");
    let error = last_line(&stderr).to_owned();
    assert!(
        error.contains(&data.display().to_string())
            && [
                "lost records it had confirmed durable",
                "Read corrupted data",
                "holds a store without a schema version",
            ]
            .iter()
            .any(|m| error.contains(m)),
        "{stderr}"
    );
    error
}

#[tokio::test]
async fn a_data_dir_that_cannot_be_created_stops_the_start_with_a_clear_message() {
    // A regular file where a directory should be: refused even to root.
    let dir = tempfile::tempdir().unwrap();
    let blocker = dir.path().join("not-a-dir");
    std::fs::write(&blocker, b"x").unwrap();
    let data = blocker.join("data");
    let config = ConfigFile::new("http://127.0.0.1:9")
        .data(&data)
        .write(dir.path());
    let (code, stderr) = serve_expecting_exit(&config);
    assert_eq!(code, Some(1), "{stderr}");
    let error = last_line(&stderr);
    assert!(
        error.contains(&format!("cannot create data directory {}", data.display()))
            && error.contains("Not a directory"),
        "{stderr}"
    );
}

/// Mounts a tmpfs of `size` on `at`; `None` (with the reason printed) where mounting is
/// not permitted (not root, no CAP_SYS_ADMIN, no `mount`).
pub(crate) fn mount_tmpfs(at: &Path, size: &str) -> Option<Mount> {
    let output = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(at)
        .output();
    match output {
        Ok(output) if output.status.success() => Some(Mount(at.to_owned())),
        Ok(output) => {
            eprintln!(
                "SKIPPED: cannot mount a tmpfs here ({}); this test needs root with CAP_SYS_ADMIN",
                String::from_utf8_lossy(&output.stderr).trim()
            );
            None
        }
        Err(e) => {
            eprintln!("SKIPPED: cannot run `mount` ({e})");
            None
        }
    }
}

/// A mount, unmounted when dropped.
pub(crate) struct Mount(PathBuf);

impl Mount {
    pub(crate) fn remount(&self, options: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,{options}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test]
async fn a_read_only_data_dir_stops_the_start_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let mount_point = dir.path().join("mnt");
    std::fs::create_dir(&mount_point).unwrap();
    let Some(mount) = mount_tmpfs(&mount_point, "64m") else {
        return;
    };
    let (config, data) = used_data_dir(&mount_point).await;
    mount.remount("ro");
    let (code, stderr) = serve_expecting_exit(&config);
    assert_eq!(code, Some(1), "{stderr}");
    let error = last_line(&stderr);
    assert!(
        error.contains(&data.display().to_string()) && error.contains("Read-only file system"),
        "{stderr}"
    );
}

/// Writes `path` until the file system is full.
fn fill(path: &Path) {
    use std::io::Write;
    let mut file = std::fs::File::create(path).unwrap();
    let chunk = vec![0xa5u8; 64 * 1024];
    while file.write_all(&chunk).is_ok() {}
    // The last partial chunk: byte by byte, so the file system is full to the last page.
    while file.write_all(&chunk[..1]).is_ok() {}
    let _ = file.sync_all();
}

#[tokio::test]
async fn a_full_disk_refuses_new_calls_keeps_settled_usage_and_recovers_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let mount_point = dir.path().join("mnt");
    std::fs::create_dir(&mount_point).unwrap();
    // Room for the reservation journal's two segments (8 MiB each, written at start).
    let Some(_mount) = mount_tmpfs(&mount_point, "48m") else {
        return;
    };
    let data = mount_point.join("data");
    let mut gw = TestGateway::builder()
        .config(move |c| c.store.path = data)
        .start()
        .await;
    let key = gw.create_key(json!({"request_quota": 100_000})).await;
    let mut answered = 0u64;
    assert_eq!(
        gw.chat(&key.secret, &chat_body("before")).await.status(),
        StatusCode::OK
    );
    answered += 1;

    let filler = mount_point.join("filler");
    fill(&filler);
    // Calls admitted before a write fails are answered, and their usage held in memory;
    // once a write has failed, new calls are refused.
    let mut refusal = None;
    for _ in 0..5000 {
        let response = gw
            .chat(&key.secret, &chat_body("while the disk fills"))
            .await;
        match response.status() {
            StatusCode::OK => answered += 1,
            StatusCode::SERVICE_UNAVAILABLE => {
                assert_eq!(response.headers()["retry-after"], "1");
                refusal = Some(expect_error(response, StatusCode::SERVICE_UNAVAILABLE).await);
                break;
            }
            other => panic!("{other}: {}", response.text().await.unwrap()),
        }
    }
    let error = refusal.expect("a full disk never stopped the calls");
    assert_eq!(
        (error["type"].as_str(), error["code"].as_str()),
        (Some("server_error"), Some("store_unavailable")),
        "{error}"
    );
    let health: Value = gw.health().await;
    eprintln!("health with a full disk: {health}");
    assert_eq!(health["status"], "unavailable", "{health}");
    assert_eq!(health["store"]["status"], "failing", "{health}");
    assert!(
        health["store"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("No space left on device")),
        "{health}"
    );
    let metrics = gw.metrics().await;
    assert!(metrics.contains("step3gw_store_available 0"), "{metrics}");
    assert!(metrics.contains("step3gw_refusals_total{reason=\"store\"} 1"));
    let mut grpc = gw.grpc_chat(&key.secret).await;
    let status = grpc.complete(chat_request("grpc")).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert_eq!(
        gw.usage(&key.secret).await["requests"]["used"],
        answered,
        "refused calls are not charged"
    );

    // Space comes back: the gateway recovers by itself and records what it held.
    std::fs::remove_file(&filler).unwrap();
    let mut recovered = false;
    for _ in 0..400 {
        let health: Value = gw.health().await;
        if health["store"]["status"] == "ok" {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(recovered, "the store never recovered");
    assert_eq!(
        gw.chat(&key.secret, &chat_body("after")).await.status(),
        StatusCode::OK
    );
    answered += 1;
    let n = usize::try_from(answered).unwrap();
    let calls = gw.wait_for_calls(&key.id, n).await;
    assert_eq!(calls.len(), n, "every answered call once in the log");
    let ids: HashSet<&str> = calls
        .iter()
        .map(|c| c["request_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), n);
    gw.restart().await;
    assert_eq!(gw.usage(&key.secret).await["requests"]["used"], answered);
    assert_eq!(gw.calls(&key.id).await.len(), n);
    eprintln!("full disk: {answered} calls answered, all on the books after recovery and restart");
}

#[tokio::test]
async fn a_store_still_failing_at_sigterm_makes_the_exit_code_say_usage_was_lost() {
    let dir = tempfile::tempdir().unwrap();
    let mount_point = dir.path().join("mnt");
    std::fs::create_dir(&mount_point).unwrap();
    let Some(_mount) = mount_tmpfs(&mount_point, "16m") else {
        return;
    };
    let sim = upstream(0).await;
    let data = mount_point.join("data");
    // Calls answered while the disk fills, their usage held in memory: the mode without a
    // journal (with one, the first reservation the full disk refuses stops the calls).
    let config = ConfigFile::new(&sim.url())
        .data(&data)
        .store("flush_interval_ms = 50\ndurability = \"flush_interval\"")
        .write(dir.path());
    let gw = GatewayProcess::start_logging(&config, "info").await;
    let secret = gw.create_key(json!({})).await.secret;
    fill(&mount_point.join("filler"));
    let mut answered = 0;
    for _ in 0..5000 {
        let response = gw.chat(&secret, &chat_body("fill")).await;
        if response.status() == StatusCode::SERVICE_UNAVAILABLE {
            break;
        }
        assert_eq!(response.status(), StatusCode::OK);
        answered += 1;
    }
    assert!(answered > 0);
    gw.signal("TERM");
    let (status, logs) = gw.wait().await;
    assert_eq!(status.code(), Some(1), "{logs:?}");
    let last = logs.last().unwrap();
    assert!(
        last.contains("the store failed until the end")
            && last.contains(&data.display().to_string()),
        "{logs:?}"
    );
}
