//! The conversation state, and the one place that changes it: accounts,
//! conversations (window, name, rule state, vars, consent, handoff, recent
//! messages), the inbound dedupe memory, API idempotency keys and inbound
//! messages acknowledged but not yet routed. Outbound records and queues
//! belong to [`crate::outbound::store`], which reads this state; this module
//! knows nothing of sending.
//!
//! Every mutation is a method here and appends its journal op. Invariants:
//! a window is only ever extended (except by Meta's 131047); consent only
//! moves forward in time; no DashMap guard is held across `.await` or
//! while another map is locked.

pub mod dedupe;
pub mod restore;
pub mod window;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::RwLock;

use dashmap::DashMap;
use tokio::sync::mpsc;

use crate::config::AccountSettings;
use crate::domain::Millis;
use crate::inbound::InboundMessage;
use crate::journal::{Journal, Op};
use crate::telemetry::Metrics;
use dedupe::Dedupe;
pub use window::{ConvKey, WINDOW_MS, Window, WindowStore};

/// Messages kept per conversation (SPEC §4).
pub const RECENT: usize = 50;
const DEDUPE_TTL_MS: Millis = 7 * 24 * 3600 * 1000;
const DEDUPE_CAPACITY: usize = 1_000_000;
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
}

impl Account {
    pub fn name(&self) -> &str {
        &self.settings.name
    }
    pub fn is_sandbox(&self) -> bool {
        self.settings.access_token.is_none()
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
    pub dedupe: Dedupe,
    idempotency: DashMap<String, Idempotent>,
    idempotency_inserts: AtomicU64,
    metrics: Arc<Metrics>,
    new_accounts: mpsc::UnboundedSender<Arc<Account>>,
    /// The durable journal (data_dir); unset in memory mode.
    journal: std::sync::OnceLock<Journal>,
    /// Acknowledged inbound messages whose rules have not run yet.
    pending: DashMap<String, (String, InboundMessage, bool)>,
}

impl State {
    /// State with the configured accounts. Every account registered, these
    /// and sandbox ones later, is announced on the returned channel so that
    /// a sender can be started for it.
    pub fn new(
        accounts: &[AccountSettings],
        metrics: Arc<Metrics>,
    ) -> (Self, mpsc::UnboundedReceiver<Arc<Account>>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let state = State {
            accounts: RwLock::new(AccountsInner::default()),
            conversations: DashMap::new(),
            windows: WindowStore::new(),
            dedupe: Dedupe::new(DEDUPE_CAPACITY, DEDUPE_TTL_MS),
            idempotency: DashMap::new(),
            idempotency_inserts: AtomicU64::new(0),
            metrics,
            new_accounts: tx,
            journal: std::sync::OnceLock::new(),
            pending: DashMap::new(),
        };
        // The configuration holds at most MAX_ACCOUNTS (checked on load).
        for a in accounts {
            state.add_account(a.clone());
        }
        (state, rx)
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
        let account = Arc::new(Account { id, settings });
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
    pub(crate) fn log(&self, op: impl FnOnce() -> Op) {
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

    /// Add an outbound message to the conversation's recent messages.
    pub fn note_outbound(&self, account: u16, contact: &str, entry: Recent, now: Millis) {
        self.update_conversation(account, contact, now, |c| push_recent(&mut c.recent, entry));
    }

    /// The recent messages of a conversation, oldest first.
    pub fn recent(&self, account: u16, contact: &str) -> Vec<Recent> {
        self.conversations
            .get(&ConvKey::new(account, contact))
            .map(|c| c.recent.iter().cloned().collect())
            .unwrap_or_default()
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
