//! The background writer: it drains the gate's usage queue and writes finished calls in
//! batches, so a request never waits for the store. When the store fails (a full disk),
//! the calls it could not take stay in memory and are written again until it recovers;
//! meanwhile the queue's [`StoreHealth`] tells the gate to refuse new calls.
//!
//! It runs on a thread of its own, not on the runtime's workers: a batch, a flush or a
//! prune holds its thread for milliseconds, and on a worker that stalled every call the
//! worker was serving (BENCHMARKS.md, "Where the tail came from"). The thread is in the
//! background scheduling class, so a call's worker takes the CPU from it at once; when it
//! falls behind (a full batch waiting, or calls settled a tenth of a second before their
//! batch) it takes its normal share until it catches up.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::core::journal::ReservationJournal;
use crate::core::records::{CallRecord, EncodedCall};
use crate::core::store::{Store, StoreError};
use crate::core::time::now_micros;
use crate::core::usage_sink::{StoreHealth, UsageQueue};

/// The most calls written in one store transaction.
const MAX_BATCH: usize = 1024;

/// How long the writer gathers calls before writing them in one transaction.
const BATCH_WINDOW: Duration = Duration::from_millis(20);

/// How long after a call settled its batch may be written before the writer leaves the
/// background class to catch up (the batch window is 20 ms of it). At 250 ms the backlog
/// of a saturated core reached 9,600 calls and RSS 67 MiB at 19,500 calls/s; at 100 ms
/// 5,500 calls and 59 MiB, with the same p99 (BENCHMARKS.md, session 5).
const MAX_LAG_MICROS: i64 = 100_000;

/// How often old calls are looked for in the call log (the first time soon after start),
/// and the most removed at once.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
const FIRST_PRUNE: Duration = Duration::from_secs(1);
const PRUNE_BATCH: usize = 10_000;

/// How often a failing store is tried again.
const RETRY_EVERY: Duration = Duration::from_millis(500);

/// How long shutdown keeps trying a failing store before it gives up on the calls it holds.
const SHUTDOWN_RETRIES: u32 = 6;

/// Owns the writer's thread; [`UsageWriter::stop`] drains the queue and flushes the store.
pub struct UsageWriter {
    stop: CancellationToken,
    /// Whether the writer's thread is in the background scheduling class now.
    background: Arc<AtomicBool>,
    /// The number of calls whose usage could not be written, sent as the thread ends.
    done: oneshot::Receiver<usize>,
    thread: std::thread::JoinHandle<()>,
}

impl UsageWriter {
    /// Starts the writer; it confirms durability with a flush every `flush_every`, and
    /// removes calls older than `retention` (if any) from the call log. In durable mode,
    /// the reservations of calls a flush made durable are closed in `journal`.
    pub fn spawn(
        store: Arc<dyn Store>,
        queue: UsageQueue,
        flush_every: Duration,
        retention: Option<Duration>,
        journal: Option<Arc<dyn ReservationJournal>>,
    ) -> std::io::Result<UsageWriter> {
        let stop = CancellationToken::new();
        let writer = Writer {
            store,
            queue,
            batch: Vec::with_capacity(MAX_BATCH),
            unflushed: Unflushed::default(),
            retention,
            journal,
            background: Arc::new(AtomicBool::new(super::priority::background_is_reversible())),
        };
        let background = writer.background.clone();
        // Its own runtime, for the writer's timers; the store's calls block this thread only.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()?;
        let (report, done) = oneshot::channel();
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("usage-writer".into())
            .spawn(move || {
                // The flag says what the thread is: a refusal here leaves it normal.
                if writer.background.load(Ordering::Relaxed)
                    && super::priority::set_background(true)
                {
                    tracing::info!("the usage writer runs in the background scheduling class");
                } else {
                    writer.background.store(false, Ordering::Relaxed);
                    tracing::info!(
                        "the usage writer keeps the normal scheduling class: leaving the \
                         background class again needs root, CAP_SYS_NICE or RLIMIT_NICE 20"
                    );
                }
                let unrecorded = runtime.block_on(writer.run(stopped, flush_every));
                let _ = report.send(unrecorded);
            })?;
        Ok(UsageWriter {
            stop,
            background,
            done,
            thread,
        })
    }

