//! The `step3-gateway` binary: parse the command line, run, report errors.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::error::ErrorKind;
use clap::{CommandFactory, Parser};
use step3_gateway::admin_client;
use step3_gateway::app::RunningGateway;
use step3_gateway::cli::{
    AdminTokenCommand, AdminTokenResetArgs, BackupArgs, Cli, Command, RestoreArgs, ServeArgs,
    SimulateArgs, StoreCommand, StoreCopyArgs,
};
use step3_gateway::config::{GatewayConfig, LogFormat, ServeFlags};
use step3_gateway::core::export::ExportSummary;
use step3_gateway::core::limits::KeyLimits;
use step3_gateway::progress::Progress;
use step3_gateway::sim::{Simulator, SimulatorConfig};

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
        Command::Admin(args) => {
            if args.token.is_none() {
                // A usage error (exit 2) with the usage line of `admin`, as clap gives for
                // any other missing argument.
                let mut cli = Cli::command();
                cli.build();
                let mut admin = cli.find_subcommand("admin").cloned().unwrap_or(cli);
                admin
                    .error(
                        ErrorKind::MissingRequiredArgument,
                        admin_client::MISSING_TOKEN,
                    )
                    .exit();
            }
            match admin_client::run(*args, &mut std::io::stdout().lock()).await {
                // The reader of the answer went away (`| head`): what it wanted, it has.
                Err(e) if is_broken_pipe(&e) => Ok(()),
                other => other,
            }
        }
        Command::AdminToken(AdminTokenCommand::Reset(args)) => reset_admin_token(&args),
        Command::Backup(args) => backup(args).await,
        Command::Restore(args) => restore(args).await,
        Command::Store(StoreCommand::Copy(args)) => copy_store(args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<Logged>() => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("step3-gateway: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, `: `-separated, leaving out a cause whose text the message
/// already carries (several libraries repeat their source in their own `Display`).
fn error_chain(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let cause = cause.to_string();
        if text.contains(&cause) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&cause);
    }
    text
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn init_logs(format: LogFormat, level: &str) {
    if let Err(e) = step3_gateway::telemetry::init(format == LogFormat::Json, level, None) {
        eprintln!("step3-gateway: cannot set up the logs: {e}");
    }
}

/// The configuration: file, environment, then the flags of `serve`.
fn load_config(args: &ServeArgs) -> anyhow::Result<GatewayConfig> {
    Ok(GatewayConfig::load_with(
        args.config.as_deref(),
        &ServeFlags::from(args),
    )?)
}

/// An error already written to the JSON log: `main` only sets the exit status.
#[derive(Debug, thiserror::Error)]
#[error("the error was logged")]
struct Logged;

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = load_config(&args)?;
    // Before anything logs; the exporter (if any) is checked with the rest of the config.
    config.telemetry.validate().map_err(anyhow::Error::msg)?;
    let traces = step3_gateway::telemetry::init(
        config.log.format == LogFormat::Json,
        &config.log.level,
        Some(&config.telemetry),
    )?;
    let result = run_gateway(&args, &config).await;
    if let Some(traces) = traces {
        // The batch exporter blocks while it sends its last spans.
        let _ = tokio::task::spawn_blocking(move || traces.shutdown()).await;
    }
    match result {
        // With JSON logs stderr stays one JSON object a line, the last error included.
        Err(e) if config.log.format == LogFormat::Json => {
            tracing::error!(error = %error_chain(&e), "step3-gateway stopped");
            Err(Logged.into())
        }
        other => other,
    }
}

