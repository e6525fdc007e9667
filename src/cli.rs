//! Command-line interface (clap structs only).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{ArgGroup, Parser, Subcommand};

use crate::config::LogFormat;
use crate::core::catalogue::ModelRecord;
use crate::core::limits::{KeyLimits, Limits, UserLimits};

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
    /// Administer a running gateway over gRPC (users, keys, usage, call log).
    Admin(Box<AdminArgs>),
    /// The admin token kept in a data directory (when `admin.token` is not configured).
    #[command(subcommand)]
    AdminToken(AdminTokenCommand),
    /// A consistent copy of the books (users, keys by hash, settings, counters, hourly
    /// usage, the call log) in the portable export format, from a running gateway or, with
    /// --data-dir, from a stopped one's store.
    #[command(visible_alias = "export")]
    Backup(BackupArgs),
    /// Bring a backup (or export) back into a data directory; the gateway must be stopped.
    #[command(visible_alias = "import")]
    Restore(RestoreArgs),
    /// Moving between stores: a sled data directory into Postgres (for several replicas),
    /// or back.
    #[command(subcommand)]
    Store(StoreCommand),
}

#[derive(Debug, clap::Args)]
pub struct BackupArgs {
    /// The file to write (written under a hidden name and renamed when complete).
    #[arg(long, short)]
    pub out: PathBuf,
    /// Read a stopped gateway's store in this directory instead of asking the gateway.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// The running gateway's address.
    #[arg(
        long,
        env = "STEP3GW_ADMIN_URL",
        default_value = "http://127.0.0.1:8080",
        value_parser = gateway_url
    )]
    pub url: String,
    /// The admin token (online backups).
    #[arg(long, env = "STEP3GW_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct RestoreArgs {
    /// The backup or export file.
    pub file: PathBuf,
    /// The gateway's TOML configuration file, for `store.path`.
    #[arg(long, short, env = "STEP3GW_CONFIG")]
    pub config: Option<PathBuf>,
    /// The data directory to restore into (overrides `store.path`).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Move a store already in the data directory aside (to `<dir>.before-restore-<time>`)
    /// instead of refusing.
    #[arg(long)]
    pub force: bool,
    /// Only check the file (every line, the count and the checksum); change nothing.
    #[arg(long)]
    pub check: bool,
}

#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Copy every record (settings, users, keys by hash, counters, hourly usage, the call
    /// log) of one store into another: a sled data directory into Postgres to move to
    /// several replicas, or back. Stop the gateways first: a running gateway's data
    /// directory is refused.
    Copy(StoreCopyArgs),
}