    /// Whether the writer runs in the background scheduling class now (`store::priority`).
    pub fn in_background(&self) -> bool {
        self.background.load(Ordering::Relaxed)
    }

    /// Writes everything queued so far, flushes the store and ends the thread. Returns the
    /// number of calls whose usage could not be written (the store failed to the end).
    pub async fn stop(self) -> usize {
        self.stop.cancel();
        let unrecorded = match self.done.await {
            Ok(unrecorded) => unrecorded,
            Err(_) => {
                tracing::error!("usage writer failed");
                0
            }
        };
        // It has sent its report: what is left of the thread ends at once.
        let _ = tokio::task::spawn_blocking(move || self.thread.join()).await;
        unrecorded
    }
}

struct Writer {
    store: Arc<dyn Store>,
    queue: UsageQueue,
    /// Calls received and not yet written (all of them while the store fails).
    batch: Vec<EncodedCall>,
    /// Calls written since the last successful flush. Kept until a flush confirms them:
    /// a store that fails before may lose them and is given them again.
    unflushed: Unflushed,
    retention: Option<Duration>,
    journal: Option<Arc<dyn ReservationJournal>>,
    /// Whether its thread is in the background scheduling class (`store::priority`).
    background: Arc<AtomicBool>,
}

impl Writer {
    fn health(&self) -> &StoreHealth {
        self.queue.health()
    }

    async fn run(mut self, stop: CancellationToken, flush_every: Duration) -> usize {
        let mut next_flush = Instant::now() + flush_every;
        let mut next_prune = Instant::now() + FIRST_PRUNE;
        // Held (shared) while the books change, so that a backup can keep them still.
        let books = self.queue.books();
        loop {
            if !self.health().is_available() {
                tokio::select! {
                    () = tokio::time::sleep(RETRY_EVERY) => {}
                    () = stop.cancelled() => break,
                }
                while let Some(call) = self.queue.try_recv() {
                    self.batch.push(call);
                }
                let _books = books.read().await;
                self.retry();
                continue;
            }
            tokio::select! {
                received = self.queue.recv_many(&mut self.batch, MAX_BATCH) => {
                    if received == 0 {
                        break;
                    }
                    // One store transaction per call costs more than the call itself: gather
                    // what arrives within a short window (well inside the flush interval, so
                    // no more can be lost on a hard kill) and write it together.
                    if self.batch.len() < MAX_BATCH {
                        tokio::select! {
                            () = tokio::time::sleep(BATCH_WINDOW) => {}
                            () = stop.cancelled() => {}
                        }
                        while self.batch.len() < MAX_BATCH {
                            match self.queue.try_recv() {
                                Some(call) => self.batch.push(call),
                                None => break,
                            }
                        }
                    }
                    // A full batch, or calls that settled long ago, mean the background does
                    // not get enough of the CPU (calls arrive faster, or other processes keep
                    // it busy): the writer takes its normal share until it has caught up.
                    let oldest = self.batch.first().map_or(0, |EncodedCall { call, .. }| {
                        call.at_micros + i64::try_from(call.latency_ms * 1000).unwrap_or(0)
                    });
                    let lag = now_micros().saturating_sub(oldest);
                    let background = self.batch.len() < MAX_BATCH && lag < MAX_LAG_MICROS;
                    if background != self.background.load(Ordering::Relaxed)
                        && super::priority::background_is_reversible()
                        && super::priority::set_background(background)
                    {
                        self.background.store(background, Ordering::Relaxed);
                    }
                    let _books = books.read().await;
                    self.write();
                }
                () = tokio::time::sleep_until(next_flush) => {
                    self.flush();
                    next_flush = Instant::now() + flush_every;
                }
                () = tokio::time::sleep_until(next_prune), if self.retention.is_some() => {
                    // A long backlog of old calls goes a batch at a time, between writes.
                    let pruned = {
                        let _books = books.read().await;
                        self.prune()
                    };
                    next_prune = Instant::now()
                        + if pruned >= PRUNE_BATCH { BATCH_WINDOW } else { PRUNE_EVERY };
                }
                () = stop.cancelled() => break,
            }
        }
        // Drain what is still queued, then make it all durable.
        while let Some(call) = self.queue.try_recv() {
            self.batch.push(call);
        }
        let _books = books.read().await;
        for attempt in 0..=SHUTDOWN_RETRIES {
            if attempt > 0 {
                tokio::time::sleep(RETRY_EVERY).await;
                self.retry();
            } else {
                while !self.batch.is_empty() && self.health().is_available() {
                    self.write();
                }
                self.flush();
            }
            if self.health().is_available() {
                return 0;
            }
        }
        let unrecorded = self.batch.len() + self.unflushed.len();
        tracing::error!(
            calls = unrecorded,
            error = self.health().last_error().unwrap_or_default(),
            "the store still fails at shutdown; the usage of these calls is lost from the store"
        );
        unrecorded
    }

