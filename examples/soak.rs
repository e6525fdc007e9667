//! A soak run: the gateway under a steady open-loop rate of mixed traffic for a long time,
//! with its memory, file descriptors, threads and latency sampled as it goes, and the books
//! checked at the end.
//!
//! ```sh
//! scripts/soak.sh 600 200        # builds in release; 600 s at 200 calls/s
//! ```
//!
//! It starts, as separate processes from the release build, the simulated STEP3-VL server
//! (5 ms per token, so streams last a little) and the gateway on a temporary data dir;
//! creates 4 users and 20 keys (three with an rpm limit of 30, so 429s happen; one with a
//! token quota sized to run out about halfway); then, for `secs` seconds, starts `rate`
//! calls a second whatever the answers do (REST JSON, REST SSE read to the end or dropped
//! after the first chunk, gRPC `Complete` and `StreamComplete` also read or dropped, bad
//! keys, malformed bodies, an occasional image as a `data:` URL). Every `SOAK_SAMPLE_SECS`
//! (15) it prints a row: the gateway's RSS, open fds and threads, the calls of the interval
//! by outcome, latency percentiles, the data dir's size. At the end: first/last/max of RSS
//! and fds, a "levels off" verdict, and the books: what the gateway charged (admin usage of
//! every key, and `/metrics`) against what the load generator saw the model serve.
//!
//! Environment: `SOAK_SAMPLE_SECS` (15), `SOAK_SERVER_CPU` (pin the simulator and the
//! gateway to these CPUs with taskset; unset: no pinning), `SOAK_TOKEN_LATENCY_MS` (5).
#![expect(clippy::print_stdout, reason = "a soak run prints its report")]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::StreamExt;
use serde_json::{Value, json};
use step3_gateway::grpc::pb;

#[allow(
    dead_code,
    reason = "shared with the benchmark, which uses other parts"
)]
mod common;
use common::{Proc, Servers, start_servers};

const MODEL: &str = "stepfun-ai/Step3-VL-10B";
const ADMIN: &str = "soak-admin-token-0123456789";
const KEYS: usize = 20;
/// Keys 14..17 have `rpm_limit = RPM_LIMITED`.
const RPM_KEYS: std::ops::Range<usize> = 14..17;
const RPM_LIMITED: u32 = 30;
/// Key 17 has a token quota that runs out about halfway through the run.
const QUOTA_KEY: usize = 17;
/// A 1×1 PNG.
const PNG_1X1: &str = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==";

// ---------------------------------------------------------------- processes

fn dir_size(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

// ---------------------------------------------------------------- traffic

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Json,
    JsonImage,
    SseFull,
    SseDrop,
    GrpcUnary,
    GrpcStreamFull,
    GrpcStreamDrop,
    BadKeyRest,
    BadKeyGrpc,
    Malformed,
}

/// The mix, per 100 calls.
const MIX: [(Kind, u32); 10] = [
    (Kind::Json, 36),
    (Kind::JsonImage, 2),
    (Kind::SseFull, 15),
    (Kind::SseDrop, 8),
    (Kind::GrpcUnary, 15),
    (Kind::GrpcStreamFull, 12),
    (Kind::GrpcStreamDrop, 4),
    (Kind::BadKeyRest, 3),
    (Kind::BadKeyGrpc, 2),
    (Kind::Malformed, 3),
];

fn kind_of(roll: u32) -> Kind {
    let mut roll = roll % 100;
    for (kind, share) in MIX {
        if roll < share {
            return kind;
        }
        roll -= share;
    }
    Kind::Json
}

/// SplitMix64: a reproducible sequence without another dependency.
fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// How a call ended, as the load generator saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Ok2xx,
    Client4xx,
    Rate429,
    Quota429,
    Server5xx,
    /// A stream the client dropped on purpose after its first chunk.
    Dropped,
    /// Transport error or timeout on the client's side.
    Failed,
}

const OUTCOMES: usize = 7;

impl Outcome {
    fn index(self) -> usize {
        self as usize
    }
}

