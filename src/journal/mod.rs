//! The durable journal under [`crate::state`] (SPEC §9).
//!
//! Format: append-only log files `wal-NNNNNNNN.log` in `data_dir`, each a
//! sequence of frames `[len: u32 LE][crc32: u32 LE][payload]`, plus a
//! `snapshot.log` in the same framing whose first frame names the first
//! log it does not cover. The journal knows bytes only: what a payload
//! means (and its format version) belongs to the stores that write it
//! ([`crate::persist`]). Every record must be safe to replay twice (an
//! upsert, or a delta that knows whether it was applied), because a
//! snapshot may already hold what the log after it repeats.
//!
//! One writer thread owns the files. Callers append encoded frames through
//! a channel and never block; [`Journal::sync`] is a barrier that resolves
//! once everything appended before it is on disk (fdatasync). The writer
//! drains whatever is waiting into one write and one fsync, so many
//! concurrent acks share one disk flush (group commit).
//!
//! Compaction: [`Journal::rotate`] starts a new log file; the caller then
//! writes a snapshot of the whole state and [`install_snapshot`] removes the
//! logs it covers. Ops are applied to memory before they are appended, so a
//! snapshot taken after a rotation holds everything in the older logs. One
//! compaction runs at a time ([`Journal::compaction`]), and none once the
//! journal has failed: the log that holds the last good frames stays the
//! newest one.
//!
//! Failure: a write or fdatasync that fails (disk full, I/O error) marks the
//! journal failed for the rest of the process, and the file is cut back to
//! the end of its last good frame, so no torn frame is left behind. On
//! start, a torn tail (a partial frame, a frame whose checksum fails, or a
//! zero-filled region as power loss leaves on some filesystems) is cut off
//! the newest log that holds data; anywhere else it is corruption.
//!
//! Files are created owner-only (0600; the directory 0700): they hold
//! customer data.

mod pressure;

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use tokio::sync::oneshot;

const SNAPSHOT: &str = "snapshot.log";
/// Temporary snapshots are `snapshot.<unique>.tmp`, renamed when complete.
const SNAPSHOT_TMP_PREFIX: &str = "snapshot.";
const SNAPSHOT_TMP_SUFFIX: &str = ".tmp";
/// Ops without a waiting ack still reach the disk within this.
const LAZY_SYNC: Duration = Duration::from_millis(50);
/// Largest frame accepted on replay (a bigger length is corruption).
const MAX_FRAME: usize = 64 * 1024 * 1024;
/// While the cores are oversubscribed ([`pressure`]), a sync round that
/// follows one of at least [`GATHER_FROM`] waiters waits this long for
/// more to join it before it writes and syncs.
const GATHER: Duration = Duration::from_micros(500);
const GATHER_FROM: usize = 8;

/// Why the journal cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("{path}: {reason}")]
    Io { path: String, reason: String },
    #[error("{path}: corrupt at byte {offset}: {reason}")]
    Corrupt {
        path: String,
        offset: u64,
        reason: String,
    },
}

fn io_error(path: &Path, e: impl std::fmt::Display) -> JournalError {
    JournalError::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

/// What a writer is asked to do: by the file writer here, and by a remote
/// writer (the cluster's log on Redis) through [`Journal::remote`].
pub enum Cmd {
    /// One framed payload ([`frame`]).
    Frame(Vec<u8>),
    /// Answer `true` once every frame sent before is durable.
    Sync(oneshot::Sender<bool>),
    Rotate(oneshot::Sender<Result<u64, String>>),
}

#[derive(Clone)]
enum Tx {
    /// The file writer: frames go into `pending` (no message, no wake-up:
    /// the writer takes them when it syncs, or within [`LAZY_SYNC`]); syncs
    /// and rotations go through the channel.
    File {
        tx: mpsc::Sender<Cmd>,
        pending: Pending,
    },
    Remote(tokio::sync::mpsc::UnboundedSender<Cmd>),
}

/// Frames appended and not yet taken by the file writer.
type Pending = Arc<parking_lot::Mutex<Vec<u8>>>;

impl Tx {
    fn send(&self, cmd: Cmd) -> Result<(), ()> {
        match self {
            Tx::File { tx, .. } => tx.send(cmd).map_err(|_| ()),
            Tx::Remote(tx) => tx.send(cmd).map_err(|_| ()),
        }
    }
}

/// Handle to the journal; cheap to clone. Disabled in memory mode.
#[derive(Clone)]
pub struct Journal {
    tx: Option<Tx>,
    failed: Arc<AtomicBool>,
    log_bytes: Arc<AtomicU64>,
    /// fdatasyncs done (`/metrics`).
    syncs: Arc<AtomicU64>,
    dir: Option<PathBuf>,
    /// Held for the whole of a compaction (rotate + snapshot + removal).
    compaction: Arc<tokio::sync::Mutex<()>>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Journal({:?})", self.dir)
    }
}