    /// Removes one batch of calls older than the retention from the call log.
    fn prune(&self) -> usize {
        let Some(retention) = self.retention else {
            return 0;
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let before = i64::try_from(now.saturating_sub(retention).as_micros()).unwrap_or(0);
        match self.store.prune_calls(before, PRUNE_BATCH) {
            Ok(pruned) => pruned,
            Err(e) => {
                tracing::warn!(error = %e, "could not remove old calls from the call log");
                0
            }
        }
    }

    /// Writes up to one batch; on failure everything stays in memory.
    fn write(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let n = self.batch.len().min(MAX_BATCH);
        match self.store.record_new_calls(&self.batch[..n]) {
            Ok(()) => {
                self.queue.written(n);
                // Dropped here, a batch at a time: dropped at the flush, the calls of half a
                // second took milliseconds to free in one go (issue 21).
                self.unflushed.extend(self.batch.drain(..n));
            }
            Err(e) => self
                .health()
                .fail(&e.to_string(), self.batch.len() + self.unflushed.len()),
        }
    }

    /// Confirms what was written; what a failed flush may have lost is kept for a retry.
    fn flush(&mut self) {
        match self.store.flush() {
            Ok(()) => {
                self.close_reservations(self.unflushed.reservations());
                self.unflushed.clear();
            }
            Err(e) => self
                .health()
                .fail(&e.to_string(), self.batch.len() + self.unflushed.len()),
        }
    }

    /// These calls are durable in the store: their reservations need no journal any more.
    fn close_reservations(&self, reservations: impl Iterator<Item = u64>) {
        if let Some(journal) = &self.journal {
            journal.close(reservations.collect());
        }
    }

    /// Reopens the failing store and writes again everything not known to be durable;
    /// calls that did reach the disk are skipped by the store, so none is counted twice.
    fn retry(&mut self) {
        let held = self.batch.len() + self.unflushed.len();
        let result = self.store.reopen().and_then(|()| {
            let written = self.unflushed.calls()?;
            let waiting = self.batch.iter().map(|c| c.call.clone());
            let calls: Vec<CallRecord> = written.into_iter().chain(waiting).collect();
            for chunk in calls.chunks(MAX_BATCH) {
                self.store.record_calls(chunk)?;
            }
            self.store.flush()
        });
        match result {
            Ok(()) => {
                self.queue.written(self.batch.len());
                self.close_reservations(self.unflushed.reservations());
                self.unflushed.clear();
                let waiting = std::mem::take(&mut self.batch);
                self.close_reservations(waiting.iter().filter_map(|c| c.call.reservation));
                self.health().recover(held);
            }
            Err(e) => self.health().fail(&e.to_string(), held),
        }
    }
}

/// The calls written since the last successful flush, as the call log has them: a store
/// that fails before the next flush may have lost them, and is given them again.
///
/// Held as their encodings, a buffer per batch, so that a flush frees nothing call by call
/// (dropping half a second of calls at once took milliseconds), and a late flush makes no
/// buffer grow by copying (one of 8 MiB that doubled held the writer for 9 ms).
#[derive(Default)]
struct Unflushed {
    batches: Vec<HeldBatch>,
    /// Buffers of batches already flushed, for the next ones.
    spare: Vec<HeldBatch>,
    reservations: Vec<u64>,
}

#[derive(Default)]
struct HeldBatch {
    json: Vec<u8>,
    /// Where each call's encoding ends in `json`.
    ends: Vec<usize>,
}

/// The most batch buffers [`Unflushed`] keeps for reuse: half a second of calls at 20,000
/// a second is ten full batches.
const SPARE_BATCHES: usize = 12;

/// The largest batch buffer kept (a full batch without bodies is about half a megabyte).
const SPARE_BYTES: usize = 1024 * 1024;

impl Unflushed {
    fn extend(&mut self, calls: impl ExactSizeIterator<Item = EncodedCall>) {
        let mut held = self.spare.pop().unwrap_or_default();
        held.ends.reserve(calls.len());
        for call in calls {
            // The log took this encoding a moment ago, so it is there.
            if let Ok(json) = call.json() {
                held.json.extend_from_slice(&json);
            }
            held.ends.push(held.json.len());
            self.reservations.extend(call.call.reservation);
        }
        self.batches.push(held);
    }

