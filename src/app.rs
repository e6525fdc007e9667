//! Wiring: store, gate, upstream, the doors' routes on one listener (or two), and
//! graceful shutdown.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::call::CallPath;
use crate::call::image_fetch::ImageFetcher;
use crate::call::jwt::{JwtSettings, JwtVerifier};
use crate::call::key_tokens::KeyTokens;
use crate::config::{
    BackendConfig, Durability, GatewayConfig, JwtConfig, StoreBackend, UnknownSubjects,
};
use crate::console::{self, ConsoleSettings};
use crate::core::admin::{NewKey, NewUser};
use crate::core::events::{GateEvents, Watchers};
use crate::core::export::ExportSummary;
use crate::core::identity::SubjectPolicy;
use crate::core::journal::{self, ReservationJournal};
use crate::core::limits::KeyLimits;
use crate::core::request::RequestOptions;
use crate::core::shared_limits::Change;
use crate::core::store::Store;
use crate::core::usage_sink::usage_channel;
use crate::core::{GateSettings, Gateway, keys};
use crate::edge;
use crate::edge::router::Edge;
use crate::grpc;
use crate::metrics::Metrics;
use crate::notify::{AlertTasks, Alerts, BackendHealth, BackendProbe};
use crate::rest::{self, AppState, RestSettings};
use crate::server::ConnectionLimits;
use crate::sim::{
    DEFAULT_EMBEDDING_MODEL, DEFAULT_MODEL, RunningSimulator, Simulator, SimulatorConfig,
};
use crate::store::{
    FileJournal, PostgresStore, RedisLimits, RedisSettings, SledStore, UsageWriter, WhenDurable,
};
use crate::tls::TlsAcceptor;
use crate::upstream::UpstreamPool;

const ADMIN_TOKEN_META: &str = "admin_token_hash";
const DEMO_KEY_META: &str = "demo_key_id";

/// Secrets made at this start; they are shown once and never stored in plaintext.
#[derive(Clone, Debug, Default)]
pub struct FirstStartSecrets {
    /// The admin token, when none was configured and none existed yet.
    pub admin_token: Option<String>,
    /// The demo key, on the first `--demo` start.
    pub demo_key: Option<String>,
}

/// What the demo key may do: enough to try every route, little enough that a demo left
/// running cannot be used as a free model server for long.
pub const DEMO_KEY_LIMITS: KeyLimits = KeyLimits {
    rpm_limit: Some(60),
    tpm_limit: None,
    max_concurrent: None,
    request_quota: Some(1000),
    token_quota: Some(1_000_000),
    image_quota: None,
    max_images_per_request: None,
    allowed_ips: None,
    budget: None,
    period: None,
    cache: None,
};

/// The demo's user and key, made on the first demo start.
#[derive(Clone, Debug)]
pub struct DemoKey {
    pub key_id: String,
    pub user_id: String,
}

/// A gateway serving on `addr` until [`RunningGateway::shutdown`].
pub struct RunningGateway {
    /// REST (and gRPC, unless it has a port of its own).
    pub addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    pub gateway: Arc<Gateway>,
    pub upstream: Arc<UpstreamPool>,
    pub secrets: FirstStartSecrets,
    /// The demo key (its secret is in `secrets` on the first demo start only).
    pub demo_key: Option<DemoKey>,
    /// The in-process simulator of `--demo` (the chat model).
    pub simulator: Option<RunningSimulator>,
    /// The port's TLS settings (server.tls), read again on SIGHUP.
    pub tls: Option<Arc<TlsAcceptor>>,
    /// The demo's second backend, an embedding model (a pool of two, as in front of two
    /// servers).
    pub embedding_simulator: Option<RunningSimulator>,
    shutdown: CancellationToken,
    /// Ends with the number of calls whose usage could not be written.
    task: JoinHandle<usize>,
}

