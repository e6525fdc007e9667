//! Configuration: defaults, then a TOML file, then `STEP3GW_*` environment variables, then
//! command-line flags. Unknown keys are errors that name the key.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Data, Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

use crate::backup::BackupConfig;
use crate::core::access::IpAllowlist;
use crate::core::catalogue::{ModelRecord, validate_all};
use crate::core::images::ImageUrlPolicy;
use crate::core::limits::KeyLimits;
use crate::core::money::Money;
use crate::core::period::Calendar;
use crate::core::pricing::{ImageTier, ImageTiers, PriceRecord};
use crate::core::time::Clock;
use crate::notify::settings::AlertsConfig;
use crate::telemetry::TelemetryConfig;
use crate::tls::TlsConfig;
use crate::upstream::{BackendSettings, PoolSettings};

/// Environment variables that configure the gateway start with this, e.g.
/// `STEP3GW_UPSTREAM_URL` for `[upstream] url`.
pub const ENV_PREFIX: &str = "STEP3GW_";

const SECTIONS: [&str; 15] = [
    "alerts",
    "billing",
    "cache",
    "console",
    "backup",
    "server",
    "upstream",
    "store",
    "admin",
    "demo",
    "log",
    "limits",
    "image_policy",
    "jwt",
    "telemetry",
];

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub store: StoreConfig,
    pub admin: AdminConfig,
    pub demo: DemoConfig,
    pub log: LogConfig,
    pub limits: LimitsConfig,
    /// Which image URLs may be passed to the model server (which fetches them).
    pub image_policy: ImageUrlPolicy,
    /// Where alerts go and what sets them off.
    pub alerts: AlertsConfig,
    /// Scheduled backups.
    pub backup: BackupConfig,
    /// OpenTelemetry traces.
    pub telemetry: TelemetryConfig,
    /// Tokens from an identity provider, accepted besides keys.
    pub jwt: JwtConfig,
    /// The currency, prices, image tiers and the calendar of periods.
    pub billing: BillingConfig,
    /// The model catalogue's seed (`[[models]]`): written to the store at a start when the
    /// store has no model of that name and never had one from the configuration; from
    /// then on the admin API manages it, and changes made there survive restarts.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<ModelRecord>,
    /// The response cache and in-flight deduplication.
    pub cache: CacheConfig,
    /// The web console at `/console`.
    pub console: ConsoleConfig,
}

/// Money: what calls cost and the calendar budgets and quotas follow.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BillingConfig {
    /// The currency of every price, budget and cost (a label; amounts are exact decimals).
    pub currency: String,
    /// IANA name of the time zone in which days, weeks (from Monday) and months begin,
    /// for periods and for daily and monthly reports.
    pub time_zone: String,
    /// Image resolution tiers by pixel count, besides `large` (above the last) and
    /// `unknown` (a size the gateway could not read).
    pub image_tiers: Vec<ImageTier>,
    /// Prices to start with: a model without a price in the store gets this one; one
    /// whose price differs gets it from the start on (past calls keep their cost).
    pub prices: Vec<PriceSeed>,
    /// Tests move it; never from a file.
    #[serde(skip)]
    pub clock: Clock,
}

impl Default for BillingConfig {
    fn default() -> Self {
        BillingConfig {
            currency: "USD".into(),
            time_zone: "UTC".into(),
            image_tiers: vec![
                ImageTier {
                    name: "small".into(),
                    max_pixels: 512 * 512,
                },
                ImageTier {
                    name: "medium".into(),
                    max_pixels: 1024 * 1024,
                },
            ],
            prices: Vec::new(),
            clock: Clock::default(),
        }
    }
}

/// Which callers share cached answers (`[cache] scope`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheScopeConfig {
    /// Each key its own answers.
    #[default]
    Key,
    /// The keys of one user share them.
    User,
    /// Every caller shares them.
    Shared,
}

/// The response cache: answers to deterministic chat completions (temperature 0 or a fixed
/// seed, or any asked with `x-cache: use`), kept in this process's memory.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    pub enabled: bool,
    /// The most memory the kept answers take, in MiB.
    pub max_mib: u64,
    /// How long an answer is kept.
    pub ttl_secs: u64,
    /// Times to live of their own, by model name (as served).
    pub model_ttl_secs: BTreeMap<String, u64>,
    pub scope: CacheScopeConfig,
    /// What a hit is charged, in percent of the answer's usage: 0 is free, 100 full price,
    /// anything between a fraction (tokens rounded up).
    pub hit_charge_percent: u8,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            enabled: true,
            max_mib: 256,
            ttl_secs: 3600,
            model_ttl_secs: BTreeMap::new(),
            scope: CacheScopeConfig::Key,
            hit_charge_percent: 0,
        }
    }
}

/// A price in the configuration file (`[[billing.prices]]`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceSeed {
    /// A model version (a name the model server serves) or a model's name.
    pub model: String,
    #[serde(default)]
    pub prompt_per_million: Money,
    #[serde(default)]
    pub completion_per_million: Money,
    #[serde(default)]
    pub per_second: Money,
    #[serde(default)]
    pub per_call_minimum: Money,
    /// Per image by tier name.
    #[serde(default)]
    pub images: BTreeMap<String, Money>,
}

impl PriceSeed {
    /// The price this seed gives, from `from` on.
    pub fn price(&self, from: i64) -> PriceRecord {
        PriceRecord {
            model: self.model.clone(),
            effective_from: from,
            prompt_per_million: self.prompt_per_million,
            completion_per_million: self.completion_per_million,
            per_second: self.per_second,
            per_call_minimum: self.per_call_minimum,
            images: self.images.clone(),
            created_at: from,
        }
    }
}

