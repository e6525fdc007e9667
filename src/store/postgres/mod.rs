//! The books in Postgres, for several gateway replicas sharing one set of keys and one
//! call log: core's `Store` port over a connection pool, with versioned migrations run at
//! open. The port is synchronous (sled answers from memory), so every call here runs on a
//! small runtime of the store's own and is waited for with a deadline: a request never
//! hangs on a dead database, and the caller's runtime, whatever its flavour, is never
//! asked to drive the database's futures.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::future::Future;
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use sqlx::migrate::{MigrateError, Migration, MigrationType, Migrator};
use sqlx::postgres::{PgPool, PgPoolOptions, PgRow};
use sqlx::{Row, SqlSafeStr};

use crate::core::catalogue::ModelRecord;
use crate::core::export::setting_bytes;
use crate::core::keys;
use crate::core::money::Money;
use crate::core::pricing::PriceRecord;
use crate::core::records::AuditRecord;
use crate::core::records::{
    CallRecord, EncodedCall, ExportRecord, KeyCounters, KeyRecord, UsageBucket, UserRecord,
};
use crate::core::store::{CallCursor, CallQuery, Store, StoreError};
use crate::core::time::UnixTime;

/// The schema's versions, oldest first; applied in order, each once, at open.
const MIGRATIONS: [(i64, &str, &str); 5] = [
    (1, "books", include_str!("migrations/0001_books.sql")),
    (2, "money", include_str!("migrations/0002_money.sql")),
    (3, "models", include_str!("migrations/0003_models.sql")),
    (
        4,
        "cache_hits",
        include_str!("migrations/0004_cache_hits.sql"),
    ),
    (5, "audit", include_str!("migrations/0005_audit.sql")),
];

/// Rows read from the call log per round trip while a page is looked for.
const CALL_PAGE_ROWS: i64 = 500;
/// Keys read per round trip by `scan_keys`.
const KEY_PAGE_ROWS: i64 = 500;

/// The shared store. Every method answers within the configured timeout, or fails.
pub struct PostgresStore {
    pool: PgPool,
    runtime: StoreRuntime,
    timeout: Duration,
    /// This replica's name for the reservations of its journal: two replicas' journals
    /// number their reservations independently, so a call is kept once per (origin,
    /// reservation), never once per reservation alone.
    origin: String,
    /// Held while the store is open: the data directory (journal, origin) of one replica
    /// is not shared by a second.
    _lock: std::fs::File,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

/// Runs the pool's futures; shut down without waiting when dropped (dropping a runtime
/// blocks, which a caller inside another runtime may not do).
struct StoreRuntime(Option<tokio::runtime::Runtime>);

impl Drop for StoreRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

fn io(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(format!("postgres: {what}: {e}"))
}

fn corrupt(tree: &'static str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        tree,
        message: e.to_string(),
    }
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn to_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

fn encode<T: serde::Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Io(e.to_string()))
}

fn decode<T: serde::de::DeserializeOwned>(tree: &'static str, text: &str) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|e| corrupt(tree, e))
}

fn hour_of(micros: i64) -> UnixTime {
    let secs = micros.div_euclid(1_000_000);
    secs - secs.rem_euclid(3600)
}

/// The SHA-256 hashes that find `key`: its current secret's and its previous one's.
fn secret_hashes(key: &KeyRecord) -> Result<Vec<Vec<u8>>, StoreError> {
    std::iter::once(&key.hash)
        .chain(key.previous_hash.as_ref())
        .map(|hex| {
            keys::from_hex(hex)
                .map(|hash| hash.to_vec())
                .ok_or_else(|| corrupt("keys", format!("key `{}` has a malformed hash", key.id)))
        })
        .collect()
}

fn counters_from(row: &PgRow, offset: usize) -> Result<KeyCounters, sqlx::Error> {
    let get = |i: usize| -> Result<u64, sqlx::Error> {
        Ok(to_u64(
            row.try_get::<Option<i64>, _>(offset + i)?.unwrap_or(0),
        ))
    };
    Ok(KeyCounters {
        requests: get(0)?,
        prompt_tokens: get(1)?,
        completion_tokens: get(2)?,
        images: get(3)?,
        cost: Money(get(4)?),
    })
}

fn migrator() -> Migrator {
    let mut migrator = Migrator::with_migrations(
        MIGRATIONS
            .iter()
            .map(|&(version, description, sql)| {
                Migration::new(
                    version,
                    description.into(),
                    MigrationType::Simple,
                    sql.into_sql_str(),
                    false,
                )
            })
            .collect(),
    );
    // Replicas starting together take turns (an advisory lock) rather than race.
    migrator.set_locking(true);
    migrator
}

/// The ids of calls a batch adds, the batch's calls as columns for one `UNNEST` insert.
#[derive(Default)]
struct CallColumns {
    at_micros: Vec<i64>,
    request_ids: Vec<String>,
    key_ids: Vec<String>,
    reservations: Vec<Option<i64>>,
    records: Vec<String>,
}

impl CallColumns {
    /// `json` is the call's encoding when the caller has it already.
    fn push(&mut self, call: &CallRecord, json: Option<Cow<'_, [u8]>>) -> Result<(), StoreError> {
        self.at_micros.push(call.at_micros);
        self.request_ids.push(call.request_id.clone());
        self.key_ids.push(call.key_id.clone());
        self.reservations
            .push(call.reservation.map(u64::cast_signed));
        self.records.push(match json {
            Some(json) => String::from_utf8_lossy(&json).into_owned(),
            None => encode(call)?,
        });
        Ok(())
    }