/// The payloads of a buffer of whole frames (as a remote writer stores
/// them); an error names the first bad one.
pub fn split_frames(mut buf: &[u8]) -> Result<Vec<&[u8]>, String> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        if buf.len() < 8 {
            return Err("a frame header is cut short".into());
        }
        let len = u32::from_le_bytes(buf[0..4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(buf[4..8].try_into().expect("4 bytes"));
        let Some(payload) = buf.get(8..8 + len) else {
            return Err("a frame is cut short".into());
        };
        if crc32fast::hash(payload) != crc {
            return Err("a frame's checksum does not match".into());
        }
        out.push(payload);
        buf = &buf[8 + len..];
    }
    Ok(out)
}

/// Frame one payload.
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 8);
    frame_into(&mut out, payload);
    out
}

/// Append one payload, framed, to `out`.
fn frame_into(out: &mut Vec<u8>, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
}

fn log_name(seq: u64) -> String {
    format!("wal-{seq:08}.log")
}

/// Log files in `dir`, by sequence number.
fn logs(dir: &Path) -> Result<Vec<(u64, PathBuf)>, JournalError> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| io_error(dir, e))? {
        let entry = entry.map_err(|e| io_error(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(seq) = name
            .strip_prefix("wal-")
            .and_then(|r| r.strip_suffix(".log"))
            .and_then(|n| n.parse().ok())
        {
            found.push((seq, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// The first frame of a snapshot: the first log it does not cover. Its
/// JSON form is the one of format 0, so every data_dir reads the same.
fn snapshot_header(next_log: u64) -> Vec<u8> {
    format!("{{\"SnapshotOf\":{{\"next_log\":{next_log}}}}}").into_bytes()
}

fn parse_snapshot_header(payload: &[u8]) -> Option<u64> {
    let rest = payload.strip_prefix(b"{\"SnapshotOf\":{\"next_log\":")?;
    let digits = rest.strip_suffix(b"}}")?;
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// Read every frame of `path`, handing each payload to `each` (an `Err`
/// from it is an unreadable record: corruption). A torn tail (a crash or a failed write
/// mid-frame: a partial frame, a last frame whose checksum fails, a
/// zero-filled rest of the file, or a frame whose end is followed by
/// nothing but zeros) is cut off and the file truncated there
/// when `repair` (the newest log that holds data); without `repair` it is
/// corruption, and so is damage followed by more data. A frame of length 0
/// is never valid.
pub fn read_frames(
    path: &Path,
    repair: bool,
    mut each: impl FnMut(&[u8]) -> Result<(), String>,
) -> Result<u64, JournalError> {
    let file = File::open(path).map_err(|e| io_error(path, e))?;
    let len = file.metadata().map_err(|e| io_error(path, e))?.len();
    let mut r = BufReader::with_capacity(1 << 20, file);
    let mut offset = 0u64;
    let mut count = 0u64;
    let corrupt = |offset: u64, reason: &str| JournalError::Corrupt {
        path: path.display().to_string(),
        offset,
        reason: reason.into(),
    };
    // A bad frame at `offset` (claiming to end at `end`): a torn tail if it
    // is the last frame or nothing but zeros follows its end (zeros from
    // its start included; a write cut short: its first page reached the
    // disk, the pages after it did not and read as zeros); damage
    // otherwise.
    let bad = |offset: u64, end: u64, count: u64, reason: &str| -> Result<u64, JournalError> {
        if end >= len || zeros_from(path, end)? {
            torn(path, offset, len, repair, count)
        } else {
            Err(corrupt(offset, reason))
        }
    };
    loop {
        let mut head = [0u8; 8];
        match read_full(&mut r, &mut head) {
            Ok(0) => break,
            Ok(8) => {}
            Ok(_) => return torn(path, offset, len, repair, count),
            Err(e) => return Err(io_error(path, e)),
        }
        let size = u32::from_le_bytes(head[..4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(head[4..].try_into().expect("4 bytes"));
        let frame_end = offset + 8 + size as u64;
        if size == 0 {
            return bad(offset, offset + 8, count, "empty record");
        }
        if size > MAX_FRAME {
            return bad(offset, frame_end, count, "frame too large");
        }
        let mut payload = vec![0u8; size];
        match read_full(&mut r, &mut payload) {
            Ok(n) if n == size => {}
            Ok(_) => return torn(path, offset, len, repair, count),
            Err(e) => return Err(io_error(path, e)),
        }
        if crc32fast::hash(&payload) != crc {
            return bad(offset, frame_end, count, "checksum mismatch");
        }
        each(&payload).map_err(|e| corrupt(offset, &format!("unreadable record: {e}")))?;
        count += 1;
        offset = frame_end;
    }
    Ok(count)
}

/// Whether every byte of `path` from `offset` on is zero.
fn zeros_from(path: &Path, offset: u64) -> Result<bool, JournalError> {
    use std::io::Seek;
    let mut f = File::open(path).map_err(|e| io_error(path, e))?;
    f.seek(io::SeekFrom::Start(offset))
        .map_err(|e| io_error(path, e))?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match f.read(&mut buf) {
            Ok(0) => return Ok(true),
            Ok(n) if buf[..n].iter().all(|&b| b == 0) => {}
            Ok(_) => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_error(path, e)),
        }
    }
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn torn(path: &Path, offset: u64, len: u64, repair: bool, count: u64) -> Result<u64, JournalError> {
    if !repair {
        // Only the newest log can be cut by a crash; a snapshot or an older
        // log that ends early lost data some other way.
        return Err(JournalError::Corrupt {
            path: path.display().to_string(),
            offset,
            reason: "the file ends in the middle of a record (truncated)".into(),
        });
    }
    tracing::warn!(file = %path.display(), offset, dropped_bytes = len - offset, "journal ends in a torn record (crash or failed write mid-record); it is cut off");
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| io_error(path, e))?;
    f.set_len(offset).map_err(|e| io_error(path, e))?;
    f.sync_all().map_err(|e| io_error(path, e))?;
    Ok(count)
}

/// Take the exclusive lock of `dir` (file `LOCK`): one router per data_dir.
/// The lock lasts as long as the returned file is open.
pub fn lock(dir: &Path) -> Result<File, JournalError> {
    let path = dir.join("LOCK");
    let file = private(OpenOptions::new().create(true).truncate(false).write(true))
        .open(&path)
        .map_err(|e| io_error(&path, e))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(fs::TryLockError::WouldBlock) => Err(JournalError::Io {
            path: dir.display().to_string(),
            reason: "in use by another wa-router (one router per data_dir)".into(),
        }),
        Err(fs::TryLockError::Error(e)) => Err(io_error(&path, e)),
    }
}

/// Total size of the log files in `dir` (0 if none can be read).
pub fn log_bytes(dir: &Path) -> u64 {
    logs(dir)
        .map(|l| {
            l.iter()
                .filter_map(|(_, p)| fs::metadata(p).ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Bytes the journal takes on disk in `dir`: its logs and its snapshot
/// (`/metrics`).
pub fn disk_bytes(dir: &Path) -> u64 {
    log_bytes(dir) + fs::metadata(dir.join(SNAPSHOT)).map_or(0, |m| m.len())
}

/// Replay `dir`: the snapshot, then every log after it, in order.
/// Returns the number of frames read and the next log sequence number.
pub fn replay(
    dir: &Path,
    mut apply: impl FnMut(&[u8]) -> Result<(), String>,
) -> Result<(u64, u64), JournalError> {
    let mut applied = 0;
    let mut from_seq = 0;
    let snapshot = dir.join(SNAPSHOT);
    if snapshot.exists() {
        let mut first = true;
        applied += read_frames(&snapshot, false, |payload| {
            if std::mem::take(&mut first) {
                from_seq = parse_snapshot_header(payload)
                    .ok_or("a snapshot must start with its header")?;
                Ok(())
            } else {
                apply(payload)
            }
        })?;
    }
    let mut next = from_seq;
    let files = logs(dir)?;
    // Only the newest log that holds data can end torn: older ones were
    // closed cleanly. Empty logs after it (a rotation with nothing written
    // since) do not make it older.
    let last = files
        .iter()
        .rev()
        .find(|(_, p)| fs::metadata(p).map_or(true, |m| m.len() > 0))
        .map(|(s, _)| *s);
    for (seq, path) in files {
        if seq < from_seq {
            continue;
        }
        applied += read_frames(&path, Some(seq) == last, &mut apply)?;
        next = seq + 1;
    }
    Ok((applied, next))
}

/// Records decoded a batch at a time on the reader thread.
const REPLAY_BATCH: usize = 1024;

/// [`replay`] on two threads: a reader reads, checks and `decode`s the
/// records while the calling thread `apply`s them, in order (a restart
/// with 1,000,000 conversations spent about a third of its time reading
/// and parsing). A record `decode` refuses stops the replay as corrupt,
/// at its offset; the records before it are applied.
pub fn replay_decoded<T: Send>(
    dir: &Path,
    decode: impl Fn(&[u8]) -> Result<T, String> + Send,
    mut apply: impl FnMut(T),
) -> Result<(u64, u64), JournalError> {
    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::sync_channel::<Vec<T>>(8);
        let reader = std::thread::Builder::new()
            .name("wa-router-replay".into())
            .spawn_scoped(scope, move || {
                let mut batch = Vec::with_capacity(REPLAY_BATCH);
                let read = replay(dir, |payload| {
                    batch.push(decode(payload)?);
                    if batch.len() == REPLAY_BATCH {
                        let full = std::mem::replace(&mut batch, Vec::with_capacity(REPLAY_BATCH));
                        // The applier stops only by panicking.
                        tx.send(full)
                            .map_err(|_| "the replay stopped".to_string())?;
                    }
                    Ok(())
                });
                if !batch.is_empty() {
                    let _ = tx.send(batch);
                }
                read
            })
            .map_err(|e| io_error(dir, e))?;
        for batch in rx {
            batch.into_iter().for_each(&mut apply);
        }
        reader
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

impl Journal {
    /// Memory mode: appends are dropped, syncs succeed at once.
    pub fn disabled() -> Self {
        Journal {
            tx: None,
            failed: Arc::new(AtomicBool::new(false)),
            log_bytes: Arc::new(AtomicU64::new(0)),
            syncs: Default::default(),
            dir: None,
            compaction: Default::default(),
        }
    }

    /// Open the journal in `dir` for appending, starting log `next_seq`.
    pub fn open(dir: &Path, next_seq: u64) -> Result<Self, JournalError> {
        let path = dir.join(log_name(next_seq));
        let file = private(OpenOptions::new().create(true).append(true))
            .open(&path)
            .map_err(|e| io_error(&path, e))?;
        sync_dir(dir);
        let (tx, rx) = mpsc::channel();
        let pending = Pending::default();
        let failed = Arc::new(AtomicBool::new(false));
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let log_bytes = Arc::new(AtomicU64::new(len));
        let syncs = Arc::new(AtomicU64::new(0));
        let writer = Writer {
            dir: dir.to_path_buf(),
            file,
            seq: next_seq,
            good_len: len,
            failed: failed.clone(),
            log_bytes: log_bytes.clone(),
            syncs: syncs.clone(),
        };
        let taken = pending.clone();
        std::thread::Builder::new()
            .name("wa-router-journal".into())
            .spawn(move || writer.run(rx, &taken))
            .map_err(|e| io_error(dir, e))?;
        Ok(Journal {
            tx: Some(Tx::File { tx, pending }),
            failed,
            log_bytes,
            syncs,
            dir: Some(dir.to_path_buf()),
            compaction: Default::default(),
        })
    }

    /// A journal whose frames go to a remote writer (the cluster's log),
    /// which sets `failed` while it cannot write. No files, no compaction.
    pub fn remote(tx: tokio::sync::mpsc::UnboundedSender<Cmd>, failed: Arc<AtomicBool>) -> Self {
        Journal {
            tx: Some(Tx::Remote(tx)),
            failed,
            log_bytes: Arc::new(AtomicU64::new(0)),
            syncs: Default::default(),
            dir: None,
            compaction: Default::default(),
        }
    }

    /// Held by whoever compacts: one compaction at a time.
    pub async fn compaction(&self) -> tokio::sync::OwnedMutexGuard<()> {
        self.compaction.clone().lock_owned().await
    }

    pub fn is_enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Whether a write failed (disk full, unwritable): the router then
    /// refuses what it could not record.
    pub fn has_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Bytes in the current log file.
    pub fn log_bytes(&self) -> u64 {
        self.log_bytes.load(Ordering::Relaxed)
    }

    /// How many times the writer has fdatasynced its log so far (0 for a
    /// journal without files).
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }

    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// Append one record (never blocks).
    pub fn append(&self, payload: &[u8]) {
        match &self.tx {
            Some(Tx::File { pending, .. }) => frame_into(&mut pending.lock(), payload),
            Some(Tx::Remote(tx)) => {
                let _ = tx.send(Cmd::Frame(frame(payload)));
            }
            None => {}
        }
    }

    /// Resolve once everything appended so far is on disk; `false` if it
    /// could not be written.
    pub async fn sync(&self) -> bool {
        let Some(tx) = &self.tx else { return true };
        if self.has_failed() {
            return false;
        }
        let (done, wait) = oneshot::channel();
        if tx.send(Cmd::Sync(done)).is_err() {
            return false;
        }
        wait.await.unwrap_or(false)
    }

    /// Start a new log file; returns its sequence number.
    pub async fn rotate(&self) -> Result<u64, String> {
        let Some(tx) = &self.tx else {
            return Err("memory mode".into());
        };
        let (done, wait) = oneshot::channel();
        let sent = match tx {
            // What was appended before goes to the old log, ahead of the
            // rotation; what is appended after, to the new one.
            Tx::File { tx, pending } => {
                let mut pending = pending.lock();
                let before = std::mem::take(&mut *pending);
                tx.send(Cmd::Frame(before))
                    .and_then(|()| tx.send(Cmd::Rotate(done)))
                    .is_ok()
            }
            Tx::Remote(tx) => tx.send(Cmd::Rotate(done)).is_ok(),
        };
        if !sent {
            return Err("journal writer stopped".to_string());
        }
        wait.await
            .map_err(|_| "journal writer stopped".to_string())?
    }
}

/// Write a snapshot of `records` covering every log before `next_log`, then
/// delete those logs. Blocking: call from a blocking thread. The snapshot
/// is written to a temporary file of its own (created new, never shared
/// with another writer), fsynced, renamed over `snapshot.log`, and the
/// directory fsynced before any log is removed.
pub fn install_snapshot(
    dir: &Path,
    next_log: u64,
    records: impl Iterator<Item = Vec<u8>>,
) -> Result<usize, JournalError> {
    install_snapshot_with(
        dir,
        next_log,
        |emit| {
            for r in records {
                emit(&r);
            }
        },
        || Ok(()),
    )
}

/// [`install_snapshot`] with the records written as `dump` produces them
/// (nothing collected first), and `before_rename` run once they are all
/// on disk and before the snapshot replaces the old one: its error stops
/// the install (the logs stay).
pub fn install_snapshot_with(
    dir: &Path,
    next_log: u64,
    dump: impl FnOnce(&mut dyn FnMut(&[u8])),
    before_rename: impl FnOnce() -> Result<(), String>,
) -> Result<usize, JournalError> {
    static TMP_SEQ: AtomicU64 = AtomicU64::new(0);
    let tmp = dir.join(format!(
        "{SNAPSHOT_TMP_PREFIX}{}.{}{SNAPSHOT_TMP_SUFFIX}",
        std::process::id(),
        TMP_SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let written = write_snapshot(&tmp, next_log, dump).and_then(|n| {
        before_rename().map_err(|e| io_error(&tmp, io::Error::other(e)))?;
        fs::rename(&tmp, dir.join(SNAPSHOT)).map_err(|e| io_error(&tmp, e))?;
        Ok(n)
    });
    let n = match written {
        Ok(n) => n,
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
    };
    sync_dir(dir);
    for (seq, path) in logs(dir)? {
        if seq < next_log {
            fs::remove_file(&path).map_err(|e| io_error(&path, e))?;
        }
    }
    Ok(n)
}

fn write_snapshot(
    tmp: &Path,
    next_log: u64,
    dump: impl FnOnce(&mut dyn FnMut(&[u8])),
) -> Result<usize, JournalError> {
    let file = private(OpenOptions::new().write(true).create_new(true))
        .open(tmp)
        .map_err(|e| io_error(tmp, e))?;
    let mut out = io::BufWriter::with_capacity(1 << 20, file);
    out.write_all(&frame(&snapshot_header(next_log)))
        .map_err(|e| io_error(tmp, e))?;
    let mut n = 0;
    let mut failed = None;
    dump(&mut |record| {
        if failed.is_none() {
            match out.write_all(&frame(record)) {
                Ok(()) => n += 1,
                Err(e) => failed = Some(e),
            }
        }
    });
    if let Some(e) = failed {
        return Err(io_error(tmp, e));
    }
    let file = out.into_inner().map_err(|e| io_error(tmp, e.error()))?;
    file.sync_all().map_err(|e| io_error(tmp, e))?;
    Ok(n)
}

/// Remove temporary snapshots left by a process that stopped mid-write.
pub fn remove_stale_snapshots(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(SNAPSHOT_TMP_PREFIX) && name.ends_with(SNAPSHOT_TMP_SUFFIX) {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// Create the data directory owner-only (0700); warn when an existing one
/// is readable by others.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        builder.mode(0o700);
        builder.create(dir)?;
        let mode = fs::metadata(dir)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(dir = %dir.display(), mode = format!("{mode:o}"), "the data directory is readable by other users and holds customer data; chmod 700 it");
        }
        Ok(())
    }
    #[cfg(not(unix))]
    builder.create(dir)
}

/// Files of the journal are owner-only (0600) when created.
pub fn private(options: &mut OpenOptions) -> &mut OpenOptions {
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

struct Writer {
    dir: PathBuf,
    file: File,
    seq: u64,
    /// Length of the current log up to the end of its last whole frame.
    good_len: u64,
    failed: Arc<AtomicBool>,
    log_bytes: Arc<AtomicU64>,
    syncs: Arc<AtomicU64>,
}

/// Group commit: take `next` and every command already waiting, up to a
/// rotation (returned: it ends the round) or 8 MB of frames.
fn take_waiting(
    rx: &mpsc::Receiver<Cmd>,
    mut next: Option<Cmd>,
    buf: &mut Vec<u8>,
    waiting: &mut Vec<oneshot::Sender<bool>>,
) -> Option<oneshot::Sender<Result<u64, String>>> {
    while let Some(cmd) = next {
        match cmd {
            Cmd::Frame(f) => buf.extend_from_slice(&f),
            Cmd::Sync(s) => waiting.push(s),
            Cmd::Rotate(r) => return Some(r),
        }
        if buf.len() > 8 << 20 {
            break;
        }
        next = rx.try_recv().ok();
    }
    None
}

impl Writer {
    /// Frames come through `pending`, except those appended before a
    /// rotation, which come with it ([`Journal::rotate`]).
    fn run(mut self, rx: mpsc::Receiver<Cmd>, pending: &parking_lot::Mutex<Vec<u8>>) {
        let mut buf = Vec::with_capacity(1 << 20);
        let mut waiting: Vec<oneshot::Sender<bool>> = Vec::new();
        let mut dirty = false;
        let mut last_sync = std::time::Instant::now();
        let mut pressure = pressure::Pressure::new(last_sync, pressure::read());
        let mut last_round = 0;
        loop {
            let mut rotate = None;
            match rx.recv_timeout(LAZY_SYNC) {
                Ok(first) => rotate = take_waiting(&rx, Some(first), &mut buf, &mut waiting),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    // Quiet: the buffers a spike grew go.
                    if buf.is_empty() && buf.capacity() > 1 << 20 {
                        buf = Vec::with_capacity(1 << 20);
                    }
                    let mut p = pending.lock();
                    if p.is_empty() && p.capacity() > 1 << 20 {
                        *p = Vec::new();
                    }
                    drop(p);
                    crate::memory::collect_if_due();
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    buf.append(&mut pending.lock());
                    self.flush(&mut buf, true);
                    return;
                }
            }
            let now = std::time::Instant::now();
            if pressure.due(now) {
                pressure.update(now, pressure::read());
            }
            // Each fdatasync costs CPU of its own (writeback, the device's
            // notify and flush). While the cores are the bottleneck and
            // many wait at once, a round waits a moment for the syncs that
            // are on their way: fewer, larger rounds leave the cores to
            // the work. Otherwise the wait would only be latency.
            if rotate.is_none()
                && !waiting.is_empty()
                && last_round >= GATHER_FROM
                && pressure.high()
            {
                std::thread::sleep(GATHER);
                rotate = take_waiting(&rx, rx.try_recv().ok(), &mut buf, &mut waiting);
            }
            last_round = waiting.len();
            // Everything appended so far, unless a rotation comes first
            // (then it belongs to the next log: taken on the next round).
            if rotate.is_none() {
                let mut p = pending.lock();
                if buf.is_empty() {
                    std::mem::swap(&mut buf, &mut *p);
                } else {
                    buf.append(&mut p);
                }
            }
            if !buf.is_empty() {
                dirty = true;
            }
            // A sync with nothing written since the last one (a duplicate
            // delivery acknowledged again) has nothing to
            // wait for: everything appended before it is on disk.
            let sync = rotate.is_some()
                || (dirty && (!waiting.is_empty() || last_sync.elapsed() >= LAZY_SYNC));
            let ok = if !buf.is_empty() || sync {
                let ok = self.flush(&mut buf, sync);
                if sync {
                    dirty = false;
                    last_sync = std::time::Instant::now();
                }
                ok
            } else {
                !self.failed.load(Ordering::Acquire)
            };
            for w in waiting.drain(..) {
                let _ = w.send(ok);
            }
            if let Some(r) = rotate {
                let _ = r.send(self.rotate());
            }
        }
    }

    /// Write `buf` and (if `sync`) fdatasync; false on any error.
    fn flush(&mut self, buf: &mut Vec<u8>, sync: bool) -> bool {
        if self.failed.load(Ordering::Acquire) {
            buf.clear();
            return false;
        }
        let result = self.file.write_all(buf).and_then(|()| {
            if sync {
                self.syncs.fetch_add(1, Ordering::Relaxed);
                self.file.sync_data()
            } else {
                Ok(())
            }
        });
        let written = buf.len() as u64;
        buf.clear();
        match result {
            Ok(()) => {
                self.good_len += written;
                self.log_bytes.store(self.good_len, Ordering::Relaxed);
                true
            }
            Err(e) => {
                tracing::error!(dir = %self.dir.display(), error = %e, "journal write failed; the router stops accepting what it cannot record");
                self.failed.store(true, Ordering::Release);
                // Leave no torn frame behind: cut the log back to its last
                // whole frame (what was not synced was not acknowledged).
                let cut = self
                    .file
                    .set_len(self.good_len)
                    .and_then(|()| self.file.sync_all());
                if let Err(e) = cut {
                    tracing::error!(dir = %self.dir.display(), error = %e, "could not cut the journal back to its last whole record; the next start repairs it");
                }
                false
            }
        }
    }

    fn rotate(&mut self) -> Result<u64, String> {
        if self.failed.load(Ordering::Acquire) {
            // The current log holds the last good frames: it must stay the
            // newest, so that a start repairs its tail.
            return Err("the journal failed; no rotation until restart".into());
        }
        let next = self.seq + 1;
        let path = self.dir.join(log_name(next));
        let file = private(OpenOptions::new().create(true).append(true))
            .open(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        self.file = file;
        self.seq = next;
        self.good_len = 0;
        self.log_bytes.store(0, Ordering::Relaxed);
        sync_dir(&self.dir);
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(n: u64) -> Vec<u8> {
        format!("record {n}").into_bytes()
    }

    fn collect(got: &mut Vec<Vec<u8>>) -> impl FnMut(&[u8]) -> Result<(), String> + '_ {
        |p| {
            got.push(p.to_vec());
            Ok(())
        }
    }

    fn ignore(_: &[u8]) -> Result<(), String> {
        Ok(())
    }

    #[test]
    fn the_snapshot_header_reads_back() {
        assert_eq!(parse_snapshot_header(&snapshot_header(42)), Some(42));
        assert_eq!(parse_snapshot_header(b"{\"Seen\":{}}"), None);
    }

    /// Under CPU pressure rounds wait for more syncs to join them: every
    /// sync still answers, after its records, and nothing is lost or
    /// reordered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn gathered_rounds_lose_and_reorder_nothing() {
        pressure::FORCE_HIGH.store(true, Ordering::Relaxed);
        let dir = tempfile::tempdir().unwrap();
        let j = Arc::new(Journal::open(dir.path(), 0).unwrap());
        let tasks: Vec<_> = (0..64u64)
            .map(|t| {
                let j = j.clone();
                tokio::spawn(async move {
                    for n in 0..20u64 {
                        j.append(format!("{t}:{n}").as_bytes());
                        assert!(j.sync().await);
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let mut got = Vec::new();
        let (applied, _) = replay(dir.path(), collect(&mut got)).unwrap();
        assert_eq!(applied, 64 * 20);
        let mut next = vec![0u64; 64];
        for record in got {
            let text = String::from_utf8(record).unwrap();
            let (t, n) = text.split_once(':').unwrap();
            let (t, n): (usize, u64) = (t.parse().unwrap(), n.parse().unwrap());
            assert_eq!(n, next[t], "task {t}'s records in order");
            next[t] += 1;
        }
    }

    #[tokio::test]
    async fn appended_ops_replay_in_order_after_sync() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path(), 0).unwrap();
        for n in 0..100 {
            j.append(&seen(n));
        }
        assert!(j.sync().await);
        let mut got = Vec::new();
        let (applied, next) = replay(dir.path(), collect(&mut got)).unwrap();
        assert_eq!((applied, next), (100, 1));
        assert_eq!(got[99], seen(99));
    }

    /// A sync that finds nothing written since the last one (a duplicate
    /// delivery acknowledged again) answers without an fdatasync.
    #[tokio::test]
    async fn a_sync_with_nothing_new_to_write_costs_no_fdatasync() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path(), 0).unwrap();
        j.append(&seen(1));
        assert!(j.sync().await);
        assert_eq!(j.syncs(), 1);
        assert!(j.sync().await);
        assert!(j.sync().await);
        assert_eq!(j.syncs(), 1, "nothing new: no fdatasync");
        j.append(&seen(2));
        assert!(j.sync().await);
        assert_eq!(j.syncs(), 2);
        let mut got = Vec::new();
        replay(dir.path(), collect(&mut got)).unwrap();
        assert_eq!(got, vec![seen(1), seen(2)]);
    }

    /// An append wakes nobody: with no one waiting for a sync, the writer
    /// still takes it to the disk on its own round (within `LAZY_SYNC`).
    #[tokio::test]
    async fn appends_reach_the_disk_without_a_sync() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path(), 0).unwrap();
        j.append(&seen(1));
        j.append(&seen(2));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while j.log_bytes() == 0 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut got = Vec::new();
        replay(dir.path(), collect(&mut got)).unwrap();
        assert_eq!(got, vec![seen(1), seen(2)]);
    }

    /// Decoded on the reader, applied here in order across batches; a
    /// record the decoder refuses stops the replay at its offset, after
    /// every record before it.
    #[test]
    fn decoded_replay_keeps_the_order_and_stops_at_a_bad_record() {
        let dir = tempfile::tempdir().unwrap();
        let count = REPLAY_BATCH as u64 * 3 + 5;
        let mut log = Vec::new();
        for n in 0..count {
            log.extend(frame(n.to_string().as_bytes()));
        }
        std::fs::write(dir.path().join(log_name(0)), &log).unwrap();
        let decode = |p: &[u8]| -> Result<u64, String> {
            std::str::from_utf8(p)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| format!("not a number: {}", String::from_utf8_lossy(p)))
        };
        let mut got = Vec::new();
        let (applied, next) = replay_decoded(dir.path(), decode, |n| got.push(n)).unwrap();
        assert_eq!((applied, next), (count, 1));
        assert_eq!(got, (0..count).collect::<Vec<_>>());

        let bad_at = log.len() as u64;
        log.extend(frame(b"x"));
        log.extend(frame(b"7"));
        std::fs::write(dir.path().join(log_name(0)), &log).unwrap();
        let mut got = Vec::new();
        let err = replay_decoded(dir.path(), decode, |n| got.push(n)).unwrap_err();
        match err {
            JournalError::Corrupt { offset, reason, .. } => {
                assert_eq!(offset, bad_at);
                assert!(reason.contains("not a number: x"), "{reason}");
            }
            other => panic!("{other}"),
        }
        assert_eq!(got, (0..count).collect::<Vec<_>>());
    }

    /// A write cut short by a power loss: the file grew, its first page
    /// (a whole record and the start of the next) reached the disk, the
    /// pages after it did not and read as zeros. A torn tail, cut at the
    /// last whole record; damage followed by records is still an error.
    #[test]
    fn a_partial_record_followed_by_zeros_is_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(log_name(0));
        let mut bytes: Vec<u8> = (0..5).flat_map(|n| frame(&seen(n))).collect();
        let good = bytes.len() as u64;
        bytes.extend_from_slice(&frame(&seen(5))[..11]);
        bytes.extend_from_slice(&[0u8; 8192]);
        fs::write(&path, &bytes).unwrap();
        let mut got = Vec::new();
        let (applied, next) = replay(dir.path(), collect(&mut got)).unwrap();
        assert_eq!((applied, next), (5, 1));
        assert_eq!(got, (0..5).map(seen).collect::<Vec<_>>());
        assert_eq!(
            fs::metadata(&path).unwrap().len(),
            good,
            "cut at the last record"
        );
        let mut bytes: Vec<u8> = (0..5).flat_map(|n| frame(&seen(n))).collect();
        bytes.extend_from_slice(&frame(&seen(5))[..11]);
        bytes.extend_from_slice(&[0u8; 64]);
        bytes.extend_from_slice(&frame(&seen(6)));
        bytes.extend_from_slice(&[0u8; 64]);
        fs::write(&path, &bytes).unwrap();
        let err = replay(dir.path(), ignore).unwrap_err().to_string();
        assert!(err.contains("corrupt"), "{err}");
    }

    #[tokio::test]
    async fn a_torn_tail_is_cut_and_damage_in_the_middle_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path(), 0).unwrap();
        for n in 0..10 {
            j.append(&seen(n));
        }
        assert!(j.sync().await);
        drop(j);
        let path = dir.path().join(log_name(0));
        let mut bytes = fs::read(&path).unwrap();
        let full = bytes.len();
        bytes.truncate(full - 3);
        fs::write(&path, &bytes).unwrap();
        let (applied, _) = replay(dir.path(), ignore).unwrap();
        assert_eq!(applied, 9, "the torn last record is dropped");
        let mut bytes = fs::read(&path).unwrap();
        bytes[20] ^= 0xff;
        fs::write(&path, &bytes).unwrap();
        let err = replay(dir.path(), ignore).unwrap_err().to_string();
        assert!(
            err.contains("wal-00000000.log") && err.contains("corrupt"),
            "{err}"
        );
    }

    #[test]
    fn a_truncated_snapshot_is_an_error_not_a_warning() {
        let dir = tempfile::tempdir().unwrap();
        install_snapshot(dir.path(), 0, (0..10).map(seen)).unwrap();
        let path = dir.path().join(SNAPSHOT);
        let bytes = fs::read(&path).unwrap();
        fs::write(&path, &bytes[..bytes.len() - 5]).unwrap();
        let err = replay(dir.path(), ignore).unwrap_err().to_string();
        assert!(
            err.contains("snapshot.log") && err.contains("truncated"),
            "{err}"
        );
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn a_full_disk_fails_syncs_and_marks_the_journal_failed() {
        let dir = tempfile::tempdir().unwrap();
        // Writes to /dev/full fail with ENOSPC, like a full disk.
        std::os::unix::fs::symlink("/dev/full", dir.path().join(log_name(0))).unwrap();
        let j = Journal::open(dir.path(), 0).unwrap();
        j.append(&seen(1));
        assert!(!j.sync().await, "a failed write must not be acknowledged");
        assert!(j.has_failed());
        assert!(!j.sync().await, "and nothing after it either");
    }

    #[tokio::test]
    async fn snapshots_replace_the_logs_they_cover() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path(), 0).unwrap();
        for n in 0..5 {
            j.append(&seen(n));
        }
        let next = j.rotate().await.unwrap();
        j.append(&seen(5));
        assert!(j.sync().await);
        install_snapshot(dir.path(), next, (0..5).map(seen)).unwrap();
        assert!(!dir.path().join(log_name(0)).exists());
        let mut got = Vec::new();
        replay(dir.path(), collect(&mut got)).unwrap();
        assert_eq!(got, (0..6).map(seen).collect::<Vec<_>>());
    }

    async fn log_of(dir: &Path, n: u64) -> PathBuf {
        let j = Journal::open(dir, 0).unwrap();
        for i in 0..n {
            j.append(&seen(i));
        }
        assert!(j.sync().await);
        dir.join(log_name(0))
    }

    #[tokio::test]
    async fn a_zero_filled_tail_is_torn_not_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = log_of(dir.path(), 5).await;
        let good = fs::metadata(&path).unwrap().len();
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[0u8; 4096]).unwrap();
        drop(f);
        let (applied, _) = replay(dir.path(), ignore).unwrap();
        assert_eq!(applied, 5);
        assert_eq!(
            fs::metadata(&path).unwrap().len(),
            good,
            "the zeros are cut"
        );
    }

    #[tokio::test]
    async fn an_empty_frame_followed_by_data_is_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let path = log_of(dir.path(), 2).await;
        let mut bytes = fs::read(&path).unwrap();
        let mut tail = vec![0u8; 8];
        tail.extend_from_slice(&frame(&seen(9)));
        bytes.extend_from_slice(&tail);
        fs::write(&path, &bytes).unwrap();
        let err = replay(dir.path(), ignore).unwrap_err().to_string();
        assert!(err.contains("empty record"), "{err}");
    }

    #[tokio::test]
    async fn a_torn_log_followed_only_by_empty_logs_is_repaired() {
        let dir = tempfile::tempdir().unwrap();
        let path = log_of(dir.path(), 4).await;
        let mut bytes = fs::read(&path).unwrap();
        bytes.truncate(bytes.len() - 2);
        fs::write(&path, &bytes).unwrap();
        // A rotation after the failed write left an empty newer log.
        fs::write(dir.path().join(log_name(1)), b"").unwrap();
        let (applied, next) = replay(dir.path(), ignore).unwrap();
        assert_eq!((applied, next), (3, 2));
        // An older log that is torn under a newer one holding data is not.
        fs::write(&path, &bytes[..bytes.len() - 2]).unwrap();
        fs::write(dir.path().join(log_name(1)), frame(&seen(7))).unwrap();
        assert!(replay(dir.path(), ignore).is_err());
    }

    #[test]
    fn concurrent_snapshots_do_not_share_a_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        std::thread::scope(|scope| {
            let workers: Vec<_> = (0..4)
                .map(|_| {
                    scope.spawn(|| {
                        for _ in 0..25 {
                            install_snapshot(dir.path(), 0, (0..200).map(seen)).unwrap();
                        }
                    })
                })
                .collect();
            for w in workers {
                w.join().unwrap();
            }
        });
        let (applied, _) = replay(dir.path(), ignore).unwrap();
        assert_eq!(applied, 201, "the marker and 200 ops");
        let left: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from(SNAPSHOT)]);
    }

    #[tokio::test]
    async fn no_rotation_after_a_failed_write() {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/dev/full", dir.path().join(log_name(0))).unwrap();
        let j = Journal::open(dir.path(), 0).unwrap();
        j.append(&seen(1));
        assert!(!j.sync().await);
        assert!(j.rotate().await.is_err());
        assert!(!dir.path().join(log_name(1)).exists());
    }
}
