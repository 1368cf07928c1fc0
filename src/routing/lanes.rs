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

/// The senders of the lanes; the workers are started by the app
/// ([`super::run_lane`]).
pub struct Lanes {
    senders: Vec<mpsc::UnboundedSender<Job>>,
    hasher: std::collections::hash_map::RandomState,
    /// Jobs pushed and not yet finished (queued or running).
    pending: AtomicUsize,
}

impl Lanes {
    pub fn new() -> (Self, Vec<mpsc::UnboundedReceiver<Job>>) {
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

    /// Queue `job` behind the earlier messages of its conversation.
    pub fn push(&self, job: Job) {
        let mut h = self.hasher.build_hasher();
        job.account.id.hash(&mut h);
        job.msg.from.hash(&mut h);
        let lane = (h.finish() % self.senders.len() as u64) as usize;
        self.pending.fetch_add(1, Ordering::AcqRel);
        if let Err(e) = self.senders[lane].send(job) {
            self.finished();
            // Only during shutdown, after the workers stopped.
            tracing::error!(wamid = %e.0.msg.wamid, "rule lane closed; message not routed");
        }
    }

    /// Inbound messages whose rules have not finished running.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }

    pub(super) fn finished(&self) {
        self.pending.fetch_sub(1, Ordering::AcqRel);
    }
}
