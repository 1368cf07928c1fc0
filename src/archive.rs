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
//! Parts: the rows go into a sequence of parts, each a pair of tables
//! (records, history) with their own indexes, a new one started once the
//! newest holds [`PART_ROWS`] rows. Records are filed by the time in their
//! id, history entries by the time they were made, so a row written again
//! lands where it was. The indexes are keyed at random (recipient, wamid,
//! conversation): in one ever-growing table each row soon costs a page
//! read and a page write, while a part's indexes stay about as large as
//! the page cache, so what a message costs the writer stays the same as
//! the archive grows (`cargo bench --bench archive`). Reads look into the
//! parts newest first; pruning drops a part whole once all of it is past
//! retention.
//!
//! History: the entries a batch holds of one conversation (an answered
//! message leaves two, its own and the reply) go into one row, keyed by
//! the first one's number ([`history_row`]); reads split rows into
//! entries again.
//!
//! This module knows no record type: rows carry their JSON body and the few
//! columns it is searched by.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, TryRecvError, channel};
use std::sync::{Arc, OnceLock};

use parking_lot::{Mutex, RwLock};
use rusqlite::{Connection, OptionalExtension, params_from_iter};

use crate::ids::MessageId;

// Indexes are few on purpose: each costs the writer on every row. Listing
// walks the id index (ids sort by time) newest first and filters;
// `recipient` is the one selective filter, `wamid` serves late statuses.
// Rows are appended (rowid) and found through narrow indexes, so the pages
// a batch dirties at random are index pages, not whole rows; an index
// entry holds its key and a rowid (8 bytes), not the 36-byte record id.
// The wamid and recipient indexes hold a 4-byte key of the text
// ([`text_key`]) from the sixteenth session of 2026-12-05 on: smaller
// indexes, fewer pages a commit.
// Parts made before 2026-12-05 keep records in a table keyed by id
// (WITHOUT ROWID) whose indexes carry the id: that cost the writer about
// a fifth more a message (`cargo bench --bench archive`, BENCHMARKS.md),
// and the same statements read and write both.
// Pruning drops whole parts and scans the one it cuts into (once an hour).

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

type RecordHook = Box<dyn Fn(&[(&str, u32)], bool) + Send + Sync>;
type HistoryHook = Box<dyn Fn(&[(&str, &str, u64)]) + Send + Sync>;

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
    /// The parts as of the last commit, oldest first (never empty).
    parts: SharedParts,
    /// Where senders wait while the writer is behind ([`Archive::keep_up`]).
    gate: crate::domain::Gate,
    /// The reading connection's statement cache, as last sized ([`Archive::reader`]).
    cache_for: std::sync::atomic::AtomicUsize,
    /// Searches by wamid so far ([`Archive::record_by_wamid`]).
    wamid_searches: AtomicU64,
    /// The database file (its `-wal` and `-shm` beside it).
    path: PathBuf,
}

/// Statements the reading connection keeps for an archive of `parts`
/// parts: a record by id, by wamid, a conversation's history and a
/// listing for each, and room for the rest.
fn statement_cache(parts: usize) -> usize {
    (4 * parts + 64).max(STATEMENT_CACHE)
}

/// Statements a connection keeps prepared at least.
const STATEMENT_CACHE: usize = 256;

/// The parts as the readers see them: a read takes the list (an `Arc`)
/// and the writer swaps in a new one.
type SharedParts = Arc<RwLock<Arc<Vec<Part>>>>;

/// Rows (records and history rows) a part takes before the writer starts
/// the next one.
pub const PART_ROWS: u64 = 1_000_000;

/// The archive's list of parts.
/// `rows`: how many the writer put into the part while it was the newest.
const PARTS_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS parts \
     (n INTEGER PRIMARY KEY, since INTEGER NOT NULL, rows INTEGER NOT NULL DEFAULT 0);";

/// One part of the archive: its two tables hold the records whose ids
/// sort from `since`'s time on and the history entries from `since` (ms)
/// on, up to the next part's `since`. Part 0 (since 0) has the tables of
/// archives made before there were parts.
#[derive(Debug, Clone)]
struct Part {
    n: i64,
    since: i64,
    /// The smallest record id routed here.
    floor: String,
    records: String,
    history: String,
    /// Its records are found by wamid and recipient through integer keys
    /// ([`text_key`]); parts made before the sixteenth session of
    /// 2026-12-05 index the text itself.
    keyed: bool,
    /// Statements run once a row or a read (made once, not per row).
    put_record: String,
    put_history: String,
    by_id: String,
    by_wamid: String,
    history_of: String,
}

impl Part {
    /// The names of part `n`'s tables: (records, history).
    fn tables(n: i64) -> (String, String) {
        let suffix = if n == 0 {
            String::new()
        } else {
            format!("_{n}")
        };
        (format!("records{suffix}"), format!("history{suffix}"))
    }

    fn new(n: i64, since: i64, keyed: bool) -> Self {
        let (records, history) = Self::tables(n);
        Part {
            n,
            since,
            floor: MessageId::time_floor(since),
            keyed,
            put_record: format!(
                "INSERT OR REPLACE INTO {records} \
                 (id, account, recipient, status, wamid, created_at, tags, body, \
                 wamid_key, recipient_key) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"
            ),
            put_history: format!(
                "INSERT OR REPLACE INTO {history} (account, contact, seq, at, body) \
                 VALUES (?1, ?2, ?3, ?4, ?5)"
            ),
            by_id: format!("SELECT body FROM {records} WHERE id = ?1"),
            // ?1 the key, ?2 the wamid (a part without keys: ?1 unused).
            by_wamid: if keyed {
                format!("SELECT body FROM {records} WHERE wamid_key = ?1 AND wamid = ?2")
            } else {
                format!("SELECT body FROM {records} WHERE wamid = ?2")
            },
            history_of: format!(
                "SELECT seq, body FROM {history} WHERE account = ?1 AND contact = ?2 \
                 ORDER BY seq DESC"
            ),
            records,
            history,
        }
    }