async fn run_gateway(args: &ServeArgs, config: &GatewayConfig) -> anyhow::Result<()> {
    // Before the gateway says it listens: a SIGHUP that came after that line and before
    // this would end the process (the signal's default).
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let running = step3_gateway::app::start(config.clone()).await?;
    announce(&running, config);
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(()) = hangup.recv() => {
                // The upstream list and the TLS files are reloaded; other settings need a
                // restart.
                match load_config(args).and_then(|config| running.reload_upstreams(&config)) {
                    Ok(()) => tracing::info!("SIGHUP: upstream list reloaded"),
                    Err(e) => tracing::error!(error = %e, "SIGHUP: reload failed; keeping the current upstreams"),
                }
                if running.tls.is_some() {
                    match running.reload_tls() {
                        Ok(()) => tracing::info!("SIGHUP: TLS certificate and key reloaded"),
                        Err(e) => tracing::error!(error = %e, "SIGHUP: TLS reload failed; keeping the current certificate"),
                    }
                }
            }
        }
    }
    tracing::info!("shutting down: finishing calls in flight");
    let unrecorded = running.shutdown().await;
    if unrecorded > 0 {
        anyhow::bail!(
            "the store failed until the end: the usage of {} could not be written to {}",
            count(unrecorded as u64, "call"),
            config.store.path.display()
        );
    }
    Ok(())
}

/// The start-up banner, on stdout (logs go to stderr, which stays all JSON with
/// `--log-format json`): where the gateway serves, and the secrets made at this start,
/// shown here and never again; on a later start, how to get a new admin token.
fn announce(running: &RunningGateway, config: &GatewayConfig) {
    let text = banner(running, config, &program_name());
    // A closed stdout must not stop the gateway; the secrets are then lost, which is the
    // operator's choice of where stdout goes.
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}

/// How this binary was run (`target/release/step3-gateway` after `cargo build`), so that
/// the commands the banner suggests work as pasted.
fn program_name() -> String {
    std::env::args()
        .next()
        .filter(|name| name.contains('/'))
        .unwrap_or_else(|| "step3-gateway".into())
}

fn banner(running: &RunningGateway, config: &GatewayConfig, program: &str) -> String {
    use std::fmt::Write as _;

    let host = if running.addr.ip().is_unspecified() {
        "localhost".to_owned()
    } else {
        running.addr.ip().to_string()
    };
    let base = format!("http://{host}:{}", running.addr.port());
    let data = config.store.path.display();
    let mut text = format!("\nstep3-gateway serves REST and gRPC on {base}\n");
    match (&running.secrets.admin_token, &config.admin.token) {
        (Some(token), _) => {
            let _ = write!(
                text,
                "\nAdmin token (shown once; only its hash is stored): {token}\n  \
                 REST: Authorization: Bearer <token> on {base}/admin/v1/...\n  \
                 CLI:  {program} admin --url {base} --token <token> users list\n"
            );
        }
        (None, Some(_)) => {}
        (None, None) => {
            let _ = write!(
                text,
                "\nAdmin token: shown at the first start (only its hash is stored). Lost it? \
                 Stop the gateway and run\n  {program} admin-token reset --data-dir {data}\n"
            );
        }
    }
    let Some(simulator) = &running.simulator else {
        return text;
    };
    let _ = writeln!(
        text,
        "\nDemo mode: simulated STEP3-VL server at {}",
        simulator.url()
    );
    if let Some(embed) = &running.embedding_simulator {
        let _ = writeln!(
            text,
            "and an embedding model, {}, on a backend of its own at {}",
            step3_gateway::sim::DEFAULT_EMBEDDING_MODEL,
            embed.url()
        );
    }
    match (&running.secrets.demo_key, &running.demo_key) {
        (Some(key), _) => {
            let _ = write!(
                text,
                "Demo key (shown once): {key}\n  limits: {}\n\nTry it:\n\
                 curl {base}/v1/chat/completions \\\n  \
                 -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \\\n  \
                 -d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Describe this gateway.\"}}]}}'\n",
                describe_limits(&step3_gateway::app::DEMO_KEY_LIMITS),
                model = step3_gateway::sim::DEFAULT_MODEL,
            );
        }
        (None, Some(demo)) => {
            let _ = writeln!(
                text,
                "The demo key ({}) was shown at the first demo start (data dir {data}). Another:\n  \
                 {program} admin --url {base} --token <admin token> keys create --user {} --rpm 60",
                demo.key_id, demo.user_id
            );
        }
        (None, None) => {}
    }
    text
}

