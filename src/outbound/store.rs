//! The outbound store: every outbound record, the wamid index, statuses
//! that came before their send answer, and one FIFO per account
//! ([`AccountQueue`]). It owns the records' status machine (SPEC §6: never
//! backwards; late failures apply) and reports status changes for
//! `message.status` events. It reads the conversation state (accounts,
//! windows, consent) and writes to it only the outbound side of a
//! conversation's history and a window closed by Meta (131047).
//!
//! Invariants: a record is changed only under its DashMap entry, and its
//! journal op is appended there, so the journal keeps the order of
//! changes; no guard is held across `.await`.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use dashmap::DashMap;
use parking_lot::{Mutex, RwLock};
use tokio::sync::mpsc;

use super::ops::{OutboxOp, RecordWire, UpdateWire};
use super::order::Order;
use super::queue::AccountQueue;
use super::record::{OutboundRecord, RecordError, Status};
use crate::archive::{Archive, RecordQuery, RecordRow};
use crate::domain::Millis;
use crate::ids::{AccountName, ContactId, MessageId, Wamid};
use crate::inbound::StatusUpdate;
use crate::persist::{Owner, encode};
use crate::state::{Account, Direction, Recent, State};
use crate::telemetry::Metrics;

/// The hasher of the tables keyed by ids (ours, or Meta's signed ones):
/// SipHash was 1 % of the router's CPU under load.
type Fast = foldhash::fast::RandomState;

/// Statuses of wamids not (yet) known, kept in case the send answer is
/// late: at most this many wamids, each for at most [`ORPHAN_TTL_MS`].
const ORPHAN_CAPACITY: usize = 10_000;
/// Statuses of messages this router did not send (other apps on the same
/// number) would otherwise stay forever.
pub const ORPHAN_TTL_MS: Millis = 10 * 60 * 1000;
/// Wamids remembered as absent from the archive, at most.
const ABSENT_CAPACITY: usize = 16_384;
/// How long a settled record stays in memory before it is written to the
/// archive: Meta's statuses of a send (`sent`, `delivered`) come within
/// seconds, and each would otherwise write the record again (and read it
/// back first, once it had left memory).
const SETTLE_MS: Millis = 10_000;
/// Settled records waiting for the archive at most (≈ 4 KB each with
/// their indexes, measured: about 30 MB): at Meta's upgraded 1,000
/// messages/s a wait of 8 s. Past it the oldest are written at once.
const SETTLE_MAX: usize = 8_192;
/// With nothing settled for this long, the waiting records are written
/// at once: memory goes back to the live work when a spike ends.
const SETTLE_QUIET_MS: Millis = 1_000;

/// What applying a Meta status did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatusOutcome {
    Applied {
        id: MessageId,
        status: Status,
    },
    /// Known message, but the status would move it backwards or repeats.
    Ignored,
    /// No message with that wamid (yet); kept in case the send answer is late.
    Unknown,
}

/// Filters of `GET /v1/messages`.
#[derive(Debug, Clone, Default)]
pub struct RecordFilter {
    pub account: Option<String>,
    pub to: Option<String>,
    pub status: Option<Status>,
    pub tag: Option<String>,
}

impl RecordFilter {
    fn matches(&self, r: &OutboundRecord) -> bool {
        self.account.as_ref().is_none_or(|a| r.account == *a)
            && self.to.as_ref().is_none_or(|t| r.to == *t)
            && self.status.is_none_or(|s| s == r.status)
            && self.tag.as_ref().is_none_or(|t| r.tags.contains(t))
    }
}

/// The outbound store (see the module documentation).
pub struct Outbox {
    state: Arc<State>,
    records: DashMap<MessageId, OutboundRecord, Fast>,
    by_wamid: DashMap<Wamid, MessageId, Fast>,
    /// wamid → (first seen, statuses) for statuses that came before their
    /// send answer.
    orphans: DashMap<Wamid, (Millis, Vec<StatusUpdate>), Fast>,
    /// Record ids in creation order (UUID v7 sorts by time), for listing.
    order: Mutex<Order>,
    /// Wamids the archive was searched for and did not have (at most
    /// [`ABSENT_CAPACITY`], then forgotten at once): see
    /// [`Outbox::archived_by_wamid`].
    absent: DashMap<Wamid, (), Fast>,
    /// One queue per account, by account id.
    queues: RwLock<Vec<Arc<AccountQueue>>>,
    metrics: Arc<Metrics>,
    /// Where status changes go for `message.status` events, if anywhere.
    status_changes: mpsc::UnboundedSender<OutboundRecord>,
    /// Where settled records go, [`SETTLE_MS`] after they settled; they
    /// leave memory once it has their last version.
    archive: Arc<Archive>,
    /// Settled records not yet handed to the archive.
    settling: Mutex<Settling>,
    /// When this process started (unix ms).
    started_at: Millis,
    /// Whether status changes are wanted now ([`Outbox::report_statuses_when`]).
    status_wanted: std::sync::OnceLock<Box<dyn Fn() -> bool + Send + Sync>>,
}

/// Settled records waiting for the archive: each once, in the order it
/// settled (changes meanwhile are written with it).
#[derive(Default)]
struct Settling {
    /// (write at, id), oldest first.
    queue: VecDeque<(Millis, MessageId)>,
    ids: HashSet<MessageId, Fast>,
    /// When a record last joined.
    last: Millis,
}

impl Settling {
    /// `id` settled (again) at `now`: written [`SETTLE_MS`] after it first
    /// joined.
    fn join(&mut self, id: &MessageId, now: Millis) {
        self.last = now;
        if self.ids.insert(id.clone()) {
            self.queue.push_back((now + SETTLE_MS, id.clone()));
        }
    }

    /// Take the records to write now: those due at `now`, the oldest past
    /// [`SETTLE_MAX`], or all of them when `quiet` and none joined for
    /// [`SETTLE_QUIET_MS`].
    fn take_due(&mut self, now: Millis, quiet: bool) -> Vec<MessageId> {
        let all = quiet && now - self.last >= SETTLE_QUIET_MS;
        let mut due = Vec::new();
        while let Some((at, _)) = self.queue.front() {
            if !(all || *at <= now || self.queue.len() > SETTLE_MAX) {
                break;
            }
            if let Some((_, id)) = self.queue.pop_front() {
                self.ids.remove(&id);
                due.push(id);
            }
        }
        due
    }

    /// Take every waiting record.
    fn take_all(&mut self) -> Vec<MessageId> {
        self.ids.clear();
        self.queue.drain(..).map(|(_, id)| id).collect()
    }
}