impl BillingConfig {
    pub fn tiers(&self) -> Result<ImageTiers, ConfigError> {
        ImageTiers::new(self.image_tiers.clone())
            .map_err(|e| ConfigError::Invalid(format!("billing.image_tiers: {e}")))
    }

    pub fn calendar(&self) -> Result<Calendar, ConfigError> {
        Calendar::new(&self.time_zone)
            .map_err(|e| ConfigError::Invalid(format!("billing.time_zone: {e}")))
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let tiers = self.tiers()?;
        self.calendar()?;
        if self.currency.trim().is_empty() {
            return Err(ConfigError::Invalid(
                "billing.currency must name a currency, e.g. \"USD\"".into(),
            ));
        }
        for seed in &self.prices {
            seed.price(i64::MAX)
                .validate(&tiers, 0)
                .map_err(|e| ConfigError::Invalid(format!("billing.prices: {e}")))?;
        }
        Ok(())
    }
}

impl CacheConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.max_mib == 0 || self.ttl_secs == 0 || self.model_ttl_secs.values().any(|&t| t == 0)
        {
            return Err(ConfigError::Invalid(
                "cache.max_mib and cache times to live must be at least 1".into(),
            ));
        }
        if self.hit_charge_percent > 100 {
            return Err(ConfigError::Invalid(
                "cache.hit_charge_percent is at most 100".into(),
            ));
        }
        Ok(())
    }

    /// The cache the call path uses, `None` when off.
    pub fn settings(&self) -> Option<crate::cache::CacheSettings> {
        use crate::cache::{CacheScope, CacheSettings};
        self.enabled.then(|| CacheSettings {
            max_bytes: self.max_mib.saturating_mul(1024 * 1024),
            ttl: Duration::from_secs(self.ttl_secs),
            model_ttl: self
                .model_ttl_secs
                .iter()
                .map(|(model, &secs)| (model.clone(), Duration::from_secs(secs)))
                .collect(),
            scope: match self.scope {
                CacheScopeConfig::Key => CacheScope::Key,
                CacheScopeConfig::User => CacheScope::User,
                CacheScopeConfig::Shared => CacheScope::Shared,
            },
            hit_charge: crate::core::ChargeFactor::percent(self.hit_charge_percent),
        })
    }
}

/// The web console: the admin's and the key holders' pages at `/console` on the port.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsoleConfig {
    pub enabled: bool,
    /// A session ends this long after sign-in.
    pub session_ttl_secs: u64,
    /// Failed sign-ins allowed per client address per minute.
    pub sign_in_attempts_per_minute: u32,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        ConsoleConfig {
            enabled: true,
            session_ttl_secs: 8 * 3600,
            sign_in_attempts_per_minute: 10,
        }
    }
}

/// JWTs from the team's identity provider (off unless `jwks_url` or `hs256_secret` is set).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JwtConfig {
    /// Where the provider publishes its public keys (RS256, ES256, EdDSA tokens).
    pub jwks_url: Option<String>,
    /// A shared secret for HS256 tokens.
    pub hs256_secret: Option<String>,
    /// The `iss` a token must carry.
    pub issuer: Option<String>,
    /// `aud` values accepted; a token must name one.
    pub audience: Vec<String>,
    /// The claim naming the gateway user (matched against a user's `subject`).
    pub user_claim: String,
    /// Clock skew allowed on `exp` and `nbf`.
    pub leeway_secs: u64,
    /// `refuse` a subject no user stands for, or `create` a user for it.
    pub unknown_subjects: UnknownSubjects,
    /// An unknown `kid` refetches the JWKS at most this often.
    pub jwks_min_refresh_secs: u64,
    /// The limits and quotas of a user's identity key when it is first made.
    pub key_limits: KeyLimits,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnknownSubjects {
    #[default]
    Refuse,
    Create,
}

impl Default for JwtConfig {
    fn default() -> Self {
        JwtConfig {
            jwks_url: None,
            hs256_secret: None,
            issuer: None,
            audience: Vec::new(),
            user_claim: "sub".into(),
            leeway_secs: 30,
            unknown_subjects: UnknownSubjects::Refuse,
            jwks_min_refresh_secs: 30,
            key_limits: KeyLimits::default(),
        }
    }
}