    /// Inserts the calls not in the log yet (by time and request id, and by `origin`'s
    /// reservation); the (time, request id) of those it inserted.
    async fn insert<'e>(
        &self,
        executor: impl sqlx::PgExecutor<'e>,
        origin: String,
    ) -> Result<HashSet<(i64, String)>, sqlx::Error> {
        let rows = sqlx::query(
            "INSERT INTO calls (at_micros, request_id, key_id, origin, reservation, record) \
             SELECT a, r, k, $4, res, rec::jsonb \
             FROM UNNEST($1::bigint[], $2::text[], $3::text[], $5::bigint[], $6::text[]) \
             AS t(a, r, k, res, rec) \
             ON CONFLICT DO NOTHING RETURNING at_micros, request_id",
        )
        .bind(&self.at_micros)
        .bind(&self.request_ids)
        .bind(&self.key_ids)
        .bind(origin)
        .bind(&self.reservations)
        .bind(&self.records)
        .fetch_all(executor)
        .await?;
        rows.iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
            .collect()
    }
}

impl PostgresStore {
    /// One transaction: the calls not yet in the log go in (a call already there, by time
    /// and request id or by this replica's reservation, is skipped by the database's
    /// unique indexes, even when another replica is writing it at the same moment), and
    /// only the calls that went in are added to the counters and hourly usage.
    /// Each call comes with its encoding when the caller has it.
    fn record<'a>(
        &self,
        calls: impl ExactSizeIterator<Item = (&'a CallRecord, Option<Cow<'a, [u8]>>)>,
    ) -> Result<(), StoreError> {
        if calls.len() == 0 {
            return Ok(());
        }
        let mut columns = CallColumns::default();
        let mut charges: Vec<Charge> = Vec::with_capacity(calls.len());
        for (call, json) in calls {
            charges.push(Charge::of(call));
            columns.push(call, json)?;
        }
        let origin = self.origin.clone();
        self.run("record calls", |pool| async move {
            let fail = |e| io("record calls", e);
            let mut tx = pool.begin().await.map_err(fail)?;
            let inserted = columns.insert(&mut *tx, origin).await.map_err(fail)?;
            // The books are added to in the same transaction, so they and the log agree
            // whatever happens to the commit (an unknown fate is retried, and skipped).
            let (counters, buckets) = fold(charges, &inserted);
            write_books(&mut tx, counters, buckets)
                .await
                .map_err(fail)?;
            tx.commit().await.map_err(fail)
        })
    }

    /// Connects to `url`, brings its schema up to this build's, and locks `data_dir` (where
    /// this replica's journal and origin live) for this process.
    pub fn open(
        url: &str,
        data_dir: &Path,
        timeout: Duration,
        max_connections: u32,
    ) -> Result<Self, StoreError> {
        let lock = lock_data_dir(data_dir)?;
        let origin = origin_of(data_dir)?;
        let runtime = StoreRuntime(Some(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("postgres-store")
                .enable_all()
                .build()
                .map_err(|e| io("cannot start the store's runtime", e))?,
        ));
        let options = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(timeout);
        let url = url.to_owned();
        let pool = wait(&runtime, timeout, "connect", async move {
            options.connect(&url).await.map_err(|e| io("connect", e))
        })?;
        let migrating = pool.clone();
        wait(&runtime, timeout * 10, "migrate", async move {
            migrate(&migrating).await
        })?;
        Ok(PostgresStore {
            pool,
            runtime,
            timeout,
            origin,
            _lock: lock,
        })
    }

    /// Removes every record (users, keys, settings, counters, hourly usage, the call log);
    /// the schema stays. For `store copy`: its `--force`, and its undo when stopped.
    pub fn clear(&self) -> Result<(), StoreError> {
        self.run("clear", |pool| async move {
            sqlx::query(
                "TRUNCATE users, keys, key_hashes, counters, usage, calls, meta, prices, models, audit",
            )
            .execute(&pool)
            .await
            .map_err(|e| io("clear", e))?;
            Ok(())
        })
    }

    /// Up to `rows` calls of the log, newest first, strictly before `before`.
    fn call_page(
        &self,
        query: &CallQuery<'_>,
        before: Option<CallCursor>,
        rows: i64,
    ) -> Result<Vec<(CallCursor, String)>, StoreError> {
        let key_id = query.key_id.map(str::to_owned);
        let from = query.from_micros.unwrap_or(i64::MIN);
        let (at, request_id) = match before {
            Some(c) => {
                let (at, id) = cursor_parts(&c)?;
                (Some(at), Some(id))
            }
            None => (None, None),
        };
        self.run("read calls", |pool| async move {
            let rows = sqlx::query(
                "SELECT at_micros, request_id, record::text FROM calls \
                 WHERE ($1::text IS NULL OR key_id = $1) AND at_micros >= $2 \
                 AND ($3::bigint IS NULL OR (at_micros, request_id) < ($3, $4::text)) \
                 ORDER BY at_micros DESC, request_id DESC LIMIT $5",
            )
            .bind(key_id)
            .bind(from)
            .bind(at)
            .bind(request_id)
            .bind(rows)
            .fetch_all(&pool)
            .await
            .map_err(|e| io("read calls", e))?;
            rows.iter()
                .map(|row| {
                    let cursor = cursor_of(row.try_get(0)?, &row.try_get::<String, _>(1)?);
                    Ok((cursor, row.try_get(2)?))
                })
                .collect::<Result<_, sqlx::Error>>()
                .map_err(|e| io("read calls", e))
        })
    }

    /// Runs `job` on the store's runtime and waits for it, at most the timeout.
    /// Every record a `SELECT record::text …` query reads, decoded.
    fn load_records<T: serde::de::DeserializeOwned>(
        &self,
        table: &'static str,
        sql: &'static str,
    ) -> Result<Vec<T>, StoreError> {
        let rows: Vec<String> = self.run("load records", |pool| async move {
            sqlx::query_scalar(sql)
                .fetch_all(&pool)
                .await
                .map_err(|e| io(table, e))
        })?;
        rows.iter().map(|text| decode(table, text)).collect()
    }

    /// Writes one record (JSON) by its id with an `INSERT … ($1 id, $2 record)` statement.
    fn put_record(
        &self,
        what: &'static str,
        sql: &'static str,
        id: String,
        record: String,
    ) -> Result<(), StoreError> {
        self.run(what, |pool| async move {
            sqlx::query(sql)
                .bind(id)
                .bind(record)
                .execute(&pool)
                .await
                .map_err(|e| io(what, e))?;
            Ok(())
        })
    }

    fn run<T, F>(&self, what: &'static str, job: impl FnOnce(PgPool) -> F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        wait(&self.runtime, self.timeout, what, job(self.pool.clone()))
    }
}