/// Records that wait to be queued again (replay, cluster takeover): ready
/// ones by acceptance, scheduled ones by their time, interrupted sends.
#[derive(Default)]
struct Waiting {
    queued: Vec<(Millis, MessageId, AccountName, ContactId)>,
    scheduled: Vec<(Millis, MessageId, AccountName, ContactId)>,
    interrupted: Vec<MessageId>,
}

impl Waiting {
    /// Note `r` if it waits (or, with `settle`, was being sent); whether
    /// it was noted.
    fn note(&mut self, r: &OutboundRecord, now: Millis, settle: bool) -> bool {
        let entry = |at| (at, r.id.clone(), r.account.clone(), r.to.clone());
        match r.status {
            Status::Queued => self.queued.push(entry(r.created_at)),
            Status::Scheduled => self.scheduled.push(entry(r.send_at.unwrap_or(now))),
            Status::Sending if settle => self.interrupted.push(r.id.clone()),
            _ => return false,
        }
        true
    }
}

/// A send the router stopped in the middle of (SPEC §9: not sent again).
fn interrupted_error() -> RecordError {
    RecordError {
        code: INTERRUPTED.into(),
        graph_code: None,
        message: "the router stopped while this message was being sent; WhatsApp may or may not have received it, so it is not sent again (retry it if needed)".into(),
    }
}

