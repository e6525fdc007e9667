//! Redis (or Valkey) as the counters every replica shares: core's `SharedLimits` port.
//! A call's admission is one script (quotas, calls in flight, per-minute limits of the key
//! and its user, all or nothing), its settlement one more, sent without waiting; admin
//! changes go out on a channel every replica listens to.
//!
//! Round trips per call: 2 (admit, settle). A key's first call on a Redis that does not
//! hold its quota counters yet costs 2 more (a miss, then the counters loaded from the
//! books), and the first use of a script after a Redis restart 1 more (it is loaded again).

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, Script, Value};
use tokio_util::sync::CancellationToken;

use crate::core::keys;
use crate::core::rate_limit::{LimitKind, LimitScope, Refusal};
use crate::core::records::KeyCounters;
use crate::core::shared_limits::{
    BoxFuture, Change, SharedAsk, SharedClaim, SharedLimits, SharedLimitsHealth, SharedRefusal,
    SharedSettlement,
};
use crate::core::store::{Store, StoreError};

/// How [`RedisLimits`] is set up.
#[derive(Clone, Debug)]
pub struct RedisSettings {
    /// Put before every key and the channel: replicas of one deployment share it.
    pub prefix: String,
    /// The longest one round trip may take; past it the call is treated as unreachable.
    pub timeout: Duration,
    /// How long a call may hold a concurrency slot before a slot is taken back from a
    /// replica that died with it (the longest a call may last, plus a margin).
    pub slot_hold: Duration,
}

pub struct RedisLimits {
    /// Where settlements and announcements are sent from (they may be made where no
    /// runtime is current: an admission dropped at shutdown).
    runtime: tokio::runtime::Handle,
    client: Client,
    connection: ConnectionManager,
    settings: RedisSettings,
    store: Arc<dyn Store>,
    admit: Script,
    settle: Script,
    init: Script,
    health: SharedLimitsHealth,
}

impl std::fmt::Debug for RedisLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLimits")
            .field("prefix", &self.settings.prefix)
            .finish_non_exhaustive()
    }
}

/// Before the error of an admission that failed on the books (a key's counters could not
/// be loaded from them), not on Redis.
const BOOKS: &str = "the books: ";

/// What the admission script answered.
enum Admitted {
    Yes(String),
    /// The key's quota counters are not in Redis yet.
    Unknown,
    No(SharedRefusal),
}

fn int(values: &[Value], i: usize) -> i64 {
    match values.get(i) {
        Some(Value::Int(n)) => *n,
        _ => 0,
    }
}