/// Spawns `job` on `runtime` and blocks until it answers or `timeout` passes (the job is
/// then abandoned: a transaction it had open is rolled back with its connection).
fn wait<T: Send + 'static>(
    runtime: &StoreRuntime,
    timeout: Duration,
    what: &'static str,
    job: impl Future<Output = Result<T, StoreError>> + Send + 'static,
) -> Result<T, StoreError> {
    let Some(runtime) = &runtime.0 else {
        return Err(io(what, "the store is closed"));
    };
    let (tx, rx) = mpsc::sync_channel(1);
    runtime.spawn(async move {
        let result = match tokio::time::timeout(timeout, job).await {
            Ok(result) => result,
            Err(_) => Err(io(what, format!("no answer within {timeout:?}"))),
        };
        let _ = tx.send(result);
    });
    // A little longer than the job's own deadline, which reports itself more precisely.
    rx.recv_timeout(timeout + Duration::from_millis(250))
        .unwrap_or_else(|_| Err(io(what, format!("no answer within {timeout:?}"))))
}

async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
    let migrator = migrator();
    let known = MIGRATIONS.last().map_or(0, |m| m.0);
    match migrator.run(pool).await {
        Ok(()) => Ok(()),
        // A version applied that this build does not have: a newer build's schema.
        Err(MigrateError::VersionMissing(found)) => Err(StoreError::NewerSchema {
            found: u32::try_from(found).unwrap_or(u32::MAX),
            known: u32::try_from(known).unwrap_or(u32::MAX),
        }),
        Err(e) => Err(io("migrate", e)),
    }
}