    fn len(&self) -> usize {
        self.batches.iter().map(|b| b.ends.len()).sum()
    }

    fn reservations(&self) -> impl Iterator<Item = u64> + '_ {
        self.reservations.iter().copied()
    }

    /// The calls again, for a store that may have lost them.
    fn calls(&self) -> Result<Vec<CallRecord>, StoreError> {
        let mut calls = Vec::new();
        for held in &self.batches {
            let starts = std::iter::once(0).chain(held.ends.iter().copied());
            for (start, &end) in starts.zip(&held.ends) {
                calls.push(
                    serde_json::from_slice(&held.json[start..end])
                        .map_err(|e| StoreError::Io(format!("a call held for the store: {e}")))?,
                );
            }
        }
        Ok(calls)
    }

    fn clear(&mut self) {
        for mut held in self.batches.drain(..) {
            // A batch with bodies (`store.log_bodies`) may be large: its buffer goes.
            if self.spare.len() < SPARE_BATCHES && held.json.capacity() <= SPARE_BYTES {
                held.json.clear();
                held.ends.clear();
                self.spare.push(held);
            }
        }
        self.reservations.clear();
    }
}

#[cfg(test)]
mod tests {

    use super::*;

    use crate::core::store::StoreError;

    use crate::core::records::{KeyCounters, KeyRecord, UsageBucket, UserRecord};
    use crate::core::store::{CallCursor, CallQuery};
    use crate::core::testing::call;
    use crate::core::time::UnixTime;
    use crate::core::usage_sink::usage_channel;
    use crate::store::SledStore;

    /// A sled store whose writes fail (as on a full disk) while `full` is set.
    struct FillableStore {
        inner: SledStore,
        full: AtomicBool,
    }

    impl FillableStore {
        fn check(&self) -> Result<(), StoreError> {
            if self.full.load(Ordering::Relaxed) {
                Err(StoreError::Io(
                    "No space left on device (os error 28)".into(),
                ))
            } else {
                Ok(())
            }
        }
    }