impl JwtConfig {
    pub fn enabled(&self) -> bool {
        self.jwks_url.is_some() || self.hs256_secret.is_some()
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// The output cap a call reserves when the client gives no `max_tokens`; for keys with
    /// a token quota it is also sent upstream, so no call can spend past the quota.
    pub default_max_tokens: u64,
    /// Images one request may carry, for every key; unset is unlimited.
    pub max_images_per_request: Option<u32>,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            default_max_tokens: 4096,
            max_images_per_request: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Where REST is served, and gRPC too unless `grpc_listen` is set.
    pub listen: SocketAddr,
    /// A separate address for gRPC; unset, gRPC shares `listen` (routed by path).
    pub grpc_listen: Option<SocketAddr>,
    /// Largest accepted request body (images are sent inline, so this is generous).
    pub max_body_bytes: usize,
    /// Add a `metadata` object (processing time, remaining quota) to JSON completions.
    pub response_metadata: bool,
    /// On SIGTERM/SIGINT, how long calls in flight may take before they are cut.
    pub shutdown_grace_secs: u64,
    /// How long an HTTP/1.1 client may take to send a request's headers, counted from when
    /// the gateway starts waiting for them (an idle keep-alive connection is closed then).
    pub header_read_timeout_secs: u64,
    /// How long a client may take to send a request body, counted from its headers.
    pub body_read_timeout_secs: u64,
    /// A connection with no request in flight for this long is closed (one that never
    /// sends a request, an idle HTTP/2 connection).
    pub idle_timeout_secs: u64,
    /// Proxies (CIDRs) whose `X-Forwarded-For` / `X-Real-IP` say who the client is; from
    /// anyone else those headers are ignored. Empty: the socket's peer is the client.
    pub trusted_proxies: IpAllowlist,
    /// Browser origins allowed to call the OpenAI API (`https://app.example.com`, or `*`);
    /// empty (the default) answers no cross-origin request. The admin API never does.
    pub cors_allowed_origins: Vec<String>,
    /// TLS on this port (both doors), and mutual TLS with `client_ca_file`.
    pub tls: TlsConfig,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            grpc_listen: None,
            max_body_bytes: 20 * 1024 * 1024,
            response_metadata: false,
            shutdown_grace_secs: 30,
            header_read_timeout_secs: 10,
            body_read_timeout_secs: 60,
            idle_timeout_secs: 60,
            trusted_proxies: IpAllowlist::default(),
            cors_allowed_origins: Vec::new(),
            tls: TlsConfig::default(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// The model server, when there is one (with or without the `/v1` suffix); ignored
    /// when `backends` lists several.
    pub url: String,
    /// The model server's own key (vLLM `--api-key`); clients' keys never go upstream.
    pub api_key: Option<String>,
    /// Several model servers: requests go to the least loaded healthy one serving the model.
    pub backends: Vec<BackendConfig>,
    /// Client-facing model names for served ones, e.g. `step3-vl` → `stepfun-ai/Step3-VL-10B`.
    pub aliases: BTreeMap<String, String>,
    pub connect_timeout_secs: u64,
    /// Until the answer's headers; for a JSON answer that is the whole generation.
    pub first_byte_timeout_secs: u64,
    /// The longest silence while reading a JSON answer, and the longest wait for the next
    /// whole stream event (bytes that never complete an event do not count).
    pub idle_timeout_secs: u64,
    /// A whole call, stream included.
    pub total_timeout_secs: u64,
    /// Largest non-streaming answer the gateway holds; a larger one is dropped and the
    /// client gets a 502 (`upstream_response_too_large`). Real answers are a few KiB.
    pub max_response_bytes: usize,
    /// Largest single SSE event held while waiting for its end; a stream sending a larger
    /// one is ended with an error event. Real chunks are well under 1 KiB.
    pub max_event_bytes: usize,
    /// Further attempts on another backend when one refused or failed before answering.
    pub max_retries: u32,
    /// Consecutive failures (connect errors, resets, 5xx) that eject a backend...
    pub eject_after_failures: u32,
    /// ...for this long.
    pub eject_secs: u64,
    /// How often each backend's `/health` is checked.
    pub health_interval_ms: u64,
    /// Ask for usage on every stream chunk (vLLM's `continuous_usage_stats`), so a stream
    /// cut short is billed exactly. Turn off for servers that reject the field.
    pub continuous_usage_stats: bool,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            url: "http://127.0.0.1:8000".into(),
            api_key: None,
            backends: Vec::new(),
            aliases: BTreeMap::new(),
            connect_timeout_secs: 5,
            first_byte_timeout_secs: 600,
            idle_timeout_secs: 300,
            total_timeout_secs: 1800,
            max_response_bytes: crate::upstream::DEFAULT_MAX_RESPONSE_BYTES,
            max_event_bytes: crate::upstream::sse::DEFAULT_MAX_EVENT_BYTES,
            max_retries: 1,
            eject_after_failures: 3,
            eject_secs: 30,
            health_interval_ms: 5000,
            continuous_usage_stats: true,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// A label for logs and metrics; defaults to the URL.
    #[serde(default)]
    pub name: Option<String>,
    pub url: String,
    #[serde(default)]
    pub api_key: Option<String>,
    /// Served model names; empty serves every model.
    #[serde(default)]
    pub models: Vec<String>,
    #[serde(default = "one")]
    pub weight: u32,
}

impl BackendConfig {
    /// A backend at `url` serving `model` alone.
    pub fn serving(name: &str, url: String, model: &str) -> Self {
        BackendConfig {
            name: Some(name.into()),
            url,
            api_key: None,
            models: vec![model.into()],
            weight: 1,
        }
    }
}

fn one() -> u32 {
    1
}

impl UpstreamConfig {
    /// The pool these settings describe.
    pub fn pool_settings(&self) -> PoolSettings {
        let backends = if self.backends.is_empty() {
            vec![BackendSettings {
                name: "default".into(),
                url: self.url.clone(),
                api_key: self.api_key.clone(),
                models: Vec::new(),
                weight: 1,
            }]
        } else {
            self.backends
                .iter()
                .map(|b| BackendSettings {
                    name: b.name.clone().unwrap_or_else(|| b.url.clone()),
                    url: b.url.clone(),
                    api_key: b.api_key.clone(),
                    models: b.models.clone(),
                    weight: b.weight.max(1),
                })
                .collect()
        };
        PoolSettings {
            backends,
            aliases: self.aliases.clone().into_iter().collect(),
            connect_timeout: Duration::from_secs(self.connect_timeout_secs),
            first_byte_timeout: Duration::from_secs(self.first_byte_timeout_secs),
            idle_timeout: Duration::from_secs(self.idle_timeout_secs),
            total_timeout: Duration::from_secs(self.total_timeout_secs),
            max_response_bytes: self.max_response_bytes,
            max_event_bytes: self.max_event_bytes,
            max_retries: self.max_retries,
            eject_after_failures: self.eject_after_failures.max(1),
            eject_for: Duration::from_secs(self.eject_secs),
            health_interval: Duration::from_millis(self.health_interval_ms.max(10)),
            health_timeout: Duration::from_secs(2),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Where the books are kept: `sled` (in `path`, one gateway) or `shared` (Postgres at
    /// `postgres_url`, for several replicas; README, "Several replicas").
    pub backend: StoreBackend,
    /// The shared store's Postgres, e.g. `postgres://gateway:secret@db:5432/gateway`.
    pub postgres_url: Option<SecretUrl>,
    /// The shared limits' Redis (or Valkey), e.g. `redis://:secret@cache:6379/0`: per-minute
    /// limits, calls in flight and quotas then hold across replicas. Unset, each replica
    /// enforces them on its own.
    pub redis_url: Option<SecretUrl>,
    /// Put before every Redis key and channel; one deployment's replicas share it.
    pub redis_prefix: String,
    /// The longest any one call to the shared store may take; past it the call fails (a
    /// request is refused, a batch of usage is kept and retried).
    pub timeout_ms: u64,
    /// Connections each replica keeps to the shared store at most.
    pub max_connections: u32,
    /// The data directory: sled's files, or with the shared store this replica's own
    /// reservation journal (each replica needs one of its own).
    pub path: PathBuf,
    /// What a hard stop may cost (README, "Durability").
    pub durability: Durability,
    /// How often the books are flushed to disk. With `durability = "flush_interval"`, a
    /// hard kill can lose the usage of the calls settled within this interval.
    pub flush_interval_ms: u64,
    /// Keep request and response bodies in the call log.
    pub log_bodies: bool,
    /// Calls older than this many days leave the call log (counters and hourly usage
    /// stay); 0 keeps them forever.
    pub call_log_retention_days: u64,
    /// sled's page cache, in MiB: the most the books (users, keys, counters, hourly usage)
    /// keep in memory. The call log is read from its files and takes none of it.
    pub cache_mib: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreBackend {
    /// sled in the data directory: one gateway process owns the books.
    #[default]
    Sled,
    /// Postgres: every replica pointed at it shares the keys, users and books.
    Shared,
}

/// A URL that may carry a password: shown (`Debug`, `Display`) with the password hidden.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SecretUrl(String);

impl SecretUrl {
    pub fn new(url: impl Into<String>) -> Self {
        SecretUrl(url.into())
    }

    /// The URL with its password, for the one place that connects.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match url::Url::parse(&self.0) {
            Ok(mut url) if url.password().is_some() => {
                let _ = url.set_password(Some("***"));
                write!(f, "{url}")
            }
            Ok(url) => write!(f, "{url}"),
            // Not a URL: it may be anything, a password included.
            Err(_) => f.write_str("(an unreadable URL)"),
        }
    }
}

impl std::fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "\"{self}\"")
    }
}

/// What a hard stop (`kill -9`, a crash, a power loss) may cost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// Each call's reservation is written to a journal before the call is forwarded, and
    /// the journal is synced behind the calls (within a few milliseconds): a kill -9 or a
    /// crash of the gateway loses no call the model server worked on (one cut short is
    /// charged its reservation at the next start); a power cut can lose the last few
    /// milliseconds' reservations.
    #[default]
    Reservations,
    /// As `reservations`, but each call also waits for its reservation's sync (one sync
    /// shared by the calls that arrive together): a power cut loses nothing either, for
    /// about 0.1–0.3 ms more per call.
    ReservationsSynced,
    /// No journal: usage is written in batches and flushed every `flush_interval_ms`; a
    /// hard kill can lose the calls settled within that interval.
    FlushInterval,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            backend: StoreBackend::default(),
            postgres_url: None,
            redis_url: None,
            redis_prefix: "step3gw".into(),
            timeout_ms: 2000,
            max_connections: 8,
            path: PathBuf::from("./data"),
            durability: Durability::default(),
            flush_interval_ms: 500,
            log_bodies: false,
            call_log_retention_days: 90,
            cache_mib: 16,
        }
    }
}