fn lock_data_dir(dir: &Path) -> Result<std::fs::File, StoreError> {
    let path = dir.join("replica.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| io(&format!("cannot open {}", path.display()), e))?;
    // As with sled: a gateway that is still stopping (in this process or another) holds
    // the lock for a moment, so a held lock is tried again for up to two seconds.
    for _ in 0..100 {
        if file.try_lock().is_ok() {
            return Ok(file);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Err(StoreError::Io(format!(
        "{} is locked by another gateway: each replica needs a data directory of its own",
        dir.display()
    )))
}

/// This replica's origin: random, made at its first start, kept in its data directory
/// next to the journal whose reservations it names.
fn origin_of(dir: &Path) -> Result<String, StoreError> {
    let path = dir.join("replica-id");
    if path.exists() {
        let id = std::fs::read_to_string(&path).map_err(|e| corrupt("replica-id", e))?;
        return match id.trim() {
            "" => Err(corrupt(
                "replica-id",
                format!("{} is empty", path.display()),
            )),
            id => Ok(id.to_owned()),
        };
    }
    let id = keys::generate_id("rep");
    std::fs::write(&path, &id)
        .and_then(|()| std::fs::File::open(&path)?.sync_all())
        .map_err(|e| io(&format!("cannot write {}", path.display()), e))?;
    Ok(id)
}

/// A place in the call log as a page token: `pg:<micros>:<request id>` (the log's order;
/// the prefix tells it from the sled store's tokens).
fn cursor_of(at_micros: i64, request_id: &str) -> CallCursor {
    CallCursor::new(format!("pg:{at_micros}:{request_id}"))
}

fn cursor_parts(cursor: &CallCursor) -> Result<(i64, String), StoreError> {
    let (at, id) = cursor
        .as_str()
        .strip_prefix("pg:")
        .and_then(|rest| rest.split_once(':'))
        .ok_or(StoreError::UnknownCursor)?;
    let at = at.parse().map_err(|_| StoreError::UnknownCursor)?;
    if id.is_empty() {
        return Err(StoreError::UnknownCursor);
    }
    Ok((at, id.to_owned()))
}

/// The columns of `usage` after the key, as `bucket_from` reads them.
const BUCKET_COLUMNS: &str = "hour, model, version, requests, errors, prompt_tokens, \
     completion_tokens, images, cost, cache_hits";

/// A bucket from the columns of [`BUCKET_COLUMNS`], starting at `offset`.
fn bucket_from(row: &PgRow, offset: usize) -> Result<UsageBucket, sqlx::Error> {
    let count = |i: usize| -> Result<u64, sqlx::Error> { Ok(to_u64(row.try_get(offset + i)?)) };
    Ok(UsageBucket {
        hour: row.try_get(offset)?,
        model: row.try_get(offset + 1)?,
        version: row.try_get(offset + 2)?,
        requests: count(3)?,
        errors: count(4)?,
        prompt_tokens: count(5)?,
        completion_tokens: count(6)?,
        images: count(7)?,
        cost: Money(count(8)?),
        cache_hits: count(9)?,
    })
}

/// Calls read at once by an export.
const EXPORT_PAGE_ROWS: i64 = 5_000;

impl Store for PostgresStore {
    fn export(
        &self,
        visit: &mut dyn FnMut(ExportRecord) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let meta: Vec<(String, Vec<u8>)> = self.run("export", |pool| async move {
            sqlx::query_as("SELECT name, value FROM meta ORDER BY name")
                .fetch_all(&pool)
                .await
                .map_err(|e| io("export", e))
        })?;
        for (name, value) in meta {
            visit(ExportRecord::Meta {
                name,
                value: crate::core::keys::to_hex(&value),
            })?;
        }
        for user in self.load_users()? {
            visit(ExportRecord::User(user))?;
        }
        let mut keys = Vec::new();
        self.scan_keys(None, &mut |key, counters| {
            keys.push((key, counters));
            true
        })?;
        let mut counted = Vec::new();
        for (key, counters) in keys {
            counted.push((key.id.clone(), counters));
            visit(ExportRecord::Key(key))?;
        }
        for (key_id, counters) in counted {
            visit(ExportRecord::Counters { key_id, counters })?;
        }
        let buckets: Vec<(String, UsageBucket)> = self.run("export", |pool| async move {
            let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT key_id, {BUCKET_COLUMNS} FROM usage ORDER BY key_id, hour, model, version"
            )))
            .fetch_all(&pool)
            .await
            .map_err(|e| io("export", e))?;
            rows.iter()
                .map(|row| Ok((row.try_get(0)?, bucket_from(row, 1)?)))
                .collect::<Result<_, sqlx::Error>>()
                .map_err(|e| io("export", e))
        })?;
        for (key_id, bucket) in buckets {
            visit(ExportRecord::Usage { key_id, bucket })?;
        }
        // The call log, oldest first, a page at a time.
        let mut after: Option<(i64, String)> = None;
        loop {
            let from = after.clone();
            let page: Vec<(i64, String, String)> = self.run("export", |pool| async move {
                let (at, id) = from.map_or((None, None), |(a, i)| (Some(a), Some(i)));
                sqlx::query_as(
                    "SELECT at_micros, request_id, record::text FROM calls \
                     WHERE $1::bigint IS NULL OR (at_micros, request_id) > ($1, $2::text) \
                     ORDER BY at_micros, request_id LIMIT $3",
                )
                .bind(at)
                .bind(id)
                .bind(EXPORT_PAGE_ROWS)
                .fetch_all(&pool)
                .await
                .map_err(|e| io("export", e))
            })?;
            let full = page.len() == EXPORT_PAGE_ROWS as usize;
            for (at, id, text) in page {
                visit(ExportRecord::Call(decode("calls", &text)?))?;
                after = Some((at, id));
            }
            if !full {
                break;
            }
        }
        for price in self.load_prices()? {
            visit(ExportRecord::Price(price))?;
        }
        for model in self.load_models()? {
            visit(ExportRecord::Model(model))?;
        }
        // The audit log, oldest first (a page at a time, like the calls).
        let mut after: Option<String> = None;
        loop {
            let last = after.clone();
            let page: Vec<(String, String)> = self.run("export", |pool| async move {
                sqlx::query_as(
                    "SELECT id, record::text FROM audit WHERE $1::text IS NULL OR id > $1 \
                     ORDER BY id LIMIT $2",
                )
                .bind(last)
                .bind(EXPORT_PAGE_ROWS)
                .fetch_all(&pool)
                .await
                .map_err(|e| io("export", e))
            })?;
            let full = page.len() == EXPORT_PAGE_ROWS as usize;
            for (id, text) in page {
                visit(ExportRecord::Audit(decode("audit", &text)?))?;
                after = Some(id);
            }
            if !full {
                break;
            }
        }
        Ok(())
    }

    fn import(&self, records: &[ExportRecord]) -> Result<(), StoreError> {
        let mut calls = CallColumns::default();
        for record in records {
            match record {
                ExportRecord::Meta { name, value } => {
                    self.put_meta(name, &setting_bytes(name, value)?)?;
                }
                ExportRecord::User(user) => self.put_user(user)?,
                ExportRecord::Key(key) => self.put_key(key)?,
                ExportRecord::Counters { key_id, counters } => {
                    let (key_id, c) = (key_id.clone(), *counters);
                    self.run("import", |pool| async move {
                        sqlx::query(
                            "INSERT INTO counters (key_id, requests, prompt_tokens, \
                             completion_tokens, images, cost) VALUES ($1, $2, $3, $4, $5, $6) \
                             ON CONFLICT (key_id) DO UPDATE SET requests = EXCLUDED.requests, \
                             prompt_tokens = EXCLUDED.prompt_tokens, \
                             completion_tokens = EXCLUDED.completion_tokens, \
                             images = EXCLUDED.images, cost = EXCLUDED.cost",
                        )
                        .bind(key_id)
                        .bind(c.requests.cast_signed())
                        .bind(c.prompt_tokens.cast_signed())
                        .bind(c.completion_tokens.cast_signed())
                        .bind(c.images.cast_signed())
                        .bind(c.cost.0.cast_signed())
                        .execute(&pool)
                        .await
                        .map_err(|e| io("import", e))?;
                        Ok(())
                    })?;
                }
                ExportRecord::Usage { key_id, bucket } => {
                    let (key_id, b) = (key_id.clone(), bucket.clone());
                    self.run("import", |pool| async move {
                        sqlx::query(
                            "INSERT INTO usage (key_id, hour, model, version, requests, \
                             errors, prompt_tokens, completion_tokens, images, cost, cache_hits) \
                             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
                             ON CONFLICT (key_id, hour, model, version) DO UPDATE SET \
                             requests = EXCLUDED.requests, errors = EXCLUDED.errors, \
                             prompt_tokens = EXCLUDED.prompt_tokens, \
                             completion_tokens = EXCLUDED.completion_tokens, \
                             images = EXCLUDED.images, cost = EXCLUDED.cost, \
                             cache_hits = EXCLUDED.cache_hits",
                        )
                        .bind(key_id)
                        .bind(b.hour)
                        .bind(b.model)
                        .bind(b.version)
                        .bind(b.requests.cast_signed())
                        .bind(b.errors.cast_signed())
                        .bind(b.prompt_tokens.cast_signed())
                        .bind(b.completion_tokens.cast_signed())
                        .bind(b.images.cast_signed())
                        .bind(b.cost.0.cast_signed())
                        .bind(b.cache_hits.cast_signed())
                        .execute(&pool)
                        .await
                        .map_err(|e| io("import", e))?;
                        Ok(())
                    })?;
                }
                ExportRecord::Call(call) => calls.push(call, None)?,
                ExportRecord::Price(price) => self.put_price(price)?,
                ExportRecord::Model(model) => self.put_model(model)?,
                ExportRecord::Audit(record) => self.put_audit(record)?,
            }
        }
        if calls.at_micros.is_empty() {
            return Ok(());
        }
        // The calls as they are, without adding to the books (their counters and hourly
        // usage were imported above), under this replica's origin.
        let origin = self.origin.clone();
        self.run("import", |pool| async move {
            calls
                .insert(&pool, origin)
                .await
                .map_err(|e| io("import", e))?;
            Ok(())
        })
    }

    fn is_empty(&self) -> Result<bool, StoreError> {
        self.run("is empty", |pool| async move {
            sqlx::query_scalar(
                "SELECT NOT EXISTS (SELECT 1 FROM users) AND NOT EXISTS (SELECT 1 FROM keys) \
                 AND NOT EXISTS (SELECT 1 FROM calls) AND NOT EXISTS (SELECT 1 FROM counters)",
            )
            .fetch_one(&pool)
            .await
            .map_err(|e| io("is empty", e))
        })
    }

    fn load_users(&self) -> Result<Vec<UserRecord>, StoreError> {
        self.load_records("users", "SELECT record::text FROM users ORDER BY id")
    }

    fn load_prices(&self) -> Result<Vec<PriceRecord>, StoreError> {
        self.load_records(
            "prices",
            "SELECT record::text FROM prices ORDER BY model, effective_from",
        )
    }

    fn put_price(&self, price: &PriceRecord) -> Result<(), StoreError> {
        let (model, from, record) = (price.model.clone(), price.effective_from, encode(price)?);
        self.run("put price", |pool| async move {
            sqlx::query(
                "INSERT INTO prices (model, effective_from, record) VALUES ($1, $2, $3::jsonb) \
                 ON CONFLICT (model, effective_from) DO UPDATE SET record = EXCLUDED.record",
            )
            .bind(model)
            .bind(from)
            .bind(record)
            .execute(&pool)
            .await
            .map_err(|e| io("put price", e))?;
            Ok(())
        })
    }

    fn key_id_by_hash(&self, hash: &[u8; 32]) -> Result<Option<String>, StoreError> {
        let hash = hash.to_vec();
        self.run("find key", |pool| async move {
            sqlx::query_scalar("SELECT key_id FROM key_hashes WHERE hash = $1")
                .bind(hash)
                .fetch_optional(&pool)
                .await
                .map_err(|e| io("find key", e))
        })
    }

    fn load_key(&self, id: &str) -> Result<Option<(KeyRecord, KeyCounters)>, StoreError> {
        let id = id.to_owned();
        let row = self.run("load key", |pool| async move {
            let row = sqlx::query(
                "SELECT k.record::text, c.requests, c.prompt_tokens, c.completion_tokens, \
                 c.images, c.cost FROM keys k LEFT JOIN counters c ON c.key_id = k.id WHERE k.id = $1",
            )
            .bind(id)
            .fetch_optional(&pool)
            .await
            .map_err(|e| io("load key", e))?;
            row.map(|row| Ok((row.try_get::<String, _>(0)?, counters_from(&row, 1)?)))
                .transpose()
                .map_err(|e: sqlx::Error| io("load key", e))
        })?;
        row.map(|(text, counters)| Ok((decode("keys", &text)?, counters)))
            .transpose()
    }

    fn scan_keys(
        &self,
        after: Option<&str>,
        visit: &mut dyn FnMut(KeyRecord, KeyCounters) -> bool,
    ) -> Result<(), StoreError> {
        let mut after = after.map(str::to_owned);
        loop {
            let from = after.clone();
            let page: Vec<(String, String, KeyCounters)> =
                self.run("scan keys", |pool| async move {
                    let rows = sqlx::query(
                        "SELECT k.id, k.record::text, c.requests, c.prompt_tokens, \
                         c.completion_tokens, c.images, c.cost FROM keys k \
                         LEFT JOIN counters c ON c.key_id = k.id \
                         WHERE $1::text IS NULL OR k.id > $1 ORDER BY k.id LIMIT $2",
                    )
                    .bind(from)
                    .bind(KEY_PAGE_ROWS)
                    .fetch_all(&pool)
                    .await
                    .map_err(|e| io("scan keys", e))?;
                    rows.iter()
                        .map(|row| Ok((row.try_get(0)?, row.try_get(1)?, counters_from(row, 2)?)))
                        .collect::<Result<_, sqlx::Error>>()
                        .map_err(|e| io("scan keys", e))
                })?;
            let full = page.len() == KEY_PAGE_ROWS as usize;
            for (id, text, counters) in page {
                if !visit(decode("keys", &text)?, counters) {
                    return Ok(());
                }
                after = Some(id);
            }
            if !full {
                return Ok(());
            }
        }
    }

    fn put_user(&self, user: &UserRecord) -> Result<(), StoreError> {
        self.put_record(
            "put user",
            "INSERT INTO users (id, record) VALUES ($1, $2::jsonb) \
             ON CONFLICT (id) DO UPDATE SET record = EXCLUDED.record",
            user.id.clone(),
            encode(user)?,
        )
    }

    fn put_key(&self, key: &KeyRecord) -> Result<(), StoreError> {
        let (id, record, hashes) = (key.id.clone(), encode(key)?, secret_hashes(key)?);
        self.run("put key", |pool| async move {
            let fail = |e| io("put key", e);
            let mut tx = pool.begin().await.map_err(fail)?;
            sqlx::query(
                "INSERT INTO keys (id, record) VALUES ($1, $2::jsonb) \
                 ON CONFLICT (id) DO UPDATE SET record = EXCLUDED.record",
            )
            .bind(&id)
            .bind(record)
            .execute(&mut *tx)
            .await
            .map_err(fail)?;
            // Secrets the key no longer has (forgotten by a rotation) stop finding it.
            sqlx::query("DELETE FROM key_hashes WHERE key_id = $1 AND hash <> ALL($2)")
                .bind(&id)
                .bind(&hashes)
                .execute(&mut *tx)
                .await
                .map_err(fail)?;
            sqlx::query(
                "INSERT INTO key_hashes (hash, key_id) SELECT h, $2 FROM UNNEST($1::bytea[]) h \
                 ON CONFLICT (hash) DO UPDATE SET key_id = EXCLUDED.key_id",
            )
            .bind(&hashes)
            .bind(&id)
            .execute(&mut *tx)
            .await
            .map_err(fail)?;
            tx.commit().await.map_err(fail)
        })
    }

    fn record_calls(&self, calls: &[CallRecord]) -> Result<(), StoreError> {
        self.record(calls.iter().map(|call| (call, None)))
    }

    fn record_new_calls(&self, calls: &[EncodedCall]) -> Result<(), StoreError> {
        self.record(calls.iter().map(|c| (&c.call, c.json().ok())))
    }

    fn recorded_reservations(&self, reservations: &[u64]) -> Result<HashSet<u64>, StoreError> {
        let ids: Vec<i64> = reservations.iter().map(|r| r.cast_signed()).collect();
        let origin = self.origin.clone();
        let found: Vec<i64> = self.run("recorded reservations", |pool| async move {
            sqlx::query_scalar(
                "SELECT reservation FROM calls WHERE origin = $1 AND reservation = ANY($2)",
            )
            .bind(origin)
            .bind(ids)
            .fetch_all(&pool)
            .await
            .map_err(|e| io("recorded reservations", e))
        })?;
        Ok(found.into_iter().map(i64::cast_unsigned).collect())
    }

    fn calls(
        &self,
        query: &CallQuery<'_>,
        filter: &dyn Fn(&CallRecord) -> bool,
    ) -> Result<(Vec<CallRecord>, Option<CallCursor>), StoreError> {
        // The loop of the sled store's `calls`, over rows fetched a page at a time: a
        // cursor is returned exactly when the scan stopped before the log's end.
        let page_rows = i64::try_from(query.scan_limit.saturating_add(1))
            .unwrap_or(i64::MAX)
            .min(CALL_PAGE_ROWS);
        let mut buffer: VecDeque<String> = VecDeque::new();
        let mut fetched_to = query.before.clone();
        let mut exhausted = false;
        let (mut found, mut last, mut scanned) = (Vec::new(), None, 0);
        loop {
            if buffer.is_empty() && !exhausted {
                let page = self.call_page(query, fetched_to.take(), page_rows)?;
                exhausted = i64::try_from(page.len()).unwrap_or(i64::MAX) < page_rows;
                fetched_to = page.last().map(|(cursor, _)| cursor.clone());
                buffer.extend(page.into_iter().map(|(_, text)| text));
            }
            let Some(text) = buffer.pop_front() else {
                return Ok((found, None));
            };
            if found.len() == query.limit || scanned == query.scan_limit {
                return Ok((found, last));
            }
            scanned += 1;
            let call: CallRecord = decode("calls", &text)?;
            last = Some(cursor_of(call.at_micros, &call.request_id));
            if filter(&call) {
                found.push(call);
            }
        }
    }

    fn usage(
        &self,
        key_id: &str,
        from: UnixTime,
        to: UnixTime,
    ) -> Result<Vec<UsageBucket>, StoreError> {
        let key_id = key_id.to_owned();
        self.run("read usage", |pool| async move {
            let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {BUCKET_COLUMNS} FROM usage WHERE key_id = $1 AND hour >= $2 \
                 AND hour < $3 ORDER BY hour, model, version"
            )))
            .bind(key_id)
            .bind(from)
            .bind(to)
            .fetch_all(&pool)
            .await
            .map_err(|e| io("read usage", e))?;
            rows.iter()
                .map(|row| bucket_from(row, 0))
                .collect::<Result<_, sqlx::Error>>()
                .map_err(|e| io("read usage", e))
        })
    }

    fn load_models(&self) -> Result<Vec<ModelRecord>, StoreError> {
        self.load_records("models", "SELECT record::text FROM models ORDER BY name")
    }

    fn put_model(&self, model: &ModelRecord) -> Result<(), StoreError> {
        self.put_record(
            "put model",
            "INSERT INTO models (name, record) VALUES ($1, $2::jsonb) \
             ON CONFLICT (name) DO UPDATE SET record = EXCLUDED.record",
            model.name.clone(),
            encode(model)?,
        )
    }

    fn put_audit(&self, record: &AuditRecord) -> Result<(), StoreError> {
        self.put_record(
            "put audit",
            "INSERT INTO audit (id, record) VALUES ($1, $2::jsonb) ON CONFLICT (id) DO NOTHING",
            record.id.clone(),
            encode(record)?,
        )
    }

    fn delete_model(&self, name: &str) -> Result<(), StoreError> {
        let name = name.to_owned();
        self.run("delete model", |pool| async move {
            sqlx::query("DELETE FROM models WHERE name = $1")
                .bind(name)
                .execute(&pool)
                .await
                .map_err(|e| io("delete model", e))?;
            Ok(())
        })
    }

    fn audit(&self, before: Option<&str>, limit: usize) -> Result<Vec<AuditRecord>, StoreError> {
        let before = before.map(str::to_owned);
        let limit = to_i64(limit as u64);
        let rows: Vec<String> = self.run("read audit", |pool| async move {
            sqlx::query_scalar(
                "SELECT record::text FROM audit WHERE $1::text IS NULL OR id < $1 \
                 ORDER BY id DESC LIMIT $2",
            )
            .bind(before)
            .bind(limit)
            .fetch_all(&pool)
            .await
            .map_err(|e| io("read audit", e))
        })?;
        rows.iter().map(|text| decode("audit", text)).collect()
    }

    fn meta(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let name = name.to_owned();
        self.run("read meta", |pool| async move {
            sqlx::query_scalar("SELECT value FROM meta WHERE name = $1")
                .bind(name)
                .fetch_optional(&pool)
                .await
                .map_err(|e| io("read meta", e))
        })
    }

    fn put_meta(&self, name: &str, value: &[u8]) -> Result<(), StoreError> {
        let (name, value) = (name.to_owned(), value.to_vec());
        self.run("put meta", |pool| async move {
            sqlx::query(
                "INSERT INTO meta (name, value) VALUES ($1, $2) \
                 ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
            )
            .bind(name)
            .bind(value)
            .execute(&pool)
            .await
            .map_err(|e| io("put meta", e))?;
            Ok(())
        })
    }

    fn prune_calls(&self, before_micros: i64, limit: usize) -> Result<usize, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.run("prune calls", |pool| async move {
            let done = sqlx::query(
                "DELETE FROM calls WHERE (at_micros, request_id) IN (SELECT at_micros, \
                 request_id FROM calls WHERE at_micros < $1 ORDER BY at_micros LIMIT $2)",
            )
            .bind(before_micros)
            .bind(limit)
            .execute(&pool)
            .await
            .map_err(|e| io("prune calls", e))?;
            Ok(usize::try_from(done.rows_affected()).unwrap_or(usize::MAX))
        })
    }

    /// Every write is committed before it returns: nothing is left to flush.
    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// Key, hour, model and version.