    /// Its tables and indexes, made if missing. A part without keys
    /// exists already: its tables take the key columns, unindexed, so that
    /// one statement writes to every part.
    fn schema(&self, conn: &Connection) -> rusqlite::Result<()> {
        let (r, h) = (&self.records, &self.history);
        if !self.keyed {
            let mut has = conn.prepare(&format!(
                "SELECT count(*) FROM pragma_table_info('{r}') WHERE name = 'wamid_key'"
            ))?;
            if has.query_row([], |row| row.get::<_, i64>(0))? == 0 {
                conn.execute_batch(&format!(
                    "ALTER TABLE {r} ADD COLUMN wamid_key INTEGER; \
                     ALTER TABLE {r} ADD COLUMN recipient_key INTEGER;"
                ))?;
            }
            return Ok(());
        }
        conn.execute_batch(&format!(
            "
CREATE TABLE IF NOT EXISTS {r} (
    n INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    account TEXT NOT NULL,
    recipient TEXT NOT NULL,
    status TEXT NOT NULL,
    wamid TEXT,
    created_at INTEGER NOT NULL,
    tags TEXT NOT NULL,
    body BLOB NOT NULL,
    wamid_key INTEGER,
    recipient_key INTEGER
);
CREATE INDEX IF NOT EXISTS {r}_wamid_key ON {r}(wamid_key) WHERE wamid_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS {r}_recipient_key ON {r}(recipient_key);
CREATE TABLE IF NOT EXISTS {h} (
    n INTEGER PRIMARY KEY,
    account TEXT NOT NULL,
    contact TEXT NOT NULL,
    seq INTEGER NOT NULL,
    at INTEGER NOT NULL,
    body BLOB NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS {h}_conversation ON {h}(account, contact, seq);
"
        ))
    }

    /// Rows in its tables: (records, history rows).
    fn counts(&self, conn: &Connection) -> rusqlite::Result<(u64, u64)> {
        let count = |t: &str| {
            conn.query_row(&format!("SELECT count(*) FROM {t}"), [], |r| {
                r.get::<_, i64>(0)
            })
        };
        Ok((count(&self.records)? as u64, count(&self.history)? as u64))
    }
}

/// The part a record goes to: the newest whose floor its id reaches
/// (ids that sort below every floor: the oldest).
fn part_for_id<'a>(parts: &'a [Part], id: &str) -> &'a Part {
    parts
        .iter()
        .rev()
        .find(|p| p.floor.as_str() <= id)
        .unwrap_or(&parts[0])
}

/// The part a history entry made at `at` goes to.
fn part_for_time(parts: &[Part], at: i64) -> &Part {
    parts
        .iter()
        .rev()
        .find(|p| p.since <= at)
        .unwrap_or(&parts[0])
}