impl StoreConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.timeout_ms == 0 || self.max_connections == 0 {
            return Err(ConfigError::Invalid(
                "store.timeout_ms and store.max_connections must be at least 1".into(),
            ));
        }
        if let Some(url) = &self.redis_url {
            if self.backend != StoreBackend::Shared {
                return Err(ConfigError::Invalid(
                    "store.redis_url is used with store.backend = \"shared\" only".into(),
                ));
            }
            if !["redis://", "rediss://", "unix://"]
                .iter()
                .any(|scheme| url.expose().starts_with(scheme))
            {
                return Err(ConfigError::Invalid(format!(
                    "store.redis_url must start with redis://, rediss:// or unix://, got `{url}`"
                )));
            }
        }
        match (self.backend, &self.postgres_url) {
            (StoreBackend::Shared, None) => Err(ConfigError::Invalid(
                "store.backend = \"shared\" needs store.postgres_url (STEP3GW_STORE_POSTGRES_URL)"
                    .into(),
            )),
            (StoreBackend::Shared, Some(url))
                if !["postgres://", "postgresql://"]
                    .iter()
                    .any(|scheme| url.expose().starts_with(scheme)) =>
            {
                Err(ConfigError::Invalid(format!(
                    "store.postgres_url must start with postgres:// or postgresql://, got `{url}`"
                )))
            }
            _ => Ok(()),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// The admin token. When unset, one is generated at first start, printed once, and
    /// only its hash is kept.
    pub token: Option<String>,
    /// Where the admin API (REST `/admin/v1`, gRPC `Admin`) may be used from (CIDRs, after
    /// `server.trusted_proxies`); empty is anywhere.
    pub allowed_ips: IpAllowlist,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DemoConfig {
    /// Start the built-in STEP3-VL simulator and use it as the upstream.
    pub enabled: bool,
    /// The simulator's delay per generated token.
    pub token_latency_ms: u64,
}

impl Default for DemoConfig {
    fn default() -> Self {
        DemoConfig {
            enabled: false,
            token_latency_ms: 20,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A tracing filter, e.g. `info` or `step3_gateway=debug`; `RUST_LOG` overrides it.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {0} does not exist")]
    MissingFile(PathBuf),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// What the command line of `serve` sets; it wins over the file and the environment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServeFlags {
    pub listen: Option<SocketAddr>,
    pub upstream: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub log_format: Option<LogFormat>,
    pub demo: bool,
}

impl GatewayConfig {
    /// Defaults, then `file` (if given), then the `STEP3GW_*` environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_with(file, &ServeFlags::default())
    }

    /// Defaults, then `file` (if given), then the `STEP3GW_*` environment, then `flags`.
    ///
    /// A demo that nothing told where to listen listens on 127.0.0.1 (port 8080): its
    /// admin token and demo key are printed for anyone who can see the terminal, and the
    /// demo is not meant to be reachable from other machines by accident.
    pub fn load_with(file: Option<&Path>, flags: &ServeFlags) -> Result<Self, ConfigError> {
        let file = match file {
            Some(file) if !file.exists() => return Err(ConfigError::MissingFile(file.to_owned())),
            Some(file) => Some(Toml::file_exact(file)),
            None => None,
        };
        let sources = Self::sources(file);
        let listen_configured = flags.listen.is_some() || sources.contains("server.listen");
        let mut config = Self::layered(sources)?;
        if let Some(listen) = flags.listen {
            config.server.listen = listen;
        }
        if let Some(upstream) = &flags.upstream {
            config.upstream.url = upstream.clone();
        }
        if let Some(dir) = &flags.data_dir {
            config.store.path = dir.clone();
        }
        if let Some(format) = flags.log_format {
            config.log.format = format;
        }
        config.demo.enabled |= flags.demo;
        if config.demo.enabled && !listen_configured {
            config
                .server
                .listen
                .set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        Ok(config)
    }

    /// What [`GatewayConfig::load`] does with a file, given the file's text instead.
    ///
    /// Public only so that the fuzz targets in `fuzz/` (a separate crate) can feed arbitrary
    /// TOML through the real layering without writing files; not part of the API.
    #[doc(hidden)]
    pub fn load_from_toml_str(toml: &str) -> Result<Self, ConfigError> {
        Self::layered(Self::sources(Some(Toml::string(toml))))
    }

    /// The defaults, then `sources`.
    fn layered(sources: Figment) -> Result<Self, ConfigError> {
        Figment::from(Serialized::defaults(GatewayConfig::default()))
            .merge(sources)
            .extract::<GatewayConfig>()
            .map_err(|e| ConfigError::Invalid(describe_errors(e)))
    }

    /// What the operator configured: `file`, then the environment (no defaults).
    fn sources(file: Option<Data<Toml>>) -> Figment {
        let mut figment = Figment::new();
        if let Some(file) = file {
            figment = figment.merge(file);
        }
        // `STEP3GW_CONFIG` names the file and `STEP3GW_ADMIN_URL` is read by the admin CLI;
        // neither is a setting, and an operator may export both next to the real ones.
        let env = Env::prefixed(ENV_PREFIX)
            .ignore(&["config", "admin_url"])
            .map(|key| env_key_to_path(key.as_str()).into());
        figment.merge(env)
    }

    /// Checks what types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.billing.validate()?;
        let urls = std::iter::once(&self.upstream.url)
            .chain(self.upstream.backends.iter().map(|b| &b.url));
        for url in urls {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(ConfigError::Invalid(format!(
                    "upstream URLs must start with http:// or https://, got `{url}`"
                )));
            }
        }
        if self.console.session_ttl_secs == 0 || self.console.sign_in_attempts_per_minute == 0 {
            return Err(ConfigError::Invalid(
                "console: session_ttl_secs and sign_in_attempts_per_minute must be at least 1"
                    .into(),
            ));
        }
        if self.server.max_body_bytes < 1024 {
            return Err(ConfigError::Invalid(
                "server.max_body_bytes must be at least 1024".into(),
            ));
        }
        let images = &self.image_policy;
        if images.fetch_max_bytes < 64
            || images.fetch_max_pixels == 0
            || images.fetch_max_images == 0
            || images.fetch_timeout_ms == 0
        {
            return Err(ConfigError::Invalid(
                "image_policy: fetch_max_bytes must be at least 64, and fetch_max_pixels, \
                 fetch_max_images and fetch_timeout_ms at least 1"
                    .into(),
            ));
        }
        let server = &self.server;
        if [
            server.header_read_timeout_secs,
            server.body_read_timeout_secs,
            server.idle_timeout_secs,
        ]
        .contains(&0)
        {
            return Err(ConfigError::Invalid(
                "server timeouts must be at least 1 second".into(),
            ));
        }
        let upstream = &self.upstream;
        if [
            upstream.connect_timeout_secs,
            upstream.first_byte_timeout_secs,
            upstream.idle_timeout_secs,
            upstream.total_timeout_secs,
        ]
        .contains(&0)
        {
            return Err(ConfigError::Invalid(
                "upstream timeouts must be at least 1 second".into(),
            ));
        }
        if upstream.max_response_bytes < 1024 || upstream.max_event_bytes < 1024 {
            return Err(ConfigError::Invalid(
                "upstream.max_response_bytes and upstream.max_event_bytes must be at least 1024"
                    .into(),
            ));
        }
        if self
            .admin
            .token
            .as_deref()
            .is_some_and(|t| t.trim().len() < 16)
        {
            return Err(ConfigError::Invalid(
                "admin.token must be at least 16 characters".into(),
            ));
        }
        if self.jwt.enabled() {
            // A token for another service of the same provider must not open this one.
            if self.jwt.audience.is_empty() || self.jwt.issuer.is_none() {
                return Err(ConfigError::Invalid(
                    "jwt: set `issuer` and `audience` (the values this gateway's tokens carry)"
                        .into(),
                ));
            }
            if self.jwt.hs256_secret.as_ref().is_some_and(|s| s.len() < 32) {
                return Err(ConfigError::Invalid(
                    "jwt.hs256_secret must be at least 32 bytes".into(),
                ));
            }
        }
        for origin in &self.server.cors_allowed_origins {
            if !is_cors_origin(origin) {
                return Err(ConfigError::Invalid(format!(
                    "server.cors_allowed_origins: `{origin}` is not an origin; write \
                     `https://app.example.com` (scheme, host and port if not the default, no \
                     path) or `*`"
                )));
            }
        }
        if self.limits.default_max_tokens == 0 {
            return Err(ConfigError::Invalid(
                "limits.default_max_tokens must be at least 1".into(),
            ));
        }
        if self.store.cache_mib == 0 {
            return Err(ConfigError::Invalid(
                "store.cache_mib must be at least 1".into(),
            ));
        }
        if self.store.flush_interval_ms == 0 {
            return Err(ConfigError::Invalid(
                "store.flush_interval_ms must be at least 1".into(),
            ));
        }
        self.alerts.validate().map_err(ConfigError::Invalid)?;
        self.backup.validate().map_err(ConfigError::Invalid)?;
        self.cache.validate()?;
        self.telemetry.validate().map_err(ConfigError::Invalid)?;
        validate_all(&self.models).map_err(|e| ConfigError::Invalid(format!("models: {e}")))?;
        self.store.validate()
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.server.shutdown_grace_secs)
    }
}

