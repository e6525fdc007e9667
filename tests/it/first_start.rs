//! The first hour with the real binary: the one-time secrets of a first start are never
//! lost (a start that fails stores none), a lost admin token is replaced with
//! `admin-token reset`, and the banner and the logs go where each belongs.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;

use crate::common::{MODEL, chat_body};

/// `step3-gateway <args>`, with none of the test environment's `STEP3GW_*` variables (an
/// exported admin token would hide what a newcomer sees).
fn command(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_step3-gateway"));
    command.args(args).env("RUST_LOG", "info");
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("STEP3GW_") {
            command.env_remove(name);
        }
    }
    command
}

async fn output(args: &[&str]) -> Output {
    let mut command = command(args);
    tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap()
}

/// A `serve --demo` child process, its stdout (the banner) and stderr (the logs) collected.
struct Demo {
    child: Child,
    base_url: String,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
    http: reqwest::Client,
}

fn collect(stream: impl std::io::Read + Send + 'static) -> Arc<Mutex<Vec<String>>> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    lines
}

impl Demo {
    /// `serve --demo` on a free port with its data in `data`, once its banner is complete.
    async fn start(data: &Path, log_format: &str) -> Demo {
        let data = data.to_str().unwrap();
        let mut child = command(&[
            "serve",
            "--demo",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data,
            "--log-format",
            log_format,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
        let stdout = collect(child.stdout.take().unwrap());
        let stderr = collect(child.stderr.take().unwrap());
        for _ in 0..500 {
            let banner = stdout.lock().unwrap().clone();
            // The banner is written whole; its last line is the curl example's body on a
            // first start, the command for another key later.
            let complete = banner
                .iter()
                .any(|l| l.starts_with("  -d '") || l.contains(" keys create "));
            if complete {
                let base_url = banner
                    .iter()
                    .find_map(|l| l.strip_prefix("step3-gateway serves REST and gRPC on "))
                    .unwrap()
                    .to_owned();
                return Demo {
                    child,
                    base_url,
                    stdout,
                    stderr,
                    http: reqwest::Client::new(),
                };
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "no banner: {:?} {:?}",
            stdout.lock().unwrap(),
            stderr.lock().unwrap()
        );
    }

    fn banner(&self) -> String {
        self.stdout.lock().unwrap().join("\n")
    }

    /// The value after `label` in the banner, if the banner has that line.
    fn shown(&self, label: &str) -> Option<String> {
        self.stdout
            .lock()
            .unwrap()
            .iter()
            .find_map(|l| l.strip_prefix(label).map(str::to_owned))
    }

    /// `GET /admin/v1/users` with `token`: its status.
    async fn admin_status(&self, token: &str) -> StatusCode {
        self.http
            .get(format!("{}/admin/v1/users", self.base_url))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .status()
    }

    /// SIGTERM, then the exit status and the logs.
    async fn stop(mut self) -> Vec<String> {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        let status = tokio::task::spawn_blocking(move || {
            let status = self.child.wait().unwrap();
            (status, self.stderr)
        })
        .await
        .unwrap();
        assert!(status.0.success(), "{:?}", status.0);
        tokio::time::sleep(Duration::from_millis(100)).await;
        status.1.lock().unwrap().clone()
    }
}

const ADMIN_TOKEN_LINE: &str = "Admin token (shown once; only its hash is stored): ";
const DEMO_KEY_LINE: &str = "Demo key (shown once): ";

#[tokio::test]
async fn a_taken_port_stores_no_secret_and_the_next_start_shows_working_ones() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();

    let failed = output(&[
        "serve",
        "--demo",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--data-dir",
        data.to_str().unwrap(),
        "--log-format",
        "json",
    ])
    .await;
    assert_eq!(failed.status.code(), Some(1), "{failed:?}");
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(
        stderr.contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{stderr}"
    );
    // With JSON logs, the error that ends the start is a JSON line too.
    for line in stderr.lines() {
        let _: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
    }
    assert!(
        failed.stdout.is_empty(),
        "no banner for a gateway that never served"
    );
    assert!(
        !data.exists(),
        "the ports are bound before the data dir is made"
    );

    let demo = Demo::start(&data, "json").await;
    let token = demo.shown(ADMIN_TOKEN_LINE).expect("an admin token");
    let key = demo.shown(DEMO_KEY_LINE).expect("a demo key");
    assert!(
        demo.banner()
            .contains("limits: 60 requests a minute, 1000 requests and 1000000 tokens in all"),
        "{}",
        demo.banner()
    );
    assert_eq!(demo.admin_status(&token).await, StatusCode::OK);
    let chat = demo
        .http
        .post(format!("{}/v1/chat/completions", demo.base_url))
        .bearer_auth(&key)
        .json(&chat_body("Hello"))
        .send()
        .await
        .unwrap();
    assert_eq!(chat.status(), StatusCode::OK);
    let answer: Value = chat.json().await.unwrap();
    assert_eq!(answer["model"], MODEL);
    // The banner states the key's real limits.
    let usage: Value = demo
        .http
        .get(format!("{}/v1/usage", demo.base_url))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(usage["requests"]["limit"], 1000, "{usage}");
    assert_eq!(usage["tokens"]["limit"], 1_000_000, "{usage}");
    // The demo's sample price: the call cost something, in USD.
    assert_eq!(usage["cost"]["currency"], "USD", "{usage}");
    assert_ne!(usage["cost"]["used"], "0.00", "{usage}");

    let logs = demo.stop().await;
    // With `--log-format json` stderr is all JSON, and the secrets are only on stdout.
    for line in &logs {
        let _: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(!line.contains(&token) && !line.contains(&key), "{line}");
    }
}

#[tokio::test]
async fn admin_token_reset_prints_a_token_that_works_and_the_old_one_stops() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let demo = Demo::start(&data, "text").await;
    let old = demo.shown(ADMIN_TOKEN_LINE).unwrap();
    let logs = demo.stop().await;
    // Logs on a pipe carry no colour codes.
    assert!(!logs.join("\n").contains('\u{1b}'), "{logs:?}");

    let reset = output(&["admin-token", "reset", "--data-dir", data.to_str().unwrap()]).await;
    assert!(reset.status.success(), "{reset:?}");
    let new = String::from_utf8(reset.stdout).unwrap().trim().to_owned();
    assert!(new.starts_with("adm-") && new != old, "{new}");
    assert!(!String::from_utf8_lossy(&reset.stderr).contains(&old));

    let demo = Demo::start(&data, "text").await;
    assert_eq!(demo.shown(ADMIN_TOKEN_LINE), None, "shown once only");
    assert_eq!(demo.shown(DEMO_KEY_LINE), None, "shown once only");
    // A later start says how to get back in.
    assert!(
        demo.banner()
            .contains(&format!("admin-token reset --data-dir {}", data.display())),
        "{}",
        demo.banner()
    );
    assert_eq!(demo.admin_status(&new).await, StatusCode::OK);
    assert_eq!(demo.admin_status(&old).await, StatusCode::UNAUTHORIZED);
    demo.stop().await;
}

#[tokio::test]
async fn admin_token_reset_is_refused_while_a_gateway_runs_on_the_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let demo = Demo::start(&data, "json").await;
    let token = demo.shown(ADMIN_TOKEN_LINE).unwrap();

    let reset = output(&["admin-token", "reset", "--data-dir", data.to_str().unwrap()]).await;
    assert_eq!(reset.status.code(), Some(1), "{reset:?}");
    assert!(reset.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&reset.stderr);
    assert!(
        stderr.contains("in use by a running gateway") && stderr.contains("stop the gateway"),
        "{stderr}"
    );
    assert_eq!(demo.admin_status(&token).await, StatusCode::OK);
    demo.stop().await;

    // Nor is a directory made where there was none.
    let nowhere = dir.path().join("typo");
    let reset = output(&[
        "admin-token",
        "reset",
        "--data-dir",
        nowhere.to_str().unwrap(),
    ])
    .await;
    assert_eq!(reset.status.code(), Some(1));
    assert!(!nowhere.exists());
}