impl RunningGateway {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc_addr)
    }

    /// Stops accepting, lets calls in flight finish within the grace period, cuts the
    /// rest (settling them), then writes all usage and flushes the store. Returns the
    /// number of calls whose usage could not be written (the store failed to the end).
    pub async fn shutdown(self) -> usize {
        self.shutdown.cancel();
        let unrecorded = match self.task.await {
            Ok(unrecorded) => unrecorded,
            Err(e) => {
                tracing::error!(error = %e, "gateway task failed");
                0
            }
        };
        for simulator in [self.simulator, self.embedding_simulator]
            .into_iter()
            .flatten()
        {
            simulator.shutdown().await;
        }
        unrecorded
    }

    /// Reloads the upstream list from `config` (SIGHUP); calls in flight are not touched.
    pub fn reload_upstreams(&self, config: &GatewayConfig) -> anyhow::Result<()> {
        config.validate()?;
        if self.simulator.is_some() {
            anyhow::bail!("the demo gateway always uses its simulator; nothing to reload");
        }
        self.upstream.reload(config.upstream.pool_settings())?;
        Ok(())
    }

    /// Reads the TLS certificate and key files again (SIGHUP); open connections keep theirs.
    pub fn reload_tls(&self) -> anyhow::Result<()> {
        match &self.tls {
            Some(tls) => tls.reload(),
            None => Ok(()),
        }
    }

    /// Waits until the server stops by itself (it does not, unless shut down).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