impl Outbox {
    /// An empty store over `state`; status changes come out of the
    /// returned channel while [`Outbox::report_statuses_when`] says they
    /// are wanted.
    pub fn new(
        state: Arc<State>,
        metrics: Arc<Metrics>,
    ) -> (Self, mpsc::UnboundedReceiver<OutboundRecord>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Outbox {
                records: DashMap::default(),
                by_wamid: DashMap::default(),
                orphans: DashMap::default(),
                absent: DashMap::default(),
                order: Mutex::default(),
                queues: RwLock::default(),
                metrics,
                status_changes: tx,
                archive: state.archive().clone(),
                settling: Mutex::default(),
                started_at: crate::domain::now_ms(),
                status_wanted: std::sync::OnceLock::new(),
                state,
            },
            rx,
        )
    }

    /// Write settled records to the archive as they come due and drop
    /// them from memory once it committed them, unless they changed (or
    /// went back to the queue) meanwhile. Call once, on the shared outbox,
    /// before anything is stored.
    pub fn start_archiving(self: &Arc<Self>) {
        let me = Arc::downgrade(self);
        self.archive.on_records_committed(move |rows, idle| {
            let Some(me) = me.upgrade() else {
                return;
            };
            me.archive_committed(rows, idle, crate::domain::now_ms());
        });
    }

    /// The archive committed `rows` (or has been `idle` for a second):
    /// drop them from memory, and hand it the settled records that are
    /// due (see [`Settling::take_due`]). Runs on the archive's thread after
    /// each commit and each idle second.
    fn archive_committed(&self, rows: &[(&str, u32)], idle: bool, now: Millis) {
        for (id, version) in rows {
            self.evict_archived(id, *version);
        }
        let due = self.settling.lock().take_due(now, idle);
        self.write_waiting(due);
    }

    /// Hand these records, taken from the wait, to the archive now (those
    /// still in memory). Call with no record's lock held.
    fn write_waiting(&self, ids: Vec<MessageId>) {
        for id in ids {
            if let Some(r) = self.records.get(&id) {
                self.write_archive(&r);
            }
        }
    }

    fn evict_archived(&self, id: &str, version: u32) {
        // A record waiting to be written again (changed since) stays.
        let Some((_, r)) = self.records.remove_if(id, |id, r| {
            r.status.is_settled()
                && r.history.len() as u32 == version
                && !self.settling.lock().ids.contains(id)
        }) else {
            return;
        };
        self.order.lock().remove(id);
        if let Some(w) = &r.wamid {
            self.by_wamid.remove_if(w.as_str(), |_, v| v.as_str() == id);
        }
    }

    /// Have a settled record written to the archive [`SETTLE_MS`] from
    /// now, with the changes it gets until then (Meta's statuses of the
    /// send). Takes no record's lock: callers may hold this one's.
    fn archive_soon(&self, r: &OutboundRecord) {
        if !r.status.is_settled() {
            return;
        }
        self.settling.lock().join(&r.id, crate::domain::now_ms());
    }

    /// Hand a settled record to the archive now.
    fn write_archive(&self, r: &OutboundRecord) {
        if !r.status.is_settled() {
            return;
        }
        // Sized for a typical record, so that writing it does not grow
        // the buffer three or four times.
        let mut body = Vec::with_capacity(1024);
        if serde_json::to_writer(&mut body, &RecordWire::from(r)).is_err() {
            return;
        }
        self.archive.put_record(RecordRow {
            id: r.id.as_str().to_owned(),
            account: r.account.as_str().to_owned(),
            to: r.to.as_str().to_owned(),
            status: r.status.as_str(),
            wamid: r.wamid.as_ref().map(|w| w.as_str().to_owned()),
            created_at: r.created_at,
            tags: r.tags.clone(),
            body,
            version: r.history.len() as u32,
        });
    }

    fn decode(body: &[u8]) -> Option<OutboundRecord> {
        match serde_json::from_slice::<RecordWire>(body) {
            Ok(w) => Some(w.into()),
            Err(e) => {
                tracing::error!(error = %e, "unreadable record in the archive");
                None
            }
        }
    }

    /// Bring an archived record back into memory (to change it): `loaded`
    /// if the caller just read it from the archive, else read now. Whether
    /// it is in memory now.
    fn reload(&self, id: &str, loaded: Option<OutboundRecord>) -> bool {
        if self.records.contains_key(id) {
            return true;
        }
        let loaded = loaded.filter(|r| r.id.as_str() == id);
        let Some(r) = loaded.or_else(|| self.archive.record(id).and_then(|b| Self::decode(&b)))
        else {
            return false;
        };
        let wamid = r.wamid.clone();
        let inserted = match self.records.entry(id.into()) {
            dashmap::mapref::entry::Entry::Vacant(e) => {
                e.insert(r);
                true
            }
            dashmap::mapref::entry::Entry::Occupied(_) => false,
        };
        // The order lock is never taken under a record's (list_records
        // takes them the other way round).
        if inserted {
            self.order.lock().insert(id);
        }
        if let Some(w) = wamid {
            self.index_wamid(w, id.into());
        }
        true
    }

    /// Change a record wherever it is (memory or archive); see
    /// [`Outbox::update_record`]. A record brought back from the archive
    /// (`loaded`: as the caller just read it there) is handed to it again
    /// afterwards, changed or not.
    fn update_anywhere<R>(
        &self,
        id: &str,
        now: Millis,
        mut loaded: Option<OutboundRecord>,
        f: impl Fn(&mut OutboundRecord) -> (Option<Status>, R),
    ) -> Option<R> {
        if let Some(out) = self.update_record(id, now, &f) {
            return Some(out);
        }
        // Not in memory: archived (or evicted by the archive's hook while
        // we looked; then it is archived too).
        for _ in 0..3 {
            if !self.reload(id, loaded.take()) {
                return None;
            }
            if let Some(out) = self.update_record(id, now, &f) {
                if let Some(r) = self.records.get(id) {
                    self.archive_soon(&r);
                }
                return Some(out);
            }
        }
        None
    }

    /// The conversation state this store reads.
    pub fn state(&self) -> &Arc<State> {
        &self.state
    }

    /// The queue of `account` (created on first use).
    pub fn queue(&self, account: &Account) -> Arc<AccountQueue> {
        let i = usize::from(account.id);
        if let Some(q) = self.queues.read().get(i) {
            return q.clone();
        }
        let mut queues = self.queues.write();
        while queues.len() <= i {
            queues.push(Arc::default());
        }
        queues[i].clone()
    }

    fn log<'a>(&self, op: impl FnOnce() -> OutboxOp<'a>) {
        if let Some(j) = self.state.journal() {
            j.append(&encode(Owner::Outbox, &op()));
        }
    }

    /// Store a new record and, unless it is already final, queue it.
    /// Returns its position in the ready queue (1 = next), or 0 when
    /// scheduled or final.
    pub fn insert_record(&self, account: &Account, record: OutboundRecord, now: Millis) -> usize {
        let id = record.id.clone();
        let status = record.status;
        let send_at = record.send_at;
        let conv_recent = Recent {
            direction: Direction::Out,
            id: id.to_string(),
            kind: record.content.kind.as_str().to_string(),
            text: record.content.summary(),
            at: now,
        };
        let to = record.to.clone();
        for (s, _) in &record.history {
            self.metrics.outbound(s.as_str());
        }
        if status.is_final() {
            self.report_status(&record);
        }
        self.log(|| OutboxOp::Record(Box::new(RecordWire::from(&record))));
        let queue = self.queue(account);
        if self.records.insert(id.clone(), record).is_none() {
            let held = queue.records.fetch_add(1, Ordering::Relaxed) + 1;
            // Past the cap by a tenth: drop the oldest finished records
            // down to 90 % of it (amortised: one scan per cap/5 inserts).
            let cap = account.settings.max_records;
            if held > cap + cap / 10 {
                self.evict_records(account, cap - cap / 10);
            }
        }
        self.order.lock().insert(&id);
        if status.is_settled()
            && let Some(r) = self.records.get(&id)
        {
            self.archive_soon(&r);
        }
        self.state.note_outbound(account.id, &to, conv_recent, now);
        let position = match status {
            Status::Scheduled => {
                queue.schedule(send_at.unwrap_or(now), to, id);
                0
            }
            Status::Queued => queue.push(to, id),
            _ => 0,
        };
        if !status.is_final() {
            queue.notify.notify_one();
        }
        position
    }

    /// Drop the oldest finished records of `account` until it holds `keep`:
    /// the archive deletes them (they are the oldest; the queue and the
    /// in-flight records are in memory and newer).
    fn evict_records(&self, account: &Account, keep: usize) {
        let queue = self.queue(account);
        let held = queue.records.load(Ordering::Relaxed);
        let excess = held.saturating_sub(keep);
        // The settled records waiting for the archive are among the
        // oldest: written now, the archive drops them with the others.
        let waiting = self.settling.lock().take_all();
        self.write_waiting(waiting);
        self.archive.evict_oldest(account.name(), excess);
        queue.records.fetch_sub(excess, Ordering::Relaxed);
        self.metrics.records_evicted(excess);
        tracing::warn!(
            account = account.name(),
            dropped = excess,
            max_records = account.settings.max_records,
            "account holds more records than max_records; the oldest finished ones were dropped"
        );
    }

    /// Remove one record with its indexes (journaled).
    fn forget_record(&self, id: &str, wamid: Option<&str>) {
        if let Some((_, r)) = self.records.remove(id)
            && let Some(a) = self.state.account_by_name(&r.account)
        {
            self.queue(&a).records.fetch_sub(1, Ordering::Relaxed);
        }
        self.order.lock().remove(id);
        if let Some(w) = wamid {
            self.by_wamid.remove(w);
        }
        self.log(|| OutboxOp::ForgetRecord { id: id.to_string() });
    }

    /// A record, from memory or the archive.
    pub fn record(&self, id: &str) -> Option<OutboundRecord> {
        if let Some(r) = self.records.get(id) {
            return Some(r.clone());
        }
        let archived = self.archive.record(id).and_then(|b| Self::decode(&b));
        // Evicted between the two looks: it is in memory again or archived.
        archived.or_else(|| self.records.get(id).map(|r| r.clone()))
    }

    /// The record with a derived id (a rule reply), if it was made
    /// already: rules run again for a message acknowledged before a crash.
    /// Within one process a message's rules run once (dedupe), so only a
    /// message replayed after a restart, or one older than this process,
    /// can have replies made earlier, perhaps archived since: only then
    /// (`may_exist`) is the archive asked, not for every rule reply.
    pub fn existing_reply(&self, id: &MessageId, may_exist: bool) -> Option<OutboundRecord> {
        if let Some(r) = self.records.get(id.as_str()) {
            return Some(r.clone());
        }
        if may_exist { self.record(id) } else { None }
    }

    /// When this process started (unix ms).
    pub fn started_at(&self) -> Millis {
        self.started_at
    }

    /// The record sent as `wamid`, from memory or the archive.
    fn record_by_wamid(&self, wamid: &str) -> Option<OutboundRecord> {
        if let Some(id) = self.by_wamid.get(wamid).map(|r| r.clone())
            && let Some(r) = self.record(&id)
        {
            return Some(r);
        }
        self.archived_by_wamid(wamid)
    }

    /// The record sent as `wamid`, from the archive only. A wamid the
    /// archive did not have is remembered ([`Outbox::absent`]): Meta's
    /// `sent`, `delivered` and `read` of a message this router did not send,
    /// or replies quoting it, search the archive (every part) once.
    fn archived_by_wamid(&self, wamid: &str) -> Option<OutboundRecord> {
        if self.absent.contains_key(wamid) {
            return None;
        }
        let found = self
            .archive
            .record_by_wamid(wamid)
            .and_then(|b| Self::decode(&b));
        if found.is_none() {
            if self.absent.len() >= ABSENT_CAPACITY {
                self.absent.clear();
            }
            self.absent.insert(wamid.into(), ());
            // Indexed meanwhile (it may reach the archive later): forget
            // the miss. `index_wamid` forgets it too, after indexing; one
            // of the two sees the other.
            if self.by_wamid.contains_key(wamid) {
                self.absent.remove(wamid);
            }
        }
        found
    }

    /// Index a record's wamid. Every record with a wamid is indexed while it
    /// is in memory, before it can reach the archive: so a wamid the
    /// archive lacked stays absent from it until indexed here.
    fn index_wamid(&self, wamid: Wamid, id: MessageId) {
        let indexed = self.by_wamid.entry(wamid).insert(id);
        self.absent.remove(indexed.key().as_str());
    }

    pub fn record_id_by_wamid(&self, wamid: &str) -> Option<MessageId> {
        self.locate_wamid(wamid).map(|(id, _)| id)
    }

    /// The id of the record sent as `wamid`, and the record if it had to
    /// be read from the archive (so that a change reads it once).
    fn locate_wamid(&self, wamid: &str) -> Option<(MessageId, Option<OutboundRecord>)> {
        if let Some(id) = self.by_wamid.get(wamid) {
            return Some((id.clone(), None));
        }
        self.archived_by_wamid(wamid)
            .map(|r| (r.id.clone(), Some(r)))
    }

    /// Tags of the outbound message with this wamid (for `reply_to_tag`).
    pub fn tags_of_wamid(&self, wamid: &str) -> Vec<String> {
        self.record_by_wamid(wamid)
            .map(|r| r.tags)
            .unwrap_or_default()
    }

    /// Records in memory: the queued, scheduled and in-flight ones, and
    /// settled ones not yet archived.
    pub fn record_count(&self) -> usize {
        self.records.len()
    }

    /// Change a record under its lock; `f` returns the status to move to
    /// (recorded in history and metrics), or `None` to leave it.
    pub fn update_record<R>(
        &self,
        id: &str,
        now: Millis,
        f: impl FnOnce(&mut OutboundRecord) -> (Option<Status>, R),
    ) -> Option<R> {
        let mut r = self.records.get_mut(id)?;
        let (status, out) = f(&mut r);
        if let Some(s) = status {
            r.set_status(s, now);
            self.metrics.outbound(s.as_str());
            // `sending` and the re-queue after a transient failure are the
            // sender's inner steps, not news for agents.
            if !matches!(s, Status::Sending | Status::Queued | Status::Scheduled) {
                self.report_status(&r);
            }
        }
        // Logged under the record's lock, so the journal keeps the order of
        // changes; the changing fields only (content, tags and metadata
        // never change).
        self.log(|| OutboxOp::Update(Box::new(UpdateWire::from(&*r))));
        if status.is_some() {
            self.archive_soon(&r);
        }
        Some(out)
    }

    /// Report status changes only while `wanted()` holds (a target
    /// subscribed to statuses, or a live stream listening).
    pub fn report_statuses_when(&self, wanted: impl Fn() -> bool + Send + Sync + 'static) {
        let _ = self.status_wanted.set(Box::new(wanted));
    }

    fn report_status(&self, r: &OutboundRecord) {
        if self.status_wanted.get().is_some_and(|wanted| wanted()) {
            let _ = self.status_changes.send(r.clone());
        }
    }

    /// Sends the router could start and has not, over all accounts: none
    /// from a queue whose sender waits for its pace, rate or a pause (a
    /// long campaign queue is not the router falling behind), and per
    /// account at most what its `rate` starts in a tenth of a second. A
    /// queue held by `max_in_flight` counts: its sends wait for Graph's
    /// answers (see `max_backlog` in the README).
    pub fn due_backlog(&self, now: Millis) -> usize {
        self.state
            .accounts()
            .iter()
            .map(|a| {
                let per_tenth = (a.rate() as usize).div_ceil(10);
                self.queue(a).overdue(now).min(per_tenth)
            })
            .sum()
    }

    /// Cancel a queued or scheduled message. `Err(None)`: no such message;
    /// `Err(Some(status))`: it is past cancelling.
    pub fn cancel(&self, id: &str, now: Millis) -> Result<OutboundRecord, Option<Status>> {
        let outcome = self
            .update_anywhere(id, now, None, |r| {
                if matches!(r.status, Status::Queued | Status::Scheduled) {
                    (
                        Some(Status::Cancelled),
                        Ok((r.account.clone(), r.to.clone())),
                    )
                } else {
                    (None, Err(r.status))
                }
            })
            .ok_or(None)?;
        let (account, to) = outcome.map_err(Some)?;
        if let Some(a) = self.state.account_by_name(&account) {
            self.queue(&a).remove(&to, id);
        }
        self.record(id).ok_or(None)
    }

    /// Records newest first, after `cursor` (an id of a previous page),
    /// from memory and the archive. Returns the page and the cursor of the
    /// next one.
    pub fn list_records(
        &self,
        filter: &RecordFilter,
        cursor: Option<&str>,
        limit: usize,
    ) -> (Vec<OutboundRecord>, Option<MessageId>) {
        // One more than a page from each side tells whether more follow.
        let mut merged: std::collections::BTreeMap<MessageId, OutboundRecord> =
            std::collections::BTreeMap::new();
        {
            let order = self.order.lock();
            for id in order.newest_below(cursor) {
                let Some(r) = self.records.get(&id) else {
                    continue;
                };
                if filter.matches(&r) {
                    merged.insert(id, r.clone());
                    if merged.len() > limit {
                        break;
                    }
                }
            }
        }
        let archived = self.archive.records(&RecordQuery {
            account: filter.account.as_deref(),
            to: filter.to.as_deref(),
            status: filter.status.map(Status::as_str),
            tag: filter.tag.as_deref(),
            before: cursor,
            limit: limit + 1,
        });
        for r in archived.iter().filter_map(|b| Self::decode(b)) {
            // Memory is newer; an archived copy may lag a status behind.
            if !self.records.contains_key(&r.id) {
                merged.entry(r.id.clone()).or_insert(r);
            }
        }
        let mut page: Vec<OutboundRecord> = merged.into_values().rev().collect();
        let more = page.len() > limit;
        page.truncate(limit);
        let next = if more {
            page.last().map(|r| r.id.clone())
        } else {
            None
        };
        (page, next)
    }

    /// The send answered with `wamid`: mark sent and apply any statuses
    /// that arrived before the answer.
    pub fn mark_sent(&self, id: &str, wamid: &str, now: Millis) {
        self.update_record(id, now, |r| {
            r.wamid = Some(wamid.into());
            r.error = None;
            (Some(Status::Sent), ())
        });
        self.index_wamid(wamid.into(), id.into());
        // The wamid is indexed before the orphans are looked at: a status
        // parked concurrently is either seen here or finds the index.
        if let Some((_, (_, early))) = self.orphans.remove(wamid) {
            for u in early {
                self.apply_status(&u, now);
            }
        }
    }

    /// Graph error 131047 (CLOUD_API.md §9.2), from a send answer or a
    /// `failed` status, means the window is closed: the one place that acts
    /// on it.
    fn window_closed_by_meta(&self, account: &str, to: &str, graph_code: Option<i64>, now: Millis) {
        if graph_code == Some(131047)
            && let Some(a) = self.state.account_by_name(account)
        {
            self.state.close_window(a.id, to, now);
        }
    }

    /// End a record `failed` with `error` (a Graph error code 131047 also
    /// closes the window).
    pub fn mark_failed(&self, id: &str, error: RecordError, now: Millis) {
        let graph_code = error.graph_code;
        let target = self.update_record(id, now, |r| {
            r.error = Some(error);
            (Some(Status::Failed), (r.account.clone(), r.to.clone()))
        });
        if let Some((account, to)) = target {
            self.window_closed_by_meta(&account, &to, graph_code, now);
        }
    }

    /// Apply a delivery status from Meta (SPEC §3: never backwards).
    pub fn apply_status(&self, u: &StatusUpdate, now: Millis) -> StatusOutcome {
        let Some(next) = Status::parse(if u.status == "played" {
            "read"
        } else {
            &u.status
        }) else {
            return StatusOutcome::Ignored;
        };
        let (id, loaded) = match self.locate_wamid(&u.wamid) {
            Some(found) => found,
            None => match self.park_orphan(u, now) {
                Some(id) => (id, None),
                None => return StatusOutcome::Unknown,
            },
        };
        let at = if u.timestamp > 0 {
            u.timestamp.min(now)
        } else {
            now
        };
        let applied = self.update_anywhere(&id, at, loaded, |r| {
            // Pricing is kept whatever the status: a late `sent` that
            // changes nothing else may still carry it.
            let billing = u.pricing.is_some() && r.pricing != u.pricing
                || u.conversation.is_some() && r.conversation != u.conversation;
            if let Some(p) = &u.pricing {
                if r.pricing.is_none() {
                    self.metrics.priced(p);
                }
                r.pricing = Some(p.clone());
            }
            if let Some(c) = &u.conversation {
                r.conversation = Some(c.clone());
            }
            if !r.status.accepts_from_meta(next) {
                return (None, (None, billing));
            }
            if next == Status::Failed {
                let (code, title) = u.error.clone().unwrap_or((0, "failed".into()));
                r.error = Some(RecordError {
                    code: "graph_error".into(),
                    graph_code: Some(code),
                    message: title,
                });
            }
            (
                Some(next),
                (Some((r.account.clone(), r.to.clone())), billing),
            )
        });
        let (applied, billing) = applied.unwrap_or((None, false));
        if billing
            && applied.is_none()
            && let Some(r) = self.records.get(id.as_str())
        {
            // Changed without a new status: hand the archive the new row.
            self.archive_soon(&r);
        }
        match applied {
            Some((account, to)) => {
                if next == Status::Failed {
                    self.window_closed_by_meta(
                        &account,
                        &to,
                        u.error.as_ref().map(|(c, _)| *c),
                        now,
                    );
                }
                StatusOutcome::Applied { id, status: next }
            }
            None => StatusOutcome::Ignored,
        }
    }

    /// Keep a status whose wamid is unknown, unless the wamid became known
    /// meanwhile (then its record id). Checked again under the orphan
    /// entry's lock, which [`State::mark_sent`] takes after indexing the
    /// wamid, so a status is never parked after its record was marked sent.
    /// The check looks in memory only: a record marked sent meanwhile is
    /// there, and the archive was searched just before (it would take a
    /// look into every part, under the entry's lock).
    fn park_orphan(&self, u: &StatusUpdate, now: Millis) -> Option<MessageId> {
        if self.orphans.len() >= ORPHAN_CAPACITY {
            self.orphans
                .retain(|_, (since, _)| now - *since < ORPHAN_TTL_MS);
        }
        let full = self.orphans.len() >= ORPHAN_CAPACITY;
        let entry = self.orphans.entry(u.wamid.clone());
        if let Some(id) = self.by_wamid.get(&u.wamid) {
            return Some(id.clone());
        }
        match entry {
            dashmap::mapref::entry::Entry::Occupied(mut e) => e.get_mut().1.push(u.clone()),
            dashmap::mapref::entry::Entry::Vacant(e) if !full => {
                e.insert((now, vec![u.clone()]));
            }
            dashmap::mapref::entry::Entry::Vacant(_) => {
                self.metrics.webhook("status_unknown_dropped");
            }
        }
        None
    }

    /// Outbound counts of the recent messages of a conversation, with the
    /// current status of each outbound one.
    pub fn recent_messages(
        &self,
        account: &Account,
        contact: &str,
    ) -> Vec<(Recent, Option<Status>)> {
        let recent = self.state.recent(account.id, contact);
        recent
            .into_iter()
            .map(|m| {
                let status = match m.direction {
                    Direction::In => None,
                    Direction::Out => self.record(&m.id).map(|r| r.status),
                };
                (m, status)
            })
            .collect()
    }
}

