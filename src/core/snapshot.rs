//! Copies of the books: a store written out as the portable export (`export.rs`) while a
//! running gateway keeps its books still, and an export read back into an empty store.

use std::io::{BufRead, Seek, Write};

use super::error::GatewayError;
use super::export::{ExportError, ExportReader, ExportSummary, ExportWriter};
use super::gateway::Gateway;
use super::records::ExportRecord;
use super::store::{Store, StoreError};

/// Writes every record of `store` to `out` as an export. The caller keeps the books still
/// meanwhile (a running gateway holds its usage writer: [`Gateway::export`]).
pub fn export_store<W: Write>(
    store: &dyn Store,
    out: W,
) -> Result<(W, ExportSummary), ExportError> {
    let mut writer = ExportWriter::new(out)?;
    let mut failed = None;
    store.export(&mut |record| match writer.write(&record) {
        Ok(()) => Ok(()),
        Err(e) => {
            let message = e.to_string();
            failed = Some(e);
            Err(StoreError::Io(message))
        }
    })?;
    if let Some(e) = failed {
        return Err(e);
    }
    writer.finish()
}

/// Records imported per store write.
const IMPORT_BATCH: usize = 1000;

/// Imports an export into `store`, which must hold nothing yet. `progress` is told the
/// bytes read after each batch and may stop the import (false); the store is then left
/// part-filled, so the caller imports into a place of its own and keeps it only on success.
pub fn import_export<R: BufRead>(
    input: R,
    store: &dyn Store,
    progress: &mut dyn FnMut(u64) -> bool,
) -> Result<ExportSummary, ExportError> {
    if !store.is_empty()? {
        return Err(ExportError::Store(StoreError::Io(
            "the store to import into is not empty".into(),
        )));
    }
    let mut reader = ExportReader::new(input)?;
    let mut batch = Vec::with_capacity(IMPORT_BATCH);
    loop {
        let record = reader.next_record()?;
        let end = record.is_none();
        batch.extend(record);
        if batch.len() == IMPORT_BATCH || (end && !batch.is_empty()) {
            store.import(&batch)?;
            batch.clear();
            if !progress(reader.bytes_read()) {
                return Err(ExportError::Interrupted);
            }
        }
        if end {
            break;
        }
    }
    Ok(reader.summary().clone())
}

/// A consistent copy of the books in a file of its own (unlinked: it leaves nothing behind
/// whatever happens), ready to be sent.
#[derive(Debug)]
pub struct Snapshot {
    pub file: std::fs::File,
    pub summary: ExportSummary,
}

/// The names of backups: `step3gw-backup-20261205T035000Z.jsonl`.
pub const PREFIX: &str = "step3gw-backup-";
pub const SUFFIX: &str = ".jsonl";

/// `step3gw-backup-<UTC time>.jsonl`, in an order that sorts by time.
pub fn file_name(created_at: super::time::UnixTime) -> String {
    let time = humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH
            + std::time::Duration::from_secs(u64::try_from(created_at).unwrap_or(0)),
    )
    .to_string()
    .replace(['-', ':'], "");
    format!("{PREFIX}{time}{SUFFIX}")
}

/// The size of the pieces a snapshot is sent in.
pub const CHUNK_BYTES: usize = 256 * 1024;

impl Snapshot {
    /// The file in pieces of [`CHUNK_BYTES`], read off the runtime's threads; an error ends
    /// the pieces, and so does dropping the receiver (the reader stops at its next send).
    pub fn into_chunks(self) -> tokio::sync::mpsc::Receiver<std::io::Result<bytes::Bytes>> {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut file = self.file;
        tokio::task::spawn_blocking(move || {
            loop {
                let mut piece = vec![0; CHUNK_BYTES];
                match std::io::Read::read(&mut file, &mut piece) {
                    Ok(0) => return,
                    Ok(n) => {
                        piece.truncate(n);
                        if tx.blocking_send(Ok(bytes::Bytes::from(piece))).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx.blocking_send(Err(e));
                        return;
                    }
                }
            }
        });
        rx
    }
}

