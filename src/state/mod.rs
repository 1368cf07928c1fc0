//! The router's state, and the one place that changes it: accounts,
//! conversations (window, name, rule state, vars, consent, handoff, recent
//! messages), outbound records, the per-account queues and the inbound
//! dedupe memory.
//!
//! Every mutation is a method here, so a durable journal can later be put
//! under this module without touching the edges or the rules. Invariants:
//! a window is only ever extended (except by Meta's 131047); an outbound
//! status never moves backwards; no DashMap guard is held across `.await`
//! or while another map is locked.

pub mod dedupe;
pub mod restore;
pub mod window;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use parking_lot::{Mutex, RwLock};

use dashmap::DashMap;
use tokio::sync::{Notify, mpsc};

use crate::config::AccountSettings;
use crate::domain::Millis;
use crate::inbound::{InboundMessage, StatusUpdate};
use crate::journal::{Journal, Op};
use crate::outbound::{OutboundRecord, RecordError, Status};
use crate::telemetry::Metrics;
use dedupe::Dedupe;
pub use window::{ConvKey, WINDOW_MS, Window, WindowStore};

/// Messages kept per conversation (SPEC §4).
pub const RECENT: usize = 50;
const DEDUPE_TTL_MS: Millis = 7 * 24 * 3600 * 1000;
const DEDUPE_CAPACITY: usize = 1_000_000;
/// Statuses of wamids not (yet) known, kept in case the send answer is
/// late: at most this many wamids, each for at most [`ORPHAN_TTL_MS`].
const ORPHAN_CAPACITY: usize = 10_000;
/// Statuses of messages this router did not send (other apps on the same
/// number) would otherwise stay forever.
pub const ORPHAN_TTL_MS: Millis = 10 * 60 * 1000;
/// Accounts the router can hold (ids are `u16`).
pub const MAX_ACCOUNTS: usize = u16::MAX as usize;
/// Sandbox accounts registered from webhooks, at most: anyone holding the
/// sandbox app secret can make up phone number ids.
pub const MAX_SANDBOX_ACCOUNTS: usize = 1_000;

/// One business number.
#[derive(Debug)]
pub struct Account {
    pub id: u16,
    pub settings: AccountSettings,
    pub queue: AccountQueue,
    /// Outbound records of this account held in memory.
    records: std::sync::atomic::AtomicUsize,
}

impl Account {
    pub fn name(&self) -> &str {
        &self.settings.name
    }
    pub fn is_sandbox(&self) -> bool {
        self.settings.access_token.is_none()
    }
}

/// The FIFO of one account: ready message ids, and scheduled ones by time.
#[derive(Debug, Default)]
pub struct AccountQueue {
    inner: Mutex<QueueInner>,
    /// Woken when something is queued.
    pub notify: Notify,
    /// Unix ms of the last send attempt (-1: none yet).
    last_send: AtomicI64,
}

#[derive(Debug, Default)]
struct QueueInner {
    ready: VecDeque<String>,
    scheduled: BTreeMap<(Millis, u64), String>,
}

/// A queue's numbers for `/v1/queues` and `/metrics`.
#[derive(Debug, Clone)]
pub struct QueueStats {
    pub depth: usize,
    pub scheduled: usize,
    pub next_scheduled: Option<Millis>,
    pub last_send: Option<Millis>,
}