/// Error code of a message whose send was cut by a crash.
pub const INTERRUPTED: &str = "interrupted";

/// What replaying the outbound side gave.
#[derive(Debug, Default, Clone, Copy)]
pub struct RestoredOutbox {
    pub records: usize,
    /// Messages that were being sent when the router stopped: Meta may or
    /// may not have them; they end `failed` (`interrupted`), never resent.
    pub interrupted: usize,
}

impl Outbox {
    /// Apply one journaled record. `sandbox`: unknown accounts are
    /// registered again.
    pub(crate) fn restore_op(&self, op: OutboxOp, sandbox: bool) {
        match op {
            OutboxOp::Record(record)
                if self
                    .state
                    .restore_account(&record.account, sandbox)
                    .is_some() =>
            {
                let record = OutboundRecord::from(*record);
                self.records.insert(record.id.clone(), record);
            }
            OutboxOp::Record(_) => {}
            OutboxOp::Update(update) => {
                // An archived record comes back to take it (and is archived
                // again after the replay); one dropped later (retention)
                // has no update to take.
                self.reload(&update.id, None);
                if let Some(mut r) = self.records.get_mut(&*update.id) {
                    update.apply(&mut r);
                }
            }
            OutboxOp::ForgetRecord { id } => {
                self.records.remove(id.as_str());
            }
        }
    }