/// `upstream_api_key` → `upstream.api_key`: the first word names the section.
fn env_key_to_path(key: &str) -> String {
    let key = key.to_ascii_lowercase();
    for section in SECTIONS {
        if let Some(rest) = key.strip_prefix(section).and_then(|r| r.strip_prefix('_')) {
            return format!("{section}.{rest}");
        }
    }
    key
}

/// Figment's errors in the words of this file: the setting's key (and, for the
/// environment, the variable's name), where the bad value came from, and what was wrong,
/// without figment's profile prefix (`default.`) or serde's nested quoting.
fn describe_errors(errors: figment::Error) -> String {
    errors
        .into_iter()
        .map(|e| describe_error(&e))
        .collect::<Vec<_>>()
        .join("; ")
}

fn describe_error(e: &figment::Error) -> String {
    use figment::error::Kind;

    let key = e.path.join(".");
    let what = match &e.kind {
        Kind::Message(message) => message.trim_end().to_owned(),
        Kind::InvalidType(actual, expected) => format!(
            "expected {}, found {}",
            describe_expected(expected),
            describe_actual(actual)
        ),
        Kind::InvalidValue(actual, expected) => format!(
            "{} is not {}",
            describe_actual(actual),
            describe_expected(expected)
        ),
        Kind::InvalidLength(length, expected) => {
            format!("{length} entries where {expected} were expected")
        }
        Kind::UnknownVariant(found, expected) => {
            format!("unknown value \"{found}\"; one of: {}", expected.join(", "))
        }
        Kind::UnknownField(found, expected) => {
            let parent = &e.path[..e.path.len().saturating_sub(1)];
            let known = expected.join(", ");
            if parent.is_empty() {
                format!("no section \"{found}\"; the sections are: {known}")
            } else {
                format!(
                    "no setting \"{found}\" in [{}]; it has: {known}",
                    parent.join(".")
                )
            }
        }
        Kind::MissingField(field) if key.is_empty() => format!("{field} is required"),
        Kind::MissingField(field) => format!("{key}.{field} is required"),
        Kind::DuplicateField(field) => format!("{field} is given twice"),
        Kind::ISizeOutOfRange(value) => format!("{value} is out of range"),
        Kind::USizeOutOfRange(value) => format!("{value} is out of range"),
        Kind::Unsupported(actual) => format!("{} is not supported here", describe_actual(actual)),
        Kind::UnsupportedKey(actual, expected) => {
            format!(
                "a key must be {expected}, found {}",
                describe_actual(actual)
            )
        }
    };
    let metadata = e.metadata.as_ref();
    let file = metadata
        .and_then(|m| m.source.as_ref())
        .and_then(figment::Source::file_path);
    let from_env = metadata.is_some_and(|m| m.name.contains("environment"));
    // These kinds name the key themselves; every other is about the value at `key`.
    let key = if matches!(e.kind, Kind::MissingField(_) | Kind::UnknownField(..)) || key.is_empty()
    {
        String::new()
    } else {
        format!("{key}: ")
    };
    match (file, from_env) {
        (Some(file), _) => format!("{}: {key}{what}", file.display()),
        (None, true) => format!(
            "environment variable {ENV_PREFIX}{}: {what}",
            e.path.join("_").to_ascii_uppercase()
        ),
        (None, false) => format!("{key}{what}"),
    }
}