#[derive(Debug, clap::Args)]
pub struct StoreCopyArgs {
    /// The store to copy: a data directory, or a `postgres://` URL.
    #[arg(long)]
    pub from: String,
    /// Where to: a data directory, or a `postgres://` URL; it must hold no books.
    #[arg(long)]
    pub to: String,
    /// Copy into a target that holds books: a sled store there is moved aside (into
    /// `before-copy-<time>/`), a Postgres database emptied first.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Subcommand)]
pub enum AdminTokenCommand {
    /// Make a new admin token, print it once and keep only its hash; the old token stops
    /// working. Run it with the gateway stopped (a running gateway holds the data directory).
    Reset(AdminTokenResetArgs),
}

#[derive(Debug, clap::Args)]
pub struct AdminTokenResetArgs {
    /// The gateway's TOML configuration file, for `store.path`.
    #[arg(long, short, env = "STEP3GW_CONFIG")]
    pub config: Option<PathBuf>,
    /// The data directory (overrides `store.path`).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
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

/// `step3-gateway admin`: one Admin RPC per subcommand; answers are printed as JSON.
///
/// `--url` and `--token` are global: they may come after the subcommand too.
#[derive(Debug, clap::Args)]
pub struct AdminArgs {
    /// The gateway's gRPC address.
    #[arg(
        long,
        global = true,
        env = "STEP3GW_ADMIN_URL",
        default_value = "http://127.0.0.1:8080",
        value_parser = gateway_url
    )]
    pub url: String,
    /// The admin token (the same variable the gateway reads as `admin.token`). Required;
    /// checked after parsing, because clap does not allow a global argument to be required.
    #[arg(
        long,
        global = true,
        env = "STEP3GW_ADMIN_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    #[command(subcommand)]
    pub command: AdminCommand,
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Users: the people or organisations keys belong to.
    #[command(subcommand)]
    Users(UsersCommand),
    /// API keys: limits, quotas, expiry, model allowlist, rotation.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Usage of a key or of all of a user's keys, by hour or day.
    Usage(UsageArgs),
    /// The call log, newest first.
    Calls(CallsArgs),
    /// Alert channels.
    #[command(subcommand)]
    Alerts(AlertsCommand),
    /// Prices of model versions.
    #[command(subcommand)]
    Prices(PricesCommand),
    /// A user's usage of a period as invoice lines (JSON, or CSV with `--csv`).
    Invoice(InvoiceArgs),
    /// The model catalogue: models, aliases, versions, rollout, deprecations.
    #[command(subcommand)]
    Models(ModelsCommand),
    /// The audit log of admin changes, newest first.
    Audit(PageArgs),
}

#[derive(Debug, Subcommand)]
pub enum PricesCommand {
    /// Every price, oldest first.
    List {
        #[arg(long)]
        model: Option<String>,
    },
    /// A new price for a model version, from now (or a later `--from`) on.
    Add(PriceArgs),
}

#[derive(Debug, clap::Args)]
pub struct PriceArgs {
    /// The model version (a name the model server serves) or model.
    #[arg(long)]
    pub model: String,
    /// When it takes effect, seconds since the Unix epoch (default: now).
    #[arg(long = "from")]
    pub effective_from: Option<i64>,
    /// Per million prompt tokens.
    #[arg(long = "prompt", value_name = "AMOUNT", value_parser = parse_money)]
    pub prompt_per_million: Option<String>,
    /// Per million completion tokens.
    #[arg(long = "completion", value_name = "AMOUNT", value_parser = parse_money)]
    pub completion_per_million: Option<String>,
    /// Per second of model time.
    #[arg(long, value_name = "AMOUNT", value_parser = parse_money)]
    pub per_second: Option<String>,
    /// The least a served call costs.
    #[arg(long = "minimum", value_name = "AMOUNT", value_parser = parse_money)]
    pub per_call_minimum: Option<String>,
    /// Per image of a tier: `TIER=AMOUNT` (repeat for several).
    #[arg(long = "image", value_name = "TIER=AMOUNT", value_parser = parse_tier_price)]
    pub images: Vec<(String, String)>,
}

/// `small=0.001`.
fn parse_tier_price(text: &str) -> Result<(String, String), String> {
    let (tier, amount) = text
        .split_once('=')
        .ok_or_else(|| format!("`{text}`: write TIER=AMOUNT, e.g. small=0.001"))?;
    Ok((tier.trim().to_owned(), parse_money(amount)?))
}

#[derive(Debug, clap::Args)]
pub struct InvoiceArgs {
    #[arg(long = "user", value_name = "ID")]
    pub user_id: String,
    /// Start, seconds since the Unix epoch (default: this month's start).
    #[arg(long)]
    pub from: Option<i64>,
    /// End, seconds since the Unix epoch (default: this month's end).
    #[arg(long)]
    pub to: Option<i64>,
    /// CSV lines instead of JSON.
    #[arg(long)]
    pub csv: bool,
}

#[derive(Debug, Subcommand)]
pub enum ModelsCommand {
    /// Every model of the catalogue.
    List,
    /// One model, by its name.
    Get { name: String },
    /// Create a model, or replace the one of its name whole, from a JSON file (`-`:
    /// standard input) in the shape `GET /admin/v1/models/{name}` answers with.
    Put {
        #[arg(long, value_parser = model_file)]
        file: ModelRecord,
    },
    /// Remove a model: its names are passed to the model server as they are again.
    Delete { name: String },
}

