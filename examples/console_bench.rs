//! How long the console takes to render its heaviest pages with a large store: 1,000,000
//! calls and 100,000 keys (1,000 users of 100 keys) in sled.
//!
//! ```sh
//! cargo run --release --example console_bench            # or: … -- 1000000 100000 20
//! ```
//!
//! Fills a fresh sled store directly through the store port (users and keys imported,
//! calls recorded in batches as the usage writer records them, spread over the last 30
//! days, 1% of them 500s, two models), starts the gateway on it (no model server: the
//! pages read the books only), signs in to the console, and requests each page a number of
//! times (after two warm-up requests), printing the median and the slowest time per page
//! as seen by a client on the same machine (server time plus a loopback round trip).
#![expect(clippy::print_stdout, reason = "a benchmark prints its report")]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use step3_gateway::app;
use step3_gateway::config::GatewayConfig;
use step3_gateway::core::keys;
use step3_gateway::core::limits::{KeyLimits, UserLimits};
use step3_gateway::core::records::{
    CallOutcome, CallRecord, EncodedCall, ExportRecord, KeyRecord, Usage, UserRecord,
};
use step3_gateway::core::store::Store;
use step3_gateway::core::time::now_micros;
use step3_gateway::store::SledStore;

const ADMIN_TOKEN: &str = "console-bench-admin-token-0123";
const MODELS: [&str; 2] = ["stepfun-ai/Step3-VL-10B", "step3-vl-mini"];

/// A small deterministic generator (the same store every run).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }
}

fn key_id(i: usize) -> String {
    format!("key_bench{i:08}")
}

fn user_id(i: usize) -> String {
    format!("usr_bench{i:06}")
}

