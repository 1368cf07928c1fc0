//! STORAGE: cold storage for what is finished — outbound records that left
//! the queue and conversation history — so that memory follows live work,
//! not history (issue #9.3). One SQLite database (WAL) per router:
//! `archive.sqlite3` in `data_dir`; in memory mode a file in a private
//! temporary directory, removed when the router stops.
//!
//! Write-behind: the stores hand rows to [`Archive::put_record`] /
//! [`Archive::put_history`]; one writer thread commits them in batches and
//! then calls the store's hook, which drops its in-memory copy if it did
//! not change meanwhile. A row is therefore always in memory or committed
//! here (or both, memory being newer): readers merge and never wait for the
//! writer. The journal stays the source of truth for everything after the
//! last snapshot; [`Archive::sync`] makes the archive durable before a
//! snapshot drops the logs that hold it.
//!
//! This module knows no record type: rows carry their JSON body and the few
//! columns it is searched by.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, TryRecvError, channel};
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;
use rusqlite::{Connection, OptionalExtension, params_from_iter};

// Indexes are few on purpose: each costs the writer on every row. Listing
// walks the primary key (ids sort by time) newest first and filters;
// `recipient` is the one selective filter, `wamid` serves late statuses.
// History rows are appended (rowid) and found through a narrow index, so
// the pages a batch dirties at random are index pages, not whole rows.
// Pruning scans (once an hour).

/// The archive's file name in `data_dir`.
pub const FILE: &str = "archive.sqlite3";
/// The page size of a new archive.
const PAGE_BYTES: i64 = 16_384;
/// Rows committed in one transaction at most.
const BATCH: usize = 32_768;
/// Rows waiting for the writer past which webhooks and API sends wait
/// (up to 5 s): finished work slows intake down instead of piling up in
/// memory (≈ 1 KB a row: some 32 MB).
pub const MAX_BACKLOG_ROWS: u64 = 32_768;
/// How long the writer gathers rows before it commits them.
const GATHER: std::time::Duration = std::time::Duration::from_millis(100);
/// How long the writer sleeps between looks at its queue while gathering.
const NAP: std::time::Duration = std::time::Duration::from_millis(2);
/// How long the writer waits idle before it gives its page cache back.
const IDLE: std::time::Duration = std::time::Duration::from_secs(1);

/// An outbound record as the archive keeps it.
#[derive(Debug, Clone)]
pub struct RecordRow {
    pub id: String,
    pub account: String,
    pub to: String,
    pub status: &'static str,
    pub wamid: Option<String>,
    pub created_at: i64,
    pub tags: Vec<String>,
    /// The record's JSON.
    pub body: Vec<u8>,
    /// The in-memory version that was written; handed back to the hook.
    pub version: u32,
}

/// One history entry of a conversation.
#[derive(Debug, Clone)]
pub struct HistoryRow {
    pub account: String,
    pub contact: String,
    pub seq: u64,
    pub at: i64,
    /// The entry's JSON.
    pub body: Vec<u8>,
}

/// Filters of a record listing (all optional).
#[derive(Debug, Clone, Default)]
pub struct RecordQuery<'a> {
    pub account: Option<&'a str>,
    pub to: Option<&'a str>,
    pub status: Option<&'a str>,
    pub tag: Option<&'a str>,
    /// Only ids below this one (the previous page's last).
    pub before: Option<&'a str>,
    pub limit: usize,
}

type RecordHook = Box<dyn Fn(&[(String, u32)], bool) + Send + Sync>;
type HistoryHook = Box<dyn Fn(&[(String, String, u64)]) + Send + Sync>;

#[derive(Default)]
struct Hooks {
    records: OnceLock<RecordHook>,
    history: OnceLock<HistoryHook>,
}

enum Cmd {
    Record(RecordRow),
    History(HistoryRow),
    /// Records with ids below the first, history entries before the time.
    Prune(String, i64, tokio::sync::oneshot::Sender<usize>),
    /// Delete the oldest `n` records of an account (`max_records`).
    Evict(String, usize),
    Sync(tokio::sync::oneshot::Sender<Result<(), String>>),
}

