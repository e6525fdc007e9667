//! The call log on disk: append-only segment files of CRC-checked call records, read newest
//! first. sled keeps the books (counters, hourly usage) and the position in this log up to
//! which they count; the log keeps every call.
//!
//! Why not in sled: sled's memory grows with the number of records it holds whatever its
//! cache is set to (~56 bytes a call with a 4 MiB cache, BENCHMARKS.md), so a call log kept
//! there grows the gateway without bound; and two B-tree inserts a call were a fifth of the
//! instructions of a proxied call. Here memory is a summary per segment, and a call costs
//! its JSON and a copy.
//!
//! Layout: `<data>/calls/<segment, 16 hex digits>.log`, each up to [`SEGMENT_BYTES`] long.
//! A record is `MAGIC | length u32 | crc32 u32 | JSON | length u32`, the CRC covering the
//! segment number, the length and the JSON; the length at the end lets the log be read
//! backwards, newest first. A segment is sealed when full: synced, and its summary written
//! beside it (`.sum`), so that opening the log reads the summaries and the last segment only.

use std::fs::{File, OpenOptions};
use std::ops::ControlFlow;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::segment_crc;
use crate::core::records::{CallRecord, EncodedCall};
use crate::core::store::StoreError;

/// The size at which a segment is sealed and the next one begun.
const SEGMENT_BYTES: u64 = 32 * 1024 * 1024;

/// Starts every record. Bytes that never occur in UTF-8, hence never inside a record's JSON.
const MAGIC: [u8; 4] = [0xC4, 0x1F, 0xF5, 0x9B];

/// Magic, length and CRC before the JSON; the length again after it.
const HEADER: u64 = 12;
const TRAILER: u64 = 4;

/// The longest record accepted: a call with its bodies (`store.log_bodies`) kept.
const MAX_RECORD: u64 = 64 * 1024 * 1024;

/// The largest batch buffer kept between batches (a full batch of calls without bodies
/// is about half a megabyte; one with bodies may be far more, and is not kept).
const KEPT_BUFFER: usize = 2 * 1024 * 1024;

/// How much is read at once when reading the log backwards.
const READ_WINDOW: u64 = 256 * 1024;

/// A place in the log: the segment, and a byte offset in it. Orders as the log does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub(super) struct LogPosition {
    pub segment: u64,
    pub offset: u64,
}

impl LogPosition {
    pub fn to_bytes(self) -> [u8; 16] {
        let mut bytes = [0; 16];
        bytes[..8].copy_from_slice(&self.segment.to_be_bytes());
        bytes[8..].copy_from_slice(&self.offset.to_be_bytes());
        bytes
    }

    pub fn from_bytes(bytes: &[u8]) -> Option<LogPosition> {
        Some(LogPosition {
            segment: u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?),
            offset: u64::from_be_bytes(bytes.get(8..16)?.try_into().ok()?),
        })
    }
}

/// What a segment holds, kept in memory for every segment: enough to skip a segment that
/// cannot hold what a reader looks for.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Summary {
    segment: u64,
    /// Bytes of intact records.
    len: u64,
    calls: u64,
    min_at: i64,
    max_at: i64,
    /// The lowest and highest journal reservation of its calls (`min > max`: none).
    min_reservation: u64,
    max_reservation: u64,
    /// Which keys' calls it may hold: a Bloom filter of the key ids.
    keys: KeyFilter,
}

impl Summary {
    fn new(segment: u64) -> Summary {
        Summary {
            segment,
            len: 0,
            calls: 0,
            min_at: i64::MAX,
            max_at: i64::MIN,
            min_reservation: u64::MAX,
            max_reservation: 0,
            keys: KeyFilter::default(),
        }
    }

    fn add(&mut self, call: &CallRecord, end: u64) {
        self.len = end;
        self.calls += 1;
        self.min_at = self.min_at.min(call.at_micros);
        self.max_at = self.max_at.max(call.at_micros);
        if let Some(id) = call.reservation {
            self.min_reservation = self.min_reservation.min(id);
            self.max_reservation = self.max_reservation.max(id);
        }
        self.keys.insert(&call.key_id);
    }

