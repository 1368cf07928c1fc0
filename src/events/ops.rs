//! What the event queues write to the journal ([`crate::persist`] format
//! 1, owner `e`); the shapes of format 0.

use serde::{Deserialize, Serialize};

use crate::domain::Millis;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum EventOp {
    /// An event waiting for delivery to a target.
    Event {
        target: String,
        id: String,
        body: String,
        created: Millis,
    },
    /// That event was delivered, or given up.
    EventDone { target: String, id: String },
}