/// The parts of the archive in `conn`, oldest first (made if missing).
fn load_parts(conn: &Connection) -> rusqlite::Result<Vec<Part>> {
    conn.execute_batch(PARTS_SCHEMA)?;
    // A part is keyed if its records table is new or has the key index.
    let keyed = |n: i64| -> rusqlite::Result<bool> {
        let (r, _) = Part::tables(n);
        conn.query_row(
            "SELECT count(*) = 0 OR sum(name = ?2) > 0 FROM sqlite_master WHERE tbl_name = ?1",
            [r.clone(), format!("{r}_wamid_key")],
            |row| row.get(0),
        )
    };
    let mut parts = conn
        .prepare("SELECT n, since FROM parts ORDER BY n")?
        .query_map([], |r| {
            let n = r.get(0)?;
            Ok(Part::new(n, r.get(1)?, keyed(n)?))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    if parts.is_empty() {
        conn.execute("INSERT INTO parts (n, since) VALUES (0, 0)", [])?;
        parts.push(Part::new(0, 0, keyed(0)?));
    }
    for p in &parts {
        p.schema(conn)?;
    }
    Ok(parts)
}

/// The integer a part's key index holds for `text` (a wamid, a
/// recipient): CRC-32, as a signed 32-bit number so that SQLite stores it
/// in four bytes. An index of these is a fraction of the size of one of
/// the text (a wamid is some 40-60 bytes with a long common prefix), so a
/// commit dirties and writes fewer pages; reads compare the text too, a
/// collision costs only a row looked at.
fn text_key(text: &str) -> i64 {
    i64::from(crc32fast::hash(text.as_bytes()) as i32)
}

fn open_conn(path: &Path, durable: bool) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    // 16 KiB pages (a new archive only: an existing one keeps its size):
    // the random-key indexes dirty a page per row once they outgrow a
    // batch, and a commit writes each dirty page once, so four times the
    // rows a page cost the writer a third to a half less a message
    // (`cargo bench --bench archive`, BENCHMARKS.md).
    conn.pragma_update(None, "page_size", PAGE_BYTES)?;
    // Statements are per part: a read that spans the parts prepares each
    // part's once, not again on every read.
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
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
        Self::open_parted(dir, PART_ROWS)
    }

    /// [`Archive::open`] with a new part every `part_rows` rows (tests and
    /// benchmarks).
    pub fn open_parted(dir: Option<&Path>, part_rows: u64) -> Result<Self, String> {
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
        let list = load_parts(&write).map_err(err)?;
        let filled = write
            .query_row(
                "SELECT rows FROM parts WHERE n = ?1",
                [list[list.len() - 1].n],
                |r| r.get::<_, i64>(0),
            )
            .map_err(err)? as u64;
        let parts = Arc::new(RwLock::new(Arc::new(list)));
        let read = Arc::new(Mutex::new(open_conn(&path, durable).map_err(err)?));
        let (tx, rx) = channel();
        let hooks = Arc::new(Hooks::default());
        let backlog = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicBool::new(false));
        let writer = {
            let (hooks, backlog, failed) = (hooks.clone(), backlog.clone(), failed.clone());
            let (read, parts) = (read.clone(), parts.clone());
            let writer = Writer {
                conn: write,
                parts,
                filled,
                part_rows: part_rows.max(1),
                durable,
            };
            std::thread::Builder::new()
                .name("archive".into())
                .spawn(move || write_loop(writer, &read, rx, &hooks, &backlog, &failed))
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
            parts,
            gate: Default::default(),
            cache_for: STATEMENT_CACHE.into(),
            wamid_searches: AtomicU64::new(0),
            path,
        })
    }

    /// Bytes the archive takes on disk now: its database file with its
    /// write-ahead log and shared-memory index (`/metrics`).
    pub fn disk_bytes(&self) -> u64 {
        ["", "-wal", "-shm"]
            .iter()
            .filter_map(|suffix| {
                let mut p = self.path.clone().into_os_string();
                p.push(suffix);
                std::fs::metadata(p).ok()
            })
            .map(|m| m.len())
            .sum()
    }

    /// Called after each commit with the `(id, version)` of the records it
    /// committed (and `false`), and after each idle second with none (and
    /// `true`).
    pub fn on_records_committed(
        &self,
        hook: impl Fn(&[(&str, u32)], bool) + Send + Sync + 'static,
    ) {
        let _ = self.hooks.records.set(Box::new(hook));
    }

    /// Called after each commit with `(account, contact, seq)` for each
    /// conversation it had entries of: its latest (the earlier ones were
    /// handed over before, so they are in too).
    pub fn on_history_committed(
        &self,
        hook: impl Fn(&[(&str, &str, u64)]) + Send + Sync + 'static,
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
        self.gate
            .wait_while(limit, || self.backlog() > max_rows)
            .await
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

    /// The parts as of the last commit, oldest first.
    fn parts(&self) -> Arc<Vec<Part>> {
        self.parts.read().clone()
    }

    /// Records per account.
    pub fn counts_by_account(&self) -> Vec<(String, u64)> {
        let mut counts: std::collections::BTreeMap<String, u64> = Default::default();
        let conn = self.read.lock();
        for p in self.parts().iter() {
            let result = conn
                .prepare_cached(&format!(
                    "SELECT account, count(*) FROM {} GROUP BY account",
                    p.records
                ))
                .and_then(|mut s| {
                    s.query_map([], |r| {
                        Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()
                });
            for (account, n) in read_or_log(result).unwrap_or_default() {
                *counts.entry(account).or_default() += n;
            }
        }
        counts.into_iter().collect()
    }

    /// The body of record `id`.
    pub fn record(&self, id: &str) -> Option<Vec<u8>> {
        let parts = self.parts();
        Self::query_one(&self.reader(&parts), &part_for_id(&parts, id).by_id, [id])
    }

    /// The body of the record sent as `wamid` (newest part first: late
    /// statuses are of recent sends).
    pub fn record_by_wamid(&self, wamid: &str) -> Option<Vec<u8>> {
        self.wamid_searches.fetch_add(1, Ordering::Relaxed);
        let parts = self.parts();
        let conn = self.reader(&parts);
        parts
            .iter()
            .rev()
            .find_map(|p| Self::query_one(&conn, &p.by_wamid, (text_key(wamid), wamid)))
    }

    /// How many times a record was searched for by wamid (each search
    /// looks into the parts until found, all of them if not).
    pub fn wamid_searches(&self) -> u64 {
        self.wamid_searches.load(Ordering::Relaxed)
    }

    fn query_one(conn: &Connection, sql: &str, key: impl rusqlite::Params) -> Option<Vec<u8>> {
        let result = conn
            .prepare_cached(sql)
            .and_then(|mut s| s.query_row(key, |r| r.get::<_, Vec<u8>>(0)).optional());
        read_or_log(result).flatten()
    }

    /// The reading connection, its statement cache sized to hold every
    /// part's statements: a read that looks into all parts (a wamid or a
    /// conversation the archive does not have) then prepares none again.
    /// Cost of such a read at 151 / 301 parts: 0.34 / 1.49 ms with room for
    /// 256 statements (`cargo bench --bench archive -- --probe`).
    fn reader(&self, parts: &[Part]) -> parking_lot::MutexGuard<'_, Connection> {
        let conn = self.read.lock();
        let wanted = statement_cache(parts.len());
        if self.cache_for.swap(wanted, Ordering::Relaxed) != wanted {
            conn.set_prepared_statement_cache_capacity(wanted);
        }
        conn
    }

    /// Record bodies matching `q`, newest (highest id) first: the parts
    /// newest first (a part's ids all sort above the older parts').
    pub fn records(&self, q: &RecordQuery<'_>) -> Vec<Vec<u8>> {
        let mut found = Vec::new();
        let parts = self.parts();
        let conn = self.reader(&parts);
        for (i, p) in parts.iter().enumerate().rev() {
            if found.len() >= q.limit {
                break;
            }
            // The oldest part also has the ids that sort below every floor.
            if i > 0 && q.before.is_some_and(|b| b <= p.floor.as_str()) {
                continue;
            }
            let q = RecordQuery {
                limit: q.limit - found.len(),
                ..q.clone()
            };
            found.extend(Self::records_in(&conn, p, &q));
        }
        found
    }

    fn records_in(conn: &Connection, p: &Part, q: &RecordQuery<'_>) -> Vec<Vec<u8>> {
        // Named `records` in every part (the tag clause refers to it).
        let mut sql = format!("SELECT body FROM {} AS records WHERE 1=1", p.records);
        let mut args: Vec<&dyn rusqlite::ToSql> = Vec::new();
        // A keyed part finds the recipient through its key, then the text.
        let to_key = q.to.filter(|_| p.keyed).map(text_key);
        if let Some(k) = &to_key {
            sql.push_str(" AND recipient_key = ?");
            args.push(k);
        }
        for (value, clause) in [
            (&q.account, " AND account = ?"),
            (&q.to, " AND recipient = ?"),
            (&q.status, " AND status = ?"),
            (
                &q.tag,
                " AND EXISTS (SELECT 1 FROM json_each(records.tags) WHERE value = ?)",
            ),
            (&q.before, " AND id < ?"),
        ] {
            if let Some(v) = value {
                sql.push_str(clause);
                args.push(v);
            }
        }
        sql.push_str(&format!(" ORDER BY id DESC LIMIT {}", q.limit));
        let result = conn.prepare_cached(&sql).and_then(|mut s| {
            s.query_map(params_from_iter(args), |r| r.get::<_, Vec<u8>>(0))?
                .collect::<rusqlite::Result<Vec<_>>>()
        });
        read_or_log(result).unwrap_or_default()
    }

    /// The last `limit` history entries of a conversation: `(seq, body)`,
    /// oldest first.
    ///
    /// The parts newest first, until `limit` are found: entries are filed
    /// by the time they were made, which follows their numbering unless
    /// the clock went back across the start of a part.
    pub fn history(&self, account: &str, contact: &str, limit: usize) -> Vec<(u64, Vec<u8>)> {
        // By seq: a row written again after a replay may repeat entries
        // that another row (grouped otherwise) holds too.
        let mut entries: std::collections::BTreeMap<u64, Vec<u8>> = Default::default();
        let parts = self.parts();
        let conn = self.reader(&parts);
        for p in parts.iter().rev() {
            if entries.len() >= limit {
                break;
            }
            let result = conn.prepare_cached(&p.history_of).and_then(|mut s| {
                // Rows newest first, read only as far as needed.
                let mut rows = s.query(rusqlite::params![account, contact])?;
                while entries.len() < limit
                    && let Some(r) = rows.next()?
                {
                    let body = r.get_ref(1)?.as_blob()?;
                    for (seq, entry) in split_entries(r.get::<_, i64>(0)? as u64, body) {
                        entries.entry(seq).or_insert_with(|| entry.to_vec());
                    }
                }
                Ok(())
            });
            read_or_log(result);
        }
        let skip = entries.len().saturating_sub(limit);
        entries.into_iter().skip(skip).collect()
    }

    /// Rows in the archive: (records, history rows; a row may hold several
    /// entries of one conversation).
    pub fn counts(&self) -> (u64, u64) {
        let conn = self.read.lock();
        self.parts().iter().fold((0, 0), |(r, h), p| {
            let (pr, ph) = p.counts(&conn).unwrap_or_default();
            (r + pr, h + ph)
        })
    }

    /// How many parts the archive has.
    pub fn part_count(&self) -> usize {
        self.parts.read().len()
    }

    /// Stop the writer after it committed everything handed over.
    pub fn close(&self) {
        self.tx.lock().take();
        if let Some(w) = self.writer.lock().take() {
            let _ = w.join();
        }
    }
}

/// A read's result, its error logged.
fn read_or_log<T>(result: rusqlite::Result<T>) -> Option<T> {
    result
        .map_err(|e| tracing::error!(error = %e, "archive read failed"))
        .ok()
}

/// First byte of a history row that holds several entries (an entry's
/// own body is JSON, which never starts with it).
const GROUPED: u8 = 0;

/// One history row for `run`, entries of one conversation in one part
/// (in seq order): a lone entry as itself, several as [`GROUPED`] then
/// `[seq: u64 LE][len: u32 LE][body]` each. Returns (seq, at, body): the
/// first seq (the row's key), the latest time (pruning keeps the row
/// until all of it is past retention).
fn history_row<'a>(run: &[&'a HistoryRow]) -> (u64, i64, std::borrow::Cow<'a, [u8]>) {
    use std::borrow::Cow;
    let first = run[0];
    if run.len() == 1 {
        return (first.seq, first.at, Cow::Borrowed(&first.body));
    }
    let mut body = Vec::with_capacity(1 + run.iter().map(|h| 12 + h.body.len()).sum::<usize>());
    body.push(GROUPED);
    for h in run {
        body.extend_from_slice(&h.seq.to_le_bytes());
        body.extend_from_slice(&(h.body.len() as u32).to_le_bytes());
        body.extend_from_slice(&h.body);
    }
    let at = run.iter().map(|h| h.at).max().unwrap_or(first.at);
    (first.seq, at, Cow::Owned(body))
}