    fn may_hold_reservation(&self, id: u64) -> bool {
        (self.min_reservation..=self.max_reservation).contains(&id)
    }
}

/// A 2048-bit Bloom filter (4 probes): for 100 keys in a segment one false "maybe" in ~800.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct KeyFilter(Vec<u64>);

impl Default for KeyFilter {
    fn default() -> Self {
        KeyFilter(vec![0; 32])
    }
}

impl KeyFilter {
    fn probes(key: &str) -> [usize; 4] {
        use std::hash::Hasher;
        let mut hasher = fnv::FnvHasher::default();
        hasher.write(key.as_bytes());
        let h = hasher.finish();
        let (a, b) = (h as u32 as usize, (h >> 32) as usize | 1);
        std::array::from_fn(|i| a.wrapping_add(i.wrapping_mul(b)) % 2048)
    }

    fn insert(&mut self, key: &str) {
        for bit in KeyFilter::probes(key) {
            if let Some(word) = self.0.get_mut(bit / 64) {
                *word |= 1 << (bit % 64);
            }
        }
    }

    fn may_hold(&self, key: &str) -> bool {
        KeyFilter::probes(key).iter().all(|&bit| {
            self.0
                .get(bit / 64)
                .is_some_and(|w| w & (1 << (bit % 64)) != 0)
        })
    }
}

/// Which segments a backward read visits.
pub(super) struct SegmentFilter<'a> {
    pub key_id: Option<&'a str>,
    /// Skip segments whose calls are all older than this.
    pub from_micros: i64,
}

pub(super) struct CallLog {
    dir: PathBuf,
    segment_bytes: u64,
    state: Mutex<State>,
}

struct State {
    /// Oldest first; the last one is the segment being written.
    segments: Vec<Summary>,
    file: File,
    /// Set when a write failed: the file may end in a partial record until
    /// [`CallLog::reopen`] cuts it.
    failed: bool,
    /// Where a batch is framed, kept for the next one up to [`KEPT_BUFFER`].
    buffer: Vec<u8>,
}

impl CallLog {
    /// Opens (or creates) the log in `dir`. The last segment is read whole: a tail torn by
    /// a crash (a record written but not synced) is cut; damage followed by intact records is
    /// refused, naming the file and the byte.
    pub fn open(dir: &Path) -> Result<CallLog, StoreError> {
        CallLog::open_sized(dir, SEGMENT_BYTES)
    }

    fn open_sized(dir: &Path, segment_bytes: u64) -> Result<CallLog, StoreError> {
        let state = open_state(dir)?;
        Ok(CallLog {
            dir: dir.to_owned(),
            segment_bytes,
            state: Mutex::new(state),
        })
    }

