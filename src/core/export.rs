//! The portable export: every record of the books as one JSON object a line, between a
//! header and a closing line that counts the records and carries a SHA-256 of everything
//! before it. A backup is such a file; so is a move between store backends: any store
//! implementing `Store::export` and `Store::import` writes and reads it (`snapshot.rs`).
//!
//! ```text
//! {"format":"step3-gateway-export","version":1,"created_at":1767225600,"gateway_version":"0.1.0"}
//! {"type":"meta","name":"admin_token_hash","value":"9f86d0…"}
//! {"type":"user","id":"usr_…","name":"Partner Co",…}
//! {"type":"key","id":"key_…","hash":"…",…}                 (secrets only as their SHA-256)
//! {"type":"counters","key_id":"key_…","requests":12,"prompt_tokens":…,…}
//! {"type":"usage","key_id":"key_…","hour":1767225600,"model":"…","requests":3,…}
//! {"type":"call","at_micros":…,"request_id":"…","key_id":"…",…}
//! {"type":"model","name":"step3-vl","versions":[…],"default_version":"…",…}
//! {"type":"end","records":5,"sha256":"…"}
//! ```
//!
//! A reader refuses a file that is not an export, one of a newer version, a line that is
//! not a record, a file cut short (no closing line), and one whose records do not match
//! the closing line's count or checksum: a damaged backup is never half restored.

use std::io::{BufRead, Write};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::error::GatewayError;
use super::keys::to_hex;
pub use super::records::ExportRecord;
use super::store::StoreError;
use super::time::{UnixTime, now_unix};

/// The first line's `format`.
pub const FORMAT: &str = "step3-gateway-export";
/// The version this build writes and the newest it reads.
pub const VERSION: u32 = 1;

/// The first line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportHeader {
    pub format: String,
    pub version: u32,
    /// When the copy was taken, seconds since the epoch.
    pub created_at: UnixTime,
    /// The build that wrote it.
    pub gateway_version: String,
}

/// The closing line.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportEnd {
    #[serde(rename = "type")]
    kind: String,
    records: u64,
    sha256: String,
}

/// What an export holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ExportSummary {
    pub created_at: UnixTime,
    pub records: u64,
    pub meta: u64,
    pub users: u64,
    pub keys: u64,
    pub counters: u64,
    pub usage: u64,
    pub calls: u64,
    pub prices: u64,
    /// Models of the catalogue.
    pub models: u64,
    /// Entries of the audit log.
    pub audit: u64,
    /// The file's size.
    pub bytes: u64,
    pub sha256: String,
}

impl ExportSummary {
    fn count(&mut self, record: &ExportRecord) {
        self.records += 1;
        let n = match record.kind() {
            0 => &mut self.meta,
            1 => &mut self.users,
            2 => &mut self.keys,
            3 => &mut self.counters,
            4 => &mut self.usage,
            5 => &mut self.calls,
            6 => &mut self.prices,
            7 => &mut self.models,
            _ => &mut self.audit,
        };
        *n += 1;
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("cannot read or write the export: {0}")]
    Io(#[from] std::io::Error),
    #[error(
        "this is not a step3-gateway backup or export (its first line is not the export header)"
    )]
    NotAnExport,
    #[error(
        "this export is of version {found}, written by a newer step3-gateway (this build reads version {VERSION} and older); use a newer binary"
    )]
    NewerVersion { found: u32 },
    #[error("the backup is damaged: line {line} is not a record ({message})")]
    Malformed { line: u64, message: String },
    #[error(
        "the backup is incomplete: it ends after {records} records without its closing line (a copy cut short?)"
    )]
    Truncated { records: u64 },
    #[error("the backup is damaged: {0}")]
    Damaged(String),
    #[error("the store failed: {0}")]
    Store(#[from] StoreError),
    #[error("interrupted; nothing was changed")]
    Interrupted,
}

impl From<ExportError> for GatewayError {
    fn from(e: ExportError) -> Self {
        GatewayError::Store(e.to_string())
    }
}

/// Writes an export: the header now, records one by one, the closing line at
/// [`ExportWriter::finish`].
pub struct ExportWriter<W: Write> {
    out: W,
    hasher: Sha256,
    summary: ExportSummary,
    line: Vec<u8>,
}

impl<W: Write> ExportWriter<W> {
    pub fn new(out: W) -> Result<Self, ExportError> {
        let header = ExportHeader {
            format: FORMAT.into(),
            version: VERSION,
            created_at: now_unix(),
            gateway_version: env!("CARGO_PKG_VERSION").into(),
        };
        let mut writer = ExportWriter {
            out,
            hasher: Sha256::new(),
            summary: ExportSummary {
                created_at: header.created_at,
                ..ExportSummary::default()
            },
            line: Vec::with_capacity(1024),
        };
        writer.put(&header)?;
        Ok(writer)
    }

