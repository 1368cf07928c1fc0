//! What the journal records: whole-object upserts, so that replaying an op
//! twice changes nothing. Accounts are named, not numbered, so a journal
//! survives a reordered configuration.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::domain::Millis;
use crate::inbound::InboundMessage;
use crate::outbound::OutboundRecord;
use crate::state::{Conversation, Window};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Op {
    /// First op of a snapshot: it covers every log before `next_log`.
    SnapshotOf {
        next_log: u64,
    },
    /// A sandbox account registered from a webhook.
    Account {
        name: String,
        phone_number_id: String,
    },
    /// An inbound message id seen (dedupe).
    Seen {
        wamid: String,
        at: Millis,
    },
    Window {
        account: String,
        contact: String,
        window: Window,
    },
    Conversation {
        account: String,
        contact: String,
        conversation: Box<Conversation>,
    },
    Record(Box<OutboundRecord>),
    Idempotency {
        key: String,
        fingerprint: String,
        answer: Value,
        at: Millis,
    },
    /// An acknowledged inbound message whose rules have not run yet.
    Pending {
        account: String,
        message: Box<InboundMessage>,
        new_conversation: bool,
    },
    /// The rules of that message ran.
    Done {
        wamid: String,
    },
    /// A conversation (and its window) past retention was dropped.
    Forget {
        account: String,
        contact: String,
    },
    /// An outbound record past retention was dropped.
    ForgetRecord {
        id: String,
    },
    /// An event waiting for delivery to a target.
    Event {
        target: String,
        id: String,
        body: String,
        created: Millis,
    },
    /// That event was delivered, or given up.
    EventDone {
        target: String,
        id: String,
    },
}
