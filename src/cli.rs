//! Command-line interface (clap structs only).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::LogFormat;

#[derive(Debug, Parser)]
#[command(
    name = "step3-gateway",
    version,
    about = "Keys, limits, quotas and usage in front of a STEP3-VL model server"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway.
    Serve(ServeArgs),
    /// Run only the simulated STEP3-VL server (for trying things out and benchmarks).
    Simulate(SimulateArgs),
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// TOML configuration file.
    #[arg(long, short, env = "STEP3GW_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to serve on (overrides `server.listen`).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// The model server's URL (overrides `upstream.url`).
    #[arg(long)]
    pub upstream: Option<String>,
    /// The data directory (overrides `store.path`).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Start the built-in simulated STEP3-VL server and use it as the upstream.
    #[arg(long)]
    pub demo: bool,
    /// Log format (overrides `log.format`).
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormatArg>,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum LogFormatArg {
    Text,
    Json,
}

impl From<LogFormatArg> for LogFormat {
    fn from(arg: LogFormatArg) -> Self {
        match arg {
            LogFormatArg::Text => LogFormat::Text,
            LogFormatArg::Json => LogFormat::Json,
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct SimulateArgs {
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub listen: SocketAddr,
    /// The model name it serves.
    #[arg(long, default_value = crate::sim::DEFAULT_MODEL)]
    pub model: String,
    /// Delay per generated token, in milliseconds.
    #[arg(long, default_value_t = 20)]
    pub token_latency_ms: u64,
}