impl AccountQueue {
    fn lock(&self) -> parking_lot::MutexGuard<'_, QueueInner> {
        self.inner.lock()
    }

    pub fn stats(&self) -> QueueStats {
        let q = self.lock();
        let last = self.last_send.load(Ordering::Relaxed);
        QueueStats {
            depth: q.ready.len(),
            scheduled: q.scheduled.len(),
            next_scheduled: q.scheduled.keys().next().map(|(t, _)| *t),
            last_send: (last >= 0).then_some(last),
        }
    }

    /// Queued + scheduled.
    pub fn len(&self) -> usize {
        let q = self.lock();
        q.ready.len() + q.scheduled.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The message at the head of the ready queue.
    pub fn head(&self) -> Option<String> {
        self.lock().ready.front().cloned()
    }

    /// Move scheduled messages that are due into the ready queue, in
    /// `send_at` order; returns when the next scheduled one is due.
    pub fn promote_due(&self, now: Millis) -> Option<Millis> {
        let mut q = self.lock();
        while let Some((&(at, seq), _)) = q.scheduled.iter().next() {
            if at > now {
                return Some(at);
            }
            if let Some(id) = q.scheduled.remove(&(at, seq)) {
                q.ready.push_back(id);
            }
        }
        None
    }

    pub fn mark_sent_now(&self, now: Millis) {
        self.last_send.store(now, Ordering::Relaxed);
    }

    pub fn last_send(&self) -> Option<Millis> {
        let v = self.last_send.load(Ordering::Relaxed);
        (v >= 0).then_some(v)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Direction {
    In,
    Out,
}

/// One entry of a conversation's recent messages.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Recent {
    pub direction: Direction,
    /// wamid for inbound, router message id for outbound.
    pub id: String,
    pub kind: String,
    pub text: Option<String>,
    pub at: Millis,
}

/// Everything but the window of one conversation.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Conversation {
    pub name: Option<String>,
    pub state: String,
    pub vars: BTreeMap<String, String>,
    pub handoff_until: Option<Millis>,
    pub opted_out: bool,
    /// When the last consent change was made (the keyword message's
    /// timestamp, or the API request's time): older keywords, which Meta
    /// may deliver late and out of order, do not undo it.
    #[serde(default)]
    pub consent_at: Option<Millis>,
    pub recent: VecDeque<Recent>,
    pub last_activity: Millis,
}

/// The conversation as an inbound message left it, for the rules.
#[derive(Debug, Clone)]
pub struct InboundView {
    /// This message opened a window (none was open before it).
    pub new_conversation: bool,
    pub state: String,
    pub vars: BTreeMap<String, String>,
    pub opted_out: bool,
    pub handoff: bool,
}

/// A conversation for the API.
#[derive(Debug, Clone)]
pub struct ConversationView {
    pub account: String,
    pub wa_id: String,
    pub window: Option<Window>,
    pub conversation: Conversation,
}

impl ConversationView {
    pub fn window_open(&self, now: Millis) -> bool {
        self.window.is_some_and(|w| w.expires > now)
    }
}

/// What applying a Meta status did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatusOutcome {
    Applied {
        id: String,
        status: Status,
    },
    /// Known message, but the status would move it backwards or repeats.
    Ignored,
    /// No message with that wamid (yet); kept in case the send answer is late.
    Unknown,
}

#[derive(Default)]
struct AccountsInner {
    list: Vec<Arc<Account>>,
    by_name: HashMap<String, u16>,
    by_pnid: HashMap<String, u16>,
}

/// All state, behind one API.
pub struct State {
    accounts: RwLock<AccountsInner>,
    conversations: DashMap<ConvKey, Conversation>,
    windows: WindowStore,
    records: DashMap<String, OutboundRecord>,
    by_wamid: DashMap<String, String>,
    /// wamid → (first seen, statuses) for statuses that came before their
    /// send answer.
    orphans: DashMap<String, (Millis, Vec<StatusUpdate>)>,
    pub dedupe: Dedupe,
    seq: AtomicU64,
    idempotency: DashMap<String, Idempotent>,
    idempotency_inserts: AtomicU64,
    metrics: Arc<Metrics>,
    new_accounts: mpsc::UnboundedSender<Arc<Account>>,
    /// Record ids in creation order (UUID v7 sorts by time), for listing.
    order: Mutex<std::collections::BTreeSet<String>>,
    /// Where status changes go for `message.status` events, if anywhere.
    status_changes: Option<mpsc::UnboundedSender<OutboundRecord>>,
    /// The durable journal (data_dir); unset in memory mode.
    journal: std::sync::OnceLock<Journal>,
    /// Acknowledged inbound messages whose rules have not run yet.
    pending: DashMap<String, (String, InboundMessage, bool)>,
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
        self.account.as_ref().is_none_or(|a| *a == r.account)
            && self.to.as_ref().is_none_or(|t| *t == r.to)
            && self.status.is_none_or(|s| s == r.status)
            && self.tag.as_ref().is_none_or(|t| r.tags.contains(t))
    }
}