/// The entries of a history row whose key is `seq` (see [`history_row`]);
/// a cut-off group yields the entries before the cut.
fn split_entries(seq: u64, body: &[u8]) -> Vec<(u64, &[u8])> {
    let Some(mut rest) = body.strip_prefix(&[GROUPED]) else {
        return vec![(seq, body)];
    };
    let mut entries = Vec::new();
    while rest.len() >= 12 {
        let (head, tail) = rest.split_at(12);
        let entry_seq = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
        let len = u32::from_le_bytes(head[8..].try_into().expect("4 bytes")) as usize;
        if tail.len() < len {
            break;
        }
        entries.push((entry_seq, &tail[..len]));
        rest = &tail[len..];
    }
    entries
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
    mut w: Writer,
    read: &Mutex<Connection>,
    rx: Receiver<Cmd>,
    hooks: &Hooks,
    backlog: &AtomicU64,
    failed: &AtomicBool,
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
                    let _ = w.conn.release_memory();
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
        let sync = w.durable && batch.iter().any(|c| matches!(c, Cmd::Sync(_)));
        let mut pruned = 0usize;
        // Per conversation its latest entry committed (the earlier ones
        // were handed over before, so they are in too).
        let mut history: Vec<(&str, &str, u64)> = Vec::new();
        let result = w.commit(&batch, sync, &mut pruned, &mut history);
        backlog.fetch_sub(rows, Ordering::Relaxed);
        if let Err(e) = &result {
            failed.store(true, Ordering::Relaxed);
            tracing::error!(error = %e, "archive commit failed; finished data stays in memory");
        } else {
            let records: Vec<(&str, u32)> = batch
                .iter()
                .filter_map(|c| match c {
                    Cmd::Record(r) => Some((r.id.as_str(), r.version)),
                    _ => None,
                })
                .collect();
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

/// One statement per part, prepared on first use within a commit (a
/// cached statement taken from the connection's cache per row cost an
/// allocation of its key each time).
#[derive(Default)]
struct Statements<'c>(Vec<(i64, rusqlite::CachedStatement<'c>)>);

