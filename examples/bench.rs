//! The gateway's own cost, measured against calling the model server directly in the same
//! run: throughput, latency percentiles, CPU per request (from /proc) and memory.
//!
//! ```sh
//! cargo build --release --examples && scripts/bench.sh      # pins processes, writes a report
//! ```
//!
//! It starts, as separate processes, the simulated STEP3-VL server (no token latency), the
//! gateway (every check on: a key with rpm/tpm/concurrency limits, request/token/image quotas,
//! usage recording, call log, metrics) and, when nginx is installed, nginx with `proxy_pass`
//! and keep-alive to the same server. Then it loads each target for the same time, in
//! alternating rounds, and prints one table.
#![expect(clippy::print_stdout, reason = "a benchmark prints its report")]

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use serde_json::{Value, json};
use step3_gateway::grpc::pb;

#[allow(dead_code, reason = "shared with the soak run, which uses other parts")]
mod common;
use common::{Proc, Servers, free_port, pinned, start_gateway, start_servers, wait_for};
use tokio::sync::Mutex;

const MODEL: &str = "stepfun-ai/Step3-VL-10B";
const ADMIN: &str = "bench-admin-token-0123456789";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Json,
    Sse,
    GrpcUnary,
    GrpcStream,
    /// REST JSON, always the same deterministic request (temperature 0): a cache hit.
    CachedJson,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Json => "REST JSON",
            Kind::Sse => "REST SSE (20 chunks)",
            Kind::GrpcUnary => "gRPC unary",
            Kind::GrpcStream => "gRPC stream (20 chunks)",
            Kind::CachedJson => "REST JSON, one cached answer",
        }
    }
}

struct Setup {
    upstream: Proc,
    gateway: Proc,
    nginx: Option<Proc>,
    /// `examples/bare_proxy`: axum in, reqwest out, no checks — the stack's own floor.
    bare: Option<(Proc, String)>,
    upstream_url: String,
    gateway_url: String,
    nginx_url: Option<String>,
    key: String,
    dir: tempfile::TempDir,
}

async fn setup(cpu: &str, token_latency_ms: u64) -> anyhow::Result<Setup> {
    setup_with_keys(cpu, token_latency_ms, 0)
        .await
        .map(|(s, _)| s)
}

/// Like [`setup`], with `extra_keys` more keys (of another user) already in the store; also
/// returns how long the gateway took from its start to answering `/health`.
async fn setup_with_keys(
    cpu: &str,
    token_latency_ms: u64,
    extra_keys: usize,
) -> anyhow::Result<(Setup, Duration)> {
    let dir = tempfile::tempdir()?;
    if extra_keys > 0 {
        fill_store(&dir.path().join("data"), extra_keys)?;
    }
    let Servers {
        upstream,
        upstream_url,
        gateway,
        gateway_url,
        start_up,
        ..
    } = start_servers(dir.path(), Some(cpu), token_latency_ms, ADMIN).await?;
    let key = bench_key(&gateway_url).await?;

    let (nginx, nginx_url) = match start_nginx(cpu, dir.path(), &upstream_url).await {
        Ok((proc, url)) => (Some(proc), Some(url)),
        Err(e) => {
            println!("(nginx not measured: {e:#})");
            (None, None)
        }
    };
    let bare = match start_bare(cpu, &upstream_url).await {
        Ok(bare) => Some(bare),
        Err(e) => {
            println!("(bare axum proxy not measured: {e:#})");
            None
        }
    };
    Ok((
        Setup {
            upstream,
            gateway,
            nginx,
            bare,
            upstream_url,
            gateway_url,
            nginx_url,
            key,
            dir,
        },
        start_up,
    ))
}

/// A user and a key on the gateway at `gateway_url` with every check on, none binding.
async fn bench_key(gateway_url: &str) -> anyhow::Result<String> {
    let http = reqwest::Client::new();
    let user: Value = http
        .post(format!("{gateway_url}/admin/v1/users"))
        .bearer_auth(ADMIN)
        .json(&json!({"name": "bench", "rpm_limit": 100_000_000, "max_concurrent": 100_000}))
        .send()
        .await?
        .json()
        .await?;
    // Every check on, none of them binding.
    let key: Value = http
        .post(format!("{gateway_url}/admin/v1/keys"))
        .bearer_auth(ADMIN)
        .json(&json!({
            "user_id": user["id"], "rpm_limit": 100_000_000, "tpm_limit": 100_000_000_000u64,
            "max_concurrent": 100_000, "request_quota": 1_000_000_000_000u64,
            "token_quota": 1_000_000_000_000_000u64, "image_quota": 1_000_000, "models": [MODEL]
        }))
        .send()
        .await?
        .json()
        .await?;
    Ok(key["secret"].as_str().context("no key")?.to_owned())
}

/// `durability [seconds] [rounds]`: the same load through two gateways in front of one
/// simulator, one per `store.durability` mode, in alternating rounds (the order swapped each
/// round); per target the median over the rounds of each figure, and what each mode adds to
/// calling the simulator directly, measured in the same round.
async fn durability(cpu: &str, seconds: f64, rounds: usize, other: &str) -> anyhow::Result<()> {
    let other: &'static str = match other {
        "flush_interval" => "flush_interval",
        "reservations_synced" => "reservations_synced",
        _ => bail!("compare the default with flush_interval or reservations_synced"),
    };
    let lines = format!("durability = \"{other}\"\n");
    compare(cpu, seconds, rounds, "reservations", (other, lines), None).await
}