    fn put<T: Serialize>(&mut self, value: &T) -> Result<(), ExportError> {
        self.line.clear();
        serde_json::to_writer(&mut self.line, value).map_err(std::io::Error::from)?;
        self.line.push(b'\n');
        self.hasher.update(&self.line);
        self.out.write_all(&self.line)?;
        self.summary.bytes += self.line.len() as u64;
        Ok(())
    }

    pub fn write(&mut self, record: &ExportRecord) -> Result<(), ExportError> {
        self.put(record)?;
        self.summary.count(record);
        Ok(())
    }

    /// Writes the closing line and flushes; the output is returned with the summary.
    pub fn finish(mut self) -> Result<(W, ExportSummary), ExportError> {
        let sha256 = to_hex(&std::mem::take(&mut self.hasher).finalize());
        let end = ExportEnd {
            kind: "end".into(),
            records: self.summary.records,
            sha256: sha256.clone(),
        };
        self.line.clear();
        serde_json::to_writer(&mut self.line, &end).map_err(std::io::Error::from)?;
        self.line.push(b'\n');
        self.out.write_all(&self.line)?;
        self.out.flush()?;
        self.summary.bytes += self.line.len() as u64;
        self.summary.sha256 = sha256;
        Ok((self.out, self.summary))
    }
}

/// Reads an export, checking it as it goes: [`ExportReader::next`] gives `None` only once
/// the closing line has confirmed the count and the checksum.
pub struct ExportReader<R: BufRead> {
    input: R,
    hasher: Sha256,
    pub header: ExportHeader,
    summary: ExportSummary,
    line: Vec<u8>,
    line_no: u64,
    done: bool,
}

impl<R: BufRead> ExportReader<R> {
    pub fn new(mut input: R) -> Result<Self, ExportError> {
        let mut line = Vec::new();
        input.read_until(b'\n', &mut line)?;
        let header: ExportHeader = serde_json::from_slice(&line)
            .ok()
            .filter(|h: &ExportHeader| h.format == FORMAT)
            .ok_or(ExportError::NotAnExport)?;
        if header.version > VERSION {
            return Err(ExportError::NewerVersion {
                found: header.version,
            });
        }
        let mut hasher = Sha256::new();
        hasher.update(&line);
        Ok(ExportReader {
            input,
            hasher,
            summary: ExportSummary {
                created_at: header.created_at,
                bytes: line.len() as u64,
                ..ExportSummary::default()
            },
            header,
            line,
            line_no: 1,
            done: false,
        })
    }

    /// Bytes read so far (for progress).
    pub fn bytes_read(&self) -> u64 {
        self.summary.bytes
    }

    /// The next record; `None` at a verified end.
    pub fn next_record(&mut self) -> Result<Option<ExportRecord>, ExportError> {
        if self.done {
            return Ok(None);
        }
        self.line.clear();
        let n = self.input.read_until(b'\n', &mut self.line)?;
        self.line_no += 1;
        if n == 0 || self.line.last() != Some(&b'\n') {
            return Err(ExportError::Truncated {
                records: self.summary.records,
            });
        }
        self.summary.bytes += n as u64;
        // The closing line is written in this one form; a record never starts so.
        if self.line.starts_with(br#"{"type":"end""#) {
            let end: ExportEnd =
                serde_json::from_slice(&self.line).map_err(|e| ExportError::Malformed {
                    line: self.line_no,
                    message: e.to_string(),
                })?;
            let sha256 = to_hex(&std::mem::take(&mut self.hasher).finalize());
            if end.records != self.summary.records {
                return Err(ExportError::Damaged(format!(
                    "it holds {} records where its closing line says {}",
                    self.summary.records, end.records
                )));
            }
            if end.sha256 != sha256 {
                return Err(ExportError::Damaged(
                    "its checksum does not match its contents (a byte was changed)".into(),
                ));
            }
            let mut rest = [0u8; 1];
            if self.input.read(&mut rest)? != 0 {
                return Err(ExportError::Damaged(format!(
                    "there is more after its closing line (line {})",
                    self.line_no
                )));
            }
            self.summary.sha256 = sha256;
            self.done = true;
            return Ok(None);
        }
        self.hasher.update(&self.line);
        let record: ExportRecord =
            serde_json::from_slice(&self.line).map_err(|e| ExportError::Malformed {
                line: self.line_no,
                message: e.to_string(),
            })?;
        self.summary.count(&record);
        Ok(Some(record))
    }

    /// What was read; complete once [`ExportReader::next_record`] gave `None`.
    pub fn summary(&self) -> &ExportSummary {
        &self.summary
    }
}

