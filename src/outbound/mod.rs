//! Outbound messages: content checks, records and their status machine,
//! send policy, the paced per-account queue and the Graph API client.
//!
//! Rules and the API both enter through [`enqueue`], so policy lives in
//! one place.

pub mod graph;
pub mod policy;
pub mod queue;
pub mod record;
pub mod retry;
pub mod sender;
pub mod store;
pub mod validate;

use serde_json::Value;

pub use policy::{PolicyError, enqueue};
pub use queue::{AccountQueue, QueueStats};
pub use record::{OutboundRecord, RecordError, Status};
pub use store::{Outbox, RecordFilter, StatusOutcome};

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