/// Channels the state reports on, for the app to consume.
pub struct StateFeeds {
    /// Accounts registered (configured ones first, sandbox ones later).
    pub new_accounts: mpsc::UnboundedReceiver<Arc<Account>>,
    /// Outbound status changes (only when asked for).
    pub status_changes: Option<mpsc::UnboundedReceiver<OutboundRecord>>,
}

impl State {
    /// State with the configured accounts; accounts registered later (sandbox)
    /// are announced on the returned channel so a sender can be started.
    pub fn new(
        accounts: &[AccountSettings],
        metrics: Arc<Metrics>,
        report_statuses: bool,
    ) -> (Self, StateFeeds) {
        let (tx, rx) = mpsc::unbounded_channel();
        let (status_tx, status_rx) = if report_statuses {
            let (t, r) = mpsc::unbounded_channel();
            (Some(t), Some(r))
        } else {
            (None, None)
        };
        let state = State {
            accounts: RwLock::new(AccountsInner::default()),
            conversations: DashMap::new(),
            windows: WindowStore::new(),
            records: DashMap::new(),
            by_wamid: DashMap::new(),
            orphans: DashMap::new(),
            dedupe: Dedupe::new(DEDUPE_CAPACITY, DEDUPE_TTL_MS),
            seq: AtomicU64::new(0),
            idempotency: DashMap::new(),
            idempotency_inserts: AtomicU64::new(0),
            metrics,
            new_accounts: tx,
            order: Mutex::new(Default::default()),
            status_changes: status_tx,
            journal: std::sync::OnceLock::new(),
            pending: DashMap::new(),
        };
        // The configuration holds at most MAX_ACCOUNTS (checked on load).
        for a in accounts {
            state.add_account(a.clone());
        }
        (
            state,
            StateFeeds {
                new_accounts: rx,
                status_changes: status_rx,
            },
        )
    }

    // ------------------------------------------------------------ accounts

    /// Add an account; `None` when the router holds as many as it can.
    fn add_account(&self, settings: AccountSettings) -> Option<Arc<Account>> {
        let mut inner = self.accounts.write();
        if let Some(&id) = inner.by_pnid.get(&settings.phone_number_id) {
            return Some(inner.list[id as usize].clone());
        }
        let sandboxes = inner
            .list
            .iter()
            .filter(|a| a.is_sandbox() && a.settings.name == a.settings.phone_number_id)
            .count();
        let id = u16::try_from(inner.list.len()).ok()?;
        if usize::from(id) >= MAX_ACCOUNTS
            || (settings.access_token.is_none()
                && settings.name == settings.phone_number_id
                && sandboxes >= MAX_SANDBOX_ACCOUNTS)
        {
            return None;
        }
        let account = Arc::new(Account {
            id,
            settings,
            queue: AccountQueue::default(),
            records: Default::default(),
        });
        account.queue.last_send.store(-1, Ordering::Relaxed);
        inner.by_name.insert(account.settings.name.clone(), id);
        inner
            .by_pnid
            .insert(account.settings.phone_number_id.clone(), id);
        inner.list.push(account.clone());
        let _ = self.new_accounts.send(account.clone());
        Some(account)
    }

    /// Register a sandbox account for a `phone_number_id` seen in a webhook;
    /// `None` past [`MAX_SANDBOX_ACCOUNTS`] (logged and counted).
    pub fn register_sandbox(&self, phone_number_id: &str) -> Option<Arc<Account>> {
        if let Some(a) = self.account_by_pnid(phone_number_id) {
            return Some(a);
        }
        let Some(account) = self.add_account(AccountSettings::sandbox(phone_number_id)) else {
            self.metrics.webhook("sandbox_account_refused");
            tracing::error!(
                phone_number_id,
                max = MAX_SANDBOX_ACCOUNTS,
                "sandbox account not registered: the router holds as many sandbox accounts as it allows; the webhook's items for it are ignored"
            );
            return None;
        };
        tracing::info!(phone_number_id, "sandbox account registered from a webhook");
        self.log(|| Op::Account {
            name: account.name().to_string(),
            phone_number_id: phone_number_id.to_string(),
        });
        Some(account)
    }

    pub fn accounts(&self) -> Vec<Arc<Account>> {
        self.accounts.read().list.clone()
    }

    pub fn account(&self, id: u16) -> Option<Arc<Account>> {
        self.accounts.read().list.get(id as usize).cloned()
    }

