//! Backups kept by the gateway itself: every `interval_secs`, a consistent copy of the books
//! (the portable export, `core::export`) written into `dir` under a name that sorts by time,
//! and only the newest `keep` kept. A file appears whole or not at all: it is written
//! under a hidden name, synced, then renamed.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::core::Gateway;
use crate::core::export::ExportSummary;
use crate::core::snapshot::{PREFIX, SUFFIX, file_name};
use crate::core::time::UnixTime;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackupConfig {
    /// Where scheduled backups go (and where an online backup is prepared before it is
    /// sent); unset: no scheduled backups.
    pub dir: Option<PathBuf>,
    /// Time between two scheduled backups (the first one an interval after start).
    pub interval_secs: u64,
    /// Scheduled backups kept; older ones are deleted.
    pub keep: usize,
}

impl Default for BackupConfig {
    fn default() -> Self {
        BackupConfig {
            dir: None,
            interval_secs: 86_400,
            keep: 7,
        }
    }
}

impl BackupConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.interval_secs == 0 {
            return Err("backup.interval_secs must be at least 1".into());
        }
        if self.keep == 0 {
            return Err("backup.keep must be at least 1".into());
        }
        Ok(())
    }
}

/// Writes a consistent copy of the gateway's books into `dir` and returns its path.
pub async fn write_backup(
    gateway: &Gateway,
    dir: &Path,
) -> anyhow::Result<(PathBuf, ExportSummary)> {
    use anyhow::Context as _;
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the backup directory {}", dir.display()))?;
    let partial = dir.join(format!(
        ".{PREFIX}{}-{}.partial",
        std::process::id(),
        crate::core::time::now_micros()
    ));
    let file = std::fs::File::create(&partial)
        .with_context(|| format!("cannot write {}", partial.display()))?;
    let written = async {
        let (writer, summary) = gateway.export_to(std::io::BufWriter::new(file)).await?;
        let mut file = writer.into_inner().map_err(|e| e.into_error())?;
        file.flush()?;
        file.sync_all()?;
        let path = unused_name(dir, summary.created_at);
        std::fs::rename(&partial, &path)?;
        std::fs::File::open(dir).and_then(|d| d.sync_all())?;
        anyhow::Ok((path, summary))
    }
    .await;
    if written.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    written.with_context(|| format!("cannot write a backup into {}", dir.display()))
}

/// The backup name for `created_at`, with a counter when two land in the same second.
fn unused_name(dir: &Path, created_at: UnixTime) -> PathBuf {
    let name = file_name(created_at);
    let mut path = dir.join(&name);
    let mut n = 1;
    while path.exists() {
        path = dir.join(name.replace(SUFFIX, &format!("-{n}{SUFFIX}")));
        n += 1;
    }
    path
}

/// The gateway's backups in `dir`, oldest first.
pub fn list(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(PREFIX) && n.ends_with(SUFFIX))
        })
        .collect();
    found.sort();
    Ok(found)
}

/// Deletes all but the newest `keep` backups in `dir`; returns what it deleted.
pub fn prune(dir: &Path, keep: usize) -> std::io::Result<Vec<PathBuf>> {
    let found = list(dir)?;
    let excess = found.len().saturating_sub(keep);
    let old: Vec<PathBuf> = found.into_iter().take(excess).collect();
    for path in &old {
        std::fs::remove_file(path)?;
    }
    Ok(old)
}

/// Starts the scheduled backups, if `config.dir` is set; the task ends on `shutdown` (a
/// backup under way is finished first: it holds the books for a moment only).
pub fn spawn_schedule(
    gateway: Arc<Gateway>,
    config: &BackupConfig,
    shutdown: CancellationToken,
) -> Option<JoinHandle<()>> {
    let dir = config.dir.clone()?;
    let interval = Duration::from_secs(config.interval_secs);
    let keep = config.keep;
    Some(tokio::spawn(async move {
        loop {
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = shutdown.cancelled() => return,
            }
            match write_backup(&gateway, &dir).await {
                Ok((path, summary)) => {
                    tracing::info!(
                        path = %path.display(),
                        records = summary.records,
                        calls = summary.calls,
                        bytes = summary.bytes,
                        "backup written"
                    );
                    match prune(&dir, keep) {
                        Ok(old) if !old.is_empty() => {
                            tracing::info!(deleted = old.len(), keep, "older backups deleted");
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, dir = %dir.display(), "cannot delete older backups")
                        }
                    }
                }
                Err(e) => tracing::error!(error = format!("{e:#}"), "scheduled backup failed"),
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_sort_by_time_and_only_the_newest_are_kept() {
        assert_eq!(
            file_name(1_796_442_304),
            "step3gw-backup-20261205T034504Z.jsonl"
        );
        let dir = tempfile::tempdir().unwrap();
        for t in [3, 1, 2, 4] {
            std::fs::write(dir.path().join(file_name(1_796_442_300 + t)), "x").unwrap();
        }
        std::fs::write(dir.path().join("other.jsonl"), "x").unwrap();
        let old = prune(dir.path(), 2).unwrap();
        assert_eq!(
            old,
            [1, 2].map(|t| dir.path().join(file_name(1_796_442_300 + t)))
        );
        assert_eq!(list(dir.path()).unwrap().len(), 2);
        assert!(dir.path().join("other.jsonl").exists());
        assert_eq!(
            unused_name(dir.path(), 1_796_442_304),
            dir.path().join("step3gw-backup-20261205T034504Z-1.jsonl")
        );
    }
}

/// A file being written under a hidden name beside `path`, renamed to `path` by
/// [`PartialFile::commit`]; dropped before that (an error, Ctrl-C), it is deleted: an
/// interrupted backup leaves nothing that could be taken for one.
#[derive(Debug)]
pub struct PartialFile {
    pub file: std::fs::File,
    partial: PathBuf,
    path: PathBuf,
    committed: bool,
}

impl PartialFile {
    pub fn create(path: &Path) -> std::io::Result<Self> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "backup".into());
        let partial = path.with_file_name(format!(".{name}.partial"));
        let file = std::fs::File::create(&partial)?;
        Ok(PartialFile {
            file,
            partial,
            path: path.to_owned(),
            committed: false,
        })
    }

    /// The hidden name, until committed.
    pub fn partial_path(&self) -> &Path {
        &self.partial
    }

    /// Syncs the file and gives it its name.
    pub fn commit(mut self) -> std::io::Result<()> {
        self.file.flush()?;
        self.file.sync_all()?;
        std::fs::rename(&self.partial, &self.path)?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir).and_then(|d| d.sync_all())?;
        }
        self.committed = true;
        Ok(())
    }
}

impl Drop for PartialFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.partial);
        }
    }
}
