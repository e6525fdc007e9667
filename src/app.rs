//! Wiring: store, gate, upstream, the doors' routes on one listener (or two), and
//! graceful shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::call::CallPath;
use crate::config::GatewayConfig;
use crate::core::admin::{NewKey, NewUser};
use crate::core::limits::KeyLimits;
use crate::core::request::RequestOptions;
use crate::core::store::Store;
use crate::core::usage_sink::usage_channel;
use crate::core::{GateSettings, Gateway, keys};
use crate::edge;
use crate::grpc;
use crate::metrics::Metrics;
use crate::rest::{self, AppState, RestSettings};
use crate::server::ConnectionLimits;
use crate::sim::{RunningSimulator, Simulator, SimulatorConfig};
use crate::store::{SledStore, UsageWriter};
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

/// A gateway serving on `addr` until [`RunningGateway::shutdown`].
pub struct RunningGateway {
    /// REST (and gRPC, unless it has a port of its own).
    pub addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    pub gateway: Arc<Gateway>,
    pub upstream: Arc<UpstreamPool>,
    pub secrets: FirstStartSecrets,
    /// The in-process simulator of `--demo`.
    pub simulator: Option<RunningSimulator>,
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
        if let Some(simulator) = self.simulator {
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

/// Opens the store, loads the gate, binds the listener and starts serving.
pub async fn start(mut config: GatewayConfig) -> anyhow::Result<RunningGateway> {
    config.validate()?;
    let simulator = if config.demo.enabled {
        let simulator = Simulator::new(SimulatorConfig {
            token_latency: Duration::from_millis(config.demo.token_latency_ms),
            // A long-running demo must not keep every request in memory.
            record_requests: false,
            ..SimulatorConfig::default()
        })
        .spawn(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .context("cannot start the demo simulator")?;
        config.upstream.url = simulator.url();
        // The demo answers with the simulator alone, whatever backends are configured.
        config.upstream.backends.clear();
        Some(simulator)
    } else {
        None
    };

    std::fs::create_dir_all(&config.store.path).with_context(|| {
        format!(
            "cannot create data directory {}",
            config.store.path.display()
        )
    })?;
    let store: Arc<dyn Store> = Arc::new(
        SledStore::open(&config.store.path, config.store.flush_interval_ms)
            .with_context(|| format!("cannot open the store in {}", config.store.path.display()))?,
    );
    let mut secrets = FirstStartSecrets::default();
    let admin_token_hash = admin_token_hash(&config, &*store, &mut secrets)?;

    let (sink, queue) = usage_channel();
    let writer = UsageWriter::spawn(
        store.clone(),
        queue,
        Duration::from_millis(config.store.flush_interval_ms),
        (config.store.call_log_retention_days > 0).then(|| {
            Duration::from_secs(config.store.call_log_retention_days.saturating_mul(86_400))
        }),
    );
    let metrics = Arc::new(Metrics::default());
    let gateway = Arc::new(Gateway::load(
        store.clone(),
        sink,
        metrics.clone(),
        admin_token_hash,
        GateSettings {
            log_bodies: config.store.log_bodies,
            default_max_tokens: config.limits.default_max_tokens,
            max_images_per_request: config.limits.max_images_per_request,
        },
    )?);
    if config.demo.enabled {
        secrets.demo_key = ensure_demo_key(&gateway, &*store)?;
    }

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
    // Know the backends' health before the first call, then keep checking.
    call.upstream.check_health().await;
    call.upstream.spawn_health_checks(shutdown.clone());
    let grpc = grpc::routes(call.clone(), shutdown.clone(), config.server.max_body_bytes)
        .context("cannot build the gRPC services")?;
    let state = AppState {
        call,
        metrics: metrics.clone(),
        settings: Arc::new(RestSettings {
            max_body_bytes: config.server.max_body_bytes,
            response_metadata: config.server.response_metadata,
            health_timeout: Duration::from_secs(2),
        }),
    };
    let mut servers = Vec::new();
    let addr;
    let mut grpc_addr = None;
    match config.server.grpc_listen {
        None => {
            let listener = bind(config.server.listen).await?;
            addr = listener.local_addr()?;
            let routes = rest::routes(state).merge(grpc);
            servers.push((listener, edge::router::serve(routes, metrics)));
        }
        Some(grpc_listen) => {
            let listener = bind(config.server.listen).await?;
            addr = listener.local_addr()?;
            servers.push((
                listener,
                edge::router::serve(rest::routes(state), metrics.clone()),
            ));
            let listener = bind(grpc_listen).await?;
            grpc_addr = Some(listener.local_addr()?);
            servers.push((listener, edge::router::serve(grpc, metrics)));
        }
    }
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
    ));
    tracing::info!(
        %addr,
        grpc = %grpc_addr.unwrap_or(addr),
        upstream = %config.upstream.url,
        data = %config.store.path.display(),
        "step3-gateway listening"
    );
    Ok(RunningGateway {
        addr,
        grpc_addr: grpc_addr.unwrap_or(addr),
        gateway,
        upstream,
        secrets,
        simulator,
        shutdown,
        task,
    })
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
    if unrecorded == 0 {
        tracing::info!("step3-gateway stopped; usage flushed");
    }
    unrecorded
}

fn admin_token_hash(
    config: &GatewayConfig,
    store: &dyn Store,
    secrets: &mut FirstStartSecrets,
) -> anyhow::Result<keys::SecretHash> {
    if let Some(token) = &config.admin.token {
        return Ok(keys::hash_secret(token.trim()));
    }
    if let Some(stored) = store.meta(ADMIN_TOKEN_META)? {
        return <[u8; 32]>::try_from(stored.as_slice())
            .map_err(|_| anyhow::anyhow!("the stored admin token hash is malformed"));
    }
    let token = format!(
        "adm-{}",
        &keys::generate_secret()[keys::SECRET_PREFIX.len()..]
    );
    let hash = keys::hash_secret(&token);
    store.put_meta(ADMIN_TOKEN_META, &hash)?;
    store.flush()?;
    secrets.admin_token = Some(token);
    Ok(hash)
}

/// Creates the demo user and key on the first demo start; returns the new secret.
fn ensure_demo_key(gateway: &Gateway, store: &dyn Store) -> anyhow::Result<Option<String>> {
    if store.meta(DEMO_KEY_META)?.is_some() {
        return Ok(None);
    }
    let user = gateway.create_user(NewUser {
        name: "demo".into(),
        ..NewUser::default()
    })?;
    let created = gateway.create_key(NewKey {
        user_id: user.id,
        name: Some("demo".into()),
        limits: KeyLimits {
            rpm_limit: Some(60),
            request_quota: Some(1000),
            token_quota: Some(1_000_000),
            ..KeyLimits::default()
        }
        .into(),
        ..NewKey::default()
    })?;
    store.put_meta(DEMO_KEY_META, created.key.id.as_bytes())?;
    store.flush()?;
    Ok(Some(created.secret))
}