/// Reads a whole export, checking it, without importing anything.
pub fn verify_export<R: BufRead>(input: R) -> Result<ExportSummary, ExportError> {
    let mut reader = ExportReader::new(input)?;
    while reader.next_record()?.is_some() {}
    Ok(reader.summary().clone())
}

/// A setting's value as an export writes it (hex), for a store's import.
pub fn setting_bytes(name: &str, hex: &str) -> Result<Vec<u8>, StoreError> {
    super::keys::bytes_from_hex(hex).ok_or_else(|| StoreError::Corrupt {
        tree: "meta",
        message: format!("the setting `{name}` is not hex"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::records::{KeyCounters, UsageBucket};
    use crate::core::testing::{call, key, user};

    fn records() -> Vec<ExportRecord> {
        vec![
            ExportRecord::Meta {
                name: "admin_token_hash".into(),
                value: "00ff".into(),
            },
            ExportRecord::User(user("usr_1")),
            ExportRecord::Key(key("key_a", "sk-step3-a")),
            ExportRecord::Counters {
                key_id: "key_a".into(),
                counters: KeyCounters {
                    requests: 2,
                    prompt_tokens: 20,
                    completion_tokens: 2,
                    images: 0,
                    cost: crate::core::money::Money(1_500),
                },
            },
            ExportRecord::Usage {
                key_id: "key_a".into(),
                bucket: UsageBucket {
                    hour: 3600,
                    model: "m".into(),
                    requests: 2,
                    ..UsageBucket::default()
                },
            },
            ExportRecord::Call(call("key_a", 3_600_000_001, "m", 10)),
        ]
    }

    fn written() -> Vec<u8> {
        let mut writer = ExportWriter::new(Vec::new()).unwrap();
        for record in records() {
            writer.write(&record).unwrap();
        }
        writer.finish().unwrap().0
    }

    fn read_all(bytes: &[u8]) -> Result<Vec<ExportRecord>, ExportError> {
        let mut reader = ExportReader::new(bytes)?;
        let mut out = Vec::new();
        while let Some(record) = reader.next_record()? {
            out.push(record);
        }
        Ok(out)
    }

    #[test]
    fn records_come_back_as_written_one_json_object_a_line() {
        let bytes = written();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert_eq!(text.lines().count(), 8);
        assert!(text.starts_with(r#"{"format":"step3-gateway-export","version":1,"#));
        assert!(
            text.lines()
                .nth(3)
                .unwrap()
                .starts_with(r#"{"type":"key","id":"key_a""#)
        );
        assert!(
            text.lines()
                .last()
                .unwrap()
                .starts_with(r#"{"type":"end","records":6,"#)
        );
        assert_eq!(read_all(&bytes).unwrap(), records());
        let summary = verify_export(&bytes[..]).unwrap();
        assert_eq!((summary.records, summary.calls, summary.keys), (6, 1, 1));
        assert_eq!(summary.bytes, bytes.len() as u64);
    }

    #[test]
    fn a_damaged_export_is_refused_with_what_is_wrong() {
        let bytes = written();
        let text = String::from_utf8(bytes.clone()).unwrap();
        // Cut short: the closing line (or more) is missing.
        let cut = &bytes[..bytes.len() - 10];
        assert!(matches!(
            read_all(cut),
            Err(ExportError::Truncated { records: 6 })
        ));
        let without_end: String = text.lines().take(7).map(|l| format!("{l}\n")).collect();
        assert!(matches!(
            read_all(without_end.as_bytes()),
            Err(ExportError::Truncated { records: 6 })
        ));
        // One digit changed: still a record, but not the one summed.
        let changed = text.replacen(r#""requests":2"#, r#""requests":3"#, 1);
        let e = read_all(changed.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("checksum"), "{e}");
        // A line that is no record.
        let garbage = text.replacen(r#"{"type":"user""#, r#"{"type":"usr""#, 1);
        let e = read_all(garbage.as_bytes()).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("the backup is damaged: line 3 is not a record"),
            "{e}"
        );
        // A record left out.
        let dropped: String = text
            .lines()
            .enumerate()
            .filter(|(i, _)| *i != 2)
            .map(|(_, l)| format!("{l}\n"))
            .collect();
        assert!(
            read_all(dropped.as_bytes())
                .unwrap_err()
                .to_string()
                .contains("5 records")
        );
        // Not an export at all, or a newer one.
        assert!(matches!(
            read_all(b"hello\n"),
            Err(ExportError::NotAnExport)
        ));
        let newer = text.replacen(r#""version":1"#, r#""version":9"#, 1);
        assert!(matches!(
            read_all(newer.as_bytes()),
            Err(ExportError::NewerVersion { found: 9 })
        ));
    }
}