impl Gateway {
    /// Writes a consistent copy of the books to `out` as an export: the usage writer is
    /// held between two batches meanwhile (calls are still served; their records wait in
    /// memory), and the copy runs off the runtime's threads.
    pub async fn export_to<W: Write + Send + 'static>(
        &self,
        out: W,
    ) -> Result<(W, ExportSummary), GatewayError> {
        let _still = self.sink.hold_writes().await;
        let store = self.store.clone();
        let exported = tokio::task::spawn_blocking(move || export_store(&*store, out))
            .await
            .map_err(|e| GatewayError::Store(format!("the export task failed: {e}")))?;
        Ok(exported?)
    }

    /// [`Gateway::export_to`] into a new unlinked file, rewound to its start: in
    /// `snapshot_dir` (the backup directory), else the system's temporary directory.
    pub async fn snapshot(&self) -> Result<Snapshot, GatewayError> {
        let dir = self
            .settings
            .snapshot_dir
            .clone()
            .unwrap_or_else(std::env::temp_dir);
        let name = format!(
            ".step3gw-snapshot-{}-{}",
            std::process::id(),
            super::time::now_micros()
        );
        let path = dir.join(name);
        let io = |e: std::io::Error| {
            GatewayError::Store(format!("cannot write a snapshot in {}: {e}", dir.display()))
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io)?;
        // Unlinked at once: the open file is all there is of it.
        std::fs::remove_file(&path).map_err(io)?;
        let (writer, summary) = self.export_to(std::io::BufWriter::new(file)).await?;
        let mut file = writer.into_inner().map_err(|e| io(e.into_error()))?;
        file.rewind().map_err(io)?;
        Ok(Snapshot { file, summary })
    }
}

/// What [`copy_store`] copied.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CopySummary {
    pub records: u64,
    pub users: u64,
    pub keys: u64,
    pub calls: u64,
}

/// Copies every record of `from` into `to`, which must hold nothing yet, through the store
/// port's `export` and `import` (a backup and its restore, without the file between).
/// `progress` is told the records copied after each batch and may stop the copy (false):
/// `to` is then left part-filled, so the caller copies into a place it can empty or drop.
pub fn copy_store(
    from: &dyn Store,
    to: &dyn Store,
    progress: &mut dyn FnMut(u64) -> bool,
) -> Result<CopySummary, ExportError> {
    if !to.is_empty()? {
        return Err(ExportError::Store(StoreError::Io(
            "the store to copy into is not empty".into(),
        )));
    }
    let (mut users, mut keys, mut calls) = (0, 0, 0);
    let mut records = 0;
    let mut stopped = false;
    let mut batch = Vec::with_capacity(IMPORT_BATCH);
    let mut import = |batch: &mut Vec<ExportRecord>| -> Result<(), StoreError> {
        to.import(batch)?;
        records += batch.len() as u64;
        batch.clear();
        if progress(records) {
            Ok(())
        } else {
            stopped = true;
            Err(StoreError::Io("interrupted".into()))
        }
    };
    let exported = from.export(&mut |record| {
        match &record {
            ExportRecord::User(_) => users += 1,
            ExportRecord::Key(_) => keys += 1,
            ExportRecord::Call(_) => calls += 1,
            ExportRecord::Meta { .. }
            | ExportRecord::Counters { .. }
            | ExportRecord::Usage { .. }
            | ExportRecord::Price(_)
            | ExportRecord::Model(_)
            | ExportRecord::Audit(_) => {}
        }
        batch.push(record);
        if batch.len() == IMPORT_BATCH {
            import(&mut batch)
        } else {
            Ok(())
        }
    });
    let finished = exported.and_then(|()| {
        if batch.is_empty() {
            Ok(())
        } else {
            import(&mut batch)
        }
    });
    match finished {
        Ok(()) => Ok(CopySummary {
            records,
            users,
            keys,
            calls,
        }),
        Err(_) if stopped => Err(ExportError::Interrupted),
        Err(e) => Err(e.into()),
    }
}
