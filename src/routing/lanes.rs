//! Ordered lanes: one FIFO per conversation, hashed onto a fixed set of
//! worker tasks, so messages of one conversation are routed in arrival
//! order and different conversations in parallel.

use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::mpsc;

use crate::inbound::InboundMessage;
use crate::state::Account;

/// Number of ordered lanes (worker tasks) for rule processing.
pub const LANES: usize = 32;

/// One inbound message waiting for its rules.
pub struct Job {
    pub account: Arc<Account>,
    pub msg: InboundMessage,
    pub new_conversation: bool,
    /// Acknowledged before a restart, rules not run then (journal replay):
    /// some of its replies may exist already, perhaps archived.
    pub replayed: bool,
}

/// What a lane carries: a message, or a barrier answered once every
/// message queued before it in the lane has been routed.
// Nearly every item is a message: boxing it would cost an allocation each
// for the sake of the rare barrier.
#[allow(clippy::large_enum_variant)]
pub enum Item {
    Job(Job),
    Barrier(tokio::sync::oneshot::Sender<()>),
}

/// The senders of the lanes; the workers are started by the app
/// ([`super::run_lane`]).
pub struct Lanes {
    senders: Vec<mpsc::UnboundedSender<Item>>,
    hasher: std::collections::hash_map::RandomState,
    /// Jobs pushed and not yet finished (queued or running).
    pending: AtomicUsize,
}

impl Lanes {
    pub fn new() -> (Self, Vec<mpsc::UnboundedReceiver<Item>>) {
        let (senders, receivers) = (0..LANES).map(|_| mpsc::unbounded_channel()).unzip();
        (
            Lanes {
                senders,
                hasher: Default::default(),
                pending: AtomicUsize::new(0),
            },
            receivers,
        )
    }

    /// The lane of a conversation.
    fn lane(&self, account: u16, contact: &str) -> &mpsc::UnboundedSender<Item> {
        let mut h = self.hasher.build_hasher();
        account.hash(&mut h);
        contact.hash(&mut h);
        &self.senders[(h.finish() % self.senders.len() as u64) as usize]
    }

    /// Queue `job` behind the earlier messages of its conversation.
    pub fn push(&self, job: Job) {
        let lane = self.lane(job.account.id, job.msg.from.as_str());
        self.pending.fetch_add(1, Ordering::AcqRel);
        if let Err(e) = lane.send(Item::Job(job)) {
            self.finished();
            // Only during shutdown, after the workers stopped.
            if let Item::Job(job) = e.0 {
                tracing::error!(wamid = %job.msg.wamid, "rule lane closed; message not routed");
            }
        }
    }

    /// Resolves once the rules of every message of the conversation with
    /// `contact` queued so far have run (at once if the lanes are closed).
    pub fn barrier(&self, account: u16, contact: &str) -> tokio::sync::oneshot::Receiver<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let _ = self.lane(account, contact).send(Item::Barrier(tx));
        rx
    }

    /// Inbound messages whose rules have not finished running.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }

    pub(super) fn finished(&self) {
        self.pending.fetch_sub(1, Ordering::AcqRel);
    }
}
