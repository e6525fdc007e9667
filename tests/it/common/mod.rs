//! The test harness: a real gateway on 127.0.0.1:0 with a fresh sled directory, in front
//! of the simulated STEP3-VL server (also on port 0) whose faults each test scripts.
//! [`binary`] starts the compiled binary instead; [`RestApi`] calls either over REST.

pub mod binary;
pub mod browser;
pub mod postgres;
pub mod redis;
mod rest;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use step3_gateway::app::{self, RunningGateway};
use step3_gateway::config::{BackendConfig, GatewayConfig, SecretUrl, StoreBackend};
use step3_gateway::grpc::pb;
use step3_gateway::sim::{DEFAULT_MODEL, RunningSimulator, Simulator, SimulatorConfig};
use tempfile::TempDir;
use tonic::codegen::InterceptedService;
use tonic::transport::{Channel, Endpoint};

pub use rest::RestApi;

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";
pub const MODEL: &str = DEFAULT_MODEL;
/// The embedding model of [`Builder::embedding_backend`].
pub const EMBED_MODEL: &str = step3_gateway::sim::DEFAULT_EMBEDDING_MODEL;

type ConfigTweak = Box<dyn FnOnce(&mut GatewayConfig)>;

pub struct Builder {
    sim: SimulatorConfig,
    tweaks: Vec<ConfigTweak>,
    embedding_backend: bool,
    postgres_url: Option<String>,
    redis: Option<(String, String)>,
}

/// `STEP3_TEST_STORE=shared`: every gateway the builder starts keeps its books in a
/// fresh database of the test run's Postgres instead of sled, and counts its limits in the
/// test run's Redis under a fresh prefix (`scripts/test.sh` runs the store-agnostic
/// suites both ways).
pub fn shared_by_default() -> bool {
    std::env::var("STEP3_TEST_STORE").is_ok_and(|store| store == "shared")
}

impl Builder {
    /// A second backend, a simulator serving [`EMBED_MODEL`] (8 dimensions), beside the one
    /// serving the chat model: a pool that routes by model, as in front of two servers.
    pub fn embedding_backend(mut self) -> Self {
        self.embedding_backend = true;
        self
    }

    pub fn sim(mut self, f: impl FnOnce(&mut SimulatorConfig)) -> Self {
        f(&mut self.sim);
        self
    }

    /// The shared store (Postgres) at `url` instead of sled: replicas given one URL share
    /// their keys and books.
    pub fn shared_store(mut self, url: &str) -> Self {
        self.postgres_url = Some(url.to_owned());
        self
    }

    /// The shared limits in the Redis at `url`, under `prefix`: replicas given the same
    /// pair share them.
    pub fn shared_limits(mut self, (url, prefix): &(String, String)) -> Self {
        self.redis = Some((url.clone(), prefix.clone()));
        self
    }

    pub fn config(mut self, f: impl FnOnce(&mut GatewayConfig) + 'static) -> Self {
        self.tweaks.push(Box::new(f));
        self
    }