/// Binds the listener(s), opens the store, loads the gate and starts serving.
///
/// The order keeps one-time secrets from being lost: the ports are bound before anything
/// touches the data directory, and a new admin token or demo key is stored only when
/// nothing that could fail is left, just before serving begins. A start that fails (a
/// port taken, a bad setting) leaves no secret behind that was never shown.
pub async fn start(mut config: GatewayConfig) -> anyhow::Result<RunningGateway> {
    config.validate()?;
    let listener = bind(config.server.listen).await?;
    let grpc_listener = match config.server.grpc_listen {
        Some(grpc_listen) => Some(bind(grpc_listen).await?),
        None => None,
    };
    let (simulator, embedding_simulator) = if config.demo.enabled {
        let (chat, embed) = start_demo_backends(&mut config).await?;
        (Some(chat), Some(embed))
    } else {
        (None, None)
    };

    std::fs::create_dir_all(&config.store.path).with_context(|| {
        format!(
            "cannot create data directory {}",
            config.store.path.display()
        )
    })?;
    let store = open_store(&config)?;
    let journal = open_journal(&config, &*store).await?;
    let admin_token = AdminToken::find(&config, &*store)?;

    let (sink, queue) = usage_channel();
    let journal_port = journal
        .clone()
        .map(|journal| journal as Arc<dyn ReservationJournal>);
    let writer = UsageWriter::spawn(
        store.clone(),
        queue,
        Duration::from_millis(config.store.flush_interval_ms),
        (config.store.call_log_retention_days > 0).then(|| {
            Duration::from_secs(config.store.call_log_retention_days.saturating_mul(86_400))
        }),
        journal_port.clone(),
    )
    .context("cannot start the usage writer")?;
    let metrics = Arc::new(Metrics::default());
    let alerts = match config.alerts.enabled() {
        true => Some(Alerts::new(&config.alerts).map_err(|e| anyhow::anyhow!(e))?),
        false => None,
    };
    let events: Arc<dyn GateEvents> = match &alerts {
        Some(alerts) => Arc::new(Watchers(vec![metrics.clone(), alerts.clone()])),
        None => metrics.clone(),
    };
    let mut gateway = Gateway::load(
        store.clone(),
        sink,
        events,
        admin_token.hash(),
        GateSettings {
            log_bodies: config.store.log_bodies,
            default_max_tokens: config.limits.default_max_tokens,
            max_images_per_request: config.limits.max_images_per_request,
            admin_allowed_ips: Some(config.admin.allowed_ips.clone()).filter(|l| !l.is_empty()),
            // Reported as metrics whether or not alerts are sent.
            quota_alert_percents: config.alerts.quota_percents.clone(),
            snapshot_dir: config.backup.dir.clone(),
            currency: config.billing.currency.clone(),
            image_tiers: config.billing.tiers()?,
            calendar: config.billing.calendar()?,
            clock: config.billing.clock.clone(),
        },
    )?;
    let seeds: Vec<_> = config
        .billing
        .prices
        .iter()
        .map(|seed| seed.price(config.billing.clock.now_unix()))
        .collect();
    gateway
        .seed_prices(seeds)
        .context("cannot write the configured prices")?;
    if let Some(journal) = journal_port {
        gateway = gateway.with_journal(journal);
    }
    let shared_limits = connect_shared_limits(&config, &store).await?;
    if let Some(shared) = &shared_limits {
        gateway = gateway.with_shared_limits(shared.clone());
    }
    let seeded = gateway
        .seed_models(&config.models)
        .context("cannot seed the model catalogue from the configuration")?;
    if seeded > 0 {
        tracing::info!(
            models = seeded,
            "model catalogue seeded from the configuration"
        );
    }
    let gateway = Arc::new(gateway);

    let upstream = Arc::new(UpstreamPool::new(config.upstream.pool_settings())?);
    let tls = match config.server.tls.enabled() {
        true => Some(Arc::new(TlsAcceptor::new(&config.server.tls)?)),
        false => None,
    };
    let hard_stop = CancellationToken::new();
    let call = CallPath {
        gateway: gateway.clone(),
        upstream: upstream.clone(),
        options: Arc::new(RequestOptions {
            continuous_usage: config.upstream.continuous_usage_stats,
            image_policy: config.image_policy.clone(),
        }),
        hard_stop: hard_stop.clone(),
        identity: identity_verifier(&config.jwt).await?,
        key_tokens: Arc::new(key_token_signer(&admin_token.hash())?),
        image_fetcher: match config.image_policy.fetch {
            true => Some(Arc::new(
                ImageFetcher::new(config.image_policy.clone()).map_err(anyhow::Error::msg)?,
            )),
            false => None,
        },
        cache: config
            .cache
            .settings()
            .map(|settings| Arc::new(crate::cache::ResponseCache::new(settings))),
    };
    let shutdown = CancellationToken::new();
    // Stops the tasks spawned from here on if the start fails after all.
    let stop_on_error = shutdown.clone().drop_guard();
    // Know the backends' health before the first call (and before gRPC health reports
    // it), then keep checking.
    call.upstream.check_health().await;
    call.upstream.spawn_health_checks(shutdown.clone());
    let alert_tasks = alerts.map(|alerts| {
        gateway.set_notifier(alerts.clone());
        let pool = upstream.clone();
        let probe: BackendProbe = Arc::new(move || {
            pool.status()
                .into_iter()
                .map(|b| BackendHealth {
                    name: b.name,
                    healthy: b.healthy,
                })
                .collect()
        });
        alerts.run(gateway.clone(), probe, shutdown.clone())
    });
    let backups = crate::backup::spawn_schedule(gateway.clone(), &config.backup, shutdown.clone());
    if let Some(shared) = &shared_limits {
        let gateway = gateway.clone();
        let refresh = move |change: Change| {
            if let Err(e) = gateway.refresh(&change) {
                tracing::warn!(?change, error = %e, "cannot read a changed record again");
            }
        };
        shared.listen(Arc::new(refresh), shutdown.clone());
        // So that `/health`, gRPC health and `/metrics` know whether Redis answers (and
        // see it come back) while no call asks it.
        shared.probe_health(Duration::from_secs(1), shutdown.clone());
    }
    let grpc = grpc::routes(call.clone(), shutdown.clone(), config.server.max_body_bytes)
        .context("cannot build the gRPC services")?;
    let state = AppState {
        call: Arc::new(call.clone()),
        metrics: metrics.clone(),
        settings: Arc::new(RestSettings {
            max_body_bytes: config.server.max_body_bytes,
            response_metadata: config.server.response_metadata,
            health_timeout: Duration::from_secs(2),
            cors_allowed_origins: config.server.cors_allowed_origins.clone(),
        }),
    };
    let edge = Arc::new(Edge {
        metrics: metrics.clone(),
        trusted_proxies: Some(config.server.trusted_proxies.clone()).filter(|l| !l.is_empty()),
    });
    // The console is served beside REST, on the same port.
    let console = config.console.enabled.then(|| {
        console::routes(
            call.clone(),
            ConsoleSettings {
                secure_cookie: config.server.tls.enabled(),
                session_ttl: Duration::from_secs(config.console.session_ttl_secs),
                sign_in_attempts_per_minute: config.console.sign_in_attempts_per_minute,
            },
        )
    });
    let rest_routes = match console {
        Some(console) => rest::routes(state).merge(console),
        None => rest::routes(state),
    };
    let addr = listener.local_addr()?;
    let mut grpc_addr = None;
    let mut servers = Vec::new();
    match grpc_listener {
        None => {
            let routes = rest_routes.merge(grpc);
            servers.push((listener, edge::router::serve(routes, edge)));
        }
        Some(grpc_listener) => {
            grpc_addr = Some(grpc_listener.local_addr()?);
            servers.push((listener, edge::router::serve(rest_routes, edge.clone())));
            servers.push((grpc_listener, edge::router::serve(grpc, edge)));
        }
    }

    // Nothing below fails but writing the new secrets, which comes last: the demo key
    // before the admin token, so that a failure between the two leaves no admin token
    // stored that was never shown (the next start makes and shows a new one).
    let mut secrets = FirstStartSecrets::default();
    let demo_key = if config.demo.enabled {
        let (demo_key, secret) = ensure_demo_key(&gateway, &*store)?;
        secrets.demo_key = secret;
        demo_key
    } else {
        None
    };
    secrets.admin_token = admin_token.commit(&*store)?;

    let limits = ConnectionLimits {
        header_read_timeout: Duration::from_secs(config.server.header_read_timeout_secs),
        body_read_timeout: Duration::from_secs(config.server.body_read_timeout_secs),
        idle_timeout: Duration::from_secs(config.server.idle_timeout_secs),
    };
    let task = tokio::spawn(serve(
        servers,
        tls.clone(),
        limits,
        shutdown.clone(),
        hard_stop,
        config.shutdown_grace(),
        Background {
            writer,
            journal,
            alerts: alert_tasks,
            backups,
        },
    ));
    stop_on_error.disarm();
    tracing::info!(
        %addr,
        grpc = %grpc_addr.unwrap_or(addr),
        upstream = %config.upstream.url,
        data = %config.store.path.display(),
        store = %store_name(&config),
        "step3-gateway listening"
    );
    Ok(RunningGateway {
        addr,
        grpc_addr: grpc_addr.unwrap_or(addr),
        gateway,
        upstream,
        secrets,
        demo_key,
        simulator,
        embedding_simulator,
        tls,
        shutdown,
        task,
    })
}

