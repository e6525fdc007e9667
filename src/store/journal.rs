//! The reservation journal on disk: append-only segment files of CRC-checked records.
//! Two ways to wait ([`WhenDurable`]): a call writes its reservation itself and goes on once
//! the kernel has it (a kill -9 of the gateway cannot lose it; a thread syncs behind the
//! calls), or one thread makes each group of reservations durable with one `fdatasync`
//! before their calls go on (group commit: the calls that arrive while a sync runs share
//! the next one).
//!
//! Why our own and not sled's flush (or redb, fjall, okaywal): measured on the project's VM
//! (BENCHMARKS.md, "Durable reservations"), one sync costs the same in all of them, and this
//! file spends the least CPU per call; sled would also flush every unrelated write of the
//! books with each reservation, and it drops, without a word, everything after a damaged
//! byte of its log. Here a damaged record is detected by its checksum, and a journal whose
//! damage is followed by intact records is refused rather than read short.
//!
//! Layout: `<data>/journal/<segment, 16 hex digits>.log`, each [`SEGMENT_BYTES`] long
//! (allocated up front, so a sync writes data, not the file's size). A record is
//! `MAGIC | length u32 | crc32 u32 | JSON`, the CRC covering the segment number, the length
//! and the JSON, so a stale record of a recycled segment never reads as a current one. A
//! segment that is finished ends with an `End` record, synced before the next one is used;
//! only the last segment may end without one (torn by a crash: its tail is dropped, with a
//! warning, when no intact record follows). A segment whose reservations are all closed is
//! renamed to a spare and reused, so steady load writes over allocated blocks.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, mpsc};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::segment_crc;
use crate::core::journal::{PendingReservation, Reservation, ReservationJournal, Unsettled};
use crate::core::records::{CallRecord, EncodedCall};
use crate::core::store::StoreError;
use crate::core::time::now_micros;

/// The size of one segment file.
const SEGMENT_BYTES: u64 = 8 * 1024 * 1024;

/// The longest record accepted (a reservation is a few hundred bytes).
const MAX_RECORD: usize = 64 * 1024;

/// Starts every record. Bytes that never occur in UTF-8, hence never inside the JSON of a
/// record: a search for the next record after damage finds only record starts.
const MAGIC: [u8; 4] = [0xF3, 0x8A, 0xC5, 0x1E];

const HEADER: usize = 12;

/// Room kept at the end of a segment for its `End` record.
const END_ROOM: u64 = 64;

/// Spare segments kept for reuse; more closed segments are deleted.
const SPARES: usize = 2;

/// Reservations closed by one record (a flush closes thousands at once; a record stays
/// well under [`MAX_RECORD`]).
const CLOSE_CHUNK: usize = 2048;

/// In [`WhenDurable::Written`], how long the syncing thread rests after a sync: calls
/// written meanwhile share the next one, and a power cut can lose at most this plus a sync.
const SYNC_PAUSE: Duration = Duration::from_millis(2);

/// When a call may go on after its reservation is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WhenDurable {
    /// Once the kernel has the record (its `write` returned): a kill -9, a crash or an OOM
    /// kill of the gateway loses nothing, and the call waits for no disk. A thread syncs
    /// the journal behind the calls, so a power cut can lose the reservations of the last
    /// [`SYNC_PAUSE`] and one sync.
    Written,
    /// Once the record is synced to the disk (`fdatasync`, one shared by the calls that
    /// arrive together): a power cut loses nothing either.
    Synced,
}

/// One journal record.
#[derive(Debug, Deserialize)]
enum Entry {
    /// A reservation, durable before its call is forwarded.
    R(u64, Reservation),
    /// The settlement of a reservation.
    S(u64, CallRecord),
    /// Reservations whose settled calls are durable in the store.
    C(Vec<u64>),
    /// The segment is complete; the next one follows.
    E,
}