/// What serde expected, in the words of a TOML file rather than of Rust's types.
fn describe_expected(expected: &str) -> String {
    match expected {
        "u8" | "u16" | "u32" | "u64" | "usize" => "a whole number (0 or more)".into(),
        "i8" | "i16" | "i32" | "i64" | "isize" => "a whole number".into(),
        "f32" | "f64" => "a number".into(),
        "a sequence" => "a list".into(),
        "a map" => "a table".into(),
        other if other.starts_with("struct ") => "a table".into(),
        other => other.into(),
    }
}

/// A value as the reader wrote it: `"abc"`, `-1`, `true`; a table or list by its kind.
fn describe_actual(actual: &figment::error::Actual) -> String {
    use figment::error::Actual;
    match actual {
        Actual::Bool(v) => v.to_string(),
        Actual::Unsigned(v) => v.to_string(),
        Actual::Signed(v) => v.to_string(),
        Actual::Float(v) => v.to_string(),
        Actual::Char(v) => format!("{v:?}"),
        Actual::Str(v) => format!("{v:?}"),
        Actual::Seq => "a list".into(),
        Actual::Map => "a table".into(),
        other => other.to_string(),
    }
}

/// `*`, or what a browser sends as `Origin`: `http(s)://host[:port]`, nothing more.
fn is_cors_origin(origin: &str) -> bool {
    if origin == "*" {
        return true;
    }
    let Some((scheme, rest)) = origin.split_once("://") else {
        return false;
    };
    matches!(scheme, "http" | "https")
        && !rest.is_empty()
        && !rest.contains(['/', '?', '#', '@', ' '])
        && axum::http::HeaderValue::from_str(origin).is_ok()
}