/// The demo's model servers: the simulated STEP3-VL, and an embedding model on a backend
/// of its own, routed to by model (whatever backends the configuration names).
async fn start_demo_backends(
    config: &mut GatewayConfig,
) -> anyhow::Result<(RunningSimulator, RunningSimulator)> {
    let spawn = |embedding_model: Option<String>| {
        Simulator::new(SimulatorConfig {
            token_latency: Duration::from_millis(config.demo.token_latency_ms),
            // A long-running demo must not keep every request in memory.
            record_requests: false,
            embedding_model,
            ..SimulatorConfig::default()
        })
        .spawn(SocketAddr::from(([127, 0, 0, 1], 0)))
    };
    let chat = spawn(None)
        .await
        .context("cannot start the demo simulator")?;
    let embed = spawn(Some(DEFAULT_EMBEDDING_MODEL.into()))
        .await
        .context("cannot start the demo's embedding simulator")?;
    // A sample price, so that the demo's calls show what they cost (unless the
    // configuration names its own).
    if config.billing.prices.is_empty() {
        config.billing.prices = vec![crate::config::PriceSeed {
            model: DEFAULT_MODEL.into(),
            prompt_per_million: crate::core::money::Money(500_000_000),
            completion_per_million: crate::core::money::Money(1_500_000_000),
            images: [
                ("small", 1_000_000),
                ("medium", 2_000_000),
                ("large", 4_000_000),
            ]
            .into_iter()
            .map(|(tier, nanos)| (tier.to_owned(), crate::core::money::Money(nanos)))
            .collect(),
            ..crate::config::PriceSeed::default()
        }];
    }
    config.upstream.url = chat.url();
    config.upstream.backends = vec![
        BackendConfig::serving("demo-chat", chat.url(), DEFAULT_MODEL),
        BackendConfig::serving("demo-embed", embed.url(), DEFAULT_EMBEDDING_MODEL),
    ];
    Ok((chat, embed))
}

/// The signer of key holders' short-lived tokens: its secret derived from the admin
/// token's hash, so replicas sharing a store sign alike and an admin token reset ends
/// every token.
fn key_token_signer(admin_hash: &keys::SecretHash) -> anyhow::Result<KeyTokens> {
    let mut material = b"step3-gateway key tokens\0".to_vec();
    material.extend_from_slice(admin_hash);
    let secret: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(&material).into();
    KeyTokens::new(&secret).map_err(anyhow::Error::msg)
}