    impl Store for FillableStore {
        fn load_users(&self) -> Result<Vec<UserRecord>, StoreError> {
            self.inner.load_users()
        }
        fn load_prices(&self) -> Result<Vec<crate::core::pricing::PriceRecord>, StoreError> {
            self.inner.load_prices()
        }
        fn put_price(&self, price: &crate::core::pricing::PriceRecord) -> Result<(), StoreError> {
            self.inner.put_price(price)
        }
        fn export(
            &self,
            visit: &mut dyn FnMut(crate::core::export::ExportRecord) -> Result<(), StoreError>,
        ) -> Result<(), StoreError> {
            self.inner.export(visit)
        }
        fn import(&self, records: &[crate::core::export::ExportRecord]) -> Result<(), StoreError> {
            self.inner.import(records)
        }
        fn is_empty(&self) -> Result<bool, StoreError> {
            self.inner.is_empty()
        }
        fn key_id_by_hash(&self, hash: &[u8; 32]) -> Result<Option<String>, StoreError> {
            self.inner.key_id_by_hash(hash)
        }
        fn load_key(&self, id: &str) -> Result<Option<(KeyRecord, KeyCounters)>, StoreError> {
            self.inner.load_key(id)
        }
        fn scan_keys(
            &self,
            after: Option<&str>,
            visit: &mut dyn FnMut(KeyRecord, KeyCounters) -> bool,
        ) -> Result<(), StoreError> {
            self.inner.scan_keys(after, visit)
        }
        fn put_user(&self, user: &UserRecord) -> Result<(), StoreError> {
            self.inner.put_user(user)
        }
        fn put_key(&self, key: &KeyRecord) -> Result<(), StoreError> {
            self.inner.put_key(key)
        }
        fn record_calls(&self, calls: &[CallRecord]) -> Result<(), StoreError> {
            self.check()?;
            self.inner.record_calls(calls)
        }
        fn recorded_reservations(
            &self,
            reservations: &[u64],
        ) -> Result<std::collections::HashSet<u64>, StoreError> {
            self.inner.recorded_reservations(reservations)
        }
        fn calls(
            &self,
            query: &CallQuery<'_>,
            filter: &dyn Fn(&CallRecord) -> bool,
        ) -> Result<(Vec<CallRecord>, Option<CallCursor>), StoreError> {
            self.inner.calls(query, filter)
        }
        fn usage(
            &self,
            key_id: &str,
            from: UnixTime,
            to: UnixTime,
        ) -> Result<Vec<UsageBucket>, StoreError> {
            self.inner.usage(key_id, from, to)
        }
        fn load_models(&self) -> Result<Vec<crate::core::catalogue::ModelRecord>, StoreError> {
            self.inner.load_models()
        }
        fn put_model(&self, model: &crate::core::catalogue::ModelRecord) -> Result<(), StoreError> {
            self.inner.put_model(model)
        }
        fn delete_model(&self, name: &str) -> Result<(), StoreError> {
            self.inner.delete_model(name)
        }
        fn meta(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
            self.inner.meta(name)
        }
        fn prune_calls(&self, before_micros: i64, limit: usize) -> Result<usize, StoreError> {
            self.inner.prune_calls(before_micros, limit)
        }
        fn put_meta(&self, name: &str, value: &[u8]) -> Result<(), StoreError> {
            self.inner.put_meta(name, value)
        }
        fn flush(&self) -> Result<(), StoreError> {
            self.check()?;
            self.inner.flush()
        }
        fn reopen(&self) -> Result<(), StoreError> {
            self.check()?;
            self.inner.reopen()
        }
    }

