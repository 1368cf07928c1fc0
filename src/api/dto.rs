//! Wire types of the agent API (`…In` / `…Out`). Handlers answer with
//! these, and `/openapi.json` is generated from them; domain types carry
//! no serde renames.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use crate::domain::{Millis, rfc3339};
use crate::message::Object;
use crate::outbound::{OutboundRecord, Status};
use crate::state::{ConversationView, Direction, Recent};

/// `POST /v1/messages` body: Meta's send shape without
/// `messaging_product`, plus router fields. Exactly one message object,
/// under the key named by `type` (`"text": "…"` is shorthand for
/// `{"body": "…"}`).
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct MessageIn {
    /// Account name; default: the default account.
    pub account: Option<String>,
    /// The contact's E.164 number (`+` optional); or give `recipient`.
    pub to: Option<String>,
    /// Instead of `to`: the contact's BSUID (e.g. `US.13491208655302741918`),
    /// for a contact whose phone number Meta does not show.
    pub recipient: Option<String>,
    /// text, image, video, audio, document, sticker, location, contacts, interactive, template or reaction.
    #[schema(rename = "type")]
    pub kind: String,
    pub text: Option<Value>,
    pub image: Option<Value>,
    pub video: Option<Value>,
    pub audio: Option<Value>,
    pub document: Option<Value>,
    pub sticker: Option<Value>,
    pub location: Option<Value>,
    pub contacts: Option<Value>,
    pub interactive: Option<Value>,
    pub template: Option<Value>,
    pub reaction: Option<Value>,
    /// A wamid or a router message id: sent as `context.message_id`.
    pub reply_to: Option<String>,
    /// Show the customer a typing indicator on `reply_to` (their message,
    /// by wamid) right before this message goes out; it also marks that
    /// message read. Not repeated when the send is retried.
    pub typing: Option<bool>,
    /// At most 10, lower-cased.
    pub tags: Option<Vec<String>>,
    /// Any JSON object; echoed in records and status events.
    pub metadata: Option<Value>,
    /// RFC 3339; past or within 10 minutes means now; at most 35 days ahead.
    pub send_at: Option<String>,
    /// Seconds; not sent by then → `expired`. Default `[sender] validity`.
    pub validity: Option<u64>,
    /// Same key + same body → the original answer; another body → 409.
    pub idempotency_key: Option<String>,
}