/// The identity provider's token checks, when `[jwt]` configures one; its keys fetched
/// now (a provider that cannot be reached yet is tried again when a token needs it).
async fn identity_verifier(config: &JwtConfig) -> anyhow::Result<Option<Arc<JwtVerifier>>> {
    if !config.enabled() {
        return Ok(None);
    }
    let verifier = JwtVerifier::new(JwtSettings {
        jwks_url: config.jwks_url.clone(),
        hs256_secret: config.hs256_secret.clone(),
        issuer: config.issuer.clone().unwrap_or_default(),
        audience: config.audience.clone(),
        user_claim: config.user_claim.clone(),
        leeway: Duration::from_secs(config.leeway_secs),
        jwks_min_refresh: Duration::from_secs(config.jwks_min_refresh_secs),
        subjects: SubjectPolicy {
            create_unknown: config.unknown_subjects == UnknownSubjects::Create,
            key_limits: config.key_limits.clone(),
        },
    })
    .map_err(anyhow::Error::msg)?;
    verifier.prefetch().await;
    Ok(Some(Arc::new(verifier)))
}

async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))
}

/// Serves every listener until `shutdown`, then lets calls in flight finish within
/// `grace`, cuts the rest (their guards settle them), and drains the usage writer.
async fn serve(
    servers: Vec<(tokio::net::TcpListener, axum::Router)>,
    tls: Option<Arc<TlsAcceptor>>,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
    hard_stop: CancellationToken,
    grace: Duration,
    background: Background,
) -> usize {
    let cutter = {
        let shutdown = shutdown.clone();
        let hard_stop = hard_stop.clone();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            tokio::time::sleep(grace).await;
            tracing::warn!("shutdown grace period over; cutting the calls still in flight");
            hard_stop.cancel();
        })
    };
    let servers = servers.into_iter().map(|(listener, router)| {
        crate::server::serve(listener, router, limits, shutdown.clone(), tls.clone())
    });
    let all = futures_util::future::join_all(servers);
    // A connection that never finishes (a stalled upload, a reader that stopped reading)
    // must not keep the usage from being written: after the cut, wait only briefly.
    let stuck = async {
        hard_stop.cancelled().await;
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    tokio::select! {
        _ = all => {}
        () = stuck => tracing::warn!("connections still open after the grace period; leaving them"),
    }
    cutter.abort();
    let unrecorded = background.stop().await;
    if unrecorded == 0 {
        tracing::info!("step3-gateway stopped; usage flushed");
    }
    unrecorded
}

/// The tasks that outlive the connections at shutdown, stopped in this order.
struct Background {
    writer: UsageWriter,
    journal: Option<Arc<FileJournal>>,
    alerts: Option<AlertTasks>,
    /// The scheduled backups; a backup under way is finished before the writer stops.
    backups: Option<JoinHandle<()>>,
}

impl Background {
    /// Drains the usage writer, closes the journal, lets the alerts send what they hold;
    /// returns the number of calls whose usage could not be written.
    async fn stop(self) -> usize {
        if let Some(backups) = self.backups {
            let _ = backups.await;
        }
        let unrecorded = self.writer.stop().await;
        // The writer closed the reservations of every call it made durable: write that down.
        if let Some(journal) = self.journal {
            let _ = tokio::task::spawn_blocking(move || journal.stop()).await;
        }
        // The channel workers give what is still queued one last try.
        if let Some(alerts) = self.alerts {
            alerts.stop().await;
        }
        unrecorded
    }
}

/// The books: sled in the data directory, or the shared store (Postgres).
fn open_store(config: &GatewayConfig) -> anyhow::Result<Arc<dyn Store>> {
    let path = &config.store.path;
    Ok(match (config.store.backend, &config.store.postgres_url) {
        (StoreBackend::Shared, Some(url)) => Arc::new(
            PostgresStore::open(
                url.expose(),
                path,
                Duration::from_millis(config.store.timeout_ms),
                config.store.max_connections,
            )
            .with_context(|| format!("cannot open the shared store at {url}"))?,
        ),
        _ => Arc::new(
            SledStore::open_with_cache(path, config.store.cache_mib.saturating_mul(1024 * 1024))
                .with_context(|| format!("cannot open the store in {}", path.display()))?,
        ),
    })
}

