//! `step3-gateway store copy`: the books of one store (a sled data directory or a
//! Postgres database) copied into another through the store port's `export` and `import`,
//! the calls a backup and a restore use, without a file between. Keys keep working: only
//! the hashes of their secrets were ever kept, and only those move.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;

use crate::config::SecretUrl;
use crate::core::export::ExportError;
use crate::core::snapshot::{CopySummary, copy_store};
use crate::core::store::Store;
use crate::store::{PostgresStore, SledStore};

/// How long one Postgres call of the copy may take.
const POSTGRES_TIMEOUT: Duration = Duration::from_secs(30);

/// Where books are: a sled data directory, or a Postgres URL (`postgres://…`).
#[derive(Clone, Debug)]
pub enum StoreLocation {
    Sled(PathBuf),
    Postgres(SecretUrl),
}

impl StoreLocation {
    /// A `postgres://` or `postgresql://` URL, else a data directory.
    pub fn parse(text: &str) -> Self {
        if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            StoreLocation::Postgres(SecretUrl::new(text))
        } else {
            StoreLocation::Sled(PathBuf::from(text))
        }
    }
}

/// Shown with a URL's password as `***`.
impl std::fmt::Display for StoreLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreLocation::Sled(dir) => write!(f, "{}", dir.display()),
            StoreLocation::Postgres(url) => write!(f, "{url}"),
        }
    }
}

/// What a copy did.
#[derive(Debug)]
pub struct Copied {
    /// Records copied (settings, users, keys, counters, hourly usage, calls).
    pub summary: CopySummary,
    /// A sled store that was in the target directory (`--force`), moved here.
    pub moved_aside: Option<PathBuf>,
    /// A Postgres target that held books was emptied first (`--force`).
    pub emptied: bool,
}

/// A directory of the copy's own (Postgres wants one for its lock and replica name),
/// removed when dropped.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new(what: &str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "step3gw-copy-{what}-{}-{}",
            std::process::id(),
            crate::core::keys::generate_id("d")
        ));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(ScratchDir(dir))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn open_postgres(url: &SecretUrl, scratch: &Path) -> anyhow::Result<PostgresStore> {
    PostgresStore::open(url.expose(), scratch, POSTGRES_TIMEOUT, 2)
        .with_context(|| format!("cannot open the store at {url}"))
}

/// Opens the store to copy from; a sled store a running gateway holds is refused.
fn open_source(from: &StoreLocation, scratch: &Path) -> anyhow::Result<Box<dyn Store>> {
    Ok(match from {
        StoreLocation::Sled(dir) => {
            if !dir.join("conf").is_file() {
                anyhow::bail!("{} holds no gateway data", dir.display());
            }
            Box::new(SledStore::open(dir).map_err(|e| {
                if e.to_string().contains("locked") {
                    anyhow::anyhow!(
                        "{} is in use by a running gateway: stop it before copying its store \
                         (nothing was changed)",
                        dir.display()
                    )
                } else {
                    anyhow::Error::new(e)
                        .context(format!("cannot open the store in {}", dir.display()))
                }
            })?)
        }
        StoreLocation::Postgres(url) => Box::new(open_postgres(url, scratch)?),
    })
}

/// Whether `a` and `b` name one store (a copy with `--force` would empty its own source).
/// Two URLs of one database written differently are not caught.
fn same_place(a: &StoreLocation, b: &StoreLocation) -> bool {
    match (a, b) {
        (StoreLocation::Sled(a), StoreLocation::Sled(b)) => {
            a == b || matches!((a.canonicalize(), b.canonicalize()), (Ok(a), Ok(b)) if a == b)
        }
        (StoreLocation::Postgres(a), StoreLocation::Postgres(b)) => a.expose() == b.expose(),
        _ => false,
    }
}

/// `step3-gateway store copy`: copies every record of `from` into `to`.
///
/// `to` must hold no books unless `force`: a sled store there is then moved aside (into
/// `before-copy-<time>/`), a Postgres database emptied. `progress` is told the records
/// copied after each batch and may stop the copy (false, Ctrl-C): a sled target is then
/// as it was (the copy is built beside it and moved in only when whole), a Postgres target
/// is emptied again. Copy with the gateways stopped: books written meanwhile may be missed.
pub fn copy(
    from: &StoreLocation,
    to: &StoreLocation,
    force: bool,
    progress: &mut dyn FnMut(u64) -> bool,
) -> anyhow::Result<Copied> {
    if same_place(from, to) {
        anyhow::bail!("{from} is both the source and the target (nothing was changed)");
    }
    let source_scratch = ScratchDir::new("from")?;
    let source = open_source(from, &source_scratch.0)?;
    match to {
        StoreLocation::Sled(dir) => {
            let (summary, moved_aside) =
                crate::app::build_store_in(dir, force, "copy", |target| {
                    copy_store(source.as_ref(), target, progress)
                        .with_context(|| format!("cannot copy {from} into {to}"))
                })?;
            Ok(Copied {
                summary,
                moved_aside,
                emptied: false,
            })
        }
        StoreLocation::Postgres(url) => {
            let target_scratch = ScratchDir::new("to")?;
            let target = open_postgres(url, &target_scratch.0)?;
            let emptied = !target.is_empty()?;
            if emptied {
                if !force {
                    anyhow::bail!(
                        "{to} holds books already: copy into an empty database, or pass \
                         --force to empty it first (nothing was changed)"
                    );
                }
                target.clear()?;
            }
            match copy_store(source.as_ref(), &target, progress) {
                Ok(summary) => Ok(Copied {
                    summary,
                    moved_aside: None,
                    emptied,
                }),
                Err(e) => {
                    let cleared = target.clear();
                    let stopped = matches!(e, ExportError::Interrupted);
                    let what = if stopped { "interrupted" } else { "failed" };
                    match cleared {
                        Ok(()) => Err(anyhow::Error::new(e).context(format!(
                            "the copy {what}; {to} was emptied again, nothing of the copy is left"
                        ))),
                        Err(clear) => Err(anyhow::Error::new(e).context(format!(
                            "the copy {what} and {to} could not be emptied again ({clear}): it \
                             holds part of the books; copy again with --force"
                        ))),
                    }
                }
            }
        }
    }
}