/// Counters and latencies of the current interval, and totals.
#[derive(Default)]
struct Stats {
    interval: [AtomicU64; OUTCOMES],
    total: [AtomicU64; OUTCOMES],
    /// Calls the model served as far as the client can tell: JSON 2xx plus streams that
    /// began (200 / gRPC stream opened), dropped or not.
    served: AtomicU64,
    /// The same, per key.
    served_by_key: [AtomicU64; KEYS],
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    started: AtomicU64,
    /// Seconds into the run of the first quota refusal (0: none yet).
    first_quota_ms: AtomicU64,
    json_us: Mutex<Vec<u64>>,
    sse_first_us: Mutex<Vec<u64>>,
    grpc_us: Mutex<Vec<u64>>,
}

impl Stats {
    fn count(&self, outcome: Outcome) {
        if let Some(c) = self.interval.get(outcome.index()) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(c) = self.total.get(outcome.index()) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn served(&self, key: usize) {
        self.served.fetch_add(1, Ordering::Relaxed);
        if let Some(c) = self.served_by_key.get(key) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn latency(list: &Mutex<Vec<u64>>, took: Duration) {
        if let Ok(mut list) = list.lock() {
            list.push(u64::try_from(took.as_micros()).unwrap_or(u64::MAX));
        }
    }

    fn take(list: &Mutex<Vec<u64>>) -> Vec<u64> {
        let mut v = list
            .lock()
            .map(|mut l| std::mem::take(&mut *l))
            .unwrap_or_default();
        v.sort_unstable();
        v
    }
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let index = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted.get(index).copied().unwrap_or(0)
}

fn ms(us: u64) -> String {
    format!("{:.1}", us as f64 / 1000.0)
}

struct Ctx {
    url: String,
    keys: Vec<String>,
    http: reqwest::Client,
    channels: Vec<tonic::transport::Channel>,
    stats: Stats,
    run_start: Instant,
}

fn chat_body(n: u64, stream: bool, image: bool) -> Vec<u8> {
    let text = format!("Soak call {n}: describe the picture in one sentence, please.");
    let content = if image {
        json!([
            {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{PNG_1X1}")}},
            {"type": "text", "text": text}
        ])
    } else {
        json!(text)
    };
    let mut body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 8 + n % 25,
    });
    if stream {
        body["stream"] = json!(true);
    }
    serde_json::to_vec(&body).unwrap_or_default()
}

fn rest_outcome(status: reqwest::StatusCode, body: &str) -> Outcome {
    match status.as_u16() {
        200..=299 => Outcome::Ok2xx,
        429 if body.contains("insufficient_quota") => Outcome::Quota429,
        429 => Outcome::Rate429,
        400..=499 => Outcome::Client4xx,
        _ => Outcome::Server5xx,
    }
}

fn grpc_outcome(status: &tonic::Status) -> Outcome {
    use tonic::Code;
    match status.code() {
        Code::ResourceExhausted if status.message().contains("quota") => Outcome::Quota429,
        Code::ResourceExhausted => Outcome::Rate429,
        Code::InvalidArgument
        | Code::Unauthenticated
        | Code::PermissionDenied
        | Code::NotFound
        | Code::FailedPrecondition
        | Code::OutOfRange => Outcome::Client4xx,
        _ => Outcome::Server5xx,
    }
}

async fn one_call(ctx: Arc<Ctx>, n: u64) {
    let r = mix64(n);
    let kind = kind_of((r % 100) as u32);
    let key_index = ((r >> 8) % KEYS as u64) as usize;
    let key = ctx.keys.get(key_index).cloned().unwrap_or_default();
    let outcome = match kind {
        Kind::Json | Kind::JsonImage | Kind::SseFull | Kind::SseDrop | Kind::BadKeyRest => {
            rest_call(&ctx, n, kind, key_index, &key).await
        }
        Kind::Malformed => {
            let body: &[u8] = match n % 3 {
                0 => b"{\"model\": \"stepfun-ai/Step3-VL-10B\", \"messages\": [",
                1 => b"{\"model\": \"stepfun-ai/Step3-VL-10B\", \"messages\": \"hello\"}",
                _ => b"not json at all",
            };
            match ctx
                .http
                .post(format!("{}/v1/chat/completions", ctx.url))
                .bearer_auth(&key)
                .header("content-type", "application/json")
                .body(body.to_vec())
                .send()
                .await
            {
                Ok(resp) => {
                    let status = resp.status();
                    let text = resp.text().await.unwrap_or_default();
                    let outcome = rest_outcome(status, &text);
                    if outcome == Outcome::Ok2xx {
                        ctx.stats.served(key_index);
                    }
                    outcome
                }
                Err(_) => Outcome::Failed,
            }
        }
        Kind::GrpcUnary | Kind::GrpcStreamFull | Kind::GrpcStreamDrop | Kind::BadKeyGrpc => {
            grpc_call(&ctx, n, kind, key_index, &key).await
        }
    };
    if outcome == Outcome::Quota429 {
        let at = ctx.run_start.elapsed().as_millis() as u64;
        let _ = ctx.stats.first_quota_ms.compare_exchange(
            0,
            at.max(1),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }
    ctx.stats.count(outcome);
}

async fn rest_call(ctx: &Ctx, n: u64, kind: Kind, key_index: usize, key: &str) -> Outcome {
    let stream = matches!(kind, Kind::SseFull | Kind::SseDrop);
    let key = if kind == Kind::BadKeyRest {
        format!("sk-step3-bad-{n}")
    } else {
        key.to_owned()
    };
    let t = Instant::now();
    let response = match ctx
        .http
        .post(format!("{}/v1/chat/completions", ctx.url))
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .body(chat_body(n, stream, kind == Kind::JsonImage))
        .send()
        .await
    {
        Ok(r) => r,
        Err(_) => return Outcome::Failed,
    };
    let status = response.status();
    if !status.is_success() {
        let text = response.text().await.unwrap_or_default();
        return rest_outcome(status, &text);
    }
    ctx.stats.served(key_index);
    if !stream {
        return match response.bytes().await {
            Ok(_) => {
                Stats::latency(&ctx.stats.json_us, t.elapsed());
                Outcome::Ok2xx
            }
            Err(_) => Outcome::Failed,
        };
    }
    let mut body = response.bytes_stream();
    match body.next().await {
        Some(Ok(_)) => Stats::latency(&ctx.stats.sse_first_us, t.elapsed()),
        _ => return Outcome::Failed,
    }
    if kind == Kind::SseDrop {
        // Hang up mid-answer: the gateway must notice, charge what was served, free the slot.
        drop(body);
        return Outcome::Dropped;
    }
    while let Some(chunk) = body.next().await {
        if chunk.is_err() {
            return Outcome::Failed;
        }
    }
    Outcome::Ok2xx
}

async fn grpc_call(ctx: &Ctx, n: u64, kind: Kind, key_index: usize, key: &str) -> Outcome {
    let key = if kind == Kind::BadKeyGrpc {
        format!("sk-step3-bad-{n}")
    } else {
        key.to_owned()
    };
    let Ok(bearer) = format!("Bearer {key}").parse::<tonic::metadata::MetadataValue<_>>() else {
        return Outcome::Failed;
    };
    let Some(channel) = ctx.channels.get(n as usize % ctx.channels.len().max(1)) else {
        return Outcome::Failed;
    };
    let mut client = pb::chat_client::ChatClient::with_interceptor(
        channel.clone(),
        move |mut r: tonic::Request<()>| {
            r.metadata_mut().insert("authorization", bearer.clone());
            Ok(r)
        },
    );
    let request = pb::ChatRequest {
        model: MODEL.into(),
        messages: vec![pb::Message {
            role: "user".into(),
            text: format!("Soak call {n}: describe the picture in one sentence, please."),
            ..Default::default()
        }],
        max_tokens: Some(8 + (n % 25) as u32),
        ..Default::default()
    };
    let t = Instant::now();
    if matches!(kind, Kind::GrpcUnary | Kind::BadKeyGrpc) {
        return match client.complete(request).await {
            Ok(_) => {
                ctx.stats.served(key_index);
                Stats::latency(&ctx.stats.grpc_us, t.elapsed());
                Outcome::Ok2xx
            }
            Err(status) => grpc_outcome(&status),
        };
    }
    let mut stream = match client.stream_complete(request).await {
        Ok(s) => s.into_inner(),
        Err(status) => return grpc_outcome(&status),
    };
    ctx.stats.served(key_index);
    match stream.message().await {
        Ok(Some(_)) => {}
        Ok(None) => return Outcome::Ok2xx,
        Err(status) => return grpc_outcome(&status),
    }
    if kind == Kind::GrpcStreamDrop {
        drop(stream);
        return Outcome::Dropped;
    }
    loop {
        match stream.message().await {
            Ok(Some(_)) => {}
            Ok(None) => return Outcome::Ok2xx,
            Err(status) => return grpc_outcome(&status),
        }
    }
}

// ---------------------------------------------------------------- set-up

struct Setup {
    upstream: Proc,
    gateway: Proc,
    url: String,
    keys: Vec<String>,
    key_ids: Vec<String>,
    data_dir: PathBuf,
    _dir: tempfile::TempDir,
}

async fn setup(token_latency_ms: u64, secs: u64, rate: u64) -> anyhow::Result<Setup> {
    let dir = tempfile::tempdir()?;
    let cpu = std::env::var("SOAK_SERVER_CPU").ok();
    let Servers {
        upstream,
        gateway,
        gateway_url: url,
        data_dir,
        ..
    } = start_servers(dir.path(), cpu.as_deref(), token_latency_ms, ADMIN).await?;

    let http = reqwest::Client::new();
    let admin = |path: &str, body: Value| {
        http.post(format!("{url}/admin/v1/{path}"))
            .bearer_auth(ADMIN)
            .json(&body)
            .send()
    };
    let mut users = Vec::new();
    for name in ["alpha", "beta", "gamma", "delta"] {
        let user: Value = admin("users", json!({"name": name}))
            .await?
            .error_for_status()?
            .json()
            .await?;
        users.push(user["id"].as_str().context("no user id")?.to_owned());
    }
    // The quota key gets about rate/KEYS calls a second, ~85% of them served, at ~45 tokens
    // each (prompt ~15, completion 8..32): a quota for half the run.
    let per_key = rate as f64 / KEYS as f64;
    let token_quota = (per_key * secs as f64 / 2.0 * 0.85 * 45.0).max(500.0) as u64;
    let (mut keys, mut key_ids) = (Vec::new(), Vec::new());
    for i in 0..KEYS {
        let user = users.get(i / 5).context("user")?;
        let mut body = json!({"user_id": user, "name": format!("soak-{i}")});
        if RPM_KEYS.contains(&i) {
            body["rpm_limit"] = json!(RPM_LIMITED);
        }
        if i == QUOTA_KEY {
            body["token_quota"] = json!(token_quota);
        }
        if i % 5 == 1 {
            // Limits that do not bind, so their bookkeeping runs too.
            body["tpm_limit"] = json!(100_000_000u64);
            body["max_concurrent"] = json!(10_000);
            body["request_quota"] = json!(1_000_000_000u64);
            body["image_quota"] = json!(1_000_000u64);
        }
        let key: Value = admin("keys", body)
            .await?
            .error_for_status()?
            .json()
            .await?;
        keys.push(key["secret"].as_str().context("no secret")?.to_owned());
        key_ids.push(key["id"].as_str().context("no key id")?.to_owned());
    }
    println!(
        "keys: {KEYS} over 4 users; keys {}..{} rpm_limit {RPM_LIMITED}; key {QUOTA_KEY} token_quota {token_quota}",
        RPM_KEYS.start,
        RPM_KEYS.end - 1
    );
    Ok(Setup {
        upstream,
        gateway,
        url,
        keys,
        key_ids,
        data_dir,
        _dir: dir,
    })
}

// ---------------------------------------------------------------- the run

struct Sample {
    at: f64,
    rss: f64,
    fds: usize,
}

fn print_header() {
    println!(
        "| t s | RSS MiB | fds | thr | 2xx | 4xx | 429 rate | 429 quota | 5xx | dropped | fail | in-flight max | JSON p50/p99 ms | SSE 1st p50/p99 ms | gRPC unary p50/p99 ms | data dir MiB | load avg |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
}

fn sample_row(ctx: &Ctx, gateway: &Proc, data_dir: &Path, at: f64) -> Sample {
    let counts: Vec<u64> = ctx
        .stats
        .interval
        .iter()
        .map(|c| c.swap(0, Ordering::Relaxed))
        .collect();
    let c = |o: Outcome| counts.get(o.index()).copied().unwrap_or(0);
    let json = Stats::take(&ctx.stats.json_us);
    let sse = Stats::take(&ctx.stats.sse_first_us);
    let grpc = Stats::take(&ctx.stats.grpc_us);
    let max_in_flight = ctx.stats.max_in_flight.swap(
        ctx.stats.in_flight.load(Ordering::Relaxed),
        Ordering::Relaxed,
    );
    let s = Sample {
        at,
        rss: gateway.rss_mib(),
        fds: gateway.fds(),
    };
    println!(
        "| {:.0} | {:.1} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} / {} | {} / {} | {} / {} | {:.1} | {} |",
        at,
        s.rss,
        s.fds,
        gateway.threads(),
        c(Outcome::Ok2xx),
        c(Outcome::Client4xx),
        c(Outcome::Rate429),
        c(Outcome::Quota429),
        c(Outcome::Server5xx),
        c(Outcome::Dropped),
        c(Outcome::Failed),
        max_in_flight,
        ms(percentile(&json, 0.5)),
        ms(percentile(&json, 0.99)),
        ms(percentile(&sse, 0.5)),
        ms(percentile(&sse, 0.99)),
        ms(percentile(&grpc, 0.5)),
        ms(percentile(&grpc, 0.99)),
        dir_size(data_dir) as f64 / (1024.0 * 1024.0),
        load_average(),
    );
    s
}

/// Sums a Prometheus counter family's samples whose labels contain every `filters` entry.
fn metric_sum(text: &str, name: &str, filters: &[&str]) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l.as_bytes().get(name.len()) == Some(&b'{'))
        .filter(|l| filters.iter().all(|f| l.contains(f)))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let secs: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(600);
    let rate: u64 = args
        .get(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(200)
        .max(1);
    let every: u64 = std::env::var("SOAK_SAMPLE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15)
        .max(1);
    if args.get(1).map(String::as_str) == Some("store") {
        let calls: u64 = args
            .get(2)
            .and_then(|s| s.parse().ok())
            .unwrap_or(1_000_000);
        return store_only(calls);
    }
    let token_latency: u64 = std::env::var("SOAK_TOKEN_LATENCY_MS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);

    let s = setup(token_latency, secs, rate).await?;
    println!(
        "soak: {secs} s at {rate} calls/s (open loop), simulator {token_latency} ms/token, sample every {every} s; gateway pid {}, {} CPUs, load avg at start {}",
        s.gateway.pid(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load_average()
    );
    println!(
        "mix per 100: {}",
        MIX.iter()
            .map(|(k, n)| format!("{k:?} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut channels = Vec::new();
    for _ in 0..4 {
        channels.push(
            tonic::transport::Endpoint::from_shared(s.url.clone())?
                .tcp_nodelay(true)
                .connect()
                .await?,
        );
    }
    let ctx = Arc::new(Ctx {
        url: s.url.clone(),
        keys: s.keys.clone(),
        http: reqwest::Client::builder()
            .tcp_nodelay(true)
            .timeout(Duration::from_secs(60))
            .build()?,
        channels,
        stats: Stats::default(),
        run_start: Instant::now(),
    });
    let cpu_start = s.gateway.cpu_seconds();
    print_header();
    let idle = sample_row(&ctx, &s.gateway, &s.data_dir, 0.0);

    let start = Instant::now();
    let period = Duration::from_secs_f64(1.0 / rate as f64);
    let total_calls = secs * rate;
    let mut samples: Vec<Sample> = Vec::new();
    let mut next_sample = start + Duration::from_secs(every);
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..total_calls {
        // Open loop: call n starts at n/rate seconds, whatever earlier calls are doing.
        let due = start + period.mul_f64(n as f64);
        if due > Instant::now() {
            tokio::time::sleep_until(due.into()).await;
        }
        if Instant::now() >= next_sample {
            samples.push(sample_row(
                &ctx,
                &s.gateway,
                &s.data_dir,
                start.elapsed().as_secs_f64(),
            ));
            next_sample += Duration::from_secs(every);
        }
        let ctx2 = ctx.clone();
        ctx.stats.started.fetch_add(1, Ordering::Relaxed);
        let now = ctx.stats.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        ctx.stats.max_in_flight.fetch_max(now, Ordering::Relaxed);
        tasks.spawn(async move {
            one_call(ctx2.clone(), n).await;
            ctx2.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let elapsed = start.elapsed().as_secs_f64();
    samples.push(sample_row(&ctx, &s.gateway, &s.data_dir, elapsed));
    let gateway_cpu = s.gateway.cpu_seconds() - cpu_start;

    // Let the gateway settle and the store catch up (flush every 500 ms).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after_idle = Sample {
        at: start.elapsed().as_secs_f64(),
        rss: s.gateway.rss_mib(),
        fds: s.gateway.fds(),
    };

    // ------------------------------------------------------------ summary
    let total = |o: Outcome| {
        ctx.stats
            .total
            .get(o.index())
            .map_or(0, |c| c.load(Ordering::Relaxed))
    };
    let started = ctx.stats.started.load(Ordering::Relaxed);
    println!(
        "\ncalls: {started} started in {elapsed:.0} s ({:.1}/s); 2xx {}, 4xx {}, 429 rate {}, 429 quota {} (first at {:.0} s), 5xx {}, dropped streams {}, client-side failures {}",
        started as f64 / elapsed,
        total(Outcome::Ok2xx),
        total(Outcome::Client4xx),
        total(Outcome::Rate429),
        total(Outcome::Quota429),
        ctx.stats.first_quota_ms.load(Ordering::Relaxed) as f64 / 1000.0,
        total(Outcome::Server5xx),
        total(Outcome::Dropped),
        total(Outcome::Failed),
    );
    println!(
        "gateway CPU: {gateway_cpu:.1} s over the run ({:.0} µs per call started); simulator RSS {:.1} MiB",
        gateway_cpu * 1e6 / started.max(1) as f64,
        s.upstream.rss_mib()
    );
    let stat = |f: &dyn Fn(&Sample) -> f64| {
        let first = samples.first().map_or(0.0, f);
        let last = samples.last().map_or(0.0, f);
        let max = samples.iter().map(f).fold(0.0, f64::max);
        (first, last, max)
    };
    let rss = stat(&|x: &Sample| x.rss);
    let fds = stat(&|x: &Sample| x.fds as f64);
    println!(
        "RSS MiB: idle {:.1}; first sample {:.1}, last {:.1}, max {:.1}; 3 s after the load {:.1}",
        idle.rss, rss.0, rss.1, rss.2, after_idle.rss
    );
    println!(
        "fds: idle {}; first sample {:.0}, last {:.0}, max {:.0}; 3 s after the load {}",
        idle.fds, fds.0, fds.1, fds.2, after_idle.fds
    );
    // Levels off: growth over the second half no more than a tenth of the first half's
    // (with 2 MiB of slack for allocator noise); fds: the second half's peak no higher than
    // the first half's by more than 10% + 8.
    let half = elapsed / 2.0;
    let at_or_before = |t: f64| samples.iter().rev().find(|x| x.at <= t + 0.5);
    let mid = at_or_before(half).map_or(rss.0, |x| x.rss);
    let (first_growth, second_growth) = (mid - rss.0, rss.1 - mid);
    let rss_ok = second_growth <= (first_growth.max(0.0) * 0.1).max(2.0);
    let fd_peak = |range: &dyn Fn(f64) -> bool| {
        samples
            .iter()
            .filter(|x| range(x.at))
            .map(|x| x.fds)
            .max()
            .unwrap_or(0)
    };
    let (fd1, fd2) = (fd_peak(&|t| t <= half), fd_peak(&|t| t > half));
    let fds_ok = fd2 as f64 <= fd1 as f64 * 1.1 + 8.0;
    println!(
        "levels off: RSS {} (first half +{first_growth:.1} MiB, second half {second_growth:+.1} MiB); fds {} (peak {fd1} in the first half, {fd2} in the second)",
        if rss_ok { "YES" } else { "NO" },
        if fds_ok { "YES" } else { "NO" },
    );

    // ------------------------------------------------------------ the books
    let http = reqwest::Client::new();
    let mut charged_sum = 0;
    let served = ctx.stats.served.load(Ordering::Relaxed);
    let mut mismatched_keys = Vec::new();
    // The store writes usage in batches: wait until two reads agree.
    let mut previous = u64::MAX;
    for _ in 0..20 {
        charged_sum = 0;
        mismatched_keys.clear();
        for (i, id) in s.key_ids.iter().enumerate() {
            let usage: Value = http
                .get(format!("{}/admin/v1/keys/{id}/usage", s.url))
                .bearer_auth(ADMIN)
                .send()
                .await?
                .json()
                .await?;
            let charged = usage["requests"].as_u64().unwrap_or(0);
            let seen = ctx
                .stats
                .served_by_key
                .get(i)
                .map_or(0, |c| c.load(Ordering::Relaxed));
            if charged != seen {
                mismatched_keys.push(format!("key {i}: gateway {charged}, client {seen}"));
            }
            charged_sum += charged;
        }
        if charged_sum == previous {
            break;
        }
        previous = charged_sum;
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    let metrics = http
        .get(format!("{}/metrics", s.url))
        .send()
        .await?
        .text()
        .await?;
    let calls_total = metric_sum(&metrics, "step3gw_calls_total", &[]);
    let charging = [
        "completed",
        "timed_out",
        "stream_incomplete",
        "client_disconnected",
    ]
    .iter()
    .map(|o| {
        metric_sum(
            &metrics,
            "step3gw_calls_total",
            &[&format!("outcome=\"{o}\"")],
        )
    })
    .collect::<Vec<_>>();
    let metrics_charged: u64 = charging.iter().sum();
    let disconnected = charging.get(3).copied().unwrap_or(0);
    let failed = total(Outcome::Failed);
    println!(
        "books: client saw {served} calls served (JSON 2xx + streams begun); gateway charged {charged_sum} requests (admin usage, {KEYS} keys summed); /metrics step3gw_calls_total {calls_total} settled, {metrics_charged} with a charging outcome ({disconnected} client_disconnected); client-side failures {failed}"
    );
    let books_ok = charged_sum == served && metrics_charged == served;
    let within =
        charged_sum.abs_diff(served) <= failed && metrics_charged.abs_diff(served) <= failed;
    println!(
        "books balance: {}{}",
        if books_ok {
            "YES (exact)"
        } else if within {
            "within the client-side failures (calls the client lost sight of)"
        } else {
            "NO"
        },
        if mismatched_keys.is_empty() {
            String::new()
        } else {
            format!("; per key: {}", mismatched_keys.join("; "))
        }
    );
    println!(
        "gateway refusals (/metrics step3gw_refusals_total): rate {}, quota {}; load avg at the end {}",
        metric_sum(&metrics, "step3gw_refusals_total", &["reason=\"rate\""]),
        metric_sum(&metrics, "step3gw_refusals_total", &["reason=\"quota\""]),
        load_average()
    );
    drop(ctx);
    Ok(())
}

/// `soak store N`: the store alone, in this process: N call records written in batches of 200
/// (as the gateway's writer does), with this process's RSS and the data dir's size printed
/// along the way, to tell the store's growth from the gateway's.
fn store_only(calls: u64) -> anyhow::Result<()> {
    use step3_gateway::core::records::{CallOutcome, CallRecord, Usage};
    use step3_gateway::core::store::Store;
    let dir = tempfile::tempdir()?;
    let store = step3_gateway::store::SledStore::open(dir.path())?;
    let self_rss = || {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
                line.split_whitespace().nth(1)?.parse::<u64>().ok()
            })
            .unwrap_or(0) as f64
            / 1024.0
    };
    println!("| calls written | RSS MiB | data dir MiB |");
    println!("|---|---|---|");
    println!("| 0 | {:.1} | {:.1} |", self_rss(), 0.0);
    let base = 1_800_000_000_000_000i64;
    let started = Instant::now();
    let every = (calls / 20).max(200);
    let mut n = 0u64;
    while n < calls {
        let batch: Vec<CallRecord> = (n..(n + 200).min(calls))
            .map(|i| CallRecord {
                at_micros: base + i as i64 * 5_000,
                request_id: format!("{:032x}", mix64(i)),
                key_id: format!("key_{:024x}", mix64(i % 20) >> 32),
                user_id: format!("usr_{:024x}", mix64(i % 4) >> 32),
                model: MODEL.into(),
                version: None,
                cost: Default::default(),
                status: 200,
                outcome: CallOutcome::Completed,
                stream: i % 2 == 0,
                latency_ms: 100,
                charged_request: true,
                usage: Usage {
                    prompt_tokens: 15,
                    completion_tokens: 20,
                },
                usage_estimated: false,
                images: 0,
                image_sizes: Vec::new(),
                request_body: None,
                response_body: None,
                client_addr: None,
                reservation: None,
                cache_hit: false,
            })
            .collect();
        n += batch.len() as u64;
        store.record_calls(&batch)?;
        if n.is_multiple_of(every) || n == calls {
            println!(
                "| {n} | {:.1} | {:.1} |",
                self_rss(),
                dir_size(dir.path()) as f64 / (1024.0 * 1024.0)
            );
        }
    }
    store.flush()?;
    println!(
        "{calls} calls in {:.1} s; RSS after flush {:.1} MiB",
        started.elapsed().as_secs_f64(),
        self_rss()
    );
    Ok(())
}
