//! The background writer: finished calls are queued in memory and written in batches, so a
//! request never waits for the store.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::Store;
use crate::core::records::CallRecord;

/// The most calls written in one store transaction.
const MAX_BATCH: usize = 1024;

/// How long the writer gathers calls before writing them in one transaction.
const BATCH_WINDOW: std::time::Duration = std::time::Duration::from_millis(20);

/// Where finished calls go. Cloning is cheap; sending never blocks.
#[derive(Clone, Debug)]
pub struct UsageSink {
    tx: mpsc::UnboundedSender<CallRecord>,
    backlog: Arc<AtomicU64>,
}

impl UsageSink {
    pub fn record(&self, call: CallRecord) {
        self.backlog.fetch_add(1, Ordering::Relaxed);
        if self.tx.send(call).is_err() {
            // Only after shutdown has drained the writer; the counters in memory still hold it.
            self.backlog.fetch_sub(1, Ordering::Relaxed);
            tracing::error!("usage writer has stopped; a finished call was not recorded");
        }
    }

    /// Calls queued but not yet written.
    pub fn backlog(&self) -> u64 {
        self.backlog.load(Ordering::Relaxed)
    }
}

/// Owns the writer task; [`UsageWriter::stop`] drains the queue and flushes the store.
pub struct UsageWriter {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl UsageWriter {
    pub fn spawn(store: Arc<dyn Store>) -> (UsageSink, UsageWriter) {
        let (tx, rx) = mpsc::unbounded_channel();
        let backlog = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(store, rx, backlog.clone(), stop.clone()));
        (UsageSink { tx, backlog }, UsageWriter { stop, task })
    }

    /// Writes everything queued so far, flushes the store and ends the task.
    pub async fn stop(self) {
        self.stop.cancel();
        if let Err(e) = self.task.await {
            tracing::error!(error = %e, "usage writer failed");
        }
    }
}

async fn run(
    store: Arc<dyn Store>,
    mut rx: mpsc::UnboundedReceiver<CallRecord>,
    backlog: Arc<AtomicU64>,
    stop: CancellationToken,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        tokio::select! {
            received = rx.recv_many(&mut batch, MAX_BATCH) => {
                if received == 0 {
                    break;
                }
                // One store transaction per call costs more than the call itself: gather
                // what arrives within a short window (well inside the flush interval, so
                // no more can be lost on a hard kill) and write it together.
                if batch.len() < MAX_BATCH {
                    tokio::select! {
                        () = tokio::time::sleep(BATCH_WINDOW) => {}
                        () = stop.cancelled() => {}
                    }
                    while batch.len() < MAX_BATCH {
                        match rx.try_recv() {
                            Ok(call) => batch.push(call),
                            Err(_) => break,
                        }
                    }
                }
                write(&*store, &mut batch, &backlog);
            }
            () = stop.cancelled() => break,
        }
    }
    // Drain what is still queued, then make it all durable.
    while let Ok(call) = rx.try_recv() {
        batch.push(call);
        if batch.len() == MAX_BATCH {
            write(&*store, &mut batch, &backlog);
        }
    }
    write(&*store, &mut batch, &backlog);
    if let Err(e) = store.flush() {
        tracing::error!(error = %e, "final store flush failed");
    }
}

fn write(store: &dyn Store, batch: &mut Vec<CallRecord>, backlog: &AtomicU64) {
    if batch.is_empty() {
        return;
    }
    if let Err(e) = store.record_calls(batch) {
        tracing::error!(error = %e, calls = batch.len(), "could not record calls; their usage is lost from the store");
    }
    backlog.fetch_sub(batch.len() as u64, Ordering::Relaxed);
    batch.clear();
}
