//! Typed inbound events: what the webhook edge hands to conversations and
//! rules. Built by `webhook::payload`; plain data, no I/O.

use crate::domain::Millis;
use crate::ids::{ContactId, Wamid};

/// Inbound message types as rules name them (SPEC §5 `when.type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum InboundKind {
    Text,
    Image,
    Video,
    Audio,
    Document,
    Sticker,
    Location,
    Contacts,
    /// Interactive reply-button answer or template quick-reply.
    Button,
    /// Interactive list answer.
    List,
    Reaction,
    Order,
    /// WhatsApp Flow completion (`nfm_reply`).
    Flow,
    Unsupported,
}

impl InboundKind {
    pub const ALL: [InboundKind; 14] = [
        InboundKind::Text,
        InboundKind::Image,
        InboundKind::Video,
        InboundKind::Audio,
        InboundKind::Document,
        InboundKind::Sticker,
        InboundKind::Location,
        InboundKind::Contacts,
        InboundKind::Button,
        InboundKind::List,
        InboundKind::Reaction,
        InboundKind::Order,
        InboundKind::Flow,
        InboundKind::Unsupported,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            InboundKind::Text => "text",
            InboundKind::Image => "image",
            InboundKind::Video => "video",
            InboundKind::Audio => "audio",
            InboundKind::Document => "document",
            InboundKind::Sticker => "sticker",
            InboundKind::Location => "location",
            InboundKind::Contacts => "contacts",
            InboundKind::Button => "button",
            InboundKind::List => "list",
            InboundKind::Reaction => "reaction",
            InboundKind::Order => "order",
            InboundKind::Flow => "flow",
            InboundKind::Unsupported => "unsupported",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == name)
    }

    /// A bit for sets of kinds.
    pub fn bit(self) -> u16 {
        1 << (self as u16)
    }
}

/// The id and title of a button or list answer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReplyChoice {
    pub id: String,
    pub title: String,
}

/// One inbound message, as the rules see it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct InboundMessage {
    /// wamid: Meta's id, the dedupe key.
    pub wamid: Wamid,
    /// The contact: `wa_id`, or Meta's `user_id` when no `wa_id` was given.
    pub from: ContactId,
    pub contact_name: Option<String>,
    /// Meta's business-scoped user id (BSUID, e.g. `US.1349…`), when given.
    pub user_id: Option<String>,
    /// The contact's WhatsApp username, when they adopted one.
    pub username: Option<String>,
    /// Meta's timestamp (unix ms).
    pub timestamp: Millis,
    pub kind: InboundKind,
    /// Meta's `type` string, as received.
    pub raw_type: String,
    /// Text body, media caption, or reply title.
    pub text: Option<String>,
    pub reply: Option<ReplyChoice>,
    /// `context.id`: the business message this one replies to.
    pub context_id: Option<Wamid>,
    /// Whether this message opens or refreshes the 24 h window
    /// (CLOUD_API.md §11: real user messages only).
    pub opens_window: bool,
    /// The message object as Meta sent it.
    pub raw: Box<serde_json::value::RawValue>,
}

/// Meta's word, in a `system` message, that the contact's ids changed
/// (CLOUD_API.md §5.2, §12).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityChange {
    /// `user_changed_number`: the contact's new phone number, and their
    /// new BSUID when Meta gives it.
    Number {
        wa_id: String,
        user_id: Option<String>,
    },
    /// `user_changed_user_id`: the contact's new BSUID.
    UserId(String),
}

impl InboundMessage {
    /// The change of ids a `system` message announces, read from the
    /// message as Meta sent it; `None` for every other message.
    pub fn identity_change(&self) -> Option<IdentityChange> {
        #[derive(serde::Deserialize)]
        struct Msg {
            system: System,
        }
        #[derive(serde::Deserialize)]
        struct System {
            #[serde(rename = "type")]
            kind: Option<String>,
            wa_id: Option<String>,
            user_id: Option<String>,
        }
        if self.raw_type != "system" {
            return None;
        }
        let s = serde_json::from_str::<Msg>(self.raw.get()).ok()?.system;
        let given = |v: Option<String>| v.filter(|v| !v.is_empty());
        match s.kind.as_deref()? {
            "user_changed_number" => Some(IdentityChange::Number {
                wa_id: given(s.wa_id)?,
                user_id: given(s.user_id),
            }),
            "user_changed_user_id" => given(s.user_id).map(IdentityChange::UserId),
            _ => None,
        }
    }
}

/// A delivery status of an outbound message.
#[derive(Debug, Clone)]
pub struct StatusUpdate {
    pub wamid: Wamid,
    /// Meta's status name (`sent`, `delivered`, `read`, `failed`, …).
    pub status: String,
    pub timestamp: Millis,
    pub recipient: Option<ContactId>,
    /// First error of a `failed` status: (code, title).
    pub error: Option<(i64, String)>,
    /// Meta's `pricing` object, as sent (`billable`, `pricing_model`,
    /// `type`, `category`): on `sent` and on one of `delivered`/`read`.
    pub pricing: Option<crate::message::Object>,
    /// Meta's `conversation` object, as sent (`id`, `origin.type`,
    /// `expiration_timestamp`): only inside a free entry point window.
    pub conversation: Option<crate::message::Object>,
}

#[cfg(test)]
impl InboundMessage {
    /// A text message for tests.
    pub fn test_text(wamid: &str, from: &str, body: &str, timestamp: Millis) -> Self {
        InboundMessage {
            wamid: wamid.into(),
            from: from.into(),
            contact_name: None,
            user_id: None,
            username: None,
            timestamp,
            kind: InboundKind::Text,
            raw_type: "text".into(),
            text: Some(body.into()),
            reply: None,
            context_id: None,
            opens_window: true,
            raw: serde_json::value::RawValue::from_string("{}".into()).expect("valid JSON"),
        }
    }

    /// A button (`InboundKind::Button`) or list reply for tests.
    pub fn test_reply(kind: InboundKind, id: &str, title: &str) -> Self {
        InboundMessage {
            kind,
            raw_type: "interactive".into(),
            reply: Some(ReplyChoice {
                id: id.into(),
                title: title.into(),
            }),
            ..Self::test_text("wamid.reply", "15550001111", title, 0)
        }
    }
}