    /// Apply a record another router of the cluster wrote (it is in the
    /// log). Unlike a replay, indexes follow at once; `owns` tells whether
    /// this router holds the account's lease, and so keeps its queue.
    /// Returns the record when its status changed (for this router's live
    /// stream).
    pub fn apply_remote(
        &self,
        json: &[u8],
        owns: impl Fn(&str) -> bool,
    ) -> Result<Option<OutboundRecord>, String> {
        let op: OutboxOp = serde_json::from_slice(json).map_err(|e| e.to_string())?;
        match op {
            OutboxOp::Record(wire) => {
                let record = OutboundRecord::from(*wire);
                let Some(account) = self.state.account_by_name(&record.account) else {
                    return Ok(None);
                };
                if self.records.contains_key(record.id.as_str()) {
                    return Ok(None);
                }
                let id = record.id.clone();
                if let Some(w) = &record.wamid {
                    self.index_wamid(w.clone(), id.clone());
                }
                let queue = self.queue(&account);
                queue.records.fetch_add(1, Ordering::Relaxed);
                let (status, to, send_at) = (record.status, record.to.clone(), record.send_at);
                self.records.insert(id.clone(), record);
                if let Some(r) = self.records.get(id.as_str()) {
                    self.archive_soon(&r);
                }
                self.order.lock().insert(&id);
                if owns(account.name()) {
                    match status {
                        Status::Queued => {
                            queue.push(to, id);
                        }
                        Status::Scheduled => queue.schedule(send_at.unwrap_or(0), to, id),
                        _ => {}
                    }
                    queue.notify.notify_one();
                }
            }
            OutboxOp::Update(update) => {
                let id = update.id.clone();
                self.reload(&id, None);
                let changed = self.records.get_mut(&*id).and_then(|mut r| {
                    let before = r.status;
                    update.apply(&mut r);
                    (r.status != before).then(|| r.clone())
                });
                if let Some(r) = &changed {
                    if let Some(w) = &r.wamid {
                        self.index_wamid(w.clone(), r.id.clone());
                    }
                    if !matches!(
                        r.status,
                        Status::Queued | Status::Scheduled | Status::Sending
                    ) && let Some(a) = self.state.account_by_name(&r.account)
                    {
                        self.queue(&a).remove(&r.to, &r.id);
                    }
                    self.archive_soon(r);
                }
                return Ok(changed);
            }
            OutboxOp::ForgetRecord { id } => {
                self.records.remove(id.as_str());
                self.order.lock().remove(id.as_str());
            }
        }
        Ok(None)
    }

