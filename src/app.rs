//! Wiring: store, gate, upstream, the doors' routes on one listener (or two), and
//! graceful shutdown.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::call::CallPath;
use crate::config::{BackendConfig, Durability, GatewayConfig, StoreBackend};
use crate::core::admin::{NewKey, NewUser};
use crate::core::journal::{self, ReservationJournal};
use crate::core::limits::KeyLimits;
use crate::core::request::RequestOptions;
use crate::core::shared_limits::Change;
use crate::core::store::Store;
use crate::core::usage_sink::usage_channel;
use crate::core::{GateSettings, Gateway, keys};
use crate::edge;
use crate::grpc;
use crate::metrics::Metrics;
use crate::rest::{self, AppState, RestSettings};
use crate::server::ConnectionLimits;
use crate::sim::{
    DEFAULT_EMBEDDING_MODEL, DEFAULT_MODEL, RunningSimulator, Simulator, SimulatorConfig,
};
use crate::store::{
    FileJournal, PostgresStore, RedisLimits, RedisSettings, SledStore, UsageWriter,
};
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
    );
    let metrics = Arc::new(Metrics::default());
    let mut gateway = Gateway::load(
        store.clone(),
        sink,
        metrics.clone(),
        admin_token.hash(),
        GateSettings {
            log_bodies: config.store.log_bodies,
            default_max_tokens: config.limits.default_max_tokens,
            max_images_per_request: config.limits.max_images_per_request,
        },
    )?;
    if let Some(journal) = journal_port {
        gateway = gateway.with_journal(journal);
    }
    let shared_limits = connect_shared_limits(&config, &store).await?;
    if let Some(shared) = &shared_limits {
        gateway = gateway.with_shared_limits(shared.clone());
    }
    let gateway = Arc::new(gateway);

    let upstream = Arc::new(UpstreamPool::new(config.upstream.pool_settings())?);
    let hard_stop = CancellationToken::new();
    let call = CallPath {
        gateway: gateway.clone(),
        upstream: upstream.clone(),
        options: Arc::new(RequestOptions {
            continuous_usage: config.upstream.continuous_usage_stats,
            image_policy: config.image_policy.clone(),
        }),
        hard_stop: hard_stop.clone(),
    };
    let shutdown = CancellationToken::new();
    // Stops the tasks spawned from here on if the start fails after all.
    let stop_on_error = shutdown.clone().drop_guard();
    // Know the backends' health before the first call (and before gRPC health reports
    // it), then keep checking.
    call.upstream.check_health().await;
    call.upstream.spawn_health_checks(shutdown.clone());
    if let Some(shared) = &shared_limits {
        let gateway = gateway.clone();
        let refresh = move |change: Change| {
            if let Err(e) = gateway.refresh(&change) {
                tracing::warn!(?change, error = %e, "cannot read a changed record again");
            }
        };
        shared.listen(Arc::new(refresh), shutdown.clone());
    }
    let grpc = grpc::routes(call.clone(), shutdown.clone(), config.server.max_body_bytes)
        .context("cannot build the gRPC services")?;
    let state = AppState {
        call: call.clone(),
        metrics: metrics.clone(),
        settings: Arc::new(RestSettings {
            max_body_bytes: config.server.max_body_bytes,
            response_metadata: config.server.response_metadata,
            health_timeout: Duration::from_secs(2),
        }),
    };
    let addr = listener.local_addr()?;
    let mut grpc_addr = None;
    let mut servers = Vec::new();
    match grpc_listener {
        None => {
            let routes = rest::routes(state).merge(grpc);
            servers.push((listener, edge::router::serve(routes, metrics)));
        }
        Some(grpc_listener) => {
            grpc_addr = Some(grpc_listener.local_addr()?);
            servers.push((
                listener,
                edge::router::serve(rest::routes(state), metrics.clone()),
            ));
            servers.push((grpc_listener, edge::router::serve(grpc, metrics)));
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
        limits,
        shutdown.clone(),
        hard_stop,
        config.shutdown_grace(),
        writer,
        journal,
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
    config.upstream.url = chat.url();
    config.upstream.backends = vec![
        BackendConfig::serving("demo-chat", chat.url(), DEFAULT_MODEL),
        BackendConfig::serving("demo-embed", embed.url(), DEFAULT_EMBEDDING_MODEL),
    ];
    Ok((chat, embed))
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
    limits: ConnectionLimits,
    shutdown: CancellationToken,
    hard_stop: CancellationToken,
    grace: Duration,
    writer: UsageWriter,
    journal: Option<Arc<FileJournal>>,
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
    let servers = servers
        .into_iter()
        .map(|(listener, router)| crate::server::serve(listener, router, limits, shutdown.clone()));
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
    let unrecorded = writer.stop().await;
    // The writer closed the reservations of every call it made durable: write that down.
    if let Some(journal) = journal {
        let _ = tokio::task::spawn_blocking(move || journal.stop()).await;
    }
    if unrecorded == 0 {
        tracing::info!("step3-gateway stopped; usage flushed");
    }
    unrecorded
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
            SledStore::open(path, config.store.flush_interval_ms)
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
    let durable = config.store.durability == Durability::Reservations;
    if !durable && !dir.exists() {
        return Ok(None);
    }
    let opened = FileJournal::open(&dir)
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
    let store = SledStore::open(path, 500).map_err(|e| {
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