    pub fn account_by_name(&self, name: &str) -> Option<Arc<Account>> {
        let inner = self.accounts.read();
        inner
            .by_name
            .get(name)
            .map(|&id| inner.list[id as usize].clone())
    }

    pub fn account_by_pnid(&self, pnid: &str) -> Option<Arc<Account>> {
        let inner = self.accounts.read();
        inner
            .by_pnid
            .get(pnid)
            .map(|&id| inner.list[id as usize].clone())
    }

    /// The account used when a request names none.
    pub fn default_account(&self) -> Option<Arc<Account>> {
        let inner = self.accounts.read();
        inner
            .list
            .iter()
            .find(|a| a.settings.default)
            .or_else(|| inner.list.first())
            .cloned()
    }

    // ------------------------------------------------------- conversations

    /// Apply an inbound message: window, contact name, recent messages.
    pub fn inbound(&self, account: &Account, msg: &InboundMessage, now: Millis) -> InboundView {
        let key = ConvKey::new(account.id, &msg.from);
        let mut new_conversation = false;
        if msg.opens_window {
            // SPEC §4: from Meta's timestamp, clamped to now, only extended.
            new_conversation = self.windows.extend(key.clone(), msg.timestamp, now);
            if let Some(window) = self.windows.get(&key) {
                self.log(|| Op::Window {
                    account: account.name().to_string(),
                    contact: msg.from.clone(),
                    window,
                });
            }
        }
        let mut c = self.conversations.entry(key).or_default();
        if let Some(name) = &msg.contact_name {
            c.name = Some(name.clone());
        }
        c.last_activity = now;
        push_recent(
            &mut c.recent,
            Recent {
                direction: Direction::In,
                id: msg.wamid.clone(),
                kind: msg.kind.as_str().to_string(),
                text: msg.text.clone(),
                at: msg.timestamp.min(now),
            },
        );
        if c.handoff_until.is_some_and(|u| u <= now) {
            c.handoff_until = None;
        }
        self.log(|| Op::Conversation {
            account: account.name().to_string(),
            contact: msg.from.clone(),
            conversation: Box::new(c.clone()),
        });
        InboundView {
            new_conversation,
            state: c.state.clone(),
            vars: c.vars.clone(),
            opted_out: c.opted_out,
            handoff: c.handoff_until.is_some(),
        }
    }

    fn update_conversation<R>(
        &self,
        account: u16,
        contact: &str,
        now: Millis,
        f: impl FnOnce(&mut Conversation) -> R,
    ) -> R {
        let mut c = self
            .conversations
            .entry(ConvKey::new(account, contact))
            .or_default();
        c.last_activity = now;
        let out = f(&mut c);
        self.log(|| Op::Conversation {
            account: self.account_name(account),
            contact: contact.to_string(),
            conversation: Box::new(c.clone()),
        });
        out
    }

    fn account_name(&self, id: u16) -> String {
        self.account(id)
            .map(|a| a.name().to_string())
            .unwrap_or_default()
    }

    /// Append an op to the journal, if there is one (the op is only built then).
    fn log(&self, op: impl FnOnce() -> Op) {
        if let Some(j) = self.journal.get() {
            j.append(&op());
        }
    }

    /// Put the journal under this state (after replay).
    pub fn attach_journal(&self, journal: Journal) {
        let _ = self.journal.set(journal);
    }

    pub fn journal(&self) -> Option<&Journal> {
        self.journal.get()
    }

    /// Everything changed so far is on disk (memory mode: at once).
    /// `false` when the journal cannot write.
    pub async fn sync(&self) -> bool {
        match self.journal.get() {
            Some(j) => j.sync().await,
            None => true,
        }
    }

    /// Whether the journal failed (disk full, unwritable).
    pub fn storage_failed(&self) -> bool {
        self.journal.get().is_some_and(Journal::has_failed)
    }

    /// Record inbound message `wamid` as seen; false if it was seen before.
    pub fn first_time(&self, wamid: &str, now: Millis) -> bool {
        let fresh = self.dedupe.first_time(wamid, now);
        if fresh {
            self.log(|| Op::Seen {
                wamid: wamid.to_string(),
                at: now,
            });
        }
        fresh
    }