    /// A cluster router took over `account`'s lease (and applied the log
    /// to its end): queue what waits in acceptance order, and settle the
    /// sends the previous holder had started as after a crash (SPEC §9).
    pub fn take_over(&self, account: &Account, now: Millis) -> usize {
        let queue = self.queue(account);
        queue.clear();
        let mut waiting = Waiting::default();
        for r in self.records.iter() {
            if r.account.as_str() == account.name() {
                waiting.note(&r, now, true);
            }
        }
        self.requeue(waiting, now)
    }

    /// Queue what waits in acceptance order (scheduled ones by their time)
    /// and settle the sends that were interrupted; returns how many were.
    fn requeue(&self, mut w: Waiting, now: Millis) -> usize {
        // Ids sort by creation within one millisecond.
        w.queued.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        w.scheduled.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        for (_, id, account, to) in w.queued {
            if let Some(a) = self.state.account_by_name(&account) {
                self.queue(&a).push(to, id);
            }
        }
        for (at, id, account, to) in w.scheduled {
            if let Some(a) = self.state.account_by_name(&account) {
                self.queue(&a).schedule(at, to, id);
            }
        }
        for id in &w.interrupted {
            self.mark_failed(id, interrupted_error(), now);
        }
        for a in self.state.accounts() {
            self.queue(&a).notify.notify_one();
        }
        w.interrupted.len()
    }

    /// After the last op: rebuild indexes and queues (acceptance order,
    /// SPEC §9) and settle interrupted sends.
    pub fn finish_restore(&self, now: Millis) -> RestoredOutbox {
        self.rebuild(now, true)
    }

    /// As [`finish_restore`](Self::finish_restore) for a cluster router:
    /// a send in flight may be another router's, so it is left to the
    /// account's next lease holder ([`take_over`](Self::take_over)).
    pub fn finish_restore_shared(&self, now: Millis) -> RestoredOutbox {
        self.rebuild(now, false)
    }

    fn rebuild(&self, now: Millis, settle_interrupted: bool) -> RestoredOutbox {
        let mut waiting = Waiting::default();
        // Records held per account (max_records): the archive's and those
        // in memory (a settled one may be counted twice: a soft cap).
        for (account, n) in self.archive.counts_by_account() {
            if let Some(a) = self.state.account_by_name(&account) {
                self.queue(&a)
                    .records
                    .fetch_add(n as usize, Ordering::Relaxed);
            }
        }
        {
            let mut order = self.order.lock();
            for r in self.records.iter() {
                order.insert(&r.id);
                if let Some(a) = self.state.account_by_name(&r.account) {
                    self.queue(&a).records.fetch_add(1, Ordering::Relaxed);
                }
                if let Some(w) = &r.wamid {
                    self.index_wamid(w.clone(), r.id.clone());
                }
                if !waiting.note(&r, now, settle_interrupted) {
                    self.archive_soon(&r);
                }
            }
        }
        let interrupted = self.requeue(waiting, now);
        RestoredOutbox {
            records: self.records.len(),
            interrupted,
        }
    }

    /// Count the records held per account again (after the archive
    /// dropped what is past retention): archived plus in memory.
    pub fn recount_held(&self) {
        let mut held: std::collections::HashMap<String, usize> = self
            .archive
            .counts_by_account()
            .into_iter()
            .map(|(a, n)| (a, n as usize))
            .collect();
        for r in self.records.iter() {
            if !r.status.is_settled() {
                *held.entry(r.account.to_string()).or_default() += 1;
            }
        }
        for a in self.state.accounts() {
            let n = held.get(a.name()).copied().unwrap_or(0);
            self.queue(&a).records.store(n, Ordering::Relaxed);
        }
    }

    /// Every record in memory as journal records, for a snapshot, one at
    /// a time.
    pub fn dump(&self, emit: &mut dyn FnMut(&[u8])) {
        for r in self.records.iter() {
            emit(&encode(
                Owner::Outbox,
                &OutboxOp::Record(Box::new(r.value().into())),
            ));
        }
    }

    /// Give back the room the maps grew to during a spike, once the
    /// records of that spike went to the archive (an entry is ~480
    /// bytes: a spike of 30,000 records in memory left ~30 MB of room).
    pub fn shrink_if_sparse(&self) {
        crate::memory::shrink_if_sparse(&self.records);
        crate::memory::shrink_if_sparse(&self.by_wamid);
        crate::memory::shrink_if_sparse(&self.orphans);
    }

