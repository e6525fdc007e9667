//! The `step3-gateway` binary: parse the command line, run, report errors.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use step3_gateway::admin_client;
use step3_gateway::cli::{Cli, Command, ServeArgs, SimulateArgs};
use step3_gateway::config::{GatewayConfig, LogFormat};
use step3_gateway::sim::{Simulator, SimulatorConfig};
use tracing_subscriber::EnvFilter;

// glibc's malloc was ~18% of the instructions of a proxied call (callgrind); mimalloc's
// thread-local free lists cost a fraction of that. BENCHMARKS.md has the figures.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Simulate(args) => simulate(args).await,
        Command::Admin(args) => admin_client::run(args, &mut std::io::stdout().lock()).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("step3-gateway: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logs(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// The configuration: file, environment, then the flags of `serve`.
fn load_config(args: &ServeArgs) -> anyhow::Result<GatewayConfig> {
    let mut config = GatewayConfig::load(args.config.as_deref())?;
    if let Some(listen) = args.listen {
        config.server.listen = listen;
    }
    if let Some(upstream) = &args.upstream {
        config.upstream.url = upstream.clone();
    }
    if let Some(dir) = &args.data_dir {
        config.store.path = dir.clone();
    }
    if let Some(format) = args.log_format {
        config.log.format = format.into();
    }
    config.demo.enabled |= args.demo;
    Ok(config)
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = load_config(&args)?;
    init_logs(config.log.format, &config.log.level);

    let running = step3_gateway::app::start(config.clone()).await?;
    announce(&running, &config);
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(()) = hangup.recv() => {
                // Only the upstream list is reloaded; other settings need a restart.
                match load_config(&args).and_then(|config| running.reload_upstreams(&config)) {
                    Ok(()) => tracing::info!("SIGHUP: upstream list reloaded"),
                    Err(e) => tracing::error!(error = %e, "SIGHUP: reload failed; keeping the current upstreams"),
                }
            }
        }
    }
    tracing::info!("shutting down: finishing calls in flight");
    let unrecorded = running.shutdown().await;
    if unrecorded > 0 {
        anyhow::bail!(
            "the store failed until the end: the usage of {unrecorded} calls could not be written to {}",
            config.store.path.display()
        );
    }
    Ok(())
}

/// The one-time banner: secrets made at this start are shown here and never again.
fn announce(running: &step3_gateway::app::RunningGateway, config: &GatewayConfig) {
    let port = running.addr.port();
    let host = if running.addr.ip().is_unspecified() {
        "localhost".to_owned()
    } else {
        running.addr.ip().to_string()
    };
    let base = format!("http://{host}:{port}");
    if let Some(token) = &running.secrets.admin_token {
        eprintln!(
            "\nAdmin token (shown once; only its hash is stored): {token}\n\
             Use it as `Authorization: Bearer <token>` on {base}/admin/v1/...\n"
        );
    }
    if let Some(simulator) = &running.simulator {
        eprintln!(
            "Demo mode: simulated STEP3-VL server at {}",
            simulator.url()
        );
        match &running.secrets.demo_key {
            Some(key) => eprintln!(
                "Demo key (shown once): {key}\n\nTry it:\n\
                 curl {base}/v1/chat/completions \\\n  \
                 -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \\\n  \
                 -d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Describe this gateway.\"}}]}}'\n",
                model = step3_gateway::sim::DEFAULT_MODEL,
            ),
            None => eprintln!(
                "The demo key was created on the first demo start (data dir {}); create more with POST {base}/admin/v1/keys\n",
                config.store.path.display()
            ),
        }
    }
}

async fn simulate(args: SimulateArgs) -> anyhow::Result<()> {
    init_logs(LogFormat::Text, "info");
    let running = Simulator::new(SimulatorConfig {
        model: args.model,
        token_latency: Duration::from_millis(args.token_latency_ms),
        record_requests: false,
        ..SimulatorConfig::default()
    })
    .spawn(args.listen)
    .await?;
    tracing::info!(url = %running.url(), "simulated STEP3-VL server listening");
    shutdown_signal().await;
    running.shutdown().await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}