fn fill(path: &std::path::Path, calls: usize, keys: usize) -> anyhow::Result<()> {
    let store = SledStore::open(path).context("open the sled store")?;
    let users = keys.div_ceil(100);
    let now = now_micros() / 1_000_000;
    let mut records = Vec::with_capacity(users + keys);
    for u in 0..users {
        records.push(ExportRecord::User(UserRecord {
            id: user_id(u),
            name: format!("Bench user {u}"),
            email: Some(format!("user{u}@example.com")),
            active: true,
            subject: None,
            limits: UserLimits::default(),
            created_at: now - 40 * 86_400,
            updated_at: now - 40 * 86_400,
        }));
    }
    for k in 0..keys {
        records.push(ExportRecord::Key(KeyRecord::fresh(
            key_id(k),
            user_id(k / 100),
            format!("bench key {k}"),
            &keys::generate_secret(),
            KeyLimits::default(),
            now - 40 * 86_400,
        )));
    }
    for chunk in records.chunks(10_000) {
        store.import(chunk)?;
    }
    let mut rng = Lcg(17);
    let start = now_micros() - 30 * 86_400 * 1_000_000;
    let step = 30 * 86_400 * 1_000_000 / i64::try_from(calls.max(1))?;
    let filled = Instant::now();
    let mut batch = Vec::with_capacity(10_000);
    for i in 0..calls {
        let k = usize::try_from(rng.next())? % keys;
        let failed = rng.next().is_multiple_of(100);
        batch.push(EncodedCall::new(CallRecord {
            at_micros: start + i64::try_from(i)? * step,
            request_id: format!("req-{i}"),
            key_id: key_id(k),
            user_id: user_id(k / 100),
            model: MODELS[usize::try_from(rng.next() % 2)?].to_owned(),
            version: None,
            cost: Default::default(),
            cache_hit: false,
            status: if failed { 500 } else { 200 },
            outcome: if failed {
                CallOutcome::UpstreamError
            } else {
                CallOutcome::Completed
            },
            stream: false,
            latency_ms: 40 + rng.next() % 200,
            charged_request: true,
            usage: Usage {
                prompt_tokens: 20 + rng.next() % 500,
                completion_tokens: if failed { 0 } else { 10 + rng.next() % 300 },
            },
            usage_estimated: false,
            images: 0,
            image_sizes: Vec::new(),
            request_body: None,
            response_body: None,
            client_addr: None,
            reservation: None,
        }));
        if batch.len() == 10_000 {
            store.record_new_calls(&batch)?;
            batch.clear();
        }
    }
    store.record_new_calls(&batch)?;
    store.flush()?;
    println!(
        "filled {calls} calls, {keys} keys, {users} users in {:.1} s",
        filled.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The median and the slowest of `n` timed requests of `path` (after two warm-ups).
async fn time_page(
    client: &reqwest::Client,
    base: &str,
    cookie: &str,
    path: &str,
    n: usize,
) -> anyhow::Result<(Duration, Duration, usize)> {
    let mut times = Vec::with_capacity(n);
    let mut bytes = 0;
    for i in 0..n + 2 {
        let started = Instant::now();
        let response = client
            .get(format!("{base}{path}"))
            .header("cookie", cookie)
            .send()
            .await?;
        anyhow::ensure!(
            response.status().is_success(),
            "{path}: {}",
            response.status()
        );
        bytes = response.bytes().await?.len();
        if i >= 2 {
            times.push(started.elapsed());
        }
    }
    times.sort();
    Ok((times[times.len() / 2], times[times.len() - 1], bytes))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()
        .context("arguments: [calls] [keys] [requests per page]")?;
    let calls = args.first().copied().unwrap_or(1_000_000);
    let keys = args.get(1).copied().unwrap_or(100_000).max(1);
    let n = args.get(2).copied().unwrap_or(20).max(1);
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    fill(&data, calls, keys)?;

    let mut config = GatewayConfig::default();
    config.server.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.store.path = data;
    config.admin.token = Some(ADMIN_TOKEN.into());
    // No model server: the pages read the books only.
    config.upstream.url = "http://127.0.0.1:9".into();
    let gateway = app::start(config).await?;
    let base = gateway.url();
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let signed_in = client
        .post(format!("{base}/console/sign-in"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("role=admin&secret={ADMIN_TOKEN}"))
        .send()
        .await?;
    let cookie = signed_in
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .context("no session cookie")?
        .to_owned();
    let key = key_id(keys / 2);
    let user = user_id(keys / 200);
    let pages = [
        (
            "call log, newest 50".to_owned(),
            "/console/calls".to_owned(),
        ),
        (
            "call log, one key".to_owned(),
            format!("/console/calls?key={key}"),
        ),
        (
            "call log, one user (100 keys)".to_owned(),
            format!("/console/calls?user={user}"),
        ),
        (
            "call log, status 500 (1%)".to_owned(),
            "/console/calls?status=500".to_owned(),
        ),
        (
            "call log, one model (50%)".to_owned(),
            format!("/console/calls?model={}", MODELS[1]),
        ),
        (
            "usage, one key, by hour, 30 days".to_owned(),
            format!("/console/usage?subject={key}"),
        ),
        (
            "usage, one user (100 keys), by hour and model".to_owned(),
            format!("/console/usage?subject={user}&by_model=on"),
        ),
        (
            "usage, one user, by day, CSV".to_owned(),
            format!("/console/usage?subject={user}&group=day&format=csv"),
        ),
        ("keys, first page".to_owned(), "/console/keys".to_owned()),
        (
            "keys, name search (20,000 scanned)".to_owned(),
            "/console/keys?q=no-such-name".to_owned(),
        ),
        ("users, first page".to_owned(), "/console/users".to_owned()),
        (
            "overview (last 30 min of calls)".to_owned(),
            "/console/overview".to_owned(),
        ),
    ];
    println!("\n| page | median ms | slowest ms | bytes |\n|---|---:|---:|---:|");
    for (name, path) in &pages {
        let (median, slowest, bytes) = time_page(&client, &base, &cookie, path, n).await?;
        println!(
            "| {name} | {:.1} | {:.1} | {bytes} |",
            median.as_secs_f64() * 1000.0,
            slowest.as_secs_f64() * 1000.0
        );
    }
    gateway.shutdown().await;
    Ok(())
}
