//! The cluster's log: the journal on a Redis stream. Entries are
//! `n` (the router that wrote it) and `b` (journal frames, as in a log
//! file). Appends are group-committed; every router replays the log at
//! start and then follows it, applying what the others wrote.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use redis::Value;
use tokio::sync::mpsc::UnboundedReceiver;

use super::{Cluster, ClusterError};
use crate::journal::{Cmd, Journal, split_frames};

/// One `XADD` carries at most this many bytes of frames.
const MAX_ENTRY: usize = 4 << 20;
/// Entries read by one `XRANGE`/`XREAD`.
const PAGE: usize = 512;

/// Whether stream id `a` ≤ `b` (`ms-seq`).
pub(super) fn id_le(a: &str, b: &str) -> bool {
    parse_id(a) <= parse_id(b)
}

fn parse_id(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

/// An entry of a stream reply: id and its fields.
pub(super) struct Entry {
    pub id: String,
    pub fields: Vec<(String, Vec<u8>)>,
}

impl Entry {
    pub fn field(&self, name: &str) -> Option<&[u8]> {
        self.fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
    }
}

/// The entries of an `XRANGE`/`XREVRANGE` reply (`[[id, [k, v, …]], …]`).
pub(super) fn entries(v: &Value) -> Vec<Entry> {
    let Value::Array(items) = v else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|item| {
            let Value::Array(pair) = item else {
                return None;
            };
            let id = text(pair.first()?)?;
            let Value::Array(kv) = pair.get(1)? else {
                return None;
            };
            let fields = kv
                .chunks(2)
                .filter_map(|c| match c {
                    [k, Value::BulkString(v)] => Some((text(k)?, v.clone())),
                    _ => None,
                })
                .collect();
            Some(Entry { id, fields })
        })
        .collect()
}

/// The entries per stream of an `XREAD` reply (RESP2 `[[name, entries]…]`
/// or RESP3 map).
pub(super) fn read_reply(v: &Value) -> Vec<(String, Vec<Entry>)> {
    match v {
        Value::Array(streams) => streams
            .iter()
            .filter_map(|s| match s {
                Value::Array(p) if p.len() == 2 => Some((text(&p[0])?, entries(&p[1]))),
                _ => None,
            })
            .collect(),
        Value::Map(m) => m
            .iter()
            .filter_map(|(k, v)| Some((text(k)?, entries(v))))
            .collect(),
        _ => Vec::new(),
    }
}

impl Cluster {
    /// The journal of this router: frames go to the log.
    pub fn journal(self: &Arc<Self>) -> Journal {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let failed = Arc::new(AtomicBool::new(false));
        tokio::spawn(self.clone().write_log(rx, failed.clone()));
        Journal::remote(tx, failed)
    }