/// `60 requests a minute, 1000 requests and 1000000 tokens in all`.
fn describe_limits(limits: &KeyLimits) -> String {
    let mut parts = Vec::new();
    if let Some(rpm) = limits.rpm_limit {
        parts.push(format!("{} a minute", count(rpm.into(), "request")));
    }
    if let Some(tpm) = limits.tpm_limit {
        parts.push(format!("{} a minute", count(tpm, "token")));
    }
    let mut quotas = Vec::new();
    if let Some(requests) = limits.request_quota {
        quotas.push(count(requests, "request"));
    }
    if let Some(tokens) = limits.token_quota {
        quotas.push(count(tokens, "token"));
    }
    if let Some(images) = limits.image_quota {
        quotas.push(count(images, "image"));
    }
    if !quotas.is_empty() {
        parts.push(format!("{} in all", quotas.join(" and ")));
    }
    parts.join(", ")
}

/// `1 request`, `2 requests`.
fn count(n: u64, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// `admin-token reset`: a new admin token for the data directory, on stdout alone (so
/// that `TOKEN=$(step3-gateway admin-token reset …)` works); what to do next on stderr.
fn reset_admin_token(args: &AdminTokenResetArgs) -> anyhow::Result<()> {
    let flags = ServeFlags {
        data_dir: args.data_dir.clone(),
        ..ServeFlags::default()
    };
    let config = GatewayConfig::load_with(args.config.as_deref(), &flags)?;
    let token = step3_gateway::app::reset_admin_token(&config.store.path)?;
    let mut stdout = std::io::stdout().lock();
    // Its hash is stored already: a token that cannot be shown must be said loudly.
    writeln!(stdout, "{token}")
        .and_then(|()| stdout.flush())
        .context("the new admin token could not be printed; run admin-token reset again")?;
    eprintln!(
        "step3-gateway: a new admin token for {} (shown once; only its hash is stored); the old \
         one no longer works. Start the gateway and use it as `Authorization: Bearer <token>`.",
        config.store.path.display()
    );
    if config.admin.token.is_some() {
        eprintln!(
            "step3-gateway: note: admin.token is set here (STEP3GW_ADMIN_TOKEN or the config \
             file); a gateway started with it checks that token, not the stored one."
        );
    }
    Ok(())
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

/// `records (users, keys, calls), bytes, sha256`: what a backup holds.
fn describe_export(summary: &ExportSummary) -> String {
    format!(
        "{} ({} users, {} keys, {} hourly buckets, {} calls), {} bytes, sha256 {}",
        count(summary.records, "record"),
        summary.users,
        summary.keys,
        summary.usage,
        summary.calls,
        summary.bytes,
        summary.sha256
    )
}

/// `backup`: from the running gateway (Admin.Backup), or from a stopped one's store.
/// Ctrl-C stops it and leaves no file behind.
async fn backup(args: BackupArgs) -> anyhow::Result<()> {
    let out = args.out.clone();
    let summary = match &args.data_dir {
        Some(dir) => {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || step3_gateway::app::backup_stopped(&dir, &out))
                .await??
        }
        None => {
            let Some(token) = args.token.as_deref() else {
                let mut cli = Cli::command();
                cli.build();
                let mut sub = cli.find_subcommand("backup").cloned().unwrap_or(cli);
                sub.error(
                    ErrorKind::MissingRequiredArgument,
                    "no admin token: pass --token <TOKEN> or set STEP3GW_ADMIN_TOKEN (or \
                     --data-dir to copy a stopped gateway's store)",
                )
                .exit();
            };
            let mut progress = Progress::bytes("backup", 0);
            let mut report = |done, total| {
                progress.set_total(total);
                progress.update(done);
            };
            let copy = step3_gateway::admin_client::backup(&args.url, token, &out, &mut report);
            let summary = tokio::select! {
                copied = copy => copied,
                _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted; no backup was written")),
            };
            progress.finish();
            summary?
        }
    };
    eprintln!(
        "step3-gateway: backup written to {}: {}",
        args.out.display(),
        describe_export(&summary)
    );
    Ok(())
}

/// `store copy`: every record of one store into another; Ctrl-C stops it and leaves the
/// target as it was (a sled directory) or emptied again (Postgres).
async fn copy_store(args: StoreCopyArgs) -> anyhow::Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use step3_gateway::store_copy::{StoreLocation, copy};

    let from = StoreLocation::parse(&args.from);
    let to = StoreLocation::parse(&args.to);
    let stop = Arc::new(AtomicBool::new(false));
    let interrupt = {
        let stop = stop.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                stop.store(true, Ordering::Release);
            }
        })
    };
    let (source, target) = (from.clone(), to.clone());
    let copied = tokio::task::spawn_blocking(move || {
        let mut progress = Progress::records("copy");
        let result = copy(&source, &target, args.force, &mut |records| {
            progress.update(records);
            !stop.load(Ordering::Acquire)
        });
        progress.finish();
        result
    })
    .await?;
    interrupt.abort();
    let copied = copied?;
    let s = copied.summary;
    eprintln!(
        "step3-gateway: copied {from} into {to}: {} ({} users, {} keys, {} calls)",
        count(s.records, "record"),
        s.users,
        s.keys,
        s.calls
    );
    if let Some(aside) = copied.moved_aside {
        eprintln!(
            "step3-gateway: the store that was there is kept in {}",
            aside.display()
        );
    }
    if copied.emptied {
        eprintln!("step3-gateway: {to} held books before; they were removed (--force)");
    }
    Ok(())
}