impl RedisLimits {
    /// Connects to `url`. `store` is where a key's quota counters are read the first time
    /// Redis has none for it (a new deployment, a Redis restart).
    pub async fn connect(
        url: &str,
        settings: RedisSettings,
        store: Arc<dyn Store>,
    ) -> Result<Self, StoreError> {
        let fail = |e: redis::RedisError| StoreError::Io(format!("redis: {e}"));
        let client = Client::open(url).map_err(fail)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(settings.timeout))
            .set_response_timeout(Some(settings.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let connection = tokio::time::timeout(
            settings.timeout,
            client.get_connection_manager_with_config(config),
        )
        .await
        .map_err(|_| StoreError::Io(format!("redis: no answer within {:?}", settings.timeout)))?
        .map_err(fail)?;
        Ok(RedisLimits {
            runtime: tokio::runtime::Handle::current(),
            client,
            connection,
            settings,
            store,
            admit: Script::new(include_str!("admit.lua")),
            settle: Script::new(include_str!("settle.lua")),
            init: Script::new(include_str!("init.lua")),
            health: SharedLimitsHealth::default(),
        })
    }

    /// The names of a call's key and user state, in the scripts' KEYS order.
    fn names(&self, ask: &SharedAsk) -> [String; 7] {
        let (p, key_id, user_id) = (&self.settings.prefix, &ask.key_id, &ask.user_id);
        [
            self.quota_name(key_id, ask.period),
            format!("{p}:key:{key_id}:rpm"),
            format!("{p}:key:{key_id}:tpm"),
            format!("{p}:key:{key_id}:busy"),
            format!("{p}:user:{user_id}:rpm"),
            format!("{p}:user:{user_id}:tpm"),
            format!("{p}:user:{user_id}:busy"),
        ]
    }

    /// A key's quota counters: one hash for its lifetime, or one per period.
    fn quota_name(&self, key_id: &str, period: Option<(i64, i64)>) -> String {
        let p = &self.settings.prefix;
        match period {
            None => format!("{p}:key:{key_id}:quota"),
            Some((start, _)) => format!("{p}:key:{key_id}:quota:{start}"),
        }
    }

    fn channel(&self) -> String {
        format!("{}:changes", self.settings.prefix)
    }

    async fn run_admit(&self, ask: &SharedAsk) -> Result<Admitted, redis::RedisError> {
        let quota = |q: Option<u64>| q.map_or(-1, |q| i64::try_from(q).unwrap_or(i64::MAX));
        let limit = |l: Option<u64>| l.unwrap_or(0);
        let (k, u) = (&ask.key_limits, &ask.user_limits);
        let mut invocation = self.admit.prepare_invoke();
        for name in self.names(ask) {
            invocation.key(name);
        }
        invocation
            .arg(quota(ask.request_quota))
            .arg(quota(ask.token_quota))
            .arg(quota(ask.image_quota))
            .arg(ask.tokens)
            .arg(ask.images)
            .arg(limit(k.rpm.map(u64::from)))
            .arg(limit(k.tpm))
            .arg(limit(k.concurrent.map(u64::from)))
            .arg(limit(u.rpm.map(u64::from)))
            .arg(limit(u.tpm))
            .arg(limit(u.concurrent.map(u64::from)))
            .arg(&ask.call_id)
            .arg(u64::try_from(self.settings.slot_hold.as_millis()).unwrap_or(u64::MAX))
            .arg(quota(ask.budget))
            .arg(ask.cost);
        let mut connection = self.connection.clone();
        let answer: Vec<Value> = invocation.invoke_async(&mut connection).await?;
        Ok(match int(&answer, 0) {
            0 => Admitted::Yes(match answer.get(1) {
                Some(Value::BulkString(bytes)) => String::from_utf8_lossy(bytes).into_owned(),
                _ => String::new(),
            }),
            1 => Admitted::Unknown,
            2 => {
                let what = match int(&answer, 1) {
                    1 => "requests",
                    2 => "tokens",
                    3 => "images",
                    _ => "budget",
                };
                let limit = u64::try_from(int(&answer, 2)).unwrap_or(0);
                Admitted::No(SharedRefusal::Quota { what, limit })
            }
            _ => {
                let scope = match int(&answer, 1) {
                    1 => LimitScope::Key,
                    _ => LimitScope::User,
                };
                let kind = match int(&answer, 2) {
                    1 => LimitKind::Requests,
                    2 => LimitKind::Tokens,
                    _ => LimitKind::Concurrency,
                };
                let wait = int(&answer, 4);
                Admitted::No(SharedRefusal::Rate(Refusal {
                    scope,
                    kind,
                    limit: u64::try_from(int(&answer, 3)).unwrap_or(0),
                    requested: match kind {
                        LimitKind::Tokens => ask.tokens,
                        _ => 1,
                    },
                    retry_after: u64::try_from(wait).ok().map(Duration::from_micros),
                }))
            }
        })
    }

    /// Puts a key's counters, as the books hold them, in Redis (unless a replica did):
    /// its lifetime's, or the current period's (the hours since the period began).
    async fn load_counters(
        &self,
        key_id: &str,
        period: Option<(i64, i64)>,
    ) -> Result<(), SharedRefusal> {
        let store = self.store.clone();
        let id = key_id.to_owned();
        let loaded = tokio::task::spawn_blocking(move || match period {
            None => store
                .load_key(&id)
                .map(|loaded| loaded.map(|(_, counters)| counters).unwrap_or_default()),
            Some((start, _)) => {
                let hour = start - start.rem_euclid(3600);
                store.usage(&id, hour, i64::MAX).map(|buckets| {
                    buckets.iter().fold(KeyCounters::default(), |mut total, b| {
                        total.add(&b.counters());
                        total
                    })
                })
            }
        })
        .await
        .map_err(|e| SharedRefusal::Unavailable(format!("{BOOKS}{e}")))?;
        let counters = loaded.map_err(|e| SharedRefusal::Unavailable(format!("{BOOKS}{e}")))?;
        let quota = self.quota_name(key_id, period);
        // A period's counters outlive it by a day (settlements of calls in flight).
        let expire_at = period.map_or(0, |(_, end)| end.saturating_add(86_400));
        let mut connection = self.connection.clone();
        self.init
            .key(quota)
            .arg(counters.requests)
            .arg(counters.tokens())
            .arg(counters.images)
            .arg(keys::generate_id("gen"))
            .arg(counters.cost.0)
            .arg(expire_at)
            .invoke_async::<i64>(&mut connection)
            .await
            .map_err(|e| SharedRefusal::Unavailable(format!("redis: {e}")))?;
        Ok(())
    }

    async fn admit_within_deadline(&self, ask: SharedAsk) -> Result<SharedClaim, SharedRefusal> {
        let unavailable = |e: redis::RedisError| SharedRefusal::Unavailable(format!("redis: {e}"));
        let mut admitted = self.run_admit(&ask).await.map_err(unavailable)?;
        if let Admitted::Unknown = admitted {
            self.load_counters(&ask.key_id, ask.period).await?;
            admitted = self.run_admit(&ask).await.map_err(unavailable)?;
        }
        match admitted {
            Admitted::Yes(generation) => Ok(SharedClaim { ask, generation }),
            Admitted::Unknown => Err(SharedRefusal::Unavailable(
                "redis: the key's counters vanished while they were loaded".into(),
            )),
            Admitted::No(refusal) => Err(refusal),
        }
    }

    /// Asks Redis for a `PING` every `every` until `stop`, so that its health is known (and
    /// its recovery seen) while no call asks it. One round trip per probe.
    pub fn probe_health(
        self: &Arc<Self>,
        every: Duration,
        stop: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                let mut connection = this.connection.clone();
                let ping = redis::cmd("PING");
                let probe = ping.query_async::<String>(&mut connection);
                match tokio::time::timeout(this.settings.timeout, probe).await {
                    Ok(Ok(_)) => this.health.recover(),
                    Ok(Err(e)) => this.health.fail(&format!("redis: {e}")),
                    Err(_) => this.health.fail(&format!(
                        "redis: no answer within {:?}",
                        this.settings.timeout
                    )),
                }
                tokio::select! {
                    () = tokio::time::sleep(every) => {}
                    () = stop.cancelled() => return,
                }
            }
        })
    }

    /// Listens for admin changes (every replica's, this one's included) until `stop`,
    /// subscribing again after a lost connection, and hands each to `apply`.
    pub fn listen(
        self: &Arc<Self>,
        apply: Arc<dyn Fn(Change) + Send + Sync>,
        stop: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                let listened = tokio::select! {
                    result = this.listen_once(&apply) => result,
                    () = stop.cancelled() => return,
                };
                if let Err(e) = listened {
                    tracing::warn!(error = %e, "lost the shared-limits channel; subscribing again");
                }
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(200)) => {}
                    () = stop.cancelled() => return,
                }
            }
        })
    }

    async fn listen_once(
        &self,
        apply: &Arc<dyn Fn(Change) + Send + Sync>,
    ) -> Result<(), redis::RedisError> {
        let mut pubsub = self.client.get_async_pubsub().await?;
        pubsub.subscribe(self.channel()).await?;
        let mut messages = pubsub.on_message();
        while let Some(message) = messages.next().await {
            let Ok(payload) = message.get_payload::<String>() else {
                continue;
            };
            let change = match payload.split_once(':') {
                Some(("key", id)) => Change::Key(id.to_owned()),
                Some(("user", id)) => Change::User(id.to_owned()),
                Some(("prices", _)) => Change::Prices,
                Some(("model", name)) => Change::Model(name.to_owned()),
                _ => continue,
            };
            let apply = apply.clone();
            // Reading the record again is a store call: off the async threads.
            tokio::task::spawn_blocking(move || apply(change));
        }
        Ok(())
    }
}