    /// An acknowledged message waits for its rules (replayed after a crash).
    pub fn mark_pending(&self, account: &Account, msg: &InboundMessage, new_conversation: bool) {
        if self.journal.get().is_none() {
            return;
        }
        self.pending.insert(
            msg.wamid.clone(),
            (account.name().to_string(), msg.clone(), new_conversation),
        );
        self.log(|| Op::Pending {
            account: account.name().to_string(),
            message: Box::new(msg.clone()),
            new_conversation,
        });
    }

    /// The rules of `wamid` ran.
    pub fn mark_done(&self, wamid: &str) {
        if self.pending.remove(wamid).is_some() {
            self.log(|| Op::Done {
                wamid: wamid.to_string(),
            });
        }
    }

    pub fn set_state(&self, account: u16, contact: &str, state: String, now: Millis) {
        self.update_conversation(account, contact, now, |c| c.state = state);
    }

    pub fn set_vars(
        &self,
        account: u16,
        contact: &str,
        vars: impl IntoIterator<Item = (String, String)>,
        now: Millis,
    ) {
        self.update_conversation(account, contact, now, |c| {
            let mut merged = c.vars.clone();
            merged.extend(vars);
            let size = crate::domain::vars_bytes(&merged);
            if size > crate::domain::MAX_VARS_BYTES {
                tracing::error!(
                    size,
                    max = crate::domain::MAX_VARS_BYTES,
                    "a rule's vars would exceed the per-conversation limit; not set"
                );
            } else {
                c.vars = merged;
            }
        });
    }

    /// Record a consent change made at `at`; `false` (and nothing changed)
    /// when a later change is already recorded. Compared in whole seconds,
    /// the resolution of Meta's timestamps: within one second, the change
    /// processed last wins.
    pub fn set_opted_out(
        &self,
        account: u16,
        contact: &str,
        opted_out: bool,
        at: Millis,
        now: Millis,
    ) -> bool {
        self.update_conversation(account, contact, now, |c| {
            if c.consent_at.is_some_and(|last| last / 1000 > at / 1000) {
                return false;
            }
            c.opted_out = opted_out;
            c.consent_at = Some(at);
            true
        })
    }

    /// Hand the conversation to humans until `until`, or give it back (`None`).
    pub fn set_handoff(&self, account: u16, contact: &str, until: Option<Millis>, now: Millis) {
        self.update_conversation(account, contact, now, |c| c.handoff_until = until);
    }

    pub fn is_opted_out(&self, account: u16, contact: &str) -> bool {
        self.conversations
            .get(&ConvKey::new(account, contact))
            .is_some_and(|c| c.opted_out)
    }

    pub fn window(&self, account: u16, contact: &str) -> Option<Window> {
        self.windows.get(&ConvKey::new(account, contact))
    }

    pub fn window_open(&self, account: u16, contact: &str, now: Millis) -> bool {
        self.windows.is_open(&ConvKey::new(account, contact), now)
    }

    /// Meta said the window is closed (131047): believe it.
    pub fn close_window(&self, account: u16, contact: &str, now: Millis) {
        let key = ConvKey::new(account, contact);
        self.windows.close(&key, now);
        if let Some(window) = self.windows.get(&key) {
            self.log(|| Op::Window {
                account: self.account_name(account),
                contact: contact.to_string(),
                window,
            });
        }
    }

    pub fn open_windows(&self, now: Millis) -> usize {
        self.windows.open_count(now)
    }

    pub fn conversation(&self, account: &Account, contact: &str) -> Option<ConversationView> {
        let key = ConvKey::new(account.id, contact);
        let conversation = self.conversations.get(&key).map(|c| c.clone())?;
        Some(ConversationView {
            account: account.name().to_string(),
            wa_id: contact.to_string(),
            window: self.window(account.id, contact),
            conversation,
        })
    }

    // ------------------------------------------------------------- records