/// The archive (see the module documentation).
pub struct Archive {
    read: Arc<Mutex<Connection>>,
    tx: Mutex<Option<Sender<Cmd>>>,
    hooks: Arc<Hooks>,
    /// Rows handed over and not yet committed.
    backlog: Arc<AtomicU64>,
    failed: Arc<AtomicBool>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Memory mode: the temporary directory to remove.
    temp: Option<PathBuf>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS records (
    id TEXT PRIMARY KEY,
    account TEXT NOT NULL,
    recipient TEXT NOT NULL,
    status TEXT NOT NULL,
    wamid TEXT,
    created_at INTEGER NOT NULL,
    tags TEXT NOT NULL,
    body BLOB NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS records_wamid ON records(wamid) WHERE wamid IS NOT NULL;
CREATE INDEX IF NOT EXISTS records_recipient ON records(recipient, id);
CREATE TABLE IF NOT EXISTS history (
    n INTEGER PRIMARY KEY,
    account TEXT NOT NULL,
    contact TEXT NOT NULL,
    seq INTEGER NOT NULL,
    at INTEGER NOT NULL,
    body BLOB NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS history_conversation ON history(account, contact, seq);
";

fn open_conn(path: &Path, durable: bool) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    // 16 KiB pages (a new archive only: an existing one keeps its size):
    // the random-key indexes dirty a page per row once they outgrow a
    // batch, and a commit writes each dirty page once, so four times the
    // rows a page cost the writer a third to a half less a message
    // (`cargo bench --bench archive`, BENCHMARKS.md).
    conn.pragma_update(None, "page_size", PAGE_BYTES)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // Commits need no fsync: the journal holds everything until `sync`.
    // Memory mode: nothing survives a stop anyway.
    conn.pragma_update(None, "synchronous", if durable { "NORMAL" } else { "OFF" })?;
    // 64 MiB of page cache: the index pages a batch touches stay in it
    // (given back after an idle second, see `write_loop`).
    conn.pragma_update(None, "cache_size", -65536)?;
    // Memory mode: checkpoint every 16 MiB of WAL rather than 4 (a page
    // changed by many commits is copied into the database once). Durable:
    // SQLite's 4 MiB. A checkpoint fsyncs the WAL and the database, and
    // the journal's fdatasync, which every ack waits for, queues behind
    // that on the disk: at 16 MiB a checkpoint held acks for 30-70 ms
    // (ack p99 28-39 ms at 2,000 webhooks/s), at 4 MiB 10-20 ms (p99
    // 15-17 ms), for about a fifth more bytes written.
    conn.pragma_update(
        None,
        "wal_autocheckpoint",
        (if durable { 4 } else { 16 } << 20) / PAGE_BYTES,
    )?;
    Ok(conn)
}

impl Archive {
    /// Open (or create) the archive in `dir`; `None`: memory mode, a file
    /// in a private temporary directory removed on drop.
    pub fn open(dir: Option<&Path>) -> Result<Self, String> {
        let (path, temp) = match dir {
            Some(d) => (d.join(FILE), None),
            None => {
                remove_orphaned_temp_dirs();
                let t = std::env::temp_dir().join(format!(
                    "wa-router-{}-{:016x}",
                    std::process::id(),
                    fastrand::u64(..)
                ));
                crate::journal::create_private_dir(&t)
                    .map_err(|e| format!("{}: {e}", t.display()))?;
                (t.join(FILE), Some(t))
            }
        };
        // Owner-only like the journal; SQLite gives its -wal and -shm
        // files the mode of the database file.
        crate::journal::private(std::fs::OpenOptions::new().create(true).append(true))
            .open(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let err = |e: rusqlite::Error| format!("{}: {e}", path.display());
        let durable = temp.is_none();
        let write = open_conn(&path, durable).map_err(err)?;
        write.execute_batch(SCHEMA).map_err(err)?;
        let read = Arc::new(Mutex::new(open_conn(&path, durable).map_err(err)?));
        let (tx, rx) = channel();
        let hooks = Arc::new(Hooks::default());
        let backlog = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicBool::new(false));
        let writer = {
            let (hooks, backlog, failed) = (hooks.clone(), backlog.clone(), failed.clone());
            let read = read.clone();
            std::thread::Builder::new()
                .name("archive".into())
                .spawn(move || write_loop(write, &read, rx, &hooks, &backlog, &failed, durable))
                .map_err(|e| e.to_string())?
        };
        Ok(Archive {
            read,
            tx: Mutex::new(Some(tx)),
            hooks,
            backlog,
            failed,
            writer: Mutex::new(Some(writer)),
            temp,
        })
    }

    /// Called after each commit with the `(id, version)` of the records it
    /// committed (and `false`), and after each idle second with none (and
    /// `true`).
    pub fn on_records_committed(
        &self,
        hook: impl Fn(&[(String, u32)], bool) + Send + Sync + 'static,
    ) {
        let _ = self.hooks.records.set(Box::new(hook));
    }

    /// Called with `(account, contact, seq)` of history entries once committed.
    pub fn on_history_committed(
        &self,
        hook: impl Fn(&[(String, String, u64)]) + Send + Sync + 'static,
    ) {
        let _ = self.hooks.history.set(Box::new(hook));
    }

    fn send(&self, cmd: Cmd) -> bool {
        match &*self.tx.lock() {
            Some(tx) => tx.send(cmd).is_ok(),
            None => false,
        }
    }

    /// Hand a record over (insert or replace).
    pub fn put_record(&self, row: RecordRow) {
        self.backlog.fetch_add(1, Ordering::Relaxed);
        if !self.send(Cmd::Record(row)) {
            self.backlog.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Hand a history entry over (insert or replace).
    pub fn put_history(&self, row: HistoryRow) {
        self.backlog.fetch_add(1, Ordering::Relaxed);
        if !self.send(Cmd::History(row)) {
            self.backlog.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Rows handed over and not yet committed.
    pub fn backlog(&self) -> u64 {
        self.backlog.load(Ordering::Relaxed)
    }

    /// Wait, at most `limit`, while more than `max_rows` rows wait for the
    /// writer: what adds finished work slows down to what the archive
    /// takes, instead of piling it up in memory. Whether it waited.
    pub async fn keep_up(&self, max_rows: u64, limit: std::time::Duration) -> bool {
        crate::domain::wait_while(limit, || self.backlog() > max_rows).await
    }

    /// Whether a commit failed (rows then stay in memory).
    pub fn has_failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }

    /// Commit everything handed over so far and make it durable.
    pub async fn sync(&self) -> Result<(), String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if !self.send(Cmd::Sync(tx)) {
            return Err("the archive is closed".into());
        }
        rx.await
            .map_err(|_| "the archive writer stopped".to_string())?
    }

    /// [`Archive::sync`] from a blocking thread.
    pub fn sync_blocking(&self) -> Result<(), String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if !self.send(Cmd::Sync(tx)) {
            return Err("the archive is closed".into());
        }
        rx.blocking_recv()
            .map_err(|_| "the archive writer stopped".to_string())?
    }

    /// Delete records whose id sorts below `ids_below` (ids sort by
    /// creation time) and history entries older than `cutoff` (ms);
    /// returns how many rows.
    pub async fn prune(&self, ids_below: &str, cutoff: i64) -> usize {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if !self.send(Cmd::Prune(ids_below.to_string(), cutoff, tx)) {
            return 0;
        }
        rx.await.unwrap_or(0)
    }

    /// Delete the oldest `n` records of `account` (soon: the writer does
    /// it in its next batch).
    pub fn evict_oldest(&self, account: &str, n: usize) {
        self.send(Cmd::Evict(account.to_string(), n));
    }

    /// Records per account.
    pub fn counts_by_account(&self) -> Vec<(String, u64)> {
        let conn = self.read.lock();
        let result = conn
            .prepare("SELECT account, count(*) FROM records GROUP BY account")
            .and_then(|mut s| {
                s.query_map([], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()
            });
        result.unwrap_or_default()
    }

    /// The body of record `id`.
    pub fn record(&self, id: &str) -> Option<Vec<u8>> {
        self.query_one("SELECT body FROM records WHERE id = ?1", id)
    }

    /// The body of the record sent as `wamid`.
    pub fn record_by_wamid(&self, wamid: &str) -> Option<Vec<u8>> {
        self.query_one("SELECT body FROM records WHERE wamid = ?1", wamid)
    }

    fn query_one(&self, sql: &str, key: &str) -> Option<Vec<u8>> {
        let conn = self.read.lock();
        let result = conn
            .prepare_cached(sql)
            .and_then(|mut s| s.query_row([key], |r| r.get::<_, Vec<u8>>(0)).optional());
        match result {
            Ok(found) => found,
            Err(e) => {
                tracing::error!(error = %e, "archive read failed");
                None
            }
        }
    }

    /// Record bodies matching `q`, newest (highest id) first.
    pub fn records(&self, q: &RecordQuery<'_>) -> Vec<Vec<u8>> {
        let mut sql = String::from("SELECT body FROM records WHERE 1=1");
        let mut args: Vec<&str> = Vec::new();
        for (value, clause) in [
            (q.account, " AND account = ?"),
            (q.to, " AND recipient = ?"),
            (q.status, " AND status = ?"),
            (
                q.tag,
                " AND EXISTS (SELECT 1 FROM json_each(records.tags) WHERE value = ?)",
            ),
            (q.before, " AND id < ?"),
        ] {
            if let Some(v) = value {
                sql.push_str(clause);
                args.push(v);
            }
        }
        sql.push_str(&format!(" ORDER BY id DESC LIMIT {}", q.limit));
        let conn = self.read.lock();
        let result = conn.prepare_cached(&sql).and_then(|mut s| {
            s.query_map(params_from_iter(args), |r| r.get::<_, Vec<u8>>(0))?
                .collect::<rusqlite::Result<Vec<_>>>()
        });
        result.unwrap_or_else(|e| {
            tracing::error!(error = %e, "archive read failed");
            Vec::new()
        })
    }

    /// The last `limit` history entries of a conversation: `(seq, body)`,
    /// oldest first.
    pub fn history(&self, account: &str, contact: &str, limit: usize) -> Vec<(u64, Vec<u8>)> {
        let conn = self.read.lock();
        let result = conn
            .prepare_cached(
                "SELECT seq, body FROM history WHERE account = ?1 AND contact = ?2 \
                 ORDER BY seq DESC LIMIT ?3",
            )
            .and_then(|mut s| {
                s.query_map(rusqlite::params![account, contact, limit as i64], |r| {
                    Ok((r.get::<_, i64>(0)? as u64, r.get::<_, Vec<u8>>(1)?))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()
            });
        let mut rows = result.unwrap_or_else(|e| {
            tracing::error!(error = %e, "archive read failed");
            Vec::new()
        });
        rows.reverse();
        rows
    }

    /// Rows in the archive: (records, history entries).
    pub fn counts(&self) -> (u64, u64) {
        let conn = self.read.lock();
        let count = |table: &str| {
            conn.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| {
                r.get::<_, i64>(0)
            })
            .unwrap_or(0) as u64
        };
        (count("records"), count("history"))
    }

    /// Stop the writer after it committed everything handed over.
    pub fn close(&self) {
        self.tx.lock().take();
        if let Some(w) = self.writer.lock().take() {
            let _ = w.join();
        }
    }
}

/// Memory mode's temporary archives of routers that are gone (killed
/// before they could remove theirs): `wa-router-PID-…` whose PID no longer
/// runs (Linux: no `/proc/PID`).
fn remove_orphaned_temp_dirs() {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("wa-router-"))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() && e.path().join(FILE).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

impl Drop for Archive {
    fn drop(&mut self) {
        self.close();
        if let Some(t) = &self.temp {
            let _ = std::fs::remove_dir_all(t);
        }
    }
}

/// The writer thread: batches of commands, one transaction each, then the
/// hooks. A failed commit leaves the rows in memory (nothing is lost; the
/// journal still has them) and fails `sync`, so no snapshot drops them.
fn write_loop(
    mut conn: Connection,
    read: &Mutex<Connection>,
    rx: Receiver<Cmd>,
    hooks: &Hooks,
    backlog: &AtomicU64,
    failed: &AtomicBool,
    durable: bool,
) {
    let mut cached = false;
    loop {
        // Idle for a second after writing: give the page cache back (up to
        // 64 MiB each for this connection and the reader's); a later batch
        // reads the pages it needs again.
        let first = match rx.recv_timeout(IDLE) {
            Ok(c) => c,
            Err(RecvTimeoutError::Timeout) => {
                // Idle: the store writes the records that wait.
                if let Some(hook) = hooks.records.get() {
                    hook(&[], true);
                }
                crate::memory::collect_if_due();
                if std::mem::take(&mut cached) {
                    let _ = conn.release_memory();
                    if let Some(r) = read.try_lock() {
                        let _ = r.release_memory();
                    }
                    crate::memory::trim_system_heap();
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        };
        cached = true;
        // Gather for up to GATHER (or BATCH rows, or until someone waits
        // for a sync): a commit rewrites every page it touched, so few
        // large transactions cost the writer far less than many small ones.
        let until = std::time::Instant::now() + GATHER;
        let urgent = |c: &Cmd| matches!(c, Cmd::Sync(_) | Cmd::Prune(..) | Cmd::Evict(..));
        let mut waiting = urgent(&first);
        let mut batch = vec![first];
        while batch.len() < BATCH && !waiting {
            match rx.try_recv() {
                Ok(c) => {
                    waiting = urgent(&c);
                    batch.push(c);
                }
                Err(TryRecvError::Empty) => {
                    let left = until.saturating_duration_since(std::time::Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    // Nap rather than block in `recv`: a receiver blocked
                    // there is woken by every row sent, a system call on
                    // both sides (perf: 6 % of the router's CPU under load).
                    std::thread::sleep(left.min(NAP));
                }
                Err(TryRecvError::Disconnected) => break,
            }
        }
        let rows = batch
            .iter()
            .filter(|c| matches!(c, Cmd::Record(_) | Cmd::History(_)))
            .count() as u64;
        let sync = durable && batch.iter().any(|c| matches!(c, Cmd::Sync(_)));
        let mut pruned = 0usize;
        let result = commit(&mut conn, &batch, sync, &mut pruned);
        backlog.fetch_sub(rows, Ordering::Relaxed);
        if let Err(e) = &result {
            failed.store(true, Ordering::Relaxed);
            tracing::error!(error = %e, "archive commit failed; finished data stays in memory");
        } else {
            let mut records = Vec::new();
            let mut history = Vec::new();
            for c in &batch {
                match c {
                    Cmd::Record(r) => records.push((r.id.clone(), r.version)),
                    Cmd::History(h) => history.push((h.account.clone(), h.contact.clone(), h.seq)),
                    _ => {}
                }
            }
            // Even with no record in it: the store writes the records that
            // came due meanwhile.
            if let Some(hook) = hooks.records.get() {
                hook(&records, false);
            }
            if let (Some(hook), false) = (hooks.history.get(), history.is_empty()) {
                hook(&history);
            }
        }
        for c in batch {
            match c {
                Cmd::Sync(tx) => {
                    let _ = tx.send(result.clone());
                }
                Cmd::Prune(_, _, tx) => {
                    let _ = tx.send(pruned);
                }
                _ => {}
            }
        }
    }
}

fn commit(
    conn: &mut Connection,
    batch: &[Cmd],
    durable: bool,
    pruned: &mut usize,
) -> Result<(), String> {
    let e = |e: rusqlite::Error| e.to_string();
    if durable {
        // This commit's fsync makes every earlier one durable too.
        conn.pragma_update(None, "synchronous", "FULL").map_err(e)?;
    }
    let txn = conn.transaction().map_err(e)?;
    {
        let mut put_record = txn
            .prepare_cached(
                "INSERT OR REPLACE INTO records \
                 (id, account, recipient, status, wamid, created_at, tags, body) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )
            .map_err(e)?;
        let mut put_history = txn
            .prepare_cached(
                "INSERT OR REPLACE INTO history (account, contact, seq, at, body) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .map_err(e)?;
        for c in batch {
            match c {
                Cmd::Record(r) => {
                    let tags = serde_json::to_string(&r.tags).unwrap_or_else(|_| "[]".into());
                    put_record
                        .execute(rusqlite::params![
                            r.id,
                            r.account,
                            r.to,
                            r.status,
                            r.wamid,
                            r.created_at,
                            tags,
                            r.body
                        ])
                        .map_err(e)?;
                }
                Cmd::History(h) => {
                    put_history
                        .execute(rusqlite::params![
                            h.account,
                            h.contact,
                            h.seq as i64,
                            h.at,
                            h.body
                        ])
                        .map_err(e)?;
                }
                Cmd::Prune(below, cutoff, _) => {
                    *pruned += txn
                        .execute("DELETE FROM records WHERE id < ?1", [below])
                        .map_err(e)?;
                    *pruned += txn
                        .execute("DELETE FROM history WHERE at < ?1", [cutoff])
                        .map_err(e)?;
                }
                Cmd::Evict(account, n) => {
                    txn.execute(
                        "DELETE FROM records WHERE id IN \
                         (SELECT id FROM records WHERE account = ?1 ORDER BY id LIMIT ?2)",
                        rusqlite::params![account, *n as i64],
                    )
                    .map_err(e)?;
                }
                Cmd::Sync(_) => {}
            }
        }
    }
    txn.commit().map_err(e)?;
    if durable {
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(e)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, account: &str, status: &'static str, tags: &[&str]) -> RecordRow {
        RecordRow {
            id: id.into(),
            account: account.into(),
            to: "1".into(),
            status,
            wamid: Some(format!("wamid.{id}")),
            created_at: 100,
            tags: tags.iter().map(|t| t.to_string()).collect(),
            body: id.as_bytes().to_vec(),
            version: 1,
        }
    }

    #[tokio::test]
    async fn committed_rows_are_found_and_reported() {
        let a = Archive::open(None).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        a.on_records_committed(move |rows, _| s.lock().extend_from_slice(rows));
        for (id, acc, st, tags) in [
            ("a1", "main", "sent", &["x"][..]),
            ("a2", "main", "read", &[][..]),
            ("a3", "other", "sent", &["x", "y"][..]),
        ] {
            a.put_record(row(id, acc, st, tags));
        }
        a.put_history(HistoryRow {
            account: "main".into(),
            contact: "1".into(),
            seq: 7,
            at: 5,
            body: b"h".to_vec(),
        });
        a.sync().await.unwrap();
        assert_eq!(seen.lock().len(), 3);
        assert_eq!(a.backlog(), 0);
        assert_eq!(a.record("a2").as_deref(), Some(&b"a2"[..]));
        assert_eq!(a.record_by_wamid("wamid.a3").as_deref(), Some(&b"a3"[..]));
        let q = |q: RecordQuery| -> Vec<String> {
            a.records(&RecordQuery { limit: 10, ..q })
                .into_iter()
                .map(|b| String::from_utf8(b).unwrap())
                .collect()
        };
        assert_eq!(q(RecordQuery::default()), ["a3", "a2", "a1"]);
        assert_eq!(
            q(RecordQuery {
                tag: Some("x"),
                ..Default::default()
            }),
            ["a3", "a1"]
        );
        assert_eq!(
            q(RecordQuery {
                account: Some("main"),
                before: Some("a2"),
                ..Default::default()
            }),
            ["a1"]
        );
        assert_eq!(
            q(RecordQuery {
                status: Some("sent"),
                ..Default::default()
            }),
            ["a3", "a1"]
        );
        assert_eq!(a.history("main", "1", 50), vec![(7, b"h".to_vec())]);
        assert_eq!(a.prune("a3", 6).await, 3, "a1, a2 and the entry at 5");
        assert_eq!(a.counts(), (1, 0));
    }

    #[tokio::test]
    async fn memory_mode_leaves_no_file_behind() {
        let a = Archive::open(None).unwrap();
        let dir = a.temp.clone().unwrap();
        assert!(dir.join(FILE).exists());
        drop(a);
        assert!(!dir.exists());
        // One left by a router that was killed is removed by the next.
        let orphan = std::env::temp_dir().join("wa-router-999999999-0");
        std::fs::create_dir_all(&orphan).unwrap();
        std::fs::write(orphan.join(FILE), b"").unwrap();
        let _next = Archive::open(None).unwrap();
        assert!(!orphan.exists());
    }

    #[tokio::test]
    async fn a_durable_archive_is_there_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let a = Archive::open(Some(dir.path())).unwrap();
            a.put_record(row("r", "main", "sent", &[]));
            a.sync().await.unwrap();
        }
        let a = Archive::open(Some(dir.path())).unwrap();
        assert_eq!(a.record("r").as_deref(), Some(&b"r"[..]));
    }
}