type BucketKey = (String, i64, String, String);

/// What one call adds to the books, taken from its record before the batch is sent.
struct Charge {
    at_micros: i64,
    request_id: String,
    key_id: String,
    model: String,
    version: String,
    counters: KeyCounters,
    error: bool,
    cache_hit: bool,
}

impl Charge {
    fn of(call: &CallRecord) -> Self {
        Charge {
            at_micros: call.at_micros,
            request_id: call.request_id.clone(),
            key_id: call.key_id.clone(),
            model: call.model.clone(),
            version: call.version.clone().unwrap_or_default(),
            counters: call.counters(),
            error: call.status >= 400,
            cache_hit: call.cache_hit,
        }
    }
}

/// The counters and hourly usage the inserted calls add, folded per key and per bucket,
/// in key order (so concurrent batches lock rows in one order and never deadlock).
fn fold(
    charges: Vec<Charge>,
    inserted: &HashSet<(i64, String)>,
) -> (
    BTreeMap<String, KeyCounters>,
    BTreeMap<BucketKey, UsageBucket>,
) {
    let mut counters: BTreeMap<String, KeyCounters> = BTreeMap::new();
    let mut buckets: BTreeMap<BucketKey, UsageBucket> = BTreeMap::new();
    let mut counted: HashSet<(i64, String)> = HashSet::new();
    for charge in charges {
        let id = (charge.at_micros, charge.request_id);
        // A call twice in one batch went in once.
        if !inserted.contains(&id) || !counted.insert(id) {
            continue;
        }
        counters
            .entry(charge.key_id.clone())
            .or_default()
            .add(&charge.counters);
        let hour = hour_of(charge.at_micros);
        let bucket = buckets
            .entry((
                charge.key_id,
                hour,
                charge.model.clone(),
                charge.version.clone(),
            ))
            .or_insert_with(|| UsageBucket {
                hour,
                model: charge.model,
                version: charge.version,
                ..UsageBucket::default()
            });
        bucket.requests += charge.counters.requests;
        bucket.errors += u64::from(charge.error);
        bucket.prompt_tokens += charge.counters.prompt_tokens;
        bucket.completion_tokens += charge.counters.completion_tokens;
        bucket.images += charge.counters.images;
        bucket.cost = bucket.cost.saturating_add(charge.counters.cost);
        bucket.cache_hits += u64::from(charge.cache_hit);
    }
    (counters, buckets)
}