    /// Drop records past `retention` that have left the queue (SPEC §9
    /// bounded growth). Returns how many.
    pub fn prune(&self, now: Millis, retention: std::time::Duration) -> usize {
        let cutoff = now - retention.as_millis() as Millis;
        let old: Vec<(MessageId, Option<Wamid>)> = self
            .records
            .iter()
            .filter(|r| r.created_at < cutoff && r.status.is_settled())
            .map(|r| (r.id.clone(), r.wamid.clone()))
            .collect();
        for (id, wamid) in &old {
            self.forget_record(id, wamid.as_deref());
        }
        old.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbound::Content;

    fn outbox() -> Outbox {
        Outbox::new(Arc::new(State::for_test()), Arc::new(Metrics::new())).0
    }

    fn record(id: &str, status: Status, created_at: Millis) -> OutboundRecord {
        OutboundRecord {
            id: id.into(),
            account: "main".into(),
            to: "16315551181".into(),
            content: Content {
                kind: crate::message::MessageType::Text,
                object: serde_json::json!({ "body": "x" }).into(),
                context_id: None,
            },
            status,
            wamid: Some(format!("wamid.{id}").into()),
            source: "api".into(),
            tags: vec![],
            metadata: None,
            attempts: 1,
            error: None,
            history: vec![(status, created_at)],
            created_at,
            send_at: None,
            expires_at: created_at + 1000,
            bypass_consent: false,
            typing: None,
            pricing: None,
            conversation: None,
        }
    }

    #[test]
    fn prune_drops_old_settled_records_only() {
        let o = outbox();
        let day = 86_400_000;
        let now = 100 * day;
        for (id, status, at) in [
            ("old", Status::Read, now - 40 * day),
            ("new", Status::Sent, now - day),
            ("stuck", Status::Queued, now - 40 * day),
        ] {
            o.restore_op(
                OutboxOp::Record(Box::new((&record(id, status, at)).into())),
                false,
            );
        }
        o.finish_restore(now);
        assert_eq!(
            o.prune(now, std::time::Duration::from_millis(30 * day as u64)),
            1
        );
        assert!(
            o.record("old").is_none() && o.record("new").is_some() && o.record("stuck").is_some()
        );
    }

    #[test]
    fn settled_records_come_due_after_the_wait_past_the_cap_or_when_quiet() {
        let mut s = Settling::default();
        let join = |s: &mut Settling, id: &str, now: Millis| s.join(&MessageId::from(id), now);
        let ids = |v: Vec<MessageId>| {
            v.into_iter()
                .map(MessageId::into_string)
                .collect::<Vec<_>>()
        };
        join(&mut s, "a", 0);
        join(&mut s, "b", 5_000);
        // Joining again keeps the first place.
        join(&mut s, "a", 6_000);
        assert!(s.take_due(SETTLE_MS - 1, false).is_empty());
        assert_eq!(ids(s.take_due(SETTLE_MS, false)), ["a"]);
        // Idle, but a record joined less than a second ago: only what is due.
        assert!(s.take_due(6_000 + SETTLE_QUIET_MS - 1, true).is_empty());
        assert_eq!(ids(s.take_due(6_000 + SETTLE_QUIET_MS, true)), ["b"]);
        assert!(s.ids.is_empty());
        // Past the cap the oldest come due at once.
        for i in 0..=SETTLE_MAX {
            join(&mut s, &format!("x{i}"), 20_000);
        }
        assert_eq!(ids(s.take_due(20_000, false)), ["x0"]);
        assert_eq!(s.queue.len(), SETTLE_MAX);
    }

    /// A settled record is written once, with the statuses it got while
    /// it waited, and leaves memory when the archive committed that
    /// version; one changed since stays until its new version is in.
    #[tokio::test]
    async fn settled_records_are_written_once_with_their_statuses() {
        let o = outbox();
        for id in ["a", "b"] {
            o.restore_op(
                OutboxOp::Record(Box::new((&record(id, Status::Sent, 10)).into())),
                false,
            );
        }
        let now = crate::domain::now_ms();
        o.finish_restore(now);
        let in_memory = |id: &str| o.records.contains_key(id);
        let version = |id: &str| o.records.get(id).unwrap().history.len() as u32;
        // Every record row the archive commits, counted (the writer
        // commits on its own schedule: its backlog may already be 0).
        let written = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = written.clone();
        o.archive.on_records_committed(move |rows, _| {
            count.fetch_add(rows.len(), std::sync::atomic::Ordering::Relaxed);
        });
        let written = move || written.load(std::sync::atomic::Ordering::Relaxed);
        o.archive_committed(&[], false, now);
        o.archive.sync().await.unwrap();
        assert_eq!(written(), 0, "nothing written before its time");
        o.update_record("a", now, |_| (Some(Status::Delivered), ()));
        o.update_record("a", now, |_| (Some(Status::Read), ()));
        // Records wait from when they joined (the clock's time, a little
        // after `now` on a busy machine): all are due SETTLE_MS after this.
        let now = crate::domain::now_ms();
        o.archive_committed(&[], false, now + SETTLE_MS);
        o.archive.sync().await.unwrap();
        assert_eq!(written(), 2, "each record once");
        let archived = Outbox::decode(&o.archive.record("a").unwrap()).unwrap();
        assert_eq!(archived.status, Status::Read);
        // `b` changed after it was written: it stays until that is in.
        let (va, vb) = (version("a"), version("b"));
        o.update_record("b", now, |_| (Some(Status::Delivered), ()));
        o.archive_committed(&[("a", va), ("b", vb)], false, now + SETTLE_MS);
        assert!(!in_memory("a") && in_memory("b"));
        assert_eq!(
            o.record("a").unwrap().status,
            Status::Read,
            "from the archive"
        );
        o.archive_committed(&[], true, now + SETTLE_MS + SETTLE_QUIET_MS);
        o.archive.sync().await.unwrap();
        o.archive_committed(&[("b", version("b"))], false, now + SETTLE_MS);
        assert!(!in_memory("b"));
        assert_eq!(o.record("b").unwrap().status, Status::Delivered);
    }

    /// A wamid the archive lacks is searched for once (Meta's `sent`,
    /// `delivered`, `read` of a message sent by someone else); once a
    /// record carries it, it is found again, in memory and then in the
    /// archive.
    #[tokio::test]
    async fn an_unknown_wamid_is_searched_for_once_until_a_record_has_it() {
        let o = outbox();
        let searches = || o.archive.wamid_searches();
        assert_eq!(o.record_id_by_wamid("wamid.a"), None);
        assert_eq!(o.record_id_by_wamid("wamid.a"), None);
        assert_eq!(o.tags_of_wamid("wamid.a"), Vec::<String>::new());
        assert_eq!(searches(), 1, "the miss is remembered");
        // Record `a` is sent as wamid.a (restored here: the same index).
        o.restore_op(
            OutboxOp::Record(Box::new((&record("a", Status::Sent, 10)).into())),
            false,
        );
        let now = crate::domain::now_ms();
        o.finish_restore(now);
        assert_eq!(o.record_id_by_wamid("wamid.a").as_deref(), Some("a"));
        // Archived and out of memory: found in the archive, not taken
        // for absent.
        let version = o.records.get("a").unwrap().history.len() as u32;
        o.archive_committed(&[], false, crate::domain::now_ms() + SETTLE_MS);
        o.archive.sync().await.unwrap();
        o.archive_committed(&[("a", version)], false, now + SETTLE_MS);
        assert!(!o.records.contains_key("a"));
        assert_eq!(o.record_id_by_wamid("wamid.a").as_deref(), Some("a"));
        assert_eq!(searches(), 2);
    }

    #[test]
    fn restore_rebuilds_queues_in_acceptance_order_and_settles_interrupted_sends() {
        let o = outbox();
        for (id, status, at) in [
            ("b", Status::Queued, 20),
            ("a", Status::Queued, 10),
            ("c", Status::Sending, 5),
        ] {
            o.restore_op(
                OutboxOp::Record(Box::new((&record(id, status, at)).into())),
                false,
            );
        }
        let restored = o.finish_restore(1000);
        assert_eq!(restored.interrupted, 1);
        let account = o.state().account_by_name("main").unwrap();
        assert_eq!(o.queue(&account).peek().as_deref(), Some("a"));
        let c = o.record("c").unwrap();
        assert_eq!(c.status, Status::Failed);
        assert_eq!(c.error.unwrap().code, INTERRUPTED);
    }

    fn delivered(wamid: &str) -> StatusUpdate {
        StatusUpdate {
            wamid: wamid.into(),
            status: "delivered".into(),
            timestamp: 0,
            recipient: None,
            error: None,
            pricing: None,
            conversation: None,
        }
    }

    /// Issue #7.11: statuses of messages other apps sent from the number
    /// used to fill the early-status map for good.
    #[test]
    fn early_statuses_expire_and_make_room() {
        let o = outbox();
        let t0 = 1_000_000;
        for i in 0..ORPHAN_CAPACITY {
            o.apply_status(&delivered(&format!("wamid.other.{i}")), t0);
        }
        let later = t0 + ORPHAN_TTL_MS + 1;
        o.restore_op(
            OutboxOp::Record(Box::new((&record("mine", Status::Sending, later)).into())),
            false,
        );
        assert_eq!(
            o.apply_status(&delivered("wamid.mine"), later),
            StatusOutcome::Unknown
        );
        o.mark_sent("mine", "wamid.mine", later);
        assert_eq!(o.record("mine").unwrap().status, Status::Delivered);
        assert!(
            o.orphans.len() < ORPHAN_CAPACITY,
            "expired entries were dropped"
        );
    }

    /// Issue #7.11: a status that races with the send answer is applied.
    #[test]
    fn a_status_racing_the_send_answer_is_never_lost() {
        let o = outbox();
        let n = 10_000;
        for i in 0..n {
            o.restore_op(
                OutboxOp::Record(Box::new(
                    (&record(&format!("r{i}"), Status::Sending, 1)).into(),
                )),
                false,
            );
        }
        let go = std::sync::Barrier::new(2);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                for i in 0..n {
                    go.wait();
                    o.apply_status(&delivered(&format!("wamid.r{i}x")), 10);
                }
            });
            scope.spawn(|| {
                for i in 0..n {
                    go.wait();
                    o.mark_sent(&format!("r{i}"), &format!("wamid.r{i}x"), 10);
                }
            });
        });
        for i in 0..n {
            assert_eq!(
                o.record(&format!("r{i}")).unwrap().status,
                Status::Delivered,
                "record r{i}"
            );
        }
    }

    /// Whether `id` left memory within 5 s (settled records are written
    /// once nothing settled for a second and the archive is idle).
    async fn leaves_memory(o: &Outbox, id: &str) -> bool {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while o.records.contains_key(id) {
            if std::time::Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        true
    }

    /// A settled record leaves memory once the archive committed it and
    /// is still found: by id, by wamid, and as an
    /// earlier process's rule reply.
    #[tokio::test]
    async fn archived_records_leave_memory_and_are_still_found() {
        let o = Arc::new(outbox());
        o.start_archiving();
        let hour_ago = o.started_at - 3_600_000;
        let earlier = MessageId::derived(hour_ago, "main|wamid.in.1|0");
        o.restore_op(
            OutboxOp::Record(Box::new(
                (&record(earlier.as_str(), Status::Sent, hour_ago)).into(),
            )),
            false,
        );
        o.archive_soon(&o.record(earlier.as_str()).unwrap());
        o.archive.sync().await.unwrap();
        assert!(leaves_memory(&o, earlier.as_str()).await, "left memory");
        assert_eq!(o.record(earlier.as_str()).unwrap().status, Status::Sent);
        assert_eq!(
            o.record_id_by_wamid(&format!("wamid.{earlier}")),
            Some(earlier.clone())
        );
        assert!(o.existing_reply(&earlier, true).is_some());
        // Unless the rules may have run before, memory only is asked.
        assert!(o.existing_reply(&earlier, false).is_none());
        // A late status brings it back, applies, and it is archived again.
        assert!(matches!(
            o.apply_status(&delivered(&format!("wamid.{earlier}")), hour_ago + 1),
            StatusOutcome::Applied { .. }
        ));
        o.archive.sync().await.unwrap();
        assert_eq!(
            o.record(earlier.as_str()).unwrap().status,
            Status::Delivered
        );
        assert!(
            leaves_memory(&o, earlier.as_str()).await,
            "left memory again"
        );
    }

    #[test]
    fn a_131047_failure_closes_the_window() {
        let o = outbox();
        let state = o.state().clone();
        let account = state.account_by_name("main").unwrap();
        let now = crate::domain::now_ms();
        state.restore_op(
            crate::state::ops::StateOp::Window {
                account: "main".into(),
                contact: "16315551181".into(),
                window: crate::state::ops::WindowWire {
                    last_inbound: now - 1000,
                    expires: now + 1000,
                },
            },
            false,
        );
        assert!(state.window_open(account.id, "16315551181", now));
        o.restore_op(
            OutboxOp::Record(Box::new((&record("w", Status::Sending, now)).into())),
            false,
        );
        o.mark_failed(
            "w",
            RecordError {
                code: "graph_error".into(),
                graph_code: Some(131047),
                message: "re-engagement".into(),
            },
            now,
        );
        assert!(!state.window_open(account.id, "16315551181", now));
    }
}
