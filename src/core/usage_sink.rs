//! The usage sink port: where settled calls go to be recorded (the usage writer in
//! `store/` drains it), and the store's health as the gate sees it. Sending never blocks:
//! no call waits for the disk.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use super::records::EncodedCall;

/// Whether the store takes writes: set by the writer, read by the gate on every call.
#[derive(Debug, Default)]
pub struct StoreHealth {
    failing: AtomicBool,
    /// Settled calls held in memory because the store failed.
    unrecorded: AtomicU64,
    /// Failed writes and flushes since start.
    failures: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl StoreHealth {
    /// False while the store fails; one atomic load.
    pub fn is_available(&self) -> bool {
        !self.failing.load(Ordering::Relaxed)
    }

    pub fn unrecorded(&self) -> u64 {
        self.unrecorded.load(Ordering::Relaxed)
    }

    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// The error of the last failed write, while the store fails.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A write failed: new calls are refused until [`StoreHealth::recover`].
    pub fn fail(&self, error: &str, unrecorded: usize) {
        self.unrecorded.store(unrecorded as u64, Ordering::Relaxed);
        self.fail_write(error);
    }

    /// A write that holds no settled call failed (a reservation the journal could not make
    /// durable): as [`StoreHealth::fail`], the held calls' count left to the usage writer,
    /// whose next retry also tells whether the disk takes writes again.
    pub fn fail_write(&self, error: &str) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(error.to_owned());
        if !self.failing.swap(true, Ordering::Relaxed) {
            tracing::error!(
                error,
                unrecorded = self.unrecorded(),
                "the store fails: new calls are refused (503 store_unavailable) until it \
                 takes writes again; the usage of calls already settled is kept in memory \
                 and written as soon as it can be"
            );
        }
    }

    pub fn recover(&self, recorded: usize) {
        self.unrecorded.store(0, Ordering::Relaxed);
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
        if self.failing.swap(false, Ordering::Relaxed) {
            tracing::warn!(
                recorded,
                "the store takes writes again: calls are accepted; the usage kept in memory is recorded"
            );
        }
    }
}

/// The store's figures at one moment, for `/metrics` and `/health`.
#[derive(Clone, Copy, Debug, Default)]
pub struct StoreFigures {
    /// Finished calls queued for the store (including those held while it fails).
    pub backlog: u64,
    /// Whether the store takes writes (calls are refused while it does not).
    pub available: bool,
    /// Settled calls held in memory because the store failed.
    pub unrecorded: u64,
    /// Failed store writes and flushes since start.
    pub failures: u64,
    /// Several replicas: whether the shared limits (Redis) answer; `None` without them.
    pub shared_limits_available: Option<bool>,
}

/// Where finished calls go. Cloning is cheap; sending never blocks.
#[derive(Clone, Debug)]
pub struct UsageSink {
    tx: mpsc::UnboundedSender<EncodedCall>,
    backlog: Arc<AtomicU64>,
    health: Arc<StoreHealth>,
    books: BooksLock,
}

/// Keeps the books still for a consistent copy: the usage writer (the only writer of
/// counters, hourly usage and the call log) holds it shared while it writes a batch or
/// prunes; a backup holds it alone. Async, so that neither blocks a runtime thread.
pub type BooksLock = Arc<tokio::sync::RwLock<()>>;

/// The other end of a [`UsageSink`]: what the usage writer drains.
#[derive(Debug)]
pub struct UsageQueue {
    rx: mpsc::UnboundedReceiver<EncodedCall>,
    backlog: Arc<AtomicU64>,
    health: Arc<StoreHealth>,
    books: BooksLock,
}

/// A sink and the queue it fills.
pub fn usage_channel() -> (UsageSink, UsageQueue) {
    let (tx, rx) = mpsc::unbounded_channel();
    let backlog = Arc::new(AtomicU64::new(0));
    let health = Arc::new(StoreHealth::default());
    let books = BooksLock::default();
    (
        UsageSink {
            tx,
            backlog: backlog.clone(),
            health: health.clone(),
            books: books.clone(),
        },
        UsageQueue {
            books,
            rx,
            backlog,
            health,
        },
    )
}

impl UsageSink {
    pub fn record(&self, call: EncodedCall) {
        self.backlog.fetch_add(1, Ordering::Relaxed);
        if self.tx.send(call).is_err() {
            // Only after shutdown has drained the writer; the counters in memory still hold it.
            self.backlog.fetch_sub(1, Ordering::Relaxed);
            tracing::error!("usage writer has stopped; a finished call was not recorded");
        }
    }

    /// Calls queued but not yet written (including those held while the store fails).
    pub fn backlog(&self) -> u64 {
        self.backlog.load(Ordering::Relaxed)
    }

    pub fn health(&self) -> &StoreHealth {
        &self.health
    }

    /// Waits for the usage writer to finish its batch, then keeps it from writing until
    /// the guard is dropped (calls queue in memory meanwhile).
    pub async fn hold_writes(&self) -> tokio::sync::OwnedRwLockWriteGuard<()> {
        self.books.clone().write_owned().await
    }

    pub fn figures(&self) -> StoreFigures {
        StoreFigures {
            backlog: self.backlog(),
            available: self.health.is_available(),
            unrecorded: self.health.unrecorded(),
            failures: self.health.failures(),
            shared_limits_available: None,
        }
    }
}

impl UsageQueue {
    /// Waits for calls and takes up to `limit` into `into`; 0 once every sink is gone.
    pub async fn recv_many(&mut self, into: &mut Vec<EncodedCall>, limit: usize) -> usize {
        self.rx.recv_many(into, limit).await
    }

    /// A call already queued, without waiting.
    pub fn try_recv(&mut self) -> Option<EncodedCall> {
        self.rx.try_recv().ok()
    }

    /// What the writer holds (shared) while it changes the books.
    pub fn books(&self) -> BooksLock {
        self.books.clone()
    }

    /// `n` queued calls reached the store.
    pub fn written(&self, n: usize) {
        self.backlog.fetch_sub(n as u64, Ordering::Relaxed);
    }

    pub fn health(&self) -> &StoreHealth {
        &self.health
    }
}