/// `restore`: checks the file and builds the store beside the data directory before
/// anything there changes; Ctrl-C stops it and changes nothing.
async fn restore(args: RestoreArgs) -> anyhow::Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    if args.check {
        let file = args.file.clone();
        let summary = tokio::task::spawn_blocking(move || {
            let input = std::fs::File::open(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            anyhow::Ok(step3_gateway::core::export::verify_export(
                std::io::BufReader::new(input),
            )?)
        })
        .await??;
        eprintln!(
            "step3-gateway: {} is a whole backup: {}",
            args.file.display(),
            describe_export(&summary)
        );
        return Ok(());
    }
    let flags = ServeFlags {
        data_dir: args.data_dir.clone(),
        ..ServeFlags::default()
    };
    let config = GatewayConfig::load_with(args.config.as_deref(), &flags)?;
    let data_dir = config.store.path.clone();
    let size = std::fs::metadata(&args.file).map(|m| m.len()).unwrap_or(0);
    let stop = Arc::new(AtomicBool::new(false));
    let interrupt = {
        let stop = stop.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                stop.store(true, Ordering::Release);
            }
        })
    };
    let file = args.file.clone();
    let target = data_dir.clone();
    let restored = tokio::task::spawn_blocking(move || {
        let mut progress = Progress::bytes("restore", size);
        let result = step3_gateway::app::restore(&file, &target, args.force, &mut |read| {
            progress.update(read);
            !stop.load(Ordering::Acquire)
        });
        progress.finish();
        result
    })
    .await?;
    interrupt.abort();
    let restored = restored?;
    eprintln!(
        "step3-gateway: restored {} into {}: {}",
        args.file.display(),
        data_dir.display(),
        describe_export(&restored.summary)
    );
    if let Some(aside) = restored.moved_aside {
        eprintln!(
            "step3-gateway: the store that was there is kept in {}",
            aside.display()
        );
    }
    Ok(())
}
