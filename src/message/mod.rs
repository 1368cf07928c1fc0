//! CORE: a WhatsApp message in Meta's send shape ([`Content`]) and the
//! limits its content must keep ([`validate`]). Rules build messages, the
//! API accepts them and the sender sends them; none of them owns this.

pub mod validate;

use serde_json::Value;

use crate::ids::Wamid;

/// The type of an outbound message, named as Meta's `type` field names it
/// (SPEC §7). These names are also what the journal writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MessageType {
    Text,
    Image,
    Video,
    Audio,
    Document,
    Sticker,
    Location,
    Contacts,
    Interactive,
    Template,
    Reaction,
}

impl MessageType {
    pub const ALL: [MessageType; 11] = [
        MessageType::Text,
        MessageType::Image,
        MessageType::Video,
        MessageType::Audio,
        MessageType::Document,
        MessageType::Sticker,
        MessageType::Location,
        MessageType::Contacts,
        MessageType::Interactive,
        MessageType::Template,
        MessageType::Reaction,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            MessageType::Text => "text",
            MessageType::Image => "image",
            MessageType::Video => "video",
            MessageType::Audio => "audio",
            MessageType::Document => "document",
            MessageType::Sticker => "sticker",
            MessageType::Location => "location",
            MessageType::Contacts => "contacts",
            MessageType::Interactive => "interactive",
            MessageType::Template => "template",
            MessageType::Reaction => "reaction",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == name)
    }
}

impl std::fmt::Display for MessageType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A message's content in Meta's send shape: `type`, the object under that
/// key, and the quoted message, if any.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Content {
    pub kind: MessageType,
    pub object: Value,
    /// The message this one quotes.
    pub context_id: Option<Wamid>,
}

impl Content {
    /// Templates are the only messages allowed outside the window (SPEC §6).
    pub fn is_template(&self) -> bool {
        self.kind == MessageType::Template
    }

    /// A short text for conversation history: body, caption or template name.
    pub fn summary(&self) -> Option<String> {
        let o = &self.object;
        let s = match self.kind {
            MessageType::Text => o.get("body"),
            MessageType::Interactive => o.get("body").and_then(|b| b.get("text")),
            MessageType::Template => o.get("name"),
            MessageType::Reaction => o.get("emoji"),
            _ => o.get("caption"),
        };
        s.and_then(Value::as_str).map(str::to_string)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_type_the_api_knows_has_a_message_type() {
        for name in validate::TYPES {
            assert_eq!(
                MessageType::parse(name).map(MessageType::as_str),
                Some(*name)
            );
        }
        assert_eq!(MessageType::ALL.len(), validate::TYPES.len());
    }
}