impl SharedLimits for RedisLimits {
    fn admit(&self, ask: SharedAsk) -> BoxFuture<'_, Result<SharedClaim, SharedRefusal>> {
        Box::pin(async move {
            // Two round trips and a store read at most (a key Redis has no counters for).
            let deadline = self.settings.timeout * 3;
            let admitted = tokio::time::timeout(deadline, self.admit_within_deadline(ask))
                .await
                .unwrap_or_else(|_| {
                    Err(SharedRefusal::Unavailable(format!(
                        "redis: no answer within {deadline:?}"
                    )))
                });
            match &admitted {
                // The books a key's counters are loaded from failing is not Redis failing.
                Err(SharedRefusal::Unavailable(error)) if error.starts_with(BOOKS) => {}
                Err(SharedRefusal::Unavailable(error)) => self.health.fail(error),
                Ok(_) | Err(SharedRefusal::Quota { .. } | SharedRefusal::Rate(_)) => {
                    self.health.recover();
                }
            }
            admitted
        })
    }

    fn settle(&self, settlement: SharedSettlement) {
        let SharedSettlement {
            claim,
            charged_request,
            charged_tokens,
            charged_images,
            charged_cost,
            withdrawn,
        } = settlement;
        let ask = &claim.ask;
        let delta = |charged: u64, reserved: u64| {
            i64::try_from(charged).unwrap_or(i64::MAX) - i64::try_from(reserved).unwrap_or(0)
        };
        let limit = |l: Option<u64>| l.unwrap_or(0);
        let script = self.settle.clone();
        let names = self.names(ask);
        // In the order of settle.lua's ARGV.
        let args = [
            i64::from(!charged_request).saturating_neg().to_string(),
            delta(charged_tokens, ask.tokens).to_string(),
            delta(charged_images, ask.images).to_string(),
            ask.call_id.clone(),
            limit(ask.key_limits.rpm.map(u64::from)).to_string(),
            limit(ask.key_limits.tpm).to_string(),
            limit(ask.user_limits.rpm.map(u64::from)).to_string(),
            limit(ask.user_limits.tpm).to_string(),
            claim.generation.clone(),
            u8::from(withdrawn).to_string(),
            delta(charged_cost, ask.cost).to_string(),
        ];
        let mut connection = self.connection.clone();
        let timeout = self.settings.timeout;
        let call_id = ask.call_id.clone();
        self.runtime.spawn(async move {
            let mut invocation = script.prepare_invoke();
            for name in names {
                invocation.key(name);
            }
            for arg in &args {
                invocation.arg(arg);
            }
            let sent =
                tokio::time::timeout(timeout, invocation.invoke_async::<i64>(&mut connection));
            match sent.await {
                Ok(Ok(_)) => {}
                // Its reservation stays counted (refusing more, never less); its slot is
                // freed when its hold runs out.
                Ok(Err(e)) => {
                    tracing::warn!(call_id, error = %e, "a settlement did not reach redis")
                }
                Err(_) => tracing::warn!(call_id, "a settlement did not reach redis in time"),
            }
        });
    }

    fn health(&self) -> &SharedLimitsHealth {
        &self.health
    }

    fn announce(&self, change: Change) {
        let payload = match &change {
            Change::Key(id) => format!("key:{id}"),
            Change::User(id) => format!("user:{id}"),
            Change::Prices => "prices:".to_owned(),
            Change::Model(name) => format!("model:{name}"),
        };
        let mut connection = self.connection.clone();
        let channel = self.channel();
        let timeout = self.settings.timeout;
        self.runtime.spawn(async move {
            let mut publish = redis::cmd("PUBLISH");
            publish.arg(channel).arg(&payload);
            let sent = tokio::time::timeout(timeout, publish.query_async::<i64>(&mut connection));
            if !matches!(sent.await, Ok(Ok(_))) {
                tracing::warn!(
                    change = payload,
                    "an admin change could not be announced to the other replicas"
                );
            }
        });
    }
}