/// Several replicas: the Redis their limits are counted in, when one is configured.
async fn connect_shared_limits(
    config: &GatewayConfig,
    store: &Arc<dyn Store>,
) -> anyhow::Result<Option<Arc<RedisLimits>>> {
    let (StoreBackend::Shared, Some(url)) = (config.store.backend, &config.store.redis_url) else {
        return Ok(None);
    };
    let settings = RedisSettings {
        prefix: config.store.redis_prefix.clone(),
        timeout: Duration::from_millis(config.store.timeout_ms),
        // A call lasts at most the upstream's total timeout, and the grace at shutdown.
        slot_hold: Duration::from_secs(config.upstream.total_timeout_secs)
            + config.shutdown_grace()
            + Duration::from_secs(60),
    };
    let limits = RedisLimits::connect(url.expose(), settings, store.clone())
        .await
        .with_context(|| format!("cannot reach the shared limits at {url}"))?;
    Ok(Some(Arc::new(limits)))
}

/// Where the books (and shared limits) are, for the log: URLs without their passwords.
fn store_name(config: &GatewayConfig) -> String {
    let store = &config.store;
    match (store.backend, &store.postgres_url, &store.redis_url) {
        (StoreBackend::Shared, Some(books), Some(limits)) => format!("{books} + {limits}"),
        (StoreBackend::Shared, Some(books), None) => books.to_string(),
        _ => "sled".into(),
    }
}

/// Opens the reservation journal and settles what the last run left open, before anything
/// reads the books. In `flush_interval` mode a journal left by a durable run is settled and
/// closed, and none is kept.
async fn open_journal(
    config: &GatewayConfig,
    store: &dyn Store,
) -> anyhow::Result<Option<Arc<FileJournal>>> {
    let dir = config.store.path.join("journal");
    let (durable, when) = match config.store.durability {
        Durability::Reservations => (true, WhenDurable::Written),
        Durability::ReservationsSynced => (true, WhenDurable::Synced),
        Durability::FlushInterval => (false, WhenDurable::Written),
    };
    if !durable && !dir.exists() {
        return Ok(None);
    }
    let opened = FileJournal::open(&dir, when)
        .with_context(|| format!("cannot open the reservation journal in {}", dir.display()))?;
    let journal = Arc::new(opened);
    let recovery = journal::recover(store, &*journal)
        .context("cannot settle the calls the last run left open")?;
    if recovery != journal::Recovery::default() {
        tracing::warn!(
            interrupted = recovery.interrupted,
            from_settlement = recovery.from_settlement,
            already_recorded = recovery.already_recorded,
            "settled the calls a hard stop left open: interrupted ones are charged their \
             reservation and marked `interrupted` in the call log"
        );
    }
    if durable {
        return Ok(Some(journal));
    }
    tokio::task::spawn_blocking(move || journal.stop()).await?;
    std::fs::remove_dir_all(&dir)
        .with_context(|| format!("cannot remove the journal {}", dir.display()))?;
    Ok(None)
}

/// The admin token the gate checks: configured, stored by an earlier start (or by
/// `admin-token reset`), or new and not yet stored.
enum AdminToken {
    Known(keys::SecretHash),
    New {
        token: String,
        hash: keys::SecretHash,
    },
}

impl AdminToken {
    fn find(config: &GatewayConfig, store: &dyn Store) -> anyhow::Result<Self> {
        if let Some(token) = &config.admin.token {
            return Ok(AdminToken::Known(keys::hash_secret(token.trim())));
        }
        if let Some(stored) = store.meta(ADMIN_TOKEN_META)? {
            return <[u8; 32]>::try_from(stored.as_slice())
                .map(AdminToken::Known)
                .map_err(|_| anyhow::anyhow!("the stored admin token hash is malformed"));
        }
        let token = new_admin_token();
        let hash = keys::hash_secret(&token);
        Ok(AdminToken::New { token, hash })
    }

    fn hash(&self) -> keys::SecretHash {
        match self {
            AdminToken::Known(hash) | AdminToken::New { hash, .. } => *hash,
        }
    }

    /// Stores a new token's hash (durably: it is shown next, and never again); returns the
    /// token to show.
    fn commit(self, store: &dyn Store) -> anyhow::Result<Option<String>> {
        match self {
            AdminToken::Known(_) => Ok(None),
            AdminToken::New { token, hash } => {
                store.put_meta(ADMIN_TOKEN_META, &hash)?;
                store.flush()?;
                Ok(Some(token))
            }
        }
    }
}