    pub async fn start(self) -> TestGateway {
        let sim = spawn_sim(self.sim).await;
        let embed_sim = match self.embedding_backend {
            true => Some(
                spawn_sim(SimulatorConfig {
                    embedding_model: Some(EMBED_MODEL.into()),
                    embedding_dimensions: 8,
                    ..SimulatorConfig::default()
                })
                .await,
            ),
            false => None,
        };
        let dir = tempfile::tempdir().unwrap();
        let mut config = GatewayConfig::default();
        config.server.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        config.server.shutdown_grace_secs = 5;
        config.upstream.url = sim.url();
        config.store.path = dir.path().join("data");
        config.store.flush_interval_ms = 50;
        config.upstream.health_interval_ms = 100;
        config.admin.token = Some(ADMIN_TOKEN.into());
        let postgres_url = self
            .postgres_url
            .or_else(|| shared_by_default().then(postgres::fresh_database));
        let redis = match self.redis {
            Some(redis) => Some(redis),
            None if shared_by_default() => Some(redis::fresh_prefix()),
            None => None,
        };
        if let Some(url) = postgres_url {
            config.store.backend = StoreBackend::Shared;
            config.store.postgres_url = Some(SecretUrl::new(url));
        }
        if let Some((url, prefix)) = redis {
            config.store.redis_url = Some(SecretUrl::new(url));
            config.store.redis_prefix = prefix;
        }
        if let Some(embed) = &embed_sim {
            config.upstream.backends = vec![
                BackendConfig::serving("chat", sim.url(), MODEL),
                BackendConfig::serving("embed", embed.url(), EMBED_MODEL),
            ];
        }
        for tweak in self.tweaks {
            tweak(&mut config);
        }
        let gateway = app::start(config.clone()).await.unwrap();
        TestGateway {
            http: reqwest::Client::new(),
            gateway: Some(gateway),
            sim,
            embed_sim,
            config,
            _dir: dir,
        }
    }
}

pub struct TestGateway {
    pub http: reqwest::Client,
    gateway: Option<RunningGateway>,
    pub sim: RunningSimulator,
    /// The embedding model's backend, when the builder asked for one.
    pub embed_sim: Option<RunningSimulator>,
    pub config: GatewayConfig,
    _dir: TempDir,
}

/// A key made through the admin API, with its secret.
#[derive(Clone, Debug)]
pub struct TestKey {
    pub id: String,
    pub user_id: String,
    pub secret: String,
}

impl TestGateway {
    pub fn builder() -> Builder {
        Builder {
            sim: SimulatorConfig::default(),
            tweaks: Vec::new(),
            embedding_backend: false,
            postgres_url: None,
            redis: None,
        }
    }

    pub async fn start() -> Self {
        Self::builder().start().await
    }

    pub fn running(&self) -> &RunningGateway {
        self.gateway.as_ref().unwrap()
    }

    /// Stops the gateway (graceful, flushing) and starts it again on the same data dir.
    pub async fn restart(&mut self) {
        self.stop().await;
        let mut config = self.config.clone();
        config.server.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        self.gateway = Some(app::start(config).await.unwrap());
    }

    /// Takes the running gateway out (to shut it down concurrently); `restart` brings it back.
    pub fn take_running(&mut self) -> RunningGateway {
        self.gateway.take().unwrap()
    }

    pub async fn stop(&mut self) {
        if let Some(gateway) = self.gateway.take() {
            gateway.shutdown().await;
        }
    }
}

impl RestApi for TestGateway {
    fn http(&self) -> &reqwest::Client {
        &self.http
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.running().url())
    }
}

/// Adds `authorization: Bearer <token>` to every gRPC call.
#[derive(Clone)]
pub struct Bearer(pub String);

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        let value = format!("Bearer {}", self.0).parse().unwrap();
        request.metadata_mut().insert("authorization", value);
        Ok(request)
    }
}

pub type ChatClient = pb::chat_client::ChatClient<InterceptedService<Channel, Bearer>>;
pub type AdminClient = pb::admin_client::AdminClient<InterceptedService<Channel, Bearer>>;