/// sled against the shared store (Postgres at `BENCH_POSTGRES_URL`, Redis at
/// `BENCH_REDIS_URL`, both on this machine), then Redis's own cost per call.
async fn shared(cpu: &str, seconds: f64, rounds: usize) -> anyhow::Result<()> {
    let postgres = std::env::var("BENCH_POSTGRES_URL").context("BENCH_POSTGRES_URL")?;
    let redis = std::env::var("BENCH_REDIS_URL").context("BENCH_REDIS_URL")?;
    let lines = format!(
        // A generous deadline: on a loaded machine a slow fsync is not an outage.
        "backend = \"shared\"\npostgres_url = \"{postgres}\"\nredis_url = \"{redis}\"\n\
         timeout_ms = 10000\n"
    );
    compare(
        cpu,
        seconds,
        rounds,
        "sled",
        ("shared", lines),
        Some(&redis),
    )
    .await
}

/// Redis round trips and Redis CPU per call: 2,000 JSON calls, one at a time, after
/// Redis's statistics are reset.
async fn redis_cost(gateway_url: &str, key: &str, redis_url: &str) -> anyhow::Result<()> {
    let client = redis::Client::open(redis_url)?;
    let mut redis = client.get_multiplexed_async_connection().await?;
    let info = async |redis: &mut redis::aio::MultiplexedConnection, section: &str| {
        redis::cmd("INFO")
            .arg(section)
            .query_async::<String>(redis)
            .await
    };
    let cpu = |info: &str| -> f64 {
        info.lines()
            .filter_map(|l| {
                l.strip_prefix("used_cpu_sys:")
                    .or(l.strip_prefix("used_cpu_user:"))
            })
            .filter_map(|v| v.trim().parse::<f64>().ok())
            .sum()
    };
    let http = reqwest::Client::new();
    let n = 2000;
    redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async::<()>(&mut redis)
        .await?;
    let cpu_before = cpu(&info(&mut redis, "cpu").await?);
    for _ in 0..n {
        http.post(format!("{gateway_url}/v1/chat/completions"))
            .bearer_auth(key)
            .json(&json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await?
            .error_for_status()?;
    }
    // Settlements are sent without waiting: let the last ones arrive.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cpu_after = cpu(&info(&mut redis, "cpu").await?);
    let stats = info(&mut redis, "commandstats").await?;
    let calls_of = |prefix: &str| -> u64 {
        stats
            .lines()
            .filter(|l| l.starts_with(prefix) && !l.starts_with("cmdstat_info:"))
            .filter_map(|l| {
                l.split("calls=")
                    .nth(1)?
                    .split(',')
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .sum()
    };
    // A script is one round trip (EVALSHA, or EVAL when Redis did not have it yet); the
    // commands it runs inside Redis are counted too.
    let round_trips = calls_of("cmdstat_evalsha:") + calls_of("cmdstat_eval:");
    println!(
        "\nRedis, {n} JSON calls one at a time: {:.2} round trips per call, {:.1} commands \
         run per call (scripts' included), {:.1} µs of Redis CPU per call",
        round_trips as f64 / n as f64,
        calls_of("cmdstat_") as f64 / n as f64,
        (cpu_after - cpu_before) * 1e6 / n as f64,
    );
    Ok(())
}

/// Two gateways on one simulator, `base` as `start_servers` sets it up and `other` with
/// `lines` added to its `[store]`; medians over the rounds. With `redis`, then Redis's
/// cost per call of the other gateway.
async fn compare(
    cpu: &str,
    seconds: f64,
    rounds: usize,
    base: &'static str,
    (other, lines): (&'static str, String),
    redis: Option<&str>,
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let servers = start_servers(dir.path(), Some(cpu), 0, ADMIN).await?;
    let durable_key = bench_key(&servers.gateway_url).await?;
    // The second gateway: the same configuration but for its port, its data dir and its mode.
    let port = free_port()?;
    let config = std::fs::read_to_string(&servers.config)?
        .replace(
            &servers.gateway_url.replace("http://", ""),
            &format!("127.0.0.1:{port}"),
        )
        .replace(
            &servers.data_dir.display().to_string(),
            &dir.path()
                .join(format!("data-{other}"))
                .display()
                .to_string(),
        )
        .replace("[store]\n", &format!("[store]\n{lines}"));
    let other_config = dir.path().join("fast.toml");
    std::fs::write(&other_config, config)?;
    let other_url = format!("http://127.0.0.1:{port}");
    let (other_gateway, _) = start_gateway(Some(cpu), &other_config, &other_url).await?;
    let other_key = bench_key(&other_url).await?;
    println!(
        "{seconds} s per point, {rounds} rounds; medians over the rounds; latency: JSON whole \
         answer, streams first chunk; added = the gateway's figure minus the direct call's of \
         the same round\n"
    );
    println!(
        "| case | conns | target | req/s | p50 µs | p99 µs | added p50 µs | added p99 µs | CPU µs/call |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let cases = [
        (Kind::Json, 1),
        (Kind::Json, 16),
        (Kind::Sse, 1),
        (Kind::Sse, 16),
        (Kind::GrpcUnary, 16),
    ];
    let gateways = [
        (
            other,
            &other_gateway,
            other_url.as_str(),
            other_key.as_str(),
        ),
        (
            base,
            &servers.gateway,
            servers.gateway_url.as_str(),
            durable_key.as_str(),
        ),
    ];
    for (kind, conns) in cases {
        // target → per round: (rps, p50, p99, added p50, added p99, cpu)
        let mut figures: Vec<(&str, Vec<[f64; 6]>)> = vec![
            ("direct", Vec::new()),
            (gateways[0].0, Vec::new()),
            (gateways[1].0, Vec::new()),
        ];
        for round in 0..rounds {
            let direct = measure(
                "direct",
                Some(&servers.upstream),
                Kind::Json.max_rest(kind),
                &servers.upstream_url,
                &durable_key,
                conns,
                seconds,
            )
            .await?;
            let mut order = [0, 1];
            if round % 2 == 1 {
                order.reverse();
            }
            for i in order {
                let (name, proc, url, key) = gateways[i];
                let m = measure(name, Some(proc), kind, url, key, conns, seconds).await?;
                figures[i + 1].1.push([
                    m.rps,
                    m.p50 as f64,
                    m.p99 as f64,
                    m.p50 as f64 - direct.p50 as f64,
                    m.p99 as f64 - direct.p99 as f64,
                    m.cpu_us.unwrap_or(f64::NAN),
                ]);
            }
            figures[0].1.push([
                direct.rps,
                direct.p50 as f64,
                direct.p99 as f64,
                0.0,
                0.0,
                direct.cpu_us.unwrap_or(f64::NAN),
            ]);
        }
        for (target, rows) in &figures {
            let median = |i: usize| {
                let mut v: Vec<f64> = rows.iter().map(|r| r[i]).collect();
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            };
            let added = if *target == "direct" {
                "—|—".to_owned()
            } else {
                format!("{:.0} | {:.0}", median(3), median(4))
            };
            println!(
                "| {} | {conns} | {target} | {:.0} | {:.0} | {:.0} | {added} | {:.1} |",
                kind.name(),
                median(0),
                median(1),
                median(2),
                median(5)
            );
        }
    }
    if let Some(redis) = redis {
        redis_cost(&other_url, &other_key, redis).await?;
    }
    Ok(())
}

/// Writes one user and `n` keys (each with limits and quotas, as an operator would give)
/// straight into a new store at `path`.
fn fill_store(path: &Path, n: usize) -> anyhow::Result<()> {
    use step3_gateway::core::keys;
    use step3_gateway::core::limits::{KeyLimits, UserLimits};
    use step3_gateway::core::records::{KeyRecord, UserRecord};
    use step3_gateway::core::store::Store;
    use step3_gateway::core::time::now_unix;
    let store = step3_gateway::store::SledStore::open(path)?;
    let now = now_unix();
    let user = UserRecord {
        id: keys::generate_id("usr"),
        name: "filler".into(),
        email: None,
        subject: None,
        active: true,
        limits: UserLimits {
            rpm_limit: Some(600),
            tpm_limit: None,
            max_concurrent: Some(8),
            ..UserLimits::default()
        },
        created_at: now,
        updated_at: now,
    };
    store.put_user(&user)?;
    for i in 0..n {
        let secret = keys::generate_secret();
        store.put_key(&KeyRecord {
            id: keys::generate_id("key"),
            user_id: user.id.clone(),
            name: format!("filler-{i}"),
            prefix: keys::display_prefix(&secret),
            hash: keys::to_hex(&keys::hash_secret(&secret)),
            limits: KeyLimits {
                rpm_limit: Some(60),
                tpm_limit: Some(100_000),
                max_concurrent: Some(4),
                request_quota: Some(1_000),
                token_quota: Some(1_000_000),
                image_quota: None,
                max_images_per_request: None,
                ..KeyLimits::default()
            },
            expires_at: None,
            models: None,
            active: true,
            created_at: now,
            updated_at: now,
            revoked_at: None,
            previous_hash: None,
            previous_valid_until: None,
        })?;
    }
    store.flush()?;
    Ok(())
}

/// The same JSON load through a gateway whose store holds the bench key only and through
/// one whose store holds `n` more keys, in alternating rounds: start-up time, RSS, and the
/// p50 / CPU per call of each.
async fn many_keys(cpu: &str, n: usize, seconds: f64, rounds: usize) -> anyhow::Result<()> {
    let filling = Instant::now();
    let (big, big_start) = setup_with_keys(cpu, 0, n).await?;
    let filled_in = filling.elapsed().saturating_sub(big_start);
    let (small, small_start) = setup_with_keys(cpu, 0, 0).await?;
    println!(
        "store filled with {n} keys in {:.1} s",
        filled_in.as_secs_f64()
    );
    println!(
        "start-up to /health: {:.2} s with {n} keys, {:.2} s with 1 key",
        big_start.as_secs_f64(),
        small_start.as_secs_f64()
    );
    println!(
        "idle RSS: {:.1} MiB with {n} keys, {:.1} MiB with 1 key",
        big.gateway.rss_mib(),
        small.gateway.rss_mib()
    );
    let mut p50 = [Vec::new(), Vec::new()];
    let mut cpu_us = [Vec::new(), Vec::new()];
    for _ in 0..rounds {
        for (i, s) in [&small, &big].into_iter().enumerate() {
            let m = measure(
                "gateway",
                Some(&s.gateway),
                Kind::Json,
                &s.gateway_url,
                &s.key,
                1,
                seconds,
            )
            .await?;
            p50[i].push(m.p50);
            cpu_us[i].push(m.cpu_us.unwrap_or(0.0));
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    let mut p50: Vec<Vec<f64>> = p50
        .iter()
        .map(|v| v.iter().map(|&x| x as f64).collect())
        .collect();
    let (small_p50, big_p50) = (median(&mut p50[0]), median(&mut p50[1]));
    let (small_cpu, big_cpu) = (median(&mut cpu_us[0]), median(&mut cpu_us[1]));
    println!(
        "REST JSON @1, median of {rounds} rounds: p50 {small_p50:.0} µs with 1 key, {big_p50:.0} µs with {n} keys ({:.2}×); CPU/call {small_cpu:.1} vs {big_cpu:.1} µs ({:.2}×)",
        big_p50 / small_p50,
        big_cpu / small_cpu
    );
    println!(
        "RSS after the runs: {:.1} MiB with {n} keys, {:.1} MiB with 1 key",
        big.gateway.rss_mib(),
        small.gateway.rss_mib()
    );
    // The first start above replays the burst of writes that filled the store; a restart
    // is what an operator sees after that.
    let Setup {
        gateway,
        gateway_url,
        dir,
        ..
    } = big;
    drop(gateway);
    let (_gateway, restart) =
        start_gateway(Some(cpu), &dir.path().join("gateway.toml"), &gateway_url).await?;
    println!(
        "restart to /health with {n} keys: {:.2} s",
        restart.as_secs_f64()
    );
    Ok(())
}

async fn start_bare(cpu: &str, upstream_url: &str) -> anyhow::Result<(Proc, String)> {
    let program = std::env::current_exe()?.with_file_name("bare_proxy");
    let port = free_port()?;
    let child = pinned(Some(cpu), &program)
        .arg(format!("127.0.0.1:{port}"))
        .arg(upstream_url)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start bare_proxy (build with `cargo build --release --examples`)")?;
    let url = format!("http://127.0.0.1:{port}");
    wait_for(&format!("{url}/health")).await?;
    Ok((Proc { child }, url))
}

/// `cache [seconds] [rounds]`: what a cache hit costs. One deterministic request, answered
/// once by the simulator, then served again and again by the gateway's response cache and
/// by nginx's `proxy_cache` (keyed on the key and the body) in the same run, in alternating
/// rounds; the simulator generating every answer is the reference. Medians over the rounds.
async fn cache_hits(cpu: &str, seconds: f64, rounds: usize) -> anyhow::Result<()> {
    let s = setup(cpu, 0).await?;
    let (nginx, nginx_url) = start_nginx_cache(cpu, s.dir.path(), &s.upstream_url).await?;
    // Warm both caches, and check that the second call is a hit on each.
    let http = reqwest::Client::new();
    for (url, header, hit) in [
        (&s.gateway_url, "x-cache", "hit"),
        (&nginx_url, "x-cache-status", "HIT"),
    ] {
        post_chat(&http, url, &s.key, cached_body())
            .await?
            .bytes()
            .await?;
        let again = post_chat(&http, url, &s.key, cached_body()).await?;
        let seen = again.headers().get(header).cloned();
        again.bytes().await?;
        if seen.as_ref().and_then(|v| v.to_str().ok()) != Some(hit) {
            bail!("{url} did not answer from its cache: {header} = {seen:?}");
        }
    }
    println!(
        "{seconds} s per point, {rounds} alternating rounds, medians; one answer (24 tokens), REST JSON\n"
    );
    println!("| conns | target | req/s | p50 µs | p99 µs | target CPU µs/req |");
    println!("|---|---|---|---|---|---|");
    let targets: [(&'static str, &Proc, &str); 3] = [
        ("gateway, cache hit", &s.gateway, &s.gateway_url),
        ("nginx proxy_cache hit", &nginx, &nginx_url),
        ("simulator, generating", &s.upstream, &s.upstream_url),
    ];
    for conns in [1, 16] {
        let mut rows: Vec<Vec<Measured>> = targets.iter().map(|_| Vec::new()).collect();
        for round in 0..rounds {
            for i in 0..targets.len() {
                // The order turns each round, so no target always runs first.
                let i = (i + round) % targets.len();
                let (name, proc, url) = targets[i];
                let m = measure(
                    name,
                    Some(proc),
                    Kind::CachedJson,
                    url,
                    &s.key,
                    conns,
                    seconds,
                )
                .await?;
                rows[i].push(m);
            }
        }
        for runs in rows {
            let median = |f: &dyn Fn(&Measured) -> f64| {
                let mut v: Vec<f64> = runs.iter().map(f).collect();
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            };
            println!(
                "| {conns} | {} | {:.0} | {:.0} | {:.0} | {:.1} |",
                runs[0].target,
                median(&|m| m.rps),
                median(&|m| m.p50 as f64),
                median(&|m| m.p99 as f64),
                median(&|m| m.cpu_us.unwrap_or(0.0)),
            );
        }
    }
    let metrics = http
        .get(format!("{}/metrics", s.gateway_url))
        .send()
        .await?
        .text()
        .await?;
    let hits = metrics
        .lines()
        .find_map(|l| l.strip_prefix("step3gw_cache_hits_total "))
        .unwrap_or("?");
    println!(
        "
gateway: {hits} cache hits; RSS {:.1} MiB",
        s.gateway.rss_mib()
    );
    Ok(())
}

/// nginx with `proxy_cache` in front of the simulator: POST answers kept by key and body.
async fn start_nginx_cache(
    cpu: &str,
    dir: &Path,
    upstream_url: &str,
) -> anyhow::Result<(Proc, String)> {
    let upstream = upstream_url.trim_start_matches("http://");
    run_nginx(cpu, dir, "nginx-cache", |port, dir| {
        format!(
            "worker_processes 1;\ndaemon off;\npid {dir}/nginx-cache.pid;\nerror_log {dir}/nginx-cache.err warn;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {dir};\n  proxy_temp_path {dir};\n\
             proxy_cache_path {dir}/nginx-cache levels=1:2 keys_zone=answers:10m inactive=60m use_temp_path=off;\n\
             upstream sim {{ server {upstream}; keepalive 64; }}\n\
             server {{\n listen 127.0.0.1:{port};\n client_body_buffer_size 64k;\n location / {{\n\
             proxy_pass http://sim;\n  proxy_http_version 1.1;\n  proxy_set_header Connection \"\";\n\
             proxy_cache answers;\n  proxy_cache_methods POST;\n\
             proxy_cache_key \"$request_uri|$http_authorization|$request_body\";\n\
             proxy_cache_valid 200 60m;\n  proxy_ignore_headers Cache-Control Expires Set-Cookie;\n\
             add_header X-Cache-Status $upstream_cache_status;\n }}\n }}\n}}\n"
        )
    })
    .await
}

async fn start_nginx(cpu: &str, dir: &Path, upstream_url: &str) -> anyhow::Result<(Proc, String)> {
    let upstream = upstream_url.trim_start_matches("http://");
    run_nginx(cpu, dir, "nginx", |port, dir| {
        format!(
            "worker_processes 1;\ndaemon off;\npid {dir}/nginx.pid;\nerror_log {dir}/nginx.err warn;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {dir};\n  proxy_temp_path {dir};\n\
             upstream sim {{ server {upstream}; keepalive 64; }}\n\
             server {{\n listen 127.0.0.1:{port};\n location / {{\n  proxy_pass http://sim;\n\
             proxy_http_version 1.1;\n  proxy_set_header Connection \"\";\n  proxy_buffering off;\n }}\n }}\n}}\n"
        )
    })
    .await
}

/// Starts nginx pinned to `cpu` with the configuration `config(port, dir)` written to
/// `dir/<name>.conf`, and waits until it answers; its URL.
async fn run_nginx(
    cpu: &str,
    dir: &Path,
    name: &str,
    config: impl FnOnce(u16, std::path::Display<'_>) -> String,
) -> anyhow::Result<(Proc, String)> {
    let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.exists())
        .context("no nginx binary (apt-get install nginx)")?;
    let port = free_port()?;
    let conf = dir.join(format!("{name}.conf"));
    std::fs::write(&conf, config(port, dir.display()))?;
    let child = pinned(Some(cpu), nginx)
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let url = format!("http://127.0.0.1:{port}");
    wait_for(&format!("{url}/health")).await?;
    Ok((Proc { child }, url))
}

fn chat_body(stream: bool) -> Vec<u8> {
    let mut body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "Describe the picture in one sentence, please."}],
        "max_tokens": 20,
    });
    if stream {
        body["stream"] = json!(true);
    }
    serde_json::to_vec(&body).unwrap_or_default()
}

/// [`chat_body`] asking for the same answer every time: what the response cache keeps.
fn cached_body() -> Vec<u8> {
    let mut body: Value = serde_json::from_slice(&chat_body(false)).unwrap_or_default();
    body["temperature"] = json!(0);
    serde_json::to_vec(&body).unwrap_or_default()
}

/// The gRPC form of [`chat_body`].
fn grpc_request() -> pb::ChatRequest {
    pb::ChatRequest {
        model: MODEL.into(),
        messages: vec![pb::Message {
            role: "user".into(),
            text: "Describe the picture in one sentence, please.".into(),
            ..Default::default()
        }],
        max_tokens: Some(20),
        ..Default::default()
    }
}

/// Latencies (µs; for streams: to the first chunk) of one load run.
struct Run {
    latencies: Vec<u64>,
    requests: u64,
    seconds: f64,
}

async fn load(kind: Kind, url: &str, key: &str, conns: usize, seconds: f64) -> anyhow::Result<Run> {
    let stop = Arc::new(AtomicBool::new(false));
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let (stop, latencies, url, key) = (
            stop.clone(),
            latencies.clone(),
            url.to_owned(),
            key.to_owned(),
        );
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::with_capacity(100_000);
            match kind {
                Kind::Json | Kind::Sse | Kind::CachedJson => {
                    let client = reqwest::Client::builder()
                        .pool_max_idle_per_host(1)
                        .tcp_nodelay(true)
                        .build()?;
                    let body = match kind {
                        Kind::CachedJson => cached_body(),
                        _ => chat_body(kind == Kind::Sse),
                    };
                    while !stop.load(Ordering::Relaxed) {
                        let t = Instant::now();
                        let response = post_chat(&client, &url, &key, body.clone()).await?;
                        let mut stream = response.bytes_stream();
                        let mut first = None;
                        while let Some(chunk) = stream.next().await {
                            chunk?;
                            first.get_or_insert_with(|| t.elapsed());
                        }
                        let took = if kind == Kind::Sse {
                            first.unwrap_or_else(|| t.elapsed())
                        } else {
                            t.elapsed()
                        };
                        mine.push(u64::try_from(took.as_micros()).unwrap_or(u64::MAX));
                    }
                }
                Kind::GrpcUnary | Kind::GrpcStream => {
                    let mut client = grpc_client(&url, &key).await?;
                    let request = grpc_request();
                    while !stop.load(Ordering::Relaxed) {
                        let t = Instant::now();
                        let took = if kind == Kind::GrpcUnary {
                            client.complete(request.clone()).await?;
                            t.elapsed()
                        } else {
                            let mut stream =
                                client.stream_complete(request.clone()).await?.into_inner();
                            let mut first = None;
                            while let Some(chunk) = stream.next().await {
                                chunk?;
                                first.get_or_insert_with(|| t.elapsed());
                            }
                            first.unwrap_or_else(|| t.elapsed())
                        };
                        mine.push(u64::try_from(took.as_micros()).unwrap_or(u64::MAX));
                    }
                }
            }
            latencies.lock().await.extend(mine);
            anyhow::Ok(())
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await??;
    }
    let seconds = started.elapsed().as_secs_f64();
    let mut latencies = std::mem::take(&mut *latencies.lock().await);
    latencies.sort_unstable();
    Ok(Run {
        requests: latencies.len() as u64,
        latencies,
        seconds,
    })
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let index = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted.get(index).copied().unwrap_or(0)
}

/// One target's figures for one case.
struct Measured {
    target: &'static str,
    rps: f64,
    p50: u64,
    p99: u64,
    cpu_us: Option<f64>,
}

async fn measure(
    target: &'static str,
    proc: Option<&Proc>,
    kind: Kind,
    url: &str,
    key: &str,
    conns: usize,
    seconds: f64,
) -> anyhow::Result<Measured> {
    let before = proc.map(Proc::cpu_seconds);
    let run = load(kind, url, key, conns, seconds).await?;
    let cpu_us = match (proc, before) {
        (Some(proc), Some(before)) => {
            Some((proc.cpu_seconds() - before) * 1e6 / run.requests.max(1) as f64)
        }
        _ => None,
    };
    Ok(Measured {
        target,
        rps: run.requests as f64 / run.seconds,
        p50: percentile(&run.latencies, 0.5),
        p99: percentile(&run.latencies, 0.99),
        cpu_us,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let seconds: f64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(5.0);
    let rounds: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(2);
    let server_cpu = std::env::var("BENCH_SERVER_CPU").unwrap_or_else(|_| "0".into());
    if args.get(1).map(String::as_str) == Some("streams") {
        let n: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(4000);
        let grpc = args.get(3).map(String::as_str) == Some("grpc");
        return open_streams(&server_cpu, n, grpc).await;
    }
    if args.get(1).map(String::as_str) == Some("calls") {
        return calls(&args[2..]).await;
    }
    if args.get(1).map(String::as_str) == Some("tail") {
        let seconds: f64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(10.0);
        return tail(&server_cpu, seconds).await;
    }
    if args.get(1).map(String::as_str) == Some("full-load") {
        let seconds: f64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(300.0);
        return full_load(&server_cpu, seconds).await;
    }
    if args.get(1).map(String::as_str) == Some("durability") {
        let seconds: f64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(3.0);
        let rounds: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(5);
        let other = args.get(4).map_or("flush_interval", String::as_str);
        return durability(&server_cpu, seconds, rounds, other).await;
    }
    if args.get(1).map(String::as_str) == Some("shared") {
        let seconds: f64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(3.0);
        let rounds: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(5);
        return shared(&server_cpu, seconds, rounds).await;
    }
    if args.get(1).map(String::as_str) == Some("cache") {
        let seconds: f64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(3.0);
        let rounds: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(3);
        return cache_hits(&server_cpu, seconds, rounds).await;
    }
    if args.get(1).map(String::as_str) == Some("keys") {
        let n: usize = args
            .get(2)
            .and_then(|s| s.parse().ok())
            .unwrap_or(1_000_000);
        let seconds: f64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(5.0);
        let rounds: usize = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(3);
        return many_keys(&server_cpu, n, seconds, rounds).await;
    }
    let s = setup(&server_cpu, 0).await?;
    println!(
        "idle RSS: gateway {:.1} MiB, upstream {:.1} MiB",
        s.gateway.rss_mib(),
        s.upstream.rss_mib()
    );
    println!(
        "{seconds} s per point, {rounds} alternating rounds; latency: JSON whole answer, streams first chunk\n"
    );
    println!("| case | conns | target | req/s | p50 µs | p99 µs | target CPU µs/req |");
    println!("|---|---|---|---|---|---|---|");
    let cases = [
        (Kind::Json, 1),
        (Kind::Json, 16),
        (Kind::Sse, 1),
        (Kind::Sse, 16),
        (Kind::GrpcUnary, 16),
        (Kind::GrpcStream, 16),
    ];
    let mut summary = Vec::new();
    for (kind, conns) in cases {
        let mut rows: Vec<Vec<Measured>> = Vec::new();
        for _ in 0..rounds {
            let mut round = vec![
                measure(
                    "direct",
                    Some(&s.upstream),
                    Kind::Json.max_rest(kind),
                    &s.upstream_url,
                    &s.key,
                    conns,
                    seconds,
                )
                .await?,
            ];
            if let (Some(nginx), Some(url)) = (&s.nginx, &s.nginx_url)
                && matches!(kind, Kind::Json | Kind::Sse)
            {
                round.push(measure("nginx", Some(nginx), kind, url, &s.key, conns, seconds).await?);
            }
            if let Some((bare, url)) = &s.bare
                && matches!(kind, Kind::Json | Kind::Sse)
            {
                round.push(
                    measure("bare axum", Some(bare), kind, url, &s.key, conns, seconds).await?,
                );
            }
            round.push(
                measure(
                    "gateway",
                    Some(&s.gateway),
                    kind,
                    &s.gateway_url,
                    &s.key,
                    conns,
                    seconds,
                )
                .await?,
            );
            rows.push(round);
        }
        // The median round by gateway throughput stands for the case.
        rows.sort_by(|a, b| {
            a.last()
                .map(|m| m.rps)
                .partial_cmp(&b.last().map(|m| m.rps))
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        let round = rows.swap_remove(rows.len() / 2);
        for m in &round {
            println!(
                "| {} | {conns} | {} | {:.0} | {} | {} | {} |",
                kind.name(),
                m.target,
                m.rps,
                m.p50,
                m.p99,
                m.cpu_us.map_or("—".into(), |c| format!("{c:.1}"))
            );
        }
        summary.push((kind, conns, round));
    }
    println!("\nratios (same run):");
    for (kind, conns, round) in &summary {
        let find = |t: &str| round.iter().find(|m| m.target == t);
        if let (Some(direct), Some(gateway)) = (find("direct"), find("gateway")) {
            let mut line = format!(
                "  {} @{conns}: gateway adds {} µs at p50",
                kind.name(),
                gateway.p50 as i64 - direct.p50 as i64
            );
            for other in ["nginx", "bare axum"] {
                if let Some(m) = find(other) {
                    line.push_str(&format!(
                        "; vs {other}: CPU/req {:.2}×, req/s {:.2}×",
                        gateway.cpu_us.unwrap_or(0.0) / m.cpu_us.unwrap_or(f64::NAN),
                        gateway.rps / m.rps
                    ));
                }
            }
            println!("{line}");
        }
    }
    println!(
        "\nRSS after the runs: gateway {:.1} MiB",
        s.gateway.rss_mib()
    );
    Ok(())
}

/// REST JSON at 16 connections on the gateway for `seconds`, closed loop (as fast as it
/// answers), with a row every 15 s: the gateway's RSS, the data dir's size, the interval's
/// calls per second, p50 and p99, CPU per call and the load average. Whether memory levels
/// off under the heaviest logging the gateway can be given.
async fn full_load(cpu: &str, seconds: f64) -> anyhow::Result<()> {
    const EVERY: f64 = 15.0;
    let s = setup(cpu, 0).await?;
    let data = s.dir.path().join("data");
    println!(
        "| t s | RSS MiB | data dir MiB | calls/s | p50 µs | p99 µs | CPU µs/call | load avg |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let row = |t: f64, m: Option<&Measured>| {
        let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        let loadavg: Vec<&str> = loadavg.split_whitespace().take(3).collect();
        println!(
            "| {t:.0} | {:.1} | {:.1} | {} | {} | {} | {} | {} |",
            s.gateway.rss_mib(),
            dir_bytes(&data) as f64 / (1024.0 * 1024.0),
            m.map_or("—".into(), |m| format!("{:.0}", m.rps)),
            m.map_or("—".into(), |m| m.p50.to_string()),
            m.map_or("—".into(), |m| m.p99.to_string()),
            m.and_then(|m| m.cpu_us)
                .map_or("—".into(), |c| format!("{c:.1}")),
            loadavg.join(" ")
        );
    };
    row(0.0, None);
    let mut t = 0.0;
    while t < seconds {
        let m = measure(
            "gateway",
            Some(&s.gateway),
            Kind::Json,
            &s.gateway_url,
            &s.key,
            16,
            EVERY,
        )
        .await?;
        t += EVERY;
        row(t, Some(&m));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    println!("RSS 3 s after the load: {:.1} MiB", s.gateway.rss_mib());
    Ok(())
}

/// Where the 16-connection tail is: REST JSON on the gateway alone, each call's start and
/// length kept, then whether the calls at or over the p99 came one by one or together
/// (all connections held up at once: something took the CPU from the calls in flight).
async fn tail(cpu: &str, seconds: f64) -> anyhow::Result<()> {
    const CONNS: usize = 16;
    /// The window slow calls are counted in.
    const WINDOW_US: u64 = 10_000;
    let s = setup(cpu, 0).await?;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CONNS {
        let (url, key) = (s.gateway_url.clone(), s.key.clone());
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::builder()
                .pool_max_idle_per_host(1)
                .tcp_nodelay(true)
                .build()?;
            let body = chat_body(false);
            let mut mine: Vec<(u64, u64)> = Vec::with_capacity(200_000);
            while started.elapsed().as_secs_f64() < seconds {
                let t = Instant::now();
                post_chat(&client, &url, &key, body.clone())
                    .await?
                    .bytes()
                    .await?;
                let micros = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
                mine.push((micros(t - started), micros(t.elapsed())));
            }
            anyhow::Ok(mine)
        }));
    }
    let mut calls = Vec::new();
    for task in tasks {
        calls.extend(task.await??);
    }
    // The first second warms the pools and the writer; it is left out.
    calls.retain(|(start, _)| *start >= 1_000_000);
    let mut took: Vec<u64> = calls.iter().map(|(_, took)| *took).collect();
    took.sort_unstable();
    let p99 = percentile(&took, 0.99);
    println!(
        "{} calls at {CONNS} connections, {:.0}/s: p50 {} µs, p90 {} µs, p99 {p99} µs, \
         p99.9 {} µs, max {} µs",
        took.len(),
        took.len() as f64 / (seconds - 1.0),
        percentile(&took, 0.5),
        percentile(&took, 0.9),
        percentile(&took, 0.999),
        took.last().copied().unwrap_or(0),
    );
    let mut windows: std::collections::BTreeMap<u64, usize> = Default::default();
    for (start, _) in calls.iter().filter(|(_, took)| *took >= p99) {
        *windows.entry(start / WINDOW_US).or_default() += 1;
    }
    let slow: usize = windows.values().sum();
    let together: usize = windows.values().filter(|n| **n >= CONNS).sum();
    println!(
        "calls at or over the p99: {slow}, started in {} windows of {} ms; {together} of \
         them ({:.0}%) in windows with {CONNS} or more (all connections held up at once)",
        windows.len(),
        WINDOW_US / 1000,
        100.0 * together as f64 / slow.max(1) as f64,
    );
    Ok(())
}

fn dir_bytes(path: &Path) -> u64 {
    std::fs::read_dir(path).map_or(0, |entries| {
        entries
            .flatten()
            .map(|e| match e.metadata() {
                Ok(m) if m.is_dir() => dir_bytes(&e.path()),
                Ok(m) => m.len(),
                Err(_) => 0,
            })
            .sum()
    })
}

/// Holds `n` streams open through the gateway (the simulator sends a token a minute) and
/// reports the gateway's memory: idle, with all of them open, and per stream. Over REST
/// each stream is its own client connection; over gRPC (`grpc`) streams share HTTP/2
/// connections, 100 to a connection, so the gateway holds about one file descriptor per
/// stream instead of two.
async fn open_streams(cpu: &str, n: usize, grpc: bool) -> anyhow::Result<()> {
    let s = setup(cpu, 60_000).await?;
    let idle = s.gateway.rss_mib();
    if grpc {
        let started = Instant::now();
        let held = open_grpc_streams(&s, n).await?;
        return report_streams(&s, n, "gRPC", idle, started, held).await;
    }
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()?;
    let body = chat_body(true);
    let mut held = Vec::with_capacity(n);
    let started = Instant::now();
    for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
        let opened = futures_util::future::join_all(chunk.iter().map(|_| {
            let request = client
                .post(format!("{}/v1/chat/completions", s.gateway_url))
                .bearer_auth(&s.key)
                .header("content-type", "application/json")
                .body(body.clone());
            async move {
                let mut stream = request.send().await?.error_for_status()?.bytes_stream();
                // The role chunk arrives at once; the first token would take a minute.
                stream.next().await.context("no first chunk")??;
                anyhow::Ok(stream)
            }
        }))
        .await;
        for stream in opened {
            held.push(stream?);
        }
    }
    report_streams(&s, n, "REST", idle, started, held).await
}

async fn report_streams<T>(
    s: &Setup,
    n: usize,
    door: &str,
    idle: f64,
    started: Instant,
    held: Vec<T>,
) -> anyhow::Result<()> {
    let opened_in = started.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let open = s.gateway.rss_mib();
    let fds = s.gateway.fds();
    println!(
        "{n} open {door} streams (opened in {:.1} s): gateway RSS {idle:.1} MiB idle, {open:.1} MiB with them open, {:.1} KiB per stream, {fds} fds",
        opened_in.as_secs_f64(),
        (open - idle) * 1024.0 / n as f64
    );
    drop(held);
    Ok(())
}

/// Opens `n` gRPC `StreamComplete` calls, 100 to an HTTP/2 connection, each read up to its
/// first message.
async fn open_grpc_streams(
    s: &Setup,
    n: usize,
) -> anyhow::Result<Vec<tonic::Streaming<pb::ChatChunk>>> {
    let bearer: tonic::metadata::MetadataValue<_> = format!("Bearer {}", s.key).parse()?;
    let request = grpc_request();
    let mut held = Vec::with_capacity(n);
    for batch in (0..n).collect::<Vec<_>>().chunks(100) {
        let channel = tonic::transport::Endpoint::from_shared(s.gateway_url.clone())?
            .connect()
            .await?;
        let opened = futures_util::future::join_all(batch.iter().map(|_| {
            let bearer = bearer.clone();
            let mut client = pb::chat_client::ChatClient::with_interceptor(
                channel.clone(),
                move |mut r: tonic::Request<()>| {
                    r.metadata_mut().insert("authorization", bearer.clone());
                    Ok(r)
                },
            );
            let request = request.clone();
            async move {
                let mut stream = client.stream_complete(request).await?.into_inner();
                stream.message().await?.context("no first message")?;
                anyhow::Ok(stream)
            }
        }))
        .await;
        for stream in opened {
            held.push(stream?);
        }
    }
    Ok(held)
}

/// `calls <json|sse|grpc-unary|grpc-stream> <gateway url> <key> <n>`: `n` sequential calls
/// on one connection, for a profiler attached to a gateway started elsewhere (callgrind
/// counts instructions per call).
async fn calls(args: &[String]) -> anyhow::Result<()> {
    let [kind, url, key, n] = args else {
        bail!("usage: bench calls <json|sse|grpc-unary|grpc-stream> <url> <key> <n>");
    };
    let n: usize = n.parse()?;
    let mut took = Vec::with_capacity(n);
    match kind.as_str() {
        "json" | "sse" => {
            let client = reqwest::Client::builder()
                .pool_max_idle_per_host(1)
                .tcp_nodelay(true)
                .build()?;
            let body = chat_body(kind == "sse");
            for _ in 0..n {
                let t = Instant::now();
                post_chat(&client, url, key, body.clone())
                    .await?
                    .bytes()
                    .await?;
                took.push(u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX));
            }
        }
        "grpc-unary" | "grpc-stream" => {
            let mut client = grpc_client(url, key).await?;
            let request = grpc_request();
            for _ in 0..n {
                let t = Instant::now();
                if kind == "grpc-unary" {
                    client.complete(request.clone()).await?;
                } else {
                    let mut stream = client.stream_complete(request.clone()).await?.into_inner();
                    while stream.message().await?.is_some() {}
                }
                took.push(u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX));
            }
        }
        other => bail!("unknown kind {other}"),
    }
    took.sort_unstable();
    println!(
        "{n} calls, whole answer: p50 {} µs, p90 {} µs, p95 {} µs, p99 {} µs, p99.9 {} µs, max {} µs",
        percentile(&took, 0.5),
        percentile(&took, 0.9),
        percentile(&took, 0.95),
        percentile(&took, 0.99),
        percentile(&took, 0.999),
        took.last().copied().unwrap_or(0)
    );
    Ok(())
}

/// One chat call over REST; a refusal ends the run.
async fn post_chat(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    body: impl Into<reqwest::Body>,
) -> anyhow::Result<reqwest::Response> {
    let response = client
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await?;
    if !response.status().is_success() {
        bail!("{url}: HTTP {}", response.status());
    }
    Ok(response)
}

/// A Chat client on its own HTTP/2 connection, sending `key` with every call.
async fn grpc_client(
    url: &str,
    key: &str,
) -> anyhow::Result<
    pb::chat_client::ChatClient<
        tonic::service::interceptor::InterceptedService<
            tonic::transport::Channel,
            impl tonic::service::Interceptor,
        >,
    >,
> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())?
        .tcp_nodelay(true)
        .connect()
        .await?;
    let bearer: tonic::metadata::MetadataValue<_> = format!("Bearer {key}").parse()?;
    Ok(pb::chat_client::ChatClient::with_interceptor(
        channel,
        move |mut r: tonic::Request<()>| {
            r.metadata_mut().insert("authorization", bearer.clone());
            Ok(r)
        },
    ))
}

trait RestBaseline {
    /// The direct baseline of a case: the simulator speaks REST only.
    fn max_rest(self, kind: Kind) -> Kind;
}

impl RestBaseline for Kind {
    fn max_rest(self, kind: Kind) -> Kind {
        match kind {
            Kind::GrpcUnary => Kind::Json,
            Kind::GrpcStream => Kind::Sse,
            other => other,
        }
    }
}
