//! The real binary: SIGTERM drains a stream in flight and exits 0 with nothing lost,
//! SIGHUP reloads the upstream list, and no secret reaches a log line at any level.

use std::time::Duration;

use futures_util::StreamExt;
use reqwest::StatusCode;
use serde_json::{Value, json};
use step3_gateway::sim::{RunningSimulator, SimulatorConfig};

use crate::common::binary::{ConfigFile, GatewayProcess, UPSTREAM_KEY, upstream};
use crate::common::{ADMIN_TOKEN, RestApi, chat_body, read_rest, spawn_sim, stream_body};

#[tokio::test]
async fn sigterm_drains_a_stream_exits_0_keeps_the_books_and_logs_no_secret() {
    let sim = upstream(60).await;
    let dir = tempfile::tempdir().unwrap();
    let config = ConfigFile::new(&sim.url()).write(dir.path());
    let gw = GatewayProcess::start(&config).await;
    let secret = gw.create_key(json!({})).await.secret;
    assert_eq!(
        gw.chat(&secret, &chat_body("one")).await.status(),
        StatusCode::OK
    );
    assert_eq!(
        gw.chat("sk-step3-wrong-key", &chat_body("two"))
            .await
            .status(),
        StatusCode::UNAUTHORIZED
    );
    // A 100 KB key, and a client key at an admin route: refused, and logged nowhere.
    let huge_key = format!("sk-step3-{}", "h".repeat(100 * 1024));
    assert_eq!(
        gw.chat(&huge_key, &chat_body("three")).await.status(),
        StatusCode::UNAUTHORIZED
    );
    let (status, _) = gw.get("/admin/v1/calls", Some(&secret)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let body = stream_body("drain me");
    let mut stream = gw.chat(&secret, &body).await.bytes_stream();
    stream.next().await.unwrap().unwrap();
    gw.signal("TERM");
    let rest = read_rest(&mut stream).await;
    assert!(
        rest.ends_with("data: [DONE]\n\n"),
        "the stream was cut: {rest}"
    );
    let (status, logs) = gw.wait().await;
    assert!(status.success(), "{status:?}");
    assert!(logs.iter().any(|l| l.contains("usage flushed")));
    for line in &logs {
        for secret in [
            secret.as_str(),
            ADMIN_TOKEN,
            UPSTREAM_KEY,
            "sk-step3-wrong-key",
            &huge_key[..64],
        ] {
            assert!(!line.contains(secret), "a secret in the log: {line}");
        }
    }
    // One line per call, with the key's id and the figures.
    let call_lines: Vec<Value> = logs
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["fields"]["message"] == "call")
        .collect();
    assert_eq!(call_lines.len(), 2);
    assert!(
        call_lines
            .iter()
            .all(|v| v["fields"]["key_id"].as_str().unwrap().starts_with("key_"))
    );

    // Restarted on the same data: both calls are on the books.
    let gw = GatewayProcess::start(&config).await;
    let usage = gw.usage(&secret).await;
    assert_eq!(usage["requests"]["used"], 2);
    assert_eq!(usage["tokens"]["completion"], 24);
    gw.signal("INT");
    assert!(gw.wait().await.0.success());
}