fn new_admin_token() -> String {
    format!(
        "adm-{}",
        &keys::generate_secret()[keys::SECRET_PREFIX.len()..]
    )
}

/// Replaces the stored admin token of the data directory at `path` with a new one and
/// returns it. The gateway must be stopped: a running one holds the store's lock (and
/// would keep checking the old token until restarted).
pub fn reset_admin_token(path: &Path) -> anyhow::Result<String> {
    // `conf` is sled's own file; opening a directory without it would create an empty
    // store there (a mistyped path must not become a new data directory).
    if !path.join("conf").is_file() {
        anyhow::bail!(
            "{} holds no gateway data (give the data directory with --data-dir, or the \
             gateway's --config); a first start makes the admin token",
            path.display()
        );
    }
    let store = SledStore::open(path).map_err(|e| {
        // The store reports a lock held by another process in its message.
        if e.to_string().contains("locked") {
            anyhow::anyhow!(
                "{} is in use by a running gateway (it holds the store while it runs): stop \
                 the gateway first, then reset the token; nothing was changed",
                path.display()
            )
        } else {
            anyhow::Error::new(e).context(format!("cannot open the store in {}", path.display()))
        }
    })?;
    let token = new_admin_token();
    store.put_meta(ADMIN_TOKEN_META, &keys::hash_secret(&token))?;
    store.flush()?;
    Ok(token)
}

/// The demo user and key, and the key's secret when this start made them (the first
/// demo start). A demo key made earlier is only described (`None` if it is gone).
fn ensure_demo_key(
    gateway: &Gateway,
    store: &dyn Store,
) -> anyhow::Result<(Option<DemoKey>, Option<String>)> {
    if let Some(id) = store.meta(DEMO_KEY_META)? {
        let demo = gateway
            .get_key(&String::from_utf8_lossy(&id))
            .ok()
            .map(|key| DemoKey {
                key_id: key.id,
                user_id: key.user_id,
            });
        return Ok((demo, None));
    }
    let user = gateway.create_user(NewUser {
        name: "demo".into(),
        ..NewUser::default()
    })?;
    let created = gateway.create_key(NewKey {
        user_id: user.id,
        name: Some("demo".into()),
        limits: DEMO_KEY_LIMITS.into(),
        ..NewKey::default()
    })?;
    store.put_meta(DEMO_KEY_META, created.key.id.as_bytes())?;
    store.flush()?;
    let demo = DemoKey {
        key_id: created.key.id,
        user_id: created.key.user_id,
    };
    Ok((Some(demo), Some(created.secret)))
}

/// What [`restore`] did.
#[derive(Debug)]
pub struct Restored {
    pub summary: ExportSummary,
    /// Where the store that was there before went (`--force`).
    pub moved_aside: Option<PathBuf>,
}

/// Whether `name`, an entry of a data directory, is part of the store: sled's files, the
/// call log, the durability mark and the reservation journal. Anything else there (a
/// `backups` directory) is left where it is by a restore.
fn is_store_entry(name: &str) -> bool {
    matches!(
        name,
        "conf" | "db" | "blobs" | "calls" | "journal" | "durable-call" | "durable-call.new"
    ) || name.starts_with("snap.")
}

/// `step3-gateway restore`: makes `data_dir` hold the books of the backup `file`.
///
/// The backup is read into a new store inside `data_dir` (so that the gateway's own user,
/// who may write nowhere else, can restore) and checked to its last line before anything
/// else moves: a damaged or cut-short file, an error, or `progress` answering false
/// (Ctrl-C) leaves the store as it was. A store a running gateway holds is never touched;
/// a store already there is moved into `before-restore-<time>/` only with `force`.
pub fn restore(
    file: &Path,
    data_dir: &Path,
    force: bool,
    progress: &mut dyn FnMut(u64) -> bool,
) -> anyhow::Result<Restored> {
    let input = std::fs::File::open(file)
        .with_context(|| format!("cannot read the backup {}", file.display()))?;
    let (summary, moved_aside) = build_store_in(data_dir, force, "restore", |store| {
        crate::core::snapshot::import_export(
            std::io::BufReader::with_capacity(1 << 20, input),
            store,
            progress,
        )
        .with_context(|| format!("cannot restore {}", file.display()))
    })?;
    Ok(Restored {
        summary,
        moved_aside,
    })
}

