//! The durable journal under [`crate::state`] (SPEC §9).
//!
//! Format: append-only log files `wal-NNNNNNNN.log` in `data_dir`, each a
//! sequence of frames `[len: u32 LE][crc32: u32 LE][JSON op]`, plus a
//! `snapshot.log` in the same framing. Every op is an upsert of a whole
//! object (a window, a conversation, an outbound record …), so replaying an
//! op twice is harmless.
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
//! snapshot taken after a rotation holds everything in the older logs.

pub mod ops;

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use tokio::sync::oneshot;

pub use ops::Op;

const SNAPSHOT: &str = "snapshot.log";
const SNAPSHOT_TMP: &str = "snapshot.tmp";
/// Ops without a waiting ack still reach the disk within this.
const LAZY_SYNC: Duration = Duration::from_millis(50);
/// Largest frame accepted on replay (a bigger length is corruption).
const MAX_FRAME: usize = 64 * 1024 * 1024;

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

enum Cmd {
    Frame(Vec<u8>),
    Sync(oneshot::Sender<bool>),
    Rotate(oneshot::Sender<Result<u64, String>>),
}

/// Handle to the journal; cheap to clone. Disabled in memory mode.
#[derive(Clone)]
pub struct Journal {
    tx: Option<mpsc::Sender<Cmd>>,
    failed: Arc<AtomicBool>,
    log_bytes: Arc<AtomicU64>,
    dir: Option<PathBuf>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Journal({:?})", self.dir)
    }
}

/// Encode one op as a frame.
pub fn frame(op: &Op) -> Vec<u8> {
    let payload = serde_json::to_vec(op).expect("ops serialize");
    let mut out = Vec::with_capacity(payload.len() + 8);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    out
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

/// Read every frame of `path`. A torn frame at the very end (a crash
/// mid-write) is cut off and the file truncated there when `repair` (the
/// newest log); without `repair` it is corruption, and so is damage
/// followed by more data.
pub fn read_frames(
    path: &Path,
    repair: bool,
    mut each: impl FnMut(Op),
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
        if size > MAX_FRAME {
            return if offset + 8 + size as u64 > len {
                torn(path, offset, len, repair, count)
            } else {
                Err(corrupt(offset, "frame too large"))
            };
        }
        let mut payload = vec![0u8; size];
        match read_full(&mut r, &mut payload) {
            Ok(n) if n == size => {}
            Ok(_) => return torn(path, offset, len, repair, count),
            Err(e) => return Err(io_error(path, e)),
        }
        if crc32fast::hash(&payload) != crc {
            // The last frame may be torn; anywhere else it is damage.
            return if offset + 8 + size as u64 >= len {
                torn(path, offset, len, repair, count)
            } else {
                Err(corrupt(offset, "checksum mismatch"))
            };
        }
        let op: Op = serde_json::from_slice(&payload)
            .map_err(|e| corrupt(offset, &format!("unreadable record: {e}")))?;
        each(op);
        count += 1;
        offset += 8 + size as u64;
    }
    Ok(count)
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
    tracing::warn!(file = %path.display(), offset, dropped_bytes = len - offset, "journal ends in a torn record (crash mid-write); it is cut off");
    if repair {
        let f = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| io_error(path, e))?;
        f.set_len(offset).map_err(|e| io_error(path, e))?;
        f.sync_all().map_err(|e| io_error(path, e))?;
    }
    Ok(count)
}

/// Take the exclusive lock of `dir` (file `LOCK`): one router per data_dir.
/// The lock lasts as long as the returned file is open.
pub fn lock(dir: &Path) -> Result<File, JournalError> {
    let path = dir.join("LOCK");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
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

/// Replay `dir`: the snapshot, then every log after it, in order.
/// Returns the number of ops applied and the next log sequence number.
pub fn replay(dir: &Path, mut apply: impl FnMut(Op)) -> Result<(u64, u64), JournalError> {
    let mut applied = 0;
    let mut from_seq = 0;
    let snapshot = dir.join(SNAPSHOT);
    if snapshot.exists() {
        applied += read_frames(&snapshot, false, |op| {
            if let Op::SnapshotOf { next_log } = op {
                from_seq = next_log;
            } else {
                apply(op);
            }
        })?;
    }
    let mut next = from_seq;
    let files = logs(dir)?;
    let last = files.last().map(|(s, _)| *s);
    for (seq, path) in files {
        if seq < from_seq {
            continue;
        }
        // Only the newest log can end torn; older ones were closed cleanly.
        applied += read_frames(&path, Some(seq) == last, &mut apply)?;
        next = seq + 1;
    }
    Ok((applied, next))
}

impl Journal {
    /// Memory mode: appends are dropped, syncs succeed at once.
    pub fn disabled() -> Self {
        Journal {
            tx: None,
            failed: Arc::new(AtomicBool::new(false)),
            log_bytes: Arc::new(AtomicU64::new(0)),
            dir: None,
        }
    }

    /// Open the journal in `dir` for appending, starting log `next_seq`.
    pub fn open(dir: &Path, next_seq: u64) -> Result<Self, JournalError> {
        let path = dir.join(log_name(next_seq));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| io_error(&path, e))?;
        sync_dir(dir);
        let (tx, rx) = mpsc::channel();
        let failed = Arc::new(AtomicBool::new(false));
        let log_bytes = Arc::new(AtomicU64::new(
            file.metadata().map(|m| m.len()).unwrap_or(0),
        ));
        let writer = Writer {
            dir: dir.to_path_buf(),
            file,
            seq: next_seq,
            failed: failed.clone(),
            log_bytes: log_bytes.clone(),
        };
        std::thread::Builder::new()
            .name("wa-router-journal".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| io_error(dir, e))?;
        Ok(Journal {
            tx: Some(tx),
            failed,
            log_bytes,
            dir: Some(dir.to_path_buf()),
        })
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

    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// Append one op (never blocks).
    pub fn append(&self, op: &Op) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Cmd::Frame(frame(op)));
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
        tx.send(Cmd::Rotate(done))
            .map_err(|_| "journal writer stopped".to_string())?;
        wait.await
            .map_err(|_| "journal writer stopped".to_string())?
    }
}