#[tokio::test]
async fn sighup_reloads_the_upstream_list() {
    let first = upstream(0).await;
    let second = upstream(0).await;
    let dir = tempfile::tempdir().unwrap();
    let config = ConfigFile::new(&first.url()).write(dir.path());
    let gw = GatewayProcess::start(&config).await;
    let secret = gw.create_key(json!({})).await.secret;
    let hi = chat_body("hi");
    let call = || gw.chat(&secret, &hi);
    assert_eq!(call().await.status(), StatusCode::OK);
    ConfigFile::new(&second.url()).write(dir.path());
    gw.signal("HUP");
    let mut moved = false;
    for _ in 0..100 {
        assert_eq!(call().await.status(), StatusCode::OK);
        if second.simulator.stats().chat_requests > 0 {
            moved = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(moved, "calls never moved to the new upstream");
    gw.signal("TERM");
    let (status, logs) = gw.wait().await;
    // Its logs with the failure: CI once saw this stop fail, and nothing said why.
    assert!(
        status.success(),
        "{status:?}; the gateway logged:\n{}",
        logs.join("\n")
    );
    assert!(logs.iter().any(|l| l.contains("upstream list reloaded")));
}

/// The resident memory (KiB) and open descriptors of a process.
fn rss_and_fds(pid: u32) -> (u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    (rss, fds)
}

/// CPU time (user + system) a process has used, in milliseconds (at 100 ticks a second).
fn cpu_ms(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The fields after the command name, which ends with the last `)`.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks * 10
}

/// Starts the binary with short connection timeouts in front of `sim`.
async fn impatient_binary(
    dir: &std::path::Path,
    sim: &RunningSimulator,
    idle_timeout_secs: u64,
) -> GatewayProcess {
    let config = ConfigFile::new(&sim.url())
        .server(&format!(
            "header_read_timeout_secs = 10\nidle_timeout_secs = {idle_timeout_secs}"
        ))
        .write(dir);
    GatewayProcess::start(&config).await
}

/// Run by hand (`cargo test --release --test it -- --ignored --nocapture ten_thousand`):
/// prints the gateway's memory and descriptors with 10,000 idle connections.
#[tokio::test]
#[ignore = "opens 10,000 connections; run by hand"]
async fn ten_thousand_idle_connections_against_the_binary() {
    let sim = upstream(0).await;
    let dir = tempfile::tempdir().unwrap();
    let gw = impatient_binary(dir.path(), &sim, 120).await;
    let pid = gw.pid();
    let secret = gw.create_key(json!({})).await.secret;
    let hi = chat_body("hi");
    let call = || gw.chat(&secret, &hi);
    assert_eq!(call().await.status(), StatusCode::OK);
    let before = rss_and_fds(pid);
    let addr = gw.addr();
    let mut idle = Vec::new();
    let cpu_before = cpu_ms(pid);
    let started_connecting = std::time::Instant::now();
    // In batches: one connect at a time waits on the gateway's accept loop each time.
    for _ in 0..50 {
        let batch = (0..200).map(|_| tokio::net::TcpStream::connect(addr));
        for socket in futures_util::future::join_all(batch).await {
            idle.push(socket.unwrap());
        }
    }
    // Let the gateway accept them all.
    let mut held = rss_and_fds(pid);
    for _ in 0..200 {
        if held.1 >= before.1 + 10_000 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        held = rss_and_fds(pid);
    }
    let connected = started_connecting.elapsed();
    let accept_cpu = cpu_ms(pid) - cpu_before;
    let started = std::time::Instant::now();
    assert_eq!(call().await.status(), StatusCode::OK);
    let call_time = started.elapsed();
    let opened = std::time::Instant::now();
    let mut after = held;
    for _ in 0..3000 {
        after = rss_and_fds(pid);
        if after.1 <= before.1 + 10 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "10,000 idle connections (opened in {connected:?}, gateway CPU {accept_cpu} ms): before {} KiB RSS / {} fds; \
         held {} KiB / {} fds ({:.1} KiB per connection); a call meanwhile took \
         {call_time:?}; all closed {:?} later: {} KiB / {} fds",
        before.0,
        before.1,
        held.0,
        held.1,
        (held.0.saturating_sub(before.0)) as f64 / 10_000.0,
        opened.elapsed(),
        after.0,
        after.1
    );
    assert!(
        after.1 <= before.1 + 10,
        "idle connections not closed: {after:?}"
    );
    drop(idle);
    gw.signal("TERM");
    assert!(gw.wait().await.0.success());
}

/// Run by hand (`cargo test --release --test it -- --ignored --nocapture slow_reader`):
/// prints the gateway's memory while a client reads a 200,000-token stream a few bytes at
/// a time.
#[tokio::test]
#[ignore = "streams ~60 MB; run by hand"]
async fn a_slow_reader_against_the_binary() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const TOKENS: u32 = 200_000;
    let sim = spawn_sim(SimulatorConfig {
        reply_tokens: TOKENS,
        reasoning_tokens: 0,
        max_model_len: 10_000_000,
        api_key: Some(UPSTREAM_KEY.into()),
        record_requests: false,
        ..SimulatorConfig::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let gw = impatient_binary(dir.path(), &sim, 5).await;
    let pid = gw.pid();
    let secret = gw.create_key(json!({})).await.secret;
    let before = rss_and_fds(pid);
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut socket = socket.connect(gw.addr()).await.unwrap();
    let body = stream_body("long").to_string();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {secret}\r\n\
         content-type: application/json\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    let mut buf = [0u8; 8];
    let mut read = 0usize;
    let mut peak = before.0;
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(10) {
        for _ in 0..128 {
            read += socket.read(&mut buf).await.unwrap();
        }
        peak = peak.max(rss_and_fds(pid).0);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let sent = sim.simulator.stats().completion_tokens_sent;
    let mut rest = Vec::new();
    socket.read_to_end(&mut rest).await.unwrap();
    let total = read + rest.len();
    eprintln!(
        "slow reader: gateway RSS {} KiB before, peak {peak} KiB while {read} bytes were read \
         in 8-byte reads over 10 s; the upstream had sent {sent} of {TOKENS} tokens by then; \
         the whole stream was {total} bytes; RSS at the end {} KiB",
        before.0,
        rss_and_fds(pid).0
    );
    assert!(String::from_utf8_lossy(&rest).ends_with("data: [DONE]\n\n\r\n0\r\n\r\n"));
    gw.signal("TERM");
    assert!(gw.wait().await.0.success());
}