#[cfg(test)]
#[expect(
    clippy::result_large_err,
    reason = "figment's Jail returns its own large error type"
)]
mod tests {
    use super::*;

    #[test]
    fn the_readmes_model_catalogue_example_is_a_valid_configuration() {
        let readme = include_str!("../README.md");
        let example = readme
            .split("```toml\n")
            .map(|block| block.split("\n```").next().unwrap_or_default())
            .find(|block| block.starts_with("[[models]]"))
            .unwrap();
        let config = GatewayConfig::load_from_toml_str(example).unwrap();
        config.validate().unwrap();
        let model = &config.models[0];
        assert_eq!(model.versions.len(), 3);
        assert_eq!(model.rollout.as_ref().map(|r| r.weight), Some(10));
        assert_eq!(model.versions[2].sunset_at, Some(1_803_859_200));
    }

    #[test]
    fn file_then_environment_then_validation() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "gw.toml",
                "[server]\nlisten = \"127.0.0.1:9000\"\n[upstream]\nurl = \"http://gpu:8000\"\n",
            )?;
            jail.set_env("STEP3GW_UPSTREAM_URL", "http://other:8000/v1");
            jail.set_env("STEP3GW_STORE_FLUSH_INTERVAL_MS", "250");
            jail.set_env("STEP3GW_SERVER_HEADER_READ_TIMEOUT_SECS", "3");
            let config = GatewayConfig::load(Some(Path::new("gw.toml"))).unwrap();
            assert_eq!(config.server.header_read_timeout_secs, 3);
            assert_eq!(config.server.body_read_timeout_secs, 60);
            assert_eq!(config.server.idle_timeout_secs, 60);
            assert_eq!(config.server.listen, "127.0.0.1:9000".parse().unwrap());
            assert_eq!(config.upstream.url, "http://other:8000/v1");
            assert_eq!(config.store.flush_interval_ms, 250);
            assert_eq!(config.store.durability, Durability::Reservations);
            assert_eq!(config.server.max_body_bytes, 20 * 1024 * 1024);
            config.validate().unwrap();
            Ok(())
        });
    }

    #[test]
    fn the_faster_store_mode_is_a_setting() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("gw.toml", "[store]\ndurability = \"flush_interval\"\n")?;
            let config = GatewayConfig::load(Some(Path::new("gw.toml"))).unwrap();
            assert_eq!(config.store.durability, Durability::FlushInterval);
            jail.set_env("STEP3GW_STORE_DURABILITY", "reservations_synced");
            let config = GatewayConfig::load(Some(Path::new("gw.toml"))).unwrap();
            assert_eq!(config.store.durability, Durability::ReservationsSynced);
            jail.set_env("STEP3GW_STORE_DURABILITY", "sometimes");
            let err = GatewayConfig::load(Some(Path::new("gw.toml")))
                .unwrap_err()
                .to_string();
            assert!(err.contains("sometimes"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn the_store_cache_is_a_setting_of_at_least_one_mib() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("gw.toml", "[store]\ncache_mib = 4\n")?;
            let config = GatewayConfig::load(Some(Path::new("gw.toml"))).unwrap();
            assert_eq!(config.store.cache_mib, 4);
            config.validate().unwrap();
            jail.set_env("STEP3GW_STORE_CACHE_MIB", "0");
            let err = GatewayConfig::load(Some(Path::new("gw.toml")))
                .unwrap()
                .validate()
                .unwrap_err()
                .to_string();
            assert!(err.contains("store.cache_mib"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_are_named_in_the_error() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("gw.toml", "[server]\nlisten_port = 9000\n")?;
            let err = GatewayConfig::load(Some(Path::new("gw.toml")))
                .unwrap_err()
                .to_string();
            assert!(err.contains("listen_port"), "{err}");
            Ok(())
        });
        figment::Jail::expect_with(|jail| {
            jail.set_env("STEP3GW_UPSTREAM_URLL", "http://x");
            let err = GatewayConfig::load(None).unwrap_err().to_string();
            assert!(err.contains("urll"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn errors_name_the_key_and_where_it_was_set_without_nested_quoting() {
        // (the file, an environment variable, how the message starts)
        type Case = (
            &'static str,
            Option<(&'static str, &'static str)>,
            &'static str,
        );
        let cases: [Case; 6] = [
            (
                "[server]\nlisten = \"nope\"\n",
                None,
                "gw.toml: server.listen: invalid socket address syntax",
            ),
            (
                "[server]\nlisten_port = 9000\n",
                None,
                "gw.toml: no setting \"listen_port\" in [server]; it has: listen, grpc_listen,",
            ),
            (
                "[[upstream.backends]]\nname = \"a\"\n",
                None,
                "gw.toml: upstream.backends.0.url is required",
            ),
            (
                "",
                Some(("STEP3GW_SERVER_MAX_BODY_BYTES", "abc")),
                "environment variable STEP3GW_SERVER_MAX_BODY_BYTES: expected a whole number (0 or more), found \"abc\"",
            ),
            (
                "",
                Some(("STEP3GW_LOG_FORMAT", "xml")),
                "environment variable STEP3GW_LOG_FORMAT: unknown value \"xml\"; one of: text, json",
            ),
            (
                "",
                Some(("STEP3GW_FOO", "1")),
                "environment variable STEP3GW_FOO: no section \"foo\"; the sections are: server,",
            ),
        ];
        for (file, env, expected) in cases {
            figment::Jail::expect_with(|jail| {
                jail.create_file("gw.toml", file)?;
                if let Some((name, value)) = env {
                    jail.set_env(name, value);
                }
                let err = GatewayConfig::load(Some(Path::new("gw.toml")))
                    .unwrap_err()
                    .to_string();
                assert!(
                    err.starts_with(&format!("invalid configuration: {expected}")),
                    "{err}"
                );
                assert!(!err.contains("default.") && !err.contains("``"), "{err}");
                Ok(())
            });
        }
    }

    #[test]
    fn a_demo_listens_on_loopback_unless_an_address_is_configured() {
        let demo = ServeFlags {
            demo: true,
            ..ServeFlags::default()
        };
        figment::Jail::expect_with(|jail| {
            let listen =
                |flags: &ServeFlags| GatewayConfig::load_with(None, flags).unwrap().server.listen;
            assert_eq!(listen(&demo), "127.0.0.1:8080".parse().unwrap());
            assert_eq!(
                listen(&ServeFlags::default()),
                "0.0.0.0:8080".parse().unwrap()
            );
            let flagged = ServeFlags {
                listen: Some("0.0.0.0:9000".parse().unwrap()),
                ..demo.clone()
            };
            assert_eq!(listen(&flagged), "0.0.0.0:9000".parse().unwrap());
            jail.set_env("STEP3GW_SERVER_LISTEN", "0.0.0.0:8080");
            assert_eq!(listen(&demo), "0.0.0.0:8080".parse().unwrap());
            Ok(())
        });
        figment::Jail::expect_with(|jail| {
            // Demo mode set in the file counts too.
            jail.create_file("gw.toml", "[demo]\nenabled = true\n")?;
            let config = GatewayConfig::load(Some(Path::new("gw.toml"))).unwrap();
            assert_eq!(config.server.listen, "127.0.0.1:8080".parse().unwrap());
            Ok(())
        });
    }

    #[test]
    fn the_admin_cli_url_does_not_break_loading() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("STEP3GW_ADMIN_URL", "http://gateway:8080");
            jail.set_env("STEP3GW_ADMIN_TOKEN", "shared-admin-token-0123456789");
            let config = GatewayConfig::load(None).unwrap();
            assert_eq!(
                config.admin.token.as_deref(),
                Some("shared-admin-token-0123456789")
            );
            Ok(())
        });
    }

    #[test]
    fn a_missing_file_and_a_bad_url_are_refused() {
        assert!(matches!(
            GatewayConfig::load(Some(Path::new("/nonexistent/gw.toml"))),
            Err(ConfigError::MissingFile(_))
        ));
        let mut config = GatewayConfig::default();
        config.upstream.url = "localhost:8000".into();
        assert!(config.validate().is_err());
        let mut config = GatewayConfig::default();
        config.server.body_read_timeout_secs = 0;
        assert!(config.validate().is_err());
    }

    #[test]
    fn upstream_size_caps_default_to_16_mib_and_1_mib_and_refuse_tiny_values() {
        let config = GatewayConfig::default();
        assert_eq!(config.upstream.max_response_bytes, 16 * 1024 * 1024);
        assert_eq!(config.upstream.max_event_bytes, 1024 * 1024);
        let settings = config.upstream.pool_settings();
        assert_eq!(settings.max_response_bytes, 16 * 1024 * 1024);
        assert_eq!(settings.max_event_bytes, 1024 * 1024);
        for tiny in [
            |c: &mut GatewayConfig| c.upstream.max_response_bytes = 10,
            |c: &mut GatewayConfig| c.upstream.max_event_bytes = 0,
        ] {
            let mut config = GatewayConfig::default();
            tiny(&mut config);
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains("max_response_bytes"), "{err}");
        }
    }

    #[test]
    fn image_fetch_settings_load_from_the_file_and_refuse_zero_caps() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "gw.toml",
                "[image_policy]\nfetch = true\nfetch_max_bytes = 2048\nfetch_max_redirects = 0\n",
            )?;
            let config = GatewayConfig::load(Some(Path::new("gw.toml"))).unwrap();
            let images = &config.image_policy;
            assert!(images.fetch);
            assert_eq!(
                (images.fetch_max_bytes, images.fetch_max_redirects),
                (2048, 0)
            );
            assert_eq!(images.fetch_max_images, 8);
            Ok(())
        });
        for zero in [
            |c: &mut GatewayConfig| c.image_policy.fetch_max_bytes = 0,
            |c: &mut GatewayConfig| c.image_policy.fetch_max_pixels = 0,
            |c: &mut GatewayConfig| c.image_policy.fetch_max_images = 0,
            |c: &mut GatewayConfig| c.image_policy.fetch_timeout_ms = 0,
        ] {
            let mut config = GatewayConfig::default();
            zero(&mut config);
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains("image_policy"), "{err}");
        }
    }
}
