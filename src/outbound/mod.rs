//! Outbound messages: records and their status machine,
//! send policy, the paced per-account queue and the Graph API client.
//!
//! Rules and the API both enter through [`enqueue`], so policy lives in
//! one place.

pub mod graph;
pub mod ops;
mod order;
pub mod policy;
pub mod queue;
pub mod record;
pub mod retry;
pub mod sender;
pub mod store;

pub use crate::message::Content;
pub use policy::{PolicyError, enqueue};
pub use queue::{AccountQueue, QueueStats};
pub use record::{OutboundRecord, RecordError, Status};
pub use store::{Outbox, RecordFilter, StatusOutcome};