impl<'c> Statements<'c> {
    fn get(
        &mut self,
        conn: &'c Connection,
        part: i64,
        sql: &str,
    ) -> rusqlite::Result<&mut rusqlite::CachedStatement<'c>> {
        let i = match self.0.iter().position(|(n, _)| *n == part) {
            Some(i) => i,
            None => {
                self.0.push((part, conn.prepare_cached(sql)?));
                self.0.len() - 1
            }
        };
        Ok(&mut self.0[i].1)
    }
}

/// The writer thread's connection and what it knows of the parts.
struct Writer {
    conn: Connection,
    /// Shared with the readers; changed only after a commit that changed
    /// the parts (or, pruning, before the commit that drops one).
    parts: SharedParts,
    /// Rows in the newest part.
    filled: u64,
    part_rows: u64,
    durable: bool,
}

impl Writer {
    /// One transaction: the batch's rows into their parts, a new part
    /// first if the newest is full. `durable`: with an fsync. `history`
    /// gets `(account, contact, latest seq)` of each conversation the
    /// batch had entries of.
    fn commit<'b>(
        &mut self,
        batch: &'b [Cmd],
        durable: bool,
        pruned: &mut usize,
        history: &mut Vec<(&'b str, &'b str, u64)>,
    ) -> Result<(), String> {
        let e = |e: rusqlite::Error| e.to_string();
        if durable {
            // This commit's fsync makes every earlier one durable too.
            self.conn
                .pragma_update(None, "synchronous", "FULL")
                .map_err(e)?;
        }
        let before = self.parts.read().clone();
        let mut parts = (*before).clone();
        let mut filled = self.filled;
        let txn = self.conn.transaction().map_err(e)?;
        if filled >= self.part_rows {
            let last = &parts[parts.len() - 1];
            let next = Part::new(
                last.n + 1,
                crate::domain::now_ms().max(last.since + 1),
                true,
            );
            next.schema(&txn).map_err(e)?;
            txn.execute(
                "INSERT INTO parts (n, since) VALUES (?1, ?2)",
                [next.n, next.since],
            )
            .map_err(e)?;
            parts.push(next);
            filled = 0;
        }
        let newest = parts[parts.len() - 1].n;
        // History entries of one conversation in this batch become one
        // row (an answered message leaves two, its own and the reply):
        // each row costs the writer an index entry and the B-tree pages
        // it dirties. Written after the rest, into the parts as they are
        // then (pruning may have dropped one).
        let mut entries: Vec<&HistoryRow> = Vec::new();
        // Each part's statement prepared once for the commit, not per row.
        let mut put_record = Statements::default();
        let mut put_history = Statements::default();
        for c in batch {
            match c {
                Cmd::Record(r) => {
                    let p = part_for_id(&parts, &r.id);
                    let tags = if r.tags.is_empty() {
                        std::borrow::Cow::Borrowed("[]")
                    } else {
                        serde_json::to_string(&r.tags)
                            .unwrap_or_else(|_| "[]".into())
                            .into()
                    };
                    put_record
                        .get(&txn, p.n, &p.put_record)
                        .and_then(|s| {
                            s.execute(rusqlite::params![
                                r.id,
                                r.account,
                                r.to,
                                r.status,
                                r.wamid,
                                r.created_at,
                                tags,
                                r.body,
                                r.wamid.as_deref().map(text_key),
                                text_key(&r.to)
                            ])
                        })
                        .map_err(e)?;
                    filled += u64::from(p.n == newest);
                }
                Cmd::History(h) => entries.push(h),
                Cmd::Prune(below, cutoff, _) => {
                    put_record = Statements::default();
                    *pruned += prune(&txn, &mut parts, below, *cutoff).map_err(e)?;
                    // Readers stop looking into dropped parts now (what
                    // they held is past retention), not into new ones yet.
                    let mut shared = self.parts.write();
                    let kept = shared
                        .iter()
                        .filter(|p| parts.iter().any(|k| k.n == p.n))
                        .cloned()
                        .collect();
                    *shared = Arc::new(kept);
                }
                Cmd::Evict(account, n) => {
                    let mut left = *n;
                    for p in &parts {
                        if left == 0 {
                            break;
                        }
                        left -= txn
                            .execute(
                                &format!(
                                    "DELETE FROM {r} WHERE id IN \
                                     (SELECT id FROM {r} WHERE account = ?1 ORDER BY id LIMIT ?2)",
                                    r = p.records
                                ),
                                rusqlite::params![account, left as i64],
                            )
                            .map_err(e)?
                            .min(left);
                    }
                }
                Cmd::Sync(_) => {}
            }
        }
        // A conversation's entries side by side, in the order they came.
        entries.sort_by(|a, b| (&a.account, &a.contact).cmp(&(&b.account, &b.contact)));
        for entries in entries.chunk_by(|a, b| a.account == b.account && a.contact == b.contact) {
            // Runs of entries that go to the same part, one row each.
            // (The newest part is the first one looked at: a step each.)
            for run in entries
                .chunk_by(|a, b| part_for_time(&parts, a.at).n == part_for_time(&parts, b.at).n)
            {
                let p = part_for_time(&parts, run[0].at);
                let (seq, at, body) = history_row(run);
                put_history
                    .get(&txn, p.n, &p.put_history)
                    .and_then(|s| {
                        s.execute(rusqlite::params![
                            run[0].account,
                            run[0].contact,
                            seq as i64,
                            at,
                            &*body
                        ])
                    })
                    .map_err(e)?;
                filled += u64::from(p.n == newest);
            }
            let last = entries.iter().map(|h| h.seq).max().unwrap_or_default();
            history.push((&entries[0].account, &entries[0].contact, last));
        }
        txn.execute(
            "UPDATE parts SET rows = ?1 WHERE n = ?2",
            [filled as i64, newest],
        )
        .map_err(e)?;
        drop((put_record, put_history));
        match txn.commit() {
            Ok(()) => {
                *self.parts.write() = Arc::new(parts);
                self.filled = filled;
            }
            Err(err) => {
                *self.parts.write() = before;
                return Err(e(err));
            }
        }
        if durable {
            self.conn
                .pragma_update(None, "synchronous", "NORMAL")
                .map_err(e)?;
        }
        Ok(())
    }
}

