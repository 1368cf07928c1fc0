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

pub mod accounts;
pub mod contacts;
pub mod conversations;
pub mod dedupe;
pub mod idempotency;
mod linkset;
pub mod ops;
pub mod restore;
pub mod table;
pub mod templates;
pub mod window;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use parking_lot::RwLock;

use dashmap::DashMap;
use tokio::sync::mpsc;

use crate::archive::Archive;
use crate::config::AccountSettings;
use crate::domain::Millis;
use crate::ids::Wamid;
use crate::inbound::InboundMessage;
use crate::journal::Journal;
use crate::persist::{Owner, encode};
use crate::telemetry::Metrics;
use accounts::AccountsInner;
pub use accounts::{Account, MAX_ACCOUNTS, MAX_SANDBOX_ACCOUNTS};
pub use conversations::{
    Conversation, ConversationView, Direction, InboundView, RECENT, Recent, RoutingFacts,
};
use dedupe::Dedupe;
use idempotency::Idempotent;
pub use idempotency::{IDEMPOTENCY_TTL_MS, IdempotencyOutcome, fingerprint};
use ops::{InboundWire, StateOp};
pub use window::{WINDOW_MS, Window};

const DEDUPE_TTL_MS: Millis = 7 * 24 * 3600 * 1000;
const DEDUPE_CAPACITY: usize = 1_000_000;

/// All state, behind one API.
pub struct State {
    accounts: RwLock<AccountsInner>,
    conversations: table::ConvTable,
    pub dedupe: Dedupe,
    idempotency: DashMap<String, Idempotent>,
    idempotency_inserts: AtomicU64,
    metrics: Arc<Metrics>,
    new_accounts: mpsc::UnboundedSender<Arc<Account>>,
    /// The durable journal (data_dir); unset in memory mode.
    journal: std::sync::OnceLock<Journal>,
    /// Acknowledged inbound messages whose rules have not run yet.
    pending: DashMap<Wamid, (String, InboundMessage, bool)>,
    /// Where history and settled records go (crate::archive).
    archive: Arc<Archive>,
    /// BSUID → phone number, per account (`contacts`).
    aliases: contacts::Links,
    /// Template states and categories Meta reported, by (name, language).
    templates: DashMap<(Box<str>, Box<str>), templates::TemplateInfo>,
}

impl State {
    /// State with the configured accounts. Every account registered, these
    /// and sandbox ones later, is announced on the returned channel so that
    /// a sender can be started for it.
    pub fn new(
        accounts: &[AccountSettings],
        metrics: Arc<Metrics>,
        archive: Arc<Archive>,
    ) -> (Self, mpsc::UnboundedReceiver<Arc<Account>>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let state = State {
            accounts: RwLock::new(AccountsInner::default()),
            conversations: table::ConvTable::default(),
            dedupe: Dedupe::new(DEDUPE_CAPACITY, DEDUPE_TTL_MS),
            idempotency: DashMap::new(),
            idempotency_inserts: AtomicU64::new(0),
            metrics,
            new_accounts: tx,
            journal: std::sync::OnceLock::new(),
            pending: DashMap::new(),
            archive,
            aliases: contacts::Links::default(),
            templates: DashMap::new(),
        };
        // The configuration holds at most MAX_ACCOUNTS (checked on load).
        for a in accounts {
            state.add_account(a.clone());
        }
        (state, rx)
    }

    /// Append an op to the journal, if there is one (the op is only built then).
    fn log(&self, op: impl FnOnce() -> StateOp) {
        if let Some(j) = self.journal.get() {
            j.append(&encode(Owner::State, &op()));
        }
    }

    /// Put the journal under this state (after replay).
    pub fn attach_journal(&self, journal: Journal) {
        let _ = self.journal.set(journal);
    }

    /// The archive of history and settled records.
    pub fn archive(&self) -> &Arc<Archive> {
        &self.archive
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

    /// Record inbound message `wamid` as seen at `now`; false if it was
    /// seen before. Journaled by [`State::mark_pending`], which every
    /// first-seen message reaches: one record for both.
    pub fn first_time(&self, wamid: &str, now: Millis) -> bool {
        self.dedupe.first_time(wamid, now)
    }

    /// An acknowledged message, first seen at `seen`, waits for its rules
    /// (replayed after a crash).
    pub fn mark_pending(
        &self,
        account: &Account,
        msg: &InboundMessage,
        new_conversation: bool,
        seen: Millis,
    ) {
        if self.journal.get().is_none() {
            return;
        }
        self.pending.insert(
            msg.wamid.clone(),
            (account.name().to_string(), msg.clone(), new_conversation),
        );
        self.log(|| StateOp::Pending {
            account: account.name().to_string(),
            message: Box::new(InboundWire::from(msg)),
            new_conversation,
            seen: Some(seen),
        });
    }

    /// Give back the room the maps of work in flight grew to in a spike.
    pub fn shrink_if_sparse(&self) {
        crate::memory::shrink_if_sparse(&self.pending);
        crate::memory::shrink_if_sparse(&self.idempotency);
    }

    /// The rules of `wamid` ran.
    pub fn mark_done(&self, wamid: &str) {
        if self.pending.remove(wamid).is_some() {
            self.log(|| StateOp::Done {
                wamid: wamid.to_string(),
            });
        }
    }
}

#[cfg(test)]
impl State {
    /// Memory-only state with one sandbox account named "main"
    /// (phone_number_id "1").
    pub(crate) fn for_test() -> Self {
        let mut a = AccountSettings::sandbox("1");
        a.name = "main".into();
        let archive = Arc::new(Archive::open(None).expect("a temporary archive"));
        State::new(&[a], Arc::new(Metrics::new()), archive).0
    }
}