#[derive(Debug, Subcommand)]
pub enum AlertsCommand {
    /// Send a test message to a channel (or to every channel) now; fails unless every
    /// message was delivered.
    Test {
        /// The channel's `name` in `[[alerts.channels]]`; absent: every channel.
        #[arg(long)]
        channel: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum UsersCommand {
    /// All users.
    List,
    /// Create a user.
    Create {
        #[arg(long)]
        name: String,
        #[arg(long)]
        email: Option<String>,
        /// The identity provider's subject (a JWT's user claim) this user stands for.
        #[arg(long)]
        subject: Option<String>,
        #[command(flatten)]
        limits: UserLimitArgs,
    },
    /// One user.
    Get { id: String },
    /// Change a user's name, email or active flag.
    Update(UserUpdateArgs),
    /// Deactivate the user: all of the user's keys stop working at once.
    Deactivate { id: String },
}

#[derive(Debug, clap::Args)]
pub struct UserUpdateArgs {
    pub id: String,
    #[arg(long)]
    pub name: Option<String>,
    #[arg(long, conflicts_with = "clear_email")]
    pub email: Option<String>,
    /// Remove the user's email.
    #[arg(long)]
    pub clear_email: bool,
    /// The identity provider's subject this user stands for (`--clear subject` removes it).
    #[arg(long)]
    pub subject: Option<String>,
    #[arg(long)]
    pub active: Option<bool>,
    #[command(flatten)]
    pub limits: UserLimitArgs,
    /// Remove a limit (repeat for several).
    #[arg(long, value_name = "LIMIT", value_parser = user_limit_name)]
    pub clear: Vec<String>,
}

/// Limits on the sum of a user's keys.
#[derive(Debug, clap::Args)]
pub struct UserLimitArgs {
    /// Requests per minute, all of the user's keys together.
    #[arg(long = "rpm", value_name = "N")]
    pub rpm_limit: Option<u32>,
    /// Tokens per minute, all of the user's keys together.
    #[arg(long = "tpm", value_name = "N")]
    pub tpm_limit: Option<u64>,
    /// Calls in flight at once, all of the user's keys together.
    #[arg(long, value_name = "N")]
    pub max_concurrent: Option<u32>,
    /// An address or CIDR all of the user's keys may be used from (repeat for several);
    /// none means anywhere.
    #[arg(long = "allow-ip", value_name = "CIDR", value_parser = parse_cidr)]
    pub allowed_ips: Vec<String>,
    /// Spend of all of the user's keys, in the configured currency (e.g. `100.00`).
    #[arg(long, value_name = "AMOUNT", value_parser = parse_money)]
    pub budget: Option<String>,
    /// When the budget starts again.
    #[arg(long, value_name = "PERIOD", value_parser = parse_period)]
    pub period: Option<String>,
}

/// An amount of money, checked before it is sent.
fn parse_money(text: &str) -> Result<String, String> {
    crate::core::money::Money::parse(text).map(|m| m.to_string())
}

/// `day`, `week` or `month`, checked before it is sent.
fn parse_period(text: &str) -> Result<String, String> {
    text.parse::<crate::core::period::Period>()
        .map(|p| p.as_str().to_owned())
}

/// An allowlist entry, checked before it is sent.
fn parse_cidr(entry: &str) -> Result<String, String> {
    crate::core::access::IpAllowlist::parse(&[entry])?;
    Ok(entry.trim().to_owned())
}

/// A user field `users update --clear` removes: a limit of core's `UserLimits`, or
/// `subject`.
fn user_limit_name(name: &str) -> Result<String, String> {
    let mut names = UserLimits::field_names();
    names.push("subject".to_owned());
    clearable(name, names)
}

/// A key field `keys update --clear` removes: a limit, `expires_at` or `models`.
fn key_field_name(name: &str) -> Result<String, String> {
    let mut names = KeyLimits::field_names();
    names.extend(["expires_at".to_owned(), "models".to_owned()]);
    clearable(name, names)
}

fn clearable(name: &str, names: Vec<String>) -> Result<String, String> {
    if names.iter().any(|n| n == name) {
        Ok(name.to_owned())
    } else {
        Err(format!(
            "not a field to clear; one of: {}",
            names.join(", ")
        ))
    }
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Keys (no secrets), a page at a time.
    List {
        /// Only this user's keys.
        #[arg(long = "user", value_name = "ID")]
        user_id: Option<String>,
        #[command(flatten)]
        page: PageArgs,
    },
    /// Create a key; the answer holds the secret, the only time it is shown.
    Create(KeyCreateArgs),
    /// One key, with its usage.
    Get { id: String },
    /// Change a key's limits, allowlist or active flag; `--clear` removes a limit.
    Update(KeyUpdateArgs),
    /// Revoke the key for good; its usage history stays.
    Revoke { id: String },
    /// A new secret for the same key; the old one keeps working for the grace period.
    Rotate {
        id: String,
        /// How long the old secret keeps working (server default: 24 hours; 0 ends it now).
        #[arg(long)]
        grace_seconds: Option<u64>,
    },
}

// No doc comment: clap would show it as the `about` of every command that flattens this.
#[derive(Debug, clap::Args)]
pub struct KeyLimitArgs {
    /// Requests per minute.
    #[arg(long = "rpm", value_name = "N")]
    pub rpm_limit: Option<u32>,
    /// Tokens per minute.
    #[arg(long = "tpm", value_name = "N")]
    pub tpm_limit: Option<u64>,
    /// Calls in flight at once.
    #[arg(long, value_name = "N")]
    pub max_concurrent: Option<u32>,
    /// Images in the key's lifetime.
    #[arg(long, value_name = "N")]
    pub image_quota: Option<u64>,
    /// Images one request may carry.
    #[arg(long, value_name = "N")]
    pub max_images_per_request: Option<u32>,
    /// Requests in the key's lifetime.
    #[arg(long)]
    pub request_quota: Option<u64>,
    /// Tokens (prompt + completion) in the key's lifetime.
    #[arg(long)]
    pub token_quota: Option<u64>,
    /// A lifetime such as `30d` or `12h`.
    #[arg(long, value_parser = parse_lifetime, conflicts_with = "expires_at")]
    pub expires_in: Option<String>,
    /// Expiry in seconds since the Unix epoch.
    #[arg(long)]
    pub expires_at: Option<i64>,
    /// A model the key may use (repeat for several); none means every model.
    #[arg(long = "model", value_name = "MODEL")]
    pub models: Vec<String>,
    /// An address or CIDR the key may be used from (repeat for several); none means
    /// anywhere.
    #[arg(long = "allow-ip", value_name = "CIDR", value_parser = parse_cidr)]
    pub allowed_ips: Vec<String>,
    /// Spend, in the configured currency (e.g. `25.00`).
    #[arg(long, value_name = "AMOUNT", value_parser = parse_money)]
    pub budget: Option<String>,
    /// When the quotas and the budget start again (none: the key's lifetime).
    #[arg(long, value_name = "PERIOD", value_parser = parse_period)]
    pub period: Option<String>,
    /// `false`: the response cache never answers this key's calls.
    #[arg(long, value_name = "BOOL")]
    pub cache: Option<bool>,
}

#[derive(Debug, clap::Args)]
pub struct KeyCreateArgs {
    /// The user the key belongs to.
    #[arg(long = "user", value_name = "ID")]
    pub user_id: String,
    #[arg(long, default_value = "")]
    pub name: String,
    #[command(flatten)]
    pub limits: KeyLimitArgs,
}

#[derive(Debug, clap::Args)]
pub struct KeyUpdateArgs {
    pub id: String,
    #[arg(long)]
    pub name: Option<String>,
    #[command(flatten)]
    pub limits: KeyLimitArgs,
    #[arg(long)]
    pub active: Option<bool>,
    /// A limit to remove (repeat for several).
    #[arg(long, value_name = "FIELD", value_parser = key_field_name)]
    pub clear: Vec<String>,
}

#[derive(Debug, clap::Args)]
#[command(group(ArgGroup::new("subject").required(true).args(["key_id", "user_id"])))]
pub struct UsageArgs {
    #[arg(long = "key", value_name = "ID")]
    pub key_id: Option<String>,
    /// All of this user's keys.
    #[arg(long = "user", value_name = "ID")]
    pub user_id: Option<String>,
    /// Start, in seconds since the Unix epoch (server default: 30 days before `--to`).
    #[arg(long)]
    pub from: Option<i64>,
    /// End, in seconds since the Unix epoch (server default: now).
    #[arg(long)]
    pub to: Option<i64>,
    #[arg(long, value_enum)]
    pub group_by: Option<UsageGroupingArg>,
    /// One bucket per model instead of one per period.
    #[arg(long)]
    pub by_model: bool,
    /// One bucket per key too (with --user).
    #[arg(long)]
    pub by_key: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum UsageGroupingArg {
    Hour,
    Day,
    Month,
}

#[derive(Debug, clap::Args)]
pub struct CallsArgs {
    #[arg(long = "key", value_name = "ID")]
    pub key_id: Option<String>,
    #[arg(long = "user", value_name = "ID")]
    pub user_id: Option<String>,
    #[arg(long)]
    pub model: Option<String>,
    /// Only calls answered with this HTTP status.
    #[arg(long)]
    pub status: Option<u32>,
    /// Only calls at or after this time (seconds since the Unix epoch).
    #[arg(long)]
    pub from: Option<i64>,
    #[command(flatten)]
    pub page: PageArgs,
}

#[derive(Debug, clap::Args)]
pub struct PageArgs {
    /// At most this many (0: the server's default).
    #[arg(long, default_value_t = 0)]
    pub page_size: u32,
    /// `next_page_token` of the previous answer.
    #[arg(long, default_value = "")]
    pub page_token: String,
}

/// An `http://` or `https://` URL with a host, checked here so that a typo is a usage
/// error rather than a connection failure.
/// Reads and checks a model's JSON here, so a typo is a usage error before anything is sent.
fn model_file(path: &str) -> Result<ModelRecord, String> {
    let text = if path == "-" {
        std::io::read_to_string(std::io::stdin()).map_err(|e| format!("cannot read stdin: {e}"))?
    } else {
        std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?
    };
    let model: ModelRecord =
        serde_json::from_str(&text).map_err(|e| format!("{path} is not a model: {e}"))?;
    model.validate().map_err(|e| e.to_string())?;
    Ok(model)
}

fn gateway_url(text: &str) -> Result<String, String> {
    match url::Url::parse(text) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {
            Ok(text.to_owned())
        }
        _ => Err("expected the gateway's address as a URL, e.g. http://127.0.0.1:8080".into()),
    }
}

/// Checks a lifetime here, so a typo is a usage error; it is still sent as text because
/// the server resolves it against its own clock.
fn parse_lifetime(text: &str) -> Result<String, humantime::DurationError> {
    humantime::parse_duration(text).map(|_| text.to_owned())
}

impl From<&ServeArgs> for crate::config::ServeFlags {
    fn from(args: &ServeArgs) -> Self {
        crate::config::ServeFlags {
            listen: args.listen,
            upstream: args.upstream.clone(),
            data_dir: args.data_dir.clone(),
            log_format: args.log_format.map(LogFormat::from),
            demo: args.demo,
        }
    }
}
