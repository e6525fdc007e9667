//! The real binary under test: `step3-gateway serve` as a child process with a written
//! `gateway.toml`, in front of a simulated model server that demands an upstream key.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use step3_gateway::sim::{RunningSimulator, SimulatorConfig};

use super::{ADMIN_TOKEN, RestApi, spawn_sim};

/// The key the simulated model server demands of the gateway.
pub const UPSTREAM_KEY: &str = "upstream-secret-key-9876";

/// A model server for the binary: 12 tokens an answer, `latency_ms` apart, behind
/// [`UPSTREAM_KEY`].
pub async fn upstream(latency_ms: u64) -> RunningSimulator {
    spawn_sim(SimulatorConfig {
        token_latency: Duration::from_millis(latency_ms),
        reply_tokens: 12,
        api_key: Some(UPSTREAM_KEY.into()),
        ..SimulatorConfig::default()
    })
    .await
}

/// The binary's `gateway.toml`: what every test shares (port 0, JSON logs, the admin token,
/// [`UPSTREAM_KEY`]) and, per test, the data directory and lines added to `[server]` and
/// `[store]`.
pub struct ConfigFile {
    upstream: String,
    data: Option<PathBuf>,
    server: String,
    store: String,
    extra: String,
}

impl ConfigFile {
    /// In front of the model server at `upstream`, with its data in `<dir>/data`.
    pub fn new(upstream: &str) -> Self {
        ConfigFile {
            upstream: upstream.to_owned(),
            data: None,
            server: String::new(),
            store: String::new(),
            extra: String::new(),
        }
    }

    /// The data directory, instead of `<dir>/data`.
    pub fn data(mut self, path: &Path) -> Self {
        self.data = Some(path.to_owned());
        self
    }

    /// Lines added to the `[server]` table.
    pub fn server(mut self, lines: &str) -> Self {
        self.server = lines.to_owned();
        self
    }

    /// Lines added to the `[store]` table.
    pub fn store(mut self, lines: &str) -> Self {
        self.store = lines.to_owned();
        self
    }

    /// Tables added at the end (`[alerts]`, …).
    pub fn extra(mut self, tables: &str) -> Self {
        self.extra = tables.to_owned();
        self
    }

    /// Writes `<dir>/gateway.toml` (replacing it) and returns its path.
    pub fn write(&self, dir: &Path) -> PathBuf {
        let data = self.data.clone().unwrap_or_else(|| dir.join("data"));
        let (upstream, server, store, extra) =
            (&self.upstream, &self.server, &self.store, &self.extra);
        let path = dir.join("gateway.toml");
        std::fs::write(
            &path,
            format!(
                "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace_secs = 10\n{server}\n\
                 [upstream]\nurl = \"{upstream}\"\napi_key = \"{UPSTREAM_KEY}\"\nhealth_interval_ms = 100\n\
                 [store]\npath = \"{}\"\n{store}\n[admin]\ntoken = \"{ADMIN_TOKEN}\"\n[log]\nformat = \"json\"\n{extra}",
                data.display()
            ),
        )
        .unwrap();
        path
    }
}

/// `step3-gateway serve --config <config>` with `RUST_LOG=<level>`, its stderr piped.
pub fn serve_command(config: &Path, level: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_step3-gateway"));
    command
        .args(["serve", "--config"])
        .arg(config)
        .env("RUST_LOG", level)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    command
}

/// The real `step3-gateway serve` as a child process, its stderr collected line by line.
pub struct GatewayProcess {
    child: Child,
    base_url: String,
    http: reqwest::Client,
    logs: Arc<Mutex<Vec<String>>>,
}

impl GatewayProcess {
    /// Starts `step3-gateway serve` with `config`, logging at `trace`, and waits for its
    /// address in the logs.
    pub async fn start(config: &Path) -> GatewayProcess {
        Self::start_logging(config, "trace").await
    }

    /// As [`GatewayProcess::start`], with `RUST_LOG=<level>` (a load test wants fewer lines).
    pub async fn start_logging(config: &Path, level: &str) -> GatewayProcess {
        Self::start_command(serve_command(config, level)).await
    }

    /// As [`GatewayProcess::start`], from a [`serve_command`] the test changed (an
    /// environment variable, say).
    pub async fn start_command(mut command: Command) -> GatewayProcess {
        let mut child = command.spawn().unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        for _ in 0..500 {
            let found = logs.lock().unwrap().iter().find_map(|line| {
                let v: Value = serde_json::from_str(line).ok()?;
                (v["fields"]["message"] == "step3-gateway listening")
                    .then(|| v["fields"]["addr"].as_str().map(str::to_owned))?
            });
            if let Some(addr) = found {
                return GatewayProcess {
                    child,
                    base_url: format!("http://{addr}"),
                    http: reqwest::Client::new(),
                    logs,
                };
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("the gateway did not start: {:?}", logs.lock().unwrap());
    }

    /// `http://<addr>`.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// The address both doors listen on.
    pub fn addr(&self) -> SocketAddr {
        self.base_url.trim_start_matches("http://").parse().unwrap()
    }

    /// The process id, for reading its figures under `/proc`.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends the signal `name` (`TERM`, `HUP`, `KILL`, …) to the process.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit: its exit status and every line it logged.
    pub async fn wait(mut self) -> (ExitStatus, Vec<String>) {
        let (status, this) = tokio::task::spawn_blocking(move || {
            let status = self.child.wait().unwrap();
            (status, self)
        })
        .await
        .unwrap();
        // Let the reader thread take the last lines.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let logs = this.logs.lock().unwrap().clone();
        (status, logs)
    }
}

impl Drop for GatewayProcess {
    /// A test that fails before it stops its gateway must not leave the process running
    /// (it would hold its port and its data dir, and outlive the test run).
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl RestApi for GatewayProcess {
    fn http(&self) -> &reqwest::Client {
        &self.http
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }
}