    /// After a failed write: reads the last segment again and cuts what a failed write left.
    pub fn reopen(&self) -> Result<(), StoreError> {
        let state = open_state(&self.dir)?;
        *self.lock() = state;
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where the next record goes.
    pub fn end(&self) -> LogPosition {
        let state = self.lock();
        state.end()
    }

    /// Appends `calls` (not synced: see [`CallLog::sync`]); returns the end of the log.
    pub fn append(&self, calls: &[EncodedCall]) -> Result<LogPosition, StoreError> {
        let mut state = self.lock();
        if state.failed {
            return Err(StoreError::Io(format!(
                "the call log {} failed a write and is not reopened yet",
                self.dir.display()
            )));
        }
        // One buffer for every batch: a new one grew by copies and page faults each time,
        // a fifth of the writer's CPU (issue 21).
        let mut buffer = std::mem::take(&mut state.buffer);
        buffer.clear();
        let appended = self.append_framed(&mut state, &mut buffer, calls);
        if buffer.capacity() <= KEPT_BUFFER {
            state.buffer = buffer;
        }
        appended
    }

    fn append_framed(
        &self,
        state: &mut State,
        buffer: &mut Vec<u8>,
        calls: &[EncodedCall],
    ) -> Result<LogPosition, StoreError> {
        let mut pending: Vec<(usize, u64)> = Vec::with_capacity(calls.len());
        let mut written_to = state.end();
        for (i, call) in calls.iter().enumerate() {
            let record = call.json().map_err(|e| StoreError::Io(e.to_string()))?;
            let framed = HEADER + record.len() as u64 + TRAILER;
            if framed > MAX_RECORD {
                return Err(StoreError::Io(format!(
                    "a call record of {} bytes is over the {MAX_RECORD} bytes allowed",
                    record.len()
                )));
            }
            let start = written_to.offset + buffer.len() as u64;
            if start > 0 && start + framed > self.segment_bytes {
                state.write(buffer, written_to.offset, &pending, calls)?;
                buffer.clear();
                pending.clear();
                state.seal(&self.dir)?;
                written_to = state.end();
            }
            frame(buffer, written_to.segment, &record);
            pending.push((i, written_to.offset + buffer.len() as u64));
        }
        state.write(buffer, written_to.offset, &pending, calls)?;
        Ok(state.end())
    }

    /// Makes every record appended so far durable.
    pub fn sync(&self) -> Result<(), StoreError> {
        // The descriptor is copied so that readers and the writer do not wait for the disk.
        let file = {
            let state = self.lock();
            state
                .file
                .try_clone()
                .map_err(|e| io_error(&self.dir, &e))?
        };
        file.sync_data().map_err(|e| io_error(&self.dir, &e))
    }

    /// Calls from `from` to the end, oldest first, until `visit` breaks. Each comes with
    /// the position where it ends.
    pub fn read_forward(
        &self,
        from: LogPosition,
        visit: &mut dyn FnMut(LogPosition, CallRecord) -> ControlFlow<()>,
    ) -> Result<(), StoreError> {
        let segments: Vec<(u64, u64)> = {
            let state = self.lock();
            state
                .segments
                .iter()
                .filter(|s| s.segment >= from.segment)
                .map(|s| (s.segment, s.len))
                .collect()
        };
        for (segment, len) in segments {
            let start = if segment == from.segment {
                from.offset
            } else {
                0
            };
            if self
                .read_segment_forward(segment, start, len, visit)?
                .is_break()
            {
                break;
            }
        }
        Ok(())
    }

    /// The calls of one segment from byte `start` to byte `len`, a window at a time.
    fn read_segment_forward(
        &self,
        segment: u64,
        start: u64,
        len: u64,
        visit: &mut dyn FnMut(LogPosition, CallRecord) -> ControlFlow<()>,
    ) -> Result<ControlFlow<()>, StoreError> {
        let mut pos = start;
        while pos < len {
            let mut to = len.min(pos + READ_WINDOW);
            let Some(mut window) = self.read_range(segment, pos, to)? else {
                return Ok(ControlFlow::Continue(()));
            };
            // A record longer than the window: read as much as it needs.
            if let Some(record_len) = window
                .get(4..8)
                .and_then(|b| b.try_into().ok())
                .map(|b| u64::from(u32::from_le_bytes(b)))
                && HEADER + record_len + TRAILER > to - pos
                && pos + HEADER + record_len + TRAILER <= len
            {
                to = pos + HEADER + record_len + TRAILER;
                match self.read_range(segment, pos, to)? {
                    Some(data) => window = data,
                    None => return Ok(ControlFlow::Continue(())),
                }
            }
            let mut local = 0;
            while let Some(record) = record_at(segment, &window, local) {
                let call = decode(&self.path(segment), pos + local as u64, record)?;
                local += (HEADER + TRAILER) as usize + record.len();
                let end = LogPosition {
                    segment,
                    offset: pos + local as u64,
                };
                if visit(end, call).is_break() {
                    return Ok(ControlFlow::Break(()));
                }
            }
            if local == 0 {
                return Err(self.damaged(segment, pos));
            }
            pos += local as u64;
        }
        Ok(ControlFlow::Continue(()))
    }

    /// Calls strictly before `before` (the whole log when `None`), newest first, in the
    /// segments `filter` lets through, until `visit` breaks. Each call comes with its own
    /// position (where it starts): a later read from there goes on with the call before it.
    pub fn read_backward(
        &self,
        before: Option<LogPosition>,
        filter: &SegmentFilter<'_>,
        visit: &mut dyn FnMut(LogPosition, CallRecord) -> ControlFlow<()>,
    ) -> Result<(), StoreError> {
        let segments: Vec<(u64, u64)> = {
            let state = self.lock();
            // A position past the end of its segment or of the log was not given out.
            if let Some(b) = before
                && (b > state.end()
                    || state
                        .segments
                        .iter()
                        .any(|s| s.segment == b.segment && b.offset > s.len))
            {
                return Err(StoreError::UnknownCursor);
            }
            state
                .segments
                .iter()
                .rev()
                .filter(|s| before.is_none_or(|b| s.segment <= b.segment))
                .filter(|s| s.calls > 0 && s.max_at >= filter.from_micros)
                .filter(|s| filter.key_id.is_none_or(|k| s.keys.may_hold(k)))
                .map(|s| (s.segment, s.len))
                .collect()
        };
        for (segment, len) in segments {
            let mut end = match before {
                Some(b) if b.segment == segment => b.offset.min(len),
                _ => len,
            };
            // A window of the segment read at once, ending at `window_end`.
            let mut window: Vec<u8> = Vec::new();
            let mut window_start = end;
            // The first record read ends where a cursor points: if there is no record
            // there, the cursor was not given out (no damage: the log's files are intact).
            let mut at_cursor = before.is_some_and(|b| b.segment == segment);
            let unread = |at_cursor: bool, at| {
                if at_cursor {
                    StoreError::UnknownCursor
                } else {
                    self.damaged(segment, at)
                }
            };
            while end > 0 {
                if end < TRAILER {
                    return Err(unread(at_cursor, 0));
                }
                if end - window_start < TRAILER {
                    window_start = end.saturating_sub(READ_WINDOW);
                    let Some(data) = self.read_range(segment, window_start, end)? else {
                        break;
                    };
                    window = data;
                }
                let local = (end - window_start) as usize;
                let len_bytes = &window[local - TRAILER as usize..local];
                let record_len =
                    u64::from(u32::from_le_bytes(len_bytes.try_into().unwrap_or_default()));
                let framed = HEADER + record_len + TRAILER;
                if framed > end || framed > MAX_RECORD {
                    return Err(unread(at_cursor, end.saturating_sub(TRAILER)));
                }
                let start = end - framed;
                if start < window_start {
                    window_start = start.min(end.saturating_sub(READ_WINDOW));
                    let Some(data) = self.read_range(segment, window_start, end)? else {
                        break;
                    };
                    window = data;
                }
                let local_start = (start - window_start) as usize;
                let Some(record) = record_at(segment, &window, local_start) else {
                    return Err(unread(at_cursor, start));
                };
                let call = decode(&self.path(segment), start, record)?;
                at_cursor = false;
                end = start;
                if visit(
                    LogPosition {
                        segment,
                        offset: start,
                    },
                    call,
                )
                .is_break()
                {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Which of `ids` have a call in the log. Reads only the segments whose reservations
    /// span one of them (reservations are numbered in the order calls are admitted, so
    /// these are the few segments written while those calls ran).
    pub fn reservations_in(
        &self,
        ids: &std::collections::HashSet<u64>,
    ) -> Result<std::collections::HashSet<u64>, StoreError> {
        let mut found = std::collections::HashSet::new();
        if ids.is_empty() {
            return Ok(found);
        }
        let segments: Vec<(u64, u64)> = {
            let state = self.lock();
            state
                .segments
                .iter()
                .filter(|s| ids.iter().any(|&id| s.may_hold_reservation(id)))
                .map(|s| (s.segment, s.len))
                .collect()
        };
        for (segment, len) in segments {
            // Every call of the segment is looked at: the flow is always `Continue`.
            let _ = self.read_segment_forward(segment, 0, len, &mut |_, call| {
                if let Some(id) = call.reservation
                    && ids.contains(&id)
                {
                    found.insert(id);
                }
                ControlFlow::Continue(())
            })?;
        }
        Ok(found)
    }

    /// Removes the oldest sealed segments whose calls are all older than `before_micros`,
    /// while no more than `limit` calls have gone (at least one segment); returns how many.
    pub fn prune(&self, before_micros: i64, limit: usize) -> Result<usize, StoreError> {
        let mut pruned = 0;
        loop {
            let mut state = self.lock();
            let Some(oldest) = state.segments.first() else {
                return Ok(pruned);
            };
            if state.segments.len() < 2 || oldest.max_at >= before_micros {
                return Ok(pruned);
            }
            let calls = usize::try_from(oldest.calls).unwrap_or(usize::MAX);
            if pruned > 0 && pruned + calls > limit {
                return Ok(pruned);
            }
            let segment = oldest.segment;
            // The summary goes first: a segment without one is read again at open.
            remove_if_there(&summary_path(&self.dir, segment))?;
            remove_if_there(&segment_path(&self.dir, segment))?;
            state.segments.remove(0);
            pruned += calls;
        }
    }

    fn path(&self, segment: u64) -> PathBuf {
        segment_path(&self.dir, segment)
    }

    /// Bytes `from..to` of a segment; `None` if the segment was removed meanwhile (pruned).
    fn read_range(&self, segment: u64, from: u64, to: u64) -> Result<Option<Vec<u8>>, StoreError> {
        let path = self.path(segment);
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_error(&path, &e)),
        };
        let mut data = vec![0; usize::try_from(to - from).unwrap_or(0)];
        file.read_exact_at(&mut data, from)
            .map_err(|e| io_error(&path, &e))?;
        Ok(Some(data))
    }

    fn damaged(&self, segment: u64, at: u64) -> StoreError {
        StoreError::Corrupt {
            tree: "calls",
            message: format!(
                "{} is damaged at byte {at}: restore it from a backup, or move it away to \
                 accept the loss of the calls it held (the counters keep them)",
                self.path(segment).display()
            ),
        }
    }
}

impl State {
    fn end(&self) -> LogPosition {
        self.segments
            .last()
            .map(|s| LogPosition {
                segment: s.segment,
                offset: s.len,
            })
            .unwrap_or_default()
    }

    /// Writes framed records at `offset` of the current segment; `pending` says where each
    /// call of `calls` ends. On failure nothing is counted and the log stays failed.
    fn write(
        &mut self,
        buffer: &[u8],
        offset: u64,
        pending: &[(usize, u64)],
        calls: &[EncodedCall],
    ) -> Result<(), StoreError> {
        if buffer.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.file.write_all_at(buffer, offset) {
            self.failed = true;
            return Err(StoreError::Io(format!("call log: {e}")));
        }
        if let Some(current) = self.segments.last_mut() {
            for &(i, end) in pending {
                if let Some(call) = calls.get(i) {
                    current.add(&call.call, end);
                }
            }
        }
        Ok(())
    }

    /// Syncs the current segment, writes its summary, and begins the next one.
    fn seal(&mut self, dir: &Path) -> Result<(), StoreError> {
        let Some(current) = self.segments.last() else {
            return Ok(());
        };
        let next = current.segment + 1;
        let io = |e: std::io::Error| StoreError::Io(format!("call log {}: {e}", dir.display()));
        let result = (|| {
            self.file.sync_data().map_err(io)?;
            write_summary(dir, current)?;
            let file = create_segment(dir, next)?;
            Ok(file)
        })();
        match result {
            Ok(file) => {
                self.file = file;
                self.segments.push(Summary::new(next));
                Ok(())
            }
            Err(e) => {
                self.failed = true;
                Err(e)
            }
        }
    }
}

fn open_state(dir: &Path) -> Result<State, StoreError> {
    std::fs::create_dir_all(dir).map_err(|e| io_error(dir, &e))?;
    let mut numbers = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| io_error(dir, &e))? {
        let entry = entry.map_err(|e| io_error(dir, &e))?;
        let name = entry.file_name();
        if let Some(hex) = name.to_string_lossy().strip_suffix(".log")
            && let Ok(segment) = u64::from_str_radix(hex, 16)
        {
            numbers.push(segment);
        }
    }
    numbers.sort_unstable();
    let mut segments = Vec::with_capacity(numbers.len().max(1));
    let count = numbers.len();
    for (i, &segment) in numbers.iter().enumerate() {
        let last = i + 1 == count;
        let summary = match (last, read_summary(dir, segment)?) {
            (false, Some(summary)) => summary,
            // The last segment is read whole; so is a sealed one whose summary is missing
            // (a crash between its sync and its summary).
            (last, _) => {
                let summary = scan_segment(dir, segment, last)?;
                if !last {
                    write_summary(dir, &summary)?;
                }
                summary
            }
        };
        segments.push(summary);
    }
    let file = match segments.last() {
        Some(last) => {
            let path = segment_path(dir, last.segment);
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| io_error(&path, &e))?;
            // What follows the intact records (a torn write) is cut, so that the next
            // record follows the last intact one with nothing between.
            let size = file.metadata().map_err(|e| io_error(&path, &e))?.len();
            if size > last.len {
                file.set_len(last.len).map_err(|e| io_error(&path, &e))?;
                file.sync_all().map_err(|e| io_error(&path, &e))?;
            }
            file
        }
        None => {
            segments.push(Summary::new(0));
            create_segment(dir, 0)?
        }
    };
    Ok(State {
        segments,
        file,
        failed: false,
        buffer: Vec::new(),
    })
}

/// Reads a whole segment: its summary, and where its intact records end. A record that
/// fails its check ends the segment only if it is the last one and no intact record
/// follows (a tail torn by a crash); otherwise the segment is refused as damaged.
fn scan_segment(dir: &Path, segment: u64, last: bool) -> Result<Summary, StoreError> {
    let path = segment_path(dir, segment);
    let data = std::fs::read(&path).map_err(|e| io_error(&path, &e))?;
    let mut summary = Summary::new(segment);
    let mut pos = 0;
    while let Some(record) = record_at(segment, &data, pos) {
        let call = decode(&path, pos as u64, record)?;
        pos += (HEADER + TRAILER) as usize + record.len();
        summary.add(&call, pos as u64);
    }
    if pos == data.len() {
        return Ok(summary);
    }
    let mut intact_after = None;
    let mut from = pos + 1;
    while let Some(found) = data
        .get(from..)
        .and_then(|rest| memchr::memmem::find(rest, &MAGIC))
    {
        if record_at(segment, &data, from + found).is_some() {
            intact_after = Some(from + found);
            break;
        }
        from += found + 1;
    }
    if last && intact_after.is_none() {
        if pos > 0 || !data.iter().all(|&b| b == 0) {
            tracing::warn!(
                file = %path.display(),
                at = pos,
                "the call log ends in a record torn by a crash (never synced); it is cut"
            );
        }
        return Ok(summary);
    }
    Err(StoreError::Corrupt {
        tree: "calls",
        message: format!(
            "{} is damaged at byte {pos}{}: restore it from a backup, or move it away to \
             accept the loss of the calls it held (the counters keep them)",
            path.display(),
            if last {
                ", and intact records follow"
            } else {
                ""
            }
        ),
    })
}

fn frame(buffer: &mut Vec<u8>, segment: u64, record: &[u8]) {
    let len = u32::try_from(record.len()).unwrap_or(u32::MAX);
    buffer.extend_from_slice(&MAGIC);
    buffer.extend_from_slice(&len.to_le_bytes());
    buffer.extend_from_slice(&segment_crc(segment, record).to_le_bytes());
    buffer.extend_from_slice(record);
    buffer.extend_from_slice(&len.to_le_bytes());
}

/// The JSON of the intact record of `segment` starting at `pos` of `data`, if there is one.
fn record_at(segment: u64, data: &[u8], pos: usize) -> Option<&[u8]> {
    let header = data.get(pos..pos + HEADER as usize)?;
    if header[..4] != MAGIC {
        return None;
    }
    let len = u32::from_le_bytes(header[4..8].try_into().ok()?) as usize;
    let expected = u32::from_le_bytes(header[8..12].try_into().ok()?);
    let start = pos + HEADER as usize;
    let record = data.get(start..start + len)?;
    let trailer = data.get(start + len..start + len + TRAILER as usize)?;
    (len > 0 && *trailer == header[4..8] && segment_crc(segment, record) == expected)
        .then_some(record)
}

fn decode(path: &Path, at: u64, record: &[u8]) -> Result<CallRecord, StoreError> {
    serde_json::from_slice(record).map_err(|e| StoreError::Corrupt {
        tree: "calls",
        message: format!(
            "{} holds a record at byte {at} this build cannot read: {e}",
            path.display()
        ),
    })
}

fn segment_path(dir: &Path, segment: u64) -> PathBuf {
    dir.join(format!("{segment:016x}.log"))
}

fn summary_path(dir: &Path, segment: u64) -> PathBuf {
    dir.join(format!("{segment:016x}.sum"))
}

fn create_segment(dir: &Path, segment: u64) -> Result<File, StoreError> {
    let path = segment_path(dir, segment);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| io_error(&path, &e))?;
    sync_dir(dir)?;
    Ok(file)
}