    async fn until(what: &str, done: impl Fn() -> bool) {
        for _ in 0..1000 {
            if done() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("never: {what}");
    }

    #[test]
    fn calls_held_until_a_flush_are_given_back_whole_and_their_buffers_reused() {
        let mut reserved = call("key_a", 2, "m", 20);
        reserved.reservation = Some(7);
        reserved.request_body = Some("{\"a\":\"é\\n\"}".into());
        let first = vec![call("key_a", 1, "m", 10), reserved];
        // A call whose encoding failed at settlement is encoded when it is held.
        let unencoded = EncodedCall {
            call: call("key_b", 3, "m", 30),
            json: Vec::new(),
        };
        let mut unflushed = Unflushed::default();
        unflushed.extend(first.iter().cloned().map(EncodedCall::new));
        unflushed.extend(std::iter::once(unencoded.clone()));
        assert_eq!(unflushed.len(), 3);
        assert_eq!(unflushed.reservations().collect::<Vec<_>>(), vec![7]);
        let mut expected = first;
        expected.push(unencoded.call);
        assert_eq!(unflushed.calls().unwrap(), expected);

        unflushed.clear();
        assert_eq!(unflushed.len(), 0);
        assert!(unflushed.calls().unwrap().is_empty());
        assert_eq!(unflushed.reservations().count(), 0);
        assert_eq!(
            unflushed.spare.len(),
            2,
            "both buffers kept for the next batches"
        );
        unflushed.extend(std::iter::once(EncodedCall::new(call("key_a", 4, "m", 1))));
        assert_eq!(unflushed.spare.len(), 1);
        assert_eq!(unflushed.calls().unwrap()[0].at_micros, 4);
    }

    #[tokio::test]
    async fn a_failing_store_keeps_the_calls_in_memory_and_gets_them_once_it_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FillableStore {
            inner: SledStore::open(dir.path()).unwrap(),
            full: AtomicBool::new(false),
        });
        let (sink, queue) = usage_channel();
        let writer =
            UsageWriter::spawn(store.clone(), queue, Duration::from_millis(50), None, None)
                .unwrap();
        sink.record(EncodedCall::new(call("key_a", 1, "m", 10)));
        until("the first call is written", || sink.backlog() == 0).await;
        assert!(sink.health().is_available());

        store.full.store(true, Ordering::Relaxed);
        sink.record(EncodedCall::new(call("key_a", 2, "m", 10)));
        sink.record(EncodedCall::new(call("key_a", 3, "m", 10)));
        until("the failure is seen", || !sink.health().is_available()).await;
        assert!(sink.health().unrecorded() >= 2);
        assert!(sink.health().failures() >= 1);
        assert!(
            sink.health()
                .last_error()
                .unwrap()
                .contains("No space left")
        );
        assert_eq!(sink.backlog(), 2);

        store.full.store(false, Ordering::Relaxed);
        until("the store recovers", || sink.health().is_available()).await;
        assert_eq!(sink.backlog(), 0);
        assert_eq!(sink.health().unrecorded(), 0);
        assert_eq!(sink.health().last_error(), None);
        // The call written before the failure may be written again: it is not counted twice.
        store
            .put_key(&crate::core::testing::key("key_a", "secret"))
            .unwrap();
        let (_, counters) = store.load_key("key_a").unwrap().unwrap();
        assert_eq!(counters.requests, 3);
        assert_eq!(writer.stop().await, 0);
    }

    #[tokio::test]
    async fn a_store_failing_to_the_end_of_shutdown_reports_the_calls_it_did_not_get() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FillableStore {
            inner: SledStore::open(dir.path()).unwrap(),
            full: AtomicBool::new(true),
        });
        let (sink, queue) = usage_channel();
        let writer =
            UsageWriter::spawn(store.clone(), queue, Duration::from_millis(50), None, None)
                .unwrap();
        sink.record(EncodedCall::new(call("key_a", 1, "m", 10)));
        sink.record(EncodedCall::new(call("key_a", 2, "m", 10)));
        assert_eq!(writer.stop().await, 2);
    }

    #[tokio::test]
    async fn a_writer_that_falls_behind_leaves_the_background_until_it_catches_up() {
        if !super::super::priority::background_is_reversible() {
            // Unprivileged here: the writer never enters the background class.
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SledStore::open(dir.path()).unwrap());
        let (sink, queue) = usage_channel();
        let writer =
            UsageWriter::spawn(store, queue, Duration::from_millis(50), None, None).unwrap();
        assert!(writer.in_background());
        // A call that settled ten seconds before its batch: the writer is behind.
        sink.record(EncodedCall::new(call(
            "key_a",
            now_micros() - 10_000_000,
            "m",
            10,
        )));
        until("the writer catches up", || !writer.in_background()).await;
        // A fresh call: it goes back to the background.
        sink.record(EncodedCall::new(call("key_a", now_micros(), "m", 10)));
        until("the writer goes back", || writer.in_background()).await;
        assert_eq!(writer.stop().await, 0);
    }
}