async fn write_books(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    counters: BTreeMap<String, KeyCounters>,
    buckets: BTreeMap<BucketKey, UsageBucket>,
) -> Result<(), sqlx::Error> {
    if counters.is_empty() {
        return Ok(());
    }
    let mut key_ids = Vec::with_capacity(counters.len());
    let mut figures: [Vec<i64>; 5] = Default::default();
    for (key_id, delta) in counters {
        key_ids.push(key_id);
        let row = [
            delta.requests,
            delta.prompt_tokens,
            delta.completion_tokens,
            delta.images,
            delta.cost.0,
        ];
        for (column, n) in figures.iter_mut().zip(row) {
            column.push(to_i64(n));
        }
    }
    let [requests, prompt_tokens, completion_tokens, images, cost] = figures;
    sqlx::query(
        "INSERT INTO counters (key_id, requests, prompt_tokens, completion_tokens, images, \
         cost) SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::bigint[], $4::bigint[], \
         $5::bigint[], $6::bigint[]) \
         ON CONFLICT (key_id) DO UPDATE SET \
         requests = counters.requests + EXCLUDED.requests, \
         prompt_tokens = counters.prompt_tokens + EXCLUDED.prompt_tokens, \
         completion_tokens = counters.completion_tokens + EXCLUDED.completion_tokens, \
         images = counters.images + EXCLUDED.images, \
         cost = counters.cost + EXCLUDED.cost",
    )
    .bind(key_ids)
    .bind(requests)
    .bind(prompt_tokens)
    .bind(completion_tokens)
    .bind(images)
    .bind(cost)
    .execute(&mut **tx)
    .await?;
    let (mut key_ids, mut hours, mut models, mut versions) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut figures: [Vec<i64>; 7] = Default::default();
    for ((key_id, hour, model, version), b) in buckets {
        key_ids.push(key_id);
        hours.push(hour);
        models.push(model);
        versions.push(version);
        let row = [
            b.requests,
            b.errors,
            b.prompt_tokens,
            b.completion_tokens,
            b.images,
            b.cost.0,
            b.cache_hits,
        ];
        for (column, n) in figures.iter_mut().zip(row) {
            column.push(to_i64(n));
        }
    }
    let [
        requests,
        errors,
        prompt_tokens,
        completion_tokens,
        images,
        cost,
        cache_hits,
    ] = figures;
    sqlx::query(
        "INSERT INTO usage (key_id, hour, model, version, requests, errors, prompt_tokens, \
         completion_tokens, images, cost, cache_hits) \
         SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::text[], $4::text[], \
         $5::bigint[], $6::bigint[], $7::bigint[], $8::bigint[], $9::bigint[], $10::bigint[], \
         $11::bigint[]) \
         ON CONFLICT (key_id, hour, model, version) DO UPDATE SET \
         requests = usage.requests + EXCLUDED.requests, \
         errors = usage.errors + EXCLUDED.errors, \
         prompt_tokens = usage.prompt_tokens + EXCLUDED.prompt_tokens, \
         completion_tokens = usage.completion_tokens + EXCLUDED.completion_tokens, \
         images = usage.images + EXCLUDED.images, \
         cost = usage.cost + EXCLUDED.cost, \
         cache_hits = usage.cache_hits + EXCLUDED.cache_hits",
    )
    .bind(key_ids)
    .bind(hours)
    .bind(models)
    .bind(versions)
    .bind(requests)
    .bind(errors)
    .bind(prompt_tokens)
    .bind(completion_tokens)
    .bind(images)
    .bind(cost)
    .bind(cache_hits)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