    /// Store a new record and, unless it is already final, queue it.
    /// Returns its position in the ready queue (1 = next), or 0 when
    /// scheduled or final.
    pub fn insert_record(&self, account: &Account, record: OutboundRecord, now: Millis) -> usize {
        let id = record.id.clone();
        let status = record.status;
        let send_at = record.send_at;
        let conv_recent = Recent {
            direction: Direction::Out,
            id: id.clone(),
            kind: record.content.kind.clone(),
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
        self.log(|| Op::Record(Box::new(record.clone())));
        if self.records.insert(id.clone(), record).is_none() {
            let held = account.records.fetch_add(1, Ordering::Relaxed) + 1;
            // Past the cap by a tenth: drop the oldest finished records
            // down to 90 % of it (amortised: one scan per cap/5 inserts).
            let cap = account.settings.max_records;
            if held > cap + cap / 10 {
                self.evict_records(account, cap - cap / 10);
            }
        }
        self.order.lock().insert(id.clone());
        self.update_conversation(account.id, &to, now, |c| {
            push_recent(&mut c.recent, conv_recent)
        });
        let position = match status {
            Status::Scheduled => {
                let seq = self.seq.fetch_add(1, Ordering::Relaxed);
                account
                    .queue
                    .lock()
                    .scheduled
                    .insert((send_at.unwrap_or(now), seq), id);
                0
            }
            Status::Queued => {
                let mut q = account.queue.lock();
                q.ready.push_back(id);
                q.ready.len()
            }
            _ => 0,
        };
        if !status.is_final() {
            account.queue.notify.notify_one();
        }
        position
    }

    /// Drop the oldest finished records of `account` until it holds `keep`.
    fn evict_records(&self, account: &Account, keep: usize) {
        let held = account.records.load(Ordering::Relaxed);
        let mut excess = held.saturating_sub(keep);
        let mut victims = Vec::new();
        {
            let order = self.order.lock();
            for id in order.iter() {
                if excess == 0 {
                    break;
                }
                let Some(r) = self.records.get(id) else {
                    continue;
                };
                if r.account == account.name() && r.status.is_settled() {
                    victims.push((id.clone(), r.wamid.clone()));
                    excess -= 1;
                }
            }
        }
        self.metrics.records_evicted(victims.len());
        tracing::warn!(
            account = account.name(),
            dropped = victims.len(),
            max_records = account.settings.max_records,
            "account holds more records than max_records; the oldest finished ones were dropped"
        );
        for (id, wamid) in victims {
            self.forget_record(&id, wamid.as_deref());
        }
    }

    /// Remove one record with its indexes (journaled).
    fn forget_record(&self, id: &str, wamid: Option<&str>) {
        if let Some((_, r)) = self.records.remove(id)
            && let Some(a) = self.account_by_name(&r.account)
        {
            a.records.fetch_sub(1, Ordering::Relaxed);
        }
        self.order.lock().remove(id);
        if let Some(w) = wamid {
            self.by_wamid.remove(w);
        }
        self.log(|| Op::ForgetRecord { id: id.to_string() });
    }

    pub fn record(&self, id: &str) -> Option<OutboundRecord> {
        self.records.get(id).map(|r| r.clone())
    }

    pub fn record_id_by_wamid(&self, wamid: &str) -> Option<String> {
        self.by_wamid.get(wamid).map(|r| r.clone())
    }

    /// Tags of the outbound message with this wamid (for `reply_to_tag`).
    pub fn tags_of_wamid(&self, wamid: &str) -> Vec<String> {
        let Some(id) = self.record_id_by_wamid(wamid) else {
            return Vec::new();
        };
        self.records
            .get(&id)
            .map(|r| r.tags.clone())
            .unwrap_or_default()
    }

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
        // Logged under the record's lock, so the journal keeps the order of changes.
        self.log(|| Op::Record(Box::new(r.clone())));
        Some(out)
    }

    fn report_status(&self, r: &OutboundRecord) {
        if let Some(tx) = &self.status_changes {
            let _ = tx.send(r.clone());
        }
    }

    /// Cancel a queued or scheduled message. `Err(None)`: no such message;
    /// `Err(Some(status))`: it is past cancelling.
    pub fn cancel(&self, id: &str, now: Millis) -> Result<OutboundRecord, Option<Status>> {
        let outcome = self
            .update_record(id, now, |r| {
                if matches!(r.status, Status::Queued | Status::Scheduled) {
                    (Some(Status::Cancelled), Ok(r.account.clone()))
                } else {
                    (None, Err(r.status))
                }
            })
            .ok_or(None)?;
        let account = outcome.map_err(Some)?;
        if let Some(a) = self.account_by_name(&account) {
            self.dequeue(&a, id);
        }
        self.record(id).ok_or(None)
    }