/// `202` answer of a send or retry.
#[derive(Debug, Serialize, ToSchema)]
pub struct AcceptedOut {
    pub id: String,
    /// `queued` or `scheduled`.
    pub status: String,
    pub account: String,
    /// Digits only.
    pub to: String,
    /// Place in the ready queue (1 = next); 0 when scheduled.
    pub queue_position: usize,
    /// Estimated earliest send time (RFC 3339).
    pub send_after: String,
    /// For a retry: the id of the message retried.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_of: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RecordErrorOut {
    /// `window_closed`, `opted_out`, `graph_error`, …
    pub code: String,
    pub graph_code: Option<i64>,
    pub message: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct HistoryOut {
    pub status: String,
    pub at: String,
}

/// An outbound message record.
#[derive(Debug, Serialize, ToSchema)]
pub struct RecordOut {
    pub id: String,
    pub account: String,
    pub to: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// scheduled, queued, sending, sent, delivered, read, failed, expired or cancelled.
    pub status: String,
    pub wamid: Option<String>,
    /// `api` or `rule:NAME`.
    pub source: String,
    pub tags: Vec<String>,
    pub metadata: Option<Value>,
    pub attempts: u32,
    pub error: Option<RecordErrorOut>,
    pub history: Vec<HistoryOut>,
    pub created_at: String,
    pub send_at: Option<String>,
    pub expires_at: String,
    pub reply_to: Option<String>,
    /// The message as sent: `{"type": …, "<type>": {…}}`.
    pub content: Value,
    /// Meta's `pricing` from the latest status that carried one:
    /// `billable`, `pricing_model` (`PMP`), `type` (`regular` = charged,
    /// `free_customer_service`, `free_entry_point`), `category`.
    pub pricing: Option<Value>,
    /// Meta's `conversation` object (free entry point windows only).
    pub conversation: Option<Value>,
}

impl From<&OutboundRecord> for RecordOut {
    fn from(r: &OutboundRecord) -> Self {
        let mut content = serde_json::Map::new();
        let kind = r.content.kind.as_str();
        content.insert("type".into(), kind.into());
        content.insert(kind.into(), r.content.object.to_value());
        RecordOut {
            id: r.id.to_string(),
            account: r.account.to_string(),
            to: r.to.to_string(),
            kind: kind.into(),
            status: r.status.as_str().into(),
            wamid: r.wamid.as_ref().map(ToString::to_string),
            source: r.source.clone(),
            tags: r.tags.clone(),
            metadata: r.metadata.as_ref().map(Object::to_value),
            attempts: r.attempts,
            error: r.error.as_ref().map(|e| RecordErrorOut {
                code: e.code.clone(),
                graph_code: e.graph_code,
                message: e.message.clone(),
            }),
            history: r
                .history
                .iter()
                .map(|(s, at)| HistoryOut {
                    status: s.as_str().into(),
                    at: rfc3339(*at),
                })
                .collect(),
            created_at: rfc3339(r.created_at),
            send_at: r.send_at.map(rfc3339),
            expires_at: rfc3339(r.expires_at),
            reply_to: r.content.context_id.as_ref().map(ToString::to_string),
            content: Value::Object(content),
            pricing: r.pricing.as_ref().map(Object::to_value),
            conversation: r.conversation.as_ref().map(Object::to_value),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MessageListOut {
    pub messages: Vec<RecordOut>,
    /// Pass as `cursor` for the next page; null on the last.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ContactOut {
    /// The id the conversation is kept under: the phone number, or the
    /// BSUID when Meta gave no phone number.
    pub wa_id: String,
    pub name: Option<String>,
    /// Meta's business-scoped user id (BSUID), when known.
    pub user_id: Option<String>,
    /// The contact's WhatsApp username, when they adopted one.
    pub username: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct WindowOut {
    pub open: bool,
    pub last_inbound_at: Option<String>,
    pub expires_at: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct HandoffOut {
    pub active: bool,
    pub until: Option<String>,
}

/// One conversation (account, contact).
#[derive(Debug, Serialize, ToSchema)]
pub struct ConversationOut {
    pub account: String,
    pub wa_id: String,
    pub contact: ContactOut,
    pub name: Option<String>,
    pub window: WindowOut,
    pub state: String,
    pub vars: BTreeMap<String, String>,
    pub handoff: HandoffOut,
    pub opted_out: bool,
    pub last_activity_at: String,
    /// How many recent messages are kept (at most 50).
    pub messages: usize,
}

impl ConversationOut {
    pub fn new(v: &ConversationView, now: Millis) -> Self {
        let c = &v.conversation;
        let active = c.handoff_until.is_some_and(|u| u > now);
        ConversationOut {
            account: v.account.clone(),
            wa_id: v.wa_id.clone(),
            contact: ContactOut {
                wa_id: v.wa_id.clone(),
                name: c.name.clone(),
                user_id: c.user_id.clone(),
                username: c.username.clone(),
            },
            name: c.name.clone(),
            window: WindowOut {
                open: v.window_open(now),
                last_inbound_at: v.window.map(|w| rfc3339(w.last_inbound)),
                expires_at: v.window.map(|w| rfc3339(w.expires)),
            },
            state: c.state.clone(),
            vars: c.vars.clone(),
            handoff: HandoffOut {
                active,
                until: c.handoff_until.filter(|_| active).map(rfc3339),
            },
            opted_out: c.opted_out,
            last_activity_at: rfc3339(c.last_activity),
            messages: (c.recent_seq as usize).min(crate::state::RECENT),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ConversationListOut {
    pub conversations: Vec<ConversationOut>,
    pub next_cursor: Option<String>,
}

/// One of a conversation's recent messages.
#[derive(Debug, Serialize, ToSchema)]
pub struct RecentOut {
    /// `in` or `out`.
    pub direction: String,
    /// wamid (in) or router message id (out).
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
    pub at: String,
    /// Current status of an outbound message.
    pub status: Option<String>,
}

impl RecentOut {
    pub fn new(m: &Recent, status: Option<Status>) -> Self {
        RecentOut {
            direction: if m.direction == Direction::In {
                "in"
            } else {
                "out"
            }
            .into(),
            id: m.id.clone(),
            kind: m.kind.clone(),
            text: m.text.clone(),
            at: rfc3339(m.at),
            status: status.map(|s| s.as_str().into()),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RecentListOut {
    pub messages: Vec<RecentOut>,
}

/// `PUT …/state` body.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct StateIn {
    pub state: Option<String>,
    /// Replaces the vars; values are strings, numbers or booleans.
    pub vars: Option<BTreeMap<String, Value>>,
}

/// `POST …/handoff` body (optional).
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct HandoffIn {
    /// A duration (`"2h"`) or seconds; default `[conversations] handoff_ttl`.
    pub ttl: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct QueueOut {
    pub account: String,
    pub depth: usize,
    pub scheduled: usize,
    pub next_send_at: Option<String>,
    pub pace: String,
    pub pace_ms: i64,
    /// Sends started per second at most.
    pub rate: u32,
    /// Sends awaiting Meta's answer now, and at most.
    pub in_flight: usize,
    pub max_in_flight: usize,
    /// While Meta's rate limit pauses the account: until when.
    pub paused_until: Option<String>,
    pub max_queue: usize,
    pub sandbox: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct QueuesOut {
    pub queues: Vec<QueueOut>,
}

pub use crate::error::{ErrorBody, ErrorEnvelope};