/// Delete records whose ids sort below `below` and history entries made
/// before `cutoff`: a part (not the newest) that holds nothing else is
/// dropped whole, the others are searched. How many rows.
fn prune(
    txn: &rusqlite::Transaction<'_>,
    parts: &mut Vec<Part>,
    below: &str,
    cutoff: i64,
) -> rusqlite::Result<usize> {
    let mut pruned = 0;
    let mut i = 0;
    while i < parts.len() {
        let p = &parts[i];
        let whole = parts
            .get(i + 1)
            .is_some_and(|next| next.floor.as_str() <= below && next.since <= cutoff);
        if whole {
            let (records, history) = p.counts(txn)?;
            pruned += (records + history) as usize;
            txn.execute_batch(&format!(
                "DROP TABLE {}; DROP TABLE {};",
                p.records, p.history
            ))?;
            txn.execute("DELETE FROM parts WHERE n = ?1", [p.n])?;
            parts.remove(i);
            continue;
        }
        // The oldest part also has what sorts below every part's start.
        if i == 0 || p.floor.as_str() < below {
            pruned += txn.execute(&format!("DELETE FROM {} WHERE id < ?1", p.records), [below])?;
        }
        if i == 0 || p.since < cutoff {
            pruned += txn.execute(
                &format!("DELETE FROM {} WHERE at < ?1", p.history),
                [cutoff],
            )?;
        }
        i += 1;
    }
    Ok(pruned)
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
        a.on_records_committed(move |rows, _| {
            s.lock()
                .extend(rows.iter().map(|(id, v)| (id.to_string(), *v)))
        });
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
    async fn a_full_part_starts_the_next_and_every_read_spans_them() {
        let dir = tempfile::tempdir().unwrap();
        let now = crate::domain::now_ms();
        let (old, new) = (now - 10_000, now + 60_000);
        let id = |t: i64, k: &str| format!("{}-{k}", MessageId::time_floor(t));
        let record = |t: i64, k: &str, to: &str| RecordRow {
            to: to.into(),
            created_at: t,
            body: k.as_bytes().to_vec(),
            ..row(&id(t, k), "main", "sent", &[])
        };
        let entry = |seq: u64, at: i64| HistoryRow {
            account: "main".into(),
            contact: "1".into(),
            seq,
            at,
            body: format!("h{seq}").into_bytes(),
        };
        {
            let a = Archive::open_parted(Some(dir.path()), 4).unwrap();
            a.put_record(RecordRow {
                tags: vec!["vip".into()],
                ..record(old, "o1", "1")
            });
            for k in ["o2", "o3"] {
                a.put_record(record(old, k, "1"));
            }
            a.put_history(entry(1, old));
            a.put_history(entry(2, old));
            a.sync().await.unwrap();
            assert_eq!(a.part_count(), 1);
            // The first part is full: the next commit starts another; a
            // record changed later goes back to its own part.
            a.put_record(RecordRow {
                tags: vec!["vip".into()],
                ..record(new, "n1", "2")
            });
            a.put_history(entry(3, new));
            a.put_record(RecordRow {
                status: "read",
                ..record(old, "o2", "1")
            });
            a.sync().await.unwrap();
            assert_eq!(a.part_count(), 2);
            assert_eq!(
                a.counts(),
                (4, 2),
                "o2 replaced, not doubled; entries 1 and 2 in one row"
            );
        }
        let a = Archive::open_parted(Some(dir.path()), 4).unwrap();
        assert_eq!(a.part_count(), 2, "the parts are kept");
        let bodies = |q: RecordQuery| -> Vec<String> {
            a.records(&q)
                .into_iter()
                .map(|b| String::from_utf8(b).unwrap())
                .collect()
        };
        let all = |limit| RecordQuery {
            limit,
            ..Default::default()
        };
        assert_eq!(bodies(all(10)), ["n1", "o3", "o2", "o1"]);
        assert_eq!(bodies(all(2)), ["n1", "o3"]);
        let n1 = id(new, "n1");
        assert_eq!(
            bodies(RecordQuery {
                before: Some(&n1),
                ..all(2)
            }),
            ["o3", "o2"]
        );
        assert_eq!(
            bodies(RecordQuery {
                status: Some("read"),
                ..all(10)
            }),
            ["o2"]
        );
        assert_eq!(
            bodies(RecordQuery {
                tag: Some("vip"),
                ..all(10)
            }),
            ["n1", "o1"],
            "a tag filter in every part"
        );
        assert_eq!(a.record(&id(old, "o1")).as_deref(), Some(&b"o1"[..]));
        assert_eq!(a.record(&n1).as_deref(), Some(&b"n1"[..]));
        let wamid = format!("wamid.{}", id(old, "o3"));
        assert_eq!(a.record_by_wamid(&wamid).as_deref(), Some(&b"o3"[..]));
        let seqs = |limit| -> Vec<u64> {
            a.history("main", "1", limit)
                .into_iter()
                .map(|(s, _)| s)
                .collect()
        };
        assert_eq!(seqs(50), [1, 2, 3]);
        assert_eq!(seqs(2), [2, 3]);
        // The oldest go first, across parts.
        a.evict_oldest("main", 2);
        a.sync().await.unwrap();
        assert_eq!(bodies(all(10)), ["n1", "o3"]);
        assert_eq!(a.counts_by_account(), [("main".to_string(), 2)]);
        // A part with nothing left after pruning is dropped whole.
        assert_eq!(
            a.prune(&MessageId::time_floor(new), new).await,
            2,
            "o3 and the row of entries 1 and 2"
        );
        assert_eq!(a.part_count(), 1);
        assert_eq!(a.counts(), (1, 1));
        assert_eq!(seqs(50), [3]);
        assert_eq!(a.record(&n1).as_deref(), Some(&b"n1"[..]));
        // How full the newest part is survives a restart: two more rows
        // fill it, and the next commit starts another.
        drop(a);
        let a = Archive::open_parted(Some(dir.path()), 4).unwrap();
        for k in ["n2", "n3"] {
            a.put_record(record(new, k, "2"));
        }
        a.sync().await.unwrap();
        assert_eq!(a.part_count(), 1);
        a.sync().await.unwrap();
        assert_eq!(a.part_count(), 2);
    }

    /// A history table as every layout so far has made it.
    const OLD_HISTORY: &str = "CREATE TABLE history (n INTEGER PRIMARY KEY, \
         account TEXT NOT NULL, contact TEXT NOT NULL, seq INTEGER NOT NULL, \
         at INTEGER NOT NULL, body BLOB NOT NULL);
         CREATE UNIQUE INDEX history_conversation ON history(account, contact, seq);";

    /// A data directory whose archive an earlier version made: `sql` makes
    /// its tables and rows.
    fn old_archive(sql: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join(FILE)).unwrap();
        conn.execute_batch(sql).unwrap();
        dir
    }

    #[tokio::test]
    async fn an_archive_made_before_parts_is_part_0() {
        // The tables as the archive made them before there were parts
        // (records keyed by id, WITHOUT ROWID).
        let dir = old_archive(&format!(
            "CREATE TABLE records (id TEXT PRIMARY KEY, account TEXT NOT NULL, \
             recipient TEXT NOT NULL, status TEXT NOT NULL, wamid TEXT, \
             created_at INTEGER NOT NULL, tags TEXT NOT NULL, body BLOB NOT NULL) WITHOUT ROWID;
             CREATE INDEX records_wamid ON records(wamid) WHERE wamid IS NOT NULL;
             CREATE INDEX records_recipient ON records(recipient, id);
             {OLD_HISTORY}
             INSERT INTO records VALUES ('msg_0000old', 'main', '1', 'read', 'wamid.old', 1, '[]', X'6f6c64');
             INSERT INTO history (account, contact, seq, at, body) VALUES ('main', '1', 1, 1, X'6831');"
        ));
        let a = Archive::open_parted(Some(dir.path()), 1).unwrap();
        assert_eq!(a.part_count(), 1);
        assert_eq!(a.record("msg_0000old").as_deref(), Some(&b"old"[..]));
        assert_eq!(a.record_by_wamid("wamid.old").as_deref(), Some(&b"old"[..]));
        a.put_record(row(MessageId::generate().as_ref(), "main", "sent", &[]));
        a.sync().await.unwrap();
        a.sync().await.unwrap();
        assert_eq!(a.part_count(), 2, "the next part follows part 0");
        assert_eq!(a.counts(), (2, 1));
        assert_eq!(a.history("main", "1", 10), vec![(1, b"h1".to_vec())]);
        // The old part still takes rows written again, and both answer
        // the same statements.
        a.put_record(RecordRow {
            status: "read",
            ..row("msg_0000old", "main", "read", &[])
        });
        a.sync().await.unwrap();
        assert_eq!(
            a.record("msg_0000old").as_deref(),
            Some(&b"msg_0000old"[..])
        );
        assert_eq!(a.counts(), (2, 1));
        let listed = a.records(&RecordQuery {
            to: Some("1"),
            limit: 10,
            ..Default::default()
        });
        assert_eq!(listed.len(), 2, "by recipient in both layouts");
    }

    #[tokio::test]
    async fn parts_made_before_keys_answer_beside_keyed_ones_across_restarts() {
        // Part 0 as the archive made it before keys (rowid, the text
        // indexed), with one record.
        let dir = old_archive(&format!(
            "CREATE TABLE parts (n INTEGER PRIMARY KEY, since INTEGER NOT NULL, \
             rows INTEGER NOT NULL DEFAULT 0);
             INSERT INTO parts (n, since) VALUES (0, 0);
             CREATE TABLE records (n INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, \
             account TEXT NOT NULL, recipient TEXT NOT NULL, status TEXT NOT NULL, \
             wamid TEXT, created_at INTEGER NOT NULL, tags TEXT NOT NULL, body BLOB NOT NULL);
             CREATE INDEX records_wamid ON records(wamid) WHERE wamid IS NOT NULL;
             CREATE INDEX records_recipient ON records(recipient);
             {OLD_HISTORY}
             INSERT INTO records (id, account, recipient, status, wamid, created_at, tags, body) \
             VALUES ('msg_0000old', 'main', '1', 'read', 'wamid.old', 1, '[]', X'6f6c64');"
        ));
        let new_id = MessageId::generate().as_ref().to_string();
        for round in 0..2 {
            let a = Archive::open_parted(Some(dir.path()), 1).unwrap();
            if round == 0 {
                a.put_record(row(&new_id, "main", "sent", &[]));
                a.sync().await.unwrap();
                a.sync().await.unwrap();
            }
            assert_eq!(a.part_count(), 2, "round {round}");
            assert_eq!(a.record_by_wamid("wamid.old").as_deref(), Some(&b"old"[..]));
            assert_eq!(
                a.record_by_wamid(&format!("wamid.{new_id}")).as_deref(),
                Some(new_id.as_bytes())
            );
            let listed = a.records(&RecordQuery {
                to: Some("1"),
                limit: 10,
                ..Default::default()
            });
            assert_eq!(listed, vec![new_id.as_bytes().to_vec(), b"old".to_vec()]);
            a.close();
        }
        // The new part has the key indexes, the old one its text indexes.
        let conn = Connection::open(dir.path().join(FILE)).unwrap();
        let indexes = |t: &str| -> Vec<String> {
            let mut s = conn
                .prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = ?1 AND sql IS NOT NULL ORDER BY name")
                .unwrap();
            s.query_map([t], |r| r.get(0))
                .unwrap()
                .map(Result::unwrap)
                .collect()
        };
        assert_eq!(indexes("records"), ["records_recipient", "records_wamid"]);
        assert_eq!(
            indexes("records_1"),
            ["records_1_recipient_key", "records_1_wamid_key"]
        );
    }

    /// Two different texts with the same CRC-32, found by trying random
    /// ones (some 80,000 on average; texts differing in four bytes or
    /// fewer never collide).
    fn colliding_texts(prefix: &str) -> (String, String) {
        let mut rng = fastrand::Rng::with_seed(7);
        let mut seen = std::collections::HashMap::new();
        loop {
            let text: String = std::iter::once(prefix.to_string())
                .chain((0..16).map(|_| rng.alphanumeric().to_string()))
                .collect();
            match seen.insert(text_key(&text), text.clone()) {
                Some(other) if other != text => return (other, text),
                _ => {}
            }
        }
    }

    #[tokio::test]
    async fn texts_with_the_same_key_each_find_their_own_records() {
        let a = Archive::open(None).unwrap();
        let (w1, w2) = colliding_texts("wamid.HBgL");
        let (to1, to2) = colliding_texts("1555");
        assert_eq!(text_key(&w1), text_key(&w2));
        let ids: Vec<String> = (0..2)
            .map(|_| MessageId::generate().as_ref().to_string())
            .collect();
        for (id, (wamid, to)) in ids.iter().zip([(&w1, &to1), (&w2, &to2)]) {
            a.put_record(RecordRow {
                to: to.clone(),
                wamid: Some(wamid.clone()),
                ..row(id, "main", "sent", &[])
            });
        }
        a.sync().await.unwrap();
        assert_eq!(a.record_by_wamid(&w1).as_deref(), Some(ids[0].as_bytes()));
        assert_eq!(a.record_by_wamid(&w2).as_deref(), Some(ids[1].as_bytes()));
        for (to, id) in [(&to1, &ids[0]), (&to2, &ids[1])] {
            let listed = a.records(&RecordQuery {
                to: Some(to),
                limit: 10,
                ..Default::default()
            });
            assert_eq!(listed, vec![id.as_bytes().to_vec()], "to {to}");
        }
    }

    #[tokio::test]
    async fn a_conversations_entries_of_one_batch_share_a_row_and_read_back_one_by_one() {
        let a = Archive::open(None).unwrap();
        let latest = Arc::new(Mutex::new(Vec::new()));
        let l = latest.clone();
        a.on_history_committed(move |rows| {
            l.lock().extend(
                rows.iter()
                    .map(|(a, c, s)| (a.to_string(), c.to_string(), *s)),
            )
        });
        let entry = |contact: &str, seq: u64| HistoryRow {
            account: "main".into(),
            contact: contact.into(),
            seq,
            at: 1_000 + seq as i64,
            body: format!("{{\"{contact}\":{seq}}}").into_bytes(),
        };
        // Interleaved with another conversation's, as lanes hand them over.
        for (c, seq) in [("a", 1), ("b", 1), ("a", 2), ("a", 3), ("b", 2)] {
            a.put_history(entry(c, seq));
        }
        a.sync().await.unwrap();
        assert_eq!(a.counts(), (0, 2), "one row a conversation");
        let mut reported = latest.lock().clone();
        reported.sort();
        assert_eq!(
            reported,
            [
                ("main".into(), "a".into(), 3),
                ("main".into(), "b".into(), 2)
            ],
            "each conversation's latest entry"
        );
        let read = |contact: &str, limit| -> Vec<(u64, String)> {
            a.history("main", contact, limit)
                .into_iter()
                .map(|(seq, b)| (seq, String::from_utf8(b).unwrap()))
                .collect()
        };
        assert_eq!(
            read("a", 50),
            [
                (1, r#"{"a":1}"#.to_string()),
                (2, r#"{"a":2}"#.to_string()),
                (3, r#"{"a":3}"#.to_string())
            ]
        );
        assert_eq!(read("a", 2).iter().map(|e| e.0).collect::<Vec<_>>(), [2, 3]);
        assert_eq!(read("b", 50).len(), 2);
        // Written again after a replay, grouped otherwise: each entry once.
        a.put_history(entry("a", 2));
        a.sync().await.unwrap();
        a.put_history(entry("a", 3));
        a.put_history(entry("a", 4));
        a.sync().await.unwrap();
        assert_eq!(
            read("a", 50).iter().map(|e| e.0).collect::<Vec<_>>(),
            [1, 2, 3, 4]
        );
        assert_eq!(
            read("a", 3).iter().map(|e| e.0).collect::<Vec<_>>(),
            [2, 3, 4]
        );
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