    /// Records newest first, after `cursor` (an id of a previous page).
    /// Returns the page and the cursor of the next one.
    pub fn list_records(
        &self,
        filter: &RecordFilter,
        cursor: Option<&str>,
        limit: usize,
    ) -> (Vec<OutboundRecord>, Option<String>) {
        let order = self.order.lock();
        let range = match cursor {
            Some(c) => {
                order.range::<str, _>((std::ops::Bound::Unbounded, std::ops::Bound::Excluded(c)))
            }
            None => order.range::<str, _>(..),
        };
        let mut page = Vec::new();
        let mut more = false;
        for id in range.rev() {
            let Some(r) = self.records.get(id) else {
                continue;
            };
            if !filter.matches(&r) {
                continue;
            }
            if page.len() == limit {
                more = true;
                break;
            }
            page.push(r.clone());
        }
        let next = if more {
            page.last().map(|r| r.id.clone())
        } else {
            None
        };
        (page, next)
    }

    /// Every conversation (of one account, or all), for listing.
    pub fn conversations(&self, account: Option<u16>) -> Vec<ConversationView> {
        let keys: Vec<ConvKey> = self
            .conversations
            .iter()
            .filter(|e| account.is_none_or(|a| a == e.key().account))
            .map(|e| e.key().clone())
            .collect();
        keys.into_iter()
            .filter_map(|k| {
                let a = self.account(k.account)?;
                self.conversation(&a, &k.contact)
            })
            .collect()
    }

    /// Set the rule state and, if given, replace the vars (API `PUT state`).
    pub fn put_state(
        &self,
        account: u16,
        contact: &str,
        state: Option<String>,
        vars: Option<BTreeMap<String, String>>,
        now: Millis,
    ) {
        self.update_conversation(account, contact, now, |c| {
            if let Some(s) = state {
                c.state = s;
            }
            if let Some(v) = vars {
                c.vars = v;
            }
        });
    }

    /// The send answered with `wamid`: mark sent and apply any statuses
    /// that arrived before the answer.
    pub fn mark_sent(&self, id: &str, wamid: &str, now: Millis) {
        self.update_record(id, now, |r| {
            r.wamid = Some(wamid.to_string());
            r.error = None;
            (Some(Status::Sent), ())
        });
        self.by_wamid.insert(wamid.to_string(), id.to_string());
        // The wamid is indexed before the orphans are looked at: a status
        // parked concurrently is either seen here or finds the index.
        if let Some((_, (_, early))) = self.orphans.remove(wamid) {
            for u in early {
                self.apply_status(&u, now);
            }
        }
    }