    /// Group commit to the log. A failed `XADD` keeps its frames and is
    /// retried (in order) until Redis takes them; syncs waiting meanwhile
    /// answer `false` (the caller answers 503), and the journal reads as
    /// failed until a write succeeds again.
    async fn write_log(self: Arc<Self>, mut rx: UnboundedReceiver<Cmd>, failed: Arc<AtomicBool>) {
        let key = self.key(&["log"]);
        let mut conn = self.conn();
        let mut buf: Vec<u8> = Vec::new();
        let mut waiting = Vec::new();
        loop {
            if buf.is_empty() {
                match rx.recv().await {
                    Some(cmd) => take(cmd, &mut buf, &mut waiting),
                    None => return,
                }
            }
            while buf.len() < MAX_ENTRY {
                match rx.try_recv() {
                    Ok(cmd) => take(cmd, &mut buf, &mut waiting),
                    Err(_) => break,
                }
            }
            if buf.is_empty() {
                for w in waiting.drain(..) {
                    let _ = w.send(true);
                }
                continue;
            }
            let written: Result<String, _> = redis::cmd("XADD")
                .arg(&key)
                .arg("*")
                .arg("n")
                .arg(&self.node)
                .arg("b")
                .arg(&buf)
                .query_async(&mut conn)
                .await;
            match written {
                Ok(_) => {
                    buf.clear();
                    failed.store(false, Ordering::Release);
                    for w in waiting.drain(..) {
                        let _ = w.send(true);
                    }
                }
                Err(e) => {
                    if !failed.swap(true, Ordering::AcqRel) {
                        tracing::error!(error = %e, "cannot append to the cluster log; retrying");
                    }
                    for w in waiting.drain(..) {
                        let _ = w.send(false);
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    /// Apply the whole log (startup, before anything is accepted); returns
    /// the id of the last entry.
    pub async fn replay(
        &self,
        mut apply: impl FnMut(&[u8]) -> Result<(), String>,
    ) -> Result<(String, u64), ClusterError> {
        let key = self.key(&["log"]);
        let mut conn = self.conn();
        let mut last = "0-0".to_string();
        let mut applied = 0;
        if let Some((covered, records)) = self.load_snapshot(&mut apply).await? {
            tracing::info!(covered = %covered, records, "cluster snapshot loaded");
            applied += records;
            last = covered;
        }
        loop {
            let page: Value = redis::cmd("XRANGE")
                .arg(&key)
                .arg(format!("({last}"))
                .arg("+")
                .arg("COUNT")
                .arg(PAGE)
                .query_async(&mut conn)
                .await?;
            let page = entries(&page);
            if page.is_empty() {
                break;
            }
            for e in &page {
                applied += apply_entry(e, &mut apply)?;
            }
            last = page.last().map(|e| e.id.clone()).unwrap_or(last);
        }
        self.note_applied(&last);
        Ok((last, applied))
    }

    /// Follow the log from `from`, applying what other routers wrote.
    pub fn spawn_follow(
        self: &Arc<Self>,
        from: String,
        mut apply: impl FnMut(&[u8]) -> Result<(), String> + Send + 'static,
    ) {
        let this = self.clone();
        tokio::spawn(async move {
            let key = this.key(&["log"]);
            let mut last = from;
            let mut conn = None;
            loop {
                let Some(c) = this.reconnect(&mut conn, "follow the cluster log").await else {
                    continue;
                };
                let read: Result<Value, _> = redis::cmd("XREAD")
                    .arg("COUNT")
                    .arg(PAGE)
                    .arg("BLOCK")
                    .arg(1000)
                    .arg("STREAMS")
                    .arg(&key)
                    .arg(&last)
                    .query_async(c)
                    .await;
                let read = match read {
                    Ok(v) => v,
                    Err(e) => {
                        tracing::warn!(error = %e, "reading the cluster log failed; retrying");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                };
                for (_, page) in read_reply(&read) {
                    for e in &page {
                        if e.field("n") != Some(this.node.as_bytes())
                            && let Err(err) = apply_entry(e, &mut apply)
                        {
                            tracing::error!(entry = %e.id, error = %err, "a cluster log entry could not be applied");
                        }
                        last = e.id.clone();
                    }
                    this.note_applied(&last);
                }
            }
        });
    }
}

fn take(cmd: Cmd, buf: &mut Vec<u8>, waiting: &mut Vec<tokio::sync::oneshot::Sender<bool>>) {
    match cmd {
        Cmd::Frame(f) => buf.extend_from_slice(&f),
        Cmd::Sync(s) => waiting.push(s),
        Cmd::Rotate(r) => {
            let _ = r.send(Err("a cluster's log is not rotated".into()));
        }
    }
}

fn apply_entry(
    e: &Entry,
    apply: &mut impl FnMut(&[u8]) -> Result<(), String>,
) -> Result<u64, ClusterError> {
    let Some(frames) = e.field("b") else {
        return Ok(0);
    };
    let frames =
        split_frames(frames).map_err(|err| ClusterError(format!("log entry {}: {err}", e.id)))?;
    let mut n = 0;
    for payload in frames {
        apply(payload).map_err(|err| ClusterError(format!("log entry {}: {err}", e.id)))?;
        n += 1;
    }
    Ok(n)
}

/// A router that reported no progress for this long no longer holds back
/// the trimming of the log (it is gone; a router that starts reads the
/// snapshot).
const REPORT_STALE_MS: u64 = 10 * 60 * 1000;
/// Bytes of frames per chunk of a snapshot.
const CHUNK: usize = 4 << 20;

/// Point `snapshot` at the new one, drop the old one, and trim the log
/// before `ARGV[2]`: `KEYS[1]` snapshot pointer, `KEYS[2]` log, `KEYS[3]`
/// the new snapshot's list; `ARGV[1]` the log id it covers. Returns the
/// entries trimmed.
pub(super) const INSTALL: &str = r"
local old = redis.call('GET', KEYS[1])
redis.call('SET', KEYS[1], ARGV[1])
if old and old ~= ARGV[1] then
  redis.call('DEL', ARGV[3] .. old)
end
return redis.call('XTRIM', KEYS[2], 'MINID', ARGV[2])
";

impl Cluster {
    /// Tell the cluster how far this router applied the log (it holds back
    /// the trimming), and check that nothing it did not apply was trimmed.
    pub(super) async fn report_applied(&self) -> Result<(), ClusterError> {
        let applied = self.applied.lock().clone();
        let mut conn = self.conn();
        let now = crate::domain::now_ms();
        let first: Value = redis::pipe()
            .cmd("HSET")
            .arg(self.key(&["applied"]))
            .arg(&self.node)
            .arg(format!("{applied}|{now}"))
            .ignore()
            .cmd("XRANGE")
            .arg(self.key(&["log"]))
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut conn)
            .await?;
        let first = match &first {
            Value::Array(v) => v.first().map(entries).unwrap_or_default(),
            _ => Vec::new(),
        };
        if let Some(first) = first.first()
            && applied != "0-0"
            && !id_le(&first.id, &next_after(&applied))
        {
            // Entries this router never applied are gone: its state is not
            // the cluster's any more. Stop, so that a restart reads the
            // snapshot.
            tracing::error!(applied = %applied, first = %first.id, "the cluster log was trimmed past what this router applied; stopping (restart it)");
            std::process::exit(70);
        }
        Ok(())
    }

    /// Stop holding back the log's trimming (shutdown).
    pub(super) async fn forget_applied(&self) {
        let mut conn = self.conn();
        let _: Result<i64, _> = redis::cmd("HDEL")
            .arg(self.key(&["applied"]))
            .arg(&self.node)
            .query_async(&mut conn)
            .await;
    }

    /// Drop the log entries the last snapshot covers and every live
    /// router applied; returns the bytes the log still takes in Redis.
    pub(super) async fn trim(&self) -> Result<u64, ClusterError> {
        let mut conn = self.conn();
        let covered: Option<String> = redis::cmd("GET")
            .arg(self.key(&["snapshot"]))
            .query_async(&mut conn)
            .await?;
        let log = self.key(&["log"]);
        let mut pipe = redis::pipe();
        if let Some(covered) = covered {
            let point = self.trim_point(&covered).await?;
            pipe.cmd("XTRIM").arg(&log).arg("MINID").arg(point).ignore();
        }
        let (left,): (Option<u64>,) = pipe
            .cmd("MEMORY")
            .arg("USAGE")
            .arg(&log)
            .query_async(&mut conn)
            .await?;
        Ok(left.unwrap_or(0))
    }

    /// Write a snapshot of this router's state (`dump`, as for a data
    /// directory's snapshot) covering the log up to what it applied, then
    /// trim the log before what every live router applied. Run by the
    /// holder of the snapshot lease only. Returns (records, entries trimmed).
    pub async fn snapshot(
        &self,
        dump: impl FnOnce(&mut dyn FnMut(&[u8])) + Send + 'static,
    ) -> Result<(usize, u64), ClusterError> {
        let covered = self.applied.lock().clone();
        let list = self.key(&["snapshot", &covered]);
        let mut conn = self.conn();
        let _: i64 = redis::cmd("DEL").arg(&list).query_async(&mut conn).await?;
        // Encoded as it is read, a chunk at a time.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(2);
        let dumper = tokio::task::spawn_blocking(move || {
            let mut records = 0;
            let mut chunk = Vec::with_capacity(CHUNK);
            dump(&mut |payload| {
                records += 1;
                chunk.extend_from_slice(&crate::journal::frame(payload));
                if chunk.len() >= CHUNK {
                    let full = std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK));
                    let _ = tx.blocking_send(full);
                }
            });
            if !chunk.is_empty() {
                let _ = tx.blocking_send(chunk);
            }
            records
        });
        while let Some(chunk) = rx.recv().await {
            let _: i64 = redis::cmd("RPUSH")
                .arg(&list)
                .arg(chunk)
                .query_async(&mut conn)
                .await?;
        }
        let records = dumper
            .await
            .map_err(|e| ClusterError(format!("snapshot: {e}")))?;
        let trim_to = self.trim_point(&covered).await?;
        let trimmed: u64 = self
            .install_script
            .key(self.key(&["snapshot"]))
            .key(self.key(&["log"]))
            .key(&list)
            .arg(&covered)
            .arg(&trim_to)
            .arg(self.key(&["snapshot", ""]))
            .invoke_async(&mut conn)
            .await?;
        Ok((records, trimmed))
    }

    /// The oldest log id still needed: the first entry after what the
    /// slowest live router applied, and never past `covered`.
    async fn trim_point(&self, covered: &str) -> Result<String, ClusterError> {
        let mut point = next_after(covered);
        for (id, age) in self.reports().await? {
            if age < REPORT_STALE_MS && id_le(&next_after(&id), &point) {
                point = next_after(&id);
            }
        }
        Ok(point)
    }

    /// What each router last reported: how far it applied the log, and how
    /// long ago it said so (ms).
    pub(super) async fn reports(&self) -> Result<Vec<(String, u64)>, ClusterError> {
        let mut conn = self.conn();
        let reports: Vec<(String, String)> = redis::cmd("HGETALL")
            .arg(self.key(&["applied"]))
            .query_async(&mut conn)
            .await?;
        let now = crate::domain::now_ms() as u64;
        Ok(reports
            .into_iter()
            .filter_map(|(_, r)| {
                let (id, at) = r.split_once('|')?;
                Some((id.to_string(), now.saturating_sub(at.parse().ok()?)))
            })
            .collect())
    }

    /// Load the newest snapshot, if any; returns the log id it covers.
    pub(super) async fn load_snapshot(
        &self,
        apply: &mut impl FnMut(&[u8]) -> Result<(), String>,
    ) -> Result<Option<(String, u64)>, ClusterError> {
        let mut conn = self.conn();
        let covered: Option<String> = redis::cmd("GET")
            .arg(self.key(&["snapshot"]))
            .query_async(&mut conn)
            .await?;
        let Some(covered) = covered else {
            return Ok(None);
        };
        let list = self.key(&["snapshot", &covered]);
        let len: i64 = redis::cmd("LLEN").arg(&list).query_async(&mut conn).await?;
        let mut records = 0;
        for i in 0..len {
            let chunk: Vec<u8> = redis::cmd("LINDEX")
                .arg(&list)
                .arg(i)
                .query_async(&mut conn)
                .await?;
            let frames = split_frames(&chunk)
                .map_err(|e| ClusterError(format!("snapshot {covered}: {e}")))?;
            for payload in frames {
                apply(payload).map_err(|e| ClusterError(format!("snapshot {covered}: {e}")))?;
                records += 1;
            }
        }
        Ok(Some((covered, records)))
    }
}

/// The smallest stream id after `id`.
fn next_after(id: &str) -> String {
    let (ms, seq) = parse_id(id);
    format!("{ms}-{}", seq + 1)
}