/// Write a snapshot of `ops` covering every log before `next_log`, then
/// delete those logs. Blocking: call from a blocking thread.
pub fn install_snapshot(
    dir: &Path,
    next_log: u64,
    ops: impl Iterator<Item = Op>,
) -> Result<usize, JournalError> {
    let tmp = dir.join(SNAPSHOT_TMP);
    let mut out =
        io::BufWriter::with_capacity(1 << 20, File::create(&tmp).map_err(|e| io_error(&tmp, e))?);
    out.write_all(&frame(&Op::SnapshotOf { next_log }))
        .map_err(|e| io_error(&tmp, e))?;
    let mut n = 0;
    for op in ops {
        out.write_all(&frame(&op)).map_err(|e| io_error(&tmp, e))?;
        n += 1;
    }
    let file = out.into_inner().map_err(|e| io_error(&tmp, e.error()))?;
    file.sync_all().map_err(|e| io_error(&tmp, e))?;
    fs::rename(&tmp, dir.join(SNAPSHOT)).map_err(|e| io_error(&tmp, e))?;
    sync_dir(dir);
    for (seq, path) in logs(dir)? {
        if seq < next_log {
            fs::remove_file(&path).map_err(|e| io_error(&path, e))?;
        }
    }
    Ok(n)
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
    failed: Arc<AtomicBool>,
    log_bytes: Arc<AtomicU64>,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Cmd>) {
        let mut buf = Vec::with_capacity(1 << 20);
        let mut waiting: Vec<oneshot::Sender<bool>> = Vec::new();
        let mut dirty = false;
        let mut last_sync = std::time::Instant::now();
        loop {
            let mut rotate = None;
            match rx.recv_timeout(LAZY_SYNC) {
                Ok(first) => {
                    // Group commit: take everything that is waiting.
                    let mut next = Some(first);
                    while let Some(cmd) = next {
                        match cmd {
                            Cmd::Frame(f) => buf.extend_from_slice(&f),
                            Cmd::Sync(s) => waiting.push(s),
                            Cmd::Rotate(r) => {
                                rotate = Some(r);
                                break;
                            }
                        }
                        if buf.len() > 8 << 20 {
                            break;
                        }
                        next = rx.try_recv().ok();
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    self.flush(&mut buf, true);
                    return;
                }
            }
            if !buf.is_empty() {
                dirty = true;
            }
            let sync = !waiting.is_empty()
                || rotate.is_some()
                || (dirty && last_sync.elapsed() >= LAZY_SYNC);
            if !buf.is_empty() || sync {
                let ok = self.flush(&mut buf, sync);
                if sync {
                    dirty = false;
                    last_sync = std::time::Instant::now();
                }
                for w in waiting.drain(..) {
                    let _ = w.send(ok);
                }
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
        let result = self
            .file
            .write_all(buf)
            .and_then(|()| if sync { self.file.sync_data() } else { Ok(()) });
        self.log_bytes
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        buf.clear();
        match result {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(dir = %self.dir.display(), error = %e, "journal write failed; the router stops accepting what it cannot record");
                self.failed.store(true, Ordering::Release);
                false
            }
        }
    }

    fn rotate(&mut self) -> Result<u64, String> {
        let next = self.seq + 1;
        let path = self.dir.join(log_name(next));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        self.file = file;
        self.seq = next;
        self.log_bytes.store(0, Ordering::Relaxed);
        sync_dir(&self.dir);
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(n: u64) -> Op {
        Op::Seen {
            wamid: format!("wamid.{n}"),
            at: n as i64,
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
        let (applied, next) = replay(dir.path(), |op| got.push(op)).unwrap();
        assert_eq!((applied, next), (100, 1));
        assert_eq!(format!("{:?}", got[99]), format!("{:?}", seen(99)));
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
        let (applied, _) = replay(dir.path(), |_| {}).unwrap();
        assert_eq!(applied, 9, "the torn last record is dropped");
        let mut bytes = fs::read(&path).unwrap();
        bytes[20] ^= 0xff;
        fs::write(&path, &bytes).unwrap();
        let err = replay(dir.path(), |_| {}).unwrap_err().to_string();
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
        let err = replay(dir.path(), |_| {}).unwrap_err().to_string();
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
        replay(dir.path(), |op| got.push(op)).unwrap();
        assert_eq!(
            format!("{got:?}"),
            format!("{:?}", (0..6).map(seen).collect::<Vec<_>>())
        );
    }
}
