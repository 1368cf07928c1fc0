//! What the conversation state writes to the journal ([`crate::persist`]
//! format 1, owner `s`), as wire types of their own: renaming a field of
//! an in-memory struct does not change these. Variants and fields named
//! here are the on-disk format; format 0 wrote the same shapes (without
//! `Recent`, `recent_seq` and with `recent` always present).
//!
//! Each op is safe to replay twice: upserts replace; `Recent` carries the
//! entry's sequence number and is skipped when the conversation already
//! holds it.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::conversations::{Conversation, Direction, Recent};
use super::table::Node;
use super::window::Window;
use crate::domain::Millis;
use crate::inbound::{InboundKind, InboundMessage, ReplyChoice};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum StateOp {
    /// A sandbox account registered from a webhook.
    Account {
        name: String,
        phone_number_id: String,
    },
    /// An inbound message id seen (dedupe).
    Seen { wamid: String, at: Millis },
    /// The same in a snapshot: the id's digest (hex), which is all the
    /// dedupe memory keeps (`state::dedupe`).
    SeenDigest { digest: String, at: Millis },
    Window {
        account: String,
        contact: String,
        window: WindowWire,
    },
    /// A conversation's fields; its recent messages too when `recent` is
    /// set (snapshots, format 0), else they stay as they are.
    Conversation {
        account: String,
        contact: String,
        conversation: Box<ConversationWire>,
    },
    /// One message added to a conversation's history (a delta: the other
    /// 49 are not written again).
    Recent {
        account: String,
        contact: String,
        /// Number of entries ever added, this one included.
        seq: u64,
        entry: RecentWire,
        /// The contact's profile name, when the message carried one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        last_activity: Millis,
    },
    Idempotency {
        key: String,
        fingerprint: String,
        answer: Value,
        at: Millis,
    },
    /// An acknowledged inbound message whose rules have not run yet.
    /// `seen`: when it was first seen — its dedupe entry, in the same
    /// record so that a torn write cannot keep the one without the other
    /// (logs written before this field have a `Seen` before it; snapshots
    /// hold `SeenDigest`s).
    Pending {
        account: String,
        message: Box<InboundWire>,
        new_conversation: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        seen: Option<Millis>,
    },
    /// The rules of that message ran.
    Done { wamid: String },
    /// A conversation (and its window) past retention was dropped.
    Forget { account: String, contact: String },
    /// The contact's BSUID or username became known, or changed.
    ContactIds {
        account: String,
        contact: String,
        user_id: Option<String>,
        username: Option<String>,
    },
    /// Meta reported a template's status and/or category.
    Template {
        name: String,
        language: String,
        status: Option<String>,
        category: Option<String>,
    },
    /// What Meta's webhooks told of an account's number: its display
    /// number, and whether Meta announced its throughput upgrade.
    Number {
        account: String,
        display_phone_number: Option<String>,
        upgraded: bool,
    },
    /// BSUID `user_id` is the contact with phone number `wa_id`: one
    /// conversation, kept under the phone number (a conversation kept
    /// under the BSUID until then merged into it).
    Link {
        account: String,
        user_id: String,
        wa_id: String,
    },
    /// The contact kept under `from` is now `to` (a new phone number, or a
    /// new BSUID of a contact known by BSUID only): their conversation
    /// moved over.
    Renumber {
        account: String,
        from: String,
        to: String,
    },
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct WindowWire {
    pub last_inbound: Millis,
    pub expires: Millis,
}

impl From<Window> for WindowWire {
    fn from(w: Window) -> Self {
        WindowWire {
            last_inbound: w.last_inbound,
            expires: w.expires,
        }
    }
}

impl From<WindowWire> for Window {
    fn from(w: WindowWire) -> Self {
        Window {
            last_inbound: w.last_inbound,
            expires: w.expires,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConversationWire {
    pub name: Option<String>,
    pub state: String,
    pub vars: BTreeMap<String, String>,
    pub handoff_until: Option<Millis>,
    pub opted_out: bool,
    #[serde(default)]
    pub consent_at: Option<Millis>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recent: Option<VecDeque<RecentWire>>,
    /// Entries ever added to `recent` (format 0: its length).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recent_seq: Option<u64>,
    pub last_activity: Millis,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Marketing messages stopped in the contact's WhatsApp settings.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub marketing_opt_out: bool,
}

impl ConversationWire {
    /// `c` on disk; its history only `with_recent`.
    pub fn new(c: &Conversation, with_recent: bool) -> Self {
        ConversationWire {
            name: c.name.clone(),
            state: c.state.clone(),
            vars: c.vars.clone(),
            handoff_until: c.handoff_until,
            opted_out: c.opted_out,
            consent_at: c.consent_at,
            recent: with_recent.then(|| c.recent.iter().map(RecentWire::from).collect()),
            recent_seq: with_recent.then_some(c.recent_seq),
            last_activity: c.last_activity,
            user_id: c.user_id.clone(),
            username: c.username.clone(),
            marketing_opt_out: c.marketing_opt_out,
        }
    }

    /// Apply onto `n` (the conversation as replay has it so far).
    pub fn apply(self, n: &mut Node) {
        if let Some(recent) = self.recent {
            let seq = self.recent_seq.unwrap_or(recent.len() as u64);
            n.set_recent(recent.into_iter().map(Recent::from).collect(), seq);
        }
        n.set_fields(Conversation {
            name: self.name,
            state: self.state,
            vars: self.vars,
            handoff_until: self.handoff_until,
            opted_out: self.opted_out,
            consent_at: self.consent_at,
            last_activity: self.last_activity,
            user_id: self.user_id,
            username: self.username,
            marketing_opt_out: self.marketing_opt_out,
            ..Conversation::default()
        });
    }
}

/// A history entry on disk; `RecentWire<&str>` writes the same JSON from
/// an entry in memory without copying its strings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecentWire<S = String> {
    pub direction: DirectionWire,
    pub id: S,
    pub kind: S,
    pub text: Option<S>,
    pub at: Millis,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub enum DirectionWire {
    In,
    Out,
}

impl<'a> From<&'a Recent> for RecentWire<&'a str> {
    fn from(r: &'a Recent) -> Self {
        RecentWire {
            direction: match r.direction {
                Direction::In => DirectionWire::In,
                Direction::Out => DirectionWire::Out,
            },
            id: &r.id,
            kind: &r.kind,
            text: r.text.as_deref(),
            at: r.at,
        }
    }
}

impl From<&Recent> for RecentWire {
    fn from(r: &Recent) -> Self {
        let w = RecentWire::<&str>::from(r);
        RecentWire {
            direction: w.direction,
            id: w.id.to_string(),
            kind: w.kind.to_string(),
            text: w.text.map(str::to_string),
            at: w.at,
        }
    }
}

impl From<RecentWire> for Recent {
    fn from(r: RecentWire) -> Self {
        Recent {
            direction: match r.direction {
                DirectionWire::In => Direction::In,
                DirectionWire::Out => Direction::Out,
            },
            id: r.id,
            kind: r.kind,
            text: r.text,
            at: r.at,
        }
    }
}

/// An inbound message on disk. `kind` is the rule name of its type
/// (`text`, `button` …; format 0 wrote `Text`, `Button` …).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InboundWire {
    pub wamid: String,
    pub from: String,
    pub contact_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    pub timestamp: Millis,
    pub kind: String,
    pub raw_type: String,
    pub text: Option<String>,
    pub reply: Option<ReplyWire>,
    pub context_id: Option<String>,
    pub opens_window: bool,
    pub raw: Box<serde_json::value::RawValue>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplyWire {
    pub id: String,
    pub title: String,
}

impl From<&InboundMessage> for InboundWire {
    fn from(m: &InboundMessage) -> Self {
        InboundWire {
            wamid: m.wamid.to_string(),
            from: m.from.to_string(),
            contact_name: m.contact_name.clone(),
            user_id: m.user_id.clone(),
            username: m.username.clone(),
            timestamp: m.timestamp,
            kind: m.kind.as_str().to_string(),
            raw_type: m.raw_type.clone(),
            text: m.text.clone(),
            reply: m.reply.as_ref().map(|r| ReplyWire {
                id: r.id.clone(),
                title: r.title.clone(),
            }),
            context_id: m.context_id.as_ref().map(ToString::to_string),
            opens_window: m.opens_window,
            raw: m.raw.clone(),
        }
    }
}

impl From<InboundWire> for InboundMessage {
    fn from(m: InboundWire) -> Self {
        InboundMessage {
            wamid: m.wamid.into(),
            from: m.from.into(),
            contact_name: m.contact_name,
            user_id: m.user_id,
            username: m.username,
            timestamp: m.timestamp,
            kind: InboundKind::parse(&m.kind.to_ascii_lowercase())
                .unwrap_or(InboundKind::Unsupported),
            raw_type: m.raw_type,
            text: m.text,
            reply: m.reply.map(|r| ReplyChoice {
                id: r.id,
                title: r.title,
            }),
            context_id: m.context_id.map(Into::into),
            opens_window: m.opens_window,
            raw: m.raw,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::table::ConvTable;

    #[test]
    fn a_format_zero_conversation_and_message_read_back() {
        let conv = r#"{"Conversation":{"account":"main","contact":"1","conversation":{"name":"Ana","state":"menu","vars":{},"handoff_until":null,"opted_out":false,"recent":[{"direction":"In","id":"wamid.1","kind":"text","text":"hi","at":5}],"last_activity":5}}}"#;
        let StateOp::Conversation { conversation, .. } = serde_json::from_str(conv).unwrap() else {
            panic!("a conversation")
        };
        let t = ConvTable::default();
        t.upsert(1, "1", |n| conversation.apply(n));
        let c = t.with(1, "1", |n| n.to_conversation(true)).unwrap();
        assert_eq!((c.recent.len(), c.recent_seq), (1, 1));
        assert_eq!(c.state, "menu");
        let pending = r#"{"Pending":{"account":"main","message":{"wamid":"w","from":"1","contact_name":null,"timestamp":1,"kind":"Button","raw_type":"interactive","text":"Yes","reply":{"id":"yes","title":"Yes"},"context_id":null,"opens_window":true,"raw":{}},"new_conversation":true}}"#;
        let StateOp::Pending { message, .. } = serde_json::from_str(pending).unwrap() else {
            panic!("a pending message")
        };
        let m = InboundMessage::from(*message);
        assert_eq!(m.kind, InboundKind::Button);
        assert_eq!(m.reply.unwrap().id, "yes");
    }

    #[test]
    fn field_updates_leave_the_history_alone() {
        let t = ConvTable::default();
        t.upsert(1, "1", |n| {
            n.push_recent(Recent {
                direction: Direction::In,
                id: "w".into(),
                kind: "text".into(),
                text: None,
                at: 1,
            })
        });
        let mut changed = t.with(1, "1", |n| n.to_conversation(true)).unwrap();
        changed.state = "done".into();
        let wire = ConversationWire::new(&changed, false);
        assert!(
            serde_json::to_string(&wire)
                .unwrap()
                .find("recent")
                .is_none()
        );
        t.upsert(1, "1", |n| wire.apply(n));
        let c = t.with(1, "1", |n| n.to_conversation(true)).unwrap();
        assert_eq!((c.state.as_str(), c.recent.len()), ("done", 1));
    }
}