impl TestGateway {
    pub async fn channel(&self) -> Channel {
        Endpoint::from_shared(self.running().grpc_url())
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    pub async fn grpc_chat(&self, secret: &str) -> ChatClient {
        pb::chat_client::ChatClient::with_interceptor(
            self.channel().await,
            Bearer(secret.to_owned()),
        )
    }

    pub async fn grpc_admin(&self) -> AdminClient {
        pb::admin_client::AdminClient::with_interceptor(
            self.channel().await,
            Bearer(ADMIN_TOKEN.to_owned()),
        )
    }
}

/// The books of a stopped gateway, as its configuration names them (sled or shared).
pub fn open_store(config: &GatewayConfig) -> Box<dyn step3_gateway::core::store::Store> {
    use step3_gateway::store::{PostgresStore, SledStore};
    match &config.store.postgres_url {
        Some(url) if config.store.backend == StoreBackend::Shared => Box::new(
            PostgresStore::open(url.expose(), &config.store.path, Duration::from_secs(5), 2)
                .unwrap(),
        ),
        _ => Box::new(SledStore::open(&config.store.path).unwrap()),
    }
}

/// The simulated model server on a port of its own.
pub async fn spawn_sim(config: SimulatorConfig) -> RunningSimulator {
    Simulator::new(config)
        .spawn(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap()
}

/// The virtualenv's Python (`STEP3_TEST_PYTHON`, else `.venv/bin/python`), made by
/// `scripts/test.sh`; the real-client tests fail loudly without it.
pub fn python() -> PathBuf {
    let python = std::env::var_os("STEP3_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"));
    assert!(
        python.exists(),
        "{} not found: run scripts/test.sh, which creates the virtualenv with the pinned \
         packages of tests/python/requirements.txt",
        python.display()
    );
    python
}

/// Runs `script` (a path from the crate root) with the virtualenv's Python and `env` added
/// to the child's environment; asserts it succeeded and returns its stdout and stderr.
pub async fn run_python(script: &str, env: Vec<(&'static str, String)>) -> (String, String) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(script);
    let python = python();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .arg(script)
            .envs(env)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        output.status.success(),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    (stdout, stderr)
}

/// A program installed next to `python()` in the virtualenv's `bin` (e.g. `grpcurl`).
pub fn venv_program(name: &str) -> PathBuf {
    let python = python();
    let program = python.with_file_name(name);
    assert!(
        program.exists(),
        "{} not found: run scripts/test.sh, which installs it into the virtualenv",
        program.display()
    );
    program
}

/// The rest of a streamed body, as text.
pub async fn read_rest(
    stream: &mut (impl futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin),
) -> String {
    use futures_util::StreamExt;
    let mut text = String::new();
    while let Some(chunk) = stream.next().await {
        text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    text
}

/// Waits (bounded, two seconds) until the simulator has seen `n` streams cancelled.
pub async fn wait_for_cancelled_streams(sim: &step3_gateway::sim::Simulator, n: u64) {
    for _ in 0..200 {
        if sim.stats().streams_cancelled >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A one-message text request, streamed.
pub fn stream_body(text: &str) -> Value {
    let mut body = chat_body(text);
    body["stream"] = json!(true);
    body
}

/// A one-message text request.
pub fn chat_body(text: &str) -> Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": text}]})
}

/// A one-message text request for the gRPC door.
pub fn chat_request(text: &str) -> pb::ChatRequest {
    pb::ChatRequest {
        model: MODEL.into(),
        messages: vec![pb::Message {
            role: "user".into(),
            text: text.into(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Asserts the status, naming the body when it differs; returns the body.
pub async fn expect_status(response: reqwest::Response, status: StatusCode) -> String {
    let actual = response.status();
    let text = response.text().await.unwrap();
    assert_eq!(actual, status, "{text}");
    text
}

/// Asserts the OpenAI error shape and returns the error object.
pub async fn expect_error(response: reqwest::Response, status: StatusCode) -> Value {
    assert_eq!(response.status(), status);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        content_type.starts_with("application/json"),
        "{content_type}"
    );
    let body: Value = response.json().await.unwrap();
    let error = body["error"].clone();
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(error["type"].is_string(), "{body}");
    assert!(
        error.get("param").is_some() && error.get("code").is_some(),
        "{body}"
    );
    error
}

/// Parses an SSE body into its `data:` payloads.
pub fn sse_payloads(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter_map(|event| event.lines().find_map(|line| line.strip_prefix("data: ")))
        .map(str::to_owned)
        .collect()
}