/// Makes `data_dir` hold a new sled store that `fill` fills (`what`: `restore`, `copy`).
///
/// The store is built inside `data_dir`, under a hidden name, and moved into place only
/// when `fill` succeeded: an error or a stop leaves the directory as it was. A store a
/// running gateway holds is never touched; a store already there is moved into
/// `before-<what>-<time>/` only with `force` (its path is returned).
pub(crate) fn build_store_in<T>(
    data_dir: &Path,
    force: bool,
    what: &str,
    fill: impl FnOnce(&SledStore) -> anyhow::Result<T>,
) -> anyhow::Result<(T, Option<PathBuf>)> {
    let holds_store = data_dir.join("conf").is_file();
    if holds_store {
        // Opening takes sled's lock: it fails while a gateway holds the directory.
        if let Err(e) = SledStore::open(data_dir)
            && e.to_string().contains("locked")
        {
            anyhow::bail!(
                "{} is in use by a running gateway: stop it before a {what} into its data \
                 directory (nothing was changed)",
                data_dir.display()
            );
        }
        if !force {
            anyhow::bail!(
                "{} holds a store already: {what} into another directory, or pass --force \
                 to move that store aside first (nothing was changed)",
                data_dir.display()
            );
        }
    }
    // A directory made here is removed again if the store cannot be built.
    let mut made = RemoveOnDrop((!data_dir.exists()).then(|| data_dir.to_owned()));
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create {}", data_dir.display()))?;
    let building = data_dir.join(format!(".{what}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&building);
    // Removed unless the store is complete, whatever stops it.
    let mut cleanup = RemoveOnDrop(Some(building.clone()));
    let filled = {
        let store = SledStore::open(&building)
            .with_context(|| format!("cannot make a new store in {}", building.display()))?;
        let filled = fill(&store)?;
        store.flush()?;
        filled
    };
    let moved_aside = if holds_store {
        let aside = data_dir.join(format!("before-{what}-{}", crate::core::time::now_unix()));
        std::fs::create_dir(&aside)
            .with_context(|| format!("cannot create {}", aside.display()))?;
        move_entries(data_dir, &aside, is_store_entry)?;
        Some(aside)
    } else {
        None
    };
    move_entries(&building, data_dir, |_| true)?;
    drop(cleanup.0.take());
    std::fs::remove_dir(&building)
        .with_context(|| format!("cannot remove {}", building.display()))?;
    std::fs::File::open(data_dir).and_then(|d| d.sync_all())?;
    made.0 = None;
    Ok((filled, moved_aside))
}

/// Renames the entries of `from` that `pick` names into `to`.
fn move_entries(from: &Path, to: &Path, pick: impl Fn(&str) -> bool) -> anyhow::Result<()> {
    for entry in
        std::fs::read_dir(from).with_context(|| format!("cannot read {}", from.display()))?
    {
        let entry = entry?;
        let name = entry.file_name();
        if !pick(&name.to_string_lossy()) {
            continue;
        }
        std::fs::rename(entry.path(), to.join(&name)).with_context(|| {
            format!(
                "cannot move {} into {}",
                entry.path().display(),
                to.display()
            )
        })?;
    }
    Ok(())
}

/// Removes a directory when dropped, unless emptied first.
struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// `step3-gateway backup --data-dir`: a copy of a stopped gateway's store into `out`.
pub fn backup_stopped(data_dir: &Path, out: &Path) -> anyhow::Result<ExportSummary> {
    if !data_dir.join("conf").is_file() {
        anyhow::bail!("{} holds no gateway data", data_dir.display());
    }
    let store = SledStore::open(data_dir).map_err(|e| {
        if e.to_string().contains("locked") {
            anyhow::anyhow!(
                "{} is in use by a running gateway: back it up through the gateway \
                 (`step3-gateway backup --out …` without --data-dir)",
                data_dir.display()
            )
        } else {
            anyhow::Error::new(e)
                .context(format!("cannot open the store in {}", data_dir.display()))
        }
    })?;
    let mut partial = crate::backup::PartialFile::create(out)
        .with_context(|| format!("cannot write {}", out.display()))?;
    let (_, summary) =
        crate::core::snapshot::export_store(&store, std::io::BufWriter::new(&mut partial.file))?;
    partial
        .commit()
        .with_context(|| format!("cannot write {}", out.display()))?;
    Ok(summary)
}