    /// End a record `failed` with `error`.
    pub fn mark_failed(&self, id: &str, error: RecordError, now: Millis) {
        self.update_record(id, now, |r| {
            r.error = Some(error);
            (Some(Status::Failed), ())
        });
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
        let id = match self.record_id_by_wamid(&u.wamid) {
            Some(id) => id,
            None => match self.park_orphan(u, now) {
                Some(id) => id,
                None => return StatusOutcome::Unknown,
            },
        };
        let at = if u.timestamp > 0 {
            u.timestamp.min(now)
        } else {
            now
        };
        let applied = self.update_record(&id, at, |r| {
            if !r.status.accepts_from_meta(next) {
                return (None, None);
            }
            if next == Status::Failed {
                let (code, title) = u.error.clone().unwrap_or((0, "failed".into()));
                r.error = Some(RecordError {
                    code: "graph_error".into(),
                    graph_code: Some(code),
                    message: title,
                });
            }
            (Some(next), Some((r.account.clone(), r.to.clone())))
        });
        match applied.flatten() {
            Some((account, to)) => {
                if next == Status::Failed
                    && u.error.as_ref().is_some_and(|(c, _)| *c == 131047)
                    && let Some(a) = self.account_by_name(&account)
                {
                    self.close_window(a.id, &to, now);
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
    fn park_orphan(&self, u: &StatusUpdate, now: Millis) -> Option<String> {
        if self.orphans.len() >= ORPHAN_CAPACITY {
            self.orphans
                .retain(|_, (since, _)| now - *since < ORPHAN_TTL_MS);
        }
        let full = self.orphans.len() >= ORPHAN_CAPACITY;
        let entry = self.orphans.entry(u.wamid.clone());
        if let Some(id) = self.record_id_by_wamid(&u.wamid) {
            return Some(id);
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

    /// Remove `id` from its account's queue (sent, failed or cancelled).
    pub fn dequeue(&self, account: &Account, id: &str) -> bool {
        let mut q = account.queue.lock();
        if let Some(pos) = q.ready.iter().position(|x| x == id) {
            q.ready.remove(pos);
            return true;
        }
        let key = q
            .scheduled
            .iter()
            .find(|(_, v)| v.as_str() == id)
            .map(|(k, _)| *k);
        key.and_then(|k| q.scheduled.remove(&k)).is_some()
    }

    /// Outbound counts of the recent messages of a conversation, with the
    /// current status of each outbound one.
    pub fn recent_messages(
        &self,
        account: &Account,
        contact: &str,
    ) -> Vec<(Recent, Option<Status>)> {
        let recent: Vec<Recent> = match self.conversations.get(&ConvKey::new(account.id, contact)) {
            Some(c) => c.recent.iter().cloned().collect(),
            None => return Vec::new(),
        };
        recent
            .into_iter()
            .map(|m| {
                let status = match m.direction {
                    Direction::In => None,
                    Direction::Out => self.records.get(&m.id).map(|r| r.status),
                };
                (m, status)
            })
            .collect()
    }
}

/// A stored answer to a request with an idempotency key.
#[derive(Debug, Clone)]
struct Idempotent {
    fingerprint: [u8; 32],
    answer: serde_json::Value,
    at: Millis,
}

/// How long idempotency keys are remembered.
pub const IDEMPOTENCY_TTL_MS: Millis = 24 * 3600 * 1000;

/// What an idempotent request came to.
#[derive(Debug)]
pub enum IdempotencyOutcome<E> {
    /// First time: the answer was produced and stored.
    Done(serde_json::Value),
    /// Same key, same body: the stored answer.
    Replayed(serde_json::Value),
    /// Same key, another body.
    Conflict,
    /// The request failed; nothing was stored, the key may be used again.
    Failed(E),
}

/// SHA-256 of a JSON value's canonical (sorted-key) serialisation.
pub fn fingerprint(v: &serde_json::Value) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(serde_json::to_vec(v).unwrap_or_default()).into()
}

impl State {
    /// Run `f` once per idempotency `key` (SPEC §7): a repeat with the same
    /// fingerprint gets the stored answer, another fingerprint a conflict.
    pub fn idempotent<E>(
        &self,
        key: &str,
        fp: [u8; 32],
        now: Millis,
        f: impl FnOnce() -> Result<serde_json::Value, E>,
    ) -> IdempotencyOutcome<E> {
        use dashmap::mapref::entry::Entry;
        let outcome = match self.idempotency.entry(key.to_string()) {
            Entry::Occupied(e) if now - e.get().at < IDEMPOTENCY_TTL_MS => {
                return if e.get().fingerprint == fp {
                    IdempotencyOutcome::Replayed(e.get().answer.clone())
                } else {
                    IdempotencyOutcome::Conflict
                };
            }
            entry => match f() {
                Ok(answer) => {
                    let stored = Idempotent {
                        fingerprint: fp,
                        answer: answer.clone(),
                        at: now,
                    };
                    self.log(|| Op::Idempotency {
                        key: key.to_string(),
                        fingerprint: hex::encode(fp),
                        answer: answer.clone(),
                        at: now,
                    });
                    match entry {
                        Entry::Occupied(mut e) => {
                            e.insert(stored);
                        }
                        Entry::Vacant(e) => {
                            e.insert(stored);
                        }
                    }
                    IdempotencyOutcome::Done(answer)
                }
                Err(e) => IdempotencyOutcome::Failed(e),
            },
        };
        if self.idempotency_inserts.fetch_add(1, Ordering::Relaxed) % 1024 == 1023 {
            self.idempotency
                .retain(|_, v| now - v.at < IDEMPOTENCY_TTL_MS);
        }
        outcome
    }
}

fn push_recent(recent: &mut VecDeque<Recent>, entry: Recent) {
    if recent.len() >= RECENT {
        recent.pop_front();
    }
    recent.push_back(entry);
}