/// [`Entry`] as written, borrowing.
#[derive(Serialize)]
enum EntryRef<'a> {
    R(u64, &'a Reservation),
    /// Written by [`settlement_record`] around the call's own encoding; here for the test
    /// that says the two agree.
    #[cfg(test)]
    S(u64, &'a CallRecord),
    C(&'a [u64]),
    E,
}

enum Op {
    Reserve {
        id: u64,
        record: Vec<u8>,
        done: oneshot::Sender<Result<(), StoreError>>,
    },
    Settled(Vec<u8>),
    Close(Vec<u64>),
    /// Records were written by the calls themselves ([`WhenDurable::Written`]).
    Sync,
    Stop(oneshot::Sender<()>),
}

/// What the calls and the journal's thread share.
#[derive(Debug)]
struct Shared {
    writer: Mutex<Writer>,
    /// Written since the thread last took the file to sync it.
    dirty: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Writer> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The journal: cheap to call from any task; the writing happens on its own thread.
#[derive(Debug)]
pub struct FileJournal {
    dir: PathBuf,
    when: WhenDurable,
    shared: Arc<Shared>,
    tx: mpsc::Sender<Op>,
    next_id: AtomicU64,
    unsettled: Vec<Unsettled>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl FileJournal {
    /// Reads the journal in `dir` (created if missing): the reservations the last run left
    /// open are kept for [`ReservationJournal::unsettled`]. Refuses a damaged journal,
    /// naming the file and the offset. Starts a new segment for this run.
    pub fn open(dir: &Path, when: WhenDurable) -> Result<FileJournal, StoreError> {
        FileJournal::open_sized(dir, SEGMENT_BYTES, when)
    }

    fn open_sized(
        dir: &Path,
        segment_bytes: u64,
        when: WhenDurable,
    ) -> Result<FileJournal, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| io_error(dir, &e))?;
        let read = read_dir(dir)?;
        let mut writer = Writer {
            segment_bytes,
            dir: dir.to_owned(),
            file: None,
            segment: read.last_segment.unwrap_or(0),
            pos: 0,
            buffer: Vec::new(),
            open: HashMap::default(),
            per_segment: BTreeMap::new(),
            live: read.segments.clone(),
            spares: read.spares,
        };
        for unsettled in read.unsettled.values() {
            let segment = read.reserved_in[&unsettled.id];
            writer.open.insert(unsettled.id, segment);
            *writer.per_segment.entry(segment).or_default() += 1;
        }
        // The last run's last segment gets its end mark where its intact records end (a
        // torn tail is written over), so that only this run's segment may lack one.
        if let (Some(segment), Some(end)) = (read.last_segment, read.last_end) {
            let file = OpenOptions::new()
                .write(true)
                .open(segment_path(dir, segment))
                .map_err(|e| io_error(dir, &e))?;
            writer.file = Some(Arc::new(file));
            writer.pos = end;
            if !read.last_ended {
                writer.push(segment, &EntryRef::E)?;
                writer.write_out()?;
                writer.sync()?;
            }
        }
        writer.start_segment(writer.segment + 1)?;
        writer.forget_closed()?;
        if writer.spares.is_empty() {
            let (path, bytes) = writer.next_spare();
            new_segment_file(&path, bytes)?;
            writer.spares.push(path);
        }
        let shared = Arc::new(Shared {
            writer: Mutex::new(writer),
            dirty: AtomicBool::new(false),
        });
        let (tx, rx) = mpsc::channel();
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("journal".into())
                .spawn(move || run(&shared, &rx))
                .map_err(|e| io_error(dir, &e))?
        };
        let unsettled: Vec<Unsettled> = read.unsettled.into_values().collect();
        if !unsettled.is_empty() {
            tracing::warn!(
                reservations = unsettled.len(),
                journal = %dir.display(),
                "the last run stopped with calls not yet on the books; they are settled now"
            );
        }
        Ok(FileJournal {
            dir: dir.to_owned(),
            when,
            shared,
            tx,
            // Unique across restarts: above every id read, and above the ids any earlier
            // run could have handed out without writing them (fewer than one a microsecond).
            next_id: AtomicU64::new(
                (read.max_id + 1).max(u64::try_from(now_micros()).unwrap_or(0)),
            ),
            unsettled,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Writes what is queued, syncs, and ends the journal's thread. Later calls to the
    /// journal are refused.
    pub fn stop(&self) {
        let (done, stopped) = oneshot::channel();
        if self.tx.send(Op::Stop(done)).is_ok() {
            let _ = stopped.blocking_recv();
        }
        if let Some(thread) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = thread.join();
        }
    }

    fn send(&self, op: Op) {
        if self.tx.send(op).is_err() {
            tracing::error!(journal = %self.dir.display(), "the reservation journal has stopped");
        }
    }

    /// [`WhenDurable::Written`]: writes `record` on the caller's thread (a `pwrite` into
    /// the page cache, a few µs) and asks the journal's thread for a sync behind it. A
    /// settlement (`reserved` = `None`) is only buffered: it goes out with the next
    /// reservation's write or the thread's next sync, within a few milliseconds (a kill
    /// before then charges the call its reservation, the rule the README states).
    fn write_now(&self, reserved: Option<u64>, record: &[u8]) -> Result<(), StoreError> {
        let mut writer = self.shared.lock();
        let written = writer.append(record).and_then(|()| {
            if reserved.is_some() {
                writer.write_out()
            } else {
                Ok(())
            }
        });
        match &written {
            Ok(()) => {
                if let Some(id) = reserved {
                    writer.note_open(id);
                }
            }
            Err(_) => writer.buffer.clear(),
        }
        drop(writer);
        if written.is_ok() && !self.shared.dirty.swap(true, Ordering::AcqRel) {
            self.send(Op::Sync);
        }
        written
    }
}

impl ReservationJournal for FileJournal {
    fn reserve(&self, reservation: Reservation) -> PendingReservation {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (done, durable) = oneshot::channel();
        match encode(&EntryRef::R(id, &reservation)) {
            Ok(record) if self.when == WhenDurable::Written => {
                let _ = done.send(self.write_now(Some(id), &record));
            }
            Ok(record) => self.send(Op::Reserve { id, record, done }),
            Err(e) => {
                let _ = done.send(Err(e));
            }
        }
        PendingReservation { id, durable }
    }

    fn settled(&self, call: &EncodedCall) {
        let Some(id) = call.call.reservation else {
            return;
        };
        let record = call
            .json()
            .map_err(|e| StoreError::Io(e.to_string()))
            .and_then(|json| settlement_record(id, &json));
        match record {
            Ok(record) if self.when == WhenDurable::Written => {
                if let Err(e) = self.write_now(None, &record) {
                    tracing::warn!(error = %e, "a settlement was not journaled");
                }
            }
            Ok(record) => self.send(Op::Settled(record)),
            // The reservation stays open; recovery would charge its estimate.
            Err(e) => tracing::warn!(error = %e, "a settlement was not journaled"),
        }
    }

    fn close(&self, reservations: Vec<u64>) {
        if !reservations.is_empty() {
            self.send(Op::Close(reservations));
        }
    }

    fn unsettled(&self) -> Vec<Unsettled> {
        self.unsettled.clone()
    }
}

fn encode(entry: &EntryRef<'_>) -> Result<Vec<u8>, StoreError> {
    // A reservation is about 300 bytes: room for it at once (`to_vec` starts at 128).
    let mut record = Vec::with_capacity(512);
    serde_json::to_writer(&mut record, entry).map_err(|e| StoreError::Io(e.to_string()))?;
    within_limit(record)
}

/// [`EntryRef::S`]'s JSON around a call already encoded: the bytes `serde_json` writes
/// for it (`{"S":[id,call]}`), without encoding the call a second time.
fn settlement_record(id: u64, call_json: &[u8]) -> Result<Vec<u8>, StoreError> {
    let id = id.to_string();
    let mut record = Vec::with_capacity(call_json.len() + id.len() + 9);
    record.extend_from_slice(b"{\"S\":[");
    record.extend_from_slice(id.as_bytes());
    record.push(b',');
    record.extend_from_slice(call_json);
    record.extend_from_slice(b"]}");
    within_limit(record)
}

fn within_limit(record: Vec<u8>) -> Result<Vec<u8>, StoreError> {
    if record.len() > MAX_RECORD {
        return Err(StoreError::Io(format!(
            "a journal record of {} bytes is over the {MAX_RECORD} bytes allowed",
            record.len()
        )));
    }
    Ok(record)
}

fn io_error(path: &Path, e: &std::io::Error) -> StoreError {
    StoreError::Io(format!("journal {}: {e}", path.display()))
}

fn segment_path(dir: &Path, segment: u64) -> PathBuf {
    dir.join(format!("{segment:016x}.log"))
}

fn spare_path(dir: &Path, segment: u64) -> PathBuf {
    dir.join(format!("spare-{segment:016x}.log"))
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error(dir, &e))
}

/// Writes a segment file of `bytes` at `path` at once (at open, and when no spare was
/// ready in time).
fn new_segment_file(path: &Path, bytes: u64) -> Result<(), StoreError> {
    let mut file = SegmentFile::create(path, bytes)?;
    while !file.write_step()? {}
    Ok(())
}

/// The zeros written per [`SegmentFile::write_step`]: about 50 µs of CPU. A whole segment
/// at once held the CPU for milliseconds, and every call in flight waited (issue 21).
const STEP_BYTES: u64 = 256 * 1024;

/// A segment file being written, a step at a time: the journal's thread writes a spare
/// between its syncs.
///
/// Zeros are written, not a hole left: a sync after writing into allocated blocks flushes
/// the data alone, one into a hole also records the allocation (measured here: about a
/// fifth slower per sync). They are written 64 KiB at a time: a large write puts the file
/// in the page cache as large folios, and ext4 then walks every block of the folio on each
/// small record written into it (`ext4_block_write_begin`: 3% of the gateway's CPU at 16
/// connections with 1 MiB writes here).
#[derive(Debug)]
struct SegmentFile {
    path: PathBuf,
    /// Where it is written, renamed to `path` once whole (a `.new` file is removed at open).
    temporary: PathBuf,
    file: File,
    at: u64,
    bytes: u64,
}

impl SegmentFile {
    fn create(path: &Path, bytes: u64) -> Result<SegmentFile, StoreError> {
        let temporary = path.with_extension("new");
        let file = File::create(&temporary).map_err(|e| io_error(&temporary, &e))?;
        Ok(SegmentFile {
            path: path.to_owned(),
            temporary,
            file,
            at: 0,
            bytes,
        })
    }

    /// Writes the next [`STEP_BYTES`]; once all are written, syncs the file, moves it to
    /// its path (synced in its directory), and returns true.
    fn write_step(&mut self) -> Result<bool, StoreError> {
        static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
        let io = |e: std::io::Error| io_error(&self.temporary, &e);
        let end = self.bytes.min(self.at + STEP_BYTES);
        while self.at < end {
            let n = ZEROS.len().min(usize::try_from(end - self.at).unwrap_or(0));
            self.file.write_all_at(&ZEROS[..n], self.at).map_err(io)?;
            self.at += n as u64;
        }
        if self.at < self.bytes {
            return Ok(false);
        }
        self.file.sync_all().map_err(io)?;
        std::fs::rename(&self.temporary, &self.path).map_err(io)?;
        if let Some(dir) = self.path.parent() {
            sync_dir(dir)?;
        }
        Ok(true)
    }
}

/// The current segment and the reservations still open.
#[derive(Debug)]
struct Writer {
    segment_bytes: u64,
    dir: PathBuf,
    /// Shared so that the thread can sync it without holding the lock.
    file: Option<Arc<File>>,
    segment: u64,
    /// Where the next record goes in the current segment.
    pos: u64,
    /// Framed records not yet written.
    buffer: Vec<u8>,
    /// Open reservation → the segment that holds it. FNV, not the keyed default: the ids
    /// are the journal's own, and each call adds one and each flush removes thousands.
    open: HashMap<u64, u64, fnv::FnvBuildHasher>,
    /// Open reservations per segment.
    per_segment: BTreeMap<u64, usize>,
    /// Segments on disk, oldest first.
    live: Vec<u64>,
    spares: Vec<PathBuf>,
}

/// The journal's thread: writes and syncs what the calls hand over
/// ([`WhenDurable::Synced`]), syncs behind what they wrote themselves
/// ([`WhenDurable::Written`]), closes settled reservations and recycles segments.
fn run(shared: &Shared, rx: &mpsc::Receiver<Op>) {
    let mut waiters = Vec::new();
    let mut closed = Vec::new();
    // The next spare, while it is written.
    let mut preparing: Option<SegmentFile> = None;
    while let Ok(first) = rx.recv() {
        // Woken by the first reservation, let the threads that are ready to run (calls
        // about to reserve) go first, so that more share this sync: 15% less CPU per
        // call at 16 connections on the 2-core VM, nothing measurable at one.
        std::thread::yield_now();
        let mut writer = shared.lock();
        // Whatever arrived while the last sync ran goes into this one.
        let mut stop = None;
        let mut sync_behind = false;
        let mut result = Ok(());
        for op in std::iter::once(first).chain(std::iter::from_fn(|| rx.try_recv().ok())) {
            let appended = match op {
                Op::Reserve { id, record, done } => {
                    waiters.push(done);
                    let appended = writer.append(&record);
                    if appended.is_ok() {
                        writer.note_open(id);
                    }
                    appended
                }
                Op::Settled(record) => writer.append(&record),
                Op::Close(ids) => {
                    let mut appended = Ok(());
                    for chunk in ids.chunks(CLOSE_CHUNK) {
                        appended = encode(&EntryRef::C(chunk)).and_then(|r| writer.append(&r));
                        if appended.is_err() {
                            break;
                        }
                    }
                    closed.extend(ids);
                    appended
                }
                Op::Sync => {
                    // Cleared before the file is taken (and whatever this round's result):
                    // whatever is written after this asks again.
                    shared.dirty.store(false, Ordering::Release);
                    sync_behind = true;
                    Ok(())
                }
                Op::Stop(done) => {
                    stop = Some(done);
                    break;
                }
            };
            if let Err(e) = appended {
                result = Err(e);
            }
            if waiters.len() >= 4096 {
                break;
            }
        }
        result = result.and_then(|()| writer.write_out());
        let mut behind = None;
        if result.is_ok() && (!waiters.is_empty() || stop.is_some()) {
            result = writer.sync();
        } else if result.is_ok() && sync_behind {
            behind = writer.file.clone();
        }
        if let Err(e) = &result {
            tracing::error!(error = %e, "the reservation journal failed a write");
            // What was not written is dropped: those calls are refused.
            writer.buffer.clear();
        }
        for done in waiters.drain(..) {
            let _ = done.send(result.clone());
        }
        for id in closed.drain(..) {
            writer.note_closed(id);
        }
        if let Err(e) = writer.forget_closed() {
            tracing::warn!(error = %e, "the journal could not recycle a segment");
        }
        if let Some(done) = stop {
            // Later writes find no segment and are refused.
            writer.file = None;
            drop(writer);
            let _ = done.send(());
            return;
        }
        if preparing.is_none() && writer.spares.is_empty() {
            let (path, bytes) = writer.next_spare();
            match SegmentFile::create(&path, bytes) {
                Ok(file) => preparing = Some(file),
                Err(e) => tracing::warn!(error = %e, "the journal could not prepare a segment"),
            }
        }
        let dir = writer.dir.clone();
        drop(writer);
        // The calls keep writing while the disk syncs.
        if let Some(file) = behind {
            if let Err(e) = file.sync_data() {
                tracing::error!(
                    error = %io_error(&dir, &e),
                    "the reservation journal could not sync: a power cut now could lose \
                     the calls written since its last sync"
                );
            }
            std::thread::sleep(SYNC_PAUSE);
        }
        // Outside the lock, a step per round.
        if let Some(file) = &mut preparing {
            match file.write_step() {
                Ok(false) => {}
                Ok(true) => {
                    shared.lock().spares.push(file.path.clone());
                    preparing = None;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the journal could not prepare a segment");
                    preparing = None;
                }
            }
        }
    }
}

impl Writer {
    fn note_open(&mut self, id: u64) {
        self.open.insert(id, self.segment);
        *self.per_segment.entry(self.segment).or_default() += 1;
    }

    fn note_closed(&mut self, id: u64) {
        if let Some(segment) = self.open.remove(&id)
            && let Some(n) = self.per_segment.get_mut(&segment)
        {
            *n -= 1;
        }
    }

    /// Frames `record` into the buffer, moving to a new segment first if it does not fit.
    fn append(&mut self, record: &[u8]) -> Result<(), StoreError> {
        let framed = (HEADER + record.len()) as u64;
        if self.pos + self.buffer.len() as u64 + framed > self.segment_bytes - END_ROOM {
            self.write_out()?;
            let segment = self.segment;
            self.push(segment, &EntryRef::E)?;
            self.write_out()?;
            // Everything in a finished segment is durable before the next one is used.
            self.sync()?;
            self.start_segment(segment + 1)?;
        }
        self.frame(self.segment, record);
        Ok(())
    }

    fn push(&mut self, segment: u64, entry: &EntryRef<'_>) -> Result<(), StoreError> {
        let record = encode(entry)?;
        self.frame(segment, &record);
        Ok(())
    }

    fn frame(&mut self, segment: u64, record: &[u8]) {
        self.buffer.extend_from_slice(&MAGIC);
        let len = u32::try_from(record.len()).unwrap_or(u32::MAX);
        self.buffer.extend_from_slice(&len.to_le_bytes());
        self.buffer
            .extend_from_slice(&segment_crc(segment, record).to_le_bytes());
        self.buffer.extend_from_slice(record);
    }

    fn write_out(&mut self) -> Result<(), StoreError> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let file = self.current()?;
        file.write_all_at(&self.buffer, self.pos)
            .map_err(|e| io_error(&self.dir, &e))?;
        self.pos += self.buffer.len() as u64;
        self.buffer.clear();
        Ok(())
    }

    fn sync(&mut self) -> Result<(), StoreError> {
        let file = self.current()?;
        file.sync_data().map_err(|e| io_error(&self.dir, &e))
    }

    fn current(&self) -> Result<&File, StoreError> {
        self.file
            .as_deref()
            .ok_or_else(|| StoreError::Io(format!("journal {}: no segment", self.dir.display())))
    }

    /// Makes `segment` the current one: a spare renamed, or a new file written full.
    fn start_segment(&mut self, segment: u64) -> Result<(), StoreError> {
        let path = segment_path(&self.dir, segment);
        let io = |e: std::io::Error| io_error(&path, &e);
        match self.spares.pop() {
            Some(spare) => std::fs::rename(&spare, &path).map_err(io)?,
            None => new_segment_file(&path, self.segment_bytes)?,
        }
        sync_dir(&self.dir)?;
        self.file = Some(Arc::new(
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(io)?,
        ));
        self.segment = segment;
        self.pos = 0;
        self.live.push(segment);
        Ok(())
    }

    /// Where the next spare goes, and its size.
    fn next_spare(&self) -> (PathBuf, u64) {
        let path = self
            .dir
            .join(format!("spare-next-{:016x}.log", self.segment));
        (path, self.segment_bytes)
    }

    /// Oldest segments whose reservations are all closed become spares (or go).
    fn forget_closed(&mut self) -> Result<(), StoreError> {
        while self.live.len() > 1 {
            let oldest = self.live[0];
            if self.per_segment.get(&oldest).is_some_and(|n| *n > 0) {
                break;
            }
            self.per_segment.remove(&oldest);
            let path = segment_path(&self.dir, oldest);
            if self.spares.len() < SPARES {
                let spare = spare_path(&self.dir, oldest);
                std::fs::rename(&path, &spare).map_err(|e| io_error(&path, &e))?;
                self.spares.push(spare);
            } else {
                std::fs::remove_file(&path).map_err(|e| io_error(&path, &e))?;
            }
            // Durable before anything relies on the segment being gone.
            sync_dir(&self.dir)?;
            self.live.remove(0);
        }
        Ok(())
    }
}

/// What reading a journal directory found.
#[derive(Debug, Default)]
struct Read {
    unsettled: BTreeMap<u64, Unsettled>,
    reserved_in: HashMap<u64, u64>,
    max_id: u64,
    segments: Vec<u64>,
    spares: Vec<PathBuf>,
    last_segment: Option<u64>,
    /// Where the intact records of the last segment end, and whether with an end mark.
    last_end: Option<u64>,
    last_ended: bool,
}

fn read_dir(dir: &Path) -> Result<Read, StoreError> {
    let mut read = Read::default();
    let entries = std::fs::read_dir(dir).map_err(|e| io_error(dir, &e))?;
    for entry in entries {
        let entry = entry.map_err(|e| io_error(dir, &e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.ends_with(".new") {
            // A segment whose creation a crash interrupted: never used.
            let _ = std::fs::remove_file(entry.path());
        } else if name.starts_with("spare-") {
            read.spares.push(entry.path());
        } else if let Some(hex) = name.strip_suffix(".log")
            && let Ok(segment) = u64::from_str_radix(hex, 16)
        {
            read.segments.push(segment);
        }
    }
    read.segments.sort_unstable();
    if let (Some(first), Some(last)) = (read.segments.first(), read.segments.last())
        && last - first + 1 != read.segments.len() as u64
    {
        return Err(StoreError::Corrupt {
            tree: "journal",
            message: format!(
                "{} misses segments between {first:016x} and {last:016x}: reservations may \
                 be lost. Restore the missing files, or move the journal away to accept the loss",
                dir.display()
            ),
        });
    }
    let count = read.segments.len();
    for (i, &segment) in read.segments.clone().iter().enumerate() {
        let path = segment_path(dir, segment);
        let data = std::fs::read(&path).map_err(|e| io_error(&path, &e))?;
        let (entries, end) = read_segment(&path, segment, &data)?;
        let ended = matches!(entries.last(), Some(Entry::E));
        let last = i + 1 == count;
        if !last && !ended {
            return Err(StoreError::Corrupt {
                tree: "journal",
                message: format!(
                    "{} is damaged at byte {end}: a finished segment must end with its end \
                     record. Restore it, or move the journal away to accept the loss of the \
                     reservations it held",
                    path.display()
                ),
            });
        }
        if last {
            read.last_segment = Some(segment);
            read.last_end = Some(end);
            // Past `end`: zeros, the stale records of a reused segment, or a record torn
            // by a crash (not yet synced, so never the reservation of a forwarded call).
            read.last_ended = ended;
        }
        for entry in entries {
            match entry {
                Entry::R(id, reservation) => {
                    read.max_id = read.max_id.max(id);
                    read.reserved_in.insert(id, segment);
                    read.unsettled.insert(
                        id,
                        Unsettled {
                            id,
                            reservation,
                            settled: None,
                        },
                    );
                }
                Entry::S(id, call) => {
                    if let Some(open) = read.unsettled.get_mut(&id) {
                        open.settled = Some(call);
                    }
                }
                Entry::C(ids) => {
                    for id in ids {
                        read.unsettled.remove(&id);
                    }
                }
                Entry::E => {}
            }
        }
    }
    Ok(read)
}

/// The intact records of one segment, and where they end. A record that fails its check
/// ends the segment only if no intact record follows it (a tail torn by a crash); otherwise
/// the segment is damaged and refused.
fn read_segment(path: &Path, segment: u64, data: &[u8]) -> Result<(Vec<Entry>, u64), StoreError> {
    let mut entries = Vec::new();
    let mut pos = 0;
    while let Some(record) = record_at(segment, data, pos) {
        let entry: Entry = serde_json::from_slice(record).map_err(|e| StoreError::Corrupt {
            tree: "journal",
            message: format!(
                "{} holds a record at byte {pos} this build cannot read: {e}",
                path.display()
            ),
        })?;
        let ended = matches!(entry, Entry::E);
        entries.push(entry);
        pos += HEADER + record.len();
        if ended {
            return Ok((entries, pos as u64));
        }
    }
    let mut from = pos + 1;
    while let Some(found) = data
        .get(from..)
        .and_then(|rest| memchr::memmem::find(rest, &MAGIC))
    {
        let next = from + found;
        if record_at(segment, data, next).is_some() {
            return Err(StoreError::Corrupt {
                tree: "journal",
                message: format!(
                    "{} is damaged at byte {pos}, and intact records follow at byte {next}: \
                     not a tail torn by a crash. Restore it, or move the journal away to \
                     accept the loss of the reservations it held",
                    path.display()
                ),
            });
        }
        from = next + 1;
    }
    Ok((entries, pos as u64))
}

/// The record of `segment` starting at `pos`, if one is there and intact.
fn record_at(segment: u64, data: &[u8], pos: usize) -> Option<&[u8]> {
    let header = data.get(pos..pos + HEADER)?;
    if header[..4] != MAGIC {
        return None;
    }
    let len = u32::from_le_bytes(header[4..8].try_into().ok()?) as usize;
    let expected = u32::from_le_bytes(header[8..12].try_into().ok()?);
    if len == 0 || len > MAX_RECORD {
        return None;
    }
    let record = data.get(pos + HEADER..pos + HEADER + len)?;
    (segment_crc(segment, record) == expected).then_some(record)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::records::Usage;
    use crate::core::testing::call;

    const BOTH: [WhenDurable; 2] = [WhenDurable::Written, WhenDurable::Synced];

    fn reservation(n: u64) -> Reservation {
        Reservation {
            at_micros: 1_000 + i64::try_from(n).unwrap(),
            request_id: format!("req-{n}"),
            key_id: "key_a".into(),
            user_id: "usr_1".into(),
            model: "m".into(),
            version: None,
            stream: false,
            estimate: Usage {
                prompt_tokens: 10,
                completion_tokens: 100,
            },
            images: 0,
            cost: Default::default(),
        }
    }

    /// Reserves `n` calls and waits until all are durable; their ids.
    fn reserve(journal: &FileJournal, n: u64) -> Vec<u64> {
        let pending: Vec<_> = (0..n).map(|i| journal.reserve(reservation(i))).collect();
        pending
            .into_iter()
            .map(|p| {
                p.durable.blocking_recv().unwrap().unwrap();
                p.id
            })
            .collect()
    }

    fn settled(id: u64, tokens: u64) -> EncodedCall {
        let mut call = call("key_a", 5_000, "m", tokens);
        call.reservation = Some(id);
        EncodedCall::new(call)
    }

    #[test]
    fn a_segment_file_written_in_steps_is_whole_zeros_and_appears_only_when_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spare-next-0000000000000001.log");
        let bytes = 2 * STEP_BYTES + 5;
        let mut file = SegmentFile::create(&path, bytes).unwrap();
        assert!(!file.write_step().unwrap());
        assert!(!path.exists(), "not at its path before it is whole");
        assert!(!file.write_step().unwrap());
        assert!(file.write_step().unwrap());
        let written = std::fs::read(&path).unwrap();
        assert_eq!(written.len() as u64, bytes);
        assert!(written.iter().all(|b| *b == 0));
        assert_eq!(
            segments(dir.path()),
            vec![path.file_name().unwrap().to_string_lossy()]
        );
    }

    #[test]
    fn a_settlement_around_its_encoded_call_is_what_serde_writes() {
        let mut call = settled(41, 7).call;
        call.version = Some("v\"2\"".into());
        let id = u64::MAX - 3;
        let encoded = EncodedCall::new(call);
        assert_eq!(
            settlement_record(id, &encoded.json().unwrap()).unwrap(),
            encode(&EntryRef::S(id, &encoded.call)).unwrap()
        );
    }

    fn open_ids(journal: &FileJournal) -> Vec<u64> {
        journal.unsettled().iter().map(|u| u.id).collect()
    }

    fn segments(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn open_reservations_and_their_settlements_are_found_at_the_next_open() {
        for when in BOTH {
            let dir = tempfile::tempdir().unwrap();
            let ids = {
                let journal = FileJournal::open(dir.path(), when).unwrap();
                assert!(journal.unsettled().is_empty());
                let ids = reserve(&journal, 3);
                journal.settled(&settled(ids[1], 7));
                journal.close(vec![ids[2]]);
                journal.stop();
                ids
            };
            let journal = FileJournal::open(dir.path(), when).unwrap();
            let open = journal.unsettled();
            assert_eq!(open.len(), 2);
            assert_eq!((open[0].id, open[0].settled.as_ref()), (ids[0], None));
            assert_eq!(open[0].reservation, reservation(0));
            assert_eq!(open[1].id, ids[1]);
            assert_eq!(open[1].settled.as_ref().unwrap().usage.prompt_tokens, 7);
            // New ids never repeat an old one.
            let next = reserve(&journal, 1)[0];
            assert!(next > ids[2], "{next} after {ids:?}");
        }
    }

    #[test]
    fn thousands_closed_at_once_fit_the_records_and_reservations_still_sync() {
        for when in BOTH {
            let dir = tempfile::tempdir().unwrap();
            let journal = FileJournal::open(dir.path(), when).unwrap();
            let ids = reserve(&journal, 5000);
            journal.close(ids[..4999].to_vec());
            let last = reserve(&journal, 1);
            journal.stop();
            let journal = FileJournal::open(dir.path(), when).unwrap();
            assert_eq!(open_ids(&journal), [ids[4999], last[0]]);
        }
    }

    #[test]
    fn a_written_reservation_is_in_the_file_when_reserve_returns() {
        let dir = tempfile::tempdir().unwrap();
        let journal = FileJournal::open(dir.path(), WhenDurable::Written).unwrap();
        let mut pending = journal.reserve(reservation(7));
        // Answered on the caller's thread, not by the journal's.
        pending.durable.try_recv().unwrap().unwrap();
        let data = std::fs::read(segment_path(dir.path(), 1)).unwrap();
        let record = record_at(1, &data, find_record(&data, 0)).unwrap();
        assert!(String::from_utf8_lossy(record).contains("req-7"));
        // The settlement follows within the thread's next sync.
        journal.settled(&settled(pending.id, 9));
        let mut found = false;
        for _ in 0..500 {
            let data = std::fs::read(segment_path(dir.path(), 1)).unwrap();
            let second = find_record(&data, 0) + HEADER + record_len(&data, 0);
            if record_at(1, &data, second).is_some() {
                found = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        assert!(found, "the settlement never reached the file");
        // After a stop, a reservation is refused rather than written nowhere.
        journal.stop();
        let mut late = journal.reserve(reservation(8));
        assert!(late.durable.try_recv().unwrap().is_err());
    }

    #[test]
    fn a_kill_without_stop_keeps_every_durable_reservation() {
        for when in BOTH {
            let dir = tempfile::tempdir().unwrap();
            let journal = FileJournal::open(dir.path(), when).unwrap();
            let ids = reserve(&journal, 50);
            // No stop, no drop: what a `kill -9` leaves is what the syncs wrote.
            std::mem::forget(journal);
            let journal = FileJournal::open(dir.path(), when).unwrap();
            assert_eq!(open_ids(&journal), ids);
        }
    }

    #[test]
    fn a_torn_tail_is_dropped_and_what_came_before_is_kept() {
        for when in BOTH {
            let dir = tempfile::tempdir().unwrap();
            let ids = {
                let journal = FileJournal::open(dir.path(), when).unwrap();
                let ids = reserve(&journal, 3);
                journal.stop();
                ids
            };
            // The third record, half written (a crash in the middle of an unsynced write).
            let path = segment_path(dir.path(), 1);
            let mut data = std::fs::read(&path).unwrap();
            let third = find_record(&data, 2);
            let end = third + HEADER + record_len(&data, third);
            data[third + (end - third) / 2..end].fill(0);
            std::fs::write(&path, &data).unwrap();
            let journal = FileJournal::open(dir.path(), when).unwrap();
            assert_eq!(open_ids(&journal), ids[..2]);
            journal.stop();
            // The torn segment was given its end mark: it reads whole from now on.
            let journal = FileJournal::open(dir.path(), when).unwrap();
            assert_eq!(open_ids(&journal), ids[..2]);
        }
    }

    #[test]
    fn a_flipped_byte_before_intact_records_is_refused_not_read_short() {
        for when in BOTH {
            let dir = tempfile::tempdir().unwrap();
            {
                let journal = FileJournal::open(dir.path(), when).unwrap();
                reserve(&journal, 3);
                journal.stop();
            }
            let path = segment_path(dir.path(), 1);
            let mut data = std::fs::read(&path).unwrap();
            let second = find_record(&data, 1);
            data[second + HEADER + 5] ^= 0x20;
            std::fs::write(&path, &data).unwrap();
            let message = FileJournal::open(dir.path(), when).unwrap_err().to_string();
            assert!(
                message.contains(&path.display().to_string())
                    && message.contains(&format!("damaged at byte {second}"))
                    && message.contains("intact records follow"),
                "{message}"
            );
        }
    }

    #[test]
    fn a_finished_segment_cut_short_is_refused() {
        for when in BOTH {
            let dir = tempfile::tempdir().unwrap();
            for _ in 0..2 {
                let journal = FileJournal::open(dir.path(), when).unwrap();
                reserve(&journal, 2);
                journal.stop();
            }
            // Segment 1 was finished (its end mark written) when segment 2 began; lose its end.
            let path = segment_path(dir.path(), 1);
            let mut data = std::fs::read(&path).unwrap();
            let end = find_record(&data, 2);
            data[end..end + HEADER].fill(0);
            std::fs::write(&path, &data).unwrap();
            let message = FileJournal::open(dir.path(), when).unwrap_err().to_string();
            assert!(
                message.contains("must end with its end record"),
                "{message}"
            );
        }
    }

    #[test]
    fn closed_segments_are_reused_and_the_rest_survive_a_reopen() {
        for when in BOTH {
            let dir = tempfile::tempdir().unwrap();
            let journal = FileJournal::open_sized(dir.path(), 4096, when).unwrap();
            let mut open = Vec::new();
            for round in 0..20 {
                let ids = reserve(&journal, 10);
                journal.settled(&settled(ids[0], round));
                // All but one of each round are closed.
                journal.close(ids[1..].to_vec());
                open.push(ids[0]);
                if round >= 2 {
                    journal.close(vec![open.remove(0)]);
                }
            }
            journal.stop();
            let names = segments(dir.path());
            // Twenty rounds filled a dozen segments; those closed were reused or deleted.
            assert!(
                names.iter().filter(|n| n.starts_with("spare-")).count() <= SPARES,
                "{names:?}"
            );
            assert!(
                names.len() <= 5,
                "closed segments were not reused: {names:?}"
            );
            let journal = FileJournal::open_sized(dir.path(), 4096, when).unwrap();
            assert_eq!(open_ids(&journal), open);
            let settled: Vec<u64> = journal
                .unsettled()
                .iter()
                .map(|u| u.settled.as_ref().unwrap().usage.prompt_tokens)
                .collect();
            assert_eq!(settled, [18, 19]);
        }
    }

    fn record_len(data: &[u8], pos: usize) -> usize {
        u32::from_le_bytes(data[pos + 4..pos + 8].try_into().unwrap()) as usize
    }

    /// The offset of record `n` (0-based) in a segment.
    fn find_record(data: &[u8], n: usize) -> usize {
        let mut pos = 0;
        for _ in 0..n {
            pos += HEADER + record_len(data, pos);
        }
        assert_eq!(data[pos..pos + 4], MAGIC);
        pos
    }
}