/// A sealed segment's summary, written durably (new file, synced, renamed, dir synced).
fn write_summary(dir: &Path, summary: &Summary) -> Result<(), StoreError> {
    use std::io::Write;
    let path = summary_path(dir, summary.segment);
    let io = |e: std::io::Error| io_error(&path, &e);
    let temporary = path.with_extension("sum.new");
    let json = serde_json::to_vec(summary).map_err(|e| StoreError::Io(e.to_string()))?;
    let mut file = File::create(&temporary).map_err(io)?;
    file.write_all(&json).map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&temporary, &path).map_err(io)?;
    sync_dir(dir)
}

/// A segment's summary, if it has one this build can read (else the segment is read).
fn read_summary(dir: &Path, segment: u64) -> Result<Option<Summary>, StoreError> {
    let path = summary_path(dir, segment);
    match std::fs::read(&path) {
        Ok(bytes) => Ok(serde_json::from_slice::<Summary>(&bytes)
            .ok()
            .filter(|s| s.segment == segment)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error(&path, &e)),
    }
}

fn remove_if_there(path: &Path) -> Result<(), StoreError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_error(path, &e)),
        _ => Ok(()),
    }
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error(dir, &e))
}

fn io_error(path: &Path, e: &std::io::Error) -> StoreError {
    StoreError::Io(format!("call log {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::testing::call;

    fn calls(range: std::ops::Range<i64>) -> Vec<EncodedCall> {
        range
            .map(|n| {
                let mut c = call(if n % 3 == 0 { "key_b" } else { "key_a" }, n, "m", 1);
                c.reservation = Some(u64::try_from(n).unwrap());
                EncodedCall::new(c)
            })
            .collect()
    }

    fn backward(log: &CallLog, before: Option<LogPosition>, key: Option<&str>) -> Vec<i64> {
        let mut seen = Vec::new();
        let filter = SegmentFilter {
            key_id: key,
            from_micros: i64::MIN,
        };
        log.read_backward(before, &filter, &mut |_, c| {
            if key.is_none_or(|k| c.key_id == k) {
                seen.push(c.at_micros);
            }
            ControlFlow::Continue(())
        })
        .unwrap();
        seen
    }

    fn forward(log: &CallLog, from: LogPosition) -> Vec<i64> {
        let mut seen = Vec::new();
        log.read_forward(from, &mut |_, c| {
            seen.push(c.at_micros);
            ControlFlow::Continue(())
        })
        .unwrap();
        seen
    }

    #[test]
    fn calls_span_segments_and_read_back_both_ways_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let all: Vec<i64> = (1..41).collect();
        {
            let log = CallLog::open_sized(dir.path(), 2048).unwrap();
            log.append(&calls(1..11)).unwrap();
            log.append(&calls(11..41)).unwrap();
            assert!(log.end().segment >= 5, "{:?}", log.end());
            assert_eq!(forward(&log, LogPosition::default()), all);
        }
        let log = CallLog::open_sized(dir.path(), 2048).unwrap();
        let newest_first: Vec<i64> = all.iter().rev().copied().collect();
        assert_eq!(backward(&log, None, None), newest_first);
        // A page goes on from the position of the last call it showed.
        let mut page = Vec::new();
        log.read_backward(
            None,
            &SegmentFilter {
                key_id: None,
                from_micros: i64::MIN,
            },
            &mut |at, c| {
                page.push((at, c.at_micros));
                if page.len() == 15 {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            },
        )
        .unwrap();
        let (at, _) = page[14];
        assert_eq!(backward(&log, Some(at), None), newest_first[15..]);
        let b: Vec<i64> = newest_first
            .iter()
            .copied()
            .filter(|n| n % 3 == 0)
            .collect();
        assert_eq!(backward(&log, None, Some("key_b")), b);
        let found = log
            .reservations_in(&[3, 17, 40, 99].into_iter().collect())
            .unwrap();
        assert_eq!(found, [3, 17, 40].into_iter().collect());
        // Appending goes on where the last run stopped.
        log.append(&calls(41..42)).unwrap();
        assert_eq!(backward(&log, None, None)[0], 41);
    }

    #[test]
    fn a_torn_tail_is_cut_and_damage_before_intact_records_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let end = {
            let log = CallLog::open(dir.path()).unwrap();
            log.append(&calls(1..4)).unwrap()
        };
        let path = segment_path(dir.path(), end.segment);
        let intact = std::fs::read(&path).unwrap();
        // A record torn by a crash: cut, and the log goes on after the intact ones.
        let mut torn = intact.clone();
        torn.extend_from_slice(&intact[..40]);
        std::fs::write(&path, &torn).unwrap();
        let log = CallLog::open(dir.path()).unwrap();
        assert_eq!(log.end(), end);
        log.append(&calls(4..5)).unwrap();
        assert_eq!(forward(&log, LogPosition::default()), [1, 2, 3, 4]);
        drop(log);
        // A flipped byte with intact records after it: refused, naming the file and byte.
        let mut damaged = std::fs::read(&path).unwrap();
        damaged[20] ^= 0xff;
        std::fs::write(&path, &damaged).unwrap();
        let message = CallLog::open(dir.path()).err().unwrap().to_string();
        assert!(
            message.contains(&path.display().to_string()) && message.contains("at byte 0"),
            "{message}"
        );
    }

    #[test]
    fn pruning_removes_whole_segments_whose_calls_are_all_older() {
        let dir = tempfile::tempdir().unwrap();
        let log = CallLog::open_sized(dir.path(), 2048).unwrap();
        log.append(&calls(1..41)).unwrap();
        let before = forward(&log, LogPosition::default()).len();
        let pruned = log.prune(20, usize::MAX).unwrap();
        let left = forward(&log, LogPosition::default());
        assert_eq!(before - left.len(), pruned);
        assert!(
            pruned > 0 && left.contains(&19) && left[0] <= 20,
            "{left:?}"
        );
        // The segment being written stays, however old.
        log.prune(i64::MAX, usize::MAX).unwrap();
        assert!(!forward(&log, LogPosition::default()).is_empty());
        drop(log);
        let log = CallLog::open_sized(dir.path(), 2048).unwrap();
        assert_eq!(backward(&log, None, None)[0], 40);
    }
}
