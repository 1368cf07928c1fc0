//! CORE: a WhatsApp message in Meta's send shape ([`Content`]) and the
//! limits its content must keep ([`validate`]). Rules build messages, the
//! API accepts them and the sender sends them; none of them owns this.

pub mod validate;

use serde_json::Value;

/// A message's content in Meta's send shape: `type`, the object under that
/// key, and the quoted message, if any.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Content {
    pub kind: String,
    pub object: Value,
    pub context_id: Option<String>,
}

impl Content {
    /// Templates are the only messages allowed outside the window (SPEC §6).
    pub fn is_template(&self) -> bool {
        self.kind == "template"
    }

    /// A short text for conversation history: body, caption or template name.
    pub fn summary(&self) -> Option<String> {
        let o = &self.object;
        let s = match self.kind.as_str() {
            "text" => o.get("body"),
            "interactive" => o.get("body").and_then(|b| b.get("text")),
            "template" => o.get("name"),
            "reaction" => o.get("emoji"),
            _ => o.get("caption"),
        };
        s.and_then(Value::as_str).map(str::to_string)
    }
}
